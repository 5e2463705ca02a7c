//! Projects and sync records in redb, and the in-process rate limit.

use std::time::Duration;

use async_trait::async_trait;
use redb::{Durability, ReadableDatabase, ReadableTable};

use super::{
    DELIVERIES, DELIVERY_AGE, DUE, EmbeddedEngine, OWNER_PROJECTS, PROJECT_SYNCS, PROJECTS, SYNCS,
    get_project, read_json,
};
use crate::domain::{ProjectId, SyncId, now_epoch_ms};
use crate::engine::schedule::{apply_change, apply_end, at_registration, jitter};
use crate::engine::{Claimed, EngineError, Project, ProjectChange, ProjectLock, Put, Store};
use crate::protocol::{Event, EventBody, Job, SyncRecord, SyncStatus};

/// A delivery id is a duplicate for this long.
const DELIVERY_MEMORY_MS: u64 = 24 * 3600 * 1000;

/// Moves a project's entry in the due table from `old` to `new`.
fn move_due(
    due: &mut redb::Table<(u64, &str), ()>,
    id: &str,
    old: Option<u64>,
    new: Option<u64>,
) -> Result<(), EngineError> {
    if old == new {
        return Ok(());
    }
    if let Some(old) = old {
        due.remove((old, id)).map_err(redb::Error::from)?;
    }
    if let Some(new) = new {
        due.insert((new, id), ()).map_err(redb::Error::from)?;
    }
    Ok(())
}

/// The writes of [`Store::put_sync`] in `tx` (the caller commits): the record, and
/// for a sync's first end the project's status, schedule and follow-up. `Put::Gone`
/// when the record is gone (nothing written); the follow-up job to queue, if any.
pub(super) fn put_sync_in(
    tx: &redb::WriteTransaction,
    record: &SyncRecord,
    rules: crate::engine::schedule::Rules,
) -> Result<(Put, Option<Job>), EngineError> {
    let mut promoted: Option<Job> = None;
    let mut put = Put::Stored;
    {
        let mut syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
        let before: Option<SyncRecord> = syncs
            .get(record.sync_id.as_str())
            .map_err(redb::Error::from)?
            .map(|raw| read_json(raw.value()))
            .transpose()?;
        let Some(before) = before else {
            // the project (and its history) was deleted while the sync ran
            return Ok((Put::Gone, None));
        };
        // the project's status follows a sync's end once, however often
        // the end is written
        let first_end = !before.status.is_terminal();
        let raw = serde_json::to_string(&record)?;
        syncs
            .insert(record.sync_id.as_str(), raw.as_str())
            .map_err(redb::Error::from)?;
        if record.status.is_terminal() {
            let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
            let raw_project = projects
                .get(record.project_id.as_str())
                .map_err(redb::Error::from)?
                .map(|raw| raw.value().to_owned());
            if let Some(raw_project) = raw_project {
                let mut project: Project = read_json(&raw_project)?;
                if project.active_sync.as_ref() == Some(&record.sync_id) {
                    // the follow-up, if any, is the project's sync now
                    project.active_sync = project.follow_up.take();
                    if let Some(sync_id) = project.active_sync.clone() {
                        // queued with the trigger it was requested by
                        let trigger = syncs
                            .get(sync_id.as_str())
                            .map_err(redb::Error::from)?
                            .and_then(|raw| read_json::<SyncRecord>(raw.value()).ok())
                            .map(|follow_up| follow_up.trigger)
                            .unwrap_or_default();
                        promoted = Some(Job {
                            sync_id,
                            project_id: project.project_id.clone(),
                            owner: project.owner.clone(),
                            trigger,
                            queued_us: crate::protocol::now_epoch_us(),
                        });
                    }
                } else if project.follow_up.as_ref() == Some(&record.sync_id) {
                    project.follow_up = None;
                }
                project.last_status = Some(record.status);
                project.last_synced_at = record.finished_at.clone();
                if record.commit.is_some() {
                    project.commit = record.commit.clone();
                }
                if first_end {
                    let was_due = project.next_sync_ms;
                    if apply_end(&mut project, record, now_epoch_ms(), jitter(), rules) {
                        put = Put::StoredAndPaused;
                    }
                    let mut due = tx.open_table(DUE).map_err(redb::Error::from)?;
                    move_due(
                        &mut due,
                        project.project_id.as_str(),
                        was_due,
                        project.next_sync_ms,
                    )?;
                }
                let raw = serde_json::to_string(&project)?;
                projects
                    .insert(project.project_id.as_str(), raw.as_str())
                    .map_err(redb::Error::from)?;
            }
        }
    }
    Ok((put, promoted))
}

