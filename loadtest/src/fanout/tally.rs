//! What the clients add up: per phase (steady, burst) the deliveries, their first and
//! last receipt and an HDR histogram of emit-to-receipt latency; losses, duplicates and
//! resumes overall.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::sync::Mutex;

pub(super) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Deliveries and latency of one phase (steady or burst).
pub(super) struct Phase {
    pub(super) received: AtomicU64,
    pub(super) first_receipt: AtomicU64,
    pub(super) last_receipt: AtomicU64,
    /// sharded so clients rarely wait on each other
    pub(super) latency: Vec<Mutex<Histogram<u64>>>,
}

impl Phase {
    pub(super) fn new() -> Self {
        Self {
            received: AtomicU64::new(0),
            first_receipt: AtomicU64::new(u64::MAX),
            last_receipt: AtomicU64::new(0),
            latency: (0..64)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")))
                .collect(),
        }
    }

    pub(super) async fn merged(&self) -> Histogram<u64> {
        let mut merged = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
        for shard in &self.latency {
            let _ = merged.add(&*shard.lock().await);
        }
        merged
    }
}

/// What every client adds up.
pub(super) struct Tally {
    pub(super) steady: Phase,
    pub(super) burst: Phase,
    /// emit time of the burst's first event; events emitted before are steady
    pub(super) burst_start: AtomicU64,
    pub(super) lost: AtomicU64,
    pub(super) duplicated: AtomicU64,
    /// sockets closed by the server (4008 slow consumer) that resumed
    pub(super) resumed: AtomicU64,
}

impl Tally {
    pub(super) fn new() -> Self {
        Self {
            steady: Phase::new(),
            burst: Phase::new(),
            burst_start: AtomicU64::new(u64::MAX),
            lost: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        }
    }

    pub(super) fn received(&self) -> u64 {
        self.steady.received.load(Ordering::Relaxed) + self.burst.received.load(Ordering::Relaxed)
    }
}

/// A thread's latencies, handed to the shared histograms in batches.
pub(super) struct Latencies {
    shard: usize,
    steady: Vec<u64>,
    burst: Vec<u64>,
}

impl Latencies {
    pub(super) fn new(shard: usize) -> Self {
        Self {
            shard,
            steady: Vec::with_capacity(4096),
            burst: Vec::with_capacity(4096),
        }
    }

    pub(super) fn record(&mut self, in_burst: bool, micros: u64, tally: &Tally) {
        let (local, phase) = if in_burst {
            (&mut self.burst, &tally.burst)
        } else {
            (&mut self.steady, &tally.steady)
        };
        local.push(micros);
        if local.len() >= 4096 {
            flush_into(phase, self.shard, local);
        }
    }

    pub(super) fn flush(&mut self, tally: &Tally) {
        flush_into(&tally.steady, self.shard, &mut self.steady);
        flush_into(&tally.burst, self.shard, &mut self.burst);
    }
}

fn flush_into(phase: &Phase, shard: usize, local: &mut Vec<u64>) {
    let mut histogram = phase.latency[shard % phase.latency.len()].blocking_lock();
    for micros in local.drain(..) {
        histogram.saturating_record(micros);
    }
}
