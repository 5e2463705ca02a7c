//! The job queue on a Redis Stream with a consumer group, and the per-project mirror
//! locks with fencing tokens.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::streams::{StreamAutoClaimReply, StreamRangeReply, StreamReadReply};
use tokio_util::sync::CancellationToken;

use super::fair::{Fair, HELD_WAIT};
use super::{Conn, GROUP, READ_BLOCK, RedisEngine};
use crate::domain::ProjectId;
use crate::engine::{EngineError, JobQueue, Lease, Project, ProjectLock};
use crate::protocol::{Job, SyncRecord};

#[async_trait]
impl JobQueue for RedisEngine {
    async fn enqueue(&self, job: Job) -> Result<(), EngineError> {
        let json = serde_json::to_string(&job)?;
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .xadd(self.keys.jobs_of(&job.project_id), "*", &[("job", json)])
            .ignore();
        self.ring_in(&mut pipe, &job.project_id);
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn take(&self, shutdown: &CancellationToken) -> Result<Option<Lease>, EngineError> {
        if self.keys.cluster {
            return self.take_from_shards(shutdown).await;
        }
        let jobs = self.keys.jobs(0);
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            let mut conn = self.blocking_conn().await?;
            // first, jobs whose worker stopped heartbeating
            if let Some(lease) = self.reclaim_from(&mut conn, &jobs).await? {
                return self.started(lease, shutdown).await;
            }
            match self.take_fairly().await? {
                Fair::Taken(lease) => return self.started(lease, shutdown).await,
                Fair::Held => {
                    // every waiting job's owner runs its share: look again when one
                    // of theirs may have ended
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(HELD_WAIT) => continue,
                    }
                }
                Fair::Empty => {}
            }
            // nothing waits: block until a job comes. Awaited to the end, never
            // abandoned: Redis hands an entry to a blocked read even after its caller
            // stopped listening, and an entry handed to a reply nobody reads sits
            // pending until it is reclaimed (READ_BLOCK bounds how long shutdown waits
            // for this)
            let Some(entry) = self.read_one(&mut conn, &jobs, Some(READ_BLOCK)).await? else {
                continue;
            };
            drop(conn);
            if let Some(lease) = self.start_delivered(&jobs, vec![entry]).await? {
                return self.started(lease, shutdown).await;
            }
        }
    }

    async fn complete(&self, lease: &Lease) -> Result<(), EngineError> {
        let mut conn = self.conn().await?;
        self.drop_entry(
            &mut conn,
            &self.keys.jobs_of(&lease.job.project_id),
            &lease.token,
        )
        .await?;
        self.stop_running(&mut conn, lease).await
    }

    async fn depth(&self) -> Result<u64, EngineError> {
        // entries leave the stream when completed or released, so what is in it and
        // not pending with a consumer is waiting
        let mut conn = self.conn().await?;
        let mut waiting = 0u64;
        for shard in 0..self.keys.shards() {
            let jobs = self.keys.jobs(shard);
            let (length, pending): (u64, redis::Value) = redis::pipe()
                .xlen(&jobs)
                .cmd("XPENDING")
                .arg(&jobs)
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
            waiting += length.saturating_sub(pending);
        }
        Ok(waiting)
    }

    async fn release(&self, lease: Lease) -> Result<(), EngineError> {
        let json = serde_json::to_string(&lease.job)?;
        let jobs = self.keys.jobs_of(&lease.job.project_id);
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .xadd(&jobs, "*", &[("job", json)])
            .ignore()
            .xack(&jobs, GROUP, &[&lease.token])
            .ignore()
            .xdel(&jobs, &[&lease.token])
            .ignore();
        self.ring_in(&mut pipe, &lease.job.project_id);
        pipe.query_async::<()>(&mut conn).await?;
        self.stop_running(&mut conn, &lease).await
    }

    fn limit_running_per_owner(&self, cap: usize) {
        self.owner_cap.set(cap);
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
            .key(self.keys.jobs_of(&lease.job.project_id))
            .arg(lock.fence.to_string())
            .arg(self.lock_ttl_ms())
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(&lease.token)
            .invoke_async(&mut conn)
            .await?;
        if held == 1 {
            // its owner still runs it: renew its place among the running
            self.mark_running(&mut conn, lease, true).await?;
        }
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
        let mut candidates = Vec::new();
        for shard in 0..self.keys.shards() {
            candidates.extend(self.stranded_in(&mut conn, shard).await?);
        }
        Ok(candidates)
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
    /// The unfinished active syncs of a shard's projects that no worker holds and no
    /// job on the shard's stream names (a cursor over the shard's project set: the
    /// watchdog runs rarely).
    async fn stranded_in(
        &self,
        conn: &mut Conn,
        shard: u16,
    ) -> Result<Vec<(SyncRecord, String)>, EngineError> {
        let mut candidates = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            // a cluster keeps each shard's projects in a set; one Redis is scanned (its
            // projects may predate the sets)
            let (next, ids): (u64, Vec<String>) = if self.keys.cluster {
                redis::cmd("SSCAN")
                    .arg(self.keys.projects(shard))
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(conn)
                    .await?
            } else {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(self.keys.projects_pattern())
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(conn)
                    .await?;
                let prefix = self.keys.project("");
                let ids = keys
                    .iter()
                    .filter_map(|key| key.strip_prefix(&prefix))
                    .map(str::to_owned)
                    .collect();
                (next, ids)
            };
            for id in &ids {
                let (active, json): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(self.keys.project(id))
                    .arg("active_sync")
                    .arg("json")
                    .query_async(conn)
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
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if candidates.is_empty() {
            return Ok(candidates);
        }
        // and the jobs on the stream, pending or not
        let jobs = self.keys.jobs(shard);
        let mut queued = std::collections::HashSet::new();
        let mut start = "-".to_owned();
        loop {
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&jobs)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
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

    /// On a cluster, adds the ring of `project`'s shard bell to `pipe` (after its XADD).
    pub(super) fn ring_in(&self, pipe: &mut redis::Pipeline, project: &ProjectId) {
        if self.keys.cluster {
            pipe.cmd("SPUBLISH")
                .arg(self.keys.bell_of(project))
                .arg("1")
                .ignore();
        }
    }

    /// `take` on a cluster: no blocking command (each shard's stream is on its own
    /// slot, perhaps its own node). A round looks at what waits on every shard and
    /// starts the fair pick ([`RedisEngine::take_fairly`]); when nothing may start the
    /// worker sleeps until a shard's bell rings (a job was queued), or `READ_BLOCK`
    /// passes (`HELD_WAIT` while jobs wait on a busy owner's share). Jobs whose worker
    /// went silent are taken over by a round of `XAUTOCLAIM`, at most twice per lock
    /// lifetime per process.
    async fn take_from_shards(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Lease>, EngineError> {
        self.listen_for_bells().await?;
        let shards = self.keys.shards();
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            // armed before the round: a bell that rings during it is not lost
            let bell = self.bell.notified();
            tokio::pin!(bell);
            bell.as_mut().enable();
            let mut conn = self.conn().await?;
            let start = self.next_shard(shards);
            if self.reclaim_round_due() {
                for offset in 0..shards {
                    let jobs = self.keys.jobs((start + offset) % shards);
                    if let Some(lease) = self.reclaim_from(&mut conn, &jobs).await? {
                        return self.started(lease, shutdown).await;
                    }
                }
            }
            let wait = match self.take_fairly().await? {
                Fair::Taken(lease) => return self.started(lease, shutdown).await,
                Fair::Held => HELD_WAIT,
                Fair::Empty => READ_BLOCK,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = &mut bell => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Subscribes (once per process) to every shard's bell.
    async fn listen_for_bells(&self) -> Result<(), EngineError> {
        let Some(pubsub) = self.sharded() else {
            return Ok(());
        };
        self.bells
            .get_or_try_init(|| async {
                for shard in 0..self.keys.shards() {
                    pubsub.subscribe(&self.keys.bell(shard)).await?;
                }
                Ok::<(), EngineError>(())
            })
            .await?;
        Ok(())
    }

    /// Whether this process should look for abandoned jobs now (and notes that it did).
    fn reclaim_round_due(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let every = (self.lock_ttl_ms() / 2).max(50);
        let last = self
            .last_reclaim_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last_reclaim_ms
                .compare_exchange(
                    last,
                    now.max(1),
                    std::sync::atomic::Ordering::AcqRel,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
    }

    /// One job of `jobs` whose worker stopped heartbeating, taken over: follows
    /// `XAUTOCLAIM`'s cursor over the whole pending list (each call looks at a few
    /// entries only).
    async fn reclaim_from(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        jobs: &str,
    ) -> Result<Option<Lease>, EngineError> {
        let mut cursor = "0-0".to_owned();
        // bounded: each step moves the cursor on, or ends the list
        for _ in 0..10_000 {
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(jobs)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.lock_ttl_ms())
                .arg(&cursor)
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            if let Some(entry) = claimed.claimed.into_iter().next() {
                match job_of(&entry) {
                    Some(job) => {
                        let deliveries = self.deliveries(conn, jobs, &entry.id).await?;
                        tracing::warn!(sync_id = %job.sync_id, entry = %entry.id, deliveries, "took over a job whose worker stopped heartbeating");
                        // a dead worker may have left more: look again at the next take
                        self.last_reclaim_ms
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                        return Ok(Some(Lease {
                            job,
                            token: entry.id,
                            deliveries,
                        }));
                    }
                    None => self.drop_entry(conn, jobs, &entry.id).await?,
                }
            }
            if claimed.next_stream_id == "0-0" {
                return Ok(None);
            }
            cursor = claimed.next_stream_id;
        }
        Ok(None)
    }

    /// One new entry of `jobs` for this consumer, waiting up to `block` for one
    /// (`None`: not at all). A stream that lost its group (Redis restarted without
    /// persistence) gets it back and reads as empty.
    async fn read_one(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        jobs: &str,
        block: Option<Duration>,
    ) -> Result<Option<redis::streams::StreamId>, EngineError> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(1);
        if let Some(block) = block {
            read.arg("BLOCK").arg(block.as_millis() as u64);
        }
        read.arg("STREAMS").arg(jobs).arg(">");
        let reply: Result<Option<StreamReadReply>, redis::RedisError> =
            read.query_async(conn).await;
        match reply {
            Ok(reply) => Ok(reply
                .and_then(|reply| reply.keys.into_iter().next())
                .and_then(|key| key.ids.into_iter().next())),
            Err(err) if err.code() == Some("NOGROUP") => {
                self.ensure_group().await?;
                Ok(None)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// How many times the group has delivered entry `id` of `jobs` (XPENDING's counter).
    async fn deliveries(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        jobs: &str,
        id: &str,
    ) -> Result<u32, EngineError> {
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(jobs)
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

    pub(super) async fn drop_entry(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        jobs: &str,
        id: &str,
    ) -> Result<(), EngineError> {
        redis::pipe()
            .atomic()
            .xack(jobs, GROUP, &[id])
            .ignore()
            .xdel(jobs, &[id])
            .ignore()
            .query_async::<()>(conn)
            .await?;
        Ok(())
    }
}

pub(super) fn job_of(entry: &redis::streams::StreamId) -> Option<Job> {
    let raw: String = entry.get("job")?;
    serde_json::from_str(&raw).ok()
}
