use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::BoxError;
use tower_service::Service;

use super::ReplayBody;
use crate::park::Parked;
use crate::retry::NotReplayable;

pin_project! {
    /// Response future of [`BufferRequestBody`](super::BufferRequestBody): reads the
    /// request body up to the cap, then calls the inner service.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{service_fn, Layer, Service, ServiceExt};
    /// use tower_stream_backpressure::replay::{ReplayBody, ResponseFuture};
    /// use tower_stream_backpressure::BufferRequestBodyLayer;
    ///
    /// let mut service = BufferRequestBodyLayer::new(1024).layer(service_fn(
    ///     |request: http::Request<ReplayBody<Full<Bytes>>>| async move {
    ///         Ok::<_, tower::BoxError>(request.into_body().collect().await?.to_bytes())
    ///     },
    /// ));
    /// let request = http::Request::new(Full::new(Bytes::from("prompt")));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let future: ResponseFuture<_, Full<Bytes>> = service.ready().await?.call(request);
    /// assert_eq!(future.await?, "prompt");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        Reading {
            read: Option<Read<S, B>>,
        },
        // The body is read: the service is driven ready, then called.
        Readying {
            call: Parked<S, Request<ReplayBody<B>>>,
        },
        Calling {
            #[pin]
            future: S::Future,
        },
        Done,
    }
}

/// A request whose body is being read.
struct Read<S, B> {
    service: S,
    head: http::request::Parts,
    body: B,
    read: VecDeque<Bytes>,
    bytes: usize,
    limit: usize,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    pub(crate) fn new(service: S, request: Request<B>, limit: usize) -> Self {
        let (head, body) = request.into_parts();
        Self {
            state: State::Reading {
                read: Some(Read {
                    service,
                    head,
                    body,
                    read: VecDeque::new(),
                    bytes: 0,
                    limit,
                }),
            },
        }
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading { read } => {
                    let Some(reading) = read.as_mut() else {
                        unreachable!("the request is read until it is sent")
                    };
                    let body = match ready!(reading.poll_body(cx)) {
                        Ok(body) => body,
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    };
                    let Some(reading) = read.take() else {
                        unreachable!("the request is read until it is sent")
                    };
                    this.state.set(State::Readying {
                        call: reading.into_call(body),
                    });
                }
                StateProj::Readying { call } => match ready!(call.poll_call(cx)) {
                    Ok(future) => this.state.set(State::Calling { future }),
                    Err(error) => {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error.into()));
                    }
                },
                StateProj::Calling { future } => {
                    let output = ready!(future.poll(cx)).map_err(Into::into);
                    this.state.set(State::Done);
                    return Poll::Ready(output);
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, B> Read<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads until the body ends (`Some` of its trailers, if any) or passes the cap
    /// (`None`).
    fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Option<HeaderMap>>, BoxError>> {
        loop {
            if self.bytes > self.limit {
                return Poll::Ready(Ok(None));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => return Poll::Ready(Ok(Some(None))),
                Some(Err(error)) => return Poll::Ready(Err(error.into())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        self.bytes = self.bytes.saturating_add(data.len());
                        if !data.is_empty() {
                            self.read.push_back(data);
                        }
                    }
                    Err(frame) => return Poll::Ready(Ok(Some(frame.into_trailers().ok()))),
                },
            }
        }
    }

    /// Calls the inner service: with the bytes held when the body `ended` (with its
    /// trailers), else with the bytes read and the rest, once.
    /// The request to send, with the service to send it on.
    fn into_call(self, ended: Option<Option<HeaderMap>>) -> Parked<S, Request<ReplayBody<B>>> {
        let Self {
            service,
            mut head,
            body,
            read,
            ..
        } = self;
        let body = match ended {
            Some(trailers) => ReplayBody::held(concat(read), trailers),
            None => {
                head.extensions.insert(NotReplayable);
                ReplayBody::streaming(read, body)
            }
        };
        Parked::new(service, Request::from_parts(head, body))
    }
}

/// The pieces as one `Bytes`, copied only when there is more than one.
fn concat(mut pieces: VecDeque<Bytes>) -> Bytes {
    match pieces.len() {
        0 => Bytes::new(),
        1 => pieces.pop_front().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
            for piece in pieces {
                all.extend_from_slice(&piece);
            }
            all.freeze()
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Reading { .. } => "reading the request body",
            State::Readying { .. } => "waiting for the inner service to be ready",
            State::Calling { .. } => "calling",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
