use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::sync::Semaphore;
use tower::BoxError;
use tower_service::Service;

use super::adaptive::Limiter;
use super::future::{Slots, Wait, reject, reject_queue_full, reject_rate_limited};
use super::idle::Sweep;
use super::rate_limit::Gate;
use super::{MaxWait, ResponseBody, ResponseFuture, Slot};
use crate::metrics::ConcurrencyMetrics;

/// Limits the number of streams open at once; a stream holds its slot until its
/// response body ends.
///
/// Made by [`StreamConcurrencyLayer`](super::StreamConcurrencyLayer); see the
/// [module docs](super) for the behaviour.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::concurrency::StreamConcurrency;
/// use tower_stream_backpressure::StreamConcurrencyLayer;
///
/// let inner = service_fn(|_: http::Request<()>| async {
///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
/// });
/// let service: StreamConcurrency<_> = StreamConcurrencyLayer::new(8).layer(inner);
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let response = service.clone().oneshot(http::Request::new(())).await?;
/// assert_eq!(service.available_slots(), 7, "the body holds a slot");
/// drop(response);
/// assert_eq!(service.available_slots(), 8);
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug)]
pub struct StreamConcurrency<S> {
    inner: S,
    shared: Arc<Shared>,
    slots: Arc<Slots>,
}

/// What every service made from one layer, and every clone of those, shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) limit: usize,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) max_queued: Option<usize>,
    /// Callers waiting for a slot now.
    pub(crate) queued: Arc<AtomicUsize>,
    /// The idle sweep, with `idle_timeout`.
    pub(crate) sweep: Option<Arc<Sweep>>,
    /// The moving limit of an adaptive layer.
    pub(crate) limiter: Option<Arc<Limiter>>,
    /// The gate that holds new calls while the provider's rate limit is spent, with
    /// `pace_on_rate_limits`.
    pub(crate) gate: Option<Arc<Gate>>,
}

impl Shared {
    /// The limit in force: the adaptive one's now, or the fixed one.
    pub(crate) fn current_limit(&self) -> usize {
        self.limiter
            .as_ref()
            .map_or(self.limit, |limiter| limiter.limit())
    }
}

impl<S: Clone> Clone for StreamConcurrency<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            slots: self.slots.clone(),
        }
    }
}

