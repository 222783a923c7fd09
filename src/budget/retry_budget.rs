use std::fmt;
use std::time::Duration;

// Under `--cfg shuttle` the lock is shuttle's, so that its scheduler can explore the
// interleavings of concurrent deposits and withdrawals (see the tests below).
#[cfg(shuttle)]
use shuttle::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(shuttle))]
use std::sync::{Arc, Mutex, MutexGuard};

use opentelemetry::metrics::Meter;
use tokio::time::Instant;

use crate::ConfigError;
use crate::metrics::same_meter;

/// Units of balance one retry costs. Ratios are kept in millionths, so that every
/// ratio with up to six decimals is exact: 0.6 allows 60 retries per 100 requests.
const RETRY_COST: u128 = 1_000_000;
/// The window is kept as this many slices; deposits expire slice by slice.
const SLICES: usize = 10;

/// How many retries a set of calls may add, shared by every call that holds a clone.
///
/// A budget bounds retries to a share of the traffic, so that an upstream outage does
/// not turn every call into `max_attempts` calls. The rule is Finagle's: every original
/// request deposits, every retry withdraws, and over the last `ttl` a retry is allowed
/// while
///
/// ```text
/// retries + 1 <= retry_ratio * requests + min_per_sec * ttl_secs
/// ```
///
/// The `min_per_sec * ttl` reserve lets a quiet client still retry a little. Deposits
/// and retries expire after `ttl` (in ten slices, so between 0.9 and 1.0 `ttl`).
///
/// Unlike tower's [`TpsBudget`](https://docs.rs/tower/0.5/tower/retry/budget/struct.TpsBudget.html) the ratio is not
/// rounded to a whole `1 / ratio` (0.6 allows 60 %, not 100 %), and a withdrawal checks
/// and takes in one step, so concurrent callers never overdraw.
///
/// Cloning is cheap: clones share the same budget.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::RetryBudget;
///
/// // No reserve: only the ratio counts.
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.6);
/// for _ in 0..100 {
///     budget.deposit();
/// }
/// assert_eq!(budget.available(), 60);
/// let granted = (0..100).filter(|_| budget.withdraw()).count();
/// assert_eq!(granted, 60);
/// # Ok::<(), tower_stream_backpressure::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    ttl: Duration,
    min_per_sec: u32,
    retry_ratio: f64,
    /// Units one deposit adds: `retry_ratio * RETRY_COST`.
    deposit_value: u128,
    /// Units always available: `min_per_sec * ttl * RETRY_COST`.
    reserve: u128,
    slice: Duration,
    window: Mutex<Window>,
    /// The meters this budget's gauge is registered with, so that it is registered
    /// once per meter however many layers share the budget. Holding them keeps each
    /// one's identity (its address) from being reused by another meter.
    gauges: std::sync::Mutex<Vec<Meter>>,
}

/// A handle on a budget that does not keep it alive: what its gauge holds.
#[derive(Clone)]
pub(crate) struct WeakRetryBudget {
    inner: std::sync::Weak<Inner>,
}

impl WeakRetryBudget {
    /// The budget, if some handle on it is still alive.
    pub(crate) fn upgrade(&self) -> Option<RetryBudget> {
        self.inner.upgrade().map(|inner| RetryBudget { inner })
    }
}

/// Counts over the last `ttl`, in `SLICES` slices, the newest at `current`.
#[derive(Debug)]
struct Window {
    deposits: [u64; SLICES],
    retries: [u64; SLICES],
    current: usize,
    current_started: Instant,
    total_deposits: u64,
    total_retries: u64,
}

