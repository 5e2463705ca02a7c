//! The `fanout` scenario: many WebSocket clients, events driven at a steady rate or in
//! a burst, every client checking its sequence (lost, duplicated) and timing each
//! event from emit to receipt. Three targets, one load:
//!
//! - `embedded`: one hub with the embedded engine, in this process (in its own
//!   runtime), events published through its engine as a worker would;
//! - `redis`: `--hubs` hub processes on a private redis-server, events published into
//!   Redis by this process exactly as `hivesync worker` does (the Lua script);
//! - `socketio`: the peer, Socket.IO 4 servers with `@socket.io/redis-adapter`
//!   (installed from npm into a temporary directory), events published into Redis as
//!   `@socket.io/redis-emitter` does, one room per user.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use hivesync::engine::EventLog;
use hivesync::protocol::{EventBody, Progress, SyncStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Embedded,
    Redis,
    Socketio,
}

#[derive(Debug, Clone)]
pub struct Load {
    pub target: Target,
    pub sockets: usize,
    pub users: usize,
    pub hubs: usize,
    /// rounds per second in the steady phase; each round is one event per user
    pub rate: u64,
    pub seconds: u64,
    /// rounds published back to back after the steady phase
    pub burst: u64,
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Deliveries and latency of one phase (steady or burst).
struct Phase {
    received: AtomicU64,
    first_receipt: AtomicU64,
    last_receipt: AtomicU64,
    /// sharded so clients rarely wait on each other
    latency: Vec<Mutex<Histogram<u64>>>,
}

impl Phase {
    fn new() -> Self {
        Self {
            received: AtomicU64::new(0),
            first_receipt: AtomicU64::new(u64::MAX),
            last_receipt: AtomicU64::new(0),
            latency: (0..64)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")))
                .collect(),
        }
    }

    async fn merged(&self) -> Histogram<u64> {
        let mut merged = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
        for shard in &self.latency {
            let _ = merged.add(&*shard.lock().await);
        }
        merged
    }
}

/// What every client adds up.
struct Tally {
    steady: Phase,
    burst: Phase,
    /// emit time of the burst's first event; events emitted before are steady
    burst_start: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    /// sockets closed by the server (4008 slow consumer) that resumed
    resumed: AtomicU64,
}

impl Tally {
    fn new() -> Self {
        Self {
            steady: Phase::new(),
            burst: Phase::new(),
            burst_start: AtomicU64::new(u64::MAX),
            lost: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        }
    }

