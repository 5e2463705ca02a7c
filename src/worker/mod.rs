//! Sync workers: take a job from the queue, run the mirror sync on the blocking pool,
//! and turn its phases and gix's progress counters into sync records and stage events.
//! Knows the engine traits and the mirror, never HTTP or sockets.
//!
//! - this file: spawning workers and their loop (take, lock, run, settle);
//! - [`job`]: one job start to end — its record, events and notifications;
//! - [`attempt`]: one attempt's select loop (progress, timeout, shutdown);
//! - [`retry`]: which failures are tried again, and when;
//! - [`lease`]: the heartbeat that keeps a running job and its lock alive;
//! - [`health`]: periodic mirror health checks (an orphaned mirror is removed through
//!   the engine, under its lock);
//! - `housekeeping`: a mirror's object store consolidated after its sync, under the
//!   same lock;
//! - [`credentials`]: named secrets and what they become for ssh and https; `guard`:
//!   the private-address check of a remote, pinned for the fetch;
//! - `codes`: the wire's code for each way a sync fails;
//! - `watchdog`: requeues syncs whose job was lost.

mod attempt;
mod codes;
pub mod credentials;
mod guard;
pub mod health;
mod housekeeping;
mod job;
mod lease;
pub mod retry;
mod scheduler;
mod watchdog;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::ProjectId;
use crate::engine::{Engine, EngineError};
use crate::error::error_chain;
use crate::mirror::Layout;

pub use health::run_health_checks;
pub use retry::retry_delay;
pub use scheduler::{run_scheduler, schedule_due};
pub use watchdog::run_watchdog;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub sync_timeout: Duration,
    pub secrets_dir: Option<std::path::PathBuf>,
    /// `HIVESYNC_CREDENTIAL_SCOPES`: who may use which credential, towards which hosts
    pub credential_scopes: Option<std::path::PathBuf>,
    pub ssh_known_hosts: Option<std::path::PathBuf>,
    pub https_ca_file: Option<std::path::PathBuf>,
    pub retry_base: Duration,
    pub retry_max: u32,
    /// `HIVESYNC_ALLOW_PRIVATE_HOSTS`: skip the connect-time address check
    pub allow_private_hosts: bool,
    /// `HIVESYNC_MIN_FREE_BYTES`: a sync does not start writing under this
    pub min_free_bytes: u64,
    /// `HIVESYNC_HOUSEKEEPING_PACKS` and `HIVESYNC_PRUNE_GRACE_S`
    pub housekeeping: crate::mirror::housekeeping::Policy,
    /// `HIVESYNC_MAX_CHECKOUT_BYTES`, `_FILES`, `_FILE_BYTES`, `_OBJECTS_BYTES`
    pub quota: crate::mirror::Quota,
    /// `HIVESYNC_OWNER_MAX_RUNNING`; `None` = half of this process's workers
    pub owner_max_running: Option<usize>,
    /// `HIVESYNC_FILE_ROOTS` and `DATA_DIR`: where `file` URLs may point
    pub file_roots: crate::domain::repo_url::FileRoots,
}

/// Stops for workers: `stop_taking` ends the loop after the current job; `interrupt`
/// also interrupts the job, which then goes back to the queue.
#[derive(Clone)]
pub struct WorkerStops {
    pub stop_taking: CancellationToken,
    pub interrupt: CancellationToken,
}

#[derive(Clone)]
struct Worker {
    engine: Engine,
    layout: Layout,
    settings: WorkerSettings,
}

/// Starts `count` workers on `tracker`.
pub fn spawn(
    count: usize,
    engine: Engine,
    layout: Layout,
    settings: WorkerSettings,
    stops: WorkerStops,
    tracker: &TaskTracker,
) {
    if count > 0 {
        // one owner never holds every worker of this process
        engine.queue.limit_running_per_owner(
            settings
                .owner_max_running
                .unwrap_or_else(|| crate::engine::fair::default_cap(count)),
        );
    }
    let worker = Worker {
        engine,
        layout,
        settings,
    };
    for index in 0..count {
        let worker = worker.clone();
        let stops = stops.clone();
        tracker.spawn(async move {
            tracing::debug!(worker = index, "worker started");
            worker.run(stops).await;
            tracing::debug!(worker = index, "worker stopped");
        });
    }
}

