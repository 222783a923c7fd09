use std::task::{Context, Poll};

use http::Request;
use tower_service::Service;

use super::RetryBudget;

/// Deposits one request into a [`RetryBudget`] per call and puts the budget in the
/// request's extensions, where [`FirstChunkRetry`](crate::retry::FirstChunkRetry)
/// finds it and withdraws one unit per retry.
///
/// Made by [`RetryBudgetLayer`](super::RetryBudgetLayer). Responses, errors and futures
/// pass through untouched.
#[derive(Debug, Clone)]
pub struct WithRetryBudget<S> {
    inner: S,
    budget: RetryBudget,
}

impl<S> WithRetryBudget<S> {
    /// Wraps `inner`, depositing into `budget`.
    pub fn new(inner: S, budget: RetryBudget) -> Self {
        Self { inner, budget }
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

impl<S, B> Service<Request<B>> for WithRetryBudget<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        self.budget.deposit();
        request.extensions_mut().insert(self.budget.clone());
        self.inner.call(request)
    }
}
