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
//! once per call passing through and hands the budget down.
//! [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer), below it in the stack, takes
//! it and withdraws one unit before each retry; when the budget refuses, the call
//! returns its last failure at once. Without a budget, retries are bounded only by
//! `max_attempts`.
//!
//! # Handing the budget down
//!
//! The request's extensions carry the budget across any stack, but the first value put
//! into them costs three allocations (the map, its table, the boxed value): about 900
//! instructions a call, a sixth of what the three layers cost per call in memory
//! before this hand-off. In almost every stack the retry layer's `call` runs inside the
//! budget layer's `call`, on the same thread, before it returns (tower's layers, ours,
//! `Steer`). So the budget layer first offers the budget to a retry layer called
//! within its inner service's `call` (a thread-local list, for the length of that
//! call), and once one has taken it, that service stops writing the extensions.
//! Until then, and for good once an offer was not taken (a `Buffer` between the layers
//! moves the call to another task; a layer may call its inner service later, from its
//! future), the budget also goes into the extensions, where a retry layer finds it
//! wherever it runs. Only a stack that takes one path on some calls and the other on
//! others (a router with a `Buffer` on one route) can have, at a switch, one call's
//! retries bounded by `max_attempts` alone, before the service returns to the
//! extensions for good.
//!
//! With the feature `tower-budget`, `RetryBudget` also implements tower's
//! [`retry::budget::Budget`](https://docs.rs/tower/0.5/tower/retry/budget/trait.Budget.html),
//! so it can serve tower's own retry policies.
//!
//! Unlike the other middleware, [`WithRetryBudget`] has no response future or body of
//! its own: it acts only on the request, so the inner service's pass through.
//!
//! # One deposit per call, however the stack is built
//!
//! The ratio only means something if a deposit is one call: a budget that took two
//! deposits for a call allows twice the retries it was set to, and one that sees every
//! attempt pays for retries with retries. So a budget layer deposits only for a call
//! that has not already deposited in that same budget, and never for a retry:
//!
//! - **The same budget in two layers** (or a clone of it: the budget is compared by
//!   identity, not by settings) takes one deposit; the inner layer finds the budget
//!   already in the request and passes it on.
//! - **Nested layers with different budgets** (say, one per provider inside one for
//!   the whole client) each take one deposit, and a retry needs a unit from **every**
//!   budget the call deposited in: taken from all, or, when one refuses, from none (the
//!   units already taken are given back). A retry is load on every scope the budgets
//!   stand for, so each of them bounds it.
//! - **A budget layer below the retry layer** sees every attempt. The retry layer marks
//!   its retries with [`RetryAttempt`](crate::retry::RetryAttempt); the budget layer
//!   deposits for the first attempt only and hands the budget on, but it cannot bound
//!   retries made above it, so it logs one `WARN` (per layer, not per call) that the
//!   order is wrong. A retrying layer of your own should mark its retries the same way.
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_stream_backpressure::{FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy};
//!
//! let client_wide = RetryBudget::new(Duration::from_secs(10), 10, 0.1);
//! let per_provider = RetryBudget::default();
//! let stack = ServiceBuilder::new()
//!     // Each call deposits in both; each retry takes from both.
//!     .layer(RetryBudgetLayer::new(client_wide.clone()))
//!     .layer(RetryBudgetLayer::new(per_provider.clone()))
//!     .layer(FirstChunkRetryLayer::new(RetryPolicy::default()));
//! # let _ = stack;
//! # Ok::<(), tower_stream_backpressure::ConfigError>(())
//! ```
//!
//! # Metric
//!
//! `stream_retry_budget_available`, read from [`available()`](RetryBudget::available)
//! at each collection. It is registered once per budget and meter, whatever the number
//! of layers, clones, `.provider()` or `.meter()` calls: a budget is one series, with
//! the `provider` of the first layer that registered it (give each provider its own
//! budget to see them apart). Meters are one when they are handles on the same
//! implementation, as the SDK's are for one provider and scope. The callback holds the
//! budget weakly: once every handle on it is gone (a configuration reload builds a new
//! stack and drops the old), the budget's counts are freed and it reports no series.

mod layer;
mod retry_budget;
mod service;

pub use self::layer::RetryBudgetLayer;
pub use self::retry_budget::RetryBudget;
pub(crate) use self::service::Budgets;
pub use self::service::WithRetryBudget;
