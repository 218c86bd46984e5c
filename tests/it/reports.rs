//! Long-running tasks: an endpoint answers 202 and reports the outcome later to the URL
//! the call carried.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Endpoint, eventually, spawn_app, spawn_app_with};

/// Posts a report; returns the status and body.
async fn report(url: &str, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("server answers");
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn an_accepted_task_finishes_with_its_reported_outcome_once() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&json!({"tasks": [
            {"endpoint": endpoint.url("accept"), "params": {"n": 1}},
            {"endpoint": endpoint.url("accept"), "params": {"n": 2}},
        ], "options": {"async_reports": true}}))
        .await;
    let calls = eventually("both calls", || async {
        let calls = endpoint.calls();
        (calls.len() == 2).then_some(calls)
    })
    .await;
    let (token, url) = (
        calls[0].header("doparallel-task-token"),
        calls[0].header("doparallel-result-url"),
    );
    assert_eq!(url, format!("{}/v1/tasks/{token}/result", app.base));
    assert_ne!(token, calls[1].header("doparallel-task-token"));

    // Accepted, not finished: the tasks wait for their reports.
    let job = eventually("the 202s to be stored", || async {
        let job = app.job(&id).await;
        (job["counts"]["running"] == 2).then_some(job)
    })
    .await;
    assert_eq!(job["status"], "Running");

    // Numbers kept as sent.
    let (status, body) = report(&url, r#"{"status":"Complete","result":{"x":1.50}}"#).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = report(&url, r#"{"status":"Complete","result":2}"#).await;
    assert_eq!(status, 409, "a second report: {body}");
    let other = calls[1].header("doparallel-result-url");
    let (status, body) = report(&other, r#"{"status":"Failed","error":{"why":"no"}}"#).await;
    assert_eq!(status, 200, "{body}");

    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let first = if calls[0].body.contains("1") {
        "1"
    } else {
        "2"
    };
    let second = if first == "1" { "2" } else { "1" };
    assert_eq!(job["result"][first]["result"], json!({"x": 1.50}));
    assert_eq!(job["result"][second]["status"], "Failed");
    assert_eq!(job["result"][second]["error"], json!({"why": "no"}));
    assert_eq!(
        endpoint.call_count(),
        2,
        "a reported outcome is not retried"
    );
}

#[tokio::test]
async fn a_bad_report_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("accept"), "params": {}}], "options": {"async_reports": true}}))
        .await;
    let call = eventually("the call", || async { endpoint.calls().pop() }).await;
    let token = call.header("doparallel-task-token");
    let url = call.header("doparallel-result-url");

    // A token with its MAC changed, and one for another attempt of the same task.
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let other_attempt = token.replacen(".1.1.", ".1.2.", 1);
    assert_ne!(other_attempt, token);
    for bad in [forged, other_attempt, "nonsense".to_string()] {
        let (status, body) = report(
            &format!("{}/v1/tasks/{bad}/result", app.base),
            r#"{"status":"Complete","result":1}"#,
        )
        .await;
        assert_eq!(status, 404, "{bad}: {body}");
    }
    for (body, expected, says) in [
        ("not json", 400, "task report"),
        (r#"{"status":"Done"}"#, 400, "unknown variant `Done`"),
        (r#"{"status":"Complete","extra":1}"#, 400, "extra"),
    ] {
        let (status, answer) = report(&url, body).await;
        assert_eq!(status, expected, "{body}: {answer}");
        assert!(answer["msg"].as_str().unwrap().contains(says), "{answer}");
    }
    assert_eq!(app.job(&id).await["counts"]["running"], 1);
}

#[tokio::test]
async fn a_report_may_come_before_the_202() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("report-first"), "params": {"a": 1}}], "options": {"async_reports": true}}))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    assert_eq!(job["result"]["1"]["result"], json!({"early": {"a": 1}}));
}

