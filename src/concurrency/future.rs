use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use super::adaptive::Limiter;
use super::idle::Sweep;
use super::rate_limit::Gate;
use super::service::Shared;
use super::{Rejected, ResponseBody};
use crate::metrics::ConcurrencyMetrics;
use crate::park::Parked;

/// A held concurrency slot: the semaphore permit and its `streams_in_flight` count.
///
/// Dropping it returns the permit and lowers the gauge; it is dropped exactly once, by
/// whoever holds it last (the response future on an error, otherwise the body).
pub(crate) struct Slot {
    slots: Arc<Slots>,
}

/// Where a service's slots come from and are counted: the layer's semaphore and the
/// service's instruments, behind one pointer, so that a held slot is 8 bytes. A slot
/// rides in the caller's response body for the whole stream (two or three of them used
/// to: the permit's semaphore and count, and the instruments, 24 bytes). Its permit is
/// forgotten when taken and given back when the slot drops.
#[derive(Debug)]
pub(crate) struct Slots {
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) metrics: Arc<ConcurrencyMetrics>,
    /// The moving limit, when the layer is adaptive.
    pub(crate) limiter: Option<Arc<Limiter>>,
    /// The rate-limit gate, with `pace_on_rate_limits`.
    pub(crate) gate: Option<Arc<Gate>>,
}

impl Slot {
    /// Holds one permit of `slots`' semaphore, which the caller took and forgot.
    pub(crate) fn new(slots: Arc<Slots>, waited: Duration) -> Self {
        slots.metrics.slot_taken(waited);
        Self { slots }
    }

    /// An attempt of the call holding this slot got this response head: one saying
    /// that the account's rate limit is spent closes the layer's gate until its reset.
    pub(crate) fn response_head(&self, status: http::StatusCode, headers: &http::HeaderMap) {
        let Some(gate) = &self.slots.gate else {
            return;
        };
        let provider = self.slots.metrics.provider();
        let now = std::time::SystemTime::now();
        if let Some(hold) = super::rate_limit::hold(status, headers, now, &provider) {
            let now = Instant::now();
            gate.close_until(now, hold.until(now), hold.by, &provider);
        }
    }

    /// Whether the slot's layer has an adaptive limit, which learns from attempts.
    pub(crate) fn is_adaptive(&self) -> bool {
        self.slots.limiter.is_some()
    }

    /// An attempt of the call holding this slot met an overload signal: an adaptive
    /// limit decreases.
    pub(crate) fn overloaded(&self) {
        if let Some(limiter) = &self.slots.limiter {
            limiter.overloaded(Instant::now());
        }
    }

    /// An attempt of the call holding this slot produced its first chunk `latency`
    /// after it started: an adaptive limit learns from it.
    pub(crate) fn answered(&self, latency: Duration) {
        if let Some(limiter) = &self.slots.limiter {
            limiter.answered(Instant::now(), Some(latency));
        }
    }

