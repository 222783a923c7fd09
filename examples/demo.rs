//! The crate's showcase: a few thousand streaming LLM calls, at high concurrency,
//! through the three layers, against an in-process mock upstream that misbehaves on
//! purpose.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --http2
//! cargo run --release --example demo -- --calls 10000 --limit 32 --stall 0.05
//! cargo run --release --example demo -- --help
//! ```
//!
//! A soak: a minute at 10,000 concurrent streams with the faults on, the process's
//! memory (RSS) sampled every 5 s, and the slots, gauges and upstream streams checked
//! at the end (HTTP/2, because 10,000 HTTP/1.1 connections need 20,000 file
//! descriptors in one process; `--drop` stays 0, because over HTTP/2 it would close the
//! one connection every stream shares):
//!
//! ```text
//! cargo run --release --example demo -- --http2 --duration 60 --concurrency 10000 \
//!     --limit 10000 --reset 0.05 --stall 0.02 --mid-reset 0.01
//! ```
//!
//! What it shows:
//!
//! - `StreamConcurrencyLayer` holds a slot until the stream ends and across every
//!   retry: however many callers push (`--concurrency`), the upstream's own count of
//!   open streams never goes above `--limit`. Callers that wait longer than
//!   `--max-wait` for a slot fail with `Rejected`.
//! - `FirstChunkRetryLayer` retries what fails before the first SSE event (resets,
//!   stalls, dropped connections, 503 bursts with `Retry-After`) and never what fails
//!   after it: a reset mid-stream reaches the caller as a body error.
//! - `RetryBudgetLayer` caps how many retries all calls together may add.
//! - Errors downcast to `Rejected` and `FirstChunkError` say what happened.
//! - Everything is recorded as OpenTelemetry metrics, printed at the end as Prometheus
//!   text.
//!
//! The mock upstream (`tests/support/upstream.rs`, shared with the tests) serves SSE on
//! 127.0.0.1, HTTP/1.1 and HTTP/2 (prior knowledge) on one port; the script below picks
//! each request's reply and fault at random, at the rates given by the flags.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tower_stream_backpressure_testkit::flags::{next_flag, value};
use tower_stream_backpressure_testkit::process::rss_bytes;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::proto::{MetricFamily, MetricType};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::frame::Sse;
use tower_stream_backpressure::{
    FirstChunkError, FirstChunkRetryLayer, Rejected, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};
use tower_stream_backpressure_testkit::{Fault, Reply, Upstream};

/// Content events per stream (a `data: [DONE]` event follows them).
const TOKENS: usize = 20;
/// The upstream's pause before each event.
const GAP: Duration = Duration::from_millis(2);
/// A stall before the first event counts as failed after this long, and is retried.
const FIRST_CHUNK_TIMEOUT: Duration = Duration::from_secs(1);

const HELP: &str = "\
Streaming calls through StreamConcurrencyLayer, RetryBudgetLayer and
FirstChunkRetryLayer against a mock SSE upstream that injects faults.

Usage: cargo run --release --example demo -- [FLAGS]

Flags (default in brackets):
  --calls N           calls to make [4000]
  --duration SECS     make calls for this long instead of a number of calls
  --rss-every SECS    print the process's RSS this often [5 with --duration, else off]
  --concurrency N     callers at once, each making one call at a time [400]
  --limit N           the stream concurrency limit [64]
  --max-wait MS       how long a call may wait for a slot [1000]
  --reset RATE        share of streams reset before their first event [0.05]
  --stall RATE        share of streams stalled before their first event [0.02]
  --mid-reset RATE    share of streams reset after some events [0.01]
  --drop RATE         share of requests whose connection is dropped [0]
                      (with --http2, every stream on that connection ends)
  --burst-every MS    a burst of 503s starts every MS ms, 0 for none [3000]
  --burst-length MS   how long each burst lasts [200]
  --retry-after SECS  the Retry-After of the 503s [1]
  --budget-ratio R    retries the budget allows per call, beyond 10/s [0.2]
  --http2             HTTP/2 with prior knowledge (h2c), not HTTP/1.1
  -h, --help          print this help

