//! The `tracing` events an operator sees, with their levels and fields: each retry
//! (INFO), a stall before the first chunk, exhausted attempts and budget, and a
//! rejection (WARN), a caller giving up in the queue (DEBUG); each fallback (INFO), a
//! fallback target cooling down (WARN) and a call skipping it (DEBUG); each hedge
//! (INFO), and a hedge the budget refused (WARN). Time is tokio's paused clock.

mod support;

use std::time::Duration;

use support::events::Recorder;
use support::{Fault, Metrics, Protocol, Reply, Upstream, client, full_stack, post};
use tower::ServiceExt;
use tower_stream_backpressure::retry::Hedge;
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};
use tracing::Level;

fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(2)
        .backoff(Duration::ZERO, Duration::ZERO)
        .first_chunk_timeout(Duration::from_secs(1))
}

#[tokio::test(start_paused = true)]
async fn retries_stalls_and_exhaustion_are_logged() {
    let recorder = Recorder::default();
    let _guard = tracing::subscriber::set_default(recorder.clone());
    // A 503 with a hint, then a stall, then a stall again: a retry after 1 s, two
    // stalls, and attempts exhausted.
    let upstream = Upstream::start(|hit| match (hit.path.as_str(), hit.index) {
        ("/retried", 0) => Reply::status(503).header("retry-after", "1"),
        ("/retried", _) => Reply::tokens(1),
        _ => Reply::faulty(1, Fault::StallBeforeFirst),
    })
    .await;
    let metrics = Metrics::new();
    let stack = full_stack(
        client(Protocol::Http1),
        &metrics.meter(),
        StreamConcurrencyLayer::new(4),
        RetryBudget::default(),
        policy(),
    );

    let response = stack.clone().oneshot(post(&upstream.url("/retried"))).await;
    assert_eq!(response.unwrap().status(), 200);
    assert_eq!(upstream.hits(), 2, "one retry logged, one made");
    let events = recorder.take();
    assert_eq!(events.len(), 1, "{events:?}");
    let retry = &events[0];
    assert_eq!(retry.level, Level::INFO);
    assert_eq!(retry.message, "retrying before the first chunk");
    assert_eq!(retry.field("provider"), "test");
    assert_eq!(retry.field("attempt"), "2");
    assert_eq!(retry.field("reason"), "status");
    assert_eq!(retry.field("delay_ms"), "1000");

    let error = stack.oneshot(post(&upstream.url("/stalls"))).await;
    assert!(error.is_err());
    assert_eq!(upstream.hits(), 4, "two stalled attempts");
    let events = recorder.take();
    let messages: Vec<(Level, &str)> = events
        .iter()
        .map(|e| (e.level, e.message.as_str()))
        .collect();
    assert_eq!(
        messages,
        [
            (
                Level::WARN,
                "stalled: no first chunk within first_chunk_timeout"
            ),
            (Level::INFO, "retrying before the first chunk"),
            (
                Level::WARN,
                "stalled: no first chunk within first_chunk_timeout"
            ),
            (Level::WARN, "attempts exhausted before the first chunk"),
        ]
    );
    assert_eq!(events[0].field("timeout_ms"), "1000");
    assert_eq!(events[1].field("reason"), "timeout");
    assert_eq!(events[3].field("attempts"), "2");
}

#[tokio::test(start_paused = true)]
async fn budget_exhaustion_rejections_and_cancellations_are_logged() {
    let recorder = Recorder::default();
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let upstream = Upstream::start(|hit| match hit.path.as_str() {
        "/held" => Reply::faulty(1, Fault::StallAfter(1)),
        _ => Reply::status(503),
    })
    .await;
    let metrics = Metrics::new();
    let limit = StreamConcurrencyLayer::new(1).max_wait(Duration::from_millis(500));
    let empty = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
    let stack = full_stack(
        client(Protocol::Http1),
        &metrics.meter(),
        limit,
        empty,
        policy(),
    );

    let response = stack.clone().oneshot(post(&upstream.url("/failing"))).await;
    assert_eq!(response.unwrap().status(), 503);
    assert_eq!(upstream.hits(), 1, "no retry after the budget refused");
    let events = recorder.take();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].level, Level::WARN);
    assert_eq!(
        events[0].message,
        "retry budget exhausted: the failure goes back without a retry"
    );
    assert_eq!(events[0].field("reason"), "status");

    // The one slot is held: a call is rejected after max_wait, another gives up.
    let held = stack
        .clone()
        .oneshot(post(&upstream.url("/held")))
        .await
        .unwrap();
    let rejected = stack.clone().oneshot(post(&upstream.url("/queued"))).await;
    assert!(rejected.is_err());
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        stack.oneshot(post(&upstream.url("/q"))),
    )
    .await;
    assert!(gave_up.is_err());
    drop(held);
    assert_eq!(
        upstream.hits(),
        2,
        "the rejected and abandoned calls never reached it"
    );
    let events = recorder.take();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].level, Level::WARN);
    assert_eq!(
        events[0].message,
        "rejected: no concurrency slot within max_wait"
    );
    assert_eq!(events[0].field("limit"), "1");
    assert_eq!(events[0].field("waited_ms"), "500");
    assert_eq!(events[1].level, Level::DEBUG);
    assert_eq!(
        events[1].message,
        "the caller gave up while waiting for a concurrency slot"
    );
    assert_eq!(events[1].field("waited_ms"), "100");
}

