//! The engine on Redis, shared by any number of hub and worker processes.
//!
//! On one Redis:
//!
//! - **Jobs** ([`queue`]) ride a Stream (`P:jobs`) read by the consumer group `workers`.
//!   A worker's heartbeat keeps its pending entry fresh; an entry idle for
//!   `reclaim_after` (its worker died or hung) is taken over with `XAUTOCLAIM`. A
//!   per-project lock with a fencing token makes sure only one worker ever touches a
//!   mirror.
//! - **Events** ([`events`]) get their per-user id from `INCR`, are kept in a capped
//!   per-user Stream (trimmed exactly to the configured history) whose entry ids are
//!   `0-<event id>` (so resume is one `XRANGE`), and are published on one pub/sub
//!   channel that every hub node subscribes to. All three happen in one Lua script, so
//!   ids reach the history and the channel in order.
//! - **State** ([`store`]): projects are hashes (the registration as JSON plus the
//!   fields a sync changes), sync records JSON strings; coalescing and the GCRA rate
//!   limit are Lua, so every node gives the same answer.
//!
//! Every key is under the configured prefix ([`keys`]); the Lua scripts are the files in
//! `lua/`, each headed by its KEYS/ARGV contract, and every key a script touches is in
//! its KEYS.
//!
//! **On a Redis Cluster** (`cluster` in the settings) the same scripts run with hash
//! tags that keep each script's keys in one slot ([`keys`]): jobs, due times and
//! projects are split over [`keys::SHARDS`] shards, each a stream, a due set and the
//! projects whose id falls in it; a worker reads every shard's stream in turn and
//! sleeps on the shards' sharded "bell" channels when all are empty ([`queue`]).
//! Events go out with `SPUBLISH` on the channel of the user's group, and a hub
//! subscribes only to the groups of users it holds sockets for ([`cluster`]).

mod cluster;
mod events;
mod fair;
mod keys;
mod queue;
mod scripts;
mod store;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::ConnectionLike;
use redis::{AsyncCommands, AsyncConnectionConfig, RedisFuture};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{EngineError, Live, Project};
use crate::domain::{ProjectId, SyncId};
use keys::Keys;
use scripts::Scripts;

const GROUP: &str = "workers";
/// How long a `take` blocks in Redis before looking at shutdown again.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// A pub/sub connection that has not answered a ping this long is replaced.
const PUBSUB_PING: Duration = Duration::from_secs(5);

/// What the Redis engine is configured with.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// one URL; on a cluster, any number of its nodes' URLs, comma-separated
    pub url: String,
    /// run on a Redis Cluster
    pub cluster: bool,
    pub prefix: String,
    pub reclaim_after: Duration,
    pub history_len: u64,
    pub sync_rate: (u32, Duration),
    /// pause and webhook rules
    pub rules: super::schedule::Rules,
    /// Connections in the command pool; each blocking `take` holds one for up to a second.
    pub pool_size: usize,
}

pub use keys::{SHARDS, USER_GROUPS};

/// See [`RedisEngine::conn`]: one multiplexed connection, to a single Redis or to every
/// node of a cluster (which follows `MOVED`/`ASK` and re-reads the slot map itself).
#[derive(Clone)]
pub(super) enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// How the engine reaches Redis.
enum Topology {
    /// one server: blocking reads from a pool, events on one plain pub/sub channel
    Single { pool: Pool, client: redis::Client },
    /// a cluster: no blocking commands; sharded pub/sub on a connection of its own
    Cluster { pubsub: Arc<cluster::ShardedPubSub> },
}

