//! A retry storm, simulated: how much extra load do retries put on an upstream that is
//! down, with no retry budget, with this crate's `RetryBudgetLayer`, and with tower's
//! own `Retry` and `TpsBudget`?
//!
//! ```text
//! cargo bench --bench retry_storm
//! cargo bench --bench retry_storm -- --rate 500 --outage-start 5 --outage-end 50
//! cargo bench --bench retry_storm -- --capacity 210
//! cargo bench --bench retry_storm -- --help
//! ```
//!
//! # Why
//!
//! Retrying a failed call is right when failures are rare and independent. When the
//! upstream is down, every call fails, and a client that retries up to 3 times sends
//! 3 requests for each call: the outage triples the load on a service that is already
//! struggling, and makes it harder for it to come back. A retry budget caps retries to
//! a share of the traffic (here 20 %, plus 10 per second), so an outage adds at most
//! that much.
//!
//! # The scenario
//!
//! Calls arrive at a steady `--rate` per second (one every `1 / rate` s, each in its own
//! task) for `--duration` seconds. The in-process mock upstream (the one the tests use)
//! answers `503` (no `Retry-After`) to every request that arrives during the outage,
//! `[--outage-start, --outage-end)` seconds after the start, and a short healthy SSE
//! stream (3 events and `data: [DONE]`) otherwise. With `--capacity N` the upstream
//! also answers `503` to every request beyond the `N`th of each second, outage or not,
//! which lets an amplified load keep it failing after the outage ends (without it, the
//! upstream has no limit and recovers the instant the outage ends).
//!
//! It runs on tokio's paused clock: time only moves when every task is waiting for a
//! timer, so a minute of traffic takes a few seconds and does not depend on how busy
//! the machine is (the backoff jitter comes from a fixed seed). The calls are real
//! HTTP/1.1 over loopback, through a hyper-util client with `TCP_NODELAY`.
//!
//! Three contenders, each against a fresh upstream, with the same arrivals:
//!
//! | contender | stack |
//! |---|---|
//! | `none` | `FirstChunkRetryLayer` with `RetryPolicy::default()`: 3 attempts, no budget |
//! | `ours` | `RetryBudgetLayer::new(RetryBudget::default())` above the same `FirstChunkRetryLayer` |
//! | `tower` | `tower::retry::Retry` with `TpsBudget::new(10 s, 10, 0.2)` and a minimal policy |
//!
//! The budgets have the same parameters: a 10 s window, 10 retries per second always
//! allowed, and 0.2 retries per original call. Every contender makes at most 3
//! attempts per call, with the same backoff: full jitter, retry `n` (from 0) waits a
//! uniformly random time within `[0, min(2 s, 250 ms * 2^n)]` (`RetryPolicy`'s default,
//! set explicitly). tower's policy retries a `5xx` status or an error, clones the
//! request, waits that same backoff with `tokio::time::sleep`, deposits once per call
//! (when its first attempt answers), and withdraws one retry from the budget before each
//! retry, as `FirstChunkRetryLayer` does.
//!
//! # What it measures
//!
//! Per contender and per second `s` of the run (the interval `[s, s + 1)` seconds after
//! the start):
//!
//! - `calls`: original calls started in that second (`--rate`).
//! - `attempts`: requests the upstream received in that second, counted by the
//!   upstream itself: original attempts and retries.
//! - `succeeded`, `failed`: of the calls started in that second, how many ended with a
//!   `2xx` whose body was read to `data: [DONE]`, and how many did not (a `503` passed
//!   back after the last attempt or after the budget refused a retry, or an error). So
//!   `calls = succeeded + failed`, and a call is counted in the second it started even
//!   if its retries end in the next one.
//!
//! and in the summary:
//!
//! - amplification during the outage: upstream attempts in the seconds of the outage
//!   divided by the calls started in them; 1.0 means no retries at all, 3.0 means
//!   every call made its 3 attempts.
//! - amplification over the whole run, the same over every second.
//! - calls ok and failed, in all.
//! - time to recover: the smallest whole number of seconds `r >= 0` such that at least
//!   one call started in the second `[outage_end + r, outage_end + r + 1)` and every
//!   call started in it succeeded; `never` if there is no such second before the run
//!   ends. 0 means the calls started in the first second after the outage all
//!   succeeded.
//! - the peak of upstream attempts per second, and the real (wall) time the contender
//!   took.
//!
//! # Output
//!
//! - stdout: the summary table, one row per contender, and the total wall time.
//! - `docs/retry_storm.csv` (directory from `--out-dir`): every series, with the columns
//!   `contender,second,calls,attempts,succeeded,failed`.
//! - `docs/retry_storm.svg`: upstream attempts per second over time, one line per
//!   contender, the outage shaded.
//!
//! # Reading it
//!
//! With the defaults (200 calls/s, a 30 s outage from 10 s to 40 s):
//!
//! - `none` sends about 600 requests per second for as long as the outage lasts: an
//!   amplification of 3.0, every call making its 3 attempts.
//! - `ours` allows 500 retries per 10 s window (0.2 per call over 2,000 calls, plus
//!   10 per second), an amplification of 1.25 over the outage. They do not come as a
//!   steady 50 per second: the whole balance goes in a burst at the start of the
//!   outage, and as long as the traffic is steady, deposits expire as fast as new ones
//!   come in, so the next retries are allowed only when that burst's retries expire, a
//!   window later. The plot shows a burst every 10 s with nothing between them.
//! - `tower` (`TpsBudget`, `1 / 0.2 = 5` deposits per retry, exact here) behaves
//!   the same way, but its window holds the slice it is about to reuse until it is
//!   overwritten, so it covers up to 11 s rather than 10: about 540 retries per burst,
//!   a burst every 11 s, and 1.27 over this outage. Its check-then-subtract
//!   withdrawal cannot overdraw here, since everything runs on one thread.
//! - Calls started during the outage fail whatever the stack (every attempt gets a
//!   503), except a few of `none`'s from its last second, whose retries land after it
//!   ends. Without `--capacity` every contender is back at the original rate as soon
//!   as the outage ends, and its time to recover is 0 s.
//!
//! A budget does not save calls in a total outage; it limits how hard the clients hit
//! the upstream while it is down. With `--capacity` that decides how long the upstream
//! takes to come back: with `--capacity 210`, the retries of `none` spill over the end
//! of the outage, overload the upstream, and keep calls failing for a few more seconds,
//! while the budgeted contenders recover at once.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower_stream_backpressure_testkit::flags::{self, next_flag, value};
use tower_stream_backpressure_testkit::sim::{self, Frame};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, Retry};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::{FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy};
use tower_stream_backpressure_testkit::{Reply, Upstream};

