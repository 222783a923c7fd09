//! Make a request body replayable, up to a cap, so that it can be retried.
//!
//! # Why
//!
//! [`FirstChunkRetry`](crate::retry::FirstChunkRetry) sends a copy of the request on each
//! attempt, so the request body must be `Clone`. A client building its own requests
//! uses `Full<Bytes>` and is done. A proxy or gateway is not: the body it forwards
//! (axum's `Body`, hyper's `Incoming`) is a stream that can be read once. Buffering
//! every body to make it cloneable would let one large upload take any amount of
//! memory.
//!
//! # How
//!
//! [`BufferRequestBodyLayer`] reads the request body before the call, up to a cap:
//!
//! - a body that ends within the cap is held as bytes: the request goes on with a
//!   [`ReplayBody`] that every attempt can send again;
//! - a larger body goes on as it is (what was read first, then the rest of the stream),
//!   with the [`NotReplayable`](crate::retry::NotReplayable) extension, so the retry
//!   layer sends it once;
//! - a body that fails while being read fails the call with its error, before anything
//!   is sent upstream.
//!
//! Put it outside the other layers, so that a slow upload does not hold a
//! concurrency slot:
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_stream_backpressure::{
//!     BufferRequestBodyLayer, FirstChunkRetryLayer, RetryPolicy, StreamConcurrencyLayer,
//! };
//!
//! let layers = ServiceBuilder::new()
//!     .layer(BufferRequestBodyLayer::new(256 * 1024))
//!     .layer(StreamConcurrencyLayer::new(100))
//!     .layer(FirstChunkRetryLayer::new(RetryPolicy::default()));
//! # let _ = layers;
//! ```

mod body;
mod future;
mod layer;
mod service;

pub use self::body::ReplayBody;
pub use self::future::ResponseFuture;
pub use self::layer::BufferRequestBodyLayer;
pub use self::service::BufferRequestBody;

#[cfg(test)]
mod tests;
