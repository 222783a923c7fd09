//! Forwarding one call: the upstream's URL, the headers that go along, and the answer
//! streamed back as it comes.

use axum::body::Body;
use axum::extract::Request;
use axum::http::Uri;
use axum::http::header::{self, HeaderMap, HeaderName};
use axum::response::Response;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};

use super::errors::{Dialect, Kind, describe};

/// A provider's stacked client.
pub type Upstream = BoxCloneSyncService<Request, Response, BoxError>;

/// Where one route forwards to, through which client.
#[derive(Clone)]
pub struct Route {
    /// The upstream's endpoint, e.g. `https://api.openai.com/v1/chat/completions`
    /// (its fallbacks' stacks send each call to their own).
    pub url: Uri,
    pub client: Upstream,
    pub dialect: Dialect,
}

/// `{base}/v1/{path}` from a base URL as SDKs take it: `https://api.openai.com/v1`,
/// `http://127.0.0.1:11434` or `https://api.anthropic.com` (a final `/v1`, or `/`, is
/// not doubled).
pub fn endpoint(base: &str, path: &str) -> Result<Uri, String> {
    let expected = || format!("upstream {base:?}: expected http(s)://host[:port][/prefix]");
    let uri: Uri = base.parse().map_err(|e| format!("{}: {e}", expected()))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.authority().is_none() || uri.query().is_some() {
        return Err(expected());
    }
    let root = base.trim_end_matches('/');
    let root = root.strip_suffix("/v1").unwrap_or(root);
    format!("{root}/v1/{path}")
        .parse()
        .map_err(|e| format!("{}: {e}", expected()))
}

/// `url` with the caller's `query`, if any; `None` when it does not fit in a URL.
pub fn with_query(url: &Uri, query: Option<&str>) -> Option<Uri> {
    match query {
        // Some compatible APIs take parameters there (Azure's `api-version`).
        Some(query) => format!("{url}?{query}").parse().ok(),
        None => Some(url.clone()),
    }
}

/// Forwards the call and streams the answer back as it comes.
pub async fn forward(route: Route, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut forward = Request::new(body);
    *forward.method_mut() = parts.method;
    *forward.uri_mut() = match with_query(&route.url, parts.uri.query()) {
        Some(uri) => uri,
        None => {
            let message = "the query string cannot be forwarded";
            return route.dialect.error(Kind::BadRequest, message);
        }
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

    match route.client.oneshot(forward).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            parts.headers = end_to_end(parts.headers);
            // The server sets it again from the body, if it is known.
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.version = Default::default();
            Response::from_parts(parts, Body::new(body))
        }
        Err(error) => {
            eprintln!("openai_proxy: {}: {}", route.url, describe(&error));
            route.dialect.upstream_error(&error)
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
