use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use std::time::{Duration, SystemTime};

use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::BoxError;
use tower_service::Service;

use super::body::{CallGuard, Replay};
use super::classify::is_unprocessed;
use super::error::{FirstChunkError, FirstChunkErrorKind, StopReason};
use super::in_band::InBand;
use super::retry_after::retry_after;
use super::service::Shared;
use super::NotReplayable;
use super::ResponseBody;
use super::RetryAttempt;
use crate::budget::Budgets;
use crate::frame::{Detector, Malformed, Progress};
use crate::metrics::{RetryMetrics, RetryOutcome, RetryReason};
use crate::{deadline, deadline_after};

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

pin_project! {
    /// A deadline whose timer is only made when it is first polled: a call that
    /// completes without waiting (a cached or in-memory answer) never registers one.
    struct Timer {
        at: Instant,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl Timer {
    fn new(at: Instant) -> Self {
        Self { at, sleep: None }
    }

    fn reset(self: Pin<&mut Self>, at: Instant) {
        let this = self.project();
        *this.at = at;
        if let Some(sleep) = this.sleep.as_pin_mut() {
            sleep.reset(at);
        }
    }

    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep_until(*this.at)));
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => sleep.poll(cx),
            None => unreachable!("the timer was just made"),
        }
    }
}

struct Peek<B: Body, D> {
    /// The response, and the frames read from its body so far.
    response: Held<B>,
    buffered: usize,
    detector: D,
    call: CallGuard,
}

/// What stays the same across attempts.
struct Attempts<S, ReqBody, D> {
    service: S,
    /// Cloned for each attempt but the last, which takes it.
    request: Option<Request<ReqBody>>,
    head_request: bool,
    /// The policy's `max_attempts`, or 1 for a request that cannot be replayed.
    max_attempts: u32,
    attempt: u32,
    /// Why the attempt in progress is a retry (`None` for the first).
    retried_for: Option<RetryReason>,
    started: Instant,
    /// Every budget the call deposited in; a retry takes a unit from each.
    budgets: Budgets,
    shared: Arc<Shared<D>>,
    metrics: Arc<RetryMetrics>,
}

/// An attempt that failed before its first chunk.
enum Failure<B: Body> {
    /// A retryable status, with the server's hint (the response goes back if there is
    /// no retry).
    Status(Box<Held<B>>, Option<Duration>),
    Upstream(BoxError),
    Body(BoxError),
    EndOfStream,
    Timeout,
    BufferLimit,
    /// The first chunk is a transient in-band error; the response goes back as it is
    /// if there is no retry.
    InBand(Box<Held<B>>),
    Malformed(Malformed),
}

impl<B: Body> Failure<B> {
    /// What calls for a retry, or `None` when a retry would only repeat the failure.
    fn reason(&self) -> Option<RetryReason> {
        Some(match self {
            Failure::Status(..) => RetryReason::Status,
            Failure::Upstream(_) => RetryReason::Upstream,
            Failure::Body(_) => RetryReason::Body,
            Failure::EndOfStream => RetryReason::EndOfStream,
            Failure::Timeout => RetryReason::Timeout,
            Failure::InBand(_) => RetryReason::InBandError,
            Failure::BufferLimit | Failure::Malformed(_) => return None,
        })
    }
}

impl<B: Body> Failure<B> {
    /// Whether the upstream may have processed the request (see
    /// [`RetryPolicy::retry_maybe_processed`](super::RetryPolicy::retry_maybe_processed)).
    fn maybe_processed(&self) -> bool {
        match self {
            Failure::Status(held, ..) => !refuses_the_work(&held.head),
            Failure::Upstream(error) => !is_unprocessed(&**error),
            // The upstream answered, or was sent the request and went quiet.
            Failure::Body(_)
            | Failure::EndOfStream
            | Failure::Timeout
            | Failure::InBand(_)
            | Failure::BufferLimit
            | Failure::Malformed(_) => true,
        }
    }
}

/// A response by which the server refuses the work, so that a retry cannot repeat it:
/// `408` (it did not get the whole request), `425` (too early), `429` (rate limited),
/// `503` (unavailable), `529` (overloaded), or any status with `x-should-retry: true`.
fn refuses_the_work(head: &http::response::Parts) -> bool {
    let said_so = head
        .headers
        .get(&X_SHOULD_RETRY)
        .is_some_and(|value| value.as_bytes() == b"true");
    said_so || matches!(head.status.as_u16(), 408 | 425 | 429 | 503 | 529)
}

