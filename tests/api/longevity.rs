//! Mirrors that live for months in one process: reads follow every sync, the object
//! store stays compact (housekeeping), objects no branch reaches go after their grace
//! period, and the reader keeps a bounded number of repositories open.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hivesync::mirror::housekeeping::Tool;
use serde_json::Value;

use crate::helpers::{GitRepo, TestApp};

fn git_dir(app: &TestApp, project_id: &str) -> PathBuf {
    app.data_dir.join("git").join(format!("{project_id}.git"))
}

/// Pack indices in a mirror's object store.
fn packs(app: &TestApp, project_id: &str) -> usize {
    std::fs::read_dir(git_dir(app, project_id).join("objects").join("pack"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "idx"))
                .count()
        })
        .unwrap_or_default()
}

/// Whether the mirror's object store holds `object` (asked of git itself).
fn mirror_has(app: &TestApp, project_id: &str, object: &str) -> bool {
    std::process::Command::new("git")
        .arg("--git-dir")
        .arg(git_dir(app, project_id))
        .args(["cat-file", "-e", object])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .status()
        .expect("git runs")
        .success()
}

/// Memory maps of this test process backed by files under `dir`.
fn maps_under(dir: &Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let dir = dir.to_string_lossy();
    maps.lines()
        .filter(|line| line.contains(dir.as_ref()))
        .count()
}

async fn read_file(app: &TestApp, project_id: &str, path: &str) -> (u16, Value) {
    app.get_json(&format!(
        "/api/v1/repo/file?project_id={project_id}&path={path}"
    ))
    .await
}

/// Commit, sync, read: 100 times in one hub process, housekeeping off, so the mirror
/// collects a pack per sync. Each read must show the sync's commit and content (it
/// failed from the 33rd sync on when the reader's handle ran out of pack slots).
#[tokio::test]
async fn reads_follow_every_sync_of_one_project_in_one_process() {
    let app = TestApp::spawn_with(|config| config.housekeeping.max_packs = 0).await;
    let repo = GitRepo::new();
    repo.write("src/lib.rs", "// round 0\n").commit("round 0");
    let id = app.register(&repo).await;
    for round in 1..=100 {
        let text = format!("// round {round}\n");
        repo.write("src/lib.rs", &text);
        let commit = repo.commit(&format!("round {round}"));
        let record = app.sync_to_end(&id).await;
        assert_eq!(record["status"], "completed", "round {round}: {record}");
        assert_eq!(record["commit"], commit.as_str(), "round {round}");
        let (status, file) = read_file(&app, &id, "src/lib.rs").await;
        assert_eq!(status, 200, "round {round}: {file}");
        assert_eq!(file["commit"], commit.as_str(), "round {round}");
        assert_eq!(file["content"], text.as_str(), "round {round}");
        let (status, tree) = app
            .get_json(&format!("/api/v1/repo/tree?project_id={id}&path=src"))
            .await;
        assert_eq!(status, 200, "round {round}: {tree}");
        assert_eq!(tree["commit"], commit.as_str(), "round {round}");
    }
    // housekeeping was off: every sync left its pack, and reads coped with all of them
    assert!(packs(&app, &id) > 64, "{} packs", packs(&app, &id));
    app.stop().await;
}

/// The same on Redis, with the syncs run by a `hivesync worker` process: the hub's
/// reader sees packs another process wrote.
#[tokio::test]
async fn reads_follow_every_sync_run_by_a_worker_process() {
    use crate::redis_server::{redis_or_skip, spawn_worker_with, unique_prefix};
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let prefix = unique_prefix();
    let data = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let (url, hub_prefix) = (redis.url(), prefix.clone());
    let app = TestApp::spawn_on(data.path(), move |config| {
        config.redis_url = Some(url);
        config.redis_prefix = hub_prefix;
        config.serve_workers = Some(0);
    })
    .await;
    let mut worker = spawn_worker_with(
        &redis,
        &prefix,
        data.path(),
        1000,
        &logs.path().join("worker.log"),
        &[("HIVESYNC_HOUSEKEEPING_PACKS", "0")],
    );
    let repo = GitRepo::new();
    repo.write("a.txt", "0\n").commit("round 0");
    let id = app.register(&repo).await;
    for round in 1..=40 {
        repo.write("a.txt", &format!("{round}\n"));
        let commit = repo.commit(&format!("round {round}"));
        assert_eq!(app.sync_to_end(&id).await["commit"], commit.as_str());
        let (status, file) = read_file(&app, &id, "a.txt").await;
        assert_eq!(status, 200, "round {round}: {file}");
        assert_eq!(file["content"], format!("{round}\n"), "round {round}");
    }
    assert!(packs(&app, &id) > 32, "{} packs", packs(&app, &id));
    let _ = worker.kill();
    let _ = worker.wait();
    app.stop().await;
}

