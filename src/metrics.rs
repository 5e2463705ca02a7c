//! The process's Prometheus metrics: one registry per process (per hub in a test
//! process), recorded to by any module and rendered at `/metrics` by the HTTP layer
//! and by `hivesync worker`'s metrics listener. Knows nothing of HTTP.
//!
//! Built on `prometheus-client`: typed families with `# HELP`/`# TYPE`, labelled
//! counters and histograms, no global registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The media type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// `completed` or `failed`
    pub outcome: &'static str,
    /// what started the sync: `api`, `webhook`, `schedule`, `repair`
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// a standard method, or `other`
    pub method: &'static str,
    /// the route's template (`/api/v1/projects/{id}`), never the raw path
    pub route: &'static str,
    pub status: u16,
}

/// The `result` values of `hivesync_webhook_deliveries_total`: what was done with the
/// delivery, or the error code it was refused with.
pub const WEBHOOK_RESULTS: [&str; 9] = [
    "accepted",
    "throttled",
    "ignored",
    "duplicate",
    "invalid_signature",
    "not_found",
    "rate_limited",
    "payload_too_large",
    "invalid_request",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhenLabel {
    /// `before` or `after` a housekeeping run
    pub when: &'static str,
}

/// The `result` values of `hivesync_housekeeping_runs_total`.
pub const HOUSEKEEPING_RESULTS: [&str; 3] = ["done", "failed", "interrupted"];

/// The `reason` values of `hivesync_ws_rejected_total`.
pub const REJECT_REASONS: [&str; 2] = ["per_user", "global"];

/// The `reason` values of `hivesync_ws_kicked_total`.
pub const KICK_REASONS: [&str; 4] = ["slow_consumer", "idle", "token_expired", "protocol_error"];

/// Every metric the process exports. Cheap to share (`Arc`); every handle inside is
/// itself a shared counter.
pub struct Metrics {
    registry: Registry,
    pub syncs: Family<SyncLabels, Counter>,
    pub sync_duration: Histogram,
    pub sync_requests: Counter,
    pub syncs_coalesced: Counter,
    pub syncs_throttled: Counter,
    pub queue_depth: Gauge,
    pub ws_connections: Gauge,
    pub ws_connections_total: Counter,
    pub ws_kicked: Family<ReasonLabel, Counter>,
    pub ws_rejected: Family<ReasonLabel, Counter>,
    pub events_published: Counter,
    pub webhook_deliveries: Family<ResultLabel, Counter>,
    pub schedule_lag: Histogram,
    pub http_requests: Family<HttpLabels, Counter>,
    pub redis_reconnects: Counter,
    pub store_commit: Histogram,
    pub snapshot_checks: Family<ResultLabel, Counter>,
    pub snapshot_watches: Gauge,
    pub reader_repositories: Gauge,
    pub housekeeping_runs: Family<ResultLabel, Counter>,
    pub housekeeping_duration: Histogram,
    pub housekeeping_packs: Family<WhenLabel, Counter>,
    pub housekeeping_bytes: Family<WhenLabel, Counter>,
    pub housekeeping_pruned: Counter,
    pub heap_trims: Counter,
    pub heap_trim_duration: Histogram,
    pub heap_trimmed_bytes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&[])
    }
}

/// What one housekeeping run changed in a mirror's object store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Consolidated {
    pub packs_before: usize,
    pub packs_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub pruned: u64,
}