RATE is a share within 0 and 1; the four rates may add up to 1 at most.
";

/// The fault rates and 503 bursts the upstream's script applies.
#[derive(Debug, Clone, Copy)]
struct Faults {
    reset: f64,
    stall: f64,
    mid_reset: f64,
    drop: f64,
    burst_every: u64,
    burst_length: u64,
    retry_after: u64,
}

/// What the upstream's script injected, counted per reply.
#[derive(Default)]
struct Injected {
    status_503: AtomicU64,
    reset: AtomicU64,
    stall: AtomicU64,
    mid_reset: AtomicU64,
    drop: AtomicU64,
}

impl Faults {
    /// The reply to a request arriving `elapsed` after the upstream started.
    fn reply(&self, elapsed: Duration, injected: &Injected) -> Reply {
        if self.burst_every > 0
            && elapsed.as_millis() % u128::from(self.burst_every)
                >= u128::from(self.burst_every - self.burst_length)
        {
            injected.status_503.fetch_add(1, Relaxed);
            return Reply::status(503).header("retry-after", self.retry_after.to_string());
        }
        let roll = fastrand::f64();
        let mut edge = 0.0;
        let mut hit = |rate: f64| {
            edge += rate;
            roll < edge
        };
        let fault = if hit(self.reset) {
            injected.reset.fetch_add(1, Relaxed);
            Fault::ResetBeforeFirst
        } else if hit(self.stall) {
            injected.stall.fetch_add(1, Relaxed);
            Fault::StallBeforeFirst
        } else if hit(self.mid_reset) {
            injected.mid_reset.fetch_add(1, Relaxed);
            Fault::ResetAfter(fastrand::usize(1..TOKENS))
        } else if hit(self.drop) {
            injected.drop.fetch_add(1, Relaxed);
            return Reply::DropConnection;
        } else {
            Fault::None
        };
        Reply::faulty(TOKENS, fault).gap(GAP)
    }
}

/// The settings, from the command line.
#[derive(Debug)]
struct Args {
    calls: u64,
    duration: Option<Duration>,
    rss_every: Option<Duration>,
    concurrency: u64,
    limit: usize,
    max_wait: Duration,
    budget_ratio: f64,
    http2: bool,
    faults: Faults,
}

impl Args {
    /// The flags, `Ok(None)` for `--help`, or an error naming the flag at fault.
    fn parse() -> Result<Option<Self>, String> {
        let mut args = Args {
            calls: 4000,
            duration: None,
            rss_every: None,
            concurrency: 400,
            limit: 64,
            max_wait: Duration::from_millis(1000),
            budget_ratio: 0.2,
            http2: false,
            faults: Faults {
                reset: 0.05,
                stall: 0.02,
                mid_reset: 0.01,
                drop: 0.0,
                burst_every: 3000,
                burst_length: 200,
                retry_after: 1,
            },
        };
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = next_flag(&mut parser)? {
            let (p, f) = (&mut parser, &mut args.faults);
            match flag.as_str() {
                "--calls" => args.calls = value(p, &flag, 1, 1_000_000)?,
                "--duration" => {
                    args.duration = Some(Duration::from_secs(value(p, &flag, 1, 86_400)?))
                }
                "--rss-every" => {
                    args.rss_every = Some(Duration::from_secs(value(p, &flag, 1, 3600)?))
                }
                "--concurrency" => args.concurrency = value(p, &flag, 1, 100_000)?,
                "--limit" => args.limit = value(p, &flag, 1, 100_000)?,
                "--max-wait" => {
                    args.max_wait = Duration::from_millis(value(p, &flag, 0, 3_600_000)?)
                }
                "--reset" => f.reset = value(p, &flag, 0.0, 1.0)?,
                "--stall" => f.stall = value(p, &flag, 0.0, 1.0)?,
                "--mid-reset" => f.mid_reset = value(p, &flag, 0.0, 1.0)?,
                "--drop" => f.drop = value(p, &flag, 0.0, 1.0)?,
                "--burst-every" => f.burst_every = value(p, &flag, 0, 3_600_000)?,
                "--burst-length" => f.burst_length = value(p, &flag, 0, 3_600_000)?,
                "--retry-after" => f.retry_after = value(p, &flag, 0, 3600)?,
                "--budget-ratio" => args.budget_ratio = value(p, &flag, 0.0, 1000.0)?,
                "--http2" => args.http2 = true,
                "--help" => return Ok(None),
                _ => return Err(format!("invalid option '{flag}'")),
            }
        }
        if args.duration.is_some() {
            args.calls = u64::MAX;
            args.rss_every.get_or_insert(Duration::from_secs(5));
        }
        let f = &args.faults;
        if f.reset + f.stall + f.mid_reset + f.drop > 1.0 {
            return Err("--reset, --stall, --mid-reset and --drop add up to more than 1".into());
        }
        if f.burst_every > 0 && f.burst_length >= f.burst_every {
            return Err(format!(
                "--burst-length ({}) must be below --burst-every ({})",
                f.burst_length, f.burst_every
            ));
        }
        Ok(Some(args))
    }
}

