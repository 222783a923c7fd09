//! The proxy itself, shared by `main.rs` and the proxy's integration test: an axum
//! router that forwards `POST /v1/chat/completions` through the crate's layers and
//! serves `/metrics`, and [`mock`], a small OpenAI-compatible upstream.
#![allow(dead_code)]

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::replay::ReplayBody;
use tower_stream_backpressure::retry::FirstChunkErrorKind;
use tower_stream_backpressure::{
    BufferRequestBodyLayer, FirstChunkError, FirstChunkRetryLayer, Rejected, RetryBudget,
    RetryBudgetLayer, RetryPolicy, StreamConcurrencyLayer,
};

/// The `provider` attribute of every metric the proxy records.
pub const PROVIDER: &str = "openai";

/// How the proxy reaches its upstream and how much it lets through.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The upstream's base URL, `http://host:port` (optionally with a path prefix):
    /// calls go to `{upstream}/v1/chat/completions`.
    pub upstream: String,
    /// Streams open at once, across all clients.
    pub limit: usize,
    /// How long a call may wait for a slot before a 503.
    pub max_wait: Duration,
    /// Request bodies up to this size are held, so that a call can be retried; larger
    /// ones stream through to the upstream, and are sent once.
    pub buffer: usize,
    /// Per attempt: from its start to the first chunk of the answer.
    pub first_chunk_timeout: Duration,
}

impl Settings {
    /// The defaults, with `upstream` as the base URL.
    pub fn new(upstream: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            limit: 64,
            max_wait: Duration::from_secs(2),
            buffer: 1024 * 1024,
            first_chunk_timeout: Duration::from_secs(30),
        }
    }
}

/// The metrics: an OpenTelemetry meter provider whose one reader is a Prometheus
/// exporter, read back as text by `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

impl Metrics {
    pub fn new() -> Result<Self, String> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|error| format!("cannot build the Prometheus exporter: {error}"))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Ok(Self { provider, registry })
    }

    /// The meter the layers record to.
    pub fn meter(&self) -> Meter {
        self.provider.meter("openai_proxy")
    }

    /// Every metric, in the Prometheus text format.
    pub fn text(&self) -> String {
        let mut text = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(error) =
            prometheus::Encoder::encode(&encoder, &self.registry.gather(), &mut text)
        {
            return format!("# cannot encode the metrics: {error}\n");
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

/// The stacked client, boxed so that axum's state can hold it.
type Upstream = BoxCloneSyncService<Request, Response, BoxError>;

#[derive(Clone)]
struct Proxy {
    /// `{upstream}/v1/chat/completions`.
    url: Uri,
    client: Upstream,
    metrics: Metrics,
}

/// The proxy's routes: `POST /v1/chat/completions`, forwarded, and `GET /metrics`.
///
/// Fails on an upstream URL that is not `http://host[:port][/prefix]`.
pub fn router(settings: &Settings, metrics: &Metrics) -> Result<Router, String> {
    let url = upstream_url(&settings.upstream)?;

    // TCP_NODELAY, as for any streaming client: each small event goes out at once.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http = Client::builder(TokioExecutor::new()).build::<_, ReplayBody<Body>>(connector);

    let meter = metrics.meter();
    let policy = RetryPolicy::default().first_chunk_timeout(settings.first_chunk_timeout);
    let client = ServiceBuilder::new()
        // Outermost: a slow upload is read before the call takes a slot.
        .layer(
            BufferRequestBodyLayer::try_new(settings.buffer).map_err(|e| format!("buffer: {e}"))?,
        )
        .layer(
            StreamConcurrencyLayer::try_new(settings.limit)
                .map_err(|e| format!("limit: {e}"))?
                .max_wait(settings.max_wait)
                .provider(PROVIDER)
                .meter(meter.clone()),
        )
        .layer(
            RetryBudgetLayer::new(RetryBudget::default())
                .provider(PROVIDER)
                .meter(meter.clone()),
        )
        .layer(
            FirstChunkRetryLayer::new(policy)
                .provider(PROVIDER)
                .meter(meter),
        )
        .service(http)
        .map_response(|response| response.map(Body::new));

    let proxy = Proxy {
        url,
        client: BoxCloneSyncService::new(client),
        metrics: metrics.clone(),
    };
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(proxy))
}

/// `{base}/v1/chat/completions`, from a base URL the hyper-util client can reach.
fn upstream_url(base: &str) -> Result<Uri, String> {
    let uri: Uri = base
        .parse()
        .map_err(|error| format!("upstream {base:?}: {error}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "upstream {base:?}: this example's client speaks plain HTTP only (no TLS); \
                 give an http:// URL"
            ));
        }
        _ => return Err(format!("upstream {base:?}: expected http://host[:port]")),
    }
    if uri.authority().is_none() || uri.query().is_some() {
        return Err(format!(
            "upstream {base:?}: expected http://host[:port][/prefix]"
        ));
    }
    let base = base.trim_end_matches('/');
    format!("{base}/v1/chat/completions")
        .parse()
        .map_err(|error| format!("upstream {base:?}: {error}"))
}

