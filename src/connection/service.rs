use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Uri;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::BoxError;
use tower_service::Service;

use super::{ConnectFuture, CountedIo};
use crate::metrics::ConnectionMetrics;

/// A connector (`Service<Uri>`) whose connections are counted open until their IO is
/// dropped, and optionally capped per host.
///
/// Made by [`ConnectionGaugeLayer`](super::ConnectionGaugeLayer); see the
/// [module docs](super) for the behaviour. Its responses are [`CountedIo`]s; its errors
/// are boxed, the inner connector's passing through unchanged (downcast them back).
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::{connect::HttpConnector, Client};
/// use hyper_util::rt::TokioExecutor;
/// use tower::Layer;
/// use tower_stream_backpressure::connection::ConnectionGauge;
/// use tower_stream_backpressure::ConnectionGaugeLayer;
///
/// let connector: ConnectionGauge<HttpConnector> =
///     ConnectionGaugeLayer::new().layer(HttpConnector::new());
/// assert_eq!(connector.open_connections(), 0);
/// // hyper-util's client connects through it.
/// let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
/// # drop(client);
/// ```
#[derive(Debug)]
pub struct ConnectionGauge<S> {
    inner: S,
    shared: Arc<Shared>,
    metrics: Arc<ConnectionMetrics>,
    /// Shared by this connector and its clones; dropped with the last of them, which
    /// ends the waits of their connects (nothing could use those connections).
    handles: Arc<watch::Sender<()>>,
}

/// What every connector made from one layer, and every clone of those, shares.
#[derive(Debug)]
pub(crate) struct Shared {
    max_per_host: Option<usize>,
    /// One semaphore of `max_per_host` permits per `host:port`, made on first use and
    /// forgotten when the host's last connection closes (and nobody waits for one).
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Connections open, as in `http_client_open_connections`.
    pub(crate) open: AtomicUsize,
}

impl Shared {
    pub(crate) fn new(max_per_host: Option<usize>) -> Self {
        Self {
            max_per_host,
            hosts: Mutex::default(),
            open: AtomicUsize::new(0),
        }
    }

    pub(crate) fn max_per_host(&self) -> Option<usize> {
        self.max_per_host
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The key and semaphore of `uri`'s host, `None` when there is no cap.
    fn host(&self, uri: &Uri) -> Option<(String, Arc<Semaphore>)> {
        let max = self.max_per_host?;
        let key = host_key(uri);
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let semaphore = hosts
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(max)));
        Some((key, semaphore.clone()))
    }

    /// Hosts with a semaphore now.
    #[cfg(test)]
    pub(crate) fn hosts(&self) -> usize {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Forgets `key`'s semaphore if nothing holds it but the map: no place taken, no
    /// connect waiting. (Every clone of it is made under this lock, so none can appear
    /// while it is looked at.)
    fn forget_if_unused(&self, key: &str) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts
            .get(key)
            .is_some_and(|host| Arc::strong_count(host) == 1)
        {
            hosts.remove(key);
        }
    }
}

/// A place on a host under the per-host cap, held by a connect and then by its
/// connection. Dropped, it frees the place, and the host is forgotten if nobody else
/// uses it, so that the map holds only hosts in use.
pub(crate) struct HostPlace {
    permit: Option<OwnedSemaphorePermit>,
    key: String,
    shared: Arc<Shared>,
}

impl HostPlace {
    pub(crate) fn new(permit: OwnedSemaphorePermit, key: String, shared: Arc<Shared>) -> Self {
        Self {
            permit: Some(permit),
            key,
            shared,
        }
    }
}

impl Drop for HostPlace {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.shared.forget_if_unused(&self.key);
    }
}

impl fmt::Debug for HostPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HostPlace").field(&self.key).finish()
    }
}

/// `host:port` of `uri`, the host lowercased, the port the scheme's default when absent
/// (443 for `https`/`wss`, otherwise 80).
fn host_key(uri: &Uri) -> String {
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https" | "wss") => 443,
        _ => 80,
    });
    format!("{host}:{port}")
}

impl<S: Clone> Clone for ConnectionGauge<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
            handles: self.handles.clone(),
        }
    }
}

