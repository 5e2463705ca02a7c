//! What a sync brought, read from the object database: commits between the previous
//! head and the new one, whether history was rewritten, how many files differ.

use crate::protocol::Changes;

/// Commits counted at most; past it `commits_capped` is set.
const COMMIT_CAP: usize = 10_000;

/// The changes from `previous` (the mirror's head before the sync; `None` on a first
/// sync or after a re-clone) to `commit`. `files_in_tree` counts the files of a first
/// sync, which changes them all. Anything unreadable counts as unknown, never as a
/// failed sync.
pub(super) fn changes(
    repo: &gix::Repository,
    previous: Option<&str>,
    commit: gix::ObjectId,
    files_in_tree: impl FnOnce() -> u64,
) -> Changes {
    let Some(previous) = previous.and_then(|hex| gix::ObjectId::from_hex(hex.as_bytes()).ok())
    else {
        return Changes {
            commits: None,
            forced: false,
            files_changed: files_in_tree(),
            commits_capped: false,
        };
    };
    if previous == commit {
        return Changes {
            commits: Some(0),
            ..Changes::default()
        };
    }
    // commits reachable from the new head and not from the old one
    let (commits, capped) = match repo.rev_walk([commit]).with_hidden([previous]).all() {
        Ok(walk) => {
            let counted = walk.take(COMMIT_CAP + 1).filter(Result::is_ok).count();
            (Some(counted.min(COMMIT_CAP) as u64), counted > COMMIT_CAP)
        }
        Err(_) => (None, false),
    };
    // the old head is not an ancestor of the new one: history was rewritten
    let forced = repo
        .rev_walk([previous])
        .with_hidden([commit])
        .all()
        .map(|mut walk| walk.next().is_some())
        .unwrap_or(false);
    let files_changed = files_between(repo, previous, commit).unwrap_or(0);
    Changes {
        commits,
        forced,
        files_changed,
        commits_capped: capped,
    }
}

fn files_between(
    repo: &gix::Repository,
    previous: gix::ObjectId,
    commit: gix::ObjectId,
) -> Option<u64> {
    let old = repo.find_commit(previous).ok()?.tree().ok()?;
    let new = repo.find_commit(commit).ok()?.tree().ok()?;
    let options = gix::diff::Options::default().with_rewrites(None);
    let changes = repo.diff_tree_to_tree(&old, &new, options).ok()?;
    use gix::object::tree::diff::ChangeDetached as Change;
    Some(
        changes
            .iter()
            .filter(|change| {
                let mode = match change {
                    Change::Addition { entry_mode, .. }
                    | Change::Deletion { entry_mode, .. }
                    | Change::Modification { entry_mode, .. }
                    | Change::Rewrite { entry_mode, .. } => entry_mode,
                };
                !mode.is_tree()
            })
            .count() as u64,
    )
}
