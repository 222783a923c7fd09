use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{BoxError, Layer, ServiceExt, service_fn};

use super::{BufferRequestBodyLayer, ReplayBody};
use crate::retry::NotReplayable;

/// What the inner service saw of each request: marked `NotReplayable`, replayable,
/// and its bytes.
type Seen = Arc<Mutex<Vec<(bool, bool, Bytes)>>>;

/// A request body of scripted frames, readable once.
struct Frames(VecDeque<Result<Frame<Bytes>, std::io::Error>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front())
    }
}

fn body(frames: Vec<Result<Frame<Bytes>, std::io::Error>>) -> Frames {
    Frames(frames.into())
}

fn data(text: &'static str) -> Result<Frame<Bytes>, std::io::Error> {
    Ok(Frame::data(Bytes::from_static(text.as_bytes())))
}

/// Sends `request` through the layer with `limit` to a service that records what it
/// got, reading the body it was given and a clone of it.
async fn send(limit: usize, request: Request<Frames>) -> (Result<(), BoxError>, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let service = BufferRequestBodyLayer::new(limit).layer(service_fn(
        move |request: Request<ReplayBody<Frames>>| {
            let record = record.clone();
            async move {
                let marked = request.extensions().get::<NotReplayable>().is_some();
                let body = request.into_body();
                let replayable = body.is_replayable();
                let copy = body.clone();
                let bytes = body.collect().await?.to_bytes();
                record.lock().unwrap().push((marked, replayable, bytes));
                if replayable {
                    let again = copy.collect().await?.to_bytes();
                    record.lock().unwrap().push((marked, replayable, again));
                } else {
                    let error = copy.collect().await.unwrap_err();
                    assert!(error.to_string().contains("cannot be replayed"));
                }
                Ok::<_, BoxError>(Response::new(()))
            }
        },
    ));
    let result = service.oneshot(request).await.map(drop);
    (result, seen)
}

#[tokio::test]
async fn a_body_within_the_cap_is_held_and_replayed() {
    let request = Request::new(body(vec![data("hello, "), data("world")]));
    let (result, seen) = send(12, request).await;
    result.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(
        *seen,
        vec![
            (false, true, Bytes::from_static(b"hello, world")),
            (false, true, Bytes::from_static(b"hello, world")),
        ]
    );
}

#[tokio::test]
async fn trailers_are_kept() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let frames = vec![data("x"), Ok(Frame::trailers(trailers.clone()))];
    let mut replay = ReplayBody::<Frames>::held(Bytes::from_static(b"x"), Some(trailers.clone()));
    let copy = replay.clone();
    for mut body in [copy, replay.clone()] {
        let collected = (&mut body).collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert!(body.is_end_stream());
    }
    assert_eq!(replay.size_hint().exact(), Some(1));
    let _ = (&mut replay).collect().await.unwrap();

    let (result, seen) = send(10, Request::new(body(frames))).await;
    result.unwrap();
    assert_eq!(seen.lock().unwrap()[0].2, Bytes::from_static(b"x"));
}

#[tokio::test]
async fn a_body_over_the_cap_streams_through_once() {
    let request = Request::new(body(vec![data("0123"), data("4567"), data("89")]));
    let (result, seen) = send(5, request).await;
    result.unwrap();
    // Marked, not replayable, and every byte in order.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(true, false, Bytes::from_static(b"0123456789"))]
    );
}

#[tokio::test]
async fn an_empty_body_is_held() {
    let (result, seen) = send(1, Request::new(body(Vec::new()))).await;
    result.unwrap();
    assert_eq!(seen.lock().unwrap()[0], (false, true, Bytes::new()));
}

#[tokio::test]
async fn a_body_that_fails_while_read_fails_the_call_before_it_is_sent() {
    let failing = vec![
        data("abc"),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client left",
        )),
    ];
    let (result, seen) = send(100, Request::new(body(failing))).await;
    assert_eq!(result.unwrap_err().to_string(), "client left");
    assert!(
        seen.lock().unwrap().is_empty(),
        "the inner service was not called"
    );
}

#[test]
fn a_zero_cap_is_refused() {
    assert_eq!(
        BufferRequestBodyLayer::try_new(0).unwrap_err().setting(),
        "limit"
    );
}

/// A request body that ends when its sender says so.
struct Arrives(tokio::sync::oneshot::Receiver<()>);

impl Body for Arrives {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        let _ = std::task::ready!(Pin::new(&mut self.0).poll(cx));
        Poll::Ready(None)
    }
}

/// Counts its `poll_ready` calls.
#[derive(Clone, Default)]
struct CountsReady(Arc<Mutex<usize>>);

impl tower::Service<Request<ReplayBody<Arrives>>> for CountsReady {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<()>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        *self.0.lock().unwrap() += 1;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<ReplayBody<Arrives>>) -> Self::Future {
        std::future::ready(Ok(Response::new(())))
    }
}

#[tokio::test]
async fn reading_the_body_holds_no_readiness_of_the_inner_service() {
    let inner = CountsReady::default();
    let service = BufferRequestBodyLayer::new(64).layer(inner.clone());
    let (arrive, body) = tokio::sync::oneshot::channel();
    let call = tokio::spawn(service.oneshot(Request::new(Arrives(body))));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        *inner.0.lock().unwrap(),
        0,
        "not made ready while the body is read"
    );
    arrive.send(()).unwrap();
    call.await.unwrap().unwrap();
    assert_eq!(*inner.0.lock().unwrap(), 1, "made ready once, after");
}

#[tokio::test]
#[should_panic(expected = "ResponseFuture polled after completion")]
async fn the_future_polled_after_it_returned_panics() {
    use std::future::Future;
    let service =
        service_fn(|_: Request<ReplayBody<Frames>>| async { Ok::<_, BoxError>(Response::new(())) });
    let mut service = BufferRequestBodyLayer::new(64).layer(service);
    let future = service.ready().await.unwrap();
    let future = tower::Service::call(future, Request::new(body(vec![data("x")])));
    let mut future = std::pin::pin!(future);
    let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
    let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
}
