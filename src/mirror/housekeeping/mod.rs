//! Keeping a mirror's object store compact, as git's `gc` and Gitaly's housekeeping
//! do.
//!
//! Every fetch leaves one pack. When a mirror has [`Policy::max_packs`] packs, or
//! loose objects, or unreachable objects whose grace period is over, [`run`]
//! consolidates it, with one of two tools ([`Tool`]):
//!
//! - **`git gc`**, when a `git` new enough is on `PATH`: one pack with deltas searched
//!   afresh across everything, a commit-graph, and objects no ref reaches kept in a
//!   cruft pack until [`Policy::grace`] has passed. Delta search and commit-graph
//!   writing are what gitoxide cannot do yet, and what keeps a long-lived mirror as
//!   small as git's own clone after its `gc`.
//! - **gitoxide alone** otherwise (a worker image without `git`): every object the
//!   refs reach is copied entry by entry into one new pack (deltas within a pack kept,
//!   none searched for across packs, so the pack is about the size of the packs it
//!   replaced, less duplicates), then the packs it replaced are removed. Objects no ref
//!   reaches go into a *cruft* pack marked with the time they were found unreachable
//!   (a `pack-<hash>.hivesync-cruft` file beside it), removed once the grace period
//!   has passed, as with git's `gc.pruneExpire`.
//!
//! Readers are never shown a missing object, with either tool: the new pack is
//! complete and in place (written under a temporary name, renamed, its index last)
//! before any old pack is removed; a reader that had the old pack mapped keeps reading
//! it, and one that looks up an object after the removal finds it in the new pack
//! (gitoxide reloads its pack list on a miss). The caller holds the project lock, so
//! no sync writes meanwhile.

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gix::ObjectId;
use gix::odb::pack;

use super::{Layout, MirrorError};
use crate::domain::ProjectId;
use git::{git_binary, run_git};

mod git;

/// Git's own default for `gc.pruneExpire`: two weeks.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(14 * 24 * 3600);
/// Packs a mirror may have before it is consolidated (`HIVESYNC_HOUSEKEEPING_PACKS`).
pub const DEFAULT_MAX_PACKS: usize = 8;
/// Files a crashed housekeeping or fetch left (temporary packs, packs without an
/// index) are removed once they are this old: younger ones may be another process's
/// work in progress.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);
const CRUFT_SUFFIX: &str = "hivesync-cruft";

/// What consolidates a mirror's object store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `git gc` when a `git` of version 2.37 or newer is on `PATH` (it finds new deltas
    /// across the packs it joins and writes a commit-graph, which gitoxide cannot yet),
    /// else gitoxide
    Auto,
    /// gitoxide alone, whatever is installed
    Gitoxide,
}

impl Tool {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "auto" | "git" => Some(Tool::Auto),
            "gitoxide" | "gix" => Some(Tool::Gitoxide),
            _ => None,
        }
    }
}

/// When housekeeping runs, and how long unreachable objects are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// consolidate once a mirror has this many packs (cruft packs not counted);
    /// 0 = never run
    pub max_packs: usize,
    /// how long an object no ref reaches is kept before it is deleted
    pub grace: Duration,
    pub tool: Tool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_packs: DEFAULT_MAX_PACKS,
            grace: DEFAULT_GRACE,
            tool: Tool::Auto,
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// `git` or `gitoxide`
    pub tool: &'static str,
    pub packs_before: usize,
    pub packs_after: usize,
    /// bytes of packs and loose objects
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// objects reachable from the mirror's refs, all in the one new pack (counted by
    /// the gitoxide path only)
    pub reachable: u64,
    /// unreachable objects kept for their grace period (gitoxide path only)
    pub kept_unreachable: u64,
    /// unreachable objects deleted, their grace period over (gitoxide path only)
    pub pruned: u64,
}

/// One pack on disk.
#[derive(Debug)]
struct PackFiles {
    /// `objects/pack/pack-<hash>` without an extension
    stem: PathBuf,
    /// for a cruft pack: when its objects were found unreachable
    cruft_since: Option<SystemTime>,
    bytes: u64,
}

impl PackFiles {
    fn path(&self, extension: &str) -> PathBuf {
        self.stem.with_extension(extension)
    }

    fn expired(&self, now: SystemTime, grace: Duration) -> bool {
        self.cruft_since
            .is_some_and(|since| now.duration_since(since).unwrap_or_default() >= grace)
    }
}

/// The object store as it is on disk.
#[derive(Debug, Default)]
struct Store {
    packs: Vec<PackFiles>,
    loose: Vec<(PathBuf, ObjectId, SystemTime, u64)>,
}

