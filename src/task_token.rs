//! Tasks that finish later. An endpoint that cannot answer within a request answers
//! `202 Accepted` and later posts the outcome to `POST /v1/tasks/{token}/result`; the call
//! carries the token (`DoParallel-Task-Token`) and the full URL to post to
//! (`DoParallel-Result-Url`).
//!
//! A token names one attempt (job, task index, attempt number) and carries an HMAC of those
//! under the database's key (`Store::task_token_key`), so any node can check a token minted
//! by another without a lookup, a report that overtakes the 202 announcing it is still
//! accepted, and nobody can guess a token for a task they were not called for.

use crate::job::JobId;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the HMAC a token keeps: 128 bits, far beyond guessing.
const MAC_BYTES: usize = 16;

/// The attempt a valid token names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub job_id: JobId,
    pub index: u64,
    pub attempt: u32,
}

/// Mints and checks task tokens with one key.
pub struct TaskTokens {
    mac: Hmac<Sha256>,
}

impl TaskTokens {
    pub fn new(key: &[u8]) -> Self {
        TaskTokens {
            mac: Hmac::new_from_slice(key).expect("HMAC takes any key size"),
        }
    }

    fn signed(&self, claims: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(claims.as_bytes());
        mac
    }

    /// `<job id>.<index>.<attempt>.<MAC, base64url>`: only URL-safe
    /// characters, so it goes into a path as it is.
    pub fn mint(&self, job_id: JobId, index: u64, attempt: u32) -> String {
        let claims = format!("{job_id}.{index}.{attempt}");
        let tag = self.signed(&claims).finalize().into_bytes();
        format!("{claims}.{}", BASE64URL.encode(&tag[..MAC_BYTES]))
    }

    /// The attempt `token` names, when it was minted with this key.
    pub fn verify(&self, token: &str) -> Option<TokenClaims> {
        let (claims, tag) = token.rsplit_once('.')?;
        let tag = BASE64URL.decode(tag).ok()?;
        if tag.len() != MAC_BYTES {
            return None;
        }
        // Constant time: a wrong token tells nothing about the right one.
        self.signed(claims).verify_truncated_left(&tag).ok()?;
        let mut parts = claims.split('.');
        let job_id = parts.next()?.parse().ok()?;
        let index = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(TokenClaims {
            job_id,
            index,
            attempt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_names_its_attempt() {
        let tokens = TaskTokens::new(b"key");
        let job = JobId::generate();
        let token = tokens.mint(job, 42, 3);
        assert_eq!(
            tokens.verify(&token),
            Some(TokenClaims {
                job_id: job,
                index: 42,
                attempt: 3
            })
        );
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        );
    }

    #[test]
    fn a_changed_or_foreign_token_is_refused() {
        let tokens = TaskTokens::new(b"key");
        let job = JobId::generate();
        let token = tokens.mint(job, 42, 3);
        // Another attempt's claims under this attempt's MAC.
        let (_, tag) = token.rsplit_once('.').unwrap();
        let forged = format!("{job}.42.4.{tag}");
        assert_eq!(tokens.verify(&forged), None);
        assert_eq!(TaskTokens::new(b"other key").verify(&token), None);
        for bad in ["", ".", "a.b.c.d", &token[..token.len() - 1]] {
            assert_eq!(tokens.verify(bad), None, "{bad:?}");
        }
    }
}
