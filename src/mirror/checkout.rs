//! Writing one commit into a fresh snapshot directory: gix's checkout, with files
//! unchanged since the previous snapshot hard-linked instead of written, and git's stat
//! test to tell whether a snapshot is still exactly what was written.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::bstr::ByteSlice;
use gix::progress::tree::{Item, Root};

use super::MirrorError;
use super::progress::{CHECKOUT_BYTES, CHECKOUT_FILES};

/// The previous snapshot and the index it was written with.
pub(crate) struct Reuse<'a> {
    pub dir: &'a Path,
    pub index: &'a gix::index::File,
    pub trust: Trust,
}

/// How the previous tree's files are known to be as recorded.
#[derive(Clone)]
pub(crate) enum Trust {
    /// verified exact under a watch ([`super::watch`]) that has since seen only these
    /// paths touched: every other file is as recorded without a `stat` each
    Watched(std::collections::BTreeSet<String>),
    /// each file by git's stat test (size and modification time)
    StatTest,
}

impl Reuse<'_> {
    /// Whether the previous tree holds `entry` unchanged since it was written: same
    /// blob and mode in the index, and the file still has the size and modification
    /// time recorded then (git's stat test, or the watch's word for the whole tree).
    /// Returns the previous file and the stat it was written with.
    fn unchanged(
        &self,
        path: &gix::bstr::BStr,
        entry: &gix::index::Entry,
    ) -> Option<(PathBuf, gix::index::entry::Stat)> {
        let old = self.index.entry_by_path(path)?;
        if old.id != entry.id || old.mode != entry.mode {
            return None;
        }
        let relative = path.to_str().ok()?;
        let file = self.dir.join(relative);
        let unchanged = match &self.trust {
            Trust::Watched(touched) => !super::watch::is_touched(touched, relative),
            Trust::StatTest => stat_unchanged(&file, old),
        };
        unchanged.then_some((file, old.stat))
    }
}

/// The index of `commit`'s tree, checked before anything is written: names git would
/// refuse, and every blob present in the object database.
fn prepare(repo: &gix::Repository, commit: gix::ObjectId) -> Result<gix::index::File, MirrorError> {
    let tree = repo
        .find_commit(commit)
        .map_err(|err| MirrorError::Corrupt(Box::new(err)))?
        .tree_id()
        .map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
    let index = match repo.index_from_tree(&tree) {
        Ok(index) => index,
        Err(err) => {
            // a tree that reads fine but cannot become an index has names git refuses
            // to check out ('.git', '..' and the like): the content is hostile, the
            // mirror is not damaged, and cloning again would not help
            let mut recorder = gix::traverse::tree::Recorder::default();
            let readable = repo
                .find_tree(tree)
                .ok()
                .is_some_and(|root| root.traverse().breadthfirst(&mut recorder).is_ok());
            return Err(if readable {
                MirrorError::UnsafeTree(Box::new(err))
            } else {
                MirrorError::Corrupt(Box::new(err))
            });
        }
    };
    // a tree git itself would refuse (a name twice, an empty name): the content is
    // malformed, the mirror is fine, and fetching again would not help
    malformed_path(&index).map_or(Ok(()), |(reason, path)| {
        Err(MirrorError::MalformedTree(format!(
            "the branch's tree is malformed ({reason} at '{path}'); nothing was written"
        )))
    })?;
    // every blob must be in the object database before anything is written: a gap
    // means a damaged mirror, which is re-cloned rather than checked out half
    if let Some(missing) = index
        .entries()
        .iter()
        .find(|entry| entry.mode != gix::index::entry::Mode::COMMIT && !repo.has_object(entry.id))
    {
        return Err(MirrorError::Corrupt(
            format!("object {} is missing from the mirror", missing.id).into(),
        ));
    }
    Ok(index)
}

/// Whether any `.gitattributes` differs between the two indexes: then a file with the
/// same blob can check out differently (line endings, say), and none is reused.
fn attributes_changed(old: &gix::index::File, new: &gix::index::File) -> bool {
    let attributes = |index: &gix::index::File| -> Vec<(gix::bstr::BString, gix::ObjectId)> {
        index
            .entries()
            .iter()
            .filter(|entry| {
                let path = entry.path(index);
                path == ".gitattributes" || path.ends_with(b"/.gitattributes")
            })
            .map(|entry| (entry.path(index).to_owned(), entry.id))
            .collect()
    };
    attributes(old) != attributes(new)
}

