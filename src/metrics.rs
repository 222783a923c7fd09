//! OpenTelemetry instruments: every metric the layers record, in one place.
//!
//! Each layer takes [`.meter(Meter)`](crate::StreamConcurrencyLayer::meter) (default: a
//! meter of the global meter provider, scope [`SCOPE`], taken when the layer first
//! builds a service) and [`.provider(name)`](crate::StreamConcurrencyLayer::provider)
//! (default `"unknown"`). Every instrument carries the attribute `provider`.
//!
//! Exported through `opentelemetry-prometheus` with its default settings, the metrics
//! are named:
//!
//! | Prometheus name | type | recorded |
//! |---|---|---|
//! | `streams_in_flight` | gauge | +1 when a concurrency slot is taken, -1 when it is released (end of stream) |
//! | `provider_calls_in_flight` | gauge | +1 per upstream attempt, -1 when the attempt fails or its body ends or drops |
//! | `stream_first_chunk_latency_seconds` | histogram | first attempt start to first chunk found |
//! | `stream_retries_total{outcome,reason}` | counter | see [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer); nothing when retry is disabled |
//! | `stream_hedges_total{outcome}` | counter | hedged attempts ([`RetryPolicy::hedge`](crate::RetryPolicy::hedge)): `won` (it delivered the first chunk), `lost` (it did not), `budget_exhausted` (the budget refused it) |
//! | `stream_retry_budget_available` | gauge | the budget's [`available()`](crate::RetryBudget::available), read at collection: one series per budget and meter (the first layer's `provider`), none once the budget is dropped |
//! | `stream_concurrency_limit` | gauge | the limit in force: fixed, or where [`StreamConcurrencyLayer::adaptive`](crate::StreamConcurrencyLayer::adaptive) moved it |
//! | `stream_concurrency_rejections_total{reason}` | counter | `deadline_exceeded`, `queue_full`, `rate_limited` or `context_canceled` |
//! | `stream_rate_limit_wait_seconds` | histogram | time a call was held by a spent rate limit ([`pace_on_rate_limits`](crate::StreamConcurrencyLayer::pace_on_rate_limits)) |
//! | `stream_concurrency_wait_seconds` | histogram | time waited for a slot, granted or not (0 when granted at once) |
//! | `http_client_open_connections` | gauge | +1 when a connector wrapped by `ConnectionGaugeLayer` (feature `connection-gauge`) connects, -1 when that connection's IO is dropped |
//! | `stream_fallbacks_total{from,to,reason}` | counter | a call moved from target `from` to target `to` of a [`Fallback`](crate::fallback::Fallback); `reason`: `rejected`, `first_chunk`, `error`, `status` or `cooldown` |
//!
//! The constants below are the OpenTelemetry instrument names; the exporter adds the
//! `_seconds` unit suffix (unit `s`) and the `_total` counter suffix.
//!
//! `streams_in_flight` and `provider_calls_in_flight` are observable up-down counters:
//! calls add to an atomic count and the SDK reads it at each collection, so a call pays
//! an atomic add, not an SDK lookup, for the four changes it makes to them. That took
//! the per-call cost with an SDK meter provider and a Prometheus exporter from 1.31
//! times the cost without one to the figure in the README's Performance table.
//!
//! Every layer's `.provider(name)` and `.meter(meter)` work alike; here, read back in a
//! test through the SDK's in-memory exporter:
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use opentelemetry::metrics::MeterProvider as _;
//! use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
//! use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_stream_backpressure::StreamConcurrencyLayer;
//!
//! let exporter = InMemoryMetricExporter::default();
//! let meters = SdkMeterProvider::builder()
//!     .with_reader(PeriodicReader::builder(exporter.clone()).build())
//!     .build();
//! let layer = StreamConcurrencyLayer::new(10)
//!     .provider("openai")
//!     .meter(meters.meter("my-client"));
//! let service = layer.layer(service_fn(|_: http::Request<()>| async {
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
//! }));
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! let _open = service.oneshot(http::Request::new(())).await?;
//!
//! meters.force_flush()?;
//! let exported = exporter.get_finished_metrics()?;
//! let in_flight = exported
//!     .iter()
//!     .flat_map(|m| m.scope_metrics())
//!     .flat_map(|s| s.metrics())
//!     .find(|metric| metric.name() == "streams_in_flight")
//!     .map(|metric| metric.data());
//! let Some(AggregatedMetrics::I64(MetricData::Sum(in_flight))) = in_flight else {
//!     panic!("no streams_in_flight");
//! };
//! let point = in_flight.data_points().next().unwrap();
//! assert_eq!(point.value(), 1, "the stream is open");
//! let attribute = point.attributes().find(|kv| kv.key.as_str() == "provider");
//! assert_eq!(attribute.unwrap().value.as_str(), "openai");
//! # Ok::<(), tower::BoxError>(())
//! # })?;
//! # Ok::<(), tower::BoxError>(())
//! ```

