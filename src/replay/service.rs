use std::task::{Context, Poll};

use http::Request;
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

use super::{ReplayBody, ResponseFuture};

/// Reads each request body, up to a limit, before calling the inner service with a
/// [`ReplayBody`].
///
/// Made by [`BufferRequestBodyLayer`](super::BufferRequestBodyLayer); see the
/// [module docs](super).
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::replay::{BufferRequestBody, ReplayBody};
/// use tower_stream_backpressure::BufferRequestBodyLayer;
///
/// // Every attempt of a retry sends a clone of the body: each clone has every byte.
/// let inner = service_fn(|request: http::Request<ReplayBody<Full<Bytes>>>| async move {
///     let copy = request.body().clone().collect().await?.to_bytes();
///     Ok::<_, tower::BoxError>(copy)
/// });
/// let service: BufferRequestBody<_> = BufferRequestBodyLayer::new(1024).layer(inner);
/// let request = http::Request::new(Full::new(Bytes::from("hello")));
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// assert_eq!(service.oneshot(request).await?, "hello");
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct BufferRequestBody<S> {
    inner: S,
    limit: usize,
}

impl<S> BufferRequestBody<S> {
    pub(crate) fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }

    /// The inner service.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, ServiceBuilder};
    /// use tower_stream_backpressure::replay::ReplayBody;
    /// use tower_stream_backpressure::{BufferRequestBodyLayer, StreamConcurrencyLayer};
    ///
    /// let client = service_fn(|_: http::Request<ReplayBody<Full<Bytes>>>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// let service = ServiceBuilder::new()
    ///     .layer(BufferRequestBodyLayer::new(64 * 1024))
    ///     .layer(StreamConcurrencyLayer::new(100))
    ///     .service(client);
    /// assert_eq!(service.get_ref().available_slots(), 100);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes this service, returning the inner one.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, ServiceBuilder};
    /// use tower_stream_backpressure::concurrency::StreamConcurrency;
    /// use tower_stream_backpressure::replay::ReplayBody;
    /// use tower_stream_backpressure::{BufferRequestBodyLayer, StreamConcurrencyLayer};
    ///
    /// let client = service_fn(|_: http::Request<ReplayBody<Full<Bytes>>>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// });
    /// let service = ServiceBuilder::new()
    ///     .layer(BufferRequestBodyLayer::new(64 * 1024))
    ///     .layer(StreamConcurrencyLayer::new(100))
    ///     .service(client);
    /// let limited: StreamConcurrency<_> = service.into_inner();
    /// assert_eq!(limited.available_slots(), 100);
    /// ```
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for BufferRequestBody<S>
where
    S: Service<Request<ReplayBody<B>>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    /// Always ready: every call waits for its request body first, so the call drives a
    /// clone of the inner service ready once the body is read, and holds none of its
    /// readiness while it reads.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        ResponseFuture::new(self.inner.clone(), request, self.limit)
    }
}
