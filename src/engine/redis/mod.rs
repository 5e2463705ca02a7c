//! The engine on Redis, shared by any number of hub and worker processes.
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
//! `lua/`, each headed by its KEYS/ARGV contract. This engine runs on one Redis (with
//! replicas); Redis Cluster is not supported yet.

mod events;
mod keys;
mod queue;
mod scripts;
mod store;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncCommands, AsyncConnectionConfig};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{EngineError, Live, Project};
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
    pub url: String,
    pub prefix: String,
    pub reclaim_after: Duration,
    pub history_len: u64,
    pub sync_rate: (u32, Duration),
    /// pause and webhook rules
    pub rules: super::schedule::Rules,
    /// Connections in the command pool; each blocking `take` holds one for up to a second.
    pub pool_size: usize,
}

/// See [`RedisEngine::conn`].
pub(super) type Conn = redis::aio::ConnectionManager;

pub struct RedisEngine {
    /// connections for blocking reads only
    pool: Pool,
    shared: Conn,
    client: redis::Client,
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
}

impl RedisEngine {
    /// Connects, checks the server answers and creates the job group.
    pub async fn connect(settings: RedisSettings) -> Result<Arc<Self>, EngineError> {
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
            .map_err(|err| EngineError::Pool(err.to_string()))?;
        let consumer = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
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
        let engine = Arc::new(Self {
            pool,
            shared,
            client,
            keys: Keys {
                prefix: settings.prefix.clone(),
            },
            settings,
            consumer,
            live,
            subscriber: OnceLock::new(),
            reconnects: OnceLock::new(),
            scripts: Scripts::new(),
        });
        engine.ensure_group().await?;
        Ok(engine)
    }

    /// The connection for every command that does not block: one multiplexed
    /// connection shared by all callers (requests pipeline on it; no checkout, no
    /// PING per use), which reconnects by itself after Redis restarts.
    pub(super) async fn conn(&self) -> Result<Conn, EngineError> {
        Ok(self.shared.clone())
    }

    /// A connection of its own, for the blocking `XREADGROUP` (which would stall
    /// every other command on the shared one).
    pub(super) async fn blocking_conn(&self) -> Result<deadpool_redis::Connection, EngineError> {
        self.pool
            .get()
            .await
            .map_err(|err| EngineError::Pool(err.to_string()))
    }

    pub(super) async fn ensure_group(&self) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.jobs())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    pub(super) fn lock_ttl_ms(&self) -> u64 {
        self.settings.reclaim_after.as_millis().max(100) as u64
    }

    async fn read_project(
        &self,
        conn: &mut Conn,
        id: &str,
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
        id: &str,
    ) -> Result<Option<(Project, String)>, EngineError> {
        let mut fields: std::collections::HashMap<String, String> =
            conn.hgetall(self.keys.project(id)).await?;
        let rev = fields.remove("rev").unwrap_or_else(|| "0".to_owned());
        Ok(project_from_fields(fields)?.map(|project| (project, rev)))
    }
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
    project.active_sync = fields.remove("active_sync");
    project.follow_up = fields.remove("follow_up");
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
