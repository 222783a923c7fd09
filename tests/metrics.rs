//! Every metric, by value (read back from the SDK) and by its Prometheus name.

mod support;

use std::time::Duration;

use support::{
    Fault, Metrics, Protocol, Reply, TEST, Upstream, client, full_stack, parse_prometheus, post,
    prometheus_value, read_to_end,
};
use tower::ServiceExt;
use tower_stream_backpressure::metrics::{CONCURRENCY_WAIT_BUCKETS, FIRST_CHUNK_LATENCY_BUCKETS};
use tower_stream_backpressure::{RetryBudget, RetryPolicy, StreamConcurrencyLayer};

/// One scenario that makes every instrument record: a call retried once (a 503 asking
/// for 2 s), a stream held open, a call that exhausts its attempts, one the budget
/// refuses, and one rejected for want of a slot.
#[tokio::test(start_paused = true)]
async fn every_metric_by_value_and_by_prometheus_name() {
    let upstream = Upstream::start(|hit| match (hit.path.as_str(), hit.index) {
        ("/retried", 0) => Reply::status(503).header("retry-after", "2"),
        ("/retried", _) => Reply::tokens(2),
        ("/held", _) => Reply::faulty(3, Fault::StallAfter(1)),
        _ => Reply::status(503),
    })
    .await;
    let metrics = Metrics::new();
    // No reserve; a quarter of a retry per request, primed with five requests' worth
    // (1.25). Each call below adds 0.25: /retried takes one retry (1.5 -> 0.5), /held
    // adds (0.75), /failing takes one (1.0 -> 0), and /refused's 0.25 is not enough.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.25);
    for _ in 0..5 {
        budget.deposit();
    }
    let limit = StreamConcurrencyLayer::new(2).max_wait(Duration::from_secs(1));
    let service = full_stack(
        client(Protocol::Http1),
        &metrics.meter(),
        limit.clone(),
        budget.clone(),
        RetryPolicy::default()
            .max_attempts(2)
            .backoff(Duration::ZERO, Duration::ZERO),
    );
    let call = |path: &str| service.clone().oneshot(post(&upstream.url(path)));

    let retried = call("/retried").await.unwrap();
    read_to_end(retried.into_body()).await.unwrap();
    let held = call("/held").await.unwrap();
    let failing = call("/failing").await.unwrap();
    assert_eq!(failing.status(), 503);
    drop(failing);
    let refused = call("/refused").await.unwrap(); // the budget is empty now
    assert_eq!(refused.status(), 503);
    // Both slots held (the stalled stream and this 503's unread body): wait, then reject.
    let rejected = call("/rejected").await.unwrap_err();
    assert!(rejected.is::<tower_stream_backpressure::Rejected>());
    drop(refused);
    assert_eq!(upstream.hits(), 2 + 1 + 2 + 1);

    let snapshot = metrics.snapshot();
    assert_eq!(
        snapshot.count("streams_in_flight", &[TEST]),
        1.0,
        "the held stream"
    );
    assert_eq!(
        snapshot.count("provider_calls_in_flight", &[TEST]),
        1.0,
        "the held stream"
    );
    // Every retry here was called for by a 503.
    let outcome = |o| {
        snapshot.count(
            "stream_retries",
            &[TEST, ("outcome", o), ("reason", "status")],
        )
    };
    assert_eq!(outcome("success"), 1.0);
    assert_eq!(outcome("failed"), 1.0, "the 2nd attempt of /failing");
    assert_eq!(outcome("exhausted"), 1.0);
    assert_eq!(outcome("budget_exhausted"), 1.0);
    let rejections =
        |reason| snapshot.count("stream_concurrency_rejections", &[TEST, ("reason", reason)]);
    assert_eq!(rejections("deadline_exceeded"), 1.0);
    assert_eq!(rejections("context_canceled"), 0.0);
    assert_eq!(budget.available(), 0);
    assert_eq!(
        snapshot.value("stream_retry_budget_available", &[TEST]),
        Some(0.0)
    );

    let latency = snapshot
        .histogram("stream_first_chunk_latency", &[TEST])
        .unwrap();
    assert_eq!(
        latency.count, 2,
        "/retried and /held found their first chunk"
    );
    assert!(
        (latency.sum - 2.0).abs() < 1e-9,
        "2 s for /retried, 0 for /held: {latency:?}"
    );
    assert_eq!(latency.bounds, FIRST_CHUNK_LATENCY_BUCKETS);
    let wait = snapshot
        .histogram("stream_concurrency_wait", &[TEST])
        .unwrap();
    assert_eq!(wait.count, 5, "every call, granted or not");
    assert!(
        (wait.sum - 1.0).abs() < 1e-9,
        "only the rejected call waited: {wait:?}"
    );
    assert_eq!(wait.bounds, CONCURRENCY_WAIT_BUCKETS);

    // The same, through the Prometheus exporter with its default settings.
    let text = metrics.prometheus_text();
    let samples = parse_prometheus(&text);
    let value = |name, labels: &[(&str, &str)]| {
        let mut labels = labels.to_vec();
        labels.push(TEST);
        prometheus_value(&samples, name, &labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    assert_eq!(value("streams_in_flight", &[]), 1.0);
    assert_eq!(value("provider_calls_in_flight", &[]), 1.0);
    for outcome in ["success", "failed", "exhausted", "budget_exhausted"] {
        assert_eq!(
            value(
                "stream_retries_total",
                &[("outcome", outcome), ("reason", "status")]
            ),
            1.0
        );
    }
    assert_eq!(value("stream_retry_budget_available", &[]), 0.0);
    assert_eq!(
        value(
            "stream_concurrency_rejections_total",
            &[("reason", "deadline_exceeded")]
        ),
        1.0
    );
    assert_eq!(
        value("stream_first_chunk_latency_seconds_bucket", &[("le", "1")]),
        1.0
    );
    assert_eq!(
        value(
            "stream_first_chunk_latency_seconds_bucket",
            &[("le", "2.5")]
        ),
        2.0
    );
    assert_eq!(value("stream_first_chunk_latency_seconds_count", &[]), 2.0);
    assert_eq!(value("stream_first_chunk_latency_seconds_sum", &[]), 2.0);
    assert_eq!(value("stream_concurrency_wait_seconds_count", &[]), 5.0);
    assert_eq!(value("stream_concurrency_wait_seconds_sum", &[]), 1.0);
    let latency_buckets: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "stream_first_chunk_latency_seconds_bucket")
        .filter_map(|s| {
            s.labels
                .iter()
                .find(|(k, _)| k == "le")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(
        latency_buckets,
        [
            "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "120", "300", "+Inf"
        ]
    );
    for (name, kind) in [
        ("streams_in_flight", "gauge"),
        ("provider_calls_in_flight", "gauge"),
        ("stream_first_chunk_latency_seconds", "histogram"),
        ("stream_retries_total", "counter"),
        ("stream_retry_budget_available", "gauge"),
        ("stream_concurrency_rejections_total", "counter"),
        ("stream_concurrency_wait_seconds", "histogram"),
    ] {
        let declared = format!("# TYPE {name} {kind}");
        assert!(
            text.lines().any(|l| l == declared),
            "missing {declared:?} in:\n{text}"
        );
    }
    drop(held);
    let snapshot = metrics.snapshot();
    assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 0.0);
    assert_eq!(snapshot.count("provider_calls_in_flight", &[TEST]), 0.0);
    assert_eq!(limit.available_slots(), 2);
}

/// The budget gauge reads `available()` at collection, one series per layer however
/// many services the layer builds.
#[tokio::test]
async fn the_budget_gauge_reads_the_budget_at_collection() {
    use tower::Layer;
    use tower_stream_backpressure::RetryBudgetLayer;
    let metrics = Metrics::new();
    let budget = RetryBudget::default();
    let layer = RetryBudgetLayer::new(budget.clone())
        .meter(metrics.meter())
        .provider("test");
    for _ in 0..10 {
        let _ = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(())
        }));
    }
    let text = metrics.prometheus_text();
    let samples = parse_prometheus(&text);
    let budget_samples: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "stream_retry_budget_available")
        .collect();
    assert_eq!(budget_samples.len(), 1, "{text}");
    // The reserve alone: 10 retries/s over 10 s.
    assert_eq!(
        prometheus_value(&samples, "stream_retry_budget_available", &[TEST]),
        Some(100.0)
    );
}

