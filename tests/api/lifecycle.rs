use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{GitRepo, SECRET, TestApp, WsRead, assert_exact_tree, wait_until};

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = TestApp::spawn().await;
    let health = app.get_public("/healthz").await;
    assert_eq!(health.status(), 200);
    let ready = app.get_public("/readyz").await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["engine"], true);
    assert_eq!(body["data_dir_writable"], true);
    let metrics = app.get_public("/metrics").await;
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics
            .text()
            .await
            .expect("text")
            .contains("hivesync_ws_connections 0")
    );
    app.stop().await;
}

#[tokio::test]
async fn projects_syncs_and_history_survive_a_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let repo = GitRepo::new();
    repo.write("f", "1");
    let commit = repo.commit("one");

    let app = TestApp::spawn_on(data.path(), |_| {}).await;
    let id = app.register(&repo).await;
    let record = app.sync_to_end(&id).await;
    let events: Vec<Value> = app
        .get("/api/v1/notifications", &app.token)
        .await
        .json()
        .await
        .expect("json");
    app.stop().await;

    let app = TestApp::spawn_on(data.path(), |_| {}).await;
    let project: Value = app
        .get(&format!("/api/v1/projects/{id}"), &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(project["commit"], commit.as_str());
    let again: Value = app
        .get(
            &format!(
                "/api/v1/repo/sync/{}",
                record["sync_id"].as_str().expect("id")
            ),
            &app.token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(again, record);
    let events_after: Vec<Value> = app
        .get("/api/v1/notifications", &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(events_after, events);
    assert_exact_tree(&app, &id, &repo, &commit);

    // ids keep increasing across the restart
    let last = events.last().expect("events")["id"].as_u64().expect("id");
    let mut socket = app.ws(&app.token, &format!("?last_event_id={last}")).await;
    assert_eq!(socket.next_json().await["last_event_id"], last);
    app.request_sync(&id).await;
    let next = socket.next_json().await;
    assert_eq!(next["id"], last + 1);
    app.stop().await;
}

#[tokio::test]
async fn a_sync_queued_at_shutdown_runs_after_the_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let repo = GitRepo::new();
    repo.write("f", "1");
    let commit = repo.commit("one");
    let app = TestApp::spawn_on(data.path(), |config| config.serve_workers = Some(0)).await;
    let id = app.register(&repo).await;
    let sync_id = app.request_sync(&id).await["sync_id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.stop().await;

    let app = TestApp::spawn_on(data.path(), |_| {}).await;
    let record = app.wait_for_sync(&sync_id).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["commit"], commit.as_str());
    app.stop().await;
}

#[tokio::test]
async fn shutdown_sends_sockets_a_close_frame_and_returns() {
    let app = TestApp::spawn().await;
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    let shutdown = app.shutdown_token();
    shutdown.cancel();
    match socket.read(Duration::from_secs(10)).await {
        Some(WsRead::Closed(code)) => assert_eq!(code, Some(1001)),
        other => panic!("expected a close frame, got {other:?}"),
    }
    app.stop().await;
}

/// A client of a hub binary, acting as alice, that keeps every response body it got so
/// a test can scan them all for a secret.
pub(crate) struct Recorded {
    client: reqwest::Client,
    base: String,
    token: String,
    pub seen: String,
}

impl Recorded {
    pub(crate) fn new(addr: &str) -> Self {
        Self {
            client: hivesync::tls::http_client(),
            base: format!("http://{addr}"),
            token: crate::helpers::token("alice", hivesync::auth::ClientKind::Desktop),
            seen: String::new(),
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> String {
        let text = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("sent")
            .text()
            .await
            .expect("body");
        self.seen.push_str(&text);
        text
    }

    pub(crate) async fn post(&mut self, path: &str, body: Value) -> Value {
        let text = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("sent")
            .text()
            .await
            .expect("body");
        self.seen.push_str(&text);
        serde_json::from_str(&text).expect("json")
    }

    /// Registers `repo_url` (with `extra` fields), requests a sync and polls it until it
    /// is `completed` or `failed`; returns the project id and the final record's text.
    pub(crate) async fn sync_new_project(
        &mut self,
        repo_url: &str,
        extra: Value,
    ) -> (String, String) {
        let mut body = json!({"name": "scanned", "repo_url": repo_url});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let project = self.post("/api/v1/projects", body).await;
        let id = project["project_id"].as_str().expect("id").to_owned();
        let record = self.sync_to_end(&id).await;
        (id, record)
    }

    /// Requests a sync of project `id` and polls it until it is `completed` or
    /// `failed`; returns the final record's text.
    pub(crate) async fn sync_to_end(&mut self, id: &str) -> String {
        let accepted = self
            .post("/api/v1/repo/sync", json!({"project_id": id}))
            .await;
        let path = format!(
            "/api/v1/repo/sync/{}",
            accepted["sync_id"].as_str().expect("id")
        );
        let record = wait_until(crate::helpers::WAIT, || async {
            let text = self
                .client
                .get(format!("{}{path}", self.base))
                .bearer_auth(&self.token)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (text.contains("\"completed\"") || text.contains("\"failed\"")).then_some(text)
        })
        .await
        .expect("the sync ends");
        self.seen.push_str(&record);
        record
    }
}

/// Starts `hivesync serve` on 127.0.0.1:0 and returns it with the address it printed.
pub(crate) async fn serve_binary(
    data_dir: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> (std::process::Child, String) {
    serve_binary_logging_to(data_dir, extra_env, Stdio::piped()).await
}

/// Stops a served binary with SIGTERM (its drain runs) and waits for it to exit.
pub(crate) fn terminate(child: &mut std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let _ = child.wait();
}

/// [`serve_binary`] with its log (stderr) going to `log`.
pub(crate) async fn serve_binary_logging_to(
    data_dir: &std::path::Path,
    extra_env: &[(&str, &str)],
    log: Stdio,
) -> (std::process::Child, String) {
    let mut command = binary();
    command
        .arg("serve")
        .env("HIVESYNC_LISTEN", "127.0.0.1:0")
        .env("HIVESYNC_JWT_SECRET", SECRET)
        .env("HIVESYNC_DATA_DIR", data_dir)
        .env("HIVESYNC_MIN_FREE_BYTES", "0")
        .env("HIVESYNC_FILE_ROOTS", std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(log);
    for (name, value) in extra_env {
        command.env(name, value);
    }
    let mut server = command.spawn().expect("serve starts");
    let stdout = server.stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("hivesync serving on http://")
                    .map(str::to_owned)
            })
    })
    .await
    .expect("reader")
    .expect("serve prints its address");
    (server, addr)
}

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hivesync"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info");
    command
}

