//! A limit under contention: 64 tasks on a multi-thread runtime share a limit of 8 and
//! acquire and release as fast as they can, ours next to tower's
//! `GlobalConcurrencyLimit`.
//!
//! ```text
//! cargo bench --bench contention
//! ```
//!
//! Each task makes calls to a no-op service through the limit. With ours, the slot is
//! held until the (empty) response body is dropped; with tower's, until the response
//! future resolves. The figure is the time per call, all tasks together.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Empty;
use tokio::sync::Semaphore;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_stream_backpressure::StreamConcurrencyLayer;

const TASKS: usize = 64;
const LIMIT: usize = 8;
const CALLS_PER_TASK: usize = 200;

fn noop()
-> impl Service<Request<()>, Response = Response<Empty<Bytes>>, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    service_fn(|_: Request<()>| async {
        // Let other tasks run while the slot is held, as a real call would.
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(Response::new(Empty::new()))
    })
}

/// Runs `TASKS` tasks making `CALLS_PER_TASK` calls each on clones of `service`.
async fn hammer<S>(service: S) -> Duration
where
    S: Service<Request<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                for _ in 0..CALLS_PER_TASK {
                    let response = service.clone().oneshot(Request::new(())).await.unwrap();
                    drop(response);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

fn contention(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("contention_64_tasks_limit_8");
    group.throughput(Throughput::Elements((TASKS * CALLS_PER_TASK) as u64));
    group.bench_function("ours", |b| {
        let service = runtime.block_on(async { StreamConcurrencyLayer::new(LIMIT).layer(noop()) });
        b.to_async(&runtime).iter_custom(|iters| {
            let service = service.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += hammer(service.clone()).await;
                }
                total
            }
        });
    });
    group.bench_function("tower_global", |b| {
        let semaphore = Arc::new(Semaphore::new(LIMIT));
        let service = GlobalConcurrencyLimitLayer::with_semaphore(semaphore).layer(noop());
        b.to_async(&runtime).iter_custom(|iters| {
            let service = service.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += hammer(service.clone()).await;
                }
                total
            }
        });
    });
    group.finish();
}

criterion_group!(benches, contention);
criterion_main!(benches);