/// Live counts, drawn by the progress line.
#[derive(Default)]
struct Counts {
    done: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
}

impl Counts {
    /// Redraws the progress line on stderr.
    fn draw(&self, calls: u64, slots_held: usize, limit: usize) {
        eprint!(
            "\r{}/{calls} calls  ok {}  failed {}  in flight {}  slots held {slots_held}/{limit}   ",
            self.done.load(Relaxed),
            self.ok.load(Relaxed),
            self.failed.load(Relaxed),
            self.in_flight.load(Relaxed),
        );
        let _ = std::io::stderr().flush();
    }
}

/// First-chunk latencies in 1 ms buckets up to 60 s: memory that does not grow with
/// the number of calls, so a long run measures the layers, not the demo's records.
struct Latencies([AtomicU64; 60_001]);

impl Latencies {
    fn new() -> Arc<Self> {
        Arc::new(Self(std::array::from_fn(|_| AtomicU64::new(0))))
    }

    fn record(&self, latency: Duration) {
        let bucket = (latency.as_millis() as usize).min(self.0.len() - 1);
        self.0[bucket].fetch_add(1, Relaxed);
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|n| n.load(Relaxed)).sum()
    }

    /// The `p` quantile (0..=1), nearest rank, to the millisecond.
    fn quantile(&self, p: f64) -> Duration {
        let rank = ((p * self.count() as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (ms, n) in self.0.iter().enumerate() {
            seen += n.load(Relaxed);
            if seen >= rank {
                return Duration::from_millis(ms as u64);
            }
        }
        Duration::ZERO
    }
}

/// How one call ended: `failure` is `None` for a 2xx stream read to `data: [DONE]`.
struct Outcome {
    failure: Option<(String, String)>,
    /// Call start to the response future resolving with a 2xx (the first chunk found).
    first_chunk: Option<Duration>,
}

/// One streaming call, its body read to the end, classified.
async fn call<S, B>(service: S, url: &str) -> Outcome
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let request = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .expect("a valid request");
    let started = Instant::now();
    let response = match service.oneshot(request).await {
        Ok(response) => response,
        Err(error) => {
            return Outcome {
                failure: Some((classify(&error), chain(&*error))),
                first_chunk: None,
            };
        }
    };
    let status = response.status();
    let first_chunk = status.is_success().then(|| started.elapsed());
    let failure = match response.into_body().collect().await.map(|b| b.to_bytes()) {
        _ if !status.is_success() => Some((format!("status {status} returned"), String::new())),
        Err(error) => Some(("body error mid-stream".to_owned(), chain(&*error.into()))),
        Ok(body) if !body.ends_with(b"data: [DONE]\n\n") => {
            Some(("body ended without [DONE]".to_owned(), String::new()))
        }
        Ok(_) => None,
    };
    Outcome {
        failure,
        first_chunk,
    }
}

