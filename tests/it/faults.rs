//! The fault suite: endpoints that misbehave, callback receivers that are down or gone,
//! servers killed at random moments, a full database, a stop mid-job. Each test ends in the
//! state the README documents for its fault; RELIABILITY.md lists them.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::helpers::{
    DEADLINE, Endpoint, RawEndpoint, Receiver, ServerProcess, TestApp, assert_database_intact,
    db_path, eventually, job_of, respond, spawn_app, spawn_app_with, sqlite_url, test_settings,
};

/// Runs a one-task job against `url` (an endpoint of `raw`) with quick retries. While its
/// first call is under way, another job runs to its end and `/healthz` answers: one bad
/// endpoint holds up nobody else. Returns the settled job, its task, and the other job.
async fn run_against(
    app: &TestApp,
    raw: &RawEndpoint,
    url: &str,
    options: Value,
) -> (Value, Value, Value) {
    let mut opts = json!({"backoff_ms": 10});
    opts.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    let id = app
        .submit(&json!({"tasks": [{"endpoint": url, "params": {"n": 1}}], "options": opts}))
        .await;
    eventually("the first call", || async {
        (raw.call_count() >= 1).then_some(())
    })
    .await;
    let other = serves_others(app).await;
    let job = app.wait_settled(&id).await;
    let task = app.tasks(&id).await.remove(0);
    (job, task, other)
}

/// Runs a small job against a well-behaved endpoint and checks `/healthz`; returns the job.
async fn serves_others(app: &TestApp) -> Value {
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let good = Endpoint::start().await;
    let id = app
        .submit(&job_of(3, &good.url("echo"), None, json!({})))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    job
}

/// The attempt numbers the endpoint saw, and checks they all carried one Idempotency-Key.
fn attempts_seen(raw: &RawEndpoint) -> Vec<String> {
    let calls = raw.calls();
    let key = calls[0].header("idempotency-key");
    assert!(key.ends_with(":1"), "{key}");
    assert!(
        calls.iter().all(|c| c.header("idempotency-key") == key),
        "{calls:?}"
    );
    calls
        .iter()
        .map(|c| c.header("doparallel-attempt"))
        .collect()
}

fn error_text(task: &Value) -> String {
    task["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn hang_forever() {
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|_, _, stream| async move {
        let _held = stream;
        tokio::time::sleep(DEADLINE).await;
    })
    .await;
    let (job, task, other) = run_against(
        &app,
        &raw,
        &raw.url("/hang"),
        json!({"timeout_ms": 500, "max_attempts": 2}),
    )
    .await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(task["status"], "Failed");
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["error"]["kind"], "timeout");
    assert_eq!(error_text(&task), "no complete answer within 500 ms");
    assert_eq!(attempts_seen(&raw), ["1", "2"]);
    let calls = raw.calls();
    assert!(
        calls[1].at - calls[0].at >= Duration::from_millis(500),
        "retried before the timeout"
    );
    // Timestamps in one RFC 3339 form, so they compare as text.
    assert!(
        other["finished_at"].as_str().unwrap() < job["finished_at"].as_str().unwrap(),
        "the other job waited for the hanging one: {other} {job}"
    );
}

#[tokio::test]
async fn accept_then_reset() {
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|_, _, stream| async move {
        // SO_LINGER 0: closing sends a RST instead of a FIN.
        stream.set_zero_linger().unwrap();
        drop(stream);
    })
    .await;
    let (job, task, _) =
        run_against(&app, &raw, &raw.url("/reset"), json!({"max_attempts": 3})).await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(task["attempts"], 3);
    assert_eq!(task["error"]["kind"], "request");
    assert!(error_text(&task).contains("reset by peer"), "{task}");
    assert_eq!(attempts_seen(&raw), ["1", "2", "3"]);
}

#[tokio::test]
async fn drip_a_byte_a_second() {
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|_, _, mut stream| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 30\r\ncontent-type: text/plain\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..30 {
            if stream.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    let started = Instant::now();
    let (job, task, _) = run_against(
        &app,
        &raw,
        &raw.url("/drip"),
        json!({"timeout_ms": 1500, "max_attempts": 2}),
    )
    .await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["error"]["kind"], "timeout");
    assert_eq!(error_text(&task), "no complete answer within 1500 ms");
    // Each answer would take 30 s to drip through; the timeout covers the whole body.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn close_mid_body() {
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|_, _, mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial\":")
            .await;
    })
    .await;
    let (job, task, _) =
        run_against(&app, &raw, &raw.url("/short"), json!({"max_attempts": 2})).await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["error"]["kind"], "request");
    assert!(
        error_text(&task).contains("end of file before message length reached"),
        "{task}"
    );
    assert_eq!(task["result"], Value::Null, "nothing partial is stored");
    assert_eq!(attempts_seen(&raw), ["1", "2"]);
}

