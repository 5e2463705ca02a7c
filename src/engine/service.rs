//! The [`Engine`]: the store, queue and event log as one value, and the operations
//! that span them (starting a sync, putting stranded ones back, removing a mirror
//! under its project's lock).

use std::sync::Arc;
use std::time::Duration;

use super::{EngineError, EventLog, JobQueue, Lease, Project, Store};
use crate::domain::{ProjectId, SyncId};
use crate::mirror::Layout;
use crate::protocol::{EventBody, Job, SyncRecord, SyncStatus, Trigger};

/// The three parts as one value that the HTTP layer and the workers share (the hub
/// takes only the [`EventLog`]).
#[derive(Clone)]
pub struct Engine {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn JobQueue>,
    pub events: Arc<dyn EventLog>,
    /// the process's metrics, for everything that holds the engine
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Engine {
    /// Starts a sync of `project` (stored and queued in one step, then announced), or
    /// queues a follow-up of a running one, or joins the one already waiting: returns
    /// the sync and whether it is new.
    pub async fn start_sync(
        &self,
        project: &Project,
        trigger: Trigger,
    ) -> Result<(SyncRecord, bool), EngineError> {
        let record = SyncRecord {
            sync_id: SyncId::generate_for(&project.project_id),
            project_id: project.project_id.clone(),
            status: SyncStatus::Queued,
            progress: None,
            commit: None,
            previous_commit: project.commit.clone(),
            attempt: 0,
            queued_at: crate::domain::now_rfc3339(),
            started_at: None,
            finished_at: None,
            duration_ms: None,
            error: None,
            trigger,
            changes: None,
        };
        let job = Job {
            sync_id: record.sync_id.clone(),
            project_id: record.project_id.clone(),
            owner: project.owner.clone(),
            trigger,
            queued_us: crate::protocol::now_epoch_us(),
        };
        let (record, created) = self.store.begin_sync(record, job).await?;
        if created {
            // the sync is stored and on its way whatever happens to this event: a
            // client that misses it sees the record by polling
            // keyed by the sync: a resend by the cluster client publishes it once
            let published = self
                .events
                .publish_once(
                    &project.owner,
                    EventBody::SyncStage {
                        sync_id: record.sync_id.to_string(),
                        project_id: record.project_id.to_string(),
                        stage: SyncStatus::Queued,
                        progress: None,
                        at: record.queued_at.clone(),
                        retry: None,
                    },
                    &format!("queued-{}", record.sync_id),
                )
                .await;
            if let Err(err) = published {
                tracing::warn!(sync_id = %record.sync_id, error = %crate::error::error_chain(&err), "could not announce a queued sync; it runs regardless");
            }
        }
        Ok((record, created))
    }

    /// One round of the watchdog: every stranded sync (see
    /// [`JobQueue::stranded_syncs`]) untouched for longer than `grace` goes back on
    /// the queue, so no requested sync waits forever for a job that was lost. A job
    /// put back twice is harmless: the second finds the sync ended and is dropped.
    pub async fn requeue_stranded(&self, grace: Duration) -> Result<usize, EngineError> {
        let now = crate::domain::now_rfc3339();
        let mut requeued = 0;
        for (mut record, owner) in self.queue.stranded_syncs().await? {
            let touched = record.started_at.as_deref().unwrap_or(&record.queued_at);
            let idle = crate::domain::millis_between(touched, &now)
                .map(Duration::from_millis)
                .unwrap_or_default();
            if idle < grace {
                continue;
            }
            tracing::warn!(sync_id = %record.sync_id, idle_s = idle.as_secs(), "a sync had no job and no worker; putting it back on the queue");
            // its deadline starts again: the time it spent stranded was not its own
            record.started_at = Some(now.clone());
            if put_back(self.store.as_ref(), self.queue.as_ref(), record, owner).await? {
                requeued += 1;
            }
        }
        Ok(requeued)
    }

    /// Removes the mirror of a deleted project under its project lock. While a worker
    /// holds the lock this does nothing and returns `false`: that worker removes the
    /// mirror when its job ends and finds the project gone.
    pub async fn remove_mirror(
        &self,
        layout: &Layout,
        project_id: ProjectId,
    ) -> Result<bool, EngineError> {
        let lease = Lease::maintenance(&project_id);
        let Some(lock) = self.queue.lock_project(&lease).await? else {
            return Ok(false);
        };
        remove_files(layout, project_id).await;
        self.queue.unlock_project(&lock).await?;
        Ok(true)
    }
}

/// Puts an unfinished sync back on the queue as `queued` (after a restart, or when
/// the watchdog finds it stranded). `Ok(false)`: its project is gone; nothing queued.
pub(crate) async fn put_back(
    store: &dyn Store,
    queue: &dyn JobQueue,
    mut record: SyncRecord,
    owner: String,
) -> Result<bool, EngineError> {
    record.status = SyncStatus::Queued;
    record.progress = None;
    if !store.put_sync(&record, None).await?.stored() {
        return Ok(false);
    }
    queue
        .enqueue(Job {
            sync_id: record.sync_id.clone(),
            project_id: record.project_id.clone(),
            owner,
            trigger: record.trigger,
            queued_us: crate::protocol::now_epoch_us(),
        })
        .await?;
    Ok(true)
}

/// Removes a project's files by [`Layout::remove`], on the blocking pool; the caller
/// holds the project lock. A failure leaves only disk space behind, so it is logged.
pub(crate) async fn remove_files(layout: &Layout, project_id: ProjectId) {
    let layout = layout.clone();
    let id = project_id.clone();
    let removed = tokio::task::spawn_blocking(move || layout.remove(&id)).await;
    if let Ok(Err(err)) = removed {
        tracing::warn!(%project_id, error = %err, "could not remove the mirror");
    }
}
