//! The `reads` scenario: a real source tree as a repository, synced by the hub and read
//! back, each figure next to git doing the same work on the same machine in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::start_hub;

pub(crate) fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=loadtest",
            "-c",
            "user.email=loadtest@example.com",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .map_err(|e| format!("git: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Sends a request to the hub and reads its JSON answer.
pub(crate) async fn json_of(request: reqwest::RequestBuilder) -> Result<Value, String> {
    let response = request.send().await.map_err(|e| e.to_string())?;
    response.json().await.map_err(|e| e.to_string())
}

/// Requests a sync of `project` and polls it until it completes (an error if it fails).
pub(crate) async fn sync_and_wait(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    project: &str,
) -> Result<(), String> {
    let accepted = json_of(
        http.post(format!("{base}/api/v1/repo/sync"))
            .bearer_auth(token)
            .json(&json!({"project_id": project})),
    )
    .await?;
    let sync_id = accepted["sync_id"]
        .as_str()
        .ok_or("sync not accepted")?
        .to_owned();
    loop {
        let record = json_of(
            http.get(format!("{base}/api/v1/repo/sync/{sync_id}"))
                .bearer_auth(token),
        )
        .await?;
        match record["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") => return Err(format!("sync failed: {record}")),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The files a benchmark repository is made of: `paths` under `root`.
pub(crate) struct Source {
    root: PathBuf,
    paths: Vec<String>,
    /// how the README and the JSON name it
    pub(crate) described: String,
}

impl Source {
    /// Every file under `dir`.
    pub(crate) fn dir(dir: PathBuf) -> Self {
        Self {
            described: dir.display().to_string(),
            root: dir,
            paths: vec![".".to_owned()],
        }
    }
}

/// The sources of the crates this workspace's `Cargo.lock` names, as cargo unpacked
/// them when it built the project: the same files on every machine that built the
/// same commit for the same platform (crates for other platforms are not unpacked).
pub(crate) fn default_source() -> Result<Source, String> {
    const LOCKFILE: &str = include_str!("../../Cargo.lock");
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map_err(|_| "set --source")?;
    let registry = home.join("registry").join("src");
    let indexes: Vec<PathBuf> = std::fs::read_dir(&registry)
        .map_err(|e| {
            format!(
                "{}: {e}; build the project first, or pass --source",
                registry.display()
            )
        })?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    let mut locked = Vec::new();
    let (mut name, mut version) = (None, None);
    for line in LOCKFILE.lines() {
        let value = |line: &str, key: &str| {
            line.strip_prefix(key)
                .map(|rest| rest.trim_matches(|c| c == '"' || c == ' ').to_owned())
        };
        if line == "[[package]]" {
            (name, version) = (None, None);
        } else if let Some(v) = value(line, "name = ") {
            name = Some(v);
        } else if let Some(v) = value(line, "version = ") {
            version = Some(v);
        } else if line.starts_with("source = \"registry+")
            && let (Some(name), Some(version)) = (&name, &version)
        {
            locked.push(format!("{name}-{version}"));
        }
    }
    // the index directory holding most of them (one per registry URL)
    let (root, paths) = indexes
        .into_iter()
        .map(|index| {
            let present: Vec<String> = locked
                .iter()
                .filter(|krate| index.join(krate).is_dir())
                .cloned()
                .collect();
            (index, present)
        })
        .max_by_key(|(_, present)| present.len())
        .filter(|(_, present)| !present.is_empty())
        .ok_or(
            "none of Cargo.lock's crates are unpacked; run `cargo build` first, or pass --source",
        )?;
    let described = format!(
        "the sources of the {} crates of Cargo.lock unpacked in {}",
        paths.len(),
        root.display()
    );
    Ok(Source {
        root,
        paths,
        described,
    })
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Commits every file of `source` into a packed bare repository `work/origin.git`
/// (as a real remote serves it); returns its `file://` URL, the commit and the file count.
/// A benchmark repository: its URL, head commit, root tree (the same for the same
/// files, wherever it was built) and file count.
pub(crate) struct Origin {
    pub(crate) url: String,
    pub(crate) commit: String,
    pub(crate) tree: String,
    pub(crate) files: usize,
}

pub(crate) fn build_origin(work: &Path, source: &Source) -> Result<Origin, String> {
    let origin = work.join("origin.git");
    eprintln!("building a repository from {}", source.described);
    git(work, &["init", "-q", "--bare", "-b", "main", "origin.git"])?;
    let worktree = source.root.to_string_lossy().into_owned();
    let git_dir = origin.to_string_lossy().into_owned();
    // git on the origin's objects, with `source` as its work tree
    let in_origin = |args: &[&str]| {
        let mut full = vec!["--git-dir", &git_dir, "--work-tree", &worktree];
        full.extend_from_slice(args);
        git(work, &full)
    };
    let mut add = vec!["add", "-A", "-f", "--"];
    add.extend(source.paths.iter().map(String::as_str));
    in_origin(&add)?;
    in_origin(&["commit", "-q", "-m", "snapshot"])?;
    // a real remote serves packed objects
    in_origin(&["repack", "-adq"])?;
    let commit = in_origin(&["rev-parse", "HEAD"])?;
    let tree = in_origin(&["rev-parse", "HEAD^{tree}"])?;
    let files = in_origin(&["ls-tree", "-r", "--name-only", "HEAD"])?
        .lines()
        .count();
    let url = format!("file://{}", origin.display());
    eprintln!("{files} files, tree {tree}");
    Ok(Origin {
        url,
        commit,
        tree,
        files,
    })
}

pub async fn run(
    hub_binary: &PathBuf,
    source: Option<PathBuf>,
    concurrency: usize,
    seconds: u64,
) -> Result<Value, String> {
    let source = match source {
        Some(source) => Source::dir(source),
        None => default_source()?,
    };
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let origin = build_origin(work.path(), &source)?;
    let (url, commit, files) = (origin.url.clone(), origin.commit.clone(), origin.files);
    // peer: git clone of the same repository (objects and checkout)
    let started = Instant::now();
    git(work.path(), &["clone", "-q", &url, "peer-clone"])?;
    let git_clone_s = started.elapsed().as_secs_f64();

    let mut hub = start_hub(hub_binary).await?;
    let base = format!("http://{}", hub.addr);
    let token = crate::loadtest_token()?;
    let http = hivesync::tls::http_client();
    let created = json_of(
        http.post(format!("{base}/api/v1/projects"))
            .bearer_auth(&token)
            .json(&json!({"name": "bench", "repo_url": url})),
    )
    .await?;
    let project = created["project_id"]
        .as_str()
        .ok_or(format!("register failed: {created}"))?
        .to_owned();

    let started = Instant::now();
    sync_and_wait(&http, &base, &token, &project).await?;
    let hub_sync_s = started.elapsed().as_secs_f64();
    eprintln!("synced {files} files: hub {hub_sync_s:.2} s, git clone {git_clone_s:.2} s");

    // search vs git grep over the same commit's objects
    let peer = work.path().join("peer-clone");
    // rare enough that neither side stops early at the hub's 1000-match cap
    let patterns = [
        "unsafe impl Send",
        "#[deprecated",
        "todo!(",
        "unreachable_unchecked",
        "PhantomPinned",
    ];
    let mut search_rows = Vec::new();
    for pattern in patterns {
        let mut hub_times = Vec::new();
        let mut git_times = Vec::new();
        let mut hub_hits = 0;
        let mut git_hits = 0;
        // one warm-up of each (discarded), then five rounds alternating which goes first
        for round in 0..6 {
            let hub_first = round % 2 == 0;
            for side in [hub_first, !hub_first] {
                let started = Instant::now();
                if side {
                    let found = json_of(
                        http.get(format!("{base}/api/v1/repo/search"))
                            .query(&[
                                ("project_id", project.as_str()),
                                ("q", pattern),
                                ("limit", "1000"),
                            ])
                            .bearer_auth(&token),
                    )
                    .await?;
                    if round > 0 {
                        hub_times.push(started.elapsed().as_secs_f64());
                    }
                    hub_hits = found["matches"].as_array().map_or(0, Vec::len);
                } else {
                    let output = Command::new("git")
                        .args(["grep", "-n", "-I", "-F", "-e", pattern, &commit])
                        .current_dir(&peer)
                        .output()
                        .map_err(|e| e.to_string())?;
                    if round > 0 {
                        git_times.push(started.elapsed().as_secs_f64());
                    }
                    git_hits = output
                        .stdout
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .count();
                }
            }
        }
        let (hub_median, git_median) = (median(hub_times), median(git_times));
        search_rows.push(json!({
            "pattern": pattern, "hub_ms": hub_median * 1000.0, "git_grep_ms": git_median * 1000.0,
            "ratio": hub_median / git_median, "hub_matches": hub_hits, "git_matches": git_hits,
        }));
    }

    // tree and file latency under concurrent readers, over a spread of 512 paths
    // picked across the whole tree (a fixed-seed shuffle, the same every run)
    let all_files: Vec<String> = git(&peer, &["ls-files"])?
        .lines()
        .map(str::to_owned)
        .collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let sample: Vec<(String, String)> = (0..512)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let file = all_files[(state >> 33) as usize % all_files.len().max(1)].clone();
            let dir = Path::new(&file)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            (file, dir)
        })
        .collect();
    let sample = std::sync::Arc::new(sample);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let readers = (0..concurrency).map(|index| {
        let (http, base, token, project) =
            (http.clone(), base.clone(), token.clone(), project.clone());
        let sample = std::sync::Arc::clone(&sample);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut round = index;
            while Instant::now() < deadline {
                let (file, dir) = &sample[(round / 2) % sample.len()];
                let (endpoint, path) = if round % 2 == 0 {
                    ("tree", dir.as_str())
                } else {
                    ("file", file.as_str())
                };
                round += 1;
                let started = Instant::now();
                let response = http
                    .get(format!("{base}/api/v1/repo/{endpoint}"))
                    .query(&[("project_id", project.as_str()), ("path", path)])
                    .bearer_auth(&token)
                    .send()
                    .await;
                if let Ok(response) = response
                    && response.status().is_success()
                    && response.bytes().await.is_ok()
                {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        })
    });
    let mut latencies = Vec::new();
    for reader in futures_util::future::join_all(readers).await {
        latencies.extend(reader.map_err(|e| e.to_string())?);
    }
    latencies.sort_by(f64::total_cmp);
    let _ = hub.child.kill().await;
    if latencies.is_empty() {
        return Err("no successful tree/file reads".into());
    }
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let rps = latencies.len() as f64 / seconds as f64;

    println!();
    println!(
        "repository: {files} files from {} (commit {})",
        source.described,
        &commit[..12]
    );
    println!("| measure | hub | git peer | hub / git |");
    println!("|---|---|---|---|");
    println!(
        "| first sync vs `git clone` | {hub_sync_s:.2} s | {git_clone_s:.2} s | {:.2} |",
        hub_sync_s / git_clone_s
    );
    for row in &search_rows {
        println!(
            "| search `{}` ({} matches) vs `git grep` ({}) | {:.1} ms | {:.1} ms | {:.2} |",
            row["pattern"].as_str().unwrap_or_default(),
            row["hub_matches"],
            row["git_matches"],
            row["hub_ms"].as_f64().unwrap_or_default(),
            row["git_grep_ms"].as_f64().unwrap_or_default(),
            row["ratio"].as_f64().unwrap_or_default()
        );
    }
    println!(
        "| tree/file over 512 paths, {concurrency} concurrent readers, {seconds} s | p50 {p50:.2} ms, p99 {p99:.2} ms, {rps:.0} req/s | | |"
    );
    Ok(json!({
        "scenario": "reads", "source": source.described, "tree": origin.tree, "files": files, "commit": commit,
        "first_sync_s": hub_sync_s, "git_clone_s": git_clone_s,
        "search": search_rows,
        "tree_file": {"concurrency": concurrency, "requests": latencies.len(), "p50_ms": p50, "p99_ms": p99, "rps": rps},
    }))
}
