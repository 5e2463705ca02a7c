//! Feeds arbitrary text to the repo-URL parser and the host guard: nothing may panic,
//! a URL accepted under the strict policy never names a private address however it is
//! spelled, and every numeric host reads back as the address it stands for.
#![no_main]

use hivesync::domain::{Host, RepoUrl, UrlPolicy, is_public};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let strict = UrlPolicy {
        allowed_schemes: vec!["https".into(), "ssh".into()],
        allow_private_hosts: false,
    };
    if let Ok(url) = RepoUrl::parse(input, &strict) {
        let host = url.host().expect("an https or ssh URL has a host");
        let parsed = Host::parse(&host).expect("an accepted host parses");
        assert!(!parsed.is_private(), "accepted a private host: {host}");
        if let Host::Ip(address) = parsed {
            assert!(is_public(address), "accepted {address}");
        }
    }
    // the host parser alone, on anything
    if let Ok(Host::Ip(address)) = Host::parse(input) {
        // an address parsed from a spelling is judged the same as the address itself
        assert_eq!(
            Host::parse(input).expect("parses twice").is_private(),
            !is_public(address)
        );
    }
});
