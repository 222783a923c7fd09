use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Uri;
use pin_project_lite::pin_project;
use tokio::sync::{Semaphore, watch};
use tower::BoxError;
use tower_service::Service;

use super::CountedIo;
use super::io::OpenConnection;
use super::service::{HostPlace, Shared};
use crate::metrics::ConnectionMetrics;
use crate::park::Parked;

/// Resolves to a permit of the host's semaphore, or to `None` once every handle of the
/// connector is gone.
type Acquire = Pin<Box<dyn Future<Output = Option<HostPlace>> + Send>>;

const ABANDONED: &str =
    "connect abandoned: the connector was dropped while waiting for a place on the host";

pin_project! {
    /// Connect future of [`ConnectionGauge`](super::ConnectionGauge).
    ///
    /// With a per-host cap, it first waits (in FIFO order) for a place on the
    /// destination's host, then calls the inner connector. On success the IO comes back
    /// as a [`CountedIo`], counted open and holding the place; on failure the place is
    /// freed and nothing was counted. Dropping this future, while it waits or while the
    /// inner connector works, frees everything it held.
    ///
    /// A wait for a place ends in an error (an [`io::Error`] of kind `Other`) when
    /// the connector that made this future, and every clone of it, has been dropped:
    /// see [when the client is dropped](super#when-the-client-is-dropped).
    ///
    /// It is `Unpin` when the inner connector's future is, as hyper-util requires.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, Service, ServiceExt};
    /// use tower_stream_backpressure::connection::ConnectFuture;
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new().max_per_host(4);
    /// let mut connector = layer.layer(HttpConnector::new());
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let future: ConnectFuture<HttpConnector> = connector.ready().await?.call(uri);
    /// let io = future.await?;
    /// assert_eq!(layer.open_connections(), 1);
    /// # drop(io);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ConnectFuture<S>
    where
        S: Service<Uri>,
    {
        #[pin]
        state: State<S>,
        shared: Arc<Shared>,
        metrics: Arc<ConnectionMetrics>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S>
    where
        S: Service<Uri>,
    {
        Waiting {
            acquire: Acquire,
            call: Option<Parked<S, Uri>>,
        },
        // A place is held: the parked connector is driven ready, then called.
        Readying {
            call: Parked<S, Uri>,
            permit: Option<HostPlace>,
        },
        Connecting {
            #[pin]
            future: S::Future,
            permit: Option<HostPlace>,
        },
        Done,
    }
}

impl<S> ConnectFuture<S>
where
    S: Service<Uri>,
{
    /// Connects at once; `permit` is the host's place, when there is a cap.
    pub(crate) fn connecting(
        future: S::Future,
        permit: Option<HostPlace>,
        shared: Arc<Shared>,
        metrics: Arc<ConnectionMetrics>,
    ) -> Self {
        Self {
            state: State::Connecting { future, permit },
            shared,
            metrics,
        }
    }

    /// Waits for a place on `host`, then calls the (ready) `service` with `uri`; gives
    /// up when `handles` reports that every handle of the connector is gone.
    pub(crate) fn waiting(
        (key, host): (String, Arc<Semaphore>),
        mut handles: watch::Receiver<()>,
        service: S,
        uri: Uri,
        shared: Arc<Shared>,
        metrics: Arc<ConnectionMetrics>,
    ) -> Self {
        let place_shared = shared.clone();
        let acquire: Acquire = Box::pin(async move {
            let mut permit = pin!(host.acquire_owned());
            // Nothing is ever sent: `changed` returns when the sender is dropped.
            let mut gone = pin!(handles.changed());
            poll_fn(|cx| {
                // The semaphore is never closed, so a permit is all it can give.
                if let Poll::Ready(permit) = permit.as_mut().poll(cx) {
                    return Poll::Ready(permit.ok());
                }
                gone.as_mut().poll(cx).map(|_| None)
            })
            .await
            .map(|permit| HostPlace::new(permit, key, place_shared))
        });
        Self {
            state: State::Waiting {
                acquire,
                call: Some(Parked::new(service, uri)),
            },
            shared,
            metrics,
        }
    }
}

impl<S> Future for ConnectFuture<S>
where
    S: Service<Uri>,
    S::Error: Into<BoxError>,
{
    type Output = Result<CountedIo<S::Response>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Waiting { acquire, call } => {
                    let Some(permit) = ready!(acquire.as_mut().poll(cx)) else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Box::new(io::Error::other(ABANDONED))));
                    };
                    let Some(call) = call.take() else {
                        unreachable!("the call is taken only when leaving this state")
                    };
                    this.state.set(State::Readying {
                        call,
                        permit: Some(permit),
                    });
                }
                StateProj::Readying { call, permit } => {
                    let result = ready!(call.poll_call(cx));
                    let permit = permit.take();
                    match result {
                        Ok(future) => this.state.set(State::Connecting { future, permit }),
                        Err(error) => {
                            // The place goes with the failed connect.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    }
                }
                StateProj::Connecting { future, permit } => {
                    let result = ready!(future.poll(cx));
                    let permit = permit.take();
                    this.state.set(State::Done);
                    // On an error the permit drops here: a failed connect holds no place.
                    return Poll::Ready(match result {
                        Ok(io) => {
                            let (shared, metrics) = (this.shared.clone(), this.metrics.clone());
                            Ok(CountedIo::new(
                                io,
                                OpenConnection::new(shared, metrics, permit),
                            ))
                        }
                        Err(error) => Err(error.into()),
                    });
                }
                StateProj::Done => panic!("ConnectFuture polled after completion"),
            }
        }
    }
}

impl<S> fmt::Debug for ConnectFuture<S>
where
    S: Service<Uri>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting for a place on the host",
            State::Readying { .. } => "waiting for the connector to be ready",
            State::Connecting { .. } => "connecting",
            State::Done => "done",
        };
        f.debug_struct("ConnectFuture")
            .field("state", &state)
            .finish()
    }
}
