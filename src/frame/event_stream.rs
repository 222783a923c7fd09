use std::ops::Range;

use super::{Capture, Chunk, Detector, Malformed, Progress};

const FORMAT: &str = "AWS eventstream";
/// Prelude: total length, headers length, prelude CRC.
const PRELUDE: usize = 12;
/// The prelude and the message CRC: the smallest message.
const MIN_MESSAGE: u32 = 16;
const MAX_MESSAGE: u32 = 16 * 1024 * 1024;
const MAX_HEADERS: u32 = 128 * 1024;

/// The first chunk is the first AWS eventstream message (Bedrock's
/// `application/vnd.amazon.eventstream`) whose `:message-type` is `event`, or an
/// `exception` or `error` message (an in-band error).
///
/// Each message is checked as it arrives: its total length (16 bytes to 16 MiB), its
/// headers length (at most 128 KiB, inside the message), the prelude CRC32, the
/// header encoding and the message CRC32. Any failure is a terminal error
/// ([`Progress::Malformed`]): a corrupt stream would be corrupt again. Messages of
/// other types are skipped. The message is complete, and the chunk found, when its
/// CRC has been checked.
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, EventStream, Progress};
///
/// let mut d = EventStream::default();
/// // A total length of 8: under the 16-byte minimum.
/// let prelude = [0, 0, 0, 8, 0, 0, 0, 0];
/// let crc = crc32fast::hash(&prelude).to_be_bytes();
/// assert_eq!(d.feed(&prelude), Progress::Pending);
/// let Progress::Malformed(error) = d.feed(&crc) else { panic!() };
/// assert_eq!(
///     error.to_string(),
///     "malformed AWS eventstream stream: message length 8 is under the 16-byte minimum"
/// );
/// ```
#[derive(Debug, Clone)]
pub struct EventStream {
    part: Part,
    /// The prelude or the message CRC, as far as it has arrived.
    fixed: [u8; PRELUDE],
    have: usize,
    /// Bytes left in the headers or the payload.
    remaining: usize,
    payload_len: usize,
    crc: crc32fast::Hasher,
    headers: Vec<u8>,
    /// Where in `headers` the values that name the message are.
    message_type: Option<Range<usize>>,
    event: Option<Range<usize>>,
    payload: Capture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Prelude,
    Headers,
    Payload,
    Crc,
}

impl Default for EventStream {
    fn default() -> Self {
        Self {
            part: Part::Prelude,
            fixed: [0; PRELUDE],
            have: 0,
            remaining: 0,
            payload_len: 0,
            crc: crc32fast::Hasher::new(),
            headers: Vec::new(),
            message_type: None,
            event: None,
            payload: Capture::default(),
        }
    }
}

