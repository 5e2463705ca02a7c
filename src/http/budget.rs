//! One budget for every read of a mirror (tree, file, search, diff, metadata): a few
//! at once per user, answered `429` past that, and a bounded number in the whole
//! process, so reads never hold more of the blocking pool (which syncs use too) than
//! the operator allows. A pass is held by the blocking work itself, not by the
//! request: a client that hangs up does not give its place back before the work it
//! started has stopped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use std::collections::HashMap;
use std::sync::Mutex;

use super::error::ApiError;
use super::slots::{Slot, UserSlots};
use crate::mirror::read::ReadError;

/// How long a read waits for a place in the process-wide pool before it is refused.
/// Searches one user may have running at once; more get `429`.
const SEARCHES_PER_USER: usize = 2;

const POOL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct ReadBudget {
    users: Arc<UserSlots>,
    pool: Arc<Semaphore>,
    per_user: usize,
    pool_wait: Duration,
}

/// The right to run one read; given back when the work holding it ends.
#[derive(Debug)]
pub struct ReadPass {
    _slot: Slot,
    _permit: OwnedSemaphorePermit,
}

impl ReadBudget {
    pub fn new(per_user: usize, pool: usize) -> Self {
        let (per_user, pool) = (per_user.max(1), pool.max(1));
        Self {
            users: UserSlots::new(per_user, usize::MAX),
            pool: Arc::new(Semaphore::new(pool)),
            per_user,
            pool_wait: POOL_WAIT,
        }
    }

    /// The same budget, waiting `wait` for a place in the pool.
    pub fn waiting(self, wait: Duration) -> Self {
        Self {
            pool_wait: wait,
            ..self
        }
    }

    /// A pass for one read by `user`: refused at once when the user runs
    /// `per_user` reads already; otherwise waits (up to [`POOL_WAIT`] unless told
    /// otherwise) for a place in
    /// the process's pool.
    pub async fn enter(&self, user: &str) -> Result<ReadPass, ApiError> {
        let slot = self.users.take(user).map_err(|_| ApiError::Busy {
            message: format!(
                "you have {} reads running, the most one user may (HIVESYNC_READS_PER_USER); retry when one ends",
                self.per_user
            ),
            retry_after: Duration::from_secs(1),
        })?;
        let permit = tokio::time::timeout(self.pool_wait, Arc::clone(&self.pool).acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| ApiError::Busy {
                message: "the hub is running as many reads as it allows (HIVESYNC_READS_MAX); retry shortly".into(),
                retry_after: Duration::from_secs(1),
            })?;
        Ok(ReadPass {
            _slot: slot,
            _permit: permit,
        })
    }

    /// Reads running now, in the whole process.
    pub fn running(&self) -> usize {
        self.users.held()
    }
}

/// Runs `work` on the blocking pool holding `pass` until it returns, whether or not
/// anyone still waits for the answer.
pub async fn blocking<T, F>(pass: ReadPass, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ReadError> + Send + 'static,
{
    Ok(tokio::task::spawn_blocking(move || {
        let _pass = pass;
        work()
    })
    .await
    .map_err(|err| ApiError::Backend(Box::new(err)))??)
}

/// Searches running per user, so one user cannot take every core.
#[derive(Debug, Default)]
pub struct SearchSlots {
    running: Mutex<HashMap<String, usize>>,
}

/// One running search; its slot is given back when dropped.
#[derive(Debug)]
pub(super) struct SearchSlot<'a> {
    slots: &'a SearchSlots,
    user: String,
}

impl SearchSlots {
    pub(super) fn take(&self, user: &str) -> Option<SearchSlot<'_>> {
        let mut running = self
            .running
            .lock()
            .expect("search slots are never poisoned");
        let count = running.entry(user.to_owned()).or_default();
        if *count >= SEARCHES_PER_USER {
            return None;
        }
        *count += 1;
        Some(SearchSlot {
            slots: self,
            user: user.to_owned(),
        })
    }
}

impl Drop for SearchSlot<'_> {
    fn drop(&mut self) {
        let mut running = self
            .slots
            .running
            .lock()
            .expect("search slots are never poisoned");
        if let Some(count) = running.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_user_past_the_cap_is_refused_and_others_are_not() {
        let budget = ReadBudget::new(2, 8);
        let first = budget.enter("alice").await.expect("first");
        let _second = budget.enter("alice").await.expect("second");
        let refused = budget.enter("alice").await.expect_err("a third");
        assert_eq!(refused.code_and_status().0, "rate_limited");
        assert!(
            budget.enter("bob").await.is_ok(),
            "users do not share places"
        );
        drop(first);
        assert!(
            budget.enter("alice").await.is_ok(),
            "an ended read frees its place"
        );
    }

    #[tokio::test]
    async fn the_pool_bounds_the_process_and_a_pass_lives_as_long_as_its_work() {
        let budget = ReadBudget::new(4, 1).waiting(Duration::from_millis(50));
        let pass = budget.enter("alice").await.expect("first");
        let (started, release) = (
            Arc::new(std::sync::Barrier::new(2)),
            Arc::new(std::sync::Barrier::new(2)),
        );
        let work = {
            let (started, release) = (Arc::clone(&started), Arc::clone(&release));
            tokio::spawn(blocking(pass, move || {
                started.wait();
                release.wait();
                Ok(())
            }))
        };
        tokio::task::spawn_blocking({
            let started = Arc::clone(&started);
            move || started.wait()
        })
        .await
        .expect("joined");
        // the request that started the work is gone; the work is not: its place stays
        work.abort();
        assert_eq!(budget.running(), 1);
        let refused = budget.enter("bob").await.expect_err("the pool is full");
        assert_eq!(refused.code_and_status().1.as_u16(), 429);
        release.wait();
        until(|| budget.running() == 0).await;
        assert!(budget.enter("bob").await.is_ok());
    }

    async fn until(done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached in 5 s");
    }

    #[test]
    fn a_user_gets_a_few_searches_at_once_and_slots_come_back() {
        let slots = SearchSlots::default();
        let first = slots.take("alice").expect("first");
        let _second = slots.take("alice").expect("second");
        assert!(slots.take("alice").is_none(), "a third waits");
        assert!(slots.take("bob").is_some(), "users do not share slots");
        drop(first);
        assert!(
            slots.take("alice").is_some(),
            "a finished search frees its slot"
        );
    }
}
