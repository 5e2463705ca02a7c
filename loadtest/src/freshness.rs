//! The `freshness` scenario: how long from a push upstream until a client's socket
//! hears `repo_sync_success` for it. Commits are pushed to local bare repositories at a
//! steady rate; in the webhook phase each push is followed by its signed webhook, in
//! the schedule phase projects only have `sync_interval_s`. Latency runs from the
//! push's *intended* time (so a pusher that falls behind cannot hide delay) to the
//! first success notification whose commit includes that push; the time the push
//! really landed is kept beside it. Reported next to what the anchors promise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::reads::{git, json_of, percentile, sync_and_wait};

pub struct Options {
    pub projects: usize,
    pub rate: u64,
    pub seconds: u64,
    pub interval: u64,
    pub workers: usize,
}

struct Project {
    id: String,
    work: PathBuf,
    secret: String,
}

/// A push: its intended and real times, and the commit it landed.
struct Push {
    project: usize,
    commit: String,
    intended: Instant,
    landed: Instant,
}

/// Success notifications as received: project, commit, when.
type Heard = Arc<Mutex<Vec<(String, String, Instant)>>>;

fn new_repo(root: &Path, n: usize) -> Result<(String, PathBuf), String> {
    let bare = root.join(format!("p{n}.git"));
    let work = root.join(format!("w{n}"));
    git(
        root,
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            &bare.to_string_lossy(),
        ],
    )?;
    git(root, &["init", "-q", "-b", "main", &work.to_string_lossy()])?;
    std::fs::write(work.join("README.md"), format!("project {n}\n")).map_err(|e| e.to_string())?;
    git(&work, &["add", "-A"])?;
    git(&work, &["commit", "-q", "-m", "first"])?;
    git(&work, &["push", "-q", &bare.to_string_lossy(), "main"])?;
    git(&work, &["remote", "add", "origin", &bare.to_string_lossy()])?;
    Ok((format!("file://{}", bare.display()), work))
}

fn push_commit(work: &Path, n: u64) -> Result<String, String> {
    std::fs::write(
        work.join(format!("change-{}.txt", n % 16)),
        format!("change {n}\n"),
    )
    .map_err(|e| e.to_string())?;
    git(work, &["add", "-A"])?;
    git(work, &["commit", "-q", "-m", &format!("change {n}")])?;
    git(work, &["push", "-q", "origin", "main"])?;
    git(work, &["rev-parse", "HEAD"]).map(|head| head.trim().to_owned())
}

async fn listen(addr: &str, token: &str, heard: Heard) -> Result<(), String> {
    let url = format!("ws://{addr}/api/v1/ws?access_token={token}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let Ok(text) = message.to_text() else {
                continue;
            };
            let Ok(frame) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if frame["kind"] == "repo_sync_success" {
                let at = Instant::now();
                let project = frame["project_id"].as_str().unwrap_or_default().to_owned();
                let commit = frame["commit"].as_str().unwrap_or_default().to_owned();
                if let Ok(mut heard) = heard.lock() {
                    heard.push((project, commit, at));
                }
            }
        }
    });
    Ok(())
}

