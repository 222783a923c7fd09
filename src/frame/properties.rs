//! Properties of every detector over random inputs and random splits: the same
//! answer and the same first chunk as the input fed in one piece, never a panic, and
//! work linear in the bytes.

use proptest::prelude::*;

use super::event_stream::tests::{message, raw_message};
use super::test_util::{run, started};
use super::{Auto, Detector, EventStream, JsonArray, NdJson, Sse};

/// Bytes that matter to some format, mixed with any byte.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        any::<u8>().prop_map(|b| vec![b]),
        prop::sample::select(vec![
            &b"data"[..],
            b"data:",
            b"data: x",
            b"event: ping",
            b"event: error",
            b":",
            b"\n",
            b"\r",
            b"\r\n",
            b" ",
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b"\"",
            b"\\",
            b"\\\"",
            b"{\"error\":\"overloaded\"}",
            b"\xEF\xBB\xBF",
        ])
        .prop_map(<[u8]>::to_vec),
    ];
    prop::collection::vec(token, 0..64).prop_map(|tokens| tokens.concat())
}

/// Eventstream messages, some with a byte flipped, some cut short.
fn eventstream_body() -> impl Strategy<Value = Vec<u8>> {
    let one = (
        prop::sample::select(vec!["event", "exception", "error", "other"]),
        prop::collection::vec(any::<u8>(), 0..40),
        prop::option::of((any::<prop::sample::Index>(), 1u8..=255)),
    )
        .prop_map(|(kind, payload, flip)| {
            let mut m = message(&[(":message-type", kind), (":event-type", "x")], &payload);
            if let Some((at, bits)) = flip {
                let at = at.index(m.len());
                m[at] ^= bits;
            }
            m
        });
    (
        prop::collection::vec(one, 0..4),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(messages, cut)| {
            let all = messages.concat();
            let cut = cut.index(all.len() + 1);
            all[..cut].to_vec()
        })
}

/// Cut positions into `len` bytes.
fn cuts(input: &[u8], points: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = points.iter().map(|p| p.index(input.len() + 1)).collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    at.windows(2).map(|w| input[w[0]..w[1]].to_vec()).collect()
}

fn same_when_split<D: Detector>(detector: &D, input: &[u8], points: &[prop::sample::Index]) {
    let whole = run(detector, &[input]);
    let pieces = cuts(input, points);
    let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let split = run(detector, &pieces);
    assert_eq!(
        (&split.progress, &split.chunk),
        (&whole.progress, &whole.chunk)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sse_is_split_invariant(input in body(), points in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        same_when_split(&Sse::default(), &input, &points);
    }

    #[test]
    fn ndjson_is_split_invariant(input in body(), points in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        same_when_split(&NdJson::default(), &input, &points);
    }

    #[test]
    fn json_array_is_split_invariant(input in body(), points in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        same_when_split(&JsonArray::default(), &input, &points);
        same_when_split(&JsonArray::lenient(), &input, &points);
    }

    #[test]
    fn eventstream_is_split_invariant(
        input in prop_oneof![eventstream_body(), body()],
        points in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        same_when_split(&EventStream::default(), &input, &points);
    }

    #[test]
    fn auto_is_split_invariant(
        content_type in prop::sample::select(vec![
            "text/event-stream", "application/x-ndjson", "application/json",
            "application/vnd.amazon.eventstream", "text/plain",
        ]),
        input in body(),
        points in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        same_when_split(&started(Auto::default(), Some(content_type)), &input, &points);
    }
}

/// A 1 MiB first chunk arriving one byte per frame. Quadratic work would take hours
/// here (10^12 steps); linear work takes a fraction of a second, so a regression shows
/// as a hang, not as a flaky timing assertion.
#[test]
fn a_huge_first_chunk_one_byte_per_frame_is_linear() {
    const MIB: usize = 1 << 20;
    let text = vec![b'a'; MIB];
    let sse = [b"data: ".as_slice(), &text, b"\n\n"].concat();
    let ndjson = [b"{\"t\":\"".as_slice(), &text, b"\"}\n"].concat();
    let json = [b"[{\"t\":\"".as_slice(), &text, b"\"}]"].concat();
    let nested = [vec![b'['; MIB / 2], vec![b']'; MIB / 2]].concat();
    let nested = [b"[".as_slice(), &nested, b"]"].concat();
    let eventstream = message(&[(":message-type", "event")], &text);
    fn one_byte_at_a_time<D: Detector>(detector: &D, input: &[u8]) -> Option<usize> {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        run(detector, &bytes).at
    }
    assert_eq!(
        one_byte_at_a_time(&Sse::default(), &sse),
        Some(sse.len() - 1)
    );
    assert_eq!(
        one_byte_at_a_time(&NdJson::default(), &ndjson),
        Some(ndjson.len() - 1)
    );
    assert_eq!(
        one_byte_at_a_time(&JsonArray::default(), &json),
        Some(json.len() - 2)
    );
    assert_eq!(
        one_byte_at_a_time(&JsonArray::default(), &nested),
        Some(nested.len() - 2)
    );
    let at = one_byte_at_a_time(&EventStream::default(), &eventstream);
    assert_eq!(at, Some(eventstream.len() - 1));
    // A long headers section, one byte at a time, too.
    let headers = [vec![1, b'x', 6, 0xff, 0xff], vec![0; 0xffff]].concat();
    let long_headers = raw_message(&headers, b"");
    assert_eq!(
        one_byte_at_a_time(&EventStream::default(), &long_headers),
        None
    );
}
