//! Crash points: the server aborts at a chosen place in the life of a task or a callback
//! (the `failpoints` feature, armed through `FAILPOINTS`), is started again on the same
//! database, and must keep the same promises as after any crash: every result stored once,
//! the job finished, the callback delivered with one `webhook-id`, the database sound.

use std::collections::HashSet;

use serde_json::json;

use crate::helpers::{
    DEADLINE, Endpoint, Receiver, ServerProcess, assert_database_intact, db_path, job_of,
};

const TASKS: usize = 200;
const IN_FLIGHT: usize = 16;

/// Runs a job on a server armed to crash at `point` (`arm` in the fail crate's syntax, e.g.
/// `5*off->return`: the sixth time), restarts it, and checks what the crash left behind.
/// `calls_may_repeat`: whether task calls may be made twice (the point lies between a call
/// and its stored outcome); `callbacks`: how many deliveries the receiver may see.
async fn check(
    point: &str,
    arm: &str,
    calls_may_repeat: bool,
    callbacks: std::ops::RangeInclusive<usize>,
) {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let in_flight = IN_FLIGHT.to_string();
    let args = [
        "--max-in-flight",
        in_flight.as_str(),
        "--callback-timeout",
        "1s",
    ];

    let failpoints = format!("{point}={arm}");
    let mut first = ServerProcess::on(&db)
        .args(&args)
        .envs(&[("FAILPOINTS", &failpoints)])
        .start();
    let id = first
        .api
        .submit(&job_of(
            TASKS,
            &endpoint.url("slow?ms=2"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    let status = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || {
            let status = first.child.wait().unwrap();
            (first, status)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("the server did not stop at {point}"))
    .unwrap()
    .1;
    assert!(
        !status.success(),
        "{point}: the server stopped by itself: {status:?}"
    );
    assert_database_intact(&db).await;

    let second = ServerProcess::start(&db, &args);
    let job = second.api.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete", "{point}: {job}");
    assert_eq!(job["counts"]["complete"], TASKS, "{point}: {job}");
    assert_eq!(job["callback"]["state"], "delivered", "{point}: {job}");
    let result = job["result"].as_object().unwrap();
    for i in 1..=TASKS {
        assert_eq!(
            result[&i.to_string()]["result"],
            json!({"i": i}),
            "{point}: task {i}"
        );
    }

    let per_key = endpoint.calls_per_key();
    assert_eq!(per_key.len(), TASKS, "{point}: every task called");
    let repeated = per_key.values().filter(|n| **n > 1).count();
    if calls_may_repeat {
        assert!(
            repeated <= IN_FLIGHT,
            "{point}: {repeated} tasks called again"
        );
    } else {
        assert_eq!(repeated, 0, "{point}: a task was called again");
    }

    // Deliveries: each with the job's one webhook-id.
    let first_delivery = receiver.next().await;
    assert_eq!(first_delivery.body["job_id"], id.as_str());
    let deliveries = receiver.all();
    assert!(
        callbacks.contains(&deliveries.len()),
        "{point}: {} deliveries, expected {callbacks:?}",
        deliveries.len()
    );
    let ids: HashSet<_> = deliveries.iter().map(|d| d.webhook_id.clone()).collect();
    assert_eq!(ids.len(), 1, "{point}: {ids:?}");
    drop(second);
    assert_database_intact(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_tasks_are_claimed() {
    // A few claims go through first, so the crash comes mid-job.
    check("task-claimed", "5*off->return", true, 1..=1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_a_response_before_its_result_is_written() {
    check("response-received", "40*off->return", true, 1..=1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_the_callback_is_sent() {
    check("callback-sending", "return", false, 1..=1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_callback_is_delivered_before_it_is_recorded() {
    // The receiver got it, the store never heard: it is sent again, with the same id.
    check("callback-delivered", "return", false, 2..=2).await;
}
