use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use opentelemetry::metrics::Meter;
use tower::BoxError;
use tower_service::Service;

use super::ResponseFuture;
use super::cooldown::{Cooldown, Health};
use crate::ConfigError;
use crate::metrics::{FallbackMetrics, Telemetry};

/// Sends each call to the first of its targets, and to the next one when that one
/// fails before its first chunk: an error, or a response whose status is in the
/// fallback set. See the [module docs](super) for the behaviour and how it stacks.
///
/// Clones share the targets, the settings and the cooldowns. Always ready: a target is
/// made ready inside the call, only when the call is about to use it.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::util::BoxCloneSyncService;
/// use tower::{service_fn, ServiceExt};
/// use tower_stream_backpressure::fallback::{Fallback, ServedBy};
///
/// type Client = BoxCloneSyncService<http::Request<()>, http::Response<Full<Bytes>>, tower::BoxError>;
///
/// fn answering(status: u16) -> Client {
///     BoxCloneSyncService::new(service_fn(move |_: http::Request<()>| async move {
///         let response = http::Response::builder().status(status);
///         Ok::<_, tower::BoxError>(response.body(Full::new(Bytes::from("data")))?)
///     }))
/// }
///
/// let client = Fallback::new([("primary", answering(503)), ("backup", answering(200))])?;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let response = client.oneshot(http::Request::new(())).await?;
/// assert_eq!(response.status(), 200);
/// let served_by = response.extensions().get::<ServedBy>().expect("always there");
/// assert_eq!(served_by.name(), "backup");
/// # Ok::<(), tower::BoxError>(())
/// # })?;
/// # Ok::<(), tower::BoxError>(())
/// ```
pub struct Fallback<S> {
    targets: Arc<[Target<S>]>,
    shared: Arc<Shared>,
}

/// One target: its name, its service (cloned for each call that uses it, never made
/// ready itself) and its recent outcomes.
pub(super) struct Target<S> {
    pub(super) name: Arc<str>,
    pub(super) service: S,
    pub(super) health: Health,
}

/// The settings every clone shares.
#[derive(Debug, Clone)]
pub(super) struct Shared {
    pub(super) statuses: Statuses,
    pub(super) cooldown: Option<Cooldown>,
    pub(super) telemetry: Telemetry<FallbackMetrics>,
}

impl Shared {
    /// The instruments, built the first time a call falls back.
    pub(super) fn metrics(&self) -> Arc<FallbackMetrics> {
        self.telemetry.instruments(FallbackMetrics::new)
    }
}

