use super::{Chunk, Detector, EventStream, FirstData, JsonArray, NdJson, Progress, Sse, auto};

/// One of the crate's detectors, chosen at run time: what [`Auto`](super::Auto) picks
/// by `Content-Type`, and what a configuration names.
#[derive(Debug, Clone, Default)]
pub(crate) enum AnyDetector {
    /// By `Content-Type`, as [`Auto`](super::Auto) with this SSE detector: `start`
    /// replaces it with the detector it picks (never `Auto` again), so that a clone
    /// made for an attempt dispatches once, to the format of its response. Before
    /// `start`, it takes any data as the first chunk, as an [`Auto`](super::Auto)
    /// does. Only a configuration names it.
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    Auto(Sse),
    Sse(Sse),
    NdJson(NdJson),
    JsonArray(JsonArray),
    // Boxed: the largest detector, and the rarest.
    EventStream(Box<EventStream>),
    #[default]
    FirstData,
}

impl Detector for AnyDetector {
    fn start(&mut self, response: &http::response::Parts) {
        match self {
            AnyDetector::Auto(sse) => *self = auto::pick(sse, response),
            AnyDetector::Sse(d) => d.start(response),
            AnyDetector::NdJson(d) => d.start(response),
            AnyDetector::JsonArray(d) => d.start(response),
            AnyDetector::EventStream(d) => d.start(response),
            AnyDetector::FirstData => FirstData.start(response),
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Progress {
        match self {
            AnyDetector::Sse(d) => d.feed(bytes),
            AnyDetector::NdJson(d) => d.feed(bytes),
            AnyDetector::JsonArray(d) => d.feed(bytes),
            AnyDetector::EventStream(d) => d.feed(bytes),
            AnyDetector::Auto(_) | AnyDetector::FirstData => FirstData.feed(bytes),
        }
    }

    fn finish(&mut self) -> Progress {
        match self {
            AnyDetector::Sse(d) => d.finish(),
            AnyDetector::NdJson(d) => d.finish(),
            AnyDetector::JsonArray(d) => d.finish(),
            AnyDetector::EventStream(d) => d.finish(),
            AnyDetector::Auto(_) | AnyDetector::FirstData => FirstData.finish(),
        }
    }

    fn empty(&mut self) -> Progress {
        match self {
            AnyDetector::Sse(d) => d.empty(),
            AnyDetector::NdJson(d) => d.empty(),
            AnyDetector::JsonArray(d) => d.empty(),
            AnyDetector::EventStream(d) => d.empty(),
            AnyDetector::Auto(_) | AnyDetector::FirstData => FirstData.empty(),
        }
    }

    fn buffer_full(&mut self) -> Progress {
        match self {
            AnyDetector::Sse(d) => d.buffer_full(),
            AnyDetector::NdJson(d) => d.buffer_full(),
            AnyDetector::JsonArray(d) => d.buffer_full(),
            AnyDetector::EventStream(d) => d.buffer_full(),
            AnyDetector::Auto(_) | AnyDetector::FirstData => FirstData.buffer_full(),
        }
    }

    fn first_chunk(&self) -> Option<Chunk<'_>> {
        match self {
            AnyDetector::Sse(d) => d.first_chunk(),
            AnyDetector::NdJson(d) => d.first_chunk(),
            AnyDetector::JsonArray(d) => d.first_chunk(),
            AnyDetector::EventStream(d) => d.first_chunk(),
            AnyDetector::Auto(_) | AnyDetector::FirstData => FirstData.first_chunk(),
        }
    }
}
