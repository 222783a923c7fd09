//! Every upstream fault in `docs/faults.md`, through the full stack against a real
//! upstream on loopback, on each protocol it applies to: the decision (retried or
//! not), the upstream's hit count, what the caller receives, how long the call waited,
//! and the metrics; then again with `retry_maybe_processed(false)`. The catalogue and
//! this table are checked against each other (decision and class), so the document
//! stays true.
//!
//! Time is tokio's paused clock. Unless a case says otherwise, a call may make 3
//! attempts with no backoff and a first-chunk timeout of 1 s.

mod support;

use std::io;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use support::raw_h2::{H2Connection, H2Reply, RawH2};
use support::upstream::token_events;
use support::{
    BOTH, Fault, FlakyConnector, Hit, LoopbackResolver, Metrics, Protocol, Reply, TEST, Upstream,
    capture, client_with, full_stack, post,
};
use tokio::time::Instant;
use tower::{BoxError, ServiceExt};
use tower_stream_backpressure::retry::{FirstChunkError, FirstChunkErrorKind, StopReason};
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};

/// The upstream a case runs against.
enum Server {
    /// The mock upstream (both protocols), answering by the script.
    Mock(Box<dyn Fn(&Hit) -> Reply + Send + Sync>),
    /// The raw HTTP/2 upstream.
    RawH2(fn(u64) -> H2Connection, fn(u64) -> H2Reply),
    /// Nothing listens on the port.
    Closed,
}

/// What the caller gets.
#[derive(Debug)]
enum Receives {
    /// A response with this status and exactly this body.
    Response(u16, Bytes),
    /// `200`, these bytes, then a body error.
    BodyError(Bytes),
    /// `200`, these bytes, then nothing more (for a minute, at least).
    BodyStalls(Bytes),
    /// A `FirstChunkError`.
    Error(FirstChunkErrorKind, StopReason, u32),
    /// hyper-util's connect error, as the source of a `FirstChunkError` (`Upstream`,
    /// `NotRetryable`), after one connection attempt.
    ConnectError,
}

/// How the client connects.
#[derive(Clone, Copy)]
enum Connector {
    /// hyper-util's `HttpConnector`, as a user sets it up.
    Http,
    /// The URL names `upstream.invalid`, whose first lookup fails as the system
    /// resolver fails for a name that does not exist (hyper-util's `dns error`); later
    /// lookups answer 127.0.0.1. Nothing asks the network.
    DnsFailsFirst,
    /// The first connection fails with this error, as a TLS connector fails its
    /// handshake; later ones connect.
    FailsFirst(fn() -> BoxError),
    /// The URL's scheme is `https`, which `HttpConnector` refuses: an invalid URI.
    Https,
}

type TestConnector = FlakyConnector<HttpConnector<LoopbackResolver>>;

impl Connector {
    fn build(self) -> TestConnector {
        let failures = match self {
            Connector::DnsFailsFirst => 1,
            _ => 0,
        };
        let mut http = HttpConnector::new_with_resolver(LoopbackResolver::failing_first(failures));
        http.set_nodelay(true);
        let failure = match self {
            Connector::FailsFirst(failure) => Some(failure),
            _ => None,
        };
        FlakyConnector::new(http, failure)
    }

    fn url(self, url: String) -> String {
        match self {
            Connector::DnsFailsFirst => url.replacen("127.0.0.1", "upstream.invalid", 1),
            Connector::Https => url.replacen("http://", "https://", 1),
            Connector::Http | Connector::FailsFirst(_) => url,
        }
    }
}

/// What tokio-rustls (under hyper-rustls) returns for a failed handshake.
fn rustls_handshake_failure() -> BoxError {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "received fatal alert: HandshakeFailure",
    )
    .into()
}

/// What hyper-tls returns for a certificate OpenSSL rejects: text in an `io::Error`.
fn native_tls_certificate_rejected() -> BoxError {
    io::Error::other(
        "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate \
         verify failed:../ssl/statem/statem_clnt.c:1889: (unable to get local issuer \
         certificate)",
    )
    .into()
}

/// Whether the upstream may have processed the request when the fault struck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    NotProcessed,
    MaybeProcessed,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::NotProcessed => "not processed",
            Class::MaybeProcessed => "maybe processed",
        }
    }
}

