//! Every metric exported over OTLP/HTTP (protobuf), as an OpenTelemetry collector would
//! receive it: a loopback receiver decodes each export request and the test finds every
//! instrument by name, with its kind, its `provider` attribute and a few values.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, HistogramDataPoint, Metric, NumberDataPoint, metric::Data,
    number_data_point,
};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use prost::Message;
use support::{Fault, Protocol as Http, Reply, Upstream, client, full_stack, post, read_to_end};
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_stream_backpressure::metrics::{
    CONCURRENCY_WAIT_BUCKETS, FIRST_CHUNK_LATENCY_BUCKETS, PROVIDER_CALLS_IN_FLIGHT,
    STREAM_CONCURRENCY_LIMIT, STREAM_CONCURRENCY_REJECTIONS, STREAM_CONCURRENCY_WAIT,
    STREAM_FIRST_CHUNK_LATENCY, STREAM_RETRIES, STREAM_RETRY_BUDGET_AVAILABLE, STREAMS_IN_FLIGHT,
};
use tower_stream_backpressure::{Rejected, RetryBudget, RetryPolicy, StreamConcurrencyLayer};

const PROTOBUF: &str = "application/x-protobuf";

/// What the receiver got: the decoded export requests, and a line for each request it
/// refused (wrong path, method or content type, or a body that does not decode).
#[derive(Default)]
struct Received {
    exports: Vec<ExportMetricsServiceRequest>,
    refused: Vec<String>,
}

/// A loopback OTLP/HTTP metrics receiver: `POST /v1/metrics` with a protobuf
/// `ExportMetricsServiceRequest`, answered `200` with an empty
/// `ExportMetricsServiceResponse`. Stops when dropped.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let received = Arc::new(Mutex::new(Received::default()));
        let server = tokio::spawn(serve(listener, received.clone()));
        Self {
            addr,
            received,
            server,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/metrics", self.addr)
    }

    /// The last export request received, after checking that none was refused.
    fn last_export(&self) -> ExportMetricsServiceRequest {
        let received = self.received.lock().unwrap();
        assert!(
            received.refused.is_empty(),
            "refused: {:?}",
            received.refused
        );
        received
            .exports
            .last()
            .cloned()
            .expect("at least one export request")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, received: Arc<Mutex<Received>>) {
    support::accept_each(listener, move |tcp| {
        let received = received.clone();
        let service = service_fn(move |request| receive(request, received.clone()));
        async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        }
    })
    .await;
}

async fn receive(
    request: Request<Incoming>,
    received: Arc<Mutex<Received>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = |status: StatusCode, body: Bytes| {
        Ok(Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, PROTOBUF)
            .body(Full::new(body))
            .expect("a valid response"))
    };
    let what = format!("{} {}", request.method(), request.uri().path());
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let refuse = |status: StatusCode, why: String| {
        received.lock().unwrap().refused.push(why);
        answer(status, Bytes::new())
    };
    if what != "POST /v1/metrics" {
        return refuse(StatusCode::NOT_FOUND, what);
    }
    if content_type != PROTOBUF {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{what} as {content_type:?}"),
        );
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return refuse(StatusCode::BAD_REQUEST, format!("{what}: {error}")),
    };
    match ExportMetricsServiceRequest::decode(body) {
        Ok(export) => {
            received.lock().unwrap().exports.push(export);
            let response = ExportMetricsServiceResponse::default().encode_to_vec();
            answer(StatusCode::OK, Bytes::from(response))
        }
        Err(error) => refuse(StatusCode::BAD_REQUEST, format!("{what}: {error}")),
    }
}

/// A meter provider exporting through the OTLP/HTTP exporter to `endpoint`, only when
/// flushed (the periodic export is an hour away).
fn otlp_provider(endpoint: &str) -> SdkMeterProvider {
    let exporter = MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .expect("an OTLP/HTTP metric exporter");
    SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(exporter)
                .with_interval(Duration::from_secs(3600))
                .build(),
        )
        .build()
}

/// Runs `f` on the provider off the runtime's thread: the exporter's blocking HTTP
/// client runs on the reader's own thread, and the receiver must go on being served
/// by this runtime meanwhile.
async fn on_provider<T: Send + 'static>(
    provider: &SdkMeterProvider,
    f: impl FnOnce(&SdkMeterProvider) -> T + Send + 'static,
) -> T {
    let provider = provider.clone();
    tokio::task::spawn_blocking(move || f(&provider))
        .await
        .expect("the blocking task")
}

