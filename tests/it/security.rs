//! The outbound guard, API tokens, limits and hostile input.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use doparallel::auth::ApiTokens;
use doparallel::egress::EgressPolicy;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::helpers::{
    Endpoint, Receiver, ServerProcess, db_path, spawn_app_full, spawn_app_with, test_settings,
};

/// A listener that counts every connection made to it; nothing should ever reach it.
struct Canary {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Canary {
    async fn start() -> Self {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let mut listeners = vec![v4];
        // The same port on ::1 too, where the machine has IPv6.
        if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
            listeners.push(v6);
        }
        for listener in listeners {
            let count = connections.clone();
            tokio::spawn(async move {
                while listener.accept().await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Canary { port, connections }
    }
}

fn guarded_config() -> doparallel::Settings {
    doparallel::Settings {
        egress: Arc::new(EgressPolicy::guarded(Vec::new())),
        ..test_settings()
    }
}

#[tokio::test]
async fn hostile_urls_never_reach_the_canary() {
    let app = spawn_app_with(guarded_config()).await;
    let canary = Canary::start().await;
    let p = canary.port;
    // Every spelling of loopback and "this host" a URL parser might let through.
    let literals = [
        format!("http://127.0.0.1:{p}/"),
        format!("HTTP://127.0.0.1:{p}/"),
        format!("http://127.0.0.1.:{p}/"),
        format!("http://2130706433:{p}/"),
        format!("http://0x7f000001:{p}/"),
        format!("http://0X7F000001:{p}/"),
        format!("http://0x7f.0x0.0x0.0x1:{p}/"),
        format!("http://0x7f.1:{p}/"),
        format!("http://0177.0.0.1:{p}/"),
        format!("http://0177.0000.0000.0001:{p}/"),
        format!("http://017700000001:{p}/"),
        format!("http://127.1:{p}/"),
        format!("http://127.0.1:{p}/"),
        format!("http://127.000.000.001:{p}/"),
        format!("http://127.255.255.254:{p}/"),
        format!("http://%31%32%37.0.0.1:{p}/"),
        format!("http://\u{FF11}\u{FF12}\u{FF17}.0.0.1:{p}/"),
        format!("http://user:pw@127.0.0.1:{p}/"),
        format!("http://example.com@127.0.0.1:{p}/"),
        format!("https://127.0.0.1:{p}/"),
        format!("http://0.0.0.0:{p}/"),
        format!("http://0:{p}/"),
        format!("http://0.0.0:{p}/"),
        format!("http://[::]:{p}/"),
        format!("http://[::1]:{p}/"),
        format!("http://[0:0:0:0:0:0:0:1]:{p}/"),
        format!("http://[0000::0001]:{p}/"),
        format!("http://[::ffff:127.0.0.1]:{p}/"),
        format!("http://[::ffff:7f00:1]:{p}/"),
        format!("http://[0:0:0:0:0:ffff:127.0.0.1]:{p}/"),
        format!("http://[::127.0.0.1]:{p}/"),
        format!("http://[::ffff:0.0.0.0]:{p}/"),
        format!("http://[64:ff9b::127.0.0.1]:{p}/"),
        format!("http://[64:ff9b::7f00:1]:{p}/"),
        format!("http://[2002:7f00:1::1]:{p}/"),
        format!("http://[fe80::1]:{p}/"),
        format!("http://[fc00::1]:{p}/"),
        format!("http://[ff02::1]:{p}/"),
    ];
    for (i, url) in literals.iter().enumerate() {
        let job = json!({"tasks": [{"endpoint": "/v1/test"}, {"endpoint": url}]});
        let (status, answer) = app
            .post_raw("/v1/job", Some("application/json"), &job.to_string())
            .await;
        assert_eq!(status, 422, "#{i} {url} was accepted: {answer}");
        let msg = answer["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("task 2: endpoint host"),
            "#{i} {url}: {msg}"
        );
        let as_callback = json!({"callback": url, "tasks": []});
        let (status, answer) = app
            .post_raw(
                "/v1/job",
                Some("application/json"),
                &as_callback.to_string(),
            )
            .await;
        assert_eq!(status, 422, "#{i} callback {url} was accepted: {answer}");
        assert!(
            answer["msg"]
                .as_str()
                .unwrap()
                .starts_with("callback: host"),
            "{answer}"
        );
    }
    let (_, list) = app.get("/v1/jobs").await;
    assert_eq!(list["jobs"], json!([]), "a refused job was stored");

    // Names are judged by what they resolve to: the task fails as blocked, unretried.
    let names = [
        format!("http://localhost:{p}/"),
        format!("http://LocalHost:{p}/x"),
    ];
    for url in &names {
        let id = app
            .submit(&json!({"callback": url, "tasks": [{"endpoint": url}], "options": {"backoff_ms": 1}}))
            .await;
        let job = app.wait_settled(&id).await;
        assert_eq!(job["status"], "Failed", "{url}");
        let task = &app.tasks(&id).await[0];
        assert_eq!(task["error"]["kind"], "blocked", "{url}: {task}");
        assert_eq!(task["attempts"], 1, "a blocked call is not retried");
        assert!(
            task["error"]["message"]
                .as_str()
                .unwrap()
                .contains("denied address"),
            "{task}"
        );
        assert_eq!(job["callback"]["state"], "failed", "{url}: {job}");
        assert!(
            job["callback"]["last_error"]
                .as_str()
                .unwrap()
                .contains("denied address")
        );
    }
    assert!(literals.len() + names.len() >= 40);
    assert_eq!(
        canary.connections.load(Ordering::SeqCst),
        0,
        "the canary was reached"
    );
}

#[tokio::test]
async fn tokens_guard_the_api_and_each_sees_its_own_jobs() {
    let alice = "alice-token-0123456789";
    let bob = "bob-token-0123456789ab";
    let carol = "carol+token/with=odd chars";
    let tokens = ApiTokens::new([alice, bob, carol]).unwrap();
    let app = spawn_app_full(test_settings(), tokens, 1024 * 1024).await;
    let url = |path: &str| format!("{}{path}", app.base);
    let job = json!({"tasks": [{"endpoint": "/v1/test"}]});

    let anonymous = app
        .http
        .post(url("/v1/job"))
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("Bearer")
    );
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["status"], "Error");
    let wrong = app
        .http
        .get(url("/v1/jobs"))
        .bearer_auth("alice-token-0123456788")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    for path in ["/metrics", "/v1/jobs"] {
        assert_eq!(
            app.http
                .get(url(path))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            401,
            "{path}"
        );
    }
    for (path, status) in [("/healthz", 200), ("/openapi.json", 200)] {
        assert_eq!(
            app.http
                .get(url(path))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            status,
            "{path}"
        );
    }
    let test = app
        .http
        .post(url("/v1/test"))
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        test.status().as_u16(),
        200,
        "the seed's test task stays open"
    );

