//! Snapshots and the atomic swap: which snapshot the worktree link points at, the one
//! `rename(2)` that makes a new one current, and removal of the ones left behind.

use std::path::{Path, PathBuf};

use super::MirrorError;
use super::layout::{remove_if_exists, unique_suffix};

/// The snapshot the worktree link points at, if it exists.
pub(crate) fn current_snapshot(worktree: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(worktree).ok()?;
    let target = if target.is_absolute() {
        target
    } else {
        worktree.parent()?.join(target)
    };
    target.is_dir().then_some(target)
}

/// Removes every entry of `trees_dir` but `keep`, and but the spares unless the caller
/// holds the directory's lock ([`super::spare::lock`]): a spare may be being built.
pub(crate) fn remove_other_snapshots(
    trees_dir: &Path,
    keep: &[&Path],
    spares: Option<&super::spare::TreesLock>,
) -> Result<(), MirrorError> {
    for entry in std::fs::read_dir(trees_dir)? {
        let entry = entry?;
        if spares.is_none() && super::spare::is_spare(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        if !keep.contains(&path.as_path()) {
            remove_if_exists(&path)?;
        }
    }
    Ok(())
}

/// Points `link` at `target` atomically: a new link under a temporary name, renamed
/// over the old one.
pub(crate) fn swap_link(link: &Path, target: &Path) -> Result<(), MirrorError> {
    let parent = link.parent().expect("a worktree path has a parent");
    std::fs::create_dir_all(parent)?;
    if let Ok(meta) = std::fs::symlink_metadata(link)
        && meta.is_dir()
    {
        // a real directory where the link belongs (an old layout or a hand-made copy)
        std::fs::remove_dir_all(link)?;
    }
    let name = link
        .file_name()
        .expect("a worktree path has a name")
        .to_string_lossy();
    let temporary = parent.join(format!(".{name}.{}", unique_suffix()));
    std::os::unix::fs::symlink(target, &temporary)?;
    if let Err(err) = std::fs::rename(&temporary, link) {
        let _ = std::fs::remove_file(&temporary);
        return Err(err.into());
    }
    Ok(())
}

pub(crate) fn point_head_at(repo: &gix::Repository, branch: &str) -> Result<(), MirrorError> {
    use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
    let target =
        gix::refs::FullName::try_from(branch).map_err(|err| MirrorError::Git(Box::new(err)))?;
    repo.edit_reference(RefEdit {
        change: Change::Update {
            log: LogChange {
                mode: RefLog::AndReference,
                force_create_reflog: false,
                message: "hivesync: sync".into(),
            },
            expected: PreviousValue::Any,
            new: gix::refs::Target::Symbolic(target),
        },
        name: "HEAD"
            .try_into()
            .map_err(|err: gix::validate::reference::name::Error| {
                MirrorError::Git(Box::new(err))
            })?,
        deref: false,
    })
    .map_err(|err| MirrorError::Git(Box::new(err)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swap_replaces_the_link_in_one_step_and_old_snapshots_go() {
        let dir = tempfile::tempdir().expect("temp dir");
        let trees = dir.path().join("trees");
        let (first, second, stray) = (trees.join("a"), trees.join("b"), trees.join("c"));
        for snapshot in [&first, &second, &stray] {
            std::fs::create_dir_all(snapshot).expect("snapshot");
        }
        let link = dir.path().join("repos").join("p");
        assert_eq!(current_snapshot(&link), None);
        swap_link(&link, &first).expect("first swap");
        assert_eq!(current_snapshot(&link), Some(first.clone()));
        swap_link(&link, &second).expect("second swap");
        assert_eq!(current_snapshot(&link), Some(second.clone()));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("repos"))
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("p")],
            "no temporary link left"
        );
        remove_other_snapshots(&trees, &[second.as_path()], None).expect("cleaned");
        assert!(second.is_dir());
        assert!(!first.exists() && !stray.exists());
    }

    #[test]
    fn a_real_directory_where_the_link_belongs_is_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("snap");
        std::fs::create_dir_all(&target).expect("snapshot");
        let link = dir.path().join("p");
        std::fs::create_dir_all(link.join("old")).expect("hand-made copy");
        swap_link(&link, &target).expect("swap");
        assert!(std::fs::symlink_metadata(&link).expect("link").is_symlink());
    }
}
