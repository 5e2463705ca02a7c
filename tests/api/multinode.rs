//! Several processes on one Redis: hubs in this process (each its own `Application`, as
//! separate nodes would be), `hivesync worker` as real child processes, and a private
//! `redis-server` that the tests kill and restart.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{GitRepo, TestApp, WAIT, assert_exact_tree, is_notification, wait_until};
use hivesync::auth::ClientKind;

use crate::redis_server::{
    RedisServer, redis_cluster_or_skip, redis_or_skip, spawn_worker, unique_prefix,
};

const RECLAIM_MS: u64 = 1000;

async fn hub(redis: &RedisServer, prefix: &str, data: &std::path::Path, workers: usize) -> TestApp {
    let (url, cluster) = (redis.url(), redis.cluster);
    let prefix = prefix.to_owned();
    TestApp::spawn_on(data, move |config| {
        config.redis_url = Some(url);
        config.redis_cluster = cluster;
        config.redis_prefix = prefix;
        config.serve_workers = Some(workers);
        config.reclaim_after = Duration::from_millis(RECLAIM_MS);
    })
    .await
}

fn ids_of(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|f| f["id"].as_u64()).collect()
}

fn assert_contiguous(ids: &[u64], after: u64) {
    let expected: Vec<u64> = (after + 1..=after + ids.len() as u64).collect();
    assert_eq!(
        ids, expected,
        "event ids must continue {after} with no gap or duplicate"
    );
}

#[tokio::test]
async fn a_socket_on_hub_b_follows_a_sync_requested_on_hub_a_and_run_by_a_worker_process() {
    if let Some(redis) = redis_or_skip() {
        a_socket_on_hub_b_follows_a_sync_requested_on_hub_a_and_run_by_a_worker_process_on(redis)
            .await;
    }
}

#[tokio::test]
async fn on_a_cluster_a_socket_on_hub_b_follows_a_sync_requested_on_hub_a_and_run_by_a_worker_process()
 {
    if let Some(redis) = redis_cluster_or_skip() {
        a_socket_on_hub_b_follows_a_sync_requested_on_hub_a_and_run_by_a_worker_process_on(redis)
            .await;
    }
}

async fn a_socket_on_hub_b_follows_a_sync_requested_on_hub_a_and_run_by_a_worker_process_on(
    redis: RedisServer,
) {
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let hub_a = hub(&redis, &prefix, data.path(), 0).await;
    let hub_b = hub(&redis, &prefix, data.path(), 0).await;
    let mut worker = spawn_worker(
        &redis,
        &prefix,
        data.path(),
        RECLAIM_MS,
        &logs.path().join("worker.log"),
    );

    let repo = GitRepo::new();
    repo.write("README.md", "hello from a worker process\n");
    let commit = repo.commit("first");
    let project = hub_a.register(&repo).await;
    let (status, listed) = hub_b.get_json("/api/v1/projects").await;
    assert_eq!(status, 200);
    assert_eq!(
        listed[0]["project_id"],
        project.as_str(),
        "hub B sees what hub A registered"
    );

    let mut on_b = hub_b.ws(&hub_b.token, "").await;
    let hello = on_b.next_json().await;
    let start = hello["last_event_id"].as_u64().expect("hello id");
    let accepted = hub_a.request_sync(&project).await;
    let sync_id = accepted["sync_id"].as_str().expect("sync_id").to_owned();
    let frames = on_b
        .until(|f| is_notification(f, "repo_sync_success") && f["sync_id"] == sync_id.as_str())
        .await;
    let stages: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "sync.stage")
        .filter_map(|f| f["stage"].as_str())
        .collect();
    for stage in [
        "running",
        "updating_files",
        "cleaning",
        "finalizing",
        "completed",
    ] {
        assert!(stages.contains(&stage), "hub B relayed {stage}: {stages:?}");
    }
    assert_contiguous(&ids_of(&frames), start);

    let record_a = hub_a.wait_for_sync(&sync_id).await;
    let (_, record_b) = hub_b
        .get_json(&format!("/api/v1/repo/sync/{sync_id}"))
        .await;
    assert_eq!(record_a, record_b, "two hubs polling one sync agree");
    assert_eq!(record_a["status"], "completed");
    assert_eq!(record_a["commit"], commit.as_str());
    assert_exact_tree(&hub_b, &project, &repo, &commit);

    let (_, notifications_a) = hub_a.get_json("/api/v1/notifications?limit=100").await;
    let (_, notifications_b) = hub_b.get_json("/api/v1/notifications?limit=100").await;
    assert_eq!(
        notifications_a, notifications_b,
        "one history, whichever node is asked"
    );

    let _ = worker.kill();
    let _ = worker.wait();
}

