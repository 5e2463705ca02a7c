//! The files of a checkout over [`super::blob::WHOLE`]: gix's checkout holds each blob
//! whole in memory while it writes it, so these are taken out of its work and written
//! here instead, streaming out of the object database ([`super::blob`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::bstr::ByteSlice;

use super::MirrorError;

/// A file written by [`write`].
pub(super) struct LargeFile {
    relative: PathBuf,
    id: gix::ObjectId,
    size: u64,
    executable: bool,
}

/// Large files of `index` (over [`super::blob::WHOLE`]) not marked to skip, which this
/// module writes itself, streaming, instead of gix (whose checkout holds each blob
/// whole in memory). Only when the tree has no `.gitattributes`: a file an attribute
/// converts (line endings, a filter) is left to gix. They are marked to skip.
pub(super) fn take(
    repo: &gix::Repository,
    index: &mut gix::index::File,
) -> Result<Vec<LargeFile>, MirrorError> {
    let has_attributes = index.entries().iter().any(|entry| {
        let path = entry.path(index);
        path == ".gitattributes" || path.ends_with(b"/.gitattributes")
    });
    if has_attributes {
        return Ok(Vec::new());
    }
    let mut large = Vec::new();
    for (entry, path) in index.entries_mut_with_paths() {
        let executable = match entry.mode {
            gix::index::entry::Mode::FILE => false,
            gix::index::entry::Mode::FILE_EXECUTABLE => true,
            _ => continue,
        };
        if entry
            .flags
            .contains(gix::index::entry::Flags::SKIP_WORKTREE)
        {
            continue;
        }
        let size = repo
            .find_header(entry.id)
            .map_err(|err| MirrorError::Corrupt(Box::new(err)))?
            .size();
        if size <= super::blob::WHOLE {
            continue;
        }
        let Ok(relative) = path.to_str() else {
            continue;
        };
        entry.flags.insert(gix::index::entry::Flags::SKIP_WORKTREE);
        large.push(LargeFile {
            relative: PathBuf::from(relative),
            id: entry.id,
            size,
            executable,
        });
    }
    Ok(large)
}

/// Writes each of `large` into `destination` streaming from the object database, and
/// records in `index` the stat each was written with (as gix does for its files).
pub(super) fn write(
    repo: &gix::Repository,
    index: &mut gix::index::File,
    destination: &Path,
    large: &[LargeFile],
    interrupt: &AtomicBool,
) -> Result<(), MirrorError> {
    use std::io::Write;
    let git_dir = repo.git_dir().to_path_buf();
    for LargeFile {
        relative,
        id,
        size,
        executable,
    } in large
    {
        if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(MirrorError::Interrupted);
        }
        let file = destination.join(relative);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::io::BufWriter::with_capacity(
            256 * 1024,
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&file)?,
        );
        // a delta is rebuilt whatever its size: the quota's file cap bounds it
        super::blob::copy_prefix(repo, &git_dir, *id, *size, (u64::MAX, u64::MAX), &mut out)
            .map_err(|err| match err {
                super::blob::BlobError::Io(err) => MirrorError::from(err),
                other => MirrorError::Checkout(Box::new(other)),
            })?;
        out.flush()?;
        let written = out.into_inner().map_err(|err| err.into_error())?;
        if *executable {
            use std::os::unix::fs::PermissionsExt;
            written.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        }
        drop(written);
        let stat = gix::index::fs::Metadata::from_path_no_follow(&file)
            .ok()
            .and_then(|meta| gix::index::entry::Stat::from_fs(&meta).ok())
            .ok_or_else(|| MirrorError::Checkout("a written file cannot be stat'ed".into()))?;
        let path = gix::bstr::BStr::new(relative.as_os_str().as_encoded_bytes());
        if let Some(entry) =
            index.entry_mut_by_path_and_stage(path, gix::index::entry::Stage::Unconflicted)
        {
            entry.stat = stat;
        }
    }
    Ok(())
}
