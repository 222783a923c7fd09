//! Hedged attempts: when an attempt has produced no first chunk after a delay, another
//! starts beside it, and the first of them to produce its first chunk wins.
//!
//! The delay is fixed ([`Hedge::after`]) or taken from this layer's recent calls
//! ([`Hedge::percentile`]): the quantile of their time to first chunk over the last
//! full window. Two windows rotate, as in tower's `hedge`: calls record into the
//! current one, and the delay is read from the one before, so that it never comes from
//! a handful of samples taken a moment ago. Each call records its own time, from its
//! start to its first chunk whichever attempt delivered it, not the winning attempt's
//! time from its own start: a hedge that wins is fast by selection, and its time alone
//! would drift the quantile down until every call is hedged.
//!
//! The window is a log-linear histogram of 1,184 counters (microseconds, 32 steps per
//! power of two, so a value is rounded up by at most 3 %), and the delay is its
//! bucket's upper end: at least `p` of the recorded calls had their first chunk by
//! then. It is computed once per window, at rotation (a pass over the counters, under
//! the lock); otherwise a call holds the lock it shares with the recording for a few
//! instructions, to read the delay or count its latency.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::ConfigError;

/// When [`RetryPolicy::hedge`](super::RetryPolicy::hedge) starts another attempt of a
/// call that has produced no first chunk yet.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::retry::Hedge;
/// use tower_stream_backpressure::RetryPolicy;
///
/// // A second attempt when the first has sent no token after 2 seconds.
/// let fixed = RetryPolicy::default().hedge(Hedge::after(Duration::from_secs(2)));
/// // After the time by which 95 % of recent calls had their first chunk, once 50
/// // calls were measured in the last window.
/// let adaptive =
///     RetryPolicy::default().hedge(Hedge::percentile(0.95).min_samples(50));
/// assert!(fixed.validate().is_ok() && adaptive.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use = "settings do nothing until a policy uses them"]
pub struct Hedge {
    delay: Delay,
    min_samples: u64,
    max_extra: u32,
    window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Delay {
    After(Duration),
    Percentile(f64),
}

impl Hedge {
    /// Another attempt starts when the last one started has produced no first chunk
    /// after `delay` (above zero).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// let hedge = Hedge::after(Duration::from_millis(800));
    /// assert_eq!(hedge.get_max_extra(), 1);
    /// ```
    pub fn after(delay: Duration) -> Self {
        Self::with(Delay::After(delay))
    }

    /// Another attempt starts after the `p` quantile (above 0, below 1) of this layer's
    /// recent time to first chunk: the time by which a share `p` of the calls measured
    /// in the last full [`window`](Self::window) had their first chunk. Until a window
    /// holds [`min_samples`](Self::min_samples) calls, no call is hedged.
    ///
    /// Pick `p` below the share of calls that have their first chunk in the usual time:
    /// a hedged call's time includes its delay, so a quantile that falls among the
    /// hedged calls moves the next window's delay up by a usual call's time. With 5 % of
    /// attempts slow, `percentile(0.9)` keeps the delay just above the fast attempts'
    /// time, and `percentile(0.95)` flips between that and more (the README's hedging
    /// simulation shows both).
    ///
    /// ```
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// let hedge = Hedge::percentile(0.9);
    /// assert_eq!(hedge.get_min_samples(), 20);
    /// ```
    pub fn percentile(p: f64) -> Self {
        Self::with(Delay::Percentile(p))
    }

    fn with(delay: Delay) -> Self {
        Self {
            delay,
            min_samples: 20,
            max_extra: 1,
            window: Duration::from_secs(10),
        }
    }

    /// Calls a window must hold for [`percentile`](Self::percentile) to take its delay
    /// from it (default 20; ignored by [`after`](Self::after)).
    ///
    /// ```
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// assert_eq!(Hedge::percentile(0.95).min_samples(100).get_min_samples(), 100);
    /// ```
    pub fn min_samples(self, calls: u64) -> Self {
        Self {
            min_samples: calls,
            ..self
        }
    }

    /// Attempts of one call in flight beside the first, at most (default 1, at least
    /// 1). Each also counts against `max_attempts`, so with the default 3 attempts,
    /// `max_extra(2)` leaves no retry.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// let hedge = Hedge::after(Duration::from_secs(1)).max_extra(2);
    /// assert_eq!(hedge.get_max_extra(), 2);
    /// ```
    pub fn max_extra(self, attempts: u32) -> Self {
        Self {
            max_extra: attempts,
            ..self
        }
    }

    /// How long each of the two rotating windows of [`percentile`](Self::percentile)
    /// lasts (default 10 s, above zero): the delay follows a change of latency within
    /// one to two windows.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// let hedge = Hedge::percentile(0.95).window(Duration::from_secs(30));
    /// assert_eq!(hedge.get_window(), Duration::from_secs(30));
    /// ```
    pub fn window(self, window: Duration) -> Self {
        Self { window, ..self }
    }

