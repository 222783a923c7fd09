use super::{is_json_whitespace, Capture, Chunk, Detector, Malformed, Progress};

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
/// `[]` and a body that does not start with `[` are terminal errors
/// ([`Progress::Malformed`]): the upstream would send the same again.
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
                        _ => self.state = State::Scalar,
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

    fn first_chunk(&self) -> Option<Chunk<'_>> {
        (self.state != State::Plain).then(|| self.element.chunk())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_util::assert_split_invariant;

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
    fn lenient_takes_a_plain_document_at_its_first_byte() {
        let lenient = JsonArray::lenient();
        for input in ["{\"id\": 1}", " []", "\"x\""] {
            let outcome = assert_split_invariant(&lenient, input.as_bytes(), Progress::Found);
            assert_eq!(outcome.chunk, None);
        }
        assert_split_invariant(&lenient, b"[[1]]", Progress::Found);
    }
}
