//! The fallback over scripted services: which target is called, when, with which
//! request, and what the caller gets. Over loopback, with the layers and real
//! upstreams, in `tests/fallback.rs`.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_stream_backpressure_testkit::Metrics;

use super::{Fallback, Reason, ServedBy};
use crate::metrics::STREAM_FALLBACKS;
use crate::retry::NotReplayable;
use crate::{
    FirstChunkError, FirstChunkRetryLayer, Rejected, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};

/// How a scripted target answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    Error,
    /// Fails in `poll_ready`.
    NotReady,
    /// Never ready.
    Pending,
}

/// The error of a target that is down.
fn down() -> BoxError {
    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused").into()
}

fn is_down(error: &BoxError) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|error| error.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// A target that answers as scripted, call by call (the last answer again once the
/// script runs out), and counts its calls and its `poll_ready`s.
#[derive(Clone)]
struct Scripted {
    answers: Arc<[Answer]>,
    calls: Arc<AtomicUsize>,
    ready_polls: Arc<AtomicUsize>,
}

impl Scripted {
    fn new(answer: Answer) -> Self {
        Self::answering([answer])
    }

    fn answering(answers: impl Into<Arc<[Answer]>>) -> Self {
        Self {
            answers: answers.into(),
            calls: Arc::default(),
            ready_polls: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The answer to the next call.
    fn answer(&self) -> Answer {
        let at = self.calls().min(self.answers.len() - 1);
        self.answers[at]
    }
}

impl<B> Service<Request<B>> for Scripted {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready_polls.fetch_add(1, Ordering::SeqCst);
        match self.answer() {
            Answer::NotReady => Poll::Ready(Err(down())),
            Answer::Pending => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        let answer = self.answer();
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(match answer {
            Answer::Status(status) => {
                let mut response = Response::new(Full::new(Bytes::from("data: x\n\n")));
                *response.status_mut() = StatusCode::from_u16(status).expect("a status");
                Ok(response)
            }
            _ => Err(down()),
        })
    }
}

fn fallback(targets: &[(&'static str, &Scripted)]) -> Fallback<Scripted> {
    let targets = targets
        .iter()
        .map(|(name, target)| (*name, (*target).clone()));
    Fallback::new(targets).expect("targets")
}

fn served_by<B>(response: &Response<B>) -> &str {
    response
        .extensions()
        .get::<ServedBy>()
        .map(ServedBy::name)
        .expect("ServedBy")
}

#[tokio::test]
async fn each_failure_sends_the_call_to_the_next_target_and_any_other_answer_is_the_callers() {
    let metrics = Metrics::new();
    for (answer, reason) in [
        (Answer::Error, Some("error")),
        (Answer::NotReady, Some("error")),
        (Answer::Status(500), Some("status")),
        (Answer::Status(503), Some("status")),
        (Answer::Status(408), Some("status")),
        (Answer::Status(429), Some("status")),
        (Answer::Status(400), None),
        (Answer::Status(404), None),
        (Answer::Status(200), None),
    ] {
        let (primary, backup) = (Scripted::new(answer), Scripted::new(Answer::Status(200)));
        let client = fallback(&[("primary", &primary), ("backup", &backup)])
            .provider(format!("{answer:?}"))
            .meter(metrics.meter());
        let response = client.oneshot(Request::new(())).await.expect("a response");
        let expected = if reason.is_some() {
            "backup"
        } else {
            "primary"
        };
        assert_eq!(served_by(&response), expected, "{answer:?}");
        let primary_calls = usize::from(!matches!(answer, Answer::NotReady));
        assert_eq!(primary.calls(), primary_calls, "{answer:?}");
        assert_eq!(backup.calls(), usize::from(reason.is_some()), "{answer:?}");
        let provider = format!("{answer:?}");
        let counted = metrics.snapshot().count(
            STREAM_FALLBACKS,
            &[
                ("provider", &provider),
                ("from", "primary"),
                ("to", "backup"),
            ],
        );
        assert_eq!(counted, f64::from(u8::from(reason.is_some())), "{answer:?}");
        if let Some(reason) = reason {
            let attributes = [("provider", provider.as_str()), ("reason", reason)];
            assert_eq!(metrics.snapshot().count(STREAM_FALLBACKS, &attributes), 1.0);
        }
    }
}

#[tokio::test]
async fn a_target_is_made_ready_only_when_the_call_is_about_to_use_it() {
    let (primary, backup) = (
        Scripted::new(Answer::Status(200)),
        Scripted::new(Answer::Pending),
    );
    let mut client = fallback(&[("primary", &primary), ("backup", &backup)]);
    // Ready although the backup never is.
    assert!(ServiceExt::<Request<()>>::ready(&mut client).await.is_ok());
    let response = client.call(Request::new(())).await.expect("a response");
    assert_eq!(served_by(&response), "primary");
    assert_eq!(backup.ready_polls.load(Ordering::SeqCst), 0, "never asked");

    // The primary fails: the call waits for the backup to be ready, and only then.
    let primary = Scripted::new(Answer::Status(503));
    let client = fallback(&[("primary", &primary), ("backup", &backup)]);
    let mut call = std::pin::pin!(client.oneshot(Request::new(())));
    assert!(futures_poll_once(call.as_mut()).await.is_pending());
    assert_eq!(backup.ready_polls.load(Ordering::SeqCst), 1);
    assert_eq!((primary.calls(), backup.calls()), (1, 0));
}

/// Polls `future` once.
async fn futures_poll_once<F: Future>(mut future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

/// A request body that counts its clones.
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Self(self.0.clone())
    }
}

#[tokio::test]
async fn the_request_is_cloned_for_each_target_but_the_last_which_takes_it() {
    let targets: Vec<_> = (0..3).map(|_| Scripted::new(Answer::Error)).collect();
    let client = fallback(&[("a", &targets[0]), ("b", &targets[1]), ("c", &targets[2])]);
    let clones = Arc::new(AtomicUsize::new(0));
    let error = client
        .clone()
        .oneshot(Request::new(Counted(clones.clone())))
        .await
        .unwrap_err();
    assert!(is_down(&error), "the last error, as it is: {error}");
    assert_eq!(clones.load(Ordering::SeqCst), 2);
    assert!(targets.iter().all(|target| target.calls() == 1));

    // A request that cannot be sent twice goes to its first target only.
    let mut request = Request::new(Counted(clones.clone()));
    request.extensions_mut().insert(NotReplayable);
    assert!(is_down(&client.oneshot(request).await.unwrap_err()));
    assert_eq!(clones.load(Ordering::SeqCst), 2, "not cloned");
    let calls: Vec<_> = targets.iter().map(Scripted::calls).collect();
    assert_eq!(calls, [2, 1, 1]);
}

#[tokio::test]
async fn when_every_target_fails_the_caller_gets_the_last_failure_as_it_is() {
    let (a, b) = (
        Scripted::new(Answer::Status(500)),
        Scripted::new(Answer::Status(503)),
    );
    let response = fallback(&[("a", &a), ("b", &b)])
        .oneshot(Request::new(()))
        .await
        .expect("the last response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(served_by(&response), "b");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "data: x\n\n", "untouched");

    let (a, b) = (
        Scripted::new(Answer::Status(500)),
        Scripted::new(Answer::Error),
    );
    let error = fallback(&[("a", &a), ("b", &b)])
        .oneshot(Request::new(()))
        .await
        .unwrap_err();
    assert!(is_down(&error), "{error}");
}

#[tokio::test]
async fn custom_fallback_statuses_replace_the_default_set() {
    let (a, b) = (
        Scripted::new(Answer::Status(404)),
        Scripted::new(Answer::Status(200)),
    );
    let client = fallback(&[("a", &a), ("b", &b)]).fallback_on([StatusCode::NOT_FOUND]);
    let response = client.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(served_by(&response), "b");
    let a = Scripted::new(Answer::Status(500));
    let client = fallback(&[("a", &a), ("b", &b)]).fallback_on([StatusCode::NOT_FOUND]);
    let response = client.oneshot(Request::new(())).await.unwrap();
    assert_eq!(
        (served_by(&response), response.status().as_u16()),
        ("a", 500)
    );
}

#[tokio::test(start_paused = true)]
async fn a_target_that_fails_calls_in_a_row_is_skipped_for_its_cooldown() {
    let metrics = Metrics::new();
    let (a, b) = (
        Scripted::new(Answer::Status(503)),
        Scripted::new(Answer::Status(200)),
    );
    let client = fallback(&[("a", &a), ("b", &b)])
        .cooldown(2, Duration::from_secs(30))
        .meter(metrics.meter());
    let call = || client.clone().oneshot(Request::new(()));
    for _ in 0..2 {
        assert_eq!(served_by(&call().await.unwrap()), "b");
    }
    assert_eq!((a.calls(), b.calls()), (2, 2));
    // Cooling down: skipped.
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(served_by(&call().await.unwrap()), "b");
    assert_eq!((a.calls(), b.calls()), (2, 3));
    let skipped = metrics.snapshot().count(
        STREAM_FALLBACKS,
        &[("from", "a"), ("to", "b"), ("reason", "cooldown")],
    );
    assert_eq!(skipped, 1.0);
    // Tried again after it, fails: skipped again at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(served_by(&call().await.unwrap()), "b");
    assert_eq!((a.calls(), b.calls()), (3, 4));
    assert_eq!(served_by(&call().await.unwrap()), "b");
    assert_eq!((a.calls(), b.calls()), (3, 5));

    // With every target cooling down, the one whose cooldown ends first.
    let (a, b) = (
        Scripted::new(Answer::Status(503)),
        Scripted::new(Answer::Status(503)),
    );
    let client = fallback(&[("a", &a), ("b", &b)]).cooldown(1, Duration::from_secs(30));
    let call = || client.clone().oneshot(Request::new(()));
    call().await.unwrap();
    assert_eq!((a.calls(), b.calls()), (1, 1), "both cool down, a first");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let response = call().await.unwrap();
    assert_eq!((a.calls(), b.calls()), (2, 1), "a's cooldown ends first");
    assert_eq!(
        (served_by(&response), response.status().as_u16()),
        ("a", 503)
    );
    // a tried again (and cooling again), b's ends first now.
    let response = call().await.unwrap();
    assert_eq!((a.calls(), b.calls()), (2, 2));
    assert_eq!(served_by(&response), "b");
}

#[tokio::test(start_paused = true)]
async fn a_success_ends_the_count_and_a_rejection_does_not_count() {
    // Failures, but never two in a row: never cooling down.
    let flaky = Scripted::answering([Answer::Status(503), Answer::Status(200)].repeat(2));
    let backup = Scripted::new(Answer::Status(200));
    let client = fallback(&[("a", &flaky), ("b", &backup)]).cooldown(2, Duration::from_secs(30));
    for expected in ["b", "a", "b", "a"] {
        let response = client.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(served_by(&response), expected);
    }
    assert_eq!((flaky.calls(), backup.calls()), (4, 2));

    // A full limit rejects the call, which goes on, but the target is not cooling down.
    type Limited = BoxCloneSyncService<
        Request<()>,
        Response<crate::concurrency::ResponseBody<Full<Bytes>>>,
        BoxError,
    >;
    let limited = |target: &Scripted| -> Limited {
        let limit = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
        BoxCloneSyncService::new(limit.layer(target.clone()))
    };
    let (a, b) = (
        Scripted::new(Answer::Status(200)),
        Scripted::new(Answer::Status(200)),
    );
    let (limited_a, limited_b) = (limited(&a), limited(&b));
    let held = limited_a.clone().oneshot(Request::new(())).await.unwrap();
    let client = Fallback::new([("a", limited_a), ("b", limited_b)])
        .unwrap()
        .cooldown(1, Duration::from_secs(30));
    let response = client.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(served_by(&response), "b");
    drop((held, response));
    let response = client.oneshot(Request::new(())).await.unwrap();
    assert_eq!(served_by(&response), "a", "no cooldown for a full target");
    assert_eq!((a.calls(), b.calls()), (2, 1));
}

#[test]
fn the_reason_reads_the_whole_error_chain() {
    #[derive(Debug)]
    struct Wrapped(BoxError);
    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }
    let rejected = || -> BoxError { Rejected::queue_full(1).into() };
    let first_chunk = |source| -> BoxError {
        use crate::retry::{FirstChunkErrorKind, StopReason};
        let kind = FirstChunkErrorKind::Upstream;
        FirstChunkError::new(kind, StopReason::AttemptsExhausted, 2, source).into()
    };
    let reason = |error: BoxError| Reason::of(&*error);
    assert_eq!(reason(rejected()), Reason::Rejected);
    assert_eq!(reason(Wrapped(rejected()).into()), Reason::Rejected);
    assert_eq!(reason(first_chunk(Some(rejected()))), Reason::Rejected);
    assert_eq!(reason(first_chunk(None)), Reason::FirstChunk);
    assert_eq!(
        reason(Wrapped(first_chunk(None)).into()),
        Reason::FirstChunk
    );
    assert_eq!(reason(first_chunk(Some(down()))), Reason::FirstChunk);
    assert_eq!(reason(down()), Reason::Error);
    assert_eq!(reason(Wrapped(down()).into()), Reason::Error);
    assert!(!Reason::Rejected.is_failure() && Reason::FirstChunk.is_failure());
}

#[tokio::test]
#[should_panic(expected = "ResponseFuture polled after completion")]
async fn a_response_future_polled_after_its_output_panics() {
    let a = Scripted::new(Answer::Status(200));
    let mut future = std::pin::pin!(fallback(&[("a", &a)]).call(Request::new(())));
    let _ = futures_poll_once(future.as_mut()).await;
    let _ = futures_poll_once(future.as_mut()).await;
}

#[test]
fn debug_shows_the_targets_and_settings_and_the_future_its_target() {
    let (a, b) = (
        Scripted::new(Answer::Status(200)),
        Scripted::new(Answer::Status(200)),
    );
    let mut client = fallback(&[("a", &a), ("b", &b)]).cooldown(3, Duration::from_secs(30));
    let shown = format!("{client:?}");
    assert!(shown.contains(r#"targets: ["a", "b"]"#), "{shown}");
    assert!(shown.contains("[408, 429, 500-599]"), "{shown}");
    assert!(shown.contains("failures: 3"), "{shown}");
    let future = client.call(Request::new(()));
    let shown = format!("{future:?}");
    assert!(shown.contains(r#"target: "a""#), "{shown}");
    assert!(shown.contains("ready"), "{shown}");
}

#[tokio::test]
async fn a_limit_above_holds_one_slot_for_the_call_until_its_stream_ends() {
    let (a, b) = (
        Scripted::new(Answer::Status(503)),
        Scripted::new(Answer::Status(200)),
    );
    let limit = StreamConcurrencyLayer::new(1);
    let client = limit.layer(fallback(&[("a", &a), ("b", &b)]));
    let response = client.oneshot(Request::new(())).await.unwrap();
    assert_eq!(served_by(&response), "b");
    assert_eq!(limit.available_slots(), 0, "held by the body");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "data: x\n\n");
    assert_eq!(limit.available_slots(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_budget_above_deposits_once_and_bounds_every_targets_retries() {
    // Two targets whose streams end before their first chunk, each with a retry layer:
    // three attempts each, if the budget allowed.
    let keepalive = service_fn(|_: Request<Full<Bytes>>| async {
        let response = Response::builder().header("content-type", "text/event-stream");
        Ok::<_, Infallible>(
            response
                .body(Full::new(Bytes::from(": keep-alive\n\n")))
                .unwrap(),
        )
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let counting = {
        let calls = calls.clone();
        tower::ServiceBuilder::new()
            .map_request(move |request: Request<Full<Bytes>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                request
            })
            .service(keepalive)
    };
    let retry = FirstChunkRetryLayer::new(RetryPolicy::default().max_attempts(3));
    let target = retry.layer(counting);
    // One retry per deposit, no reserve: the call's one deposit buys one retry in all.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    let client = RetryBudgetLayer::new(budget.clone())
        .layer(Fallback::new([("a", target.clone()), ("b", target)]).unwrap());
    let error = client
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap_err();
    assert!(error.is::<FirstChunkError>(), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "a: 2 attempts, b: 1");
    assert_eq!(budget.available(), 0);
}

#[tokio::test(start_paused = true)]
async fn nothing_goes_elsewhere_that_the_targets_retry_layer_says_may_have_been_processed() {
    // A 502 may have been processed; a 503 refuses the work.
    for (status, fell_back) in [(502, false), (503, true)] {
        let (primary, backup) = (
            Scripted::new(Answer::Status(status)),
            Scripted::new(Answer::Status(200)),
        );
        let policy = RetryPolicy::default()
            .retry_maybe_processed(false)
            .backoff(Duration::ZERO, Duration::ZERO);
        let layer = FirstChunkRetryLayer::new(policy);
        let client = Fallback::new([
            ("primary", layer.layer(primary.clone())),
            ("backup", layer.layer(backup.clone())),
        ])
        .expect("targets");
        let request = Request::new(Full::<Bytes>::default());
        let response = client.oneshot(request).await.unwrap();
        let at = format!("{status}");
        if fell_back {
            assert_eq!(served_by(&response), "backup", "{at}");
            assert_eq!(
                (primary.calls(), backup.calls()),
                (3, 1),
                "{at}: retried, then moved"
            );
        } else {
            assert_eq!(
                response.status(),
                status,
                "{at}: the primary's answer, as it is"
            );
            assert_eq!(served_by(&response), "primary", "{at}");
            assert_eq!(
                (primary.calls(), backup.calls()),
                (1, 0),
                "{at}: sent once, nowhere else"
            );
        }
    }
}
