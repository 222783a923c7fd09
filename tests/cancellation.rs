//! A caller that gives up at every await point of the stack, and a body dropped after
//! each frame, against a real upstream on loopback over both protocols. After each:
//! every concurrency slot is back, every gauge is at zero, the budget holds exactly
//! what its formula says, the upstream saw the stream close, and no task is left
//! running. Time is tokio's paused clock.

mod support;

use std::time::Duration;

use support::{
    Fault, GiveUp, Metrics, Protocol, Reply, TEST, Upstream, client, full_stack, post, settle,
};
use tower::ServiceExt;
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};

/// Where the caller gives up.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// Queued for a concurrency slot that another call holds.
    WaitingForSlot,
    /// Inside the inner call: the upstream has not answered.
    InnerCall,
    /// Headers arrived; reading the body for the first chunk.
    ReadingFirstChunk,
    /// The first attempt failed (`503`, no hint); waiting out the backoff.
    Backoff,
    /// The first attempt got `503` with `Retry-After: 10`; waiting for it.
    RetryAfter,
    /// The response arrived; the body is dropped after this many frames.
    BodyAfterFrames(usize),
}

const POINTS: [Point; 10] = [
    Point::WaitingForSlot,
    Point::InnerCall,
    Point::ReadingFirstChunk,
    Point::Backoff,
    Point::RetryAfter,
    Point::BodyAfterFrames(0),
    Point::BodyAfterFrames(1),
    Point::BodyAfterFrames(2),
    Point::BodyAfterFrames(3),
    Point::BodyAfterFrames(4),
];

const LIMIT: usize = 2;
/// Calls deposited before the test's own: 2 retries' worth.
const PRIMED: u64 = 4;

/// Half a retry per call and no reserve, over a window longer than the test.
fn budget() -> RetryBudget {
    let budget = RetryBudget::new(Duration::from_secs(60), 0, 0.5);
    for _ in 0..PRIMED {
        budget.deposit();
    }
    budget
}

/// What the upstream does, per path: `/held` is the stream that fills the limit.
fn script(point: Point) -> impl Fn(&support::Hit) -> Reply + Send + Sync + 'static {
    move |hit| match (hit.path.as_str(), point) {
        ("/held", _) => Reply::faulty(3, Fault::StallAfter(1)),
        (_, Point::WaitingForSlot) => Reply::tokens(3),
        (_, Point::InnerCall) => Reply::Hang,
        (_, Point::ReadingFirstChunk) => Reply::faulty(3, Fault::StallBeforeFirst),
        (_, Point::Backoff) => match hit.index {
            0 => Reply::status(503),
            _ => Reply::Hang,
        },
        (_, Point::RetryAfter) => match hit.index {
            0 => Reply::status(503).header("retry-after", "10"),
            _ => Reply::Hang,
        },
        // Four frames: three events and `data: [DONE]`, apart in time.
        (_, Point::BodyAfterFrames(_)) => Reply::tokens(3).gap(Duration::from_millis(10)),
    }
}

#[tokio::test(start_paused = true)]
async fn giving_up_at_any_point_leaves_nothing_behind() {
    support::at_every_point(&POINTS, check).await;
}

async fn check(protocol: Protocol, point: Point) {
    let at = format!("{point:?} over {protocol:?}");
    let upstream = Upstream::start(script(point)).await;
    let metrics = Metrics::new();
    let limit = StreamConcurrencyLayer::new(LIMIT);
    let budget = budget();
    let policy = RetryPolicy::default()
        .backoff(Duration::from_secs(30), Duration::from_secs(30))
        .first_chunk_timeout(Duration::from_secs(60));
    let stack = full_stack(
        client(protocol),
        &metrics.meter(),
        limit.clone(),
        budget.clone(),
        policy,
    );
    let tasks_before = support::alive_tasks();

    // For the queue: two calls hold both slots.
    let mut held = Vec::new();
    if let Point::WaitingForSlot = point {
        for _ in 0..LIMIT {
            let response = stack.clone().oneshot(post(&upstream.url("/held"))).await;
            held.push(response.expect("a held stream"));
        }
        assert_eq!(limit.available_slots(), 0, "{at}");
    }

    let call = stack.clone().oneshot(post(&upstream.url("/call")));
    // Give up after 5 s: in the queue, in the call, reading, or waiting to retry (the
    // 503 comes at once; the seeded backoff is longer); or after reading frames.
    let how = match point {
        Point::BodyAfterFrames(frames) => GiveUp::BodyAfterFrames(frames),
        _ => GiveUp::Waiting,
    };
    support::give_up(call, how, &at).await;
    let hits_at_give_up = upstream.hits();
    let expected_hits = match point {
        Point::WaitingForSlot => LIMIT as u64,
        _ => 1,
    };
    assert_eq!(
        hits_at_give_up, expected_hits,
        "{at}: hits when the caller gave up"
    );
    drop(held);
    settle().await;

    // Nothing is held: slots, gauges, the upstream's open streams.
    assert_eq!(limit.available_slots(), LIMIT, "{at}: slots");
    support::assert_nothing_in_flight(&metrics, &at);
    assert_eq!(upstream.open_streams(), 0, "{at}: upstream open streams");
    // Nothing was tried after the caller left.
    assert_eq!(
        upstream.hits(),
        hits_at_give_up,
        "{at}: hits after giving up"
    );

    // The budget: half a retry per call deposited. A retry decided before the
    // caller left stays withdrawn.
    let calls = PRIMED
        + 1
        + if let Point::WaitingForSlot = point {
            LIMIT as u64
        } else {
            0
        };
    let withdrawn = match point {
        Point::Backoff | Point::RetryAfter => 1,
        _ => 0,
    };
    assert_eq!(budget.available(), calls / 2 - withdrawn, "{at}: budget");
    let canceled = metrics.snapshot().count(
        "stream_concurrency_rejections",
        &[TEST, ("reason", "context_canceled")],
    );
    let expected_canceled = if let Point::WaitingForSlot = point {
        1.0
    } else {
        0.0
    };
    assert_eq!(canceled, expected_canceled, "{at}");

    // The layers never spawn: whatever ran for the call has ended.
    drop(stack);
    support::assert_no_task_left(tasks_before, &at).await;
}
