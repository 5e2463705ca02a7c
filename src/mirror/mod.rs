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
pub mod watch;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use gix::progress::tree::Root;

use crate::domain::ProjectId;

pub use error::MirrorError;
pub use health::{health_check, inspect};
pub use layout::Layout;
pub use progress::{Counters, sample_progress};
pub use quota::Quota;

use checkout::{Reuse, Trust, checkout, snapshot_is_exact, update_spare};
use fetch::{fetch, open_or_init};
use layout::{check_fence, claim_fence, remove_if_exists, unique_suffix};
use snapshot::{current_snapshot, point_head_at, remove_other_snapshots, swap_link};
use watch::Seen;

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
    pub url: &'a str,
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

/// Brings the mirror of `spec.project` to exactly the head of `spec.branch`: fetch (a
/// clone when there is no repository yet), check the commit out into a new snapshot,
/// then swap it in. `on_phase` is called as each phase starts; byte and object counts
/// go to `progress`, which the caller samples with [`sample_progress`].
///
/// A repository that will not open, or whose objects turn out damaged or missing, is
/// deleted and cloned again once (`repaired`); the current tree stays in place until
/// the new one is ready.
pub fn sync(
    layout: &Layout,
    spec: &SyncSpec<'_>,
    progress: &Root,
    interrupt: &AtomicBool,
    on_phase: &(dyn Fn(Phase) + Sync),
) -> Result<SyncOutcome, MirrorError> {
    match sync_once(layout, spec, progress, interrupt, on_phase, false) {
        Err(MirrorError::Corrupt(cause)) => {
            tracing::warn!(project_id = %spec.project, error = %cause, "mirror is damaged; cloning it again");
            remove_if_exists(&layout.git_dir(spec.project))?;
            sync_once(layout, spec, progress, interrupt, on_phase, true).map_err(|err| match err {
                MirrorError::Corrupt(cause) => MirrorError::Corrupt(cause),
                other => other,
            })
        }
        other => other,
    }
}

