//! Tenants who must not crowd each other out: one API token's hanging calls leave the
//! other tokens free slots (`--owner-max-in-flight`), and a job cannot ask for a call
//! timeout beyond the server's `--max-task-timeout`.

use serde_json::{Value, json};

use crate::helpers::{Endpoint, RawEndpoint, ServerProcess, db_path, eventually, job_of, respond};

const A: &str = "tenant-a-token-0123456789";
const B: &str = "tenant-b-token-0123456789";

/// Submits as `token`; returns the job id.
async fn submit_as(server: &ServerProcess, token: &str, job: &Value) -> String {
    let api = &server.api;
    let resp = api
        .http
        .post(format!("{}/v1/job", api.base))
        .bearer_auth(token)
        .json(job)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    resp.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn status_as(server: &ServerProcess, token: &str, id: &str) -> Value {
    server.api.get_as(token, &format!("/v1/jobs/{id}")).await.1
}

/// With two tokens and `--max-in-flight 8`, tenant A's 16 calls to an endpoint that holds
/// them take at most half the slots (the default `--owner-max-in-flight`); tenant B's job,
/// submitted after, finishes while A's calls still hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_hold_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, _) = tokio::sync::watch::channel(false);
    let held_gate = gate.subscribe();
    let held = RawEndpoint::start(move |_, _, mut stream| {
        let mut gate = held_gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            respond(&mut stream, "200 OK", &[], b"{}").await;
        }
    })
    .await;
    let quick = Endpoint::start().await;
    let server = ServerProcess::start(
        &db_path(&dir),
        &["--api-token", A, "--api-token", B, "--max-in-flight", "8"],
    );
    let a = submit_as(&server, A, &job_of(16, &held.url("/hang"), None, json!({}))).await;
    eventually("tenant A's calls to hang", || async {
        (held.call_count() >= 4).then_some(())
    })
    .await;
    let b_job = json!({"tasks": [
        {"endpoint": "/v1/test", "params": {"x": 1}},
        {"endpoint": quick.url("echo"), "params": {"x": 2}},
    ]});
    let b = submit_as(&server, B, &b_job).await;
    let done = eventually("tenant B's job to finish", || async {
        let job = status_as(&server, B, &b).await;
        (job["status"] == "Complete").then_some(job)
    })
    .await;
    assert_eq!(done["counts"]["complete"], 2);
    assert_eq!(
        held.call_count(),
        4,
        "tenant A holds half the slots, no more"
    );
    let a_view = status_as(&server, A, &a).await;
    assert_eq!(a_view["counts"]["running"], 4, "{a_view}");
    gate.send_replace(true);
    eventually("tenant A's job to finish", || async {
        (status_as(&server, A, &a).await["status"] == "Complete").then_some(())
    })
    .await;
}

/// A job asking for a call timeout past `--max-task-timeout` is refused, naming the option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_past_the_servers_ceiling_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&db_path(&dir), &["--max-task-timeout", "2m"]);
    let job = |ms: u64| json!({"tasks": [{"endpoint": "/v1/test"}], "options": {"timeout_ms": ms}});
    let (status, body) = server
        .api
        .post_raw(
            "/v1/job",
            Some("application/json"),
            &job(86_400_000).to_string(),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let msg = body["msg"].as_str().unwrap();
    assert!(msg.contains("options.timeout_ms"), "{msg}");
    assert!(msg.contains("120000"), "{msg}");
    assert!(msg.contains("--max-task-timeout"), "{msg}");
    server.api.submit(&job(120_000)).await;
}