    /// The call holding this slot, with no retry layer below to say more, got this
    /// response head or error: an overload status (`429`, `503`, `529`) or HTTP/2
    /// refusal, or an answer whose time says nothing of its first chunk.
    fn judge<B>(&self, result: &Result<Response<B>, BoxError>) {
        if let Ok(response) = result {
            self.response_head(response.status(), response.headers());
        }
        let Some(limiter) = &self.slots.limiter else {
            return;
        };
        let overload = match result {
            Ok(response) => crate::retry::is_overload_status(response.status()),
            Err(error) => crate::retry::is_overload(&**error),
        };
        match overload {
            true => limiter.overloaded(Instant::now()),
            false => limiter.answered(Instant::now(), None),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.metrics.slot_released();
        match &self.slots.limiter {
            Some(limiter) => limiter.release(),
            None => self.slots.semaphore.add_permits(1),
        }
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

/// A call in the queue for a slot: the time it waits, and its place in the count of
/// waiting callers. Dropped unfinished, it counts the call as given up by its caller
/// (`context_canceled`).
pub(crate) struct Wait {
    started: Instant,
    shared: Arc<Shared>,
    slots: Arc<Slots>,
    finished: bool,
}

impl Wait {
    /// Takes a place in the queue, or `None` when `max_queued` callers already wait.
    pub(crate) fn enter(shared: &Arc<Shared>, slots: &Arc<Slots>) -> Option<Self> {
        let waiting = shared.queued.fetch_add(1, Ordering::AcqRel);
        if shared.max_queued.is_some_and(|max| waiting >= max) {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self {
            started: Instant::now(),
            shared: shared.clone(),
            slots: slots.clone(),
            finished: false,
        })
    }

    fn finish(&mut self) -> Duration {
        self.finished = true;
        self.started.elapsed()
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        if !self.finished {
            let waited = self.started.elapsed();
            self.slots.metrics.context_canceled(waited);
            tracing::debug!(
                provider = %self.slots.metrics.provider(),
                waited_ms = waited.as_millis() as u64,
                "the caller gave up while waiting for a concurrency slot"
            );
        }
    }
}

/// A call that found no slot within its `max_wait`.
pub(crate) fn reject(metrics: &ConcurrencyMetrics, limit: usize, waited: Duration) -> Rejected {
    let rejected = Rejected::deadline_exceeded(limit, waited);
    metrics.rejected(rejected.reason(), waited);
    tracing::warn!(
        provider = %metrics.provider(),
        limit,
        waited_ms = waited.as_millis() as u64,
        "rejected: no concurrency slot within max_wait"
    );
    rejected
}

/// Waits for the rate-limit gate to open, as long as `deadline` allows: a gate that
/// moves later while the call waits is waited for again. Returns the time held.
async fn pass(gate: &Gate, deadline: Option<Instant>) -> Result<Duration, super::RejectReason> {
    let held = Instant::now();
    while let Some(opens_at) = gate.opens_at().filter(|&at| at > Instant::now()) {
        if deadline.is_some_and(|deadline| opens_at > deadline) {
            // It only moves later: the call cannot go out in time.
            return Err(super::RejectReason::RateLimited);
        }
        tokio::time::sleep_until(opens_at).await;
    }
    Ok(held.elapsed())
}

/// A call that the rate-limit gate would hold past its deadline.
pub(crate) fn reject_rate_limited(
    metrics: &ConcurrencyMetrics,
    limit: usize,
    waited: Duration,
) -> Rejected {
    let rejected = Rejected::rate_limited(limit, waited);
    metrics.rejected(rejected.reason(), waited);
    metrics.paced(waited);
    tracing::warn!(
        provider = %metrics.provider(),
        waited_ms = waited.as_millis() as u64,
        "rejected: the provider's rate limit is spent until after max_wait"
    );
    rejected
}

/// A call that found the queue full.
pub(crate) fn reject_queue_full(metrics: &ConcurrencyMetrics, limit: usize) -> Rejected {
    let rejected = Rejected::queue_full(limit);
    metrics.rejected(rejected.reason(), Duration::ZERO);
    tracing::warn!(
        provider = %metrics.provider(),
        limit,
        "rejected: the queue of callers waiting for a concurrency slot is full (max_queued)"
    );
    rejected
}

/// Makes the inner call with `slot` offered to a retry layer within it; returns the
/// call's future and the slot unless that layer took it. Under the idle sweep the slot
/// stays here: the sweep ends a stalled stream by dropping its body, which holds it.
fn offer<F>(slot: Slot, sweep: Option<&Arc<Sweep>>, call: impl FnOnce() -> F) -> (F, Option<Slot>) {
    if sweep.is_some() {
        return (call(), Some(slot));
    }
    crate::handoff::offer_slot(slot, call)
}

/// Resolves to a permit, or `None` once the call's deadline has passed.
/// A place in the queue: the permit, or why there is none by the deadline.
type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, super::RejectReason>> + Send>>;

pin_project! {
    /// Response future of [`StreamConcurrency`](super::StreamConcurrency).
    ///
    /// Waits for a slot (when none was free at `call`), then calls the inner service and
    /// moves the slot into the response body. Dropping it while waiting leaves the queue;
    /// dropping it while the inner call runs releases the slot. While it waits it holds
    /// none of the inner service's readiness: it drives a clone of the service ready
    /// once it has its slot.
    ///
    /// Polled again after it returned, it panics.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, Service, ServiceExt};
    /// use tower_stream_backpressure::concurrency::ResponseFuture;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(1);
    /// let mut service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let future: ResponseFuture<_, http::Request<()>> =
    ///     service.ready().await?.call(http::Request::new(()));
    /// assert_eq!(layer.available_slots(), 0, "the slot is taken at `call`");
    /// drop(future);
    /// assert_eq!(layer.available_slots(), 1, "and released with the future");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        sweep: Option<Arc<Sweep>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        // Boxed, as is the rejection: needed only off the fast path, and a future's
        // size is kept by its caller's task for the whole stream. The box that waited
        // carries the parked call on to its call.
        Waiting {
            waiting: Option<Box<Waiting<S, Req>>>,
        },
        // A slot is held: the parked service is driven ready, then called.
        Readying {
            waiting: Box<Waiting<S, Req>>,
            slot: Option<Slot>,
        },
        // `slot` is `None` when a retry layer below took it.
        Calling {
            #[pin]
            future: S::Future,
            slot: Option<Slot>,
        },
        Rejected {
            error: Option<Box<Rejected>>,
        },
        Done,
    }
}

/// A call waiting for a slot, then for its inner service to be ready.
struct Waiting<S, Req> {
    acquire: Acquire,
    // Taken when the wait is over: the call then leaves the queue.
    wait: Option<Wait>,
    call: Parked<S, Req>,
}

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    /// Calls `service` (ready) with `slot` held: offered to a retry layer below, whose
    /// body then carries it (see the module docs, "One body wrapper").
    pub(crate) fn calling(
        service: &mut S,
        request: Req,
        slot: Slot,
        sweep: Option<Arc<Sweep>>,
    ) -> Self {
        let (future, slot) = offer(slot, sweep.as_ref(), || service.call(request));
        Self {
            state: State::Calling { future, slot },
            sweep,
        }
    }

    pub(crate) fn rejected(error: Rejected) -> Self {
        Self {
            state: State::Rejected {
                error: Some(Box::new(error)),
            },
            sweep: None,
        }
    }

    /// Queues for a slot with `service`, a clone nobody has polled ready.
    /// Queues for a slot with `service`, a clone nobody has polled ready, after the
    /// rate-limit `gate` if it was closed.
    pub(crate) fn waiting(
        wait: Wait,
        deadline: Option<Instant>,
        gate: Option<Arc<Gate>>,
        service: S,
        request: Req,
    ) -> Self {
        let semaphore = wait.shared.semaphore.clone();
        let metrics = wait.slots.metrics.clone();
        let acquire: Acquire = Box::pin(async move {
            // Held at the gate, in all: recorded once, if at all.
            let mut held = Duration::ZERO;
            loop {
                if let Some(gate) = &gate {
                    held += pass(gate, deadline).await?;
                }
                // The semaphore is never closed, so `acquire_owned` only ever succeeds.
                let permit = semaphore.clone().acquire_owned();
                let permit = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, permit).await.ok(),
                    None => Some(permit.await),
                };
                let permit = permit
                    .and_then(Result::ok)
                    .ok_or(super::RejectReason::DeadlineExceeded)?;
                // A rate limit spent while the call waited for its slot: the slot goes
                // to the next caller, and this one waits at the gate again.
                let closed = gate.as_ref().and_then(|gate| gate.opens_at());
                if closed.is_none_or(|at| at <= Instant::now()) {
                    if !held.is_zero() {
                        metrics.paced(held);
                    }
                    return Ok(permit);
                }
            }
        });
        let sweep = wait.shared.sweep.clone();
        Self {
            state: State::Waiting {
                waiting: Some(Box::new(Waiting {
                    acquire,
                    wait: Some(wait),
                    call: Parked::new(service, request),
                })),
            },
            sweep,
        }
    }
}

