//! Giving the heap's freed memory back to the kernel.
//!
//! glibc's malloc keeps what a thread frees in that thread's arena, and a hub's
//! threads (the blocking pool's come and go with syncs and reads) leave their arenas
//! riddled with free pages it never returns. Measured with 63,000 projects on one hub
//! (docs/benchmarks.md, *Many projects*): 89 MB of the heap in use, 262 MB held;
//! one `malloc_trim(0)` brought the resident memory to 121 MB. So a serving process
//! trims every `HIVESYNC_MALLOC_TRIM_S` seconds: `malloc_trim` walks every arena and
//! hands each free page back (`MADV_DONTNEED`), keeping the address space.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Hands the heap's free pages back to the kernel now; whether anything was given
/// back. Elsewhere than glibc, nothing to do.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointer; it locks each arena while it walks it
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A memory figure of `/proc/PID/status` (`VmRSS`, `RssAnon`, …, which it gives in
/// kB) in bytes: of process `pid`, or of this one with `None`. `None` where there is
/// none to read.
pub fn status_bytes(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |pid| format!("/proc/{pid}/status"),
    );
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|line| {
        line.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// This process's anonymous resident memory (`RssAnon`), 0 where there is none to
/// read.
pub fn rss_anon() -> u64 {
    status_bytes(None, "RssAnon").unwrap_or(0)
}

/// Trims every `every` until `stop` (`every` zero: never), counting each trim, its
/// duration and the resident memory it gave back in `metrics`.
pub fn spawn_trimming(every: Duration, metrics: Arc<Metrics>, stop: CancellationToken) {
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // a walk of every arena under its lock: off the async threads
            let trimmed = tokio::task::spawn_blocking(|| {
                let before = rss_anon();
                let started = Instant::now();
                trim();
                let took = started.elapsed();
                (took, before.saturating_sub(rss_anon()))
            })
            .await;
            let Ok((took, released)) = trimmed else {
                continue;
            };
            metrics.heap_trimmed(took.as_secs_f64(), released);
            tracing::trace!(released, took_us = took.as_micros() as u64, "heap trimmed");
        }
    });
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::rss_anon;

    #[test]
    fn trimming_gives_a_threads_freed_memory_back() {
        // a thread fills its arena with small blocks and frees all but one in 64, so
        // the arena's top stays in use and glibc gives nothing back on its own
        let kept = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..400_000).map(|i| vec![i as u8; 500]).collect();
            blocks
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % 64 == 0)
                .map(|(_, block)| block)
                .collect::<Vec<_>>()
        })
        .join()
        .expect("the allocating thread");
        let before = rss_anon();
        assert!(super::trim(), "malloc_trim gave nothing back");
        let after = rss_anon();
        // ~200 MB were freed; other tests of this binary allocate meanwhile
        assert!(
            before.saturating_sub(after) > 100 << 20,
            "resident {before} B before the trim, {after} B after"
        );
        assert_eq!(kept.len(), 6_250);
    }
}
