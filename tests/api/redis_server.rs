//! A private `redis-server` per test, on a free port with AOF on (so a restart keeps its
//! data, as in `compose.yaml`), and `hivesync worker` processes against it. Never the
//! machine's own Redis on 6379.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Starts a private server, or: fails the test in CI when `redis-server` is missing,
/// and skips it with a loud notice on a developer's machine.
pub fn redis_or_skip() -> Option<RedisServer> {
    if Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        crate::skips::skip("redis-server is not on PATH (apt-get install redis-server)");
        return None;
    }
    Some(RedisServer::start())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

impl RedisServer {
    fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.answers() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `kill -9`: no shutdown save; what survives is what the AOF already holds.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
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
    let log = std::fs::File::create(log).expect("worker log");
    Command::new(env!("CARGO_BIN_EXE_hivesync"))
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "hivesync=debug,info")
        .env("HIVESYNC_REDIS_URL", redis.url())
        .env("HIVESYNC_REDIS_PREFIX", prefix)
        .env("HIVESYNC_DATA_DIR", data_dir)
        .env("HIVESYNC_RECLAIM_AFTER_MS", reclaim_after_ms.to_string())
        .env("HIVESYNC_WORKERS", "1")
        .env("HIVESYNC_MIN_FREE_BYTES", "0")
        .env("HIVESYNC_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("hivesync worker starts")
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}