impl Store {
    fn scan(git_dir: &Path) -> std::io::Result<Self> {
        let objects = git_dir.join("objects");
        let mut store = Store::default();
        match std::fs::read_dir(objects.join("pack")) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().and_then(|e| e.to_str()) != Some("idx") {
                        continue;
                    }
                    let stem = path.with_extension("");
                    let Ok(pack) = std::fs::metadata(stem.with_extension("pack")) else {
                        continue;
                    };
                    let index = entry.metadata().map(|m| m.len()).unwrap_or_default();
                    // ours says when its objects were found unreachable; git's cruft
                    // pack (with a `.mtimes` file) was written when they were
                    let cruft_since = std::fs::read_to_string(stem.with_extension(CRUFT_SUFFIX))
                        .ok()
                        .and_then(|text| text.trim().parse::<u64>().ok())
                        .map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds))
                        .or_else(|| {
                            std::fs::metadata(stem.with_extension("mtimes"))
                                .and_then(|meta| meta.modified())
                                .ok()
                        });
                    store.packs.push(PackFiles {
                        stem,
                        cruft_since,
                        bytes: pack.len() + index,
                    });
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        store.packs.sort_by(|a, b| a.stem.cmp(&b.stem));
        for fan in std::fs::read_dir(&objects)?.flatten() {
            let name = fan.file_name();
            let Some(prefix) = name.to_str().filter(|n| n.len() == 2) else {
                continue;
            };
            if !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            for entry in std::fs::read_dir(fan.path())?.flatten() {
                let rest = entry.file_name();
                let Some(id) = rest
                    .to_str()
                    .and_then(|rest| ObjectId::from_hex(format!("{prefix}{rest}").as_bytes()).ok())
                else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let modified = meta.modified().unwrap_or_else(|_| SystemTime::now());
                store.loose.push((entry.path(), id, modified, meta.len()));
            }
        }
        Ok(store)
    }

    fn live_packs(&self) -> usize {
        self.packs
            .iter()
            .filter(|p| p.cruft_since.is_none())
            .count()
    }

    fn bytes(&self) -> u64 {
        self.packs.iter().map(|p| p.bytes).sum::<u64>()
            + self.loose.iter().map(|(.., bytes)| bytes).sum::<u64>()
    }
}

/// Packs (cruft packs included) and the bytes of packs and loose objects: what the
/// soak and the metrics report.
pub fn footprint(layout: &Layout, project: &ProjectId) -> (usize, u64) {
    Store::scan(&layout.git_dir(project))
        .map(|store| (store.packs.len(), store.bytes()))
        .unwrap_or_default()
}

/// Whether the mirror needs housekeeping now: too many packs, loose objects, or
/// unreachable objects past their grace period. Cheap: a listing of two directories.
pub fn due(layout: &Layout, project: &ProjectId, policy: &Policy) -> bool {
    if policy.max_packs == 0 {
        return false;
    }
    let Ok(store) = Store::scan(&layout.git_dir(project)) else {
        return false;
    };
    let now = SystemTime::now();
    store.live_packs() >= policy.max_packs
        || !store.loose.is_empty()
        || store.packs.iter().any(|p| p.expired(now, policy.grace))
}

fn git_error(err: impl std::error::Error + Send + Sync + 'static) -> MirrorError {
    MirrorError::Git(Box::new(err))
}

