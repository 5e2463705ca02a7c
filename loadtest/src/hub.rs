//! The hub under test as a child process, and what the scenarios read of a process:
//! its tokens, CPU time, resident memory, and the file limit the load generator needs.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// The JWT secret of every hub the tool starts.
pub(crate) const SECRET: &str = "loadtest-secret";

pub(crate) struct Hub {
    pub(crate) child: tokio::process::Child,
    pub(crate) addr: String,
    _data: tempfile::TempDir,
}

pub(crate) async fn start_hub(binary: &PathBuf) -> Result<Hub, String> {
    start_hub_with(binary, &[]).await
}

pub(crate) async fn start_hub_with(
    binary: &PathBuf,
    extra_env: &[(&str, String)],
) -> Result<Hub, String> {
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new(binary)
        .arg("serve")
        .env("HIVESYNC_LISTEN", "127.0.0.1:0")
        .env("HIVESYNC_DATA_DIR", data.path())
        .env("HIVESYNC_JWT_SECRET", SECRET)
        .env("HIVESYNC_MIN_FREE_BYTES", "0")
        .env(
            "HIVESYNC_FILE_ROOTS",
            format!("{}:/dev/shm", std::env::temp_dir().display()),
        )
        .env("HIVESYNC_ALLOWED_SCHEMES", "file")
        .env("HIVESYNC_SYNC_RATE", "1000/s")
        .env("RUST_LOG", "warn")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (run `cargo build --release` first)",
                binary.display()
            )
        })?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.strip_prefix("hivesync serving on http://") {
                return Some(addr.to_owned());
            }
        }
        None
    })
    .await
    .map_err(|_| "hub did not start in 30 s")?
    .ok_or("hub exited before serving")?;
    Ok(Hub {
        child,
        addr,
        _data: data,
    })
}

impl Hub {
    /// The hub's DATA_DIR.
    pub(crate) fn data_dir(&self) -> &std::path::Path {
        self._data.path()
    }
}

/// A token for the hub `start_hub` runs, signed with its secret.
pub(crate) fn loadtest_token() -> Result<String, String> {
    token_for("loadtest")
}

/// A desktop token for `user`, signed with the hubs' secret.
pub(crate) fn token_for(user: &str) -> Result<String, String> {
    hivesync::auth::Authenticator::from_secret(SECRET.as_bytes())
        .mint(
            user,
            hivesync::auth::ClientKind::Desktop,
            // a day: the longest runs (100,000 projects) take hours
            Duration::from_secs(24 * 3600),
        )
        .map_err(|e| e.to_string())
}

/// A process's CPU time so far (user + system), from `/proc/PID/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name, which is in parentheses and may hold spaces
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    hivesync::memory::status_bytes(Some(pid), "VmRSS")
}

/// Raises this process's open-file limit (and so its children's) to `wanted`, or as
/// far as it may: every socket is a file on both ends of a connection test.
pub(crate) fn raise_fd_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read only the struct given
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let raised = libc::rlimit {
            rlim_cur: wanted.max(limit.rlim_cur),
            rlim_max: wanted.max(limit.rlim_max),
        };
        // root may raise the hard limit; anyone may raise the soft one to it
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}
