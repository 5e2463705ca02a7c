//! Projects, sync records and the rate limit on Redis.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::{RedisEngine, project_from_fields};
use crate::domain::{ProjectId, SyncId};
use crate::engine::{EngineError, Project, ProjectLock, Store};
use crate::protocol::{Job, SyncRecord};

#[async_trait]
impl Store for RedisEngine {
    async fn insert_project(&self, project: &Project) -> Result<(), EngineError> {
        let mut registration = project.clone();
        registration.active_sync = None;
        registration.follow_up = None;
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
            .key(self.keys.owner(&project.owner))
            .arg(id.as_str())
            .arg(self.keys.sync(""))
            .invoke_async::<i64>(&mut *conn)
            .await?;
        Ok(())
    }

    async fn begin_sync(
        &self,
        record: SyncRecord,
        job: Job,
    ) -> Result<(SyncRecord, bool), EngineError> {
        let json = serde_json::to_string(&record)?;
        let job = serde_json::to_string(&job)?;
        let mut conn = self.conn().await?;
        let reply: Vec<redis::Value> = self
            .scripts
            .begin_sync
            .key(self.keys.project(&record.project_id))
            .key(self.keys.sync(&record.sync_id))
            .key(self.keys.project_syncs(&record.project_id))
            .key(self.keys.jobs())
            .arg(json)
            .arg(&record.sync_id)
            .arg(self.keys.sync(""))
            .arg(job)
            .invoke_async(&mut *conn)
            .await?;
        let code: i64 = match reply.first() {
            Some(value) => redis::from_redis_value_ref(value)?,
            None => return Err(EngineError::Closed),
        };
        match code {
            1 | 2 => Ok((record, true)),
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
    ) -> Result<bool, EngineError> {
        let json = serde_json::to_string(record)?;
        let mut conn = self.conn().await?;
        let stored: i64 = self
            .scripts
            .put_sync
            .key(self.keys.sync(&record.sync_id))
            .key(self.keys.project(&record.project_id))
            .key(self.keys.lock(&record.project_id))
            .key(self.keys.jobs())
            .arg(json)
            .arg(if record.status.is_terminal() {
                "1"
            } else {
                "0"
            })
            .arg(&record.sync_id)
            .arg(record.status.as_str())
            .arg(record.finished_at.as_deref().unwrap_or(""))
            .arg(record.commit.as_deref().unwrap_or(""))
            .arg(lock.map(|lock| lock.fence.to_string()).unwrap_or_default())
            .invoke_async(&mut *conn)
            .await?;
        if stored < 0 {
            return Err(EngineError::Fenced);
        }
        Ok(stored == 1)
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
