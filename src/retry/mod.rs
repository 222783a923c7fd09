//! Retry a streaming call before its first chunk, never after.
//!
//! # Why
//!
//! A streaming call that fails before its first event can be retried safely: nothing
//! has reached the caller, and for an LLM API the lost generation is simply started
//! again. Once a chunk has reached the caller, a retry would duplicate or garble what
//! it already has. tower's [`Retry`](https://docs.rs/tower/0.5/tower/retry/struct.Retry.html) decides at response headers,
//! which is neither point: an upstream often answers `200 OK` and then resets, stalls,
//! or sends only keep-alives. So the decision must wait for the first *chunk*, and what
//! a chunk is depends on the format (see [`frame`](crate::frame)).
//!
//! # How
//!
//! The first attempt sends the caller's request and a copy is kept for the retries
//! (the body must be `Clone`, e.g. `Full<Bytes>`, or made so by
//! [`BufferRequestBodyLayer`](crate::BufferRequestBodyLayer)); each retry sends a clone
//! of the copy, the last one the copy itself. Every attempt after the first carries a
//! [`RetryAttempt`] mark, so that the layers below can tell a retry from a new call. A
//! request marked [`NotReplayable`] gets one attempt. Then:
//!
//! - **Inner error**: retried when [transient](is_transient) (connect failure, reset,
//!   `REFUSED_STREAM`, GOAWAY, ...); any other error goes back at once, as does a
//!   connect failure that a retry would only repeat (a TLS handshake or certificate
//!   failure, a name that does not resolve, an invalid URI). Either way, an error of
//!   the inner service reaches the caller as the source of a [`FirstChunkError`] of
//!   kind [`Upstream`](FirstChunkErrorKind::Upstream), whatever `max_attempts` is.
//! - **Retryable status** (408, 429, 502, 503, 504, 529 by default, or
//!   `x-should-retry: true`): retried after the backoff, or after the server's hint
//!   (`retry-after-ms`, `Retry-After` in seconds or as an HTTP date). A hint above
//!   `max_retry_after` is not waited for: that response goes back.
//! - **Other status**: the response goes back untouched.
//! - **2xx**: the body is read until the [`Detector`](crate::frame::Detector) finds
//!   the first chunk, within `first_chunk_timeout` (counted from the attempt's start)
//!   and `max_buffer` bytes. A body error, the end of the body, or the timeout before
//!   the first chunk: retried. More than `max_buffer` bytes, or broken framing
//!   ([`Malformed`](crate::frame::Malformed)): fails without retry. Once found, the
//!   response goes to the caller with a [`ResponseBody`] that replays the frames
//!   already read, then continues the live stream, without copying them.
//! - **In-band error**: when that first chunk is an error the provider sent after
//!   `200 OK` (Anthropic's `event: error`, a JSON `error` object, a Bedrock
//!   `exception`), [`InBandErrors`] decide: a transient one (overloaded, rate limited,
//!   unavailable) is retried like any failure before the first chunk; a terminal one
//!   (invalid request) goes to the caller untouched, byte for byte.
//!
//! Before each retry, one unit is withdrawn from the [`RetryBudget`](crate::RetryBudget)
//! that [`RetryBudgetLayer`](crate::RetryBudgetLayer) handed down, if any (from each of
//! them, when nested budget layers handed down several); when
//! it refuses, the last failure goes back at once. When the
//! attempts run out, a retryable-status response or a transient in-band error goes back
//! as it is, and other failures as a [`FirstChunkError`] saying what happened and after
//! how many attempts.
//!
//! A response that is the last failure (a retryable status, a transient in-band error)
//! carries the extension [`GaveUp`], for a layer above that decides on responses.
//!
//! A response is never retried once it has been handed to the caller: from then on
//! this layer only counts.
//!
//! # Hedging
//!
//! An LLM upstream answers its headers in milliseconds and its first token seconds
//! later, and a few of its streams take far longer than the rest to start (a cold
//! replica, a long queue). Waiting for `first_chunk_timeout` costs those callers the
//! whole timeout; a second attempt started beside a slow one, after about the time
//! most calls take, usually answers first. Until the first chunk that attempt costs
//! only a prompt, which is why the decision belongs here: tower's `hedge` decides at
//! the response headers, which a slow stream sends as fast as a quick one.
//!
//! With [`RetryPolicy::hedge`], when the attempts in flight have produced no first
//! chunk after the [`Hedge`]'s delay (fixed, or a quantile of this layer's recent
//! calls), another starts beside them, up to [`Hedge::max_extra`] extra in flight. The
//! first attempt to produce its first chunk (or a response that is not a failure)
//! wins: the caller gets its stream, and the others are dropped at once, which resets
//! their HTTP/2 streams or closes their HTTP/1.1 connections, so that the upstream
//! stops generating. A hedge is an attempt like a retry: it counts against
//! `max_attempts`, carries [`RetryAttempt`], and withdraws a unit from the budget,
//! whose refusal stops hedging the call (`stream_hedges_total{outcome="budget_exhausted"}`).
//! An attempt that fails beside another does not end the call: the next starts after
//! the backoff or the hint, as a retry would, and the call ends with the last failure
//! once no attempt is left.
//!
//! The attempts of a call run in one future, under one timer: the first in flight is
//! held inline and hedges boxed beside it (a call that is never hedged allocates
//! nothing for them), and the timer is set to the earliest of their first-chunk
//! deadlines and the next start (a backoff, or a hedge's delay). Hedging adds no timer
//! and no task: the state machine that was one attempt at a time became a set of
//! attempts, of which retries without hedging are the case of one.
//!
//! A [`StreamConcurrencyLayer`](crate::StreamConcurrencyLayer) above holds one slot per
//! call, so while a hedge runs the call briefly holds two upstream streams on one
//! slot; `provider_calls_in_flight` counts both.
//!
//! # What is safe to retry
//!
//! A failure before the first chunk is **not processed** when the upstream did no
//! work: a connect failure, an HTTP/2 `REFUSED_STREAM`, a GOAWAY whose last stream id
//! is below ours, a request cancelled before it was sent ([`is_unprocessed`]), or a
//! status refusing the work (`408`, `425`, `429`, `503`, `529`, `x-should-retry:
//! true`). Any other failure is **maybe processed**: a reset or an end of the
//! connection after the request was written, an HTTP/2 `INTERNAL_ERROR` or `CANCEL`,
//! a stall, a body error or end before the first chunk, an in-band error, a `502` or
//! `504`. Both are retried by default, since an LLM completion cut off before its first
//! token loses nothing but the prompt's cost;
//! [`RetryPolicy::retry_maybe_processed(false)`](RetryPolicy::retry_maybe_processed)
//! retries only the first class, for calls whose side effects must not repeat, and
//! returns a failure of the second at once with [`StopReason::MaybeProcessed`].
//!
//! # What a call costs
//!
//! Measured with callgrind, over loopback (the load test's HTTP/1.1 phase, 21 events a
//! stream), this layer alone costs about 7,700 instructions and 5 allocations a stream
//! over a bare hyper-util client; tower's `Retry` with a `TpsBudget` and
//! `ConcurrencyLimit` together about 2,400 and 3. Where it goes, and what was chosen:
//!
//! - **The copy of the request** (about 1,200 instructions and 3 allocations), as in
//!   any retrying layer. The caller's request goes out and the copy is kept: a client
//!   adds headers to what it sends (hyper-util a `host`), and the caller's header map
//!   has room for them where a clone's, exactly full, would grow.
//! - **The first chunk**: picking the detector from `Content-Type`, parsing the event,
//!   and the in-band check on its data (about 1,700 instructions, and one allocation:
//!   the detector's capture of the event's data, which the in-band check reads).
//! - **The per-call state**, boxed (1,328 bytes with hyper-util's client): kept inline,
//!   it would stay in the caller's task for the whole stream; boxed, it is one
//!   allocation, freed when the first chunk is found. It is written in place.
//! - **The first-chunk deadline**: a tokio timer, made at the first poll that finds no
//!   first chunk, so an answer already there at the first poll costs none; over a
//!   socket every call registers one (about 700 instructions a stream). A deadline
//!   sweep shared by all calls of a layer would still take a lock and a waker clone
//!   per call to register; it was not worth its error of up to one sweep period.
//! - **The body** the caller gets looks at each frame once for the end of the stream
//!   (one flag on the live path), and below a
//!   [`StreamConcurrencyLayer`](crate::StreamConcurrencyLayer) it also carries that
//!   layer's slot, so that the two layers look once, not twice (see
//!   [`concurrency`](crate::concurrency), "One body wrapper").
//!
//! # Metrics
//!
//! `provider_calls_in_flight` (+1 per attempt, -1 when it fails or its body ends),
//! `stream_first_chunk_latency_seconds` (first attempt's start to the first chunk) and
//! `stream_retries_total{outcome,reason}`, where `reason` is the failure that called
//! for the retry (`status`, `upstream_error`, `body_error`, `end_of_stream`, `timeout`,
//! `in_band_error`):
//!
//! | outcome | counted when |
//! |---|---|
//! | `success` | a retried attempt got its first chunk (or a 2xx response without a body) |
//! | `failed` | a retried attempt failed, whatever comes next |
//! | `exhausted` | a call gave up because `max_attempts` were made |
//! | `budget_exhausted` | a call gave up because the budget refused a retry |
//!
//! With `max_attempts(1)` (retry disabled) nothing is counted.
//!
//! With hedging, `stream_hedges_total{outcome}` counts each hedge once: `won` (it
//! delivered the call's answer: its first chunk, or a response that is not retried),
//! `lost` (another attempt did, or none did, or the caller gave up), or `budget_exhausted` (the budget refused it, and it never
//! started). `stream_first_chunk_latency_seconds` is per call, from its start, and
//! so is what [`Hedge::percentile`] measures.

mod attempt;
mod body;
mod classify;
mod error;
mod error_json;
mod future;
mod hedge;
mod in_band;
mod judge;
mod layer;
mod peek;
mod policy;
mod service;
mod timer;

pub use self::attempt::RetryAttempt;
pub use self::body::ResponseBody;
pub(crate) use self::classify::{is_overload, is_overload_status};
pub use self::classify::{is_transient, is_unprocessed};
pub use self::error::{FirstChunkError, FirstChunkErrorKind, GaveUp, StopReason};
pub use self::future::ResponseFuture;
pub use self::hedge::Hedge;
pub use self::in_band::{InBand, InBandErrors};
pub use self::layer::FirstChunkRetryLayer;
pub use self::policy::{NotReplayable, RetryPolicy};
pub use self::service::FirstChunkRetry;

#[cfg(test)]
mod tests;
