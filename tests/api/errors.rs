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
    let no_token = app.get_public("/api/v1/projects").await;
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
            iat: None,
            nbf: None,
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
    // a refusal an operator can lift names the setting that lifts it
    for (url, setting) in [
        ("file:///etc", "HIVESYNC_ALLOWED_SCHEMES"),
        ("https://127.0.0.1/repo.git", "HIVESYNC_ALLOW_PRIVATE_HOSTS"),
    ] {
        let body = json!({"name": "x", "repo_url": url});
        let (_, _, message) = error_of(app.post("/api/v1/projects", &app.token, body).await).await;
        assert!(message.contains(setting), "{url}: {message}");
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
    // the contract's error table has no 405: an unknown method is an unknown route
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
    let ready = app.get_public("/readyz").await;
    assert_eq!(ready.status(), 503, "not ready under the floor");
    app.stop().await;
}

/// Generates a key pair with the openssl CLI: (private PEM, public PEM).
fn key_pair(algorithm: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let private = dir.path().join("private.pem");
    let public = dir.path().join("public.pem");
    let generated = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(algorithm)
        .arg("-out")
        .arg(&private)
        .output()
        .expect("openssl runs");
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let extracted = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .expect("openssl runs");
    assert!(extracted.status.success());
    (
        std::fs::read_to_string(private).expect("private key"),
        std::fs::read_to_string(public).expect("public key"),
    )
}

#[tokio::test]
async fn tokens_signed_by_an_identity_provider_verify_with_its_public_key() {
    let cases: [(&[&str], jsonwebtoken::Algorithm); 2] = [
        (&["-algorithm", "ed25519"], jsonwebtoken::Algorithm::EdDSA),
        (
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            jsonwebtoken::Algorithm::RS256,
        ),
    ];
    for (algorithm, jwt_algorithm) in cases {
        let (private, public) = key_pair(algorithm);
        let key_file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(key_file.path(), &public).expect("write key");
        let key_path = key_file.path().display().to_string();
        let app = TestApp::spawn_with(|config| {
            config.jwt_secret = None;
            config.jwt_public_key = Some(key_path);
        })
        .await;
        let encoding = match jwt_algorithm {
            jsonwebtoken::Algorithm::EdDSA => {
                jsonwebtoken::EncodingKey::from_ed_pem(private.as_bytes())
            }
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(private.as_bytes()),
        }
        .expect("private key parses");
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 600;
        let signed = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jwt_algorithm),
            &Claims {
                sub: "idp-user".into(),
                exp,
                client: Some(ClientKind::Plugin),
                iat: None,
                nbf: None,
            },
            &encoding,
        )
        .expect("sign");
        let accepted = app.get("/api/v1/projects", &signed).await;
        assert_eq!(accepted.status(), 200, "{jwt_algorithm:?}");
        // an HS256 token made with a guessed secret must not pass for the key's algorithm
        let forged = token("idp-user", ClientKind::Desktop);
        let (status, code, _) = error_of(app.get("/api/v1/projects", &forged).await).await;
        assert_eq!((status, code.as_str()), (401, "invalid_token"));
        app.stop().await;
    }
}

/// Sends `request` as raw bytes and returns the status and the body of the answer.
async fn raw_exchange(app: &TestApp, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    // the server may answer and close before it has read everything we send
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn requests_refused_before_routing_get_json_bodies_too() {
    let app = TestApp::spawn().await;
    let mut many_headers = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for index in 0..300 {
        many_headers.push_str(&format!("x-filler-{index}: {}\r\n", "v".repeat(20)));
    }
    many_headers.push_str("\r\n");
    let long_uri = format!(
        "GET /api/v1/projects?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(70_000)
    );
    for (what, request, status) in [
        ("too many headers", many_headers.into_bytes(), 431),
        ("a URI too long", long_uri.into_bytes(), 414),
        (
            "a malformed request line",
            b"NOT A REQUEST\r\n\r\n".to_vec(),
            400,
        ),
    ] {
        let (got, body) = raw_exchange(&app, &request).await;
        assert_eq!(got, status, "{what}: {body}");
        let body: Value = serde_json::from_str(&body)
            .unwrap_or_else(|err| panic!("{what}: body {body:?} is not JSON: {err}"));
        assert_eq!(body["error"], "invalid_request", "{what}");
        assert!(body["message"].is_string(), "{what}");
    }
    app.stop().await;
}

#[tokio::test]
async fn badly_percent_encoded_parameters_are_invalid_not_decoded_lossily() {
    let app = TestApp::spawn().await;
    for path in [
        "/api/v1/repo/tree?project_id=x&path=%ff",
        "/api/v1/repo/search?project_id=x&q=%zz",
        "/api/v1/notifications?after=%",
        "/api/v1/repo/sync?project_id=%C3",
    ] {
        let (status, code, message) = error_of(app.get(path, &app.token).await).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_request"),
            "{path}: {message}"
        );
    }
    app.stop().await;
}

/// Found by schemathesis: serde takes a struct as an array of its fields, and event
/// ids past i64 (which Redis cannot hand out) were taken as resume points.
#[tokio::test]
async fn bodies_are_objects_and_event_ids_fit_the_engines() {
    let app = TestApp::spawn().await;
    let as_array = app
        .post("/api/v1/repo/sync", &app.token, json!(["some-project"]))
        .await;
    let (status, code, message) = error_of(as_array).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(message.contains("JSON object"), "{message}");
    let too_big = app
        .get(
            "/api/v1/notifications?after=9223372036854775808",
            &app.token,
        )
        .await;
    let (status, code, _) = error_of(too_big).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    let largest = app
        .get(
            "/api/v1/notifications?after=9223372036854775807",
            &app.token,
        )
        .await;
    assert_eq!(largest.status(), 200);
    app.stop().await;
}