/// The body of the mock upstream's plain status responses.
const INJECTED: &[u8] = br#"{"error":{"message":"injected"}}"#;

struct Case {
    /// The row of `docs/faults.md`.
    id: &'static str,
    h2_only: bool,
    connector: Connector,
    class: Class,
    /// With `retry_maybe_processed(false)`, for a fault retried by default although
    /// the upstream may have processed the request: what the caller receives instead,
    /// and how long it waits, after one attempt (one hit) and no retry. `None`: the
    /// same as by default.
    strict: Option<(Receives, (Duration, Duration))>,
    server: Server,
    policy: RetryPolicy,
    retried: bool,
    hits: u64,
    receives: Receives,
    /// How long the call took to return, at least and at most.
    waited: (Duration, Duration),
    /// `stream_retries_total` by outcome and reason; every other count is 0.
    retries: &'static [(&'static str, &'static str, u64)],
}

const NO_WAIT: (Duration, Duration) = (Duration::ZERO, Duration::ZERO);

fn secs(from: f64, to: f64) -> (Duration, Duration) {
    (Duration::from_secs_f64(from), Duration::from_secs_f64(to))
}

fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(3)
        .backoff(Duration::ZERO, Duration::ZERO)
        .first_chunk_timeout(Duration::from_secs(1))
}

/// The healthy answer: 3 events and `data: [DONE]`.
fn healthy() -> Bytes {
    Bytes::from(token_events(3).concat())
}

/// Fails the first request with `fault`, then answers healthily.
fn once(fault: Reply) -> Server {
    Server::Mock(Box::new(move |hit| {
        if hit.index == 0 {
            fault.clone()
        } else {
            Reply::tokens(3)
        }
    }))
}

fn always(reply: Reply) -> Server {
    Server::Mock(Box::new(move |_| reply.clone()))
}

/// `status` with one header.
fn status(code: u16, header: &'static str, value: impl Into<String>) -> Reply {
    Reply::status(code).header(header, value)
}

/// Ollama's free-text error: "internal" here names no internal server error.
const OLLAMA_CONTEXT_LIMIT: &[u8] =
    b"{\"error\":\"prompt exceeds the model's internal context limit\"}\n";

