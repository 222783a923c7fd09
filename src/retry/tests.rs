//! The retry layer over an in-memory service: what each attempt sends, what the caller
//! receives, and when a failure is final.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};

use super::{FirstChunkError, FirstChunkErrorKind, FirstChunkRetryLayer, RetryPolicy, StopReason};
use crate::RetryBudget;
use crate::frame::{Detector, FirstData, Progress};

/// A body that yields scripted frames, then ends; polled after its end, it panics.
#[derive(Debug, Default)]
struct Scripted {
    frames: VecDeque<Result<Frame<Bytes>, io::Error>>,
    ended: bool,
    /// Reports its end as a body of exact length does (`Content-Length`): once the
    /// last frame is out, without being polled for `None`.
    exact: bool,
}

impl Scripted {
    fn data(chunks: &[&'static str]) -> Self {
        Self {
            frames: chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                .collect(),
            ..Self::default()
        }
    }

    fn exact(self) -> Self {
        Self {
            exact: true,
            ..self
        }
    }

    fn then(mut self, frame: Result<Frame<Bytes>, io::Error>) -> Self {
        self.frames.push_back(frame);
        self
    }
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        assert!(!self.ended, "polled after its end");
        let next = self.frames.pop_front();
        self.ended = next.is_none();
        Poll::Ready(next)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.exact && self.frames.is_empty())
    }
}

type Reply = Result<Response<Scripted>, BoxError>;

/// A service answering attempt `n` with `replies[n]`, recording each request and
/// counting `poll_ready` calls.
#[derive(Clone)]
struct Mock {
    replies: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Request<Full<Bytes>>>>>,
    ready: Arc<Mutex<usize>>,
}

impl Mock {
    fn new(replies: Vec<Reply>) -> Self {
        Self {
            replies: Arc::new(Mutex::new(replies.into())),
            seen: Arc::default(),
            ready: Arc::default(),
        }
    }

    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Service<Request<Full<Bytes>>> for Mock {
    type Response = Response<Scripted>;
    type Error = BoxError;
    type Future = std::future::Ready<Reply>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        *self.ready.lock().unwrap() += 1;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        self.seen.lock().unwrap().push(request);
        let reply = self
            .replies
            .lock()
            .unwrap()
            .pop_front()
            .expect("a scripted reply");
        std::future::ready(reply)
    }
}

/// A `200 text/event-stream` response.
fn ok(body: Scripted) -> Reply {
    ok_as("text/event-stream", body)
}

/// A `200` response of `content_type`.
fn ok_as(content_type: &'static str, body: Scripted) -> Reply {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

fn status(code: u16, headers: &[(&'static str, &'static str)]) -> Reply {
    let mut response = Response::new(Scripted::data(&["{}"]));
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    for (name, value) in headers {
        response.headers_mut().insert(*name, value.parse().unwrap());
    }
    Ok(response)
}

fn reset() -> Reply {
    Err(io::Error::from(io::ErrorKind::ConnectionReset).into())
}

fn request() -> Request<Full<Bytes>> {
    Request::post("http://upstream/v1/chat")
        .header("authorization", "Bearer x")
        .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
        .unwrap()
}

fn policy() -> RetryPolicy {
    RetryPolicy::default().backoff(Duration::ZERO, Duration::ZERO)
}

async fn run(
    layer: FirstChunkRetryLayer<impl Detector>,
    mock: &Mock,
    request: Request<Full<Bytes>>,
) -> Result<Response<super::ResponseBody<Scripted>>, BoxError> {
    layer.layer(mock.clone()).oneshot(request).await
}

fn first_chunk_error(error: &BoxError) -> &FirstChunkError {
    error
        .downcast_ref()
        .unwrap_or_else(|| panic!("expected FirstChunkError, got {error}"))
}

#[tokio::test(start_paused = true)]
async fn the_caller_gets_every_frame_as_sent_peeked_or_not() {
    let frames = [
        ": ping\n\n",
        "da",
        "ta: x\r",
        "\n",
        "\r\n",
        "data: y\n\n",
        "data: [DONE]\n\n",
    ];
    let mock = Mock::new(vec![ok(Scripted::data(&frames))]);
    let response = run(FirstChunkRetryLayer::new(policy()), &mock, request())
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        received.push(frame.unwrap().into_data().unwrap());
    }
    assert_eq!(received, frames, "same frames, same boundaries, same order");
    assert!(body.is_end_stream());
}

