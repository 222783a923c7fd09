//! A streaming LLM proxy: an axum server that forwards OpenAI's
//! `POST /v1/chat/completions` and Anthropic's `POST /v1/messages` (streaming or not)
//! to their upstreams through a hyper-util client stacked with the crate's layers, and
//! serves its metrics on `/metrics`.
//!
//! # Why
//!
//! A gateway in front of an LLM API is where back-pressure belongs: it sees every
//! client's streams at once. Each provider gets its own stack (`app/mod.rs`):
//!
//! - `BufferRequestBodyLayer` holds request bodies up to `--buffer` bytes, so that a
//!   call can be retried although axum's body can be read only once.
//! - `StreamConcurrencyLayer` caps the streams open upstream at `--limit`, counting a
//!   stream until its last byte reached the client (or the client left). A call that
//!   waits more than `--max-wait` for a slot gets a `503` with `Retry-After: 1`.
//! - `FirstChunkRetryLayer` retries what fails before the first event: a reset, a
//!   stall past `--first-chunk-timeout`, a 429 or 503, an in-band error such as
//!   Anthropic's `event: error` with `overloaded_error` after `200 OK` (its `ping`
//!   events are keep-alives, not a first event). The client sees one clean stream.
//!   Nothing is retried after the first event, nor what a retry would only repeat: an
//!   untrusted certificate fails at once. A call without streaming passes too: its
//!   JSON answer is its first chunk.
//! - `RetryBudgetLayer` caps the retries of all calls together.
//! - With `--fallback URL` (repeatable), a `Fallback` above the stacks sends a call on
//!   to the next upstream, each with a stack of its own, when the one before is down,
//!   refuses the call (a 408, 429 or 5xx after its own retries) or is full (no slot
//!   within `--max-wait`), and never once the first event went to the client. An
//!   upstream that failed 3 calls in a row is skipped for 30 s. The client's headers,
//!   its `Authorization` or `x-api-key` among them, go to whichever upstream serves the
//!   call: give as fallbacks only upstreams that the same key is meant for.
//!
//! The errors the proxy answers itself are in the route's own shape, which its SDK
//! parses: OpenAI's `{"error": {"message", "type", "param", "code"}}` (any path but
//! `/v1/messages`, 404 and 405 included) or Anthropic's `{"type": "error", "error":
//! {"type", "message"}}`: `503` when the limit rejects the call, `504` when the
//! upstream stalled before its first chunk, `502` for other upstream failures (code
//! `upstream_certificate_error` for a certificate the proxy does not trust).
//!
//! # Run it
//!
//! ```text
//! cargo run --example openai_proxy
//! curl -N http://127.0.0.1:8080/v1/chat/completions \
//!     -d '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
//! curl -N http://127.0.0.1:8080/v1/messages \
//!     -d '{"model":"m","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
//! curl http://127.0.0.1:8080/metrics
//! ```
//!
//! With no upstream given, the proxy starts a mock upstream of both APIs in the same
//! process (`app/mock.rs`), so it runs with no network. A real one is given by its base
//! URL, as the SDKs take it (a final `/v1` is not doubled):
//!
//! ```text
//! cargo run --example openai_proxy -- --upstream https://api.openai.com/v1 \
//!     --anthropic-upstream https://api.anthropic.com
//! cargo run --example openai_proxy -- --upstream http://127.0.0.1:11434/v1
//! ```
//!
//! `https://` goes through rustls (`app/tls.rs`), trusting Mozilla's roots or, with
//! `--roots platform`, the system's, and with `--ca-file` the CAs of a PEM file too.
//! The client's headers go upstream as they are (`Authorization`, `x-api-key`,
//! `anthropic-version`), less the hop-by-hop ones and `Accept-Encoding`: the retry
//! layer reads the answer for its first event, so it asks for it uncompressed.
//! Point an OpenAI client at `http://127.0.0.1:8080/v1`, an Anthropic one at
//! `http://127.0.0.1:8080`.
//!
//! # Metrics
//!
//! `/metrics` is the Prometheus text of the layers' OpenTelemetry metrics, with
//! `provider="openai"` or `provider="anthropic"`: `streams_in_flight`,
//! `provider_calls_in_flight`, `stream_first_chunk_latency_seconds`,
//! `stream_retries_total{outcome,reason}`, `stream_retry_budget_available`,
//! `stream_concurrency_wait_seconds` and `stream_concurrency_rejections_total`; the
//! fallbacks' stacks record as `provider="openai-fallback-1"` and so on, and each move
//! from one upstream to the next counts in `stream_fallbacks_total{from,to,reason}`.
//! The crate's README describes each.