/// Content events in a healthy stream (a `data: [DONE]` event follows them).
const TOKENS: usize = 3;
/// Attempts per call, the first included, for every contender.
const MAX_ATTEMPTS: u32 = 3;
/// The backoff of every contender: `RetryPolicy`'s defaults.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The budgets' parameters: `RetryBudget::default()`, and the same for `TpsBudget`.
const BUDGET_TTL: Duration = Duration::from_secs(10);
const BUDGET_MIN_PER_SEC: u32 = 10;
const BUDGET_RATIO: f32 = 0.2;
/// The seed of the backoff jitter, the same for every contender.
const SEED: u64 = 0x5eed;

const HELP: &str = "\
A retry storm on tokio's paused clock: calls at a steady rate against a mock
upstream that answers 503 to everything during an outage, through three retry
stacks (no budget, RetryBudgetLayer, tower's Retry with TpsBudget).

Usage: cargo bench --bench retry_storm -- [FLAGS]

Flags (default in brackets):
  --rate N            calls started per second [200]
  --duration SECS     seconds of arrivals [60]
  --outage-start SECS when the upstream starts failing every request [10]
  --outage-end SECS   when it recovers [40]
  --capacity N        requests per second the upstream serves, the rest get
                      a 503; 0 for no limit [0]
  --out-dir DIR       where retry_storm.csv and retry_storm.svg go [docs]
  -h, --help          print this help
";

/// The settings, from the command line.
#[derive(Debug)]
struct Args {
    rate: u64,
    duration: u64,
    outage_start: u64,
    outage_end: u64,
    capacity: u64,
    out_dir: PathBuf,
}

impl Args {
    /// The flags, `Ok(None)` for `--help`, or an error naming the flag at fault.
    fn parse() -> Result<Option<Self>, String> {
        let mut args = Args {
            rate: 200,
            duration: 60,
            outage_start: 10,
            outage_end: 40,
            capacity: 0,
            out_dir: PathBuf::from("docs"),
        };
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = next_flag(&mut parser)? {
            let p = &mut parser;
            match flag.as_str() {
                "--rate" => args.rate = value(p, &flag, 1, 10_000)?,
                "--duration" => args.duration = value(p, &flag, 1, 3600)?,
                "--outage-start" => args.outage_start = value(p, &flag, 0, 3600)?,
                "--outage-end" => args.outage_end = value(p, &flag, 0, 3600)?,
                "--capacity" => args.capacity = value(p, &flag, 0, 1_000_000)?,
                _ => {
                    if !flags::bench_flag(p, &flag, &mut args.out_dir)? {
                        return Ok(None);
                    }
                }
            }
        }
        if args.outage_start >= args.outage_end {
            return Err(format!(
                "--outage-start ({}) must be below --outage-end ({})",
                args.outage_start, args.outage_end
            ));
        }
        if args.outage_end > args.duration {
            return Err(format!(
                "--outage-end ({}) must not be after --duration ({})",
                args.outage_end, args.duration
            ));
        }
        Ok(Some(args))
    }
}

/// The retry stacks compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    None,
    Ours,
    Tower,
}