#[tokio::test(start_paused = true)]
async fn a_first_chunk_completed_by_the_end_of_the_body_replays_and_ends() {
    /// Finds the chunk only at the end of the body.
    #[derive(Clone)]
    struct AtEnd;
    impl Detector for AtEnd {
        fn feed(&mut self, _: &[u8]) -> Progress {
            Progress::Pending
        }
        fn finish(&mut self) -> Progress {
            Progress::Found
        }
    }
    let mock = Mock::new(vec![ok(Scripted::data(&["{\"a\":", "1}"]))]);
    let layer = FirstChunkRetryLayer::new(policy()).frames(AtEnd);
    let response = run(layer, &mock, request()).await.unwrap();
    let body = response.into_body();
    assert_eq!(body.size_hint().exact(), Some(7));
    // The inner body panics if polled after its end: the replay must not do that.
    assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{\"a\":1}");
}

#[tokio::test(start_paused = true)]
async fn each_attempt_sends_the_same_request_and_polls_ready_first() {
    let mock = Mock::new(vec![
        reset(),
        status(503, &[]),
        ok(Scripted::data(&["data: 1\n\n"])),
    ]);
    let mut request = request();
    request.extensions_mut().insert("marker");
    run(FirstChunkRetryLayer::new(policy()), &mock, request)
        .await
        .unwrap();
    let seen = mock.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for request in seen.iter() {
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "http://upstream/v1/chat");
        assert_eq!(request.headers()["authorization"], "Bearer x");
        assert_eq!(request.extensions().get::<&str>(), Some(&"marker"));
        let body = collect_ready(request.body().clone());
        assert_eq!(body, b"{\"stream\":true}");
    }
    assert_eq!(
        *mock.ready.lock().unwrap(),
        3,
        "poll_ready before every attempt"
    );
}

fn collect_ready(body: Full<Bytes>) -> Vec<u8> {
    let mut body = std::pin::pin!(body);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut out = Vec::new();
    while let Poll::Ready(Some(Ok(frame))) = body.as_mut().poll_frame(&mut cx) {
        out.extend_from_slice(&frame.into_data().unwrap());
    }
    out
}

#[derive(Debug)]
struct BadRequest;
impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bad request")
    }
}
impl std::error::Error for BadRequest {}

#[tokio::test(start_paused = true)]
async fn every_inner_error_comes_back_in_one_shape_whatever_max_attempts() {
    for max_attempts in [1, 3] {
        // Not transient: one attempt, at once.
        let mock = Mock::new(vec![Err(BadRequest.into())]);
        let layer = FirstChunkRetryLayer::new(policy().max_attempts(max_attempts));
        let error = run(layer.clone(), &mock, request()).await.unwrap_err();
        let error = first_chunk_error(&error);
        assert_eq!(error.kind(), FirstChunkErrorKind::Upstream);
        assert_eq!(error.stop_reason(), StopReason::NotRetryable);
        assert_eq!(error.attempts(), 1);
        let source = std::error::Error::source(error).expect("the inner error");
        assert!(source.is::<BadRequest>(), "{source}");
        assert_eq!(mock.attempts(), 1);

        // Transient: every attempt, then the same shape.
        let mock = Mock::new((0..max_attempts).map(|_| reset()).collect());
        let error = run(layer, &mock, request()).await.unwrap_err();
        let error = first_chunk_error(&error);
        assert_eq!(error.kind(), FirstChunkErrorKind::Upstream);
        assert_eq!(error.stop_reason(), StopReason::AttemptsExhausted);
        assert_eq!(error.attempts(), max_attempts);
        assert!(std::error::Error::source(error).is_some_and(|e| e.is::<io::Error>()));
        assert_eq!(mock.attempts(), max_attempts as usize);
    }
}