#[tokio::test]
async fn a_worker_killed_mid_clone_leaves_its_job_to_another_worker() {
    if let Some(redis) = redis_or_skip() {
        a_worker_killed_mid_clone_leaves_its_job_to_another_worker_on(redis).await;
    }
}

#[tokio::test]
async fn on_a_cluster_a_worker_killed_mid_clone_leaves_its_job_to_another_worker() {
    if let Some(redis) = redis_cluster_or_skip() {
        a_worker_killed_mid_clone_leaves_its_job_to_another_worker_on(redis).await;
    }
}

async fn a_worker_killed_mid_clone_leaves_its_job_to_another_worker_on(redis: RedisServer) {
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let hub = hub(&redis, &prefix, data.path(), 0).await;
    let repo = GitRepo::new();
    // ~60 MB that does not compress: the clone is far from done when the worker dies
    let commit = repo.commit_random_files(600, 100_000);
    let project = hub.register(&repo).await;
    let mut socket = hub.ws(&hub.token, "").await;
    socket.next_json().await;

    let mut doomed = spawn_worker(
        &redis,
        &prefix,
        data.path(),
        RECLAIM_MS,
        &logs.path().join("doomed.log"),
    );
    let accepted = hub.request_sync(&project).await;
    let sync_id = accepted["sync_id"].as_str().expect("sync_id").to_owned();
    socket
        .until(|f| f["type"] == "sync.stage" && f["stage"] == "running")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    doomed.kill().expect("kill -9 the worker");
    doomed.wait().expect("reaped");
    let (_, record) = hub.get_json(&format!("/api/v1/repo/sync/{sync_id}")).await;
    assert!(
        !matches!(record["status"].as_str(), Some("completed" | "failed")),
        "the worker died mid-sync: {record}"
    );

    let successor_log = logs.path().join("successor.log");
    let mut successor = spawn_worker(&redis, &prefix, data.path(), RECLAIM_MS, &successor_log);
    let rest = socket
        .until(|f| {
            f["sync_id"] == sync_id.as_str()
                && (is_notification(f, "repo_sync_success")
                    || is_notification(f, "repo_sync_failed"))
        })
        .await;
    let last = rest.last().expect("a notification");
    assert!(is_notification(last, "repo_sync_success"), "{last}");
    let record = hub.wait_for_sync(&sync_id).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["commit"], commit.as_str());
    assert_exact_tree(&hub, &project, &repo, &commit);
    // (the current tree's hidden spare aside)
    let snapshots = std::fs::read_dir(data.path().join("trees").join(&project))
        .expect("trees dir")
        .filter_map(Result::ok)
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with(".spare-"))
        .count();
    assert_eq!(
        snapshots, 1,
        "the killed worker's half-written snapshot is gone"
    );
    let log = std::fs::read_to_string(&successor_log).expect("log");
    assert!(
        log.contains("took over a job"),
        "the successor reclaimed it:\n{log}"
    );

    let _ = successor.kill();
    let _ = successor.wait();
}

