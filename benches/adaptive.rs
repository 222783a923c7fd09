//! The adaptive concurrency limit, simulated: does `StreamConcurrencyLayer::adaptive`
//! find an upstream's capacity when nobody knows it, follow it when it changes, and
//! serve as much as the best fixed limit would, without the overload answers and the
//! slow first chunks of a limit set too high?
//!
//! ```text
//! cargo bench --bench adaptive
//! cargo bench --bench adaptive -- --capacities 40,10,80 --phase-secs 30
//! cargo bench --bench adaptive -- --only rate-limit
//! cargo bench --bench adaptive -- --help
//! ```
//!
//! # Why
//!
//! An LLM provider's capacity for one client is not a number the client can know: it
//! moves with the provider's load, the model, the deployment and the account. A fixed
//! limit set below it leaves capacity unused; set above it, the provider queues the
//! streams beyond its capacity (their first token comes later and later) and then
//! refuses them (`429`). An adaptive limit moves with the signals the upstream gives: the
//! overload answers, and, for the gradient, the time to the first chunk. Adaptive
//! limits elsewhere (Netflix's, Vector's, Envoy's, `tower-acc`) measure a call at its
//! response headers, which an LLM sends at once whatever its load; ours measures each
//! attempt at its first chunk (the module docs of `concurrency`, "Adaptive limit").
//!
//! # The scenario
//!
//! The in-process mock upstream (the one the tests use) has a hidden capacity `C` that
//! changes over time: `--capacities` for `--phase-secs` each (20 for a minute, then 60,
//! then 10). It answers each request from the streams open on it at the request's
//! arrival, this one included, `n` (`testkit::upstream::Capacity`):
//!
//! - `n <= C`: the first SSE event after `--first-ms` (200 ms);
//! - `C < n <= 1.5 C`: later in proportion to the excess, by `--excess-ms` for each `C`
//!   streams over: `200 ms + 1.2 s * (n - C) / C`, up to 800 ms at `1.5 C`;
//! - `n > 1.5 C`: `429` with `Retry-After: 1`.
//!
//! Each stream then sends `--tokens` (20) events `--gap-ms` (50 ms) apart, the first
//! included, and `data: [DONE]`: a second past its first chunk, 1.2 s in all when the
//! upstream is within capacity. That is long enough for the capacity to bound the
//! streams open at once, not the rate of requests. The excess's default, 1.2 s per `C`
//! streams over, is that uncongested length: the upstream behaves as a server that
//! runs `C` streams and queues the rest, each `C` of them in the queue waiting one
//! stream's length (Little's law), so it completes at most `C / 1.2 s` streams a second
//! however many it holds. Going over `C` gains nothing but a later first chunk.
//!
//! The offered load is above the capacity throughout: `--rate` calls a second (100,
//! twice what 60 streams of 1.2 s complete), each in its own task, steady, as requests
//! arriving at a gateway from users who do not wait for each other. A call that has not
//! had a slot after `--max-wait-ms` (2 s) gives up (`max_wait`), so the queue is
//! bounded and each second's arrivals are new callers. Closed-loop callers (a fixed
//! number, each calling again when its call ends) would couple the load to the
//! limiter's answers: a call refused at once comes back at once, and on the paused
//! clock a loop of refusals takes no time at all.
//!
//! It runs on tokio's paused clock: time only moves when every task is waiting for a
//! timer, so three minutes of traffic take seconds and do not depend on how busy the
//! machine is. The calls are real HTTP/1.1 over loopback, through a hyper-util client
//! with `TCP_NODELAY`. The retry layer's backoff jitter comes from `--seed`; the 429s
//! name their wait, so it rarely matters.
//!
//! The contenders, each against a fresh upstream, with the same arrivals:
//!
//! | contender | limit |
//! |---|---|
//! | `static10`, `static20`, `static60` | `StreamConcurrencyLayer::new(n)` |
//! | `tower-acc` | `tower_acc::ConcurrencyLimitLayer` with its `Aimd` (initial 20, min 1, max 200) |
//! | `aimd` | `StreamConcurrencyLayer::adaptive(Adaptive::default())` (initial 20, 1..=200) |
//! | `gradient` | `StreamConcurrencyLayer::adaptive(Adaptive::gradient())` (the same bounds) |
//!
//! Below each limit: `RetryBudgetLayer::new(RetryBudget::default())` and
//! `FirstChunkRetryLayer` with `RetryPolicy::default()` and a `first_chunk_timeout` of
//! 10 s (longer than any first chunk here, so that only the 429s are retried), over the
//! client. Ours have `max_wait(2 s)`; for `tower-acc`, which takes its permit in
//! `poll_ready`, the caller gives up when the service has not been ready in 2 s.
//!
//! `tower-acc` (0.1.1) builds here with tower 0.5 and brings in nothing new (tokio,
//! tokio-util, pin-project-lite and tower's traits are in the tree already): a
//! dev-dependency, for this benchmark only. It takes its permit in `poll_ready` and gives it back, and measures the
//! call, when the response future resolves: here, that of the retry layer below it,
//! which resolves at the first chunk (over a bare client it would be the headers, at
//! once). So it limits the calls waiting for their first chunk, not the streams open.
//! Its default classifier counts only errors as drops; this one also counts a `429`,
//! `503` or `529` that the retry layer gave up on, and its `min_limit` is 1 (its
//! default is 20, above one of the capacities). Of its three algorithms, only `Aimd`
//! runs as it would in production here: it reads round-trip times from std's clock,
//! which the paused clock does not move, and `Aimd` uses them only for its timeout
//! (5 s of real time, never reached); `Gradient2` and `Vegas` would steer by the
//! microseconds the loopback takes in real time.
//!
//! # What it measures
//!
//! Per contender and per phase of the capacity:
//!
//! - the limit, sampled every 100 ms (`current_limit()`; for `tower-acc`, its algorithm's
//!   `max_concurrency()`): its mean, range, and when it settled within 25 % of `C`
//!   (the first sample after which every sample of the phase is within
//!   `[0.75 C, 1.25 C]`), and the share of the phase's samples within;
//! - completed streams per second: streams read to `data: [DONE]` by the caller, by
//!   when they ended, over the phase's length; and that against the best static limit
//!   in the same phase;
//! - the upstream's `429` answers against its requests, by its own counts;
//! - the time to first chunk (TTFC) from the call's slot: from when the call left the
//!   limiter (a `map_request` below it notes the time) to the first data frame of its
//!   body, the retries included. The time spent queued for a slot is the limiter's
//!   backpressure, the same for every contender under a load above capacity (up to
//!   the 2 s a caller waits), and not counted;
//! - calls: started in the phase, given up after waiting for a slot, failed (a `429`
//!   after the retry layer gave up, or an error).
//!
//! The goals, for `aimd` and `gradient`, each marked met or not: the limit within 25 %
//! of `C` within 10 s of each change (the start counted as one: the limit starts at 20
//! knowing nothing), completed streams per second at least 90 % of the best static
//! limit's in each phase, at most 1 % of the upstream's answers `429`, and a p99 TTFC at
//! most twice the uncongested 200 ms. Consistency checks print a warning when they
//! fail: every call ended, the upstream's counts agree with the script's, the upstream
//! never held more streams than a static limit (or than an adaptive one allowed in the
//! 10 s before: a smaller limit lets held streams drain), and every slot is back once
//! the calls have ended.
//!
//! # The rate-limit run
//!
//! A second upstream has no capacity limit but a rate limit: `--rl-requests` (100)
//! requests in each fixed minute from the start, sent with OpenAI's headers
//! (`x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`,
//! `x-ratelimit-reset-requests` as a Go duration, `6m0s`, `12.5s`), and `429` with
//! `retry-after` (the seconds to the reset) beyond them (`testkit::upstream::RateLimit`).
//! `--rl-rate` (3) calls a second arrive for `--rl-secs` (180), 1.8 times what it
//! allows. Without pacing, a client learns nothing from the headers, and the count of
//! 429s is what it costs: `static20`, the same stack as above (a concurrency limit
//! does not bound a rate of requests). `pacing` is the same limit with
//! `pace_on_rate_limits(true)`, with its goal: no 429 after the first; and `aimd`, as
//! above, paces by default.
//!
//! # Output
//!
//! - stdout: the capacity run's table (a row per contender and phase), the goals, the
//!   rate-limit run's table and goal, warnings if any, and the wall time.
//! - `docs/adaptive_limit.csv` (directory from `--out-dir`): every sample, with the
//!   columns `contender,time_s,capacity,limit,upstream_open,completed`, the last the
//!   streams completed in the 100 ms up to `time_s`.
//! - `docs/adaptive_limit.svg`: over time, `C` and its 25 % band with each contender's
//!   limit, and under it the completed streams per second (5 s averages) with the
//!   upstream's most, `C / 1.2 s`.
//!
//! Completed streams are counted when they end, so the first seconds of a phase also
//! count streams the phase before let in: a limit that held many streams when `C`
//! dropped shows more than `C / 1.2 s` in the next phase (105.6 % of the best static
//! limit for `aimd` at `C = 10`).
//!
//! # Reading it
//!
//! With the defaults (the run is the same from one time to the next: the paused clock,
//! steady arrivals, a fixed seed):
//!
//! - **Static limits.** This upstream completes at most `C / 1.2 s` streams a second
//!   (16.7, 50 and 8.3), whatever it holds: a static limit at or above `C` gets that,
//!   one below it `n / 1.2 s` (`static10`: 8.3 throughout). Above `C` a limit buys only
//!   a later first chunk, and above `1.5 C` the upstream refuses: `static60` had 86 %
//!   of its answers `429` at `C = 20` and 93 % at `C = 10`, and a p99 time to first
//!   chunk of 2.8 s (two 429s waited out, then 800 ms). So the best static limit of each
//!   phase is one at or above `C` (by a few streams, the one that held the most at the
//!   change before), and the throughput goal asks an adaptive limit not to stay under
//!   `C`; the other goals ask it not to go over.
//! - **`aimd`.** It reads the queue as it forms: a window whose fastest first chunk is
//!   1.3 times slower than the fastest recent one is an overload signal, which on this
//!   upstream comes at about `1.05 C` (a window later), so it saws just above `C`. Its 429s come when `C` falls with many
//!   streams open: the limit is down within seconds, but the streams let in before the
//!   fall drain slowly, and the retries of the calls refused meanwhile, made under those
//!   calls' own slots, meet the same 429. (Before the latency signal, its only signal
//!   here was the `429` at `1.5 C`, where it settled.)
//! - **`gradient`.** It moves at every first chunk, and the first chunks that show an
//!   overshoot come 200 to 800 ms after the calls that made it, so it overshoots both
//!   ways; its long-term average (600 first chunks) takes in sustained congestion as the
//!   new normal, and only the latency signal and the 429s (no growth in a window with
//!   one) hold it back.
//! - **`tower-acc`.** Its permit goes back at the first chunk (the retry layer's future
//!   resolves then), so it bounds the calls waiting for a first chunk, not the streams:
//!   the upstream holds up to `1.5 C` streams however low its limit. It decreases on
//!   every drop (each 429 the retry layer gave up on; no window) and grows by one on
//!   every success with half its limit in use.
//! - **The rate limit.** Each minute, the first 100 requests pass (by 33.3 s at 3 calls a
//!   second) and the rest of the minute is refused. Without pacing, a 429 whose
//!   `retry-after` is within `max_retry_after` (30 s) is retried after it, its call
//!   holding its slot, so the slots fill with calls waiting for the reset. With pacing,
//!   the answer that spends the minute's last request closes the gate until the reset.
//!
//! The figures of a run, and what they mean for each goal, are in the README
//! ("Adaptive limit, simulated").

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::concurrency::Adaptive;
use tower_stream_backpressure::{
    FirstChunkRetryLayer, Rejected, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};
