//! The end-of-stream rule shared by the body wrappers that hold something until the
//! stream ends (a concurrency slot, an in-flight gauge).

use std::task::Poll;

use http_body::Frame;

/// Holds a guard until the body it rides along with has ended, then drops it, once.
///
/// The rule (tower-http's `trace` and `on_early_drop` bodies follow the same one): the
/// stream has ended at the earliest of
/// - `poll_frame` returning `None`;
/// - `poll_frame` returning an error;
/// - `poll_frame` returning a frame that is not data (trailers are always last);
/// - `poll_frame` returning data after which `is_end_stream()` is true: a consumer that
///   trusts `Content-Length` may never poll again, yet keep the body object;
/// - the body being already at its end when the response is built ([`Self::new`]);
/// - the body being dropped (the guard drops with it).
///
/// Dropping is the release, so "exactly once" follows from `Option::take`.
#[derive(Debug)]
pub(crate) struct ReleaseOnEnd<G> {
    guard: Option<G>,
}

impl<G> ReleaseOnEnd<G> {
    /// Holds `guard`, or releases it at once when the body has `already_ended`.
    pub(crate) fn new(guard: G, already_ended: bool) -> Self {
        let mut this = Self { guard: Some(guard) };
        if already_ended {
            this.release();
        }
        this
    }

    /// Passes on what the body's `poll_frame` returned, releasing the guard first if
    /// that ends the stream; `ended` reports the body's `is_end_stream()` and is only
    /// asked after a data frame.
    ///
    /// The release is out of line and only reached once per stream: on the path every
    /// frame takes, nothing that could unwind runs while the frame is held, so the
    /// compiler can write it straight into the caller's return slot instead of copying
    /// it (a copy that costs more than the rest of the wrapper).
    #[inline(always)]
    pub(crate) fn pass<D, E>(
        &mut self,
        poll: Poll<Option<Result<Frame<D>, E>>>,
        ended: impl FnOnce() -> bool,
    ) -> Poll<Option<Result<Frame<D>, E>>> {
        if self.guard.is_none() {
            return poll;
        }
        let end = match &poll {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => !frame.is_data() || ended(),
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
        };
        if end {
            return self.release_with(poll);
        }
        poll
    }

    #[cold]
    #[inline(never)]
    fn release_with<T>(&mut self, passing: T) -> T {
        self.release();
        passing
    }

    /// Whether the guard is still held.
    #[inline]
    pub(crate) fn is_held(&self) -> bool {
        self.guard.is_some()
    }

    fn release(&mut self) {
        drop(self.guard.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    struct Counted(Rc<Cell<u32>>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn held() -> (ReleaseOnEnd<Counted>, Rc<Cell<u32>>) {
        let drops = Rc::new(Cell::new(0));
        (ReleaseOnEnd::new(Counted(drops.clone()), false), drops)
    }

    type Polled = Poll<Option<Result<Frame<&'static [u8]>, ()>>>;

    #[test]
    fn data_frame_keeps_the_guard_while_more_may_come() {
        let (mut r, drops) = held();
        let p: Polled = Poll::Ready(Some(Ok(Frame::data(&b"x"[..]))));
        let _ = r.pass(p, || false);
        let _ = r.pass(Poll::<Option<Result<Frame<&[u8]>, ()>>>::Pending, || true);
        assert!(r.is_held());
        assert_eq!(drops.get(), 0);
    }

    #[test]
    fn each_end_condition_releases_exactly_once() {
        let ends: Vec<(fn() -> Polled, bool)> = vec![
            (|| Poll::Ready(None), false),
            (|| Poll::Ready(Some(Err(()))), false),
            (
                || Poll::Ready(Some(Ok(Frame::trailers(http::HeaderMap::new())))),
                false,
            ),
            (|| Poll::Ready(Some(Ok(Frame::data(&b"last"[..])))), true),
        ];
        for (poll, ended) in ends {
            let (mut r, drops) = held();
            // The frame is passed on untouched.
            let passed = r.pass(poll(), || ended);
            assert_eq!(format!("{passed:?}"), format!("{:?}", poll()));
            assert_eq!(drops.get(), 1);
            // Further polls (a consumer that polls past the end) change nothing.
            let _ = r.pass(poll(), || ended);
            let _ = r.pass(Poll::Ready(None::<Result<Frame<&[u8]>, ()>>), || true);
            drop(r);
            assert_eq!(drops.get(), 1);
        }
    }

    #[test]
    fn already_ended_releases_at_construction_and_drop_releases_otherwise() {
        let drops = Rc::new(Cell::new(0));
        let r = ReleaseOnEnd::new(Counted(drops.clone()), true);
        assert_eq!(drops.get(), 1);
        drop(r);
        assert_eq!(drops.get(), 1);

        let (r, drops) = held();
        drop(r);
        assert_eq!(drops.get(), 1);
    }
}
