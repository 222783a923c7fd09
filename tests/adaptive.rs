//! The adaptive limit (`StreamConcurrencyLayer::adaptive`) over a real hyper upstream
//! on loopback, both protocols: it moves down on each overload signal an attempt meets
//! (the retry layer below absorbing it or not), up while calls reach it and answer,
//! never past its bounds, and never takes a slot back from a stream. Checked on the
//! upstream's own counts and on the `stream_concurrency_limit` gauge. Time is tokio's
//! paused clock.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::{
    BOTH, Fault, Hit, Metrics, Protocol, Reply, TEST, Upstream, post, read_to_end, settle,
};
use tower::ServiceExt;
use tower_stream_backpressure::concurrency::Adaptive;
use tower_stream_backpressure::metrics::STREAM_CONCURRENCY_LIMIT;
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};

/// No backoff, and a first-chunk timeout of 5 s.
fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .backoff(Duration::ZERO, Duration::ZERO)
        .first_chunk_timeout(Duration::from_secs(5))
}

/// The three layers over a client of `protocol`, under the adaptive `limit`.
fn stack(
    protocol: Protocol,
    metrics: &Metrics,
    limit: &StreamConcurrencyLayer,
) -> impl tower::Service<
    http::Request<http_body_util::Full<bytes::Bytes>>,
    Response = http::Response<
        impl http_body::Body<Data = bytes::Bytes, Error = tower::BoxError> + std::fmt::Debug + use<>,
    >,
    Error = tower::BoxError,
    Future = impl Send + use<>,
> + Clone
+ use<> {
    let budget = RetryBudget::default();
    support::stack_over(protocol, &metrics.meter(), limit.clone(), budget, policy())
}

/// OpenAI's answer to an account whose quota is spent: a limit on spending, not load.
fn quota_spent() -> Reply {
    Reply::Status {
        status: http::StatusCode::TOO_MANY_REQUESTS,
        headers: vec![("content-type", "application/json".into())],
        body: bytes::Bytes::from_static(QUOTA_SPENT),
    }
}

const QUOTA_SPENT: &[u8] = br#"{"error":{"message":"You exceeded your current quota.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;

/// One call under a default adaptive limit to an upstream whose first answer is
/// `failure` and the next a stream: the upstream, the limit and the metrics after it.
async fn after_a_failure(
    protocol: Protocol,
    failure: &Reply,
    at: &str,
) -> (Upstream, StreamConcurrencyLayer, Metrics) {
    let failure = failure.clone();
    let upstream = Upstream::start(move |hit: &Hit| match hit.index {
        0 => failure.clone(),
        _ => Reply::tokens(1),
    })
    .await;
    let metrics = Metrics::new();
    let limit = StreamConcurrencyLayer::adaptive(Adaptive::default());
    let response = stack(protocol, &metrics, &limit)
        .oneshot(post(&upstream.url("/v1/chat/completions")))
        .await
        .unwrap_or_else(|e| panic!("{at}: {e}"));
    read_to_end(response.into_body()).await.unwrap();
    (upstream, limit, metrics)
}

fn gauge(metrics: &Metrics) -> f64 {
    metrics.snapshot().count(STREAM_CONCURRENCY_LIMIT, &[TEST])
}

