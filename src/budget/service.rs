use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http::{Extensions, Request};
use tower_service::Service;

use super::RetryBudget;
use crate::handoff;
use crate::retry::RetryAttempt;

/// Deposits one request into a [`RetryBudget`] per call and hands the budget down to
/// [`FirstChunkRetry`](crate::retry::FirstChunkRetry), which withdraws one unit per
/// retry. The budget goes into the request's extensions, where any service below finds
/// it, until a retry layer called within this service's `call` has taken it directly;
/// from then on this service no longer touches the extensions (see the module docs,
/// "Handing the budget down").
///
/// A call deposits once into a budget however the stack is built: not when the budget
/// already took this call's deposit (the same budget in two layers), nor for a
/// [`RetryAttempt`] (this layer sits below a retrying layer, and logs one `WARN` that
/// it does). See the [module docs](super).
///
/// Made by [`RetryBudgetLayer`](super::RetryBudgetLayer). Responses, errors and futures
/// pass through untouched.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::budget::WithRetryBudget;
/// use tower_stream_backpressure::{RetryBudget, RetryBudgetLayer};
///
/// // The inner service finds the budget in the request's extensions.
/// let inner = service_fn(|request: http::Request<()>| async move {
///     Ok::<_, Infallible>(request.extensions().get::<RetryBudget>().is_some())
/// });
/// let service: WithRetryBudget<_> = RetryBudgetLayer::new(RetryBudget::default()).layer(inner);
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// assert!(service.oneshot(http::Request::new(())).await?);
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct WithRetryBudget<S> {
    inner: S,
    budget: RetryBudget,
    placement: Arc<Placement>,
    // A retry layer took the budget within the last call: the extensions are skipped.
    // Shared by the clones of this service (many callers clone it for each call), not
    // by other services of the same layer, whose stacks below may differ.
    direct: Arc<AtomicBool>,
}

/// What a layer needs to warn, once, that it sits below a retrying layer.
#[derive(Debug)]
pub(crate) struct Placement {
    provider: Cow<'static, str>,
    warned: AtomicBool,
}

impl Placement {
    pub(crate) fn new(provider: Cow<'static, str>) -> Self {
        Self {
            provider,
            warned: AtomicBool::new(false),
        }
    }

    /// A retry came through: warn, the first time only.
    fn retry_seen(&self) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                provider = %self.provider,
                "retry budget layer below the retry layer: retries pass through it and \
                 cannot be bounded; put RetryBudgetLayer above FirstChunkRetryLayer"
            );
        }
    }
}

impl<S> WithRetryBudget<S> {
    /// Wraps `inner`, depositing into `budget`.
    ///
    /// Unlike [`RetryBudgetLayer`](super::RetryBudgetLayer), it registers no metric.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use tower_stream_backpressure::budget::WithRetryBudget;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    /// let inner = service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(()) });
    /// let service = WithRetryBudget::new(inner, budget.clone());
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// service.oneshot(http::Request::new(())).await?;
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// assert_eq!(budget.available(), 1, "one request deposited one retry");
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new(inner: S, budget: RetryBudget) -> Self {
        let placement = Arc::new(Placement::new(Cow::Borrowed("unknown")));
        Self::with_placement(inner, budget, placement)
    }

    pub(crate) fn with_placement(inner: S, budget: RetryBudget, placement: Arc<Placement>) -> Self {
        Self {
            inner,
            budget,
            placement,
            direct: Arc::default(),
        }
    }

    /// The inner service.
    ///
    /// A call made through it bypasses this service: it deposits nothing.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use tower_stream_backpressure::budget::WithRetryBudget;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    /// let inner = service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(()) });
    /// let service = WithRetryBudget::new(inner, budget.clone());
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// service.get_ref().clone().oneshot(http::Request::new(())).await?;
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// assert_eq!(budget.available(), 0);
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes this service, returning the inner one.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use tower::{service_fn, ServiceExt};
    /// use tower_stream_backpressure::budget::WithRetryBudget;
    /// use tower_stream_backpressure::RetryBudget;
    ///
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    /// let inner = service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>("pong") });
    /// let service = WithRetryBudget::new(inner, budget.clone());
    /// let inner = service.into_inner();
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// assert_eq!(inner.oneshot(http::Request::new(())).await?, "pong");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// assert_eq!(budget.available(), 0, "the unwrapped service deposits nothing");
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[must_use]
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
        let extensions = request.extensions_mut();
        // A request without extensions (the usual one, above the retry layer) is a new
        // call that no budget has seen: no lookup.
        let retry = !extensions.is_empty() && extensions.get::<RetryAttempt>().is_some();
        if retry {
            self.placement.retry_seen();
        }
        if carries(extensions, &self.budget) || handoff::is_budget_offered(&self.budget) {
            return self.inner.call(request);
        }
        if !retry {
            self.budget.deposit();
        }
        // Handed down even on a retry: a retry layer below may still spend it.
        let direct = self.direct.load(Ordering::Relaxed);
        if !direct {
            hand_down(extensions, &self.budget);
        }
        let inner = &mut self.inner;
        let (future, taken) = handoff::offer_budget(&self.budget, || inner.call(request));
        if direct != taken {
            self.direct.store(taken, Ordering::Relaxed);
        }
        if direct && !taken {
            tracing::debug!(
                provider = %self.placement.provider,
                "no retry layer took the budget within this call: handing it down in the \
                 request's extensions again"
            );
        }
        future
    }
}

