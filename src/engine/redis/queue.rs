//! The job queue on a Redis Stream with a consumer group, and the per-project mirror
//! locks with fencing tokens.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::streams::{StreamAutoClaimReply, StreamRangeReply, StreamReadReply};
use tokio_util::sync::CancellationToken;

use super::{GROUP, READ_BLOCK, RedisEngine};
use crate::engine::{EngineError, JobQueue, Lease, Project, ProjectLock};
use crate::protocol::{Job, SyncRecord};

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
            let mut conn = self.blocking_conn().await?;
            // first, jobs whose worker stopped heartbeating
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(self.keys.jobs())
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.lock_ttl_ms())
                .arg("0-0")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
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
            // awaited to the end, never abandoned: Redis hands an entry to a blocked
            // read even after its caller stopped listening, and an entry handed to a
            // reply nobody reads sits pending until it is reclaimed (READ_BLOCK bounds
            // how long shutdown waits for this)
            let read: Result<Option<StreamReadReply>, redis::RedisError> =
                read_cmd.query_async(&mut conn).await;
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
                    let lease = Lease {
                        job,
                        token: entry.id,
                        deliveries: 1,
                    };
                    if shutdown.is_cancelled() {
                        // taken as the worker stopped: straight back for another
                        drop(conn);
                        self.release(lease).await?;
                        return Ok(None);
                    }
                    return Ok(Some(lease));
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

    async fn depth(&self) -> Result<u64, EngineError> {
        // entries leave the stream when completed or released, so what is in it and
        // not pending with a consumer is waiting
        let mut conn = self.conn().await?;
        let (length, pending): (u64, redis::Value) = redis::pipe()
            .xlen(self.keys.jobs())
            .cmd("XPENDING")
            .arg(self.keys.jobs())
            .arg(GROUP)
            .query_async(&mut conn)
            .await?;
        let pending = match pending {
            redis::Value::Array(summary) => match summary.first() {
                Some(redis::Value::Int(count)) => u64::try_from(*count).unwrap_or(0),
                _ => 0,
            },
            _ => 0,
        };
        Ok(length.saturating_sub(pending))
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
            .query_async::<()>(&mut conn)
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
            .invoke_async(&mut conn)
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
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    async fn unlock_project(&self, lock: &ProjectLock) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        self.scripts
            .unlock
            .key(self.keys.lock(&lock.project_id))
            .arg(lock.fence.to_string())
            .invoke_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    fn heartbeat_interval(&self) -> Duration {
        (self.settings.reclaim_after / 4).max(Duration::from_millis(25))
    }

    async fn stranded_syncs(&self) -> Result<Vec<(SyncRecord, String)>, EngineError> {
        let mut conn = self.conn().await?;
        // every project's active sync (a SCAN: the watchdog runs rarely)
        let mut project_keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.projects_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            project_keys.extend(keys);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut candidates = Vec::new();
        for key in &project_keys {
            let (active, json): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(key)
                .arg("active_sync")
                .arg("json")
                .query_async(&mut conn)
                .await?;
            let (Some(active), Some(json)) = (active, json) else {
                continue;
            };
            let project: Project = serde_json::from_str(&json)?;
            let raw: Option<String> = conn.get(self.keys.sync(&active)).await?;
            let Some(raw) = raw else { continue };
            let record: SyncRecord = serde_json::from_str(&raw)?;
            if record.status.is_terminal() {
                continue;
            }
            let locked: bool = conn.exists(self.keys.lock(&project.project_id)).await?;
            if !locked {
                candidates.push((record, project.owner));
            }
        }
        if candidates.is_empty() {
            return Ok(candidates);
        }
        // and the jobs on the stream, pending or not
        let mut queued = std::collections::HashSet::new();
        let mut start = "-".to_owned();
        loop {
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(self.keys.jobs())
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            let Some(last) = page.ids.last().map(|entry| entry.id.clone()) else {
                break;
            };
            queued.extend(page.ids.iter().filter_map(job_of).map(|job| job.sync_id));
            if page.ids.len() < 1000 {
                break;
            }
            start = format!("({last}");
        }
        Ok(candidates
            .into_iter()
            .filter(|(record, _)| !queued.contains(&record.sync_id))
            .collect())
    }

    async fn claim_watchdog(&self, period: Duration) -> Result<bool, EngineError> {
        let mut conn = self.conn().await?;
        let claimed: Option<String> = redis::cmd("SET")
            .arg(self.keys.watchdog())
            .arg(&self.consumer)
            .arg("NX")
            .arg("PX")
            .arg(period.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await?;
        Ok(claimed.is_some())
    }
}

impl RedisEngine {
    /// How many times the group has delivered entry `id` (XPENDING's counter).
    async fn deliveries(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        id: &str,
    ) -> Result<u32, EngineError> {
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(self.keys.jobs())
            .arg(GROUP)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(conn)
            .await?;
        Ok(pending.first().map_or(1, |(_, _, _, count)| {
            (*count).min(u64::from(u32::MAX)) as u32
        }))
    }

    async fn drop_entry(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        id: &str,
    ) -> Result<(), EngineError> {
        redis::pipe()
            .atomic()
            .xack(self.keys.jobs(), GROUP, &[id])
            .ignore()
            .xdel(self.keys.jobs(), &[id])
            .ignore()
            .query_async::<()>(conn)
            .await?;
        Ok(())
    }
}

fn job_of(entry: &redis::streams::StreamId) -> Option<Job> {
    let raw: String = entry.get("job")?;
    serde_json::from_str(&raw).ok()
}
