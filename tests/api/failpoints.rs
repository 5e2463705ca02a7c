//! A kill (or an error) at each boundary of a sync's writes, by name
//! (`src/failpoint.rs`), on the embedded engine, one Redis and a Redis Cluster. Random
//! kills rarely land in a window microseconds wide; these land there every time.
//! Whatever the point: the sync ends, the mirror is exactly the upstream head, and its
//! final record and its notification are both there, the notification exactly once.

use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, WAIT, assert_exact_worktree, token, wait_until};
use crate::redis_server::{
    RedisServer, redis_cluster_or_skip, redis_or_skip, spawn_worker_with, unique_prefix,
};
use hivesync::auth::ClientKind;

/// Waits up to 30 s for `child` to exit by itself: `true` if it did.
async fn exits(child: &mut Child) -> bool {
    wait_until(WAIT, || {
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        async move { exited.then_some(()) }
    })
    .await
    .is_some()
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The end a sync must leave whatever met it: a completed record at `head`, exactly
/// one `repo_sync_success` for it in the owner's history (and no failure), and the
/// mirror's tree exactly the upstream head.
async fn assert_one_end(
    http: &reqwest::Client,
    base: &str,
    user_token: &str,
    sync_id: &str,
    head: &str,
) {
    let record = wait_until(Duration::from_secs(60), || async {
        let record: Value = http
            .get(format!("{base}/api/v1/repo/sync/{sync_id}"))
            .bearer_auth(user_token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        matches!(record["status"].as_str(), Some("completed" | "failed")).then_some(record)
    })
    .await
    .unwrap_or_else(|| panic!("sync {sync_id} never ended"));
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["commit"], head);
    // the user's notifications, read until the hub answers
    let history = || async {
        wait_until(Duration::from_secs(30), || async {
            http.get(format!("{base}/api/v1/notifications?limit=10000"))
                .bearer_auth(user_token)
                .send()
                .await
                .ok()?
                .json::<Vec<Value>>()
                .await
                .ok()
        })
        .await
        .expect("the notifications answer")
    };
    // the notification may trail the record by a step on Redis; it must come, once
    let notifications = wait_until(Duration::from_secs(30), || async {
        let mine: Vec<Value> = history()
            .await
            .into_iter()
            .filter(|event| event["sync_id"] == sync_id)
            .collect();
        (!mine.is_empty()).then_some(mine)
    })
    .await
    .unwrap_or_else(|| panic!("sync {sync_id} ended without its notification"));
    // a late duplicate would come within a reclaim: look again after one
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let history = history().await;
    let kinds: Vec<&str> = history
        .iter()
        .filter(|event| event["sync_id"] == sync_id)
        .filter_map(|event| event["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["repo_sync_success"],
        "one notification for {sync_id} (first seen: {notifications:?})"
    );
}

/// `hivesync serve` (embedded engine) with `point` armed to abort; then started again
/// without it on the same data.
async fn embedded_kill_at(point: &str) {
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let repo = GitRepo::new();
    repo.write("a.txt", "one\n").write("dir/b.txt", "two\n");
    let head = repo.commit("first");
    let armed = format!("{point}=abort");
    let common = [
        ("HIVESYNC_ALLOWED_SCHEMES", "file"),
        ("HIVESYNC_SYNC_RATE", "10000/min"),
    ];
    let mut env = common.to_vec();
    env.push(("HIVESYNC_FAILPOINTS", armed.as_str()));
    let log = |name: &str| {
        std::fs::File::create(logs.path().join(name))
            .expect("log")
            .into()
    };
    let (mut server, addr) =
        crate::lifecycle::serve_binary_logging_to(data.path(), &env, log("armed.log")).await;
    let base = format!("http://{addr}");
    let alice = token("alice", ClientKind::Desktop);
    let http = hivesync::tls::http_client();
    let created: Value = http
        .post(format!("{base}/api/v1/projects"))
        .bearer_auth(&alice)
        .json(&json!({"name": "doomed", "repo_url": repo.url()}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let project = created["project_id"].as_str().expect("id").to_owned();
    let accepted: Value = http
        .post(format!("{base}/api/v1/repo/sync"))
        .bearer_auth(&alice)
        .json(&json!({"project_id": project}))
        .send()
        .await
        .expect("sync")
        .json()
        .await
        .expect("json");
    let sync_id = accepted["sync_id"].as_str().expect("sync_id").to_owned();
    assert!(
        exits(&mut server).await,
        "the hub did not die at {point}: {}",
        std::fs::read_to_string(logs.path().join("armed.log")).unwrap_or_default()
    );

    let (mut server, addr) =
        crate::lifecycle::serve_binary_logging_to(data.path(), &common, log("after.log")).await;
    let base = format!("http://{addr}");
    assert_one_end(&http, &base, &alice, &sync_id, &head).await;
    assert_exact_worktree(&data.path().join("repos").join(&project), &repo, &head);
    kill(&mut server);
}

/// A hub on `redis` and a `hivesync worker` with `point` armed with `action`; then a
/// second worker without it takes the job over.
async fn redis_fault_at(redis: RedisServer, point: &str, action: &str) {
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let (url, cluster, hub_prefix) = (redis.url(), redis.cluster, prefix.clone());
    let app = TestApp::spawn_on(data.path(), move |config| {
        config.redis_url = Some(url);
        config.redis_cluster = cluster;
        config.redis_prefix = hub_prefix;
        config.serve_workers = Some(0);
        config.reclaim_after = Duration::from_millis(1000);
    })
    .await;
    let armed = format!("{point}={action}");
    let mut first = spawn_worker_with(
        &redis,
        &prefix,
        data.path(),
        1000,
        &logs.path().join("armed.log"),
        &[("HIVESYNC_FAILPOINTS", &armed)],
    );
    let repo = GitRepo::new();
    repo.write("a.txt", "one\n").write("dir/b.txt", "two\n");
    let head = repo.commit("first");
    let project = app.register(&repo).await;
    let accepted = app.request_sync(&project).await;
    let sync_id = accepted["sync_id"].as_str().expect("sync_id").to_owned();
    let mut second = None;
    if action == "abort" {
        assert!(
            exits(&mut first).await,
            "the worker did not die at {point}: {}",
            std::fs::read_to_string(logs.path().join("armed.log")).unwrap_or_default()
        );
        second = Some(spawn_worker_with(
            &redis,
            &prefix,
            data.path(),
            1000,
            &logs.path().join("second.log"),
            &[],
        ));
    }
    assert_one_end(&app.http, &app.base, &app.token, &sync_id, &head).await;
    assert_exact_worktree(&app.worktree(&project), &repo, &head);
    kill(&mut first);
    if let Some(mut second) = second {
        kill(&mut second);
    }
    app.stop().await;
}

macro_rules! at_every_point {
    ($($name:ident => $point:literal),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::embedded_kill_at($point).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(redis) = super::redis_or_skip() {
                        super::redis_fault_at(redis, $point, "abort").await;
                    }
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(redis) = super::redis_cluster_or_skip() {
                        super::redis_fault_at(redis, $point, "abort").await;
                    }
                }
            )*
        }
    };
}

at_every_point! {
    killed_after_the_fetch_before_the_swap => "sync.after_fetch",
    killed_after_the_swap_before_the_record => "sync.after_swap",
    killed_after_the_final_record_before_the_notification => "job.after_final_record",
    killed_after_the_notification_before_the_ack => "job.after_notification",
}

/// Every point the code has is covered above (a new one must be added there).
#[test]
fn every_failpoint_is_tested() {
    let source = include_str!("failpoints.rs");
    for point in hivesync::failpoint::POINTS {
        assert!(
            source.contains(&format!("=> \"{point}\"")),
            "{point} has no test"
        );
    }
}

/// An error (not a kill) after the final record: the job goes back to the queue, its
/// next run finds the record final and publishes the end once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_the_final_record_publishes_the_end_once() {
    if let Some(redis) = redis_or_skip() {
        redis_fault_at(redis, "job.after_final_record", "error").await;
    }
}

/// The same after the notification: the rerun publishes nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_the_notification_publishes_nothing_twice() {
    if let Some(redis) = redis_or_skip() {
        redis_fault_at(redis, "job.after_notification", "error").await;
    }
}
