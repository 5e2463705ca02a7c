//! Operating it (API.md v1.1): Prometheus metrics on the hub and on a worker process,
//! the OpenAPI document checked against the routes the server answers, and the
//! `hivesync sync` / `hivesync projects` CLI run as a binary against a real hub.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use hivesync::client::{Client, Next};
use hivesync::protocol::{EventBody, ServerFrame};
use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, WAIT, wait_until};
use crate::redis_server::{redis_or_skip, unique_prefix};

/// A Prometheus text exposition, parsed: family → (help, type), and every sample as
/// (name, labels, value).
pub(crate) struct Exposition {
    families: BTreeMap<String, (Option<String>, Option<String>)>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

pub(crate) fn parse_exposition(text: &str) -> Exposition {
    let mut families: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a name and a text");
            families.entry(name.to_owned()).or_default().0 = Some(help.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a type");
            families.entry(name.to_owned()).or_default().1 = Some(kind.to_owned());
        } else if line == "# EOF" {
        } else {
            assert!(!line.starts_with('#'), "an unknown comment line: {line}");
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value: f64 = value.parse().expect("a sample's value is a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels close");
                    let labels = body
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once("=\"").expect("label=\"value\"");
                            (key.to_owned(), value.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
    }
    Exposition { families, samples }
}

impl Exposition {
    /// Every sample belongs to a family with both `# HELP` and `# TYPE`.
    fn assert_every_family_described(&self) {
        for (name, _, _) in &self.samples {
            let family = ["_total", "_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| self.families.contains_key(*base))
                })
                .unwrap_or(name);
            let (help, kind) = self
                .families
                .get(family)
                .unwrap_or_else(|| panic!("sample {name} has no family"));
            assert!(help.is_some(), "{family} has no # HELP");
            assert!(kind.is_some(), "{family} has no # TYPE");
        }
    }

    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(sample, sample_labels, _)| {
                sample == name
                    && labels.iter().all(|(key, value)| {
                        sample_labels.get(*key).map(String::as_str) == Some(*value)
                    })
            })
            .map(|(_, _, value)| *value)
    }

    fn assert_families(&self, names: &[&str]) {
        for name in names {
            let (help, kind) = self
                .families
                .get(*name)
                .unwrap_or_else(|| panic!("no family {name} in the exposition"));
            assert!(help.is_some() && kind.is_some(), "{name} is described");
        }
    }
}

const CONTRACT_FAMILIES: &[&str] = &[
    "hivesync_syncs",
    "hivesync_sync_duration_seconds",
    "hivesync_sync_queue_depth",
    "hivesync_ws_connections",
    "hivesync_ws_kicked",
    "hivesync_events_published",
    "hivesync_webhook_deliveries",
    "hivesync_schedule_lag_seconds",
    "hivesync_http_requests",
    "hivesync_redis_reconnects",
    "hivesync_store_commit_seconds",
];

async fn scrape(http: &reqwest::Client, url: &str) -> Exposition {
    let response = http.get(url).send().await.expect("metrics answer");
    assert_eq!(response.status(), 200);
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        kind.starts_with("application/openmetrics-text") || kind.starts_with("text/plain"),
        "a Prometheus media type, not {kind}"
    );
    let exposition = parse_exposition(&response.text().await.expect("metrics text"));
    exposition.assert_every_family_described();
    exposition
}

