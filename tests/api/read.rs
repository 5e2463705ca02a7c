use hivesync::auth::ClientKind;
use serde_json::Value;

use crate::helpers::{GitRepo, TestApp, token};

async fn synced_project(app: &TestApp, repo: &GitRepo) -> String {
    let id = app.register(repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    id
}

#[tokio::test]
async fn tree_lists_entries_in_path_order_with_kinds_and_sizes() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("b.txt", "four")
        .write("a.txt", "x")
        .write("src/lib.rs", "fn main() {}\n")
        .write("docs/x.md", "#");
    let other = GitRepo::new();
    other.commit("sub");
    repo.git(&["add", "-A"]);
    repo.git(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("160000,{},vendored", other.head()),
    ]);
    repo.git(&["commit", "-q", "-m", "tree"]);
    let commit = repo.head();
    let id = synced_project(&app, &repo).await;

    let (status, root) = app
        .get_json(&format!("/api/v1/repo/tree?project_id={id}"))
        .await;
    assert_eq!(status, 200, "{root}");
    assert_eq!(root["commit"], commit.as_str());
    assert_eq!(root["path"], "");
    let names: Vec<&str> = root["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["a.txt", "b.txt", "docs", "src", "vendored"]);
    let entry = |name: &str| {
        root["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .expect("entry")
    };
    assert_eq!(entry("docs")["kind"], "dir");
    assert_eq!(entry("b.txt")["kind"], "file");
    assert_eq!(entry("b.txt")["size"], 4);
    assert_eq!(entry("vendored")["kind"], "submodule");

    let (status, sub) = app
        .get_json(&format!("/api/v1/repo/tree?project_id={id}&path=src"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(sub["entries"][0]["path"], "src/lib.rs");
    let (status, missing) = app
        .get_json(&format!("/api/v1/repo/tree?project_id={id}&path=nope"))
        .await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn file_returns_text_binary_as_base64_and_caps_large_files() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("hello.txt", "héllo\n");
    std::fs::write(repo.path().join("blob.bin"), [0u8, 159, 146, 150]).expect("write");
    let big = "0123456789abcdef".repeat(70 * 1024);
    repo.write("big.txt", &big);
    repo.commit("files");
    let id = synced_project(&app, &repo).await;

    let (status, text) = app
        .get_json(&format!("/api/v1/repo/file?project_id={id}&path=hello.txt"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (text["encoding"].as_str(), text["content"].as_str()),
        (Some("utf-8"), Some("héllo\n"))
    );
    assert_eq!(
        (text["size"].as_u64(), text["truncated"].as_bool()),
        (Some(7), Some(false))
    );
    let (_, binary) = app
        .get_json(&format!("/api/v1/repo/file?project_id={id}&path=blob.bin"))
        .await;
    assert_eq!(
        (binary["encoding"].as_str(), binary["content"].as_str()),
        (Some("base64"), Some("AJ+Slg=="))
    );
    let (_, large) = app
        .get_json(&format!("/api/v1/repo/file?project_id={id}&path=big.txt"))
        .await;
    assert_eq!(large["truncated"], true);
    assert_eq!(large["size"].as_u64(), Some(big.len() as u64));
    assert_eq!(large["content"].as_str().map(str::len), Some(1024 * 1024));
    let (status, missing) = app
        .get_json(&format!(
            "/api/v1/repo/file?project_id={id}&path=absent.txt"
        ))
        .await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn paths_that_could_escape_are_path_invalid() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a");
    repo.commit("one");
    let id = synced_project(&app, &repo).await;
    for bad in [
        "..",
        "../etc/passwd",
        "a/../../x",
        "/etc/passwd",
        "a%00b",
        "..%5C..%5Cx",
        "a//b",
        "./a.txt",
    ] {
        for endpoint in ["tree", "file"] {
            let (status, body) = app
                .get_json(&format!(
                    "/api/v1/repo/{endpoint}?project_id={id}&path={bad}"
                ))
                .await;
            assert_eq!(
                (status, body["error"].as_str()),
                (400, Some("path_invalid")),
                "{endpoint} {bad}"
            );
        }
    }
    let (status, body) = app
        .get_json(&format!(
            "/api/v1/repo/search?project_id={id}&q=a&path_prefix=../x"
        ))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("path_invalid"))
    );
    app.stop().await;
}

#[tokio::test]
async fn search_is_literal_by_default_regex_on_request_and_skips_binaries() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("src/a.rs", "fn alpha() {}\nlet x = a.b;\n")
        .write("src/b.rs", "fn beta() {}\n")
        .write("docs/a.md", "alpha docs\n");
    std::fs::write(repo.path().join("bin.dat"), b"alpha\0binary").expect("write");
    let commit = repo.commit("search");
    let id = synced_project(&app, &repo).await;

    let (status, found) = app
        .get_json(&format!("/api/v1/repo/search?project_id={id}&q=alpha"))
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["commit"], commit.as_str());
    let hits: Vec<(String, u64, u64)> = found["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .map(|m| {
            (
                m["path"].as_str().expect("path").to_owned(),
                m["line"].as_u64().expect("line"),
                m["column"].as_u64().expect("col"),
            )
        })
        .collect();
    assert_eq!(
        hits,
        [
            ("docs/a.md".to_owned(), 1, 1),
            ("src/a.rs".to_owned(), 1, 4)
        ],
        "binary files are skipped"
    );
    assert_eq!(found["matches"][1]["text"], "fn alpha() {}");
    assert_eq!(found["truncated"], false);

    // literal: '.' is a dot, not any character
    let (_, literal) = app
        .get_json(&format!("/api/v1/repo/search?project_id={id}&q=a.b"))
        .await;
    assert_eq!(literal["matches"].as_array().map(Vec::len), Some(1));
    let (_, regex) = app
        .get_json(&format!(
            "/api/v1/repo/search?project_id={id}&q=fn%20(alpha|beta)&regex=true"
        ))
        .await;
    assert_eq!(regex["matches"].as_array().map(Vec::len), Some(2));
    let (_, prefixed) = app
        .get_json(&format!(
            "/api/v1/repo/search?project_id={id}&q=alpha&path_prefix=docs"
        ))
        .await;
    assert_eq!(prefixed["matches"].as_array().map(Vec::len), Some(1));
    let (_, limited) = app
        .get_json(&format!("/api/v1/repo/search?project_id={id}&q=fn&limit=1"))
        .await;
    assert_eq!(
        (
            limited["matches"].as_array().map(Vec::len),
            limited["truncated"].as_bool()
        ),
        (Some(1), Some(true))
    );
    let (status, bad) = app
        .get_json(&format!(
            "/api/v1/repo/search?project_id={id}&q=(unclosed&regex=true"
        ))
        .await;
    assert_eq!(
        (status, bad["error"].as_str()),
        (400, Some("invalid_request"))
    );
    app.stop().await;
}

