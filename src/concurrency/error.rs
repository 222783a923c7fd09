use std::fmt;
use std::time::Duration;

/// A call got no concurrency slot.
///
/// Returned (boxed in a [`tower::BoxError`]) by
/// [`StreamConcurrency`](super::StreamConcurrency) when every slot is held and none came
/// free within the call's `max_wait`. Downcast it to tell back-pressure from an upstream
/// failure:
///
/// ```
/// use tower_stream_backpressure::{RejectReason, Rejected};
///
/// fn is_backpressure(err: &tower::BoxError) -> bool {
///     matches!(
///         err.downcast_ref::<Rejected>().map(Rejected::reason),
///         Some(RejectReason::DeadlineExceeded)
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

    /// Why the call was rejected.
    pub fn reason(&self) -> RejectReason {
        self.reason
    }

    /// The limit that was reached.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How long the call waited for a slot before giving up.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stream concurrency limit of {} reached: no slot came free within {:?} ({})",
            self.limit,
            self.waited,
            self.reason.as_str()
        )
    }
}

impl std::error::Error for Rejected {}

/// Why a call got no concurrency slot.
///
/// The metric `stream_concurrency_rejections_total` also counts `context_canceled`: a
/// caller that dropped its call while waiting. No caller sees that one as an error,
/// since the caller is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The call's `max_wait` passed before a slot came free (at once when `max_wait` is
    /// zero).
    DeadlineExceeded,
}

impl RejectReason {
    /// The value of the metric attribute `reason`: `"deadline_exceeded"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