#[tokio::test]
async fn hub_metrics_count_syncs_events_webhooks_sockets_and_requests() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "one").commit("one");
    let project = app.register(&repo).await;
    let ws = app.ws(&app.token, "").await;
    let done = app.sync_to_end(&project).await;
    assert_eq!(done["status"], "completed");
    // a delivery for a project that takes no webhooks
    let refused = app
        .http
        .post(format!("{}/api/v1/webhooks/{project}", app.base))
        .body("{}")
        .send()
        .await
        .expect("delivery answered");
    assert_eq!(refused.status(), 404);
    // made-up methods must not become label values (each would be a new series)
    for made_up in ["FOO1", "FOO2"] {
        let method = reqwest::Method::from_bytes(made_up.as_bytes()).expect("a method token");
        app.http
            .request(method, format!("{}/api/v1/projects", app.base))
            .send()
            .await
            .expect("answered");
    }

    let metrics = scrape(&app.http, &format!("{}/metrics", app.base)).await;
    assert!(
        metrics
            .samples
            .iter()
            .all(|(_, labels, _)| labels.get("method").is_none_or(|m| !m.starts_with("FOO"))),
        "a client's method is never a label value"
    );
    assert_eq!(
        metrics.value(
            "hivesync_http_requests_total",
            &[
                ("method", "other"),
                ("route", "/api/v1/projects"),
                ("status", "404")
            ]
        ),
        Some(2.0)
    );
    metrics.assert_families(CONTRACT_FAMILIES);
    assert_eq!(
        metrics.value(
            "hivesync_syncs_total",
            &[("outcome", "completed"), ("trigger", "api")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.value("hivesync_sync_duration_seconds_count", &[]),
        Some(1.0)
    );
    // queued, running, … completed, and the success notification
    assert!(
        metrics
            .value("hivesync_events_published_total", &[])
            .is_some_and(|count| count >= 5.0),
        "every stage and the notification are counted"
    );
    assert_eq!(
        metrics.value(
            "hivesync_webhook_deliveries_total",
            &[("result", "not_found")]
        ),
        Some(1.0)
    );
    assert_eq!(metrics.value("hivesync_ws_connections", &[]), Some(1.0));
    assert_eq!(metrics.value("hivesync_sync_queue_depth", &[]), Some(0.0));
    assert_eq!(
        metrics.value(
            "hivesync_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/api/v1/repo/sync"),
                ("status", "202")
            ]
        ),
        Some(1.0),
        "the route label is the template"
    );
    assert!(
        metrics
            .value(
                "hivesync_http_requests_total",
                &[("route", "/api/v1/repo/sync/{sync_id}"), ("status", "200")]
            )
            .is_some(),
        "ids never become label values"
    );
    assert!(
        metrics
            .value("hivesync_store_commit_seconds_count", &[])
            .is_some_and(|count| count >= 1.0),
        "the embedded store's commits are timed"
    );
    // the shipped Grafana dashboard queries only series the hub exports
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/hivesync.json"),
        )
        .expect("the dashboard is in the repo"),
    )
    .expect("the dashboard is JSON");
    let exported: BTreeSet<&str> = metrics
        .samples
        .iter()
        .map(|(name, _, _)| name.as_str())
        .collect();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            for (at, _) in expr.match_indices("hivesync_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.insert(name);
            }
        }
    }
    assert!(
        queried.len() >= 10,
        "the dashboard covers the families: {queried:?}"
    );
    for name in &queried {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
    drop(ws);
    app.stop().await;
}

/// The first line of the worker's stdout naming its metrics address.
fn metrics_address(stdout: std::process::ChildStdout) -> String {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("the worker prints its metrics address")
            .expect("stdout reads");
        if let Some(rest) = line.strip_prefix("metrics, healthz and readyz on ") {
            return rest.trim().to_owned();
        }
    }
}

