//! What the layers cost per call and per frame, side by side with a bare service and
//! with what a user would stack instead: tower's limit and retry, and tower-http's
//! response-body timeout (both from the testkit's `contenders`, which the load test
//! measures too).
//!
//! ```text
//! cargo bench --bench stack
//! cargo bench --bench stack -- per_frame      # one group (criterion's filter)
//! ```
//!
//! The inner service is a no-op that answers with an in-memory SSE body, so the
//! figures are the middleware's own cost: a call made and its body drained.
//!
//! - `per_call`: a one-frame body. Contenders: `bare`; `tower` (tower's
//!   `ConcurrencyLimit` + `Retry` with a `TpsBudget` and a one-line policy that retries
//!   errors and 5xx while the budget allows); `tower_http_body_timeout` (tower-http's
//!   `ResponseBodyTimeout`, 30 s, never reached); `ours` (the three layers, no meter
//!   provider installed); `ours_sdk_metrics` (the same, recording to an SDK meter
//!   provider with a Prometheus exporter); and each of our layers alone
//!   (`ours_concurrency_only`, `ours_budget_only`, `ours_retry_only`).
//! - `per_frame`: a 1,000-frame body. Contenders: `bare`; `map_frame_x2` (the body in
//!   two identity `BodyExt::map_frame` wrappers: the least any two body wrappers cost);
//!   `tower_http_body_timeout`; `ours`; `ours_concurrency_only` and `ours_retry_only`
//!   (the two of our layers that wrap the body).
//!
//! After criterion's own report, a summary from the medians criterion wrote in this run
//! (`<target>/criterion/<group>/<bench>/new/estimates.json`): for each `per_frame`
//! contender the extra ns a frame over bare, `(median - bare's median) / 1000`, with
//! the `map_frame_x2` floor beside it; and the `per_call` ratios `ours / tower` and
//! `ours_sdk_metrics / ours`. A line whose benchmarks this run skipped (a filter,
//! `--test`) is left out.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_stream_backpressure::{
    FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy, StreamConcurrencyLayer,
};
use tower_stream_backpressure_testkit::contenders;

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

/// Makes a call and reads its body to the end, as a client does. The body is pinned
/// where it lies: tower-http's `TimeoutBody` is not `Unpin`.
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