/// With housekeeping on, a mirror synced many times keeps a bounded number of packs,
/// and every read still answers the last sync's commit: with `git gc`, and with
/// gitoxide alone.
#[tokio::test]
async fn housekeeping_keeps_the_pack_count_bounded() {
    housekeeping_keeps_the_pack_count_bounded_with(Tool::Auto).await;
}

#[tokio::test]
async fn housekeeping_with_gitoxide_alone_keeps_the_pack_count_bounded() {
    housekeeping_keeps_the_pack_count_bounded_with(Tool::Gitoxide).await;
}

async fn housekeeping_keeps_the_pack_count_bounded_with(tool: Tool) {
    // the data outlives the app: git fsck looks at it once housekeeping has stopped
    let data = tempfile::tempdir().expect("temp dir");
    let app = TestApp::spawn_on(data.path(), |config| {
        config.housekeeping.max_packs = 4;
        config.housekeeping.tool = tool;
    })
    .await;
    let repo = GitRepo::new();
    for n in 0..50 {
        repo.write(&format!("files/{n}.txt"), &format!("file {n}\n"));
    }
    repo.commit("many files");
    let id = app.register(&repo).await;
    let mut most = 0;
    for round in 1..=40 {
        repo.write("files/0.txt", &format!("round {round}\n"));
        let commit = repo.commit(&format!("round {round}"));
        let record = app.sync_to_end(&id).await;
        assert_eq!(record["commit"], commit.as_str(), "round {round}");
        most = most.max(packs(&app, &id));
        let (status, file) = read_file(&app, &id, "files/0.txt").await;
        assert_eq!(status, 200, "round {round}: {file}");
        assert_eq!(file["content"], format!("round {round}\n"));
        let (status, other) = read_file(&app, &id, "files/49.txt").await;
        assert_eq!(
            (status, other["content"].as_str()),
            (200, Some("file 49\n"))
        );
    }
    // a run starts at 4 packs and leaves 1; while it runs (after the sync's
    // notification) its new pack, and a cruft pack, sit beside the old ones
    assert!(most <= 4 + 2, "the mirror reached {most} packs");
    wait_for_runs(&app, 10.0).await;
    let metrics = app.metrics().await;
    let runs = metrics
        .value("hivesync_housekeeping_runs_total", &[("result", "done")])
        .unwrap_or_default();
    assert!(runs >= 10.0, "{runs} housekeeping runs");
    let before = metrics
        .value("hivesync_housekeeping_packs_total", &[("when", "before")])
        .unwrap_or_default();
    let after = metrics
        .value("hivesync_housekeeping_packs_total", &[("when", "after")])
        .unwrap_or_default();
    assert!(after < before, "packs before {before}, after {after}");
    if tool == Tool::Auto {
        // git gc ran, not the gitoxide fallback: it wrote a commit-graph
        let info = git_dir(&app, &id).join("objects").join("info");
        assert!(
            info.join("commit-graph").exists() || info.join("commit-graphs").exists(),
            "no commit-graph: git gc did not run"
        );
    }
    // git itself finds the consolidated store whole, once the app (and any
    // housekeeping run) has stopped
    let mirror = git_dir(&app, &id);
    app.stop().await;
    let fsck = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&mirror)
        .args(["fsck", "--no-dangling", "--strict"])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git fsck runs");
    assert!(
        fsck.status.success(),
        "git fsck: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// The diff between two commits of the mirror: 200 while both are in it.
async fn diff_status(app: &TestApp, id: &str, from: &str, to: &str) -> u16 {
    app.get_json(&format!(
        "/api/v1/repo/diff?project_id={id}&from={from}&to={to}"
    ))
    .await
    .0
}

/// A force-push away from a history leaves its objects unreachable: kept through the
/// grace period (a cruft pack), deleted by the first housekeeping after it.
#[tokio::test]
async fn objects_a_force_push_left_behind_go_after_the_grace_period() {
    objects_a_force_push_left_behind_go_after_the_grace_period_with(Tool::Auto).await;
}

#[tokio::test]
async fn with_gitoxide_alone_objects_a_force_push_left_behind_go_after_the_grace_period() {
    objects_a_force_push_left_behind_go_after_the_grace_period_with(Tool::Gitoxide).await;
}

async fn objects_a_force_push_left_behind_go_after_the_grace_period_with(tool: Tool) {
    let grace = Duration::from_secs(2);
    let app = TestApp::spawn_with(|config| {
        config.housekeeping.max_packs = 2;
        config.housekeeping.grace = grace;
        config.housekeeping.tool = tool;
    })
    .await;
    let repo = GitRepo::new();
    repo.write("kept.txt", "kept\n").commit("base");
    let base = repo.head();
    repo.write("secret.txt", "a mistake that was force-pushed away\n");
    let mistake = repo.commit("oops");
    let blob = repo.git(&["rev-parse", "HEAD:secret.txt"]);
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["commit"], mistake.as_str());
    assert!(mirror_has(&app, &id, &blob));
    // the mistake was fetched long before the rewrite (an hour, far past the grace):
    // its grace must still start at the rewrite, not at the fetch
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for entry in std::fs::read_dir(git_dir(&app, &id).join("objects/pack")).expect("packs") {
        let pack = std::fs::File::open(entry.expect("entry").path()).expect("open");
        pack.set_modified(an_hour_ago).expect("backdated");
    }

    // the branch is rewritten without the mistake
    repo.git(&["reset", "-q", "--hard", &base]);
    repo.write("kept.txt", "kept, amended\n");
    let fixed = repo.commit("fixed");
    assert_eq!(app.sync_to_end(&id).await["commit"], fixed.as_str());
    // two packs: housekeeping ran, and kept the unreachable objects for their grace
    wait_for_runs(&app, 1.0).await;
    assert!(
        mirror_has(&app, &id, &blob),
        "pruned before its grace period"
    );
    assert_eq!(diff_status(&app, &id, &mistake, &fixed).await, 200);

    tokio::time::sleep(grace + Duration::from_millis(500)).await;
    repo.write("kept.txt", "kept, third\n");
    let third = repo.commit("third");
    assert_eq!(app.sync_to_end(&id).await["commit"], third.as_str());
    wait_for_runs(&app, 2.0).await;
    assert!(
        !mirror_has(&app, &id, &blob),
        "the force-pushed-away blob outlived its grace period"
    );
    assert!(!mirror_has(&app, &id, &mistake));
    assert_eq!(diff_status(&app, &id, &mistake, &third).await, 404);
    // what the branch reaches is all there
    assert_eq!(diff_status(&app, &id, &base, &third).await, 200);
    let (status, file) = read_file(&app, &id, "kept.txt").await;
    assert_eq!(
        (status, file["content"].as_str()),
        (200, Some("kept, third\n"))
    );
    if tool == Tool::Gitoxide {
        // the commit, its tree and the blob (git gc does not count what it prunes)
        let pruned = app
            .metrics()
            .await
            .value("hivesync_housekeeping_pruned_objects_total", &[])
            .unwrap_or_default();
        assert!(pruned >= 3.0, "{pruned} objects pruned");
    }
    app.stop().await;
}