/// Consolidates the mirror's object store (see the module's documentation). The caller
/// holds the project lock. Stops with [`MirrorError::Interrupted`] when `interrupt` is
/// set, leaving the store as it was (a half-written pack is a temporary file).
/// `rewritten`: the sync before it found its branch rewritten, so the objects it left
/// unreachable start their grace period now.
pub fn run(
    layout: &Layout,
    project: &ProjectId,
    policy: &Policy,
    rewritten: bool,
    interrupt: &AtomicBool,
) -> Result<Report, MirrorError> {
    let git_dir = layout.git_dir(project);
    let pack_dir = git_dir.join("objects").join("pack");
    std::fs::create_dir_all(&pack_dir)?;
    remove_leftovers(&pack_dir)?;
    if policy.tool == Tool::Auto
        && let Some(git) = git_binary()
    {
        return run_git(git, &git_dir, policy, rewritten, interrupt);
    }
    let now = SystemTime::now();
    let before = Store::scan(&git_dir)?;
    let mut report = Report {
        tool: "gitoxide",
        packs_before: before.packs.len(),
        bytes_before: before.bytes(),
        ..Report::default()
    };

    let repo = gix::open_opts(&git_dir, gix::open::Options::isolated())
        .map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
    let reachable = reachable_objects(&repo, interrupt)?;
    let reachable_ids: HashSet<ObjectId> = reachable.iter().map(|count| count.id).collect();
    report.reachable = reachable.len() as u64;

    // objects no ref reaches: kept in a new cruft pack unless their grace is over
    let expired: Vec<&PackFiles> = before
        .packs
        .iter()
        .filter(|p| p.expired(now, policy.grace))
        .collect();
    let kept_cruft: Vec<&PackFiles> = before
        .packs
        .iter()
        .filter(|p| p.cruft_since.is_some() && !p.expired(now, policy.grace))
        .collect();
    let mut in_kept_cruft = HashSet::new();
    for cruft in &kept_cruft {
        for id in pack_ids(&cruft.path("idx"))? {
            in_kept_cruft.insert(id);
        }
    }
    let mut newly_unreachable = Vec::new();
    let mut seen = HashSet::new();
    for live in before.packs.iter().filter(|p| p.cruft_since.is_none()) {
        for id in pack_ids(&live.path("idx"))? {
            if !reachable_ids.contains(&id) && !in_kept_cruft.contains(&id) && seen.insert(id) {
                newly_unreachable.push(id);
            }
        }
    }
    // loose objects all go: reachable ones into the new pack, young unreachable ones
    // into the cruft pack, old unreachable ones for good
    for (_, id, modified, _) in &before.loose {
        if reachable_ids.contains(id) || in_kept_cruft.contains(id) || !seen.insert(*id) {
            continue;
        }
        if now.duration_since(*modified).unwrap_or_default() < policy.grace {
            newly_unreachable.push(*id);
        } else {
            report.pruned += 1;
        }
    }
    for expired in &expired {
        for id in pack_ids(&expired.path("idx"))? {
            if !reachable_ids.contains(&id) && !in_kept_cruft.contains(&id) && seen.insert(id) {
                report.pruned += 1;
            }
        }
    }
    // a grace of zero prunes at once: no cruft pack
    let cruft_ids = if policy.grace.is_zero() {
        report.pruned += newly_unreachable.len() as u64;
        Vec::new()
    } else {
        newly_unreachable
    };

    let handle = {
        let mut handle = repo.objects.clone().into_inner();
        handle.prevent_pack_unload();
        handle.ignore_replacements = true;
        handle
    };
    let main = write_pack(&handle, reachable, &pack_dir, interrupt)?;
    let mut written: Vec<PathBuf> = main.iter().cloned().collect();
    if !cruft_ids.is_empty() {
        let counts = cruft_ids
            .iter()
            .map(|id| pack::data::output::Count {
                id: *id,
                entry_pack_location: pack::data::output::count::PackLocation::NotLookedUp,
            })
            .collect();
        if let Some(stem) = write_pack(&handle, counts, &pack_dir, interrupt)? {
            let since = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            write_marker(&stem.with_extension(CRUFT_SUFFIX), &since.to_string())?;
            written.push(stem);
        }
        report.kept_unreachable = cruft_ids.len() as u64;
    }
    report.kept_unreachable += in_kept_cruft.len() as u64;
    drop(handle);
    drop(repo);

    // the new packs are whole and in place: the ones they replace can go
    for old in before
        .packs
        .iter()
        .filter(|p| p.cruft_since.is_none() || p.expired(now, policy.grace))
    {
        if written.contains(&old.stem) {
            continue;
        }
        remove_pack(&old.stem)?;
    }
    for (path, ..) in &before.loose {
        remove_file_if_exists(path)?;
    }
    remove_empty_fan_out_dirs(&git_dir.join("objects"));
    // a multi-pack index would name packs that are gone
    remove_file_if_exists(&pack_dir.join("multi-pack-index"))?;

    let after = Store::scan(&git_dir)?;
    report.packs_after = after.packs.len();
    report.bytes_after = after.bytes();
    Ok(report)
}

/// Every object the mirror's refs reach, counted for a pack: the commits of every
/// ref's history, their trees and blobs, and annotated tags.
fn reachable_objects(
    repo: &gix::Repository,
    interrupt: &AtomicBool,
) -> Result<Vec<pack::data::output::Count>, MirrorError> {
    let mut tips = Vec::new();
    let mut direct = Vec::new();
    let references = repo.references().map_err(git_error)?;
    for reference in references.all().map_err(git_error)? {
        let Ok(mut reference) = reference else {
            continue;
        };
        if let Some(id) = reference.target().try_id() {
            direct.push(id.to_owned());
        }
        if let Ok(id) = reference.peel_to_id() {
            tips.push(id.detach());
        }
    }
    let mut inputs: Vec<ObjectId> = direct;
    let commits = tips
        .iter()
        .copied()
        .filter(|id| {
            repo.find_header(*id)
                .is_ok_and(|header| header.kind() == gix::object::Kind::Commit)
        })
        .collect::<Vec<_>>();
    inputs.extend(tips.iter().copied().filter(|id| !commits.contains(id)));
    if !commits.is_empty() {
        let walk = repo.rev_walk(commits).all().map_err(git_error)?;
        for info in walk {
            let info = info.map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
            inputs.push(info.id);
        }
    }
    let mut handle = repo.objects.clone().into_inner();
    handle.ignore_replacements = true;
    let mut ids = inputs.into_iter().map(Ok::<_, gix::Error>);
    let (counts, _) = pack::data::output::count::objects_unthreaded(
        &handle,
        &mut ids,
        &gix::progress::Discard,
        interrupt,
        pack::data::output::count::objects::ObjectExpansion::TreeContents,
    )
    .map_err(|err| classify(err, interrupt))?;
    Ok(counts)
}

