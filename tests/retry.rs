//! FirstChunkRetryLayer and RetryBudgetLayer against a real hyper upstream on loopback,
//! both protocols, checked on the upstream's hit count. Time is tokio's paused clock.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::{
    BOTH, Fault, Metrics, Reply, TEST, Upstream, client, full_stack, post, read_to_end,
    read_until_error,
};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_stream_backpressure::retry::{FirstChunkErrorKind, StopReason};
use tower_stream_backpressure::{
    FirstChunkError, FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};

/// Fails the first `failures` hits with `fault`, then streams 3 tokens.
fn failing_first(failures: u64, fault: Reply) -> impl Fn(&support::Hit) -> Reply + Send + Sync {
    move |hit| {
        if hit.index < failures {
            fault.clone()
        } else {
            Reply::tokens(3)
        }
    }
}

fn first_chunk_error(error: &tower::BoxError) -> &FirstChunkError {
    error
        .downcast_ref::<FirstChunkError>()
        .unwrap_or_else(|| panic!("expected FirstChunkError, got {error}"))
}

const TOKENS_3: &[u8] =
    b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok0 \"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok1 \"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok2 \"}}]}\n\n\
data: [DONE]\n\n";

/// Runs one call through the full stack against `upstream`, with default settings.
async fn one_call(
    protocol: support::Protocol,
    upstream: &Upstream,
    metrics: &Metrics,
    policy: RetryPolicy,
) -> Result<
    http::Response<
        impl http_body::Body<Data = bytes::Bytes, Error = tower::BoxError> + std::fmt::Debug + use<>,
    >,
    tower::BoxError,
> {
    full_stack(
        client(protocol),
        &metrics.meter(),
        StreamConcurrencyLayer::new(4),
        RetryBudget::default(),
        policy,
    )
    .oneshot(post(&upstream.url("/v1/chat/completions")))
    .await
}

