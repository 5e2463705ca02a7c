//! Every read within a budget (#30): a directory listing comes in pages, a diff stops
//! at its limits, and one user's reads cannot take every place another user's need.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use hivesync::auth::ClientKind;
use serde_json::Value;

use crate::helpers::{GitRepo, TestApp, WAIT, token, wait_until};
use crate::lifecycle::terminate;

/// Feeds `stream` to `git fast-import` in `repo` (thousands of paths in a second) and
/// returns the head of `main`.
fn fast_import(repo: &GitRepo, stream: &[u8]) -> String {
    let mut import = Command::new("git")
        .args(["fast-import", "--quiet", "--force"])
        .current_dir(repo.path())
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import runs");
    import
        .stdin
        .take()
        .expect("stdin")
        .write_all(stream)
        .expect("stream written");
    assert!(import.wait().expect("fast-import ends").success());
    repo.git(&["reset", "-q", "--hard", "refs/heads/main"]);
    repo.head()
}

/// A commit on `main` (after `parent`, when given) whose tree is `files`, each path
/// naming a blob mark defined in `blobs`.
fn commit_stream(
    blobs: &[(u32, Vec<u8>)],
    files: &[(String, u32)],
    parent: Option<&str>,
    message: &str,
) -> Vec<u8> {
    let mut stream = Vec::new();
    for (mark, data) in blobs {
        write!(stream, "blob\nmark :{mark}\ndata {}\n", data.len()).expect("buffer");
        stream.extend_from_slice(data);
        stream.push(b'\n');
    }
    write!(
        stream,
        "commit refs/heads/main\ncommitter Test <test@example.com> 1700000000 +0000\ndata {}\n{message}\n",
        message.len()
    )
    .expect("buffer");
    if let Some(parent) = parent {
        writeln!(stream, "from {parent}").expect("buffer");
    }
    stream.extend_from_slice(b"deleteall\n");
    for (path, mark) in files {
        writeln!(stream, "M 100644 :{mark} {path}").expect("buffer");
    }
    stream
}

async fn synced(app: &TestApp, id: &str) {
    assert_eq!(app.sync_to_end(id).await["status"], "completed");
}

fn names(page: &Value) -> Vec<String> {
    page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| entry["name"].as_str().expect("name").to_owned())
        .collect()
}

#[tokio::test]
async fn a_large_directory_comes_in_pages_each_entry_once_in_path_order() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    // just past two default pages: the suite's other tests share this process's
    // inotify queue, which a tree of thousands of files would flood at teardown
    let files: Vec<(String, u32)> = (0..1_200)
        .map(|n| (format!("big/f{n:05}.txt"), 1))
        .chain([("big/sub/x.txt".to_owned(), 1), ("top.txt".to_owned(), 1)])
        .collect();
    let first = fast_import(
        &repo,
        &commit_stream(&[(1, b"same\n".to_vec())], &files, None, "many"),
    );
    let id = app.register(&repo).await;
    synced(&app, &id).await;

    let base = format!("/api/v1/repo/tree?project_id={id}&path=big");
    let (status, page) = app.get_json(&base).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["entries"].as_array().expect("entries").len(), 1000);
    let mut seen = names(&page);
    let mut cursor = page["next_cursor"].as_str().expect("more pages").to_owned();
    let mut pages = 1;
    loop {
        let (status, page) = app
            .get_json(&format!("{base}&limit=150&cursor={cursor}"))
            .await;
        assert_eq!(status, 200, "{page}");
        assert!(page["entries"].as_array().expect("entries").len() <= 150);
        seen.extend(names(&page));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => {
                assert!(page["next_cursor"].is_null(), "the last page says so");
                break;
            }
        }
    }
    assert_eq!(pages, 1 + 2, "1,000 then 150 and the last 51");
    assert_eq!(seen.len(), 1_201, "every entry");
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        1_201,
        "each exactly once"
    );
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "in path order across pages");

    // a small directory is one page, as before
    let (_, root) = app
        .get_json(&format!("/api/v1/repo/tree?project_id={id}"))
        .await;
    assert_eq!(names(&root), ["big", "top.txt"]);
    assert!(root["next_cursor"].is_null());

    // bad limits and cursors are refused, not guessed at
    for query in [
        "limit=0",
        "limit=10001",
        "limit=many",
        "cursor=not-a-cursor",
        "cursor=dDEKYQpiCmM",
    ] {
        let (status, body) = app.get_json(&format!("{base}&{query}")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{query}: {body}"
        );
    }
    let (status, body) = app
        .get_json(&format!(
            "/api/v1/repo/tree?project_id={id}&path=big/sub&cursor={cursor}"
        ))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // once the project synced another commit, an old cursor names nothing: 400
    let mut next = files.clone();
    next.push(("another.txt".to_owned(), 1));
    fast_import(
        &repo,
        &commit_stream(&[(1, b"same\n".to_vec())], &next, Some(&first), "next"),
    );
    synced(&app, &id).await;
    let (status, body) = app.get_json(&format!("{base}&cursor={cursor}")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|message| message.contains("another commit")),
        "{body}"
    );
    app.stop().await;
}

