//! A repo URL accepted at registration: scheme on the allow-list, host not in a private
//! range unless allowed (SSRF guard), and a redacted form that never shows userinfo.

use super::host::Host;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RepoUrlError {
    #[error("repo_url is not a valid git URL")]
    Unparseable,
    #[error(
        "repo_url scheme '{0}' is not allowed on this hub (allowed: {1}); the operator can allow more with HIVESYNC_ALLOWED_SCHEMES"
    )]
    SchemeNotAllowed(String, String),
    #[error(
        "repo_url names a loopback or private-range host, which this hub refuses; an operator who means to mirror from the hub's own network sets HIVESYNC_ALLOW_PRIVATE_HOSTS=1"
    )]
    PrivateHost,
    #[error("repo_url has no host")]
    MissingHost,
    #[error("a file repo_url must be absolute and written as one: file:///path/to/repo")]
    RelativeFilePath,
    #[error("repo_url's host is not a valid host name or address")]
    InvalidHost,
    #[error(
        "a file repo_url must name an existing directory under one of the roots this hub allows (HIVESYNC_FILE_ROOTS), outside its data directory"
    )]
    FileOutsideRoots,
    #[error(
        "repo_url carries credentials, which this hub does not store; put the token in a credential (HIVESYNC_SECRETS_DIR/<name>) and name it in \"credential\""
    )]
    CredentialsInUrl,
}

/// What registration accepts; built from `HIVESYNC_ALLOWED_SCHEMES` and
/// `HIVESYNC_ALLOW_PRIVATE_HOSTS`.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    pub allowed_schemes: Vec<String>,
    pub allow_private_hosts: bool,
    /// where `file` URLs may point ([`FileRoots`])
    pub file_roots: FileRoots,
}

/// The directories `file` repo URLs may name (`HIVESYNC_FILE_ROOTS`), and the data
/// directory they never may: checked on the path with every symlink resolved, at
/// registration and again before every sync (a link may be swapped in between).
#[derive(Debug, Clone, Default)]
pub struct FileRoots {
    pub roots: Vec<std::path::PathBuf>,
    pub data_dir: std::path::PathBuf,
}

/// `path` with every symlink of its longest existing ancestor resolved and the
/// components below that appended (they do not exist, so they are no links).
fn resolve_existing(path: &std::path::Path) -> Option<std::path::PathBuf> {
    let mut missing = Vec::new();
    let mut existing = path;
    loop {
        if let Ok(resolved) = existing.canonicalize() {
            return Some(
                missing
                    .iter()
                    .rev()
                    .fold(resolved, |path, part| path.join(part)),
            );
        }
        missing.push(existing.file_name()?);
        existing = existing.parent()?;
    }
}

impl FileRoots {
    /// `Ok` when `path`, its symlinks resolved, lies under a root and outside the
    /// data directory. A path not there yet (a remote made later) is judged by its
    /// longest existing ancestor, resolved, with the rest appended; `..` is refused.
    pub fn check(&self, path: &std::path::Path) -> Result<(), RepoUrlError> {
        let refused = RepoUrlError::FileOutsideRoots;
        if path
            .components()
            .any(|part| matches!(part, std::path::Component::ParentDir))
        {
            return Err(refused);
        }
        let resolved = resolve_existing(path).ok_or(RepoUrlError::FileOutsideRoots)?;
        // a data directory that does not exist yet holds nothing to protect
        if let Some(data) = resolve_existing(&self.data_dir)
            && resolved.starts_with(&data)
        {
            return Err(refused);
        }
        let under_a_root = self.roots.iter().any(|root| {
            root.canonicalize()
                .is_ok_and(|root| resolved.starts_with(root))
        });
        if under_a_root { Ok(()) } else { Err(refused) }
    }

    /// [`FileRoots::check`] for the path of a `file` URL (other URLs pass).
    pub fn check_url(&self, url: &str) -> Result<(), RepoUrlError> {
        let parsed = gix::url::parse(url.as_bytes()).map_err(|_| RepoUrlError::Unparseable)?;
        self.check_parsed(&parsed)
    }

    /// [`FileRoots::check_url`] for a URL already validated (a stored project's).
    pub fn check_repo_url(&self, url: &RepoUrl) -> Result<(), RepoUrlError> {
        self.check_parsed(url.parsed())
    }

    fn check_parsed(&self, parsed: &gix::Url) -> Result<(), RepoUrlError> {
        if parsed.scheme != gix::url::Scheme::File {
            return Ok(());
        }
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&parsed.path));
        self.check(path)
    }
}

