//! One integration-test binary: the real hub over HTTP and WebSocket, with real git
//! repositories as remotes.

mod browser;
mod budgets;
mod chaos;
mod conformance;
mod conformance_fresh;
mod conformance_sync;
mod docs;
mod errors;
mod failpoints;
mod failures;
mod faults;
mod freshness;
mod helpers;
mod https;
mod lifecycle;
mod longevity;
mod lost_replies;
mod multinode;
mod operating;
mod projects;
mod read;
mod records;
mod redis_server;
mod security;
mod skips;
mod ssh;
mod sync;
mod tenants;
mod tokens;
mod websocket;
