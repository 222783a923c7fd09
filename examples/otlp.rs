//! The layers' metrics pushed over OTLP/HTTP (protobuf), to an OpenTelemetry Collector
//! or any backend that takes OTLP, instead of scraped by Prometheus.
//!
//! ```text
//! cargo run --example otlp
//! cargo run --example otlp -- --endpoint http://127.0.0.1:4318/v1/metrics
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 cargo run --example otlp
//! cargo run --example otlp -- --help
//! ```
//!
//! What it does:
//!
//! 1. Builds an `SdkMeterProvider` whose `PeriodicReader` exports through
//!    `opentelemetry-otlp`'s HTTP metric exporter, and installs it as the global meter
//!    provider, before any layer builds a service: that is where the layers take their
//!    meter unless given one with `.meter(...)`.
//! 2. Makes a few streaming calls at once through `StreamConcurrencyLayer`,
//!    `RetryBudgetLayer` and `FirstChunkRetryLayer`, against an in-process mock SSE
//!    upstream (`tests/support/upstream.rs`, shared with the tests) that answers some
//!    requests 503. With more callers than slots and a short `max_wait`, every metric
//!    gets recorded: streams and attempts in flight, first-chunk latency, retries that
//!    succeed, the budget, rejections and the wait for a slot.
//! 3. Shuts the provider down, which exports what is left: a short-lived program must
//!    do so before it exits, or the last interval's metrics are lost.
//!
//! The endpoint is the `--endpoint` flag, else `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` as
//! it is, else `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/metrics` appended, else
//! `http://127.0.0.1:4318/v1/metrics`. The exporter reads the other standard variables
//! itself (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, ...), and
//! `OTEL_SERVICE_NAME` names the resource.
//!
//! To see the metrics, run an OpenTelemetry Collector with an OTLP receiver on HTTP
//! (port 4318) and the `debug` exporter, for example with this configuration:
//!
//! ```yaml
//! receivers:
//!   otlp:
//!     protocols:
//!       http:
//!         endpoint: 127.0.0.1:4318
//! exporters:
//!   debug:
//!     verbosity: detailed
//! service:
//!   pipelines:
//!     metrics:
//!       receivers: [otlp]
//!       exporters: [debug]
//! ```
//!
//! The collector then prints every instrument (`streams_in_flight`,
//! `stream_retries`, ...) with its `provider="otlp-example"` attribute. OTLP carries the
//! OpenTelemetry names and units: a Prometheus backend behind the collector adds the
//! `_seconds` and `_total` suffixes the README lists. With nothing listening, the calls
//! run all the same and the export fails with an error (exit status 1).
//!
//! The exporter's HTTP client here is the blocking one (feature
//! `reqwest-blocking-client`): the `PeriodicReader` exports from a thread of its own,
//! with no Tokio runtime there, which rules out the async clients.

use std::process::ExitCode;
use std::time::{Duration, Instant};
use tower_stream_backpressure_testkit::flags::{next_flag, value};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use tokio::task::JoinSet;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::{
    FirstChunkRetryLayer, Rejected, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};
use tower_stream_backpressure_testkit::{Reply, Upstream};

const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4318/v1/metrics";
/// Streams open at once through the limit.
const LIMIT: usize = 4;
/// How long a call may wait for a slot before it is rejected.
const MAX_WAIT: Duration = Duration::from_millis(150);
/// Content events per stream, and the upstream's pause before each.
const TOKENS: usize = 5;
const GAP: Duration = Duration::from_millis(20);

const HELP: &str = "\
Streaming calls through the three layers against a mock SSE upstream, their
metrics exported over OTLP/HTTP (protobuf).

Usage: cargo run --example otlp -- [FLAGS]

