//! `Fallback` over real upstreams on loopback, both protocols: which target each call
//! reached, on the upstreams' own hit counts, what the caller got, and what was
//! counted. Each target is the three layers over its own hyper-util client. Time is
//! tokio's paused clock.

mod support;

use std::time::Duration;

use http::Response;
use http_body_util::BodyExt;
use support::{
    BOTH, Boxed, Fault, GiveUp, Hit, Metrics, Protocol, Reply, TEST, Upstream, client, closed_url,
    full_stack, parse_prometheus, prometheus_value, read_to_end, read_until_error, target,
};
use tower::ServiceExt;
use tower_stream_backpressure::fallback::{Fallback, ServedBy};
use tower_stream_backpressure::metrics::STREAM_FALLBACKS;
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};

/// The path every call goes to; each target sends it to its own upstream.
const PATH: &str = "/v1/chat/completions";

/// Two attempts per target, and a first-chunk timeout of 10 s.
fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(2)
        .first_chunk_timeout(Duration::from_secs(10))
}

/// The three layers over a client of `protocol`, sending to `base`.
fn stack(
    base: &str,
    protocol: Protocol,
    metrics: &Metrics,
    limit: &StreamConcurrencyLayer,
) -> Boxed {
    let stack = full_stack(
        client(protocol),
        &metrics.meter(),
        limit.clone(),
        RetryBudget::default(),
        policy(),
    );
    target(base, stack)
}

/// A primary and a backup, recording to `metrics` under provider `"test"`.
fn fallback(primary: Boxed, backup: Boxed, metrics: &Metrics) -> Fallback<Boxed> {
    Fallback::new([("primary", primary), ("backup", backup)])
        .expect("two targets")
        .provider("test")
        .meter(metrics.meter())
}

fn served_by<B>(response: &Response<B>) -> &str {
    let served_by = response.extensions().get::<ServedBy>();
    served_by.map(ServedBy::name).expect("ServedBy")
}

/// `stream_fallbacks_total{provider="test", from="primary", to="backup", reason}`.
fn fallbacks(metrics: &Metrics, reason: &str) -> f64 {
    let attributes = [
        TEST,
        ("from", "primary"),
        ("to", "backup"),
        ("reason", reason),
    ];
    metrics.snapshot().count(STREAM_FALLBACKS, &attributes)
}

fn post() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    support::post(PATH)
}

/// How the primary fails (or not), and what that makes of the call.
struct Case {
    what: &'static str,
    /// The primary's answer to each hit; `None`: nothing listens, a connect is refused.
    primary: Option<fn(&Hit) -> Reply>,
    /// Whether the primary's stack has the layers (else: the bare hyper-util client).
    layers: bool,
    primary_hits: u64,
    /// The reason the call fell back for, `None` when the primary's answer is the
    /// caller's, with this status.
    reason: Option<&'static str>,
    status: u16,
}

const fn case(
    what: &'static str,
    primary: Option<fn(&Hit) -> Reply>,
    primary_hits: u64,
    reason: Option<&'static str>,
    status: u16,
) -> Case {
    Case {
        what,
        primary,
        layers: true,
        primary_hits,
        reason,
        status,
    }
}

