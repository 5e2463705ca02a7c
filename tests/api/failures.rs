use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, assert_exact_tree, is_notification};

async fn register_url(app: &TestApp, url: &str) -> String {
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "x", "repo_url": url}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.expect("json")["project_id"]
        .as_str()
        .expect("id")
        .to_owned()
}

#[tokio::test]
async fn a_sync_stuck_on_a_silent_remote_fails_with_timeout() {
    // a git daemon that accepts and then says nothing
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let app = TestApp::spawn_with(|config| {
        config.allowed_schemes.push("git".into());
        config.sync_timeout = Duration::from_secs(1);
    })
    .await;
    let id = register_url(&app, &format!("git://127.0.0.1:{port}/repo.git")).await;
    let started = std::time::Instant::now();
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["code"], "timeout", "{record}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        !app.worktree(&id).exists(),
        "nothing half-written is left as the mirror"
    );
    holder.abort();
    app.stop().await;
}

#[tokio::test]
async fn network_failures_are_retried_up_to_the_limit_and_not_found_is_not() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed); // nothing listens there now: every connect is refused
    let app = TestApp::spawn_with(|config| {
        config.allowed_schemes.push("git".into());
        config.retry_base = Duration::from_millis(20);
        config.retry_max = 3;
    })
    .await;
    let id = register_url(&app, &format!("git://127.0.0.1:{port}/repo.git")).await;
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["code"], "network_error", "{record}");
    assert_eq!(record["attempt"], 3);
    let frames = socket
        .until(|f| is_notification(f, "repo_sync_failed"))
        .await;
    let attempts = frames
        .iter()
        .filter(|f| {
            f["type"] == "sync.stage" && f["stage"] == "running" && f["progress"]["percent"] == 0
        })
        .count();
    assert!(attempts >= 3, "each attempt is a visible stage: {frames:?}");

    let missing = tempfile::tempdir().expect("temp dir");
    let id = register_url(&app, &format!("file://{}/absent", missing.path().display())).await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(
        (record["error"]["code"].as_str(), record["attempt"].as_u64()),
        (Some("repo_not_found"), Some(1))
    );
    app.stop().await;
}

async fn assert_repaired_on_next_sync(damage: impl FnOnce(&std::path::Path)) {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "one");
    repo.commit("one");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    damage(&app.data_dir.join("git").join(format!("{id}.git")));
    repo.write("a.txt", "two");
    let commit = repo.commit("two");

    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed", "{record}");
    let frames = socket
        .until(|f| is_notification(f, "repo_sync_success"))
        .await;
    assert!(
        frames
            .iter()
            .any(|f| is_notification(f, "repo_mirror_repaired")),
        "{frames:?}"
    );
    assert_exact_tree(&app, &id, &repo, &commit);
    app.stop().await;
}

#[tokio::test]
async fn a_mirror_with_a_broken_head_is_recloned() {
    assert_repaired_on_next_sync(|git_dir| {
        std::fs::write(git_dir.join("HEAD"), "garbage\n").expect("damage")
    })
    .await;
}

#[tokio::test]
async fn a_mirror_that_lost_its_objects_is_recloned() {
    assert_repaired_on_next_sync(|git_dir| {
        let objects = git_dir.join("objects");
        for entry in std::fs::read_dir(&objects).expect("objects") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|n| n != "info") {
                std::fs::remove_dir_all(&path).expect("remove");
                std::fs::create_dir_all(&path).expect("recreate empty");
            }
        }
    })
    .await;
}
