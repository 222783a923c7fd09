//! The call's one timer: the earliest first-chunk deadline of its attempts in flight,
//! or the time of its next start.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    /// A timer made only when it is first polled: a call that completes without
    /// waiting (a cached or in-memory answer) never registers one. It keeps no deadline
    /// of its own: the caller passes the one in force at each poll, and the timer is
    /// only touched when that moves.
    pub(super) struct Timer {
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl Timer {
    pub(super) fn new() -> Self {
        Self { sleep: None }
    }

    /// Whether `at` has come, registering to be woken then if not.
    pub(super) fn poll_at(self: Pin<&mut Self>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        match this.sleep.as_mut().as_pin_mut() {
            None => this.sleep.set(Some(tokio::time::sleep_until(at))),
            Some(sleep) if sleep.deadline() != at => sleep.reset(at),
            Some(_) => {}
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => sleep.poll(cx),
            None => unreachable!("the timer was just made"),
        }
    }
}
