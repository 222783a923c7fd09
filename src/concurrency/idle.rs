//! The idle timeout: ending streams that their consumer neither reads nor drops.
//!
//! # Why a sweep
//!
//! A stalled reader (a downstream client that stopped reading, a task that holds the
//! body and forgot it) never polls the body again, so nothing inside `poll_frame` can
//! notice it: a timer has to be driven from outside. One timer per stream, reset on
//! every frame, is what makes a body timeout cost hundreds of nanoseconds a frame.
//! Instead, each watched body notes with a plain store that it handed out a frame, and
//! one task per layer sweeps all of them every quarter of the timeout, with one lock
//! for the list. A body that was handed a frame and has not been polled since, sweep
//! after sweep, for the whole timeout, is ended: its upstream body is dropped (closing
//! the upstream stream), its slot is released, and its next poll returns
//! [`IdleTimeout`](super::IdleTimeout). So a stalled stream ends between `timeout` and
//! `timeout * 1.25` after its last poll.
//!
//! A body waiting for the upstream (its last poll returned `Pending`) is not idle: its
//! consumer is waiting on it. Nor is a body that has ended.
//!
//! The upstream body and the slot sit behind a lock that the body takes for each poll
//! (one atomic swap, never contended but by the sweep) and that the sweep takes only to
//! end a stream that is past its timeout: whichever holds it, the other knows the
//! stream is in use or over.
//!
//! The sweep task starts with the first watched stream and stops when none is left.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use try_lock::TryLock;

use crate::body::ReleaseOnEnd;

use super::future::Slot;

/// `state` of a body whose last poll handed out a frame: its consumer has it.
const HANDED: u64 = 1;
/// `state` of a body that has ended (or timed out): never idle again.
const OVER: u64 = u64::MAX;

/// One layer's sweep: the watched streams and the task that checks them.
#[derive(Debug)]
pub(crate) struct Sweep {
    timeout: Duration,
    period: Duration,
    watched: Mutex<Watched>,
}

#[derive(Debug, Default)]
struct Watched {
    streams: Vec<Entry>,
    /// A sweep task is running (it clears this, under the lock, when it stops).
    running: bool,
}

struct Entry {
    stream: Weak<dyn Idle>,
    /// `state` at the last sweep, and how many sweeps in a row it has stood handed out.
    seen: u64,
    idle_sweeps: u32,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("idle_sweeps", &self.idle_sweeps)
            .finish_non_exhaustive()
    }
}

/// What the sweep sees of a watched stream, whatever its body type.
trait Idle: Send + Sync {
    fn state(&self) -> u64;
    /// Ends the stream if it still stands at `seen`; whether it did.
    fn expire(&self, seen: u64) -> bool;
}

/// What a watched body's lock guards: the upstream body and the slot, until the stream
/// ends by the idle timeout.
pub(crate) struct Open<B> {
    pub(crate) body: Pin<Box<B>>,
    pub(crate) slot: ReleaseOnEnd<Slot>,
}

/// The part of a watched body the sweep shares.
pub(crate) struct Watch<B> {
    pub(crate) open: TryLock<Option<Open<B>>>,
    /// The sweep's timeout, for the error the body returns.
    pub(crate) timeout: Duration,
    /// `OVER`, or a count of polls shifted left once, with `HANDED` set while the
    /// consumer holds the frame the last poll returned. Written only by the body.
    state: AtomicU64,
}

impl<B> std::fmt::Debug for Watch<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<B> Watch<B> {
    /// Notes how the poll that just returned left the stream: its consumer has a frame
    /// (`handed`), or it waits for the upstream. A plain store: only the body writes.
    #[inline]
    pub(crate) fn polled(&self, handed: bool) {
        let state = self.state.load(Ordering::Relaxed);
        if state != OVER {
            // The next count of polls, in the bits above `HANDED`.
            let next = (state | HANDED).wrapping_add(1) & !HANDED;
            let next = if handed { next | HANDED } else { next };
            self.state.store(next, Ordering::Relaxed);
        }
    }

    /// The stream ended: the sweep leaves it alone.
    pub(crate) fn over(&self) {
        self.state.store(OVER, Ordering::Relaxed);
    }
}

impl<B: Send> Idle for Watch<B> {
    fn state(&self) -> u64 {
        self.state.load(Ordering::Relaxed)
    }

    fn expire(&self, seen: u64) -> bool {
        // Held by the body: it is being polled right now, so it is not idle.
        let Some(mut open) = self.open.try_lock() else {
            return false;
        };
        if self.state.load(Ordering::Relaxed) != seen {
            return false;
        }
        self.state.store(OVER, Ordering::Relaxed);
        // Dropping the upstream body closes its stream; dropping the slot frees it.
        drop(open.take());
        true
    }
}

impl Sweep {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            period: (timeout / 4).max(Duration::from_millis(1)),
            watched: Mutex::default(),
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Watches a new stream; starts the sweep task if none runs.
    pub(crate) fn watch<B: Send + 'static>(
        self: &Arc<Self>,
        body: B,
        slot: ReleaseOnEnd<Slot>,
    ) -> Arc<Watch<B>> {
        let watch = Arc::new(Watch {
            open: TryLock::new(Some(Open {
                body: Box::pin(body),
                slot,
            })),
            timeout: self.timeout,
            state: AtomicU64::new(0),
        });
        let stream: Arc<dyn Idle> = watch.clone();
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched.streams.push(Entry {
            stream: Arc::downgrade(&stream),
            seen: 0,
            idle_sweeps: 0,
        });
        if !watched.running {
            watched.running = true;
            tokio::spawn(sweeping(Arc::downgrade(self)));
        }
        watch
    }

    /// One sweep: forgets dropped streams, counts idle ones, and returns those past
    /// the timeout (with the state they stood at), or `None` when nothing is watched
    /// any more and the task should stop.
    fn sweep(&self) -> Option<Vec<(Arc<dyn Idle>, u64)>> {
        // Sweeps in a row that make the timeout: a stream idle at this many is past it.
        let needed = self.timeout.as_nanos().div_ceil(self.period.as_nanos());
        let needed = u32::try_from(needed).unwrap_or(u32::MAX);
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let mut expired = Vec::new();
        watched.streams.retain_mut(|entry| {
            let Some(stream) = entry.stream.upgrade() else {
                return false;
            };
            let state = stream.state();
            if state == OVER {
                return false;
            }
            if state & HANDED != 0 && state == entry.seen {
                entry.idle_sweeps = entry.idle_sweeps.saturating_add(1);
                if entry.idle_sweeps >= needed {
                    // Kept until it is over: the body may be polled before it expires.
                    expired.push((stream, state));
                }
            } else {
                entry.seen = state;
                entry.idle_sweeps = 0;
            }
            true
        });
        if watched.streams.is_empty() && expired.is_empty() {
            watched.running = false;
            return None;
        }
        Some(expired)
    }
}

/// The sweep task: runs while the layer lives and any stream is watched.
async fn sweeping(sweep: Weak<Sweep>) {
    loop {
        let Some(period) = sweep.upgrade().map(|sweep| sweep.period) else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(sweep) = sweep.upgrade() else {
            return;
        };
        let Some(expired) = sweep.sweep() else {
            return;
        };
        // Outside the list's lock: dropping an upstream body may take a moment.
        for (stream, seen) in expired {
            if stream.expire(seen) {
                tracing::warn!(
                    timeout_ms = sweep.timeout.as_millis() as u64,
                    "idle timeout: a stream was not read within idle_timeout; its upstream is closed and its slot released"
                );
            }
        }
    }
}
