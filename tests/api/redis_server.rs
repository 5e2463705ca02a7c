//! A private `redis-server` per test (or a private Redis Cluster of several), on free
//! ports with AOF on (so a restart keeps its data, as in `compose.yaml`), and `hivesync
//! worker` processes against it. Never the machine's own Redis on 6379.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private Redis: one server, or a cluster of several (each node its own process,
/// directory and ports).
pub struct RedisServer {
    nodes: Vec<Node>,
    /// a Redis Cluster (every node runs `--cluster-enabled yes`)
    pub cluster: bool,
}

struct Node {
    port: u16,
    /// the cluster bus port (`cluster-port`), on a cluster
    bus_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn have_redis(tools: &[&str]) -> bool {
    for tool in tools {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            crate::skips::skip(&format!(
                "{tool} is not on PATH (apt-get install redis-server redis-tools)"
            ));
            return false;
        }
    }
    true
}

/// Starts a private server, or: fails the test in CI when `redis-server` is missing,
/// and skips it with a loud notice on a developer's machine.
pub fn redis_or_skip() -> Option<RedisServer> {
    have_redis(&["redis-server"]).then(|| RedisServer::start(1, 0))
}

/// A private 3-master Redis Cluster (`redis-server --cluster-enabled yes` and
/// `redis-cli --cluster create`), or a skip as [`redis_or_skip`].
pub fn redis_cluster_or_skip() -> Option<RedisServer> {
    have_redis(&["redis-server", "redis-cli"]).then(|| RedisServer::start(3, 0))
}

