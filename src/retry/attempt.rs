/// A request extension: this request is a retry, an attempt after the first that a
/// retrying layer made for a call already under way.
///
/// [`FirstChunkRetry`](super::FirstChunkRetry) puts it on every attempt after the
/// first. Layers below a retrying layer see each attempt as a request of its own; the
/// mark tells them apart from new calls. [`RetryBudgetLayer`](crate::RetryBudgetLayer)
/// reads it: a retry is not a new call, so it deposits nothing (and the layer warns
/// once that it sits below the retry layer, where it cannot bound retries).
///
/// A retrying layer of your own (tower's [`Retry`](https://docs.rs/tower/0.5/tower/retry/struct.Retry.html) with your
/// policy, say) should put it on the requests it sends again, so that a budget
/// layer below does not count one call as several:
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::retry::RetryAttempt;
/// use tower_stream_backpressure::{RetryBudget, RetryBudgetLayer};
///
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
/// let upstream = service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(()) });
/// let service = RetryBudgetLayer::new(budget.clone()).layer(upstream);
///
/// // The first attempt of a call, then a retry of it.
/// let first = http::Request::new(());
/// let mut retry = http::Request::new(());
/// retry.extensions_mut().insert(RetryAttempt);
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// service.clone().oneshot(first).await?;
/// service.oneshot(retry).await?;
/// # Ok::<(), Infallible>(())
/// # })?;
/// assert_eq!(budget.available(), 1, "one call, one deposit");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RetryAttempt;
