//! The engine conformance checks of sync lifecycles that span the store and the
//! queue: follow-up syncs and the watchdog. Run by `conformance::all_checks` against
//! both engines.

use std::sync::Arc;
use std::time::Duration;

use hivesync::domain::now_rfc3339;
use hivesync::engine::{Engine, EngineError, Lease, Project, Store};
use hivesync::protocol::{SyncRecord, SyncStatus};
use tokio_util::sync::CancellationToken;

use crate::conformance::{begin, job_for, pid, project, record};

/// Ends `sync` with `status` and returns its project as it is afterwards.
async fn end_sync(
    store: &dyn Store,
    sync: &SyncRecord,
    status: SyncStatus,
    project: &Project,
) -> Project {
    let mut ended = sync.clone();
    ended.status = status;
    ended.finished_at = Some(now_rfc3339());
    assert!(store.put_sync(&ended, None).await.expect("put").stored());
    store
        .project(&pid(project))
        .await
        .expect("read")
        .expect("exists")
}

/// The next job on the queue, or `None` when none comes within a short wait.
async fn next_job(engine: &Engine) -> Option<Lease> {
    let patience = CancellationToken::new();
    let stopper = patience.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stopper.cancel();
    });
    let lease = engine.queue.take(&patience).await.expect("take");
    if let Some(lease) = &lease {
        engine.queue.complete(lease).await.expect("complete");
    }
    lease
}

pub(crate) async fn a_request_during_a_running_sync_queues_one_follow_up(engine: Engine) {
    let store = &engine.store;
    let alice = project("alice");
    store.insert_project(&alice).await.expect("insert");
    let (first, created) = begin(store.as_ref(), &alice).await;
    assert!(created);
    let job = next_job(&engine)
        .await
        .expect("begin puts the job on the queue in the same step");
    assert_eq!(job.job.sync_id, first.sync_id);

    let mut running = first.clone();
    running.status = SyncStatus::Running;
    assert!(store.put_sync(&running, None).await.expect("put").stored());
    // requests racing each other while the sync runs: exactly one follow-up
    let racing: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(store);
            let alice = alice.clone();
            tokio::spawn(async move { begin(store.as_ref(), &alice).await })
        })
        .collect();
    let mut follow_ups = Vec::new();
    for task in racing {
        follow_ups.push(task.await.expect("task"));
    }
    let created: Vec<_> = follow_ups.iter().filter(|(_, created)| *created).collect();
    assert_eq!(
        created.len(),
        1,
        "one follow-up, however many requests race"
    );
    let follow_up = created[0].0.clone();
    assert_ne!(follow_up.sync_id, first.sync_id);
    assert!(
        follow_ups
            .iter()
            .all(|(sync, _)| sync.sync_id == follow_up.sync_id),
        "later requests join the follow-up"
    );
    assert!(
        next_job(&engine).await.is_none(),
        "the follow-up waits for the running sync"
    );

    let project = end_sync(store.as_ref(), &running, SyncStatus::Completed, &alice).await;
    assert_eq!(project.active_sync.as_ref(), Some(&follow_up.sync_id));
    assert_eq!(project.follow_up, None);
    let job = next_job(&engine)
        .await
        .expect("the follow-up is queued when the first ends");
    assert_eq!(job.job.sync_id, follow_up.sync_id);
    let (joined, created) = begin(store.as_ref(), &alice).await;
    assert!(!created, "a request joins the queued follow-up");
    assert_eq!(joined.sync_id, follow_up.sync_id);

    let project = end_sync(store.as_ref(), &follow_up, SyncStatus::Failed, &alice).await;
    assert_eq!(project.active_sync, None);
    assert!(next_job(&engine).await.is_none());

    // a record whose project is gone is not written, and says so
    store.delete_project(&pid(&alice)).await.expect("delete");
    let mut finished = follow_up.clone();
    finished.status = SyncStatus::Failed;
    assert!(!store.put_sync(&finished, None).await.expect("put").stored());
    let orphan = record(&alice);
    assert!(matches!(
        store
            .begin_sync(orphan.clone(), job_for(&orphan, "alice"))
            .await,
        Err(EngineError::ProjectGone)
    ));
}

pub(crate) async fn a_lost_job_is_found_and_requeued_by_the_watchdog(engine: Engine) {
    let alice = project("alice");
    engine.store.insert_project(&alice).await.expect("insert");
    let (sync, _) = begin(engine.store.as_ref(), &alice).await;
    assert!(
        engine
            .queue
            .stranded_syncs()
            .await
            .expect("stranded")
            .is_empty(),
        "a queued job is not stranded"
    );
    // the job is lost: taken and acknowledged without anything run
    let lost = next_job(&engine).await.expect("the job");
    assert_eq!(lost.job.sync_id, sync.sync_id);
    let stranded = engine.queue.stranded_syncs().await.expect("stranded");
    assert_eq!(
        stranded
            .iter()
            .map(|(r, owner)| (r.sync_id.clone(), owner.clone()))
            .collect::<Vec<_>>(),
        vec![(sync.sync_id.clone(), "alice".to_owned())]
    );
    assert_eq!(
        engine
            .requeue_stranded(Duration::from_secs(3600))
            .await
            .expect("round"),
        0,
        "not before the grace is up"
    );
    assert!(
        engine
            .queue
            .claim_watchdog(Duration::from_secs(5))
            .await
            .expect("claim")
    );
    assert_eq!(
        engine
            .requeue_stranded(Duration::ZERO)
            .await
            .expect("round"),
        1
    );
    let requeued = next_job(&engine)
        .await
        .expect("the sync is back on the queue");
    assert_eq!(requeued.job.sync_id, sync.sync_id);
    // a sync whose project lock is held is a running one, not stranded
    let lock = engine
        .queue
        .lock_project(&requeued)
        .await
        .expect("lock")
        .expect("free");
    assert!(
        engine
            .queue
            .stranded_syncs()
            .await
            .expect("stranded")
            .is_empty()
    );
    engine.queue.unlock_project(&lock).await.expect("unlock");
}
