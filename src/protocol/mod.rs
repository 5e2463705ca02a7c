//! Wire types of the v1 contract: REST bodies, WebSocket frames, job envelopes and the
//! events that flow from workers to hubs. Serde only — no IO, no storage types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{ProjectId, SyncId};

/// A user-visible event id. Ids increase per user, so a client resumes from the last
/// one it saw.
pub type EventId = u64;

/// Where the WebSocket is served (the contract's `GET /api/v1/ws`).
pub const WS_PATH: &str = "/api/v1/ws";
/// Close code for a client that could not keep up; it should resume (4000–4499:
/// reconnect allowed).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code when the token the socket was opened with expires: reconnect with a
/// fresh token (and `last_event_id`, to miss nothing).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// Stages a sync moves through, in the contract's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    Queued,
    Running,
    UpdatingFiles,
    Cleaning,
    Finalizing,
    Completed,
    Failed,
}

impl SyncStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, SyncStatus::Completed | SyncStatus::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Queued => "queued",
            SyncStatus::Running => "running",
            SyncStatus::UpdatingFiles => "updating_files",
            SyncStatus::Cleaning => "cleaning",
            SyncStatus::Finalizing => "finalizing",
            SyncStatus::Completed => "completed",
            SyncStatus::Failed => "failed",
        }
    }
}

/// Machine-readable failure codes of a sync (API.md "Sync failures").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncErrorCode {
    RepoAuthFailed,
    RepoNotFound,
    NetworkError,
    StorageFull,
    MirrorCorrupt,
    Timeout,
    BackendError,
    /// over a mirror quota (v1.2): not retried
    RepoTooLarge,
}

impl SyncErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncErrorCode::RepoAuthFailed => "repo_auth_failed",
            SyncErrorCode::RepoNotFound => "repo_not_found",
            SyncErrorCode::NetworkError => "network_error",
            SyncErrorCode::StorageFull => "storage_full",
            SyncErrorCode::MirrorCorrupt => "mirror_corrupt",
            SyncErrorCode::Timeout => "timeout",
            SyncErrorCode::BackendError => "backend_error",
            SyncErrorCode::RepoTooLarge => "repo_too_large",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SyncError {
    pub code: SyncErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RetryWait {
    pub attempt: u32,
    pub retry_at: String,
    pub error: SyncError,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub percent: u8,
    pub objects: u64,
    pub bytes: u64,
}

/// What started a sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `POST /api/v1/repo/sync` (and records from before triggers were kept)
    #[default]
    Api,
    Webhook,
    Schedule,
    /// a mirror found damaged by the periodic health check
    Repair,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Webhook => "webhook",
            Trigger::Schedule => "schedule",
            Trigger::Repair => "repair",
        }
    }
}

/// What a completed sync brought, from the object database: commits between the
/// previous head and the new one (`None` on a first sync), whether history was
/// rewritten, and how many files differ between the two trees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Changes {
    pub commits: Option<u64>,
    pub forced: bool,
    pub files_changed: u64,
    /// the commit walk stopped at its cap: `commits` is a lower bound
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commits_capped: bool,
}

/// `GET /api/v1/repo/sync/{id}` and the stored sync record are the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SyncRecord {
    #[schema(value_type = String)]
    pub sync_id: SyncId,
    #[schema(value_type = String)]
    pub project_id: ProjectId,
    pub status: SyncStatus,
    pub progress: Option<Progress>,
    pub commit: Option<String>,
    pub previous_commit: Option<String>,
    pub attempt: u32,
    pub queued_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub error: Option<SyncError>,
    #[serde(default)]
    pub trigger: Trigger,
    /// set when the sync completed
    #[serde(default)]
    pub changes: Option<Changes>,
}

/// The last failed sync of a project, until a success clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LastError {
    pub code: SyncErrorCode,
    pub message: String,
    pub at: String,
}

/// Where a project's schedule stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleView {
    /// null when the project syncs on demand only, or is paused
    pub next_sync_at: Option<String>,
    pub paused: bool,
    /// the error code of the failure that paused it
    pub paused_reason: Option<String>,
    pub consecutive_failures: u32,
}