fn cases() -> [Case; 11] {
    [
        // Retried by the primary's own retry layer, then a FirstChunkError.
        case("connection refused", None, 0, Some("first_chunk"), 200),
        Case {
            layers: false,
            ..case("connection refused, no layers", None, 0, Some("error"), 200)
        },
        case(
            "reset before headers",
            Some(|_| Reply::ResetStream),
            2,
            Some("first_chunk"),
            200,
        ),
        case(
            "reset before the first chunk",
            Some(|_| Reply::faulty(3, Fault::ResetBeforeFirst)),
            2,
            Some("first_chunk"),
            200,
        ),
        case(
            "stall before the first chunk",
            Some(|_| Reply::faulty(3, Fault::StallBeforeFirst)),
            2,
            Some("first_chunk"),
            200,
        ),
        // Not retried by the primary: 500 is no retryable status, but falls back.
        case("500", Some(|_| Reply::status(500)), 1, Some("status"), 200),
        // Retried by the primary, which then hands the last one back.
        case("503", Some(|_| Reply::status(503)), 2, Some("status"), 200),
        case("429", Some(|_| Reply::status(429)), 2, Some("status"), 200),
        // A 200 whose first event says the provider is overloaded, retried by the
        // primary, which then hands it back marked as given up on.
        case(
            "overloaded in band after 200",
            Some(|_| {
                Reply::chunks(
                    "text/event-stream",
                    vec![support::upstream::anthropic_overloaded()],
                )
            }),
            2,
            Some("in_band_error"),
            200,
        ),
        // The caller's own: no fallback.
        case("400", Some(|_| Reply::status(400)), 1, None, 400),
        case("healthy", Some(|_| Reply::tokens(3)), 1, None, 200),
    ]
}

#[tokio::test(start_paused = true)]
async fn each_failure_falls_back_with_the_exact_hits_on_each_target() {
    for protocol in BOTH {
        for case in cases() {
            let at = format!("{} over {protocol:?}", case.what);
            let primary = match case.primary {
                Some(script) => Some(Upstream::start(script).await),
                None => None,
            };
            let backup = Upstream::start(|_| Reply::tokens(3)).await;
            let metrics = Metrics::new();
            let (primary_limit, backup_limit) = (
                StreamConcurrencyLayer::new(4),
                StreamConcurrencyLayer::new(4),
            );
            let primary_url = primary
                .as_ref()
                .map_or_else(closed_url, |upstream| upstream.url(""));
            let primary_stack = match case.layers {
                true => stack(&primary_url, protocol, &metrics, &primary_limit),
                false => target(&primary_url, client(protocol)),
            };
            let backup_stack = stack(&backup.url(""), protocol, &metrics, &backup_limit);
            let client = fallback(primary_stack, backup_stack, &metrics);

            let response = client.oneshot(post()).await.expect("a response");
            assert_eq!(response.status(), case.status, "{at}");
            let expected = if case.reason.is_some() {
                "backup"
            } else {
                "primary"
            };
            assert_eq!(served_by(&response), expected, "{at}");
            let body = read_to_end(response.into_body()).await.expect("the body");
            if case.status == 200 {
                assert!(body.ends_with(b"data: [DONE]\n\n"), "{at}: {body:?}");
            }

            let primary_hits = primary.as_ref().map_or(0, Upstream::hits);
            let fell_back = u64::from(case.reason.is_some());
            assert_eq!(
                (primary_hits, backup.hits()),
                (case.primary_hits, fell_back),
                "{at}: hits on the primary and the backup"
            );
            match case.reason {
                Some(reason) => assert_eq!(fallbacks(&metrics, reason), 1.0, "{at}"),
                None => assert_eq!(metrics.snapshot().series(STREAM_FALLBACKS), 0, "{at}"),
            }
            assert_eq!(primary_limit.available_slots(), 4, "{at}");
            assert_eq!(backup_limit.available_slots(), 4, "{at}");
            support::assert_nothing_in_flight(&metrics, &at);
        }
    }
}

/// A primary and a backup upstream, answering as scripted, and a fallback from the one
/// to the other, each target the three layers with its own limit.
struct Pair {
    primary: Upstream,
    backup: Upstream,
    primary_limit: StreamConcurrencyLayer,
    backup_limit: StreamConcurrencyLayer,
    metrics: Metrics,
    client: Fallback<Boxed>,
}

