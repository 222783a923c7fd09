//! What counts as the first chunk of a stream.
//!
//! # Why
//!
//! A streaming call can only be retried while nothing has reached the caller. The
//! response headers are not that point: an upstream often sends `200 OK` and then
//! fails, stalls, or sends only keep-alives before its first real event. So the retry
//! layer holds the response until a [`Detector`] has seen the first chunk, and
//! "first chunk" depends on the stream's format.
//!
//! # How
//!
//! A detector is fed the body's bytes, frame by frame, and says when the first chunk is
//! complete. Detectors are incremental: each byte is looked at once, however the body
//! is split into frames, and of the bytes they keep at most the first 16 KiB of the
//! first chunk (for the in-band error rules). They only observe: the caller receives
//! the body byte for byte as the upstream sent it.
//!
//! | detector | first chunk | keep-alives skipped | terminal framing errors |
//! |---|---|---|---|
//! | [`Auto`] (the default) | picks one below by `Content-Type` | | |
//! | [`Sse`] | the first event with a `data` field | comments, data-less events, `event: ping` | none: any bytes are valid SSE |
//! | [`NdJson`] | the first non-blank line (a last line without `\n` at the end of the body) | blank lines | none |
//! | [`JsonArray`] | the first element of a top-level array | whitespace and commas before it | `[]`; a body not starting with `[` |
//! | [`EventStream`] | the first message of type `event` (or `exception`, `error`) | messages of other types | length under 16 bytes or over 16 MiB, bad CRC, bad headers |
//! | [`FirstData`] | the first non-empty data frame | | |
//!
//! When the first chunk is an in-band error (SSE `event: error`, a JSON object with a
//! top-level `error` key, an eventstream `exception`), the retry layer's
//! [`InBandErrors`](crate::retry::InBandErrors) decide whether it is retried, from the
//! [`Chunk`] the detector reports.
//!
//! A detector is configured once on the layer and cloned, fresh, for each attempt.
//!
//! # Empty and short bodies
//!
//! A `2xx` response whose body is already at its end when its head arrives
//! (`Content-Length: 0`, a body that reports
//! [`is_end_stream`](http_body::Body::is_end_stream)) is judged by the detector's
//! [`empty`](Detector::empty), and a body that ends before its first chunk is complete
//! by its [`finish`](Detector::finish):
//!
//! - [`FirstData`], and [`Auto`] on a `Content-Type` that is not a stream format
//!   (plain `application/json` included), take an empty body as a complete answer:
//!   it passes through with one upstream call. The plain JSON rule also takes the end
//!   of a body that had bytes as its first chunk (a short answer, or a list cut
//!   short), so such an answer is never retried for ending.
//! - The stream formats ([`Sse`], [`NdJson`], [`EventStream`], a strict
//!   [`JsonArray`], and [`Auto`] on their content types) expect at least one event:
//!   an empty body is an end of stream before the first chunk, which the retry layer
//!   retries, and so is a body that ends without a byte after a head that promised
//!   more (under every detector).
//!
//! Responses that have no body by definition (to `HEAD`, `204`, `205`, `304`) are
//! never read: they pass through at once, whatever the detector.

mod any;
mod auto;
#[cfg(test)]
mod captures;
mod chunk;
mod event_stream;
mod first_data;
mod json_array;
mod ndjson;
#[cfg(test)]
mod properties;
mod sse;

pub use self::auto::Auto;
pub use self::chunk::{Chunk, Malformed};
pub use self::event_stream::EventStream;
pub use self::first_data::FirstData;
pub use self::json_array::JsonArray;
pub use self::ndjson::NdJson;
pub use self::sse::Sse;

pub(crate) use self::any::AnyDetector;
pub(crate) use self::chunk::Capture;

