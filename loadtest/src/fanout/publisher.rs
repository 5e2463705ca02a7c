//! How events get into a target: through the engine (as a worker publishes), down the
//! embedded hub child's standard input, or into Redis as Socket.IO's emitter does. Also
//! `loadtest embedded-hub`, the child process that runs an embedded hub for the fan-out.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

use hivesync::engine::EventLog;
use hivesync::protocol::{EventBody, Progress, SyncStatus};

/// Publishes one event for `user` with sequence `seq` (the target's own numbering).
pub(super) enum Publisher {
    Engine(Arc<dyn EventLog>),
    /// a child process publishes what it reads here: the embedded hub itself, or for
    /// the Redis targets `loadtest redis-publisher`, a process of its own as a worker
    /// is (publishing from the process that also runs the 10,000 clients starved the
    /// publisher: a burst took seconds to go out)
    Pipe(Mutex<tokio::process::ChildStdin>),
    SocketIo {
        redis: redis::aio::MultiplexedConnection,
    },
}

impl Publisher {
    /// One event for every user, `seqs[user]` being its sequence number, each stamped
    /// `intended` (when it was due, not when it went out).
    pub(super) async fn publish_round(
        self: &Arc<Self>,
        seqs: &[u64],
        intended: u64,
        durable: bool,
    ) -> Result<(), String> {
        if let Publisher::Pipe(stdin) = &**self {
            use tokio::io::AsyncWriteExt;
            let mut lines = String::with_capacity(seqs.len() * 32);
            for (user, seq) in seqs.iter().enumerate() {
                lines.push_str(&format!("{user} {seq} {intended} {}\n", u8::from(durable)));
            }
            let mut stdin = stdin.lock().await;
            return stdin
                .write_all(lines.as_bytes())
                .await
                .map_err(|e| format!("embedded hub: {e}"));
        }
        let sends = seqs.iter().enumerate().map(|(user, seq)| {
            let publisher = Arc::clone(self);
            let seq = *seq;
            async move { publisher.publish(user, seq, intended, durable).await }
        });
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }

    /// One event stamped `intended`, published in the background unless it is a line
    /// on a pipe; the returned task ends with its outcome.
    pub(super) async fn publish_one(
        self: &Arc<Self>,
        user: usize,
        seq: u64,
        intended: u64,
        durable: bool,
    ) -> Result<Option<tokio::task::JoinHandle<Result<(), String>>>, String> {
        if let Publisher::Pipe(stdin) = &**self {
            use tokio::io::AsyncWriteExt;
            let line = format!("{user} {seq} {intended} {}\n", u8::from(durable));
            let mut stdin = stdin.lock().await;
            stdin
                .write_all(line.as_bytes())
                .await
                .map_err(|e| format!("embedded hub: {e}"))?;
            return Ok(None);
        }
        let publisher = Arc::clone(self);
        Ok(Some(tokio::spawn(async move {
            publisher.publish(user, seq, intended, durable).await
        })))
    }

