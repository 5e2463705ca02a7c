//! The fair pick on Redis: which waiting job a worker starts ([`fair::choose`] over
//! what waits on every shard), and the running and served sets it is chosen by.

use std::time::Duration;

use redis::streams::{StreamInfoGroupsReply, StreamRangeReply, StreamReadReply};
use tokio_util::sync::CancellationToken;

use super::queue::job_of;
use super::{Conn, GROUP, RedisEngine};
use crate::engine::{EngineError, JobQueue, Lease, fair};
use crate::protocol::Job;

impl RedisEngine {
    /// A lease just taken, counted as running for its owner; straight back on the
    /// queue when the worker is stopping.
    pub(super) async fn started(
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
    pub(super) async fn take_fairly(&self) -> Result<Fair, EngineError> {
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
    pub(super) async fn start_delivered(
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
    pub(super) async fn mark_running(
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

    pub(super) async fn stop_running(
        &self,
        conn: &mut Conn,
        lease: &Lease,
    ) -> Result<(), EngineError> {
        redis::cmd("ZREM")
            .arg(self.keys.running())
            .arg(running_member(lease))
            .query_async::<()>(conn)
            .await?;
        Ok(())
    }
}

/// What a fair pick found.
pub(super) enum Fair {
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
pub(super) const HELD_WAIT: Duration = Duration::from_millis(250);

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
