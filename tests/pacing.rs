//! Rate-limit pacing (`StreamConcurrencyLayer::pace_on_rate_limits`) over a real hyper
//! upstream on loopback, both protocols: a response saying the account's limit is
//! spent holds new calls at the layer until the reset, a caller that cannot wait that
//! long is turned away without a request, and garbled headers hold nothing. Checked on
//! the upstream's own hit count. Time is tokio's paused clock.

mod support;

use std::time::Duration;

use support::{BOTH, Hit, Metrics, Reply, TEST, Upstream, post, read_to_end, stack_over};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_stream_backpressure::metrics::STREAM_RATE_LIMIT_WAIT;
use tower_stream_backpressure::{
    RejectReason, Rejected, RetryBudget, RetryPolicy, StreamConcurrencyLayer,
};

/// A healthy SSE answer whose head says that no requests are left until `reset`
/// (OpenAI's headers), or `None` for a plain one.
fn answer(reset: Option<&'static str>) -> Reply {
    let headers = match reset {
        Some(reset) => vec![
            ("content-type", "text/event-stream".to_owned()),
            ("x-ratelimit-remaining-requests", "0".to_owned()),
            ("x-ratelimit-reset-requests", reset.to_owned()),
        ],
        None => vec![("content-type", "text/event-stream".to_owned())],
    };
    Reply::Status {
        status: http::StatusCode::OK,
        headers,
        body: bytes::Bytes::from_static(b"data: {\"x\":1}\n\ndata: [DONE]\n\n"),
    }
}

fn paced(max_wait: Duration) -> StreamConcurrencyLayer {
    StreamConcurrencyLayer::new(4)
        .max_wait(max_wait)
        .pace_on_rate_limits(true)
}

