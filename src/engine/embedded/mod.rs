//! The embedded engine of a single node: projects, sync records and each user's event
//! history in a `redb` file under DATA_DIR (ACID, survives a restart); jobs in an
//! in-process queue; live events on a `broadcast` channel. Every redb call runs on the
//! blocking pool, never on an async worker thread.
//!
//! [`store`] holds projects and records, [`queue`] the jobs and project locks,
//! [`events`] the one event writer and the history.

mod events;
mod queue;
mod store;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::{Notify, broadcast};

use super::schedule::Rules;
use super::{EngineError, Live, Project};
use crate::domain::{ProjectId, RateLimiter};
use events::{WriterRequest, run_event_writer};

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
/// (user, once key) → the id of the event first published under it
const EVENT_ONCE: TableDefinition<(&str, &str), u64> = TableDefinition::new("event_once");
/// (expiry ms, user, once key) → (): the same, soonest to expire first
const EVENT_ONCE_AGE: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("event_once_age");
/// (due time ms, project id) → (): projects with a schedule, soonest first
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
/// (project id, delivery id) → when it was first seen (ms)
const DELIVERIES: TableDefinition<(&str, &str), u64> = TableDefinition::new("deliveries");
/// (first seen ms, project id, delivery id) → (): the same, oldest first, for expiry
const DELIVERY_AGE: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("delivery_age");

/// The store's page cache when nothing else is configured: redb's own default is
/// 1 GiB, which a store grown with many projects and their histories would fill.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// The database, and the histogram its write transactions' commits are timed into.
pub(super) struct Db {
    database: Database,
    commit_seconds: Histogram,
}

impl std::ops::Deref for Db {
    type Target = Database;
    fn deref(&self) -> &Database {
        &self.database
    }
}

impl Db {
    /// Commits `tx` (durably, unless it was set otherwise), timing it.
    fn commit(&self, tx: redb::WriteTransaction) -> Result<(), redb::Error> {
        let started = Instant::now();
        tx.commit()?;
        self.commit_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

pub struct EmbeddedEngine {
    db: Arc<Db>,
    limiter: Mutex<RateLimiter>,
    webhook_limiter: Mutex<RateLimiter>,
    rules: Rules,
    epoch: Instant,
    live: broadcast::Sender<Live>,
    history_len: u64,
    queue: Mutex<queue::Waiting>,
    /// rung when a job is queued or a running one ends: a worker may start one now
    queued: Notify,
    owner_cap: crate::engine::fair::OwnerCap,
    /// project id → fence of the worker holding its mirror
    locks: Mutex<Locks>,
    /// to the event writer thread
    writer: std::sync::mpsc::Sender<WriterRequest>,
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

#[derive(Default)]
struct Locks {
    held: HashMap<ProjectId, u64>,
    last_fence: u64,
}

impl From<redb::Error> for EngineError {
    /// redb fails only on its own file: a backend failure (nothing to reach).
    fn from(err: redb::Error) -> Self {
        EngineError::Backend(Box::new(err))
    }
}

impl EmbeddedEngine {
    pub fn open(
        dir: &Path,
        sync_rate: (u32, Duration),
        history_len: u64,
    ) -> Result<Arc<Self>, EngineError> {
        let commit_seconds = crate::metrics::Metrics::commit_histogram();
        Self::open_with(
            dir,
            sync_rate,
            history_len,
            Rules::default(),
            commit_seconds,
        )
    }

    pub fn open_with(
        dir: &Path,
        sync_rate: (u32, Duration),
        history_len: u64,
        rules: Rules,
        commit_seconds: Histogram,
    ) -> Result<Arc<Self>, EngineError> {
        Self::open_sized(
            dir,
            sync_rate,
            history_len,
            rules,
            commit_seconds,
            DEFAULT_CACHE_BYTES,
        )
    }

    /// [`Self::open_with`], with the store's page cache at most `cache_bytes`
    /// (`HIVESYNC_STORE_CACHE_MB`).
    pub fn open_sized(
        dir: &Path,
        sync_rate: (u32, Duration),
        history_len: u64,
        rules: Rules,
        commit_seconds: Histogram,
        cache_bytes: usize,
    ) -> Result<Arc<Self>, EngineError> {
        std::fs::create_dir_all(dir).map_err(|err| EngineError::from(redb::Error::Io(err)))?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(dir.join("hivesync.redb"))
            .map_err(redb::Error::from)?;
        let tx = db.begin_write().map_err(redb::Error::from)?;
        {
            tx.open_table(PROJECTS).map_err(redb::Error::from)?;
            tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
            tx.open_table(SYNCS).map_err(redb::Error::from)?;
            tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
            tx.open_table(EVENTS).map_err(redb::Error::from)?;
            tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
            tx.open_table(EVENT_ONCE).map_err(redb::Error::from)?;
            tx.open_table(EVENT_ONCE_AGE).map_err(redb::Error::from)?;
            tx.open_table(DUE).map_err(redb::Error::from)?;
            tx.open_table(DELIVERIES).map_err(redb::Error::from)?;
            tx.open_table(DELIVERY_AGE).map_err(redb::Error::from)?;
        }
        tx.commit().map_err(redb::Error::from)?;
        let (live, _) = broadcast::channel(16 * 1024);
        let db = Arc::new(Db {
            database: db,
            commit_seconds,
        });
        let (writer, requests) = std::sync::mpsc::channel();
        let writer_thread = {
            let db = Arc::clone(&db);
            let live = live.clone();
            let keep = history_len.max(1);
            std::thread::Builder::new()
                .name("hivesync-events".into())
                .spawn(move || run_event_writer(db, requests, live, keep))
                .map_err(|err| EngineError::from(redb::Error::Io(err)))?
        };
        Ok(Arc::new(Self {
            db,
            limiter: Mutex::new(RateLimiter::new(sync_rate.0, sync_rate.1)),
            webhook_limiter: Mutex::new(RateLimiter::new(
                rules.webhook_rate.0,
                rules.webhook_rate.1,
            )),
            rules,
            epoch: Instant::now(),
            live,
            history_len: history_len.max(1),
            queue: Mutex::default(),
            queued: Notify::new(),
            owner_cap: Default::default(),
            locks: Mutex::default(),
            writer,
            writer_thread: Some(writer_thread),
        }))
    }

    /// Runs a point read (one key, a read transaction) on the calling thread: it
    /// takes microseconds from redb's page cache, which a hop to the blocking pool
    /// and back (two thread wake-ups) would multiply. Anything that writes, scans or
    /// may take longer goes through [`Self::blocking`].
    fn point_read<T, F>(&self, work: F) -> Result<T, EngineError>
    where
        F: FnOnce(&Db) -> Result<T, EngineError>,
    {
        work(&self.db)
    }

    /// Runs `work` with the database on the blocking pool.
    async fn blocking<T, F>(&self, work: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T, EngineError> + Send + 'static,
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
