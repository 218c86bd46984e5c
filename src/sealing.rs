//! Secret header values sealed at rest: AES-256-GCM under the server's secret key, each
//! value bound to its job and header name, so a sealed value copied into another job or
//! under another name does not open.
//!
//! A sealed value reads `v1.KEYID.DATA`: `KEYID` is the first four bytes of the SHA-256 of
//! the key (hex), which says which key opens it, and `DATA` is the 96-bit random nonce
//! followed by the ciphertext and tag, in URL-safe base64. The server is given its key
//! (`--secret-key-file`, `DOPARALLEL_SECRET_KEY`) and, while rotating, the key before it
//! (`--secret-key-old-file`, `DOPARALLEL_SECRET_KEY_OLD`), which only opens: values are
//! always sealed under the current key.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

/// What a submission is told when it sends secret headers to a server without a key.
pub const NO_KEY: &str = "this server has no secret key to seal secret headers with: start it \
     with --secret-key-file or DOPARALLEL_SECRET_KEY (make a key with `doparallel secret --key`)";

/// A 32-byte key; its `Debug` shows only its id.
#[derive(Clone)]
pub struct SecretKey {
    cipher: Aes256Gcm,
    id: String,
    /// The key of [`Sealer::request_digest`], derived from this one.
    digest_key: [u8; 32],
}

impl SecretKey {
    /// A key from its text: 64 hex characters, or base64 (standard or URL-safe, padded or
    /// not) of 32 bytes. Surrounding whitespace (a file's last newline) is ignored.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex digits"))
                .collect()
        } else {
            [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
                .iter()
                .find_map(|engine| engine.decode(text).ok())
                .unwrap_or_default()
        };
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            "a secret key must be 32 bytes, written as 64 hex characters or as base64 \
             (make one with `doparallel secret --key`)"
                .to_string()
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8; 32]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut derive = Sha256::new();
        derive.update(b"doparallel request digest v1\n");
        derive.update(bytes);
        SecretKey {
            cipher: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*bytes)),
            id: digest[..4].iter().map(|b| format!("{b:02x}")).collect(),
            digest_key: derive.finalize().into(),
        }
    }

    /// A new random key, as 64 hex characters.
    pub fn generate() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key's id, as sealed values name it.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.id)
    }
}

/// The server's keys: the one that seals (and opens), and an older one that only opens.
#[derive(Clone, Debug, Default)]
pub struct Sealer {
    current: Option<SecretKey>,
    old: Option<SecretKey>,
}

/// Why a sealed value did not open. It never holds the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error(
        "sealed under key {0}, which this server does not have (--secret-key-file, --secret-key-old-file)"
    )]
    UnknownKey(String),
    #[error("the sealed value is damaged or belongs to another job or header")]
    Damaged,
}

impl Sealer {
    pub fn new(current: Option<SecretKey>, old: Option<SecretKey>) -> Self {
        Sealer { current, old }
    }

    /// The digest a submission is stored with beside its `Idempotency-Key`, to tell a
    /// retry from another body. A body may hold secret header values, so with a key it is
    /// an HMAC-SHA256 under a key derived from the secret key (someone who reads the
    /// database cannot test guesses of a secret against it); without one (no secret header
    /// can be accepted then) a plain SHA-256. A retry sent after the key changed reads as
    /// another body (a 409).
    pub fn request_digest(&self, body: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let bytes: Vec<u8> = match &self.current {
            Some(key) => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.digest_key)
                    .expect("HMAC takes a key of any length");
                mac.update(body);
                mac.finalize().into_bytes().to_vec()
            }
            None => Sha256::digest(body).to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether values can be sealed here.
    pub fn can_seal(&self) -> bool {
        self.current.is_some()
    }

