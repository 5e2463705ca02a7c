//! The wire's code for each way a sync fails (API.md "Sync failures"): the one table
//! from the mirror's errors to the contract's codes.

use crate::mirror::MirrorError;
use crate::protocol::SyncErrorCode;

/// The wire's code for a failed sync (API.md "Sync failures").
pub(super) fn error_code(err: &MirrorError) -> SyncErrorCode {
    if err.is_out_of_space() {
        return SyncErrorCode::StorageFull;
    }
    match err {
        MirrorError::RepoNotFound(_) | MirrorError::BranchNotFound(_) => {
            SyncErrorCode::RepoNotFound
        }
        MirrorError::AuthFailed(_)
        | MirrorError::CredentialMissing(_)
        | MirrorError::CredentialRefused(_)
        | MirrorError::HostKeyRejected => SyncErrorCode::RepoAuthFailed,
        MirrorError::Network(_) => SyncErrorCode::NetworkError,
        MirrorError::Corrupt(_) => SyncErrorCode::MirrorCorrupt,
        MirrorError::Interrupted | MirrorError::TimedOut(_) => SyncErrorCode::Timeout,
        MirrorError::StorageFloor(_) => SyncErrorCode::StorageFull,
        MirrorError::TooLarge(_) => SyncErrorCode::RepoTooLarge,
        MirrorError::Io(_)
        | MirrorError::Checkout(_)
        | MirrorError::Git(_)
        | MirrorError::UnsafeTree(_)
        | MirrorError::MalformedTree(_)
        | MirrorError::RemoteAborted(_)
        | MirrorError::PrivateAddress(_)
        | MirrorError::Fenced
        | MirrorError::Unsupported(_) => SyncErrorCode::BackendError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_errors_map_to_the_contract_codes() {
        let io =
            |kind| Box::new(std::io::Error::from(kind)) as Box<dyn std::error::Error + Send + Sync>;
        let table = [
            (
                MirrorError::RepoNotFound(io(std::io::ErrorKind::NotFound)),
                SyncErrorCode::RepoNotFound,
            ),
            (
                MirrorError::BranchNotFound("main".into()),
                SyncErrorCode::RepoNotFound,
            ),
            (
                MirrorError::AuthFailed(io(std::io::ErrorKind::PermissionDenied)),
                SyncErrorCode::RepoAuthFailed,
            ),
            (MirrorError::HostKeyRejected, SyncErrorCode::RepoAuthFailed),
            (
                MirrorError::CredentialMissing("x".into()),
                SyncErrorCode::RepoAuthFailed,
            ),
            (
                MirrorError::Network(io(std::io::ErrorKind::ConnectionReset)),
                SyncErrorCode::NetworkError,
            ),
            (
                MirrorError::Corrupt("x".into()),
                SyncErrorCode::MirrorCorrupt,
            ),
            (MirrorError::Interrupted, SyncErrorCode::Timeout),
            (MirrorError::TimedOut("x".into()), SyncErrorCode::Timeout),
            (
                MirrorError::StorageFloor("x".into()),
                SyncErrorCode::StorageFull,
            ),
            (
                MirrorError::UnsafeTree("x".into()),
                SyncErrorCode::BackendError,
            ),
            (
                MirrorError::Io(std::io::Error::from_raw_os_error(28)),
                SyncErrorCode::StorageFull,
            ),
            (
                MirrorError::Checkout(io(std::io::ErrorKind::StorageFull)),
                SyncErrorCode::StorageFull,
            ),
        ];
        for (err, code) in table {
            assert_eq!(error_code(&err), code, "{err}");
        }
    }
}
