//! Test harness: the real application on 127.0.0.1:0, real git repositories in temp
//! dirs served as `file://` remotes, and a real WebSocket client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hivesync::app::Application;
use hivesync::auth::{Authenticator, ClientKind};
use hivesync::config::Config;
use hivesync::http::AppState;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "integration-test-secret";
pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestApp {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub http: reqwest::Client,
    pub token: String,
    pub data_dir: PathBuf,
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<()>,
    _data: Option<tempfile::TempDir>,
}

pub fn test_config(data_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        data_dir: data_dir.to_path_buf(),
        jwt_secret: Some(SECRET.to_owned()),
        allowed_schemes: vec!["file".to_owned(), "https".to_owned(), "ssh".to_owned()],
        allow_private_hosts: true,
        // the test repositories live in temp dirs; DATA_DIR is refused anyway
        file_roots: vec![std::env::temp_dir()],
        min_free_bytes: 0,
        sync_rate: (10_000, Duration::from_secs(60)),
        static_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("static"),
        drain_timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

pub fn token(user: &str, client: ClientKind) -> String {
    Authenticator::from_secret(SECRET.as_bytes())
        .mint(user, client, Duration::from_secs(3600))
        .expect("mint a test token")
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(data.path());
        adjust(&mut config);
        Self::start(config, Some(data)).await
    }

    /// Starts on a data dir that outlives the app (restart tests).
    pub async fn spawn_on(data_dir: &Path, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(data_dir);
        adjust(&mut config);
        Self::start(config, None).await
    }

    async fn start(config: Config, data: Option<tempfile::TempDir>) -> Self {
        let application = Application::build(config)
            .await
            .expect("application builds");
        let addr = application.local_addr();
        let state = Arc::clone(application.state());
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(application.run(shutdown.clone()));
        Self {
            base: format!("http://{addr}"),
            addr,
            http: hivesync::tls::http_client(),
            token: token("alice", ClientKind::Desktop),
            data_dir: state.config.data_dir.clone(),
            state,
            shutdown,
            running,
            _data: data,
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.running)
            .await
            .expect("app stops in time")
            .expect("run does not panic");
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent")
    }

    /// A GET with the app's own token: status and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path, &self.token).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    }

    /// A GET without a token (health, readiness, metrics).
    pub async fn get_public(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("sent")
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn register(&self, repo: &GitRepo) -> String {
        self.register_as(&self.token, repo).await
    }

    pub async fn register_as(&self, token: &str, repo: &GitRepo) -> String {
        let response = self
            .post(
                "/api/v1/projects",
                token,
                json!({"name": "demo", "repo_url": repo.url()}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("json");
        body["project_id"].as_str().expect("project_id").to_owned()
    }

    pub async fn request_sync(&self, project_id: &str) -> Value {
        let response = self
            .post(
                "/api/v1/repo/sync",
                &self.token,
                json!({"project_id": project_id}),
            )
            .await;
        assert!(
            response.status() == 202 || response.status() == 200,
            "sync request: {}",
            response.status()
        );
        response.json().await.expect("json")
    }

    /// Polls the sync until it ends and its final notification is in the history (the
    /// record is stored before the notification is published, so a test that moved on
    /// at the record could see the notification arrive late); returns the final record.
    pub async fn wait_for_sync(&self, sync_id: &str) -> Value {
        let path = format!("/api/v1/repo/sync/{sync_id}");
        let record = wait_until(WAIT, || async {
            let record: Value = self
                .get(&path, &self.token)
                .await
                .json()
                .await
                .expect("json");
            matches!(record["status"].as_str(), Some("completed" | "failed")).then_some(record)
        })
        .await
        .expect("sync ends in time");
        let notified = wait_until(WAIT, || async {
            let events: Vec<Value> = self
                .get("/api/v1/notifications?limit=10000", &self.token)
                .await
                .json()
                .await
                .ok()?;
            events
                .iter()
                .any(|e| {
                    e["sync_id"] == sync_id
                        && matches!(
                            e["kind"].as_str(),
                            Some("repo_sync_success" | "repo_sync_failed")
                        )
                })
                .then_some(())
        })
        .await;
        assert!(
            notified.is_some(),
            "sync {sync_id} ended without its notification"
        );
        record
    }

    pub async fn sync_to_end(&self, project_id: &str) -> Value {
        let accepted = self.request_sync(project_id).await;
        self.wait_for_sync(accepted["sync_id"].as_str().expect("sync_id"))
            .await
    }

    /// `/metrics`, parsed.
    pub async fn metrics(&self) -> crate::operating::Exposition {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        crate::operating::parse_exposition(&text)
    }

    /// `hivesync_snapshot_checks_total{result}` from `/metrics` (0 before the first).
    pub async fn snapshot_checks(&self, result: &str) -> f64 {
        self.metrics()
            .await
            .value("hivesync_snapshot_checks_total", &[("result", result)])
            .unwrap_or_default()
    }

    pub fn worktree(&self, project_id: &str) -> PathBuf {
        self.data_dir.join("repos").join(project_id)
    }

    pub async fn ws(&self, token: &str, query: &str) -> WsClient {
        let url = format!("ws://{}/api/v1/ws{query}", self.addr);
        let mut request = url.into_client_request().expect("valid ws url");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connects");
        WsClient { socket }
    }
}

/// Polls `check` until it yields a value or `limit` passes.
pub async fn wait_until<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub struct WsClient {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the next read of a socket gave.
#[derive(Debug)]
pub enum WsRead {
    Json(Value),
    Closed(Option<u16>),
}

impl WsClient {
    pub async fn read(&mut self, limit: Duration) -> Option<WsRead> {
        loop {
            let message = tokio::time::timeout(limit, self.socket.next()).await.ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(WsRead::Json(
                        serde_json::from_str(text.as_str()).expect("server sends JSON"),
                    ));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(WsRead::Closed(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Some(WsRead::Closed(None)),
            }
        }
    }

    /// The next JSON frame; panics on close or timeout.
    pub async fn next_json(&mut self) -> Value {
        match self.read(WAIT).await {
            Some(WsRead::Json(value)) => value,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Frames until one matches `done` (included).
    pub async fn until(&mut self, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next_json().await;
            let finished = done(&frame);
            frames.push(frame);
            if finished {
                return frames;
            }
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send");
    }

    /// True when nothing arrives within `limit`.
    pub async fn is_silent_for(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.socket.next())
            .await
            .is_err()
    }
}

pub fn is_notification(frame: &Value, kind: &str) -> bool {
    frame["type"] == "notification" && frame["kind"] == kind
}

/// A real git repository in a temp dir, driven by the git CLI.
pub struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    pub fn new() -> Self {
        let repo = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    pub fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.com",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(self.dir.path())
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn write(&self, path: &str, contents: &str) -> &Self {
        let full = self.dir.path().join(path);
        std::fs::create_dir_all(full.parent().expect("has parent")).expect("mkdir");
        std::fs::write(full, contents).expect("write");
        self
    }

    pub fn symlink(&self, path: &str, target: &str) -> &Self {
        std::os::unix::fs::symlink(target, self.dir.path().join(path)).expect("symlink");
        self
    }

    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }

    /// Commits `files` files of `size` incompressible bytes each on `main`, through
    /// `git fast-import` (seconds for tens of megabytes): a repository whose clone
    /// takes a while. Returns the commit.
    pub fn commit_random_files(&self, files: usize, size: usize) -> String {
        use std::io::Write;
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut stream = Vec::with_capacity(files * (size + 64));
        for mark in 1..=files {
            let mut blob = vec![0u8; size];
            for chunk in blob.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            write!(stream, "blob\nmark :{mark}\ndata {size}\n").expect("buffer");
            stream.extend_from_slice(&blob);
            stream.push(b'\n');
        }
        stream.extend_from_slice(
            b"commit refs/heads/main\ncommitter Test <test@example.com> 1700000000 +0000\ndata 4\nbig\n",
        );
        for mark in 1..=files {
            writeln!(stream, "M 100644 :{mark} data/{:02}/{mark}.bin", mark % 16).expect("buffer");
        }
        let mut import = Command::new("git")
            .args(["fast-import", "--quiet", "--force"])
            .current_dir(self.dir.path())
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("git fast-import runs");
        import
            .stdin
            .take()
            .expect("stdin")
            .write_all(&stream)
            .expect("stream written");
        assert!(import.wait().expect("fast-import ends").success());
        self.git(&["rev-parse", "refs/heads/main"])
    }

    /// `path → contents` of every file in the commit's tree (links as their target).
    pub fn tree_of(&self, commit: &str) -> Vec<(String, Vec<u8>)> {
        let listing = self.git(&["ls-tree", "-r", "-z", "--full-tree", commit]);
        let mut files: Vec<(String, Vec<u8>)> = listing
            .split('\0')
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (meta, path) = line.split_once('\t').expect("ls-tree line");
                let object = meta.split_whitespace().nth(2).expect("object id");
                let output = Command::new("git")
                    .args(["cat-file", "blob", object])
                    .current_dir(self.dir.path())
                    .output()
                    .expect("git cat-file");
                (path.to_owned(), output.stdout)
            })
            .collect();
        files.sort();
        files
    }
}

/// `path → contents` of every file under `root` (the `.git` gitfile excluded), and
/// whether any symlink was found.
pub fn files_on_disk(root: &Path) -> (Vec<(String, Vec<u8>)>, bool) {
    let mut files = Vec::new();
    let mut saw_symlink = false;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let relative = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            if relative == ".git" {
                continue;
            }
            if meta.file_type().is_symlink() {
                saw_symlink = true;
            } else if meta.is_dir() {
                pending.push(path);
            } else {
                files.push((relative, std::fs::read(&path).expect("read")));
            }
        }
    }
    files.sort();
    (files, saw_symlink)
}

/// Asserts the project's mirror is exactly `commit`'s tree: same files, same bytes,
/// nothing else, no symlinks, and git sees it clean.
pub fn assert_exact_tree(app: &TestApp, project_id: &str, repo: &GitRepo, commit: &str) {
    assert_exact_worktree(&app.worktree(project_id), repo, commit);
}

/// The worktree at `worktree` holds exactly the files of `commit`, and no symlink.
pub fn assert_exact_worktree(worktree: &Path, repo: &GitRepo, commit: &str) {
    let (on_disk, saw_symlink) = files_on_disk(worktree);
    assert!(!saw_symlink, "the mirror holds a symlink");
    let expected = repo.tree_of(commit);
    let names =
        |files: &[(String, Vec<u8>)]| files.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&on_disk),
        names(&expected),
        "file set differs from {commit}"
    );
    assert_eq!(on_disk, expected, "file contents differ from {commit}");
    // --no-optional-locks: a plain `git status` rewrites the index when it finds
    // racily clean entries (timing: about one run in seven here), and a snapshot's
    // watch vouches for it only as the index it was verified against records it, so
    // the check would change what the next no-op sync finds
    let status = Command::new("git")
        .args(["--no-optional-locks", "status", "--porcelain", "--ignored"])
        .current_dir(worktree)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git status");
    assert!(
        status.status.success(),
        "git status in the mirror: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "",
        "git sees changes in the mirror"
    );
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(worktree)
        .output()
        .expect("rev-parse");
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), commit);
}

/// Writes a credential policy (`HIVESYNC_CREDENTIAL_SCOPES`) into `dir` letting `owner`
/// use each of `credentials` towards 127.0.0.1 only; returns its path.
pub fn scopes_file(dir: &Path, owner: &str, credentials: &[&str]) -> PathBuf {
    let policy: serde_json::Map<String, Value> = credentials
        .iter()
        .map(|name| {
            (
                (*name).to_owned(),
                json!({"owners": [owner], "hosts": ["127.0.0.1"]}),
            )
        })
        .collect();
    let path = dir.join(".scopes.json");
    std::fs::write(&path, Value::Object(policy).to_string()).expect("scopes file");
    path
}

/// A project as the store holds it, written directly (as one registered before a
/// rule that registration now enforces would be).
pub fn stored_project(owner: &str, name: &str, repo_url: &str) -> hivesync::engine::Project {
    hivesync::engine::Project::new(
        hivesync::domain::ProjectId::generate(),
        name.into(),
        hivesync::domain::RepoUrl::from_stored(repo_url.into()).expect("a url"),
        "main".into(),
        owner.into(),
        None,
        None,
    )
}
