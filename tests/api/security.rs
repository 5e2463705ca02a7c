//! The hub as an attacker meets it: credentials of other users, the backend's own
//! network by every spelling and every name, and listeners that record whatever
//! reaches them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::helpers::{TestApp, scopes_file, token};
use hivesync::auth::ClientKind;

/// A TCP listener on 127.0.0.1 that counts connections and keeps what they send.
struct Recorder {
    port: u16,
    connections: Arc<AtomicUsize>,
    received: Arc<tokio::sync::Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let task = {
            let (connections, received) = (Arc::clone(&connections), Arc::clone(&received));
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let received = Arc::clone(&received);
                    tokio::spawn(async move {
                        let mut buffer = [0u8; 4096];
                        while let Ok(read) = socket.read(&mut buffer).await {
                            if read == 0 {
                                break;
                            }
                            received.lock().await.extend_from_slice(&buffer[..read]);
                        }
                    });
                }
            })
        };
        Self {
            port,
            connections,
            received,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn register(app: &TestApp, token: &str, body: Value) -> (u16, Value) {
    let response = app.post("/api/v1/projects", token, body).await;
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

/// A name (not `localhost`) that the system resolver maps to a loopback address,
/// from `/etc/hosts`: the kind of name the registration check cannot see through.
fn loopback_alias() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address: std::net::IpAddr = fields.next()?.parse().ok()?;
            address
                .is_loopback()
                .then(|| fields.map(str::to_owned).collect::<Vec<_>>())
        })
        .flatten()
        .find(|name| {
            let lowered = name.to_ascii_lowercase();
            lowered != "localhost" && !lowered.ends_with(".localhost") && !lowered.contains(':')
        })
}

