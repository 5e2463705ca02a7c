//! The processes under test: hubs (embedded child or on a private Redis), or the
//! Socket.IO peer installed from npm; and their resident memory.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

use super::publisher::Publisher;
use super::{Load, Target};

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
        let redis = Self {
            child,
            port,
            _dir: dir,
        };
        wait_for_ping(&redis.url()).await?;
        Ok(redis)
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

pub(super) const SOCKETIO_SERVER: &str = r#"
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
pub(super) async fn install_socketio() -> Result<tempfile::TempDir, String> {
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
        .args(["socket.io@4.8", "@socket.io/redis-adapter@8.3", "redis@4.7"])
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
pub(super) async fn start_printing_port(
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

/// A private Redis Cluster of `masters` nodes without persistence or replicas
/// (`redis-server --cluster-enabled yes`, then `redis-cli --cluster create`); killed on
/// drop.
pub struct PrivateCluster {
    nodes: Vec<(tokio::process::Child, u16)>,
    _dir: tempfile::TempDir,
}

impl PrivateCluster {
    pub async fn start(masters: usize) -> Result<Self, String> {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|addr| addr.port())
                .map_err(|e| e.to_string())
        };
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut nodes = Vec::new();
        for n in 0..masters {
            let (port, bus) = (free()?, free()?);
            let node_dir = dir.path().join(format!("node-{n}"));
            std::fs::create_dir_all(&node_dir).map_err(|e| e.to_string())?;
            let child = tokio::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--cluster-port", &bus.to_string()])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("redis-server: {e} (apt-get install redis-server)"))?;
            nodes.push((child, port));
        }
        let cluster = Self { nodes, _dir: dir };
        for (_, port) in &cluster.nodes {
            wait_for_ping(&format!("redis://127.0.0.1:{port}/")).await?;
        }
        let output = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|(_, port)| format!("127.0.0.1:{port}")),
            )
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("redis-cli: {e} (apt-get install redis-tools)"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout)
            ));
        }
        for _ in 0..200 {
            let mut ok = true;
            for (_, port) in &cluster.nodes {
                let info = tokio::process::Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "CLUSTER", "INFO"])
                    .output()
                    .await
                    .map_err(|e| e.to_string())?;
                ok &= String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok");
            }
            if ok {
                return Ok(cluster);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the cluster did not become healthy".into())
    }

    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|(_, port)| format!("redis://127.0.0.1:{port}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|(child, _)| child.id())
            .collect()
    }
}

async fn wait_for_ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    for _ in 0..100 {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("redis-server at {url} did not start"))
}

/// The Redis behind a run: one server or a cluster.
pub(super) enum Backing {
    One(PrivateRedis),
    Cluster(PrivateCluster),
}

impl Backing {
    pub(super) fn pids(&self) -> Vec<u32> {
        match self {
            Backing::One(redis) => redis.child.id().into_iter().collect(),
            Backing::Cluster(cluster) => cluster.pids(),
        }
    }
}

/// What the clients connect to and how events get in.
pub(super) struct Rig {
    pub(super) urls: Vec<String>,
    pub(super) publisher: Publisher,
    /// processes (hubs, node servers) and their pids, for CPU and RSS
    pub(super) children: Vec<tokio::process::Child>,
    /// `loadtest redis-publisher`, for the Redis targets: its CPU is reported apart
    pub(super) publisher_child: Option<tokio::process::Child>,
    pub(super) redis: Option<Backing>,
    pub(super) _dirs: Vec<tempfile::TempDir>,
}

pub(super) async fn start(hub_binary: &Path, load: &Load) -> Result<Rig, String> {
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
                publisher_child: None,
                redis: None,
                _dirs: Vec::new(),
            })
        }
        Target::Redis | Target::RedisCluster => {
            let cluster = load.target == Target::RedisCluster;
            let backing = if cluster {
                Backing::Cluster(PrivateCluster::start(3).await?)
            } else {
                Backing::One(PrivateRedis::start().await?)
            };
            let url = match &backing {
                Backing::One(redis) => redis.url(),
                Backing::Cluster(cluster) => cluster.url(),
            };
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
                    .env("HIVESYNC_REDIS_URL", &url)
                    .env("HIVESYNC_REDIS_CLUSTER", if cluster { "1" } else { "0" })
                    .env("HIVESYNC_REDIS_PREFIX", "fanout")
                    .env("HIVESYNC_MIN_FREE_BYTES", "0")
                    .env("RUST_LOG", "warn");
                let (child, addr) =
                    start_printing_port(command, "hivesync serving on http://").await?;
                children.push(child);
                urls.push(format!("ws://{addr}/api/v1/ws"));
            }
            let (publisher_child, publisher) = start_publisher(&url, cluster, false).await?;
            Ok(Rig {
                urls,
                publisher,
                children,
                publisher_child: Some(publisher_child),
                redis: Some(backing),
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
            let (publisher_child, publisher) = start_publisher(&redis.url(), false, true).await?;
            Ok(Rig {
                urls,
                publisher,
                children,
                publisher_child: Some(publisher_child),
                redis: Some(Backing::One(redis)),
                _dirs: vec![install],
            })
        }
    }
}

/// `loadtest redis-publisher` on `url`, and the pipe to it.
async fn start_publisher(
    url: &str,
    cluster: bool,
    socketio: bool,
) -> Result<(tokio::process::Child, Publisher), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(["--json", "/dev/null", "redis-publisher", "--url", url])
        .args(cluster.then_some("--cluster"))
        .args(socketio.then_some("--socketio"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped());
    let (mut child, _) = start_printing_port(command, "publisher ready").await?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    Ok((child, Publisher::Pipe(Mutex::new(stdin))))
}

pub(super) fn rss_of(pid: u32) -> u64 {
    crate::rss_bytes(pid).unwrap_or(0)
}
