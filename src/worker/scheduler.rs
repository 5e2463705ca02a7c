//! The scheduler: projects with a `sync_interval_s` sync when due, with
//! `trigger: schedule`. Every `serve` and `worker` process runs one; the engine hands
//! each due project to one of them (claimed atomically), so a due project is synced
//! once however many run. A tick reads only the due entries, never every project.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::now_epoch_ms;
use crate::engine::{Engine, EngineError, ProjectChange};
use crate::error::error_chain;
use crate::protocol::Trigger;

/// Due projects claimed per round trip.
const BATCH: usize = 100;

/// Every `tick` until `stop`: starts the syncs of due projects. A claimed project is
/// not handed out again for `hold` (the sync it starts sets its real next time).
pub async fn run_scheduler(
    engine: Engine,
    tick: Duration,
    hold: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(err) = schedule_due(&engine, hold).await {
            tracing::warn!(error = %error_chain(&err), "scheduler round failed; next tick");
        }
    }
}

/// One round: claims what is due now and starts each sync. Returns the syncs started
/// or joined.
pub async fn schedule_due(engine: &Engine, hold: Duration) -> Result<usize, EngineError> {
    let now = now_epoch_ms();
    let mut started = 0;
    loop {
        let due = engine.store.claim_due(now, BATCH, hold).await?;
        for claimed in &due {
            let project_id = &claimed.project_id;
            let project = match engine.store.project(project_id).await {
                Ok(Some(project)) => project,
                Ok(None) => continue,
                // the rest of the batch is not held up by one record that cannot be read
                Err(err) if err.is_unreadable_record() => {
                    tracing::error!(%project_id, error = %error_chain(&err), "a due project's record cannot be read; skipping it");
                    continue;
                }
                Err(err) => return Err(err),
            };
            if project.paused || project.sync_interval_s.is_none() {
                // an entry the project no longer wants: rewriting the project with no
                // change takes it off the schedule
                engine
                    .store
                    .update_project(project_id, ProjectChange::default())
                    .await?;
                continue;
            }
            // the schedule spends its owner's budget (half of it at most); over it,
            // the project is due again when the budget allows
            if let Err(wait) = engine.store.admit_background_sync(&project.owner).await? {
                tracing::debug!(project_id = %project.project_id, wait_ms = wait.as_millis() as u64, "scheduled sync held back by its owner's sync budget");
                engine.metrics.syncs_throttled.inc();
                engine
                    .store
                    .update_project(
                        project_id,
                        ProjectChange {
                            due_in: Some(wait),
                            ..ProjectChange::default()
                        },
                    )
                    .await?;
                continue;
            }
            match engine.start_sync(&project, Trigger::Schedule).await {
                Ok(_) => {
                    started += 1;
                    // from the due time the claim saw (the project's own next time
                    // already says "held" by now)
                    let lag_ms = now_epoch_ms().saturating_sub(claimed.due_ms);
                    engine.metrics.schedule_lag.observe(lag_ms as f64 / 1000.0);
                }
                Err(EngineError::ProjectGone) => {}
                Err(err) => return Err(err),
            }
        }
        if due.len() < BATCH {
            return Ok(started);
        }
    }
}
