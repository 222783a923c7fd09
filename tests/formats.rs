//! The first chunk of every stream format through the full stack, against a real hyper
//! upstream on loopback (both protocols), sending hand-written captures of each
//! provider (`tests/data/`) in small pieces: the first chunk is found at the right
//! piece, in-band errors are retried or passed through byte for byte by their kind,
//! and broken framing fails without retry. Time is tokio's paused clock.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::{
    BOTH, Metrics, Reply, TEST, Upstream, capture, client, full_stack_with, post, read_to_end,
};
use tower::ServiceExt;
use tower_stream_backpressure::frame::{Auto, Detector, EventStream, JsonArray, Malformed};
use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind, StopReason};
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};

/// Bytes per piece the upstream sends, with [`GAP`] before each.
const PIECE: usize = 50;
const GAP: Duration = Duration::from_millis(10);

struct Format {
    content_type: &'static str,
    /// A healthy stream, and the byte offset where its first chunk completes.
    content: (&'static str, usize),
    transient: &'static str,
    terminal: &'static str,
}

const FORMATS: [Format; 4] = [
    Format {
        content_type: "text/event-stream",
        content: ("anthropic_messages.sse", 333),
        transient: "anthropic_overloaded.sse",
        terminal: "anthropic_invalid_request.sse",
    },
    Format {
        content_type: "application/x-ndjson",
        content: ("ollama_chat.ndjson", 125),
        transient: "ndjson_rate_limited.ndjson",
        terminal: "ollama_model_not_found.ndjson",
    },
    Format {
        content_type: "application/json; charset=UTF-8",
        content: ("gemini_stream.json", 439),
        transient: "gemini_overloaded.json",
        terminal: "gemini_invalid_argument.json",
    },
    Format {
        content_type: "application/vnd.amazon.eventstream",
        content: ("bedrock_converse.eventstream", 167),
        transient: "bedrock_throttling.eventstream",
        terminal: "bedrock_validation.eventstream",
    },
];

/// A `200` response of `content_type` sending `file` in pieces of [`PIECE`] bytes.
fn send(content_type: &'static str, file: &str) -> Reply {
    let body = capture(file);
    let pieces = (0..body.len())
        .step_by(PIECE)
        .map(|at| body.slice(at..(at + PIECE).min(body.len())))
        .collect();
    Reply::chunks(content_type, pieces).gap(GAP)
}

/// One call through the full stack with `detector`; returns the response's status and
/// body, or the error.
async fn call<D: Detector>(
    protocol: support::Protocol,
    upstream: &Upstream,
    metrics: &Metrics,
    policy: RetryPolicy,
    detector: D,
) -> Result<(u16, Bytes), tower::BoxError> {
    let stack = full_stack_with(
        client(protocol),
        &metrics.meter(),
        StreamConcurrencyLayer::new(4),
        RetryBudget::default(),
        policy.backoff(Duration::ZERO, Duration::ZERO),
        detector,
    );
    let response = stack.oneshot(post(&upstream.url("/stream"))).await?;
    let status = response.status().as_u16();
    Ok((status, read_to_end(response.into_body()).await?))
}

#[tokio::test(start_paused = true)]
async fn the_first_chunk_is_found_in_every_format() {
    for protocol in BOTH {
        for format in &FORMATS {
            let (file, end) = format.content;
            let upstream = Upstream::start(move |_| send(format.content_type, file)).await;
            let metrics = Metrics::new();
            let policy = RetryPolicy::default();
            let (status, body) = call(protocol, &upstream, &metrics, policy, Auto::default())
                .await
                .unwrap_or_else(|e| panic!("{protocol:?} {file}: {e}"));
            assert_eq!((status, body), (200, capture(file)), "{protocol:?} {file}");
            assert_eq!(upstream.hits(), 1, "{protocol:?} {file}");
            // Held until the piece that completes the first chunk, and no longer.
            let arrives = GAP.as_secs_f64() * ((end - 1) / PIECE + 1) as f64;
            let latency = metrics
                .snapshot()
                .histogram("stream_first_chunk_latency", &[TEST])
                .unwrap();
            assert_eq!(latency.count, 1);
            assert!(
                latency.sum >= arrives && latency.sum < arrives + GAP.as_secs_f64(),
                "{protocol:?} {file}: first chunk after {} s, its piece arrives at {arrives} s",
                latency.sum
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_transient_in_band_error_is_retried() {
    for protocol in BOTH {
        for format in &FORMATS {
            let (file, _) = format.content;
            let upstream = Upstream::start(move |hit| match hit.index {
                0 => send(format.content_type, format.transient),
                _ => send(format.content_type, file),
            })
            .await;
            let metrics = Metrics::new();
            let policy = RetryPolicy::default();
            let (status, body) = call(protocol, &upstream, &metrics, policy, Auto::default())
                .await
                .unwrap_or_else(|e| panic!("{protocol:?} {}: {e}", format.transient));
            assert_eq!((status, body), (200, capture(file)), "{protocol:?} {file}");
            assert_eq!(upstream.hits(), 2, "{protocol:?} {}", format.transient);
            let retries = |outcome| {
                metrics.snapshot().count(
                    "stream_retries",
                    &[TEST, ("outcome", outcome), ("reason", "in_band_error")],
                )
            };
            assert_eq!(retries("success"), 1.0, "{protocol:?} {}", format.transient);
            assert_eq!(
                metrics
                    .snapshot()
                    .count("provider_calls_in_flight", &[TEST]),
                0.0
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_transient_in_band_error_that_persists_comes_back_as_sent() {
    for protocol in BOTH {
        for format in &FORMATS {
            let upstream =
                Upstream::start(move |_| send(format.content_type, format.transient)).await;
            let metrics = Metrics::new();
            let policy = RetryPolicy::default().max_attempts(3);
            let (status, body) = call(protocol, &upstream, &metrics, policy, Auto::default())
                .await
                .unwrap_or_else(|e| panic!("{protocol:?} {}: {e}", format.transient));
            assert_eq!(
                (status, body),
                (200, capture(format.transient)),
                "{protocol:?}"
            );
            assert_eq!(upstream.hits(), 3, "{protocol:?} {}", format.transient);
            let snapshot = metrics.snapshot();
            let retries = |outcome| {
                snapshot.count(
                    "stream_retries",
                    &[TEST, ("outcome", outcome), ("reason", "in_band_error")],
                )
            };
            assert_eq!((retries("failed"), retries("exhausted")), (2.0, 1.0));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_terminal_in_band_error_goes_to_the_caller_untouched() {
    for protocol in BOTH {
        for format in &FORMATS {
            let upstream =
                Upstream::start(move |_| send(format.content_type, format.terminal)).await;
            let metrics = Metrics::new();
            let policy = RetryPolicy::default();
            let (status, body) = call(protocol, &upstream, &metrics, policy, Auto::default())
                .await
                .unwrap_or_else(|e| panic!("{protocol:?} {}: {e}", format.terminal));
            assert_eq!(
                (status, body),
                (200, capture(format.terminal)),
                "{protocol:?}"
            );
            assert_eq!(upstream.hits(), 1, "{protocol:?} {}", format.terminal);
            assert_eq!(metrics.snapshot().count("stream_retries", &[TEST]), 0.0);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn broken_framing_fails_without_retry() {
    async fn malformed<D: Detector>(
        protocol: support::Protocol,
        content_type: &'static str,
        file: &'static str,
        detector: D,
        problem: &str,
    ) {
        let upstream = Upstream::start(move |_| send(content_type, file)).await;
        let metrics = Metrics::new();
        let error = call(
            protocol,
            &upstream,
            &metrics,
            RetryPolicy::default(),
            detector,
        )
        .await
        .expect_err(file);
        let error = error
            .downcast_ref::<FirstChunkError>()
            .unwrap_or_else(|| panic!("{file}: {error}"));
        assert_eq!(error.kind(), FirstChunkErrorKind::Malformed, "{file}");
        assert_eq!(error.stop_reason(), StopReason::NotRetryable, "{file}");
        let source = std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<Malformed>())
            .unwrap_or_else(|| panic!("{file}: no Malformed source"));
        assert_eq!(source.problem(), problem, "{file}");
        assert_eq!(upstream.hits(), 1, "{protocol:?} {file}");
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.count("provider_calls_in_flight", &[TEST]), 0.0);
        assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 0.0);
    }

    const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";
    for protocol in BOTH {
        for (file, problem) in [
            (
                "bedrock_bad_prelude_crc.eventstream",
                "prelude CRC mismatch",
            ),
            (
                "bedrock_bad_message_crc.eventstream",
                "message CRC mismatch",
            ),
            (
                "bedrock_too_long.eventstream",
                "message length 16777217 is over the 16 MiB maximum",
            ),
        ] {
            malformed(protocol, EVENT_STREAM, file, Auto::default(), problem).await;
            malformed(
                protocol,
                EVENT_STREAM,
                file,
                EventStream::default(),
                problem,
            )
            .await;
        }
        for (file, problem) in [
            ("gemini_empty.json", "the array is empty"),
            ("gemini_not_array.json", "the body does not start with `[`"),
        ] {
            malformed(
                protocol,
                "application/json",
                file,
                JsonArray::default(),
                problem,
            )
            .await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn auto_passes_a_plain_json_response_through() {
    // With `Auto`, `application/json` that is not a stream is an ordinary response.
    for protocol in BOTH {
        for file in ["gemini_empty.json", "gemini_not_array.json"] {
            let upstream = Upstream::start(move |_| send("application/json", file)).await;
            let metrics = Metrics::new();
            let policy = RetryPolicy::default();
            let (status, body) = call(protocol, &upstream, &metrics, policy, Auto::default())
                .await
                .unwrap();
            assert_eq!((status, body), (200, capture(file)), "{protocol:?} {file}");
            assert_eq!(upstream.hits(), 1);
        }
    }
}