    /// The [`min_samples`](Self::min_samples) in force.
    ///
    /// ```
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// assert_eq!(Hedge::percentile(0.5).get_min_samples(), 20);
    /// ```
    pub fn get_min_samples(&self) -> u64 {
        self.min_samples
    }

    /// The [`max_extra`](Self::max_extra) in force.
    ///
    /// ```
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// assert_eq!(Hedge::percentile(0.5).get_max_extra(), 1);
    /// ```
    pub fn get_max_extra(&self) -> u32 {
        self.max_extra
    }

    /// The [`window`](Self::window) in force.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::retry::Hedge;
    ///
    /// assert_eq!(Hedge::percentile(0.5).get_window(), Duration::from_secs(10));
    /// ```
    pub fn get_window(&self) -> Duration {
        self.window
    }

    /// Checks every setting; the error names the one out of range.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.delay {
            Delay::After(delay) if delay.is_zero() => {
                return Err(ConfigError::new("hedge.after", "must be above zero"));
            }
            Delay::Percentile(p) if !(p > 0.0 && p < 1.0) => {
                return Err(ConfigError::new(
                    "hedge.percentile",
                    format!("must be above 0 and below 1, not {p}"),
                ));
            }
            _ => {}
        }
        if self.max_extra == 0 {
            return Err(ConfigError::new("hedge.max_extra", "must be at least 1"));
        }
        if self.window.is_zero() {
            return Err(ConfigError::new("hedge.window", "must be above zero"));
        }
        Ok(())
    }
}

/// The hedging of one layer's calls: the settings, and for a percentile the windows of
/// recent latency.
#[derive(Debug)]
pub(super) struct Hedging {
    pub(super) max_extra: u32,
    delay: Delay,
    windows: Option<Mutex<Windows>>,
}

impl Hedging {
    pub(super) fn new(hedge: &Hedge) -> Self {
        let windows = match hedge.delay {
            Delay::After(_) => None,
            Delay::Percentile(p) => Some(Mutex::new(Windows {
                p,
                min_samples: hedge.min_samples.max(1),
                period: hedge.window,
                rotate_at: None,
                current: Histogram::default(),
                delay: None,
            })),
        };
        Self {
            max_extra: hedge.max_extra,
            delay: hedge.delay,
            windows,
        }
    }

    /// The delay before a hedge of a call starting now, or `None` when there are not
    /// enough measured calls to take it from.
    pub(super) fn delay(&self, now: Instant) -> Option<Duration> {
        match (&self.delay, &self.windows) {
            (Delay::After(delay), _) => Some(*delay),
            (_, Some(windows)) => windows.lock().ok()?.delay(now),
            (Delay::Percentile(_), None) => None,
        }
    }

    /// A call's time from its start to its first chunk.
    pub(super) fn record(&self, now: Instant, latency: Duration) {
        if let Some(Ok(mut windows)) = self.windows.as_ref().map(Mutex::lock) {
            windows.rotate(now);
            windows.current.record(latency);
        }
    }
}

/// The current window, and the delay taken from the one before.
#[derive(Debug)]
struct Windows {
    p: f64,
    min_samples: u64,
    period: Duration,
    /// When the current window ends; set by the first call recorded.
    rotate_at: Option<Instant>,
    current: Histogram,
    /// From the last full window, if it held `min_samples` calls.
    delay: Option<Duration>,
}

impl Windows {
    fn delay(&mut self, now: Instant) -> Option<Duration> {
        self.rotate(now);
        self.delay
    }

    fn rotate(&mut self, now: Instant) {
        let Some(at) = self.rotate_at else {
            self.rotate_at = Some(crate::deadline::from(now, self.period));
            return;
        };
        if now < at {
            return;
        }
        // A window that ended more than a window ago is stale: nothing recent to read.
        self.delay = if now < crate::deadline::from(at, self.period) {
            self.current.quantile(self.p, self.min_samples)
        } else {
            None
        };
        self.current.clear();
        self.rotate_at = Some(crate::deadline::from(now, self.period));
    }
}

/// Values below this many microseconds have a counter each; above, each power of two
/// has this many.
const STEPS: u64 = 32;
const STEP_BITS: u32 = STEPS.trailing_zeros();
/// Powers of two above `STEPS` held, up to 2^41 µs (25 days); longer is counted there.
const OCTAVES: u64 = 36;
const BUCKETS: usize = (STEPS + OCTAVES * STEPS) as usize;

/// Counts of latencies, log-linear in microseconds.
#[derive(Debug)]
struct Histogram {
    counts: Box<[u32]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
        }
    }
}

