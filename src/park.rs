//! Calls that wait before they reach the inner service, holding none of its readiness.
//!
//! A service may reserve capacity in `poll_ready` (tower's `Buffer` takes a place in its
//! channel, `ConcurrencyLimit` a permit) and keep it until `call`. A call that waits for
//! something of ours first (a concurrency slot, its request body, a connection place)
//! must not keep such a reservation while it waits: every other caller would queue
//! behind it, in the inner service instead of in our queue, and its own deadline would
//! not start until theirs ran out. So a waiting call parks a clone of the service that
//! has not been made ready, and drives its `poll_ready` once the wait is over, as
//! tower's `Oneshot` does.

use std::task::{Context, Poll, ready};

use tower_service::Service;

/// A service that has not been made ready, and the request it is to be called with.
pub(crate) struct Parked<S, Req> {
    service: S,
    request: Option<Req>,
}

impl<S: Service<Req>, Req> Parked<S, Req> {
    /// `service` should be a clone nobody has polled ready.
    pub(crate) fn new(service: S, request: Req) -> Self {
        Self {
            service,
            request: Some(request),
        }
    }

    /// Drives the service ready, then calls it with the request. Only polled until it
    /// returns `Ready`.
    pub(crate) fn poll_call(&mut self, cx: &mut Context<'_>) -> Poll<Result<S::Future, S::Error>> {
        self.poll_call_with(cx, |call| call())
    }

    /// As [`poll_call`](Self::poll_call), the call itself made inside `around` (which
    /// must run it once): for what is offered to the inner service for the length of
    /// its `call` (see `handoff`).
    pub(crate) fn poll_call_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        around: impl FnOnce(&mut dyn FnMut() -> S::Future) -> R,
    ) -> Poll<Result<R, S::Error>> {
        ready!(self.service.poll_ready(cx))?;
        let Some(request) = self.request.take() else {
            panic!("a parked call was polled after it was made")
        };
        let (service, mut request) = (&mut self.service, Some(request));
        let mut call = || match request.take() {
            Some(request) => service.call(request),
            None => unreachable!("a parked call is made once"),
        };
        Poll::Ready(Ok(around(&mut call)))
    }
}