impl Metrics {
    /// The process's metrics, every label set shown from the start (0 until counted);
    /// `check_names` names the ways a mirror's tree can be found unchanged.
    pub fn new(check_names: &[&'static str]) -> Self {
        let mut registry = Registry::with_prefix("hivesync");
        let syncs = Family::<SyncLabels, Counter>::default();
        registry.register(
            "syncs",
            "Syncs that ended, by outcome and by what started them",
            syncs.clone(),
        );
        // 50 ms … ~27 min
        let sync_duration = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        registry.register(
            "sync_duration_seconds",
            "Wall time of syncs that ended, from start to end (retries included)",
            sync_duration.clone(),
        );
        let sync_requests = Counter::default();
        registry.register(
            "sync_requests",
            "Sync requests received over REST",
            sync_requests.clone(),
        );
        let syncs_coalesced = Counter::default();
        registry.register(
            "syncs_coalesced",
            "Sync requests that joined a sync already waiting instead of starting one",
            syncs_coalesced.clone(),
        );
        let syncs_throttled = Counter::default();
        registry.register(
            "syncs_throttled",
            "Scheduled and webhook syncs held back by their owner's sync budget (HIVESYNC_SYNC_RATE), to run when it allows",
            syncs_throttled.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "sync_queue_depth",
            "Sync jobs waiting for a worker (read from the engine when scraped)",
            queue_depth.clone(),
        );
        let ws_connections = Gauge::default();
        registry.register(
            "ws_connections",
            "WebSocket connections open on this hub",
            ws_connections.clone(),
        );
        let ws_connections_total = Counter::default();
        registry.register(
            "ws_connections_opened",
            "WebSocket connections accepted since start",
            ws_connections_total.clone(),
        );
        let ws_kicked = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "ws_kicked",
            "WebSocket connections this hub closed on the client, by reason (slow_consumer: its queue was full or its gap was past the kept history; idle; token_expired; protocol_error)",
            ws_kicked.clone(),
        );
        let ws_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "ws_rejected",
            "WebSocket upgrades refused with 429, by reason (per_user: the user's cap, HIVESYNC_WS_PER_USER; global: the hub's, HIVESYNC_WS_MAX)",
            ws_rejected.clone(),
        );
        let events_published = Counter::default();
        registry.register(
            "events_published",
            "Events this process published to users (stages, progress, notifications)",
            events_published.clone(),
        );
        let webhook_deliveries = Family::<ResultLabel, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries received, by result",
            webhook_deliveries.clone(),
        );
        // 10 ms … ~5.5 min
        let schedule_lag = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "schedule_lag_seconds",
            "Time from a project's due time to the scheduler starting its sync (queued, or joined to one waiting)",
            schedule_lag.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "redis_reconnects",
            "Times the Redis pub/sub subscription was lost and made again",
            redis_reconnects.clone(),
        );
        let store_commit = Self::commit_histogram();
        registry.register(
            "store_commit_seconds",
            "Commit latency of the embedded store's write transactions",
            store_commit.clone(),
        );
        let snapshot_checks = Family::<ResultLabel, Counter>::default();
        registry.register(
            "snapshot_checks",
            "Syncs with nothing new upstream, by how the mirror's tree was found exact or not: watched (its inotify watch saw no change), stat_pass (every file stat'ed: exact), touched (the watch saw a change), changed (the stat pass found one)",
            snapshot_checks.clone(),
        );
        let snapshot_watches = Gauge::default();
        registry.register(
            "snapshot_watched_directories",
            "Directories of mirror trees this process watches with inotify (read when scraped)",
            snapshot_watches.clone(),
        );
        let reader_repositories = Gauge::default();
        registry.register(
            "reader_open_repositories",
            "Mirror repositories the reader keeps open (HIVESYNC_READER_CACHE bounds it; read when scraped)",
            reader_repositories.clone(),
        );
        let housekeeping_runs = Family::<ResultLabel, Counter>::default();
        registry.register(
            "housekeeping_runs",
            "Housekeeping runs of mirror object stores, by result (done, failed, interrupted)",
            housekeeping_runs.clone(),
        );
        // 10 ms … ~5.5 min
        let housekeeping_duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "housekeeping_duration_seconds",
            "Wall time of housekeeping runs that ended",
            housekeeping_duration.clone(),
        );
        let housekeeping_packs = Family::<WhenLabel, Counter>::default();
        registry.register(
            "housekeeping_packs",
            "Packs of the mirrors housekeeping ran on, summed over runs, before and after each run",
            housekeeping_packs.clone(),
        );
        let housekeeping_bytes = Family::<WhenLabel, Counter>::default();
        registry.register(
            "housekeeping_bytes",
            "Object-store bytes (packs and loose objects) of the mirrors housekeeping ran on, summed over runs, before and after each run",
            housekeeping_bytes.clone(),
        );
        let housekeeping_pruned = Counter::default();
        registry.register(
            "housekeeping_pruned_objects",
            "Objects no branch reached that housekeeping deleted once their grace period was over",
            housekeeping_pruned.clone(),
        );
        let heap_trims = Counter::default();
        registry.register(
            "heap_trims",
            "Times this process handed its heap's free pages back to the kernel (glibc's malloc_trim, every HIVESYNC_MALLOC_TRIM_S)",
            heap_trims.clone(),
        );
        // 10 µs … ~5 s
        let heap_trim_duration = Histogram::new(exponential_buckets(0.00001, 2.0, 20));
        registry.register(
            "heap_trim_duration_seconds",
            "Wall time of one malloc_trim: it walks every arena under that arena's lock, so allocations of other threads wait meanwhile",
            heap_trim_duration.clone(),
        );
        let heap_trimmed_bytes = Counter::default();
        registry.register(
            "heap_trimmed_bytes",
            "Resident anonymous memory the trims gave back, summed (RssAnon before each trim less after it)",
            heap_trimmed_bytes.clone(),
        );
        // every bounded label combination starts at zero, so each family is in the
        // exposition from the first scrape and rates start from a real zero
        for outcome in ["completed", "failed"] {
            for trigger in ["api", "webhook", "schedule", "repair"] {
                let _ = syncs.get_or_create(&SyncLabels { outcome, trigger });
            }
        }
        for result in WEBHOOK_RESULTS {
            let _ = webhook_deliveries.get_or_create(&ResultLabel { result });
        }
        for result in HOUSEKEEPING_RESULTS {
            let _ = housekeeping_runs.get_or_create(&ResultLabel { result });
        }
        for when in ["before", "after"] {
            let _ = housekeeping_packs.get_or_create(&WhenLabel { when });
            let _ = housekeeping_bytes.get_or_create(&WhenLabel { when });
        }
        for reason in KICK_REASONS {
            let _ = ws_kicked.get_or_create(&ReasonLabel { reason });
        }
        for reason in REJECT_REASONS {
            let _ = ws_rejected.get_or_create(&ReasonLabel { reason });
        }
        for &result in check_names {
            let _ = snapshot_checks.get_or_create(&ResultLabel { result });
        }
        Self {
            registry,
            syncs,
            sync_duration,
            sync_requests,
            syncs_coalesced,
            syncs_throttled,
            queue_depth,
            ws_connections,
            ws_connections_total,
            ws_kicked,
            ws_rejected,
            events_published,
            webhook_deliveries,
            schedule_lag,
            http_requests,
            redis_reconnects,
            store_commit,
            snapshot_checks,
            snapshot_watches,
            reader_repositories,
            housekeeping_runs,
            housekeeping_duration,
            housekeeping_packs,
            housekeeping_bytes,
            housekeeping_pruned,
            heap_trims,
            heap_trim_duration,
            heap_trimmed_bytes,
        }
    }

    /// The embedded store's commit-latency histogram, unregistered (100 µs … ~3.3 s):
    /// [`Metrics::new`] registers one; an engine opened without metrics gets its own.
    pub fn commit_histogram() -> Histogram {
        Histogram::new(exponential_buckets(0.0001, 2.0, 16))
    }

    /// Counts one ended sync.
    pub fn sync_ended(&self, outcome: &'static str, trigger: &'static str, seconds: Option<f64>) {
        self.syncs
            .get_or_create(&SyncLabels { outcome, trigger })
            .inc();
        if let Some(seconds) = seconds {
            self.sync_duration.observe(seconds);
        }
    }

    /// One heap trim that took `seconds` and gave `released` resident bytes back.
    pub fn heap_trimmed(&self, seconds: f64, released: u64) {
        self.heap_trims.inc();
        self.heap_trim_duration.observe(seconds);
        self.heap_trimmed_bytes.inc_by(released);
    }

    pub fn webhook(&self, result: &'static str) {
        self.webhook_deliveries
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one housekeeping run that ended.
    pub fn housekeeping(&self, result: &'static str, seconds: f64, report: Option<Consolidated>) {
        self.housekeeping_runs
            .get_or_create(&ResultLabel { result })
            .inc();
        self.housekeeping_duration.observe(seconds);
        if let Some(report) = report {
            let when = |when| WhenLabel { when };
            let packs = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
            self.housekeeping_packs
                .get_or_create(&when("before"))
                .inc_by(packs(report.packs_before));
            self.housekeeping_packs
                .get_or_create(&when("after"))
                .inc_by(packs(report.packs_after));
            self.housekeeping_bytes
                .get_or_create(&when("before"))
                .inc_by(report.bytes_before);
            self.housekeeping_bytes
                .get_or_create(&when("after"))
                .inc_by(report.bytes_after);
            self.housekeeping_pruned.inc_by(report.pruned);
        }
    }

    /// Counts a sync whose tree was found unchanged, by how (`watched`, …).
    pub fn snapshot_check(&self, result: &'static str) {
        self.snapshot_checks
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The directories the snapshot watches hold now (set before a scrape).
    pub fn set_snapshot_watches(&self, directories: usize) {
        self.snapshot_watches
            .set(i64::try_from(directories).unwrap_or(i64::MAX));
    }

    pub fn kicked(&self, reason: &'static str) {
        self.ws_kicked.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn ws_rejected(&self, reason: &'static str) {
        self.ws_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Every family in the OpenMetrics text format (which Prometheus reads). Gauges
    /// read from elsewhere (queue depth, sockets, snapshot watches) are set by the
    /// caller first.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // writing into a String cannot fail
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