fn first_events(n: usize) -> Bytes {
    Bytes::from(token_events(3)[..n].concat())
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            id: "connection-refused",
            h2_only: false,
            connector: Connector::Http,
            server: Server::Closed,
            policy: policy(),
            retried: true,
            hits: 0,
            receives: Receives::Error(
                FirstChunkErrorKind::Upstream,
                StopReason::AttemptsExhausted,
                3,
            ),
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[
                ("failed", "upstream_error", 2),
                ("exhausted", "upstream_error", 1),
            ],
        },
        Case {
            id: "dns-failure",
            h2_only: false,
            connector: Connector::DnsFailsFirst,
            server: always(Reply::tokens(3)),
            policy: policy(),
            retried: false,
            hits: 0,
            receives: Receives::ConnectError,
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "tls-handshake-failure",
            h2_only: false,
            connector: Connector::FailsFirst(rustls_handshake_failure),
            server: always(Reply::tokens(3)),
            policy: policy(),
            retried: false,
            hits: 0,
            receives: Receives::ConnectError,
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "tls-certificate-rejected",
            h2_only: false,
            connector: Connector::FailsFirst(native_tls_certificate_rejected),
            server: always(Reply::tokens(3)),
            policy: policy(),
            retried: false,
            hits: 0,
            receives: Receives::ConnectError,
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "invalid-uri",
            h2_only: false,
            connector: Connector::Https,
            server: always(Reply::tokens(3)),
            policy: policy(),
            retried: false,
            hits: 0,
            receives: Receives::ConnectError,
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "closed-before-response",
            h2_only: false,
            connector: Connector::Http,
            server: once(Reply::DropConnection),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Error(FirstChunkErrorKind::Upstream, StopReason::MaybeProcessed, 1),
                NO_WAIT,
            )),
            retries: &[("success", "upstream_error", 1)],
        },
        Case {
            id: "reset-before-response",
            h2_only: false,
            connector: Connector::Http,
            server: once(Reply::ResetStream),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Error(FirstChunkErrorKind::Upstream, StopReason::MaybeProcessed, 1),
                NO_WAIT,
            )),
            retries: &[("success", "upstream_error", 1)],
        },
        Case {
            id: "reset-before-first-event",
            h2_only: false,
            connector: Connector::Http,
            server: once(Reply::faulty(3, Fault::ResetBeforeFirst)),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Error(FirstChunkErrorKind::Body, StopReason::MaybeProcessed, 1),
                NO_WAIT,
            )),
            retries: &[("success", "body_error", 1)],
        },
        Case {
            id: "h2-refused-stream",
            h2_only: true,
            connector: Connector::Http,
            server: Server::RawH2(
                |_| H2Connection::Serve,
                |hit| match hit {
                    0 => H2Reply::Refuse,
                    _ => H2Reply::Events(token_events(3)),
                },
            ),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[("success", "upstream_error", 1)],
        },
        Case {
            id: "h2-goaway-covering-stream",
            h2_only: true,
            connector: Connector::Http,
            server: Server::RawH2(
                |_| H2Connection::Serve,
                |hit| match hit {
                    0 => H2Reply::GoAwayCovering,
                    _ => H2Reply::Events(token_events(3)),
                },
            ),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Error(FirstChunkErrorKind::Upstream, StopReason::MaybeProcessed, 1),
                NO_WAIT,
            )),
            retries: &[("success", "upstream_error", 1)],
        },
        Case {
            id: "h2-goaway-before-stream",
            h2_only: true,
            connector: Connector::Http,
            server: Server::RawH2(
                |connection| match connection {
                    0 => H2Connection::GoAwayFirst,
                    _ => H2Connection::Serve,
                },
                |_| H2Reply::Events(token_events(3)),
            ),
            policy: policy(),
            retried: true,
            hits: 1,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[("success", "upstream_error", 1)],
        },
        Case {
            id: "retry-after-seconds",
            h2_only: false,
            connector: Connector::Http,
            server: once(status(503, "retry-after", "2")),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: secs(2.0, 2.0),
            class: Class::NotProcessed,
            strict: None,
            retries: &[("success", "status", 1)],
        },
        Case {
            id: "retry-after-http-date",
            h2_only: false,
            connector: Connector::Http,
            // The date is made when the upstream answers: made earlier, the real time
            // that tests before it take would come off the wait.
            server: Server::Mock(Box::new(|hit| {
                if hit.index > 0 {
                    return Reply::tokens(3);
                }
                let in_three = SystemTime::now() + Duration::from_secs(3);
                status(429, "retry-after", httpdate::fmt_http_date(in_three))
            })),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            // The date has whole seconds (up to one off the three), and a little real
            // time passes before the client reads it.
            waited: secs(1.5, 3.0),
            class: Class::NotProcessed,
            strict: None,
            retries: &[("success", "status", 1)],
        },
        Case {
            id: "retry-after-ms",
            h2_only: false,
            connector: Connector::Http,
            server: once(status(503, "retry-after-ms", "700")),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: secs(0.7, 0.7),
            class: Class::NotProcessed,
            strict: None,
            retries: &[("success", "status", 1)],
        },
        Case {
            id: "retry-after-negative",
            h2_only: false,
            connector: Connector::Http,
            server: once(status(503, "retry-after", "-5")),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[("success", "status", 1)],
        },
        Case {
            id: "retry-after-huge",
            h2_only: false,
            connector: Connector::Http,
            server: always(status(503, "retry-after", "99999999999999999999")),
            policy: policy(),
            retried: false,
            hits: 1,
            receives: Receives::Response(503, Bytes::from_static(INJECTED)),
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "retry-after-garbage",
            h2_only: false,
            connector: Connector::Http,
            server: once(status(503, "retry-after", "soon, maybe")),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::NotProcessed,
            strict: None,
            retries: &[("success", "status", 1)],
        },
        Case {
            id: "bad-gateway",
            h2_only: false,
            connector: Connector::Http,
            server: once(Reply::status(502)),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Response(502, Bytes::from_static(INJECTED)),
                NO_WAIT,
            )),
            retries: &[("success", "status", 1)],
        },
        Case {
            id: "status-not-retried",
            h2_only: false,
            connector: Connector::Http,
            server: always(Reply::status(500)),
            policy: policy(),
            retried: false,
            hits: 1,
            receives: Receives::Response(500, Bytes::from_static(INJECTED)),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "stall-before-headers",
            h2_only: false,
            connector: Connector::Http,
            server: once(Reply::Hang),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: secs(1.0, 1.0),
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Error(FirstChunkErrorKind::Timeout, StopReason::MaybeProcessed, 1),
                secs(1.0, 1.0),
            )),
            retries: &[("success", "timeout", 1)],
        },
        Case {
            id: "stall-before-first-event",
            h2_only: false,
            connector: Connector::Http,
            server: once(Reply::faulty(3, Fault::StallBeforeFirst)),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: secs(1.0, 1.0),
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Error(FirstChunkErrorKind::Timeout, StopReason::MaybeProcessed, 1),
                secs(1.0, 1.0),
            )),
            retries: &[("success", "timeout", 1)],
        },
        Case {
            id: "endless-keep-alives",
            h2_only: false,
            connector: Connector::Http,
            server: always(Reply::faulty(
                3,
                Fault::KeepAlivesForever(Duration::from_millis(100)),
            )),
            policy: policy(),
            retried: true,
            hits: 3,
            receives: Receives::Error(
                FirstChunkErrorKind::Timeout,
                StopReason::AttemptsExhausted,
                3,
            ),
            waited: secs(3.0, 3.0),
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Error(FirstChunkErrorKind::Timeout, StopReason::MaybeProcessed, 1),
                secs(1.0, 1.0),
            )),
            retries: &[("failed", "timeout", 2), ("exhausted", "timeout", 1)],
        },
        Case {
            id: "first-event-over-buffer",
            h2_only: false,
            connector: Connector::Http,
            server: always(
                Reply::chunks("text/event-stream", {
                    // In 512-byte frames: a frame that completes the first chunk is
                    // never held back, whatever its size.
                    let event = Bytes::from(format!("data: {}\n\n", "x".repeat(4096)));
                    (0..event.len())
                        .step_by(512)
                        .map(|at| event.slice(at..(at + 512).min(event.len())))
                        .collect()
                })
                .gap(Duration::from_millis(1)),
            ),
            policy: policy().max_buffer(1024),
            retried: false,
            hits: 1,
            receives: Receives::Error(
                FirstChunkErrorKind::BufferLimit,
                StopReason::NotRetryable,
                1,
            ),
            // The second frame passes the cap: 512 bytes and its bookkeeping each.
            waited: secs(0.002, 0.002),
            class: Class::MaybeProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "malformed-framing",
            h2_only: false,
            connector: Connector::Http,
            server: always(Reply::chunks(
                "application/vnd.amazon.eventstream",
                vec![capture("bedrock_bad_message_crc.eventstream")],
            )),
            policy: policy(),
            retried: false,
            hits: 1,
            receives: Receives::Error(FirstChunkErrorKind::Malformed, StopReason::NotRetryable, 1),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "in-band-transient-error",
            h2_only: false,
            connector: Connector::Http,
            server: once(Reply::chunks(
                "text/event-stream",
                vec![capture("anthropic_overloaded.sse")],
            )),
            policy: policy(),
            retried: true,
            hits: 2,
            receives: Receives::Response(200, healthy()),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: Some((
                Receives::Response(200, capture("anthropic_overloaded.sse")),
                NO_WAIT,
            )),
            retries: &[("success", "in_band_error", 1)],
        },
        Case {
            id: "in-band-terminal-error",
            h2_only: false,
            connector: Connector::Http,
            server: always(Reply::chunks(
                "text/event-stream",
                vec![capture("anthropic_invalid_request.sse")],
            )),
            policy: policy(),
            retried: false,
            hits: 1,
            receives: Receives::Response(200, capture("anthropic_invalid_request.sse")),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "in-band-free-text-error",
            h2_only: false,
            connector: Connector::Http,
            server: always(Reply::chunks(
                "application/x-ndjson",
                vec![Bytes::from_static(OLLAMA_CONTEXT_LIMIT)],
            )),
            policy: policy(),
            retried: false,
            hits: 1,
            receives: Receives::Response(200, Bytes::from_static(OLLAMA_CONTEXT_LIMIT)),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "stall-mid-stream",
            h2_only: false,
            connector: Connector::Http,
            server: always(Reply::faulty(3, Fault::StallAfter(1))),
            policy: policy(),
            retried: false,
            hits: 1,
            receives: Receives::BodyStalls(first_events(1)),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: None,
            retries: &[],
        },
        Case {
            id: "reset-mid-stream",
            h2_only: false,
            connector: Connector::Http,
            server: always(Reply::faulty(3, Fault::ResetAfter(2))),
            policy: policy(),
            retried: false,
            hits: 1,
            receives: Receives::BodyError(first_events(2)),
            waited: NO_WAIT,
            class: Class::MaybeProcessed,
            strict: None,
            retries: &[],
        },
    ]
}

