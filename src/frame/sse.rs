use super::{Detector, Progress};

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
const DATA: &[u8; 4] = b"data";

/// The first chunk is the first server-sent event that carries data.
///
/// Follows the WHATWG "event stream interpretation": an optional byte order mark at the
/// start; lines end in CRLF, LF or CR (also when a CRLF is split across frames); a line
/// starting with `:` is a comment; a `data` field (`data: x`, `data:x`, or a bare
/// `data` line) adds to the event; a blank line dispatches it. Comments, events with no
/// `data` field (`event: ping`, `id: 7`, `retry: 100` alone) and an event cut off by
/// the end of the body are not chunks. An event whose only data line is empty
/// (`data:`) is dispatched by browsers, so it counts.
///
/// The scan looks at each byte once and jumps over field values with `memchr`.
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, Progress, Sse};
///
/// let mut d = Sse::default();
/// assert_eq!(d.feed(b": keep-alive\n\n"), Progress::Pending);
/// assert_eq!(d.feed(b"event: ping\n\n"), Progress::Pending);
/// assert_eq!(d.feed(b"data:{\"choices\":[]}\r"), Progress::Pending);
/// assert_eq!(d.feed(b"\n\r\n"), Progress::Found);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Sse {
    line: Line,
    /// The previous byte was a CR, so an LF now is the rest of a CRLF.
    after_cr: bool,
    /// The event being read has a `data` field.
    has_data: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of the stream, having matched this many bytes of a BOM.
    Bom(u8),
    /// At the start of a line.
    Start,
    /// In a field name that so far matches this many bytes of `data`.
    Data(u8),
    /// In the rest of a line that does not matter (a comment, another field, a value).
    Rest,
}

impl Default for Line {
    fn default() -> Self {
        Line::Bom(0)
    }
}

impl Sse {
    /// Ends the current line; a blank line dispatches the event.
    #[inline]
    fn end_line(&mut self, byte: u8, blank: bool) -> Progress {
        self.after_cr = byte == b'\r';
        self.line = Line::Start;
        // A blank line dispatches the event; one without data dispatches nothing (and
        // `has_data` is still false for the next).
        if blank && self.has_data {
            Progress::Found
        } else {
            Progress::Pending
        }
    }
}

impl Detector for Sse {
    fn feed(&mut self, bytes: &[u8]) -> Progress {
        let mut i = 0;
        while i < bytes.len() {
            let byte = bytes[i];
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                i += 1;
                continue;
            }
            let eol = byte == b'\n' || byte == b'\r';
            match self.line {
                Line::Bom(matched) => {
                    if byte == BOM[usize::from(matched)] {
                        self.line = if matched == 2 {
                            Line::Start
                        } else {
                            Line::Bom(matched + 1)
                        };
                        i += 1;
                    } else {
                        // No BOM: with nothing matched the byte starts the first line;
                        // after a partial match the line began with other bytes. The
                        // byte is looked at again in the new state.
                        self.line = if matched == 0 {
                            Line::Start
                        } else {
                            Line::Rest
                        };
                    }
                    continue;
                }
                Line::Start => {
                    if eol {
                        if self.end_line(byte, true) == Progress::Found {
                            return Progress::Found;
                        }
                    } else {
                        self.line = if byte == DATA[0] {
                            Line::Data(1)
                        } else {
                            Line::Rest
                        };
                    }
                }
                Line::Data(matched) => {
                    let matched = usize::from(matched);
                    if matched == DATA.len() && (byte == b':' || eol) {
                        self.has_data = true;
                        if eol {
                            self.end_line(byte, false);
                        } else {
                            self.line = Line::Rest;
                        }
                    } else if eol {
                        self.end_line(byte, false);
                    } else if matched < DATA.len() && byte == DATA[matched] {
                        self.line = Line::Data(matched as u8 + 1);
                    } else {
                        self.line = Line::Rest;
                    }
                }
                Line::Rest => match memchr::memchr2(b'\n', b'\r', &bytes[i..]) {
                    Some(at) => {
                        i += at;
                        self.end_line(bytes[i], false);
                    }
                    None => return Progress::Pending,
                },
            }
            i += 1;
        }
        Progress::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_util::{assert_split_invariant, run};

    fn found(input: &str) {
        assert_split_invariant(&Sse::default(), input.as_bytes(), Progress::Found);
    }

    fn not_found(input: &str) {
        assert_split_invariant(&Sse::default(), input.as_bytes(), Progress::Pending);
    }

    #[test]
    fn data_events_are_chunks() {
        found("data: hello\n\n");
        found("data:hello\n\n");
        found("data\n\n");
        found("data:\n\n");
        found("event: message_start\ndata: {\"type\":\"message_start\"}\n\n");
        found("id: 1\ndata: a\ndata: b\nretry: 10\n\n");
        found("data: [DONE]\n\n");
    }

    #[test]
    fn every_line_ending_is_accepted() {
        found("data: x\r\n\r\n");
        found("data: x\r\r");
        found("data: x\n\r\n");
        found("data: x\r\n\n");
        found("data: x\r\n\r");
        found(": c\rdata: x\r\r");
    }

    #[test]
    fn a_leading_bom_is_skipped_once() {
        found("\u{FEFF}data: x\n\n");
        found("\u{FEFF}\n\ndata: x\n\n");
        // A second BOM is part of the field name, so the line is not `data`.
        not_found("\u{FEFF}\u{FEFF}data: x\n\n");
        // A BOM later in the stream is not skipped either.
        not_found(": c\n\u{FEFF}data: x\n\n");
    }

    #[test]
    fn keep_alives_and_data_less_events_are_not_chunks() {
        not_found(": keep-alive\n\n");
        not_found(":\n\n:\n\n");
        not_found("event: ping\n\n");
        not_found("id: 7\n\nretry: 1000\n\n");
        not_found("\n\n\r\n\r\r");
        not_found(":data: x\n\n");
    }

    #[test]
    fn only_the_exact_field_name_counts() {
        not_found("dat: x\n\n");
        not_found("dat\n\n");
        not_found("datax: x\n\n");
        not_found("DATA: x\n\n");
        not_found(" data: x\n\n");
        not_found("d\n\n");
    }

    #[test]
    fn an_event_cut_off_by_the_end_is_discarded() {
        not_found("data: x");
        not_found("data: x\n");
        not_found("data: x\r\n");
        not_found("");
    }

    #[test]
    fn a_data_less_event_does_not_leak_into_the_next() {
        // `event: ping` then a blank line: nothing; the next event has data.
        assert_eq!(
            run(
                &Sse::default(),
                &[b"event: ping\n\n", b"event: x\n\n", b"data: y\n\n"]
            ),
            (Progress::Found, Some(2))
        );
    }

    #[test]
    fn completes_at_the_dispatching_blank_line() {
        // Everything up to the blank line does not complete the chunk.
        let d = Sse::default();
        assert_eq!(run(&d, &[b"data: x\n"]).0, Progress::Pending);
        assert_eq!(run(&d, &[b"data: x\n", b"\n"]).1, Some(1));
        assert_eq!(run(&d, &[b"data: x\r", b"\n", b"\r\n"]).1, Some(2));
    }
}
