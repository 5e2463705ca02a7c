//! Feeds arbitrary bytes to the repo-path parser: it must never panic, and nothing it
//! accepts may be absolute, contain `.`/`..`/empty components, NUL or a backslash.
#![no_main]

use hivesync::domain::RepoPath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    if let Ok(path) = RepoPath::parse(input) {
        let path = path.as_str();
        assert!(!path.starts_with('/'), "absolute: {path:?}");
        assert!(!path.contains('\0') && !path.contains('\\'), "NUL or backslash: {path:?}");
        for component in path.split('/').filter(|_| !path.is_empty()) {
            assert!(!matches!(component, "" | "." | ".."), "bad component in {path:?}");
        }
    }
});
