//! Inspecting a mirror without changing it: does the repository open, do its refs
//! lead to commits and trees that are present, does the worktree link lead to a tree.

use super::Layout;
use crate::domain::ProjectId;

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
