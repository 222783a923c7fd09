//! A mock LLM upstream on 127.0.0.1: HTTP/1.1 and HTTP/2 (prior knowledge) on one
//! port, or over TLS (HTTP/2 or HTTP/1.1 by ALPN), streaming SSE, with faults injected
//! per request by a script, and its own count of what it saw (connections, hits, open
//! streams, peak open streams).
//!
//! Shared by the integration tests, the examples and the benchmarks.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Sleep;

/// What the upstream saw of one request, for the script to decide on.
#[derive(Debug, Clone)]
pub struct Hit {
    /// 0 for the first request the upstream received, and so on.
    pub index: u64,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
}

/// How the upstream answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `200 text/event-stream`, then the stream's steps.
    Stream(Stream),
    /// A plain response with this status, headers and body.
    Status {
        status: StatusCode,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// Close the connection without answering ("reset before headers"): every stream
    /// on it ends.
    DropConnection,
    /// Fail this request without answering: HTTP/2 resets the stream
    /// (`INTERNAL_ERROR`), HTTP/1.1 closes the connection.
    ResetStream,
    /// Never answer (a stall before the headers).
    Hang,
}

/// A `200` stream and the fault it suffers, if any.
#[derive(Debug, Clone)]
pub struct Stream {
    pub content_type: &'static str,
    /// `: keep-alive` comments sent before anything else.
    pub keepalives: usize,
    /// Pause before the first event, after the headers and keep-alives.
    pub first_delay: Duration,
    /// The body's pieces: for SSE, complete events (each ending in a blank line).
    pub events: Vec<Bytes>,
    /// Pause before each event.
    pub gap: Duration,
    pub fault: Fault,
}

/// What goes wrong with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Headers (and keep-alives), then nothing, ever.
    StallBeforeFirst,
    /// Headers (and keep-alives), then the stream is reset.
    ResetBeforeFirst,
    /// This many events, then nothing, ever.
    StallAfter(usize),
    /// This many events, then the stream is reset.
    ResetAfter(usize),
    /// Headers, then a keep-alive comment every so often, forever: never an event.
    KeepAlivesForever(Duration),
}

impl Reply {
    /// A healthy SSE stream of `tokens` content events and a final `data: [DONE]`.
    pub fn tokens(tokens: usize) -> Self {
        Reply::chunks("text/event-stream", token_events(tokens))
    }

    /// A healthy `200` stream of `content_type`, sending `chunks` in order.
    pub fn chunks(content_type: &'static str, chunks: Vec<Bytes>) -> Self {
        Reply::Stream(Stream {
            content_type,
            keepalives: 0,
            first_delay: Duration::ZERO,
            events: chunks,
            gap: Duration::ZERO,
            fault: Fault::None,
        })
    }

    /// A stream of `tokens` events that suffers `fault`.
    pub fn faulty(tokens: usize, fault: Fault) -> Self {
        match Reply::tokens(tokens) {
            Reply::Stream(stream) => Reply::Stream(Stream { fault, ..stream }),
            _ => unreachable!(),
        }
    }

    /// A plain response with `status` and a JSON error body (none for 204 and 304).
    pub fn status(status: u16) -> Self {
        let body: &'static [u8] = match status {
            204 | 304 => b"",
            _ => br#"{"error":{"message":"injected"}}"#,
        };
        Reply::Status {
            status: StatusCode::from_u16(status).expect("a valid status"),
            headers: Vec::new(),
            body: Bytes::from_static(body),
        }
    }

    /// Adds a response header (to a `Status` reply).
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        if let Reply::Status { headers, .. } = &mut self {
            headers.push((name, value.into()));
        }
        self
    }

    /// Sets the pause before each event (of a `Stream` reply).
    pub fn gap(mut self, gap: Duration) -> Self {
        if let Reply::Stream(stream) = &mut self {
            stream.gap = gap;
        }
        self
    }

    /// Sets the pause before the first event (of a `Stream` reply): the headers go out
    /// at once, the first event after `delay`, and the others as `gap` says.
    pub fn first_event_after(mut self, delay: Duration) -> Self {
        if let Reply::Stream(stream) = &mut self {
            stream.first_delay = delay;
        }
        self
    }

    /// Sends `n` SSE keep-alive comments first (in a `Stream` reply).
    pub fn keepalives(mut self, n: usize) -> Self {
        if let Reply::Stream(stream) = &mut self {
            stream.keepalives = n;
        }
        self
    }
}

