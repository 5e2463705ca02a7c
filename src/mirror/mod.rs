//! Mirrors on disk, with gitoxide. Blocking code only: callers run it on the blocking
//! pool and stop it through the interrupt flag. Knows nothing of jobs, events, HTTP or
//! the wire's error codes. [`layout`] says where everything lives.

mod blob;
mod changes;
mod checkout;
mod diff;
mod error;
mod fetch;
pub mod health;
pub mod housekeeping;
mod large_files;
pub mod layout;
pub mod progress;
pub mod quota;
pub mod read;
pub mod search;
mod snapshot;
mod spare;
mod sync;
pub mod watch;

use std::path::PathBuf;

use crate::domain::ProjectId;

pub use error::MirrorError;
pub use health::{health_check, inspect};
pub use layout::Layout;
pub use progress::{Counters, sample_progress};
pub use quota::Quota;
pub use sync::sync;

/// Where a step of a sync is; the worker turns these into stage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Fetching,
    UpdatingFiles,
    Cleaning,
    Finalizing,
}

/// What one sync of a mirror asks for.
pub struct SyncSpec<'a> {
    pub project: &'a ProjectId,
    /// The URL to fetch from, credentials included: never logged.
    pub url: &'a crate::domain::RepoUrl,
    pub branch: &'a str,
    /// `core.sshCommand` for this sync: the key and host-key policy (ssh URLs only)
    pub ssh_command: Option<String>,
    /// The login for an http(s) remote, from the project's named credential; without
    /// one, userinfo in the URL is used.
    pub http_identity: Option<HttpIdentity>,
    /// CAs trusted for HTTPS instead of the system's
    pub https_ca_file: Option<PathBuf>,
    /// For http(s): the host name and the address the private-host guard checked; the
    /// connection goes to that address, whatever the name resolves to by then.
    pub pinned: Option<(String, std::net::SocketAddr)>,
    /// The fencing token of the worker's project lock; the mirror refuses older ones.
    pub fence: u64,
    /// `HIVESYNC_MIN_FREE_BYTES`: checked before fetching, and before checking out
    /// with what the checkout would write added
    pub min_free_bytes: u64,
    /// what the mirror may hold: checked after the fetch, before anything is written
    pub quota: Quota,
    /// what the owner's other mirrors hold ([`Layout::footprint`]), for
    /// `quota.user_bytes`
    pub owner_other_bytes: u64,
}

/// A user name and token for an http(s) remote. Never logged.
#[derive(Clone)]
pub struct HttpIdentity {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for HttpIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpIdentity")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub commit: String,
    pub previous_commit: Option<String>,
    /// The repository was unusable and was re-created from scratch.
    pub repaired: bool,
    /// Objects and pack bytes received (zero when the remote had nothing new).
    pub objects: u64,
    pub bytes: u64,
    /// what changed since `previous_commit`
    pub changes: crate::protocol::Changes,
    /// how the current tree was found still exact or not, when the commit had not
    /// changed (`None`: it had, or there was no tree)
    pub snapshot_check: Option<SnapshotCheck>,
}

/// How a sync with nothing new upstream told whether the current tree is still
/// exactly the commit's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotCheck {
    /// the tree's watch had seen no change since a stat pass verified it
    Watched,
    /// a stat pass of every file found it exact (its watch is set from now on)
    StatPass,
    /// the watch saw a change: a fresh tree was written
    Touched,
    /// the stat pass found a difference: a fresh tree was written
    Changed,
}

impl SnapshotCheck {
    pub const ALL: [SnapshotCheck; 4] = [
        SnapshotCheck::Watched,
        SnapshotCheck::StatPass,
        SnapshotCheck::Touched,
        SnapshotCheck::Changed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotCheck::Watched => "watched",
            SnapshotCheck::StatPass => "stat_pass",
            SnapshotCheck::Touched => "touched",
            SnapshotCheck::Changed => "changed",
        }
    }
}
