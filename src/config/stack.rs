//! The stack a [`Config`](super::Config) builds: its layer, service, response future and body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::future;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::metrics::Meter;
use pin_project_lite::pin_project;
use tower::util::Either;
use tower::util::future::EitherResponseFuture;
use tower::{BoxError, ServiceBuilder};
use tower_http::timeout::TimeoutBody;
use tower_layer::Layer;
use tower_service::Service;

use crate::budget::WithRetryBudget;
use crate::concurrency::StreamConcurrency;
use crate::frame::AnyDetector;
use crate::retry::FirstChunkRetry;
use crate::{
    FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy, StreamConcurrencyLayer,
    concurrency, retry,
};

/// The layers a [`Config`](super::Config) describes, as one [`Layer`]: put it in a
/// `ServiceBuilder` above the HTTP client. Made by [`Config::layer`](super::Config::layer).
///
/// The services it builds are [`StreamStack`]s. Clones, and every service built, share
/// one concurrency limit and one budget.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_stream_backpressure::config::{Config, StreamLayers};
///
/// let config: Config = serde_json::from_str(r#"{"stream_max_concurrent": 10}"#)?;
/// let layers: StreamLayers = config.layer("openai")?;
/// let upstream = service_fn(|_: http::Request<()>| async {
///     http::Response::builder()
///         .header("content-type", "text/event-stream")
///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
/// });
/// let client = ServiceBuilder::new().layer(layers.clone()).service(upstream);
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// assert_eq!(layers.concurrency().unwrap().available_slots(), 9, "the stream is open");
/// let body = response.into_body().collect().await?.to_bytes();
/// assert_eq!(body, "data: {\"text\":\"Hi\"}\n\n");
/// assert_eq!(layers.concurrency().unwrap().available_slots(), 10);
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct StreamLayers {
    pub(super) concurrency: Option<StreamConcurrencyLayer>,
    pub(super) budget: Option<RetryBudgetLayer>,
    pub(super) retry: FirstChunkRetryLayer<AnyDetector>,
    pub(super) stream_idle_timeout: Duration,
}

impl StreamLayers {
    /// The meter every layer records to (default: the global meter provider's, taken
    /// when the stack first builds a service).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use opentelemetry::metrics::MeterProvider as _;
    /// use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let exporter = InMemoryMetricExporter::default();
    /// let provider = SdkMeterProvider::builder()
    ///     .with_reader(PeriodicReader::builder(exporter.clone()).build())
    ///     .build();
    /// let config: Config = serde_json::from_str(r#"{"stream_max_concurrent": 10}"#)?;
    /// let layers = config.layer("openai")?.meter(provider.meter("my-client"));
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
    /// });
    /// let client = layers.layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let _stream = client.oneshot(http::Request::new(())).await?;
    ///
    /// provider.force_flush()?;
    /// let exported = exporter.get_finished_metrics()?;
    /// let names: Vec<_> = exported
    ///     .iter()
    ///     .flat_map(|m| m.scope_metrics())
    ///     .flat_map(|s| s.metrics())
    ///     .map(|metric| metric.name().to_owned())
    ///     .collect();
    /// for name in [
    ///     "streams_in_flight",
    ///     "provider_calls_in_flight",
    ///     "stream_retry_budget_available",
    /// ] {
    ///     assert!(names.iter().any(|exported| exported == name), "{name}");
    /// }
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    #[must_use]
    pub fn meter(self, meter: Meter) -> Self {
        Self {
            concurrency: self.concurrency.map(|layer| layer.meter(meter.clone())),
            budget: self.budget.map(|layer| layer.meter(meter.clone())),
            retry: self.retry.meter(meter),
            ..self
        }
    }

    /// The concurrency limit, if `stream_max_concurrent` is not 0.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let config: Config = serde_json::from_str(r#"{"stream_max_concurrent": 64}"#)?;
    /// let layers = config.layer("openai")?;
    /// assert_eq!(layers.concurrency().map(|limit| limit.available_slots()), Some(64));
    /// assert!(Config::default().layer("openai")?.concurrency().is_none(), "0: no limit");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn concurrency(&self) -> Option<&StreamConcurrencyLayer> {
        self.concurrency.as_ref()
    }

    /// The retry budget, if retry and the budget are enabled.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let layers = Config::default().layer("openai")?;
    /// assert_eq!(layers.budget().map(|budget| budget.available()), Some(100));
    ///
    /// let json = r#"{"stream_retry": {"budget": {"enabled": false}}}"#;
    /// let config: Config = serde_json::from_str(json)?;
    /// assert!(config.layer("openai")?.budget().is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref().map(RetryBudgetLayer::budget)
    }

    /// The retry policy in force.
    ///
    /// ```
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let config: Config = serde_json::from_str(r#"{"stream_retry": {"max_attempts": 2}}"#)?;
    /// let layers = config.layer("openai")?;
    /// // E.g. to log the settings in force at startup.
    /// let policy = format!("{:?}", layers.policy());
    /// assert!(policy.contains("max_attempts: 2"), "{policy}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        self.retry.policy()
    }

    /// The longest wait for the next frame once the first chunk has arrived.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_backpressure::config::Config;
    ///
    /// let config: Config = serde_json::from_str(r#"{"stream_idle_timeout": "1m"}"#)?;
    /// assert_eq!(config.layer("openai")?.stream_idle_timeout(), Duration::from_secs(60));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stream_idle_timeout(&self) -> Duration {
        self.stream_idle_timeout
    }
}

