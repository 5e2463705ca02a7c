//! The `soak` scenario: one project lives through many commit-then-sync rounds in one
//! hub process (small changes to a repository of thousands of files, a force-push now
//! and then), beside a `git clone --mirror` fetched the same rounds with git's own
//! auto-gc. At the start and every `every` rounds: no-op and incremental sync time, a
//! file read's p50/p99, and each side's pack count, object-store bytes and inodes. At
//! the end: whether the objects of force-pushed-away histories are gone once their
//! grace period has passed. The upstream is `git gc`'d every 100 rounds, untimed, as
//! a forge keeps its repositories compact.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::reads::{git, median, percentile};
use crate::syncs::Api;

pub struct Options {
    pub rounds: usize,
    pub files: usize,
    pub every: usize,
    pub force_every: usize,
    pub reads: usize,
    pub grace_s: u64,
    /// the hub's HIVESYNC_HOUSEKEEPING_TOOL
    pub tool: String,
    pub plot: Option<PathBuf>,
}

/// Packs, bytes and inodes of an object store (`objects/`).
#[derive(Debug, Default, Clone, Copy)]
struct Footprint {
    packs: u64,
    bytes: u64,
    inodes: u64,
}

fn footprint(objects: &Path) -> Footprint {
    let mut total = Footprint::default();
    let mut stack = vec![objects.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            total.inodes += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total.bytes += meta.len();
                if entry.path().extension().is_some_and(|x| x == "idx") {
                    total.packs += 1;
                }
            }
        }
    }
    total
}

/// Deterministic text for file `i`: a few hundred bytes that differ between files.
fn contents(i: usize) -> String {
    let mut text = String::new();
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for line in 0..8 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push_str(&format!("line {line} of file {i}: {state:016x}\n"));
    }
    text
}

fn path_of(i: usize) -> String {
    format!("src/dir_{:02}/file_{i}.txt", i % 64)
}

fn timed(run: impl FnOnce() -> Result<String, String>) -> Result<f64, String> {
    let started = Instant::now();
    run()?;
    Ok(started.elapsed().as_secs_f64())
}

/// One measurement point of the soak.
struct Checkpoint {
    round: usize,
    noop_s: f64,
    peer_noop_s: f64,
    incremental_s: f64,
    peer_incremental_s: f64,
    read_p50_ms: f64,
    read_p99_ms: f64,
    hub: Footprint,
    peer: Footprint,
    rss_bytes: u64,
}

impl Checkpoint {
    fn json(&self) -> Value {
        json!({
            "round": self.round,
            "noop_sync_s": self.noop_s,
            "peer_noop_fetch_s": self.peer_noop_s,
            "incremental_sync_s": self.incremental_s,
            "peer_incremental_fetch_s": self.peer_incremental_s,
            "read_p50_ms": self.read_p50_ms,
            "read_p99_ms": self.read_p99_ms,
            "hub_packs": self.hub.packs,
            "hub_bytes": self.hub.bytes,
            "hub_inodes": self.hub.inodes,
            "peer_packs": self.peer.packs,
            "peer_bytes": self.peer.bytes,
            "peer_inodes": self.peer.inodes,
            "hub_rss_bytes": self.rss_bytes,
        })
    }
}

