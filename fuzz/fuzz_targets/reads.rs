//! The inputs of the bounded reads (#30): tree cursors, diff sides and the webhook
//! `ref` scanner. Nothing may panic; a cursor the hub made decodes to what it encoded,
//! a forged one never to anything but a refusal or a name; a patch is never over its
//! cap; the `ref` read from a prefix of a body is the one read from the whole.
#![no_main]

use std::time::{Duration, Instant};

use hivesync::domain::RepoPath;
use hivesync::domain::webhook::leading_ref;
use hivesync::http::TreeCursor;
use hivesync::mirror::read::patch_of;
use libfuzzer_sys::fuzz_target;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            // any cursor: refused, or a name that encodes back to the same cursor's page
            let Ok(cursor) = std::str::from_utf8(rest) else { return };
            let path = RepoPath::parse("src").expect("valid");
            if let Ok(after) = TreeCursor::decode(cursor, COMMIT, &path) {
                let again = TreeCursor::encode(COMMIT, &path, &after);
                assert_eq!(TreeCursor::decode(&again, COMMIT, &path).ok(), Some(after));
            }
        }
        1 => {
            // what the hub encodes decodes to itself, and only for its commit and path
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let (path, after) = text.split_once('\0').unwrap_or((text, ""));
            let Ok(path) = RepoPath::parse(path) else { return };
            let cursor = TreeCursor::encode(COMMIT, &path, after);
            assert_eq!(TreeCursor::decode(&cursor, COMMIT, &path).ok().as_deref(), Some(after));
            let other = "f".repeat(40);
            assert!(TreeCursor::decode(&cursor, &other, &path).is_err());
        }
        2 => {
            let split = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
            let (old, new) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
            let cap = 4096;
            if let Some(patch) = patch_of(old, new, cap, Instant::now() + Duration::from_millis(200)) {
                assert!(patch.len() <= cap);
            }
        }
        _ => {
            let whole = leading_ref(rest);
            for cut in [rest.len() / 3, rest.len() / 2, rest.len().saturating_sub(1)] {
                if let Some(found) = leading_ref(&rest[..cut]) {
                    assert_eq!(Some(found), whole.clone(), "a prefix read a different ref");
                }
            }
        }
    }
});
