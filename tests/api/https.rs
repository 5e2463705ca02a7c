//! HTTPS remotes against a real smart-HTTP git server: `git http-backend` (git's own
//! CGI server side) behind TLS with a certificate from a test CA and HTTP Basic auth,
//! as a hosting service with token auth would be.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::helpers::{GitRepo, TestApp, assert_exact_tree, is_notification, scopes_file};

const TOKEN: &str = "ghp_https-test-token-7d1c0e";
/// Every credential name these tests use, all alice's towards 127.0.0.1.
const CREDENTIALS: &[&str] = &["hosting-token", "stale", "good", "not-configured"];

struct GitHttpsServer {
    pub port: u16,
    pub ca_file: PathBuf,
    /// requests that came without valid credentials
    pub refused: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitHttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn openssl(args: &[&str], dir: &Path) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, and a certificate it signed for 127.0.0.1 and localhost.
fn make_certificates(dir: &Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=hivesync test CA",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        dir,
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write ext");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
        dir,
    );
}

impl GitHttpsServer {
    /// Serves every repository under `root` at `https://127.0.0.1:<port>/<name>`,
    /// requiring HTTP Basic auth with [`TOKEN`] as the password (any user name).
    async fn start(root: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        make_certificates(dir.path());
        let certs = CertificateDer::pem_file_iter(dir.path().join("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).expect("server.key");
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let tls = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refused = Arc::new(AtomicUsize::new(0));
        let root = root.to_path_buf();
        let task = {
            let refused = Arc::clone(&refused);
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let root = root.clone();
                    let refused = Arc::clone(&refused);
                    tokio::spawn(async move {
                        // clients that do not trust the CA end here
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |request| {
                            let root = root.clone();
                            let refused = Arc::clone(&refused);
                            async move { Ok::<_, Infallible>(handle(request, &root, &refused).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                    });
                }
            })
        };
        Self {
            port,
            ca_file: dir.path().join("ca.pem"),
            refused,
            _dir: dir,
            task,
        }
    }

    fn url(&self, repo: &str) -> String {
        format!("https://127.0.0.1:{}/{repo}", self.port)
    }
}

fn authorized(request: &Request<Incoming>) -> bool {
    let Some(header) = request.headers().get("authorization") else {
        return false;
    };
    let Some(encoded) = header.to_str().ok().and_then(|h| h.strip_prefix("Basic ")) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    String::from_utf8(decoded)
        .ok()
        .and_then(|pair| pair.split_once(':').map(|(_, password)| password == TOKEN))
        .unwrap_or(false)
}

/// One CGI request to `git http-backend`.
async fn handle(
    request: Request<Incoming>,
    root: &Path,
    refused: &AtomicUsize,
) -> Response<Full<Bytes>> {
    if !authorized(&request) {
        refused.fetch_add(1, Ordering::Relaxed);
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", "Basic realm=\"git\"")
            .body(Full::new(Bytes::from_static(b"authentication required\n")))
            .expect("response");
    }
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let content_type = header("content-type");
    let protocol = header("git-protocol");
    let encoding = header("content-encoding");
    let body = request
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = if encoding == "gzip" {
        let mut gunzip = Command::new("gzip")
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gzip");
        let mut stdin = gunzip.stdin.take().expect("stdin");
        let compressed = body.to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&compressed);
        });
        let output = gunzip.wait_with_output().expect("gunzip");
        let _ = writer.join();
        Bytes::from(output.stdout)
    } else {
        body
    };
    let root = root.to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new("git")
            .arg("http-backend")
            .env("GIT_PROJECT_ROOT", &root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("REQUEST_METHOD", method)
            .env("PATH_INFO", path)
            .env("QUERY_STRING", query)
            .env("CONTENT_TYPE", content_type)
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("GIT_PROTOCOL", protocol)
            .env("REMOTE_USER", "token-user")
            .env("REMOTE_ADDR", "127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("git http-backend");
        let mut stdin = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        });
        let output = child.wait_with_output().expect("http-backend output");
        let _ = writer.join();
        output.stdout
    })
    .await
    .expect("cgi task");
    cgi_response(&output)
}

fn cgi_response(output: &[u8]) -> Response<Full<Bytes>> {
    let split = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, at + 4))
        .or_else(|| {
            output
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|at| (at, at + 2))
        });
    let Some((head_end, body_start)) = split else {
        return Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Full::new(Bytes::new()))
            .expect("response");
    };
    let mut response = Response::builder().status(StatusCode::OK);
    for line in String::from_utf8_lossy(&output[..head_end]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
            response = response.status(code);
        } else {
            response = response.header(name, value);
        }
    }
    response
        .body(Full::new(Bytes::copy_from_slice(&output[body_start..])))
        .expect("response")
}

/// A bare copy of `repo` under `root` as `name`, as a hosting service holds it.
fn publish(repo: &GitRepo, root: &Path, name: &str) {
    let status = Command::new("git")
        .args(["clone", "--bare", "-q"])
        .arg(repo.path())
        .arg(root.join(name))
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .status()
        .expect("git clone --bare");
    assert!(status.success());
}

