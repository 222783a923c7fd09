use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::body::ReleaseOnEnd;
use crate::concurrency::Slot;
use crate::metrics::RetryMetrics;

/// One upstream attempt counted in `provider_calls_in_flight`, until dropped.
pub(crate) struct CallGuard(Arc<RetryMetrics>);

impl CallGuard {
    pub(crate) fn new(metrics: Arc<RetryMetrics>) -> Self {
        metrics.call_started();
        Self(metrics)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

impl fmt::Debug for CallGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallGuard")
    }
}

/// What a response body holds until its stream ends: the attempt's count in
/// `provider_calls_in_flight`, and the call's concurrency slot when the concurrency
/// layer above handed it over (see the module docs, "One body wrapper"). One guard, so
/// one end-of-stream check per frame for both.
#[derive(Debug)]
pub(crate) struct BodyGuard {
    _call: CallGuard,
    _slot: Option<Slot>,
}

impl BodyGuard {
    pub(crate) fn new(call: CallGuard, slot: Option<Slot>) -> Self {
        Self {
            _call: call,
            _slot: slot,
        }
    }
}

/// The frames read while looking for the first chunk, in order. The first, when it is
/// data, is kept inline: most first chunks arrive in one frame, and then no queue is
/// allocated. The queue is boxed: the replay stays in the caller's body, so in the
/// caller's task, for the whole stream, and this keeps it at 40 bytes (it was 128 with
/// a whole `Frame` and a `VecDeque` inline: 88 bytes a stream, for nothing once the
/// replay has been read).
pub(crate) struct Replay<T> {
    first: Option<T>,
    #[expect(
        clippy::box_collection,
        reason = "8 bytes inline instead of a VecDeque's 32, in every caller's body"
    )]
    rest: Option<Box<VecDeque<Frame<T>>>>,
}

impl<T> Default for Replay<T> {
    fn default() -> Self {
        Self {
            first: None,
            rest: None,
        }
    }
}

impl<T> Replay<T> {
    pub(crate) fn push_back(&mut self, frame: Frame<T>) {
        if self.is_empty() {
            match frame.into_data() {
                Ok(data) => self.first = Some(data),
                Err(frame) => self.rest.get_or_insert_default().push_back(frame),
            }
        } else {
            self.rest.get_or_insert_default().push_back(frame);
        }
    }

    fn pop_front(&mut self) -> Option<Frame<T>> {
        match self.first.take() {
            Some(data) => Some(Frame::data(data)),
            None => self.rest.as_mut()?.pop_front(),
        }
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.as_ref().is_none_or(|rest| rest.is_empty())
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.as_ref().map_or(0, |rest| rest.len())
    }

    /// The data of the frames to replay.
    pub(crate) fn data(&self) -> impl Iterator<Item = &T> {
        let rest = self.rest.iter().flat_map(|rest| rest.iter());
        self.first.iter().chain(rest.filter_map(Frame::data_ref))
    }
}

pin_project! {
    /// Response body of [`FirstChunkRetry`](super::FirstChunkRetry): first the frames
    /// read while looking for the first chunk, as they came (no copy), then the rest of
    /// the live stream.
    ///
    /// It also ends the attempt's count in `provider_calls_in_flight` at the end of the
    /// stream (the same end-of-stream rule as the concurrency slot), and, below a
    /// [`StreamConcurrencyLayer`](crate::StreamConcurrencyLayer), releases that layer's
    /// slot with it (see [`concurrency`](crate::concurrency), "One body wrapper").
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::retry::ResponseBody;
    /// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
    ///
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from(": keep-alive\n\ndata: {\"text\":\"Hi\"}\n\n")))
    /// });
    /// let client = FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let response = client.oneshot(http::Request::new(())).await?;
    /// let body: ResponseBody<Full<Bytes>> = response.into_body();
    /// // The bytes read to find the first chunk reach the caller too, unchanged.
    /// let bytes = body.collect().await?.to_bytes();
    /// assert_eq!(bytes, ": keep-alive\n\ndata: {\"text\":\"Hi\"}\n\n");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ResponseBody<B: Body> {
        replay: Replay<B::Data>,
        // The inner body has returned its end (while peeked, or since): it is not
        // polled again.
        inner_done: bool,
        // Nothing left to replay and the inner body not done: each poll is the inner
        // body's. One flag for the path every frame takes, set from the two above.
        live: bool,
        #[pin]
        inner: B,
        guard: ReleaseOnEnd<BodyGuard>,
    }
}

