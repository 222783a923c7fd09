//! The adaptive limit: its settings ([`Adaptive`]) and the state that moves it over
//! the layer's semaphore ([`Limiter`]). Why and how: the module docs of
//! [`concurrency`](super), "Adaptive limit".

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::ConfigError;

/// How an adaptive [`StreamConcurrencyLayer`](crate::StreamConcurrencyLayer) moves its
/// limit: see [`StreamConcurrencyLayer::adaptive`](crate::StreamConcurrencyLayer::adaptive)
/// and the [module docs](super#adaptive-limit).
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`initial`](Self::initial) | 20 | the limit before any signal |
/// | [`min`](Self::min) | 1 | it never goes below |
/// | [`max`](Self::max) | 200 | it never goes above |
///
/// ```
/// use tower_stream_backpressure::concurrency::Adaptive;
///
/// let aimd = Adaptive::default().initial(10).max(100);
/// let gradient = Adaptive::gradient().min(4);
/// assert_eq!(aimd.get_initial(), 10);
/// assert_eq!(gradient.get_min(), 4);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use = "settings do nothing until a layer uses them"]
pub struct Adaptive {
    algorithm: Algorithm,
    initial: usize,
    min: usize,
    max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Algorithm {
    Aimd,
    Gradient,
}

/// AIMD: multiply by 0.9 on an overload signal, add 1 per window in which the limit was
/// reached without one; from 20, between 1 and 200.
///
/// ```
/// use tower_stream_backpressure::concurrency::Adaptive;
///
/// let aimd = Adaptive::default();
/// assert_eq!((aimd.get_initial(), aimd.get_min(), aimd.get_max()), (20, 1, 200));
/// ```
impl Default for Adaptive {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Aimd,
            initial: 20,
            min: 1,
            max: 200,
        }
    }
}

/// The multiplier of a decrease.
const BACKOFF: f64 = 0.9;
/// Gradient2's tolerance of the latest time to first chunk over the long-term one.
const TOLERANCE: f64 = 1.5;
/// Gradient2's allowance for calls queued above the gradient's limit.
const QUEUE: f64 = 4.0;
/// Gradient2's smoothing of each new limit.
const SMOOTHING: f64 = 0.2;
/// Samples in the long-term average of the time to first chunk.
const LONG_SAMPLES: f64 = 600.0;
/// A window whose fastest first chunk is this many times slower than the fastest recent
/// one is an overload: the upstream is queueing the work. (In the adaptive-limit
/// simulation, 1.3 holds AIMD within 25 % of the capacity after each change; 1.5 and 2.0
/// let it overshoot further before the queue shows.)
const SLOW: f64 = 1.3;
/// How much the fastest recent time to first chunk rises each window: it doubles in
/// about 70 windows of nothing faster.
const FASTEST_AGING: f64 = 1.01;
/// The window before any first chunk was measured, and its bounds after.
const FIRST_WINDOW: Duration = Duration::from_secs(1);
const MIN_WINDOW: Duration = Duration::from_millis(10);
const MAX_WINDOW: Duration = Duration::from_secs(10);

impl Adaptive {
    /// The gradient algorithm: the limit follows the ratio of the long-term to the
    /// latest time to first chunk (Netflix's Gradient2 shape), and decreases by 0.9 on
    /// an overload signal; from 20, between 1 and 200.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert_eq!(Adaptive::gradient().get_max(), 200);
    /// ```
    pub fn gradient() -> Self {
        Self {
            algorithm: Algorithm::Gradient,
            ..Self::default()
        }
    }

    /// The limit before any signal (default 20).
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert_eq!(Adaptive::default().initial(50).get_initial(), 50);
    /// ```
    pub fn initial(self, limit: usize) -> Self {
        Self {
            initial: limit,
            ..self
        }
    }

    /// The lowest the limit goes (default 1, at least 1).
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert_eq!(Adaptive::default().min(5).get_min(), 5);
    /// ```
    pub fn min(self, limit: usize) -> Self {
        Self { min: limit, ..self }
    }

    /// The highest the limit goes (default 200).
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert_eq!(Adaptive::default().max(64).get_max(), 64);
    /// ```
    pub fn max(self, limit: usize) -> Self {
        Self { max: limit, ..self }
    }

