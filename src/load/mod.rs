//! Load that lasts until the end of the stream, for tower's balancers.
//!
//! # Why
//!
//! `tower::balance` picks the endpoint with the least load, as measured by
//! [`PendingRequests`](tower::load::PendingRequests) (calls in flight) or
//! [`PeakEwma`](tower::load::PeakEwma) (latency, weighted by calls in flight). Both count
//! a call until a *handle* is dropped, and which moment that is is a
//! [`TrackCompletion`]'s choice. tower's only one,
//! [`CompleteOnResponse`](tower::load::CompleteOnResponse), drops it when the response
//! future resolves: at the response headers. An LLM upstream sends those at once and
//! then streams for seconds or minutes, so an endpoint holding a hundred open streams
//! looks idle to the balancer, and gets the next call too.
//!
//! # How
//!
//! [`CompleteOnEndOfStream`] moves the handle into the response body
//! ([`ResponseBody`]), which drops it when the stream ends, by the rule the concurrency
//! slot follows: the end of the body, an error, trailers, a last data frame after which
//! `is_end_stream()` is true, or the body dropped. So an endpoint's load is its open
//! streams, and its latency is measured to the end of each stream.
//!
//! A body wrapper of its own: the handle is tower's type, taken where tower's load
//! service makes the call, below any of our layers.
//!
//! Feature `load`.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::load::{Load, PendingRequests};
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_stream_backpressure::load::CompleteOnEndOfStream;
//!
//! let endpoint = service_fn(|_: http::Request<()>| async {
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data: {}\n\n"))))
//! });
//! let mut endpoint = PendingRequests::new(endpoint, CompleteOnEndOfStream);
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let response = endpoint.ready().await?.call(http::Request::new(())).await?;
//! let pending = |endpoint: &PendingRequests<_, _>| format!("{:?}", endpoint.load());
//! assert_eq!(pending(&endpoint), "Count(1)", "the stream is open: it still counts");
//! let mut body = response.into_body();
//! body.frame().await.unwrap()?;
//! assert_eq!(pending(&endpoint), "Count(0)", "the stream ended");
//! # Ok::<(), tower::BoxError>(())
//! # })?;
//! # Ok::<(), tower::BoxError>(())
//! ```

mod body;

pub use self::body::ResponseBody;

use http::Response;
use http_body::Body;
use tower::load::TrackCompletion;

/// A [`TrackCompletion`] that keeps a call's load until its response body ends, not
/// until its headers: the handle rides in the body ([`ResponseBody`]). See the
/// [module docs](self).
///
/// Give it to [`PendingRequests::new`](tower::load::PendingRequests::new) or
/// [`PeakEwma::new`](tower::load::PeakEwma::new) in place of tower's
/// `CompleteOnResponse`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompleteOnEndOfStream;

impl<H, B: Body> TrackCompletion<H, Response<B>> for CompleteOnEndOfStream {
    type Output = Response<ResponseBody<B, H>>;

    fn track_completion(&self, handle: H, response: Response<B>) -> Self::Output {
        response.map(|body| ResponseBody::new(body, handle))
    }
}
