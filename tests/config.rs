//! `config::Config`: parsing, defaults, errors naming the field, and the stack it builds,
//! against a real hyper upstream on loopback. Time is tokio's paused clock.
#![cfg(feature = "serde")]

mod support;

use std::time::Duration;

use http_body::Body as _;
use http_body_util::BodyExt;
use support::{
    Fault, Metrics, Protocol, Reply, TEST, Upstream, client, post, read_to_end, read_until_error,
};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_stream_backpressure::config::{Budget, Config, Frames, StreamRetry};
use tower_stream_backpressure::{FirstChunkError, RejectReason, Rejected};

fn parse(json: &str) -> Config {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// The message of a deserialization error.
fn parse_error(json: &str) -> String {
    match serde_json::from_str::<Config>(json) {
        Ok(config) => panic!("{json} parsed: {config:?}"),
        Err(error) => error.to_string(),
    }
}

/// The setting named by the error of building the layers.
fn invalid(json: &str) -> (&'static str, String) {
    let config = parse(json);
    let validated = config.validate().map(|()| "validated");
    let error = config
        .layer("test")
        .map(|_| "built")
        .expect_err(&format!("{json} is valid"));
    assert_eq!(
        validated,
        Err(error.clone()),
        "validate() agrees with layer()"
    );
    (error.setting(), error.to_string())
}

const TOKENS_3: &[u8] =
    b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok0 \"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok1 \"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok2 \"}}]}\n\n\
data: [DONE]\n\n";

#[test]
fn an_empty_config_is_the_defaults() {
    let config = parse("{}");
    assert_eq!(config, Config::default());
    assert_eq!(config.stream_max_concurrent, 0);
    assert_eq!(config.max_wait, None);
    assert_eq!(config.first_chunk_timeout, Duration::from_secs(30));
    assert_eq!(config.stream_idle_timeout, Duration::from_secs(30));
    assert_eq!(config.frames, Frames::Auto);
    let retry = &config.stream_retry;
    assert!(retry.enabled);
    assert_eq!(retry.max_attempts, 3);
    assert_eq!(retry.initial_delay, Duration::from_millis(250));
    assert_eq!(retry.max_delay, Duration::from_secs(2));
    assert!(retry.retry_maybe_processed);
    assert_eq!(retry.budget, Budget::default());

    let layers = config.layer("test").unwrap();
    assert!(layers.concurrency().is_none(), "0 = no limit, no layer");
    let budget = layers.budget().expect("a budget by default");
    assert_eq!(budget.ttl(), Duration::from_secs(10));
    assert_eq!(budget.min_per_sec(), 10);
    assert_eq!(budget.retry_ratio(), 0.2);
    assert_eq!(layers.stream_idle_timeout(), Duration::from_secs(30));
    // Sections may be empty too.
    assert_eq!(parse(r#"{"stream_retry": {"budget": {}}}"#), config);
}

#[test]
fn every_field_is_read() {
    let config = parse(
        r#"{
            "stream_max_concurrent": 100,
            "max_wait": "250ms",
            "first_chunk_timeout": "1m",
            "stream_idle_timeout": "2s",
            "frames": "ndjson",
            "stream_retry": {
                "enabled": false,
                "max_attempts": 4,
                "initial_delay": "100ms",
                "max_delay": "1m 30s",
                "retry_maybe_processed": false,
                "budget": {"enabled": true, "ttl": "20s", "min_per_sec": 3, "retry_ratio": 0.6}
            }
        }"#,
    );
    assert_eq!(config.stream_max_concurrent, 100);
    assert_eq!(config.max_wait, Some(Duration::from_millis(250)));
    assert_eq!(config.first_chunk_timeout, Duration::from_secs(60));
    assert_eq!(config.stream_idle_timeout, Duration::from_secs(2));
    assert_eq!(config.frames, Frames::NdJson);
    let retry = &config.stream_retry;
    assert!(!retry.enabled);
    assert_eq!(retry.max_attempts, 4);
    assert_eq!(retry.initial_delay, Duration::from_millis(100));
    assert_eq!(retry.max_delay, Duration::from_secs(90));
    assert!(!retry.retry_maybe_processed);
    assert_eq!(retry.budget.enabled, Some(true));
    assert_eq!(retry.budget.ttl, Some(Duration::from_secs(20)));
    assert_eq!(retry.budget.min_per_sec, Some(3));
    assert_eq!(retry.budget.retry_ratio, Some(0.6));

    // Numbers and booleans as strings (as environment variables give them), null for
    // "no max_wait", and every frames name.
    let config = parse(
        r#"{"stream_max_concurrent": "8", "max_wait": null, "stream_retry":
            {"enabled": "true", "max_attempts": "2", "budget": {"retry_ratio": "0.5"}}}"#,
    );
    assert_eq!(config.stream_max_concurrent, 8);
    assert_eq!(config.max_wait, None);
    assert!(config.stream_retry.enabled);
    assert_eq!(config.stream_retry.max_attempts, 2);
    assert_eq!(config.stream_retry.budget.retry_ratio, Some(0.5));
    for (name, frames) in [
        ("auto", Frames::Auto),
        ("sse", Frames::Sse),
        ("ndjson", Frames::NdJson),
        ("json_array", Frames::JsonArray),
        ("eventstream", Frames::EventStream),
        ("first_data", Frames::FirstData),
    ] {
        assert_eq!(parse(&format!(r#"{{"frames": "{name}"}}"#)).frames, frames);
        assert_eq!(frames.to_string(), name);
    }

    // The built stack takes the values.
    let layers = parse(r#"{"stream_max_concurrent": 7, "stream_retry": {"budget": {"ttl": "20s", "min_per_sec": 3, "retry_ratio": 0.6}}}"#)
        .layer("test")
        .unwrap();
    assert_eq!(layers.concurrency().unwrap().available_slots(), 7);
    let budget = layers.budget().unwrap();
    assert_eq!(
        (budget.ttl(), budget.min_per_sec(), budget.retry_ratio()),
        (Duration::from_secs(20), 3, 0.6)
    );
}

#[test]
fn the_fields_can_be_set_in_code() {
    let mut config = Config::default();
    config.stream_max_concurrent = 2;
    config.stream_retry.max_attempts = 0;
    assert_eq!(
        config.validate().unwrap_err().setting(),
        "stream_retry.max_attempts"
    );
    config.stream_retry = StreamRetry::default();
    config.stream_retry.budget.enabled = Some(false);
    let layers = config.layer("test").unwrap();
    assert!(layers.budget().is_none());
    assert_eq!(layers.concurrency().unwrap().available_slots(), 2);
}

#[test]
fn deserialization_errors_name_the_field() {
    let cases = [
        // A typo: serde names the unknown field, the path the section it is in.
        (
            r#"{"stream_max_concurent": 10}"#,
            "unknown field `stream_max_concurent`, expected one of `stream_max_concurrent`, `max_wait`",
        ),
        (
            r#"{"stream_retry": {"max_attempt": 2}}"#,
            "invalid `stream_retry.max_attempt`: unknown field `max_attempt`, expected one of `enabled`, `max_attempts`",
        ),
        (
            r#"{"stream_retry": {"budget": {"rate": 2}}}"#,
            "invalid `stream_retry.budget.rate`: unknown field `rate`, expected one of `enabled`, `ttl`",
        ),
        // Values of the wrong kind: the field in full.
        (
            r#"{"stream_retry": {"initial_delay": "2 sekunds"}}"#,
            "invalid `stream_retry.initial_delay`: expected a duration",
        ),
        (
            r#"{"stream_retry": {"max_delay": 2}}"#,
            "invalid `stream_retry.max_delay`: expected a duration such as \"250ms\", \"2s\" or \"1m\", got 2: a number needs a unit",
        ),
        (
            r#"{"stream_idle_timeout": ""}"#,
            "invalid `stream_idle_timeout`",
        ),
        (
            r#"{"first_chunk_timeout": null}"#,
            "invalid `first_chunk_timeout`",
        ),
        (r#"{"max_wait": "soon"}"#, "invalid `max_wait`"),
        (
            r#"{"max_queued": -3}"#,
            "invalid `max_queued`: expected a whole number within 0 and",
        ),
        (
            r#"{"stream_retry": {"budget": {"ttl": [10]}}}"#,
            "invalid `stream_retry.budget.ttl`: expected a duration such as \"250ms\", \"2s\" or \"1m\", got a list",
        ),
        (
            r#"{"frames": "xml"}"#,
            "invalid `frames`: expected one of auto, sse, ndjson, json_array, eventstream, first_data, got \"xml\"",
        ),
        (r#"{"frames": "SSE"}"#, "invalid `frames`"),
        (
            r#"{"stream_max_concurrent": -1}"#,
            "invalid `stream_max_concurrent`: expected a whole number within 0 and",
        ),
        (
            r#"{"stream_max_concurrent": 1.5}"#,
            "invalid `stream_max_concurrent`",
        ),
        (
            r#"{"stream_retry": {"max_attempts": 4294967296}}"#,
            "invalid `stream_retry.max_attempts`: expected a whole number within 0 and 4294967295, got 4294967296",
        ),
        (
            r#"{"stream_retry": {"enabled": "yes"}}"#,
            "invalid `stream_retry.enabled`: expected true or false, got \"yes\"",
        ),
        (
            r#"{"stream_retry": {"retry_maybe_processed": 0}}"#,
            "invalid `stream_retry.retry_maybe_processed`: expected true or false, got 0",
        ),
        (
            r#"{"stream_retry": {"budget": {"retry_ratio": "lots"}}}"#,
            "invalid `stream_retry.budget.retry_ratio`: expected a number",
        ),
        (
            r#"{"stream_retry": {"budget": {"rate_per_sec": 0.5, "burst": 1}}}"#,
            "invalid `stream_retry.budget.rate_per_sec`: expected a whole number",
        ),
        (
            r#"{"stream_retry": {"budget": {"burst": {}}}}"#,
            "invalid `stream_retry.budget.burst`",
        ),
        (
            r#"{"stream_retry": 3}"#,
            "invalid `stream_retry`: invalid type: integer `3`, expected the `stream_retry` map",
        ),
        (
            r#"{"stream_retry": {"budget": false}}"#,
            "invalid `stream_retry.budget`: invalid type: boolean `false`, expected the `stream_retry.budget` map",
        ),
        // Broken syntax: the section it is in.
        (
            r#"{"stream_retry": {"max_attempts": 2,}}"#,
            "invalid `stream_retry`: trailing comma",
        ),
    ];
    for (json, expected) in cases {
        let message = parse_error(json);
        assert!(message.contains(expected), "{json}: {message}");
    }
    // The parser's position comes along, that of the value, once, and stays the error's.
    let json = "{\n  \"stream_retry\": {\n    \"initial_delay\": \"2 sekunds\"\n  }\n}";
    let error = serde_json::from_str::<Config>(json).unwrap_err();
    let message = error.to_string();
    assert!(message.ends_with("\" (unknown time unit \"sekunds\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)) at line 3 column 32"), "{message}");
    assert_eq!((error.line(), error.column()), (3, 32));

    // A Config inside the caller's own settings: the same message, the same position.
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Settings {
        openai: Config,
    }
    let nested = format!("{{\"openai\": {json}}}");
    let error = serde_json::from_str::<Settings>(&nested).unwrap_err();
    assert_eq!(error.to_string(), message);
    // And through serde_path_to_error, the caller's path before it.
    let error = serde_path_to_error::deserialize::<_, Settings>(
        &mut serde_json::Deserializer::from_str(&nested),
    )
    .unwrap_err();
    assert_eq!(
        error.path().to_string(),
        "openai.stream_retry.initial_delay"
    );
}

#[test]
fn values_out_of_range_name_the_field() {
    let cases = [
        (
            r#"{"stream_retry": {"max_attempts": 0}}"#,
            "stream_retry.max_attempts",
        ),
        // Checked even when retry is off.
        (
            r#"{"stream_retry": {"enabled": false, "max_attempts": 0}}"#,
            "stream_retry.max_attempts",
        ),
        (
            r#"{"stream_retry": {"initial_delay": "5s"}}"#,
            "stream_retry.initial_delay",
        ),
        (
            r#"{"stream_retry": {"initial_delay": "300ms", "max_delay": "200ms"}}"#,
            "stream_retry.initial_delay",
        ),
        (r#"{"first_chunk_timeout": "0s"}"#, "first_chunk_timeout"),
        (r#"{"stream_idle_timeout": "0ms"}"#, "stream_idle_timeout"),
        (
            r#"{"stream_retry": {"budget": {"retry_ratio": 2000}}}"#,
            "stream_retry.budget.retry_ratio",
        ),
        (
            r#"{"stream_retry": {"budget": {"retry_ratio": -0.1}}}"#,
            "stream_retry.budget.retry_ratio",
        ),
        (
            r#"{"stream_retry": {"budget": {"ttl": "500ms"}}}"#,
            "stream_retry.budget.ttl",
        ),
        (
            r#"{"stream_retry": {"budget": {"ttl": "2m"}}}"#,
            "stream_retry.budget.ttl",
        ),
        (
            r#"{"stream_retry": {"budget": {"enabled": false, "ttl": "2m"}}}"#,
            "stream_retry.budget.ttl",
        ),
        (
            r#"{"stream_retry": {"budget": {"rate_per_sec": 5}}}"#,
            "stream_retry.budget.burst",
        ),
        (
            r#"{"stream_retry": {"budget": {"burst": 5}}}"#,
            "stream_retry.budget.rate_per_sec",
        ),
        (
            r#"{"stream_retry": {"budget": {"rate_per_sec": 0, "burst": 5}}}"#,
            "stream_retry.budget.rate_per_sec",
        ),
        (
            r#"{"stream_retry": {"budget": {"rate_per_sec": 10, "burst": 5}}}"#,
            "stream_retry.budget.burst",
        ),
        (
            r#"{"stream_retry": {"budget": {"rate_per_sec": 1, "burst": 61}}}"#,
            "stream_retry.budget.burst",
        ),
        (
            r#"{"stream_retry": {"budget": {"rate_per_sec": 5, "burst": 20, "retry_ratio": 0.2}}}"#,
            "stream_retry.budget.rate_per_sec",
        ),
        (
            r#"{"stream_retry": {"budget": {"min_per_sec": 1, "rate_per_sec": 5, "burst": 20}}}"#,
            "stream_retry.budget.rate_per_sec",
        ),
    ];
    for (json, setting) in cases {
        let (named, message) = invalid(json);
        assert_eq!(named, setting, "{json}: {message}");
        assert!(
            message.starts_with(&format!("invalid `{setting}`: ")),
            "{message}"
        );
    }
    assert_eq!(
        invalid(r#"{"stream_retry": {"initial_delay": "5s"}}"#).1,
        "invalid `stream_retry.initial_delay`: must not exceed `stream_retry.max_delay` (2s), got 5s"
    );
    assert_eq!(
        invalid(r#"{"stream_retry": {"budget": {"retry_ratio": 2000}}}"#).1,
        "invalid `stream_retry.budget.retry_ratio`: must be a number within 0 and 1000, got 2000"
    );
    let mixed =
        invalid(r#"{"stream_retry": {"budget": {"ttl": "5s", "rate_per_sec": 5, "burst": 20}}}"#).1;
    assert!(
        mixed.contains("cannot be combined with `stream_retry.budget.ttl`"),
        "{mixed}"
    );
    let window = invalid(r#"{"stream_retry": {"budget": {"rate_per_sec": 10, "burst": 5}}}"#).1;
    assert!(
        window.contains("within `rate_per_sec` (10) and 60 times it (600)"),
        "{window}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_token_bucket_becomes_a_budget_with_its_burst_and_rate() {
    let config = parse(r#"{"stream_retry": {"budget": {"rate_per_sec": 5, "burst": 20}}}"#);
    let layers = config.layer("test").unwrap();
    let budget = layers.budget().unwrap();
    assert_eq!(budget.min_per_sec(), 5);
    assert_eq!(budget.ttl(), Duration::from_secs(4), "burst / rate_per_sec");
    assert_eq!(budget.retry_ratio(), 0.0);
    // The bucket's burst at once, and no more: requests do not add to it.
    assert_eq!(budget.available(), 20);
    for _ in 0..100 {
        budget.deposit();
    }
    assert_eq!((0..100).filter(|_| budget.withdraw()).count(), 20);
    assert_eq!(budget.available(), 0);
    // The bucket refills at 5 a second; the window gives them back as they expire: all
    // 20 within the 4 s the bucket takes to refill.
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(budget.available(), 20);

    // `enabled: false` takes the budget out; so does disabling retry.
    for json in [
        r#"{"stream_retry": {"budget": {"enabled": false}}}"#,
        r#"{"stream_retry": {"enabled": false, "budget": {"rate_per_sec": 5, "burst": 20}}}"#,
    ] {
        assert!(
            parse(json).layer("test").unwrap().budget().is_none(),
            "{json}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_stack_streams_retries_and_limits_a_real_call() {
    // The first hit is a 503, retried; the rest stream.
    let upstream = Upstream::start(|hit| {
        if hit.index == 0 {
            Reply::status(503)
        } else {
            Reply::tokens(3)
        }
    })
    .await;
    let config = parse(
        r#"{
            "stream_max_concurrent": 1,
            "max_wait": "0s",
            "stream_retry": {"max_attempts": 2, "initial_delay": "250ms", "max_delay": "2s"},
            "frames": "sse"
        }"#,
    );
    let metrics = Metrics::new();
    let layers = config.layer("test").unwrap().meter(metrics.meter());
    let service = ServiceBuilder::new()
        .layer(layers.clone())
        .service(client(Protocol::Http1));

    let response = service
        .clone()
        .oneshot(post(&upstream.url("/")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.hits(), 2, "the 503 was retried");
    assert_eq!(
        layers.concurrency().unwrap().available_slots(),
        0,
        "held by the stream"
    );

    // The limit holds while the stream is open: max_wait 0s fails at once.
    let error = service
        .clone()
        .oneshot(post(&upstream.url("/")))
        .await
        .unwrap_err();
    let rejected = error.downcast_ref::<Rejected>().expect("a rejection");
    assert_eq!(rejected.reason(), RejectReason::DeadlineExceeded);
    assert_eq!(upstream.hits(), 2);

    let body = read_to_end(response.into_body()).await.unwrap();
    assert_eq!(body, TOKENS_3);
    assert_eq!(
        layers.concurrency().unwrap().available_slots(),
        1,
        "freed at the end"
    );

    let snapshot = metrics.snapshot();
    assert_eq!(
        snapshot.count("stream_retries", &[TEST, ("outcome", "success")]),
        1.0
    );
    assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 0.0);

    // Without a limit or retry, the same stack type: one attempt, the 503 goes back.
    let upstream = Upstream::start(|_| Reply::status(503)).await;
    let config = parse(r#"{"stream_retry": {"enabled": false}}"#);
    let service = ServiceBuilder::new()
        .layer(config.layer("test").unwrap())
        .service(client(Protocol::Http1));
    let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(upstream.hits(), 1);
    let body = read_to_end(response.into_body()).await.unwrap();
    assert_eq!(&body[..], br#"{"error":{"message":"injected"}}"#);
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_applies_between_chunks_after_the_first_and_is_not_retried() {
    // 10 s before every event, the first included. The idle timeout (1 s) is shorter,
    // yet the first event, within the first-chunk timeout (30 s), arrives: before it,
    // only the first-chunk timeout counts.
    let upstream = Upstream::start(|_| Reply::tokens(3).gap(Duration::from_secs(10))).await;
    for limit in ["0", "4"] {
        let config = parse(&format!(
            r#"{{"stream_max_concurrent": {limit}, "stream_idle_timeout": "1s", "first_chunk_timeout": "30s"}}"#
        ));
        let layers = config.layer("test").unwrap();
        let service = ServiceBuilder::new()
            .layer(layers.clone())
            .service(client(Protocol::Http1));
        let hits = upstream.hits();

        let started = Instant::now();
        let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(10), "limit {limit}");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(first.starts_with(b"data: "), "{first:?}");

        // Then 10 s of silence: the body fails after 1 s of waiting.
        let waiting = Instant::now();
        let error = read_until_error(&mut body).await;
        assert_eq!(waiting.elapsed(), Duration::from_secs(1), "limit {limit}");
        assert!(
            error.is::<tower_http::timeout::TimeoutError>(),
            "limit {limit}: {error:?}"
        );
        assert!(!error.is::<FirstChunkError>());
        assert_eq!(
            upstream.hits(),
            hits + 1,
            "limit {limit}: never retried after the first chunk"
        );

        // The slot is held until the caller drops the body (the upstream stream is
        // still open until then).
        if let Some(limit) = layers.concurrency() {
            assert_eq!(limit.available_slots(), 3);
            drop(body);
            assert_eq!(limit.available_slots(), 4);
        }
    }

    // A stall after the first event: the same.
    let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
    let config = parse(r#"{"stream_idle_timeout": "2s"}"#);
    let service = ServiceBuilder::new()
        .layer(config.layer("test").unwrap())
        .service(client(Protocol::Http1));
    let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
    let mut body = response.into_body();
    let waiting = Instant::now();
    let error = read_until_error(&mut body).await;
    assert_eq!(waiting.elapsed(), Duration::from_secs(2));
    assert!(error.is::<tower_http::timeout::TimeoutError>(), "{error:?}");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stall_before_the_first_chunk_is_the_first_chunk_timeouts_to_retry() {
    // Stalls before the first event on the first hit, then streams. The idle timeout is
    // shorter than the stall and plays no part: the first-chunk timeout fires, and the
    // call is retried.
    let upstream = Upstream::start(|hit| {
        if hit.index == 0 {
            Reply::faulty(3, Fault::StallBeforeFirst)
        } else {
            Reply::tokens(3)
        }
    })
    .await;
    let config = parse(
        r#"{"first_chunk_timeout": "5s", "stream_idle_timeout": "1s",
            "stream_retry": {"initial_delay": "0s", "max_delay": "0s"}}"#,
    );
    let service = ServiceBuilder::new()
        .layer(config.layer("test").unwrap())
        .service(client(Protocol::Http1));
    let started = Instant::now();
    let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(upstream.hits(), 2);
    assert_eq!(read_to_end(response.into_body()).await.unwrap(), TOKENS_3);
}

#[tokio::test(start_paused = true)]
async fn retry_maybe_processed_false_retries_only_what_the_upstream_did_not_process() {
    let config = parse(
        r#"{"first_chunk_timeout": "1s",
            "stream_retry": {"initial_delay": "0s", "max_delay": "0s", "retry_maybe_processed": false}}"#,
    );
    assert!(
        !config
            .layer("test")
            .unwrap()
            .policy()
            .get_retry_maybe_processed()
    );
    for protocol in support::BOTH {
        // A stall after the request was written: the upstream may be working on it.
        let upstream = Upstream::start(|hit| match hit.index {
            0 => Reply::faulty(3, Fault::StallBeforeFirst),
            _ => Reply::tokens(3),
        })
        .await;
        let service = ServiceBuilder::new()
            .layer(config.layer("test").unwrap())
            .service(client(protocol));
        let error = service.oneshot(post(&upstream.url("/"))).await.unwrap_err();
        let error = error
            .downcast_ref::<FirstChunkError>()
            .unwrap_or_else(|| panic!("{error}"));
        assert_eq!(
            error.stop_reason(),
            tower_stream_backpressure::retry::StopReason::MaybeProcessed,
            "{protocol:?}"
        );
        assert_eq!(upstream.hits(), 1, "{protocol:?}: not sent again");

        // A 503 refuses the work: retried.
        let upstream = Upstream::start(|hit| match hit.index {
            0 => Reply::status(503),
            _ => Reply::tokens(3),
        })
        .await;
        let service = ServiceBuilder::new()
            .layer(config.layer("test").unwrap())
            .service(client(protocol));
        let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
        assert_eq!(read_to_end(response.into_body()).await.unwrap(), TOKENS_3);
        assert_eq!(upstream.hits(), 2, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn max_queued_bounds_the_callers_waiting_for_a_slot() {
    assert_eq!(parse(r#"{"max_queued": null}"#).max_queued, None);
    assert_eq!(parse(r#"{"max_queued": "16"}"#).max_queued, Some(16));
    let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
    let config = parse(r#"{"stream_max_concurrent": 1, "max_queued": 0}"#);
    let layers = config.layer("test").unwrap();
    assert_eq!(layers.concurrency().unwrap().get_max_queued(), Some(0));
    let service = ServiceBuilder::new()
        .layer(layers)
        .service(client(Protocol::Http1));
    let _held = service
        .clone()
        .oneshot(post(&upstream.url("/")))
        .await
        .unwrap();
    let started = Instant::now();
    let error = service.oneshot(post(&upstream.url("/"))).await.unwrap_err();
    let rejected = error.downcast_ref::<Rejected>().expect("a rejection");
    assert_eq!(rejected.reason(), RejectReason::QueueFull);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_stack_body_reports_its_end_and_size_as_the_upstream_does() {
    let json = r#"{"id":"chatcmpl-1","object":"chat.completion"}"#;
    let upstream = Upstream::start(move |_| Reply::Status {
        status: http::StatusCode::OK,
        headers: vec![
            ("content-type", "application/json".to_owned()),
            ("content-length", json.len().to_string()),
        ],
        body: bytes::Bytes::from_static(json.as_bytes()),
    })
    .await;
    for limit in ["0", "4"] {
        let config = parse(&format!(r#"{{"stream_max_concurrent": {limit}}}"#));
        let service = ServiceBuilder::new()
            .layer(config.layer("test").unwrap())
            .service(client(Protocol::Http1));
        let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
        let mut body = response.into_body();
        assert_eq!(
            body.size_hint().exact(),
            Some(json.len() as u64),
            "limit {limit}"
        );
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), json.as_bytes());
        assert!(
            body.is_end_stream(),
            "limit {limit}: ended with its last byte"
        );
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
