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
use tower::{BoxError, Layer, Service, ServiceExt};

use super::{FirstChunkError, FirstChunkErrorKind, FirstChunkRetryLayer, RetryPolicy, StopReason};
use crate::frame::{Detector, FirstData, Progress};
use crate::RetryBudget;

/// A body that yields scripted frames, then ends; polled after its end, it panics.
#[derive(Debug, Default)]
struct Scripted {
    frames: VecDeque<Result<Frame<Bytes>, io::Error>>,
    ended: bool,
}

impl Scripted {
    fn data(chunks: &[&'static str]) -> Self {
        Self {
            frames: chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                .collect(),
            ended: false,
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
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
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
async fn an_error_that_is_not_transient_comes_back_unchanged() {
    let mock = Mock::new(vec![Err(BadRequest.into())]);
    let error = run(FirstChunkRetryLayer::new(policy()), &mock, request())
        .await
        .unwrap_err();
    assert!(error.is::<BadRequest>(), "{error}");
    assert_eq!(mock.attempts(), 1);
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
    assert!(error.is::<io::Error>());
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
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap();
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
