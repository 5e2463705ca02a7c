//! What any engine operation can fail with, the same for every backend: each backend
//! turns its own errors into these (an unreachable backend is always
//! [`EngineError::Unavailable`]), so no caller sees a backend's types.

use crate::domain::SyncId;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backend failed a command for another reason than being unreachable (each
    /// backend converts its own errors: `embedded` and `redis`).
    #[error("the engine's backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored record is unreadable")]
    Corrupt(#[from] serde_json::Error),
    /// A stored id that is not one, kept outside a JSON record (the Redis project
    /// hash's `active_sync` and `follow_up`); ids inside JSON fail as `Corrupt`.
    #[error("stored record holds an invalid id")]
    InvalidId(#[from] crate::domain::InvalidId),
    #[error("engine task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("engine is shutting down")]
    Closed,
    /// The history was trimmed past a resume while it was being replayed.
    #[error("the history moved past a replay in progress")]
    ReplayGap,
    /// The project does not exist (any more): deleted, maybe while this ran.
    #[error("the project is gone")]
    ProjectGone,
    /// The engine cannot be reached now (a connection refused, dropped or timed out),
    /// as each backend tells it: callers answer "try again shortly", not "broken".
    #[error("the engine cannot be reached")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The project lock this write was made under is no longer held: another worker
    /// owns the job now, so this one must stop without writing anything.
    #[error("the project lock was lost to another worker")]
    Fenced,
    /// A checked write lost to concurrent changes of the same project too many times.
    #[error("the project kept changing under a write")]
    Contended,
    /// A sync id that was not made by `SyncId::generate_for` its project.
    #[error("sync id {0} does not belong to its project's partition")]
    ForeignSyncId(SyncId),
    /// A failpoint armed to fail this step ([`crate::failpoint`]; test builds only).
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

impl EngineError {
    /// A stored record that does not parse (its JSON, an id or its URL): reading it
    /// again fails the same way, so callers skip or drop it rather than retry.
    pub fn is_unreadable_record(&self) -> bool {
        matches!(self, EngineError::Corrupt(_) | EngineError::InvalidId(_))
    }
}