#[tokio::test]
async fn after_a_redis_restart_hubs_resubscribe_and_clients_lose_and_repeat_nothing() {
    if let Some(redis) = redis_or_skip() {
        after_a_redis_restart_hubs_resubscribe_and_clients_lose_and_repeat_nothing_on(redis).await;
    }
}

#[tokio::test]
async fn on_a_cluster_after_a_redis_restart_hubs_resubscribe_and_clients_lose_and_repeat_nothing() {
    if let Some(redis) = redis_cluster_or_skip() {
        after_a_redis_restart_hubs_resubscribe_and_clients_lose_and_repeat_nothing_on(redis).await;
    }
}

async fn after_a_redis_restart_hubs_resubscribe_and_clients_lose_and_repeat_nothing_on(
    mut redis: RedisServer,
) {
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let mut watched = Watched::start(&redis, &prefix, data.path()).await;

    redis.kill();
    let down = wait_until(WAIT, || async {
        let response = watched.hub.get_public("/readyz").await;
        (response.status() == 503).then_some(())
    })
    .await;
    assert!(down.is_some(), "readyz reports the lost engine");
    redis.restart();

    // a sync right after the restart: its first events may well be published before
    // the hub has resubscribed; the hub must recover them from the history
    watched.a_sync_now_reaches_every_client_once().await;
    let ready = watched.hub.get_public("/readyz").await;
    assert_eq!(ready.status(), 200);
}

/// A hub with one in-process worker, a synced project, and a socket that saw the
/// first sync: what an outage test breaks and then checks.
struct Watched {
    hub: TestApp,
    repo: GitRepo,
    project: String,
    steady: crate::helpers::WsClient,
    /// the last event id the socket saw before the outage
    seen: u64,
}

impl Watched {
    async fn start(redis: &RedisServer, prefix: &str, data: &std::path::Path) -> Self {
        let hub = hub(redis, prefix, data, 1).await;
        let repo = GitRepo::new();
        repo.write("a.txt", "one\n");
        repo.commit("one");
        let project = hub.register(&repo).await;
        let mut steady = hub.ws(&hub.token, "").await;
        let start = steady.next_json().await["last_event_id"]
            .as_u64()
            .expect("id");
        let first = hub.request_sync(&project).await["sync_id"]
            .as_str()
            .expect("id")
            .to_owned();
        let before = steady
            .until(|f| is_notification(f, "repo_sync_success") && f["sync_id"] == first.as_str())
            .await;
        assert_contiguous(&ids_of(&before), start);
        let seen = *ids_of(&before).last().expect("events");
        Self {
            hub,
            repo,
            project,
            steady,
            seen,
        }
    }

    /// A sync requested once the hub accepts requests again reaches the socket that
    /// stayed open with no gap or duplicate since `seen`, and a client that was away
    /// resumes with exactly the same events.
    async fn a_sync_now_reaches_every_client_once(&mut self) {
        self.repo.write("b.txt", "two\n");
        let commit = self.repo.commit("two");
        let (hub, project) = (&self.hub, &self.project);
        let second = wait_until(WAIT, || async {
            let response = hub
                .post(
                    "/api/v1/repo/sync",
                    &hub.token,
                    serde_json::json!({"project_id": project}),
                )
                .await;
            if response.status() != 202 {
                return None;
            }
            let body: Value = response.json().await.ok()?;
            body["sync_id"].as_str().map(str::to_owned)
        })
        .await
        .expect("the hub accepts syncs again once redis is back");
        let after = self
            .steady
            .until(|f| is_notification(f, "repo_sync_success") && f["sync_id"] == second.as_str())
            .await;
        assert_contiguous(&ids_of(&after), self.seen);
        assert!(
            after
                .iter()
                .any(|f| f["stage"] == "running" && f["sync_id"] == second.as_str()),
            "the early stages of the sync arrived too: {after:?}"
        );
        assert_eq!(hub.wait_for_sync(&second).await["commit"], commit.as_str());

        // a client that was away for all of it resumes from where it stopped
        let mut returning = hub
            .ws(&hub.token, &format!("?last_event_id={}", self.seen))
            .await;
        let hello = returning.next_json().await;
        assert_eq!(hello["type"], "hello");
        let replay = returning
            .until(|f| is_notification(f, "repo_sync_success") && f["sync_id"] == second.as_str())
            .await;
        assert_eq!(
            ids_of(&replay),
            ids_of(&after),
            "resume replays exactly what was missed"
        );
        assert!(
            self.steady.is_silent_for(Duration::from_millis(300)).await,
            "no duplicate (and no close frame) arrives late"
        );
    }
}

