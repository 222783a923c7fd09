//! The settings, their defaults, and the checks that turn them into layers.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::StreamLayers;
use super::fields::{read, some};
use crate::frame::{self, AnyDetector};
use crate::{
    ConfigError, FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};

/// Back-pressure for the streaming calls to one provider, as read from a configuration
/// file. See the [module docs](super) for the format.
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
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Streams open at once (default 0: no limit, and no concurrency layer). A slot is
    /// held until the stream ends, across every retry.
    pub stream_max_concurrent: usize,
    /// How long a call may wait for a slot before it fails with
    /// [`Rejected`](crate::Rejected) (default `None`: until the caller drops it; `0s`
    /// fails at once when every slot is held). Unused without `stream_max_concurrent`.
    pub max_wait: Option<Duration>,
    /// How many calls may wait for a slot at once; the next fails at once with
    /// [`Rejected`](crate::Rejected) (`queue_full`) (default `None`: no bound, each
    /// call's `max_wait` decides). Unused without `stream_max_concurrent`.
    pub max_queued: Option<usize>,
    /// Retry before the first chunk.
    pub stream_retry: StreamRetry,
    /// How long one attempt may take from its start to its first chunk, before it
    /// counts as stalled and is retried (default 30 s). Above zero.
    pub first_chunk_timeout: Duration,
    /// How long the caller may wait for the next frame of a body, once the first chunk
    /// has arrived (default 30 s). Above zero. Keep-alives count as frames.
    pub stream_idle_timeout: Duration,
    /// What the first chunk is (default [`Frames::Auto`]).
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

/// [`Config`] as serde reads it: its [`Deserialize`](serde::Deserialize) runs this
/// through [`path`](super::path), which names the field of an error in full.
///
/// Its fields are `Config`'s, one for one: serde's `remote` derive builds a `Config`
/// from them, so that one missing here does not compile.
#[derive(Deserialize)]
#[serde(
    remote = "Config",
    default = "Config::default",
    deny_unknown_fields,
    expecting = "a map of stream settings (`stream_max_concurrent`, `stream_retry`, ...)"
)]
pub(super) struct ConfigFields {
    #[serde(deserialize_with = "read")]
    stream_max_concurrent: usize,
    #[serde(deserialize_with = "read")]
    max_wait: Option<Duration>,
    #[serde(deserialize_with = "read")]
    max_queued: Option<usize>,
    stream_retry: StreamRetry,
    #[serde(deserialize_with = "read")]
    first_chunk_timeout: Duration,
    #[serde(deserialize_with = "read")]
    stream_idle_timeout: Duration,
    #[serde(deserialize_with = "read")]
    frames: Frames,
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
    #[serde(deserialize_with = "read")]
    pub enabled: bool,
    /// Attempts in all, the first included (default 3; the Go runtime's was 2). At
    /// least 1.
    #[serde(deserialize_with = "read")]
    pub max_attempts: u32,
    /// The backoff before the first retry is random within 0 and this (default 250 ms);
    /// the ceiling doubles with each retry. At most `max_delay`.
    #[serde(deserialize_with = "read")]
    pub initial_delay: Duration,
    /// The highest backoff ceiling (default 2 s).
    #[serde(deserialize_with = "read")]
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
    #[serde(deserialize_with = "read")]
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
/// `burst`, mapped as the [module docs](super#the-budget) say), not both.
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
    #[serde(deserialize_with = "some")]
    pub enabled: Option<bool>,
    /// The window over which requests and retries count (default 10 s), within 1 s and
    /// 60 s.
    #[serde(deserialize_with = "some")]
    pub ttl: Option<Duration>,
    /// Retries a second always allowed (default 10).
    #[serde(deserialize_with = "some")]
    pub min_per_sec: Option<u32>,
    /// Retries allowed per request, beyond the `min_per_sec` reserve (default 0.2),
    /// within 0 and 1000.
    #[serde(deserialize_with = "some")]
    pub retry_ratio: Option<f64>,
    /// The token bucket's refill rate, in retries a second: a whole number, at least 1.
    #[serde(deserialize_with = "some")]
    pub rate_per_sec: Option<u32>,
    /// The token bucket's size: the retries available at once. Within `rate_per_sec`
    /// and `60 * rate_per_sec`.
    #[serde(deserialize_with = "some")]
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
    pub(super) const NAMES: [(&'static str, Frames); 6] = [
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
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    RATE,
                    "must be given with `burst` (the token bucket takes both)",
                ));
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