fn sync_once(
    layout: &Layout,
    spec: &SyncSpec<'_>,
    progress: &Root,
    interrupt: &AtomicBool,
    on_phase: &(dyn Fn(Phase) + Sync),
    recloned: bool,
) -> Result<SyncOutcome, MirrorError> {
    on_phase(Phase::Fetching);
    let fence_file = layout.fence_file(spec.project);
    claim_fence(&fence_file, spec.fence)?;
    layout.check_floor(spec.min_free_bytes)?;
    let git_dir = layout.git_dir(spec.project);
    let mut overrides: Vec<String> = spec
        .ssh_command
        .iter()
        .map(|command| format!("core.sshCommand={command}"))
        .collect();
    // a redirect could lead from the checked host to any other, private ones included
    overrides.push("http.followRedirects=false".to_owned());
    // a sync killed while it updated refs or the index left their lock files
    let stale = layout::remove_stale_locks(&git_dir)?;
    if stale > 0 {
        tracing::warn!(project_id = %spec.project, stale, "removed lock files a killed sync left behind");
    }
    let (mut repo, mut reopened) = open_or_init(&git_dir, &overrides)?;
    if let Err(problem) = health_check(&repo, spec.branch) {
        tracing::warn!(project_id = %spec.project, %problem, "mirror failed its health check; cloning it again");
        drop(repo);
        remove_if_exists(&git_dir)?;
        (repo, _) = open_or_init(&git_dir, &overrides)?;
        reopened = true;
    }
    let repaired = recloned || reopened;
    let local_branch = format!("refs/heads/{}", spec.branch);
    let previous_commit = repo
        .try_find_reference(local_branch.as_str())
        .ok()
        .flatten()
        .and_then(|mut reference| reference.peel_to_id().ok())
        .map(|id| id.to_string());

    let (commit, transfer) = fetch(&repo, spec, progress, interrupt)?;
    crate::failpoint::hit("sync.after_fetch")
        .map_err(|e| MirrorError::Io(std::io::Error::other(e)))?;
    check_interrupt(interrupt)?;
    let objects_bytes = quota::check_objects(&git_dir, &spec.quota)?;

    // nothing new upstream and the current tree is exactly what the last sync wrote:
    // nothing to write (a full checkout would rewrite every file for nothing)
    // the tree being replaced and the index it was written with: kept as it is when
    // nothing changed, else the source of the files that did not change
    let worktree = layout.worktree(spec.project);
    let trees_dir = layout.trees_dir(spec.project);
    let previous_tree = current_snapshot(&worktree);
    let previous_index = if repaired {
        None
    } else {
        repo.open_index().ok()
    };
    let commit_hex = commit.to_string();
    let check = match (&previous_tree, &previous_index) {
        (Some(current), Some(index))
            if previous_commit.as_deref() == Some(commit_hex.as_str())
                && current
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with(&commit_hex[..12])) =>
        {
            Some(match watched(current, index) {
                Seen::Untouched => SnapshotCheck::Watched,
                Seen::Touched(_) => SnapshotCheck::Touched,
                Seen::Unknown if verify_under_watch(index, current) => SnapshotCheck::StatPass,
                Seen::Unknown => SnapshotCheck::Changed,
            })
        }
        _ => None,
    };
    if let (Some(SnapshotCheck::Watched | SnapshotCheck::StatPass), Some(current)) =
        (check, &previous_tree)
    {
        on_phase(Phase::UpdatingFiles);
        on_phase(Phase::Cleaning);
        check_fence(&fence_file, spec.fence)?;
        remove_other_snapshots(&trees_dir, &[current], None)?;
        on_phase(Phase::Finalizing);
        return Ok(SyncOutcome {
            commit: commit_hex,
            changes: changes::changes(&repo, previous_commit.as_deref(), commit, || 0),
            previous_commit,
            repaired,
            objects: transfer.objects,
            bytes: transfer.bytes,
            snapshot_check: check,
        });
    }

    on_phase(Phase::UpdatingFiles);
    // from the headers, before a byte is written: over a limit, the sync fails and the
    // current tree stays
    let size = quota::check_tree(&repo, commit, &spec.quota, interrupt)?;
    let footprint = size.bytes.saturating_add(objects_bytes);
    let owner_total = spec.owner_other_bytes.saturating_add(footprint);
    if owner_total > spec.quota.user_bytes {
        return Err(MirrorError::TooLarge(format!(
            "with this branch the owner's mirrors would hold {owner_total} bytes, over HIVESYNC_MAX_USER_BYTES ({}); nothing was written",
            spec.quota.user_bytes
        )));
    }
    // the floor must still hold once the files the previous tree cannot lend are
    // written
    let lent = previous_index
        .as_ref()
        .filter(|_| previous_tree.is_some())
        .map_or(0, |index| quota::reusable_bytes(&size, index));
    layout.check_floor(
        spec.min_free_bytes
            .saturating_add(size.bytes.saturating_sub(lent)),
    )?;
    std::fs::create_dir_all(&trees_dir)?;
    // held to the end: no spare is built while this sync changes the trees
    let trees_lock = spare::lock(&trees_dir)?;
    let snapshot = trees_dir.join(format!("{}-{}", &commit_hex[..12], unique_suffix()));
    // the previous tree's unchanged files are reused, not written: on the watch's word
    // where it vouches for them (no stat each; a path it saw touched is written anew,
    // as an edit can keep a file's size and time), else by git's stat test
    let source = previous_index.as_ref().zip(previous_tree.as_deref());
    let trust_of = |index: &gix::index::File, dir: &std::path::Path| match watched(dir, index) {
        Seen::Untouched => Trust::Watched(Default::default()),
        Seen::Touched(paths) => Trust::Watched(paths),
        Seen::Unknown => Trust::StatTest,
    };
    let trust = source.map(|(index, dir)| trust_of(index, dir));
    let linked_on_trust = trust.as_ref().and_then(|trust| match trust {
        Trust::Watched(touched) => Some(touched.clone()),
        Trust::StatTest => None,
    });
    // the previous tree's spare, brought to the commit in place; the usual checkout,
    // linking from the previous tree, where there is none or it cannot be used
    let from_spare = match (source, previous_tree.as_deref()) {
        (Some((index, _)), Some(previous)) => spare::take(&trees_lock, previous).map(|dir| {
            let reuse = Reuse {
                dir: &dir,
                index,
                trust: trust.clone().unwrap_or(Trust::StatTest),
            };
            // checked whole before it is swapped in: its index written first, so the
            // watch set for the stat pass vouches for the tree as that index records
            // it, and the next no-op sync need look at no file
            let updated = update_spare(&repo, commit, &dir, reuse, progress, interrupt).and_then(
                |mut index| {
                    std::fs::rename(&dir, &snapshot)?;
                    index
                        .write(Default::default())
                        .map_err(|err| MirrorError::Git(Box::new(err)))?;
                    if !verify_under_watch(&index, &snapshot) {
                        return Err(MirrorError::Checkout(
                            "the updated spare is not exact".into(),
                        ));
                    }
                    Ok(index)
                },
            );
            if updated.is_err() {
                forget_watch(&snapshot);
                let _ = remove_if_exists(&dir);
                let _ = remove_if_exists(&snapshot);
            }
            updated
        }),
        _ => None,
    };
    let mut index_written = matches!(from_spare, Some(Ok(_)));
    let mut written = match from_spare {
        Some(Err(MirrorError::Interrupted)) => Err(MirrorError::Interrupted),
        Some(Ok(index)) => Ok(index),
        other => {
            if let Some(Err(err)) = other {
                tracing::debug!(project_id = %spec.project, error = %err, "the spare tree could not be used; writing a new one");
            }
            let reuse = source
                .zip(trust)
                .map(|((index, dir), trust)| Reuse { dir, index, trust });
            checkout(
                &repo, commit, &snapshot, &git_dir, reuse, progress, interrupt,
            )
        }
    };
    // files reused on the watch's word must not have changed before they were reused
    // (a file replaced meanwhile would be linked as it is now): the watch is asked
    // again, and if it saw anything new the tree is written without links
    if written.is_ok()
        && let (Some(touched), Some((index, dir))) = (&linked_on_trust, source)
        && !matches!(trust_of(index, dir), Trust::Watched(now) if now == *touched)
    {
        tracing::warn!(project_id = %spec.project, "the mirror's tree changed during the sync; writing every file");
        forget_watch(&snapshot);
        let _ = remove_if_exists(&snapshot);
        index_written = false;
        written = checkout(
            &repo, commit, &snapshot, &git_dir, None, progress, interrupt,
        );
    }
    if let Err(err) = written {
        let _ = remove_if_exists(&snapshot);
        return Err(err);
    }
    let mut index = written.expect("checked above");
    check_interrupt(interrupt).inspect_err(|_| {
        let _ = remove_if_exists(&snapshot);
    })?;

    check_fence(&fence_file, spec.fence).inspect_err(|_| {
        let _ = remove_if_exists(&snapshot);
    })?;
    on_phase(Phase::Cleaning);
    // snapshots left behind by a crashed or interrupted sync
    let mut keep = vec![snapshot.as_path()];
    keep.extend(previous_tree.as_deref());
    remove_other_snapshots(&trees_dir, &keep, Some(&trees_lock))?;

    on_phase(Phase::Finalizing);
    if !index_written {
        index
            .write(Default::default())
            .map_err(|err| MirrorError::Git(Box::new(err)))?;
    }
    repo.reference(
        local_branch.as_str(),
        commit,
        gix::refs::transaction::PreviousValue::Any,
        "hivesync: sync",
    )
    .map_err(|err| MirrorError::Git(Box::new(err)))?;
    point_head_at(&repo, &local_branch)?;
    check_fence(&fence_file, spec.fence).inspect_err(|_| {
        let _ = remove_if_exists(&snapshot);
    })?;
    swap_link(&worktree, &snapshot)?;
    // what this mirror now holds, for its owner's total (a lost write counts as 0
    // until the next sync writes it)
    if let Err(err) = std::fs::write(layout.footprint_file(spec.project), footprint.to_string()) {
        tracing::debug!(project_id = %spec.project, error = %err, "could not record the mirror's footprint");
    }
    crate::failpoint::hit("sync.after_swap")
        .map_err(|e| MirrorError::Io(std::io::Error::other(e)))?;
    if let Some(previous) = &previous_tree {
        forget_watch(previous);
        layout.discard(previous)?;
    }
    let files_in_tree = index
        .entries()
        .iter()
        .filter(|entry| !entry.mode.is_sparse())
        .count() as u64;
    verify_in_background(index, snapshot);
    Ok(SyncOutcome {
        commit: commit_hex,
        changes: changes::changes(&repo, previous_commit.as_deref(), commit, || files_in_tree),
        previous_commit,
        repaired,
        objects: transfer.objects,
        bytes: transfer.bytes,
        snapshot_check: check,
    })
}

