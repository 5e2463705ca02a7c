//! Feeds arbitrary text to the strict query-string decoder: nothing may panic, and
//! whatever it accepts re-encodes (form-urlencoded) to a query that decodes the same.
#![no_main]

use hivesync::http::parse_query;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    if let Ok(params) = parse_query(input) {
        let encoded = serde_urlencoded::to_string(&params).expect("strings encode");
        assert_eq!(parse_query(&encoded).expect("re-encoded decodes"), params);
    }
});
