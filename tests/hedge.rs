//! Hedged attempts (`RetryPolicy::hedge`) against a real hyper upstream on loopback,
//! both protocols, checked on the upstream's own counts: requests received and
//! responses still open. Time is tokio's paused clock.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::{
    BOTH, Fault, GiveUp, Hit, Metrics, Protocol, Reply, TEST, Upstream, post, read_to_end, settle,
};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_stream_backpressure::retry::{FirstChunkErrorKind, Hedge, StopReason};
use tower_stream_backpressure::{
    FirstChunkError, RetryBudget, RetryPolicy, StreamConcurrencyLayer,
};

const LIMIT: usize = 2;

/// Three tokens and `data: [DONE]`, as `Reply::tokens(3)` sends them.
const TOKENS_3: &[u8] =
    b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok0 \"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok1 \"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok2 \"}}]}\n\n\
data: [DONE]\n\n";

/// A hedge after 1 s, no backoff, and a first-chunk timeout long enough to stay out
/// of the way unless a test sets its own.
fn hedged() -> RetryPolicy {
    RetryPolicy::default()
        .hedge(Hedge::after(Duration::from_secs(1)))
        .backoff(Duration::ZERO, Duration::ZERO)
        .first_chunk_timeout(Duration::from_secs(60))
}

/// Answers hit `n` with `replies[n]`, and later hits with the last.
fn in_turn(replies: Vec<Reply>) -> impl Fn(&Hit) -> Reply + Send + Sync + 'static {
    move |hit| {
        let index = (hit.index as usize).min(replies.len() - 1);
        replies[index].clone()
    }
}

/// One caller's view of a stack: the metrics it records and its limit.
struct Stack {
    metrics: Metrics,
    limit: StreamConcurrencyLayer,
}

impl Stack {
    fn new() -> Self {
        Self {
            metrics: Metrics::new(),
            limit: StreamConcurrencyLayer::new(LIMIT),
        }
    }

    /// The whole stack over `protocol`, with `budget` and `policy`.
    fn service(
        &self,
        protocol: Protocol,
        budget: RetryBudget,
        policy: RetryPolicy,
    ) -> impl tower::Service<
        http::Request<http_body_util::Full<bytes::Bytes>>,
        Response = http::Response<
            impl http_body::Body<Data = bytes::Bytes, Error = tower::BoxError> + std::fmt::Debug + use<>,
        >,
        Error = tower::BoxError,
        Future = impl Send + use<>,
    > + Clone
    + use<> {
        let meter = self.metrics.meter();
        support::stack_over(protocol, &meter, self.limit.clone(), budget, policy)
    }

    fn hedges(&self, outcome: &str) -> f64 {
        let snapshot = self.metrics.snapshot();
        snapshot.count("stream_hedges", &[TEST, ("outcome", outcome)])
    }

    /// One call to `upstream` through the whole stack: its outcome, and how long it
    /// took to come.
    async fn call(
        &self,
        protocol: Protocol,
        upstream: &Upstream,
        budget: RetryBudget,
        policy: RetryPolicy,
    ) -> (
        Result<
            http::Response<
                impl http_body::Body<Data = bytes::Bytes, Error = tower::BoxError>
                + std::fmt::Debug
                + use<>,
            >,
            tower::BoxError,
        >,
        Duration,
    ) {
        let started = Instant::now();
        let service = self.service(protocol, budget, policy);
        let outcome = service
            .oneshot(post(&upstream.url("/v1/chat/completions")))
            .await;
        (outcome, started.elapsed())
    }