/// An Anthropic-style stream of `tokens` text deltas: `message_start`,
/// `content_block_start`, a `ping`, the deltas, `content_block_stop`, `message_delta`
/// and `message_stop`, each with its `event:` name.
pub fn anthropic_events(tokens: usize) -> Vec<Bytes> {
    let event = |name: &str, data: String| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut events = vec![
        event("message_start", r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}}"#.into()),
        event("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#.into()),
        event("ping", r#"{"type":"ping"}"#.into()),
    ];
    for i in 0..tokens {
        let delta = format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"tok{i} "}}}}"#
        );
        events.push(event("content_block_delta", delta));
    }
    events.push(event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#.into(),
    ));
    events.push(event("message_delta", format!(r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{tokens}}}}}"#)));
    events.push(event("message_stop", r#"{"type":"message_stop"}"#.into()));
    events
}

/// Anthropic's overload error, sent as an event after `200 OK`.
pub fn anthropic_overloaded() -> Bytes {
    Bytes::from_static(
        b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    )
}

/// `tokens` OpenAI-style chunk events, then `data: [DONE]`.
pub fn token_events(tokens: usize) -> Vec<Bytes> {
    (0..tokens)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n"
            ))
        })
        .chain(std::iter::once(Bytes::from_static(b"data: [DONE]\n\n")))
        .collect()
}

type Script = dyn Fn(&Hit) -> Reply + Send + Sync;

/// The upstream's own counts.
#[derive(Debug, Default)]
pub struct Stats {
    connections: AtomicU64,
    hits: AtomicU64,
    open: AtomicU64,
    peak: AtomicU64,
    completed: AtomicU64,
}

/// A running mock upstream; stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    stats: Arc<Stats>,
    server: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts serving on 127.0.0.1 (port chosen by the OS), answering each request as
    /// `script` says.
    pub async fn start(script: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> Self {
        Self::serve(None, script).await
    }

    /// [`start`](Self::start), over TLS with this configuration (its certificate, and
    /// the protocols it offers by ALPN).
    pub async fn start_tls(
        tls: Arc<rustls::ServerConfig>,
        script: impl Fn(&Hit) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(tls)), script).await
    }

    async fn serve(
        tls: Option<tokio_rustls::TlsAcceptor>,
        script: impl Fn(&Hit) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(Stats::default());
        let script: Arc<Script> = Arc::new(script);
        let server = tokio::spawn(serve(listener, tls, stats.clone(), script));
        Self {
            addr,
            scheme,
            stats,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port{path}` (`https://` over TLS).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// TCP connections accepted, whether or not a TLS handshake followed.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// Requests received.
    pub fn hits(&self) -> u64 {
        self.stats.hits.load(Ordering::SeqCst)
    }

    /// Responses being produced now: from the request's arrival until its body ended,
    /// failed, or was dropped.
    pub fn open_streams(&self) -> u64 {
        self.stats.open.load(Ordering::SeqCst)
    }

    /// The most responses ever open at once.
    pub fn peak_streams(&self) -> u64 {
        self.stats.peak.load(Ordering::SeqCst)
    }

    /// Streams whose body was sent to its end.
    pub fn completed_streams(&self) -> u64 {
        self.stats.completed.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Stats>,
    script: Arc<Script>,
) {
    crate::accept_each(listener, move |tcp| {
        let _ = tcp.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let connection = Arc::new(Connection::new(stats.clone()));
        let service = {
            let (script, connection) = (script.clone(), connection.clone());
            service_fn(move |request: Request<Incoming>| {
                answer(request, script.clone(), connection.clone())
            })
        };
        let tls = tls.clone();
        async move {
            match tls {
                None => serve_connection(tcp, service, &connection).await,
                // A failed handshake (the client did not trust the certificate) ends
                // the connection before any request.
                Some(tls) => {
                    if let Ok(stream) = tls.accept(tcp).await {
                        serve_connection(stream, service, &connection).await;
                    }
                }
            }
        }
    })
    .await;
}

async fn serve_connection<I, S>(io: I, service: S, connection: &Connection)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<MockBody>, Error = io::Error>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No cap on streams per connection: the client's limit is what is tested.
    builder.http2().max_concurrent_streams(None);
    let serving = builder.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = serving => {}
        // Dropping the connection closes the socket under every stream on it.
        _ = connection.killed() => {}
    }
}

