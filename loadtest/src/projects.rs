//! The `projects` scenario: a hub that serves many projects. Registers, syncs and
//! reads projects up to each count in `--count` (tiny ones, and one in ten of a few
//! hundred files), owned `--per-user` to a user as a busy hub's are (one sync totals
//! what its owner's other mirrors hold, so a single owner of them all would make the
//! run quadratic), then reads a random spread of every project so far for a while;
//! at each count, the hub's RSS, memory maps, open files, and read latency of projects
//! the reader had open (read among the last `HIVESYNC_READER_CACHE` distinct ones)
//! and of projects it had let go. The per-project slope between counts says whether
//! anything the hub keeps grows with the number of projects.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::reads::{git, percentile};
use crate::syncs::Api;

pub struct Options {
    pub counts: Vec<usize>,
    pub seconds: u64,
    pub workers: usize,
    pub reader_cache: usize,
    pub per_user: usize,
    /// where the result goes, written before the run's temporary files are removed
    /// (at 100,000 projects, millions of files: minutes)
    pub json: PathBuf,
}

/// The hub's anonymous resident memory (its heap and stacks, not mapped files), from
/// `RssAnon` in `/proc/PID/status`.
fn anon_bytes(pid: u32) -> u64 {
    hivesync::memory::status_bytes(Some(pid), "RssAnon").unwrap_or_default()
}

/// What the hub's heap trims (`hivesync_heap_trim*` of its `/metrics`) add up to so
/// far: how many, their total and per-bucket durations, the memory they gave back.
#[derive(Default, Clone)]
struct Trims {
    count: f64,
    seconds: f64,
    /// (upper bound in seconds, trims that took at most that), ascending
    buckets: Vec<(f64, f64)>,
    released_bytes: f64,
}

impl Trims {
    async fn scrape(http: &reqwest::Client, base: &str) -> Result<Trims, String> {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("metrics: {e}"))?
            .text()
            .await
            .map_err(|e| format!("metrics: {e}"))?;
        let mut trims = Trims::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            match name {
                "hivesync_heap_trims_total" => trims.count = value,
                "hivesync_heap_trim_duration_seconds_sum" => trims.seconds = value,
                "hivesync_heap_trimmed_bytes_total" => trims.released_bytes = value,
                _ => {
                    let le = name
                        .strip_prefix("hivesync_heap_trim_duration_seconds_bucket{le=\"")
                        .and_then(|rest| rest.strip_suffix("\"}"))
                        .and_then(|le| le.parse::<f64>().ok());
                    if let Some(le) = le {
                        trims.buckets.push((le, value));
                    }
                }
            }
        }
        trims.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(trims)
    }

    /// The trims between `before` and these: their count, mean, the bucket bounds
    /// their p99 and their longest fall under, and what they gave back.
    fn since(&self, before: &Trims) -> Value {
        let count = self.count - before.count;
        if count <= 0.0 {
            return json!({"trims": 0});
        }
        let window: Vec<(f64, f64)> = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let earlier = before
                    .buckets
                    .iter()
                    .find(|(b, _)| *b == le)
                    .map_or(0.0, |(_, n)| *n);
                (le, n - earlier)
            })
            .collect();
        let at_most = |share: f64| {
            window
                .iter()
                .find(|(_, n)| *n >= share * count)
                .map(|(le, _)| le * 1000.0)
        };
        json!({
            "trims": count,
            "mean_ms": (self.seconds - before.seconds) / count * 1000.0,
            "p99_ms_at_most": at_most(0.99),
            "max_ms_at_most": at_most(1.0),
            "released_bytes": self.released_bytes - before.released_bytes,
        })
    }
}

/// The hub's footprint now: RSS, lines of `/proc/PID/maps`, open descriptors.
fn footprint(pid: u32) -> (u64, u64, u64) {
    let rss = crate::rss_bytes(pid).unwrap_or_default();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|text| text.lines().count() as u64)
        .unwrap_or_default();
    let files = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count() as u64)
        .unwrap_or_default();
    (rss, maps, files)
}

fn upstream(dir: &Path, files: usize) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    git(dir, &["init", "-q", "-b", "main"])?;
    std::fs::write(
        dir.join("README.md"),
        format!("a project of {files} files\n"),
    )
    .map_err(|e| e.to_string())?;
    for i in 1..files {
        let path = dir.join(format!("src/m{:02}/f{i}.rs", i % 16));
        std::fs::create_dir_all(path.parent().ok_or("parent")?).map_err(|e| e.to_string())?;
        std::fs::write(
            &path,
            format!("pub fn f{i}() -> usize {{ {i} }}\n").repeat(6),
        )
        .map_err(|e| e.to_string())?;
    }
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", "upstream"])?;
    // packed, as a forge keeps its repositories: each clone then sends the pack's
    // objects as they are instead of compressing and delta-searching loose ones
    git(dir, &["gc", "-q"])?;
    Ok(format!("file://{}", dir.display()))
}

/// Reads `README.md` of `project`: milliseconds, or the failure.
async fn read(api: &Api, project: &str) -> Result<f64, String> {
    api.read_file(project, "README.md").await
}

/// The users the projects belong to, `per_user` each in turn, each a client with its
/// event stream open, connected when its first project comes.
struct Users {
    base: String,
    per_user: usize,
    apis: Vec<Api>,
}

impl Users {
    /// The client of the owner of project number `n`.
    async fn of(&mut self, n: usize) -> Result<&Api, String> {
        let user = n / self.per_user;
        while self.apis.len() <= user {
            let token = crate::token_for(&format!("projects-{}", self.apis.len()))?;
            self.apis
                .push(Api::connect(self.base.clone(), token).await?);
        }
        Ok(&self.apis[user])
    }
}

