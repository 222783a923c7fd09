use std::borrow::Cow;
use std::fmt;

/// How many bytes of the first chunk a detector keeps for
/// [`Detector::first_chunk`](super::Detector::first_chunk). Provider error objects
/// are far smaller; a content chunk cut at this length is still content.
pub(crate) const CAPTURE_LIMIT: usize = 16 * 1024;

/// The first chunk of a response, as a [`Detector`](super::Detector) saw it: what an
/// in-band error classifier looks at.
///
/// Which parts are set depends on the format:
///
/// | format | [`event`](Self::event) | [`message_type`](Self::message_type) | [`data`](Self::data) |
/// |---|---|---|---|
/// | SSE | the `event` field | - | the `data` lines, joined by `\n` |
/// | NDJSON | - | - | the line, without its line ending |
/// | JSON array | - | - | the first element |
/// | AWS eventstream | `:event-type`, `:exception-type` or `:error-code` | `:message-type` | the payload |
///
/// `data` holds at most the first 16 KiB; [`is_truncated`](Self::is_truncated) says
/// when there was more.
///
/// ```
/// use tower_stream_backpressure::frame::Chunk;
///
/// let chunk = Chunk::new(br#"{"type":"error"}"#).with_event("error");
/// assert_eq!(chunk.event(), Some("error"));
/// assert!(!chunk.is_truncated());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    event: Option<&'a str>,
    message_type: Option<&'a str>,
    data: &'a [u8],
    truncated: bool,
}

impl<'a> Chunk<'a> {
    /// A chunk carrying `data`, with no event name or message type.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::Chunk;
    ///
    /// let chunk = Chunk::new(br#"{"error":"overloaded"}"#);
    /// assert_eq!(chunk.data(), br#"{"error":"overloaded"}"#);
    /// assert_eq!((chunk.event(), chunk.message_type()), (None, None));
    /// ```
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            event: None,
            message_type: None,
            data,
            truncated: false,
        }
    }

    /// Sets the event name (SSE `event`, eventstream `:event-type` or
    /// `:exception-type`).
    ///
    /// A custom [`Detector`](super::Detector) builds its chunk this way; so can a test of
    /// in-band error rules:
    ///
    /// ```
    /// use tower_stream_backpressure::frame::Chunk;
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    ///
    /// let data = br#"{"type":"error","error":{"type":"overloaded_error"}}"#;
    /// let chunk = Chunk::new(data).with_event("error");
    /// assert_eq!(chunk.event(), Some("error"));
    /// assert_eq!(InBandErrors::default().classify(&chunk), InBand::TransientError);
    /// ```
    #[must_use]
    pub fn with_event(self, event: &'a str) -> Self {
        Self {
            event: Some(event),
            ..self
        }
    }

    /// Sets the message type (eventstream `:message-type`: `event`, `exception`,
    /// `error`).
    ///
    /// ```
    /// use tower_stream_backpressure::frame::Chunk;
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    ///
    /// // A Bedrock exception, as the eventstream detector reports it.
    /// let chunk = Chunk::new(br#"{"message":"Too many requests"}"#)
    ///     .with_message_type("exception")
    ///     .with_event("throttlingException");
    /// assert_eq!(chunk.message_type(), Some("exception"));
    /// assert_eq!(InBandErrors::default().classify(&chunk), InBand::TransientError);
    /// ```
    #[must_use]
    pub fn with_message_type(self, message_type: &'a str) -> Self {
        Self {
            message_type: Some(message_type),
            ..self
        }
    }

    /// Marks `data` as only the start of the chunk.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::Chunk;
    ///
    /// let chunk = Chunk::new(b"{\"choices\":[").with_truncated(true);
    /// assert!(chunk.is_truncated());
    /// ```
    #[must_use]
    pub fn with_truncated(self, truncated: bool) -> Self {
        Self { truncated, ..self }
    }

    /// The event name, if the format has one and it was sent.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, Progress, Sse};
    ///
    /// let mut d = Sse::default();
    /// let error = b"event: error\ndata: {\"type\":\"error\"}\n\n";
    /// assert_eq!(d.feed(error), Progress::Found);
    /// assert_eq!(d.first_chunk().unwrap().event(), Some("error"));
    /// ```
    pub fn event(&self) -> Option<&'a str> {
        self.event
    }

    /// The message type, if the format has one and it was sent.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Chunk, Detector, NdJson, Progress};
    ///
    /// // SSE, NDJSON and JSON arrays have no message type; AWS eventstream does.
    /// let mut d = NdJson::default();
    /// assert_eq!(d.feed(b"{\"done\":false}\n"), Progress::Found);
    /// assert_eq!(d.first_chunk().unwrap().message_type(), None);
    /// assert_eq!(Chunk::new(b"").with_message_type("event").message_type(), Some("event"));
    /// ```
    pub fn message_type(&self) -> Option<&'a str> {
        self.message_type
    }

    /// The chunk's content (see the table above), at most its first 16 KiB.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, Progress, Sse};
    ///
    /// let mut d = Sse::default();
    /// assert_eq!(d.feed(b"data: first line\ndata: second line\n\n"), Progress::Found);
    /// assert_eq!(d.first_chunk().unwrap().data(), b"first line\nsecond line");
    /// ```
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Whether the chunk was longer than [`data`](Self::data).
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, NdJson, Progress};
    ///
    /// let mut line = vec![b'x'; 20 * 1024];
    /// line.push(b'\n');
    /// let mut d = NdJson::default();
    /// assert_eq!(d.feed(&line), Progress::Found);
    /// let chunk = d.first_chunk().unwrap();
    /// assert!(chunk.is_truncated());
    /// assert_eq!(chunk.data().len(), 16 * 1024);
    /// ```
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }
}

