//! The errors the proxy answers itself, in the shape its client's SDK parses:
//! OpenAI's `{"error": {"message", "type", "param", "code"}}`, or Anthropic's
//! `{"type": "error", "error": {"type", "message"}}`.

use axum::http::StatusCode;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tower::BoxError;
use tower_stream_backpressure::retry::FirstChunkErrorKind;
use tower_stream_backpressure::{FirstChunkError, Rejected};

/// Whose API a route speaks, and so the shape of its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No slot within `--max-wait`: back-pressure, the client may come back.
    Overloaded,
    /// The upstream stalled before its first chunk.
    Timeout,
    /// The upstream's certificate was not trusted: a retry would not help.
    Certificate,
    /// Any other failure of the upstream before its first chunk.
    Upstream,
    /// The request (its body, its query) could not be forwarded.
    BadRequest,
    NotFound,
    MethodNotAllowed,
}

impl Kind {
    /// What `error`, from the stacked client, says happened.
    pub fn of(error: &BoxError) -> Self {
        if error.is::<Rejected>() {
            return Kind::Overloaded;
        }
        if chain(&**error).any(is_certificate_error) {
            return Kind::Certificate;
        }
        match error
            .downcast_ref::<FirstChunkError>()
            .map(FirstChunkError::kind)
        {
            Some(FirstChunkErrorKind::Timeout) => Kind::Timeout,
            Some(_) => Kind::Upstream,
            // The request body failed while it was read, before anything went upstream.
            None if error.is::<axum::Error>() => Kind::BadRequest,
            None => Kind::Upstream,
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Kind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::Certificate | Kind::Upstream => StatusCode::BAD_GATEWAY,
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// OpenAI's `type` and our `code`.
    fn openai(self) -> (&'static str, &'static str) {
        match self {
            Kind::Overloaded => ("server_error", "proxy_overloaded"),
            Kind::Timeout => ("server_error", "upstream_timeout"),
            Kind::Certificate => ("server_error", "upstream_certificate_error"),
            Kind::Upstream => ("server_error", "upstream_error"),
            Kind::BadRequest => ("invalid_request_error", "bad_request"),
            Kind::NotFound => ("invalid_request_error", "not_found"),
            Kind::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
        }
    }

    /// Anthropic's `type`, from the list its API documents.
    fn anthropic(self) -> &'static str {
        match self {
            Kind::Overloaded => "overloaded_error",
            Kind::Timeout => "timeout_error",
            Kind::Certificate | Kind::Upstream => "api_error",
            Kind::BadRequest | Kind::MethodNotAllowed => "invalid_request_error",
            Kind::NotFound => "not_found_error",
        }
    }
}

impl Dialect {
    /// An error response of `kind` saying `message`.
    pub fn error(self, kind: Kind, message: &str) -> Response {
        let body = match self {
            Dialect::OpenAi => {
                let (kind, code) = kind.openai();
                json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
            }
            Dialect::Anthropic => {
                json!({"type": "error", "error": {"type": kind.anthropic(), "message": message}})
            }
        };
        let mut response = (kind.status(), axum::Json(body)).into_response();
        if kind == Kind::Overloaded {
            // Both SDKs retry a 503, after this many seconds.
            let retry_after = HeaderValue::from_static("1");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
        }
        response
    }

    /// The response for an error of the stacked client, which names its causes.
    pub fn upstream_error(self, error: &BoxError) -> Response {
        self.error(Kind::of(error), &describe(error))
    }
}

/// An error and its causes, `: `-separated.
pub fn describe(error: &BoxError) -> String {
    let causes: Vec<String> = chain(&**error).map(ToString::to_string).collect();
    causes.join(": ")
}

/// An error and its sources, outermost first.
fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |error| error.source())
}

/// rustls rejected the upstream's certificate. tokio-rustls wraps rustls' error in an
/// `io::Error`, and hyper-rustls that in another, and an `io::Error`'s `source()` skips
/// what it wraps: look inside each.
fn is_certificate_error(mut error: &(dyn std::error::Error + 'static)) -> bool {
    while let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        error = inner;
    }
    matches!(
        error.downcast_ref::<rustls::Error>(),
        Some(rustls::Error::InvalidCertificate(_))
    )
}
