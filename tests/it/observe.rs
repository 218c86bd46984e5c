//! What an operator watches: the events stream, the task filter, metrics, the OpenAPI
//! document and JSON logs.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::helpers::{DEADLINE, Endpoint, ServerProcess, db_path, spawn_app};

/// One Server-Sent Event.
#[derive(Debug)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// Reads a whole events stream (it ends after `finished`).
async fn events(api: &crate::helpers::Api, id: &str, last_event_id: Option<&str>) -> Vec<Sse> {
    let mut req = api.http.get(format!("{}/v1/jobs/{id}/events", api.base));
    if let Some(last) = last_event_id {
        req = req.header("last-event-id", last);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = tokio::time::timeout(DEADLINE, resp.text())
        .await
        .expect("the stream ends")
        .unwrap();
    text.split("\n\n")
        .filter(|block| block.contains("data:"))
        .map(|block| {
            let mut fields = HashMap::new();
            for line in block.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    fields.insert(k.to_string(), v.trim_start().to_string());
                }
            }
            Sse {
                id: fields.remove("id").unwrap_or_default(),
                event: fields.remove("event").unwrap_or_default(),
                data: serde_json::from_str(&fields["data"]).unwrap(),
            }
        })
        .collect()
}

#[tokio::test]
async fn the_events_stream_reports_progress_failures_and_the_end() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let mut tasks: Vec<Value> = (0..6)
        .map(|_| json!({"endpoint": endpoint.url("slow?ms=100")}))
        .collect();
    tasks.extend((0..3).map(|_| json!({"endpoint": endpoint.url("missing")})));
    let id = app
        .submit(&json!({"tasks": tasks, "options": {"concurrency": 3, "tolerated_failures": 3}}))
        .await;
    let all = events(&app, &id, None).await;
    assert_eq!(all.first().unwrap().event, "progress");
    let last = all.last().unwrap();
    assert_eq!(last.event, "finished");
    assert_eq!(last.data["status"], "Complete");
    assert_eq!(last.data["counts"]["failed"], 3);
    let failed: Vec<&Sse> = all.iter().filter(|e| e.event == "task_failed").collect();
    let mut indexes: Vec<u64> = failed
        .iter()
        .map(|e| e.data["index"].as_u64().unwrap())
        .collect();
    indexes.sort();
    assert_eq!(indexes, [7, 8, 9]);
    assert_eq!(failed[0].data["error"]["http_status"], 404);
    let ids: Vec<&str> = failed.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3"], "each failure moves the cursor by one");
    assert!(
        all.iter().filter(|e| e.event == "progress").count() >= 2,
        "{all:?}"
    );

    // Resuming after the first failure repeats none of the ones already seen.
    let resumed = events(&app, &id, Some("1")).await;
    let again: Vec<&Sse> = resumed
        .iter()
        .filter(|e| e.event == "task_failed")
        .collect();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].id, "2");
    // Where the job stands comes first, before the backlog of failures.
    assert_eq!(resumed.first().unwrap().event, "progress", "{resumed:?}");
    assert_eq!(resumed.last().unwrap().event, "finished");
}

#[tokio::test]
async fn tasks_can_be_filtered_by_status() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let job = json!({"tasks": [
        {"endpoint": "/v1/test"}, {"endpoint": endpoint.url("missing")}, {"endpoint": "/v1/test"}
    ]});
    let id = app.submit(&job).await;
    app.wait_settled(&id).await;
    let (_, page) = app.get(&format!("/v1/jobs/{id}/tasks?status=Failed")).await;
    let indexes: Vec<u64> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [2]);
    let (_, page) = app
        .get(&format!("/v1/jobs/{id}/tasks?status=Complete"))
        .await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let job = json!({"tasks": [
        {"endpoint": "/v1/test"}, {"endpoint": endpoint.url("flaky")}, {"endpoint": endpoint.url("missing")}
    ], "options": {"backoff_ms": 1}});
    let id = app.submit(&job).await;
    app.wait_settled(&id).await;
    let resp = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = resp.text().await.unwrap();
    for line in [
        "doparallel_jobs_submitted_total 1",
        "doparallel_jobs_finished_total{status=\"Failed\"} 1",
        "doparallel_tasks_finished_total{outcome=\"complete\"} 2",
        "doparallel_tasks_finished_total{outcome=\"failed\"} 1",
        "doparallel_task_retries_total 1",
        "doparallel_calls_in_flight 0",
        "doparallel_queue_depth 0",
        "doparallel_task_call_seconds_count 4",
        "doparallel_host_gate_waiting 0",
        "doparallel_host_pauses_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn the_openapi_document_is_served() {
    let app = spawn_app().await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/jobs/{id}/events"]["get"].is_object());
    assert!(doc["components"]["schemas"]["JobView"].is_object());
    assert_eq!(doc["info"]["license"]["name"], "MIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_job_id() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let server = ServerProcess::on(&db_path(&dir))
        .args(&["--log-format", "json"])
        .log(&log)
        .start();
    let id = server
        .api
        .submit(&json!({"tasks": [{"endpoint": "/v1/test"}]}))
        .await;
    server.api.wait_settled(&id).await;
    let text = crate::helpers::eventually("the job's log lines", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("job finished").then_some(text)
    })
    .await;
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let about_job: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["fields"]["message"] == "job accepted" || l["fields"]["message"] == "job finished"
        })
        .collect();
    assert_eq!(about_job.len(), 2, "{lines:?}");
    assert!(
        about_job
            .iter()
            .all(|l| l["fields"]["job_id"] == id.as_str()),
        "{about_job:?}"
    );
    // The bound address is a field of its own.
    let addr = server.api.base.trim_start_matches("http://");
    assert!(
        lines.iter().any(|l| l["fields"]["addr"] == addr),
        "{lines:?}"
    );
}
