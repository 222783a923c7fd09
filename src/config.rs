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
//! A field that does not exist, or a value of the wrong kind, fails deserialization with
//! a message naming the field, e.g. ``unknown field `stream_max_concurent` `` or
//! ``invalid `stream_retry.initial_delay`: ...``. A value out of range is a
//! [`ConfigError`] from [`Config::layer`] (or [`Config::validate`]) whose
//! [`setting`](ConfigError::setting) is the field's full name, e.g.
//! `"stream_retry.max_attempts"`. Every value is checked, also in a section that is
//! switched off.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::metrics::Meter;
use pin_project_lite::pin_project;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use tower::BoxError;
use tower_http::timeout::TimeoutBody;
use tower_layer::Layer;
use tower_service::Service;

use crate::budget::WithRetryBudget;
use crate::concurrency::StreamConcurrency;
use crate::frame::{self, AnyDetector};
use crate::retry::FirstChunkRetry;
use crate::{
    concurrency, retry, ConfigError, FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer,
    RetryPolicy, StreamConcurrencyLayer,
};

/// Back-pressure for the streaming calls to one provider, as read from a configuration
/// file. See the [module docs](self) for the format.
///
/// Every field has a default ([`Config::default`]); [`layer`](Self::layer) checks the
/// values and builds the layers.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::config::{Config, StreamRetry};
///
/// let config: Config =
///     serde_json::from_str(r#"{"stream_max_concurrent": 100, "max_wait": "2s"}"#)?;
/// assert_eq!(config.stream_max_concurrent, 100);
/// assert_eq!(config.max_wait, Some(Duration::from_secs(2)));
/// assert_eq!(config.stream_retry, StreamRetry::default());
///
/// let typo = serde_json::from_str::<Config>(r#"{"stream_max_concurent": 100}"#).unwrap_err();
/// assert!(typo.to_string().contains("unknown field `stream_max_concurent`"), "{typo}");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a map of stream settings (`stream_max_concurrent`, `stream_retry`, ...)"
)]
#[non_exhaustive]
pub struct Config {
    /// Streams open at once (default 0: no limit, and no concurrency layer). A slot is
    /// held until the stream ends, across every retry.
    #[serde(deserialize_with = "de_stream_max_concurrent")]
    pub stream_max_concurrent: usize,
    /// How long a call may wait for a slot before it fails with
    /// [`Rejected`](crate::Rejected) (default `None`: until the caller drops it; `0s`
    /// fails at once when every slot is held). Unused without `stream_max_concurrent`.
    #[serde(deserialize_with = "de_max_wait")]
    pub max_wait: Option<Duration>,
    /// How many calls may wait for a slot at once; the next fails at once with
    /// [`Rejected`](crate::Rejected) (`queue_full`) (default `None`: no bound, each
    /// call's `max_wait` decides). Unused without `stream_max_concurrent`.
    #[serde(deserialize_with = "de_max_queued")]
    pub max_queued: Option<usize>,
    /// Retry before the first chunk.
    pub stream_retry: StreamRetry,
    /// How long one attempt may take from its start to its first chunk, before it
    /// counts as stalled and is retried (default 30 s). Above zero.
    #[serde(deserialize_with = "de_first_chunk_timeout")]
    pub first_chunk_timeout: Duration,
    /// How long the caller may wait for the next frame of a body, once the first chunk
    /// has arrived (default 30 s). Above zero. Keep-alives count as frames.
    #[serde(deserialize_with = "de_stream_idle_timeout")]
    pub stream_idle_timeout: Duration,
    /// What the first chunk is (default [`Frames::Auto`]).
    #[serde(deserialize_with = "de_frames")]
    pub frames: Frames,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            stream_max_concurrent: 0,
            max_wait: None,
            max_queued: None,
            stream_retry: StreamRetry::default(),
            first_chunk_timeout: Duration::from_secs(30),
            stream_idle_timeout: Duration::from_secs(30),
            frames: Frames::Auto,
        }
    }
}