/// A repository with files, published as `name` on a fresh HTTPS git server, and an
/// empty secrets directory for credentials.
struct Hosted {
    repo: GitRepo,
    commit: String,
    server: GitHttpsServer,
    secrets: tempfile::TempDir,
    root: tempfile::TempDir,
}

impl Hosted {
    async fn new(name: &str) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let (repo, commit) = repo_with_files();
        publish(&repo, root.path(), name);
        let server = GitHttpsServer::start(root.path()).await;
        Self {
            repo,
            commit,
            server,
            secrets: tempfile::tempdir().expect("temp dir"),
            root,
        }
    }

    fn secret(&self, name: &str, value: &str) {
        std::fs::write(self.secrets.path().join(name), value).expect("secret");
    }

    async fn app(&self) -> TestApp {
        app_trusting(&self.server, self.secrets.path()).await
    }
}

fn repo_with_files() -> (GitRepo, String) {
    let repo = GitRepo::new();
    repo.write("README.md", "served over https\n")
        .write("src/lib.rs", "pub fn answer() -> u32 { 42 }\n");
    let commit = repo.commit("first");
    (repo, commit)
}

async fn app_trusting(server: &GitHttpsServer, secrets: &Path) -> TestApp {
    let ca_file = server.ca_file.clone();
    let secrets = secrets.to_path_buf();
    let scopes = scopes_file(&secrets, "alice", CREDENTIALS);
    TestApp::spawn_with(move |config| {
        config.https_ca_file = Some(ca_file);
        config.secrets_dir = Some(secrets);
        config.credential_scopes = Some(scopes);
        config.retry_max = 1;
    })
    .await
}

