//! Who a client is and what it may do: per-client tokens, the keyed-BLAKE3 challenge-response that proves one
//! without sending it, and the grant (namespace and permissions) a server attaches to a proven client.
//!
//! A token is `ID:SECRET`, the secret 32 random bytes in hex. The server sends a fresh 32-byte nonce per
//! connection; the client answers `keyed_hash(derive_key(CONTEXT, secret), DOMAIN ‖ nonce ‖ binding ‖ id)`, where
//! `binding` is the TLS session's exporter (or a marker for plain TCP). The secret never crosses the wire, an
//! answer recorded from one connection is useless on the next (another nonce), and one relayed by a hostile server
//! into its own TLS session with the real server is useless too (another exporter).
//! proto-spec.md, "Authentication", is the contract.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::manifest::hex;

/// Key-derivation context for token secrets (BLAKE3 `derive_key`).
const KEY_CONTEXT: &str = "ferry 2026-11 token authentication key";
/// Domain separation prefix of the authenticated message.
const DOMAIN: &[u8] = b"ferry-auth-v1\0";
/// Longest client id, in bytes.
pub const MAX_CLIENT_ID: usize = 64;

/// A token that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not `ID:HEX`.
    #[error("a token is ID:SECRET, the secret 64 hex digits (make one with `ferry token ID`)")]
    Syntax,
    /// The id has characters outside `[A-Za-z0-9._-]` or is too long.
    #[error("client id {0:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    BadId(String),
}

/// A client's credential: its id and 32-byte secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The client id, sent in the clear in Hello.
    pub id: String,
    secret: [u8; 32],
}

impl Token {
    /// A new token with a random secret.
    pub fn generate(id: &str) -> Result<Token, TokenError> {
        check_id(id)?;
        let mut secret = [0u8; 32];
        crate::random::fill(&mut secret);
        Ok(Token {
            id: id.to_string(),
            secret,
        })
    }

    /// A token from its id and hex secret (as a server config holds it).
    pub fn from_parts(id: &str, secret_hex: &str) -> Result<Token, TokenError> {
        check_id(id)?;
        Ok(Token {
            id: id.to_string(),
            secret: parse_secret(secret_hex)?,
        })
    }

    /// The secret in hex (for a server config).
    pub fn secret_hex(&self) -> String {
        hex(&self.secret)
    }

    /// The answer to `nonce` on a connection with this TLS channel `binding` (none for plain TCP): proves the
    /// secret without revealing it, and only for this nonce and this TLS session.
    pub fn respond(&self, nonce: &[u8; 32], binding: Option<&[u8; 32]>) -> [u8; 32] {
        let key = blake3::derive_key(KEY_CONTEXT, &self.secret);
        let mut mac = blake3::Hasher::new_keyed(&key);
        mac.update(DOMAIN);
        mac.update(nonce);
        match binding {
            Some(binding) => mac.update(&[1]).update(binding),
            None => mac.update(&[0]),
        };
        mac.update(self.id.as_bytes());
        *mac.finalize().as_bytes()
    }

    /// Whether `answer` is this token's answer to `nonce` on this channel (constant-time comparison).
    pub fn verify(&self, nonce: &[u8; 32], binding: Option<&[u8; 32]>, answer: &[u8; 32]) -> bool {
        blake3::Hash::from(self.respond(nonce, binding)) == blake3::Hash::from(*answer)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}:<secret>)", self.id)
    }
}

impl fmt::Display for Token {
    /// `ID:SECRET`, the form a token file holds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.id, hex(&self.secret))
    }
}

impl FromStr for Token {
    type Err = TokenError;

    fn from_str(raw: &str) -> Result<Token, TokenError> {
        let (id, secret) = raw.trim().rsplit_once(':').ok_or(TokenError::Syntax)?;
        Token::from_parts(id, secret)
    }
}

/// A fresh challenge nonce.
pub fn nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    crate::random::fill(&mut nonce);
    nonce
}

/// Checks a client id: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn check_id(id: &str) -> Result<(), TokenError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > MAX_CLIENT_ID || !id.chars().all(allowed) {
        return Err(TokenError::BadId(id.to_string()));
    }
    Ok(())
}

fn parse_secret(raw: &str) -> Result<[u8; 32], TokenError> {
    let raw = raw.trim().as_bytes();
    if raw.len() != 64 {
        return Err(TokenError::Syntax);
    }
    let mut secret = [0u8; 32];
    for (byte, pair) in secret.iter_mut().zip(raw.chunks(2)) {
        let text = std::str::from_utf8(pair).map_err(|_| TokenError::Syntax)?;
        *byte = u8::from_str_radix(text, 16).map_err(|_| TokenError::Syntax)?;
    }
    Ok(secret)
}

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions {
    /// Offer files and trees (write).
    pub push: bool,
    /// Pull files and trees (read).
    pub pull: bool,
}

