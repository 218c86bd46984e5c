//! API tokens: who may call the API, and whose jobs each caller sees.
//!
//! With tokens configured, every `/v1` route but `POST /v1/test`, the dashboard's page and
//! `/metrics` need one (its static scripts and styles, which hold no data, do not), as `Authorization: Bearer TOKEN` or as the password of HTTP Basic
//! authentication (which lets a browser open the dashboard and its event streams without any
//! script holding the token). Tokens are kept only as SHA-256 digests and compared in
//! constant time. A job belongs to the token that created it ([`Owner`]): another token's
//! job is answered as not found. Without tokens there is one anonymous owner and no check.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::middleware::Next;
use axum::response::{AppendHeaders, IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The configured tokens, as digests. Its `Debug` shows only how many there are.
#[derive(Clone, Default)]
pub struct ApiTokens {
    digests: Vec<[u8; 32]>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiTokens({} configured)", self.digests.len())
    }
}

/// Who a job belongs to: a short digest of the token that created it (never the token), or
/// `None` when the server runs without tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner(pub Option<String>);

impl ApiTokens {
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut digests = Vec::new();
        for token in tokens {
            let token = token.trim();
            if token.len() < 16 {
                return Err(
                    "an API token must be at least 16 characters long (try `openssl rand -hex 32`)"
                        .into(),
                );
            }
            digests.push(Sha256::digest(token.as_bytes()).into());
        }
        Ok(ApiTokens { digests })
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The owner a presented token stands for, or `None` when it is not one of ours. Every
    /// configured digest is compared, in constant time, whatever matches.
    fn owner_of(&self, token: &str) -> Option<Owner> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&digest);
        }
        bool::from(found).then(|| Owner(Some(owner_name(&digest))))
    }
}

/// The name a token's jobs are stored under: the first 8 bytes of its SHA-256, in hex.
fn owner_name(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The owner name of a configured token (for settings given per token, such as a
/// tenant's own callback secret).
pub fn owner_of_token(token: &str) -> String {
    owner_name(&Sha256::digest(token.trim().as_bytes()).into())
}

/// The token a request presents: Bearer, Basic (as the password), or, for the events stream
/// only, an `access_token` query parameter (`EventSource` cannot set headers).
fn presented_token(request: &Request) -> Option<String> {
    if let Some(value) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        // The scheme is case-insensitive (RFC 9110, 11.1): `bearer` is `Bearer`.
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("Bearer") {
            return Some(rest.trim().to_string());
        }
        if scheme.eq_ignore_ascii_case("Basic") {
            let encoded = rest;
            let decoded = BASE64.decode(encoded.trim()).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            return text
                .split_once(':')
                .map(|(_, password)| password.to_string());
        }
        return None;
    }
    if request.uri().path().ends_with("/events") {
        return request.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(name, _)| name == "access_token")
                .map(|(_, token)| token.into_owned())
        });
    }
    None
}

/// Middleware: lets a request through with its [`Owner`] in its extensions, or answers 401.
pub async fn require_token(
    State(tokens): State<Arc<ApiTokens>>,
    mut request: Request,
    next: Next,
) -> Response {
    if tokens.is_empty() {
        request.extensions_mut().insert(Owner(None));
        return next.run(request).await;
    }
    match presented_token(&request).and_then(|t| tokens.owner_of(&t)) {
        Some(owner) => {
            request.extensions_mut().insert(owner);
            next.run(request).await
        }
        None => {
            let body = serde_json::json!({
                "status": "Error",
                "msg": "missing or unknown API token: send Authorization: Bearer TOKEN",
            });
            (
                StatusCode::UNAUTHORIZED,
                // One challenge per header: browsers read only a header's first scheme, and
                // Basic is what makes them ask for the token when opening the dashboard.
                AppendHeaders([
                    (WWW_AUTHENTICATE, r#"Bearer realm="doparallel""#),
                    (WWW_AUTHENTICATE, r#"Basic realm="doparallel""#),
                ]),
                axum::Json(body),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive() {
        let presented = |value: &str| {
            let request = Request::builder()
                .uri("/v1/jobs")
                .header(AUTHORIZATION, value)
                .body(axum::body::Body::empty())
                .unwrap();
            presented_token(&request)
        };
        for scheme in ["Bearer", "bearer", "BEARER"] {
            assert_eq!(presented(&format!("{scheme} tok")), Some("tok".into()));
        }
        let basic = BASE64.encode("user:tok");
        assert_eq!(presented(&format!("basic {basic}")), Some("tok".into()));
        assert_eq!(presented("Token tok"), None);
    }

    #[test]
    fn tokens_are_matched_by_digest_and_never_shown() {
        let tokens = ApiTokens::new(["s3cret-token-aaaaaaaa", "s3cret-token-bbbbbbbb"]).unwrap();
        let a = tokens.owner_of("s3cret-token-aaaaaaaa").unwrap();
        let b = tokens.owner_of("s3cret-token-bbbbbbbb").unwrap();
        assert_ne!(a, b);
        assert_eq!(tokens.owner_of("s3cret-token-cccccccc"), None);
        assert_eq!(tokens.owner_of(""), None);
        assert_eq!(format!("{tokens:?}"), "ApiTokens(2 configured)");
        assert!(!format!("{a:?}").contains("s3cret"));
        assert!(
            ApiTokens::new(["short"])
                .unwrap_err()
                .contains("at least 16")
        );
    }
}
