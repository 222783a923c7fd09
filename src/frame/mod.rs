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
//! is split into frames, and they keep no copy of the bytes. They only observe: the
//! caller receives the body byte for byte as the upstream sent it.
//!
//! - [`Sse`] (the default): the first server-sent event that carries data.
//! - [`FirstData`]: the first non-empty data frame, whatever the format.
//!
//! A detector is configured once on the layer and cloned, fresh, for each attempt.

mod first_data;
mod sse;

pub use self::first_data::FirstData;
pub use self::sse::Sse;

/// Finds the first chunk of a response body, incrementally.
///
/// The layer clones the configured detector for each attempt, calls
/// [`start`](Self::start) with the response head, then [`feed`](Self::feed) with each
/// data frame until it returns [`Progress::Found`], and [`finish`](Self::finish) if the
/// body ends first.
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
    /// complete. Not called again once it returned [`Progress::Found`].
    fn feed(&mut self, bytes: &[u8]) -> Progress;

    /// The body ended: says whether what came last completes a chunk. The default says
    /// it does not.
    fn finish(&mut self) -> Progress {
        Progress::Pending
    }
}

/// What a [`Detector`] has seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// No complete first chunk yet.
    Pending,
    /// The first chunk is complete: the response can go to the caller.
    Found,
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{Detector, Progress};

    /// Feeds `input` in the given pieces and reports the result and the index of the
    /// piece at which the chunk was found (`pieces.len()` means at `finish`).
    pub(crate) fn run<D: Detector>(detector: &D, pieces: &[&[u8]]) -> (Progress, Option<usize>) {
        let mut d = detector.clone();
        for (i, piece) in pieces.iter().enumerate() {
            if d.feed(piece) == Progress::Found {
                return (Progress::Found, Some(i));
            }
        }
        let end = d.finish();
        (end, (end == Progress::Found).then_some(pieces.len()))
    }

    /// Asserts that `input` gives `expected` fed whole, byte by byte, and cut at every
    /// single position, and that the chunk completes at the same byte each way.
    pub(crate) fn assert_split_invariant<D: Detector>(
        detector: &D,
        input: &[u8],
        expected: Progress,
    ) {
        let whole = run(detector, &[input]).0;
        assert_eq!(
            whole,
            expected,
            "fed whole: {:?}",
            String::from_utf8_lossy(input)
        );

        // Byte by byte, the piece index is the byte offset of completion.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let (by_byte, at) = run(detector, &bytes);
        assert_eq!(
            by_byte,
            expected,
            "byte by byte: {:?}",
            String::from_utf8_lossy(input)
        );
        let completes_at = at.map(|i| if i == bytes.len() { usize::MAX } else { i + 1 });

        for cut in 0..=input.len() {
            let (head, tail) = input.split_at(cut);
            let (split, _) = run(detector, &[head, tail]);
            assert_eq!(
                split,
                expected,
                "cut at {cut}: {:?}",
                String::from_utf8_lossy(input)
            );
            if let Some(byte) = completes_at.filter(|&b| b != usize::MAX) {
                // Found in the head exactly when the completing byte is in it.
                let (_, piece) = run(detector, &[head, tail]);
                assert_eq!(
                    piece == Some(0),
                    byte <= cut,
                    "cut at {cut}, completes at {byte}"
                );
            }
        }
    }
}