impl Histogram {
    fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let index = bucket(micros).min(BUCKETS - 1);
        self.counts[index] = self.counts[index].saturating_add(1);
        self.total += 1;
    }

    fn clear(&mut self) {
        self.counts.fill(0);
        self.total = 0;
    }

    /// The upper end of the bucket holding the `p` quantile, or `None` below
    /// `min_samples`.
    fn quantile(&self, p: f64, min_samples: u64) -> Option<Duration> {
        if self.total < min_samples {
            return None;
        }
        // The rank of the quantile, 1-based: the smallest value with at least `p` of
        // the calls at or below it.
        let rank = ((p * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        let index = self.counts.iter().position(|&count| {
            seen += u64::from(count);
            seen >= rank
        })?;
        Some(Duration::from_micros(upper_end(index)))
    }
}

/// The counter of a value in microseconds.
fn bucket(micros: u64) -> usize {
    if micros < STEPS {
        return micros as usize;
    }
    // `micros` is `step << shift` with `step` in `STEPS..2 * STEPS`.
    let shift = u64::from(63 - micros.leading_zeros() - STEP_BITS);
    let step = micros >> shift;
    (STEPS + shift * STEPS + (step - STEPS)) as usize
}

/// The largest value in microseconds counted by `index`.
fn upper_end(index: usize) -> u64 {
    let index = index as u64;
    if index < STEPS {
        return index;
    }
    let shift = (index - STEPS) / STEPS;
    let step = STEPS + (index - STEPS) % STEPS;
    ((step + 1) << shift) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_rounds_up_by_at_most_one_step_and_never_down() {
        for micros in (0..5_000).chain([199_999, 200_000, 10_000_000, u64::MAX >> 30]) {
            let upper = upper_end(bucket(micros));
            assert!(upper >= micros, "{micros} rounds down to {upper}");
            assert!(
                upper - micros <= micros / STEPS,
                "{micros} rounds up to {upper}"
            );
        }
        // Buckets are in order, and the last holds the longest.
        assert!((1..BUCKETS).all(|i| upper_end(i) > upper_end(i - 1)));
        assert_eq!(bucket(u64::MAX).min(BUCKETS - 1), BUCKETS - 1);
    }

    #[test]
    fn the_quantile_is_the_upper_end_of_its_bucket() {
        let mut histogram = Histogram::default();
        for _ in 0..95 {
            histogram.record(Duration::from_millis(200));
        }
        for _ in 0..5 {
            histogram.record(Duration::from_secs(10));
        }
        let p95 = histogram.quantile(0.95, 20).expect("enough samples");
        assert!(p95 >= Duration::from_millis(200) && p95 < Duration::from_millis(207));
        let p99 = histogram.quantile(0.99, 20).expect("enough samples");
        assert!(p99 >= Duration::from_secs(10) && p99 < Duration::from_millis(10_320));
        assert_eq!(histogram.quantile(0.5, 101), None, "below min_samples");
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_comes_from_the_last_full_window_and_follows_a_change() {
        let hedging = Hedging::new(&Hedge::percentile(0.5).min_samples(3));
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(hedging.delay(at(0)), None, "nothing measured");
        for _ in 0..3 {
            hedging.record(at(1), Duration::from_millis(100));
        }
        assert_eq!(hedging.delay(at(9)), None, "the first window is not over");
        let first = hedging.delay(at(10)).expect("a full window");
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(104));
        // Slower calls: the delay follows once their window is over.
        for _ in 0..3 {
            hedging.record(at(11), Duration::from_millis(800));
        }
        assert_eq!(hedging.delay(at(19)), Some(first));
        let second = hedging.delay(at(20)).expect("a full window");
        assert!(second >= Duration::from_millis(800) && second < Duration::from_millis(825));
        // Too few calls in a window, then none for long: no delay to go by.
        hedging.record(at(21), Duration::from_millis(800));
        assert_eq!(hedging.delay(at(30)), None, "one call is below min_samples");
        assert_eq!(hedging.delay(at(100)), None, "stale");
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let setting = |hedge: Hedge| hedge.validate().map_err(|e| e.setting().to_owned());
        assert_eq!(
            setting(Hedge::after(Duration::ZERO)),
            Err("hedge.after".into())
        );
        for p in [0.0, 1.0, -0.5, f64::NAN] {
            assert_eq!(
                setting(Hedge::percentile(p)),
                Err("hedge.percentile".into())
            );
        }
        let zero = Hedge::after(Duration::from_secs(1)).max_extra(0);
        assert_eq!(setting(zero), Err("hedge.max_extra".into()));
        let window = Hedge::percentile(0.9).window(Duration::ZERO);
        assert_eq!(setting(window), Err("hedge.window".into()));
        assert_eq!(setting(Hedge::percentile(0.9)), Ok(()));
        // A hedge sends the request again while the first attempt may be processing it.
        let policy = crate::RetryPolicy::default()
            .hedge(Hedge::after(Duration::from_secs(1)))
            .retry_maybe_processed(false);
        let error = policy
            .validate()
            .expect_err("hedging what may be processed");
        assert_eq!(error.setting(), "hedge");
    }
}
