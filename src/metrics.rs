//! Counters any module may record to; the HTTP layer renders them at `/metrics` in
//! Prometheus' text format. Knows nothing of HTTP.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters behind `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub sync_requests: AtomicU64,
    pub syncs_coalesced: AtomicU64,
    pub ws_connections_total: AtomicU64,
    pub ws_slow_consumers: AtomicU64,
}

impl Metrics {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters, with the current socket count, in Prometheus' text format.
    pub fn render(&self, ws_connections: usize) -> String {
        let counter = |value: &AtomicU64| value.load(Ordering::Relaxed);
        format!(
            "# TYPE hivesync_ws_connections gauge\nhivesync_ws_connections {}\n\
             # TYPE hivesync_ws_connections_total counter\nhivesync_ws_connections_total {}\n\
             # TYPE hivesync_ws_slow_consumers_total counter\nhivesync_ws_slow_consumers_total {}\n\
             # TYPE hivesync_sync_requests_total counter\nhivesync_sync_requests_total {}\n\
             # TYPE hivesync_syncs_coalesced_total counter\nhivesync_syncs_coalesced_total {}\n",
            ws_connections,
            counter(&self.ws_connections_total),
            counter(&self.ws_slow_consumers),
            counter(&self.sync_requests),
            counter(&self.syncs_coalesced),
        )
    }
}