impl<S> Layer<S> for StreamLayers {
    type Service = StreamStack<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let stack = ServiceBuilder::new()
            .option_layer(self.concurrency.clone())
            .option_layer(self.budget.clone())
            .layer(self.retry.clone())
            .service(inner);
        StreamStack {
            stack,
            stream_idle_timeout: self.stream_idle_timeout,
        }
    }
}

/// The service a [`StreamLayers`] builds around `S`: the idle timeout, the concurrency
/// limit, the budget and the retry layer, as configured.
///
/// Its errors are [`tower::BoxError`]s: [`Rejected`](crate::Rejected),
/// [`FirstChunkError`](crate::FirstChunkError), or the inner service's. Its response
/// bodies are [`ResponseBody`]s.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_stream_backpressure::config::{Config, StreamStack};
/// use tower_stream_backpressure::Rejected;
///
/// let config: Config =
///     serde_json::from_str(r#"{"stream_max_concurrent": 1, "max_wait": "0s"}"#)?;
/// let upstream = service_fn(|_: http::Request<()>| async {
///     http::Response::builder()
///         .header("content-type", "text/event-stream")
///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
/// });
/// let client: StreamStack<_> = config.layer("openai")?.layer(upstream);
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let _open = client.clone().oneshot(http::Request::new(())).await?;
/// let error = client.oneshot(http::Request::new(())).await.unwrap_err();
/// assert!(error.is::<Rejected>(), "{error}");
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct StreamStack<S> {
    stack: Stack<S>,
    pub(super) stream_idle_timeout: Duration,
}

/// The retry layer, next to the client.
type Retry<S> = FirstChunkRetry<S, AnyDetector>;

/// The budget around it, if enabled.
type Budgeted<S> = Either<WithRetryBudget<Retry<S>>, Retry<S>>;

/// The concurrency limit around that, if any: the configured layers below the idle
/// timeout.
type Stack<S> = Either<StreamConcurrency<Budgeted<S>>, Budgeted<S>>;

/// The body the configured layers answer with: the concurrency limit's, if any, around
/// the retry layer's.
type Chunks<B> = http_body_util::Either<
    concurrency::ResponseBody<retry::ResponseBody<B>>,
    retry::ResponseBody<B>,
>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for StreamStack<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: AsRef<[u8]> + Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The two sides answer different bodies, so that `Either`'s own `Service` does
        // not apply: the future makes them one.
        match &mut self.stack {
            Either::Left(limited) => limited.poll_ready(cx),
            Either::Right(unlimited) => unlimited.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let call = match &mut self.stack {
            Either::Left(limited) => future::Either::Left(limited.call(request)),
            Either::Right(unlimited) => future::Either::Right(unlimited.call(request)),
        };
        ResponseFuture {
            call,
            stream_idle_timeout: self.stream_idle_timeout,
        }
    }
}

pin_project! {
    /// Response future of [`StreamStack`]: resolves once the first chunk has arrived
    /// (or the call failed).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, Service, ServiceExt};
    /// use tower_stream_backpressure::config::{Config, ResponseFuture};
    ///
    /// let upstream = service_fn(|_: http::Request<()>| async {
    ///     http::Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from("data: {\"text\":\"Hi\"}\n\n")))
    /// });
    /// let mut client = Config::default().layer("openai")?.layer(upstream);
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let future: ResponseFuture<_, (), Full<Bytes>> =
    ///     client.ready().await?.call(http::Request::new(()));
    /// assert_eq!(future.await?.status(), 200);
    /// # Ok::<(), tower::BoxError>(())
    /// # })?;
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        S: Clone,
        S::Error: Into<BoxError>,
        ReqBody: Clone,
        ResBody: Body,
        ResBody: Unpin,
        ResBody::Data: AsRef<[u8]>,
        ResBody::Error: Into<BoxError>,
    {
        #[pin]
        call: Call<S, ReqBody, ResBody>,
        stream_idle_timeout: Duration,
    }
}

