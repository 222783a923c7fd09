//! What the tests, examples and benchmarks of `tower-stream-backpressure` share, none of
//! which needs the crate itself: a fault-injecting mock LLM upstream ([`upstream`]), an
//! HTTP/2 server on `h2` directly ([`raw_h2`]), a test certificate authority ([`tls`]),
//! hyper-util clients for both protocols, request builders, metrics read back through
//! the SDK and through Prometheus, the examples' flag parsing ([`flags`]), the
//! stacks from tower and tower-http the benchmarks measure ours against
//! ([`contenders`]), and what the paused-clock simulations share: steady arrivals, their
//! output files and plots ([`sim`]).
//!
//! Dev-only: never published.

pub mod contenders;
pub mod events;
pub mod flags;
pub mod process;
pub mod raw_h2;
pub mod sim;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use tower::BoxError;

pub use upstream::{Fault, Hit, Reply, Upstream};

/// Accepts connections on `listener` until this future is dropped (its task aborted),
/// running `connection` for each on a task of its own; the connection tasks end with
/// it. The one accept loop of the mock servers.
pub async fn accept_each<F, Fut>(listener: tokio::net::TcpListener, mut connection: F)
where
    F: FnMut(tokio::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Connection tasks live in the set: dropping it drops them all.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        connections.spawn(connection(tcp));
    }
}

/// The HTTP version a client speaks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): every stream on one connection.
    Http2,
}

pub const BOTH: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];

pub type HyperClient = Client<HttpConnector, Full<Bytes>>;

/// A hyper-util client, as a user of the crate would build one.
///
/// `TCP_NODELAY` is set, as it should be for streaming: without it, small writes wait
/// for the peer's delayed ACK (tens of milliseconds in real time, even on loopback).
pub fn client(protocol: Protocol) -> HyperClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    client_with(protocol, connector)
}

/// [`client`] over another connector.
pub fn client_with<C>(protocol: Protocol, connector: C) -> Client<C, Full<Bytes>>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut builder = Client::builder(TokioExecutor::new());
    if protocol == Protocol::Http2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// A name resolver for `HttpConnector` that never asks the network: its first
/// `failures` lookups fail as the system resolver fails for a name that does not
/// exist, and later ones answer 127.0.0.1.
#[derive(Clone, Debug, Default)]
pub struct LoopbackResolver {
    failures: u64,
    lookups: Arc<AtomicU64>,
}

impl LoopbackResolver {
    pub fn failing_first(failures: u64) -> Self {
        Self {
            failures,
            lookups: Arc::default(),
        }
    }

    /// Names looked up so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl tower::Service<Name> for LoopbackResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        let lookup = self.lookups.fetch_add(1, Ordering::SeqCst);
        std::future::ready(if lookup < self.failures {
            // What getaddrinfo reports for a name that does not exist.
            Err(io::Error::other(
                "failed to lookup address information: Name or service not known",
            ))
        } else {
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], 0))].into_iter())
        })
    }
}

/// A connector that fails its first connection with `failure()`, if given, as a TLS
/// connector fails its handshake before any byte of the request is written, then
/// connects as `inner` does; it counts the connections asked of it.
#[derive(Clone)]
pub struct FlakyConnector<C> {
    inner: C,
    failure: Option<fn() -> BoxError>,
    calls: Arc<AtomicU64>,
}

impl<C> FlakyConnector<C> {
    pub fn new(inner: C, failure: Option<fn() -> BoxError>) -> Self {
        Self {
            inner,
            failure,
            calls: Arc::default(),
        }
    }

    /// Connections asked for so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<C> tower::Service<Uri> for FlakyConnector<C>
where
    C: tower::Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    C::Response: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        match self.failure {
            Some(failure) if call == 0 => Box::pin(std::future::ready(Err(failure()))),
            _ => {
                let connecting = self.inner.call(uri);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// A streaming chat completion request to `url`.
pub fn post(url: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .expect("a valid request")
}

/// Reads a body to its end.
pub async fn read_to_end<B>(body: B) -> Result<Bytes, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    Ok(body.collect().await.map_err(Into::into)?.to_bytes())
}

/// A meter provider that records both into memory (read back with
/// [`Metrics::snapshot`]) and into a Prometheus registry (read back as text).
pub struct Metrics {
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
    registry: prometheus::Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .expect("a prometheus exporter");
        let provider = SdkMeterProvider::builder()
            // Exports only on `force_flush`.
            .with_reader(
                PeriodicReader::builder(exporter.clone())
                    .with_interval(Duration::from_secs(3600))
                    .build(),
            )
            .with_reader(prometheus)
            .build();
        Self {
            provider,
            exporter,
            registry,
        }
    }

    pub fn meter(&self) -> Meter {
        self.provider.meter("tests")
    }

    /// Every metric as of now.
    pub fn snapshot(&self) -> Snapshot {
        self.exporter.reset();
        self.provider.force_flush().expect("flush");
        let mut exported = self.exporter.get_finished_metrics().expect("metrics");
        Snapshot(exported.pop())
    }

    /// The Prometheus text exposition of every metric.
    pub fn prometheus_text(&self) -> String {
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut text,
        )
        .expect("encode");
        String::from_utf8(text).expect("utf-8")
    }
}

