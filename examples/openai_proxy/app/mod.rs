//! The proxy itself, shared by `main.rs` and the proxy's integration tests: an axum
//! router that forwards OpenAI's `POST /v1/chat/completions` and Anthropic's
//! `POST /v1/messages` through the crate's layers and serves `/metrics`, and [`mock`],
//! a small upstream that speaks both.
#![allow(dead_code)]

mod errors;
mod forward;
mod metrics;
pub mod mock;
mod tls;

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Uri;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::metrics::Meter;
use tower::BoxError;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_stream_backpressure::fallback::Fallback;
use tower_stream_backpressure::replay::ReplayBody;
use tower_stream_backpressure::{
    BufferRequestBodyLayer, FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};

use errors::{Dialect, Kind};
use forward::{Route, endpoint};
pub use metrics::Metrics;
pub use tls::Roots;

/// The `provider` attribute of the metrics of `/v1/chat/completions`.
pub const OPENAI: &str = "openai";
/// The `provider` attribute of the metrics of `/v1/messages`.
pub const ANTHROPIC: &str = "anthropic";

/// How the proxy reaches its upstreams and how much it lets through.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The OpenAI-compatible upstream's base URL, as SDKs take it: `http(s)://host[:port]`
    /// with an optional path prefix, with or without a final `/v1`. Calls go to
    /// `{base}/v1/chat/completions`.
    pub upstream: String,
    /// The base URL of the upstream of `/v1/messages`, the same way (Anthropic's is
    /// `https://api.anthropic.com`); `None`: `upstream`.
    pub anthropic_upstream: Option<String>,
    /// The roots of trust for `https://` upstreams.
    pub roots: Roots,
    /// A PEM file of more certificate authorities to trust (a private CA, a test one).
    pub ca_file: Option<PathBuf>,
    /// Streams open at once, across all clients, per provider.
    pub limit: usize,
    /// How long a call may wait for a slot before a 503.
    pub max_wait: Duration,
    /// Request bodies up to this size are held, so that a call can be retried; larger
    /// ones stream through to the upstream, and are sent once.
    pub buffer: usize,
    /// Per attempt: from its start to the first chunk of the answer.
    pub first_chunk_timeout: Duration,
    /// Base URLs tried in order after `upstream`, the same way, when the one before is
    /// down, refuses the call (a 408, 429 or 5xx, after its own retries) or is full.
    /// Each has a stack of its own, built as `upstream`'s.
    pub fallbacks: Vec<String>,
    /// The fallbacks of `/v1/messages`; `None`: `fallbacks`.
    pub anthropic_fallbacks: Option<Vec<String>>,
    /// An upstream that failed this many calls in a row is skipped for `cooldown`.
    pub cooldown_failures: u32,
    pub cooldown: Duration,
}

impl Settings {
    /// The defaults, with `upstream` as the base URL of both providers.
    pub fn new(upstream: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            anthropic_upstream: None,
            roots: Roots::Webpki,
            ca_file: None,
            limit: 64,
            max_wait: Duration::from_secs(2),
            buffer: 1024 * 1024,
            first_chunk_timeout: Duration::from_secs(30),
            fallbacks: Vec::new(),
            anthropic_fallbacks: None,
            cooldown_failures: 3,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// The proxy's routes: `POST /v1/chat/completions` and `POST /v1/messages`, forwarded,
/// and `GET /metrics`. Any other path or method gets an error in OpenAI's shape
/// (Anthropic's under `/v1/messages`).
///
/// Fails on an upstream URL that is not `http(s)://host[:port][/prefix]`, or a CA file
/// that cannot be read.
pub fn router(settings: &Settings, metrics: &Metrics) -> Result<Router, String> {
    let openai = Upstreams {
        base: &settings.upstream,
        fallbacks: &settings.fallbacks,
        path: "chat/completions",
        provider: OPENAI,
    };
    let anthropic_fallbacks = settings.anthropic_fallbacks.as_ref();
    let anthropic = Upstreams {
        base: settings
            .anthropic_upstream
            .as_ref()
            .unwrap_or(&settings.upstream),
        fallbacks: anthropic_fallbacks.unwrap_or(&settings.fallbacks),
        path: "messages",
        provider: ANTHROPIC,
    };

    // One connection pool for both providers; TLS for `https://`, plain TCP otherwise.
    let connector = tls::connector(settings.roots, settings.ca_file.as_deref())?;
    let http = Client::builder(TokioExecutor::new()).build::<_, ReplayBody<Body>>(connector);
    let route = |upstreams: Upstreams<'_>, dialect| -> Result<MethodRouter, String> {
        let route = Route {
            url: endpoint(upstreams.base, upstreams.path)?,
            dialect,
            client: client(settings, &http, upstreams, metrics.meter())?,
        };
        Ok(
            post(move |request| forward::forward(route.clone(), request)).fallback(
                move || async move {
                    dialect.error(
                        Kind::MethodNotAllowed,
                        "method not allowed: this path takes POST",
                    )
                },
            ),
        )
    };
    let metrics = metrics.clone();
    let metrics = get(move || async move { metrics_text(&metrics) }).fallback(|| async {
        Dialect::OpenAi.error(
            Kind::MethodNotAllowed,
            "method not allowed: this path takes GET",
        )
    });
    Ok(Router::new()
        .route("/v1/chat/completions", route(openai, Dialect::OpenAi)?)
        .route("/v1/messages", route(anthropic, Dialect::Anthropic)?)
        .route("/metrics", metrics)
        .fallback(not_found))
}

/// Where one route's calls go: its upstream's base URL, then its fallbacks', and the
/// endpoint under each.
struct Upstreams<'a> {
    base: &'a str,
    fallbacks: &'a [String],
    path: &'static str,
    /// The `provider` of the first upstream's metrics; the fallbacks' are
    /// `{provider}-fallback-{n}`.
    provider: &'static str,
}

