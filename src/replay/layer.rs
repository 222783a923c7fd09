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
    pub fn new(limit: usize) -> Self {
        Self::try_new(limit).unwrap_or_else(|error| panic!("BufferRequestBodyLayer: {error}"))
    }

    /// Like [`new`](Self::new), but returns an error naming the setting out of range.
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
