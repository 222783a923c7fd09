use std::fmt;

use tower::BoxError;

/// A call failed before its first chunk and was not (or no longer) retried.
///
/// Returned, boxed in a [`tower::BoxError`], by
/// [`FirstChunkRetry`](super::FirstChunkRetry) when the last attempt failed in a way
/// that has no response to return: the upstream connection failed, the body failed or
/// ended, or the first chunk did not come in time or did not fit the buffer, or the
/// stream's framing was broken. (A last attempt that got a retryable status or a
/// transient in-band error returns that response instead.) Every error of the inner
/// service comes back in this shape, of kind [`FirstChunkErrorKind::Upstream`],
/// whether it was retried or not and whatever `max_attempts` is; the last attempt's
/// cause, if any, is the [`source`](std::error::Error::source).
///
/// ```
/// use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind};
///
/// fn stalled(err: &tower::BoxError) -> bool {
///     err.downcast_ref::<FirstChunkError>()
///         .is_some_and(|e| e.kind() == FirstChunkErrorKind::Timeout)
/// }
/// # let _ = stalled;
/// ```
#[derive(Debug)]
pub struct FirstChunkError {
    kind: FirstChunkErrorKind,
    stop: StopReason,
    attempts: u32,
    source: Option<BoxError>,
}

impl FirstChunkError {
    pub(crate) fn new(
        kind: FirstChunkErrorKind,
        stop: StopReason,
        attempts: u32,
        source: Option<BoxError>,
    ) -> Self {
        Self {
            kind,
            stop,
            attempts,
            source,
        }
    }

    /// What went wrong on the last attempt.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// // An upstream that answers `200 OK`, then ends the stream with only a keep-alive.
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from(": keep-alive\n\n")))
    /// });
    /// let client = FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    /// let error = error.downcast_ref::<FirstChunkError>().expect("a first-chunk error");
    /// assert_eq!(error.kind(), FirstChunkErrorKind::EndOfStream);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn kind(&self) -> FirstChunkErrorKind {
        self.kind
    }

    /// Why there was no further attempt.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::{FirstChunkError, StopReason};
    /// use tower_stream_backpressure::{
    ///     FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy,
    /// };
    ///
    /// // An upstream that answers `200 OK`, then ends the stream with only a keep-alive.
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from(": keep-alive\n\n")))
    /// });
    /// // A budget with nothing in it: no reserve, no share of the requests.
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
    /// let client = RetryBudgetLayer::new(budget)
    ///     .layer(FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream));
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    /// let error = error.downcast_ref::<FirstChunkError>().expect("a first-chunk error");
    /// assert_eq!(error.stop_reason(), StopReason::BudgetExhausted);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn stop_reason(&self) -> StopReason {
        self.stop
    }

    /// Attempts made, the first included.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::FirstChunkError;
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// // An upstream that answers `200 OK`, then ends the stream with only a keep-alive.
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from(": keep-alive\n\n")))
    /// });
    /// let policy = RetryPolicy::default().max_attempts(4);
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    /// let error = error.downcast_ref::<FirstChunkError>().expect("a first-chunk error");
    /// assert_eq!(error.attempts(), 4);
    /// assert_eq!(
    ///     error.to_string(),
    ///     "the response body ended before the first chunk, after 4 attempts (attempts exhausted)"
    /// );
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Display for FirstChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            FirstChunkErrorKind::Upstream => "the upstream call failed",
            FirstChunkErrorKind::Body => "the response body failed",
            FirstChunkErrorKind::EndOfStream => "the response body ended",
            FirstChunkErrorKind::Timeout => "the first-chunk timeout passed",
            FirstChunkErrorKind::BufferLimit => "the buffer limit was reached",
            FirstChunkErrorKind::Malformed => "the stream's framing was broken",
        };
        let stop = match self.stop {
            StopReason::AttemptsExhausted => "attempts exhausted",
            StopReason::BudgetExhausted => "retry budget exhausted",
            StopReason::NotRetryable => "not retryable",
            StopReason::NotReady => "the service was not ready for a retry",
            StopReason::MaybeProcessed => "the upstream may have processed the request",
        };
        let plural = if self.attempts == 1 { "" } else { "s" };
        // The cause is the `source`, not repeated here: error reporters print both.
        write!(
            f,
            "{what} before the first chunk, after {} attempt{plural} ({stop})",
            self.attempts
        )
    }
}

