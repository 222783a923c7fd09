//! What the demo prints while the calls run: a progress line on stderr, and the
//! process's memory (RSS) every `--rss-every` seconds.

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tower_stream_backpressure::StreamConcurrencyLayer;
use tower_stream_backpressure_testkit::process::rss_bytes;

use crate::calls::Counts;

/// RSS samples: seconds since the start, MiB.
#[derive(Clone)]
pub struct Rss {
    started: Instant,
    samples: Arc<Mutex<Vec<(u64, f64)>>>,
}

impl Rss {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            samples: Arc::default(),
        }
    }

    /// Takes a sample, if the system says.
    pub fn sample(&self) -> Option<(u64, f64)> {
        let mib = rss_bytes()? as f64 / (1024.0 * 1024.0);
        let at = self.started.elapsed().as_secs();
        self.lock().push((at, mib));
        Some((at, mib))
    }

    pub fn samples(&self) -> Vec<(u64, f64)> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, f64)>> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Redraws the progress line every 250 ms, and samples the RSS `every` so often,
/// until aborted.
pub fn spawn(
    counts: Arc<Counts>,
    limit: StreamConcurrencyLayer,
    slots: usize,
    rss: Rss,
    every: Option<Duration>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut next_sample = every.map(|every| rss.started + every);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let (Some(at), Some(every)) = (next_sample, every) {
                if Instant::now() >= at {
                    next_sample = Some(at + every);
                    if let Some((at, mib)) = rss.sample() {
                        eprintln!("\n[{at:>4} s] RSS {mib:.1} MiB");
                    }
                }
            }
            let (ok, failed) = (counts.ok.load(Relaxed), counts.failed.load(Relaxed));
            let open = counts.in_flight.load(Relaxed);
            let held = slots - limit.available_slots();
            eprint!("\r{ok} ok  {failed} failed  {open} in flight  slots held {held}/{slots}   ");
            let _ = std::io::stderr().flush();
        }
    })
}
