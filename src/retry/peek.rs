//! Reading a response for its first chunk, and keeping it for the caller.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http::Response;
use http_body::{Body, Frame};
use tower::BoxError;

use super::ResponseBody;
use super::body::{BodyGuard, CallGuard, Replay};
use super::judge::Failure;
use crate::frame::{Detector, Progress};

/// A response whose body may have been read from: its head, its body, and the frames
/// read so far, which the caller gets first. Kept while it is read for the first chunk,
/// and after a failed attempt, for the caller in case there is no retry (the attempt is
/// then over: no longer counted in flight until it is handed back).
pub(super) struct Held<B: Body> {
    pub(super) head: http::response::Parts,
    pub(super) body: B,
    pub(super) frames: Replay<B::Data>,
    /// The body has returned its end.
    pub(super) body_done: bool,
}

impl<B: Body> Held<B> {
    pub(super) fn new(response: Response<B>) -> Self {
        let (head, body) = response.into_parts();
        Self {
            head,
            body,
            frames: Replay::default(),
            body_done: false,
        }
    }

    /// The response for the caller, holding `guard` until its body ends.
    pub(super) fn into_response(self, guard: BodyGuard) -> Response<ResponseBody<B>> {
        let body = ResponseBody::new(self.body, self.frames, self.body_done, guard);
        Response::from_parts(self.head, body)
    }
}

/// Frames read for the first chunk in one poll, at most: past that the future yields
/// (and checks its deadline), so that a body that is always ready, with empty frames or
/// keep-alives, cannot hold the task or outlive `first_chunk_timeout`.
const FRAMES_PER_POLL: usize = 64;

pub(super) struct Peek<B: Body, D> {
    /// The response, and the frames read from its body so far.
    pub(super) response: Held<B>,
    pub(super) buffered: usize,
    pub(super) detector: D,
    pub(super) call: CallGuard,
    /// A `429` read to its end (up to [`REFUSAL_BODY`] bytes) rather than for a first
    /// chunk: its body says whether the account's quota is spent, which is no overload
    /// (see `Failure::is_overload`).
    pub(super) refusal: Option<Refusal>,
}

/// A `429` being read for what its body says.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refusal {
    /// The server's hint.
    pub(super) hint: Option<std::time::Duration>,
    /// Whether it is retried (else it is the caller's answer, once read).
    pub(super) retried: bool,
    /// The attempt's deadline passed: the read ends with what it has.
    pub(super) cut: bool,
}

/// The most of a `429`'s body read to tell a spent quota from an overload: an error
/// object is a few hundred bytes.
pub(super) const REFUSAL_BODY: usize = 8 * 1024;

impl<B, D> Peek<B, D>
where
    B: Body + Unpin,
    B::Data: AsRef<[u8]>,
    B::Error: Into<BoxError>,
    D: Detector,
{
    /// Reads frames until the detector finds the first chunk. `Ok(true)` means the body
    /// ended with it.
    pub(super) fn poll_first_chunk(
        &mut self,
        cx: &mut Context<'_>,
        limit: usize,
    ) -> Poll<Result<bool, Failure<B>>> {
        if self.refusal.is_some() {
            return self.poll_refusal(cx);
        }
        for _ in 0..FRAMES_PER_POLL {
            // Already at its end (`Content-Length: 0`, or an exact length all read): the
            // detector judges the end without another poll, which may never come back.
            if self.response.body.is_end_stream() {
                return Poll::Ready(self.ended());
            }
            let frame = match ready!(Pin::new(&mut self.response.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Err(Failure::Body(error.into()))),
                None => return Poll::Ready(self.ended()),
            };
            let Some(data) = frame.data_ref() else {
                // Trailers end the stream.
                self.response.frames.push_back(frame);
                return Poll::Ready(self.ended());
            };
            let bytes = data.as_ref();
            if bytes.is_empty() {
                // Carries nothing: not held, so that a stream of empty frames cannot
                // grow the replay without bound.
                continue;
            }
            let progress = self.detector.feed(bytes);
            // What holding the frame costs: its bytes and its place in the replay, so
            // that tiny frames cannot hold more memory than the cap.
            let held = bytes.len() + std::mem::size_of::<Frame<B::Data>>();
            self.buffered = self.buffered.saturating_add(held);
            self.response.frames.push_back(frame);
            let progress = match progress {
                Progress::Pending if self.buffered > limit => match self.detector.buffer_full() {
                    Progress::Pending => return Poll::Ready(Err(Failure::BufferLimit)),
                    decided => decided,
                },
                progress => progress,
            };
            match progress {
                Progress::Pending => {}
                Progress::Found => return Poll::Ready(Ok(false)),
                Progress::Malformed(error) => return Poll::Ready(Err(Failure::Malformed(error))),
            }
        }
        // Bounded work per poll: yield, and let the caller check the deadline.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<B, D> Peek<B, D>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads a refusal's body to its end, up to [`REFUSAL_BODY`] bytes, or until its
    /// deadline cut it. `Ok(true)` means it ended. A body that fails is taken as ended:
    /// a refusal is what it was, whatever its body does.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Failure<B>>> {
        for _ in 0..FRAMES_PER_POLL {
            if self.response.body.is_end_stream() {
                return Poll::Ready(Ok(true));
            }
            if self.buffered >= REFUSAL_BODY || self.refusal.is_some_and(|r| r.cut) {
                return Poll::Ready(Ok(false));
            }
            let frame = match ready!(Pin::new(&mut self.response.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    let error: BoxError = error.into();
                    tracing::debug!(%error, "a 429's body failed while read: taken as ended");
                    return Poll::Ready(Ok(true));
                }
                None => return Poll::Ready(Ok(true)),
            };
            let bytes = frame.data_ref().map(|data| data.remaining());
            if bytes == Some(0) {
                // Carries nothing: not held (see `poll_first_chunk`).
                continue;
            }
            let held = bytes.unwrap_or(0) + std::mem::size_of::<Frame<B::Data>>();
            self.buffered = self.buffered.saturating_add(held);
            let trailers = frame.is_trailers();
            self.response.frames.push_back(frame);
            if trailers {
                return Poll::Ready(Ok(true));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<B: Body, D: Detector> Peek<B, D> {
    /// The body ended: found at its end, or not at all.
    fn ended(&mut self) -> Result<bool, Failure<B>> {
        match self.detector.finish() {
            Progress::Found => Ok(true),
            Progress::Malformed(error) => Err(Failure::Malformed(error)),
            Progress::Pending => Err(Failure::EndOfStream),
        }
    }
}
