//! The dashboard through the real server: the page and its assets are served beside the API,
//! whose answer for an unknown route stays its JSON 404.

use crate::helpers::spawn_app;

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
