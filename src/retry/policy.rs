use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use super::{Hedge, InBandErrors};
use crate::ConfigError;

type Classifier = Arc<dyn Fn(&(dyn Error + 'static)) -> bool + Send + Sync>;

/// A request extension: this request's body cannot be sent again, so the request gets
/// one attempt, whatever the policy.
///
/// [`BufferRequestBodyLayer`](crate::BufferRequestBodyLayer) puts it on a request whose
/// body was larger than its cap and so streams through unbuffered. Put it on a request
/// yourself to send it once.
///
/// ```
/// use tower_stream_backpressure::retry::NotReplayable;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(NotReplayable);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotReplayable;

/// When and how [`FirstChunkRetry`](super::FirstChunkRetry) retries.
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`max_attempts`](Self::max_attempts) | 3 | attempts in all, the first included; 1 disables retry |
/// | [`backoff`](Self::backoff) | 250 ms, 2 s | full jitter: a retry waits `U(0, min(max, initial * 2^n))` |
/// | [`first_chunk_timeout`](Self::first_chunk_timeout) | 30 s | per attempt, from its start to its first chunk |
/// | [`max_retry_after`](Self::max_retry_after) | 30 s | a longer server hint is not waited for: the response goes back |
/// | [`max_buffer`](Self::max_buffer) | 1 MiB | memory held while looking for the first chunk (bytes, plus ~100 bytes per frame) |
/// | [`retry_statuses`](Self::retry_statuses) | 408, 429, 502, 503, 504, 529 | statuses retried |
/// | [`classify_errors`](Self::classify_errors) | [`is_transient`](super::is_transient) | inner errors retried |
/// | [`in_band_errors`](Self::in_band_errors) | [`InBandErrors::default`] | which error in the first chunk of a `2xx` is retried |
/// | [`retry_maybe_processed`](Self::retry_maybe_processed) | `true` | also retry failures after which the upstream may have processed the request |
/// | [`hedge`](Self::hedge) | off | another attempt beside a slow one, before the first chunk |
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .max_attempts(4)
///     .backoff(Duration::from_millis(100), Duration::from_secs(1))
///     .first_chunk_timeout(Duration::from_secs(10));
/// assert!(policy.validate().is_ok());
/// ```
#[derive(Clone)]
#[must_use = "settings do nothing until a layer uses them"]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    first_chunk_timeout: Duration,
    max_retry_after: Duration,
    max_buffer: usize,
    statuses: Arc<[StatusCode]>,
    classify: Classifier,
    in_band: InBandErrors,
    retry_maybe_processed: bool,
    hedge: Option<Hedge>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(2),
            first_chunk_timeout: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(30),
            max_buffer: 1024 * 1024,
            statuses: [408, 429, 502, 503, 504, 529]
                .into_iter()
                .filter_map(|code| StatusCode::from_u16(code).ok())
                .collect(),
            classify: Arc::new(super::is_transient),
            in_band: InBandErrors::default(),
            retry_maybe_processed: true,
            hedge: None,
        }
    }
}

