//! What the engine stores and hands out: projects, locks, leases, changes, history
//! pages and scheduler claims.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{ProjectId, RepoUrl, SyncId};
use crate::protocol::{Event, Job, LastError, ProjectView, ScheduleView, SyncStatus, Trigger};

/// A worker's exclusive hold on one project's mirror. `fence` grows with every grant,
/// so a holder that lost the lock (paused, partitioned, presumed dead) is recognized by
/// its older token wherever it tries to write: the store and the mirror's fence file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectLock {
    pub project_id: ProjectId,
    pub fence: u64,
}

/// The fence for a new lock grant: the wall clock in microseconds, and always above the
/// last grant, so fences keep growing across restarts of the process that grants them.
pub fn next_fence(last: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_micros() as u64)
        .unwrap_or(0);
    now.max(last + 1)
}

/// What a live subscription delivers: events, and a mark that the feed was broken and
/// is whole again (events published meanwhile are only in the users' histories).
// nearly every item is an event; boxing them all to shrink the rare marker would cost
// an allocation per event
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Live {
    Event(Event),
    Reconnected,
}

/// A registered project as stored. Holds the repo URL as given (it may carry userinfo),
/// so it is never serialized to a client: [`Project::view`] is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Project {
    pub project_id: ProjectId,
    pub name: String,
    /// as given (it may carry an ssh user); stored whole, shown redacted
    #[serde(with = "crate::domain::repo_url::stored")]
    pub repo_url: RepoUrl,
    pub branch: String,
    pub owner: String,
    pub created_at: String,
    pub credential: Option<String>,
    pub last_status: Option<SyncStatus>,
    pub last_synced_at: Option<String>,
    pub commit: Option<String>,
    /// The sync that is queued or running, if any; requests coalesce onto it while it
    /// is queued.
    pub active_sync: Option<SyncId>,
    /// The sync requested while the active one was running: queued when that one ends,
    /// so a push that landed mid-fetch is not left behind. Requests join it meanwhile.
    #[serde(default)]
    pub follow_up: Option<SyncId>,
    /// scheduled syncs every this many seconds; `None` = on demand only
    #[serde(default)]
    pub sync_interval_s: Option<u64>,
    #[serde(default)]
    pub last_attempt_at: Option<String>,
    #[serde(default)]
    pub last_success_at: Option<String>,
    #[serde(default)]
    pub last_error: Option<LastError>,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub paused_reason: Option<String>,
    /// when the scheduler next syncs it (ms since the epoch), while it has an interval
    /// and is not paused
    #[serde(default)]
    pub next_sync_ms: Option<u64>,
    /// set while push webhooks are on: the secret is derived from this, never stored
    #[serde(default)]
    pub webhook: Option<WebhookKey>,
}

/// What a project's webhook secret is derived from (with the server's webhook key):
/// a random nonce that rotation replaces. The secret itself is stored nowhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookKey {
    pub nonce: String,
    pub created_at: String,
}

impl Project {
    /// A project as registered: nothing synced, nothing scheduled yet.
    pub fn new(
        project_id: ProjectId,
        name: String,
        repo_url: RepoUrl,
        branch: String,
        owner: String,
        credential: Option<String>,
        sync_interval_s: Option<u64>,
    ) -> Self {
        Self {
            project_id,
            name,
            repo_url,
            branch,
            owner,
            created_at: crate::domain::now_rfc3339(),
            credential,
            last_status: None,
            last_synced_at: None,
            commit: None,
            active_sync: None,
            follow_up: None,
            sync_interval_s,
            last_attempt_at: None,
            last_success_at: None,
            last_error: None,
            consecutive_failures: 0,
            paused: false,
            paused_reason: None,
            next_sync_ms: None,
            webhook: None,
        }
    }

    pub fn schedule_view(&self) -> ScheduleView {
        ScheduleView {
            next_sync_at: self
                .next_sync_ms
                .filter(|_| self.sync_interval_s.is_some() && !self.paused)
                .map(crate::domain::format_epoch_ms),
            paused: self.paused,
            paused_reason: self.paused_reason.clone(),
            consecutive_failures: self.consecutive_failures,
        }
    }

    pub fn view(&self) -> ProjectView {
        ProjectView {
            project_id: self.project_id.clone(),
            name: self.name.clone(),
            repo_url: self.repo_url.redacted().to_owned(),
            branch: self.branch.clone(),
            owner: self.owner.clone(),
            created_at: self.created_at.clone(),
            credential: self.credential.clone(),
            last_status: self.last_status,
            last_synced_at: self.last_synced_at.clone(),
            commit: self.commit.clone(),
            sync_interval_s: self.sync_interval_s,
            schedule: self.schedule_view(),
            last_attempt_at: self.last_attempt_at.clone(),
            last_success_at: self.last_success_at.clone(),
            last_error: self.last_error.clone(),
            webhook: self.webhook.is_some(),
        }
    }
}

/// What `put_sync` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The record is gone (its project was deleted); nothing was written.
    Gone,
    Stored,
    /// Stored, and this failure paused the project's scheduled syncs.
    StoredAndPaused,
}

impl Put {
    pub fn stored(self) -> bool {
        self != Put::Gone
    }
}

/// A change to a project's settings (`PATCH`, resume, webhook on/off); a `None` field
/// is left as it is.
#[derive(Debug, Clone, Default)]
pub struct ProjectChange {
    pub name: Option<String>,
    pub credential: Option<Option<String>>,
    pub sync_interval_s: Option<Option<u64>>,
    /// clear a pause and the failure count, and schedule the next sync now
    pub resume: bool,
    pub webhook: Option<Option<WebhookKey>>,
    /// due again this long from now (a scheduled sync held back by its owner's
    /// budget); only while it has an interval and is not paused
    pub due_in: Option<Duration>,
}

/// Events after a resume point. `gap` is set when the point is older than the kept
/// history, or newer than the newest event (the history was lost), so the client has
/// to resynchronize instead of trusting the list.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub events: Vec<Event>,
    pub gap: bool,
}

/// A job handed to one worker. Complete it, or release it back to the queue.
#[derive(Debug, Clone)]
pub struct Lease {
    pub job: Job,
    pub token: String,
    /// How many times the job has been handed out: above 1, earlier workers died or
    /// hung running it.
    pub deliveries: u32,
}

/// A job handed out this many times without finishing killed every worker that took
/// it (a crash, an OOM kill); it fails instead of taking down the next one.
pub const MAX_DELIVERIES: u32 = 5;

impl Lease {
    /// A lease for work on a project outside any queued job (removing a deleted
    /// project's mirror), so it can take the project lock like a worker does. Its
    /// sync id names no stored sync.
    pub fn maintenance(project_id: &ProjectId) -> Self {
        Self {
            job: Job {
                sync_id: SyncId::generate_for(project_id),
                project_id: project_id.clone(),
                owner: String::new(),
                trigger: Trigger::Repair,
                queued_us: 0,
            },
            token: String::new(),
            deliveries: 1,
        }
    }
}

/// A due project handed to one scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claimed {
    pub project_id: ProjectId,
    /// when it was due (ms since the epoch), for the schedule-lag metric
    pub due_ms: u64,
}
