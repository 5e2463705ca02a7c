//! The embedded engine of a single node: projects, sync records and each user's event
//! history in a `redb` file under DATA_DIR (ACID, survives a restart); jobs in an
//! in-process queue; live events on a `broadcast` channel. Every redb call runs on the
//! blocking pool, never on an async worker thread.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use super::{
    EngineError, EventLog, History, JobQueue, Lease, Live, Project, ProjectLock, Store, next_fence,
};
use crate::domain::{ProjectId, RateLimiter, SyncId};
use crate::protocol::{Event, EventBody, EventId, Job, SyncRecord};

/// project id → project JSON
const PROJECTS: TableDefinition<&str, &str> = TableDefinition::new("projects");
/// (owner, project id) → ()
const OWNER_PROJECTS: TableDefinition<(&str, &str), ()> = TableDefinition::new("owner_projects");
/// sync id → sync record JSON
const SYNCS: TableDefinition<&str, &str> = TableDefinition::new("syncs");
/// (project id, sync id) → (); sync ids are UUID v7, so this sorts by request time
const PROJECT_SYNCS: TableDefinition<(&str, &str), ()> = TableDefinition::new("project_syncs");
/// (user, event id) → event JSON
const EVENTS: TableDefinition<(&str, u64), &str> = TableDefinition::new("events");
/// user → id of the user's newest event
const EVENT_SEQ: TableDefinition<&str, u64> = TableDefinition::new("event_seq");

pub struct EmbeddedEngine {
    db: Arc<Database>,
    limiter: Mutex<RateLimiter>,
    epoch: Instant,
    live: broadcast::Sender<Live>,
    history_len: u64,
    queue: Mutex<VecDeque<Job>>,
    queued: Notify,
    /// project id → fence of the worker holding its mirror
    locks: Mutex<Locks>,
    /// to the event writer thread
    writer: std::sync::mpsc::Sender<PublishRequest>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedEngine {
    /// Stops the writer and waits for it, so the database file is closed when the
    /// engine is gone (a restart in the same process opens it again at once).
    fn drop(&mut self) {
        let (disconnected, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.writer, disconnected));
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

struct PublishRequest {
    user: String,
    body: EventBody,
    reply: tokio::sync::oneshot::Sender<Result<Event, EngineError>>,
}

/// Most events one transaction takes.
const GROUP_COMMIT_MAX: usize = 1024;

/// The one writer of events: takes every publish waiting, numbers and stores them in
/// one transaction (group commit: a burst of events costs one commit, not one each),
/// then sends them to the live feed in id order and answers each publisher. Being the
/// only writer, it also keeps each user's ids in order on the live feed.
fn run_event_writer(
    db: Arc<Database>,
    requests: std::sync::mpsc::Receiver<PublishRequest>,
    live: broadcast::Sender<Live>,
    keep: u64,
) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match write_events(&db, &batch, keep) {
            Ok(events) => {
                for (request, event) in batch.into_iter().zip(events) {
                    // no receiver is fine: nobody is connected
                    let _ = live.send(Live::Event(event.clone()));
                    let _ = request.reply.send(Ok(event));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(EngineError::Embedded(redb::Error::Io(
                            std::io::Error::other(message.clone()),
                        ))));
                }
            }
        }
    }
}