#[tokio::test]
async fn the_hubs_heap_trims_are_counted_timed_and_can_be_turned_off() {
    let trimming = TestApp::spawn_with(|config| {
        config.malloc_trim_every = std::time::Duration::from_millis(100);
    })
    .await;
    let never =
        TestApp::spawn_with(|config| config.malloc_trim_every = std::time::Duration::ZERO).await;
    let url = format!("{}/metrics", trimming.base);
    let trims = wait_until(WAIT, || async {
        let metrics = scrape(&trimming.http, &url).await;
        metrics
            .value("hivesync_heap_trims_total", &[])
            .filter(|trims| *trims >= 3.0)
            .map(|trims| (trims, metrics))
    })
    .await;
    let Some((trims, metrics)) = trims else {
        panic!("the hub did not trim its heap three times within {WAIT:?}");
    };
    // each trim is timed (the duration is observed just after the count goes up)
    let timed = metrics
        .value("hivesync_heap_trim_duration_seconds_count", &[])
        .unwrap_or(0.0);
    assert!(
        timed >= trims - 1.0 && timed <= trims,
        "{timed} timed of {trims}"
    );
    assert!(
        metrics
            .value("hivesync_heap_trimmed_bytes_total", &[])
            .is_some(),
        "the bytes given back are counted"
    );
    // HIVESYNC_MALLOC_TRIM_S=0: never, and the families are there at zero
    let metrics = scrape(&never.http, &format!("{}/metrics", never.base)).await;
    assert_eq!(metrics.value("hivesync_heap_trims_total", &[]), Some(0.0));
    assert_eq!(
        metrics.value("hivesync_heap_trim_duration_seconds_count", &[]),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_worker_process_serves_metrics_health_and_readiness() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let prefix = unique_prefix();
    let worker_dir = tempfile::tempdir().expect("temp dir");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_hivesync"))
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HIVESYNC_REDIS_URL", redis.url())
        .env("HIVESYNC_REDIS_PREFIX", &prefix)
        .env("HIVESYNC_DATA_DIR", worker_dir.path())
        .env("HIVESYNC_WORKERS", "1")
        .env("HIVESYNC_MIN_FREE_BYTES", "0")
        .env("HIVESYNC_FILE_ROOTS", std::env::temp_dir())
        .env("HIVESYNC_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the worker starts");
    let stdout = worker.stdout.take().expect("piped stdout");
    let base = tokio::task::spawn_blocking(move || metrics_address(stdout))
        .await
        .expect("reader joins");
    // a hub on the same Redis, with no workers of its own: the worker process runs it
    let app = TestApp::spawn_with(|config| {
        config.redis_url = Some(redis.url());
        config.redis_prefix = prefix.clone();
        config.serve_workers = Some(0);
    })
    .await;
    let http = hivesync::tls::http_client();

    let health: Value = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");
    let ready = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["engine_kind"], "redis");
    let missing = http
        .get(format!("{base}/api/v1/projects"))
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 404, "the worker serves nothing else");

    let repo = GitRepo::new();
    repo.write("a.txt", "one").commit("one");
    let project = app.register(&repo).await;
    let done = app.sync_to_end(&project).await;
    assert_eq!(done["status"], "completed");
    let counted = wait_until(WAIT, || async {
        let metrics = scrape(&http, &format!("{base}/metrics")).await;
        // a worker answers no API requests: every other family is there
        let families: Vec<&str> = CONTRACT_FAMILIES
            .iter()
            .copied()
            .filter(|family| *family != "hivesync_http_requests")
            .collect();
        metrics.assert_families(&families);
        metrics
            .value(
                "hivesync_syncs_total",
                &[("outcome", "completed"), ("trigger", "api")],
            )
            .filter(|count| *count == 1.0)
    })
    .await;
    assert!(counted.is_some(), "the worker counts the sync it ran");

    app.stop().await;
    crate::lifecycle::terminate(&mut worker);
}

#[tokio::test]
async fn the_openapi_document_and_the_routes_the_server_answers_are_the_same() {
    let app = TestApp::spawn().await;
    let response = app.get_public("/api/v1/openapi.json").await;
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.expect("the document is JSON");
    assert_eq!(document["openapi"], "3.1.0");

    let methods = ["get", "post", "put", "patch", "delete"];
    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            methods
                .iter()
                .filter(|method| item.get(**method).is_some())
                .map(|method| (method.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let routed: BTreeSet<(String, String)> = hivesync::http::ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(documented, routed, "the document lists exactly the routes");

    // the server (warp's routing, which ROUTES does not feed) answers every documented
    // operation with an answer of the operation, never "no such route", and answers
    // every other method on those paths with "no such route"
    let no_route = |body: &Value| {
        body["error"] == "not_found"
            && body["message"]
                .as_str()
                .is_some_and(|message| message.contains("no such route"))
    };
    let paths: BTreeSet<&String> = routed.iter().map(|(_, path)| path).collect();
    for path in paths {
        let concrete = path
            .replace("{project_id}", &uuid::Uuid::now_v7().to_string())
            .replace("{sync_id}", &uuid::Uuid::now_v7().to_string());
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let response = app
                .http
                .request(
                    reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                    format!("{}{concrete}", app.base),
                )
                .bearer_auth(&app.token)
                .json(&json!({}))
                .send()
                .await
                .expect("an answer");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let refused = status == 404 && no_route(&body);
            let listed = routed.contains(&(method.to_owned(), path.clone()));
            assert_eq!(
                !refused, listed,
                "{method} {path}: answered {} ({status} {body}), documented {listed}",
                !refused
            );
        }
    }

    // every operation documents what it answers with, errors included, and every
    // reference resolves
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("schemas");
    let text = document.to_string();
    for reference in text.split("\"$ref\":\"").skip(1) {
        let target = reference.split('"').next().unwrap_or_default();
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("a reference outside the schemas: {target}"));
        assert!(schemas.contains_key(name), "{target} resolves");
    }
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("an item") {
            let responses = operation["responses"].as_object().expect("responses");
            if operation.get("security").is_some() {
                assert!(
                    responses.contains_key("401"),
                    "{method} {path} documents 401"
                );
            }
            let bearer = operation["security"]
                .as_array()
                .is_some_and(|list| list.iter().any(|scheme| scheme.get("bearer").is_some()));
            if bearer {
                assert!(
                    responses.contains_key("503"),
                    "{method} {path} documents the engine being down"
                );
            }
        }
    }
    let schemes = document["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["github_signature"]["name"], "X-Hub-Signature-256");
    app.stop().await;
}