/// A running upstream of either kind.
enum Running {
    Mock(Upstream),
    RawH2(RawH2),
    Closed(std::net::SocketAddr),
}

impl Running {
    async fn start(server: Server) -> Self {
        match server {
            Server::Mock(script) => Running::Mock(Upstream::start(script).await),
            Server::RawH2(connection, script) => {
                Running::RawH2(RawH2::start(connection, script).await)
            }
            Server::Closed => {
                // A port that was free a moment ago: nothing listens on it.
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                Running::Closed(listener.local_addr().expect("addr"))
            }
        }
    }

    fn url(&self) -> String {
        const PATH: &str = "/v1/chat/completions";
        match self {
            Running::Mock(upstream) => upstream.url(PATH),
            Running::RawH2(upstream) => upstream.url(PATH),
            Running::Closed(addr) => format!("http://{addr}{PATH}"),
        }
    }

    fn hits(&self) -> u64 {
        match self {
            Running::Mock(upstream) => upstream.hits(),
            Running::RawH2(upstream) => upstream.hits(),
            Running::Closed(_) => 0,
        }
    }
}

/// Reads `body` until `expected.len()` bytes have come.
async fn read_bytes<B>(body: &mut B, expected: usize) -> Bytes
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut read = Vec::new();
    while read.len() < expected {
        let frame = body
            .frame()
            .await
            .expect("more frames")
            .expect("no error yet");
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
        }
    }
    Bytes::from(read)
}

