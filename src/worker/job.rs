//! One job from start to end: the sync's record moves through its stages, each stored
//! before it is announced; the end is `completed` or `failed` plus the owner's
//! notification. Engine writes that matter are retried while the engine is down.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::attempt::Stages;
use super::codes::error_code;
use super::retry::{AttemptEnd, Attempts, RetryPolicy, retry_loop};
use super::{JobEnd, Worker};
use crate::backoff::Backoff;
use crate::domain::{ProjectId, format_rfc3339, millis_between, now_rfc3339};
use crate::engine::{EngineError, Lease, Project, ProjectLock, Put};
use crate::error::error_chain;
use crate::mirror::{MirrorError, SyncOutcome};
use crate::protocol::{
    EventBody, NotificationKind, Progress, RetryWait, SyncError, SyncErrorCode, SyncRecord,
    SyncStatus,
};

/// Who a running job reports to, and the lock its writes are fenced with.
pub(super) struct JobCtx<'a> {
    pub owner: &'a str,
    pub lock: &'a ProjectLock,
}

/// The attempts of one job, for [`retry_loop`]: each announced as `running`, its
/// retries announced before their wait.
pub(super) struct JobAttempts<'a> {
    pub worker: &'a Worker,
    pub record: &'a mut SyncRecord,
    pub ctx: &'a JobCtx<'a>,
    pub project: &'a Project,
    pub project_id: &'a ProjectId,
    pub deadline: tokio::time::Instant,
    pub interrupt: &'a CancellationToken,
}

impl Attempts for JobAttempts<'_> {
    async fn attempt(&mut self, number: u32) -> Result<AttemptEnd, EngineError> {
        self.record.attempt = number;
        self.record.error = None;
        self.worker
            .stage(
                self.record,
                self.ctx,
                SyncStatus::Running,
                // a retry starts where the bar got to, never below it
                Some(self.record.progress.unwrap_or_default()),
            )
            .await?;
        let stages = JobStages {
            worker: self.worker,
            ctx: self.ctx,
        };
        self.worker
            .attempt(
                self.project,
                self.project_id,
                self.record,
                self.ctx.lock.fence,
                &stages,
                self.deadline,
                self.interrupt,
            )
            .await
    }

    async fn before_wait(
        &mut self,
        number: u32,
        wait: Duration,
        err: &MirrorError,
    ) -> Result<(), EngineError> {
        self.worker
            .announce_retry(self.record, self.ctx, number, wait, err)
            .await?;
        tracing::warn!(attempt = number, wait_ms = wait.as_millis() as u64, error = %self.project.repo_url.scrub(&error_chain(err)), "sync attempt failed; retrying");
        Ok(())
    }
}

/// An attempt's stages, recorded and published as the job's.
struct JobStages<'a> {
    worker: &'a Worker,
    ctx: &'a JobCtx<'a>,
}

impl Stages for JobStages<'_> {
    async fn stage(
        &self,
        record: &mut SyncRecord,
        status: SyncStatus,
        progress: Option<Progress>,
    ) -> Result<(), EngineError> {
        // an attempt needs only to know the write did not fail
        self.worker
            .stage(record, self.ctx, status, progress)
            .await
            .map(|_| ())
    }
}

/// A key that makes the retries of one publish publish it once.
fn once_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// How long a worker keeps retrying a write the engine refused (Redis down), before
/// it leaves the job to be taken over.
const ENGINE_WRITE_PATIENCE: Duration = Duration::from_secs(300);

