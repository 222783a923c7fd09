//! Tower middleware that puts back-pressure on streaming HTTP calls.
//!
//! Clients holding thousands of concurrent streams (LLM token streams over SSE,
//! NDJSON, ...) need three things tower does not give them:
//!
//! - [`StreamConcurrencyLayer`]: a concurrency limit that holds until the *stream*
//!   ends, not until the response headers arrive. Callers choose between queueing and
//!   failing fast; rejections say why. The limit is fixed, or
//!   [adaptive](StreamConcurrencyLayer::adaptive) to the upstream's capacity from its
//!   first chunks and overload signals, and [holds calls](StreamConcurrencyLayer::pace_on_rate_limits)
//!   while the provider says the account's rate limit is spent.
//! - [`FirstChunkRetryLayer`]: retry a call that fails before its first chunk, and
//!   never once a chunk reached the caller. "First chunk" is format-aware
//!   ([`frame`]), keep-alives do not count, and a stall before it has a timeout.
//!   [Hedged attempts](RetryPolicy::hedge) cut the time-to-first-token tail.
//! - [`RetryBudgetLayer`]: a retry budget across calls, so that an upstream outage
//!   does not turn every call into `max_attempts` calls.
//!
//! Around them:
//!
//! - [`BufferRequestBodyLayer`] ([`replay`]): a proxy's request bodies, which can be
//!   read once, made replayable up to a cap, so that they can be retried.
//! - `ConnectionGaugeLayer` (`connection`, feature `connection-gauge`): for hyper-util
//!   connectors, an exact count of open connections and an optional cap per host.
//! - `config` (feature `serde`): the whole stack from a configuration file.
//! - `load` (feature `load`): `CompleteOnEndOfStream`, for `tower::balance` to count a
//!   stream's load until the stream ends, not until its headers.
//! - [`fallback`]: [`Fallback`](fallback::Fallback) sends a call on to the next provider
//!   when one fails before its first chunk, refuses it, or is full, and never once a
//!   chunk reached the caller; a provider that keeps failing cools down.
//!
//! All of them record OpenTelemetry [`metrics`] and emit `tracing` events.
//!
//! # Features
//!
//! The three layers and their metrics need none of hyper, hyper-util, `h2` or tokio's
//! networking: with default features off the crate builds from about twenty crates.
//!
//! | feature | default | what it adds | what it pulls |
//! |---|---|---|---|
//! | `hyper-errors` | on | [`retry::is_transient`] and [`retry::is_unprocessed`] read hyper's, h2's and hyper-util's error reasons: a refused stream, a GOAWAY, a connect failure, a cancelled request. Off, only `io::Error` kinds are read | hyper, h2, hyper-util |
//! | `connection-gauge` | off | `ConnectionGaugeLayer`: a hyper-util connector's open connections, capped per host | hyper, hyper-util |
//! | `serde` | off | `config`: the whole stack from a configuration file | serde, serde_path_to_error, humantime, tower-http, tower's `util` |
//! | `tower-budget` | off | [`RetryBudget`] implements tower's `retry::budget::Budget`, for tower's own `Retry` | tower's `retry` (futures-util) |
//! | `load` | off | `load::CompleteOnEndOfStream`: `tower::balance` (`PendingRequests`, `PeakEwma`) counts a stream until its end | tower's `load` |
//!
//! The in-band error check reads the few JSON fields it needs without a JSON library,
//! so it needs no feature.
//!
//! # Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_stream_backpressure::{
//!     FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy,
//!     StreamConcurrencyLayer,
//! };
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let hyper_util_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//!
//! let budget = RetryBudget::default(); // shared by every call below
//! let client = ServiceBuilder::new()
//!     .layer(StreamConcurrencyLayer::new(100).max_wait(Duration::from_secs(2)).provider("openai"))
//!     .layer(RetryBudgetLayer::new(budget.clone()).provider("openai"))
//!     .layer(FirstChunkRetryLayer::new(RetryPolicy::default()).provider("openai"))
//!     .service(hyper_util_client);
//!
//! let request = http::Request::post("http://127.0.0.1:8080/v1/chat/completions")
//!     .body(Full::new(Bytes::from(r#"{"stream":true}"#)))?;
//! let response = client.oneshot(request).await?;
//! // The first event has arrived; the body streams the rest and holds the
//! // concurrency slot until it ends.
//! # let _ = response; Ok(()) }
//! ```
//!
//! # Layer order
//!
//! Put the concurrency limit outermost: the slot is held across every retry of a call,
//! so retries cannot raise the number of open streams, and a saturated client rejects
//! before spending budget. The budget layer goes above the retry layer, so it counts
//! each original request once and hands the budget down to the retries; below it, the
//! budget cannot bound them, and says so once in a `WARN` (see [`budget`]).

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
pub mod budget;
pub mod concurrency;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod config;
#[cfg(feature = "connection-gauge")]
#[cfg_attr(docsrs, doc(cfg(feature = "connection-gauge")))]
pub mod connection;
mod deadline;
mod error;
pub mod fallback;
pub mod frame;
mod handoff;
#[cfg(feature = "load")]
#[cfg_attr(docsrs, doc(cfg(feature = "load")))]
pub mod load;
pub mod metrics;
mod park;
pub mod replay;
pub mod retry;
mod retry_after;

pub use budget::{RetryBudget, RetryBudgetLayer};
pub use concurrency::{RejectReason, Rejected, StreamConcurrencyLayer};
#[cfg(feature = "serde")]
pub use config::Config;
#[cfg(feature = "connection-gauge")]
pub use connection::ConnectionGaugeLayer;
pub use error::ConfigError;
pub use replay::BufferRequestBodyLayer;
pub use retry::{FirstChunkError, FirstChunkRetryLayer, RetryPolicy};

// The README's examples are compiled (and run) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