    let resp = app
        .http
        .post(url("/v1/job"))
        .bearer_auth(alice)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let id = resp.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let api = &app.api;
    let get = |token: &'static str, path: String| async move { api.get_as(token, &path).await.0 };
    assert_eq!(get(alice, format!("/v1/jobs/{id}")).await, 200);
    assert_eq!(
        get(bob, format!("/v1/jobs/{id}")).await,
        404,
        "another token's job is not found"
    );
    assert_eq!(get(bob, format!("/v1/jobs/{id}/tasks")).await, 404);
    assert_eq!(get(bob, format!("/v1/jobs/{id}/events")).await, 404);
    let cancel = app
        .http
        .post(url(&format!("/v1/jobs/{id}/cancel")))
        .bearer_auth(bob)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status().as_u16(), 404);
    let (_, bobs) = app.get_as(bob, "/v1/jobs").await;
    assert_eq!(bobs["jobs"], json!([]));
    let (_, alices) = app.get_as(alice, "/v1/jobs").await;
    assert_eq!(alices["jobs"][0]["job_id"], id.as_str());

    // A browser's Basic authentication, with the token as password, and an EventSource's
    // query parameter on the events stream.
    let basic = app
        .http
        .get(url("/v1/jobs"))
        .basic_auth("anyone", Some(alice))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 200);
    let events = app
        .http
        .get(url(&format!("/v1/jobs/{id}/events?access_token={alice}")))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    // A token with characters that a query string must escape.
    let resp = app
        .http
        .post(url("/v1/job"))
        .bearer_auth(carol)
        .json(&job)
        .send()
        .await
        .unwrap();
    let carols = resp.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let escaped = app
        .http
        .get(url(&format!(
            "/v1/jobs/{carols}/events?access_token=carol%2Btoken%2Fwith%3Dodd+chars"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(escaped.status().as_u16(), 200);
    let elsewhere = app
        .http
        .get(url(&format!("/v1/jobs?access_token={alice}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        elsewhere.status().as_u16(),
        401,
        "tokens in URLs are only for the events stream"
    );
}

#[test]
fn serve_refuses_an_open_non_loopback_listen() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = ServerProcess::on(&db_path(&dir))
        .listen("0.0.0.0:0")
        .refused();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without an API token"),
        "{stderr}"
    );
    assert!(!db_path(&dir).exists(), "nothing was created");
}

/// Callbacks and task calls never share a key: a task call's body is its submitter's, so a
/// shared key would let any submitter have the server sign a forged callback (the replay
/// itself is checked with the Standard Webhooks library in `tests/webhooks/verify.py`).
#[test]
fn serve_refuses_one_secret_for_callbacks_and_task_calls() {
    let dir = tempfile::tempdir().unwrap();
    let secret = doparallel::webhook::WebhookSecret::generate();
    let other = doparallel::webhook::WebhookSecret::generate();
    let secret_file = dir.path().join("task-secrets");
    std::fs::write(&secret_file, format!("# rotated\n{other}\n{secret}\n")).unwrap();
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, format!("tenant-token-0123456789 {other}\n")).unwrap();
    let refused = |args: &[&str]| {
        let stderr = ServerProcess::on(&db_path(&dir)).args(args).refused();
        assert!(
            stderr.contains("both a task secret and a callback secret"),
            "{stderr}"
        );
        assert!(!stderr.contains(&secret["whsec_".len()..]), "{stderr}");
        stderr
    };
    refused(&["--webhook-secret", &secret, "--task-secret", &secret]);
    let file = secret_file.to_str().unwrap();
    refused(&["--webhook-secret", &secret, "--task-secret-file", file]);
    // A tenant's own callback secret may not be a task secret either.
    let stderr = refused(&[
        "--api-token-file",
        token_file.to_str().unwrap(),
        "--task-secret",
        &other,
    ]);
    assert!(stderr.contains("a tenant's secret"), "{stderr}");
    assert!(!db_path(&dir).exists(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let token = "never-log-this-token-123";
    let secret = doparallel::webhook::WebhookSecret::generate();
    let server = ServerProcess::on(&db_path(&dir))
        .args(&[
            "--api-token",
            token,
            "--webhook-secret",
            &secret,
            "--log-format",
            "json",
        ])
        .log(&log)
        .start();
    let api = &server.api;
    let mut receiver = Receiver::start(1, 500).await;
    let job = json!({"callback": receiver.url(), "tasks": [{"endpoint": "/v1/test"}]});
    let resp = api
        .http
        .post(format!("{}/v1/job", api.base))
        .bearer_auth(token)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    receiver.next().await;
    receiver.next().await;
    let refused = api
        .http
        .get(format!("{}/v1/jobs", api.base))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let text = crate::helpers::eventually("the delivery in the log", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("callback delivered").then_some(text)
    })
    .await;
    assert!(!text.contains(token), "the token was logged");
    assert!(
        !text.contains(&secret["whsec_".len()..]),
        "the secret was logged"
    );
    assert!(
        !text.contains("wrong-token-wrong-token"),
        "a presented token was logged"
    );
}

#[tokio::test]
async fn limits_hold_at_the_limit_and_refuse_one_past_it() {
    let mut config = test_settings();
    config.max_response_bytes = 1000;
    config.max_callback_bytes = 2000;
    let app = spawn_app_full(config, Default::default(), 3000).await;
    let endpoint = Endpoint::start().await;

    // Request body: exactly the limit, then one byte more.
    let base = json!({"tasks": [{"endpoint": "/v1/test", "params": ""}]}).to_string();
    let at = base.replace("\"\"", &format!("\"{}\"", "p".repeat(3000 - base.len())));
    assert_eq!(at.len(), 3000);
    let (status, answer) = app.post_raw("/v1/job", Some("application/json"), &at).await;
    assert_eq!(status, 202, "{answer}");
    let past = at.replacen('p', "pp", 1);
    let (status, answer) = app
        .post_raw("/v1/job", Some("application/json"), &past)
        .await;
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["msg"]
            .as_str()
            .unwrap()
            .contains("larger than the server accepts")
    );

    // Response body: read up to the limit; one byte more fails the task.
    let job = json!({"tasks": [
        {"endpoint": endpoint.url("big?n=1000")},
        {"endpoint": endpoint.url("big?n=1001")},
    ], "options": {"tolerated_failures": 1}});
    let id = app.submit(&job).await;
    app.wait_settled(&id).await;
    let tasks = app.tasks(&id).await;
    assert_eq!(tasks[0]["status"], "Complete");
    assert_eq!(tasks[0]["result"].as_str().unwrap().len(), 1000);
    assert_eq!(tasks[1]["error"]["kind"], "response_too_large");
    assert_eq!(tasks[1]["attempts"], 1, "not retried");

    // A callback body past its limit goes without results, pointing at them instead.
    let mut receiver = Receiver::start(0, 200).await;
    let small =
        json!({"callback": receiver.url(), "tasks": [{"endpoint": "/v1/test", "params": "a"}]});
    let small_id = app.submit(&small).await;
    let whole = receiver.next().await;
    assert_eq!(whole.body["job_id"], small_id.as_str());
    assert!(whole.body["result"].is_object());
    let large = json!({"callback": receiver.url(), "tasks": [
        {"endpoint": endpoint.url("big?n=900")}, {"endpoint": endpoint.url("big?n=900")},
        {"endpoint": endpoint.url("big?n=900")},
    ]});
    let large_id = app.submit(&large).await;
    let cut = receiver.next().await;
    assert_eq!(cut.body["job_id"], large_id.as_str());
    assert_eq!(cut.body["status"], "Complete");
    assert!(cut.body.get("result").is_none(), "{}", cut.body);
    assert_eq!(cut.body["result_url"], format!("/v1/jobs/{large_id}/tasks"));
    // Reading the job back is bounded the same way.
    let view = app.job(&large_id).await;
    assert!(view.get("result").is_none(), "{view}");
    assert_eq!(view["result_url"], format!("/v1/jobs/{large_id}/tasks"));
}

/// Any JSON, with strings that can never form a URL (no `:` or `/`): whatever is accepted
/// can never make a call.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z0-9 _.-]{0,12}".prop_map(Value::String),
        Just(json!("tasks")),
        Just(json!("endpoint")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("tasks".to_string()),
                    Just("endpoint".to_string()),
                    Just("params".to_string()),
                    Just("options".to_string()),
                    "[a-z]{1,8}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn arbitrary_bodies_never_give_a_server_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(spawn_app_with(guarded_config()));
    let post = |body: Vec<u8>| {
        rt.block_on(async {
            app.http
                .post(format!("{}/v1/job", app.base))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let config = ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    };
    proptest!(config.clone(), |(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
        let status = post(bytes);
        prop_assert!(status < 500, "status {}", status);
    });
    proptest!(config, |(value in any_json())| {
        let status = post(value.to_string().into_bytes());
        prop_assert!(status < 500, "status {} for {}", status, value);
    });
}

/// A hostile endpoint's answer is stored within `--max-response-bytes` in its stored form
/// too: a 1 MiB answer of NUL bytes (6 MiB as a JSON string) fails the task as
/// `response_too_large`; a report past the bound (2 MiB, under the body limit) is refused
/// with 413 and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_results_stay_within_the_response_bound() {
    use crate::helpers::{RawEndpoint, respond};
    let nul = RawEndpoint::start(|_, _, mut stream| async move {
        let body = vec![0u8; 1024 * 1024 - 16];
        respond(
            &mut stream,
            "200 OK",
            &[("content-type", "text/plain")],
            &body,
        )
        .await;
    })
    .await;
    let app = spawn_app_with(test_settings()).await;
    let id = app
        .submit(&json!({"tasks": [{"endpoint": nul.url("/nul")}]}))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let error = &job["result"]["1"]["error"];
    assert_eq!(error["kind"], "response_too_large", "{error}");

    let accepting = Endpoint::start().await;
    let id = app
        .submit(&json!({"tasks": [{"endpoint": accepting.url("accept")}], "options": {"async_reports": true}}))
        .await;
    let call = crate::helpers::eventually("the call", || async { accepting.calls().pop() }).await;
    let url = call.header("doparallel-result-url");
    let huge = format!(
        r#"{{"status":"Complete","result":"{}"}}"#,
        "r".repeat(2 * 1024 * 1024)
    );
    let resp = app.http.post(&url).body(huge).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let job = app.job(&id).await;
    assert_eq!(job["status"], "Running", "{job}");
    let small = r#"{"status":"Complete","result":{"ok":true}}"#;
    let resp = app.http.post(&url).body(small).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Logs carry sizes and ids, never task data, at every level: a job with a large,
/// recognisable result run with `RUST_LOG=trace` leaves none of it in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_data_never_reaches_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let server = ServerProcess::on(&db_path(&dir))
        .envs(&[("RUST_LOG", "trace")])
        .log(&log)
        .start();
    let marker = "recognisable-payload-".repeat(5000);
    let id = server
        .api
        .submit(&json!({"tasks": [{"endpoint": "/v1/test", "params": {"p": marker}}]}))
        .await;
    server.api.wait_settled(&id).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("attempt over"), "the trace level was not on");
    assert!(
        !text.contains("recognisable-payload-"),
        "task data in the log"
    );
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
}
