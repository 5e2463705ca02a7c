//! Pure domain rules: validated identifiers and repo URLs, the per-user rate limit, and
//! time formatting. No IO here, so every rule is unit- and property-tested in isolation.

mod host;
mod ids;
mod rate;
mod repo_path;
pub mod repo_url;
mod scope;
pub mod webhook;

pub use host::{Host, HostError, is_public};
pub use ids::{InvalidId, ProjectId, SyncId, partition_byte};
pub use rate::{RateLimiter, parse_rate};
pub use repo_path::{RepoPath, RepoPathError};
pub use repo_url::{RepoUrl, RepoUrlError, UrlPolicy};
pub use scope::{CredentialScopes, ScopeError, ScopeRefusal};

/// Current wall-clock time as the contract's RFC 3339 UTC timestamp.
pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

pub fn format_rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("every UTC timestamp formats as RFC 3339")
}

/// Milliseconds since the Unix epoch, now.
pub fn now_epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or(0)
}

/// An epoch time in ms as RFC 3339.
pub fn format_epoch_ms(ms: u64) -> String {
    let at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(ms as i64);
    format_rfc3339(at)
}

/// Milliseconds between two RFC 3339 timestamps written by [`now_rfc3339`]; `None` if
/// either does not parse (which only happens to records written by hand).
pub fn millis_between(start: &str, end: &str) -> Option<u64> {
    use time::format_description::well_known::Rfc3339;
    let start = time::OffsetDateTime::parse(start, &Rfc3339).ok()?;
    let end = time::OffsetDateTime::parse(end, &Rfc3339).ok()?;
    u64::try_from((end - start).whole_milliseconds()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_come_from_timestamps() {
        assert_eq!(
            millis_between("2026-01-01T00:00:00Z", "2026-01-01T00:00:01.5Z"),
            Some(1500)
        );
        assert_eq!(millis_between("garbage", "2026-01-01T00:00:01Z"), None);
        assert!(millis_between(&now_rfc3339(), &now_rfc3339()).is_some());
    }
}