/// The 2,001 paths at one 300 KB blob gave 699 MB of JSON; 400 paths at one
/// 440 KB text are enough to pass every limit (and keep the tree small).
#[tokio::test]
async fn a_diff_of_many_large_files_stops_at_its_limits() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    let from = fast_import(
        &repo,
        &commit_stream(
            &[(1, b"seed\n".to_vec())],
            &[("seed.txt".to_owned(), 1)],
            None,
            "seed",
        ),
    );
    let text: Vec<u8> = (0..20_000)
        .flat_map(|n| format!("line {n:06} of a shared text\n").into_bytes())
        .collect();
    assert!(text.len() > 300_000);
    // and 60 copies of a 100 KB text, each patch under the cap, together over the
    // answer's byte cap
    let medium: Vec<u8> = (0..4_000)
        .flat_map(|n| format!("medium line {n:06} of text\n").into_bytes())
        .collect();
    let files: Vec<(String, u32)> = (0..400)
        .map(|n| (format!("copies/{n:04}.txt"), 2))
        .chain((0..60).map(|n| (format!("medium/{n:02}.txt"), 4)))
        .chain([("seed.txt".to_owned(), 1), ("small.txt".to_owned(), 3)])
        .collect();
    let to = fast_import(
        &repo,
        &commit_stream(
            &[
                (1, b"seed\n".to_vec()),
                (2, text),
                (3, b"a small file\n".to_vec()),
                (4, medium),
            ],
            &files,
            Some(&from),
            "fan out",
        ),
    );
    let id = app.register(&repo).await;
    synced(&app, &id).await;

    let response = app
        .get(
            &format!("/api/v1/repo/diff?project_id={id}&from={from}&to={to}"),
            &app.token,
        )
        .await;
    assert_eq!(response.status(), 200);
    let raw = response.bytes().await.expect("body");
    let limits = app.state.config.diff;
    assert!(
        raw.len() < limits.max_bytes + 512 * 1024,
        "the answer stays near HIVESYNC_DIFF_MAX_BYTES: {} bytes",
        raw.len()
    );
    let diff: Value = serde_json::from_slice(&raw).expect("json");
    let files = diff["files"].as_array().expect("files");
    assert!(files.len() <= limits.max_files, "within the file limit");
    assert_eq!(
        diff["truncated"], true,
        "past the byte cap, files are left out"
    );
    let copies: Vec<&Value> = files
        .iter()
        .filter(|f| f["path"].as_str().is_some_and(|p| p.starts_with("copies/")))
        .collect();
    assert_eq!(copies.len(), 400, "every copy is listed: {}", files.len());
    assert!(
        copies
            .iter()
            .all(|f| f["too_large"] == true && f["patch"].is_null()),
        "every 440 KB patch is over the patch cap, and not sent"
    );
    let medium_shown = files
        .iter()
        .filter(|f| f["path"].as_str().is_some_and(|p| p.starts_with("medium/")))
        .filter(|f| f["patch"].is_string())
        .count();
    assert!(
        (1..60).contains(&medium_shown),
        "patches under the cap are sent until the answer is full: {medium_shown}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_line_diff_out_of_time_is_marked_too_large_and_the_rest_is_shown() {
    let app = TestApp::spawn_with(|config| {
        config.diff.max_patch_bytes = 64 << 20;
        config.diff.max_bytes = 256 << 20;
        config.diff.max_lines = usize::MAX;
        config.diff.timeout = Duration::from_millis(1);
    })
    .await;
    let repo = GitRepo::new();
    let old: String = (0..50_000).map(|n| format!("old {n}\n")).collect();
    let new: String = (0..50_000).map(|n| format!("new {n}\n")).collect();
    repo.write("big.txt", &old);
    let from = repo.commit("old");
    repo.write("big.txt", &new);
    let to = repo.commit("new");
    let id = app.register(&repo).await;
    synced(&app, &id).await;
    let (status, diff) = app
        .get_json(&format!(
            "/api/v1/repo/diff?project_id={id}&from={from}&to={to}"
        ))
        .await;
    assert_eq!(status, 200, "{diff}");
    let file = &diff["files"][0];
    assert_eq!(file["path"], "big.txt");
    assert_eq!(file["too_large"], true, "{file}");
    assert!(file["patch"].is_null());
    app.stop().await;
}