fn malformed(problem: impl Into<std::borrow::Cow<'static, str>>) -> Malformed {
    Malformed::new(FORMAT, problem)
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

impl EventStream {
    /// Copies up to `len` bytes into `fixed`; returns what is left of `bytes` and
    /// whether `fixed` now holds `len` bytes.
    fn fill<'a>(&mut self, bytes: &'a [u8], len: usize) -> (&'a [u8], bool) {
        let take = (len - self.have).min(bytes.len());
        self.fixed[self.have..self.have + take].copy_from_slice(&bytes[..take]);
        self.have += take;
        (&bytes[take..], self.have == len)
    }

    /// The prelude is complete: checks it and starts on the headers.
    fn prelude(&mut self) -> Result<(), Malformed> {
        let prelude = &self.fixed[..PRELUDE];
        let (total, headers) = (be32(&prelude[0..]), be32(&prelude[4..]));
        if crc32fast::hash(&prelude[..8]) != be32(&prelude[8..]) {
            return Err(malformed("prelude CRC mismatch"));
        }
        if total < MIN_MESSAGE {
            return Err(malformed(format!(
                "message length {total} is under the {MIN_MESSAGE}-byte minimum"
            )));
        }
        if total > MAX_MESSAGE {
            return Err(malformed(format!(
                "message length {total} is over the 16 MiB maximum"
            )));
        }
        if headers > MAX_HEADERS {
            return Err(malformed(format!(
                "headers length {headers} is over the 128 KiB maximum"
            )));
        }
        if headers > total - MIN_MESSAGE {
            return Err(malformed(format!(
                "headers length {headers} does not fit in message length {total}"
            )));
        }
        self.crc = crc32fast::Hasher::new();
        self.crc.update(prelude);
        self.headers.clear();
        self.payload.clear();
        self.remaining = headers as usize;
        self.payload_len = (total - MIN_MESSAGE - headers) as usize;
        self.part = Part::Headers;
        Ok(())
    }

    /// Moves past parts that are complete (or empty).
    fn advance(&mut self) -> Result<(), Malformed> {
        if self.part == Part::Headers && self.remaining == 0 {
            self.parse_headers()?;
            self.part = Part::Payload;
            self.remaining = self.payload_len;
        }
        if self.part == Part::Payload && self.remaining == 0 {
            self.part = Part::Crc;
            self.have = 0;
        }
        Ok(())
    }

    /// Finds `:message-type` and the name of the event, exception or error.
    fn parse_headers(&mut self) -> Result<(), Malformed> {
        let truncated = || malformed("a header runs past the end of the headers");
        let h = &self.headers;
        let (mut message_type, mut event) = (None, None);
        let mut at = 0;
        while at < h.len() {
            let name_len = usize::from(h[at]);
            if name_len == 0 {
                return Err(malformed("a header name is empty"));
            }
            let name = h.get(at + 1..at + 1 + name_len).ok_or_else(truncated)?;
            at += 1 + name_len;
            let kind = *h.get(at).ok_or_else(truncated)?;
            at += 1;
            let value_len = match kind {
                0 | 1 => 0,
                2 => 1,
                3 => 2,
                4 => 4,
                5 | 8 => 8,
                9 => 16,
                6 | 7 => {
                    let len = h.get(at..at + 2).ok_or_else(truncated)?;
                    at += 2;
                    usize::from(u16::from_be_bytes([len[0], len[1]]))
                }
                _ => return Err(malformed(format!("header value type {kind} is unknown"))),
            };
            let value = at..at + value_len;
            if value.end > h.len() {
                return Err(truncated());
            }
            let is_text = kind == 7 && std::str::from_utf8(&h[value.clone()]).is_ok();
            match name {
                b":message-type" if is_text => message_type = Some(value.clone()),
                b":event-type" | b":exception-type" | b":error-code" if is_text => {
                    event = Some(value.clone())
                }
                _ => {}
            }
            at = value.end;
        }
        self.message_type = message_type;
        self.event = event;
        Ok(())
    }

    fn text(&self, range: &Option<Range<usize>>) -> Option<&str> {
        // Checked to be UTF-8 when the headers were parsed.
        range
            .clone()
            .and_then(|r| std::str::from_utf8(&self.headers[r]).ok())
    }

    fn is_chunk(&self) -> bool {
        matches!(
            self.text(&self.message_type),
            Some("event" | "exception" | "error")
        )
    }

    fn step<'a>(&mut self, bytes: &'a [u8]) -> Result<(&'a [u8], bool), Malformed> {
        match self.part {
            Part::Prelude => {
                let (rest, full) = self.fill(bytes, PRELUDE);
                if full {
                    self.prelude()?;
                    self.advance()?;
                }
                Ok((rest, false))
            }
            Part::Headers | Part::Payload => {
                let (part, rest) = bytes.split_at(self.remaining.min(bytes.len()));
                self.crc.update(part);
                if self.part == Part::Headers {
                    self.headers.extend_from_slice(part);
                } else {
                    self.payload.push(part);
                }
                self.remaining -= part.len();
                self.advance()?;
                Ok((rest, false))
            }
            Part::Crc => {
                let (rest, full) = self.fill(bytes, 4);
                if !full {
                    return Ok((rest, false));
                }
                if self.crc.clone().finalize() != be32(&self.fixed) {
                    return Err(malformed("message CRC mismatch"));
                }
                self.part = Part::Prelude;
                self.have = 0;
                Ok((rest, self.is_chunk()))
            }
        }
    }
}

impl Detector for EventStream {
    fn feed(&mut self, mut bytes: &[u8]) -> Progress {
        while !bytes.is_empty() {
            match self.step(bytes) {
                Ok((_, true)) => return Progress::Found,
                Ok((rest, false)) => bytes = rest,
                Err(error) => return Progress::Malformed(error),
            }
        }
        Progress::Pending
    }

    fn first_chunk(&self) -> Option<Chunk<'_>> {
        let mut chunk = self.payload.chunk();
        if let Some(kind) = self.text(&self.message_type) {
            chunk = chunk.with_message_type(kind);
        }
        if let Some(event) = self.text(&self.event) {
            chunk = chunk.with_event(event);
        }
        Some(chunk)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::test_util::{assert_split_invariant, run};

    /// Encodes one message with string headers.
    pub(crate) fn message(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        for (name, value) in headers {
            h.push(name.len() as u8);
            h.extend_from_slice(name.as_bytes());
            h.push(7);
            h.extend_from_slice(&(value.len() as u16).to_be_bytes());
            h.extend_from_slice(value.as_bytes());
        }
        raw_message(&h, payload)
    }

    /// Encodes one message with the given raw headers section.
    pub(crate) fn raw_message(headers: &[u8], payload: &[u8]) -> Vec<u8> {
        let total = (16 + headers.len() + payload.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&total.to_be_bytes());
        m.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
        m.extend_from_slice(headers);
        m.extend_from_slice(payload);
        m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
        m
    }

    fn event(kind: &str, payload: &[u8]) -> Vec<u8> {
        message(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload,
        )
    }

