//! Load tool for HiveSync Hub. `connections` starts a release hub, opens N idle
//! WebSocket clients to it and reports the hub's resident memory per socket, read from
//! /proc. Prints a summary table and writes a JSON result.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(name = "loadtest", about = "Measure HiveSync Hub")]
struct Cli {
    /// the hub binary to start (build it with `cargo build --release`)
    #[arg(long, default_value = "target/release/hivesync")]
    hub: PathBuf,
    /// where to write the machine-readable result
    #[arg(long, default_value = "loadtest-result.json")]
    json: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Sync and read a real source tree: first sync vs `git clone`, search vs
    /// `git grep` on the same commit, tree/file latency under concurrent load
    Reads {
        /// directory whose files become the repository (default: cargo's registry sources)
        #[arg(long)]
        source: Option<PathBuf>,
        /// concurrent readers for the latency run
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// seconds of the latency run
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Events to many sockets at a steady rate, then in a burst: deliveries/s,
    /// emit-to-receipt latency, lost and duplicated events; against our hub (embedded
    /// or on Redis) or the Socket.IO peer
    Fanout {
        #[arg(long, value_enum, default_value = "embedded")]
        target: fanout::Target,
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        /// sockets are spread evenly over this many users (one event per user per round)
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// servers (hub or Socket.IO processes) on one Redis; redis and socketio only
        #[arg(long, default_value_t = 2)]
        hubs: usize,
        /// rounds per second in the steady phase (fractions allowed: 0.1 is one round
        /// every 10 s)
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// seconds of the steady phase
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// rounds published back to back after the steady phase
        #[arg(long, default_value_t = 200)]
        burst: u64,
        /// publish stage changes, which are committed durably, instead of progress
        /// ticks (which the embedded engine may commit without an fsync)
        #[arg(long)]
        durable: bool,
        /// the run ends when every event arrived, or none did for this many seconds
        #[arg(long, default_value_t = 3)]
        drain_quiet_s: u64,
        /// rounds of (target, peer) alternating which goes first; medians and ratios
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// the same load on this target too, in the same invocation (redis-cluster's
        /// peer is one Redis unless another is named)
        #[arg(long, value_enum)]
        peer: Option<fanout::Target>,
    },
    /// Sync cost next to git in the same run: first, no-op and incremental syncs, many
    /// small projects at once, and sync-status polling throughput
    Syncs {
        /// directory whose files become the large repository (default: cargo's registry sources)
        #[arg(long)]
        source: Option<PathBuf>,
        /// small projects synced at once
        #[arg(long, default_value_t = 40)]
        projects: usize,
        /// the hub's sync workers
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// concurrent pollers of GET /api/v1/repo/sync/{id}
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// seconds of polling
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// One project through many commit-then-sync rounds in one hub process, beside a
    /// `git clone --mirror` fetched the same rounds with git's auto-gc: sync and read
    /// times, packs, bytes and inodes every `every` rounds; force-pushed-away objects
    /// gone after the grace period
    Soak {
        #[arg(long, default_value_t = 1000)]
        rounds: usize,
        /// files in the repository
        #[arg(long, default_value_t = 3000)]
        files: usize,
        /// a measurement every this many rounds (and one after round 10)
        #[arg(long, default_value_t = 100)]
        every: usize,
        /// a force-push (the branch moved back two commits) every this many rounds, 0 = never
        #[arg(long, default_value_t = 250)]
        force_every: usize,
        /// file reads per measurement
        #[arg(long, default_value_t = 300)]
        reads: usize,
        /// the hub's HIVESYNC_PRUNE_GRACE_S; the run waits it out at the end
        #[arg(long, default_value_t = 30)]
        grace_s: u64,
        /// the hub's HIVESYNC_HOUSEKEEPING_TOOL: auto (git gc) or gitoxide
        #[arg(long, default_value = "auto")]
        housekeeping_tool: String,
        /// an SVG of the curves
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Many projects on one hub: registered, synced and read up to each count, then a
    /// random spread read; the hub's RSS, memory maps and open files per project, and
    /// read latency of projects the reader had open and had let go
    Projects {
        /// comma-separated project counts, reached in turn in one hub
        #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
        count: Vec<usize>,
        /// seconds of random reads at each count
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// the hub's HIVESYNC_READER_CACHE
        #[arg(long, default_value_t = 256)]
        reader_cache: usize,
        /// projects per user, each user's in turn (the hub's default quota): one sync
        /// totals what its owner's other mirrors hold, so its cost grows with them
        #[arg(long, default_value_t = 1000)]
        per_user: usize,
    },
    /// An SVG of the latency percentiles in fan-out result files
    Plot {
        /// where the SVG goes
        #[arg(long)]
        out: std::path::PathBuf,
        /// fan-out JSON results (`--json` of `fanout` runs)
        files: Vec<std::path::PathBuf>,
    },
    /// Events one process publishes into Redis through the engine's Lua script, beside
    /// a bare PUBLISH of the same payload, alternated, median of the rounds
    Publish {
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// tasks publishing at once (a worker process's syncs, its hub's requests)
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// One scheduler tick's CPU with few and with many registered projects (the due
    /// count equal): the cost should follow the due projects only
    Scheduler {
        #[arg(long, default_value_t = 100_000)]
        projects: usize,
        /// projects due at each tick
        #[arg(long, default_value_t = 100)]
        due: usize,
        #[arg(long, default_value_t = 20)]
        ticks: usize,
    },
    /// Push → `repo_sync_success` on a socket: commits pushed to local repositories at a
    /// steady rate, each followed by its signed webhook; then the same with the
    /// schedule only
    Freshness {
        #[arg(long, default_value_t = 20)]
        projects: usize,
        /// pushes per second
        #[arg(long, default_value_t = 10)]
        rate: u64,
        /// seconds of each phase
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// `sync_interval_s` of the schedule-only phase
        #[arg(long, default_value_t = 5)]
        interval: u64,
        /// the hub's sync workers
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// (used by `fanout --target embedded`) a hub with the embedded engine that publishes
    /// the events named on standard input
    #[command(hide = true)]
    EmbeddedHub,
    /// (used by the Redis and Socket.IO fan-outs) a process of its own that publishes
    /// the events named on standard input into Redis, as a worker process does
    #[command(hide = true)]
    RedisPublisher {
        #[arg(long)]
        url: String,
        #[arg(long)]
        cluster: bool,
        /// publish as @socket.io/redis-emitter does, not through the engine
        #[arg(long)]
        socketio: bool,
    },
    /// One owner floods the queue with first syncs of larger repositories, then other
    /// owners press Sync once each: their wait against one flood sync's duration, and
    /// flood jobs that started ahead of a later request (fair share: none)
    Fairness {
        #[arg(long, default_value_t = 12)]
        flood: usize,
        /// files in each flood repository
        #[arg(long, default_value_t = 3000)]
        files: usize,
        #[arg(long, default_value_t = 4)]
        others: usize,
        /// the hub's sync workers
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// HIVESYNC_OWNER_MAX_RUNNING [default: the hub's, half the workers]
        #[arg(long)]
        owner_cap: Option<usize>,
    },
    /// N idle sockets: the hub's RSS per connection
    Connections {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// sockets opened at once
        #[arg(long, default_value_t = 200)]
        batch: usize,
    },
}

mod fairness;
mod fanout;
mod freshness;
mod hub;
mod plot;
mod projects;
mod publish;
mod reads;
mod scheduler;
mod soak;
mod syncs;

pub(crate) use hub::{
    SECRET, cpu_seconds, loadtest_token, raise_fd_limit, rss_bytes, start_hub, start_hub_with,
    token_for,
};

async fn connections(cli: &Cli, count: usize, batch: usize) -> Result<serde_json::Value, String> {
    let limit = raise_fd_limit(count as u64 * 2 + 1024);
    if limit < count as u64 + 256 {
        return Err(format!(
            "the open-file limit is {limit}, under the {count} sockets asked for (run as root, or raise `ulimit -n`)"
        ));
    }
    let mut hub = start_hub(&cli.hub).await?;
    let pid = hub.child.id().ok_or("hub has no pid")?;
    let token = loadtest_token()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_bytes(pid).ok_or("cannot read the hub's RSS")?;
    let client_config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(count);
    while sockets.len() < count {
        let wave = batch.min(count - sockets.len());
        let first = sockets.len();
        let opened = futures_util::future::join_all((0..wave).map(|n| {
            let url = format!("ws://{}/api/v1/ws?access_token={token}", hub.addr);
            let hub_addr: Result<std::net::SocketAddr, String> = hub
                .addr
                .parse()
                .map_err(|_| format!("hub address {}", hub.addr));
            // one loopback source address per 10,000 sockets: each source has only
            // the ephemeral port range (~28k) to bind from, less what the last run
            // left in TIME_WAIT
            let source =
                std::net::Ipv4Addr::new(127, 0, 0, 1 + ((first + n) / 10_000).min(250) as u8);
            async move {
                let request = url.into_client_request().map_err(|e| e.to_string())?;
                let tcp = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
                tcp.bind((source, 0).into())
                    .map_err(|e| format!("bind {source}: {e}"))?;
                let stream = tcp.connect(hub_addr?).await.map_err(|e| e.to_string())?;
                let _ = stream.set_nodelay(true);
                let (mut socket, _) = tokio_tungstenite::client_async_with_config(
                    request,
                    stream,
                    Some(client_config),
                )
                .await
                .map_err(|e| e.to_string())?;
                socket
                    .next()
                    .await
                    .ok_or("closed before hello")?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(socket)
            }
        }))
        .await;
        for socket in opened {
            sockets.push(socket?);
        }
        eprint!("\r  connections open: {:>6} / {count}", sockets.len());
    }
    eprintln!();
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = rss_bytes(pid).ok_or("cannot read the hub's RSS")?;
    let per_socket = loaded.saturating_sub(baseline) as f64 / count as f64;
    drop(sockets);
    let _ = hub.child.kill().await;
    println!();
    println!(
        "| scenario    | sockets | hub RSS before | hub RSS with sockets | per socket | open time |"
    );
    println!(
        "|-------------|---------|----------------|----------------------|------------|-----------|"
    );
    println!(
        "| connections | {count:>7} | {:>10.1} MiB | {:>16.1} MiB | {:>6.2} KiB | {open_secs:>7.1} s |",
        baseline as f64 / 1048576.0,
        loaded as f64 / 1048576.0,
        per_socket / 1024.0
    );
    Ok(serde_json::json!({
        "scenario": "connections",
        "sockets": count,
        "hub_rss_baseline_bytes": baseline,
        "hub_rss_loaded_bytes": loaded,
        "bytes_per_socket": per_socket,
        "open_seconds": open_secs,
    }))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.scenario {
        Scenario::Connections { count, batch } => connections(&cli, *count, *batch).await,
        Scenario::EmbeddedHub => fanout::embedded_hub().await,
        Scenario::RedisPublisher {
            url,
            cluster,
            socketio,
        } => fanout::redis_publisher(url.clone(), *cluster, *socketio).await,
        Scenario::Plot { out, files } => plot::run(files, out),
        Scenario::Publish {
            events,
            concurrency,
            rounds,
        } => {
            publish::run(publish::Options {
                events: (*events).max(1),
                concurrency: (*concurrency).clamp(1, (*events).max(1)),
                rounds: (*rounds).max(1),
            })
            .await
        }
        Scenario::Scheduler {
            projects,
            due,
            ticks,
        } => {
            scheduler::run(scheduler::Options {
                projects: (*projects).max(1),
                due: (*due).max(1),
                ticks: (*ticks).max(1),
            })
            .await
        }
        Scenario::Fairness {
            flood,
            files,
            others,
            workers,
            owner_cap,
        } => {
            fairness::run(
                &cli.hub,
                fairness::Options {
                    flood: (*flood).max(1),
                    files: (*files).max(1),
                    others: (*others).max(1),
                    workers: (*workers).max(1),
                    owner_cap: *owner_cap,
                },
            )
            .await
        }
        Scenario::Freshness {
            projects,
            rate,
            seconds,
            interval,
            workers,
        } => {
            freshness::run(
                &cli.hub,
                freshness::Options {
                    projects: (*projects).max(1),
                    rate: (*rate).max(1),
                    seconds: (*seconds).max(1),
                    interval: (*interval).max(1),
                    workers: (*workers).max(1),
                },
            )
            .await
        }
        Scenario::Projects {
            count,
            seconds,
            workers,
            reader_cache,
            per_user,
        } => {
            let mut counts: Vec<usize> = count.iter().copied().filter(|c| *c > 0).collect();
            counts.sort_unstable();
            counts.dedup();
            projects::run(
                &cli.hub,
                projects::Options {
                    counts,
                    seconds: (*seconds).max(1),
                    workers: (*workers).max(1),
                    reader_cache: (*reader_cache).max(1),
                    per_user: (*per_user).max(1),
                    json: cli.json.clone(),
                },
            )
            .await
        }
        Scenario::Soak {
            rounds,
            files,
            every,
            force_every,
            reads,
            grace_s,
            housekeeping_tool,
            plot,
        } => {
            soak::run(
                &cli.hub,
                soak::Options {
                    rounds: (*rounds).max(11),
                    files: (*files).max(10),
                    every: (*every).max(1),
                    force_every: *force_every,
                    reads: (*reads).max(1),
                    grace_s: *grace_s,
                    tool: housekeeping_tool.clone(),
                    plot: plot.clone(),
                },
            )
            .await
        }
        Scenario::Syncs {
            source,
            projects,
            workers,
            concurrency,
            seconds,
        } => {
            syncs::run(
                &cli.hub,
                syncs::Options {
                    source: source.clone(),
                    projects: (*projects).max(1),
                    workers: (*workers).max(1),
                    concurrency: (*concurrency).max(1),
                    seconds: (*seconds).max(1),
                },
            )
            .await
        }
        Scenario::Fanout {
            target,
            sockets,
            users,
            hubs,
            rate,
            seconds,
            burst,
            durable,
            rounds,
            peer,
            drain_quiet_s,
        } => {
            let load = fanout::Load {
                target: *target,
                sockets: *sockets,
                users: (*users).clamp(1, (*sockets).max(1)),
                hubs: (*hubs).max(1),
                rate: if rate.is_finite() {
                    rate.max(0.001)
                } else {
                    1.0
                },
                seconds: *seconds,
                burst: *burst,
                durable: *durable,
                drain_quiet: Duration::from_secs((*drain_quiet_s).max(1)),
            };
            let peer = peer
                .or((load.target == fanout::Target::RedisCluster).then_some(fanout::Target::Redis));
            if peer.is_some() || *rounds > 1 {
                fanout::run_rounds(&cli.hub, load, peer, *rounds).await
            } else {
                fanout::run(&cli.hub, load).await
            }
        }
        Scenario::Reads {
            source,
            concurrency,
            seconds,
        } => reads::run(&cli.hub, source.clone(), *concurrency, *seconds).await,
    };
    match result {
        Ok(value) => {
            if let Err(err) = std::fs::write(&cli.json, format!("{value:#}\n")) {
                eprintln!("cannot write {}: {err}", cli.json.display());
                return std::process::ExitCode::FAILURE;
            }
            let lost = value["lost"].as_u64().unwrap_or(0);
            let duplicated = value["duplicated"].as_u64().unwrap_or(0);
            // our hub promises no loss; the peer's losses are a finding, not a failure
            if lost + duplicated > 0 && value["target"] != "socketio" {
                eprintln!("loadtest: {lost} events lost and {duplicated} duplicated");
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("loadtest failed: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
