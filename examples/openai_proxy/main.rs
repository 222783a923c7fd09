//! An OpenAI-compatible streaming proxy: an axum server that forwards
//! `POST /v1/chat/completions` (streaming or not) to an upstream through a hyper-util
//! client stacked with the crate's layers, and serves its metrics on `/metrics`.
//!
//! # Why
//!
//! A gateway in front of an LLM API is where back-pressure belongs: it sees every
//! client's streams at once. Here:
//!
//! - `BufferRequestBodyLayer` holds request bodies up to `--buffer` bytes, so that a
//!   call can be retried although axum's body can be read only once; a larger body
//!   streams through to the upstream and gets one attempt.
//! - `StreamConcurrencyLayer` caps the streams open upstream at `--limit`, counting a
//!   stream until its last byte reached the client (or the client left), not until
//!   its headers. A call that waits more than `--max-wait` for a slot gets a `503`
//!   with `Retry-After: 1`, which OpenAI's SDKs retry.
//! - `FirstChunkRetryLayer` retries what fails before the first event (a reset, a
//!   stall past `--first-chunk-timeout`, a 429 or 503 from the upstream): the client
//!   sees one clean stream. Nothing is retried after the first event. A call without
//!   streaming (`"stream": false`) passes too: its JSON answer is its first chunk, so
//!   give `--first-chunk-timeout` room for the longest answer you expect.
//! - `RetryBudgetLayer` caps the retries of all calls together, so that an outage
//!   upstream is not multiplied.
//!
//! Errors come back in OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`: `503` when the limit rejects the call, `504` when the upstream stalled
//! before its first chunk, `502` for other upstream failures.
//!
//! # Run it
//!
//! ```text
//! cargo run --example openai_proxy
//! curl -N http://127.0.0.1:8080/v1/chat/completions \
//!     -d '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
//! curl http://127.0.0.1:8080/metrics
//! cargo run --example openai_proxy -- --help
//! ```
//!
//! With no upstream given, the proxy starts a mock OpenAI-compatible upstream in the
//! same process, so it runs with no network. To use a real one, give its base URL
//! (the proxy adds `/v1/chat/completions`) with `--upstream` or the environment
//! variable `OPENAI_PROXY_UPSTREAM`, e.g. a local vLLM, llama.cpp or Ollama server:
//!
//! ```text
//! cargo run --example openai_proxy -- --upstream http://127.0.0.1:11434
//! ```
//!
//! The client's headers go upstream as they are (its `Authorization` too), less the
//! hop-by-hop ones and `Accept-Encoding`: the retry layer reads the answer for its
//! first event, so it asks for it uncompressed. The example's client speaks plain
//! HTTP: for an `https://` API, put a TLS connector (e.g. `hyper-rustls`) under the
//! client in `app.rs`.
//!
//! Point any OpenAI client at it with the base URL `http://127.0.0.1:8080/v1`.
//!
//! # Metrics
//!
//! `/metrics` is the Prometheus text of the layers' OpenTelemetry metrics, all with
//! `provider="openai"`: `streams_in_flight` (streams holding a slot),
//! `provider_calls_in_flight` (upstream attempts open),
//! `stream_first_chunk_latency_seconds` (time to the first event, retries included),
//! `stream_retries_total{outcome,reason}`, `stream_retry_budget_available`,
//! `stream_concurrency_wait_seconds` and `stream_concurrency_rejections_total`.
//! The crate's README describes each.

mod app;

#[path = "../support/flags.rs"]
mod flags;

use flags::{next_flag, value};
use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use app::{Metrics, Settings};

const HELP: &str = "\
An OpenAI-compatible streaming proxy: POST /v1/chat/completions goes to the upstream
through BufferRequestBodyLayer, StreamConcurrencyLayer, RetryBudgetLayer and
FirstChunkRetryLayer; GET /metrics shows their metrics.

Usage: cargo run --example openai_proxy -- [FLAGS]

