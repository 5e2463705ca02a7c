//! Mirrors on disk, with gitoxide. Blocking code only: callers run it on the blocking
//! pool and stop it through the interrupt flag. Knows nothing of jobs, events or HTTP.
//!
//! Layout under DATA_DIR (all of a project's paths are named by its validated id):
//! - `git/<id>.git` — the repository: objects and refs, fetched into; never a worktree.
//! - `trees/<id>/<snapshot>/` — one checkout of one commit, written once, never edited;
//!   its `.git` is a gitfile pointing at `git/<id>.git`.
//! - `repos/<id>` — a symlink to the current snapshot, replaced by `rename(2)`, so a
//!   reader sees the old tree or the new one and never a mix.

pub mod read;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{SystemTime, UNIX_EPOCH};

use gix::bstr::ByteSlice;
use gix::progress::tree::{Item, Root};

use crate::domain::ProjectId;
use crate::protocol::{Progress, SyncErrorCode};

/// Progress ids gix's pack writer reports under (see `gix_pack` `ProgressId`).
const PACK_BYTES: [u8; 4] = *b"BWRB";
const INDEXED_OBJECTS: [u8; 4] = *b"IWIO";
/// Our own ids for the checkout.
const CHECKOUT_FILES: [u8; 4] = *b"HSCF";
const CHECKOUT_BYTES: [u8; 4] = *b"HSCB";

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("could not prepare the mirror directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("the repository was not found or is not readable")]
    RepoNotFound(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("branch '{0}' does not exist in the repository")]
    BranchNotFound(String),
    #[error("the remote refused the credentials")]
    AuthFailed(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    CredentialMissing(String),
    #[error("the remote's SSH host key does not match HIVESYNC_SSH_KNOWN_HOSTS")]
    HostKeyRejected,
    #[error("this build cannot fetch from this kind of URL")]
    Unsupported(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("could not reach the remote")]
    Network(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the mirror repository is damaged and could not be repaired")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the sync was interrupted")]
    Interrupted,
    #[error("another worker took this mirror over (this worker's project lock expired)")]
    Fenced,
    #[error(
        "the branch has paths that cannot be checked out safely (such as '.git' or '..'); nothing was written"
    )]
    UnsafeTree(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the working tree could not be written")]
    Checkout(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("git operation failed")]
    Git(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl MirrorError {
    pub fn code(&self) -> SyncErrorCode {
        if self.is_out_of_space() {
            return SyncErrorCode::StorageFull;
        }
        match self {
            MirrorError::RepoNotFound(_) | MirrorError::BranchNotFound(_) => {
                SyncErrorCode::RepoNotFound
            }
            MirrorError::AuthFailed(_)
            | MirrorError::CredentialMissing(_)
            | MirrorError::HostKeyRejected => SyncErrorCode::RepoAuthFailed,
            MirrorError::Network(_) => SyncErrorCode::NetworkError,
            MirrorError::Corrupt(_) => SyncErrorCode::MirrorCorrupt,
            MirrorError::Interrupted => SyncErrorCode::Timeout,
            MirrorError::Io(err) if is_out_of_space(err) => SyncErrorCode::StorageFull,
            MirrorError::Io(_)
            | MirrorError::Checkout(_)
            | MirrorError::Git(_)
            | MirrorError::UnsafeTree(_)
            | MirrorError::Fenced
            | MirrorError::Unsupported(_) => SyncErrorCode::BackendError,
        }
    }

    /// Network failures are worth another attempt; the others fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MirrorError::Network(_)) && !self.is_out_of_space()
    }

    /// Whether the disk filled up, wherever in gix the write failed (pack, index,
    /// checkout): an `io::Error` of kind `StorageFull` anywhere among the causes.
    pub fn is_out_of_space(&self) -> bool {
        if let MirrorError::Io(err) = self
            && is_out_of_space(err)
        {
            return true;
        }
        io_error_kinds(self).contains(&std::io::ErrorKind::StorageFull)
    }
}

fn is_out_of_space(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::StorageFull || err.raw_os_error() == Some(28)
}

/// Where a step of a sync is; the worker turns these into stage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Fetching,
    UpdatingFiles,
    Cleaning,
    Finalizing,
}

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

    /// Removes everything of a deleted project.
    pub fn remove(&self, project: &ProjectId) -> std::io::Result<()> {
        remove_if_exists(&self.worktree(project))?;
        remove_if_exists(&self.trees_dir(project))?;
        remove_if_exists(&self.git_dir(project))?;
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
fn claim_fence(path: &Path, fence: u64) -> Result<(), MirrorError> {
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
fn check_fence(path: &Path, fence: u64) -> Result<(), MirrorError> {
    if read_fence(path)? != fence {
        return Err(MirrorError::Fenced);
    }
    Ok(())
}

/// What one sync of a mirror asks for.
pub struct SyncSpec<'a> {
    pub project: &'a ProjectId,
    /// The URL to fetch from, credentials included: never logged.
    pub url: &'a str,
    pub branch: &'a str,
    /// `core.sshCommand` for this sync: the key and host-key policy (ssh URLs only)
    pub ssh_command: Option<String>,
    /// The login for an http(s) remote, from the project's named credential; without
    /// one, userinfo in the URL is used.
    pub http_identity: Option<HttpIdentity>,
    /// CAs trusted for HTTPS instead of the system's (`http.sslCAInfo`)
    pub https_ca_file: Option<PathBuf>,
    /// The fencing token of the worker's project lock; the mirror refuses older ones.
    pub fence: u64,
}

/// A user name and token for an http(s) remote. Never logged.
#[derive(Clone)]
pub struct HttpIdentity {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for HttpIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpIdentity")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub commit: String,
    pub previous_commit: Option<String>,
    /// The repository was unusable and was re-created from scratch.
    pub repaired: bool,
    /// Objects and pack bytes received (zero when the remote had nothing new).
    pub objects: u64,
    pub bytes: u64,
}

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
    let git_dir = layout.git_dir(spec.project);
    let mut overrides: Vec<String> = spec
        .ssh_command
        .iter()
        .map(|command| format!("core.sshCommand={command}"))
        .collect();
    if let Some(ca_file) = &spec.https_ca_file {
        overrides.push(format!("http.sslCAInfo={}", ca_file.display()));
    }
    let (mut repo, mut reopened) = open_or_init(&git_dir, &overrides)?;
    if let Err(problem) = health_check(&repo, spec.branch) {
        tracing::warn!(project_id = %spec.project, %problem, "mirror failed its health check; cloning it again");
        drop(repo);
        remove_if_exists(&git_dir)?;
        (repo, _) = open_or_init(&git_dir, &overrides)?;
        reopened = true;
    }
    let repaired = recloned || reopened;
    let local_branch = format!("refs/heads/{}", spec.branch);
    let previous_commit = repo
        .try_find_reference(local_branch.as_str())
        .ok()
        .flatten()
        .and_then(|mut reference| reference.peel_to_id().ok())
        .map(|id| id.to_string());

    let (commit, transfer) = fetch(&repo, spec, progress, interrupt)?;
    check_interrupt(interrupt)?;

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
    if previous_commit.as_deref() == Some(commit_hex.as_str())
        && let (Some(current), Some(index)) = (&previous_tree, &previous_index)
        && current
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(&commit_hex[..12]))
        && snapshot_is_exact(index, current)
    {
        on_phase(Phase::UpdatingFiles);
        on_phase(Phase::Cleaning);
        check_fence(&fence_file, spec.fence)?;
        remove_other_snapshots(&trees_dir, &[current])?;
        on_phase(Phase::Finalizing);
        return Ok(SyncOutcome {
            commit: commit_hex,
            previous_commit,
            repaired,
            objects: transfer.objects,
            bytes: transfer.bytes,
        });
    }

    on_phase(Phase::UpdatingFiles);
    std::fs::create_dir_all(&trees_dir)?;
    let snapshot = trees_dir.join(format!("{}-{}", &commit_hex[..12], unique_suffix()));
    let reuse = previous_index
        .as_ref()
        .zip(previous_tree.as_deref())
        .map(|(index, dir)| Reuse { dir, index });
    let written = checkout(
        &repo, commit, &snapshot, &git_dir, reuse, progress, interrupt,
    );
    if let Err(err) = written {
        let _ = remove_if_exists(&snapshot);
        return Err(err);
    }
    let mut index = written.expect("checked above");
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
    remove_other_snapshots(&trees_dir, &keep)?;

    on_phase(Phase::Finalizing);
    index
        .write(Default::default())
        .map_err(|err| MirrorError::Git(Box::new(err)))?;
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
    if let Some(previous) = &previous_tree {
        remove_if_exists(previous)?;
    }
    Ok(SyncOutcome {
        commit: commit_hex,
        previous_commit,
        repaired,
        objects: transfer.objects,
        bytes: transfer.bytes,
    })
}