impl Pair {
    async fn start(
        protocol: Protocol,
        primary: impl Fn(&Hit) -> Reply + Send + Sync + 'static,
        primary_limit: StreamConcurrencyLayer,
    ) -> Self {
        let (primary, backup) = (
            Upstream::start(primary).await,
            Upstream::start(|_| Reply::tokens(3)).await,
        );
        let metrics = Metrics::new();
        let backup_limit = StreamConcurrencyLayer::new(4);
        let client = fallback(
            stack(&primary.url(""), protocol, &metrics, &primary_limit),
            stack(&backup.url(""), protocol, &metrics, &backup_limit),
            &metrics,
        );
        Self {
            primary,
            backup,
            primary_limit,
            backup_limit,
            metrics,
            client,
        }
    }

    /// The upstreams' hits, the primary's and the backup's.
    fn hits(&self) -> (u64, u64) {
        (self.primary.hits(), self.backup.hits())
    }

    /// A call, read to its end: who served it.
    async fn call(&self) -> String {
        let response = self.client.clone().oneshot(post()).await.expect("served");
        let served_by = served_by(&response).to_owned();
        read_to_end(response.into_body()).await.expect("the stream");
        served_by
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_falls_back_once_the_first_chunk_reached_the_caller() {
    for protocol in BOTH {
        let script = |_: &Hit| Reply::faulty(3, Fault::ResetAfter(2));
        let pair = Pair::start(protocol, script, StreamConcurrencyLayer::new(4)).await;
        let response = pair
            .client
            .clone()
            .oneshot(post())
            .await
            .expect("the first chunk arrived");
        assert_eq!(served_by(&response), "primary", "{protocol:?}");
        let mut body = response.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.into_data().unwrap().starts_with(b"data: "));
        let error = read_until_error(&mut body).await;
        assert!(
            !error.to_string().is_empty(),
            "{protocol:?}: the caller's body error"
        );
        assert_eq!(
            pair.hits(),
            (1, 0),
            "{protocol:?}: the backup never sees the call"
        );
        assert_eq!(
            pair.metrics.snapshot().series(STREAM_FALLBACKS),
            0,
            "{protocol:?}"
        );
        drop(body);
        assert_eq!(pair.primary_limit.available_slots(), 4, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_primary_spills_over_to_the_backup_until_a_slot_is_free() {
    for protocol in BOTH {
        let script = |_: &Hit| Reply::tokens(3).gap(Duration::from_secs(1));
        let full = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
        let pair = Pair::start(protocol, script, full).await;
        // Holds the primary's one slot while its body is unread.
        let held = pair.client.clone().oneshot(post()).await.expect("a stream");
        assert_eq!(served_by(&held), "primary");
        for _ in 0..3 {
            assert_eq!(pair.call().await, "backup", "{protocol:?}");
        }
        assert_eq!(pair.hits(), (1, 3), "{protocol:?}");
        assert_eq!(fallbacks(&pair.metrics, "rejected"), 3.0, "{protocol:?}");
        let samples = parse_prometheus(&pair.metrics.prometheus_text());
        let labels = [
            TEST,
            ("from", "primary"),
            ("to", "backup"),
            ("reason", "rejected"),
        ];
        let exported = prometheus_value(&samples, "stream_fallbacks_total", &labels);
        assert_eq!(exported, Some(3.0), "{protocol:?}");

        // The stream ends: the primary has a slot again, and serves the next call.
        read_to_end(held.into_body())
            .await
            .expect("the held stream");
        assert_eq!(pair.call().await, "primary", "{protocol:?}");
        assert_eq!(pair.hits(), (2, 3), "{protocol:?}");
        assert_eq!(pair.backup_limit.available_slots(), 4, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_target_cools_down_and_is_tried_again_after_it() {
    // The primary fails its first three calls, then recovers.
    fn script(hit: &Hit) -> Reply {
        match hit.index {
            0..3 => Reply::status(500),
            _ => Reply::tokens(3),
        }
    }
    for protocol in BOTH {
        let mut pair = Pair::start(protocol, script, StreamConcurrencyLayer::new(4)).await;
        pair.client = pair.client.cooldown(2, Duration::from_secs(30));

        // Two failures in a row: cooling down, then skipped.
        assert_eq!(pair.call().await, "backup");
        assert_eq!(pair.call().await, "backup");
        assert_eq!(pair.hits(), (2, 2), "{protocol:?}");
        assert_eq!(pair.call().await, "backup");
        assert_eq!(pair.hits(), (2, 3), "{protocol:?}: skipped");
        assert_eq!(fallbacks(&pair.metrics, "cooldown"), 1.0, "{protocol:?}");

        // After the cooldown it is tried again; one more failure skips it at once.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(pair.call().await, "backup");
        assert_eq!(pair.hits(), (3, 4), "{protocol:?}: tried again");
        assert_eq!(pair.call().await, "backup");
        assert_eq!(pair.hits(), (3, 5), "{protocol:?}: skipped again");

        // Recovered: it serves, and stays in use.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(pair.call().await, "primary");
        assert_eq!(pair.call().await, "primary");
        assert_eq!(pair.hits(), (5, 5), "{protocol:?}");
        assert_eq!(fallbacks(&pair.metrics, "status"), 3.0, "{protocol:?}");
        assert_eq!(fallbacks(&pair.metrics, "cooldown"), 2.0, "{protocol:?}");
    }
}

/// An await point of a target's stack, and what that target does to keep the call
/// there.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Queued for a slot, which other calls hold.
    Slot,
    /// Inside the call: the upstream has not answered.
    Call,
    /// The headers arrived; reading the body for the first chunk.
    FirstChunk,
    /// The first attempt got a `503`; waiting out the backoff.
    Backoff,
}

impl Wait {
    fn reply(self, hit: &Hit) -> Reply {
        match self {
            Wait::Slot => Reply::tokens(3),
            Wait::Call => Reply::Hang,
            Wait::FirstChunk => Reply::faulty(3, Fault::StallBeforeFirst),
            Wait::Backoff if hit.index == 0 => Reply::status(503),
            Wait::Backoff => Reply::Hang,
        }
    }
}

/// Where the caller gives up: at an await point of the primary; of the backup, once
/// the primary answered `500`; or in the backup's body.
#[derive(Debug, Clone, Copy)]
enum Point {
    Primary(Wait),
    Backup(Wait),
    /// The backup's body is dropped after this many frames (of three events and
    /// `data: [DONE]`).
    BodyAfterFrames(usize),
}

impl Point {
    fn primary(self, hit: &Hit) -> Reply {
        match self {
            _ if hit.path == "/held" => Reply::faulty(3, Fault::StallAfter(1)),
            Point::Primary(wait) => wait.reply(hit),
            _ => Reply::status(500),
        }
    }

    fn backup(self, hit: &Hit) -> Reply {
        match self {
            _ if hit.path == "/held" => Reply::faulty(3, Fault::StallAfter(1)),
            Point::Backup(wait) => wait.reply(hit),
            _ => Reply::tokens(3).gap(Duration::from_millis(10)),
        }
    }

    /// The upstreams' hits when the caller gives up, the primary's and the backup's.
    fn hits(self) -> (u64, u64) {
        let held = SLOTS as u64;
        match self {
            Point::Primary(Wait::Slot) => (held, 0),
            Point::Primary(_) => (1, 0),
            Point::Backup(Wait::Slot) => (1, held),
            _ => (1, 1),
        }
    }

    /// Calls made straight to a target to fill its limit before the test's own.
    fn held(self) -> u64 {
        match self {
            Point::Primary(Wait::Slot) | Point::Backup(Wait::Slot) => SLOTS as u64,
            _ => 0,
        }
    }
}

/// Slots of each limit: the one above the fallback and each target's.
const SLOTS: usize = 2;

#[tokio::test(start_paused = true)]
async fn giving_up_at_any_point_leaves_nothing_behind() {
    let waits = [Wait::Slot, Wait::Call, Wait::FirstChunk, Wait::Backoff];
    let points: Vec<Point> = (waits.map(Point::Primary).into_iter())
        .chain(waits.map(Point::Backup))
        .chain((0..=4).map(Point::BodyAfterFrames))
        .collect();
    support::at_every_point(&points, give_up_at).await;
}

/// One call through a limit and a budget above the fallback, the same budget in each
/// target's stack, given up at `point`. After it: every slot is back, every gauge at
/// zero, the budget holds what its formula says, the upstreams saw their streams close
/// and nothing more, and no task is left running.
async fn give_up_at(protocol: Protocol, point: Point) {
    use tower::Layer;
    use tower_stream_backpressure::RetryBudgetLayer;
    let at = format!("{point:?} over {protocol:?}");
    let primary = Upstream::start(move |hit| point.primary(hit)).await;
    let backup = Upstream::start(move |hit| point.backup(hit)).await;
    let metrics = Metrics::new();
    // Half a retry per call and no reserve, over a window longer than the test, with
    // two retries' worth deposited.
    let budget = RetryBudget::new(Duration::from_secs(60), 0, 0.5);
    (0..4).for_each(|_| budget.deposit());
    let limits = [(); 3].map(|()| StreamConcurrencyLayer::new(SLOTS));
    let [outer, primary_limit, backup_limit] = &limits;
    let target_stack = |upstream: &Upstream, limit: &StreamConcurrencyLayer| {
        let policy = policy().backoff(Duration::from_secs(30), Duration::from_secs(30));
        let layers = full_stack(
            client(protocol),
            &metrics.meter(),
            limit.clone(),
            budget.clone(),
            policy,
        );
        target(&upstream.url(""), layers)
    };
    let fallback = fallback(
        target_stack(&primary, primary_limit),
        target_stack(&backup, backup_limit),
        &metrics,
    );
    let stack = outer.layer(RetryBudgetLayer::new(budget.clone()).layer(fallback));
    let tasks_before = support::alive_tasks();

    // For a queue: calls straight to the target hold all its slots.
    let direct = match point {
        Point::Backup(Wait::Slot) => target_stack(&backup, backup_limit),
        _ => target_stack(&primary, primary_limit),
    };
    let mut held = Vec::new();
    for _ in 0..point.held() {
        held.push(
            direct
                .clone()
                .oneshot(support::post("/held"))
                .await
                .expect("held"),
        );
    }

    let how = match point {
        Point::BodyAfterFrames(frames) => GiveUp::BodyAfterFrames(frames),
        _ => GiveUp::Waiting,
    };
    support::give_up(stack.clone().oneshot(post()), how, &at).await;
    let hits = (primary.hits(), backup.hits());
    assert_eq!(hits, point.hits(), "{at}: hits when the caller gave up");
    drop(held);
    support::settle().await;

    for (limit, which) in limits.iter().zip(["outer", "primary", "backup"]) {
        assert_eq!(limit.available_slots(), SLOTS, "{at}: {which} slots");
    }
    support::assert_nothing_in_flight(&metrics, &at);
    let open = (primary.open_streams(), backup.open_streams());
    assert_eq!(open, (0, 0), "{at}: the upstreams' open streams");
    let after = (primary.hits(), backup.hits());
    assert_eq!(after, hits, "{at}: nothing was tried after the caller left");

    // One deposit per call through the fallback, whatever the targets, and per held
    // call; a retry decided before the caller left stays withdrawn.
    let deposits = 4 + 1 + point.held();
    let backoff = matches!(
        point,
        Point::Primary(Wait::Backoff) | Point::Backup(Wait::Backoff)
    );
    let withdrawn = u64::from(backoff);
    assert_eq!(budget.available(), deposits / 2 - withdrawn, "{at}: budget");

    drop((stack, direct, limits));
    support::assert_no_task_left(tasks_before, &at).await;
}
