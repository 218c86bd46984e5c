//! Cancel, delete, retention and idempotent submission.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    Endpoint, Receiver, eventually, job_of, spawn_app, spawn_app_with, test_settings,
};

#[tokio::test]
async fn cancel_stops_a_running_job_and_calls_back_cancelled() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let job = job_of(
        20,
        &endpoint.url("hang"),
        Some(&receiver.url()),
        json!({"concurrency": 2}),
    );
    let id = app.submit(&job).await;
    eventually("two calls in flight", || async {
        (endpoint.call_count() == 2).then_some(())
    })
    .await;

    let (status, cancelled) = app
        .post_raw(&format!("/v1/jobs/{id}/cancel"), None, "")
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "Cancelled");
    assert_eq!(cancelled["counts"]["cancelled"], 20);
    assert_eq!(cancelled["result"]["1"], json!({"status": "Cancelled"}));

    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Cancelled");
    assert_eq!(delivery.body["result"].as_object().unwrap().len(), 20);

    // Cancelling again changes nothing and says so with the same answer.
    let (status, again) = app
        .post_raw(&format!("/v1/jobs/{id}/cancel"), None, "")
        .await;
    assert_eq!((status, &again["status"]), (200, &json!("Cancelled")));
    // The aborted calls freed their slots: another job runs to completion.
    let next = app
        .submit(&job_of(3, &endpoint.url("echo"), None, json!({})))
        .await;
    assert_eq!(app.wait_settled(&next).await["status"], "Complete");
    assert_eq!(
        endpoint
            .calls()
            .iter()
            .filter(|c| c.body.contains("\"i\"") && c.header("doparallel-job-id") == id)
            .count(),
        2,
        "no task of the cancelled job was called after the cancel"
    );
}

#[tokio::test]
async fn cancelling_a_finished_job_is_a_conflict() {
    let app = spawn_app().await;
    let id = app.submit(&job_of(1, "/v1/test", None, json!({}))).await;
    app.wait_settled(&id).await;
    let (status, body) = app
        .post_raw(&format!("/v1/jobs/{id}/cancel"), None, "")
        .await;
    assert_eq!(status, 409);
    assert!(
        body["msg"].as_str().unwrap().contains("already Complete"),
        "{body}"
    );
    let (status, _) = app
        .post_raw(
            "/v1/jobs/01900000-0000-7000-8000-000000000000/cancel",
            None,
            "",
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn delete_purges_a_finished_job_only() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let running = app
        .submit(&job_of(1, &endpoint.url("hang"), None, json!({})))
        .await;
    assert_eq!(app.delete(&format!("/v1/jobs/{running}")).await.0, 409);

    let done = app.submit(&job_of(2, "/v1/test", None, json!({}))).await;
    app.wait_settled(&done).await;
    assert_eq!(app.delete(&format!("/v1/jobs/{done}")).await.0, 204);
    assert_eq!(app.get(&format!("/v1/jobs/{done}")).await.0, 404);
    assert_eq!(app.get(&format!("/v1/jobs/{done}/tasks")).await.0, 404);
    assert_eq!(app.delete(&format!("/v1/jobs/{done}")).await.0, 404);
}

#[tokio::test]
async fn retention_purges_finished_jobs() {
    let app = spawn_app_with(doparallel::Settings {
        retention: Some(Duration::from_millis(200)),
        ..test_settings()
    })
    .await;
    let endpoint = Endpoint::start().await;
    let unfinished = app
        .submit(&job_of(1, &endpoint.url("hang"), None, json!({})))
        .await;
    let id = app.submit(&job_of(2, "/v1/test", None, json!({}))).await;
    app.wait_settled(&id).await;
    eventually("the finished job to be purged", || async {
        (app.get(&format!("/v1/jobs/{id}")).await.0 == 404).then_some(())
    })
    .await;
    assert_eq!(
        app.get(&format!("/v1/jobs/{unfinished}")).await.0,
        200,
        "an unfinished job is kept"
    );
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retried_submission_safe() {
    let app = spawn_app().await;
    let body = json!({"tasks": [{"endpoint": "/v1/test"}]}).to_string();
    let post = |key: &'static str, body: String| {
        let http = app.http.clone();
        let url = format!("{}/v1/job", app.base);
        async move {
            let resp = http
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (first_status, first) = post("order-42", body.clone()).await;
    assert_eq!(first_status, 202);
    let (again_status, again) = post("order-42", body.clone()).await;
    assert_eq!(again_status, 200);
    assert_eq!(again["job_id"], first["job_id"]);
    let (other_status, other) = post("order-42", json!({"tasks": []}).to_string()).await;
    assert_eq!(other_status, 409);
    assert!(
        other["msg"].as_str().unwrap().contains("another body"),
        "{other}"
    );
    let (_, list) = app.get("/v1/jobs").await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        1,
        "nothing new was stored"
    );
    let (fresh_status, _) = post("order-43", body).await;
    assert_eq!(fresh_status, 202);
}

#[tokio::test]
async fn a_job_whose_callback_is_still_owed_is_not_deleted() {
    let mut config = test_settings();
    config.callback_schedule = vec![std::time::Duration::from_secs(3600)];
    let app = spawn_app_with(config).await;
    let mut receiver = Receiver::start(usize::MAX, 503).await;
    let id = app
        .submit(&job_of(1, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    assert_eq!(receiver.next().await.answered, 503);
    let (status, body) = app.delete(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, 409);
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .contains("callback is still being delivered"),
        "{body}"
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.0,
        200,
        "nothing was deleted"
    );
}
