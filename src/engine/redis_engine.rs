//! The engine on Redis, shared by any number of hub and worker processes.
//!
//! - **Jobs** ride a Stream (`P:jobs`) read by the consumer group `workers`. A worker's
//!   heartbeat keeps its pending entry fresh; an entry idle for `reclaim_after` (its
//!   worker died or hung) is taken over with `XAUTOCLAIM`. A per-project lock with a
//!   fencing token makes sure only one worker ever touches a mirror.
//! - **Events** get their per-user id from `INCR`, are kept in a capped per-user Stream
//!   (trimmed exactly to the configured history) whose entry ids are `0-<event id>` (so
//!   resume is one `XRANGE`), and are published on
//!   one pub/sub channel that every hub node subscribes to. All three happen in one Lua
//!   script, so ids reach the history and the channel in order.
//! - **State**: projects are hashes (the registration as JSON plus the fields a sync
//!   changes), sync records JSON strings; coalescing and the GCRA rate limit are Lua, so
//!   every node gives the same answer.
//!
//! Every key is under the configured prefix. Scripts touch only keys of one project or
//! one user, which keeps a move to Redis Cluster (with hash tags) open.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use futures_util::StreamExt;
use redis::streams::{StreamAutoClaimReply, StreamRangeReply, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, Script};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{EngineError, EventLog, History, JobQueue, Lease, Live, Project, ProjectLock, Store};
use crate::domain::{ProjectId, SyncId};
use crate::protocol::{Event, EventBody, EventId, Job, SyncRecord};

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
    /// Connections in the command pool; each blocking `take` holds one for up to a second.
    pub pool_size: usize,
}

pub struct RedisEngine {
    pool: Pool,
    client: redis::Client,
    keys: Keys,
    settings: RedisSettings,
    /// this process's consumer name in the job group
    consumer: String,
    live: broadcast::Sender<Live>,
    /// the pub/sub task, started by the first `live()`
    subscriber: OnceLock<CancellationToken>,
    scripts: Scripts,
}

