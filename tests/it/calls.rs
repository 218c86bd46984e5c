//! How tasks are called: methods, headers and secret headers, per-task options and
//! `retry_on`, callback headers; and that a secret header's value is nowhere but on the
//! call.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// An endpoint that answers every call 200 with `{"ok":true}`.
async fn ok_endpoint() -> RawEndpoint {
    RawEndpoint::start(|_, _, mut stream| async move {
        respond(
            &mut stream,
            "200 OK",
            &[("content-type", "application/json")],
            br#"{"ok":true}"#,
        )
        .await;
    })
    .await
}

/// The calls an endpoint received, by the task they were for.
fn by_task(endpoint: &RawEndpoint) -> std::collections::BTreeMap<u64, RawCall> {
    endpoint
        .calls()
        .into_iter()
        .map(|call| (call.header("doparallel-task").parse().unwrap(), call))
        .collect()
}

#[tokio::test]
async fn methods_headers_and_secret_headers_reach_the_endpoint() {
    let app = spawn_app().await;
    let endpoint = ok_endpoint().await;
    let mut receiver = Receiver::start(0, 200).await;
    let id = app
        .submit(&json!({
            "callback": receiver.url(),
            "options": {
                "headers": {"X-Job": "job", "X-Shared": "job", "Accept": "application/json"},
                "secret_headers": {"Authorization": "Bearer job-secret-1"},
                "callback_headers": {"X-Callback": "cb", "Authorization": "Bearer receiver"}
            },
            "tasks": [
                {"endpoint": endpoint.url("/post"), "params": {"a": 1}},
                {"endpoint": endpoint.url("/get?fixed=1"), "method": "GET",
                 "params": {"q": "a b&c", "n": 1.50, "yes": true}},
                {"endpoint": endpoint.url("/delete"), "method": "DELETE"},
                {"endpoint": endpoint.url("/put"), "method": "PUT", "params": [1, 2],
                 "headers": {"x-shared": "task", "Content-Type": "application/vnd.api+json"},
                 "secret_headers": {"X-Api-Key": "task-secret-2"}},
                {"endpoint": endpoint.url("/patch"), "method": "PATCH", "params": {"p": null},
                 "secret_headers": {"authorization": "Bearer task-secret-3"}}
            ]
        }))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    let calls = by_task(&endpoint);
    assert_eq!(calls.len(), 5);

    let post = &calls[&1];
    assert_eq!((post.method(), post.path()), ("POST", "/post"));
    assert_eq!(post.body, br#"{"a":1}"#);
    assert_eq!(post.header("content-type"), "application/json");
    assert_eq!(post.header("x-job"), "job");
    assert_eq!(post.header("x-shared"), "job");
    assert_eq!(post.header("accept"), "application/json");
    assert_eq!(post.header("authorization"), "Bearer job-secret-1");

    let get = &calls[&2];
    assert_eq!(get.method(), "GET");
    // (`json!` sorts keys and respells 1.50; the text's own order and digits are kept, see
    // `job::call` tests.)
    assert_eq!(get.path(), "/get?fixed=1&n=1.5&q=a%20b%26c&yes=true");
    assert!(get.body.is_empty());
    assert_eq!(get.header("content-type"), "");
    assert_eq!(get.header("authorization"), "Bearer job-secret-1");

    let delete = &calls[&3];
    assert_eq!((delete.method(), delete.path()), ("DELETE", "/delete"));
    assert!(delete.body.is_empty());

    let put = &calls[&4];
    assert_eq!((put.method(), put.path()), ("PUT", "/put"));
    assert_eq!(put.body, b"[1,2]");
    assert_eq!(
        put.header("x-shared"),
        "task",
        "a task's header replaces the job's"
    );
    assert_eq!(put.header("content-type"), "application/vnd.api+json");
    assert_eq!(put.header("x-api-key"), "task-secret-2");
    assert_eq!(put.header("authorization"), "Bearer job-secret-1");

    let patch = &calls[&5];
    assert_eq!(patch.method(), "PATCH");
    assert_eq!(patch.body, br#"{"p":null}"#);
    assert_eq!(
        patch.header("authorization"),
        "Bearer task-secret-3",
        "a task's secret replaces the job's of the same name, whatever its case"
    );
    // DoParallel's own headers are there as ever.
    assert_eq!(patch.header("idempotency-key"), format!("{id}:5"));

    // Reads show the names, never the values.
    assert_eq!(
        job["options"]["secret_headers"],
        json!({"Authorization": "***"})
    );
    assert_eq!(job["options"]["headers"]["X-Job"], "job");
    let tasks = app.tasks(&id).await;
    assert_eq!(tasks[1]["method"], "GET");
    assert_eq!(tasks[3]["secret_headers"], json!({"X-Api-Key": "***"}));
    assert_eq!(tasks[3]["headers"]["x-shared"], "task");
    assert!(tasks[0].get("secret_headers").is_none(), "{}", tasks[0]);

    // The callback carries its own headers, and no secret.
    let delivery = receiver.next().await;
    assert_eq!(delivery.headers["x-callback"], "cb");
    assert_eq!(delivery.headers["authorization"], "Bearer receiver");
    let text = delivery.body.to_string();
    assert!(!text.contains("secret-"), "{text}");
}

#[tokio::test]
async fn secret_headers_need_a_key_and_bad_headers_are_refused() {
    let app = spawn_app_with(doparallel::Settings {
        sealer: Default::default(),
        ..test_settings()
    })
    .await;
    let endpoint = "http://127.0.0.1:9/";
    for (job, expected) in [
        (
            json!({"tasks": [{"endpoint": endpoint, "secret_headers": {"X-Key": "v"}}]}),
            "task 1: secret_headers: this server has no secret key to seal secret headers with: \
             start it with --secret-key-file or DOPARALLEL_SECRET_KEY",
        ),
        (
            json!({"tasks": [], "options": {"secret_headers": {"X-Key": "v"}}}),
            "options.secret_headers: this server has no secret key",
        ),
        (
            json!({"tasks": [{"endpoint": endpoint, "headers": {"Webhook-Signature": "v1,x"}}]}),
            "task 1: headers: Webhook-Signature cannot be set",
        ),
        (
            json!({"tasks": [{"endpoint": endpoint, "headers": {"X-A": "a\r\nX-B: b"}}]}),
            "task 1: headers: the value of X-A holds a carriage return (CR)",
        ),
        (
            json!({"tasks": [{"endpoint": endpoint, "method": "GET", "params": {"a": [1]}}]}),
            "task 1: GET: params.a must be a string, a number or a boolean",
        ),
    ] {
        let (status, body) = app
            .post_raw("/v1/job", Some("application/json"), &job.to_string())
            .await;
        assert_eq!(status, 422, "{job}: {body}");
        let msg = body["msg"].as_str().unwrap();
        assert!(msg.contains(expected), "{job}: {msg}");
    }
    // Nothing was stored.
    let (_, page) = app.get("/v1/jobs").await;
    assert_eq!(page["jobs"], json!([]));
}

#[tokio::test]
async fn per_task_options_and_retry_on_replace_the_jobs() {
    let app = spawn_app().await;
    // 503 to every call.
    let failing = RawEndpoint::start(|_, _, mut stream| async move {
        respond(&mut stream, "503 Service Unavailable", &[], b"down").await;
    })
    .await;
    let slow = RawEndpoint::start(|_, _, mut stream| async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        respond(&mut stream, "200 OK", &[], b"{}").await;
    })
    .await;
    let id = app
        .submit(&json!({
            "options": {"max_attempts": 3, "backoff_ms": 1, "retry_on": [503], "tolerated_failures": 10},
            "tasks": [
                // The job's list: 503 is retried, three attempts.
                {"endpoint": failing.url("/job-list")},
                // The task's own: nothing but connection errors and timeouts is retried.
                {"endpoint": failing.url("/no-retry"), "options": {"retry_on": []}},
                // The task's own number of attempts.
                {"endpoint": failing.url("/two"), "options": {"max_attempts": 2}},
                // The task's own timeout; the job's default (30 s) lets the other through.
                {"endpoint": slow.url("/timeout"), "options": {"timeout_ms": 100, "max_attempts": 1}},
                {"endpoint": slow.url("/slow")}
            ]
        }))
        .await;
    let job = app.wait_settled(&id).await;
    let tasks = app.tasks(&id).await;
    let attempts: Vec<u64> = tasks
        .iter()
        .map(|t| t["attempts"].as_u64().unwrap())
        .collect();
    let statuses: Vec<&str> = tasks
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(attempts, [3, 1, 2, 1, 1], "{job}");
    assert_eq!(
        statuses,
        ["Failed", "Failed", "Failed", "Failed", "Complete"],
        "{tasks:?}"
    );
    assert_eq!(tasks[3]["error"]["kind"], "timeout");
    assert_eq!(tasks[1]["options"], json!({"retry_on": []}));
}

/// Everything the server wrote: its log at trace level, every read of the API, the
/// metrics, the callback, and the database's files. A secret header's value is in none of
/// them; the endpoint got it.
#[tokio::test]
async fn a_secret_value_is_nowhere_but_on_the_call() {
    const JOB_SECRET: &str = "job-secret-value-7d1c";
    const TASK_SECRET: &str = "task-secret-value-91fe";
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let log = dir.path().join("server.log");
    let server = ServerProcess::on(&db)
        .envs(&[
            ("RUST_LOG", "trace"),
            ("DOPARALLEL_SECRET_KEY", TEST_SECRET_KEY),
        ])
        .log(&log)
        .start();
    let api = &server.api;
    // The endpoint answers with what it got, but the secret headers: a result is the
    // endpoint's business, not DoParallel's.
    let endpoint = ok_endpoint().await;
    let mut receiver = Receiver::start(0, 200).await;
    let id = api
        .submit(&json!({
            "callback": receiver.url(),
            "options": {"secret_headers": {"Authorization": format!("Bearer {JOB_SECRET}")},
                        "max_attempts": 2, "backoff_ms": 1},
            "tasks": [
                {"endpoint": endpoint.url("/a"), "secret_headers": {"X-Api-Key": TASK_SECRET}},
                {"endpoint": endpoint.url("/b"), "method": "GET", "params": {"q": 1}},
                // A refused connection: an error is logged and stored for it.
                {"endpoint": "http://127.0.0.1:9/refused", "secret_headers": {"X-Api-Key": TASK_SECRET}}
            ]
        }))
        .await;
    let delivery = receiver.next().await;
    let job = api.wait_settled(&id).await;
    assert_eq!(job["status"], "Failed", "{job}");
    // The endpoint did get both values: the test looks for something that exists.
    let calls = by_task(&endpoint);
    assert_eq!(calls[&1].header("x-api-key"), TASK_SECRET);
    assert_eq!(
        calls[&1].header("authorization"),
        format!("Bearer {JOB_SECRET}")
    );
    assert_eq!(
        calls[&2].header("authorization"),
        format!("Bearer {JOB_SECRET}")
    );

    let mut seen: Vec<(String, String)> = vec![
        ("GET job".into(), job.to_string()),
        ("callback".into(), delivery.body.to_string()),
        ("callback headers".into(), format!("{:?}", delivery.headers)),
        ("metrics".into(), api.metrics().await),
    ];
    for path in [
        format!("/v1/jobs/{id}/tasks"),
        "/v1/jobs".to_string(),
        format!("/v1/jobs/{id}/tasks?status=Failed"),
    ] {
        let (_, body) = api.get(&path).await;
        seen.push((path, body.to_string()));
    }
    // The job's event stream, whatever it sends within a second.
    let mut stream = api
        .http
        .get(format!("{}/v1/jobs/{id}/events", api.base))
        .send()
        .await
        .unwrap();
    let mut events = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            events.extend_from_slice(&chunk);
        }
    })
    .await;
    let events = String::from_utf8_lossy(&events).into_owned();
    assert!(events.contains("event:"), "{events}");
    seen.push(("events".into(), events));
    drop(server);
    seen.push(("log".into(), std::fs::read_to_string(&log).unwrap()));
    assert!(
        seen[seen.len() - 1].1.contains("TRACE") || seen[seen.len() - 1].1.contains("trace"),
        "the log is at trace level"
    );
    let mut files = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("doparallel.db")
        {
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            seen.push((
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    assert!(files >= 1);
    // The names are stored, so the database was looked at where they are.
    assert!(
        seen.iter()
            .any(|(place, text)| place.contains("doparallel.db") && text.contains("X-Api-Key"))
    );
    for (place, text) in &seen {
        for secret in [JOB_SECRET, TASK_SECRET] {
            assert!(!text.contains(secret), "{secret} found in {place}");
        }
    }
}

/// An endpoint that never answers its first call (the server is killed meanwhile) and
/// answers 200 to the others.
async fn first_call_hangs() -> RawEndpoint {
    RawEndpoint::start(|n, _, mut stream| async move {
        if n == 1 {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        respond(&mut stream, "200 OK", &[], b"{}").await;
    })
    .await
}

/// Submits a job with a secret header to a server holding `key`, lets its call start, and
/// kills the server: the job waits in the database, sealed under `key`.
async fn stored_under(db: &std::path::Path, key: &str, endpoint: &RawEndpoint) -> String {
    let mut server = ServerProcess::on(db)
        .envs(&[("DOPARALLEL_SECRET_KEY", key)])
        .args(&["--lease-timeout", "1s"])
        .start();
    let id = server
        .api
        .submit(&json!({
            "options": {"secret_headers": {"X-Key": "rotated-secret"}, "max_attempts": 1},
            "tasks": [{"endpoint": endpoint.url("/r")}]
        }))
        .await;
    eventually("the first call", || async {
        (endpoint.call_count() == 1).then_some(())
    })
    .await;
    server.sigkill();
    id
}

#[tokio::test]
async fn a_key_rotation_keeps_stored_secrets_readable() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let old = TEST_SECRET_KEY;
    let new = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    // Restarted with a new key and the old one for reading: the call carries the secret.
    let endpoint = first_call_hangs().await;
    let id = stored_under(&db, old, &endpoint).await;
    let server = ServerProcess::on(&db)
        .envs(&[
            ("DOPARALLEL_SECRET_KEY", new),
            ("DOPARALLEL_SECRET_KEY_OLD", old),
        ])
        .args(&["--lease-timeout", "1s"])
        .start();
    let job = server.api.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    assert_eq!(endpoint.calls()[1].header("x-key"), "rotated-secret");
    drop(server);

    // Restarted with the new key alone: the stored value does not open, and the task fails
    // saying which key it needs, never what the value is.
    let endpoint = first_call_hangs().await;
    let id = stored_under(&db, old, &endpoint).await;
    let server = ServerProcess::on(&db)
        .envs(&[("DOPARALLEL_SECRET_KEY", new)])
        .args(&["--lease-timeout", "1s"])
        .start();
    let job = server.api.wait_settled(&id).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let tasks = server.api.tasks(&id).await;
    assert_eq!(tasks[0]["error"]["kind"], "secret", "{}", tasks[0]);
    let message = tasks[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("secret header X-Key cannot be opened: sealed under key"),
        "{message}"
    );
    assert!(!message.contains("rotated-secret"));
    assert_eq!(
        endpoint.call_count(),
        1,
        "no call is made without its secret"
    );
}
