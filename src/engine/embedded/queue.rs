//! The in-process job queue and project locks; and, at start, putting back the syncs
//! that were unfinished when the process last stopped (the queue itself is not kept).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable};
use tokio_util::sync::CancellationToken;

use super::{EmbeddedEngine, PROJECTS, SYNCS, read_json};
use crate::domain::SyncId;
use crate::engine::{
    EngineError, JobQueue, Lease, Project, ProjectLock, fair, next_fence, put_back,
};
use crate::protocol::{Job, SyncRecord};

/// The jobs waiting for a worker, oldest first, and the jobs workers run (lease
/// token → owner), from which [`fair::choose`] picks the next one.
#[derive(Default)]
pub(super) struct Waiting {
    jobs: VecDeque<Job>,
    running: HashMap<String, String>,
    /// owner → the start count when their last job started (owners with nothing
    /// waiting or running are forgotten)
    served: HashMap<String, u64>,
    starts: u64,
}

impl Waiting {
    fn shares(&self) -> fair::Shares {
        let mut running = HashMap::new();
        for owner in self.running.values() {
            *running.entry(owner.clone()).or_default() += 1;
        }
        fair::Shares {
            running,
            served: self.served.clone(),
        }
    }

    /// The fair next job, now marked running; `None` when nothing may start.
    fn start_next(&mut self, cap: usize) -> Option<Job> {
        let index = {
            let waiting: Vec<&Job> = self.jobs.iter().collect();
            fair::choose(&waiting, &self.shares(), cap)?
        };
        let job = self.jobs.remove(index)?;
        self.starts += 1;
        self.served.insert(job.owner.clone(), self.starts);
        self.running
            .insert(job.sync_id.to_string(), job.owner.clone());
        Some(job)
    }

    /// Ends the running job `token`; its owner is forgotten once nothing of theirs
    /// waits or runs.
    fn end(&mut self, token: &str) {
        if let Some(owner) = self.running.remove(token)
            && !self.running.values().any(|other| *other == owner)
            && !self.jobs.iter().any(|job| job.owner == owner)
        {
            self.served.remove(&owner);
        }
    }
}

#[async_trait]
impl JobQueue for EmbeddedEngine {
    async fn enqueue(&self, job: Job) -> Result<(), EngineError> {
        self.push_job(job);
        Ok(())
    }

    async fn take(&self, shutdown: &CancellationToken) -> Result<Option<Lease>, EngineError> {
        loop {
            // register interest before looking, so an enqueue or an end in between is
            // not missed
            let notified = self.queued.notified();
            let cap = self.owner_cap.get();
            if let Some(job) = self.waiting().start_next(cap) {
                return Ok(Some(Lease {
                    token: job.sync_id.to_string(),
                    deliveries: 1,
                    job,
                }));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = notified => {}
            }
        }
    }

    async fn depth(&self) -> Result<u64, EngineError> {
        Ok(self.waiting().jobs.len() as u64)
    }

    async fn complete(&self, lease: &Lease) -> Result<(), EngineError> {
        self.waiting().end(&lease.token);
        // the owner runs one fewer: a job of theirs held back by the cap may start
        self.queued.notify_waiters();
        Ok(())
    }

    async fn release(&self, lease: Lease) -> Result<(), EngineError> {
        // the record stays unfinished in the store, so the next start requeues it even if
        // this process exits before another worker takes the job
        {
            let mut waiting = self.waiting();
            waiting.jobs.push_front(lease.job);
            waiting.end(&lease.token);
        }
        self.queued.notify_waiters();
        Ok(())
    }

    fn limit_running_per_owner(&self, cap: usize) {
        self.owner_cap.set(cap);
        self.queued.notify_waiters();
    }

    async fn lock_project(&self, lease: &Lease) -> Result<Option<ProjectLock>, EngineError> {
        let mut locks = self.locks.lock().expect("lock table is never poisoned");
        if locks.held.contains_key(&lease.job.project_id) {
            return Ok(None);
        }
        let fence = next_fence(locks.last_fence);
        locks.last_fence = fence;
        locks.held.insert(lease.job.project_id.clone(), fence);
        Ok(Some(ProjectLock {
            project_id: lease.job.project_id.clone(),
            fence,
        }))
    }

    async fn heartbeat(&self, _lease: &Lease, lock: &ProjectLock) -> Result<bool, EngineError> {
        Ok(self.holds(lock))
    }

    async fn unlock_project(&self, lock: &ProjectLock) -> Result<(), EngineError> {
        let mut locks = self.locks.lock().expect("lock table is never poisoned");
        if locks.held.get(&lock.project_id) == Some(&lock.fence) {
            locks.held.remove(&lock.project_id);
        }
        Ok(())
    }

    async fn stranded_syncs(&self) -> Result<Vec<(SyncRecord, String)>, EngineError> {
        let unfinished = self.unfinished_syncs().await?;
        let queued: std::collections::HashSet<SyncId> = self
            .waiting()
            .jobs
            .iter()
            .map(|job| job.sync_id.clone())
            .collect();
        let locks = self.locks.lock().expect("lock table is never poisoned");
        Ok(unfinished
            .into_iter()
            .filter(|(record, _)| {
                !queued.contains(&record.sync_id) && !locks.held.contains_key(&record.project_id)
            })
            .collect())
    }

    async fn claim_watchdog(&self, _period: Duration) -> Result<bool, EngineError> {
        // one process: its one watchdog
        Ok(true)
    }

    fn heartbeat_interval(&self) -> Duration {
        // in one process a lock cannot be lost; the heartbeat only confirms it
        Duration::from_secs(5)
    }
}

impl EmbeddedEngine {
    pub(super) fn holds(&self, lock: &ProjectLock) -> bool {
        let locks = self.locks.lock().expect("lock table is never poisoned");
        locks.held.get(&lock.project_id) == Some(&lock.fence)
    }
}

impl EmbeddedEngine {
    /// Puts a job at the back of the in-process queue and wakes a worker.
    pub(super) fn push_job(&self, job: Job) {
        self.waiting().jobs.push_back(job);
        self.queued.notify_waiters();
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.queue.lock().expect("queue lock is never poisoned")
    }

    /// Puts syncs that were queued or running when the engine last stopped back on the
    /// queue, so a restart loses no requested work. Returns how many.
    pub async fn requeue_unfinished(&self) -> Result<usize, EngineError> {
        let unfinished = self.unfinished_syncs().await?;
        let count = unfinished.len();
        for (record, owner) in unfinished {
            put_back(self, self, record, owner).await?;
        }
        Ok(count)
    }

    /// Syncs that were queued or running when the engine last stopped, with their owner.
    async fn unfinished_syncs(&self) -> Result<Vec<(SyncRecord, String)>, EngineError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
            let syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
            let mut out = Vec::new();
            for entry in projects.iter().map_err(redb::Error::from)? {
                let (_, raw) = entry.map_err(redb::Error::from)?;
                let project: Project = read_json(raw.value())?;
                let Some(active) = project.active_sync else {
                    continue;
                };
                if let Some(raw) = syncs.get(active.as_str()).map_err(redb::Error::from)? {
                    let record: SyncRecord = read_json(raw.value())?;
                    if !record.status.is_terminal() {
                        out.push((record, project.owner.clone()));
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}