/// The snapshot the worktree link points at, if it exists.
fn current_snapshot(worktree: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(worktree).ok()?;
    let target = if target.is_absolute() {
        target
    } else {
        worktree.parent()?.join(target)
    };
    target.is_dir().then_some(target)
}

fn remove_other_snapshots(trees_dir: &Path, keep: &[&Path]) -> Result<(), MirrorError> {
    for entry in std::fs::read_dir(trees_dir)? {
        let path = entry?.path();
        if !keep.contains(&path.as_path()) {
            remove_if_exists(&path)?;
        }
    }
    Ok(())
}

/// git's stat test: `file` is a regular file with the size and modification time
/// `recorded` noted when it was written.
fn stat_unchanged(file: &Path, recorded: &gix::index::Entry) -> bool {
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
fn snapshot_is_exact(index: &gix::index::File, snapshot: &Path) -> bool {
    let mut on_disk = 0usize;
    let mut pending = vec![snapshot.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return false;
        };
        for entry in entries {
            let Ok(entry) = entry else { return false };
            let path = entry.path();
            if dir == snapshot && entry.file_name() == ".git" {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                return false;
            };
            if meta.is_dir() {
                pending.push(path);
                continue;
            }
            on_disk += 1;
            let recorded = path
                .strip_prefix(snapshot)
                .ok()
                .and_then(|relative| relative.to_str())
                .and_then(|relative| index.entry_by_path(relative.into()));
            if !recorded.is_some_and(|recorded| stat_unchanged(&path, recorded)) {
                return false;
            }
        }
    }
    let expected = index
        .entries()
        .iter()
        .filter(|entry| entry.mode != gix::index::entry::Mode::COMMIT)
        .count();
    on_disk == expected
}

