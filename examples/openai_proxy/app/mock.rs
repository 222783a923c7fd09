//! A small upstream that speaks both APIs. `POST /v1/chat/completions` answers a
//! `chat.completion`, or with `"stream": true` a stream of `chat.completion.chunk`
//! events ending with `data: [DONE]`; `POST /v1/messages` answers Anthropic's
//! `message`, or its stream of named events ([`anthropic`]). These are the shapes the
//! providers' APIs and SDKs use. The reply says how many messages and bytes the request
//! had.
//!
//! A request may carry `x-mock-scenario: overloaded-once:KEY` (any `KEY`): the first
//! attempt with that header value gets an in-band `overloaded_error` after `200 OK`,
//! the next ones a normal answer. Every answer with the header has `x-mock-attempt: N`,
//! its attempt number for that value, so a client can see that the proxy retried.

mod anthropic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body::Frame;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The pause before each streamed event, as a model would take per token.
pub const GAP: Duration = Duration::from_millis(10);

/// The reply's text for a request of `messages` messages in `bytes` bytes.
pub fn reply(messages: usize, bytes: usize) -> String {
    format!("Hello from the mock upstream! Your request had {messages} messages in {bytes} bytes.")
}

/// What the mock counts.
#[derive(Default)]
struct Mock {
    calls: AtomicU64,
    /// Attempts per `x-mock-scenario` value.
    attempts: Mutex<HashMap<String, u64>>,
}

impl Mock {
    /// The call's number, and for a call with a scenario, its attempt number and
    /// whether this attempt is to fail.
    fn call(&self, headers: &HeaderMap) -> (u64, Option<(u64, bool)>) {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let scenario = headers.get("x-mock-scenario").and_then(|v| v.to_str().ok());
        let attempt = scenario.map(|scenario| {
            let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
            let attempt = attempts.entry(scenario.to_owned()).or_default();
            *attempt += 1;
            (
                *attempt,
                scenario.starts_with("overloaded-once:") && *attempt == 1,
            )
        });
        (call, attempt)
    }
}

/// Serves the mock on 127.0.0.1, on a port the OS picks; stops when the task is
/// aborted or dropped with the runtime.
pub async fn start() -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        // Large enough to show a body over the proxy's buffer go through.
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(Arc::new(Mock::default()));
    let server = tokio::spawn(async move {
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, server))
}

async fn chat_completions(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(request) = json_object(&body) else {
        let error = json!({"error": {
            "message": "the request body is not a JSON object",
            "type": "invalid_request_error", "param": null, "code": null,
        }});
        return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
    };
    let (call, _) = mock.call(&headers);
    let id = format!("chatcmpl-mock{call}");
    let model = request["model"].as_str().unwrap_or("mock").to_owned();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let text = reply(
        request["messages"].as_array().map_or(0, Vec::len),
        body.len(),
    );
    let prompt_tokens = body.len().div_ceil(4);
    let completion_tokens = text.split_inclusive(' ').count();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });

    if request["stream"].as_bool() != Some(true) {
        let message = json!({"role": "assistant", "content": text, "refusal": null});
        let completion = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage,
        });
        return axum::Json(completion).into_response();
    }

    let chunk = |choices: Value, usage: Value| {
        let chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": null, "choices": choices,
            "usage": usage,
        });
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let first = json!({"role": "assistant", "content": "", "refusal": null});
    let mut events = vec![chunk(choice(first, Value::Null), Value::Null)];
    for token in text.split_inclusive(' ') {
        events.push(chunk(
            choice(json!({"content": token}), Value::Null),
            Value::Null,
        ));
    }
    events.push(chunk(choice(json!({}), json!("stop")), Value::Null));
    if request["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(chunk(json!([]), usage));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    stream(events, None)
}

/// The body as a JSON object, if it is one.
fn json_object(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok().filter(Value::is_object)
}

/// A `200 text/event-stream` sending `events` one by one, [`GAP`] apart, with
/// `x-mock-attempt` if given.
fn stream(events: Vec<Bytes>, attempt: Option<u64>) -> Response {
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        for event in events {
            tokio::time::sleep(GAP).await;
            if sender.send(event).await.is_err() {
                return; // the client left
            }
        }
    });
    let mut response = Body::new(Events(receiver)).into_response();
    let headers = response.headers_mut();
    let event_stream = HeaderValue::from_static("text/event-stream; charset=utf-8");
    headers.insert(header::CONTENT_TYPE, event_stream);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(attempt) = attempt {
        headers.insert("x-mock-attempt", attempt.into());
    }
    response
}

/// A body of the events a task sends, as they come.
struct Events(mpsc::Receiver<Bytes>);

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}