/// Every metric in the export, by name (exactly one of each name).
fn metric<'a>(export: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
    let mut found = export
        .resource_metrics
        .iter()
        .flat_map(|resource| &resource.scope_metrics)
        .flat_map(|scope| &scope.metrics)
        .filter(|metric| metric.name == name);
    let metric = found
        .next()
        .unwrap_or_else(|| panic!("no metric {name} in the export"));
    assert!(found.next().is_none(), "more than one metric {name}");
    metric
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(value) => Some(value),
        _ => None,
    }
}

/// The attributes of a data point as `key=value` pairs, sorted, `provider=test` checked
/// and left out.
fn labels(attributes: &[KeyValue]) -> Vec<String> {
    assert_eq!(
        attribute(attributes, "provider"),
        Some("test"),
        "every data point carries provider=test: {attributes:?}"
    );
    let mut labels: Vec<String> = attributes
        .iter()
        .filter(|kv| kv.key != "provider")
        .map(|kv| {
            format!(
                "{}={}",
                kv.key,
                attribute(attributes, &kv.key).unwrap_or("?")
            )
        })
        .collect();
    labels.sort();
    labels
}

fn number(point: &NumberDataPoint) -> f64 {
    match point.value {
        Some(number_data_point::Value::AsInt(value)) => value as f64,
        Some(number_data_point::Value::AsDouble(value)) => value,
        None => panic!("a data point without a value: {point:?}"),
    }
}

/// The points of a sum, as (labels, value), after checking it is cumulative and
/// monotonic (a counter) or not (an up-down counter, a gauge in Prometheus).
fn sum(
    export: &ExportMetricsServiceRequest,
    name: &str,
    monotonic: bool,
) -> Vec<(Vec<String>, f64)> {
    let Some(Data::Sum(sum)) = &metric(export, name).data else {
        panic!("{name} is not a sum: {:?}", metric(export, name));
    };
    assert_eq!(sum.is_monotonic, monotonic, "{name} monotonic");
    assert_eq!(
        sum.aggregation_temporality,
        AggregationTemporality::Cumulative as i32,
        "{name} temporality"
    );
    sum.data_points
        .iter()
        .map(|point| (labels(&point.attributes), number(point)))
        .collect()
}

/// The one point of a gauge, after checking `provider=test` and no other attribute.
fn gauge(export: &ExportMetricsServiceRequest, name: &str) -> f64 {
    let Some(Data::Gauge(gauge)) = &metric(export, name).data else {
        panic!("{name} is not a gauge: {:?}", metric(export, name));
    };
    let [point] = gauge.data_points.as_slice() else {
        panic!("{name}: one point expected: {gauge:?}");
    };
    assert!(labels(&point.attributes).is_empty(), "{name}: {point:?}");
    number(point)
}

/// The one point of a histogram in seconds, after checking `provider=test`, no other
/// attribute, and the bucket boundaries.
fn histogram(
    export: &ExportMetricsServiceRequest,
    name: &str,
    bounds: &[f64],
) -> HistogramDataPoint {
    let metric = metric(export, name);
    assert_eq!(metric.unit, "s", "{name} unit");
    let Some(Data::Histogram(histogram)) = &metric.data else {
        panic!("{name} is not a histogram: {metric:?}");
    };
    assert_eq!(
        histogram.aggregation_temporality,
        AggregationTemporality::Cumulative as i32,
        "{name} temporality"
    );
    let [point] = histogram.data_points.as_slice() else {
        panic!("{name}: one point expected: {histogram:?}");
    };
    assert!(labels(&point.attributes).is_empty(), "{name}: {point:?}");
    assert_eq!(point.explicit_bounds, bounds, "{name} bounds");
    assert_eq!(
        point.bucket_counts.len(),
        bounds.len() + 1,
        "{name} buckets"
    );
    assert_eq!(
        point.bucket_counts.iter().sum::<u64>(),
        point.count,
        "{name} buckets add up to the count"
    );
    point.clone()
}