/// `hivesync ready`: the health check of worker containers.
#[tokio::test]
async fn ready_answers_for_the_engine_a_worker_would_use() {
    if let Some(redis) = redis_or_skip() {
        ready_answers_for_the_engine_a_worker_would_use_on(redis).await;
    }
}

#[tokio::test]
async fn on_a_cluster_ready_answers_for_the_engine_a_worker_would_use() {
    if let Some(redis) = redis_cluster_or_skip() {
        ready_answers_for_the_engine_a_worker_would_use_on(redis).await;
    }
}

async fn ready_answers_for_the_engine_a_worker_would_use_on(mut redis: RedisServer) {
    let data = tempfile::tempdir().expect("temp dir");
    let ready = |redis: &RedisServer| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hivesync"))
            .arg("ready")
            .env_clear()
            .env("HIVESYNC_REDIS_URL", redis.url())
            .env(
                "HIVESYNC_REDIS_CLUSTER",
                if redis.cluster { "1" } else { "0" },
            )
            .env("HIVESYNC_REDIS_PREFIX", unique_prefix())
            .env("HIVESYNC_DATA_DIR", data.path())
            .output()
            .expect("hivesync ready runs")
    };
    assert!(ready(&redis).status.success());
    redis.kill();
    let down = ready(&redis);
    assert!(!down.status.success(), "redis is down");
    let message = String::from_utf8_lossy(&down.stderr);
    assert!(message.contains("could not reach redis"), "{message}");
}

/// A job that every worker dies on (a crash, an OOM kill) is failed after
/// MAX_DELIVERIES hand-outs instead of taking down workers forever.
#[tokio::test]
async fn a_job_that_kills_every_worker_is_failed_not_retried_forever() {
    if let Some(redis) = redis_or_skip() {
        a_job_that_kills_every_worker_is_failed_not_retried_forever_on(redis).await;
    }
}

#[tokio::test]
async fn on_a_cluster_a_job_that_kills_every_worker_is_failed_not_retried_forever() {
    if let Some(redis) = redis_cluster_or_skip() {
        a_job_that_kills_every_worker_is_failed_not_retried_forever_on(redis).await;
    }
}

async fn a_job_that_kills_every_worker_is_failed_not_retried_forever_on(redis: RedisServer) {
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let hub = TestApp::spawn_on(data.path(), {
        let (url, cluster) = (redis.url(), redis.cluster);
        let prefix = prefix.clone();
        move |config| {
            config.redis_url = Some(url);
            config.redis_cluster = cluster;
            config.redis_prefix = prefix;
            config.serve_workers = Some(0);
        }
    })
    .await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a\n");
    repo.commit("a");
    let project = hub.register(&repo).await;
    let sync_id = hub.request_sync(&project).await["sync_id"]
        .as_str()
        .expect("id")
        .to_owned();

    // workers that take the job and die without a word, one after another
    let reclaim = Duration::from_millis(100);
    let shutdown = tokio_util::sync::CancellationToken::new();
    for expected in 1..=hivesync::engine::MAX_DELIVERIES {
        let doomed =
            hivesync::engine::redis::RedisEngine::connect(hivesync::engine::redis::RedisSettings {
                cluster: redis.cluster,
                url: redis.url(),
                prefix: prefix.clone(),
                reclaim_after: reclaim,
                history_len: 100,
                sync_rate: (100, Duration::from_secs(1)),
                rules: Default::default(),
                pool_size: 4,
            })
            .await
            .expect("connects");
        let lease =
            tokio::time::timeout(WAIT, hivesync::engine::JobQueue::take(&*doomed, &shutdown))
                .await
                .expect("in time")
                .expect("take")
                .expect("the job");
        assert_eq!(lease.deliveries, expected, "each hand-out is counted");
    }

    let mut worker = spawn_worker(
        &redis,
        &prefix,
        data.path(),
        100,
        &logs.path().join("worker.log"),
    );
    let record = hub.wait_for_sync(&sync_id).await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["error"]["code"], "backend_error");
    assert!(
        record["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped 5 workers")),
        "{record}"
    );
    let _ = worker.kill();
    let _ = worker.wait();
}