#[tokio::test]
async fn diff_reports_added_modified_deleted_and_renamed_files_with_patches() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    let body = "line one\nline two\nline three\nline four\nline five\n";
    repo.write("keep.txt", "old\n")
        .write("gone.txt", "bye\n")
        .write("moved/from.txt", body);
    let from = repo.commit("from");
    let id = synced_project(&app, &repo).await;
    repo.write("keep.txt", "new\n").write("added.txt", "hi\n");
    repo.git(&["rm", "-q", "gone.txt"]);
    std::fs::create_dir_all(repo.path().join("moved/to")).expect("mkdir");
    repo.git(&["mv", "moved/from.txt", "moved/to/renamed.txt"]);
    let to = repo.commit("to");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");

    let (status, diff) = app
        .get_json(&format!(
            "/api/v1/repo/diff?project_id={id}&from={from}&to={to}"
        ))
        .await;
    assert_eq!(status, 200, "{diff}");
    let mut files: Vec<(String, String, Option<String>)> = diff["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().expect("path").to_owned(),
                f["status"].as_str().expect("status").to_owned(),
                f["old_path"].as_str().map(str::to_owned),
            )
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            ("added.txt".to_owned(), "added".to_owned(), None),
            ("gone.txt".to_owned(), "deleted".to_owned(), None),
            ("keep.txt".to_owned(), "modified".to_owned(), None),
            (
                "moved/to/renamed.txt".to_owned(),
                "renamed".to_owned(),
                Some("moved/from.txt".to_owned())
            ),
        ]
    );
    let modified = diff["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path"] == "keep.txt")
        .expect("keep");
    assert!(
        modified["patch"]
            .as_str()
            .is_some_and(|p| p.contains("-old\n+new\n")),
        "{modified}"
    );

    let unknown = "0".repeat(40);
    let (status, missing) = app
        .get_json(&format!(
            "/api/v1/repo/diff?project_id={id}&from={unknown}&to={to}"
        ))
        .await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("not_found"))
    );
    let (status, bad) = app
        .get_json(&format!(
            "/api/v1/repo/diff?project_id={id}&from=HEAD&to={to}"
        ))
        .await;
    assert_eq!(
        (status, bad["error"].as_str()),
        (400, Some("invalid_request"))
    );
    app.stop().await;
}

#[tokio::test]
async fn mobile_tokens_get_403_on_every_content_read() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a");
    let commit = repo.commit("one");
    let id = synced_project(&app, &repo).await;
    let mobile = token("alice", ClientKind::Mobile);
    for path in [
        format!("/api/v1/repo/tree?project_id={id}"),
        format!("/api/v1/repo/file?project_id={id}&path=a.txt"),
        format!("/api/v1/repo/search?project_id={id}&q=a"),
        format!("/api/v1/repo/diff?project_id={id}&from={commit}&to={commit}"),
    ] {
        let response = app.get(&path, &mobile).await;
        assert_eq!(response.status(), 403, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], "mobile_metadata_only");
    }
    let bob = token("bob", ClientKind::Desktop);
    assert_eq!(
        app.get(&format!("/api/v1/repo/tree?project_id={id}"), &bob)
            .await
            .status(),
        404
    );
    app.stop().await;
}