impl RetryBudget {
    /// A budget over a window of `ttl` that always allows `min_per_sec` retries per
    /// second and, beyond that, `retry_ratio` retries per request.
    ///
    /// # Panics
    ///
    /// When a parameter is out of range (see [`try_new`](Self::try_new), which returns
    /// the error instead, for settings read from configuration).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// // A 10 s window, 5 retries a second always, plus 10 % of requests.
    /// let budget = RetryBudget::new(Duration::from_secs(10), 5, 0.1);
    /// assert_eq!(budget.available(), 50);
    /// ```
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f64) -> Self {
        Self::try_new(ttl, min_per_sec, retry_ratio)
            .unwrap_or_else(|error| panic!("RetryBudget: {error}"))
    }

    /// Like [`new`](Self::new), but returns an error naming the parameter out of range:
    /// `ttl` must be within 1 s and 60 s, `retry_ratio` a number within 0 and 1000.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let error = RetryBudget::try_new(Duration::from_secs(10), 5, -1.0).unwrap_err();
    /// assert_eq!(error.setting(), "retry_ratio");
    /// assert!(RetryBudget::try_new(Duration::from_secs(10), 5, 0.1).is_ok());
    /// ```
    pub fn try_new(ttl: Duration, min_per_sec: u32, retry_ratio: f64) -> Result<Self, ConfigError> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(ConfigError::new(
                "ttl",
                format!("must be within 1s and 60s, got {ttl:?}"),
            ));
        }
        if !(0.0..=1000.0).contains(&retry_ratio) {
            return Err(ConfigError::new(
                "retry_ratio",
                format!("must be a number within 0 and 1000, got {retry_ratio}"),
            ));
        }
        let deposit_value = (retry_ratio * RETRY_COST as f64).round() as u128;
        let reserve = u128::from(min_per_sec) * ttl.as_millis() * RETRY_COST / 1000;
        Ok(Self {
            inner: Arc::new(Inner {
                ttl,
                min_per_sec,
                retry_ratio,
                deposit_value,
                reserve,
                slice: ttl / SLICES as u32,
                window: Mutex::new(Window {
                    deposits: [0; SLICES],
                    retries: [0; SLICES],
                    current: 0,
                    current_started: Instant::now(),
                    total_deposits: 0,
                    total_retries: 0,
                }),
                gauges: std::sync::Mutex::default(),
            }),
        })
    }

    /// Records one original request; it allows `retry_ratio` retries for `ttl`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
    /// budget.deposit();
    /// assert_eq!(budget.available(), 0, "half a retry is not a retry");
    /// budget.deposit();
    /// assert_eq!(budget.available(), 1);
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn deposit(&self) {
        let mut window = self.window();
        let current = window.current;
        window.deposits[current] += 1;
        window.total_deposits += 1;
    }

    /// Takes one retry if the budget allows it, and says whether it did.
    ///
    /// The check and the withdrawal are one step: concurrent callers never take more
    /// than the budget holds.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    /// assert!(!budget.withdraw(), "nothing deposited yet");
    /// budget.deposit();
    /// assert!(budget.withdraw());
    /// assert!(!budget.withdraw());
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn withdraw(&self) -> bool {
        let mut window = self.window();
        let granted = self.balance(&window) >= RETRY_COST;
        if granted {
            let current = window.current;
            window.retries[current] += 1;
            window.total_retries += 1;
        }
        granted
    }

    /// How many retries the budget would allow now.
    ///
    /// ```
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::default();
    /// assert_eq!(budget.available(), 100, "10 retries a second over 10 s");
    /// assert!(budget.withdraw());
    /// assert_eq!(budget.available(), 99);
    /// ```
    pub fn available(&self) -> u64 {
        let window = self.window();
        u64::try_from(self.balance(&window) / RETRY_COST).unwrap_or(u64::MAX)
    }

    /// The window over which deposits and retries count.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// assert_eq!(RetryBudget::default().ttl(), Duration::from_secs(10));
    /// ```
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Retries per second always allowed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(2), 3, 0.0);
    /// assert_eq!(budget.min_per_sec(), 3);
    /// assert_eq!(budget.available(), 6, "3 a second over 2 s");
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn min_per_sec(&self) -> u32 {
        self.inner.min_per_sec
    }

    /// Retries allowed per original request, beyond the reserve.
    ///
    /// ```
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// assert_eq!(RetryBudget::default().retry_ratio(), 0.2);
    /// ```
    pub fn retry_ratio(&self) -> f64 {
        self.inner.retry_ratio
    }

    /// Gives back the retry just withdrawn: a call that needs a retry from several
    /// budgets takes none when one of them refuses.
    pub(crate) fn refund(&self) {
        let mut window = self.window();
        // The retry is in the newest slice that holds one: the current slice, unless
        // it turned in between. A retry already expired has nothing to give back.
        for back in 0..SLICES {
            let slice = (window.current + SLICES - back) % SLICES;
            if window.retries[slice] > 0 {
                window.retries[slice] -= 1;
                window.total_retries -= 1;
                return;
            }
        }
    }

    /// Whether `other` is this budget (or a clone of it), not merely an equal one.
    pub(crate) fn same(&self, other: &RetryBudget) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A handle that does not keep the budget alive.
    pub(crate) fn downgrade(&self) -> WeakRetryBudget {
        WeakRetryBudget {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Records that this budget's gauge is registered with `meter`, and says whether
    /// this is the first time: only then is it to be registered.
    pub(crate) fn first_gauge_on(&self, meter: &Meter) -> bool {
        let mut gauges = self.inner.gauges.lock().unwrap_or_else(|e| e.into_inner());
        if gauges.iter().any(|known| same_meter(known, meter)) {
            return false;
        }
        gauges.push(meter.clone());
        true
    }

    /// How many handles share this budget (clones, services).
    #[cfg(test)]
    pub(crate) fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// How many gauge callbacks read this budget.
    #[cfg(test)]
    pub(crate) fn gauges(&self) -> usize {
        Arc::weak_count(&self.inner)
    }

    fn balance(&self, window: &Window) -> u128 {
        let earned =
            u128::from(window.total_deposits) * self.inner.deposit_value + self.inner.reserve;
        earned.saturating_sub(u128::from(window.total_retries) * RETRY_COST)
    }

    /// The window, with the slices older than `ttl` expired.
    fn window(&self) -> MutexGuard<'_, Window> {
        // A panic cannot leave the counters half-updated, so a poisoned lock is usable.
        let mut window = self.inner.window.lock().unwrap_or_else(|e| e.into_inner());
        window.expire(Instant::now(), self.inner.slice);
        window
    }
}

