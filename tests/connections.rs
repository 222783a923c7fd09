//! ConnectionGaugeLayer under hyper-util's pooled client against a real upstream on
//! loopback: one connection per concurrent stream over HTTP/1.1, one for every stream
//! over HTTP/2, the per-host cap, and failed connects.

#![cfg(feature = "connection-gauge")]

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{
    Fault, Metrics, Protocol, Reply, TEST, Upstream, parse_prometheus, post, prometheus_value,
    read_to_end,
};
use tower::{Layer, Service};
use tower_stream_backpressure::ConnectionGaugeLayer;
use tower_stream_backpressure::connection::ConnectionGauge;
use tower_stream_backpressure::metrics::HTTP_CLIENT_OPEN_CONNECTIONS;

/// hyper-util's `HttpConnector`, counting the connects that reach it.
#[derive(Clone)]
struct Counting {
    inner: HttpConnector,
    connects: Arc<AtomicUsize>,
}

impl Service<Uri> for Counting {
    type Response = <HttpConnector as Service<Uri>>::Response;
    type Error = <HttpConnector as Service<Uri>>::Error;
    type Future = <HttpConnector as Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.call(uri)
    }
}

type Counted = Client<ConnectionGauge<Counting>, Full<Bytes>>;

/// A client whose connections are counted by `layer` (recording to `metrics` under
/// provider `"test"`), and the count of connects that reached the `HttpConnector`.
fn counted_client(
    protocol: Protocol,
    layer: &ConnectionGaugeLayer,
    metrics: &Metrics,
) -> (Counted, Arc<AtomicUsize>, ConnectionGaugeLayer) {
    let layer = layer.clone().meter(metrics.meter()).provider("test");
    let mut inner = HttpConnector::new();
    inner.set_nodelay(true);
    let connects = Arc::new(AtomicUsize::new(0));
    let connector = layer.layer(Counting {
        inner,
        connects: connects.clone(),
    });
    let mut builder = Client::builder(TokioExecutor::new());
    if protocol == Protocol::Http2 {
        builder.http2_only(true);
    }
    (builder.build(connector), connects, layer)
}

/// `http_client_open_connections{provider="test"}`, read back from the SDK, checked
/// against the layer's own count.
fn gauge(metrics: &Metrics, layer: &ConnectionGaugeLayer) -> usize {
    let value = metrics
        .snapshot()
        .count(HTTP_CLIENT_OPEN_CONNECTIONS, &[TEST]);
    assert_eq!(
        value,
        layer.open_connections() as f64,
        "the metric and the layer agree"
    );
    layer.open_connections()
}

/// Waits (in real time, up to 10 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `n` calls to `url` made at once; resolves when every response's headers are in.
async fn concurrent_calls(
    client: &Counted,
    url: &str,
    n: usize,
) -> Vec<http::Response<hyper::body::Incoming>> {
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(client.request(post(url))))
        .collect();
    let mut responses = Vec::new();
    for call in calls {
        let response = call.await.expect("no panic").expect("the call succeeds");
        assert_eq!(response.status(), 200);
        responses.push(response);
    }
    responses
}

/// Runs `futures` at once, each in a task of its own, and waits for all of them.
async fn all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for task in tasks {
        outputs.push(task.await.expect("no panic"));
    }
    outputs
}

#[tokio::test]
async fn http1_one_connection_per_concurrent_stream_pooled_until_the_client_drops() {
    let upstream = Upstream::start(|_| Reply::tokens(3).gap(Duration::from_millis(5))).await;
    let metrics = Metrics::new();
    let (client, connects, layer) =
        counted_client(Protocol::Http1, &ConnectionGaugeLayer::new(), &metrics);
    let url = upstream.url("/v1/chat/completions");

    // No body is read before every response is in, so no connection can be reused.
    let responses = concurrent_calls(&client, &url, 4).await;
    assert_eq!(connects.load(Ordering::SeqCst), 4);
    assert_eq!(gauge(&metrics, &layer), 4);
    let samples = parse_prometheus(&metrics.prometheus_text());
    assert_eq!(
        prometheus_value(&samples, "http_client_open_connections", &[TEST]),
        Some(4.0),
        "the Prometheus name"
    );

    for body in all(responses.into_iter().map(|r| read_to_end(r.into_body()))).await {
        assert!(body.unwrap().ends_with(b"data: [DONE]\n\n"));
    }
    // The streams ended; their connections went back to the pool, still open.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(gauge(&metrics, &layer), 4);
    // And serve the next calls: no new connection.
    for _ in 0..4 {
        let response = client.request(post(&url)).await.unwrap();
        read_to_end(response.into_body()).await.unwrap();
    }
    assert_eq!(connects.load(Ordering::SeqCst), 4);
    assert_eq!(gauge(&metrics, &layer), 4);
    assert_eq!(upstream.hits(), 8);

    // Dropping the client closes its idle connections.
    drop(client);
    eventually("every connection closed", || layer.open_connections() == 0).await;
    assert_eq!(gauge(&metrics, &layer), 0);
}

