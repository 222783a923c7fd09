//! A mock LLM upstream on 127.0.0.1: HTTP/1.1 and HTTP/2 (prior knowledge) on one
//! port, or over TLS (HTTP/2 or HTTP/1.1 by ALPN), streaming SSE, with faults injected
//! per request by a script, and its own count of what it saw (connections, hits, open
//! streams, peak open streams, answers by status). A script sees the streams open at a
//! request's arrival, so that an upstream of limited capacity can answer from that
//! count ([`Capacity`]).
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
    /// Responses open on the upstream when this request arrived, this one not counted
    /// (see [`Upstream::open_streams`]).
    pub open: u64,
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
    /// Response headers beside the content type.
    pub headers: Vec<(&'static str, String)>,
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
            headers: Vec::new(),
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

    /// Adds a response header (to a `Status` or a `Stream` reply).
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        if let Reply::Status { headers, .. } | Reply::Stream(Stream { headers, .. }) = &mut self {
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

/// An upstream of limited capacity, as a deployment that serves so many streams at once
/// and queues the rest: how it answers a request follows from the streams open at the
/// request's arrival ([`Hit::open`]), this one included, against the capacity `c` in
/// force then.
///
/// - Up to `c` streams: the first event after `first_event`.
/// - Beyond `c`, up to `refuse_over * c`: later in proportion to the excess, by
///   `per_excess` for each `c` streams over (`n` streams: `first_event + per_excess *
///   (n - c) / c`).
/// - Beyond that: `429` with `Retry-After: 1`.
///
/// A stream then sends its other events `gap` apart: `tokens` content events in all and
/// `data: [DONE]`, so it lasts `tokens * gap` past its first chunk.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure_testkit::upstream::{Capacity, Reply};
///
/// let capacity = Capacity {
///     first_event: Duration::from_millis(200),
///     per_excess: Duration::from_millis(1200),
///     refuse_over: 1.5,
///     tokens: 20,
///     gap: Duration::from_millis(50),
/// };
/// // Within capacity: 200 ms.
/// assert_eq!(capacity.first_event_delay(10, 9), Some(Duration::from_millis(200)));
/// // The 15th stream at a capacity of 10 waits 200 ms + 1.2 s * 5 / 10.
/// assert_eq!(capacity.first_event_delay(10, 14), Some(Duration::from_millis(800)));
/// assert!(matches!(capacity.reply(10, 14), Reply::Stream(_)));
/// // The 16th is over 1.5 times the capacity: refused.
/// assert_eq!(capacity.first_event_delay(10, 15), None);
/// assert!(matches!(capacity.reply(10, 15), Reply::Status { .. }));
/// assert_eq!(capacity.stream_length(), Duration::from_millis(1200));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// The first event's delay while the open streams are within capacity. At least
    /// `gap`.
    pub first_event: Duration,
    /// Added to the first event's delay for each capacity's worth of streams over it.
    pub per_excess: Duration,
    /// Beyond this many times the capacity, a request gets `429` with `Retry-After: 1`.
    pub refuse_over: f64,
    /// Content events a stream sends, its first chunk included.
    pub tokens: usize,
    /// The pause before each event after the first.
    pub gap: Duration,
}

impl Capacity {
    /// The delay of the first event for a request that finds `open` streams open at a
    /// capacity of `capacity` (0 counts as 1), or `None` when it is refused.
    pub fn first_event_delay(&self, capacity: u64, open: u64) -> Option<Duration> {
        let (n, c) = (open + 1, capacity.max(1));
        if n as f64 > self.refuse_over * c as f64 {
            return None;
        }
        let excess = self.per_excess.as_nanos() * u128::from(n.saturating_sub(c)) / u128::from(c);
        Some(self.first_event + Duration::from_nanos(excess as u64))
    }

    /// The answer to a request that finds `open` streams open at a capacity of
    /// `capacity`: a stream whose first event comes after
    /// [`first_event_delay`](Self::first_event_delay), or the `429`.
    pub fn reply(&self, capacity: u64, open: u64) -> Reply {
        match self.first_event_delay(capacity, open) {
            // The plan pauses `gap` before every event, the first included.
            Some(delay) => Reply::tokens(self.tokens)
                .gap(self.gap)
                .first_event_after(delay.saturating_sub(self.gap)),
            None => Reply::status(429).header("retry-after", "1"),
        }
    }

    /// How long a stream lasts within capacity: its first event, then the others.
    pub fn stream_length(&self) -> Duration {
        self.first_event + self.gap * self.tokens as u32
    }
}

/// A provider's limit on requests, as OpenAI reports it: `requests` in each fixed
/// `window` from `start`. Every answer carries `x-ratelimit-limit-requests`,
/// `x-ratelimit-remaining-requests` (what is left after this request) and
/// `x-ratelimit-reset-requests` (the time to the window's end, as a Go duration: `6m0s`,
/// `12.5s`, `20ms`); a request beyond the limit gets `429` with the same headers and
/// `retry-after`, the whole seconds to the reset rounded up.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure_testkit::upstream::{RateLimit, Reply};
///
/// let limit = RateLimit::new(2, Duration::from_secs(60), tokio::time::Instant::now());
/// let header = |headers: &[(&str, String)], name: &str| {
///     headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()).unwrap()
/// };
/// for remaining in ["1", "0"] {
///     let Reply::Stream(stream) = limit.reply(Reply::tokens(1)) else { panic!("allowed") };
///     assert_eq!(header(&stream.headers, "x-ratelimit-remaining-requests"), remaining);
///     // A minute to the window's end, or just under: `59.99...s`.
///     let reset = header(&stream.headers, "x-ratelimit-reset-requests");
///     assert!(reset == "1m0s" || reset.starts_with("59."), "{reset}");
/// }
/// let Reply::Status { status, headers, .. } = limit.reply(Reply::tokens(1)) else {
///     panic!("refused")
/// };
/// assert_eq!(status, 429);
/// assert_eq!(header(&headers, "retry-after"), "60");
/// assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
/// ```
#[derive(Debug)]
pub struct RateLimit {
    requests: u64,
    window: Duration,
    start: tokio::time::Instant,
    /// The current window's number from `start`, and the requests counted in it.
    used: Mutex<(u64, u64)>,
}

impl RateLimit {
    /// `requests` in each `window` from `start`.
    pub fn new(requests: u64, window: Duration, start: tokio::time::Instant) -> Self {
        Self {
            requests,
            window,
            start,
            used: Mutex::new((0, 0)),
        }
    }

    /// Counts a request arriving now: `allowed` with the rate-limit headers added, or
    /// the `429` when the window's requests are spent.
    pub fn reply(&self, allowed: Reply) -> Reply {
        let elapsed = self.start.elapsed();
        let window = self.window.as_nanos().max(1);
        let index = (elapsed.as_nanos() / window) as u64;
        let ends = Duration::from_nanos(((u128::from(index) + 1) * window) as u64);
        let reset = ends.saturating_sub(elapsed);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.0 != index {
            *used = (index, 0);
        }
        let admitted = used.1 < self.requests;
        used.1 += u64::from(admitted);
        let remaining = self.requests - used.1;
        drop(used);
        let reply = if admitted {
            allowed
        } else {
            let secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
            Reply::status(429).header("retry-after", secs.max(1).to_string())
        };
        reply
            .header("x-ratelimit-limit-requests", self.requests.to_string())
            .header("x-ratelimit-remaining-requests", remaining.to_string())
            .header("x-ratelimit-reset-requests", go_duration(reset))
    }
}

/// A duration as Go prints it (`time.Duration`'s `String`), as OpenAI's reset headers
/// are.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_backpressure_testkit::upstream::go_duration;
///
/// assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
/// assert_eq!(go_duration(Duration::from_millis(12_500)), "12.5s");
/// assert_eq!(go_duration(Duration::from_millis(3_723_500)), "1h2m3.5s");
/// assert_eq!(go_duration(Duration::from_millis(20)), "20ms");
/// assert_eq!(go_duration(Duration::from_micros(1_500)), "1.5ms");
/// assert_eq!(go_duration(Duration::from_nanos(7)), "7ns");
/// assert_eq!(go_duration(Duration::ZERO), "0s");
/// ```
pub fn go_duration(duration: Duration) -> String {
    // `whole` units and `nanos` billionths of one (at most nine digits), trailing zeros
    // dropped.
    fn decimal(whole: u64, nanos: u32, digits: usize) -> String {
        let fraction = format!("{nanos:09}");
        let fraction = fraction[..digits].trim_end_matches('0');
        match fraction {
            "" => whole.to_string(),
            fraction => format!("{whole}.{fraction}"),
        }
    }
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        let fraction = ((nanos % 1_000) * 1_000_000) as u32;
        return format!("{}µs", decimal((nanos / 1_000) as u64, fraction, 3));
    }
    if nanos < 1_000_000_000 {
        let fraction = ((nanos % 1_000_000) * 1_000) as u32;
        return format!("{}ms", decimal((nanos / 1_000_000) as u64, fraction, 6));
    }
    let secs = duration.as_secs();
    let seconds = decimal(secs % 60, duration.subsec_nanos(), 9);
    match (secs / 3600, secs / 60 % 60) {
        (0, 0) => format!("{seconds}s"),
        (0, minutes) => format!("{minutes}m{seconds}s"),
        (hours, minutes) => format!("{hours}h{minutes}m{seconds}s"),
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
    /// Answers by status, in the order each status was first sent.
    statuses: Mutex<Vec<(StatusCode, u64)>>,
}

impl Stats {
    fn answered(&self, status: StatusCode) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        match statuses.iter_mut().find(|(seen, _)| *seen == status) {
            Some((_, count)) => *count += 1,
            None => statuses.push((status, 1)),
        }
    }
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

    /// Responses sent with `status` (a [`Reply::Stream`] is a `200`); requests that got
    /// no answer (dropped, reset, hung) count under none.
    pub fn answers_with(&self, status: u16) -> u64 {
        let statuses = self
            .stats
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        statuses
            .iter()
            .find(|(seen, _)| seen.as_u16() == status)
            .map_or(0, |(_, count)| *count)
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
        open: connection.stats.open.load(Ordering::SeqCst),
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
            connection.stats.answered(status);
            let mut response = Response::new(MockBody::new(steps, open));
            *response.status_mut() = status;
            append_headers(&mut response, headers);
            Ok(response)
        }
        Reply::Stream(mut stream) => {
            connection.stats.answered(StatusCode::OK);
            let content_type = stream.content_type;
            let headers = std::mem::take(&mut stream.headers);
            let mut response = Response::new(MockBody::new(plan(stream), open));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            append_headers(&mut response, headers);
            Ok(response)
        }
    }
}

/// Appends `headers` to `response`, leaving out a value that is not a valid header.
fn append_headers(response: &mut Response<MockBody>, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().append(name, value);
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