#[tokio::test(start_paused = true)]
async fn a_budget_below_the_retry_layer_warns_once() {
    use tower::ServiceBuilder;
    use tower_stream_backpressure::{FirstChunkRetryLayer, RetryBudgetLayer};

    let recorder = Recorder::default();
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let upstream = Upstream::start(|_| Reply::status(503)).await;
    let misordered = ServiceBuilder::new()
        .layer(FirstChunkRetryLayer::new(policy()).provider("test"))
        .layer(RetryBudgetLayer::new(RetryBudget::default()).provider("test"))
        .service(client(Protocol::Http1));
    for _ in 0..3 {
        let response = misordered.clone().oneshot(post(&upstream.url("/"))).await;
        assert_eq!(response.unwrap().status(), 503);
    }
    assert_eq!(upstream.hits(), 6, "three calls, two attempts each");
    let events = recorder.take();
    let misplaced: Vec<_> = events
        .iter()
        .filter(|e| e.message.contains("below the retry layer"))
        .collect();
    assert_eq!(
        misplaced.len(),
        1,
        "once per layer, not per retry: {events:?}"
    );
    assert_eq!(misplaced[0].level, Level::WARN);
    assert_eq!(misplaced[0].field("provider"), "test");
}

#[tokio::test(start_paused = true)]
async fn fallbacks_cooldowns_and_skips_are_logged() {
    use tower_stream_backpressure::fallback::Fallback;

    let recorder = Recorder::default();
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let primary = Upstream::start(|_| Reply::status(500)).await;
    let backup = Upstream::start(|_| Reply::tokens(1)).await;
    let meter = Metrics::new().meter();
    let stack = |upstream: &Upstream| {
        let (limit, budget) = (StreamConcurrencyLayer::new(4), RetryBudget::default());
        let layers = full_stack(client(Protocol::Http1), &meter, limit, budget, policy());
        support::target(&upstream.url(""), layers)
    };
    let down = support::target(&support::closed_url(), client(Protocol::Http1));
    let targets = [
        ("down", down),
        ("primary", stack(&primary)),
        ("backup", stack(&backup)),
    ];
    let fallback = Fallback::new(targets)
        .unwrap()
        .provider("test")
        .cooldown(2, Duration::from_secs(30));
    let call = || fallback.clone().oneshot(post("/v1/chat/completions"));

    call().await.unwrap();
    assert_eq!((primary.hits(), backup.hits()), (1, 1));
    let events = recorder.take();
    assert_eq!(events.len(), 2, "{events:?}");
    for (event, (from, to, reason)) in events.iter().zip([
        ("down", "primary", "error"),
        ("primary", "backup", "status"),
    ]) {
        assert_eq!(event.level, Level::INFO);
        assert_eq!(event.message, "falling back to the next target");
        assert_eq!(event.field("provider"), "test");
        let logged = (event.field("from"), event.field("to"));
        assert_eq!((logged, event.field("reason")), ((from, to), reason));
    }
    assert!(!events[0].field("error").is_empty());
    assert_eq!(events[1].field("status"), "500");

    // Each fails a second call in a row: both cool down, and say so once.
    call().await.unwrap();
    let events = recorder.take();
    let cooling: Vec<_> = events.iter().filter(|e| e.level == Level::WARN).collect();
    assert_eq!(cooling.len(), 2, "{events:?}");
    for (event, target) in cooling.iter().zip(["down", "primary"]) {
        assert_eq!(
            event.message,
            "fallback target failed too many calls in a row: cooling down"
        );
        assert_eq!(event.field("target"), target);
        assert_eq!(event.field("failures"), "2");
        assert_eq!(event.field("cooldown_ms"), "30000");
    }

    // Skipped: one DEBUG, from the first target to the one the call starts at.
    call().await.unwrap();
    assert_eq!((primary.hits(), backup.hits()), (2, 3));
    let events = recorder.take();
    let message = "skipping fallback targets that are cooling down";
    assert!(
        matches!(&events[..], [e] if (e.level, e.message.as_str()) == (Level::DEBUG, message)),
        "{events:?}"
    );
    let skipped = (events[0].field("from"), events[0].field("to"));
    assert_eq!(skipped, ("down", "backup"));
}

#[tokio::test(start_paused = true)]
async fn hedges_and_hedges_refused_by_the_budget_are_logged() {
    let recorder = Recorder::default();
    let _guard = tracing::subscriber::set_default(recorder.clone());
    // The first attempt of each call never answers; the next answers at once.
    let upstream = Upstream::start(|hit| match hit.index {
        0 | 2 => Reply::Hang,
        _ => Reply::tokens(1),
    })
    .await;
    let policy = RetryPolicy::default()
        .hedge(Hedge::after(Duration::from_millis(500)))
        .first_chunk_timeout(Duration::from_secs(1));
    let stack = |budget| {
        full_stack(
            client(Protocol::Http1),
            &Metrics::new().meter(),
            StreamConcurrencyLayer::new(4),
            budget,
            policy.clone(),
        )
    };

    let response = stack(RetryBudget::default())
        .oneshot(post(&upstream.url("/hedged")))
        .await;
    assert_eq!(response.unwrap().status(), 200);
    let events = recorder.take();
    assert_eq!(events.len(), 1, "{events:?}");
    let hedge = &events[0];
    assert_eq!(hedge.level, Level::INFO);
    assert_eq!(
        hedge.message,
        "hedging: no first chunk yet, another attempt starts beside"
    );
    assert_eq!(hedge.field("provider"), "test");
    assert_eq!(hedge.field("attempt"), "2");
    assert_eq!(hedge.field("after_ms"), "500");

    let empty = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
    let error = stack(empty).oneshot(post(&upstream.url("/refused"))).await;
    assert!(
        error.is_err(),
        "the stall times out, with no hedge or retry"
    );
    let events = recorder.take();
    let refused = events
        .iter()
        .find(|e| e.message == "retry budget exhausted: no hedge for this call")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(refused.level, Level::WARN);
    assert_eq!(refused.field("attempt"), "1");
}
