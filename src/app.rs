//! Wiring: builds the engine, hub, workers and HTTP server from a [`Config`], binds the
//! listener (so the port is known before serving), and runs until shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, KeyError};
use crate::config::Config;
use crate::engine::embedded::EmbeddedEngine;
use crate::engine::redis::{RedisEngine, RedisSettings};
use crate::engine::{Engine, EngineError};
use crate::http::AppState;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::mirror::Layout;
use crate::mirror::read::Reader;
use crate::worker::{self, WorkerSettings, WorkerStops};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not bind {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not prepare the data directory {path}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("could not open the engine")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("could not reach redis at {url}")]
    Redis { url: String, source: EngineError },
}

/// The rules the engine applies to a sync's end and to webhooks, from the configuration.
fn rules(config: &Config) -> crate::engine::schedule::Rules {
    crate::engine::schedule::Rules {
        pause_after: config.pause_after_failures,
        webhook_rate: config.webhook_rate,
    }
}

/// Opens the configured engine: Redis when `HIVESYNC_REDIS_URL` is set, else the
/// embedded one under DATA_DIR (whose unfinished syncs are put back on its queue; a
/// Redis queue keeps them itself, pending in the stream).
pub async fn open_engine(
    config: &Config,
) -> Result<(Engine, Option<Arc<RedisEngine>>), StartError> {
    let metrics = Arc::new(Metrics::new(
        &crate::mirror::SnapshotCheck::ALL.map(crate::mirror::SnapshotCheck::as_str),
    ));
    let Some(url) = &config.redis_url else {
        let embedded = EmbeddedEngine::open_sized(
            &config.data_dir,
            config.sync_rate,
            config.event_history,
            rules(config),
            metrics.store_commit.clone(),
            config.store_cache_bytes,
        )?;
        let requeued = embedded.requeue_unfinished().await?;
        let engine = Engine {
            store: embedded.clone(),
            queue: embedded.clone(),
            events: embedded,
            metrics,
        };
        if requeued > 0 {
            tracing::info!(
                requeued,
                "requeued syncs that were unfinished at the last stop"
            );
        }
        return Ok((engine, None));
    };
    let settings = RedisSettings {
        url: url.clone(),
        cluster: config.redis_cluster,
        prefix: config.redis_prefix.clone(),
        reclaim_after: config.reclaim_after,
        history_len: config.event_history,
        sync_rate: config.sync_rate,
        rules: rules(config),
        pool_size: 16 + config.workers.max(config.effective_serve_workers()),
    };
    let redis = RedisEngine::connect(settings)
        .await
        .map_err(|source| StartError::Redis {
            url: redacted_redis_url(url),
            source,
        })?;
    tracing::info!(redis = %redacted_redis_url(url), prefix = %config.redis_prefix, cluster = config.redis_cluster, "using the redis engine");
    redis.count_reconnects_in(metrics.redis_reconnects.clone());
    let engine = Engine {
        store: redis.clone(),
        queue: redis.clone(),
        events: redis.clone(),
        metrics,
    };
    Ok((engine, Some(redis)))
}

/// The Redis URL (or a cluster's comma-separated URLs) without passwords, for logs and
/// errors.
pub fn redacted_redis_url(url: &str) -> String {
    url.split(',')
        .map(|one| redacted_one_url(one.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn redacted_one_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => "<unparsable redis url>".to_owned(),
    }
}

/// A bound, ready-to-run hub.
pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    serve_workers: usize,
    /// how the dev secret was chosen, for the start-up banner
    pub generated_secret: Option<String>,
}

/// The JWT key: the configured secret or public key, else a dev secret kept in
/// DATA_DIR so tokens stay valid across restarts. Returns the dev secret when used.
pub fn authenticator(config: &Config) -> Result<(Authenticator, Option<String>), StartError> {
    let (audience, issuer) = (config.jwt_audience.as_deref(), config.jwt_issuer.as_deref());
    if let Some(key) = &config.jwt_public_key {
        return Ok((
            Authenticator::from_public_key(key)?.expecting(audience, issuer),
            None,
        ));
    }
    if let Some(secret) = &config.jwt_secret {
        return Ok((
            Authenticator::from_secret(secret.as_bytes()).expecting(audience, issuer),
            None,
        ));
    }
    let secret = dev_secret(&config.data_dir)?;
    Ok((
        Authenticator::from_secret(secret.as_bytes()).expecting(audience, issuer),
        Some(secret),
    ))
}

