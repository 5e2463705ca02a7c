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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Seconds a token's `iat` may lie in the future (clock skew between issuer and hub).
const IAT_LEEWAY_S: u64 = 60;

/// Who is calling, once the token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    /// The token's `client`; a token without one is treated as `mobile`, the least
    /// privileged class (metadata only), never as a desktop.
    pub client: ClientKind,
    /// The token's `exp` (seconds since the epoch): an open socket is closed then.
    pub expires_at: u64,
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
    /// well formed, but signed with another key
    #[error("the token's signature does not match this hub's key")]
    WrongKey,
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

    /// Requires tokens to carry `aud` (one of its values equal to `audience`) and/or
    /// `iss` equal to `issuer` (`HIVESYNC_JWT_AUDIENCE`, `HIVESYNC_JWT_ISSUER`).
    pub fn expecting(mut self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        if let Some(audience) = audience {
            self.validation.set_audience(&[audience]);
            self.validation.validate_aud = true;
            let mut required = vec!["exp", "sub", "aud"];
            if issuer.is_some() {
                required.push("iss");
            }
            self.validation.set_required_spec_claims(&required);
        }
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            if audience.is_none() {
                self.validation
                    .set_required_spec_claims(&["exp", "sub", "iss"]);
            }
        }
        self
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        // RFC 7515 §4.1.11: a `crit` header names extensions the recipient must
        // understand; this hub understands none, so such a token is refused
        if names_critical_extensions(token) {
            return Err(AuthError::Invalid);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::WrongKey,
                _ => AuthError::Invalid,
            })?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() || claims.sub.len() > 256 {
            return Err(AuthError::Invalid);
        }
        // issued in the future (beyond clock skew): forged or from a broken clock
        if claims
            .iat
            .is_some_and(|iat| iat > unix_now().saturating_add(IAT_LEEWAY_S))
        {
            return Err(AuthError::Invalid);
        }
        Ok(Principal {
            user: claims.sub,
            client: claims.client.unwrap_or(ClientKind::Mobile),
            expires_at: claims.exp,
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
            iat: Some(now.as_secs()),
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).map_err(KeyError::Encode)
    }
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation
}

/// Whether the token's JOSE header carries a `crit` member (an unreadable header is
/// left to the signature check to refuse).
fn names_critical_extensions(token: &str) -> bool {
    use base64::Engine as _;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    if header.len() > 8 * 1024 {
        return true;
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .is_some_and(|header| header.get("crit").is_some())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HS256 token with `header`, signed here with the hub's secret.
    fn signed_with_header(secret: &[u8], header: serde_json::Value) -> String {
        use base64::Engine as _;
        use hmac::Mac;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let claims = serde_json::json!({
            "sub": "alice", "exp": unix_now() + 60, "client": "desktop",
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key");
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    #[test]
    fn a_token_naming_critical_extensions_is_refused() {
        let auth = Authenticator::from_secret(b"test-secret");
        let plain = signed_with_header(
            b"test-secret",
            serde_json::json!({"alg": "HS256", "typ": "JWT"}),
        );
        assert!(
            auth.verify(&plain).is_ok(),
            "the same token without crit verifies"
        );
        let critical = signed_with_header(
            b"test-secret",
            serde_json::json!({"alg": "HS256", "typ": "JWT", "crit": ["exp-ext"], "exp-ext": 1}),
        );
        assert!(matches!(auth.verify(&critical), Err(AuthError::Invalid)));
    }

    #[test]
    fn minted_tokens_verify_with_their_claims() {
        let auth = Authenticator::from_secret(b"test-secret");
        let token = auth
            .mint("alice", ClientKind::Mobile, Duration::from_secs(60))
            .expect("mint");
        let principal = auth.verify(&token).expect("valid");
        assert_eq!(principal.user, "alice");
        assert_eq!(principal.client, ClientKind::Mobile);
        assert!(principal.expires_at >= unix_now() + 59);
        assert!(!principal.may_read_contents());
    }

    #[test]
    fn wrong_key_garbage_and_expiry_are_told_apart() {
        let auth = Authenticator::from_secret(b"test-secret");
        let other = Authenticator::from_secret(b"other-secret");
        let token = other
            .mint("alice", ClientKind::Desktop, Duration::from_secs(60))
            .expect("mint");
        assert_eq!(auth.verify(&token), Err(AuthError::WrongKey));
        assert_eq!(auth.verify("not.a.jwt"), Err(AuthError::Invalid));
        let expired = Claims {
            sub: "alice".into(),
            exp: 1_000,
            client: None,
            iat: None,
            nbf: None,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(b"test-secret"),
        )
        .expect("encode");
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
    }

    fn signed(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(b"test-secret"),
        )
        .expect("encode")
    }

    #[test]
    fn tokens_not_yet_valid_or_issued_in_the_future_are_refused() {
        let auth = Authenticator::from_secret(b"test-secret");
        let now = unix_now();
        let later = signed(
            &serde_json::json!({"sub": "a", "exp": now + 600, "nbf": now + 300, "client": "desktop"}),
        );
        assert_eq!(auth.verify(&later), Err(AuthError::Invalid));
        let future = signed(
            &serde_json::json!({"sub": "a", "exp": now + 600, "iat": now + 300, "client": "desktop"}),
        );
        assert_eq!(auth.verify(&future), Err(AuthError::Invalid));
        let skewed = signed(
            &serde_json::json!({"sub": "a", "exp": now + 600, "iat": now + 30, "nbf": now, "client": "desktop"}),
        );
        assert!(auth.verify(&skewed).is_ok(), "a little clock skew is fine");
    }

    #[test]
    fn a_token_without_a_client_gets_the_least_privilege() {
        let auth = Authenticator::from_secret(b"test-secret");
        let bare = signed(&serde_json::json!({"sub": "a", "exp": unix_now() + 600}));
        let principal = auth.verify(&bare).expect("valid");
        assert_eq!(principal.client, ClientKind::Mobile);
        assert!(!principal.may_read_contents());
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let auth = Authenticator::from_secret(b"test-secret")
            .expecting(Some("hivesync"), Some("https://id.example.com"));
        let exp = unix_now() + 600;
        let good = signed(
            &serde_json::json!({"sub": "a", "exp": exp, "aud": "hivesync", "iss": "https://id.example.com"}),
        );
        assert!(auth.verify(&good).is_ok());
        for bad in [
            serde_json::json!({"sub": "a", "exp": exp, "aud": "other", "iss": "https://id.example.com"}),
            serde_json::json!({"sub": "a", "exp": exp, "aud": "hivesync", "iss": "https://evil.example.com"}),
            serde_json::json!({"sub": "a", "exp": exp, "iss": "https://id.example.com"}),
            serde_json::json!({"sub": "a", "exp": exp, "aud": "hivesync"}),
        ] {
            assert_eq!(auth.verify(&signed(&bad)), Err(AuthError::Invalid), "{bad}");
        }
        let open = Authenticator::from_secret(b"test-secret");
        assert!(
            open.verify(&good).is_ok(),
            "unconfigured: aud and iss are not checked"
        );
    }
}