pub async fn run(hub_binary: &PathBuf, options: Options) -> Result<Value, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = work.path();
    eprintln!("building a repository of {} files", options.files);
    git(root, &["init", "-q", "--bare", "-b", "main", "origin.git"])?;
    let url = format!("file://{}", root.join("origin.git").display());
    let editor = root.join("editor");
    std::fs::create_dir_all(&editor).map_err(|e| e.to_string())?;
    git(&editor, &["init", "-q", "-b", "main"])?;
    git(&editor, &["remote", "add", "origin", &url])?;
    for i in 0..options.files {
        let path = editor.join(path_of(i));
        std::fs::create_dir_all(path.parent().ok_or("parent")?).map_err(|e| e.to_string())?;
        std::fs::write(&path, contents(i)).map_err(|e| e.to_string())?;
    }
    git(&editor, &["add", "-A"])?;
    git(&editor, &["commit", "-q", "-m", "start"])?;
    git(&editor, &["push", "-q", "origin", "main"])?;

    let hub = crate::start_hub_with(
        hub_binary,
        &[
            ("HIVESYNC_PRUNE_GRACE_S", options.grace_s.to_string()),
            ("HIVESYNC_HOUSEKEEPING_TOOL", options.tool.clone()),
        ],
    )
    .await?;
    let pid = hub.child.id();
    let base = format!("http://{}", hub.addr);
    let api = Api::connect(base.clone(), crate::loadtest_token()?).await?;
    let project = api.register(&url).await?;
    api.sync(&project).await?;
    let mirror_objects = hub
        .data_dir()
        .join("git")
        .join(format!("{project}.git"))
        .join("objects");
    git(root, &["clone", "-q", "--mirror", &url, "peer.git"])?;
    let peer = root.join("peer.git");
    // git's own housekeeping: `gc --auto` after fetches, in the foreground so its cost
    // is in the fetch that triggered it and the store is measured at rest
    git(&peer, &["config", "gc.autoDetach", "false"])?;
    let fetch = |peer: &Path| git(peer, &["fetch", "-q", "--prune", "origin"]);

    let quiet = crate::syncs::Quiet::new(pid);
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let (mut hub_rounds, mut peer_rounds) = (Vec::new(), Vec::new());
    let mut forced_away: Vec<(usize, String)> = Vec::new();
    let mut window_start = 0;
    let started = Instant::now();
    // the baseline is taken after the first 10 rounds, then every `every`
    let is_checkpoint =
        |round: usize| round == 10 || (round.is_multiple_of(options.every) && round > 10);
    for round in 1..=options.rounds {
        if options.force_every > 0 && round.is_multiple_of(options.force_every) {
            forced_away.push((round, git(&editor, &["rev-parse", "HEAD"])?));
            git(&editor, &["reset", "-q", "--hard", "HEAD~2"])?;
        }
        for k in 0..3 {
            let i = (round * 7919 + k * 104_729) % options.files;
            let path = editor.join(path_of(i));
            let mut text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            text.push_str(&format!("round {round}\n"));
            std::fs::write(&path, text).map_err(|e| e.to_string())?;
        }
        git(&editor, &["commit", "-q", "-am", &format!("round {round}")])?;
        git(&editor, &["push", "-q", "--force", "origin", "main"])?;
        // alternate which side fetches first
        let (ours, theirs) = if round.is_multiple_of(2) {
            let ours = api.sync(&project).await?;
            (ours, timed(|| fetch(&peer))?)
        } else {
            let theirs = timed(|| fetch(&peer))?;
            (api.sync(&project).await?, theirs)
        };
        hub_rounds.push(ours);
        peer_rounds.push(theirs);
        if round.is_multiple_of(100) {
            // the upstream keeps itself compact, as a forge does (untimed): without
            // it every fetch, ours and git's alike, slows as the upstream collects
            // loose objects, and the curves would show the upstream, not the mirror
            git(&root.join("origin.git"), &["gc", "-q"])?;
        }
        if is_checkpoint(round) {
            quiet.settle().await;
            let point = measure(
                &api,
                &project,
                &peer,
                &mirror_objects,
                &options,
                round,
                &hub_rounds[window_start..],
                &peer_rounds[window_start..],
                pid,
                &quiet,
            )
            .await?;
            window_start = hub_rounds.len();
            eprintln!(
                "round {:>5} ({:>5.0} s): no-op {:>6.1} ms (git {:>5.1}), incremental {:>6.1} ms (git {:>5.1}), read p99 {:>5.2} ms, packs {} (git {}), bytes {} (git {}), inodes {} (git {})",
                round,
                started.elapsed().as_secs_f64(),
                point.noop_s * 1000.0,
                point.peer_noop_s * 1000.0,
                point.incremental_s * 1000.0,
                point.peer_incremental_s * 1000.0,
                point.read_p99_ms,
                point.hub.packs,
                point.peer.packs,
                point.hub.bytes,
                point.peer.bytes,
                point.hub.inodes,
                point.peer.inodes,
            );
            checkpoints.push(point);
        }
    }

    // the grace period of the last force-push passes; one more sync lets housekeeping
    // prune what it left
    let grace = Duration::from_secs(options.grace_s);
    let waited = Instant::now();
    tokio::time::sleep(grace + Duration::from_secs(1)).await;
    git(
        &editor,
        &["commit", "-q", "--allow-empty", "-m", "after the grace"],
    )?;
    git(&editor, &["push", "-q", "origin", "main"])?;
    api.sync(&project).await?;
    quiet.settle().await;
    let mirror_git = mirror_objects.parent().ok_or("mirror path")?.to_path_buf();
    let present: Vec<&String> = forced_away
        .iter()
        .map(|(_, commit)| commit)
        .filter(|commit| {
            std::process::Command::new("git")
                .arg("--git-dir")
                .arg(&mirror_git)
                .args(["cat-file", "-e", commit.as_str()])
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .status()
                .is_ok_and(|status| status.success())
        })
        .collect();
    let final_store = footprint(&mirror_objects);
    let final_peer = footprint(&peer.join("objects"));
    // the peer right after a full gc of its own: the most compact git gets
    git(&peer, &["gc", "-q"])?;
    let peer_gc = footprint(&peer.join("objects"));
    eprintln!(
        "after the grace period ({:.0} s): {} of {} force-pushed-away commits still in the mirror; packs {} bytes {} (git: packs {} bytes {})",
        waited.elapsed().as_secs_f64(),
        present.len(),
        forced_away.len(),
        final_store.packs,
        final_store.bytes,
        final_peer.packs,
        final_peer.bytes,
    );

    let first = checkpoints
        .first()
        .ok_or("no checkpoint: fewer than 10 rounds")?;
    let last = checkpoints.last().ok_or("no checkpoint")?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let summary = json!({
        "noop_sync_last_vs_first": ratio(last.noop_s, first.noop_s),
        "incremental_sync_last_vs_first": ratio(last.incremental_s, first.incremental_s),
        "read_p99_last_vs_first": ratio(last.read_p99_ms, first.read_p99_ms),
        // the same, each divided by git's own drift over the run (a host that slowed
        // slows both sides): hub over git at the last point, over hub over git at the
        // first
        "noop_sync_vs_git_last_vs_first": ratio(
            ratio(last.noop_s, last.peer_noop_s),
            ratio(first.noop_s, first.peer_noop_s)
        ),
        "incremental_sync_vs_git_last_vs_first": ratio(
            ratio(last.incremental_s, last.peer_incremental_s),
            ratio(first.incremental_s, first.peer_incremental_s)
        ),
        "hub_packs_most": checkpoints.iter().map(|c| c.hub.packs).max(),
        "hub_bytes_vs_git_last": ratio(last.hub.bytes as f64, last.peer.bytes as f64),
        "hub_bytes_vs_git_after_grace": ratio(final_store.bytes as f64, final_peer.bytes as f64),
        "hub_bytes_vs_git_after_its_full_gc": ratio(final_store.bytes as f64, peer_gc.bytes as f64),
        "forced_away_commits": forced_away.len(),
        "forced_away_still_present_after_grace": present.len(),
    });
    eprintln!("summary: {summary}");
    if let Some(path) = &options.plot {
        std::fs::write(path, plot(&checkpoints)).map_err(|e| e.to_string())?;
        eprintln!("plot: {}", path.display());
    }
    Ok(json!({
        "scenario": "soak",
        "rounds": options.rounds,
        "files": options.files,
        "every": options.every,
        "force_every": options.force_every,
        "reads_per_checkpoint": options.reads,
        "grace_s": options.grace_s,
        "housekeeping_tool": options.tool,
        "peer": "git clone --mirror, git fetch --prune with git's own gc --auto (gc.autoDetach=false)",
        "upstream": "a bare repository pushed to each round, git gc every 100 rounds (untimed)",
        "checkpoints": checkpoints.iter().map(Checkpoint::json).collect::<Vec<_>>(),
        "after_grace": {
            "hub_packs": final_store.packs,
            "hub_bytes": final_store.bytes,
            "hub_inodes": final_store.inodes,
            "peer_packs": final_peer.packs,
            "peer_bytes": final_peer.bytes,
            "peer_inodes": final_peer.inodes,
            "peer_after_full_gc_packs": peer_gc.packs,
            "peer_after_full_gc_bytes": peer_gc.bytes,
            "peer_after_full_gc_inodes": peer_gc.inodes,
        },
        "summary": summary,
        "raw": {
            "incremental_sync_s": hub_rounds,
            "peer_incremental_fetch_s": peer_rounds,
            "forced_away": forced_away.iter().map(|(round, commit)| json!({"round": round, "commit": commit})).collect::<Vec<_>>(),
        },
    }))
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    api: &Api,
    project: &str,
    peer: &Path,
    mirror_objects: &Path,
    options: &Options,
    round: usize,
    hub_window: &[f64],
    peer_window: &[f64],
    pid: Option<u32>,
    quiet: &crate::syncs::Quiet,
) -> Result<Checkpoint, String> {
    let (mut noop, mut peer_noop) = (Vec::new(), Vec::new());
    for attempt in 0..5usize {
        quiet.settle().await;
        if attempt.is_multiple_of(2) {
            noop.push(api.sync(project).await?);
            peer_noop.push(timed(|| git(peer, &["fetch", "-q", "--prune", "origin"]))?);
        } else {
            peer_noop.push(timed(|| git(peer, &["fetch", "-q", "--prune", "origin"]))?);
            noop.push(api.sync(project).await?);
        }
    }
    let mut latencies = Vec::with_capacity(options.reads);
    for n in 0..options.reads {
        let i = (n * 2_654_435_761) % options.files;
        let ms = api
            .read_file(project, &path_of(i))
            .await
            .map_err(|e| format!("round {round}: {e}"))?;
        latencies.push(ms);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Checkpoint {
        round,
        noop_s: median(noop),
        peer_noop_s: median(peer_noop),
        incremental_s: median(hub_window.to_vec()),
        peer_incremental_s: median(peer_window.to_vec()),
        read_p50_ms: percentile(&latencies, 0.50),
        read_p99_ms: percentile(&latencies, 0.99),
        hub: footprint(mirror_objects),
        peer: footprint(&peer.join("objects")),
        rss_bytes: pid.and_then(crate::rss_bytes).unwrap_or_default(),
    })
}

