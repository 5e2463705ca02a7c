//! A reply lost after Redis ran the command: the publish of an event that a worker
//! retries reaches every client once. The fault is a TCP proxy in front of a real
//! Redis that lets a chosen request through and cuts its connection before the reply.

use std::time::Duration;

use crate::helpers::{GitRepo, TestApp, WAIT, WsRead, is_notification};
use crate::redis_server::{redis_or_skip, unique_prefix};

/// A TCP proxy in front of Redis that, once armed with a pattern, cuts the first
/// connection whose request contains it: the request reaches Redis and runs, but no
/// reply comes back on that connection from then on, and it is closed a moment later.
/// Its caller only learns that the connection died. The proxy counts the replies it
/// withheld so: Redis answered, so it ran the request.
struct CuttingProxy {
    url: String,
    armed: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    withheld: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    fn arm(&self, pattern: &str) {
        *self.armed.lock().expect("not poisoned") = Some(pattern.into());
    }

    fn fired(&self) -> bool {
        self.armed.lock().expect("not poisoned").is_none()
    }

    fn withheld(&self) -> usize {
        self.withheld.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn request_cutting_proxy(upstream: &str) -> CuttingProxy {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = upstream
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("proxy binds");
    let url = format!("redis://{}/", listener.local_addr().expect("bound"));
    let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    let withheld = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let armed_for = armed.clone();
    let withheld_for = withheld.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let armed = armed_for.clone();
            let withheld = withheld_for.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let cut = AtomicBool::new(false);
                let requests = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let hit = {
                            let mut armed = armed.lock().expect("not poisoned");
                            let hit = armed.as_ref().is_some_and(|pattern| {
                                buf[..n].windows(pattern.len()).any(|w| w == &pattern[..])
                            });
                            if hit {
                                *armed = None;
                            }
                            hit
                        };
                        // set before the request leaves: its reply is never passed on
                        let withheld_before = withheld.load(Ordering::SeqCst);
                        if hit {
                            cut.store(true, Ordering::SeqCst);
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        if hit {
                            // until Redis has run it and answered (the reply withheld;
                            // an fsync of its append-only file can take a while on a
                            // busy disk), at most 10 s; then both sides close
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                            while withheld.load(Ordering::SeqCst) == withheld_before
                                && tokio::time::Instant::now() < deadline
                            {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            return;
                        }
                    }
                };
                let replies = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cut.load(Ordering::SeqCst) {
                            withheld.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = requests => {}
                    _ = replies => {}
                }
            });
        }
    });
    CuttingProxy {
        url,
        armed,
        withheld,
    }
}

async fn redis_engine(
    url: String,
    prefix: &str,
) -> std::sync::Arc<hivesync::engine::redis::RedisEngine> {
    hivesync::engine::redis::RedisEngine::connect(hivesync::engine::redis::RedisSettings {
        cluster: url.contains(','),
        url,
        prefix: prefix.to_owned(),
        reclaim_after: Duration::from_secs(30),
        history_len: 100,
        sync_rate: (100, Duration::from_secs(1)),
        rules: Default::default(),
        pool_size: 2,
    })
    .await
    .expect("redis engine connects")
}

fn stage_event(n: u64) -> hivesync::protocol::EventBody {
    hivesync::protocol::EventBody::SyncStage {
        sync_id: format!("sync-{n}"),
        project_id: "project".into(),
        stage: hivesync::protocol::SyncStatus::Running,
        progress: None,
        at: hivesync::domain::now_rfc3339(),
        retry: None,
    }
}

/// The ids of `user`'s kept events.
async fn kept_ids(engine: &hivesync::engine::redis::RedisEngine, user: &str) -> Vec<u64> {
    use hivesync::engine::EventLog;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match engine.after(user, 0, 100).await {
            Ok(history) => return history.events.iter().map(|event| event.id).collect(),
            // the shared connection is being made again after the proxy closed it
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => panic!("history unreadable: {err}"),
        }
    }
}

/// As a worker's retries do: the publish again until it succeeds, with the same once
/// key (`Some`) or as a plain publish (`None`).
async fn publish_until_it_succeeds(
    engine: &hivesync::engine::redis::RedisEngine,
    user: &str,
    once: Option<&str>,
) -> u64 {
    use hivesync::engine::EventLog;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let published = match once {
            Some(once) => engine.publish_once(user, stage_event(1), once).await,
            None => engine.publish(user, stage_event(1)).await,
        };
        match published {
            Ok(event) => return event.id,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => panic!("the publish never went through: {err}"),
        }
    }
}

