//! Reading a large blob without holding all of it: an object stored whole (a loose
//! object, or a base entry of a pack) is inflated piece by piece into a writer and no
//! further than asked; only an object stored as a delta must be rebuilt in memory,
//! and that only up to [`DELTA_LIMIT`].

use std::io::{Read, Write};
use std::path::Path;

use gix::ObjectId;

/// Blobs at most this big are read whole, through gix's own lookup (its caches and
/// delta resolution): small enough that holding one costs nothing worth saving.
pub const WHOLE: u64 = 4 << 20;

/// A blob stored as a delta of another is rebuilt whole, in memory, up to this size;
/// a bigger one is refused (git itself never stores blobs over 512 MiB as deltas, and
/// rarely big binaries).
pub const DELTA_LIMIT: u64 = 64 << 20;

/// What inflating works through at a time.
const PIECE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the object is stored as a delta and is over {} MiB", DELTA_LIMIT >> 20)]
    DeltaTooLarge,
    #[error("the object could not be read: {0}")]
    Damaged(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Writes the first `limit` bytes of blob `id` (of `size` bytes, from its header) of
/// the repository at `git_dir` into `out`; returns how many it wrote. Streams what is
/// stored whole; rebuilds a delta in memory, when it is at most `delta_limit` bytes.
pub fn copy_prefix(
    repo: &gix::Repository,
    git_dir: &Path,
    id: ObjectId,
    size: u64,
    (limit, delta_limit): (u64, u64),
    out: &mut impl Write,
) -> Result<u64, BlobError> {
    if size > WHOLE {
        if let Some(written) = from_loose(git_dir, id, limit, out)? {
            return Ok(written);
        }
        if let Some(written) = from_pack(git_dir, id, limit, out)? {
            return Ok(written);
        }
        if size > delta_limit {
            return Err(BlobError::DeltaTooLarge);
        }
    }
    let blob = repo
        .find_blob(id)
        .map_err(|err| BlobError::Damaged(err.to_string()))?;
    let shown = &blob.data[..blob
        .data
        .len()
        .min(usize::try_from(limit).unwrap_or(usize::MAX))];
    out.write_all(shown)?;
    Ok(shown.len() as u64)
}

/// A loose object's data, inflated past its `blob <size>\0` header.
fn from_loose(
    git_dir: &Path,
    id: ObjectId,
    limit: u64,
    out: &mut impl Write,
) -> Result<Option<u64>, BlobError> {
    let hex = id.to_hex().to_string();
    let path = git_dir.join("objects").join(&hex[..2]).join(&hex[2..]);
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let mut compressed = vec![0u8; PIECE];
    let mut pending: Vec<u8> = Vec::new();
    let mut inflate = Inflater::new(limit, true);
    loop {
        let read = file.read(&mut compressed)?;
        if read == 0 {
            return Err(BlobError::Damaged("a loose object ends early".into()));
        }
        pending.extend_from_slice(&compressed[..read]);
        let used = inflate.feed(&pending, out)?;
        pending.drain(..used);
        if inflate.done {
            return Ok(Some(inflate.written));
        }
    }
}

/// A pack's base entry for `id`, inflated straight from the mapped pack; `None` when no
/// pack holds it, or holds it as a delta (which must be rebuilt whole).
fn from_pack(
    git_dir: &Path,
    id: ObjectId,
    limit: u64,
    out: &mut impl Write,
) -> Result<Option<u64>, BlobError> {
    let damaged = |err: &dyn std::fmt::Display| BlobError::Damaged(err.to_string());
    let pack_dir = git_dir.join("objects").join("pack");
    for name in super::read::pack_indices(git_dir) {
        let index_path = pack_dir.join(&name);
        let Ok(index) = gix_pack::index::File::at(&index_path, gix::hash::Kind::Sha1) else {
            continue;
        };
        let Some(position) = index.lookup(id) else {
            continue;
        };
        let offset = index.pack_offset_at_index(position);
        let pack =
            gix_pack::data::File::at(index_path.with_extension("pack"), gix::hash::Kind::Sha1)
                .map_err(|err| damaged(&err))?;
        let entry = pack.entry(offset).map_err(|err| damaged(&err))?;
        if entry.header.as_kind() != Some(gix::object::Kind::Blob) {
            return Ok(None);
        }
        let compressed = pack
            .entry_slice(entry.data_offset..pack.pack_end() as u64)
            .ok_or_else(|| BlobError::Damaged("a pack entry lies past its pack's end".into()))?;
        let mut inflate = Inflater::new(limit, false);
        inflate.feed(compressed, out)?;
        if !inflate.done {
            return Err(BlobError::Damaged("a pack entry ends early".into()));
        }
        return Ok(Some(inflate.written));
    }
    Ok(None)
}

/// Inflates a zlib stream into a writer, up to a limit of output (after the loose
/// object header, when there is one).
struct Inflater {
    state: gix_zlib::Decompress,
    limit: u64,
    written: u64,
    /// a loose object's header not yet passed
    header: Option<Vec<u8>>,
    done: bool,
}

impl Inflater {
    fn new(limit: u64, loose: bool) -> Self {
        Self {
            state: gix_zlib::Decompress::new(),
            limit,
            written: 0,
            header: loose.then(Vec::new),
            done: false,
        }
    }

    /// Inflates what `input` holds; returns the input bytes it used. Sets `done` once
    /// the stream ended or `limit` bytes were written.
    fn feed(&mut self, input: &[u8], out: &mut impl Write) -> Result<usize, BlobError> {
        let mut piece = vec![0u8; PIECE];
        let start_in = self.state.total_in();
        loop {
            let used = (self.state.total_in() - start_in) as usize;
            let before_out = self.state.total_out();
            let status = self
                .state
                .decompress(&input[used..], &mut piece, gix_zlib::FlushDecompress::None)
                .map_err(|_| BlobError::Damaged("the object does not inflate".into()))?;
            let produced = (self.state.total_out() - before_out) as usize;
            let mut data = &piece[..produced];
            if let Some(header) = &mut self.header {
                match data.iter().position(|&b| b == 0) {
                    Some(end) => {
                        header.extend_from_slice(&data[..end]);
                        if !header.starts_with(b"blob ") {
                            return Err(BlobError::Damaged("a loose object is not a blob".into()));
                        }
                        self.header = None;
                        data = &data[end + 1..];
                    }
                    None => {
                        header.extend_from_slice(data);
                        if header.len() > 64 {
                            return Err(BlobError::Damaged("a loose object header".into()));
                        }
                        data = &[];
                    }
                }
            }
            let room = self.limit - self.written;
            let keep = &data[..data.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
            out.write_all(keep)?;
            self.written += keep.len() as u64;
            let used = (self.state.total_in() - start_in) as usize;
            if status == gix_zlib::Status::StreamEnd || self.written >= self.limit {
                self.done = true;
                return Ok(used);
            }
            if produced == 0 && (used == input.len() || status == gix_zlib::Status::BufError) {
                return Ok(used);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository holding one blob of `size` bytes, loose or packed by `git gc`.
    fn repo_with_blob(size: usize, packed: bool) -> (tempfile::TempDir, ObjectId, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let git = |args: &[&str]| {
            let status = std::process::Command::new("git")
                .args(args)
                .current_dir(dir.path())
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .stdout(std::process::Stdio::piped())
                .output()
                .expect("git runs");
            assert!(status.status.success(), "git {args:?}");
            String::from_utf8_lossy(&status.stdout).trim().to_owned()
        };
        git(&["init", "-q"]);
        let data: Vec<u8> = (0..size).map(|n| (n * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("big.bin"), &data).expect("write");
        let id = git(&["hash-object", "-w", "big.bin"]);
        if packed {
            git(&["add", "big.bin"]);
            git(&[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-qm",
                "big",
            ]);
            git(&["gc", "-q"]);
        }
        (dir, ObjectId::from_hex(id.as_bytes()).expect("id"), data)
    }

    #[test]
    fn a_large_blob_streams_from_a_loose_object_or_a_pack_no_further_than_asked() {
        for packed in [false, true] {
            let (dir, id, data) = repo_with_blob(6 << 20, packed);
            let git_dir = dir.path().join(".git");
            let repo = gix::open(&git_dir).expect("open");
            let mut out = Vec::new();
            let written = copy_prefix(
                &repo,
                &git_dir,
                id,
                data.len() as u64,
                (1 << 20, DELTA_LIMIT),
                &mut out,
            )
            .expect("read");
            assert_eq!(written, 1 << 20, "packed: {packed}");
            assert_eq!(out, data[..1 << 20], "packed: {packed}");
            let mut all = Vec::new();
            copy_prefix(
                &repo,
                &git_dir,
                id,
                data.len() as u64,
                (u64::MAX, DELTA_LIMIT),
                &mut all,
            )
            .expect("read");
            assert!(all == data, "the whole blob, packed: {packed}");
            // and it came the streaming way, not through gix's whole-object lookup
            let mut streamed = Vec::new();
            let found = if packed {
                from_pack(&git_dir, id, 100, &mut streamed)
            } else {
                from_loose(&git_dir, id, 100, &mut streamed)
            };
            assert_eq!(found.expect("read"), Some(100), "packed: {packed}");
            assert_eq!(streamed, data[..100]);
        }
    }
}
