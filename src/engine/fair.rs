//! Which waiting job a free worker starts: fair shares by owner, whatever the engine.
//!
//! Across owners, the owner running the fewest syncs goes first (ties: the owner whose
//! last sync started longest ago, then the one whose oldest job has waited longest),
//! so owners take turns: a user with one request does not wait behind another user's
//! backlog, and an owner who already runs `cap` syncs waits until one ends. Within an owner, what a person asked for (the Sync button, a push webhook)
//! goes ahead of the owner's scheduled and repair syncs, each class oldest first.
//! This is the order Sourcegraph's update scheduler keeps; the engines differ only in
//! how they find the waiting jobs and the running counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::protocol::{Job, Trigger};

/// Whether a person is waiting for this job's sync.
pub fn interactive(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::Api | Trigger::Webhook)
}

/// How many syncs each owner runs now, and when (any increasing stamp) each last had
/// one started; an owner missing from a map runs none / was never served.
#[derive(Debug, Default, Clone)]
pub struct Shares {
    pub running: HashMap<String, usize>,
    pub served: HashMap<String, u64>,
}

/// The index in `waiting` (oldest first) of the job to start now, or `None` when every
/// waiting job's owner already runs `cap` syncs.
pub fn choose(waiting: &[&Job], shares: &Shares, cap: usize) -> Option<usize> {
    // per owner: its first job, and its first interactive job
    let mut owners: HashMap<&str, (usize, Option<usize>)> = HashMap::new();
    for (index, job) in waiting.iter().enumerate() {
        let entry = owners.entry(job.owner.as_str()).or_insert((index, None));
        if entry.1.is_none() && interactive(job.trigger) {
            entry.1 = Some(index);
        }
    }
    owners
        .into_iter()
        .filter_map(|(owner, (first, first_interactive))| {
            let runs = shares.running.get(owner).copied().unwrap_or(0);
            let served = shares.served.get(owner).copied().unwrap_or(0);
            (runs < cap).then_some(((runs, served, first), first_interactive.unwrap_or(first)))
        })
        .min_by_key(|&(order, _)| order)
        .map(|(_, pick)| pick)
}

/// The per-owner cap on running syncs, settable once the process knows its worker
/// count (`HIVESYNC_OWNER_MAX_RUNNING`; unlimited until set).
#[derive(Debug)]
pub struct OwnerCap(AtomicUsize);

impl Default for OwnerCap {
    fn default() -> Self {
        Self(AtomicUsize::new(usize::MAX))
    }
}

impl OwnerCap {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, cap: usize) {
        self.0.store(cap.max(1), Ordering::Relaxed);
    }
}

/// The default cap for `workers` workers: half of them, at least one.
pub fn default_cap(workers: usize) -> usize {
    (workers / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(owner: &str, trigger: Trigger) -> Job {
        Job {
            sync_id: crate::domain::SyncId::generate(),
            project_id: crate::domain::ProjectId::generate(),
            owner: owner.into(),
            trigger,
            queued_us: 0,
        }
    }

    fn pick(waiting: &[Job], running: &[(&str, usize)], cap: usize) -> Option<usize> {
        let refs: Vec<&Job> = waiting.iter().collect();
        let shares = Shares {
            running: running
                .iter()
                .map(|(owner, count)| (owner.to_string(), *count))
                .collect(),
            served: HashMap::new(),
        };
        choose(&refs, &shares, cap)
    }

    #[test]
    fn the_owner_running_fewest_goes_first_even_when_queued_last() {
        let mut waiting: Vec<Job> = (0..8).map(|_| job("alice", Trigger::Api)).collect();
        waiting.push(job("bob", Trigger::Api));
        assert_eq!(pick(&waiting, &[("alice", 1)], 4), Some(8));
        // with nobody running, the oldest waiting owner goes first
        assert_eq!(pick(&waiting, &[], 4), Some(0));
    }

    #[test]
    fn an_owner_at_the_cap_waits_even_with_workers_free() {
        let waiting = vec![job("alice", Trigger::Api), job("alice", Trigger::Api)];
        assert_eq!(pick(&waiting, &[("alice", 2)], 2), None);
        assert_eq!(pick(&waiting, &[("alice", 1)], 2), Some(0));
    }

    #[test]
    fn within_an_owner_a_press_goes_ahead_of_the_schedule() {
        let waiting = vec![
            job("alice", Trigger::Schedule),
            job("alice", Trigger::Repair),
            job("alice", Trigger::Webhook),
            job("carol", Trigger::Schedule),
        ];
        assert_eq!(pick(&waiting, &[], 4), Some(2));
        // but not ahead of another owner who runs less
        assert_eq!(pick(&waiting, &[("alice", 1)], 4), Some(3));
    }

    #[test]
    fn equal_owners_take_turns() {
        let waiting: Vec<Job> = (0..4)
            .flat_map(|_| [job("alice", Trigger::Api), job("bob", Trigger::Api)])
            .collect();
        let mut shares = Shares::default();
        let mut left: Vec<&Job> = waiting.iter().collect();
        let mut order = Vec::new();
        while let Some(index) = choose(&left, &shares, usize::MAX) {
            let job = left.remove(index);
            *shares.running.entry(job.owner.clone()).or_default() += 1;
            order.push(job.owner.as_str());
        }
        assert_eq!(
            order,
            [
                "alice", "bob", "alice", "bob", "alice", "bob", "alice", "bob"
            ]
        );
    }

    #[test]
    fn with_nothing_running_the_owner_served_longest_ago_goes_first() {
        // mallory's backlog is older, but her last sync started after bob's
        let waiting = [job("mallory", Trigger::Api), job("bob", Trigger::Api)];
        let mut shares = Shares::default();
        shares.served.insert("mallory".into(), 7);
        assert_eq!(
            choose(&waiting.iter().collect::<Vec<_>>(), &shares, 4),
            Some(1)
        );
        shares.served.insert("bob".into(), 9);
        assert_eq!(
            choose(&waiting.iter().collect::<Vec<_>>(), &shares, 4),
            Some(0)
        );
    }

    #[test]
    fn the_default_cap_is_half_the_workers_and_at_least_one() {
        assert_eq!(default_cap(1), 1);
        assert_eq!(default_cap(2), 1);
        assert_eq!(default_cap(4), 2);
        assert_eq!(default_cap(9), 4);
    }
}