impl Window {
    fn expire(&mut self, now: Instant, slice: Duration) {
        let elapsed = now.saturating_duration_since(self.current_started);
        if elapsed < slice {
            return;
        }
        let passed = elapsed.as_nanos() / slice.as_nanos();
        for _ in 0..passed.min(SLICES as u128) {
            self.current = (self.current + 1) % SLICES;
            self.total_deposits -= std::mem::take(&mut self.deposits[self.current]);
            self.total_retries -= std::mem::take(&mut self.retries[self.current]);
        }
        // The new current slice started at the last slice boundary before `now`.
        let into_slice = elapsed.as_nanos() % slice.as_nanos();
        self.current_started = now - Duration::from_nanos(into_slice as u64);
    }
}

impl Default for RetryBudget {
    /// Finagle's defaults: a 10 s window, 10 retries per second, and 20 % of requests.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.inner.ttl)
            .field("min_per_sec", &self.inner.min_per_sec)
            .field("retry_ratio", &self.inner.retry_ratio)
            .field("available", &self.available())
            .finish()
    }
}

#[cfg(feature = "tower-budget")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower-budget")))]
impl tower::retry::budget::Budget for RetryBudget {
    fn deposit(&self) {
        RetryBudget::deposit(self)
    }

    fn withdraw(&self) -> bool {
        RetryBudget::withdraw(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn budget(ttl_secs: u64, min_per_sec: u32, ratio: f64) -> RetryBudget {
        RetryBudget::new(Duration::from_secs(ttl_secs), min_per_sec, ratio)
    }

    fn deposit(budget: &RetryBudget, n: usize) {
        for _ in 0..n {
            budget.deposit();
        }
    }

    fn drain(budget: &RetryBudget) -> u64 {
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
        }
        granted
    }

    #[test]
    fn ratios_are_exact_not_rounded_to_a_whole_inverse() {
        // tower's TpsBudget truncates 1/0.6 to 1 and allows 100 %.
        for (ratio, requests, retries) in [
            (0.6, 100, 60),
            (0.2, 1000, 200),
            (0.29, 100, 29),
            (0.7, 10, 7),
            (1.0, 10, 10),
            (2.5, 10, 25),
            (0.0, 100, 0),
            (1000.0, 1, 1000),
        ] {
            let b = budget(10, 0, ratio);
            deposit(&b, requests);
            assert_eq!(b.available(), retries, "ratio {ratio}");
            assert_eq!(drain(&b), retries, "ratio {ratio}");
            assert_eq!(b.available(), 0);
        }
    }

    #[test]
    fn the_reserve_is_min_per_sec_times_ttl() {
        let b = budget(10, 10, 0.2);
        assert_eq!(b.available(), 100);
        deposit(&b, 50);
        assert_eq!(b.available(), 110);
        assert_eq!(drain(&b), 110);
        // A withdrawal never takes a fraction: 0.2 of one more request is not a retry.
        b.deposit();
        assert!(!b.withdraw());
        deposit(&b, 4);
        assert!(b.withdraw());
        let fractional = RetryBudget::new(Duration::from_millis(1500), 3, 0.0);
        assert_eq!(fractional.available(), 4, "3/s over 1.5 s");
    }

    #[test]
    fn defaults_are_finagles() {
        let b = RetryBudget::default();
        assert_eq!(b.ttl(), Duration::from_secs(10));
        assert_eq!(b.min_per_sec(), 10);
        assert_eq!(b.retry_ratio(), 0.2);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_and_retries_expire_after_ttl() {
        let b = budget(10, 0, 1.0);
        deposit(&b, 10);
        assert_eq!(drain(&b), 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        deposit(&b, 4);
        assert_eq!(b.available(), 4);
        // The first ten deposits and ten retries leave the window together.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.available(), 4);
        assert_eq!(drain(&b), 4);
        // Everything gone after a whole ttl of silence.
        tokio::time::advance(Duration::from_secs(10)).await;
        deposit(&b, 3);
        assert_eq!(b.available(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_deposit_expires_while_newer_ones_stay() {
        let b = budget(10, 0, 1.0);
        b.deposit();
        tokio::time::advance(Duration::from_secs(9)).await;
        b.deposit();
        assert_eq!(b.available(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.available(), 1, "the first deposit is ttl old");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(b.available(), 0);
        // A long silence does not loop once per slice missed.
        tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
        b.deposit();
        assert_eq!(b.available(), 1);
    }

    #[test]
    fn concurrent_callers_never_overdraw() {
        let b = budget(60, 0, 0.5);
        deposit(&b, 10_000);
        let granted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, granted) = (b.clone(), granted.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        if b.withdraw() {
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                        // Interleave deposits that each add half a retry.
                        b.deposit();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // 10,000 + 16,000 deposits at 0.5 allow exactly 13,000 retries; 16,000 were
        // asked for, so the budget ran dry and every unit was taken exactly once.
        let taken = granted.load(Ordering::Relaxed) + drain(&b);
        assert_eq!(taken, 13_000);
    }

    #[test]
    fn out_of_range_settings_name_the_parameter() {
        let ttl = Duration::from_secs(10);
        for (result, setting) in [
            (
                RetryBudget::try_new(Duration::from_millis(999), 10, 0.2),
                "ttl",
            ),
            (
                RetryBudget::try_new(Duration::from_secs(61), 10, 0.2),
                "ttl",
            ),
            (RetryBudget::try_new(ttl, 10, -0.1), "retry_ratio"),
            (RetryBudget::try_new(ttl, 10, 1000.1), "retry_ratio"),
            (RetryBudget::try_new(ttl, 10, f64::NAN), "retry_ratio"),
            (RetryBudget::try_new(ttl, 10, f64::INFINITY), "retry_ratio"),
        ] {
            let error = result.unwrap_err();
            assert_eq!(error.setting(), setting);
            assert!(error.to_string().contains(setting), "{error}");
        }
        assert!(RetryBudget::try_new(Duration::from_secs(60), u32::MAX, 1000.0).is_ok());
        assert!(RetryBudget::try_new(Duration::from_secs(1), 0, 0.0).is_ok());
    }

    #[test]
    fn huge_settings_do_not_overflow() {
        let b = RetryBudget::new(Duration::from_secs(60), u32::MAX, 1000.0);
        assert_eq!(b.available(), u64::from(u32::MAX) * 60);
        b.deposit();
        assert_eq!(b.available(), u64::from(u32::MAX) * 60 + 1000);
    }

    #[cfg(feature = "tower-budget")]
    #[test]
    fn serves_as_a_tower_budget() {
        use tower::retry::budget::Budget;
        fn spend(budget: &impl Budget) -> bool {
            budget.deposit();
            budget.withdraw()
        }
        let b = budget(10, 0, 1.0);
        assert!(spend(&b));
        assert_eq!(b.available(), 0);
    }
}

/// Model-checked with shuttle: `RUSTFLAGS="--cfg shuttle" cargo test --lib shuttle`.
#[cfg(all(test, shuttle))]
mod shuttle_tests {
    use super::*;

    /// Threads deposit and withdraw at once, in every order shuttle tries: no more
    /// retries are granted than the formula allows, none is lost, and the balance left
    /// is exactly the formula's.
    #[test]
    fn concurrent_withdrawals_never_overdraw() {
        shuttle::check_random(
            || {
                // Two retries' worth of reserve, half a retry per deposit.
                let budget = RetryBudget::new(Duration::from_secs(60), 0, 0.5);
                for _ in 0..4 {
                    budget.deposit();
                }
                let threads: Vec<_> = (0..3)
                    .map(|_| {
                        let budget = budget.clone();
                        shuttle::thread::spawn(move || {
                            budget.deposit();
                            (0..2).filter(|_| budget.withdraw()).count() as u64
                        })
                    })
                    .collect();
                let granted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
                // 7 deposits: 3.5 retries.
                assert_eq!(granted, 3, "granted");
                assert_eq!(budget.available(), 0);
                assert!(!budget.withdraw());
            },
            2_000,
        );
    }

    /// `available` read while others withdraw never exceeds what was deposited.
    #[test]
    fn available_is_never_above_the_formula() {
        shuttle::check_random(
            || {
                let budget = RetryBudget::new(Duration::from_secs(60), 0, 1.0);
                let depositor = {
                    let budget = budget.clone();
                    shuttle::thread::spawn(move || {
                        for _ in 0..3 {
                            budget.deposit();
                        }
                    })
                };
                let withdrawer = {
                    let budget = budget.clone();
                    shuttle::thread::spawn(move || (0..3).filter(|_| budget.withdraw()).count())
                };
                for _ in 0..3 {
                    assert!(budget.available() <= 3);
                }
                depositor.join().unwrap();
                let granted = withdrawer.join().unwrap() as u64;
                assert_eq!(budget.available(), 3 - granted);
            },
            2_000,
        );
    }
}