pub struct RedisEngine {
    topology: Topology,
    shared: Conn,
    keys: Keys,
    settings: RedisSettings,
    /// this process's consumer name in the job group
    consumer: String,
    live: broadcast::Sender<Live>,
    /// the pub/sub task, started by the first `live()`
    subscriber: OnceLock<CancellationToken>,
    /// counts the subscription's reconnects, once the process's metrics are known
    reconnects: OnceLock<prometheus_client::metrics::counter::Counter>,
    scripts: Scripts,
    /// rung when a cluster shard's bell rings (a job was queued)
    bell: tokio::sync::Notify,
    /// whether this process listens for the shards' bells yet
    bells: tokio::sync::OnceCell<()>,
    /// where the next round over the shards starts
    shard_cursor: std::sync::atomic::AtomicU16,
    /// when (ms since the engine started) a round of `XAUTOCLAIM` last ran on a cluster
    last_reclaim_ms: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// `HIVESYNC_OWNER_MAX_RUNNING` as this process's workers apply it
    owner_cap: crate::engine::fair::OwnerCap,
}

impl RedisEngine {
    /// Connects, checks the server answers and creates the job group (on a cluster,
    /// one per shard).
    pub async fn connect(settings: RedisSettings) -> Result<Arc<Self>, EngineError> {
        if settings.cluster {
            return Self::connect_cluster(settings).await;
        }
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // above the blocking read's wait, so a `take` is not cut short
            .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(4)));
        let manager = Manager::new_with_config(settings.url.as_str(), connection_config)?;
        let client = redis::Client::open(settings.url.as_str())?;
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(4))
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(3)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| no_connection(err.to_string()))?;
        let (live, _) = broadcast::channel(16 * 1024);
        let shared_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            // a request during an outage fails after one quick reconnect attempt
            // (the caller answers 503 or retries); the next request tries again
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let shared =
            redis::aio::ConnectionManager::new_with_config(client.clone(), shared_config).await?;
        let engine = Self::assemble(
            Topology::Single { pool, client },
            Conn::Single(shared),
            settings,
            live,
        );
        engine.ensure_group().await?;
        Ok(engine)
    }

    async fn connect_cluster(settings: RedisSettings) -> Result<Arc<Self>, EngineError> {
        if settings.prefix.contains(['{', '}']) {
            return Err(EngineError::Backend(
                "on a cluster the key prefix may not contain { or }: they mark hash tags".into(),
            ));
        }
        let nodes: Vec<&str> = settings
            .url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(3)
            .max_retry_wait(500)
            .build()?;
        let shared = client.get_async_connection().await?;
        let (live, _) = broadcast::channel(16 * 1024);
        let pubsub = Arc::new(cluster::ShardedPubSub::new(&nodes)?);
        let engine = Self::assemble(
            Topology::Cluster { pubsub },
            Conn::Cluster(shared),
            settings,
            live,
        );
        engine.ensure_group().await?;
        Ok(engine)
    }

    fn assemble(
        topology: Topology,
        shared: Conn,
        settings: RedisSettings,
        live: broadcast::Sender<Live>,
    ) -> Arc<Self> {
        let consumer = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        Arc::new(Self {
            topology,
            shared,
            keys: Keys {
                prefix: settings.prefix.clone(),
                cluster: settings.cluster,
            },
            settings,
            consumer,
            live,
            subscriber: OnceLock::new(),
            reconnects: OnceLock::new(),
            scripts: Scripts::new(),
            bell: tokio::sync::Notify::new(),
            bells: tokio::sync::OnceCell::new(),
            shard_cursor: Default::default(),
            last_reclaim_ms: Default::default(),
            started: std::time::Instant::now(),
            owner_cap: Default::default(),
        })
    }

    /// The sharded subscription, on a cluster.
    fn sharded(&self) -> Option<&Arc<cluster::ShardedPubSub>> {
        match &self.topology {
            Topology::Cluster { pubsub } => Some(pubsub),
            Topology::Single { .. } => None,
        }
    }

    /// Whether the engine runs on a cluster.
    pub fn is_cluster(&self) -> bool {
        self.keys.cluster
    }

    /// `'1'` when a queued job should ring its shard's bell (a cluster's workers sleep
    /// on it; one Redis's block in `XREADGROUP` instead).
    pub(super) fn ring(&self) -> &'static str {
        if self.keys.cluster { "1" } else { "0" }
    }

    /// A shard to start a round at, a different one each call.
    pub(super) fn next_shard(&self, shards: u16) -> u16 {
        self.shard_cursor
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % shards.max(1)
    }

    /// The connection for every command that does not block: one multiplexed
    /// connection shared by all callers (requests pipeline on it; no checkout, no
    /// PING per use), which reconnects by itself after Redis restarts.
    pub(super) async fn conn(&self) -> Result<Conn, EngineError> {
        Ok(self.shared.clone())
    }

    /// A connection of its own, for the blocking `XREADGROUP` (which would stall
    /// every other command on the shared one); one Redis only.
    pub(super) async fn blocking_conn(&self) -> Result<deadpool_redis::Connection, EngineError> {
        match &self.topology {
            Topology::Single { pool, .. } => pool
                .get()
                .await
                .map_err(|err| no_connection(err.to_string())),
            Topology::Cluster { .. } => Err(EngineError::Backend(
                "no blocking commands on a cluster".into(),
            )),
        }
    }

    /// Creates the job group on every shard's stream (a no-op where it exists).
    pub(super) async fn ensure_group(&self) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        for shard in 0..self.keys.shards() {
            let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.keys.jobs(shard))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(()) => {}
                Err(err) if err.code() == Some("BUSYGROUP") => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    pub(super) fn lock_ttl_ms(&self) -> u64 {
        self.settings.reclaim_after.as_millis().max(100) as u64
    }

    async fn read_project(
        &self,
        conn: &mut Conn,
        id: &ProjectId,
    ) -> Result<Option<Project>, EngineError> {
        Ok(self
            .read_project_rev(conn, id)
            .await?
            .map(|(project, _)| project))
    }

    /// The project and its revision (bumped by every write of its settings or status).
    async fn read_project_rev(
        &self,
        conn: &mut Conn,
        id: &ProjectId,
    ) -> Result<Option<(Project, String)>, EngineError> {
        let mut fields: std::collections::HashMap<String, String> =
            conn.hgetall(self.keys.project(id)).await?;
        let rev = fields.remove("rev").unwrap_or_else(|| "0".to_owned());
        Ok(project_from_fields(fields)?.map(|project| (project, rev)))
    }
}