/// The key webhook secrets are derived from: `HIVESYNC_WEBHOOK_KEY`; else one derived
/// from the HS256 JWT secret (configured, or the dev secret), which every node of a
/// deployment already shares; else (public-key tokens) a random key kept in DATA_DIR.
/// Changing it changes every project's webhook secret.
pub fn webhook_key(config: &Config, dev_jwt_secret: Option<&str>) -> Result<Vec<u8>, StartError> {
    use hmac::Mac;
    if let Some(key) = &config.webhook_key {
        return Ok(key.as_bytes().to_vec());
    }
    if let Some(secret) = config.jwt_secret.as_deref().or(dev_jwt_secret) {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(b"hivesync webhook key v1");
        return Ok(mac.finalize().into_bytes().to_vec());
    }
    Ok(kept_secret(&config.data_dir, "webhook-key")?.into_bytes())
}

fn dev_secret(data_dir: &Path) -> Result<String, StartError> {
    kept_secret(data_dir, "dev-jwt-secret")
}

/// A random secret kept in `DATA_DIR/name` (mode 0600): read when it is there, else
/// made and written, so it survives restarts.
fn kept_secret(data_dir: &Path, name: &str) -> Result<String, StartError> {
    let path = data_dir.join(name);
    let as_start_error = |source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    };
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim().to_owned();
        if existing.len() >= 32 {
            return Ok(existing);
        }
    }
    std::fs::create_dir_all(data_dir).map_err(as_start_error)?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|err| as_start_error(std::io::Error::other(err.to_string())))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &secret).map_err(as_start_error)?;
    Ok(secret)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

/// Makes DATA_DIR absolute (snapshots' gitfiles point into it) and creates it.
pub fn prepare_data_dir(config: &mut Config) -> Result<(), StartError> {
    let path = config.data_dir.clone();
    let as_start_error = |source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&path).map_err(as_start_error)?;
    config.data_dir = std::fs::canonicalize(&path).map_err(as_start_error)?;
    Ok(())
}

