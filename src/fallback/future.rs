use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use super::service::{Shared, Statuses, Target};
use super::{Reason, ServedBy, cooldown};
use crate::park::Parked;
use crate::retry::{FirstChunkError, GaveUp, NotReplayable, StopReason};

pin_project! {
    /// Response future of [`Fallback`](super::Fallback).
    ///
    /// Drives the target it is at ready, calls it, and, when that fails before its first
    /// chunk, moves on to the next target. Resolves to the first response outside the
    /// fallback set, with [`ServedBy`] in its extensions, or to the last target's failure
    /// as it is. Dropping it at any point drops the target call in flight; nothing is left
    /// running.
    ///
    /// Polled again after it returned, it panics.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::util::BoxCloneSyncService;
    /// use tower::{service_fn, Service, ServiceExt};
    /// use tower_stream_backpressure::fallback::{Fallback, ResponseFuture};
    ///
    /// type Client = BoxCloneSyncService<http::Request<()>, http::Response<Full<Bytes>>, tower::BoxError>;
    ///
    /// let down: Client = BoxCloneSyncService::new(service_fn(|_: http::Request<()>| async {
    ///     Err::<http::Response<Full<Bytes>>, _>(tower::BoxError::from("connection refused"))
    /// }));
    /// let up: Client = BoxCloneSyncService::new(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, tower::BoxError>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// let mut client = Fallback::new([("primary", down), ("backup", up)])?;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let future: ResponseFuture<Client, ()> = client.ready().await?.call(http::Request::new(()));
    /// assert!(format!("{future:?}").contains("primary"), "no target was called yet");
    /// assert_eq!(future.await?.status(), 200);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
        // The target the call is at.
        at: usize,
        // The copy of the request kept for the targets after this one; `None` once the
        // last target that may be tried took it, or when it cannot be sent twice.
        request: Option<Request<ReqBody>>,
        targets: Arc<[Target<S>]>,
        shared: Arc<Shared>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        // A clone of the target's service, not yet ready, and the request for it.
        Readying {
            call: Parked<S, Request<ReqBody>>,
        },
        Calling {
            #[pin]
            future: S::Future,
        },
        Done,
    }
}

/// What made the target at hand fail: an error, or a response that is a failure (a
/// status in the fallback set, or an in-band error the target's retry layer gave up
/// on).
enum Failure<B> {
    Error(BoxError),
    Response(Response<B>, Reason),
}

impl<B> Failure<B> {
    fn reason(&self) -> Reason {
        match self {
            Failure::Error(error) => Reason::of(&**error),
            Failure::Response(_, reason) => *reason,
        }
    }

    /// Whether another target may be tried: not after a failure that the target's
    /// retry layer would not retry because the upstream may have processed the
    /// request (`retry_maybe_processed(false)`), which another provider would repeat.
    fn may_go_elsewhere(&self) -> bool {
        let error = match self {
            Failure::Error(error) => error,
            Failure::Response(response, _) => {
                let gave_up = response.extensions().get::<GaveUp>();
                return gave_up.is_none_or(|g| g.stop_reason() != StopReason::MaybeProcessed);
            }
        };
        let chain =
            std::iter::successors(Some(&**error as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            });
        !chain
            .filter_map(|e| e.downcast_ref::<FirstChunkError>())
            .any(|e| e.stop_reason() == StopReason::MaybeProcessed)
    }
}