/// One accepted connection, which a reply may kill, and the streams open on it.
#[derive(Debug)]
struct Connection {
    stats: Arc<Stats>,
    state: Mutex<ConnectionState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct ConnectionState {
    killed: bool,
    open: u64,
}

impl Connection {
    fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            state: Mutex::default(),
            notify: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ConnectionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a response open on this connection (not if the connection is dead).
    fn open(self: &Arc<Self>) -> Open {
        let mut state = self.state();
        if !state.killed {
            state.open += 1;
            let open = self.stats.open.fetch_add(1, Ordering::SeqCst) + 1;
            self.stats.peak.fetch_max(open, Ordering::SeqCst);
        }
        Open {
            connection: Some(self.clone()),
        }
    }

    /// Closes the connection: its streams stop counting as open at once, whenever
    /// hyper gets round to dropping them.
    fn kill(&self) {
        let mut state = self.state();
        if !std::mem::replace(&mut state.killed, true) {
            self.stats
                .open
                .fetch_sub(std::mem::take(&mut state.open), Ordering::SeqCst);
        }
        drop(state);
        self.notify.notify_waiters();
    }

    /// Resolves once the connection is killed.
    async fn killed(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if !self.state().killed {
            notified.await;
        }
    }
}

async fn answer(
    request: Request<Incoming>,
    script: Arc<Script>,
    connection: Arc<Connection>,
) -> Result<Response<MockBody>, io::Error> {
    let hit = Hit {
        index: connection.stats.hits.fetch_add(1, Ordering::SeqCst),
        method: request.method().clone(),
        path: request.uri().path().to_owned(),
        headers: request.headers().clone(),
    };
    let reply = script(&hit);
    // Read the request body so that HTTP/1.1 can reuse the connection.
    let _ = http_body_util::BodyExt::collect(request.into_body()).await;
    let open = connection.open();
    match reply {
        Reply::DropConnection => {
            drop(open);
            connection.kill();
            std::future::pending().await
        }
        Reply::ResetStream => {
            drop(open);
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "injected stream reset",
            ))
        }
        Reply::Hang => {
            // Open until the client goes away and hyper drops this future, or the
            // connection is killed.
            let _open = open;
            connection.killed().await;
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection killed",
            ))
        }
        Reply::Status {
            status,
            headers,
            body,
        } => {
            let steps = if body.is_empty() {
                VecDeque::new()
            } else {
                VecDeque::from([Step::Send(body)])
            };
            let mut response = Response::new(MockBody::new(steps, open));
            *response.status_mut() = status;
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().append(name, value);
                }
            }
            Ok(response)
        }
        Reply::Stream(stream) => {
            let content_type = stream.content_type;
            let mut response = Response::new(MockBody::new(plan(stream), open));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            Ok(response)
        }
    }
}

/// One thing the body does next.
#[derive(Debug)]
enum Step {
    Send(Bytes),
    Pause(Duration),
    /// Return `Pending` once, so that the server flushes what it has.
    Flush,
    Stall,
    Reset,
    /// A keep-alive comment, then this step again after the pause, forever.
    KeepAlive(Duration),
}

