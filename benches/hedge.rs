//! Hedged attempts, simulated: how much do `RetryPolicy::hedge` and its two kinds of
//! delay cut the tail of the time to first chunk, and for how many more upstream
//! attempts, against an upstream that is slow to its first token now and then?
//!
//! ```text
//! cargo bench --bench hedge
//! cargo bench --bench hedge -- --rate 200 --calls 20000
//! cargo bench --bench hedge -- --slow-share 0.02 --slow-ms 5000
//! cargo bench --bench hedge -- --help
//! ```
//!
//! # Why
//!
//! An LLM API answers its headers at once and its first token when the model has
//! started generating: most of the time after a fraction of a second, sometimes, for a
//! request that landed on a busy replica, after many seconds. A retry does not help (the
//! attempt has not failed, it is slow) and a timeout short enough to help would cut the
//! long answers too. A hedge does: when an attempt has produced no first chunk after a
//! delay, another starts beside it, and the first of them to produce its first chunk
//! wins. Waiting for the delay makes the hedge cost little: only the calls slower than it
//! are sent twice. "The Tail at Scale" (Dean and Barroso, 2013) puts a hedge at the 95th
//! percentile at about 5 % more requests.
//!
//! tower's own `hedge` cannot do this for a stream: it decides at the response headers
//! (a response future that has resolved is done), and an LLM's headers come at once, so
//! its hedge never fires; it also records the latency of the winning attempt only. This
//! crate's hedge decides at the first chunk of the body, and records each call's time
//! from its start to its first chunk, whichever attempt delivered it.
//!
//! # The scenario
//!
//! `--calls` calls (10,000) arrive at a steady `--rate` (100 per second: each 10 s
//! window of `Hedge::percentile` holds about 1,000 calls), each in its own task, and
//! each reads its whole response. The in-process mock upstream (the one the tests use)
//! sends the response head of every request at once, then the first SSE event
//! (`data: {...}`) after `--fast-ms` (200 ms) for most attempts and after `--slow-ms`
//! (10 s) for a share `--slow-share` (5 %) of them, then two more events and
//! `data: [DONE]` at once. Each attempt is slow or fast by a draw of its own, from a
//! fixed seed, the call's number and the attempt's number: every contender's call `k`
//! has the same first attempt, and a hedge of it is slow or fast independently of it.
//!
//! It runs on tokio's paused clock: time only moves when every task is waiting for a
//! timer, so 100 s of traffic take a couple of seconds and do not depend on how busy
//! the machine is. The calls are real HTTP/1.1 over loopback, through a hyper-util
//! client with `TCP_NODELAY`: a dropped attempt closes its connection, as it would in
//! production.
//!
//! The contenders, each against a fresh upstream, with the same arrivals:
//!
//! | contender | stack |
//! |---|---|
//! | `none` | `FirstChunkRetryLayer` with `RetryPolicy::default()`: no hedging |
//! | `p95` | the same with `.hedge(Hedge::percentile(0.95))` |
//! | `p90` | the same with `.hedge(Hedge::percentile(0.9))` |
//! | `after250` | the same with `.hedge(Hedge::after(250 ms))` |
//!
//! Everything else is `RetryPolicy::default()`: at most 3 attempts (a hedge counts as
//! one), one hedge beside the first attempt (`max_extra(1)`), `min_samples(20)`, 10 s
//! windows, and a `first_chunk_timeout` of 30 s, longer than the slow attempts, so that
//! no attempt is cut by the timeout and retried: every extra attempt is a hedge. There
//! is no retry budget, so no hedge is refused.
//!
//! # What it measures
//!
//! Per contender:
//!
//! - `attempts`: requests the upstream received, by its own count, and `extra`, those
//!   beyond one per call, in % of the calls.
//! - the time to first chunk (TTFC) of each call, on the caller's side: from the call's
//!   start to the first data frame of the response body it got. Its quantiles (nearest
//!   rank), its maximum, and p99 / p50.
//! - `stream_hedges_total` by `outcome` (`won`, `lost`, `budget_exhausted`), read from the
//!   layer's OpenTelemetry meter (an SDK meter provider with an in-memory exporter).
//!
//! The goals, each marked met or not in the output: with `Hedge::percentile(0.95)`, p99
//! below 2 times p50, for at most 8 % extra attempts; without hedging, p99 is about the
//! slow latency. Consistency checks print a warning when they fail: every call got its
//! whole stream, every extra attempt is counted once in `stream_hedges_total`, no
//! attempt is left counted in `provider_calls_in_flight`, and no hedge started beside a
//! first attempt that was fast.
//!
//! For the percentile contenders a second table follows, one row per window of the
//! layer's latency histogram (rebuilt from the run: a window ends at the first call
//! start or first chunk at least a window after its own start): the calls it recorded
//! (those whose first chunk came in it), how many of them at the fast latency, their
//! quantile (the delay the layer takes for the next window, rounded up by its histogram
//! by at most 3 %), the hedge delay the upstream saw for the calls started in the
//! window (the arrival of a call's second attempt minus the call's start), and whether
//! that is the delay the window before called for (`expected`: within that quantile
//! rounded up by 1/32 and to the timer's millisecond, or no hedge when it is no sooner
//! than the slow attempts; a warning counts the windows where it is not).
//!
//! # Output
//!
//! - stdout: the summary table, the goals, the per-window tables, and the wall time.
//! - `docs/hedge_ttfc.csv` (directory from `--out-dir`): the TTFC distribution, with
//!   the columns `contender,ttfc_ms,calls,share_at_or_below`, one row per distinct TTFC.
//! - `docs/hedge_ttfc.svg`: the share of calls whose TTFC is above each value (the
//!   complementary CDF), both axes logarithmic, one line per contender, the 1 % line
//!   (p99) and each contender's p99 marked, and the goal (2 times p50).
//!
//! # Reading it
//!
//! With the defaults (seed 24301: 531 of the 10,000 first attempts are slow):
//!
//! - `none`: 5.3 % of the calls wait 10 s, so p95 and p99 are 10 s, 50 times the
//!   median.
//! - The floor: a hedge that waits out the fast attempts (a delay of at least 200 ms;
//!   a shorter one hedges every call, 100 % more attempts) delivers no sooner than the
//!   delay plus 200 ms, 400 ms. The calls whose first attempt is slow are 5 % of all,
//!   more than the 1 % above p99, so p99 is one of them or slower: at least 2 times the
//!   median. "Below 2 times" cannot be met by any hedge of this upstream within 8 % more
//!   attempts; the best is 401 ms (the delay rounded up to the timer's millisecond),
//!   2.005 times, which `p90` reaches with most seeds.
//! - `p90`: 95 % of the calls are fast, so the 0.9 quantile is the fast latency, the
//!   delay 200.7 ms (the upper end of the histogram's bucket), the timer fires at
//!   201 ms, and a hedged call has its first chunk at 401 ms. But the first window has
//!   no delay yet, its slow calls wait 10 s, and they are recorded in the second window
//!   (when their first chunk comes, 10 s after their start): with this seed the second
//!   window has only 88.6 % of its calls fast, so the third hedges after 402 ms, and p99
//!   is 602 ms (3.01 times). Over seeds 1 to 30, p99 is 401 ms with 25 and 602 ms with 5.
//! - `p95`: with exactly 5 % of attempts slow, the 0.95 quantile sits on the boundary
//!   between the fast calls and the hedged ones. In a window where at least 95 % of the
//!   calls recorded were fast, the quantile is the fast latency and the next window
//!   hedges after 201 ms; in one where fewer were, it is the latency of a hedged call,
//!   the window's own delay plus 200 ms, so the delay climbs by 200 ms a window (201,
//!   402, 607 ms) until a window falls back under. Which side a window lands on is a
//!   coin toss (the fast share of 1,000 calls has a standard deviation of 0.7 %). And
//!   the second window, with the unhedged first window's slow calls in it, can have its
//!   quantile at 10 s: then the third window's hedges would start after the slow
//!   attempts have answered, and its slow calls wait 10 s too. That is what this seed
//!   does: 101 calls of the first and third windows wait 10 s, and with the 24 whose
//!   hedge was slow too, p99 is 10 s. Over seeds 1 to 30, p99 is 602 ms with 2, 807 ms
//!   with 10, 1.02 s with 6, 1.23 s with 2, 1.45 s with 1 and 10 s with 9: never within
//!   the goal, and worse than `p90` with every seed, for 3.6 % to 4.9 % more attempts.
//! - `after250`: every slow first attempt is hedged at 250 ms, and delivers at 450 ms
//!   (2.25 times) unless its hedge is slow too, for 5.3 % more attempts.
//! - `lost` hedges are those that were slow themselves: the first attempt delivers at
//!   10 s and the hedge, 10 s behind it from its own start, is dropped.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::metrics::{PROVIDER_CALLS_IN_FLIGHT, STREAM_HEDGES};
use tower_stream_backpressure::retry::Hedge;
use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
use tower_stream_backpressure_testkit::flags::{self, next_flag, value};
use tower_stream_backpressure_testkit::sim::{self, Frame, met, quantile, show};
use tower_stream_backpressure_testkit::{Metrics, Protocol, Reply, Upstream};

