//! The property every fuzz target checks: a detector gives the same answer, and the
//! same first chunk, however the body is split into frames, decides at the same byte,
//! and never panics.

use tower_stream_backpressure::frame::{Detector, Progress};

/// What a detector came to: its progress, the first chunk, and the index of the piece
/// that decided it (`None`: still pending after `finish`).
#[derive(Debug, PartialEq)]
struct Outcome {
    progress: Progress,
    chunk: Option<(Option<String>, Option<String>, Vec<u8>, bool)>,
}

fn run<D: Detector>(detector: &D, pieces: &[&[u8]]) -> (Outcome, Option<usize>) {
    let mut d = detector.clone();
    let mut decided = None;
    let mut progress = Progress::Pending;
    for (i, piece) in pieces.iter().enumerate() {
        progress = d.feed(piece);
        if progress != Progress::Pending {
            decided = Some(i);
            break;
        }
    }
    if decided.is_none() {
        progress = d.finish();
    }
    let chunk = (progress == Progress::Found)
        .then(|| d.first_chunk())
        .flatten()
        .map(|c| {
            (
                c.event().map(str::to_owned),
                c.message_type().map(str::to_owned),
                c.data().to_vec(),
                c.is_truncated(),
            )
        });
    (Outcome { progress, chunk }, decided)
}

/// Feeds `input` whole, byte by byte, and in pieces chosen by `seed`; panics if the
/// answers differ.
pub fn check_split_invariance<D: Detector>(detector: &D, seed: u64, input: &[u8]) {
    let (whole, _) = run(detector, &[input]);

    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    let (by_byte, deciding_byte) = run(detector, &bytes);
    assert_eq!(whole, by_byte, "byte by byte");

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pieces = Vec::new();
    let mut starts = Vec::new();
    let mut rest = input;
    let mut offset = 0;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(rng.usize(0..=rest.len().min(32)));
        pieces.push(piece);
        starts.push(offset);
        offset += piece.len();
        rest = tail;
    }
    let (split, decided) = run(detector, &pieces);
    assert_eq!(whole, split, "split at {starts:?}");
    if let Some(byte) = deciding_byte {
        // Decided in the piece that holds the deciding byte.
        let piece = decided.expect("decided");
        let (start, len) = (starts[piece], pieces[piece].len());
        assert!(
            start <= byte && byte < start + len,
            "decided in piece {piece} ({start}..{}), byte {byte}",
            start + len
        );
    }
}

/// Splits a fuzz input into a seed (its first 8 bytes) and the body.
pub fn seed_and_body(data: &[u8]) -> (u64, &[u8]) {
    if data.len() < 8 {
        return (0, data);
    }
    let (seed, body) = data.split_at(8);
    (u64::from_le_bytes(seed.try_into().expect("8 bytes")), body)
}
