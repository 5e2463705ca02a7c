use hivesync::auth::ClientKind;
use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, token};

#[tokio::test]
async fn registered_project_is_listed_and_readable_only_by_its_owner() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "demo", "repo_url": repo.url(), "branch": "main"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    assert_eq!(created["name"], "demo");
    assert_eq!(created["branch"], "main");
    assert_eq!(created["owner"], "alice");
    assert_eq!(created["repo_url"], repo.url());
    assert!(
        created["created_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z'))
    );
    let id = created["project_id"].as_str().expect("id");

    let listed: Vec<Value> = app
        .get("/api/v1/projects", &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["project_id"], id);

    let fetched: Value = app
        .get(&format!("/api/v1/projects/{id}"), &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(fetched["project_id"], id);

    let bob = token("bob", ClientKind::Desktop);
    let bobs: Vec<Value> = app
        .get("/api/v1/projects", &bob)
        .await
        .json()
        .await
        .expect("json");
    assert!(bobs.is_empty(), "bob sees none of alice's projects");
    // another user's project answers exactly as an unknown id (v1.2)
    let theirs = app.get(&format!("/api/v1/projects/{id}"), &bob).await;
    assert_eq!(theirs.status(), 404);
    let body: Value = theirs.json().await.expect("json");
    let unknown = app
        .get(
            "/api/v1/projects/0190a0a0-0000-7000-8000-000000000000",
            &bob,
        )
        .await;
    assert_eq!(unknown.status(), 404);
    let unknown: Value = unknown.json().await.expect("json");
    assert_eq!(body["error"], "project_not_found");
    assert_eq!(body, unknown, "nothing tells the two apart");
    assert_eq!(
        app.delete(&format!("/api/v1/projects/{id}"), &bob)
            .await
            .status(),
        404
    );
    app.stop().await;
}

#[tokio::test]
async fn branch_defaults_to_main_and_userinfo_is_refused_without_being_shown_back() {
    let app = TestApp::spawn().await;
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "secretive", "repo_url": "https://deploy:hunter2token@example.com/org/repo.git"}),
        )
        .await;
    assert_eq!(
        response.status(),
        400,
        "a token in the URL would be stored in plain text"
    );
    let text = response.text().await.expect("body");
    assert!(
        !text.contains("hunter2token") && !text.contains("deploy@"),
        "userinfo leaked: {text}"
    );
    let refused: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(refused["error"], "invalid_request");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("credential")),
        "the message points to credentials: {refused}"
    );
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "plain", "repo_url": "https://example.com/org/repo.git"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    assert_eq!(created["repo_url"], "https://example.com/org/repo.git");
    assert_eq!(created["branch"], "main");
    let listed = app
        .get("/api/v1/projects", &app.token)
        .await
        .text()
        .await
        .expect("body");
    assert!(!listed.contains("hunter2token"));
    app.stop().await;
}

#[tokio::test]
async fn deleting_a_project_removes_it_and_its_mirror() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a");
    repo.commit("one");
    let id = app.register(&repo).await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed");
    assert!(app.worktree(&id).exists());

    let deleted = app
        .delete(&format!("/api/v1/projects/{id}"), &app.token)
        .await;
    assert_eq!(deleted.status(), 204);
    assert!(!app.worktree(&id).exists(), "mirror removed");
    assert!(
        !app.data_dir.join("git").join(format!("{id}.git")).exists(),
        "repository removed"
    );
    let gone = app.get(&format!("/api/v1/projects/{id}"), &app.token).await;
    assert_eq!(gone.status(), 404);
    let body: Value = gone.json().await.expect("json");
    assert_eq!(body["error"], "project_not_found");
    let sync_gone = app
        .get(
            &format!(
                "/api/v1/repo/sync/{}",
                record["sync_id"].as_str().expect("id")
            ),
            &app.token,
        )
        .await;
    assert_eq!(sync_gone.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn mobile_projects_are_metadata_only() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("README.md", "secret source");
    let commit = repo.commit("one");
    let id = app.register(&repo).await;
    app.sync_to_end(&id).await;

    let mobile = token("alice", ClientKind::Mobile);
    let response = app.get("/api/v1/mobile/projects", &mobile).await;
    assert_eq!(response.status(), 200);
    let projects: Vec<Value> = response.json().await.expect("json");
    assert_eq!(projects.len(), 1);
    let project = projects[0].as_object().expect("object");
    let mut keys: Vec<_> = project.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "branch",
            "commit",
            "last_attempt_at",
            "last_error",
            "last_status",
            "last_success_at",
            "last_synced_at",
            "name",
            "project_id",
            "schedule",
            "sync_interval_s",
        ]
    );
    assert_eq!(project["commit"], commit.as_str());
    assert_eq!(project["last_status"], "completed");
    assert!(project["last_synced_at"].is_string());
    app.stop().await;
}
