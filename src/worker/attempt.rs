//! One attempt of a sync: the mirror sync on the blocking pool, watched by a select
//! loop that samples progress into stage events, enforces the timeout and hands the
//! job back on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::credentials::{SshFiles, SshRefusal, http_identity, ssh_setup};
use super::guard;
use super::retry::AttemptEnd;
use super::{Worker, WorkerSettings};
use crate::domain::ProjectId;
use crate::engine::{EngineError, Project};
use crate::mirror::{self, Counters, MirrorError, Phase, SyncSpec};
use crate::protocol::{Progress, SyncRecord, SyncStatus};

/// How long an interrupted sync may take to notice before it is left behind.
const ABANDON_AFTER_INTERRUPT: Duration = Duration::from_secs(5);

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How often gix's counters are sampled into a progress event while a sync runs.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Where an attempt reports the stages and progress it reaches.
pub(super) trait Stages {
    async fn stage(
        &self,
        record: &mut SyncRecord,
        status: SyncStatus,
        progress: Option<Progress>,
    ) -> Result<(), EngineError>;
}

pub(super) fn status_of(phase: Phase) -> SyncStatus {
    match phase {
        Phase::Fetching => SyncStatus::Running,
        Phase::UpdatingFiles => SyncStatus::UpdatingFiles,
        Phase::Cleaning => SyncStatus::Cleaning,
        Phase::Finalizing => SyncStatus::Finalizing,
    }
}

impl From<Counters> for Progress {
    fn from(counters: Counters) -> Self {
        Progress {
            percent: counters.percent,
            objects: counters.objects,
            bytes: counters.bytes,
        }
    }
}

/// A sample as the sync's bar shows it: never below what the sync already reported
/// (gix drops the counters of a finished step, and a retry starts its own from zero),
/// so percent only moves forward and the objects and bytes carry into later stages.
fn carried(record: &SyncRecord, sample: Counters) -> Progress {
    let sample = Progress::from(sample);
    match &record.progress {
        Some(shown) => Progress {
            percent: sample.percent.max(shown.percent),
            objects: sample.objects.max(shown.objects),
            bytes: sample.bytes.max(shown.bytes),
        },
        None => sample,
    }
}

/// The failure of a sync that ran out of its time, retries included.
pub(super) fn out_of_time(settings: &WorkerSettings) -> MirrorError {
    MirrorError::TimedOut(format!(
        "the sync did not finish within HIVESYNC_SYNC_TIMEOUT_S ({} s), retries included",
        settings.sync_timeout.as_secs()
    ))
}