    pub(super) async fn publish(
        &self,
        user: usize,
        seq: u64,
        emitted: u64,
        durable: bool,
    ) -> Result<(), String> {
        match self {
            Publisher::Pipe(_) => Err("pipe publishers publish whole rounds".into()),
            Publisher::Engine(events) => {
                publish_event(events.as_ref(), user, seq, emitted, durable).await
            }
            Publisher::SocketIo { redis } => {
                let room = format!("user-{user}");
                let packet = json!([
                    "emitter",
                    {"type": 2, "data": ["e", {"s": seq, "t": emitted, "project_id": format!("project-{user}"), "stage": "running", "percent": seq % 100}], "nsp": "/"},
                    {"rooms": [room], "except": [], "flags": {}}
                ]);
                let bytes = rmp_serde::to_vec(&packet).map_err(|e| e.to_string())?;
                let mut redis = redis.clone();
                redis::cmd("PUBLISH")
                    .arg(format!("socket.io#/#{room}#"))
                    .arg(bytes)
                    .query_async::<i64>(&mut redis)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// The event a worker would publish, stamped with its intended emit time: a progress
/// tick (which the embedded engine may commit without an fsync), or with `durable` a
/// stage change (committed durably, as stage changes and notifications are); with a
/// once key, as a worker publishes every event.
pub(super) async fn publish_event(
    events: &dyn EventLog,
    user: usize,
    seq: u64,
    emitted: u64,
    durable: bool,
) -> Result<(), String> {
    let (stage, progress) = if durable {
        (SyncStatus::Finalizing, None)
    } else {
        (
            SyncStatus::Running,
            Some(Progress {
                percent: (seq % 100) as u8,
                objects: seq,
                bytes: seq * 1024,
            }),
        )
    };
    let body = EventBody::SyncStage {
        sync_id: format!("t{emitted}"),
        project_id: format!("project-{user}"),
        stage,
        progress,
        at: hivesync::domain::now_rfc3339(),
        retry: None,
    };
    // a worker gives each event a once key, which Redis keeps for its retries
    events
        .publish_once(&user_name(user), body, &format!("{seq}-{emitted}"))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `loadtest embedded-hub`: a hub with the embedded engine in this process, printing
/// its address, then publishing each `user seq intended_ns durable` line of standard
/// input.
pub async fn embedded_hub() -> Result<Value, String> {
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    // the one setting a run may change, as `serve` reads it: a slow (emulated) machine
    // needs the server's pings further apart
    let ws_idle_timeout = std::env::var("HIVESYNC_WS_IDLE_TIMEOUT_S")
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .map_or(
            hivesync::config::Config::default().ws_idle_timeout,
            |secs| std::time::Duration::from_secs(secs.max(1)),
        );
    let config = hivesync::config::Config {
        listen: "127.0.0.1:0".parse().map_err(|_| "address")?,
        data_dir: data.path().to_path_buf(),
        jwt_secret: Some(crate::SECRET.to_owned()),
        min_free_bytes: 0,
        serve_workers: Some(0),
        ws_idle_timeout,
        ..hivesync::config::Config::default()
    };
    let app = hivesync::app::Application::build(config)
        .await
        .map_err(|e| e.to_string())?;
    let events = app.state().engine.events.clone();
    println!("hivesync serving on http://{}", app.local_addr());
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut fields = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(user)), Some(Ok(seq)), Some(Ok(emitted)), Some(Ok(durable))) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let durable = durable == 1;
        // as concurrent workers would: the engine commits what is waiting together
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(err) =
                publish_event(events.as_ref(), user as usize, seq, emitted, durable).await
            {
                eprintln!("publish failed: {err}");
            }
        });
    }
    stop.cancel();
    let _ = running.await;
    Ok(json!({"scenario": "embedded-hub"}))
}

/// `loadtest redis-publisher`: publishes each `user seq intended_ns durable` line of
/// standard input into the Redis at `url`, through the engine's publish as `hivesync
/// worker` does, or (`socketio`) as `@socket.io/redis-emitter` does; every line at
/// once, as concurrent workers would. Prints `publisher ready` when connected.
pub async fn redis_publisher(url: String, cluster: bool, socketio: bool) -> Result<Value, String> {
    let publisher = if socketio {
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        Publisher::SocketIo { redis: connection }
    } else {
        let engine =
            hivesync::engine::redis::RedisEngine::connect(hivesync::engine::redis::RedisSettings {
                cluster,
                url,
                prefix: "fanout".into(),
                reclaim_after: std::time::Duration::from_secs(60),
                history_len: 1000,
                sync_rate: (30, std::time::Duration::from_secs(60)),
                rules: Default::default(),
                pool_size: 64,
            })
            .await
            .map_err(|e| e.to_string())?;
        Publisher::Engine(engine)
    };
    let publisher = Arc::new(publisher);
    println!("publisher ready");
    // every line that is waiting goes out at once (one connection pipelines them),
    // each user's in the order they came: Socket.IO clients check our numbering
    let (lines_tx, mut lines_rx) =
        tokio::sync::mpsc::unbounded_channel::<(usize, u64, u64, bool)>();
    let sender = tokio::spawn(async move {
        while let Some(first) = lines_rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 4096 {
                match lines_rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            // one user's events one after another (their order is what a client
            // checks), the users' side by side
            let mut by_user: Vec<(usize, Vec<Line>)> = Vec::new();
            for (user, seq, emitted, durable) in batch {
                match by_user.iter_mut().find(|(of, _)| *of == user) {
                    Some((_, events)) => events.push((seq, emitted, durable)),
                    None => by_user.push((user, vec![(seq, emitted, durable)])),
                }
            }
            let sends = by_user.into_iter().map(|(user, events)| {
                let publisher = Arc::clone(&publisher);
                async move {
                    for (seq, emitted, durable) in events {
                        publisher.publish(user, seq, emitted, durable).await?;
                    }
                    Ok::<(), String>(())
                }
            });
            for result in futures_util::future::join_all(sends).await {
                if let Err(err) = result {
                    eprintln!("publish failed: {err}");
                }
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut fields = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(user)), Some(Ok(seq)), Some(Ok(emitted)), Some(Ok(durable))) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if lines_tx
            .send((user as usize, seq, emitted, durable == 1))
            .is_err()
        {
            break;
        }
    }
    drop(lines_tx);
    let _ = sender.await;
    Ok(json!({"scenario": "redis-publisher"}))
}

/// One event to publish: sequence, intended emit time, durable.
type Line = (u64, u64, bool);

pub(super) fn user_name(user: usize) -> String {
    format!("fan-{user}")
}