// Manual impl: cloning shares the targets and needs no `S: Clone`.
impl<S> Clone for Fallback<S> {
    fn clone(&self) -> Self {
        Self {
            targets: self.targets.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> Fallback<S> {
    /// Tries `targets` in order: a call goes to the first, and to the next when it
    /// fails before its first chunk. Each target is a name (for [`ServedBy`](super::ServedBy),
    /// the metrics and the logs) and a service; all of them of one type, so box stacks
    /// that differ (`tower::util::BoxCloneSyncService`), as for `tower::steer`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the setting `targets` when the list is empty (there would
    /// be nothing to call) or gives one name twice (the metrics and [`ServedBy`](super::ServedBy)
    /// could not tell the two apart). Unlike the layers' `new`, this one does not panic:
    /// the targets are usually read from configuration.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(()))
    /// });
    /// assert!(Fallback::new([("openai", answer), ("azure", answer)]).is_ok());
    ///
    /// let error = Fallback::<fn()>::new(Vec::<(&str, _)>::new()).unwrap_err();
    /// assert_eq!(error.setting(), "targets");
    /// let error = Fallback::new([("openai", answer), ("openai", answer)]).unwrap_err();
    /// assert!(error.to_string().contains("\"openai\""), "{error}");
    /// ```
    pub fn new<N>(targets: impl IntoIterator<Item = (N, S)>) -> Result<Self, ConfigError>
    where
        N: Into<Arc<str>>,
    {
        let targets: Vec<Target<S>> = targets
            .into_iter()
            .map(|(name, service)| Target {
                name: name.into(),
                service,
                health: Health::default(),
            })
            .collect();
        if targets.is_empty() {
            return Err(ConfigError::new(
                "targets",
                "must name at least one target to call",
            ));
        }
        for (at, target) in targets.iter().enumerate() {
            if targets[..at].iter().any(|other| other.name == target.name) {
                return Err(ConfigError::new(
                    "targets",
                    format!(
                        "the name {:?} is given to two targets: each needs its own, for the \
                         metrics and ServedBy",
                        target.name
                    ),
                ));
            }
        }
        Ok(Self {
            targets: targets.into(),
            shared: Arc::new(Shared {
                statuses: Statuses::default(),
                cooldown: None,
                telemetry: Telemetry::default(),
            }),
        })
    }

    /// The response statuses that send the call on to the next target (default 408,
    /// 429 and 500 to 599), replacing the set. A response with any other status is the
    /// caller's. The last target's response goes to the caller whatever its status.
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// let fallback = Fallback::new([("a", answer), ("b", answer)])?;
    /// assert!(fallback.falls_back_on(StatusCode::INTERNAL_SERVER_ERROR));
    /// assert!(!fallback.falls_back_on(StatusCode::NOT_FOUND));
    ///
    /// // Also on a 404: the second target may have a model the first lacks.
    /// let fallback = fallback.fallback_on([StatusCode::NOT_FOUND, StatusCode::SERVICE_UNAVAILABLE]);
    /// assert!(fallback.falls_back_on(StatusCode::NOT_FOUND));
    /// assert!(!fallback.falls_back_on(StatusCode::INTERNAL_SERVER_ERROR));
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn fallback_on(self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let statuses = Statuses::of(statuses);
        self.with(|shared| shared.statuses = statuses)
    }

    /// A target that failed `failures` calls in a row is skipped for `duration`, then
    /// tried again; one more failure then skips it again at once, and a success starts
    /// its count anew. With every target cooling down, a call goes to the one whose
    /// cooldown ends first. Off by default.
    ///
    /// A failure is what makes a call fall back, less a [`Rejected`](crate::Rejected)
    /// from the target's concurrency limit: a full target is healthy, and its limit
    /// turns the next call away at once anyway. `failures` of 0 or a zero `duration`
    /// turns cooldowns off.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// // LiteLLM's defaults: skipped for 30 s after 3 failures in a row.
    /// let fallback = Fallback::new([("a", answer), ("b", answer)])?
    ///     .cooldown(3, Duration::from_secs(30));
    /// assert_eq!(fallback.get_cooldown(), Some((3, Duration::from_secs(30))));
    /// assert_eq!(fallback.cooldown(0, Duration::from_secs(30)).get_cooldown(), None);
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn cooldown(self, failures: u32, duration: Duration) -> Self {
        let cooldown =
            (failures > 0 && !duration.is_zero()).then_some(Cooldown { failures, duration });
        self.with(|shared| shared.cooldown = cooldown)
    }

    /// The `provider` attribute of this service's metric (default `"unknown"`): the
    /// name of the group of targets, beside the targets' own names in `from` and `to`.
    /// See [`metrics`](crate::metrics) for reading them back.
    ///
    /// ```
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// let fallback = Fallback::new([("openai", answer), ("azure", answer)])?.provider("chat");
    /// # let _ = fallback;
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn provider(self, provider: impl Into<Cow<'static, str>>) -> Self {
        let provider = provider.into();
        self.with(|shared| shared.telemetry = shared.telemetry.clone().with_provider(provider))
    }

    /// The meter this service records to (default: the global meter provider's, taken
    /// the first time a call falls back). See [`metrics`](crate::metrics) for an SDK
    /// meter provider read back in a test.
    ///
    /// ```
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// let fallback = Fallback::new([("openai", answer), ("azure", answer)])?
    ///     .meter(opentelemetry::global::meter("my-client"));
    /// # let _ = fallback;
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn meter(self, meter: Meter) -> Self {
        self.with(|shared| shared.telemetry = shared.telemetry.clone().with_meter(meter))
    }

    /// Whether a response with `status` goes on to the next target (see
    /// [`fallback_on`](Self::fallback_on)).
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// let fallback = Fallback::new([("a", answer), ("b", answer)])?;
    /// assert!(fallback.falls_back_on(StatusCode::TOO_MANY_REQUESTS));
    /// assert!(!fallback.falls_back_on(StatusCode::BAD_REQUEST));
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn falls_back_on(&self, status: StatusCode) -> bool {
        self.shared.statuses.contains(status)
    }

    /// The [`cooldown`](Self::cooldown) in force, `(failures, duration)`, `None` when off.
    ///
    /// ```
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// assert_eq!(Fallback::new([("a", answer)])?.get_cooldown(), None);
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn get_cooldown(&self) -> Option<(u32, Duration)> {
        let cooldown = self.shared.cooldown?;
        Some((cooldown.failures, cooldown.duration))
    }

    /// The targets' names, in the order they are tried.
    ///
    /// ```
    /// use tower::service_fn;
    /// use tower_stream_backpressure::fallback::Fallback;
    ///
    /// let answer = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// });
    /// let fallback = Fallback::new([("openai", answer), ("azure", answer)])?;
    /// assert!(fallback.names().eq(["openai", "azure"]));
    /// # Ok::<(), tower_stream_backpressure::ConfigError>(())
    /// ```
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|target| &*target.name)
    }

    /// The same targets and cooldowns, with other settings.
    fn with(self, change: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Shared::clone(&self.shared);
        change(&mut shared);
        Self {
            shared: Arc::new(shared),
            ..self
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Fallback<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Clone,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody>;

    /// Always ready: no target is asked here. Waiting here for a target, as
    /// `tower::steer` waits for all of them, would let a slow or saturated backup hold
    /// up the calls its primary serves; each target is made ready by the call that is
    /// about to use it.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture::new(self.targets.clone(), self.shared.clone(), request)
    }
}

impl<S> fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("targets", &self.names().collect::<Vec<_>>())
            .field("fallback_on", &self.shared.statuses)
            .field("cooldown", &self.shared.cooldown)
            .finish()
    }
}