#[tokio::test(start_paused = true)]
async fn the_error_classifier_decides_what_is_transient() {
    let mock = Mock::new(vec![
        Err(BadRequest.into()),
        ok(Scripted::data(&["data: 1\n\n"])),
    ]);
    let policy = policy().classify_errors(|error| error.is::<BadRequest>());
    run(FirstChunkRetryLayer::new(policy), &mock, request())
        .await
        .unwrap();
    assert_eq!(mock.attempts(), 2);

    let mock = Mock::new(vec![reset()]);
    let policy = RetryPolicy::default().classify_errors(|_| false);
    let error = run(FirstChunkRetryLayer::new(policy), &mock, request())
        .await
        .unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.stop_reason(), StopReason::NotRetryable);
    assert!(std::error::Error::source(error).is_some_and(|e| e.is::<io::Error>()));
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_overrides_the_status_set() {
    let mock = Mock::new(vec![
        status(500, &[("x-should-retry", "true")]),
        ok(Scripted::data(&["data: 1\n\n"])),
    ]);
    let response = run(FirstChunkRetryLayer::new(policy()), &mock, request())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(mock.attempts(), 2);

    let mock = Mock::new(vec![status(503, &[("x-should-retry", "false")])]);
    let response = run(FirstChunkRetryLayer::new(policy()), &mock, request())
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(mock.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn responses_without_a_body_are_not_read() {
    let empty = || {
        Ok(Response::builder()
            .status(204)
            .body(Scripted::default())
            .unwrap())
    };
    let mock = Mock::new(vec![empty()]);
    let response = run(FirstChunkRetryLayer::new(policy()), &mock, request())
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(mock.attempts(), 1);

    let mock = Mock::new(vec![ok(Scripted::default())]);
    let mut head = request();
    *head.method_mut() = Method::HEAD;
    let response = run(FirstChunkRetryLayer::new(policy()), &mock, head)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(mock.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn trailers_before_the_first_chunk_end_the_attempt() {
    let trailers =
        || ok(Scripted::data(&[": ping\n\n"]).then(Ok(Frame::trailers(http::HeaderMap::new()))));
    let mock = Mock::new(vec![trailers(), trailers()]);
    let error = run(
        FirstChunkRetryLayer::new(policy().max_attempts(2)),
        &mock,
        request(),
    )
    .await
    .unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.kind(), FirstChunkErrorKind::EndOfStream);
    assert_eq!(error.attempts(), 2);
    assert!(
        error
            .to_string()
            .contains("after 2 attempts (attempts exhausted)"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusing_budget_returns_the_last_failure_at_once() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
    let mock = Mock::new(vec![reset()]);
    let mut request = request();
    request.extensions_mut().insert(budget);
    let error = run(FirstChunkRetryLayer::new(policy()), &mock, request)
        .await
        .unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.kind(), FirstChunkErrorKind::Upstream);
    assert_eq!(error.stop_reason(), StopReason::BudgetExhausted);
    assert_eq!(error.attempts(), 1);
    assert!(std::error::Error::source(error).unwrap().is::<io::Error>());
    assert_eq!(mock.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn empty_frames_are_not_held_and_tiny_frames_count_their_bookkeeping() {
    // A million empty frames before the first event: none is held.
    let mut frames = vec![""; 1_000_000];
    frames.extend(["data: x\n\n", "data: y\n\n"]);
    let mock = Mock::new(vec![ok(Scripted::data(&frames))]);
    let layer = FirstChunkRetryLayer::new(policy().max_buffer(1024));
    let response = run(layer, &mock, request()).await.unwrap();
    assert!(
        format!("{response:?}").contains("replay_frames: 1"),
        "{response:?}"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"data: x\n\ndata: y\n\n"));

    // A 508-byte first event in one-byte frames, under a 10,000-byte cap: it would fit
    // as bytes, but not as 508 frames held.
    let text = "data: ".to_owned() + &"x".repeat(500) + "\n\n";
    let bytes: Vec<&'static str> = text
        .chars()
        .map(|c| &*Box::leak(c.to_string().into_boxed_str()))
        .collect();
    let mock = Mock::new(vec![ok(Scripted::data(&bytes))]);
    let layer = FirstChunkRetryLayer::new(policy().max_buffer(10_000).max_attempts(1));
    let error = run(layer, &mock, request()).await.unwrap_err();
    assert_eq!(
        first_chunk_error(&error).kind(),
        FirstChunkErrorKind::BufferLimit
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_replayed_gets_one_attempt() {
    let mock = Mock::new(vec![reset(), reset()]);
    let mut request = request();
    request.extensions_mut().insert(super::NotReplayable);
    let error = run(FirstChunkRetryLayer::new(policy()), &mock, request)
        .await
        .unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.stop_reason(), StopReason::AttemptsExhausted);
    assert_eq!(error.attempts(), 1);
    assert_eq!(mock.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn first_data_finds_the_first_non_empty_frame() {
    let mock = Mock::new(vec![
        ok(Scripted::data(&["", ""])),
        ok(Scripted::data(&["", "{\"id\":1}"])),
    ]);
    let layer = FirstChunkRetryLayer::new(policy()).frames(FirstData);
    let body = run(layer, &mock, request()).await.unwrap().into_body();
    assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{\"id\":1}");
    assert_eq!(
        mock.attempts(),
        2,
        "the first body ended with empty frames only"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_waits_between_attempts() {
    let mock = Mock::new(vec![reset(), reset(), ok(Scripted::data(&["data: 1\n\n"]))]);
    let policy = RetryPolicy::default().backoff(Duration::from_secs(1), Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    run(FirstChunkRetryLayer::new(policy), &mock, request())
        .await
        .unwrap();
    // Full jitter: each wait within [0, 1 s] (two draws of zero are next to impossible).
    assert!(started.elapsed() <= Duration::from_secs(2));
    assert!(started.elapsed() > Duration::ZERO);
    assert_eq!(mock.attempts(), 3);
}

#[test]
fn an_invalid_policy_is_refused_at_construction() {
    let error = FirstChunkRetryLayer::try_new(RetryPolicy::default().max_attempts(0)).unwrap_err();
    assert_eq!(error.setting(), "max_attempts");
    let result = std::panic::catch_unwind(|| {
        FirstChunkRetryLayer::new(RetryPolicy::default().max_buffer(0))
    });
    let panic = result.unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("invalid `max_buffer`"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn a_complete_2xx_passes_at_once_unless_a_stream_format_expects_an_event() {
    let json = "application/json";
    let empty = || Scripted::default().exact();
    // Already at its end when the head arrives.
    for content_type in [json, "text/plain", "application/json; charset=utf-8"] {
        let mock = Mock::new(vec![ok_as(content_type, empty())]);
        let response = run(FirstChunkRetryLayer::new(policy()), &mock, request())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.body().is_end_stream(), "{content_type}");
        assert_eq!(mock.attempts(), 1, "{content_type}");
    }
    let mock = Mock::new(vec![ok_as("text/event-stream", empty())]);
    let layer = FirstChunkRetryLayer::new(policy()).frames(FirstData);
    let _ = run(layer, &mock, request()).await.unwrap();
    assert_eq!(mock.attempts(), 1, "FirstData, whatever the content type");

    // A stream format expects an event: an empty body is an end of stream.
    for content_type in ["text/event-stream", "application/x-ndjson"] {
        let mock = Mock::new((0..3).map(|_| ok_as(content_type, empty())).collect());
        let error = run(FirstChunkRetryLayer::new(policy()), &mock, request())
            .await
            .unwrap_err();
        let kind = first_chunk_error(&error).kind();
        assert_eq!(kind, FirstChunkErrorKind::EndOfStream, "{content_type}");
        assert_eq!(mock.attempts(), 3);
    }
    let mock = Mock::new((0..3).map(|_| ok_as(json, empty())).collect());
    let layer = FirstChunkRetryLayer::new(policy()).frames(crate::frame::JsonArray::default());
    let _ = run(layer, &mock, request()).await.unwrap_err();
    assert_eq!(mock.attempts(), 3, "a strict JSON array stream");

    // A head that promised more, then no byte: an end of stream under every detector.
    let mock = Mock::new((0..3).map(|_| ok_as(json, Scripted::default())).collect());
    let _ = run(FirstChunkRetryLayer::new(policy()), &mock, request())
        .await
        .unwrap_err();
    assert_eq!(mock.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_short_plain_answer_ends_as_its_first_chunk_and_is_never_retried_for_ending() {
    // A JSON list cut short: a plain document for the caller to judge.
    let bodies: [&[&'static str]; 3] = [&["[12"], &["[{\"id\":", " 1"], &["  "]];
    for chunks in bodies {
        let mock = Mock::new(vec![ok_as(
            "application/json",
            Scripted::data(chunks).exact(),
        )]);
        let response = run(FirstChunkRetryLayer::new(policy()), &mock, request())
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, chunks.concat().into_bytes());
        assert_eq!(mock.attempts(), 1, "{chunks:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_json_element_that_cannot_start_a_value_is_malformed_at_once() {
    let mock = Mock::new(vec![ok_as("application/json", Scripted::data(&["[", "x"]))]);
    let layer = FirstChunkRetryLayer::new(policy()).frames(crate::frame::JsonArray::default());
    let error = run(layer, &mock, request()).await.unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.kind(), FirstChunkErrorKind::Malformed);
    assert_eq!(error.stop_reason(), StopReason::NotRetryable);
    assert_eq!(mock.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_plain_json_list_larger_than_the_buffer_is_a_response() {
    let big: &'static str = format!("[{{\"b64_json\": \"{}\"}}]", "A".repeat(4096)).leak();
    let frames: Vec<&str> = vec![&big[..1000], &big[1000..2000], &big[2000..]];
    let policy = || policy().max_buffer(1500);
    let mock = Mock::new(vec![ok_as("application/json", Scripted::data(&frames))]);
    let response = run(FirstChunkRetryLayer::new(policy()), &mock, request())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, big.as_bytes(), "byte for byte");
    assert_eq!(mock.attempts(), 1);

    // A stream's first element that large stays an error.
    let mock = Mock::new(vec![ok_as("application/json", Scripted::data(&frames))]);
    let layer = FirstChunkRetryLayer::new(policy()).frames(crate::frame::JsonArray::default());
    let error = run(layer, &mock, request()).await.unwrap_err();
    assert_eq!(
        first_chunk_error(&error).kind(),
        FirstChunkErrorKind::BufferLimit
    );
}

#[tokio::test(start_paused = true)]
async fn a_zero_or_past_hint_falls_back_to_the_backoff() {
    let past = "Wed, 21 Oct 2015 07:28:00 GMT";
    for (name, value) in [
        ("retry-after", "0"),
        ("retry-after-ms", "0"),
        ("retry-after", past),
    ] {
        let mut replies: Vec<Reply> = (0..4).map(|_| status(503, &[(name, value)])).collect();
        replies.push(ok(Scripted::data(&["data: 1\n\n"])));
        let mock = Mock::new(replies);
        let policy = RetryPolicy::default()
            .max_attempts(5)
            .backoff(Duration::from_millis(100), Duration::from_millis(100));
        let started = tokio::time::Instant::now();
        let response = run(FirstChunkRetryLayer::new(policy), &mock, request())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(mock.attempts(), 5);
        let waited = started.elapsed();
        // Four jittered waits of up to 100 ms each, not four retries in one poll.
        assert!(waited > Duration::ZERO, "{name}: {value}: no wait at all");
        assert!(waited <= Duration::from_millis(400), "{waited:?}");
    }
}

/// A body that is always ready with an empty frame: it never returns `Pending`.
#[derive(Debug)]
struct AlwaysEmpty;

impl Body for AlwaysEmpty {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::new()))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_always_ready_cannot_pin_the_task_past_the_timeout() {
    let upstream = tower::service_fn(|_: Request<Full<Bytes>>| async {
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(AlwaysEmpty);
        Ok::<_, http::Error>(response.unwrap())
    });
    let policy = RetryPolicy::default()
        .max_attempts(1)
        .first_chunk_timeout(Duration::from_millis(50));
    let call = FirstChunkRetryLayer::new(policy)
        .layer(upstream)
        .oneshot(request());
    // On its own task: a call that never yields would hold it, not this test.
    let call = tokio::spawn(call);
    let error = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call ends, by its first-chunk timeout")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        first_chunk_error(&error).kind(),
        FirstChunkErrorKind::Timeout
    );
}

/// Fails its `poll_ready` from the `n`th call on (counting from 1).
#[derive(Clone)]
struct UnreadyFrom {
    inner: Mock,
    n: usize,
}

impl Service<Request<Full<Bytes>>> for UnreadyFrom {
    type Response = Response<Scripted>;
    type Error = BoxError;
    type Future = std::future::Ready<Reply>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let _ = self.inner.poll_ready(cx);
        if *self.inner.ready.lock().unwrap() >= self.n {
            return Poll::Ready(Err("the pool is closed".into()));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn a_poll_ready_error_before_a_retry_returns_the_previous_failure() {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    let layer = FirstChunkRetryLayer::new(policy()).meter(provider.meter("test"));
    // The first `poll_ready` is the caller's (by `oneshot`), the second before the retry.
    let mock = Mock::new(vec![status(503, &[]), reset()]);
    let service = UnreadyFrom {
        inner: mock.clone(),
        n: 2,
    };
    let response = layer.layer(service).oneshot(request()).await.unwrap();
    assert_eq!(response.status(), 503, "the 503 itself");
    assert_eq!(mock.attempts(), 1);
    drop(response);

    // An error that called for the retry comes back as that error.
    let mock = Mock::new(vec![reset(), reset()]);
    let service = UnreadyFrom {
        inner: mock.clone(),
        n: 2,
    };
    let error = layer.layer(service).oneshot(request()).await.unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.kind(), FirstChunkErrorKind::Upstream);
    assert_eq!(error.stop_reason(), StopReason::NotReady);
    assert_eq!(
        error.attempts(),
        1,
        "the attempt that never started is not one"
    );

    // Nothing counted as a failed retry: no retry started.
    provider.force_flush().unwrap();
    let exported = exporter.get_finished_metrics().unwrap();
    let retries = exported
        .iter()
        .flat_map(|m| m.scope_metrics())
        .flat_map(|s| s.metrics())
        .filter(|m| m.name() == "stream_retries")
        .count();
    assert_eq!(retries, 0, "no stream_retries series");
}

#[tokio::test(start_paused = true)]
async fn without_retry_maybe_processed_only_unprocessed_failures_are_retried() {
    let strict = || FirstChunkRetryLayer::new(policy().retry_maybe_processed(false));
    let healthy = || ok(Scripted::data(&["data: 1\n\n"]));

    // The server did no work: retried.
    let refused = || Err(io::Error::from(io::ErrorKind::ConnectionRefused).into());
    let should_retry = status(500, &[("x-should-retry", "true")]);
    let unprocessed: [(&str, Reply); 5] = [
        ("connection refused", refused()),
        ("429", status(429, &[])),
        ("503", status(503, &[])),
        ("529", status(529, &[])),
        ("x-should-retry", should_retry),
    ];
    for (what, failure) in unprocessed {
        let mock = Mock::new(vec![failure, healthy()]);
        let response = run(strict(), &mock, request()).await.unwrap();
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(mock.attempts(), 2, "{what}");
    }

    // It may have: one attempt, the failure back at once.
    let mock = Mock::new(vec![reset()]);
    let error = run(strict(), &mock, request()).await.unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.kind(), FirstChunkErrorKind::Upstream);
    assert_eq!(error.stop_reason(), StopReason::MaybeProcessed);
    assert_eq!(error.attempts(), 1);
    assert!(error.to_string().contains("may have processed"), "{error}");

    let cut = Scripted::data(&[": ping\n\n"]).then(Err(io::ErrorKind::ConnectionReset.into()));
    let mock = Mock::new(vec![ok(cut)]);
    let error = run(strict(), &mock, request()).await.unwrap_err();
    let error = first_chunk_error(&error);
    assert_eq!(error.kind(), FirstChunkErrorKind::Body);
    assert_eq!(error.stop_reason(), StopReason::MaybeProcessed);
    assert_eq!(mock.attempts(), 1);

    for code in [502, 504] {
        let mock = Mock::new(vec![status(code, &[])]);
        let response = run(strict(), &mock, request()).await.unwrap();
        assert_eq!(response.status(), code, "a gateway's {code} goes back");
        assert_eq!(mock.attempts(), 1);
    }

    // By default both classes are retried.
    for failure in [reset(), status(502, &[])] {
        let mock = Mock::new(vec![failure, healthy()]);
        let layer = FirstChunkRetryLayer::new(policy());
        assert_eq!(run(layer, &mock, request()).await.unwrap().status(), 200);
        assert_eq!(mock.attempts(), 2);
    }
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "ResponseFuture polled after completion")]
async fn the_future_polled_after_it_returned_panics() {
    use std::future::Future;
    let mock = Mock::new(vec![ok(Scripted::data(&["data: 1\n\n"]))]);
    let mut service = FirstChunkRetryLayer::new(policy()).layer(mock);
    let future = service.ready().await.unwrap().call(request());
    let mut future = std::pin::pin!(future);
    let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
    let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
}

/// An upstream whose attempts before `answering` never answer, recording when each
/// came and whether it carried the retry mark.
fn stalling_until(
    answering: usize,
    seen: &Arc<Mutex<Vec<(tokio::time::Instant, bool)>>>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Scripted>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Reply>,
> + Clone {
    let seen = seen.clone();
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        let mut seen = seen.lock().unwrap();
        let index = seen.len();
        let retry = request.extensions().get::<super::RetryAttempt>().is_some();
        seen.push((tokio::time::Instant::now(), retry));
        async move {
            if index < answering {
                std::future::pending::<()>().await;
            }
            ok(Scripted::data(&["data: x\n\n"]))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn max_extra_bounds_the_hedges_in_flight_and_each_carries_the_retry_mark() {
    use super::Hedge;
    let after = Duration::from_secs(1);
    for max_extra in [1, 2] {
        let seen = Arc::default();
        let policy = policy()
            .max_attempts(5)
            .first_chunk_timeout(Duration::from_secs(60))
            .hedge(Hedge::after(after).max_extra(max_extra));
        let service = FirstChunkRetryLayer::new(policy).layer(stalling_until(2, &seen));
        let call = tokio::time::timeout(Duration::from_secs(10), service.oneshot(request()));
        let start = tokio::time::Instant::now();
        let answered = call.await;
        let seen = seen.lock().unwrap();
        let offsets: Vec<_> = seen.iter().map(|(at, _)| *at - start).collect();
        let marks: Vec<_> = seen.iter().map(|(_, retry)| *retry).collect();
        if max_extra == 1 {
            // Two in flight, neither answering: no third, whatever `max_attempts`.
            assert!(answered.is_err(), "still waiting");
            assert_eq!(offsets, [Duration::ZERO, after]);
            assert_eq!(marks, [false, true]);
        } else {
            // A hedge every second while fewer than three are in flight; the third
            // answers at once.
            let response = answered.expect("answered").unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(offsets, [Duration::ZERO, after, 2 * after]);
            assert_eq!(marks, [false, true, true]);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_takes_its_attempt_and_budget_only_once_the_service_is_ready_for_it() {
    use super::Hedge;
    // One request at a time below: the hedge waits for the stalled first attempt's
    // permit, which its first-chunk timeout frees; the failure's retry goes instead.
    let seen = Arc::default();
    let upstream = tower::limit::ConcurrencyLimit::new(stalling_until(1, &seen), 1);
    let budget = RetryBudget::new(Duration::from_secs(60), 0, 1.0);
    budget.deposit();
    let policy = policy()
        .max_attempts(2)
        .first_chunk_timeout(Duration::from_secs(5))
        .hedge(Hedge::after(Duration::from_secs(1)));
    let service = ServiceBuilder::new()
        .layer(crate::RetryBudgetLayer::new(budget.clone()))
        .layer(FirstChunkRetryLayer::new(policy))
        .service(upstream);
    let response = service
        .oneshot(request())
        .await
        .expect("the retry answered");
    assert_eq!(response.status(), 200);
    let seen = seen.lock().unwrap();
    let marks: Vec<_> = seen.iter().map(|(_, retry)| *retry).collect();
    assert_eq!(
        marks,
        [false, true],
        "the first attempt, then its retry, marked"
    );
    // Two deposits (the primed one and the call's), one withdrawal: the retry's.
    assert_eq!(budget.available(), 1);
}
