//! The engine conformance checks of freshness: how a sync's end moves a project's
//! status and schedule (once, however often the end is written), the pause and resume,
//! and due projects handed to exactly one of many concurrent schedulers. Run by
//! `conformance::all_checks` against both engines.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hivesync::domain::{ProjectId, now_epoch_ms, now_rfc3339};
use hivesync::engine::{Engine, Project, ProjectChange, Put, Store};
use hivesync::protocol::{SyncError, SyncErrorCode, SyncStatus};

use crate::conformance::{begin, pid, project};

const HOLD: Duration = Duration::from_secs(60);

/// A project with a schedule, registered (so due at once).
async fn scheduled(store: &dyn Store, interval: u64) -> Project {
    let mut p = project("alice");
    p.sync_interval_s = Some(interval);
    store.insert_project(&p).await.expect("insert");
    p
}

/// Runs one sync of `project` to `status`; returns what the end's write did.
async fn one_sync(store: &dyn Store, project: &Project, status: SyncStatus) -> Put {
    let (sync, _) = begin(store, project).await;
    let mut ended = sync.clone();
    ended.status = status;
    ended.finished_at = Some(now_rfc3339());
    if status == SyncStatus::Failed {
        ended.error = Some(SyncError {
            code: SyncErrorCode::RepoNotFound,
            message: "gone".into(),
        });
    }
    let put = store.put_sync(&ended, None).await.expect("put");
    // the same end written again (a worker retrying a write whose reply was lost)
    // changes nothing more
    assert_eq!(
        store.put_sync(&ended, None).await.expect("put again"),
        Put::Stored
    );
    put
}

async fn read(store: &dyn Store, project: &Project) -> Project {
    store
        .project(&pid(project))
        .await
        .expect("read")
        .expect("exists")
}

pub(crate) async fn a_sync_end_moves_status_schedule_and_pause_once(engine: Engine) {
    let store = engine.store.as_ref();
    let p = scheduled(store, 60).await;
    let before = now_epoch_ms();
    assert_eq!(one_sync(store, &p, SyncStatus::Failed).await, Put::Stored);
    let after_one = read(store, &p).await;
    assert_eq!(after_one.consecutive_failures, 1, "counted once");
    assert_eq!(
        after_one.last_error.as_ref().map(|e| e.code),
        Some(SyncErrorCode::RepoNotFound)
    );
    assert!(after_one.last_attempt_at.is_some() && after_one.last_success_at.is_none());
    // one failure: twice the interval, within the jitter
    let next = after_one.next_sync_ms.expect("scheduled") - before;
    assert!((108_000..=133_000).contains(&next), "next in {next} ms");

    for n in 2..=5 {
        let put = one_sync(store, &p, SyncStatus::Failed).await;
        let expected = if n == 5 {
            Put::StoredAndPaused
        } else {
            Put::Stored
        };
        assert_eq!(put, expected, "failure {n}");
    }
    let paused = read(store, &p).await;
    assert!(paused.paused && paused.next_sync_ms.is_none());
    assert_eq!(paused.paused_reason.as_deref(), Some("repo_not_found"));
    assert!(
        store
            .claim_due(now_epoch_ms() + 10 * 3600 * 1000, 100, HOLD)
            .await
            .expect("claim")
            .is_empty(),
        "a paused project is not scheduled"
    );
    assert_eq!(
        one_sync(store, &p, SyncStatus::Failed).await,
        Put::Stored,
        "paused once, not again"
    );

    let resume = ProjectChange {
        resume: true,
        ..Default::default()
    };
    let resumed = store
        .update_project(&pid(&p), resume)
        .await
        .expect("update")
        .expect("exists");
    assert!(!resumed.paused && resumed.consecutive_failures == 0);
    let before = read(store, &p)
        .await
        .next_sync_ms
        .expect("resumed: scheduled");
    let due = store
        .claim_due(now_epoch_ms() + 1, 100, HOLD)
        .await
        .expect("claim");
    let ids: Vec<ProjectId> = due
        .iter()
        .map(|claimed| claimed.project_id.clone())
        .collect();
    assert_eq!(ids, vec![p.project_id.clone()], "resumed: due now");
    assert_eq!(
        due[0].due_ms, before,
        "the claim reports when the project was due (the schedule-lag metric's start)"
    );

    assert_eq!(
        one_sync(store, &p, SyncStatus::Completed).await,
        Put::Stored
    );
    let ok = read(store, &p).await;
    assert!(ok.last_error.is_none() && ok.last_success_at.is_some());
    assert_eq!(ok.last_success_at, ok.last_attempt_at);

    // settings: a name and no interval any more
    let change = ProjectChange {
        name: Some("renamed".into()),
        sync_interval_s: Some(None),
        ..Default::default()
    };
    let changed = store
        .update_project(&pid(&p), change)
        .await
        .expect("update")
        .expect("exists");
    assert_eq!(changed.name, "renamed");
    assert_eq!(read(store, &p).await.name, "renamed");
    assert!(changed.next_sync_ms.is_none());
    assert!(
        store
            .claim_due(now_epoch_ms() + 10 * 3600 * 1000, 100, HOLD)
            .await
            .expect("claim")
            .is_empty()
    );
    store.delete_project(&pid(&p)).await.expect("delete");
    assert!(
        store
            .update_project(&pid(&p), ProjectChange::default())
            .await
            .expect("update")
            .is_none()
    );
}

pub(crate) async fn due_projects_are_claimed_once_across_schedulers(engine: Engine) {
    let store = Arc::clone(&engine.store);
    let mut wanted = HashSet::new();
    for n in 0..120 {
        if n % 4 == 0 {
            store.insert_project(&project("bob")).await.expect("insert");
        } else {
            wanted.insert(scheduled(store.as_ref(), 300).await.project_id);
        }
    }
    let now = now_epoch_ms() + 5;
    // four schedulers race for the due projects, a few at a time
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let claimed = store.claim_due(now, 7, HOLD).await.expect("claim");
                    if claimed.is_empty() {
                        return mine;
                    }
                    mine.extend(claimed.into_iter().map(|claimed| claimed.project_id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for racer in racers {
        all.extend(racer.await.expect("racer"));
    }
    let unique: HashSet<ProjectId> = all.iter().cloned().collect();
    assert_eq!(all.len(), unique.len(), "no project was handed out twice");
    assert_eq!(unique, wanted, "every due project was handed out");
    assert!(
        store
            .claim_due(now + 1_000, 500, HOLD)
            .await
            .expect("claim")
            .is_empty(),
        "claimed projects are held"
    );
    let again = store
        .claim_due(now + HOLD.as_millis() as u64 + 1, 500, HOLD)
        .await
        .expect("claim");
    assert_eq!(
        again.len(),
        wanted.len(),
        "after the hold they are due again"
    );
}