/// The `stream_retry` section: retry before the first chunk, never after.
///
/// ```
/// use tower_stream_backpressure::config::Config;
///
/// let config: Config = serde_json::from_str(r#"{"stream_retry": {"enabled": false}}"#)?;
/// assert!(!config.stream_retry.enabled);
///
/// let layers = config.layer("openai")?;
/// assert!(layers.budget().is_none(), "no retries, no budget");
/// assert!(format!("{:?}", layers.policy()).contains("max_attempts: 1"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "the `stream_retry` map (`enabled`, `max_attempts`, `initial_delay`, `max_delay`, `retry_maybe_processed`, `budget`)"
)]
#[non_exhaustive]
pub struct StreamRetry {
    /// Whether calls are retried (default `true`). `false` makes one attempt per call,
    /// as `max_attempts: 1` does, with no budget; `first_chunk_timeout` still fails a
    /// call that stalls before its first chunk.
    #[serde(deserialize_with = "de_retry_enabled")]
    pub enabled: bool,
    /// Attempts in all, the first included (default 3; the Go runtime's was 2). At
    /// least 1.
    #[serde(deserialize_with = "de_max_attempts")]
    pub max_attempts: u32,
    /// The backoff before the first retry is random within 0 and this (default 250 ms);
    /// the ceiling doubles with each retry. At most `max_delay`.
    #[serde(deserialize_with = "de_initial_delay")]
    pub initial_delay: Duration,
    /// The highest backoff ceiling (default 2 s).
    #[serde(deserialize_with = "de_max_delay")]
    pub max_delay: Duration,
    /// Whether failures after which the upstream may have processed the request (a
    /// reset after the request was written, a stall, a body cut off before its first
    /// chunk) are retried, as well as those where it did not (a connect failure,
    /// `REFUSED_STREAM`, `503`) (default `true`). `false` is for calls whose side
    /// effects must not repeat: see
    /// [`RetryPolicy::retry_maybe_processed`].
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let json = r#"{"stream_retry": {"retry_maybe_processed": false}}"#;
    /// let config: Config = serde_json::from_str(json)?;
    /// let layers = config.layer("payments")?;
    /// assert!(!layers.policy().get_retry_maybe_processed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[serde(deserialize_with = "de_retry_maybe_processed")]
    pub retry_maybe_processed: bool,
    /// The retry budget shared by every call of the stack.
    pub budget: Budget,
}

impl Default for StreamRetry {
    fn default() -> Self {
        Self {
            enabled: true,
            max_attempts: 3,
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(2),
            retry_maybe_processed: true,
            budget: Budget::default(),
        }
    }
}

/// The `stream_retry.budget` section: how many retries every call of the stack may
/// add, together.
///
/// Either this crate's settings (`ttl`, `min_per_sec`, `retry_ratio`, each defaulting as
/// in [`RetryBudget::default`]) or the Go runtime's token bucket (`rate_per_sec` and
/// `burst`, mapped as the [module docs](self#the-budget) say), not both.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::config::Config;
///
/// // The Go runtime's token bucket: 20 retries at once, 5 a second in the long run.
/// let config: Config =
///     serde_json::from_str(r#"{"stream_retry": {"budget": {"rate_per_sec": 5, "burst": 20}}}"#)?;
/// assert_eq!(config.stream_retry.budget.burst, Some(20));
///
/// let layers = config.layer("openai")?;
/// let budget = layers.budget().expect("a budget");
/// assert_eq!(budget.available(), 20);
/// assert_eq!((budget.min_per_sec(), budget.ttl()), (5, Duration::from_secs(4)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "the `stream_retry.budget` map (`enabled`, `ttl`, `min_per_sec`, `retry_ratio`, or `rate_per_sec` and `burst`)"
)]
#[non_exhaustive]
pub struct Budget {
    /// `Some(false)` takes the budget out: retries are bounded by `max_attempts` only.
    /// Unset or `Some(true)`: a budget.
    #[serde(deserialize_with = "de_budget_enabled")]
    pub enabled: Option<bool>,
    /// The window over which requests and retries count (default 10 s), within 1 s and
    /// 60 s.
    #[serde(deserialize_with = "de_ttl")]
    pub ttl: Option<Duration>,
    /// Retries a second always allowed (default 10).
    #[serde(deserialize_with = "de_min_per_sec")]
    pub min_per_sec: Option<u32>,
    /// Retries allowed per request, beyond the `min_per_sec` reserve (default 0.2),
    /// within 0 and 1000.
    #[serde(deserialize_with = "de_retry_ratio")]
    pub retry_ratio: Option<f64>,
    /// The token bucket's refill rate, in retries a second: a whole number, at least 1.
    #[serde(deserialize_with = "de_rate_per_sec")]
    pub rate_per_sec: Option<u32>,
    /// The token bucket's size: the retries available at once. Within `rate_per_sec`
    /// and `60 * rate_per_sec`.
    #[serde(deserialize_with = "de_burst")]
    pub burst: Option<u32>,
}

/// What the first chunk of a stream is: the [`frame`] detector the retry layer uses.
///
/// ```
/// use tower_stream_backpressure::config::{Config, Frames};
///
/// let config: Config = serde_json::from_str(r#"{"frames": "ndjson"}"#)?;
/// assert_eq!(config.frames, Frames::NdJson);
/// assert_eq!(Config::default().frames, Frames::Auto);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Frames {
    /// `auto`: by the response's `Content-Type` ([`frame::Auto`]).
    #[default]
    Auto,
    /// `sse`: server-sent events ([`frame::Sse`]).
    Sse,
    /// `ndjson`: newline-delimited JSON ([`frame::NdJson`]).
    NdJson,
    /// `json_array`: the first element of a JSON array, strict ([`frame::JsonArray`]).
    JsonArray,
    /// `eventstream`: AWS eventstream ([`frame::EventStream`]).
    EventStream,
    /// `first_data`: the first non-empty data frame ([`frame::FirstData`]).
    FirstData,
}

