//! One integration-test binary: the real hub over HTTP and WebSocket, with real git
//! repositories as remotes.

mod browser;
mod errors;
mod failures;
mod helpers;
mod lifecycle;
mod projects;
mod read;
mod ssh;
mod sync;
mod websocket;