#[tokio::test]
async fn content_length_shorter_than_the_body() {
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|_, _, mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\n{\"a\":1} and more")
            .await;
    })
    .await;
    let (job, task, _) = run_against(&app, &raw, &raw.url("/long"), json!({})).await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(task["result"], json!({"a": 1}));
    assert_eq!(task["attempts"], 1);
}

#[tokio::test]
async fn body_past_the_size_limit() {
    const LIMIT: usize = 4096;
    let app = spawn_app_with(doparallel::Settings {
        max_response_bytes: LIMIT,
        ..test_settings()
    })
    .await;
    // One route declares its length, one streams chunks without any.
    let raw = RawEndpoint::start(|_, call, mut stream| async move {
        if let Some(size) = call.path().strip_prefix("/len/") {
            let size: usize = size.parse().unwrap();
            respond(&mut stream, "200 OK", &[], &vec![b'x'; size]).await;
            return;
        }
        let size: usize = call
            .path()
            .strip_prefix("/chunked/")
            .unwrap()
            .parse()
            .unwrap();
        let mut out =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
        for _ in 0..size / 512 {
            out.extend_from_slice(b"200\r\n");
            out.extend_from_slice(&[b'y'; 512]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        let _ = stream.write_all(&out).await;
    })
    .await;
    let routes = [
        format!("/len/{}", LIMIT + 1),
        format!("/chunked/{}", LIMIT + 512),
        format!("/len/{LIMIT}"),
        format!("/chunked/{LIMIT}"),
    ];
    let tasks: Vec<Value> = routes
        .iter()
        .map(|r| json!({"endpoint": raw.url(r)}))
        .collect();
    let id = app
        .submit(&json!({"tasks": tasks, "options": {"backoff_ms": 10, "tolerated_failures": 2}}))
        .await;
    let job = app.wait_settled(&id).await;
    let tasks = app.tasks(&id).await;
    assert_eq!(job["status"], "Complete");
    for task in &tasks[..2] {
        assert_eq!(task["status"], "Failed", "{task}");
        assert_eq!(task["attempts"], 1, "not retried: {task}");
        assert_eq!(task["error"]["kind"], "response_too_large");
        assert_eq!(task["error"]["http_status"], 200);
        assert_eq!(
            error_text(task),
            format!("response body is larger than {LIMIT} bytes")
        );
    }
    for task in &tasks[2..] {
        assert_eq!(task["status"], "Complete", "{task}");
        assert_eq!(task["result"].as_str().unwrap().len(), LIMIT);
    }
    assert_eq!(raw.call_count(), 4);
    serves_others(&app).await;
}

#[tokio::test]
async fn invalid_utf8() {
    const TEXT: &[u8] = b"caf\xc3 \xff\xfe{\"a\":1}";
    const IN_JSON: &[u8] = b"{\"a\":\"\xff\x80z\"}";
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|_, call, mut stream| async move {
        let (status, body) = match call.path() {
            "/text" => ("200 OK", TEXT),
            "/json" => ("200 OK", IN_JSON),
            _ => ("400 Bad Request", TEXT),
        };
        respond(
            &mut stream,
            status,
            &[("content-type", "application/json")],
            body,
        )
        .await;
    })
    .await;
    let tasks: Vec<Value> = ["/text", "/json", "/error"]
        .iter()
        .map(|route| json!({"endpoint": raw.url(route)}))
        .collect();
    let id = app
        .submit(&json!({"tasks": tasks, "options": {"tolerated_failures": 1}}))
        .await;
    let job = app.wait_settled(&id).await;
    let tasks = app.tasks(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    // Each invalid sequence becomes U+FFFD; what is left is judged as any other body: not
    // JSON, so kept as text, ...
    let lossy = String::from_utf8_lossy(TEXT).into_owned();
    assert!(lossy.contains('\u{FFFD}'));
    assert_eq!(
        tasks[0]["result"],
        Value::String(lossy.clone()),
        "{}",
        tasks[0]
    );
    assert_eq!(job["result"]["1"]["result"], Value::String(lossy.clone()));
    // ... or JSON, kept as JSON.
    assert_eq!(
        tasks[1]["result"],
        json!({"a": "\u{FFFD}\u{FFFD}z"}),
        "{}",
        tasks[1]
    );
    // A failing answer's body is kept the same way in its error.
    assert_eq!(tasks[2]["status"], "Failed");
    assert_eq!(tasks[2]["error"]["http_status"], 400);
    assert_eq!(tasks[2]["error"]["body"], Value::String(lossy));
    serves_others(&app).await;
}

#[tokio::test]
async fn retry_after_on_429_and_503() {
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|n, _, mut stream| async move {
        match n {
            1 => {
                let at = std::time::SystemTime::now() + Duration::from_secs(2);
                let date = httpdate::fmt_http_date(at);
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    &[("retry-after", &date)],
                    b"",
                )
                .await
            }
            2 => {
                respond(
                    &mut stream,
                    "429 Too Many Requests",
                    &[("retry-after", "1")],
                    b"",
                )
                .await
            }
            _ => respond(&mut stream, "200 OK", &[], b"{\"ok\":true}").await,
        }
    })
    .await;
    let (job, task, _) =
        run_against(&app, &raw, &raw.url("/limited"), json!({"max_attempts": 3})).await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(task["attempts"], 3);
    assert_eq!(task["result"], json!({"ok": true}));
    assert_eq!(attempts_seen(&raw), ["1", "2", "3"]);
    let calls = raw.calls();
    // The backoff alone is at most 10 and 20 ms. An HTTP date has whole seconds, so "in
    // two seconds" is between one and two from now.
    for gap in [calls[1].at - calls[0].at, calls[2].at - calls[1].at] {
        assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    }

    // A 503 that lasts fails the task once its attempts are used up.
    let always = RawEndpoint::start(|_, _, mut stream| async move {
        respond(
            &mut stream,
            "503 Service Unavailable",
            &[("retry-after", "0")],
            b"busy",
        )
        .await
    })
    .await;
    let (job, task, _) = run_against(
        &app,
        &always,
        &always.url("/busy"),
        json!({"max_attempts": 2}),
    )
    .await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["error"]["kind"], "http_status");
    assert_eq!(task["error"]["http_status"], 503);
    assert_eq!(task["error"]["body"], "busy");
}