/// `hivesync ARGS` with `env`, off the runtime (the hub runs on it): its exit code,
/// stdout and stderr.
async fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hivesync"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("joins")
        .expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `hivesync ARGS` as a client of `app`: server and token from the environment.
async fn cli(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    run(
        args,
        &[
            ("HIVESYNC_SERVER", &app.base),
            ("HIVESYNC_TOKEN", &app.token),
        ],
    )
    .await
}

#[tokio::test]
async fn the_sync_cli_follows_a_sync_and_exits_by_its_outcome() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "one").commit("one");
    let project = app.register(&repo).await;

    let (code, stdout, stderr) = cli(&app, &["projects"]).await;
    assert_eq!(code, 0, "projects: {stderr}");
    assert!(stdout.contains(&project), "projects lists the id: {stdout}");

    let (code, stdout, stderr) = cli(&app, &["sync", &project]).await;
    assert_eq!(code, 0, "a completed sync exits 0: {stdout} {stderr}");
    // not a terminal: a plain line per stage, then the summary
    for stage in ["running", "updating_files", "completed"] {
        assert!(
            stdout.lines().any(|line| line.starts_with(stage)),
            "a line for {stage}: {stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("completed: {}", repo.head())),
        "prints the commit: {stdout}"
    );
    assert!(
        stdout.contains("changes: first sync, 1 file changed"),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\u{1b}'),
        "no terminal codes when not a terminal"
    );

    repo.write("b.txt", "two").commit("two");
    repo.write("c.txt", "three").commit("three");
    let (code, stdout, _) = cli(&app, &["sync", &project, "--json"]).await;
    assert_eq!(code, 0);
    let record: Value = serde_json::from_str(&stdout).expect("--json prints only the record");
    assert_eq!(record["status"], "completed");
    assert_eq!(record["commit"], repo.head());
    assert_eq!(record["changes"]["commits"], 2);
    assert_eq!(record["changes"]["files_changed"], 2);

    // a sync that fails: exit 1 with the error code and message
    let gone = GitRepo::new();
    gone.write("a.txt", "x").commit("x");
    let broken = app.register(&gone).await;
    std::fs::remove_dir_all(gone.path().join(".git")).expect("remove the remote's repo");
    let (code, _, stderr) = cli(&app, &["sync", &broken]).await;
    assert_eq!(code, 1, "a failed sync exits 1: {stderr}");
    assert!(stderr.contains("failed: repo_not_found"), "{stderr}");

    // usage and connection errors: exit 2
    let (code, _, stderr) = cli(&app, &["sync", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(code, 2, "an unknown project is a usage error");
    assert!(stderr.contains("project_not_found"), "{stderr}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let (code, _, stderr) = run(
        &["sync", &project, "--server", &format!("http://{closed}")],
        &[("HIVESYNC_TOKEN", &app.token)],
    )
    .await;
    assert_eq!(code, 2, "no hub there: {stderr}");
    assert!(stderr.contains("cannot reach the hub"), "{stderr}");
    let (code, _, _) = run(&["sync", &project, "--server", &app.base], &[]).await;
    assert_eq!(code, 2, "no token (clap refuses the missing flag)");
    let (code, _, stderr) = run(
        &["sync", &project, "--server", &app.base, "--token", " "],
        &[],
    )
    .await;
    assert_eq!(code, 2, "an empty token");
    assert!(stderr.contains("a token is needed"), "{stderr}");
    let (code, _, stderr) = run(
        &[
            "sync",
            &project,
            "--server",
            &app.base,
            "--token",
            "not-a-jwt",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "a bad token");
    assert!(stderr.contains("invalid_token"), "says why: {stderr}");
    app.stop().await;
}

/// A TCP relay in front of the hub whose open connections can be cut.
struct Relay {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    /// while false, new connections are closed at once (the hub looks down)
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cuts = cut.clone();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let accepting = std::sync::Arc::clone(&open);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, cut, open }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every connection open now.
    fn cut(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }
}

#[tokio::test]
async fn the_client_resumes_after_a_dropped_socket_with_no_gap_or_duplicate() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "one").commit("one");
    let project = app.register(&repo).await;
    let relay = Relay::start(app.addr).await;
    let client = Client::new(&format!("http://{}", relay.addr), &app.token).expect("client");
    // open once the hub said hello (subscribed); the hello itself is not handed on
    let mut events = client.events(&[&project]).await.expect("events open");
    assert!(events.last_event_id().is_some(), "the hello's id is kept");

    let mut seen: Vec<u64> = Vec::new();
    let mut resumed = 0;
    // three syncs; the socket is cut after each one's first event
    for _ in 0..3 {
        let done = app.request_sync(&project).await;
        let sync_id = done["sync_id"].as_str().expect("sync id").to_owned();
        let mut cut_done = false;
        loop {
            let next = tokio::time::timeout(WAIT, events.next())
                .await
                .expect("an event in time")
                .expect("the stream keeps going");
            match next {
                Next::Resumed => resumed += 1,
                Next::Quiet => {}
                Next::Frame(frame) => {
                    let ServerFrame::Event(event) = *frame else {
                        continue;
                    };
                    seen.push(event.id);
                    if !cut_done {
                        cut_done = true;
                        relay.cut();
                        // the rest of the sync happens while no socket is open
                        app.wait_for_sync(&sync_id).await;
                    }
                    if let EventBody::Notification { sync_id: id, .. } = &event.body
                        && *id == sync_id
                    {
                        break;
                    }
                }
            }
        }
    }
    assert_eq!(resumed, 3, "each cut was followed by one resume");
    assert_eq!(events.reconnects, 3);
    let (_, all) = app
        .get_json("/api/v1/notifications?after=0&limit=1000")
        .await;
    let all: Vec<u64> = all
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|frame| frame["id"].as_u64())
        .collect();
    assert_eq!(seen, all, "every event once, in order, across three cuts");
    app.stop().await;
}