impl<B: Body> ResponseBody<B> {
    /// `replay` goes out first; `inner_done` says the inner body already ended.
    pub(crate) fn new(
        inner: B,
        replay: Replay<B::Data>,
        inner_done: bool,
        guard: BodyGuard,
    ) -> Self {
        let ended = ended(&replay, inner_done, &inner);
        Self {
            live: replay.is_empty() && !inner_done,
            replay,
            inner_done,
            inner,
            guard: ReleaseOnEnd::new(guard, ended),
        }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if !self.live {
            return self.poll_slow(cx);
        }
        // The live stream: the path every frame takes does nothing but poll and look
        // (see `ReleaseOnEnd::pass`).
        let this = self.project();
        let mut inner = this.inner;
        let poll = inner.as_mut().poll_frame(cx);
        if let Poll::Ready(None) = poll {
            *this.inner_done = true;
            *this.live = false;
        }
        let inner = inner.as_ref();
        this.guard.pass(poll, || inner.is_end_stream())
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        if self.live {
            return self.inner.is_end_stream();
        }
        ended(&self.replay, self.inner_done, &self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        // A few frames at most: summed here rather than kept up to date per frame.
        let replay: u64 = self.replay.data().map(|data| data.remaining() as u64).sum();
        if self.inner_done {
            return SizeHint::with_exact(replay);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(replay));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(replay));
        }
        hint
    }
}

impl<B: Body> ResponseBody<B> {
    /// Everything but a live frame: the frames read while peeking, and the end once the
    /// inner body has ended.
    #[cold]
    #[inline(never)]
    fn poll_slow(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled<B> {
        let mut this = self.project();
        let poll = match this.replay.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None if *this.inner_done => Poll::Ready(None),
            None => this.inner.as_mut().poll_frame(cx),
        };
        if let Poll::Ready(None) = poll {
            *this.inner_done = true;
        }
        *this.live = this.replay.is_empty() && !*this.inner_done;
        let (replay, inner_done, inner) = (&*this.replay, *this.inner_done, this.inner.as_ref());
        this.guard
            .pass(poll, || ended(replay, inner_done, inner.get_ref()))
    }
}

/// What `poll_frame` returns.
type Polled<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// Nothing left to replay and the inner body at its end.
#[inline]
fn ended<B: Body>(replay: &Replay<B::Data>, inner_done: bool, inner: &B) -> bool {
    replay.is_empty() && (inner_done || inner.is_end_stream())
}

impl<B: Body> fmt::Debug for ResponseBody<B>
where
    B: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("replay_frames", &self.replay.len())
            .field("inner", &self.inner)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(frame: Option<Frame<&'static str>>) -> String {
        match frame.map(Frame::into_data) {
            None => "end".into(),
            Some(Ok(data)) => data.into(),
            Some(Err(_)) => "trailers".into(),
        }
    }

    #[test]
    fn the_replay_gives_frames_back_in_order_whatever_comes_first() {
        let mut replay = Replay::default();
        assert!(replay.is_empty());
        replay.push_back(Frame::data("a"));
        assert!(replay.rest.is_none(), "one data frame: nothing allocated");
        replay.push_back(Frame::data("b"));
        replay.push_back(Frame::trailers(http::HeaderMap::new()));
        assert_eq!(replay.len(), 3);
        assert_eq!(replay.data().copied().collect::<Vec<_>>(), ["a", "b"]);
        let order: Vec<_> = (0..4).map(|_| shown(replay.pop_front())).collect();
        assert_eq!(order, ["a", "b", "trailers", "end"]);
        assert!(replay.is_empty());

        // Trailers first (an empty body with trailers) queue behind nothing.
        replay.push_back(Frame::trailers(http::HeaderMap::new()));
        replay.push_back(Frame::data("c"));
        let order: Vec<_> = (0..3).map(|_| shown(replay.pop_front())).collect();
        assert_eq!(order, ["trailers", "c", "end"]);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_replay_is_small_in_the_callers_body() {
        assert_eq!(std::mem::size_of::<Replay<bytes::Bytes>>(), 40);
    }
}
