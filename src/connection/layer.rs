use std::borrow::Cow;
use std::sync::Arc;

use opentelemetry::metrics::Meter;
use tokio::sync::Semaphore;
use tower_layer::Layer;

use super::ConnectionGauge;
use super::service::Shared;
use crate::ConfigError;
use crate::metrics::{ConnectionMetrics, Telemetry};

/// Applies [`ConnectionGauge`] to a connector: every connection it makes is counted in
/// `http_client_open_connections` until its IO is dropped, and, with
/// [`max_per_host`](Self::max_per_host), at most that many are open to one host.
///
/// Every connector made from one layer, and every clone of those, shares the count and
/// the per-host caps.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::{connect::HttpConnector, Client};
/// use hyper_util::rt::TokioExecutor;
/// use tower::Layer;
/// use tower_stream_backpressure::ConnectionGaugeLayer;
///
/// let connections = ConnectionGaugeLayer::new().max_per_host(8).provider("openai");
/// let client = Client::builder(TokioExecutor::new())
///     .build::<_, Full<Bytes>>(connections.layer(HttpConnector::new()));
/// assert_eq!(connections.open_connections(), 0);
/// # drop(client);
/// ```
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct ConnectionGaugeLayer {
    shared: Arc<Shared>,
    telemetry: Telemetry<ConnectionMetrics>,
}

impl Default for ConnectionGaugeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectionGaugeLayer {
    /// Counts connections, with no cap.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new();
    /// let connector = layer.layer(HttpConnector::new());
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    ///
    /// let io = connector.oneshot(uri).await?;
    /// assert_eq!(layer.open_connections(), 1);
    /// drop(io); // what hyper-util does when the connection closes
    /// assert_eq!(layer.open_connections(), 0);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared::new(None)),
            telemetry: Telemetry::default(),
        }
    }

    /// At most `max` connections open to one host (`host:port`) at once; a connect
    /// beyond that waits, in FIFO order, until a connection to that host is dropped.
    /// See the [module docs](super#at-the-cap) for what hyper-util's pool does
    /// meanwhile.
    ///
    /// The returned layer has places and a count of its own, shared by the connectors
    /// made from it: set this before building connectors.
    ///
    /// # Panics
    ///
    /// When `max` is 0 or above [`Semaphore::MAX_PERMITS`]. To have no cap, do not
    /// call this. Use [`try_max_per_host`](Self::try_max_per_host) for a value read
    /// from configuration.
    ///
    /// ```
    /// use std::time::Duration;
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new().max_per_host(1);
    /// let connector = layer.layer(HttpConnector::new());
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    ///
    /// let first = connector.clone().oneshot(uri.clone()).await?;
    /// // A second connection to the same host waits for the first to close (while
    /// // the connector, or a clone, is alive to use it).
    /// let mut second = std::pin::pin!(connector.clone().oneshot(uri));
    /// assert!(tokio::time::timeout(Duration::from_millis(50), &mut second).await.is_err());
    /// drop(first);
    /// let _second = second.await?;
    /// assert_eq!(layer.open_connections(), 1);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn max_per_host(self, max: usize) -> Self {
        self.try_max_per_host(max)
            .unwrap_or_else(|error| panic!("ConnectionGaugeLayer: {error}"))
    }

    /// Like [`max_per_host`](Self::max_per_host), but returns an error for a value out
    /// of range.
    ///
    /// ```
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let error = ConnectionGaugeLayer::new().try_max_per_host(0).unwrap_err();
    /// assert_eq!(error.setting(), "max_per_host");
    /// assert!(ConnectionGaugeLayer::new().try_max_per_host(4).is_ok());
    /// ```
    pub fn try_max_per_host(self, max: usize) -> Result<Self, ConfigError> {
        if max == 0 {
            return Err(ConfigError::new(
                "max_per_host",
                "must be at least 1 (0 is not unlimited: to have no cap, leave it unset)",
            ));
        }
        if max > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "max_per_host",
                format!("must be at most {}, got {max}", Semaphore::MAX_PERMITS),
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared::new(Some(max))),
            ..self
        })
    }

    /// The `provider` attribute of this layer's metrics (default `"unknown"`). See
    /// [`metrics`](crate::metrics) for reading them back.
    ///
    /// ```
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new().provider("openai");
    /// # let _ = layer;
    /// ```
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        Self {
            telemetry: self.telemetry.with_provider(provider),
            ..self
        }
    }

    /// The meter this layer records to (default: the global meter provider's, taken
    /// when the layer first builds a service). See [`metrics`](crate::metrics) for an
    /// SDK meter provider read back in a test.
    ///
    /// ```
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new().meter(opentelemetry::global::meter("my-client"));
    /// # let _ = layer;
    /// ```
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            telemetry: self.telemetry.with_meter(meter),
            ..self
        }
    }

    /// The per-host cap, `None` when there is none.
    ///
    /// ```
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// assert_eq!(ConnectionGaugeLayer::new().get_max_per_host(), None);
    /// assert_eq!(ConnectionGaugeLayer::new().max_per_host(16).get_max_per_host(), Some(16));
    /// ```
    pub fn get_max_per_host(&self) -> Option<usize> {
        self.shared.max_per_host()
    }

    /// Connections open now (made and not yet dropped) through every connector made
    /// from this layer: the value of `http_client_open_connections`.
    ///
    /// ```
    /// use hyper_util::client::legacy::connect::HttpConnector;
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_backpressure::ConnectionGaugeLayer;
    ///
    /// let layer = ConnectionGaugeLayer::new();
    /// // Two connectors made from one layer share the count.
    /// let (a, b) = (layer.layer(HttpConnector::new()), layer.layer(HttpConnector::new()));
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let uri: http::Uri = format!("http://{}", listener.local_addr()?).parse()?;
    /// let _one = a.oneshot(uri.clone()).await?;
    /// let _two = b.oneshot(uri).await?;
    /// assert_eq!(layer.open_connections(), 2);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections()
    }
}

impl<S> Layer<S> for ConnectionGaugeLayer {
    type Service = ConnectionGauge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let metrics = self.telemetry.instruments(ConnectionMetrics::new);
        ConnectionGauge::new(inner, self.shared.clone(), metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_of_zero_is_refused() {
        let error = ConnectionGaugeLayer::new().try_max_per_host(0).unwrap_err();
        assert_eq!(error.setting(), "max_per_host");
        assert!(error.to_string().contains("leave it unset"), "{error}");
        let error = ConnectionGaugeLayer::new()
            .try_max_per_host(Semaphore::MAX_PERMITS + 1)
            .unwrap_err();
        assert_eq!(error.setting(), "max_per_host");
        let layer = ConnectionGaugeLayer::new().max_per_host(3);
        assert_eq!(layer.get_max_per_host(), Some(3));
        assert_eq!(ConnectionGaugeLayer::default().get_max_per_host(), None);
    }

    #[test]
    #[should_panic(expected = "invalid `max_per_host`: must be at least 1")]
    fn max_per_host_panics_on_zero() {
        let _ = ConnectionGaugeLayer::new().max_per_host(0);
    }
}
