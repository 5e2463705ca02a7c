//! One suite for the engine traits (`Store`, `JobQueue`, `EventLog`), run against the
//! embedded engine and the Redis engine alike: whatever a hub or worker relies on
//! behaves the same on one node and on many.

use std::future::Future;
use std::time::Duration;

use hivesync::domain::{ProjectId, SyncId, now_rfc3339};
use hivesync::engine::embedded::EmbeddedEngine;
use hivesync::engine::redis::{RedisEngine, RedisSettings};
use hivesync::engine::{Engine, EngineError, Live, Project, Store};
use hivesync::protocol::{EventBody, Job, SyncRecord, SyncStatus, Trigger};
use tokio_util::sync::CancellationToken;

use crate::redis_server::{RedisServer, redis_cluster_or_skip, redis_or_skip, unique_prefix};

/// Engine settings the checks rely on.
const RATE: (u32, Duration) = (3, Duration::from_secs(60));
const HISTORY: u64 = 5;

/// Makes a fresh, empty engine for one check.
trait Factory {
    fn make(&self) -> impl Future<Output = Engine>;
}

struct Embedded(tempfile::TempDir);

impl Factory for Embedded {
    async fn make(&self) -> Engine {
        let dir = self
            .0
            .path()
            .join(uuid::Uuid::new_v4().simple().to_string());
        let engine = EmbeddedEngine::open(&dir, RATE, HISTORY).expect("embedded engine opens");
        Engine {
            store: engine.clone(),
            queue: engine.clone(),
            events: engine,
            metrics: Default::default(),
        }
    }
}

struct OnRedis {
    server: RedisServer,
}

impl OnRedis {
    async fn connect(&self, prefix: &str, reclaim_after: Duration) -> std::sync::Arc<RedisEngine> {
        let engine = RedisEngine::connect(RedisSettings {
            cluster: self.server.cluster,
            url: self.server.url(),
            prefix: prefix.to_owned(),
            reclaim_after,
            history_len: HISTORY,
            sync_rate: RATE,
            rules: Default::default(),
            pool_size: 8,
        })
        .await
        .expect("redis engine connects");
        // the subscription announces itself once it is in place; taken before it is
        // started, so the announcement cannot come before anyone listens
        let mut live = hivesync::engine::EventLog::live(&*engine);
        engine.start_subscriber();
        let ready = tokio::time::timeout(Duration::from_secs(10), live.recv()).await;
        assert!(matches!(ready, Ok(Ok(Live::Reconnected))), "{ready:?}");
        engine
    }
}

fn engine_of(engine: std::sync::Arc<RedisEngine>) -> Engine {
    Engine {
        store: engine.clone(),
        queue: engine.clone(),
        events: engine,
        metrics: Default::default(),
    }
}

impl Factory for OnRedis {
    async fn make(&self) -> Engine {
        engine_of(
            self.connect(&unique_prefix(), Duration::from_secs(30))
                .await,
        )
    }
}

async fn all_checks(factory: &impl Factory) {
    projects_syncs_and_coalescing(factory.make().await).await;
    crate::conformance_sync::a_request_during_a_running_sync_queues_one_follow_up(
        factory.make().await,
    )
    .await;
    crate::conformance_sync::a_lost_job_is_found_and_requeued_by_the_watchdog(factory.make().await)
        .await;
    crate::conformance_fresh::a_sync_end_moves_status_schedule_and_pause_once(factory.make().await)
        .await;
    crate::conformance_fresh::due_projects_are_claimed_once_across_schedulers(factory.make().await)
        .await;
    rate_limit_is_a_burst_then_an_exact_wait(factory.make().await).await;
    events_are_numbered_per_user_kept_and_live(factory.make().await).await;
    jobs_locks_and_fences(factory.make().await).await;
    jobs_are_taken_fairly_by_owner(factory.make().await).await;
}

