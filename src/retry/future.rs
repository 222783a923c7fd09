//! Running the attempts of one call: the state machine that starts each attempt, waits
//! for its response, has it read for the first chunk (`peek`), and waits out the
//! backoff (`timer`). What each outcome means is decided in `judge`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use super::NotReplayable;
use super::ResponseBody;
use super::RetryAttempt;
use super::body::CallGuard;
use super::error::StopReason;
use super::judge::{Failure, Judged, Next, Output};
use super::peek::Peek;
use super::service::Shared;
use super::timer::Timer;
use crate::budget::Budgets;
use crate::concurrency::Slot;
use crate::deadline;
use crate::frame::Detector;
use crate::metrics::{HedgeOutcome, RetryMetrics, RetryOutcome, RetryReason};

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
    #[project = AttemptingProj]
    struct Attempting<S, ReqBody, ResBody, D>
    where
        S: Service<Request<ReqBody>>,
        ResBody: Body,
    {
        // The attempt in flight; with hedging, the first of those in flight. Inline, so
        // that a call without hedges allocates nothing for its attempts.
        #[pin]
        lead: Attempt<S::Future, ResBody, D>,
        // The hedged attempts in flight beside it.
        extra: Vec<Pin<Box<Attempt<S::Future, ResBody, D>>>>,
        // The one timer of the call: the earliest of the first-chunk deadlines of the
        // attempts in flight and the time of the next start.
        #[pin]
        timer: Timer,
        // The attempt to start next: a retry after its backoff, or a hedge after its
        // delay.
        next: Option<Start>,
        // The failure that called for the next attempt, kept until that attempt starts
        // (if the service fails to become ready for it, this is what the caller gets),
        // or the failure that ends the call once no attempt is left, with `stop`.
        last: Option<Failure<ResBody>>,
        stop: StopReason,
        attempts: Attempts<S, ReqBody, D>,
    }
}

pin_project! {
    /// One attempt: its request in flight until the response head, then its body read
    /// for the first chunk.
    struct Attempt<F, B, D>
    where
        B: Body,
    {
        // The request in flight, with its count in `provider_calls_in_flight`.
        #[pin]
        call: Option<F>,
        guard: Option<CallGuard>,
        // A 2xx response, read for its first chunk. Kept apart from the call, so that
        // moving on from one to the other moves a word, not the response.
        peek: Option<Peek<B, D>>,
        // When it started: its first-chunk deadline is `first_chunk_timeout` on.
        started: Instant,
        // Why it is a retry (`None` for the first attempt and for hedges).
        retried_for: Option<RetryReason>,
        hedge: HedgeTicket,
    }
}

/// How an attempt ended.
enum Settled<B: Body> {
    /// The response goes to the caller: its first chunk came, or it is not a failure.
    Answered(Response<ResponseBody<B>>),
    Failed(Failure<B>),
}

/// The next attempt to start.
#[derive(Debug)]
struct Start {
    /// When it is due; `None` once due, while the service is made ready for it.
    at: Option<Instant>,
    /// Why it is a retry, or `None` for a hedge.
    retry: Option<RetryReason>,
}

/// A hedged attempt's count in `stream_hedges_total`: `lost` when dropped, unless it
/// delivered the call's first chunk. Empty for an attempt that is not a hedge.
struct HedgeTicket(Option<Arc<RetryMetrics>>);

impl HedgeTicket {
    /// Counts the hedge, if it is one, as the winner.
    fn won(&mut self) {
        if let Some(metrics) = self.0.take() {
            metrics.hedge(HedgeOutcome::Won);
        }
    }
}

impl Drop for HedgeTicket {
    fn drop(&mut self) {
        if let Some(metrics) = self.0.take() {
            metrics.hedge(HedgeOutcome::Lost);
        }
    }
}

