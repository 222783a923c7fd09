//! The `openai_proxy` example, end to end on loopback: a Rust client (hyper-util, as
//! a user would build one) calls the proxy, which forwards through the crate's layers
//! to the example's mock or to the tests' fault-injecting upstream, over plain HTTP or
//! TLS, on OpenAI's route and on Anthropic's.

mod support;

#[path = "../examples/openai_proxy/app/mod.rs"]
mod app;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use support::{Fault, Protocol, Reply, Upstream, client, parse_prometheus, prometheus_value};
use tokio::task::JoinHandle;

/// A proxy serving on 127.0.0.1; stops when dropped.
struct Proxy {
    addr: SocketAddr,
    server: JoinHandle<()>,
    /// The example's mock upstream, when the proxy uses it.
    mock: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy in front of the example's own mock upstream.
    async fn with_mock(configure: impl FnOnce(&mut app::Settings)) -> Self {
        let (addr, mock) = app::mock::start().await.expect("start the mock");
        let mut proxy = Self::start(&format!("http://{addr}"), configure).await;
        proxy.mock = Some(mock);
        proxy
    }

    async fn start(upstream: &str, configure: impl FnOnce(&mut app::Settings)) -> Self {
        let mut settings = app::Settings::new(upstream);
        configure(&mut settings);
        let metrics = app::Metrics::new().expect("metrics");
        let router = app::router(&settings, &metrics).expect("a router");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        Self {
            addr,
            server,
            mock: None,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /v1/chat/completions` with this JSON body.
    async fn chat(&self, body: impl Into<Bytes>) -> Response<Incoming> {
        self.call("POST", "/v1/chat/completions", body.into()).await
    }

    /// `POST /v1/messages` with this JSON body.
    async fn messages(&self, body: impl Into<Bytes>) -> Response<Incoming> {
        self.call("POST", "/v1/messages", body.into()).await
    }

    /// A call with an SDK's headers, OpenAI's and Anthropic's.
    async fn call(&self, method: &str, path: &str, body: Bytes) -> Response<Incoming> {
        let request = Request::builder()
            .method(method)
            .uri(self.url(path))
            .header("content-type", "application/json")
            .header("authorization", "Bearer test")
            .header("x-api-key", "test-key")
            .header("anthropic-version", "2023-06-01")
            .header("accept-encoding", "gzip")
            .body(Full::new(body))
            .expect("a request");
        client(Protocol::Http1)
            .request(request)
            .await
            .expect("the proxy answers")
    }

    /// The samples of `GET /metrics`, after checking its content type.
    async fn metrics(&self) -> Vec<support::Sample> {
        let request = Request::get(self.url("/metrics"))
            .body(Full::default())
            .expect("a request");
        let response = client(Protocol::Http1)
            .request(request)
            .await
            .expect("the proxy answers");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(header(&response, "content-type").starts_with("text/plain"));
        let text = support::read_to_end(response.into_body())
            .await
            .expect("the metrics");
        let text = String::from_utf8(text.to_vec()).expect("utf-8");
        parse_prometheus(&text)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(mock) = &self.mock {
            mock.abort();
        }
    }
}

fn header<'a>(response: &'a Response<Incoming>, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().expect("an ASCII header"))
        .unwrap_or("")
}

fn chat_request(stream: bool, content: &str) -> Bytes {
    let body = json!({
        "model": "mock-model",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    });
    Bytes::from(body.to_string())
}

/// A streamed answer, read as it came.
struct Streamed {
    /// The `data` of each SSE event, in order.
    events: Vec<String>,
    /// When the first and the last bytes arrived, from the start of the read.
    first: Duration,
    last: Duration,
}

async fn read_stream(response: Response<Incoming>) -> Streamed {
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        header(&response, "content-type").starts_with("text/event-stream"),
        "content-type {:?}",
        header(&response, "content-type")
    );
    let started = Instant::now();
    let mut body = response.into_body();
    let mut text = String::new();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream does not fail");
        if let Ok(data) = frame.into_data() {
            first.get_or_insert_with(|| started.elapsed());
            text.push_str(std::str::from_utf8(&data).expect("utf-8"));
        }
    }
    let last = started.elapsed();
    let events = text
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("an event without data: {event:?}"))
                .to_owned()
        })
        .collect();
    Streamed {
        events,
        first: first.expect("some data"),
        last,
    }
}

/// The text of a stream of `chat.completion.chunk` events, after checking their shape
/// and that the stream ends with `finish_reason: "stop"` and `[DONE]`.
fn chunks_text(events: &[String]) -> String {
    let (done, chunks) = events.split_last().expect("events");
    assert_eq!(done, "[DONE]", "the stream ends with [DONE]");
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|data| serde_json::from_str(data).expect("a JSON chunk"))
        .collect();
    assert!(chunks.len() > 3, "a few chunks: {chunks:?}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "mock-model");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn streams_a_chat_completion_and_passes_plain_json() {
    let proxy = Proxy::with_mock(|_| {}).await;

    // Streaming: events arrive as the upstream sends them, not all at the end.
    let request = chat_request(true, "hi");
    let streamed = read_stream(proxy.chat(request.clone()).await).await;
    assert_eq!(
        chunks_text(&streamed.events),
        app::mock::reply(1, request.len())
    );
    let events = streamed.events.len() as u32;
    assert!(
        streamed.last - streamed.first >= app::mock::GAP * (events - 2) / 2,
        "streamed, not buffered: first bytes after {:?}, last after {:?}",
        streamed.first,
        streamed.last
    );

    // Not streaming: the upstream's JSON, as it is.
    let request = chat_request(false, "hi");
    let response = proxy.chat(request.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), "application/json");
    let body = support::read_to_end(response.into_body())
        .await
        .expect("a body");
    let completion: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        app::mock::reply(1, request.len())
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");

    // Both calls are in the metrics, under provider="openai", and both slots are free.
    let samples = proxy.metrics().await;
    let value = |name: &str, labels: &[(&str, &str)]| {
        let mut labels = labels.to_vec();
        labels.push(("provider", app::OPENAI));
        prometheus_value(&samples, name, &labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in {samples:?}"))
    };
    assert_eq!(value("stream_first_chunk_latency_seconds_count", &[]), 2.0);
    assert_eq!(value("stream_concurrency_wait_seconds_count", &[]), 2.0);
    assert_eq!(value("streams_in_flight", &[]), 0.0);
    assert_eq!(value("provider_calls_in_flight", &[]), 0.0);
    assert!(value("stream_retry_budget_available", &[]) > 0.0);
    assert!(
        !samples.iter().any(|s| s.name == "stream_retries_total"),
        "no retries"
    );
}

#[tokio::test]
async fn a_body_over_the_buffer_cap_streams_through() {
    let proxy = Proxy::with_mock(|settings| settings.buffer = 1024).await;
    let request = chat_request(true, &"x".repeat(64 * 1024));
    let streamed = read_stream(proxy.chat(request.clone()).await).await;
    // The mock counts the bytes it received.
    assert_eq!(
        chunks_text(&streamed.events),
        app::mock::reply(1, request.len())
    );
}

#[tokio::test]
async fn retries_a_failure_before_the_first_chunk_if_the_body_was_held() {
    // The first request of each pair fails before its first event; the next succeeds.
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    let upstream = Upstream::start(move |hit| {
        seen.lock().expect("hits").push(hit.clone());
        if hit.index % 2 == 0 {
            Reply::faulty(5, Fault::ResetBeforeFirst)
        } else {
            Reply::tokens(5)
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url(""), |settings| settings.buffer = 1024).await;

    // Within the cap: retried, and the client sees one clean stream.
    let streamed = read_stream(proxy.chat(chat_request(true, "hi")).await).await;
    assert_eq!(streamed.events, token_data(5));
    assert_eq!(upstream.hits(), 2, "one failed attempt, one retry");
    // What the upstream got: the path, and the client's end-to-end headers, less
    // `accept-encoding` (the layers read the stream), with its own host.
    for hit in hits.lock().expect("hits").iter() {
        assert_eq!(
            (hit.method.as_str(), hit.path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(hit.headers["authorization"], "Bearer test");
        assert_eq!(hit.headers["content-type"], "application/json");
        assert_eq!(hit.headers["host"], upstream.addr().to_string());
        assert!(!hit.headers.contains_key("accept-encoding"));
    }

    // Over the cap: sent once, so not retried; the failure comes back as a 502.
    let response = proxy.chat(chat_request(true, &"x".repeat(4096))).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.hits(), 3, "no retry");
    let body = support::read_to_end(response.into_body())
        .await
        .expect("a body");
    let error: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(error["error"]["code"], "upstream_error");
    assert!(error["error"]["message"].as_str().is_some());

    let samples = proxy.metrics().await;
    let retries = |outcome: &str| {
        prometheus_value(
            &samples,
            "stream_retries_total",
            &[
                ("provider", app::OPENAI),
                ("outcome", outcome),
                ("reason", "body_error"),
            ],
        )
    };
    assert_eq!(retries("success"), Some(1.0));
    assert_eq!(retries("failed"), None);
}

#[tokio::test]
async fn a_full_proxy_answers_503_in_each_routes_shape() {
    let proxy = Proxy::with_mock(|settings| {
        settings.limit = 1;
        settings.max_wait = Duration::ZERO;
    })
    .await;
    // Holds the one slot while its body is unread.
    let open = proxy.chat(chat_request(true, "hi")).await;
    assert_eq!(open.status(), StatusCode::OK);

    let response = proxy.chat(chat_request(true, "hi")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&response, "retry-after"), "1");
    let body = support::read_to_end(response.into_body())
        .await
        .expect("a body");
    let error: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(error["error"]["code"], "proxy_overloaded");
    assert_eq!(error["error"]["param"], Value::Null);

    // Once the open stream ends, its slot is free again.
    chunks_text(&read_stream(open).await.events);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = proxy.chat(chat_request(false, "hi")).await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Anthropic's route has its own slot, and answers in its own shape.
    let body = r#"{"model":"m","max_tokens":8,"stream":true,"messages":[]}"#;
    let open = proxy.messages(body).await;
    assert_eq!(open.status(), StatusCode::OK);
    let response = proxy.messages(body).await;
    assert_eq!(header(&response, "retry-after"), "1");
    let error = json_body(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "overloaded_error");
    drop(open);

    let samples = proxy.metrics().await;
    for provider in [app::OPENAI, app::ANTHROPIC] {
        assert_eq!(
            prometheus_value(
                &samples,
                "stream_concurrency_rejections_total",
                &[("provider", provider), ("reason", "deadline_exceeded")],
            ),
            Some(1.0),
            "{provider}"
        );
    }
}

/// The JSON body of an answer, after checking its status.
async fn json_body(response: Response<Incoming>, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let body = support::read_to_end(response.into_body())
        .await
        .expect("a body");
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// The whole body of a `200 text/event-stream` answer.
async fn sse_text(response: Response<Incoming>) -> String {
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    let body = support::read_to_end(response.into_body())
        .await
        .expect("the stream does not fail");
    String::from_utf8(body.to_vec()).expect("utf-8")
}

/// The `data` of each event of the tests' upstream's `Reply::tokens(tokens)`.
fn token_data(tokens: usize) -> Vec<String> {
    let events = support::upstream::token_events(tokens);
    let data = |event: &Bytes| std::str::from_utf8(event).map(|text| text.trim_end().to_owned());
    let events = events.iter().map(|event| data(event).expect("utf-8"));
    events
        .map(|event| event.strip_prefix("data: ").unwrap_or(&event).to_owned())
        .collect()
}

fn concat(events: &[Bytes]) -> String {
    events
        .iter()
        .map(|event| std::str::from_utf8(event).expect("utf-8"))
        .collect()
}

/// A PEM file holding `pem`, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, pem: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-{name}", std::process::id()));
        std::fs::write(&path, pem).expect("write a temporary file");
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn a_tls_upstream_streams_when_its_ca_is_trusted_and_fails_once_when_not() {
    let ca = support::tls::TestCa::new();
    let upstream = Upstream::start_tls(ca.server.clone(), |_| Reply::tokens(5)).await;
    assert!(upstream.url("").starts_with("https://127.0.0.1:"));
    let ca_file = TempFile::new("test-ca.pem", &ca.ca_pem);

    // Trusted through --ca-file, on top of the compiled-in roots.
    let trusted = Proxy::start(&upstream.url("/v1"), |settings| {
        settings.ca_file = Some(ca_file.0.clone());
    })
    .await;
    let streamed = read_stream(trusted.chat(chat_request(true, "hi")).await).await;
    assert_eq!(
        streamed.events.len(),
        6,
        "5 tokens and [DONE]: {:?}",
        streamed.events
    );
    assert_eq!(streamed.events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!((upstream.connections(), upstream.hits()), (1, 1));

    // Not trusted: one connection, no request, no retry, and the error says why.
    let untrusted = Proxy::start(&upstream.url("/v1"), |_| {}).await;
    let error = json_body(
        untrusted.chat(chat_request(true, "hi")).await,
        StatusCode::BAD_GATEWAY,
    )
    .await;
    assert_eq!(
        (upstream.connections(), upstream.hits()),
        (2, 1),
        "one attempt"
    );
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(error["error"]["code"], "upstream_certificate_error");
    let message = error["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains("invalid peer certificate") && message.contains("not retryable"),
        "{message}"
    );

    // On Anthropic's route, the same failure in Anthropic's shape.
    let error = json_body(
        untrusted
            .messages(r#"{"model":"m","max_tokens":8,"messages":[]}"#)
            .await,
        StatusCode::BAD_GATEWAY,
    )
    .await;
    assert_eq!(
        (upstream.connections(), upstream.hits()),
        (3, 1),
        "one attempt"
    );
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "api_error");
    let message = error["error"]["message"].as_str().expect("a message");
    assert!(message.contains("invalid peer certificate"), "{message}");

    let samples = untrusted.metrics().await;
    assert!(
        !samples.iter().any(|s| s.name == "stream_retries_total"),
        "no retries"
    );
}

#[tokio::test]
async fn base_urls_are_taken_as_sdks_take_them() {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let seen = paths.clone();
    let upstream = Upstream::start(move |hit| {
        seen.lock().expect("paths").push(hit.path.clone());
        Reply::tokens(1)
    })
    .await;
    for (base, anthropic, expected) in [
        ("/v1", None, ["/v1/chat/completions", "/v1/messages"]),
        ("/v1/", None, ["/v1/chat/completions", "/v1/messages"]),
        ("", None, ["/v1/chat/completions", "/v1/messages"]),
        (
            "/openai/v1",
            Some("/anthropic"),
            ["/openai/v1/chat/completions", "/anthropic/v1/messages"],
        ),
    ] {
        let anthropic = anthropic.map(|path| upstream.url(path));
        let proxy = Proxy::start(&upstream.url(base), |settings| {
            settings.anthropic_upstream = anthropic;
        })
        .await;
        read_stream(proxy.chat(chat_request(true, "hi")).await).await;
        sse_text(proxy.messages(r#"{"model":"m","stream":true}"#).await).await;
        let seen = std::mem::take(&mut *paths.lock().expect("paths"));
        assert_eq!(seen, expected, "base URL {base:?}");
    }
    // Not a base URL the client can reach.
    for base in [
        "ftp://127.0.0.1/v1",
        "127.0.0.1:8080",
        "http://127.0.0.1/v1?x=1",
    ] {
        let settings = app::Settings::new(base);
        let metrics = app::Metrics::new().expect("metrics");
        let Err(error) = app::router(&settings, &metrics) else {
            panic!("{base} taken");
        };
        assert!(error.contains(base), "{error}");
    }
}

#[tokio::test]
async fn every_error_the_proxy_answers_is_in_its_routes_shape() {
    let proxy = Proxy::with_mock(|_| {}).await;
    for (method, path, status, code) in [
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("POST", "/metrics", 405, "method_not_allowed"),
        ("GET", "/v1/models", 404, "not_found"),
        ("POST", "/", 404, "not_found"),
    ] {
        let response = proxy.call(method, path, Bytes::new()).await;
        if status == 405 {
            assert!(!header(&response, "allow").is_empty(), "{method} {path}");
        }
        let status = StatusCode::from_u16(status).expect("a status");
        let error = json_body(response, status).await;
        assert_eq!(error["error"]["code"], code, "{method} {path}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert_eq!(error["error"]["param"], Value::Null);
        assert!(error["error"]["message"].as_str().is_some());
    }
    for (method, path, status, kind) in [
        ("GET", "/v1/messages", 405, "invalid_request_error"),
        ("POST", "/v1/messages/batches", 404, "not_found_error"),
    ] {
        let response = proxy.call(method, path, Bytes::new()).await;
        let status = StatusCode::from_u16(status).expect("a status");
        let error = json_body(response, status).await;
        assert_eq!(error["type"], "error", "{method} {path}: {error}");
        assert_eq!(error["error"]["type"], kind, "{method} {path}: {error}");
        assert!(error["error"]["message"].as_str().is_some());
    }
}

#[tokio::test]
async fn anthropic_messages_stream_through_with_their_event_names() {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    let upstream = Upstream::start(move |hit| {
        seen.lock().expect("hits").push(hit.clone());
        Reply::chunks("text/event-stream", support::upstream::anthropic_events(5))
            .gap(Duration::from_millis(5))
    })
    .await;
    let proxy = Proxy::start(&upstream.url(""), |_| {}).await;
    let text = sse_text(proxy.messages(r#"{"model":"m","stream":true}"#).await).await;
    // Byte for byte what the upstream sent: event names, the ping, the end.
    assert_eq!(text, concat(&support::upstream::anthropic_events(5)));
    assert_eq!(upstream.hits(), 1);
    let hits = hits.lock().expect("hits");
    assert_eq!(hits[0].path, "/v1/messages");
    assert_eq!(hits[0].headers["x-api-key"], "test-key");
    assert_eq!(hits[0].headers["anthropic-version"], "2023-06-01");
    assert!(!hits[0].headers.contains_key("accept-encoding"));
}

#[tokio::test]
async fn an_overloaded_error_before_the_first_chunk_is_retried_and_after_it_is_not() {
    use support::upstream::{anthropic_events, anthropic_overloaded};
    let ping = Bytes::from_static(b"event: ping\ndata: {\"type\":\"ping\"}\n\n");
    let upstream = Upstream::start(move |hit| {
        let events = match hit.index {
            // A ping is a keep-alive: the overload is still the first event.
            0 => vec![ping.clone(), anthropic_overloaded()],
            1 => anthropic_events(3),
            // After the first event: the client's to see.
            _ => {
                let mut events = anthropic_events(3);
                events.insert(1, anthropic_overloaded());
                events.truncate(2);
                events
            }
        };
        Reply::chunks("text/event-stream", events)
    })
    .await;
    let proxy = Proxy::start(&upstream.url(""), |_| {}).await;

    let text = sse_text(proxy.messages(r#"{"model":"m","stream":true}"#).await).await;
    assert_eq!(
        text,
        concat(&anthropic_events(3)),
        "only the retried stream"
    );
    assert_eq!(upstream.hits(), 2, "one overloaded attempt, one retry");

    let text = sse_text(proxy.messages(r#"{"model":"m","stream":true}"#).await).await;
    assert!(text.starts_with("event: message_start\n"), "{text}");
    assert!(text.contains("overloaded_error"), "{text}");
    assert_eq!(upstream.hits(), 3, "not retried after the first event");

    let samples = proxy.metrics().await;
    let retries = |outcome: &str| {
        let labels = [
            ("provider", app::ANTHROPIC),
            ("outcome", outcome),
            ("reason", "in_band_error"),
        ];
        prometheus_value(&samples, "stream_retries_total", &labels)
    };
    assert_eq!(retries("success"), Some(1.0));
    assert_eq!(retries("failed"), None);
    let first_chunks = prometheus_value(
        &samples,
        "stream_first_chunk_latency_seconds_count",
        &[("provider", app::ANTHROPIC)],
    );
    assert_eq!(first_chunks, Some(2.0));
}

/// `stream_fallbacks_total` of OpenAI's route, from its upstream to its first fallback.
fn fallbacks(samples: &[support::Sample], reason: &str) -> Option<f64> {
    let labels = [
        ("provider", app::OPENAI),
        ("from", app::OPENAI),
        ("to", "openai-fallback-1"),
        ("reason", reason),
    ];
    prometheus_value(samples, "stream_fallbacks_total", &labels)
}

#[tokio::test]
async fn a_fallback_serves_every_new_call_once_the_upstream_is_killed() {
    let upstream = Upstream::start(|_| Reply::tokens(3)).await;
    let fallback = Upstream::start(|_| Reply::tokens(3)).await;
    let proxy = Proxy::start(&upstream.url(""), |settings| {
        settings.fallbacks = vec![fallback.url("")];
    })
    .await;
    for _ in 0..2 {
        let streamed = read_stream(proxy.chat(chat_request(true, "hi")).await).await;
        assert_eq!(streamed.events, token_data(3));
    }
    assert_eq!((upstream.hits(), fallback.hits()), (2, 0));

    // Killed: its listener and every connection to it close, once its task is gone.
    let addr = upstream.addr();
    drop(upstream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the upstream never went down");
        tokio::task::yield_now().await;
    }
    for served in 1..=6 {
        let streamed = read_stream(proxy.chat(chat_request(true, "hi")).await).await;
        assert_eq!(
            streamed.events,
            token_data(3),
            "call {served} after the kill"
        );
        assert_eq!(fallback.hits(), served, "one hit per call");
    }

    // Three calls failed there (after its own retries), then it cooled down.
    let samples = proxy.metrics().await;
    assert_eq!(fallbacks(&samples, "first_chunk"), Some(3.0));
    assert_eq!(fallbacks(&samples, "cooldown"), Some(3.0));
    let fallback_streams = prometheus_value(
        &samples,
        "stream_first_chunk_latency_seconds_count",
        &[("provider", "openai-fallback-1")],
    );
    assert_eq!(fallback_streams, Some(6.0), "the fallback's own stack");
}

#[tokio::test]
async fn a_full_upstream_spills_over_to_its_fallback() {
    // The first stream stalls after its first event, holding the upstream's one slot.
    let upstream = Upstream::start(|hit| match hit.index {
        0 => Reply::faulty(3, Fault::StallAfter(1)),
        _ => Reply::tokens(3),
    })
    .await;
    let fallback = Upstream::start(|_| Reply::tokens(3)).await;
    let proxy = Proxy::start(&upstream.url(""), |settings| {
        settings.fallbacks = vec![fallback.url("")];
        settings.limit = 1;
        settings.max_wait = Duration::ZERO;
    })
    .await;
    let open = proxy.chat(chat_request(true, "hi")).await;
    assert_eq!(open.status(), StatusCode::OK);

    let streamed = read_stream(proxy.chat(chat_request(true, "hi")).await).await;
    assert_eq!(streamed.events, token_data(3));
    assert_eq!((upstream.hits(), fallback.hits()), (1, 1));
    let samples = proxy.metrics().await;
    assert_eq!(fallbacks(&samples, "rejected"), Some(1.0));
    let rejected = prometheus_value(
        &samples,
        "stream_concurrency_rejections_total",
        &[("provider", app::OPENAI), ("reason", "deadline_exceeded")],
    );
    assert_eq!(rejected, Some(1.0));
    drop(open);
}
