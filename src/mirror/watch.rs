//! Knowing a snapshot is untouched without looking at every file in it, as git's
//! fsmonitor does: one inotify instance per process watches every directory of the
//! snapshots this process has verified. A snapshot counts as untouched only when its
//! watches were set *before* the stat pass that found it exact and no event has come
//! from any of them since, so a sync with nothing new upstream can skip the pass.
//!
//! Anything else falls back to the pass: no inotify (the instance limit was reached,
//! or another OS), a snapshot with more directories than the watch budget, a queue
//! overflow (every snapshot then counts as touched), a watch the kernel dropped.
//! What a watch cannot see, and the pass would: a change made through a hard link
//! outside the snapshot, a write through a shared `mmap`, a change made by another
//! host to a network filesystem. Snapshots are written once and never edited by
//! HiveSync itself, so these take a hand inside `DATA_DIR`.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};

/// The most directories watched by default: each costs about 0.7 KB of this process's
/// memory (measured: the watch table of 1,200 small mirrors, 5.4 directories each,
/// held 4.3 MB) besides the kernel's own per watch, so the default stops well short
/// of what the kernel allows; the least recently used trees are let go past it.
pub const DEFAULT_MAX_DIRECTORIES: usize = 16_384;

/// `usize::MAX`: the default, half the user's `max_user_watches` up to
/// [`DEFAULT_MAX_DIRECTORIES`]
static BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static WATCHER: OnceLock<Option<Watcher>> = OnceLock::new();

/// Sets the most directories this process watches (`HIVESYNC_SNAPSHOT_WATCHES`;
/// 0 turns watching off and every no-op sync makes the stat pass).
pub fn set_budget(directories: usize) {
    BUDGET.store(directories, Ordering::Relaxed);
}

/// The process's watcher; `None` when inotify is unavailable (said once in the log).
pub(crate) fn watcher() -> Option<&'static Watcher> {
    WATCHER
        .get_or_init(|| match Watcher::new() {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::info!(error = %err, "no inotify: every no-op sync checks its snapshot file by file");
                None
            }
        })
        .as_ref()
}

/// Directories this process watches now (0 without inotify).
pub fn watched_directories() -> usize {
    WATCHER
        .get()
        .and_then(Option::as_ref)
        .map_or(0, Watcher::watching)
}

fn budget() -> usize {
    match BUDGET.load(Ordering::Relaxed) {
        usize::MAX => std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .map_or(8192, |limit| limit / 2)
            .min(DEFAULT_MAX_DIRECTORIES),
        set => set,
    }
}

/// What changes a snapshot: entries made, removed, renamed, written or re-moded in a
/// watched directory, and the directory itself removed or moved.
fn mask() -> WatchFlags {
    WatchFlags::MODIFY
        | WatchFlags::ATTRIB
        | WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
        | WatchFlags::DONT_FOLLOW
        // one directory reached by two paths would share a watch; refuse it instead
        | WatchFlags::MASK_CREATE
}

/// What the watch says of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    /// verified exact under watch, and no change since: exact without a look
    Untouched,
    /// verified under watch, then these paths (relative, `/`-separated; a directory
    /// stands for everything under it) were written, made, removed, renamed or
    /// re-moded: they are not to be trusted even where size and time still match,
    /// and everything else is as verified
    Touched(BTreeSet<String>),
    /// not watched by this process, not verified yet, or changed in ways the watch
    /// cannot place (events lost): only a stat pass can tell
    Unknown,
}

/// More touched paths than this and the snapshot counts as changed anywhere.
const MAX_TOUCHED: usize = 1024;

/// What changed in a snapshot since its watches were set.
#[derive(Debug, Default, Clone)]
enum Changes {
    #[default]
    None,
    Paths(BTreeSet<String>),
    /// events were lost, or could not be placed
    Anywhere,
}

impl Changes {
    fn add(&mut self, path: Option<String>) {
        match (std::mem::take(self), path) {
            (Changes::Anywhere, _) | (_, None) => *self = Changes::Anywhere,
            (Changes::None, Some(path)) => *self = Changes::Paths(BTreeSet::from([path])),
            (Changes::Paths(mut paths), Some(path)) => {
                paths.insert(path);
                *self = if paths.len() > MAX_TOUCHED {
                    Changes::Anywhere
                } else {
                    Changes::Paths(paths)
                };
            }
        }
    }
}

/// Whether `path` (relative, `/`-separated) is one of `touched` or under one of them.
pub(crate) fn is_touched(touched: &BTreeSet<String>, path: &str) -> bool {
    touched.contains("")
        || path
            .match_indices('/')
            .map(|(at, _)| &path[..at])
            .chain(std::iter::once(path))
            .any(|prefix| touched.contains(prefix))
}

/// One arming of a snapshot's watches, as [`Watcher::arm`] returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Armed(u64);