#[tokio::test]
async fn the_worker_refuses_a_metrics_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_hivesync"))
        .arg("worker")
        .env_clear()
        .env("HIVESYNC_REDIS_URL", redis.url())
        .env("HIVESYNC_DATA_DIR", dir.path())
        .env("HIVESYNC_METRICS_LISTEN", addr.to_string())
        .output()
        .expect("runs");
    assert!(
        !output.status.success(),
        "a worker with no metrics address stops"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&addr.to_string()),
        "names the address: {stderr}"
    );
}

/// A wait for frames that is shorter than an outage must not cut the reconnecting
/// short: the CLI used to give up after its 10 s quiet check while the hub restarted.
#[tokio::test]
async fn a_quiet_wait_does_not_cut_a_reconnect_short() {
    let app = TestApp::spawn().await;
    let relay = Relay::start(app.addr).await;
    let client = Client::new(&format!("http://{}", relay.addr), &app.token).expect("client");
    let mut events = client.events(&[]).await.expect("events open");
    assert!(matches!(
        events
            .next_within(Some(std::time::Duration::from_millis(100)))
            .await,
        Ok(Next::Quiet)
    ));
    // the hub goes away for 1.5 s, far longer than the quiet wait
    relay.set_open(false);
    relay.cut();
    let reopen = async {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        relay.set_open(true);
    };
    let (next, ()) = tokio::join!(
        events.next_within(Some(std::time::Duration::from_millis(100))),
        reopen
    );
    assert!(
        matches!(next, Ok(Next::Resumed)),
        "reconnected once the hub was back: {next:?}"
    );
    app.stop().await;
}