fn check_interrupt(interrupt: &AtomicBool) -> Result<(), MirrorError> {
    if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(MirrorError::Interrupted);
    }
    Ok(())
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:x}")
}

/// Whether a project's mirror is sound, without changing it: the repository opens and
/// passes [`health_check`], and the worktree link leads to a tree. A project never
/// synced is sound.
pub fn inspect(layout: &Layout, project: &ProjectId, branch: &str) -> Result<(), String> {
    let git_dir = layout.git_dir(project);
    if !git_dir.exists() {
        return Ok(());
    }
    let repo = gix::open_opts(&git_dir, gix::open::Options::isolated())
        .map_err(|err| format!("the repository does not open: {err}"))?;
    health_check(&repo, branch)?;
    let worktree = layout.worktree(project);
    match std::fs::metadata(&worktree) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err("the worktree is not a directory".to_owned()),
        Err(_) if std::fs::symlink_metadata(&worktree).is_err() => {
            Err("the mirror has no worktree (an interrupted first clone)".to_owned())
        }
        Err(_) => Err("the worktree link leads nowhere".to_owned()),
    }
}

/// Checks what a fetch relies on: HEAD reads, and the commits our refs name (with
/// their trees) are present. A repository failing this is cloned again.
pub fn health_check(repo: &gix::Repository, branch: &str) -> Result<(), String> {
    repo.head()
        .map_err(|err| format!("HEAD is unreadable: {err}"))?;
    for name in [
        format!("refs/heads/{branch}"),
        format!("refs/remotes/origin/{branch}"),
    ] {
        let Ok(Some(mut reference)) = repo.try_find_reference(name.as_str()) else {
            continue;
        };
        let id = reference
            .peel_to_id()
            .map_err(|err| format!("{name} does not resolve: {err}"))?
            .detach();
        let commit = repo
            .find_commit(id)
            .map_err(|err| format!("{name} names a missing commit {id}: {err}"))?;
        let tree = commit
            .tree_id()
            .map_err(|err| format!("commit {id} is unreadable: {err}"))?;
        if !repo.has_object(tree) {
            return Err(format!("the tree of {name} is missing"));
        }
    }
    Ok(())
}