pub(crate) struct Watcher {
    fd: OwnedFd,
    state: Mutex<State>,
    /// the process-wide budget when `None`
    budget: Option<usize>,
}

#[derive(Default)]
struct State {
    snapshots: HashMap<PathBuf, Watched>,
    /// watch descriptor → the snapshot it belongs to, and the directory it watches
    /// (relative to the snapshot, `/`-separated, empty for the snapshot itself)
    owners: HashMap<i32, (PathBuf, String)>,
    in_use: usize,
    /// a counter for least-recently-used eviction
    clock: u64,
}

struct Watched {
    wds: Vec<i32>,
    /// the index (its checksum) the stat pass compared the snapshot with: the watch
    /// vouches for the snapshot as that index records it, and no other
    index: Option<gix::ObjectId>,
    /// which arming these watches are: a pass that began under another one does not
    /// vouch for these
    armed: Armed,
    /// a stat pass found the snapshot exact after these watches were set
    verified: bool,
    /// what events said changed since they were set
    changes: Changes,
    used: u64,
}

impl Watcher {
    fn new() -> std::io::Result<Self> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        Ok(Self {
            fd,
            state: Mutex::new(State::default()),
            budget: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // the state stays consistent at every await-free step; a panic elsewhere
        // while holding it leaves nothing half-done that matters more than a re-check
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the watch knows of `snapshot`, as `index` (its checksum) records it: a
    /// snapshot verified against another index (one a failed sync left written) is
    /// not vouched for. Every event the kernel queued before this call is read first,
    /// so a change that finished before it is seen.
    pub(crate) fn seen(&self, snapshot: &Path, index: Option<gix::ObjectId>) -> Seen {
        let mut state = self.lock();
        self.drain(&mut state);
        state.clock += 1;
        let now = state.clock;
        match state.snapshots.get_mut(snapshot) {
            Some(watched) if watched.verified && index.is_some() && watched.index == index => {
                watched.used = now;
                match &watched.changes {
                    Changes::None => Seen::Untouched,
                    Changes::Paths(paths) => Seen::Touched(paths.clone()),
                    Changes::Anywhere => Seen::Unknown,
                }
            }
            _ => Seen::Unknown,
        }
    }

    #[cfg(test)]
    fn untouched(&self, snapshot: &Path) -> bool {
        self.seen(snapshot, tests::INDEX) == Seen::Untouched
    }

    /// Whether `snapshot` has watches set (verified or being verified).
    pub(crate) fn is_watched(&self, snapshot: &Path) -> bool {
        let mut state = self.lock();
        self.drain(&mut state);
        state.snapshots.contains_key(snapshot)
    }

    /// Sets a watch on each of `dirs` (every directory of `snapshot`, itself included)
    /// before the caller's stat pass against `index`, replacing any earlier watch of
    /// it but keeping what that one saw change (a stat pass cannot unsee an edit that
    /// kept a file's size and time). `None` when they could not all be set (over the
    /// budget, or the kernel's limit): nothing is left watched then.
    pub(crate) fn arm(
        &self,
        snapshot: &Path,
        dirs: &[PathBuf],
        index: Option<gix::ObjectId>,
    ) -> Option<Armed> {
        let mut state = self.lock();
        self.drain(&mut state);
        let carried = state
            .snapshots
            .get(snapshot)
            .map(|watched| watched.changes.clone())
            .unwrap_or_default();
        self.remove(&mut state, snapshot);
        let budget = self.budget.unwrap_or_else(budget);
        if dirs.is_empty() || dirs.len() > budget {
            return None;
        }
        while state.in_use + dirs.len() > budget {
            let Some(oldest) = state
                .snapshots
                .iter()
                .min_by_key(|(_, watched)| watched.used)
                .map(|(path, _)| path.clone())
            else {
                break;
            };
            self.remove(&mut state, &oldest);
        }
        let mut wds = Vec::with_capacity(dirs.len());
        for dir in dirs {
            match inotify::add_watch(&self.fd, dir.as_path(), mask()) {
                Ok(wd) => wds.push(wd),
                Err(err) => {
                    tracing::debug!(dir = %dir.display(), error = %err, "could not watch a snapshot directory; checking it file by file");
                    for wd in wds {
                        let _ = inotify::remove_watch(&self.fd, wd);
                    }
                    return None;
                }
            }
        }
        state.clock += 1;
        let used = state.clock;
        let armed = Armed(used);
        state.in_use += wds.len();
        for (wd, dir) in wds.iter().zip(dirs) {
            let relative = dir
                .strip_prefix(snapshot)
                .ok()
                .and_then(Path::to_str)
                .unwrap_or_default()
                .to_owned();
            state.owners.insert(*wd, (snapshot.to_path_buf(), relative));
        }
        state.snapshots.insert(
            snapshot.to_path_buf(),
            Watched {
                wds,
                index,
                armed,
                verified: false,
                changes: carried,
                used,
            },
        );
        Some(armed)
    }

    /// The stat pass begun after `armed` found `snapshot` exact: from now on it is
    /// untouched until an event says otherwise (one that came during the pass counts).
    /// Nothing happens when the snapshot was armed again since.
    pub(crate) fn verified(&self, snapshot: &Path, armed: Armed) {
        let mut state = self.lock();
        self.drain(&mut state);
        if let Some(watched) = state.snapshots.get_mut(snapshot)
            && watched.armed == armed
        {
            watched.verified = true;
        }
    }

    /// The stat pass begun after `armed` found `snapshot` changed: stop watching it
    /// (unless it was armed again since).
    pub(crate) fn failed(&self, snapshot: &Path, armed: Armed) {
        let mut state = self.lock();
        if state
            .snapshots
            .get(snapshot)
            .is_some_and(|watched| watched.armed == armed)
        {
            self.remove(&mut state, snapshot);
        }
    }

    /// Stops watching `snapshot` (replaced, or deleted).
    pub(crate) fn forget(&self, snapshot: &Path) {
        let mut state = self.lock();
        self.remove(&mut state, snapshot);
    }

    /// Directories watched now, over every snapshot.
    pub(crate) fn watching(&self) -> usize {
        let mut state = self.lock();
        self.drain(&mut state);
        state.in_use
    }

    fn remove(&self, state: &mut State, snapshot: &Path) {
        if let Some(watched) = state.snapshots.remove(snapshot) {
            state.in_use -= watched.wds.len();
            for wd in watched.wds {
                state.owners.remove(&wd);
                // fails for a directory already gone, whose watch the kernel dropped
                let _ = inotify::remove_watch(&self.fd, wd);
            }
        }
    }

    /// Reads every queued event and notes, for the snapshot it came from, the path it
    /// names.
    fn drain(&self, state: &mut State) {
        let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        let mut reader = inotify::Reader::new(&self.fd, &mut buffer);
        loop {
            let (wd, flags, name) = match reader.next() {
                Ok(event) => (
                    event.wd(),
                    event.events(),
                    event
                        .file_name()
                        .map(|name| name.to_str().map(str::to_owned).ok()),
                ),
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR) => continue,
                Err(err) => {
                    // unreadable: nothing can be vouched for any more
                    tracing::warn!(error = %err, "reading inotify events failed; every snapshot is checked file by file");
                    changed_anywhere(state);
                    return;
                }
            };
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                // events were lost: any snapshot may have changed anywhere
                changed_anywhere(state);
                continue;
            }
            let Some((snapshot, dir)) = state.owners.get(&wd).cloned() else {
                // a watch this process already removed
                continue;
            };
            let Some(watched) = state.snapshots.get_mut(&snapshot) else {
                continue;
            };
            // an entry of the directory, or the directory itself (removed, moved,
            // re-moded); a name that is not UTF-8 cannot be placed
            let path = match name {
                Some(Some(name)) if dir.is_empty() => Some(name),
                Some(Some(name)) => Some(format!("{dir}/{name}")),
                Some(None) => None,
                None => Some(dir),
            };
            if flags.contains(ReadFlags::IGNORED) {
                // the kernel dropped the watch (its directory is gone: noted by the
                // event before this one)
                watched.wds.retain(|kept| *kept != wd);
                let none_left = watched.wds.is_empty();
                state.in_use -= 1;
                state.owners.remove(&wd);
                if none_left {
                    state.snapshots.remove(&snapshot);
                }
                continue;
            }
            watched.changes.add(path);
        }
    }
}

fn changed_anywhere(state: &mut State) {
    for watched in state.snapshots.values_mut() {
        watched.changes = Changes::Anywhere;
    }
}

/// Every directory of a snapshot written from `index`: the snapshot itself and each
/// parent of an entry, parents first.
pub(crate) fn directories(index: &gix::index::File, snapshot: &Path) -> Vec<PathBuf> {
    use gix::bstr::ByteSlice;
    let mut seen: std::collections::BTreeSet<&[u8]> = std::collections::BTreeSet::new();
    for entry in index.entries() {
        let path: &[u8] = entry.path(index).as_bytes();
        let mut end = 0;
        while let Some(slash) = path[end..].find_byte(b'/') {
            end += slash;
            seen.insert(&path[..end]);
            end += 1;
        }
    }
    let mut dirs = Vec::with_capacity(seen.len() + 1);
    dirs.push(snapshot.to_path_buf());
    dirs.extend(
        seen.into_iter()
            .filter_map(|dir| dir.to_str().ok())
            .map(|dir| snapshot.join(dir)),
    );
    dirs
}

#[cfg(test)]
mod tests;
