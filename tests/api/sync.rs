use hivesync::auth::ClientKind;
use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, assert_exact_tree, token};

#[tokio::test]
async fn first_sync_clones_the_branch_head_and_records_it() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("README.md", "# demo\n")
        .write("src/lib.rs", "pub fn f() {}\n");
    let commit = repo.commit("first");
    let id = app.register(&repo).await;

    let accepted = app
        .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
        .await;
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.expect("json");
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["project_id"], id.as_str());
    let record = app
        .wait_for_sync(accepted["sync_id"].as_str().expect("id"))
        .await;

    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["commit"], commit.as_str());
    assert_eq!(record["previous_commit"], Value::Null);
    assert_eq!(record["attempt"], 1);
    assert_eq!(record["error"], Value::Null);
    assert_eq!(record["progress"]["percent"], 100);
    // two files, two trees (root and src) and a commit
    assert_eq!(record["progress"]["objects"], 5, "{record}");
    assert!(record["progress"]["bytes"].as_u64().is_some_and(|b| b > 0));
    for field in ["queued_at", "started_at", "finished_at"] {
        assert!(record[field].is_string(), "{field} set");
    }
    assert!(record["duration_ms"].is_u64());
    assert_exact_tree(&app, &id, &repo, &commit);

    let project: Value = app
        .get(&format!("/api/v1/projects/{id}"), &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(project["commit"], commit.as_str());
    assert_eq!(project["last_status"], "completed");
    app.stop().await;
}

#[tokio::test]
async fn sync_of_force_pushed_branch_leaves_exact_tree() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("keep.txt", "keep\n")
        .write("old/name.txt", "moving\n")
        .write("gone.txt", "delete me\n");
    repo.write(".gitignore", "*.log\nbuild/\n");
    let first = repo.commit("first");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    assert_exact_tree(&app, &id, &repo, &first);

    // junk a build or a person might leave: untracked, ignored, and an edited file
    let worktree = app.worktree(&id);
    std::fs::write(worktree.join("untracked.txt"), "junk").expect("plant");
    std::fs::write(worktree.join("debug.log"), "ignored junk").expect("plant");
    std::fs::create_dir_all(worktree.join("build/out")).expect("plant");
    std::fs::write(worktree.join("build/out/a.o"), "obj").expect("plant");
    std::fs::write(worktree.join("keep.txt"), "edited by hand").expect("plant");

    // delete and rename
    repo.git(&["rm", "-q", "gone.txt"]);
    std::fs::create_dir_all(repo.path().join("new")).expect("mkdir");
    repo.git(&["mv", "old/name.txt", "new/name.txt"]);
    repo.write("keep.txt", "keep v2\n");
    let second = repo.commit("second");
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["previous_commit"], first.as_str());
    assert_exact_tree(&app, &id, &repo, &second);

    // force-push: history rewritten to an unrelated commit
    repo.git(&["checkout", "-q", "--orphan", "rewrite"]);
    repo.git(&["rm", "-rq", "--cached", "."]);
    for stale in ["keep.txt", "new/name.txt", ".gitignore"] {
        let _ = std::fs::remove_file(repo.path().join(stale));
    }
    repo.write("fresh.txt", "a new start\n");
    repo.git(&["add", "fresh.txt"]);
    repo.git(&["commit", "-q", "-m", "rewritten"]);
    repo.git(&["branch", "-f", "main", "rewrite"]);
    let rewritten = repo.git(&["rev-parse", "main"]);
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["commit"], rewritten.as_str());
    assert_eq!(record["previous_commit"], second.as_str());
    assert_exact_tree(&app, &id, &repo, &rewritten);

    // only the current snapshot is left on disk (beside, soon, its hidden spare)
    let snapshots = std::fs::read_dir(app.data_dir.join("trees").join(&id))
        .expect("trees")
        .filter_map(Result::ok)
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with(".spare-"))
        .count();
    assert_eq!(snapshots, 1);
    app.stop().await;
}