type Output<B> = Result<Response<ResponseBody<B>>, BoxError>;

/// A response whose body may have been read from: its head, its body, and the frames
/// read so far, which the caller gets first. Kept while it is read for the first chunk,
/// and after a failed attempt, for the caller in case there is no retry (the attempt is
/// then over: no longer counted in flight until it is handed back).
struct Held<B: Body> {
    head: http::response::Parts,
    body: B,
    frames: Replay<B::Data>,
    /// The body has returned its end.
    body_done: bool,
}

impl<B: Body> Held<B> {
    fn new(response: Response<B>) -> Self {
        let (head, body) = response.into_parts();
        Self {
            head,
            body,
            frames: Replay::default(),
            body_done: false,
        }
    }

    /// The response for the caller, counted in flight by `call` until its body ends.
    fn into_response(self, call: CallGuard) -> Response<ResponseBody<B>> {
        let body = ResponseBody::new(self.body, self.frames, self.body_done, call);
        Response::from_parts(self.head, body)
    }
}

/// Frames read for the first chunk in one poll, at most: past that the future yields
/// (and checks its deadline), so that a body that is always ready, with empty frames or
/// keep-alives, cannot hold the task or outlive `first_chunk_timeout`.
const FRAMES_PER_POLL: usize = 64;

impl<S, ReqBody, ResBody, D> ResponseFuture<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body,
    D: Detector,
{
    /// Starts the first attempt on `service`, which the caller has polled ready.
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
            Budgets::default()
        };
        let head_request = request.method() == http::Method::HEAD;
        let (first, request) = if retries {
            (request.clone(), Some(request))
        } else {
            (request, None)
        };
        let call = CallGuard::new(metrics.clone());
        let future = service.call(first);
        Self {
            call: Some(future),
            timer: Timer::new(deadline(started, shared.policy.get_first_chunk_timeout())),
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
                    this.timer.as_mut().reset(deadline_after(timeout));
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
                        this.timer.as_mut().reset(deadline_after(after));
                        *this.phase = Phase::Backoff;
                    }
                }
                Next::Done(output) => return Poll::Ready(output),
            }
        }
    }
}

/// The OpenAI and Anthropic SDKs' per-response override of the retry decision.
static X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

/// What follows a failed attempt. (Made once per failure and matched at once: the
/// size of a response is no cost here.)
#[allow(clippy::large_enum_variant)]
enum Next<B: Body> {
    Retry {
        after: Duration,
        failure: Failure<B>,
    },
    Done(Output<B>),
}

/// What a response means for the call.
enum Judged<B: Body, D> {
    Failure(Failure<B>),
    Return(Response<ResponseBody<B>>),
    Peek(Peek<B, D>),
}

