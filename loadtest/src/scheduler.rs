//! The `scheduler` scenario: what one scheduler tick costs with few and with many
//! registered projects, the due count held equal. It drives the hub's own round
//! (`worker::schedule_due`: claim the due projects, read each, start its sync) on an
//! embedded store, and reads the process's CPU time around each tick. A tick's cost
//! should follow the due projects, not the registered ones: the ratio of the two runs
//! is the result. Runs alternate (small, large, small, large) after a warm-up tick.

use std::time::{Duration, Instant};

use hivesync::domain::ProjectId;
use hivesync::engine::embedded::EmbeddedEngine;
use hivesync::engine::schedule::Rules;
use hivesync::engine::{Engine, Project};
use serde_json::{Value, json};

use crate::reads::{median, percentile};

/// How long a claimed project is held in these runs: longer than the run.
const HOLD: Duration = Duration::from_secs(24 * 3600);

pub struct Options {
    pub projects: usize,
    pub due: usize,
    pub ticks: usize,
}

fn cpu_time() -> Duration {
    let mut spec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `spec` is a valid timespec for clock_gettime to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut spec) };
    Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32)
}

fn project(n: usize) -> Project {
    Project::new(
        ProjectId::generate(),
        format!("p{n}"),
        hivesync::domain::RepoUrl::from_stored("file:///nonexistent".into()).expect("a url"),
        "main".into(),
        format!("user{}", n % 500),
        None,
        Some(3600),
    )
}

/// An engine holding `registered` scheduled projects, none of them due.
async fn engine_with(dir: &std::path::Path, registered: usize) -> Result<Engine, String> {
    let metrics = std::sync::Arc::new(hivesync::metrics::Metrics::new(&[]));
    let embedded = EmbeddedEngine::open_with(
        dir,
        (1_000_000, Duration::from_secs(1)),
        10,
        Rules::default(),
        metrics.store_commit.clone(),
    )
    .map_err(|e| e.to_string())?;
    let engine = Engine {
        store: embedded.clone(),
        queue: embedded.clone(),
        events: embedded,
        metrics,
    };
    let started = Instant::now();
    for n in 0..registered {
        engine
            .store
            .insert_project(&project(n))
            .await
            .map_err(|e| e.to_string())?;
    }
    // every project is due at registration: claim them all once, for the whole run
    let now = hivesync::domain::now_epoch_ms() + 1;
    while !engine
        .store
        .claim_due(now, 5_000, HOLD)
        .await
        .map_err(|e| e.to_string())?
        .is_empty()
    {}
    eprintln!(
        "  {registered} registered projects ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(engine)
}

/// `ticks` scheduler rounds, each with `due` projects due (registered just before it):
/// CPU and wall time per round, and per idle round (nothing due).
async fn measure(engine: &Engine, due: usize, ticks: usize) -> Result<Value, String> {
    let mut busy_cpu = Vec::new();
    let mut busy_wall = Vec::new();
    let mut idle_cpu = Vec::new();
    for tick in 0..=ticks {
        for n in 0..due {
            engine
                .store
                .insert_project(&project(n))
                .await
                .map_err(|e| e.to_string())?;
        }
        let (cpu, wall) = (cpu_time(), Instant::now());
        let started = hivesync::worker::schedule_due(engine, HOLD)
            .await
            .map_err(|e| e.to_string())?;
        let (cpu, wall) = (cpu_time() - cpu, wall.elapsed());
        if started != due {
            return Err(format!("a tick started {started} syncs, {due} were due"));
        }
        let idle = cpu_time();
        hivesync::worker::schedule_due(engine, HOLD)
            .await
            .map_err(|e| e.to_string())?;
        let idle = cpu_time() - idle;
        if tick == 0 {
            continue; // warm-up
        }
        busy_cpu.push(cpu.as_secs_f64() * 1e3);
        busy_wall.push(wall.as_secs_f64() * 1e3);
        idle_cpu.push(idle.as_secs_f64() * 1e3);
    }
    let mut sorted = busy_cpu.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "tick_cpu_ms_median": median(busy_cpu.clone()),
        "tick_cpu_ms_p90": percentile(&sorted, 0.9),
        "tick_wall_ms_median": median(busy_wall.clone()),
        "idle_tick_cpu_ms_median": median(idle_cpu.clone()),
        "raw": {"tick_cpu_ms": busy_cpu, "tick_wall_ms": busy_wall, "idle_tick_cpu_ms": idle_cpu},
    }))
}

pub async fn run(options: Options) -> Result<Value, String> {
    // on tmpfs when there is one: registering 100,000 projects is 100,000 commits, and
    // the disk's sync time is not what this measures
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| e.to_string())?;
    let small_count = (options.projects / 100).max(options.due * 2);
    eprintln!(
        "scheduler: {} and {} registered, {} due per tick",
        small_count, options.projects, options.due
    );
    let small = engine_with(&base.path().join("small"), small_count).await?;
    let large = engine_with(&base.path().join("large"), options.projects).await?;
    let half = options.ticks.div_ceil(2).max(1);
    let mut runs = Vec::new();
    // alternate, so drift on a shared machine hits both alike
    for round in 0..2 {
        for (name, engine) in [("small", &small), ("large", &large)] {
            let result = measure(engine, options.due, half).await?;
            runs.push(json!({"round": round, "registered": name, "result": result}));
        }
    }
    let median_of = |name: &str, field: &str| {
        median(
            runs.iter()
                .filter(|run| run["registered"] == name)
                .flat_map(|run| {
                    run["result"]["raw"][field]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|v| v.as_f64())
                .collect(),
        )
    };
    let (small_ms, large_ms) = (
        median_of("small", "tick_cpu_ms"),
        median_of("large", "tick_cpu_ms"),
    );
    let (small_idle, large_idle) = (
        median_of("small", "idle_tick_cpu_ms"),
        median_of("large", "idle_tick_cpu_ms"),
    );
    println!(
        "scheduler tick, {} due projects, CPU time (median of {} ticks each):",
        options.due,
        half * 2
    );
    println!(
        "  {:>8} registered: {small_ms:>8.2} ms   idle tick {small_idle:.3} ms",
        small_count
    );
    println!(
        "  {:>8} registered: {large_ms:>8.2} ms   idle tick {large_idle:.3} ms",
        options.projects
    );
    println!("  ratio large/small: {:.2}", large_ms / small_ms);
    Ok(json!({
        "scenario": "scheduler",
        "due_per_tick": options.due,
        "registered_small": small_count,
        "registered_large": options.projects,
        "tick_cpu_ms_small": small_ms,
        "tick_cpu_ms_large": large_ms,
        "idle_tick_cpu_ms_small": small_idle,
        "idle_tick_cpu_ms_large": large_idle,
        "ratio_large_to_small": large_ms / small_ms,
        "runs": runs,
    }))
}
