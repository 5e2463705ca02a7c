//! Periodic health checks of every mirror on disk (a damaged one is re-synced unasked),
//! and removal of a project's mirror under its project lock — the one way the delete
//! handler, a worker and the health check take a mirror off the disk.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Lease};
use crate::error::error_chain;
use crate::mirror::{self, Layout};

/// Every `every`, until `stop`: inspects each mirror on disk and starts a sync of any
/// that is damaged (the sync re-clones it and tells the owner `repo_mirror_repaired`),
/// so a broken mirror is found before a client reads from it, not only before the next
/// requested sync. Several processes may run this: the syncs they start coalesce.
pub async fn run_health_checks(
    engine: Engine,
    layout: Layout,
    every: Duration,
    housekeeping: crate::mirror::housekeeping::Policy,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let mirrored = {
            let layout = layout.clone();
            tokio::task::spawn_blocking(move || layout.mirrored_projects()).await
        };
        let Ok(mirrored) = mirrored else {
            continue;
        };
        for project_id in mirrored {
            let project = match engine.store.project(&project_id).await {
                Ok(Some(project)) => project,
                Ok(None) => {
                    // its delete raced a process that died before it could clean up
                    tracing::info!(%project_id, "removing the mirror of a deleted project");
                    if let Err(err) = engine.remove_mirror(&layout, project_id).await {
                        tracing::warn!(error = %error_chain(&err), "could not remove an orphaned mirror");
                    }
                    continue;
                }
                Err(err) if err.is_unreadable_record() => {
                    tracing::error!(%project_id, error = %error_chain(&err), "a mirrored project's record cannot be read; not checking it");
                    continue;
                }
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), "health check cannot read projects; next round");
                    break;
                }
            };
            if project.active_sync.is_some() {
                // a sync is on it already, and checks it before work
                continue;
            }
            let inspected = {
                let layout = layout.clone();
                let id = project_id.clone();
                let branch = project.branch.clone();
                tokio::task::spawn_blocking(move || mirror::inspect(&layout, &id, &branch)).await
            };
            let problem = match inspected {
                Ok(Err(problem)) => problem,
                Ok(Ok(())) => {
                    // a mirror no sync came to since its unreachable objects' grace
                    // ended: housekeeping, under a lock of its own
                    let lease = Lease::maintenance(&project_id);
                    if let Ok(Some(lock)) = engine.queue.lock_project(&lease).await {
                        super::housekeeping::housekeep(
                            &engine,
                            &layout,
                            housekeeping,
                            &project_id,
                            false,
                            &stop,
                        )
                        .await;
                        let _ = engine.queue.unlock_project(&lock).await;
                    }
                    continue;
                }
                Err(_) => continue,
            };
            tracing::warn!(%project_id, %problem, "health check found a damaged mirror; syncing it");
            if let Err(err) = engine
                .start_sync(&project, crate::protocol::Trigger::Repair)
                .await
            {
                tracing::warn!(error = %error_chain(&err), "could not start a repair sync");
            }
        }
    }
}
