use super::{Capture, Chunk, Detector, Malformed, Progress, is_json_whitespace};

const FORMAT: &str = "JSON array";

/// The first chunk is the first element of a top-level JSON array that arrives
/// incrementally (Gemini's `streamGenerateContent` without `alt=sse`).
///
/// Whitespace is skipped, then the body must open with `[`. Whitespace and commas may
/// come before the first element, which is complete when it closes: an object or array
/// at its matching bracket, a string at its closing quote, a number or literal at the
/// delimiter after it. Strings and their escapes are tracked, so brackets inside
/// strings do not count. The element is not validated further: it reaches the caller
/// as sent.
///
/// `[]`, a body that does not start with `[`, and an element that starts with a byte
/// no JSON value starts with (`[x`, `['`) are terminal errors
/// ([`Progress::Malformed`]), at that byte: the upstream would send the same again.
/// A body that ends before its first element is complete (empty, or cut short) is an
/// end of stream before the first chunk.
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, JsonArray, Progress};
///
/// let mut d = JsonArray::default();
/// assert_eq!(d.feed(b"[{\"text\": \"a ] and a }\""), Progress::Pending);
/// assert_eq!(d.feed(b"}\n,\r\n{"), Progress::Found);
/// assert_eq!(d.first_chunk().unwrap().data(), b"{\"text\": \"a ] and a }\"}");
///
/// assert!(matches!(JsonArray::default().feed(b" []"), Progress::Malformed(_)));
/// ```
#[derive(Debug, Clone, Default)]
pub struct JsonArray {
    state: State,
    /// Open objects and arrays in the element.
    depth: u64,
    /// A body that is not an array is a plain document, found at its first byte.
    lenient: bool,
    /// Any bytes came (lenient: a body that ends after bytes is a complete document).
    fed: bool,
    element: Capture,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Before the `[`.
    #[default]
    Start,
    /// After the `[`, before the first element.
    Open,
    /// In an object or array element, outside strings.
    Nested,
    /// In a string; `top` when the string is the element itself.
    Text { escaped: bool, top: bool },
    /// In a number or literal element.
    Scalar,
    /// The body is not an array (lenient only): nothing to capture.
    Plain,
}

impl JsonArray {
    /// Like the default, but a body that is not an array (or is `[]`) is a plain JSON
    /// document whose first byte is the first chunk: what [`Auto`](super::Auto) uses
    /// for `application/json`, where a response may not be a stream at all.
    pub(crate) fn lenient() -> Self {
        Self {
            lenient: true,
            ..Self::default()
        }
    }

    /// What lenient makes of a body that is not (or not yet) a stream's first element.
    fn plain_document(&mut self) -> Progress {
        if self.lenient {
            self.state = State::Plain;
            Progress::Found
        } else {
            Progress::Pending
        }
    }

    fn not_a_stream(&mut self, problem: &'static str) -> Progress {
        if self.lenient {
            self.state = State::Plain;
            Progress::Found
        } else {
            Progress::Malformed(Malformed::new(FORMAT, problem))
        }
    }
}

