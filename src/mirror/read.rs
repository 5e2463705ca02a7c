//! Reads of a mirror at one commit, straight from the object database — never from a
//! worktree a sync may be swapping — so concurrent reads stay consistent. Blocking:
//! callers run these on the blocking pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use base64::Engine as _;
use serde::Serialize;

use super::Layout;
use super::diff::FileChange;
pub use super::diff::{DiffLimits, DiffOutcome, FileDiff, patch_of};
use crate::domain::{ProjectId, RepoPath};

/// File content returned at most.
pub const FILE_CAP: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the mirror could not be read")]
    Git(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub(super) fn git_error(err: impl std::error::Error + Send + Sync + 'static) -> ReadError {
    ReadError::Git(Box::new(err))
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema, PartialEq, Eq)]
pub struct TreeEntry {
    pub name: String,
    pub path: String,
    pub kind: &'static str,
    pub size: Option<u64>,
    /// the name cannot be written as it is on Windows (a `\` or `:`, a character
    /// Windows refuses, a trailing dot or space, a device name such as `CON`): a client
    /// there must not write it, lest it land outside its folder or somewhere else
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unsafe_on_windows: bool,
}

/// One page of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreePage {
    pub entries: Vec<TreeEntry>,
    /// the last name of this page when more follow: where the next page starts
    pub next_after: Option<String>,
}

/// Whether a file name cannot be written as it is on Windows.
pub fn unsafe_on_windows(name: &str) -> bool {
    const DEVICES: [&str; 22] = [
        "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
        "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
    ];
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    name.chars()
        .any(|c| matches!(c, '\\' | ':' | '<' | '>' | '"' | '|' | '?' | '*') || c < ' ')
        || name.ends_with('.')
        || name.ends_with(' ')
        || DEVICES
            .iter()
            .any(|device| stem.eq_ignore_ascii_case(device))
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FileContent {
    pub size: u64,
    pub encoding: &'static str,
    pub content: String,
    pub truncated: bool,
}

/// A commit's headline facts and the size of its checked-out tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadInfo {
    pub subject: String,
    pub author: String,
    pub committed_at: String,
    pub files: u64,
    pub bytes: u64,
}

/// Repositories the reader keeps open when nothing else is configured
/// (`HIVESYNC_READER_CACHE`).
pub const DEFAULT_CACHE: usize = 256;

/// Keeps the repositories of the most recently read mirrors open and shares each
/// between reads; the least recently read one is closed when a new one would pass the
/// capacity, and opened again when it is next read.
///
/// A handle is used while the mirror's pack directory is as it was when the handle
/// was opened; once a sync or housekeeping added or removed a pack, the next read opens
/// the repository afresh (once per change, not per read). A gitoxide store sizes its
/// pack slots when it is opened, so a handle kept across many syncs ran out of slots
/// for their packs and stopped finding new commits. A read that still fails while the
/// pack list changed under it (a sync finished during the read) is tried once more on
/// a fresh handle.
pub struct Reader {
    layout: Layout,
    capacity: usize,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    repos: HashMap<String, Cached>,
    /// a counter that orders uses: the entry with the lowest `used` goes first
    tick: u64,
}

struct Cached {
    repo: gix::ThreadSafeRepository,
    /// the pack indices on disk when it was opened (listed before opening)
    packs: Vec<std::ffi::OsString>,
    /// when the pack directory last changed, as seen before opening
    stamp: Option<std::time::SystemTime>,
    used: u64,
}

/// A repository handed to one read, and the pack list it was opened with.
pub(super) struct Opened {
    pub repo: gix::Repository,
    packs: Vec<std::ffi::OsString>,
}

impl std::ops::Deref for Opened {
    type Target = gix::Repository;
    fn deref(&self) -> &gix::Repository {
        &self.repo
    }
}

/// When a repository's pack directory last changed (a pack added or removed).
fn pack_stamp(git_dir: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(git_dir.join("objects").join("pack"))
        .and_then(|meta| meta.modified())
        .ok()
}

