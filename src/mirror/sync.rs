//! One sync of a mirror, phase by phase: open (or repair) the repository, fetch,
//! check whether the current tree is already exact, check the room the new tree needs,
//! write it (from the spare or by a linking checkout), then clean up, point the branch
//! and swap the tree in. Blocking code, run on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::progress::tree::Root;

use super::checkout::{Reuse, Trust, checkout, snapshot_is_exact, update_spare};
use super::fetch::{fetch, open_or_init};
use super::layout::{self, Layout, check_fence, claim_fence, remove_if_exists, unique_suffix};
use super::snapshot::{current_snapshot, point_head_at, remove_other_snapshots, swap_link};
use super::watch::{self, Seen};
use super::{
    MirrorError, Phase, SnapshotCheck, SyncOutcome, SyncSpec, changes, health_check, quota, spare,
};
use crate::domain::ProjectId;

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
    let (repo, reopened) = open_mirror(layout, spec)?;
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
    let check = check_unchanged(
        previous_tree.as_deref(),
        previous_index.as_ref(),
        previous_commit.as_deref(),
        &commit_hex,
    );
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
    let footprint = check_room(
        layout,
        spec,
        &repo,
        commit,
        objects_bytes,
        previous_index.as_ref().filter(|_| previous_tree.is_some()),
        interrupt,
    )?;
    std::fs::create_dir_all(&trees_dir)?;
    // held to the end: no spare is built while this sync changes the trees
    let trees_lock = spare::lock(&trees_dir)?;
    let snapshot = trees_dir.join(format!("{}-{}", &commit_hex[..12], unique_suffix()));
    let source = previous_index.as_ref().zip(previous_tree.as_deref());
    let Written {
        mut index,
        index_written,
    } = write_tree(
        &repo,
        &git_dir,
        spec.project,
        commit,
        &snapshot,
        &trees_lock,
        source,
        progress,
        interrupt,
    )?;
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

/// Opens the mirror's repository (initializing it when there is none) with this
/// sync's transport settings, after clearing the lock files a killed sync left; one
/// that fails its health check is deleted and started again. `true` when it was.
fn open_mirror(
    layout: &Layout,
    spec: &SyncSpec<'_>,
) -> Result<(gix::Repository, bool), MirrorError> {
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
    Ok((repo, reopened))
}

/// How the current tree was found to be exactly `commit_hex` (nothing new upstream,
/// and the tree is what the last sync wrote), or `None` when it is of another commit
/// or there is none. Only `Watched` and `StatPass` let the sync skip writing.
fn check_unchanged(
    previous_tree: Option<&Path>,
    previous_index: Option<&gix::index::File>,
    previous_commit: Option<&str>,
    commit_hex: &str,
) -> Option<SnapshotCheck> {
    let (current, index) = previous_tree.zip(previous_index)?;
    let of_commit = previous_commit == Some(commit_hex)
        && current
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(&commit_hex[..12]));
    if !of_commit {
        return None;
    }
    Some(match watched(current, index) {
        Seen::Untouched => SnapshotCheck::Watched,
        Seen::Touched(_) => SnapshotCheck::Touched,
        Seen::Unknown if verify_under_watch(index, current) => SnapshotCheck::StatPass,
        Seen::Unknown => SnapshotCheck::Changed,
    })
}

