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

use crate::reads::{Source, build_origin, default_source, git, json_of, median, percentile};

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) token: String,
    /// the user's live events: a sync's end is timed by its `completed` event, not
    /// by polling (which would add up to a polling interval to every figure)
    pub(crate) events: tokio::sync::Mutex<hivesync::client::EventStream>,
}

impl Api {
    /// A client of the hub at `base` with `token`, its event stream open.
    pub(crate) async fn connect(base: String, token: String) -> Result<Self, String> {
        let events = hivesync::client::Client::new(&base, &token)
            .map_err(|e| e.to_string())?
            .events(&[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http: hivesync::tls::http_client(),
            base,
            token,
            events: tokio::sync::Mutex::new(events),
        })
    }

    pub(crate) async fn register(&self, url: &str) -> Result<String, String> {
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

    pub(crate) async fn request(&self, project: &str) -> Result<String, String> {
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

    /// Waits for the terminal stage event of every sync in `ids`.
    pub(crate) async fn ended(&self, ids: &[String]) -> Result<(), String> {
        use hivesync::client::Next;
        use hivesync::protocol::{EventBody, ServerFrame, SyncStatus};
        let mut waiting: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut events = self.events.lock().await;
        while !waiting.is_empty() {
            let next = tokio::time::timeout(Duration::from_secs(600), events.next())
                .await
                .map_err(|_| "no event for 10 minutes".to_owned())?
                .map_err(|e| e.to_string())?;
            let Next::Frame(frame) = next else { continue };
            if let ServerFrame::Event(event) = *frame
                && let EventBody::SyncStage { sync_id, stage, .. } = &event.body
                && stage.is_terminal()
                && waiting.remove(sync_id.as_str())
                && *stage == SyncStatus::Failed
            {
                return Err(format!("sync {sync_id} failed"));
            }
        }
        Ok(())
    }

    /// Reads one file of `project` through `/api/v1/repo/file`: milliseconds from
    /// request to the whole answer, or the failure.
    pub(crate) async fn read_file(&self, project: &str, path: &str) -> Result<f64, String> {
        let started = Instant::now();
        let response = self
            .http
            .get(format!("{}/api/v1/repo/file", self.base))
            .query(&[("project_id", project), ("path", path)])
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        response.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("a read of {path} in {project} answered {status}"));
        }
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    }

    /// Requests a sync and waits for its `completed` event: seconds from request to
    /// completion.
    pub(crate) async fn sync(&self, project: &str) -> Result<f64, String> {
        let started = Instant::now();
        let sync_id = self.request(project).await?;
        self.ended(&[sync_id]).await?;
        Ok(started.elapsed().as_secs_f64())
    }
}

/// The hub process, to wait for it to be quiet between timed runs.
pub(crate) struct Quiet {
    pid: Option<u32>,
    /// CPU seconds the hub used while being waited for
    background: std::cell::Cell<f64>,
}

impl Quiet {
    pub(crate) fn new(pid: Option<u32>) -> Self {
        Self {
            pid,
            background: std::cell::Cell::new(0.0),
        }
    }

    /// Waits until the hub is quiet: under 2 ms of CPU in each of two 50 ms windows
    /// in a row (or 10 s have passed). Work a sync leaves running after it ends (the
    /// old tree's deletion, the new tree's verification) must not be timed as part of
    /// the peer's run that follows; the CPU it took is added to `background`.
    pub(crate) async fn settle(&self) {
        let Some(pid) = self.pid else { return };
        let Some(start) = crate::cpu_seconds(pid) else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut last, mut quiet) = (start, 0);
        while quiet < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Some(now) = crate::cpu_seconds(pid) else {
                return;
            };
            quiet = if now - last < 0.002 { quiet + 1 } else { 0 };
            last = now;
        }
        self.background.set(self.background.get() + (last - start));
    }

    pub(crate) fn background(&self) -> f64 {
        self.background.get()
    }
}

