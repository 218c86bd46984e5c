//! Crashes and stops of a real `doparallel serve` process: nothing accepted is lost, every
//! result is stored once, the callback is delivered.

use std::collections::HashMap;

use serde_json::json;

use crate::helpers::{
    Endpoint, Receiver, ServerProcess, assert_database_intact, db_path, eventually, job_of,
};

const TASKS: usize = 300;
const IN_FLIGHT: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_server_finishes_the_job_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let in_flight = IN_FLIGHT.to_string();
    let args = ["--max-in-flight", in_flight.as_str()];

    let mut first = ServerProcess::start(&db, &args);
    let id = first
        .api
        .submit(&job_of(
            TASKS,
            &endpoint.url("slow?ms=20"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    eventually("a third of the calls", || async {
        (endpoint.call_count() >= TASKS / 3).then_some(())
    })
    .await;
    first.sigkill();
    assert_database_intact(&db).await;
    let calls_before_restart = endpoint.call_count();
    assert!(
        calls_before_restart < TASKS,
        "the job finished before the kill"
    );

    let second = ServerProcess::start(&db, &args);
    // A second server on the same database is refused while this one runs.
    let stderr = ServerProcess::on(&db).refused();
    assert!(
        stderr.contains("in use by another doparallel process"),
        "{stderr}"
    );

    let delivery = receiver.next().await;
    assert_eq!(delivery.answered, 200);
    assert_eq!(delivery.body["job_id"], id.as_str());
    assert_eq!(delivery.body["status"], "Complete");
    let result = delivery.body["result"].as_object().unwrap();
    assert_eq!(result.len(), TASKS);
    for i in 1..=TASKS {
        let entry = &result[&i.to_string()];
        assert_eq!(entry["status"], "Complete", "task {i}");
        assert_eq!(
            entry["result"],
            json!({"i": i}),
            "task {i} has another task's result"
        );
    }

    // Every task was called; only those in flight at the kill were called twice.
    let per_key = endpoint.calls_per_key();
    assert_eq!(per_key.len(), TASKS);
    let repeated: HashMap<_, _> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.len() <= IN_FLIGHT,
        "{} tasks were called again: {repeated:?}",
        repeated.len()
    );
    assert!(repeated.values().all(|n| **n == 2), "{repeated:?}");

    let job = second.api.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "delivered");
    assert_eq!(job["counts"]["complete"], TASKS);
    assert_eq!(receiver.all().len(), 1, "the callback was sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_in_flight_finish_and_the_next_start_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let args = ["--max-in-flight", "4", "--shutdown-grace", "30"];

    let mut first = ServerProcess::start(&db, &args);
    let id = first
        .api
        .submit(&job_of(
            40,
            &endpoint.url("slow?ms=100"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    eventually("some calls", || async {
        (endpoint.call_count() >= 6).then_some(())
    })
    .await;
    first.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || first.child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the server cleanly: {status:?}"
    );
    let called = endpoint.call_count();
    assert!(called < 40, "the job finished before the stop");
    assert_database_intact(&db).await;

    let second = ServerProcess::start(&db, &args);
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Complete");
    assert_eq!(delivery.body["result"].as_object().unwrap().len(), 40);
    // The calls in flight at SIGTERM were allowed to finish and their results kept, so
    // no task was called twice.
    let per_key = endpoint.calls_per_key();
    assert_eq!(per_key.len(), 40);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    second.api.wait_settled(&id).await;
}