fn forget_watch(snapshot: &std::path::Path) {
    if let Some(watcher) = watch::watcher() {
        watcher.forget(snapshot);
    }
}

/// What this process's watch knows of `snapshot` as `index` records it
/// ([`watch::Seen`]).
fn watched(snapshot: &std::path::Path, index: &gix::index::File) -> Seen {
    watch::watcher().map_or(Seen::Unknown, |watcher| {
        watcher.seen(snapshot, index.checksum())
    })
}

/// The stat pass, with the snapshot's directories watched from before it starts: when
/// it finds the snapshot exact, later no-op syncs in this process need only ask the
/// watch ([`watched`]).
fn verify_under_watch(index: &gix::index::File, snapshot: &std::path::Path) -> bool {
    let armed = watch::watcher().and_then(|watcher| {
        watcher
            .arm(
                snapshot,
                &watch::directories(index, snapshot),
                index.checksum(),
            )
            .map(|armed| (watcher, armed))
    });
    let exact = snapshot_is_exact(index, snapshot);
    if let Some((watcher, armed)) = armed {
        if exact {
            watcher.verified(snapshot, armed);
        } else {
            watcher.failed(snapshot, armed);
        }
    }
    exact
}

/// After a sync wrote a tree: [`verify_under_watch`] on a thread of its own, off the
/// sync's path (unless the sync did it), so the next no-op sync finds the tree vouched
/// for; then the tree's spare ([`spare::build`]) for the next changed sync. One thread
/// for the process, a few trees waiting at most; past that, the next no-op sync makes
/// the pass itself, as it does when a sync comes before the pass is done, and the next
/// changed sync links the unchanged files itself.
fn verify_in_background(index: gix::index::File, snapshot: PathBuf) {
    type Job = (gix::index::File, PathBuf);
    static QUEUE: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Job>>> =
        std::sync::OnceLock::new();
    if watch::watcher().is_none() {
        return;
    }
    let queue = QUEUE.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Job>(4);
        std::thread::Builder::new()
            .name("hivesync-verify".into())
            .spawn(move || {
                for (index, snapshot) in receiver {
                    // a sync verified it itself while this waited: its watch stands
                    let done = watch::watcher().is_some_and(|w| w.is_watched(&snapshot));
                    let exact = if done {
                        watched(&snapshot, &index) == Seen::Untouched
                    } else {
                        verify_under_watch(&index, &snapshot)
                    };
                    if exact && let Err(err) = spare::build(&index, &snapshot) {
                        tracing::debug!(snapshot = %snapshot.display(), error = %err, "no spare tree");
                    }
                }
            })
            .ok()
            .map(|_| sender)
    });
    if let Some(queue) = queue {
        // full: the next no-op sync verifies it
        let _ = queue.try_send((index, snapshot));
    }
}

fn check_interrupt(interrupt: &AtomicBool) -> Result<(), MirrorError> {
    if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(MirrorError::Interrupted);
    }
    Ok(())
}