impl<S, ReqBody, D> Attempts<S, ReqBody, D>
where
    D: Detector,
    ReqBody: Clone,
{
    /// The call ends with an error of the inner service that is not retried: in the
    /// same shape as one that was, a [`FirstChunkError`] whose source is the error.
    fn give_up<T>(&self, error: BoxError) -> Result<T, BoxError> {
        self.retry_ended(RetryOutcome::Failed);
        let kind = FirstChunkErrorKind::Upstream;
        Err(FirstChunkError::new(kind, StopReason::NotRetryable, self.attempt, Some(error)).into())
    }

    /// The service failed to become ready for the next attempt, which never started
    /// (and is not counted): the call ends with the failure that called for it.
    fn not_ready<B: Body>(&self, last: Failure<B>, error: BoxError) -> Output<B> {
        tracing::warn!(
            provider = %self.metrics.provider(),
            attempt = self.attempt,
            %error,
            "the service failed to become ready for a retry: the last failure goes back"
        );
        self.output(last, StopReason::NotReady, self.attempt - 1)
    }

    /// Counts how the attempt in progress ended, if it is a retry.
    fn retry_ended(&self, outcome: RetryOutcome) {
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

    /// Decides what a response head means: a failure to retry, a response for the
    /// caller, or a body to read for the first chunk.
    fn judge<B>(&self, response: Response<B>, call: CallGuard) -> Judged<B, D>
    where
        B: Body,
    {
        let status = response.status();
        let policy = &self.shared.policy;
        let should_retry = response
            .headers()
            .get(&X_SHOULD_RETRY)
            .and_then(|v| v.to_str().ok());
        let retry_status = match should_retry {
            Some("true") => !status.is_success(),
            Some("false") => false,
            _ => policy.retries_status(status),
        };
        if retry_status {
            let hint = retry_after(response.headers(), SystemTime::now());
            drop(call);
            return Judged::Failure(Failure::Status(Box::new(Held::new(response)), hint));
        }
        // No body by definition: nothing to read, whatever the detector.
        let has_no_body = self.head_request
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::RESET_CONTENT | StatusCode::NOT_MODIFIED
            );
        if !status.is_success() || has_no_body {
            self.retry_ended(if status.is_success() {
                RetryOutcome::Success
            } else {
                RetryOutcome::Failed
            });
            return Judged::Return(Held::new(response).into_response(call));
        }
        let response = Held::new(response);
        let mut detector = self.shared.detector.clone();
        detector.start(&response.head);
        let mut peek = Peek {
            response,
            buffered: 0,
            detector,
            call,
        };
        if !peek.response.body.is_end_stream() {
            return Judged::Peek(peek);
        }
        // Empty by its head: the detector says whether that is an answer.
        let failure = match peek.detector.empty() {
            Progress::Found => match self.first_chunk(peek, true) {
                Ok(response) => return Judged::Return(response),
                Err(failure) => failure,
            },
            Progress::Pending => Failure::EndOfStream,
            Progress::Malformed(error) => Failure::Malformed(error),
        };
        Judged::Failure(failure)
    }

    /// The first chunk arrived: the response goes to the caller, unless the chunk is a
    /// transient in-band error.
    fn first_chunk<B: Body>(
        &self,
        peek: Peek<B, D>,
        body_done: bool,
    ) -> Result<Response<ResponseBody<B>>, Failure<B>> {
        let verdict = peek
            .detector
            .first_chunk()
            .map_or(InBand::Content, |chunk| {
                self.shared.policy.get_in_band_errors().classify(&chunk)
            });
        let response = Held {
            body_done,
            ..peek.response
        };
        if verdict == InBand::TransientError {
            return Err(Failure::InBand(Box::new(response)));
        }
        self.metrics.first_chunk(self.started.elapsed());
        self.retry_ended(RetryOutcome::Success);
        Ok(response.into_response(peek.call))
    }

    /// After a failure: the delay before the next attempt, or the call's output.
    fn after_failure<B: Body>(&mut self, failure: Failure<B>) -> Next<B> {
        let policy = &self.shared.policy;
        let provider = self.metrics.provider();
        self.retry_ended(RetryOutcome::Failed);
        match &failure {
            Failure::Timeout => tracing::warn!(
                %provider,
                attempt = self.attempt,
                timeout_ms = policy.get_first_chunk_timeout().as_millis() as u64,
                "stalled: no first chunk within first_chunk_timeout"
            ),
            Failure::Malformed(error) => tracing::warn!(
                %provider,
                attempt = self.attempt,
                %error,
                "the stream's framing is broken before its first chunk: not retried"
            ),
            _ => {}
        }
        let reason = match &failure {
            Failure::Status(_, Some(hint)) if *hint > policy.get_max_retry_after() => None,
            failure => failure.reason(),
        };
        let stop = match reason {
            None => StopReason::NotRetryable,
            Some(reason) if !policy.get_retry_maybe_processed() && failure.maybe_processed() => {
                tracing::warn!(
                    %provider,
                    attempt = self.attempt,
                    reason = reason.label(),
                    "the upstream may have processed the request: not retried"
                );
                StopReason::MaybeProcessed
            }
            Some(reason) if self.attempt >= self.max_attempts => {
                if self.max_attempts > 1 {
                    self.metrics.retry(RetryOutcome::Exhausted, reason);
                    tracing::warn!(
                        %provider,
                        attempts = self.attempt,
                        reason = reason.label(),
                        "attempts exhausted before the first chunk"
                    );
                }
                StopReason::AttemptsExhausted
            }
            Some(reason) if !self.budgets.is_empty() && !self.budgets.withdraw() => {
                self.metrics.retry(RetryOutcome::BudgetExhausted, reason);
                tracing::warn!(
                    %provider,
                    attempt = self.attempt,
                    reason = reason.label(),
                    "retry budget exhausted: the failure goes back without a retry"
                );
                StopReason::BudgetExhausted
            }
            Some(reason) => {
                // A hint is never zero (see `retry_after`): `0 < hint <= max_retry_after`.
                let delay = match &failure {
                    Failure::Status(_, Some(hint)) => *hint,
                    _ => policy.backoff_delay(self.attempt - 1),
                };
                tracing::info!(
                    %provider,
                    attempt = self.attempt + 1,
                    reason = reason.label(),
                    delay_ms = delay.as_millis() as u64,
                    "retrying before the first chunk"
                );
                drop(provider);
                self.attempt += 1;
                self.retried_for = Some(reason);
                return Next::Retry {
                    after: delay,
                    failure,
                };
            }
        };
        Next::Done(self.output(failure, stop, self.attempt))
    }

    /// What the caller gets for the failure that ended the call after `attempts`: the
    /// response, if the failure has one, or a [`FirstChunkError`].
    fn output<B: Body>(&self, failure: Failure<B>, stop: StopReason, attempts: u32) -> Output<B> {
        let (kind, source) = match failure {
            Failure::Status(held, _) | Failure::InBand(held) => {
                return Ok(held.into_response(CallGuard::new(self.metrics.clone())));
            }
            Failure::Upstream(error) => (FirstChunkErrorKind::Upstream, Some(error)),
            Failure::Body(error) => (FirstChunkErrorKind::Body, Some(error)),
            Failure::EndOfStream => (FirstChunkErrorKind::EndOfStream, None),
            Failure::Timeout => (FirstChunkErrorKind::Timeout, None),
            Failure::BufferLimit => (FirstChunkErrorKind::BufferLimit, None),
            Failure::Malformed(error) => (FirstChunkErrorKind::Malformed, Some(error.into())),
        };
        Err(FirstChunkError::new(kind, stop, attempts, source).into())
    }
}

