//! Token format shared by the coordinator (which issues and hashes) and edges (which verify).
//!
//! A token reads `mrd_<kind>_<id>_<secret>`: the id lets a verifier find the one record to
//! compare against without scanning, and only the SHA-256 of the whole string is ever stored.

use sha2::{Digest, Sha256};

/// Lower-case hex SHA-256 of a token string.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Builds a token from an id and a random secret (both URL-safe, no `_` in the id).
pub fn format(kind: &str, id: &str, secret: &str) -> String {
    format!("mrd_{kind}_{id}_{secret}")
}

/// The id part of a well-formed token of `kind`, or `None`.
pub fn parse_id<'a>(kind: &str, token: &'a str) -> Option<&'a str> {
    let rest = token
        .strip_prefix("mrd_")?
        .strip_prefix(kind)?
        .strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// Compares a presented token with a stored hash in time independent of where they differ.
pub fn verify(token: &str, stored_sha256_hex: &str) -> bool {
    let got = sha256_hex(token);
    got.len() == stored_sha256_hex.len()
        && got
            .bytes()
            .zip(stored_sha256_hex.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Token kind for agent tokens.
pub const AGENT: &str = "agent";
/// Token kind for API tokens (admin and node).
pub const API: &str = "api";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = format(AGENT, "abc123", "s3cr3t");
        assert_eq!(parse_id(AGENT, &t), Some("abc123"));
        assert_eq!(parse_id(API, &t), None);
        assert!(verify(&t, &sha256_hex(&t)));
        assert!(!verify("mrd_agent_abc123_other", &sha256_hex(&t)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "mrd_",
            "mrd_agent_",
            "mrd_agent__x",
            "mrd_agent_id_",
            "xx_agent_a_b",
        ] {
            assert_eq!(parse_id(AGENT, bad), None, "{bad}");
        }
    }
}