/// An error and its sources, `: `-separated.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        text = format!("{text}: {source}");
        next = source.source();
    }
    text
}

/// Names an error from the response future by downcasting it.
fn classify(error: &BoxError) -> String {
    if let Some(rejected) = error.downcast_ref::<Rejected>() {
        format!("Rejected ({})", rejected.reason())
    } else if let Some(error) = error.downcast_ref::<FirstChunkError>() {
        format!(
            "FirstChunkError {:?}, {:?}",
            error.kind(),
            error.stop_reason()
        )
    } else {
        "inner error, passed through unchanged".to_owned()
    }
}

/// Counter or gauge values of the metric family `name`, by the value of `label`.
fn by_label(families: &[MetricFamily], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    for family in families.iter().filter(|f| f.name() == name) {
        for metric in family.get_metric() {
            let key = metric
                .get_label()
                .iter()
                .find(|pair| pair.name() == label)
                .map_or(String::new(), |pair| pair.value().to_owned());
            let value = match family.get_field_type() {
                MetricType::COUNTER => metric.get_counter().get_value(),
                MetricType::GAUGE => metric.get_gauge().get_value(),
                _ => continue,
            };
            *values.entry(key).or_insert(0.0) += value;
        }
    }
    values
}

/// Everything the summary table is made of.
struct Summary<'a> {
    args: &'a Args,
    ok: u64,
    /// Failed calls by reason: count and one example error.
    failures: &'a BTreeMap<String, (u64, String)>,
    /// First-chunk latencies of the calls that got a 2xx.
    latencies: &'a Latencies,
    /// RSS samples: seconds since the start, bytes.
    rss: &'a [(u64, u64)],
    wall: Duration,
    upstream: &'a Upstream,
    injected: &'a Injected,
    families: &'a [MetricFamily],
    budget: &'a RetryBudget,
}

