use std::borrow::Cow;
use std::sync::Arc;

use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::service::Shared;
use super::{FirstChunkRetry, RetryPolicy};
use crate::ConfigError;
use crate::frame::{Auto, Detector};
use crate::metrics::{RetryMetrics, Telemetry};

/// Applies [`FirstChunkRetry`] to a service: retries before the first chunk, never
/// after.
///
/// Layers and policies are `#[must_use]`: a builder call whose result is dropped is a
/// warning, not a silent no-op.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// use tower_stream_backpressure::RetryPolicy;
///
/// let policy = RetryPolicy::default();
/// policy.clone().max_attempts(5); // the policy with 5 attempts is dropped here
/// ```
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
#[must_use = "a layer does nothing until it wraps a service"]
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
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let upstream = {
    ///     let calls = calls.clone();
    ///     service_fn(move |_: http::Request<()>| {
    ///         // Overloaded once, then fine.
    ///         let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 { 503 } else { 200 };
    ///         let response = http::Response::builder().status(status);
    ///         async move { response.body(Full::new(Bytes::from("data"))) }
    ///     })
    /// };
    /// let client = FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let response = client.oneshot(http::Request::new(())).await?;
    /// assert_eq!(response.status(), 200);
    /// assert_eq!(calls.load(Ordering::SeqCst), 2);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new(policy: RetryPolicy) -> Self {
        Self::try_new(policy).unwrap_or_else(|error| panic!("FirstChunkRetryLayer: {error}"))
    }

    /// Like [`new`](Self::new), but returns an error naming the setting out of range.
    ///
    /// ```
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// // `max_attempts` read from configuration.
    /// let max_attempts: u32 = "0".parse()?;
    /// let policy = RetryPolicy::default().max_attempts(max_attempts);
    /// let error = FirstChunkRetryLayer::try_new(policy).unwrap_err();
    /// assert_eq!(error.setting(), "max_attempts");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_new(policy: RetryPolicy) -> Result<Self, ConfigError> {
        policy.validate()?;
        Ok(Self {
            shared: Arc::new(Shared::new(policy, Auto::default())),
            telemetry: Telemetry::default(),
        })
    }
}

/// The default policy, with the [`Auto`] detector.
///
/// ```
/// use tower_stream_backpressure::FirstChunkRetryLayer;
///
/// let layer = FirstChunkRetryLayer::default();
/// assert_eq!(layer.policy().get_max_attempts(), 3);
/// ```
impl Default for FirstChunkRetryLayer<Auto> {
    fn default() -> Self {
        Self::new(RetryPolicy::default())
    }
}

impl<D: Detector> FirstChunkRetryLayer<D> {
    /// What the first chunk is: a [`Detector`] from [`frame`](crate::frame), or your
    /// own (default [`Auto`], which picks one by `Content-Type`).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::frame::JsonArray;
    /// use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind};
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// // This upstream should stream a JSON array, but sends an object.
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     let body = Full::new(Bytes::from(r#"{"error":"bad request"}"#));
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(body))
    /// });
    /// let client = FirstChunkRetryLayer::new(RetryPolicy::default())
    ///     .frames(JsonArray::default())
    ///     .layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    /// let error = error.downcast_ref::<FirstChunkError>().expect("a first-chunk error");
    /// assert_eq!(error.kind(), FirstChunkErrorKind::Malformed);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn frames<D2: Detector>(self, detector: D2) -> FirstChunkRetryLayer<D2> {
        FirstChunkRetryLayer {
            shared: Arc::new(Shared::new(self.shared.policy.clone(), detector)),
            telemetry: self.telemetry,
        }
    }

    /// The `provider` attribute of this layer's metrics (default `"unknown"`). See
    /// [`metrics`](crate::metrics) for reading them back.
    ///
    /// ```
    /// use tower_stream_backpressure::FirstChunkRetryLayer;
    ///
    /// let layer = FirstChunkRetryLayer::default().provider("openai");
    /// # let _ = layer;
    /// ```
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        Self {
            telemetry: self.telemetry.with_provider(provider),
            ..self
        }
    }

    /// The meter this layer records to (default: the global meter provider's, taken
    /// when the layer first builds a service). See [`metrics`](crate::metrics) for an
    /// SDK meter provider read back in a test.
    ///
    /// ```
    /// use tower_stream_backpressure::FirstChunkRetryLayer;
    ///
    /// let layer = FirstChunkRetryLayer::default().meter(opentelemetry::global::meter("my-client"));
    /// # let _ = layer;
    /// ```
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            telemetry: self.telemetry.with_meter(meter),
            ..self
        }
    }

    /// The detector in force (see [`frames`](Self::frames)).
    ///
    /// ```
    /// use tower_stream_backpressure::frame::JsonArray;
    /// use tower_stream_backpressure::FirstChunkRetryLayer;
    ///
    /// let layer = FirstChunkRetryLayer::default().frames(JsonArray::default());
    /// let _strict: &JsonArray = layer.get_frames();
    /// ```
    pub fn get_frames(&self) -> &D {
        &self.shared.detector
    }

    /// The policy in force.
    ///
    /// ```
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let layer = FirstChunkRetryLayer::new(RetryPolicy::default().max_attempts(5));
    /// // E.g. to log the settings in force at startup.
    /// let settings = format!("{:?}", layer.policy());
    /// assert!(settings.contains("max_attempts: 5"), "{settings}");
    /// ```
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
