//! The `fanout` scenario: many WebSocket clients, events driven at a steady rate or in
//! a burst, every client checking its sequence (lost, duplicated) and timing each
//! event from emit to receipt. Three targets, one load:
//!
//! - `embedded`: one hub with the embedded engine in a child process (`loadtest
//!   embedded-hub`), events written to its standard input and published through its
//!   engine as a worker would;
//! - `redis`: `--hubs` hub processes on a private redis-server, events published into
//!   Redis by this process exactly as `hivesync worker` does (the Lua script);
//! - `socketio`: the peer, Socket.IO 4 servers with `@socket.io/redis-adapter`
//!   (installed from npm into a temporary directory), events published into Redis as
//!   `@socket.io/redis-emitter` does, one room per user.
//!
//! [`client`] is one socket, [`publisher`] how events get in, [`rig`] the processes
//! under test, [`tally`] what the clients add up.

mod lean;
mod publisher;
mod rig;
mod tally;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use publisher::user_name;
pub use publisher::{embedded_hub, redis_publisher};
pub use rig::PrivateRedis;
use rig::rss_of;
use tally::{Tally, now_nanos};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Embedded,
    Redis,
    /// a 3-master Redis Cluster; the run also measures a single Redis beside it
    RedisCluster,
    Socketio,
}

#[derive(Debug, Clone)]
pub struct Load {
    pub target: Target,
    pub sockets: usize,
    pub users: usize,
    pub hubs: usize,
    /// rounds per second in the steady phase; each round is one event per user
    pub rate: f64,
    pub seconds: u64,
    /// rounds published back to back after the steady phase
    pub burst: u64,
    /// stage changes (durably committed) instead of progress ticks
    pub durable: bool,
    /// the drain ends when nothing arrived for this long
    pub drain_quiet: Duration,
}

/// The servers' summed RSS, sampled every 200 ms while the sockets are open.
fn sample_rss(pids: Vec<u32>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            samples.push(pids.iter().map(|pid| rss_of(*pid)).sum());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    })
}

/// The target as the command line spells it.
pub fn target_name(target: Target) -> &'static str {
    match target {
        Target::Embedded => "embedded",
        Target::Redis => "redis",
        Target::RedisCluster => "redis-cluster",
        Target::Socketio => "socketio",
    }
}

/// The same load on `load.target` (and on `peer`, if one is named) for `rounds` rounds
/// in one invocation, alternating which goes first (target then peer, then peer then
/// target, …): the medians of each side, and the target's as ratios of the peer's.
/// `--target redis-cluster` alone has one Redis as its peer.
pub async fn run_rounds(
    hub_binary: &Path,
    load: Load,
    peer: Option<Target>,
    rounds: usize,
) -> Result<Value, String> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let peer_load = peer.map(|peer| Load {
        target: peer,
        ..load.clone()
    });
    let rounds = rounds.max(1);
    for round in 1..=rounds {
        let order: Vec<&Load> = match &peer_load {
            Some(peer_load) if round % 2 == 1 => vec![&load, peer_load],
            Some(peer_load) => vec![peer_load, &load],
            None => vec![&load],
        };
        let names: Vec<&str> = order.iter().map(|one| target_name(one.target)).collect();
        eprintln!("round {round} of {rounds}: {}", names.join(", then "));
        for one in order {
            let result = run(hub_binary, one.clone()).await?;
            if std::ptr::eq(one, &load) {
                ours.push(result);
            } else {
                theirs.push(result);
            }
        }
    }
    let median = |runs: &[Value], path: &[&str]| -> Option<f64> {
        let mut values: Vec<f64> = runs
            .iter()
            .filter_map(|run| {
                path.iter()
                    .try_fold(run, |value, key| value.get(*key))
                    .and_then(Value::as_f64)
            })
            .collect();
        values.sort_by(f64::total_cmp);
        (!values.is_empty()).then(|| {
            let mid = values.len() / 2;
            if values.len().is_multiple_of(2) {
                (values[mid - 1] + values[mid]) / 2.0
            } else {
                values[mid]
            }
        })
    };
    let metrics: [(&str, &[&str]); 7] = [
        (
            "steady_deliveries_per_s",
            &["phases", "steady", "deliveries_per_s"],
        ),
        ("steady_p50_ms", &["phases", "steady", "latency_ms", "p50"]),
        ("steady_p99_ms", &["phases", "steady", "latency_ms", "p99"]),
        (
            "burst_deliveries_per_s",
            &["phases", "burst", "deliveries_per_s"],
        ),
        ("burst_p99_ms", &["phases", "burst", "latency_ms", "p99"]),
        (
            "deliveries_per_server_cpu_s",
            &["deliveries_per_server_cpu_s"],
        ),
        ("redis_cpu_seconds", &["redis_cpu_seconds"]),
    ];
    let mut peer_medians = serde_json::Map::new();
    let mut target_medians = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    for (name, path) in metrics {
        let (a, b) = (median(&ours, path), median(&theirs, path));
        peer_medians.insert(name.into(), json!(b));
        target_medians.insert(name.into(), json!(a));
        ratios.insert(
            name.into(),
            match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => json!(a / b),
                _ => Value::Null,
            },
        );
    }
    let ours_name = target_name(load.target);
    let peer_name = peer.map(target_name);
    let shown = |value: &Value| match value.as_f64() {
        Some(number) if number.abs() >= 100.0 => format!("{number:.0}"),
        Some(number) => format!("{number:.3}"),
        None => "—".to_owned(),
    };
    match peer_name {
        Some(peer_name) => {
            println!("\nmedians of {rounds} alternated round(s)");
            println!("| metric | {peer_name} | {ours_name} | {ours_name} / {peer_name} |");
            println!("|---|---|---|---|");
            for (name, _) in metrics {
                println!(
                    "| {name} | {} | {} | {} |",
                    shown(&peer_medians[name]),
                    shown(&target_medians[name]),
                    shown(&ratios[name])
                );
            }
        }
        None => {
            println!("\nmedians of {rounds} round(s)");
            println!("| metric | {ours_name} |");
            println!("|---|---|");
            for (name, _) in metrics {
                println!("| {name} | {} |", shown(&target_medians[name]));
            }
        }
    }
    let total = |runs: &[Value], key: &str| -> u64 {
        runs.iter().filter_map(|run| run[key].as_u64()).sum()
    };
    // `lost` and `duplicated` are the target's (a loss of ours fails the run); the
    // peer's are a finding, reported beside them
    let lost = total(&ours, "lost");
    let duplicated = total(&ours, "duplicated");
    Ok(json!({
        "scenario": "fanout",
        "target": ours_name,
        "peer": peer_name,
        "rounds": rounds,
        "order": "target first in odd rounds, peer first in even rounds",
        "target_runs": ours,
        "peer_runs": theirs,
        "target_medians": target_medians,
        "peer_medians": peer_medians,
        "target_over_peer": ratios,
        "lost": lost,
        "duplicated": duplicated,
        "peer_lost": total(&theirs, "lost"),
        "peer_duplicated": total(&theirs, "duplicated"),
    }))
}