    /// The [`initial`](Self::initial) limit in force.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert_eq!(Adaptive::default().get_initial(), 20);
    /// ```
    pub fn get_initial(&self) -> usize {
        self.initial
    }

    /// The [`min`](Self::min) in force.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert_eq!(Adaptive::default().get_min(), 1);
    /// ```
    pub fn get_min(&self) -> usize {
        self.min
    }

    /// The [`max`](Self::max) in force.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert_eq!(Adaptive::default().get_max(), 200);
    /// ```
    pub fn get_max(&self) -> usize {
        self.max
    }

    /// Checks every setting; the error names the one out of range.
    ///
    /// ```
    /// use tower_stream_backpressure::concurrency::Adaptive;
    ///
    /// assert!(Adaptive::default().validate().is_ok());
    /// let error = Adaptive::default().min(0).validate().unwrap_err();
    /// assert_eq!(error.setting(), "adaptive.min");
    /// let error = Adaptive::default().initial(500).validate().unwrap_err();
    /// assert_eq!(error.setting(), "adaptive.initial");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min == 0 {
            return Err(ConfigError::new("adaptive.min", "must be at least 1"));
        }
        if self.max < self.min {
            return Err(ConfigError::new(
                "adaptive.max",
                format!("must be at least min ({}), got {}", self.min, self.max),
            ));
        }
        if self.max > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "adaptive.max",
                format!(
                    "must be at most {}, got {}",
                    Semaphore::MAX_PERMITS,
                    self.max
                ),
            ));
        }
        if !(self.min..=self.max).contains(&self.initial) {
            return Err(ConfigError::new(
                "adaptive.initial",
                format!(
                    "must be within min and max ({}..={}), got {}",
                    self.min, self.max, self.initial
                ),
            ));
        }
        Ok(())
    }
}

/// The moving limit of one layer, over the layer's semaphore.
#[derive(Debug)]
pub(crate) struct Limiter {
    adaptive: Adaptive,
    semaphore: std::sync::Arc<Semaphore>,
    /// The limit in force, for readers that take no lock.
    limit: AtomicUsize,
    /// Slots to keep when they are released, rather than give back: what a decrease
    /// could not take from the free ones.
    debt: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limit: usize,
    /// The limit as the gradient computes it, before rounding.
    exact: f64,
    /// When the current window ends, from its first sample.
    window_ends: Option<Instant>,
    /// The limit was reached in the current window.
    reached: bool,
    /// An overload signal came in the current window.
    overloaded: bool,
    /// When the last decrease was.
    decreased: Option<Instant>,
    /// Gradient2's long-term average, in seconds.
    long: Option<f64>,
    /// The fastest recent time to first chunk, in seconds, aging by
    /// [`FASTEST_AGING`] a window.
    fastest: Option<f64>,
    /// The fastest in the current window.
    window_fastest: Option<f64>,
}

impl Limiter {
    pub(crate) fn new(adaptive: Adaptive, semaphore: std::sync::Arc<Semaphore>) -> Self {
        let limit = adaptive.initial;
        Self {
            adaptive,
            semaphore,
            limit: AtomicUsize::new(limit),
            debt: AtomicUsize::new(0),
            state: Mutex::new(State {
                limit,
                exact: limit as f64,
                window_ends: None,
                reached: false,
                overloaded: false,
                decreased: None,
                long: None,
                fastest: None,
                window_fastest: None,
            }),
        }
    }