async fn register(app: &TestApp, url: &str, credential: Option<&str>) -> (u16, Value) {
    let mut body = json!({"name": "https demo", "repo_url": url});
    if let Some(credential) = credential {
        body["credential"] = json!(credential);
    }
    let response = app.post("/api/v1/projects", &app.token, body).await;
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

#[tokio::test]
async fn an_https_remote_syncs_with_a_named_token_and_the_token_never_shows() {
    let hosted = Hosted::new("team/app.git").await;
    let Hosted {
        repo,
        commit,
        server,
        root,
        ..
    } = &hosted;
    hosted.secret("hosting-token", &format!("{TOKEN}\n"));
    let app = hosted.app().await;

    let (status, project) =
        register(&app, &server.url("team/app.git"), Some("hosting-token")).await;
    assert_eq!(status, 201, "{project}");
    let project_id = project["project_id"].as_str().expect("id").to_owned();
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    let record = app.sync_to_end(&project_id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["commit"], commit.as_str());
    assert_exact_tree(&app, &project_id, repo, commit);
    assert!(
        server.refused.load(Ordering::Relaxed) >= 1,
        "the server did ask for credentials (the first request goes without)"
    );

    // an incremental sync over https
    repo.write("CHANGELOG.md", "v2\n");
    let second = repo.commit("second");
    let push = Command::new("git")
        .args(["push", "-q"])
        .arg(root.path().join("team/app.git"))
        .arg("main")
        .current_dir(repo.path())
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .status()
        .expect("git push");
    assert!(push.success());
    let record = app.sync_to_end(&project_id).await;
    assert_eq!(record["commit"], second.as_str());
    assert_exact_tree(&app, &project_id, repo, &second);

    let frames = socket
        .until(|f| is_notification(f, "repo_sync_success") && f["sync_id"] == record["sync_id"])
        .await;
    let mut seen = frames
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    for path in [
        format!("/api/v1/projects/{project_id}"),
        format!(
            "/api/v1/repo/sync/{}",
            record["sync_id"].as_str().expect("id")
        ),
        "/api/v1/notifications?limit=1000".to_owned(),
        "/api/v1/projects".to_owned(),
    ] {
        seen.push_str(&app.get_json(&path).await.1.to_string());
    }
    assert!(
        !seen.contains(TOKEN),
        "the token leaked into a response or event"
    );
}

#[tokio::test]
async fn https_userinfo_of_a_project_stored_before_it_was_refused_still_works_unshown() {
    let hosted = Hosted::new("app.git").await;
    let Hosted {
        repo,
        commit,
        server,
        ..
    } = &hosted;
    let app = hosted.app().await;

    let url = format!("https://deploy:{TOKEN}@127.0.0.1:{}/app.git", server.port);
    let (status, refused) = register(&app, &url, None).await;
    assert_eq!(
        status, 400,
        "credentials in a URL are refused now: {refused}"
    );
    assert!(!refused.to_string().contains(TOKEN), "{refused}");
    // a project registered before that rule still holds its URL, and syncs
    let legacy = crate::helpers::stored_project("alice", "legacy", &url);
    let project_id = legacy.project_id.clone();
    app.state
        .engine
        .store
        .insert_project(&legacy)
        .await
        .expect("stored");
    let project = app
        .get_json(&format!("/api/v1/projects/{project_id}"))
        .await
        .1;
    assert!(!project.to_string().contains(TOKEN), "{project}");
    let project_id = project["project_id"].as_str().expect("id").to_owned();
    let record = app.sync_to_end(&project_id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_exact_tree(&app, &project_id, repo, commit);
    let config = std::fs::read_to_string(
        app.data_dir
            .join("git")
            .join(format!("{project_id}.git"))
            .join("config"),
    )
    .expect("mirror config");
    assert!(!config.contains(TOKEN), "no credential on disk");
}

#[tokio::test]
async fn https_failures_are_classified_and_auth_is_not_retried() {
    let hosted = Hosted::new("app.git").await;
    let server = &hosted.server;
    hosted.secret("stale", "ghp_revoked-long-ago");
    hosted.secret("good", TOKEN);
    let app = hosted.app().await;

    let cases = [
        (server.url("app.git"), Some("stale"), "repo_auth_failed"),
        (server.url("app.git"), None, "repo_auth_failed"),
        (server.url("missing.git"), Some("good"), "repo_not_found"),
        (
            server.url("app.git"),
            Some("not-configured"),
            "repo_auth_failed",
        ),
    ];
    for (url, credential, code) in cases {
        let (status, project) = register(&app, &url, credential).await;
        assert_eq!(status, 201);
        let project_id = project["project_id"].as_str().expect("id");
        let record = app.sync_to_end(project_id).await;
        assert_eq!(record["status"], "failed", "{url} {credential:?}: {record}");
        assert_eq!(
            record["error"]["code"], code,
            "{url} {credential:?}: {record}"
        );
        assert_eq!(record["attempt"], 1, "not retried: {record}");
        let message = record["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains("revoked") && !message.contains(TOKEN),
            "{message}"
        );
    }
}

#[tokio::test]
async fn an_https_remote_with_an_untrusted_certificate_is_refused() {
    let hosted = Hosted::new("app.git").await;
    let server = &hosted.server;
    hosted.secret("good", TOKEN);
    // the system's CAs only: the test CA is not among them
    let scopes = scopes_file(hosted.secrets.path(), "alice", CREDENTIALS);
    let app = TestApp::spawn_with(|config| {
        config.secrets_dir = Some(hosted.secrets.path().to_path_buf());
        config.credential_scopes = Some(scopes);
        config.retry_max = 1;
        config.retry_base = Duration::from_millis(10);
    })
    .await;
    let (_, project) = register(&app, &server.url("app.git"), Some("good")).await;
    let record = app
        .sync_to_end(project["project_id"].as_str().expect("id"))
        .await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_ne!(record["error"]["code"], "repo_not_found");
    assert_eq!(
        server.refused.load(Ordering::Relaxed),
        0,
        "no request got past the TLS handshake"
    );
}

/// The real binary at debug log level, syncing over HTTPS with a token from the
/// environment: neither the token nor the Basic header built from it appears in its
/// log, a response or an event.
#[tokio::test]
async fn the_binarys_log_never_holds_the_https_token() {
    let hosted = Hosted::new("app.git").await;
    let (server, commit) = (&hosted.server, &hosted.commit);
    let data = tempfile::tempdir().expect("temp dir");
    let log_path = data.path().join("serve.log");
    let ca_file = server.ca_file.display().to_string();
    let scopes = scopes_file(data.path(), "alice", CREDENTIALS);
    let scopes = scopes.display().to_string();
    let (mut child, addr) = crate::lifecycle::serve_binary_logging_to(
        data.path(),
        &[
            ("HIVESYNC_ALLOW_PRIVATE_HOSTS", "1"),
            ("HIVESYNC_CREDENTIAL_SCOPES", &scopes),
            ("HIVESYNC_HTTPS_CA_FILE", &ca_file),
            ("HIVESYNC_SECRET_HOSTING_TOKEN", TOKEN),
            ("RUST_LOG", "trace"),
        ],
        std::fs::File::create(&log_path).expect("log file").into(),
    )
    .await;
    let mut recorded = crate::lifecycle::Recorded::new(&addr);
    let (_, record) = recorded
        .sync_new_project(
            &server.url("app.git"),
            json!({"credential": "hosting-token"}),
        )
        .await;
    assert!(record.contains(commit.as_str()), "{record}");
    recorded.get("/api/v1/notifications?limit=1000").await;
    let seen = recorded.seen;
    crate::lifecycle::terminate(&mut child);
    let logs = std::fs::read_to_string(&log_path).expect("log");
    assert!(logs.contains("sync completed"), "the sync is in the log");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{TOKEN}"));
    for secret in [TOKEN, basic.as_str()] {
        assert!(!logs.contains(secret), "the log holds a credential");
        assert!(!seen.contains(secret), "a response holds a credential");
    }
}
