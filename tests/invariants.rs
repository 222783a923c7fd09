//! The stack's invariants under load, on a multi-thread runtime: a million calls
//! through the three layers to an in-memory upstream that fails, stalls and streams at
//! random, by callers that give up at random.
//!
//! - The limit is never exceeded: the upstream checks its count of open attempts at
//!   every new attempt, and keeps the high-water mark.
//! - The budget never lets through more retries than its formula, and ends holding
//!   exactly what the formula says.
//! - Every slot is released and every gauge returns to zero.
//! - Every call ends in exactly one outcome.
//!
//! `INVARIANT_CALLS` sets the number of calls (default 1,000,000).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::concurrency::MaxWait;
use tower_stream_backpressure::{
    FirstChunkError, FirstChunkRetryLayer, Rejected, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};

mod support;

const LIMIT: usize = 8;
const TASKS: usize = 64;

/// The upstream's own count of attempts open: from the call until its body has sent
/// its end (or failed), or is dropped, whichever comes first. That is when the layers
/// release a slot: a caller that has read the end but still holds the body object
/// holds no slot.
#[derive(Default)]
struct Upstream {
    open: AtomicUsize,
    high_water: AtomicUsize,
    attempts: AtomicU64,
}

/// An attempt counted open until dropped.
struct Open(Arc<Upstream>);

impl Open {
    fn new(upstream: &Arc<Upstream>) -> Self {
        let open = upstream.open.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(open <= LIMIT, "{open} attempts open, limit {LIMIT}");
        upstream.high_water.fetch_max(open, Ordering::SeqCst);
        upstream.attempts.fetch_add(1, Ordering::SeqCst);
        Self(upstream.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body: frames, with a yield before some, then maybe an error.
struct Scripted {
    steps: VecDeque<Step>,
    /// Closed with the last step, before it reaches the client.
    open: Option<Open>,
}

enum Step {
    Yield,
    Data(&'static [u8]),
    Fail,
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let step = self.steps.pop_front();
        if self.steps.is_empty() && !matches!(step, Some(Step::Yield)) {
            self.open = None;
        }
        match step {
            None => Poll::Ready(None),
            Some(Step::Yield) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Data(bytes)) => {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(bytes)))))
            }
            Some(Step::Fail) => {
                self.open = None;
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "injected reset",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty()
    }
}

const EVENT: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n";

/// One attempt, drawn at random: a transient error, a 503, a body that fails before its
/// first event, or a stream of 1 to 4 events with yields between them (some failing
/// after the first).
async fn attempt(open: Open) -> Result<Response<Scripted>, io::Error> {
    let roll = fastrand::u8(0..100);
    for _ in 0..fastrand::u8(0..3) {
        tokio::task::yield_now().await;
    }
    if roll < 8 {
        return Err(io::Error::new(io::ErrorKind::ConnectionReset, "injected"));
    }
    let mut steps = VecDeque::new();
    let mut status = StatusCode::OK;
    if roll < 16 {
        status = StatusCode::SERVICE_UNAVAILABLE;
        steps.push_back(Step::Data(b"{}"));
    } else if roll < 24 {
        steps.extend([Step::Yield, Step::Fail]);
    } else {
        for _ in 0..fastrand::u8(1..5) {
            if fastrand::bool() {
                steps.push_back(Step::Yield);
            }
            steps.push_back(Step::Data(EVENT));
        }
        if roll < 28 {
            steps.push_back(Step::Fail);
        }
    }
    let mut response = Response::new(Scripted {
        steps,
        open: Some(open),
    });
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    Ok(response)
}

/// How a call ended, from its caller's side.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Streamed,
    BodyFailed,
    BodyDropped,
    Status,
    Rejected,
    FirstChunkError,
    OtherError,
    Canceled,
}

const OUTCOMES: usize = 8;

async fn one_call<S, B>(service: S, outcomes: &[AtomicU64; OUTCOMES])
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError>,
    B: Body + Unpin,
{
    let mut request = Request::post("http://upstream/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("a request");
    // A fifth of the calls fail fast when the limit is full.
    if fastrand::u8(0..5) == 0 {
        request
            .extensions_mut()
            .insert(MaxWait::new(Duration::ZERO));
    }
    let roll = fastrand::u8(0..10);
    let call = service.oneshot(request);
    let outcome = if roll == 0 {
        // Give up after a few polls, wherever the call is.
        let polls = fastrand::usize(0..6);
        let mut call = std::pin::pin!(call);
        let mut finished = None;
        for _ in 0..polls {
            if let Poll::Ready(result) = futures_poll(call.as_mut()).await {
                finished = Some(result);
                break;
            }
        }
        match finished {
            None => Outcome::Canceled,
            Some(result) => classify(result, 0).await,
        }
    } else {
        // Read to the end, or drop the body after a frame or two.
        let frames = if roll == 1 {
            fastrand::usize(0..3)
        } else {
            usize::MAX
        };
        classify(call.await, frames).await
    };
    outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
}

/// Polls `future` once.
async fn futures_poll<F: std::future::Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    let mut future = Some(future);
    std::future::poll_fn(|cx| Poll::Ready(future.take().map(|f| f.poll(cx))))
        .await
        .expect("polled once")
}

