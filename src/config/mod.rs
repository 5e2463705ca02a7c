//! Configuration: the environment variables of API.md, each overridable by a flag of
//! the same name (`HIVESYNC_LISTEN` ↔ `--listen`). `Config::default()` is the contract's
//! defaults, so tests start from it and change only what they mean to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::{UrlPolicy, parse_rate};

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub redis_url: Option<String>,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<String>,
    /// when set, tokens must carry this `aud`
    pub jwt_audience: Option<String>,
    /// when set, tokens must carry this `iss`
    pub jwt_issuer: Option<String>,
    /// sync jobs a `worker` process runs in parallel
    pub workers: usize,
    /// in-process workers of `serve`; `None` = the contract's default for the engine
    pub serve_workers: Option<usize>,
    pub redis_prefix: String,
    /// `redis_url` names nodes of a Redis Cluster
    pub redis_cluster: bool,
    pub reclaim_after: Duration,
    pub allowed_schemes: Vec<String>,
    pub allow_private_hosts: bool,
    pub sync_timeout: Duration,
    pub secrets_dir: Option<PathBuf>,
    /// JSON file: which users may use which credential, towards which hosts; a
    /// credential it does not name is usable by no one
    pub credential_scopes: Option<PathBuf>,
    pub ssh_known_hosts: Option<PathBuf>,
    /// PEM bundle of the CAs trusted for HTTPS remotes, instead of the system's
    pub https_ca_file: Option<PathBuf>,
    pub min_free_bytes: u64,
    pub sync_rate: (u32, Duration),
    pub retry_base: Duration,
    pub retry_max: u32,
    /// where the dashboard's files are served from
    pub static_dir: PathBuf,
    /// a WebSocket peer silent this long is dropped
    pub ws_idle_timeout: Duration,
    /// frames a connection may have queued before it is closed with 4008
    pub ws_queue: usize,
    /// events kept per user for resume and polling
    pub event_history: u64,
    /// how long SIGTERM waits for running syncs before returning them to the queue
    pub drain_timeout: Duration,
    /// where `hivesync worker` serves /metrics, /healthz and /readyz
    pub metrics_listen: SocketAddr,
    /// how often workers inspect every mirror for damage; `None` = never
    pub health_check_interval: Option<Duration>,
    /// how often the watchdog looks for syncs whose job was lost
    pub watchdog_interval: Duration,
    /// how long past `sync_timeout` a stranded sync waits before the watchdog acts
    pub watchdog_margin: Duration,
    /// the shortest `sync_interval_s` a project may have
    pub min_sync_interval: Duration,
    /// consecutive failures after which a project's scheduled syncs stop
    pub pause_after_failures: u32,
    /// webhook deliveries one project may send, count per period
    pub webhook_rate: (u32, Duration),
    /// deliveries with a wrong signature allowed per project and per peer address
    pub webhook_failures: (u32, Duration),
    /// webhook deliveries being read at once, per project and in the hub
    pub webhook_per_project: usize,
    pub webhook_max: usize,
    /// the key webhook secrets are derived from; see `app::webhook_key`
    pub webhook_key: Option<String>,
    /// how often the scheduler looks for due projects
    pub scheduler_tick: Duration,
    /// snapshot directories one process watches with inotify so no-op syncs need not
    /// stat every file; `None` = half the user's `max_user_watches`, 0 = off
    pub snapshot_watches: Option<usize>,
    /// mirror repositories the reader keeps open
    pub reader_cache: usize,
    /// syncs one owner runs at once on one process's workers; `None` = half of them
    pub owner_max_running: Option<usize>,
    /// projects one user may register
    pub max_projects_per_user: usize,
    /// WebSocket connections one user may hold on one hub
    pub ws_per_user: usize,
    /// WebSocket connections one hub holds; `None` = from the process's file limit
    pub ws_max: Option<usize>,
    /// reads of a mirror (tree, file, search, diff, metadata) one user runs at once
    pub reads_per_user: usize,
    /// reads of a mirror the process runs at once (on the blocking pool)
    pub reads_max: usize,
    /// what one diff may cost
    pub diff: crate::mirror::read::DiffLimits,
    /// the only directories `file://` repo URLs may name (with `file` allowed)
    pub file_roots: Vec<PathBuf>,
    /// what one mirror may hold ([`crate::mirror::Quota`])
    pub quota: crate::mirror::Quota,
    /// the embedded store's page cache
    pub store_cache_bytes: usize,
    /// how often a serving process hands its heap's freed pages back; zero = never
    pub malloc_trim_every: Duration,
    /// when a mirror's object store is consolidated, and how long unreachable objects
    /// are kept
    pub housekeeping: crate::mirror::housekeeping::Policy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            redis_url: None,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_audience: None,
            jwt_issuer: None,
            workers: 2,
            serve_workers: None,
            redis_prefix: "hivesync".to_owned(),
            redis_cluster: false,
            reclaim_after: Duration::from_millis(60_000),
            allowed_schemes: vec!["https".to_owned(), "ssh".to_owned()],
            allow_private_hosts: false,
            sync_timeout: Duration::from_secs(600),
            secrets_dir: None,
            credential_scopes: None,
            ssh_known_hosts: None,
            https_ca_file: None,
            min_free_bytes: 1 << 30,
            sync_rate: (30, Duration::from_secs(60)),
            retry_base: Duration::from_millis(30_000),
            retry_max: 5,
            static_dir: PathBuf::from("static"),
            ws_idle_timeout: Duration::from_secs(60),
            ws_queue: 1024,
            event_history: 1000,
            drain_timeout: Duration::from_secs(30),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            health_check_interval: Some(Duration::from_secs(3600)),
            watchdog_interval: Duration::from_secs(30),
            watchdog_margin: Duration::from_secs(60),
            min_sync_interval: Duration::from_secs(60),
            pause_after_failures: 5,
            webhook_rate: (60, Duration::from_secs(60)),
            webhook_failures: (10, Duration::from_secs(60)),
            webhook_per_project: 4,
            webhook_max: 64,
            webhook_key: None,
            scheduler_tick: Duration::from_secs(1),
            snapshot_watches: None,
            reader_cache: crate::mirror::read::DEFAULT_CACHE,
            owner_max_running: None,
            max_projects_per_user: 1000,
            ws_per_user: 64,
            ws_max: None,
            reads_per_user: 4,
            // enough to keep both cores of a small box busy while some reads wait on
            // the disk, far below tokio's 512 blocking threads
            reads_max: 16,
            diff: crate::mirror::read::DiffLimits::default(),
            file_roots: Vec::new(),
            quota: crate::mirror::Quota::default(),
            store_cache_bytes: crate::engine::embedded::DEFAULT_CACHE_BYTES,
            malloc_trim_every: Duration::from_secs(10),
            housekeeping: crate::mirror::housekeeping::Policy::default(),
        }
    }
}