use tower_stream_backpressure_testkit::flags::{self, next_flag, value};
use tower_stream_backpressure_testkit::sim::{self, Frame, met, quantile, show};
use tower_stream_backpressure_testkit::upstream::{Capacity, RateLimit};
use tower_stream_backpressure_testkit::{Protocol, Reply, Upstream};

/// How often the limit is sampled.
const SAMPLE: Duration = Duration::from_millis(100);
/// Beyond this many times the capacity, the upstream answers `429`.
const REFUSE_OVER: f64 = 1.5;
/// The retry layer's first-chunk timeout: longer than any first chunk here.
const FIRST_CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// The adaptive limits' bounds and start, ours and tower-acc's.
const INITIAL: usize = 20;
const MIN: usize = 1;
const MAX: usize = 200;
/// The goals: the limit within this share of `C`...
const GOAL_BAND: f64 = 0.25;
/// ...within this long of each change;
const GOAL_SETTLE: Duration = Duration::from_secs(10);
/// completed streams per second at least this share of the best static limit's;
const GOAL_THROUGHPUT: f64 = 0.9;
/// at most this share of the upstream's answers `429`;
const GOAL_REFUSED: f64 = 0.01;
/// a p99 TTFC at most this many times the uncongested first chunk.
const GOAL_TTFC: f64 = 2.0;
/// How far back an adaptive limit may explain the streams open on the upstream: a
/// smaller limit lets the streams it holds drain.
const DRAIN: Duration = Duration::from_secs(10);
/// The window of the rate-limit upstream.
const RATE_WINDOW: Duration = Duration::from_secs(60);

const HELP: &str = "\
The adaptive concurrency limit on tokio's paused clock: calls at a steady rate
above capacity against a mock upstream whose hidden capacity changes, through
static limits, tower-acc's Aimd, and StreamConcurrencyLayer::adaptive (AIMD and
gradient); then a run against an upstream with a rate limit.

Usage: cargo bench --bench adaptive -- [FLAGS]

Flags (default in brackets):
  --capacities LIST   the upstream's capacity in each phase, in order [20,60,10]
  --phase-secs SECS   the length of each phase [60]
  --rate N            calls started per second [100]
  --max-wait-ms MS    a call gives up after waiting MS for a slot [2000]
  --first-ms MS       first chunk after MS within capacity [200]
  --excess-ms MS      later by MS for each capacity's worth of streams over it
                      [the stream's uncongested length: first + tokens x gap]
  --tokens N          events of a stream, its first chunk included [20]
  --gap-ms MS         the pause before each event after the first [50]
  --seed N            the seed of the retry layer's backoff jitter [24301]
  --only RUN          capacity or rate-limit; both without it
  --rl-requests N     the rate-limit upstream's requests a minute [100]
  --rl-rate N         calls started per second in the rate-limit run [3]
  --rl-secs SECS      the length of the rate-limit run [180]
  --out-dir DIR       where adaptive_limit.csv and adaptive_limit.svg go [docs]
  -h, --help          print this help
";

/// The settings, from the command line.
#[derive(Debug)]
struct Args {
    capacities: Vec<u64>,
    phase: Duration,
    rate: u64,
    max_wait: Duration,
    first: Duration,
    excess: Option<Duration>,
    tokens: usize,
    gap: Duration,
    seed: u64,
    /// Whether the capacity run and the rate-limit run run.
    runs: (bool, bool),
    rate_limit: RateLimitRun,
    out_dir: PathBuf,
}

/// The rate-limit run's settings.
#[derive(Debug)]
struct RateLimitRun {
    /// Requests a minute.
    requests: u64,
    /// Calls started per second, for `secs`.
    rate: u64,
    secs: u64,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            capacities: vec![20, 60, 10],
            phase: Duration::from_secs(60),
            rate: 100,
            max_wait: Duration::from_secs(2),
            first: Duration::from_millis(200),
            excess: None,
            tokens: 20,
            gap: Duration::from_millis(50),
            seed: 0x5eed,
            runs: (true, true),
            rate_limit: RateLimitRun {
                requests: 100,
                rate: 3,
                secs: 180,
            },
            out_dir: PathBuf::from("docs"),
        }
    }
}