#[tokio::test]
async fn the_binary_serves_mints_tokens_and_exits_zero_on_sigterm() {
    let data = tempfile::tempdir().expect("temp dir");
    let minted = binary()
        .args([
            "token", "--sub", "carol", "--client", "plugin", "--ttl", "10m",
        ])
        .env("HIVESYNC_JWT_SECRET", SECRET)
        .env("HIVESYNC_DATA_DIR", data.path())
        .output()
        .expect("token runs");
    assert!(minted.status.success());
    let token = String::from_utf8(minted.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let principal = hivesync::auth::Authenticator::from_secret(SECRET.as_bytes())
        .verify(&token)
        .expect("valid token");
    assert_eq!(principal.user, "carol");

    let worker = binary().arg("worker").output().expect("worker runs");
    assert!(
        !worker.status.success(),
        "worker without Redis must not pretend to run"
    );
    assert!(String::from_utf8_lossy(&worker.stderr).contains("HIVESYNC_REDIS_URL"));

    let (mut server, addr) = serve_binary(data.path(), &[]).await;
    let client = hivesync::tls::http_client();
    let up = wait_until(Duration::from_secs(20), || async {
        let response = client
            .get(format!("http://{addr}/api/v1/projects"))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(up.is_some(), "the binary serves the API");
    let created = client
        .post(format!("http://{addr}/api/v1/projects"))
        .bearer_auth(&token)
        .json(&json!({"name": "x", "repo_url": "https://example.com/r.git"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(created.status(), 201);

    let terminated = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(terminated.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve exits after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    use std::io::Read;
    server
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("read logs");
    assert!(!logs.contains(&token), "the token never appears in logs");
}

#[tokio::test]
async fn credentials_in_a_repo_url_never_reach_logs_responses_or_events() {
    const SECRET_TOKEN: &str = "ghp-S3CRET-do-not-leak-7731";
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let data = tempfile::tempdir().expect("temp dir");
    let url = format!("https://deploy:{SECRET_TOKEN}@127.0.0.1:{port}/org/repo.git");
    // registered before URLs with credentials were refused: such a project is still in
    // the store and still synced
    let id = {
        let store = hivesync::engine::embedded::EmbeddedEngine::open(
            data.path(),
            (100, std::time::Duration::from_secs(60)),
            1000,
        )
        .expect("store");
        let legacy = crate::helpers::stored_project("alice", "legacy", &url);
        hivesync::engine::Store::insert_project(store.as_ref(), &legacy)
            .await
            .expect("inserted");
        legacy.project_id
    };
    let (mut server, addr) = serve_binary(
        data.path(),
        &[
            ("HIVESYNC_ALLOW_PRIVATE_HOSTS", "1"),
            ("HIVESYNC_RETRY_MAX", "2"),
            ("HIVESYNC_RETRY_BASE_MS", "10"),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let mut recorded = Recorded::new(&addr);
    let refused = recorded
        .post("/api/v1/projects", json!({"name": "new", "repo_url": url}))
        .await;
    assert_eq!(
        refused["error"], "invalid_request",
        "a URL with credentials is refused at registration: {refused}"
    );
    let record = recorded.sync_to_end(id.as_str()).await;
    assert!(
        record.contains("\"failed\""),
        "nothing listens there: {record}"
    );
    for path in [
        "/api/v1/projects".to_owned(),
        "/api/v1/notifications?after=0".to_owned(),
        "/api/v1/mobile/projects".to_owned(),
        format!("/api/v1/repo/sync?project_id={id}"),
    ] {
        recorded.get(&path).await;
    }
    let seen = recorded.seen;
    assert!(
        seen.contains("repo_sync_failed"),
        "the failure reached the event history: {seen}"
    );

    terminate(&mut server);
    let mut logs = String::new();
    use std::io::Read;
    server
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("logs");
    assert!(
        logs.contains("sync failed"),
        "the failure is logged: {logs}"
    );
    assert!(
        !seen.contains(SECRET_TOKEN),
        "a response carried the secret: {seen}"
    );
    assert!(
        !logs.contains(SECRET_TOKEN),
        "the log carried the secret: {logs}"
    );
}

/// The binary's log as an operator reads it from a file: plain text with no colour
/// codes by default, and one JSON object per line with `HIVESYNC_LOG_FORMAT=json`.
#[tokio::test]
async fn logs_are_plain_text_in_files_or_one_json_object_per_line() {
    for format in ["text", "json"] {
        let data = tempfile::tempdir().expect("temp dir");
        let log_path = data.path().join("serve.log");
        let (mut child, addr) = serve_binary_logging_to(
            data.path(),
            &[
                ("HIVESYNC_LOG_FORMAT", format),
                ("HIVESYNC_ALLOWED_SCHEMES", "file"),
                ("RUST_LOG", "info"),
            ],
            std::fs::File::create(&log_path).expect("log file").into(),
        )
        .await;
        let repo = crate::helpers::GitRepo::new();
        repo.write("README.md", "logged\n").commit("first");
        let mut recorded = Recorded::new(&addr);
        recorded
            .sync_new_project(&repo.url(), serde_json::json!({}))
            .await;
        terminate(&mut child);
        let logs = std::fs::read_to_string(&log_path).expect("log");
        assert!(logs.contains("sync completed"), "{format}: {logs}");
        assert!(
            !logs.contains('\u{1b}'),
            "{format}: no terminal escape codes in a file: {logs:?}"
        );
        if format == "json" {
            for line in logs.lines().filter(|line| !line.trim().is_empty()) {
                let entry: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("not one JSON object per line ({err}): {line}"));
                for field in ["timestamp", "level", "target", "fields"] {
                    assert!(entry.get(field).is_some(), "{field} missing: {line}");
                }
                assert!(entry["fields"]["message"].is_string(), "{line}");
            }
            let completed = logs
                .lines()
                .find(|line| line.contains("sync completed"))
                .expect("logged");
            let entry: serde_json::Value = serde_json::from_str(completed).expect("json");
            assert!(
                entry["fields"]["sync_id"].is_string(),
                "fields kept: {completed}"
            );
        }
    }
}

/// `serve --help` names every variable it reads, with its default.
#[test]
fn serve_help_lists_every_variable_with_its_default() {
    let output = binary()
        .args(["serve", "--help"])
        .output()
        .expect("help runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let source = include_str!("../../src/config/mod.rs");
    let variables: Vec<&str> = source
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(variables.len() > 30, "{variables:?}");
    for variable in &variables {
        assert!(help.contains(variable), "{variable} is not in serve --help");
    }
    assert!(help.contains("HIVESYNC_DRAIN_TIMEOUT_S"));
    // every variable whose default is not "unset" says what it is
    let defaults = help.matches("[default:").count();
    assert!(defaults >= 28, "{defaults} defaults listed:\n{help}");
}
