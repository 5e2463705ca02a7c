//! Feeds arbitrary bytes to every JSON body the hub parses from clients — project
//! registration, sync requests and WebSocket client frames — and then to the checks a
//! registration runs: nothing may panic, and a URL the hub accepts carries no host it
//! would refuse.
#![no_main]

use hivesync::domain::{RepoUrl, UrlPolicy};
use hivesync::protocol::{ClientFrame, CreateProjectRequest, SyncRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<SyncRequest>(data);
    if let Ok(ClientFrame::Subscribe { project_ids }) = serde_json::from_slice::<ClientFrame>(data) {
        let _ = project_ids.len();
    }
    if let Ok(request) = serde_json::from_slice::<CreateProjectRequest>(data) {
        let policy = UrlPolicy {
            allowed_schemes: vec!["https".into(), "ssh".into()],
            allow_private_hosts: false,
        };
        if let Ok(url) = RepoUrl::parse(&request.repo_url, &policy) {
            let host = url.host().expect("an https or ssh URL has a host");
            let host = hivesync::domain::Host::parse(&host).expect("an accepted host parses");
            assert!(!host.is_private(), "accepted a private host: {host:?}");
        }
    }
});
