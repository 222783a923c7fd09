//! Retry budget throughput: one `deposit` and one `withdraw` per operation, from 1 and
//! from 8 threads at once, ours next to tower's `TpsBudget`.
//!
//! ```text
//! cargo bench --bench budget
//! ```

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tower::retry::budget::{Budget, TpsBudget};
use tower_stream_backpressure::RetryBudget;

/// Runs `ops` deposit + withdraw pairs on each of `threads` threads, all started at
/// once; returns the wall time.
fn run<B: Budget + Send + Sync + 'static>(budget: Arc<B>, threads: usize, ops: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (budget, barrier) = (budget.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..ops {
                    budget.deposit();
                    std::hint::black_box(budget.withdraw());
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for handle in handles {
        handle.join().unwrap();
    }
    start.elapsed()
}

fn budget(c: &mut Criterion) {
    const OPS: u64 = 10_000;
    for threads in [1, 8] {
        let mut group = c.benchmark_group(format!("budget_{threads}_threads"));
        group.throughput(Throughput::Elements(OPS * threads as u64));
        group.bench_function(BenchmarkId::new("ours", threads), |b| {
            let budget = Arc::new(RetryBudget::default());
            b.iter_custom(|iters| (0..iters).map(|_| run(budget.clone(), threads, OPS)).sum());
        });
        group.bench_function(BenchmarkId::new("tower_tps", threads), |b| {
            let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
            b.iter_custom(|iters| (0..iters).map(|_| run(budget.clone(), threads, OPS)).sum());
        });
        group.finish();
    }
}

criterion_group!(benches, budget);
criterion_main!(benches);
