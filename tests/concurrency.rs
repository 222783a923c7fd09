//! StreamConcurrencyLayer against a real hyper upstream on loopback, both protocols,
//! checked on the upstream's own counts.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body::Body as _;
use http_body_util::BodyExt;
use support::{
    BOTH, Fault, Metrics, Protocol, Reply, TEST, Upstream, client, full_stack, post, read_to_end,
    read_until_error,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_stream_backpressure::concurrency::{Adaptive, IdleTimeout, MaxWait, ResponseBody};
use tower_stream_backpressure::{
    RejectReason, Rejected, RetryBudget, RetryPolicy, StreamConcurrencyLayer,
};

type Limited = tower_stream_backpressure::concurrency::StreamConcurrency<support::HyperClient>;

/// One call through `service` to `path` on `upstream`.
async fn call(
    service: &Limited,
    upstream: &Upstream,
    path: &str,
) -> Result<http::Response<ResponseBody<hyper::body::Incoming>>, tower::BoxError> {
    service.clone().oneshot(post(&upstream.url(path))).await
}

fn rejected(error: &tower::BoxError) -> &Rejected {
    error
        .downcast_ref::<Rejected>()
        .unwrap_or_else(|| panic!("expected Rejected, got {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_for_500_concurrent_streams() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::tokens(5).gap(Duration::from_millis(1))).await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::new(16);
        let service = full_stack(
            client(protocol),
            &metrics.meter(),
            limit.clone(),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let calls = (0..500).map(|_| {
            let service = service.clone();
            let url = upstream.url("/v1/chat/completions");
            tokio::spawn(async move {
                let response = service.oneshot(post(&url)).await?;
                read_to_end(response.into_body()).await
            })
        });
        let mut ok = 0;
        for call in calls.collect::<Vec<_>>() {
            let body = call.await.expect("no panic").expect("the call succeeds");
            assert!(body.ends_with(b"data: [DONE]\n\n"));
            ok += 1;
        }
        assert_eq!(ok, 500, "{protocol:?}");
        assert_eq!(upstream.hits(), 500, "{protocol:?}: one attempt per call");
        assert_eq!(upstream.completed_streams(), 500, "{protocol:?}");
        assert_eq!(
            upstream.peak_streams(),
            16,
            "{protocol:?}: the upstream saw the limit reached, never exceeded"
        );
        assert_eq!(
            limit.available_slots(),
            16,
            "{protocol:?}: every slot came back"
        );
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 0.0);
        assert_eq!(snapshot.count("provider_calls_in_flight", &[TEST]), 0.0);
    }
}

#[tokio::test(start_paused = true)]
async fn the_slot_is_held_until_the_stream_ends_not_until_headers() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::tokens(3).gap(Duration::from_secs(1))).await;
        let limit = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
        let service = limit.layer(client(protocol));

        let response = call(&service, &upstream, "/").await.unwrap();
        assert_eq!(
            limit.available_slots(),
            0,
            "{protocol:?}: headers did not free the slot"
        );
        assert_eq!(upstream.open_streams(), 1);

        let error = call(&service, &upstream, "/").await.unwrap_err();
        assert_eq!(rejected(&error).reason(), RejectReason::DeadlineExceeded);
        assert_eq!(
            upstream.hits(),
            1,
            "{protocol:?}: a rejected call does no HTTP work"
        );

        // Mid-stream, both ends still hold the stream.
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(limit.available_slots(), 0, "{protocol:?}");
        assert_eq!(upstream.open_streams(), 1, "{protocol:?}");

        // Read to the end but keep the body object: the slot is free.
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        assert_eq!(
            limit.available_slots(),
            1,
            "{protocol:?}: released at end of stream"
        );

        let next = call(&service, &upstream, "/").await.unwrap();
        read_to_end(next.into_body()).await.unwrap();
        assert_eq!(upstream.hits(), 2);
        drop(body);
        assert_eq!(limit.available_slots(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_read_to_its_exact_length_frees_the_slot_without_a_final_poll() {
    for protocol in BOTH {
        // A Content-Length body: the consumer may stop after the last byte.
        let upstream = Upstream::start(|_| Reply::status(200)).await;
        let limit = StreamConcurrencyLayer::new(1);
        let service = limit.layer(client(protocol));
        let response = call(&service, &upstream, "/").await.unwrap();
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
        assert!(http_body::Body::is_end_stream(&body));
        assert_eq!(limit.available_slots(), 1, "{protocol:?}");
        assert_eq!(
            upstream.completed_streams(),
            1,
            "{protocol:?}: sent in full"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_body_frees_the_slot_at_once() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::status(204)).await;
        let limit = StreamConcurrencyLayer::new(1);
        let service = limit.layer(client(protocol));
        let response = call(&service, &upstream, "/").await.unwrap();
        assert_eq!(response.status(), 204);
        assert_eq!(
            limit.available_slots(),
            1,
            "{protocol:?}: never polled, yet released"
        );
        assert_eq!(upstream.hits(), 1);
        assert_eq!(
            upstream.open_streams(),
            0,
            "{protocol:?}: the upstream is done too"
        );
        drop(response);
    }
}

#[tokio::test(start_paused = true)]
async fn errors_release_the_slot_and_pass_through_unchanged() {
    for protocol in BOTH {
        let upstream = Upstream::start(|hit| match hit.path.as_str() {
            "/drop" => Reply::DropConnection,
            "/reset" => Reply::faulty(3, Fault::ResetAfter(1)),
            _ => Reply::tokens(1),
        })
        .await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::new(1)
            .meter(metrics.meter())
            .provider("test");
        let service = limit.layer(client(protocol));

        // The inner service fails: its own error type comes back.
        let error = call(&service, &upstream, "/drop").await.unwrap_err();
        assert!(
            error
                .downcast_ref::<hyper_util::client::legacy::Error>()
                .is_some(),
            "{protocol:?}: {error:?}"
        );
        assert_eq!(
            limit.available_slots(),
            1,
            "{protocol:?}: released on inner error"
        );

        // The body fails mid-stream.
        let response = call(&service, &upstream, "/reset").await.unwrap();
        let mut body = response.into_body();
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(limit.available_slots(), 0);
        let failed = read_until_error(&mut body).await;
        assert!(failed.is::<hyper::Error>(), "{failed:?}");
        assert_eq!(
            limit.available_slots(),
            1,
            "{protocol:?}: released on body error"
        );
        assert_eq!(metrics.snapshot().count("streams_in_flight", &[TEST]), 0.0);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_releases_the_slot() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::Hang).await;
        let limit = StreamConcurrencyLayer::new(1);
        let service = limit.layer(client(protocol));
        let pending = call(&service, &upstream, "/");
        assert!(
            tokio::time::timeout(Duration::from_secs(5), pending)
                .await
                .is_err()
        );
        assert_eq!(limit.available_slots(), 1, "{protocol:?}");
        assert_eq!(upstream.hits(), 1);
        // The upstream saw the abandoned call go away too.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(upstream.open_streams(), 0, "{protocol:?}");
    }
}

/// A concurrency layer with a limit of `n`.
type LayerOf = fn(usize) -> StreamConcurrencyLayer;

/// A limit of `n`, fixed, and adaptive with `n` as its only value: what the fixed limit
/// does, the adaptive one does too.
const KINDS: [(&str, LayerOf); 2] = [
    ("fixed", StreamConcurrencyLayer::new),
    ("adaptive", |n| {
        StreamConcurrencyLayer::adaptive(Adaptive::default().initial(n).min(n).max(n))
    }),
];

#[tokio::test(start_paused = true)]
async fn max_wait_rejects_with_deadline_exceeded_and_counts_it() {
    for (protocol, (kind, layer)) in BOTH.into_iter().flat_map(|p| KINDS.map(|k| (p, k))) {
        let at = format!("{kind} over {protocol:?}");
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
        let metrics = Metrics::new();
        let limit = layer(1)
            .max_wait(Duration::from_secs(2))
            .meter(metrics.meter())
            .provider("test");
        let service = limit.layer(client(protocol));
        let held = call(&service, &upstream, "/").await.unwrap();

        let started = Instant::now();
        let error = call(&service, &upstream, "/").await.unwrap_err();
        let rejection = rejected(&error);
        assert_eq!(rejection.reason(), RejectReason::DeadlineExceeded);
        assert_eq!(rejection.waited(), Duration::from_secs(2));
        assert_eq!(rejection.limit(), 1);
        assert_eq!(started.elapsed(), Duration::from_secs(2), "{at}");
        assert!(error.to_string().contains("deadline_exceeded"));

        // A request extension overrides the layer's max_wait.
        let mut fail_fast = post(&upstream.url("/"));
        fail_fast
            .extensions_mut()
            .insert(MaxWait::new(Duration::ZERO));
        let started = Instant::now();
        let error = service.clone().oneshot(fail_fast).await.unwrap_err();
        assert_eq!(rejected(&error).waited(), Duration::ZERO);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            upstream.hits(),
            1,
            "{at}: rejected calls never reached upstream"
        );

        let snapshot = metrics.snapshot();
        let reason = ("reason", "deadline_exceeded");
        assert_eq!(
            snapshot.count("stream_concurrency_rejections", &[TEST, reason]),
            2.0
        );
        assert_eq!(
            snapshot.value(
                "stream_concurrency_rejections",
                &[TEST, ("reason", "context_canceled")]
            ),
            None
        );
        let wait = snapshot
            .histogram("stream_concurrency_wait", &[TEST])
            .unwrap();
        assert_eq!(wait.count, 3, "granted at once, 2 s, 0 s");
        assert!((wait.sum - 2.0).abs() < 1e-9, "{wait:?}");
        assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 1.0);
        drop(held);
        assert_eq!(metrics.snapshot().count("streams_in_flight", &[TEST]), 0.0);
        assert_eq!(limit.available_slots(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_caller_that_gives_up_is_counted_and_leaks_nothing() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
        let metrics = Metrics::new();
        // No max_wait: a call waits until its caller gives up.
        let limit = StreamConcurrencyLayer::new(1)
            .meter(metrics.meter())
            .provider("test");
        let service = limit.layer(client(protocol));
        let held = call(&service, &upstream, "/").await.unwrap();

        let waiting = call(&service, &upstream, "/");
        assert!(
            tokio::time::timeout(Duration::from_secs(60), waiting)
                .await
                .is_err()
        );

        let snapshot = metrics.snapshot();
        let reason = ("reason", "context_canceled");
        assert_eq!(
            snapshot.count("stream_concurrency_rejections", &[TEST, reason]),
            1.0
        );
        let wait = snapshot
            .histogram("stream_concurrency_wait", &[TEST])
            .unwrap();
        assert!((wait.max - 60.0).abs() < 1e-9, "{wait:?}");
        assert_eq!(upstream.hits(), 1, "{protocol:?}");

        drop(held);
        assert_eq!(limit.available_slots(), 1, "{protocol:?}: nothing leaked");
        let next = call(&service, &upstream, "/").await.unwrap();
        drop(next);
        assert_eq!(upstream.hits(), 2);
        assert_eq!(metrics.snapshot().count("streams_in_flight", &[TEST]), 0.0);
    }
}

#[tokio::test(start_paused = true)]
async fn waiters_get_slots_in_arrival_order() {
    for (kind, layer) in KINDS {
        waiters_in_order(kind, layer(1)).await;
    }
}

async fn waiters_in_order(kind: &str, limit: StreamConcurrencyLayer) {
    let order = Arc::new(Mutex::new(Vec::new()));
    let upstream = {
        let order = order.clone();
        Upstream::start(move |hit| {
            order.lock().unwrap().push(hit.path.clone());
            Reply::tokens(1)
        })
        .await
    };
    let service = limit.layer(client(Protocol::Http1));
    let held = call(&service, &upstream, "/held").await.unwrap();

    let mut waiters = Vec::new();
    for name in ["/a", "/b", "/c", "/d"] {
        let waiter = service.clone().oneshot(post(&upstream.url(name)));
        waiters.push(tokio::spawn(async move {
            read_to_end(waiter.await?.into_body()).await
        }));
        // Let it queue before the next one arrives.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(held);
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        ["/held", "/a", "/b", "/c", "/d"],
        "{kind}"
    );
}

#[tokio::test(start_paused = true)]
async fn max_queued_rejects_at_once_when_the_queue_is_full() {
    for (protocol, (kind, layer)) in BOTH.into_iter().flat_map(|p| KINDS.map(|k| (p, k))) {
        let at = format!("{kind} over {protocol:?}");
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
        let metrics = Metrics::new();
        let limit = layer(1)
            .max_queued(2)
            .meter(metrics.meter())
            .provider("test");
        let service = limit.layer(client(protocol));
        let held = call(&service, &upstream, "/").await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (service, url) = (service.clone(), upstream.url("/"));
                tokio::spawn(async move { service.oneshot(post(&url)).await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;

        // Two wait: the third fails at once, without reaching the upstream.
        let started = Instant::now();
        let error = call(&service, &upstream, "/").await.unwrap_err();
        assert_eq!(rejected(&error).reason(), RejectReason::QueueFull);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(error.to_string().contains("queue_full"), "{error}");
        assert_eq!(upstream.hits(), 1, "{at}");
        let queue_full = [TEST, ("reason", "queue_full")];
        let snapshot = metrics.snapshot();
        assert_eq!(
            snapshot.count("stream_concurrency_rejections", &queue_full),
            1.0
        );

        // The waiters get the slot in turn; then the queue has room again.
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        assert_eq!(upstream.hits(), 3, "{at}");
        drop(call(&service, &upstream, "/").await.unwrap());
        assert_eq!(limit.available_slots(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_callers_hold_no_readiness_of_the_inner_service() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
        let limit = StreamConcurrencyLayer::new(1).max_wait(Duration::from_millis(300));
        // A buffer of one: a caller that kept it reserved would stall all the others.
        let service = limit.layer(tower::buffer::Buffer::new(client(protocol), 1));
        let url = upstream.url("/");
        let held = service.clone().oneshot(post(&url)).await.unwrap();

        let started = Instant::now();
        let caller = || {
            let (service, url) = (service.clone(), url.clone());
            async move {
                let result = service.oneshot(post(&url)).await.map(drop);
                (result, started.elapsed())
            }
        };
        let (a, b, c) = tokio::join!(caller(), caller(), caller());
        for (result, elapsed) in [a, b, c] {
            let error = result.unwrap_err();
            assert_eq!(rejected(&error).reason(), RejectReason::DeadlineExceeded);
            assert_eq!(rejected(&error).waited(), Duration::from_millis(300));
            assert_eq!(
                elapsed,
                Duration::from_millis(300),
                "{protocol:?}: each gives up after its own 300 ms, side by side"
            );
        }
        assert_eq!(upstream.hits(), 1, "{protocol:?}");
        drop(held);
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_loses_its_stream_after_the_idle_timeout() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::new(1)
            .idle_timeout(Duration::from_secs(10))
            .meter(metrics.meter())
            .provider("test");
        let service = limit.layer(client(protocol));
        let mut body = call(&service, &upstream, "/").await.unwrap().into_body();
        // The reader takes the first event, then neither reads nor drops the body.
        body.frame().await.unwrap().unwrap();

        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(
            limit.available_slots(),
            0,
            "{protocol:?}: not before the timeout"
        );
        assert_eq!(upstream.open_streams(), 1);

        // By a quarter of the timeout after it (12.5 s), the stream is ended.
        tokio::time::sleep(Duration::from_millis(3600)).await;
        assert_eq!(limit.available_slots(), 1, "{protocol:?}: the slot is free");
        assert_eq!(
            upstream.open_streams(),
            0,
            "{protocol:?}: the upstream saw its stream closed"
        );
        assert_eq!(metrics.snapshot().count("streams_in_flight", &[TEST]), 0.0);
        assert!(!body.is_end_stream(), "the error is still to come");
        let error = body.frame().await.unwrap().unwrap_err();
        let timeout = error
            .downcast_ref::<IdleTimeout>()
            .unwrap_or_else(|| panic!("{protocol:?}: {error}"));
        assert_eq!(timeout.timeout(), Duration::from_secs(10));
        assert!(error.to_string().contains("idle_timeout"), "{error}");
        assert!(body.frame().await.is_none(), "once, then the end");
        assert!(body.is_end_stream());
        assert_eq!(upstream.hits(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_reader_waiting_for_a_slow_upstream_is_not_idle() {
    for protocol in BOTH {
        // Twenty seconds between events, twice the idle timeout.
        let upstream = Upstream::start(|_| Reply::tokens(2).gap(Duration::from_secs(20))).await;
        let limit = StreamConcurrencyLayer::new(1).idle_timeout(Duration::from_secs(10));
        let service = limit.layer(client(protocol));
        let started = Instant::now();
        let response = call(&service, &upstream, "/").await.unwrap();
        let body = read_to_end(response.into_body()).await.unwrap();
        assert!(body.ends_with(b"data: [DONE]\n\n"), "{protocol:?}");
        assert!(started.elapsed() >= Duration::from_secs(60));
        assert_eq!(upstream.completed_streams(), 1, "{protocol:?}");
        assert_eq!(limit.available_slots(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn through_the_retry_layer_the_slot_is_held_across_retries_until_the_stream_ends() {
    for protocol in BOTH {
        // The first attempt is overloaded; the second streams, one event a second.
        let upstream = Upstream::start(|hit| {
            if hit.index == 0 {
                Reply::status(503)
            } else {
                Reply::tokens(3).gap(Duration::from_secs(1))
            }
        })
        .await;
        let metrics = Metrics::new();
        let limit = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
        let service = full_stack(
            client(protocol),
            &metrics.meter(),
            limit.clone(),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let url = upstream.url("/v1/chat/completions");
        let response = service.clone().oneshot(post(&url)).await.unwrap();
        assert_eq!(upstream.hits(), 2, "{protocol:?}: one retry");
        assert_eq!(
            limit.available_slots(),
            0,
            "{protocol:?}: held by the stream"
        );
        let error = service.clone().oneshot(post(&url)).await.unwrap_err();
        assert_eq!(rejected(&error).reason(), RejectReason::DeadlineExceeded);
        assert_eq!(
            upstream.hits(),
            2,
            "{protocol:?}: the rejected call sent nothing"
        );

        // Read to the end, the body kept: the slot and the attempt's count are free.
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        assert_eq!(
            limit.available_slots(),
            1,
            "{protocol:?}: released at the end"
        );
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.count("streams_in_flight", &[TEST]), 0.0);
        assert_eq!(snapshot.count("provider_calls_in_flight", &[TEST]), 0.0);
        assert_eq!(upstream.peak_streams(), 1, "{protocol:?}");

        // Dropped mid-stream, a stream frees its slot at once.
        let response = service.clone().oneshot(post(&url)).await.unwrap();
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(limit.available_slots(), 0, "{protocol:?}: mid-stream");
        drop(body);
        assert_eq!(limit.available_slots(), 1, "{protocol:?}: dropped");
        drop(service);

        // A call whose retries run out frees its slot with its error.
        let upstream = Upstream::start(|_| Reply::status(503)).await;
        let service = full_stack(
            client(protocol),
            &metrics.meter(),
            limit.clone(),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(upstream.hits(), 3, "{protocol:?}: max_attempts");
        drop(response);
        assert_eq!(
            limit.available_slots(),
            1,
            "{protocol:?}: after the last 503"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn with_the_retry_layer_below_a_stalled_reader_still_loses_its_stream() {
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
        let metrics = Metrics::new();
        // The idle sweep keeps the slot in the concurrency layer's body, which it ends.
        let limit = StreamConcurrencyLayer::new(1).idle_timeout(Duration::from_secs(10));
        let service = full_stack(
            client(protocol),
            &metrics.meter(),
            limit.clone(),
            RetryBudget::default(),
            RetryPolicy::default(),
        );
        let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(12_600)).await;
        assert_eq!(limit.available_slots(), 1, "{protocol:?}: the slot is free");
        assert_eq!(
            upstream.open_streams(),
            0,
            "{protocol:?}: the stream closed"
        );
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.downcast_ref::<IdleTimeout>().is_some(), "{error}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_timeout_between_the_layers_frees_the_slot_with_its_error() {
    use tower::ServiceBuilder;
    use tower_http::timeout::ResponseBodyTimeoutLayer;
    use tower_stream_backpressure::FirstChunkRetryLayer;
    for protocol in BOTH {
        let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
        let limit = StreamConcurrencyLayer::new(1);
        // The retry layer's body carries the slot; the timeout between ends the stream
        // without that body seeing an end of its own.
        let service = ServiceBuilder::new()
            .layer(limit.clone())
            .layer(ResponseBodyTimeoutLayer::new(Duration::from_secs(5)))
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .service(client(protocol));
        let response = service.oneshot(post(&upstream.url("/"))).await.unwrap();
        let mut body = std::pin::pin!(response.into_body());
        body.frame().await.unwrap().unwrap();
        assert_eq!(limit.available_slots(), 0, "{protocol:?}: mid-stream");
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("timeout"), "{error}");
        assert_eq!(
            limit.available_slots(),
            1,
            "{protocol:?}: freed with the error, though the body is kept"
        );
        assert!(body.frame().await.is_none(), "{protocol:?}: then the end");
        assert!(body.is_end_stream());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            upstream.open_streams(),
            0,
            "{protocol:?}: the stream closed"
        );
        assert_eq!(upstream.hits(), 1);
    }
}
