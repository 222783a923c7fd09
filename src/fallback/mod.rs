//! Fall back to another provider when one fails before its first chunk.
//!
//! # Why
//!
//! A gateway in front of several LLM providers (or several deployments of one) wants a
//! call that one of them cannot serve to go to the next: the first is down, refuses
//! the work (`429`, `503`), or is full. tower has no fallback (tower issue #413), and
//! `tower::steer` waits in `poll_ready` until *every* service is ready, so one slow
//! backup holds up all calls. And for a stream, *when* to decide matters as much as
//! what: once a chunk reached the caller, the call is the caller's. Another provider
//! would start a different generation, so nothing may be tried elsewhere after that.
//!
//! The first chunk is the commit point, as it is for retries. A target's stack with a
//! [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer) resolves its response future
//! only once its first chunk has been read (or with a failure, after its own retries),
//! so a fallback that decides on the *output of the response future* can never fall
//! back after the caller saw a chunk: by the time there is a response, the stream is
//! committed; until then, nothing has been handed on. A stream that fails after its
//! first chunk gives the caller a body error, as it would without a fallback. (Without
//! a retry layer in a target's stack its future resolves at the headers, and a `200`
//! whose body fails before its first chunk is then the caller's failure: give every
//! target a retry layer, with `max_attempts(1)` for no retries.)
//!
//! # How
//!
//! [`Fallback::new`] takes an ordered list of `(name, service)`, all of one service
//! type (box stacks that differ, as for `tower::steer`). A call goes to the first
//! target; when that fails, to the next, and so on. A target fails a call with:
//!
//! - **an error** of its stack: a [`FirstChunkError`] (its
//!   retries ran out, it stalled, its body ended before the first chunk), a transport
//!   error, or a [`Rejected`] from its concurrency limit, so that a
//!   full provider spills over to the next. An error of a response future always means
//!   nothing reached the caller, so every one is a failure, but one: a
//!   [`FirstChunkError`] whose stop reason is
//!   [`MaybeProcessed`](crate::retry::StopReason::MaybeProcessed) (its retry layer has
//!   `retry_maybe_processed(false)`) goes back at once, since another provider would
//!   do the work again;
//! - **a response whose status is in the fallback set**: 408, 429 and every 5xx by
//!   default, [`fallback_on`](Fallback::fallback_on) to change it. The response is
//!   dropped (and its body with it, releasing the target's slot) before the next
//!   target is called;
//! - **a `2xx` whose first chunk is a transient in-band error** (an overloaded
//!   provider's `event: error` after `200 OK`) that the target's retry layer gave up
//!   on: it marks such a response [`GaveUp`](crate::retry::GaveUp).
//!
//! Any other response goes to the caller, with the [`ServedBy`] extension naming the
//! target that answered. When every target has failed, the caller gets the last
//! target's failure as it is: its error, or its response with the fallback status
//! (and `ServedBy`).
//!
//! [`Fallback`]'s `poll_ready` is always ready. The response future clones the target's
//! service, drives its `poll_ready`, then calls it, and only for the target it is
//! about to use: a slow or saturated backup never holds up the calls its primary
//! serves, and a primary that answers makes no backup ready at all. A target whose
//! `poll_ready` waits (a `Buffer`'s full channel) makes the call wait there; the
//! crate's concurrency limit instead rejects in the call, within its `max_wait`, which
//! is what spills a call over: set the primary's `max_wait` short (or zero) for calls
//! to move on at once when it is full.
//!
//! The request is cloned for each target but the last, which takes it, so its body
//! must be `Clone` (`Full<Bytes>`, or a proxy's body made replayable by
//! [`BufferRequestBodyLayer`](crate::BufferRequestBodyLayer) above the fallback). A
//! request marked [`NotReplayable`](crate::retry::NotReplayable) (a body over the
//! buffer's cap) goes to one target only: the first the call tries (the first not
//! cooling down).
//!
//! # Cooldown
//!
//! [`cooldown(failures, duration)`](Fallback::cooldown): a target that failed
//! `failures` calls in a row is skipped for `duration`, then tried again. Once tried
//! again, one more failure skips it again at once (it is still past `failures` in a
//! row); a success starts its count anew. A failure during a cooldown (of a call that
//! was under way when it started) moves its end to `duration` after that failure. A
//! call goes to the first target not cooling down; with every target cooling down, to
//! the one whose cooldown ends first, and from there only on to the targets after it
//! that are not cooling down (a target skipped is skipped for the whole call). A
//! [`Rejected`] is no failure here: a full target is healthy, and its limit turns the
//! next call away at once if it is still full. The state is shared by every clone of
//! the service: one atomic count per target, read by each call, and the cooldown's end
//! under a short lock, read only while a target is past its count. It runs on tokio's
//! clock (`tokio::time::Instant`), so tests can use the paused clock.
//!
//! # Stacking
//!
//! The fallback goes above the targets' stacks, each with its own layers, so that each
//! provider has its own limit, retries and metrics (their `provider` is the target's
//! name, say):
//!
//! ```text
//! BufferRequestBodyLayer         (a proxy: bodies replayable, for every target)
//! Fallback
//! ├─ "openai":  StreamConcurrencyLayer → RetryBudgetLayer → FirstChunkRetryLayer → client
//! └─ "azure":   StreamConcurrencyLayer → RetryBudgetLayer → FirstChunkRetryLayer → client
//! ```
//!
//! A target's retries come first, then the fallback: the fallback sees a target's
//! failure only once its retry layer gave up on it (LiteLLM's `num_retries`, then
//! `fallbacks`).
//!
//! Layers above the fallback see one call:
//!
//! - **A [`StreamConcurrencyLayer`](crate::StreamConcurrencyLayer) above** holds one
//!   slot for the call across all its targets, until the end of the stream. It keeps
//!   the slot in its own body: the hand-off that lets a retry layer carry it (see
//!   [`concurrency`](crate::concurrency), "One body wrapper") happens within the
//!   limit's `call`, and the fallback calls its targets from its future, later.
//! - **A [`RetryBudgetLayer`](crate::RetryBudgetLayer) above** deposits once per call,
//!   and every target's retry layer withdraws from it: one budget bounds the retries
//!   to all providers together. It reaches them in the request's extensions, which
//!   every copy of the request carries (the direct hand-off cannot cross the future,
//!   as above). Falling back is not a retry: it takes nothing from a budget.
//! - tower-http's `TraceLayer` and `ResponseBodyTimeoutLayer` see the call as a whole.
//!
//! # Metrics and logs
//!
//! `stream_fallbacks_total{provider, from, to, reason}` (see
//! [`metrics`](crate::metrics)) counts each move of a call from target `from` to
//! target `to`, `provider` being the fallback's own (see
//! [`provider`](Fallback::provider)), and `reason` one of:
//!
//! | reason | the target `from` |
//! |---|---|
//! | `rejected` | had no concurrency slot: a [`Rejected`], found anywhere in the error's `source()` chain |
//! | `first_chunk` | failed before its first chunk: a [`FirstChunkError`] |
//! | `error` | failed with any other error (a transport error, an error from `poll_ready`) |
//! | `status` | answered with a status in the fallback set |
//! | `in_band_error` | answered `2xx` with a transient in-band error its retry layer gave up on |
//! | `cooldown` | was cooling down: the call started at `to`, skipping `from` (the first target) |
//!
//! Each fallback is an `INFO` event (`falling back to the next target`, with `from`,
//! `to`, `reason` and the `error` or `status`); a target starting its cooldown a
//! `WARN`, a call skipping targets that cool down a `DEBUG`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::util::BoxCloneSyncService;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_stream_backpressure::fallback::{Fallback, ServedBy};
//! use tower_stream_backpressure::retry::ResponseBody;
//! use tower_stream_backpressure::{FirstChunkRetryLayer, RetryPolicy};
//!
//! type Client = BoxCloneSyncService<
//!     http::Request<Full<Bytes>>,
//!     http::Response<ResponseBody<Full<Bytes>>>,
//!     tower::BoxError,
//! >;
//!
//! /// A provider whose streams carry these bytes, behind its own retry layer.
//! fn provider(stream: &'static str) -> Client {
//!     let upstream = service_fn(move |_: http::Request<Full<Bytes>>| async move {
//!         http::Response::builder()
//!             .header("content-type", "text/event-stream")
//!             .body(Full::new(Bytes::from(stream)))
//!     });
//!     let retry = FirstChunkRetryLayer::new(RetryPolicy::default().max_attempts(2));
//!     BoxCloneSyncService::new(retry.layer(upstream))
//! }
//!
//! // The primary answers `200 OK` and then only a keep-alive: no first chunk.
//! let client = Fallback::new([
//!     ("primary", provider(": keep-alive\n\n")),
//!     ("backup", provider("data: hello\n\n")),
//! ])?
//! .cooldown(3, Duration::from_secs(30))
//! .provider("chat");
//! # tokio::runtime::Builder::new_current_thread()
//! #     .enable_all()
//! #     .start_paused(true)
//! #     .build()?
//! #     .block_on(async {
//! let response = client.oneshot(http::Request::new(Full::default())).await?;
//! assert_eq!(response.extensions().get::<ServedBy>().unwrap().name(), "backup");
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(body, "data: hello\n\n");
//! # Ok::<(), tower::BoxError>(())
//! # })?;
//! # Ok::<(), tower::BoxError>(())
//! ```

