use std::task::{Context, Poll};

use http::Request;
use tower_service::Service;

use super::RetryBudget;

/// Deposits one request into a [`RetryBudget`] per call and puts the budget in the
/// request's extensions, where [`FirstChunkRetry`](crate::retry::FirstChunkRetry)
/// finds it and withdraws one unit per retry.
///
/// Made by [`RetryBudgetLayer`](super::RetryBudgetLayer). Responses, errors and futures
/// pass through untouched.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::budget::WithRetryBudget;
/// use tower_stream_backpressure::{RetryBudget, RetryBudgetLayer};
///
/// // The inner service finds the budget in the request's extensions.
/// let inner = service_fn(|request: http::Request<()>| async move {
///     Ok::<_, Infallible>(request.extensions().get::<RetryBudget>().is_some())
/// });
/// let service: WithRetryBudget<_> = RetryBudgetLayer::new(RetryBudget::default()).layer(inner);
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// assert!(service.oneshot(http::Request::new(())).await?);
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct WithRetryBudget<S> {
    inner: S,
    budget: RetryBudget,
}

impl<S> WithRetryBudget<S> {
    /// Wraps `inner`, depositing into `budget`.
    ///
    /// Unlike [`RetryBudgetLayer`](super::RetryBudgetLayer), it registers no metric.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use tower_stream_backpressure::budget::WithRetryBudget;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0)?;
    /// let inner = service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(()) });
    /// let service = WithRetryBudget::new(inner, budget.clone());
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// service.oneshot(http::Request::new(())).await?;
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// assert_eq!(budget.available(), 1, "one request deposited one retry");
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new(inner: S, budget: RetryBudget) -> Self {
        Self { inner, budget }
    }

    /// The inner service.
    ///
    /// A call made through it bypasses this service: it deposits nothing.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use tower_stream_backpressure::budget::WithRetryBudget;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0)?;
    /// let inner = service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(()) });
    /// let service = WithRetryBudget::new(inner, budget.clone());
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// service.get_ref().clone().oneshot(http::Request::new(())).await?;
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// assert_eq!(budget.available(), 0);
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes this service, returning the inner one.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use tower_stream_backpressure::budget::WithRetryBudget;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0)?;
    /// let inner = service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>("pong") });
    /// let service = WithRetryBudget::new(inner, budget.clone());
    /// let inner = service.into_inner();
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// assert_eq!(inner.oneshot(http::Request::new(())).await?, "pong");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// assert_eq!(budget.available(), 0, "the unwrapped service deposits nothing");
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for WithRetryBudget<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        self.budget.deposit();
        request.extensions_mut().insert(self.budget.clone());
        self.inner.call(request)
    }
}