fn write_events(
    db: &Database,
    batch: &[PublishRequest],
    keep: u64,
) -> Result<Vec<Event>, EngineError> {
    let mut tx = db.begin_write().map_err(redb::Error::from)?;
    if batch.iter().all(|request| request.body.is_progress_only()) {
        // progress ticks are re-sent by the next tick if lost in a crash; stage
        // changes and notifications are on disk before anyone hears of them
        let _ = tx.set_durability(Durability::None);
    }
    let mut out = Vec::with_capacity(batch.len());
    {
        let mut seq = tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
        let mut events = tx.open_table(EVENTS).map_err(redb::Error::from)?;
        let mut latest: HashMap<&str, u64> = HashMap::new();
        for request in batch {
            let user = request.user.as_str();
            let previous = match latest.get(user) {
                Some(id) => *id,
                None => seq
                    .get(user)
                    .map_err(redb::Error::from)?
                    .map(|v| v.value())
                    .unwrap_or(0),
            };
            let id = previous + 1;
            latest.insert(user, id);
            let event = Event {
                id,
                user: request.user.clone(),
                body: request.body.clone(),
            };
            let raw = serde_json::to_string(&event)?;
            events
                .insert((user, id), raw.as_str())
                .map_err(redb::Error::from)?;
            if id > keep {
                events
                    .remove((user, id - keep))
                    .map_err(redb::Error::from)?;
            }
            out.push(event);
        }
        for (user, id) in latest {
            seq.insert(user, id).map_err(redb::Error::from)?;
        }
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(out)
}

#[derive(Default)]
struct Locks {
    held: HashMap<String, u64>,
    last_fence: u64,
}

impl EmbeddedEngine {
    pub fn open(
        dir: &Path,
        sync_rate: (u32, Duration),
        history_len: u64,
    ) -> Result<Arc<Self>, EngineError> {
        std::fs::create_dir_all(dir).map_err(|err| EngineError::Embedded(redb::Error::Io(err)))?;
        let db = Database::create(dir.join("hivesync.redb")).map_err(redb::Error::from)?;
        let tx = db.begin_write().map_err(redb::Error::from)?;
        {
            tx.open_table(PROJECTS).map_err(redb::Error::from)?;
            tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
            tx.open_table(SYNCS).map_err(redb::Error::from)?;
            tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
            tx.open_table(EVENTS).map_err(redb::Error::from)?;
            tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
        }
        tx.commit().map_err(redb::Error::from)?;
        let (live, _) = broadcast::channel(16 * 1024);
        let db = Arc::new(db);
        let (writer, requests) = std::sync::mpsc::channel();
        let writer_thread = {
            let db = Arc::clone(&db);
            let live = live.clone();
            let keep = history_len.max(1);
            std::thread::Builder::new()
                .name("hivesync-events".into())
                .spawn(move || run_event_writer(db, requests, live, keep))
                .map_err(|err| EngineError::Embedded(redb::Error::Io(err)))?
        };
        Ok(Arc::new(Self {
            db,
            limiter: Mutex::new(RateLimiter::new(sync_rate.0, sync_rate.1)),
            epoch: Instant::now(),
            live,
            history_len: history_len.max(1),
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            locks: Mutex::default(),
            writer,
            writer_thread: Some(writer_thread),
        }))
    }

    /// Runs `work` with the database on the blocking pool.
    async fn blocking<T, F>(&self, work: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, EngineError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || work(&db)).await?
    }
}

fn read_json<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, EngineError> {
    Ok(serde_json::from_str(raw)?)
}

fn get_project(db: &Database, id: &str) -> Result<Option<Project>, EngineError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
    let found = table.get(id).map_err(redb::Error::from)?;
    found.map(|raw| read_json(raw.value())).transpose()
}