fn classify(err: gix::Error, interrupt: &AtomicBool) -> MirrorError {
    if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
        MirrorError::Interrupted
    } else {
        MirrorError::Corrupt(err.into())
    }
}

/// Writes `counts` as one pack with its index into `pack_dir`; the path of the new
/// pack without its extension, or `None` when there was nothing to write.
fn write_pack(
    handle: &gix::odb::Handle,
    counts: Vec<pack::data::output::Count>,
    pack_dir: &Path,
    interrupt: &AtomicBool,
) -> Result<Option<PathBuf>, MirrorError> {
    if counts.is_empty() {
        return Ok(None);
    }
    let objects = u32::try_from(counts.len())
        .map_err(|_| MirrorError::Git("more objects than a pack can hold".into()))?;
    let entries = pack::data::output::entry::iter_from_counts(
        counts,
        handle.clone(),
        Box::new(gix::progress::Discard),
        pack::data::output::entry::iter_from_counts::Options {
            thread_limit: Some(1),
            ..Default::default()
        },
    )
    .map_err(|err| classify(err, interrupt))?;
    let mut in_order = gix::parallel::InOrderIter::from(entries);
    let mut staged = tempfile::Builder::new()
        .prefix("tmp_hivesync_pack_")
        .tempfile_in(pack_dir)?;
    {
        let mut output = std::io::BufWriter::new(staged.as_file_mut());
        let mut bytes = pack::data::output::bytes::FromEntriesIter::new(
            in_order.by_ref(),
            &mut output,
            objects,
            pack::data::Version::default(),
            gix::hash::Kind::Sha1,
        );
        for written in bytes.by_ref() {
            written.map_err(|err| classify(err, interrupt))?;
            if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(MirrorError::Interrupted);
            }
        }
        output.flush()?;
    }
    staged.as_file().sync_all()?;
    // indexed and moved into place as a fetched pack is: pack first, index last
    let mut reader = BufReader::new(std::fs::File::open(staged.path())?);
    let outcome = pack::Bundle::write_to_directory(
        &mut reader,
        Some(pack_dir),
        &mut gix::progress::Discard,
        interrupt,
        None::<gix::objs::find::Never>,
        gix::hash::Kind::Sha1,
        pack::bundle::write::Options::default(),
    )
    .map_err(|err| classify(err, interrupt))?;
    if let Some(keep) = &outcome.keep_path {
        remove_file_if_exists(keep)?;
    }
    Ok(outcome.index_path.map(|index| index.with_extension("")))
}

/// The object ids a pack index lists.
fn pack_ids(index: &Path) -> Result<Vec<ObjectId>, MirrorError> {
    let file = pack::index::File::at(index, gix::hash::Kind::Sha1)
        .map_err(|err| MirrorError::Corrupt(err.into()))?;
    Ok(file.iter().map(|entry| entry.oid).collect())
}

/// Removes a pack: its index first, so no reader finds an index without its pack.
fn remove_pack(stem: &Path) -> std::io::Result<()> {
    for extension in [
        "idx",
        "pack",
        "rev",
        "bitmap",
        "keep",
        "mtimes",
        CRUFT_SUFFIX,
    ] {
        remove_file_if_exists(&stem.with_extension(extension))?;
    }
    Ok(())
}

fn remove_file_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn write_marker(path: &Path, text: &str) -> std::io::Result<()> {
    let staged = path.with_extension(format!("{CRUFT_SUFFIX}.tmp"));
    std::fs::write(&staged, text)?;
    std::fs::rename(&staged, path)
}

fn remove_empty_fan_out_dirs(objects: &Path) {
    if let Ok(entries) = std::fs::read_dir(objects) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.len() == 2 {
                // fails, as it should, on a directory that still holds objects
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// Temporary packs and packs without an index that a killed run or fetch left, once
/// they are old enough not to be another process's work in progress.
fn remove_leftovers(pack_dir: &Path) -> std::io::Result<()> {
    let now = SystemTime::now();
    for entry in std::fs::read_dir(pack_dir)?.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| now.duration_since(modified).unwrap_or_default() > LEFTOVER_AGE);
        if !old {
            continue;
        }
        let temporary = name.starts_with("tmp_") || name.starts_with(".tmp");
        let orphan_pack = name.ends_with(".pack") && !path.with_extension("idx").exists();
        if temporary || orphan_pack {
            remove_file_if_exists(&path)?;
        }
    }
    Ok(())
}
