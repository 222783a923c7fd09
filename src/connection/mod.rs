//! Open client connections, counted exactly and optionally capped per host.
//!
//! # Why
//!
//! hyper-util's pooled client opens connections as it needs them and says nothing
//! about it: there is no count of the connections it holds, and no cap on how many it
//! opens to one host. Under HTTP/1.1 every concurrent stream is a connection of its
//! own, so the number of sockets follows the number of streams; an upstream that
//! limits connections per client, or a process near its file-descriptor limit, sees
//! that first. Counting requests does not tell how many connections they use (HTTP/2
//! puts them all on one), and the pool offers no hook to count them.
//!
//! # How
//!
//! [`ConnectionGaugeLayer`] wraps the client's *connector* (the `Service<Uri>` given
//! to `Client::builder(..).build(..)`, e.g. hyper-util's `HttpConnector`), not the
//! client. When a connect succeeds, the connection counts as open: the
//! `http_client_open_connections` gauge goes up by one (see
//! [`metrics`](crate::metrics)). Its IO comes back wrapped in a [`CountedIo`], which
//! carries the count and lowers it exactly once, when hyper-util drops the IO, i.e.
//! when the connection is really gone, whatever closed it. A failed connect counts
//! nothing.
//!
//! With [`max_per_host(n)`](ConnectionGaugeLayer::max_per_host), each `host:port`
//! has `n` places (a semaphore). A connect takes a place before it calls the inner
//! connector, waiting in FIFO order while all `n` are held; the place moves into the
//! [`CountedIo`] and is freed when the IO is dropped. A failed connect frees its place
//! at once, and so does a connect future dropped while it waits or connects.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::{connect::HttpConnector, Client};
//! use hyper_util::rt::TokioExecutor;
//! use tower::Layer;
//! use tower_stream_backpressure::ConnectionGaugeLayer;
//!
//! let mut connector = HttpConnector::new();
//! connector.set_nodelay(true);
//! let connections = ConnectionGaugeLayer::new().max_per_host(16).provider("openai");
//! let client = Client::builder(TokioExecutor::new())
//!     .build::<_, Full<Bytes>>(connections.layer(connector));
//! // Use `client` as usual (under the other layers of this crate, too);
//! // `http_client_open_connections{provider="openai"}` follows its connections.
//! # drop(client);
//! ```
//!
//! # At the cap
//!
//! What hyper-util's legacy `Client` does when a connect has to wait for a place:
//!
//! - **HTTP/1.1**: a request that finds no idle connection starts a connect and, at
//!   the same time, waits for a pooled connection to its host to come free. At the
//!   cap its connect waits for a place, so in effect the request queues for one of the
//!   `n` connections: when a response on one of them has been read to its end, the
//!   connection goes back to the pool and to the oldest waiting request. Requests do
//!   not wait for a connection to *close*. (Dropping a response body before its end
//!   does close its HTTP/1.1 connection, which frees a place.)
//!
//!   The served request's connect is then moved by hyper-util into a task of its own,
//!   where it keeps waiting for a place: one such connect per request that queued and
//!   was served from the pool. Each ends when a connection to the host closes: it
//!   takes the freed place and opens a connection into the pool (so the pool is
//!   refilled to `n` although no request asked), and the cap holds throughout. While
//!   connections stay open, these connects accumulate, each holding a task and a
//!   reference to hyper-util's pool. So let the cap be reached in bursts, not as
//!   the steady state of a saturated client: put a
//!   [`StreamConcurrencyLayer`](crate::StreamConcurrencyLayer) with a lower limit in
//!   front of the client to do the queueing (per stream, with a `max_wait`).
//! - **HTTP/2** (`http2_only`): hyper-util opens one connection per host and puts
//!   every request on it, so a cap of 1 or more never makes a request wait. It
//!   matters only while a connection is being replaced: the new connect waits until
//!   the old connection's IO is dropped.
//!
//! # When the client is dropped
//!
//! The pool's idle connections are closed, and counted closed, once the client and
//! every request made through it are gone. Connects still waiting for a place then
//! give up with an error (nothing could use their connections), so that they do not
//! keep hyper-util's pool, and the idle connections holding the places they wait for,
//! alive. hyper-util discards that error. Outside hyper-util: a connect future waits
//! only while the [`ConnectionGauge`] that made it, or a clone, is alive.

mod future;
mod io;
mod layer;
mod service;

pub use self::future::ConnectFuture;
pub use self::io::CountedIo;
pub use self::layer::ConnectionGaugeLayer;
pub use self::service::ConnectionGauge;
