//! The engine behind the hub and the workers: a [`Store`] of projects and sync records,
//! a [`JobQueue`] that carries sync jobs to workers, and an [`EventLog`] that numbers each
//! user's events, keeps their history and fans them out live. `embedded` implements all
//! three in process for a single node; `redis` implements them on Redis for any number
//! of hub and worker processes, side by side file for file. Callers see only the traits.

pub mod embedded;
pub mod fair;
pub mod redis;
pub mod schedule;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::domain::{ProjectId, RepoUrl, SyncId};
use crate::protocol::{
    Event, EventBody, EventId, Job, LastError, ProjectView, ScheduleView, SyncRecord, SyncStatus,
    Trigger,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("embedded store failed")]
    Embedded(#[from] redb::Error),
    #[error("stored record is unreadable")]
    Corrupt(#[from] serde_json::Error),
    #[error("engine task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("engine is shutting down")]
    Closed,
    /// The history was trimmed past a resume while it was being replayed.
    #[error("the history moved past a replay in progress")]
    ReplayGap,
    /// The project does not exist (any more): deleted, maybe while this ran.
    #[error("the project is gone")]
    ProjectGone,
    #[error("redis command failed")]
    Redis(#[source] ::redis::RedisError),
    /// The engine cannot be reached now (a connection refused, dropped or timed out),
    /// as each backend tells it: callers answer "try again shortly", not "broken".
    #[error("the engine cannot be reached")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("unexpected reply from redis")]
    RedisReply(#[from] ::redis::ParsingError),
    #[error("no redis connection available: {0}")]
    Pool(String),
    /// The project lock this write was made under is no longer held: another worker
    /// owns the job now, so this one must stop without writing anything.
    #[error("the project lock was lost to another worker")]
    Fenced,
    /// A checked write lost to concurrent changes of the same project too many times.
    #[error("the project kept changing under a write")]
    Contended,
    /// A sync id that was not made by `SyncId::generate_for` its project.
    #[error("sync id {0} does not belong to its project's partition")]
    ForeignSyncId(String),
    /// A failpoint armed to fail this step ([`crate::failpoint`]; test builds only).
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

impl From<::redis::RedisError> for EngineError {
    /// A Redis that cannot be reached is [`EngineError::Unavailable`]; any other
    /// failure of a command stays a Redis error.
    fn from(err: ::redis::RedisError) -> Self {
        if err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.is_timeout()
        {
            EngineError::Unavailable(Box::new(err))
        } else {
            EngineError::Redis(err)
        }
    }
}

/// A worker's exclusive hold on one project's mirror. `fence` grows with every grant,
/// so a holder that lost the lock (paused, partitioned, presumed dead) is recognized by
/// its older token wherever it tries to write: the store and the mirror's fence file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectLock {
    pub project_id: String,
    pub fence: u64,
}

/// The fence for a new lock grant: the wall clock in microseconds, and always above the
/// last grant, so fences keep growing across restarts of the process that grants them.
pub fn next_fence(last: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_micros() as u64)
        .unwrap_or(0);
    now.max(last + 1)
}

/// What a live subscription delivers: events, and a mark that the feed was broken and
/// is whole again (events published meanwhile are only in the users' histories).
// nearly every item is an event; boxing them all to shrink the rare marker would cost
// an allocation per event
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Live {
    Event(Event),
    Reconnected,
}

/// A registered project as stored. Holds the repo URL as given (it may carry userinfo),
/// so it is never serialized to a client: [`Project::view`] is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Project {
    pub project_id: String,
    pub name: String,
    pub repo_url: String,
    pub branch: String,
    pub owner: String,
    pub created_at: String,
    pub credential: Option<String>,
    pub last_status: Option<SyncStatus>,
    pub last_synced_at: Option<String>,
    pub commit: Option<String>,
    /// The sync that is queued or running, if any; requests coalesce onto it while it
    /// is queued.
    pub active_sync: Option<String>,
    /// The sync requested while the active one was running: queued when that one ends,
    /// so a push that landed mid-fetch is not left behind. Requests join it meanwhile.
    #[serde(default)]
    pub follow_up: Option<String>,
    /// scheduled syncs every this many seconds; `None` = on demand only
    #[serde(default)]
    pub sync_interval_s: Option<u64>,
    #[serde(default)]
    pub last_attempt_at: Option<String>,
    #[serde(default)]
    pub last_success_at: Option<String>,
    #[serde(default)]
    pub last_error: Option<LastError>,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub paused_reason: Option<String>,
    /// when the scheduler next syncs it (ms since the epoch), while it has an interval
    /// and is not paused
    #[serde(default)]
    pub next_sync_ms: Option<u64>,
    /// set while push webhooks are on: the secret is derived from this, never stored
    #[serde(default)]
    pub webhook: Option<WebhookKey>,
}

/// What a project's webhook secret is derived from (with the server's webhook key):
/// a random nonce that rotation replaces. The secret itself is stored nowhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookKey {
    pub nonce: String,
    pub created_at: String,
}