#[tokio::test]
async fn etags_follow_the_commit_and_if_none_match_gets_304() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "one");
    repo.commit("one");
    let id = synced_project(&app, &repo).await;
    let path = format!("/api/v1/repo/file?project_id={id}&path=a.txt");
    let first = app.get(&path, &app.token).await;
    let etag = first
        .headers()
        .get("etag")
        .expect("etag")
        .to_str()
        .expect("ascii")
        .to_owned();
    let cached = app
        .http
        .get(format!("{}{path}", app.base))
        .bearer_auth(&app.token)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("sent");
    assert_eq!(cached.status(), 304);

    repo.write("a.txt", "two");
    repo.commit("two");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    let changed = app
        .http
        .get(format!("{}{path}", app.base))
        .bearer_auth(&app.token)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("sent");
    assert_eq!(changed.status(), 200);
    assert_ne!(
        changed
            .headers()
            .get("etag")
            .expect("etag")
            .to_str()
            .expect("ascii"),
        etag
    );
    let body: Value = changed.json().await.expect("json");
    assert_eq!(body["content"], "two");
    app.stop().await;
}

#[tokio::test]
async fn reads_racing_syncs_always_see_one_whole_commit() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    // each commit writes its own marker into two files; a read must never mix commits
    repo.write("one.txt", "v0").write("two.txt", "v0");
    repo.commit("v0");
    let id = synced_project(&app, &repo).await;
    let reader = {
        let base = app.base.clone();
        let http = app.http.clone();
        let token = app.token.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            for _ in 0..150 {
                let tree: Value = http
                    .get(format!("{base}/api/v1/repo/search?project_id={id}&q=v"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("sent")
                    .json()
                    .await
                    .expect("json");
                let texts: Vec<&str> = tree["matches"]
                    .as_array()
                    .expect("matches")
                    .iter()
                    .map(|m| m["text"].as_str().expect("text"))
                    .collect();
                assert_eq!(texts.len(), 2, "{tree}");
                assert_eq!(texts[0], texts[1], "a read mixed two commits: {tree}");
                reads += 1;
            }
            reads
        })
    };
    for round in 1..6 {
        repo.write("one.txt", &format!("v{round}"))
            .write("two.txt", &format!("v{round}"));
        repo.commit("next");
        assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    }
    assert_eq!(reader.await.expect("reader task"), 150);
    app.stop().await;
}

#[tokio::test]
async fn a_project_never_synced_has_nothing_to_read() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.commit("one");
    let id = app.register(&repo).await;
    let (status, body) = app
        .get_json(&format!("/api/v1/repo/tree?project_id={id}"))
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    app.stop().await;
}

/// RFC 9110 §13.1.2: `If-None-Match: *` is true only when the resource exists, so a
/// path that does not is `404`, never `304`.
#[tokio::test]
async fn if_none_match_star_matches_only_a_path_that_exists() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a\n").commit("a");
    let id = synced_project(&app, &repo).await;
    let ask = |path: &str| {
        app.http
            .get(format!(
                "{}/api/v1/repo/file?project_id={id}&path={path}",
                app.base
            ))
            .bearer_auth(&app.token)
            .header("if-none-match", "*")
            .send()
    };
    assert_eq!(ask("a.txt").await.expect("sent").status(), 304);
    let missing = ask("missing.txt").await.expect("sent");
    assert_eq!(missing.status(), 404);
    app.stop().await;
}

/// A name Windows cannot write as it is (here one that climbs out with `..\`) is
/// listed, and marked, so a Windows client never writes outside its folder.
#[tokio::test]
async fn tree_marks_names_that_are_unsafe_on_windows() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("..\\..\\x", "climb\n")
        .write("CON.txt", "device\n")
        .write("plain.txt", "fine\n")
        .commit("names");
    let id = synced_project(&app, &repo).await;
    let (status, tree) = app
        .get_json(&format!("/api/v1/repo/tree?project_id={id}"))
        .await;
    assert_eq!(status, 200, "{tree}");
    let marked = |name: &str| {
        tree["entries"]
            .as_array()
            .and_then(|entries| entries.iter().find(|entry| entry["name"] == name))
            .map(|entry| entry["unsafe_on_windows"] == true)
    };
    assert_eq!(marked("..\\..\\x"), Some(true), "{tree}");
    assert_eq!(marked("CON.txt"), Some(true), "{tree}");
    assert_eq!(marked("plain.txt"), Some(false), "{tree}");
    app.stop().await;
}