use std::borrow::Cow;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

#[cfg(feature = "connection-gauge")]
use opentelemetry::metrics::UpDownCounter;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::{InstrumentationScope, KeyValue};

use crate::RejectReason;

/// Instrumentation scope name of the meter taken from the global provider.
///
/// ```
/// use tower_stream_backpressure::metrics::SCOPE;
///
/// assert_eq!(SCOPE, "tower-stream-backpressure");
/// ```
pub const SCOPE: &str = "tower-stream-backpressure";

/// Gauge of concurrency slots held (streams open through the limit).
///
/// ```
/// use tower_stream_backpressure::metrics::STREAMS_IN_FLIGHT;
///
/// assert_eq!(STREAMS_IN_FLIGHT, "streams_in_flight");
/// ```
pub const STREAMS_IN_FLIGHT: &str = "streams_in_flight";
/// Gauge of upstream attempts open (a retry counts as a new attempt).
///
/// ```
/// use tower_stream_backpressure::metrics::PROVIDER_CALLS_IN_FLIGHT;
///
/// assert_eq!(PROVIDER_CALLS_IN_FLIGHT, "provider_calls_in_flight");
/// ```
pub const PROVIDER_CALLS_IN_FLIGHT: &str = "provider_calls_in_flight";
/// Histogram (seconds) from the first attempt's start to the first chunk.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_FIRST_CHUNK_LATENCY;
///
/// assert_eq!(STREAM_FIRST_CHUNK_LATENCY, "stream_first_chunk_latency");
/// // Exported to Prometheus as `stream_first_chunk_latency_seconds`.
/// ```
pub const STREAM_FIRST_CHUNK_LATENCY: &str = "stream_first_chunk_latency";
/// Counter of retry outcomes, attributes `outcome` and `reason`.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_RETRIES;
///
/// assert_eq!(STREAM_RETRIES, "stream_retries");
/// // Exported to Prometheus as `stream_retries_total`.
/// ```
pub const STREAM_RETRIES: &str = "stream_retries";
/// Counter of hedged attempts, attribute `outcome`: `won`, `lost` or
/// `budget_exhausted`.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_HEDGES;
///
/// assert_eq!(STREAM_HEDGES, "stream_hedges");
/// // Exported to Prometheus as `stream_hedges_total`.
/// ```
pub const STREAM_HEDGES: &str = "stream_hedges";
/// Observable gauge of the retries a budget would allow now.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_RETRY_BUDGET_AVAILABLE;
///
/// assert_eq!(STREAM_RETRY_BUDGET_AVAILABLE, "stream_retry_budget_available");
/// ```
pub const STREAM_RETRY_BUDGET_AVAILABLE: &str = "stream_retry_budget_available";
/// Observable gauge of a concurrency layer's limit in force: the fixed one, or where an
/// adaptive one has moved.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_CONCURRENCY_LIMIT;
///
/// assert_eq!(STREAM_CONCURRENCY_LIMIT, "stream_concurrency_limit");
/// ```
pub const STREAM_CONCURRENCY_LIMIT: &str = "stream_concurrency_limit";
/// Histogram of the time calls were held at a concurrency layer by a spent rate limit
/// ([`pace_on_rate_limits`](crate::StreamConcurrencyLayer::pace_on_rate_limits)), in
/// seconds, whether they were sent after or turned away.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_RATE_LIMIT_WAIT;
///
/// assert_eq!(STREAM_RATE_LIMIT_WAIT, "stream_rate_limit_wait");
/// // Exported to Prometheus as `stream_rate_limit_wait_seconds`.
/// ```
pub const STREAM_RATE_LIMIT_WAIT: &str = "stream_rate_limit_wait";
/// Counter of calls that got no concurrency slot, attribute `reason`.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_CONCURRENCY_REJECTIONS;
///
/// assert_eq!(STREAM_CONCURRENCY_REJECTIONS, "stream_concurrency_rejections");
/// // Exported to Prometheus as `stream_concurrency_rejections_total`.
/// ```
pub const STREAM_CONCURRENCY_REJECTIONS: &str = "stream_concurrency_rejections";
/// Histogram (seconds) of the time spent waiting for a concurrency slot.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_CONCURRENCY_WAIT;
///
/// assert_eq!(STREAM_CONCURRENCY_WAIT, "stream_concurrency_wait");
/// // Exported to Prometheus as `stream_concurrency_wait_seconds`.
/// ```
pub const STREAM_CONCURRENCY_WAIT: &str = "stream_concurrency_wait";
/// Gauge of client connections open (made and not yet dropped).
///
/// ```
/// use tower_stream_backpressure::metrics::HTTP_CLIENT_OPEN_CONNECTIONS;
///
/// assert_eq!(HTTP_CLIENT_OPEN_CONNECTIONS, "http_client_open_connections");
/// ```
pub const HTTP_CLIENT_OPEN_CONNECTIONS: &str = "http_client_open_connections";
/// Counter of calls a [`Fallback`](crate::fallback::Fallback) moved from one target to
/// the next, attributes `from`, `to` and `reason`.
///
/// ```
/// use tower_stream_backpressure::metrics::STREAM_FALLBACKS;
///
/// assert_eq!(STREAM_FALLBACKS, "stream_fallbacks");
/// // Exported to Prometheus as `stream_fallbacks_total`.
/// ```
pub const STREAM_FALLBACKS: &str = "stream_fallbacks";