impl<B, D> Peek<B, D>
where
    B: Body + Unpin,
    B::Data: AsRef<[u8]>,
    B::Error: Into<BoxError>,
    D: Detector,
{
    /// Reads frames until the detector finds the first chunk. `Ok(true)` means the body
    /// ended with it.
    fn poll_first_chunk(
        &mut self,
        cx: &mut Context<'_>,
        limit: usize,
    ) -> Poll<Result<bool, Failure<B>>> {
        for _ in 0..FRAMES_PER_POLL {
            // Already at its end (`Content-Length: 0`, or an exact length all read): the
            // detector judges the end without another poll, which may never come back.
            if self.response.body.is_end_stream() {
                return Poll::Ready(self.ended());
            }
            let frame = match ready!(Pin::new(&mut self.response.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Err(Failure::Body(error.into()))),
                None => return Poll::Ready(self.ended()),
            };
            let Some(data) = frame.data_ref() else {
                // Trailers end the stream.
                self.response.frames.push_back(frame);
                return Poll::Ready(self.ended());
            };
            let bytes = data.as_ref();
            if bytes.is_empty() {
                // Carries nothing: not held, so that a stream of empty frames cannot
                // grow the replay without bound.
                continue;
            }
            let progress = self.detector.feed(bytes);
            // What holding the frame costs: its bytes and its place in the replay, so
            // that tiny frames cannot hold more memory than the cap.
            let held = bytes.len() + std::mem::size_of::<Frame<B::Data>>();
            self.buffered = self.buffered.saturating_add(held);
            self.response.frames.push_back(frame);
            let progress = match progress {
                Progress::Pending if self.buffered > limit => match self.detector.buffer_full() {
                    Progress::Pending => return Poll::Ready(Err(Failure::BufferLimit)),
                    decided => decided,
                },
                progress => progress,
            };
            match progress {
                Progress::Pending => {}
                Progress::Found => return Poll::Ready(Ok(false)),
                Progress::Malformed(error) => return Poll::Ready(Err(Failure::Malformed(error))),
            }
        }
        // Bounded work per poll: yield, and let the caller check the deadline.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<B: Body, D: Detector> Peek<B, D> {
    /// The body ended: found at its end, or not at all.
    fn ended(&mut self) -> Result<bool, Failure<B>> {
        match self.detector.finish() {
            Progress::Found => Ok(true),
            Progress::Malformed(error) => Err(Failure::Malformed(error)),
            Progress::Pending => Err(Failure::EndOfStream),
        }
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