impl Project {
    /// A project as registered: nothing synced, nothing scheduled yet.
    pub fn new(
        project_id: String,
        name: String,
        repo_url: String,
        branch: String,
        owner: String,
        credential: Option<String>,
        sync_interval_s: Option<u64>,
    ) -> Self {
        Self {
            project_id,
            name,
            repo_url,
            branch,
            owner,
            created_at: crate::domain::now_rfc3339(),
            credential,
            last_status: None,
            last_synced_at: None,
            commit: None,
            active_sync: None,
            follow_up: None,
            sync_interval_s,
            last_attempt_at: None,
            last_success_at: None,
            last_error: None,
            consecutive_failures: 0,
            paused: false,
            paused_reason: None,
            next_sync_ms: None,
            webhook: None,
        }
    }

    pub fn schedule_view(&self) -> ScheduleView {
        ScheduleView {
            next_sync_at: self
                .next_sync_ms
                .filter(|_| self.sync_interval_s.is_some() && !self.paused)
                .map(crate::domain::format_epoch_ms),
            paused: self.paused,
            paused_reason: self.paused_reason.clone(),
            consecutive_failures: self.consecutive_failures,
        }
    }

    pub fn view(&self) -> ProjectView {
        let repo_url = RepoUrl::from_stored(self.repo_url.clone())
            .map(|url| url.redacted().to_owned())
            .unwrap_or_else(|_| "<unreadable url>".to_owned());
        ProjectView {
            project_id: self.project_id.clone(),
            name: self.name.clone(),
            repo_url,
            branch: self.branch.clone(),
            owner: self.owner.clone(),
            created_at: self.created_at.clone(),
            credential: self.credential.clone(),
            last_status: self.last_status,
            last_synced_at: self.last_synced_at.clone(),
            commit: self.commit.clone(),
            sync_interval_s: self.sync_interval_s,
            schedule: self.schedule_view(),
            last_attempt_at: self.last_attempt_at.clone(),
            last_success_at: self.last_success_at.clone(),
            last_error: self.last_error.clone(),
            webhook: self.webhook.is_some(),
        }
    }
}

/// What `put_sync` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The record is gone (its project was deleted); nothing was written.
    Gone,
    Stored,
    /// Stored, and this failure paused the project's scheduled syncs.
    StoredAndPaused,
}

impl Put {
    pub fn stored(self) -> bool {
        self != Put::Gone
    }
}

/// A change to a project's settings (`PATCH`, resume, webhook on/off); a `None` field
/// is left as it is.
#[derive(Debug, Clone, Default)]
pub struct ProjectChange {
    pub name: Option<String>,
    pub credential: Option<Option<String>>,
    pub sync_interval_s: Option<Option<u64>>,
    /// clear a pause and the failure count, and schedule the next sync now
    pub resume: bool,
    pub webhook: Option<Option<WebhookKey>>,
    /// due again this long from now (a scheduled sync held back by its owner's
    /// budget); only while it has an interval and is not paused
    pub due_in: Option<Duration>,
}

/// Events after a resume point. `gap` is set when the point is older than the kept
/// history, or newer than the newest event (the history was lost), so the client has
/// to resynchronize instead of trusting the list.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub events: Vec<Event>,
    pub gap: bool,
}

/// A job handed to one worker. Complete it, or release it back to the queue.
#[derive(Debug, Clone)]
pub struct Lease {
    pub job: Job,
    pub token: String,
    /// How many times the job has been handed out: above 1, earlier workers died or
    /// hung running it.
    pub deliveries: u32,
}

/// A job handed out this many times without finishing killed every worker that took
/// it (a crash, an OOM kill); it fails instead of taking down the next one.
pub const MAX_DELIVERIES: u32 = 5;