/// Every key the engine uses, under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn project(&self, id: &str) -> String {
        format!("{}:project:{id}", self.prefix)
    }
    fn owner(&self, owner: &str) -> String {
        format!("{}:owner:{owner}", self.prefix)
    }
    fn sync(&self, id: &str) -> String {
        format!("{}:sync:{id}", self.prefix)
    }
    fn project_syncs(&self, project: &str) -> String {
        format!("{}:project-syncs:{project}", self.prefix)
    }
    fn active(&self) -> String {
        format!("{}:active", self.prefix)
    }
    fn rate(&self, user: &str) -> String {
        format!("{}:rate:{user}", self.prefix)
    }
    fn jobs(&self) -> String {
        format!("{}:jobs", self.prefix)
    }
    fn lock(&self, project: &str) -> String {
        format!("{}:lock:{project}", self.prefix)
    }
    fn fence(&self, project: &str) -> String {
        format!("{}:fence:{project}", self.prefix)
    }
    fn event_seq(&self, user: &str) -> String {
        format!("{}:event-seq:{user}", self.prefix)
    }
    fn events(&self, user: &str) -> String {
        format!("{}:events:{user}", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

struct Scripts {
    begin_sync: Script,
    put_sync: Script,
    delete_project: Script,
    rate: Script,
    publish: Script,
    lock: Script,
    heartbeat: Script,
    unlock: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            // KEYS: project, sync, project-syncs, active. ARGV: record json, sync id,
            // project id, sync key prefix. Returns {1} when stored, {0, active record}
            // when a sync is already queued or running, {-1} when the project is gone.
            begin_sync: Script::new(
                r#"
                if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
                local active = redis.call('HGET', KEYS[1], 'active_sync')
                if active then
                    local raw = redis.call('GET', ARGV[4] .. active)
                    if raw then return {0, raw} end
                end
                redis.call('HSET', KEYS[1], 'active_sync', ARGV[2])
                redis.call('SET', KEYS[2], ARGV[1])
                redis.call('ZADD', KEYS[3], 0, ARGV[2])
                redis.call('SADD', KEYS[4], ARGV[3])
                return {1}
                "#,
            ),
            // KEYS: sync, project, active, lock. ARGV: record json, terminal (0/1), sync
            // id, project id, status, finished_at, commit, fence ('' = unfenced).
            // Returns 1 stored, 0 record gone (project deleted), -1 fenced.
            put_sync: Script::new(
                r#"
                if ARGV[8] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[8] then return -1 end
                if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
                redis.call('SET', KEYS[1], ARGV[1])
                if ARGV[2] == '1' then
                    if redis.call('EXISTS', KEYS[2]) == 1 then
                        if redis.call('HGET', KEYS[2], 'active_sync') == ARGV[3] then
                            redis.call('HDEL', KEYS[2], 'active_sync')
                        end
                        redis.call('HSET', KEYS[2], 'last_status', ARGV[5])
                        if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'last_synced_at', ARGV[6]) end
                        if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], 'commit', ARGV[7]) end
                    end
                    redis.call('SREM', KEYS[3], ARGV[4])
                end
                return 1
                "#,
            ),
            // KEYS: project, project-syncs, active, owner. ARGV: project id, sync key prefix.
            delete_project: Script::new(
                r#"
                for _, sync in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
                    redis.call('DEL', ARGV[2] .. sync)
                end
                redis.call('DEL', KEYS[1], KEYS[2])
                redis.call('SREM', KEYS[3], ARGV[1])
                redis.call('ZREM', KEYS[4], ARGV[1])
                return 1
                "#,
            ),
            // GCRA on the server's clock. KEYS: rate. ARGV: emission interval µs, burst
            // tolerance µs. Returns -1 when admitted, else µs to wait.
            rate: Script::new(
                r#"
                local t = redis.call('TIME')
                local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
                local interval = tonumber(ARGV[1])
                local burst = tonumber(ARGV[2])
                local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
                if tat < now then tat = now end
                local allow_at = tat - burst
                if now < allow_at then return allow_at - now end
                local next_tat = tat + interval
                local ttl_ms = math.ceil((next_tat - now) / 1000) + 1000
                redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', ttl_ms)
                return -1
                "#,
            ),
            // KEYS: event-seq, events stream, channel. ARGV: body json (an object),
            // channel payload prefix, history length. Returns the event id.
            publish: Script::new(
                r#"
                local id = redis.call('INCR', KEYS[1])
                local sid = string.format('%d', id)
                local event = '{"id":' .. sid .. ',' .. string.sub(ARGV[1], 2)
                redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. sid, 'e', event)
                redis.call('PUBLISH', KEYS[3], ARGV[2] .. event)
                return id
                "#,
            ),
            // KEYS: lock, fence. ARGV: ttl ms. Returns the new fence (as a string) or
            // false while the lock is held. The fence is the server clock in µs, kept
            // above the last grant.
            lock: Script::new(
                r#"
                if redis.call('EXISTS', KEYS[1]) == 1 then return false end
                local t = redis.call('TIME')
                local fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
                local last = tonumber(redis.call('GET', KEYS[2]) or '0')
                if fence <= last then fence = last + 1 end
                local s = string.format('%.0f', fence)
                redis.call('SET', KEYS[2], s)
                redis.call('SET', KEYS[1], s, 'PX', ARGV[1])
                return s
                "#,
            ),
            // KEYS: lock, jobs. ARGV: fence, ttl ms, group, consumer, entry id.
            // Renews the lock and resets the entry's idle time, only while the lock is
            // ours: a worker that lost it must not claim the entry back.
            heartbeat: Script::new(
                r#"
                if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
                redis.call('PEXPIRE', KEYS[1], ARGV[2])
                redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'JUSTID')
                return 1
                "#,
            ),
            unlock: Script::new(
                r#"
                if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
                return 1
                "#,
            ),
        }
    }
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
        let engine = Arc::new(Self {
            pool,
            client,
            keys: Keys {
                prefix: settings.prefix.clone(),
            },
            settings,
            consumer,
            live,
            subscriber: OnceLock::new(),
            scripts: Scripts::new(),
        });
        engine.ensure_group().await?;
        Ok(engine)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, EngineError> {
        self.pool
            .get()
            .await
            .map_err(|err| EngineError::Pool(err.to_string()))
    }

    async fn ensure_group(&self) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.jobs())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut *conn)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    fn lock_ttl_ms(&self) -> u64 {
        self.settings.reclaim_after.as_millis().max(100) as u64
    }

    async fn read_project(
        &self,
        conn: &mut deadpool_redis::Connection,
        id: &str,
    ) -> Result<Option<Project>, EngineError> {
        let fields: std::collections::HashMap<String, String> =
            conn.hgetall(self.keys.project(id)).await?;
        project_from_fields(fields)
    }

    /// Runs the pub/sub subscription until `stop`: connects, subscribes, forwards every
    /// message, pings to notice a dead link, and on any break reconnects with backoff and
    /// tells the hub (`Live::Reconnected`), which recovers the gap from the histories.
    async fn subscribe_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut first = true;
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.subscribe_once(&mut first, &mut backoff) => outcome,
            };
            if let Err(err) = outcome {
                tracing::warn!(error = %crate::worker::error_chain(&err), retry_in_ms = backoff.as_millis() as u64, "redis pub/sub lost; resubscribing");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn subscribe_once(
        &self,
        first: &mut bool,
        backoff: &mut Duration,
    ) -> Result<(), EngineError> {
        let pubsub = tokio::time::timeout(Duration::from_secs(3), self.client.get_async_pubsub())
            .await
            .map_err(|_| EngineError::Pool("pub/sub connect timed out".into()))??;
        let (mut sink, mut stream) = pubsub.split();
        sink.subscribe(self.keys.channel()).await?;
        *backoff = Duration::from_millis(50);
        if *first {
            *first = false;
            tracing::info!("subscribed to redis events");
        } else {
            tracing::info!("resubscribed to redis events; recovering missed ones");
        }
        // after a break, events published meanwhile exist only in the histories
        let _ = self.live.send(Live::Reconnected);
        let mut ping = tokio::time::interval(PUBSUB_PING);
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(EngineError::Pool("pub/sub connection closed".into()));
                    };
                    match parse_channel_payload(message.get_payload_bytes()) {
                        Some(event) => {
                            let _ = self.live.send(Live::Event(event));
                        }
                        None => tracing::warn!("dropping an unreadable event from redis"),
                    }
                }
                _ = ping.tick() => {
                    tokio::time::timeout(PUBSUB_PING, sink.ping::<()>())
                        .await
                        .map_err(|_| EngineError::Pool("pub/sub ping timed out".into()))??;
                }
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// The stored hash: `json` holds the registration; the fields a sync changes live
/// beside it so scripts update them without parsing JSON.
fn project_from_fields(
    mut fields: std::collections::HashMap<String, String>,
) -> Result<Option<Project>, EngineError> {
    let Some(json) = fields.remove("json") else {
        return Ok(None);
    };
    let mut project: Project = serde_json::from_str(&json)?;
    project.active_sync = fields.remove("active_sync");
    project.last_status = fields
        .remove("last_status")
        .and_then(|status| serde_json::from_value(serde_json::Value::String(status)).ok());
    project.last_synced_at = fields.remove("last_synced_at");
    project.commit = fields.remove("commit");
    Ok(Some(project))
}

