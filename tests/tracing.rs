//! The `tracing` events an operator sees, with their levels and fields: each retry
//! (INFO), a stall before the first chunk, exhausted attempts and budget, and a
//! rejection (WARN), a caller giving up in the queue (DEBUG); each fallback (INFO), a
//! fallback target cooling down (WARN) and a call skipping it (DEBUG); each hedge
//! (INFO), and a hedge the budget refused (WARN). Time is tokio's paused clock.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Fault, Metrics, Protocol, Reply, Upstream, client, full_stack, post};
use tower::ServiceExt;
use tower_stream_backpressure::retry::Hedge;
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One event as recorded: level, message and the other fields, as text.
#[derive(Debug, Clone)]
struct Seen {
    level: Level,
    message: String,
    fields: BTreeMap<String, String>,
}

/// A subscriber that keeps every event of this crate.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Fields<'a>(&'a mut Seen);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.0.message = text;
        } else {
            self.0
                .fields
                .insert(field.name().to_owned(), text.trim_matches('"').to_owned());
        }
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("tower_stream_backpressure")
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut seen = Seen {
            level: *event.metadata().level(),
            message: String::new(),
            fields: BTreeMap::new(),
        };
        event.record(&mut Fields(&mut seen));
        self.0.lock().unwrap().push(seen);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn field<'a>(event: &'a Seen, name: &str) -> &'a str {
    event
        .fields
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {event:?}"))
}

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
    assert_eq!(field(retry, "provider"), "test");
    assert_eq!(field(retry, "attempt"), "2");
    assert_eq!(field(retry, "reason"), "status");
    assert_eq!(field(retry, "delay_ms"), "1000");

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
    assert_eq!(field(&events[0], "timeout_ms"), "1000");
    assert_eq!(field(&events[1], "reason"), "timeout");
    assert_eq!(field(&events[3], "attempts"), "2");
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
    assert_eq!(field(&events[0], "reason"), "status");

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
    assert_eq!(field(&events[0], "limit"), "1");
    assert_eq!(field(&events[0], "waited_ms"), "500");
    assert_eq!(events[1].level, Level::DEBUG);
    assert_eq!(
        events[1].message,
        "the caller gave up while waiting for a concurrency slot"
    );
    assert_eq!(field(&events[1], "waited_ms"), "100");
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
    assert_eq!(field(misplaced[0], "provider"), "test");
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
        assert_eq!(field(event, "provider"), "test");
        let logged = (field(event, "from"), field(event, "to"));
        assert_eq!((logged, field(event, "reason")), ((from, to), reason));
    }
    assert!(!field(&events[0], "error").is_empty());
    assert_eq!(field(&events[1], "status"), "500");

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
        assert_eq!(field(event, "target"), target);
        assert_eq!(field(event, "failures"), "2");
        assert_eq!(field(event, "cooldown_ms"), "30000");
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
    let skipped = (field(&events[0], "from"), field(&events[0], "to"));
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
    assert_eq!(field(hedge, "provider"), "test");
    assert_eq!(field(hedge, "attempt"), "2");
    assert_eq!(field(hedge, "after_ms"), "500");

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
    assert_eq!(field(refused, "attempt"), "1");
}