/// However the stack is built around one budget (the same layer twice, clones, a
/// renamed layer, the meter given again), the budget is one series per meter.
#[tokio::test]
async fn one_budget_gauge_series_per_budget_and_meter() {
    use tower::Layer;
    use tower_stream_backpressure::RetryBudgetLayer;
    fn build(layer: &RetryBudgetLayer) {
        let _ = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(())
        }));
    }
    const GAUGE: &str = "stream_retry_budget_available";
    let metrics = Metrics::new();
    let budget = RetryBudget::default();
    let layer = RetryBudgetLayer::new(budget.clone())
        .meter(metrics.meter())
        .provider("test");
    build(&layer);
    build(&layer.clone());
    build(&layer.clone().provider("renamed"));
    build(&layer.clone().meter(metrics.meter()));
    build(
        &RetryBudgetLayer::new(budget.clone())
            .meter(metrics.meter())
            .provider("other"),
    );
    let snapshot = metrics.snapshot();
    assert_eq!(snapshot.series(GAUGE), 1, "one budget, one meter");
    // Named by the first layer that registered it.
    assert_eq!(snapshot.value(GAUGE, &[TEST]), Some(100.0));

    // Another budget is another series.
    let other = RetryBudget::new(Duration::from_secs(10), 1, 0.0);
    build(
        &RetryBudgetLayer::new(other.clone())
            .meter(metrics.meter())
            .provider("other"),
    );
    let snapshot = metrics.snapshot();
    assert_eq!(snapshot.series(GAUGE), 2);
    assert_eq!(snapshot.value(GAUGE, &[("provider", "other")]), Some(10.0));
}

/// A budget whose every handle is gone (its layers and services dropped, as after a
/// configuration reload) reports nothing more.
#[cfg(feature = "serde")]
#[tokio::test]
async fn a_dropped_budget_leaves_no_gauge_series() {
    use tower::Layer;
    use tower_stream_backpressure::config::Config;
    const GAUGE: &str = "stream_retry_budget_available";
    let metrics = Metrics::new();
    let upstream = || {
        tower::service_fn(|_: http::Request<bytes::Bytes>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        })
    };
    let config: Config = serde_json::from_str(r#"{"stream_max_concurrent": 10}"#).unwrap();
    let layers = config.layer("test").unwrap().meter(metrics.meter());
    let service = layers.layer(upstream());
    assert_eq!(metrics.snapshot().series(GAUGE), 1);

    // Reloaded twice: each reload builds a new stack, with a new budget, and drops the
    // old one.
    let mut current = (layers, service);
    for _ in 0..2 {
        let layers = config.layer("test").unwrap().meter(metrics.meter());
        let service = layers.layer(upstream());
        current = (layers, service);
        assert_eq!(metrics.snapshot().series(GAUGE), 1, "only the stack in use");
    }
    drop(current);
    assert_eq!(metrics.snapshot().series(GAUGE), 0, "no budget, no series");
}
