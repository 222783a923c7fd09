use super::{Capture, Chunk, Detector, Progress, is_json_whitespace};

/// The first chunk is the first line that is not blank, for newline-delimited JSON
/// (`application/x-ndjson`, `application/jsonl`: Ollama and others).
///
/// Lines end in `\n` (a `\r` before it is whitespace). A blank line, empty or only
/// whitespace, is a keep-alive. A last line without a newline counts when the body
/// ends. The line is not parsed: whatever it holds reaches the caller as sent.
///
/// ```
/// use tower_stream_backpressure::frame::{Detector, NdJson, Progress};
///
/// let mut d = NdJson::default();
/// assert_eq!(d.feed(b"\n  \r\n{\"model\":"), Progress::Pending);
/// assert_eq!(d.feed(b"\"llama3\"}\n"), Progress::Found);
/// assert_eq!(d.first_chunk().unwrap().data(), b"{\"model\":\"llama3\"}");
/// ```
#[derive(Debug, Clone)]
pub struct NdJson {
    /// The line so far has only whitespace.
    blank: bool,
    line: Capture,
}

impl Default for NdJson {
    fn default() -> Self {
        Self {
            blank: true,
            line: Capture::default(),
        }
    }
}

impl Detector for NdJson {
    fn feed(&mut self, bytes: &[u8]) -> Progress {
        let mut rest = bytes;
        loop {
            let (line, end) = match memchr::memchr(b'\n', rest) {
                Some(at) => (&rest[..at], Some(at)),
                None => (rest, None),
            };
            if self.blank {
                // Each byte is looked at until the first one that is not whitespace,
                // where the captured line starts.
                if let Some(start) = line.iter().position(|&b| !is_json_whitespace(b)) {
                    self.blank = false;
                    self.line.push(&line[start..]);
                }
            } else {
                self.line.push(line);
            }
            let Some(end) = end else {
                return Progress::Pending;
            };
            if !self.blank {
                return Progress::Found;
            }
            self.line.clear();
            rest = &rest[end + 1..];
        }
    }

    fn finish(&mut self) -> Progress {
        if self.blank {
            Progress::Pending
        } else {
            Progress::Found
        }
    }

    fn first_chunk(&self) -> Option<Chunk<'_>> {
        let chunk = self.line.chunk();
        Some(if chunk.is_truncated() {
            chunk
        } else {
            Chunk::new(chunk.data().trim_ascii_end())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::test_util::{assert_split_invariant, run};

    fn line(input: &str) -> Vec<u8> {
        let outcome = assert_split_invariant(&NdJson::default(), input.as_bytes(), Progress::Found);
        outcome.chunk.expect("a chunk").2
    }

    #[test]
    fn the_first_non_blank_line_is_the_chunk() {
        assert_eq!(line("{\"a\":1}\n{\"b\":2}\n"), b"{\"a\":1}");
        assert_eq!(line("\n\n \t\r\n{\"a\":1}\r\n"), b"{\"a\":1}");
        assert_eq!(line("  x  \n"), b"x");
    }

    #[test]
    fn a_last_line_without_newline_counts_at_the_end() {
        assert_eq!(line("\n{\"done\":true}"), b"{\"done\":true}");
        let outcome = run(&NdJson::default(), &[b"\n{\"done\":", b"true}"]);
        assert_eq!((outcome.progress, outcome.at), (Progress::Found, Some(2)));
    }

    #[test]
    fn blank_lines_alone_are_not_a_chunk() {
        for input in ["", "\n", "\n\r\n  \n", " \t "] {
            assert_split_invariant(&NdJson::default(), input.as_bytes(), Progress::Pending);
        }
    }
}
