//! Bearer-token authentication: verifies HS256 tokens with a shared secret or RS256 /
//! EdDSA tokens with a PEM public key, and mints HS256 tokens for local use. Knows
//! nothing of HTTP; the `http` layer maps [`AuthError`] to status codes.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    Desktop,
    Plugin,
    Mobile,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientKind>,
}

/// Who is calling, once the token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub client: ClientKind,
}

impl Principal {
    pub fn may_read_contents(&self) -> bool {
        self.client != ClientKind::Mobile
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing or malformed bearer token")]
    Invalid,
    #[error("token expired")]
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("HIVESYNC_JWT_PUBLIC_KEY is neither an RSA nor an Ed25519 PEM public key")]
    UnsupportedPublicKey,
    #[error("could not read the public key file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("minting tokens needs HIVESYNC_JWT_SECRET: a public key can only verify")]
    CannotMint,
    #[error("could not encode token")]
    Encode(#[source] jsonwebtoken::errors::Error),
}

/// The key tokens are verified with (and, for a shared secret, minted with).
#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl Authenticator {
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: Some(EncodingKey::from_secret(secret)),
            validation: validation(Algorithm::HS256),
        }
    }

    /// `key` is the PEM text itself or a path to a file holding it.
    pub fn from_public_key(key: &str) -> Result<Self, KeyError> {
        let pem = if key.trim_start().starts_with("-----BEGIN") {
            key.to_owned()
        } else {
            std::fs::read_to_string(Path::new(key)).map_err(|source| KeyError::Read {
                path: key.to_owned(),
                source,
            })?
        };
        let (decoding, algorithm) = if let Ok(rsa) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
            (rsa, Algorithm::RS256)
        } else if let Ok(ed) = DecodingKey::from_ed_pem(pem.as_bytes()) {
            (ed, Algorithm::EdDSA)
        } else {
            return Err(KeyError::UnsupportedPublicKey);
        };
        Ok(Self {
            decoding,
            encoding: None,
            validation: validation(algorithm),
        })
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            })?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() || claims.sub.len() > 256 {
            return Err(AuthError::Invalid);
        }
        Ok(Principal {
            user: claims.sub,
            client: claims.client.unwrap_or(ClientKind::Desktop),
        })
    }

    pub fn mint(&self, sub: &str, client: ClientKind, ttl: Duration) -> Result<String, KeyError> {
        let key = self.encoding.as_ref().ok_or(KeyError::CannotMint)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let claims = Claims {
            sub: sub.to_owned(),
            exp: (now + ttl).as_secs(),
            client: Some(client),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).map_err(KeyError::Encode)
    }
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_aud = false;
    validation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_with_their_claims() {
        let auth = Authenticator::from_secret(b"test-secret");
        let token = auth
            .mint("alice", ClientKind::Mobile, Duration::from_secs(60))
            .expect("mint");
        let principal = auth.verify(&token).expect("valid");
        assert_eq!(
            principal,
            Principal {
                user: "alice".into(),
                client: ClientKind::Mobile
            }
        );
        assert!(!principal.may_read_contents());
    }

    #[test]
    fn wrong_key_garbage_and_expiry_are_told_apart() {
        let auth = Authenticator::from_secret(b"test-secret");
        let other = Authenticator::from_secret(b"other-secret");
        let token = other
            .mint("alice", ClientKind::Desktop, Duration::from_secs(60))
            .expect("mint");
        assert_eq!(auth.verify(&token), Err(AuthError::Invalid));
        assert_eq!(auth.verify("not.a.jwt"), Err(AuthError::Invalid));
        let expired = Claims {
            sub: "alice".into(),
            exp: 1_000,
            client: None,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(b"test-secret"),
        )
        .expect("encode");
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
    }
}
