//! The `syncs` scenario: what a sync costs next to git doing the same work in the same
//! run — first sync vs `git clone`, a no-op sync vs a no-op `git fetch`, an incremental
//! sync vs `git fetch` + `git reset --hard` — then many small projects synced at once
//! (throughput per worker, vs the same clones run with the same parallelism), and
//! `GET /api/v1/repo/sync/{id}` requests per second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::reads::{build_origin, default_source, git, json_of, median, percentile};

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn register(&self, url: &str) -> Result<String, String> {
        let created = json_of(
            self.http
                .post(format!("{}/api/v1/projects", self.base))
                .bearer_auth(&self.token)
                .json(&json!({"name": "bench", "repo_url": url})),
        )
        .await?;
        created["project_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("register failed: {created}"))
    }

    async fn request(&self, project: &str) -> Result<String, String> {
        let accepted = json_of(
            self.http
                .post(format!("{}/api/v1/repo/sync", self.base))
                .bearer_auth(&self.token)
                .json(&json!({"project_id": project})),
        )
        .await?;
        accepted["sync_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("sync not accepted: {accepted}"))
    }

    async fn wait(&self, sync_id: &str) -> Result<Value, String> {
        loop {
            let record = json_of(
                self.http
                    .get(format!("{}/api/v1/repo/sync/{sync_id}", self.base))
                    .bearer_auth(&self.token),
            )
            .await?;
            match record["status"].as_str() {
                Some("completed") => return Ok(record),
                Some("failed") => return Err(format!("sync failed: {record}")),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Requests a sync and waits for it: seconds from request to completion.
    async fn sync(&self, project: &str) -> Result<f64, String> {
        let started = Instant::now();
        let sync_id = self.request(project).await?;
        self.wait(&sync_id).await?;
        Ok(started.elapsed().as_secs_f64())
    }
}

fn timed(run: impl FnOnce() -> Result<String, String>) -> Result<f64, String> {
    let started = Instant::now();
    run()?;
    Ok(started.elapsed().as_secs_f64())
}

/// A small repository: `files` text files of a few hundred bytes.
fn small_repo(dir: &Path, files: usize) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    git(dir, &["init", "-q", "-b", "main"])?;
    for i in 0..files {
        let path = dir.join(format!("src/module_{:02}/file_{i}.rs", i % 8));
        std::fs::create_dir_all(path.parent().ok_or("parent")?).map_err(|e| e.to_string())?;
        std::fs::write(
            &path,
            format!("// file {i}\npub fn f{i}() -> usize {{ {i} }}\n").repeat(8),
        )
        .map_err(|e| e.to_string())?;
    }
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", "small"])?;
    Ok(format!("file://{}", dir.display()))
}

pub struct Options {
    pub source: Option<PathBuf>,
    pub projects: usize,
    pub workers: usize,
    pub concurrency: usize,
    pub seconds: u64,
}

pub async fn run(hub_binary: &PathBuf, options: Options) -> Result<Value, String> {
    let source = match options.source {
        Some(source) => source,
        None => default_source()?,
    };
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (url, _, files) = build_origin(work.path(), &source)?;
    let origin = work.path().join("origin.git");
    let hub = crate::start_hub_with(
        hub_binary,
        &[("HIVESYNC_SERVE_WORKERS", options.workers.to_string())],
    )
    .await?;
    let api = Api {
        http: hivesync::tls::http_client(),
        base: format!("http://{}", hub.addr),
        token: crate::loadtest_token()?,
    };

    // first sync vs git clone
    eprintln!("first sync of {files} files vs git clone");
    let git_clone_s = timed(|| git(work.path(), &["clone", "-q", &url, "peer"]))?;
    let project = api.register(&url).await?;
    let first_s = api.sync(&project).await?;
    let peer = work.path().join("peer");

    // no-op: nothing changed upstream
    eprintln!("no-op syncs vs no-op git fetch");
    let mut noop_hub = Vec::new();
    let mut noop_git = Vec::new();
    for _ in 0..5 {
        noop_git.push(timed(|| git(&peer, &["fetch", "-q", "origin"]))?);
        noop_hub.push(api.sync(&project).await?);
    }

    // incremental: 20 files change upstream
    eprintln!("incremental syncs vs git fetch + reset --hard");
    let editor = work.path().join("editor");
    git(work.path(), &["clone", "-q", &url, "editor"])?;
    let listing = git(&editor, &["ls-files"])?;
    let targets: Vec<String> = listing
        .lines()
        .filter(|path| path.ends_with(".rs"))
        .step_by(97)
        .take(20)
        .map(str::to_owned)
        .collect();
    let mut incremental_hub = Vec::new();
    let mut incremental_git = Vec::new();
    for round in 0..3 {
        for path in &targets {
            let full = editor.join(path);
            let mut text = std::fs::read_to_string(&full).unwrap_or_default();
            text.push_str(&format!("\n// loadtest round {round}\n"));
            std::fs::write(&full, text).map_err(|e| e.to_string())?;
        }
        git(&editor, &["commit", "-q", "-am", &format!("round {round}")])?;
        git(&editor, &["push", "-q", "origin", "main"])?;
        incremental_git.push(timed(|| {
            git(&peer, &["fetch", "-q", "origin"])?;
            git(&peer, &["reset", "-q", "--hard", "origin/main"])
        })?);
        incremental_hub.push(api.sync(&project).await?);
    }
    drop(origin);

    // many small projects at once
    eprintln!(
        "{} small projects synced at once by {} workers vs the same clones, {} at a time",
        options.projects, options.workers, options.workers
    );
    let smalls = work.path().join("smalls");
    let mut small_urls = Vec::new();
    for i in 0..options.projects {
        small_urls.push(small_repo(&smalls.join(format!("repo{i}")), 60)?);
    }
    let mut small_projects = Vec::new();
    for url in &small_urls {
        small_projects.push(api.register(url).await?);
    }
    let started = Instant::now();
    let mut sync_ids = Vec::new();
    for project in &small_projects {
        sync_ids.push(api.request(project).await?);
    }
    for sync_id in &sync_ids {
        api.wait(sync_id).await?;
    }
    let many_hub_s = started.elapsed().as_secs_f64();
    let clones = work.path().join("clones");
    std::fs::create_dir_all(&clones).map_err(|e| e.to_string())?;
    let started = Instant::now();
    for chunk in small_urls.chunks(options.workers.max(1)).enumerate() {
        let (c, urls) = chunk;
        let handles: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let url = url.clone();
                let clones = clones.clone();
                std::thread::spawn(move || {
                    git(&clones, &["clone", "-q", &url, &format!("c{c}-{i}")])
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| "clone thread")??;
        }
    }
    let many_git_s = started.elapsed().as_secs_f64();

    // GET /api/v1/repo/sync/{id} under concurrent pollers
    eprintln!(
        "GET /api/v1/repo/sync/{{id}}: {} pollers for {} s",
        options.concurrency, options.seconds
    );
    let sync_id = Arc::new(sync_ids.first().cloned().ok_or("no sync")?);
    let stop = Arc::new(AtomicBool::new(false));
    let api = Arc::new(api);
    let pollers: Vec<_> = (0..options.concurrency)
        .map(|_| {
            let api = Arc::clone(&api);
            let stop = Arc::clone(&stop);
            let sync_id = Arc::clone(&sync_id);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let url = format!("{}/api/v1/repo/sync/{sync_id}", api.base);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let response = api.http.get(&url).bearer_auth(&api.token).send().await;
                    if let Ok(response) = response
                        && response.status() == 200
                        && response.bytes().await.is_ok()
                    {
                        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for poller in pollers {
        latencies.extend(poller.await.map_err(|e| e.to_string())?);
    }
    latencies.sort_by(f64::total_cmp);
    let polls_per_s = latencies.len() as f64 / options.seconds as f64;
    let (p50, p99) = if latencies.is_empty() {
        (0.0, 0.0)
    } else {
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
    };
    drop(hub);

    let first_ratio = first_s / git_clone_s;
    let noop = (median(noop_hub), median(noop_git));
    let incremental = (median(incremental_hub), median(incremental_git));
    let per_worker = options.projects as f64 / many_hub_s / options.workers as f64;
    println!();
    println!("| measure | hub | peer | hub / peer |");
    println!("|---|---|---|---|");
    println!(
        "| first sync vs `git clone` ({files} files) | {first_s:.2} s | {git_clone_s:.2} s | {first_ratio:.2} |"
    );
    println!(
        "| no-op sync vs no-op `git fetch` (median of 5) | {:.1} ms | {:.1} ms | {:.2} |",
        noop.0 * 1000.0,
        noop.1 * 1000.0,
        noop.0 / noop.1
    );
    println!(
        "| 20 changed files: sync vs `git fetch` + `git reset --hard` (median of 3) | {:.2} s | {:.2} s | {:.2} |",
        incremental.0,
        incremental.1,
        incremental.0 / incremental.1
    );
    println!(
        "| {} small projects, {} workers, vs `git clone` {} at a time | {:.2} s ({:.1} syncs/s per worker) | {:.2} s | {:.2} |",
        options.projects,
        options.workers,
        options.workers,
        many_hub_s,
        per_worker,
        many_git_s,
        many_hub_s / many_git_s
    );
    println!(
        "| `GET /api/v1/repo/sync/{{id}}`, {} pollers | {polls_per_s:.0} req/s, p50 {p50:.2} ms, p99 {p99:.2} ms | — | — |",
        options.concurrency
    );
    Ok(json!({
        "scenario": "syncs",
        "files": files,
        "first_sync_s": first_s,
        "git_clone_s": git_clone_s,
        "noop_sync_s": noop.0,
        "noop_git_fetch_s": noop.1,
        "incremental_sync_s": incremental.0,
        "incremental_git_s": incremental.1,
        "small_projects": options.projects,
        "workers": options.workers,
        "small_projects_hub_s": many_hub_s,
        "small_projects_git_clone_s": many_git_s,
        "syncs_per_s_per_worker": per_worker,
        "sync_status_polls_per_s": polls_per_s,
        "sync_status_p50_ms": p50,
        "sync_status_p99_ms": p99,
    }))
}