    fn received(&self) -> u64 {
        self.steady.received.load(Ordering::Relaxed) + self.burst.received.load(Ordering::Relaxed)
    }
}

/// The number after `key` in `text` (e.g. `"id":` → 42).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// (sequence number, emit time in ns) of one event frame.
fn parse_frame(target: Target, text: &str) -> Option<(u64, u64)> {
    match target {
        Target::Embedded | Target::Redis => Some((
            number_after(text, "{\"id\":")?,
            number_after(text, "\"sync_id\":\"t")?,
        )),
        Target::Socketio => {
            let body = text.strip_prefix("42")?;
            Some((number_after(body, "\"s\":")?, number_after(body, "\"t\":")?))
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens one client and returns it with the last sequence number it has seen.
async fn open_client(target: Target, url: &str) -> Result<(Socket, u64), String> {
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let request = url.into_client_request().map_err(|e| e.to_string())?;
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    let first = next_text(&mut socket).await?;
    match target {
        Target::Embedded | Target::Redis => {
            let hello: Value = serde_json::from_str(&first).map_err(|e| e.to_string())?;
            let last = hello["last_event_id"]
                .as_u64()
                .ok_or("hello without last_event_id")?;
            Ok((socket, last))
        }
        Target::Socketio => {
            // Engine.IO open packet, then the Socket.IO connect handshake
            if !first.starts_with('0') {
                return Err(format!("unexpected engine.io open: {first}"));
            }
            socket
                .send(Message::Text("40".into()))
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let reply = next_text(&mut socket).await?;
                if reply.starts_with("40") {
                    return Ok((socket, 0));
                }
                if reply == "2" {
                    socket
                        .send(Message::Text("3".into()))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
}

async fn next_text(socket: &mut Socket) -> Result<String, String> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed".into()),
        }
    }
}

/// Reads events until `stop`, checking the sequence and timing each one. A socket
/// the server closes (4008 when it falls behind) resumes from its last id, as the
/// protocol says a client should; Socket.IO has no resume, so its losses stand.
async fn run_client(
    target: Target,
    url: String,
    mut socket: Socket,
    mut last: u64,
    shard: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> u64 {
    // latencies go to the shared histograms in batches; a histogram per client would
    // cost more memory than the hub under test
    let mut steady: Vec<u64> = Vec::with_capacity(256);
    let mut burst: Vec<u64> = Vec::with_capacity(256);
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if stop.load(Ordering::Relaxed) { break; }
                continue;
            }
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                if stop.load(Ordering::Relaxed) || target == Target::Socketio {
                    break;
                }
                match open_client(target, &format!("{url}&last_event_id={last}")).await {
                    Ok((resumed, from)) => {
                        tally.resumed.fetch_add(1, Ordering::Relaxed);
                        if from > last {
                            // resync_required: the gap is gone for good
                            tally.lost.fetch_add(from - last, Ordering::Relaxed);
                            last = from;
                        }
                        socket = resumed;
                        continue;
                    }
                    Err(_) => break,
                }
            }
            Some(Ok(_)) => continue,
        };
        if target == Target::Socketio && text.as_str() == "2" {
            let _ = socket.send(Message::Text("3".into())).await;
            continue;
        }
        let received_at = now_nanos();
        let Some((seq, emitted)) = parse_frame(target, text.as_str()) else {
            continue;
        };
        if seq <= last {
            tally.duplicated.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if seq > last + 1 {
            tally.lost.fetch_add(seq - last - 1, Ordering::Relaxed);
        }
        last = seq;
        let in_burst = emitted >= tally.burst_start.load(Ordering::Relaxed);
        let (phase, local) = if in_burst {
            (&tally.burst, &mut burst)
        } else {
            (&tally.steady, &mut steady)
        };
        phase.received.fetch_add(1, Ordering::Relaxed);
        phase
            .first_receipt
            .fetch_min(received_at, Ordering::Relaxed);
        phase.last_receipt.fetch_max(received_at, Ordering::Relaxed);
        local.push((received_at.saturating_sub(emitted) / 1000).max(1));
        if local.len() >= 256 {
            flush_latencies(phase, shard, local).await;
        }
    }
    flush_latencies(&tally.steady, shard, &mut steady).await;
    flush_latencies(&tally.burst, shard, &mut burst).await;
    last
}

async fn flush_latencies(phase: &Phase, shard: usize, local: &mut Vec<u64>) {
    let mut histogram = phase.latency[shard % phase.latency.len()].lock().await;
    for micros in local.drain(..) {
        histogram.saturating_record(micros);
    }
}

/// Publishes one event for `user` with sequence `seq` (the target's own numbering).
enum Publisher {
    Engine(Arc<dyn EventLog>),
    /// the embedded hub runs in a child process and publishes what it reads here
    Pipe(Mutex<tokio::process::ChildStdin>),
    SocketIo {
        redis: redis::aio::MultiplexedConnection,
    },
}

impl Publisher {
    /// One event for every user, `seqs[user]` being its sequence number.
    async fn publish_round(self: &Arc<Self>, seqs: &[u64]) -> Result<(), String> {
        if let Publisher::Pipe(stdin) = &**self {
            use tokio::io::AsyncWriteExt;
            let emitted = now_nanos();
            let mut lines = String::with_capacity(seqs.len() * 32);
            for (user, seq) in seqs.iter().enumerate() {
                lines.push_str(&format!("{user} {seq} {emitted}\n"));
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
            async move { publisher.publish(user, seq).await }
        });
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }

    /// One event, published in the background unless it is a line on a pipe; the
    /// returned task ends with its outcome.
    async fn publish_one(
        self: &Arc<Self>,
        user: usize,
        seq: u64,
    ) -> Result<Option<tokio::task::JoinHandle<Result<(), String>>>, String> {
        if let Publisher::Pipe(stdin) = &**self {
            use tokio::io::AsyncWriteExt;
            let line = format!("{user} {seq} {}\n", now_nanos());
            let mut stdin = stdin.lock().await;
            stdin
                .write_all(line.as_bytes())
                .await
                .map_err(|e| format!("embedded hub: {e}"))?;
            return Ok(None);
        }
        let publisher = Arc::clone(self);
        Ok(Some(tokio::spawn(async move {
            publisher.publish(user, seq).await
        })))
    }

    async fn publish(&self, user: usize, seq: u64) -> Result<(), String> {
        let emitted = now_nanos();
        match self {
            Publisher::Pipe(_) => Err("pipe publishers publish whole rounds".into()),
            Publisher::Engine(events) => publish_event(events.as_ref(), user, seq, emitted).await,
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

/// The event a worker would publish (a progress tick), stamped with its emit time.
pub async fn publish_event(
    events: &dyn EventLog,
    user: usize,
    seq: u64,
    emitted: u64,
) -> Result<(), String> {
    let body = EventBody::SyncStage {
        sync_id: format!("t{emitted}"),
        project_id: format!("project-{user}"),
        stage: SyncStatus::Running,
        progress: Some(Progress {
            percent: (seq % 100) as u8,
            objects: seq,
            bytes: seq * 1024,
        }),
        at: hivesync::domain::now_rfc3339(),
        retry: None,
    };
    events
        .publish(&user_name(user), body)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `loadtest embedded-hub`: a hub with the embedded engine in this process, printing
/// its address, then publishing each `user seq emitted_ns` line of standard input.
pub async fn embedded_hub() -> Result<Value, String> {
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = hivesync::config::Config {
        listen: "127.0.0.1:0".parse().map_err(|_| "address")?,
        data_dir: data.path().to_path_buf(),
        jwt_secret: Some(crate::SECRET.to_owned()),
        min_free_bytes: 0,
        serve_workers: Some(0),
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
        let (Some(Ok(user)), Some(Ok(seq)), Some(Ok(emitted))) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // as concurrent workers would: the engine commits what is waiting together
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(err) = publish_event(events.as_ref(), user as usize, seq, emitted).await {
                eprintln!("publish failed: {err}");
            }
        });
    }
    stop.cancel();
    let _ = running.await;
    Ok(json!({"scenario": "embedded-hub"}))
}

fn user_name(user: usize) -> String {
    format!("fan-{user}")
}

/// A private redis-server on a free port, without persistence; killed on drop.
pub struct PrivateRedis {
    child: tokio::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub async fn start() -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("redis-server: {e} (apt-get install redis-server)"))?;
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(Self {
                    child,
                    port,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("redis-server did not start".into())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

const SOCKETIO_SERVER: &str = r#"
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const pub = createClient({ url: process.env.REDIS_URL });
const sub = pub.duplicate();
Promise.all([pub.connect(), sub.connect()]).then(() => {
  const http = require("http").createServer();
  const io = new Server(http, { adapter: createAdapter(pub, sub), transports: ["websocket"], perMessageDeflate: false, httpCompression: false, serveClient: false });
  io.on("connection", (socket) => socket.join("user-" + socket.handshake.query.user));
  http.listen(0, "127.0.0.1", () => console.log("socketio serving on " + http.address().port));
});
"#;

/// Installs Socket.IO and its Redis adapter into a temporary directory (once per run).
async fn install_socketio() -> Result<tempfile::TempDir, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    eprintln!(
        "installing socket.io 4 and @socket.io/redis-adapter from npm into {}",
        dir.path().display()
    );
    let status = tokio::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(dir.path())
        .args(["socket.io@4", "@socket.io/redis-adapter@8", "redis@4"])
        .status()
        .await
        .map_err(|e| format!("npm: {e}"))?;
    if !status.success() {
        return Err("npm install failed".into());
    }
    std::fs::write(dir.path().join("server.js"), SOCKETIO_SERVER).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// Starts a process and waits for it to print `<prefix><port>` on stdout.
async fn start_printing_port(
    mut command: tokio::process::Command,
    prefix: &str,
) -> Result<(tokio::process::Child, String), String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_owned());
            }
        }
        None
    })
    .await
    .map_err(|_| "server did not start in 60 s")?
    .ok_or("server exited before serving")?;
    Ok((child, found))
}

