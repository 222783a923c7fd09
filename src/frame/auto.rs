use http::header::CONTENT_TYPE;

use super::{AnyDetector, Chunk, Detector, JsonArray, NdJson, Progress, Sse};

/// Picks the detector by the response's `Content-Type`: the layer's default.
///
/// | media type | detector |
/// |---|---|
/// | `text/event-stream` | [`Sse`] (as configured with [`sse`](Self::sse)) |
/// | `application/x-ndjson`, `application/ndjson`, `application/jsonl` | [`NdJson`] |
/// | `application/vnd.amazon.eventstream` | [`EventStream`](super::EventStream) |
/// | `application/json` | [`JsonArray`], except that a body that is not an array, or is `[]`, is a plain JSON response whose first byte is the first chunk; so is a list whose first element is larger than `max_buffer`, and a body that ends before its first element is complete |
/// | anything else, or none | [`FirstData`](super::FirstData) |
///
/// Parameters (`; charset=utf-8`) and case do not matter.
///
/// ```
/// use tower_stream_backpressure::frame::{Auto, Detector, Progress};
///
/// let (head, ()) = http::Response::builder()
///     .header("content-type", "application/x-ndjson")
///     .body(())
///     .unwrap()
///     .into_parts();
/// let mut d = Auto::default();
/// d.start(&head);
/// assert_eq!(d.feed(b"\n"), Progress::Pending);
/// assert_eq!(d.feed(b"{\"done\":false}\n"), Progress::Found);
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "settings do nothing until a layer uses them"]
pub struct Auto {
    sse: Sse,
    picked: AnyDetector,
}

impl Auto {
    /// The SSE detector used for `text/event-stream` (default [`Sse::default`]), e.g.
    /// with other keep-alive event types.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Auto, Detector, Progress, Sse};
    ///
    /// let (head, ()) = http::Response::builder()
    ///     .header("content-type", "text/event-stream; charset=utf-8")
    ///     .body(())
    ///     .unwrap()
    ///     .into_parts();
    /// let mut d = Auto::default().sse(Sse::new().keep_alive_events(["heartbeat"]));
    /// d.start(&head);
    /// assert_eq!(d.feed(b"event: heartbeat\ndata: {}\n\n"), Progress::Pending);
    /// assert_eq!(d.feed(b"data: {\"text\":\"Hi\"}\n\n"), Progress::Found);
    /// ```
    pub fn sse(self, sse: Sse) -> Self {
        Self { sse, ..self }
    }
}

impl Detector for Auto {
    fn start(&mut self, response: &http::response::Parts) {
        self.picked = pick(&self.sse, response);
    }

    fn feed(&mut self, bytes: &[u8]) -> Progress {
        self.picked.feed(bytes)
    }

    fn finish(&mut self) -> Progress {
        self.picked.finish()
    }

    fn empty(&mut self) -> Progress {
        self.picked.empty()
    }

    fn buffer_full(&mut self) -> Progress {
        self.picked.buffer_full()
    }

    fn first_chunk(&self) -> Option<Chunk<'_>> {
        self.picked.first_chunk()
    }
}

/// The detector for `response`'s `Content-Type`, with `sse` for `text/event-stream`.
pub(super) fn pick(sse: &Sse, response: &http::response::Parts) -> AnyDetector {
    let media_type = response
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    let is = |name: &str| media_type.eq_ignore_ascii_case(name);
    if is("text/event-stream") {
        AnyDetector::Sse(sse.clone())
    } else if is("application/x-ndjson") || is("application/ndjson") || is("application/jsonl") {
        AnyDetector::NdJson(NdJson::default())
    } else if is("application/vnd.amazon.eventstream") {
        AnyDetector::EventStream(Box::default())
    } else if is("application/json") {
        AnyDetector::JsonArray(JsonArray::lenient())
    } else {
        AnyDetector::FirstData
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_util::{run, started};

    fn picks(content_type: Option<&str>) -> &'static str {
        match started(Auto::default(), content_type).picked {
            AnyDetector::Sse(_) => "sse",
            AnyDetector::NdJson(_) => "ndjson",
            AnyDetector::JsonArray(_) => "json array",
            AnyDetector::EventStream(_) => "eventstream",
            AnyDetector::FirstData => "first data",
            AnyDetector::Auto(_) => unreachable!("never picked"),
        }
    }

    #[test]
    fn picks_by_media_type() {
        assert_eq!(picks(Some("text/event-stream")), "sse");
        assert_eq!(picks(Some("Text/Event-Stream; charset=utf-8")), "sse");
        assert_eq!(picks(Some("application/x-ndjson")), "ndjson");
        assert_eq!(picks(Some("application/jsonl")), "ndjson");
        assert_eq!(picks(Some("application/ndjson")), "ndjson");
        assert_eq!(
            picks(Some("application/vnd.amazon.eventstream")),
            "eventstream"
        );
        assert_eq!(picks(Some("application/json; charset=UTF-8")), "json array");
        assert_eq!(picks(Some("text/plain")), "first data");
        assert_eq!(picks(Some("application/jsonx")), "first data");
        assert_eq!(picks(None), "first data");
    }

    #[test]
    fn any_detector_auto_becomes_the_picked_one_at_start() {
        let any = AnyDetector::Auto(Sse::new().keep_alive_events(["beat"]));
        let sse = started(any.clone(), Some("text/event-stream"));
        assert!(matches!(sse, AnyDetector::Sse(_)), "{sse:?}");
        assert_eq!(
            run(&sse, &[b"event: beat\ndata: {}\n\n"]).progress,
            Progress::Pending,
            "with its SSE settings"
        );
        let ndjson = started(any.clone(), Some("application/x-ndjson"));
        assert!(matches!(ndjson, AnyDetector::NdJson(_)), "{ndjson:?}");
        let plain = started(any, None);
        assert!(matches!(plain, AnyDetector::FirstData), "{plain:?}");
        assert_eq!(run(&plain, &[b"x"]).progress, Progress::Found);
    }

    #[test]
    fn the_picked_detector_decides() {
        let sse = started(Auto::default(), Some("text/event-stream"));
        assert_eq!(
            run(&sse, &[b"event: ping\ndata: {}\n\n"]).progress,
            Progress::Pending
        );
        assert_eq!(run(&sse, &[b"data: x\n\n"]).chunk.unwrap().2, b"x");
        let custom = Auto::default().sse(Sse::new().keep_alive_events(["beat"]));
        let custom = started(custom, Some("text/event-stream"));
        assert_eq!(
            run(&custom, &[b"event: beat\ndata: {}\n\n"]).progress,
            Progress::Pending
        );
        // A plain JSON response is not held back.
        let json = started(Auto::default(), Some("application/json"));
        assert_eq!(run(&json, &[b"{\"id\":"]).progress, Progress::Found);
        let plain = started(Auto::default(), None);
        assert_eq!(run(&plain, &[b"x"]).progress, Progress::Found);
    }
}
