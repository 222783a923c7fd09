//! Every detector against hand-written captures of each provider's stream
//! (`tests/data/`), fed whole, byte by byte, cut at every position and in random
//! pieces, with the in-band error rules applied to the chunk found.

use super::test_util::{Outcome, assert_split_invariant, run, run_random_split, started};
use super::{Auto, Chunk, Detector, EventStream, JsonArray, Malformed, NdJson, Progress, Sse};
use crate::retry::{InBand, InBandErrors};

/// What a capture holds.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A first chunk that completes at this byte offset (exclusive; `None`: at the end
    /// of the body), and what the in-band rules make of it.
    Chunk(Option<usize>, InBand),
    /// No first chunk.
    Nothing,
    /// Broken framing, with this problem.
    Malformed(&'static str),
}

use Expect::*;
use InBand::{Content, TerminalError, TransientError};

const SSE: &[(&str, Expect)] = &[
    ("openai_chat.sse", Chunk(Some(297), Content)),
    ("openrouter_processing.sse", Chunk(Some(377), Content)),
    ("anthropic_messages.sse", Chunk(Some(333), Content)),
    ("anthropic_ping_first.sse", Chunk(Some(413), Content)),
    ("anthropic_overloaded.sse", Chunk(Some(138), TransientError)),
    (
        "anthropic_invalid_request.sse",
        Chunk(Some(147), TerminalError),
    ),
    ("openai_server_error.sse", Chunk(Some(159), TransientError)),
    ("openai_rate_limit.sse", Chunk(Some(331), TransientError)),
    (
        "openai_invalid_request.sse",
        Chunk(Some(268), TerminalError),
    ),
    ("sse_keepalives_only.sse", Nothing),
];

const NDJSON: &[(&str, Expect)] = &[
    ("ollama_chat.ndjson", Chunk(Some(125), Content)),
    ("ollama_no_final_newline.ndjson", Chunk(None, Content)),
    (
        "ollama_model_not_found.ndjson",
        Chunk(Some(61), TerminalError),
    ),
    (
        "ndjson_rate_limited.ndjson",
        Chunk(Some(48), TransientError),
    ),
];

const JSON_ARRAY: &[(&str, Expect)] = &[
    ("gemini_stream.json", Chunk(Some(439), Content)),
    ("gemini_overloaded.json", Chunk(Some(133), TransientError)),
    (
        "gemini_invalid_argument.json",
        Chunk(Some(127), TerminalError),
    ),
    ("gemini_empty.json", Malformed("the array is empty")),
    (
        "gemini_not_array.json",
        Malformed("the body does not start with `[`"),
    ),
];

const EVENT_STREAM: &[(&str, Expect)] = &[
    ("bedrock_converse.eventstream", Chunk(Some(167), Content)),
    (
        "bedrock_throttling.eventstream",
        Chunk(Some(178), TransientError),
    ),
    (
        "bedrock_service_unavailable.eventstream",
        Chunk(Some(177), TransientError),
    ),
    (
        "bedrock_model_stream_error.eventstream",
        Chunk(Some(322), TransientError),
    ),
    (
        "bedrock_internal_server.eventstream",
        Chunk(Some(201), TransientError),
    ),
    (
        "bedrock_validation.eventstream",
        Chunk(Some(231), TerminalError),
    ),
    (
        "bedrock_bad_prelude_crc.eventstream",
        Malformed("prelude CRC mismatch"),
    ),
    (
        "bedrock_bad_message_crc.eventstream",
        Malformed("message CRC mismatch"),
    ),
    (
        "bedrock_too_short.eventstream",
        Malformed("message length 12 is under the 16-byte minimum"),
    ),
    (
        "bedrock_too_long.eventstream",
        Malformed("message length 16777217 is over the 16 MiB maximum"),
    ),
    (
        "bedrock_large_first_event.eventstream",
        Chunk(Some(167), Content),
    ),
];

fn capture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Checks every capture in `table` with `detector`.
fn check<D: Detector>(detector: &D, format: &'static str, table: &[(&str, Expect)]) {
    for &(name, expect) in table {
        let input = capture(name);
        let progress = match expect {
            Chunk(..) => Progress::Found,
            Nothing => Progress::Pending,
            Malformed(problem) => Progress::Malformed(Malformed::new(format, problem)),
        };
        let whole = if input.len() <= 4096 {
            assert_split_invariant(detector, &input, progress)
        } else {
            let whole = run(detector, &[&input]);
            assert_eq!(whole.progress, progress, "{name}");
            whole
        };
        for seed in 0..16 {
            let split = run_random_split(detector, &input, seed);
            assert_eq!(
                (&split.progress, &split.chunk),
                (&whole.progress, &whole.chunk),
                "{name}, seed {seed}"
            );
        }
        if let Chunk(end, verdict) = expect {
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let at = run(detector, &bytes).at.expect("found");
            let found_at = (at < bytes.len()).then_some(at + 1);
            assert_eq!(found_at, end, "{name}: where the first chunk completes");
            assert_eq!(classify(&whole), verdict, "{name}");
        }
    }
}

fn classify(outcome: &Outcome) -> InBand {
    let Some((event, message_type, data, truncated)) = &outcome.chunk else {
        return Content;
    };
    let mut chunk = Chunk::new(data).with_truncated(*truncated);
    if let Some(event) = event {
        chunk = chunk.with_event(event);
    }
    if let Some(message_type) = message_type {
        chunk = chunk.with_message_type(message_type);
    }
    InBandErrors::default().classify(&chunk)
}

fn auto(content_type: &str) -> Auto {
    started(Auto::default(), Some(content_type))
}

#[test]
fn sse_captures() {
    check(&Sse::default(), "SSE", SSE);
    check(&auto("text/event-stream; charset=utf-8"), "SSE", SSE);
}

#[test]
fn ndjson_captures() {
    check(&NdJson::default(), "NDJSON", NDJSON);
    check(&auto("application/x-ndjson"), "NDJSON", NDJSON);
}

#[test]
fn json_array_captures() {
    check(&JsonArray::default(), "JSON array", JSON_ARRAY);
    // Auto takes a non-array body for a plain JSON response.
    let (arrays, plain): (Vec<_>, Vec<_>) = JSON_ARRAY
        .iter()
        .partition(|(_, expect)| matches!(expect, Chunk(..)));
    check(&auto("application/json"), "JSON array", &arrays);
    for (name, _) in plain {
        let outcome = run(&auto("application/json"), &[&capture(name)]);
        assert_eq!(
            (outcome.progress, outcome.chunk),
            (Progress::Found, None),
            "{name}"
        );
    }
}

#[test]
fn eventstream_captures() {
    check(&EventStream::default(), "AWS eventstream", EVENT_STREAM);
    check(
        &auto("application/vnd.amazon.eventstream"),
        "AWS eventstream",
        EVENT_STREAM,
    );
}
