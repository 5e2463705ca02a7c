use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, assert_exact_tree, is_notification};

async fn register_url(app: &TestApp, url: &str) -> String {
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "x", "repo_url": url}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.expect("json")["project_id"]
        .as_str()
        .expect("id")
        .to_owned()
}

#[tokio::test]
async fn a_sync_stuck_on_a_silent_remote_fails_with_timeout() {
    // a git daemon that accepts and then says nothing
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let app = TestApp::spawn_with(|config| {
        config.allowed_schemes.push("git".into());
        config.sync_timeout = Duration::from_secs(1);
    })
    .await;
    let id = register_url(&app, &format!("git://127.0.0.1:{port}/repo.git")).await;
    let started = std::time::Instant::now();
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["code"], "timeout", "{record}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        !app.worktree(&id).exists(),
        "nothing half-written is left as the mirror"
    );
    holder.abort();
    app.stop().await;
}

#[tokio::test]
async fn network_failures_are_retried_up_to_the_limit_and_not_found_is_not() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed); // nothing listens there now: every connect is refused
    let app = TestApp::spawn_with(|config| {
        config.allowed_schemes.push("git".into());
        config.retry_base = Duration::from_millis(20);
        config.retry_max = 3;
    })
    .await;
    let id = register_url(&app, &format!("git://127.0.0.1:{port}/repo.git")).await;
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["code"], "network_error", "{record}");
    assert_eq!(record["attempt"], 3);
    let frames = socket
        .until(|f| is_notification(f, "repo_sync_failed"))
        .await;
    let attempts = frames
        .iter()
        .filter(|f| {
            f["type"] == "sync.stage" && f["stage"] == "running" && f["progress"]["percent"] == 0
        })
        .count();
    assert!(attempts >= 3, "each attempt is a visible stage: {frames:?}");

    let missing = tempfile::tempdir().expect("temp dir");
    let id = register_url(&app, &format!("file://{}/absent", missing.path().display())).await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(
        (record["error"]["code"].as_str(), record["attempt"].as_u64()),
        (Some("repo_not_found"), Some(1))
    );
    app.stop().await;
}

/// Reads the socket up to the next sync success, which a repair notice must precede.
async fn assert_repaired_before_success(socket: &mut crate::helpers::WsClient) {
    let frames = socket
        .until(|f| is_notification(f, "repo_sync_success"))
        .await;
    assert!(
        frames
            .iter()
            .any(|f| is_notification(f, "repo_mirror_repaired")),
        "{frames:?}"
    );
}

async fn assert_repaired_on_next_sync(damage: impl FnOnce(&std::path::Path)) {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "one");
    repo.commit("one");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    damage(&app.data_dir.join("git").join(format!("{id}.git")));
    repo.write("a.txt", "two");
    let commit = repo.commit("two");

    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_repaired_before_success(&mut socket).await;
    assert_exact_tree(&app, &id, &repo, &commit);
    app.stop().await;
}

#[tokio::test]
async fn a_mirror_with_a_broken_head_is_recloned() {
    assert_repaired_on_next_sync(|git_dir| {
        std::fs::write(git_dir.join("HEAD"), "garbage\n").expect("damage")
    })
    .await;
}

#[tokio::test]
async fn a_mirror_that_lost_its_objects_is_recloned() {
    assert_repaired_on_next_sync(|git_dir| {
        let objects = git_dir.join("objects");
        for entry in std::fs::read_dir(&objects).expect("objects") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|n| n != "info") {
                std::fs::remove_dir_all(&path).expect("remove");
                std::fs::create_dir_all(&path).expect("recreate empty");
            }
        }
    })
    .await;
}

/// Commits a hand-made tree (entries as `mode type id\tname` lines, nested with
/// `{dir}` placeholders resolved by the caller) as the branch head.
fn commit_tree(repo: &GitRepo, listing: &str) -> String {
    let tree = mktree(repo, listing);
    let commit = repo.git(&["commit-tree", &tree, "-m", "hostile"]);
    repo.git(&["update-ref", "refs/heads/main", &commit]);
    commit
}