/// What became of a job.
enum JobEnd {
    Finished,
    /// finished, and the sync found its branch rewritten (a force-push): what the
    /// old history held is unreachable from now on
    Rewritten,
    /// interrupted by shutdown: back on the queue
    Released,
}

impl Worker {
    async fn run(&self, stops: WorkerStops) {
        loop {
            let lease = match self.engine.queue.take(&stops.stop_taking).await {
                Ok(Some(lease)) => lease,
                Ok(None) => return,
                Err(err) => {
                    tracing::error!(error = %error_chain(&err), "taking a job failed");
                    tokio::select! {
                        _ = stops.stop_taking.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let lock = match self.engine.queue.lock_project(&lease).await {
                Ok(Some(lock)) => lock,
                held => {
                    if let Err(err) = held {
                        tracing::error!(error = %error_chain(&err), "could not take a project lock");
                    }
                    // another worker has this mirror (or the lock of a dead one has
                    // not expired yet): the job waits its turn on the queue
                    tokio::select! {
                        _ = stops.stop_taking.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if let Err(err) = self.engine.queue.release(lease).await {
                        tracing::error!(error = %error_chain(&err), "could not requeue a job");
                    }
                    continue;
                }
            };
            // the job stops when the worker stops, or when its lock is lost
            let job_stop = stops.interrupt.child_token();
            let heartbeat = tokio::spawn(lease::keep_alive(
                self.engine.clone(),
                lease.clone(),
                lock.clone(),
                job_stop.clone(),
            ));
            let mut end = self.run_job(&lease, &lock, &job_stop).await;
            if matches!(end, Ok(JobEnd::Finished | JobEnd::Rewritten))
                && let Err(injected) = crate::failpoint::hit("job.after_notification")
            {
                end = Err(injected.into());
            }
            if let Ok(done @ (JobEnd::Finished | JobEnd::Rewritten)) = &end {
                // the sync's end is recorded and announced; the lock and its heartbeat
                // are still held, so no other sync of this mirror runs meanwhile
                housekeeping::housekeep(
                    &self.engine,
                    &self.layout,
                    self.settings.housekeeping,
                    &lease.job.project_id,
                    matches!(done, JobEnd::Rewritten),
                    &job_stop,
                )
                .await;
            }
            heartbeat.abort();
            if !matches!(end, Err(EngineError::Fenced)) {
                self.remove_if_deleted(&lease.job.project_id).await;
            }
            let acked = match end {
                Ok(JobEnd::Finished | JobEnd::Rewritten) => {
                    self.engine.queue.complete(&lease).await
                }
                Ok(JobEnd::Released) => self.engine.queue.release(lease).await,
                Err(EngineError::ProjectGone) => {
                    // deleted while it ran: nothing more to say about it
                    tracing::info!(sync_id = %lease.job.sync_id, "the project was deleted; the sync stopped");
                    self.engine.queue.complete(&lease).await
                }
                Err(EngineError::Fenced) => {
                    // another worker owns the job now; it acks it
                    tracing::warn!(sync_id = %lease.job.sync_id, "lost the project lock; leaving the job to the worker that took it over");
                    continue;
                }
                Err(err) if err.is_unreadable_record() => {
                    // released, it would come straight back and fail the same way
                    tracing::error!(sync_id = %lease.job.sync_id, error = %error_chain(&err), "the job's stored records cannot be read; dropping the job");
                    self.engine.queue.complete(&lease).await
                }
                Err(err) => {
                    tracing::error!(error = %error_chain(&err), "job failed in the engine; it stays queued");
                    self.engine.queue.release(lease).await
                }
            };
            if let Err(err) = self.engine.queue.unlock_project(&lock).await {
                tracing::warn!(error = %error_chain(&err), "could not release a project lock; it expires by itself");
            }
            if let Err(err) = acked {
                tracing::error!(error = %error_chain(&err), "could not settle a job with the queue");
            }
        }
    }

    /// Removes the mirror of a project deleted while this worker held its lock (the
    /// delete left the files to the lock holder).
    async fn remove_if_deleted(&self, project_id: &ProjectId) {
        if let Ok(None) = self.engine.store.project(project_id).await {
            crate::engine::remove_files(&self.layout, project_id.clone()).await;
        }
    }
}
