//! The `git gc` path of housekeeping: finding a `git` new enough, and running it with
//! no configuration but ours and no hooks, killed when interrupted.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::{Policy, Report, Store};
use crate::mirror::MirrorError;

/// A `git` on `PATH` that writes cruft packs (2.37 or newer), looked for once.
pub(super) fn git_binary() -> Option<&'static Path> {
    static GIT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    GIT.get_or_init(|| {
        let path = std::env::var_os("PATH")?;
        let git = std::env::split_paths(&path)
            .map(|dir| dir.join("git"))
            .find(|candidate| candidate.is_file())?;
        let output = std::process::Command::new(&git)
            .arg("--version")
            .env_clear()
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "git version 2.39.5"
        let version = text.split_whitespace().nth(2)?;
        let mut parts = version
            .split('.')
            .map(|part| part.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next()?, parts.next().unwrap_or(0));
        ((major, minor) >= (2, 37)).then_some(git)
    })
    .as_deref()
}

/// `git gc` on the mirror: one pack with fresh deltas, unreachable objects (and
/// reflog entries) older than the grace period dropped, younger ones in a cruft pack,
/// a commit-graph. Its environment holds no configuration but what is passed here, and
/// no hook runs. Killed when `interrupt` is set; git leaves the store whole either way
/// (new packs are renamed into place before old ones are removed).
///
/// git dates an unreachable object by the pack that holds it (the mirror keeps no
/// reflog that would say when a ref left it), so after a rewrite (`rewritten`) the
/// packs that are not cruft packs are dated now first: what the rewrite left behind
/// starts its grace period at the rewrite, as on the gitoxide path, not at the fetch
/// or the last consolidation that wrote it (which may be older than the grace, and
/// would have it pruned at once). Objects already in a cruft pack keep their dates
/// (its `.mtimes`).
pub(super) fn run_git(
    git: &Path,
    git_dir: &Path,
    policy: &Policy,
    rewritten: bool,
    interrupt: &AtomicBool,
) -> Result<Report, MirrorError> {
    let before = Store::scan(git_dir)?;
    if rewritten {
        date_packs_now(&git_dir.join("objects").join("pack"))?;
    }
    let expire = if policy.grace.is_zero() {
        "now".to_owned()
    } else {
        format!("{}.seconds.ago", policy.grace.as_secs().max(1))
    };
    let errors = tempfile::tempfile()?;
    let mut child = std::process::Command::new(git)
        .arg("--git-dir")
        .arg(git_dir)
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "gc.cruftPacks=true",
            "-c",
            "gc.writeCommitGraph=true",
            "-c",
            "gc.packRefs=true",
            "-c",
            &format!("gc.reflogExpire={expire}"),
            "-c",
            &format!("gc.reflogExpireUnreachable={expire}"),
            "gc",
            "--quiet",
            &format!("--prune={expire}"),
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(errors.try_clone()?)
        .spawn()?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(MirrorError::Interrupted);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        use std::io::{Read, Seek};
        let mut errors = errors;
        let mut text = String::new();
        errors.seek(std::io::SeekFrom::Start(0))?;
        errors.take(4096).read_to_string(&mut text)?;
        return Err(MirrorError::Git(
            format!("git gc failed ({status}): {}", text.trim()).into(),
        ));
    }
    let after = Store::scan(git_dir)?;
    Ok(Report {
        tool: "git",
        packs_before: before.packs.len(),
        packs_after: after.packs.len(),
        bytes_before: before.bytes(),
        bytes_after: after.bytes(),
        ..Report::default()
    })
}

/// Sets the modification time of every pack in `pack_dir` but git's cruft packs (those
/// with a `.mtimes` file) to now.
fn date_packs_now(pack_dir: &Path) -> std::io::Result<()> {
    let now = std::time::SystemTime::now();
    for entry in std::fs::read_dir(pack_dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|ext| ext != "pack")
            || path.with_extension("mtimes").exists()
        {
            continue;
        }
        // the owner may set a file's times through a read-only descriptor (packs are
        // 0444); a pack a concurrent run removed is no longer there to date
        match std::fs::File::open(&path) {
            Ok(pack) => pack.set_modified(now)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
