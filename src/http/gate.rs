//! What stands before a webhook delivery's body is read: failed signatures counted per
//! project and per peer address (past a rate, deliveries are refused `429` before a
//! byte of their body is read), and deliveries in progress bounded per project and in
//! the whole hub.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::ApiError;
use super::slots::{Full, Slot, UserSlots};
use crate::domain::RateLimiter;

pub struct WebhookGate {
    failures: Mutex<RateLimiter>,
    epoch: Instant,
    in_progress: Arc<UserSlots>,
}

impl WebhookGate {
    pub fn new(failures: (u32, Duration), per_project: usize, max: usize) -> Self {
        Self {
            failures: Mutex::new(RateLimiter::new(failures.0, failures.1)),
            epoch: Instant::now(),
            in_progress: UserSlots::new(per_project.max(1), max.max(1)),
        }
    }

    fn keys(project: &str, peer: Option<IpAddr>) -> [Option<String>; 2] {
        [
            Some(format!("project {project}")),
            peer.map(|peer| format!("peer {peer}")),
        ]
    }

    /// A place for one delivery to `project` from `peer`: refused when either has
    /// failed its signature too often lately, or too many deliveries are in progress.
    pub fn admit(&self, project: &str, peer: Option<IpAddr>) -> Result<Slot, ApiError> {
        let now = self.epoch.elapsed();
        {
            let failures = self
                .failures
                .lock()
                .expect("failure counts are never poisoned");
            for key in Self::keys(project, peer).into_iter().flatten() {
                if let Err(retry_after) = failures.peek(&key, now) {
                    return Err(ApiError::Busy {
                        message: "too many deliveries with a wrong signature lately (HIVESYNC_WEBHOOK_FAILURES); check the secret the forge sends".into(),
                        retry_after,
                    });
                }
            }
        }
        self.in_progress.take(project).map_err(|full| ApiError::Busy {
            message: match full {
                Full::User => "too many deliveries to this project in progress (HIVESYNC_WEBHOOK_PER_PROJECT)".into(),
                Full::Total => "too many webhook deliveries in progress (HIVESYNC_WEBHOOK_MAX)".into(),
            },
            retry_after: Duration::from_secs(1),
        })
    }

    /// Counts a delivery whose signature failed against its project and its peer.
    pub fn failed(&self, project: &str, peer: Option<IpAddr>) {
        let now = self.epoch.elapsed();
        let mut failures = self
            .failures
            .lock()
            .expect("failure counts are never poisoned");
        for key in Self::keys(project, peer).into_iter().flatten() {
            // over the rate already: the next admit refuses; nothing more to count
            let _ = failures.check(&key, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_close_the_gate_for_the_project_and_the_peer_only() {
        let gate = WebhookGate::new((3, Duration::from_secs(60)), 4, 64);
        let (mallory, forge): (IpAddr, IpAddr) = (
            "192.0.2.1".parse().expect("ip"),
            "192.0.2.2".parse().expect("ip"),
        );
        for _ in 0..3 {
            assert!(gate.admit("p1", Some(mallory)).is_ok());
            gate.failed("p1", Some(mallory));
        }
        let refused = gate.admit("p1", Some(mallory)).expect_err("closed");
        assert_eq!(refused.code_and_status().0, "rate_limited");
        assert!(
            gate.admit("p1", Some(forge)).is_err(),
            "the project is closed"
        );
        assert!(gate.admit("p2", Some(forge)).is_ok(), "others' are not");
        assert!(
            gate.admit("p2", Some(mallory)).is_err(),
            "the peer is closed"
        );
    }

    #[test]
    fn deliveries_in_progress_are_bounded_per_project_and_in_all() {
        let gate = WebhookGate::new((10, Duration::from_secs(60)), 2, 3);
        let _a = gate.admit("p1", None).expect("first");
        let _b = gate.admit("p1", None).expect("second");
        assert!(gate.admit("p1", None).is_err(), "per project");
        let c = gate.admit("p2", None).expect("another project");
        assert!(gate.admit("p3", None).is_err(), "in all");
        drop(c);
        assert!(
            gate.admit("p3", None).is_ok(),
            "a finished delivery frees its place"
        );
    }
}