// several threads, so concurrent publishers really race
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_engine_conforms() {
    all_checks(&Embedded(tempfile::tempdir().expect("temp dir"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_engine_conforms() {
    let Some(server) = redis_or_skip() else {
        return;
    };
    all_checks(&OnRedis { server }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_engine_on_a_cluster_conforms() {
    let Some(server) = redis_cluster_or_skip() else {
        return;
    };
    all_checks(&OnRedis { server }).await;
}

pub(crate) fn project(owner: &str) -> Project {
    crate::helpers::stored_project(
        owner,
        &format!("{owner}'s project"),
        "https://user:secret@example.com/r.git",
    )
}

pub(crate) fn record(project: &Project) -> SyncRecord {
    SyncRecord {
        sync_id: SyncId::generate_for(&project.project_id),
        project_id: project.project_id.clone(),
        status: SyncStatus::Queued,
        progress: None,
        commit: None,
        previous_commit: None,
        attempt: 0,
        queued_at: now_rfc3339(),
        started_at: None,
        finished_at: None,
        duration_ms: None,
        error: None,
        trigger: Default::default(),
        changes: None,
    }
}

/// The job a request for `record` puts on the queue.
pub(crate) fn job_for(record: &SyncRecord, owner: &str) -> Job {
    Job {
        sync_id: record.sync_id.clone(),
        project_id: record.project_id.clone(),
        owner: owner.into(),
        trigger: record.trigger,
        queued_us: hivesync::protocol::now_epoch_us(),
    }
}

/// A sync request for `project`, as the hub makes it.
pub(crate) async fn begin(store: &dyn Store, project: &Project) -> (SyncRecord, bool) {
    let sync = record(project);
    store
        .begin_sync(sync.clone(), job_for(&sync, &project.owner))
        .await
        .expect("begin")
}

pub(crate) fn pid(project: &Project) -> ProjectId {
    project.project_id.clone()
}

fn sid(record: &SyncRecord) -> SyncId {
    record.sync_id.clone()
}

/// The sync id spelled by `label` (at most 16 bytes, hex-encoded into the UUID), so
/// jobs can be told apart by name and ids sort as their labels do.
fn named(label: &str) -> SyncId {
    assert!(label.len() <= 16, "a label fits in a uuid: {label}");
    let mut bytes = [0u8; 16];
    bytes[..label.len()].copy_from_slice(label.as_bytes());
    let uuid = bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<String>();
    let canonical = format!(
        "{}-{}-{}-{}-{}",
        &uuid[..8],
        &uuid[8..12],
        &uuid[12..16],
        &uuid[16..20],
        &uuid[20..]
    );
    SyncId::parse(&canonical).expect("a canonical uuid")
}

async fn projects_syncs_and_coalescing(engine: Engine) {
    let store = &engine.store;
    let alice = project("alice");
    let bob = project("bob");
    store.insert_project(&alice).await.expect("insert");
    store.insert_project(&bob).await.expect("insert");
    let found = store
        .project(&pid(&alice))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        found.repo_url, alice.repo_url,
        "the stored URL is the full one"
    );
    let of_alice = store.projects_of("alice").await.expect("list");
    assert_eq!(of_alice.len(), 1);
    assert_eq!(of_alice[0].project_id, alice.project_id);

    let first = record(&alice);
    let (stored, created) = store
        .begin_sync(first.clone(), job_for(&first, "alice"))
        .await
        .expect("begin");
    assert!(created);
    assert_eq!(stored.sync_id, first.sync_id);
    let (joined, created) = begin(store.as_ref(), &alice).await;
    assert!(!created, "a second request joins the active sync");
    assert_eq!(joined.sync_id, first.sync_id);
    let (_, created) = begin(store.as_ref(), &bob).await;
    assert!(created, "projects coalesce independently");

    let mut running = first.clone();
    running.status = SyncStatus::Running;
    store.put_sync(&running, None).await.expect("put");
    let read = store
        .sync(&sid(&first))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(read.status, SyncStatus::Running);
    // what a restart requeues: the project's active sync, while it is unfinished
    let holder = store
        .project(&pid(&alice))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(holder.active_sync.as_ref(), Some(&first.sync_id));
    assert_eq!(holder.owner, "alice");

    let mut done = running.clone();
    done.status = SyncStatus::Completed;
    done.commit = Some("a".repeat(40));
    done.finished_at = Some(now_rfc3339());
    store.put_sync(&done, None).await.expect("put");
    let after = store
        .project(&pid(&alice))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(after.last_status, Some(SyncStatus::Completed));
    assert_eq!(after.commit, done.commit);
    assert_eq!(after.last_synced_at, done.finished_at);
    assert_eq!(after.active_sync, None, "a finished sync is not requeued");

    let second = record(&alice);
    let (_, created) = store
        .begin_sync(second.clone(), job_for(&second, "alice"))
        .await
        .expect("begin");
    assert!(created, "after the end, a new sync starts");
    let newest = store.syncs_of(&pid(&alice), 1).await.expect("list");
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].sync_id, second.sync_id, "newest first");
    let all = store.syncs_of(&pid(&alice), 10).await.expect("list");
    let ids: Vec<_> = all.iter().map(|r| r.sync_id.clone()).collect();
    assert_eq!(ids, vec![second.sync_id.clone(), first.sync_id.clone()]);

    store.delete_project(&pid(&alice)).await.expect("delete");
    assert!(store.project(&pid(&alice)).await.expect("read").is_none());
    assert!(store.sync(&sid(&first)).await.expect("read").is_none());
    assert!(store.projects_of("alice").await.expect("list").is_empty());
    assert_eq!(store.projects_of("bob").await.expect("list").len(), 1);
    // a worker still running the deleted project's sync writes into nothing
    store.put_sync(&done, None).await.expect("put");
    assert!(store.sync(&sid(&first)).await.expect("read").is_none());
    assert!(store.project(&pid(&alice)).await.expect("read").is_none());
    store.ping().await.expect("ping");
}

async fn rate_limit_is_a_burst_then_an_exact_wait(engine: Engine) {
    let burst_started = std::time::Instant::now();
    for _ in 0..RATE.0 {
        assert_eq!(
            engine
                .store
                .admit_sync_request("carol")
                .await
                .expect("admit"),
            Ok(())
        );
    }
    let wait = engine
        .store
        .admit_sync_request("carol")
        .await
        .expect("admit")
        .expect_err("over the rate");
    // what the requests themselves took (a slow disk under the store's commits) is
    // all the wait may be short of one interval, give or take the store's clock
    let spent = burst_started.elapsed() + Duration::from_millis(50);
    assert!(
        wait >= Duration::from_secs(20).saturating_sub(spent) && wait <= Duration::from_secs(20),
        "one emission interval (20 s) from the burst's start ({spent:?} ago), got {wait:?}"
    );
    assert_eq!(
        engine
            .store
            .admit_sync_request("dave")
            .await
            .expect("admit"),
        Ok(()),
        "users are independent"
    );
}

fn stage(project_id: &str, n: u64) -> EventBody {
    EventBody::SyncStage {
        sync_id: format!("sync-{n}"),
        project_id: project_id.into(),
        stage: SyncStatus::Running,
        progress: None,
        at: now_rfc3339(),
        retry: None,
    }
}

async fn events_are_numbered_per_user_kept_and_live(engine: Engine) {
    let events = &engine.events;
    // a networked engine's subscription is in place when the factory hands it over
    let mut live = events.live();
    // what a hub does for the users it holds sockets for (on a cluster, this
    // subscribes their groups' channels)
    for user in ["erin", "frank", "gina"] {
        events.watch(user).await.expect("watch");
    }
    assert_eq!(events.latest("erin").await.expect("latest"), 0);
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(
            events
                .publish("erin", stage("p", n))
                .await
                .expect("publish")
                .id,
        );
    }
    let other = events
        .publish("frank", stage("q", 1))
        .await
        .expect("publish");
    assert_eq!(ids, vec![1, 2, 3], "per-user ids count up from 1");
    assert_eq!(other.id, 1, "each user has their own sequence");
    assert_eq!(events.latest("erin").await.expect("latest"), 3);

    let mut seen = Vec::new();
    while seen.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(5), live.recv()).await {
            Ok(Ok(Live::Event(event))) => seen.push((event.user.clone(), event.id)),
            Ok(Ok(Live::Reconnected)) => {}
            other => panic!("live feed ended early: {other:?}"),
        }
    }
    // in order per user (users on different cluster nodes may interleave)
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("erin".to_owned(), 1),
            ("erin".to_owned(), 2),
            ("erin".to_owned(), 3),
            ("frank".to_owned(), 1)
        ]
    );

    // concurrent publishers of one user (two workers on two of their projects) reach
    // the live feed in id order
    let publishers: Vec<_> = (0..200)
        .map(|n| {
            let events = std::sync::Arc::clone(events);
            // progress ticks: the cheapest writes, so publishers overlap the most
            let mut body = stage("p", n);
            if let EventBody::SyncStage { progress, .. } = &mut body {
                *progress = Some(hivesync::protocol::Progress::default());
            }
            tokio::spawn(async move { events.publish("gina", body).await })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("task").expect("publish");
    }
    let mut order = Vec::new();
    while order.len() < 200 {
        match tokio::time::timeout(Duration::from_secs(5), live.recv()).await {
            Ok(Ok(Live::Event(event))) if event.user == "gina" => order.push(event.id),
            Ok(Ok(_)) => {}
            other => panic!("live feed ended early: {other:?}"),
        }
    }
    assert_eq!(
        order,
        (1..=200).collect::<Vec<_>>(),
        "live order is id order"
    );

    let history = events.after("erin", 1, 100).await.expect("after");
    assert!(!history.gap);
    let got: Vec<_> = history.events.iter().map(|e| e.id).collect();
    assert_eq!(got, vec![2, 3]);
    assert_eq!(
        history.events[0].body,
        stage("p", 2).with_at_of(&history.events[0].body)
    );
    assert!(
        events
            .after("erin", 3, 100)
            .await
            .expect("after")
            .events
            .is_empty()
    );
    let limited = events.after("erin", 0, 2).await.expect("after");
    assert_eq!(
        limited.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // past the kept history: a resume from before it is a gap
    for n in 4..=12 {
        events
            .publish("erin", stage("p", n))
            .await
            .expect("publish");
    }
    let old = events.after("erin", 2, 100).await.expect("after");
    assert!(old.gap, "ids 3..7 are no longer kept");
    let future = events.after("erin", 1_000, 100).await.expect("after");
    assert!(
        future.gap,
        "a resume point past the newest id: the history was lost"
    );
    assert!(future.events.is_empty());
    let recent = events
        .after("erin", 12 - HISTORY, 100)
        .await
        .expect("after");
    assert!(!recent.gap);
    assert_eq!(
        recent.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        (12 - HISTORY + 1..=12).collect::<Vec<_>>()
    );
}

/// Stage bodies carry a timestamp; compare the rest.
trait WithAt {
    fn with_at_of(self, other: &EventBody) -> EventBody;
}

impl WithAt for EventBody {
    fn with_at_of(mut self, other: &EventBody) -> EventBody {
        if let (EventBody::SyncStage { at, .. }, EventBody::SyncStage { at: theirs, .. }) =
            (&mut self, other)
        {
            at.clone_from(theirs);
        }
        self
    }
}

fn job(project: &ProjectId, n: u32) -> Job {
    Job {
        sync_id: named(&format!("job-{n}")),
        project_id: project.clone(),
        owner: "alice".into(),
        trigger: Trigger::Api,
        queued_us: hivesync::protocol::now_epoch_us(),
    }
}

/// A job of `owner` for a project of its own (so, on a cluster, on its own shard).
fn owned_job(owner: &str, n: u32, trigger: Trigger) -> Job {
    Job {
        sync_id: named(&format!("{owner}-{n}")),
        project_id: project(owner).project_id,
        owner: owner.into(),
        trigger,
        queued_us: hivesync::protocol::now_epoch_us(),
    }
}

/// What a free worker takes next, within a second (`None`: nothing may start).
async fn next(engine: &Engine) -> Option<hivesync::engine::Lease> {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
    });
    let lease = engine.queue.take(&shutdown).await.expect("take");
    stopper.abort();
    lease
}

