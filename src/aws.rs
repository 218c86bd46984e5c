//! AWS, for the two parts that speak to it: the SDK configuration the DynamoDB store loads
//! ([`config_loader`]), and AWS Signature Version 4 on task calls ([`CallSigner`]).
//!
//! Both take credentials from the SDK's standard chain (environment, profile, web identity,
//! container, instance metadata) over one HTTP client, rustls on ring, the TLS stack
//! reqwest brings anyway (the SDK's default would add aws-lc-sys, a long C build).

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sigv4::http_request::{
    PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_http_client::tls;
use reqwest::header::{HeaderName, HeaderValue};
use tokio::sync::{Mutex, OnceCell};

/// The SDK's configuration loader with this crate's HTTP client and timeouts; callers add
/// region and endpoint.
pub fn config_loader() -> aws_config::ConfigLoader {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        // A request that hangs (an unreachable endpoint) fails instead, and is retried by
        // its caller; no request here legitimately takes this long.
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .build(),
        )
}

/// Credentials are fetched again this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// Signs task calls with the server's AWS credentials. The chain is set up at the first
/// signed call (a server that never signs never looks for credentials); credentials are
/// kept until shortly before they expire, and never stored with a job.
#[derive(Default)]
pub struct CallSigner {
    provider: OnceCell<Option<SharedCredentialsProvider>>,
    cached: Mutex<Option<Credentials>>,
}

impl std::fmt::Debug for CallSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallSigner")
    }
}

impl CallSigner {
    async fn credentials(&self) -> Result<Credentials, String> {
        let mut cached = self.cached.lock().await;
        if let Some(credentials) = cached.as_ref() {
            let fresh = credentials.expiry().is_none_or(|expiry| {
                expiry
                    .duration_since(SystemTime::now())
                    .is_ok_and(|left| left > REFRESH_BEFORE)
            });
            if fresh {
                return Ok(credentials.clone());
            }
        }
        let provider = self
            .provider
            .get_or_init(|| async { config_loader().load().await.credentials_provider() })
            .await
            .as_ref()
            .ok_or("no AWS credentials provider is configured")?;
        let credentials = provider
            .provide_credentials()
            .await
            .map_err(|e| format!("no AWS credentials: {}", DisplayErrorContext(&e)))?;
        *cached = Some(credentials.clone());
        Ok(credentials)
    }

    /// Signs `request`, whose body is `body`, for `service` in `region`: adds
    /// `Authorization`, `X-Amz-Date`, `X-Amz-Content-SHA256` (over `body`, the exact bytes
    /// sent) and, with temporary credentials, `X-Amz-Security-Token`. Every header the
    /// request holds is signed; add the ones that must stay out of the signature (and out
    /// of the signing library's trace output: secret headers) afterwards.
    pub async fn sign(
        &self,
        request: &mut reqwest::Request,
        body: &[u8],
        service: &str,
        region: &str,
    ) -> Result<(), String> {
        let credentials = self.credentials().await?;
        let identity = credentials.into();
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| format!("cannot sign: {e}"))?
            .into();
        let added = {
            let headers = request
                .headers()
                .iter()
                .map(|(name, value)| {
                    value
                        .to_str()
                        .map(|value| (name.as_str(), value))
                        .map_err(|_| format!("header {name} is not text and cannot be signed"))
                })
                .collect::<Result<Vec<_>, String>>()?;
            let signable = SignableRequest::new(
                request.method().as_str(),
                request.url().as_str(),
                headers.into_iter(),
                SignableBody::Bytes(body),
            )
            .map_err(|e| format!("cannot sign: {e}"))?;
            let (instructions, _) = sign(signable, &params)
                .map_err(|e| format!("cannot sign: {e}"))?
                .into_parts();
            instructions.into_parts().0
        };
        for header in added {
            let mut value =
                HeaderValue::from_str(header.value()).map_err(|e| format!("cannot sign: {e}"))?;
            value.set_sensitive(header.sensitive() || header.name() == "authorization");
            request
                .headers_mut()
                .insert(HeaderName::from_static(header.name()), value);
        }
        Ok(())
    }
}