impl Permissions {
    /// Both push and pull: what an unauthenticated loopback server allows.
    pub const ALL: Permissions = Permissions { push: true, pull: true };
}

/// What a server grants one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The proven client id, or `None` on a server without tokens.
    pub client: Option<String>,
    /// Directory under the root the client is confined to (`""` for the whole root).
    pub namespace: String,
    /// What it may do there.
    pub permissions: Permissions,
}

/// The permission bits of a secret file (a token, a TLS key) that let its group or others read or write it;
/// `None` when only the owner can, or the file's mode cannot be read.
pub fn exposed_mode(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o066 != 0).then_some(mode)
}

/// Logs a warning when `path`, which holds `what` (a secret), is readable or writable by its group or others.
pub fn warn_if_exposed(path: &std::path::Path, what: &str) {
    if let Some(mode) = exposed_mode(path) {
        tracing::warn!(
            "{what} {} is accessible to other users (mode {mode:03o}); run chmod 600 on it",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_open_to_others_are_flagged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "x").unwrap();
        for (mode, exposed) in [(0o600, None), (0o400, None), (0o640, Some(0o640)), (0o604, Some(0o604))] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(exposed_mode(&file), exposed, "{mode:o}");
        }
        assert_eq!(exposed_mode(&dir.path().join("missing")), None);
    }

    #[test]
    fn answers_depend_on_nonce_secret_id_and_channel() {
        let token = Token::generate("alice").unwrap();
        let (n1, n2) = (nonce(), nonce());
        let answer = token.respond(&n1, None);
        assert!(token.verify(&n1, None, &answer));
        assert!(
            !token.verify(&n2, None, &answer),
            "a replayed answer must fail on a new nonce"
        );
        let other = Token::generate("alice").unwrap();
        assert!(!other.verify(&n1, None, &answer));
        let renamed = Token::from_parts("bob", &token.secret_hex()).unwrap();
        assert!(!renamed.verify(&n1, None, &answer), "the id is bound into the answer");
        let (tls_a, tls_b) = ([1u8; 32], [2u8; 32]);
        let bound = token.respond(&n1, Some(&tls_a));
        assert!(token.verify(&n1, Some(&tls_a), &bound));
        assert!(
            !token.verify(&n1, Some(&tls_b), &bound),
            "an answer relayed into another TLS session fails"
        );
        assert!(
            !token.verify(&n1, None, &bound),
            "and so does one relayed onto plain TCP"
        );
    }

    /// proto-spec.md §3a and its golden example: a fixed secret, nonce, TLS binding and id, and the answers, with
    /// the computation spelled out with BLAKE3 alone.
    #[test]
    fn the_answer_computation_is_pinned() {
        let secret = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let token = Token::from_parts("alice", secret).unwrap();
        let nonce = [0x11u8; 32];
        let binding = [0x22u8; 32];
        let secret_bytes: Vec<u8> = (0u8..32).collect();
        let key = blake3::derive_key("ferry 2026-11 token authentication key", &secret_bytes);
        let mut message = b"ferry-auth-v1\0".to_vec();
        message.extend_from_slice(&nonce);
        message.push(1);
        message.extend_from_slice(&binding);
        message.extend_from_slice(b"alice");
        let over_tls = token.respond(&nonce, Some(&binding));
        assert_eq!(over_tls, *blake3::keyed_hash(&key, &message).as_bytes());
        assert_eq!(
            hex(&key),
            "d34c4e6f60204a5f07b1f59b70007360cedff79b81e9005b3ba8c8bb229ae6c9"
        );
        assert_eq!(
            hex(&over_tls),
            "3cf447b1b6715d904b70608d615cb5e6e55d1fd4dee1e77e039fb3384246c713"
        );
        assert_eq!(
            hex(&token.respond(&nonce, None)),
            "8e814fa419c871626f5d16023bfbde3632caa4e09f03f0f93d372bbe2c4e9e55"
        );
    }

    #[test]
    fn token_text_round_trips_and_hides_the_secret_in_debug() {
        let token = Token::generate("build-box_1.example").unwrap();
        let parsed: Token = token.to_string().parse().unwrap();
        assert_eq!(parsed, token);
        assert!(!format!("{token:?}").contains(&token.secret_hex()));
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert_eq!("nocolon".parse::<Token>(), Err(TokenError::Syntax));
        assert_eq!("a:1234".parse::<Token>(), Err(TokenError::Syntax));
        let zz = format!("a:{}", "zz".repeat(32));
        assert_eq!(zz.parse::<Token>(), Err(TokenError::Syntax));
        let bad_id = format!("a b:{}", "00".repeat(32));
        assert!(matches!(bad_id.parse::<Token>(), Err(TokenError::BadId(_))));
        assert!(Token::generate(&"x".repeat(65)).is_err());
    }
}