/// Whether a response is a failure to fall back from, and why.
fn failed_response<B>(statuses: &Statuses, response: &Response<B>) -> Option<Reason> {
    if statuses.contains(response.status()) {
        return Some(Reason::Status);
    }
    let gave_up = response.extensions().get::<GaveUp>();
    gave_up
        .is_some_and(GaveUp::is_in_band_error)
        .then_some(Reason::InBandError)
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>> + Clone,
    ReqBody: Clone,
{
    pub(super) fn new(
        targets: Arc<[Target<S>]>,
        shared: Arc<Shared>,
        request: Request<ReqBody>,
    ) -> Self {
        let healths = targets.iter().map(|target| &target.health);
        // Never `None`: a `Fallback` has at least one target.
        let at = cooldown::first(healths, shared.cooldown.as_ref()).unwrap_or(0);
        if at > 0 {
            let (from, to) = (&targets[0].name, &targets[at].name);
            let metrics = shared.metrics();
            metrics.fallback(from, to, Reason::Cooldown.label());
            tracing::debug!(
                provider = %metrics.provider(),
                %from,
                %to,
                "skipping fallback targets that are cooling down"
            );
        }
        let mut kept = None;
        let request = send(request, &mut kept, at + 1 == targets.len());
        let call = Parked::new(targets[at].service.clone(), request);
        Self {
            state: State::Readying { call },
            at,
            request: kept,
            targets,
            shared,
        }
    }
}

/// The request to send to a target: the caller's, with a copy kept in `kept` for the
/// targets after it, unless this is the last target or the request cannot be sent
/// twice. As in the retry layer, the original goes out: a client adds headers to what
/// it sends, and the original's header map has room for them where a clone's is full.
fn send<B: Clone>(request: Request<B>, kept: &mut Option<Request<B>>, last: bool) -> Request<B> {
    if !last && request.extensions().get::<NotReplayable>().is_none() {
        *kept = Some(request.clone());
    }
    request
}

fn served_by<B>(mut response: Response<B>, name: &Arc<str>) -> Response<B> {
    response.extensions_mut().insert(ServedBy(name.clone()));
    response
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let failure = match this.state.as_mut().project() {
                StateProj::Readying { call } => match ready!(call.poll_call(cx)) {
                    Ok(future) => {
                        this.state.set(State::Calling { future });
                        continue;
                    }
                    Err(error) => Failure::Error(error.into()),
                },
                StateProj::Calling { future } => match ready!(future.poll(cx)) {
                    Ok(response) => match failed_response(&this.shared.statuses, &response) {
                        Some(reason) => Failure::Response(response, reason),
                        None => {
                            let target = &this.targets[*this.at];
                            if this.shared.cooldown.is_some() {
                                target.health.succeeded();
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(served_by(response, &target.name)));
                        }
                    },
                    Err(error) => Failure::Error(error.into()),
                },
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            let reason = failure.reason();
            let shared = &**this.shared;
            let from = &this.targets[*this.at];
            if let Some(cooldown) = shared.cooldown.as_ref().filter(|_| reason.is_failure()) {
                if let Some(failures) = from.health.failed(cooldown, Instant::now()) {
                    tracing::warn!(
                        provider = %shared.metrics().provider(),
                        target = %from.name,
                        failures,
                        cooldown_ms = cooldown.duration.as_millis() as u64,
                        "fallback target failed too many calls in a row: cooling down"
                    );
                }
            }
            let healths = this.targets.iter().map(|target| &target.health);
            let next = cooldown::next(healths, *this.at, shared.cooldown.as_ref())
                .filter(|_| failure.may_go_elsewhere());
            let (Some(next), Some(request)) = (next, this.request.take()) else {
                // Nowhere else to go: the caller gets this failure as it is.
                this.state.set(State::Done);
                return Poll::Ready(match failure {
                    Failure::Error(error) => Err(error),
                    Failure::Response(response, _) => Ok(served_by(response, &from.name)),
                });
            };
            let to = &this.targets[next];
            let metrics = shared.metrics();
            metrics.fallback(&from.name, &to.name, reason.label());
            let provider = metrics.provider();
            match &failure {
                Failure::Error(error) => tracing::info!(
                    %provider,
                    from = %from.name,
                    to = %to.name,
                    reason = reason.label(),
                    %error,
                    "falling back to the next target"
                ),
                Failure::Response(response, _) => tracing::info!(
                    %provider,
                    from = %from.name,
                    to = %to.name,
                    reason = reason.label(),
                    status = response.status().as_u16(),
                    "falling back to the next target"
                ),
            }
            // The failed response's body goes first, with the target's slot and attempt.
            drop(failure);
            let request = send(request, this.request, next + 1 == this.targets.len());
            let call = Parked::new(to.service.clone(), request);
            *this.at = next;
            this.state.set(State::Readying { call });
        }
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Readying { .. } => "waiting for the target to be ready",
            State::Calling { .. } => "calling",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("target", &self.targets[self.at].name)
            .field("state", &state)
            .finish()
    }
}
