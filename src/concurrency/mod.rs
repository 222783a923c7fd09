//! A concurrency limit that holds until the end of the stream.
//!
//! # Why
//!
//! tower's [`ConcurrencyLimit`] takes its permit in `poll_ready` and frees it when the
//! response future resolves, that is, when the response *headers* arrive. For a
//! streaming call that is the start of the work, not its end: a client with a limit of
//! 100 can hold thousands of token streams open, each with its buffers, timers and an
//! upstream slot. Taking the permit in `poll_ready` has a
//! second cost: a service polled ready and then kept idle (a pooled connection, a
//! service cloned per request) holds a permit it is not using.
//!
//! # How
//!
//! [`StreamConcurrency`] takes its slot when the call is made, never in `poll_ready`,
//! and before the inner service is called, so a saturated client rejects before doing
//! any HTTP work. When every slot is held the call queues in FIFO order inside the
//! response future. The slot then moves into the [`ResponseBody`] and is released
//! exactly once, at the end of the stream: the body returned its last frame, an error
//! or trailers, reported `is_end_stream()` after a data frame, was empty from the start,
//! or was dropped. If the inner service fails, or the caller drops the response future,
//! the slot is released then.
//!
//! How long a call may queue is the caller's choice:
//! - [`max_wait(d)`](StreamConcurrencyLayer::max_wait): fail with [`Rejected`]
//!   ([`RejectReason::DeadlineExceeded`]) after `d`; `Duration::ZERO` fails at once;
//! - no `max_wait`: wait until the caller gives up by dropping the call (counted as
//!   `context_canceled`);
//! - a [`MaxWait`] request extension overrides the layer's setting for one call.
//!
//! How many may queue is the layer's choice: unbounded by default, as in the Go
//! runtime this crate comes from, where each caller's deadline decides;
//! [`max_queued(n)`](StreamConcurrencyLayer::max_queued) fails the next caller at once
//! ([`RejectReason::QueueFull`]) when `n` already wait, so that an outage cannot pile
//! up more parked requests than the process can hold.
//!
//! A waiting call holds none of the inner service's readiness. A service below may
//! reserve capacity in `poll_ready` (tower's `Buffer` takes a place in its channel);
//! a call that kept such a reservation while it waited in our queue would make every
//! other caller wait behind it in theirs, and start their own `max_wait` only when it
//! gave up. So a waiting call parks a clone of the inner service that has not been
//! made ready, and drives its `poll_ready` once it has its slot (tower's `Oneshot`
//! pattern). A call that finds a slot free at once uses the service it was called on,
//! made ready by [`StreamConcurrency`]'s own `poll_ready`.
//!
//! # Adaptive limit
//!
//! An LLM upstream's capacity is not a number a caller can know: it changes with the
//! provider's load, the model, the deployment and the account's rate limits. Adaptive
//! limits elsewhere (Netflix's concurrency-limits, Vector's adaptive request
//! concurrency, Envoy's adaptive concurrency filter) measure a call at its response
//! headers or at the end of its body. For a stream neither is the load signal: the
//! headers come at once whatever the load, and a stream's length is the number of
//! tokens asked for. The time to the first chunk is the signal, and the overload
//! answers (`429`, `503`, `529`, an in-band overload error, a stall before the first
//! chunk, an HTTP/2 `REFUSED_STREAM` or `ENHANCE_YOUR_CALM`). A window whose *fastest*
//! first chunk is more than 1.3 times slower than the fastest recent one is an overload
//! signal too, while half the slots or more are in use: the upstream is queueing the
//! work, which is the overload a limit is for, before it refuses it. A queue delays
//! every call, where prompts of different lengths only spread them, which is why the
//! window's fastest is compared, not each call (the fastest recent time ages by 1 % a
//! window, so that a slower upstream becomes the new normal). Without this signal, a
//! limit finds only where the refusals start, well past the capacity. Not a `429` whose body
//! says the account's quota is spent (`insufficient_quota`): fewer streams would not
//! lift a spending cap. The retry layer reads such a body (up to 8 KiB) before it
//! decides, and only under an adaptive limit; the caller still gets it byte for byte.
//!
//! [`StreamConcurrencyLayer::adaptive`] moves the limit in one of two ways, both with
//! the same overload rule ([`Adaptive`] for the settings):
//!
//! - **AIMD** ([`Adaptive::default`]): the limit is multiplied by 0.9 on an overload
//!   signal, and grows by 1 at the end of each window in which it was reached without
//!   one (TCP's congestion avoidance; Netflix's `AIMDLimit` backs off by the same
//!   0.9). A window is the fastest recent time to first chunk (a stream's start
//!   without queueing, as TCP's is its minimum round trip), so the limit grows by
//!   about one per round trip; under congestion the windows do not grow longer, so
//!   decreases do not come slower when they are needed sooner.
//! - **Gradient** ([`Adaptive::gradient`]): after each first chunk, the limit follows
//!   the ratio of the long-term time to first chunk (an average over 600 samples) to
//!   the latest one: `gradient = clamp(1.5 * long / latest, 0.5, 1.0)`, `new = limit *
//!   gradient + 4`, smoothed as `limit = 0.8 * limit + 0.2 * new` (Netflix's
//!   `Gradient2Limit`: its tolerance 1.5, queue size 4 and smoothing 0.2). While fewer
//!   than half the slots are in use, it does not move: the calls say nothing of the
//!   capacity. When the long-term average is more than twice the latest, it decays
//!   toward it (by 5 % a sample), so that it recovers after a slow spell. It does not
//!   grow in a window with an overload signal, as AIMD does not.
//!
//! **One decrease per window.** A burst of overload signals within one window is one
//! congestion event (TCP's rule: one per round trip), so thirty streams timing out
//! together shrink the limit once, not thirty times.
//!
//! **Shrinking never revokes a slot.** A smaller limit takes free slots away at once,
//! and the slots still held are not given back when they are released, until the
//! count is down to the new limit: the streams drain, new calls wait.
//!
//! **Where the signals come from.** Each attempt's outcome reaches the limiter: a
//! [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer) below carries the call's slot
//! (see "One body wrapper"), and tells it of every attempt it makes, the ones it
//! retries included, with the attempt's own time to first chunk. Without a retry layer
//! below, this layer sees the response head only: an overload status (a `429` then
//! counts whatever its body says), or an answer whose time says nothing of its first
//! chunk (both algorithms then grow as AIMD does). The same holds with
//! [`idle_timeout`](StreamConcurrencyLayer::idle_timeout), under which the slot stays
//! in this layer's body for the sweep to end. A failure the retry layer hands back
//! without a retry (a `529` with `x-should-retry: false`) still counts. An in-band
//! error counts when it says overloaded, rate limited, throttled or out of capacity,
//! not when it is an internal error. The HTTP/2 refusals are read with the
//! `hyper-errors` feature (on by default). The gauge `stream_concurrency_limit` shows
//! the limit in force, fixed or adaptive, and [`StreamConcurrencyLayer::current_limit`]
//! reads it.
//!
//! # Rate-limit pacing
//!
//! A provider limits each account's requests and tokens per window, and says in every
//! response how much is left and when it resets. Once nothing is left, every call
//! before the reset earns a 429: a round trip, a retry attempt and a unit of budget
//! spent to hear what the last response already said (and at OpenAI a refused request
//! still counts against the limit). With
//! [`pace_on_rate_limits`](StreamConcurrencyLayer::pace_on_rate_limits) (on by default
//! with `adaptive`), the layer reads those headers from every attempt's response head
//! (OpenAI's `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` durations, Anthropic's
//! `anthropic-ratelimit-*-remaining` and RFC 3339 `...-reset` times, a 429's
//! `Retry-After`) and closes a gate until the latest reset: new calls wait there
//! within their `max_wait`, and one that cannot wait long enough fails at once with
//! [`RejectReason::RateLimited`], without a request. The parsers are strict (a garbled
//! value is ignored with a `DEBUG` event, not read as something else), and a wait above
//! an hour is not believed. A reset is when the limit is full again, so holding until
//! it errs on the side of not earning a 429. A call held at the gate is a waiting call:
//! it counts against `max_queued`, its time is in `stream_concurrency_wait_seconds` as
//! well as `stream_rate_limit_wait_seconds`, and a call that got its slot while the
//! gate closed gives the slot to the next caller and waits at the gate again. Retries
//! and hedges of a call already sent are the retry layer's, which reads the same
//! hints.
//!
//! # Stalled readers
//!
//! The slot is released when the stream ends, so a body that its consumer neither
//! reads nor drops (a downstream client that stopped reading) holds its slot, and its
//! upstream stream, for ever. [`idle_timeout(d)`](StreamConcurrencyLayer::idle_timeout)
//! ends such a stream: past `d` without a poll after the body handed out a frame, the
//! upstream body is dropped (closing its stream), the slot is released, and the next
//! poll returns [`IdleTimeout`]. A body waiting for the upstream is not idle: its
//! consumer is waiting on it.
//!
//! Nothing inside `poll_frame` can notice a consumer that never polls, so the check runs
//! outside it: one task per layer sweeps its open streams every `d / 4`, and each body
//! only notes, with a plain store, how its last poll left it. A timer per body, reset on
//! every frame, would cost hundreds of nanoseconds a frame; this costs a few, and only
//! with `idle_timeout` set.
//!
//! # One body wrapper
//!
//! With [`FirstChunkRetryLayer`](crate::FirstChunkRetryLayer) below this layer (the
//! README's order), both layers used to wrap the response body and hold something
//! until the end of the stream: this one the slot, that one the attempt's count in
//! flight. Each looked at every frame for that end, with the same rule. Now the call
//! offers its slot to the inner service for the length of its `call` (a thread-local,
//! see `handoff`); a retry layer called within takes it, keeps it across its attempts
//! and puts it in its own body beside the attempt's count, released by the same check.
//! This layer's body then only passes frames on, and a call that ends in an error frees
//! its slot with the retry layer's future, as before. When the stream it passes on
//! returns an error or its end, this body drops it at once, so that a layer between
//! the two that ends the stream itself (tower-http's body timeout) frees the slot
//! then too, even if the consumer keeps the body. Where no retry layer takes the
//! slot (none below, a `Buffer` between), or with `idle_timeout` (the sweep ends a
//! stalled stream by dropping this layer's body, so the slot must be there), this layer
//! keeps it as before. In memory, the three layers' extra cost per frame went from 131
//! to 91 instructions with this, the retry body's single fast-path flag and a data
//! frame moved as its data alone into this body's boxed-error result; what remains is
//! mostly that move, and the call into `poll_frame` that the bare body's consumer does
//! not make (the README's Performance section has the figures).
//!
//! Errors are boxed ([`tower::BoxError`]); the inner service's errors pass through
//! unchanged, so callers can downcast both ours and theirs.
//!
//! Metrics: `streams_in_flight`, `stream_concurrency_rejections_total{reason}` and
//! `stream_concurrency_wait_seconds` (see [`metrics`](crate::metrics)).
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_stream_backpressure::StreamConcurrencyLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let limit = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
//! let client = ServiceBuilder::new().layer(limit.clone()).service(service_fn(
//!     |_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
//!     },
//! ));
//!
//! let response = client.clone().oneshot(http::Request::new(())).await?;
//! // The stream is open: its body holds the only slot, so the next call is rejected.
//! assert_eq!(limit.available_slots(), 0);
//! assert!(client.clone().oneshot(http::Request::new(())).await.is_err());
//!
//! // Reading the body to its end frees the slot, though the body object lives on.
//! let mut body = response.into_body();
//! while body.frame().await.is_some() {}
//! assert_eq!(limit.available_slots(), 1);
//! # Ok(()) }
//! ```
//!
//! [`ConcurrencyLimit`]: https://docs.rs/tower/0.5/tower/limit/struct.ConcurrencyLimit.html

