//! `tower::balance` over two loopback endpoints with `load::CompleteOnEndOfStream`,
//! both protocols, checked on each endpoint's own hit count.

mod support;

use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::{BOTH, Fault, Protocol, Reply, Upstream, client, post, read_to_end};
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::pending_requests::Handle;
use tower::load::{CompleteOnResponse, PendingRequests, TrackCompletion};
use tower::util::rng::Rng;
use tower::{Service, ServiceExt};
use tower_stream_backpressure::load::CompleteOnEndOfStream;

/// A fixed sequence, so that the balancer's random picks are the same on every run.
struct Seeded(u64);

impl Rng for Seeded {
    fn next_u64(&mut self) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Two endpoints behind tower's p2c balancer, each counting its calls in flight as
/// `completion` says. `slow` holds every stream open after its first event; `fast`
/// streams its events at once.
async fn calls_to_the_slow_endpoint<C, B>(protocol: Protocol, completion: C, calls: usize) -> u64
where
    C: TrackCompletion<Handle, http::Response<Incoming>, Output = http::Response<B>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError> + std::fmt::Debug,
{
    let slow = Upstream::start(|_| Reply::faulty(3, Fault::StallAfter(1))).await;
    let fast = Upstream::start(|_| Reply::tokens(3)).await;
    let endpoints = [&slow, &fast].map(|upstream| {
        let url: http::Uri = upstream.url("/v1/chat/completions").parse().unwrap();
        PendingRequests::new(endpoint(protocol, url), completion.clone())
    });
    let mut balance = Balance::from_rng(ServiceList::new(endpoints), Seeded(0x9e37_79b9_7f4a_7c15));
    let mut open = Vec::new();
    for _ in 0..calls {
        let before = slow.hits();
        let service = balance.ready().await.unwrap();
        let response = service.call(post("http://placeholder/")).await.unwrap();
        if slow.hits() > before {
            // The slow endpoint's stream stays open, its first event read.
            let mut body = Box::pin(response.into_body());
            body.frame().await.unwrap().unwrap();
            open.push(body);
        } else {
            read_to_end(response.into_body()).await.unwrap();
        }
    }
    assert_eq!(slow.hits() + fast.hits(), calls as u64, "{protocol:?}");
    assert_eq!(slow.open_streams(), open.len() as u64, "{protocol:?}");
    drop(open);
    slow.hits()
}

type Endpoint = tower::util::MapRequest<
    support::HyperClient,
    Box<dyn Fn(Request<Full<bytes::Bytes>>) -> Request<Full<bytes::Bytes>> + Send + Sync>,
>;

/// The shared client, sending every request to `url`.
fn endpoint(protocol: Protocol, url: http::Uri) -> Endpoint {
    client(protocol).map_request(Box::new(move |mut request: Request<Full<bytes::Bytes>>| {
        *request.uri_mut() = url.clone();
        request
    }))
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_holding_open_streams_gets_no_new_calls() {
    const CALLS: usize = 20;
    for protocol in BOTH {
        // Counted to the end of the stream: once the slow endpoint holds one, every
        // later call goes to the other.
        let slow = calls_to_the_slow_endpoint(protocol, CompleteOnEndOfStream, CALLS).await;
        assert_eq!(slow, 1, "{protocol:?}: one stream held, then none");

        // Counted to the headers (tower's own), the open stream weighs nothing: the
        // balancer keeps sending calls to the endpoint that holds it.
        let slow = calls_to_the_slow_endpoint(protocol, CompleteOnResponse::default(), CALLS).await;
        assert!(slow > 1, "{protocol:?}: {slow} calls to the slow endpoint");
    }
}