#[tokio::test(start_paused = true)]
async fn failures_before_the_first_chunk_are_retried() {
    let faults = [
        ("connection dropped before headers", Reply::DropConnection),
        ("stream reset before headers", Reply::ResetStream),
        (
            "reset after headers",
            Reply::faulty(3, Fault::ResetBeforeFirst).keepalives(2),
        ),
        ("503", Reply::status(503)),
        ("502", Reply::status(502)),
        ("429", Reply::status(429)),
        (
            "200 with only keep-alives, then the end",
            Reply::chunks("text/event-stream", Vec::new()).keepalives(2),
        ),
    ];
    for protocol in BOTH {
        for (name, fault) in &faults {
            let upstream = Upstream::start(failing_first(2, fault.clone())).await;
            let metrics = Metrics::new();
            let response = one_call(protocol, &upstream, &metrics, RetryPolicy::default())
                .await
                .unwrap_or_else(|e| panic!("{protocol:?} {name}: {e}"));
            assert_eq!(response.status(), 200);
            let body = read_to_end(response.into_body()).await.unwrap();
            assert_eq!(
                &body[..],
                TOKENS_3,
                "{protocol:?} {name}: the caller gets the stream intact"
            );
            assert_eq!(
                upstream.hits(),
                3,
                "{protocol:?} {name}: two failures, then success"
            );

            let snapshot = metrics.snapshot();
            let outcome = |o| snapshot.count("stream_retries", &[TEST, ("outcome", o)]);
            assert_eq!(outcome("success"), 1.0, "{protocol:?} {name}");
            assert_eq!(
                outcome("failed"),
                1.0,
                "{protocol:?} {name}: the first retry failed"
            );
            assert_eq!(outcome("exhausted"), 0.0);
            assert_eq!(snapshot.count("provider_calls_in_flight", &[TEST]), 0.0);
            let latency = snapshot
                .histogram("stream_first_chunk_latency", &[TEST])
                .unwrap();
            assert_eq!(latency.count, 1);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stall_before_the_first_chunk_times_out_and_is_retried() {
    for protocol in BOTH {
        // Keep-alives do not count as the first chunk, nor reset the timeout.
        let stall = Reply::faulty(3, Fault::StallBeforeFirst).keepalives(3);
        let upstream = Upstream::start(failing_first(1, stall)).await;
        let metrics = Metrics::new();
        let policy = RetryPolicy::default()
            .first_chunk_timeout(Duration::from_secs(10))
            .backoff(Duration::ZERO, Duration::ZERO);
        let started = Instant::now();
        let response = one_call(protocol, &upstream, &metrics, policy)
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(10), "{protocol:?}");
        assert_eq!(upstream.hits(), 2);
        assert_eq!(
            &read_to_end(response.into_body()).await.unwrap()[..],
            TOKENS_3
        );
        // The stalled stream was abandoned: the upstream saw it closed.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(upstream.open_streams(), 0, "{protocol:?}");
        let latency = metrics
            .snapshot()
            .histogram("stream_first_chunk_latency", &[TEST])
            .unwrap();
        assert!((latency.sum - 10.0).abs() < 0.01, "{latency:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stall_before_headers_times_out_too() {
    for protocol in BOTH {
        let upstream = Upstream::start(failing_first(1, Reply::Hang)).await;
        let policy = RetryPolicy::default()
            .first_chunk_timeout(Duration::from_secs(5))
            .backoff(Duration::ZERO, Duration::ZERO);
        let started = Instant::now();
        let response = one_call(protocol, &upstream, &Metrics::new(), policy)
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(5), "{protocol:?}");
        assert_eq!(upstream.hits(), 2);
        read_to_end(response.into_body()).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_retried_once_the_first_event_reached_the_caller() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::ResetAfter(1))).await;
        let metrics = Metrics::new();
        let response = one_call(protocol, &upstream, &metrics, RetryPolicy::default())
            .await
            .unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(first.starts_with(b"data: {"));
        let error = read_until_error(&mut body).await;
        assert!(error.is::<hyper::Error>(), "{error:?}");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            upstream.hits(),
            1,
            "{protocol:?}: never retried after the first chunk"
        );
        let snapshot = metrics.snapshot();
        assert_eq!(
            snapshot.value("stream_retries", &[TEST, ("outcome", "failed")]),
            None
        );
        assert_eq!(snapshot.count("provider_calls_in_flight", &[TEST]), 0.0);
        assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 0.0);
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let hints = [
        (Reply::status(503).header("retry-after", "5"), 5000),
        (Reply::status(429).header("retry-after", "1.5"), 1500),
        (
            Reply::status(503)
                .header("retry-after-ms", "700")
                .header("retry-after", "9"),
            700,
        ),
    ];
    for protocol in BOTH {
        for (reply, millis) in &hints {
            let upstream = Upstream::start(failing_first(1, reply.clone())).await;
            let started = Instant::now();
            let response = one_call(protocol, &upstream, &Metrics::new(), RetryPolicy::default())
                .await
                .unwrap();
            assert_eq!(
                started.elapsed(),
                Duration::from_millis(*millis),
                "{protocol:?}: waited exactly the hint, no backoff on top"
            );
            assert_eq!(upstream.hits(), 2);
            read_to_end(response.into_body()).await.unwrap();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_hint_above_max_retry_after_returns_the_response() {
    for protocol in BOTH {
        let reply = Reply::status(429).header("retry-after", "3600");
        let upstream = Upstream::start(failing_first(1, reply)).await;
        let started = Instant::now();
        let response = one_call(protocol, &upstream, &Metrics::new(), RetryPolicy::default())
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "3600");
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(upstream.hits(), 1, "{protocol:?}");
        let body = read_to_end(response.into_body()).await.unwrap();
        assert_eq!(&body[..], br#"{"error":{"message":"injected"}}"#);
    }
}

#[tokio::test(start_paused = true)]
async fn other_statuses_go_back_untouched() {
    for protocol in BOTH {
        for status in [400, 401, 404, 500] {
            let upstream = Upstream::start(move |_| Reply::status(status)).await;
            let response = one_call(protocol, &upstream, &Metrics::new(), RetryPolicy::default())
                .await
                .unwrap();
            assert_eq!(response.status(), status);
            assert_eq!(upstream.hits(), 1, "{protocol:?} {status}");
            read_to_end(response.into_body()).await.unwrap();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn when_attempts_run_out_the_last_failure_goes_back() {
    for protocol in BOTH {
        // A retryable status: the response itself.
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let metrics = Metrics::new();
        let response = one_call(protocol, &upstream, &metrics, RetryPolicy::default())
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(upstream.hits(), 3, "{protocol:?}: max_attempts in all");
        drop(response);
        let snapshot = metrics.snapshot();
        let outcome = |o| snapshot.count("stream_retries", &[TEST, ("outcome", o)]);
        assert_eq!(
            (outcome("failed"), outcome("exhausted"), outcome("success")),
            (2.0, 1.0, 0.0)
        );

        // Any other failure: a FirstChunkError saying what and how many attempts.
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::ResetBeforeFirst)).await;
        let error = one_call(
            protocol,
            &upstream,
            &Metrics::new(),
            RetryPolicy::default().max_attempts(4),
        )
        .await
        .unwrap_err();
        let error = first_chunk_error(&error);
        assert_eq!(error.kind(), FirstChunkErrorKind::Body);
        assert_eq!(error.stop_reason(), StopReason::AttemptsExhausted);
        assert_eq!(error.attempts(), 4);
        assert!(std::error::Error::source(error).is_some());
        assert_eq!(upstream.hits(), 4, "{protocol:?}");

        let upstream = Upstream::start(|_| Reply::DropConnection).await;
        let error = one_call(protocol, &upstream, &Metrics::new(), RetryPolicy::default())
            .await
            .unwrap_err();
        assert_eq!(
            first_chunk_error(&error).kind(),
            FirstChunkErrorKind::Upstream,
            "{protocol:?}"
        );
        assert_eq!(upstream.hits(), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn retry_disabled_counts_nothing() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let metrics = Metrics::new();
        let response = one_call(
            protocol,
            &upstream,
            &metrics,
            RetryPolicy::default().max_attempts(1),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(upstream.hits(), 1);
        let snapshot = metrics.snapshot();
        for outcome in ["success", "failed", "exhausted", "budget_exhausted"] {
            assert_eq!(
                snapshot.value("stream_retries", &[TEST, ("outcome", outcome)]),
                None
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_first_event_larger_than_the_buffer_fails_without_retry() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| {
            Reply::chunks(
                "text/event-stream",
                vec![bytes::Bytes::from(format!(
                    "data: {}\n\n",
                    "x".repeat(64 * 1024)
                ))],
            )
        })
        .await;
        let policy = RetryPolicy::default().max_buffer(16 * 1024);
        let error = one_call(protocol, &upstream, &Metrics::new(), policy)
            .await
            .unwrap_err();
        let error = first_chunk_error(&error);
        assert_eq!(error.kind(), FirstChunkErrorKind::BufferLimit);
        assert_eq!(error.stop_reason(), StopReason::NotRetryable);
        assert_eq!(upstream.hits(), 1, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_a_herd_of_failing_calls() {
    const CALLS: u64 = 200;
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let metrics = Metrics::new();
        let budget = RetryBudget::default();
        let service = full_stack(
            client(protocol),
            &metrics.meter(),
            StreamConcurrencyLayer::new(50),
            budget.clone(),
            RetryPolicy::default(),
        );
        let calls: Vec<_> = (0..CALLS)
            .map(|_| {
                let call = service.clone().oneshot(post(&upstream.url("/")));
                tokio::spawn(async move { call.await.map(|r| r.status()) })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), 503);
        }
        // Finagle's rule: retries <= 0.2 * requests + 10/s * 10 s.
        let allowed = CALLS / 5 + 100;
        let hits = upstream.hits();
        assert!(
            (CALLS + 100..=CALLS + allowed).contains(&hits),
            "{protocol:?}: {hits} hits for {CALLS} calls; the budget allows {allowed} retries"
        );
        assert_eq!(budget.available(), 0);
        let snapshot = metrics.snapshot();
        let outcome = |o| snapshot.count("stream_retries", &[TEST, ("outcome", o)]);
        let retries = hits - CALLS;
        assert_eq!(outcome("failed"), retries as f64, "every retry failed");
        // Each call stops once: attempts exhausted, or the budget said no.
        assert_eq!(
            outcome("budget_exhausted") + outcome("exhausted"),
            CALLS as f64
        );
        assert!(outcome("budget_exhausted") > 0.0);
        assert_eq!(
            snapshot.count("stream_retry_budget_available", &[TEST]),
            0.0
        );

        // Without a budget, every call makes max_attempts.
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let service = ServiceBuilder::new()
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .service(client(protocol));
        let calls: Vec<_> = (0..CALLS)
            .map(|_| tokio::spawn(service.clone().oneshot(post(&upstream.url("/")))))
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(upstream.hits(), 3 * CALLS, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_complete_empty_answer_is_sent_once() {
    let empty = |content_type: &'static str| Reply::Status {
        status: http::StatusCode::OK,
        headers: vec![
            ("content-type", content_type.to_owned()),
            ("content-length", "0".to_owned()),
        ],
        body: bytes::Bytes::new(),
    };
    for protocol in BOTH {
        // `Content-Length: 0` on a plain answer: passed through, one hit.
        for content_type in ["application/json", "text/plain"] {
            let upstream = Upstream::start(move |_| empty(content_type)).await;
            let response = one_call(protocol, &upstream, &Metrics::new(), RetryPolicy::default())
                .await
                .unwrap_or_else(|e| panic!("{protocol:?} {content_type}: {e}"));
            assert_eq!(response.status(), 200);
            assert_eq!(upstream.hits(), 1, "{protocol:?} {content_type}");
            assert!(read_to_end(response.into_body()).await.unwrap().is_empty());
        }
        // A stream format expects an event: the empty body is retried, as before.
        let upstream = Upstream::start(move |_| empty("text/event-stream")).await;
        let error = one_call(protocol, &upstream, &Metrics::new(), RetryPolicy::default())
            .await
            .unwrap_err();
        assert_eq!(
            first_chunk_error(&error).kind(),
            FirstChunkErrorKind::EndOfStream
        );
        assert_eq!(upstream.hits(), 3, "{protocol:?}");
    }
}

/// No reserve, one retry per deposit: what a budget allows is what it was given.
fn one_retry_per_deposit() -> RetryBudget {
    RetryBudget::new(Duration::from_secs(10), 0, 1.0)
}

#[tokio::test(start_paused = true)]
async fn one_budget_in_two_layers_deposits_once_per_call() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let budget = one_retry_per_deposit();
        let service = ServiceBuilder::new()
            .layer(RetryBudgetLayer::new(budget.clone()))
            .layer(RetryBudgetLayer::new(budget.clone()))
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .service(client(protocol));
        let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
        assert_eq!(response.status(), 503);
        // Two deposits would have bought a second retry: three hits.
        assert_eq!(upstream.hits(), 2, "{protocol:?}: one deposit, one retry");
        assert_eq!(budget.available(), 0, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn nested_budgets_each_deposit_once_and_each_bounds_the_retries() {
    for protocol in BOTH {
        let stack = |outer: &RetryBudget, inner: &RetryBudget| {
            ServiceBuilder::new()
                .layer(RetryBudgetLayer::new(outer.clone()))
                .layer(RetryBudgetLayer::new(inner.clone()))
                .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
                .service(client(protocol))
        };
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let url = upstream.url("/");

        // The outer budget (say, one for every provider) allows no retry: none is made,
        // however generous the inner one is.
        let (outer, inner) = (
            RetryBudget::new(Duration::from_secs(10), 0, 0.0),
            one_retry_per_deposit(),
        );
        let response = stack(&outer, &inner).oneshot(post(&url)).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(upstream.hits(), 1, "{protocol:?}: the outer budget refused");
        assert_eq!(
            inner.available(),
            1,
            "{protocol:?}: the inner one deposited, untouched"
        );

        // The other way round: the outer budget's unit is given back when the inner
        // one refuses.
        let (outer, inner) = (
            one_retry_per_deposit(),
            RetryBudget::new(Duration::from_secs(10), 0, 0.0),
        );
        stack(&outer, &inner).oneshot(post(&url)).await.unwrap();
        assert_eq!(upstream.hits(), 2, "{protocol:?}: the inner budget refused");
        assert_eq!(
            outer.available(),
            1,
            "{protocol:?}: nothing taken from the outer one"
        );

        // Both allow one: one retry, taken from both.
        let (outer, inner) = (one_retry_per_deposit(), one_retry_per_deposit());
        stack(&outer, &inner).oneshot(post(&url)).await.unwrap();
        assert_eq!(upstream.hits(), 4, "{protocol:?}: one retry");
        assert_eq!(
            (outer.available(), inner.available()),
            (0, 0),
            "{protocol:?}: one deposit and one withdrawal in each"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_budget_below_the_retry_layer_deposits_once_per_call() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let url = upstream.url("/");
        let budget = one_retry_per_deposit();
        // The wrong order: every attempt passes through the budget layer.
        let misordered = ServiceBuilder::new()
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .layer(RetryBudgetLayer::new(budget.clone()))
            .service(client(protocol));
        misordered.oneshot(post(&url)).await.unwrap();
        assert_eq!(
            upstream.hits(),
            3,
            "{protocol:?}: no budget above, max_attempts"
        );

        // A well-ordered stack sharing the budget draws on what the call deposited:
        // its own deposit and the misordered call's, one retry each.
        let ordered = ServiceBuilder::new()
            .layer(RetryBudgetLayer::new(budget.clone()))
            .layer(FirstChunkRetryLayer::new(
                RetryPolicy::default().max_attempts(10),
            ))
            .service(client(protocol));
        ordered.oneshot(post(&url)).await.unwrap();
        assert_eq!(
            upstream.hits(),
            3 + 3,
            "{protocol:?}: two retries; one deposit per attempt would have bought four"
        );
        assert_eq!(budget.available(), 0, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_budget_reaches_the_retry_layer_directly_or_through_a_buffer() {
    use std::sync::{Arc, Mutex};
    const CALLS: u64 = 3;
    for protocol in BOTH {
        // Directly: the retry layer runs within the budget layer's call. What the
        // extensions held between the two layers is noted for each call.
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let budget = one_retry_per_deposit();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let noted = seen.clone();
        let direct = ServiceBuilder::new()
            .layer(RetryBudgetLayer::new(budget.clone()))
            .map_request(move |request: http::Request<_>| {
                let carried = request.extensions().get::<RetryBudget>().is_some();
                noted.lock().unwrap().push(carried);
                request
            })
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .service(client(protocol));
        for _ in 0..CALLS {
            let response = direct.clone().oneshot(post(&upstream.url("/"))).await;
            assert_eq!(response.unwrap().status(), 503);
        }
        // One deposit, so one retry, per call: without the budget, three attempts each.
        assert_eq!(upstream.hits(), 2 * CALLS, "{protocol:?}");
        assert_eq!(budget.available(), 0, "{protocol:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            [true, false, false],
            "{protocol:?}: the extensions until the retry layer was seen to take it"
        );

        // Through a buffer, whose worker calls the retry layer on another task: the
        // extensions carry it on every call.
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let budget = one_retry_per_deposit();
        let buffered = ServiceBuilder::new()
            .layer(RetryBudgetLayer::new(budget.clone()))
            .buffer(8)
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .service(client(protocol));
        for _ in 0..CALLS {
            let response = buffered.clone().oneshot(post(&upstream.url("/"))).await;
            assert_eq!(response.unwrap().status(), 503);
        }
        assert_eq!(
            upstream.hits(),
            2 * CALLS,
            "{protocol:?}: through the buffer"
        );
        assert_eq!(budget.available(), 0, "{protocol:?}: through the buffer");
    }
}
