use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use super::IdleTimeout;
use super::future::Slot;
use super::idle::{Sweep, Watch};
use crate::body::ReleaseOnEnd;

pin_project! {
    /// Response body of [`StreamConcurrency`](super::StreamConcurrency): the inner body,
    /// carrying the concurrency slot until the stream ends.
    ///
    /// With [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer) below, the retry
    /// layer's body carries the slot instead, under the same rule, and this one passes
    /// frames on (see the [module docs](super), "One body wrapper").
    ///
    /// The slot is released exactly once, at the earliest of: the end of the body, a
    /// body error, trailers, a data frame after which `is_end_stream()` is true, or
    /// the drop of this body. A consumer that read to the end but keeps the body object
    /// does not hold the slot. Frames and size hints pass through unchanged; errors are
    /// the inner body's, boxed.
    ///
    /// With [`idle_timeout`](super::StreamConcurrencyLayer::idle_timeout), a body that
    /// its consumer neither polls nor drops for that long (after it handed out a frame)
    /// is ended for it: the inner body is dropped, the slot released, and the next poll
    /// returns [`IdleTimeout`](super::IdleTimeout).
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
        stream: Stream<B>,
    }
}

pin_project! {
    #[project = StreamProj]
    #[derive(Debug)]
    enum Stream<B> {
        /// The inner body, polled in place.
        Direct {
            #[pin]
            inner: B,
            slot: ReleaseOnEnd<Slot>,
        },
        /// The inner body, whose own wrapper carries the slot: a retry layer below took
        /// it (see the module docs, "One body wrapper"). Frames pass as they come.
        ///
        /// Dropped once it returns an error or its end: a layer between the two that
        /// ends the stream itself (a body timeout) would otherwise leave the slot held,
        /// inside the retry layer's body, until this body is dropped. Not the slot's
        /// whole rule (trailers, a last data frame): asking `is_end_stream()` after each
        /// frame here measured 116 instructions a frame against 91, for a layer that
        /// ends a stream in neither way, whose slot the drop of the body still frees.
        Passed {
            #[pin]
            inner: Option<B>,
        },
        /// The inner body under the idle sweep, which may end it (see `idle`).
        Watched {
            watch: Arc<Watch<B>>,
            // The timeout was reported: the body has ended.
            reported: bool,
        },
    }
}

impl<B: Body> ResponseBody<B> {
    /// `slot` is `None` when a retry layer below carries it in `inner`.
    pub(crate) fn new(inner: B, slot: Option<Slot>, sweep: Option<&Arc<Sweep>>) -> Self
    where
        B: Send + 'static,
    {
        let Some(slot) = slot else {
            return Self {
                stream: Stream::Passed { inner: Some(inner) },
            };
        };
        let ended = inner.is_end_stream();
        let slot = ReleaseOnEnd::new(slot, ended);
        let stream = match sweep {
            Some(sweep) if !ended => Stream::Watched {
                watch: sweep.watch(inner, slot),
                reported: false,
            },
            _ => Stream::Direct { inner, slot },
        };
        Self { stream }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().stream.project() {
            StreamProj::Direct { mut inner, slot } => {
                let poll = inner.as_mut().poll_frame(cx);
                let inner = inner.as_ref();
                boxed(slot.pass(poll, || inner.is_end_stream()))
            }
            StreamProj::Passed { mut inner } => {
                let Some(body) = inner.as_mut().as_pin_mut() else {
                    return Poll::Ready(None);
                };
                let poll = body.poll_frame(cx);
                if matches!(poll, Poll::Ready(None | Some(Err(_)))) {
                    inner.set(None);
                }
                boxed(poll)
            }
            StreamProj::Watched { watch, reported } => poll_watched(watch, reported, cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.stream {
            Stream::Direct { inner, .. } => inner.is_end_stream(),
            Stream::Passed { inner } => inner.as_ref().is_none_or(B::is_end_stream),
            Stream::Watched { watch, reported } => match watch.open.try_lock() {
                Some(open) => match open.as_ref() {
                    Some(open) => open.body.is_end_stream(),
                    // Timed out: the end once the error has been returned.
                    None => *reported,
                },
                // The sweep is ending it: its error is still to come.
                None => false,
            },
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.stream {
            Stream::Direct { inner, .. } => inner.size_hint(),
            Stream::Passed { inner } => inner
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), B::size_hint),
            Stream::Watched { watch, .. } => watch
                .open
                .try_lock()
                .and_then(|open| open.as_ref().map(|open| open.body.size_hint()))
                .unwrap_or_default(),
        }
    }
}

/// Boxes a body error (out of line: the path every frame takes only moves the frame).
#[inline(always)]
fn boxed<D, E: Into<BoxError>>(
    poll: Poll<Option<Result<Frame<D>, E>>>,
) -> Poll<Option<Result<Frame<D>, BoxError>>> {
    match poll {
        Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(box_error(error)))),
        // A data frame is moved as its data alone: the whole `Frame` is as large as
        // its trailers variant, three times the data.
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        },
        Poll::Ready(None) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }
}

#[cold]
#[inline(never)]
fn box_error<E: Into<BoxError>>(error: E) -> BoxError {
    error.into()
}

/// A poll of a body under the idle sweep: the body's lock held for the poll, and the
/// stream's state noted for the sweep.
fn poll_watched<B>(
    watch: &Watch<B>,
    reported: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<B::Data>, BoxError>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if *reported {
        return Poll::Ready(None);
    }
    // Not to be had: the sweep is ending this stream right now.
    let mut locked = watch.open.try_lock();
    let Some(open) = locked.as_deref_mut().and_then(Option::as_mut) else {
        *reported = true;
        return Poll::Ready(Some(Err(Box::new(IdleTimeout::new(watch.timeout)))));
    };
    let poll = open.body.as_mut().poll_frame(cx);
    let body = open.body.as_ref();
    let poll = open.slot.pass(poll, || body.is_end_stream());
    match &poll {
        Poll::Pending => watch.polled(false),
        Poll::Ready(Some(Ok(_))) if open.slot.is_held() => watch.polled(true),
        // The end of the stream: the slot is released, nothing left to time out.
        Poll::Ready(_) => watch.over(),
    }
    boxed(poll)
}