Flags (default in brackets):
  --endpoint URL  where to POST the metrics [OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
                  else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/metrics,
                  else http://127.0.0.1:4318/v1/metrics]
  --calls N       calls to make, all at once [12]
  -h, --help      print this help
";

struct Args {
    endpoint: String,
    calls: usize,
}

impl Args {
    /// The flags, `Ok(None)` for `--help`, or an error naming the flag at fault.
    fn parse() -> Result<Option<Self>, String> {
        let mut endpoint = None;
        let mut calls = 12;
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = next_flag(&mut parser)? {
            match flag.as_str() {
                "--endpoint" => {
                    let value = parser.value().map_err(|e| e.to_string())?;
                    endpoint = Some(lexopt::ValueExt::string(value).map_err(|e| e.to_string())?);
                }
                "--calls" => calls = value(&mut parser, &flag, 1, 1000)?,
                "--help" => return Ok(None),
                _ => return Err(format!("invalid option '{flag}'")),
            }
        }
        Ok(Some(Args {
            endpoint: endpoint.unwrap_or_else(endpoint_from_env),
            calls,
        }))
    }
}

/// The endpoint from the standard variables (empty ones count as unset), or the default.
fn endpoint_from_env() -> String {
    let var = |name| std::env::var(name).ok().filter(|value| !value.is_empty());
    if let Some(endpoint) = var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
        endpoint
    } else if let Some(base) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        format!("{}/v1/metrics", base.trim_end_matches('/'))
    } else {
        DEFAULT_ENDPOINT.to_owned()
    }
}

/// A meter provider that exports to `endpoint` every 10 s, and at shutdown.
fn meter_provider(endpoint: &str) -> Result<SdkMeterProvider, BoxError> {
    let exporter = MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .build()?;
    let reader = PeriodicReader::builder(exporter)
        .with_interval(Duration::from_secs(10))
        .build();
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("tower-stream-backpressure-otlp-example");
    }
    Ok(SdkMeterProvider::builder()
        .with_resource(resource.build())
        .with_reader(reader)
        .build())
}

/// How the calls ended.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    rejected: usize,
    failed: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("error: {error}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let provider = match meter_provider(&args.endpoint) {
        Ok(provider) => provider,
        Err(error) => {
            eprintln!("error: no OTLP exporter for {}: {error}", args.endpoint);
            return ExitCode::FAILURE;
        }
    };
    // Before the stack below is built: each layer takes its meter from the global
    // provider when it first builds a service.
    opentelemetry::global::set_meter_provider(provider.clone());

    // Every third request is answered 503 first, and retried.
    let upstream = Upstream::start(|hit| {
        if hit.index % 3 == 0 {
            Reply::status(503)
        } else {
            Reply::tokens(TOKENS).gap(GAP)
        }
    })
    .await;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let service = ServiceBuilder::new()
        .layer(
            StreamConcurrencyLayer::new(LIMIT)
                .max_wait(MAX_WAIT)
                .provider("otlp-example"),
        )
        .layer(RetryBudgetLayer::new(RetryBudget::default()).provider("otlp-example"))
        .layer(
            FirstChunkRetryLayer::new(
                RetryPolicy::default()
                    .backoff(Duration::from_millis(10), Duration::from_millis(50)),
            )
            .provider("otlp-example"),
        )
        .service(client);

    println!(
        "{} calls at once, limit {LIMIT}, max wait {} ms",
        args.calls,
        MAX_WAIT.as_millis()
    );
    let started = Instant::now();
    let mut calls = JoinSet::new();
    for _ in 0..args.calls {
        let request = Request::post(upstream.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
            .expect("a valid request");
        let service = service.clone();
        calls.spawn(async move {
            let response = service.oneshot(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            if status.is_success() && body.ends_with(b"data: [DONE]\n\n") {
                Ok(())
            } else {
                Err(BoxError::from(format!("status {status}")))
            }
        });
    }
    let mut tally = Tally::default();
    while let Some(result) = calls.join_next().await {
        match result.expect("a call task") {
            Ok(()) => tally.ok += 1,
            Err(error) if error.is::<Rejected>() => tally.rejected += 1,
            Err(error) => {
                eprintln!("call failed: {error}");
                tally.failed += 1;
            }
        }
    }
    println!(
        "done in {} ms: {} streamed to the end, {} rejected for want of a slot, {} failed; \
         the upstream saw {} requests",
        started.elapsed().as_millis(),
        tally.ok,
        tally.rejected,
        tally.failed,
        upstream.hits(),
    );

    // Shutdown exports what is left. It blocks until the reader's thread has sent it,
    // so it runs off the runtime's threads.
    println!("exporting the metrics to {}", args.endpoint);
    let exported = tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .expect("the shutdown task");
    match exported {
        Ok(()) => {
            println!("exported");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "error: the metrics could not be exported to {} ({error}): is an OTLP/HTTP \
                 receiver, such as an OpenTelemetry Collector, listening there?",
                args.endpoint
            );
            ExitCode::FAILURE
        }
    }
}