impl Frames {
    const NAMES: [(&'static str, Frames); 6] = [
        ("auto", Frames::Auto),
        ("sse", Frames::Sse),
        ("ndjson", Frames::NdJson),
        ("json_array", Frames::JsonArray),
        ("eventstream", Frames::EventStream),
        ("first_data", Frames::FirstData),
    ];

    /// Its name in a configuration file, e.g. `"json_array"`.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Frames;
    ///
    /// assert_eq!(Frames::JsonArray.name(), "json_array");
    /// assert_eq!(Frames::EventStream.to_string(), "eventstream");
    /// ```
    #[must_use]
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, frames)| *frames == self)
            .map_or("auto", |(name, _)| name)
    }

    fn detector(self) -> AnyDetector {
        match self {
            Frames::Auto => AnyDetector::Auto(frame::Sse::default()),
            Frames::Sse => AnyDetector::Sse(frame::Sse::default()),
            Frames::NdJson => AnyDetector::NdJson(frame::NdJson::default()),
            Frames::JsonArray => AnyDetector::JsonArray(frame::JsonArray::default()),
            Frames::EventStream => AnyDetector::EventStream(Box::default()),
            Frames::FirstData => AnyDetector::FirstData,
        }
    }
}

impl fmt::Display for Frames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Config {
    /// Checks every value; the error names the first field out of range.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// assert!(Config::default().validate().is_ok());
    ///
    /// let json = r#"{"stream_retry": {"initial_delay": "5s", "max_delay": "1s"}}"#;
    /// let config: Config = serde_json::from_str(json)?;
    /// let error = config.validate().unwrap_err();
    /// assert_eq!(error.setting(), "stream_retry.initial_delay");
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.layer("unknown").map(drop)
    }

    /// Checks every value and builds the stack of layers, whose metrics carry
    /// `provider`. The stack holds one concurrency limit and one budget, shared by
    /// every service it builds and their clones: build it once per provider.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let config: Config = serde_json::from_str(r#"{"stream_retry": {"max_attempts": 0}}"#)?;
    /// let error = config.layer("openai").unwrap_err();
    /// assert_eq!(error.setting(), "stream_retry.max_attempts");
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn layer(
        &self,
        provider: impl Into<Cow<'static, str>>,
    ) -> Result<StreamLayers, ConfigError> {
        let provider = provider.into();
        let concurrency = match self.stream_max_concurrent {
            0 => None,
            limit => {
                let layer = StreamConcurrencyLayer::try_new(limit)
                    .map_err(|e| rename(e, "stream_max_concurrent"))?
                    .provider(provider.clone());
                let layer = match self.max_wait {
                    Some(max_wait) => layer.max_wait(max_wait),
                    None => layer,
                };
                Some(match self.max_queued {
                    Some(max_queued) => layer.max_queued(max_queued),
                    None => layer,
                })
            }
        };
        let policy = self.retry_policy()?;
        let budget = self.stream_retry.budget.build()?;
        if self.stream_idle_timeout.is_zero() {
            return Err(ConfigError::new(
                "stream_idle_timeout",
                "must be above zero",
            ));
        }
        let retry = FirstChunkRetryLayer::try_new(policy)
            .map_err(|e| rename(e, "stream_retry"))?
            .frames(self.frames.detector())
            .provider(provider.clone());
        let budget = budget
            .filter(|_| self.stream_retry.enabled)
            .map(|budget| RetryBudgetLayer::new(budget).provider(provider));
        Ok(StreamLayers {
            concurrency,
            budget,
            retry,
            stream_idle_timeout: self.stream_idle_timeout,
        })
    }

    fn retry_policy(&self) -> Result<RetryPolicy, ConfigError> {
        let retry = &self.stream_retry;
        if retry.initial_delay > retry.max_delay {
            return Err(ConfigError::new(
                "stream_retry.initial_delay",
                format!(
                    "must not exceed `stream_retry.max_delay` ({:?}), got {:?}",
                    retry.max_delay, retry.initial_delay
                ),
            ));
        }
        let policy = RetryPolicy::default()
            .max_attempts(retry.max_attempts)
            .backoff(retry.initial_delay, retry.max_delay)
            .first_chunk_timeout(self.first_chunk_timeout)
            .retry_maybe_processed(retry.retry_maybe_processed);
        policy.validate().map_err(|e| {
            let field = match e.setting() {
                "max_attempts" => "stream_retry.max_attempts",
                "backoff" => "stream_retry.initial_delay",
                "first_chunk_timeout" => "first_chunk_timeout",
                _ => "stream_retry",
            };
            rename(e, field)
        })?;
        Ok(if retry.enabled {
            policy
        } else {
            policy.max_attempts(1)
        })
    }
}

