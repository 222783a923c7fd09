use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use super::error_json;
use crate::frame::Chunk;

/// What the first chunk of a `2xx` response turned out to be.
///
/// ```
/// use tower_stream_backpressure::frame::{Chunk, Detector, Progress, Sse};
/// use tower_stream_backpressure::retry::{InBand, InBandErrors};
///
/// // Anthropic's overload error, sent after `200 OK`.
/// let mut d = Sse::default();
/// let event = concat!(
///     "event: error\n",
///     r#"data: {"type":"error","error":{"type":"overloaded_error"}}"#,
///     "\n\n",
/// );
/// assert_eq!(d.feed(event.as_bytes()), Progress::Found);
///
/// let rules = InBandErrors::default();
/// let action = match rules.classify(&d.first_chunk().unwrap()) {
///     InBand::Content => "stream it to the caller",
///     InBand::TransientError => "retry",
///     InBand::TerminalError => "give the error to the caller",
///     _ => "a verdict of a later version",
/// };
/// assert_eq!(action, "retry");
/// assert_eq!(rules.classify(&Chunk::new(br#"{"choices":[]}"#)), InBand::Content);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InBand {
    /// Content: the response goes to the caller.
    Content,
    /// An error a retry may cure (overloaded, rate limited, unavailable, internal):
    /// a failure before the first chunk, retried like any other.
    TransientError,
    /// An error a retry would repeat (invalid request, authentication): the response
    /// goes to the caller untouched.
    TerminalError,
}

type Custom = Arc<dyn Fn(&Chunk<'_>) -> Option<InBand> + Send + Sync>;

/// Tells in-band errors in the first chunk from content, and transient ones from
/// terminal ones.
///
/// Providers report some failures after `200 OK`, as the first event: Anthropic's
/// `event: error` with `overloaded_error`, OpenAI's and Ollama's JSON objects with a
/// top-level `error`, Bedrock's eventstream `exception` messages. The built-in rules:
///
/// 1. The chunk is an **error** when its SSE event is `error`, its eventstream
///    `:message-type` is `exception` or `error`, or its data is a JSON object with a
///    top-level `error` key that is not `null`. Anything else is
///    [content](InBand::Content).
/// 2. Its **codes** are the eventstream exception type (or error code), and from the
///    JSON: `error` when it is a string, else `error.type`, `error.code` and
///    `error.status`.
/// 3. It is **[terminal](InBand::TerminalError)** when a code contains a
///    [`terminal`](Self::terminal) marker, else **[transient](InBand::TransientError)**
///    when a code contains a [`transient`](Self::transient) marker, else terminal.
///
/// Markers match **whole words**. A code is split into words at anything but letters
/// and digits and where `camelCase` changes case (`internalServerException` is
/// `internal server exception`, `HTTPError` is `http error`); a marker matches when,
/// ignoring case and everything but its letters and digits, it spells one or more
/// consecutive words of a code: `rate_limit_error` contains `RateLimit` and
/// `rate limit`, but `ratelimited` does not contain `rate limit`, and `throttl` matches
/// nothing. This matters for the free text some providers send (Ollama's
/// `{"error": "..."}`): "prompt exceeds the model's internal context limit" contains
/// none of the default markers, so it is terminal. A numeric marker must equal a
/// numeric code.
///
/// The default transient markers: `overloaded`, `rate limit`, `rate limited`,
/// `too many requests`, `throttling`, `throttled`, `unavailable`, `internal error`,
/// `internal server`, `server error`, `api error`, `model stream error`,
/// `resource exhausted`, `deadline exceeded`, and the codes `429`, `500`, `502`,
/// `503`, `504`, `529`. (A bare `internal` would take "internal context limit" for a
/// server error; Gemini's `INTERNAL` status comes with its code `500`.) No terminal
/// markers.
///
/// ```
/// use tower_stream_backpressure::frame::Chunk;
/// use tower_stream_backpressure::retry::{InBand, InBandErrors};
///
/// let rules = InBandErrors::default()
///     .transient("model_loading")
///     .terminal("insufficient_quota");
///
/// let overloaded = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
/// let chunk = Chunk::new(overloaded).with_event("error");
/// assert_eq!(rules.classify(&chunk), InBand::TransientError);
///
/// let quota = br#"{"error":{"type":"insufficient_quota","code":"rate_limit"}}"#;
/// assert_eq!(rules.classify(&Chunk::new(quota)), InBand::TerminalError);
///
/// let content = br#"{"choices":[{"delta":{"content":"error"}}]}"#;
/// assert_eq!(rules.classify(&Chunk::new(content)), InBand::Content);
/// ```
#[derive(Clone)]
#[must_use = "settings do nothing until a layer uses them"]
pub struct InBandErrors {
    transient: Vec<String>,
    terminal: Vec<String>,
    custom: Option<Custom>,
}

const TRANSIENT: &[&str] = &[
    "overloaded",
    "rate limit",
    "rate limited",
    "too many requests",
    "throttling",
    "throttled",
    "unavailable",
    "internal error",
    "internal server",
    "server error",
    "api error",
    "model stream error",
    "resource exhausted",
    "deadline exceeded",
    "429",
    "500",
    "502",
    "503",
    "504",
    "529",
];

impl Default for InBandErrors {
    fn default() -> Self {
        Self {
            transient: TRANSIENT.iter().map(|m| normalize(m)).collect(),
            terminal: Vec::new(),
            custom: None,
        }
    }
}

impl fmt::Debug for InBandErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InBandErrors")
            .field("transient", &self.transient)
            .field("terminal", &self.terminal)
            .field("custom", &self.custom.is_some())
            .finish()
    }
}

