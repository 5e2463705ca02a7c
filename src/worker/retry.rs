//! The retry policy of a failing sync: which failures are tried again, the schedule
//! (immediate, then `base`, then doubling, with jitter), and the loop that drives the
//! attempts of one job through the [`Attempts`] it is given. Pure policy: it knows no
//! worker or store, only the error and outcome types it passes along. Tested on
//! tokio's paused time.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::{jitter_fraction, nth_wait};
use crate::engine::EngineError;
use crate::mirror::{MirrorError, SyncOutcome};

/// Network failures are worth another attempt; the others fail the same way again.
pub(super) fn is_retryable(err: &MirrorError) -> bool {
    matches!(err, MirrorError::Network(_)) && !err.is_out_of_space()
}

/// How one attempt ended.
pub(super) enum AttemptEnd {
    Done(SyncOutcome),
    Failed(MirrorError),
    Released,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct RetryPolicy {
    pub base: Duration,
    pub max: u32,
    /// the sync's deadline: a wait that would end past it fails the sync at once
    pub deadline: tokio::time::Instant,
}

/// The attempts of one job, as [`retry_loop`] drives them.
pub(super) trait Attempts {
    /// Runs attempt `number` (from 1).
    async fn attempt(&mut self, number: u32) -> Result<AttemptEnd, EngineError>;
    /// Attempt `number` failed and the next starts after `wait`.
    async fn before_wait(
        &mut self,
        number: u32,
        wait: Duration,
        err: &MirrorError,
    ) -> Result<(), EngineError>;
}

/// Runs attempts until one ends other than in a retryable failure, or they run out:
/// network failures are tried again after [`retry_delay`], with the wait announced
/// first. Interrupted while waiting, the job is released. Returns how it ended and
/// after how many attempts.
pub(super) async fn retry_loop(
    attempts: &mut impl Attempts,
    policy: RetryPolicy,
    interrupt: &CancellationToken,
) -> Result<(AttemptEnd, u32), EngineError> {
    let mut number = 0;
    loop {
        number += 1;
        match attempts.attempt(number).await? {
            AttemptEnd::Failed(err) if is_retryable(&err) && number < policy.max => {
                let wait = retry_delay(number, policy.base, jitter_fraction());
                if tokio::time::Instant::now() + wait >= policy.deadline {
                    // the sync's time would run out during the wait: fail it now
                    return Ok((
                        AttemptEnd::Failed(MirrorError::TimedOut(format!(
                            "the sync would run past HIVESYNC_SYNC_TIMEOUT_S before its next attempt ({err})"
                        ))),
                        number,
                    ));
                }
                attempts.before_wait(number, wait, &err).await?;
                tokio::select! {
                    _ = interrupt.cancelled() => return Ok((AttemptEnd::Released, number)),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            end => return Ok((end, number)),
        }
    }
}

/// The wait before attempt `failed_attempt + 1`: the first retry is immediate, the
/// second waits `base`, then the wait doubles; `jitter` in [0, 1) adds up to half again.
pub fn retry_delay(failed_attempt: u32, base: Duration, jitter: f64) -> Duration {
    if failed_attempt <= 1 {
        return Duration::ZERO;
    }
    nth_wait(failed_attempt - 2, base, jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attempts that fail with `failure` every time, noting when each started.
    struct Failing {
        started: Vec<tokio::time::Instant>,
        announced: Vec<(u32, Duration)>,
        failure: fn() -> MirrorError,
    }

    impl Failing {
        fn new(failure: fn() -> MirrorError) -> Self {
            Self {
                started: Vec::new(),
                announced: Vec::new(),
                failure,
            }
        }

        fn gaps(&self) -> Vec<Duration> {
            self.started.windows(2).map(|w| w[1] - w[0]).collect()
        }
    }

    impl Attempts for Failing {
        async fn attempt(&mut self, _number: u32) -> Result<AttemptEnd, EngineError> {
            self.started.push(tokio::time::Instant::now());
            Ok(AttemptEnd::Failed((self.failure)()))
        }

        async fn before_wait(
            &mut self,
            number: u32,
            wait: Duration,
            _err: &MirrorError,
        ) -> Result<(), EngineError> {
            self.announced.push((number, wait));
            Ok(())
        }
    }

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
    }

    /// One deadline for the whole sync: a wait that would cross it ends the sync with
    /// a timeout at once instead of sleeping into it.
    #[tokio::test(start_paused = true)]
    async fn a_retry_wait_that_would_cross_the_deadline_fails_the_sync_at_once() {
        let started = tokio::time::Instant::now();
        let mut attempts = Failing::new(network);
        let (end, count) = retry_loop(
            &mut attempts,
            RetryPolicy {
                base: Duration::from_secs(30),
                max: 5,
                deadline: started + Duration::from_secs(60),
            },
            &CancellationToken::new(),
        )
        .await
        .expect("no engine error");
        assert!(matches!(end, AttemptEnd::Failed(MirrorError::TimedOut(_))));
        // attempt 1, immediate retry 2, a 30–45 s wait, attempt 3; the next wait
        // (60–90 s) would end past the deadline
        assert_eq!(count, 3);
        assert!(
            tokio::time::Instant::now() - started < Duration::from_secs(60),
            "it did not sleep into the deadline"
        );
    }

    fn network() -> MirrorError {
        MirrorError::Network(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
    }

    fn refused() -> MirrorError {
        MirrorError::AuthFailed(Box::new(std::io::Error::from(
            std::io::ErrorKind::PermissionDenied,
        )))
    }

    /// The real loop on paused time: the waits it sleeps are the announced ones and
    /// follow immediate, base, doubling (+ up to half again of jitter).
    #[tokio::test(start_paused = true)]
    async fn network_failures_are_retried_on_schedule_in_paused_time() {
        let base = Duration::from_secs(30);
        let mut attempts = Failing::new(network);
        let (end, count) = retry_loop(
            &mut attempts,
            RetryPolicy {
                base,
                max: 5,
                deadline: far(),
            },
            &CancellationToken::new(),
        )
        .await
        .expect("no engine error");
        assert!(matches!(end, AttemptEnd::Failed(MirrorError::Network(_))));
        assert_eq!(count, 5, "HIVESYNC_RETRY_MAX attempts in all");
        let gaps = attempts.gaps();
        assert_eq!(gaps.len(), 4);
        let announced: Vec<Duration> = attempts.announced.iter().map(|(_, wait)| *wait).collect();
        for (gap, wait) in gaps.iter().zip(&announced) {
            // tokio's timer has millisecond resolution
            assert!(
                *gap >= *wait && *gap - *wait <= Duration::from_millis(1),
                "slept {gap:?} for an announced {wait:?}"
            );
        }
        assert_eq!(gaps[0], Duration::ZERO, "the first retry is immediate");
        for (gap, nominal) in gaps[1..].iter().zip([base, base * 2, base * 4]) {
            assert!(
                *gap >= nominal && *gap <= nominal + nominal / 2,
                "{gap:?} not within jitter of {nominal:?}"
            );
        }
        assert_eq!(
            attempts
                .announced
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_credentials_are_not_retried() {
        let mut attempts = Failing::new(refused);
        let (end, count) = retry_loop(
            &mut attempts,
            RetryPolicy {
                base: Duration::from_secs(30),
                max: 5,
                deadline: far(),
            },
            &CancellationToken::new(),
        )
        .await
        .expect("no engine error");
        assert!(matches!(
            end,
            AttemptEnd::Failed(MirrorError::AuthFailed(_))
        ));
        assert_eq!(count, 1);
        assert!(attempts.announced.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_interrupt_during_a_wait_releases_the_job() {
        let interrupt = CancellationToken::new();
        let mut attempts = Failing::new(network);
        let stopper = interrupt.clone();
        tokio::spawn(async move {
            // after the immediate retry, during the 30 s wait before the third attempt
            tokio::time::sleep(Duration::from_secs(10)).await;
            stopper.cancel();
        });
        let (end, count) = retry_loop(
            &mut attempts,
            RetryPolicy {
                base: Duration::from_secs(30),
                max: 5,
                deadline: far(),
            },
            &interrupt,
        )
        .await
        .expect("no engine error");
        assert!(matches!(end, AttemptEnd::Released));
        assert_eq!(count, 2);
    }

    #[test]
    fn retries_are_immediate_then_base_then_doubling() {
        let base = Duration::from_millis(30_000);
        assert_eq!(retry_delay(1, base, 0.0), Duration::ZERO);
        assert_eq!(retry_delay(2, base, 0.0), base);
        assert_eq!(retry_delay(3, base, 0.0), base * 2);
        assert_eq!(retry_delay(4, base, 0.0), base * 4);
        assert_eq!(
            retry_delay(3, base, 1.0),
            base * 3,
            "jitter adds at most half"
        );
    }
}