/// gix's checkout of every entry of `index` not marked to skip into `destination`,
/// then every mark cleared.
fn write_entries(
    repo: &gix::Repository,
    index: &mut gix::index::File,
    destination: &Path,
    initially_empty: bool,
    progress: &Root,
    interrupt: &AtomicBool,
) -> Result<(), MirrorError> {
    let mut options = repo
        .checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)
        .map_err(|err| MirrorError::Git(Box::new(err)))?;
    // links are written as small files holding their target, as git does with
    // core.symlinks=false: a mirror never holds a symlink
    options.fs.symlink = false;
    options.destination_is_initially_empty = initially_empty;
    options.overwrite_existing = false;
    let large = super::large_files::take(repo, index)?;
    let files: Item = progress.add_child_with_id("checkout", CHECKOUT_FILES);
    files.init(Some(index.entries().len()), None);
    let bytes: Item = progress.add_child_with_id("written", CHECKOUT_BYTES);
    bytes.init(None, None);
    let objects = repo
        .objects
        .clone()
        .into_arc()
        .map_err(|err| MirrorError::Git(Box::new(err)))?;
    let outcome = gix::worktree::state::checkout(
        index,
        destination,
        objects,
        &files,
        &bytes,
        interrupt,
        options,
    )
    .map_err(|err| {
        if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
            MirrorError::Interrupted
        } else {
            MirrorError::Checkout(Box::new(err))
        }
    })?;
    if let Some(first) = outcome.errors.first() {
        return Err(MirrorError::Checkout(
            format!(
                "{} files failed, first: {}",
                outcome.errors.len(),
                first.path
            )
            .into(),
        ));
    }
    super::large_files::write(repo, index, destination, &large, interrupt)
}

fn clear_skips(index: &mut gix::index::File) {
    for entry in index.entries_mut() {
        entry.flags.remove(gix::index::entry::Flags::SKIP_WORKTREE);
    }
}

pub(crate) fn checkout(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    snapshot: &Path,
    git_dir: &Path,
    reuse: Option<Reuse<'_>>,
    progress: &Root,
    interrupt: &AtomicBool,
) -> Result<gix::index::File, MirrorError> {
    let mut index = prepare(repo, commit)?;
    let reuse = reuse.filter(|reuse| !attributes_changed(reuse.index, &index));
    std::fs::create_dir_all(snapshot)?;
    std::fs::write(
        snapshot.join(".git"),
        format!("gitdir: {}\n", git_dir.display()),
    )?;

    // files unchanged since the previous snapshot are hard-linked from it instead of
    // written again (an incremental sync then costs what changed, not the whole tree);
    // gix skips them, and they are linked in after its checkout
    let mut linked: Vec<(PathBuf, PathBuf)> = Vec::new();
    if let Some(reuse) = &reuse {
        for (entry, path) in index.entries_mut_with_paths() {
            if entry.mode == gix::index::entry::Mode::COMMIT {
                continue;
            }
            let Some((old_file, stat)) = reuse.unchanged(path, entry) else {
                continue;
            };
            let Ok(relative) = path.to_str() else {
                continue;
            };
            entry.stat = stat;
            entry.flags.insert(gix::index::entry::Flags::SKIP_WORKTREE);
            linked.push((old_file, snapshot.join(relative)));
        }
    }
    write_entries(repo, &mut index, snapshot, true, progress, interrupt)?;
    link_unchanged(&linked)?;
    clear_skips(&mut index);
    Ok(index)
}

/// Brings a spare ([`super::spare`]), a copy of the previous snapshot that `reuse`
/// describes (its `dir` is the spare), to `commit` in place: every file the new tree
/// does not hold as it is — removed, changed, or one `reuse` cannot vouch for — is
/// unlinked (never written through: its inode is the previous snapshot's), directories
/// left empty go, and gix writes what is new. The caller checks the result with
/// [`snapshot_is_exact`] before it becomes a snapshot.
pub(crate) fn update_spare(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    spare: &Path,
    reuse: Reuse<'_>,
    progress: &Root,
    interrupt: &AtomicBool,
) -> Result<gix::index::File, MirrorError> {
    let mut index = prepare(repo, commit)?;
    if attributes_changed(reuse.index, &index) {
        return Err(MirrorError::Checkout(
            "the tree's attributes changed: every file is written".into(),
        ));
    }
    for (entry, path) in index.entries_mut_with_paths() {
        if entry.mode == gix::index::entry::Mode::COMMIT {
            return Err(MirrorError::Checkout(
                "a tree with submodules is written whole".into(),
            ));
        }
        if let Some((_, stat)) = reuse.unchanged(path, entry) {
            entry.stat = stat;
            entry.flags.insert(gix::index::entry::Flags::SKIP_WORKTREE);
        }
    }
    let kept: std::collections::HashSet<&gix::bstr::BStr> = index
        .entries()
        .iter()
        .filter(|entry| {
            entry
                .flags
                .contains(gix::index::entry::Flags::SKIP_WORKTREE)
        })
        .map(|entry| entry.path(&index))
        .collect();
    let mut emptied: std::collections::BTreeSet<PathBuf> = Default::default();
    for old in reuse.index.entries() {
        let path = old.path(reuse.index);
        if kept.contains(path) {
            continue;
        }
        let relative = path
            .to_str()
            .map_err(|err| MirrorError::Checkout(Box::new(err)))?;
        let file = spare.join(relative);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        let mut parent = file.parent();
        while let Some(dir) = parent.filter(|dir| *dir != spare) {
            emptied.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    drop(kept);
    // deepest first (a longer path sorts after its parent), so a directory emptied of
    // its last subdirectory goes too; one still holding something stays
    for dir in emptied.iter().rev() {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::NotFound
                ) => {}
            Err(err) => return Err(err.into()),
        }
    }
    write_entries(repo, &mut index, spare, false, progress, interrupt)?;
    clear_skips(&mut index);
    Ok(index)
}