/// What stays the same across attempts.
pub(super) struct Attempts<S, ReqBody, D> {
    pub(super) service: S,
    /// Cloned for each attempt but the last, which takes it.
    pub(super) request: Option<Request<ReqBody>>,
    pub(super) head_request: bool,
    /// The policy's `max_attempts`, or 1 for a request that cannot be replayed.
    pub(super) max_attempts: u32,
    /// Attempts started, or decided on (a retry waiting out its backoff).
    pub(super) attempt: u32,
    /// The delay before a hedge, while the call may be hedged.
    pub(super) hedge_after: Option<Duration>,
    pub(super) started: Instant,
    /// Every budget the call deposited in; a retry or a hedge takes a unit from each.
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
        let hedge_after = match &shared.hedging {
            Some(hedging) if retries => hedging.delay(started),
            _ => None,
        };
        let next = hedge_after.map(|after| Start {
            at: Some(deadline::from(started, after)),
            retry: None,
        });
        Self {
            lead: Attempt::new(future, call, started, None, HedgeTicket(None)),
            extra: Vec::new(),
            timer: Timer::new(),
            next,
            last: None,
            stop: StopReason::NotRetryable,
            attempts: Attempts {
                service,
                request,
                head_request,
                max_attempts,
                attempt: 1,
                hedge_after,
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
            // Once the output has been returned, nothing is in flight or to start.
            assert!(
                this.is_running() || this.next.is_some(),
                "ResponseFuture polled after completion"
            );
            // The attempts in flight, the first one started first.
            let mut settled = None;
            if this.lead.is_running() {
                if let Poll::Ready(ended) = this.lead.as_mut().poll(cx, this.attempts) {
                    settled = Some((ended, this.lead.as_mut().stop()));
                }
            }
            if settled.is_none() {
                for index in 0..this.extra.len() {
                    let attempt = this.extra[index].as_mut();
                    if let Poll::Ready(ended) = attempt.poll(cx, this.attempts) {
                        let mut attempt = this.extra.swap_remove(index);
                        settled = Some((ended, attempt.as_mut().stop()));
                        break;
                    }
                }
            }
            if let Some((ended, (retried_for, hedge))) = settled {
                match ended {
                    Settled::Answered(response) => {
                        let mut hedge = hedge;
                        hedge.won();
                        // The others are dropped now: their streams are closed.
                        this.lead.as_mut().stop();
                        this.extra.clear();
                        *this.next = None;
                        return Poll::Ready(Ok(response));
                    }
                    Settled::Failed(failure) => {
                        drop(hedge);
                        match this.failed(failure, retried_for) {
                            Some(output) => return Poll::Ready(output),
                            None => continue,
                        }
                    }
                }
            }
            // The next attempt, once due and the service is ready for it.
            if let Some(Start { at: None, retry }) = *this.next {
                match this.attempts.service.poll_ready(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(())) => {
                        *this.next = None;
                        // A hedge takes its attempt and its unit of budget now that
                        // it can start; a retry took them when it was decided.
                        if retry.is_some() || this.attempts.hedge() {
                            this.start(retry);
                        }
                        continue;
                    }
                    Poll::Ready(Err(error)) => {
                        let error = error.into();
                        *this.next = None;
                        // The attempt never started, and no other will.
                        if retry.is_some() {
                            this.attempts.attempt -= 1;
                        }
                        this.attempts.hedge_after = None;
                        if !this.is_running() {
                            let Some(last) = this.last.take() else {
                                unreachable!("a failure called for this attempt")
                            };
                            return Poll::Ready(this.attempts.not_ready(last, &error));
                        }
                        tracing::warn!(
                            provider = %this.attempts.metrics.provider(),
                            %error,
                            "the service failed to become ready for another attempt: \
                             the attempts in flight go on"
                        );
                    }
                }
            }
            // The timer, set to the earliest deadline or start.
            let Some(at) = this.earliest() else {
                // Only the service's readiness is awaited.
                return Poll::Pending;
            };
            if this.timer.as_mut().poll_at(at, cx).is_pending() {
                return Poll::Pending;
            }
            if let Some(output) = this.elapsed(Instant::now()) {
                return Poll::Ready(output);
            }
        }
    }
}

