//! The mock's `POST /v1/messages`, as Anthropic's Messages API answers: a `message`,
//! or with `"stream": true` the events `message_start`, `content_block_start`, `ping`,
//! one `content_block_delta` per word, `content_block_stop`, `message_delta` and
//! `message_stop`, each with its `event:` name.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Mock, json_object, reply, stream};

/// One named SSE event.
fn event(name: &str, data: Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Anthropic's error shape, in a body or an `error` event.
fn error(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

pub(super) async fn messages(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(request) = json_object(&body) else {
        let error = error(
            "invalid_request_error",
            "the request body is not a JSON object",
        );
        return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
    };
    let (call, attempt) = mock.call(&headers);
    if let Some((attempt, true)) = attempt {
        // An overload reported after `200 OK`, as the stream's first event (a ping,
        // which is only a keep-alive, before it): the proxy retries it.
        let ping = event("ping", json!({"type": "ping"}));
        let overloaded = event("error", error("overloaded_error", "Overloaded"));
        return stream(vec![ping, overloaded], Some(attempt));
    }
    let attempt = attempt.map(|(attempt, _)| attempt);
    let text = reply(
        request["messages"].as_array().map_or(0, Vec::len),
        body.len(),
    );
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let usage = json!({"input_tokens": body.len().div_ceil(4), "output_tokens": words.len()});
    let message = json!({
        "id": format!("msg_mock{call}"), "type": "message", "role": "assistant",
        "model": request["model"].as_str().unwrap_or("mock"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null, "usage": usage,
    });

    if request["stream"].as_bool() != Some(true) {
        let mut response = axum::Json(message).into_response();
        if let Some(attempt) = attempt {
            response
                .headers_mut()
                .insert("x-mock-attempt", attempt.into());
        }
        return response;
    }

    let mut start = message;
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = json!(1);
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": start}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for word in &words {
        let delta = json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": word}});
        events.push(event("content_block_delta", delta));
    }
    events.extend([
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        event(
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": words.len()}}),
        ),
        event("message_stop", json!({"type": "message_stop"})),
    ]);
    stream(events, attempt)
}