/// A worker retries a stage change or notification whose publish failed. When the
/// failure was a reply lost after the script ran, a plain retry would publish the
/// event a second time, under a new id, and every client would get it twice; the
/// retry with the same once key is answered with the first id and publishes nothing.
#[tokio::test]
async fn a_publish_retried_after_its_reply_was_lost_is_kept_once() {
    use hivesync::engine::EventLog;
    let Some(redis) = redis_or_skip() else { return };
    let proxy = request_cutting_proxy(&redis.url()).await;
    let prefix = unique_prefix();
    let engine = redis_engine(proxy.url.clone(), &prefix).await;
    // loads the script, so the reply lost below is the script's own
    engine
        .publish("warm", stage_event(0))
        .await
        .expect("a publish goes through the proxy");

    // a plain publish, retried: the lost reply's event is kept, and the retry's too
    proxy.arm("sync-1");
    assert!(
        engine.publish("plain", stage_event(1)).await.is_err(),
        "the caller never heard the reply"
    );
    assert_eq!(kept_ids(&engine, "plain").await, vec![1], "the script ran");
    publish_until_it_succeeds(&engine, "plain", None).await;
    assert_eq!(
        kept_ids(&engine, "plain").await,
        vec![1, 2],
        "without a once key the retry is a second event"
    );

    // the same with a once key: the retry gets the first event's id back
    proxy.arm("sync-1");
    assert!(
        engine
            .publish_once("keyed", stage_event(1), "k1")
            .await
            .is_err(),
        "the caller never heard the reply"
    );
    assert_eq!(kept_ids(&engine, "keyed").await, vec![1], "the script ran");
    let id = publish_until_it_succeeds(&engine, "keyed", Some("k1")).await;
    assert_eq!(id, 1, "the retry is answered with the event it repeats");
    assert_eq!(
        kept_ids(&engine, "keyed").await,
        vec![1],
        "and published nothing again"
    );
    assert_eq!(
        engine.latest("keyed").await.expect("latest"),
        1,
        "no id was spent on the retry"
    );
    // another key is another event
    let next = publish_until_it_succeeds(&engine, "keyed", Some("k2")).await;
    assert_eq!(next, 2);

    // the key does not outlive what a retry could need (an hour)
    let ttl: i64 = redis
        .query(redis::cmd("TTL").arg(format!("{prefix}:event-once:5:keyed:k1")))
        .await;
    assert!((1..=600).contains(&ttl), "the once key expires: ttl {ttl}");
    assert!(proxy.withheld() >= 2, "Redis answered both cut requests");
}

/// On a cluster the once key lives in its user's slot, beside the sequence and the
/// history the script writes (a key in another slot would fail with CROSSSLOT).
#[tokio::test]
async fn on_a_cluster_a_publish_repeated_with_its_once_key_is_kept_once() {
    use hivesync::engine::EventLog;
    let Some(redis) = crate::redis_server::redis_cluster_or_skip() else {
        return;
    };
    let engine = redis_engine(redis.url(), &unique_prefix()).await;
    for user in ["alice", "bob", "carol"] {
        let first = engine
            .publish_once(user, stage_event(1), "k1")
            .await
            .expect("publishes");
        let again = engine
            .publish_once(user, stage_event(1), "k1")
            .await
            .expect("publishes");
        assert_eq!((first.id, again.id), (1, 1), "{user}: one event");
        assert_eq!(kept_ids(&engine, user).await, vec![1], "{user}: kept once");
    }
}

/// End to end, through a hub on Redis with its in-process worker: the publish of a
/// sync's `repo_sync_success` runs on Redis but its reply is lost with the connection.
/// The worker retries it, and the client on the socket hears the notification once,
/// and the history keeps it once (a plain retry would publish it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_whose_publish_reply_was_lost_reaches_the_socket_once() {
    let Some(redis) = redis_or_skip() else { return };
    let proxy = request_cutting_proxy(&redis.url()).await;
    let data = tempfile::tempdir().expect("temp dir");
    let prefix = unique_prefix();
    let url = proxy.url.clone();
    let app = TestApp::spawn_on(data.path(), move |config| {
        config.redis_url = Some(url);
        config.redis_prefix = prefix;
        config.serve_workers = Some(1);
    })
    .await;
    let repo = GitRepo::new();
    repo.write("README.md", "hello\n");
    repo.commit("first");
    let project = app.register(&repo).await;
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;

    proxy.arm("repo_sync_success");
    let accepted = app.request_sync(&project).await;
    let sync_id = accepted["sync_id"].as_str().expect("sync_id").to_owned();
    let mut frames = socket
        .until(|frame| is_notification(frame, "repo_sync_success"))
        .await;
    // long past the worker's retry
    while let Some(WsRead::Json(frame)) = socket.read(Duration::from_secs(3)).await {
        frames.push(frame);
    }
    assert!(proxy.fired(), "the notification's publish was cut");
    assert!(proxy.withheld() >= 1, "after Redis had answered it");
    let heard = frames
        .iter()
        .filter(|frame| is_notification(frame, "repo_sync_success"))
        .filter(|frame| frame["sync_id"] == sync_id.as_str())
        .count();
    assert_eq!(
        heard, 1,
        "the socket heard the notification once: {frames:?}"
    );
    let record = app.wait_for_sync(&sync_id).await;
    assert_eq!(record["status"], "completed");
    let (_, history) = app.get_json("/api/v1/notifications?limit=100").await;
    let kept = history
        .as_array()
        .expect("a list")
        .iter()
        .filter(|event| is_notification(event, "repo_sync_success"))
        .filter(|event| event["sync_id"] == sync_id.as_str())
        .count();
    assert_eq!(kept, 1, "the history kept it once: {history}");
}