/// Channel payloads are `<user length>:<user><event json>`.
fn channel_prefix(user: &str) -> String {
    format!("{}:{user}", user.len())
}

fn parse_channel_payload(payload: &[u8]) -> Option<Event> {
    let colon = payload.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(&payload[..colon]).ok()?.parse().ok()?;
    let rest = &payload[colon + 1..];
    let user = std::str::from_utf8(rest.get(..len)?).ok()?;
    let mut event: Event = serde_json::from_slice(rest.get(len..)?).ok()?;
    event.user = user.to_owned();
    Some(event)
}

fn event_id_of(entry_id: &str) -> Option<EventId> {
    entry_id.strip_prefix("0-")?.parse().ok()
}

fn job_of(entry: &redis::streams::StreamId) -> Option<Job> {
    let raw: String = entry.get("job")?;
    serde_json::from_str(&raw).ok()
}

#[async_trait]
impl Store for RedisEngine {
    async fn insert_project(&self, project: &Project) -> Result<(), EngineError> {
        let mut registration = project.clone();
        registration.active_sync = None;
        registration.last_status = None;
        registration.last_synced_at = None;
        registration.commit = None;
        let json = serde_json::to_string(&registration)?;
        let mut conn = self.conn().await?;
        redis::pipe()
            .atomic()
            .hset(self.keys.project(&project.project_id), "json", json)
            .ignore()
            .zadd(self.keys.owner(&project.owner), &project.project_id, 0)
            .ignore()
            .query_async::<()>(&mut *conn)
            .await?;
        Ok(())
    }