impl<S, ReqBody, ResBody, D> AttemptingProj<'_, S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin,
    ResBody::Data: AsRef<[u8]>,
    ResBody::Error: Into<BoxError>,
    D: Detector,
{
    fn is_running(&self) -> bool {
        self.lead.is_running() || !self.extra.is_empty()
    }

    /// The earliest first-chunk deadline of an attempt in flight, or the time of the
    /// next start, if sooner.
    fn earliest(&self) -> Option<Instant> {
        let timeout = self.attempts.shared.policy.get_first_chunk_timeout();
        let lead = self.lead.is_running().then(|| self.lead.deadline(timeout));
        let extra = self.extra.iter().map(|attempt| attempt.deadline(timeout));
        let next = self.next.as_ref().and_then(|next| next.at);
        lead.into_iter().chain(extra).chain(next).min()
    }

    /// The timer went off at `now`: attempts past their deadline fail, and the next
    /// start comes due.
    fn elapsed(&mut self, now: Instant) -> Option<Output<ResBody>> {
        let timeout = self.attempts.shared.policy.get_first_chunk_timeout();
        if self.lead.is_running()
            && self.lead.deadline(timeout) <= now
            && !self.lead.as_mut().cut_refusal()
        {
            let (retried_for, _) = self.lead.as_mut().stop();
            if let Some(output) = self.failed(Failure::Timeout, retried_for) {
                return Some(output);
            }
        }
        let mut index = 0;
        while index < self.extra.len() {
            if self.extra[index].deadline(timeout) > now || self.extra[index].as_mut().cut_refusal()
            {
                index += 1;
                continue;
            }
            let mut attempt = self.extra.swap_remove(index);
            let (retried_for, _) = attempt.as_mut().stop();
            drop(attempt);
            if let Some(output) = self.failed(Failure::Timeout, retried_for) {
                return Some(output);
            }
        }
        let next = self.next.as_mut()?;
        if next.at.is_none_or(|at| at > now) {
            return None;
        }
        next.at = None;
        None
    }

    /// An attempt failed before its first chunk: the next starts as a retry would, or,
    /// when none may, the call ends with the failure once no other attempt is in
    /// flight.
    fn failed(
        &mut self,
        failure: Failure<ResBody>,
        retried_for: Option<RetryReason>,
    ) -> Option<Output<ResBody>> {
        if failure.is_overload() {
            if let Some(slot) = &self.attempts.slot {
                slot.overloaded();
            }
        }
        let retry_due = self.next.as_ref().is_some_and(|next| next.retry.is_some());
        if retry_due {
            // An earlier failure called for the next attempt already: this one only
            // counts.
            self.attempts.retry_ended(retried_for, RetryOutcome::Failed);
        } else {
            let others_running = self.is_running();
            match self
                .attempts
                .after_failure(failure, retried_for, others_running)
            {
                Next::Retry {
                    after,
                    reason,
                    failure,
                } => {
                    *self.last = Some(failure);
                    // No wait: the next attempt starts in this poll, without a timer.
                    let at = (!after.is_zero()).then(|| deadline::from_now(after));
                    *self.next = Some(Start {
                        at,
                        retry: Some(reason),
                    });
                    return None;
                }
                Next::Stop { failure, stop } => {
                    *self.last = Some(failure);
                    *self.stop = stop;
                }
            }
        }
        if self.is_running() || retry_due {
            return None;
        }
        // A hedge only starts beside an attempt in flight.
        *self.next = None;
        let Some(last) = self.last.take() else {
            unreachable!("the failure that ends the call is kept")
        };
        let attempts = self.attempts.attempt;
        Some(self.attempts.output(last, *self.stop, attempts))
    }

    /// Starts the next attempt on the ready service, and schedules a hedge beside it.
    fn start(&mut self, retry: Option<RetryReason>) {
        *self.last = None;
        let (future, call) = self.attempts.start();
        let now = Instant::now();
        let hedge = HedgeTicket(retry.is_none().then(|| self.attempts.metrics.clone()));
        let attempt = Attempt::new(future, call, now, retry, hedge);
        if self.lead.is_running() {
            self.extra.push(Box::pin(attempt));
        } else {
            self.lead.set(attempt);
        }
        let Some(after) = self.attempts.hedge_after else {
            return;
        };
        let extra = self
            .attempts
            .shared
            .hedging
            .as_ref()
            .map_or(0, |h| h.max_extra);
        let in_flight = usize::from(self.lead.is_running()) + self.extra.len();
        if in_flight <= extra as usize && self.attempts.attempt < self.attempts.max_attempts {
            *self.next = Some(Start {
                at: Some(deadline::from(now, after)),
                retry: None,
            });
        }
    }
}

impl<F, B, D> Attempt<F, B, D>
where
    B: Body,
{
    fn new(
        call: F,
        guard: CallGuard,
        started: Instant,
        retried_for: Option<RetryReason>,
        hedge: HedgeTicket,
    ) -> Self {
        Self {
            call: Some(call),
            guard: Some(guard),
            peek: None,
            started,
            retried_for,
            hedge,
        }
    }

    fn is_running(&self) -> bool {
        self.call.is_some() || self.peek.is_some()
    }

    /// Its deadline passed while it read a `429` for what it says: the read ends with
    /// what it has, at the next poll. `false` for any other attempt, which fails.
    fn cut_refusal(self: Pin<&mut Self>) -> bool {
        let this = self.project();
        match this.peek.as_mut().and_then(|peek| peek.refusal.as_mut()) {
            Some(refusal) if !refusal.cut => {
                refusal.cut = true;
                true
            }
            _ => false,
        }
    }

    /// Its first-chunk deadline, `timeout` after its start.
    fn deadline(&self, timeout: Duration) -> Instant {
        deadline::from(self.started, timeout)
    }

    /// Ends the attempt, dropping what is in flight (its stream is closed); returns
    /// why it was a retry, and its hedge's ticket.
    fn stop(self: Pin<&mut Self>) -> (Option<RetryReason>, HedgeTicket) {
        let mut this = self.project();
        this.call.set(None);
        *this.guard = None;
        *this.peek = None;
        (this.retried_for.take(), HedgeTicket(this.hedge.0.take()))
    }
}