/// Hard-links each `(old, new)` pair: every directory made once (in path order, so
/// parents come first), then the links spread over a few threads. On a large tree
/// this costs a `mkdir` per directory and a `link` per file, which is why a sync that
/// has a spare ([`super::spare`]) does not do it.
pub(super) fn link_unchanged(linked: &[(PathBuf, PathBuf)]) -> std::io::Result<()> {
    let dirs: std::collections::BTreeSet<&Path> = linked
        .iter()
        .filter_map(|(_, new_file)| new_file.parent())
        .collect();
    for dir in dirs {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            // a parent that holds no file of its own, so was not made before it
            Err(_) => std::fs::create_dir_all(dir)?,
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    let chunk = linked.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = linked
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .try_for_each(|(old_file, new_file)| std::fs::hard_link(old_file, new_file))
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a link thread panicked")))
        })
    })?;
    Ok(())
}

/// The first path of `index` that git would refuse, with why: a path given twice, or
/// one with an empty component.
fn malformed_path(index: &gix::index::File) -> Option<(&'static str, String)> {
    let mut previous: Option<&gix::bstr::BStr> = None;
    for entry in index.entries() {
        let path = entry.path(index);
        if path.is_empty() || path.split(|b| *b == b'/').any(|part| part.is_empty()) {
            return Some(("an empty entry name", path.to_string()));
        }
        if previous == Some(path) {
            return Some(("a duplicate entry", path.to_string()));
        }
        previous = Some(path);
    }
    None
}

/// git's stat test: `file` is a regular file with the size and modification time
/// `recorded` noted when it was written.
pub(crate) fn stat_unchanged(file: &Path, recorded: &gix::index::Entry) -> bool {
    gix::index::fs::Metadata::from_path_no_follow(file)
        .ok()
        .filter(|meta| meta.is_file())
        .and_then(|meta| gix::index::entry::Stat::from_fs(&meta).ok())
        .is_some_and(|stat| stat.size == recorded.stat.size && stat.mtime == recorded.stat.mtime)
}

/// Whether `snapshot` holds exactly the files the last checkout wrote, by git's own
/// test: every file is in the index with the size and modification time recorded when
/// it was written, and there is no other file. Anything planted, deleted or edited
/// since fails it, and the sync writes a fresh snapshot.
///
/// One pass, one `stat` per file, relative to its directory (the directory listing
/// says which entries are directories, so those are never stat'ed), with the top-level
/// subtrees spread over a few threads: on a no-op sync of a large tree this check is
/// most of the work.
pub(crate) fn snapshot_is_exact(index: &gix::index::File, snapshot: &Path) -> bool {
    let Ok(top) = std::fs::read_dir(snapshot) else {
        return false;
    };
    let mut subtrees = Vec::new();
    let mut on_disk = 0usize;
    for entry in top {
        let Ok(entry) = entry else { return false };
        if entry.file_name() == ".git" {
            continue;
        }
        match visit(index, snapshot, &entry) {
            Visit::Dir(dir) => subtrees.push(dir),
            Visit::File => on_disk += 1,
            Visit::Mismatch => return false,
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4)
        .min(subtrees.len().max(1));
    let counted: Option<usize> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                let mine: Vec<PathBuf> = subtrees
                    .iter()
                    .skip(worker)
                    .step_by(threads)
                    .cloned()
                    .collect();
                scope.spawn(move || files_if_exact(index, snapshot, mine))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().ok().flatten())
            .sum()
    });
    let Some(counted) = counted else {
        return false;
    };
    let expected = index
        .entries()
        .iter()
        .filter(|entry| entry.mode != gix::index::entry::Mode::COMMIT)
        .count();
    on_disk + counted == expected
}

enum Visit {
    Dir(PathBuf),
    File,
    Mismatch,
}

