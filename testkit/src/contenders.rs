//! What a user would stack instead of the crate's layers, for the benchmarks to set side
//! by side with them: tower's own limit and retry ([`tower_stack`]), and tower-http's
//! response-body timeout ([`tower_http_body_timeout`]), the usual body wrapper around a
//! streaming client.
//!
//! Both are generic over the inner service, so that the micro-benchmark (an in-memory
//! upstream) and the load test (a hyper-util client) measure the same contenders.
//! Neither boxes a service, a future or a body: each contender costs what it would cost
//! in an application, and no more.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tower::limit::ConcurrencyLimitLayer;
use tower::retry::Policy;
use tower::retry::RetryLayer;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::timeout::ResponseBodyTimeoutLayer;

/// The timeout of [`tower_http_body_timeout`]: far longer than any benchmark's pause
/// between two frames, so it never fires; what it costs is the timer it arms and
/// disarms around every frame.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The one-line policy a user would write for tower's `Retry`: retry errors and 5xx
/// responses while the budget allows; every other response deposits in it.
///
/// `clone_request` clones every request before it is sent (`B: Clone`), as tower's
/// `Retry` needs a copy to send again.
#[derive(Clone)]
pub struct RetryWhileBudget(pub Arc<TpsBudget>);

impl<B, R, E> Policy<Request<B>, Response<R>, E> for RetryWhileBudget
where
    B: Clone,
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<B>,
        result: &mut Result<Response<R>, E>,
    ) -> Option<Self::Future> {
        let failed = result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        if !failed {
            self.0.deposit();
            return None;
        }
        self.0.withdraw().then(|| std::future::ready(()))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        Some(request.clone())
    }
}

/// tower's stack around `inner`: `ConcurrencyLimit(limit)` over `Retry` with
/// [`RetryWhileBudget`] and a `TpsBudget::new(10 s, 10, 0.2)`, errors as
/// [`BoxError`].
///
/// tower's limit is released when the response headers arrive, not at the end of the
/// body, and its retry decides on the headers: it does less than our layers, which is
/// what a user gives up by picking it.
pub fn tower_stack<S, B, R>(
    inner: S,
    limit: usize,
) -> impl Service<Request<B>, Response = Response<R>, Error = BoxError, Future = impl Send>
+ Clone
+ Send
+ 'static
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Clone + Send + 'static,
    R: Send + 'static,
{
    let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
    ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(limit))
        .layer(RetryLayer::new(RetryWhileBudget(budget)))
        .service(inner)
        .map_err(Into::<BoxError>::into)
}

/// tower-http's `ResponseBodyTimeout` around `inner`, with [`BODY_TIMEOUT`]: each
/// response body wrapped in a `TimeoutBody`, which arms a timer before it polls the
/// inner body and resets it after each frame.
pub fn tower_http_body_timeout<S>(inner: S) -> tower_http::timeout::ResponseBodyTimeout<S> {
    ServiceBuilder::new()
        .layer(ResponseBodyTimeoutLayer::new(BODY_TIMEOUT))
        .service(inner)
}