/// Content events after the first chunk's (a `data: [DONE]` event follows them).
const TOKENS: usize = 3;
/// The header that tells the upstream which call an attempt belongs to.
const CALL_HEADER: &str = "x-call";
/// The goals: p99 / p50 below this with `Hedge::percentile(0.95)`...
const GOAL_RATIO: f64 = 2.0;
/// ...for at most this share of extra upstream attempts.
const GOAL_EXTRA: f64 = 0.08;

const HELP: &str = "\
Hedged attempts on tokio's paused clock: calls at a steady rate against a mock
upstream whose first chunk is slow for a share of attempts, without hedging and
with Hedge::percentile(0.95), Hedge::percentile(0.9) and Hedge::after(250 ms).

Usage: cargo bench --bench hedge -- [FLAGS]

Flags (default in brackets):
  --rate N            calls started per second [100]
  --calls N           calls in all [10000]
  --fast-ms MS        first chunk of a fast attempt after MS [200]
  --slow-ms MS        first chunk of a slow attempt after MS [10000]
  --slow-share P      share of attempts that are slow, 0 to 1 [0.05]
  --seed N            the seed of the draws, the same for every contender [24301]
  --out-dir DIR       where hedge_ttfc.csv and hedge_ttfc.svg go [docs]
  -h, --help          print this help
