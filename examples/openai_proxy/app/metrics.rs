//! The proxy's metrics, for `/metrics`.

use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// The metrics: an OpenTelemetry meter provider whose one reader is a Prometheus
/// exporter, read back as text by `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

impl Metrics {
    pub fn new() -> Result<Self, String> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|error| format!("cannot build the Prometheus exporter: {error}"))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Ok(Self { provider, registry })
    }

    /// The meter the layers record to.
    pub fn meter(&self) -> Meter {
        self.provider.meter("openai_proxy")
    }

    /// Every metric, in the Prometheus text format.
    pub fn text(&self) -> String {
        let mut text = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(error) =
            prometheus::Encoder::encode(&encoder, &self.registry.gather(), &mut text)
        {
            return format!("# cannot encode the metrics: {error}\n");
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}
