//! What a task's call looks like and what each kind of answer makes of it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    Endpoint, TestApp, eventually, job_of, spawn_app, spawn_app_with, test_settings,
};

/// Runs a one-task job against `route` with fast retries; returns the task as listed.
async fn run_one(
    app: &TestApp,
    endpoint: &Endpoint,
    route: &str,
    options: Value,
) -> (Value, Value) {
    let mut opts = json!({"backoff_ms": 10, "timeout_ms": 2000});
    opts.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    let id = app
        .submit(&json!({"tasks": [{"endpoint": endpoint.url(route), "params": {"n": 1}}], "options": opts}))
        .await;
    let job = app.wait_settled(&id).await;
    let tasks = app.tasks(&id).await;
    (job, tasks[0].clone())
}

#[tokio::test]
async fn the_call_carries_params_and_headers() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let params = r#"{"big": 12345678901234567890123, "f": 1.10, "s": "é"}"#;
    let body = format!(
        r#"{{"tasks":[{{"endpoint":"/v1/test"}},{{"endpoint":"{}","params":{params}}}]}}"#,
        endpoint.url("echo")
    );
    let (status, answer) = app
        .post_raw("/v1/job", Some("application/json"), &body)
        .await;
    assert_eq!(status, 202);
    let id = answer["job_id"].as_str().unwrap();
    app.wait_settled(id).await;

    let calls = endpoint.calls();
    assert_eq!(calls.len(), 1, "the /v1/test task makes no network call");
    let call = &calls[0];
    let compact = r#"{"big":12345678901234567890123,"f":1.10,"s":"é"}"#;
    assert_eq!(
        call.body, compact,
        "the body is the params as sent, without the blanks"
    );
    assert_eq!(call.header("content-type"), "application/json");
    assert_eq!(call.header("doparallel-job-id"), id);
    assert_eq!(call.header("doparallel-task"), "2");
    assert_eq!(call.header("doparallel-attempt"), "1");
    assert_eq!(call.header("idempotency-key"), format!("{id}:2"));

    // The echoed numbers come back digit for digit.
    let resp = app
        .http
        .get(format!("{}/v1/jobs/{id}", app.base))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("12345678901234567890123"), "{text}");
    assert!(text.contains("1.10"), "{text}");
}

#[tokio::test]
async fn answers_become_results() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let (_, task) = run_one(&app, &endpoint, "text", json!({})).await;
    assert_eq!(task["result"], "plain text");
    let (_, task) = run_one(&app, &endpoint, "empty", json!({})).await;
    assert_eq!(
        (task["status"].as_str(), &task["result"]),
        (Some("Complete"), &Value::Null)
    );
    let (job, _) = run_one(&app, &endpoint, "numbers", json!({})).await;
    let raw = app
        .http
        .get(format!(
            "{}/v1/jobs/{}",
            app.base,
            job["job_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        raw.contains(r#"{"big":12345678901234567890123,"f":1.10,"e":-0.0e-7}"#),
        "{raw}"
    );
}

#[tokio::test]
async fn a_server_error_is_retried_until_it_succeeds() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let (job, task) = run_one(&app, &endpoint, "flaky", json!({})).await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(task["status"], "Complete");
    assert_eq!(task["attempts"], 2);
    let calls = endpoint.calls();
    let attempts: Vec<String> = calls
        .iter()
        .map(|c| c.header("doparallel-attempt"))
        .collect();
    assert_eq!(attempts, ["1", "2"]);
    assert_eq!(
        calls[0].header("idempotency-key"),
        calls[1].header("idempotency-key")
    );
}

#[tokio::test]
async fn a_server_error_that_persists_fails_the_task_and_the_job() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let (job, task) = run_one(&app, &endpoint, "fail", json!({"max_attempts": 3})).await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(job["counts"]["failed"], 1);
    assert_eq!(task["attempts"], 3);
    assert_eq!(task["error"]["kind"], "http_status");
    assert_eq!(task["error"]["http_status"], 500);
    assert_eq!(task["error"]["body"].as_str().unwrap().len(), 1024);
    assert_eq!(endpoint.call_count(), 3);
    assert_eq!(
        job["result"]["1"],
        json!({"status": "Failed", "error": task["error"], "attempts": 3})
    );
}

#[tokio::test]
async fn a_client_error_fails_at_once() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let (job, task) = run_one(&app, &endpoint, "missing", json!({})).await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(
        (
            task["attempts"].as_u64(),
            task["error"]["http_status"].as_u64()
        ),
        (Some(1), Some(404))
    );
    assert_eq!(endpoint.call_count(), 1);
}