/// A registered project as shown to its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    #[schema(value_type = String)]
    pub project_id: ProjectId,
    pub name: String,
    /// Always without userinfo.
    pub repo_url: String,
    pub branch: String,
    pub owner: String,
    pub created_at: String,
    pub credential: Option<String>,
    pub last_status: Option<SyncStatus>,
    pub last_synced_at: Option<String>,
    pub commit: Option<String>,
    pub sync_interval_s: Option<u64>,
    pub schedule: ScheduleView,
    pub last_attempt_at: Option<String>,
    pub last_success_at: Option<String>,
    pub last_error: Option<LastError>,
    /// whether push webhooks are on (the secret itself is never shown again)
    pub webhook: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// an allowed scheme (HIVESYNC_ALLOWED_SCHEMES, `https,ssh` by default) on a
    /// public host; no userinfo (name a credential instead)
    #[schema(min_length = 1, max_length = 4096)]
    pub repo_url: String,
    /// default `main`
    #[serde(default = "default_branch")]
    #[schema(min_length = 1, max_length = 255)]
    pub branch: String,
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub sync_interval_s: Option<u64>,
}

/// `PATCH /api/v1/projects/{id}`: a field left out is unchanged; `credential` and
/// `sync_interval_s` may be set to null.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchProjectRequest {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub credential: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    pub sync_interval_s: Option<Option<u64>>,
}

/// A field that is present (its value may be null), told apart from one left out.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// `POST /api/v1/projects/{id}/webhook`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookCreated {
    pub url: String,
    pub secret: String,
}

/// `GET /api/v1/repo/metadata`: the head of the last completed sync, without contents.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Metadata {
    #[schema(value_type = String)]
    pub project_id: ProjectId,
    pub commit: String,
    pub branch: String,
    pub subject: String,
    pub author: String,
    pub committed_at: String,
    pub files: u64,
    pub bytes: u64,
    pub last_success_at: Option<String>,
}

fn default_branch() -> String {
    "main".to_owned()
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SyncRequest {
    pub project_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SyncAccepted {
    #[schema(value_type = String)]
    pub sync_id: SyncId,
    #[schema(value_type = String)]
    pub project_id: ProjectId,
    pub status: SyncStatus,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub coalesced: bool,
}

impl SyncAccepted {
    /// The answer naming `record`: a sync just queued (`created`), or one joined.
    pub fn of(record: SyncRecord, created: bool) -> Self {
        Self {
            sync_id: record.sync_id,
            project_id: record.project_id,
            status: record.status,
            coalesced: !created,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MobileProject {
    #[schema(value_type = String)]
    pub project_id: ProjectId,
    pub name: String,
    pub branch: String,
    pub last_status: Option<SyncStatus>,
    pub last_synced_at: Option<String>,
    pub commit: Option<String>,
    pub sync_interval_s: Option<u64>,
    pub schedule: ScheduleView,
    pub last_attempt_at: Option<String>,
    pub last_success_at: Option<String>,
    pub last_error: Option<LastError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    RepoSyncSuccess,
    RepoSyncFailed,
    RepoMirrorRepaired,
    /// scheduled syncs of the project stopped after repeated failures
    RepoSyncPaused,
}

/// What happened, before the event log gives it an id. Published by workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum EventBody {
    #[serde(rename = "sync.stage")]
    SyncStage {
        sync_id: String,
        project_id: String,
        stage: SyncStatus,
        progress: Option<Progress>,
        at: String,
        /// Set while a failed attempt waits for its retry: which attempt failed,
        /// why, and when the next one starts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry: Option<RetryWait>,
    },
    #[serde(rename = "notification")]
    Notification {
        kind: NotificationKind,
        sync_id: String,
        project_id: String,
        commit: Option<String>,
        error: Option<SyncError>,
        at: String,
        /// success notifications: the head before this sync (null on a first sync)
        #[serde(default)]
        previous_commit: Option<String>,
        /// success notifications: what the sync brought (null on the others)
        #[serde(default)]
        changes: Option<Changes>,
        /// what started the sync (absent in events stored before it was sent)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trigger: Option<Trigger>,
    },
}

impl EventBody {
    pub fn project_id(&self) -> &str {
        match self {
            EventBody::SyncStage { project_id, .. }
            | EventBody::Notification { project_id, .. } => project_id,
        }
    }

    /// Stage events that only move a progress bar may be stored without an fsync;
    /// stage changes and notifications are stored durably.
    pub fn is_progress_only(&self) -> bool {
        matches!(
            self,
            EventBody::SyncStage {
                stage: SyncStatus::Running,
                progress: Some(_),
                ..
            }
        )
    }
}

/// An event in a user's history: the body plus its per-user id. Serialized, this is the
/// exact frame sent on the socket and returned by `GET /api/v1/notifications`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    #[schema(value_type = u64)]
    pub id: EventId,
    #[serde(skip)]
    pub user: String,
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    pub fn project_id(&self) -> &str {
        self.body.project_id()
    }
}

/// Server → client frames other than events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlFrame {
    Hello {
        connection_id: String,
        #[schema(value_type = u64)]
        last_event_id: EventId,
    },
    ResyncRequired,
    Pong,
}

/// A frame the server sends: on the socket, and as an item of
/// `GET /api/v1/notifications` (an event, or first, when the resume point is older
/// than the kept history, a `resync_required` frame).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ServerFrame {
    Event(Event),
    Control(ControlFrame),
}

/// The answer to a webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum WebhookOutcome {
    /// 202: a push to the tracked branch; the sync it started or joined
    Accepted(SyncAccepted),
    /// 202: a push to the tracked branch over the owner's sync budget: acknowledged,
    /// and synced once the budget allows (pushes meanwhile join that one sync)
    Throttled {
        #[schema(value_type = String)]
        project_id: ProjectId,
        coalesced: bool,
        throttled: bool,
        /// when the sync is expected to start, seconds from now
        retry_after_s: u64,
    },
    /// 200: a delivery id seen in the last 24 hours
    Duplicate { duplicate: bool },
    /// 200: a ping, another event, or a push to another branch
    Ignored { ignored: String },
}