#[tokio::test]
async fn one_users_reads_have_a_cap_and_another_users_reads_go_on() {
    let app = TestApp::spawn_with(|config| {
        config.reads_per_user = 1;
        // the slow read: a line diff allowed to run for seconds
        config.diff.max_patch_bytes = 64 << 20;
        config.diff.max_bytes = 256 << 20;
        config.diff.max_lines = usize::MAX;
        config.diff.timeout = Duration::from_secs(4);
    })
    .await;
    let repo = GitRepo::new();
    let old: String = (0..60_000).map(|n| format!("old {n}\n")).collect();
    let new: String = (0..60_000).map(|n| format!("new {n}\n")).collect();
    repo.write("big.txt", &old);
    let from = repo.commit("old");
    repo.write("big.txt", &new);
    let to = repo.commit("new");
    let alice = app.register(&repo).await;
    synced(&app, &alice).await;
    let bob_token = token("bob", ClientKind::Desktop);
    let bob = app.register_as(&bob_token, &repo).await;
    let response = app
        .post(
            "/api/v1/repo/sync",
            &bob_token,
            serde_json::json!({"project_id": bob}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let bob_tree = format!("/api/v1/repo/tree?project_id={bob}");
    let readable = wait_until(WAIT, || async {
        (app.get(&bob_tree, &bob_token).await.status() == 200).then_some(())
    })
    .await;
    assert!(readable.is_some(), "bob's project synced");

    let slow = {
        let (http, url, token) = (
            app.http.clone(),
            format!(
                "{}/api/v1/repo/diff?project_id={alice}&from={from}&to={to}",
                app.base
            ),
            app.token.clone(),
        );
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16()
        })
    };
    let running = wait_until(WAIT, || async {
        (app.state.reads.running() == 1).then_some(())
    })
    .await;
    assert!(running.is_some(), "the diff holds alice's one place");
    let mut refused = None;
    let mut bob_served = 0;
    while !slow.is_finished() {
        let response = app
            .get(&format!("/api/v1/repo/tree?project_id={alice}"), &app.token)
            .await;
        if response.status() == 429 {
            let retry = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let body: Value = response.json().await.expect("json");
            refused = Some((retry, body));
            let status = app.get(&bob_tree, &bob_token).await.status();
            assert_eq!(status, 200, "bob's reads are not alice's to spend");
            bob_served += 1;
            if bob_served >= 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (retry, body) = refused.expect("alice's second read while her diff ran was refused");
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(retry.is_some(), "with Retry-After");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("HIVESYNC_READS_PER_USER")),
        "{body}"
    );
    assert_eq!(slow.await.expect("joined"), 200);
    // her place is back once the diff ended
    let (status, _) = app
        .get_json(&format!("/api/v1/repo/tree?project_id={alice}"))
        .await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// A body of `chunks` pieces of 64 KiB, one every `every`; `then_hang` keeps the
/// stream open after them, as a sender that never finishes would.
fn trickle(chunks: usize, every: Duration, then_hang: bool) -> reqwest::Body {
    let stream = futures_util::stream::unfold(0usize, move |sent| async move {
        if sent == chunks {
            if then_hang {
                std::future::pending::<()>().await;
            }
            return None;
        }
        tokio::time::sleep(every).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 64 * 1024])),
            sent + 1,
        ))
    });
    reqwest::Body::wrap_stream(stream)
}

async fn deliver_body(
    app: &TestApp,
    id: &str,
    signature: &str,
    body: reqwest::Body,
) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/webhooks/{id}", app.base))
        .header("x-hub-signature-256", signature)
        .header("x-github-event", "push")
        .body(body)
        .send()
        .await
        .expect("sent")
}

