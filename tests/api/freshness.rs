//! Keeping mirrors fresh through the real server: push webhooks (signed here, with
//! the forges' own header schemes), the scheduler, pause and resume, project status,
//! what changed, and metadata for every client class.

use std::time::Duration;

use hivesync::auth::ClientKind;
use hmac::Mac;
use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, WAIT, token, wait_until};

/// `sha256=<hex>` of `body` under `secret`, computed here (not by the server's code).
pub(crate) fn github_signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

pub(crate) async fn deliver(
    app: &TestApp,
    project_id: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, Value) {
    let mut request = app
        .http
        .post(format!("{}/api/v1/webhooks/{project_id}", app.base))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn patch(app: &TestApp, project_id: &str, body: Value) -> (u16, Value) {
    let response = app
        .http
        .patch(format!("{}/api/v1/projects/{project_id}", app.base))
        .bearer_auth(&app.token)
        .json(&body)
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn project(app: &TestApp, project_id: &str) -> Value {
    app.get_json(&format!("/api/v1/projects/{project_id}"))
        .await
        .1
}

pub(crate) async fn enable_webhook(app: &TestApp, project_id: &str) -> String {
    let response = app
        .post(
            &format!("/api/v1/projects/{project_id}/webhook"),
            &app.token,
            json!({}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["url"], format!("/api/v1/webhooks/{project_id}"));
    body["secret"].as_str().expect("secret").to_owned()
}

pub(crate) fn push_body(git_ref: &str) -> String {
    json!({"ref": git_ref, "before": "0", "after": "1", "repository": {"name": "x"}}).to_string()
}

#[tokio::test]
async fn a_signed_push_syncs_and_everything_else_is_refused_or_ignored() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("README.md", "one\n");
    let first = repo.commit("one");
    let id = app.register(&repo).await;
    app.sync_to_end(&id).await;

    // before webhooks are on, the endpoint answers exactly as for an unknown project
    let body = push_body("refs/heads/main");
    let unknown = deliver(&app, "0190a0a0-0000-7000-8000-000000000000", &[], &body).await;
    assert_eq!(unknown.0, 404);
    let off = deliver(&app, &id, &[], &body).await;
    assert_eq!(off, unknown, "webhooks off looks like no project at all");

    let secret = enable_webhook(&app, &id).await;
    let shown = project(&app, &id).await;
    assert_eq!(shown["webhook"], true);
    assert!(
        !shown.to_string().contains(&secret),
        "the secret is never returned again"
    );

    repo.write("README.md", "two\n");
    let second = repo.commit("two");
    let signed = |body: &str, delivery: &str| {
        vec![
            ("x-github-event", "push".to_owned()),
            ("x-github-delivery", delivery.to_owned()),
            (
                "x-hub-signature-256",
                github_signature(&secret, body.as_bytes()),
            ),
        ]
    };
    let (status, accepted) = deliver(&app, &id, &signed(&body, "d-1"), &body).await;
    assert_eq!(status, 202, "{accepted}");
    let end = app
        .wait_for_sync(accepted["sync_id"].as_str().expect("sync_id"))
        .await;
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!(end["trigger"], "webhook");
    assert_eq!(end["commit"], second.as_str());
    assert_eq!(end["previous_commit"], first.as_str());
    assert_eq!(end["changes"]["commits"], 1);
    assert_eq!(end["changes"]["forced"], false);

    // the same delivery again is a no-op
    let (status, again) = deliver(&app, &id, &signed(&body, "d-1"), &body).await;
    assert_eq!((status, again), (200, json!({"duplicate": true})));
    let syncs = app
        .get_json(&format!("/api/v1/repo/sync?project_id={id}"))
        .await
        .1;
    assert_eq!(
        syncs.as_array().map(Vec::len),
        Some(2),
        "no sync for a duplicate"
    );

    // forgeries: a wrong secret, a changed body, no signature
    let forged = vec![
        ("x-github-event", "push".to_owned()),
        (
            "x-hub-signature-256",
            github_signature("guess", body.as_bytes()),
        ),
    ];
    let (status, error) = deliver(&app, &id, &forged, &body).await;
    assert_eq!(status, 401);
    assert_eq!(error["error"], "invalid_signature");
    let tampered = body.replace("main", "mainx");
    assert_eq!(
        deliver(&app, &id, &signed(&body, "d-2"), &tampered).await.0,
        401
    );
    assert_eq!(
        deliver(&app, &id, &[("x-github-event", "push".to_owned())], &body)
            .await
            .0,
        401
    );

    // a ping, another event and another branch are acknowledged and ignored
    let ping = json!({"zen": "Keep it logically awesome."}).to_string();
    let mut ping_headers = signed(&ping, "d-3");
    ping_headers[0].1 = "ping".into();
    let (status, ignored) = deliver(&app, &id, &ping_headers, &ping).await;
    assert_eq!(status, 200);
    assert!(ignored["ignored"].is_string(), "{ignored}");
    let other = push_body("refs/heads/feature");
    let (status, ignored) = deliver(&app, &id, &signed(&other, "d-4"), &other).await;
    assert_eq!(status, 200);
    assert!(
        ignored["ignored"]
            .as_str()
            .unwrap_or_default()
            .contains("feature")
    );
    let syncs = app
        .get_json(&format!("/api/v1/repo/sync?project_id={id}"))
        .await
        .1;
    assert_eq!(
        syncs.as_array().map(Vec::len),
        Some(2),
        "nothing ignored synced"
    );

    // rotation: the old secret stops working; turning webhooks off gives the 404
    let rotated = enable_webhook(&app, &id).await;
    assert_ne!(rotated, secret);
    assert_eq!(
        deliver(&app, &id, &signed(&body, "d-5"), &body).await.0,
        401
    );
    let response = app
        .delete(&format!("/api/v1/projects/{id}/webhook"), &app.token)
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        deliver(&app, &id, &signed(&body, "d-6"), &body).await,
        unknown
    );
    app.stop().await;
}

#[tokio::test]
async fn gitlab_gitea_forgejo_and_generic_deliveries_are_each_verified() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a", "a\n").commit("a");
    let id = app.register(&repo).await;
    let secret = enable_webhook(&app, &id).await;
    let body = push_body("refs/heads/main");
    let hex = github_signature(&secret, body.as_bytes())
        .trim_start_matches("sha256=")
        .to_owned();
    let schemes: Vec<Vec<(&str, String)>> = vec![
        vec![
            ("x-gitlab-event", "Push Hook".into()),
            ("x-gitlab-token", secret.clone()),
            ("x-gitlab-event-uuid", "g-1".into()),
        ],
        vec![
            ("x-gitea-event", "push".into()),
            ("x-gitea-signature", hex.clone()),
            ("x-gitea-delivery", "t-1".into()),
        ],
        vec![
            ("x-forgejo-event", "push".into()),
            ("x-forgejo-signature", hex.clone()),
            ("x-forgejo-delivery", "f-1".into()),
        ],
        vec![
            ("x-hivesync-signature", format!("sha256={hex}")),
            ("x-hivesync-delivery", "h-1".into()),
        ],
    ];
    for headers in schemes {
        let (status, answer) = deliver(&app, &id, &headers, &body).await;
        assert!(status == 202, "{headers:?}: {status} {answer}");
        app.wait_for_sync(answer["sync_id"].as_str().expect("sync_id"))
            .await;
    }
    let wrong_token = vec![
        ("x-gitlab-event", "Push Hook".to_owned()),
        ("x-gitlab-token", format!("{secret}x")),
    ];
    assert_eq!(deliver(&app, &id, &wrong_token, &body).await.0, 401);
    app.stop().await;
}