impl Args {
    /// The flags, `Ok(None)` for `--help`, or an error naming the flag at fault.
    fn parse() -> Result<Option<Self>, String> {
        let mut args = Args::default();
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = next_flag(&mut parser)? {
            let p = &mut parser;
            let ms =
                |p: &mut lexopt::Parser| value(p, &flag, 1, 600_000).map(Duration::from_millis);
            match flag.as_str() {
                "--capacities" => args.capacities = capacities(p, &flag)?,
                "--phase-secs" => args.phase = Duration::from_secs(value(p, &flag, 1, 3600)?),
                "--rate" => args.rate = value(p, &flag, 1, 10_000)?,
                "--max-wait-ms" => args.max_wait = ms(p)?,
                "--first-ms" => args.first = ms(p)?,
                "--excess-ms" => args.excess = Some(ms(p)?),
                "--tokens" => args.tokens = value(p, &flag, 1, 10_000)?,
                "--gap-ms" => args.gap = ms(p)?,
                "--seed" => args.seed = value(p, &flag, 0, u64::MAX)?,
                "--only" => {
                    let run = p.value().map_err(|e| e.to_string())?;
                    match run.to_string_lossy().as_ref() {
                        "capacity" => args.runs = (true, false),
                        "rate-limit" => args.runs = (false, true),
                        other => {
                            return Err(format!(
                                "--only: {other:?} is neither capacity nor rate-limit"
                            ));
                        }
                    }
                }
                "--rl-requests" => args.rate_limit.requests = value(p, &flag, 1, 1_000_000)?,
                "--rl-rate" => args.rate_limit.rate = value(p, &flag, 1, 10_000)?,
                "--rl-secs" => args.rate_limit.secs = value(p, &flag, 1, 3600)?,
                _ => {
                    if !flags::bench_flag(p, &flag, &mut args.out_dir)? {
                        return Ok(None);
                    }
                }
            }
        }
        if args.first < args.gap {
            return Err(format!(
                "--first-ms ({} ms) must be at least --gap-ms ({} ms)",
                args.first.as_millis(),
                args.gap.as_millis()
            ));
        }
        if args.first >= FIRST_CHUNK_TIMEOUT {
            return Err(format!(
                "--first-ms ({} ms) must be below the first-chunk timeout ({})",
                args.first.as_millis(),
                show(FIRST_CHUNK_TIMEOUT)
            ));
        }
        Ok(Some(args))
    }

    /// The upstream's answers, from its capacity and the streams open on it.
    fn model(&self) -> Capacity {
        let mut model = Capacity {
            first_event: self.first,
            per_excess: Duration::ZERO,
            refuse_over: REFUSE_OVER,
            tokens: self.tokens,
            gap: self.gap,
        };
        model.per_excess = self.excess.unwrap_or(model.stream_length());
        model
    }

    fn duration(&self) -> Duration {
        self.phase * self.capacities.len() as u32
    }

    /// The phases, in order.
    fn phases(&self) -> Vec<Phase> {
        (0..self.capacities.len())
            .map(|i| Phase {
                capacity: self.capacities[i],
                from: self.phase * i as u32,
                to: self.phase * (i as u32 + 1),
            })
            .collect()
    }

    /// The phase `at` (from the start of the run) falls in; the last one after the end.
    fn phase_at(&self, at: Duration) -> usize {
        ((at.as_nanos() / self.phase.as_nanos()) as usize).min(self.capacities.len() - 1)
    }
}

/// `20,60,10`: capacities, each at least 1.
fn capacities(parser: &mut lexopt::Parser, flag: &str) -> Result<Vec<u64>, String> {
    let text = parser.value().map_err(|e| e.to_string())?;
    let text = text.to_string_lossy();
    let list: Result<Vec<u64>, _> = text.split(',').map(|c| c.trim().parse::<u64>()).collect();
    match list {
        Ok(list) if !list.is_empty() && list.iter().all(|&c| (1..=100_000).contains(&c)) => {
            Ok(list)
        }
        _ => Err(format!(
            "{flag}: {text:?} is not a list of capacities from 1 to 100000, such as 20,60,10"
        )),
    }
}

/// One phase of the upstream's capacity.
#[derive(Debug, Clone, Copy)]
struct Phase {
    capacity: u64,
    from: Duration,
    to: Duration,
}

impl Phase {
    fn contains(&self, at: Duration) -> bool {
        (self.from..self.to).contains(&at)
    }

    fn in_band(&self, limit: usize) -> bool {
        let c = self.capacity as f64;
        let limit = limit as f64;
        limit >= c * (1.0 - GOAL_BAND) && limit <= c * (1.0 + GOAL_BAND)
    }
}

/// The limits compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Static(usize),
    TowerAcc,
    Aimd,
    Gradient,
    /// A fixed limit of 20 pacing on the rate-limit headers.
    Pacing,
}

impl Contender {
    const CAPACITY: [Contender; 6] = [
        Contender::Static(10),
        Contender::Static(20),
        Contender::Static(60),
        Contender::TowerAcc,
        Contender::Aimd,
        Contender::Gradient,
    ];

    /// The rate-limit run's contenders.
    const RATE_LIMIT: [Contender; 3] = [Contender::Static(20), Contender::Pacing, Contender::Aimd];

    /// Whether it holds calls while the rate limit is spent (`adaptive` does by default).
    fn paces(self) -> bool {
        matches!(
            self,
            Contender::Pacing | Contender::Aimd | Contender::Gradient
        )
    }

    fn name(self) -> String {
        match self {
            Contender::Static(n) => format!("static{n}"),
            Contender::TowerAcc => "tower-acc".to_owned(),
            Contender::Aimd => "aimd".to_owned(),
            Contender::Gradient => "gradient".to_owned(),
            Contender::Pacing => "pacing".to_owned(),
        }
    }

    /// The legend of the plot.
    fn label(self) -> String {
        match self {
            Contender::Static(n) => format!("static {n}"),
            Contender::TowerAcc => self.name(),
            Contender::Aimd => "ours: AIMD".to_owned(),
            Contender::Gradient | Contender::Pacing => format!("ours: {}", self.name()),
        }
    }

    fn is_ours(self) -> bool {
        matches!(self, Contender::Aimd | Contender::Gradient)
    }