/// Bucket boundaries of `stream_first_chunk_latency_seconds`.
///
/// ```
/// use tower_stream_backpressure::metrics::FIRST_CHUNK_LATENCY_BUCKETS;
///
/// // In seconds: from 100 ms to 5 minutes.
/// assert_eq!(FIRST_CHUNK_LATENCY_BUCKETS.first(), Some(&0.1));
/// assert_eq!(FIRST_CHUNK_LATENCY_BUCKETS.last(), Some(&300.0));
/// ```
pub const FIRST_CHUNK_LATENCY_BUCKETS: [f64; 11] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Bucket boundaries of `stream_concurrency_wait_seconds`.
///
/// ```
/// use tower_stream_backpressure::metrics::CONCURRENCY_WAIT_BUCKETS;
///
/// // In seconds: from 1 ms to a minute.
/// assert_eq!(CONCURRENCY_WAIT_BUCKETS.first(), Some(&0.001));
/// assert_eq!(CONCURRENCY_WAIT_BUCKETS.last(), Some(&60.0));
/// ```
pub const CONCURRENCY_WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

const PROVIDER: &str = "provider";

/// Where a layer records: the meter and the `provider` attribute.
///
/// Instruments are built once per layer, the first time the layer builds a service, and
/// shared by every service and clone made from it. Changing the meter or the provider
/// on the layer starts a fresh set.
#[derive(Debug)]
pub(crate) struct Telemetry<T> {
    meter: Option<Meter>,
    provider: Cow<'static, str>,
    built: Arc<OnceLock<Arc<T>>>,
}

// Manual impl: cloning shares the built instruments and needs no `T: Clone`.
impl<T> Clone for Telemetry<T> {
    fn clone(&self) -> Self {
        Self {
            meter: self.meter.clone(),
            provider: self.provider.clone(),
            built: self.built.clone(),
        }
    }
}

impl<T> Default for Telemetry<T> {
    fn default() -> Self {
        Self {
            meter: None,
            provider: Cow::Borrowed("unknown"),
            built: Arc::default(),
        }
    }
}

impl<T> Telemetry<T> {
    pub(crate) fn with_meter(self, meter: Meter) -> Self {
        Self {
            meter: Some(meter),
            provider: self.provider,
            built: Arc::default(),
        }
    }

    pub(crate) fn with_provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        Self {
            meter: self.meter,
            provider: provider.into(),
            built: Arc::default(),
        }
    }

    /// The instruments, built on first use with `build(meter, provider attribute)`.
    pub(crate) fn instruments(&self, build: impl FnOnce(&Meter, KeyValue) -> T) -> Arc<T> {
        self.built
            .get_or_init(|| {
                let meter = self.meter.clone().unwrap_or_else(global_meter);
                let provider = KeyValue::new(PROVIDER, self.provider.clone());
                Arc::new(build(&meter, provider))
            })
            .clone()
    }
}

