//! The deadline of the attempt in progress, or of the backoff before the next.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    /// A deadline whose timer is only made when it is first polled: a call that
    /// completes without waiting (a cached or in-memory answer) never registers one.
    pub(super) struct Timer {
        at: Instant,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl Timer {
    pub(super) fn new(at: Instant) -> Self {
        Self { at, sleep: None }
    }

    pub(super) fn reset(self: Pin<&mut Self>, at: Instant) {
        let this = self.project();
        *this.at = at;
        if let Some(sleep) = this.sleep.as_pin_mut() {
            sleep.reset(at);
        }
    }

    pub(super) fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep_until(*this.at)));
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => sleep.poll(cx),
            None => unreachable!("the timer was just made"),
        }
    }
}
