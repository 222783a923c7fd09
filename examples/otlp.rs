//! The layers' metrics pushed over OTLP/HTTP (protobuf), to an OpenTelemetry Collector
//! or any backend that takes OTLP, instead of scraped by Prometheus.
//!
//! ```text
//! cargo run --example otlp
//! cargo run --example otlp -- --endpoint http://127.0.0.1:4318/v1/metrics
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 cargo run --example otlp
//! ```
//!
//! 1. An `SdkMeterProvider` whose `PeriodicReader` exports through `opentelemetry-otlp`,
//!    installed as the global meter provider before any layer builds a service: that is
//!    where the layers take their meter unless given one with `.meter(...)`.
//! 2. A few streaming calls at once through the three layers, against the testkit's
//!    mock SSE upstream, which answers every third request 503. With more callers than
//!    slots and a short `max_wait`, every metric gets recorded.
//! 3. The provider shut down, which exports what is left: a short-lived program must
//!    do so before it exits, or the last interval's metrics are lost.
//!
//! The endpoint is `--endpoint`, else `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, else
//! `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/metrics`, else the collector's default on
//! 127.0.0.1:4318. The exporter reads the other standard variables itself. To see the
//! metrics, run a collector with an `otlp` receiver on HTTP and the `debug` exporter.
//! OTLP carries the OpenTelemetry names (`stream_retries`, ...): a Prometheus backend
//! behind the collector adds the `_seconds` and `_total` suffixes the README lists.
//! With nothing listening, the export fails (exit status 1).
//!
//! The exporter's HTTP client is the blocking one (`reqwest-blocking-client`): the
//! `PeriodicReader` exports from a thread of its own, with no Tokio runtime there.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
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
use tower_stream_backpressure_testkit::flags::{next_flag, value};
use tower_stream_backpressure_testkit::{Reply, Upstream};

/// Streams open at once through the limit, and how long a call may wait for a slot.
const LIMIT: usize = 4;
const MAX_WAIT: Duration = Duration::from_millis(150);

const HELP: &str = "\
Streaming calls through the three layers against a mock SSE upstream, their
metrics exported over OTLP/HTTP (protobuf).

Usage: cargo run --example otlp -- [--endpoint URL] [--calls N (12)]
";

/// The flags: the endpoint and the number of calls; `Ok(None)` for `--help`.
fn parse_args() -> Result<Option<(String, usize)>, String> {
    let (mut endpoint, mut calls) = (None, 12);
    let mut parser = lexopt::Parser::from_env();
    while let Some(flag) = next_flag(&mut parser)? {
        match flag.as_str() {
            "--endpoint" => endpoint = Some(parser.value().map_err(|e| e.to_string())?),
            "--calls" => calls = value(&mut parser, &flag, 1, 1000)?,
            "--help" => return Ok(None),
            _ => return Err(format!("invalid option '{flag}'")),
        }
    }
    // The standard variables, where empty counts as unset.
    let var = |name| {
        std::env::var(name)
            .ok()
            .filter(|value: &String| !value.is_empty())
    };
    let endpoint = match endpoint {
        Some(endpoint) => endpoint.to_string_lossy().into_owned(),
        None => var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            .or_else(|| {
                var("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .map(|base| format!("{}/v1/metrics", base.trim_end_matches('/')))
            })
            .unwrap_or_else(|| "http://127.0.0.1:4318/v1/metrics".to_owned()),
    };
    Ok(Some((endpoint, calls)))
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

#[tokio::main]
async fn main() -> ExitCode {
    let (endpoint, calls) = match parse_args() {
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
    let provider = match meter_provider(&endpoint) {
        Ok(provider) => provider,
        Err(error) => {
            eprintln!("error: no OTLP exporter for {endpoint}: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Before the stack below is built: each layer takes its meter from the global
    // provider when it first builds a service.
    opentelemetry::global::set_meter_provider(provider.clone());

    // Every third request is answered 503 first, and retried.
    let upstream = Upstream::start(|hit| match hit.index % 3 {
        0 => Reply::status(503),
        _ => Reply::tokens(5).gap(Duration::from_millis(20)),
    })
    .await;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let policy =
        RetryPolicy::default().backoff(Duration::from_millis(10), Duration::from_millis(50));
    let service = ServiceBuilder::new()
        .layer(
            StreamConcurrencyLayer::new(LIMIT)
                .max_wait(MAX_WAIT)
                .provider("otlp-example"),
        )
        .layer(RetryBudgetLayer::new(RetryBudget::default()).provider("otlp-example"))
        .layer(FirstChunkRetryLayer::new(policy).provider("otlp-example"))
        .service(client);

    println!(
        "{calls} calls at once, limit {LIMIT}, max wait {} ms",
        MAX_WAIT.as_millis()
    );
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..calls {
        let request = http::Request::post(upstream.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
            .expect("a valid request");
        let service = service.clone();
        tasks.spawn(async move {
            let response = service.oneshot(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            match status.is_success() && body.ends_with(b"data: [DONE]\n\n") {
                true => Ok(()),
                false => Err(BoxError::from(format!("status {status}"))),
            }
        });
    }
    let (mut ok, mut rejected, mut failed) = (0, 0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.expect("a call task") {
            Ok(()) => ok += 1,
            Err(error) if error.is::<Rejected>() => rejected += 1,
            Err(error) => {
                eprintln!("call failed: {error}");
                failed += 1;
            }
        }
    }
    let ms = started.elapsed().as_millis();
    println!(
        "done in {ms} ms: {ok} streamed to the end, {rejected} rejected for want of a slot, {failed} failed"
    );
    println!("the upstream saw {} requests", upstream.hits());

    // Shutdown exports what is left. It blocks until the reader's thread has sent it,
    // so it runs off the runtime's threads.
    println!("exporting the metrics to {endpoint}");
    match tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .expect("the shutdown task")
    {
        Ok(()) => {
            println!("exported");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "error: the metrics could not be exported to {endpoint} ({error}): is an OTLP/HTTP receiver, such as an OpenTelemetry Collector, listening there?"
            );
            ExitCode::FAILURE
        }
    }
}
