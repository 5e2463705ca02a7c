//! The three parts every backend implements: the [`Store`], the [`JobQueue`] and the
//! [`EventLog`]. Callers see only these.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{Claimed, EngineError, History, Lease, Live, Project, ProjectChange, ProjectLock, Put};
use crate::domain::{ProjectId, SyncId};
use crate::protocol::{Event, EventBody, EventId, Job, SyncRecord};

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
