//! Configuration from a file: [`Config`], and the stack of layers it builds in one call.
//!
//! Needs the `serde` feature. The field names are those of the Go runtime this crate
//! learns from (`stream_max_concurrent`, `stream_retry`, `stream_idle_timeout`), plus
//! this crate's own (`max_wait`, `first_chunk_timeout`, `frames`). Every field is
//! optional; durations are strings such as `"250ms"`, `"2s"` or `"1m"`. In YAML, with
//! the defaults:
//!
//! ```yaml
//! stream_max_concurrent: 0      # streams open at once; 0 = no limit
//! max_wait: ~                   # how long a call may queue for a slot; ~ = until the caller gives up
//! max_queued: ~                 # how many calls may queue at once; ~ = no bound
//! first_chunk_timeout: 30s      # per attempt, from its start to its first chunk
//! stream_idle_timeout: 30s      # gap allowed between chunks, once the first has arrived
//! frames: auto                  # auto | sse | ndjson | json_array | eventstream | first_data
//! stream_retry:
//!   enabled: true
//!   max_attempts: 3             # attempts in all, the first included
//!   initial_delay: 250ms        # backoff: full jitter, doubling from initial_delay ...
//!   max_delay: 2s               # ... up to max_delay
//!   retry_maybe_processed: true # false: retry only failures where the upstream did no processing
//!   budget:                     # retries shared by every call of the stack
//!     enabled: true
//!     ttl: 10s
//!     min_per_sec: 10
//!     retry_ratio: 0.2
//!     # or the token bucket of the Go runtime, instead of the three above:
//!     # rate_per_sec: 5
//!     # burst: 20
//! ```
//!
//! [`Config::layer`] checks every value and builds the stack, in this order:
//!
//! | layer | from | when |
//! |---|---|---|
//! | idle timeout between chunks (tower-http's [`TimeoutBody`]), outermost | `stream_idle_timeout` | always |
//! | [`StreamConcurrencyLayer`] | `stream_max_concurrent`, `max_wait`, `max_queued` | `stream_max_concurrent` is not 0 |
//! | [`RetryBudgetLayer`] | `stream_retry.budget` | retry and the budget are enabled |
//! | [`FirstChunkRetryLayer`], innermost, next to the client | `stream_retry`, `first_chunk_timeout`, `frames` | always (one attempt per call when retry is disabled) |
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::ServiceBuilder;
//! use tower_stream_backpressure::config::Config;
//!
//! let config: Config = serde_json::from_str(
//!     r#"{
//!         "stream_max_concurrent": 100,
//!         "max_wait": "2s",
//!         "stream_idle_timeout": "1m",
//!         "stream_retry": {
//!             "max_attempts": 3,
//!             "initial_delay": "250ms",
//!             "max_delay": "2s",
//!             "budget": { "rate_per_sec": 5, "burst": 20 }
//!         }
//!     }"#,
//! )?;
//!
//! let hyper_util_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let client = ServiceBuilder::new()
//!     .layer(config.layer("openai")?)
//!     .service(hyper_util_client);
//! # let _ = client;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The budget
//!
//! Without a `budget` section, retries share [`RetryBudget::default`] (ttl 10 s,
//! min_per_sec 10, retry_ratio 0.2): the Go runtime had no budget unless one was set,
//! this crate recommends one. `budget: { enabled: false }` takes it out, leaving
//! retries bounded by `max_attempts` only.
//!
//! The Go runtime's budget was a token bucket, `rate_per_sec` and `burst`; they map
//! exactly onto a [`RetryBudget`] with `min_per_sec = rate_per_sec`,
//! `ttl = burst / rate_per_sec` seconds (rounded up to the millisecond, which keeps the
//! reserve at exactly `burst` for rates up to 1000 a second) and
//! `retry_ratio = 0`: `burst` retries are available at once, and `rate_per_sec` a second
//! are allowed in the long run. Retries come back as they leave the `ttl` window
//! rather than one by one, and only whole rates (1 or more retries a second) map, with
//! `burst / rate_per_sec` within 1 s and 60 s. A budget gives either `ttl`,
//! `min_per_sec`, `retry_ratio` or `rate_per_sec` and `burst`, not both.
//!
//! # The idle timeout and the first-chunk timeout
//!
//! `first_chunk_timeout` times each attempt from its start to its first chunk; a stall
//! is retried. `stream_idle_timeout` times the gaps between chunks after that. They
//! cannot conflict, whatever their values: the idle timeout wraps the body the caller
//! reads, outside the retry layer, and that body exists only once the first chunk has
//! arrived. From then on, each time the caller waits for the next frame, the wait may
//! not exceed `stream_idle_timeout`, or the body fails with tower-http's
//! [`TimeoutError`](tower_http::timeout::TimeoutError) (as a [`tower::BoxError`]), and
//! nothing is retried: the caller has seen data. It is outside the concurrency limit
//! too, so that a timed-out stream keeps its slot until the caller drops the body, which
//! closes the upstream stream.
//!
//! The body is [`ResponseBody`]: its frames are the upstream's, unchanged, and it
//! reports the upstream's `is_end_stream` and size hint (a `Content-Length`), so a
//! server in front of it can still frame the response exactly.
//!
//! # Errors
//!
//! A field that does not exist, a value of the wrong kind, or broken syntax fails
//! deserialization with a message that starts with the path to it, in full:
//!
//! ```
//! use tower_stream_backpressure::config::Config;
//!
//! let json = r#"{"stream_retry": {"initial_delay": 2}}"#;
//! let error = serde_json::from_str::<Config>(json).unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "invalid `stream_retry.initial_delay`: expected a duration such as \"250ms\", \"2s\" \
//!      or \"1m\", got 2: a number needs a unit at line 1 column 36",
//! );
//!
//! let json = r#"{"stream_retry": {"budget": {"rate": 5}}}"#;
//! let error = serde_json::from_str::<Config>(json).unwrap_err();
//! assert!(error.to_string().starts_with(
//!     "invalid `stream_retry.budget.rate`: unknown field `rate`, expected one of `enabled`, "
//! ));
//! ```
//!
//! The path comes from [`serde_path_to_error`], inside `Config`'s `Deserialize`: any
//! serde format gives it, also for a `Config` within the caller's own settings, and the
//! format's position stays at the end (serde_json's is that of the value).
//!
//! A value out of range is a [`ConfigError`] from [`Config::layer`] (or
//! [`Config::validate`]) whose [`setting`](crate::ConfigError::setting) is the field's
//! full name, e.g. `"stream_retry.max_attempts"`, with the same form of message. Every
//! value is checked, also in a section that is switched off.
//!
//! [`TimeoutBody`]: tower_http::timeout::TimeoutBody
//! [`StreamConcurrencyLayer`]: crate::StreamConcurrencyLayer
//! [`RetryBudgetLayer`]: crate::RetryBudgetLayer
//! [`FirstChunkRetryLayer`]: crate::FirstChunkRetryLayer
//! [`RetryBudget`]: crate::RetryBudget
//! [`RetryBudget::default`]: crate::RetryBudget::default
//! [`ConfigError`]: crate::ConfigError

mod fields;
mod path;
mod schema;
mod stack;

pub use self::schema::{Budget, Config, Frames, StreamRetry};
pub use self::stack::{ResponseBody, ResponseFuture, StreamLayers, StreamStack};
