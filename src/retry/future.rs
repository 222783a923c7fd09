//! Running the attempts of one call: the state machine that starts each attempt, waits
//! for its response, has it read for the first chunk (`peek`), and waits out the
//! backoff (`timer`). What each outcome means is decided in `judge`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use super::NotReplayable;
use super::RetryAttempt;
use super::body::CallGuard;
use super::judge::{Failure, Judged, Next, Output};
use super::peek::Peek;
use super::service::Shared;
use super::timer::Timer;
use crate::budget::Budgets;
use crate::concurrency::Slot;
use crate::deadline;
use crate::frame::Detector;
use crate::metrics::{RetryMetrics, RetryOutcome, RetryReason};

/// Response future of [`FirstChunkRetry`](super::FirstChunkRetry).
///
/// Runs attempts until one produces its first chunk (or a response that is not a
/// failure), the attempts or the budget run out, or a failure is not retryable.
/// Dropping it at any point ends the attempt in flight; nothing is left running.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, Service, ServiceExt};
/// use tower_stream_backpressure::frame::Auto;
/// use tower_stream_backpressure::retry::ResponseFuture;
/// use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
///
/// let calls = Arc::new(AtomicUsize::new(0));
/// let upstream = {
///     let calls = calls.clone();
///     service_fn(move |_: http::Request<()>| {
///         // Overloaded once, then fine.
///         let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 { 503 } else { 200 };
///         let response = http::Response::builder().status(status);
///         async move { response.body(Full::new(Bytes::from("data"))) }
///     })
/// };
/// let mut client = FirstChunkRetryLayer::new(RetryPolicy::default()).layer(upstream);
/// # tokio::runtime::Builder::new_current_thread()
/// #     .enable_all()
/// #     .start_paused(true)
/// #     .build()?
/// #     .block_on(async {
/// let future: ResponseFuture<_, (), Full<Bytes>, Auto> =
///     client.ready().await?.call(http::Request::new(()));
/// // Resolves once an attempt has produced its first chunk.
/// let response = future.await?;
/// assert_eq!(response.status(), 200);
/// assert_eq!(calls.load(Ordering::SeqCst), 2);
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
pub struct ResponseFuture<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>>,
    ResBody: Body,
{
    // Boxed: the state of a call (the request kept for retries, the response being
    // read, the timer) is about 1 KiB. Inline, it would be part of the caller's task
    // for as long as the stream the call started, long after this future is done.
    inner: Pin<Box<Attempting<S, ReqBody, ResBody, D>>>,
}

pin_project! {
    /// The attempts of one call.
    struct Attempting<S, ReqBody, ResBody, D>
    where
        S: Service<Request<ReqBody>>,
        ResBody: Body,
    {
        #[pin]
        call: Option<S::Future>,
        // The current attempt's first-chunk deadline, or the backoff before the next.
        #[pin]
        timer: Timer,
        phase: Phase,
        // The response being read for its first chunk, while peeking. Kept out of
        // `phase`, which moves on every poll.
        peek: Option<Peek<ResBody, D>>,
        // The failure that called for the next attempt, kept until that attempt starts:
        // if the service fails to become ready for it, this is what the caller gets.
        last: Option<Failure<ResBody>>,
        attempts: Attempts<S, ReqBody, D>,
    }
}

enum Phase {
    /// Waiting for the service to be ready for the next attempt.
    Ready,
    /// The attempt's request is in flight, until its response head.
    Calling(CallGuard),
    /// A 2xx response: reading its body until the first chunk (in `peek`).
    Peeking,
    /// Waiting before the next attempt.
    Backoff,
    /// The output has been returned.
    Done,
}

/// What stays the same across attempts.
pub(super) struct Attempts<S, ReqBody, D> {
    pub(super) service: S,
    /// Cloned for each attempt but the last, which takes it.
    pub(super) request: Option<Request<ReqBody>>,
    pub(super) head_request: bool,
    /// The policy's `max_attempts`, or 1 for a request that cannot be replayed.
    pub(super) max_attempts: u32,
    pub(super) attempt: u32,
    /// Why the attempt in progress is a retry (`None` for the first).
    pub(super) retried_for: Option<RetryReason>,
    pub(super) started: Instant,
    /// Every budget the call deposited in; a retry takes a unit from each.
    pub(super) budgets: Budgets,
    /// The concurrency slot handed over by the layer above, for the caller's body.
    pub(super) slot: Option<Slot>,
    pub(super) shared: Arc<Shared<D>>,
    pub(super) metrics: Arc<RetryMetrics>,
}

