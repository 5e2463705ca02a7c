//! HiveSync Hub: authoritative git mirrors, with every step of a sync pushed live.
//!
//! Map of the crate, from the wire inwards (a module imports only from those below it):
//! - [`http`] — the only warp importer: routes by resource (projects, syncs, webhooks,
//!   reads, ops), what they extract, errors, the WebSocket upgrade, the accept loop.
//!   It reaches workers only through the engine.
//! - [`hub`] — connections, subscriptions, fan-out and resume; no warp, no Redis.
//! - [`worker`] — the job loop, one job's record and events, an attempt's select loop,
//!   the retry policy, the lease heartbeat, health checks, transport credentials.
//! - [`engine`] — store, job queue and event log traits, what they hold, and the
//!   `Engine` that bundles them; `embedded/` and `redis/` implement them side by side
//!   (`store.rs`, `queue.rs`, `events.rs` in each), each turning its own errors into
//!   the engine's.
//! - [`mirror`] — gitoxide: layout on disk, fetch, checkout into a snapshot, the
//!   atomic swap, health inspection, progress, reads; its own error type.
//! - [`auth`] — JWT verification and minting.
//! - [`protocol`] — wire types of the contract (REST bodies, socket frames, jobs).
//! - [`domain`] — validated ids, repo URLs and paths (the ids and URLs check themselves
//!   when a stored record is read), the rate limit; pure.
//! - Cross-cutting, usable by any module: [`error`] (cause chains for logs),
//!   [`backoff`] (the one exponential backoff), [`metrics`] (counters, fed by their
//!   callers), [`credential_policy`] (who may send which named credential where),
//!   [`failpoint`] (fault injection, in test builds only), [`memory`] (the heap's
//!   freed pages handed back).
//! - [`client`] — the reference Rust client (REST + resuming event stream), which
//!   `hivesync sync` uses.
//! - [`app`] — wiring; [`config`], [`shutdown`], [`telemetry`], [`tls`] (outgoing TLS).

pub mod app;
pub mod auth;
pub mod backoff;
pub mod client;
pub mod config;
pub mod credential_policy;
pub mod domain;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod http;
pub mod hub;
pub mod memory;
pub mod metrics;
pub mod mirror;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod worker;
