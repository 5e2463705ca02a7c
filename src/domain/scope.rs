//! Who may use which credential, and towards which hosts: the policy an operator writes
//! in the file `HIVESYNC_CREDENTIAL_SCOPES`. Pure: reading the file is the caller's.
//!
//! ```json
//! {
//!   "deploy-key": {"owners": ["alice", "team-a/*"], "hosts": ["github.com"]},
//!   "org-token":  {"owners": ["*"], "hosts": ["git.example.com", "*.example.com"]}
//! }
//! ```
//!
//! A credential the policy does not name is usable by no one. `owners` lists user ids
//! (a trailing `*` matches any id with that prefix; `*` alone anyone); `hosts`, when
//! given, the hosts the secret may be sent to (exact, or `*.domain` for any name under
//! the domain), compared case-insensitively without port.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scope {
    owners: Vec<String>,
    #[serde(default)]
    hosts: Option<Vec<String>>,
}

/// The parsed policy.
#[derive(Debug, Clone, Default)]
pub struct CredentialScopes {
    scopes: HashMap<String, Scope>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    #[error("the credential scopes are not valid JSON of the documented shape: {0}")]
    Malformed(String),
    #[error("credential '{credential}' lists no owners, so no one may use it")]
    NoOwners { credential: String },
}

/// Why a credential may not be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ScopeRefusal {
    #[error("credential '{0}' may not be used by this user")]
    Owner(String),
    #[error("credential '{credential}' may not be sent to {host}")]
    Host { credential: String, host: String },
}

impl CredentialScopes {
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        let scopes: HashMap<String, Scope> =
            serde_json::from_str(text).map_err(|err| ScopeError::Malformed(err.to_string()))?;
        if let Some((credential, _)) = scopes.iter().find(|(_, scope)| scope.owners.is_empty()) {
            return Err(ScopeError::NoOwners {
                credential: credential.clone(),
            });
        }
        Ok(Self { scopes })
    }

    /// Whether `owner` may use `credential` to reach `host`.
    pub fn check(&self, credential: &str, owner: &str, host: &str) -> Result<(), ScopeRefusal> {
        let Some(scope) = self.scopes.get(credential) else {
            return Err(ScopeRefusal::Owner(credential.to_owned()));
        };
        if !scope
            .owners
            .iter()
            .any(|pattern| owner_matches(pattern, owner))
        {
            return Err(ScopeRefusal::Owner(credential.to_owned()));
        }
        let host = normalize_host(host);
        if let Some(hosts) = &scope.hosts
            && !hosts.iter().any(|pattern| host_matches(pattern, &host))
        {
            return Err(ScopeRefusal::Host {
                credential: credential.to_owned(),
                host,
            });
        }
        Ok(())
    }
}

fn owner_matches(pattern: &str, owner: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => owner.starts_with(prefix),
        None => pattern == owner,
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = normalize_host(pattern);
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CredentialScopes {
        CredentialScopes::parse(
            r#"{
                "deploy-key": {"owners": ["alice", "team-a/*"], "hosts": ["GitHub.com", "*.example.com"]},
                "anywhere": {"owners": ["*"]}
            }"#,
        )
        .expect("valid policy")
    }

    #[test]
    fn owners_are_matched_exactly_or_by_prefix() {
        let scopes = policy();
        assert_eq!(scopes.check("deploy-key", "alice", "github.com"), Ok(()));
        assert_eq!(
            scopes.check("deploy-key", "team-a/bob", "github.com"),
            Ok(())
        );
        for stranger in ["mallory", "alicex", "team-b/eve", ""] {
            assert_eq!(
                scopes.check("deploy-key", stranger, "github.com"),
                Err(ScopeRefusal::Owner("deploy-key".into())),
                "{stranger}"
            );
        }
        assert_eq!(scopes.check("anywhere", "mallory", "evil.test"), Ok(()));
    }

    #[test]
    fn hosts_are_matched_exactly_or_under_a_domain() {
        let scopes = policy();
        for allowed in [
            "github.com",
            "GITHUB.COM.",
            "git.example.com",
            "a.b.example.com",
        ] {
            assert_eq!(
                scopes.check("deploy-key", "alice", allowed),
                Ok(()),
                "{allowed}"
            );
        }
        for refused in [
            "example.com",
            "evilexample.com",
            "github.com.evil.test",
            "127.0.0.1",
        ] {
            assert!(
                matches!(
                    scopes.check("deploy-key", "alice", refused),
                    Err(ScopeRefusal::Host { .. })
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn an_unnamed_credential_is_usable_by_no_one() {
        assert_eq!(
            policy().check("other", "alice", "github.com"),
            Err(ScopeRefusal::Owner("other".into()))
        );
        assert!(
            CredentialScopes::default()
                .check("deploy-key", "alice", "github.com")
                .is_err()
        );
    }

    #[test]
    fn malformed_policies_are_refused() {
        assert!(CredentialScopes::parse("[]").is_err());
        assert!(CredentialScopes::parse(r#"{"k": {"owners": []}}"#).is_err());
        assert!(CredentialScopes::parse(r#"{"k": {"owners": ["a"], "typo": 1}}"#).is_err());
    }
}