Flags (default in brackets):
  --listen ADDR                 address to serve on, port 0 for any [127.0.0.1:8080]
  --upstream URL                the upstream's base URL, http://host[:port][/prefix]
                                [$OPENAI_PROXY_UPSTREAM, else a mock started in-process]
  --limit N                     streams open upstream at once [64]
  --max-wait MS                 how long a call may wait for a slot, then 503 [2000]
  --buffer BYTES                request bodies held for retries; larger ones are sent
                                once [1048576]
  --first-chunk-timeout SECS    per attempt, until the first event (for a call
                                without streaming, the whole answer) [30]
  -h, --help                    print this help

The first line on stdout is `listening on http://ADDR`.
";

/// The flags, or `Ok(None)` for `--help`.
fn parse_args() -> Result<Option<(SocketAddr, Option<String>, Settings)>, String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut upstream = std::env::var("OPENAI_PROXY_UPSTREAM")
        .ok()
        .filter(|url| !url.is_empty());
    // The upstream is filled in once known.
    let mut settings = Settings::new("");
    let mut parser = lexopt::Parser::from_env();
    while let Some(flag) = next_flag(&mut parser)? {
        let p = &mut parser;
        match flag.as_str() {
            "--listen" => {
                let text = p
                    .value()
                    .map_err(|e| e.to_string())?
                    .to_string_lossy()
                    .into_owned();
                listen = text
                    .parse()
                    .map_err(|e| format!("--listen: {text:?} is not an address ({e})"))?;
            }
            "--upstream" => {
                upstream = Some(
                    p.value()
                        .map_err(|e| e.to_string())?
                        .to_string_lossy()
                        .into_owned(),
                )
            }
            "--limit" => settings.limit = value(p, &flag, 1, 1_000_000)?,
            "--max-wait" => {
                settings.max_wait = Duration::from_millis(value(p, &flag, 0, 3_600_000)?)
            }
            "--buffer" => settings.buffer = value(p, &flag, 1, 1 << 30)?,
            "--first-chunk-timeout" => {
                settings.first_chunk_timeout = Duration::from_secs(value(p, &flag, 1, 3600)?)
            }
            "--help" => return Ok(None),
            _ => return Err(format!("invalid option '{flag}'")),
        }
    }
    Ok(Some((listen, upstream, settings)))
}

fn fail(message: impl Display, code: i32) -> ! {
    eprintln!("openai_proxy: {message}");
    std::process::exit(code)
}

#[tokio::main]
async fn main() {
    let (listen, upstream, mut settings) = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{HELP}");
            return;
        }
        Err(message) => fail(format!("{message}\nRun with --help to see the flags."), 2),
    };

    // The mock runs on this runtime, until the process ends.
    settings.upstream = match upstream {
        Some(url) => url,
        None => match app::mock::start().await {
            Ok((addr, _server)) => {
                eprintln!("no upstream given: started a mock upstream on http://{addr}");
                format!("http://{addr}")
            }
            Err(error) => fail(format!("cannot start the mock upstream: {error}"), 1),
        },
    };

    let metrics = Metrics::new().unwrap_or_else(|error| fail(error, 1));
    let router = app::router(&settings, &metrics).unwrap_or_else(|error| fail(error, 2));
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => fail(format!("cannot listen on {listen}: {error}"), 1),
    };
    let addr = listener.local_addr().unwrap_or_else(|error| fail(error, 1));
    // The first line on stdout, for scripts that start the proxy on port 0.
    println!("listening on http://{addr}");
    eprintln!(
        "forwarding POST http://{addr}/v1/chat/completions to {}/v1/chat/completions \
         (limit {}, max wait {:?}); metrics on http://{addr}/metrics",
        settings.upstream.trim_end_matches('/'),
        settings.limit,
        settings.max_wait,
    );

    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // Ctrl-C: stop accepting, let the open streams finish; a second Ctrl-C exits.
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down: waiting for open streams (Ctrl-C again to exit now)");
        tokio::spawn(async {
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(130);
        });
    };
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(error) = served {
        fail(format!("serving: {error}"), 1);
    }
}