impl Lease {
    /// A lease for work on a project outside any queued job (removing a deleted
    /// project's mirror), so it can take the project lock like a worker does.
    pub fn maintenance(project_id: &str) -> Self {
        Self {
            job: Job {
                sync_id: String::new(),
                project_id: project_id.to_owned(),
                owner: String::new(),
                trigger: Trigger::Repair,
                queued_us: 0,
            },
            token: String::new(),
            deliveries: 1,
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn insert_project(&self, project: &Project) -> Result<(), EngineError>;
    async fn project(&self, id: &ProjectId) -> Result<Option<Project>, EngineError>;
    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, EngineError>;
    /// Removes the project and its sync history.
    async fn delete_project(&self, id: &ProjectId) -> Result<(), EngineError>;
    /// Atomically, in one step: while the project's sync is queued, returns it with
    /// `false`; while one is running, returns its follow-up with `false`, or stores
    /// `record` as the follow-up (queued when the running one ends) and returns `true`;
    /// with nothing active, stores `record` as the active sync, puts `job` on the queue
    /// and returns `true`. `Err(ProjectGone)` when the project does not exist.
    /// `record.sync_id` comes from `SyncId::generate_for` the project (a partitioned
    /// store keeps the sync beside its project); the Redis engine refuses others.
    async fn begin_sync(
        &self,
        record: SyncRecord,
        job: Job,
    ) -> Result<(SyncRecord, bool), EngineError>;
    async fn sync(&self, id: &SyncId) -> Result<Option<SyncRecord>, EngineError>;
    /// Stores a new state of a sync; a terminal one also ends the project's active
    /// sync (its follow-up, if any, becomes active and goes on the queue in the same
    /// step) and updates its last status (and, on success, its commit). With `lock`,
    /// the write happens only while that lock is still held, else `Err(Fenced)`.
    /// The first time a sync is stored as ended, the project's status and schedule
    /// follow from it in the same step ([`schedule::Outcome`]).
    async fn put_sync(
        &self,
        record: &SyncRecord,
        lock: Option<&ProjectLock>,
    ) -> Result<Put, EngineError>;
    /// [`Store::put_sync`] and the publishing of `events` to `owner` (each with its
    /// once key, see [`EventLog::publish_once`]) in one transaction, plus `if_paused`
    /// when the write pauses the project's schedule: a sync's end and its notification
    /// are then one step, and no crash falls between them. `Ok(None)` from an engine
    /// that cannot write both at once (Redis: a sync's record and its owner's history
    /// live in different slots of a cluster); its caller stores, then publishes, and a
    /// worker that takes over the job after a crash in between publishes what is
    /// missing under the same keys.
    async fn put_sync_with_events(
        &self,
        _record: &SyncRecord,
        _lock: Option<&ProjectLock>,
        _owner: &str,
        _events: &[(EventBody, String)],
        _if_paused: &[(EventBody, String)],
    ) -> Result<Option<(Put, Vec<Event>)>, EngineError> {
        Ok(None)
    }
    /// Applies `change` to the project (its schedule included) in one step; `None`
    /// when it does not exist.
    async fn update_project(
        &self,
        id: &ProjectId,
        change: ProjectChange,
    ) -> Result<Option<Project>, EngineError>;
    /// Up to `limit` projects due at `now_ms`, each claimed for `hold` (not handed
    /// out again meanwhile, by any node); the end of the sync it starts sets its next
    /// due time. Cost grows with the due projects, not the registered ones.
    async fn claim_due(
        &self,
        now_ms: u64,
        limit: usize,
        hold: Duration,
    ) -> Result<Vec<Claimed>, EngineError>;
    /// Records a webhook delivery id of `project`: `true` when it was already seen in
    /// the last 24 hours.
    async fn seen_delivery(&self, project: &ProjectId, delivery: &str)
    -> Result<bool, EngineError>;
    /// Accounts one webhook delivery of `project`: `Err(wait)` when over its rate.
    async fn admit_webhook(&self, project: &ProjectId)
    -> Result<Result<(), Duration>, EngineError>;
    /// Newest first.
    async fn syncs_of(
        &self,
        project: &ProjectId,
        limit: usize,
    ) -> Result<Vec<SyncRecord>, EngineError>;
    /// Accounts one sync request of `user`: `Err(wait)` when over the rate.
    async fn admit_sync_request(&self, user: &str) -> Result<Result<(), Duration>, EngineError>;
    /// Accounts one scheduled or webhook sync of `user` against the same budget, which
    /// these may use only half of (the rest stays for the user's own requests):
    /// `Err(wait)` when over.
    async fn admit_background_sync(&self, user: &str) -> Result<Result<(), Duration>, EngineError>;
    /// Cheap round trip for `/readyz`.
    async fn ping(&self) -> Result<(), EngineError>;
}

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    async fn enqueue(&self, job: Job) -> Result<(), EngineError>;
    /// Waits for the next job; `None` once `shutdown` is cancelled.
    async fn take(&self, shutdown: &CancellationToken) -> Result<Option<Lease>, EngineError>;
    async fn complete(&self, lease: &Lease) -> Result<(), EngineError>;
    /// Gives a job back unfinished (shutdown), so another worker runs it.
    async fn release(&self, lease: Lease) -> Result<(), EngineError>;
    /// Jobs waiting for a worker (not yet taken).
    async fn depth(&self) -> Result<u64, EngineError>;
    /// Takes the project's mirror lock for `lease`, with a fence newer than any before;
    /// `None` while another worker holds it.
    async fn lock_project(&self, lease: &Lease) -> Result<Option<ProjectLock>, EngineError>;
    /// Keeps a running job and its lock alive. `Ok(false)`: the lock is gone (expired
    /// and possibly granted to another worker); the job must stop.
    async fn heartbeat(&self, lease: &Lease, lock: &ProjectLock) -> Result<bool, EngineError>;
    /// Gives the lock up, if still held.
    async fn unlock_project(&self, lock: &ProjectLock) -> Result<(), EngineError>;
    /// How often a running job should call [`JobQueue::heartbeat`].
    fn heartbeat_interval(&self) -> Duration;
    /// Caps the syncs one owner runs at once (`HIVESYNC_OWNER_MAX_RUNNING`): `take`
    /// passes over an owner at the cap ([`fair`]). Unlimited until called.
    fn limit_running_per_owner(&self, cap: usize);
    /// Active syncs that are queued or running with no job on the queue and no worker
    /// holding their project's lock: nothing would ever run them. With their owner.
    async fn stranded_syncs(&self) -> Result<Vec<(SyncRecord, String)>, EngineError>;
    /// The right to run the watchdog for `period`, so of all the nodes that run one,
    /// one acts per period.
    async fn claim_watchdog(&self, period: Duration) -> Result<bool, EngineError>;
}

/// How long an engine remembers a publish's once key: twice as long as a worker
/// retries a write (5 minutes) before it gives the job up.
pub const ONCE_KEPT: Duration = Duration::from_secs(600);
/// How long the once key of a sync's end (its final stage event and notifications)
/// is remembered: a job whose worker died after the end was stored may be taken over
/// much later (a Redis outage, every worker down), and its new worker republishes the
/// end under the same keys.
pub const ONCE_KEPT_END: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long `body`'s once key is remembered ([`ONCE_KEPT`] or [`ONCE_KEPT_END`]).
pub fn once_kept(body: &EventBody) -> Duration {
    match body {
        EventBody::Notification { .. } => ONCE_KEPT_END,
        EventBody::SyncStage { stage, .. } if stage.is_terminal() => ONCE_KEPT_END,
        _ => ONCE_KEPT,
    }
}

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Numbers the event in `user`'s sequence, keeps it in their history and fans it
    /// out to every live subscriber.
    async fn publish(&self, user: &str, body: EventBody) -> Result<Event, EngineError>;
    /// [`EventLog::publish`], safe to repeat: given the `once` key of an event it
    /// kept in the last [`ONCE_KEPT`], the engine answers with that event's id and
    /// publishes nothing. A caller that retries after an error whose outcome it cannot
    /// know (on Redis, a reply lost with its connection after the script ran, or the
    /// cluster client's own resend) passes the same key and the same body each time.
    async fn publish_once(
        &self,
        user: &str,
        body: EventBody,
        once: &str,
    ) -> Result<Event, EngineError>;
    /// Every event published from now on, for all users, with a mark after each break
    /// in the feed.
    fn live(&self) -> broadcast::Receiver<Live>;
    /// Up to `limit` events of `user` with id greater than `after`, oldest first.
    async fn after(&self, user: &str, after: EventId, limit: usize)
    -> Result<History, EngineError>;
    /// The id of `user`'s newest event (0 when none).
    async fn latest(&self, user: &str) -> Result<EventId, EngineError>;
    /// Makes sure `user`'s events reach [`EventLog::live`] on this node from the moment
    /// this returns, until a matching [`EventLog::unwatch`]. Calls nest. Engines that
    /// hand every node every event need nothing here; on a Redis Cluster it subscribes
    /// the user's group channel.
    async fn watch(&self, _user: &str) -> Result<(), EngineError> {
        Ok(())
    }
    /// Undoes one [`EventLog::watch`].
    fn unwatch(&self, _user: &str) {}
}

/// A due project handed to one scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claimed {
    pub project_id: String,
    /// when it was due (ms since the epoch), for the schedule-lag metric
    pub due_ms: u64,
}

/// The three parts as one value that the hub, the HTTP layer and workers share.
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
            sync_id: SyncId::generate_for(&project.project_id).to_string(),
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
                        sync_id: record.sync_id.clone(),
                        project_id: record.project_id.clone(),
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