/// The client of one route: its upstream and each fallback, each with a stack of its
/// own built by [`stack`], tried in that order by a `Fallback`, below the buffer that
/// makes request bodies replayable for all of them.
fn client<C>(
    settings: &Settings,
    http: &Client<C, ReplayBody<Body>>,
    upstreams: Upstreams<'_>,
    meter: Meter,
) -> Result<forward::Upstream, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let fallbacks = upstreams.fallbacks.iter().map(String::as_str);
    let mut targets = Vec::new();
    for (n, base) in std::iter::once(upstreams.base).chain(fallbacks).enumerate() {
        let name = match n {
            0 => upstreams.provider.to_owned(),
            n => format!("{}-fallback-{n}", upstreams.provider),
        };
        let url = endpoint(base, upstreams.path)?;
        let target = stack(settings, http.clone(), url, name.clone(), meter.clone())?;
        targets.push((name, target));
    }
    let fallback = Fallback::new(targets)
        .map_err(|e| format!("fallbacks: {e}"))?
        .cooldown(settings.cooldown_failures, settings.cooldown)
        .provider(upstreams.provider)
        .meter(meter);
    let client = ServiceBuilder::new()
        // Outermost: a slow upload is read before the call takes a slot.
        .layer(
            BufferRequestBodyLayer::try_new(settings.buffer).map_err(|e| format!("buffer: {e}"))?,
        )
        .service(fallback);
    Ok(BoxCloneSyncService::new(client))
}

/// One upstream of a route, boxed, so that a route's upstreams are of one type.
type Target = BoxCloneSyncService<axum::http::Request<ReplayBody<Body>>, Response, BoxError>;

/// The stack of one upstream: the crate's layers over the shared hyper-util client,
/// sending each call to `url` (with the caller's query).
fn stack<C>(
    settings: &Settings,
    http: Client<C, ReplayBody<Body>>,
    url: Uri,
    provider: String,
    meter: Meter,
) -> Result<Target, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let policy = RetryPolicy::default().first_chunk_timeout(settings.first_chunk_timeout);
    let client = ServiceBuilder::new()
        .map_request(move |mut request: axum::http::Request<ReplayBody<Body>>| {
            // `forward` refused a query that does not fit in a URL.
            let query = request.uri().query();
            *request.uri_mut() = forward::with_query(&url, query).unwrap_or_else(|| url.clone());
            request
        })
        .layer(
            StreamConcurrencyLayer::try_new(settings.limit)
                .map_err(|e| format!("limit: {e}"))?
                .max_wait(settings.max_wait)
                .provider(provider.clone())
                .meter(meter.clone()),
        )
        .layer(
            RetryBudgetLayer::new(RetryBudget::default())
                .provider(provider.clone())
                .meter(meter.clone()),
        )
        .layer(
            FirstChunkRetryLayer::new(policy)
                .provider(provider)
                .meter(meter),
        )
        .service(http)
        .map_response(|response| response.map(Body::new));
    Ok(BoxCloneSyncService::new(client))
}

fn metrics_text(metrics: &Metrics) -> Response {
    let content_type = HeaderValue::from_static(prometheus::TEXT_FORMAT);
    ([(header::CONTENT_TYPE, content_type)], metrics.text()).into_response()
}

async fn not_found(uri: Uri) -> Response {
    let dialect = match uri.path().starts_with("/v1/messages") {
        true => Dialect::Anthropic,
        false => Dialect::OpenAi,
    };
    let message = format!(
        "no route for {}: this proxy serves POST /v1/chat/completions, POST /v1/messages \
         and GET /metrics",
        uri.path()
    );
    dialect.error(Kind::NotFound, &message)
}