fn print_summary(s: &Summary<'_>) {
    let (args, f) = (s.args, &s.args.faults);
    let metric = |name, label| by_label(s.families, name, label);
    let retries = metric("stream_retries_total", "outcome");
    let retry = |outcome: &str| retries.get(outcome).copied().unwrap_or(0.0) as u64;
    let rejected = metric("stream_concurrency_rejections_total", "reason")
        .values()
        .sum::<f64>() as u64;
    let at_end = |name| metric(name, "provider").values().sum::<f64>();
    let injected = |count: &AtomicU64| count.load(Relaxed);
    let failed: u64 = s.failures.values().map(|(n, _)| n).sum();
    let ms = |p| s.latencies.quantile(p).as_secs_f64() * 1e3;
    let row = |name: &str, value: &dyn Display| println!("{name:<56} {value}");

    let protocol = if args.http2 {
        "HTTP/2 (h2c)"
    } else {
        "HTTP/1.1"
    };
    println!();
    let calls = match args.duration {
        Some(duration) => format!("calls for {} s", duration.as_secs()),
        None => format!("{} calls", args.calls),
    };
    println!(
        "== {protocol}: {calls} by {} callers, limit {}, max wait {} ms ==",
        args.concurrency,
        args.limit,
        args.max_wait.as_millis()
    );
    println!();
    println!("faults injected by the upstream");
    let bursts = format!(
        "  503, retry-after {} s ({} ms every {} ms)",
        f.retry_after, f.burst_length, f.burst_every
    );
    row(&bursts, &injected(&s.injected.status_503));
    row(
        "  reset before the first event",
        &injected(&s.injected.reset),
    );
    row(
        "  stall before the first event",
        &injected(&s.injected.stall),
    );
    row("  reset mid-stream", &injected(&s.injected.mid_reset));
    row("  connection dropped", &injected(&s.injected.drop));
    println!();
    row("calls ok (2xx, body read to `data: [DONE]`)", &s.ok);
    row("calls failed", &failed);
    for (reason, (n, _)) in s.failures {
        row(&format!("  {reason}"), n);
    }
    row("upstream attempts (upstream.hits())", &s.upstream.hits());
    let calls = s.ok + failed;
    let attempts = calls.saturating_sub(rejected) + retry("success") + retry("failed");
    row(
        "  client attempts (calls given a slot + retried ones)",
        &attempts,
    );
    println!("retries (stream_retries_total)");
    for outcome in ["success", "failed", "exhausted", "budget_exhausted"] {
        row(&format!("  outcome={outcome}"), &retry(outcome));
    }
    row("retry budget available at the end", &s.budget.available());
    let peak = format!("{} / {}", s.upstream.peak_streams(), args.limit);
    row("upstream peak concurrent streams / limit", &peak);
    row(
        "upstream streams still open at the end",
        &s.upstream.open_streams(),
    );
    let gauges = format!(
        "{} / {}",
        at_end("streams_in_flight"),
        at_end("provider_calls_in_flight")
    );
    row(
        "streams_in_flight / provider_calls_in_flight at the end",
        &gauges,
    );
    let latency = format!(
        "{:.1} ms / {:.1} ms ({} calls)",
        ms(0.50),
        ms(0.99),
        s.latencies.count()
    );
    row(
        "first-chunk latency p50 / p99 (slot wait included)",
        &latency,
    );
    row("wall time", &format!("{:.2} s", s.wall.as_secs_f64()));
    if let (Some(first), Some(last)) = (s.rss.first(), s.rss.last()) {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        // After warm-up: the first sample at least 10 s in, if the run was that long.
        let warm = s.rss.iter().find(|(t, _)| *t >= 10).unwrap_or(first);
        let samples: Vec<String> = s
            .rss
            .iter()
            .map(|(t, bytes)| format!("{t}s {:.0}", mib(*bytes)))
            .collect();
        row("RSS samples (MiB)", &samples.join(", "));
        let growth = format!(
            "{:.1} MiB at {} s, {:.1} MiB at {} s ({:+.1} MiB)",
            mib(warm.1),
            warm.0,
            mib(last.1),
            last.0,
            mib(last.1) - mib(warm.1)
        );
        row("RSS after warm-up, at the end", &growth);
    }
    let examples: Vec<_> = s
        .failures
        .iter()
        .filter(|(_, (_, e))| !e.is_empty())
        .collect();
    if !examples.is_empty() {
        println!();
        println!("an error of each kind:");
        for (reason, (_, example)) in examples {
            println!("  {reason}: {example}");
        }
    }
}

