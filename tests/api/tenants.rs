//! Many tenants on one hub: no user can starve, fill or exhaust it for the others.
//! Quotas checked before anything is written, sockets capped per user and per hub,
//! file URLs confined to the operator's roots, one sync budget for every trigger, and
//! one user misbehaving in every way at once while another is served.

use std::time::{Duration, Instant};

use hivesync::auth::ClientKind;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::freshness::{deliver, enable_webhook, github_signature, push_body};
use crate::helpers::{GitRepo, TestApp, assert_exact_tree, token};
use crate::redis_server::{RedisServer, redis_or_skip, unique_prefix};

/// The snapshot directories of a project's mirror (one when nothing was left over).
fn snapshots(app: &TestApp, project_id: &str) -> usize {
    let trees = app
        .state
        .layout
        .trees_dir(&hivesync::domain::ProjectId::parse(project_id).expect("valid id"));
    std::fs::read_dir(trees)
        .map(|dir| {
            dir.flatten()
                .filter(|entry| {
                    entry.path().is_dir() && !entry.file_name().to_string_lossy().starts_with('.')
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_branch_over_a_quota_fails_repo_too_large_writes_nothing_and_keeps_the_tree() {
    let app = TestApp::spawn_with(|config| {
        config.quota.file_bytes = 4_000;
        config.quota.files = 40;
        config.quota.checkout_bytes = 10_000;
    })
    .await;
    let repo = GitRepo::new();
    repo.write("README.md", "small\n");
    let first = repo.commit("first");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");

    let over = |what: &str| format!("{what}: the sync fails with repo_too_large");
    // one file over the single-file limit
    repo.write("big.bin", &"x".repeat(5_000));
    repo.commit("a big file");
    let end = app.sync_to_end(&id).await;
    assert_eq!(end["status"], "failed", "{}", over("a big file"));
    assert_eq!(end["error"]["code"], "repo_too_large", "{end}");
    assert_eq!(end["attempt"], 1, "over a quota is not retried: {end}");
    // the same 3 KB blob at five paths: 15 KB to write, over the checkout limit
    repo.git(&["rm", "-q", "big.bin"]);
    for n in 0..5 {
        repo.write(&format!("copy{n}.txt"), &"y".repeat(3_000));
    }
    repo.commit("one blob, many paths");
    let end = app.sync_to_end(&id).await;
    assert_eq!(end["error"]["code"], "repo_too_large", "{end}");
    assert!(
        end["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("HIVESYNC_MAX_CHECKOUT_BYTES")),
        "{end}"
    );
    // many small files
    for n in 0..5 {
        repo.git(&["rm", "-q", &format!("copy{n}.txt")]);
    }
    for n in 0..50 {
        repo.write(&format!("many/{n}.txt"), "z");
    }
    repo.commit("many files");
    let end = app.sync_to_end(&id).await;
    assert_eq!(end["error"]["code"], "repo_too_large", "{end}");

    // nothing was written: the first tree is the one read, and the only one on disk
    assert_exact_tree(&app, &id, &repo, &first);
    assert_eq!(snapshots(&app, &id), 1, "no partial tree left behind");
    let (status, file) = app
        .get_json(&format!("/api/v1/repo/file?project_id={id}&path=README.md"))
        .await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["commit"], first.as_str());

    // back under the limits, the branch syncs again
    for n in 0..50 {
        repo.git(&["rm", "-q", &format!("many/{n}.txt")]);
    }
    let last = repo.commit("back to small");
    let end = app.sync_to_end(&id).await;
    assert_eq!(end["status"], "completed", "{end}");
    assert_exact_tree(&app, &id, &repo, &last);
    app.stop().await;
}

#[tokio::test]
async fn an_object_store_over_its_quota_after_the_fetch_fails_the_sync() {
    let app = TestApp::spawn_with(|config| config.quota.objects_bytes = 2_000).await;
    let repo = GitRepo::new();
    repo.commit_random_files(4, 4_000);
    let id = app.register(&repo).await;
    let end = app.sync_to_end(&id).await;
    assert_eq!(end["error"]["code"], "repo_too_large", "{end}");
    assert!(
        end["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("HIVESYNC_MAX_OBJECTS_BYTES")),
        "{end}"
    );
    assert!(
        !app.worktree(&id).exists(),
        "no tree is written for a store over its quota"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_user_at_the_project_quota_gets_403_quota_exceeded_and_others_do_not() {
    let app = TestApp::spawn_with(|config| config.max_projects_per_user = 3).await;
    let repo = GitRepo::new();
    repo.write("a", "a").commit("a");
    let register = |token: String| {
        let app = &app;
        let url = repo.url();
        async move {
            let response = app
                .post(
                    "/api/v1/projects",
                    &token,
                    json!({"name": "p", "repo_url": url}),
                )
                .await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    // a burst, all at once: exactly the quota gets through
    let alice = token("alice", ClientKind::Desktop);
    let answers = futures_util::future::join_all((0..8).map(|_| register(alice.clone()))).await;
    let created = answers.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(created, 3, "{answers:?}");
    for (status, body) in answers.iter().filter(|(status, _)| *status != 201) {
        assert_eq!(*status, 403, "{body}");
        assert_eq!(body["error"], "quota_exceeded", "{body}");
    }
    let (status, _) = register(token("bob", ClientKind::Desktop)).await;
    assert_eq!(status, 201, "another user's quota is their own");
    // deleting one makes room
    let (_, list) = app.get_json("/api/v1/projects").await;
    let first = list[0]["project_id"].as_str().expect("id").to_owned();
    assert_eq!(
        app.delete(&format!("/api/v1/projects/{first}"), &alice)
            .await
            .status(),
        204
    );
    assert_eq!(register(alice.clone()).await.0, 201);
    app.stop().await;
}

#[tokio::test]
async fn file_urls_must_lie_under_the_roots_at_registration_and_before_every_sync() {
    // the root holds the test's repositories, and the hub's data dir too (which is
    // refused all the same)
    let roots = tempfile::tempdir().expect("temp dir");
    let root = roots.path().to_path_buf();
    let app = TestApp::spawn_with(|config| config.file_roots = vec![std::env::temp_dir()]).await;
    let bob = token("bob", ClientKind::Desktop);
    // bob's project, mirrored in the data dir
    let secret = GitRepo::new();
    secret.write("secret.txt", "bob's code\n").commit("secret");
    let bobs = app.register_as(&bob, &secret).await;
    let sync = app
        .post("/api/v1/repo/sync", &bob, json!({"project_id": bobs}))
        .await;
    assert_eq!(sync.status(), 202);
    let bobs_git = app
        .state
        .layout
        .git_dir(&hivesync::domain::ProjectId::parse(&bobs).expect("id"));
    crate::helpers::wait_until(Duration::from_secs(30), || async {
        bobs_git.join("HEAD").exists().then_some(())
    })
    .await
    .expect("bob's mirror is written");

    let refused = |url: String| {
        let app = &app;
        async move {
            let response = app
                .post(
                    "/api/v1/projects",
                    &app.token,
                    json!({"name": "p", "repo_url": url}),
                )
                .await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("json");
            assert_eq!(
                (status, body["error"].as_str()),
                (400, Some("invalid_request")),
                "{url}: {body}"
            );
        }
    };
    refused(format!("file://{}", bobs_git.display())).await;
    refused("file:///etc".to_owned()).await;
    let escape = root.join("escape");
    std::os::unix::fs::symlink(&bobs_git, &escape).expect("symlink");
    refused(format!("file://{}", escape.display())).await;

    // a link under the root to a real repository is fine, until it is turned
    let own = GitRepo::new();
    own.write("mine.txt", "alice's\n").commit("mine");
    let link = root.join("mine");
    std::os::unix::fs::symlink(own.path(), &link).expect("symlink");
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "mine", "repo_url": format!("file://{}", link.display())}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let mine: Value = response.json().await.expect("json");
    let mine = mine["project_id"].as_str().expect("id").to_owned();
    assert_eq!(app.sync_to_end(&mine).await["status"], "completed");
    std::fs::remove_file(&link).expect("unlink");
    std::os::unix::fs::symlink(&bobs_git, &link).expect("symlink");
    let end = app.sync_to_end(&mine).await;
    assert_eq!(end["status"], "failed", "{end}");
    assert_eq!(end["error"]["code"], "backend_error", "{end}");
    let (_, file) = app
        .get_json(&format!(
            "/api/v1/repo/file?project_id={mine}&path=secret.txt"
        ))
        .await;
    assert_ne!(
        file["content"], "bob's code\n",
        "bob's code never reaches alice"
    );
    app.stop().await;
}

/// Opens a socket for `user`; the answer to the upgrade when it was refused.
async fn open(
    app: &TestApp,
    user: &str,
) -> Result<crate::helpers::WsClient, (u16, Value, Option<String>)> {
    let url = format!("ws://{}/api/v1/ws", app.addr);
    let mut request = url.into_client_request().expect("valid ws url");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(user, ClientKind::Mobile))
            .parse()
            .expect("header"),
    );
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(crate::helpers::WsClient { socket }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let retry = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice(body).ok())
                .unwrap_or(Value::Null);
            Err((status, body, retry))
        }
        Err(err) => panic!("websocket failed otherwise: {err}"),
    }
}

#[tokio::test]
async fn sockets_over_the_per_user_or_hub_cap_are_refused_with_429_and_others_still_connect() {
    let app = TestApp::spawn_with(|config| {
        config.ws_per_user = 3;
        config.ws_max = Some(5);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open(&app, "mallory").await.expect("under the cap"));
    }
    let (status, body, retry) = open(&app, "mallory").await.err().expect("over the cap");
    assert_eq!(status, 429);
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(retry.is_some(), "Retry-After is set");
    // another user still connects, up to the hub's cap
    let bob = open(&app, "bob").await.expect("bob connects");
    let _carol = open(&app, "carol").await.expect("carol connects");
    let (status, body, _) = open(&app, "dave").await.err().expect("the hub is full");
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    // a socket closed gives its place back
    drop(bob);
    let again = crate::helpers::wait_until(Duration::from_secs(10), || async {
        open(&app, "dave").await.ok()
    })
    .await;
    assert!(again.is_some(), "a closed socket's place is given back");
    let metrics = app.metrics().await;
    assert_eq!(
        metrics.value("hivesync_ws_rejected_total", &[("reason", "per_user")]),
        Some(1.0)
    );
    assert!(
        metrics
            .value("hivesync_ws_rejected_total", &[("reason", "global")])
            .is_some_and(|n| n >= 1.0)
    );
    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn webhooks_spend_the_owners_budget_and_leave_the_presses_their_half() {
    // 4 syncs a minute: pushes may use 2 of them, presses the rest
    let app = TestApp::spawn_with(|config| config.sync_rate = (4, Duration::from_secs(60))).await;
    let repo = GitRepo::new();
    repo.write("a", "a").commit("a");
    let id = app.register(&repo).await;
    let secret = enable_webhook(&app, &id).await;
    let body = push_body("refs/heads/main");
    let signed = |delivery: &str| {
        vec![
            ("x-github-event", "push".to_owned()),
            ("x-github-delivery", delivery.to_owned()),
            (
                "x-hub-signature-256",
                github_signature(&secret, body.as_bytes()),
            ),
        ]
    };
    for delivery in ["d-1", "d-2"] {
        let (status, answer) = deliver(&app, &id, &signed(delivery), &body).await;
        assert_eq!(status, 202, "{answer}");
        assert!(answer["sync_id"].is_string(), "{answer}");
    }
    let (status, answer) = deliver(&app, &id, &signed("d-3"), &body).await;
    assert_eq!(status, 202, "acknowledged: {answer}");
    assert_eq!(answer["throttled"], true, "{answer}");
    assert_eq!(answer["coalesced"], true, "{answer}");
    assert!(
        answer["retry_after_s"].as_u64().is_some_and(|s| s > 0),
        "{answer}"
    );
    // the pushes took their half; the presses still have theirs
    for _ in 0..2 {
        let response = app
            .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
            .await;
        assert!(matches!(response.status().as_u16(), 200 | 202));
    }
    let response = app
        .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
        .await;
    assert_eq!(response.status(), 429, "the whole budget is spent now");
    let metrics = app.metrics().await;
    assert!(
        metrics
            .value("hivesync_syncs_throttled_total", &[])
            .is_some_and(|n| n >= 1.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_webhook_under_the_free_space_floor_gets_a_sync_that_fails_storage_full() {
    let app = TestApp::spawn_with(|config| config.min_free_bytes = u64::MAX).await;
    let repo = GitRepo::new();
    repo.write("a", "a").commit("a");
    let id = app.register(&repo).await;
    let press = app
        .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
        .await;
    assert_eq!(press.status(), 507);
    let secret = enable_webhook(&app, &id).await;
    let body = push_body("refs/heads/main");
    let headers = vec![
        ("x-github-event", "push".to_owned()),
        (
            "x-hub-signature-256",
            github_signature(&secret, body.as_bytes()),
        ),
    ];
    let (status, answer) = deliver(&app, &id, &headers, &body).await;
    assert_eq!(status, 202, "{answer}");
    let end = app
        .wait_for_sync(answer["sync_id"].as_str().expect("sync_id"))
        .await;
    assert_eq!(end["error"]["code"], "storage_full", "{end}");
    app.stop().await;
}

/// The scheduler spends the owner's budget too: of five projects due at once under a
/// budget of four a minute, two start (the schedule's half), the rest are due again
/// when the budget allows, and the owner's own presses still go through.
#[tokio::test]
async fn schedules_are_throttled_by_the_owners_budget_not_their_presses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = hivesync::engine::embedded::EmbeddedEngine::open(
        dir.path(),
        (4, Duration::from_secs(60)),
        100,
    )
    .expect("engine");
    let engine = hivesync::engine::Engine {
        store: engine.clone(),
        queue: engine.clone(),
        events: engine,
        metrics: Default::default(),
    };
    let mut ids = Vec::new();
    for _ in 0..5 {
        let mut project = crate::conformance::project("erin");
        project.sync_interval_s = Some(60);
        engine.store.insert_project(&project).await.expect("insert");
        ids.push(project.project_id);
    }
    let started = hivesync::worker::schedule_due(&engine, Duration::from_secs(600))
        .await
        .expect("round");
    assert_eq!(started, 2, "the schedule may spend half the budget");
    assert_eq!(engine.queue.depth().await.expect("depth"), 2);
    let now = hivesync::domain::now_epoch_ms();
    let mut held_back = 0;
    for id in &ids {
        let project = engine
            .store
            .project(id)
            .await
            .expect("read")
            .expect("exists");
        if project.active_sync.is_none() {
            held_back += 1;
            let due = project.next_sync_ms.expect("still scheduled");
            assert!(
                due > now && due <= now + 60_000,
                "due again when the budget allows: in {} ms",
                due.saturating_sub(now)
            );
        }
    }
    assert_eq!(held_back, 3);
    for _ in 0..2 {
        assert!(
            engine
                .store
                .admit_sync_request("erin")
                .await
                .expect("admit")
                .is_ok(),
            "the presses keep their half"
        );
    }
}

/// One user misbehaving every way at once — a flood of first syncs of larger
/// repositories, sockets to the cap, a repository over the quota — while another
/// connects, syncs and reads: her sync starts ahead of the flood's backlog, and every
/// step of hers answers.
async fn a_misbehaving_tenant_leaves_another_served(app: TestApp) {
    let mallory = token("mallory", ClientKind::Desktop);
    // the flood: first syncs of six larger repositories, then the Sync button again
    let mut flood = Vec::new();
    let mut upstreams = Vec::new();
    for _ in 0..6 {
        let repo = GitRepo::new();
        repo.commit_random_files(1_500, 2_048);
        flood.push(app.register_as(&mallory, &repo).await);
        upstreams.push(repo);
    }
    let bomb = GitRepo::new();
    for n in 0..6 {
        bomb.write(&format!("zeros{n}.bin"), &"0".repeat(300_000));
    }
    bomb.commit("one blob at six paths");
    let bomb_id = app.register_as(&mallory, &bomb).await;
    let mut flood_syncs = Vec::new();
    for id in flood.iter().chain([&bomb_id]) {
        let response = app
            .post("/api/v1/repo/sync", &mallory, json!({"project_id": id}))
            .await;
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.expect("json");
        flood_syncs.push(body["sync_id"].as_str().expect("id").to_owned());
    }
    let mut sockets = Vec::new();
    while let Ok(socket) = open(&app, "mallory").await {
        sockets.push(socket);
        assert!(sockets.len() <= 8, "the per-user socket cap holds");
    }

    // alice, meanwhile
    let began = Instant::now();
    let mut socket = app.ws(&app.token, "").await;
    let repo = GitRepo::new();
    repo.write("hello.txt", "hello\n");
    let commit = repo.commit("hello");
    let id = app.register(&repo).await;
    let accepted = app.request_sync(&id).await;
    // her job is on the queue once the request is answered (the record's queued_at is
    // stamped before the store's commit, which a worker may overtake)
    let acknowledged = hivesync::domain::now_rfc3339();
    let sync_id = accepted["sync_id"].as_str().expect("sync_id").to_owned();
    let frames = socket
        .until(|frame| {
            frame["sync_id"] == sync_id.as_str()
                && matches!(frame["stage"].as_str(), Some("completed" | "failed"))
        })
        .await;
    assert!(
        frames.iter().any(|f| f["stage"] == "completed"),
        "alice's sync completes: {frames:?}"
    );
    let (status, file) = app
        .get_json(&format!("/api/v1/repo/file?project_id={id}&path=hello.txt"))
        .await;
    assert_eq!(
        (status, file["commit"].as_str()),
        (200, Some(commit.as_str()))
    );
    let served_in = began.elapsed();

    // once hers was queued, none of the flood's backlog started before it
    let mine = app.wait_for_sync(&sync_id).await;
    let queued = acknowledged;
    let started = mine["started_at"].as_str().expect("started").to_owned();
    // a job's start is stamped a moment after a worker picked it: one of mallory's
    // (her cap is one running) may have been picked just before alice's was queued and
    // stamped just after; anything later was picked ahead of hers
    let mut ahead = Vec::new();
    let mut in_flight = 0;
    for flood_sync in &flood_syncs {
        let record = app
            .get(&format!("/api/v1/repo/sync/{flood_sync}"), &mallory)
            .await
            .json::<Value>()
            .await
            .expect("json");
        let Some(theirs) = record["started_at"].as_str() else {
            continue;
        };
        if !(queued.as_str() < theirs && theirs < started.as_str()) {
            continue;
        }
        let after_queued = hivesync::domain::millis_between(&queued, theirs).unwrap_or(u64::MAX);
        if after_queued <= PICK_TO_START_MS && in_flight == 0 {
            in_flight += 1;
        } else {
            ahead.push(theirs.to_owned());
        }
    }
    assert!(
        ahead.is_empty(),
        "{} of mallory's syncs, queued before alice's, started after it was queued and ahead of it: {ahead:?} (alice's queued by {queued}, started {started})",
        ahead.len()
    );
    // the oversized repository wrote nothing and failed as documented
    let bomb_end = app
        .get(&format!("/api/v1/repo/sync/{}", flood_syncs[6]), &mallory)
        .await
        .json::<Value>()
        .await
        .expect("json");
    let bomb_end = if bomb_end["status"] == "failed" || bomb_end["status"] == "completed" {
        bomb_end
    } else {
        let app = &app;
        crate::helpers::wait_until(crate::helpers::WAIT, || async {
            let record: Value = app
                .get(&format!("/api/v1/repo/sync/{}", flood_syncs[6]), &mallory)
                .await
                .json()
                .await
                .ok()?;
            matches!(record["status"].as_str(), Some("failed" | "completed")).then_some(record)
        })
        .await
        .expect("the bomb's sync ends")
    };
    assert_eq!(bomb_end["error"]["code"], "repo_too_large", "{bomb_end}");
    assert!(!app.worktree(&bomb_id).exists());
    eprintln!("alice served in {served_in:?} beside the flood");
    drop(sockets);
    app.stop().await;
}

/// How long after a worker picks a job its start may be stamped, on a loaded machine
/// (the lock, the record and the project are read in between).
const PICK_TO_START_MS: u64 = 2_000;

fn misbehaving_config(config: &mut hivesync::config::Config) {
    config.serve_workers = Some(2);
    config.ws_per_user = 8;
    config.quota.checkout_bytes = 1_000_000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_engine_a_misbehaving_tenant_leaves_another_served() {
    let app = TestApp::spawn_with(misbehaving_config).await;
    a_misbehaving_tenant_leaves_another_served(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_misbehaving_tenant_leaves_another_served() {
    let Some(redis): Option<RedisServer> = redis_or_skip() else {
        return;
    };
    let url = redis.url();
    let app = TestApp::spawn_with(move |config| {
        misbehaving_config(config);
        config.redis_url = Some(url);
        config.redis_prefix = unique_prefix();
    })
    .await;
    a_misbehaving_tenant_leaves_another_served(app).await;
    drop(redis);
}

#[tokio::test]
async fn a_users_mirrors_together_stay_under_their_total() {
    // each project below holds about 20 KB of files and 20 KB of objects
    let app = TestApp::spawn_with(|config| config.quota.user_bytes = 60_000).await;
    let first = GitRepo::new();
    first.commit_random_files(5, 4_000);
    let a = app.register(&first).await;
    assert_eq!(app.sync_to_end(&a).await["status"], "completed");
    let second = GitRepo::new();
    second.commit_random_files(5, 4_000);
    let b = app.register(&second).await;
    let end = app.sync_to_end(&b).await;
    assert_eq!(end["error"]["code"], "repo_too_large", "{end}");
    assert!(
        end["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("HIVESYNC_MAX_USER_BYTES")),
        "{end}"
    );
    assert!(!app.worktree(&b).exists(), "nothing written");
    // another user's total is their own
    let bob = token("bob", ClientKind::Desktop);
    let theirs = app.register_as(&bob, &second).await;
    let accepted = app
        .post("/api/v1/repo/sync", &bob, json!({"project_id": theirs}))
        .await;
    assert_eq!(accepted.status(), 202);
    let worktree = app.worktree(&theirs);
    crate::helpers::wait_until(Duration::from_secs(30), || async {
        worktree.exists().then_some(())
    })
    .await
    .expect("bob's sync writes his tree");
    // deleting the first makes room for the second
    assert_eq!(
        app.delete(&format!("/api/v1/projects/{a}"), &app.token)
            .await
            .status(),
        204
    );
    let end = app.sync_to_end(&b).await;
    assert_eq!(end["status"], "completed", "{end}");
    app.stop().await;
}