#[tokio::test]
async fn redirect_loop() {
    let app = spawn_app().await;
    let raw = RawEndpoint::start(|_, call, mut stream| async move {
        // Every answer sends the client back where it came from.
        let here = call.path().to_string();
        respond(&mut stream, "302 Found", &[("location", &here)], b"").await
    })
    .await;
    let (job, task, _) =
        run_against(&app, &raw, &raw.url("/loop"), json!({"max_attempts": 3})).await;
    assert_eq!(job["status"], "Failed");
    assert_eq!(task["attempts"], 1, "a 3xx is not retried");
    assert_eq!(task["error"]["kind"], "http_status");
    assert_eq!(task["error"]["http_status"], 302);
    assert_eq!(error_text(&task), "endpoint answered 302 Found");
    assert_eq!(raw.call_count(), 1, "the redirect was not followed");
}

#[tokio::test]
async fn late_200_after_timeout() {
    let app = spawn_app().await;
    let (late_tx, mut late_rx) = tokio::sync::mpsc::unbounded_channel();
    // The first attempt of each task answers 200 after the timeout; later ones at once.
    let raw = RawEndpoint::start(move |_, call, mut stream| {
        let late = late_tx.clone();
        async move {
            let attempt = call.header("doparallel-attempt");
            if attempt == "1" {
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
            respond(
                &mut stream,
                "200 OK",
                &[],
                format!("{{\"attempt\":{attempt}}}").as_bytes(),
            )
            .await;
            if attempt == "1" {
                let _ = late.send(call.header("doparallel-task"));
            }
        }
    })
    .await;
    let (job, task, _) = run_against(
        &app,
        &raw,
        &raw.url("/late"),
        json!({"timeout_ms": 300, "max_attempts": 2}),
    )
    .await;
    assert_eq!(job["status"], "Complete");
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["result"], json!({"attempt": 2}));
    // Once the late answer has gone out, the stored result is still the second attempt's.
    tokio::time::timeout(DEADLINE, late_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let id = job["job_id"].as_str().unwrap();
    let task = app.tasks(id).await.remove(0);
    assert_eq!(task["result"], json!({"attempt": 2}));
    assert_eq!(task["attempts"], 2);

    // With one attempt only, the task fails on its timeout and stays failed.
    let id = app
        .submit(&json!({"tasks": [{"endpoint": raw.url("/late")}], "options": {"timeout_ms": 300, "max_attempts": 1}}))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Failed");
    tokio::time::timeout(DEADLINE, late_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let task = app.tasks(&id).await.remove(0);
    assert_eq!(task["status"], "Failed");
    assert_eq!(task["error"]["kind"], "timeout");
    assert_eq!(task["result"], Value::Null);
}

/// A port on loopback where nothing listens (it was free a moment ago).
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn callback_receiver_down_then_up() {
    let mut config = test_settings();
    config.callback_schedule = vec![Duration::from_millis(100); 20];
    let app = spawn_app_with(config).await;
    let addr = free_port();
    let url = format!("http://{addr}/cb");
    let id = app
        .submit(&job_of(3, "/v1/test", Some(&url), json!({})))
        .await;
    // Down: connections are refused, and the callback waits its turn on the schedule.
    let down = eventually("two refused callback attempts", || async {
        let job = app.job(&id).await;
        (job["callback"]["attempts"].as_u64()? >= 2).then_some(job)
    })
    .await;
    assert_eq!(down["status"], "Complete");
    assert_eq!(down["callback"]["state"], "pending");
    let error = down["callback"]["last_error"].as_str().unwrap();
    assert!(error.contains("Connection refused"), "{error}");
    assert!(
        !error.contains(&url),
        "the URL stays out of errors: {error}"
    );

    // Up, though still unwell for one attempt.
    let mut receiver = Receiver::start_at(addr, vec![503]).await;
    let first = receiver.next().await;
    let second = receiver.next().await;
    assert_eq!((first.answered, second.answered), (503, 200));
    assert_eq!(first.webhook_id, format!("msg_{id}"));
    assert_eq!(second.webhook_id, first.webhook_id);
    assert_eq!(
        second.body, first.body,
        "every attempt sends the same document"
    );
    assert_eq!(second.body["job_id"], id.as_str());
    assert_eq!(second.body["result"].as_object().unwrap().len(), 3);

    let job = app.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "delivered");
    let attempts = job["callback"]["attempts"].as_u64().unwrap();
    assert!(attempts >= 4, "{job}");
    assert_eq!(receiver.all().len(), 2, "nothing is sent after delivery");
}

#[tokio::test]
async fn callback_410_gone_stops_the_retries() {
    let mut config = test_settings();
    config.callback_schedule = vec![Duration::from_millis(20); 20];
    let app = spawn_app_with(config).await;
    let receiver = Receiver::start_at("127.0.0.1:0".parse().unwrap(), vec![503, 500, 410]).await;
    let id = app
        .submit(&job_of(1, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "failed");
    assert_eq!(job["callback"]["attempts"], 3, "{job}");
    let error = job["callback"]["last_error"].as_str().unwrap();
    assert!(error.contains("410 Gone"), "{error}");
    let answered: Vec<u16> = receiver.all().iter().map(|d| d.answered).collect();
    assert_eq!(answered, [503, 500, 410]);
    assert!(
        receiver
            .all()
            .iter()
            .all(|d| d.webhook_id == format!("msg_{id}"))
    );
    // Another job's callback to the same receiver is delivered; this one's is not tried again.
    let other = app
        .submit(&job_of(1, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    let other_job = app.wait_settled(&other).await;
    assert_eq!(other_job["callback"]["state"], "delivered");
    let gone: Vec<_> = receiver
        .all()
        .into_iter()
        .filter(|d| d.webhook_id == format!("msg_{id}"))
        .collect();
    assert_eq!(gone.len(), 3);
}

/// Every task of a job, a thousand a page.
async fn all_tasks(api: &crate::helpers::Api, id: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    for _ in 0..1000 {
        let (status, page) = api
            .get(&format!("/v1/jobs/{id}/tasks?after={after}&limit=1000"))
            .await;
        assert_eq!(status, 200, "{page}");
        all.extend(page["tasks"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_u64() {
            Some(n) => after = n,
            None => return all,
        }
    }
    panic!("more than a thousand pages of tasks");
}

/// The seed of a test's random choices: `FAULT_SEED` when set (to replay a failure), else
/// a fresh one, printed so that a failure can be replayed.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: FAULT_SEED={seed}");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_ten_random_moments() {
    use rand::{Rng, SeedableRng};
    const TASKS: usize = 10_000;
    const KILLS: usize = 10;
    const IN_FLIGHT: usize = 32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("sigkill_at_ten_random_moments"));
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let in_flight = IN_FLIGHT.to_string();
    let args = ["--max-in-flight", in_flight.as_str()];

    let mut server = ServerProcess::start(&db, &args);
    let started = Instant::now();
    let id = server
        .api
        .submit(&job_of(
            TASKS,
            &endpoint.url("jitter?ms=3"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    for kill in 1..=KILLS {
        // Each server makes a random number of calls before it dies, together at most
        // 8,000 (plus what the polling misses), so the job is unfinished at every kill.
        let mark = endpoint.call_count() + rng.random_range(1..=800);
        eventually(&format!("call {mark}"), || async {
            (endpoint.call_count() >= mark).then_some(())
        })
        .await;
        server.sigkill();
        let called = endpoint.calls_per_key().len();
        assert!(
            called < TASKS,
            "kill {kill}: the job had ended ({called} tasks called)"
        );
        assert_database_intact(&db).await;
        server = ServerProcess::start(&db, &args);
    }

    let delivery = receiver.next().await;
    assert_eq!(delivery.answered, 200);
    assert_eq!(delivery.webhook_id, format!("msg_{id}"));
    assert_eq!(delivery.body["status"], "Complete");
    let result = delivery.body["result"].as_object().unwrap();
    assert_eq!(result.len(), TASKS);
    for i in 1..=TASKS {
        let entry = &result[&i.to_string()];
        assert_eq!(
            entry,
            &json!({"status": "Complete", "result": {"i": i}}),
            "task {i}"
        );
    }
    let job = server.api.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "delivered");
    assert_eq!(
        job["counts"],
        json!({"pending": 0, "running": 0, "queued": 0, "complete": TASKS, "failed": 0, "cancelled": 0}),
        "each result counted once"
    );
    // An interrupted attempt is not counted: every task completed on its first counted one.
    let tasks = all_tasks(&server.api, &id).await;
    assert_eq!(tasks.len(), TASKS);
    let retried: Vec<&Value> = tasks.iter().filter(|t| t["attempts"] != 1).collect();
    assert!(retried.is_empty(), "{retried:?}");

    // At least once, and again only for the calls in flight at each kill.
    let per_key = endpoint.calls_per_key();
    assert_eq!(per_key.len(), TASKS, "every task was called");
    let extra = endpoint.call_count() - TASKS;
    assert!(
        extra <= KILLS * IN_FLIGHT,
        "{extra} calls more than tasks after {KILLS} kills at {IN_FLIGHT} in flight"
    );
    assert_eq!(receiver.all().len(), 1, "the callback was sent once");

    server.sigkill();
    assert_database_intact(&db).await;
    eprintln!(
        "sigkill_at_ten_random_moments: {TASKS} tasks, {KILLS} kills, {extra} extra calls in {:?}",
        started.elapsed()
    );
}

/// A task endpoint that holds every call until `gate` opens, then answers
/// `{"task":INDEX}`, padded with 16 KiB on the `/big` route.
async fn gated_endpoint(gate: &tokio::sync::watch::Sender<bool>) -> RawEndpoint {
    let gate = gate.subscribe();
    RawEndpoint::start(move |_, call, mut stream| {
        let mut gate = gate.clone();
        async move {
            let _ = tokio::time::timeout(DEADLINE, gate.wait_for(|open| *open)).await;
            let task = call.header("doparallel-task");
            let body = if call.path() == "/big" {
                format!(r#"{{"task":{task},"pad":"{}"}}"#, "p".repeat(16 * 1024))
            } else {
                format!(r#"{{"task":{task}}}"#)
            };
            respond(
                &mut stream,
                "200 OK",
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .await;
        }
    })
    .await
}

/// Whether the server's log has a line containing `text`.
fn logged(log: &std::path::Path, text: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|all| all.contains(text))
}

/// A server whose database reached its `max_page_count` while jobs were running.
struct FullDatabase {
    dir: tempfile::TempDir,
    db: std::path::PathBuf,
    url: String,
    server: ServerProcess,
    /// Open by now; the endpoint answers its calls at once.
    _gate: tokio::sync::watch::Sender<bool>,
    _endpoint: RawEndpoint,
    receiver: Receiver,
    /// A finished job that takes half the space; deleting it frees it.
    ballast: String,
    /// Ten tasks whose results need 16 KiB each, accepted before the space ran out, with a
    /// callback to `receiver`.
    accepted: String,
    /// Jobs of twenty tasks accepted until the space ran out.
    fillers: Vec<String>,
    /// The body of the job that was refused.
    refused: String,
}

/// Fills a capped database with jobs until a submission is refused, and checks that answer.
async fn fill_database() -> FullDatabase {
    // 4 MiB in pages of 4 KiB: SQLite answers SQLITE_FULL past it, as on a full disk.
    const PAGES: u64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let log = dir.path().join("server.log");
    let url = format!("{}?max_page_count={PAGES}", sqlite_url(&db));
    let (gate, _) = tokio::sync::watch::channel(false);
    let endpoint = gated_endpoint(&gate).await;
    let receiver = Receiver::start(0, 200).await;
    let server = ServerProcess::on_url(&url).log(&log).start();
    let api = &server.api;
    let pad = "b".repeat(4096);

    let ballast: Vec<Value> = (0..250)
        .map(|_| json!({"endpoint": "/v1/test", "params": {"pad": pad}}))
        .collect();
    let ballast = api.submit(&json!({ "tasks": ballast })).await;
    assert_eq!(api.wait_settled(&ballast).await["status"], "Complete");
    let accepted = api
        .submit(&job_of(
            10,
            &endpoint.url("/big"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    let filler: Vec<Value> = (1..=20)
        .map(|i| json!({"endpoint": endpoint.url("/small"), "params": {"i": i, "pad": pad}}))
        .collect();
    let filler = json!({ "tasks": filler }).to_string();
    let mut fillers = Vec::new();
    let refused = loop {
        assert!(fillers.len() < 100, "the database never filled up");
        let (status, body) = api
            .post_raw("/v1/job", Some("application/json"), &filler)
            .await;
        match status {
            202 => fillers.push(body["job_id"].as_str().unwrap().to_string()),
            503 => break body,
            _ => panic!("unexpected answer {status}: {body}"),
        }
    };
    assert_eq!(refused["status"], "Error");
    let msg = refused["msg"].as_str().unwrap();
    assert!(msg.contains("the database is full"), "{msg}");
    // Nothing of the refused job was stored, and what was is sound.
    let (_, list) = api.get("/v1/jobs?limit=1000").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2 + fillers.len());
    assert_database_intact(&db).await;

    // The calls are answered, but their results cannot be stored yet: the server keeps
    // them and tries again, and still answers reads.
    gate.send_replace(true);
    eventually("a settle that waits for space", || async {
        logged(&log, "storing task outcomes failed; retrying").then_some(())
    })
    .await;
    let job = api.job(&accepted).await;
    assert_ne!(job["status"], "Complete", "{job}");
    let (status, _) = api.get("/healthz").await;
    assert_eq!(status, 200);
    FullDatabase {
        dir,
        db,
        url,
        server,
        _gate: gate,
        _endpoint: endpoint,
        receiver,
        ballast,
        accepted,
        fillers,
        refused: filler,
    }
}

impl FullDatabase {
    /// Frees space by deleting the ballast, then checks that every accepted job finishes
    /// with its results whole and that new jobs are accepted again.
    async fn free_space_and_finish(&mut self) {
        let api = &self.server.api;
        let (status, body) = api.delete(&format!("/v1/jobs/{}", self.ballast)).await;
        assert_eq!(status, 204, "{body}");
        let delivery = self.receiver.next().await;
        assert_eq!(delivery.body["job_id"], self.accepted.as_str());
        assert_eq!(delivery.body["status"], "Complete");
        for i in 1..=10 {
            let result = &delivery.body["result"][i.to_string()]["result"];
            assert_eq!(result["task"], i);
            assert_eq!(result["pad"].as_str().unwrap().len(), 16 * 1024);
        }
        for id in &self.fillers {
            let job = api.wait_settled(id).await;
            assert_eq!(job["status"], "Complete", "{job}");
            for i in 1..=20 {
                assert_eq!(
                    job["result"][i.to_string()],
                    json!({"status": "Complete", "result": {"task": i}})
                );
            }
        }
        let id = api.submit(&job_of(2, "/v1/test", None, json!({}))).await;
        assert_eq!(api.wait_settled(&id).await["status"], "Complete");
        assert_eq!(self.receiver.all().len(), 1, "the callback was sent once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full() {
    let mut full = fill_database().await;
    full.free_space_and_finish().await;
    let status = sigterm(full.server).await;
    assert!(status.success(), "{status:?}");
    assert_database_intact(&full.db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_then_sigkill() {
    let mut full = fill_database().await;
    // Killed with results it could not store: they are lost with the process, and their
    // tasks are called again by the next start, which finds the database still full.
    full.server.sigkill();
    assert_database_intact(&full.db).await;
    let log = full.dir.path().join("restarted.log");
    full.server = ServerProcess::on_url(&full.url).log(&log).start();
    let (status, body) = full
        .server
        .api
        .post_raw("/v1/job", Some("application/json"), &full.refused)
        .await;
    assert_eq!(status, 503, "still full: {body}");
    full.free_space_and_finish().await;
    full.server.sigkill();
    assert_database_intact(&full.db).await;
}

/// Sends SIGTERM and waits for the process to exit.
async fn sigterm(mut server: ServerProcess) -> std::process::ExitStatus {
    server.signal(libc::SIGTERM);
    tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job() {
    const TASKS: usize = 60;
    const IN_FLIGHT: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let (gate, _) = tokio::sync::watch::channel(false);
    let raw = gated_endpoint(&gate).await;
    let quick = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let in_flight = IN_FLIGHT.to_string();
    let args = [
        "--max-in-flight",
        in_flight.as_str(),
        "--shutdown-grace",
        "1",
    ];

    // Odd tasks answer in 20 ms, even ones not before the gate opens: they end up holding
    // every slot.
    let tasks: Vec<Value> = (1..=TASKS)
        .map(|i| {
            let endpoint = if i % 2 == 1 {
                quick.url("slow?ms=20")
            } else {
                raw.url("/held")
            };
            json!({"endpoint": endpoint, "params": {"task": i}})
        })
        .collect();
    let first = ServerProcess::start(&db, &args);
    let id = first
        .api
        .submit(&json!({"tasks": tasks, "callback": receiver.url()}))
        .await;
    eventually("every slot held", || async {
        (raw.call_count() == IN_FLIGHT).then_some(())
    })
    .await;
    let stopping = Instant::now();
    let status = sigterm(first).await;
    assert!(status.success(), "{status:?}");
    // The held calls do not keep the server past its grace period.
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    assert_database_intact(&db).await;
    let held: Vec<String> = raw
        .calls()
        .iter()
        .map(|c| c.header("idempotency-key"))
        .collect();
    let answered_before = quick.call_count();
    assert!(answered_before < TASKS / 2, "the job ran through");

    gate.send_replace(true);
    let second = ServerProcess::start(&db, &args);
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Complete");
    let result = delivery.body["result"].as_object().unwrap();
    assert_eq!(result.len(), TASKS);
    for i in 1..=TASKS {
        assert_eq!(
            result[&i.to_string()]["result"],
            json!({"task": i}),
            "task {i}"
        );
    }
    let job = second.api.wait_settled(&id).await;
    assert_eq!(
        job["counts"],
        json!({"pending": 0, "running": 0, "queued": 0, "complete": TASKS, "failed": 0, "cancelled": 0})
    );
    // What was answered before the stop was stored and is not asked again; the calls cut
    // off by it are made once more, with the same Idempotency-Key.
    let mut per_key = quick.calls_per_key();
    for call in raw.calls() {
        *per_key.entry(call.header("idempotency-key")).or_insert(0) += 1;
    }
    assert_eq!(per_key.len(), TASKS);
    for (key, n) in &per_key {
        let expected = if held.contains(key) { 2 } else { 1 };
        assert_eq!(*n, expected, "calls for {key}");
    }
    let tasks = all_tasks(&second.api, &id).await;
    assert!(tasks.iter().all(|t| t["attempts"] == 1), "{tasks:?}");
    assert_eq!(receiver.all().len(), 1);
    let status = sigterm(second).await;
    assert!(status.success(), "{status:?}");
    assert_database_intact(&db).await;
}