/// Fair shares: a job of an owner running nothing goes ahead of a backlog queued
/// before it; an owner at the cap waits even with workers free; within an owner, a
/// person's request goes ahead of the schedule. Every job is still taken exactly once.
async fn jobs_are_taken_fairly_by_owner(engine: Engine) {
    let queue = &engine.queue;
    queue.limit_running_per_owner(2);
    for n in 0..8 {
        queue
            .enqueue(owned_job("alice", n, Trigger::Api))
            .await
            .expect("enqueue");
    }
    queue
        .enqueue(owned_job("bob", 0, Trigger::Api))
        .await
        .expect("enqueue");
    let first = next(&engine).await.expect("a job");
    assert_eq!(
        first.job.sync_id,
        named("alice-0"),
        "nobody runs anything: oldest first"
    );
    let second = next(&engine).await.expect("a job");
    assert_eq!(
        second.job.sync_id,
        named("bob-0"),
        "bob runs nothing, alice runs one: bob's job goes ahead of her backlog"
    );
    let third = next(&engine).await.expect("a job");
    assert_eq!(
        third.job.sync_id,
        named("alice-1"),
        "alice's turn again, in her order"
    );
    let held = next(&engine).await;
    assert!(
        held.is_none(),
        "alice runs two, her cap: her backlog waits although a worker is free; took {:?}",
        held.map(|lease| lease.job)
    );
    // a scheduled job and a press of carol's: the press first
    queue
        .enqueue(owned_job("carol", 0, Trigger::Schedule))
        .await
        .expect("enqueue");
    queue
        .enqueue(owned_job("carol", 1, Trigger::Webhook))
        .await
        .expect("enqueue");
    let carol = next(&engine).await.expect("a job");
    assert_eq!(
        carol.job.sync_id,
        named("carol-1"),
        "a push goes ahead of its owner's schedule"
    );
    queue.complete(&carol).await.expect("complete");
    let carol = next(&engine).await.expect("a job");
    assert_eq!(carol.job.sync_id, named("carol-0"));
    queue.complete(&carol).await.expect("complete");
    // alice's running syncs end: her backlog moves again, one per place freed
    queue.complete(&first).await.expect("complete");
    let mut taken = vec![first.job.sync_id.clone(), third.job.sync_id.clone()];
    assert_ne!(first.job.sync_id, third.job.sync_id);
    queue.complete(&third).await.expect("complete");
    queue.complete(&second).await.expect("complete");
    while let Some(lease) = next(&engine).await {
        taken.push(lease.job.sync_id.clone());
        queue.complete(&lease).await.expect("complete");
    }
    taken.sort();
    let expected: Vec<SyncId> = (0..8).map(|n| named(&format!("alice-{n}"))).collect();
    assert_eq!(taken, expected, "every job of alice's taken once");
    assert_eq!(queue.depth().await.expect("depth"), 0);
}

