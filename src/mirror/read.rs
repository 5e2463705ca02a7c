//! Reads of a mirror at one commit, straight from the object database — never from a
//! worktree a sync may be swapping — so concurrent reads stay consistent. Blocking:
//! callers run these on the blocking pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;

use super::Layout;
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

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FileDiff {
    pub path: String,
    pub old_path: Option<String>,
    pub status: &'static str,
    /// `null` when `too_large`
    pub patch: Option<String>,
    /// the patch is over `HIVESYNC_DIFF_MAX_PATCH_BYTES`, or its line diff ran out of
    /// the diff's time (`HIVESYNC_DIFF_TIMEOUT_MS`): not computed, not sent
    pub too_large: bool,
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

/// What one diff may cost (`HIVESYNC_DIFF_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffLimits {
    /// changed files listed at most; past them the answer is `truncated`
    pub max_files: usize,
    /// a file's patch over this is `too_large` (GitLab's `diff_max_patch_bytes`)
    pub max_patch_bytes: usize,
    /// patches (and listed paths) one answer carries in total
    pub max_bytes: usize,
    /// patch lines one answer carries in total
    pub max_lines: usize,
    /// time all of one diff's line differences may take together
    pub timeout: Duration,
}

impl Default for DiffLimits {
    fn default() -> Self {
        Self {
            max_files: 1000,
            max_patch_bytes: 200 * 1024,
            max_bytes: 4 * 1024 * 1024,
            max_lines: 50_000,
            timeout: Duration::from_secs(5),
        }
    }
}

impl DiffLimits {
    /// A side of a modified file bigger than this is not read at all: its patch
    /// could be small, but finding out would inflate the whole blob.
    pub fn max_blob_bytes(&self) -> u64 {
        (self.max_patch_bytes as u64).saturating_mul(8)
    }
}

/// What a diff found, within its limits.
#[derive(Debug, Default)]
pub struct DiffOutcome {
    pub files: Vec<FileDiff>,
    /// files were left out (past a limit, or the request was cancelled)
    pub truncated: bool,
}

/// One changed blob (or symlink) of a tree diff.
struct FileChange {
    status: &'static str,
    path: String,
    old_path: Option<String>,
    old_id: Option<gix::ObjectId>,
    new_id: Option<gix::ObjectId>,
}

impl FileChange {
    fn of(change: gix::object::tree::diff::ChangeDetached) -> Option<Self> {
        use gix::object::tree::diff::ChangeDetached as Change;
        let file = |status, path: &gix::bstr::BStr, old_path: Option<String>, old_id, new_id| {
            Some(Self {
                status,
                path: path.to_string(),
                old_path,
                old_id,
                new_id,
            })
        };
        match change {
            Change::Addition {
                location,
                entry_mode,
                id,
                ..
            } if entry_mode.is_blob_or_symlink() => {
                file("added", location.as_ref(), None, None, Some(id))
            }
            Change::Deletion {
                location,
                entry_mode,
                id,
                ..
            } if entry_mode.is_blob_or_symlink() => {
                file("deleted", location.as_ref(), None, Some(id), None)
            }
            Change::Modification {
                location,
                entry_mode,
                previous_id,
                id,
                ..
            } if entry_mode.is_blob_or_symlink() => file(
                "modified",
                location.as_ref(),
                None,
                Some(previous_id),
                Some(id),
            ),
            Change::Rewrite {
                source_location,
                source_id,
                location,
                id,
                entry_mode,
                copy,
                ..
            } if entry_mode.is_blob_or_symlink() => {
                // a copy leaves its source in place: to the reader it is a new file
                let status = if copy { "added" } else { "renamed" };
                file(
                    status,
                    location.as_ref(),
                    Some(source_location.to_string()),
                    Some(source_id),
                    Some(id),
                )
            }
            _ => None,
        }
    }