/// The names of a repository's pack indices, sorted.
pub(super) fn pack_indices(git_dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(git_dir.join("objects").join("pack"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name())
                .filter(|name| name.as_encoded_bytes().ends_with(b".idx"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl Reader {
    pub fn new(layout: Layout) -> Self {
        Self::with_capacity(layout, DEFAULT_CACHE)
    }

    /// A reader that keeps at most `capacity` repositories open (at least one).
    pub fn with_capacity(layout: Layout, capacity: usize) -> Self {
        Self {
            layout,
            capacity: capacity.max(1),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Repositories open now.
    pub fn open_repositories(&self) -> usize {
        self.cache
            .lock()
            .expect("reader lock is never poisoned")
            .repos
            .len()
    }

    /// The project's repository: the open one while its packs are as they were when it
    /// was opened (a stat of the pack directory), else a fresh one, which replaces it.
    /// Handles of replaced packs are let go with the old one, so packs a housekeeping
    /// run removed do not stay mapped.
    pub(super) fn repo(&self, project: &ProjectId) -> Result<Opened, ReadError> {
        let git_dir = self.layout.git_dir(project);
        let stamp = pack_stamp(&git_dir);
        {
            let mut cache = self.cache.lock().expect("reader lock is never poisoned");
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(cached) = cache.repos.get_mut(project.as_str())
                && cached.stamp == stamp
            {
                cached.used = tick;
                return Ok(Opened {
                    repo: cached.repo.to_thread_local(),
                    packs: cached.packs.clone(),
                });
            }
        }
        // opened outside the lock: other projects' reads do not wait for it
        let packs = pack_indices(&git_dir);
        let repo = gix::open_opts(&git_dir, gix::open::Options::isolated())
            .map_err(|_| ReadError::NotFound("the project has no mirror yet".into()))?;
        let shared = repo.into_sync();
        let local = shared.to_thread_local();
        let mut cache = self.cache.lock().expect("reader lock is never poisoned");
        if cache.repos.len() >= self.capacity && !cache.repos.contains_key(project.as_str()) {
            let coldest = cache
                .repos
                .iter()
                .min_by_key(|(_, cached)| cached.used)
                .map(|(key, _)| key.clone());
            if let Some(key) = coldest {
                cache.repos.remove(&key);
            }
        }
        cache.tick += 1;
        let used = cache.tick;
        cache.repos.insert(
            project.as_str().to_owned(),
            Cached {
                repo: shared,
                packs: packs.clone(),
                stamp,
                used,
            },
        );
        Ok(Opened { repo: local, packs })
    }

    /// Runs `read` on the project's repository; when it fails and the mirror's packs
    /// have changed since that handle was opened, runs it once more on a fresh handle.
    pub(super) fn with_repo<T>(
        &self,
        project: &ProjectId,
        read: impl Fn(&Opened) -> Result<T, ReadError>,
    ) -> Result<T, ReadError> {
        let opened = self.repo(project)?;
        match read(&opened) {
            Err(ReadError::NotFound(_) | ReadError::Git(_))
                if pack_indices(&self.layout.git_dir(project)) != opened.packs =>
            {
                drop(opened);
                self.forget(project);
                read(&self.repo(project)?)
            }
            other => other,
        }
    }

    /// Forgets a cached repository (after a repair re-created it, or a delete).
    pub fn forget(&self, project: &ProjectId) {
        self.cache
            .lock()
            .expect("reader lock is never poisoned")
            .repos
            .remove(project.as_str());
    }

    pub(super) fn tree_at<'repo>(
        repo: &'repo gix::Repository,
        commit: &str,
    ) -> Result<gix::Tree<'repo>, ReadError> {
        let id = parse_commit_id(commit)?;
        let commit = repo
            .find_commit(id)
            .map_err(|_| ReadError::NotFound(format!("commit {commit} is not in the mirror")))?;
        commit.tree().map_err(git_error)
    }

    /// The subject, author and date of `commit`, and the files and bytes of the tree
    /// the last sync wrote (read from the index it left, not by walking the tree).
    pub fn head_info(&self, project: &ProjectId, commit: &str) -> Result<HeadInfo, ReadError> {
        self.with_repo(project, |repo| {
            let id = parse_commit_id(commit)?;
            let found = repo.find_commit(id).map_err(|_| {
                ReadError::NotFound(format!("commit {commit} is not in the mirror"))
            })?;
            let subject = found.message().map_err(git_error)?.summary().to_string();
            let author = found.author().map_err(git_error)?.name.to_string();
            let seconds = found.time().map_err(git_error)?.seconds;
            let committed_at = time::OffsetDateTime::from_unix_timestamp(seconds)
                .map(crate::domain::format_rfc3339)
                .unwrap_or_default();
            let (files, bytes) = match repo.open_index() {
                Ok(index) => index
                    .entries()
                    .iter()
                    .fold((0u64, 0u64), |(files, bytes), entry| {
                        (files + 1, bytes + u64::from(entry.stat.size))
                    }),
                Err(_) => (0, 0),
            };
            Ok(HeadInfo {
                subject,
                author,
                committed_at,
                files,
                bytes,
            })
        })
    }

    /// One page of a directory's entries at `commit`, in path order: up to `limit`
    /// entries whose names sort after `after`. The directory's entries are listed from
    /// its tree object alone; only the page's files have their sizes looked up.
    pub fn tree(
        &self,
        project: &ProjectId,
        commit: &str,
        path: &RepoPath,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TreePage, ReadError> {
        self.with_repo(project, |repo| {
            let root = Self::tree_at(repo, commit)?;
            let tree = if path.is_root() {
                root
            } else {
                let entry = root
                    .lookup_entry_by_path(path.as_str())
                    .map_err(git_error)?
                    .ok_or_else(|| {
                        ReadError::NotFound(format!("no such path: {}", path.as_str()))
                    })?;
                if !entry.mode().is_tree() {
                    return Err(ReadError::Invalid(format!(
                        "{} is not a directory",
                        path.as_str()
                    )));
                }
                entry.object().map_err(git_error)?.into_tree()
            };
            let mut listed = Vec::new();
            for entry in tree.iter() {
                let entry = entry.map_err(git_error)?;
                let name = entry.filename().to_string();
                if after.is_some_and(|after| name.as_str() <= after) {
                    continue;
                }
                listed.push((name, entry.mode(), entry.oid().to_owned()));
            }
            // git orders a tree's entries as if directories ended in `/`; pages go by
            // the name alone, the order `path` sorts in
            listed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let more = listed.len() > limit;
            listed.truncate(limit);
            let mut entries = Vec::with_capacity(listed.len());
            for (name, mode, oid) in listed {
                let (kind, size) = if mode.is_tree() {
                    ("dir", None)
                } else if mode.is_commit() {
                    ("submodule", None)
                } else {
                    let header = repo.find_header(oid).map_err(git_error)?;
                    ("file", Some(header.size()))
                };
                entries.push(TreeEntry {
                    path: path.join(&name),
                    unsafe_on_windows: unsafe_on_windows(&name),
                    name,
                    kind,
                    size,
                });
            }
            let next_after = more
                .then(|| entries.last().map(|entry| entry.name.clone()))
                .flatten();
            Ok(TreePage {
                entries,
                next_after,
            })
        })
    }

    pub fn file(
        &self,
        project: &ProjectId,
        commit: &str,
        path: &RepoPath,
    ) -> Result<FileContent, ReadError> {
        if path.is_root() {
            return Err(ReadError::Invalid(
                "path names the root directory, not a file".into(),
            ));
        }
        self.with_repo(project, |repo| {
            let root = Self::tree_at(repo, commit)?;
            let entry = root
                .lookup_entry_by_path(path.as_str())
                .map_err(git_error)?
                .ok_or_else(|| ReadError::NotFound(format!("no such file: {}", path.as_str())))?;
            if entry.mode().is_tree() || entry.mode().is_commit() {
                return Err(ReadError::Invalid(format!(
                    "{} is not a file",
                    path.as_str()
                )));
            }
            // the size from the object's header; no more than what is sent is inflated
            let id = entry.object_id();
            let size = repo.find_header(id).map_err(git_error)?.size();
            let mut shown = Vec::with_capacity(FILE_CAP.min(size as usize));
            super::blob::copy_prefix(
                repo,
                &self.layout.git_dir(project),
                id,
                size,
                (FILE_CAP as u64, super::blob::DELTA_LIMIT),
                &mut shown,
            )
            .map_err(|err| match err {
                super::blob::BlobError::DeltaTooLarge => ReadError::Invalid(format!(
                    "{} is {size} bytes stored as a delta; files over {} MiB stored so are not shown",
                    path.as_str(),
                    super::blob::DELTA_LIMIT >> 20
                )),
                other => git_error(other),
            })?;
            Ok(encode_prefix(&shown, size, FILE_CAP))
        })
    }

    /// The files changed from `from` to `to`, within `limits`: past its files, lines
    /// or bytes the answer is `truncated`; a file whose patch would be over the patch
    /// cap (known from the blobs' headers where it can be, without inflating them) or
    /// whose line diff ran out of time is listed `too_large`, with no patch. `cancel`
    /// (the client went away, the server is stopping) ends the work at the next file.
    pub fn diff(
        &self,
        project: &ProjectId,
        from: &str,
        to: &str,
        limits: &DiffLimits,
        cancel: &AtomicBool,
    ) -> Result<DiffOutcome, ReadError> {
        let deadline = Instant::now() + limits.timeout;
        self.with_repo(project, |repo| {
            let old_tree = Self::tree_at(repo, from)?;
            let new_tree = Self::tree_at(repo, to)?;
            let options =
                gix::diff::Options::default().with_rewrites(Some(gix::diff::Rewrites::default()));
            let changes = repo
                .diff_tree_to_tree(&old_tree, &new_tree, options)
                .map_err(git_error)?;
            let mut outcome = DiffOutcome::default();
            let (mut bytes, mut lines) = (0usize, 0usize);
            for change in changes {
                let Some(change) = FileChange::of(change) else {
                    continue;
                };
                if outcome.files.len() >= limits.max_files
                    || bytes >= limits.max_bytes
                    || lines >= limits.max_lines
                    || cancel.load(Ordering::Relaxed)
                {
                    outcome.truncated = true;
                    break;
                }
                let patch = change.patch(repo, limits, deadline)?;
                if let Some(patch) = &patch {
                    let patch_lines = patch.lines().count();
                    if bytes + patch.len() > limits.max_bytes
                        || lines + patch_lines > limits.max_lines
                    {
                        // the answer is full: this file and the rest are left out
                        outcome.truncated = true;
                        break;
                    }
                    bytes += patch.len();
                    lines += patch_lines;
                }
                // what a file costs in the answer beside its patch
                bytes += change.path.len() + change.old_path.as_ref().map_or(0, String::len) + 64;
                outcome.files.push(FileDiff {
                    too_large: patch.is_none(),
                    path: change.path,
                    old_path: change.old_path,
                    status: change.status,
                    patch,
                });
            }
            Ok(outcome)
        })
    }
}

fn parse_commit_id(commit: &str) -> Result<gix::ObjectId, ReadError> {
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReadError::Invalid(format!(
            "'{commit}' is not a full commit id (40 hex digits)"
        )));
    }
    gix::ObjectId::from_hex(commit.as_bytes())
        .map_err(|_| ReadError::Invalid(format!("'{commit}' is not a commit id")))
}

pub(super) fn under_prefix(path: &str, prefix: &RepoPath) -> bool {
    prefix.is_root()
        || path == prefix.as_str()
        || (path.starts_with(prefix.as_str())
            && path.as_bytes().get(prefix.as_str().len()) == Some(&b'/'))
}

/// Text as UTF-8 when it is (and has no NUL), else base64; cut at `cap` bytes.
pub fn encode_content(data: &[u8], cap: usize) -> FileContent {
    encode_prefix(data, data.len() as u64, cap)
}

/// [`encode_content`] of a file of `size` bytes of which `data` is the beginning.
pub fn encode_prefix(data: &[u8], size: u64, cap: usize) -> FileContent {
    let truncated = size > cap as u64;
    let shown = &data[..data.len().min(cap)];
    let text = match std::str::from_utf8(shown) {
        Ok(text) => Some(text),
        // a cut may split the last character: keep the valid part
        Err(err) if truncated && err.error_len().is_none() => {
            std::str::from_utf8(&shown[..err.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    match text.filter(|text| !text.contains('\0')) {
        Some(text) => FileContent {
            size,
            encoding: "utf-8",
            content: text.to_owned(),
            truncated,
        },
        None => FileContent {
            size,
            encoding: "base64",
            content: base64::engine::general_purpose::STANDARD.encode(shown),
            truncated,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_text_and_binary_becomes_base64() {
        let text = encode_content("héllo\n".as_bytes(), 1024);
        assert_eq!(
            (text.encoding, text.content.as_str(), text.truncated),
            ("utf-8", "héllo\n", false)
        );
        let binary = encode_content(&[0, 159, 146, 150], 1024);
        assert_eq!(binary.encoding, "base64");
        assert_eq!(binary.content, "AJ+Slg==");
        // a cut inside a multi-byte character keeps the text valid
        let cut = encode_content("aé".as_bytes(), 2);
        assert_eq!(
            (cut.encoding, cut.content.as_str(), cut.truncated, cut.size),
            ("utf-8", "a", true, 3)
        );
    }

    #[test]
    fn prefixes_match_whole_components() {
        let prefix = RepoPath::parse("src").expect("valid");
        assert!(under_prefix("src/lib.rs", &prefix));
        assert!(!under_prefix("srcs/lib.rs", &prefix));
        assert!(under_prefix("anything", &RepoPath::default()));
    }
}