    /// Once what a call left has settled: nothing open on the upstream, every slot
    /// back, and nothing counted in flight.
    async fn assert_all_closed(&self, upstream: &Upstream, at: &str) {
        settle().await;
        assert_eq!(upstream.open_streams(), 0, "{at}: upstream open streams");
        assert_eq!(self.limit.available_slots(), LIMIT, "{at}: slots");
        support::assert_nothing_in_flight(&self.metrics, at);
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_wins_over_a_stalled_attempt_whose_stream_is_closed_at_once() {
    let stalls = [
        ("no answer", Reply::Hang),
        (
            "headers, then only keep-alives",
            Reply::faulty(3, Fault::StallBeforeFirst).keepalives(2),
        ),
    ];
    for protocol in BOTH {
        for (name, stall) in &stalls {
            let at = format!("{name} over {protocol:?}");
            // The hedge's tokens 2 s apart: its stream is still open while the
            // stalled one is seen closed.
            let hedge = Reply::tokens(3).gap(Duration::from_secs(2));
            let upstream = Upstream::start(in_turn(vec![stall.clone(), hedge])).await;
            let stack = Stack::new();
            let (response, waited) = stack
                .call(protocol, &upstream, RetryBudget::default(), hedged())
                .await;
            let response = response.unwrap_or_else(|e| panic!("{at}: {e}"));
            assert!(
                waited >= Duration::from_secs(3) && waited < Duration::from_millis(3_100),
                "{at}: the hedge, started after 1 s, answered 2 s later, not {waited:?}"
            );
            assert_eq!(
                upstream.hits(),
                2,
                "{at}: the stalled attempt and the hedge"
            );
            settle().await;
            assert_eq!(
                upstream.open_streams(),
                1,
                "{at}: the stalled stream was closed once the hedge won, before the body was read"
            );
            let body = read_to_end(response.into_body()).await.unwrap();
            assert_eq!(&body[..], TOKENS_3, "{at}: the hedge's stream, intact");
            assert_eq!(stack.hedges("won"), 1.0, "{at}");
            assert_eq!(stack.hedges("lost"), 0.0, "{at}");
            stack.assert_all_closed(&upstream, &at).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_original_wins_when_its_first_chunk_comes_before_the_hedges() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // The first token after 1.5 s; the hedge, started at 1 s, never answers.
        let first = Reply::tokens(3).gap(Duration::from_millis(1_500));
        let upstream = Upstream::start(in_turn(vec![first, Reply::Hang])).await;
        let stack = Stack::new();
        let (response, waited) = stack
            .call(protocol, &upstream, RetryBudget::default(), hedged())
            .await;
        let response = response.unwrap();
        assert!(waited >= Duration::from_millis(1_500), "{at}");
        assert_eq!(upstream.hits(), 2, "{at}");
        settle().await;
        assert_eq!(upstream.open_streams(), 1, "{at}: the hedge was closed");
        assert_eq!(stack.hedges("lost"), 1.0, "{at}");
        assert_eq!(stack.hedges("won"), 0.0, "{at}");
        drop(response);
        stack.assert_all_closed(&upstream, &at).await;
    }
}

#[tokio::test(start_paused = true)]
async fn no_hedge_starts_once_the_first_chunk_reached_the_caller() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // One token at once, then nothing, ever.
        let upstream = Upstream::start(|_: &Hit| Reply::faulty(3, Fault::StallAfter(1))).await;
        let stack = Stack::new();
        let (response, _) = stack
            .call(protocol, &upstream, RetryBudget::default(), hedged())
            .await;
        let mut body = response.unwrap().into_body();
        let first = http_body_util::BodyExt::frame(&mut body).await;
        assert!(matches!(first, Some(Ok(_))), "{at}: the first token");
        // Long past the hedge's delay, the stream still stalled.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(upstream.hits(), 1, "{at}: no hedge after the first chunk");
        assert_eq!(stack.hedges("won") + stack.hedges("lost"), 0.0, "{at}");
        drop(body);
        stack.assert_all_closed(&upstream, &at).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_budget_of_zero_means_no_hedge() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        let upstream = Upstream::start(|_: &Hit| Reply::faulty(3, Fault::StallBeforeFirst)).await;
        let stack = Stack::new();
        // No reserve and no share of calls: it refuses every withdrawal.
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
        let policy = hedged().first_chunk_timeout(Duration::from_secs(5));
        let (outcome, _) = stack.call(protocol, &upstream, budget, policy).await;
        let error = outcome.expect_err("the stall times out, and no retry either");
        let error = error
            .downcast_ref::<FirstChunkError>()
            .expect("a first-chunk error");
        assert_eq!(error.kind(), FirstChunkErrorKind::Timeout, "{at}");
        assert_eq!(error.stop_reason(), StopReason::BudgetExhausted, "{at}");
        assert_eq!(upstream.hits(), 1, "{at}: neither a hedge nor a retry");
        assert_eq!(stack.hedges("budget_exhausted"), 1.0, "{at}");
        assert_eq!(stack.hedges("won") + stack.hedges("lost"), 0.0, "{at}");
        stack.assert_all_closed(&upstream, &at).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_fails_beside_a_hedge_is_retried_without_ending_the_call() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // The first attempt stalls until its timeout at 3 s; the hedge (at 1 s) is
        // slow, its first token at 11 s; the retry of the first answers at once.
        let slow = Reply::tokens(3).gap(Duration::from_secs(10));
        let upstream = Upstream::start(in_turn(vec![Reply::Hang, slow, Reply::tokens(3)])).await;
        let stack = Stack::new();
        let policy = hedged().first_chunk_timeout(Duration::from_secs(3));
        let (response, waited) = stack
            .call(protocol, &upstream, RetryBudget::default(), policy)
            .await;
        let response = response.unwrap();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_millis(3_100),
            "{at}: the retry answered right after the timeout, not {waited:?}"
        );
        assert_eq!(upstream.hits(), 3, "{at}");
        let body = read_to_end(response.into_body()).await.unwrap();
        assert_eq!(&body[..], TOKENS_3, "{at}");
        let snapshot = stack.metrics.snapshot();
        let retries = |outcome| {
            snapshot.count(
                "stream_retries",
                &[TEST, ("outcome", outcome), ("reason", "timeout")],
            )
        };
        assert_eq!(retries("success"), 1.0, "{at}: the retry delivered");
        assert_eq!(stack.hedges("lost"), 1.0, "{at}: the hedge was dropped");
        stack.assert_all_closed(&upstream, &at).await;
    }
}

