use std::sync::Arc;

use super::{Capture, Chunk, Detector, Progress};

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
const DATA: &[u8] = b"data";
const EVENT: &[u8] = b"event";

/// The first chunk is the first server-sent event that carries data and is not a
/// keep-alive.
///
/// Follows the WHATWG "event stream interpretation": an optional byte order mark at the
/// start; lines end in CRLF, LF or CR (also when a CRLF is split across frames); a line
/// starting with `:` is a comment; a field's value loses one leading space; a `data`
/// field (`data: x`, `data:x`, or a bare `data` line) adds to the event; a blank line
/// dispatches it. Comments, events with no `data` field (`id: 7`, `retry: 100` alone),
/// events whose type is a keep-alive (`event: ping` by default, which Anthropic sends
/// with data) and an event cut off by the end of the body are not chunks. An event
/// whose only data line is empty (`data:`) is dispatched by browsers, so it counts.
///
/// The scan looks at each byte once and jumps over field values with `memchr`.
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, Progress, Sse};
///
/// let mut d = Sse::default();
/// assert_eq!(d.feed(b": keep-alive\n\n"), Progress::Pending);
/// assert_eq!(d.feed(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"), Progress::Pending);
/// assert_eq!(d.feed(b"data:{\"choices\":[]}\r"), Progress::Pending);
/// assert_eq!(d.feed(b"\n\r\n"), Progress::Found);
/// assert_eq!(d.first_chunk().unwrap().data(), b"{\"choices\":[]}");
/// ```
#[derive(Debug, Clone)]
#[must_use = "settings do nothing until a layer uses them"]
pub struct Sse {
    keep_alives: Arc<[Box<str>]>,
    line: Line,
    /// The previous byte was a CR, so an LF now is the rest of a CRLF.
    after_cr: bool,
    /// The event being read has a `data` field.
    has_data: bool,
    /// The event's type, and its data lines each followed by `\n`.
    event: Capture,
    data: Capture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of the stream, having matched this many bytes of a BOM.
    Bom(u8),
    /// In a field name (at the start of a line when `len` is 0) that so far matches
    /// `len` bytes of `data` and/or `event`.
    Name { len: u8, data: bool, event: bool },
    /// In the value of a `data` or `event` field; `fresh` until its first byte.
    Value { field: Field, fresh: bool },
    /// In the rest of a line that does not matter (a comment, another field).
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Event,
}

impl Line {
    const START: Line = Line::Name {
        len: 0,
        data: true,
        event: true,
    };
}

impl Default for Sse {
    fn default() -> Self {
        Self::new()
    }
}

impl Sse {
    /// An SSE detector whose only keep-alive event type is `ping`.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, Progress, Sse};
    ///
    /// let mut d = Sse::new();
    /// assert_eq!(d.feed(b"event: ping\ndata: {}\n\n"), Progress::Pending, "a keep-alive");
    /// assert_eq!(d.feed(b"event: message_start\ndata: {}\n\n"), Progress::Found);
    /// assert_eq!(d.first_chunk().unwrap().event(), Some("message_start"));
    /// ```
    pub fn new() -> Self {
        Self {
            keep_alives: Arc::from([Box::from("ping")]),
            line: Line::Bom(0),
            after_cr: false,
            has_data: false,
            event: Capture::default(),
            data: Capture::default(),
        }
    }

