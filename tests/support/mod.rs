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
