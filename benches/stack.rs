//! What the layers cost per call and per frame, side by side with a bare service and
//! with what a user would stack from tower today.
//!
//! ```text
//! cargo bench --bench stack
//! ```
//!
//! The inner service is a no-op that answers with an in-memory SSE body, so the
//! figures are the middleware's own cost: a call made and its body drained.
//!
//! - `per_call`: a one-frame body. Contenders: `bare`; `tower` (tower's
//!   `ConcurrencyLimit` + `Retry` with a `TpsBudget` and a one-line policy);
//!   `ours` (the three layers, no meter provider installed); `ours_sdk_metrics` (the
//!   same, recording to an SDK meter provider with a Prometheus exporter); and each of
//!   our layers alone.
//! - `per_frame`: a 1,000-frame body, `bare` and `ours`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, RetryLayer};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_stream_backpressure::{
    FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy, StreamConcurrencyLayer,
};

const EVENT: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"token \"}}]}\n\n";
/// Far above the one call in flight: the limit never waits.
const LIMIT: usize = 1024;

/// A body of `left` SSE events, each its own frame, then its end.
struct Events {
    left: usize,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(EVENT)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

fn upstream(
    frames: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Events>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send {
    service_fn(move |_: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Events { left: frames })))
    })
}

fn request() -> Request<Full<Bytes>> {
    Request::post("http://upstream/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
        .unwrap()
}

/// Makes a call and reads its body to the end, as a client does (hyper's bodies, and
/// ours around them, are `Unpin`).
async fn drain<S, B>(service: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body + Unpin,
    B::Error: std::fmt::Debug,
{
    let response = service.oneshot(request()).await.unwrap();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
}

/// The one-line policy a user would write for tower's `Retry`: retry errors and 5xx,
/// while the budget allows.
#[derive(Clone)]
struct RetryWhileBudget(Arc<TpsBudget>);

impl<B, E> Policy<Request<Full<Bytes>>, Response<B>, E> for RetryWhileBudget {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<B>, E>,
    ) -> Option<Self::Future> {
        let failed = result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        if !failed {
            self.0.deposit();
            return None;
        }
        self.0.withdraw().then(|| std::future::ready(()))
    }

    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(request.clone())
    }
}

fn tower_stack(
    frames: usize,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Events>, Error = tower::BoxError> + Clone
{
    let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
    ServiceBuilder::new()
        .concurrency_limit(LIMIT)
        .layer(RetryLayer::new(RetryWhileBudget(budget)))
        .service(upstream(frames))
        .map_err(tower::BoxError::from)
}

/// Our three layers in the README's order, recording to `meter` if given.
fn our_stack(
    frames: usize,
    meter: Option<Meter>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl Body<Data = Bytes, Error = tower::BoxError> + Unpin>,
    Error = tower::BoxError,
> + Clone {
    let mut limit = StreamConcurrencyLayer::new(LIMIT).max_wait(Duration::from_secs(2));
    let mut budget = RetryBudgetLayer::new(RetryBudget::default());
    let mut retry = FirstChunkRetryLayer::new(RetryPolicy::default());
    if let Some(meter) = meter {
        limit = limit.meter(meter.clone());
        budget = budget.meter(meter.clone());
        retry = retry.meter(meter);
    }
    ServiceBuilder::new()
        .layer(limit)
        .layer(budget)
        .layer(retry)
        .service(upstream(frames))
}

/// An SDK meter provider exporting to a Prometheus registry, as an application would
/// install it.
fn sdk_meter() -> (SdkMeterProvider, Meter, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .unwrap();
    let provider = SdkMeterProvider::builder().with_reader(exporter).build();
    let meter = provider.meter("bench");
    (provider, meter, registry)
}

fn per_call(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("per_call");
    macro_rules! contender {
        ($name:expr, $service:expr) => {
            group.bench_function($name, |b| {
                let service = runtime.block_on(async { $service });
                b.to_async(&runtime).iter(|| drain(service.clone()));
            });
        };
    }
    contender!("bare", upstream(1));
    contender!("tower", tower_stack(1));
    contender!("ours", our_stack(1, None));
    let (_provider, meter, registry) = sdk_meter();
    contender!("ours_sdk_metrics", our_stack(1, Some(meter.clone())));
    // The exporter saw every instrument.
    assert!(!registry.gather().is_empty());
    contender!(
        "ours_concurrency_only",
        ServiceBuilder::new()
            .layer(StreamConcurrencyLayer::new(LIMIT).max_wait(Duration::from_secs(2)))
            .service(upstream(1))
    );
    contender!(
        "ours_budget_only",
        ServiceBuilder::new()
            .layer(RetryBudgetLayer::new(RetryBudget::default()))
            .service(upstream(1))
    );
    contender!(
        "ours_retry_only",
        ServiceBuilder::new()
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .service(upstream(1))
    );
    group.finish();
}

fn per_frame(c: &mut Criterion) {
    const FRAMES: usize = 1000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("per_frame");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function(BenchmarkId::new("bare", FRAMES), |b| {
        let service = upstream(FRAMES);
        b.to_async(&runtime).iter(|| drain(service.clone()));
    });
    group.bench_function(BenchmarkId::new("ours", FRAMES), |b| {
        let service = runtime.block_on(async { our_stack(FRAMES, None) });
        b.to_async(&runtime).iter(|| drain(service.clone()));
    });
    group.finish();
}

criterion_group!(benches, per_call, per_frame);
criterion_main!(benches);