#[tokio::test]
async fn an_unreported_task_times_out_and_is_retried_then_fails() {
    let mut config = crate::helpers::test_settings();
    // The sweep that finds overdue tasks runs every third of the lease timeout.
    config.lease_timeout = Duration::from_millis(300);
    let app = spawn_app_with(config).await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&json!({
            "tasks": [{"endpoint": endpoint.url("accept"), "params": {}}],
            "options": {"async_timeout_ms": 200, "max_attempts": 2, "backoff_ms": 0, "async_reports": true},
        }))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let task = &job["result"]["1"];
    assert_eq!(task["error"]["kind"], "timeout", "{task}");
    assert!(
        task["error"]["message"]
            .as_str()
            .unwrap()
            .contains("200 ms"),
        "{task}"
    );
    let calls = endpoint.calls();
    assert_eq!(calls.len(), 2, "one retry after the first timeout");
    // The first attempt's token is no good once that attempt timed out.
    let (status, body) = report(
        &calls[0].header("doparallel-result-url"),
        r#"{"status":"Complete","result":1}"#,
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

/// Without `--public-url`, a job that does not ask for reports tells its endpoints nothing
/// of the server's address: no task token, no result URL; a 202 is then a success like any
/// 2xx. With `async_reports`, its calls carry both.
#[tokio::test]
async fn only_jobs_that_ask_for_reports_learn_where_to_send_them() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let plain = app
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("accept"), "params": {}}]}))
        .await;
    let job = app.wait_settled(&plain).await;
    assert_eq!(job["status"], "Complete", "{job}");
    let call = &endpoint.calls()[0];
    assert_eq!(call.header("doparallel-result-url"), "");
    assert_eq!(call.header("doparallel-task-token"), "");

    app.submit(
        &json!({"tasks": [{"endpoint": endpoint.url("accept"), "params": {}}],
        "options": {"async_reports": true}}),
    )
    .await;
    let call = eventually("the second call", || async {
        endpoint.calls().get(1).cloned()
    })
    .await;
    assert!(
        call.header("doparallel-result-url")
            .starts_with("http://127.0.0.1:")
    );
    assert!(!call.header("doparallel-task-token").is_empty());
}

#[tokio::test]
async fn heartbeats_keep_an_accepted_task_alive_and_show_its_progress() {
    let mut config = crate::helpers::test_settings();
    // The sweep that finds overdue tasks runs every third of the lease timeout.
    config.lease_timeout = Duration::from_millis(300);
    let app = spawn_app_with(config).await;
    let endpoint = Endpoint::start().await;
    // Two accepted tasks; only the first keeps sending heartbeats.
    let id = app
        .submit(&json!({"tasks": [
            {"endpoint": endpoint.url("accept"), "params": {"n": 1}},
            {"endpoint": endpoint.url("accept"), "params": {"n": 2}},
        ], "options": {"async_reports": true, "async_heartbeat_ms": 600, "max_attempts": 1}}))
        .await;
    let calls = eventually("both calls", || async {
        let calls = endpoint.calls();
        (calls.len() == 2).then_some(calls)
    })
    .await;
    let (alive, silent) = if calls[0].body.contains('1') {
        (&calls[0], &calls[1])
    } else {
        (&calls[1], &calls[0])
    };
    let beat_url = alive.header("doparallel-heartbeat-url");
    assert_eq!(
        beat_url,
        format!(
            "{}/v1/tasks/{}/heartbeat",
            app.base,
            alive.header("doparallel-task-token")
        )
    );
    // The silent one times out after 600 ms without news; the other lives on as long as
    // it beats (three times its interval here), and shows its progress.
    let mut beats = 0;
    let job = eventually("the silent task to time out", || {
        beats += 1;
        let (beat_url, app, id) = (&beat_url, &app, &id);
        let progress = json!({"progress": {"done": beats}}).to_string();
        async move {
            let (status, body) = report(beat_url, &progress).await;
            assert_eq!(status, 202, "{body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let job = app.job(id).await;
            (job["counts"]["failed"] == 1).then_some(job)
        }
    })
    .await;
    assert_eq!(job["counts"]["running"], 1, "{job}");
    let tasks = app.tasks(&id).await;
    let (alive_task, silent_task) = (&tasks[0], &tasks[1]);
    assert_eq!(alive_task["status"], "Running");
    assert!(
        alive_task["progress"]["done"].as_u64().unwrap() >= 1,
        "{alive_task}"
    );
    assert_eq!(silent_task["status"], "Failed");
    assert_eq!(silent_task["error"]["kind"], "timeout");
    assert!(
        silent_task["error"]["message"]
            .as_str()
            .unwrap()
            .contains("heartbeat"),
        "{silent_task}"
    );
    assert_eq!(
        report(&silent.header("doparallel-heartbeat-url"), "")
            .await
            .0,
        409,
        "a heartbeat of a task that timed out for good"
    );
    // Kept alive past its interval many times over.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (status, _) = report(&beat_url, "").await;
        assert_eq!(status, 202, "an empty heartbeat");
    }
    assert_eq!(app.tasks(&id).await[0]["status"], "Running");

    // Refusals: too much progress, a body that is not a heartbeat, an unknown token.
    let big = json!({"progress": "x".repeat(5000)}).to_string();
    let (status, body) = report(&beat_url, &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("4096"), "{body}");
    let (status, body) = report(&beat_url, r#"{"progres": 1}"#).await;
    assert_eq!(status, 400, "{body}");
    let unknown = format!("{}/v1/tasks/nonsense/heartbeat", app.base);
    let (status, body) = report(&unknown, "").await;
    assert_eq!(status, 404, "{body}");
    // Its outcome reported, a heartbeat is told to stop.
    let result_url = alive.header("doparallel-result-url");
    let (status, body) = report(&result_url, r#"{"status":"Complete","result":1}"#).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = report(&beat_url, "").await;
    assert_eq!(status, 409, "{body}");
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Failed", "{job}");
}
