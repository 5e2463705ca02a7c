//! The job queue on a Redis Stream with a consumer group, and the per-project mirror
//! locks with fencing tokens.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::streams::{
    StreamAutoClaimReply, StreamInfoGroupsReply, StreamRangeReply, StreamReadReply,
};
use tokio_util::sync::CancellationToken;

use super::{Conn, GROUP, READ_BLOCK, RedisEngine};
use crate::engine::{EngineError, JobQueue, Lease, Project, ProjectLock, fair};
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
    fn ring_in(&self, pipe: &mut redis::Pipeline, project: &str) {
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

    /// A lease just taken, counted as running for its owner; straight back on the
    /// queue when the worker is stopping.
    async fn started(
        &self,
        lease: Lease,
        shutdown: &CancellationToken,
    ) -> Result<Option<Lease>, EngineError> {
        if shutdown.is_cancelled() {
            self.release(lease).await?;
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        self.mark_running(&mut conn, &lease, false).await?;
        Ok(Some(lease))
    }

    /// The fair pick over every shard ([`fair::choose`]): looks at up to [`WINDOW`]
    /// jobs not yet delivered on each shard, picks one, and reads its shard's stream up
    /// to it. What the read delivered ahead of the pick goes back to the end of its
    /// stream (in order, one atomic step per shard), so it waits behind the owners who
    /// had not had their turn.
    async fn take_fairly(&self) -> Result<Fair, EngineError> {
        let mut conn = self.conn().await?;
        let mut seen: Vec<(StreamOrder, u16, usize, Job)> = Vec::new();
        for shard in 0..self.keys.shards() {
            let jobs = self.keys.jobs(shard);
            for (position, (id, job)) in self
                .undelivered(&mut conn, &jobs)
                .await?
                .into_iter()
                .enumerate()
            {
                seen.push((StreamOrder::of(&id), shard, position, job));
            }
        }
        if seen.is_empty() {
            return Ok(Fair::Empty);
        }
        // oldest first across shards and streams: by when each was requested (kept
        // when it was put back), then by entry id
        seen.sort_by_key(|(order, _, _, job)| (job.queued_us, *order));
        let shares = self.shares(&mut conn).await?;
        let waiting: Vec<&Job> = seen.iter().map(|(.., job)| job).collect();
        let Some(pick) = fair::choose(&waiting, &shares, self.owner_cap.get()) else {
            return Ok(Fair::Held);
        };
        let (_, shard, position, _) = &seen[pick];
        let jobs = self.keys.jobs(*shard);
        let mut delivered = Vec::new();
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(position + 1)
            .arg("STREAMS")
            .arg(&jobs)
            .arg(">");
        let reply: Result<Option<StreamReadReply>, redis::RedisError> =
            read.query_async(&mut conn).await;
        match reply {
            Ok(reply) => delivered.extend(
                reply
                    .into_iter()
                    .flat_map(|reply| reply.keys)
                    .flat_map(|key| key.ids),
            ),
            Err(err) if err.code() == Some("NOGROUP") => {
                self.ensure_group().await?;
                return Ok(Fair::Empty);
            }
            Err(err) => return Err(err.into()),
        }
        // other workers read meanwhile: what this read got is chosen among again
        Ok(match self.start_delivered(&jobs, delivered).await? {
            Some(lease) => Fair::Taken(lease),
            None => Fair::Held,
        })
    }

    /// Of the entries just delivered to this consumer from `jobs`, the fair one as a
    /// lease; the others go back to the end of the stream, in order.
    async fn start_delivered(
        &self,
        jobs: &str,
        delivered: Vec<redis::streams::StreamId>,
    ) -> Result<Option<Lease>, EngineError> {
        let mut conn = self.conn().await?;
        let mut readable = Vec::new();
        for entry in delivered {
            match job_of(&entry) {
                Some(job) => readable.push((entry.id, job)),
                None => {
                    tracing::warn!(entry = %entry.id, "dropping an unreadable job");
                    self.drop_entry(&mut conn, jobs, &entry.id).await?;
                }
            }
        }
        if readable.is_empty() {
            return Ok(None);
        }
        // in line by when each was requested, as the pick saw them
        readable.sort_by_key(|(_, job)| job.queued_us);
        let shares = self.shares(&mut conn).await?;
        let waiting: Vec<&Job> = readable.iter().map(|(_, job)| job).collect();
        let pick = fair::choose(&waiting, &shares, self.owner_cap.get());
        let mut lease = None;
        let mut back = redis::pipe();
        back.atomic();
        let mut ring = None;
        for (index, (id, job)) in readable.into_iter().enumerate() {
            if Some(index) == pick {
                lease = Some(Lease {
                    job,
                    token: id,
                    deliveries: 1,
                });
                continue;
            }
            back.xadd(jobs, "*", &[("job", serde_json::to_string(&job)?)])
                .ignore()
                .xack(jobs, GROUP, &[&id])
                .ignore()
                .xdel(jobs, &[&id])
                .ignore();
            ring = Some(job.project_id);
        }
        if let Some(project) = ring {
            self.ring_in(&mut back, &project);
            back.query_async::<()>(&mut conn).await?;
        }
        Ok(lease)
    }

    /// Up to [`WINDOW`] entries of `jobs` that no worker was handed yet, oldest first.
    async fn undelivered(
        &self,
        conn: &mut Conn,
        jobs: &str,
    ) -> Result<Vec<(String, Job)>, EngineError> {
        let groups: Result<StreamInfoGroupsReply, redis::RedisError> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(jobs)
            .query_async(conn)
            .await;
        let groups = match groups {
            Ok(groups) => groups,
            // no stream (Redis restarted without persistence): made again, empty
            Err(err) if err.code() == Some("ERR") => {
                self.ensure_group().await?;
                return Ok(Vec::new());
            }
            Err(err) => return Err(err.into()),
        };
        let Some(group) = groups.groups.into_iter().find(|group| group.name == GROUP) else {
            self.ensure_group().await?;
            return Ok(Vec::new());
        };
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(jobs)
            .arg(format!("({}", group.last_delivered_id))
            .arg("+")
            .arg("COUNT")
            .arg(WINDOW)
            .query_async(conn)
            .await?;
        Ok(page
            .ids
            .into_iter()
            .filter_map(|entry| job_of(&entry).map(|job| (entry.id, job)))
            .collect())
    }

    /// How many jobs each owner runs, across every worker process (entries whose
    /// heartbeat lapsed are dropped first: their worker died), and when each owner last
    /// had one started (owners not served for [`SERVED_KEPT_MS`] are forgotten).
    async fn shares(&self, conn: &mut Conn) -> Result<fair::Shares, EngineError> {
        let now = crate::domain::now_epoch_ms();
        let (members, served): (Vec<String>, Vec<(String, u64)>) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.running())
            .arg("-inf")
            .arg(format!("({now}"))
            .ignore()
            .cmd("ZRANGE")
            .arg(self.keys.running())
            .arg(0)
            .arg(-1)
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.served())
            .arg("-inf")
            .arg(format!("({}", now.saturating_sub(SERVED_KEPT_MS)))
            .ignore()
            .cmd("ZRANGE")
            .arg(self.keys.served())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        let mut shares = fair::Shares {
            served: served.into_iter().collect(),
            ..Default::default()
        };
        for member in members {
            if let Some(owner) = owner_of_running(&member) {
                *shares.running.entry(owner.to_owned()).or_default() += 1;
            }
        }
        Ok(shares)
    }

    /// Counts `lease` as running until one lock lifetime from now (`renew`: only if it
    /// still is, so a heartbeat racing the job's end does not bring it back).
    async fn mark_running(
        &self,
        conn: &mut Conn,
        lease: &Lease,
        renew: bool,
    ) -> Result<(), EngineError> {
        let now = crate::domain::now_epoch_ms();
        let mut add = redis::cmd("ZADD");
        add.arg(self.keys.running());
        if renew {
            add.arg("XX");
        }
        add.arg(now + self.lock_ttl_ms())
            .arg(running_member(lease))
            .query_async::<()>(conn)
            .await?;
        if !renew {
            redis::cmd("ZADD")
                .arg(self.keys.served())
                .arg(now)
                .arg(&lease.job.owner)
                .query_async::<()>(conn)
                .await?;
        }
        Ok(())
    }

    async fn stop_running(&self, conn: &mut Conn, lease: &Lease) -> Result<(), EngineError> {
        redis::cmd("ZREM")
            .arg(self.keys.running())
            .arg(running_member(lease))
            .query_async::<()>(conn)
            .await?;
        Ok(())
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

    async fn drop_entry(
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

/// What a fair pick found.
enum Fair {
    Taken(Lease),
    /// jobs wait, but every one's owner runs its share
    Held,
    Empty,
}

/// How many waiting jobs per shard a fair pick looks at: an owner whose first job sits
/// deeper than this behind other owners' jobs waits until the window reaches it.
const WINDOW: usize = 256;
/// How long a worker waits before looking again while every waiting job's owner runs
/// its share (one Redis has no signal for a job's end).
const HELD_WAIT: Duration = Duration::from_millis(250);

/// How long an owner's last start is remembered for taking turns: past it, an owner
/// counts as never served (first in line again, which a long-idle owner is anyway).
const SERVED_KEPT_MS: u64 = 3_600_000;

/// A stream entry id as a sortable pair (milliseconds, sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct StreamOrder(u64, u64);

impl StreamOrder {
    fn of(id: &str) -> Self {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        Self(ms.parse().unwrap_or(u64::MAX), seq.parse().unwrap_or(0))
    }
}

/// A running job's member in the running set: the owner's length, the owner, the
/// project and the lease token (so owners holding `:` never collide, nor two entries
/// with one id on two shards' streams).
fn running_member(lease: &Lease) -> String {
    format!(
        "{}:{}{} {}",
        lease.job.owner.len(),
        lease.job.owner,
        lease.job.project_id,
        lease.token
    )
}

fn owner_of_running(member: &str) -> Option<&str> {
    let (len, rest) = member.split_once(':')?;
    rest.get(..len.parse::<usize>().ok()?)
}

fn job_of(entry: &redis::streams::StreamId) -> Option<Job> {
    let raw: String = entry.get("job")?;
    serde_json::from_str(&raw).ok()
}