impl<S, ReqBody, ResBody, D> ResponseFuture<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body,
    D: Detector,
{
    /// Starts the first attempt on `service`, which the caller has polled ready.
    #[inline(always)]
    pub(crate) fn new(
        service: S,
        request: Request<ReqBody>,
        shared: Arc<Shared<D>>,
        metrics: Arc<RetryMetrics>,
    ) -> Self {
        Self {
            inner: Box::pin(Attempting::new(service, request, shared, metrics)),
        }
    }
}

impl<S, ReqBody, ResBody, D> Future for ResponseFuture<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin,
    ResBody::Data: AsRef<[u8]>,
    ResBody::Error: Into<BoxError>,
    D: Detector,
{
    type Output = Output<ResBody>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<S, ReqBody, ResBody, D> Attempting<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body,
    D: Detector,
{
    #[inline(always)]
    fn new(
        mut service: S,
        mut request: Request<ReqBody>,
        shared: Arc<Shared<D>>,
        metrics: Arc<RetryMetrics>,
    ) -> Self {
        let started = Instant::now();
        let max_attempts = if request.extensions().get::<NotReplayable>().is_some() {
            1
        } else {
            shared.policy.get_max_attempts()
        };
        let retries = max_attempts > 1;
        let budgets = if retries {
            Budgets::take(request.extensions_mut())
        } else {
            Budgets::decline();
            Budgets::default()
        };
        // Taken before the first attempt's call: a concurrency layer below offers its own.
        let slot = crate::handoff::take_slot();
        let head_request = request.method() == http::Method::HEAD;
        // The caller's request goes out and the copy is kept: a client adds headers to
        // what it sends (hyper-util a `host`), and the caller's map has room for them,
        // where a clone's is exactly full and would grow (an allocation each call).
        let (first, request) = if retries {
            let kept = request.clone();
            (request, Some(kept))
        } else {
            (request, None)
        };
        let call = CallGuard::new(metrics.clone());
        let future = service.call(first);
        Self {
            call: Some(future),
            timer: Timer::new(deadline::from(
                started,
                shared.policy.get_first_chunk_timeout(),
            )),
            phase: Phase::Calling(call),
            peek: None,
            last: None,
            attempts: Attempts {
                service,
                request,
                head_request,
                max_attempts,
                attempt: 1,
                retried_for: None,
                started,
                budgets,
                slot,
                shared,
                metrics,
            },
        }
    }
}

impl<S, ReqBody, ResBody, D> Future for Attempting<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin,
    ResBody::Data: AsRef<[u8]>,
    ResBody::Error: Into<BoxError>,
    D: Detector,
{
    type Output = Output<ResBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let failure = match std::mem::replace(this.phase, Phase::Done) {
                Phase::Ready => {
                    match this.attempts.service.poll_ready(cx) {
                        Poll::Pending => {
                            *this.phase = Phase::Ready;
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(error)) => {
                            let Some(last) = this.last.take() else {
                                unreachable!("a failure called for this attempt")
                            };
                            return Poll::Ready(this.attempts.not_ready(last, error.into()));
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    *this.last = None;
                    let (future, call) = this.attempts.start();
                    this.call.set(Some(future));
                    let timeout = this.attempts.shared.policy.get_first_chunk_timeout();
                    this.timer.as_mut().reset(deadline::from_now(timeout));
                    *this.phase = Phase::Calling(call);
                    continue;
                }
                Phase::Calling(call) => {
                    let Some(future) = this.call.as_mut().as_pin_mut() else {
                        unreachable!("a call is in flight while calling")
                    };
                    let result = match future.poll(cx) {
                        Poll::Ready(result) => Some(result),
                        Poll::Pending if this.timer.as_mut().poll_elapsed(cx).is_ready() => None,
                        Poll::Pending => {
                            *this.phase = Phase::Calling(call);
                            return Poll::Pending;
                        }
                    };
                    this.call.set(None);
                    match result {
                        None => Failure::Timeout,
                        Some(Err(error)) => {
                            let error = error.into();
                            if !this.attempts.shared.policy.is_transient(&*error) {
                                return Poll::Ready(this.attempts.give_up(error));
                            }
                            Failure::Upstream(error)
                        }
                        Some(Ok(response)) => match this.attempts.judge(response, call) {
                            Judged::Failure(failure) => failure,
                            Judged::Return(response) => return Poll::Ready(Ok(response)),
                            Judged::Peek(peek) => {
                                *this.peek = Some(peek);
                                *this.phase = Phase::Peeking;
                                continue;
                            }
                        },
                    }
                }
                Phase::Peeking => {
                    let Some(peek) = this.peek.as_mut() else {
                        unreachable!("a response is read while peeking")
                    };
                    let limit = this.attempts.shared.policy.get_max_buffer();
                    let found = match peek.poll_first_chunk(cx, limit) {
                        Poll::Ready(found) => found,
                        Poll::Pending if this.timer.as_mut().poll_elapsed(cx).is_ready() => {
                            Err(Failure::Timeout)
                        }
                        Poll::Pending => {
                            *this.phase = Phase::Peeking;
                            return Poll::Pending;
                        }
                    };
                    let Some(peek) = this.peek.take() else {
                        unreachable!("a response is read while peeking")
                    };
                    match found.and_then(|body_done| this.attempts.first_chunk(peek, body_done)) {
                        Ok(response) => return Poll::Ready(Ok(response)),
                        Err(failure) => failure,
                    }
                }
                Phase::Backoff => {
                    if this.timer.as_mut().poll_elapsed(cx).is_pending() {
                        *this.phase = Phase::Backoff;
                        return Poll::Pending;
                    }
                    *this.phase = Phase::Ready;
                    continue;
                }
                Phase::Done => panic!("ResponseFuture polled after completion"),
            };
            // The failed attempt's body and guard are gone by now.
            match this.attempts.after_failure(failure) {
                Next::Retry { after, failure } => {
                    *this.last = Some(failure);
                    if after.is_zero() {
                        // No wait: the next attempt starts in this poll, without a timer.
                        *this.phase = Phase::Ready;
                    } else {
                        this.timer.as_mut().reset(deadline::from_now(after));
                        *this.phase = Phase::Backoff;
                    }
                }
                Next::Done(output) => return Poll::Ready(output),
            }
        }
    }
}

impl<S, ReqBody, D> Attempts<S, ReqBody, D>
where
    D: Detector,
    ReqBody: Clone,
{
    /// Counts how the attempt in progress ended, if it is a retry.
    pub(super) fn retry_ended(&self, outcome: RetryOutcome) {
        if let Some(reason) = self.retried_for {
            self.metrics.retry(outcome, reason);
        }
    }

    /// Starts the next attempt on the ready service.
    fn start(&mut self) -> (S::Future, CallGuard)
    where
        S: Service<Request<ReqBody>>,
    {
        if self.attempt == 2 {
            if let Some(request) = &mut self.request {
                // Marked once, at the first retry, and carried by the copies of later
                // ones: layers below count it as the same call (a budget layer there
                // deposits nothing). It costs the request a map, on retries only.
                request.extensions_mut().insert(RetryAttempt);
            }
        }
        let request = if self.attempt < self.max_attempts {
            self.request.clone()
        } else {
            self.request.take()
        };
        let Some(request) = request else {
            unreachable!("the request is kept until the last attempt")
        };
        let call = CallGuard::new(self.metrics.clone());
        (self.service.call(request), call)
    }
}

impl<S, ReqBody, ResBody, D> fmt::Debug for ResponseFuture<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>>,
    ResBody: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        let phase = match &inner.phase {
            Phase::Ready => "ready",
            Phase::Calling(_) => "calling",
            Phase::Peeking => "reading for the first chunk",
            Phase::Backoff => "backing off",
            Phase::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("phase", &phase)
            .field("attempt", &inner.attempts.attempt)
            .finish()
    }
}
