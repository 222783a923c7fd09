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
    pub fn max_wait(self, max_wait: Duration) -> Self {
        let shared = Arc::new(Shared {
            semaphore: self.shared.semaphore.clone(),
            limit: self.shared.limit,
            max_wait: Some(max_wait),
        });
        Self { shared, ..self }
    }

    /// The `provider` attribute of this layer's metrics (default `"unknown"`).
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        Self {
            telemetry: self.telemetry.with_provider(provider),
            ..self
        }
    }

    /// The meter this layer records to (default: the global meter provider's, taken
    /// when the layer first builds a service).
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            telemetry: self.telemetry.with_meter(meter),
            ..self
        }
    }

    /// Slots free right now, shared with every service made from this layer.
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
