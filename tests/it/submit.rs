//! Submitting jobs: the accepted response, and every kind of bad input refused with a
//! clear message and nothing stored.

use serde_json::{Value, json};

use crate::helpers::{Receiver, spawn_app};

/// Posts `body` and checks the status and that the message contains `msg`.
async fn check(
    app: &crate::helpers::Api,
    content_type: Option<&str>,
    body: &str,
    status: u16,
    msg: &str,
) {
    let (got, answer) = app.post_raw("/v1/job", content_type, body).await;
    assert_eq!(got, status, "body {body:?}: {answer}");
    assert_eq!(answer["status"], "Error", "body {body:?}: {answer}");
    let text = answer["msg"].as_str().unwrap();
    assert!(
        text.contains(msg),
        "body {body:?}: message {text:?} lacks {msg:?}"
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let app = spawn_app().await;
    let json = Some("application/json");
    check(&app, json, "{\"tasks\": [", 400, "malformed JSON").await;
    check(&app, json, "", 400, "malformed JSON").await;
    check(
        &app,
        Some("text/plain"),
        r#"{"tasks":[]}"#,
        415,
        "Content-Type: application/json",
    )
    .await;
    check(&app, None, r#"{"tasks":[]}"#, 415, "Content-Type").await;
    check(
        &app,
        json,
        r#"{"calback":"http://127.0.0.1:9/x","tasks":[]}"#,
        422,
        "unknown field `calback`",
    )
    .await;
    check(
        &app,
        json,
        r#"{"callback":"http://127.0.0.1:9/x"}"#,
        422,
        "missing field `tasks`",
    )
    .await;
    check(&app, json, r#"[1,2]"#, 422, "job: expected an object").await;
    check(
        &app,
        json,
        r#"{"tasks":{"a":1}}"#,
        422,
        "tasks: expected a list of tasks, got an object",
    )
    .await;
    check(
        &app,
        json,
        r#"{"tasks":[{"endpoint":5}]}"#,
        422,
        "task 1: endpoint: expected a string (an http(s) URL or /v1/test), got the number 5",
    )
    .await;
    check(
        &app,
        json,
        r#"{"tasks":[{"endpoint":"/v1/test"},{"endpoint":"mylambda.com/x"}]}"#,
        422,
        "task 2: endpoint \"mylambda.com/x\" is not an absolute http(s) URL",
    )
    .await;
    check(
        &app,
        json,
        r#"{"tasks":[{"endpoint":"/v1/test","param":{}}]}"#,
        422,
        "task 1: unknown field `param`",
    )
    .await;
    check(
        &app,
        json,
        r#"{"tasks":[],"callback":"/relative"}"#,
        422,
        "callback:",
    )
    .await;
    check(
        &app,
        json,
        r#"{"tasks":[],"options":{"retries":3}}"#,
        422,
        "options: unknown field `retries`",
    )
    .await;
    check(
        &app,
        json,
        r#"{"tasks":[],"options":{"timeout_ms":0}}"#,
        422,
        "options.timeout_ms",
    )
    .await;

    let (status, list) = app.get("/v1/jobs").await;
    assert_eq!(status, 200);
    assert_eq!(
        list["jobs"],
        json!([]),
        "a refused request stored something"
    );
}

#[tokio::test]
async fn an_accepted_job_answers_as_the_seed_did() {
    let app = spawn_app().await;
    let resp = app
        .http
        .post(format!("{}/v1/job", app.base))
        .json(&json!({"tasks": [{"endpoint": "/v1/test", "params": {"a": "1"}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "Success");
    assert_eq!(body["msg"], "Job Executed");
    let id = body["job_id"].as_str().unwrap();
    assert_eq!(body["status_url"], format!("/v1/jobs/{id}"));
    assert_eq!(location, format!("/v1/jobs/{id}"));

    let job = app.wait_settled(id).await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(job["total"], 1);
    assert_eq!(
        job["counts"],
        json!({"pending":0,"running":0,"queued":0,"complete":1,"failed":0,"cancelled":0})
    );
    assert_eq!(job["callback"]["state"], "none");
    assert!(job["finished_at"].is_string());
    assert_eq!(
        job["result"],
        json!({"1": {"status":"Complete","result":{"result":"true","params":{"a":"1"}}}})
    );
}

#[tokio::test]
async fn the_plural_alias_and_the_job_list_work() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_raw(
            "/v1/jobs",
            Some("application/json; charset=utf-8"),
            r#"{"tasks":[]}"#,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let first = body["job_id"].as_str().unwrap().to_string();
    let second = app.submit(&json!({"tasks": []})).await;
    let (_, list) = app.get("/v1/jobs?limit=1").await;
    assert_eq!(list["jobs"][0]["job_id"], second.as_str(), "newest first");
    let (_, rest) = app.get(&format!("/v1/jobs?after={second}")).await;
    assert_eq!(rest["jobs"][0]["job_id"], first.as_str());
    let (status, body) = app.get("/v1/jobs?status=Bogus").await;
    assert_eq!(status, 400);
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .contains("unknown variant `Bogus`"),
        "{body}"
    );
}

#[tokio::test]
async fn an_empty_job_finishes_at_once_and_calls_back() {
    let app = spawn_app().await;
    let mut receiver = Receiver::start(0, 200).await;
    let id = app
        .submit(&json!({"callback": receiver.url(), "tasks": []}))
        .await;
    let delivery = receiver.next().await;
    assert_eq!(
        delivery.body,
        json!({"job_id": id, "status": "Complete", "msg": "Job Finished", "result": {}})
    );
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(job["callback"]["state"], "delivered");
}

#[tokio::test]
async fn unknown_jobs_and_routes_are_json_404s() {
    let app = spawn_app().await;
    for path in [
        "/v1/jobs/01900000-0000-7000-8000-000000000000",
        "/v1/jobs/not-an-id",
        "/v1/jobs/01900000-0000-7000-8000-000000000000/tasks",
        "/nowhere",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["status"], "Error", "{path}: {body}");
    }
}

#[tokio::test]
async fn the_test_route_and_health_answer() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_raw("/v1/test", Some("application/json"), r#"{"x":[1,2]}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"result": "true", "params": {"x": [1, 2]}}));
    let (status, body) = app.get("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
}