/// `GET /healthz`, and `/readyz`'s body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` (healthz), `ready` or `not_ready` (readyz)
    pub status: String,
    /// readyz: the engine answered a ping
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<bool>,
    /// readyz: `embedded` or `redis`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir_writable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_bytes: Option<u64>,
}

/// Client → server frames.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Subscribe { project_ids: Vec<String> },
    Ping,
}

/// A job envelope: what a worker needs to find the work. Everything else is read
/// from the store when the job starts, so a stale envelope can never carry stale state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub sync_id: SyncId,
    pub project_id: ProjectId,
    pub owner: String,
    /// what asked for the sync: a person's request goes ahead of the same owner's
    /// scheduled and repair syncs (jobs queued before this field read as `api`)
    #[serde(default)]
    pub trigger: Trigger,
    /// when it was requested, µs since the epoch: its place in line among all the
    /// owner's jobs, whichever stream or shard it is on, and kept when a job is put
    /// back at the end of one (0 for jobs queued before this field)
    #[serde(default)]
    pub queued_us: u64,
}

/// Now, in µs since the epoch (a [`Job::queued_us`]).
pub fn now_epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_frame_has_contract_fields() {
        let event = Event {
            id: 7,
            user: "alice".into(),
            body: EventBody::SyncStage {
                sync_id: "s".into(),
                project_id: "p".into(),
                stage: SyncStatus::UpdatingFiles,
                progress: Some(Progress {
                    percent: 40,
                    objects: 3,
                    bytes: 10,
                }),
                at: "2026-01-01T00:00:00Z".into(),
                retry: None,
            },
        };
        let value = serde_json::to_value(&event).expect("serializable");
        assert_eq!(value["type"], "sync.stage");
        assert_eq!(value["id"], 7);
        assert_eq!(value["stage"], "updating_files");
        assert_eq!(value["progress"]["percent"], 40);
        assert!(
            value.get("user").is_none(),
            "the user id is never on the wire"
        );
        let back: Event = serde_json::from_value(value).expect("round trip");
        assert_eq!(back.body, event.body);
    }

    #[test]
    fn client_frames_parse() {
        let sub: ClientFrame =
            serde_json::from_str(r#"{"type":"subscribe","project_ids":["a"]}"#).expect("valid");
        assert_eq!(
            sub,
            ClientFrame::Subscribe {
                project_ids: vec!["a".into()]
            }
        );
        let ping: ClientFrame = serde_json::from_str(r#"{"type":"ping"}"#).expect("valid");
        assert_eq!(ping, ClientFrame::Ping);
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
    }
}