#[tokio::test]
async fn webhook_deliveries_are_rate_limited_per_project_and_bodies_capped() {
    let app =
        TestApp::spawn_with(|config| config.webhook_rate = (2, Duration::from_secs(60))).await;
    let repo = GitRepo::new();
    repo.write("a", "a\n").commit("a");
    let id = app.register(&repo).await;
    let secret = enable_webhook(&app, &id).await;
    let ping = "{}".to_owned();
    let headers = |n: usize| {
        vec![
            ("x-github-event", "ping".to_owned()),
            ("x-github-delivery", format!("r-{n}")),
            (
                "x-hub-signature-256",
                github_signature(&secret, ping.as_bytes()),
            ),
        ]
    };
    assert_eq!(deliver(&app, &id, &headers(1), &ping).await.0, 200);
    assert_eq!(deliver(&app, &id, &headers(2), &ping).await.0, 200);
    let (status, limited) = deliver(&app, &id, &headers(3), &ping).await;
    assert_eq!(status, 429);
    assert_eq!(limited["error"], "rate_limited");

    let huge = "x".repeat(5 * 1024 * 1024 + 1);
    let (status, refused) = deliver(&app, &id, &headers(4), &huge).await;
    assert_eq!(status, 413);
    assert_eq!(refused["error"], "payload_too_large");
    // a body to a project that takes no webhooks is not read at all: the 404 comes first
    let (status, _) = deliver(
        &app,
        "0190a0a0-0000-7000-8000-000000000000",
        &headers(5),
        &huge,
    )
    .await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test]
