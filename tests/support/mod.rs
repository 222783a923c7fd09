//! Shared setup of the integration tests: everything of the testkit (the mock
//! upstream, hyper-util clients for both protocols, metrics read back through the SDK
//! and through Prometheus), and what needs the crate itself: the three layers stacked
//! as the README shows.
#![allow(dead_code, unused_imports)]

pub use tower_stream_backpressure_testkit::*;

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use opentelemetry::metrics::Meter;
use tower::BoxError;

/// The three layers stacked as the README shows, over `client`, recording to `meter`
/// under provider `"test"`.
pub fn full_stack<C: Connect + Clone + Send + Sync + 'static>(
    client: Client<C, Full<Bytes>>,
    meter: &Meter,
    limit: tower_stream_backpressure::StreamConcurrencyLayer,
    budget: tower_stream_backpressure::RetryBudget,
    policy: tower_stream_backpressure::RetryPolicy,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = http::Response<impl Body<Data = Bytes, Error = BoxError> + std::fmt::Debug + use<C>>,
    Error = BoxError,
    Future = impl Send + use<C>,
> + Clone
+ Send
+ use<C> {
    let detector = tower_stream_backpressure::frame::Auto::default();
    full_stack_with(client, meter, limit, budget, policy, detector)
}

/// [`full_stack`] over a hyper-util client of `protocol`: the tests' usual stack.
pub fn stack_over(
    protocol: Protocol,
    meter: &Meter,
    limit: tower_stream_backpressure::StreamConcurrencyLayer,
    budget: tower_stream_backpressure::RetryBudget,
    policy: tower_stream_backpressure::RetryPolicy,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = http::Response<impl Body<Data = Bytes, Error = BoxError> + std::fmt::Debug + use<>>,
    Error = BoxError,
    Future = impl Send + use<>,
> + Clone
+ Send
+ use<> {
    full_stack(client(protocol), meter, limit, budget, policy)
}

/// [`full_stack`] with another first-chunk detector.
pub fn full_stack_with<C, D>(
    client: Client<C, Full<Bytes>>,
    meter: &Meter,
    limit: tower_stream_backpressure::StreamConcurrencyLayer,
    budget: tower_stream_backpressure::RetryBudget,
    policy: tower_stream_backpressure::RetryPolicy,
    detector: D,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = http::Response<
        impl Body<Data = Bytes, Error = BoxError> + std::fmt::Debug + use<C, D>,
    >,
    Error = BoxError,
    Future = impl Send + use<C, D>,
> + Clone
+ Send
+ use<C, D>
where
    C: Connect + Clone + Send + Sync + 'static,
    D: tower_stream_backpressure::frame::Detector,
{
    use tower_stream_backpressure::{FirstChunkRetryLayer, RetryBudgetLayer};
    tower::ServiceBuilder::new()
        .layer(limit.meter(meter.clone()).provider("test"))
        .layer(
            RetryBudgetLayer::new(budget)
                .meter(meter.clone())
                .provider("test"),
        )
        .layer(
            FirstChunkRetryLayer::new(policy)
                .frames(detector)
                .meter(meter.clone())
                .provider("test"),
        )
        .service(client)
}

/// A capture from `tests/data/`.
pub fn capture(name: &str) -> Bytes {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

/// Attributes of every metric recorded by [`full_stack`].
pub const TEST: (&str, &str) = ("provider", "test");

/// A client stack with its body boxed, as users box the targets of a `Fallback`.
pub type Boxed = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    http::Response<http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>>,
    BoxError,
>;

/// `service`, sending each request to `base` (`http://host:port`) whatever its URI's
/// scheme and authority, with its body boxed: one target of a `Fallback`.
pub fn target<S, B>(base: &str, service: S) -> Boxed
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    let base = base.to_owned();
    let service = tower::ServiceBuilder::new()
        .map_request(move |mut request: Request<Full<Bytes>>| {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            *request.uri_mut() = format!("{base}{path}").parse().expect("a URI");
            request
        })
        .map_response(|response: http::Response<B>| {
            response.map(|body| body.map_err(Into::into).boxed_unsync())
        })
        .map_err(|error: S::Error| -> BoxError { error.into() })
        .service(service);
    tower::util::BoxCloneSyncService::new(service)
}

/// The base URL of a port on 127.0.0.1 that was free a moment ago: nothing listens on
/// it, so a connection to it is refused.
pub fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    format!("http://{}", listener.local_addr().expect("local addr"))
}

/// Runs `check` at every point over both protocols, the backoff's jitter seeded (it is
/// drawn on this thread): the same delays every run. The cancellation tests' loop.
pub async fn at_every_point<P: Copy>(points: &[P], check: impl AsyncFn(Protocol, P)) {
    fastrand::seed(7);
    for protocol in BOTH {
        for &point in points {
            check(protocol, point).await;
        }
    }
}

/// How a caller gives up on a call.
#[derive(Debug, Clone, Copy)]
pub enum GiveUp {
    /// After 5 s, while the call still waits: for a slot, an answer, a first chunk or
    /// a retry.
    Waiting,
    /// Once the response came: its body is dropped after this many frames.
    BodyAfterFrames(usize),
}

/// Makes `call` and gives up on it as `how` says; panics if it ended first.
pub async fn give_up<B>(
    call: impl std::future::Future<Output = Result<http::Response<B>, BoxError>>,
    how: GiveUp,
    at: &str,
) where
    B: Body + Unpin,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    match how {
        GiveUp::BodyAfterFrames(frames) => {
            let mut body = call.await.expect("a response").into_body();
            for _ in 0..frames {
                body.frame().await.expect("a frame").expect("no error");
            }
        }
        GiveUp::Waiting => {
            let gave_up = tokio::time::timeout(std::time::Duration::from_secs(5), call).await;
            assert!(gave_up.is_err(), "{at}: the call should still be waiting");
        }
    }
}

/// Waits (on the paused clock) long enough for every close to travel over loopback
/// and be seen.
pub async fn settle() {
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// Asserts that `metrics` count no stream and no upstream attempt open for
/// `provider="test"`.
pub fn assert_nothing_in_flight(metrics: &Metrics, at: &str) {
    let snapshot = metrics.snapshot();
    for gauge in ["streams_in_flight", "provider_calls_in_flight"] {
        assert_eq!(snapshot.count(gauge, &[TEST]), 0.0, "{at}: {gauge}");
    }
}

/// The tasks alive on this runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Asserts that no more tasks are alive than `before` (the layers never spawn, so
/// whatever ran for a call has ended), after letting them [`settle`].
pub async fn assert_no_task_left(before: usize, at: &str) {
    settle().await;
    let after = alive_tasks();
    assert!(
        after <= before,
        "{at}: {before} tasks before the call, {after} after"
    );
}