/// The last `capacity` distinct projects read, newest last: what the hub's reader
/// keeps open, as the client can tell.
struct Recent {
    capacity: usize,
    order: VecDeque<usize>,
}

impl Recent {
    fn contains(&self, project: usize) -> bool {
        self.order.contains(&project)
    }

    fn touch(&mut self, project: usize) {
        self.order.retain(|p| *p != project);
        self.order.push_back(project);
        while self.order.len() > self.capacity {
            self.order.pop_front();
        }
    }
}

fn summary(mut samples: Vec<f64>) -> Value {
    if samples.is_empty() {
        return json!(null);
    }
    samples.sort_by(f64::total_cmp);
    json!({
        "reads": samples.len(),
        "p50_ms": percentile(&samples, 0.50),
        "p99_ms": percentile(&samples, 0.99),
        "max_ms": samples.last(),
    })
}

pub async fn run(hub_binary: &PathBuf, options: Options) -> Result<Value, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tiny = upstream(&work.path().join("tiny"), 3)?;
    let mixed = upstream(&work.path().join("mixed"), 300)?;
    let hub = crate::start_hub_with(
        hub_binary,
        &[
            ("HIVESYNC_SERVE_WORKERS", options.workers.to_string()),
            ("HIVESYNC_READER_CACHE", options.reader_cache.to_string()),
            ("HIVESYNC_MAX_PROJECTS", options.per_user.to_string()),
        ],
    )
    .await?;
    let pid = hub.child.id().ok_or("the hub has no pid")?;
    let mut users = Users {
        base: format!("http://{}", hub.addr),
        per_user: options.per_user,
        apis: Vec::new(),
    };
    let http = hivesync::tls::http_client();
    let mut trims_before = Trims::scrape(&http, &users.base).await?;
    let (rss, maps, files) = footprint(pid);
    eprintln!("hub at start: RSS {rss} B, {maps} maps, {files} open files");
    let mut points = vec![json!({
        "projects": 0, "rss_bytes": rss, "rss_anon_bytes": anon_bytes(pid), "maps": maps,
        "open_files": files,
    })];
    let mut projects: Vec<String> = Vec::new();
    let mut recent = Recent {
        capacity: options.reader_cache,
        order: VecDeque::new(),
    };
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut random = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let started = Instant::now();
    for &count in &options.counts {
        // register, sync and read the projects up to `count`, 50 at a time
        while projects.len() < count {
            // up to 50 projects of one user
            let first = projects.len();
            let batch = (count - first)
                .min(50)
                .min(options.per_user - first % options.per_user);
            let api = users.of(first).await?;
            let mut ids = Vec::with_capacity(batch);
            let mut syncs = Vec::with_capacity(batch);
            for n in first..first + batch {
                let url = if n.is_multiple_of(10) { &mixed } else { &tiny };
                let id = api.register(url).await?;
                syncs.push(api.request(&id).await?);
                ids.push(id);
            }
            api.ended(&syncs).await?;
            for id in ids {
                read(api, &id).await?;
                recent.touch(projects.len());
                projects.push(id);
            }
            if projects.len().is_multiple_of(1000) {
                eprintln!(
                    "{} projects synced and read ({:.0} s)",
                    projects.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        // a random spread of every project so far
        let (mut cached, mut evicted) = (Vec::new(), Vec::new());
        let until = Instant::now() + Duration::from_secs(options.seconds);
        while Instant::now() < until {
            let n = random(projects.len());
            let was_open = recent.contains(n);
            let ms = read(users.of(n).await?, &projects[n]).await?;
            if was_open {
                cached.push(ms);
            } else {
                evicted.push(ms);
            }
            recent.touch(n);
        }
        let (rss, maps, files) = footprint(pid);
        // the heap trims since the previous count (every HIVESYNC_MALLOC_TRIM_S)
        let trims = Trims::scrape(&http, &users.base).await?;
        let heap_trims = trims.since(&trims_before);
        trims_before = trims;
        let point = json!({
            "projects": count,
            "rss_bytes": rss,
            "rss_anon_bytes": anon_bytes(pid),
            "maps": maps,
            "open_files": files,
            "cached_reads": summary(cached),
            "evicted_reads": summary(evicted),
            "heap_trims": heap_trims,
            "elapsed_s": started.elapsed().as_secs_f64(),
        });
        eprintln!("{point}");
        points.push(point);
    }
    // the per-project slope between consecutive counts
    let slopes: Vec<Value> = points
        .windows(2)
        .filter_map(|pair| {
            let (a, b) = (&pair[0], &pair[1]);
            let n = b["projects"].as_f64()? - a["projects"].as_f64()?;
            let per =
                |key: &str| -> Option<f64> { Some((b[key].as_f64()? - a[key].as_f64()?) / n) };
            Some(json!({
                "from": a["projects"],
                "to": b["projects"],
                "rss_bytes_per_project": per("rss_bytes"),
                "rss_anon_bytes_per_project": per("rss_anon_bytes"),
                "maps_per_project": per("maps"),
                "open_files_per_project": per("open_files"),
            }))
        })
        .collect();
    for slope in &slopes {
        eprintln!("slope {slope}");
    }
    let result = json!({
        "scenario": "projects",
        "counts": options.counts,
        "seconds": options.seconds,
        "workers": options.workers,
        "reader_cache": options.reader_cache,
        "per_user": options.per_user,
        "users": users.apis.len(),
        "mix": "9 in 10 projects of 3 files, 1 in 10 of 300 files",
        "points": points,
        "slopes": slopes,
    });
    std::fs::write(&options.json, format!("{result:#}\n"))
        .map_err(|e| format!("cannot write {}: {e}", options.json.display()))?;
    eprintln!("wrote {}; removing the run's files", options.json.display());
    Ok(result)
}
