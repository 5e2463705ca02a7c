//! Sync workers: take a job from the queue, run the mirror sync on the blocking pool,
//! and turn its phases and gix's progress counters into sync records and stage events.
//! Knows the engine traits and the mirror, never HTTP or sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{ProjectId, RepoUrl, SyncId, format_rfc3339, millis_between, now_rfc3339};
use crate::engine::{Engine, EngineError, Lease, Project, ProjectLock};

pub mod credentials;
use crate::mirror::{self, Layout, MirrorError, Phase, SyncOutcome, SyncSpec};
use crate::protocol::{
    EventBody, NotificationKind, Progress, RetryWait, SyncError, SyncErrorCode, SyncRecord,
    SyncStatus,
};

/// How long an interrupted sync may take to notice before it is left behind.
const ABANDON_AFTER_INTERRUPT: Duration = Duration::from_secs(5);

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How often gix's counters are sampled into a progress event while a sync runs.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub sync_timeout: Duration,
    pub secrets_dir: Option<std::path::PathBuf>,
    pub ssh_known_hosts: Option<std::path::PathBuf>,
    pub https_ca_file: Option<std::path::PathBuf>,
    pub retry_base: Duration,
    pub retry_max: u32,
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

/// Who a running job reports to, and the lock its writes are fenced with.
struct JobCtx<'a> {
    owner: &'a str,
    lock: &'a ProjectLock,
}

/// How long a worker keeps retrying a write the engine refused (Redis down), before
/// it leaves the job to be taken over.
const ENGINE_WRITE_PATIENCE: Duration = Duration::from_secs(300);

