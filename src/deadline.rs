//! Deadline arithmetic shared by the layers: a timeout from a `Duration` that may be
//! absurdly large (a setting read from a file) never overflows, and never means "now".

use std::time::Duration;

use tokio::time::Instant;

/// `now + after`, saturating far in the future (at most 30 years on) instead of
/// overflowing: a deadline too far to represent is as good as none, never "now".
pub(crate) fn from(now: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let mut after = after.min(FAR);
    // An `Instant` this platform cannot hold so far on: the farthest it can, halving
    // down (a day at the least, which every platform holds).
    loop {
        if let Some(at) = now.checked_add(after) {
            return at;
        }
        after /= 2;
        if after < DAY {
            return now + DAY;
        }
    }
}

/// [`from`] now.
pub(crate) fn from_now(after: Duration) -> Instant {
    from(Instant::now(), after)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_deadline_saturates_far_in_the_future_never_at_now() {
        // The latest `Instant` this platform holds, found by bisection, less 10 years:
        // 30 years from there overflow.
        let now = tokio::time::Instant::now();
        let (mut fits, mut overflows) = (0u64, u64::MAX);
        while overflows - fits > 1 {
            let mid = fits + (overflows - fits) / 2;
            match now.checked_add(Duration::from_secs(mid)) {
                Some(_) => fits = mid,
                None => overflows = mid,
            }
        }
        let late = now + Duration::from_secs(fits - 10 * 365 * 24 * 3600);
        let at = super::from(late, Duration::from_secs(30 * 365 * 24 * 3600));
        assert!(at > late + Duration::from_secs(365 * 24 * 3600), "not now");

        let now = tokio::time::Instant::now();
        for after in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
            let at = super::from(now, after);
            assert!(
                at >= now + Duration::from_secs(365 * 24 * 3600),
                "{after:?}"
            );
        }
        assert_eq!(
            super::from(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