impl Worker {
    pub(super) async fn run_job(
        &self,
        lease: &Lease,
        lock: &ProjectLock,
        interrupt: &CancellationToken,
    ) -> Result<JobEnd, EngineError> {
        let job = &lease.job;
        let ctx = JobCtx {
            owner: &job.owner,
            lock,
        };
        let sync_id = job.sync_id.clone();
        let project_id = job.project_id.clone();
        let Some(mut record) = self.engine.store.sync(&sync_id).await? else {
            return Ok(JobEnd::Finished);
        };
        if record.status.is_terminal() {
            // the worker that stored this end may have stopped before it published
            // it: the end's keys publish what is missing, and nothing twice
            self.announce_end(&record, &ctx).await?;
            return Ok(JobEnd::Finished);
        }
        if lease.deliveries > crate::engine::MAX_DELIVERIES {
            tracing::error!(sync_id = %job.sync_id, deliveries = lease.deliveries, "a job that stopped every worker that ran it; failing it");
            self.fail(
                &mut record,
                &ctx,
                SyncErrorCode::BackendError,
                &format!(
                    "the sync stopped {} workers in a row (crashed or killed) and was not tried again",
                    lease.deliveries - 1
                ),
            )
            .await?;
            return Ok(JobEnd::Finished);
        }
        let Some(project) = self.engine.store.project(&project_id).await? else {
            self.fail(
                &mut record,
                &ctx,
                SyncErrorCode::BackendError,
                "the project was deleted",
            )
            .await?;
            return Ok(JobEnd::Finished);
        };
        let started_at = record.started_at.get_or_insert_with(now_rfc3339).clone();
        // one deadline for the whole sync, retries included, from its first start (a
        // job taken over after a crash keeps the time already spent)
        let spent = millis_between(&started_at, &now_rfc3339())
            .map(Duration::from_millis)
            .unwrap_or_default();
        let deadline =
            tokio::time::Instant::now() + self.settings.sync_timeout.saturating_sub(spent);

        let policy = RetryPolicy {
            base: self.settings.retry_base,
            max: self.settings.retry_max,
            deadline,
        };
        let mut runs = JobAttempts {
            worker: self,
            record: &mut record,
            ctx: &ctx,
            project: &project,
            project_id: &project_id,
            deadline,
            interrupt,
        };
        let (end, attempts) = retry_loop(&mut runs, policy, interrupt).await?;
        match end {
            AttemptEnd::Done(outcome) => {
                let rewritten = outcome.changes.forced;
                self.complete(&mut record, &ctx, outcome).await?;
                Ok(if rewritten {
                    JobEnd::Rewritten
                } else {
                    JobEnd::Finished
                })
            }
            AttemptEnd::Released => {
                record.status = SyncStatus::Queued;
                record.progress = None;
                self.engine.store.put_sync(&record, Some(lock)).await?;
                Ok(JobEnd::Released)
            }
            AttemptEnd::Failed(err) => {
                tracing::warn!(attempt = attempts, code = error_code(&err).as_str(), error = %project.repo_url.scrub(&error_chain(&err)), "sync failed");
                self.fail(&mut record, &ctx, error_code(&err), &err.to_string())
                    .await?;
                Ok(JobEnd::Finished)
            }
        }
    }

    /// Stores and announces a new stage; `Ok(true)` when the write (a failure) paused
    /// the project's schedule.
    pub(super) async fn stage(
        &self,
        record: &mut SyncRecord,
        ctx: &JobCtx<'_>,
        status: SyncStatus,
        progress: Option<Progress>,
    ) -> Result<bool, EngineError> {
        record.status = status;
        record.progress = progress;
        self.store_and_publish(record, ctx, None).await
    }

    /// Tells clients an attempt failed and when the next one starts, so a waiting
    /// progress bar explains itself.
    pub(super) async fn announce_retry(
        &self,
        record: &mut SyncRecord,
        ctx: &JobCtx<'_>,
        attempt: u32,
        wait: Duration,
        err: &MirrorError,
    ) -> Result<(), EngineError> {
        let error = SyncError {
            code: error_code(err),
            message: err.to_string(),
        };
        let retry_at = format_rfc3339(time::OffsetDateTime::now_utc() + wait);
        record.status = SyncStatus::Running;
        // the bar stays where it got to: a retry does not move it backwards
        record.error = Some(error.clone());
        self.store_and_publish(
            record,
            ctx,
            Some(RetryWait {
                attempt,
                retry_at,
                error,
            }),
        )
        .await
        .map(|_| ())
    }

    /// Stores the record's state, then tells the owner's clients about it: the record is
    /// on disk before anyone hears of it.
    async fn store_and_publish(
        &self,
        record: &SyncRecord,
        ctx: &JobCtx<'_>,
        retry: Option<RetryWait>,
    ) -> Result<bool, EngineError> {
        let body = EventBody::SyncStage {
            sync_id: record.sync_id.to_string(),
            project_id: record.project_id.to_string(),
            stage: record.status,
            progress: record.progress,
            at: now_rfc3339(),
            retry,
        };
        // a lost progress tick is made good by the next one; a stage change is not
        let essential = !body.is_progress_only();
        let stored = self
            .persist(essential, || {
                self.engine.store.put_sync(record, Some(ctx.lock))
            })
            .await?;
        match stored {
            // the project was deleted: no event of it from now on, and the job stops
            Some(Put::Gone) => Err(EngineError::ProjectGone),
            Some(put) => {
                // one key for every try (ours of a stage change, and the cluster
                // client's own resend of any event): a try after a lost reply
                // publishes nothing twice
                let once = once_key();
                if self
                    .persist(essential, || {
                        self.engine
                            .events
                            .publish_once(ctx.owner, body.clone(), &once)
                    })
                    .await?
                    .is_some()
                {
                    self.engine.metrics.events_published.inc();
                }
                Ok(put == Put::StoredAndPaused)
            }
            // a progress tick the engine refused: the next one makes up for it
            None => Ok(false),
        }
    }