impl<F, B, D> Attempt<F, B, D>
where
    B: Body + Unpin,
    B::Data: AsRef<[u8]>,
    B::Error: Into<BoxError>,
    D: Detector,
{
    /// Drives the attempt until it has an answer for the caller or fails. Its deadline
    /// is the caller's to check.
    fn poll<S, ReqBody, E>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        attempts: &mut Attempts<S, ReqBody, D>,
    ) -> Poll<Settled<B>>
    where
        F: Future<Output = Result<Response<B>, E>>,
        E: Into<BoxError>,
        ReqBody: Clone,
    {
        let mut this = self.project();
        if let Some(future) = this.call.as_mut().as_pin_mut() {
            let result = ready!(future.poll(cx));
            this.call.set(None);
            let Some(guard) = this.guard.take() else {
                unreachable!("a call in flight is counted")
            };
            let response = match result {
                Ok(response) => response,
                Err(error) => {
                    let error = error.into();
                    return Poll::Ready(Settled::Failed(
                        if attempts.shared.policy.is_transient(&*error) {
                            Failure::Upstream(error)
                        } else {
                            Failure::NotTransient(error)
                        },
                    ));
                }
            };
            match attempts.judge(response, guard, *this.retried_for, *this.started) {
                Judged::Failure(failure) => return Poll::Ready(Settled::Failed(failure)),
                Judged::Return(response) => return Poll::Ready(Settled::Answered(response)),
                Judged::Peek(peek) => *this.peek = Some(peek),
            }
        }
        let Some(peek) = this.peek.as_mut() else {
            unreachable!("an attempt is polled while in flight")
        };
        let limit = attempts.shared.policy.get_max_buffer();
        let found = ready!(peek.poll_first_chunk(cx, limit));
        let Some(peek) = this.peek.take() else {
            unreachable!("read for the first chunk")
        };
        let (retried_for, started) = (*this.retried_for, *this.started);
        Poll::Ready(
            match found
                .and_then(|body_done| attempts.first_chunk(peek, body_done, retried_for, started))
            {
                Ok(response) => Settled::Answered(response),
                Err(failure) => Settled::Failed(failure),
            },
        )
    }
}

impl<S, ReqBody, D> Attempts<S, ReqBody, D>
where
    D: Detector,
    ReqBody: Clone,
{
    /// Counts how an attempt ended, if it is a retry.
    pub(super) fn retry_ended(&self, retried_for: Option<RetryReason>, outcome: RetryOutcome) {
        if let Some(reason) = retried_for {
            self.metrics.retry(outcome, reason);
        }
    }

    /// A hedge is due and the service ready for it: whether it may start. It
    /// withdraws from the budget like a retry, and a budget that refuses stops hedging
    /// the call.
    fn hedge(&mut self) -> bool {
        let provider = self.metrics.provider();
        if !self.budgets.is_empty() && !self.budgets.withdraw() {
            self.metrics.hedge(HedgeOutcome::BudgetExhausted);
            tracing::warn!(
                %provider,
                attempt = self.attempt,
                "retry budget exhausted: no hedge for this call"
            );
            drop(provider);
            self.hedge_after = None;
            return false;
        }
        tracing::info!(
            %provider,
            attempt = self.attempt + 1,
            after_ms = self.hedge_after.unwrap_or_default().as_millis() as u64,
            "hedging: no first chunk yet, another attempt starts beside"
        );
        drop(provider);
        self.attempt += 1;
        true
    }

    /// Starts the next attempt on the ready service.
    fn start(&mut self) -> (S::Future, CallGuard)
    where
        S: Service<Request<ReqBody>>,
    {
        if let Some(request) = &mut self.request {
            if request.extensions().get::<RetryAttempt>().is_none() {
                // Marked once, at the first attempt after the first (a retry or a
                // hedge), and carried by the copies of later ones: layers below count
                // it as the same call (a budget layer there deposits nothing). It costs
                // the request a map, on retries only.
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
        let attempts = std::iter::once(&inner.lead).chain(inner.extra.iter().map(|a| &**a));
        let (calling, reading) = attempts.fold((false, false), |(calling, reading), a| {
            (calling || a.call.is_some(), reading || a.peek.is_some())
        });
        let phase = match (calling, reading, &inner.next) {
            (true, _, _) => "calling",
            (_, true, _) => "reading for the first chunk",
            (_, _, Some(Start { at: Some(_), .. })) => "backing off",
            (_, _, Some(Start { at: None, .. })) => "ready",
            (_, _, None) => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("phase", &phase)
            .field("attempt", &inner.attempts.attempt)
            .field("hedges_in_flight", &inner.extra.len())
            .finish()
    }
}
