//! One streaming call, read to its end and sorted by how it ended; the callers that
//! make them; first-chunk latencies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Service, ServiceExt};
use tower_stream_backpressure::retry::StopReason;
use tower_stream_backpressure::{FirstChunkError, Rejected};
use tower_stream_backpressure_testkit::process::error_chain;

/// How a failed call failed, in the order the summary lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// No slot within `--max-wait`: back-pressure, by design.
    Rejected,
    /// Every attempt failed before its first event, until `max_attempts` or the budget
    /// said stop: the upstream's faults outlasted the retries, by design.
    RetriesSpent,
    /// The stream failed after its first event reached the caller: not retried, by
    /// design.
    MidStream,
    /// Anything else: a fault of the stack.
    Unexpected,
}

/// Failed calls by kind and reason: a count and the first error's text.
pub type Failures = BTreeMap<(Kind, String), (u64, String)>;

/// Live counts, for the progress line and the summary.
#[derive(Default)]
pub struct Counts {
    pub started: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub in_flight: AtomicU64,
}

/// First-chunk latencies in 1 ms buckets up to 60 s: memory that does not grow with
/// the number of calls, so a long run measures the layers, not the demo's records.
pub struct Latencies(Box<[AtomicU64]>);

impl Latencies {
    pub fn new() -> Arc<Self> {
        Arc::new(Self((0..=60_000).map(|_| AtomicU64::new(0)).collect()))
    }

    fn record(&self, latency: Duration) {
        let bucket = (latency.as_millis() as usize).min(self.0.len() - 1);
        self.0[bucket].fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|n| n.load(Relaxed)).sum()
    }

    /// The `p` quantile (0..=1), nearest rank, in milliseconds.
    pub fn quantile_ms(&self, p: f64) -> u64 {
        let rank = ((p * self.count() as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (ms, n) in self.0.iter().enumerate() {
            seen += n.load(Relaxed);
            if seen >= rank {
                return ms as u64;
            }
        }
        0
    }
}

/// One caller: calls until `calls` have been started or `deadline` has passed.
pub async fn caller<S, B>(
    service: S,
    url: String,
    calls: u64,
    deadline: Option<Instant>,
    counts: Arc<Counts>,
    latencies: Arc<Latencies>,
) -> Failures
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError> + Clone,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut failures = Failures::new();
    while deadline.is_none_or(|deadline| Instant::now() < deadline)
        && counts.started.fetch_add(1, Relaxed) < calls
    {
        counts.in_flight.fetch_add(1, Relaxed);
        let result = call(service.clone(), &url, &latencies).await;
        counts.in_flight.fetch_sub(1, Relaxed);
        match result {
            Ok(()) => counts.ok.fetch_add(1, Relaxed),
            Err((kind, reason, error)) => {
                failures.entry((kind, reason)).or_insert((0, error)).0 += 1;
                counts.failed.fetch_add(1, Relaxed)
            }
        };
    }
    failures
}

/// One streaming call, its body read to `data: [DONE]`; on failure, its kind, a
/// reason and the error's text.
async fn call<S, B>(
    service: S,
    url: &str,
    latencies: &Latencies,
) -> Result<(), (Kind, String, String)>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let request = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .expect("a valid request");
    let started = Instant::now();
    // Resolves once the first event has arrived, after any retries.
    let response = service.oneshot(request).await.map_err(|error| {
        let (kind, reason) = classify(&error);
        (kind, reason, error_chain(&*error))
    })?;
    let status = response.status();
    if status == 503 {
        // Still 503 after the last attempt (or when the budget refused another).
        return Err((
            Kind::RetriesSpent,
            "status 503 passed back".into(),
            String::new(),
        ));
    } else if !status.is_success() {
        return Err((Kind::Unexpected, format!("status {status}"), String::new()));
    }
    latencies.record(started.elapsed());
    match response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
    {
        Err(error) => Err((
            Kind::MidStream,
            "body error mid-stream".into(),
            error_chain(&*error.into()),
        )),
        Ok(body) if !body.ends_with(b"data: [DONE]\n\n") => Err((
            Kind::Unexpected,
            "body ended without [DONE]".into(),
            String::new(),
        )),
        Ok(_) => Ok(()),
    }
}

/// Names an error from the response future by downcasting it.
fn classify(error: &BoxError) -> (Kind, String) {
    if let Some(rejected) = error.downcast_ref::<Rejected>() {
        (Kind::Rejected, format!("Rejected ({})", rejected.reason()))
    } else if let Some(error) = error.downcast_ref::<FirstChunkError>() {
        let reason = format!(
            "FirstChunkError {:?}, {:?}",
            error.kind(),
            error.stop_reason()
        );
        match error.stop_reason() {
            StopReason::AttemptsExhausted | StopReason::BudgetExhausted => {
                (Kind::RetriesSpent, reason)
            }
            _ => (Kind::Unexpected, reason),
        }
    } else {
        (Kind::Unexpected, "an error from below the stack".into())
    }
}
