//! The spare tree: a hidden copy of a project's current snapshot, made off the sync's
//! path once the snapshot is verified — every directory made, every file hard-linked —
//! that no reader ever sees. The next sync that changes the tree brings the spare to the
//! new commit (only what changed is removed or written), checks it with git's stat test
//! and swaps it in as the new snapshot. The sync then costs what changed, not a
//! `mkdir` per directory and a `link` per file; the snapshot readers were given is
//! still never edited.
//!
//! A spare is `trees/<id>/.spare-<snapshot>`, complete once it has that name (it is
//! built under `.spare-partial-<suffix>` and renamed). Its files share inodes with the
//! snapshot's, so an edit made in place through the snapshot shows in the spare too:
//! the sync that takes it trusts it exactly as far as it trusts the snapshot (the
//! snapshot's watch, else the stat test of each file), and rewrites what it cannot
//! trust. Building a spare and a sync changing the tree hold the trees directory's
//! lock (`flock`, so across processes too), never both at once.

use std::path::{Path, PathBuf};

use super::checkout::link_unchanged;
use super::layout::{remove_if_exists, unique_suffix};

const SPARE: &str = ".spare-";
const PARTIAL: &str = ".spare-partial-";

/// Whether a name in a trees directory is a spare's (complete or being built).
pub(crate) fn is_spare(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|name| name.starts_with(SPARE))
}

pub(crate) use super::layout::{TreesLock, lock};

/// Where the spare of `snapshot` lives once complete.
fn spare_of(snapshot: &Path) -> Option<PathBuf> {
    let name = snapshot.file_name()?.to_str()?;
    Some(snapshot.with_file_name(format!("{SPARE}{name}")))
}

/// The complete spare of `snapshot`, if there is one. The caller holds the lock.
pub(crate) fn take(_lock: &TreesLock, snapshot: &Path) -> Option<PathBuf> {
    spare_of(snapshot).filter(|spare| spare.is_dir())
}

/// Makes the spare of `snapshot`, which `index` describes and a stat pass has just
/// found exact, unless it is no longer there (a sync replaced it meanwhile) or has one
/// already. Spares of other snapshots, and partial ones a stopped process left, go.
/// A tree with submodule entries gets none (their directories are not in the index
/// as files, so the spare could not be checked).
pub(crate) fn build(index: &gix::index::File, snapshot: &Path) -> std::io::Result<()> {
    let (Some(trees_dir), Some(target)) = (snapshot.parent(), spare_of(snapshot)) else {
        return Ok(());
    };
    if index
        .entries()
        .iter()
        .any(|entry| entry.mode == gix::index::entry::Mode::COMMIT)
    {
        return Ok(());
    }
    let lock = lock(trees_dir)?;
    if !snapshot.is_dir() || target.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(trees_dir)? {
        let entry = entry?;
        if is_spare(&entry.file_name()) {
            remove_if_exists(&entry.path())?;
        }
    }
    let partial = trees_dir.join(format!("{PARTIAL}{}", unique_suffix()));
    let made = fill(index, snapshot, &partial).and_then(|()| std::fs::rename(&partial, &target));
    if made.is_err() {
        let _ = remove_if_exists(&partial);
    }
    drop(lock);
    made
}

fn fill(index: &gix::index::File, snapshot: &Path, partial: &Path) -> std::io::Result<()> {
    std::fs::create_dir(partial)?;
    std::fs::copy(snapshot.join(".git"), partial.join(".git"))?;
    let mut links = Vec::with_capacity(index.entries().len());
    for entry in index.entries() {
        let path = entry.path(index);
        let relative = std::str::from_utf8(path).map_err(std::io::Error::other)?;
        links.push((snapshot.join(relative), partial.join(relative)));
    }
    link_unchanged(&links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_spare_names_are_spares() {
        assert!(is_spare(".spare-0123456789ab-18f".as_ref()));
        assert!(is_spare(".spare-partial-18f".as_ref()));
        assert!(!is_spare("0123456789ab-18f".as_ref()));
        assert!(!is_spare(".git".as_ref()));
    }

    #[test]
    fn the_lock_is_exclusive_across_opens() {
        let dir = tempfile::tempdir().expect("temp dir");
        let held = lock(dir.path()).expect("locked");
        let other = std::fs::File::open(dir.path()).expect("opens");
        assert!(other.try_lock().is_err(), "a second holder got the lock");
        drop(held);
        assert!(other.try_lock().is_ok(), "the lock was not released");
    }
}
