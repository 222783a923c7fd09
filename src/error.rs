//! The error returned when a setting is out of range.
//!
//! The errors the layers return at run time live with their layer:
//! [`Rejected`](crate::concurrency::Rejected) for the concurrency limit and
//! [`FirstChunkError`](crate::retry::FirstChunkError) for the retry layer. All of them
//! reach the caller boxed as a [`tower::BoxError`] and can be downcast back.

use std::fmt;

/// A setting passed to a constructor is out of range.
///
/// Returned by the fallible constructors ([`StreamConcurrencyLayer::try_new`],
/// [`RetryBudget::try_new`], [`FirstChunkRetryLayer::try_new`], ...). The crate's one
/// rule: `new` (and a builder method such as `max_per_host`) panics with this message,
/// and its `try_` twin returns it. [`setting`](Self::setting) names the parameter so that a
/// configuration loader can point at the offending field.
///
/// ```
/// use tower_stream_backpressure::StreamConcurrencyLayer;
///
/// let err = StreamConcurrencyLayer::try_new(0).unwrap_err();
/// assert_eq!(err.setting(), "limit");
/// assert!(err.to_string().contains("limit"));
/// ```
///
/// [`StreamConcurrencyLayer::try_new`]: crate::StreamConcurrencyLayer::try_new
/// [`RetryBudget::try_new`]: crate::RetryBudget::try_new
/// [`FirstChunkRetryLayer::try_new`]: crate::FirstChunkRetryLayer::try_new
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    setting: &'static str,
    problem: String,
}

impl ConfigError {
    pub(crate) fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }

    /// The name of the parameter that is out of range, e.g. `"retry_ratio"`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::{RetryBudget, RetryPolicy};
    ///
    /// let error = RetryBudget::try_new(Duration::from_secs(10), 10, 2000.0).unwrap_err();
    /// assert_eq!(error.setting(), "retry_ratio");
    ///
    /// let error = RetryPolicy::default().max_attempts(0).validate().unwrap_err();
    /// assert_eq!(error.setting(), "max_attempts");
    /// ```
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.setting, self.problem)
    }
}

impl std::error::Error for ConfigError {}