#[tokio::test(start_paused = true)]
async fn each_overload_signal_moves_the_limit_down_and_other_failures_do_not() {
    // The first attempt of each call meets the failure; the retry answers.
    let cases: [(&str, Reply, bool); 8] = [
        ("429", Reply::status(429), true),
        ("429, the quota spent", quota_spent(), false),
        ("503", Reply::status(503), true),
        ("529", Reply::status(529), true),
        (
            "overloaded in band after 200",
            Reply::chunks(
                "text/event-stream",
                vec![support::upstream::anthropic_overloaded()],
            ),
            true,
        ),
        (
            "a stall before the first chunk",
            Reply::faulty(3, Fault::StallBeforeFirst),
            true,
        ),
        ("502", Reply::status(502), false),
        (
            "a reset before the first chunk",
            Reply::faulty(3, Fault::ResetBeforeFirst),
            false,
        ),
    ];
    for protocol in BOTH {
        for (what, failure, overload) in &cases {
            let at = format!("{what} over {protocol:?}");
            let (upstream, limit, metrics) = after_a_failure(protocol, failure, &at).await;
            assert_eq!(upstream.hits(), 2, "{at}: the failure, then its retry");
            let expected = if *overload { 18 } else { 20 };
            assert_eq!(limit.current_limit(), expected, "{at}");
            assert_eq!(gauge(&metrics), expected as f64, "{at}: the gauge");
            settle().await;
            assert_eq!(limit.available_slots(), expected, "{at}: every slot back");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_http2_refused_stream_is_an_overload_signal() {
    use support::raw_h2::{H2Connection, H2Reply, RawH2};
    // The raw HTTP/2 server refuses the first stream, then answers.
    let server = RawH2::start(
        |_| H2Connection::Serve,
        |index| match index {
            0 => H2Reply::Refuse,
            _ => H2Reply::Events(support::upstream::token_events(1)),
        },
    )
    .await;
    let metrics = Metrics::new();
    let limit = StreamConcurrencyLayer::adaptive(Adaptive::default());
    let response = stack(Protocol::Http2, &metrics, &limit)
        .oneshot(post(&server.url("/v1/chat/completions")))
        .await
        .expect("the retry answered");
    read_to_end(response.into_body()).await.unwrap();
    assert_eq!(server.hits(), 2);
    assert_eq!(limit.current_limit(), 18);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_overload_signals_is_one_decrease() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // Ten calls at once, each first attempt overloaded; the retries answer.
        let upstream = Upstream::start(|hit: &Hit| match hit.index {
            0..10 => Reply::status(503),
            _ => Reply::tokens(1),
        })
        .await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::adaptive(Adaptive::default());
        let service = stack(protocol, &metrics, &limit);
        let calls = (0..10).map(|_| {
            let service = service.clone();
            let url = upstream.url("/v1/chat/completions");
            async move {
                let response = service.oneshot(post(&url)).await.unwrap();
                read_to_end(response.into_body()).await.unwrap();
            }
        });
        join_all(calls).await;
        assert_eq!(upstream.hits(), 20, "{at}");
        assert_eq!(limit.current_limit(), 18, "{at}: one congestion event");
    }
}

/// Runs every future to its end, each in a task of its own.
async fn join_all(futures: impl IntoIterator<Item = impl Future<Output = ()> + Send + 'static>) {
    let mut set = tokio::task::JoinSet::new();
    for future in futures {
        set.spawn(future);
    }
    while let Some(done) = set.join_next().await {
        done.expect("no panic");
    }
}

#[tokio::test(start_paused = true)]
async fn the_limit_grows_while_calls_reach_it_and_answer_and_stays_below_max() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // Each call's first token after 100 ms; the upstream counts its open streams.
        let upstream =
            Upstream::start(|_: &Hit| Reply::tokens(1).gap(Duration::from_millis(100))).await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::adaptive(Adaptive::default().initial(2).max(6));
        let service = stack(protocol, &metrics, &limit);
        // Twelve callers, each making calls one after another for 10 s: more than
        // the limit, so that it is reached.
        let started = tokio::time::Instant::now();
        let calls = Arc::new(AtomicU64::new(0));
        let callers = (0..12).map(|_| {
            let (service, calls) = (service.clone(), calls.clone());
            let url = upstream.url("/v1/chat/completions");
            async move {
                while started.elapsed() < Duration::from_secs(10) {
                    let response = service.clone().oneshot(post(&url)).await.unwrap();
                    read_to_end(response.into_body()).await.unwrap();
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        join_all(callers).await;
        assert_eq!(
            limit.current_limit(),
            6,
            "{at}: grown to max, and not past it"
        );
        assert!(
            upstream.peak_streams() <= 6,
            "{at}: the upstream saw {} at once",
            upstream.peak_streams()
        );
        assert_eq!(upstream.hits(), calls.load(Ordering::Relaxed), "{at}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_shrink_revokes_no_held_slot_and_new_calls_wait_for_the_streams_to_drain() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // `/held`: a token, then a stall; `/overloaded`: 503 once, then the same.
        let overloaded = Arc::new(AtomicU64::new(0));
        let upstream = Upstream::start({
            let overloaded = overloaded.clone();
            move |hit: &Hit| match hit.path.as_str() {
                "/overloaded" if overloaded.fetch_add(1, Ordering::SeqCst) == 0 => {
                    Reply::status(503)
                }
                _ => Reply::faulty(3, Fault::StallAfter(1)),
            }
        })
        .await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::adaptive(Adaptive::default().initial(4));
        let service = stack(protocol, &metrics, &limit);
        let mut held = Vec::new();
        for _ in 0..3 {
            let response = service.clone().oneshot(post(&upstream.url("/held"))).await;
            held.push(response.unwrap().into_body());
        }
        // The fourth call's first attempt is overloaded: the limit goes to 3 while
        // four streams hold slots.
        let response = service
            .clone()
            .oneshot(post(&upstream.url("/overloaded")))
            .await;
        held.push(response.unwrap().into_body());
        assert_eq!(limit.current_limit(), 3, "{at}");
        assert_eq!(limit.available_slots(), 0, "{at}");
        // Every held stream still streams: a first token each.
        for body in &mut held {
            let frame = http_body_util::BodyExt::frame(body).await;
            assert!(
                matches!(frame, Some(Ok(_))),
                "{at}: a held stream lost its slot"
            );
        }
        // A fifth call waits until two streams ended: one pays what the shrink owes.
        let waiting = tokio::spawn(service.clone().oneshot(post(&upstream.url("/held"))));
        settle().await;
        assert!(
            !waiting.is_finished(),
            "{at}: four streams over a limit of 3"
        );
        drop(held.pop());
        settle().await;
        assert!(!waiting.is_finished(), "{at}: three streams, a limit of 3");
        drop(held.pop());
        let fifth = waiting.await.expect("no panic").expect("a slot");
        assert!(upstream.peak_streams() <= 5, "{at}");
        assert_eq!(upstream.open_streams(), 3, "{at}: two held and the fifth");
        drop((held, fifth));
        settle().await;
        assert_eq!(
            limit.available_slots(),
            3,
            "{at}: every slot back, at the new limit"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_refusal_read_for_what_it_says_reaches_the_caller_byte_for_byte() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        let upstream = Upstream::start(|_: &Hit| quota_spent()).await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::adaptive(Adaptive::default());
        let budget = RetryBudget::default();
        let policy = policy().max_attempts(1);
        let service =
            support::stack_over(protocol, &metrics.meter(), limit.clone(), budget, policy);
        let response = service
            .oneshot(post(&upstream.url("/v1/chat/completions")))
            .await
            .unwrap();
        assert_eq!(response.status(), 429, "{at}");
        let body = read_to_end(response.into_body()).await.unwrap();
        assert_eq!(
            &body[..],
            QUOTA_SPENT,
            "{at}: the body as the upstream sent it"
        );
        assert_eq!(limit.current_limit(), 20, "{at}: no overload");
        assert_eq!(upstream.hits(), 1, "{at}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_overload_the_retry_layer_hands_back_unretried_counts_and_an_internal_error_does_not() {
    // A 529 its server says not to retry; an in-band internal error, retried.
    let api_error = Reply::chunks(
        "text/event-stream",
        vec![bytes::Bytes::from_static(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"Internal server error\"}}\n\n",
        )],
    );
    let cases = [
        (
            "529, x-should-retry: false",
            Reply::status(529).header("x-should-retry", "false"),
            1,
            18,
        ),
        ("in-band api_error", api_error, 2, 20),
    ];
    for protocol in BOTH {
        for (what, failure, hits, expected) in &cases {
            let at = format!("{what} over {protocol:?}");
            let (upstream, limit, metrics) = after_a_failure(protocol, failure, &at).await;
            assert_eq!(upstream.hits(), *hits, "{at}");
            assert_eq!(limit.current_limit(), *expected, "{at}");
            assert_eq!(gauge(&metrics), *expected as f64, "{at}: the gauge");
        }
    }
}
