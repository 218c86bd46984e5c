//! Callback delivery: retried on the schedule with a stable webhook-id, stopped by 410 Gone,
//! given up when the schedule runs out.

use serde_json::json;

use crate::helpers::{Receiver, job_of, spawn_app, spawn_app_with, test_settings};

#[tokio::test]
async fn a_receiver_that_is_down_gets_the_callback_once_it_is_up() {
    let app = spawn_app().await;
    let mut receiver = Receiver::start(2, 503).await;
    let id = app
        .submit(&job_of(3, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    let attempts = [
        receiver.next().await,
        receiver.next().await,
        receiver.next().await,
    ];
    let answered: Vec<u16> = attempts.iter().map(|d| d.answered).collect();
    assert_eq!(answered, [503, 503, 200]);
    assert!(
        attempts
            .iter()
            .all(|d| d.webhook_id == attempts[0].webhook_id),
        "{attempts:?}"
    );
    assert_eq!(attempts[0].webhook_id, format!("msg_{id}"));
    let body = &attempts[2].body;
    assert_eq!(body["job_id"], id.as_str());
    assert_eq!(body["status"], "Complete");
    assert_eq!(body["msg"], "Job Finished");
    assert_eq!(
        body["result"]["3"],
        json!({"status":"Complete","result":{"result":"true","params":{"i":3}}})
    );

    let job = app.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "delivered");
    assert_eq!(job["callback"]["attempts"], 3);
    assert_eq!(job["callback"]["url"], receiver.url());
    assert_eq!(receiver.all().len(), 3, "nothing is sent after delivery");
}

#[tokio::test]
async fn gone_stops_the_retries() {
    let app = spawn_app().await;
    let receiver = Receiver::start(usize::MAX, 410).await;
    let id = app
        .submit(&job_of(1, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "failed");
    assert_eq!(job["callback"]["attempts"], 1);
    assert!(
        job["callback"]["last_error"]
            .as_str()
            .unwrap()
            .contains("410")
    );
    assert_eq!(receiver.all().len(), 1);
}

#[tokio::test]
async fn a_callback_is_given_up_when_the_schedule_runs_out() {
    let mut config = test_settings();
    config.callback_schedule = vec![std::time::Duration::from_millis(10); 2];
    let app = spawn_app_with(config).await;
    let receiver = Receiver::start(usize::MAX, 500).await;
    let id = app
        .submit(&job_of(1, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "failed");
    assert_eq!(
        job["callback"]["attempts"], 3,
        "the first attempt plus one per schedule entry"
    );
    assert!(
        job["callback"]["last_error"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    assert_eq!(receiver.all().len(), 3);
}

#[tokio::test]
async fn a_failed_job_calls_back_with_its_errors() {
    let app = spawn_app().await;
    let mut receiver = Receiver::start(0, 200).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job = json!({"callback": receiver.url(), "tasks": [
        {"endpoint": "/v1/test"},
        {"endpoint": format!("http://127.0.0.1:{port}/")}
    ], "options": {"max_attempts": 1}});
    let id = app.submit(&job).await;
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["job_id"], id.as_str());
    assert_eq!(delivery.body["status"], "Failed");
    assert_eq!(delivery.body["result"]["2"]["status"], "Failed");
    assert_eq!(delivery.body["result"]["2"]["attempts"], 1);
    assert_eq!(delivery.body["result"]["2"]["error"]["kind"], "connect");
}

#[tokio::test]
async fn a_callback_of_many_pages_is_streamed_whole() {
    let app = spawn_app().await;
    let mut receiver = Receiver::start(0, 200).await;
    // More tasks than one page of the store, so the body is sent in several chunks.
    let id = app
        .submit(&job_of(2500, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["job_id"], id.as_str());
    let result = delivery.body["result"].as_object().unwrap();
    assert_eq!(result.len(), 2500);
    assert_eq!(result["1001"]["result"]["params"], json!({"i": 1001}));
    assert_eq!(result["2500"]["result"]["params"], json!({"i": 2500}));
}
