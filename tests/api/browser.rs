use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::{GitRepo, SECRET, token};

/// Node, Debian's Chromium and playwright-core: `.ci/run` installs them; on a developer
/// machine without them the test says so loudly and passes, in CI it fails.
fn browser_tooling(browser_dir: &Path) -> Result<(), String> {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !node {
        return Err("node is not on PATH".into());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Err(format!("{chromium} is missing (apt-get install chromium)"));
    }
    if !browser_dir.join("node_modules/playwright-core").exists() {
        return Err("playwright-core is not installed (npm ci --prefix tests/browser)".into());
    }
    Ok(())
}

#[tokio::test]
async fn dashboard_drives_a_sync_in_a_real_browser() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    if let Err(missing) = browser_tooling(&browser_dir) {
        crate::skips::skip(&missing);
        return;
    }
    let repo = GitRepo::new();
    repo.write("README.md", "hello from the browser test\n")
        .write(
            "src/lib.rs",
            "pub fn f() {}\nlet needle = 42;\nthe line after the needle\n",
        )
        .write("long.txt", &format!("{}\n", "x".repeat(500)));
    repo.commit("first");
    let data = tempfile::tempdir().expect("temp dir");
    // the remote of a second, scheduled project: missing until the script clones it
    // there, so its first scheduled sync fails and pauses it (the script starts the hub
    // with HIVESYNC_PAUSE_AFTER_FAILURES=1 and HIVESYNC_MIN_SYNC_INTERVAL_S=1)
    let later = tempfile::tempdir().expect("temp dir");
    let later_repo = later.path().join("later.git");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&out_dir);
    let run = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(browser_dir.join("dashboard.mjs"))
            .current_dir(&browser_dir)
            .env("HUB_BINARY", env!("CARGO_BIN_EXE_hivesync"))
            .env("DATA_DIR", data.path())
            .env("SECRET", SECRET)
            .env(
                "TOKEN",
                token("browser-user", hivesync::auth::ClientKind::Desktop),
            )
            .env("REPO_URL", repo.url())
            .env("REPO_DIR", repo.path())
            .env("LATER_REPO_DIR", &later_repo)
            .env("STATIC_DIR", root.join("static"))
            .env("OUT_DIR", &out_dir)
            .output()
            .map(|output| (output, out_dir))
    })
    .await
    .expect("runner")
    .expect("node runs");
    let (output, out_dir) = run;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser test failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let shots = std::fs::read_dir(&out_dir)
        .expect("screenshots written")
        .count();
    drop(later);
    assert!(
        shots >= 12,
        "expected a screenshot per step in {}",
        out_dir.display()
    );
    // the README shows the dashboard as this test saw it: the picture kept in docs/
    // is one this test made (same size); HIVESYNC_UPDATE_SCREENSHOT=1 replaces it
    let fresh = out_dir.join("dashboard.png");
    let kept = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
    if std::env::var_os("HIVESYNC_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&fresh, &kept).expect("the README's screenshot replaced");
    }
    let size = |path: &Path| -> (u32, u32) {
        let png = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is a PNG",
            path.display()
        );
        let word = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
        (word(16), word(20))
    };
    assert_eq!(
        size(&kept),
        size(&fresh),
        "docs/dashboard.png is the browser test's view (run it with HIVESYNC_UPDATE_SCREENSHOT=1 to renew it)"
    );
}