fn global_meter() -> Meter {
    opentelemetry::global::meter_with_scope(
        InstrumentationScope::builder(SCOPE)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    )
}

fn with(provider: &KeyValue, key: &'static str, value: &'static str) -> [KeyValue; 2] {
    [provider.clone(), KeyValue::new(key, value)]
}

/// Whether two meters are one: `Meter` has no identity of its own, but the SDK hands
/// out one implementation per provider and scope, and every handle on a meter reaches
/// it. Its address is the meter's identity.
pub(crate) fn same_meter(a: &Meter, b: &Meter) -> bool {
    // Making a builder registers nothing: only `build` does.
    let (a, b) = (a.i64_observable_gauge(""), b.i64_observable_gauge(""));
    std::ptr::addr_eq(a.instrument_provider, b.instrument_provider)
}

/// A count of things open (`streams_in_flight`, `provider_calls_in_flight`): an atomic
/// that calls add to, reported by an observable up-down counter read at collection.
///
/// Why not a synchronous `UpDownCounter`: every `add` on the SDK's looks its attribute
/// set up in a map under a lock; the two in-flight counts took four of the six
/// recordings a call made, and with an SDK meter provider and a Prometheus exporter
/// installed, the three layers cost 1.31 times as much per call as with none. An atomic
/// add is all a call pays now; the series, its name, type and values are the same.
///
/// Layers that record the same count with the same meter and `provider` share one
/// atomic and one callback, so their counts add up as they did on one counter (two
/// callbacks observing one series would report one of them). The callback holds the
/// count weakly: once every layer recording it is gone, it reports nothing.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AtomicI64>);

struct Registered {
    meter: Meter,
    name: &'static str,
    provider: String,
    count: Weak<AtomicI64>,
}

static REGISTERED: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

impl InFlight {
    fn new(
        meter: &Meter,
        name: &'static str,
        description: &'static str,
        provider: &KeyValue,
    ) -> Self {
        let value = provider.value.as_str();
        let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
        // Counts whose layers are all gone have nothing left to report.
        registered.retain(|known| known.count.strong_count() > 0);
        let known = registered.iter().find(|known| {
            known.name == name && known.provider == value && same_meter(&known.meter, meter)
        });
        if let Some(count) = known.and_then(|known| known.count.upgrade()) {
            return Self(count);
        }
        let count = Arc::new(AtomicI64::new(0));
        let observed = Arc::downgrade(&count);
        let attributes = [provider.clone()];
        meter
            .i64_observable_up_down_counter(name)
            .with_description(description)
            .with_callback(move |observer| {
                if let Some(count) = observed.upgrade() {
                    observer.observe(count.load(Ordering::Relaxed), &attributes);
                }
            })
            .build();
        registered.push(Registered {
            meter: meter.clone(),
            name,
            provider: value.into_owned(),
            count: Arc::downgrade(&count),
        });
        Self(count)
    }

    #[inline]
    fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// Instruments of [`StreamConcurrencyLayer`](crate::StreamConcurrencyLayer).
#[derive(Debug)]
pub(crate) struct ConcurrencyMetrics {
    in_flight: InFlight,
    rejections: Counter<u64>,
    wait: Histogram<f64>,
    paced: Histogram<f64>,
    provider: [KeyValue; 1],
    deadline_exceeded: [KeyValue; 2],
    queue_full: [KeyValue; 2],
    rate_limited: [KeyValue; 2],
    context_canceled: [KeyValue; 2],
}

impl ConcurrencyMetrics {
    pub(crate) fn new(meter: &Meter, provider: KeyValue) -> Self {
        Self {
            in_flight: InFlight::new(
                meter,
                STREAMS_IN_FLIGHT,
                "Concurrency slots held: streams open through the limit",
                &provider,
            ),
            rejections: meter
                .u64_counter(STREAM_CONCURRENCY_REJECTIONS)
                .with_description("Calls that got no concurrency slot, by reason")
                .build(),
            wait: meter
                .f64_histogram(STREAM_CONCURRENCY_WAIT)
                .with_description("Time spent waiting for a concurrency slot, granted or not")
                .with_unit("s")
                .with_boundaries(CONCURRENCY_WAIT_BUCKETS.to_vec())
                .build(),
            paced: meter
                .f64_histogram(STREAM_RATE_LIMIT_WAIT)
                .with_description("Time calls were held at the layer by a spent rate limit")
                .with_unit("s")
                .with_boundaries(CONCURRENCY_WAIT_BUCKETS.to_vec())
                .build(),
            deadline_exceeded: with(&provider, "reason", RejectReason::DeadlineExceeded.as_str()),
            queue_full: with(&provider, "reason", RejectReason::QueueFull.as_str()),
            rate_limited: with(&provider, "reason", RejectReason::RateLimited.as_str()),
            context_canceled: with(&provider, "reason", "context_canceled"),
            provider: [provider],
        }
    }