mod cooldown;
mod future;
mod service;

use std::error::Error;
use std::fmt;
use std::sync::Arc;

pub use self::future::ResponseFuture;
pub use self::service::Fallback;

use crate::{FirstChunkError, Rejected};

/// A response extension: the name of the [`Fallback`] target that answered.
///
/// Every response a `Fallback` returns carries it, also the last target's response
/// when every target failed.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, ServiceExt};
/// use tower_stream_backpressure::fallback::{Fallback, ServedBy};
///
/// let answer = service_fn(|_: http::Request<()>| async {
///     Ok::<_, Infallible>(http::Response::new(()))
/// });
/// let client = Fallback::new([("openai", answer), ("azure", answer)])?;
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// let served_by = response.extensions().get::<ServedBy>().cloned();
/// assert_eq!(served_by.as_ref().map(ServedBy::name), Some("openai"));
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServedBy(Arc<str>);

impl ServedBy {
    /// The target's name, as given to [`Fallback::new`].
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{service_fn, ServiceExt};
    /// use tower_stream_backpressure::fallback::{Fallback, ServedBy};
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(()))
    /// });
    /// let client = Fallback::new([("openai", answer)])?;
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// let response = client.oneshot(http::Request::new(())).await?;
    /// assert_eq!(response.extensions().get::<ServedBy>().map(ServedBy::name), Some("openai"));
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ServedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServedBy").field(&&*self.0).finish()
    }
}