/// The budgets a call deposited in after the first, outermost first; the first is the
/// [`RetryBudget`] extension itself, where a retry layer looks for it.
#[derive(Debug, Clone, Default)]
pub(crate) struct InnerBudgets(Vec<RetryBudget>);

/// Whether the request already carries `budget`: it took this call's deposit.
fn carries(extensions: &Extensions, budget: &RetryBudget) -> bool {
    if extensions.is_empty() {
        return false;
    }
    extensions
        .get::<RetryBudget>()
        .is_some_and(|first| first.same(budget))
        || extensions
            .get::<InnerBudgets>()
            .is_some_and(|more| more.0.iter().any(|other| other.same(budget)))
}

fn hand_down(extensions: &mut Extensions, budget: &RetryBudget) {
    if extensions.get::<RetryBudget>().is_none() {
        extensions.insert(budget.clone());
        return;
    }
    // Nested budget layers: the only case that allocates for a list.
    match extensions.get_mut::<InnerBudgets>() {
        Some(more) => more.0.push(budget.clone()),
        None => {
            extensions.insert(InnerBudgets(vec![budget.clone()]));
        }
    }
}

/// Every budget a call deposited in, taken out of its request by the retry layer: a
/// retry takes one unit from each of them, or from none.
#[derive(Debug, Default)]
pub(crate) struct Budgets {
    first: Option<RetryBudget>,
    more: Vec<RetryBudget>,
}

impl Budgets {
    /// Takes the budgets offered to this call and those in `extensions`. With nothing
    /// else in them, the extensions are emptied, so that the copy of the request each
    /// attempt sends does not copy a map.
    pub(crate) fn take(extensions: &mut Extensions) -> Self {
        let mut budgets = Self::default();
        handoff::take_budgets(|budget| budgets.add(budget));
        if extensions.is_empty() {
            return budgets;
        }
        let Some(first) = extensions.remove::<RetryBudget>() else {
            return budgets;
        };
        budgets.add(first);
        if let Some(more) = extensions.remove::<InnerBudgets>() {
            more.0.into_iter().for_each(|budget| budgets.add(budget));
        }
        if extensions.is_empty() {
            *extensions = Extensions::new();
        }
        budgets
    }

    /// Adds `budget` unless it is one of them already: a budget layer that had not yet
    /// seen its offer taken hands the same budget down both ways.
    fn add(&mut self, budget: RetryBudget) {
        match &self.first {
            None => self.first = Some(budget),
            Some(first) if first.same(&budget) => {}
            Some(_) if self.more.iter().any(|other| other.same(&budget)) => {}
            Some(_) => self.more.push(budget),
        }
    }

    /// Drops the budgets offered to this call: a call that is never retried takes them
    /// only so that the layers above see a retry layer took them.
    pub(crate) fn decline() {
        handoff::take_budgets(drop);
    }

    /// Whether the call has no budget: its retries are bounded by `max_attempts` only.
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Takes one retry from every budget, if every one allows it, and says whether it
    /// did. When one refuses, those already taken are given back.
    pub(crate) fn withdraw(&self) -> bool {
        let Some(first) = &self.first else {
            return true;
        };
        if !first.withdraw() {
            return false;
        }
        for (taken, budget) in self.more.iter().enumerate() {
            if !budget.withdraw() {
                first.refund();
                self.more[..taken].iter().for_each(RetryBudget::refund);
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn one_per_deposit() -> RetryBudget {
        RetryBudget::new(Duration::from_secs(10), 0, 1.0)
    }

    #[test]
    fn a_refused_retry_takes_nothing_from_any_budget() {
        let (a, b, c) = (one_per_deposit(), one_per_deposit(), one_per_deposit());
        let mut extensions = Extensions::new();
        for budget in [&a, &b, &c] {
            budget.deposit();
            hand_down(&mut extensions, budget);
        }
        assert!(extensions.get::<InnerBudgets>().is_some());
        let budgets = Budgets::take(&mut extensions);
        assert!(extensions.is_empty(), "the budgets are out of the request");
        assert!(budgets.withdraw(), "each allows one");
        c.deposit();
        assert!(!budgets.withdraw(), "a and b are empty");
        assert_eq!(c.available(), 1, "c gave nothing");
        a.deposit();
        b.deposit();
        a.deposit();
        assert!(budgets.withdraw());
        assert!(!budgets.withdraw(), "b and c are empty");
        assert_eq!(a.available(), 1, "the unit taken from a came back");
        assert_eq!((b.available(), c.available()), (0, 0));
    }
}