/// Four small line charts, the hub's line beside git's where git has one: no-op
/// sync, incremental sync, read p99, object-store bytes, by round.
fn plot(points: &[Checkpoint]) -> String {
    type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);
    let series = |f: &dyn Fn(&Checkpoint) -> f64| -> Vec<(f64, f64)> {
        points.iter().map(|p| (p.round as f64, f(p))).collect()
    };
    let panels: Vec<(&str, Vec<Series>)> = vec![
        (
            "no-op sync (ms)",
            vec![
                ("hub", "#1f77b4", series(&|p| p.noop_s * 1000.0)),
                ("git fetch", "#ff7f0e", series(&|p| p.peer_noop_s * 1000.0)),
            ],
        ),
        (
            "incremental sync (ms, median of the rounds since the last point)",
            vec![
                ("hub", "#1f77b4", series(&|p| p.incremental_s * 1000.0)),
                (
                    "git fetch",
                    "#ff7f0e",
                    series(&|p| p.peer_incremental_s * 1000.0),
                ),
            ],
        ),
        (
            "file read (ms): p99 and p50",
            vec![
                ("p99", "#1f77b4", series(&|p| p.read_p99_ms)),
                ("p50", "#2ca02c", series(&|p| p.read_p50_ms)),
            ],
        ),
        (
            "object store (MiB)",
            vec![
                (
                    "hub",
                    "#1f77b4",
                    series(&|p| p.hub.bytes as f64 / 1048576.0),
                ),
                (
                    "git (auto gc)",
                    "#ff7f0e",
                    series(&|p| p.peer.bytes as f64 / 1048576.0),
                ),
            ],
        ),
    ];
    let (width, height, margin) = (520.0, 220.0, 50.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        width * 2.0,
        height * 2.0
    );
    for (n, (title, lines)) in panels.iter().enumerate() {
        let (ox, oy) = ((n % 2) as f64 * width, (n / 2) as f64 * height);
        let all: Vec<(f64, f64)> = lines.iter().flat_map(|(_, _, s)| s.clone()).collect();
        let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
        let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
        let x = |v: f64| ox + margin + v / x_max * (width - 2.0 * margin);
        let y = |v: f64| oy + height - margin + -v / y_max * (height - 2.0 * margin);
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\">{title}</text>\n<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\n<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\n",
            ox + margin,
            oy + 20.0,
            x(0.0),
            y(0.0),
            x(x_max),
            y(0.0),
            x(0.0),
            y(0.0),
            x(0.0),
            y(y_max)
        ));
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.3}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">round {x_max:.0}</text>\n",
            x(0.0) - 4.0,
            y(y_max) + 4.0,
            y_max,
            x(x_max),
            y(0.0) + 14.0
        ));
        for (k, (name, color, points)) in lines.iter().enumerate() {
            let path: Vec<String> = points
                .iter()
                .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
                .collect();
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
                path.join(" "),
                x(x_max) - 90.0,
                oy + 36.0 + k as f64 * 13.0
            ));
        }
    }
    svg.push_str("</svg>\n");
    svg
}