impl Contender {
    const ALL: [Contender; 3] = [Contender::None, Contender::Ours, Contender::Tower];

    fn name(self) -> &'static str {
        match self {
            Contender::None => "none",
            Contender::Ours => "ours",
            Contender::Tower => "tower",
        }
    }

    /// The legend of the plot.
    fn label(self) -> &'static str {
        match self {
            Contender::None => "none: no budget",
            Contender::Ours => "ours: RetryBudgetLayer",
            Contender::Tower => "tower: Retry + TpsBudget",
        }
    }

    /// Stroke colour and dash pattern of the plot's line.
    fn stroke(self) -> (&'static str, &'static str) {
        match self {
            Contender::None => ("#d62728", ""),
            Contender::Ours => ("#1f77b4", ""),
            // Dashed, so that it stays visible where it runs on top of `ours`.
            Contender::Tower => ("#2ca02c", "7 4"),
        }
    }
}

/// `RetryPolicy::default()`, its backoff set explicitly to the values tower's policy
/// uses too.
fn our_policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(INITIAL_BACKOFF, MAX_BACKOFF)
}

/// A minimal `tower::retry::Policy` with a `TpsBudget`: retries a `5xx` status or an
/// error, up to [`MAX_ATTEMPTS`] attempts, with the same full-jitter backoff as
/// `RetryPolicy`.
#[derive(Clone)]
struct TowerPolicy {
    budget: Arc<TpsBudget>,
    /// Attempts made so far by this call (`Retry` clones the policy into each call).
    attempts: u32,
}

impl<B, E> Policy<Request<Full<Bytes>>, Response<B>, E> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<B>, E>,
    ) -> Option<Self::Future> {
        if self.attempts == 1 {
            // One deposit per original call, when its first attempt answers.
            self.budget.deposit();
        }
        let failed = match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        if !failed || self.attempts >= MAX_ATTEMPTS || !self.budget.withdraw() {
            return None;
        }
        let delay = backoff_delay(self.attempts - 1);
        self.attempts += 1;
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(request.clone())
    }
}