/// A set of status codes, one bit each (a status is a number from 100 to 999).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Statuses([u64; 16]);

impl Statuses {
    fn of(statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let mut set = Self([0; 16]);
        for status in statuses {
            let code = usize::from(status.as_u16());
            set.0[code / 64] |= 1 << (code % 64);
        }
        set
    }

    pub(super) fn contains(&self, status: StatusCode) -> bool {
        let code = usize::from(status.as_u16());
        self.0[code / 64] & (1 << (code % 64)) != 0
    }
}

impl Default for Statuses {
    /// 408 (request timeout), 429 (too many requests) and every 5xx.
    fn default() -> Self {
        let codes = [408, 429].into_iter().chain(500..=599);
        Self::of(codes.filter_map(|code| StatusCode::from_u16(code).ok()))
    }
}

impl fmt::Debug for Statuses {
    /// As ranges: `[408, 429, 500-599]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut codes = (100..1000u16)
            .filter(|&code| StatusCode::from_u16(code).is_ok_and(|status| self.contains(status)));
        let mut run = codes.next().map(|code| (code, code));
        for code in codes.chain([u16::MAX]) {
            let Some((start, end)) = run else { break };
            if code == end + 1 {
                run = Some((start, code));
                continue;
            }
            match start == end {
                true => list.entry(&format_args!("{start}")),
                false => list.entry(&format_args!("{start}-{end}")),
            };
            run = Some((code, code));
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_408_429_and_every_5xx_listed_as_ranges() {
        let statuses = Statuses::default();
        for code in [408, 429, 500, 503, 529, 599] {
            assert!(
                statuses.contains(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [200, 400, 404, 409, 499, 600, 999] {
            assert!(
                !statuses.contains(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        assert_eq!(format!("{statuses:?}"), "[408, 429, 500-599]");
        let edges = Statuses::of([100, 101, 999].map(|c| StatusCode::from_u16(c).unwrap()));
        assert_eq!(format!("{edges:?}"), "[100-101, 999]");
        assert_eq!(format!("{:?}", Statuses::of([])), "[]");
    }
}