impl<S> ConnectionGauge<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, metrics: Arc<ConnectionMetrics>) -> Self {
        Self {
            inner,
            shared,
            metrics,
            handles: Arc::new(watch::Sender::new(())),
        }
    }

    /// Connections open now, made through any connector of the same layer.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let connector = ConnectionGaugeLayer::new().layer(HttpConnector::new());
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let io = connector.clone().oneshot(uri).await?;
    /// assert_eq!(connector.open_connections(), 1);
    /// drop(io);
    /// assert_eq!(connector.open_connections(), 0);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections()
    }

    /// The inner connector.
    ///
    /// A connection made through it is not counted.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let connector = ConnectionGaugeLayer::new().layer(HttpConnector::new());
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let _io = connector.get_ref().clone().oneshot(uri).await?;
    /// assert_eq!(connector.open_connections(), 0);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner connector, mutably.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let mut connector = ConnectionGaugeLayer::new().layer(HttpConnector::new());
    /// connector.get_mut().set_nodelay(true);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let io = connector.oneshot(uri).await?;
    /// assert!(io.get_ref().inner().nodelay()?);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes this connector, returning the inner one.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new();
    /// let connector: HttpConnector = layer.layer(HttpConnector::new()).into_inner();
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let _io = connector.oneshot(uri).await?;
    /// assert_eq!(layer.open_connections(), 0, "not counted");
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Uri> for ConnectionGauge<S>
where
    S: Service<Uri> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = CountedIo<S::Response>;
    type Error = BoxError;
    type Future = ConnectFuture<S>;

    /// Only asks the inner connector: the host's place is taken in
    /// [`call`](Service::call), once the destination is known.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (shared, metrics) = (self.shared.clone(), self.metrics.clone());
        let Some((key, host)) = shared.host(&uri) else {
            return ConnectFuture::connecting(self.inner.call(uri), None, shared, metrics);
        };
        // Fast path: a place is free (never ahead of queued connects: the semaphore
        // hands released permits to waiters first).
        if let Ok(permit) = host.clone().try_acquire_owned() {
            let place = HostPlace::new(permit, key, shared.clone());
            return ConnectFuture::connecting(self.inner.call(uri), Some(place), shared, metrics);
        }
        // Slow path: queue, with a clone of the inner connector that is not ready (see
        // `park`). The ready one stays here, for this connector's next call.
        let parked = self.inner.clone();
        let handles = self.handles.subscribe();
        ConnectFuture::waiting((key, host), handles, parked, uri, shared, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConnectionGaugeLayer;
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;
    use tower::{Layer, ServiceExt};

    /// An IO that does nothing.
    #[derive(Debug)]
    struct NullIo;

    impl hyper::rt::Read for NullIo {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl hyper::rt::Write for NullIo {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl hyper_util::client::legacy::connect::Connection for NullIo {
        fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
            hyper_util::client::legacy::connect::Connected::new().proxy(true)
        }
    }

    /// A connector that connects to any host whose name does not start with "down",
    /// and counts its calls.
    #[derive(Clone, Default)]
    struct Connector {
        calls: Arc<AtomicUsize>,
        /// Connects stay pending while this is set.
        hang: bool,
    }

    impl Service<Uri> for Connector {
        type Response = NullIo;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<NullIo>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, uri: Uri) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let hang = self.hang;
            Box::pin(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                if uri.host().is_some_and(|host| host.starts_with("down")) {
                    return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
                }
                Ok(NullIo)
            })
        }
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    struct Noop;

    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }

    /// Whether `future` is still pending after one poll.
    fn pending<F: Future + Unpin>(future: &mut F) -> bool {
        let waker = std::task::Waker::from(Arc::new(Noop));
        Pin::new(future)
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    }

    #[tokio::test]
    async fn counts_each_connection_until_its_io_drops() {
        let layer = ConnectionGaugeLayer::new();
        let connector = layer.layer(Connector::default());
        let a = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        let b = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        assert_eq!(layer.open_connections(), 2);
        assert_eq!(connector.open_connections(), 2);
        assert!(hyper_util::client::legacy::connect::Connection::connected(&a).is_proxied());
        drop(a);
        assert_eq!(layer.open_connections(), 1);
        drop(b);
        assert_eq!(layer.open_connections(), 0);
    }

    #[tokio::test]
    async fn a_failed_connect_counts_nothing_and_frees_its_place() {
        let layer = ConnectionGaugeLayer::new().max_per_host(1);
        let connector = layer.layer(Connector::default());
        for _ in 0..3 {
            let error = connector.clone().oneshot(uri("http://down/")).await;
            let error = error.unwrap_err().downcast::<io::Error>().unwrap();
            assert_eq!(
                error.kind(),
                io::ErrorKind::ConnectionRefused,
                "the inner error, unchanged"
            );
            assert_eq!(layer.open_connections(), 0);
        }
    }

    #[tokio::test]
    async fn at_the_cap_a_connect_waits_for_a_connection_of_its_host_to_close() {
        let inner = Connector::default();
        let connector = ConnectionGaugeLayer::new()
            .max_per_host(2)
            .layer(inner.clone());
        let a1 = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        // The same host and port, spelled differently.
        let a2 = connector
            .clone()
            .oneshot(uri("http://A:80/"))
            .await
            .unwrap();
        let mut a3 = connector.clone().oneshot(uri("http://a/x"));
        assert!(pending(&mut a3), "a is at its cap");
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2, "a3 did not connect");
        // Other hosts (another port is another host) have their own places.
        let b = connector
            .clone()
            .oneshot(uri("http://a:8080/"))
            .await
            .unwrap();
        let c = connector.clone().oneshot(uri("https://a/")).await.unwrap();
        assert_eq!(connector.open_connections(), 4);
        drop(a1);
        let a3 = a3.await.unwrap();
        assert_eq!(connector.open_connections(), 4);
        drop((a2, a3, b, c));
        assert_eq!(connector.open_connections(), 0);
    }

    #[tokio::test]
    async fn a_connect_dropped_while_waiting_or_connecting_frees_its_place() {
        let layer = ConnectionGaugeLayer::new().max_per_host(1);
        let hanging = layer.layer(Connector {
            hang: true,
            ..Connector::default()
        });
        let connector = layer.layer(Connector::default());

        let mut connecting = hanging.clone().oneshot(uri("http://a/"));
        assert!(pending(&mut connecting));
        let mut waiting = connector.clone().oneshot(uri("http://a/"));
        assert!(pending(&mut waiting), "the hanging connect holds the place");
        drop(connecting);
        drop(waiting);
        assert_eq!(layer.open_connections(), 0);

        let io = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        assert_eq!(layer.open_connections(), 1);
        drop(io);
        assert_eq!(layer.open_connections(), 0);
    }

    #[tokio::test]
    async fn a_waiting_connect_gives_up_once_its_connector_and_every_clone_are_gone() {
        let layer = ConnectionGaugeLayer::new().max_per_host(1);
        let connector = layer.layer(Connector::default());
        let held = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        let clone = connector.clone();
        let mut waiting = connector.clone().oneshot(uri("http://a/"));
        assert!(pending(&mut waiting));
        drop(connector);
        assert!(pending(&mut waiting), "a clone is left");
        drop(clone);
        let error = waiting.await.unwrap_err();
        assert!(error.to_string().contains("abandoned"), "{error}");
        assert_eq!(
            layer.open_connections(),
            1,
            "the open connection is unaffected"
        );
        drop(held);
        assert_eq!(layer.open_connections(), 0);
    }

    #[test]
    fn host_keys() {
        assert_eq!(host_key(&uri("http://Example.COM/x")), "example.com:80");
        assert_eq!(host_key(&uri("https://example.com")), "example.com:443");
        assert_eq!(
            host_key(&uri("http://example.com:8080")),
            "example.com:8080"
        );
        assert_eq!(host_key(&uri("http://[::1]:9000/")), "[::1]:9000");
    }

    #[tokio::test]
    async fn a_host_is_forgotten_once_its_last_connection_closes() {
        let layer = ConnectionGaugeLayer::new().max_per_host(2);
        let connector = layer.layer(Connector::default());
        let hosts = || connector.shared.hosts();
        let a1 = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        let a2 = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        let b = connector.clone().oneshot(uri("http://b/")).await.unwrap();
        assert_eq!(hosts(), 2);
        drop(a1);
        assert_eq!(hosts(), 2, "a still has a connection");
        drop(a2);
        assert_eq!(hosts(), 1, "a is forgotten");
        // A failed connect leaves nothing behind either.
        let _ = connector
            .clone()
            .oneshot(uri("http://down/"))
            .await
            .unwrap_err();
        assert_eq!(hosts(), 1);
        drop(b);
        assert_eq!(hosts(), 0);
        // A host that comes back gets its cap again.
        let _c1 = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        let _c2 = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        let mut third = connector.clone().oneshot(uri("http://a/"));
        assert!(pending(&mut third), "the cap holds for the host come back");
    }

    /// A connector whose `poll_ready` takes the one place of a shared gate until its
    /// call, as tower's `Buffer` does with its channel (and, like it, a clone starts
    /// unready).
    struct Gated {
        gate: Arc<Semaphore>,
        held: Option<OwnedSemaphorePermit>,
    }

    impl Clone for Gated {
        fn clone(&self) -> Self {
            Self {
                gate: self.gate.clone(),
                held: None,
            }
        }
    }

    impl Service<Uri> for Gated {
        type Response = NullIo;
        type Error = io::Error;
        type Future = std::future::Ready<io::Result<NullIo>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.held.is_none() {
                match self.gate.clone().try_acquire_owned() {
                    Ok(permit) => self.held = Some(permit),
                    Err(_) => return Poll::Pending,
                }
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            self.held = None;
            std::future::ready(Ok(NullIo))
        }
    }

    #[tokio::test]
    async fn a_connect_waiting_for_a_place_holds_no_readiness_of_the_connector() {
        let gate = Arc::new(Semaphore::new(1));
        let layer = ConnectionGaugeLayer::new().max_per_host(1);
        let connector = layer.layer(Gated {
            gate: gate.clone(),
            held: None,
        });
        let held = connector.clone().oneshot(uri("http://a/")).await.unwrap();
        // Waits for a's place: the readiness it was polled to is not parked with it.
        let mut waiting = connector.clone().oneshot(uri("http://a/"));
        assert!(pending(&mut waiting));
        assert_eq!(
            gate.available_permits(),
            1,
            "nothing reserved while waiting"
        );
        // Another host's connect goes through the gate meanwhile.
        let _b = connector.clone().oneshot(uri("http://b/")).await.unwrap();
        drop(held);
        let _a = waiting.await.unwrap();
    }

    #[tokio::test]
    #[should_panic(expected = "ConnectFuture polled after completion")]
    async fn a_connect_future_polled_after_it_returned_panics() {
        let mut connector = ConnectionGaugeLayer::new().layer(Connector::default());
        let future = connector.ready().await.unwrap().call(uri("http://a/"));
        let mut future = std::pin::pin!(future);
        let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
        let _ = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
    }
}