#[tokio::test]
async fn symlinks_in_the_repository_are_never_materialized() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("real.txt", "content\n");
    repo.symlink("to-passwd", "/etc/passwd")
        .symlink("to-root", "/")
        .symlink("to-real", "real.txt");
    repo.write("dir/inner.txt", "x").symlink("dir-link", "dir");
    let commit = repo.commit("links");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    // assert_exact_tree checks no symlink exists and each link is a file with its target
    assert_exact_tree(&app, &id, &repo, &commit);
    let passwd = std::fs::read_to_string(app.worktree(&id).join("to-passwd")).expect("plain file");
    assert_eq!(passwd, "/etc/passwd");
    app.stop().await;
}

#[tokio::test]
async fn a_request_while_a_sync_is_queued_coalesces_onto_it() {
    // no workers: the first sync stays queued, so the second request must coalesce
    let app = TestApp::spawn_with(|config| config.serve_workers = Some(0)).await;
    let repo = GitRepo::new();
    repo.commit("one");
    let id = app.register(&repo).await;
    let first = app
        .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
        .await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("json");
    assert!(first.get("coalesced").is_none_or(|c| c == false));
    let second = app
        .post("/api/v1/repo/sync", &app.token, json!({"project_id": id}))
        .await;
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.expect("json");
    assert_eq!(second["coalesced"], true);
    assert_eq!(second["sync_id"], first["sync_id"]);
    let history: Vec<Value> = app
        .get(&format!("/api/v1/repo/sync?project_id={id}"), &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(history.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn sync_history_is_newest_first_and_limited() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    let mut commits = Vec::new();
    let id = {
        repo.write("n", "0");
        commits.push(repo.commit("c0"));
        app.register(&repo).await
    };
    let mut sync_ids = Vec::new();
    for round in 0..3 {
        if round > 0 {
            repo.write("n", &round.to_string());
            commits.push(repo.commit("next"));
        }
        let record = app.sync_to_end(&id).await;
        sync_ids.push(record["sync_id"].as_str().expect("id").to_owned());
    }
    let history: Vec<Value> = app
        .get(&format!("/api/v1/repo/sync?project_id={id}"), &app.token)
        .await
        .json()
        .await
        .expect("json");
    let listed: Vec<_> = history
        .iter()
        .map(|r| r["sync_id"].as_str().expect("id").to_owned())
        .collect();
    let mut newest_first = sync_ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert_eq!(history[0]["commit"], commits[2].as_str());
    let limited: Vec<Value> = app
        .get(
            &format!("/api/v1/repo/sync?project_id={id}&limit=2"),
            &app.token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(limited.len(), 2);

    let bob = token("bob", ClientKind::Desktop);
    assert_eq!(
        app.get(&format!("/api/v1/repo/sync/{}", sync_ids[0]), &bob)
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get(&format!("/api/v1/repo/sync?project_id={id}"), &bob)
            .await
            .status(),
        404
    );
    let unknown = app
        .get(&format!("/api/v1/repo/sync/{}", uuid_like()), &app.token)
        .await;
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.expect("json");
    assert_eq!(body["error"], "sync_not_found");
    app.stop().await;
}

fn uuid_like() -> String {
    "01a2105b-0000-7000-8000-000000000000".to_owned()
}

#[tokio::test]
async fn a_missing_repository_or_branch_fails_with_repo_not_found() {
    let app = TestApp::spawn().await;
    let missing = tempfile::tempdir().expect("temp dir");
    let url = format!("file://{}/nothing-here", missing.path().display());
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "ghost", "repo_url": url}),
        )
        .await;
    let id = response.json::<Value>().await.expect("json")["project_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["code"], "repo_not_found", "{record}");
    assert!(
        record["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );

    let repo = GitRepo::new();
    repo.commit("one");
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "b", "repo_url": repo.url(), "branch": "no-such-branch"}),
        )
        .await;
    let id = response.json::<Value>().await.expect("json")["project_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["code"], "repo_not_found");
    assert!(
        !app.worktree(&id).exists(),
        "a failed first sync leaves no worktree"
    );
    app.stop().await;
}

#[tokio::test]
async fn parallel_syncs_of_many_projects_all_complete() {
    let app = TestApp::spawn_with(|config| config.serve_workers = Some(3)).await;
    let mut projects = Vec::new();
    for index in 0..6 {
        let repo = GitRepo::new();
        repo.write("file.txt", &format!("project {index}"));
        let commit = repo.commit("c");
        let id = app.register(&repo).await;
        projects.push((repo, commit, id));
    }
    let mut pending = Vec::new();
    for (_, _, id) in &projects {
        pending.push(
            app.request_sync(id).await["sync_id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    for (sync_id, (repo, commit, id)) in pending.iter().zip(&projects) {
        let record = app.wait_for_sync(sync_id).await;
        assert_eq!(record["status"], "completed");
        assert_exact_tree(&app, id, repo, commit);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_no_op_sync_keeps_an_exact_tree_and_replaces_a_tampered_one() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("src/main.rs", "fn main() {}\n")
        .write("README.md", "hi\n");
    let commit = repo.commit("first");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let worktree = app.worktree(&id);
    let snapshot = || std::fs::read_link(&worktree).expect("worktree link");
    let first = snapshot();

    // nothing changed anywhere: the tree is left as it is, not rewritten
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["commit"], commit.as_str());
    assert_eq!(snapshot(), first, "an exact tree is kept");
    assert_exact_tree(&app, &id, &repo, &commit);

    // nothing changed upstream, but the tree was tampered with: it is replaced
    for tamper in [
        |dir: &std::path::Path| std::fs::write(dir.join("planted.txt"), "junk").expect("plant"),
        |dir: &std::path::Path| {
            std::fs::write(dir.join("README.md"), "edited by hand\n").expect("edit")
        },
        |dir: &std::path::Path| std::fs::remove_file(dir.join("src/main.rs")).expect("delete"),
    ] {
        let before = snapshot();
        tamper(&worktree);
        assert_eq!(app.sync_to_end(&id).await["status"], "completed");
        assert_ne!(snapshot(), before, "a tampered tree is rewritten");
        assert_exact_tree(&app, &id, &repo, &commit);
    }
    app.stop().await;
}

/// After a no-op sync has verified a snapshot, later no-op syncs ask the snapshot's
/// inotify watch instead of stat'ing every file. The watch must still see what the
/// stat test would, and more: an edit that keeps the file's size and modification
/// time (which git's stat test, the only check before the watch, lets through).
#[tokio::test]
async fn a_watched_snapshot_is_kept_until_touched_even_by_an_edit_the_stat_test_misses() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("src/main.rs", "fn main() {}\n")
        .write("README.md", "hello\n");
    let commit = repo.commit("first");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let worktree = app.worktree(&id);
    let snapshot = || std::fs::read_link(&worktree).expect("worktree link");
    let written = snapshot();
    // the tree is verified under watch (after its sync, or by the first no-op), and
    // the next no-op syncs take the watch's word
    for _ in 0..3 {
        assert_eq!(app.sync_to_end(&id).await["status"], "completed");
        assert_eq!(snapshot(), written, "an untouched tree is kept");
    }

    let file = worktree.join("README.md");
    let modified = std::fs::metadata(&file)
        .and_then(|meta| meta.modified())
        .expect("mtime");
    std::fs::write(&file, "HELLO\n").expect("same size");
    std::fs::File::options()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_modified(modified))
        .expect("time put back");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    assert_ne!(snapshot(), written, "the touched tree is rewritten");
    assert_exact_tree(&app, &id, &repo, &commit);
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "hello\n",
        "the edit is gone, not carried over into the new snapshot"
    );
    // how each of those four syncs told, as the metrics count it
    let metrics = app.metrics().await;
    let checks =
        |result: &str| metrics.value("hivesync_snapshot_checks_total", &[("result", result)]);
    // the first no-op made the stat pass itself unless the verification that follows
    // a written tree (on a thread of its own) had already vouched for it
    let (passes, watched) = (
        checks("stat_pass").unwrap_or_default(),
        checks("watched").unwrap_or_default(),
    );
    assert_eq!(passes + watched, 3.0);
    assert!(
        watched >= 2.0,
        "{watched} no-op syncs answered by the watch"
    );
    assert_eq!(checks("touched"), Some(1.0));
    assert_eq!(checks("changed"), Some(0.0));
    assert!(
        metrics
            .value("hivesync_snapshot_watched_directories", &[])
            .is_some(),
        "the watched directories are exported"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_incremental_sync_writes_what_changed_and_restores_what_was_tampered_with() {
    use std::os::unix::fs::MetadataExt;
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("same.txt", "unchanged\n")
        .write("lib/also_same.rs", "pub fn f() {}\n")
        .write("tampered.txt", "as committed\n")
        .write("changes.txt", "v1\n");
    repo.commit("first");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let worktree = app.worktree(&id);
    let inode = |path: &str| std::fs::metadata(worktree.join(path)).expect("file").ino();
    let same = inode("same.txt");
    let also_same = inode("lib/also_same.rs");
    std::fs::write(worktree.join("tampered.txt"), "edited on the server\n").expect("tamper");

    repo.write("changes.txt", "v2\n");
    let second = repo.commit("second");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    assert_exact_tree(&app, &id, &repo, &second);
    assert_eq!(
        inode("same.txt"),
        same,
        "an unchanged file is carried over, not rewritten"
    );
    assert_eq!(inode("lib/also_same.rs"), also_same);

    // and the carried-over files are still exact for the next no-op sync
    let before = std::fs::read_link(&worktree).expect("link");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    assert_eq!(std::fs::read_link(&worktree).expect("link"), before);
    app.stop().await;
}

/// A snapshot a stopped or crashed process left in the trash is deleted at the next
/// start, not only after the next sync.
#[tokio::test]
async fn the_trash_a_stopped_process_left_is_emptied_at_start() {
    let data = tempfile::tempdir().expect("temp dir");
    let left = data.path().join("trash").join("left-by-a-crash");
    std::fs::create_dir_all(left.join("src")).expect("dirs");
    std::fs::write(left.join("src/lib.rs"), "fn main() {}\n").expect("write");
    let app = TestApp::spawn_on(data.path(), |_| {}).await;
    let emptied = crate::helpers::wait_until(crate::helpers::WAIT, || async {
        let remaining = std::fs::read_dir(data.path().join("trash"))
            .map(|entries| entries.count())
            .unwrap_or(0);
        (remaining == 0).then_some(())
    })
    .await;
    assert!(emptied.is_some(), "the trash is emptied at start");
    app.stop().await;
}

/// The spare of a snapshot (a hidden copy made after the snapshot is verified), or
/// `None` when none appears within a few seconds.
async fn spare_of(worktree: &std::path::Path) -> Option<std::path::PathBuf> {
    let snapshot = std::fs::read_link(worktree).expect("worktree link");
    let name = snapshot.file_name()?.to_str()?.to_owned();
    let spare = snapshot.with_file_name(format!(".spare-{name}"));
    for _ in 0..600 {
        if spare.is_dir() {
            return Some(spare);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

/// A changed sync takes the spare the previous tree left (a hidden copy of it), brings
/// it to the new commit in place and swaps it in: paths turning from file to
/// directory and back, directories emptied, and files edited on the server through
/// the current tree (whose inodes the spare shares) all end exact; the tree readers
/// had is never written through; and the new tree is vouched for by its watch at once.
///
/// Run in a process of its own (`.ci/run` does, after `cargo test`): the snapshot watch
/// and its verifying thread are one per process, and in the full suite other tests'
/// trees sometimes leave this one's no-op sync to a stat pass instead of the watch.
#[tokio::test]
#[ignore = "needs a process of its own: cargo test --test api -- --ignored --exact sync::a_changed_sync_brings_the_spare_tree_up_to_date_without_touching_the_old_one"]
async fn a_changed_sync_brings_the_spare_tree_up_to_date_without_touching_the_old_one() {
    use std::os::unix::fs::MetadataExt;
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("same.txt", "unchanged\n")
        .write("lib/keep.rs", "pub fn f() {}\n")
        .write("changes.txt", "v1\n")
        .write("edited.txt", "as committed\n")
        .write("replaced.txt", "as committed\n")
        .write("gone/deep/only.txt", "soon gone\n")
        .write("thing", "a file first\n")
        .write("folder/x.txt", "a directory first\n");
    repo.commit("first");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let worktree = app.worktree(&id);
    let spare = spare_of(&worktree)
        .await
        .expect("a spare of the verified tree is made");
    let spare_lib = std::fs::metadata(spare.join("lib"))
        .expect("spare dir")
        .ino();

    // the server's users: an edit in place that keeps size and time, a file replaced
    // by a new one (a new inode), and an outside hard link to a file about to change
    let edited = worktree.join("edited.txt");
    let modified = std::fs::metadata(&edited)
        .and_then(|meta| meta.modified())
        .expect("mtime");
    std::fs::write(&edited, "AS COMMITTED\n").expect("same size");
    std::fs::File::options()
        .write(true)
        .open(&edited)
        .and_then(|f| f.set_modified(modified))
        .expect("time put back");
    std::fs::write(worktree.join("replaced.tmp"), "replaced on the server\n").expect("write");
    std::fs::rename(worktree.join("replaced.tmp"), worktree.join("replaced.txt")).expect("mv");
    let outside = tempfile::tempdir().expect("temp dir");
    let held = outside.path().join("changes.txt");
    std::fs::hard_link(worktree.join("changes.txt"), &held).expect("link");

    repo.write("changes.txt", "v2\n");
    std::fs::remove_dir_all(repo.path().join("gone")).expect("rm");
    std::fs::remove_file(repo.path().join("thing")).expect("rm");
    repo.write("thing/inner.txt", "a directory now\n");
    std::fs::remove_dir_all(repo.path().join("folder")).expect("rm");
    repo.write("folder", "a file now\n");
    let second = repo.commit("second");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    assert_exact_tree(&app, &id, &repo, &second);
    assert_eq!(
        std::fs::metadata(worktree.join("lib")).expect("dir").ino(),
        spare_lib,
        "the new tree is the spare, brought up to date"
    );
    assert_eq!(
        std::fs::read_to_string(&held).expect("read"),
        "v1\n",
        "a changed file is replaced, never written through its inode"
    );
    assert!(!spare.exists(), "the spare was taken");

    // vouched for by its watch from the swap on: the next no-op sync looks at no file
    let watched_before = app.snapshot_checks("watched").await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(app.snapshot_checks("watched").await, watched_before + 1.0);
    assert_exact_tree(&app, &id, &repo, &second);

    // and the next one takes the next spare
    spare_of(&worktree).await.expect("a spare of the new tree");
    repo.write("changes.txt", "v3\n");
    let third = repo.commit("third");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    assert_exact_tree(&app, &id, &repo, &third);
    app.stop().await;
}

/// A commit that changes a `.gitattributes` can change how files whose blobs did not
/// change check out (here their line endings): no file is reused then, and the tree
/// is what a fresh clone gives.
///
/// Run in a process of its own (`.ci/run` does): it needs the spare of its first tree,
/// which the process's one verifying thread builds from a queue of four that drops
/// what comes when it is full, as it may when other tests write trees meanwhile.
#[tokio::test]
#[ignore = "needs a process of its own: cargo test --test api -- --ignored --exact sync::a_changed_gitattributes_rewrites_the_files_it_governs"]
async fn a_changed_gitattributes_rewrites_the_files_it_governs() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("notes.txt", "one\ntwo\n");
    repo.commit("first");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let worktree = app.worktree(&id);
    // with a spare ready, and without one: both ways must honour the change
    spare_of(&worktree).await.expect("a spare");
    repo.write(".gitattributes", "*.txt text eol=crlf\n");
    repo.commit("line endings");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let clone = tempfile::tempdir().expect("temp dir");
    let status = std::process::Command::new("git")
        .args(["clone", "-q", &repo.url(), "."])
        .current_dir(clone.path())
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .status()
        .expect("git clone");
    assert!(status.success());
    let cloned = std::fs::read(clone.path().join("notes.txt")).expect("cloned file");
    assert_eq!(cloned, b"one\r\ntwo\r\n", "git itself converts");
    assert_eq!(
        std::fs::read(worktree.join("notes.txt")).expect("mirrored file"),
        cloned,
        "the mirror holds what a clone holds"
    );
    app.stop().await;
}