    /// Runs an engine write. An essential one is retried with backoff while the engine
    /// is unreachable (a Redis restart must not fail a sync that is otherwise fine);
    /// a lost lock ends the retries at once. Returns what the write returned, or `None`
    /// when a write that is not essential was skipped.
    async fn persist<T, F, Fut>(&self, essential: bool, write: F) -> Result<Option<T>, EngineError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, EngineError>>,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        loop {
            match write().await {
                Ok(value) => return Ok(Some(value)),
                Err(EngineError::Fenced) => return Err(EngineError::Fenced),
                Err(EngineError::ProjectGone) => return Err(EngineError::ProjectGone),
                Err(err) if !essential => {
                    tracing::debug!(error = %error_chain(&err), "skipping a progress update the engine refused");
                    return Ok(None);
                }
                Err(err) if started.elapsed() >= ENGINE_WRITE_PATIENCE => return Err(err),
                Err(err) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %error_chain(&err), retry_in_ms = wait.as_millis() as u64, "engine write failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn complete(
        &self,
        record: &mut SyncRecord,
        ctx: &JobCtx<'_>,
        outcome: SyncOutcome,
    ) -> Result<(), EngineError> {
        stop_clock(record);
        if let Some(check) = outcome.snapshot_check {
            self.engine.metrics.snapshot_check(check.as_str());
        }
        record.commit = Some(outcome.commit.clone());
        record.previous_commit = outcome.previous_commit.clone();
        record.changes = Some(outcome.changes);
        let mut progress = record.progress.unwrap_or_default();
        progress.percent = 100;
        progress.objects = progress.objects.max(outcome.objects);
        progress.bytes = progress.bytes.max(outcome.bytes);
        let mut events = Vec::new();
        if outcome.repaired {
            events.push(end_part(record, Some(NotificationKind::RepoMirrorRepaired)));
        }
        record.status = SyncStatus::Completed;
        record.progress = Some(progress);
        events.push(end_part(record, None));
        events.push(end_part(record, Some(NotificationKind::RepoSyncSuccess)));
        // the record is final on disk no later than anyone hears the sync completed
        self.end(record, ctx, events, Vec::new()).await?;
        self.count_end(record, "completed");
        tracing::info!(
            sync_id = %record.sync_id,
            commit = %outcome.commit,
            duration_ms = record.duration_ms.unwrap_or_default(),
            "sync completed"
        );
        Ok(())
    }

    async fn fail(
        &self,
        record: &mut SyncRecord,
        ctx: &JobCtx<'_>,
        code: SyncErrorCode,
        message: &str,
    ) -> Result<(), EngineError> {
        stop_clock(record);
        record.error = Some(SyncError {
            code,
            message: message.to_owned(),
        });
        record.status = SyncStatus::Failed;
        let events = vec![
            end_part(record, None),
            end_part(record, Some(NotificationKind::RepoSyncFailed)),
        ];
        let if_paused = vec![end_part(record, Some(NotificationKind::RepoSyncPaused))];
        let paused = self.end(record, ctx, events, if_paused).await?;
        self.count_end(record, "failed");
        if paused {
            tracing::warn!(project_id = %record.project_id, code = code.as_str(), "scheduled syncs paused after repeated failures");
        }
        Ok(())
    }

    /// Stores a sync's final record and publishes its end with it (`events`, and
    /// `if_paused` when this end pauses the project's schedule): in one transaction
    /// where the engine can, else the record first, then each event under its end
    /// key. `Ok(true)` when the end paused the schedule.
    async fn end(
        &self,
        record: &SyncRecord,
        ctx: &JobCtx<'_>,
        mut events: Vec<(EventBody, String)>,
        if_paused: Vec<(EventBody, String)>,
    ) -> Result<bool, EngineError> {
        let together = self
            .persist(true, || {
                self.engine.store.put_sync_with_events(
                    record,
                    Some(ctx.lock),
                    ctx.owner,
                    &events,
                    &if_paused,
                )
            })
            .await?
            .flatten();
        if let Some((put, published)) = together {
            if put == Put::Gone {
                return Err(EngineError::ProjectGone);
            }
            crate::failpoint::hit("job.after_final_record")?;
            self.engine
                .metrics
                .events_published
                .inc_by(published.len() as u64);
            return Ok(put == Put::StoredAndPaused);
        }
        let put = self
            .persist(true, || self.engine.store.put_sync(record, Some(ctx.lock)))
            .await?
            .unwrap_or(Put::Stored);
        if put == Put::Gone {
            return Err(EngineError::ProjectGone);
        }
        crate::failpoint::hit("job.after_final_record")?;
        if put == Put::StoredAndPaused {
            events.extend(if_paused);
        }
        self.publish_end(ctx, &events).await?;
        Ok(put == Put::StoredAndPaused)
    }

    /// Publishes the parts of a sync's end, each under its end key.
    async fn publish_end(
        &self,
        ctx: &JobCtx<'_>,
        events: &[(EventBody, String)],
    ) -> Result<(), EngineError> {
        for (body, once) in events {
            self.persist(true, || {
                self.engine
                    .events
                    .publish_once(ctx.owner, body.clone(), once)
            })
            .await?;
            self.engine.metrics.events_published.inc();
        }
        Ok(())
    }

    /// The end of a sync found already final (its worker stopped after storing it):
    /// its final stage event and notification, published under the keys its worker
    /// used, so whatever that worker published is not published again. (A
    /// `repo_mirror_repaired` or `repo_sync_paused` that worker would have sent is not
    /// known from the record, and is not repeated.)
    async fn announce_end(&self, record: &SyncRecord, ctx: &JobCtx<'_>) -> Result<(), EngineError> {
        let kind = if record.status == SyncStatus::Completed {
            NotificationKind::RepoSyncSuccess
        } else {
            NotificationKind::RepoSyncFailed
        };
        let events = [end_part(record, None), end_part(record, Some(kind))];
        self.publish_end(ctx, &events).await
    }

    fn count_end(&self, record: &SyncRecord, outcome: &'static str) {
        self.engine.metrics.sync_ended(
            outcome,
            record.trigger.as_str(),
            record.duration_ms.map(|ms| ms as f64 / 1000.0),
        );
    }
}

/// A part of a sync's end and its once key: the final stage event (`kind` `None`)
/// or a notification. The key is the same in every try and in any worker that takes
/// the job over, so the part is published once however often it is sent.
fn end_part(record: &SyncRecord, kind: Option<NotificationKind>) -> (EventBody, String) {
    let at = record.finished_at.clone().unwrap_or_else(now_rfc3339);
    match kind {
        None => (
            EventBody::SyncStage {
                sync_id: record.sync_id.to_string(),
                project_id: record.project_id.to_string(),
                stage: record.status,
                progress: record.progress,
                at,
                retry: None,
            },
            format!("end:{}:stage", record.sync_id),
        ),
        Some(kind) => {
            let name = match kind {
                NotificationKind::RepoSyncSuccess => "repo_sync_success",
                NotificationKind::RepoSyncFailed => "repo_sync_failed",
                NotificationKind::RepoMirrorRepaired => "repo_mirror_repaired",
                NotificationKind::RepoSyncPaused => "repo_sync_paused",
            };
            let success = kind == NotificationKind::RepoSyncSuccess;
            (
                EventBody::Notification {
                    kind,
                    sync_id: record.sync_id.to_string(),
                    project_id: record.project_id.to_string(),
                    commit: record.commit.clone(),
                    error: record.error.clone(),
                    at,
                    previous_commit: success.then(|| record.previous_commit.clone()).flatten(),
                    changes: success.then_some(record.changes).flatten(),
                    trigger: Some(record.trigger),
                },
                format!("end:{}:{name}", record.sync_id),
            )
        }
    }
}

/// Marks the end of a sync: when, and how long it took since it started.
fn stop_clock(record: &mut SyncRecord) {
    let finished_at = now_rfc3339();
    record.duration_ms = record
        .started_at
        .as_deref()
        .and_then(|start| millis_between(start, &finished_at));
    record.finished_at = Some(finished_at);
}