pub async fn run(hub_binary: &Path, load: Load) -> Result<Value, String> {
    let tokens = (0..load.users)
        .map(|user| crate::token_for(&user_name(user)))
        .collect::<Result<Vec<_>, _>>()?;
    let rig = rig::start(hub_binary, &load).await?;
    let tally = Arc::new(Tally::new());
    let stop = Arc::new(AtomicBool::new(false));

    // connect: socket i belongs to user i % users and goes to server i % servers
    eprintln!(
        "{:?}: opening {} sockets for {} users on {} server(s)",
        load.target,
        load.sockets,
        load.users,
        rig.urls.len()
    );
    // a socket is an open file on each side; raised as far as this process may
    let limit = crate::raise_fd_limit(load.sockets as u64 + 4096);
    if limit < load.sockets as u64 + 256 {
        return Err(format!(
            "the open-file limit is {limit}, under the {} sockets asked for (run as root, or raise `ulimit -n`)",
            load.sockets
        ));
    }
    let specs: Vec<lean::Spec> = (0..load.sockets)
        .map(|i| {
            let user = i % load.users;
            let base = &rig.urls[i % rig.urls.len()];
            let url = match load.target {
                Target::Socketio => format!("{base}&user={user}"),
                _ => format!("{base}?access_token={}", tokens[user]),
            };
            lean::Spec { url, user }
        })
        .collect();
    // the clients run on threads of their own, off this runtime, so the publisher's
    // schedule is kept to the moment
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = {
        let (tally, stop, target) = (Arc::clone(&tally), Arc::clone(&stop), load.target);
        tokio::task::spawn_blocking(move || lean::start(target, specs, threads, tally, stop))
            .await
            .map_err(|e| e.to_string())??
    };
    let mut start_seq = vec![u64::MAX; load.users];
    for (user, last) in &started.opened_last {
        start_seq[*user] = start_seq[*user].min(*last);
    }
    let clients = started.threads;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // memory with every socket open, before any event, then sampled under the load
    let pids: Vec<u32> = rig.children.iter().filter_map(|child| child.id()).collect();
    let rss_open: u64 = pids.iter().map(|pid| rss_of(*pid)).sum();
    let sampling_stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pids.clone(), Arc::clone(&sampling_stop));
    // CPU the servers (and Redis) spend from the first event to the drain's end
    let redis_pids = rig
        .redis
        .as_ref()
        .map(rig::Backing::pids)
        .unwrap_or_default();
    let cpu_of =
        |pids: &[u32]| -> f64 { pids.iter().filter_map(|pid| crate::cpu_seconds(*pid)).sum() };
    let publisher_pids: Vec<u32> = rig
        .publisher_child
        .as_ref()
        .and_then(tokio::process::Child::id)
        .into_iter()
        .collect();
    let (hub_cpu_start, redis_cpu_start, publisher_cpu_start) =
        (cpu_of(&pids), cpu_of(&redis_pids), cpu_of(&publisher_pids));

    // publish: steady rounds, then a burst
    let publisher = Arc::new(rig.publisher);
    let mut next_seq: Vec<u64> = start_seq
        .iter()
        .map(|s| if *s == u64::MAX { 0 } else { *s })
        .collect();
    // steady: the events of a round spread evenly over the round (users' events do not
    // all happen at the same instant); burst: whole rounds back to back
    // Every event is stamped with the time it was due, not the time it went out: a
    // publisher that falls behind shows as latency (no coordinated omission).
    let steady_events = (load.rate * load.seconds as f64 * load.users as f64).round() as u64;
    let spacing = 1.0 / (load.rate * load.users as f64);
    let started = Instant::now();
    let started_wall = now_nanos();
    let mut published = 0u64;
    let mut in_flight = Vec::new();
    let mut max_late = Duration::ZERO;
    for n in 0..steady_events {
        let offset = Duration::from_secs_f64(n as f64 * spacing);
        let due = started + offset;
        tokio::time::sleep_until(due.into()).await;
        max_late = max_late.max(Instant::now().saturating_duration_since(due));
        let intended = started_wall + offset.as_nanos() as u64;
        let user = (n % load.users as u64) as usize;
        next_seq[user] += 1;
        if let Some(task) = publisher
            .publish_one(user, next_seq[user], intended, load.durable)
            .await?
        {
            in_flight.push(task);
        }
        published += 1;
        if n % (load.users as u64 * (load.rate.ceil() as u64).max(1)) == 0 {
            eprint!(
                "\r  published {published:>9} events, delivered {:>10}",
                tally.received()
            );
        }
    }
    for task in in_flight {
        task.await.map_err(|e| e.to_string())??;
    }
    // how long after the schedule's end the last steady event was out
    let steady_end = started + Duration::from_secs(load.seconds);
    let finished_late = Instant::now().saturating_duration_since(steady_end);
    let allowed = Duration::from_secs_f64((load.seconds as f64 * 0.05).max(0.1));
    let publisher_behind = steady_events > 0 && finished_late > allowed;
    if publisher_behind {
        eprintln!(
            "\n  WARNING: the publisher fell behind its schedule (done {:.0} ms late): the steady rate offered was not the rate sent",
            finished_late.as_secs_f64() * 1000.0
        );
    }
    // the burst: every round is due at once, at its start
    let mut burst_started = None;
    for _ in 0..load.burst {
        if burst_started.is_none() {
            burst_started = Some(Instant::now());
            tally.burst_start.store(now_nanos(), Ordering::Relaxed);
        }
        for seq in next_seq.iter_mut() {
            *seq += 1;
        }
        let intended = tally.burst_start.load(Ordering::Relaxed);
        publisher
            .publish_round(&next_seq, intended, load.durable)
            .await?;
        published += load.users as u64;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let burst_secs = burst_started.map(|at| at.elapsed().as_secs_f64());
    let expected = published * (load.sockets / load.users) as u64;
    // drain: until everything arrived or nothing moved for `drain_quiet`
    let mut last_count = 0;
    let mut quiet_since = Instant::now();
    loop {
        let count = tally.received();
        if count >= expected {
            break;
        }
        if count != last_count {
            last_count = count;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > load.drain_quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "\r  published {published:>9} events, delivered {:>10}",
        tally.received()
    );
    let hub_cpu = cpu_of(&pids) - hub_cpu_start;
    let redis_cpu = cpu_of(&redis_pids) - redis_cpu_start;
    let publisher_cpu = cpu_of(&publisher_pids) - publisher_cpu_start;
    sampling_stop.store(true, Ordering::Relaxed);
    let rss_samples = sampler.await.map_err(|e| e.to_string())?;
    let rss_peak = rss_samples
        .iter()
        .copied()
        .max()
        .unwrap_or(rss_open)
        .max(rss_open);
    stop.store(true, Ordering::Relaxed);
    let mut finals = vec![0u64; load.sockets];
    let joined = tokio::task::spawn_blocking(move || {
        clients
            .into_iter()
            .flat_map(|client| client.join().unwrap_or_default())
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| e.to_string())?;
    for (index, last) in joined {
        if let Some(slot) = finals.get_mut(index) {
            *slot = last;
        }
    }

    let received = tally.received();
    // events that never arrived at all count as lost too (the tail past a client's last)
    let tail_lost: u64 = finals
        .iter()
        .enumerate()
        .map(|(i, last)| next_seq[i % load.users].saturating_sub(*last))
        .sum();
    let lost = tally.lost.load(Ordering::Relaxed) + tail_lost;
    let duplicated = tally.duplicated.load(Ordering::Relaxed);
    let resumed = tally.resumed.load(Ordering::Relaxed);
    let mut phases = serde_json::Map::new();
    let mut rows = Vec::new();
    for (name, phase) in [("steady", &tally.steady), ("burst", &tally.burst)] {
        let count = phase.received.load(Ordering::Relaxed);
        if count == 0 {
            continue;
        }
        let first = phase.first_receipt.load(Ordering::Relaxed);
        let last = phase.last_receipt.load(Ordering::Relaxed);
        // what arrived over the window it took: steady from the first event's due
        // time to the last steady receipt, burst from its start to its last receipt
        let window_start = if name == "steady" {
            started_wall
        } else {
            tally.burst_start.load(Ordering::Relaxed).min(first)
        };
        let secs = last.saturating_sub(window_start) as f64 / 1e9;
        let per_sec = if secs > 0.0 { count as f64 / secs } else { 0.0 };
        let merged = phase.merged().await;
        let ms = |q: f64| merged.value_at_quantile(q) as f64 / 1000.0;
        let max = merged.max() as f64 / 1000.0;
        let offered = (name == "steady").then_some(load.rate * load.sockets as f64);
        let percentiles: Vec<Value> = [0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0]
            .iter()
            .map(|q| json!({"q": q, "ms": ms(*q)}))
            .collect();
        phases.insert(
            name.to_owned(),
            json!({
                "deliveries": count,
                "window_s": secs,
                "deliveries_per_s": per_sec,
                "offered_deliveries_per_s": offered,
                "latency_from": "intended send time",
                "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": max},
                "latency_percentiles_ms": percentiles,
            }),
        );
        rows.push(format!(
            "| {} | {name} | {} | {} | {count} | {per_sec:.0} | {:.2} | {:.2} | {max:.2} |",
            target_name(load.target),
            rig.urls.len(),
            load.sockets,
            ms(0.5),
            ms(0.99)
        ));
    }
    let result = json!({
        "scenario": "fanout",
        "target": target_name(load.target),
        "servers": rig.urls.len(),
        "sockets": load.sockets,
        "users": load.users,
        "steady_rounds_per_s": load.rate,
        "steady_seconds": load.seconds,
        "burst_rounds": load.burst,
        "event_kind": if load.durable { "stage change (durable)" } else { "progress tick" },
        "publisher_behind": publisher_behind,
        "publisher_max_late_ms": max_late.as_secs_f64() * 1000.0,
        "publisher_finished_late_ms": finished_late.as_secs_f64() * 1000.0,
        "events_published": published,
        "publish_seconds": publish_secs,
        "burst_publish_seconds": burst_secs,
        "deliveries_expected": expected,
        "deliveries": received,
        "phases": phases,
        "lost": lost,
        "duplicated": duplicated,
        "resumed_after_close": resumed,
        "server_rss_open_bytes": rss_open,
        "server_rss_peak_bytes": rss_peak,
        "server_rss_samples": rss_samples.len(),
        "server_cpu_seconds": hub_cpu,
        "redis_cpu_seconds": redis_cpu,
        "redis_processes": redis_pids.len(),
        "publisher_process_cpu_seconds": (!publisher_pids.is_empty()).then_some(publisher_cpu),
        "deliveries_per_server_cpu_s": if hub_cpu > 0.0 { received as f64 / hub_cpu } else { 0.0 },
        "events_per_server_cpu_s": if hub_cpu > 0.0 { published as f64 / hub_cpu } else { 0.0 },
    });
    println!();
    println!(
        "| target | phase | servers | sockets | deliveries | deliveries/s | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!(
        "events published: {published}, deliveries: {received} of {expected}, lost: {lost}, duplicated: {duplicated}, sockets resumed after a close: {resumed}"
    );
    println!(
        "CPU: servers {hub_cpu:.1} s ({:.0} deliveries per server CPU-second), redis {redis_cpu:.1} s over {} process(es){}",
        if hub_cpu > 0.0 {
            received as f64 / hub_cpu
        } else {
            0.0
        },
        redis_pids.len(),
        if publisher_pids.is_empty() {
            String::new()
        } else {
            format!(", publisher process {publisher_cpu:.1} s")
        }
    );
    println!(
        "server RSS: {:.1} MiB with every socket open, {:.1} MiB peak under load; publisher {}",
        rss_open as f64 / 1048576.0,
        rss_peak as f64 / 1048576.0,
        if publisher_behind {
            "FELL BEHIND its schedule"
        } else {
            "kept its schedule"
        }
    );
    drop(rig.children);
    Ok(result)
}
