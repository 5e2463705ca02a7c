//! A repo URL accepted at registration: scheme on the allow-list, host not in a private
//! range unless allowed (SSRF guard), and a redacted form that never shows userinfo.

use std::net::IpAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RepoUrlError {
    #[error("repo_url is not a valid git URL")]
    Unparseable,
    #[error("repo_url scheme '{0}' is not allowed (allowed: {1})")]
    SchemeNotAllowed(String, String),
    #[error("repo_url names a loopback or private-range host, which this hub refuses")]
    PrivateHost,
    #[error("repo_url has no host")]
    MissingHost,
}

/// What registration accepts; built from `HIVESYNC_ALLOWED_SCHEMES` and
/// `HIVESYNC_ALLOW_PRIVATE_HOSTS`.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    pub allowed_schemes: Vec<String>,
    pub allow_private_hosts: bool,
}

/// A validated repo URL. `Debug` and `Display` show the redacted form only, so the
/// secret-bearing form can't leak through a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl {
    full: String,
    redacted: String,
}

impl RepoUrl {
    pub fn parse(input: &str, policy: &UrlPolicy) -> Result<Self, RepoUrlError> {
        let input = input.trim();
        if input.is_empty() || input.len() > 4096 || input.contains(['\0', '\n', '\r']) {
            return Err(RepoUrlError::Unparseable);
        }
        let url = gix::url::parse(input.as_bytes()).map_err(|_| RepoUrlError::Unparseable)?;
        let scheme = url.scheme.as_str().to_owned();
        if !policy.allowed_schemes.contains(&scheme) {
            return Err(RepoUrlError::SchemeNotAllowed(
                scheme,
                policy.allowed_schemes.join(","),
            ));
        }
        if url.scheme != gix::url::Scheme::File {
            let host = url.host().ok_or(RepoUrlError::MissingHost)?;
            if !policy.allow_private_hosts && is_private_host(host) {
                return Err(RepoUrlError::PrivateHost);
            }
        }
        let mut shown = url.clone();
        shown.set_user(None);
        shown.set_password(None);
        Ok(Self {
            full: input.to_owned(),
            redacted: shown.to_bstring().to_string(),
        })
    }

    /// Rebuilds a URL that was validated before (read back from the store). The policy
    /// is not applied again: it governs registration, not existing projects.
    pub fn from_stored(full: String) -> Result<Self, RepoUrlError> {
        let url = gix::url::parse(full.as_bytes()).map_err(|_| RepoUrlError::Unparseable)?;
        let mut shown = url;
        shown.set_user(None);
        shown.set_password(None);
        Ok(Self {
            redacted: shown.to_bstring().to_string(),
            full,
        })
    }

    /// The form to connect with. Never log, return or publish it.
    pub fn expose_secret(&self) -> &str {
        &self.full
    }

    /// The form to show anyone: no userinfo.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// `text` with every trace of this URL's credentials removed: the full URL becomes
    /// the redacted one, and the password and user alone become `***`. For messages of
    /// libraries that may quote the URL they were given.
    pub fn scrub(&self, text: &str) -> String {
        let mut scrubbed = text.replace(&self.full, &self.redacted);
        if let Ok(url) = gix::url::parse(self.full.as_bytes()) {
            for secret in [url.password(), url.user()].into_iter().flatten() {
                // short user names like "git" are not secrets and would mangle text
                if secret.len() >= 4 {
                    scrubbed = scrubbed.replace(secret, "***");
                }
            }
        }
        scrubbed
    }
}

impl std::fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RepoUrl").field(&self.redacted).finish()
    }
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// Loopback, private, link-local, unspecified and similar addresses, and names that
/// always resolve to them. Only the spelling is checked here: a name that resolves to
/// such an address is not caught by this check.
fn is_private_host(host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.');
    let lowered = host.to_ascii_lowercase();
    if lowered == "localhost" || lowered.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // 100.64.0.0/10, carrier-grade NAT
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        Ok(IpAddr::V6(v6)) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private_host(&v4.to_string());
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(schemes: &[&str], private: bool) -> UrlPolicy {
        UrlPolicy {
            allowed_schemes: schemes.iter().map(|s| s.to_string()).collect(),
            allow_private_hosts: private,
        }
    }

    #[test]
    fn userinfo_is_never_shown() {
        let url = RepoUrl::parse(
            "https://bob:s3cret@example.com/org/repo.git",
            &policy(&["https"], false),
        )
        .expect("valid");
        assert_eq!(url.redacted(), "https://example.com/org/repo.git");
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        assert!(url.expose_secret().contains("s3cret"));
    }

    #[test]
    fn scrub_removes_credentials_from_quoted_text() {
        let url = RepoUrl::parse(
            "https://deploy:tok3n-s3cret@example.com/r.git",
            &policy(&["https"], false),
        )
        .expect("valid");
        let message = "could not connect to https://deploy:tok3n-s3cret@example.com/r.git (auth tok3n-s3cret)";
        let scrubbed = url.scrub(message);
        assert!(!scrubbed.contains("tok3n-s3cret"), "{scrubbed}");
        assert!(scrubbed.contains("https://example.com/r.git"));
    }

    #[test]
    fn scp_like_ssh_urls_are_ssh() {
        let url = RepoUrl::parse("git@example.com:org/repo.git", &policy(&["ssh"], false))
            .expect("valid");
        assert!(!url.redacted().contains("git@"));
    }

    #[test]
    fn schemes_outside_the_allow_list_are_refused() {
        let default = policy(&["https", "ssh"], false);
        for refused in [
            "file:///etc",
            "/tmp/repo",
            "git://example.com/r",
            "http://example.com/r",
            "ext::sh -c id",
        ] {
            assert!(
                matches!(
                    RepoUrl::parse(refused, &default),
                    Err(RepoUrlError::SchemeNotAllowed(..)) | Err(RepoUrlError::Unparseable)
                ),
                "{refused} must be refused"
            );
        }
        assert!(RepoUrl::parse("file:///tmp/repo", &policy(&["file"], false)).is_ok());
    }

    #[test]
    fn private_hosts_are_refused_unless_allowed() {
        let strict = policy(&["https", "ssh"], false);
        for host in [
            "127.0.0.1",
            "localhost",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "[::1]",
            "[fd00::1]",
            "0.0.0.0",
        ] {
            let url = format!("https://{host}/repo.git");
            assert_eq!(
                RepoUrl::parse(&url, &strict),
                Err(RepoUrlError::PrivateHost),
                "{url}"
            );
        }
        assert!(RepoUrl::parse("https://127.0.0.1/repo.git", &policy(&["https"], true)).is_ok());
        assert!(RepoUrl::parse("https://8.8.8.8/repo.git", &strict).is_ok());
    }

    proptest! {
        #[test]
        fn redacted_form_never_carries_the_password(user in "[a-z]{1,8}", password in "[A-Za-z0-9]{12,20}") {
            let input = format!("https://{user}:{password}@example.com/r.git");
            let url = RepoUrl::parse(&input, &policy(&["https"], false)).expect("valid");
            prop_assert!(!url.redacted().contains(&password));
        }
    }
}
