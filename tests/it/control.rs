//! Job control through the API: a delayed start (`options.not_before`, the `Scheduled`
//! status) and the client's `metadata`, in reads, lists and the callback. The store's part
//! of both runs on every backend in `store.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::helpers::*;

/// An RFC 3339 time `ms` milliseconds from now.
fn from_now(ms: i64) -> String {
    doparallel::job::Timestamp::from_millis(doparallel::store::now_millis() + ms).to_string()
}

#[tokio::test]
async fn a_delayed_job_reads_scheduled_and_starts_at_its_time() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let not_before = doparallel::store::now_millis() + 1500;
    let at = doparallel::job::Timestamp::from_millis(not_before).to_string();
    let mut job = job_of(2, &endpoint.url("echo"), None, json!({"not_before": at}));
    job["metadata"] = json!({"run": "nightly"});
    let id = app.submit(&job).await;

    let view = app.job(&id).await;
    assert_eq!(view["status"], "Scheduled", "{view}");
    assert_eq!(view["options"]["not_before"], at.as_str());
    let (_, page) = app.get("/v1/jobs?status=Scheduled").await;
    assert_eq!(page["jobs"][0]["job_id"], id.as_str(), "{page}");
    let (_, page) = app.get("/v1/jobs?status=Pending").await;
    assert_eq!(
        page["jobs"],
        json!([]),
        "a scheduled job is not listed as pending"
    );

    let view = app.wait_settled(&id).await;
    assert_eq!(view["status"], "Complete");
    let first = endpoint.calls().iter().map(|c| c.at).min().expect("called");
    let started_ms = doparallel::store::now_millis() - first.elapsed().as_millis() as i64;
    assert!(
        started_ms >= not_before - 5,
        "the first call came {} ms early",
        not_before - started_ms
    );
}

#[tokio::test]
async fn a_scheduled_job_can_be_cancelled_before_its_time() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let job = job_of(
        1,
        &endpoint.url("echo"),
        None,
        json!({"not_before": from_now(3_600_000)}),
    );
    let id = app.submit(&job).await;
    let (status, view) = app
        .post_raw(&format!("/v1/jobs/{id}/cancel"), None, "")
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "Cancelled");
    assert_eq!(endpoint.call_count(), 0);
}

#[tokio::test]
async fn not_before_and_metadata_are_checked() {
    let app = spawn_app().await;
    let refused = |job: Value| {
        let app = &app;
        async move {
            let (status, body) = app
                .post_raw("/v1/job", Some("application/json"), &job.to_string())
                .await;
            assert_eq!(status, 422, "{body}");
            body["msg"].as_str().unwrap().to_string()
        }
    };
    let task = json!([{"endpoint": "/v1/test"}]);
    let msg = refused(json!({"tasks": task, "options": {"not_before": "tomorrow"}})).await;
    assert!(
        msg.contains("options.not_before") && msg.contains("RFC 3339"),
        "{msg}"
    );
    let far = from_now(31 * 24 * 3600 * 1000);
    let msg = refused(json!({"tasks": task, "options": {"not_before": far}})).await;
    assert!(msg.contains("more than 30 days ahead"), "{msg}");
    let msg = refused(json!({"tasks": task, "metadata": ["a"]})).await;
    assert!(msg.starts_with("metadata: expected an object"), "{msg}");
    let big = json!({"tasks": task, "metadata": {"blob": "x".repeat(5000)}});
    let msg = refused(big).await;
    assert!(msg.contains("at most 4096"), "{msg}");
    // An offset is read as such, and a time past is now.
    let id = app
        .submit(&json!({"tasks": task, "options": {"not_before": "2020-01-01T12:00:00+02:00"}}))
        .await;
    let view = app.wait_settled(&id).await;
    assert_eq!(view["options"]["not_before"], "2020-01-01T10:00:00Z");
    assert_eq!(view["status"], "Complete");
    assert_eq!(app.job(&id).await["callback"]["state"], "none");
}

