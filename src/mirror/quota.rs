//! What one mirror may hold, checked from object headers before anything is written:
//! a branch whose tree is over a limit fails its sync with `repo_too_large` and the
//! previous snapshot stays as it was. A few hundred bytes of trees can name a blob of
//! gigabytes at many paths, or hundreds of thousands of files; the headers tell, the
//! blobs are never inflated.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use gix::ObjectId;

use super::MirrorError;

/// Limits on one mirror (`HIVESYNC_MAX_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// bytes of the checked-out tree, every path counted (a blob at six paths is
    /// written six times)
    pub checkout_bytes: u64,
    /// files (and symlinks) of the checked-out tree
    pub files: u64,
    /// bytes of one file
    pub file_bytes: u64,
    /// bytes of the object store after a fetch
    pub objects_bytes: u64,
    /// bytes (files and object stores) of all one owner's mirrors together
    pub user_bytes: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            checkout_bytes: 4 << 30,
            files: 200_000,
            file_bytes: 100 << 20,
            objects_bytes: 4 << 30,
            user_bytes: 20 << 30,
        }
    }
}

/// What a commit's tree would write, as far as it was counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeSize {
    pub bytes: u64,
    pub files: u64,
    /// every blob the tree holds (at most `files` of them)
    pub blobs: std::collections::HashSet<ObjectId>,
}

/// Walks `commit`'s tree from object headers, and stops at the first limit it passes:
/// `Err(TooLarge)` naming it. Every path is counted, so a tree that names the same
/// subtree many times counts it each time (and is stopped at the file limit long
/// before its expansion could exhaust memory).
pub fn check_tree(
    repo: &gix::Repository,
    commit: ObjectId,
    quota: &Quota,
    interrupt: &AtomicBool,
) -> Result<TreeSize, MirrorError> {
    let git = |err: Box<dyn std::error::Error + Send + Sync>| MirrorError::Git(err);
    let root = repo
        .find_commit(commit)
        .map_err(|err| git(err.into()))?
        .tree_id()
        .map_err(|err| git(err.into()))?
        .detach();
    let mut size = TreeSize::default();
    let mut trees = vec![root];
    while let Some(id) = trees.pop() {
        if interrupt.load(Ordering::Relaxed) {
            return Err(MirrorError::Interrupted);
        }
        let tree = repo.find_tree(id).map_err(|err| git(err.into()))?;
        for entry in tree.iter() {
            let entry = entry.map_err(|err| git(err.into()))?;
            let mode = entry.mode();
            if mode.is_tree() {
                trees.push(entry.oid().to_owned());
                continue;
            }
            if mode.is_commit() {
                // a submodule: an empty directory in the tree
                continue;
            }
            let bytes = repo
                .find_header(entry.oid())
                .map_err(|err| git(err.into()))?
                .size();
            size.files += 1;
            size.bytes = size.bytes.saturating_add(bytes);
            size.blobs.insert(entry.oid().to_owned());
            if bytes > quota.file_bytes {
                return Err(MirrorError::TooLarge(format!(
                    "a file of the branch is {bytes} bytes, over HIVESYNC_MAX_FILE_BYTES ({}); nothing was written",
                    quota.file_bytes
                )));
            }
            if size.files > quota.files {
                return Err(MirrorError::TooLarge(format!(
                    "the branch has more than {} files (HIVESYNC_MAX_FILES); nothing was written",
                    quota.files
                )));
            }
            if size.bytes > quota.checkout_bytes {
                return Err(MirrorError::TooLarge(format!(
                    "the branch's files add up to more than {} bytes (HIVESYNC_MAX_CHECKOUT_BYTES); nothing was written",
                    quota.checkout_bytes
                )));
            }
        }
    }
    Ok(size)
}

/// Bytes of the files under `dir` (the object store: packs, their indexes, loose
/// objects); what cannot be read counts as nothing.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                total = total.saturating_add(meta.len());
            }
        }
    }
    total
}

/// `Err(TooLarge)` when the object store of `git_dir` is over its limit.
pub fn check_objects(git_dir: &Path, quota: &Quota) -> Result<u64, MirrorError> {
    let bytes = dir_bytes(&git_dir.join("objects"));
    if bytes > quota.objects_bytes {
        return Err(MirrorError::TooLarge(format!(
            "the mirror's object store is {bytes} bytes after the fetch, over HIVESYNC_MAX_OBJECTS_BYTES ({}); the files were left as they were",
            quota.objects_bytes
        )));
    }
    Ok(bytes)
}

/// Bytes of the previous tree (as `index` records it) that a checkout of the tree
/// `size` describes can link instead of writing: the files whose blob it still has.
pub fn reusable_bytes(size: &TreeSize, index: &gix::index::File) -> u64 {
    index
        .entries()
        .iter()
        .filter(|entry| size.blobs.contains(&entry.id))
        .map(|entry| u64::from(entry.stat.size))
        .fold(0u64, u64::saturating_add)
}