";

/// The settings, from the command line.
#[derive(Debug)]
struct Args {
    rate: u64,
    calls: u64,
    fast: Duration,
    slow: Duration,
    slow_share: f64,
    /// The seed of every attempt's draw, the same for every contender.
    seed: u64,
    out_dir: PathBuf,
}

impl Args {
    /// The flags, `Ok(None)` for `--help`, or an error naming the flag at fault.
    fn parse() -> Result<Option<Self>, String> {
        let mut args = Args {
            rate: 100,
            calls: 10_000,
            fast: Duration::from_millis(200),
            slow: Duration::from_secs(10),
            slow_share: 0.05,
            seed: 0x5eed,
            out_dir: PathBuf::from("docs"),
        };
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = next_flag(&mut parser)? {
            let p = &mut parser;
            match flag.as_str() {
                "--rate" => args.rate = value(p, &flag, 1, 10_000)?,
                "--calls" => args.calls = value(p, &flag, 1, 1_000_000)?,
                "--fast-ms" => args.fast = Duration::from_millis(value(p, &flag, 1, 60_000)?),
                "--slow-ms" => args.slow = Duration::from_millis(value(p, &flag, 1, 60_000)?),
                "--slow-share" => args.slow_share = value(p, &flag, 0.0, 1.0)?,
                "--seed" => args.seed = value(p, &flag, 0, u64::MAX)?,
                _ => {
                    if !flags::bench_flag(p, &flag, &mut args.out_dir)? {
                        return Ok(None);
                    }
                }
            }
        }
        if args.slow >= RetryPolicy::default().get_first_chunk_timeout() {
            return Err(format!(
                "--slow-ms ({} ms) must be below the first-chunk timeout ({:?}), which \
                 would cut the slow attempts",
                args.slow.as_millis(),
                RetryPolicy::default().get_first_chunk_timeout()
            ));
        }
        Ok(Some(args))
    }

    /// When call `k` starts, from the start of the run.
    fn start_of(&self, k: usize) -> Duration {
        Duration::from_nanos(k as u64 * 1_000_000_000 / self.rate)
    }
}

/// The stacks compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    None,
    P95,
    P90,
    After250,
}

impl Contender {
    const ALL: [Contender; 4] = [
        Contender::None,
        Contender::P95,
        Contender::P90,
        Contender::After250,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::None => "none",
            Contender::P95 => "p95",
            Contender::P90 => "p90",
            Contender::After250 => "after250",
        }
    }

    /// The hedge, as the policy is given it.
    fn label(self) -> &'static str {
        match self {
            Contender::None => "no hedging",
            Contender::P95 => "percentile(0.95)",
            Contender::P90 => "percentile(0.9)",
            Contender::After250 => "after(250 ms)",
        }
    }

    fn hedge(self) -> Option<Hedge> {
        match self {
            Contender::None => None,
            Contender::P95 => Some(Hedge::percentile(0.95)),
            Contender::P90 => Some(Hedge::percentile(0.9)),
            Contender::After250 => Some(Hedge::after(Duration::from_millis(250))),
        }
    }

    /// The quantile of a percentile hedge.
    fn percentile(self) -> Option<f64> {
        match self {
            Contender::P95 => Some(0.95),
            Contender::P90 => Some(0.9),
            Contender::None | Contender::After250 => None,
        }
    }

    /// Stroke colour and dash pattern of the plot's line.
    fn stroke(self) -> (&'static str, &'static str) {
        match self {
            Contender::None => ("#d62728", ""),
            Contender::P95 => ("#1f77b4", ""),
            // Dashed and dotted, so that they stay visible where they run on top of
            // the others.
            Contender::P90 => ("#2ca02c", "7 4"),
            Contender::After250 => ("#ff7f0e", "2 3"),
        }
    }
}

