use super::*;

/// The index the tests' snapshots are verified against.
pub(super) const INDEX: Option<gix::ObjectId> = Some(gix::ObjectId::null(gix::hash::Kind::Sha1));

fn tree() -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = dir.path().join("snap");
    std::fs::create_dir_all(snapshot.join("src/deep")).expect("dirs");
    std::fs::write(snapshot.join("README"), "hello\n").expect("write");
    std::fs::write(snapshot.join("src/deep/lib.rs"), "fn x() {}\n").expect("write");
    let dirs = vec![
        snapshot.clone(),
        snapshot.join("src"),
        snapshot.join("src/deep"),
    ];
    (dir, snapshot, dirs)
}

fn watched(snapshot: &Path, dirs: &[PathBuf]) -> Watcher {
    let watcher = Watcher::new().expect("inotify");
    let armed = watcher.arm(snapshot, dirs, INDEX).expect("armed");
    assert!(
        !watcher.untouched(snapshot),
        "armed but not verified is not untouched"
    );
    watcher.verified(snapshot, armed);
    assert!(watcher.untouched(snapshot));
    watcher
}

#[test]
fn reading_leaves_a_snapshot_untouched() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = watched(&snapshot, &dirs);
    std::fs::read_to_string(snapshot.join("src/deep/lib.rs")).expect("read");
    let _ = std::fs::read_dir(snapshot.join("src"))
        .expect("list")
        .count();
    assert!(watcher.untouched(&snapshot));
}

#[test]
fn every_kind_of_change_is_seen() {
    type Change = fn(&Path);
    let changes: [(&str, Change); 9] = [
        ("plant a file", |s| {
            std::fs::write(s.join("src/deep/planted"), "x").expect("plant")
        }),
        ("plant a directory", |s| {
            std::fs::create_dir(s.join("src/empty")).expect("mkdir")
        }),
        ("edit in place", |s| {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(s.join("src/deep/lib.rs"))
                .expect("open");
            file.write_all(b"X").expect("write");
        }),
        ("truncate", |s| {
            std::fs::File::create(s.join("README")).expect("truncate");
        }),
        ("delete", |s| {
            std::fs::remove_file(s.join("README")).expect("delete")
        }),
        ("rename", |s| {
            std::fs::rename(s.join("README"), s.join("src/README")).expect("rename")
        }),
        ("touch", |s| {
            let file = std::fs::File::options()
                .write(true)
                .open(s.join("README"))
                .expect("open");
            file.set_modified(std::time::SystemTime::UNIX_EPOCH)
                .expect("utimes");
        }),
        ("chmod", |s| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(s.join("README"), std::fs::Permissions::from_mode(0o755))
                .expect("chmod")
        }),
        ("remove a directory", |s| {
            std::fs::remove_dir_all(s.join("src/deep")).expect("rm -r")
        }),
    ];
    for (what, change) in changes {
        let (_dir, snapshot, dirs) = tree();
        let watcher = watched(&snapshot, &dirs);
        change(&snapshot);
        assert!(!watcher.untouched(&snapshot), "{what} went unseen");
    }
}

#[test]
fn a_touched_snapshot_names_what_was_touched() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = watched(&snapshot, &dirs);
    std::fs::write(snapshot.join("src/deep/lib.rs"), "edited").expect("edit");
    std::fs::write(snapshot.join("planted"), "x").expect("plant");
    let Seen::Touched(paths) = watcher.seen(&snapshot, INDEX) else {
        panic!("touched");
    };
    assert_eq!(
        paths,
        BTreeSet::from(["planted".to_owned(), "src/deep/lib.rs".to_owned()])
    );
    assert!(is_touched(&paths, "src/deep/lib.rs"));
    assert!(!is_touched(&paths, "src/deep/lib.rs.orig"));
    assert!(!is_touched(&paths, "README"));
    std::fs::remove_dir_all(snapshot.join("src/deep")).expect("rm -r");
    let Seen::Touched(paths) = watcher.seen(&snapshot, INDEX) else {
        panic!("touched");
    };
    assert!(
        is_touched(&paths, "src/deep/anything"),
        "a removed directory stands for all under it: {paths:?}"
    );
    assert!(!is_touched(&paths, "README"));
}

#[test]
fn an_edit_that_keeps_size_and_time_is_seen() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = watched(&snapshot, &dirs);
    let file = snapshot.join("README");
    let modified = std::fs::metadata(&file)
        .and_then(|meta| meta.modified())
        .expect("mtime");
    std::fs::write(&file, "HELLO\n").expect("same size");
    std::fs::File::options()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_modified(modified))
        .expect("time put back");
    assert_eq!(
        watcher.seen(&snapshot, INDEX),
        Seen::Touched(BTreeSet::from(["README".to_owned()]))
    );
}