impl Detector for JsonArray {
    fn feed(&mut self, bytes: &[u8]) -> Progress {
        self.fed |= !bytes.is_empty();
        // Where the element's bytes in this frame start, once in it.
        let mut from = match self.state {
            State::Nested | State::Text { .. } | State::Scalar => Some(0),
            _ => None,
        };
        let mut i = 0;
        while i < bytes.len() {
            let byte = bytes[i];
            match self.state {
                State::Start => match byte {
                    b'[' => self.state = State::Open,
                    _ if is_json_whitespace(byte) => {}
                    _ => return self.not_a_stream("the body does not start with `[`"),
                },
                State::Open => {
                    match byte {
                        b',' => {}
                        _ if is_json_whitespace(byte) => {}
                        b']' => return self.not_a_stream("the array is empty"),
                        b'{' | b'[' => {
                            self.depth = 1;
                            self.state = State::Nested;
                        }
                        b'"' => {
                            self.state = State::Text {
                                escaped: false,
                                top: true,
                            }
                        }
                        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => self.state = State::Scalar,
                        // Nothing else can start a JSON value: waiting would only
                        // run into the first-chunk timeout, and a retry gets the same.
                        _ => {
                            return self.not_a_stream(
                                "an element starts with a byte no JSON value starts with",
                            );
                        }
                    }
                    if self.state != State::Open {
                        from = Some(i);
                    }
                }
                State::Nested => match byte {
                    b'"' => {
                        self.state = State::Text {
                            escaped: false,
                            top: false,
                        }
                    }
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.element.push(&bytes[from.unwrap_or(0)..=i]);
                            return Progress::Found;
                        }
                    }
                    _ => {}
                },
                State::Text { escaped: true, top } => {
                    self.state = State::Text {
                        escaped: false,
                        top,
                    };
                }
                State::Text {
                    escaped: false,
                    top,
                } => match memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                    None => break,
                    Some(at) => {
                        i += at;
                        if bytes[i] == b'\\' {
                            self.state = State::Text { escaped: true, top };
                        } else if top {
                            self.element.push(&bytes[from.unwrap_or(0)..=i]);
                            return Progress::Found;
                        } else {
                            self.state = State::Nested;
                        }
                    }
                },
                State::Scalar => {
                    if byte == b',' || byte == b']' || is_json_whitespace(byte) {
                        self.element.push(&bytes[from.unwrap_or(0)..i]);
                        return Progress::Found;
                    }
                }
                State::Plain => return Progress::Found,
            }
            i += 1;
        }
        if let Some(from) = from {
            self.element.push(&bytes[from..]);
        }
        Progress::Pending
    }

    /// Lenient only: the end of a body that had bytes is the end of a plain document,
    /// complete whatever came before it (a short answer, an array cut short).
    fn finish(&mut self) -> Progress {
        if self.fed {
            self.plain_document()
        } else {
            Progress::Pending
        }
    }

    /// Lenient only: `Content-Length: 0` is an empty plain answer.
    fn empty(&mut self) -> Progress {
        self.plain_document()
    }

    /// Lenient only: a list whose first element is larger than the buffer is a plain
    /// document (an images response with `b64_json`), not a stream.
    fn buffer_full(&mut self) -> Progress {
        self.plain_document()
    }

    fn first_chunk(&self) -> Option<Chunk<'_>> {
        (self.state != State::Plain).then(|| self.element.chunk())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_util::{assert_split_invariant, run};

    fn element(input: &str) -> String {
        let outcome =
            assert_split_invariant(&JsonArray::default(), input.as_bytes(), Progress::Found);
        String::from_utf8(outcome.chunk.expect("a chunk").2).unwrap()
    }

    fn malformed(input: &str, problem: &str) {
        let expected = Progress::Malformed(Malformed::new(FORMAT, problem.to_owned()));
        assert_split_invariant(&JsonArray::default(), input.as_bytes(), expected);
    }

    #[test]
    fn the_first_element_is_the_chunk() {
        assert_eq!(element("[{\"a\":1},{\"b\":2}]"), "{\"a\":1}");
        assert_eq!(
            element(" \r\n[\n  {\"a\": [1, {\"b\": []}]}\n,\r\n{"),
            "{\"a\": [1, {\"b\": []}]}"
        );
        assert_eq!(element("[ , ,[1,2]"), "[1,2]");
        assert_eq!(element("[\"a]\\\"}\"]"), "\"a]\\\"}\"");
        assert_eq!(element("[12.5e3, 1]"), "12.5e3");
        assert_eq!(element("[true]"), "true");
        assert_eq!(element("[null\n]"), "null");
    }

    #[test]
    fn brackets_and_escapes_inside_strings_do_not_count() {
        assert_eq!(
            element(r#"[{"t": "} ] { [ \" \\", "u": "\\\\\"}"}]"#),
            r#"{"t": "} ] { [ \" \\", "u": "\\\\\"}"}"#
        );
    }

    #[test]
    fn an_element_cut_off_by_the_end_is_not_a_chunk() {
        for input in ["", "  ", "[", "[ ,", "[{\"a\":1", "[\"abc", "[12"] {
            assert_split_invariant(&JsonArray::default(), input.as_bytes(), Progress::Pending);
        }
    }

    #[test]
    fn an_empty_array_or_a_non_array_is_terminal() {
        malformed("[]", "the array is empty");
        malformed(" [ \n, ]", "the array is empty");
        malformed("{\"error\": {}}", "the body does not start with `[`");
        malformed("\u{FEFF}[1]", "the body does not start with `[`");
    }

    #[test]
    fn an_element_that_cannot_start_a_json_value_is_terminal_at_that_byte() {
        let problem = "an element starts with a byte no JSON value starts with";
        for input in ["[x", "['a']", "[*", " [ , }", "[\u{FEFF}1]"] {
            malformed(input, problem);
        }
        // Every byte that can start a value still waits for the element to complete.
        for input in ["[-1", "[0", "[9", "[t", "[f", "[n", "[\"", "[{", "[["] {
            assert_split_invariant(&JsonArray::default(), input.as_bytes(), Progress::Pending);
        }
        // The byte that decides is the first of the element.
        let mut d = JsonArray::default();
        assert_eq!(d.feed(b" [\n "), Progress::Pending);
        assert!(matches!(d.feed(b"x"), Progress::Malformed(_)));
    }

    #[test]
    fn strict_waits_at_the_end_and_at_the_buffer_cap() {
        for input in ["", "[", "[{\"a\":", "[12"] {
            let mut d = JsonArray::default();
            let _ = d.feed(input.as_bytes());
            assert_eq!(d.finish(), Progress::Pending, "{input:?}");
            assert_eq!(d.buffer_full(), Progress::Pending, "{input:?}");
        }
        assert_eq!(JsonArray::default().empty(), Progress::Pending);
    }

    #[test]
    fn lenient_takes_the_end_of_the_body_and_a_full_buffer_as_a_plain_document() {
        assert_eq!(JsonArray::lenient().empty(), Progress::Found);
        // Ending without a byte after the head promised more: no answer at all.
        assert_eq!(
            run(&JsonArray::lenient(), &[b"", b""]).progress,
            Progress::Pending
        );
        for input in [" ", "[", "[{\"b64_json\": \"AAAA", "[12"] {
            let outcome = run(&JsonArray::lenient(), &[input.as_bytes()]);
            assert_eq!(outcome.progress, Progress::Found, "{input:?}");
            assert_eq!(
                outcome.chunk, None,
                "content, not an in-band error: {input:?}"
            );
            let mut d = JsonArray::lenient();
            let _ = d.feed(input.as_bytes());
            assert_eq!(d.buffer_full(), Progress::Found, "{input:?}");
            assert!(d.first_chunk().is_none());
        }
        // Not a JSON value at all: a plain (broken) document for the caller to judge.
        assert_eq!(
            run(&JsonArray::lenient(), &[b"[x"]).progress,
            Progress::Found
        );
    }

    #[test]
    fn lenient_takes_a_plain_document_at_its_first_byte() {
        let lenient = JsonArray::lenient();
        for input in ["{\"id\": 1}", " []", "\"x\""] {
            let outcome = assert_split_invariant(&lenient, input.as_bytes(), Progress::Found);
            assert_eq!(outcome.chunk, None);
        }
        assert_split_invariant(&lenient, b"[[1]]", Progress::Found);
    }
}