#[tokio::main]
async fn main() {
    let args = match Args::parse() {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{HELP}");
            return;
        }
        Err(message) => {
            eprintln!("demo: {message}\nRun with --help to see the flags.");
            std::process::exit(2);
        }
    };
    let budget = match RetryBudget::try_new(Duration::from_secs(10), 10, args.budget_ratio) {
        Ok(budget) => budget,
        Err(error) => {
            eprintln!("demo: --budget-ratio: {error}");
            std::process::exit(2);
        }
    };

    // Metrics go to a Prometheus registry, read back at the end.
    let registry = prometheus::Registry::new();
    let exporter = match opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("demo: cannot build the Prometheus exporter: {error}");
            std::process::exit(1);
        }
    };
    let meter_provider = SdkMeterProvider::builder().with_reader(exporter).build();
    let meter = meter_provider.meter("demo");

    let faults = args.faults;
    let injected = Arc::new(Injected::default());
    let upstream = {
        let (injected, started) = (injected.clone(), Instant::now());
        Upstream::start(move |_hit| faults.reply(started.elapsed(), &injected)).await
    };
    let url = upstream.url("/v1/chat/completions");

    // TCP_NODELAY, as every streaming client should: small writes go out at once.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(args.http2);
    let client = builder.build::<_, Full<Bytes>>(connector);

    let policy = RetryPolicy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .first_chunk_timeout(FIRST_CHUNK_TIMEOUT)
        .max_retry_after(Duration::from_secs(5));
    let concurrency = StreamConcurrencyLayer::new(args.limit)
        .max_wait(args.max_wait)
        .provider("mock")
        .meter(meter.clone());
    let service = ServiceBuilder::new()
        .layer(concurrency.clone())
        .layer(
            RetryBudgetLayer::new(budget.clone())
                .provider("mock")
                .meter(meter.clone()),
        )
        .layer(
            FirstChunkRetryLayer::new(policy)
                .frames(Sse::default())
                .provider("mock")
                .meter(meter.clone()),
        )
        .service(client);

    // `concurrency` callers, each taking the next call number until none are left.
    let started = Instant::now();
    let counts = Arc::new(Counts::default());
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Latencies::new();
    let deadline = args.duration.map(|duration| started + duration);
    let mut callers = Vec::new();
    for _ in 0..args.concurrency.min(args.calls) {
        let (service, url, counts, next) =
            (service.clone(), url.clone(), counts.clone(), next.clone());
        let latencies = latencies.clone();
        let calls = args.calls;
        callers.push(tokio::spawn(async move {
            // Failed calls by reason: a count and the first error.
            let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
            while next.fetch_add(1, Relaxed) < calls
                && deadline.is_none_or(|deadline| Instant::now() < deadline)
            {
                counts.in_flight.fetch_add(1, Relaxed);
                let outcome = call(service.clone(), &url).await;
                counts.in_flight.fetch_sub(1, Relaxed);
                if let Some(latency) = outcome.first_chunk {
                    latencies.record(latency);
                }
                match outcome.failure {
                    None => counts.ok.fetch_add(1, Relaxed),
                    Some((reason, example)) => {
                        failures.entry(reason).or_insert((0, example)).0 += 1;
                        counts.failed.fetch_add(1, Relaxed)
                    }
                };
                counts.done.fetch_add(1, Relaxed);
            }
            failures
        }));
    }

    // RSS, sampled while the calls run.
    let rss_samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = args.rss_every.map(|every| {
        let samples = rss_samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                if let Some(bytes) = rss_bytes() {
                    let at = started.elapsed().as_secs();
                    eprintln!(
                        "\n[{at:>4} s] RSS {:.1} MiB",
                        bytes as f64 / (1024.0 * 1024.0)
                    );
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((at, bytes));
                }
            }
        })
    });

    // The progress line, on stderr, redrawn until every caller is done.
    let progress = {
        let (counts, concurrency) = (counts.clone(), concurrency.clone());
        let (calls, limit) = (args.calls, args.limit);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                counts.draw(calls, limit - concurrency.available_slots(), limit);
            }
        })
    };

    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for caller in callers {
        match caller.await {
            Ok(theirs) => {
                for (reason, (n, example)) in theirs {
                    failures.entry(reason).or_insert((0, example)).0 += n;
                }
            }
            Err(error) => eprintln!("demo: a caller task failed: {error}"),
        }
    }
    let wall = started.elapsed();
    progress.abort();
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    // Let the last streams close on both sides before counting what is left open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if args.rss_every.is_some() {
        if let Some(bytes) = rss_bytes() {
            let at = started.elapsed().as_secs();
            rss_samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, bytes));
        }
    }
    let ok = counts.ok.load(Relaxed);
    let rss_samples = rss_samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    counts.draw(
        args.calls,
        args.limit - concurrency.available_slots(),
        args.limit,
    );
    eprintln!();

    let families = registry.gather();
    print_summary(&Summary {
        args: &args,
        ok,
        failures: &failures,
        latencies: &latencies,
        rss: &rss_samples,
        wall,
        upstream: &upstream,
        injected: &injected,
        families: &families,
        budget: &budget,
    });
    println!();
    println!("== Prometheus metrics ==");
    let mut text = Vec::new();
    match prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut text) {
        Ok(()) => println!("{}", String::from_utf8_lossy(&text)),
        Err(error) => eprintln!("demo: cannot encode the metrics: {error}"),
    }
}