fn mktree(repo: &GitRepo, listing: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("git")
        .arg("mktree")
        .current_dir(repo.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("git mktree");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(listing.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("mktree output");
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

fn blob(repo: &GitRepo, contents: &str) -> String {
    let path = repo.path().join(".blob-input");
    std::fs::write(&path, contents).expect("write");
    let id = repo.git(&["hash-object", "-w", ".blob-input"]);
    std::fs::remove_file(path).expect("remove");
    id
}

/// Every path under `root`, relative.
fn all_paths(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(
                path.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string(),
            );
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                pending.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn hostile_trees_never_escape_the_mirror_or_plant_hooks() {
    let app = TestApp::spawn().await;
    let marker = tempfile::tempdir().expect("temp dir");
    let marker_file = marker.path().join("hook-ran");
    let hook = format!("#!/bin/sh\ntouch {}\n", marker_file.display());

    // (name, tree listing builder): each is the whole branch head
    let repo = GitRepo::new();
    let hook_blob = blob(&repo, &hook);
    let plain = blob(&repo, "plain\n");
    let hooks_dir = mktree(&repo, &format!("100755 blob {hook_blob}\tpost-checkout\n"));
    let dot_git = mktree(&repo, &format!("040000 tree {hooks_dir}\thooks\n"));
    let cases = [
        (
            "a .git directory with a hook",
            format!("040000 tree {dot_git}\t.git\n100644 blob {plain}\tok.txt\n"),
        ),
        (
            "a case-folded .GIT",
            format!("040000 tree {dot_git}\t.GIT\n100644 blob {plain}\tok.txt\n"),
        ),
        (
            "a '..' entry",
            format!("100644 blob {plain}\t..\n100644 blob {plain}\tok.txt\n"),
        ),
        (
            "names that collide when case-folded",
            format!("100644 blob {plain}\tREADME\n100644 blob {hook_blob}\treadme\n"),
        ),
    ];
    for (what, listing) in cases {
        commit_tree(&repo, &listing);
        let id = app.register(&repo).await;
        let before_outside = all_paths(&app.data_dir.join("repos"));
        let record = app.sync_to_end(&id).await;
        let worktree = app.worktree(&id);
        let inside = all_paths(&worktree);
        assert!(
            !inside.iter().any(|p| p.contains("hooks")
                || p.starts_with(".git/")
                || p.to_lowercase().starts_with(".git/")),
            "{what}: hostile paths were written: {inside:?} ({record})"
        );
        if worktree.exists() {
            let (_, saw_symlink) = crate::helpers::files_on_disk(&worktree);
            assert!(!saw_symlink, "{what}: a symlink was materialized");
        }
        let after_outside: Vec<_> = all_paths(&app.data_dir.join("repos"))
            .into_iter()
            .filter(|p| !p.starts_with(id.as_str()))
            .collect();
        let before_outside: Vec<_> = before_outside
            .into_iter()
            .filter(|p| !p.starts_with(id.as_str()))
            .collect();
        assert_eq!(
            after_outside, before_outside,
            "{what}: something was written beside the mirror"
        );
        if what == "names that collide when case-folded" {
            // a case-sensitive filesystem holds both: the exact tree
            assert_eq!(record["status"], "completed", "{record}");
            assert_eq!(
                inside
                    .iter()
                    .filter(|p| p.eq_ignore_ascii_case("readme"))
                    .count(),
                2
            );
        } else {
            assert_eq!(record["status"], "failed", "{what}: {record}");
            assert_eq!(
                record["error"]["code"], "backend_error",
                "{what}: not a damaged mirror"
            );
            assert!(
                record["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("cannot be checked out safely"))
            );
            assert_eq!(record["attempt"], 1, "{what}: not retried");
        }
        assert!(!marker_file.exists(), "{what}: a hook ran");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_periodic_health_check_repairs_a_damaged_mirror_unasked() {
    let app = TestApp::spawn_with(|config| {
        config.health_check_interval = Some(Duration::from_millis(200));
    })
    .await;
    let repo = GitRepo::new();
    repo.write("a.txt", "one");
    let commit = repo.commit("one");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;

    std::fs::write(
        app.data_dir
            .join("git")
            .join(format!("{id}.git"))
            .join("HEAD"),
        "garbage\n",
    )
    .expect("damage");
    // nobody asks for a sync: the health check finds the damage and repairs it
    assert_repaired_before_success(&mut socket).await;
    assert_exact_tree(&app, &id, &repo, &commit);
    let (_, history) = app
        .get_json(&format!("/api/v1/repo/sync?project_id={id}"))
        .await;
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");
    // a sound mirror is left alone
    assert!(
        socket.is_silent_for(Duration::from_millis(800)).await,
        "no sync without damage"
    );
    app.stop().await;
}

/// A private tmpfs as DATA_DIR, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(Self { dir }),
            other => {
                crate::skips::skip(&format!("cannot mount a tmpfs (needs root): {other:?}"));
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn running_out_of_space_mid_sync_fails_with_storage_full_and_keeps_the_mirror() {
    let Some(disk) = SmallDisk::mount(6 << 20) else {
        return;
    };
    let app = TestApp::spawn_on(disk.dir.path(), |config| {
        // the floor is not what stops this sync: the disk fills while it runs
        config.min_free_bytes = 0;
    })
    .await;
    let repo = GitRepo::new();
    repo.write("README.md", "small\n");
    let small = repo.commit("small");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");

    // 12 MB that does not compress, onto a 6 MB disk
    repo.commit_random_files(12, 1 << 20);
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["error"]["code"], "storage_full", "{record}");
    assert_eq!(record["attempt"], 1, "a full disk is not retried: {record}");
    assert_exact_tree(&app, &id, &repo, &small);
    let (_, project) = app.get_json(&format!("/api/v1/projects/{id}")).await;
    assert_eq!(
        project["commit"],
        small.as_str(),
        "the project still names the mirrored commit"
    );
    app.stop().await;
}

#[tokio::test]
async fn deleting_a_project_mid_sync_leaves_no_mirror_behind() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    // big enough that the delete lands while the clone runs
    repo.commit_random_files(300, 100_000);
    let id = app.register(&repo).await;
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    let accepted = app.request_sync(&id).await;
    socket
        .until(|f| f["type"] == "sync.stage" && f["stage"] == "running")
        .await;
    let deleted = app
        .delete(&format!("/api/v1/projects/{id}"), &app.token)
        .await;
    assert_eq!(deleted.status(), 204);
    let sync_path = format!(
        "/api/v1/repo/sync/{}",
        accepted["sync_id"].as_str().expect("id")
    );
    let gone = crate::helpers::wait_until(crate::helpers::WAIT, || async {
        let (status, _) = app.get_json(&sync_path).await;
        let leftovers = ["repos", "trees", "git"]
            .iter()
            .map(|dir| app.data_dir.join(dir))
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flat_map(|entries| entries.flatten())
            .any(|entry| entry.file_name().to_string_lossy().starts_with(&id));
        (status == 404 && !leftovers).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the deleted project's mirror was left on disk"
    );
    app.stop().await;
}