#[tokio::test(start_paused = true)]
async fn hedges_count_against_max_attempts() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        let upstream = Upstream::start(|_: &Hit| Reply::Hang).await;
        let stack = Stack::new();
        let policy = hedged()
            .max_attempts(2)
            .first_chunk_timeout(Duration::from_secs(5));
        let (outcome, waited) = stack
            .call(protocol, &upstream, RetryBudget::default(), policy)
            .await;
        let error = outcome.expect_err("both attempts stall");
        // The call waits for the hedge's own timeout, 5 s after it started at 1 s.
        assert!(waited >= Duration::from_secs(6), "{at}");
        let error = error
            .downcast_ref::<FirstChunkError>()
            .expect("a first-chunk error");
        assert_eq!(error.kind(), FirstChunkErrorKind::Timeout, "{at}");
        assert_eq!(error.stop_reason(), StopReason::AttemptsExhausted, "{at}");
        assert_eq!(error.attempts(), 2, "{at}");
        assert_eq!(upstream.hits(), 2, "{at}: the first attempt and one hedge");
        let snapshot = stack.metrics.snapshot();
        let exhausted = snapshot.count(
            "stream_retries",
            &[TEST, ("outcome", "exhausted"), ("reason", "timeout")],
        );
        assert_eq!(exhausted, 1.0, "{at}: the call gave up once");
        stack.assert_all_closed(&upstream, &at).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_percentile_delay_follows_a_shifting_latency() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // Every attempt's first token comes after `latency` ms.
        let latency = Arc::new(AtomicU64::new(200));
        let upstream = Upstream::start({
            let latency = latency.clone();
            move |_: &Hit| {
                Reply::tokens(1).gap(Duration::from_millis(latency.load(Ordering::SeqCst)))
            }
        })
        .await;
        let stack = Stack::new();
        let hedge = Hedge::percentile(0.9)
            .min_samples(10)
            .window(Duration::from_secs(10));
        let policy = RetryPolicy::default().hedge(hedge);
        let service = stack.service(protocol, RetryBudget::default(), policy);
        let started = Instant::now();
        // Calls one after another until `until` after the start: calls and hits.
        let run = async |until: u64| {
            let (calls, hits) = (0, upstream.hits());
            let mut calls = calls;
            while started.elapsed() < Duration::from_secs(until) {
                let response = service
                    .clone()
                    .oneshot(post(&upstream.url("/v1/chat/completions")))
                    .await
                    .unwrap();
                read_to_end(response.into_body()).await.unwrap();
                calls += 1;
            }
            (calls, upstream.hits() - hits)
        };
        // The first window: nothing measured before it, so no hedge.
        let (calls, hits) = run(10).await;
        assert!(calls >= 10, "{at}: {calls} calls");
        assert_eq!(hits, calls, "{at}: no hedge without a full window");
        // Slower now: the delay, from the first window (about 200 ms), hedges every call.
        latency.store(1_000, Ordering::SeqCst);
        let (calls, hits) = run(20).await;
        assert!(calls >= 5, "{at}: {calls} calls");
        assert_eq!(
            hits,
            2 * calls,
            "{at}: every call hedged after about 200 ms"
        );
        // The delay followed, to about 1 s: calls of 1 s are no longer hedged.
        let (calls, hits) = run(30).await;
        assert!(calls >= 5, "{at}: {calls} calls");
        assert_eq!(hits, calls, "{at}: no hedge once the delay followed");
        assert_eq!(
            stack.hedges("won"),
            0.0,
            "{at}: the originals answered first"
        );
        stack.assert_all_closed(&upstream, &at).await;
    }
}