/// A stream whose framing is broken before its first chunk: a terminal error, since
/// the upstream would send the same again.
///
/// The retry layer ends the call with a
/// [`FirstChunkError`](crate::retry::FirstChunkError) of kind
/// [`Malformed`](crate::retry::FirstChunkErrorKind::Malformed) whose
/// [`source`](std::error::Error::source) is this error.
///
/// ```
/// use tower_stream_backpressure::frame::Malformed;
///
/// let error = Malformed::new("JSON array", "the body does not start with `[`");
/// assert_eq!(
///     error.to_string(),
///     "malformed JSON array stream: the body does not start with `[`"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    format: &'static str,
    problem: Cow<'static, str>,
}

impl Malformed {
    /// The `format` (`"SSE"`, `"AWS eventstream"`, ...) has this `problem`.
    ///
    /// A custom [`Detector`](super::Detector) reports broken framing this way:
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, Malformed, Progress};
    ///
    /// /// A binary format whose every stream starts with the magic bytes `SSTR`.
    /// #[derive(Clone, Default)]
    /// struct Magic;
    ///
    /// impl Detector for Magic {
    ///     fn feed(&mut self, bytes: &[u8]) -> Progress {
    ///         if bytes.starts_with(b"SSTR") {
    ///             Progress::Found
    ///         } else {
    ///             Progress::Malformed(Malformed::new("SSTR", "bad magic bytes"))
    ///         }
    ///     }
    /// }
    ///
    /// let Progress::Malformed(error) = Magic.feed(b"<html>") else { panic!() };
    /// assert_eq!(error.problem(), "bad magic bytes");
    /// ```
    pub fn new(format: &'static str, problem: impl Into<Cow<'static, str>>) -> Self {
        Self {
            format,
            problem: problem.into(),
        }
    }

    /// The stream format whose framing is broken.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, JsonArray, Progress};
    ///
    /// let Progress::Malformed(error) = JsonArray::default().feed(b"[]") else { panic!() };
    /// assert_eq!(error.format(), "JSON array");
    /// ```
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// What is wrong with it.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, JsonArray, Progress};
    ///
    /// let Progress::Malformed(error) = JsonArray::default().feed(b"[]") else { panic!() };
    /// assert_eq!(error.problem(), "the array is empty");
    /// ```
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed {} stream: {}", self.format, self.problem)
    }
}

impl std::error::Error for Malformed {}

/// The first [`CAPTURE_LIMIT`] bytes of something, and whether there was more.
#[derive(Debug, Clone, Default)]
pub(crate) struct Capture {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Capture {
    #[inline]
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.bytes.capacity() == 0 && !bytes.is_empty() {
            // One allocation for a typical event, rather than one per growth step.
            self.bytes.reserve(bytes.len().clamp(256, CAPTURE_LIMIT));
        }
        let room = CAPTURE_LIMIT - self.bytes.len();
        if bytes.len() <= room {
            self.bytes.extend_from_slice(bytes);
        } else {
            self.bytes.extend_from_slice(&bytes[..room]);
            self.truncated = true;
        }
    }

    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.truncated = false;
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// The captured bytes as a chunk's data.
    pub(crate) fn chunk(&self) -> Chunk<'_> {
        Chunk::new(&self.bytes).with_truncated(self.truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_keeps_the_first_bytes_and_says_it_was_cut() {
        let mut capture = Capture::default();
        capture.push(b"abc");
        assert_eq!(capture.bytes(), b"abc");
        assert!(!capture.is_truncated());
        capture.push(&vec![b'x'; CAPTURE_LIMIT]);
        assert_eq!(capture.bytes().len(), CAPTURE_LIMIT);
        assert!(capture.is_truncated());
        capture.push(b"more");
        assert_eq!(capture.bytes().len(), CAPTURE_LIMIT);
        capture.clear();
        assert_eq!(capture.chunk(), Chunk::new(b""));
    }
}