    /// The limit in force.
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// A slot is released: its permit goes back, unless a decrease is still owed.
    pub(crate) fn release(&self) {
        let owed = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                debt.checked_sub(1)
            });
        if owed.is_err() {
            self.semaphore.add_permits(1);
        }
    }

    /// An attempt met an overload signal.
    pub(crate) fn overloaded(&self, now: Instant) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        self.decrease(&mut state, now);
    }

    /// One decrease per window: a burst of signals is one congestion event.
    fn decrease(&self, state: &mut State, now: Instant) {
        state.overloaded = true;
        let window = state.window();
        if state.decreased.is_some_and(|at| now < at + window) {
            // The same congestion event.
            return;
        }
        state.decreased = Some(now);
        let limit = ((state.limit as f64) * BACKOFF).floor() as usize;
        let limit = limit.clamp(self.adaptive.min, self.adaptive.max);
        state.exact = limit as f64;
        self.set(state, limit);
    }

    /// An attempt produced its first chunk after `latency` from its start (`None`: it
    /// answered, at a time that says nothing of its first chunk).
    pub(crate) fn answered(&self, now: Instant, latency: Option<Duration>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let sample = latency.map(|latency| latency.as_secs_f64());
        if let Some(sample) = sample {
            state.fastest = Some(state.fastest.map_or(sample, |fastest| fastest.min(sample)));
            let window = state
                .window_fastest
                .map_or(sample, |fastest| fastest.min(sample));
            state.window_fastest = Some(window);
        }
        let in_use = self.in_use(state.limit);
        // Reached by the calls it admits, not by streams still draining a shrink.
        if in_use >= state.limit && self.debt.load(Ordering::Acquire) == 0 {
            state.reached = true;
        }
        // The window: at its end, it is an overload when even its fastest first chunk
        // was far slower than the fastest recent one (the upstream queueing, which is
        // the overload a limit is for, before it refuses: a queue delays every call,
        // where prompts of different lengths only spread them); else AIMD grows, if the
        // limit was reached without an overload signal.
        let ended = match state.window_ends {
            None => {
                state.window_ends = Some(now + state.window());
                false
            }
            Some(ends) => now >= ends,
        };
        if ended {
            // Only with half the slots in use or more (Gradient2's rule): with fewer,
            // this layer's calls are not what the upstream queues, and a window of one
            // slow call says little.
            let busy = (in_use as f64) >= state.limit as f64 / 2.0;
            let queueing = match (state.window_fastest, state.fastest) {
                (Some(window), Some(fastest)) => busy && window > SLOW * fastest,
                _ => false,
            };
            if queueing {
                self.decrease(&mut state, now);
            }
            state.window_fastest = None;
            let grow = state.reached && !state.overloaded;
            state.window_ends = Some(now + state.window());
            state.reached = false;
            state.overloaded = false;
            // The fastest time ages, so that a slower upstream becomes the new normal.
            state.fastest = state.fastest.map(|fastest| fastest * FASTEST_AGING);
            let aimd = matches!(
                (self.adaptive.algorithm, sample),
                (Algorithm::Aimd, _) | (Algorithm::Gradient, None)
            );
            if grow && aimd {
                let limit = state.limit + 1;
                state.exact = limit as f64;
                self.set(&mut state, limit);
            }
        }
        // The gradient needs the time to first chunk; without it (no retry layer below
        // to measure it), it grows as AIMD does, above, so that it is not left only
        // able to shrink.
        let (Algorithm::Gradient, Some(sample)) = (self.adaptive.algorithm, sample) else {
            return;
        };
        let mut long = average(state.long, sample, LONG_SAMPLES);
        if sample > 0.0 && long / sample > 2.0 {
            long *= 0.95;
        }
        state.long = Some(long);
        // Too few calls to say anything of the capacity.
        if (in_use as f64) < state.exact / 2.0 || sample <= 0.0 {
            return;
        }
        let gradient = (TOLERANCE * long / sample).clamp(0.5, 1.0);
        let mut new = state.exact * gradient + QUEUE;
        if state.overloaded {
            // No growth in a window with an overload signal, as for AIMD.
            new = new.min(state.exact);
        }
        let (min, max) = (self.adaptive.min as f64, self.adaptive.max as f64);
        state.exact = (state.exact * (1.0 - SMOOTHING) + new * SMOOTHING).clamp(min, max);
        let limit = state.exact as usize;
        self.set(&mut state, limit);
    }

    /// Slots taken now, under `limit`.
    fn in_use(&self, limit: usize) -> usize {
        let held = limit + self.debt.load(Ordering::Acquire);
        held.saturating_sub(self.semaphore.available_permits())
    }

    /// Moves the limit to `limit`, within min and max: a larger one gives free slots
    /// (after cancelling what a decrease still owed), a smaller one takes free slots
    /// and owes the rest.
    fn set(&self, state: &mut State, limit: usize) {
        let limit = limit.clamp(self.adaptive.min, self.adaptive.max);
        let old = std::mem::replace(&mut state.limit, limit);
        if limit > old {
            let mut more = limit - old;
            let cancelled = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                    Some(debt - debt.min(more))
                })
                .unwrap_or(0);
            more -= cancelled.min(more);
            if more > 0 {
                self.semaphore.add_permits(more);
            }
        } else if limit < old {
            let fewer = old - limit;
            let taken = self.semaphore.forget_permits(fewer);
            self.debt.fetch_add(fewer - taken, Ordering::AcqRel);
        }
        self.limit.store(limit, Ordering::Release);
        if limit != old {
            tracing::debug!(from = old, to = limit, "concurrency limit moved");
        }
    }
}

