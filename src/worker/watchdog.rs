//! The watchdog: a safety net under "every requested sync ends". A sync recorded as
//! queued or running with no job on the queue and no worker holding its project (a job
//! lost to a bug or to a Redis that lost data) is put back on the queue once it has
//! been untouched for `HIVESYNC_SYNC_TIMEOUT_S` plus a margin. Every worker process runs
//! one; a lease in the engine lets one of them act per round.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::error::error_chain;

/// Every `every` until `stop`: requeues syncs stranded for longer than `grace`.
pub async fn run_watchdog(
    engine: Engine,
    every: Duration,
    grace: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match engine.queue.claim_watchdog(every).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "watchdog could not claim its round");
                continue;
            }
        }
        match engine.requeue_stranded(grace).await {
            Ok(0) => {}
            Ok(requeued) => tracing::warn!(requeued, "watchdog requeued stranded syncs"),
            Err(err) => tracing::warn!(error = %error_chain(&err), "watchdog round failed"),
        }
    }
}