/// Forwards the call and streams the answer back as it comes.
async fn chat_completions(State(proxy): State<Proxy>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut forward = Request::new(body);
    *forward.method_mut() = parts.method;
    *forward.uri_mut() = match parts.uri.query() {
        // Some OpenAI-compatible APIs take parameters there (Azure's `api-version`).
        Some(query) => match format!("{}?{query}", proxy.url).parse() {
            Ok(uri) => uri,
            Err(_) => {
                let message = "the query string cannot be forwarded";
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "bad_query",
                    message,
                );
            }
        },
        None => proxy.url.clone(),
    };
    let headers = forward.headers_mut();
    *headers = end_to_end(parts.headers);
    // Set again by the client, from the upstream URL.
    headers.remove(header::HOST);
    // The retry layer reads the answer for its first event, which it cannot find in a
    // compressed body: ask the upstream for the identity encoding.
    headers.remove(header::ACCEPT_ENCODING);
    // Answered by this server already; this client sends the body without waiting.
    headers.remove(header::EXPECT);

    match proxy.client.oneshot(forward).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            parts.headers = end_to_end(parts.headers);
            // The server sets it again from the body, if it is known.
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.version = Default::default();
            Response::from_parts(parts, body)
        }
        Err(error) => {
            eprintln!("openai_proxy: {}", chain(&*error));
            error_response(&error)
        }
    }
}

/// `headers` without the hop-by-hop ones (RFC 9110, 7.6.1), which concern one
/// connection and are not forwarded.
fn end_to_end(mut headers: HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| name.trim().parse().ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers
}

/// An error of the proxy's, as OpenAI shapes its own: a status and
/// `{"error": {"message", "type", "param", "code"}}`.
fn error_response(error: &BoxError) -> Response {
    let (status, kind, code) = if error.is::<Rejected>() {
        // Back-pressure: the client may come back; OpenAI's SDKs retry a 503.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "proxy_overloaded",
        )
    } else if let Some(first) = error.downcast_ref::<FirstChunkError>() {
        match first.kind() {
            FirstChunkErrorKind::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "upstream_timeout",
            ),
            _ => (StatusCode::BAD_GATEWAY, "server_error", "upstream_error"),
        }
    } else if error.is::<axum::Error>() {
        // The request body failed while it was read, before anything went upstream.
        (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "request_body_error",
        )
    } else {
        (StatusCode::BAD_GATEWAY, "server_error", "upstream_error")
    };
    let mut response = openai_error(status, kind, code, &chain(&**error));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn openai_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    (status, axum::Json(body)).into_response()
}

/// An error and its sources, `: `-separated.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn metrics_text(State(proxy): State<Proxy>) -> Response {
    let content_type = HeaderValue::from_static(prometheus::TEXT_FORMAT);
    ([(header::CONTENT_TYPE, content_type)], proxy.metrics.text()).into_response()
}

async fn not_found(uri: Uri) -> Response {
    let message = format!(
        "no route for {}: this proxy serves POST /v1/chat/completions and GET /metrics",
        uri.path()
    );
    openai_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        &message,
    )
}

/// A small OpenAI-compatible upstream: `POST /v1/chat/completions` answers a
/// `chat.completion`, or with `"stream": true` a stream of `chat.completion.chunk`
/// events ending with `data: [DONE]`, the shapes OpenAI's API and SDKs use. The reply
/// says how many messages and bytes the request had.
pub mod mock {
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context, Poll};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::extract::{DefaultBodyLimit, State};
    use axum::http::{StatusCode, header};
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
        format!(
            "Hello from the mock upstream! Your request had {messages} messages in {bytes} bytes."
        )
    }

    /// Serves the mock on 127.0.0.1, on a port the OS picks; stops when the task is
    /// aborted or dropped with the runtime.
    pub async fn start() -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            // Large enough to show a body over the proxy's buffer go through.
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(calls);
        let server = tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, router).await;
        });
        Ok((addr, server))
    }

    async fn chat_completions(State(calls): State<Arc<AtomicU64>>, body: Bytes) -> Response {
        let request: Value = match serde_json::from_slice(&body) {
            Ok(request @ Value::Object(_)) => request,
            _ => {
                let error = json!({"error": {
                    "message": "the request body is not a JSON object",
                    "type": "invalid_request_error", "param": null, "code": null,
                }});
                return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
            }
        };
        let id = format!("chatcmpl-mock{}", calls.fetch_add(1, Ordering::Relaxed));
        let model = request["model"].as_str().unwrap_or("mock").to_owned();
        let messages = request["messages"].as_array().map_or(0, Vec::len);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let text = reply(messages, body.len());
        let prompt_tokens = body.len().div_ceil(4);
        let completion_tokens = text.split_inclusive(' ').count();
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });

        if request["stream"].as_bool() != Some(true) {
            let completion = json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
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
        let mut events = vec![chunk(
            choice(
                json!({"role": "assistant", "content": "", "refusal": null}),
                Value::Null,
            ),
            Value::Null,
        )];
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

        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            for event in events {
                tokio::time::sleep(GAP).await;
                if sender.send(event).await.is_err() {
                    return; // the client left
                }
            }
        });
        (
            [
                (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::new(Events(receiver)),
        )
            .into_response()
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
}