/// Housekeeping runs after the sync's notification, so a test waits for it.
async fn wait_for_runs(app: &TestApp, runs: f64) {
    let done = crate::helpers::wait_until(Duration::from_secs(30), || async {
        let value = app
            .metrics()
            .await
            .value("hivesync_housekeeping_runs_total", &[("result", "done")])
            .unwrap_or_default();
        (value >= runs).then_some(())
    })
    .await;
    assert!(done.is_some(), "housekeeping did not run {runs} times");
}

/// Syncs that each trigger housekeeping, while readers read the mirror without pause:
/// no read ever fails to find an object.
#[tokio::test]
async fn reads_never_miss_an_object_while_housekeeping_replaces_packs() {
    reads_never_miss_an_object_while_housekeeping_replaces_packs_with(Tool::Auto).await;
}

#[tokio::test]
async fn reads_never_miss_an_object_while_gitoxide_housekeeping_replaces_packs() {
    reads_never_miss_an_object_while_housekeeping_replaces_packs_with(Tool::Gitoxide).await;
}

async fn reads_never_miss_an_object_while_housekeeping_replaces_packs_with(tool: Tool) {
    let app = Arc::new(
        TestApp::spawn_with(|config| {
            config.housekeeping.max_packs = 2;
            config.housekeeping.tool = tool;
        })
        .await,
    );
    let repo = GitRepo::new();
    for n in 0..30 {
        repo.write(&format!("dir/{n}.txt"), &format!("{n}\n"));
    }
    repo.commit("start");
    let id = app.register(&repo).await;
    app.sync_to_end(&id).await;

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for reader in 0..3 {
        let (app, id, stop, reads) = (
            Arc::clone(&app),
            id.clone(),
            Arc::clone(&stop),
            Arc::clone(&reads),
        );
        readers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let path = if reader == 0 {
                    format!("/api/v1/repo/tree?project_id={id}&path=dir")
                } else {
                    format!("/api/v1/repo/file?project_id={id}&path=dir/{reader}.txt")
                };
                let (status, body) = app.get_json(&path).await;
                if status != 200 {
                    failures.push(format!("{status} {body}"));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    for round in 1..=30 {
        repo.write("dir/0.txt", &format!("round {round}\n"));
        repo.write(&format!("new/{round}.txt"), "added\n");
        let commit = repo.commit(&format!("round {round}"));
        assert_eq!(app.sync_to_end(&id).await["commit"], commit.as_str());
    }
    wait_for_runs(&app, 10.0).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for reader in readers {
        failures.extend(reader.await.expect("reader task"));
    }
    assert!(failures.is_empty(), "failed reads: {failures:?}");
    assert!(reads.load(Ordering::Relaxed) > 100);
    let app = Arc::into_inner(app).expect("readers are done");
    app.stop().await;
}

/// The reader keeps at most `HIVESYNC_READER_CACHE` repositories open: reading many
/// projects leaves a bounded number of mapped pack files, and a project read again
/// after it was let go is opened again transparently.
#[tokio::test]
async fn the_reader_keeps_a_bounded_number_of_repositories_open() {
    const CAPACITY: usize = 8;
    const PROJECTS: usize = 64;
    let app = TestApp::spawn_with(|config| config.reader_cache = CAPACITY).await;
    let repo = GitRepo::new();
    repo.write("README.md", "shared upstream\n").commit("one");
    let mut ids = Vec::new();
    for _ in 0..PROJECTS {
        let id = app.register(&repo).await;
        let accepted = app.request_sync(&id).await;
        ids.push((
            id,
            accepted["sync_id"].as_str().expect("sync_id").to_owned(),
        ));
    }
    for (_, sync_id) in &ids {
        assert_eq!(app.wait_for_sync(sync_id).await["status"], "completed");
    }
    for round in 0..2 {
        for (id, _) in &ids {
            let (status, file) = read_file(&app, id, "README.md").await;
            assert_eq!(
                (status, file["content"].as_str()),
                (200, Some("shared upstream\n")),
                "round {round}"
            );
        }
    }
    let open = app
        .metrics()
        .await
        .value("hivesync_reader_open_repositories", &[])
        .unwrap_or_default();
    assert!(open <= CAPACITY as f64, "{open} repositories open");
    // each open repository maps a pack and its index; 64 would map 128
    let mapped = maps_under(&app.data_dir.join("git"));
    assert!(
        mapped <= 4 * CAPACITY,
        "{mapped} maps of mirror files for {CAPACITY} open repositories"
    );
    app.stop().await;
}
