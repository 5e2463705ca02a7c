//! Nothing stuck, nothing left behind: a push during a running sync is followed, a
//! project deleted mid-sync says nothing more, requests racing a delete or an
//! unreachable Redis get the contract's answers.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, WAIT, assert_exact_tree, wait_until};
use crate::redis_server::{redis_or_skip, unique_prefix};

async fn record(app: &TestApp, sync_id: &str) -> Value {
    app.get_json(&format!("/api/v1/repo/sync/{sync_id}"))
        .await
        .1
}

/// Polls until the sync is past `queued` and not ended: a worker is on it.
async fn wait_running(app: &TestApp, sync_id: &str) -> bool {
    wait_until(WAIT, || async {
        let status = record(app, sync_id).await["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match status.as_str() {
            "queued" => None,
            "completed" | "failed" => Some(false),
            _ => Some(true),
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test]
async fn a_push_during_a_running_sync_is_followed_by_exactly_one_more_sync() {
    let app = TestApp::spawn_with(|config| config.workers = 1).await;
    let repo = GitRepo::new();
    // enough to keep the first sync busy while the test pushes and asks again
    repo.commit_random_files(300, 100_000);
    let id = app.register(&repo).await;
    let first = app.request_sync(&id).await;
    let first_id = first["sync_id"].as_str().expect("id").to_owned();
    assert!(
        wait_running(&app, &first_id).await,
        "the first sync is running"
    );

    repo.write("pushed.txt", "landed mid-sync\n");
    let pushed = repo.commit("pushed while the mirror was syncing");
    let response = app
        .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
        .await;
    assert_eq!(
        response.status(),
        202,
        "a request during a running sync queues a follow-up"
    );
    let follow_up: Value = response.json().await.expect("json");
    let follow_up_id = follow_up["sync_id"].as_str().expect("id").to_owned();
    assert_ne!(follow_up_id, first_id);
    assert_ne!(follow_up["coalesced"], true);
    for _ in 0..3 {
        let joined = app.request_sync(&id).await;
        assert_eq!(
            joined["sync_id"],
            follow_up_id.as_str(),
            "later requests join it"
        );
        assert_eq!(joined["coalesced"], true);
    }

    let first_end = app.wait_for_sync(&first_id).await;
    assert_eq!(first_end["status"], "completed", "{first_end}");
    let end = app.wait_for_sync(&follow_up_id).await;
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!(
        end["commit"],
        pushed.as_str(),
        "the mirror ends at the pushed commit"
    );
    assert_exact_tree(&app, &id, &repo, &pushed);
    let syncs = app
        .get_json(&format!("/api/v1/repo/sync?project_id={id}"))
        .await
        .1;
    assert_eq!(
        syncs.as_array().map(Vec::len),
        Some(2),
        "one follow-up, however many requests: {syncs}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_project_deleted_mid_sync_gets_no_further_event() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.commit_random_files(300, 100_000);
    let id = app.register(&repo).await;
    let sync = app.request_sync(&id).await;
    let sync_id = sync["sync_id"].as_str().expect("id").to_owned();
    assert!(wait_running(&app, &sync_id).await, "the sync is running");
    let response = app
        .delete(&format!("/api/v1/projects/{id}"), &app.token)
        .await;
    assert_eq!(response.status(), 204);
    let events_at_delete: Vec<Value> = app
        .get("/api/v1/notifications?limit=10000", &app.token)
        .await
        .json()
        .await
        .expect("json");
    let last_id = events_at_delete
        .iter()
        .filter_map(|event| event["id"].as_u64())
        .max()
        .unwrap_or(0);
    let after_delete = || async {
        let after: Vec<Value> = app
            .get(
                &format!("/api/v1/notifications?after={last_id}&limit=10000"),
                &app.token,
            )
            .await
            .json()
            .await
            .expect("json");
        after
    };
    // the stage or progress tick the worker stored just before the delete may still
    // be on its way (its record is stored, then published); nothing of a later stage
    // comes, however long the sync would have run (long enough for it to have
    // finished had it gone on)
    let later = wait_until(Duration::from_secs(8), || async {
        let after = after_delete().await;
        let later = after.len() > 1
            || after
                .iter()
                .any(|event| event["type"] != "sync.stage" || event["stage"] != "running");
        later.then_some(after)
    })
    .await;
    assert!(
        later.is_none(),
        "events after the delete: {:?}",
        later.unwrap_or_default()
    );
    // and its files go once the worker lets go
    let gone = wait_until(WAIT, || async {
        (!app.data_dir.join("git").join(format!("{id}.git")).exists()).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the mirror was removed");
    app.stop().await;
}

#[tokio::test]
async fn sync_requests_racing_a_delete_get_404_never_500() {
    let app = TestApp::spawn_with(|config| config.workers = 0).await;
    let repo = GitRepo::new();
    repo.write("README.md", "x\n").commit("first");
    for _ in 0..20 {
        let id = app.register(&repo).await;
        let requests =
            (0..6).map(|_| app.post("/api/v1/repo/sync", &app.token, json!({"project_id": id})));
        let path = format!("/api/v1/projects/{id}");
        let delete = app.delete(&path, &app.token);
        let (statuses, deleted) = tokio::join!(futures_util::future::join_all(requests), delete);
        assert_eq!(deleted.status(), 204);
        for response in statuses {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert!(
                matches!(status, 200 | 202 | 404),
                "a request racing a delete got {status}: {body}"
            );
            if status == 404 {
                assert!(body.contains("project_not_found"), "{body}");
            }
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_redis_is_503_with_retry_after() {
    let Some(mut redis) = redis_or_skip() else {
        return;
    };
    let url = redis.url();
    let app = TestApp::spawn_with(move |config| {
        config.redis_url = Some(url);
        config.redis_prefix = unique_prefix();
        config.serve_workers = Some(0);
    })
    .await;
    assert_eq!(app.get("/api/v1/projects", &app.token).await.status(), 200);
    redis.kill();
    let response = app.get("/api/v1/projects", &app.token).await;
    assert_eq!(response.status(), 503);
    assert!(
        response.headers().get("retry-after").is_some(),
        "Retry-After tells the client when to come back"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "backend_error");
    app.stop().await;
}

#[tokio::test]
async fn the_disk_floor_holds_for_a_sync_that_was_queued_before_the_disk_filled() {
    let data = tempfile::tempdir().expect("temp dir");
    let repo = GitRepo::new();
    repo.write("README.md", "one\n");
    let first = repo.commit("first");
    let app = TestApp::spawn_on(data.path(), |_| {}).await;
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    app.stop().await;

    // queued while there was room (no worker to take it)...
    repo.write("README.md", "two\n");
    repo.commit("second");
    let app = TestApp::spawn_on(data.path(), |config| config.workers = 0).await;
    let queued = app.request_sync(&id).await;
    let sync_id = queued["sync_id"].as_str().expect("id").to_owned();
    app.stop().await;

    // ...and taken by a worker once free space is under the floor
    let app = TestApp::spawn_on(data.path(), |config| config.min_free_bytes = u64::MAX / 2).await;
    let end = app.wait_for_sync(&sync_id).await;
    assert_eq!(end["status"], "failed", "{end}");
    assert_eq!(end["error"]["code"], "storage_full", "{end}");
    assert_eq!(end["attempt"], 1, "a full disk is not retried: {end}");
    assert_exact_tree(&app, &id, &repo, &first);
    let readme = app
        .get_json(&format!("/api/v1/repo/file?project_id={id}&path=README.md"))
        .await
        .1;
    assert_eq!(
        readme["content"], "one\n",
        "the previous snapshot is still read"
    );
    app.stop().await;
}

/// Publishes `count` events for alice straight into the engine, alternating projects
/// `a` and `b`, as workers would.
async fn publish_many(app: &TestApp, count: u64) {
    use hivesync::protocol::{EventBody, Progress, SyncStatus};
    let events = app.state.engine.events.clone();
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let publishes = chunk.iter().map(|n| {
            let events = events.clone();
            let project = if n % 2 == 0 { "a" } else { "b" };
            async move {
                events
                    .publish(
                        "alice",
                        EventBody::SyncStage {
                            sync_id: format!("s{n}"),
                            project_id: project.into(),
                            stage: SyncStatus::Running,
                            progress: Some(Progress::default()),
                            at: hivesync::domain::now_rfc3339(),
                            retry: None,
                        },
                    )
                    .await
                    .expect("publish")
            }
        });
        futures_util::future::join_all(publishes).await;
    }
}

#[tokio::test]
async fn a_resume_replays_all_the_kept_history_however_long() {
    let app = TestApp::spawn_with(|config| config.event_history = 20_000).await;
    publish_many(&app, 10_050).await;
    let mut socket = app.ws(&app.token, "?last_event_id=0").await;
    let hello = socket.next_json().await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["last_event_id"], 0, "the resume point holds: {hello}");
    let mut ids = Vec::new();
    while ids.len() < 10_050 {
        let frame = socket.next_json().await;
        assert_ne!(frame["type"], "resync_required", "the whole gap is kept");
        ids.push(frame["id"].as_u64().expect("an event"));
    }
    assert!(
        ids.iter().copied().eq(1..=10_050),
        "every missed event once, in order"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_subscription_given_at_connect_applies_to_the_replay() {
    let app = TestApp::spawn().await;
    publish_many(&app, 20).await;
    let mut socket = app.ws(&app.token, "?last_event_id=0&project_ids=a").await;
    assert_eq!(socket.next_json().await["type"], "hello");
    let mut replayed = Vec::new();
    while replayed.len() < 10 {
        replayed.push(socket.next_json().await);
    }
    assert!(
        replayed.iter().all(|frame| frame["project_id"] == "a"),
        "only project a: {replayed:?}"
    );
    assert!(socket.is_silent_for(Duration::from_millis(500)).await);
    app.stop().await;
}

/// Points `main` of `repo` at a commit of a hand-made tree (entries as `(name, blob)`),
/// written with `--literally` so git does not refuse it first.
fn commit_raw_tree(repo: &GitRepo, entries: &[(&str, &str)]) {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut tree = Vec::new();
    for (name, blob) in entries {
        tree.extend_from_slice(format!("100644 {name}\0").as_bytes());
        let mut raw = [0u8; 20];
        for (index, byte) in raw.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&blob[index * 2..index * 2 + 2], 16).expect("hex");
        }
        tree.extend_from_slice(&raw);
    }
    let file = dir.path().join("tree");
    std::fs::File::create(&file)
        .and_then(|mut out| out.write_all(&tree))
        .expect("tree file");
    let tree_id = repo.git(&[
        "hash-object",
        "-t",
        "tree",
        "--literally",
        "-w",
        file.to_str().expect("utf-8 path"),
    ]);
    let commit = repo.git(&["commit-tree", "-m", "hand-made tree", &tree_id]);
    repo.git(&["update-ref", "refs/heads/main", &commit]);
}

#[tokio::test]
async fn malformed_trees_fail_once_cleanly_and_write_nothing() {
    let app = TestApp::spawn_with(|config| config.retry_base = Duration::from_millis(10)).await;
    for (what, bad_path, entries) in [
        ("a duplicate entry", "'README'", vec!["README", "README"]),
        // git's own upload-pack refuses to pack it and says why on the error channel
        ("an empty name", "empty filename", vec![""]),
    ] {
        let repo = GitRepo::new();
        repo.write("seed", "x\n").commit("seed");
        let blob = repo.git(&["hash-object", "-w", "seed"]);
        let tree: Vec<(&str, &str)> = entries.iter().map(|name| (*name, blob.as_str())).collect();
        commit_raw_tree(&repo, &tree);
        let id = app.register(&repo).await;
        let end = app.sync_to_end(&id).await;
        assert_eq!(end["status"], "failed", "{what}: {end}");
        assert_eq!(end["error"]["code"], "backend_error", "{what}: {end}");
        assert_eq!(end["attempt"], 1, "{what} is not retried: {end}");
        let message = end["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(bad_path),
            "{what}: the message names the bad path: {message}"
        );
        assert!(
            std::fs::symlink_metadata(app.worktree(&id)).is_err(),
            "{what}: no worktree was written"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_sync_whose_job_was_lost_is_requeued_by_the_watchdog_and_completes() {
    if let Some(redis) = redis_or_skip() {
        a_sync_whose_job_was_lost_is_requeued_by_the_watchdog_and_completes_on(redis).await;
    }
}

#[tokio::test]
async fn on_a_cluster_a_sync_whose_job_was_lost_is_requeued_by_the_watchdog_and_completes() {
    if let Some(redis) = crate::redis_server::redis_cluster_or_skip() {
        a_sync_whose_job_was_lost_is_requeued_by_the_watchdog_and_completes_on(redis).await;
    }
}

async fn a_sync_whose_job_was_lost_is_requeued_by_the_watchdog_and_completes_on(
    redis: crate::redis_server::RedisServer,
) {
    let prefix = unique_prefix();
    let hub = |workers: usize| {
        let (url, cluster, prefix) = (redis.url(), redis.cluster, prefix.clone());
        TestApp::spawn_with(move |config| {
            config.redis_url = Some(url);
            config.redis_cluster = cluster;
            config.redis_prefix = prefix;
            config.serve_workers = Some(workers);
            config.sync_timeout = Duration::from_secs(2);
            config.watchdog_interval = Duration::from_millis(300);
            config.watchdog_margin = Duration::from_secs(1);
        })
    };
    let repo = GitRepo::new();
    repo.write("README.md", "lost and found\n");
    let commit = repo.commit("first");
    // a hub with no workers records and queues the sync...
    let front = hub(0).await;
    let id = front.register(&repo).await;
    let sync_id = front.request_sync(&id).await["sync_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // ...and the job is lost (what a Redis losing data or a bug would do)
    let trimmed: u64 = redis
        .query(
            redis::cmd("XTRIM")
                .arg(redis.jobs_key(&prefix, id.as_str()))
                .arg("MAXLEN")
                .arg(0),
        )
        .await;
    assert_eq!(trimmed, 1, "the sync's job was on the stream");
    // two nodes with workers: their watchdogs find it once, and it runs
    let (first, second) = (hub(1).await, hub(1).await);
    let end = front.wait_for_sync(&sync_id).await;
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!(end["commit"], commit.as_str());
    let syncs = front
        .get_json(&format!("/api/v1/repo/sync?project_id={id}"))
        .await
        .1;
    assert_eq!(syncs.as_array().map(Vec::len), Some(1), "{syncs}");
    for app in [first, second, front] {
        app.stop().await;
    }
}