impl InBandErrors {
    /// Rules that take every first chunk for content: in-band errors reach the caller
    /// and are never retried.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::Chunk;
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    /// use tower_stream_backpressure::RetryPolicy;
    ///
    /// let overloaded = Chunk::new(br#"{"error":"overloaded"}"#);
    /// assert_eq!(InBandErrors::default().classify(&overloaded), InBand::TransientError);
    /// assert_eq!(InBandErrors::none().classify(&overloaded), InBand::Content);
    ///
    /// // Retry on statuses and stalls only.
    /// let policy = RetryPolicy::default().in_band_errors(InBandErrors::none());
    /// # let _ = policy;
    /// ```
    pub fn none() -> Self {
        Self::default().custom(|_| Some(InBand::Content))
    }

    /// Adds a marker for error codes that are transient (your provider's
    /// `model_loading`, say). A marker with no letter or digit would match every code:
    /// it is ignored.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::Chunk;
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    ///
    /// let loading = Chunk::new(br#"{"error":{"type":"model_loading","message":"warming up"}}"#);
    /// assert_eq!(InBandErrors::default().classify(&loading), InBand::TerminalError);
    /// let rules = InBandErrors::default().transient("ModelLoading");
    /// assert_eq!(rules.classify(&loading), InBand::TransientError);
    /// ```
    pub fn transient(mut self, marker: &str) -> Self {
        self.transient.extend(normalized(marker));
        self
    }

    /// Adds a marker for error codes that are terminal, even if a transient marker
    /// matches too (`insufficient_quota` is a `429` that waiting does not cure). A
    /// marker with no letter or digit is ignored.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::Chunk;
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    ///
    /// let quota = Chunk::new(br#"{"error":{"type":"insufficient_quota","code":"429"}}"#);
    /// assert_eq!(InBandErrors::default().classify(&quota), InBand::TransientError);
    /// let rules = InBandErrors::default().terminal("insufficient_quota");
    /// assert_eq!(rules.classify(&quota), InBand::TerminalError);
    /// ```
    pub fn terminal(mut self, marker: &str) -> Self {
        self.terminal.extend(normalized(marker));
        self
    }

