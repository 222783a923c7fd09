//! The crate's showcase: a few thousand streaming LLM calls, at high concurrency,
//! through the three layers, against an in-process mock upstream that misbehaves on
//! purpose.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --http2 --calls 10000 --limit 32 --stall 0.05
//! cargo run --release --example demo -- --metrics      # the Prometheus text on stdout too
//! cargo run --release --example demo -- --help
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
//! - Everything is recorded as OpenTelemetry metrics, exported as Prometheus text to a
//!   file the demo names (or to stdout with `--metrics`).
//!
//! The summary comes last: which failures are by design (rejections at the limit,
//! retries running out, streams reset after their first event), and which would be a
//! fault (a panic, a slot not returned, a call that neither succeeded nor failed, a
//! stream retried after its first event), with exit status 1. Beside this file:
//! `args.rs` (flags, the upstream's faults), `calls.rs`, `progress.rs`, `summary.rs`
//! and `verdict.rs` (the checks).

mod args;
mod calls;
mod progress;
mod summary;
mod verdict;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::sync::atomic::Ordering::Relaxed;
use tower::ServiceBuilder;
use tower_stream_backpressure::frame::Sse;
use tower_stream_backpressure::{
    FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy, StreamConcurrencyLayer,
};
use tower_stream_backpressure_testkit::{Upstream, flags};

use args::{Args, HELP, Injected};
use calls::{Counts, Failures, Latencies};

#[tokio::main]
async fn main() -> ExitCode {
    let args = flags::parse_or_exit("demo", HELP, Args::parse);
    let Ok(budget) = RetryBudget::try_new(Duration::from_secs(10), 10, args.budget_ratio) else {
        eprintln!("demo: --budget-ratio: not a valid retry ratio");
        return ExitCode::from(2);
    };

    // The layers record to an SDK meter provider, exported to a Prometheus registry.
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build();
    // The provider must outlive the run: dropped, it shuts down and records nothing.
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(exporter.expect("a Prometheus exporter"))
        .build();
    let meter = meter_provider.meter("demo");

    // The mock upstream, answering each request as the fault script decides.
    let (faults, injected) = (args.faults, Arc::new(Injected::default()));
    let upstream = {
        let (injected, started) = (injected.clone(), Instant::now());
        Upstream::start(move |_hit| faults.reply(started.elapsed(), &injected)).await
    };

    // A hyper-util client with TCP_NODELAY, as every streaming client should have,
    // and the three layers over it: the limit outermost, the retry layer innermost.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(args.http2)
        .build::<_, Full<Bytes>>(connector);
    let policy = RetryPolicy::default()
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .first_chunk_timeout(Duration::from_secs(1))
        .max_retry_after(Duration::from_secs(5));
    let limit = StreamConcurrencyLayer::new(args.limit).max_wait(args.max_wait);
    let service = ServiceBuilder::new()
        .layer(limit.clone().provider("mock").meter(meter.clone()))
        .layer(
            RetryBudgetLayer::new(budget.clone())
                .provider("mock")
                .meter(meter.clone()),
        )
        .layer(
            FirstChunkRetryLayer::new(policy)
                .frames(Sse::default())
                .provider("mock")
                .meter(meter),
        )
        .service(client);

    // `--concurrency` callers, each making one call at a time.
    let started = Instant::now();
    let deadline = args.duration.map(|duration| started + duration);
    let (counts, latencies) = (Arc::new(Counts::default()), Latencies::new());
    let callers: Vec<_> = (0..args.concurrency.min(args.calls))
        .map(|_| {
            let url = upstream.url("/v1/chat/completions");
            let run = calls::caller(
                service.clone(),
                url,
                args.calls,
                deadline,
                counts.clone(),
                latencies.clone(),
            );
            tokio::spawn(run)
        })
        .collect();

    // While they run: a progress line on stderr, and RSS samples with `--rss-every`.
    let rss = progress::Rss::new(started);
    let progress = progress::spawn(
        counts.clone(),
        limit.clone(),
        args.limit,
        rss.clone(),
        args.rss_every,
    );

    let (mut failures, mut panicked) = (Failures::new(), 0);
    for caller in callers {
        match caller.await {
            Ok(theirs) => {
                for (key, (n, error)) in theirs {
                    failures.entry(key).or_insert((0, error)).0 += n;
                }
            }
            Err(_) => panicked += 1,
        }
    }
    let wall = started.elapsed();
    progress.abort();
    eprintln!();
    // Let the last streams close on both sides before counting what is left open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if args.rss_every.is_some() {
        rss.sample();
    }

    // The metrics first, to a file or stdout; the summary last.
    let families = registry.gather();
    summary::write_metrics(&args.metrics, &families);
    let faults = summary::print(&summary::Summary {
        args: &args,
        started: counts.started.load(Relaxed).min(args.calls),
        ok: counts.ok.load(Relaxed),
        failures: &failures,
        panicked,
        latencies: &latencies,
        rss: &rss.samples(),
        wall,
        upstream_hits: upstream.hits(),
        upstream_peak: upstream.peak_streams(),
        upstream_open: upstream.open_streams(),
        slots_free: limit.available_slots(),
        injected: &injected,
        families: &families,
        budget_left: budget.available(),
    });
    if faults.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
