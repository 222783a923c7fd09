use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

use super::hedge::Hedging;
use super::{ResponseBody, ResponseFuture, RetryPolicy};
use crate::frame::Detector;
use crate::metrics::RetryMetrics;

/// Retries a streaming call while, and only while, nothing has reached the caller.
///
/// Made by [`FirstChunkRetryLayer`](super::FirstChunkRetryLayer); see the
/// [module docs](super) for the behaviour.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::frame::Auto;
/// use tower_stream_backpressure::retry::FirstChunkRetry;
/// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
///
/// let calls = Arc::new(AtomicUsize::new(0));
/// let upstream = {
///     let calls = calls.clone();
///     service_fn(move |_: http::Request<()>| {
///         // A bad gateway once, then fine.
///         let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 { 502 } else { 200 };
///         let response = http::Response::builder().status(status);
///         async move { response.body(Full::new(Bytes::from("data"))) }
///     })
/// };
/// let client: FirstChunkRetry<_, Auto> =
///     FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream);
/// # tokio::runtime::Builder::new_current_thread()
/// #     .enable_all()
/// #     .start_paused(true)
/// #     .build()?
/// #     .block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// assert_eq!(response.status(), 200);
/// assert_eq!(calls.load(Ordering::SeqCst), 2);
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug)]
pub struct FirstChunkRetry<S, D> {
    inner: S,
    shared: Arc<Shared<D>>,
    metrics: Arc<RetryMetrics>,
}

/// The settings every service of one layer shares, and the hedging state they make.
#[derive(Debug)]
pub(crate) struct Shared<D> {
    pub(crate) policy: RetryPolicy,
    pub(crate) detector: D,
    pub(super) hedging: Option<Hedging>,
}

impl<D> Shared<D> {
    pub(super) fn new(policy: RetryPolicy, detector: D) -> Self {
        let hedging = policy.get_hedge().map(Hedging::new);
        Self {
            policy,
            detector,
            hedging,
        }
    }
}

impl<S: Clone, D> Clone for FirstChunkRetry<S, D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S, D> FirstChunkRetry<S, D> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<D>>, metrics: Arc<RetryMetrics>) -> Self {
        Self {
            inner,
            shared,
            metrics,
        }
    }

    /// The policy in force.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{service_fn, Layer};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    /// });
    /// let policy = RetryPolicy::default().max_attempts(1);
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// let settings = format!("{:?}", client.policy());
    /// assert!(settings.contains("max_attempts: 1"), "{settings}");
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        &self.shared.policy
    }

    /// The inner service.
    ///
    /// A call made through it is not retried.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let upstream = {
    ///     let calls = calls.clone();
    ///     service_fn(move |_: http::Request<()>| {
    ///         // Overloaded once, then fine.
    ///         let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 { 503 } else { 200 };
    ///         let response = http::Response::builder().status(status);
    ///         async move { response.body(Full::new(Bytes::from("data"))) }
    ///     })
    /// };
    /// let client = FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let response = client.get_ref().clone().oneshot(http::Request::new(())).await?;
    /// assert_eq!(response.status(), 503);
    /// assert_eq!(calls.load(Ordering::SeqCst), 1);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes this service, returning the inner one.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let upstream = {
    ///     let calls = calls.clone();
    ///     service_fn(move |_: http::Request<()>| {
    ///         // Overloaded once, then fine.
    ///         let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 { 503 } else { 200 };
    ///         let response = http::Response::builder().status(status);
    ///         async move { response.body(Full::new(Bytes::from("data"))) }
    ///     })
    /// };
    /// let client = FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream);
    /// let upstream = client.into_inner();
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let response = upstream.oneshot(http::Request::new(())).await?;
    /// assert_eq!(response.status(), 503, "not retried");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, D, ReqBody, ResBody> Service<Request<ReqBody>> for FirstChunkRetry<S, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin,
    ResBody::Data: AsRef<[u8]>,
    ResBody::Error: Into<BoxError>,
    D: Detector,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody, ResBody, D>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The ready service makes the first attempt and, polled ready again, the
        // retries; this one keeps a fresh clone.
        let ready = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, ready);
        ResponseFuture::new(ready, request, self.shared.clone(), self.metrics.clone())
    }
}