/// What the clients connect to and how events get in.
struct Rig {
    urls: Vec<String>,
    publisher: Publisher,
    /// processes (hubs, node servers) and their pids, for CPU and RSS
    children: Vec<tokio::process::Child>,
    _redis: Option<PrivateRedis>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn rig(hub_binary: &Path, load: &Load) -> Result<Rig, String> {
    match load.target {
        Target::Embedded => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut command = tokio::process::Command::new(exe);
            command
                .args(["--json", "/dev/null", "embedded-hub"])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::piped());
            let (mut child, addr) =
                start_printing_port(command, "hivesync serving on http://").await?;
            let stdin = child.stdin.take().ok_or("no stdin")?;
            Ok(Rig {
                urls: vec![format!("ws://{addr}/api/v1/ws")],
                publisher: Publisher::Pipe(Mutex::new(stdin)),
                children: vec![child],
                _redis: None,
                _dirs: Vec::new(),
            })
        }
        Target::Redis => {
            let redis = PrivateRedis::start().await?;
            let data = tempfile::tempdir().map_err(|e| e.to_string())?;
            let mut children = Vec::new();
            let mut urls = Vec::new();
            for _ in 0..load.hubs {
                let mut command = tokio::process::Command::new(hub_binary);
                command
                    .arg("serve")
                    .env("HIVESYNC_LISTEN", "127.0.0.1:0")
                    .env("HIVESYNC_DATA_DIR", data.path())
                    .env("HIVESYNC_JWT_SECRET", crate::SECRET)
                    .env("HIVESYNC_REDIS_URL", redis.url())
                    .env("HIVESYNC_REDIS_PREFIX", "fanout")
                    .env("HIVESYNC_MIN_FREE_BYTES", "0")
                    .env("RUST_LOG", "warn");
                let (child, addr) =
                    start_printing_port(command, "hivesync serving on http://").await?;
                children.push(child);
                urls.push(format!("ws://{addr}/api/v1/ws"));
            }
            let engine = hivesync::engine::redis_engine::RedisEngine::connect(
                hivesync::engine::redis_engine::RedisSettings {
                    url: redis.url(),
                    prefix: "fanout".into(),
                    reclaim_after: Duration::from_secs(60),
                    history_len: 1000,
                    sync_rate: (30, Duration::from_secs(60)),
                    pool_size: 64,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(Rig {
                urls,
                publisher: Publisher::Engine(engine),
                children,
                _redis: Some(redis),
                _dirs: vec![data],
            })
        }
        Target::Socketio => {
            let redis = PrivateRedis::start().await?;
            let install = install_socketio().await?;
            let mut children = Vec::new();
            let mut urls = Vec::new();
            for _ in 0..load.hubs {
                let mut command = tokio::process::Command::new("node");
                command
                    .arg(install.path().join("server.js"))
                    .current_dir(install.path())
                    .env("REDIS_URL", redis.url());
                let (child, port) = start_printing_port(command, "socketio serving on ").await?;
                children.push(child);
                urls.push(format!(
                    "ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
                ));
            }
            let client = redis::Client::open(redis.url().as_str()).map_err(|e| e.to_string())?;
            let connection = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            Ok(Rig {
                urls,
                publisher: Publisher::SocketIo { redis: connection },
                children,
                _redis: Some(redis),
                _dirs: vec![install],
            })
        }
    }
}

fn rss_of(pid: u32) -> u64 {
    crate::rss_bytes(pid).unwrap_or(0)
}

pub async fn run(hub_binary: &Path, load: Load) -> Result<Value, String> {
    let tokens = (0..load.users)
        .map(|user| crate::token_for(&user_name(user)))
        .collect::<Result<Vec<_>, _>>()?;
    let rig = rig(hub_binary, &load).await?;
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
    let client_urls: Vec<String> = (0..load.sockets)
        .map(|i| {
            let user = i % load.users;
            let base = &rig.urls[i % rig.urls.len()];
            match load.target {
                Target::Socketio => format!("{base}&user={user}"),
                _ => format!("{base}?access_token={}", tokens[user]),
            }
        })
        .collect();
    let mut clients = Vec::with_capacity(load.sockets);
    let mut start_seq = vec![u64::MAX; load.users];
    let mut opened = 0;
    while opened < load.sockets {
        let wave = 250.min(load.sockets - opened);
        let batch = futures_util::future::join_all((opened..opened + wave).map(|i| {
            let user = i % load.users;
            let base = &rig.urls[i % rig.urls.len()];
            let url = match load.target {
                Target::Socketio => format!("{base}&user={user}"),
                _ => format!("{base}?access_token={}", tokens[user]),
            };
            async move {
                open_client(load.target, &url)
                    .await
                    .map(|opened| (i, user, opened))
            }
        }))
        .await;
        for result in batch {
            let (i, user, (socket, last)) = result?;
            start_seq[user] = start_seq[user].min(last);
            let tally = Arc::clone(&tally);
            let stop = Arc::clone(&stop);
            clients.push(tokio::spawn(run_client(
                load.target,
                client_urls[i].clone(),
                socket,
                last,
                i,
                tally,
                stop,
            )));
        }
        opened += wave;
        eprint!("\r  sockets open: {opened:>6} / {}", load.sockets);
    }
    eprintln!();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // publish: steady rounds, then a burst
    let publisher = Arc::new(rig.publisher);
    let mut next_seq: Vec<u64> = start_seq
        .iter()
        .map(|s| if *s == u64::MAX { 0 } else { *s })
        .collect();
    // steady: the events of a round spread evenly over the round (users' events do not
    // all happen at the same instant); burst: whole rounds back to back
    let steady_events = load.rate * load.seconds * load.users as u64;
    let spacing = 1.0 / (load.rate as f64 * load.users as f64);
    let started = Instant::now();
    let mut published = 0u64;
    let mut in_flight = Vec::new();
    for n in 0..steady_events {
        let due = started + Duration::from_secs_f64(n as f64 * spacing);
        tokio::time::sleep_until(due.into()).await;
        let user = (n % load.users as u64) as usize;
        next_seq[user] += 1;
        if let Some(task) = publisher.publish_one(user, next_seq[user]).await? {
            in_flight.push(task);
        }
        published += 1;
        if n % (load.users as u64 * load.rate.max(1)) == 0 {
            eprint!(
                "\r  published {published:>9} events, delivered {:>10}",
                tally.received()
            );
        }
    }
    for task in in_flight {
        task.await.map_err(|e| e.to_string())??;
    }
    let mut burst_started = None;
    for _ in 0..load.burst {
        if burst_started.is_none() {
            burst_started = Some(Instant::now());
            tally.burst_start.store(now_nanos(), Ordering::Relaxed);
        }
        for seq in next_seq.iter_mut() {
            *seq += 1;
        }
        publisher.publish_round(&next_seq).await?;
        published += load.users as u64;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let burst_secs = burst_started.map(|at| at.elapsed().as_secs_f64());
    let expected = published * (load.sockets / load.users) as u64;
    // drain: until everything arrived or nothing moved for 3 s
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
        } else if quiet_since.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "\r  published {published:>9} events, delivered {:>10}",
        tally.received()
    );
    stop.store(true, Ordering::Relaxed);
    let mut finals = Vec::with_capacity(clients.len());
    for client in clients {
        finals.push(client.await.unwrap_or(0));
    }
    let mut rss_total = 0;
    for child in &rig.children {
        if let Some(pid) = child.id() {
            rss_total += rss_of(pid);
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
        // steady: deliveries over the publishing time; burst: from its first emit to
        // its last receipt
        let secs = if name == "steady" {
            load.seconds as f64
        } else {
            last.saturating_sub(tally.burst_start.load(Ordering::Relaxed).min(first)) as f64 / 1e9
        };
        let per_sec = if secs > 0.0 { count as f64 / secs } else { 0.0 };
        let merged = phase.merged().await;
        let ms = |q: f64| merged.value_at_quantile(q) as f64 / 1000.0;
        let max = merged.max() as f64 / 1000.0;
        phases.insert(
            name.to_owned(),
            json!({
                "deliveries": count,
                "deliveries_per_s": per_sec,
                "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": max},
            }),
        );
        rows.push(format!(
            "| {} | {name} | {} | {} | {count} | {per_sec:.0} | {:.2} | {:.2} | {max:.2} |",
            format!("{:?}", load.target).to_lowercase(),
            rig.urls.len(),
            load.sockets,
            ms(0.5),
            ms(0.99)
        ));
    }
    let result = json!({
        "scenario": "fanout",
        "target": format!("{:?}", load.target).to_lowercase(),
        "servers": rig.urls.len(),
        "sockets": load.sockets,
        "users": load.users,
        "steady_rounds_per_s": load.rate,
        "steady_seconds": load.seconds,
        "burst_rounds": load.burst,
        "events_published": published,
        "publish_seconds": publish_secs,
        "burst_publish_seconds": burst_secs,
        "deliveries_expected": expected,
        "deliveries": received,
        "phases": phases,
        "lost": lost,
        "duplicated": duplicated,
        "resumed_after_close": resumed,
        "server_rss_bytes": rss_total,
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
    drop(rig.children);
    Ok(result)
}
