use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::Meter;
use tokio::sync::Semaphore;
use tower_layer::Layer;

use super::StreamConcurrency;
use super::adaptive::Limiter;
use super::idle::Sweep;
use super::rate_limit::Gate;
use super::service::Shared;
use crate::ConfigError;
use crate::metrics::{ConcurrencyMetrics, Telemetry, observe_limit};

/// Applies [`StreamConcurrency`] to a service: at most `limit` streams open at once,
/// each holding its slot until its response body ends.
///
/// Every service made from one layer, and every clone of those, shares one limit.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::StreamConcurrencyLayer;
///
/// let layer = StreamConcurrencyLayer::new(100)
///     .max_wait(Duration::from_secs(2))
///     .provider("openai");
/// assert_eq!(layer.available_slots(), 100);
/// ```
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct StreamConcurrencyLayer {
    shared: Arc<Shared>,
    telemetry: Telemetry<ConcurrencyMetrics>,
}

impl StreamConcurrencyLayer {
    /// A limit of `limit` concurrent streams, waiting without bound for a slot (until
    /// the caller drops the call).
    ///
    /// # Panics
    ///
    /// When `limit` is 0 or above [`Semaphore::MAX_PERMITS`]. A limit of 0 is not
    /// "unlimited": to have no limit, leave the layer out. Use
    /// [`try_new`](Self::try_new) for a limit read from configuration.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(2);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let open = service.oneshot(http::Request::new(())).await?;
    /// assert_eq!(layer.available_slots(), 1, "one stream open");
    /// drop(open);
    /// assert_eq!(layer.available_slots(), 2);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new(limit: usize) -> Self {
        Self::try_new(limit).unwrap_or_else(|error| panic!("StreamConcurrencyLayer: {error}"))
    }

    /// Like [`new`](Self::new), but returns an error for a limit out of range.
    ///
    /// ```
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// assert!(StreamConcurrencyLayer::try_new(0).is_err());
    /// assert!(StreamConcurrencyLayer::try_new(8).is_ok());
    /// ```
    pub fn try_new(limit: usize) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new(
                "limit",
                "must be at least 1 (0 is not unlimited: to have no limit, leave the layer out)",
            ));
        }
        if limit > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "limit",
                format!("must be at most {}, got {limit}", Semaphore::MAX_PERMITS),
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                semaphore: Arc::new(Semaphore::new(limit)),
                queued: Arc::default(),
                limit,
                max_wait: None,
                max_queued: None,
                sweep: None,
                limiter: None,
                gate: None,
            }),
            telemetry: Telemetry::default(),
        })
    }

    /// A limit that moves with what the upstream says: down on overload signals (`429`,
    /// `503`, `529`, in-band overload errors, first-chunk timeouts, HTTP/2
    /// `REFUSED_STREAM` and `ENHANCE_YOUR_CALM`), up while calls reach it and answer
    /// fast. See [`Adaptive`](super::Adaptive) and its module docs for the algorithms.
    ///
    /// Everything the fixed limit does holds: FIFO, `max_wait`, `max_queued`, the
    /// rejection reasons, a slot held to the end of its stream. A smaller limit never
    /// revokes a slot: streams drain, new calls wait. The signals come from each
    /// attempt, through the slot that a [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer)
    /// below carries (so attempts it retried count too); without one, from each
    /// response's status and its headers' time.
    ///
    /// # Panics
    ///
    /// When a setting of `adaptive` is out of range (see
    /// [`Adaptive::validate`](super::Adaptive::validate)); use
    /// [`try_adaptive`](Self::try_adaptive) for settings read from configuration.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::adaptive(Adaptive::default().max(100));
    /// assert_eq!(layer.current_limit(), 20, "the initial limit");
    /// ```
    pub fn adaptive(adaptive: super::Adaptive) -> Self {
        Self::try_adaptive(adaptive)
            .unwrap_or_else(|error| panic!("StreamConcurrencyLayer: {error}"))
    }

    /// [`adaptive`](Self::adaptive), with settings out of range as an error.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let error = StreamConcurrencyLayer::try_adaptive(Adaptive::default().min(0)).unwrap_err();
    /// assert_eq!(error.setting(), "adaptive.min");
    /// ```
    pub fn try_adaptive(adaptive: super::Adaptive) -> Result<Self, ConfigError> {
        adaptive.validate()?;
        let layer = Self::try_new(adaptive.get_initial())?;
        let limiter = Limiter::new(adaptive, layer.shared.semaphore.clone());
        let layer = layer.with(|shared| shared.limiter = Some(Arc::new(limiter)));
        Ok(layer.pace_on_rate_limits(true))
    }

    /// Holds new calls while the provider says the account's rate limit is spent (off
    /// by default; on by default with [`adaptive`](Self::adaptive)).
    ///
    /// A response that says no requests or tokens are left (OpenAI's
    /// `x-ratelimit-remaining-requests: 0` with `x-ratelimit-reset-requests: 6m0s`, or
    /// `...-tokens`; Anthropic's `anthropic-ratelimit-requests-remaining: 0` with its
    /// `...-reset` time, or the token limits), or a 429 with `Retry-After`, closes the
    /// layer's gate until the reset: new calls wait there, under their `max_wait`,
    /// instead of each earning its own 429. A call whose `max_wait` ends before the
    /// reset fails at once with [`Rejected`](super::Rejected)
    /// ([`RejectReason::RateLimited`](super::RejectReason::RateLimited)), counted as
    /// `reason="rate_limited"`. The headers are read from every attempt of a
    /// [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer) below, or from each response
    /// head without one. Malformed or absurd values (a wait above an hour) are ignored
    /// with a `DEBUG` event. `stream_rate_limit_wait_seconds` records the time calls
    /// were held; the gate closing and opening are `INFO` events.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(50)
    ///     .max_wait(Duration::from_secs(30))
    ///     .pace_on_rate_limits(true);
    /// assert!(layer.get_pace_on_rate_limits());
    /// ```
    pub fn pace_on_rate_limits(self, pace: bool) -> Self {
        self.with(|shared| shared.gate = pace.then(|| Arc::new(Gate::new())))
    }

    /// Whether [`pace_on_rate_limits`](Self::pace_on_rate_limits) is on.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// assert!(!StreamConcurrencyLayer::new(8).get_pace_on_rate_limits());
    /// assert!(StreamConcurrencyLayer::adaptive(Adaptive::default()).get_pace_on_rate_limits());
    /// ```
    pub fn get_pace_on_rate_limits(&self) -> bool {
        self.shared.gate.is_some()
    }

    /// The limit in force now: the fixed one, or where an adaptive one has moved.
    ///
    /// ```
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// assert_eq!(StreamConcurrencyLayer::new(8).current_limit(), 8);
    /// ```
    pub fn current_limit(&self) -> usize {
        self.shared.current_limit()
    }

    /// How long a call may wait for a slot before it fails with
    /// [`Rejected`](super::Rejected) ([`RejectReason::DeadlineExceeded`]).
    /// `Duration::ZERO` fails at once when every slot is held. Without it, a call
    /// waits until its caller drops it. A [`MaxWait`](super::MaxWait) request extension
    /// overrides it for one call.
    ///
    /// [`RejectReason::DeadlineExceeded`]: super::RejectReason::DeadlineExceeded
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{Rejected, StreamConcurrencyLayer};
    ///
    /// let layer = StreamConcurrencyLayer::new(1).max_wait(Duration::from_secs(2));
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let open = service.clone().oneshot(http::Request::new(())).await?;
    /// // The second call queues for up to 2 s; nobody frees the slot, so it fails.
    /// let started = tokio::time::Instant::now();
    /// let error = service.clone().oneshot(http::Request::new(())).await.unwrap_err();
    /// assert!(error.is::<Rejected>());
    /// assert!(started.elapsed() >= Duration::from_secs(2));
    /// drop(open);
    /// assert!(service.oneshot(http::Request::new(())).await.is_ok());
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn max_wait(self, max_wait: Duration) -> Self {
        self.with(|shared| shared.max_wait = Some(max_wait))
    }

    /// How many callers may wait for a slot at once: when `max_queued` already wait, the
    /// next one fails at once with [`Rejected`](super::Rejected)
    /// ([`RejectReason::QueueFull`](super::RejectReason::QueueFull)), counted as
    /// `stream_concurrency_rejections_total{reason="queue_full"}`. `0` lets nobody
    /// wait. Without it the queue is unbounded and each caller's `max_wait` (or its own
    /// deadline) decides.
    ///
    /// A waiting call holds its request (head, extensions and body as the caller made
    /// them), a clone of the inner service, and about 300 bytes of its own: its place
    /// in the queue, and a timer with `max_wait`. Bound the queue where that times the
    /// callers that may pile up during an outage is more than the process can hold.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{RejectReason, Rejected, StreamConcurrencyLayer};
    ///
    /// let layer = StreamConcurrencyLayer::new(1).max_queued(1);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _open = service.clone().oneshot(http::Request::new(())).await?; // holds the slot
    /// let _waiting = tokio::spawn(service.clone().oneshot(http::Request::new(())));
    /// tokio::task::yield_now().await; // the second call is queued now
    ///
    /// let error = service.oneshot(http::Request::new(())).await.unwrap_err();
    /// let rejected = error.downcast_ref::<Rejected>().expect("a rejection");
    /// assert_eq!(rejected.reason(), RejectReason::QueueFull);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn max_queued(self, max_queued: usize) -> Self {
        self.with(|shared| shared.max_queued = Some(max_queued))
    }

    /// Ends a stream whose consumer neither reads nor drops its body for `timeout`
    /// after it was handed a frame (a stalled reader): its upstream body is dropped,
    /// closing the upstream stream, its slot is released, and the body's next poll
    /// returns [`IdleTimeout`](super::IdleTimeout). A body waiting for the upstream is
    /// not idle. The stream ends between `timeout` and `timeout * 1.25` after its last
    /// poll: one task per layer sweeps the open streams every `timeout / 4`, so no
    /// timer is set or reset per frame (see the module docs).
    ///
    /// Without it, a body that is never polled again holds its slot until it is dropped.
    /// Needs a tokio runtime (the sweep is a task).
    ///
    /// # Panics
    ///
    /// When `timeout` is zero: no stream could be read at all.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::pin::Pin;
    /// use std::task::{Context, Poll};
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body::{Body, Frame};
    /// use http_body_util::BodyExt;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::concurrency::IdleTimeout;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// /// A stream with more to send than anyone reads.
    /// struct Endless;
    ///
    /// impl Body for Endless {
    ///     type Data = Bytes;
    ///     type Error = Infallible;
    ///
    ///     fn poll_frame(
    ///         self: Pin<&mut Self>,
    ///         _: &mut Context<'_>,
    ///     ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
    ///         Poll::Ready(Some(Ok(Frame::data(Bytes::from("data: {}\n\n")))))
    ///     }
    /// }
    ///
    /// let layer = StreamConcurrencyLayer::new(1).idle_timeout(Duration::from_secs(60));
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Endless))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let mut body = service.oneshot(http::Request::new(())).await?.into_body();
    /// body.frame().await.unwrap()?; // one frame read, then the reader stalls
    /// assert_eq!(layer.available_slots(), 0);
    ///
    /// tokio::time::sleep(Duration::from_secs(80)).await;
    /// assert_eq!(layer.available_slots(), 1, "the stalled stream was ended");
    /// let error = body.frame().await.unwrap().unwrap_err();
    /// assert!(error.is::<IdleTimeout>(), "{error}");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn idle_timeout(self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "StreamConcurrencyLayer: invalid `idle_timeout`: must be above zero"
        );
        self.with(|shared| shared.sweep = Some(Arc::new(Sweep::new(timeout))))
    }

    /// The same layer (the same slots and queue), with other settings.
    fn with(self, change: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Shared {
            semaphore: self.shared.semaphore.clone(),
            queued: self.shared.queued.clone(),
            limit: self.shared.limit,
            max_wait: self.shared.max_wait,
            max_queued: self.shared.max_queued,
            sweep: self.shared.sweep.clone(),
            limiter: self.shared.limiter.clone(),
            gate: self.shared.gate.clone(),
        };
        change(&mut shared);
        Self {
            shared: Arc::new(shared),
            ..self
        }
    }

    /// The limit: streams open at once.
    ///
    /// ```
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// assert_eq!(StreamConcurrencyLayer::new(8).limit(), 8);
    /// ```
    pub fn limit(&self) -> usize {
        self.shared.limit
    }

    /// The [`max_wait`](Self::max_wait) in force, `None` when a call waits until its
    /// caller drops it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(8);
    /// assert_eq!(layer.get_max_wait(), None);
    /// let layer = layer.max_wait(Duration::from_secs(2));
    /// assert_eq!(layer.get_max_wait(), Some(Duration::from_secs(2)));
    /// ```
    pub fn get_max_wait(&self) -> Option<Duration> {
        self.shared.max_wait
    }

    /// The [`max_queued`](Self::max_queued) in force, `None` when unbounded.
    ///
    /// ```
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// assert_eq!(StreamConcurrencyLayer::new(8).max_queued(100).get_max_queued(), Some(100));
    /// ```
    pub fn get_max_queued(&self) -> Option<usize> {
        self.shared.max_queued
    }

    /// The [`idle_timeout`](Self::idle_timeout) in force, `None` when off.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(8).idle_timeout(Duration::from_secs(60));
    /// assert_eq!(layer.get_idle_timeout(), Some(Duration::from_secs(60)));
    /// ```
    pub fn get_idle_timeout(&self) -> Option<Duration> {
        self.shared.sweep.as_ref().map(|sweep| sweep.timeout())
    }

    /// The `provider` attribute of this layer's metrics (default `"unknown"`). See
    /// [`metrics`](crate::metrics) for reading them back.
    ///
    /// ```
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(10).provider("openai");
    /// # let _ = layer;
    /// ```
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        Self {
            telemetry: self.telemetry.with_provider(provider),
            ..self
        }
    }

    /// The meter this layer records to (default: the global meter provider's, taken
    /// when the layer first builds a service). See [`metrics`](crate::metrics) for an
    /// SDK meter provider read back in a test.
    ///
    /// ```
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(10).meter(opentelemetry::global::meter("my-client"));
    /// # let _ = layer;
    /// ```
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            telemetry: self.telemetry.with_meter(meter),
            ..self
        }
    }

    /// Slots free right now, shared with every service made from this layer.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(4);
    /// let inner = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// // Two services of one layer share its slots.
    /// let (a, b) = (layer.layer(inner.clone()), layer.layer(inner));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _one = a.oneshot(http::Request::new(())).await?;
    /// let _two = b.oneshot(http::Request::new(())).await?;
    /// assert_eq!(layer.available_slots(), 2);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn available_slots(&self) -> usize {
        self.shared.semaphore.available_permits()
    }
}

impl<S> Layer<S> for StreamConcurrencyLayer {
    type Service = StreamConcurrency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Arc::downgrade(&self.shared);
        let metrics = self.telemetry.instruments(|meter, provider| {
            observe_limit(meter, provider.clone(), shared);
            ConcurrencyMetrics::new(meter, provider)
        });
        StreamConcurrency::new(inner, self.shared.clone(), metrics)
    }
}