    /// Stroke colour and dash pattern of the plot's lines.
    fn stroke(self) -> (&'static str, &'static str) {
        match self {
            Contender::Static(10) => ("#bcbd22", "6 3"),
            Contender::Static(20) => ("#17becf", "6 3"),
            Contender::Static(_) => ("#8c564b", "6 3"),
            Contender::TowerAcc => ("#ff7f0e", ""),
            Contender::Aimd => ("#d62728", ""),
            Contender::Gradient => ("#1f77b4", ""),
            Contender::Pacing => ("#2ca02c", ""),
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Its stream read to `data: [DONE]`.
    Completed,
    /// No slot within the caller's wait.
    GaveUp,
    /// A response that is not a success (a 429 the retry layer gave up on).
    Status(u16),
    /// An error, or a stream cut short.
    Failed,
}

/// One call, its times from the start of the run.
#[derive(Debug, Clone, Copy)]
struct Call {
    outcome: Outcome,
    /// When its first chunk came, and how long after it left the limiter.
    first_chunk: Option<(Duration, Duration)>,
    /// When its stream ended.
    ended: Option<Duration>,
}

impl Call {
    fn ended(outcome: Outcome) -> Self {
        Self {
            outcome,
            first_chunk: None,
            ended: None,
        }
    }
}

/// When a call left the limiter: set by the `map_request` below it.
#[derive(Debug, Clone)]
struct Admitted(Arc<OnceLock<Instant>>);

fn stamp(request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    if let Some(Admitted(at)) = request.extensions().get::<Admitted>() {
        let _ = at.set(Instant::now());
    }
    request
}

/// One streaming call, from `start` of the run. `ready_wait`: the caller gives up
/// when the service is not ready within it (a limiter that waits in `poll_ready`);
/// without it, the limiter's own `max_wait` decides.
async fn call<S, B>(mut service: S, url: &str, start: Instant, ready_wait: Option<Duration>) -> Call
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError>,
    B: Body<Data = Bytes>,
{
    let admitted = Arc::new(OnceLock::new());
    let mut request = tower_stream_backpressure_testkit::post(url);
    request.extensions_mut().insert(Admitted(admitted.clone()));
    let ready = match ready_wait {
        Some(wait) => match tokio::time::timeout(wait, service.ready()).await {
            Ok(ready) => ready.map(|_| ()),
            Err(_) => return Call::ended(Outcome::GaveUp),
        },
        None => service.ready().await.map(|_| ()),
    };
    if ready.is_err() {
        return Call::ended(Outcome::Failed);
    }
    let response = match service.call(request).await {
        Ok(response) => response,
        Err(error) if error.is::<Rejected>() => return Call::ended(Outcome::GaveUp),
        Err(_) => return Call::ended(Outcome::Failed),
    };
    if !response.status().is_success() {
        return Call::ended(Outcome::Status(response.status().as_u16()));
    }
    let mut body = std::pin::pin!(response.into_body());
    let mut first_chunk = None;
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Call {
                first_chunk,
                ..Call::ended(Outcome::Failed)
            };
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if first_chunk.is_none() && !data.is_empty() {
            let now = Instant::now();
            let from_slot = admitted.get().map_or(Duration::ZERO, |at| now - *at);
            first_chunk = Some((now - start, from_slot));
        }
        read.extend_from_slice(&data);
    }
    let outcome = if read.ends_with(b"data: [DONE]\n\n") {
        Outcome::Completed
    } else {
        Outcome::Failed
    };
    Call {
        outcome,
        first_chunk,
        ended: Some(start.elapsed()),
    }
}

/// `tower-acc`'s algorithm, its limit noted after each update for the samples.
#[derive(Debug, Clone)]
struct Observed {
    inner: tower_acc::Aimd,
    limit: Arc<AtomicUsize>,
}

impl tower_acc::Algorithm for Observed {
    fn max_concurrency(&self) -> usize {
        self.inner.max_concurrency()
    }