/// Opens the mirror's repository, or creates it; a repository that will not open is
/// deleted and created again (`repaired`).
fn open_or_init(
    git_dir: &Path,
    overrides: &[String],
) -> Result<(gix::Repository, bool), MirrorError> {
    let options =
        || gix::open::Options::isolated().config_overrides(overrides.iter().map(String::as_str));
    let mut repaired = false;
    if git_dir.exists() {
        match gix::open_opts(git_dir, options()) {
            Ok(repo) => return Ok((repo, false)),
            Err(_) => {
                std::fs::remove_dir_all(git_dir)?;
                repaired = true;
            }
        }
    }
    if let Some(parent) = git_dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    gix::init_bare(git_dir).map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
    // not bare, so `git` run in a snapshot (whose .git points here) treats the snapshot
    // as the work tree; there is no worktree of its own
    let config = git_dir.join("config");
    let text = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        text.replace("bare = true", "bare = false") + "\tsymlinks = false\n",
    )?;
    let repo =
        gix::open_opts(git_dir, options()).map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
    Ok((repo, repaired))
}

fn fetch(
    repo: &gix::Repository,
    spec: &SyncSpec<'_>,
    progress: &Root,
    interrupt: &AtomicBool,
) -> Result<(gix::ObjectId, Transfer), MirrorError> {
    let tracking = format!("refs/remotes/origin/{}", spec.branch);
    let refspec = format!("+refs/heads/{}:{tracking}", spec.branch);
    let mut url = gix::url::parse(spec.url.as_bytes())
        .map_err(|err| MirrorError::RepoNotFound(Box::new(err)))?;
    // over http(s), the login goes through the credentials callback only: from the
    // project's credential, else from the URL's userinfo, which is taken off the URL
    let mut identity = spec.http_identity.clone();
    if matches!(url.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https) {
        if identity.is_none()
            && let (Some(user), Some(password)) = (url.user(), url.password())
        {
            identity = Some(HttpIdentity {
                username: user.to_owned(),
                password: password.to_owned(),
            });
        }
        url.set_user(None);
        url.set_password(None);
    }
    // an anonymous remote: the URL (and any credential in it) is never written to disk
    let remote = repo
        .remote_at(url)
        .map_err(|err| MirrorError::RepoNotFound(Box::new(err)))?
        .with_refspecs([refspec.as_str()], gix::remote::Direction::Fetch)
        .map_err(|err| MirrorError::Git(Box::new(err)))?
        .with_fetch_tags(gix::remote::fetch::Tags::None);
    let mut fetch_progress = progress.add_child("fetch");
    let connection = remote
        .connect(gix::remote::Direction::Fetch)
        .map_err(|err| classify_connect(Box::new(err)))?
        // never a prompt or a configured helper: the identity above, or none
        .with_credentials(move |action| {
            Ok(match action {
                gix::credentials::helper::Action::Get(context) => {
                    identity
                        .clone()
                        .map(|identity| gix::credentials::protocol::Outcome {
                            identity: gix::sec::identity::Account {
                                username: identity.username,
                                password: identity.password,
                                oauth_refresh_token: None,
                            },
                            next: context.into(),
                        })
                }
                _ => None,
            })
        });
    let prepared = connection
        .prepare_fetch(&mut fetch_progress, Default::default())
        .map_err(|err| classify_connect(Box::new(err)))?;
    // the server lists the refs our refspec asks for; no branch means nothing to fetch
    let branch_ref = format!("refs/heads/{}", spec.branch);
    let advertised = prepared.ref_map().remote_refs.iter().any(|remote_ref| {
        let (name, _, _) = remote_ref.unpack();
        name == branch_ref.as_bytes()
    });
    if !advertised {
        return Err(MirrorError::BranchNotFound(spec.branch.to_owned()));
    }
    let outcome = prepared
        .receive(&mut fetch_progress, interrupt)
        .map_err(|err| {
            if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                MirrorError::Interrupted
            } else {
                classify_connect(Box::new(err))
            }
        })?;
    let id = repo
        .find_reference(tracking.as_str())
        .map_err(|_| MirrorError::BranchNotFound(spec.branch.to_owned()))?
        .peel_to_id()
        .map_err(|err| MirrorError::Corrupt(Box::new(err)))?
        .detach();
    // gix drops its progress items when the transfer ends, so the totals come from
    // what was written
    let transfer = match &outcome.status {
        gix::remote::fetch::Status::Change {
            write_pack_bundle, ..
        } => Transfer {
            objects: u64::from(write_pack_bundle.index.num_objects),
            bytes: write_pack_bundle
                .data_path
                .as_ref()
                .and_then(|path| std::fs::metadata(path).ok())
                .map_or(0, |meta| meta.len()),
        },
        gix::remote::fetch::Status::NoPackReceived { .. } => Transfer::default(),
    };
    Ok((id, transfer))
}