/// The README's walk-through, as it is pasted: `register` prints the id alone, so
/// `PROJECT=$(hivesync register URL)` keeps it, and `sync $PROJECT` follows it to the end.
#[tokio::test]
async fn register_prints_the_id_a_shell_keeps_and_sync_takes() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("README.md", "hello\n").commit("first");
    let (code, stdout, stderr) = cli(&app, &["register", &repo.url()]).await;
    assert_eq!(code, 0, "register: {stderr}");
    let project = stdout.trim().to_owned();
    assert_eq!(stdout, format!("{project}\n"), "the id alone on stdout");
    assert!(stderr.contains("registered"), "{stderr}");
    let (status, shown) = app.get_json(&format!("/api/v1/projects/{project}")).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["repo_url"], repo.url());
    let (code, stdout, stderr) = cli(&app, &["sync", &project]).await;
    assert_eq!(code, 0, "{stdout} {stderr}");

    // a refusal says why, and exits non-zero with nothing on stdout
    let (code, stdout, stderr) = cli(&app, &["register", "ftp://example.com/x.git"]).await;
    assert_ne!(code, 0);
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("invalid_request") || stderr.contains("scheme"),
        "{stderr}"
    );
    app.stop().await;
}

/// `hivesync token` says which key signed the token (on stderr; stdout is the token
/// alone) and warns when it had to make a dev secret; a hub with another key answers
/// that token 401 `invalid_token` naming the signature, never echoing the token.
#[tokio::test]
async fn a_token_from_another_key_is_explained_on_both_ends() {
    let app = TestApp::spawn().await;
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let data = elsewhere.path().join("data");
    let data_dir = data.to_string_lossy().into_owned();
    let (code, stdout, stderr) = run(
        &["token", "--sub", "alice"],
        &[("HIVESYNC_DATA_DIR", data_dir.as_str())],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let minted = stdout.trim().to_owned();
    assert_eq!(stdout, format!("{minted}\n"), "the token alone on stdout");
    assert!(
        stderr.contains("made a new one") && stderr.contains(&data_dir),
        "warns where it made a secret: {stderr}"
    );
    let (code, _, stderr) = run(
        &["token", "--sub", "alice"],
        &[("HIVESYNC_DATA_DIR", data_dir.as_str())],
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        stderr.contains("signed with the dev secret kept in"),
        "{stderr}"
    );

    let response = app.get("/api/v1/projects", &minted).await;
    assert_eq!(response.status(), 401);
    let body = response.text().await.expect("body");
    assert!(
        body.contains("invalid_token") && body.contains("signature"),
        "{body}"
    );
    assert!(!body.contains(&minted), "the token is not echoed");

    // a pasted token with a non-ASCII ellipsis is a bad token, not a missing route
    let pasted = reqwest::header::HeaderValue::from_bytes("Bearer eyJ0eXAi…".as_bytes())
        .expect("obs-text is a valid header value");
    let response = app
        .http
        .get(format!("{}/api/v1/projects", app.base))
        .header(reqwest::header::AUTHORIZATION, pasted)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"], "invalid_token");
    app.stop().await;
}

#[tokio::test]
async fn the_cli_names_what_it_needs_and_heads_its_columns() {
    let app = TestApp::spawn().await;
    let (code, stdout, stderr) = run(&["projects"], &[("HIVESYNC_SERVER", &app.base)]).await;
    assert_eq!(code, 2, "{stdout} {stderr}");
    assert!(stderr.contains("HIVESYNC_TOKEN"), "{stderr}");
    let repo = GitRepo::new();
    repo.write("a.txt", "a").commit("one");
    let project = app.register(&repo).await;
    let (code, stdout, _) = cli(&app, &["projects"]).await;
    assert_eq!(code, 0);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("PROJECT\tNAME\tBRANCH\tLAST STATUS"));
    assert!(lines.next().is_some_and(|line| line.starts_with(&project)));
    app.stop().await;
}

/// `serve` with no secret configured says where its dev secret is, never the secret.
#[tokio::test]
async fn serve_does_not_print_its_dev_secret() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hivesync"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HIVESYNC_LISTEN", "127.0.0.1:0")
        .env("HIVESYNC_DATA_DIR", data.path())
        .env("HIVESYNC_MIN_FREE_BYTES", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let banner = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut banner = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("WebSocket:") {
                break;
            }
        }
        banner
    })
    .await
    .expect("joined");
    crate::lifecycle::terminate(&mut child);
    let secret = std::fs::read_to_string(data.path().join("dev-jwt-secret")).expect("kept");
    assert!(banner.contains("dev-jwt-secret"), "says where: {banner}");
    assert!(
        !banner.contains(secret.trim()),
        "the secret is not printed: {banner}"
    );
}