impl fmt::Display for ServedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a call moved on from a target: the `reason` of `stream_fallbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// A [`Rejected`] in the error's chain: the target's concurrency limit was full.
    Rejected,
    /// A [`FirstChunkError`]: the target failed before its first chunk.
    FirstChunk,
    /// Any other error.
    Error,
    /// A status in the fallback set.
    Status,
    /// A `2xx` whose first chunk is a transient in-band error the target's retry layer
    /// gave up on ([`GaveUp`](crate::retry::GaveUp)).
    InBandError,
    /// The target was cooling down.
    Cooldown,
}

impl Reason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::FirstChunk => "first_chunk",
            Reason::Error => "error",
            Reason::Status => "status",
            Reason::InBandError => "in_band_error",
            Reason::Cooldown => "cooldown",
        }
    }

    /// What `error` says: a [`Rejected`] anywhere in its chain (under a layer that wraps
    /// errors, or as the cause of a retry layer's error when the limit is below it), or
    /// else a [`FirstChunkError`] anywhere in it.
    pub(crate) fn of(error: &(dyn Error + 'static)) -> Self {
        let chain = || std::iter::successors(Some(error), |&error| error.source());
        if chain().any(|error| error.is::<Rejected>()) {
            Reason::Rejected
        } else if chain().any(|error| error.is::<FirstChunkError>()) {
            Reason::FirstChunk
        } else {
            Reason::Error
        }
    }

    /// Whether it counts towards a target's cooldown: a full target is not unhealthy.
    pub(crate) fn is_failure(self) -> bool {
        !matches!(self, Reason::Rejected | Reason::Cooldown)
    }
}

#[cfg(test)]
mod tests;
