//! Every setting a user can pass, at its edges: zero, huge, NaN and infinite values are
//! refused at construction with an error naming the setting, or work (huge ones), and
//! nothing panics.

mod support;

use std::time::Duration;

use support::{Metrics, Protocol, Reply, Upstream, client, full_stack, post, read_to_end};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_stream_backpressure::retry::InBandErrors;
use tower_stream_backpressure::{
    BufferRequestBodyLayer, ConfigError, FirstChunkRetryLayer, RetryBudget, RetryPolicy,
    StreamConcurrencyLayer,
};

fn refused<T: std::fmt::Debug>(result: Result<T, ConfigError>, setting: &str) {
    let error = result.expect_err(setting);
    assert_eq!(error.setting(), setting, "{error}");
    // The message names the setting and says what is wrong.
    let message = error.to_string();
    assert!(message.contains(setting), "{message}");
    assert!(message.len() > setting.len() + 10, "{message}");
}

#[test]
fn out_of_range_settings_are_refused_by_name() {
    refused(StreamConcurrencyLayer::try_new(0), "limit");
    refused(StreamConcurrencyLayer::try_new(usize::MAX), "limit");
    refused(BufferRequestBodyLayer::try_new(0), "limit");

    let policy = RetryPolicy::default;
    let long = Duration::from_secs(3);
    for (policy, setting) in [
        (policy().max_attempts(0), "max_attempts"),
        (policy().backoff(long, Duration::from_secs(1)), "backoff"),
        (policy().backoff(Duration::MAX, Duration::ZERO), "backoff"),
        (
            policy().first_chunk_timeout(Duration::ZERO),
            "first_chunk_timeout",
        ),
        (policy().max_buffer(0), "max_buffer"),
    ] {
        refused(policy.validate(), setting);
        refused(FirstChunkRetryLayer::try_new(policy), setting);
    }

    let second = Duration::from_secs(1);
    refused(RetryBudget::try_new(Duration::ZERO, 10, 0.2), "ttl");
    refused(
        RetryBudget::try_new(Duration::from_millis(999), 10, 0.2),
        "ttl",
    );
    refused(
        RetryBudget::try_new(Duration::from_secs(61), 10, 0.2),
        "ttl",
    );
    refused(RetryBudget::try_new(Duration::MAX, 10, 0.2), "ttl");
    for ratio in [
        f64::NAN,
        -0.1,
        -f64::INFINITY,
        f64::INFINITY,
        1000.5,
        f64::MAX,
    ] {
        refused(RetryBudget::try_new(second, 10, ratio), "retry_ratio");
    }
}

#[test]
fn edge_values_in_range_are_accepted() {
    assert!(StreamConcurrencyLayer::try_new(1).is_ok());
    assert!(StreamConcurrencyLayer::try_new(Semaphore::MAX_PERMITS).is_ok());
    assert!(BufferRequestBodyLayer::try_new(usize::MAX).is_ok());
    assert!(RetryBudget::try_new(Duration::from_secs(1), 0, 0.0).is_ok());
    assert!(RetryBudget::try_new(Duration::from_secs(60), u32::MAX, 1000.0).is_ok());
    let budget = RetryBudget::new(Duration::from_secs(60), u32::MAX, 1000.0);
    assert!(budget.available() > 0);
    assert!(budget.withdraw());
    for policy in [
        RetryPolicy::default().max_attempts(1),
        RetryPolicy::default().max_attempts(u32::MAX),
        RetryPolicy::default().backoff(Duration::ZERO, Duration::ZERO),
        RetryPolicy::default().backoff(Duration::MAX, Duration::MAX),
        RetryPolicy::default().first_chunk_timeout(Duration::MAX),
        RetryPolicy::default().max_retry_after(Duration::ZERO),
        RetryPolicy::default().max_retry_after(Duration::MAX),
        RetryPolicy::default().max_buffer(1),
        RetryPolicy::default().max_buffer(usize::MAX),
        RetryPolicy::default().retry_statuses([]),
        RetryPolicy::default().in_band_errors(InBandErrors::default().transient("")),
    ] {
        assert!(policy.validate().is_ok(), "{policy:?}");
    }
}

/// The largest values work in a real call: no overflow in a deadline, a backoff or a
/// buffer size.
#[tokio::test(start_paused = true)]
async fn huge_settings_work_in_a_call() {
    let upstream = Upstream::start(|hit| match hit.index {
        0 => Reply::status(503).header("retry-after", "1"),
        _ => Reply::tokens(3),
    })
    .await;
    let metrics = Metrics::new();
    let policy = RetryPolicy::default()
        .max_attempts(u32::MAX)
        .backoff(Duration::MAX, Duration::MAX)
        .first_chunk_timeout(Duration::MAX)
        .max_retry_after(Duration::MAX)
        .max_buffer(usize::MAX);
    let stack = full_stack(
        client(Protocol::Http1),
        &metrics.meter(),
        StreamConcurrencyLayer::new(Semaphore::MAX_PERMITS).max_wait(Duration::MAX),
        RetryBudget::new(Duration::from_secs(60), u32::MAX, 1000.0),
        policy,
    );
    let response = stack
        .oneshot(post(&upstream.url("/v1/chat/completions")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!read_to_end(response.into_body()).await.unwrap().is_empty());
    assert_eq!(upstream.hits(), 2);
}

#[test]
fn docs_rs_builds_every_feature() {
    // So that `config` (feature `serde`) shows on docs.rs, with its feature marked.
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("the manifest");
    let section = manifest
        .split("[package.metadata.docs.rs]")
        .nth(1)
        .expect("a [package.metadata.docs.rs] section");
    let section = section.split("\n[").next().unwrap_or_default();
    assert!(section.contains("all-features = true"), "{section}");
    assert!(section.contains(r#""--cfg", "docsrs""#), "{section}");
}