/// An incremental sync links the old snapshot's files into the new one, then the
/// old one is deleted: neither changes the link count of a watched snapshot's
/// files in a way its directory watches report.
#[test]
fn links_made_and_removed_elsewhere_leave_a_snapshot_untouched() {
    let (dir, snapshot, dirs) = tree();
    let watcher = watched(&snapshot, &dirs);
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("dir");
    std::fs::hard_link(snapshot.join("README"), elsewhere.join("README")).expect("link");
    assert!(watcher.untouched(&snapshot), "linking out of it");
    std::fs::remove_file(elsewhere.join("README")).expect("unlink");
    assert!(watcher.untouched(&snapshot), "removing the other link");
    let (_dir2, second, second_dirs) = tree();
    std::fs::remove_file(second.join("README")).expect("unlink");
    std::fs::hard_link(snapshot.join("README"), second.join("README")).expect("link");
    let watcher = watched(&second, &second_dirs);
    std::fs::remove_dir_all(&snapshot).expect("the old snapshot deleted");
    assert!(
        watcher.untouched(&second),
        "the old snapshot's links removed"
    );
}

#[test]
fn a_change_between_arming_and_verifying_still_counts() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = Watcher::new().expect("inotify");
    let armed = watcher.arm(&snapshot, &dirs, INDEX).expect("armed");
    std::fs::write(snapshot.join("planted"), "x").expect("plant");
    watcher.verified(&snapshot, armed);
    assert!(!watcher.untouched(&snapshot));
}

/// A snapshot is vouched for only as the index it was verified against records it:
/// a sync that failed after writing a new index leaves the old tree current, and
/// the watch must not vouch for it against the new index.
#[test]
fn the_watch_vouches_only_against_the_index_it_verified_with() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = watched(&snapshot, &dirs);
    assert_eq!(watcher.seen(&snapshot, INDEX), Seen::Untouched);
    let other = Some(gix::ObjectId::empty_tree(gix::hash::Kind::Sha1));
    assert_eq!(watcher.seen(&snapshot, other), Seen::Unknown);
    assert_eq!(watcher.seen(&snapshot, None), Seen::Unknown);
}

/// Arming again (a background pass queued behind a sync's own) keeps what the
/// earlier arming saw change: its stat pass could not see an edit that kept size
/// and time.
#[test]
fn arming_again_keeps_what_was_seen_changed() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = watched(&snapshot, &dirs);
    std::fs::write(snapshot.join("README"), "HELLO\n").expect("same size");
    assert!(matches!(watcher.seen(&snapshot, INDEX), Seen::Touched(_)));
    let armed = watcher.arm(&snapshot, &dirs, INDEX).expect("armed again");
    watcher.verified(&snapshot, armed);
    assert_eq!(
        watcher.seen(&snapshot, INDEX),
        Seen::Touched(BTreeSet::from(["README".to_owned()]))
    );
}

/// A pass begun under one arming (a background verification) that ends after the
/// snapshot was armed again (by a sync's own pass) vouches for nothing.
#[test]
fn a_pass_from_an_earlier_arming_does_not_vouch_for_a_later_one() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = Watcher::new().expect("inotify");
    let first = watcher.arm(&snapshot, &dirs, INDEX).expect("armed");
    let second = watcher.arm(&snapshot, &dirs, INDEX).expect("armed again");
    watcher.verified(&snapshot, first);
    assert!(!watcher.untouched(&snapshot));
    watcher.failed(&snapshot, first);
    assert_eq!(watcher.watching(), 3, "the later arming stays");
    watcher.verified(&snapshot, second);
    assert!(watcher.untouched(&snapshot));
}

#[test]
fn over_budget_nothing_is_watched_and_the_oldest_snapshot_makes_room() {
    let (_dir, first, first_dirs) = tree();
    let (_dir2, second, second_dirs) = tree();
    let watcher = Watcher {
        budget: Some(4),
        ..Watcher::new().expect("inotify")
    };
    let armed = watcher.arm(&first, &first_dirs, INDEX).expect("armed");
    watcher.verified(&first, armed);
    assert_eq!(watcher.watching(), 3);
    // three more do not fit beside the first three: the first is evicted
    let armed = watcher.arm(&second, &second_dirs, INDEX).expect("armed");
    watcher.verified(&second, armed);
    assert!(!watcher.untouched(&first), "evicted");
    assert!(watcher.untouched(&second));
    assert_eq!(watcher.watching(), 3);
    let mut six = second_dirs.clone();
    six.extend(first_dirs.iter().cloned());
    assert!(
        watcher.arm(&first, &six, INDEX).is_none(),
        "more directories than the budget"
    );
    assert!(!watcher.untouched(&first));
}

#[test]
fn a_forgotten_or_deleted_snapshot_gives_its_watches_back() {
    let (_dir, snapshot, dirs) = tree();
    let watcher = watched(&snapshot, &dirs);
    assert_eq!(watcher.watching(), 3);
    watcher.forget(&snapshot);
    assert_eq!(watcher.watching(), 0);
    let watcher = watched(&snapshot, &dirs);
    std::fs::remove_dir_all(&snapshot).expect("delete");
    assert_eq!(watcher.watching(), 0, "the kernel dropped every watch");
    assert!(!watcher.untouched(&snapshot));
}