impl Config {
    /// In-process workers `serve` runs: `HIVESYNC_WORKERS` with the embedded engine,
    /// none with Redis (workers are separate processes there).
    pub fn effective_serve_workers(&self) -> usize {
        self.serve_workers.unwrap_or(if self.redis_url.is_some() {
            0
        } else {
            self.workers
        })
    }

    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy {
            allowed_schemes: self.allowed_schemes.clone(),
            allow_private_hosts: self.allow_private_hosts,
            file_roots: self.file_roots(),
        }
    }

    /// Where `file` URLs may point: `HIVESYNC_FILE_ROOTS`, never `DATA_DIR`.
    pub fn file_roots(&self) -> crate::domain::repo_url::FileRoots {
        crate::domain::repo_url::FileRoots {
            roots: self.file_roots.clone(),
            data_dir: self.data_dir.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid value for {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// The flags (and environment) every subcommand that runs the engine accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "HIVESYNC_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// mirrors and the embedded store [default: ./data]
    #[arg(long, env = "HIVESYNC_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Redis URL; unset = the embedded single-node engine
    #[arg(long, env = "HIVESYNC_REDIS_URL")]
    pub redis_url: Option<String>,
    /// HS256 token secret [default: a dev secret kept in DATA_DIR]
    #[arg(long, env = "HIVESYNC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256/EdDSA tokens, instead of a secret
    #[arg(long, env = "HIVESYNC_JWT_PUBLIC_KEY", hide_env_values = true)]
    pub jwt_public_key: Option<String>,
    /// tokens must carry this aud [default: not checked]
    #[arg(long, env = "HIVESYNC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// tokens must carry this iss [default: not checked]
    #[arg(long, env = "HIVESYNC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// sync jobs run in parallel [default: 2]
    #[arg(long, env = "HIVESYNC_WORKERS")]
    pub workers: Option<usize>,
    /// in-process workers of serve [default: HIVESYNC_WORKERS embedded, 0 on Redis]
    #[arg(long, env = "HIVESYNC_SERVE_WORKERS")]
    pub serve_workers: Option<usize>,
    /// prefix of every Redis key [default: hivesync]
    #[arg(long, env = "HIVESYNC_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// 1 = HIVESYNC_REDIS_URL lists nodes of a Redis Cluster, comma-separated [default: 0]
    #[arg(long, env = "HIVESYNC_REDIS_CLUSTER")]
    pub redis_cluster: Option<String>,
    /// a job silent this long is taken over [default: 60000]
    #[arg(long, env = "HIVESYNC_RECLAIM_AFTER_MS")]
    pub reclaim_after_ms: Option<u64>,
    /// repo URL schemes accepted [default: https,ssh]
    #[arg(long, env = "HIVESYNC_ALLOWED_SCHEMES")]
    pub allowed_schemes: Option<String>,
    /// 1 = allow loopback/private remotes [default: 0]
    #[arg(long, env = "HIVESYNC_ALLOW_PRIVATE_HOSTS")]
    pub allow_private_hosts: Option<String>,
    /// bound on a whole sync, retries included [default: 600]
    #[arg(long, env = "HIVESYNC_SYNC_TIMEOUT_S")]
    pub sync_timeout_s: Option<u64>,
    /// credentials by name [default: env HIVESYNC_SECRET_<NAME> only]
    #[arg(long, env = "HIVESYNC_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// JSON file: who may use which credential where [default: none usable]
    #[arg(long, env = "HIVESYNC_CREDENTIAL_SCOPES")]
    pub credential_scopes: Option<PathBuf>,
    /// known_hosts enforced for SSH remotes [default: unset]
    #[arg(long, env = "HIVESYNC_SSH_KNOWN_HOSTS")]
    pub ssh_known_hosts: Option<PathBuf>,
    /// mirror health check period, 0 = off [default: 3600]
    #[arg(long, env = "HIVESYNC_HEALTH_CHECK_INTERVAL_S")]
    pub health_check_interval_s: Option<u64>,
    /// how often stranded syncs are looked for [default: 30]
    #[arg(long, env = "HIVESYNC_WATCHDOG_INTERVAL_S")]
    pub watchdog_interval_s: Option<u64>,
    /// PEM CAs trusted for HTTPS remotes [default: the system's]
    #[arg(long, env = "HIVESYNC_HTTPS_CA_FILE")]
    pub https_ca_file: Option<PathBuf>,
    /// free-space floor of DATA_DIR [default: 1073741824]
    #[arg(long, env = "HIVESYNC_MIN_FREE_BYTES")]
    pub min_free_bytes: Option<u64>,
    /// sync requests per user, COUNT/s|min|hour [default: 30/min]
    #[arg(long, env = "HIVESYNC_SYNC_RATE")]
    pub sync_rate: Option<String>,
    /// first retry wait of a failed attempt [default: 30000]
    #[arg(long, env = "HIVESYNC_RETRY_BASE_MS")]
    pub retry_base_ms: Option<u64>,
    /// attempts per sync [default: 5]
    #[arg(long, env = "HIVESYNC_RETRY_MAX")]
    pub retry_max: Option<u32>,
    /// the dashboard's files [default: static]
    #[arg(long, env = "HIVESYNC_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
    /// a silent WebSocket peer is dropped after this [default: 60]
    #[arg(long, env = "HIVESYNC_WS_IDLE_TIMEOUT_S")]
    pub ws_idle_timeout_s: Option<u64>,
    /// events kept per user for resume [default: 1000]
    #[arg(long, env = "HIVESYNC_EVENT_HISTORY")]
    pub event_history: Option<u64>,
    /// shortest sync_interval_s allowed [default: 60]
    #[arg(long, env = "HIVESYNC_MIN_SYNC_INTERVAL_S")]
    pub min_sync_interval_s: Option<u64>,
    /// failures in a row that pause a schedule [default: 5]
    #[arg(long, env = "HIVESYNC_PAUSE_AFTER_FAILURES")]
    pub pause_after_failures: Option<u32>,
    /// webhook deliveries per project [default: 60/min]
    #[arg(long, env = "HIVESYNC_WEBHOOK_RATE")]
    pub webhook_rate: Option<String>,
    /// deliveries with a wrong signature per project and per peer [default: 10/min]
    #[arg(long, env = "HIVESYNC_WEBHOOK_FAILURES")]
    pub webhook_failures: Option<String>,
    /// webhook deliveries read at once for one project [default: 4]
    #[arg(long, env = "HIVESYNC_WEBHOOK_PER_PROJECT")]
    pub webhook_per_project: Option<usize>,
    /// webhook deliveries read at once by the hub [default: 64]
    #[arg(long, env = "HIVESYNC_WEBHOOK_MAX")]
    pub webhook_max: Option<usize>,
    /// key webhook secrets derive from [default: from the JWT secret]
    #[arg(long, env = "HIVESYNC_WEBHOOK_KEY", hide_env_values = true)]
    pub webhook_key: Option<String>,
    /// how long SIGTERM waits for running syncs before handing them back [default: 30]
    #[arg(long, env = "HIVESYNC_DRAIN_TIMEOUT_S")]
    pub drain_timeout_s: Option<u64>,
    /// where `hivesync worker` serves /metrics, /healthz and /readyz [default: 127.0.0.1:9090]
    #[arg(long, env = "HIVESYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// snapshot directories watched so no-op syncs skip the stat pass, 0 = off
    /// [default: half of fs.inotify.max_user_watches]
    #[arg(long, env = "HIVESYNC_SNAPSHOT_WATCHES")]
    pub snapshot_watches: Option<usize>,
    /// mirror repositories kept open for reads, least recently read closed first
    /// [default: 256]
    #[arg(long, env = "HIVESYNC_READER_CACHE")]
    pub reader_cache: Option<usize>,
    /// syncs one owner runs at once [default: half the process's workers, at least 1]
    #[arg(long, env = "HIVESYNC_OWNER_MAX_RUNNING")]
    pub owner_max_running: Option<usize>,
    /// projects one user may register [default: 1000]
    #[arg(long, env = "HIVESYNC_MAX_PROJECTS")]
    pub max_projects: Option<usize>,
    /// WebSocket connections per user on one hub [default: 64]
    #[arg(long, env = "HIVESYNC_WS_PER_USER")]
    pub ws_per_user: Option<usize>,
    /// WebSocket connections one hub holds [default: 3/4 of the open-file limit less 256]
    #[arg(long, env = "HIVESYNC_WS_MAX")]
    pub ws_max: Option<usize>,
    /// reads (tree, file, search, diff, metadata) one user runs at once [default: 4]
    #[arg(long, env = "HIVESYNC_READS_PER_USER")]
    pub reads_per_user: Option<usize>,
    /// reads the hub runs at once, all users together [default: 16]
    #[arg(long, env = "HIVESYNC_READS_MAX")]
    pub reads_max: Option<usize>,
    /// changed files one diff lists at most [default: 1000]
    #[arg(long, env = "HIVESYNC_DIFF_MAX_FILES")]
    pub diff_max_files: Option<usize>,
    /// a file's patch over this many bytes is marked too_large [default: 204800]
    #[arg(long, env = "HIVESYNC_DIFF_MAX_PATCH_BYTES")]
    pub diff_max_patch_bytes: Option<usize>,
    /// patches one diff answer carries in total [default: 4194304]
    #[arg(long, env = "HIVESYNC_DIFF_MAX_BYTES")]
    pub diff_max_bytes: Option<usize>,
    /// time one diff may spend computing line differences [default: 5000]
    #[arg(long, env = "HIVESYNC_DIFF_TIMEOUT_MS")]
    pub diff_timeout_ms: Option<u64>,
    /// directories file:// repo URLs may name, colon-separated [default: none]
    #[arg(long, env = "HIVESYNC_FILE_ROOTS")]
    pub file_roots: Option<String>,
    /// checked-out bytes one mirror may hold [default: 4294967296]
    #[arg(long, env = "HIVESYNC_MAX_CHECKOUT_BYTES")]
    pub max_checkout_bytes: Option<u64>,
    /// files one mirror may check out [default: 200000]
    #[arg(long, env = "HIVESYNC_MAX_FILES")]
    pub max_files: Option<u64>,
    /// bytes of one checked-out file [default: 104857600]
    #[arg(long, env = "HIVESYNC_MAX_FILE_BYTES")]
    pub max_file_bytes: Option<u64>,
    /// bytes of all one user's mirrors together [default: 21474836480]
    #[arg(long, env = "HIVESYNC_MAX_USER_BYTES")]
    pub max_user_bytes: Option<u64>,
    /// bytes of one mirror's object store after a fetch [default: 4294967296]
    #[arg(long, env = "HIVESYNC_MAX_OBJECTS_BYTES")]
    pub max_objects_bytes: Option<u64>,
    /// the embedded store's page cache, MiB [default: 64]
    #[arg(long, env = "HIVESYNC_STORE_CACHE_MB")]
    pub store_cache_mb: Option<usize>,
    /// seconds between handing the heap's freed pages back to the kernel (glibc's
    /// malloc_trim), 0 = never [default: 10]
    #[arg(long, env = "HIVESYNC_MALLOC_TRIM_S")]
    pub malloc_trim_s: Option<u64>,
    /// packs a mirror may have before housekeeping consolidates it, 0 = off [default: 8]
    #[arg(long, env = "HIVESYNC_HOUSEKEEPING_PACKS")]
    pub housekeeping_packs: Option<usize>,
    /// how long objects no branch reaches are kept before they are deleted
    /// [default: 1209600]
    #[arg(long, env = "HIVESYNC_PRUNE_GRACE_S")]
    pub prune_grace_s: Option<u64>,
    /// what consolidates mirrors: auto (git gc when git >= 2.37 is on PATH, else
    /// gitoxide) or gitoxide [default: auto]
    #[arg(long, env = "HIVESYNC_HOUSEKEEPING_TOOL")]
    pub housekeeping_tool: Option<String>,
}

impl ConfigArgs {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.data_dir {
            config.data_dir = v;
        }
        config.redis_url = self.redis_url.filter(|url| !url.trim().is_empty());
        config.jwt_secret = self.jwt_secret.filter(|s| !s.is_empty());
        config.jwt_public_key = self.jwt_public_key.filter(|s| !s.is_empty());
        config.jwt_audience = self.jwt_audience.filter(|s| !s.is_empty());
        config.jwt_issuer = self.jwt_issuer.filter(|s| !s.is_empty());
        if let Some(v) = self.workers {
            config.workers = v;
        }
        config.serve_workers = self.serve_workers;
        if let Some(v) = self.redis_prefix {
            config.redis_prefix = v;
        }
        if let Some(v) = self.redis_cluster {
            config.redis_cluster = matches!(v.trim(), "1" | "true" | "yes");
        }
        if let Some(v) = self.reclaim_after_ms {
            config.reclaim_after = Duration::from_millis(v);
        }
        if let Some(v) = self.allowed_schemes {
            config.allowed_schemes = v
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = self.allow_private_hosts {
            config.allow_private_hosts = matches!(v.trim(), "1" | "true" | "yes");
        }
        if let Some(v) = self.sync_timeout_s {
            config.sync_timeout = Duration::from_secs(v.max(1));
        }
        config.secrets_dir = self.secrets_dir;
        config.credential_scopes = self.credential_scopes;
        config.ssh_known_hosts = self.ssh_known_hosts;
        config.https_ca_file = self.https_ca_file;
        if let Some(v) = self.watchdog_interval_s {
            config.watchdog_interval = Duration::from_secs(v.max(1));
        }
        if let Some(v) = self.health_check_interval_s {
            config.health_check_interval = (v > 0).then(|| Duration::from_secs(v));
        }
        if let Some(v) = self.min_free_bytes {
            config.min_free_bytes = v;
        }
        if let Some(v) = self.sync_rate {
            config.sync_rate = parse_rate(&v).ok_or_else(|| ConfigError {
                name: "HIVESYNC_SYNC_RATE",
                reason: format!("'{v}' is not COUNT/s|min|hour"),
            })?;
        }
        if let Some(v) = self.retry_base_ms {
            config.retry_base = Duration::from_millis(v);
        }
        if let Some(v) = self.retry_max {
            config.retry_max = v.max(1);
        }
        if let Some(v) = self.static_dir {
            config.static_dir = v;
        }
        if let Some(v) = self.ws_idle_timeout_s {
            config.ws_idle_timeout = Duration::from_secs(v.max(1));
        }
        if let Some(v) = self.event_history {
            config.event_history = v.max(1);
        }
        if let Some(v) = self.metrics_listen {
            config.metrics_listen = v;
        }
        config.snapshot_watches = self.snapshot_watches;
        config.owner_max_running = self.owner_max_running.map(|cap| cap.max(1));
        if let Some(v) = self.max_projects {
            config.max_projects_per_user = v;
        }
        if let Some(v) = self.ws_per_user {
            config.ws_per_user = v;
        }
        config.ws_max = self.ws_max;
        if let Some(v) = self.reads_per_user {
            config.reads_per_user = v.max(1);
        }
        if let Some(v) = self.reads_max {
            config.reads_max = v.max(1);
        }
        if let Some(v) = self.diff_max_files {
            config.diff.max_files = v.max(1);
        }
        if let Some(v) = self.diff_max_patch_bytes {
            config.diff.max_patch_bytes = v.max(1);
        }
        if let Some(v) = self.diff_max_bytes {
            config.diff.max_bytes = v.max(1);
        }
        if let Some(v) = self.diff_timeout_ms {
            config.diff.timeout = Duration::from_millis(v.max(1));
        }
        if let Some(v) = self.file_roots {
            config.file_roots = std::env::split_paths(&v)
                .filter(|path| !path.as_os_str().is_empty())
                .collect();
        }
        if let Some(v) = self.max_checkout_bytes {
            config.quota.checkout_bytes = v;
        }
        if let Some(v) = self.max_files {
            config.quota.files = v;
        }
        if let Some(v) = self.max_file_bytes {
            config.quota.file_bytes = v;
        }
        if let Some(v) = self.max_user_bytes {
            config.quota.user_bytes = v;
        }
        if let Some(v) = self.max_objects_bytes {
            config.quota.objects_bytes = v;
        }
        if let Some(v) = self.reader_cache {
            config.reader_cache = v.max(1);
        }
        if let Some(v) = self.store_cache_mb {
            config.store_cache_bytes = v.max(1).saturating_mul(1 << 20);
        }
        if let Some(v) = self.malloc_trim_s {
            config.malloc_trim_every = Duration::from_secs(v);
        }
        if let Some(v) = self.housekeeping_packs {
            // one pack is already as compact as housekeeping makes it
            config.housekeeping.max_packs = if v == 0 { 0 } else { v.max(2) };
        }
        if let Some(v) = self.prune_grace_s {
            config.housekeeping.grace = Duration::from_secs(v);
        }
        if let Some(v) = self.housekeeping_tool {
            config.housekeeping.tool =
                crate::mirror::housekeeping::Tool::parse(&v).ok_or_else(|| ConfigError {
                    name: "HIVESYNC_HOUSEKEEPING_TOOL",
                    reason: format!("'{v}' is not auto or gitoxide"),
                })?;
        }
        if let Some(v) = self.drain_timeout_s {
            config.drain_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.min_sync_interval_s {
            config.min_sync_interval = Duration::from_secs(v.max(1));
        }
        if let Some(v) = self.pause_after_failures {
            config.pause_after_failures = v.max(1);
        }
        if let Some(v) = self.webhook_rate {
            config.webhook_rate = parse_rate(&v).ok_or_else(|| ConfigError {
                name: "HIVESYNC_WEBHOOK_RATE",
                reason: format!("'{v}' is not COUNT/s|min|hour"),
            })?;
        }
        if let Some(v) = self.webhook_failures {
            config.webhook_failures = parse_rate(&v).ok_or_else(|| ConfigError {
                name: "HIVESYNC_WEBHOOK_FAILURES",
                reason: format!("'{v}' is not COUNT/s|min|hour"),
            })?;
        }
        if let Some(v) = self.webhook_per_project {
            config.webhook_per_project = v.max(1);
        }
        if let Some(v) = self.webhook_max {
            config.webhook_max = v.max(1);
        }
        if let Some(v) = self.webhook_key {
            if v.len() < 32 {
                return Err(ConfigError {
                    name: "HIVESYNC_WEBHOOK_KEY",
                    reason: "must be at least 32 characters".into(),
                });
            }
            config.webhook_key = Some(v);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests;