async fn jobs_locks_and_fences(engine: Engine) {
    let queue = &engine.queue;
    let shutdown = CancellationToken::new();
    let alice = project("alice");
    engine.store.insert_project(&alice).await.expect("insert");
    let sync = record(&alice);
    engine
        .store
        .begin_sync(sync.clone(), job_for(&sync, "alice"))
        .await
        .expect("begin");
    let begun = queue.take(&shutdown).await.expect("take").expect("a job");
    assert_eq!(
        begun.job.sync_id, sync.sync_id,
        "begin queued the sync's job"
    );
    queue.complete(&begun).await.expect("complete");

    queue
        .enqueue(job(&alice.project_id, 1))
        .await
        .expect("enqueue");
    queue
        .enqueue(job(&alice.project_id, 2))
        .await
        .expect("enqueue");
    assert_eq!(queue.depth().await.expect("depth"), 2, "two jobs wait");
    let first = queue.take(&shutdown).await.expect("take").expect("a job");
    assert_eq!(first.job.sync_id, named("job-1"), "first in, first out");
    assert_eq!(
        queue.depth().await.expect("depth"),
        1,
        "a job taken is no longer waiting"
    );
    let second = queue.take(&shutdown).await.expect("take").expect("a job");
    assert_eq!(second.job.sync_id, named("job-2"));
    assert_eq!(queue.depth().await.expect("depth"), 0);

    let lock = queue
        .lock_project(&first)
        .await
        .expect("lock")
        .expect("free");
    assert!(
        queue.lock_project(&second).await.expect("lock").is_none(),
        "one mirror, one worker"
    );
    assert!(queue.heartbeat(&first, &lock).await.expect("heartbeat"));
    let mut running = sync.clone();
    running.status = SyncStatus::Running;
    engine
        .store
        .put_sync(&running, Some(&lock))
        .await
        .expect("fenced write while held");

    queue.unlock_project(&lock).await.expect("unlock");
    assert!(
        !queue.heartbeat(&first, &lock).await.expect("heartbeat"),
        "lock is gone"
    );
    let newer = queue
        .lock_project(&second)
        .await
        .expect("lock")
        .expect("free again");
    assert!(newer.fence > lock.fence, "fences only grow");
    let stale = engine.store.put_sync(&running, Some(&lock)).await;
    assert!(
        matches!(stale, Err(EngineError::Fenced)),
        "a stale holder cannot write: {stale:?}"
    );
    engine
        .store
        .put_sync(&running, Some(&newer))
        .await
        .expect("current holder writes");

    queue.complete(&first).await.expect("complete");
    queue.release(second).await.expect("release");
    let again = queue
        .take(&shutdown)
        .await
        .expect("take")
        .expect("released job");
    assert_eq!(
        again.job.sync_id,
        named("job-2"),
        "a released job is taken again"
    );
    queue.complete(&again).await.expect("complete");
    queue.unlock_project(&newer).await.expect("unlock");

    let stopping = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stopping.cancel();
    });
    let idle = tokio::time::timeout(Duration::from_secs(5), queue.take(&shutdown))
        .await
        .expect("take notices shutdown");
    assert!(idle.expect("take").is_none());
}

