//! The demo's flags, and the script by which the mock upstream misbehaves.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tower_stream_backpressure_testkit::flags::{next_flag, value};
use tower_stream_backpressure_testkit::{Fault, Reply};

/// Content events per stream (a `data: [DONE]` event follows them).
pub const TOKENS: usize = 20;
/// The upstream's pause before each event.
const GAP: Duration = Duration::from_millis(2);

pub const HELP: &str = "\
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
  --metrics           print the Prometheus text on stdout, before the summary
  --metrics-file PATH where the Prometheus text goes otherwise
                      [the system's temporary directory]
  -h, --help          print this help

RATE is a share within 0 and 1; the four rates may add up to 1 at most.
The exit status is 1 if the summary finds a fault, 2 for a bad flag.
";

/// The fault rates and 503 bursts of the upstream's script.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub reset: f64,
    pub stall: f64,
    pub mid_reset: f64,
    pub drop: f64,
    pub burst_every: u64,
    pub burst_length: u64,
    pub retry_after: u64,
}

/// What the script injected, counted per reply.
#[derive(Default)]
pub struct Injected {
    pub status_503: AtomicU64,
    pub reset: AtomicU64,
    pub stall: AtomicU64,
    pub mid_reset: AtomicU64,
    pub drop: AtomicU64,
}

impl Faults {
    /// The reply to a request arriving `elapsed` after the upstream started.
    pub fn reply(&self, elapsed: Duration, injected: &Injected) -> Reply {
        let period = u128::from(self.burst_every);
        if period > 0 && elapsed.as_millis() % period >= period - u128::from(self.burst_length) {
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

/// Where the Prometheus text goes.
#[derive(Debug)]
pub enum MetricsOut {
    Stdout,
    File(PathBuf),
}

/// The settings, from the command line.
#[derive(Debug)]
pub struct Args {
    pub calls: u64,
    pub duration: Option<Duration>,
    pub rss_every: Option<Duration>,
    pub concurrency: u64,
    pub limit: usize,
    pub max_wait: Duration,
    pub budget_ratio: f64,
    pub http2: bool,
    pub metrics: MetricsOut,
    pub faults: Faults,
}

impl Args {
    /// The flags, `Ok(None)` for `--help`, or an error naming the flag at fault.
    pub fn parse() -> Result<Option<Self>, String> {
        let mut args = Args {
            calls: 4000,
            duration: None,
            rss_every: None,
            concurrency: 400,
            limit: 64,
            max_wait: Duration::from_millis(1000),
            budget_ratio: 0.2,
            http2: false,
            metrics: MetricsOut::File(
                std::env::temp_dir().join("tower-stream-backpressure-demo.prom"),
            ),
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
        let secs = Duration::from_secs;
        let millis = Duration::from_millis;
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = next_flag(&mut parser)? {
            let (p, f) = (&mut parser, &mut args.faults);
            match flag.as_str() {
                "--calls" => args.calls = value(p, &flag, 1, 1_000_000)?,
                "--duration" => args.duration = Some(secs(value(p, &flag, 1, 86_400)?)),
                "--rss-every" => args.rss_every = Some(secs(value(p, &flag, 1, 3600)?)),
                "--concurrency" => args.concurrency = value(p, &flag, 1, 100_000)?,
                "--limit" => args.limit = value(p, &flag, 1, 100_000)?,
                "--max-wait" => args.max_wait = millis(value(p, &flag, 0, 3_600_000)?),
                "--reset" => f.reset = value(p, &flag, 0.0, 1.0)?,
                "--stall" => f.stall = value(p, &flag, 0.0, 1.0)?,
                "--mid-reset" => f.mid_reset = value(p, &flag, 0.0, 1.0)?,
                "--drop" => f.drop = value(p, &flag, 0.0, 1.0)?,
                "--burst-every" => f.burst_every = value(p, &flag, 0, 3_600_000)?,
                "--burst-length" => f.burst_length = value(p, &flag, 0, 3_600_000)?,
                "--retry-after" => f.retry_after = value(p, &flag, 0, 3600)?,
                "--budget-ratio" => args.budget_ratio = value(p, &flag, 0.0, 1000.0)?,
                "--http2" => args.http2 = true,
                "--metrics" => args.metrics = MetricsOut::Stdout,
                "--metrics-file" => {
                    args.metrics = MetricsOut::File(p.value().map_err(|e| e.to_string())?.into())
                }
                "--help" => return Ok(None),
                _ => return Err(format!("invalid option '{flag}'")),
            }
        }
        if args.duration.is_some() {
            args.calls = u64::MAX;
            args.rss_every.get_or_insert(secs(5));
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