/// Full jitter, as `RetryPolicy` does it: retry `n` (from 0) waits a uniformly random
/// time within `[0, min(MAX_BACKOFF, INITIAL_BACKOFF * 2^n)]`.
fn backoff_delay(retry: u32) -> Duration {
    let ceiling = INITIAL_BACKOFF
        .saturating_mul(1u32 << retry.min(31))
        .min(MAX_BACKOFF);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// Counts per second of the run, grown as needed.
#[derive(Debug, Default, Clone)]
struct PerSecond(Vec<u64>);

impl PerSecond {
    /// Adds one to `second`, and returns its new count.
    fn add(&mut self, second: usize) -> u64 {
        if self.0.len() <= second {
            self.0.resize(second + 1, 0);
        }
        self.0[second] += 1;
        self.0[second]
    }

    fn get(&self, second: usize) -> u64 {
        self.0.get(second).copied().unwrap_or(0)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The sum over `range` of seconds.
    fn sum(&self, range: std::ops::Range<usize>) -> u64 {
        range.map(|second| self.get(second)).sum()
    }
}

/// What one contender's run produced.
struct Run {
    contender: Contender,
    calls: PerSecond,
    attempts: PerSecond,
    succeeded: PerSecond,
    failed: PerSecond,
    /// Requests the upstream received in all, by its own count.
    hits: u64,
    wall: Duration,
}

impl Run {
    /// Seconds in the series: the run, and any retries after it.
    fn seconds(&self) -> usize {
        self.calls.len().max(self.attempts.len())
    }

    /// Upstream attempts per original call started over `range` of seconds.
    fn amplification(&self, range: std::ops::Range<usize>) -> f64 {
        let calls = self.calls.sum(range.clone());
        if calls == 0 {
            return 0.0;
        }
        self.attempts.sum(range) as f64 / calls as f64
    }

    /// Seconds from the outage's end to the first second in which at least one call
    /// started and every call started succeeded, if there is one.
    fn recovery(&self, outage_end: usize) -> Option<usize> {
        (outage_end..self.calls.len())
            .find(|&second| self.calls.get(second) > 0 && self.failed.get(second) == 0)
            .map(|second| second - outage_end)
    }
}

/// One streaming call, its body read to the end: `true` for a `2xx` read to
/// `data: [DONE]`.
async fn call<S, B>(service: S, url: &str) -> bool
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    B: Body<Data = Bytes>,
{
    let request = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .expect("a valid request");
    let Ok(response) = service.oneshot(request).await else {
        return false;
    };
    if !response.status().is_success() {
        return false;
    }
    match response.into_body().collect().await {
        Ok(body) => body.to_bytes().ends_with(b"data: [DONE]\n\n"),
        Err(_) => false,
    }
}

/// Starts the calls at a steady rate through `service`, from `start`, and waits for
/// them all; `calls`, `succeeded` and `failed` per second of their start.
async fn drive<S, B>(
    args: &Args,
    start: Instant,
    url: &str,
    service: S,
) -> (PerSecond, PerSecond, PerSecond)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Body<Data = Bytes> + Send + 'static,
{
    let total = args.rate * args.duration;
    let calls = sim::spawn_steady(start, args.rate, total, |_| {
        let (service, url) = (service.clone(), url.to_owned());
        async move { call(service, &url).await }
    })
    .await;
    let mut started = PerSecond::default();
    let mut succeeded = PerSecond::default();
    let mut failed = PerSecond::default();
    for (k, handle) in (0..).zip(calls) {
        let second = (k / args.rate) as usize;
        started.add(second);
        // A call task that panicked counts as failed.
        if handle.await.unwrap_or(false) {
            succeeded.add(second);
        } else {
            failed.add(second);
        }
    }
    (started, succeeded, failed)
}

/// Runs `contender` against a fresh upstream.
async fn run(contender: Contender, args: &Args) -> Run {
    let wall = std::time::Instant::now();
    fastrand::seed(SEED);
    let start = Instant::now();

    // The upstream counts each request in the second of the run it arrives in, and
    // answers by the same clock.
    let attempts = Arc::new(Mutex::new(PerSecond::default()));
    let upstream = {
        let attempts = attempts.clone();
        let outage = Duration::from_secs(args.outage_start)..Duration::from_secs(args.outage_end);
        let capacity = args.capacity;
        Upstream::start(move |_hit| {
            let elapsed = start.elapsed();
            let in_second = attempts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(elapsed.as_secs() as usize);
            if outage.contains(&elapsed) || (capacity > 0 && in_second > capacity) {
                Reply::status(503)
            } else {
                Reply::tokens(TOKENS)
            }
        })
        .await
    };
    let url = upstream.url("/v1/chat/completions");

    // TCP_NODELAY, as every streaming client should; on the paused clock it also keeps
    // small writes from waiting on a delayed ACK while simulated time jumps ahead.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);

    let (calls, succeeded, failed) = match contender {
        Contender::None => {
            let service = ServiceBuilder::new()
                .layer(FirstChunkRetryLayer::new(our_policy()))
                .service(client);
            drive(args, start, &url, service).await
        }
        Contender::Ours => {
            let service = ServiceBuilder::new()
                .layer(RetryBudgetLayer::new(RetryBudget::default()))
                .layer(FirstChunkRetryLayer::new(our_policy()))
                .service(client);
            drive(args, start, &url, service).await
        }
        Contender::Tower => {
            let policy = TowerPolicy {
                budget: Arc::new(TpsBudget::new(BUDGET_TTL, BUDGET_MIN_PER_SEC, BUDGET_RATIO)),
                attempts: 1,
            };
            drive(args, start, &url, Retry::new(policy, client)).await
        }
    };
    let attempts = attempts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Run {
        contender,
        calls,
        attempts,
        succeeded,
        failed,
        hits: upstream.hits(),
        wall: wall.elapsed(),
    }
}

fn print_summary(args: &Args, runs: &[Run]) {
    let outage = args.outage_start as usize..args.outage_end as usize;
    println!();
    println!(
        "== {} calls/s for {} s, every request failing (503) from {} s to {} s{} ==",
        args.rate,
        args.duration,
        args.outage_start,
        args.outage_end,
        match args.capacity {
            0 => String::new(),
            n => format!(", capacity {n} requests/s"),
        }
    );
    println!();
    println!(
        "{:<9} {:>14} {:>14} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "", "amplification", "amplification", "calls", "calls", "time to", "peak", "wall"
    );
    println!(
        "{:<9} {:>14} {:>14} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "contender", "(outage)", "(whole run)", "ok", "failed", "recover", "attempts/s", "time"
    );
    for run in runs {
        let ok = run.succeeded.sum(0..run.seconds());
        let failed = run.failed.sum(0..run.seconds());
        let recovery = match run.recovery(args.outage_end as usize) {
            Some(seconds) => format!("{seconds} s"),
            None => "never".to_owned(),
        };
        let peak = run.attempts.0.iter().max().copied().unwrap_or(0);
        println!(
            "{:<9} {:>14.3} {:>14.3} {:>9} {:>9} {:>10} {:>10} {:>6.2} s",
            run.contender.name(),
            run.amplification(outage.clone()),
            run.amplification(0..run.seconds()),
            ok,
            failed,
            recovery,
            peak,
            run.wall.as_secs_f64(),
        );
    }
    println!();
    for run in runs {
        let attempts = run.attempts.sum(0..run.attempts.len());
        if attempts != run.hits {
            println!(
                "warning: {}: {attempts} attempts counted per second, but the upstream saw {}",
                run.contender.name(),
                run.hits
            );
        }
    }
}

fn csv(runs: &[Run]) -> String {
    let mut text = String::from("contender,second,calls,attempts,succeeded,failed\n");
    for run in runs {
        for second in 0..run.seconds() {
            let _ = writeln!(
                text,
                "{},{second},{},{},{},{}",
                run.contender.name(),
                run.calls.get(second),
                run.attempts.get(second),
                run.succeeded.get(second),
                run.failed.get(second),
            );
        }
    }
    text
}

/// The plot: upstream attempts per second against time, one line per contender.
fn svg(args: &Args, runs: &[Run]) -> String {
    const FRAME: Frame = Frame {
        width: 800.0,
        height: 400.0,
        left: 70.0,
        right: 20.0,
        top: 72.0,
        bottom: 50.0,
    };
    const LEFT: f64 = FRAME.left;
    const TOP: f64 = FRAME.top;
    let (plot_w, plot_h) = (FRAME.plot_w(), FRAME.plot_h());

    let seconds = runs.iter().map(Run::seconds).max().unwrap_or(1).max(1) as f64;
    let peak = runs
        .iter()
        .flat_map(|run| run.attempts.0.iter().chain(run.calls.0.iter()))
        .max()
        .copied()
        .unwrap_or(1)
        .max(1) as f64;
    let y_step = sim::tick_step(peak * 1.05, 6.0);
    let y_max = (peak * 1.05 / y_step).ceil() * y_step;
    let x_step = sim::tick_step(seconds, 8.0).max(1.0);
    let x = |t: f64| LEFT + t / seconds * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_max * plot_h;

    let mut s = String::new();
    FRAME.open(
        &mut s,
        &format!(
            "Retry storm: upstream attempts per second ({} calls/s, outage {}–{} s)",
            args.rate, args.outage_start, args.outage_end
        ),
    );

    // The outage, shaded, under everything else.
    let (ox0, ox1) = (x(args.outage_start as f64), x(args.outage_end as f64));
    let _ = writeln!(
        s,
        r##"<rect x="{ox0:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="#fbe3e3"/>"##,
        ox1 - ox0
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#b85450" font-style="italic">outage (every request gets a 503)</text>"##,
        (ox0 + ox1) / 2.0,
        TOP + plot_h - 8.0
    );

    // Grid lines and ticks.
    let mut v = 0.0;
    while v <= y_max + 1e-9 {
        FRAME.grid_y(&mut s, y(v), v);
        v += y_step;
    }
    let mut t = 0.0;
    while t <= seconds + 1e-9 {
        FRAME.tick_x(&mut s, x(t), t);
        t += x_step;
    }
    FRAME.axes(&mut s, "time (s)", "upstream attempts per second");

    // The original calls' rate, which every line would follow without retries. Labelled
    // under the lines: no second has fewer attempts than calls started.
    if let Some(first) = runs.first() {
        let rate = first.calls.get(0) as f64;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#666">original calls: {rate} per second</text>"##,
            LEFT + plot_w - 6.0,
            y(rate) + 17.0
        );
    }

    // The series, as steps: each second's count held over that second.
    let steps = |series: &PerSecond| {
        let mut points = String::new();
        for second in 0..seconds as usize {
            let value = y(series.get(second) as f64);
            let _ = write!(
                points,
                "{:.1},{value:.1} {:.1},{value:.1} ",
                x(second as f64),
                x(second as f64 + 1.0)
            );
        }
        points
    };
    for run in runs {
        let (colour, dash) = run.contender.stroke();
        FRAME.polyline(&mut s, steps(&run.attempts).trim_end(), colour, dash);
    }

    // The legend, in a row under the title.
    let legend = runs.iter().map(|run| run.contender);
    FRAME.legend(&mut s, legend.map(|c| (c.label(), c.stroke())));
    FRAME.close(&mut s);
    s
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let args = flags::parse_or_exit("retry_storm", HELP, Args::parse);
    let wall = std::time::Instant::now();
    let runs = sim::run_each(
        Contender::ALL,
        |contender| format!("{:<6}", contender.name()),
        |contender| run(contender, &args),
        |run| (run.calls.sum(0..run.seconds()), run.hits, run.wall),
    )
    .await;
    print_summary(&args, &runs);

    sim::write_files(
        "retry_storm",
        &args.out_dir,
        &[
            ("retry_storm.csv", csv(&runs)),
            ("retry_storm.svg", svg(&args, &runs)),
        ],
    );
    println!("wall time {:.2} s", wall.elapsed().as_secs_f64());
}