/// A cluster master dies and its replica takes over: the hub's sharded subscription
/// moves to the new master, a sync afterwards reaches the socket that stayed open with
/// no gap or duplicate, and a client that was away resumes exactly.
#[tokio::test]
async fn on_a_cluster_a_failed_over_master_loses_no_event_and_repeats_none() {
    let Some(mut redis) = crate::redis_server::redis_cluster_with_replicas_or_skip() else {
        return;
    };
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let mut watched = Watched::start(&redis, &prefix, data.path()).await;

    // the master holding this user's events (and their group's channel) dies
    let victim = redis
        .master_holding(&format!("{prefix}:*:events:*"))
        .expect("a master holds the user's history");
    redis.wait_for_replicas();
    redis.kill_node(victim);
    redis.wait_until_healthy();

    watched.a_sync_now_reaches_every_client_once().await;
}

/// A hub subscribes to the sharded channel of a user's group only while it holds a
/// socket of that user, once however many sockets, and to nothing else.
#[tokio::test]
async fn on_a_cluster_a_hub_subscribes_only_to_the_groups_of_its_users() {
    let Some(redis) = redis_cluster_or_skip() else {
        return;
    };
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    // no workers in this hub: no job bells either
    let hub = hub(&redis, &prefix, data.path(), 0).await;
    let pattern = format!("{prefix}:*");
    assert_eq!(redis.shard_channels(&pattern), Vec::<String>::new());

    let mut first = hub.ws(&hub.token, "").await;
    first.next_json().await;
    let mut second = hub.ws(&hub.token, "").await;
    second.next_json().await;
    let subscribed = redis.shard_channels(&pattern);
    assert_eq!(subscribed.len(), 1, "one group channel: {subscribed:?}");
    assert!(
        subscribed[0].ends_with(":events-of-group"),
        "{subscribed:?}"
    );

    // a user of another group adds their group's channel (users of alice's group,
    // tried on the way, add none)
    let mut other = None;
    for n in 0..50 {
        let user_token = crate::helpers::token(&format!("user-{n}"), ClientKind::Desktop);
        let mut socket = hub.ws(&user_token, "").await;
        socket.next_json().await;
        let now = redis.shard_channels(&pattern);
        if now.len() == 2 {
            other = Some(socket);
            break;
        }
        assert_eq!(now, subscribed, "a user of the same group adds nothing");
        drop(socket);
    }
    let other = other.expect("a user of another group among 50");

    // the last socket of a user gives its group up
    drop(other);
    let left = wait_until(WAIT, || async {
        (redis.shard_channels(&pattern) == subscribed).then_some(())
    })
    .await;
    assert!(left.is_some(), "{:?}", redis.shard_channels(&pattern));
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        redis.shard_channels(&pattern),
        subscribed,
        "one socket is left"
    );
    drop(second);
    let none = wait_until(WAIT, || async {
        redis.shard_channels(&pattern).is_empty().then_some(())
    })
    .await;
    assert!(none.is_some(), "{:?}", redis.shard_channels(&pattern));
}