    /// The `provider` attribute's value, for log events.
    pub(crate) fn provider(&self) -> std::borrow::Cow<'_, str> {
        self.provider[0].value.as_str()
    }

    pub(crate) fn slot_taken(&self, waited: Duration) {
        self.in_flight.add(1);
        self.wait.record(waited.as_secs_f64(), &self.provider);
    }

    pub(crate) fn slot_released(&self) {
        self.in_flight.add(-1);
    }

    /// The call was rejected: its deadline passed while waiting, or the queue was full.
    pub(crate) fn rejected(&self, reason: RejectReason, waited: Duration) {
        let attributes = match reason {
            RejectReason::DeadlineExceeded => &self.deadline_exceeded,
            RejectReason::QueueFull => &self.queue_full,
            RejectReason::RateLimited => &self.rate_limited,
        };
        self.rejections.add(1, attributes);
        self.wait.record(waited.as_secs_f64(), &self.provider);
    }

    /// A call was held by a spent rate limit for `held`, sent or not.
    pub(crate) fn paced(&self, held: Duration) {
        self.paced.record(held.as_secs_f64(), &self.provider);
    }

    /// The caller dropped the call while waiting.
    pub(crate) fn context_canceled(&self, waited: Duration) {
        self.rejections.add(1, &self.context_canceled);
        self.wait.record(waited.as_secs_f64(), &self.provider);
    }
}

/// How a retry ended, the `outcome` attribute of `stream_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryOutcome {
    /// A retried attempt got its first chunk (or a response that is not a failure).
    Success,
    /// A retried attempt failed.
    Failed,
    /// A call gave up because `max_attempts` was reached.
    Exhausted,
    /// A call gave up because the budget refused a retry.
    BudgetExhausted,
}

impl RetryOutcome {
    const ALL: [RetryOutcome; 4] = [
        RetryOutcome::Success,
        RetryOutcome::Failed,
        RetryOutcome::Exhausted,
        RetryOutcome::BudgetExhausted,
    ];

    fn label(self) -> &'static str {
        match self {
            RetryOutcome::Success => "success",
            RetryOutcome::Failed => "failed",
            RetryOutcome::Exhausted => "exhausted",
            RetryOutcome::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// The failure that called for a retry, the `reason` attribute of
/// `stream_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryReason {
    /// A retryable status (or `x-should-retry: true`).
    Status,
    /// A transient inner-service error (connect failure, reset, GOAWAY).
    Upstream,
    /// The body failed before the first chunk.
    Body,
    /// The body ended before the first chunk.
    EndOfStream,
    /// No first chunk within `first_chunk_timeout`.
    Timeout,
    /// The first chunk was a transient in-band error.
    InBandError,
}

impl RetryReason {
    const ALL: [RetryReason; 6] = [
        RetryReason::Status,
        RetryReason::Upstream,
        RetryReason::Body,
        RetryReason::EndOfStream,
        RetryReason::Timeout,
        RetryReason::InBandError,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            RetryReason::Status => "status",
            RetryReason::Upstream => "upstream_error",
            RetryReason::Body => "body_error",
            RetryReason::EndOfStream => "end_of_stream",
            RetryReason::Timeout => "timeout",
            RetryReason::InBandError => "in_band_error",
        }
    }
}

/// How a hedged attempt ended, the `outcome` attribute of `stream_hedges_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HedgeOutcome {
    /// The hedge delivered the call's first chunk.
    Won,
    /// Another attempt did, or none did.
    Lost,
    /// The budget refused the hedge, which never started.
    BudgetExhausted,
}

impl HedgeOutcome {
    const ALL: [HedgeOutcome; 3] = [
        HedgeOutcome::Won,
        HedgeOutcome::Lost,
        HedgeOutcome::BudgetExhausted,
    ];

