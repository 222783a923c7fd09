//! Which target a call goes to: the first that is not cooling down, and how a target's
//! failures in a row start its cooldown.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A target that failed `failures` calls in a row is skipped for `duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cooldown {
    pub(super) failures: u32,
    pub(super) duration: Duration,
}

/// One target's recent outcomes, shared by every clone of the service.
///
/// The count of failures in a row is an atomic, read by every call that considers the
/// target: below the threshold (the usual case) that load is all a call pays. Only a
/// target at the threshold has its cooldown's end read, under a lock that is held for
/// a copy and never across an await.
#[derive(Debug, Default)]
pub(super) struct Health {
    failures: AtomicU32,
    until: Mutex<Option<Instant>>,
}

impl Health {
    /// When the cooldown of this target ends, if it is cooling down at `now`.
    pub(super) fn cooling_until(&self, cooldown: &Cooldown, now: Instant) -> Option<Instant> {
        if self.failures.load(Ordering::Relaxed) < cooldown.failures {
            return None;
        }
        let until = *self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.filter(|until| now < *until)
    }

    /// The target answered: its count of failures in a row starts again.
    pub(super) fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// The target failed a call at `now`: at `failures` in a row and after, its
    /// cooldown runs until `duration` after this failure. So a target that fails again
    /// when it is tried after its cooldown is skipped again at once, and one that fails
    /// calls during its cooldown (calls that were under way when it started, or that
    /// found every target cooling down) stays skipped until `duration` after the last.
    /// Returns the count of failures in a row when this one starts a cooldown, not when
    /// it prolongs one.
    pub(super) fn failed(&self, cooldown: &Cooldown, now: Instant) -> Option<u32> {
        let before = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or_else(|n| n);
        let failures = before.saturating_add(1);
        if failures < cooldown.failures {
            return None;
        }
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let cooling = before >= cooldown.failures && until.is_some_and(|until| now < until);
        *until = Some(crate::deadline::from(now, cooldown.duration));
        (!cooling).then_some(failures)
    }
}

/// The first of the targets' `healths` (in order) that is not cooling down; with every
/// one cooling down, the one whose cooldown ends first. `None` only for no targets.
pub(super) fn first<'a>(
    healths: impl IntoIterator<Item = &'a Health>,
    cooldown: Option<&Cooldown>,
) -> Option<usize> {
    let mut healths = healths.into_iter();
    let Some(cooldown) = cooldown else {
        return healths.next().map(|_| 0);
    };
    let now = Instant::now();
    let mut soonest: Option<(usize, Instant)> = None;
    for (at, health) in healths.enumerate() {
        match health.cooling_until(cooldown, now) {
            None => return Some(at),
            Some(until) if soonest.is_none_or(|(_, end)| until < end) => {
                soonest = Some((at, until));
            }
            Some(_) => {}
        }
    }
    soonest.map(|(at, _)| at)
}

/// The first of the targets' `healths` after the one at `at` that is not cooling down
/// now, if any.
pub(super) fn next<'a>(
    healths: impl IntoIterator<Item = &'a Health>,
    at: usize,
    cooldown: Option<&Cooldown>,
) -> Option<usize> {
    let now = Instant::now();
    let mut later = healths.into_iter().enumerate().skip(at + 1);
    later
        .find(|(_, health)| cooldown.is_none_or(|c| health.cooling_until(c, now).is_none()))
        .map(|(next, _)| next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Cooldown = Cooldown {
        failures: 2,
        duration: Duration::from_secs(30),
    };

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_start_a_cooldown_that_a_success_ends() {
        let health = Health::default();
        let now = Instant::now();
        assert_eq!(health.failed(&COOLDOWN, now), None, "one failure");
        assert_eq!(health.cooling_until(&COOLDOWN, now), None);
        health.succeeded();
        assert_eq!(health.failed(&COOLDOWN, now), None, "in a row only");
        assert_eq!(health.failed(&COOLDOWN, now), Some(2));
        let until = now + COOLDOWN.duration;
        assert_eq!(health.cooling_until(&COOLDOWN, now), Some(until));
        assert_eq!(health.cooling_until(&COOLDOWN, until), None, "over");
        // A failure during the cooldown prolongs it, and starts none.
        let later = now + Duration::from_secs(10);
        assert_eq!(health.failed(&COOLDOWN, later), None);
        let until = later + COOLDOWN.duration;
        assert_eq!(health.cooling_until(&COOLDOWN, later), Some(until));
        // Tried again after its cooldown, it fails: skipped again at once.
        assert_eq!(health.failed(&COOLDOWN, until), Some(4));
        assert!(health.cooling_until(&COOLDOWN, until).is_some());
        health.succeeded();
        assert_eq!(health.cooling_until(&COOLDOWN, until), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_target_not_cooling_down_or_the_one_that_cools_down_least() {
        let (a, b, c) = (Health::default(), Health::default(), Health::default());
        let healths = [&a, &b, &c];
        assert_eq!(first(healths, Some(&COOLDOWN)), Some(0));
        assert_eq!(first([], Some(&COOLDOWN)), None);
        assert_eq!(first([], None), None);
        let now = Instant::now();
        a.failed(&COOLDOWN, now);
        a.failed(&COOLDOWN, now);
        assert_eq!(first(healths, Some(&COOLDOWN)), Some(1));
        assert_eq!(first(healths, None), Some(0), "no cooldown: in order");
        assert_eq!(next(healths, 0, Some(&COOLDOWN)), Some(1));
        assert_eq!(next(healths, 2, Some(&COOLDOWN)), None);
        // Every target cooling down: c's cooldown, started a second before the others', ends
        // first.
        c.failed(&COOLDOWN, now);
        c.failed(&COOLDOWN, now - Duration::from_secs(1));
        b.failed(&COOLDOWN, now);
        b.failed(&COOLDOWN, now);
        assert_eq!(first(healths, Some(&COOLDOWN)), Some(2));
        assert_eq!(next(healths, 0, Some(&COOLDOWN)), None);
        assert_eq!(next(healths, 0, None), Some(1));
    }
}