/// One directory entry: a directory to descend into, a file the index recorded with
/// this size and modification time, or anything else (a mismatch).
fn visit(index: &gix::index::File, snapshot: &Path, entry: &std::fs::DirEntry) -> Visit {
    let Ok(kind) = entry.file_type() else {
        return Visit::Mismatch;
    };
    let path = entry.path();
    let relative = path
        .strip_prefix(snapshot)
        .ok()
        .and_then(|relative| relative.to_str());
    if kind.is_dir() {
        // a directory holds a file of the index, or it was planted (an empty one too)
        let holds_files = relative.is_some_and(|relative| {
            index
                .prefixed_entries_range(format!("{relative}/").as_str().into())
                .is_some_and(|range| !range.is_empty())
        });
        return if holds_files {
            Visit::Dir(path)
        } else {
            Visit::Mismatch
        };
    }
    if !kind.is_file() {
        // a snapshot holds links as small files: a real link was planted
        return Visit::Mismatch;
    }
    let recorded = relative.and_then(|relative| index.entry_by_path(relative.into()));
    // DirEntry::metadata stats relative to the open directory, without following links
    let unchanged = recorded.is_some_and(|recorded| {
        entry.metadata().ok().is_some_and(|meta| {
            meta.is_file()
                && meta.len() as u32 == recorded.stat.size
                && meta
                    .modified()
                    .ok()
                    .and_then(|modified| gix::index::entry::stat::Time::try_from(modified).ok())
                    .is_some_and(|mtime| mtime == recorded.stat.mtime)
        })
    });
    if unchanged {
        Visit::File
    } else {
        Visit::Mismatch
    }
}

/// The files under `dirs` when every one is as recorded; `None` at the first that is
/// not.
fn files_if_exact(index: &gix::index::File, snapshot: &Path, dirs: Vec<PathBuf>) -> Option<usize> {
    let mut pending = dirs;
    let mut files = 0usize;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).ok()? {
            match visit(index, snapshot, &entry.ok()?) {
                Visit::Dir(dir) => pending.push(dir),
                Visit::File => files += 1,
                Visit::Mismatch => return None,
            }
        }
    }
    Some(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let status = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(dir)
            .status()
            .expect("git runs");
        assert!(status.success(), "git {args:?}");
    }

    /// A repository with two files, and a snapshot of its head written by [`checkout`].
    fn checked_out() -> (tempfile::TempDir, PathBuf, gix::index::File) {
        let dir = tempfile::tempdir().expect("temp dir");
        let origin = dir.path().join("origin");
        std::fs::create_dir_all(origin.join("src")).expect("dirs");
        git(&origin, &["init", "-q"]);
        std::fs::write(origin.join("README"), "hello\n").expect("write");
        std::fs::write(origin.join("src/lib.rs"), "fn main() {}\n").expect("write");
        git(&origin, &["add", "."]);
        git(&origin, &["commit", "-q", "-m", "first"]);
        let repo = gix::open(&origin).expect("opens");
        let commit = repo.head_id().expect("head").detach();
        let snapshot = dir.path().join("snapshot");
        let index = checkout(
            &repo,
            commit,
            &snapshot,
            &origin.join(".git"),
            None,
            &Root::new(),
            &AtomicBool::new(false),
        )
        .expect("checked out");
        (dir, snapshot, index)
    }

    #[test]
    fn a_fresh_snapshot_is_exact() {
        let (_dir, snapshot, index) = checked_out();
        assert_eq!(
            std::fs::read_to_string(snapshot.join("src/lib.rs")).expect("written"),
            "fn main() {}\n"
        );
        assert!(snapshot_is_exact(&index, &snapshot));
    }

    #[test]
    fn a_planted_file_breaks_exactness() {
        let (_dir, snapshot, index) = checked_out();
        std::fs::write(snapshot.join("src/planted"), "x").expect("plant");
        assert!(!snapshot_is_exact(&index, &snapshot));
    }

    #[test]
    fn a_planted_empty_directory_breaks_exactness() {
        let (_dir, snapshot, index) = checked_out();
        std::fs::create_dir(snapshot.join("src/empty")).expect("mkdir");
        assert!(!snapshot_is_exact(&index, &snapshot));
        let (_dir, snapshot, index) = checked_out();
        std::fs::create_dir(snapshot.join("empty")).expect("mkdir");
        assert!(!snapshot_is_exact(&index, &snapshot));
    }

    #[test]
    fn an_edited_or_deleted_file_breaks_exactness() {
        let (_dir, snapshot, index) = checked_out();
        std::fs::write(snapshot.join("README"), "changed by hand\n").expect("edit");
        assert!(!snapshot_is_exact(&index, &snapshot));
        let (_dir, snapshot, index) = checked_out();
        std::fs::remove_file(snapshot.join("src/lib.rs")).expect("delete");
        assert!(!snapshot_is_exact(&index, &snapshot));
    }
}