#[async_trait]
impl Store for EmbeddedEngine {
    async fn insert_project(&self, project: &Project) -> Result<(), EngineError> {
        let project = project.clone();
        self.blocking(move |db| {
            let raw = serde_json::to_string(&project)?;
            let tx = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                projects
                    .insert(project.project_id.as_str(), raw.as_str())
                    .map_err(redb::Error::from)?;
                let mut owners = tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
                owners
                    .insert((project.owner.as_str(), project.project_id.as_str()), ())
                    .map_err(redb::Error::from)?;
            }
            tx.commit().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }

    async fn project(&self, id: &ProjectId) -> Result<Option<Project>, EngineError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| get_project(db, &id)).await
    }

    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, EngineError> {
        let owner = owner.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let owners = tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
            let projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
            let mut out = Vec::new();
            for entry in owners
                .range((owner.as_str(), "")..)
                .map_err(redb::Error::from)?
            {
                let (key, _) = entry.map_err(redb::Error::from)?;
                let (entry_owner, project_id) = key.value();
                if entry_owner != owner {
                    break;
                }
                if let Some(raw) = projects.get(project_id).map_err(redb::Error::from)? {
                    out.push(read_json::<Project>(raw.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn delete_project(&self, id: &ProjectId) -> Result<(), EngineError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                let removed = projects.remove(id.as_str()).map_err(redb::Error::from)?;
                let project: Option<Project> =
                    removed.map(|raw| read_json(raw.value())).transpose()?;
                if let Some(project) = project {
                    let mut owners = tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
                    owners
                        .remove((project.owner.as_str(), id.as_str()))
                        .map_err(redb::Error::from)?;
                }
                let mut index = tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
                let mut syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
                let keys: Vec<String> = index
                    .range((id.as_str(), "")..)
                    .map_err(redb::Error::from)?
                    .map_while(|entry| {
                        let (key, _) = entry.ok()?;
                        let (project, sync) = key.value();
                        (project == id).then(|| sync.to_owned())
                    })
                    .collect();
                for sync in keys {
                    index
                        .remove((id.as_str(), sync.as_str()))
                        .map_err(redb::Error::from)?;
                    syncs.remove(sync.as_str()).map_err(redb::Error::from)?;
                }
            }
            tx.commit().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }

    async fn begin_sync(&self, record: SyncRecord) -> Result<(SyncRecord, bool), EngineError> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            let outcome = {
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                let mut syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
                let raw_project = projects
                    .get(record.project_id.as_str())
                    .map_err(redb::Error::from)?
                    .map(|raw| raw.value().to_owned());
                let Some(raw_project) = raw_project else {
                    return Err(EngineError::Closed);
                };
                let mut project: Project = read_json(&raw_project)?;
                let active = match &project.active_sync {
                    Some(active_id) => syncs
                        .get(active_id.as_str())
                        .map_err(redb::Error::from)?
                        .map(|raw| read_json::<SyncRecord>(raw.value()))
                        .transpose()?
                        .filter(|active| !active.status.is_terminal()),
                    None => None,
                };
                match active {
                    Some(active) => (active, false),
                    None => {
                        project.active_sync = Some(record.sync_id.clone());
                        let raw = serde_json::to_string(&project)?;
                        projects
                            .insert(project.project_id.as_str(), raw.as_str())
                            .map_err(redb::Error::from)?;
                        let raw = serde_json::to_string(&record)?;
                        syncs
                            .insert(record.sync_id.as_str(), raw.as_str())
                            .map_err(redb::Error::from)?;
                        let mut index = tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
                        index
                            .insert((record.project_id.as_str(), record.sync_id.as_str()), ())
                            .map_err(redb::Error::from)?;
                        (record, true)
                    }
                }
            };
            tx.commit().map_err(redb::Error::from)?;
            Ok(outcome)
        })
        .await
    }

    async fn sync(&self, id: &SyncId) -> Result<Option<SyncRecord>, EngineError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
            let found = syncs.get(id.as_str()).map_err(redb::Error::from)?;
            found.map(|raw| read_json(raw.value())).transpose()
        })
        .await
    }

    async fn put_sync(
        &self,
        record: &SyncRecord,
        lock: Option<&ProjectLock>,
    ) -> Result<(), EngineError> {
        if let Some(lock) = lock
            && !self.holds(lock)
        {
            return Err(EngineError::Fenced);
        }
        let record = record.clone();
        self.blocking(move |db| {
            let mut tx = db.begin_write().map_err(redb::Error::from)?;
            if !record.status.is_terminal() {
                // stage changes are re-derivable from the job if lost in a crash; only
                // the end of a sync must be on disk before anyone is told about it
                let _ = tx.set_durability(Durability::None);
            }
            {
                let mut syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
                let exists = syncs
                    .get(record.sync_id.as_str())
                    .map_err(redb::Error::from)?
                    .is_some();
                if !exists {
                    // the project (and its history) was deleted while the sync ran
                    return Ok(());
                }
                let raw = serde_json::to_string(&record)?;
                syncs
                    .insert(record.sync_id.as_str(), raw.as_str())
                    .map_err(redb::Error::from)?;
                if record.status.is_terminal() {
                    let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                    let raw_project = projects
                        .get(record.project_id.as_str())
                        .map_err(redb::Error::from)?
                        .map(|raw| raw.value().to_owned());
                    if let Some(raw_project) = raw_project {
                        let mut project: Project = read_json(&raw_project)?;
                        if project.active_sync.as_deref() == Some(record.sync_id.as_str()) {
                            project.active_sync = None;
                        }
                        project.last_status = Some(record.status);
                        project.last_synced_at = record.finished_at.clone();
                        if record.commit.is_some() {
                            project.commit = record.commit.clone();
                        }
                        let raw = serde_json::to_string(&project)?;
                        projects
                            .insert(project.project_id.as_str(), raw.as_str())
                            .map_err(redb::Error::from)?;
                    }
                }
            }
            tx.commit().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }

    async fn syncs_of(
        &self,
        project: &ProjectId,
        limit: usize,
    ) -> Result<Vec<SyncRecord>, EngineError> {
        let project = project.as_str().to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let index = tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
            let syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
            // every sync id sorts below "~", so this range is exactly the project's syncs
            let range = index
                .range((project.as_str(), "")..(project.as_str(), "~"))
                .map_err(redb::Error::from)?;
            let mut out = Vec::new();
            for entry in range.rev().take(limit) {
                let (key, _) = entry.map_err(redb::Error::from)?;
                let (_, sync_id) = key.value();
                if let Some(raw) = syncs.get(sync_id).map_err(redb::Error::from)? {
                    out.push(read_json(raw.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

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

    async fn admit_sync_request(&self, user: &str) -> Result<Result<(), Duration>, EngineError> {
        let now = self.epoch.elapsed();
        let mut limiter = self
            .limiter
            .lock()
            .expect("rate limiter lock is never poisoned");
        Ok(limiter.check(user, now))
    }

    async fn ping(&self) -> Result<(), EngineError> {
        self.blocking(|db| {
            db.begin_read().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl JobQueue for EmbeddedEngine {
    async fn enqueue(&self, job: Job) -> Result<(), EngineError> {
        self.queue
            .lock()
            .expect("queue lock is never poisoned")
            .push_back(job);
        self.queued.notify_one();
        Ok(())
    }

    async fn take(&self, shutdown: &CancellationToken) -> Result<Option<Lease>, EngineError> {
        loop {
            // register interest before looking, so an enqueue in between is not missed
            let notified = self.queued.notified();
            if let Some(job) = self
                .queue
                .lock()
                .expect("queue lock is never poisoned")
                .pop_front()
            {
                return Ok(Some(Lease {
                    token: job.sync_id.clone(),
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

    async fn complete(&self, _lease: &Lease) -> Result<(), EngineError> {
        Ok(())
    }

    async fn release(&self, lease: Lease) -> Result<(), EngineError> {
        // the record stays unfinished in the store, so the next start requeues it even if
        // this process exits before another worker takes the job
        self.queue
            .lock()
            .expect("queue lock is never poisoned")
            .push_front(lease.job);
        self.queued.notify_one();
        Ok(())
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

    fn heartbeat_interval(&self) -> Duration {
        // in one process a lock cannot be lost; the heartbeat only confirms it
        Duration::from_secs(5)
    }
}

impl EmbeddedEngine {
    fn holds(&self, lock: &ProjectLock) -> bool {
        let locks = self.locks.lock().expect("lock table is never poisoned");
        locks.held.get(&lock.project_id) == Some(&lock.fence)
    }
}

#[async_trait]
impl EventLog for EmbeddedEngine {
    async fn publish(&self, user: &str, body: EventBody) -> Result<Event, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(PublishRequest {
                user: user.to_owned(),
                body,
                reply,
            })
            .map_err(|_| EngineError::Closed)?;
        answer.await.map_err(|_| EngineError::Closed)?
    }

    fn live(&self) -> broadcast::Receiver<Live> {
        self.live.subscribe()
    }

    async fn after(
        &self,
        user: &str,
        after: EventId,
        limit: usize,
    ) -> Result<History, EngineError> {
        let user = user.to_owned();
        let keep = self.history_len;
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let seq = tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
            let latest = seq
                .get(user.as_str())
                .map_err(redb::Error::from)?
                .map(|v| v.value())
                .unwrap_or(0);
            let oldest_kept = latest.saturating_sub(keep) + 1;
            // the client saw `after`; it needs `after + 1` onwards, which must still be kept
            // a resume point past the newest event means the history it belonged to
            // is gone (a wiped store): also a gap
            let gap = (after < latest && after + 1 < oldest_kept) || after > latest;
            let events_table = tx.open_table(EVENTS).map_err(redb::Error::from)?;
            let start = after.saturating_add(1).max(oldest_kept);
            let mut events = Vec::new();
            for entry in events_table
                .range((user.as_str(), start)..=(user.as_str(), u64::MAX))
                .map_err(redb::Error::from)?
                .take(limit)
            {
                let (_, raw) = entry.map_err(redb::Error::from)?;
                let mut event: Event = read_json(raw.value())?;
                event.user = user.clone();
                events.push(event);
            }
            Ok(History { events, gap })
        })
        .await
    }

    async fn latest(&self, user: &str) -> Result<EventId, EngineError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let seq = tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
            Ok(seq
                .get(user.as_str())
                .map_err(redb::Error::from)?
                .map(|v| v.value())
                .unwrap_or(0))
        })
        .await
    }
}