fn plan(stream: Stream) -> VecDeque<Step> {
    let mut steps = VecDeque::new();
    for _ in 0..stream.keepalives {
        steps.push_back(Step::Send(Bytes::from_static(b": keep-alive\n\n")));
    }
    if !stream.first_delay.is_zero() {
        steps.push_back(Step::Pause(stream.first_delay));
    }
    let cut = match stream.fault {
        Fault::StallBeforeFirst | Fault::ResetBeforeFirst | Fault::KeepAlivesForever(_) => 0,
        Fault::StallAfter(n) | Fault::ResetAfter(n) => n,
        Fault::None => usize::MAX,
    };
    for event in stream.events.into_iter().take(cut) {
        if !stream.gap.is_zero() {
            steps.push_back(Step::Pause(stream.gap));
        }
        steps.push_back(Step::Send(event));
    }
    // The headers and events before a fault reach the client before it strikes.
    match stream.fault {
        Fault::StallBeforeFirst | Fault::StallAfter(_) => steps.extend([Step::Flush, Step::Stall]),
        Fault::ResetBeforeFirst | Fault::ResetAfter(_) => steps.extend([Step::Flush, Step::Reset]),
        Fault::KeepAlivesForever(every) => steps.push_back(Step::KeepAlive(every)),
        Fault::None => {}
    }
    steps
}

/// Counts a response as open until its body ends, fails or is dropped, or its
/// connection is killed; exactly once.
struct Open {
    connection: Option<Arc<Connection>>,
}

impl Open {
    fn close(&mut self, completed: bool) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        let mut state = connection.state();
        if !state.killed {
            state.open -= 1;
            connection.stats.open.fetch_sub(1, Ordering::SeqCst);
        }
        if completed {
            connection.stats.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.close(false);
    }
}

/// The upstream's response body: runs the planned steps.
pub struct MockBody {
    steps: VecDeque<Step>,
    pause: Option<Pin<Box<Sleep>>>,
    /// While stalled: resolves when the connection is killed.
    stalled: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    open: Open,
}

impl MockBody {
    fn new(steps: VecDeque<Step>, open: Open) -> Self {
        Self {
            steps,
            pause: None,
            stalled: None,
            open,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match self.steps.pop_front() {
                Some(Step::Pause(duration)) => {
                    self.pause = Some(Box::pin(tokio::time::sleep(duration)))
                }
                Some(Step::Send(bytes)) => {
                    if self.steps.is_empty() {
                        // Counted closed before the last bytes leave, so the client
                        // cannot see the end before the upstream does.
                        self.open.close(true);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Some(Step::Flush) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(Step::Stall) => {
                    // Stalled until the client leaves (and hyper drops this body) or
                    // the connection is killed.
                    let this = &mut *self;
                    // Still counted open, so still on its connection.
                    let connection = this.open.connection.clone();
                    let stalled = this.stalled.get_or_insert_with(|| {
                        Box::pin(async move {
                            match connection {
                                Some(connection) => connection.killed().await,
                                None => std::future::pending().await,
                            }
                        })
                    });
                    if stalled.as_mut().poll(cx).is_pending() {
                        this.steps.push_front(Step::Stall);
                        return Poll::Pending;
                    }
                    this.open.close(false);
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "connection killed",
                    ))));
                }
                Some(Step::KeepAlive(every)) => {
                    self.steps.push_front(Step::KeepAlive(every));
                    self.steps.push_front(Step::Pause(every));
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        b": keep-alive\n\n",
                    )))));
                }
                Some(Step::Reset) => {
                    self.open.close(false);
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "injected reset",
                    ))));
                }
                None => {
                    self.open.close(true);
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty() && self.pause.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // A body of bytes only has a known length: sent with Content-Length.
        let mut length = 0;
        for step in &self.steps {
            match step {
                Step::Send(bytes) => length += bytes.len() as u64,
                _ => return http_body::SizeHint::default(),
            }
        }
        http_body::SizeHint::with_exact(length)
    }
}