impl State {
    /// The current window: the fastest recent time to first chunk (a stream's round
    /// trip without queueing), within bounds. Not the average: under congestion the
    /// average grows, and with it the time between decreases, just when they are
    /// needed sooner.
    fn window(&self) -> Duration {
        self.fastest.map_or(FIRST_WINDOW, |secs| {
            Duration::from_secs_f64(secs).clamp(MIN_WINDOW, MAX_WINDOW)
        })
    }
}

/// An exponential average over about `samples` samples.
fn average(average: Option<f64>, sample: f64, samples: f64) -> f64 {
    match average {
        None => sample,
        Some(average) => average + (sample - average) / samples,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn limiter(adaptive: Adaptive) -> (Limiter, Arc<Semaphore>) {
        let semaphore = Arc::new(Semaphore::new(adaptive.initial));
        (Limiter::new(adaptive, semaphore.clone()), semaphore)
    }

    /// Takes `n` slots, as the layer does: permits taken and forgotten.
    fn take(semaphore: &Semaphore, n: u32) {
        semaphore.try_acquire_many(n).expect("free slots").forget();
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn an_overload_burst_within_a_window_is_one_decrease() {
        let (limiter, semaphore) = limiter(Adaptive::default());
        let now = Instant::now();
        for i in 0..30 {
            limiter.overloaded(now + i * MS);
        }
        assert_eq!(limiter.limit(), 18, "20 x 0.9, once");
        assert_eq!(semaphore.available_permits(), 18);
        // A window (1 s before any first chunk) later: the next event.
        limiter.overloaded(now + Duration::from_secs(1));
        assert_eq!(limiter.limit(), 16, "18 x 0.9, floored");
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_grows_by_one_per_window_in_which_the_limit_was_reached() {
        let (limiter, semaphore) = limiter(Adaptive::default().initial(4));
        let start = Instant::now();
        let latency = Duration::from_millis(200);
        // Every slot in use: each window of 200 ms that ends adds one.
        take(&semaphore, 4);
        limiter.answered(start, Some(latency));
        for window in 1..=3 {
            let now = start + window * latency;
            // The added slot is taken too, so that the limit stays reached.
            if semaphore.available_permits() > 0 {
                take(&semaphore, 1);
            }
            limiter.answered(now, Some(latency));
        }
        assert_eq!(limiter.limit(), 7);
        // Calls that do not reach the limit do not grow it.
        let (limiter, _semaphore) = self::limiter(Adaptive::default().initial(4));
        for window in 0..5 {
            limiter.answered(start + window * latency, Some(latency));
        }
        assert_eq!(limiter.limit(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_with_an_overload_signal_does_not_grow() {
        let (limiter, semaphore) = limiter(Adaptive::default().initial(10));
        let start = Instant::now();
        let latency = Duration::from_millis(100);
        take(&semaphore, 10);
        limiter.answered(start, Some(latency));
        limiter.overloaded(start + 10 * MS);
        assert_eq!(limiter.limit(), 9);
        limiter.answered(start + latency, Some(latency));
        assert_eq!(limiter.limit(), 9, "the window had an overload signal");
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_stays_within_min_and_max() {
        let (limiter, semaphore) = limiter(Adaptive::default().initial(3).min(2).max(4));
        let start = Instant::now();
        for i in 0..10 {
            limiter.overloaded(start + i * Duration::from_secs(2));
        }
        assert_eq!(limiter.limit(), 2, "never below min");
        let latency = Duration::from_millis(100);
        for window in 0..20 {
            let free = semaphore.available_permits() as u32;
            if free > 0 {
                take(&semaphore, free);
            }
            limiter.answered(
                start + Duration::from_secs(30) + window * latency,
                Some(latency),
            );
        }
        assert_eq!(limiter.limit(), 4, "never above max");
    }

    #[tokio::test(start_paused = true)]
    async fn shrinking_keeps_held_slots_and_owes_what_it_could_not_take() {
        let (limiter, semaphore) = limiter(Adaptive::default().initial(10));
        take(&semaphore, 8);
        limiter.overloaded(Instant::now());
        // 9: one free slot taken away, and none of the 8 held revoked.
        assert_eq!(limiter.limit(), 9);
        assert_eq!(semaphore.available_permits(), 1);
        let later = Instant::now() + Duration::from_secs(2);
        limiter.overloaded(later);
        // 8: the free slot taken; the 8 held stay held.
        assert_eq!(limiter.limit(), 8);
        assert_eq!(semaphore.available_permits(), 0);
        limiter.overloaded(later + Duration::from_secs(2));
        // 7: one more owed; the first release pays it, the next gives a slot back.
        assert_eq!(limiter.limit(), 7);
        limiter.release();
        assert_eq!(semaphore.available_permits(), 0, "owed");
        limiter.release();
        assert_eq!(semaphore.available_permits(), 1);
        // Growing cancels what is owed before giving slots.
        limiter.overloaded(later + Duration::from_secs(4));
        assert_eq!(limiter.limit(), 6);
        assert_eq!(semaphore.available_permits(), 0, "the free one taken");
    }

    #[tokio::test(start_paused = true)]
    async fn the_gradient_shrinks_when_the_first_chunk_slows_and_grows_back() {
        let (limiter, semaphore) = limiter(Adaptive::gradient().initial(40));
        let start = Instant::now();
        let samples = std::cell::Cell::new(0u32);
        // Every slot the limit gives is taken, as by a queue of callers; a first chunk
        // every 50 ms.
        let sample = |latency: Duration| {
            let free = semaphore.available_permits() as u32;
            if free > 0 {
                take(&semaphore, free);
            }
            samples.set(samples.get() + 1);
            limiter.answered(start + samples.get() * 50 * MS, Some(latency));
        };
        let fast = Duration::from_millis(200);
        for _ in 0..50 {
            sample(fast);
        }
        let steady = limiter.limit();
        assert!(
            steady > 60,
            "fast calls with every slot in use grow it: {steady}"
        );
        // Four times slower: the gradient is at its floor, 0.5.
        for _ in 0..20 {
            sample(4 * fast);
        }
        let slowed = limiter.limit();
        assert!(slowed < steady / 2, "{steady} -> {slowed}");
        // Fast again: it grows back.
        for _ in 0..100 {
            sample(fast);
        }
        assert!(limiter.limit() > slowed, "{slowed} -> {}", limiter.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_whose_fastest_first_chunk_is_far_slower_is_an_overload() {
        let (limiter, semaphore) = limiter(Adaptive::default());
        // Every slot in use: the limit is reached in every window.
        take(&semaphore, 20);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let ms = |ms: u64| Some(Duration::from_millis(ms));
        // The first window (1 s before any sample): 200 ms is the fastest.
        limiter.answered(at(0), ms(200));
        limiter.answered(at(1_000), ms(200));
        // Windows of 200 ms from here. Slow calls beside fast ones: prompts of
        // different lengths, no queue.
        for window in 1..=5 {
            limiter.answered(at(1_000 + window * 200 - 100), ms(900));
            limiter.answered(at(1_000 + window * 200), ms(210));
        }
        let before = limiter.limit();
        assert!(
            before >= 20,
            "no decrease: the fastest of each window is near 200 ms"
        );
        // Every call slow for half a second: a queue, one decrease a window.
        for tenth in 1..=5 {
            limiter.answered(at(2_000 + tenth * 100), ms(400));
        }
        let after = (before as f64 * 0.9) as usize;
        assert_eq!(
            limiter.limit(),
            after,
            "even the fastest twice as slow: x 0.9"
        );
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let setting = |adaptive: Adaptive| adaptive.validate().map_err(|e| e.setting());
        assert_eq!(setting(Adaptive::default().min(0)), Err("adaptive.min"));
        assert_eq!(
            setting(Adaptive::default().min(5).max(4).initial(4)),
            Err("adaptive.max")
        );
        assert_eq!(
            setting(Adaptive::default().initial(0)),
            Err("adaptive.initial")
        );
        assert_eq!(
            setting(Adaptive::gradient().initial(201)),
            Err("adaptive.initial")
        );
        let huge = Adaptive::default().max(usize::MAX);
        assert_eq!(setting(huge), Err("adaptive.max"));
        assert_eq!(setting(Adaptive::gradient()), Ok(()));
    }
}
