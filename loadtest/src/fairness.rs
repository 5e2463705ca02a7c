//! The `fairness` scenario: one owner floods the queue with first syncs of larger
//! repositories, then other owners each press Sync once on a small project, a little
//! apart. Reported from the sync records the hub kept (what happened, not what was
//! offered): each other owner's wait, queued to started, against the duration of one
//! flood sync in the same run (the wait a fair queue promises at most: one running
//! sync); and how many of the flood's jobs, queued before another owner's request,
//! started after that request was queued and ahead of it (the target: none).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::reads::{git, median, percentile};
use crate::syncs::Api;

pub struct Options {
    /// the flooding owner's projects
    pub flood: usize,
    /// files in each flood repository
    pub files: usize,
    /// other owners, one press each
    pub others: usize,
    pub workers: usize,
    /// `HIVESYNC_OWNER_MAX_RUNNING` (default: the hub's, half the workers)
    pub owner_cap: Option<usize>,
}

/// A repository of `files` small source files at `dir`, one commit.
fn repo(dir: &std::path::Path, files: usize, tag: &str) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    git(dir, &["init", "-q", "-b", "main"])?;
    for i in 0..files {
        let path = dir.join(format!("src/m{:02}/f{i}.rs", i % 16));
        std::fs::create_dir_all(path.parent().ok_or("parent")?).map_err(|e| e.to_string())?;
        std::fs::write(
            &path,
            format!("// {tag} {i}\npub fn f{i}() -> usize {{ {i} }}\n").repeat(16),
        )
        .map_err(|e| e.to_string())?;
    }
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", "bench"])?;
    Ok(format!("file://{}", dir.display()))
}

/// Queued, started and finished of a sync, ms since the first flood request.
struct Timeline {
    queued: u64,
    started: u64,
    finished: u64,
}

async fn timeline(api: &Api, sync_id: &str, epoch: &str) -> Result<Timeline, String> {
    let record: Value = crate::reads::json_of(
        api.http
            .get(format!("{}/api/v1/repo/sync/{sync_id}", api.base))
            .bearer_auth(&api.token),
    )
    .await?;
    let at = |field: &str| -> Result<u64, String> {
        let stamp = record[field]
            .as_str()
            .ok_or(format!("sync {sync_id} has no {field}: {record}"))?;
        hivesync::domain::millis_between(epoch, stamp).ok_or(format!("unreadable {field}"))
    };
    if record["status"] != "completed" {
        return Err(format!("sync {sync_id} did not complete: {record}"));
    }
    Ok(Timeline {
        queued: at("queued_at")?,
        started: at("started_at")?,
        finished: at("finished_at")?,
    })
}

pub async fn run(hub_binary: &PathBuf, options: Options) -> Result<Value, String> {
    let mut env = vec![("HIVESYNC_WORKERS", options.workers.to_string())];
    if let Some(cap) = options.owner_cap {
        env.push(("HIVESYNC_OWNER_MAX_RUNNING", cap.to_string()));
    }
    let hub = crate::start_hub_with(hub_binary, &env).await?;
    let base = format!("http://{}", hub.addr);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let flooder = Api::connect(base.clone(), crate::token_for("flooder")?).await?;
    let mut flood_projects = Vec::new();
    for n in 0..options.flood {
        let url = repo(
            &dir.path().join(format!("flood{n}")),
            options.files,
            "flood",
        )?;
        flood_projects.push(flooder.register(&url).await?);
    }
    let mut others = Vec::new();
    for n in 0..options.others {
        let user = format!("other{n}");
        let api = Api::connect(base.clone(), crate::token_for(&user)?).await?;
        let url = repo(&dir.path().join(&user), 10, &user)?;
        let project = api.register(&url).await?;
        others.push((api, project));
    }

    // the flood, all at once; then the others, 200 ms apart
    let epoch = hivesync::domain::now_rfc3339();
    let mut flood_syncs = Vec::new();
    for project in &flood_projects {
        flood_syncs.push(flooder.request(project).await?);
    }
    let mut other_syncs = Vec::new();
    for (api, project) in &others {
        tokio::time::sleep(Duration::from_millis(200)).await;
        other_syncs.push(api.request(project).await?);
    }
    for ((api, _), sync_id) in others.iter().zip(&other_syncs) {
        api.ended(std::slice::from_ref(sync_id)).await?;
    }
    flooder.ended(&flood_syncs).await?;

    let mut flood = Vec::new();
    for sync_id in &flood_syncs {
        flood.push(timeline(&flooder, sync_id, &epoch).await?);
    }
    let mut waits = Vec::new();
    let mut jumped = 0usize;
    let mut raw_others = Vec::new();
    for ((api, _), sync_id) in others.iter().zip(&other_syncs) {
        let mine = timeline(api, sync_id, &epoch).await?;
        waits.push((mine.started - mine.queued) as f64);
        jumped += flood
            .iter()
            .filter(|theirs| {
                theirs.queued <= mine.queued
                    && mine.queued < theirs.started
                    && theirs.started < mine.started
            })
            .count();
        raw_others.push(json!({
            "queued_ms": mine.queued, "started_ms": mine.started, "finished_ms": mine.finished,
        }));
    }
    let mut durations: Vec<f64> = flood
        .iter()
        .map(|sync| (sync.finished - sync.started) as f64)
        .collect();
    durations.sort_by(f64::total_cmp);
    let flood_sync_ms = median(durations);
    let mut sorted = waits.clone();
    sorted.sort_by(f64::total_cmp);
    let wait_p50 = percentile(&sorted, 0.5);
    let wait_max = percentile(&sorted, 1.0);
    Ok(json!({
        "scenario": "fairness",
        "workers": options.workers,
        "owner_cap": options.owner_cap,
        "flood_projects": options.flood,
        "flood_files": options.files,
        "others": options.others,
        "flood_sync_ms_median": flood_sync_ms,
        "other_wait_ms_p50": wait_p50,
        "other_wait_ms_max": wait_max,
        "other_wait_max_over_one_flood_sync": wait_max / flood_sync_ms.max(1.0),
        "flood_jobs_started_ahead_of_a_later_request": jumped,
        "flood_backlog_ms": flood.iter().map(|sync| sync.finished).max().unwrap_or(0),
        "raw": {
            "flood": flood.iter().map(|sync| json!({
                "queued_ms": sync.queued, "started_ms": sync.started, "finished_ms": sync.finished,
            })).collect::<Vec<_>>(),
            "others": raw_others,
        },
    }))
}