    fn problem(input: &[u8]) -> String {
        match run(&EventStream::default(), &[input]).progress {
            Progress::Malformed(error) => {
                assert_split_invariant(
                    &EventStream::default(),
                    input,
                    Progress::Malformed(error.clone()),
                );
                error.problem().to_owned()
            }
            other => panic!("not malformed: {other:?}"),
        }
    }

    #[test]
    fn the_first_event_message_is_the_chunk() {
        let mut input = message(&[(":message-type", "initial-response")], b"{}");
        let first = event("messageStart", br#"{"role":"assistant"}"#);
        input.extend_from_slice(&first);
        let end = input.len();
        input.extend_from_slice(&event("contentBlockDelta", b"{}"));
        let outcome = assert_split_invariant(&EventStream::default(), &input, Progress::Found);
        let chunk = outcome.chunk.unwrap();
        assert_eq!(chunk.0.as_deref(), Some("messageStart"));
        assert_eq!(chunk.1.as_deref(), Some("event"));
        assert_eq!(chunk.2, br#"{"role":"assistant"}"#);
        // Found at the message's last byte.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&EventStream::default(), &bytes).at, Some(end - 1));
    }

    #[test]
    fn an_exception_is_a_chunk_with_its_type() {
        let input = message(
            &[
                (":exception-type", "throttlingException"),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            br#"{"message":"slow down"}"#,
        );
        let chunk = assert_split_invariant(&EventStream::default(), &input, Progress::Found)
            .chunk
            .unwrap();
        assert_eq!(chunk.0.as_deref(), Some("throttlingException"));
        assert_eq!(chunk.1.as_deref(), Some("exception"));
    }

    #[test]
    fn empty_headers_and_payload_are_valid_but_not_a_chunk() {
        let mut input = raw_message(b"", b"");
        assert_split_invariant(&EventStream::default(), &input, Progress::Pending);
        input.extend_from_slice(&event("x", b""));
        assert_split_invariant(&EventStream::default(), &input, Progress::Found);
    }

    #[test]
    fn other_header_types_are_skipped() {
        let mut headers = Vec::new();
        for (kind, value) in [
            (0u8, &[][..]),
            (1, &[]),
            (2, &[1]),
            (3, &[0, 1]),
            (4, &[0; 4]),
            (5, &[0; 8]),
            (6, &[0, 2, 0xff, 0xfe]),
            (8, &[0; 8]),
            (9, &[0; 16]),
        ] {
            headers.extend_from_slice(&[1, b'x', kind]);
            headers.extend_from_slice(value);
        }
        headers.extend_from_slice(b"\x0d:message-type\x07\x00\x05event");
        let input = raw_message(&headers, b"{}");
        assert_split_invariant(&EventStream::default(), &input, Progress::Found);
    }

    #[test]
    fn broken_framing_is_named() {
        let good = event("messageStart", b"{}");
        let mut bad_prelude = good.clone();
        bad_prelude[9] ^= 1;
        assert_eq!(problem(&bad_prelude), "prelude CRC mismatch");
        let mut bad_message = good.clone();
        bad_message[good.len() - 6] ^= 1;
        assert_eq!(problem(&bad_message), "message CRC mismatch");

        let prelude = |total: u32, headers: u32| {
            let mut p = total.to_be_bytes().to_vec();
            p.extend_from_slice(&headers.to_be_bytes());
            p.extend_from_slice(&crc32fast::hash(&p).to_be_bytes());
            p
        };
        assert_eq!(
            problem(&prelude(15, 0)),
            "message length 15 is under the 16-byte minimum"
        );
        assert_eq!(
            problem(&prelude(MAX_MESSAGE + 1, 0)),
            "message length 16777217 is over the 16 MiB maximum"
        );
        assert_eq!(
            problem(&prelude(MAX_MESSAGE, MAX_HEADERS + 1)),
            "headers length 131073 is over the 128 KiB maximum"
        );
        assert_eq!(
            problem(&prelude(20, 5)),
            "headers length 5 does not fit in message length 20"
        );
        assert_eq!(
            problem(&raw_message(b"\x00", b"")),
            "a header name is empty"
        );
        assert_eq!(
            problem(&raw_message(b"\x01x\x0a", b"")),
            "header value type 10 is unknown"
        );
        assert_eq!(
            problem(&raw_message(b"\x01x\x07\x00\x09abc", b"")),
            "a header runs past the end of the headers"
        );
        assert_eq!(
            problem(&raw_message(b"\x05x", b"")),
            "a header runs past the end of the headers"
        );
    }

    #[test]
    fn a_message_cut_off_by_the_end_is_not_a_chunk() {
        let good = event("messageStart", b"{}");
        for end in 0..good.len() {
            assert_eq!(
                run(&EventStream::default(), &[&good[..end]]).progress,
                Progress::Pending
            );
        }
    }
}
