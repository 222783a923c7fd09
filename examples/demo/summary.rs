//! The summary: what the upstream injected, what the layers did, and how the calls
//! ended, the failures sorted into those by design and those that would be a fault;
//! then the verdict.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use prometheus::proto::{MetricFamily, MetricType};

use crate::args::{Args, Injected, MetricsOut};
use crate::calls::{Failures, Kind, Latencies};

/// Everything the summary is made of, counted during and after the run.
pub struct Summary<'a> {
    pub args: &'a Args,
    pub started: u64,
    pub ok: u64,
    pub failures: &'a Failures,
    pub panicked: u64,
    pub latencies: &'a Latencies,
    /// RSS samples: seconds since the start, MiB.
    pub rss: &'a [(u64, f64)],
    pub wall: Duration,
    pub upstream_hits: u64,
    pub upstream_peak: u64,
    pub upstream_open: u64,
    pub slots_free: usize,
    pub injected: &'a Injected,
    pub families: &'a [MetricFamily],
    pub budget_left: u64,
}

/// Counter or gauge values of the metric family `name`, summed by the value of `label`.
pub fn by_label(families: &[MetricFamily], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    for family in families.iter().filter(|f| f.name() == name) {
        for metric in family.get_metric() {
            let key = metric.get_label().iter().find(|pair| pair.name() == label);
            let value = match family.get_field_type() {
                MetricType::COUNTER => metric.get_counter().get_value(),
                MetricType::GAUGE => metric.get_gauge().get_value(),
                _ => continue,
            };
            *values
                .entry(key.map_or("", |pair| pair.value()).to_owned())
                .or_insert(0.0) += value;
        }
    }
    values
}

fn row(name: &str, value: impl Display) {
    println!("  {name:<54} {value}");
}

/// Prints the summary and the verdict; returns the faults found, none if every
/// invariant held.
pub fn print(s: &Summary<'_>) -> Vec<String> {
    let (args, f, inj) = (s.args, &s.args.faults, s.injected);
    let retries = by_label(s.families, "stream_retries_total", "outcome");
    let retry = |outcome: &str| retries.get(outcome).copied().unwrap_or(0.0) as u64;
    let protocol = if args.http2 {
        "HTTP/2 (h2c)"
    } else {
        "HTTP/1.1"
    };
    println!();
    println!(
        "== {protocol}: {} calls by {} callers, limit {}, max wait {} ms, {:.2} s ==",
        s.started,
        args.concurrency,
        args.limit,
        args.max_wait.as_millis(),
        s.wall.as_secs_f64()
    );
    println!("faults the upstream injected");
    let burst = format!(
        "503, retry-after {} s ({} ms every {} ms)",
        f.retry_after, f.burst_length, f.burst_every
    );
    row(&burst, inj.status_503.load(Relaxed));
    row("reset before the first event", inj.reset.load(Relaxed));
    row("stall before the first event", inj.stall.load(Relaxed));
    row("reset mid-stream", inj.mid_reset.load(Relaxed));
    row("connection dropped", inj.drop.load(Relaxed));
    println!("what the layers did");
    row("upstream attempts", s.upstream_hits);
    for outcome in ["success", "failed", "exhausted", "budget_exhausted"] {
        row(&format!("retries, outcome={outcome}"), retry(outcome));
    }
    row("retry budget left", s.budget_left);
    row(
        "upstream peak open streams / limit",
        format!("{} / {}", s.upstream_peak, args.limit),
    );
    let (p50, p99) = (s.latencies.quantile_ms(0.5), s.latencies.quantile_ms(0.99));
    row(
        "first-chunk latency p50 / p99, slot wait included",
        format!("{p50} ms / {p99} ms"),
    );
    if let (Some(first), Some(last)) = (s.rss.first(), s.rss.last()) {
        // After warm-up: the first sample at least 10 s in, if the run was that long.
        let warm = s.rss.iter().find(|(t, _)| *t >= 10).unwrap_or(first);
        let samples: Vec<String> = s
            .rss
            .iter()
            .map(|(t, mib)| format!("{t}s {mib:.0}"))
            .collect();
        row("RSS samples (MiB)", samples.join(", "));
        let growth = format!(
            "{:.1} MiB at {} s, {:.1} at {} s",
            warm.1, warm.0, last.1, last.0
        );
        row("RSS after warm-up, at the end", growth);
    }

    println!("how the calls ended");
    row("ok: 2xx, read to `data: [DONE]`", s.ok);
    let mut kind_seen = None;
    for ((kind, reason), (n, error)) in s.failures {
        if kind_seen != Some(*kind) {
            kind_seen = Some(*kind);
            println!(
                "  {}",
                match kind {
                    Kind::Rejected =>
                        "by design: rejected at the limit (no slot within --max-wait)",
                    Kind::RetriesSpent =>
                        "by design: failed before the first event until the retries ran out",
                    Kind::MidStream => "by design: failed after the first event, and not retried",
                    Kind::Unexpected => "FAULT: failed in a way the stack should not produce",
                }
            );
        }
        row(&format!("  {reason}"), n);
        if !error.is_empty() {
            println!("      e.g. {error}");
        }
    }

    crate::verdict::print(s)
}

/// Writes the Prometheus text of `families` where `--metrics` or `--metrics-file` say,
/// and names the file.
pub fn write_metrics(out: &MetricsOut, families: &[MetricFamily]) {
    let mut text = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    prometheus::Encoder::encode(&encoder, families, &mut text).expect("the metrics encode");
    match out {
        MetricsOut::Stdout => println!(
            "== Prometheus metrics ==\n{}",
            String::from_utf8_lossy(&text)
        ),
        MetricsOut::File(path) => match std::fs::write(path, &text) {
            Ok(()) => println!(
                "Prometheus metrics written to {} (--metrics prints them)",
                path.display()
            ),
            Err(error) => eprintln!(
                "demo: cannot write the metrics to {}: {error}",
                path.display()
            ),
        },
    }
}
