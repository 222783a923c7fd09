//! An HTTP/2 upstream written on the `h2` crate directly, for the faults hyper's server
//! cannot produce on purpose: a stream refused with `REFUSED_STREAM`, and a connection
//! that goes away (GOAWAY) with a stream on it, or before any.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use h2::Reason;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How the upstream treats one request, or the connection it came on.
#[derive(Debug, Clone)]
pub enum H2Reply {
    /// `200 text/event-stream` with these events, then the end.
    Events(Vec<Bytes>),
    /// Reset the stream with `REFUSED_STREAM`: the server did not process it.
    Refuse,
    /// Send GOAWAY whose last stream id covers this stream, and close the connection.
    GoAwayCovering,
}

/// What the upstream does with a new connection, before any stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Connection {
    /// Serve its streams.
    Serve,
    /// Once the client's first stream has arrived, send GOAWAY with last stream id 0,
    /// and keep the connection open: the stream is above the last stream id, so the
    /// client knows no stream on the connection was processed. (Written frame by frame:
    /// the `h2` server cannot send a GOAWAY below a stream it has read.)
    GoAwayFirst,
}

type Script = dyn Fn(u64) -> H2Reply + Send + Sync;
type ConnectionScript = dyn Fn(u64) -> H2Connection + Send + Sync;

/// A raw HTTP/2 (prior knowledge) upstream on 127.0.0.1.
pub struct RawH2 {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

impl RawH2 {
    /// Serves each request (numbered from 0) as `script` says, and each connection
    /// (numbered from 0) as `connection` says.
    pub async fn start(
        connection: impl Fn(u64) -> H2Connection + Send + Sync + 'static,
        script: impl Fn(u64) -> H2Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let server = tokio::spawn(serve(
            listener,
            Arc::new(connection),
            Arc::new(script),
            hits.clone(),
            connections.clone(),
        ));
        Self {
            addr,
            hits,
            connections,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests that reached the server (a refused one included).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(
    listener: TcpListener,
    on_connection: Arc<ConnectionScript>,
    script: Arc<Script>,
    hits: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
) {
    crate::accept_each(listener, move |tcp| {
        let _ = tcp.set_nodelay(true);
        let index = connections.fetch_add(1, Ordering::SeqCst);
        let mode = on_connection(index);
        let (script, hits) = (script.clone(), hits.clone());
        async move {
            if mode == H2Connection::GoAwayFirst {
                let _ = go_away_below_first_stream(tcp).await;
                return;
            }
            let Ok(mut connection) = h2::server::handshake(tcp).await else {
                return;
            };
            let mut streams = JoinSet::new();
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                let reply = script(hits.fetch_add(1, Ordering::SeqCst));
                match reply {
                    H2Reply::Refuse => respond.send_reset(Reason::REFUSED_STREAM),
                    H2Reply::GoAwayCovering => connection.abrupt_shutdown(Reason::NO_ERROR),
                    H2Reply::Events(events) => {
                        streams.spawn(async move {
                            let head = http::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(())
                                .expect("a valid head");
                            let Ok(mut send) = respond.send_response(head, false) else {
                                return;
                            };
                            for event in events {
                                if send.send_data(event, false).is_err() {
                                    return;
                                }
                            }
                            let _ = send.send_data(Bytes::new(), true);
                        });
                    }
                }
            }
        }
    })
    .await;
}

/// Frame types and flags of RFC 9113 §6.
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// A frame: 9-byte header (24-bit length, type, flags, stream id), then the payload.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("a small frame")
        .to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// The server side of [`H2Connection::GoAwayFirst`]: its SETTINGS, then, once a HEADERS
/// frame has come, a SETTINGS ack and GOAWAY (last stream id 0, `NO_ERROR`); then it
/// reads until the client closes.
async fn go_away_below_first_stream(mut tcp: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    tcp.write_all(&frame(SETTINGS, 0, &[])).await?;
    let mut preface = [0; 24];
    tcp.read_exact(&mut preface).await?;
    loop {
        let mut header = [0; 9];
        tcp.read_exact(&mut header).await?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; length];
        tcp.read_exact(&mut payload).await?;
        if header[3] == HEADERS {
            break;
        }
    }
    let mut reply = frame(SETTINGS, ACK, &[]);
    // Last stream id 0, error code 0 (`NO_ERROR`).
    reply.extend(frame(GOAWAY, 0, &[0; 8]));
    tcp.write_all(&reply).await?;
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await?;
    Ok(())
}