impl RetryPolicy {
    /// Attempts in all, the first included (default 3). 1 disables retry; 0 is invalid.
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
    ///         // Always overloaded.
    ///         calls.fetch_add(1, Ordering::SeqCst);
    ///         let response = http::Response::builder().status(503);
    ///         async move { response.body(Full::new(Bytes::from("data"))) }
    ///     })
    /// };
    /// let policy = RetryPolicy::default().max_attempts(2);
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let response = client.oneshot(http::Request::new(())).await?;
    /// // Out of attempts, the last retryable response goes back as it is.
    /// assert_eq!(response.status(), 503);
    /// assert_eq!(calls.load(Ordering::SeqCst), 2);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn max_attempts(self, max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..self
        }
    }

    /// Exponential backoff with full jitter: retry `n` (from 0) waits a uniformly random
    /// time in `[0, min(max, initial * 2^n)]` (default 250 ms and 2 s). `initial` must
    /// not exceed `max`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// let policy =
    ///     RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(5));
    /// assert!(policy.validate().is_ok());
    ///
    /// let upside_down =
    ///     RetryPolicy::default().backoff(Duration::from_secs(5), Duration::from_secs(1));
    /// assert_eq!(upside_down.validate().unwrap_err().setting(), "backoff");
    /// ```
    pub fn backoff(self, initial: Duration, max: Duration) -> Self {
        Self {
            initial_backoff: initial,
            max_backoff: max,
            ..self
        }
    }

    /// How long one attempt may take, from its start to its first chunk, before it
    /// counts as stalled and is retried (default 30 s). Must be above zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// // An upstream that never answers.
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     std::future::pending::<()>().await;
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// });
    /// let policy = RetryPolicy::default()
    ///     .max_attempts(1)
    ///     .first_chunk_timeout(Duration::from_secs(5));
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let started = tokio::time::Instant::now();
    /// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    /// let error = error.downcast_ref::<FirstChunkError>().expect("a first-chunk error");
    /// assert_eq!(error.kind(), FirstChunkErrorKind::Timeout);
    /// assert_eq!(started.elapsed(), Duration::from_secs(5));
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn first_chunk_timeout(self, timeout: Duration) -> Self {
        Self {
            first_chunk_timeout: timeout,
            ..self
        }
    }

    /// The longest server hint (`retry-after-ms`, `Retry-After`) waited for (default
    /// 30 s). A response asking for longer is not retried: it goes back to the caller.
    ///
    /// ```
    /// use std::time::Duration;
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
    ///         // Rate limited, come back in two minutes.
    ///         calls.fetch_add(1, Ordering::SeqCst);
    ///         let response = http::Response::builder().status(429).header("retry-after", "120");
    ///         async move { response.body(Full::new(Bytes::from("data"))) }
    ///     })
    /// };
    /// let policy = RetryPolicy::default().max_retry_after(Duration::from_secs(30));
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let response = client.oneshot(http::Request::new(())).await?;
    /// // Not worth the wait: the `429` goes back at once, for the caller to decide.
    /// assert_eq!(response.status(), 429);
    /// assert_eq!(calls.load(Ordering::SeqCst), 1);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn max_retry_after(self, max: Duration) -> Self {
        Self {
            max_retry_after: max,
            ..self
        }
    }

    /// How much memory the body may hold while looking for the first chunk (default
    /// 1 MiB): the bytes of each frame read, plus about 100 bytes of bookkeeping per
    /// frame, so that an upstream sending tiny frames cannot hold more. Empty frames are
    /// not held. A first chunk that does not fit fails the call without retry: the
    /// upstream would send the same again. Must be above zero.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// // Nearly 2 KiB of SSE keep-alives, and no event yet.
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     let body = b": keep-alive\n\n".repeat(128);
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from(body)))
    /// });
    /// let policy = RetryPolicy::default().max_buffer(1024);
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    /// let error = error.downcast_ref::<FirstChunkError>().expect("a first-chunk error");
    /// assert_eq!(error.kind(), FirstChunkErrorKind::BufferLimit);
    /// assert_eq!(error.attempts(), 1, "never retried");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn max_buffer(self, bytes: usize) -> Self {
        Self {
            max_buffer: bytes,
            ..self
        }
    }

    /// The response statuses that are retried (default 408, 429, 502, 503, 504, 529).
    /// An `x-should-retry: true` or `false` response header overrides this per response.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use http::StatusCode;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let upstream = {
    ///     let calls = calls.clone();
    ///     service_fn(move |_: http::Request<()>| {
    ///         // This upstream reports overload as `500`, once.
    ///         let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 { 500 } else { 200 };
    ///         let response = http::Response::builder().status(status);
    ///         async move { response.body(Full::new(Bytes::from("data"))) }
    ///     })
    /// };
    /// let policy = RetryPolicy::default()
    ///     .retry_statuses([StatusCode::INTERNAL_SERVER_ERROR, StatusCode::SERVICE_UNAVAILABLE]);
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
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
    pub fn retry_statuses(self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        Self {
            statuses: statuses.into_iter().collect(),
            ..self
        }
    }

    /// Which inner-service errors are transient and retried (default
    /// [`is_transient`](super::is_transient)). Errors it rejects go back at once, as
    /// the source of a [`FirstChunkError`](super::FirstChunkError) that says
    /// [`NotRetryable`](super::StopReason::NotRetryable).
    ///
    /// ```
    /// use std::io;
    /// use tower_stream_backpressure::{retry::is_transient, RetryPolicy};
    ///
    /// // Also retry an I/O timeout.
    /// let policy = RetryPolicy::default().classify_errors(|error| {
    ///     is_transient(error)
    ///         || error
    ///             .downcast_ref::<io::Error>()
    ///             .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
    /// });
    /// # let _ = policy;
    /// ```
    pub fn classify_errors<F>(self, is_transient: F) -> Self
    where
        F: Fn(&(dyn Error + 'static)) -> bool + Send + Sync + 'static,
    {
        Self {
            classify: Arc::new(is_transient),
            ..self
        }
    }

    /// How an error that arrives as the first chunk of a `2xx` response is handled
    /// (default [`InBandErrors::default`]): a transient one is retried like a failure
    /// before the first chunk, a terminal one goes to the caller untouched.
    ///
    /// ```
    /// use tower_stream_backpressure::retry::InBandErrors;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// let policy = RetryPolicy::default()
    ///     .in_band_errors(InBandErrors::default().transient("model_loading"));
    /// # let _ = policy;
    /// ```
    pub fn in_band_errors(self, rules: InBandErrors) -> Self {
        Self {
            in_band: rules,
            ..self
        }
    }

    /// Whether a failure after which the upstream may have processed the request is
    /// retried (default `true`).
    ///
    /// Failures before the first chunk fall in two classes:
    ///
    /// - **Not processed**: the upstream did no work. A connect failure (nothing was
    ///   sent), an HTTP/2 `REFUSED_STREAM`, a GOAWAY whose last stream id is below
    ///   ours, a request cancelled before it was sent (see
    ///   [`is_unprocessed`](super::is_unprocessed)); and a status by which the server
    ///   refuses the work: `408`, `425`, `429`, `503`, `529`, or any status with
    ///   `x-should-retry: true`, the server's own word that a retry is safe.
    /// - **Maybe processed**: the request reached the upstream, which may have acted on
    ///   it. A reset or an end of the connection after the request was written, an
    ///   HTTP/2 `INTERNAL_ERROR` or `CANCEL`, a stall (`first_chunk_timeout`), a body
    ///   that fails or ends before its first chunk, an in-band error (the upstream
    ///   accepted the request and began its response), and any other retried status
    ///   (`502` and `504` say a server behind the gateway failed or timed out, maybe
    ///   midway).
    ///
    /// Both are retried by default: an LLM completion cut off before its first token
    /// loses nothing but the prompt's cost. `false` retries only the first class, for
    /// calls whose side effects must not repeat; a failure of the second goes back at
    /// once, as it would after the last attempt, with
    /// [`StopReason::MaybeProcessed`](super::StopReason::MaybeProcessed). Any value is
    /// valid.
    ///
    /// ```
    /// use std::io;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, BoxError, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::{FirstChunkError, StopReason};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let upstream = {
    ///     let calls = calls.clone();
    ///     service_fn(move |_: http::Request<()>| {
    ///         // The connection resets after the request was written.
    ///         calls.fetch_add(1, Ordering::SeqCst);
    ///         async move {
    ///             let reset = io::Error::from(io::ErrorKind::ConnectionReset);
    ///             Err::<http::Response<Full<Bytes>>, BoxError>(reset.into())
    ///         }
    ///     })
    /// };
    /// let policy = RetryPolicy::default().retry_maybe_processed(false);
    /// assert!(!policy.get_retry_maybe_processed());
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    /// let error = error.downcast_ref::<FirstChunkError>().expect("a first-chunk error");
    /// assert_eq!(error.stop_reason(), StopReason::MaybeProcessed);
    /// assert_eq!(calls.load(Ordering::SeqCst), 1, "not sent again");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn retry_maybe_processed(self, retry: bool) -> Self {
        Self {
            retry_maybe_processed: retry,
            ..self
        }
    }

    /// Hedges calls (off by default): when an attempt has produced no first chunk after
    /// the [`Hedge`]'s delay, another starts beside it, and the first of them to produce
    /// its first chunk wins. The others are dropped at once (their HTTP/2 stream reset,
    /// or their HTTP/1.1 connection closed), so that the upstream stops generating.
    ///
    /// A hedge is an attempt like a retry: it counts against `max_attempts` (so at most
    /// `max_attempts - 1` hedges start, whatever [`Hedge::max_extra`] says), carries
    /// [`RetryAttempt`](super::RetryAttempt), and withdraws a unit from the retry budget;
    /// a budget that refuses stops hedging the call, so an overloaded upstream is not
    /// sent more work. An attempt that fails while another runs does not end the call:
    /// the next starts after the backoff or the server's hint, as a retry would. Each
    /// attempt counts in `provider_calls_in_flight`; a concurrency slot above stays one
    /// per call, so a hedge briefly holds a second upstream stream on it. A hedge sends
    /// the request while the first attempt may be processing it: it cannot go with
    /// [`retry_maybe_processed(false)`](Self::retry_maybe_processed), and
    /// [`validate`](Self::validate) says so.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full, StreamBody};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::Hedge;
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let upstream = {
    ///     let calls = calls.clone();
    ///     service_fn(move |_: http::Request<Full<Bytes>>| {
    ///         // The first attempt stalls for a minute before its first token.
    ///         let stall = if calls.fetch_add(1, Ordering::SeqCst) == 0 { 60 } else { 0 };
    ///         async move {
    ///             tokio::time::sleep(Duration::from_secs(stall)).await;
    ///             http::Response::builder()
    ///                 .header("content-type", "text/event-stream")
    ///                 .body(Full::new(Bytes::from("data: hello\n\n")))
    ///         }
    ///     })
    /// };
    /// let policy = RetryPolicy::default().hedge(Hedge::after(Duration::from_secs(1)));
    /// let client = FirstChunkRetryLayer::new(policy).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let started = tokio::time::Instant::now();
    /// let response = client.oneshot(http::Request::new(Full::default())).await?;
    /// // The hedge, started after a second, answered; the stalled attempt was dropped.
    /// assert!(started.elapsed() < Duration::from_secs(2));
    /// assert_eq!(calls.load(Ordering::SeqCst), 2);
    /// let body = response.into_body().collect().await?.to_bytes();
    /// assert_eq!(body, "data: hello\n\n");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn hedge(self, hedge: Hedge) -> Self {
        Self {
            hedge: Some(hedge),
            ..self
        }
    }

    /// The [`hedge`](Self::hedge) in force, if any.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::retry::Hedge;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// assert_eq!(RetryPolicy::default().get_hedge(), None);
    /// let hedge = Hedge::after(Duration::from_secs(1));
    /// assert_eq!(RetryPolicy::default().hedge(hedge.clone()).get_hedge(), Some(&hedge));
    /// ```
    pub fn get_hedge(&self) -> Option<&Hedge> {
        self.hedge.as_ref()
    }

    /// Whether failures after which the upstream may have processed the request are
    /// retried: see [`retry_maybe_processed`](Self::retry_maybe_processed).
    ///
    /// ```
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// assert!(RetryPolicy::default().get_retry_maybe_processed());
    /// assert!(!RetryPolicy::default().retry_maybe_processed(false).get_retry_maybe_processed());
    /// ```
    pub fn get_retry_maybe_processed(&self) -> bool {
        self.retry_maybe_processed
    }

    /// Checks every setting; the error names the one out of range.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// assert!(RetryPolicy::default().validate().is_ok());
    /// let policy = RetryPolicy::default().first_chunk_timeout(Duration::ZERO);
    /// assert_eq!(policy.validate().unwrap_err().setting(), "first_chunk_timeout");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "max_attempts",
                "must be at least 1 (1 disables retry)",
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(ConfigError::new(
                "backoff",
                format!(
                    "initial ({:?}) must not exceed max ({:?})",
                    self.initial_backoff, self.max_backoff
                ),
            ));
        }
        if self.first_chunk_timeout.is_zero() {
            return Err(ConfigError::new(
                "first_chunk_timeout",
                "must be above zero",
            ));
        }
        if self.max_buffer == 0 {
            return Err(ConfigError::new("max_buffer", "must be above zero"));
        }
        if let Some(hedge) = &self.hedge {
            hedge.validate()?;
            if !self.retry_maybe_processed {
                return Err(ConfigError::new(
                    "hedge",
                    "cannot go with retry_maybe_processed(false): a hedge sends the \
                     request again while the upstream may be processing it",
                ));
            }
        }
        Ok(())
    }

    /// The [`max_attempts`](Self::max_attempts) in force.
    ///
    /// Each setting has a getter named `get_` and the setting (as
    /// `std::process::Command` has), since the setting's own name is its builder.
    ///
    /// ```
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// assert_eq!(RetryPolicy::default().get_max_attempts(), 3);
    /// ```
    pub fn get_max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The [`backoff`](Self::backoff) in force: `(initial, max)`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// let (initial, max) = RetryPolicy::default().get_backoff();
    /// assert_eq!((initial, max), (Duration::from_millis(250), Duration::from_secs(2)));
    /// ```
    pub fn get_backoff(&self) -> (Duration, Duration) {
        (self.initial_backoff, self.max_backoff)
    }

    /// The [`first_chunk_timeout`](Self::first_chunk_timeout) in force.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// assert_eq!(RetryPolicy::default().get_first_chunk_timeout(), Duration::from_secs(30));
    /// ```
    pub fn get_first_chunk_timeout(&self) -> Duration {
        self.first_chunk_timeout
    }

    /// The [`max_retry_after`](Self::max_retry_after) in force.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// assert_eq!(RetryPolicy::default().get_max_retry_after(), Duration::from_secs(30));
    /// ```
    pub fn get_max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// The [`max_buffer`](Self::max_buffer) in force, in bytes.
    ///
    /// ```
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// assert_eq!(RetryPolicy::default().get_max_buffer(), 1024 * 1024);
    /// ```
    pub fn get_max_buffer(&self) -> usize {
        self.max_buffer
    }

    /// The [`retry_statuses`](Self::retry_statuses) in force.
    ///
    /// ```
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// let statuses = RetryPolicy::default().retry_statuses([http::StatusCode::SERVICE_UNAVAILABLE]);
    /// assert_eq!(statuses.get_retry_statuses(), [http::StatusCode::SERVICE_UNAVAILABLE]);
    /// ```
    pub fn get_retry_statuses(&self) -> &[StatusCode] {
        &self.statuses
    }

    /// The [`in_band_errors`](Self::in_band_errors) in force. (The error classifier,
    /// [`classify_errors`](Self::classify_errors), is a function and has no getter.)
    ///
    /// ```
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    /// use tower_stream_backpressure::frame::Chunk;
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// let policy = RetryPolicy::default().in_band_errors(InBandErrors::none());
    /// let chunk = Chunk::new(br#"{"error": {"type": "overloaded_error"}}"#);
    /// assert_eq!(policy.get_in_band_errors().classify(&chunk), InBand::Content);
    /// ```
    pub fn get_in_band_errors(&self) -> &InBandErrors {
        &self.in_band
    }

    pub(crate) fn retries_status(&self, status: StatusCode) -> bool {
        self.statuses.contains(&status)
    }

    pub(crate) fn is_transient(&self, error: &(dyn Error + 'static)) -> bool {
        (self.classify)(error)
    }

    /// The wait before retry number `retry` (0 for the first retry).
    pub(crate) fn backoff_delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << retry.min(31))
            .min(self.max_backoff);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("first_chunk_timeout", &self.first_chunk_timeout)
            .field("max_retry_after", &self.max_retry_after)
            .field("max_buffer", &self.max_buffer)
            .field("retry_statuses", &self.statuses)
            .field("in_band_errors", &self.in_band)
            .field("retry_maybe_processed", &self.retry_maybe_processed)
            .field("hedge", &self.hedge)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.initial_backoff, Duration::from_millis(250));
        assert_eq!(p.max_backoff, Duration::from_secs(2));
        assert_eq!(p.first_chunk_timeout, Duration::from_secs(30));
        assert_eq!(p.max_retry_after, Duration::from_secs(30));
        assert_eq!(p.max_buffer, 1 << 20);
        let codes: Vec<u16> = p.statuses.iter().map(|s| s.as_u16()).collect();
        assert_eq!(codes, [408, 429, 502, 503, 504, 529]);
        assert!(p.retry_maybe_processed);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling() {
        let p =
            RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_millis(500));
        for (retry, ceiling) in [(0, 100), (1, 200), (2, 400), (3, 500), (40, 500)] {
            let delays: Vec<Duration> = (0..2000).map(|_| p.backoff_delay(retry)).collect();
            let max = delays.iter().max().unwrap();
            let min = delays.iter().min().unwrap();
            assert!(
                *max <= Duration::from_millis(ceiling),
                "retry {retry}: {max:?}"
            );
            // Full jitter spreads over the whole range, not just near the ceiling.
            assert!(
                *min < Duration::from_millis(ceiling / 10),
                "retry {retry}: {min:?}"
            );
            assert!(
                *max > Duration::from_millis(ceiling * 9 / 10),
                "retry {retry}: {max:?}"
            );
        }
    }

    #[test]
    fn huge_backoff_settings_do_not_overflow() {
        let p = RetryPolicy::default().backoff(Duration::MAX, Duration::MAX);
        let _ = p.backoff_delay(31);
        let p = RetryPolicy::default().backoff(Duration::ZERO, Duration::ZERO);
        assert_eq!(p.backoff_delay(5), Duration::ZERO);
    }

    #[test]
    fn invalid_settings_are_named() {
        let cases = [
            (RetryPolicy::default().max_attempts(0), "max_attempts"),
            (
                RetryPolicy::default().backoff(Duration::from_secs(3), Duration::from_secs(1)),
                "backoff",
            ),
            (
                RetryPolicy::default().first_chunk_timeout(Duration::ZERO),
                "first_chunk_timeout",
            ),
            (RetryPolicy::default().max_buffer(0), "max_buffer"),
        ];
        for (policy, setting) in cases {
            assert_eq!(policy.validate().unwrap_err().setting(), setting);
        }
    }
}
