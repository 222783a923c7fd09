use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use super::{Rejected, ResponseBody};
use crate::metrics::ConcurrencyMetrics;

/// A held concurrency slot: the semaphore permit and its `streams_in_flight` count.
///
/// Dropping it returns the permit and lowers the gauge; it is dropped exactly once, by
/// whoever holds it last (the response future on an error, otherwise the body).
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<ConcurrencyMetrics>,
}

impl Slot {
    pub(crate) fn new(
        permit: OwnedSemaphorePermit,
        metrics: Arc<ConcurrencyMetrics>,
        waited: Duration,
    ) -> Self {
        metrics.slot_taken(waited);
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.slot_released();
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

/// The time a call spends waiting for a slot. Dropped unfinished, it counts the call as
/// given up by its caller (`context_canceled`).
struct Wait {
    started: Instant,
    metrics: Arc<ConcurrencyMetrics>,
    finished: bool,
}

impl Wait {
    fn finish(&mut self) -> Duration {
        self.finished = true;
        self.started.elapsed()
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if !self.finished {
            let waited = self.started.elapsed();
            self.metrics.context_canceled(waited);
            tracing::debug!(
                provider = %self.metrics.provider(),
                waited_ms = waited.as_millis() as u64,
                "the caller gave up while waiting for a concurrency slot"
            );
        }
    }
}

/// A call gets no slot within its `max_wait`: counted, logged, and the error made.
pub(crate) fn reject(metrics: &ConcurrencyMetrics, limit: usize, waited: Duration) -> Rejected {
    metrics.deadline_exceeded(waited);
    tracing::warn!(
        provider = %metrics.provider(),
        limit,
        waited_ms = waited.as_millis() as u64,
        "rejected: no concurrency slot within max_wait"
    );
    Rejected::deadline_exceeded(limit, waited)
}

/// Resolves to a permit, or `None` once the call's deadline has passed.
type Acquire = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

pin_project! {
    /// Response future of [`StreamConcurrency`](super::StreamConcurrency).
    ///
    /// Waits for a slot (when none was free at `call`), then calls the inner service and
    /// moves the slot into the response body. Dropping it while waiting leaves the queue;
    /// dropping it while the inner call runs releases the slot.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, Service, ServiceExt};
    /// use tower_stream_backpressure::concurrency::ResponseFuture;
    /// use tower_stream_backpressure::StreamConcurrencyLayer;
    ///
    /// let layer = StreamConcurrencyLayer::new(1);
    /// let mut service = layer.layer(service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("data"))))
    /// }));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let future: ResponseFuture<_, http::Request<()>> =
    ///     service.ready().await?.call(http::Request::new(()));
    /// assert_eq!(layer.available_slots(), 0, "the slot is taken at `call`");
    /// drop(future);
    /// assert_eq!(layer.available_slots(), 1, "and released with the future");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Waiting {
            acquire: Acquire,
            wait: Wait,
            limit: usize,
            // Boxed: the service and request are needed only while waiting, and a
            // future's size is kept by its caller's task for the whole stream.
            call: Option<Box<(S, Req)>>,
        },
        Calling {
            #[pin]
            future: S::Future,
            slot: Option<Slot>,
        },
        Rejected {
            error: Rejected,
        },
    }
}

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    pub(crate) fn calling(future: S::Future, slot: Slot) -> Self {
        Self {
            state: State::Calling {
                future,
                slot: Some(slot),
            },
        }
    }

    pub(crate) fn rejected(error: Rejected) -> Self {
        Self {
            state: State::Rejected { error },
        }
    }

    /// Queues for a slot (FIFO) until `deadline`, or for as long as the caller waits.
    pub(crate) fn waiting(
        semaphore: Arc<Semaphore>,
        limit: usize,
        deadline: Option<Instant>,
        metrics: Arc<ConcurrencyMetrics>,
        service: S,
        request: Req,
    ) -> Self {
        let acquire: Acquire = Box::pin(async move {
            // The semaphore is never closed, so `acquire_owned` only ever succeeds.
            let permit = semaphore.acquire_owned();
            match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, permit).await.ok()?.ok(),
                None => permit.await.ok(),
            }
        });
        Self {
            state: State::Waiting {
                acquire,
                wait: Wait {
                    started: Instant::now(),
                    metrics,
                    finished: false,
                },
                limit,
                call: Some(Box::new((service, request))),
            },
        }
    }
}

impl<S, Req, B> Future for ResponseFuture<S, Req>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Waiting {
                    acquire,
                    wait,
                    limit,
                    call,
                } => {
                    let permit = ready!(acquire.as_mut().poll(cx));
                    let waited = wait.finish();
                    let Some(permit) = permit else {
                        let error = reject(&wait.metrics, *limit, waited);
                        self.as_mut().project().state.set(State::Rejected { error });
                        continue;
                    };
                    let slot = Slot::new(permit, wait.metrics.clone(), waited);
                    let Some((mut service, request)) = call.take().map(|call| *call) else {
                        unreachable!("the call is taken only when leaving this state")
                    };
                    let future = service.call(request);
                    self.as_mut().project().state.set(State::Calling {
                        future,
                        slot: Some(slot),
                    });
                }
                StateProj::Calling { future, slot } => {
                    let result = ready!(future.poll(cx));
                    let slot = slot.take();
                    return Poll::Ready(match (result, slot) {
                        (Ok(response), Some(slot)) => {
                            Ok(response.map(|body| ResponseBody::new(body, slot)))
                        }
                        (Err(error), _) => Err(error.into()),
                        (Ok(_), None) => panic!("ResponseFuture polled after completion"),
                    });
                }
                StateProj::Rejected { error } => return Poll::Ready(Err(Box::new(*error))),
            }
        }
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting for a slot",
            State::Calling { .. } => "calling",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
