//! Where a project's mirror lives under DATA_DIR, its fence file, and the one function
//! that removes a project's mirror ([`Layout::remove`]). Also the free-space probe, so
//! every caller (request admission, the worker before it writes) asks the same way.
//!
//! - `git/<id>.git` — the repository: objects and refs, fetched into; never a worktree.
//! - `git/<id>.fence` — the newest fencing token that claimed the mirror.
//! - `trees/<id>/<snapshot>/` — one checkout of one commit, never edited once a reader
//!   can see it; its `.git` is a gitfile pointing at `git/<id>.git`.
//! - `trees/<id>/.spare-<snapshot>/` — a hidden copy of the current snapshot, all hard
//!   links, that the next changed sync brings up to date and publishes ([`super::spare`]).
//! - `repos/<id>` — a symlink to the current snapshot, replaced by `rename(2)`, so a
//!   reader sees the old tree or the new one and never a mix.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::MirrorError;
use crate::domain::ProjectId;

#[derive(Debug, Clone)]
pub struct Layout {
    data_dir: PathBuf,
}

impl Layout {
    /// `data_dir` should be absolute: gitfiles in snapshots point at it.
    pub fn new(data_dir: PathBuf) -> Self {
        Self { data_dir }
    }

    pub fn git_dir(&self, project: &ProjectId) -> PathBuf {
        self.data_dir.join("git").join(format!("{project}.git"))
    }

    pub fn trees_dir(&self, project: &ProjectId) -> PathBuf {
        self.data_dir.join("trees").join(project.as_str())
    }

    /// Where replaced snapshots wait to be deleted: `DATA_DIR/trash`.
    pub fn trash_dir(&self) -> PathBuf {
        self.data_dir.join("trash")
    }

    /// Takes a replaced snapshot out of the way at once (one rename into the trash)
    /// and deletes it on a thread of its own, so a sync does not wait for tens of
    /// thousands of unlinks. (A reader with a file of the old tree open keeps reading
    /// it; one opening old paths after the swap fails, as it did before.) The thread
    /// empties the whole trash.
    pub(crate) fn discard(&self, path: &Path) -> std::io::Result<()> {
        let trash = self.trash_dir();
        std::fs::create_dir_all(&trash)?;
        let parked = trash.join(unique_suffix());
        if std::fs::rename(path, &parked).is_err() {
            // another filesystem or a vanished path: delete it here instead
            return remove_if_exists(path);
        }
        self.empty_trash_in_background();
        Ok(())
    }

    /// Empties the trash on a thread of its own: after each discard, and at start
    /// (snapshots a stopped or crashed process left there).
    pub fn empty_trash_in_background(&self) {
        let trash = self.trash_dir();
        let spawned = std::thread::Builder::new()
            .name("hivesync-trash".into())
            .spawn(move || empty_trash(&trash));
        if spawned.is_err() {
            // no thread to spare: the next discard empties the trash
            tracing::debug!("could not start the trash thread; deleting later");
        }
    }

    /// The path builds and readers use: `DATA_DIR/repos/<id>`.
    pub fn worktree(&self, project: &ProjectId) -> PathBuf {
        self.data_dir.join("repos").join(project.as_str())
    }

    /// The newest fencing token that claimed this mirror (beside the repository, so a
    /// re-clone keeps it).
    pub fn fence_file(&self, project: &ProjectId) -> PathBuf {
        self.data_dir.join("git").join(format!("{project}.fence"))
    }

    /// Projects that have a mirror repository on disk.
    pub fn mirrored_projects(&self) -> Vec<ProjectId> {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join("git")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                ProjectId::parse(name.to_str()?.strip_suffix(".git")?)
            })
            .collect()
    }

    /// What the mirror of `project` held after its last sync that wrote a tree: its
    /// files' bytes and its object store's, as a decimal number (for the owner's total,
    /// [`crate::mirror::Quota::user_bytes`]).
    pub fn footprint_file(&self, project: &ProjectId) -> PathBuf {
        self.data_dir.join("git").join(format!("{project}.bytes"))
    }

    /// The footprint last recorded for `project` (0 when none).
    pub fn footprint(&self, project: &ProjectId) -> u64 {
        std::fs::read_to_string(self.footprint_file(project))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Removes everything of a deleted project.
    pub fn remove(&self, project: &ProjectId) -> std::io::Result<()> {
        remove_if_exists(&self.worktree(project))?;
        // a spare may be being built in it: wait for that to end
        let trees = self.trees_dir(project);
        let _lock = lock(&trees).ok();
        remove_if_exists(&trees)?;
        remove_if_exists(&self.git_dir(project))?;
        remove_if_exists(&self.footprint_file(project))?;
        remove_if_exists(&self.fence_file(project))
    }
}

fn read_fence(path: &Path) -> Result<u64, MirrorError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(MirrorError::Io(err)),
    }
}

