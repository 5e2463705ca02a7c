//! Projects, sync records and the rate limit on Redis.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::{RedisEngine, project_from_fields};
use crate::domain::{ProjectId, SyncId, now_epoch_ms};
use crate::engine::schedule::{apply_change, apply_end, at_registration, jitter};
use crate::engine::{Claimed, EngineError, Project, ProjectChange, ProjectLock, Put, Store};
use crate::protocol::{Job, SyncRecord};

/// How often a write checked against the project's revision is tried before giving up
/// (it only fails when the project is changed that often at the same moment).
const REV_RETRIES: usize = 20;

/// A delivery id is a duplicate for this long.
const DELIVERY_MEMORY_S: u64 = 24 * 3600;

/// The registration part of a project, as the hash's `json` field keeps it.
fn registration_json(project: &Project) -> Result<String, EngineError> {
    let mut registration = project.clone();
    registration.active_sync = None;
    registration.follow_up = None;
    registration.last_status = None;
    registration.last_synced_at = None;
    registration.commit = None;
    registration.set_freshness(Default::default());
    Ok(serde_json::to_string(&registration)?)
}

#[async_trait]
impl Store for RedisEngine {
    async fn insert_project(&self, project: &Project) -> Result<(), EngineError> {
        let mut project = project.clone();
        at_registration(&mut project, now_epoch_ms());
        let json = registration_json(&project)?;
        let fresh = serde_json::to_string(&project.freshness())?;
        let id = &project.project_id;
        let mut conn = self.conn().await?;
        // the owner's list lives in the owner's slot, the project in its shard's, so
        // these are two steps: the list first, because listing skips an id whose
        // project does not exist, while a project no list names would never be seen
        // (nor deleted) by anyone
        conn.zadd::<_, _, _, ()>(self.keys.owner(&project.owner), id.as_str(), 0)
            .await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                self.keys.project(id),
                &[("json", json), ("fresh", fresh), ("rev", "0".to_owned())],
            )
            .ignore()
            .sadd(self.keys.projects(self.keys.shard_of(id)), id.as_str())
            .ignore();
        if let Some(due) = project.next_sync_ms {
            pipe.zadd(self.keys.due_of(id), id.as_str(), due).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn project(&self, id: &ProjectId) -> Result<Option<Project>, EngineError> {
        let mut conn = self.conn().await?;
        self.read_project(&mut conn, id).await
    }

    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, EngineError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = conn.zrange(self.keys.owner(owner), 0, -1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // one request each (a cluster pipeline must stay in one slot), sent together
        // on the multiplexed connection
        let all: Vec<std::collections::HashMap<String, String>> =
            futures_util::future::try_join_all(ids.iter().map(|id| {
                let mut conn = conn.clone();
                let key = self.keys.project(id);
                async move { conn.hgetall(key).await }
            }))
            .await?;
        let mut out = Vec::with_capacity(all.len());
        for (id, fields) in ids.iter().zip(all) {
            match project_from_fields(fields) {
                Ok(Some(project)) => out.push(project),
                Ok(None) => {}
                // one unreadable record must not hide the owner's other projects
                Err(err) if err.is_unreadable_record() => {
                    tracing::error!(project_id = %id, error = %crate::error::error_chain(&err), "skipping a project whose stored record cannot be read");
                }
                Err(err) => return Err(err),
            }
        }
        Ok(out)
    }

    async fn delete_project(&self, id: &ProjectId) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        let Some(project) = self.read_project(&mut conn, id).await? else {
            return Ok(());
        };
        let id = id.as_str();
        for _ in 0..REV_RETRIES {
            // every key the script deletes is named in KEYS, so the sync records are
            // read first; the script refuses if a sync was added meanwhile
            let syncs: Vec<String> = conn.zrange(self.keys.project_syncs(id), 0, -1).await?;
            let mut script = self.scripts.delete_project.prepare_invoke();
            script
                .key(self.keys.project(id))
                .key(self.keys.project_syncs(id))
                .key(self.keys.due_of(id))
                .key(self.keys.projects(self.keys.shard_of(id)))
                .arg(id);
            for sync in &syncs {
                script.key(self.keys.sync(sync));
            }
            let deleted: i64 = script.invoke_async(&mut conn).await?;
            if deleted == -2 {
                continue;
            }
            conn.zrem::<_, _, ()>(self.keys.owner(&project.owner), id)
                .await?;
            return Ok(());
        }
        Err(EngineError::Contended)
    }