#[tokio::test]
async fn a_malformed_signature_is_refused_before_the_body_is_read() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a\n").commit("one");
    let id = app.register(&repo).await;
    crate::freshness::enable_webhook(&app, &id).await;
    // the body never ends: only a refusal that does not wait for it can answer
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        deliver_body(
            &app,
            &id,
            "sha256=not-hex",
            trickle(1, Duration::ZERO, true),
        ),
    )
    .await
    .expect("answered without the body");
    assert_eq!(response.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn wrong_signatures_are_rate_limited_per_project_and_per_peer() {
    let app = TestApp::spawn_with(|config| {
        config.webhook_failures = (5, Duration::from_secs(3600));
    })
    .await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a\n").commit("one");
    let id = app.register(&repo).await;
    let other = app.register(&repo).await;
    crate::freshness::enable_webhook(&app, &id).await;
    let other_secret = crate::freshness::enable_webhook(&app, &other).await;
    let body = crate::freshness::push_body("refs/heads/main");
    let wrong = crate::freshness::github_signature("not the secret", body.as_bytes());
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let (status, _) = crate::freshness::deliver(
            &app,
            &id,
            &[
                ("x-hub-signature-256", wrong.clone()),
                ("x-github-event", "push".into()),
            ],
            &body,
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert_eq!(statuses[5..], [429; 7], "{statuses:?}");
    // the peer is closed too (the tests' peer is 127.0.0.1 for every delivery): even
    // a correct delivery to another project from it waits
    let right = crate::freshness::github_signature(&other_secret, body.as_bytes());
    let response = app
        .http
        .post(format!("{}/api/v1/webhooks/{other}", app.base))
        .header("x-hub-signature-256", right)
        .header("x-github-event", "push")
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some());
    app.stop().await;
}

#[tokio::test]
async fn deliveries_being_read_are_bounded_per_project() {
    let app = TestApp::spawn_with(|config| {
        config.webhook_per_project = 2;
        config.webhook_failures = (1000, Duration::from_secs(60));
    })
    .await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a\n").commit("one");
    let id = app.register(&repo).await;
    crate::freshness::enable_webhook(&app, &id).await;
    let wrong = crate::freshness::github_signature("not the secret", b"x");
    // two slow senders hold the project's two places...
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (http, url, wrong) = (
                app.http.clone(),
                format!("{}/api/v1/webhooks/{id}", app.base),
                wrong.clone(),
            );
            tokio::spawn(async move {
                http.post(url)
                    .header("x-hub-signature-256", wrong)
                    .body(trickle(4, Duration::from_millis(500), false))
                    .send()
                    .await
                    .expect("sent")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let held = wait_until(WAIT, || async {
        let response = deliver_body(&app, &id, &wrong, reqwest::Body::from("{}")).await;
        (response.status() == 429).then_some(())
    })
    .await;
    assert!(
        held.is_some(),
        "a third delivery while two are read is refused"
    );
    for task in slow {
        assert_eq!(task.await.expect("joined"), 401, "read whole, then refused");
    }
    app.stop().await;
}

/// The hub's resident memory, from `/proc/PID/status`, in bytes.
fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The ceiling the README states for a hub under every hostile read of #30 at once.
const RSS_CEILING: u64 = 320 << 20;

/// Every hostile read of the issue at once — large-file reads, a fan-out diff, a
/// 50,000-line rewrite, pages of a wide directory, searches, clients that hang up,
/// and a hundred 5 MiB webhook bodies with wrong signatures — against a `hivesync
/// serve` of its own, while another user's reads keep being answered. The hub's
/// memory, sampled all along, stays under [`RSS_CEILING`].
#[tokio::test]
async fn every_hostile_read_at_once_leaves_another_user_served_and_memory_bounded() {
    let data = tempfile::tempdir().expect("data dir");
    let (mut hub, addr) = crate::lifecycle::serve_binary(
        data.path(),
        &[
            ("HIVESYNC_ALLOWED_SCHEMES", "file,https"),
            ("HIVESYNC_ALLOW_PRIVATE_HOSTS", "1"),
            ("HIVESYNC_SYNC_RATE", "1000/min"),
        ],
    )
    .await;
    let base = format!("http://{addr}");
    let http = hivesync::tls::http_client();
    let alice = token("alice", ClientKind::Desktop);
    let bob = token("bob", ClientKind::Desktop);

    // alice's repository: a 48 MiB file, a directory of 20,000 entries, a 50,000-line
    // file rewritten line by line, and 2,001 copies of one 40 KB text
    let hostile = GitRepo::new();
    let big: Vec<u8> = (0..(48usize << 20) / 32)
        .flat_map(|n| format!("{n:031}\n").into_bytes())
        .collect();
    let old: Vec<u8> = (0..50_000)
        .flat_map(|n| format!("old {n}\n").into_bytes())
        .collect();
    let new: Vec<u8> = (0..50_000)
        .flat_map(|n| format!("new {n}\n").into_bytes())
        .collect();
    let copy: Vec<u8> = (0..2_000)
        .flat_map(|n| format!("copy line {n:09}\n").into_bytes())
        .collect();
    let wide: Vec<(String, u32)> = (0..20_000).map(|n| (format!("wide/e{n:05}"), 1)).collect();
    let mut first_files = wide.clone();
    first_files.extend([("big.txt".to_owned(), 2), ("lines.txt".to_owned(), 3)]);
    let from = fast_import(
        &hostile,
        &commit_stream(
            &[(1, b"x\n".to_vec()), (2, big), (3, old)],
            &first_files,
            None,
            "from",
        ),
    );
    let big_blob = hostile.git(&["rev-parse", &format!("{from}:big.txt")]);
    let mut second_files = wide.clone();
    second_files.push(("lines.txt".to_owned(), 4));
    second_files.extend((0..2_001).map(|n| (format!("copies/{n:04}.txt"), 5)));
    let mut second = commit_stream(
        &[(1, b"x\n".to_vec()), (4, new), (5, copy)],
        &second_files,
        Some(&from),
        "to",
    );
    // the 48 MiB file stays as it was, by its id
    second.extend_from_slice(format!("M 100644 {big_blob} big.txt\n").as_bytes());
    let to = fast_import(&hostile, &second);
    assert_eq!(
        hostile.git(&["rev-parse", &format!("{to}:big.txt")]),
        big_blob,
        "big.txt is unchanged between the commits"
    );
    let quiet = GitRepo::new();
    quiet
        .write("README.md", "bob's\n")
        .write("src/lib.rs", "pub fn x() {}\n");
    quiet.commit("quiet");

    let register = |token: &str, repo: &GitRepo| {
        let (http, base, token, url) = (http.clone(), base.clone(), token.to_owned(), repo.url());
        async move {
            let response = http
                .post(format!("{base}/api/v1/projects"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"name": "p", "repo_url": url}))
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), 201);
            let body: Value = response.json().await.expect("json");
            let id = body["project_id"].as_str().expect("id").to_owned();
            let response = http
                .post(format!("{base}/api/v1/repo/sync"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"project_id": id}))
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), 202);
            let synced = wait_until(Duration::from_secs(120), || {
                let (http, base, token, id) =
                    (http.clone(), base.clone(), token.clone(), id.clone());
                async move {
                    let project: Value = http
                        .get(format!("{base}/api/v1/projects/{id}"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    project["commit"].is_string().then_some(())
                }
            })
            .await;
            assert!(synced.is_some(), "{url} synced");
            id
        }
    };
    let target = register(&alice, &hostile).await;
    let calm = register(&bob, &quiet).await;
    let response = http
        .post(format!("{base}/api/v1/projects/{target}/webhook"))
        .bearer_auth(&alice)
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);

    let pid = hub.id();
    let baseline = rss_of(pid).expect("the hub's memory");
    let stop = tokio_util::sync::CancellationToken::new();
    let peak = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.is_cancelled() {
                peak = peak.max(rss_of(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            peak
        })
    };

    // the attack: each kind of request from many tasks at once, for a while
    let mut attackers = Vec::new();
    let hostile_gets = [
        (
            16,
            format!("/api/v1/repo/file?project_id={target}&path=big.txt"),
            None,
        ),
        (
            4,
            format!("/api/v1/repo/diff?project_id={target}&from={from}&to={to}"),
            None,
        ),
        (
            4,
            format!("/api/v1/repo/diff?project_id={target}&from={from}&to={to}"),
            Some(Duration::from_millis(300)),
        ),
        (
            4,
            format!("/api/v1/repo/tree?project_id={target}&path=wide&limit=10000"),
            None,
        ),
        (
            2,
            format!(
                "/api/v1/repo/search?project_id={target}&q=%5B0-9%5D%2B9%24&regex=true&limit=1000"
            ),
            None,
        ),
    ];
    for (tasks, path, hang_up) in hostile_gets {
        for _ in 0..tasks {
            let (http, url, alice, stop) = (
                http.clone(),
                format!("{base}{path}"),
                alice.clone(),
                stop.clone(),
            );
            attackers.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.is_cancelled() {
                    let request = http.get(&url).bearer_auth(&alice);
                    let request = match hang_up {
                        Some(after) => request.timeout(after),
                        None => request,
                    };
                    match request.send().await {
                        Ok(response) => {
                            statuses.push(response.status().as_u16());
                            // read the answer as a client would, then drop it
                            let _ = response.bytes().await;
                        }
                        Err(err) => assert!(hang_up.is_some(), "{url}: {err}"),
                    }
                }
                statuses
            }));
        }
    }
    let webhooks: Vec<_> = (0..100)
        .map(|_| {
            let (http, url) = (http.clone(), format!("{base}/api/v1/webhooks/{target}"));
            tokio::spawn(async move {
                let wrong = crate::freshness::github_signature("wrong", b"x");
                let response = http
                    .post(url)
                    .header("x-hub-signature-256", wrong)
                    .header("x-github-event", "push")
                    .body(vec![b' '; 5 << 20])
                    .send()
                    .await;
                response.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        })
        .collect();

    // bob reads throughout, and is answered every time
    let mut bob_reads = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        for path in [
            format!("/api/v1/repo/tree?project_id={calm}"),
            format!("/api/v1/repo/file?project_id={calm}&path=README.md"),
        ] {
            let response = tokio::time::timeout(
                Duration::from_secs(10),
                http.get(format!("{base}{path}")).bearer_auth(&bob).send(),
            )
            .await
            .expect("bob is answered within 10 s")
            .expect("sent");
            assert_eq!(response.status(), 200, "{path}");
            bob_reads += 1;
        }
    }
    stop.cancel();
    let mut statuses = Vec::new();
    for attacker in attackers {
        statuses.extend(attacker.await.expect("joined"));
    }
    for webhook in webhooks {
        statuses.push(webhook.await.expect("joined"));
    }
    let peak = peak.await.expect("joined");
    terminate(&mut hub);

    assert!(bob_reads >= 10, "bob read {bob_reads} times");
    let refused = statuses.iter().filter(|status| **status == 429).count();
    assert!(refused > 0, "alice was held to her share");
    assert!(
        statuses
            .iter()
            .all(|status| matches!(status, 0 | 200 | 401 | 429)),
        "nothing failed for want of memory or time: {statuses:?}"
    );
    eprintln!(
        "hub memory: {} MiB before the attack, peak {} MiB during it; bob read {bob_reads} times",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak < RSS_CEILING,
        "the hub peaked at {} MiB (ceiling {} MiB)",
        peak >> 20,
        RSS_CEILING >> 20
    );
}

