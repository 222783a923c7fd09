//! What a response or an error means for the call: a failure to retry, a response for
//! the caller, or a body to read for the first chunk; and after a failure, the wait
//! before the next attempt or the call's output.

use std::time::{Duration, SystemTime};

use bytes::Buf;
use http::{Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower::BoxError;

use super::ResponseBody;
use super::body::{BodyGuard, CallGuard};
use super::classify::{is_overload_status, is_unprocessed};
use super::error::{FirstChunkError, FirstChunkErrorKind, GaveUp, StopReason};
use super::future::Attempts;
use super::in_band::InBand;
use super::peek::{Held, Peek, Refusal};
use crate::concurrency::Slot;
use crate::frame::{Detector, Malformed, Progress};
use crate::metrics::{RetryOutcome, RetryReason};
use crate::retry_after::retry_after;

/// An attempt that failed before its first chunk.
pub(super) enum Failure<B: Body> {
    /// A retryable status, with the server's hint (the response goes back if there is
    /// no retry).
    Status(Box<Held<B>>, Option<Duration>),
    Upstream(BoxError),
    /// An error of the inner service that is not transient: a retry would repeat it.
    NotTransient(BoxError),
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
    pub(super) fn reason(&self) -> Option<RetryReason> {
        Some(match self {
            Failure::Status(..) => RetryReason::Status,
            Failure::Upstream(_) => RetryReason::Upstream,
            Failure::Body(_) => RetryReason::Body,
            Failure::EndOfStream => RetryReason::EndOfStream,
            Failure::Timeout => RetryReason::Timeout,
            Failure::InBand(_) => RetryReason::InBandError,
            Failure::NotTransient(_) | Failure::BufferLimit | Failure::Malformed(_) => return None,
        })
    }
}

impl<B: Body> Failure<B> {
    /// Whether the failure says the upstream is overloaded, for an adaptive limit: a
    /// `429`, `503` or `529`, a transient in-band error (overloaded, rate limited,
    /// unavailable), a stall before the first chunk, or an HTTP/2 `REFUSED_STREAM` or
    /// `ENHANCE_YOUR_CALM`.
    pub(super) fn is_overload(&self) -> bool {
        match self {
            Failure::Status(held, _) => {
                is_overload_status(held.head.status)
                    && !(held.head.status == StatusCode::TOO_MANY_REQUESTS
                        && says_quota_spent(held))
            }
            Failure::InBand(held) => says_overloaded(held),
            Failure::Timeout => true,
            Failure::Upstream(error) => super::classify::is_overload(&**error),
            Failure::NotTransient(_)
            | Failure::Body(_)
            | Failure::EndOfStream
            | Failure::BufferLimit
            | Failure::Malformed(_) => false,
        }
    }

    /// Whether the upstream may have processed the request (see
    /// [`RetryPolicy::retry_maybe_processed`](super::RetryPolicy::retry_maybe_processed)).
    pub(super) fn maybe_processed(&self) -> bool {
        match self {
            Failure::Status(held, ..) => !refuses_the_work(&held.head),
            Failure::Upstream(error) => !is_unprocessed(&**error),
            // The upstream answered, or was sent the request and went quiet.
            Failure::NotTransient(_)
            | Failure::Body(_)
            | Failure::EndOfStream
            | Failure::Timeout
            | Failure::InBand(_)
            | Failure::BufferLimit
            | Failure::Malformed(_) => true,
        }
    }
}

/// Whether a `429`'s body, as far as it was read, says that the account's quota is spent
/// (OpenAI's `insufficient_quota`): a limit on spending, which fewer streams would not
/// lift, and so no overload.
fn says_quota_spent<B: Body>(held: &Held<B>) -> bool {
    held_bytes(held, |bytes| {
        memchr::memmem::find(bytes, b"insufficient_quota").is_some()
    })
}

/// Whether a transient in-band error says the upstream has too much work (Anthropic's
/// `overloaded_error`, a rate limit, Bedrock's throttling, a capacity error), rather
/// than an internal error or a model still loading.
fn says_overloaded<B: Body>(held: &Held<B>) -> bool {
    const MARKERS: [&[u8]; 6] = [
        b"overloaded",
        b"rate_limit",
        b"rate limit",
        b"throttling",
        b"too many requests",
        b"capacity",
    ];
    held_bytes(held, |bytes| {
        let lower = bytes.to_ascii_lowercase();
        MARKERS
            .iter()
            .any(|marker| memchr::memmem::find(&lower, marker).is_some())
    })
}

/// `read` over the bytes of the frames held, joined.
fn held_bytes<B: Body>(held: &Held<B>, read: impl FnOnce(&[u8]) -> bool) -> bool {
    let mut joined = Vec::new();
    for data in held.frames.data() {
        joined.extend_from_slice(data.chunk());
    }
    read(&joined)
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

pub(super) type Output<B> = Result<Response<ResponseBody<B>>, BoxError>;

/// The OpenAI and Anthropic SDKs' per-response override of the retry decision.
static X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

/// What follows a failed attempt: another after a wait, or none.
pub(super) enum Next<B: Body> {
    Retry {
        after: Duration,
        /// What calls for it, the `reason` of its outcome in `stream_retries_total`.
        reason: RetryReason,
        failure: Failure<B>,
    },
    /// No retry: the failure is the call's output, unless another attempt still runs.
    Stop {
        failure: Failure<B>,
        stop: StopReason,
    },
}

/// What a response means for the call.
pub(super) enum Judged<B: Body, D> {
    Failure(Failure<B>),
    Return(Response<ResponseBody<B>>),
    Peek(Peek<B, D>),
}

impl<S, ReqBody, D> Attempts<S, ReqBody, D>
where
    D: Detector,
    ReqBody: Clone,
{
    /// The service failed to become ready for the next attempt, which never started
    /// (and is not counted): the call ends with the failure that called for it.
    pub(super) fn not_ready<B: Body>(&mut self, last: Failure<B>, error: &BoxError) -> Output<B> {
        tracing::warn!(
            provider = %self.metrics.provider(),
            attempt = self.attempt + 1,
            %error,
            "the service failed to become ready for a retry: the last failure goes back"
        );
        self.output(last, StopReason::NotReady, self.attempt)
    }

    /// Decides what a response head means: a failure to retry, a response for the
    /// caller, or a body to read for the first chunk.
    pub(super) fn judge<B>(
        &mut self,
        response: Response<B>,
        call: CallGuard,
        retried_for: Option<RetryReason>,
        started: Instant,
    ) -> Judged<B, D>
    where
        B: Body,
    {
        let status = response.status();
        if let Some(slot) = &self.slot {
            slot.response_head(status, response.headers());
        }
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
        let hint = || retry_after(response.headers(), SystemTime::now());
        // An adaptive limit above must tell a spent quota from an overload: the body
        // says which, retried or not.
        let adaptive = self.slot.as_ref().is_some_and(Slot::is_adaptive);
        if adaptive && status == StatusCode::TOO_MANY_REQUESTS && !response.body().is_end_stream() {
            let refusal = Refusal {
                hint: hint(),
                retried: retry_status,
                cut: false,
            };
            return Judged::Peek(Peek {
                response: Held::new(response),
                buffered: 0,
                detector: self.shared.detector.clone(),
                call,
                refusal: Some(refusal),
            });
        }
        if retry_status {
            let hint = hint();
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
            // Not retried, but an overload all the same (its body unread: a `429` here
            // is empty by its head, or no adaptive limit reads it).
            if is_overload_status(status) {
                if let Some(slot) = &self.slot {
                    slot.overloaded();
                }
            }
            let outcome = if status.is_success() {
                RetryOutcome::Success
            } else {
                RetryOutcome::Failed
            };
            self.retry_ended(retried_for, outcome);
            return Judged::Return(Held::new(response).into_response(self.guard(call)));
        }
        let response = Held::new(response);
        let mut detector = self.shared.detector.clone();
        detector.start(&response.head);
        let mut peek = Peek {
            response,
            buffered: 0,
            detector,
            call,
            refusal: None,
        };
        if !peek.response.body.is_end_stream() {
            return Judged::Peek(peek);
        }
        // Empty by its head: the detector says whether that is an answer.
        let failure = match peek.detector.empty() {
            Progress::Found => match self.first_chunk(peek, true, retried_for, started) {
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
    pub(super) fn first_chunk<B: Body>(
        &mut self,
        peek: Peek<B, D>,
        body_done: bool,
        retried_for: Option<RetryReason>,
        started: Instant,
    ) -> Result<Response<ResponseBody<B>>, Failure<B>> {
        if let Some(refusal) = peek.refusal {
            // A refusal read for what it says: the failure it always was, or, when it is
            // not retried, the caller's answer, and an overload unless the quota is spent.
            let held = Held {
                body_done,
                ..peek.response
            };
            if refusal.retried {
                return Err(Failure::Status(Box::new(held), refusal.hint));
            }
            if !says_quota_spent(&held) {
                if let Some(slot) = &self.slot {
                    slot.overloaded();
                }
            }
            self.retry_ended(retried_for, RetryOutcome::Failed);
            return Ok(held.into_response(self.guard(peek.call)));
        }
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
        let now = Instant::now();
        if let Some(slot) = &self.slot {
            // The attempt's own time: what the upstream took to start this stream.
            slot.answered(now.saturating_duration_since(started));
        }
        let latency = now.saturating_duration_since(self.started);
        self.metrics.first_chunk(latency);
        if let Some(hedging) = &self.shared.hedging {
            hedging.record(now, latency);
        }
        self.retry_ended(retried_for, RetryOutcome::Success);
        Ok(response.into_response(self.guard(peek.call)))
    }

    /// What the caller's body holds until the stream ends: the attempt's count in flight
    /// and the concurrency slot, when a layer above handed it over.
    fn guard(&mut self, call: CallGuard) -> BodyGuard {
        BodyGuard::new(call, self.slot.take())
    }

    /// After a failure: the delay before the next attempt, or why there is none. With
    /// `others_running` (hedged attempts), running out of attempts or budget does not
    /// end the call yet, and is neither counted nor logged.
    pub(super) fn after_failure<B: Body>(
        &mut self,
        failure: Failure<B>,
        retried_for: Option<RetryReason>,
        others_running: bool,
    ) -> Next<B> {
        self.retry_ended(retried_for, RetryOutcome::Failed);
        let policy = &self.shared.policy;
        let provider = self.metrics.provider();
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
                if self.max_attempts > 1 && !others_running {
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
                if !others_running {
                    self.metrics.retry(RetryOutcome::BudgetExhausted, reason);
                    tracing::warn!(
                        %provider,
                        attempt = self.attempt,
                        reason = reason.label(),
                        "retry budget exhausted: the failure goes back without a retry"
                    );
                }
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
                return Next::Retry {
                    after: delay,
                    reason,
                    failure,
                };
            }
        };
        Next::Stop { failure, stop }
    }

    /// What the caller gets for the failure that ended the call after `attempts`: the
    /// response, if the failure has one, or a [`FirstChunkError`].
    pub(super) fn output<B: Body>(
        &mut self,
        failure: Failure<B>,
        stop: StopReason,
        attempts: u32,
    ) -> Output<B> {
        let (kind, source) = match failure {
            Failure::Status(mut held, _) => {
                held.head
                    .extensions
                    .insert(GaveUp::new(stop, attempts, false));
                let call = CallGuard::new(self.metrics.clone());
                return Ok(held.into_response(self.guard(call)));
            }
            Failure::InBand(mut held) => {
                held.head
                    .extensions
                    .insert(GaveUp::new(stop, attempts, true));
                let call = CallGuard::new(self.metrics.clone());
                return Ok(held.into_response(self.guard(call)));
            }
            Failure::Upstream(error) | Failure::NotTransient(error) => {
                (FirstChunkErrorKind::Upstream, Some(error))
            }
            Failure::Body(error) => (FirstChunkErrorKind::Body, Some(error)),
            Failure::EndOfStream => (FirstChunkErrorKind::EndOfStream, None),
            Failure::Timeout => (FirstChunkErrorKind::Timeout, None),
            Failure::BufferLimit => (FirstChunkErrorKind::BufferLimit, None),
            Failure::Malformed(error) => (FirstChunkErrorKind::Malformed, Some(error.into())),
        };
        Err(FirstChunkError::new(kind, stop, attempts, source).into())
    }
}
