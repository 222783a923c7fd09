//! The verdict: every invariant of the stack, checked from the run's own counts.

use std::sync::atomic::Ordering::Relaxed;

use crate::calls::Kind;
use crate::summary::{Summary, by_label};

/// Prints the verdict; returns the faults found, none if every invariant held.
pub fn print(s: &Summary<'_>) -> Vec<String> {
    let (args, inj) = (s.args, s.injected);
    let gauge = |name| by_label(s.families, name, "provider").values().sum::<f64>();
    let failed = |kind: Kind| -> u64 {
        s.failures
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, (n, _))| n)
            .sum()
    };
    // Every invariant, from the counts above.
    let mut faults = Vec::new();
    let mut check = |holds: bool, fault: String| {
        if !holds {
            faults.push(fault);
        }
    };
    let failed_all: u64 = s.failures.values().map(|(n, _)| n).sum();
    check(
        s.panicked == 0,
        format!("{} caller tasks panicked", s.panicked),
    );
    check(
        failed(Kind::Unexpected) == 0,
        format!("{} calls failed unexpectedly", failed(Kind::Unexpected)),
    );
    check(
        s.ok + failed_all == s.started,
        format!(
            "{} calls started, {} ended ok or failed",
            s.started,
            s.ok + failed_all
        ),
    );
    check(
        s.slots_free == args.limit,
        format!("{} of {} slots free at the end", s.slots_free, args.limit),
    );
    let (streams, attempts) = (
        gauge("streams_in_flight"),
        gauge("provider_calls_in_flight"),
    );
    check(
        streams == 0.0 && attempts == 0.0,
        format!("streams_in_flight {streams}, provider_calls_in_flight {attempts} at the end"),
    );
    check(
        s.upstream_open == 0,
        format!("{} upstream streams open at the end", s.upstream_open),
    );
    check(
        s.upstream_peak <= args.limit as u64,
        format!(
            "the upstream saw {} streams open at once, above the limit",
            s.upstream_peak
        ),
    );
    // Each stream the upstream reset after its first event must end its call with a
    // body error: one that did not was retried (or hidden) after a chunk.
    let (mid, injected_mid) = (failed(Kind::MidStream), inj.mid_reset.load(Relaxed));
    check(
        mid >= injected_mid,
        format!(
            "{injected_mid} mid-stream resets, {mid} calls failed mid-stream: retried after a chunk"
        ),
    );
    // With no dropped connections, nothing else may fail a stream mid-way.
    check(
        inj.drop.load(Relaxed) > 0 || mid <= injected_mid,
        format!("{mid} calls failed mid-stream, {injected_mid} resets injected"),
    );

    println!();
    if faults.is_empty() {
        println!("verdict: no fault. Every failure above is by design, and every invariant held:");
        println!("  every call ended ok or failed, every slot came back, the gauges are 0,");
        println!(
            "  no stream was retried after its first event, the upstream never saw more than the limit."
        );
    } else {
        println!("verdict: {} FAULTS", faults.len());
        for fault in &faults {
            println!("  - {fault}");
        }
    }
    faults
}
