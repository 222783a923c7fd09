use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use super::service::{HostPlace, Shared};
use crate::metrics::ConnectionMetrics;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use pin_project_lite::pin_project;

/// One open connection: its count in `http_client_open_connections` and in
/// [`open_connections`](super::ConnectionGaugeLayer::open_connections), and its host's
/// permit when there is a per-host cap.
///
/// Made only when a connect succeeds (that is when the count goes up); dropping it
/// lowers the count and returns the permit. It is dropped exactly once, with the
/// [`CountedIo`] that carries it.
pub(crate) struct OpenConnection {
    shared: Arc<Shared>,
    metrics: Arc<ConnectionMetrics>,
    _place: Option<HostPlace>,
}

impl OpenConnection {
    pub(crate) fn new(
        shared: Arc<Shared>,
        metrics: Arc<ConnectionMetrics>,
        place: Option<HostPlace>,
    ) -> Self {
        shared.open.fetch_add(1, Ordering::Relaxed);
        metrics.opened();
        Self {
            shared,
            metrics,
            _place: place,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.closed();
    }
}

impl fmt::Debug for OpenConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OpenConnection")
    }
}

pin_project! {
    /// The IO of a connection made through [`ConnectionGauge`](super::ConnectionGauge):
    /// the connector's IO, counted open until this value is dropped.
    ///
    /// Reads, writes, shutdown and [`Connection::connected`] go to the inner IO
    /// unchanged. Dropping it (hyper-util drops a connection's IO when the connection
    /// closes: the peer or an error ended it, the pool evicted it, or the client and
    /// every request on it are gone) lowers `http_client_open_connections` by one and,
    /// with [`max_per_host`](super::ConnectionGaugeLayer::max_per_host), frees a place
    /// for the next connection to the same host.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use hyper_util::rt::TokioIo;
    /// use tokio::net::TcpStream;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::connection::CountedIo;
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new();
    /// let connector = layer.layer(HttpConnector::new());
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let io: CountedIo<TokioIo<TcpStream>> = connector.oneshot(uri).await?;
    /// assert_eq!(layer.open_connections(), 1);
    /// drop(io);
    /// assert_eq!(layer.open_connections(), 0);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[derive(Debug)]
    pub struct CountedIo<T> {
        #[pin]
        inner: T,
        open: OpenConnection,
    }
}

impl<T> CountedIo<T> {
    pub(crate) fn new(inner: T, open: OpenConnection) -> Self {
        Self { inner, open }
    }

    /// The inner IO.
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
    /// let io = connector.oneshot(uri).await?;
    /// assert_eq!(io.get_ref().inner().peer_addr()?, listener.local_addr()?);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The inner IO, mutably.
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
    /// let mut io = connector.oneshot(uri).await?;
    /// io.get_mut().inner_mut().set_nodelay(true)?;
    /// assert!(io.get_ref().inner().nodelay()?);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The inner IO, pinned.
    ///
    /// For IO wrappers that poll the connection themselves.
    ///
    /// ```
    /// use std::future::poll_fn;
    /// use std::pin::pin;
    /// use hyper::rt::Write;
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let connector = ConnectionGaugeLayer::new().layer(HttpConnector::new());
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let mut io = pin!(connector.oneshot(uri).await?);
    /// let written = poll_fn(|cx| io.as_mut().get_pin_mut().poll_write(cx, b"ping")).await?;
    /// assert_eq!(written, 4);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[must_use]
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut T> {
        self.project().inner
    }
}

impl<T: Read> Read for CountedIo<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: Write> Write for CountedIo<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection> Connection for CountedIo<T> {
    #[inline]
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ConnectionMetrics, Telemetry};
    use tokio::sync::Semaphore;

    fn shared() -> (Arc<Shared>, Arc<ConnectionMetrics>) {
        let metrics = Telemetry::default().instruments(ConnectionMetrics::new);
        (Arc::new(Shared::new(None)), metrics)
    }

    #[test]
    fn counted_once_when_made_and_once_when_dropped() {
        let (shared, metrics) = shared();
        let open = OpenConnection::new(shared.clone(), metrics.clone(), None);
        assert_eq!(shared.open_connections(), 1);
        let other = OpenConnection::new(shared.clone(), metrics, None);
        assert_eq!(shared.open_connections(), 2);
        drop(open);
        assert_eq!(shared.open_connections(), 1);
        drop(other);
        assert_eq!(shared.open_connections(), 0);
    }

    #[test]
    fn the_permit_goes_with_the_io() {
        let (shared, metrics) = shared();
        let host = Arc::new(Semaphore::new(1));
        let permit = host.clone().try_acquire_owned().unwrap();
        let place = HostPlace::new(permit, "a:80".to_owned(), shared.clone());
        let io = CountedIo::new(
            (),
            OpenConnection::new(shared.clone(), metrics, Some(place)),
        );
        assert_eq!(host.available_permits(), 0);
        assert_eq!(shared.open_connections(), 1);
        drop(io);
        assert_eq!(host.available_permits(), 1);
        assert_eq!(shared.open_connections(), 0);
    }
}
