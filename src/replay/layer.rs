use tower_layer::Layer;

use super::BufferRequestBody;
use crate::ConfigError;

/// Applies [`BufferRequestBody`]: request bodies up to `limit` bytes become
/// replayable; larger ones stream through and are sent once.
///
/// ```
/// use tower_stream_backpressure::BufferRequestBodyLayer;
///
/// let layer = BufferRequestBodyLayer::new(64 * 1024);
/// assert_eq!(layer.limit(), 64 * 1024);
/// assert!(BufferRequestBodyLayer::try_new(0).is_err());
/// ```
#[derive(Debug, Clone, Copy)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct BufferRequestBodyLayer {
    limit: usize,
}

impl BufferRequestBodyLayer {
    /// Holds request bodies of up to `limit` bytes.
    ///
    /// # Panics
    ///
    /// When `limit` is 0. Use [`try_new`](Self::try_new) for a value from
    /// configuration.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::replay::ReplayBody;
    /// use tower_stream_backpressure::BufferRequestBodyLayer;
    ///
    /// let service = BufferRequestBodyLayer::new(1024).layer(service_fn(
    ///     |request: http::Request<ReplayBody<Full<Bytes>>>| async move {
    ///         Ok::<_, Infallible>(request.body().is_replayable())
    ///     },
    /// ));
    /// let request = http::Request::new(Full::new(Bytes::from(r#"{"stream":true}"#)));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// assert!(service.oneshot(request).await?, "16 bytes fit in 1 KiB");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new(limit: usize) -> Self {
        Self::try_new(limit).unwrap_or_else(|error| panic!("BufferRequestBodyLayer: {error}"))
    }

    /// Like [`new`](Self::new), but returns an error naming the setting out of range.
    ///
    /// ```
    /// use tower_stream_backpressure::BufferRequestBodyLayer;
    ///
    /// // A limit read from configuration.
    /// let limit: usize = "0".parse()?;
    /// let error = BufferRequestBodyLayer::try_new(limit).unwrap_err();
    /// assert_eq!(error.setting(), "limit");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_new(limit: usize) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new(
                "limit",
                "must be above zero (without a buffer, leave the layer out)",
            ));
        }
        Ok(Self { limit })
    }

    /// The largest body held.
    ///
    /// ```
    /// use tower_stream_backpressure::BufferRequestBodyLayer;
    ///
    /// assert_eq!(BufferRequestBodyLayer::new(256 * 1024).limit(), 262_144);
    /// ```
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl<S> Layer<S> for BufferRequestBodyLayer {
    type Service = BufferRequestBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferRequestBody::new(inner, self.limit)
    }
}