    fn label(self) -> &'static str {
        match self {
            HedgeOutcome::Won => "won",
            HedgeOutcome::Lost => "lost",
            HedgeOutcome::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// Instruments of [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer).
#[derive(Debug)]
pub(crate) struct RetryMetrics {
    calls_in_flight: InFlight,
    first_chunk_latency: Histogram<f64>,
    retries: Counter<u64>,
    hedges: Counter<u64>,
    provider: [KeyValue; 1],
    /// Indexed by outcome, then reason.
    retry_attrs: [[[KeyValue; 3]; 6]; 4],
    /// Indexed by outcome.
    hedge_attrs: [[KeyValue; 2]; 3],
}

impl RetryMetrics {
    pub(crate) fn new(meter: &Meter, provider: KeyValue) -> Self {
        Self {
            calls_in_flight: InFlight::new(
                meter,
                PROVIDER_CALLS_IN_FLIGHT,
                "Upstream attempts open, until their body ends",
                &provider,
            ),
            first_chunk_latency: meter
                .f64_histogram(STREAM_FIRST_CHUNK_LATENCY)
                .with_description("Time from the first attempt's start to the first chunk")
                .with_unit("s")
                .with_boundaries(FIRST_CHUNK_LATENCY_BUCKETS.to_vec())
                .build(),
            retries: meter
                .u64_counter(STREAM_RETRIES)
                .with_description("Retries before the first chunk, by outcome and the failure that called for them")
                .build(),
            retry_attrs: RetryOutcome::ALL.map(|outcome| {
                RetryReason::ALL.map(|reason| {
                    [
                        provider.clone(),
                        KeyValue::new("outcome", outcome.label()),
                        KeyValue::new("reason", reason.label()),
                    ]
                })
            }),
            hedges: meter
                .u64_counter(STREAM_HEDGES)
                .with_description("Hedged attempts before the first chunk, by outcome")
                .build(),
            hedge_attrs: HedgeOutcome::ALL
                .map(|outcome| [provider.clone(), KeyValue::new("outcome", outcome.label())]),
            provider: [provider],
        }
    }

    /// The `provider` attribute's value, for log events.
    pub(crate) fn provider(&self) -> std::borrow::Cow<'_, str> {
        self.provider[0].value.as_str()
    }

    pub(crate) fn call_started(&self) {
        self.calls_in_flight.add(1);
    }

    pub(crate) fn call_ended(&self) {
        self.calls_in_flight.add(-1);
    }

    pub(crate) fn first_chunk(&self, latency: Duration) {
        self.first_chunk_latency
            .record(latency.as_secs_f64(), &self.provider);
    }

    pub(crate) fn retry(&self, outcome: RetryOutcome, reason: RetryReason) {
        self.retries
            .add(1, &self.retry_attrs[outcome as usize][reason as usize]);
    }

    pub(crate) fn hedge(&self, outcome: HedgeOutcome) {
        self.hedges.add(1, &self.hedge_attrs[outcome as usize]);
    }
}

/// Instruments of [`ConnectionGaugeLayer`](crate::ConnectionGaugeLayer).
#[cfg(feature = "connection-gauge")]
#[derive(Debug)]
pub(crate) struct ConnectionMetrics {
    open: UpDownCounter<i64>,
    provider: [KeyValue; 1],
}

#[cfg(feature = "connection-gauge")]
impl ConnectionMetrics {
    pub(crate) fn new(meter: &Meter, provider: KeyValue) -> Self {
        Self {
            open: meter
                .i64_up_down_counter(HTTP_CLIENT_OPEN_CONNECTIONS)
                .with_description("Client connections open: made and not yet dropped")
                .build(),
            provider: [provider],
        }
    }

    pub(crate) fn opened(&self) {
        self.open.add(1, &self.provider);
    }

