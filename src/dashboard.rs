//! The web dashboard served at `GET /`: a jobs list and a job page, in the manner of Celery
//! Flower and the Sidekiq web UI.
//!
//! The page is plain HTML, CSS and JavaScript from `assets/dashboard/`, embedded in the binary
//! at compile time, so running it needs neither a Node build step nor files beside the binary,
//! and it works offline. The browser reads the same public JSON API as any client
//! (`/v1/jobs`, `/v1/jobs/{id}/tasks`, the events stream, cancel): this module only hands out
//! files and knows nothing of the engine or the store, which is why its router works over any
//! state.
//!
//! Every answer carries `Cache-Control: no-cache` and a strong `ETag` computed from the file
//! at compile time, so a browser revalidates cheaply (304) and never runs the script of an
//! older binary after an upgrade. (Long `max-age` with content-hashed file names was
//! rejected: it needs a build step or a templated `index.html`.)

use axum::Router;
use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: u64,
}

impl Asset {
    const fn new(name: &'static str, content_type: &'static str, body: &'static [u8]) -> Self {
        Asset {
            name,
            content_type,
            body,
            etag: fnv1a(body),
        }
    }
}

/// The page itself, served at `/`.
const INDEX: Asset = Asset::new(
    "index.html",
    "text/html; charset=utf-8",
    include_bytes!("../assets/dashboard/index.html"),
);

/// What `index.html` loads, served at `/assets/NAME`.
const ASSETS: &[Asset] = &[
    Asset::new(
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/dashboard/app.js"),
    ),
    Asset::new(
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/dashboard/app.css"),
    ),
    Asset::new(
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../assets/dashboard/favicon.svg"),
    ),
];

/// Results shown on the page come from arbitrary endpoints. The script never turns data into
/// markup, and this policy is the second line: no inline script, nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// 64-bit FNV-1a, evaluated at compile time for the `ETag`s: any change of a file changes it,
/// which is all an `ETag` needs (no adversary chooses these files).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The dashboard's page, `GET /`: behind the API tokens when there are any (a browser asks
/// for one through its Basic prompt). Over any state, so that it can be merged into the API's
/// router.
pub fn page_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index))
}

/// The dashboard's scripts, styles and icon, `GET /assets/{name}`: the same for everyone and
/// without data, so served without a token.
pub fn assets_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/assets/{name}", get(asset))
}

/// The dashboard's page.
#[utoipa::path(
    get, path = "/", tag = "dashboard",
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 304, description = "Unchanged since the ETag given in If-None-Match"),
    )
)]
pub(crate) async fn index(headers: HeaderMap) -> Response {
    let mut response = serve(&INDEX, &headers);
    let h = response.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    // The token the page may send lives in localStorage, never in the page's URL, but the
    // events stream carries it as a query parameter: no referrer may leak either.
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// One of the dashboard's scripts, styles or icons.
#[utoipa::path(
    get, path = "/assets/{name}", tag = "dashboard",
    params(("name" = String, Path, description = "File name, e.g. app.js")),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = String),
        (status = 304, description = "Unchanged since the ETag given in If-None-Match"),
        (status = 404, description = "No such file", content_type = "text/plain", body = String),
    )
)]
pub(crate) async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => serve(asset, &headers),
        None => (
            StatusCode::NOT_FOUND,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such asset\n",
        )
            .into_response(),
    }
}

fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let common = [
        (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (
            ETAG,
            HeaderValue::from_str(&etag).expect("a hex ETag is a valid header"),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(CONTENT_TYPE, HeaderValue::from_static(asset.content_type))],
        asset.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(response: &Response, name: impl axum::http::header::AsHeaderName) -> &str {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn index_is_html_that_revalidates() {
        let response = index(HeaderMap::new()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, CONTENT_TYPE), "text/html; charset=utf-8");
        assert_eq!(header(&response, CACHE_CONTROL), "no-cache");
        assert!(header(&response, CONTENT_SECURITY_POLICY).contains("script-src 'self'"));

        let mut headers = HeaderMap::new();
        let etag = header(&response, ETAG).to_owned();
        headers.insert(IF_NONE_MATCH, etag.parse().unwrap());
        let again = index(headers).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header(&again, ETAG), etag);
    }

    #[tokio::test]
    async fn assets_have_their_content_type_and_unknown_names_are_404() {
        for (name, content_type) in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("app.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ] {
            let response = asset(Path(name.to_owned()), HeaderMap::new()).await;
            assert_eq!(response.status(), StatusCode::OK, "{name}");
            assert_eq!(header(&response, CONTENT_TYPE), content_type, "{name}");
            assert_eq!(header(&response, CACHE_CONTROL), "no-cache", "{name}");
        }
        let missing = asset(Path("../Cargo.toml".to_owned()), HeaderMap::new()).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }

    /// Every `/assets/...` that the page names is one that this module serves, so a renamed
    /// file cannot leave the page half-loaded.
    #[test]
    fn index_names_only_embedded_assets() {
        let html = std::str::from_utf8(INDEX.body).unwrap();
        let named: Vec<&str> = html
            .split("/assets/")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap())
            .collect();
        assert!(named.len() >= 3, "index.html names {named:?}");
        for name in named {
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "index.html loads /assets/{name}, which is not embedded"
            );
        }
    }
}