#[tokio::test(start_paused = true)]
async fn a_spent_limit_holds_new_calls_until_its_reset() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // The first answer says the limit is spent for 6 s; the next are plain.
        let upstream = Upstream::start(|hit: &Hit| match hit.index {
            0 => answer(Some("6s")),
            _ => answer(None),
        })
        .await;
        let metrics = Metrics::new();
        let stack = stack_over(
            protocol,
            &metrics.meter(),
            paced(Duration::from_secs(30)),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let url = upstream.url("/v1/chat/completions");
        let first = stack.clone().oneshot(post(&url)).await.unwrap();
        read_to_end(first.into_body()).await.unwrap();

        let started = Instant::now();
        let second = tokio::spawn(stack.clone().oneshot(post(&url)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            upstream.hits(),
            1,
            "{at}: the second call is held, not sent"
        );
        let second = second.await.expect("no panic").expect("sent at the reset");
        let held = started.elapsed();
        assert!(
            held >= Duration::from_secs(6) && held < Duration::from_millis(6_100),
            "{at}: held {held:?}"
        );
        read_to_end(second.into_body()).await.unwrap();
        assert_eq!(upstream.hits(), 2, "{at}");
        let histogram = metrics
            .snapshot()
            .histogram(STREAM_RATE_LIMIT_WAIT, &[TEST]);
        let histogram = histogram.expect("the time held is recorded");
        assert_eq!(histogram.count, 1, "{at}: one call held");
        // Open again: the next call goes at once.
        let started = Instant::now();
        let third = stack.clone().oneshot(post(&url)).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100), "{at}");
        read_to_end(third.into_body()).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_cannot_wait_for_the_reset_is_turned_away_without_a_request() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        let upstream = Upstream::start(|_: &Hit| answer(Some("1m0s"))).await;
        let metrics = Metrics::new();
        let stack = stack_over(
            protocol,
            &metrics.meter(),
            paced(Duration::from_secs(2)),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let url = upstream.url("/v1/chat/completions");
        let first = stack.clone().oneshot(post(&url)).await.unwrap();
        read_to_end(first.into_body()).await.unwrap();
        let started = Instant::now();
        let error = stack.clone().oneshot(post(&url)).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(1),
            "{at}: at once"
        );
        let rejected = error.downcast_ref::<Rejected>().expect("a rejection");
        assert_eq!(rejected.reason(), RejectReason::RateLimited, "{at}");
        assert_eq!(upstream.hits(), 1, "{at}: no request to be refused");
        let snapshot = metrics.snapshot();
        let counted = snapshot.count(
            "stream_concurrency_rejections",
            &[TEST, ("reason", "rate_limited")],
        );
        assert_eq!(counted, 1.0, "{at}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_holds_new_calls_while_its_retry_waits() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        let upstream = Upstream::start(|hit: &Hit| match hit.index {
            0 => Reply::status(429).header("retry-after", "2"),
            _ => answer(None),
        })
        .await;
        let metrics = Metrics::new();
        let stack = stack_over(
            protocol,
            &metrics.meter(),
            paced(Duration::from_secs(30)),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let url = upstream.url("/v1/chat/completions");
        let started = Instant::now();
        let first = tokio::spawn(stack.clone().oneshot(post(&url)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Made while the first waits out its hint: held at the gate, not sent.
        let second = tokio::spawn(stack.clone().oneshot(post(&url)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            upstream.hits(),
            1,
            "{at}: neither the retry nor the new call yet"
        );
        for call in [first, second] {
            let response = call.await.expect("no panic").expect("answered");
            read_to_end(response.into_body()).await.unwrap();
        }
        assert!(started.elapsed() >= Duration::from_secs(2), "{at}");
        assert_eq!(
            upstream.hits(),
            3,
            "{at}: the 429, its retry, the second call"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn garbled_or_absurd_resets_hold_nothing() {
    for reset in ["soon", "-5s", "6M0s", "100h"] {
        let upstream = Upstream::start(move |_: &Hit| answer(Some(reset))).await;
        let metrics = Metrics::new();
        let stack = stack_over(
            support::Protocol::Http1,
            &metrics.meter(),
            paced(Duration::from_secs(30)),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let url = upstream.url("/v1/chat/completions");
        for _ in 0..3 {
            let started = Instant::now();
            let response = stack.clone().oneshot(post(&url)).await.unwrap();
            read_to_end(response.into_body()).await.unwrap();
            assert!(
                started.elapsed() < Duration::from_millis(100),
                "{reset}: not held"
            );
        }
        assert_eq!(upstream.hits(), 3, "{reset}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_at_the_gate_leaves_nothing_behind() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        let upstream = Upstream::start(|_: &Hit| answer(Some("1m0s"))).await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::new(4).pace_on_rate_limits(true);
        let stack = stack_over(
            protocol,
            &metrics.meter(),
            limit.clone(),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let url = upstream.url("/v1/chat/completions");
        let first = stack.clone().oneshot(post(&url)).await.unwrap();
        read_to_end(first.into_body()).await.unwrap();
        // No max_wait: the call waits at the gate until its caller gives up.
        let call = stack.clone().oneshot(post(&url));
        support::give_up(call, support::GiveUp::Waiting, &at).await;
        support::settle().await;
        assert_eq!(upstream.hits(), 1, "{at}: the call was never sent");
        assert_eq!(limit.available_slots(), 4, "{at}: every slot free");
        support::assert_nothing_in_flight(&metrics, &at);
        let snapshot = metrics.snapshot();
        let canceled = snapshot.count(
            "stream_concurrency_rejections",
            &[TEST, ("reason", "context_canceled")],
        );
        assert_eq!(canceled, 1.0, "{at}: counted as given up");
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_queued_for_a_slot_when_the_limit_is_spent_waits_at_the_gate_too() {
    for protocol in BOTH {
        let at = format!("{protocol:?}");
        // The first attempt: a 429 saying the minute's requests are spent for 6 s,
        // with a hint of 1 s; then plain answers.
        let upstream = Upstream::start(|hit: &Hit| match hit.index {
            0 => Reply::status(429)
                .header("retry-after", "1")
                .header("x-ratelimit-remaining-requests", "0")
                .header("x-ratelimit-reset-requests", "6s"),
            _ => answer(None),
        })
        .await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::new(1).pace_on_rate_limits(true);
        let stack = stack_over(
            protocol,
            &metrics.meter(),
            limit,
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let url = upstream.url("/v1/chat/completions");
        // The first call takes the only slot; the second queues for it while the gate
        // is still open.
        let first = tokio::spawn(stack.clone().oneshot(post(&url)));
        let second = tokio::spawn(stack.clone().oneshot(post(&url)));
        // The first call's retry (after its hint, under its own slot) answers at 1 s,
        // and its slot goes to the second, which the gate then holds.
        let response = first.await.expect("no panic").expect("the retry answered");
        read_to_end(response.into_body()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            upstream.hits(),
            2,
            "{at}: the 429 and its retry, not the second call"
        );
        let started = Instant::now();
        let second = second.await.expect("no panic").expect("sent at the reset");
        read_to_end(second.into_body()).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{at}: held to the reset"
        );
        assert_eq!(upstream.hits(), 3, "{at}");
    }
}