    async fn project(&self, id: &ProjectId) -> Result<Option<Project>, EngineError> {
        let mut conn = self.conn().await?;
        self.read_project(&mut conn, id.as_str()).await
    }

    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, EngineError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = conn.zrange(self.keys.owner(owner), 0, -1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(self.keys.project(id));
        }
        let all: Vec<std::collections::HashMap<String, String>> =
            pipe.query_async(&mut *conn).await?;
        let mut out = Vec::with_capacity(all.len());
        for fields in all {
            if let Some(project) = project_from_fields(fields)? {
                out.push(project);
            }
        }
        Ok(out)
    }

    async fn delete_project(&self, id: &ProjectId) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        let Some(project) = self.read_project(&mut conn, id.as_str()).await? else {
            return Ok(());
        };
        self.scripts
            .delete_project
            .key(self.keys.project(id.as_str()))
            .key(self.keys.project_syncs(id.as_str()))
            .key(self.keys.active())
            .key(self.keys.owner(&project.owner))
            .arg(id.as_str())
            .arg(self.keys.sync(""))
            .invoke_async::<i64>(&mut *conn)
            .await?;
        Ok(())
    }

    async fn begin_sync(&self, record: SyncRecord) -> Result<(SyncRecord, bool), EngineError> {
        let json = serde_json::to_string(&record)?;
        let mut conn = self.conn().await?;
        let reply: Vec<redis::Value> = self
            .scripts
            .begin_sync
            .key(self.keys.project(&record.project_id))
            .key(self.keys.sync(&record.sync_id))
            .key(self.keys.project_syncs(&record.project_id))
            .key(self.keys.active())
            .arg(json)
            .arg(&record.sync_id)
            .arg(&record.project_id)
            .arg(self.keys.sync(""))
            .invoke_async(&mut *conn)
            .await?;
        let code: i64 = match reply.first() {
            Some(value) => redis::from_redis_value_ref(value)?,
            None => return Err(EngineError::Closed),
        };
        match code {
            1 => Ok((record, true)),
            0 => {
                let raw: String = match reply.get(1) {
                    Some(value) => redis::from_redis_value_ref(value)?,
                    None => return Err(EngineError::Closed),
                };
                Ok((serde_json::from_str(&raw)?, false))
            }
            _ => Err(EngineError::Closed),
        }
    }

    async fn sync(&self, id: &SyncId) -> Result<Option<SyncRecord>, EngineError> {
        let mut conn = self.conn().await?;
        let raw: Option<String> = conn.get(self.keys.sync(id.as_str())).await?;
        raw.map(|raw| serde_json::from_str(&raw).map_err(EngineError::from))
            .transpose()
    }

    async fn put_sync(
        &self,
        record: &SyncRecord,
        lock: Option<&ProjectLock>,
    ) -> Result<(), EngineError> {
        let json = serde_json::to_string(record)?;
        let mut conn = self.conn().await?;
        let stored: i64 = self
            .scripts
            .put_sync
            .key(self.keys.sync(&record.sync_id))
            .key(self.keys.project(&record.project_id))
            .key(self.keys.active())
            .key(self.keys.lock(&record.project_id))
            .arg(json)
            .arg(if record.status.is_terminal() {
                "1"
            } else {
                "0"
            })
            .arg(&record.sync_id)
            .arg(&record.project_id)
            .arg(record.status.as_str())
            .arg(record.finished_at.as_deref().unwrap_or(""))
            .arg(record.commit.as_deref().unwrap_or(""))
            .arg(lock.map(|lock| lock.fence.to_string()).unwrap_or_default())
            .invoke_async(&mut *conn)
            .await?;
        if stored < 0 {
            return Err(EngineError::Fenced);
        }
        Ok(())
    }

    async fn syncs_of(
        &self,
        project: &ProjectId,
        limit: usize,
    ) -> Result<Vec<SyncRecord>, EngineError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        // sync ids are UUID v7: lexical order is request order
        let ids: Vec<String> = conn
            .zrevrange(
                self.keys.project_syncs(project.as_str()),
                0,
                limit as isize - 1,
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.sync(id)).collect();
        let raws: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut *conn)
            .await?;
        raws.into_iter()
            .flatten()
            .map(|raw| serde_json::from_str(&raw).map_err(EngineError::from))
            .collect()
    }

    async fn unfinished_syncs(&self) -> Result<Vec<(SyncRecord, String)>, EngineError> {
        let mut conn = self.conn().await?;
        let projects: Vec<String> = conn.smembers(self.keys.active()).await?;
        let mut out = Vec::new();
        for id in projects {
            let Some(project) = self.read_project(&mut conn, &id).await? else {
                continue;
            };
            let Some(active) = project.active_sync else {
                continue;
            };
            let raw: Option<String> = conn.get(self.keys.sync(&active)).await?;
            if let Some(raw) = raw {
                let record: SyncRecord = serde_json::from_str(&raw)?;
                if !record.status.is_terminal() {
                    out.push((record, project.owner.clone()));
                }
            }
        }
        Ok(out)
    }

    async fn admit_sync_request(&self, user: &str) -> Result<Result<(), Duration>, EngineError> {
        let (limit, period) = self.settings.sync_rate;
        let limit = limit.max(1);
        let interval = period / limit;
        let burst = interval * (limit - 1);
        let mut conn = self.conn().await?;
        let wait_us: i64 = self
            .scripts
            .rate
            .key(self.keys.rate(user))
            .arg(interval.as_micros() as u64)
            .arg(burst.as_micros() as u64)
            .invoke_async(&mut *conn)
            .await?;
        Ok(if wait_us < 0 {
            Ok(())
        } else {
            Err(Duration::from_micros(wait_us as u64))
        })
    }

    async fn ping(&self) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING").query_async::<()>(&mut *conn).await?;
        Ok(())
    }
}