#[derive(Debug, Default, Clone, Copy)]
struct Transfer {
    objects: u64,
    bytes: u64,
}

/// Sorts a failed connection or transfer by its cause — refused credentials, a missing
/// repository, or the network — from gix's own classification of its error tree
/// (gix turns ssh's diagnostics and I/O kinds into classes too), never from its text.
fn classify_connect(err: Box<dyn std::error::Error + Send + Sync>) -> MirrorError {
    use gix::error::Class;
    let classes: Vec<Class> = gix::error::classify(err.as_ref())
        .map(|found| found.class())
        .collect();
    let io_kinds = io_error_kinds(err.as_ref());
    if classes
        .iter()
        .any(|class| matches!(class, Class::Unauthenticated | Class::PermissionDenied))
        || io_kinds.contains(&std::io::ErrorKind::PermissionDenied)
    {
        return MirrorError::AuthFailed(err);
    }
    if classes.contains(&Class::NotFound)
        || io_kinds.contains(&std::io::ErrorKind::NotFound)
        || matches!(http_status(err.as_ref()), Some(404 | 410))
    {
        return MirrorError::RepoNotFound(err);
    }
    if classes.contains(&Class::Unsupported) {
        return MirrorError::Unsupported(err);
    }
    MirrorError::Network(err)
}

/// The HTTP status an http(s) remote refused with. gix classifies 401 and 403 but not
/// 404 (its curl backend only says "Received HTTP status 404"), so for that one case
/// the status is read from the message; nothing else is classified by text.
fn http_status(err: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let parse = |message: String| {
        message
            .strip_prefix("Received HTTP status ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|code| code.parse().ok())
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(status) = parse(current.to_string()) {
            return Some(status);
        }
        if let Some(tree) = current.downcast_ref::<gix::Error>()
            && let Some(status) = tree.iter_errors().find_map(|e| parse(e.to_string()))
        {
            return Some(status);
        }
        source = current.source();
    }
    None
}

/// The `io::ErrorKind`s anywhere in an error's causes, through gix's error trees.
fn io_error_kinds(err: &(dyn std::error::Error + 'static)) -> Vec<std::io::ErrorKind> {
    let mut kinds = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        if let Some(tree) = current.downcast_ref::<gix::Error>() {
            kinds.extend(
                tree.iter_errors()
                    .filter_map(|e| e.downcast_ref::<std::io::Error>())
                    .map(std::io::Error::kind),
            );
        }
        source = current.source();
    }
    kinds
}

/// The previous snapshot and the index it was written with.
struct Reuse<'a> {
    dir: &'a Path,
    index: &'a gix::index::File,
}

