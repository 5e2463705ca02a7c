//! The fault-injection suite: a private Redis, two hubs, two `hivesync worker`
//! processes and a WebSocket client per user; commits pushed and syncs requested while
//! workers are killed with SIGKILL at arbitrary moments and Redis is restarted once.
//! At the end every requested sync has completed, every mirror is exactly its
//! upstream head, and every client received every notification exactly once.
//! `HIVESYNC_CHAOS_ROUNDS` runs more rounds (a soak); the default keeps it short.

use std::collections::{BTreeSet, HashMap};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::helpers::{GitRepo, TestApp, WAIT, WsRead, assert_exact_tree, token, wait_until};
use crate::redis_server::{RedisServer, redis_or_skip, spawn_worker_with, unique_prefix};
use hivesync::auth::ClientKind;

const RECLAIM_MS: u64 = 800;
/// Events kept per user: every event of a long run (`HIVESYNC_CHAOS_ROUNDS=40` makes
/// over a thousand), so the end check finds each sync's notification in the history.
const HISTORY: &str = "100000";

async fn hub(redis: &RedisServer, prefix: &str, data: &std::path::Path) -> TestApp {
    let (url, cluster, prefix) = (redis.url(), redis.cluster, prefix.to_owned());
    TestApp::spawn_on(data, move |config| {
        config.redis_url = Some(url);
        config.redis_cluster = cluster;
        config.redis_prefix = prefix;
        config.serve_workers = Some(0);
        config.reclaim_after = Duration::from_millis(RECLAIM_MS);
        config.retry_base = Duration::from_millis(50);
        config.event_history = HISTORY.parse().expect("a number");
    })
    .await
}

/// Every frame one user's socket received, reconnecting with `last_event_id` after
/// any close, until `stop`.
fn collect(
    addr: std::net::SocketAddr,
    user_token: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut frames: Vec<Value> = Vec::new();
        let mut last_id = 0u64;
        loop {
            let url = format!("ws://{addr}/api/v1/ws?last_event_id={last_id}");
            let mut request =
                tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                    .expect("request");
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {user_token}").parse().expect("header"),
            );
            if stop.is_cancelled() {
                return frames;
            }
            let Ok((socket, _)) = tokio_tungstenite::connect_async(request).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut client = crate::helpers::WsClient { socket };
            loop {
                let read = tokio::select! {
                    _ = stop.cancelled() => return frames,
                    read = client.read(Duration::from_secs(60)) => read,
                };
                match read {
                    Some(WsRead::Json(frame)) => {
                        if let Some(id) = frame["id"].as_u64() {
                            last_id = last_id.max(id);
                        }
                        frames.push(frame);
                    }
                    _ => break,
                }
            }
        }
    })
}