    /// Seals `value` of header `name` of job `job`; `None` without a key.
    pub fn seal(&self, job: &str, name: &str, value: &str) -> Option<String> {
        let key = self.current.as_ref()?;
        let nonce: [u8; 12] = rand::random();
        let aad = bound_to(job, name);
        let sealed = key
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM seals any value that fits in memory");
        let mut data = nonce.to_vec();
        data.extend_from_slice(&sealed);
        Some(format!("v1.{}.{}", key.id, URL_SAFE_NO_PAD.encode(data)))
    }

    /// Opens what [`Sealer::seal`] sealed for the same job and header name.
    pub fn open(&self, job: &str, name: &str, sealed: &str) -> Result<String, OpenError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some("v1"), Some(id), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(OpenError::Damaged);
        };
        let key = [&self.current, &self.old]
            .into_iter()
            .flatten()
            .find(|key| key.id == id)
            .ok_or_else(|| OpenError::UnknownKey(id.to_string()))?;
        let data = URL_SAFE_NO_PAD
            .decode(data)
            .map_err(|_| OpenError::Damaged)?;
        if data.len() < 12 {
            return Err(OpenError::Damaged);
        }
        let (nonce, sealed) = data.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().expect("split at 12");
        let aad = bound_to(job, name);
        let plain = key
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| OpenError::Damaged)?;
        String::from_utf8(plain).map_err(|_| OpenError::Damaged)
    }
}

/// The associated data a value is sealed with: its job and its header's name (in lower
/// case, as HTTP compares names).
fn bound_to(job: &str, name: &str) -> String {
    format!(
        "doparallel secret header v1\n{job}\n{}",
        name.to_ascii_lowercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::parse(&SecretKey::generate()).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_for_its_job_and_name_only() {
        let sealer = Sealer::new(Some(key()), None);
        let sealed = sealer.seal("job-1", "X-Api-Key", "s3cret").unwrap();
        assert!(!sealed.contains("s3cret"));
        assert_eq!(
            sealer.open("job-1", "x-api-key", &sealed).unwrap(),
            "s3cret"
        );
        assert_eq!(
            sealer.open("job-2", "X-Api-Key", &sealed),
            Err(OpenError::Damaged)
        );
        assert_eq!(
            sealer.open("job-1", "Authorization", &sealed),
            Err(OpenError::Damaged)
        );
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(
            sealer.open("job-1", "X-Api-Key", &tampered),
            Err(OpenError::Damaged)
        );
        // Two seals of one value differ (a fresh nonce each).
        assert_ne!(sealer.seal("job-1", "X-Api-Key", "s3cret").unwrap(), sealed);
    }

    #[test]
    fn the_old_key_opens_after_a_rotation_and_an_unknown_key_is_named() {
        let (old, new) = (key(), key());
        let before = Sealer::new(Some(old.clone()), None);
        let sealed = before.seal("j", "a", "v").unwrap();
        let rotated = Sealer::new(Some(new.clone()), Some(old.clone()));
        assert_eq!(rotated.open("j", "a", &sealed).unwrap(), "v");
        assert!(rotated.seal("j", "a", "v").unwrap().contains(new.id()));
        let forgotten = Sealer::new(Some(new), None);
        assert_eq!(
            forgotten.open("j", "a", &sealed),
            Err(OpenError::UnknownKey(old.id().to_string()))
        );
        assert_eq!(Sealer::default().seal("j", "a", "v"), None);
    }

    #[test]
    fn keys_are_read_as_hex_or_base64() {
        let bytes = [7u8; 32];
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let id = SecretKey::from_bytes(&bytes).id().to_string();
        for text in [
            hex.clone(),
            hex.to_uppercase(),
            format!("{hex}\n"),
            STANDARD.encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
        ] {
            assert_eq!(SecretKey::parse(&text).unwrap().id(), id, "{text}");
        }
        for bad in ["", "abc", &hex[..62], &STANDARD.encode([1u8; 31])] {
            let e = SecretKey::parse(bad).unwrap_err();
            assert!(e.contains("must be 32 bytes"), "{bad}: {e}");
        }
        assert!(!format!("{:?}", SecretKey::parse(&hex).unwrap()).contains(&hex));
    }
}