    pub(crate) fn closed(&self) {
        self.open.add(-1, &self.provider);
    }
}

/// The gauge of a concurrency layer's limit in force, read at collection, for as long
/// as the layer lives.
pub(crate) fn observe_limit(
    meter: &Meter,
    provider: KeyValue,
    shared: std::sync::Weak<crate::concurrency::Shared>,
) {
    let provider = [provider];
    meter
        .i64_observable_gauge(STREAM_CONCURRENCY_LIMIT)
        .with_description("The concurrency limit in force: fixed, or where an adaptive one moved")
        .with_callback(move |observer| {
            if let Some(shared) = shared.upgrade() {
                let limit = i64::try_from(shared.current_limit()).unwrap_or(i64::MAX);
                observer.observe(limit, &provider);
            }
        })
        .build();
}

/// Registers the observable `stream_retry_budget_available` gauge for one budget, once
/// per meter: a budget shared by several layers, renamed or given the meter again, is
/// one series, named by the first layer that registered it.
///
/// The SDK keeps a callback as long as the meter provider lives and cannot forget one,
/// so the callback holds no budget, only a weak handle: once every handle on the budget
/// is gone (a configuration reload dropped the old stack), its counts are freed and it
/// reports no series.
pub(crate) fn observe_budget(meter: &Meter, provider: KeyValue, budget: &crate::RetryBudget) {
    if !budget.first_gauge_on(meter) {
        return;
    }
    let provider = [provider];
    let budget = budget.downgrade();
    meter
        .i64_observable_gauge(STREAM_RETRY_BUDGET_AVAILABLE)
        .with_description("Retries the budget would allow now")
        .with_callback(move |observer| {
            if let Some(budget) = budget.upgrade() {
                let available = i64::try_from(budget.available()).unwrap_or(i64::MAX);
                observer.observe(available, &provider);
            }
        })
        .build();
}

/// Instruments of [`Fallback`](crate::fallback::Fallback).
#[derive(Debug)]
pub(crate) struct FallbackMetrics {
    fallbacks: Counter<u64>,
    provider: KeyValue,
}

impl FallbackMetrics {
    pub(crate) fn new(meter: &Meter, provider: KeyValue) -> Self {
        Self {
            fallbacks: meter
                .u64_counter(STREAM_FALLBACKS)
                .with_description("Calls moved from one fallback target to the next, by reason")
                .build(),
            provider,
        }
    }

    /// The `provider` attribute's value, for log events.
    pub(crate) fn provider(&self) -> std::borrow::Cow<'_, str> {
        self.provider.value.as_str()
    }

    /// A call moved from target `from` to target `to`. Target names are the user's, so
    /// the attributes are made here; it happens once per fallback, not per call.
    pub(crate) fn fallback(&self, from: &Arc<str>, to: &Arc<str>, reason: &'static str) {
        let attributes = [
            self.provider.clone(),
            KeyValue::new("from", from.clone()),
            KeyValue::new("to", to.clone()),
            KeyValue::new("reason", reason),
        ];
        self.fallbacks.add(1, &attributes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_stream_backpressure_testkit::Metrics;

    #[test]
    fn in_flight_counts_of_one_series_add_up_and_end_with_their_layers() {
        let metrics = Metrics::new();
        let meter = metrics.meter();
        let openai = KeyValue::new(PROVIDER, "openai");
        let anthropic = KeyValue::new(PROVIDER, "anthropic");
        let count = |name| InFlight::new(&meter, name, "", &openai);
        // Two layers of one provider share the count; another provider, or another
        // instrument, has its own.
        let (a, b) = (count(STREAMS_IN_FLIGHT), count(STREAMS_IN_FLIGHT));
        let calls = count(PROVIDER_CALLS_IN_FLIGHT);
        let other = InFlight::new(&meter, STREAMS_IN_FLIGHT, "", &anthropic);
        a.add(2);
        b.add(1);
        a.add(-1);
        calls.add(7);
        other.add(5);
        let snapshot = metrics.snapshot();
        let open = |snapshot: &tower_stream_backpressure_testkit::Snapshot, who| {
            snapshot.count(STREAMS_IN_FLIGHT, &[(PROVIDER, who)])
        };
        assert_eq!(open(&snapshot, "openai"), 2.0);
        assert_eq!(open(&snapshot, "anthropic"), 5.0);
        assert_eq!(snapshot.series(STREAMS_IN_FLIGHT), 2);
        assert_eq!(
            snapshot.count(PROVIDER_CALLS_IN_FLIGHT, &[(PROVIDER, "openai")]),
            7.0
        );

        // Once its layers are gone, a count reports nothing; a new layer starts anew.
        drop((a, b));
        let snapshot = metrics.snapshot();
        assert_eq!(open(&snapshot, "openai"), 0.0);
        let c = count(STREAMS_IN_FLIGHT);
        c.add(1);
        assert_eq!(open(&metrics.snapshot(), "openai"), 1.0);
        assert_eq!(metrics.snapshot().series(STREAMS_IN_FLIGHT), 2);
    }
}
