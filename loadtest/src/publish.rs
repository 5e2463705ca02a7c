//! The `publish` scenario: how many events one process publishes into Redis through
//! the engine (the Lua script a worker's every stage and progress tick goes through),
//! beside a peer in the same run: a bare `PUBLISH` of the same payload over one
//! multiplexed connection, the floor of one round trip per event. Warmed up, then
//! alternated, median of the rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fanout::PrivateRedis;
use hivesync::engine::EventLog;
use hivesync::protocol::{EventBody, Progress, SyncStatus};

pub struct Options {
    pub events: usize,
    pub concurrency: usize,
    pub rounds: usize,
}

fn body(n: usize) -> EventBody {
    EventBody::SyncStage {
        sync_id: format!("sync-{}", n % 1000),
        project_id: format!("project-{}", n % 100),
        stage: SyncStatus::Running,
        progress: Some(Progress {
            percent: (n % 100) as u8,
            objects: n as u64,
            bytes: n as u64 * 1024,
        }),
        at: hivesync::domain::now_rfc3339(),
        retry: None,
    }
}

/// Runs `publish(n)` for `events` events from `concurrency` tasks; events per second.
async fn round<F, Fut>(o: &Options, publish: F) -> Result<f64, String>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let started = Instant::now();
    let per_task = o.events / o.concurrency;
    let tasks: Vec<_> = (0..o.concurrency)
        .map(|task| {
            let publish = publish.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    publish(task * per_task + i).await?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok((per_task * o.concurrency) as f64 / started.elapsed().as_secs_f64())
}

/// Through the engine: what a worker's every stage and progress tick goes through.
async fn engine_round(
    engine: &Arc<hivesync::engine::redis::RedisEngine>,
    o: &Options,
) -> Result<f64, String> {
    // each event's own once key, as a worker gives every event one (unique across
    // rounds, or a later round would be answered from the keys of an earlier one)
    static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let engine = Arc::clone(engine);
    round(o, move |n| {
        let engine = Arc::clone(&engine);
        let once = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            engine
                .publish_once(&format!("user-{}", n % 100), body(n), &once.to_string())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// The peer: one bare PUBLISH of the same payload per event.
async fn peer_round(
    connection: &redis::aio::MultiplexedConnection,
    o: &Options,
) -> Result<f64, String> {
    let connection = connection.clone();
    round(o, move |n| {
        let mut connection = connection.clone();
        async move {
            let payload = serde_json::to_string(&body(n)).map_err(|e| e.to_string())?;
            redis::cmd("PUBLISH")
                .arg(format!("peer:user-{}", n % 100))
                .arg(payload)
                .query_async::<i64>(&mut connection)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub async fn run(o: Options) -> Result<Value, String> {
    let redis = PrivateRedis::start().await?;
    let engine =
        hivesync::engine::redis::RedisEngine::connect(hivesync::engine::redis::RedisSettings {
            cluster: false,
            url: redis.url(),
            prefix: "publish".into(),
            reclaim_after: Duration::from_secs(60),
            history_len: 1000,
            sync_rate: (30, Duration::from_secs(60)),
            rules: Default::default(),
            pool_size: 8,
        })
        .await
        .map_err(|e| e.to_string())?;
    let client = redis::Client::open(redis.url().as_str()).map_err(|e| e.to_string())?;
    let connection = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    // warm-up: scripts loaded, connections open, allocator warm
    engine_round(&engine, &o).await?;
    peer_round(&connection, &o).await?;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for round in 0..o.rounds {
        // alternate which goes first
        if round % 2 == 0 {
            ours.push(engine_round(&engine, &o).await?);
            peer.push(peer_round(&connection, &o).await?);
        } else {
            peer.push(peer_round(&connection, &o).await?);
            ours.push(engine_round(&engine, &o).await?);
        }
        eprintln!(
            "  round {}: engine {:.0}/s, bare PUBLISH {:.0}/s",
            round + 1,
            ours[round],
            peer[round]
        );
    }
    let raw = json!({"engine": ours.clone(), "bare_publish": peer.clone()});
    let (ours, peer) = (median(&mut ours), median(&mut peer));
    println!("| path | events/s (median of {}) |", o.rounds);
    println!("|---|---|");
    println!("| engine publish (Lua: id, history, PUBLISH) | {ours:.0} |");
    println!("| bare PUBLISH, same payload, one multiplexed connection | {peer:.0} |");
    println!("engine / bare: {:.2}", ours / peer);
    Ok(json!({
        "scenario": "publish",
        "events_per_round": (o.events / o.concurrency) * o.concurrency,
        "concurrency": o.concurrency,
        "rounds": o.rounds,
        "engine_events_per_s": ours,
        "bare_publish_events_per_s": peer,
        "ratio": ours / peer,
        "raw": raw,
    }))
}
