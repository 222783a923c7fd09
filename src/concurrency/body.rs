use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::future::Slot;
use crate::body::ReleaseOnEnd;

pin_project! {
    /// Response body of [`StreamConcurrency`](super::StreamConcurrency): the inner body,
    /// carrying the concurrency slot until the stream ends.
    ///
    /// The slot is released exactly once, at the earliest of: the end of the body, a
    /// body error, trailers, a data frame after which `is_end_stream()` is true, or
    /// the drop of this body. A consumer that read to the end but keeps the body object
    /// does not hold the slot. Frames, errors and size hints pass through unchanged.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::concurrency::ResponseBody;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(1);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data: {}\n\n"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let response = service.oneshot(http::Request::new(())).await?;
    /// let mut body: ResponseBody<Full<Bytes>> = response.into_body();
    /// assert_eq!(layer.available_slots(), 0);
    /// let frame = body.frame().await.unwrap()?;
    /// assert_eq!(frame.into_data().unwrap(), "data: {}\n\n");
    /// // That was the last frame: the slot is free, though `body` is still alive.
    /// assert_eq!(layer.available_slots(), 1);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        slot: ReleaseOnEnd<Slot>,
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn new(inner: B, slot: Slot) -> Self {
        let ended = inner.is_end_stream();
        Self {
            inner,
            slot: ReleaseOnEnd::new(slot, ended),
        }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let poll = this.inner.as_mut().poll_frame(cx);
        let inner = this.inner.as_ref();
        this.slot.pass(poll, || inner.is_end_stream())
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