impl Budget {
    /// The budget, or `None` when disabled.
    fn build(&self) -> Result<Option<RetryBudget>, ConfigError> {
        const RATE: &str = "stream_retry.budget.rate_per_sec";
        const BURST: &str = "stream_retry.budget.burst";
        let ours = [
            ("ttl", self.ttl.is_some()),
            ("min_per_sec", self.min_per_sec.is_some()),
            ("retry_ratio", self.retry_ratio.is_some()),
        ];
        let bucket = match (self.rate_per_sec, self.burst) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    BURST,
                    "must be given with `rate_per_sec` (the token bucket takes both)",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    RATE,
                    "must be given with `burst` (the token bucket takes both)",
                ))
            }
            (Some(rate), Some(burst)) => Some((rate, burst)),
        };
        let budget = match bucket {
            None => RetryBudget::try_new(
                self.ttl.unwrap_or(Duration::from_secs(10)),
                self.min_per_sec.unwrap_or(10),
                self.retry_ratio.unwrap_or(0.2),
            )
            .map_err(|e| {
                let field = match e.setting() {
                    "ttl" => "stream_retry.budget.ttl",
                    "min_per_sec" => "stream_retry.budget.min_per_sec",
                    "retry_ratio" => "stream_retry.budget.retry_ratio",
                    _ => "stream_retry.budget",
                };
                rename(e, field)
            })?,
            Some((rate, burst)) => {
                if let Some((name, _)) = ours.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::new(
                        RATE,
                        format!(
                            "cannot be combined with `stream_retry.budget.{name}`: give either \
                             `ttl`, `min_per_sec` and `retry_ratio`, or the token bucket's \
                             `rate_per_sec` and `burst`"
                        ),
                    ));
                }
                if rate == 0 {
                    return Err(ConfigError::new(RATE, "must be at least 1 retry a second"));
                }
                // The window in which `burst` retries are spent at `rate` a second,
                // rounded up to the millisecond so that the reserve holds `burst`.
                let ttl_ms = (u64::from(burst) * 1000).div_ceil(u64::from(rate));
                if !(1000..=60_000).contains(&ttl_ms) {
                    return Err(ConfigError::new(
                        BURST,
                        format!(
                            "must be within `rate_per_sec` ({rate}) and 60 times it ({}): \
                             burst / rate_per_sec is the budget's window, within 1s and 60s; \
                             got {burst}",
                            u64::from(rate) * 60
                        ),
                    ));
                }
                RetryBudget::try_new(Duration::from_millis(ttl_ms), rate, 0.0)
                    .map_err(|e| rename(e, BURST))?
            }
        };
        Ok((self.enabled != Some(false)).then_some(budget))
    }
}

/// `error`, naming `field` instead of the constructor's parameter.
fn rename(error: ConfigError, field: &'static str) -> ConfigError {
    let text = error.to_string();
    let prefix = format!("invalid `{}`: ", error.setting());
    let problem = text.strip_prefix(&prefix).unwrap_or(&text);
    ConfigError::new(field, problem)
}

/// The layers a [`Config`] describes, as one [`Layer`]: put it in a
/// `ServiceBuilder` above the HTTP client. Made by [`Config::layer`].
///
/// The services it builds are [`StreamStack`]s. Clones, and every service built, share
/// one concurrency limit and one budget.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_stream_backpressure::config::{Config, StreamLayers};
///
/// let config: Config = serde_json::from_str(r#"{"stream_max_concurrent": 10}"#)?;
/// let layers: StreamLayers = config.layer("openai")?;
/// let upstream = service_fn(|_: http::Request<()>| async {
///     http::Response::builder()
///         .header("content-type", "text/event-stream")
///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
/// });
/// let client = ServiceBuilder::new().layer(layers.clone()).service(upstream);
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// assert_eq!(layers.concurrency().unwrap().available_slots(), 9, "the stream is open");
/// let body = response.into_body().collect().await?.to_bytes();
/// assert_eq!(body, "data: {\"text\":\"Hi\"}\n\n");
/// assert_eq!(layers.concurrency().unwrap().available_slots(), 10);
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct StreamLayers {
    concurrency: Option<StreamConcurrencyLayer>,
    budget: Option<RetryBudgetLayer>,
    retry: FirstChunkRetryLayer<AnyDetector>,
    stream_idle_timeout: Duration,
}

