use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tower::BoxError;

/// A request body made replayable by
/// [`BufferRequestBody`](super::BufferRequestBody): the bytes it held, sent again by
/// every clone, or (when the body was over the cap) the bytes read first and then the
/// rest of the original stream, sent once.
///
/// Cloning a body that streams gives a body that fails at once with
/// "request body cannot be replayed": such requests carry
/// [`NotReplayable`](crate::retry::NotReplayable), so the retry layer never sends a
/// clone of them.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::replay::ReplayBody;
/// use tower_stream_backpressure::retry::NotReplayable;
/// use tower_stream_backpressure::BufferRequestBodyLayer;
///
/// // What the service below sees of a body over the cap.
/// let service = BufferRequestBodyLayer::new(4).layer(service_fn(
///     |request: http::Request<ReplayBody<Full<Bytes>>>| async move {
///         let once = request.extensions().get::<NotReplayable>().is_some();
///         Ok::<_, tower::BoxError>((request.body().is_replayable(), once))
///     },
/// ));
/// let request = http::Request::new(Full::new(Bytes::from("more than four bytes")));
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// assert_eq!(service.oneshot(request).await?, (false, true));
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Held {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Streaming {
        read: VecDeque<Bytes>,
        rest: B,
    },
    Unavailable,
}

/// The error of a clone of a body that streams.
#[derive(Debug)]
struct NotReplayable;

impl fmt::Display for NotReplayable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body cannot be replayed: it was over the buffer cap")
    }
}

impl std::error::Error for NotReplayable {}

impl<B> ReplayBody<B> {
    /// A body of these bytes (and trailers), replayable.
    pub(crate) fn held(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Held {
                data: Some(data).filter(|data| !data.is_empty()),
                trailers,
            },
        }
    }

    /// The bytes read so far, then the rest of `body`; sent once.
    pub(crate) fn streaming(read: VecDeque<Bytes>, rest: B) -> Self {
        Self {
            kind: Kind::Streaming { read, rest },
        }
    }

    /// Whether every clone of this body sends the same bytes.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::replay::ReplayBody;
    /// use tower_stream_backpressure::BufferRequestBodyLayer;
    ///
    /// let service = BufferRequestBodyLayer::new(1024).layer(service_fn(
    ///     |request: http::Request<ReplayBody<Full<Bytes>>>| async move {
    ///         Ok::<_, tower::BoxError>(request.body().is_replayable())
    ///     },
    /// ));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let small = http::Request::new(Full::new(Bytes::from("{}")));
    /// assert!(service.clone().oneshot(small).await?);
    /// let large = http::Request::new(Full::new(Bytes::from(vec![b' '; 2048])));
    /// assert!(!service.oneshot(large).await?);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn is_replayable(&self) -> bool {
        matches!(self.kind, Kind::Held { .. })
    }
}

impl<B> Clone for ReplayBody<B> {
    fn clone(&self) -> Self {
        let kind = match &self.kind {
            Kind::Held { data, trailers } => Kind::Held {
                data: data.clone(),
                trailers: trailers.clone(),
            },
            Kind::Streaming { .. } | Kind::Unavailable => Kind::Unavailable,
        };
        Self { kind }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Held { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            Kind::Streaming { read, rest } => {
                if let Some(bytes) = read.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Pin::new(rest).poll_frame(cx).map(|frame| {
                    frame.map(|frame| {
                        frame
                            .map(|frame| {
                                frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                            })
                            .map_err(Into::into)
                    })
                })
            }
            Kind::Unavailable => {
                self.kind = Kind::Held {
                    data: None,
                    trailers: None,
                };
                Poll::Ready(Some(Err(NotReplayable.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Held { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Streaming { read, rest } => read.is_empty() && rest.is_end_stream(),
            Kind::Unavailable => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Held { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            Kind::Streaming { read, rest } => {
                let read: u64 = read.iter().map(|bytes| bytes.len() as u64).sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint
            }
            Kind::Unavailable => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Held { .. } => "held",
            Kind::Streaming { .. } => "streaming",
            Kind::Unavailable => "unavailable",
        };
        f.debug_struct("ReplayBody").field("kind", &kind).finish()
    }
}
