#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_stream_backpressure::frame::Sse;
use tower_stream_backpressure_fuzz::{check_split_invariance, seed_and_body};

fuzz_target!(|data: &[u8]| {
    let (seed, body) = seed_and_body(data);
    check_split_invariance(&Sse::default(), seed, body);
});
