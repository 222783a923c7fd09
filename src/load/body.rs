use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::body::ReleaseOnEnd;

pin_project! {
    /// Response body of [`CompleteOnEndOfStream`](super::CompleteOnEndOfStream): the
    /// inner body, with the balancer's load handle until the stream ends (the end,
    /// an error, trailers, a last data frame, or the body dropped). Frames, errors and
    /// size hints pass through unchanged.
    pub struct ResponseBody<B, H> {
        #[pin]
        inner: B,
        handle: ReleaseOnEnd<H>,
    }
}

impl<B: Body, H> ResponseBody<B, H> {
    pub(crate) fn new(inner: B, handle: H) -> Self {
        let ended = inner.is_end_stream();
        Self {
            inner,
            handle: ReleaseOnEnd::new(handle, ended),
        }
    }
}

impl<B: Body, H> Body for ResponseBody<B, H> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let poll = inner.as_mut().poll_frame(cx);
        let inner = inner.as_ref();
        this.handle.pass(poll, || inner.is_end_stream())
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

impl<B: fmt::Debug, H> fmt::Debug for ResponseBody<B, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("counted", &self.handle.is_held())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A handle that counts its drops.
    struct Handle(Arc<AtomicUsize>);
    impl Drop for Handle {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counted() -> (Handle, Arc<AtomicUsize>) {
        let drops = Arc::new(AtomicUsize::new(0));
        (Handle(drops.clone()), drops)
    }

    /// A stream of unknown length: its end is known only when polled for it.
    struct Events(VecDeque<&'static str>);
    impl Body for Events {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|event| Ok(Frame::data(Bytes::from(event)))),
            )
        }
    }

    #[tokio::test]
    async fn the_handle_is_dropped_once_at_the_end_of_the_stream() {
        let (handle, drops) = counted();
        let events = Events(VecDeque::from(["data: a\n\n", "data: b\n\n"]));
        let mut body = ResponseBody::new(events, handle);
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 0, "not known to be over yet");
        assert!(body.frame().await.is_none());
        assert_eq!(drops.load(Ordering::SeqCst), 1, "at the end");
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "once");
    }

    #[tokio::test]
    async fn a_complete_body_releases_at_once_a_known_length_at_its_last_frame() {
        let (handle, drops) = counted();
        let body = ResponseBody::new(Empty::<Bytes>::new(), handle);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "nothing to stream");
        drop(body);
        assert_eq!(drops.load(Ordering::SeqCst), 1);

        let (handle, drops) = counted();
        let mut body = ResponseBody::new(Full::new(Bytes::from("data: a\n\n")), handle);
        body.frame().await.unwrap().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1, "no further poll needed");

        let (handle, drops) = counted();
        let mut body = ResponseBody::new(Events(VecDeque::from(["data: a\n\n"])), handle);
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped mid-stream");
    }
}