/// Where a caller gives up on a hedged call.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// The first attempt in flight, before the hedge's delay.
    BeforeHedge,
    /// Both attempts in flight, neither answered.
    BothCalling,
    /// Both attempts answered with headers; reading both for the first chunk.
    BothReading,
    /// The hedge failed (`503`) beside the first attempt; its retry waits out the
    /// backoff.
    RetryBesideAttempt,
    /// The hedge won; its body is dropped after this many frames.
    BodyAfterFrames(usize),
}

const POINTS: [Point; 6] = [
    Point::BeforeHedge,
    Point::BothCalling,
    Point::BothReading,
    Point::RetryBesideAttempt,
    Point::BodyAfterFrames(0),
    Point::BodyAfterFrames(2),
];

/// Calls deposited before the test's own: half a retry each, so 2 to withdraw.
const PRIMED: u64 = 4;

#[tokio::test(start_paused = true)]
async fn giving_up_at_any_point_of_a_hedged_call_leaves_nothing_behind() {
    support::at_every_point(&POINTS, check).await;
}

async fn check(protocol: Protocol, point: Point) {
    let at = format!("{point:?} over {protocol:?}");
    let stall = Reply::faulty(3, Fault::StallBeforeFirst);
    let replies = match point {
        Point::BeforeHedge | Point::BothCalling => vec![Reply::Hang],
        Point::BothReading => vec![stall],
        Point::RetryBesideAttempt => vec![Reply::Hang, Reply::status(503), Reply::Hang],
        Point::BodyAfterFrames(_) => {
            vec![Reply::Hang, Reply::tokens(3).gap(Duration::from_millis(10))]
        }
    };
    let upstream = Upstream::start(in_turn(replies)).await;
    let stack = Stack::new();
    let budget = RetryBudget::new(Duration::from_secs(60), 0, 0.5);
    for _ in 0..PRIMED {
        budget.deposit();
    }
    let after = match point {
        Point::BeforeHedge => Duration::from_secs(10),
        _ => Duration::from_secs(1),
    };
    let policy = RetryPolicy::default()
        .hedge(Hedge::after(after))
        .backoff(Duration::from_secs(30), Duration::from_secs(30))
        .first_chunk_timeout(Duration::from_secs(60));
    fastrand::seed(7);
    let service = stack.service(protocol, budget.clone(), policy);
    let tasks_before = support::alive_tasks();

    let call = service
        .clone()
        .oneshot(post(&upstream.url("/v1/chat/completions")));
    let how = match point {
        Point::BodyAfterFrames(frames) => GiveUp::BodyAfterFrames(frames),
        _ => GiveUp::Waiting,
    };
    support::give_up(call, how, &at).await;
    let hits_at_give_up = upstream.hits();
    let expected_hits = match point {
        Point::BeforeHedge => 1,
        _ => 2,
    };
    assert_eq!(
        hits_at_give_up, expected_hits,
        "{at}: hits when the caller gave up"
    );
    stack.assert_all_closed(&upstream, &at).await;
    assert_eq!(
        upstream.hits(),
        hits_at_give_up,
        "{at}: hits after giving up"
    );
    // The budget: the hedge withdrew one unit, and the retry decided before the
    // caller left one more.
    let withdrawn = match point {
        Point::BeforeHedge => 0,
        Point::RetryBesideAttempt => 2,
        _ => 1,
    };
    let calls = PRIMED + 1;
    assert_eq!(budget.available(), calls / 2 - withdrawn, "{at}: budget");
    // Every hedge that started is counted once.
    let (won, lost) = match point {
        Point::BeforeHedge => (0.0, 0.0),
        Point::BodyAfterFrames(_) => (1.0, 0.0),
        _ => (0.0, 1.0),
    };
    assert_eq!(stack.hedges("won"), won, "{at}");
    assert_eq!(stack.hedges("lost"), lost, "{at}");

    drop(service);
    support::assert_no_task_left(tasks_before, &at).await;
}
