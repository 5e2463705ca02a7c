//! How a project's status and schedule follow from the end of a sync and from changes
//! to its settings. One implementation for both engines: the embedded store applies
//! it inside its write transaction; the Redis store applies it to the project it read
//! and writes the result with a check that nothing changed meanwhile (`rev`).

use serde::{Deserialize, Serialize};

use super::{Project, ProjectChange};
use crate::protocol::{LastError, SyncRecord, SyncStatus};

/// After failures the next scheduled sync waits the interval times 2, 4, then 8 at most.
pub const MAX_BACKOFF_FACTOR: u64 = 8;

/// Rules the stores apply.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// consecutive failures after which scheduled syncs stop
    pub pause_after: u32,
    /// webhook deliveries a project may send: count per period
    pub webhook_rate: (u32, std::time::Duration),
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            pause_after: 5,
            webhook_rate: (60, std::time::Duration::from_secs(60)),
        }
    }
}

/// The part of a project a sync's end and the settings change: its schedule and last
/// outcomes. The Redis engine keeps it as one hash field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freshness {
    pub sync_interval_s: Option<u64>,
    pub last_attempt_at: Option<String>,
    pub last_success_at: Option<String>,
    pub last_error: Option<LastError>,
    pub consecutive_failures: u32,
    pub paused: bool,
    pub paused_reason: Option<String>,
    pub next_sync_ms: Option<u64>,
}

impl Project {
    pub fn freshness(&self) -> Freshness {
        Freshness {
            sync_interval_s: self.sync_interval_s,
            last_attempt_at: self.last_attempt_at.clone(),
            last_success_at: self.last_success_at.clone(),
            last_error: self.last_error.clone(),
            consecutive_failures: self.consecutive_failures,
            paused: self.paused,
            paused_reason: self.paused_reason.clone(),
            next_sync_ms: self.next_sync_ms,
        }
    }

    pub fn set_freshness(&mut self, fresh: Freshness) {
        self.sync_interval_s = fresh.sync_interval_s;
        self.last_attempt_at = fresh.last_attempt_at;
        self.last_success_at = fresh.last_success_at;
        self.last_error = fresh.last_error;
        self.consecutive_failures = fresh.consecutive_failures;
        self.paused = fresh.paused;
        self.paused_reason = fresh.paused_reason;
        self.next_sync_ms = fresh.next_sync_ms;
    }
}

/// How long after a sync the next scheduled one starts: the interval, doubled per
/// consecutive failure up to [`MAX_BACKOFF_FACTOR`] times, times `jitter`.
pub fn next_delay_ms(interval_s: u64, failures: u32, jitter: f64) -> u64 {
    let factor = (1u64 << failures.min(3)).min(MAX_BACKOFF_FACTOR);
    let base = interval_s.saturating_mul(1000).saturating_mul(factor);
    (base as f64 * jitter) as u64
}

/// A factor in [0.9, 1.1): projects registered together with one interval drift apart
/// instead of all coming due in the same tick.
pub fn jitter() -> f64 {
    let mut raw = [0u8; 4];
    if getrandom::fill(&mut raw).is_err() {
        return 1.0;
    }
    0.9 + f64::from(u32::from_le_bytes(raw)) / f64::from(u32::MAX) * 0.2
}

/// A new project: with an interval, its first scheduled sync is due at once.
pub fn at_registration(project: &mut Project, now_ms: u64) {
    project.next_sync_ms = project.sync_interval_s.map(|_| now_ms);
}

/// Applies the end of `record` (completed or failed) to `project`: last attempt and
/// success, last error, the failure count, the pause, the next due time. Returns
/// `true` when this failure paused the project's schedule.
pub fn apply_end(
    project: &mut Project,
    record: &SyncRecord,
    now_ms: u64,
    jitter: f64,
    rules: Rules,
) -> bool {
    let at = record
        .finished_at
        .clone()
        .unwrap_or_else(crate::domain::now_rfc3339);
    project.last_attempt_at = Some(at.clone());
    let mut paused_now = false;
    if record.status == SyncStatus::Completed {
        project.last_success_at = Some(at);
        project.last_error = None;
        project.consecutive_failures = 0;
        project.paused = false;
        project.paused_reason = None;
    } else {
        project.consecutive_failures = project.consecutive_failures.saturating_add(1);
        project.last_error = record.error.as_ref().map(|error| LastError {
            code: error.code,
            message: error.message.clone(),
            at,
        });
        if project.sync_interval_s.is_some()
            && !project.paused
            && project.consecutive_failures >= rules.pause_after.max(1)
        {
            project.paused = true;
            project.paused_reason = record.error.as_ref().map(|e| e.code.as_str().to_owned());
            paused_now = true;
        }
    }
    project.next_sync_ms = match project.sync_interval_s {
        Some(interval) if !project.paused => {
            Some(now_ms + next_delay_ms(interval, project.consecutive_failures, jitter))
        }
        _ => None,
    };
    paused_now
}