impl<S> StreamConcurrency<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, metrics: Arc<ConcurrencyMetrics>) -> Self {
        let semaphore = shared.semaphore.clone();
        let limiter = shared.limiter.clone();
        let gate = shared.gate.clone();
        Self {
            inner,
            shared,
            slots: Arc::new(Slots {
                semaphore,
                metrics,
                limiter,
                gate,
            }),
        }
    }

    /// Slots free right now, shared with every service of the same layer.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let inner = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// let service = StreamConcurrencyLayer::new(2).layer(inner);
    /// let clone = service.clone();
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _open = service.oneshot(http::Request::new(())).await?;
    /// assert_eq!(clone.available_slots(), 1, "clones share the limit");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn available_slots(&self) -> usize {
        self.shared.semaphore.available_permits()
    }

    /// The limit in force now, shared with every service of the same layer: the fixed
    /// one, or where an [adaptive](super::StreamConcurrencyLayer::adaptive) one has
    /// moved.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer};
    /// use tower_stream_backpressure::concurrency::Adaptive;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let inner = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// let layer = StreamConcurrencyLayer::adaptive(Adaptive::default().initial(8));
    /// assert_eq!(layer.layer(inner).current_limit(), 8);
    /// ```
    pub fn current_limit(&self) -> usize {
        self.shared.current_limit()
    }

    /// The inner service.
    ///
    /// A call made through it bypasses the limit.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let inner = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// let service = StreamConcurrencyLayer::new(1).layer(inner);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _response = service.get_ref().clone().oneshot(http::Request::new(())).await?;
    /// assert_eq!(service.available_slots(), 1, "no slot taken");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, Service, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let inner = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// let mut service = StreamConcurrencyLayer::new(1).layer(inner);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// // Called in place, the inner service takes no slot.
    /// let inner = service.get_mut().ready().await?;
    /// let _response = inner.call(http::Request::new(())).await?;
    /// assert_eq!(service.available_slots(), 1);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes this service, returning the inner one.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let inner = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// let layer = StreamConcurrencyLayer::new(1);
    /// let unlimited = layer.layer(inner).into_inner();
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _response = unlimited.oneshot(http::Request::new(())).await?;
    /// assert_eq!(layer.available_slots(), 1);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for StreamConcurrency<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<ReqBody>>;

    /// Only asks the inner service. The slot is not taken here: a service is often
    /// cloned per request and polled ready long before (or without) a call, and a
    /// pooled client is ready while its connections sit idle. A slot taken here would
    /// be held by nothing. It is taken in [`call`](Service::call) instead.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        // While the provider's rate limit is spent, a call waits at the gate first: when
        // it opens. One load while it is open, as it nearly always is; the clock only
        // when it is not.
        let gate_opens = shared.gate.as_ref().and_then(|gate| {
            gate.opens_at()?;
            let provider = self.slots.metrics.provider();
            let open = gate.is_open(tokio::time::Instant::now(), &provider);
            if open { None } else { gate.opens_at() }
        });
        // Fast path: a slot is free (never ahead of queued callers: the semaphore hands
        // released permits to waiters first), so the call starts at once.
        let free = match gate_opens {
            None => shared.semaphore.try_acquire().ok(),
            Some(_) => None,
        };
        if let Some(permit) = free {
            permit.forget();
            let slot = Slot::new(self.slots.clone(), Duration::ZERO);
            let sweep = shared.sweep.clone();
            return ResponseFuture::calling(&mut self.inner, request, slot, sweep);
        }
        let max_wait = request
            .extensions()
            .get::<MaxWait>()
            .map_or(shared.max_wait, |max_wait| max_wait.get());
        // Turned away at once when the gate opens after the call's deadline.
        let deadline = max_wait.map(crate::deadline::from_now);
        if let (Some(opens_at), Some(deadline)) = (gate_opens, deadline) {
            if opens_at > deadline {
                let error = reject_rate_limited(
                    &self.slots.metrics,
                    shared.current_limit(),
                    Duration::ZERO,
                );
                return ResponseFuture::rejected(error);
            }
        }
        if gate_opens.is_none() && max_wait == Some(Duration::ZERO) {
            let error = reject(&self.slots.metrics, shared.current_limit(), Duration::ZERO);
            return ResponseFuture::rejected(error);
        }
        let Some(wait) = Wait::enter(shared, &self.slots) else {
            let limit = shared.current_limit();
            return ResponseFuture::rejected(reject_queue_full(&self.slots.metrics, limit));
        };
        // Slow path: queue, with a clone of the inner service that is not ready (see
        // `park`). The ready one stays here, for this service's next call.
        let parked = self.inner.clone();
        // Every waiting call goes by the gate, open or not now: it may close while the
        // call waits for its slot.
        ResponseFuture::waiting(wait, deadline, shared.gate.clone(), parked, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StreamConcurrencyLayer;
    use crate::concurrency::Rejected;
    use http_body_util::Empty;
    use std::fmt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Layer, ServiceExt, service_fn};

    #[derive(Debug)]
    struct UpstreamDown;
    impl fmt::Display for UpstreamDown {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("upstream down")
        }
    }
    impl std::error::Error for UpstreamDown {}

    /// A service that is always ready and answers with a body that never ends.
    #[derive(Clone, Default)]
    struct Endless {
        ready_polls: Arc<AtomicUsize>,
    }

    impl Service<Request<()>> for Endless {
        type Response = Response<Pending>;
        type Error = UpstreamDown;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.ready_polls.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(Ok(Response::new(Pending)))
        }
    }

    /// A body that never yields.
    #[derive(Debug)]
    struct Pending;

    impl Body for Pending {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn poll_ready_takes_no_slot() {
        let layer = StreamConcurrencyLayer::new(2);
        let inner = Endless::default();
        let mut services: Vec<_> = (0..5).map(|_| layer.layer(inner.clone())).collect();
        for service in &mut services {
            service.ready().await.unwrap();
        }
        assert_eq!(inner.ready_polls.load(Ordering::SeqCst), 5, "delegated");
        assert_eq!(layer.available_slots(), 2, "ready services hold nothing");
    }

    #[tokio::test]
    async fn every_service_and_clone_of_a_layer_shares_one_limit() {
        let layer = StreamConcurrencyLayer::new(2).max_wait(Duration::ZERO);
        let a = layer.layer(Endless::default());
        let b = layer.layer(Endless::default());
        let held_a = a.clone().oneshot(Request::new(())).await.unwrap();
        let held_b = b.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(a.available_slots(), 0);
        let error = a.clone().oneshot(Request::new(())).await.unwrap_err();
        assert!(error.is::<Rejected>());
        let error = layer
            .clone()
            .layer(Endless::default())
            .oneshot(Request::new(()))
            .await;
        assert!(error.unwrap_err().is::<Rejected>());
        drop((held_a, held_b));
        assert_eq!(layer.available_slots(), 2);
    }

    #[tokio::test]
    async fn inner_errors_pass_through_unchanged_and_release_the_slot() {
        let layer = StreamConcurrencyLayer::new(1);
        let service = layer.layer(service_fn(|_: Request<()>| async {
            Err::<Response<Empty<bytes::Bytes>>, _>(UpstreamDown)
        }));
        let error = service.oneshot(Request::new(())).await.unwrap_err();
        assert!(error.is::<UpstreamDown>(), "{error}");
        assert_eq!(layer.available_slots(), 1);
    }

    #[tokio::test]
    async fn a_response_future_dropped_unpolled_releases_its_slot() {
        let layer = StreamConcurrencyLayer::new(1);
        let mut service = layer.layer(Endless::default());
        service.ready().await.unwrap();
        let future = service.call(Request::new(()));
        assert_eq!(layer.available_slots(), 0, "taken at call");
        drop(future);
        assert_eq!(layer.available_slots(), 1);
    }

    #[test]
    fn a_limit_of_zero_is_refused() {
        let error = StreamConcurrencyLayer::try_new(0).unwrap_err();
        assert_eq!(error.setting(), "limit");
        assert!(error.to_string().contains("leave the layer out"), "{error}");
        let error = StreamConcurrencyLayer::try_new(Semaphore::MAX_PERMITS + 1).unwrap_err();
        assert_eq!(error.setting(), "limit");
        assert!(StreamConcurrencyLayer::try_new(Semaphore::MAX_PERMITS).is_ok());
    }

    #[test]
    #[should_panic(expected = "invalid `limit`: must be at least 1")]
    fn new_panics_on_zero() {
        let _ = StreamConcurrencyLayer::new(0);
    }

    /// Polls `future` to its output, then once more.
    async fn poll_twice<F: std::future::Future>(future: F) {
        let mut future = std::pin::pin!(future);
        let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
        let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
    }

    #[tokio::test]
    #[should_panic(expected = "ResponseFuture polled after completion")]
    async fn a_response_future_polled_after_its_response_panics() {
        let mut service = StreamConcurrencyLayer::new(1).layer(Endless::default());
        poll_twice(service.ready().await.unwrap().call(Request::new(()))).await;
    }

    #[tokio::test]
    #[should_panic(expected = "ResponseFuture polled after completion")]
    async fn a_response_future_polled_after_its_rejection_panics() {
        let layer = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
        let mut service = layer.layer(Endless::default());
        let _held = service.clone().oneshot(Request::new(())).await.unwrap();
        poll_twice(service.ready().await.unwrap().call(Request::new(()))).await;
    }

    #[tokio::test]
    #[should_panic(expected = "ResponseFuture polled after completion")]
    async fn a_response_future_polled_after_an_inner_error_panics() {
        let mut service =
            StreamConcurrencyLayer::new(1).layer(service_fn(|_: Request<()>| async {
                Err::<Response<Empty<bytes::Bytes>>, _>(UpstreamDown)
            }));
        poll_twice(service.ready().await.unwrap().call(Request::new(()))).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ended_is_never_timed_out() {
        use http_body_util::{BodyExt, Full};
        let layer = StreamConcurrencyLayer::new(1).idle_timeout(Duration::from_secs(1));
        let service = layer.layer(service_fn(|_: Request<()>| async {
            Ok::<_, UpstreamDown>(Response::new(Full::new(bytes::Bytes::from("data: x\n\n"))))
        }));
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(layer.available_slots(), 1, "released at the end");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(body.frame().await.is_none(), "the end, not a timeout");
    }

    #[tokio::test]
    async fn a_retry_layer_below_carries_the_slot_in_its_body_unless_the_sweep_needs_it() {
        use crate::{FirstChunkRetryLayer, RetryPolicy};
        use http_body_util::{BodyExt, Full};
        let upstream = service_fn(|_: Request<()>| async {
            Ok::<_, UpstreamDown>(Response::new(Full::new(bytes::Bytes::from("data: x\n\n"))))
        });
        for (layer, carried_below) in [
            (StreamConcurrencyLayer::new(1), true),
            (
                StreamConcurrencyLayer::new(1).idle_timeout(Duration::from_secs(1)),
                false,
            ),
        ] {
            let retry = FirstChunkRetryLayer::new(RetryPolicy::default());
            let service = layer.layer(retry.layer(upstream));
            let response = service.oneshot(Request::new(())).await.unwrap();
            let mut body = response.into_body();
            assert_eq!(
                format!("{body:?}").contains("Passed"),
                carried_below,
                "{body:?}"
            );
            assert_eq!(layer.available_slots(), 0);
            assert_eq!(
                body.frame().await.unwrap().unwrap().into_data().unwrap(),
                "data: x\n\n"
            );
            assert_eq!(
                layer.available_slots(),
                1,
                "released at the end, either way"
            );
        }
    }

    #[test]
    #[should_panic(expected = "invalid `idle_timeout`: must be above zero")]
    fn a_zero_idle_timeout_is_refused() {
        let _ = StreamConcurrencyLayer::new(1).idle_timeout(Duration::ZERO);
    }
}