#[tokio::test(start_paused = true)]
async fn every_fault_in_the_catalogue() {
    for (protocol, strict) in BOTH.into_iter().flat_map(|p| [(p, false), (p, true)]) {
        for mut case in cases() {
            if case.h2_only && protocol == Protocol::Http1 {
                continue;
            }
            if strict {
                case.policy = case.policy.retry_maybe_processed(false);
                if let Some((receives, waited)) = case.strict.take() {
                    assert_eq!(case.class, Class::MaybeProcessed, "{}", case.id);
                    (case.receives, case.waited) = (receives, waited);
                    (case.hits, case.retries, case.retried) = (1, &[], false);
                }
            }
            assert!(
                case.strict.is_none() || case.class == Class::MaybeProcessed,
                "{}: only what may have been processed changes",
                case.id
            );
            assert!(
                strict
                    || case.class == Class::NotProcessed
                    || case.strict.is_some()
                    || !case.retried,
                "{}: a retried maybe-processed fault says what happens without that retry",
                case.id
            );
            let id = case.id;
            let upstream = Running::start(case.server).await;
            let connector = case.connector.build();
            let metrics = Metrics::new();
            let stack = full_stack(
                client_with(protocol, connector.clone()),
                &metrics.meter(),
                StreamConcurrencyLayer::new(4),
                RetryBudget::default(),
                case.policy,
            );
            let started = Instant::now();
            let result = stack
                .oneshot(post(&case.connector.url(upstream.url())))
                .await;
            let waited = started.elapsed();
            let mode = if strict {
                ", retry_maybe_processed(false)"
            } else {
                ""
            };
            let at = format!("{id} over {protocol:?}{mode}");

            match (result, case.receives) {
                (Ok(response), Receives::Response(status, body)) => {
                    assert_eq!(response.status(), status, "{at}");
                    let read = response.into_body().collect().await;
                    assert_eq!(read.expect("a whole body").to_bytes(), body, "{at}");
                }
                (Ok(response), Receives::BodyError(before)) => {
                    assert_eq!(response.status(), 200, "{at}");
                    let mut body = response.into_body();
                    assert_eq!(read_bytes(&mut body, before.len()).await, before, "{at}");
                    let error = support::read_until_error(&mut body).await;
                    assert!(!error.to_string().is_empty(), "{at}");
                }
                (Ok(response), Receives::BodyStalls(before)) => {
                    assert_eq!(response.status(), 200, "{at}");
                    let mut body = response.into_body();
                    assert_eq!(read_bytes(&mut body, before.len()).await, before, "{at}");
                    let next = tokio::time::timeout(Duration::from_secs(60), body.frame()).await;
                    assert!(next.is_err(), "{at}: the body should stall, got {next:?}");
                }
                (Err(error), Receives::Error(kind, stop, attempts)) => {
                    let error = error
                        .downcast_ref::<FirstChunkError>()
                        .unwrap_or_else(|| panic!("{at}: {error}"));
                    assert_eq!(error.kind(), kind, "{at}");
                    assert_eq!(error.stop_reason(), stop, "{at}");
                    assert_eq!(error.attempts(), attempts, "{at}");
                }
                (Err(error), Receives::ConnectError) => {
                    let error = error
                        .downcast_ref::<FirstChunkError>()
                        .unwrap_or_else(|| panic!("{at}: {error}"));
                    assert_eq!(error.kind(), FirstChunkErrorKind::Upstream, "{at}");
                    assert_eq!(error.stop_reason(), StopReason::NotRetryable, "{at}");
                    assert_eq!(error.attempts(), 1, "{at}");
                    let error = std::error::Error::source(error)
                        .and_then(|e| e.downcast_ref::<hyper_util::client::legacy::Error>())
                        .unwrap_or_else(|| panic!("{at}: {error:?}"));
                    assert!(error.is_connect(), "{at}: {error:?}");
                    assert_eq!(connector.calls(), 1, "{at}: connections asked for");
                }
                (result, expected) => panic!("{at}: expected {expected:?}, got {result:?}"),
            }

            let (least, most) = case.waited;
            assert!(
                least <= waited && waited <= most,
                "{at}: the call took {waited:?}, expected {least:?} to {most:?}"
            );
            assert_eq!(upstream.hits(), case.hits, "{at}: upstream hits");

            // The response and its body are gone: nothing is held.
            let snapshot = metrics.snapshot();
            assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 0.0, "{at}");
            assert_eq!(
                snapshot.count("provider_calls_in_flight", &[TEST]),
                0.0,
                "{at}"
            );
            let mut counted = 0;
            for &(outcome, reason, count) in case.retries {
                let attrs = [TEST, ("outcome", outcome), ("reason", reason)];
                assert_eq!(
                    snapshot.count("stream_retries", &attrs),
                    count as f64,
                    "{at}: retries {outcome} {reason}"
                );
                counted += count;
            }
            assert_eq!(
                snapshot.count("stream_retries", &[TEST]),
                counted as f64,
                "{at}: no other retry counts"
            );
            assert_eq!(case.retried, counted > 0, "{at}: retried or not");
        }
    }
}

/// The catalogue lists exactly the faults tested here, with the same decision.
#[test]
fn the_catalogue_matches_the_tests() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/faults.md");
    let catalogue = std::fs::read_to_string(path).expect("docs/faults.md");
    let mut rows: Vec<(String, bool, String)> = catalogue
        .lines()
        .filter_map(|line| {
            let mut cells = line.strip_prefix("| `")?.split('|');
            let id = cells.next()?.trim().trim_end_matches('`').to_owned();
            let decision = cells.nth(1)?.trim();
            let class = cells.next()?.trim().to_owned();
            Some((id, decision.starts_with("**retried**"), class))
        })
        .collect();
    let mut tested: Vec<(String, bool, String)> = cases()
        .into_iter()
        .map(|case| {
            (
                case.id.to_owned(),
                case.retried,
                case.class.name().to_owned(),
            )
        })
        .collect();
    rows.sort();
    tested.sort();
    assert_eq!(rows, tested);
}