/// From the headers, before a byte is written: the tree within the quotas, the
/// owner's total within theirs, and the free-space floor still held once the files
/// the previous tree (its index `lender`) cannot lend are written. Over a limit, the
/// sync fails and the current tree stays. Returns what the mirror will hold.
fn check_room(
    layout: &Layout,
    spec: &SyncSpec<'_>,
    repo: &gix::Repository,
    commit: gix::ObjectId,
    objects_bytes: u64,
    lender: Option<&gix::index::File>,
    interrupt: &AtomicBool,
) -> Result<u64, MirrorError> {
    let size = quota::check_tree(repo, commit, &spec.quota, interrupt)?;
    let footprint = size.bytes.saturating_add(objects_bytes);
    let owner_total = spec.owner_other_bytes.saturating_add(footprint);
    if owner_total > spec.quota.user_bytes {
        return Err(MirrorError::TooLarge(format!(
            "with this branch the owner's mirrors would hold {owner_total} bytes, over HIVESYNC_MAX_USER_BYTES ({}); nothing was written",
            spec.quota.user_bytes
        )));
    }
    let lent = lender.map_or(0, |index| quota::reusable_bytes(&size, index));
    layout.check_floor(
        spec.min_free_bytes
            .saturating_add(size.bytes.saturating_sub(lent)),
    )?;
    Ok(footprint)
}

/// A tree written at the new snapshot, with its index (already on disk or not).
struct Written {
    index: gix::index::File,
    index_written: bool,
}

/// Writes `commit`'s tree at `snapshot`: the previous tree's spare brought to the
/// commit in place where there is one, else a checkout that links the files `source`
/// (the previous index and tree) still has. On failure nothing is left at `snapshot`.
#[allow(clippy::too_many_arguments)]
fn write_tree(
    repo: &gix::Repository,
    git_dir: &Path,
    project: &ProjectId,
    commit: gix::ObjectId,
    snapshot: &Path,
    trees_lock: &layout::TreesLock,
    source: Option<(&gix::index::File, &Path)>,
    progress: &Root,
    interrupt: &AtomicBool,
) -> Result<Written, MirrorError> {
    // the previous tree's unchanged files are reused, not written: on the watch's word
    // where it vouches for them (no stat each; a path it saw touched is written anew,
    // as an edit can keep a file's size and time), else by git's stat test
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
    let from_spare = match source {
        Some((index, previous)) => spare::take(trees_lock, previous).map(|dir| {
            let reuse = Reuse {
                dir: &dir,
                index,
                trust: trust.clone().unwrap_or(Trust::StatTest),
            };
            // checked whole before it is swapped in: its index written first, so the
            // watch set for the stat pass vouches for the tree as that index records
            // it, and the next no-op sync need look at no file
            let updated = update_spare(repo, commit, &dir, reuse, progress, interrupt).and_then(
                |mut index| {
                    std::fs::rename(&dir, snapshot)?;
                    index
                        .write(Default::default())
                        .map_err(|err| MirrorError::Git(Box::new(err)))?;
                    if !verify_under_watch(&index, snapshot) {
                        return Err(MirrorError::Checkout(
                            "the updated spare is not exact".into(),
                        ));
                    }
                    Ok(index)
                },
            );
            if updated.is_err() {
                forget_watch(snapshot);
                let _ = remove_if_exists(&dir);
                let _ = remove_if_exists(snapshot);
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
                tracing::debug!(project_id = %project, error = %err, "the spare tree could not be used; writing a new one");
            }
            let reuse = source
                .zip(trust)
                .map(|((index, dir), trust)| Reuse { dir, index, trust });
            checkout(repo, commit, snapshot, git_dir, reuse, progress, interrupt)
        }
    };
    // files reused on the watch's word must not have changed before they were reused
    // (a file replaced meanwhile would be linked as it is now): the watch is asked
    // again, and if it saw anything new the tree is written without links
    if written.is_ok()
        && let (Some(touched), Some((index, dir))) = (&linked_on_trust, source)
        && !matches!(trust_of(index, dir), Trust::Watched(now) if now == *touched)
    {
        tracing::warn!(project_id = %project, "the mirror's tree changed during the sync; writing every file");
        forget_watch(snapshot);
        let _ = remove_if_exists(snapshot);
        index_written = false;
        written = checkout(repo, commit, snapshot, git_dir, None, progress, interrupt);
    }
    match written {
        Ok(index) => Ok(Written {
            index,
            index_written,
        }),
        Err(err) => {
            let _ = remove_if_exists(snapshot);
            Err(err)
        }
    }
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
