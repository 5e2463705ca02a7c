//! Diffs within a budget: which blobs changed between two trees, and each one's
//! unified patch, cut off by size and time before it is computed where the object
//! headers already tell (see [`DiffLimits`]).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::read::{ReadError, git_error};

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
pub(super) struct FileChange {
    pub status: &'static str,
    pub path: String,
    pub old_path: Option<String>,
    old_id: Option<gix::ObjectId>,
    new_id: Option<gix::ObjectId>,
}

impl FileChange {
    pub(super) fn of(change: gix::object::tree::diff::ChangeDetached) -> Option<Self> {
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
    pub(super) fn patch(
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
