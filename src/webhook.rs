//! Signed calls, the Standard Webhooks way: every callback and task call carries
//! `webhook-id`, `webhook-timestamp` and, when secrets are configured, `webhook-signature`:
//! `v1,` + base64 of HMAC-SHA256 over `id.timestamp.body`, one entry per secret so that a
//! secret can be rotated without a gap. Receivers verify with any Standard Webhooks library.
//!
//! Callbacks and task calls never share a key. A task call's body is its submitter's own
//! `params`: signed with the callbacks' key, any submitter could have the server sign a
//! forged callback document and replay it to another tenant's receiver. So callbacks are
//! signed with `--webhook-secret` (or the tenant's own secret, [`CallbackSigners`]), task
//! calls with `--task-secret`, and the server refuses to start with one secret in both.

use std::collections::HashMap;

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::job::JobId;

const PREFIX: &str = "whsec_";

/// A signing secret: `whsec_` followed by base64 of the key. Its `Debug` and `Display` never
/// show the key.
#[derive(Clone)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl WebhookSecret {
    /// A new random secret of 32 bytes, in its `whsec_` form.
    pub fn generate() -> String {
        let key: [u8; 32] = rand::random();
        format!("{PREFIX}{}", BASE64.encode(key))
    }
}

impl FromStr for WebhookSecret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let encoded = s.trim().strip_prefix(PREFIX).ok_or_else(|| {
            "a webhook secret starts with whsec_ (make one with `doparallel secret`)".to_string()
        })?;
        let key = BASE64
            .decode(encoded)
            .map_err(|e| format!("a webhook secret is whsec_ followed by base64: {e}"))?;
        if key.len() < 16 {
            return Err("a webhook secret must hold at least 16 bytes".into());
        }
        Ok(WebhookSecret { key })
    }
}

impl WebhookSecret {
    /// Whether two secrets hold the same key (compared at start, not on a request path).
    pub fn same_key(&self, other: &WebhookSecret) -> bool {
        self.key == other.key
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Signs with every configured secret; with none, signs nothing.
#[derive(Clone, Debug, Default)]
pub struct Signer {
    secrets: Vec<WebhookSecret>,
}

impl Signer {
    pub fn new(secrets: Vec<WebhookSecret>) -> Self {
        Signer { secrets }
    }

    /// The `webhook-signature` value for a message, or `None` without secrets.
    pub fn signature(&self, id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
        let mut signing = self.start(id, timestamp);
        signing.update(body);
        signing.finish()
    }

    /// Signs a body fed in pieces (a body streamed from the store).
    pub fn start(&self, id: &str, timestamp: u64) -> Signing {
        let macs = self
            .secrets
            .iter()
            .map(|secret| {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(&secret.key).expect("HMAC takes any key size");
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac
            })
            .collect();
        Signing { macs }
    }
}

/// Who signs a job's callback: the secret of the tenant (API token) that submitted it when
/// that token has one, alone, so that no other tenant's jobs can produce bytes its receiver
/// accepts; else the server's `--webhook-secret`s.
#[derive(Clone, Debug, Default)]
pub struct CallbackSigners {
    server: Signer,
    /// By owner (`auth::Owner`'s digest of the token).
    by_owner: HashMap<String, Signer>,
}

impl CallbackSigners {
    pub fn new(server: Signer, by_owner: HashMap<String, Signer>) -> Self {
        CallbackSigners { server, by_owner }
    }

    /// The signer of the callbacks of jobs submitted by `owner`.
    pub fn for_owner(&self, owner: Option<&str>) -> &Signer {
        owner
            .and_then(|owner| self.by_owner.get(owner))
            .unwrap_or(&self.server)
    }
}

/// A signature under way: one HMAC per secret.
pub struct Signing {
    macs: Vec<Hmac<Sha256>>,
}

impl Signing {
    pub fn update(&mut self, bytes: &[u8]) {
        for mac in &mut self.macs {
            mac.update(bytes);
        }
    }

    /// The `webhook-signature` value, or `None` without secrets.
    pub fn finish(self) -> Option<String> {
        if self.macs.is_empty() {
            return None;
        }
        let entries: Vec<String> = self
            .macs
            .into_iter()
            .map(|mac| format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
            .collect();
        Some(entries.join(" "))
    }
}

/// The message id of a job's callback: stable across every attempt and restart, because it
/// is derived from the job and its run alone, so a receiver deduplicates on it. The first
/// run's is `msg_<job id>`; a retried job's callback is another message, `msg_<job id>_<run>`.
pub fn webhook_id(job: JobId, run: u32) -> String {
    if run <= 1 {
        format!("msg_{job}")
    } else {
        format!("msg_{job}_{run}")
    }
}

/// Seconds since the Unix epoch, for `webhook-timestamp`.
pub fn timestamp_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret: WebhookSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let signer = Signer::new(vec![secret]);
        let sig = signer.signature(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn several_secrets_give_one_entry_each() {
        let a: WebhookSecret = WebhookSecret::generate().parse().unwrap();
        let b: WebhookSecret = WebhookSecret::generate().parse().unwrap();
        let sig = Signer::new(vec![a, b])
            .signature("msg_1", 1, b"{}")
            .unwrap();
        let entries: Vec<&str> = sig.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.starts_with("v1,")));
        assert_ne!(entries[0], entries[1]);
        assert_eq!(Signer::default().signature("msg_1", 1, b"{}"), None);
    }

    #[test]
    fn a_tenant_with_a_secret_of_its_own_is_signed_with_it_alone() {
        let server: WebhookSecret = WebhookSecret::generate().parse().unwrap();
        let tenant: WebhookSecret = WebhookSecret::generate().parse().unwrap();
        let signers = CallbackSigners::new(
            Signer::new(vec![server.clone()]),
            HashMap::from([("aaaa".to_string(), Signer::new(vec![tenant.clone()]))]),
        );
        let sign = |owner: Option<&str>| signers.for_owner(owner).signature("msg_1", 1, b"{}");
        let by_tenant = Signer::new(vec![tenant]).signature("msg_1", 1, b"{}");
        let by_server = Signer::new(vec![server]).signature("msg_1", 1, b"{}");
        assert_eq!(sign(Some("aaaa")), by_tenant);
        assert_eq!(sign(Some("bbbb")), by_server);
        assert_eq!(sign(None), by_server);
        assert_ne!(by_tenant, by_server);
    }

    #[test]
    fn bad_secrets_say_what_is_wrong_and_debug_hides_good_ones() {
        assert!(
            "abc"
                .parse::<WebhookSecret>()
                .unwrap_err()
                .contains("starts with whsec_")
        );
        assert!(
            "whsec_!!"
                .parse::<WebhookSecret>()
                .unwrap_err()
                .contains("base64")
        );
        assert!(
            "whsec_AAAA"
                .parse::<WebhookSecret>()
                .unwrap_err()
                .contains("16 bytes")
        );
        let text = WebhookSecret::generate();
        let secret: WebhookSecret = text.parse().unwrap();
        let shown = format!("{secret:?}");
        assert!(!shown.contains(&text[PREFIX.len()..]), "{shown}");
    }
}