/// Redis only: a job whose worker stops heartbeating is taken over by another worker
/// (another process, here another engine with its own consumer name), and the old
/// worker's lock is then worthless.
#[tokio::test]
async fn a_silent_workers_job_is_taken_over_and_its_lock_fenced() {
    if let Some(server) = redis_or_skip() {
        silent_worker_is_replaced(server).await;
    }
}

#[tokio::test]
async fn on_a_cluster_a_silent_workers_job_is_taken_over_and_its_lock_fenced() {
    if let Some(server) = redis_cluster_or_skip() {
        silent_worker_is_replaced(server).await;
    }
}

async fn silent_worker_is_replaced(server: RedisServer) {
    let redis = OnRedis { server };
    let prefix = unique_prefix();
    // a stall of Redis (its append-only file synced on a busy disk) shorter than this
    // must not pass for a silent worker
    let reclaim = Duration::from_millis(2500);
    let first_worker = engine_of(redis.connect(&prefix, reclaim).await);
    let second_worker = engine_of(redis.connect(&prefix, reclaim).await);
    let shutdown = CancellationToken::new();

    first_worker
        .queue
        .enqueue(job(&ProjectId::generate(), 1))
        .await
        .expect("enqueue");
    let lease = first_worker
        .queue
        .take(&shutdown)
        .await
        .expect("take")
        .expect("job");
    let lock = first_worker
        .queue
        .lock_project(&lease)
        .await
        .expect("lock")
        .expect("free");
    // heartbeats keep the job: the other worker finds nothing for a while
    let kept = tokio::time::timeout(Duration::from_millis(5000), async {
        loop {
            assert!(
                first_worker
                    .queue
                    .heartbeat(&lease, &lock)
                    .await
                    .expect("heartbeat")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let stolen = tokio::time::timeout(
        Duration::from_millis(5000),
        second_worker.queue.take(&shutdown),
    );
    let (_, stolen) = tokio::join!(kept, stolen);
    assert!(stolen.is_err(), "a heartbeating worker keeps its job");

    // then the first worker goes silent
    let taken = tokio::time::timeout(Duration::from_secs(15), second_worker.queue.take(&shutdown))
        .await
        .expect("taken over in time")
        .expect("take")
        .expect("the job");
    assert_eq!(taken.job.sync_id, named("job-1"));
    let new_lock = second_worker
        .queue
        .lock_project(&taken)
        .await
        .expect("lock")
        .expect("the silent worker's lock expired");
    assert!(new_lock.fence > lock.fence);
    assert!(
        !first_worker
            .queue
            .heartbeat(&lease, &lock)
            .await
            .expect("heartbeat"),
        "the old worker learns it lost the job"
    );
    second_worker
        .queue
        .complete(&taken)
        .await
        .expect("complete");
    let nothing = tokio::time::timeout(
        Duration::from_millis(1500),
        first_worker.queue.take(&shutdown),
    )
    .await;
    assert!(nothing.is_err(), "a completed job is gone for everyone");
}