impl StreamLayers {
    /// The meter every layer records to (default: the global meter provider's, taken
    /// when the stack first builds a service).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use opentelemetry::metrics::MeterProvider as _;
    /// use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let exporter = InMemoryMetricExporter::default();
    /// let provider = SdkMeterProvider::builder()
    ///     .with_reader(PeriodicReader::builder(exporter.clone()).build())
    ///     .build();
    /// let config: Config = serde_json::from_str(r#"{"stream_max_concurrent": 10}"#)?;
    /// let layers = config.layer("openai")?.meter(provider.meter("my-client"));
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
    /// });
    /// let client = layers.layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _stream = client.oneshot(http::Request::new(())).await?;
    ///
    /// provider.force_flush()?;
    /// let exported = exporter.get_finished_metrics()?;
    /// let names: Vec<_> = exported
    ///     .iter()
    ///     .flat_map(|m| m.scope_metrics())
    ///     .flat_map(|s| s.metrics())
    ///     .map(|metric| metric.name().to_owned())
    ///     .collect();
    /// for name in [
    ///     "streams_in_flight",
    ///     "provider_calls_in_flight",
    ///     "stream_retry_budget_available",
    /// ] {
    ///     assert!(names.iter().any(|exported| exported == name), "{name}");
    /// }
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[must_use]
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            concurrency: self.concurrency.map(|layer| layer.meter(meter.clone())),
            budget: self.budget.map(|layer| layer.meter(meter.clone())),
            retry: self.retry.meter(meter),
            ..self
        }
    }

    /// The concurrency limit, if `stream_max_concurrent` is not 0.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let config: Config = serde_json::from_str(r#"{"stream_max_concurrent": 64}"#)?;
    /// let layers = config.layer("openai")?;
    /// assert_eq!(layers.concurrency().map(|limit| limit.available_slots()), Some(64));
    /// assert!(Config::default().layer("openai")?.concurrency().is_none(), "0: no limit");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn concurrency(&self) -> Option<&StreamConcurrencyLayer> {
        self.concurrency.as_ref()
    }

    /// The retry budget, if retry and the budget are enabled.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let layers = Config::default().layer("openai")?;
    /// assert_eq!(layers.budget().map(|budget| budget.available()), Some(100));
    ///
    /// let json = r#"{"stream_retry": {"budget": {"enabled": false}}}"#;
    /// let config: Config = serde_json::from_str(json)?;
    /// assert!(config.layer("openai")?.budget().is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref().map(RetryBudgetLayer::budget)
    }

    /// The retry policy in force.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let config: Config = serde_json::from_str(r#"{"stream_retry": {"max_attempts": 2}}"#)?;
    /// let layers = config.layer("openai")?;
    /// // E.g. to log the settings in force at startup.
    /// let policy = format!("{:?}", layers.policy());
    /// assert!(policy.contains("max_attempts: 2"), "{policy}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        self.retry.policy()
    }

    /// The longest wait for the next frame once the first chunk has arrived.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let config: Config = serde_json::from_str(r#"{"stream_idle_timeout": "1m"}"#)?;
    /// assert_eq!(config.layer("openai")?.stream_idle_timeout(), Duration::from_secs(60));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stream_idle_timeout(&self) -> Duration {
        self.stream_idle_timeout
    }
}

impl<S> Layer<S> for StreamLayers {
    type Service = StreamStack<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let retry = self.retry.layer(inner);
        let budgeted = match &self.budget {
            Some(layer) => Budgeted::With(layer.layer(retry)),
            None => Budgeted::Without(retry),
        };
        let stack = match &self.concurrency {
            Some(layer) => Stack::Limited(layer.layer(budgeted)),
            None => Stack::Unlimited(budgeted),
        };
        StreamStack {
            stack,
            stream_idle_timeout: self.stream_idle_timeout,
        }
    }
}

/// The service a [`StreamLayers`] builds around `S`: the idle timeout, the concurrency
/// limit, the budget and the retry layer, as configured.
///
/// Its errors are [`tower::BoxError`]s: [`Rejected`](crate::Rejected),
/// [`FirstChunkError`](crate::FirstChunkError), or the inner service's. Its response
/// bodies are [`ResponseBody`]s.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::config::{Config, StreamStack};
/// use tower_stream_backpressure::Rejected;
///
/// let config: Config =
///     serde_json::from_str(r#"{"stream_max_concurrent": 1, "max_wait": "0s"}"#)?;
/// let upstream = service_fn(|_: http::Request<()>| async {
///     http::Response::builder()
///         .header("content-type", "text/event-stream")
///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
/// });
/// let client: StreamStack<_> = config.layer("openai")?.layer(upstream);
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let _open = client.clone().oneshot(http::Request::new(())).await?;
/// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
/// assert!(error.is::<Rejected>(), "{error}");
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct StreamStack<S> {
    stack: Stack<S>,
    stream_idle_timeout: Duration,
}

/// The configured layers below the idle timeout.
#[derive(Debug, Clone)]
enum Stack<S> {
    Limited(StreamConcurrency<Inner<S>>),
    Unlimited(Inner<S>),
}

type Inner<S> = Budgeted<FirstChunkRetry<S, AnyDetector>>;

/// The budget layer, or nothing.
#[derive(Debug, Clone)]
enum Budgeted<S> {
    With(WithRetryBudget<S>),
    Without(S),
}

