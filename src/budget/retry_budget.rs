use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::ConfigError;

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
/// Unlike tower's [`TpsBudget`](tower::retry::budget::TpsBudget) the ratio is not
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
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.6)?;
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
    /// Errors name the parameter out of range: `ttl` must be within 1 s and 60 s,
    /// `retry_ratio` a number within 0 and 1000.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f64) -> Result<Self, ConfigError> {
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
            }),
        })
    }

    /// Records one original request; it allows `retry_ratio` retries for `ttl`.
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
    pub fn available(&self) -> u64 {
        let window = self.window();
        u64::try_from(self.balance(&window) / RETRY_COST).unwrap_or(u64::MAX)
    }

    /// The window over which deposits and retries count.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Retries per second always allowed.
    pub fn min_per_sec(&self) -> u32 {
        self.inner.min_per_sec
    }

    /// Retries allowed per original request, beyond the reserve.
    pub fn retry_ratio(&self) -> f64 {
        self.inner.retry_ratio
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
        Self::new(Duration::from_secs(10), 10, 0.2).expect("the defaults are in range")
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

impl tower::retry::budget::Budget for RetryBudget {
    fn deposit(&self) {
        RetryBudget::deposit(self)
    }

    fn withdraw(&self) -> bool {
        RetryBudget::withdraw(self)
    }
}
