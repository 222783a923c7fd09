use std::borrow::Cow;
use std::sync::Arc;

use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::service::Shared;
use super::{FirstChunkRetry, RetryPolicy};
use crate::frame::{Auto, Detector};
use crate::metrics::{RetryMetrics, Telemetry};
use crate::ConfigError;

/// Applies [`FirstChunkRetry`] to a service: retries before the first chunk, never
/// after.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::{frame::Sse, FirstChunkRetryLayer, RetryPolicy};
///
/// let layer = FirstChunkRetryLayer::new(
///     RetryPolicy::default().first_chunk_timeout(Duration::from_secs(10)),
/// )
/// // Always SSE, whatever the `Content-Type`, with another keep-alive event.
/// .frames(Sse::new().keep_alive_events(["ping", "heartbeat"]))
/// .provider("openai");
/// # let _ = layer;
/// ```
#[derive(Debug)]
pub struct FirstChunkRetryLayer<D = Auto> {
    shared: Arc<Shared<D>>,
    telemetry: Telemetry<RetryMetrics>,
}

impl<D> Clone for FirstChunkRetryLayer<D> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            telemetry: self.telemetry.clone(),
        }
    }
}

impl FirstChunkRetryLayer<Auto> {
    /// Retries by `policy`, finding the first chunk with the [`Auto`] detector (by
    /// `Content-Type`).
    ///
    /// # Panics
    ///
    /// When a setting of `policy` is out of range (see [`RetryPolicy::validate`]). Use
    /// [`try_new`](Self::try_new) for a policy read from configuration.
    pub fn new(policy: RetryPolicy) -> Self {
        Self::try_new(policy).unwrap_or_else(|error| panic!("FirstChunkRetryLayer: {error}"))
    }

    /// Like [`new`](Self::new), but returns an error naming the setting out of range.
    pub fn try_new(policy: RetryPolicy) -> Result<Self, ConfigError> {
        policy.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                policy,
                detector: Auto::default(),
            }),
            telemetry: Telemetry::default(),
        })
    }
}

impl<D: Detector> FirstChunkRetryLayer<D> {
    /// What the first chunk is: a [`Detector`] from [`frame`](crate::frame), or your
    /// own (default [`Auto`], which picks one by `Content-Type`).
    pub fn frames<D2: Detector>(self, detector: D2) -> FirstChunkRetryLayer<D2> {
        FirstChunkRetryLayer {
            shared: Arc::new(Shared {
                policy: self.shared.policy.clone(),
                detector,
            }),
            telemetry: self.telemetry,
        }
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

    /// The policy in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.shared.policy
    }
}

impl<S, D> Layer<S> for FirstChunkRetryLayer<D> {
    type Service = FirstChunkRetry<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        let metrics = self.telemetry.instruments(RetryMetrics::new);
        FirstChunkRetry::new(inner, self.shared.clone(), metrics)
    }
}
