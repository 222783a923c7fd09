//! What the layers cost per call and per frame, next to a bare service.
//!
//! `cargo bench --bench stack`
//!
//! The inner service is a no-op that answers with an in-memory SSE body, so the
//! figures are the middleware's own cost: a call made and its body drained.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::{
    FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy, StreamConcurrencyLayer,
};

const EVENT: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"token \"}}]}\n\n";

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
) -> impl Service<Request<Full<Bytes>>, Response = Response<Events>, Error = Infallible> + Clone {
    service_fn(move |_: Request<Full<Bytes>>| async move {
        Ok::<_, Infallible>(Response::new(Events { left: frames }))
    })
}

fn request() -> Request<Full<Bytes>> {
    Request::post("http://upstream/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
        .unwrap()
}

async fn drain<S, B>(service: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let response = service.oneshot(request()).await.unwrap();
    let mut body = std::pin::pin!(response.into_body());
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
}

fn stack(
    frames: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl Body<Data = Bytes, Error = Infallible>>,
    Error = tower::BoxError,
> + Clone {
    ServiceBuilder::new()
        .layer(StreamConcurrencyLayer::new(1024).max_wait(Duration::from_secs(2)))
        .layer(RetryBudgetLayer::new(RetryBudget::default()))
        .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
        .service(upstream(frames))
}

fn per_call_and_per_frame(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    for frames in [1, 1000] {
        let mut group = c.benchmark_group(format!("{frames}_frame_body"));
        group.throughput(Throughput::Elements(frames as u64));
        group.bench_function(BenchmarkId::new("bare", frames), |b| {
            let service = upstream(frames);
            b.to_async(&runtime).iter(|| drain(service.clone()));
        });
        group.bench_function(BenchmarkId::new("stack", frames), |b| {
            let service = stack(frames);
            b.to_async(&runtime).iter(|| drain(service.clone()));
        });
        group.finish();
    }
}

criterion_group!(benches, per_call_and_per_frame);
criterion_main!(benches);