impl<S, B> Service<Request<B>> for Budgeted<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Budgeted::With(service) => service.poll_ready(cx),
            Budgeted::Without(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self {
            Budgeted::With(service) => service.call(request),
            Budgeted::Without(service) => service.call(request),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for StreamStack<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: AsRef<[u8]> + Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.stack {
            Stack::Limited(service) => service.poll_ready(cx),
            Stack::Unlimited(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let call = match &mut self.stack {
            Stack::Limited(service) => Call::Limited {
                future: service.call(request),
            },
            Stack::Unlimited(service) => Call::Unlimited {
                future: service.call(request),
            },
        };
        ResponseFuture {
            call,
            stream_idle_timeout: self.stream_idle_timeout,
        }
    }
}

pin_project! {
    /// Response future of [`StreamStack`]: resolves once the first chunk has arrived
    /// (or the call failed).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, Service, ServiceExt};
    /// use tower_stream_backpressure::config::{Config, ResponseFuture};
    ///
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
    /// });
    /// let mut client = Config::default().layer("openai")?.layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let future: ResponseFuture<_, (), Full<Bytes>> =
    ///     client.ready().await?.call(http::Request::new(()));
    /// assert_eq!(future.await?.status(), 200);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        S: Clone,
        S::Error: Into<BoxError>,
        ReqBody: Clone,
        ResBody: Body,
        ResBody: Unpin,
        ResBody::Data: AsRef<[u8]>,
        ResBody::Error: Into<BoxError>,
    {
        #[pin]
        call: Call<S, ReqBody, ResBody>,
        stream_idle_timeout: Duration,
    }
}

pin_project! {
    #[project = CallProj]
    enum Call<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        S: Clone,
        S::Error: Into<BoxError>,
        ReqBody: Clone,
        ResBody: Body,
        ResBody: Unpin,
        ResBody::Data: AsRef<[u8]>,
        ResBody::Error: Into<BoxError>,
    {
        Limited {
            #[pin]
            future: concurrency::ResponseFuture<Inner<S>, Request<ReqBody>>,
        },
        Unlimited {
            #[pin]
            future: retry::ResponseFuture<S, ReqBody, ResBody, AnyDetector>,
        },
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: AsRef<[u8]> + Send,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let timeout = *this.stream_idle_timeout;
        let response = match this.call.project() {
            CallProj::Limited { future } => {
                ready!(future.poll(cx))?.map(|body| Chunks::Limited { body })
            }
            CallProj::Unlimited { future } => {
                ready!(future.poll(cx))?.map(|body| Chunks::Unlimited { body })
            }
        };
        Poll::Ready(Ok(response.map(|chunks| ResponseBody::new(timeout, chunks))))
    }
}

impl<S, ReqBody, ResBody> fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: AsRef<[u8]> + Send,
    ResBody::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Response body of [`StreamStack`]: the upstream's frames, unchanged, from the first
/// chunk on.
///
/// Fails with tower-http's [`TimeoutError`](tower_http::timeout::TimeoutError) when the
/// caller waits longer than `stream_idle_timeout` for a frame. Holds the concurrency
/// slot, if any, until the stream ends or the body is dropped.
///
/// ```
/// use std::pin::Pin;
/// use std::task::{Context, Poll};
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http_body::Frame;
/// use http_body_util::BodyExt;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_http::timeout::TimeoutError;
/// use tower_stream_backpressure::config::{Config, ResponseBody};
///
/// /// An upstream stream that sends one event, then stalls.
/// struct Stalls(Option<Bytes>);
///
/// impl http_body::Body for Stalls {
///     type Data = Bytes;
///     type Error = std::convert::Infallible;
///
///     fn poll_frame(
///         mut self: Pin<&mut Self>,
///         _: &mut Context<'_>,
///     ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
///         match self.0.take() {
///             Some(event) => Poll::Ready(Some(Ok(Frame::data(event)))),
///             None => Poll::Pending,
///         }
///     }
/// }
///
/// let upstream = service_fn(|_: http::Request<()>| async {
///     let body = Stalls(Some(Bytes::from("data: {}\n\n")));
///     http::Response::builder().header("content-type", "text/event-stream").body(body)
/// });
/// let config: Config = serde_json::from_str(r#"{"stream_idle_timeout": "10s"}"#)?;
/// let client = config.layer("openai")?.layer(upstream);
/// # tokio::runtime::Builder::new_current_thread()
/// #     .enable_all()
/// #     .start_paused(true)
/// #     .build()?
/// #     .block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// let mut body: ResponseBody<Stalls> = response.into_body();
/// let first = body.frame().await.unwrap()?;
/// assert_eq!(first.into_data().unwrap(), "data: {}\n\n");
///
/// let started = tokio::time::Instant::now();
/// let error = body.frame().await.unwrap().unwrap_err();
/// assert!(error.is::<TimeoutError>(), "{error}");
/// assert_eq!(started.elapsed(), Duration::from_secs(10));
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
pub struct ResponseBody<B: Body> {
    inner: Pin<Box<TimeoutBody<Chunks<B>>>>,
    // What the body inside the timeout reported last: `TimeoutBody` does not pass its
    // `is_end_stream` and `size_hint` on, so they are kept here, counted down by the
    // frames that pass.
    size: SizeHint,
    ended: bool,
}

impl<B> ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn new(timeout: Duration, chunks: Chunks<B>) -> Self {
        let (size, ended) = (chunks.size_hint(), chunks.is_end_stream());
        Self {
            inner: Box::pin(TimeoutBody::new(timeout, chunks)),
            size,
            ended,
        }
    }

    /// Counts a polled frame against the size hint, and notes the end of the stream.
    fn saw<D: bytes::Buf, E>(&mut self, polled: &Option<Result<Frame<D>, E>>) {
        match polled {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) => {
                    let len = data.remaining() as u64;
                    // Lower first: it never rises above the upper bound that way.
                    self.size.set_lower(self.size.lower().saturating_sub(len));
                    if let Some(upper) = self.size.upper() {
                        let upper = upper.saturating_sub(len);
                        self.size.set_upper(upper);
                        self.ended |= upper == 0;
                    }
                }
                // Trailers are the last frame.
                None => self.ended = true,
            },
            Some(Err(_)) | None => self.ended = true,
        }
        if self.ended {
            self.size = SizeHint::with_exact(0);
        }
    }
}