impl Reuse<'_> {
    /// Whether the previous tree holds `entry` unchanged since it was written: same
    /// blob and mode in the index, and the file still has the size and modification
    /// time recorded then (git's stat test).
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
        let file = self.dir.join(path.to_str().ok()?);
        stat_unchanged(&file, old).then_some((file, old.stat))
    }
}

fn checkout(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    snapshot: &Path,
    git_dir: &Path,
    reuse: Option<Reuse<'_>>,
    progress: &Root,
    interrupt: &AtomicBool,
) -> Result<gix::index::File, MirrorError> {
    let tree = repo
        .find_commit(commit)
        .map_err(|err| MirrorError::Corrupt(Box::new(err)))?
        .tree_id()
        .map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
    let mut index = match repo.index_from_tree(&tree) {
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
    let mut options = repo
        .checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)
        .map_err(|err| MirrorError::Git(Box::new(err)))?;
    // links are written as small files holding their target, as git does with
    // core.symlinks=false: a mirror never holds a symlink
    options.fs.symlink = false;
    options.destination_is_initially_empty = true;
    options.overwrite_existing = false;
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
        &mut index, snapshot, objects, &files, &bytes, interrupt, options,
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
    for (old_file, new_file) in &linked {
        if let Some(parent) = new_file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::hard_link(old_file, new_file)?;
    }
    for entry in index.entries_mut() {
        entry.flags.remove(gix::index::entry::Flags::SKIP_WORKTREE);
    }
    Ok(index)
}

fn point_head_at(repo: &gix::Repository, branch: &str) -> Result<(), MirrorError> {
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

/// Points `link` at `target` atomically: a new link under a temporary name, renamed
/// over the old one.
fn swap_link(link: &Path, target: &Path) -> Result<(), MirrorError> {
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

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// Reads the counters gix keeps in `root` into the contract's progress shape, with the
/// percent of the phase the sync is in.
pub fn sample_progress(root: &Root, phase: Phase) -> Progress {
    let mut tasks = Vec::new();
    root.sorted_snapshot(&mut tasks);
    let mut progress = Progress::default();
    let mut fraction: Option<f64> = None;
    for (_, task) in &tasks {
        let Some(value) = &task.progress else {
            continue;
        };
        let step = value.step.load(std::sync::atomic::Ordering::Relaxed) as u64;
        match task.id {
            PACK_BYTES => progress.bytes = progress.bytes.max(step),
            INDEXED_OBJECTS => {
                progress.objects = progress.objects.max(step);
                if phase == Phase::Fetching {
                    fraction = value
                        .done_at
                        .filter(|total| *total > 0)
                        .map(|total| step as f64 / total as f64);
                }
            }
            CHECKOUT_FILES if phase == Phase::UpdatingFiles => {
                fraction = value
                    .done_at
                    .filter(|total| *total > 0)
                    .map(|total| step as f64 / total as f64);
            }
            _ => {}
        }
    }
    // the share of the whole sync each phase stands for, so one bar moves forward only
    let (start, span) = match phase {
        Phase::Fetching => (0.0, 70.0),
        Phase::UpdatingFiles => (70.0, 25.0),
        Phase::Cleaning => (95.0, 2.0),
        Phase::Finalizing => (97.0, 2.0),
    };
    let percent = start + span * fraction.unwrap_or(0.0).clamp(0.0, 1.0);
    progress.percent = percent.floor() as u8;
    progress
}
