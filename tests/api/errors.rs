use std::time::Duration;

use hivesync::auth::{Claims, ClientKind};
use serde_json::{Value, json};

use crate::helpers::{SECRET, TestApp, token};

async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("error bodies are JSON");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
        body["message"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn missing_bad_and_expired_tokens_are_told_apart() {
    let app = TestApp::spawn().await;
    let no_token = app
        .http
        .get(format!("{}/api/v1/projects", app.base))
        .send()
        .await
        .expect("sent");
    let (status, code, _) = error_of(no_token).await;
    assert_eq!((status, code.as_str()), (401, "invalid_token"));

    let (status, code, _) = error_of(app.get("/api/v1/projects", "garbage").await).await;
    assert_eq!((status, code.as_str()), (401, "invalid_token"));

    let foreign = hivesync::auth::Authenticator::from_secret(b"another-key")
        .mint("alice", ClientKind::Desktop, Duration::from_secs(60))
        .expect("mint");
    let (status, code, _) = error_of(app.get("/api/v1/projects", &foreign).await).await;
    assert_eq!((status, code.as_str()), (401, "invalid_token"));

    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            sub: "alice".into(),
            exp: 1_000_000,
            client: Some(ClientKind::Desktop),
        },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode");
    let (status, code, _) = error_of(app.get("/api/v1/projects", &expired).await).await;
    assert_eq!((status, code.as_str()), (401, "token_expired"));
    app.stop().await;
}

#[tokio::test]
async fn malformed_bodies_are_invalid_request_not_a_fallthrough() {
    let app = TestApp::spawn().await;
    let raw = |body: &'static str| {
        app.http
            .post(format!("{}/api/v1/projects", app.base))
            .bearer_auth(&app.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in [
        "{not json",
        "",
        "[]",
        r#"{"name": "x"}"#,
        r#"{"name": 5, "repo_url": "file:///tmp"}"#,
    ] {
        let (status, code, message) = error_of(raw(body).await.expect("sent")).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_request"),
            "body {body:?}: {message}"
        );
    }
    let bad_sync = app
        .http
        .post(format!("{}/api/v1/repo/sync", app.base))
        .bearer_auth(&app.token)
        .body("{")
        .send()
        .await
        .expect("sent");
    assert_eq!(error_of(bad_sync).await.1, "invalid_request");
    app.stop().await;
}

#[tokio::test]
async fn bad_fields_are_refused_with_a_reason() {
    let app = TestApp::spawn_with(|config| {
        config.allowed_schemes = vec!["https".into()];
        config.allow_private_hosts = false;
    })
    .await;
    let cases = [
        json!({"name": "x", "repo_url": "file:///etc"}),
        json!({"name": "x", "repo_url": "ext::sh -c touch% /tmp/pwned"}),
        json!({"name": "x", "repo_url": "https://127.0.0.1/repo.git"}),
        json!({"name": "x", "repo_url": "https://10.0.0.8/repo.git"}),
        json!({"name": "x", "repo_url": "https://localhost/repo.git"}),
        json!({"name": "", "repo_url": "https://example.com/r.git"}),
        json!({"name": "x", "repo_url": "https://example.com/r.git", "branch": "../../evil"}),
        json!({"name": "x", "repo_url": "https://example.com/r.git", "branch": "a..b"}),
        json!({"name": "x", "repo_url": "https://example.com/r.git", "credential": "../etc/passwd"}),
    ];
    for body in cases {
        let (status, code, message) =
            error_of(app.post("/api/v1/projects", &app.token, body.clone()).await).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{body}");
        assert!(!message.is_empty());
    }
    app.stop().await;
}

#[tokio::test]
async fn bodies_over_64_kib_are_refused_with_413() {
    let app = TestApp::spawn().await;
    let big = format!(
        r#"{{"name": "{}", "repo_url": "file:///tmp/x"}}"#,
        "x".repeat(70 * 1024)
    );
    let declared = app
        .http
        .post(format!("{}/api/v1/projects", app.base))
        .bearer_auth(&app.token)
        .body(big.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(error_of(declared).await.0, 413);

    // chunked: no Content-Length to go by, so the stream itself is capped
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(8192)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let chunked = app
        .http
        .post(format!("{}/api/v1/projects", app.base))
        .bearer_auth(&app.token)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("sent");
    let (status, code, _) = error_of(chunked).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = TestApp::spawn().await;
    let (status, code, _) = error_of(app.get("/api/v1/nope", &app.token).await).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let wrong_method = app
        .http
        .put(format!("{}/api/v1/projects", app.base))
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("sent");
    let (status, code, _) = error_of(wrong_method).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code, _) =
        error_of(app.get("/api/v1/projects/not-a-uuid", &app.token).await).await;
    assert_eq!((status, code.as_str()), (404, "project_not_found"));
    let (status, code, _) =
        error_of(app.get("/api/v1/repo/sync/not-a-uuid", &app.token).await).await;
    assert_eq!((status, code.as_str()), (404, "sync_not_found"));
    let (status, code, _) = error_of(
        app.get("/api/v1/repo/sync?project_id=x&limit=0", &app.token)
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    let (status, code, _) =
        error_of(app.get("/api/v1/notifications?after=abc", &app.token).await).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    app.stop().await;
}

#[tokio::test]
async fn sync_requests_over_the_rate_get_429_with_retry_after() {
    let app = TestApp::spawn_with(|config| {
        config.sync_rate = (2, Duration::from_secs(60));
        config.serve_workers = Some(0);
    })
    .await;
    let repo = crate::helpers::GitRepo::new();
    repo.commit("one");
    let id = app.register(&repo).await;
    for _ in 0..2 {
        let ok = app
            .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
            .await;
        assert!(ok.status().is_success());
    }
    let limited = app
        .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
        .await;
    let retry_after: u64 = limited
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After header in seconds");
    assert!((1..=30).contains(&retry_after), "retry after {retry_after}");
    let (status, code, _) = error_of(limited).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    // the limit is per user
    let bob = token("bob", ClientKind::Desktop);
    let bobs = app.register_as(&bob, &repo).await;
    assert!(
        app.post("/api/v1/repo/sync", &bob, json!({"project_id": bobs}))
            .await
            .status()
            .is_success()
    );
    app.stop().await;
}

#[tokio::test]
async fn free_space_under_the_floor_is_507_before_any_work() {
    let app = TestApp::spawn_with(|config| config.min_free_bytes = u64::MAX).await;
    let repo = crate::helpers::GitRepo::new();
    repo.commit("one");
    let id = app.register(&repo).await;
    let (status, code, _) = error_of(
        app.post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (507, "storage_full"));
    let syncs: Vec<Value> = app
        .get(&format!("/api/v1/repo/sync?project_id={id}"), &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert!(syncs.is_empty(), "no sync was queued");
    let ready = app
        .http
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .expect("sent");
    assert_eq!(ready.status(), 503, "not ready under the floor");
    app.stop().await;
}
