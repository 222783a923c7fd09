use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::sync::Semaphore;
use tower::BoxError;
use tower_service::Service;

use super::{MaxWait, Rejected, ResponseBody, ResponseFuture, Slot};
use crate::metrics::ConcurrencyMetrics;

/// Limits the number of streams open at once; a stream holds its slot until its
/// response body ends.
///
/// Made by [`StreamConcurrencyLayer`](super::StreamConcurrencyLayer); see the
/// [module docs](super) for the behaviour.
#[derive(Debug)]
pub struct StreamConcurrency<S> {
    inner: S,
    shared: Arc<Shared>,
    metrics: Arc<ConcurrencyMetrics>,
}

/// What every service made from one layer, and every clone of those, shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) limit: usize,
    pub(crate) max_wait: Option<Duration>,
}

impl<S: Clone> Clone for StreamConcurrency<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S> StreamConcurrency<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, metrics: Arc<ConcurrencyMetrics>) -> Self {
        Self {
            inner,
            shared,
            metrics,
        }
    }

    /// Slots free right now, shared with every service of the same layer.
    pub fn available_slots(&self) -> usize {
        self.shared.semaphore.available_permits()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for StreamConcurrency<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: Body,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<ReqBody>>;

    /// Only asks the inner service. The slot is not taken here: a service is often
    /// cloned per request and polled ready long before (or without) a call, and a
    /// pooled client is ready while its connections sit idle. A slot taken here would
    /// be held by nothing. It is taken in [`call`](Service::call) instead.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        // Fast path: a slot is free (never ahead of queued callers: the semaphore hands
        // released permits to waiters first), so the call starts at once.
        if let Ok(permit) = shared.semaphore.clone().try_acquire_owned() {
            let slot = Slot::new(permit, self.metrics.clone(), Duration::ZERO);
            return ResponseFuture::calling(self.inner.call(request), slot);
        }
        let max_wait = request
            .extensions()
            .get::<MaxWait>()
            .map_or(shared.max_wait, |max_wait| max_wait.get());
        if max_wait == Some(Duration::ZERO) {
            self.metrics.deadline_exceeded(Duration::ZERO);
            return ResponseFuture::rejected(Rejected::deadline_exceeded(
                shared.limit,
                Duration::ZERO,
            ));
        }
        // Slow path: queue. The ready inner service goes with the request into the
        // future; this one keeps a fresh clone, which will be polled ready again.
        let ready = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, ready);
        ResponseFuture::waiting(
            shared.semaphore.clone(),
            shared.limit,
            max_wait.map(crate::deadline_after),
            self.metrics.clone(),
            ready,
            request,
        )
    }
}