mod adaptive;
mod body;
mod error;
mod future;
mod idle;
mod layer;
mod rate_limit;
mod service;

use std::time::Duration;

pub use self::adaptive::Adaptive;
pub use self::body::ResponseBody;
pub use self::error::{IdleTimeout, RejectReason, Rejected};
pub use self::future::ResponseFuture;
pub use self::layer::StreamConcurrencyLayer;
pub use self::service::StreamConcurrency;

pub(crate) use self::future::Slot;
pub(crate) use self::service::Shared;

/// A request extension that overrides the layer's
/// [`max_wait`](StreamConcurrencyLayer::max_wait) for one call.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure::concurrency::MaxWait;
///
/// let mut request = http::Request::new(());
/// // This call is interactive: fail fast rather than queue.
/// request.extensions_mut().insert(MaxWait::new(Duration::from_millis(50)));
/// ```
///
/// Its default is [`unbounded`](Self::unbounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaxWait(Option<Duration>);

impl MaxWait {
    /// Wait at most `max_wait` for a slot; `Duration::ZERO` fails at once when full.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::concurrency::MaxWait;
    /// use tower_stream_backpressure::{Rejected, StreamConcurrencyLayer};
    ///
    /// // The layer would let calls queue without bound ...
    /// let layer = StreamConcurrencyLayer::new(1);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _open = service.clone().oneshot(http::Request::new(())).await?;
    ///
    /// // ... but this call fails at once.
    /// let mut request = http::Request::new(());
    /// request.extensions_mut().insert(MaxWait::new(Duration::ZERO));
    /// let error = service.oneshot(request).await.unwrap_err();
    /// assert!(error.is::<Rejected>());
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new(max_wait: Duration) -> Self {
        Self(Some(max_wait))
    }

    /// Wait for a slot until the caller drops the call.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::concurrency::MaxWait;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// // Calls through this layer fail fast ...
    /// let layer = StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO);
    /// let service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()?
    /// #     .block_on(async {
    /// let open = service.clone().oneshot(http::Request::new(())).await?;
    ///
    /// // ... but this batch job would rather wait for a slot.
    /// let mut request = http::Request::new(());
    /// request.extensions_mut().insert(MaxWait::unbounded());
    /// let (batch, ()) = tokio::join!(service.oneshot(request), async move {
    ///     tokio::time::sleep(Duration::from_secs(30)).await;
    ///     drop(open); // the open stream ends: its slot goes to the waiting call
    /// });
    /// assert!(batch.is_ok());
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn unbounded() -> Self {
        Self(None)
    }

    /// The bound, `None` when unbounded.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::concurrency::MaxWait;
    ///
    /// assert_eq!(MaxWait::new(Duration::from_secs(1)).get(), Some(Duration::from_secs(1)));
    /// assert_eq!(MaxWait::unbounded().get(), None);
    /// ```
    #[must_use]
    pub fn get(self) -> Option<Duration> {
        self.0
    }
}