/// One phase: pushes at `rate`/s for `seconds`, each with a webhook when `webhooks`.
async fn phase(
    http: &reqwest::Client,
    base: &str,
    projects: &Arc<Vec<Project>>,
    heard: &Heard,
    options: &Options,
    webhooks: bool,
    settle: Duration,
) -> Result<Value, String> {
    let total = options.rate * options.seconds;
    let step = Duration::from_secs_f64(1.0 / options.rate as f64);
    let since = heard.lock().map(|h| h.len()).unwrap_or_default();
    let start = Instant::now() + Duration::from_millis(200);
    let mut pushes: Vec<Push> = Vec::new();
    let mut late_ms: f64 = 0.0;
    let mut deliveries = Vec::new();
    for n in 0..total {
        let intended = start + step * n as u32;
        tokio::time::sleep_until(intended.into()).await;
        late_ms = late_ms.max(intended.elapsed().as_secs_f64() * 1e3);
        let index = (n as usize) % projects.len();
        let work = projects[index].work.clone();
        // distinct across phases, so every push changes a file
        let serial = n + if webhooks { 0 } else { total };
        let commit = tokio::task::spawn_blocking(move || push_commit(&work, serial))
            .await
            .map_err(|e| e.to_string())??;
        let landed = Instant::now();
        if webhooks {
            let body = json!({"ref": "refs/heads/main", "after": commit}).to_string();
            let request = http
                .post(format!("{base}/api/v1/webhooks/{}", projects[index].id))
                .header("content-type", "application/json")
                .header("x-github-event", "push")
                .header("x-github-delivery", format!("{}-{n}", projects[index].id))
                .header(
                    "x-hub-signature-256",
                    hivesync::domain::webhook::sign(&projects[index].secret, body.as_bytes()),
                )
                .body(body);
            deliveries.push(tokio::spawn(async move {
                request
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }));
        }
        pushes.push(Push {
            project: index,
            commit,
            intended,
            landed,
        });
    }
    let pushing_s = start.elapsed().as_secs_f64();
    let mut refused = 0;
    for delivery in deliveries {
        if delivery.await.unwrap_or(0) != 202 {
            refused += 1;
        }
    }
    // wait for every push to be heard, or the settle time
    let deadline = Instant::now() + settle;
    let resolved = loop {
        let resolved = resolve(projects, &pushes, heard, since);
        if resolved.iter().all(Option::is_some) || Instant::now() >= deadline {
            break resolved;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut from_intended: Vec<f64> = Vec::new();
    let mut from_landed: Vec<f64> = Vec::new();
    for (push, heard_at) in pushes.iter().zip(&resolved) {
        if let Some(at) = heard_at {
            from_intended.push(at.saturating_duration_since(push.intended).as_secs_f64() * 1e3);
            from_landed.push(at.saturating_duration_since(push.landed).as_secs_f64() * 1e3);
        }
    }
    let unheard = resolved.iter().filter(|r| r.is_none()).count();
    let raw = from_intended.clone();
    from_intended.sort_by(f64::total_cmp);
    from_landed.sort_by(f64::total_cmp);
    let stat = |sorted: &Vec<f64>, p: f64| {
        if sorted.is_empty() {
            f64::NAN
        } else {
            percentile(sorted, p)
        }
    };
    Ok(json!({
        "mode": if webhooks { "webhook" } else { "schedule" },
        "pushes": total,
        "achieved_push_rate": total as f64 / pushing_s,
        "pusher_max_late_ms": late_ms,
        "pusher_fell_behind": late_ms > step.as_secs_f64() * 1e3,
        "webhooks_not_accepted": refused,
        "heard": from_intended.len(),
        "unheard": unheard,
        "latency_ms": {
            "p50": stat(&from_intended, 0.5),
            "p99": stat(&from_intended, 0.99),
            "max": from_intended.last().copied().unwrap_or(f64::NAN),
        },
        "latency_from_landed_ms": {
            "p50": stat(&from_landed, 0.5),
            "p99": stat(&from_landed, 0.99),
        },
        "raw_latency_ms": raw,
    }))
}

/// For each push, when a success notification covering it was first heard: one
/// for its project with its commit or a later push's.
fn resolve(
    projects: &[Project],
    pushes: &[Push],
    heard: &Heard,
    since: usize,
) -> Vec<Option<Instant>> {
    let heard = heard
        .lock()
        .map(|h| h[since..].to_vec())
        .unwrap_or_default();
    let index_of: HashMap<&str, usize> = projects
        .iter()
        .enumerate()
        .map(|(n, p)| (p.id.as_str(), n))
        .collect();
    // per project, the order of its pushes
    let mut order: HashMap<(usize, &str), usize> = HashMap::new();
    for (n, push) in pushes.iter().enumerate() {
        order.insert((push.project, push.commit.as_str()), n);
    }
    let mut out: Vec<Option<Instant>> = vec![None; pushes.len()];
    for (project, commit, at) in heard {
        let Some(&p) = index_of.get(project.as_str()) else {
            continue;
        };
        let Some(&upto) = order.get(&(p, commit.as_str())) else {
            continue;
        };
        for (n, push) in pushes.iter().enumerate().take(upto + 1) {
            if push.project == p && out[n].is_none() && at >= push.landed {
                out[n] = Some(at);
            }
        }
    }
    out
}

pub async fn run(hub_binary: &PathBuf, options: Options) -> Result<Value, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let hub = crate::start_hub_with(
        hub_binary,
        &[
            ("HIVESYNC_WORKERS", options.workers.to_string()),
            ("HIVESYNC_MIN_SYNC_INTERVAL_S", "1".into()),
            ("HIVESYNC_WEBHOOK_RATE", "100000/min".into()),
        ],
    )
    .await?;
    let base = format!("http://{}", hub.addr);
    let token = crate::loadtest_token()?;
    let http = hivesync::tls::http_client();
    eprintln!(
        "freshness: {} projects, {} pushes/s, {} s per phase",
        options.projects, options.rate, options.seconds
    );
    let mut projects = Vec::new();
    for n in 0..options.projects {
        let (url, tree) = new_repo(work.path(), n)?;
        let created = json_of(
            http.post(format!("{base}/api/v1/projects"))
                .bearer_auth(&token)
                .json(&json!({"name": format!("fresh-{n}"), "repo_url": url})),
        )
        .await?;
        let id = created["project_id"]
            .as_str()
            .ok_or(format!("register failed: {created}"))?
            .to_owned();
        sync_and_wait(&http, &base, &token, &id).await?;
        let hook = json_of(
            http.post(format!("{base}/api/v1/projects/{id}/webhook"))
                .bearer_auth(&token),
        )
        .await?;
        let secret = hook["secret"]
            .as_str()
            .ok_or("no webhook secret")?
            .to_owned();
        projects.push(Project {
            id,
            work: tree,
            secret,
        });
    }
    let projects = Arc::new(projects);
    let heard: Heard = Arc::default();
    listen(&hub.addr, &token, Arc::clone(&heard)).await?;

    let webhook = phase(
        &http,
        &base,
        &projects,
        &heard,
        &options,
        true,
        Duration::from_secs(30),
    )
    .await?;
    for project in projects.iter() {
        json_of(
            http.patch(format!("{base}/api/v1/projects/{}", project.id))
                .bearer_auth(&token)
                .json(&json!({"sync_interval_s": options.interval})),
        )
        .await?;
    }
    let settle = Duration::from_secs(options.interval * 8 + 30);
    let schedule = phase(&http, &base, &projects, &heard, &options, false, settle).await?;
    for (name, result) in [("webhook", &webhook), ("schedule", &schedule)] {
        println!(
            "{name:>9}: {} pushes at {:.1}/s, heard {} (unheard {}), push → repo_sync_success p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms{}",
            result["pushes"],
            result["achieved_push_rate"].as_f64().unwrap_or_default(),
            result["heard"],
            result["unheard"],
            result["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
            result["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
            result["latency_ms"]["max"].as_f64().unwrap_or(f64::NAN),
            if result["pusher_fell_behind"] == true {
                "  (the pusher fell behind its schedule)"
            } else {
                ""
            },
        );
    }
    println!(
        "anchors: GitLab pull mirrors every 30 min; Gitea every 8 h by default (10 min at least); Sourcegraph schedules 45 s to 8 h"
    );
    let lost = webhook["unheard"].as_u64().unwrap_or(0) + schedule["unheard"].as_u64().unwrap_or(0);
    drop(hub);
    Ok(json!({
        "scenario": "freshness",
        "projects": options.projects,
        "rate": options.rate,
        "seconds": options.seconds,
        "schedule_interval_s": options.interval,
        "webhook": webhook,
        "schedule": schedule,
        "anchors_s": {"gitlab_pull_mirror": 1800, "gitea_default": 28800, "gitea_min": 600, "sourcegraph_min": 45, "sourcegraph_max": 28800},
        // a push never heard is a loss: the run fails like a lost event does
        "lost": lost,
    }))
}