/// What the upstream saw of one call's attempts.
#[derive(Debug, Default, Clone)]
struct Seen {
    attempts: u32,
    /// Whether the first attempt was slow.
    first_slow: bool,
    /// When the second attempt arrived, from the start of the run.
    second_at: Option<Duration>,
}

/// Whether each attempt of each call is slow, by call, then attempt: drawn in that
/// order from the seed before the run, so that every contender's call `k` has the same
/// first attempt however many attempts came before it.
fn draws(args: &Args) -> Vec<Vec<bool>> {
    let attempts = RetryPolicy::default().get_max_attempts();
    let mut rng = fastrand::Rng::with_seed(args.seed);
    (0..args.calls)
        .map(|_| (0..attempts).map(|_| rng.f64() < args.slow_share).collect())
        .collect()
}

/// One streaming call, its body read to the end: its time to first chunk if it got a
/// `2xx` read to `data: [DONE]`.
async fn call<S, B>(service: S, url: &str, k: u64) -> Option<Duration>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    B: Body<Data = Bytes>,
{
    let started = Instant::now();
    let mut request = tower_stream_backpressure_testkit::post(url);
    request
        .headers_mut()
        .insert(CALL_HEADER, HeaderValue::from(k));
    let response = service.oneshot(request).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let mut body = std::pin::pin!(response.into_body());
    let mut ttfc = None;
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let Some(data) = frame.ok()?.into_data().ok() else {
            continue;
        };
        if ttfc.is_none() && !data.is_empty() {
            ttfc = Some(started.elapsed());
        }
        read.extend_from_slice(&data);
    }
    read.ends_with(b"data: [DONE]\n\n")
        .then_some(ttfc)
        .flatten()
}

/// What one contender's run produced.
struct Run {
    contender: Contender,
    /// Each call's time to first chunk, by call; `None` for a call that failed.
    ttfc: Vec<Option<Duration>>,
    seen: Vec<Seen>,
    /// Requests the upstream received in all, by its own count.
    hits: u64,
    /// `stream_hedges_total` by outcome: won, lost, budget_exhausted.
    hedges: [u64; 3],
    /// `provider_calls_in_flight` once every call has ended.
    in_flight: f64,
    wall: Duration,
}

impl Run {
    /// The times to first chunk of the calls that got their stream, in order.
    fn sorted(&self) -> Vec<Duration> {
        let mut sorted: Vec<Duration> = self.ttfc.iter().flatten().copied().collect();
        sorted.sort_unstable();
        sorted
    }

    fn extra(&self) -> f64 {
        let calls = self.ttfc.len() as f64;
        (self.hits as f64 - calls) / calls
    }
}