/// What the SDK exported at one point in time.
pub struct Snapshot(Option<ResourceMetrics>);

fn matches(point: impl Iterator<Item = KeyValue>, want: &[(&str, &str)]) -> bool {
    let have: Vec<KeyValue> = point.collect();
    want.iter().all(|(key, value)| {
        have.iter()
            .any(|kv| kv.key.as_str() == *key && kv.value.as_str() == *value)
    })
}

impl Snapshot {
    fn data(&self, name: &str) -> Option<&AggregatedMetrics> {
        self.0
            .as_ref()?
            .scope_metrics()
            .flat_map(|scope| scope.metrics())
            .find(|metric| metric.name() == name)
            .map(|metric| metric.data())
    }

    /// The value of a gauge data point whose attributes include `attrs`, or the sum of
    /// the counter or up-down counter points that do; `None` if nothing was recorded.
    pub fn value(&self, name: &str, attrs: &[(&str, &str)]) -> Option<f64> {
        fn point<T: Copy>(
            data: &MetricData<T>,
            attrs: &[(&str, &str)],
            to_f64: fn(T) -> f64,
        ) -> Option<f64> {
            match data {
                MetricData::Sum(sum) => sum
                    .data_points()
                    .filter(|p| matches(p.attributes().cloned(), attrs))
                    .map(|p| to_f64(p.value()))
                    .reduce(|a, b| a + b),
                MetricData::Gauge(gauge) => gauge
                    .data_points()
                    .find(|p| matches(p.attributes().cloned(), attrs))
                    .map(|p| to_f64(p.value())),
                _ => None,
            }
        }
        match self.data(name)? {
            AggregatedMetrics::F64(data) => point(data, attrs, |v| v),
            AggregatedMetrics::U64(data) => point(data, attrs, |v| v as f64),
            AggregatedMetrics::I64(data) => point(data, attrs, |v| v as f64),
        }
    }

    /// How many data points (series) of `name` were exported: 0 when none.
    pub fn series(&self, name: &str) -> usize {
        fn points<T>(data: &MetricData<T>) -> usize {
            match data {
                MetricData::Sum(sum) => sum.data_points().count(),
                MetricData::Gauge(gauge) => gauge.data_points().count(),
                MetricData::Histogram(histogram) => histogram.data_points().count(),
                MetricData::ExponentialHistogram(histogram) => histogram.data_points().count(),
            }
        }
        match self.data(name) {
            None => 0,
            Some(AggregatedMetrics::F64(data)) => points(data),
            Some(AggregatedMetrics::U64(data)) => points(data),
            Some(AggregatedMetrics::I64(data)) => points(data),
        }
    }

    /// `value`, or 0 when nothing was recorded.
    pub fn count(&self, name: &str, attrs: &[(&str, &str)]) -> f64 {
        self.value(name, attrs).unwrap_or(0.0)
    }

    /// Count, sum and max of an `f64` histogram data point whose attributes include
    /// `attrs`.
    pub fn histogram(&self, name: &str, attrs: &[(&str, &str)]) -> Option<Histogram> {
        let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = self.data(name)? else {
            return None;
        };
        histogram
            .data_points()
            .find(|p| matches(p.attributes().cloned(), attrs))
            .map(|p| Histogram {
                count: p.count(),
                sum: p.sum(),
                max: p.max().unwrap_or(0.0),
                bounds: p.bounds().collect(),
            })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    pub max: f64,
    pub bounds: Vec<f64>,
}

/// A sample of the Prometheus text exposition: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the samples of a Prometheus text exposition (label values without commas or
/// escaped quotes, which is all these tests produce).
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn prometheus_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = samples.iter().filter(|sample| {
        sample.name == name
            && labels
                .iter()
                .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
    });
    let sample = found.next()?;
    assert!(
        found.next().is_none(),
        "more than one {name} sample with {labels:?}"
    );
    Some(sample.value)
}

/// Reads `body` until it fails, and returns the error; panics if it ends cleanly.
pub async fn read_until_error<B>(body: &mut B) -> B::Error
where
    B: Body + Unpin,
{
    loop {
        match body.frame().await {
            Some(Ok(_)) => continue,
            Some(Err(error)) => return error,
            None => panic!("the body ended without the expected error"),
        }
    }
}
