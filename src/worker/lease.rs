//! The heartbeat of a running job: it keeps the job's queue entry and its project lock
//! alive, and stops the job the moment the engine says the lock is gone.

use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Lease, ProjectLock};
use crate::error::error_chain;

/// Heartbeats a running job until aborted. When the engine says the lock is gone,
/// stops the job: its writes would be refused anyway, and its mirror work is fenced.
pub(super) async fn keep_alive(
    engine: Engine,
    lease: Lease,
    lock: ProjectLock,
    job_stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(engine.queue.heartbeat_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match engine.queue.heartbeat(&lease, &lock).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(sync_id = %lease.job.sync_id, "project lock expired under a running job; stopping it");
                job_stop.cancel();
                return;
            }
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "heartbeat failed; retrying");
            }
        }
    }
}
