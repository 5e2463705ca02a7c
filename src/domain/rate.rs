//! Per-user rate limit as a GCRA (generic cell rate algorithm): one timestamp per user,
//! smooth refill, and an exact `Retry-After` for a refused request.

use std::collections::HashMap;
use std::time::Duration;

/// `limit` requests per `period`, with bursts up to `limit`.
#[derive(Debug)]
pub struct RateLimiter {
    emission_interval: Duration,
    burst_tolerance: Duration,
    /// theoretical arrival time per key, as an offset from the limiter's epoch
    tat: HashMap<String, Duration>,
    /// keys held when the map is next swept of keys whose time has passed
    sweep_at: usize,
}

/// The smallest map that is swept: a sweep costs a pass over it, so it waits until the
/// map has doubled since the last one (amortized O(1) per request).
const MIN_SWEEP: usize = 1024;

impl RateLimiter {
    pub fn new(limit: u32, period: Duration) -> Self {
        let limit = limit.max(1);
        let emission_interval = period / limit;
        Self {
            emission_interval,
            burst_tolerance: emission_interval * (limit - 1),
            tat: HashMap::new(),
            sweep_at: MIN_SWEEP,
        }
    }

    /// Keys remembered now: those whose last requests still count against them.
    pub fn tracked(&self) -> usize {
        self.tat.len()
    }

    /// Accounts one request of `key` at `now` (time since any fixed epoch). `Ok` if
    /// allowed, else the time to wait before a request would be.
    pub fn check(&mut self, key: &str, now: Duration) -> Result<(), Duration> {
        self.check_within(key, now, self.burst_tolerance)
    }

    /// Whether a request of `key` at `now` would be allowed, without accounting it.
    pub fn peek(&self, key: &str, now: Duration) -> Result<(), Duration> {
        let tat = self.tat.get(key).copied().unwrap_or(now).max(now);
        let allow_at = tat.saturating_sub(self.burst_tolerance);
        if now < allow_at {
            Err(allow_at - now)
        } else {
            Ok(())
        }
    }

    /// [`RateLimiter::check`] for a request that may use only the first half of the
    /// burst: what runs unattended (schedules, webhooks) leaves the rest of a budget to
    /// the people pressing Sync.
    pub fn check_background(&mut self, key: &str, now: Duration) -> Result<(), Duration> {
        self.check_within(key, now, self.burst_tolerance / 2)
    }

    fn check_within(
        &mut self,
        key: &str,
        now: Duration,
        tolerance: Duration,
    ) -> Result<(), Duration> {
        let tat = self.tat.get(key).copied().unwrap_or(now).max(now);
        let allow_at = tat.saturating_sub(tolerance);
        if now < allow_at {
            return Err(allow_at - now);
        }
        self.tat
            .insert(key.to_owned(), tat + self.emission_interval);
        if self.tat.len() >= self.sweep_at {
            // a key whose time has come is as if it had never been seen: forgetting it
            // changes no answer, and keeps the map to the keys active within a period
            self.tat.retain(|_, tat| *tat > now);
            self.sweep_at = (self.tat.len() * 2).max(MIN_SWEEP);
        }
        Ok(())
    }
}

/// Parses `30/min`, `5/s`, `100/hour` or a bare count (per minute).
pub fn parse_rate(spec: &str) -> Option<(u32, Duration)> {
    let (count, unit) = spec.split_once('/').unwrap_or((spec, "min"));
    let count: u32 = count.trim().parse().ok().filter(|c| *c > 0)?;
    let period = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some((count, period))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refuses_with_exact_wait() {
        let mut limiter = RateLimiter::new(3, Duration::from_secs(60));
        let now = Duration::from_secs(1000);
        for _ in 0..3 {
            assert!(limiter.check("u", now).is_ok());
        }
        let wait = limiter
            .check("u", now)
            .expect_err("fourth request in a burst");
        assert_eq!(wait, Duration::from_secs(20));
        assert!(limiter.check("u", now + wait).is_ok());
        assert!(limiter.check("other", now).is_ok(), "keys are independent");
    }

    #[test]
    fn keys_whose_time_has_passed_are_forgotten() {
        let mut limiter = RateLimiter::new(2, Duration::from_secs(1));
        // a new key every millisecond for 100 s: each is done with after half a second
        for n in 0..100_000u64 {
            let now = Duration::from_millis(n);
            assert!(limiter.check(&format!("user-{n}"), now).is_ok());
        }
        assert!(
            limiter.tracked() <= 2 * MIN_SWEEP,
            "{} keys remembered",
            limiter.tracked()
        );
        // the answers are those of a limiter that remembers everything
        let now = Duration::from_millis(100_000);
        assert!(limiter.check("user-99999", now).is_ok());
        assert!(limiter.check("user-99999", now).is_err());
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("30/min"), Some((30, Duration::from_secs(60))));
        assert_eq!(parse_rate("5/s"), Some((5, Duration::from_secs(1))));
        assert_eq!(parse_rate("12"), Some((12, Duration::from_secs(60))));
        assert_eq!(parse_rate("0/min"), None);
        assert_eq!(parse_rate("3/fortnight"), None);
    }
}
