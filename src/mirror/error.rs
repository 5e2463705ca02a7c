//! What can go wrong in a mirror sync, classified from gix's own error trees (never
//! from message text, with one documented exception). Mapping these to the wire's
//! sync error codes is the worker's business, not the mirror's.

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("could not prepare the mirror directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("the repository was not found or is not readable")]
    RepoNotFound(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("branch '{0}' does not exist in the repository")]
    BranchNotFound(String),
    #[error("the remote refused the credentials")]
    AuthFailed(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    CredentialMissing(String),
    /// The credential policy does not let this project's owner send the secret there.
    #[error("{0}")]
    CredentialRefused(String),
    #[error("the remote's SSH host key does not match HIVESYNC_SSH_KNOWN_HOSTS")]
    HostKeyRejected,
    #[error("this build cannot fetch from this kind of URL")]
    Unsupported(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The remote said on git's error channel that it cannot send the branch (its own
    /// repository is damaged, say): the same request would fail the same way again.
    #[error("the remote aborted the transfer: {0}")]
    RemoteAborted(String),
    #[error("could not reach the remote")]
    Network(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the mirror repository is damaged and could not be repaired")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    PrivateAddress(String),
    /// The branch or the object store is over a quota ([`super::Quota`]); nothing of
    /// the branch was written.
    #[error("{0}")]
    TooLarge(String),
    /// Free space on the data volume is under the configured floor.
    #[error("{0}")]
    StorageFloor(String),
    #[error("the sync was interrupted")]
    Interrupted,
    /// The sync's deadline passed (the caller's, not gix's).
    #[error("{0}")]
    TimedOut(String),
    #[error("another worker took this mirror over (this worker's project lock expired)")]
    Fenced,
    #[error(
        "the branch has paths that cannot be checked out safely (such as '.git' or '..'); nothing was written"
    )]
    UnsafeTree(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A tree with a name twice or an empty name: refused before anything is written.
    #[error("{0}")]
    MalformedTree(String),
    #[error("the working tree could not be written")]
    Checkout(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("git operation failed")]
    Git(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl MirrorError {
    /// Whether the disk filled up, wherever in gix the write failed (pack, index,
    /// checkout): an `io::Error` of kind `StorageFull` anywhere among the causes.
    pub fn is_out_of_space(&self) -> bool {
        if let MirrorError::StorageFloor(_) = self {
            return true;
        }
        if let MirrorError::Io(err) = self
            && is_out_of_space(err)
        {
            return true;
        }
        io_error_kinds(self).contains(&std::io::ErrorKind::StorageFull)
    }
}

pub(crate) fn is_out_of_space(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::StorageFull || err.raw_os_error() == Some(28)
}

/// Sorts a failed connection or transfer by its cause — refused credentials, a missing
/// repository, or the network — from gix's own classification of its error tree
/// (gix turns ssh's diagnostics and I/O kinds into classes too), never from its text.
pub(crate) fn classify_connect(err: Box<dyn std::error::Error + Send + Sync>) -> MirrorError {
    use gix::error::Class;
    let classes: Vec<Class> = gix::error::classify(err.as_ref())
        .map(|found| found.class())
        .collect();
    let io_kinds = io_error_kinds(err.as_ref());
    if classes
        .iter()
        .any(|class| matches!(class, Class::Unauthenticated | Class::PermissionDenied))
        || io_kinds.contains(&std::io::ErrorKind::PermissionDenied)
    {
        return MirrorError::AuthFailed(err);
    }
    if classes.contains(&Class::NotFound)
        || io_kinds.contains(&std::io::ErrorKind::NotFound)
        || matches!(http_status(err.as_ref()), Some(404 | 410))
    {
        return MirrorError::RepoNotFound(err);
    }
    if classes.contains(&Class::Unsupported) {
        return MirrorError::Unsupported(err);
    }
    MirrorError::Network(err)
}

/// The HTTP status an http(s) remote refused with. gix classifies 401 and 403 but not
/// 404 (its curl backend only says "Received HTTP status 404"), so for that one case
/// the status is read from the message; nothing else is classified by text.
fn http_status(err: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let parse = |message: String| {
        message
            .strip_prefix("Received HTTP status ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|code| code.parse().ok())
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(status) = parse(current.to_string()) {
            return Some(status);
        }
        if let Some(tree) = current.downcast_ref::<gix::Error>()
            && let Some(status) = tree.iter_errors().find_map(|e| parse(e.to_string()))
        {
            return Some(status);
        }
        source = current.source();
    }
    None
}

/// The `io::ErrorKind`s anywhere in an error's causes, through gix's error trees.
fn io_error_kinds(err: &(dyn std::error::Error + 'static)) -> Vec<std::io::ErrorKind> {
    let mut kinds = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        if let Some(tree) = current.downcast_ref::<gix::Error>() {
            kinds.extend(
                tree.iter_errors()
                    .filter_map(|e| e.downcast_ref::<std::io::Error>())
                    .map(std::io::Error::kind),
            );
        }
        source = current.source();
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(err)
    }

    #[derive(Debug, thiserror::Error)]
    #[error("transport failed")]
    struct Wrapped(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("Received HTTP status {0}")]
    struct Status(u16);

    #[test]
    fn refused_credentials_missing_repos_and_the_network_are_told_apart() {
        let denied = Wrapped(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(
            classify_connect(boxed(denied)),
            MirrorError::AuthFailed(_)
        ));
        let missing = Wrapped(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(matches!(
            classify_connect(boxed(missing)),
            MirrorError::RepoNotFound(_)
        ));
        let refused = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            classify_connect(boxed(refused)),
            MirrorError::Network(_)
        ));
    }

    #[test]
    fn an_http_404_or_410_is_a_missing_repository_other_statuses_are_not() {
        assert!(matches!(
            classify_connect(boxed(Status(404))),
            MirrorError::RepoNotFound(_)
        ));
        assert!(matches!(
            classify_connect(boxed(Status(410))),
            MirrorError::RepoNotFound(_)
        ));
        assert!(matches!(
            classify_connect(boxed(Status(502))),
            MirrorError::Network(_)
        ));
        assert_eq!(http_status(&Status(404)), Some(404));
        assert_eq!(http_status(&Wrapped(std::io::Error::other("x"))), None);
    }

    #[test]
    fn a_full_disk_is_found_anywhere_among_the_causes() {
        let direct = MirrorError::Io(std::io::Error::from_raw_os_error(28));
        assert!(direct.is_out_of_space());
        let nested = MirrorError::Checkout(boxed(Wrapped(std::io::Error::from(
            std::io::ErrorKind::StorageFull,
        ))));
        assert!(nested.is_out_of_space());
        let other = MirrorError::Checkout(boxed(Wrapped(std::io::Error::other("no"))));
        assert!(!other.is_out_of_space());
        assert!(!MirrorError::Interrupted.is_out_of_space());
    }
}