#[tokio::test]
async fn private_hosts_are_refused_at_registration_by_every_spelling() {
    let app = TestApp::spawn_with(|config| config.allow_private_hosts = false).await;
    let spellings = [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.000.000.001",
        "%31%32%37.0.0.1",
        "0",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[::ffff:127.0.0.1]",
        "169.254.169.254",
        "100.64.0.1",
        "198.18.0.1",
        "localhost",
    ];
    for host in spellings {
        for url in [
            format!("https://{host}/r.git"),
            format!("ssh://git@{host}/r.git"),
        ] {
            let (status, body) =
                register(&app, &app.token, json!({"name": "probe", "repo_url": url})).await;
            assert_eq!(status, 400, "{url} was accepted: {body}");
            assert_eq!(body["error"], "invalid_request", "{url}");
        }
    }
    let (status, body) = register(
        &app,
        &app.token,
        json!({"name": "ok", "repo_url": "https://github.com/org/r.git"}),
    )
    .await;
    assert_eq!(status, 201, "a public host is fine: {body}");
    app.stop().await;
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_refused_when_the_sync_connects() {
    let Some(alias) = loopback_alias() else {
        crate::skips::skip("no name besides localhost maps to loopback in /etc/hosts");
        return;
    };
    let recorder = Recorder::start().await;
    let app = TestApp::spawn_with(|config| {
        config.allow_private_hosts = false;
        config.retry_max = 1;
    })
    .await;
    for url in [
        format!("https://{alias}:{}/r.git", recorder.port),
        format!("ssh://git@{alias}:{}/r.git", recorder.port),
    ] {
        let (status, project) =
            register(&app, &app.token, json!({"name": "alias", "repo_url": url})).await;
        assert_eq!(status, 201, "the name alone looks public: {project}");
        let record = app
            .sync_to_end(project["project_id"].as_str().expect("id"))
            .await;
        assert_eq!(record["status"], "failed", "{url}: {record}");
        assert_eq!(record["error"]["code"], "backend_error", "{record}");
        let message = record["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("loopback or private"),
            "the message says why: {message}"
        );
    }
    assert_eq!(
        recorder.connections(),
        0,
        "nothing connected to the loopback listener"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_credential_is_usable_only_by_its_owners_and_only_towards_its_hosts() {
    let recorder = Recorder::start().await;
    let secrets = tempfile::tempdir().expect("temp dir");
    std::fs::write(secrets.path().join("org-token"), "ghp_org-secret-4411").expect("secret");
    let scopes = scopes_file(secrets.path(), "alice", &["org-token"]);
    let secrets_dir = secrets.path().to_path_buf();
    let policy = scopes.clone();
    let app = TestApp::spawn_with(move |config| {
        config.secrets_dir = Some(secrets_dir);
        config.credential_scopes = Some(policy);
        config.retry_max = 1;
    })
    .await;
    let mallory = token("mallory", ClientKind::Desktop);
    let attacker_url = format!("https://127.0.0.1:{}/steal.git", recorder.port);

    // another user naming alice's credential, towards a host they listen on
    let (status, body) = register(
        &app,
        &mallory,
        json!({"name": "steal", "repo_url": attacker_url, "credential": "org-token"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    // a credential no policy names is nobody's
    let (status, _) = register(
        &app,
        &app.token,
        json!({"name": "x", "repo_url": attacker_url, "credential": "unlisted"}),
    )
    .await;
    assert_eq!(status, 403);
    // the owner, towards a host outside the credential's hosts
    let (status, body) = register(
        &app,
        &app.token,
        json!({"name": "elsewhere", "repo_url": format!("https://127.0.0.2:{}/r.git", recorder.port), "credential": "org-token"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // allowed at registration; then the operator narrows the policy: the sync refuses
    // to send the secret before connecting anywhere
    let (status, project) = register(
        &app,
        &app.token,
        json!({"name": "ok", "repo_url": attacker_url, "credential": "org-token"}),
    )
    .await;
    assert_eq!(status, 201, "{project}");
    std::fs::write(
        &scopes,
        json!({"org-token": {"owners": ["bob"], "hosts": ["127.0.0.1"]}}).to_string(),
    )
    .expect("narrowed policy");
    let record = app
        .sync_to_end(project["project_id"].as_str().expect("id"))
        .await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["error"]["code"], "repo_auth_failed", "{record}");
    assert!(
        record["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("may not be used")),
        "{record}"
    );
    assert_eq!(recorder.connections(), 0, "the secret was never sent");
    assert!(recorder.received.lock().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn search_refuses_patterns_that_would_pin_a_core_and_stays_within_its_budget() {
    let app = TestApp::spawn().await;
    let repo = crate::helpers::GitRepo::new();
    // one 4 MB line: what made a{1000}{1000} run for minutes
    repo.write("long.txt", &format!("{}\n", "a".repeat(4 << 20)))
        .write("src/lib.rs", "pub fn answer() -> u32 { 42 }\n");
    repo.commit("long line");
    let id = app.register(&repo).await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed", "{record}");

    let search = |query: String| {
        let app = &app;
        let id = id.clone();
        async move {
            let started = std::time::Instant::now();
            let response = app
                .get(
                    &format!("/api/v1/repo/search?project_id={id}&{query}"),
                    &app.token,
                )
                .await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("json");
            (status, body, started.elapsed())
        }
    };
    let (status, body, took) = search("regex=true&q=a%7B1000%7D%7B1000%7D".into()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_request");
    assert!(
        took < std::time::Duration::from_secs(20),
        "refused at once, took {took:?}"
    );

    let (status, body, _) = search(format!("q={}", "x".repeat(60_000))).await;
    assert_eq!(status, 400, "a 60,000-byte query is refused: {body}");

    // an allowed but heavy pattern over the long line ends inside its budget
    let (status, body, took) = search("regex=true&q=(a%7Caa)*b".into()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["timed_out"].is_boolean(), "{body}");
    assert!(
        took < std::time::Duration::from_secs(30),
        "the 5 s budget holds (with room for a loaded machine): {took:?}"
    );
    let (status, body, _) = search("q=answer".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body["matches"][0]["path"], "src/lib.rs", "{body}");
    assert_eq!(body["timed_out"], false);
    app.stop().await;
}

/// A plain HTTP server on 127.0.0.1 that answers every request with a redirect to
/// `location`.
async fn redirecting_server(location: String) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let location = location.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = socket.read(&mut buffer).await;
                let answer = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn a_redirect_is_not_followed_to_another_host() {
    let target = Recorder::start().await;
    let (port, server) = redirecting_server(format!(
        "http://127.0.0.1:{}/r.git/info/refs?service=git-upload-pack",
        target.port
    ))
    .await;
    let app = TestApp::spawn_with(|config| {
        config.allowed_schemes.push("http".into());
        config.retry_max = 1;
    })
    .await;
    let (status, project) = register(
        &app,
        &app.token,
        json!({"name": "redirected", "repo_url": format!("http://127.0.0.1:{port}/r.git")}),
    )
    .await;
    assert_eq!(status, 201, "{project}");
    let record = app
        .sync_to_end(project["project_id"].as_str().expect("id"))
        .await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(target.connections(), 0, "the redirect was not followed");
    server.abort();
    app.stop().await;
}
