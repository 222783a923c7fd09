use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

use super::{ResponseBody, ResponseFuture, RetryPolicy};
use crate::frame::Detector;
use crate::metrics::RetryMetrics;

/// Retries a streaming call while, and only while, nothing has reached the caller.
///
/// Made by [`FirstChunkRetryLayer`](super::FirstChunkRetryLayer); see the
/// [module docs](super) for the behaviour.
#[derive(Debug)]
pub struct FirstChunkRetry<S, D> {
    inner: S,
    shared: Arc<Shared<D>>,
    metrics: Arc<RetryMetrics>,
}

/// The settings every service of one layer shares.
#[derive(Debug)]
pub(crate) struct Shared<D> {
    pub(crate) policy: RetryPolicy,
    pub(crate) detector: D,
}

impl<S: Clone, D> Clone for FirstChunkRetry<S, D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S, D> FirstChunkRetry<S, D> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<D>>, metrics: Arc<RetryMetrics>) -> Self {
        Self {
            inner,
            shared,
            metrics,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.shared.policy
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, D, ReqBody, ResBody> Service<Request<ReqBody>> for FirstChunkRetry<S, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin,
    ResBody::Data: AsRef<[u8]>,
    ResBody::Error: Into<BoxError>,
    D: Detector,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody, ResBody, D>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The ready service makes the first attempt and, polled ready again, the
        // retries; this one keeps a fresh clone.
        let ready = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, ready);
        ResponseFuture::new(ready, request, self.shared.clone(), self.metrics.clone())
    }
}
