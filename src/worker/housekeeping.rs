//! Housekeeping of a mirror: after its sync ended, by the worker that still holds the
//! project lock (after the sync's final record and notification, so it never races a
//! sync of the same mirror and no user waits for it); and on the health check's tick
//! for mirrors no sync has come to since their unreachable objects' grace period
//! ended, under a lock taken for it. Readers are safe by
//! [`crate::mirror::housekeeping`]'s order of writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::domain::ProjectId;
use crate::engine::Engine;
use crate::mirror::{Layout, MirrorError, housekeeping};

/// Consolidates the project's object store when [`housekeeping::due`] says so, or at
/// once when the sync that just ended found its branch rewritten (`rewritten`: the
/// objects it left behind start their grace period now). The caller holds the project
/// lock. `stop` interrupts it (shutdown, or the lock was lost); the store is then left
/// as it was. Failures are logged and counted: the mirror stays usable as it is.
pub(super) async fn housekeep(
    engine: &Engine,
    layout: &Layout,
    policy: housekeeping::Policy,
    project: &ProjectId,
    rewritten: bool,
    stop: &CancellationToken,
) {
    if policy.max_packs == 0 {
        return;
    }
    let due = {
        let layout = layout.clone();
        let project = project.clone();
        tokio::task::spawn_blocking(move || housekeeping::due(&layout, &project, &policy))
            .await
            .unwrap_or(false)
    };
    if !due && !rewritten {
        return;
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let run = {
        let layout = layout.clone();
        let project = project.clone();
        let interrupt = Arc::clone(&interrupt);
        tokio::task::spawn_blocking(move || {
            housekeeping::run(&layout, &project, &policy, rewritten, &interrupt)
        })
    };
    let stopped = stop.clone();
    let watcher = {
        let interrupt = Arc::clone(&interrupt);
        tokio::spawn(async move {
            stopped.cancelled().await;
            interrupt.store(true, Ordering::Relaxed);
        })
    };
    let ended = run.await;
    watcher.abort();
    let seconds = started.elapsed().as_secs_f64();
    let metrics = &engine.metrics;
    match ended {
        Ok(Ok(report)) => {
            tracing::info!(
                %project,
                tool = report.tool,
                packs_before = report.packs_before,
                packs_after = report.packs_after,
                bytes_before = report.bytes_before,
                bytes_after = report.bytes_after,
                pruned = report.pruned,
                seconds,
                "housekeeping consolidated the mirror"
            );
            let consolidated = crate::metrics::Consolidated {
                packs_before: report.packs_before,
                packs_after: report.packs_after,
                bytes_before: report.bytes_before,
                bytes_after: report.bytes_after,
                pruned: report.pruned,
            };
            metrics.housekeeping("done", seconds, Some(consolidated));
        }
        Ok(Err(MirrorError::Interrupted)) => {
            tracing::info!(%project, "housekeeping interrupted; the mirror is as it was");
            metrics.housekeeping("interrupted", seconds, None);
        }
        Ok(Err(err)) => {
            tracing::warn!(%project, error = %crate::error::error_chain(&err), "housekeeping failed; the mirror is as it was");
            metrics.housekeeping("failed", seconds, None);
        }
        Err(err) => {
            tracing::error!(%project, error = %err, "housekeeping panicked");
            metrics.housekeeping("failed", seconds, None);
        }
    }
}
