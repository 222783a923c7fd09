use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::Meter;
use tokio::sync::Semaphore;
use tower_layer::Layer;

use super::service::Shared;
use super::StreamConcurrency;
use crate::metrics::{ConcurrencyMetrics, Telemetry};
use crate::ConfigError;

/// Applies [`StreamConcurrency`] to a service: at most `limit` streams open at once,
/// each holding its slot until its response body ends.
///
/// Every service made from one layer, and every clone of those, shares one limit.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::StreamConcurrencyLayer;
///
/// let layer = StreamConcurrencyLayer::new(100)
///     .max_wait(Duration::from_secs(2))
///     .provider("openai");
/// assert_eq!(layer.available_slots(), 100);
/// ```
#[derive(Debug, Clone)]
pub struct StreamConcurrencyLayer {
    shared: Arc<Shared>,
    telemetry: Telemetry<ConcurrencyMetrics>,
}

impl StreamConcurrencyLayer {
    /// A limit of `limit` concurrent streams, waiting without bound for a slot (until
    /// the caller drops the call).
    ///
    /// # Panics
    ///
    /// When `limit` is 0 or above [`Semaphore::MAX_PERMITS`]. A limit of 0 is not
    /// "unlimited": to have no limit, leave the layer out. Use
    /// [`try_new`](Self::try_new) for a limit read from configuration.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(2);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let open = service.oneshot(http::Request::new(())).await?;
    /// assert_eq!(layer.available_slots(), 1, "one stream open");
    /// drop(open);
    /// assert_eq!(layer.available_slots(), 2);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new(limit: usize) -> Self {
        Self::try_new(limit).unwrap_or_else(|error| panic!("StreamConcurrencyLayer: {error}"))
    }

    /// Like [`new`](Self::new), but returns an error for a limit out of range.
    ///
    /// ```
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// assert!(StreamConcurrencyLayer::try_new(0).is_err());
    /// assert!(StreamConcurrencyLayer::try_new(8).is_ok());
    /// ```
    pub fn try_new(limit: usize) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new(
                "limit",
                "must be at least 1 (0 is not unlimited: to have no limit, leave the layer out)",
            ));
        }
        if limit > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "limit",
                format!("must be at most {}, got {limit}", Semaphore::MAX_PERMITS),
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                semaphore: Arc::new(Semaphore::new(limit)),
                limit,
                max_wait: None,
            }),
            telemetry: Telemetry::default(),
        })
    }

    /// How long a call may wait for a slot before it fails with
    /// [`Rejected`](super::Rejected) ([`RejectReason::DeadlineExceeded`]).
    /// `Duration::ZERO` fails at once when every slot is held. Without it, a call
    /// waits until its caller drops it. A [`MaxWait`](super::MaxWait) request extension
    /// overrides it for one call.
    ///
    /// [`RejectReason::DeadlineExceeded`]: super::RejectReason::DeadlineExceeded
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{Rejected, StreamConcurrencyLayer};
    ///
    /// let layer = StreamConcurrencyLayer::new(1).max_wait(Duration::from_secs(2));
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let open = service.clone().oneshot(http::Request::new(())).await?;
    /// // The second call queues for up to 2 s; nobody frees the slot, so it fails.
    /// let started = tokio::time::Instant::now();
    /// let error = service.clone().oneshot(http::Request::new(())).await.unwrap_err();
    /// assert!(error.is::<Rejected>());
    /// assert!(started.elapsed() >= Duration::from_secs(2));
    /// drop(open);
    /// assert!(service.oneshot(http::Request::new(())).await.is_ok());
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn max_wait(self, max_wait: Duration) -> Self {
        let shared = Arc::new(Shared {
            semaphore: self.shared.semaphore.clone(),
            limit: self.shared.limit,
            max_wait: Some(max_wait),
        });
        Self { shared, ..self }
    }

    /// The `provider` attribute of this layer's metrics (default `"unknown"`).
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use opentelemetry::metrics::MeterProvider as _;
    /// use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    /// use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let exporter = InMemoryMetricExporter::default();
    /// let provider = SdkMeterProvider::builder()
    ///     .with_reader(PeriodicReader::builder(exporter.clone()).build())
    ///     .build();
    /// let layer = StreamConcurrencyLayer::new(10)
    ///     .provider("openai")
    ///     .meter(provider.meter("my-client"));
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _open = service.oneshot(http::Request::new(())).await?;
    ///
    /// provider.force_flush()?;
    /// let exported = exporter.get_finished_metrics()?;
    /// let in_flight = exported
    ///     .iter()
    ///     .flat_map(|m| m.scope_metrics())
    ///     .flat_map(|s| s.metrics())
    ///     .find(|metric| metric.name() == "streams_in_flight")
    ///     .map(|metric| metric.data());
    /// let Some(AggregatedMetrics::I64(MetricData::Sum(in_flight))) = in_flight else {
    ///     panic!("no streams_in_flight");
    /// };
    /// let point = in_flight.data_points().next().unwrap();
    /// assert_eq!(point.value(), 1);
    /// let attribute = point.attributes().find(|kv| kv.key.as_str() == "provider");
    /// assert_eq!(attribute.unwrap().value.as_str(), "openai");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        Self {
            telemetry: self.telemetry.with_provider(provider),
            ..self
        }
    }

    /// The meter this layer records to (default: the global meter provider's, taken
    /// when the layer first builds a service).
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use opentelemetry::metrics::MeterProvider as _;
    /// use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let exporter = InMemoryMetricExporter::default();
    /// let provider = SdkMeterProvider::builder()
    ///     .with_reader(PeriodicReader::builder(exporter.clone()).build())
    ///     .build();
    /// let layer = StreamConcurrencyLayer::new(10).meter(provider.meter("my-client"));
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _open = service.oneshot(http::Request::new(())).await?;
    ///
    /// provider.force_flush()?;
    /// let exported = exporter.get_finished_metrics()?;
    /// let names: Vec<_> = exported
    ///     .iter()
    ///     .flat_map(|m| m.scope_metrics())
    ///     .flat_map(|s| s.metrics())
    ///     .map(|metric| metric.name().to_owned())
    ///     .collect();
    /// assert!(names.iter().any(|name| name == "streams_in_flight"));
    /// assert!(names.iter().any(|name| name == "stream_concurrency_wait"));
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            telemetry: self.telemetry.with_meter(meter),
            ..self
        }
    }

    /// Slots free right now, shared with every service made from this layer.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(4);
    /// let inner = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// // Two services of one layer share its slots.
    /// let (a, b) = (layer.layer(inner.clone()), layer.layer(inner));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _one = a.oneshot(http::Request::new(())).await?;
    /// let _two = b.oneshot(http::Request::new(())).await?;
    /// assert_eq!(layer.available_slots(), 2);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn available_slots(&self) -> usize {
        self.shared.semaphore.available_permits()
    }
}

impl<S> Layer<S> for StreamConcurrencyLayer {
    type Service = StreamConcurrency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let metrics = self.telemetry.instruments(ConcurrencyMetrics::new);
        StreamConcurrency::new(inner, self.shared.clone(), metrics)
    }
}
