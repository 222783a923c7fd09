use std::fmt;

use tower::BoxError;

/// A call failed before its first chunk and was not (or no longer) retried.
///
/// Returned, boxed in a [`tower::BoxError`], by
/// [`FirstChunkRetry`](super::FirstChunkRetry) when the last attempt failed in a way
/// that has no response to return: the upstream connection failed, the body failed or
/// ended, or the first chunk did not come in time or did not fit the buffer, or the
/// stream's framing was broken. (A last attempt that got a retryable status or a
/// transient in-band error returns that response instead, and an inner error that is
/// not transient comes back unchanged.) The last attempt's cause, if
/// any, is the [`source`](std::error::Error::source).
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
    pub fn kind(&self) -> FirstChunkErrorKind {
        self.kind
    }

    /// Why there was no further attempt.
    pub fn stop_reason(&self) -> StopReason {
        self.stop
    }

    /// Attempts made, the first included.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FirstChunkErrorKind {
    /// The inner service failed with a transient error (a connect failure, a reset).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// `max_attempts` were made.
    AttemptsExhausted,
    /// The retry budget refused another attempt.
    BudgetExhausted,
    /// The failure is of a kind that a retry would only repeat.
    NotRetryable,
}