/// A validated repo URL. `Debug` and `Display` show the redacted form only, so the
/// secret-bearing form can't leak through a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl {
    full: String,
    redacted: String,
    /// `full` parsed, kept so that no caller parses it again
    parsed: gix::Url,
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
        // a bare path parses as a file URL too; relative, it would name a directory
        // relative to wherever the worker happens to run
        if url.scheme == gix::url::Scheme::File
            && (!input.starts_with("file:///") || !url.path.starts_with(b"/"))
        {
            return Err(RepoUrlError::RelativeFilePath);
        }
        if url.scheme == gix::url::Scheme::File {
            policy.file_roots.check_url(input)?;
        }
        if url.scheme != gix::url::Scheme::File {
            let host = url.host().ok_or(RepoUrlError::MissingHost)?;
            let host = Host::parse(host).map_err(|_| RepoUrlError::InvalidHost)?;
            if !policy.allow_private_hosts && host.is_private() {
                return Err(RepoUrlError::PrivateHost);
            }
        }
        // a secret at rest in plain text is a secret waiting to leak: over http(s) any
        // userinfo may be a token; ssh's user name (`git@`) is not a secret
        let is_http = matches!(url.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https);
        if url.password().is_some() || (is_http && url.user().is_some()) {
            return Err(RepoUrlError::CredentialsInUrl);
        }
        Ok(Self::from_parsed(input.to_owned(), url))
    }

    fn from_parsed(full: String, parsed: gix::Url) -> Self {
        let mut shown = parsed.clone();
        shown.set_user(None);
        shown.set_password(None);
        Self {
            full,
            redacted: shown.to_bstring().to_string(),
            parsed,
        }
    }

    /// Rebuilds a URL that was validated before (read back from the store). The policy
    /// is not applied again: it governs registration, not existing projects.
    pub fn from_stored(full: String) -> Result<Self, RepoUrlError> {
        let url = gix::url::parse(full.as_bytes()).map_err(|_| RepoUrlError::Unparseable)?;
        Ok(Self::from_parsed(full, url))
    }

    /// The host to connect to, as written (lowercase; no brackets, userinfo or port);
    /// `None` for URLs without one (`file://`).
    pub fn host(&self) -> Option<String> {
        self.parsed.host().map(|host| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        })
    }

    /// The URL as gitoxide parsed it: scheme, host and port as written. It holds the
    /// credentials too: never log it.
    pub fn parsed(&self) -> &gix::Url {
        &self.parsed
    }

    pub fn scheme(&self) -> &gix::url::Scheme {
        &self.parsed.scheme
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
        for secret in [self.parsed.password(), self.parsed.user()]
            .into_iter()
            .flatten()
        {
            // short user names like "git" are not secrets and would mangle text
            if secret.len() >= 4 {
                scrubbed = scrubbed.replace(secret, "***");
            }
        }
        scrubbed
    }
}

/// A [`RepoUrl`] (de)serialized in its full form, for the store's records only
/// (`#[serde(with = "crate::domain::repo_url::stored")]`): what goes to a client is the
/// redacted form, written by hand. Reading back rebuilds the URL as
/// [`RepoUrl::from_stored`] does, so a stored record that holds one holds a URL.
pub mod stored {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::RepoUrl;