fn kill(child: &mut Child) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// A deterministic spread of moments and choices (no RNG crate for a test).
fn pick(round: u64, salt: u64, modulo: u64) -> u64 {
    let mut x =
        round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 29)) % modulo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syncs_survive_worker_kills_and_a_redis_restart_with_every_notification_once() {
    if let Some(redis) = redis_or_skip() {
        syncs_survive_worker_kills_and_a_redis_restart_with_every_notification_once_on(redis).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_syncs_survive_worker_kills_and_a_redis_restart_with_every_notification_once()
{
    if let Some(redis) = crate::redis_server::redis_cluster_or_skip() {
        syncs_survive_worker_kills_and_a_redis_restart_with_every_notification_once_on(redis).await;
    }
}

async fn syncs_survive_worker_kills_and_a_redis_restart_with_every_notification_once_on(
    mut redis: RedisServer,
) {
    let rounds: u64 = std::env::var("HIVESYNC_CHAOS_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6);
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let hubs = [
        hub(&redis, &prefix, data.path()).await,
        hub(&redis, &prefix, data.path()).await,
    ];
    let mut workers: Vec<Child> = (0..2)
        .map(|n| {
            spawn_worker_with(
                &redis,
                &prefix,
                data.path(),
                RECLAIM_MS,
                &logs.path().join(format!("worker-{n}-0.log")),
                &[("HIVESYNC_EVENT_HISTORY", HISTORY)],
            )
        })
        .collect();

    let users = ["alice", "bob"];
    let tokens: HashMap<&str, String> = users
        .iter()
        .map(|user| (*user, token(user, ClientKind::Desktop)))
        .collect();
    let mut projects = Vec::new();
    for (index, user) in users.iter().enumerate() {
        let repo = GitRepo::new();
        repo.write("README.md", &format!("{user}'s project\n"));
        repo.commit("first");
        let id = hubs[index % 2].register_as(&tokens[user], &repo).await;
        projects.push((*user, id, repo));
    }
    let stop = CancellationToken::new();
    let collectors: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(index, user)| {
            // each user's socket on the other hub than their projects' requests
            (
                *user,
                collect(
                    hubs[(index + 1) % 2].addr,
                    tokens[user].clone(),
                    stop.clone(),
                ),
            )
        })
        .collect();

    let requested = Arc::new(Mutex::new(BTreeSet::<(String, String)>::new()));
    for round in 0..rounds {
        for (index, (user, id, repo)) in projects.iter().enumerate() {
            repo.write("round.txt", &format!("round {round}\n"));
            repo.commit(&format!("round {round}"));
            let hub = &hubs[(round as usize + index) % 2];
            let accepted = wait_until(WAIT, || async {
                let response = hub
                    .post(
                        "/api/v1/repo/sync",
                        &tokens[user],
                        json!({"project_id": id}),
                    )
                    .await;
                // 503 while Redis restarts: the client retries, as the header says
                matches!(response.status().as_u16(), 200 | 202).then(|| response)
            })
            .await
            .expect("the sync request is accepted");
            let accepted: Value = accepted.json().await.expect("json");
            let sync_id = accepted["sync_id"].as_str().expect("sync id").to_owned();
            requested.lock().await.insert((user.to_string(), sync_id));
        }
        // SIGKILL one worker at an arbitrary moment of the round, and replace it
        tokio::time::sleep(Duration::from_millis(pick(round, 1, 400))).await;
        let victim = pick(round, 2, 2) as usize;
        kill(&mut workers[victim]);
        workers[victim] = spawn_worker_with(
            &redis,
            &prefix,
            data.path(),
            RECLAIM_MS,
            &logs
                .path()
                .join(format!("worker-{victim}-{}.log", round + 1)),
            &[("HIVESYNC_EVENT_HISTORY", HISTORY)],
        );
        if round == rounds / 2 {
            redis.restart();
        }
    }

    // every requested sync ends, completed
    let requested: Vec<(String, String)> = requested.lock().await.iter().cloned().collect();
    for (user, sync_id) in &requested {
        let record = wait_until(Duration::from_secs(120), || async {
            let response = hubs[0]
                .get(
                    &format!("/api/v1/repo/sync/{sync_id}"),
                    &tokens[user.as_str()],
                )
                .await;
            let record: Value = response.json().await.ok()?;
            matches!(record["status"].as_str(), Some("completed" | "failed")).then_some(record)
        })
        .await
        .unwrap_or_else(|| panic!("sync {sync_id} of {user} never ended"));
        assert_eq!(record["status"], "completed", "{user}: {record}");
    }
    // every mirror is exactly its upstream head
    for (_, id, repo) in &projects {
        let head = repo.head();
        let settled = wait_until(WAIT, || async {
            let project_id = hivesync::domain::ProjectId::parse(id).expect("id");
            let project = hubs[0]
                .state
                .engine
                .store
                .project(&project_id)
                .await
                .ok()??;
            (project.commit.as_deref() == Some(head.as_str()) && project.active_sync.is_none())
                .then_some(())
        })
        .await;
        assert!(settled.is_some(), "project {id} ends at the upstream head");
        assert_exact_tree(&hubs[0], id, repo, &head);
    }
    assert_settled(&hubs[0], &requested, &tokens, Some((&redis, &prefix))).await;
    // every client got every notification of its user exactly once
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for (user, collector) in collectors {
        let frames = collector.await.expect("collector");
        let history: Vec<Value> = hubs[0]
            .get("/api/v1/notifications?limit=10000", &tokens[user])
            .await
            .json()
            .await
            .expect("json");
        assert_each_notification_once(user, &frames, &history);
    }
    for worker in &mut workers {
        kill(worker);
    }
    for hub in hubs {
        hub.stop().await;
    }
}

/// How many end notifications (`repo_sync_success` or `repo_sync_failed`) of
/// `sync_id` a user's history holds.
fn end_notifications(history: &[Value], sync_id: &str) -> usize {
    history
        .iter()
        .filter(|event| event["sync_id"] == sync_id)
        .filter(|event| {
            matches!(
                event["kind"].as_str(),
                Some("repo_sync_success" | "repo_sync_failed")
            )
        })
        .count()
}

/// The state every run must end in, whatever was killed: each requested sync has
/// exactly one end notification (`repo_sync_success` or `repo_sync_failed`) in its
/// owner's history, no job waits on the queue, and (on Redis) no project lock is held.
/// The syncs being final and the mirrors exact are checked by the caller.
async fn assert_settled(
    hub: &TestApp,
    requested: &[(String, String)],
    tokens: &HashMap<&str, String>,
    redis: Option<(&RedisServer, &str)>,
) {
    let mut by_user: HashMap<&str, Vec<String>> = HashMap::new();
    for (user, sync_id) in requested {
        by_user
            .entry(user.as_str())
            .or_default()
            .push(sync_id.clone());
    }
    // how many end notifications each of `user`'s syncs has in their history
    let ends_of = |user: &str, syncs: Vec<String>| {
        let token = tokens[user].clone();
        async move {
            let history: Vec<Value> = hub
                .get("/api/v1/notifications?limit=10000", &token)
                .await
                .json()
                .await
                .expect("json");
            syncs
                .iter()
                .map(|sync_id| (sync_id.clone(), end_notifications(&history, sync_id)))
                .collect::<Vec<_>>()
        }
    };
    for (user, syncs) in by_user {
        // a worker killed after storing a sync's end leaves its notification to the
        // worker that takes the job over, a reclaim later: wait for every one
        let all_there = wait_until(WAIT, || async {
            ends_of(user, syncs.clone())
                .await
                .iter()
                .all(|(_, ends)| *ends > 0)
                .then_some(())
        })
        .await;
        // then once more, after a reclaim's time, for any that came twice
        tokio::time::sleep(Duration::from_millis(2 * RECLAIM_MS)).await;
        for (sync_id, ends) in ends_of(user, syncs.clone()).await {
            assert_eq!(
                ends, 1,
                "{user}: sync {sync_id} has {ends} end notifications (all there: {all_there:?})"
            );
        }
    }
    let drained = wait_until(WAIT, || async {
        let depth = hub
            .metrics()
            .await
            .value("hivesync_sync_queue_depth", &[])
            .unwrap_or(f64::NAN);
        (depth == 0.0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "jobs are left on the queue");
    if let Some((redis, prefix)) = redis {
        let released = wait_until(WAIT, || async {
            let locks: Vec<String> = redis
                .query(redis::cmd("KEYS").arg(format!("{prefix}*:lock:*")))
                .await;
            locks.is_empty().then_some(())
        })
        .await;
        assert!(released.is_some(), "a project lock is still held");
    }
}

/// Notification ids in `frames`, checked to be unique, equal to those in `history`.
fn assert_each_notification_once(user: &str, frames: &[Value], history: &[Value]) {
    let received: Vec<u64> = frames
        .iter()
        .filter(|frame| frame["type"] == "notification")
        .filter_map(|frame| frame["id"].as_u64())
        .collect();
    let unique: BTreeSet<u64> = received.iter().copied().collect();
    assert_eq!(
        unique.len(),
        received.len(),
        "{user}: a notification came twice"
    );
    let kept: BTreeSet<u64> = history
        .iter()
        .filter(|event| event["type"] == "notification")
        .filter_map(|event| event["id"].as_u64())
        .collect();
    assert_eq!(
        unique, kept,
        "{user}: every notification reached the socket"
    );
    assert!(
        !frames
            .iter()
            .any(|frame| frame["type"] == "resync_required"),
        "{user}: no resync was needed"
    );
}

/// The embedded engine's version: one `hivesync serve` process, SIGKILLed at varying
/// moments and started again on the same data and port while syncs are requested.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_syncs_survive_hub_kills_with_every_notification_once() {
    let rounds: u64 = std::env::var("HIVESYNC_CHAOS_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("HIVESYNC_LISTEN", listen.as_str()),
        ("HIVESYNC_ALLOWED_SCHEMES", "file"),
        ("HIVESYNC_SYNC_RATE", "10000/min"),
        ("HIVESYNC_WORKERS", "2"),
        ("HIVESYNC_EVENT_HISTORY", HISTORY),
    ];
    let start = |generation: u64| {
        let log = std::fs::File::create(logs.path().join(format!("serve-{generation}.log")))
            .expect("log");
        crate::lifecycle::serve_binary_logging_to(data.path(), &env, log.into())
    };
    let (mut server, addr) = start(0).await;
    let base = format!("http://{addr}");
    let alice = token("alice", ClientKind::Desktop);
    let http = hivesync::tls::http_client();
    // a request that may meet a dead or restarting hub: retried until it is answered
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let (http, base, alice) = (http.clone(), base.clone(), alice.clone());
        async move {
            wait_until(Duration::from_secs(60), || async {
                let mut request = http
                    .request(method.clone(), format!("{base}{path}"))
                    .bearer_auth(&alice);
                if let Some(body) = &body {
                    request = request.json(body);
                }
                let response = request.send().await.ok()?;
                response.status().is_success().then_some(())?;
                response.json::<Value>().await.ok()
            })
            .await
            .expect("the hub answers")
        }
    };
    let mut projects = Vec::new();
    for name in ["one", "two"] {
        let repo = GitRepo::new();
        repo.write("README.md", &format!("{name}\n"));
        repo.commit("first");
        let created = call(
            reqwest::Method::POST,
            "/api/v1/projects".into(),
            Some(json!({"name": name, "repo_url": repo.url()})),
        )
        .await;
        projects.push((created["project_id"].as_str().expect("id").to_owned(), repo));
    }
    let stop = CancellationToken::new();
    let collector = collect(addr.parse().expect("addr"), alice.clone(), stop.clone());
    let mut requested = Vec::new();
    for round in 0..rounds {
        for (id, repo) in &projects {
            repo.write("round.txt", &format!("round {round}\n"));
            repo.commit(&format!("round {round}"));
            let accepted = call(
                reqwest::Method::POST,
                "/api/v1/repo/sync".into(),
                Some(json!({"project_id": id})),
            )
            .await;
            requested.push(accepted["sync_id"].as_str().expect("id").to_owned());
        }
        tokio::time::sleep(Duration::from_millis(pick(round, 3, 300))).await;
        kill(&mut server);
        (server, _) = start(round + 1).await;
    }
    for sync_id in &requested {
        let ended = wait_until(Duration::from_secs(120), || async {
            let record = call(
                reqwest::Method::GET,
                format!("/api/v1/repo/sync/{sync_id}"),
                None,
            )
            .await;
            matches!(record["status"].as_str(), Some("completed" | "failed")).then_some(record)
        })
        .await
        .unwrap_or_else(|| panic!("sync {sync_id} never ended"));
        assert_eq!(ended["status"], "completed", "{ended}");
    }
    for (id, repo) in &projects {
        let head = repo.head();
        let settled = wait_until(WAIT, || async {
            let project = call(reqwest::Method::GET, format!("/api/v1/projects/{id}"), None).await;
            (project["commit"] == head.as_str()).then_some(())
        })
        .await;
        assert!(settled.is_some(), "project {id} ends at the upstream head");
        crate::helpers::assert_exact_worktree(&data.path().join("repos").join(id), repo, &head);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let frames = collector.await.expect("collector");
    let history = call(
        reqwest::Method::GET,
        "/api/v1/notifications?limit=10000".into(),
        None,
    )
    .await;
    let history = history.as_array().expect("a list");
    assert_each_notification_once("alice", &frames, history);
    // each sync's end is in the history exactly once, and no job is left waiting
    for sync_id in &requested {
        let ends = end_notifications(history, sync_id);
        assert_eq!(ends, 1, "sync {sync_id} has {ends} end notifications");
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let depth =
        crate::operating::parse_exposition(&metrics).value("hivesync_sync_queue_depth", &[]);
    assert_eq!(depth, Some(0.0), "jobs are left on the queue");
    kill(&mut server);
}
