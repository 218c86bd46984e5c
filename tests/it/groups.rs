//! Groups of jobs with limits of their own (`PUT /v1/groups/{name}`): the routes, and the
//! limits holding for a group's jobs together, counted by the endpoint they call. Across
//! several nodes: `cluster.rs`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Endpoint, ServerProcess, db_path, job_of, spawn_app_with, test_settings};

const A: &str = "groups-a-token-0123456789";
const B: &str = "groups-b-token-0123456789";

/// A request as `token`: the status and the JSON body.
async fn as_token(
    server: &ServerProcess,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let api = &server.api;
    let mut request = api
        .http
        .request(method, format!("{}{path}", api.base))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let resp = request.send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_routes_set_show_and_remove_limits() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        &db_path(&dir),
        &[
            "--api-token",
            A,
            "--api-token",
            B,
            "--group-concurrency",
            "7",
        ],
    );
    let (status, set) = as_token(
        &server,
        A,
        Method::PUT,
        "/v1/groups/acme",
        Some(r#"{"concurrency": 2, "rate": 5}"#),
    )
    .await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(set["concurrency"], 2);
    assert_eq!(set["rate"], 5.0);
    assert_eq!(set["own"], json!({"concurrency": 2, "rate": 5.0}));
    let (_, shown) = as_token(&server, A, Method::GET, "/v1/groups/acme", None).await;
    assert_eq!(shown, set);

    // The same name under another token is another group: the server's default.
    let (status, other) = as_token(&server, B, Method::GET, "/v1/groups/acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(other["concurrency"], 7);
    assert_eq!(other["own"], Value::Null);
    let (_, listed) = as_token(&server, B, Method::GET, "/v1/groups", None).await;
    assert_eq!(listed, json!({"default_concurrency": 7, "groups": []}));
    let (_, listed) = as_token(&server, A, Method::GET, "/v1/groups", None).await;
    assert_eq!(listed["groups"].as_array().unwrap().len(), 1);
    assert_eq!(listed["groups"][0]["name"], "acme");

    // Bad input: what is wrong, and where; nothing stored.
    for (path, body, status, says) in [
        (
            "/v1/groups/acme",
            r#"{"concurrency": 0}"#,
            422,
            "concurrency: 0",
        ),
        ("/v1/groups/acme", r#"{"rate": -1}"#, 422, "rate: -1"),
        (
            "/v1/groups/acme",
            r#"{"concurency": 3}"#,
            422,
            "unknown field `concurency`",
        ),
        ("/v1/groups/acme", r#"{"concurrency": "#, 400, "expected"),
        (
            "/v1/groups/a%20b",
            r#"{"concurrency": 1}"#,
            422,
            "not a group name",
        ),
    ] {
        let (got, body) = as_token(&server, A, Method::PUT, path, Some(body)).await;
        assert_eq!(got, status, "{path} {body}");
        let msg = body["msg"].as_str().unwrap();
        assert!(msg.contains(says), "{msg}");
    }
    let (_, unchanged) = as_token(&server, A, Method::GET, "/v1/groups/acme", None).await;
    assert_eq!(unchanged, set);

    // Removed: the default again; a second time there is nothing to remove.
    let (status, removed) = as_token(&server, A, Method::DELETE, "/v1/groups/acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(removed["concurrency"], 7);
    assert_eq!(removed["own"], Value::Null);
    let (status, _) = as_token(&server, A, Method::DELETE, "/v1/groups/acme", None).await;
    assert_eq!(status, 404);
    let (status, _) = server.api.get("/v1/groups").await;
    assert_eq!(status, 401, "a token is needed");
}

/// Four jobs of one group limited to 3 calls in flight, with every slot of the node free:
/// the endpoint never sees more than 3 of them at once, and the group's list shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_calls_in_flight_stay_within_its_concurrency() {
    let endpoint = Endpoint::start().await;
    let app = spawn_app_with(test_settings()).await;
    let (status, _) = app
        .api
        .put("/v1/groups/acme", r#"{"concurrency": 3}"#)
        .await;
    assert_eq!(status, 200);
    let mut jobs = Vec::new();
    for _ in 0..4 {
        let job = job_of(
            10,
            &endpoint.url("slow?ms=60"),
            None,
            json!({"group": "acme"}),
        );
        jobs.push(app.api.submit(&job).await);
    }
    let (_, busy) = crate::helpers::eventually("the group's calls under way", || async {
        let (status, group) = app.api.get("/v1/groups/acme").await;
        (group["in_flight"].as_u64() > Some(0)).then_some((status, group))
    })
    .await;
    assert!(busy["in_flight"].as_u64().unwrap() <= 3, "{busy}");
    assert_eq!(busy["jobs"], 4);
    for job in &jobs {
        assert_eq!(app.api.wait_settled(job).await["status"], "Complete");
    }
    assert_eq!(endpoint.call_count(), 40);
    assert_eq!(endpoint.max_in_flight(), 3, "at most 3, and all 3 used");
}

/// A group limited to 20 calls a second: 30 calls of its three jobs start 50 ms apart,
/// never 21 within 0.9 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_rate_spaces_its_calls() {
    let endpoint = Endpoint::start().await;
    let app = spawn_app_with(test_settings()).await;
    let (status, _) = app.api.put("/v1/groups/paced", r#"{"rate": 20}"#).await;
    assert_eq!(status, 200);
    let mut jobs = Vec::new();
    for _ in 0..3 {
        let job = job_of(10, &endpoint.url("echo"), None, json!({"group": "paced"}));
        jobs.push(app.api.submit(&job).await);
    }
    for job in &jobs {
        assert_eq!(app.api.wait_settled(job).await["status"], "Complete");
    }
    let mut times: Vec<_> = endpoint.calls().iter().map(|c| c.at).collect();
    times.sort();
    assert_eq!(times.len(), 30);
    let span = times[29] - times[0];
    assert!(span >= Duration::from_millis(1400), "30 calls in {span:?}");
    // Unpaced, they would all start within a few milliseconds; 20 intervals are 1 s.
    for window in times.windows(21) {
        let took = window[20] - window[0];
        assert!(
            took >= Duration::from_millis(900),
            "21 calls within {took:?}"
        );
    }
    eprintln!("30 calls at 20 a second took {span:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_shows_and_removes_a_groups_limits() {
    use crate::client::cli;
    let app = spawn_app_with(test_settings()).await;
    let base = &app.api.base;
    let out = cli(base, &["group", "set", "acme", "--concurrency", "3"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let row = |out: &crate::client::Output| -> Vec<String> {
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(lines[0].starts_with("GROUP"), "{out:?}");
        lines[1].split_whitespace().map(str::to_string).collect()
    };
    assert_eq!(row(&out), ["acme", "3", "-", "0/3", "0", "own"]);
    // A limit not given keeps its value.
    let out = cli(base, &["group", "set", "acme", "--rate", "2.5"]).await;
    assert_eq!(row(&out), ["acme", "3", "2.5/s", "0/3", "0", "own"]);
    let out = cli(base, &["groups"]).await;
    assert_eq!(row(&out), ["acme", "3", "2.5/s", "0/3", "0", "own"]);
    let out = cli(base, &["group", "set", "acme", "--concurrency", "none"]).await;
    assert_eq!(row(&out), ["acme", "-", "2.5/s", "0", "0", "own"]);
    let out = cli(base, &["group", "show", "acme", "--json"]).await;
    let shown: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(shown["own"], json!({"concurrency": null, "rate": 2.5}));

    let out = cli(base, &["group", "delete", "acme"]).await;
    assert_eq!(row(&out), ["acme", "-", "-", "0", "0", "none"]);
    let out = cli(base, &["group", "delete", "acme"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("has no limits of its own"), "{out:?}");
    let out = cli(base, &["group", "set", "acme"]).await;
    assert_eq!(out.code, 2, "a limit must be named: {out:?}");
    let out = cli(base, &["group", "show", "no way"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not a group name"), "{out:?}");
    let out = cli(base, &["groups"]).await;
    assert_eq!(out.code, 0);
    assert!(out.stderr.contains("no groups"), "{out:?}");
}