impl std::error::Error for FirstChunkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// What went wrong before the first chunk, on the last attempt.
///
/// ```
/// use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind};
///
/// /// The status code a gateway answers its own caller with.
/// fn gateway_status(error: &tower::BoxError) -> u16 {
///     match error.downcast_ref::<FirstChunkError>().map(FirstChunkError::kind) {
///         Some(FirstChunkErrorKind::Timeout) => 504,
///         Some(FirstChunkErrorKind::BufferLimit | FirstChunkErrorKind::Malformed) => 502,
///         Some(_) => 503,
///         None => 500,
///     }
/// }
///
/// let error: tower::BoxError = "not a first-chunk error".into();
/// assert_eq!(gateway_status(&error), 500);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FirstChunkErrorKind {
    /// The inner service failed: the [`source`](std::error::Error::source) is its
    /// error, whether it was retried (a transient one: a connect failure, a reset) or
    /// not ([`StopReason::NotRetryable`]).
    Upstream,
    /// The response body returned an error.
    Body,
    /// The response body ended (or sent trailers) without a first chunk.
    EndOfStream,
    /// No first chunk within `first_chunk_timeout` (a stall).
    Timeout,
    /// The bytes before the first chunk exceeded `max_buffer`. Never retried.
    BufferLimit,
    /// The stream's framing was broken before the first chunk (a bad eventstream CRC,
    /// `[]` for a JSON array stream). Never retried; the
    /// [`source`](std::error::Error::source) is a [`Malformed`](crate::frame::Malformed)
    /// naming the problem.
    Malformed,
}

/// Why a failed call was not tried again.
///
/// ```
/// use tower_stream_backpressure::retry::{FirstChunkError, StopReason};
///
/// /// Whether a client should tell its user to come back later.
/// fn try_later(error: &tower::BoxError) -> bool {
///     matches!(
///         error.downcast_ref::<FirstChunkError>().map(FirstChunkError::stop_reason),
///         Some(StopReason::BudgetExhausted | StopReason::AttemptsExhausted)
///     )
/// }
///
/// assert!(!try_later(&"connection refused".into()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// `max_attempts` were made.
    AttemptsExhausted,
    /// The retry budget refused another attempt.
    BudgetExhausted,
    /// The failure is of a kind that a retry would only repeat.
    NotRetryable,
    /// The inner service failed in `poll_ready` before the next attempt, which never
    /// started: the failure that called for it is returned (the error is logged).
    NotReady,
    /// The upstream may have processed the request, and the policy retries only
    /// failures where it did not
    /// ([`retry_maybe_processed(false)`](super::RetryPolicy::retry_maybe_processed)).
    MaybeProcessed,
}

/// A response extension: the retry layer gave up on the call and hands its last
/// failure back as a response, not as an error. That is a response with a retryable
/// status (`503`, `429`, ...), or a `2xx` whose first chunk is a transient in-band error
/// (Anthropic's `overloaded_error` after `200 OK`), once no attempt is left or the
/// budget refused one.
///
/// The caller gets the upstream's bytes as they came; this says that they are a
/// failure, for a layer above that decides on responses, such as
/// [`Fallback`](crate::fallback::Fallback), which moves such a call to its next target.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::retry::{GaveUp, StopReason};
/// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
///
/// let upstream = service_fn(|_: http::Request<()>| async {
///     http::Response::builder().status(503).body(Full::new(Bytes::from("busy")))
/// });
/// let client = FirstChunkRetryLayer::new(RetryPolicy::default().max_attempts(2))
///     .layer(upstream);
/// # tokio::runtime::Builder::new_current_thread()
/// #     .enable_all()
/// #     .start_paused(true)
/// #     .build()?
/// #     .block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// let gave_up = response.extensions().get::<GaveUp>().expect("the last failure");
/// assert_eq!(gave_up.stop_reason(), StopReason::AttemptsExhausted);
/// assert_eq!(gave_up.attempts(), 2);
/// assert!(!gave_up.is_in_band_error());
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveUp {
    stop: StopReason,
    attempts: u32,
    in_band: bool,
}

impl GaveUp {
    pub(super) fn new(stop: StopReason, attempts: u32, in_band: bool) -> Self {
        Self {
            stop,
            attempts,
            in_band,
        }
    }

    /// Why there was no further attempt.
    pub fn stop_reason(&self) -> StopReason {
        self.stop
    }

    /// Attempts made, the first included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the failure is a transient in-band error in the first chunk of a `2xx`
    /// (else it is a retryable status).
    pub fn is_in_band_error(&self) -> bool {
        self.in_band
    }
}