#[tokio::test]
async fn metadata_comes_back_in_reads_lists_and_the_callback() {
    let app = spawn_app().await;
    let mut receiver = Receiver::start(0, 200).await;
    let metadata = json!({"customer": "acme", "order": 1234, "nested": {"x": [1, 2]}});
    let mut job = json!({
        "callback": receiver.url(),
        "tasks": [{"endpoint": "/v1/test", "params": {"a": 1}}],
        "metadata": metadata,
    });
    let id = app.submit(&job).await;
    job["metadata"] = json!({"customer": "globex"});
    let other = app.submit(&job).await;

    let delivery = receiver.next().await;
    let (mine, theirs) = if delivery.body["job_id"] == id.as_str() {
        (delivery, receiver.next().await)
    } else {
        (receiver.next().await, delivery)
    };
    assert_eq!(mine.body["metadata"], metadata, "{}", mine.body);
    assert_eq!(theirs.body["metadata"], json!({"customer": "globex"}));
    // Beside status and msg, before the results.
    let text = String::from_utf8(mine.raw.to_vec()).unwrap();
    assert!(
        text.find("\"metadata\"") < text.find("\"result\""),
        "{text}"
    );
    assert_eq!(app.job(&id).await["metadata"], metadata);

    let (status, page) = app.get("/v1/jobs?metadata.customer=acme").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let (_, page) = app
        .get("/v1/jobs?metadata.customer=globex&status=Complete&limit=5")
        .await;
    assert_eq!(page["jobs"][0]["job_id"], other.as_str(), "{page}");
    let (status, body) = app
        .get("/v1/jobs?metadata.customer=acme&metadata.order=1234")
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = app.get("/v1/jobs?colour=red").await;
    assert_eq!(status, 400, "unknown parameters are still refused: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_lists_by_metadata_and_shows_scheduled_jobs() {
    let app = spawn_app().await;
    let tagged = app
        .submit(&json!({"tasks": [{"endpoint": "/v1/test"}], "metadata": {"team": "data"}}))
        .await;
    let scheduled = app
        .submit(&json!({
            "tasks": [{"endpoint": "/v1/test"}],
            "options": {"not_before": from_now(3_600_000)},
        }))
        .await;
    let out = crate::client::cli(&app.base, &["jobs", "--metadata", "team=data", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let list = out.json();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["jobs"][0]["job_id"], tagged.as_str());
    let out = crate::client::cli(&app.base, &["jobs", "--status", "scheduled"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&scheduled) && out.stdout.contains("Scheduled"),
        "{out:?}"
    );
    let out = crate::client::cli(&app.base, &["jobs", "--metadata", "team"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("is not KEY=VALUE"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_are_listed_by_group() {
    let app = spawn_app().await;
    let acme = app
        .submit(&json!({"tasks": [{"endpoint": "/v1/test"}], "options": {"group": "acme"}}))
        .await;
    app.submit(&json!({"tasks": [{"endpoint": "/v1/test"}], "options": {"group": "globex"}}))
        .await;
    let (status, page) = app.get("/v1/jobs?group=acme").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["jobs"][0]["options"]["group"], "acme");
    let out = crate::client::cli(&app.base, &["jobs", "--group", "acme", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["jobs"][0]["job_id"], acme.as_str());
    let (status, body) = app.get("/v1/jobs?group=a%20b").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["msg"].as_str().unwrap().contains("not a group name"),
        "{body}"
    );
}

/// An endpoint that answers 500 to the first call of every task whose `i` is a multiple
/// of `every`, and 200 otherwise; it counts the calls of each task.
async fn failing_every(every: u64) -> (String, Arc<Mutex<HashMap<u64, u32>>>) {
    let calls: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let seen = calls.clone();
    let app = axum::Router::new().route(
        "/t",
        axum::routing::post(move |axum::Json(params): axum::Json<Value>| {
            let seen = seen.clone();
            async move {
                let i = params["i"].as_u64().unwrap();
                let n = {
                    let mut seen = seen.lock().unwrap();
                    let n = seen.entry(i).or_insert(0);
                    *n += 1;
                    *n
                };
                if i % every == 0 && n == 1 {
                    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "not yet").into_response()
                } else {
                    axum::Json(json!({"i": i})).into_response()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/t"), calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_calls_exactly_the_failed_tasks_again() {
    // 10,000 tasks, 500 of which fail their only attempt: the retry calls those 500, and
    // only them, and a second callback carries the whole document.
    let app = spawn_app().await;
    let (url, calls) = failing_every(20).await;
    let mut receiver = Receiver::start(0, 200).await;
    let job = job_of(
        10_000,
        &url,
        Some(&receiver.url()),
        json!({"max_attempts": 1}),
    );
    let id = app.submit(&job).await;
    let first = receiver.next().await;
    assert_eq!(first.body["status"], "Failed");
    assert_eq!(first.webhook_id, format!("msg_{id}"));
    let view = app.wait_settled(&id).await;
    assert_eq!(view["counts"]["failed"], 500, "{}", view["counts"]);
    assert_eq!(view["run"], 1);

    let (status, answer) = app
        .post_raw(
            &format!("/v1/jobs/{id}/retry"),
            Some("application/json"),
            "",
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        (answer["requeued"].as_u64(), answer["run"].as_u64()),
        (Some(500), Some(2))
    );

    let second = receiver.next().await;
    assert_eq!(second.webhook_id, format!("msg_{id}_2"), "a new message");
    assert_eq!(second.body["status"], "Complete");
    let results = second.body["result"].as_object().unwrap();
    assert_eq!(
        results.len(),
        10_000,
        "the whole document: old results and new"
    );
    assert!(results.values().all(|r| r["status"] == "Complete"));
    let view = app.wait_settled(&id).await;
    assert_eq!(
        (view["status"].as_str(), view["run"].as_u64()),
        (Some("Complete"), Some(2))
    );
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.values().map(|&n| u64::from(n)).sum::<u64>(), 10_500);
    for (i, n) in calls {
        assert_eq!(n, if i % 20 == 0 { 2 } else { 1 }, "task {i}");
    }
    let task = app
        .get(&format!("/v1/jobs/{id}/tasks?after=19&limit=1"))
        .await
        .1;
    assert_eq!(
        task["tasks"][0]["attempts"], 2,
        "the attempt count goes on: {task}"
    );
}

#[tokio::test]
async fn retry_is_refused_with_reasons() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let retry = |id: String, body: &'static str| {
        let app = &app;
        async move {
            app.post_raw(
                &format!("/v1/jobs/{id}/retry"),
                Some("application/json"),
                body,
            )
            .await
        }
    };
    // Unfinished.
    let slow = app
        .submit(&job_of(1, &endpoint.url("slow?ms=3000"), None, json!({})))
        .await;
    let (status, body) = retry(slow.clone(), "").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .contains("only a finished job"),
        "{body}"
    );
    // Nothing failed.
    let fine = app
        .submit(&json!({"tasks": [{"endpoint": "/v1/test"}]}))
        .await;
    app.wait_settled(&fine).await;
    let (status, body) = retry(fine.clone(), r#"{"include": ["Failed"]}"#).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["msg"], "the job has no Failed task to retry");
    let (status, body) = retry(fine.clone(), r#"{"include": ["Complete"]}"#).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["msg"].as_str().unwrap().starts_with("include:"),
        "{body}"
    );
    let (status, _) = retry(fine.clone(), r#"{"include": "#).await;
    assert_eq!(status, 400);
    let (status, _) = retry(fine.clone(), r#"{"includes": ["Failed"]}"#).await;
    assert_eq!(status, 422);
    let (status, _) = retry(doparallel::job::JobId::generate().to_string(), "").await;
    assert_eq!(status, 404);
    // A cancelled job runs again with its cancelled tasks only.
    let (status, _) = app
        .post_raw(&format!("/v1/jobs/{slow}/cancel"), None, "")
        .await;
    assert_eq!(status, 200);
    let (status, body) = retry(slow.clone(), "").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["msg"].as_str().unwrap().contains("Cancelled"),
        "{body}"
    );
    let (status, body) = retry(slow.clone(), r#"{"include": ["Cancelled"]}"#).await;
    assert_eq!(status, 202, "{body}");
    let view = app.wait_settled(&slow).await;
    assert_eq!(view["status"], "Complete", "{view}");
    assert_eq!(endpoint.call_count(), 2, "called again after the cancel");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_retries_a_failed_job() {
    let app = spawn_app().await;
    let (url, _) = failing_every(1).await;
    let id = app
        .submit(&job_of(2, &url, None, json!({"max_attempts": 1})))
        .await;
    assert_eq!(app.wait_settled(&id).await["status"], "Failed");
    let out = crate::client::cli(&app.base, &["retry", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        format!("job {id} retried: run 2, 2 tasks to run again")
    );
    assert_eq!(app.wait_settled(&id).await["status"], "Complete");
    let out = crate::client::cli(&app.base, &["retry", &id]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("no Failed task to retry"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_holds_a_job_and_resume_lets_it_finish() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&job_of(
            6,
            &endpoint.url("slow?ms=300"),
            None,
            json!({"concurrency": 1}),
        ))
        .await;
    eventually("the first call", || async {
        (endpoint.call_count() >= 1).then_some(())
    })
    .await;
    let out = crate::client::cli(&app.base, &["pause", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), format!("job {id} Paused"));
    // The call in flight finishes and is stored; none starts after it.
    let held = eventually("the call in flight to settle", || async {
        let job = app.job(&id).await;
        (job["counts"]["running"] == 0).then_some(job)
    })
    .await;
    assert_eq!(held["status"], "Paused", "{held}");
    let calls = endpoint.call_count();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(endpoint.call_count(), calls, "no call starts while paused");
    let (_, page) = app.get("/v1/jobs?status=Paused").await;
    assert_eq!(page["jobs"][0]["job_id"], id.as_str());

    let (status, view) = app
        .post_raw(&format!("/v1/jobs/{id}/pause"), None, "")
        .await;
    assert_eq!(
        (status, view["status"].as_str()),
        (200, Some("Paused")),
        "idempotent"
    );
    let out = crate::client::cli(&app.base, &["resume", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), format!("job {id} Running"));
    let view = app.wait_settled(&id).await;
    assert_eq!(view["status"], "Complete");
    assert_eq!(endpoint.call_count(), 6);
    let (status, body) = app
        .post_raw(&format!("/v1/jobs/{id}/pause"), None, "")
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["msg"].as_str().unwrap().contains("already Complete"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_jobs_limits_change_at_the_next_claim() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&job_of(
            12,
            &endpoint.url("slow?ms=400"),
            None,
            json!({"concurrency": 1}),
        ))
        .await;
    eventually("the first call", || async {
        (endpoint.call_count() >= 1).then_some(())
    })
    .await;
    let patch = |body: Value| {
        let app = &app;
        let id = id.clone();
        async move {
            let resp = app
                .http
                .patch(format!("{}/v1/jobs/{id}", app.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, view) = patch(json!({"options": {"concurrency": 4}})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["options"]["concurrency"], 4);
    let (status, body) = patch(json!({"options": {"timeout_ms": 1000}})).await;
    assert_eq!(status, 422);
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .starts_with("options.timeout_ms: cannot be changed"),
        "{body}"
    );
    let (status, body) = patch(json!({"options": {"concurrency": 0}})).await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = patch(json!({"concurrency": 2})).await;
    assert_eq!(status, 422, "the options go under \"options\"");
    let out = crate::client::cli(
        &app.base,
        &[
            "update",
            &id,
            "--per-host-rate",
            "none",
            "--concurrency",
            "4",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        format!("job {id}: concurrency 4, per host none at once, none a second")
    );
    app.wait_settled(&id).await;
    assert!(
        endpoint.max_in_flight_of(&id) > 1,
        "the raised concurrency was used: {}",
        endpoint.max_in_flight_of(&id)
    );
    let (status, body) = patch(json!({"options": {"concurrency": 2}})).await;
    assert_eq!(status, 409, "{body}");
    let out = crate::client::cli(&app.base, &["update", &id]).await;
    assert_eq!(out.code, 2, "a limit must be named: {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn min_complete_and_fail_fast_end_a_job_early() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    // A quorum: 3 of 10 tasks, two at a time.
    let id = app
        .submit(&job_of(
            10,
            &endpoint.url("slow?ms=200"),
            Some(&receiver.url()),
            json!({"concurrency": 2, "min_complete": 3}),
        ))
        .await;
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Complete", "{}", delivery.body);
    let view = app.wait_settled(&id).await;
    let counts = &view["counts"];
    assert!(counts["complete"].as_u64().unwrap() >= 3, "{counts}");
    assert_eq!(
        counts["complete"].as_u64().unwrap() + counts["cancelled"].as_u64().unwrap(),
        10,
        "the rest cancelled: {counts}"
    );
    assert!(endpoint.call_count() < 10, "not every task was called");

    // Fail fast: one failure tolerated, the second ends the job.
    let (url, _) = failing_every(1).await;
    let id = app
        .submit(&job_of(
            8,
            &url,
            None,
            json!({"concurrency": 1, "max_attempts": 1, "tolerated_failures": 1, "fail_fast": true}),
        ))
        .await;
    let view = app.wait_settled(&id).await;
    assert_eq!(view["status"], "Failed");
    assert_eq!(view["counts"]["failed"], 2, "{}", view["counts"]);
    assert_eq!(view["counts"]["cancelled"], 6, "{}", view["counts"]);

    // A quorum that can no longer be reached fails at once (a fresh endpoint: this one's
    // tasks have answered already).
    let (url, _) = failing_every(1).await;
    let id = app
        .submit(&job_of(
            3,
            &url,
            None,
            json!({"concurrency": 1, "max_attempts": 1, "min_complete": 3}),
        ))
        .await;
    let view = app.wait_settled(&id).await;
    assert_eq!(view["status"], "Failed");
    assert_eq!(view["counts"]["failed"], 1, "{}", view["counts"]);

    let (status, body) = app
        .post_raw(
            "/v1/job",
            Some("application/json"),
            &json!({"tasks": [{"endpoint": "/v1/test"}], "options": {"min_complete": 2}})
                .to_string(),
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .contains("more than the job's 1 tasks"),
        "{body}"
    );
}
