//! The one exponential backoff: reconnect loops, engine writes retried while Redis is
//! down, and the retry schedule of failed syncs all wait by it. Pure: it computes
//! waits, the caller sleeps.

use std::time::Duration;

/// Waits that start at `first`, double after each use, and stop growing at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first.min(max),
        }
    }

    /// The wait to use now; the one after is twice as long (up to `max`).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// The wait [`Backoff::next_wait`] will return, without using it.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Back to the first wait, after a success.
    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

/// The `n`-th wait (from 0) of a backoff starting at `base` with no ceiling below
/// 2^16 × `base`, plus `jitter` in [0, 1) × half of it, so retries of many clients
/// spread out.
pub fn nth_wait(n: u32, base: Duration, jitter: f64) -> Duration {
    let nominal = base.saturating_mul(2u32.saturating_pow(n.min(16)));
    nominal + nominal.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// A fraction in [0, 1) from the OS's randomness, for jitter (0.5 if it is unavailable).
pub fn jitter_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_ceiling_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let waits: Vec<u64> = (0..5)
            .map(|_| backoff.next_wait().as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![50, 100, 200, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.peek(), Duration::from_millis(50));
    }

    #[test]
    fn nth_wait_doubles_and_jitter_adds_at_most_half() {
        let base = Duration::from_secs(30);
        assert_eq!(nth_wait(0, base, 0.0), base);
        assert_eq!(nth_wait(2, base, 0.0), base * 4);
        assert_eq!(nth_wait(1, base, 1.0), base * 3);
        assert!(nth_wait(40, base, 0.0) > base);
    }

    #[test]
    fn jitter_is_a_fraction() {
        for _ in 0..100 {
            let jitter = jitter_fraction();
            assert!((0.0..1.0).contains(&jitter));
        }
    }
}
