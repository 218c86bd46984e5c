//! The dashboard through the real server: the page and its assets are served beside the API,
//! whose answer for an unknown route stays its JSON 404.

use crate::helpers::{spawn_app, spawn_app_full, test_settings};

#[tokio::test]
async fn the_page_and_its_assets_are_served_beside_the_api() {
    let app = spawn_app().await;
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
    ] {
        let response = app
            .http
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .expect("server answers");
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        assert_eq!(response.headers()["cache-control"], "no-cache", "{path}");
    }

    let (status, body) = app.get("/v1/no-such-route").await;
    assert_eq!(status, 404);
    assert_eq!(body["msg"], "no such route");
    let (status, _) = app.get("/assets/no-such-file.js").await;
    assert_eq!(status, 404);
}

/// With tokens, the page needs one too, and asks a browser for it with a Basic challenge of
/// its own; the static scripts and styles, the same for everyone, stay open.
#[tokio::test]
async fn with_tokens_the_page_asks_for_one() {
    let token = "dashboard-token-0123456789";
    let tokens = doparallel::auth::ApiTokens::new([token]).unwrap();
    let app = spawn_app_full(test_settings(), tokens, 1024 * 1024).await;
    for path in ["/", "/v1/jobs"] {
        let resp = app
            .http
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        let challenges: Vec<&str> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(
            challenges.iter().any(|c| c.starts_with("Basic ")),
            "{challenges:?}"
        );
    }
    let (status, _) = app.get("/assets/app.js").await;
    assert_eq!(status, 200);
    let page = app
        .http
        .get(format!("{}/", app.base))
        .basic_auth("me", Some(token))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
}