/// Starts `count` workers on `tracker`.
pub fn spawn(
    count: usize,
    engine: Engine,
    layout: Layout,
    settings: WorkerSettings,
    stops: WorkerStops,
    tracker: &TaskTracker,
) {
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
            let heartbeat = tokio::spawn(keep_alive(
                self.engine.clone(),
                lease.clone(),
                lock.clone(),
                job_stop.clone(),
            ));
            let end = self.run_job(&lease, &lock, &job_stop).await;
            heartbeat.abort();
            if !matches!(end, Err(EngineError::Fenced)) {
                self.remove_if_deleted(&lease.job.project_id).await;
            }
            let acked = match end {
                Ok(JobEnd::Finished) => self.engine.queue.complete(&lease).await,
                Ok(JobEnd::Released) => self.engine.queue.release(lease).await,
                Err(EngineError::Fenced) => {
                    // another worker owns the job now; it acks it
                    tracing::warn!(sync_id = %lease.job.sync_id, "lost the project lock; leaving the job to the worker that took it over");
                    continue;
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
    async fn remove_if_deleted(&self, project_id: &str) {
        let Some(id) = ProjectId::parse(project_id) else {
            return;
        };
        if let Ok(None) = self.engine.store.project(&id).await {
            let layout = self.layout.clone();
            let _ = tokio::task::spawn_blocking(move || layout.remove(&id)).await;
        }
    }

    async fn run_job(
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
        let (Some(sync_id), Some(project_id)) = (
            SyncId::parse(&job.sync_id),
            ProjectId::parse(&job.project_id),
        ) else {
            tracing::warn!(sync_id = %job.sync_id, "dropping a job with malformed ids");
            return Ok(JobEnd::Finished);
        };
        let Some(mut record) = self.engine.store.sync(&sync_id).await? else {
            return Ok(JobEnd::Finished);
        };
        if record.status.is_terminal() {
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
        record.started_at.get_or_insert_with(now_rfc3339);

        let policy = RetryPolicy {
            base: self.settings.retry_base,
            max: self.settings.retry_max,
        };
        let mut runs = JobAttempts {
            worker: self,
            record: &mut record,
            ctx: &ctx,
            project: &project,
            project_id: &project_id,
            interrupt,
        };
        let (end, attempts) = retry_loop(&mut runs, policy, interrupt).await?;
        match end {
            AttemptEnd::Done(outcome) => {
                self.complete(&mut record, &ctx, outcome).await?;
                Ok(JobEnd::Finished)
            }
            AttemptEnd::Released => {
                record.status = SyncStatus::Queued;
                record.progress = None;
                self.engine.store.put_sync(&record, Some(lock)).await?;
                Ok(JobEnd::Released)
            }
            AttemptEnd::Failed(err) => {
                tracing::warn!(attempt = attempts, code = err.code().as_str(), error = %scrub(&project, &error_chain(&err)), "sync failed");
                self.fail(&mut record, &ctx, err.code(), &err.to_string())
                    .await?;
                Ok(JobEnd::Finished)
            }
        }
    }

    /// One run of the mirror sync, with progress sampling, the timeout and shutdown.
    async fn attempt(
        &self,
        project: &Project,
        project_id: &ProjectId,
        record: &mut SyncRecord,
        ctx: &JobCtx<'_>,
        shutdown: &CancellationToken,
    ) -> Result<AttemptEnd, EngineError> {
        // the key file lives until this attempt ends, then is deleted
        let (ssh_command, ssh_files) = match ssh_setup(project, &self.settings) {
            Ok(setup) => setup,
            Err(err) => return Ok(AttemptEnd::Failed(err)),
        };
        let http_identity = match http_identity(project, &self.settings) {
            Ok(identity) => identity,
            Err(err) => return Ok(AttemptEnd::Failed(err)),
        };
        let https_ca_file = self.settings.https_ca_file.clone();
        let root = gix::progress::tree::Root::new();
        let interrupt = Arc::new(AtomicBool::new(false));
        let fence = ctx.lock.fence;
        let (phase_tx, mut phase_rx) = mpsc::unbounded_channel::<Phase>();
        let handle = {
            let layout = self.layout.clone();
            let root = Arc::clone(&root);
            let interrupt = Arc::clone(&interrupt);
            let project_id = project_id.clone();
            let url = project.repo_url.clone();
            let branch = project.branch.clone();
            tokio::task::spawn_blocking(move || {
                let spec = SyncSpec {
                    project: &project_id,
                    url: &url,
                    branch: &branch,
                    ssh_command,
                    http_identity,
                    https_ca_file,
                    fence,
                };
                let on_phase = move |phase: Phase| {
                    let _ = phase_tx.send(phase);
                };
                mirror::sync(&layout, &spec, &root, &interrupt, &on_phase)
            })
        };
        tokio::pin!(handle);
        let deadline = tokio::time::sleep(self.settings.sync_timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut phase = Phase::Fetching;
        let mut last_sent = record.progress.unwrap_or_default();
        let mut released = false;
        let mut timed_out = false;
        let mut abandon_at: Option<tokio::time::Instant> = None;
        let result = loop {
            tokio::select! {
                biased;
                Some(next) = phase_rx.recv() => {
                    phase = next;
                    let status = status_of(phase);
                    if status != record.status {
                        let progress = mirror::sample_progress(&root, phase);
                        last_sent = progress;
                        self.stage(record, ctx, status, Some(progress)).await?;
                    }
                }
                joined = &mut handle => break joined,
                _ = ticker.tick() => {
                    let progress = mirror::sample_progress(&root, phase);
                    if progress != last_sent {
                        last_sent = progress;
                        self.stage(record, ctx, record.status, Some(progress)).await?;
                    }
                }
                _ = &mut deadline, if !interrupt.load(Ordering::Relaxed) => {
                    interrupt.store(true, Ordering::Relaxed);
                    timed_out = true;
                    // gix stops at its next check of the flag; a transfer stuck in a
                    // read may never get there, so it gets a grace period, then the
                    // sync fails without it (the flag keeps it from ever swapping)
                    abandon_at = Some(tokio::time::Instant::now() + ABANDON_AFTER_INTERRUPT);
                }
                _ = sleep_until_opt(abandon_at) => {
                    tracing::warn!("the sync did not stop after its interrupt; abandoning it");
                    return Ok(if released { AttemptEnd::Released } else { AttemptEnd::Failed(MirrorError::Interrupted) });
                }
                _ = shutdown.cancelled(), if !released => {
                    released = true;
                    interrupt.store(true, Ordering::Relaxed);
                    abandon_at = Some(tokio::time::Instant::now() + ABANDON_AFTER_INTERRUPT);
                }
            }
        };
        // phases the sync passed through in the last moments before it returned
        while let Ok(next) = phase_rx.try_recv() {
            phase = next;
            let status = status_of(phase);
            if status != record.status {
                let progress = mirror::sample_progress(&root, phase);
                self.stage(record, ctx, status, Some(progress)).await?;
            }
        }
        let result = result?;
        if released {
            // finished before the interrupt took hold: keep the work
            return Ok(match result {
                Ok(outcome) => AttemptEnd::Done(outcome),
                Err(_) => AttemptEnd::Released,
            });
        }
        Ok(match result {
            Ok(outcome) => AttemptEnd::Done(outcome),
            Err(_) if timed_out => AttemptEnd::Failed(MirrorError::Interrupted),
            // ssh writes its diagnostics to our log instead of stderr, so gix cannot
            // classify them; the log does
            Err(MirrorError::Network(cause)) => match ssh_files.as_ref().map(SshFiles::refusal) {
                Some(Some(SshRefusal::HostKey)) => AttemptEnd::Failed(MirrorError::HostKeyRejected),
                Some(Some(SshRefusal::Credentials)) => {
                    AttemptEnd::Failed(MirrorError::AuthFailed(cause))
                }
                _ => AttemptEnd::Failed(MirrorError::Network(cause)),
            },
            Err(err) => AttemptEnd::Failed(err),
        })
    }

    async fn stage(
        &self,
        record: &mut SyncRecord,
        ctx: &JobCtx<'_>,
        status: SyncStatus,
        progress: Option<Progress>,
    ) -> Result<(), EngineError> {
        record.status = status;
        record.progress = progress;
        self.store_and_publish(record, ctx, None).await
    }

    /// Tells clients an attempt failed and when the next one starts, so a waiting
    /// progress bar explains itself.
    async fn announce_retry(
        &self,
        record: &mut SyncRecord,
        ctx: &JobCtx<'_>,
        attempt: u32,
        wait: Duration,
        err: &MirrorError,
    ) -> Result<(), EngineError> {
        let error = SyncError {
            code: err.code(),
            message: err.to_string(),
        };
        let retry_at = format_rfc3339(time::OffsetDateTime::now_utc() + wait);
        record.status = SyncStatus::Running;
        record.progress = None;
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
    }

    /// Stores the record's state, then tells the owner's clients about it: the record is
    /// on disk before anyone hears of it.
    async fn store_and_publish(
        &self,
        record: &SyncRecord,
        ctx: &JobCtx<'_>,
        retry: Option<RetryWait>,
    ) -> Result<(), EngineError> {
        let body = EventBody::SyncStage {
            sync_id: record.sync_id.clone(),
            project_id: record.project_id.clone(),
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
        if stored {
            self.persist(essential, || {
                self.engine.events.publish(ctx.owner, body.clone())
            })
            .await?;
        }
        Ok(())
    }

    /// Runs an engine write. An essential one is retried with backoff while the engine
    /// is unreachable (a Redis restart must not fail a sync that is otherwise fine);
    /// a lost lock ends the retries at once. Returns whether the write happened.
    async fn persist<T, F, Fut>(&self, essential: bool, write: F) -> Result<bool, EngineError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, EngineError>>,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match write().await {
                Ok(_) => return Ok(true),
                Err(EngineError::Fenced) => return Err(EngineError::Fenced),
                Err(err) if !essential => {
                    tracing::debug!(error = %error_chain(&err), "skipping a progress update the engine refused");
                    return Ok(false);
                }
                Err(err) if started.elapsed() >= ENGINE_WRITE_PATIENCE => return Err(err),
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), retry_in_ms = backoff.as_millis() as u64, "engine write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(3));
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
        let finished_at = now_rfc3339();
        record.duration_ms = record
            .started_at
            .as_deref()
            .and_then(|start| millis_between(start, &finished_at));
        record.finished_at = Some(finished_at);
        record.commit = Some(outcome.commit.clone());
        record.previous_commit = outcome.previous_commit.clone();
        let mut progress = record.progress.unwrap_or_default();
        progress.percent = 100;
        progress.objects = progress.objects.max(outcome.objects);
        progress.bytes = progress.bytes.max(outcome.bytes);
        if outcome.repaired {
            self.notify(ctx, record, NotificationKind::RepoMirrorRepaired)
                .await?;
        }
        // the record is final on disk before anyone hears the sync completed
        self.stage(record, ctx, SyncStatus::Completed, Some(progress))
            .await?;
        self.notify(ctx, record, NotificationKind::RepoSyncSuccess)
            .await?;
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
        let finished_at = now_rfc3339();
        record.duration_ms = record
            .started_at
            .as_deref()
            .and_then(|start| millis_between(start, &finished_at));
        record.finished_at = Some(finished_at);
        record.error = Some(SyncError {
            code,
            message: message.to_owned(),
        });
        let progress = record.progress;
        self.stage(record, ctx, SyncStatus::Failed, progress)
            .await?;
        self.notify(ctx, record, NotificationKind::RepoSyncFailed)
            .await
    }

    async fn notify(
        &self,
        ctx: &JobCtx<'_>,
        record: &SyncRecord,
        kind: NotificationKind,
    ) -> Result<(), EngineError> {
        let body = EventBody::Notification {
            kind,
            sync_id: record.sync_id.clone(),
            project_id: record.project_id.clone(),
            commit: record.commit.clone(),
            error: record.error.clone(),
            at: now_rfc3339(),
        };
        self.persist(true, || self.engine.events.publish(ctx.owner, body.clone()))
            .await?;
        Ok(())
    }
}

/// Private files of one ssh attempt, deleted when it ends: the credential's key, and
/// ssh's own log, the only place that tells a host-key rejection from a dropped line.
struct SshFiles {
    _key: Option<tempfile::NamedTempFile>,
    log: tempfile::NamedTempFile,
}

enum SshRefusal {
    HostKey,
    Credentials,
}

impl SshFiles {
    fn refusal(&self) -> Option<SshRefusal> {
        let log = std::fs::read_to_string(self.log.path()).ok()?;
        if log.contains("Host key verification failed")
            || log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        {
            return Some(SshRefusal::HostKey);
        }
        log.contains("Permission denied")
            .then_some(SshRefusal::Credentials)
    }
}

/// For an ssh URL: the ssh command with the host-key policy and, when the project
/// names a credential, its key in a private temporary file.
fn ssh_setup(
    project: &Project,
    settings: &WorkerSettings,
) -> Result<(Option<String>, Option<SshFiles>), MirrorError> {
    let is_ssh = gix::url::parse(project.repo_url.as_bytes())
        .is_ok_and(|url| url.scheme == gix::url::Scheme::Ssh);
    if !is_ssh {
        return Ok((None, None));
    }
    let log = tempfile::Builder::new()
        .prefix("hivesync-ssh-")
        .tempfile()
        .map_err(MirrorError::Io)?;
    let mut command = format!(
        "ssh -o BatchMode=yes -o ConnectTimeout=20 -E '{}'",
        log.path().display()
    );
    match &settings.ssh_known_hosts {
        Some(known_hosts) => command.push_str(&format!(
            " -o StrictHostKeyChecking=yes -o UserKnownHostsFile='{}'",
            known_hosts.display()
        )),
        None => command.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"),
    }
    let Some(name) = &project.credential else {
        return Ok((Some(command), Some(SshFiles { _key: None, log })));
    };
    let secret = credentials::resolve(name, settings.secrets_dir.as_deref())
        .map_err(|err| MirrorError::CredentialMissing(err.to_string()))?;
    let mut key = tempfile::Builder::new()
        .prefix("hivesync-key-")
        .tempfile()
        .map_err(MirrorError::Io)?;
    {
        use std::io::Write;
        let mut text = secret.expose().to_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        key.write_all(text.as_bytes()).map_err(MirrorError::Io)?;
        key.flush().map_err(MirrorError::Io)?;
    }
    command.push_str(&format!(
        " -o IdentitiesOnly=yes -i '{}'",
        key.path().display()
    ));
    Ok((
        Some(command),
        Some(SshFiles {
            _key: Some(key),
            log,
        }),
    ))
}

/// Every `every`, until `stop`: inspects each mirror on disk and starts a sync of any
/// that is damaged (the sync re-clones it and tells the owner `repo_mirror_repaired`),
/// so a broken mirror is found before a client reads from it, not only before the next
/// requested sync. Several processes may run this: the syncs they start coalesce.
pub async fn run_health_checks(
    engine: Engine,
    layout: Layout,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for project_id in layout.mirrored_projects() {
            let project = match engine.store.project(&project_id).await {
                Ok(Some(project)) => project,
                Ok(None) => {
                    remove_orphan(&engine, &layout, project_id).await;
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
            let Ok(Err(problem)) = inspected else {
                continue;
            };
            tracing::warn!(%project_id, %problem, "health check found a damaged mirror; syncing it");
            if let Err(err) = engine.start_sync(&project).await {
                tracing::warn!(error = %error_chain(&err), "could not start a repair sync");
            }
        }
    }
}

/// A mirror whose project is gone (its delete raced a process that died before it
/// could clean up): removed under the project lock.
async fn remove_orphan(engine: &Engine, layout: &Layout, project_id: ProjectId) {
    let lease = Lease::maintenance(project_id.as_str());
    if let Ok(Some(lock)) = engine.queue.lock_project(&lease).await {
        tracing::info!(%project_id, "removing the mirror of a deleted project");
        let layout = layout.clone();
        let _ = tokio::task::spawn_blocking(move || layout.remove(&project_id)).await;
        let _ = engine.queue.unlock_project(&lock).await;
    }
}

/// For an http(s) URL whose project names a credential: the login to present. The
/// secret is a token (sent with the URL's user name, else `x-access-token`, which
/// GitHub, Gitea and others accept with a token) or `username:token`.
fn http_identity(
    project: &Project,
    settings: &WorkerSettings,
) -> Result<Option<mirror::HttpIdentity>, MirrorError> {
    let Ok(url) = gix::url::parse(project.repo_url.as_bytes()) else {
        return Ok(None);
    };
    if !matches!(url.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https) {
        return Ok(None);
    }
    let Some(name) = &project.credential else {
        return Ok(None);
    };
    let secret = credentials::resolve(name, settings.secrets_dir.as_deref())
        .map_err(|err| MirrorError::CredentialMissing(err.to_string()))?;
    let secret = secret.expose().trim();
    let (username, password) = match secret.split_once(':') {
        Some((user, token)) if !user.is_empty() && !token.is_empty() => {
            (user.to_owned(), token.to_owned())
        }
        _ => (
            url.user().unwrap_or("x-access-token").to_owned(),
            secret.to_owned(),
        ),
    };
    Ok(Some(mirror::HttpIdentity { username, password }))
}

/// Heartbeats a running job until aborted. When the engine says the lock is gone,
/// stops the job: its writes would be refused anyway, and its mirror work is fenced.
async fn keep_alive(engine: Engine, lease: Lease, lock: ProjectLock, job_stop: CancellationToken) {
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

enum AttemptEnd {
    Done(SyncOutcome),
    Failed(MirrorError),
    Released,
}

fn status_of(phase: Phase) -> SyncStatus {
    match phase {
        Phase::Fetching => SyncStatus::Running,
        Phase::UpdatingFiles => SyncStatus::UpdatingFiles,
        Phase::Cleaning => SyncStatus::Cleaning,
        Phase::Finalizing => SyncStatus::Finalizing,
    }
}

#[derive(Debug, Clone, Copy)]
struct RetryPolicy {
    base: Duration,
    max: u32,
}

/// The attempts of one job, as [`retry_loop`] drives them.
trait Attempts {
    /// Runs attempt `number` (from 1).
    async fn attempt(&mut self, number: u32) -> Result<AttemptEnd, EngineError>;
    /// Attempt `number` failed and the next starts after `wait`.
    async fn before_wait(
        &mut self,
        number: u32,
        wait: Duration,
        err: &MirrorError,
    ) -> Result<(), EngineError>;
}

struct JobAttempts<'a> {
    worker: &'a Worker,
    record: &'a mut SyncRecord,
    ctx: &'a JobCtx<'a>,
    project: &'a Project,
    project_id: &'a ProjectId,
    interrupt: &'a CancellationToken,
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
                Some(Progress::default()),
            )
            .await?;
        self.worker
            .attempt(
                self.project,
                self.project_id,
                self.record,
                self.ctx,
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
        tracing::warn!(attempt = number, wait_ms = wait.as_millis() as u64, error = %scrub(self.project, &error_chain(err)), "sync attempt failed; retrying");
        Ok(())
    }
}

/// Runs attempts until one ends other than in a retryable failure, or they run out:
/// network failures are tried again after [`retry_delay`], with the wait announced
/// first. Interrupted while waiting, the job is released. Returns how it ended and
/// after how many attempts.
async fn retry_loop(
    attempts: &mut impl Attempts,
    policy: RetryPolicy,
    interrupt: &CancellationToken,
) -> Result<(AttemptEnd, u32), EngineError> {
    let mut number = 0;
    loop {
        number += 1;
        match attempts.attempt(number).await? {
            AttemptEnd::Failed(err) if err.is_retryable() && number < policy.max => {
                let wait = retry_delay(number, policy.base, jitter_fraction());
                attempts.before_wait(number, wait, &err).await?;
                tokio::select! {
                    _ = interrupt.cancelled() => return Ok((AttemptEnd::Released, number)),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            end => return Ok((end, number)),
        }
    }
}

/// The wait before attempt `failed_attempt + 1`: the first retry is immediate, the
/// second waits `base`, then the wait doubles; `jitter` in [0, 1) adds up to half again.
pub fn retry_delay(failed_attempt: u32, base: Duration, jitter: f64) -> Duration {
    if failed_attempt <= 1 {
        return Duration::ZERO;
    }
    let doubling = 2u32.saturating_pow(failed_attempt.saturating_sub(2).min(16));
    let nominal = base.saturating_mul(doubling);
    nominal + nominal.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

fn jitter_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
}

/// A log line about `project` with its URL's credentials removed: errors of the git
/// layer may quote the URL they were given.
fn scrub(project: &Project, text: &str) -> String {
    match RepoUrl::from_stored(project.repo_url.clone()) {
        Ok(url) => url.scrub(text),
        Err(_) => "<error text withheld: the repo URL could not be parsed to scrub it>".to_owned(),
    }
}

/// An error and its causes on one line, for logs. Never shown to clients.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attempts that fail with `failure` every time, noting when each started.
    struct Failing {
        started: Vec<tokio::time::Instant>,
        announced: Vec<(u32, Duration)>,
        failure: fn() -> MirrorError,
    }

    impl Failing {
        fn new(failure: fn() -> MirrorError) -> Self {
            Self {
                started: Vec::new(),
                announced: Vec::new(),
                failure,
            }
        }

        fn gaps(&self) -> Vec<Duration> {
            self.started.windows(2).map(|w| w[1] - w[0]).collect()
        }
    }

    impl Attempts for Failing {
        async fn attempt(&mut self, _number: u32) -> Result<AttemptEnd, EngineError> {
            self.started.push(tokio::time::Instant::now());
            Ok(AttemptEnd::Failed((self.failure)()))
        }

        async fn before_wait(
            &mut self,
            number: u32,
            wait: Duration,
            _err: &MirrorError,
        ) -> Result<(), EngineError> {
            self.announced.push((number, wait));
            Ok(())
        }
    }

    fn network() -> MirrorError {
        MirrorError::Network(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
    }

    fn refused() -> MirrorError {
        MirrorError::AuthFailed(Box::new(std::io::Error::from(
            std::io::ErrorKind::PermissionDenied,
        )))
    }

    /// The real loop on paused time: the waits it sleeps are the announced ones and
    /// follow immediate, base, doubling (+ up to half again of jitter).
    #[tokio::test(start_paused = true)]
    async fn network_failures_are_retried_on_schedule_in_paused_time() {
        let base = Duration::from_secs(30);
        let mut attempts = Failing::new(network);
        let (end, count) = retry_loop(
            &mut attempts,
            RetryPolicy { base, max: 5 },
            &CancellationToken::new(),
        )
        .await
        .expect("no engine error");
        assert!(matches!(end, AttemptEnd::Failed(MirrorError::Network(_))));
        assert_eq!(count, 5, "HIVESYNC_RETRY_MAX attempts in all");
        let gaps = attempts.gaps();
        assert_eq!(gaps.len(), 4);
        let announced: Vec<Duration> = attempts.announced.iter().map(|(_, wait)| *wait).collect();
        for (gap, wait) in gaps.iter().zip(&announced) {
            // tokio's timer has millisecond resolution
            assert!(
                *gap >= *wait && *gap - *wait <= Duration::from_millis(1),
                "slept {gap:?} for an announced {wait:?}"
            );
        }
        assert_eq!(gaps[0], Duration::ZERO, "the first retry is immediate");
        for (gap, nominal) in gaps[1..].iter().zip([base, base * 2, base * 4]) {
            assert!(
                *gap >= nominal && *gap <= nominal + nominal / 2,
                "{gap:?} not within jitter of {nominal:?}"
            );
        }
        assert_eq!(
            attempts
                .announced
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_credentials_are_not_retried() {
        let mut attempts = Failing::new(refused);
        let (end, count) = retry_loop(
            &mut attempts,
            RetryPolicy {
                base: Duration::from_secs(30),
                max: 5,
            },
            &CancellationToken::new(),
        )
        .await
        .expect("no engine error");
        assert!(matches!(
            end,
            AttemptEnd::Failed(MirrorError::AuthFailed(_))
        ));
        assert_eq!(count, 1);
        assert!(attempts.announced.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_interrupt_during_a_wait_releases_the_job() {
        let interrupt = CancellationToken::new();
        let mut attempts = Failing::new(network);
        let stopper = interrupt.clone();
        tokio::spawn(async move {
            // after the immediate retry, during the 30 s wait before the third attempt
            tokio::time::sleep(Duration::from_secs(10)).await;
            stopper.cancel();
        });
        let (end, count) = retry_loop(
            &mut attempts,
            RetryPolicy {
                base: Duration::from_secs(30),
                max: 5,
            },
            &interrupt,
        )
        .await
        .expect("no engine error");
        assert!(matches!(end, AttemptEnd::Released));
        assert_eq!(count, 2);
    }

    #[test]
    fn retries_are_immediate_then_base_then_doubling() {
        let base = Duration::from_millis(30_000);
        assert_eq!(retry_delay(1, base, 0.0), Duration::ZERO);
        assert_eq!(retry_delay(2, base, 0.0), base);
        assert_eq!(retry_delay(3, base, 0.0), base * 2);
        assert_eq!(retry_delay(4, base, 0.0), base * 4);
        assert_eq!(
            retry_delay(3, base, 1.0),
            base * 3,
            "jitter adds at most half"
        );
    }

    #[test]
    fn phases_map_to_contract_stages_in_order() {
        let stages: Vec<_> = [
            Phase::Fetching,
            Phase::UpdatingFiles,
            Phase::Cleaning,
            Phase::Finalizing,
        ]
        .into_iter()
        .map(status_of)
        .collect();
        for pair in stages.windows(2) {
            assert!(pair[0].may_become(pair[1]), "{:?} → {:?}", pair[0], pair[1]);
        }
    }
}