/// Our three layers in the README's order, recording to `meter` if given.
fn our_stack(
    frames: usize,
    meter: Option<Meter>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl Body<Data = Bytes, Error = tower::BoxError>>,
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

/// Our concurrency limit alone around `upstream(frames)`, set as in [`our_stack`].
fn ours_concurrency_only(
    frames: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl Body<Data = Bytes, Error = tower::BoxError>>,
    Error = tower::BoxError,
> + Clone {
    ServiceBuilder::new()
        .layer(StreamConcurrencyLayer::new(LIMIT).max_wait(Duration::from_secs(2)))
        .service(upstream(frames))
}

/// Our first-chunk retry alone around `upstream(frames)`, default policy.
fn ours_retry_only(
    frames: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl Body<Data = Bytes, Error: std::fmt::Debug>>,
    Error: std::fmt::Debug,
> + Clone {
    ServiceBuilder::new()
        .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
        .service(upstream(frames))
}

/// The bare upstream, its body in two identity `map_frame` wrappers: what any two body
/// wrappers cost at the least, moving each frame through two more `poll_frame`s.
fn map_frame_x2(
    frames: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl Body<Data = Bytes, Error = Infallible>>,
    Error = Infallible,
> + Clone {
    upstream(frames).map_response(|response: Response<Events>| {
        response.map(|body| body.map_frame(|frame| frame).map_frame(|frame| frame))
    })
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
    contender!("tower", contenders::tower_stack(upstream(1), LIMIT));
    contender!(
        "tower_http_body_timeout",
        contenders::tower_http_body_timeout(upstream(1))
    );
    contender!("ours", our_stack(1, None));
    let (_provider, meter, registry) = sdk_meter();
    contender!("ours_sdk_metrics", our_stack(1, Some(meter.clone())));
    // The exporter saw every instrument.
    assert!(!registry.gather().is_empty());
    contender!("ours_concurrency_only", ours_concurrency_only(1));
    contender!(
        "ours_budget_only",
        ServiceBuilder::new()
            .layer(RetryBudgetLayer::new(RetryBudget::default()))
            .service(upstream(1))
    );
    contender!("ours_retry_only", ours_retry_only(1));
    group.finish();
}

/// Frames in each call of the `per_frame` group.
const FRAMES: usize = 1000;

fn per_frame(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("per_frame");
    group.throughput(Throughput::Elements(FRAMES as u64));
    macro_rules! contender {
        ($name:expr, $service:expr) => {
            group.bench_function(BenchmarkId::new($name, FRAMES), |b| {
                let service = runtime.block_on(async { $service });
                b.to_async(&runtime).iter(|| drain(service.clone()));
            });
        };
    }
    contender!("bare", upstream(FRAMES));
    contender!("map_frame_x2", map_frame_x2(FRAMES));
    contender!(
        "tower_http_body_timeout",
        contenders::tower_http_body_timeout(upstream(FRAMES))
    );
    contender!("ours", our_stack(FRAMES, None));
    contender!("ours_concurrency_only", ours_concurrency_only(FRAMES));
    contender!("ours_retry_only", ours_retry_only(FRAMES));
    group.finish();
}

fn main() {
    let started = SystemTime::now();
    let mut criterion = Criterion::default().configure_from_args();
    per_call(&mut criterion);
    per_frame(&mut criterion);
    criterion.final_summary();
    print_summary(&Estimates {
        dir: criterion_dir(),
        since: started,
    });
}

/// Where criterion writes its results: `$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`,
/// else the workspace's `target/criterion`.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    target.join("criterion")
}

/// The medians criterion wrote in this run.
struct Estimates {
    dir: PathBuf,
    /// When this run started: an older file is from an earlier run (this one skipped
    /// the benchmark, by a filter or in `--test` mode).
    since: SystemTime,
}

impl Estimates {
    /// The median of `group/bench`, in ns, if this run measured it.
    fn median(&self, group: &str, bench: &str) -> Option<f64> {
        let path = self.dir.join(group).join(bench).join("new/estimates.json");
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        if modified < self.since {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        json["median"]["point_estimate"].as_f64()
    }
}

/// Prints what the figures mean side by side: the extra ns a frame each contender adds
/// over bare, and our per-call cost against tower's and with metrics recorded. A line
/// whose figures this run did not measure is left out.
fn print_summary(estimates: &Estimates) {
    let frame = |bench: &str| estimates.median("per_frame", &format!("{bench}/{FRAMES}"));
    let call = |bench: &str| estimates.median("per_call", bench);
    let mut lines = Vec::new();
    if let Some(bare) = frame("bare") {
        let extra = |bench| frame(bench).map(|ns| (ns - bare) / FRAMES as f64);
        let floor = extra("map_frame_x2");
        for bench in [
            "map_frame_x2",
            "tower_http_body_timeout",
            "ours",
            "ours_concurrency_only",
            "ours_retry_only",
        ] {
            let Some(ns) = extra(bench) else { continue };
            let floor = match floor {
                Some(floor) if bench != "map_frame_x2" => format!("  (floor {floor:.2})"),
                _ if bench == "map_frame_x2" => "  (the floor of two body wrappers)".to_owned(),
                _ => String::new(),
            };
            lines.push(format!(
                "  per frame, extra over bare  {bench:<24} {ns:>6.2} ns{floor}"
            ));
        }
    }
    for (a, b) in [("ours", "tower"), ("ours_sdk_metrics", "ours")] {
        if let (Some(x), Some(y)) = (call(a), call(b)) {
            lines.push(format!(
                "  per call, {:<30} {:>6.3}  ({x:.0} ns / {y:.0} ns)",
                format!("{a} / {b}"),
                x / y
            ));
        }
    }
    if !lines.is_empty() {
        println!();
        println!("summary (criterion's medians; per frame: (contender - bare) / {FRAMES} frames)");
        for line in lines {
            println!("{line}");
        }
    }
}
