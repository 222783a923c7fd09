use std::fmt;
use std::time::Duration;

/// A call got no concurrency slot.
///
/// Returned (boxed in a [`tower::BoxError`]) by
/// [`StreamConcurrency`](super::StreamConcurrency) when every slot is held and none came
/// free within the call's `max_wait`, or when
/// [`max_queued`](super::StreamConcurrencyLayer::max_queued) callers already wait.
/// Downcast it to tell back-pressure from an upstream failure:
///
/// ```
/// use tower_stream_backpressure::{RejectReason, Rejected};
///
/// fn is_backpressure(err: &tower::BoxError) -> bool {
///     matches!(
///         err.downcast_ref::<Rejected>().map(Rejected::reason),
///         Some(RejectReason::DeadlineExceeded | RejectReason::QueueFull)
///     )
/// }
/// # let _ = is_backpressure;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    reason: RejectReason,
    limit: usize,
    waited: Duration,
}

impl Rejected {
    pub(crate) fn deadline_exceeded(limit: usize, waited: Duration) -> Self {
        Self {
            reason: RejectReason::DeadlineExceeded,
            limit,
            waited,
        }
    }

    pub(crate) fn rate_limited(limit: usize, waited: Duration) -> Self {
        Self {
            reason: RejectReason::RateLimited,
            limit,
            waited,
        }
    }

    pub(crate) fn queue_full(limit: usize) -> Self {
        Self {
            reason: RejectReason::QueueFull,
            limit,
            waited: Duration::ZERO,
        }
    }

    /// Why the call was rejected.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{RejectReason, Rejected, StreamConcurrencyLayer};
    ///
    /// let layer = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _open = service.clone().oneshot(http::Request::new(())).await?; // holds the slot
    /// let error = service.oneshot(http::Request::new(())).await.unwrap_err();
    /// let rejected = error.downcast_ref::<Rejected>().expect("a rejection");
    /// assert_eq!(rejected.reason(), RejectReason::DeadlineExceeded);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn reason(&self) -> RejectReason {
        self.reason
    }

    /// The limit that was reached.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{Rejected, StreamConcurrencyLayer};
    ///
    /// let layer = StreamConcurrencyLayer::new(2).max_wait(Duration::ZERO);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _first = service.clone().oneshot(http::Request::new(())).await?;
    /// let _second = service.clone().oneshot(http::Request::new(())).await?;
    /// let error = service.oneshot(http::Request::new(())).await.unwrap_err();
    /// assert_eq!(error.downcast_ref::<Rejected>().map(Rejected::limit), Some(2));
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How long the call waited for a slot before giving up.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{Rejected, StreamConcurrencyLayer};
    ///
    /// let layer = StreamConcurrencyLayer::new(1).max_wait(Duration::from_millis(200));
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let _open = service.clone().oneshot(http::Request::new(())).await?;
    /// let error = service.oneshot(http::Request::new(())).await.unwrap_err();
    /// let rejected = error.downcast_ref::<Rejected>().expect("a rejection");
    /// assert!(rejected.waited() >= Duration::from_millis(200));
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            RejectReason::QueueFull => write!(
                f,
                "stream concurrency limit of {} reached and the queue of callers waiting \
                 for a slot is full ({})",
                self.limit,
                self.reason.as_str()
            ),
            RejectReason::DeadlineExceeded => write!(
                f,
                "stream concurrency limit of {} reached: no slot came free within {:?} ({})",
                self.limit,
                self.waited,
                self.reason.as_str()
            ),
            RejectReason::RateLimited => write!(
                f,
                "the provider's rate limit is spent until after this call's max_wait, \
                 waited {:?} ({})",
                self.waited,
                self.reason.as_str()
            ),
        }
    }
}

impl std::error::Error for Rejected {}

/// Why a call got no concurrency slot.
///
/// The metric `stream_concurrency_rejections_total` also counts `context_canceled`: a
/// caller that dropped its call while waiting. No caller sees that one as an error,
/// since the caller is gone.
///
/// ```
/// use tower_stream_backpressure::{RejectReason, Rejected};
///
/// /// What to tell the end user about a failed call.
/// fn explain(error: &tower::BoxError) -> &'static str {
///     match error.downcast_ref::<Rejected>().map(Rejected::reason) {
///         Some(RejectReason::DeadlineExceeded) => "too busy: try again shortly",
///         Some(_) => "too busy",
///         None => "the upstream failed",
///     }
/// }
///
/// let error: tower::BoxError = "connection reset".into();
/// assert_eq!(explain(&error), "the upstream failed");
/// assert_eq!(RejectReason::DeadlineExceeded.to_string(), "deadline_exceeded");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The call's `max_wait` passed before a slot came free (at once when `max_wait` is
    /// zero).
    DeadlineExceeded,
    /// [`max_queued`](super::StreamConcurrencyLayer::max_queued) callers were already
    /// waiting for a slot: the call failed at once.
    QueueFull,
    /// The provider said the account has no requests or tokens left until a reset
    /// later than the call's `max_wait`
    /// ([`pace_on_rate_limits`](super::StreamConcurrencyLayer::pace_on_rate_limits)):
    /// the call failed without being sent.
    RateLimited,
}

impl RejectReason {
    /// The value of the metric attribute `reason`: `"deadline_exceeded"`,
    /// `"queue_full"` or `"rate_limited"`.
    ///
    /// ```
    /// use tower_stream_backpressure::RejectReason;
    ///
    /// assert_eq!(RejectReason::DeadlineExceeded.as_str(), "deadline_exceeded");
    /// assert_eq!(RejectReason::QueueFull.as_str(), "queue_full");
    /// ```
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::DeadlineExceeded => "deadline_exceeded",
            RejectReason::QueueFull => "queue_full",
            RejectReason::RateLimited => "rate_limited",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stream's consumer neither read nor dropped its body for the layer's
/// [`idle_timeout`](super::StreamConcurrencyLayer::idle_timeout): the stream was ended
/// for it.
///
/// Returned (boxed in a [`tower::BoxError`]) by the next poll of the
/// [`ResponseBody`](super::ResponseBody), once: by then the upstream body was dropped
/// (closing the upstream stream) and the slot released.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::concurrency::IdleTimeout;
///
/// fn was_stalled_reader(error: &tower::BoxError) -> Option<Duration> {
///     error.downcast_ref::<IdleTimeout>().map(IdleTimeout::timeout)
/// }
/// let error: tower::BoxError = "connection reset".into();
/// assert_eq!(was_stalled_reader(&error), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTimeout {
    timeout: Duration,
}

impl IdleTimeout {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// The `idle_timeout` that passed.
    ///
    /// ```
    /// # use tower_stream_backpressure::concurrency::IdleTimeout;
    /// fn timeout(error: &IdleTimeout) -> std::time::Duration {
    ///     error.timeout()
    /// }
    /// # let _ = timeout;
    /// ```
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the stream was not read for {:?} (idle_timeout): its upstream was closed and its \
             concurrency slot released",
            self.timeout
        )
    }
}

impl std::error::Error for IdleTimeout {}