/// Runs `contender` against a fresh upstream.
async fn run(contender: Contender, args: &Args) -> Run {
    let wall = std::time::Instant::now();
    let start = Instant::now();

    // The upstream draws each attempt slow or fast, and notes what it saw of each call.
    let seen = Arc::new(Mutex::new(vec![Seen::default(); args.calls as usize]));
    let upstream = {
        let seen = seen.clone();
        let draws = draws(args);
        let (fast, slow) = (args.fast, args.slow);
        Upstream::start(move |hit| {
            let k = hit
                .headers
                .get(CALL_HEADER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .expect("every call names itself");
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            let call = &mut seen[k as usize];
            let n = call.attempts;
            call.attempts += 1;
            let slow_attempt = draws[k as usize][n as usize];
            match n {
                0 => call.first_slow = slow_attempt,
                1 => call.second_at = Some(start.elapsed()),
                _ => {}
            }
            let delay = if slow_attempt { slow } else { fast };
            Reply::tokens(TOKENS).first_event_after(delay)
        })
        .await
    };
    let url = upstream.url("/v1/chat/completions");

    let metrics = Metrics::new();
    let policy = match contender.hedge() {
        Some(hedge) => RetryPolicy::default().hedge(hedge),
        None => RetryPolicy::default(),
    };
    let service = ServiceBuilder::new()
        .layer(FirstChunkRetryLayer::new(policy).meter(metrics.meter()))
        .service(tower_stream_backpressure_testkit::client(Protocol::Http1));
    let calls = sim::spawn_steady(start, args.rate, args.calls, |k| {
        let (service, url) = (service.clone(), url.clone());
        async move { call(service, &url, k).await }
    })
    .await;
    let mut ttfc = Vec::with_capacity(calls.len());
    for handle in calls {
        // A call task that panicked counts as failed.
        ttfc.push(handle.await.ok().flatten());
    }

    let snapshot = metrics.snapshot();
    let hedges = ["won", "lost", "budget_exhausted"]
        .map(|outcome| snapshot.count(STREAM_HEDGES, &[("outcome", outcome)]) as u64);
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Run {
        contender,
        ttfc,
        seen,
        hits: upstream.hits(),
        hedges,
        in_flight: snapshot.count(PROVIDER_CALLS_IN_FLIGHT, &[]),
        wall: wall.elapsed(),
    }
}

fn print_summary(args: &Args, runs: &[Run]) {
    println!();
    println!(
        "== {} calls at {}/s; first chunk after {} for {:.0} % of attempts, after {} for {:.0} % (seed {}) ==",
        args.calls,
        args.rate,
        show(args.fast),
        (1.0 - args.slow_share) * 100.0,
        show(args.slow),
        args.slow_share * 100.0,
        args.seed
    );
    println!();
    println!(
        "{:<9} {:<17} {:>6} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6}",
        "",
        "",
        "",
        "upstream",
        "extra",
        "TTFC",
        "",
        "",
        "",
        "",
        "",
        "p99 /",
        "hedges",
        "",
        "budget"
    );
    println!(
        "{:<9} {:<17} {:>6} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6}",
        "contender",
        "hedge",
        "calls",
        "attempts",
        "",
        "p50",
        "p90",
        "p95",
        "p99",
        "p99.9",
        "max",
        "p50",
        "won",
        "lost",
        "exh."
    );
    for run in runs {
        let sorted = run.sorted();
        let p50 = quantile(&sorted, 0.5);
        let p99 = quantile(&sorted, 0.99);
        println!(
            "{:<9} {:<17} {:>6} {:>8} {:>5.2} % {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7.3} {:>6} {:>6} {:>6}",
            run.contender.name(),
            run.contender.label(),
            run.ttfc.len(),
            run.hits,
            run.extra() * 100.0,
            show(p50),
            show(quantile(&sorted, 0.9)),
            show(quantile(&sorted, 0.95)),
            show(p99),
            show(quantile(&sorted, 0.999)),
            show(sorted.last().copied().unwrap_or_default()),
            p99.as_secs_f64() / p50.as_secs_f64().max(1e-9),
            run.hedges[0],
            run.hedges[1],
            run.hedges[2],
        );
    }
    println!();
    print_goals(args, runs);
    for run in runs {
        check(run);
    }
}

/// Each goal against its threshold, and the floor no hedge of this upstream goes below.
fn print_goals(args: &Args, runs: &[Run]) {
    let find = |contender| runs.iter().find(|run| run.contender == contender);
    if let Some(run) = find(Contender::P95) {
        let sorted = run.sorted();
        let (p50, p99) = (quantile(&sorted, 0.5), quantile(&sorted, 0.99));
        let ratio = p99.as_secs_f64() / p50.as_secs_f64().max(1e-9);
        println!(
            "goal, percentile(0.95): p99 / p50 below {GOAL_RATIO}: {ratio:.3} ({} / {}): {}",
            show(p99),
            show(p50),
            met(ratio < GOAL_RATIO)
        );
        println!(
            "goal, percentile(0.95): at most {:.0} % more upstream attempts: {:.2} %: {}",
            GOAL_EXTRA * 100.0,
            run.extra() * 100.0,
            met(run.extra() <= GOAL_EXTRA)
        );
    }
    if let Some(run) = find(Contender::None) {
        let p99 = quantile(&run.sorted(), 0.99);
        // "About": within 5 % of the slow attempts' latency.
        let about = p99.abs_diff(args.slow).as_secs_f64() <= args.slow.as_secs_f64() * 0.05;
        println!(
            "expected, no hedging: p99 about {}: {}: {}",
            show(args.slow),
            show(p99),
            met(about)
        );
    }
    // A delay below the fast latency hedges every call: 100 % more attempts.
    println!(
        "floor: within {:.0} % more attempts a hedge waits out the fast {}, so a hedged call has its \
         first chunk at {} at the soonest, 2 x p50",
        GOAL_EXTRA * 100.0,
        show(args.fast),
        show(args.fast * 2)
    );
    if args.slow_share > 0.01 {
        println!(
            "floor: {:.0} % of first attempts are slow, more than the 1 % above p99, so p99 is a \
             hedged call or slower: p99 / p50 below 2 cannot be met here",
            args.slow_share * 100.0
        );
    }
}

/// Warns of anything in `run` that contradicts how the layer should behave.
fn check(run: &Run) {
    let name = run.contender.name();
    let failed = run.ttfc.iter().filter(|t| t.is_none()).count();
    if failed > 0 {
        println!("warning: {name}: {failed} calls did not get their whole stream");
    }
    let extra = run.hits - run.ttfc.len() as u64;
    let counted = run.hedges[0] + run.hedges[1];
    if counted != extra {
        println!(
            "warning: {name}: {extra} extra upstream attempts, but {counted} hedges won or lost"
        );
    }
    if run.in_flight != 0.0 {
        println!(
            "warning: {name}: provider_calls_in_flight is {} after every call ended",
            run.in_flight
        );
    }
    let beside_fast = run
        .seen
        .iter()
        .filter(|s| !s.first_slow && s.second_at.is_some())
        .count();
    if beside_fast > 0 {
        println!("warning: {name}: {beside_fast} hedges beside a fast first attempt");
    }
}

/// One window of a percentile hedge's latency histogram, rebuilt from the run.
struct Window {
    from: Duration,
    to: Duration,
    started: usize,
    /// Times to first chunk of the calls whose first chunk came in the window.
    recorded: Vec<Duration>,
    /// Hedge delays of the calls started in the window, as the upstream saw them.
    delays: Vec<Duration>,
    /// Calls started in the window whose first attempt was slow and that were not
    /// hedged.
    slow_unhedged: usize,
}

/// The windows of `run`'s hedge: the first starts with the first call; each ends at the
/// first call start or first chunk at least `period` after its own start.
fn windows(args: &Args, run: &Run, period: Duration) -> Vec<Window> {
    let starts = (0..run.ttfc.len()).map(|k| args.start_of(k));
    let chunks = (0..run.ttfc.len()).filter_map(|k| Some(args.start_of(k) + run.ttfc[k]?));
    let mut events: Vec<Duration> = starts.chain(chunks).collect();
    events.sort_unstable();
    let mut bounds = vec![Duration::ZERO];
    for &event in &events {
        if event >= *bounds.last().unwrap_or(&Duration::ZERO) + period {
            bounds.push(event);
        }
    }
    bounds.push(Duration::MAX);
    let mut windows: Vec<Window> = bounds
        .windows(2)
        .map(|pair| Window {
            from: pair[0],
            to: pair[1],
            started: 0,
            recorded: Vec::new(),
            delays: Vec::new(),
            slow_unhedged: 0,
        })
        .collect();
    let index = |at: Duration| windows.partition_point(|w| w.to <= at);
    let mut placed = Vec::new();
    for (k, seen) in run.seen.iter().enumerate() {
        let start = args.start_of(k);
        let chunk = run.ttfc[k].map(|ttfc| (index(start + ttfc), ttfc));
        placed.push((index(start), start, seen, chunk));
    }
    for (window, start, seen, chunk) in placed {
        let w = &mut windows[window];
        w.started += 1;
        match seen.second_at {
            Some(at) => w.delays.push(at.saturating_sub(start)),
            None if seen.first_slow => w.slow_unhedged += 1,
            None => {}
        }
        if let Some((window, ttfc)) = chunk {
            windows[window].recorded.push(ttfc);
        }
    }
    for window in &mut windows {
        window.recorded.sort_unstable();
        window.delays.sort_unstable();
    }
    windows
}

/// The per-window table of a percentile hedge: what each window recorded, the delay the
/// next takes from it, the delay its calls were hedged after, and whether that is the
/// delay the window before called for.
fn print_windows(args: &Args, run: &Run) {
    let (Some(p), Some(hedge)) = (run.contender.percentile(), run.contender.hedge()) else {
        return;
    };
    println!();
    println!(
        "{} ({}): its windows; the delay of each is the p{:.0} of the calls recorded in the one before",
        run.contender.name(),
        run.contender.label(),
        p * 100.0
    );
    println!(
        "{:>6} {:>8} {:>6} {:>8} {:>9} {:>8} {:>9} {:>14} {:>6} {:>13} {:>8}",
        "window",
        "from",
        "calls",
        "recorded",
        format!("at {}", show(args.fast)),
        "share",
        format!("p{:.0} rec.", p * 100.0),
        "hedged after",
        "hedged",
        "slow unhedged",
        "expected"
    );
    let windows = windows(args, run, hedge.get_window());
    let mut unexpected = 0;
    let mut before: Option<Duration> = None;
    // The last window holds the first chunks of the last calls only.
    for (n, window) in windows.iter().enumerate().filter(|(_, w)| w.started > 0) {
        let fast = window.recorded.iter().filter(|&&t| t <= args.fast).count();
        let share = fast as f64 / window.recorded.len().max(1) as f64;
        let delays = match (window.delays.first(), window.delays.last()) {
            (Some(&low), Some(&high)) if low == high => show(low),
            (Some(&low), Some(&high)) => format!("{}..{}", show(low), show(high)),
            _ => "none".to_owned(),
        };
        // The delay called for: the quantile of the window before, rounded up by the
        // histogram (at most 1/32) and to the timer's millisecond. None when it is no
        // sooner than the slow attempts, which then end first.
        let expected = match before {
            Some(q) if q < args.slow => {
                let high = q + q / 32 + Duration::from_millis(1);
                window.slow_unhedged == 0 && window.delays.iter().all(|&d| d >= q && d <= high)
            }
            _ => window.delays.is_empty(),
        };
        unexpected += usize::from(!expected);
        let from = if window.from.is_zero() {
            "0 s".to_owned()
        } else {
            show(window.from)
        };
        let quantile = (window.recorded.len() as u64 >= hedge.get_min_samples())
            .then(|| quantile(&window.recorded, p));
        println!(
            "{n:>6} {from:>8} {:>6} {:>8} {fast:>9} {:>6.2} % {:>9} {delays:>14} {:>6} {:>13} {:>8}",
            window.started,
            window.recorded.len(),
            share * 100.0,
            quantile.map_or("-".to_owned(), show),
            window.delays.len(),
            window.slow_unhedged,
            if expected { "yes" } else { "NO" },
        );
        before = quantile;
    }
    if unexpected > 0 {
        println!(
            "warning: {}: {unexpected} windows hedged after another delay than the window before called for",
            run.contender.name()
        );
    }
}

fn csv(runs: &[Run]) -> String {
    let mut text = String::from("contender,ttfc_ms,calls,share_at_or_below\n");
    for run in runs {
        let sorted = run.sorted();
        for (value, count, below) in distribution(&sorted) {
            let _ = writeln!(
                text,
                "{},{:.3},{count},{:.6}",
                run.contender.name(),
                value.as_secs_f64() * 1000.0,
                below as f64 / sorted.len() as f64
            );
        }
    }
    text
}

/// The distinct values of `sorted`, each with how many times it occurs and how many
/// values are at or below it.
fn distribution(sorted: &[Duration]) -> Vec<(Duration, usize, usize)> {
    let mut out: Vec<(Duration, usize, usize)> = Vec::new();
    for (i, &value) in sorted.iter().enumerate() {
        match out.last_mut() {
            Some(last) if last.0 == value => {
                last.1 += 1;
                last.2 = i + 1;
            }
            _ => out.push((value, 1, i + 1)),
        }
    }
    out
}

/// The plot: the share of calls with a TTFC above each value (the complementary CDF),
/// on logarithmic axes, one line per contender, with p99 marked.
fn svg(args: &Args, runs: &[Run]) -> String {
    const FRAME: Frame = Frame {
        width: 1000.0,
        height: 480.0,
        left: 70.0,
        right: 30.0,
        top: 72.0,
        bottom: 50.0,
    };
    let (left, top) = (FRAME.left, FRAME.top);
    let (plot_w, plot_h) = (FRAME.plot_w(), FRAME.plot_h());

    // x: seconds, from the decade under the fastest call to the "nice" value (1, 2 or 5
    // times a power of ten) above the slowest with a margin.
    let all = || {
        runs.iter()
            .flat_map(|run| run.ttfc.iter().flatten().copied())
    };
    let fastest = all().min().unwrap_or(args.fast).as_secs_f64().max(1e-3);
    let slowest = all().max().unwrap_or(args.slow).as_secs_f64().max(fastest);
    let nice = |v: f64| [1.0, 2.0, 5.0].map(|m| m * 10f64.powf(v.log10().floor()));
    let x_lo = 10f64.powf(fastest.log10().floor());
    let x_hi = nice(slowest * 1.2)
        .into_iter()
        .chain([10.0 * 10f64.powf((slowest * 1.2).log10().floor())])
        .find(|&v| v >= slowest * 1.2)
        .unwrap_or(slowest * 2.0);
    // y: the share of calls slower, from 1 down to the decade at or under one call.
    let calls = runs
        .iter()
        .map(|run| run.ttfc.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let y_lo = 10f64.powf((1.0 / calls as f64).log10().floor());
    let x = |secs: f64| left + (secs / x_lo).log10() / (x_hi / x_lo).log10() * plot_w;
    let y = |share: f64| top + (share.max(y_lo)).log10() / y_lo.log10() * plot_h;

    let mut s = String::new();
    FRAME.open(
        &mut s,
        &format!(
            "Hedging: share of calls slower than x ({} calls at {}/s; {:.0} % of attempts {}, the rest {})",
            args.calls,
            args.rate,
            args.slow_share * 100.0,
            show(args.slow),
            show(args.fast)
        ),
    );

    // A grid line at each power of ten of the share, ticks at 1, 2 and 5 of each decade
    // of time.
    let mut share = 1.0;
    while share >= y_lo * 0.999 {
        FRAME.grid_y(&mut s, y(share), format!("{} %", share * 100.0));
        share /= 10.0;
    }
    let mut decade = x_lo;
    while decade <= x_hi * 1.001 {
        for tick in nice(decade * 1.001) {
            if tick > x_hi * 1.001 {
                break;
            }
            let px = x(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#f0f0f0" stroke-width="1"/>"##,
                top + plot_h
            );
            FRAME.tick_x(&mut s, px, show(Duration::from_secs_f64(tick)));
        }
        decade *= 10.0;
    }
    FRAME.axes(
        &mut s,
        "time to first chunk (log)",
        "share of calls slower (log)",
    );

    // The goal: p99 below twice the median (of the first contender hedging at the
    // 0.95 quantile, else of the first).
    let goal_run = runs
        .iter()
        .find(|run| run.contender == Contender::P95)
        .or(runs.first());
    if let Some(run) = goal_run {
        let goal = quantile(&run.sorted(), 0.5).as_secs_f64() * GOAL_RATIO;
        let gx = x(goal);
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="#888" stroke-width="1" stroke-dasharray="3 3"/>"##,
            top + plot_h
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#666">goal: p99 below 2 × p50 ({})</text>"##,
            gx + 6.0,
            top + 16.0,
            show(Duration::from_secs_f64(goal))
        );
    }
    // p99: the 1 % line.
    let py = y(0.01);
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#888" stroke-width="1" stroke-dasharray="6 3"/>"##,
        left + plot_w
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" fill="#666">p99: 1 % of calls slower</text>"##,
        left + 6.0,
        py - 6.0
    );

    // The series, as steps: the share slower holds until the next value, and drops at
    // it.
    for run in runs {
        let sorted = run.sorted();
        let n = sorted.len().max(1) as f64;
        let mut points = format!("{:.1},{:.1}", x(x_lo), y(1.0));
        let mut above = 1.0;
        for (value, _, below) in distribution(&sorted) {
            let px = x(value.as_secs_f64());
            let after = (sorted.len() - below) as f64 / n;
            let _ = write!(points, " {px:.1},{:.1} {px:.1},{:.1}", y(above), y(after));
            above = after;
        }
        let (colour, dash) = run.contender.stroke();
        FRAME.polyline(&mut s, &points, colour, dash);
    }
    // Each contender's p99, on its line.
    for run in runs {
        let p99 = quantile(&run.sorted(), 0.99);
        let (colour, _) = run.contender.stroke();
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{py:.1}" r="4.5" fill="none" stroke="{colour}" stroke-width="2"/>"##,
            x(p99.as_secs_f64())
        );
    }

    FRAME.legend(
        &mut s,
        runs.iter().map(|run| {
            let p99 = quantile(&run.sorted(), 0.99);
            let label = format!("{}: p99 {}", run.contender.label(), show(p99));
            (label, run.contender.stroke())
        }),
    );
    FRAME.close(&mut s);
    s
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let args = flags::parse_or_exit("hedge", HELP, Args::parse);
    let wall = std::time::Instant::now();
    let runs = sim::run_each(
        Contender::ALL,
        |contender| format!("{:<9}", contender.name()),
        |contender| run(contender, &args),
        |run| (run.ttfc.len() as u64, run.hits, run.wall),
    )
    .await;
    print_summary(&args, &runs);
    for run in &runs {
        print_windows(&args, run);
    }
    println!();

    sim::write_files(
        "hedge",
        &args.out_dir,
        &[
            ("hedge_ttfc.csv", csv(&runs)),
            ("hedge_ttfc.svg", svg(&args, &runs)),
        ],
    );
    println!("wall time {:.2} s", wall.elapsed().as_secs_f64());
}