    /// A rule consulted before the built-in ones: `Some` decides, `None` leaves the
    /// chunk to them.
    ///
    /// ```
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    ///
    /// // This provider reports overload as `data: {"status":"busy"}`.
    /// let rules = InBandErrors::default().custom(|chunk| {
    ///     (chunk.data() == br#"{"status":"busy"}"#).then_some(InBand::TransientError)
    /// });
    /// # let _ = rules;
    /// ```
    pub fn custom<F>(mut self, rule: F) -> Self
    where
        F: Fn(&Chunk<'_>) -> Option<InBand> + Send + Sync + 'static,
    {
        self.custom = Some(Arc::new(rule));
        self
    }

    /// Classifies a first chunk.
    ///
    /// ```
    /// use tower_stream_backpressure::frame::{Detector, NdJson, Progress};
    /// use tower_stream_backpressure::retry::{InBand, InBandErrors};
    ///
    /// // Ollama reports some failures as the first line of a `200 OK` stream.
    /// let mut d = NdJson::default();
    /// assert_eq!(d.feed(b"{\"error\":\"model is overloaded\"}\n"), Progress::Found);
    /// let verdict = InBandErrors::default().classify(&d.first_chunk().unwrap());
    /// assert_eq!(verdict, InBand::TransientError);
    /// ```
    pub fn classify(&self, chunk: &Chunk<'_>) -> InBand {
        if let Some(verdict) = self.custom.as_ref().and_then(|rule| rule(chunk)) {
            return verdict;
        }
        let Some(codes) = error_codes(chunk) else {
            return InBand::Content;
        };
        let codes: Vec<Vec<String>> = codes.iter().map(|code| words(code)).collect();
        let matches = |markers: &[String]| {
            markers.iter().any(|marker| {
                codes.iter().any(|words| {
                    if marker.bytes().all(|b| b.is_ascii_digit()) {
                        words.len() == 1 && words[0] == *marker
                    } else {
                        spells_consecutive_words(marker, words)
                    }
                })
            })
        };
        if matches(&self.terminal) || !matches(&self.transient) {
            InBand::TerminalError
        } else {
            InBand::TransientError
        }
    }
}

/// A marker as matched, or `None` when nothing of it is left to match.
fn normalized(marker: &str) -> Option<String> {
    Some(normalize(marker)).filter(|marker| !marker.is_empty())
}

/// Lower case, letters and digits only.
fn normalize(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// A code's words, in lower case: split at anything but ASCII letters and digits, and
/// where `camelCase` changes case (`HTTPErrorCode` is `http`, `error`, `code`).
fn words(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_ascii_alphanumeric() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            continue;
        }
        let before = i.checked_sub(1).map(|i| chars[i]);
        let after = chars.get(i + 1).copied();
        let starts_word = c.is_ascii_uppercase()
            && before.is_some_and(|b| {
                // `aB` and `1B`, or the last capital of an acronym: `PError`.
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || (b.is_ascii_uppercase() && after.is_some_and(|a| a.is_ascii_lowercase()))
            });
        if starts_word && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        word.push(c.to_ascii_lowercase());
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Whether `marker` (normalized) is exactly some consecutive run of `words`.
fn spells_consecutive_words(marker: &str, words: &[String]) -> bool {
    (0..words.len()).any(|start| {
        let mut rest = marker;
        for word in &words[start..] {
            match rest.strip_prefix(word.as_str()) {
                Some("") => return true,
                Some(shorter) => rest = shorter,
                None => return false,
            }
        }
        false
    })
}

/// The chunk's error codes, or `None` when it is not an error.
fn error_codes(chunk: &Chunk<'_>) -> Option<Vec<String>> {
    let mut codes = Vec::new();
    let mut is_error = chunk.event() == Some("error");
    if matches!(chunk.message_type(), Some("exception" | "error")) {
        is_error = true;
        codes.extend(chunk.event().map(str::to_owned));
    }
    // Only data that mentions `"error"` is read: content rarely does.
    let data = chunk.data();
    if !chunk.is_truncated() && memchr::memmem::find(data, b"\"error\"").is_some() {
        if let Some(found) = error_json::error_codes(data) {
            is_error = true;
            codes.extend(found.into_iter().map(Cow::into_owned));
        }
    }
    is_error.then_some(codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(chunk: Chunk<'_>) -> InBand {
        InBandErrors::default().classify(&chunk)
    }

    #[test]
    fn content_is_content() {
        assert_eq!(classify(Chunk::new(b"[DONE]")), InBand::Content);
        assert_eq!(classify(Chunk::new(br#"{"error": null}"#)), InBand::Content);
        assert_eq!(
            classify(Chunk::new(br#"{"text": "\"error\": 1"}"#)),
            InBand::Content
        );
        assert_eq!(
            classify(Chunk::new(b"x").with_event("message_start")),
            InBand::Content
        );
        assert_eq!(
            classify(
                Chunk::new(b"{}")
                    .with_message_type("event")
                    .with_event("messageStart")
            ),
            InBand::Content
        );
    }

    #[test]
    fn transient_errors_by_provider() {
        // Anthropic, OpenAI, Ollama, Gemini, Bedrock.
        let anthropic =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            classify(Chunk::new(anthropic).with_event("error")),
            InBand::TransientError
        );
        let anthropic_api =
            br#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#;
        assert_eq!(
            classify(Chunk::new(anthropic_api).with_event("error")),
            InBand::TransientError
        );
        let openai =
            br#"{"error":{"message":"oops","type":"server_error","param":null,"code":null}}"#;
        assert_eq!(classify(Chunk::new(openai)), InBand::TransientError);
        let rate = br#"{"error":{"type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(classify(Chunk::new(rate)), InBand::TransientError);
        let ollama = br#"{"error":"rate limit exceeded, retry shortly"}"#;
        assert_eq!(classify(Chunk::new(ollama)), InBand::TransientError);
        let gemini = br#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#;
        assert_eq!(classify(Chunk::new(gemini)), InBand::TransientError);
        let gemini_500 = br#"{"error":{"code":500,"status":"INTERNAL"}}"#;
        assert_eq!(classify(Chunk::new(gemini_500)), InBand::TransientError);
        for exception in [
            "throttlingException",
            "serviceUnavailableException",
            "modelStreamErrorException",
            "internalServerException",
        ] {
            let chunk = Chunk::new(br#"{"message":"x"}"#)
                .with_message_type("exception")
                .with_event(exception);
            assert_eq!(classify(chunk), InBand::TransientError, "{exception}");
        }
    }

    #[test]
    fn terminal_errors_by_provider() {
        let anthropic = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long"}}"#;
        assert_eq!(
            classify(Chunk::new(anthropic).with_event("error")),
            InBand::TerminalError
        );
        let auth = br#"{"type":"error","error":{"type":"authentication_error"}}"#;
        assert_eq!(
            classify(Chunk::new(auth).with_event("error")),
            InBand::TerminalError
        );
        let openai =
            br#"{"error":{"type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        assert_eq!(classify(Chunk::new(openai)), InBand::TerminalError);
        let ollama = br#"{"error":"model \"llama9\" not found, try pulling it first"}"#;
        assert_eq!(classify(Chunk::new(ollama)), InBand::TerminalError);
        let gemini = br#"{"error":{"code":400,"status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(classify(Chunk::new(gemini)), InBand::TerminalError);
        let bedrock = Chunk::new(b"{}")
            .with_message_type("exception")
            .with_event("validationException");
        assert_eq!(classify(bedrock), InBand::TerminalError);
        // An error event whose data says nothing more.
        assert_eq!(
            classify(Chunk::new(b"oops").with_event("error")),
            InBand::TerminalError
        );
        // A number must match exactly: 5030 is not 503.
        assert_eq!(
            classify(Chunk::new(br#"{"error":{"code":5030}}"#)),
            InBand::TerminalError
        );
    }

    #[test]
    fn markers_and_custom_rules_are_added() {
        let loading = br#"{"error":{"type":"Model-Loading"}}"#;
        assert_eq!(classify(Chunk::new(loading)), InBand::TerminalError);
        let rules = InBandErrors::default().transient("model_loading");
        assert_eq!(rules.classify(&Chunk::new(loading)), InBand::TransientError);

        let quota = br#"{"error":{"type":"insufficient_quota","code":"429"}}"#;
        assert_eq!(classify(Chunk::new(quota)), InBand::TransientError);
        let rules = InBandErrors::default().terminal("insufficient quota");
        assert_eq!(rules.classify(&Chunk::new(quota)), InBand::TerminalError);

        let busy = InBandErrors::default()
            .custom(|chunk| (chunk.data() == b"busy").then_some(InBand::TransientError));
        assert_eq!(busy.classify(&Chunk::new(b"busy")), InBand::TransientError);
        assert_eq!(
            busy.classify(&Chunk::new(b"x").with_event("error")),
            InBand::TerminalError
        );
        let overloaded = Chunk::new(br#"{"error":"overloaded"}"#);
        assert_eq!(InBandErrors::none().classify(&overloaded), InBand::Content);

        // An empty marker would match everything: ignored.
        let terminal = Chunk::new(br#"{"error":{"type":"invalid_request_error"}}"#);
        let rules = InBandErrors::default().transient("").transient("__");
        assert_eq!(rules.classify(&terminal), InBand::TerminalError);
        let rules = InBandErrors::default().terminal(" - ");
        assert_eq!(rules.classify(&overloaded), InBand::TransientError);
    }

    #[test]
    fn markers_match_whole_words_of_free_text() {
        // Ollama's free text: "internal" here is no internal server error.
        let context = br#"{"error":"prompt exceeds the model's internal context limit"}"#;
        assert_eq!(classify(Chunk::new(context)), InBand::TerminalError);
        for text in [
            "Internal Server Error",
            "internal error, please retry",
            "rate limited, slow down",
            "Too Many Requests",
            "the model is overloaded",
        ] {
            let chunk = format!(r#"{{"error":"{text}"}}"#);
            assert_eq!(
                classify(Chunk::new(chunk.as_bytes())),
                InBand::TransientError,
                "{text}"
            );
        }
        for text in [
            "unthrottled access denied",
            "see apierrors.md",
            "the context limit was exceeded",
            "429 tokens is too many for this model",
        ] {
            let chunk = format!(r#"{{"error":"{text}"}}"#);
            assert_eq!(
                classify(Chunk::new(chunk.as_bytes())),
                InBand::TerminalError,
                "{text}"
            );
        }
    }

    #[test]
    fn codes_split_into_words_at_separators_and_case_changes() {
        let words = |code: &str| words(code).join(" ");
        assert_eq!(
            words("internalServerException"),
            "internal server exception"
        );
        assert_eq!(words("RESOURCE_EXHAUSTED"), "resource exhausted");
        assert_eq!(words("HTTPErrorCode"), "http error code");
        assert_eq!(words("rate-limit exceeded!"), "rate limit exceeded");
        assert_eq!(words("v2Beta"), "v2 beta");
        assert_eq!(words(" _ "), "");
        let markers = |marker: &str, code: &str| {
            spells_consecutive_words(&normalize(marker), &super::words(code))
        };
        assert!(markers("RateLimit", "rate_limit_error"));
        assert!(markers("limit error", "rate_limit_error"));
        assert!(!markers("ratelimit", "ratelimited"));
        assert!(!markers("rate limit", "rate_limited"));
        assert!(!markers("limiterror", "ratelimiterror"));
    }

    #[test]
    fn a_truncated_chunk_is_judged_by_its_names_only() {
        let chunk = Chunk::new(br#"{"error":"overloaded"#).with_truncated(true);
        assert_eq!(classify(chunk), InBand::Content);
        assert_eq!(classify(chunk.with_event("error")), InBand::TerminalError);
    }
}