/// Files over 4 MiB are written by streaming them out of the object database, not by
/// gix's checkout (which holds each blob whole): the mirror is exactly the branch
/// still, executable bits included, through a first sync, a sync that reuses them and
/// one that changes them.
#[tokio::test]
async fn large_files_are_checked_out_streaming_and_exactly() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    let big: String = (0..(12usize << 20) / 16)
        .map(|n| format!("{n:015}\n"))
        .collect();
    let tool: String = (0..(5usize << 20) / 16)
        .map(|n| format!("#{n:014}\n"))
        .collect();
    repo.write("data/big.txt", &big)
        .write("bin/tool.sh", &tool)
        .write("small.txt", "small\n");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            repo.path().join("bin/tool.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
    }
    let first = repo.commit("large files");
    assert!(
        repo.git(&["ls-files", "-s", "bin/tool.sh"])
            .starts_with("100755"),
        "the tool is executable in the commit"
    );
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    crate::helpers::assert_exact_worktree(&app.worktree(&id), &repo, &first);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(app.worktree(&id).join("bin/tool.sh"))
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "executable: {mode:o}");
    }
    let (status, file) = app
        .get_json(&format!(
            "/api/v1/repo/file?project_id={id}&path=data/big.txt"
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(file["size"], big.len());
    assert_eq!(file["truncated"], true);
    assert_eq!(file["content"].as_str().map(str::len), Some(1 << 20));
    assert!(big.starts_with(file["content"].as_str().expect("content")));

    repo.write("small.txt", "changed\n");
    let second = repo.commit("small change");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    crate::helpers::assert_exact_worktree(&app.worktree(&id), &repo, &second);

    let bigger = format!("{big}one more line\n");
    repo.write("data/big.txt", &bigger);
    let third = repo.commit("big change");
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    crate::helpers::assert_exact_worktree(&app.worktree(&id), &repo, &third);
    app.stop().await;
}