/// The future of either side of the [`Stack`].
type Call<S, ReqBody, ResBody> = future::Either<
    concurrency::ResponseFuture<Budgeted<S>, Request<ReqBody>>,
    EitherResponseFuture<RetryFuture<S, ReqBody, ResBody>, RetryFuture<S, ReqBody, ResBody>>,
>;

type RetryFuture<S, ReqBody, ResBody> = retry::ResponseFuture<S, ReqBody, ResBody, AnyDetector>;

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: AsRef<[u8]> + Send,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let timeout = *this.stream_idle_timeout;
        let response = match this.call.as_pin_mut() {
            future::Either::Left(limited) => {
                ready!(limited.poll(cx))?.map(http_body_util::Either::Left)
            }
            future::Either::Right(unlimited) => {
                ready!(unlimited.poll(cx))?.map(http_body_util::Either::Right)
            }
        };
        Poll::Ready(Ok(response.map(|chunks| ResponseBody::new(timeout, chunks))))
    }
}

impl<S, ReqBody, ResBody> fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: AsRef<[u8]> + Send,
    ResBody::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Response body of [`StreamStack`]: the upstream's frames, unchanged, from the first
/// chunk on.
///
/// Fails with tower-http's [`TimeoutError`](tower_http::timeout::TimeoutError) when the
/// caller waits longer than `stream_idle_timeout` for a frame. Holds the concurrency
/// slot, if any, until the stream ends or the body is dropped.
///
/// ```
/// use std::pin::Pin;
/// use std::task::{Context, Poll};
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http_body::Frame;
/// use http_body_util::BodyExt;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_http::timeout::TimeoutError;
/// use tower_stream_backpressure::config::{Config, ResponseBody};
///
/// /// An upstream stream that sends one event, then stalls.
/// struct Stalls(Option<Bytes>);
///
/// impl http_body::Body for Stalls {
///     type Data = Bytes;
///     type Error = std::convert::Infallible;
///
///     fn poll_frame(
///         mut self: Pin<&mut Self>,
///         _: &mut Context<'_>,
///     ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
///         match self.0.take() {
///             Some(event) => Poll::Ready(Some(Ok(Frame::data(event)))),
///             None => Poll::Pending,
///         }
///     }
/// }
///
/// let upstream = service_fn(|_: http::Request<()>| async {
///     let body = Stalls(Some(Bytes::from("data: {}\n\n")));
///     http::Response::builder().header("content-type", "text/event-stream").body(body)
/// });
/// let config: Config = serde_json::from_str(r#"{"stream_idle_timeout": "10s"}"#)?;
/// let client = config.layer("openai")?.layer(upstream);
/// # tokio::runtime::Builder::new_current_thread()
/// #     .enable_all()
/// #     .start_paused(true)
/// #     .build()?
/// #     .block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// let mut body: ResponseBody<Stalls> = response.into_body();
/// let first = body.frame().await.unwrap()?;
/// assert_eq!(first.into_data().unwrap(), "data: {}\n\n");
///
/// let started = tokio::time::Instant::now();
/// let error = body.frame().await.unwrap().unwrap_err();
/// assert!(error.is::<TimeoutError>(), "{error}");
/// assert_eq!(started.elapsed(), Duration::from_secs(10));
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
pub struct ResponseBody<B: Body> {
    inner: Pin<Box<TimeoutBody<Chunks<B>>>>,
    // What the body inside the timeout reported last: `TimeoutBody` does not pass its
    // `is_end_stream` and `size_hint` on, so they are kept here, counted down by the
    // frames that pass.
    size: SizeHint,
    ended: bool,
}

impl<B> ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn new(timeout: Duration, chunks: Chunks<B>) -> Self {
        let (size, ended) = (chunks.size_hint(), chunks.is_end_stream());
        Self {
            inner: Box::pin(TimeoutBody::new(timeout, chunks)),
            size,
            ended,
        }
    }

    /// Counts a polled frame against the size hint, and notes the end of the stream.
    fn saw<D: bytes::Buf, E>(&mut self, polled: &Option<Result<Frame<D>, E>>) {
        match polled {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) => {
                    let len = data.remaining() as u64;
                    // Lower first: it never rises above the upper bound that way.
                    self.size.set_lower(self.size.lower().saturating_sub(len));
                    if let Some(upper) = self.size.upper() {
                        let upper = upper.saturating_sub(len);
                        self.size.set_upper(upper);
                        self.ended |= upper == 0;
                    }
                }
                // Trailers are the last frame.
                None => self.ended = true,
            },
            Some(Err(_)) | None => self.ended = true,
        }
        if self.ended {
            self.size = SizeHint::with_exact(0);
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = ready!(self.inner.as_mut().poll_frame(cx));
        self.saw(&polled);
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}