impl Worker {
    /// One run of the mirror sync, with progress sampling, the timeout and shutdown;
    /// stages and progress go to `stages`, and writes are fenced with `fence`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt(
        &self,
        project: &Project,
        project_id: &ProjectId,
        record: &mut SyncRecord,
        fence: u64,
        stages: &impl Stages,
        deadline: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> Result<AttemptEnd, EngineError> {
        // a file URL is checked again: a symlink on its path may have been swapped
        // since registration to point into another user's mirror
        if let Err(err) = self.settings.file_roots.check_repo_url(&project.repo_url) {
            return Ok(AttemptEnd::Failed(MirrorError::PrivateAddress(
                err.to_string(),
            )));
        }
        // the key file lives until this attempt ends, then is deleted
        // the private-host guard on the addresses the name has now; ssh and https are
        // pinned to the address that was checked
        let checked =
            match guard::check_remote(&project.repo_url, self.settings.allow_private_hosts).await {
                Ok(checked) => checked,
                Err(err) => return Ok(AttemptEnd::Failed(err)),
            };
        let (ssh_command, ssh_files) = match ssh_setup(project, &self.settings, checked.as_ref()) {
            Ok(setup) => setup,
            Err(err) => return Ok(AttemptEnd::Failed(err)),
        };
        let http_identity = match http_identity(project, &self.settings) {
            Ok(identity) => identity,
            Err(err) => return Ok(AttemptEnd::Failed(err)),
        };
        let https_ca_file = self.settings.https_ca_file.clone();
        let pinned = checked.as_ref().map(|checked| {
            (
                checked.host.clone(),
                SocketAddr::new(checked.address, checked.port),
            )
        });
        let root = gix::progress::tree::Root::new();
        let interrupt = Arc::new(AtomicBool::new(false));
        let min_free_bytes = self.settings.min_free_bytes;
        let quota = self.settings.quota;
        // what the owner's other mirrors hold, for the per-user total
        let others: Vec<ProjectId> = self
            .engine
            .store
            .projects_of(&project.owner)
            .await?
            .into_iter()
            .map(|other| other.project_id)
            .filter(|other| *other != project.project_id)
            .collect();
        let owner_other_bytes = {
            let layout = self.layout.clone();
            tokio::task::spawn_blocking(move || {
                others
                    .iter()
                    .map(|other| layout.footprint(other))
                    .fold(0u64, u64::saturating_add)
            })
            .await?
        };
        let (phase_tx, mut phase_rx) = mpsc::unbounded_channel::<Phase>();
        let handle = {
            let layout = self.layout.clone();
            let root = Arc::clone(&root);
            let interrupt = Arc::clone(&interrupt);
            let project_id = project_id.clone();
            let url = project.repo_url.clone();
            let branch = project.branch.clone();
            tokio::task::spawn_blocking(move || {
                let spec = SyncSpec {
                    project: &project_id,
                    url: &url,
                    branch: &branch,
                    ssh_command,
                    http_identity,
                    https_ca_file,
                    pinned,
                    fence,
                    min_free_bytes,
                    quota,
                    owner_other_bytes,
                };
                let on_phase = move |phase: Phase| {
                    let _ = phase_tx.send(phase);
                };
                mirror::sync(&layout, &spec, &root, &interrupt, &on_phase)
            })
        };
        tokio::pin!(handle);
        let deadline = tokio::time::sleep_until(deadline);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut phase = Phase::Fetching;
        let mut last_sent = record.progress.unwrap_or_default();
        let mut released = false;
        let mut timed_out = false;
        let mut abandon_at: Option<tokio::time::Instant> = None;
        let mut engine_failure: Option<EngineError> = None;
        let result = loop {
            tokio::select! {
                biased;
                Some(next) = phase_rx.recv() => {
                    phase = next;
                    let status = status_of(phase);
                    if status != record.status && engine_failure.is_none() {
                        let progress = carried(record, mirror::sample_progress(&root, phase));
                        last_sent = progress;
                        if let Err(err) = stages.stage(record, status, Some(progress)).await {
                            // the lock is lost or the project deleted: stop the sync
                            // before it writes more, then report
                            engine_failure = Some(err);
                            interrupt.store(true, Ordering::Relaxed);
                            abandon_at.get_or_insert(tokio::time::Instant::now() + ABANDON_AFTER_INTERRUPT);
                        }
                    }
                }
                joined = &mut handle => break joined,
                _ = ticker.tick(), if engine_failure.is_none() => {
                    let progress = carried(record, mirror::sample_progress(&root, phase));
                    if progress != last_sent {
                        last_sent = progress;
                        if let Err(err) = stages.stage(record, record.status, Some(progress)).await {
                            engine_failure = Some(err);
                            interrupt.store(true, Ordering::Relaxed);
                            abandon_at.get_or_insert(tokio::time::Instant::now() + ABANDON_AFTER_INTERRUPT);
                        }
                    }
                }
                _ = &mut deadline, if !interrupt.load(Ordering::Relaxed) => {
                    interrupt.store(true, Ordering::Relaxed);
                    timed_out = true;
                    // gix stops at its next check of the flag; a transfer stuck in a
                    // read may never get there, so it gets a grace period, then the
                    // sync fails without it (the flag keeps it from ever swapping)
                    abandon_at = Some(tokio::time::Instant::now() + ABANDON_AFTER_INTERRUPT);
                }
                _ = sleep_until_opt(abandon_at) => {
                    tracing::warn!("the sync did not stop after its interrupt; abandoning it");
                    if let Some(err) = engine_failure {
                        return Err(err);
                    }
                    return Ok(if released {
                        AttemptEnd::Released
                    } else if timed_out {
                        AttemptEnd::Failed(out_of_time(&self.settings))
                    } else {
                        AttemptEnd::Failed(MirrorError::Interrupted)
                    });
                }
                _ = shutdown.cancelled(), if !released => {
                    released = true;
                    interrupt.store(true, Ordering::Relaxed);
                    abandon_at = Some(tokio::time::Instant::now() + ABANDON_AFTER_INTERRUPT);
                }
            }
        };
        if let Some(err) = engine_failure {
            return Err(err);
        }
        // phases the sync passed through in the last moments before it returned
        while let Ok(next) = phase_rx.try_recv() {
            phase = next;
            let status = status_of(phase);
            if status != record.status {
                let progress = carried(record, mirror::sample_progress(&root, phase));
                stages.stage(record, status, Some(progress)).await?;
            }
        }
        let result = result?;
        if released {
            // finished before the interrupt took hold: keep the work
            return Ok(match result {
                Ok(outcome) => AttemptEnd::Done(outcome),
                Err(_) => AttemptEnd::Released,
            });
        }
        Ok(match result {
            Ok(outcome) => AttemptEnd::Done(outcome),
            Err(_) if timed_out => AttemptEnd::Failed(out_of_time(&self.settings)),
            // ssh writes its diagnostics to our log instead of stderr, so gix cannot
            // classify them; the log does
            Err(MirrorError::Network(cause)) => match ssh_files.as_ref().map(SshFiles::refusal) {
                Some(Some(SshRefusal::HostKey)) => AttemptEnd::Failed(MirrorError::HostKeyRejected),
                Some(Some(SshRefusal::Credentials)) => {
                    AttemptEnd::Failed(MirrorError::AuthFailed(cause))
                }
                _ => AttemptEnd::Failed(MirrorError::Network(cause)),
            },
            Err(err) => AttemptEnd::Failed(err),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_map_to_contract_stages_in_order() {
        let stages: Vec<_> = [
            Phase::Fetching,
            Phase::UpdatingFiles,
            Phase::Cleaning,
            Phase::Finalizing,
        ]
        .into_iter()
        .map(status_of)
        .collect();
        assert_eq!(
            stages,
            vec![
                SyncStatus::Running,
                SyncStatus::UpdatingFiles,
                SyncStatus::Cleaning,
                SyncStatus::Finalizing
            ],
            "the contract's forward order of stages"
        );
    }

    #[test]
    fn a_sample_below_what_was_shown_does_not_move_the_bar_back() {
        let mut record: SyncRecord = serde_json::from_value(serde_json::json!({
            "sync_id": crate::domain::SyncId::generate(),
            "project_id": crate::domain::ProjectId::generate(),
            "status": "running", "progress": null,
            "commit": null, "previous_commit": null, "attempt": 1,
            "queued_at": "2026-12-07T00:00:00Z", "started_at": null, "finished_at": null,
            "duration_ms": null, "error": null
        }))
        .expect("a record");
        let first = Counters {
            percent: 18,
            objects: 12_320,
            bytes: 4_000,
        };
        assert_eq!(carried(&record, first), Progress::from(first));
        record.progress = Some(Progress::from(first));
        // gix dropped the finished step's counters; the pack's bytes went on
        let later = Counters {
            percent: 0,
            objects: 0,
            bytes: 16_900_000,
        };
        assert_eq!(
            carried(&record, later),
            Progress {
                percent: 18,
                objects: 12_320,
                bytes: 16_900_000
            }
        );
    }
}