/// Records `fence` as the mirror's owner, unless a newer lock holder already did: then
/// this worker's lock has expired and the mirror is someone else's.
pub(crate) fn claim_fence(path: &Path, fence: u64) -> Result<(), MirrorError> {
    if read_fence(path)? > fence {
        return Err(MirrorError::Fenced);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension(format!("fence.{}", unique_suffix()));
    std::fs::write(&temporary, fence.to_string())?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

/// Before anything a reader sees changes: is the mirror still ours?
pub(crate) fn check_fence(path: &Path, fence: u64) -> Result<(), MirrorError> {
    if read_fence(path)? != fence {
        return Err(MirrorError::Fenced);
    }
    Ok(())
}

pub(crate) fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// Deletes everything in `trash`. Best effort: several of these may run at once, so
/// an entry another one is deleting may vanish under it; what is left stays for the
/// next run.
fn empty_trash(trash: &Path) {
    let Ok(entries) = std::fs::read_dir(trash) else {
        return;
    };
    for entry in entries.flatten() {
        if let Err(err) = remove_if_exists(&entry.path())
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(path = %entry.path().display(), error = %err, "could not empty the trash yet");
        }
    }
}

pub(crate) fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:x}")
}

/// Removes the `*.lock` files a killed sync left in the repository (index, HEAD,
/// refs, config): the caller holds the project lock with the newest fence, so no live
/// writer owns them, and gix would otherwise refuse every later update.
pub(crate) fn remove_stale_locks(git_dir: &Path) -> std::io::Result<usize> {
    // the top level (index, HEAD, config, packed-refs) alone, then all of refs/
    let mut removed = remove_locks_in(git_dir, false)?;
    removed += remove_locks_in(&git_dir.join("refs"), true)?;
    Ok(removed)
}

fn remove_locks_in(dir: &Path, recurse: bool) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if recurse {
                removed += remove_locks_in(&path, true)?;
            }
        } else if path.extension().is_some_and(|ext| ext == "lock") {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl Layout {
    /// Refuses to go on when the data volume has less than `floor` bytes free (an
    /// unreadable volume is not refused here; the write that fails says why).
    pub fn check_floor(&self, floor: u64) -> Result<(), MirrorError> {
        match free_bytes(&self.data_dir) {
            Some(free) if free < floor => Err(MirrorError::StorageFloor(format!(
                "free space on the data volume ({free} bytes) is under HIVESYNC_MIN_FREE_BYTES ({floor} bytes); the mirror was left as it was"
            ))),
            _ => Ok(()),
        }
    }
}

/// Free bytes on the volume holding `path` (`None` when it cannot be told).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The exclusive lock on a project's trees directory, held until dropped (the swap, a
/// spare being built and the removal of a project's trees take it in turn).
pub(crate) struct TreesLock(#[allow(dead_code)] std::fs::File);

/// Waits for the lock on `trees_dir` (a spare being built holds it for as long as
/// linking one tree takes).
pub(crate) fn lock(trees_dir: &Path) -> std::io::Result<TreesLock> {
    let dir = std::fs::File::open(trees_dir)?;
    dir.lock()?;
    Ok(TreesLock(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_older_than_the_recorded_one_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fence = dir.path().join("p.fence");
        assert!(
            check_fence(&fence, 5).is_err(),
            "an unclaimed mirror is no one's"
        );
        claim_fence(&fence, 5).expect("first claim");
        check_fence(&fence, 5).expect("still ours");
        assert!(matches!(claim_fence(&fence, 4), Err(MirrorError::Fenced)));
        claim_fence(&fence, 6).expect("a newer lock takes over");
        assert!(matches!(check_fence(&fence, 5), Err(MirrorError::Fenced)));
    }

    #[test]
    fn lock_files_a_killed_sync_left_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let git = dir.path();
        std::fs::create_dir_all(git.join("refs/heads/feature")).expect("refs");
        std::fs::create_dir_all(git.join("objects/pack")).expect("objects");
        for lock in [
            "index.lock",
            "HEAD.lock",
            "refs/heads/main.lock",
            "refs/heads/feature/x.lock",
        ] {
            std::fs::write(git.join(lock), "").expect("lock");
        }
        std::fs::write(git.join("objects/pack/tmp.lock"), "").expect("not a ref lock");
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").expect("head");
        assert_eq!(remove_stale_locks(git).expect("removed"), 4);
        assert!(git.join("HEAD").exists());
        assert!(
            git.join("objects/pack/tmp.lock").exists(),
            "objects are not touched"
        );
        assert!(!git.join("refs/heads/feature/x.lock").exists());
    }

    #[test]
    fn remove_takes_every_path_of_the_project_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path().to_path_buf());
        let doomed = ProjectId::generate();
        let kept = ProjectId::generate();
        for id in [&doomed, &kept] {
            std::fs::create_dir_all(layout.git_dir(id)).expect("git dir");
            std::fs::create_dir_all(layout.trees_dir(id).join("snap")).expect("trees");
            std::fs::create_dir_all(dir.path().join("repos")).expect("repos");
            std::os::unix::fs::symlink(layout.trees_dir(id).join("snap"), layout.worktree(id))
                .expect("link");
            std::fs::write(layout.fence_file(id), "1").expect("fence");
        }
        assert_eq!(layout.mirrored_projects().len(), 2);
        layout.remove(&doomed).expect("removed");
        layout.remove(&doomed).expect("removing twice is fine");
        for path in [
            layout.git_dir(&doomed),
            layout.trees_dir(&doomed),
            layout.worktree(&doomed),
            layout.fence_file(&doomed),
        ] {
            assert!(std::fs::symlink_metadata(&path).is_err(), "{path:?} left");
        }
        assert_eq!(layout.mirrored_projects(), vec![kept.clone()]);
        assert!(layout.worktree(&kept).is_dir());
    }
}
