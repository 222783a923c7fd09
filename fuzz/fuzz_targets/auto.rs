#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_stream_backpressure::frame::{Auto, Detector};
use tower_stream_backpressure_fuzz::{check_split_invariance, seed_and_body};

const CONTENT_TYPES: [&str; 6] = [
    "text/event-stream",
    "application/x-ndjson",
    "application/json",
    "application/vnd.amazon.eventstream",
    "text/plain",
    "",
];

fuzz_target!(|data: &[u8]| {
    let (seed, body) = seed_and_body(data);
    let content_type = CONTENT_TYPES[(seed % CONTENT_TYPES.len() as u64) as usize];
    let (head, ()) = http::Response::builder()
        .header("content-type", content_type)
        .body(())
        .expect("a valid response")
        .into_parts();
    let mut detector = Auto::default();
    detector.start(&head);
    check_split_invariance(&detector, seed, body);
});