pin_project! {
    #[project = ChunksProj]
    enum Chunks<B: Body> {
        Limited {
            #[pin]
            body: concurrency::ResponseBody<retry::ResponseBody<B>>,
        },
        Unlimited {
            #[pin]
            body: retry::ResponseBody<B>,
        },
    }
}

impl<B> Body for Chunks<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project() {
            ChunksProj::Limited { body } => body.poll_frame(cx),
            ChunksProj::Unlimited { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Chunks::Limited { body } => body.is_end_stream(),
            Chunks::Unlimited { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Chunks::Limited { body } => body.size_hint(),
            Chunks::Unlimited { body } => body.size_hint(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = ready!(self.inner.as_mut().poll_frame(cx));
        self.saw(&polled);
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

// Deserialization. Each field reads a plain value and converts it itself, so that an
// error names the field in full (`stream_retry.initial_delay`), which serde's own
// messages for a value of the wrong kind do not.

/// A value as a configuration format gives it.
enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    /// A list or a map: never a valid leaf.
    Other(&'static str),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Other(what) => f.write_str(what),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = Value;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, a string, a boolean or null")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v.into()))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
                Ok(Value::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
                Ok(Value::Int(v.into()))
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
                Ok(i128::try_from(v).map_or(Value::Float(v as f64), Value::Int))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Str(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
                Ok(Value::Str(v))
            }

            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
                Ok(Value::Other("bytes"))
            }

            fn visit_none<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }

            fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
                Value::deserialize(deserializer)
            }

            fn visit_newtype_struct<D: Deserializer<'de>>(
                self,
                deserializer: D,
            ) -> Result<Value, D::Error> {
                Value::deserialize(deserializer)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Value::Other("a list"))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Value::Other("a map"))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

const DURATION: &str = "a duration such as \"250ms\", \"2s\" or \"1m\"";

fn duration(value: Value) -> Result<Duration, String> {
    match value {
        Value::Str(s) => humantime_serde::re::humantime::parse_duration(s.trim())
            .map_err(|e| format!("expected {DURATION}, got {s:?} ({e})")),
        Value::Int(_) | Value::Float(_) => Err(format!(
            "expected {DURATION}, got {value}: a number needs a unit"
        )),
        other => Err(format!("expected {DURATION}, got {other}")),
    }
}

fn optional_duration(value: Value) -> Result<Option<Duration>, String> {
    match value {
        Value::Null => Ok(None),
        value => duration(value).map(Some),
    }
}

fn whole<T: TryFrom<i128> + Bounded>(value: Value) -> Result<T, String> {
    let expected = || format!("expected a whole number within 0 and {}", T::MAX);
    let n = match value {
        Value::Int(n) => n,
        Value::Str(ref s) => s
            .trim()
            .parse::<i128>()
            .map_err(|_| format!("{}, got {value}", expected()))?,
        other => return Err(format!("{}, got {other}", expected())),
    };
    T::try_from(n).map_err(|_| format!("{}, got {n}", expected()))
}

/// The largest value of an unsigned integer type, for messages.
trait Bounded {
    const MAX: u128;
}

impl Bounded for u32 {
    const MAX: u128 = u32::MAX as u128;
}

impl Bounded for usize {
    const MAX: u128 = usize::MAX as u128;
}

fn number(value: Value) -> Result<f64, String> {
    match value {
        Value::Int(n) => Ok(n as f64),
        Value::Float(x) => Ok(x),
        Value::Str(ref s) => s
            .trim()
            .parse()
            .map_err(|_| format!("expected a number, got {value}")),
        other => Err(format!("expected a number, got {other}")),
    }
}

fn boolean(value: Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(b),
        Value::Str(s) if s == "true" => Ok(true),
        Value::Str(s) if s == "false" => Ok(false),
        other => Err(format!("expected true or false, got {other}")),
    }
}

fn frames(value: Value) -> Result<Frames, String> {
    let names = || {
        Frames::NAMES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match value {
        Value::Str(s) => Frames::NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, frames)| *frames)
            .ok_or_else(|| format!("expected one of {}, got {s:?}", names())),
        other => Err(format!("expected one of {}, got {other}", names())),
    }
}

/// Reads the value of `field` with `convert`; an error names the field.
fn field<'de, D, T>(
    deserializer: D,
    field: &str,
    convert: fn(Value) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let value = Value::deserialize(deserializer)
        .map_err(|e| de::Error::custom(format_args!("invalid `{field}`: {e}")))?;
    convert(value)
        .map_err(|problem| de::Error::custom(format_args!("invalid `{field}`: {problem}")))
}

macro_rules! fields {
    ($($name:ident: $ty:ty = $convert:expr, $path:literal;)*) => {$(
        fn $name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<$ty, D::Error> {
            field(deserializer, $path, $convert)
        }
    )*};
}