    /// The change's unified patch, or `None` when it is over the patch cap or its line
    /// diff ran out of time. Sizes come from the object headers first: an added or
    /// deleted blob over the cap, or any side over [`DiffLimits::max_blob_bytes`], is
    /// never inflated.
    fn patch(
        &self,
        repo: &gix::Repository,
        limits: &DiffLimits,
        deadline: Instant,
    ) -> Result<Option<String>, ReadError> {
        let size = |id: Option<gix::ObjectId>| -> Result<u64, ReadError> {
            match id {
                Some(id) => Ok(repo.find_header(id).map_err(git_error)?.size()),
                None => Ok(0),
            }
        };
        let (old_size, new_size) = (size(self.old_id)?, size(self.new_id)?);
        let one_sided = self.old_id.is_none() || self.new_id.is_none();
        if old_size.max(new_size) > limits.max_blob_bytes()
            || (one_sided && old_size + new_size > limits.max_patch_bytes as u64)
            || Instant::now() >= deadline
        {
            return Ok(None);
        }
        let read = |id: Option<gix::ObjectId>| -> Result<Vec<u8>, ReadError> {
            match id {
                Some(id) => Ok(repo.find_blob(id).map_err(git_error)?.take_data()),
                None => Ok(Vec::new()),
            }
        };
        let (old, new) = (read(self.old_id)?, read(self.new_id)?);
        let old_name = self.old_path.as_deref().unwrap_or(&self.path);
        Ok(unified_patch(
            Sides {
                old_path: old_name,
                new_path: &self.path,
                old: &old,
                new: &new,
                added: self.old_id.is_none(),
                deleted: self.new_id.is_none(),
            },
            limits.max_patch_bytes,
            deadline,
        ))
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

fn is_binary(data: &[u8]) -> bool {
    data[..data.len().min(8000)].contains(&0) || std::str::from_utf8(data).is_err()
}

/// The unified patch `/repo/diff` would show for a file changed from `old` to `new`
/// (`None`: over `cap` bytes, or not done by `deadline`).
pub fn patch_of(old: &[u8], new: &[u8], cap: usize, deadline: Instant) -> Option<String> {
    unified_patch(
        Sides {
            old_path: "file",
            new_path: "file",
            old,
            new,
            added: old.is_empty(),
            deleted: new.is_empty(),
        },
        cap,
        deadline,
    )
}

/// Both sides of one file's change.
struct Sides<'a> {
    old_path: &'a str,
    new_path: &'a str,
    old: &'a [u8],
    new: &'a [u8],
    added: bool,
    deleted: bool,
}

/// A git-style unified patch of `sides`, or `None` when it would be over `cap` bytes
/// or the line diff did not finish by `deadline` (`similar` then gives up on a
/// minimal diff; a patch that is not what git shows is not shown).
fn unified_patch(sides: Sides<'_>, cap: usize, deadline: Instant) -> Option<String> {
    let old_header = if sides.added {
        "/dev/null".to_owned()
    } else {
        format!("a/{}", sides.old_path)
    };
    let new_header = if sides.deleted {
        "/dev/null".to_owned()
    } else {
        format!("b/{}", sides.new_path)
    };
    if is_binary(sides.old) || is_binary(sides.new) {
        return Some(format!(
            "Binary files {old_header} and {new_header} differ\n"
        ));
    }
    let old_text = String::from_utf8_lossy(sides.old);
    let new_text = String::from_utf8_lossy(sides.new);
    let diff = similar::TextDiff::configure()
        .deadline(deadline)
        .diff_lines(old_text.as_ref(), new_text.as_ref());
    if Instant::now() >= deadline {
        return None;
    }
    let patch = diff
        .unified_diff()
        .context_radius(3)
        .header(&old_header, &new_header)
        .to_string();
    (patch.len() <= cap).then_some(patch)
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

    #[test]
    fn patches_have_git_style_headers() {
        let later = Instant::now() + Duration::from_secs(60);
        let sides = |old: &'static [u8], new: &'static [u8], added| Sides {
            old_path: "a.txt",
            new_path: "a.txt",
            old,
            new,
            added,
            deleted: false,
        };
        let patch = unified_patch(sides(b"one\ntwo\n", b"one\nthree\n", false), 1024, later)
            .expect("under the cap");
        assert!(patch.starts_with("--- a/a.txt\n+++ b/a.txt\n"), "{patch}");
        assert!(patch.contains("-two\n+three\n"));
        let added = unified_patch(sides(b"", b"new\n", true), 1024, later).expect("small");
        assert!(added.starts_with("--- /dev/null\n+++ b/a.txt\n"));
        assert_eq!(
            unified_patch(sides(b"one\ntwo\n", b"one\nthree\n", false), 10, later),
            None,
            "over the cap: not shown"
        );
    }

    #[test]
    fn a_line_diff_out_of_time_is_not_shown() {
        let old: String = (0..20_000).map(|n| format!("old line {n}\n")).collect();
        let new: String = (0..20_000).map(|n| format!("new line {n}\n")).collect();
        let sides = Sides {
            old_path: "big.txt",
            new_path: "big.txt",
            old: old.as_bytes(),
            new: new.as_bytes(),
            added: false,
            deleted: false,
        };
        assert_eq!(unified_patch(sides, usize::MAX, Instant::now()), None);
    }
}
