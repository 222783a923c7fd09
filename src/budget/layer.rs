use std::borrow::Cow;

use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::{RetryBudget, WithRetryBudget};
use crate::metrics::{self, Telemetry};

/// Applies [`WithRetryBudget`] to a service: each request deposits into `budget` and
/// carries the budget to the retry layer below.
///
/// One budget can be shared by many layers and services; the budget, not the layer,
/// holds the counts.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy};
///
/// let budget = RetryBudget::default();
/// let stack = ServiceBuilder::new()
///     .layer(RetryBudgetLayer::new(budget.clone()).provider("openai"))
///     .layer(FirstChunkRetryLayer::new(RetryPolicy::default()).provider("openai"));
/// # let _ = stack;
/// ```
#[derive(Debug, Clone)]
pub struct RetryBudgetLayer {
    budget: RetryBudget,
    telemetry: Telemetry<()>,
}

impl RetryBudgetLayer {
    /// Deposits into, and hands down, `budget`.
    pub fn new(budget: RetryBudget) -> Self {
        Self {
            budget,
            telemetry: Telemetry::default(),
        }
    }

    /// The `provider` attribute of `stream_retry_budget_available` (default
    /// `"unknown"`).
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        Self {
            telemetry: self.telemetry.with_provider(provider),
            ..self
        }
    }

    /// The meter the budget gauge is registered with (default: the global meter
    /// provider's, taken when the layer first builds a service).
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            telemetry: self.telemetry.with_meter(meter),
            ..self
        }
    }

    /// The budget this layer deposits into.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }
}

impl<S> Layer<S> for RetryBudgetLayer {
    type Service = WithRetryBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // The gauge reads the budget at collection time; it is registered once per
        // layer, however many services the layer builds.
        self.telemetry.instruments(|meter, provider| {
            metrics::observe_budget(meter, provider, self.budget.clone());
        });
        WithRetryBudget::new(inner, self.budget.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider;
    use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};

    #[test]
    fn the_gauge_is_registered_once_per_layer() {
        // With no reader the SDK keeps no callbacks at all.
        let provider = SdkMeterProvider::builder()
            .with_reader(ManualReader::builder().build())
            .build();
        let budget = RetryBudget::default();
        let layer = RetryBudgetLayer::new(budget.clone()).meter(provider.meter("test"));
        let services: Vec<_> = (0..10).map(|_| layer.layer(())).collect();
        drop(services);
        // Ours, the layer's, and one gauge callback's.
        assert_eq!(budget.handles(), 3);

        // A changed layer is a new set of instruments: one more callback.
        let renamed = layer.clone().provider("other");
        let _ = (renamed.layer(()), renamed.layer(()));
        assert_eq!(
            budget.handles(),
            5,
            "+ the renamed layer's and its callback's"
        );
    }
}