#[async_trait]
impl JobQueue for RedisEngine {
    async fn enqueue(&self, job: Job) -> Result<(), EngineError> {
        let json = serde_json::to_string(&job)?;
        let mut conn = self.conn().await?;
        conn.xadd::<_, _, _, _, ()>(self.keys.jobs(), "*", &[("job", json)])
            .await?;
        Ok(())
    }

    async fn take(&self, shutdown: &CancellationToken) -> Result<Option<Lease>, EngineError> {
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            let mut conn = self.conn().await?;
            // first, jobs whose worker stopped heartbeating
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(self.keys.jobs())
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.lock_ttl_ms())
                .arg("0-0")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut *conn)
                .await?;
            if let Some(entry) = claimed.claimed.into_iter().next() {
                match job_of(&entry) {
                    Some(job) => {
                        let deliveries = self.deliveries(&mut conn, &entry.id).await?;
                        tracing::warn!(sync_id = %job.sync_id, entry = %entry.id, deliveries, "took over a job whose worker stopped heartbeating");
                        return Ok(Some(Lease {
                            job,
                            token: entry.id,
                            deliveries,
                        }));
                    }
                    None => {
                        self.drop_entry(&mut conn, &entry.id).await?;
                        continue;
                    }
                }
            }
            let mut read_cmd = redis::cmd("XREADGROUP");
            read_cmd
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(READ_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(self.keys.jobs())
                .arg(">");
            let read: Result<Option<StreamReadReply>, redis::RedisError> = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                read = read_cmd.query_async(&mut *conn) => read,
            };
            let read = match read {
                Ok(read) => read,
                Err(err) if err.code() == Some("NOGROUP") => {
                    // Redis lost its data (restarted without persistence): start over
                    drop(conn);
                    self.ensure_group().await?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            let Some(entry) = read
                .and_then(|reply| reply.keys.into_iter().next())
                .and_then(|key| key.ids.into_iter().next())
            else {
                continue;
            };
            match job_of(&entry) {
                Some(job) => {
                    return Ok(Some(Lease {
                        job,
                        token: entry.id,
                        deliveries: 1,
                    }));
                }
                None => {
                    tracing::warn!(entry = %entry.id, "dropping an unreadable job");
                    self.drop_entry(&mut conn, &entry.id).await?;
                }
            }
        }
    }

    async fn complete(&self, lease: &Lease) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        self.drop_entry(&mut conn, &lease.token).await
    }

    async fn release(&self, lease: Lease) -> Result<(), EngineError> {
        let json = serde_json::to_string(&lease.job)?;
        let mut conn = self.conn().await?;
        redis::pipe()
            .atomic()
            .xadd(self.keys.jobs(), "*", &[("job", json)])
            .ignore()
            .xack(self.keys.jobs(), GROUP, &[&lease.token])
            .ignore()
            .xdel(self.keys.jobs(), &[&lease.token])
            .ignore()
            .query_async::<()>(&mut *conn)
            .await?;
        Ok(())
    }

    async fn lock_project(&self, lease: &Lease) -> Result<Option<ProjectLock>, EngineError> {
        let project = &lease.job.project_id;
        let mut conn = self.conn().await?;
        let fence: Option<String> = self
            .scripts
            .lock
            .key(self.keys.lock(project))
            .key(self.keys.fence(project))
            .arg(self.lock_ttl_ms())
            .invoke_async(&mut *conn)
            .await?;
        Ok(fence
            .and_then(|fence| fence.parse().ok())
            .map(|fence| ProjectLock {
                project_id: project.clone(),
                fence,
            }))
    }

    async fn heartbeat(&self, lease: &Lease, lock: &ProjectLock) -> Result<bool, EngineError> {
        let mut conn = self.conn().await?;
        let held: i64 = self
            .scripts
            .heartbeat
            .key(self.keys.lock(&lock.project_id))
            .key(self.keys.jobs())
            .arg(lock.fence.to_string())
            .arg(self.lock_ttl_ms())
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(&lease.token)
            .invoke_async(&mut *conn)
            .await?;
        Ok(held == 1)
    }

    async fn unlock_project(&self, lock: &ProjectLock) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        self.scripts
            .unlock
            .key(self.keys.lock(&lock.project_id))
            .arg(lock.fence.to_string())
            .invoke_async::<i64>(&mut *conn)
            .await?;
        Ok(())
    }

    fn heartbeat_interval(&self) -> Duration {
        (self.settings.reclaim_after / 4).max(Duration::from_millis(25))
    }
}