mod app;

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use app::{Metrics, Settings};
use tower_stream_backpressure_testkit::flags::{next_flag, value};

const HELP: &str = "\
A streaming LLM proxy: POST /v1/chat/completions (OpenAI) and POST /v1/messages
(Anthropic) go to their upstreams through BufferRequestBodyLayer,
StreamConcurrencyLayer, RetryBudgetLayer and FirstChunkRetryLayer, and on to the next
upstream (--fallback) when one is down, refuses or is full; GET /metrics shows their
metrics.

Usage: cargo run --example openai_proxy -- [FLAGS]

Flags (default in brackets):
  --listen ADDR                 address to serve on, port 0 for any [127.0.0.1:8080]
  --upstream URL                the base URL of the OpenAI-compatible upstream,
                                http(s)://host[:port][/prefix][/v1]
                                [$OPENAI_PROXY_UPSTREAM, else a mock started in-process]
  --anthropic-upstream URL      the base URL of the upstream of /v1/messages
                                [--upstream]
  --fallback URL                a base URL to answer from when the upstream before it
                                is down, refuses the call or is full; repeatable,
                                tried in order, for both routes; it gets the client's
                                credentials, as the upstream does [none]
  --anthropic-fallback URL      the fallbacks of /v1/messages, instead; repeatable
                                [--fallback]
  --roots webpki|platform       the CAs that https:// upstreams may chain to: Mozilla's,
                                compiled in, or the system's store [webpki]
  --ca-file PATH                a PEM file of more CAs to trust
  --limit N                     streams open upstream at once, per upstream [64]
  --max-wait MS                 how long a call may wait for a slot, then the next
                                upstream, or a 503 [2000]
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
    let env = std::env::var("OPENAI_PROXY_UPSTREAM").ok();
    let mut upstream = env.filter(|url| !url.is_empty());
    // The upstream is filled in once known.
    let mut settings = Settings::new("");
    let mut parser = lexopt::Parser::from_env();
    while let Some(flag) = next_flag(&mut parser)? {
        let p = &mut parser;
        let mut text = || -> Result<String, String> {
            let value = p.value().map_err(|e| e.to_string())?;
            Ok(value.to_string_lossy().into_owned())
        };
        match flag.as_str() {
            "--listen" => {
                let text = text()?;
                let parsed = text.parse();
                listen =
                    parsed.map_err(|e| format!("--listen: {text:?} is not an address ({e})"))?;
            }
            "--upstream" => upstream = Some(text()?),
            "--anthropic-upstream" => settings.anthropic_upstream = Some(text()?),
            "--fallback" => settings.fallbacks.push(text()?),
            "--anthropic-fallback" => {
                let fallbacks = settings.anthropic_fallbacks.get_or_insert_with(Vec::new);
                fallbacks.push(text()?);
            }
            "--roots" => settings.roots = text()?.parse().map_err(|e| format!("--roots: {e}"))?,
            "--ca-file" => settings.ca_file = Some(text()?.into()),
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

/// `", then A, B"` for fallbacks A and B, nothing for none.
fn then_fallbacks(fallbacks: &[String]) -> String {
    match fallbacks {
        [] => String::new(),
        _ => format!(", then {}", fallbacks.join(", ")),
    }
}

fn fail(message: impl Display, code: i32) -> ! {
    eprintln!("openai_proxy: {message}");
    std::process::exit(code)
}

#[tokio::main]
async fn main() {
    let (listen, upstream, mut settings) = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return print!("{HELP}"),
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
    let anthropic = settings
        .anthropic_upstream
        .as_ref()
        .unwrap_or(&settings.upstream);
    let anthropic_fallbacks = settings.anthropic_fallbacks.as_ref();
    eprintln!(
        "forwarding /v1/chat/completions to {}{}, /v1/messages to {anthropic}{} (limit {}, \
         max wait {:?}); metrics on http://{addr}/metrics",
        settings.upstream,
        then_fallbacks(&settings.fallbacks),
        then_fallbacks(anthropic_fallbacks.unwrap_or(&settings.fallbacks)),
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
    let served = axum::serve(listener, router).with_graceful_shutdown(shutdown);
    if let Err(error) = served.await {
        fail(format!("serving: {error}"), 1);
    }
}
