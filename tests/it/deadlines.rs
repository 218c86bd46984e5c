//! A job's time budget through the API (`options.deadline_ms`): unfinished tasks fail with
//! error kind `deadline` and their calls stop, the callback goes at once, a paused job's
//! budget still runs, `PATCH` moves it, and one that passed while the server was down is
//! applied at start. The store's part runs on every backend in `store.rs`.

use serde_json::{Value, json};

use crate::helpers::*;

async fn patch(app: &TestApp, id: &str, body: Value) -> (u16, Value) {
    let resp = app
        .http
        .patch(format!("{}/v1/jobs/{id}", app.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
}

/// A job of tasks to `echo` first, then to `hang`, whose calls never answer.
fn echo_then_hang(endpoint: &Endpoint, echo: usize, hang: usize, options: Value) -> Value {
    let tasks: Vec<Value> = (0..echo)
        .map(|i| json!({"endpoint": endpoint.url("echo"), "params": {"i": i}}))
        .chain((0..hang).map(|i| json!({"endpoint": endpoint.url("hang"), "params": {"h": i}})))
        .collect();
    json!({"tasks": tasks, "options": options})
}

#[tokio::test]
async fn a_job_past_its_deadline_fails_its_unfinished_tasks_and_calls_back() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let mut job = echo_then_hang(
        &endpoint,
        2,
        2,
        json!({"deadline_ms": 800, "max_attempts": 1}),
    );
    job["callback"] = json!(receiver.url());
    let id = app.submit(&job).await;
    let view = app.job(&id).await;
    assert!(view["deadline_at"].is_string(), "{view}");
    assert_eq!(view["options"]["deadline_ms"], 800);

    // The hanging calls are in flight until the deadline ends them.
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Failed", "{}", delivery.body);
    let results = &delivery.body["result"];
    let kinds: Vec<&str> = (1..=4)
        .map(|i| {
            let entry = &results[i.to_string()];
            entry["error"]["kind"]
                .as_str()
                .unwrap_or(entry["status"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        kinds,
        ["Complete", "Complete", "deadline", "deadline"],
        "{results}"
    );
    eventually("the hanging calls to be aborted", || async {
        (endpoint.in_flight() == 0).then_some(())
    })
    .await;
    let view = app.job(&id).await;
    assert_eq!(
        (
            view["counts"]["complete"].as_u64(),
            view["counts"]["failed"].as_u64()
        ),
        (Some(2), Some(2)),
        "{view}"
    );
    // The tasks' own reads say the same.
    let (_, page) = app.get(&format!("/v1/jobs/{id}/tasks?status=Failed")).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2, "{page}");

    // Within its tolerance, the job past its deadline is Complete.
    let id = app
        .submit(&echo_then_hang(
            &endpoint,
            1,
            1,
            json!({"deadline_ms": 300, "tolerated_failures": 1}),
        ))
        .await;
    let view = app.wait_settled(&id).await;
    assert_eq!(view["status"], "Complete", "{view}");
    assert_eq!(view["result"]["2"]["error"]["kind"], "deadline", "{view}");
}

#[tokio::test]
async fn a_paused_jobs_deadline_runs_and_patch_moves_it() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    // Paused before any call: its deadline still ends it.
    let id = app
        .submit(&echo_then_hang(
            &endpoint,
            0,
            3,
            json!({"deadline_ms": 600, "not_before": doparallel::job::Timestamp::from_millis(doparallel::store::now_millis() + 3_600_000).to_string()}),
        ))
        .await;
    let (status, view) = app
        .post_raw(&format!("/v1/jobs/{id}/pause"), None, "")
        .await;
    assert_eq!(
        (status, view["status"].as_str()),
        (200, Some("Paused")),
        "{view}"
    );
    let view = app.wait_settled(&id).await;
    assert_eq!(view["status"], "Failed", "{view}");
    assert_eq!(view["counts"]["failed"], 3, "{view}");
    assert_eq!(endpoint.call_count(), 0);

    // A long budget cut short while the job runs: the next look of the sweep obeys.
    let id = app
        .submit(&echo_then_hang(
            &endpoint,
            0,
            2,
            json!({"deadline_ms": 3_600_000}),
        ))
        .await;
    eventually("both calls", || async {
        (endpoint.in_flight() == 2).then_some(())
    })
    .await;
    let out = crate::client::cli(&app.base, &["update", &id, "--priority", "-3"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("\npriority -3"), "{out:?}");
    let out = crate::client::cli(&app.base, &["update", &id, "--deadline-ms", "200"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("\ndeadline 20"), "{out:?}");
    assert_eq!(app.job(&id).await["options"]["deadline_ms"], 200);
    let view = app.wait_settled(&id).await;
    assert_eq!(view["status"], "Failed", "{view}");
    assert_eq!(view["result"]["1"]["error"]["kind"], "deadline", "{view}");

    // Bad budgets are refused by name.
    let (status, body) = patch(&app, &id, json!({"options": {"deadline_ms": 0}})).await;
    assert_eq!(status, 409, "a finished job: {body}");
    for (options, says) in [
        (json!({"deadline_ms": 0}), "options.deadline_ms"),
        (
            json!({"deadline_ms": 2_592_000_001u64}),
            "options.deadline_ms",
        ),
        (
            json!({"async_heartbeat_ms": 5000, "async_timeout_ms": 1000}),
            "options.async_heartbeat_ms",
        ),
    ] {
        let body = json!({"tasks": [{"endpoint": endpoint.url("echo")}], "options": options});
        let (status, answer) = app
            .post_raw("/v1/job", Some("application/json"), &body.to_string())
            .await;
        assert_eq!(status, 422, "{answer}");
        assert!(
            answer["msg"].as_str().unwrap().starts_with(says),
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passed_while_the_server_was_down_is_applied_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let mut server = ServerProcess::start(&db, &[]);
    let mut job = echo_then_hang(&endpoint, 1, 2, json!({"deadline_ms": 1500}));
    job["callback"] = json!(receiver.url());
    let id = server.api.submit(&job).await;
    eventually("the hanging calls", || async {
        (endpoint.in_flight() == 2).then_some(())
    })
    .await;
    let deadline_at = server.api.job(&id).await["deadline_at"]
        .as_str()
        .map(|t| doparallel::job::Timestamp::parse(t).unwrap().millis())
        .expect("a deadline");
    server.sigkill();
    // Down until past the deadline.
    let left = deadline_at + 100 - doparallel::store::now_millis();
    if left > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(left as u64)).await;
    }
    let server = ServerProcess::start(&db, &[]);
    let view = server.api.wait_settled(&id).await;
    assert_eq!(view["status"], "Failed", "{view}");
    assert_eq!(view["result"]["1"]["status"], "Complete", "{view}");
    for i in ["2", "3"] {
        assert_eq!(view["result"][i]["error"]["kind"], "deadline", "{view}");
    }
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Failed", "{}", delivery.body);
}
