//! TLS for the hub's outgoing connections (git over https, the `hivesync sync` CLI):
//! rustls with the ring provider, so a build needs a C compiler but no OpenSSL.

use std::sync::{Arc, Once};

/// Makes ring the process's rustls provider (reqwest is built without one). Safe to
/// call from anywhere, any number of times.
pub fn ensure_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only when another provider was installed first, which is as good
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client configuration that trusts what the operating system trusts.
pub fn client_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    ensure_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(Arc::clone(&provider))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A plain `reqwest` client with the provider installed first (the tests' and the
/// loadtest's; reqwest is built without a provider of its own).
pub fn http_client() -> reqwest::Client {
    ensure_provider();
    reqwest::Client::new()
}
