//! Projects and sync records in redb, and the in-process rate limit.

use std::time::Duration;

use async_trait::async_trait;
use redb::{Durability, ReadableDatabase, ReadableTable};

use super::{
    EmbeddedEngine, OWNER_PROJECTS, PROJECT_SYNCS, PROJECTS, SYNCS, get_project, read_json,
};
use crate::domain::{ProjectId, SyncId};
use crate::engine::{EngineError, Project, ProjectLock, Store};
use crate::protocol::{Job, SyncRecord, SyncStatus};

#[async_trait]
impl Store for EmbeddedEngine {
    async fn insert_project(&self, project: &Project) -> Result<(), EngineError> {
        let project = project.clone();
        self.blocking(move |db| {
            let raw = serde_json::to_string(&project)?;
            let tx = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut projects = tx.open_table(PROJECTS).map_err(redb::Error::from)?;
                projects
                    .insert(project.project_id.as_str(), raw.as_str())
                    .map_err(redb::Error::from)?;
                let mut owners = tx.open_table(OWNER_PROJECTS).map_err(redb::Error::from)?;
                owners
                    .insert((project.owner.as_str(), project.project_id.as_str()), ())
                    .map_err(redb::Error::from)?;
            }
            tx.commit().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }

    async fn project(&self, id: &ProjectId) -> Result<Option<Project>, EngineError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| get_project(db, &id)).await
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
                    out.push(read_json::<Project>(raw.value())?);
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
            tx.commit().map_err(redb::Error::from)?;
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
                        |id: &Option<String>| -> Result<Option<SyncRecord>, EngineError> {
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
                tx.commit().map_err(redb::Error::from)?;
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
        let id = id.as_str().to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
            let found = syncs.get(id.as_str()).map_err(redb::Error::from)?;
            found.map(|raw| read_json(raw.value())).transpose()
        })
        .await
    }

    async fn put_sync(
        &self,
        record: &SyncRecord,
        lock: Option<&ProjectLock>,
    ) -> Result<bool, EngineError> {
        if let Some(lock) = lock
            && !self.holds(lock)
        {
            return Err(EngineError::Fenced);
        }
        let record = record.clone();
        let (stored, promoted) = self
            .blocking(move |db| {
                let mut promoted: Option<Job> = None;
                let mut tx = db.begin_write().map_err(redb::Error::from)?;
                if !record.status.is_terminal() {
                    // stage changes are re-derivable from the job if lost in a crash; only
                    // the end of a sync must be on disk before anyone is told about it
                    let _ = tx.set_durability(Durability::None);
                }
                {
                    let mut syncs = tx.open_table(SYNCS).map_err(redb::Error::from)?;
                    let exists = syncs
                        .get(record.sync_id.as_str())
                        .map_err(redb::Error::from)?
                        .is_some();
                    if !exists {
                        // the project (and its history) was deleted while the sync ran
                        return Ok((false, None));
                    }
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
                            if project.active_sync.as_deref() == Some(record.sync_id.as_str()) {
                                // the follow-up, if any, is the project's sync now
                                project.active_sync = project.follow_up.take();
                                promoted = project.active_sync.clone().map(|sync_id| Job {
                                    sync_id,
                                    project_id: project.project_id.clone(),
                                    owner: project.owner.clone(),
                                });
                            } else if project.follow_up.as_deref() == Some(record.sync_id.as_str())
                            {
                                project.follow_up = None;
                            }
                            project.last_status = Some(record.status);
                            project.last_synced_at = record.finished_at.clone();
                            if record.commit.is_some() {
                                project.commit = record.commit.clone();
                            }
                            let raw = serde_json::to_string(&project)?;
                            projects
                                .insert(project.project_id.as_str(), raw.as_str())
                                .map_err(redb::Error::from)?;
                        }
                    }
                }
                tx.commit().map_err(redb::Error::from)?;
                Ok((true, promoted))
            })
            .await?;
        if let Some(job) = promoted {
            self.push_job(job);
        }
        Ok(stored)
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

    async fn admit_sync_request(&self, user: &str) -> Result<Result<(), Duration>, EngineError> {
        let now = self.epoch.elapsed();
        let mut limiter = self
            .limiter
            .lock()
            .expect("rate limiter lock is never poisoned");
        Ok(limiter.check(user, now))
    }

    async fn ping(&self) -> Result<(), EngineError> {
        self.blocking(|db| {
            db.begin_read().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }
}