impl RedisEngine {
    /// How many times the group has delivered entry `id` (XPENDING's counter).
    async fn deliveries(
        &self,
        conn: &mut deadpool_redis::Connection,
        id: &str,
    ) -> Result<u32, EngineError> {
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(self.keys.jobs())
            .arg(GROUP)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(&mut **conn)
            .await?;
        Ok(pending.first().map_or(1, |(_, _, _, count)| {
            (*count).min(u64::from(u32::MAX)) as u32
        }))
    }

    async fn drop_entry(
        &self,
        conn: &mut deadpool_redis::Connection,
        id: &str,
    ) -> Result<(), EngineError> {
        redis::pipe()
            .atomic()
            .xack(self.keys.jobs(), GROUP, &[id])
            .ignore()
            .xdel(self.keys.jobs(), &[id])
            .ignore()
            .query_async::<()>(&mut **conn)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl EventLog for RedisEngine {
    async fn publish(&self, user: &str, body: EventBody) -> Result<Event, EngineError> {
        let json = serde_json::to_string(&body)?;
        let mut conn = self.conn().await?;
        let id: u64 = self
            .scripts
            .publish
            .key(self.keys.event_seq(user))
            .key(self.keys.events(user))
            .key(self.keys.channel())
            .arg(json)
            .arg(channel_prefix(user))
            .arg(self.settings.history_len.max(1))
            .invoke_async(&mut *conn)
            .await?;
        Ok(Event {
            id,
            user: user.to_owned(),
            body,
        })
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
        let mut conn = self.conn().await?;
        let (latest, range): (Option<u64>, StreamRangeReply) = redis::pipe()
            .get(self.keys.event_seq(user))
            .cmd("XRANGE")
            .arg(self.keys.events(user))
            .arg(format!("0-{}", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut *conn)
            .await?;
        let latest = latest.unwrap_or(0);
        let mut events = Vec::with_capacity(range.ids.len());
        for entry in range.ids.into_iter().take(limit) {
            let raw: Option<String> = entry.get("e");
            let (Some(raw), Some(id)) = (raw, event_id_of(&entry.id)) else {
                continue;
            };
            let mut event: Event = serde_json::from_str(&raw)?;
            event.id = id;
            event.user = user.to_owned();
            events.push(event);
        }
        // ids are contiguous per user: a missing `after + 1` was trimmed away
        // and one past the newest event means Redis lost the history it belonged to
        let gap = (after < latest && events.first().is_none_or(|first| first.id != after + 1))
            || after > latest;
        Ok(History { events, gap })
    }

    async fn latest(&self, user: &str) -> Result<EventId, EngineError> {
        let mut conn = self.conn().await?;
        let latest: Option<u64> = conn.get(self.keys.event_seq(user)).await?;
        Ok(latest.unwrap_or(0))
    }
}

impl RedisEngine {
    /// Starts the pub/sub subscription (once) that feeds [`EventLog::live`]. Only hub
    /// nodes need it; workers publish but never listen.
    pub fn start_subscriber(self: &Arc<Self>) {
        let engine = Arc::clone(self);
        self.subscriber.get_or_init(|| {
            let stop = CancellationToken::new();
            tokio::spawn(Arc::clone(&engine).subscribe_loop(stop.clone()));
            stop
        });
    }
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        if let Some(stop) = self.subscriber.get() {
            stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_payload_round_trips_users_with_colons() {
        let event = Event {
            id: 7,
            user: "org:team:alice".into(),
            body: EventBody::Notification {
                kind: crate::protocol::NotificationKind::RepoSyncSuccess,
                sync_id: "s".into(),
                project_id: "p".into(),
                commit: None,
                error: None,
                at: "2026-01-01T00:00:00Z".into(),
            },
        };
        let json = serde_json::to_string(&event).expect("serializes");
        let payload = format!("{}{json}", channel_prefix(&event.user));
        assert_eq!(parse_channel_payload(payload.as_bytes()), Some(event));
        assert_eq!(
            parse_channel_payload(b"5:ab{}"),
            None,
            "length past the end"
        );
        assert_eq!(parse_channel_payload(b"x:ab"), None);
    }

    #[test]
    fn entry_ids_map_to_event_ids() {
        assert_eq!(event_id_of("0-42"), Some(42));
        assert_eq!(event_id_of("1700000000000-0"), None);
    }
}