#[tokio::test]
async fn http1_sequential_calls_reuse_one_pooled_connection() {
    let upstream = Upstream::start(|_| Reply::tokens(3)).await;
    let metrics = Metrics::new();
    let (client, connects, layer) =
        counted_client(Protocol::Http1, &ConnectionGaugeLayer::new(), &metrics);
    for _ in 0..5 {
        let response = client
            .request(post(&upstream.url("/v1/chat/completions")))
            .await
            .unwrap();
        read_to_end(response.into_body()).await.unwrap();
        assert_eq!(gauge(&metrics, &layer), 1);
        // Lets hyper-util put the connection back in the pool (a task it spawned,
        // woken by the end of the body) before the next call looks there.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(connects.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.hits(), 5);
    drop(client);
    eventually("the connection closed", || layer.open_connections() == 0).await;
    assert_eq!(gauge(&metrics, &layer), 0);
}

#[tokio::test]
async fn http1_a_body_dropped_before_its_end_closes_its_connection() {
    let upstream = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
    let metrics = Metrics::new();
    let (client, connects, layer) =
        counted_client(Protocol::Http1, &ConnectionGaugeLayer::new(), &metrics);
    let mut responses = concurrent_calls(&client, &upstream.url("/stalls"), 3).await;
    // The stalled streams never end: all three are open upstream, each on a connection.
    assert_eq!(upstream.open_streams(), 3);
    assert_eq!(upstream.peak_streams(), 3);
    assert_eq!(connects.load(Ordering::SeqCst), 3);
    assert_eq!(gauge(&metrics, &layer), 3);

    // An HTTP/1.1 connection cannot be reused with a response unread: hyper closes it,
    // while the client lives on.
    responses.pop();
    eventually("one connection closed", || layer.open_connections() == 2).await;
    assert_eq!(gauge(&metrics, &layer), 2);
    drop(responses);
    eventually("every connection closed", || layer.open_connections() == 0).await;
    assert_eq!(gauge(&metrics, &layer), 0);
    drop(client);
}

#[tokio::test]
async fn http2_every_stream_on_one_connection() {
    for cap in [None, Some(1)] {
        let upstream = Upstream::start(|hit| match hit.path.as_str() {
            "/stalls" => Reply::faulty(3, Fault::StallAfter(1)),
            "/drop" => Reply::DropConnection,
            _ => Reply::tokens(3).gap(Duration::from_millis(5)),
        })
        .await;
        let metrics = Metrics::new();
        let layer = match cap {
            Some(cap) => ConnectionGaugeLayer::new().max_per_host(cap),
            None => ConnectionGaugeLayer::new(),
        };
        let (client, connects, layer) = counted_client(Protocol::Http2, &layer, &metrics);

        // 50 streams open at once (stalled, they never end), all on one connection.
        let stalled = concurrent_calls(&client, &upstream.url("/stalls"), 50).await;
        assert_eq!(upstream.open_streams(), 50, "{cap:?}");
        assert_eq!(connects.load(Ordering::SeqCst), 1, "{cap:?}");
        assert_eq!(gauge(&metrics, &layer), 1, "{cap:?}");
        // Dropping them resets the streams, not the connection.
        drop(stalled);
        eventually("the streams reset", || upstream.open_streams() == 0).await;
        assert_eq!(gauge(&metrics, &layer), 1, "{cap:?}");

        // 50 more, read to their end, on the same connection.
        let responses = concurrent_calls(&client, &upstream.url("/tokens"), 50).await;
        for body in all(responses.into_iter().map(|r| read_to_end(r.into_body()))).await {
            assert!(body.unwrap().ends_with(b"data: [DONE]\n\n"));
        }
        assert_eq!(upstream.completed_streams(), 50, "{cap:?}");
        assert_eq!(connects.load(Ordering::SeqCst), 1, "{cap:?}");
        assert_eq!(gauge(&metrics, &layer), 1, "{cap:?}");

        // When the upstream drops the connection, its IO is dropped and the next call
        // connects again (at a cap of 1, into the place the old connection freed).
        let dropped = client.request(post(&upstream.url("/drop"))).await;
        assert!(
            dropped.is_err(),
            "{cap:?}: the upstream closed the connection"
        );
        eventually("the connection closed", || layer.open_connections() == 0).await;
        let response = client
            .request(post(&upstream.url("/tokens")))
            .await
            .unwrap();
        read_to_end(response.into_body()).await.unwrap();
        assert_eq!(connects.load(Ordering::SeqCst), 2, "{cap:?}");
        assert_eq!(gauge(&metrics, &layer), 1, "{cap:?}");

        drop(client);
        eventually("the connection closed", || layer.open_connections() == 0).await;
        assert_eq!(gauge(&metrics, &layer), 0, "{cap:?}");
    }
}

#[tokio::test]
async fn http1_max_per_host_holds_and_every_call_completes() {
    let upstream = Upstream::start(|hit| match hit.path.as_str() {
        "/drop" => Reply::DropConnection,
        _ => Reply::tokens(3).gap(Duration::from_millis(10)),
    })
    .await;
    let metrics = Metrics::new();
    let (client, connects, layer) = counted_client(
        Protocol::Http1,
        &ConnectionGaugeLayer::new().max_per_host(2),
        &metrics,
    );
    let url = upstream.url("/v1/chat/completions");
    let calls = (0..6).map(|_| {
        let call = client.request(post(&url));
        async move { read_to_end(call.await?.into_body()).await }
    });
    for body in all(calls).await {
        assert!(body.unwrap().ends_with(b"data: [DONE]\n\n"));
    }
    assert_eq!(upstream.hits(), 6);
    assert_eq!(upstream.completed_streams(), 6);
    // Only two connects ever reached the connector, so no more than two connections
    // were ever open: the other four calls waited, and each got one of the two
    // connections from the pool when a stream on it ended.
    assert_eq!(connects.load(Ordering::SeqCst), 2);
    assert!(upstream.peak_streams() <= 2, "{}", upstream.peak_streams());
    assert_eq!(gauge(&metrics, &layer), 2);

    // The connects of those four calls still wait for a place, in tasks hyper-util
    // spawned for them. When a connection closes (here the upstream drops it), the
    // oldest takes the freed place and opens a connection into the pool, though no
    // call waits for one.
    let dropped = client.request(post(&upstream.url("/drop"))).await;
    assert!(dropped.is_err(), "the upstream closed the connection");
    eventually("a waiting connect took the freed place", || {
        connects.load(Ordering::SeqCst) == 3 && layer.open_connections() == 2
    })
    .await;
    assert_eq!(gauge(&metrics, &layer), 2);
    let response = client.request(post(&url)).await.unwrap();
    read_to_end(response.into_body()).await.unwrap();
    assert_eq!(connects.load(Ordering::SeqCst), 3, "served from the pool");

    // Dropping the client ends the three connects still waiting (nothing could use
    // their connections), and with them hyper-util's pool, which they kept alive:
    // its connections close.
    drop(client);
    eventually("every connection closed", || layer.open_connections() == 0).await;
    assert_eq!(gauge(&metrics, &layer), 0);
    assert_eq!(
        connects.load(Ordering::SeqCst),
        3,
        "no connect after the drop"
    );
}

#[tokio::test]
async fn a_failed_connect_counts_nothing_and_holds_no_place() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        closed.local_addr().unwrap()
    );
    drop(closed);
    let metrics = Metrics::new();
    let (client, connects, layer) = counted_client(
        Protocol::Http1,
        &ConnectionGaugeLayer::new().max_per_host(1),
        &metrics,
    );
    for attempt in 1..=3 {
        let call = tokio::time::timeout(Duration::from_secs(10), client.request(post(&url)));
        let error = call
            .await
            .expect("a failed connect frees its place")
            .unwrap_err();
        assert!(error.is_connect(), "{error}");
        assert_eq!(connects.load(Ordering::SeqCst), attempt);
        assert_eq!(gauge(&metrics, &layer), 0);
    }
}