/// As [`redis_cluster_or_skip`], with a replica for each master (6 nodes), for failover.
pub fn redis_cluster_with_replicas_or_skip() -> Option<RedisServer> {
    have_redis(&["redis-server", "redis-cli"]).then(|| RedisServer::start(3, 1))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

impl RedisServer {
    fn start(masters: usize, replicas_each: usize) -> Self {
        let count = masters * (1 + replicas_each);
        let cluster = masters > 1;
        let mut server = Self {
            nodes: (0..count)
                .map(|_| Node {
                    port: free_port(),
                    bus_port: free_port(),
                    dir: tempfile::tempdir().expect("temp dir"),
                    child: None,
                })
                .collect(),
            cluster,
        };
        for index in 0..count {
            // a port found free may be taken by another test before redis-server binds
            // it: then the node starts again on other ports
            let mut tries = 0;
            while let Err(err) = server.launch(index) {
                tries += 1;
                assert!(tries < 5, "{err}");
                let node = &mut server.nodes[index];
                if let Some(mut child) = node.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                node.port = free_port();
                node.bus_port = free_port();
            }
        }
        if cluster {
            server.create_cluster(replicas_each);
        }
        server
    }

    fn launch(&mut self, index: usize) -> Result<(), String> {
        let cluster = self.cluster;
        let node = &mut self.nodes[index];
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &node.port.to_string()])
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .arg("--dir")
            .arg(node.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .arg("--logfile")
            .arg(node.dir.path().join("redis.log"));
        if cluster {
            command
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-port", &node.bus_port.to_string()])
                // a dead master is failed over after ~1 s
                .args(["--cluster-node-timeout", "1000"])
                .args(["--cluster-replica-validity-factor", "0"]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let child = node.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if answers(node.port) {
                // ours, not another test's server that took the port first
                let info = cli(node.port, &["INFO", "server"]);
                if field(&info, "process_id:") == Some(child.id().to_string()) {
                    return Ok(());
                }
                return Err(format!("port {} is another redis-server's", node.port));
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited ({status}); its log: {}",
                    node.port,
                    std::fs::read_to_string(node.dir.path().join("redis.log")).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("redis-server did not answer on port {}", node.port))
    }

    fn create_cluster(&self, replicas_each: usize) {
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(
                self.nodes
                    .iter()
                    .map(|node| format!("127.0.0.1:{}", node.port)),
            )
            .args(["--cluster-replicas", &replicas_each.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        self.wait_until_healthy();
    }

    /// Waits until every running node says the cluster is ok and knows every slot.
    pub fn wait_until_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = self
                .nodes
                .iter()
                .filter(|node| node.child.is_some())
                .all(|node| {
                    let info = cli(node.port, &["CLUSTER", "INFO"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                });
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the test cluster did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One URL, or on a cluster every node's, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}/", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs one command (routed by its key on a cluster).
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        if self.cluster {
            let client = redis::cluster::ClusterClient::new(
                self.nodes
                    .iter()
                    .map(|node| format!("redis://127.0.0.1:{}/", node.port))
                    .collect::<Vec<_>>(),
            )
            .expect("cluster client");
            let mut conn = client.get_async_connection().await.expect("connect");
            cmd.query_async(&mut conn).await.expect("redis command")
        } else {
            let client = redis::Client::open(self.url()).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            cmd.query_async(&mut conn).await.expect("redis command")
        }
    }

    /// The job stream a project's jobs go on, under `prefix`.
    pub fn jobs_key(&self, prefix: &str, project_id: &str) -> String {
        if self.cluster {
            let shard = u16::from(hivesync::domain::partition_byte(project_id))
                % hivesync::engine::redis::SHARDS;
            format!("{prefix}:{{s{shard}}}:jobs")
        } else {
            format!("{prefix}:jobs")
        }
    }

    /// `kill -9` of every node: no shutdown save; what survives is what the AOF holds.
    pub fn kill(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill_node(index);
        }
    }

    /// `kill -9` of one node.
    pub fn kill_node(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts every node again on the same ports and data (a cluster's nodes find each
    /// other again from their `nodes.conf`).
    pub fn restart(&mut self) {
        self.kill();
        for index in 0..self.nodes.len() {
            if let Err(err) = self.launch(index) {
                panic!("{err}");
            }
        }
        if self.cluster {
            self.wait_until_healthy();
        }
    }

    /// The index of the running master that holds a key matching `pattern`.
    pub fn master_holding(&self, pattern: &str) -> Option<usize> {
        self.nodes.iter().position(|node| {
            node.child.is_some()
                && cli(node.port, &["ROLE"]).starts_with("master")
                && !cli(node.port, &["--scan", "--pattern", pattern])
                    .trim()
                    .is_empty()
        })
    }

    /// The sharded channels matching `pattern` that some client subscribes to, on any
    /// running node, sorted.
    pub fn shard_channels(&self, pattern: &str) -> Vec<String> {
        let mut channels: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.child.is_some())
            .flat_map(|node| {
                cli(node.port, &["PUBSUB", "SHARDCHANNELS", pattern])
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        channels.sort();
        channels.dedup();
        channels
    }

    /// Waits until every replica of a running master has everything it wrote, so a
    /// failover loses nothing that was acknowledged before it.
    pub fn wait_for_replicas(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in self.nodes.iter().filter(|node| node.child.is_some()) {
            loop {
                let info = cli(node.port, &["INFO", "replication"]);
                if !info.contains("role:master") {
                    break;
                }
                let offset = field(&info, "master_repl_offset:");
                let behind = info
                    .lines()
                    .filter(|line| line.starts_with("slave"))
                    .filter_map(|line| line.split("offset=").nth(1))
                    .filter_map(|rest| rest.split(',').next())
                    .any(|replica| Some(replica.trim()) != offset.as_deref());
                if !behind {
                    break;
                }
                assert!(Instant::now() < deadline, "replicas did not catch up");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(name))
        .map(|value| value.trim().to_owned())
}

fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// What `redis-cli -p PORT ARGS…` prints (empty when it fails).
fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `hivesync worker` process on `redis`, logging to `log`.
pub fn spawn_worker(
    redis: &RedisServer,
    prefix: &str,
    data_dir: &Path,
    reclaim_after_ms: u64,
    log: &Path,
) -> Child {
    spawn_worker_with(redis, prefix, data_dir, reclaim_after_ms, log, &[])
}

/// [`spawn_worker`] with more environment.
pub fn spawn_worker_with(
    redis: &RedisServer,
    prefix: &str,
    data_dir: &Path,
    reclaim_after_ms: u64,
    log: &Path,
    env: &[(&str, &str)],
) -> Child {
    let log = std::fs::File::create(log).expect("worker log");
    Command::new(env!("CARGO_BIN_EXE_hivesync"))
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "hivesync=debug,info")
        .env("HIVESYNC_REDIS_URL", redis.url())
        .env(
            "HIVESYNC_REDIS_CLUSTER",
            if redis.cluster { "1" } else { "0" },
        )
        .env("HIVESYNC_REDIS_PREFIX", prefix)
        .env("HIVESYNC_DATA_DIR", data_dir)
        .env("HIVESYNC_RECLAIM_AFTER_MS", reclaim_after_ms.to_string())
        .env("HIVESYNC_WORKERS", "1")
        .env("HIVESYNC_MIN_FREE_BYTES", "0")
        .env("HIVESYNC_FILE_ROOTS", std::env::temp_dir())
        .env("HIVESYNC_METRICS_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("hivesync worker starts")
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}