/// Finds the first chunk of a response body, incrementally.
///
/// The layer clones the configured detector for each attempt, calls
/// [`start`](Self::start) with the response head, then [`feed`](Self::feed) with each
/// data frame until it returns [`Progress::Found`] or [`Progress::Malformed`], and
/// [`finish`](Self::finish) if the body ends first. Once found, it asks
/// [`first_chunk`](Self::first_chunk) what the chunk was, to tell an in-band error
/// from content.
///
/// A detector for a line-based format, as a sketch:
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, Progress};
///
/// /// The first chunk is complete at the first newline.
/// #[derive(Clone, Default)]
/// struct FirstLine;
///
/// impl Detector for FirstLine {
///     fn feed(&mut self, bytes: &[u8]) -> Progress {
///         if bytes.contains(&b'\n') { Progress::Found } else { Progress::Pending }
///     }
/// }
///
/// let mut d = FirstLine;
/// assert_eq!(d.feed(b"partial"), Progress::Pending);
/// assert_eq!(d.feed(b" line\nnext"), Progress::Found);
/// ```
pub trait Detector: Clone + Send + Sync + 'static {
    /// Called once per attempt, before any bytes, with the response head (a detector
    /// may choose its format by `Content-Type`). The default does nothing.
    fn start(&mut self, response: &http::response::Parts) {
        let _ = response;
    }

    /// Looks at the next bytes of the body and says whether the first chunk is now
    /// complete, or the framing is broken. Not called again once it returned anything
    /// but [`Progress::Pending`].
    fn feed(&mut self, bytes: &[u8]) -> Progress;

    /// The body ended: says whether what came last completes a chunk. The default says
    /// it does not.
    fn finish(&mut self) -> Progress {
        Progress::Pending
    }

    /// Instead of any bytes: the body is already at its end when the response head
    /// arrives (`Content-Length: 0`, [`is_end_stream`] before the first frame). Says
    /// whether that empty body is a complete response ([`Progress::Found`]: it goes to
    /// the caller at once) or an end of stream before the first chunk (the default,
    /// [`Progress::Pending`], for formats that expect an event). See [Empty
    /// bodies](self#empty-bodies).
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, FirstData, Progress, Sse};
    ///
    /// assert_eq!(FirstData.empty(), Progress::Found);
    /// assert_eq!(Sse::new().empty(), Progress::Pending);
    /// ```
    ///
    /// [`is_end_stream`]: http_body::Body::is_end_stream
    fn empty(&mut self) -> Progress {
        Progress::Pending
    }

    /// The layer holds `max_buffer` bytes and the first chunk is still not complete:
    /// says whether to hand the response over as it is ([`Progress::Found`]), or to
    /// fail the call. The default, [`Progress::Pending`], fails it with
    /// [`FirstChunkErrorKind::BufferLimit`](crate::retry::FirstChunkErrorKind), never
    /// retried.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, JsonArray, Progress};
    ///
    /// // A stream's first element larger than the buffer is an error ...
    /// let mut strict = JsonArray::default();
    /// assert_eq!(strict.feed(b"[{\"b64_json\": \"AAAA"), Progress::Pending);
    /// assert_eq!(strict.buffer_full(), Progress::Pending);
    /// ```
    fn buffer_full(&mut self) -> Progress {
        Progress::Pending
    }

    /// After [`Progress::Found`]: what the first chunk was, for the in-band error
    /// rules. The default, `None`, means the chunk is content.
    fn first_chunk(&self) -> Option<Chunk<'_>> {
        None
    }
}

/// What a [`Detector`] has seen so far.
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, JsonArray, Progress};
///
/// fn describe(progress: Progress) -> String {
///     match progress {
///         Progress::Pending => "need more bytes".to_owned(),
///         Progress::Found => "first chunk complete".to_owned(),
///         Progress::Malformed(error) => error.to_string(),
///         _ => "unknown".to_owned(),
///     }
/// }
///
/// let mut d = JsonArray::default();
/// assert_eq!(describe(d.feed(b"[{\"text\":")), "need more bytes");
/// assert_eq!(describe(d.feed(b"\"Hi\"},")), "first chunk complete");
/// let broken = JsonArray::default().feed(b"{}");
/// assert_eq!(
///     describe(broken),
///     "malformed JSON array stream: the body does not start with `[`"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// No complete first chunk yet.
    Pending,
    /// The first chunk is complete: the response can go to the caller.
    Found,
    /// The stream's framing is broken before the first chunk: a terminal error, not
    /// retried.
    Malformed(Malformed),
}

