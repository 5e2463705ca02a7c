//! HiveSync Hub: authoritative git mirrors, with every step of a sync pushed live.
//!
//! Map of the crate, from the wire inwards:
//! - [`protocol`] — wire types of the v1 contract (REST bodies, socket frames, jobs).
//! - [`domain`] — validated ids and repo URLs, the rate limit; pure.
//! - [`auth`] — JWT verification and minting.
//! - [`http`] — the only warp importer: routes, errors, the WebSocket upgrade.
//! - [`hub`] — connections, subscriptions, fan-out and resume.
//! - [`engine`] — store, job queue and event log traits, and the embedded engine.
//! - [`worker`] — the job loop: stages, progress, retries, timeouts.
//! - [`mirror`] — gitoxide: fetch, checkout into a snapshot, atomic swap.
//! - [`app`] — wiring; [`config`], [`shutdown`], [`telemetry`].

pub mod app;
pub mod auth;
pub mod config;
pub mod domain;
pub mod engine;
pub mod http;
pub mod hub;
pub mod mirror;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
