use super::{Detector, Progress};

/// The first chunk is the first non-empty data frame, whatever the format.
///
/// For bodies that are not event streams (a JSON response, plain text), or when any
/// byte from the upstream means the call has started. A body that is empty by its head
/// (`Content-Length: 0`) is a complete answer; one that ends without a byte after its
/// head promised more is an end of stream before the first chunk.
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, FirstData, Progress};
///
/// let mut d = FirstData;
/// assert_eq!(d.feed(b""), Progress::Pending);
/// assert_eq!(d.feed(b"{"), Progress::Found);
///
/// assert_eq!(FirstData.empty(), Progress::Found);
/// assert_eq!(FirstData.finish(), Progress::Pending);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstData;

impl Detector for FirstData {
    fn feed(&mut self, bytes: &[u8]) -> Progress {
        if bytes.is_empty() {
            Progress::Pending
        } else {
            Progress::Found
        }
    }

    fn empty(&mut self) -> Progress {
        Progress::Found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_util::run;

    #[test]
    fn empty_frames_are_not_a_chunk() {
        let at = |pieces: &[&[u8]]| {
            let outcome = run(&FirstData, pieces);
            (outcome.progress, outcome.at)
        };
        assert_eq!(at(&[b"", b""]), (Progress::Pending, None));
        assert_eq!(at(&[b"", b"x"]), (Progress::Found, Some(1)));
        assert_eq!(at(&[]), (Progress::Pending, None));
    }
}