    fn update(&mut self, rtt: Duration, in_flight: usize, is_error: bool, is_canceled: bool) {
        self.inner.update(rtt, in_flight, is_error, is_canceled);
        self.limit
            .store(self.inner.max_concurrency(), Ordering::Relaxed);
    }
}

/// `tower-acc`'s classifier: an error, or an overload status the retry layer below gave
/// up on, is a drop.
#[derive(Debug, Clone, Copy)]
struct Overload;

impl<B> tower_acc::Classifier<Response<B>, BoxError> for Overload {
    fn is_server_error(&self, result: &Result<Response<B>, BoxError>) -> bool {
        match result {
            Ok(response) => matches!(response.status().as_u16(), 429 | 503 | 529),
            Err(_) => true,
        }
    }
}

/// Where a contender's limit is read.
#[derive(Clone)]
enum Limit {
    Ours(StreamConcurrencyLayer),
    Observed(Arc<AtomicUsize>),
}

impl Limit {
    fn get(&self) -> usize {
        match self {
            Limit::Ours(layer) => layer.current_limit(),
            Limit::Observed(limit) => limit.load(Ordering::Relaxed),
        }
    }
}

/// Every move of our adaptive limit, exactly: the library's `concurrency limit moved`
/// event, with the time it was logged at. The samples may miss a move and its return
/// between two of them (the gradient moves at each first chunk); the check that the
/// upstream never held more streams than the limit allowed reads these.
#[derive(Clone, Default)]
struct Moves(Arc<Mutex<Vec<(Instant, usize)>>>);

impl Moves {
    /// The limit in force at each move, from `start`, after the `initial` one at 0.
    fn take(&self, start: Instant, initial: usize) -> Vec<(Duration, usize)> {
        let moves = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        std::iter::once((Duration::ZERO, initial))
            .chain(moves.into_iter().map(|(at, limit)| (at - start, limit)))
            .collect()
    }
}

/// The `to` field of a move.
struct To(Option<usize>);

impl tracing::field::Visit for To {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "to" {
            self.0 = usize::try_from(value).ok();
        }
    }

    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl tracing::Subscriber for Moves {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "tower_stream_backpressure::concurrency::adaptive"
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut to = To(None);
        event.record(&mut to);
        if let Some(limit) = to.0 {
            let mut moves = self.0.lock().unwrap_or_else(|e| e.into_inner());
            moves.push((Instant::now(), limit));
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// The limit and the upstream's open streams at one sample.
#[derive(Debug, Clone, Copy)]
struct Sample {
    limit: usize,
    open: u64,
}

/// What one contender's run produced.
struct Run {
    contender: Contender,
    calls: Vec<Call>,
    /// Every [`SAMPLE`] from the start, the first at 0.
    samples: Vec<Sample>,
    /// Requests and `429` answers per phase, by the upstream's script.
    per_phase: Vec<(u64, u64)>,
    /// The upstream's own counts.
    hits: u64,
    refused: u64,
    peak: u64,
    /// Free slots and the limit once every call has ended (ours only).
    slots_back: Option<(usize, usize)>,
    /// Every move of an adaptive limit of ours, from the start, the initial one first.
    moves: Vec<(Duration, usize)>,
    wall: Duration,
}

/// Drives the calls through `service` from `start`, sampling `limit` and `upstream`'s
/// open streams; returns the calls (in the order of their start) and the samples.
#[allow(clippy::too_many_arguments)]
async fn drive<S, B>(
    start: Instant,
    rate: u64,
    duration: Duration,
    upstream: &Arc<Upstream>,
    service: S,
    ready_wait: Option<Duration>,
    limit: Limit,
) -> (Vec<Call>, Vec<Sample>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    let sampler = {
        let upstream = upstream.clone();
        let count = (duration.as_nanos() / SAMPLE.as_nanos()) as u32;
        tokio::spawn(async move {
            let mut samples = Vec::with_capacity(count as usize + 1);
            for i in 0..=count {
                tokio::time::sleep_until(start + SAMPLE * i).await;
                samples.push(Sample {
                    limit: limit.get(),
                    open: upstream.open_streams(),
                });
            }
            samples
        })
    };
    let url = upstream.url("/v1/chat/completions");
    let total = rate * duration.as_secs();
    let handles = sim::spawn_steady(start, rate, total, |_| {
        let (service, url) = (service.clone(), url.clone());
        async move { call(service, &url, start, ready_wait).await }
    })
    .await;
    let mut calls = Vec::with_capacity(handles.len());
    for handle in handles {
        // A call task that panicked counts as failed.
        calls.push(handle.await.unwrap_or(Call::ended(Outcome::Failed)));
    }
    let samples = sampler.await.unwrap_or_default();
    (calls, samples)
}

/// The layers below every limit: the time the call left the limiter noted, the retry
/// budget, and the first-chunk retry layer, over a hyper-util client.
macro_rules! below_the_limit {
    () => {
        ServiceBuilder::new()
            .map_request(stamp)
            .layer(RetryBudgetLayer::new(RetryBudget::default()))
            .layer(FirstChunkRetryLayer::new(
                RetryPolicy::default().first_chunk_timeout(FIRST_CHUNK_TIMEOUT),
            ))
            .service(tower_stream_backpressure_testkit::client(Protocol::Http1))
    };
}

/// Runs `contender` through the stack against `upstream`, from `start`; the calls and
/// samples, and the free slots and limit once every call has ended (ours only).
async fn run_stack(
    contender: Contender,
    args: &Args,
    (start, rate, duration): (Instant, u64, Duration),
    upstream: &Arc<Upstream>,
) -> (Vec<Call>, Vec<Sample>, Option<(usize, usize)>) {
    let ours = |layer: StreamConcurrencyLayer| layer.max_wait(args.max_wait);
    let layer = match contender {
        Contender::Static(n) => ours(StreamConcurrencyLayer::new(n)),
        Contender::Aimd => ours(StreamConcurrencyLayer::adaptive(
            Adaptive::default().initial(INITIAL).min(MIN).max(MAX),
        )),
        Contender::Gradient => ours(StreamConcurrencyLayer::adaptive(
            Adaptive::gradient().initial(INITIAL).min(MIN).max(MAX),
        )),
        Contender::TowerAcc => {
            let limit = Arc::new(AtomicUsize::new(INITIAL));
            let algorithm = Observed {
                inner: tower_acc::Aimd::builder()
                    .initial_limit(INITIAL)
                    .min_limit(MIN)
                    .max_limit(MAX)
                    .build(),
                limit: limit.clone(),
            };
            let service = tower_acc::ConcurrencyLimitLayer::with_classifier(algorithm, Overload)
                .layer(below_the_limit!());
            let limit = Limit::Observed(limit);
            let wait = Some(args.max_wait);
            let (calls, samples) =
                drive(start, rate, duration, upstream, service, wait, limit).await;
            return (calls, samples, None);
        }
        Contender::Pacing => ours(StreamConcurrencyLayer::new(20).pace_on_rate_limits(true)),
    };
    let service = layer.layer(below_the_limit!());
    let limit = Limit::Ours(layer.clone());
    let (calls, samples) = drive(start, rate, duration, upstream, service, None, limit).await;
    // Every slot back: what the limit gives once nothing holds one.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let slots_back = Some((layer.available_slots(), layer.current_limit()));
    (calls, samples, slots_back)
}

/// Runs `contender` against a fresh upstream of the changing capacity.
async fn run(contender: Contender, args: &Args) -> Run {
    let wall = std::time::Instant::now();
    fastrand::seed(args.seed);
    let start = Instant::now();

    // The upstream answers from its open streams and the capacity in force, and
    // counts each request and 429 in the phase it arrives in.
    let per_phase = Arc::new(Mutex::new(vec![(0u64, 0u64); args.capacities.len()]));
    let upstream = {
        let per_phase = per_phase.clone();
        let model = args.model();
        let (capacities, phase) = (args.capacities.clone(), args.phase);
        Upstream::start(move |hit| {
            let i = ((start.elapsed().as_nanos() / phase.as_nanos()) as usize)
                .min(capacities.len() - 1);
            let reply = model.reply(capacities[i], hit.open);
            let refused = model.first_event_delay(capacities[i], hit.open).is_none();
            let mut per_phase = per_phase.lock().unwrap_or_else(|e| e.into_inner());
            per_phase[i].0 += 1;
            per_phase[i].1 += u64::from(refused);
            reply
        })
        .await
    };
    let upstream = Arc::new(upstream);
    let times = (start, args.rate, args.duration());
    let moves = Moves::default();
    let (calls, samples, slots_back) = {
        // Everything runs on this thread.
        let _recording = tracing::subscriber::set_default(moves.clone());
        run_stack(contender, args, times, &upstream).await
    };
    let per_phase = per_phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Run {
        contender,
        calls,
        samples,
        per_phase,
        hits: upstream.hits(),
        refused: upstream.answers_with(429),
        peak: upstream.peak_streams(),
        slots_back,
        moves: moves.take(start, INITIAL),
        wall: wall.elapsed(),
    }
}

/// One contender's figures in one phase.
struct Figures {
    limit_mean: f64,
    limit_min: usize,
    limit_max: usize,
    /// When the limit settled within the band, from the phase's start.
    settled: Option<Duration>,
    in_band: f64,
    completed_per_sec: f64,
    hits: u64,
    refused: u64,
    /// Times to first chunk from the slot, of the first chunks in the phase, sorted.
    ttfc: Vec<Duration>,
    started: usize,
    gave_up: usize,
    failed: usize,
}

impl Figures {
    fn of(args: &Args, run: &Run, phase_index: usize) -> Self {
        let phase = args.phases()[phase_index];
        let in_phase: Vec<(Duration, Sample)> = run
            .samples
            .iter()
            .enumerate()
            .map(|(i, sample)| (SAMPLE * i as u32, *sample))
            .filter(|(at, _)| phase.contains(*at))
            .collect();
        let limits = || in_phase.iter().map(|(_, sample)| sample.limit);
        let within = limits().filter(|&limit| phase.in_band(limit)).count();
        // The first sample after which every one is within the band.
        let settled = match in_phase.iter().rposition(|(_, s)| !phase.in_band(s.limit)) {
            None => in_phase.first().map(|(at, _)| *at - phase.from),
            Some(last_out) => in_phase.get(last_out + 1).map(|(at, _)| *at - phase.from),
        };
        let phase_of_start =
            |k: usize| args.phase_at(Duration::from_nanos(k as u64 * 1_000_000_000 / args.rate));
        let started: Vec<&Call> = (0..run.calls.len())
            .filter(|&k| phase_of_start(k) == phase_index)
            .map(|k| &run.calls[k])
            .collect();
        let count = |outcome: fn(&Outcome) -> bool| {
            started.iter().filter(|call| outcome(&call.outcome)).count()
        };
        let completed = run
            .calls
            .iter()
            .filter(|call| call.outcome == Outcome::Completed)
            .filter(|call| call.ended.is_some_and(|at| phase.contains(at)))
            .count();
        let mut ttfc: Vec<Duration> = run
            .calls
            .iter()
            .filter_map(|call| call.first_chunk)
            .filter(|(at, _)| phase.contains(*at))
            .map(|(_, ttfc)| ttfc)
            .collect();
        ttfc.sort_unstable();
        let (hits, refused) = run.per_phase[phase_index];
        Figures {
            limit_mean: limits().sum::<usize>() as f64 / in_phase.len().max(1) as f64,
            limit_min: limits().min().unwrap_or(0),
            limit_max: limits().max().unwrap_or(0),
            settled,
            in_band: within as f64 / in_phase.len().max(1) as f64,
            completed_per_sec: completed as f64 / (phase.to - phase.from).as_secs_f64(),
            hits,
            refused,
            ttfc,
            started: started.len(),
            gave_up: count(|o| *o == Outcome::GaveUp),
            failed: count(|o| matches!(o, Outcome::Status(_) | Outcome::Failed)),
        }
    }
}

impl Run {
    /// What the progress line says: calls, upstream attempts, wall time.
    fn tally(&self) -> (u64, u64, Duration) {
        (self.calls.len() as u64, self.hits, self.wall)
    }

    /// Times to first chunk from the slot, of the whole run, sorted.
    fn ttfc(&self) -> Vec<Duration> {
        let mut ttfc: Vec<Duration> = self
            .calls
            .iter()
            .filter_map(|call| call.first_chunk.map(|(_, ttfc)| ttfc))
            .collect();
        ttfc.sort_unstable();
        ttfc
    }

    fn refused_share(&self) -> f64 {
        self.refused as f64 / self.hits.max(1) as f64
    }
}

/// `p`, as a percentage of `of`.
fn share(p: u64, of: u64) -> f64 {
    p as f64 * 100.0 / of.max(1) as f64
}

/// The best completed streams per second of a static limit in each phase, and its name.
fn best_static(figures: &[(Contender, Vec<Figures>)], phases: usize) -> Vec<(f64, String)> {
    (0..phases)
        .map(|i| {
            figures
                .iter()
                .filter(|(c, _)| matches!(c, Contender::Static(_)))
                .map(|(c, f)| (f[i].completed_per_sec, c.name()))
                .fold((0.0, String::new()), |best, next| {
                    if next.0 > best.0 { next } else { best }
                })
        })
        .collect()
}

fn print_summary(args: &Args, runs: &[Run]) {
    let phases = args.phases();
    let model = args.model();
    let caps: Vec<String> = args.capacities.iter().map(u64::to_string).collect();
    println!();
    println!(
        "== capacity {} for {} each; {} calls/s, each giving up after {} without a slot; first chunk after {} \
         up to C streams, {} later per C over, 429 (Retry-After: 1) over {} C; {} events {} apart ==",
        caps.join(", then "),
        show(args.phase),
        args.rate,
        show(args.max_wait),
        show(args.first),
        show(model.per_excess),
        REFUSE_OVER,
        args.tokens,
        show(args.gap),
    );
    println!();
    let figures: Vec<(Contender, Vec<Figures>)> = runs
        .iter()
        .map(|run| {
            let per_phase = (0..phases.len())
                .map(|i| Figures::of(args, run, i))
                .collect();
            (run.contender, per_phase)
        })
        .collect();
    let best = best_static(&figures, phases.len());
    println!(
        "{:<9} {:>9} {:>4} {:>6} {:>9} {:>8} {:>6} {:>9} {:>6} {:>7} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6}",
        "",
        "",
        "",
        "limit",
        "",
        "settled",
        "in",
        "completed",
        "of",
        "",
        "",
        "",
        "TTFC",
        "from",
        "slot",
        "calls",
        "gave",
        ""
    );
    println!(
        "{:<9} {:>9} {:>4} {:>6} {:>9} {:>8} {:>6} {:>9} {:>6} {:>7} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6}",
        "contender",
        "phase",
        "C",
        "mean",
        "range",
        "(25 %)",
        "band",
        "per s",
        "best",
        "hits",
        "429s",
        "share",
        "p50",
        "p99",
        "max",
        "",
        "up",
        "failed"
    );
    for (contender, per_phase) in &figures {
        for (i, (f, phase)) in per_phase.iter().zip(&phases).enumerate() {
            println!(
                "{:<9} {:>9} {:>4} {:>6.1} {:>9} {:>8} {:>4.0} % {:>9.2} {:>4.0} % {:>7} {:>6} {:>4.2} % {:>7} {:>7} {:>7} {:>6} {:>6} {:>6}",
                contender.name(),
                format!("{}-{} s", phase.from.as_secs(), phase.to.as_secs()),
                phase.capacity,
                f.limit_mean,
                format!("{}..{}", f.limit_min, f.limit_max),
                f.settled.map_or("never".to_owned(), |at| format!(
                    "{:.1} s",
                    at.as_secs_f64()
                )),
                f.in_band * 100.0,
                f.completed_per_sec,
                f.completed_per_sec * 100.0 / best[i].0.max(1e-9),
                f.hits,
                f.refused,
                share(f.refused, f.hits),
                show(quantile(&f.ttfc, 0.5)),
                show(quantile(&f.ttfc, 0.99)),
                show(f.ttfc.last().copied().unwrap_or_default()),
                f.started,
                f.gave_up,
                f.failed,
            );
        }
    }
    println!();
    println!(
        "{:<9} {:>8} {:>7} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8}",
        "whole run", "hits", "429s", "share", "completed", "p50", "p99", "max", "wall"
    );
    for run in runs {
        let ttfc = run.ttfc();
        let completed = run
            .calls
            .iter()
            .filter(|call| call.outcome == Outcome::Completed)
            .count();
        println!(
            "{:<9} {:>8} {:>7} {:>5.2} % {:>10} {:>8} {:>8} {:>8} {:>6.2} s",
            run.contender.name(),
            run.hits,
            run.refused,
            run.refused_share() * 100.0,
            completed,
            show(quantile(&ttfc, 0.5)),
            show(quantile(&ttfc, 0.99)),
            show(ttfc.last().copied().unwrap_or_default()),
            run.wall.as_secs_f64(),
        );
    }
    println!();
    print_goals(args, runs, &figures, &best);
    for run in runs {
        check(args, run);
    }
}

/// Each goal of ours against its threshold.
fn print_goals(
    args: &Args,
    runs: &[Run],
    figures: &[(Contender, Vec<Figures>)],
    best: &[(f64, String)],
) {
    let phases = args.phases();
    for (run, (contender, per_phase)) in runs.iter().zip(figures) {
        if !contender.is_ours() {
            continue;
        }
        let name = contender.name();
        let settles: Vec<String> = per_phase
            .iter()
            .zip(&phases)
            .map(|(f, phase)| {
                let at = f.settled.map_or("never".to_owned(), |at| {
                    format!("{:.1} s", at.as_secs_f64())
                });
                format!("C {} at {} s: {at}", phase.capacity, phase.from.as_secs())
            })
            .collect();
        let settled = per_phase
            .iter()
            .all(|f| f.settled.is_some_and(|at| at <= GOAL_SETTLE));
        println!(
            "goal, {name}: limit within {:.0} % of C within {} of each change: {}: {}",
            GOAL_BAND * 100.0,
            show(GOAL_SETTLE),
            settles.join(", "),
            met(settled)
        );
        let ratios: Vec<f64> = per_phase
            .iter()
            .zip(best)
            .map(|(f, (best, _))| f.completed_per_sec / best.max(1e-9))
            .collect();
        let shown: Vec<String> = ratios
            .iter()
            .zip(best)
            .map(|(ratio, (_, of))| format!("{:.1} % of {of}", ratio * 100.0))
            .collect();
        println!(
            "goal, {name}: completed streams per second at least {:.0} % of the best static limit's, each phase: {}: {}",
            GOAL_THROUGHPUT * 100.0,
            shown.join(", "),
            met(ratios.iter().all(|&r| r >= GOAL_THROUGHPUT))
        );
        println!(
            "goal, {name}: 429s at most {:.0} % of the upstream's answers: {:.2} % ({} of {}): {}",
            GOAL_REFUSED * 100.0,
            run.refused_share() * 100.0,
            run.refused,
            run.hits,
            met(run.refused_share() <= GOAL_REFUSED)
        );
        let p99 = quantile(&run.ttfc(), 0.99);
        let goal = args.first.mul_f64(GOAL_TTFC);
        println!(
            "goal, {name}: p99 time to first chunk from the slot at most {GOAL_TTFC} x {}, {}: {}: {}",
            show(args.first),
            show(goal),
            show(p99),
            met(p99 <= goal)
        );
    }
}

/// Warns of anything in `run` that contradicts how the stack or the upstream should
/// behave.
fn check(args: &Args, run: &Run) {
    let name = run.contender.name();
    let expected = args.rate * args.duration().as_secs();
    if run.calls.len() as u64 != expected {
        println!(
            "warning: {name}: {} calls ended of {expected} started",
            run.calls.len()
        );
    }
    let (hits, refused) = run
        .per_phase
        .iter()
        .fold((0, 0), |(h, r), (hits, refused)| (h + hits, r + refused));
    if hits != run.hits || refused != run.refused {
        println!(
            "warning: {name}: the script counted {hits} requests and {refused} 429s, the upstream {} and {}",
            run.hits, run.refused
        );
    }
    match run.contender {
        Contender::Static(n) if run.peak > n as u64 => {
            println!(
                "warning: {name}: the upstream held {} streams at once, over the limit",
                run.peak
            );
        }
        Contender::Aimd | Contender::Gradient => {
            let last = run.moves.last().map(|(_, limit)| *limit);
            if run.samples.iter().any(|s| Some(s.limit) != last) && run.moves.len() == 1 {
                println!("warning: {name}: the limit moved, but no move was recorded");
            }
            if let Some((at, open, allowed)) = over_the_limit(run) {
                println!(
                    "warning: {name}: at {} the upstream held {open} streams, over the limit's most \
                     in the {} before, {allowed}",
                    show(at),
                    show(DRAIN)
                );
            }
        }
        _ => {}
    }
    match run.slots_back {
        Some((free, limit)) if free != limit => println!(
            "warning: {name}: {free} slots free of a limit of {limit} once every call ended"
        ),
        _ => {}
    }
}

/// The first sample at which the upstream held more streams than our limit allowed at
/// any time in the [`DRAIN`] before (a smaller limit lets the streams it holds drain):
/// when, the streams, and that most.
fn over_the_limit(run: &Run) -> Option<(Duration, u64, usize)> {
    run.samples.iter().enumerate().find_map(|(i, sample)| {
        let at = SAMPLE * i as u32;
        let from = at.saturating_sub(DRAIN);
        // The limit in force at `from`, and every move until `at`.
        let before = run
            .moves
            .iter()
            .rposition(|(moved, _)| *moved <= from)
            .unwrap_or(0);
        let allowed = run.moves[before..]
            .iter()
            .take_while(|(moved, _)| *moved <= at)
            .map(|(_, limit)| *limit)
            .max()?;
        (sample.open > allowed as u64).then_some((at, sample.open, allowed))
    })
}

// The rate-limit run.

/// What one contender's rate-limit run produced.
struct RateRun {
    contender: Contender,
    calls: Vec<Call>,
    hits: u64,
    /// When each 429 was sent, from the start.
    refusals: Vec<Duration>,
    wall: Duration,
}

impl RateRun {
    /// What the progress line says: calls, upstream attempts, wall time.
    fn tally(&self) -> (u64, u64, Duration) {
        (self.calls.len() as u64, self.hits, self.wall)
    }
}

async fn run_rate_limit(contender: Contender, args: &Args) -> RateRun {
    let wall = std::time::Instant::now();
    fastrand::seed(args.seed);
    let start = Instant::now();
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let upstream = {
        let refusals = refusals.clone();
        let stream = args.model().reply(u64::MAX, 0);
        let limit = RateLimit::new(args.rate_limit.requests, RATE_WINDOW, start);
        Upstream::start(move |_hit| {
            let reply = limit.reply(stream.clone());
            if matches!(reply, Reply::Status { .. }) {
                let mut refusals = refusals.lock().unwrap_or_else(|e| e.into_inner());
                refusals.push(start.elapsed());
            }
            reply
        })
        .await
    };
    let upstream = Arc::new(upstream);
    let times = (
        start,
        args.rate_limit.rate,
        Duration::from_secs(args.rate_limit.secs),
    );
    let (calls, _, _) = run_stack(contender, args, times, &upstream).await;
    let refusals = refusals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if refusals.len() as u64 != upstream.answers_with(429) {
        println!(
            "warning: rate limit, {}: the script counted {} 429s, the upstream {}",
            contender.name(),
            refusals.len(),
            upstream.answers_with(429)
        );
    }
    RateRun {
        contender,
        calls,
        hits: upstream.hits(),
        refusals,
        wall: wall.elapsed(),
    }
}

fn print_rate_limit(args: &Args, runs: &[RateRun]) {
    println!();
    println!(
        "== rate limit: {} requests a minute (fixed windows; x-ratelimit-remaining-requests, \
         x-ratelimit-reset-requests; 429 with retry-after beyond), {} calls/s for {} s ==",
        args.rate_limit.requests, args.rate_limit.rate, args.rate_limit.secs
    );
    println!();
    println!(
        "{:<9} {:>7} {:>6} {:>9} {:>6} {:>8} {:>7} {:>7} {:>12} {:>11}",
        "contender",
        "pacing",
        "calls",
        "completed",
        "gave",
        "upstream",
        "429s",
        "share",
        "429s after",
        "first 429"
    );
    println!(
        "{:<9} {:>7} {:>6} {:>9} {:>6} {:>8} {:>7} {:>7} {:>12} {:>11}",
        "", "", "", "", "up", "requests", "", "", "the first", "at"
    );
    for run in runs {
        let count = |outcome: Outcome| run.calls.iter().filter(|c| c.outcome == outcome).count();
        println!(
            "{:<9} {:>7} {:>6} {:>9} {:>6} {:>8} {:>7} {:>5.2} % {:>12} {:>11}",
            run.contender.name(),
            if run.contender.paces() { "yes" } else { "no" },
            run.calls.len(),
            count(Outcome::Completed),
            count(Outcome::GaveUp),
            run.hits,
            run.refusals.len(),
            share(run.refusals.len() as u64, run.hits),
            run.refusals.len().saturating_sub(1),
            run.refusals.first().map_or("-".to_owned(), |at| show(*at)),
        );
    }
    println!();
    match runs.iter().find(|run| run.contender == Contender::Pacing) {
        Some(run) => println!(
            "goal, pacing: no 429 after the first: {}: {}",
            run.refusals.len().saturating_sub(1),
            met(run.refusals.len() <= 1)
        ),
        None => println!("goal, pacing: no 429 after the first: not measured"),
    }
    for run in runs.iter().filter(|run| !run.contender.paces()) {
        println!(
            "without pacing, {}: {} 429s of {} requests",
            run.contender.name(),
            run.refusals.len(),
            run.hits
        );
    }
}

// The output files.

fn csv(args: &Args, runs: &[Run]) -> String {
    let mut text = String::from("contender,time_s,capacity,limit,upstream_open,completed\n");
    for run in runs {
        let completed = completed_per_sample(run);
        for (i, sample) in run.samples.iter().enumerate() {
            let at = SAMPLE * i as u32;
            let _ = writeln!(
                text,
                "{},{:.1},{},{},{},{}",
                run.contender.name(),
                at.as_secs_f64(),
                args.capacities[args.phase_at(at)],
                sample.limit,
                sample.open,
                completed[i]
            );
        }
    }
    text
}

/// Streams completed in the sample interval up to each sample: `(t - 100 ms, t]`.
fn completed_per_sample(run: &Run) -> Vec<u64> {
    let mut completed = vec![0; run.samples.len()];
    for call in &run.calls {
        if let (Outcome::Completed, Some(ended)) = (call.outcome, call.ended) {
            let i = ended.as_nanos().div_ceil(SAMPLE.as_nanos()) as usize;
            if let Some(count) = completed.get_mut(i) {
                *count += 1;
            }
        }
    }
    completed
}

/// The points of a line across each phase at the height `y` gives its capacity, `x`
/// giving the position of a time in seconds.
fn over_phases(phases: &[Phase], x: impl Fn(f64) -> f64, y: impl Fn(u64) -> f64) -> String {
    let segments: Vec<String> = phases
        .iter()
        .map(|phase| {
            let py = y(phase.capacity);
            let (x0, x1) = (x(phase.from.as_secs_f64()), x(phase.to.as_secs_f64()));
            format!("{x0:.1},{py:.1} {x1:.1},{py:.1}")
        })
        .collect();
    segments.join(" ")
}

/// The stroke of the capacity's line, and of what the upstream completes at most.
const CAPACITY_STROKE: (&str, &str) = ("#222", "");

/// The plot: over time, `C` with its band and each contender's limit; under it, the
/// completed streams per second.
fn svg(args: &Args, runs: &[Run]) -> String {
    const BIN: Duration = Duration::from_secs(5);
    const WIDTH: f64 = 1000.0;
    const LIMITS: Frame = Frame {
        width: WIDTH,
        height: 430.0,
        left: 70.0,
        right: 30.0,
        top: 72.0,
        bottom: 50.0,
    };
    const COMPLETED: Frame = Frame {
        width: WIDTH,
        height: 840.0,
        left: 70.0,
        right: 30.0,
        top: 482.0,
        bottom: 50.0,
    };
    let phases = args.phases();
    let seconds = args.duration().as_secs_f64();
    let x_of = |frame: &Frame, t: f64| frame.left + t / seconds * frame.plot_w();
    let max_c = args.capacities.iter().max().copied().unwrap_or(1) as f64;

    let mut s = String::new();
    COMPLETED.open(
        &mut s,
        &format!(
            "Adaptive limit: the upstream's capacity C and each limit; completed streams ({} calls/s)",
            args.rate
        ),
    );

    // The limits' panel: up to twice the largest capacity; a line above it runs along
    // the top, and its legend says so.
    let y_max =
        sim::tick_step(max_c * 2.0, 6.0) * (max_c * 2.0 / sim::tick_step(max_c * 2.0, 6.0)).ceil();
    let y = |v: f64| LIMITS.top + LIMITS.plot_h() - v.min(y_max) / y_max * LIMITS.plot_h();
    for phase in &phases {
        let c = phase.capacity as f64;
        let (x0, x1) = (
            x_of(&LIMITS, phase.from.as_secs_f64()),
            x_of(&LIMITS, phase.to.as_secs_f64()),
        );
        let (top, bottom) = (y(c * (1.0 + GOAL_BAND)), y(c * (1.0 - GOAL_BAND)));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="#e6f2e6"/>"##,
            x1 - x0,
            bottom - top
        );
    }
    let step = sim::tick_step(y_max, 6.0);
    let mut v = 0.0;
    while v <= y_max + 1e-9 {
        LIMITS.grid_y(&mut s, y(v), v);
        v += step;
    }
    let x_step = sim::tick_step(seconds, 9.0);
    for frame in [&LIMITS, &COMPLETED] {
        let mut t = 0.0;
        while t <= seconds + 1e-9 {
            frame.tick_x(&mut s, x_of(frame, t), t);
            t += x_step;
        }
    }
    LIMITS.axes(&mut s, "time (s)", "concurrency limit");
    let capacity = over_phases(&phases, |t| x_of(&LIMITS, t), |c| y(c as f64));
    LIMITS.polyline(&mut s, &capacity, CAPACITY_STROKE.0, CAPACITY_STROKE.1);
    for run in runs {
        // Steps: a point where the limit moves.
        let mut points = String::new();
        let mut last = None;
        for (i, sample) in run.samples.iter().enumerate() {
            let px = x_of(&LIMITS, (SAMPLE * i as u32).as_secs_f64());
            let py = y(sample.limit as f64);
            match last {
                Some(prev) if prev == py && i + 1 < run.samples.len() => continue,
                Some(prev) => {
                    let _ = write!(points, "{px:.1},{prev:.1} {px:.1},{py:.1} ");
                }
                None => {
                    let _ = write!(points, "{px:.1},{py:.1} ");
                }
            }
            last = Some(py);
        }
        let (colour, dash) = run.contender.stroke();
        LIMITS.polyline(&mut s, points.trim_end(), colour, dash);
    }

    // The completed streams' panel, in bins of `BIN`, and the upstream's most.
    let bins = (args.duration().as_nanos() / BIN.as_nanos()) as usize;
    let per_bin: Vec<Vec<f64>> = runs
        .iter()
        .map(|run| {
            let mut counts = vec![0u64; bins];
            for call in &run.calls {
                if let (Outcome::Completed, Some(ended)) = (call.outcome, call.ended) {
                    if let Some(count) =
                        counts.get_mut((ended.as_nanos() / BIN.as_nanos()) as usize)
                    {
                        *count += 1;
                    }
                }
            }
            counts
                .iter()
                .map(|&c| c as f64 / BIN.as_secs_f64())
                .collect()
        })
        .collect();
    let most = |c: u64| c as f64 / args.model().stream_length().as_secs_f64();
    let peak = per_bin
        .iter()
        .flatten()
        .copied()
        .chain(args.capacities.iter().map(|&c| most(c)))
        .fold(1.0, f64::max);
    let c_step = sim::tick_step(peak * 1.1, 5.0);
    let c_max = (peak * 1.1 / c_step).ceil() * c_step;
    let cy = |v: f64| COMPLETED.top + COMPLETED.plot_h() - v / c_max * COMPLETED.plot_h();
    let mut v = 0.0;
    while v <= c_max + 1e-9 {
        COMPLETED.grid_y(&mut s, cy(v), v);
        v += c_step;
    }
    COMPLETED.axes(&mut s, "time (s)", "completed streams per second");
    let upstream_most = over_phases(&phases, |t| x_of(&COMPLETED, t), |c| cy(most(c)));
    COMPLETED.polyline(&mut s, &upstream_most, CAPACITY_STROKE.0, CAPACITY_STROKE.1);
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" fill="#222">black: the most the upstream completes, C / {}</text>"##,
        COMPLETED.left + 8.0,
        COMPLETED.top + 16.0,
        show(args.model().stream_length())
    );
    for (run, bins) in runs.iter().zip(&per_bin) {
        let mut points = String::new();
        for (i, &rate) in bins.iter().enumerate() {
            let py = cy(rate);
            let (t0, t1) = (
                BIN.as_secs_f64() * i as f64,
                BIN.as_secs_f64() * (i + 1) as f64,
            );
            let _ = write!(
                points,
                "{:.1},{py:.1} {:.1},{py:.1} ",
                x_of(&COMPLETED, t0),
                x_of(&COMPLETED, t1)
            );
        }
        let (colour, dash) = run.contender.stroke();
        COMPLETED.polyline(&mut s, points.trim_end(), colour, dash);
    }

    let clipped = |run: &Run| run.samples.iter().any(|s| s.limit as f64 > y_max);
    let mut legend: Vec<(String, (&str, &str))> = vec![("C ± 25 %".to_owned(), CAPACITY_STROKE)];
    legend.extend(runs.iter().map(|run| {
        let mut label = run.contender.label();
        if clipped(run) {
            label.push_str(" (up to the top)");
        }
        (label, run.contender.stroke())
    }));
    LIMITS.legend(&mut s, legend);
    COMPLETED.close(&mut s);
    s
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let args = flags::parse_or_exit("adaptive", HELP, Args::parse);
    let wall = std::time::Instant::now();
    let (capacity, rate_limit) = args.runs;
    if capacity {
        let progress = |contender: &Contender| format!("{:<9}", contender.name());
        let runs = sim::run_each(Contender::CAPACITY, progress, |c| run(c, &args), Run::tally);
        let runs = runs.await;
        print_summary(&args, &runs);
        println!();
        let files = [
            ("adaptive_limit.csv", csv(&args, &runs)),
            ("adaptive_limit.svg", svg(&args, &runs)),
        ];
        sim::write_files("adaptive", &args.out_dir, &files);
    }
    if rate_limit {
        let contenders = Contender::RATE_LIMIT;
        let progress = |contender: &Contender| format!("rate limit, {:<9}", contender.name());
        let run = |contender| run_rate_limit(contender, &args);
        let runs = sim::run_each(contenders, progress, run, RateRun::tally).await;
        print_rate_limit(&args, &runs);
    }
    println!();
    println!("wall time {:.2} s", wall.elapsed().as_secs_f64());
}