    /// The event types that are keep-alives, never a first chunk (default `ping`).
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, Progress, Sse};
    ///
    /// let mut d = Sse::new().keep_alive_events(["ping", "heartbeat"]);
    /// assert_eq!(d.feed(b"event: heartbeat\ndata: {}\n\n"), Progress::Pending);
    /// ```
    pub fn keep_alive_events<I>(self, events: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Box<str>>,
    {
        Self {
            keep_alives: events.into_iter().map(Into::into).collect(),
            ..self
        }
    }

    /// Ends the current line; a blank line dispatches the event.
    #[inline]
    fn end_line(&mut self, byte: u8, blank: bool) -> Progress {
        self.after_cr = byte == b'\r';
        self.line = Line::START;
        if !blank {
            return Progress::Pending;
        }
        if self.has_data && !self.is_keep_alive() {
            return Progress::Found;
        }
        // Dispatched and dropped (or nothing to dispatch): the next event starts afresh.
        self.has_data = false;
        self.event.clear();
        self.data.clear();
        Progress::Pending
    }

    fn is_keep_alive(&self) -> bool {
        !self.event.is_truncated()
            && self
                .keep_alives
                .iter()
                .any(|name| name.as_bytes() == self.event.bytes())
    }

    /// A field name ended (at a colon, or the end of the line).
    fn field(&mut self, len: u8, data: bool, event: bool) -> Option<Field> {
        if data && usize::from(len) == DATA.len() {
            self.has_data = true;
            Some(Field::Data)
        } else if event && usize::from(len) == EVENT.len() {
            self.event.clear();
            Some(Field::Event)
        } else {
            None
        }
    }

    /// A value ended at the end of its line.
    fn end_value(&mut self, field: Field) {
        if field == Field::Data {
            self.data.push(b"\n");
        }
    }

    fn capture(&mut self, field: Field) -> &mut Capture {
        match field {
            Field::Data => &mut self.data,
            Field::Event => &mut self.event,
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
                            Line::START
                        } else {
                            Line::Bom(matched + 1)
                        };
                        i += 1;
                    } else {
                        // No BOM: with nothing matched the byte starts the first line;
                        // after a partial match the line began with other bytes. The
                        // byte is looked at again in the new state.
                        self.line = if matched == 0 {
                            Line::START
                        } else {
                            Line::Skip
                        };
                    }
                    continue;
                }
                Line::Name { len, data, event } => {
                    if eol {
                        // A bare field name is that field with an empty value.
                        if let Some(field) = self.field(len, data, event) {
                            self.end_value(field);
                        }
                        if self.end_line(byte, len == 0) == Progress::Found {
                            return Progress::Found;
                        }
                    } else if byte == b':' {
                        self.line = match self.field(len, data, event) {
                            Some(field) => Line::Value { field, fresh: true },
                            None => Line::Skip,
                        };
                    } else {
                        let at = usize::from(len);
                        let data = data && DATA.get(at) == Some(&byte);
                        let event = event && EVENT.get(at) == Some(&byte);
                        self.line = if data || event {
                            Line::Name {
                                len: len + 1,
                                data,
                                event,
                            }
                        } else {
                            Line::Skip
                        };
                    }
                }
                Line::Value { field, fresh } => {
                    // One leading space is not part of the value.
                    let start = if fresh && byte == b' ' { i + 1 } else { i };
                    let rest = &bytes[start..];
                    match memchr::memchr2(b'\n', b'\r', rest) {
                        Some(at) => {
                            self.capture(field).push(&rest[..at]);
                            self.end_value(field);
                            i = start + at;
                            self.end_line(bytes[i], false);
                        }
                        None => {
                            self.capture(field).push(rest);
                            self.line = Line::Value {
                                field,
                                fresh: false,
                            };
                            return Progress::Pending;
                        }
                    }
                }
                Line::Skip => match memchr::memchr2(b'\n', b'\r', &bytes[i..]) {
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

    fn first_chunk(&self) -> Option<Chunk<'_>> {
        // The data buffer ends in the last data line's `\n`, which is not part of it.
        let data = self.data.bytes();
        let data = if self.data.is_truncated() {
            data
        } else {
            data.strip_suffix(b"\n").unwrap_or(data)
        };
        let chunk = Chunk::new(data).with_truncated(self.data.is_truncated());
        Some(match std::str::from_utf8(self.event.bytes()) {
            Ok(event) if !event.is_empty() => chunk.with_event(event),
            _ => chunk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::chunk::CAPTURE_LIMIT;
    use crate::frame::test_util::{assert_split_invariant, run, run_random_split};

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
        let outcome = run(
            &Sse::default(),
            &[b"event: ping\n\n", b"event: x\n\n", b"data: y\n\n"],
        );
        assert_eq!((outcome.progress, outcome.at), (Progress::Found, Some(2)));
        // Nor does its type.
        assert_eq!(outcome.chunk.unwrap().0, None);
    }

    #[test]
    fn completes_at_the_dispatching_blank_line() {
        // Everything up to the blank line does not complete the chunk.
        let d = Sse::default();
        assert_eq!(run(&d, &[b"data: x\n"]).progress, Progress::Pending);
        assert_eq!(run(&d, &[b"data: x\n", b"\n"]).at, Some(1));
        assert_eq!(run(&d, &[b"data: x\r", b"\n", b"\r\n"]).at, Some(2));
    }

    fn chunk(input: &str) -> (Option<String>, Vec<u8>, bool) {
        let outcome = assert_split_invariant(&Sse::default(), input.as_bytes(), Progress::Found);
        let (event, message_type, data, truncated) = outcome.chunk.expect("a chunk");
        assert_eq!(message_type, None);
        (event, data, truncated)
    }

    #[test]
    fn the_chunk_has_the_event_type_and_the_joined_data() {
        assert_eq!(chunk("data: x\n\n"), (None, b"x".to_vec(), false));
        assert_eq!(
            chunk("event: error\r\ndata: {\"a\":1}\r\ndata:  two\r\n\r\n"),
            (Some("error".into()), b"{\"a\":1}\n two".to_vec(), false)
        );
        // Only one leading space goes; a later `event` replaces an earlier one.
        assert_eq!(
            chunk("event: a\nevent:b\ndata\ndata:\n\n"),
            (Some("b".into()), b"\n".to_vec(), false)
        );
        // A bare `event` line resets the type.
        assert_eq!(
            chunk("event: x\nevent\ndata: y\n\n"),
            (None, b"y".to_vec(), false)
        );
        // Fields of a dropped keep-alive do not carry over.
        assert_eq!(
            chunk("event: ping\ndata: {\"type\":\"ping\"}\n\ndata: z\n\n"),
            (None, b"z".to_vec(), false)
        );
    }

    #[test]
    fn keep_alive_event_types_are_not_chunks() {
        not_found("event: ping\ndata: {\"type\": \"ping\"}\n\n");
        not_found("data: {}\nevent: ping\n\n");
        found("event: pings\ndata: x\n\n");
        found("event: pin\ndata: x\n\n");
        let custom = Sse::new().keep_alive_events(["heartbeat"]);
        assert_split_invariant(&custom, b"event: heartbeat\ndata: 1\n\n", Progress::Pending);
        assert_split_invariant(&custom, b"event: ping\ndata: 1\n\n", Progress::Found);
        let none = Sse::new().keep_alive_events(Vec::<String>::new());
        assert_split_invariant(&none, b"event: ping\ndata: 1\n\n", Progress::Found);
    }

    #[test]
    fn a_long_data_line_is_kept_up_to_the_limit() {
        let long = format!("data: {}\n\n", "x".repeat(CAPTURE_LIMIT + 10));
        let whole = run(&Sse::default(), &[long.as_bytes()]);
        let (_, _, data, truncated) = whole.chunk.clone().expect("a chunk");
        assert_eq!((data.len(), truncated), (CAPTURE_LIMIT, true));
        for seed in 0..8 {
            let split = run_random_split(&Sse::default(), long.as_bytes(), seed);
            assert_eq!(
                (split.progress, split.chunk),
                (whole.progress.clone(), whole.chunk.clone())
            );
        }
    }
}