/// Applies a settings change. A new interval schedules the next sync one interval
/// from now (at once if the project never synced); none stops the schedule; resume
/// clears the pause and the failure count and makes the next sync due now.
pub fn apply_change(project: &mut Project, change: &ProjectChange, now_ms: u64, jitter: f64) {
    if let Some(name) = &change.name {
        project.name = name.clone();
    }
    if let Some(credential) = &change.credential {
        project.credential = credential.clone();
    }
    if let Some(webhook) = &change.webhook {
        project.webhook = webhook.clone();
    }
    if let Some(interval) = change.sync_interval_s {
        project.sync_interval_s = interval;
        project.next_sync_ms = interval.map(|interval| {
            if project.last_attempt_at.is_none() {
                now_ms
            } else {
                now_ms + next_delay_ms(interval, 0, jitter)
            }
        });
    }
    if change.resume {
        project.paused = false;
        project.paused_reason = None;
        project.consecutive_failures = 0;
        project.next_sync_ms = project.sync_interval_s.map(|_| now_ms);
    }
    if let Some(wait) = change.due_in {
        project.next_sync_ms = Some(now_ms + wait.as_millis() as u64);
    }
    if project.sync_interval_s.is_none() || project.paused {
        project.next_sync_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{SyncError, SyncErrorCode};

    fn project(interval: Option<u64>) -> Project {
        Project::new(
            crate::domain::ProjectId::generate(),
            "n".into(),
            crate::domain::RepoUrl::from_stored("file:///x".into()).expect("a url"),
            "main".into(),
            "alice".into(),
            None,
            interval,
        )
    }

    fn ended(status: SyncStatus) -> SyncRecord {
        SyncRecord {
            sync_id: crate::domain::SyncId::generate(),
            project_id: crate::domain::ProjectId::generate(),
            status,
            progress: None,
            commit: None,
            previous_commit: None,
            attempt: 1,
            queued_at: "2026-01-01T00:00:00Z".into(),
            started_at: None,
            finished_at: Some("2026-01-01T00:00:01Z".into()),
            duration_ms: None,
            error: (status == SyncStatus::Failed).then(|| SyncError {
                code: SyncErrorCode::NetworkError,
                message: "down".into(),
            }),
            trigger: Default::default(),
            changes: None,
        }
    }

    #[test]
    fn failures_back_off_doubling_to_eight_times_then_pause() {
        let rules = Rules::default();
        let mut p = project(Some(60));
        let mut delays = Vec::new();
        let mut paused_at = None;
        for n in 1..=6 {
            if apply_end(&mut p, &ended(SyncStatus::Failed), 0, 1.0, rules) {
                paused_at = Some(n);
            }
            delays.push(p.next_sync_ms);
        }
        assert_eq!(
            &delays[..4],
            &[Some(120_000), Some(240_000), Some(480_000), Some(480_000)]
        );
        assert_eq!(paused_at, Some(5), "paused once, by the fifth failure");
        assert!(p.paused && delays[4].is_none() && delays[5].is_none());
        assert_eq!(p.paused_reason.as_deref(), Some("network_error"));
        assert_eq!(p.consecutive_failures, 6);
        assert!(p.last_error.is_some() && p.last_success_at.is_none());

        assert!(!apply_end(
            &mut p,
            &ended(SyncStatus::Completed),
            0,
            1.0,
            rules
        ));
        assert!(!p.paused && p.paused_reason.is_none() && p.last_error.is_none());
        assert_eq!((p.consecutive_failures, p.next_sync_ms), (0, Some(60_000)));
        assert_eq!(p.last_success_at, p.last_attempt_at);
    }

    #[test]
    fn on_demand_projects_are_never_scheduled_or_paused() {
        let mut p = project(None);
        for _ in 0..10 {
            assert!(!apply_end(
                &mut p,
                &ended(SyncStatus::Failed),
                0,
                1.0,
                Rules::default()
            ));
        }
        assert!(!p.paused && p.next_sync_ms.is_none());
    }

    #[test]
    fn changes_set_stop_and_resume_the_schedule() {
        let mut p = project(None);
        let every = |s| ProjectChange {
            sync_interval_s: Some(s),
            ..Default::default()
        };
        apply_change(&mut p, &every(Some(300)), 1_000, 1.0);
        assert_eq!(p.next_sync_ms, Some(1_000), "never synced: due at once");
        p.last_attempt_at = Some("x".into());
        apply_change(&mut p, &every(Some(300)), 1_000, 1.0);
        assert_eq!(p.next_sync_ms, Some(301_000));
        apply_change(&mut p, &every(None), 1_000, 1.0);
        assert_eq!(p.next_sync_ms, None);

        let mut p = project(Some(60));
        for _ in 0..5 {
            apply_end(&mut p, &ended(SyncStatus::Failed), 0, 1.0, Rules::default());
        }
        assert!(p.paused);
        let resume = ProjectChange {
            resume: true,
            ..Default::default()
        };
        apply_change(&mut p, &resume, 7, 1.0);
        assert!(!p.paused && p.consecutive_failures == 0 && p.next_sync_ms == Some(7));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.9..1.1).contains(&j), "{j}");
        }
    }
}