#[tokio::test]
async fn a_hanging_endpoint_times_out() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let (job, task) = run_one(
        &app,
        &endpoint,
        "hang",
        json!({"timeout_ms": 200, "max_attempts": 2}),
    )
    .await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(task["error"]["kind"], "timeout");
    assert_eq!(task["attempts"], 2);
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_fails() {
    let app = spawn_app().await;
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let id = app
        .submit(&json!({"tasks": [{"endpoint": format!("http://127.0.0.1:{port}/x")}], "options": {"backoff_ms": 5}}))
        .await;
    app.wait_settled(&id).await;
    let task = &app.tasks(&id).await[0];
    assert_eq!(
        (task["error"]["kind"].as_str(), task["attempts"].as_u64()),
        (Some("connect"), Some(3))
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let (job, task) = run_one(&app, &endpoint, "limited", json!({})).await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(task["attempts"], 2);
    let calls = endpoint.calls();
    let waited = calls[1].at - calls[0].at;
    // The backoff alone would be at most 10 ms; the server asked for a second.
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}"
    );
}

#[tokio::test]
async fn tolerated_failures_keep_a_job_complete() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let job = json!({"tasks": [
        {"endpoint": endpoint.url("missing")},
        {"endpoint": endpoint.url("echo"), "params": 1},
    ], "options": {"tolerated_failures": 1}});
    let id = app.submit(&job).await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(job["result"]["1"]["status"], "Failed");
    assert_eq!(
        job["result"]["2"],
        json!({"status": "Complete", "result": 1})
    );
}

#[tokio::test]
async fn a_job_never_exceeds_its_concurrency() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&job_of(
            30,
            &endpoint.url("slow?ms=30"),
            None,
            json!({"concurrency": 3}),
        ))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["counts"]["complete"], 30);
    let max = endpoint.max_in_flight();
    assert!((2..=3).contains(&max), "{max} calls were in flight at once");
}

#[tokio::test]
async fn max_in_flight_bounds_all_jobs_together() {
    let app = spawn_app_with(doparallel::Settings {
        max_in_flight: 4,
        ..test_settings()
    })
    .await;
    let endpoint = Endpoint::start().await;
    let a = app
        .submit(&job_of(20, &endpoint.url("slow?ms=20"), None, json!({})))
        .await;
    let b = app
        .submit(&job_of(20, &endpoint.url("slow?ms=20"), None, json!({})))
        .await;
    app.wait_settled(&a).await;
    app.wait_settled(&b).await;
    let max = endpoint.max_in_flight();
    assert!((2..=4).contains(&max), "{max} calls were in flight at once");
}

#[tokio::test]
async fn a_small_job_is_not_held_up_by_a_large_one() {
    let app = spawn_app_with(doparallel::Settings {
        max_in_flight: 8,
        ..test_settings()
    })
    .await;
    let endpoint = Endpoint::start().await;
    let big = app
        .submit(&job_of(600, &endpoint.url("slow?ms=20"), None, json!({})))
        .await;
    // Once the big job fills every slot, the small one arrives.
    eventually("the big job to start", || async {
        (endpoint.call_count() >= 8).then_some(())
    })
    .await;
    let small = app
        .submit(&job_of(10, &endpoint.url("slow?ms=20"), None, json!({})))
        .await;
    let small_job = app.wait_settled(&small).await;
    assert_eq!(small_job["status"], "Complete");
    let big_job = app.job(&big).await;
    let done = big_job["counts"]["complete"].as_u64().unwrap();
    assert!(
        done < 300,
        "the small job waited for {done} of the big job's 600 tasks"
    );
    app.wait_settled(&big).await;
}

#[tokio::test]
async fn the_tasks_route_pages_in_order() {
    let app = spawn_app().await;
    let id = app.submit(&job_of(25, "/v1/test", None, json!({}))).await;
    app.wait_settled(&id).await;
    let tasks = app.tasks(&id).await;
    let indexes: Vec<u64> = tasks.iter().map(|t| t["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, (1..=25).collect::<Vec<u64>>());
    assert_eq!(tasks[4]["result"]["params"], json!({"i": 5}));
    let (status, body) = app.get(&format!("/v1/jobs/{id}/tasks?limit=0")).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = app.get(&format!("/v1/jobs/{id}/tasks?after=x")).await;
    assert_eq!(status, 400, "{body}");
}