impl From<redis::RedisError> for EngineError {
    /// A Redis that cannot be reached is [`EngineError::Unavailable`]; any other
    /// failure of a command is the backend's.
    fn from(err: redis::RedisError) -> Self {
        if err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.is_timeout()
        {
            EngineError::Unavailable(Box::new(err))
        } else {
            EngineError::Backend(Box::new(err))
        }
    }
}

impl From<redis::ParsingError> for EngineError {
    fn from(err: redis::ParsingError) -> Self {
        EngineError::Backend(Box::new(err))
    }
}

/// No connection could be had (the pool, a pub/sub connection): the engine is
/// unreachable for now.
fn no_connection(why: impl Into<String>) -> EngineError {
    EngineError::Unavailable(why.into().into())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// The stored hash: `json` holds the registration (name, URL, credential, webhook);
/// the fields a sync changes live beside it so scripts update them without parsing
/// JSON, and `fresh` holds the schedule and last outcomes as the Rust side computed
/// them (written with a check of `rev`).
fn project_from_fields(
    mut fields: std::collections::HashMap<String, String>,
) -> Result<Option<Project>, EngineError> {
    let Some(json) = fields.remove("json") else {
        return Ok(None);
    };
    let mut project: Project = serde_json::from_str(&json)?;
    project.active_sync = fields
        .remove("active_sync")
        .map(SyncId::try_from)
        .transpose()?;
    project.follow_up = fields
        .remove("follow_up")
        .map(SyncId::try_from)
        .transpose()?;
    project.last_status = fields
        .remove("last_status")
        .and_then(|status| serde_json::from_value(serde_json::Value::String(status)).ok());
    project.last_synced_at = fields.remove("last_synced_at");
    project.commit = fields.remove("commit");
    if let Some(fresh) = fields.remove("fresh") {
        project.set_freshness(serde_json::from_str(&fresh)?);
    }
    Ok(Some(project))
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        if let Some(stop) = self.subscriber.get() {
            stop.cancel();
        }
    }
}