#[async_trait]
impl Store for EmbeddedEngine {
    async fn insert_project(&self, project: &Project) -> Result<(), EngineError> {
        let mut project = project.clone();
        at_registration(&mut project, now_epoch_ms());
        self.blocking(move |db| {
            let raw = serde_json::to_string(&project)?;
            let tx = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut due = tx.open_table(DUE).map_err(redb::Error::from)?;
                move_due(
                    &mut due,
                    project.project_id.as_str(),
                    None,
                    project.next_sync_ms,
                )?;
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                projects
                    .insert(project.project_id.as_str(), raw.as_str())
                    .map_err(redb::Error::from)?;
                let mut owners = tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
                owners
                    .insert((project.owner.as_str(), project.project_id.as_str()), ())
                    .map_err(redb::Error::from)?;
            }
            db.commit(tx)?;
            Ok(())
        })
        .await
    }

    async fn project(&self, id: &ProjectId) -> Result<Option<Project>, EngineError> {
        self.point_read(|db| get_project(db, id.as_str()))
    }

    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, EngineError> {
        let owner = owner.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let owners = tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
            let projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
            let mut out = Vec::new();
            for entry in owners
                .range((owner.as_str(), "")..)
                .map_err(redb::Error::from)?
            {
                let (key, _) = entry.map_err(redb::Error::from)?;
                let (entry_owner, project_id) = key.value();
                if entry_owner != owner {
                    break;
                }
                if let Some(raw) = projects.get(project_id).map_err(redb::Error::from)? {
                    match read_json::<Project>(raw.value()) {
                        Ok(project) => out.push(project),
                        // one unreadable record must not hide the owner's other projects
                        Err(err) if err.is_unreadable_record() => {
                            tracing::error!(project_id, error = %crate::error::error_chain(&err), "skipping a project whose stored record cannot be read");
                        }
                        Err(err) => return Err(err),
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn delete_project(&self, id: &ProjectId) -> Result<(), EngineError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                let removed = projects.remove(id.as_str()).map_err(redb::Error::from)?;
                let project: Option<Project> =
                    removed.map(|raw| read_json(raw.value())).transpose()?;
                if let Some(project) = project {
                    let mut owners = tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
                    owners
                        .remove((project.owner.as_str(), id.as_str()))
                        .map_err(redb::Error::from)?;
                    let mut due = tx.open_table(DUE).map_err(redb::Error::from)?;
                    move_due(&mut due, &id, project.next_sync_ms, None)?;
                }
                let mut index = tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
                let mut syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
                let keys: Vec<String> = index
                    .range((id.as_str(), "")..)
                    .map_err(redb::Error::from)?
                    .map_while(|entry| {
                        let (key, _) = entry.ok()?;
                        let (project, sync) = key.value();
                        (project == id).then(|| sync.to_owned())
                    })
                    .collect();
                for sync in keys {
                    index
                        .remove((id.as_str(), sync.as_str()))
                        .map_err(redb::Error::from)?;
                    syncs.remove(sync.as_str()).map_err(redb::Error::from)?;
                }
            }
            db.commit(tx)?;
            Ok(())
        })
        .await
    }

    async fn begin_sync(
        &self,
        record: SyncRecord,
        job: Job,
    ) -> Result<(SyncRecord, bool), EngineError> {
        let (outcome, enqueue) = self
            .blocking(move |db| {
                let tx = db.begin_write().map_err(redb::Error::from)?;
                let outcome = {
                    let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                    let mut syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
                    let raw_project = projects
                        .get(record.project_id.as_str())
                        .map_err(redb::Error::from)?
                        .map(|raw| raw.value().to_owned());
                    let Some(raw_project) = raw_project else {
                        return Err(EngineError::ProjectGone);
                    };
                    let mut project: Project = read_json(&raw_project)?;
                    let unfinished =
                        |id: &Option<SyncId>| -> Result<Option<SyncRecord>, EngineError> {
                            let Some(id) = id else { return Ok(None) };
                            Ok(syncs
                                .get(id.as_str())
                                .map_err(redb::Error::from)?
                                .map(|raw| read_json::<SyncRecord>(raw.value()))
                                .transpose()?
                                .filter(|sync| !sync.status.is_terminal()))
                        };
                    let active = unfinished(&project.active_sync)?;
                    let follow_up = unfinished(&project.follow_up)?;
                    match (active, follow_up) {
                        (Some(active), _) if active.status == SyncStatus::Queued => {
                            (active, false, false)
                        }
                        (Some(_), Some(follow_up)) => (follow_up, false, false),
                        (active, _) => {
                            // nothing active: this sync starts now; one running: this
                            // is its follow-up, queued when it ends
                            let starts_now = active.is_none();
                            if starts_now {
                                project.active_sync = Some(record.sync_id.clone());
                                project.follow_up = None;
                            } else {
                                project.follow_up = Some(record.sync_id.clone());
                            }
                            let raw = serde_json::to_string(&project)?;
                            projects
                                .insert(project.project_id.as_str(), raw.as_str())
                                .map_err(redb::Error::from)?;
                            let raw = serde_json::to_string(&record)?;
                            syncs
                                .insert(record.sync_id.as_str(), raw.as_str())
                                .map_err(redb::Error::from)?;
                            let mut index =
                                tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
                            index
                                .insert((record.project_id.as_str(), record.sync_id.as_str()), ())
                                .map_err(redb::Error::from)?;
                            (record, true, starts_now)
                        }
                    }
                };
                db.commit(tx)?;
                let (record, created, enqueue) = outcome;
                Ok(((record, created), enqueue))
            })
            .await?;
        // committed: the job goes on the in-process queue in the same call (a crash in
        // between is made good by the requeue at the next start)
        if enqueue {
            self.push_job(job);
        }
        Ok(outcome)
    }

    async fn sync(&self, id: &SyncId) -> Result<Option<SyncRecord>, EngineError> {
        self.point_read(|db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
            let found = syncs.get(id.as_str()).map_err(redb::Error::from)?;
            found.map(|raw| read_json(raw.value())).transpose()
        })
    }

    async fn put_sync(
        &self,
        record: &SyncRecord,
        lock: Option<&ProjectLock>,
    ) -> Result<Put, EngineError> {
        if let Some(lock) = lock
            && !self.holds(lock)
        {
            return Err(EngineError::Fenced);
        }
        let record = record.clone();
        let rules = self.rules;
        let (stored, promoted) = self
            .blocking(move |db| {
                let mut tx = db.begin_write().map_err(redb::Error::from)?;
                if !record.status.is_terminal() {
                    // stage changes are re-derivable from the job if lost in a crash; only
                    // the end of a sync must be on disk before anyone is told about it
                    let _ = tx.set_durability(Durability::None);
                }
                let (put, promoted) = put_sync_in(&tx, &record, rules)?;
                if put == Put::Gone {
                    return Ok((put, None));
                }
                db.commit(tx)?;
                Ok((put, promoted))
            })
            .await?;
        if let Some(job) = promoted {
            self.push_job(job);
        }
        Ok(stored)
    }

    async fn put_sync_with_events(
        &self,
        record: &SyncRecord,
        lock: Option<&ProjectLock>,
        owner: &str,
        events: &[(EventBody, String)],
        if_paused: &[(EventBody, String)],
    ) -> Result<Option<(Put, Vec<Event>)>, EngineError> {
        if let Some(lock) = lock
            && !self.holds(lock)
        {
            return Err(EngineError::Fenced);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(super::events::WriterRequest::End(Box::new(
                super::events::EndRequest {
                    record: record.clone(),
                    rules: self.rules,
                    user: owner.to_owned(),
                    events: events.to_vec(),
                    if_paused: if_paused.to_vec(),
                    reply,
                },
            )))
            .map_err(|_| EngineError::Closed)?;
        let (put, promoted, published) = answer.await.map_err(|_| EngineError::Closed)??;
        if let Some(job) = promoted {
            self.push_job(job);
        }
        Ok(Some((put, published)))
    }

    async fn syncs_of(
        &self,
        project: &ProjectId,
        limit: usize,
    ) -> Result<Vec<SyncRecord>, EngineError> {
        let project = project.as_str().to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let index = tx.open_table(PROJECT_SYNCS).map_err(redb::Error::from)?;
            let syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
            // every sync id sorts below "~", so this range is exactly the project's syncs
            let range = index
                .range((project.as_str(), "")..(project.as_str(), "~"))
                .map_err(redb::Error::from)?;
            let mut out = Vec::new();
            for entry in range.rev().take(limit) {
                let (key, _) = entry.map_err(redb::Error::from)?;
                let (_, sync_id) = key.value();
                if let Some(raw) = syncs.get(sync_id).map_err(redb::Error::from)? {
                    out.push(read_json(raw.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn update_project(
        &self,
        id: &ProjectId,
        change: ProjectChange,
    ) -> Result<Option<Project>, EngineError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            let updated = {
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                let raw = projects
                    .get(id.as_str())
                    .map_err(redb::Error::from)?
                    .map(|raw| raw.value().to_owned());
                let Some(raw) = raw else { return Ok(None) };
                let mut project: Project = read_json(&raw)?;
                let was_due = project.next_sync_ms;
                apply_change(&mut project, &change, now_epoch_ms(), jitter());
                let mut due = tx.open_table(DUE).map_err(redb::Error::from)?;
                move_due(&mut due, &id, was_due, project.next_sync_ms)?;
                let raw = serde_json::to_string(&project)?;
                projects
                    .insert(id.as_str(), raw.as_str())
                    .map_err(redb::Error::from)?;
                project
            };
            db.commit(tx)?;
            Ok(Some(updated))
        })
        .await
    }

    async fn claim_due(
        &self,
        now_ms: u64,
        limit: usize,
        hold: Duration,
    ) -> Result<Vec<Claimed>, EngineError> {
        let until = now_ms + hold.as_millis() as u64;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            let claimed = {
                let mut due = tx.open_table(DUE).map_err(redb::Error::from)?;
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                // a range over the due times up to now: only due entries are read
                let found: Vec<(u64, String)> = due
                    .range((0, "")..(now_ms + 1, ""))
                    .map_err(redb::Error::from)?
                    .take(limit)
                    .map(|entry| {
                        entry
                            .map(|(key, _)| (key.value().0, key.value().1.to_owned()))
                            .map_err(|err| EngineError::from(redb::Error::from(err)))
                    })
                    .collect::<Result<_, _>>()?;
                if found.is_empty() {
                    // nothing due: no write, so an idle tick costs no disk sync
                    drop((due, projects));
                    tx.abort().map_err(redb::Error::from)?;
                    return Ok(Vec::new());
                }
                for (at, id) in &found {
                    move_due(&mut due, id, Some(*at), Some(until))?;
                    let raw = projects
                        .get(id.as_str())
                        .map_err(redb::Error::from)?
                        .map(|raw| raw.value().to_owned());
                    if let Some(raw) = raw {
                        let mut project: Project = read_json(&raw)?;
                        project.next_sync_ms = Some(until);
                        let raw = serde_json::to_string(&project)?;
                        projects
                            .insert(id.as_str(), raw.as_str())
                            .map_err(redb::Error::from)?;
                    }
                }
                found
                    .into_iter()
                    // the due table is keyed by ids this store wrote
                    .filter_map(|(due_ms, id)| {
                        Some(Claimed {
                            project_id: ProjectId::parse(&id)?,
                            due_ms,
                        })
                    })
                    .collect()
            };
            db.commit(tx)?;
            Ok(claimed)
        })
        .await
    }

    async fn seen_delivery(
        &self,
        project: &ProjectId,
        delivery: &str,
    ) -> Result<bool, EngineError> {
        let (project, delivery) = (project.as_str().to_owned(), delivery.to_owned());
        let now = now_epoch_ms();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            let seen = {
                let mut seen = tx.open_table(DELIVERIES).map_err(redb::Error::from)?;
                let mut age = tx.open_table(DELIVERY_AGE).map_err(redb::Error::from)?;
                // forget a few of the oldest past the window with every write, so
                // the tables stay bounded by the deliveries of one window
                let expired: Vec<(u64, String, String)> = age
                    .range((0, "", "")..(now.saturating_sub(DELIVERY_MEMORY_MS), "", ""))
                    .map_err(redb::Error::from)?
                    .take(16)
                    .filter_map(|entry| entry.ok())
                    .map(|(key, _)| {
                        let (at, p, d) = key.value();
                        (at, p.to_owned(), d.to_owned())
                    })
                    .collect();
                for (at, p, d) in &expired {
                    age.remove((*at, p.as_str(), d.as_str()))
                        .map_err(redb::Error::from)?;
                    seen.remove((p.as_str(), d.as_str()))
                        .map_err(redb::Error::from)?;
                }
                let before = seen
                    .get((project.as_str(), delivery.as_str()))
                    .map_err(redb::Error::from)?
                    .map(|at| at.value());
                match before {
                    Some(at) if now.saturating_sub(at) < DELIVERY_MEMORY_MS => true,
                    stale => {
                        if let Some(at) = stale {
                            age.remove((at, project.as_str(), delivery.as_str()))
                                .map_err(redb::Error::from)?;
                        }
                        seen.insert((project.as_str(), delivery.as_str()), now)
                            .map_err(redb::Error::from)?;
                        age.insert((now, project.as_str(), delivery.as_str()), ())
                            .map_err(redb::Error::from)?;
                        false
                    }
                }
            };
            db.commit(tx)?;
            Ok(seen)
        })
        .await
    }

    async fn admit_webhook(
        &self,
        project: &ProjectId,
    ) -> Result<Result<(), Duration>, EngineError> {
        let now = self.epoch.elapsed();
        let mut limiter = self
            .webhook_limiter
            .lock()
            .expect("rate limiter lock is never poisoned");
        Ok(limiter.check(project.as_str(), now))
    }

    async fn admit_sync_request(&self, user: &str) -> Result<Result<(), Duration>, EngineError> {
        let now = self.epoch.elapsed();
        let mut limiter = self
            .limiter
            .lock()
            .expect("rate limiter lock is never poisoned");
        Ok(limiter.check(user, now))
    }

    async fn admit_background_sync(&self, user: &str) -> Result<Result<(), Duration>, EngineError> {
        let now = self.epoch.elapsed();
        let mut limiter = self
            .limiter
            .lock()
            .expect("rate limiter lock is never poisoned");
        Ok(limiter.check_background(user, now))
    }

    async fn ping(&self) -> Result<(), EngineError> {
        self.blocking(|db| {
            db.begin_read().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }
}
