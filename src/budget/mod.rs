//! A retry budget shared across calls: thundering-herd control.
//!
//! # Why
//!
//! Per-call retries multiply load exactly when the upstream can least take it: when
//! every call fails, `max_attempts = 3` turns each call into three. A budget caps
//! retries to a share of the traffic over a recent window, so that during an outage
//! the upstream sees little more than the original requests, while isolated failures
//! in healthy traffic are still retried.
//!
//! # How
//!
//! [`RetryBudget`] holds the counts; clones share them. [`RetryBudgetLayer`] deposits
//! once per request passing through and puts the budget handle into the request's
//! extensions. [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer), below it in the
//! stack, finds the handle and withdraws one unit before each retry; when the budget
//! refuses, the call returns its last failure at once. Without a handle, retries are
//! bounded only by `max_attempts`.
//!
//! `RetryBudget` also implements [`tower::retry::budget::Budget`], so it can serve
//! tower's own retry policies.
//!
//! Unlike the other middleware, [`WithRetryBudget`] has no response future or body of
//! its own: it acts only on the request, so the inner service's pass through.
//!
//! Metric: `stream_retry_budget_available`, read from
//! [`available()`](RetryBudget::available) at each collection.

mod layer;
mod retry_budget;
mod service;

pub use self::layer::RetryBudgetLayer;
pub use self::retry_budget::RetryBudget;
pub(crate) use self::service::Budgets;
pub use self::service::WithRetryBudget;
