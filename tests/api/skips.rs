//! Tests that cannot run here (no redis-server, sshd, Chromium, tmpfs, loopback
//! alias) return early, which libtest reports as `ok`. Each one is recorded here, and
//! when the test binary exits the list is printed after libtest's own summary, so a
//! local `cargo test` says plainly what it did not test. Under `CI` a skip is a
//! failure instead: CI installs every tool.

use std::sync::{Mutex, Once};

static SKIPPED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static REPORT_AT_EXIT: Once = Once::new();

/// Records that the running test did not run, and why. Panics under CI.
pub fn skip(why: &str) {
    // libtest names each test's thread after the test
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run in CI: {why}; .ci/run installs what it needs");
    }
    eprintln!("\n!!!! SKIPPING {test}: {why} !!!!\n");
    SKIPPED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((test.to_owned(), why.to_owned()));
    REPORT_AT_EXIT.call_once(|| {
        // SAFETY: `report` is an `extern "C" fn()` that only locks and prints
        unsafe {
            libc::atexit(report);
        }
    });
}

extern "C" fn report() {
    let skipped = SKIPPED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "\nSKIPPED: {} test(s) above reported `ok` without running:",
        skipped.len()
    );
    for (test, why) in skipped.iter() {
        eprintln!("  SKIPPED {test}: {why}");
    }
    eprintln!("Install what they need (see docs/testing.md) to run them.\n");
}