    pub fn serialize<S: Serializer>(url: &RepoUrl, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(url.expose_secret())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<RepoUrl, D::Error> {
        let full = String::deserialize(deserializer)?;
        RepoUrl::from_stored(full).map_err(serde::de::Error::custom)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(schemes: &[&str], private: bool) -> UrlPolicy {
        UrlPolicy {
            allowed_schemes: schemes.iter().map(|s| s.to_string()).collect(),
            allow_private_hosts: private,
            file_roots: FileRoots {
                roots: vec![std::env::temp_dir()],
                data_dir: "/nonexistent-data-dir".into(),
            },
        }
    }

    fn file_url(path: &std::path::Path) -> String {
        format!("file://{}", path.display())
    }

    #[test]
    fn file_urls_must_resolve_under_a_root_and_outside_the_data_dir() {
        let root = tempfile::tempdir().expect("temp dir");
        let repo = root.path().join("repo");
        let data = root.path().join("data");
        let other = data.join("git").join("bob.git");
        std::fs::create_dir_all(&repo).expect("mkdir");
        std::fs::create_dir_all(&other).expect("mkdir");
        let policy = UrlPolicy {
            allowed_schemes: vec!["file".into()],
            allow_private_hosts: false,
            file_roots: FileRoots {
                roots: vec![root.path().to_path_buf()],
                data_dir: data.clone(),
            },
        };
        assert!(RepoUrl::parse(&file_url(&repo), &policy).is_ok());
        // a remote made later is judged by where it will be
        assert!(RepoUrl::parse(&file_url(&root.path().join("later").join("r")), &policy).is_ok());
        let link = root.path().join("innocent");
        std::os::unix::fs::symlink(&other, &link).expect("symlink");
        let escape = root.path().join("escape");
        std::os::unix::fs::symlink("/etc", &escape).expect("symlink");
        for refused in [
            file_url(&other),
            file_url(&link),
            file_url(&escape),
            file_url(&repo.join("..").join("data").join("git").join("bob.git")),
            "file:///etc".to_owned(),
            file_url(&escape.join("not-yet")),
        ] {
            assert_eq!(
                RepoUrl::parse(&refused, &policy),
                Err(RepoUrlError::FileOutsideRoots),
                "{refused}"
            );
        }
        // no roots listed: no file URL at all
        let none = UrlPolicy {
            file_roots: FileRoots::default(),
            ..policy
        };
        assert_eq!(
            RepoUrl::parse(&file_url(&repo), &none),
            Err(RepoUrlError::FileOutsideRoots)
        );
    }

    #[test]
    fn credentials_in_the_url_are_refused_at_registration_without_being_echoed() {
        for input in [
            "https://bob:s3cret@example.com/org/repo.git",
            "https://ghp_tokenonly@example.com/org/repo.git",
            "ssh://git:s3cret@example.com/org/repo.git",
        ] {
            let refused = RepoUrl::parse(input, &policy(&["https", "ssh"], false));
            assert_eq!(refused, Err(RepoUrlError::CredentialsInUrl), "{input}");
            let message = RepoUrlError::CredentialsInUrl.to_string();
            assert!(!message.contains("s3cret") && !message.contains("ghp_"));
        }
        assert!(RepoUrl::parse("git@example.com:org/r.git", &policy(&["ssh"], false)).is_ok());
    }

    /// Projects registered before URLs with credentials were refused still hold them.
    #[test]
    fn userinfo_is_never_shown() {
        let url = RepoUrl::from_stored("https://bob:s3cret@example.com/org/repo.git".into())
            .expect("valid");
        assert_eq!(url.redacted(), "https://example.com/org/repo.git");
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        assert!(url.expose_secret().contains("s3cret"));
    }

    #[test]
    fn scrub_removes_credentials_from_quoted_text() {
        let url = RepoUrl::from_stored("https://deploy:tok3n-s3cret@example.com/r.git".into())
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
        let repo = tempfile::tempdir().expect("temp dir");
        assert!(RepoUrl::parse(&file_url(repo.path()), &policy(&["file"], false)).is_ok());
    }

    /// Found by schemathesis: with `file` allowed, "0" registered as a repository
    /// relative to the worker's working directory.
    #[test]
    fn file_urls_must_be_absolute_file_urls() {
        let files = policy(&["file"], false);
        for refused in [
            "0",
            "repo",
            "./repo",
            "/tmp/repo",
            "file://relative/repo",
            "%",
        ] {
            assert!(
                matches!(
                    RepoUrl::parse(refused, &files),
                    Err(RepoUrlError::RelativeFilePath) | Err(RepoUrlError::Unparseable)
                ),
                "{refused} must be refused"
            );
        }
        let repo = tempfile::tempdir().expect("temp dir");
        assert!(RepoUrl::parse(&file_url(repo.path()), &files).is_ok());
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
            "127.1",
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "127.000.000.001",
            "0",
            "[::127.0.0.1]",
            "[64:ff9b::7f00:1]",
            "[::ffff:127.0.0.1]",
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
        assert!(RepoUrl::parse("git@127.1:org/repo.git", &strict).is_err());
        assert!(RepoUrl::parse("ssh://git@0x7f000001/org/repo.git", &strict).is_err());
        assert!(
            RepoUrl::parse("https://%31%32%37.0.0.1/repo.git", &strict).is_err(),
            "an encoded host is refused, whatever it decodes to"
        );
    }

    proptest! {
        #[test]
        fn redacted_form_never_carries_the_password(user in "[a-z]{1,8}", password in "[A-Za-z0-9]{12,20}") {
            let input = format!("https://{user}:{password}@example.com/r.git");
            let url = RepoUrl::from_stored(input).expect("valid");
            prop_assert!(!url.redacted().contains(&password));
        }
    }
}
