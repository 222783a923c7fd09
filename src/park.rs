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
        ready!(self.poll_ready(cx))?;
        Poll::Ready(Ok(self.call()))
    }

    /// The first half of [`poll_call`](Self::poll_call), for a caller that makes the
    /// call itself inside something (see `handoff`).
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.service.poll_ready(cx)
    }

    /// Calls the service, made ready by [`poll_ready`](Self::poll_ready), with the
    /// request.
    pub(crate) fn call(&mut self) -> S::Future {
        let Some(request) = self.request.take() else {
            panic!("a parked call was polled after it was made")
        };
        self.service.call(request)
    }
}