impl<S, Req, B> Future for ResponseFuture<S, Req>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Waiting { waiting } => {
                    let Some(boxed) = waiting.as_mut() else {
                        unreachable!("the wait is taken only when leaving this state")
                    };
                    let permit = ready!(boxed.acquire.as_mut().poll(cx));
                    let Some(mut wait) = boxed.wait.take() else {
                        unreachable!("the wait is taken only when it is over")
                    };
                    let waited = wait.finish();
                    let permit = match permit {
                        Ok(permit) => permit,
                        Err(reason) => {
                            let metrics = &wait.slots.metrics;
                            let limit = wait.shared.current_limit();
                            let error = match reason {
                                super::RejectReason::RateLimited => {
                                    reject_rate_limited(metrics, limit, waited)
                                }
                                _ => reject(metrics, limit, waited),
                            };
                            this.state.set(State::Rejected {
                                error: Some(Box::new(error)),
                            });
                            continue;
                        }
                    };
                    permit.forget();
                    let slot = Slot::new(wait.slots.clone(), waited);
                    let Some(waiting) = waiting.take() else {
                        unreachable!("the wait is taken only when leaving this state")
                    };
                    this.state.set(State::Readying {
                        waiting,
                        slot: Some(slot),
                    });
                }
                StateProj::Readying { waiting, slot } => {
                    if let Err(error) = ready!(waiting.call.poll_ready(cx)) {
                        // The slot goes with the failed call.
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error.into()));
                    }
                    let Some(slot) = slot.take() else {
                        unreachable!("the slot is held until the call")
                    };
                    let (future, slot) = offer(slot, this.sweep.as_ref(), || waiting.call.call());
                    this.state.set(State::Calling { future, slot });
                }
                StateProj::Calling { future, slot } => {
                    let result = ready!(future.poll(cx));
                    let slot = slot.take();
                    this.state.set(State::Done);
                    let result = result.map_err(Into::into);
                    // Still holding the slot: no retry layer below carries it, and
                    // the response head is all this layer sees of the call.
                    if let Some(slot) = &slot {
                        slot.judge(&result);
                    }
                    return Poll::Ready(result.map(|response| {
                        response.map(|body| ResponseBody::new(body, slot, this.sweep.as_ref()))
                    }));
                }
                StateProj::Rejected { error } => {
                    let Some(error) = error.take() else {
                        unreachable!("the rejection is taken only when leaving this state")
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting for a slot",
            State::Readying { .. } => "waiting for the inner service to be ready",
            State::Calling { .. } => "calling",
            State::Rejected { .. } => "rejected",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