async fn classify<B: Body + Unpin>(
    result: Result<Response<B>, BoxError>,
    frames: usize,
) -> Outcome {
    match result {
        Ok(response) if response.status() != StatusCode::OK => Outcome::Status,
        Ok(response) => {
            let mut body = response.into_body();
            let mut read = 0;
            loop {
                if read == frames {
                    return Outcome::BodyDropped;
                }
                match body.frame().await {
                    None => return Outcome::Streamed,
                    Some(Err(_)) => return Outcome::BodyFailed,
                    Some(Ok(_)) => read += 1,
                }
            }
        }
        Err(error) if error.is::<Rejected>() => Outcome::Rejected,
        Err(error) if error.is::<FirstChunkError>() => Outcome::FirstChunkError,
        Err(_) => Outcome::OtherError,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_calls_keep_every_invariant() {
    let calls: usize = std::env::var("INVARIANT_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let upstream = Arc::new(Upstream::default());
    let metrics = support::Metrics::new();
    let limit = StreamConcurrencyLayer::new(LIMIT)
        .max_wait(Duration::from_millis(50))
        .meter(metrics.meter())
        .provider("test");
    // No reserve, a tenth of a retry per call, over a window longer than the test.
    let ratio = 0.1;
    let budget = RetryBudget::new(Duration::from_secs(60), 0, ratio);
    let deposits = Arc::new(AtomicU64::new(0));
    let service = ServiceBuilder::new()
        .layer(limit.clone())
        .layer(
            RetryBudgetLayer::new(budget.clone())
                .meter(metrics.meter())
                .provider("test"),
        )
        // Calls that got past the limit: each deposited once into the budget.
        .map_request({
            let deposits = deposits.clone();
            move |request: Request<Full<Bytes>>| {
                deposits.fetch_add(1, Ordering::SeqCst);
                request
            }
        })
        .layer(
            FirstChunkRetryLayer::new(
                RetryPolicy::default()
                    .max_attempts(3)
                    .backoff(Duration::ZERO, Duration::ZERO),
            )
            .meter(metrics.meter())
            .provider("test"),
        )
        .service_fn({
            let upstream = upstream.clone();
            // Counted open when called, before the attempt's future runs.
            move |_: Request<Full<Bytes>>| attempt(Open::new(&upstream))
        });

    let outcomes: Arc<[AtomicU64; OUTCOMES]> = Arc::new(Default::default());
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (service, outcomes) = (service.clone(), outcomes.clone());
            let share = calls / TASKS + usize::from(task < calls % TASKS);
            tokio::spawn(async move {
                for _ in 0..share {
                    one_call(service.clone(), &outcomes).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a caller task");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(55),
        "the budget window must outlast the run"
    );

    // Every call ended in exactly one outcome.
    let counts: Vec<u64> = outcomes.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    assert_eq!(counts.iter().sum::<u64>(), calls as u64, "{counts:?}");

    // The limit held, and was reached.
    let high_water = upstream.high_water.load(Ordering::SeqCst);
    assert!(high_water <= LIMIT);
    assert_eq!(high_water, LIMIT, "the load should fill the limit");

    // Nothing is held.
    assert_eq!(upstream.open.load(Ordering::SeqCst), 0);
    assert_eq!(limit.available_slots(), LIMIT);
    let snapshot = metrics.snapshot();
    assert_eq!(snapshot.count("streams_in_flight", &[support::TEST]), 0.0);
    assert_eq!(
        snapshot.count("provider_calls_in_flight", &[support::TEST]),
        0.0
    );

    // The budget: each call past the limit deposited once and made one first attempt;
    // every other attempt was a retry the budget granted.
    let deposits = deposits.load(Ordering::SeqCst);
    let attempts = upstream.attempts.load(Ordering::SeqCst);
    let retries = attempts - deposits;
    let allowed = (deposits as f64 * ratio).floor() as u64;
    assert!(
        retries <= allowed,
        "{retries} retries, the budget allows {allowed}"
    );
    assert_eq!(budget.available(), allowed - retries, "the balance left");
    println!(
        "{calls} calls in {elapsed:.1?}: {attempts} attempts, {retries} retries of {allowed} \
         allowed, limit high water {high_water}, outcomes {counts:?}"
    );
}
