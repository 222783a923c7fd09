//! First-chunk detection speed: each detector on a large first event (1 MiB of text
//! in 16 KiB frames), next to a bare `memchr` scan of the same bytes for a newline,
//! the least any scan for a delimiter costs (the floor).
//!
//! ```text
//! cargo bench --bench detectors
//! ```

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_stream_backpressure::frame::{Detector, EventStream, JsonArray, NdJson, Progress, Sse};

const MIB: usize = 1 << 20;
const FRAME: usize = 16 * 1024;

/// 1 MiB of prose: no newline, quote or backslash.
fn text() -> Vec<u8> {
    b"The quick brown fox jumps over the lazy dog; "
        .iter()
        .copied()
        .cycle()
        .take(MIB)
        .collect()
}

/// One eventstream message with `payload`.
fn eventstream(payload: &[u8]) -> Vec<u8> {
    let mut headers = Vec::new();
    for (name, value) in [(":message-type", "event"), (":event-type", "chunk")] {
        headers.push(name.len() as u8);
        headers.extend_from_slice(name.as_bytes());
        headers.push(7);
        headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
        headers.extend_from_slice(value.as_bytes());
    }
    let total = (16 + headers.len() + payload.len()) as u32;
    let mut m = total.to_be_bytes().to_vec();
    m.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
    m.extend_from_slice(&headers);
    m.extend_from_slice(payload);
    m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
    m
}

fn find<D: Detector>(detector: &D, input: &[u8]) -> Progress {
    let mut d = detector.clone();
    for frame in input.chunks(FRAME) {
        let progress = d.feed(frame);
        if progress != Progress::Pending {
            return progress;
        }
    }
    d.finish()
}

fn floor(input: &[u8]) -> usize {
    input
        .chunks(FRAME)
        .map(|frame| memchr::memchr(b'\n', frame).unwrap_or(frame.len()))
        .sum()
}

fn detectors(c: &mut Criterion) {
    let text = text();
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "sse",
            [b"data: {\"t\":\"".as_slice(), &text, b"\"}\n\n"].concat(),
        ),
        (
            "ndjson",
            [b"{\"t\":\"".as_slice(), &text, b"\"}\n"].concat(),
        ),
        (
            "json_array",
            [b"[{\"t\":\"".as_slice(), &text, b"\"}]"].concat(),
        ),
        ("eventstream", eventstream(&text)),
    ];
    for (name, input) in &cases {
        let mut group = c.benchmark_group(format!("detect_{name}"));
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function("memchr_floor", |b| {
            b.iter(|| floor(std::hint::black_box(input)))
        });
        group.bench_function("detector", |b| {
            b.iter(|| {
                let progress = match *name {
                    "sse" => find(&Sse::default(), input),
                    "ndjson" => find(&NdJson::default(), input),
                    "json_array" => find(&JsonArray::default(), input),
                    _ => find(&EventStream::default(), input),
                };
                assert_eq!(progress, Progress::Found);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, detectors);
criterion_main!(benches);