async fn scheduled_syncs_run_back_off_pause_notify_and_resume() {
    let app = TestApp::spawn_with(|config| {
        config.min_sync_interval = Duration::from_secs(1);
        config.pause_after_failures = 2;
        config.scheduler_tick = Duration::from_millis(100);
    })
    .await;
    let mut socket = app.ws(&app.token, "").await;
    let repo = GitRepo::new();
    repo.write("README.md", "scheduled\n");
    let commit = repo.commit("first");
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "fresh", "repo_url": repo.url(), "sync_interval_s": 1}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    assert_eq!(created["sync_interval_s"], 1);
    let id = created["project_id"].as_str().expect("id").to_owned();

    // nobody asks: the scheduler syncs it, more than once
    let synced = wait_until(WAIT, || async {
        let syncs = app
            .get_json(&format!("/api/v1/repo/sync?project_id={id}"))
            .await
            .1;
        let done: Vec<&Value> = syncs
            .as_array()?
            .iter()
            .filter(|s| s["status"] == "completed" && s["trigger"] == "schedule")
            .collect();
        (done.len() >= 2).then(|| done[0].clone())
    })
    .await
    .expect("two scheduled syncs completed");
    assert_eq!(synced["commit"], commit.as_str());
    // each scheduled start is timed from its due time (the embedded claim used to
    // overwrite that before it was read, so every lag was 0)
    let metrics = app
        .get_public("/metrics")
        .await
        .text()
        .await
        .expect("metrics");
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        sample("hivesync_schedule_lag_seconds_count ") >= 2.0,
        "{metrics}"
    );
    assert!(
        sample("hivesync_schedule_lag_seconds_sum ") > 0.0,
        "scheduled syncs start after their due time, not at it"
    );
    let note = socket
        .until(|frame| crate::helpers::is_notification(frame, "repo_sync_success"))
        .await
        .pop()
        .expect("a success notification");
    assert_eq!(note["trigger"], "schedule", "{note}");
    let status = project(&app, &id).await;
    assert!(status["last_success_at"].is_string(), "{status}");
    assert!(status["last_error"].is_null());
    assert!(status["schedule"]["next_sync_at"].is_string());
    assert_eq!(status["schedule"]["paused"], false);

    // the remote goes away: two scheduled failures pause it, and the owner is told
    std::fs::rename(repo.path(), repo.path().with_extension("moved")).expect("move");
    let paused = socket
        .until(|frame| crate::helpers::is_notification(frame, "repo_sync_paused"))
        .await;
    let note = paused.last().expect("frame");
    assert_eq!(note["project_id"], id.as_str());
    let status = project(&app, &id).await;
    assert_eq!(status["schedule"]["paused"], true, "{status}");
    assert_eq!(status["schedule"]["paused_reason"], "repo_not_found");
    assert!(status["schedule"]["next_sync_at"].is_null());
    assert!(status["schedule"]["consecutive_failures"].as_u64() >= Some(2));
    assert_eq!(status["last_error"]["code"], "repo_not_found");
    assert!(status["last_error"]["at"].is_string());
    assert_ne!(status["last_attempt_at"], status["last_success_at"]);
    let mobile = app
        .get(
            "/api/v1/mobile/projects",
            &token("alice", ClientKind::Mobile),
        )
        .await
        .json::<Value>()
        .await
        .expect("json");
    assert_eq!(mobile[0]["schedule"]["paused"], true, "{mobile}");

    // paused: no scheduled sync runs; an on-demand one still does
    let count = |syncs: &Value| syncs.as_array().map(Vec::len).unwrap_or_default();
    let before = count(
        &app.get_json(&format!("/api/v1/repo/sync?project_id={id}"))
            .await
            .1,
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = count(
        &app.get_json(&format!("/api/v1/repo/sync?project_id={id}"))
            .await
            .1,
    );
    assert_eq!(before, after, "no scheduled sync while paused");
    let manual = app.sync_to_end(&id).await;
    assert_eq!(manual["trigger"], "api");
    assert_eq!(manual["status"], "failed");

    // the remote is back and the owner resumes: the schedule runs and succeeds again
    std::fs::rename(repo.path().with_extension("moved"), repo.path()).expect("move back");
    let response = app
        .post(
            &format!("/api/v1/projects/{id}/resume"),
            &app.token,
            json!({}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let resumed: Value = response.json().await.expect("json");
    assert_eq!(resumed["schedule"]["paused"], false);
    assert_eq!(resumed["schedule"]["consecutive_failures"], 0);
    let healthy = wait_until(WAIT, || async {
        let status = project(&app, &id).await;
        (status["last_error"].is_null() && status["last_status"] == "completed").then_some(status)
    })
    .await;
    assert!(healthy.is_some(), "a scheduled sync succeeded after resume");
    app.stop().await;
}

#[tokio::test]
async fn patch_changes_name_interval_and_credential_within_the_rules() {
    let app =
        TestApp::spawn_with(|config| config.min_sync_interval = Duration::from_secs(60)).await;
    let repo = GitRepo::new();
    repo.write("a", "a\n").commit("a");
    let id = app.register(&repo).await;

    let (status, body) = patch(&app, &id, json!({"sync_interval_s": 59})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = patch(
        &app,
        &id,
        json!({"sync_interval_s": 3600, "name": "renamed"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "renamed");
    assert_eq!(body["sync_interval_s"], 3600);
    assert!(body["schedule"]["next_sync_at"].is_string());
    let (status, body) = patch(&app, &id, json!({"sync_interval_s": null})).await;
    assert_eq!(status, 200);
    assert!(body["sync_interval_s"].is_null() && body["schedule"]["next_sync_at"].is_null());
    assert_eq!(body["name"], "renamed", "fields left out are unchanged");

    // a credential the policy does not grant is refused, as at registration
    let (status, body) = patch(&app, &id, json!({"credential": "deploy"})).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, _) = patch(&app, &id, json!({"owner": "mallory"})).await;
    assert_eq!(status, 400, "unknown fields are refused");
    let (status, _) = patch(&app, &id, json!({"name": ""})).await;
    assert_eq!(status, 400);

    let created = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "x", "repo_url": repo.url(), "sync_interval_s": 5}),
        )
        .await;
    assert_eq!(
        created.status(),
        400,
        "intervals under the floor are refused"
    );

    let other = token("mallory", ClientKind::Desktop);
    let response = app
        .http
        .patch(format!("{}/api/v1/projects/{id}", app.base))
        .bearer_auth(&other)
        .json(&json!({"name": "mine"}))
        .send()
        .await
        .expect("sent");
    // another user's project answers as an unknown one (v1.2): ids cannot be probed
    assert_eq!(response.status(), 404);
    for path in [
        format!("/api/v1/projects/{id}/resume"),
        format!("/api/v1/projects/{id}/webhook"),
    ] {
        assert_eq!(
            app.post(&path, &other, json!({})).await.status(),
            404,
            "{path}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn syncs_and_notifications_say_what_changed_including_rewrites() {
    let app = TestApp::spawn().await;
    let mut socket = app.ws(&app.token, "").await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a\n").write("b.txt", "b\n");
    let base = repo.commit("base");
    let id = app.register(&repo).await;
    let first = app.sync_to_end(&id).await;
    assert_eq!(first["trigger"], "api");
    assert!(
        first["changes"]["commits"].is_null(),
        "a first sync: {first}"
    );
    assert_eq!(first["changes"]["files_changed"], 2);

    repo.write("a.txt", "a2\n").commit("one");
    repo.write("c.txt", "c\n").commit("two");
    repo.git(&["rm", "-q", "b.txt"]);
    let head = repo.commit("three");
    let second = app.sync_to_end(&id).await;
    assert_eq!(second["previous_commit"], base.as_str());
    assert_eq!(second["commit"], head.as_str());
    assert_eq!(
        second["changes"],
        json!({"commits": 3, "forced": false, "files_changed": 3})
    );
    let note = socket
        .until(|frame| {
            crate::helpers::is_notification(frame, "repo_sync_success")
                && frame["sync_id"] == second["sync_id"]
        })
        .await
        .pop()
        .expect("frame");
    assert_eq!(note["previous_commit"], base.as_str());
    assert_eq!(note["changes"], second["changes"]);
    assert_eq!(
        note["trigger"], "api",
        "notifications say what started the sync"
    );

    // history rewritten upstream: back to base, one new commit
    repo.git(&["reset", "-q", "--hard", &base]);
    repo.write("d.txt", "d\n");
    repo.commit("rewritten");
    let third = app.sync_to_end(&id).await;
    assert_eq!(third["changes"]["forced"], true, "{third}");
    assert_eq!(third["changes"]["commits"], 1);

    let unchanged = app.sync_to_end(&id).await;
    assert_eq!(
        unchanged["changes"],
        json!({"commits": 0, "forced": false, "files_changed": 0})
    );
    app.stop().await;
}

#[tokio::test]
async fn metadata_is_for_every_client_class_and_has_no_contents() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("src/lib.rs", "pub fn x() {}\n")
        .write("README.md", "hello metadata\n");
    let commit = repo.commit("Add the library\n\nA longer body that is not the subject.");
    let id = app.register(&repo).await;
    let mobile = token("alice", ClientKind::Mobile);
    let path = format!("/api/v1/repo/metadata?project_id={id}");
    let before = app.get(&path, &mobile).await;
    assert_eq!(before.status(), 404, "no completed sync yet");
    app.sync_to_end(&id).await;

    let response = app.get(&path, &mobile).await;
    assert_eq!(response.status(), 200);
    let meta: Value = response.json().await.expect("json");
    assert_eq!(meta["commit"], commit.as_str());
    assert_eq!(meta["branch"], "main");
    assert_eq!(meta["subject"], "Add the library");
    assert!(
        meta["author"].as_str().is_some_and(|a| !a.is_empty()),
        "{meta}"
    );
    assert!(
        meta["committed_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z'))
    );
    assert_eq!(meta["files"], 2);
    assert_eq!(meta["bytes"], 14 + 15);
    assert!(meta["last_success_at"].is_string());
    assert!(!meta.to_string().contains("hello metadata"), "no contents");
    let other = token("mallory", ClientKind::Mobile);
    assert_eq!(app.get(&path, &other).await.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn two_hubs_on_one_redis_sync_each_due_project_once() {
    if let Some(redis) = crate::redis_server::redis_or_skip() {
        two_hubs_on_one_redis_sync_each_due_project_once_on(redis).await;
    }
}

#[tokio::test]
async fn on_a_cluster_two_hubs_on_one_redis_sync_each_due_project_once() {
    if let Some(redis) = crate::redis_server::redis_cluster_or_skip() {
        two_hubs_on_one_redis_sync_each_due_project_once_on(redis).await;
    }
}

async fn two_hubs_on_one_redis_sync_each_due_project_once_on(
    redis: crate::redis_server::RedisServer,
) {
    let prefix = crate::redis_server::unique_prefix();
    let hub = || {
        let (url, cluster, prefix) = (redis.url(), redis.cluster, prefix.clone());
        TestApp::spawn_with(move |config| {
            config.redis_url = Some(url);
            config.redis_cluster = cluster;
            config.redis_prefix = prefix;
            config.serve_workers = Some(2);
            config.min_sync_interval = Duration::from_secs(60);
            config.scheduler_tick = Duration::from_millis(50);
        })
    };
    let (first, second) = (hub().await, hub().await);
    let repos: Vec<GitRepo> = (0..12)
        .map(|n| {
            let repo = GitRepo::new();
            repo.write("n", &format!("{n}\n")).commit("n");
            repo
        })
        .collect();
    let mut ids = Vec::new();
    for (n, repo) in repos.iter().enumerate() {
        let app = if n % 2 == 0 { &first } else { &second };
        let response = app
            .post(
                "/api/v1/projects",
                &app.token,
                json!({"name": "due", "repo_url": repo.url(), "sync_interval_s": 3600}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("json");
        ids.push(body["project_id"].as_str().expect("id").to_owned());
    }
    // both schedulers tick every 50 ms over the same due set
    for id in &ids {
        let done = wait_until(WAIT, || async {
            let status = project(&first, id).await;
            (status["last_status"] == "completed").then_some(())
        })
        .await;
        assert!(done.is_some(), "project {id} was synced by the schedule");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        let syncs = first
            .get_json(&format!("/api/v1/repo/sync?project_id={id}"))
            .await
            .1;
        let syncs = syncs.as_array().expect("list");
        assert_eq!(syncs.len(), 1, "one scheduled sync of {id}: {syncs:?}");
        assert_eq!(syncs[0]["trigger"], "schedule");
    }
    first.stop().await;
    second.stop().await;
}