fields! {
    de_stream_max_concurrent: usize = whole, "stream_max_concurrent";
    de_max_wait: Option<Duration> = optional_duration, "max_wait";
    de_max_queued: Option<usize> = |v| match v {
        Value::Null => Ok(None),
        v => whole(v).map(Some),
    }, "max_queued";
    de_first_chunk_timeout: Duration = duration, "first_chunk_timeout";
    de_stream_idle_timeout: Duration = duration, "stream_idle_timeout";
    de_frames: Frames = frames, "frames";
    de_retry_enabled: bool = boolean, "stream_retry.enabled";
    de_max_attempts: u32 = whole, "stream_retry.max_attempts";
    de_initial_delay: Duration = duration, "stream_retry.initial_delay";
    de_max_delay: Duration = duration, "stream_retry.max_delay";
    de_retry_maybe_processed: bool = boolean, "stream_retry.retry_maybe_processed";
    de_budget_enabled: Option<bool> = |v| boolean(v).map(Some), "stream_retry.budget.enabled";
    de_ttl: Option<Duration> = |v| duration(v).map(Some), "stream_retry.budget.ttl";
    de_min_per_sec: Option<u32> = |v| whole(v).map(Some), "stream_retry.budget.min_per_sec";
    de_retry_ratio: Option<f64> = |v| number(v).map(Some), "stream_retry.budget.retry_ratio";
    de_rate_per_sec: Option<u32> = |v| whole(v).map(Some), "stream_retry.budget.rate_per_sec";
    de_burst: Option<u32> = |v| whole(v).map(Some), "stream_retry.budget.burst";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Detector, Progress};

    fn parse(json: &str) -> Config {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    #[test]
    fn disabled_retry_makes_one_attempt_and_keeps_the_first_chunk_timeout() {
        let layers = parse(r#"{"stream_retry": {"enabled": false}, "first_chunk_timeout": "5s"}"#)
            .layer("test")
            .unwrap();
        assert_eq!(layers.policy().get_max_attempts(), 1);
        assert_eq!(
            layers.policy().get_first_chunk_timeout(),
            Duration::from_secs(5)
        );
        assert!(layers.budget().is_none(), "no retries, no budget");
    }

    #[test]
    fn the_policy_takes_the_configured_values() {
        let layers = parse(
            r#"{"stream_retry": {"max_attempts": 5, "initial_delay": "100ms", "max_delay": "100ms"},
                "first_chunk_timeout": "1m"}"#,
        )
        .layer("test")
        .unwrap();
        let policy = layers.policy();
        assert_eq!(policy.get_max_attempts(), 5);
        assert_eq!(policy.get_first_chunk_timeout(), Duration::from_secs(60));
        // initial == max: every retry's ceiling is 100 ms.
        for retry in 0..8 {
            assert!(policy.backoff_delay(retry) <= Duration::from_millis(100));
        }
    }

    #[test]
    fn frames_build_their_detector() {
        let cases = [
            ("auto", "Auto"),
            ("sse", "Sse"),
            ("ndjson", "NdJson"),
            ("json_array", "JsonArray"),
            ("eventstream", "EventStream"),
            ("first_data", "FirstData"),
        ];
        for (name, variant) in cases {
            let config = parse(&format!(r#"{{"frames": "{name}"}}"#));
            assert_eq!(config.frames.name(), name);
            let detector = format!("{:?}", config.frames.detector());
            assert!(detector.starts_with(variant), "{name}: {detector}");
        }
        // Explicit JSON arrays are strict: `[]` is malformed, unlike under `auto`.
        let mut strict = Frames::JsonArray.detector();
        assert!(matches!(strict.feed(b"[]"), Progress::Malformed(_)));
    }

    #[test]
    fn rename_keeps_the_problem() {
        let error = rename(
            ConfigError::new("ttl", "must be within 1s and 60s"),
            "a.b.ttl",
        );
        assert_eq!(error.setting(), "a.b.ttl");
        assert_eq!(
            error.to_string(),
            "invalid `a.b.ttl`: must be within 1s and 60s"
        );
    }

    #[test]
    fn a_token_bucket_maps_onto_the_same_reserve() {
        for (rate, burst) in [
            (5u32, 20u32),
            (3, 10),
            (1, 1),
            (1, 60),
            (7, 400),
            (1000, 1001),
        ] {
            let budget = Budget {
                rate_per_sec: Some(rate),
                burst: Some(burst),
                ..Budget::default()
            };
            let built = budget.build().unwrap().unwrap();
            assert_eq!(built.min_per_sec(), rate);
            assert_eq!(built.retry_ratio(), 0.0);
            assert_eq!(
                built.available(),
                u64::from(burst),
                "rate {rate}, burst {burst}"
            );
            let ttl = built.ttl().as_secs_f64();
            let exact = f64::from(burst) / f64::from(rate);
            assert!(ttl >= exact && ttl < exact + 0.001, "{ttl} vs {exact}");
        }
    }
}