/// One scenario that makes every instrument record (a call retried once after a 503, a
/// stream held open, a call rejected for want of a slot), exported over OTLP/HTTP to the
/// loopback receiver and found there by name.
#[tokio::test]
async fn every_metric_arrives_over_otlp_http() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start(|hit| match (hit.path.as_str(), hit.index) {
        ("/retried", 0) => Reply::status(503),
        ("/held", _) => Reply::faulty(3, Fault::StallAfter(1)),
        _ => Reply::tokens(2),
    })
    .await;
    let provider = otlp_provider(&receiver.endpoint());
    // No reserve, one retry per request: /retried deposits one and spends it on its
    // retry, /held deposits one, and the rejected call never reaches the budget.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    let service = full_stack(
        client(Http::Http1),
        &provider.meter("tests"),
        StreamConcurrencyLayer::new(1).max_wait(Duration::ZERO),
        budget.clone(),
        RetryPolicy::default().backoff(Duration::ZERO, Duration::ZERO),
    );
    let call = |path: &str| service.clone().oneshot(post(&upstream.url(path)));

    let retried = call("/retried").await.unwrap();
    assert_eq!(retried.status(), 200);
    read_to_end(retried.into_body()).await.unwrap();
    let held = call("/held").await.unwrap();
    let rejected = call("/rejected").await.unwrap_err();
    assert!(rejected.is::<Rejected>(), "{rejected}");
    assert_eq!(upstream.hits(), 2 + 1);

    on_provider(&provider, |provider| provider.force_flush())
        .await
        .expect("the export to the receiver");
    let export = receiver.last_export();

    assert_eq!(
        sum(&export, STREAMS_IN_FLIGHT, false),
        [(vec![], 1.0)],
        "the held stream"
    );
    assert_eq!(
        sum(&export, PROVIDER_CALLS_IN_FLIGHT, false),
        [(vec![], 1.0)],
        "the held stream's attempt"
    );
    assert_eq!(
        sum(&export, STREAM_RETRIES, true),
        [(
            vec!["outcome=success".to_owned(), "reason=status".to_owned()],
            1.0
        )]
    );
    assert_eq!(
        sum(&export, STREAM_CONCURRENCY_REJECTIONS, true),
        [(vec!["reason=deadline_exceeded".to_owned()], 1.0)]
    );
    assert_eq!(budget.available(), 1);
    assert_eq!(gauge(&export, STREAM_RETRY_BUDGET_AVAILABLE), 1.0);
    assert_eq!(
        gauge(&export, STREAM_CONCURRENCY_LIMIT),
        1.0,
        "the fixed limit"
    );
    let latency = histogram(
        &export,
        STREAM_FIRST_CHUNK_LATENCY,
        &FIRST_CHUNK_LATENCY_BUCKETS,
    );
    assert_eq!(
        latency.count, 2,
        "/retried and /held found their first chunk"
    );
    let wait = histogram(&export, STREAM_CONCURRENCY_WAIT, &CONCURRENCY_WAIT_BUCKETS);
    assert_eq!(wait.count, 3, "every call, granted or not");
    assert_eq!(wait.sum, Some(0.0), "no call waited");

    // Exactly the eight instruments, all in the one scope of the meter.
    let mut names: Vec<&str> = export
        .resource_metrics
        .iter()
        .flat_map(|resource| &resource.scope_metrics)
        .flat_map(|scope| &scope.metrics)
        .map(|metric| metric.name.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            PROVIDER_CALLS_IN_FLIGHT,
            STREAM_CONCURRENCY_LIMIT,
            STREAM_CONCURRENCY_REJECTIONS,
            STREAM_CONCURRENCY_WAIT,
            STREAM_FIRST_CHUNK_LATENCY,
            STREAM_RETRIES,
            STREAM_RETRY_BUDGET_AVAILABLE,
            STREAMS_IN_FLIGHT,
        ]
    );

    drop(held);
    on_provider(&provider, |provider| provider.shutdown())
        .await
        .expect("shutdown, with a last export to the receiver");
    let export = receiver.last_export();
    assert_eq!(sum(&export, STREAMS_IN_FLIGHT, false), [(vec![], 0.0)]);
    assert_eq!(
        sum(&export, PROVIDER_CALLS_IN_FLIGHT, false),
        [(vec![], 0.0)]
    );
}