/// Runs `hub` and `peer` for a warm-up round (discarded) and `rounds` more,
/// alternating which goes first, with the hub settled before each: the medians, and
/// every sample.
async fn alternate<H, P, HF, PF>(
    rounds: usize,
    quiet: &Quiet,
    mut hub: H,
    mut peer: P,
) -> Result<(f64, f64, Vec<f64>, Vec<f64>), String>
where
    H: FnMut(usize) -> HF,
    HF: std::future::Future<Output = Result<f64, String>>,
    P: FnMut(usize) -> PF,
    PF: std::future::Future<Output = Result<f64, String>>,
{
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        let (a, b) = if round % 2 == 0 {
            quiet.settle().await;
            let a = hub(round).await?;
            quiet.settle().await;
            (a, peer(round).await?)
        } else {
            quiet.settle().await;
            let b = peer(round).await?;
            quiet.settle().await;
            (hub(round).await?, b)
        };
        if round > 0 {
            ours.push(a);
            theirs.push(b);
        }
    }
    Ok((median(ours.clone()), median(theirs.clone()), ours, theirs))
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
        Some(source) => Source::dir(source),
        None => default_source()?,
    };
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let built = build_origin(work.path(), &source)?;
    let (url, files) = (built.url.clone(), built.files);
    let origin = work.path().join("origin.git");
    let hub = crate::start_hub_with(
        hub_binary,
        &[("HIVESYNC_SERVE_WORKERS", options.workers.to_string())],
    )
    .await?;
    let token = crate::loadtest_token()?;
    let base = format!("http://{}", hub.addr);
    let events = hivesync::client::Client::new(&base, &token)
        .map_err(|e| e.to_string())?
        .events(&[])
        .await
        .map_err(|e| e.to_string())?;
    let api = Api {
        http: hivesync::tls::http_client(),
        base,
        token,
        events: tokio::sync::Mutex::new(events),
    };
    const ROUNDS: usize = 5;
    let quiet = Quiet::new(hub.child.id());

    // first sync vs git clone: a new project and a new clone each round
    eprintln!("first sync of {files} files vs git clone, warm-up + {ROUNDS} alternated");
    let projects = std::sync::Mutex::new(Vec::new());
    let (first_s, git_clone_s, first_samples, clone_samples) = alternate(
        ROUNDS,
        &quiet,
        |_| {
            let (api, url, projects) = (&api, url.clone(), &projects);
            async move {
                let project = api.register(&url).await?;
                let took = api.sync(&project).await?;
                projects
                    .lock()
                    .map_err(|_| "lock".to_owned())?
                    .push(project);
                Ok(took)
            }
        },
        |round| {
            let (work, url) = (work.path().to_path_buf(), url.clone());
            async move { timed(|| git(&work, &["clone", "-q", &url, &format!("peer{round}")])) }
        },
    )
    .await?;
    let project = projects
        .into_inner()
        .map_err(|_| "lock".to_owned())?
        .last()
        .cloned()
        .ok_or("no project synced")?;
    let peer = work.path().join(format!("peer{ROUNDS}"));

    // no-op: nothing changed upstream
    eprintln!("no-op syncs vs no-op git fetch, warm-up + {ROUNDS} alternated");
    let (noop_hub_median, noop_git_median, noop_hub, noop_git) = alternate(
        ROUNDS,
        &quiet,
        |_| api.sync(&project),
        |_| {
            let peer = peer.clone();
            async move { timed(|| git(&peer, &["fetch", "-q", "origin"])) }
        },
    )
    .await?;

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
    // each round pushes 20 changed files, then both sides catch up (alternating
    // which goes first); a warm-up round first
    let push_round = |round: usize| -> Result<(), String> {
        for path in &targets {
            let full = editor.join(path);
            let mut text = std::fs::read_to_string(&full).unwrap_or_default();
            text.push_str(&format!("\n// loadtest round {round}\n"));
            std::fs::write(&full, text).map_err(|e| e.to_string())?;
        }
        git(&editor, &["commit", "-q", "-am", &format!("round {round}")])?;
        git(&editor, &["push", "-q", "origin", "main"])?;
        Ok(())
    };
    let (mut incremental_hub, mut incremental_git) = (Vec::new(), Vec::new());
    // the hub's CPU after each incremental sync ended, until it was quiet: the old
    // tree's deletion and the next spare tree's making, off the sync's path
    let mut after_incremental_cpu = Vec::new();
    for round in 0..=ROUNDS {
        push_round(round)?;
        let git_side = || {
            timed(|| {
                git(&peer, &["fetch", "-q", "origin"])?;
                git(&peer, &["reset", "-q", "--hard", "origin/main"])
            })
        };
        quiet.settle().await;
        let before = quiet.background();
        let (ours, theirs) = if round % 2 == 0 {
            let ours = api.sync(&project).await?;
            quiet.settle().await;
            after_incremental_cpu.push(quiet.background() - before);
            (ours, git_side()?)
        } else {
            let theirs = git_side()?;
            quiet.settle().await;
            let before = quiet.background();
            let ours = api.sync(&project).await?;
            quiet.settle().await;
            after_incremental_cpu.push(quiet.background() - before);
            (ours, theirs)
        };
        if round > 0 {
            incremental_hub.push(ours);
            incremental_git.push(theirs);
        } else {
            after_incremental_cpu.clear();
        }
    }
    // a no-op sync requested the moment a changed one ended, while the hub makes the
    // next spare tree beside it (and, for a tree written without a spare, before its
    // verification has run, so the sync makes the stat pass itself); the peer's
    // fetch runs settled
    eprintln!("no-op syncs straight after a changed one vs no-op git fetch");
    let (mut first_noop_hub, mut first_noop_git) = (Vec::new(), Vec::new());
    for round in 0..=ROUNDS {
        push_round(ROUNDS + 1 + round)?;
        git(&peer, &["fetch", "-q", "origin"])?;
        git(&peer, &["reset", "-q", "--hard", "origin/main"])?;
        quiet.settle().await;
        api.sync(&project).await?;
        let ours = api.sync(&project).await?;
        quiet.settle().await;
        let theirs = timed(|| git(&peer, &["fetch", "-q", "origin"]))?;
        if round > 0 {
            first_noop_hub.push(ours);
            first_noop_git.push(theirs);
        }
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
    api.ended(&sync_ids).await?;
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
    let noop = (noop_hub_median, noop_git_median);
    let incremental = (
        median(incremental_hub.clone()),
        median(incremental_git.clone()),
    );
    let per_worker = options.projects as f64 / many_hub_s / options.workers as f64;
    println!();
    println!("| measure | hub | peer | hub / peer |");
    println!("|---|---|---|---|");
    println!(
        "| first sync vs `git clone` ({files} files, median of {ROUNDS}) | {first_s:.2} s | {git_clone_s:.2} s | {first_ratio:.2} |"
    );
    println!(
        "| no-op sync, tree vouched for by its watch, vs no-op `git fetch` (median of {ROUNDS}) | {:.1} ms | {:.1} ms | {:.2} |",
        noop.0 * 1000.0,
        noop.1 * 1000.0,
        noop.0 / noop.1
    );
    let first_noop = (
        median(first_noop_hub.clone()),
        median(first_noop_git.clone()),
    );
    println!(
        "| no-op sync straight after a changed one (its spare tree being built meanwhile) vs no-op `git fetch` (median of {ROUNDS}) | {:.1} ms | {:.1} ms | {:.2} |",
        first_noop.0 * 1000.0,
        first_noop.1 * 1000.0,
        first_noop.0 / first_noop.1
    );
    println!(
        "| 20 changed files: sync vs `git fetch` + `git reset --hard` (median of {ROUNDS}) | {:.2} s | {:.2} s | {:.2} |",
        incremental.0,
        incremental.1,
        incremental.0 / incremental.1
    );
    println!(
        "| hub CPU after an incremental sync ended (old tree deleted, next spare tree built; median) | {:.1} ms | — | — |",
        median(after_incremental_cpu.clone()) * 1000.0
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
        "source": source.described,
        "tree": built.tree,
        "files": files,
        "first_sync_s": first_s,
        "git_clone_s": git_clone_s,
        "noop_sync_s": noop.0,
        "noop_git_fetch_s": noop.1,
        "first_noop_after_change_s": first_noop.0,
        "first_noop_after_change_git_fetch_s": first_noop.1,
        "incremental_sync_s": incremental.0,
        "after_incremental_hub_cpu_s": median(after_incremental_cpu.clone()),
        "incremental_git_s": incremental.1,
        "small_projects": options.projects,
        "workers": options.workers,
        "small_projects_hub_s": many_hub_s,
        "small_projects_git_clone_s": many_git_s,
        "syncs_per_s_per_worker": per_worker,
        "sync_status_polls_per_s": polls_per_s,
        "sync_status_p50_ms": p50,
        "sync_status_p99_ms": p99,
        "method": "warm-up round discarded, then rounds alternating which side goes first, the hub settled (CPU quiet) before each timed run; a sync's end is its `completed` event on a WebSocket",
        "samples_s": {
            "first_sync": first_samples, "git_clone": clone_samples,
            "noop_sync": noop_hub, "noop_git_fetch": noop_git,
            "incremental_sync": incremental_hub, "incremental_git": incremental_git,
            "first_noop_after_change": first_noop_hub, "first_noop_after_change_git_fetch": first_noop_git,
            "after_incremental_hub_cpu": after_incremental_cpu,
        },
    }))
}