    async fn begin_sync(
        &self,
        record: SyncRecord,
        job: Job,
    ) -> Result<(SyncRecord, bool), EngineError> {
        let project = &record.project_id;
        if self.keys.shard_of(&record.sync_id) != self.keys.shard_of(project) {
            return Err(EngineError::ForeignSyncId(record.sync_id));
        }
        let json = serde_json::to_string(&record)?;
        let job = serde_json::to_string(&job)?;
        let project_key = self.keys.project(project);
        let mut conn = self.conn().await?;
        let mut reply: Vec<redis::Value> = Vec::new();
        for _ in 0..REV_RETRIES {
            // the running and follow-up syncs are read first so that the script names
            // their records in KEYS; it refuses if either changed meanwhile
            let (active, follow_up): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(&project_key)
                .arg("active_sync")
                .arg("follow_up")
                .query_async(&mut conn)
                .await?;
            let record_key = |id: &Option<String>| match id {
                Some(id) => self.keys.sync(id),
                None => project_key.clone(),
            };
            reply = self
                .scripts
                .begin_sync
                .key(&project_key)
                .key(self.keys.sync(&record.sync_id))
                .key(self.keys.project_syncs(project))
                .key(self.keys.jobs_of(project))
                .key(self.keys.bell_of(project))
                .key(record_key(&active))
                .key(record_key(&follow_up))
                .arg(&json)
                .arg(record.sync_id.as_str())
                .arg(&job)
                .arg(active.as_deref().unwrap_or(""))
                .arg(follow_up.as_deref().unwrap_or(""))
                .arg(self.ring())
                .invoke_async(&mut conn)
                .await?;
            if !matches!(reply.first(), Some(redis::Value::Int(-2))) {
                break;
            }
        }
        let code: i64 = match reply.first() {
            Some(value) => redis::from_redis_value_ref(value)?,
            None => return Err(EngineError::Closed),
        };
        match code {
            1 | 2 => Ok((record, true)),
            -2 => Err(EngineError::Contended),
            0 => {
                let raw: String = match reply.get(1) {
                    Some(value) => redis::from_redis_value_ref(value)?,
                    None => return Err(EngineError::Closed),
                };
                Ok((serde_json::from_str(&raw)?, false))
            }
            _ => Err(EngineError::ProjectGone),
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
    ) -> Result<Put, EngineError> {
        let json = serde_json::to_string(record)?;
        let mut conn = self.conn().await?;
        for _ in 0..REV_RETRIES {
            // an end of a sync carries the project's new status, computed from the
            // project as read now and written only if it did not change meanwhile
            let mut rev = String::new();
            let mut fresh = String::new();
            let mut due = String::new();
            let mut paused = false;
            if record.status.is_terminal()
                && let Some((mut project, read_rev)) =
                    self.read_project_rev(&mut conn, &record.project_id).await?
            {
                paused = apply_end(
                    &mut project,
                    record,
                    now_epoch_ms(),
                    jitter(),
                    self.settings.rules,
                );
                rev = read_rev;
                fresh = serde_json::to_string(&project.freshness())?;
                due = project
                    .next_sync_ms
                    .map(|ms| ms.to_string())
                    .unwrap_or_default();
            }
            let stored: i64 = self
                .scripts
                .put_sync
                .key(self.keys.sync(&record.sync_id))
                .key(self.keys.project(&record.project_id))
                .key(self.keys.lock(&record.project_id))
                .key(self.keys.jobs_of(&record.project_id))
                .key(self.keys.due_of(&record.project_id))
                .key(self.keys.bell_of(&record.project_id))
                .arg(&json)
                .arg(if record.status.is_terminal() {
                    "1"
                } else {
                    "0"
                })
                .arg(record.sync_id.as_str())
                .arg(record.status.as_str())
                .arg(record.finished_at.as_deref().unwrap_or(""))
                .arg(record.commit.as_deref().unwrap_or(""))
                .arg(lock.map(|lock| lock.fence.to_string()).unwrap_or_default())
                .arg(&rev)
                .arg(&fresh)
                .arg(&due)
                .arg(record.project_id.as_str())
                .arg(self.ring())
                .invoke_async(&mut conn)
                .await?;
            return match stored {
                -2 => continue,
                -1 => Err(EngineError::Fenced),
                0 => Ok(Put::Gone),
                // the status was written (2) only if this was the sync's first end
                2 if paused => Ok(Put::StoredAndPaused),
                _ => Ok(Put::Stored),
            };
        }
        Err(EngineError::Contended)
    }

    async fn update_project(
        &self,
        id: &ProjectId,
        change: ProjectChange,
    ) -> Result<Option<Project>, EngineError> {
        let mut conn = self.conn().await?;
        for _ in 0..REV_RETRIES {
            let Some((mut project, rev)) = self.read_project_rev(&mut conn, id).await? else {
                return Ok(None);
            };
            apply_change(&mut project, &change, now_epoch_ms(), jitter());
            let written: i64 = self
                .scripts
                .update_project
                .key(self.keys.project(id.as_str()))
                .key(self.keys.due_of(id.as_str()))
                .arg(&rev)
                .arg(registration_json(&project)?)
                .arg(serde_json::to_string(&project.freshness())?)
                .arg(
                    project
                        .next_sync_ms
                        .map(|ms| ms.to_string())
                        .unwrap_or_default(),
                )
                .arg(id.as_str())
                .invoke_async(&mut conn)
                .await?;
            match written {
                -2 => continue,
                0 => return Ok(None),
                _ => return Ok(Some(project)),
            }
        }
        Err(EngineError::Contended)
    }

    async fn claim_due(
        &self,
        now_ms: u64,
        limit: usize,
        hold: Duration,
    ) -> Result<Vec<Claimed>, EngineError> {
        let mut conn = self.conn().await?;
        let mut claimed = Vec::new();
        // a cluster keeps one due set per shard: each is claimed from in turn, starting
        // at a different one each time so no shard waits behind the others
        let shards = self.keys.shards();
        let start = self.next_shard(shards);
        for offset in 0..shards {
            if claimed.len() >= limit {
                break;
            }
            let shard = (start + offset) % shards;
            // id, due time, id, due time, …
            let flat: Vec<String> = self
                .scripts
                .claim_due
                .key(self.keys.due(shard))
                .arg(now_ms)
                .arg(limit - claimed.len())
                .arg(now_ms + hold.as_millis() as u64)
                .invoke_async(&mut conn)
                .await?;
            // the due sets hold ids this engine wrote
            claimed.extend(flat.chunks_exact(2).filter_map(|pair| {
                Some(Claimed {
                    project_id: ProjectId::parse(&pair[0])?,
                    due_ms: pair[1].parse::<f64>().map_or(now_ms, |due| due as u64),
                })
            }));
        }
        Ok(claimed)
    }

    async fn seen_delivery(
        &self,
        project: &ProjectId,
        delivery: &str,
    ) -> Result<bool, EngineError> {
        let mut conn = self.conn().await?;
        let first: Option<String> = redis::cmd("SET")
            .arg(self.keys.delivery(project.as_str(), delivery))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(DELIVERY_MEMORY_S)
            .query_async(&mut conn)
            .await?;
        Ok(first.is_none())
    }

    async fn admit_webhook(
        &self,
        project: &ProjectId,
    ) -> Result<Result<(), Duration>, EngineError> {
        self.gcra(
            self.keys.webhook_rate(project.as_str()),
            self.settings.rules.webhook_rate,
            false,
        )
        .await
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
        let raws: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        raws.into_iter()
            .flatten()
            .map(|raw| serde_json::from_str(&raw).map_err(EngineError::from))
            .collect()
    }

    async fn admit_sync_request(&self, user: &str) -> Result<Result<(), Duration>, EngineError> {
        self.gcra(self.keys.rate(user), self.settings.sync_rate, false)
            .await
    }

    async fn admit_background_sync(&self, user: &str) -> Result<Result<(), Duration>, EngineError> {
        self.gcra(self.keys.rate(user), self.settings.sync_rate, true)
            .await
    }

    async fn ping(&self) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

impl RedisEngine {
    /// One request against a GCRA limit of `rate` kept at `key`: `Err(wait)` when over.
    /// `background`: the request may use only half the burst (see
    /// [`crate::domain::RateLimiter::check_background`]).
    async fn gcra(
        &self,
        key: String,
        (limit, period): (u32, Duration),
        background: bool,
    ) -> Result<Result<(), Duration>, EngineError> {
        let limit = limit.max(1);
        let interval = period / limit;
        let mut burst = interval * (limit - 1);
        if background {
            burst /= 2;
        }
        let mut conn = self.conn().await?;
        let wait_us: i64 = self
            .scripts
            .rate
            .key(key)
            .arg(interval.as_micros() as u64)
            .arg(burst.as_micros() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(if wait_us < 0 {
            Ok(())
        } else {
            Err(Duration::from_micros(wait_us as u64))
        })
    }
}
