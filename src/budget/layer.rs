use std::borrow::Cow;
use std::sync::Arc;

use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::service::Placement;
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
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RetryBudgetLayer {
    budget: RetryBudget,
    telemetry: Telemetry<()>,
    /// Shared by every service the layer builds, so that it warns once if misplaced.
    placement: Arc<Placement>,
}

impl RetryBudgetLayer {
    /// Deposits into, and hands down, `budget`.
    ///
    /// Each request through a service of this layer deposits once into `budget` (or
    /// the clone it shares counts with):
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{RetryBudget, RetryBudgetLayer};
    ///
    /// // No reserve, one retry per request.
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    /// let layer = RetryBudgetLayer::new(budget.clone());
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(()))
    /// }));
    /// assert_eq!(budget.available(), 0);
    ///
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// service.clone().oneshot(http::Request::new(())).await?;
    /// service.oneshot(http::Request::new(())).await?;
    /// # Ok::<(), Infallible>(())
    /// # })?;
    /// assert_eq!(budget.available(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(budget: RetryBudget) -> Self {
        Self {
            budget,
            telemetry: Telemetry::default(),
            placement: Arc::new(Placement::new(Cow::Borrowed("unknown"))),
        }
    }

    /// The `provider` attribute of this layer's metrics (default `"unknown"`). See
    /// [`metrics`](crate::metrics) for reading them back.
    ///
    /// ```
    /// use tower_stream_backpressure::RetryBudgetLayer;
    ///
    /// let layer = RetryBudgetLayer::default().provider("openai");
    /// # let _ = layer;
    /// ```
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        let provider = provider.into();
        Self {
            placement: Arc::new(Placement::new(provider.clone())),
            telemetry: self.telemetry.with_provider(provider),
            ..self
        }
    }

    /// The meter this layer records to (default: the global meter provider's, taken
    /// when the layer first builds a service). See [`metrics`](crate::metrics) for an
    /// SDK meter provider read back in a test.
    ///
    /// ```
    /// use tower_stream_backpressure::RetryBudgetLayer;
    ///
    /// let layer = RetryBudgetLayer::default().meter(opentelemetry::global::meter("my-client"));
    /// # let _ = layer;
    /// ```
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            telemetry: self.telemetry.with_meter(meter),
            ..self
        }
    }

    /// The budget this layer deposits into.
    ///
    /// ```
    /// use tower_stream_backpressure::{RetryBudget, RetryBudgetLayer};
    ///
    /// let layer = RetryBudgetLayer::new(RetryBudget::default());
    /// assert_eq!(layer.budget().retry_ratio(), 0.2);
    /// // The default reserve: 10 retries a second over 10 s.
    /// assert_eq!(layer.budget().available(), 100);
    /// ```
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }
}

/// A layer with a budget of its own, [`RetryBudget::default`]: Finagle's defaults.
///
/// ```
/// use tower_stream_backpressure::RetryBudgetLayer;
///
/// let layer = RetryBudgetLayer::default();
/// assert_eq!(layer.budget().retry_ratio(), 0.2);
/// ```
impl Default for RetryBudgetLayer {
    fn default() -> Self {
        Self::new(RetryBudget::default())
    }
}

impl<S> Layer<S> for RetryBudgetLayer {
    type Service = WithRetryBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // The gauge reads the budget at collection time. The layer asks once, however
        // many services it builds; the budget registers it once per meter, however
        // many layers ask.
        self.telemetry.instruments(|meter, provider| {
            metrics::observe_budget(meter, provider, &self.budget);
        });
        WithRetryBudget::with_placement(inner, self.budget.clone(), self.placement.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider;
    use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};

    #[test]
    fn the_gauge_is_registered_once_per_budget_and_meter() {
        // With no reader the SDK keeps no callbacks at all.
        let provider = SdkMeterProvider::builder()
            .with_reader(ManualReader::builder().build())
            .build();
        let budget = RetryBudget::default();
        let layer = RetryBudgetLayer::new(budget.clone()).meter(provider.meter("test"));
        let services: Vec<_> = (0..10).map(|_| layer.layer(())).collect();
        drop(services);
        assert_eq!(budget.gauges(), 1);
        // Ours and the layer's: the gauge keeps no budget alive.
        assert_eq!(budget.handles(), 2);

        // Renamed, given the meter again, or another layer on the same budget: the
        // same budget on the same meter, no new callback.
        let _ = layer.clone().provider("other").layer(());
        let _ = layer.clone().meter(provider.meter("test")).layer(());
        let _ = RetryBudgetLayer::new(budget.clone())
            .meter(provider.meter("test"))
            .layer(());
        assert_eq!(budget.gauges(), 1);

        // Another meter (another scope) is another series: one more.
        let _ = layer.clone().meter(provider.meter("other")).layer(());
        let _ = layer.clone().meter(provider.meter("other")).layer(());
        assert_eq!(budget.gauges(), 2);
    }

    #[test]
    fn a_dropped_budget_is_freed_though_its_gauge_stays() {
        let provider = SdkMeterProvider::builder()
            .with_reader(ManualReader::builder().build())
            .build();
        let budget = RetryBudget::default();
        let weak = budget.downgrade();
        let layer = RetryBudgetLayer::new(budget).meter(provider.meter("test"));
        let service = layer.layer(());
        drop((layer, service));
        assert!(weak.upgrade().is_none(), "the gauge kept the budget alive");
    }
}