/// `true` for the bytes JSON allows between tokens.
#[inline]
pub(crate) fn is_json_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{Detector, Progress};

    /// What feeding a detector came to: the progress, the index of the piece at which
    /// it stopped being pending (`pieces.len()` means at `finish`), and the first chunk
    /// as `(event, message type, data, truncated)`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Outcome {
        pub(crate) progress: Progress,
        pub(crate) at: Option<usize>,
        pub(crate) chunk: Option<OwnedChunk>,
    }

    pub(crate) type OwnedChunk = (Option<String>, Option<String>, Vec<u8>, bool);

    /// Feeds `pieces` in order, then `finish` if still pending.
    pub(crate) fn run<D: Detector>(detector: &D, pieces: &[&[u8]]) -> Outcome {
        let mut d = detector.clone();
        let mut progress = Progress::Pending;
        let mut at = None;
        for (i, piece) in pieces.iter().enumerate() {
            progress = d.feed(piece);
            if progress != Progress::Pending {
                at = Some(i);
                break;
            }
        }
        if at.is_none() {
            progress = d.finish();
            at = (progress != Progress::Pending).then_some(pieces.len());
        }
        let chunk = (progress == Progress::Found)
            .then(|| d.first_chunk())
            .flatten()
            .map(|c| {
                (
                    c.event().map(str::to_owned),
                    c.message_type().map(str::to_owned),
                    c.data().to_vec(),
                    c.is_truncated(),
                )
            });
        Outcome {
            progress,
            at,
            chunk,
        }
    }

    /// Asserts that `input` gives `expected` fed whole, byte by byte, and cut at every
    /// single position, with the same first chunk, and that the chunk completes at the
    /// same byte each way. Returns the outcome.
    pub(crate) fn assert_split_invariant<D: Detector>(
        detector: &D,
        input: &[u8],
        expected: Progress,
    ) -> Outcome {
        let show = || String::from_utf8_lossy(&input[..input.len().min(200)]).into_owned();
        let whole = run(detector, &[input]);
        assert_eq!(whole.progress, expected, "fed whole: {:?}", show());

        // Byte by byte, the piece index is the byte offset of completion.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let by_byte = run(detector, &bytes);
        assert_eq!(by_byte.progress, expected, "byte by byte: {:?}", show());
        assert_eq!(by_byte.chunk, whole.chunk, "byte by byte: {:?}", show());
        let completes_at = by_byte.at.filter(|&i| i != bytes.len()).map(|i| i + 1);

        for cut in 0..=input.len() {
            let (head, tail) = input.split_at(cut);
            let split = run(detector, &[head, tail]);
            assert_eq!(split.progress, expected, "cut at {cut}: {:?}", show());
            assert_eq!(split.chunk, whole.chunk, "cut at {cut}: {:?}", show());
            if let Some(byte) = completes_at {
                // Decided in the head exactly when the deciding byte is in it.
                assert_eq!(
                    split.at == Some(0),
                    byte <= cut,
                    "cut at {cut}, decided at {byte}"
                );
            }
        }
        whole
    }

    /// `detector`, started on a response head with this `Content-Type` (or none).
    pub(crate) fn started<D: Detector>(mut detector: D, content_type: Option<&str>) -> D {
        let mut response = http::Response::builder();
        if let Some(value) = content_type {
            response = response.header(http::header::CONTENT_TYPE, value);
        }
        let (head, ()) = response.body(()).expect("a valid head").into_parts();
        detector.start(&head);
        detector
    }

    /// Feeds `input` in random pieces (seeded) and returns the outcome.
    pub(crate) fn run_random_split<D: Detector>(detector: &D, input: &[u8], seed: u64) -> Outcome {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut pieces = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(rng.usize(0..=rest.len().min(64)));
            pieces.push(piece);
            rest = tail;
        }
        run(detector, &pieces)
    }
}