impl Application {
    pub async fn build(mut config: Config) -> Result<Self, StartError> {
        prepare_data_dir(&mut config)?;
        let (auth, generated_secret) = authenticator(&config)?;
        let webhook_key = webhook_key(&config, generated_secret.as_deref())?;
        let (engine, redis) = open_engine(&config).await?;
        if let Some(redis) = &redis {
            // a hub node listens to every node's events
            redis.start_subscriber();
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let hub = Hub::new(Arc::clone(&engine.events), config.ws_queue);
        let layout = Layout::new(config.data_dir.clone());
        layout.empty_trash_in_background();
        if let Some(budget) = config.snapshot_watches {
            crate::mirror::watch::set_budget(budget);
        }
        let serve_workers = config.effective_serve_workers();
        let reader = Arc::new(Reader::with_capacity(layout.clone(), config.reader_cache));
        crate::http::slots::raise_file_limit();
        let sockets = crate::http::slots::UserSlots::new(
            config.ws_per_user,
            config
                .ws_max
                .unwrap_or_else(crate::http::slots::default_socket_cap),
        );
        let reads = crate::http::budget::ReadBudget::new(config.reads_per_user, config.reads_max);
        let webhook_gate = crate::http::gate::WebhookGate::new(
            config.webhook_failures,
            config.webhook_per_project,
            config.webhook_max,
        );
        let state = Arc::new(AppState {
            metrics: Arc::clone(&engine.metrics),
            engine,
            hub,
            auth,
            config: Arc::new(config),
            layout,
            reader,
            searches: crate::http::SearchSlots::default(),
            reads,
            webhook_gate,
            read_stop: CancellationToken::new(),
            webhook_key,
            registering: Default::default(),
            sockets,
            deferred_webhooks: Default::default(),
        });
        Ok(Self {
            listener,
            state,
            serve_workers,
            generated_secret,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Runs until `shutdown` fires, then drains: stops accepting, closes sockets with a
    /// close frame, lets running syncs finish for the drain timeout and hands the rest
    /// back to the queue.
    pub async fn run(self, shutdown: CancellationToken) {
        let state = self.state;
        let tracker = TaskTracker::new();
        let workers = WorkerPool::start(
            self.serve_workers,
            false,
            &state.engine,
            &state.layout,
            &state.config,
            &shutdown,
        );
        let dispatch_stop = CancellationToken::new();
        let dispatcher = tokio::spawn(Arc::clone(&state.hub).run_dispatch(dispatch_stop.clone()));
        crate::memory::spawn_trimming(
            state.config.malloc_trim_every,
            Arc::clone(&state.engine.metrics),
            shutdown.clone(),
        );

        crate::http::serve(
            self.listener,
            Arc::clone(&state),
            shutdown.clone(),
            tracker.clone(),
        )
        .await;
        state.read_stop.cancel();
        tracing::info!("shutting down: closing sockets and draining syncs");
        tracker.close();
        workers.drain(state.config.drain_timeout).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tracker.wait()).await;
        dispatch_stop.cancel();
        let _ = dispatcher.await;
        tracing::info!("stopped");
    }
}

/// A process's sync workers and what runs beside them — the watchdog and health
/// checks in a `hivesync worker` and in a `serve` that runs workers, the scheduler on
/// every node — started once and drained once, by `serve` and `worker` alike.
struct WorkerPool {
    tasks: TaskTracker,
    stops: WorkerStops,
}

impl WorkerPool {
    /// `count` workers on `engine`; they stop taking jobs when `shutdown` fires.
    /// `dedicated`: a `hivesync worker` process, which keeps the watchdog and the
    /// health checks even with no workers of its own.
    fn start(
        count: usize,
        dedicated: bool,
        engine: &Engine,
        layout: &Layout,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> Self {
        let tasks = TaskTracker::new();
        let stops = WorkerStops {
            stop_taking: shutdown.child_token(),
            interrupt: CancellationToken::new(),
        };
        worker::spawn(
            count,
            engine.clone(),
            layout.clone(),
            worker_settings(config),
            stops.clone(),
            &tasks,
        );
        let stranded_after = config.sync_timeout + config.watchdog_margin;
        let tends_mirrors = count > 0 || dedicated;
        if tends_mirrors {
            tasks.spawn(worker::run_watchdog(
                engine.clone(),
                config.watchdog_interval,
                stranded_after,
                stops.stop_taking.clone(),
            ));
        }
        // every node schedules; the engine hands each due project to one of them
        tasks.spawn(worker::run_scheduler(
            engine.clone(),
            config.scheduler_tick,
            stranded_after,
            stops.stop_taking.clone(),
        ));
        if tends_mirrors && let Some(every) = config.health_check_interval {
            tasks.spawn(worker::run_health_checks(
                engine.clone(),
                layout.clone(),
                every,
                config.housekeeping,
                stops.stop_taking.clone(),
            ));
        }
        tasks.close();
        Self { tasks, stops }
    }

    /// Waits for running syncs up to `timeout` (they stopped taking jobs when shutdown
    /// fired), then interrupts the rest, which go back to the queue.
    async fn drain(self, timeout: std::time::Duration) {
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "syncs still running after the drain timeout; returning them to the queue"
            );
            self.stops.interrupt.cancel();
            self.tasks.wait().await;
        }
    }
}

fn worker_settings(config: &Config) -> WorkerSettings {
    WorkerSettings {
        sync_timeout: config.sync_timeout,
        secrets_dir: config.secrets_dir.clone(),
        credential_scopes: config.credential_scopes.clone(),
        ssh_known_hosts: config.ssh_known_hosts.clone(),
        https_ca_file: config.https_ca_file.clone(),
        retry_base: config.retry_base,
        retry_max: config.retry_max,
        allow_private_hosts: config.allow_private_hosts,
        min_free_bytes: config.min_free_bytes,
        housekeeping: config.housekeeping,
        quota: config.quota,
        owner_max_running: config.owner_max_running,
        file_roots: config.file_roots(),
    }
}

/// `hivesync worker`: `HIVESYNC_WORKERS` sync workers on the Redis queue and nothing
/// else, until `shutdown`; then running jobs get the drain timeout to finish and the
/// rest go back to the queue.
pub async fn run_workers(
    mut config: Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    prepare_data_dir(&mut config)?;
    let (engine, redis) = open_engine(&config).await?;
    if let Some(redis) = redis.filter(|redis| redis.is_cluster()) {
        // on a cluster, workers sleep on the shards' sharded bell channels
        redis.start_subscriber();
    }
    let ops_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let ops_addr = ops_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let config = Arc::new(config);
    let ops_stop = CancellationToken::new();
    let ops = tokio::spawn(crate::http::serve_ops(
        ops_listener,
        engine.clone(),
        Arc::clone(&config),
        ops_stop.clone(),
    ));
    crate::memory::spawn_trimming(
        config.malloc_trim_every,
        Arc::clone(&engine.metrics),
        shutdown.clone(),
    );
    let layout = Layout::new(config.data_dir.clone());
    layout.empty_trash_in_background();
    if let Some(budget) = config.snapshot_watches {
        crate::mirror::watch::set_budget(budget);
    }
    let workers = WorkerPool::start(config.workers, true, &engine, &layout, &config, &shutdown);
    tracing::info!(workers = config.workers, metrics = %ops_addr, "hivesync worker running");
    println!("metrics, healthz and readyz on http://{ops_addr}");
    shutdown.cancelled().await;
    tracing::info!("shutting down: draining running syncs");
    workers.drain(config.drain_timeout).await;
    ops_stop.cancel();
    let _ = ops.await;
    tracing::info!("stopped");
    Ok(())
}
