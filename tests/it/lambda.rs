//! `doparallel lambda`'s handler in process: HTTP events of each origin (function URL, API
//! Gateway HTTP API, ALB) through the API, the worker invoked when a request made work due,
//! and work events that drain until idle or until the invocation's time is nearly out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use base64::Engine as _;
use doparallel::lambda::{Function, LambdaOptions, WorkerFunction};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{Value, json};

use crate::helpers::*;

const TOKEN: &str = "lambda-test-token";

/// One `Invoke` request the fake Lambda API received.
#[derive(Clone, Debug)]
struct Invocation {
    path: String,
    headers: HeaderMap,
    body: String,
}

/// A stand-in for the Lambda API's `Invoke` on loopback: records each request, answers 202
/// as Lambda does for `InvocationType=Event`.
async fn lambda_api() -> (url::Url, Arc<Mutex<Vec<Invocation>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = Router::new().fallback(post(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(Invocation {
                path: uri.path().to_string(),
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            StatusCode::ACCEPTED
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url::Url::parse(&format!("http://{addr}")).unwrap(), seen)
}

async fn function(
    dir: &tempfile::TempDir,
    settings: doparallel::Settings,
    worker: Option<url::Url>,
) -> Function {
    crate::moto::set_test_env();
    let store = doparallel::store::open(&sqlite_url(&db_path(dir)))
        .await
        .unwrap();
    let options = LambdaOptions {
        settings,
        tokens: doparallel::auth::ApiTokens::new([TOKEN]).unwrap(),
        max_body_bytes: 4096,
        shutdown_grace: Duration::from_secs(30),
        worker: worker.map(|endpoint| WorkerFunction {
            name: "doparallel-worker".into(),
            region: "us-east-1".into(),
            endpoint,
        }),
    };
    Function::start(store, options).await.unwrap()
}

/// Invokes `function` with `payload`, `deadline` from now (none: no deadline).
async fn invoke(function: &Function, payload: Value, deadline: Option<Duration>) -> Value {
    let mut context = Context::default();
    context.request_id = "test-request".into();
    if let Some(left) = deadline {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        context.deadline = (now + left).as_millis() as u64;
    }
    function
        .handle(LambdaEvent::new(payload, context))
        .await
        .expect("the handler answers")
}

/// The headers of a request, with the token when `authorized`.
fn headers(authorized: bool, host: &str) -> Value {
    let mut headers = json!({"content-type": "application/json", "host": host});
    if authorized {
        headers["authorization"] = json!(format!("Bearer {TOKEN}"));
    }
    headers
}

/// A function URL event (payload format 2.0, route `$default`).
fn function_url(method: &str, path: &str, body: Option<&str>, authorized: bool) -> Value {
    let host = "abcdefghij.lambda-url.us-east-1.on.aws";
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers(authorized, host),
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "abcdefghij",
            "domainName": host,
            "domainPrefix": "abcdefghij",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "test"
            },
            "requestId": "r-url",
            "routeKey": "$default",
            "stage": "$default",
            "time": "05/Dec/2026:13:00:00 +0000",
            "timeEpoch": 1796389200000u64
        },
        "body": body,
        "isBase64Encoded": false
    })
}

/// An API Gateway HTTP API event (payload format 2.0, a greedy route), its body in base64
/// as API Gateway sends a binary one.
fn http_api(method: &str, path: &str, body: Option<&str>, authorized: bool) -> Value {
    let host = "a1b2c3.execute-api.us-east-1.amazonaws.com";
    let encoded = body.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    json!({
        "version": "2.0",
        "routeKey": "ANY /{proxy+}",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers(authorized, host),
        "pathParameters": {"proxy": path.trim_start_matches('/')},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "a1b2c3",
            "domainName": host,
            "domainPrefix": "a1b2c3",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "test"
            },
            "requestId": "r-api",
            "routeKey": "ANY /{proxy+}",
            "stage": "$default",
            "time": "05/Dec/2026:13:00:00 +0000",
            "timeEpoch": 1796389200000u64
        },
        "body": encoded,
        "isBase64Encoded": body.is_some()
    })
}

/// An Application Load Balancer event.
fn alb(method: &str, path: &str, body: Option<&str>, authorized: bool) -> Value {
    json!({
        "requestContext": {
            "elb": {
                "targetGroupArn":
                    "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/dp/0123456789abcdef"
            }
        },
        "httpMethod": method,
        "path": path,
        "queryStringParameters": {},
        "headers": headers(authorized, "dp-1234567890.us-east-1.elb.amazonaws.com"),
        "body": body.unwrap_or(""),
        "isBase64Encoded": false
    })
}

/// The status and the JSON body of an HTTP answer, whatever its origin's shape.
fn answer(response: &Value) -> (u16, Value) {
    let status = response["statusCode"].as_u64().expect("a status code") as u16;
    let text = match response["body"].as_str() {
        Some(text) if response["isBase64Encoded"] == json!(true) => String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap(),
        )
        .unwrap(),
        Some(text) => text.to_string(),
        None => String::new(),
    };
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn http_events_of_each_origin_reach_the_api_and_wake_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start().await;
    let (lambda_url, invocations) = lambda_api().await;
    let function = function(&dir, test_settings(), Some(lambda_url)).await;

    // Submit through a function URL: accepted, and the worker is invoked.
    let job = job_of(2, &endpoint.url("echo"), None, json!({})).to_string();
    let response = invoke(
        &function,
        function_url("POST", "/v1/jobs", Some(&job), true),
        None,
    )
    .await;
    let (status, body) = answer(&response);
    assert_eq!(status, 202, "{response}");
    let id = body["job_id"].as_str().expect("a job id").to_string();
    let seen = invocations.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one Invoke per request that made work due");
    let sent = &seen[0];
    assert_eq!(
        sent.path,
        "/2015-03-31/functions/doparallel-worker/invocations"
    );
    assert_eq!(sent.headers["x-amz-invocation-type"], "Event");
    assert_eq!(
        serde_json::from_str::<Value>(&sent.body).unwrap(),
        json!({"doparallel": "work"})
    );
    let authorization = sent.headers["authorization"].to_str().unwrap();
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=testing/")
            && authorization.contains("/us-east-1/lambda/aws4_request"),
        "signed for Lambda: {authorization}"
    );

    // Read it through an HTTP API (a base64 body on the way in is decoded; none here) and
    // an ALB: accepted, not called, as nothing has drained yet.
    let path = format!("/v1/jobs/{id}");
    let (status, view) = answer(&invoke_of(&function, http_api("GET", &path, None, true)).await);
    assert_eq!(
        (status, view["status"].as_str()),
        (200, Some("Pending")),
        "{view}"
    );
    let response = invoke_of(&function, alb("GET", &path, None, true)).await;
    assert_eq!(answer(&response).0, 200, "{response}");
    assert_eq!(
        response["statusDescription"], "200 OK",
        "the ALB shape: {response}"
    );
    assert_eq!(endpoint.call_count(), 0, "the API makes no calls");

    // A submission as a base64 body through the HTTP API.
    let (status, _) =
        answer(&invoke_of(&function, http_api("POST", "/v1/jobs", Some(&job), true)).await);
    assert_eq!(status, 202);

    // Refusals, each in its origin's shape, and none invokes the worker.
    let (status, body) = answer(&invoke_of(&function, alb("GET", &path, None, false)).await);
    assert_eq!(status, 401, "{body}");
    let big = job_of(2, &endpoint.url(&"x".repeat(5000)), None, json!({})).to_string();
    let (status, body) = answer(
        &invoke_of(
            &function,
            function_url("POST", "/v1/jobs", Some(&big), true),
        )
        .await,
    );
    assert_eq!(status, 413, "{body}");
    // No event stream: a buffered answer could not stream, and the clients poll instead.
    let events = format!("{path}/events");
    let (status, _) = answer(&invoke_of(&function, function_url("GET", &events, None, true)).await);
    assert_eq!(status, 404);
    assert_eq!(
        invocations.lock().unwrap().len(),
        2,
        "the two submissions only"
    );

    // The worker's event drains both jobs.
    let report = drain(&function, 60).await;
    assert_eq!(report["calls"], 4, "{report}");
    assert_eq!(report["ended"], "idle", "{report}");
    let (_, view) = answer(&invoke_of(&function, function_url("GET", &path, None, true)).await);
    assert_eq!(view["status"], "Complete", "{view}");
    assert_eq!(endpoint.call_count(), 4);
}

/// A `{"doparallel": "work"}` event with `secs` seconds left.
async fn drain(function: &Function, secs: u64) -> Value {
    invoke(
        function,
        json!({"doparallel": "work"}),
        Some(Duration::from_secs(secs)),
    )
    .await
}

/// An HTTP event without a deadline.
async fn invoke_of(function: &Function, payload: Value) -> Value {
    invoke(function, payload, None).await
}

#[tokio::test]
async fn a_scheduled_event_drains_and_sends_the_callback() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let function = function(&dir, test_settings(), None).await;
    let callback = format!("http://{}/cb", receiver.addr);
    let job = job_of(3, &endpoint.url("echo"), Some(&callback), json!({})).to_string();
    let (status, _) = answer(
        &invoke_of(
            &function,
            function_url("POST", "/v1/jobs", Some(&job), true),
        )
        .await,
    );
    assert_eq!(status, 202);

    let scheduled = json!({
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-12-05T13:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/doparallel-drain"],
        "detail": {}
    });
    let report = invoke(&function, scheduled, Some(Duration::from_secs(60))).await;
    assert_eq!(
        (&report["calls"], &report["callbacks"], &report["ended"]),
        (&json!(3), &json!(1), &json!("idle")),
        "{report}"
    );
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Complete");
    assert_eq!(
        delivery.body["result"].as_object().map(|r| r.len()),
        Some(3),
        "{}",
        delivery.body
    );
}

#[tokio::test]
async fn a_drain_stops_before_the_deadline_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start().await;
    let mut settings = test_settings();
    // The call cut off by the first drain's end is taken again after its lease.
    settings.lease_timeout = Duration::from_secs(1);
    let function = function(&dir, settings, None).await;
    let job = json!({"tasks": [{"endpoint": endpoint.url("slow?ms=6000"), "params": {}}]});
    let (status, body) = answer(
        &invoke_of(
            &function,
            function_url("POST", "/v1/jobs", Some(&job.to_string()), true),
        )
        .await,
    );
    assert_eq!(status, 202);
    let id = body["job_id"].as_str().unwrap().to_string();

    // Ten seconds left: work is taken for 10 - 10/4 (grace) - 5 (margin) = 2.5 s, and the
    // call in flight gets its 2.5 s of grace; it needs 6.
    let started = Instant::now();
    let report = drain(&function, 10).await;
    assert_eq!(report["ended"], "max_duration", "{report}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ended before the deadline"
    );
    // Abandoned, not left running: its connection is closed before the 6 s it would take.
    eventually("the abandoned call to stop", || async {
        (endpoint.in_flight() == 0).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the call was cut short"
    );

    let report = drain(&function, 60).await;
    assert_eq!(report["ended"], "idle", "{report}");
    let path = format!("/v1/jobs/{id}");
    let (_, view) = answer(&invoke_of(&function, function_url("GET", &path, None, true)).await);
    assert_eq!(view["status"], "Complete", "{view}");
    assert_eq!(
        endpoint.call_count(),
        2,
        "called again after the first drain ran out"
    );
}

#[tokio::test]
async fn an_unknown_event_is_an_error_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let function = function(&dir, test_settings(), None).await;
    let error = function
        .handle(LambdaEvent::new(
            json!({"hello": "world"}),
            Context::default(),
        ))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("neither an HTTP request"),
        "{error}"
    );
    let error = function
        .handle(LambdaEvent::new(
            json!({"doparallel": "serve"}),
            Context::default(),
        ))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("unknown command \"serve\""),
        "{error}"
    );
}

/// cargo-lambda's emulator of the Lambda control plane on a loopback port, with the runtime
/// API only (`cargo lambda watch --only-lambda-apis`): the test starts the function's
/// processes itself, from the binary under test. Ended when dropped.
struct Emulator {
    child: std::process::Child,
    port: u16,
}

impl Emulator {
    /// The emulator, or `None` (after a loud notice) when cargo-lambda is not installed
    /// outside CI.
    fn start() -> Option<Emulator> {
        let installed = std::process::Command::new("cargo-lambda")
            .args(["lambda", "--version"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            let why = "cargo-lambda is not installed (python3 -m pip install cargo-lambda)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}; CI needs it for the Lambda emulator test");
            }
            eprintln!("\n!!!!!!!!\n!!! SKIPPING the Lambda emulator test: {why}\n!!!!!!!!\n");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("cargo-lambda")
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1"])
            .args(["-P", &port.to_string()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("cargo-lambda starts");
        let emulator = Emulator { child, port };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < DEADLINE, "the emulator listens in time");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(emulator)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A function process, as Lambda starts one: the binary with no arguments, its
    /// settings in the environment.
    fn function(&self, env: &[(&str, &str)]) -> FunctionProcess {
        let child = std::process::Command::new(binary())
            // What Lambda sets; the emulator serves one function, named `_`.
            .env("AWS_LAMBDA_RUNTIME_API", format!("{}/.rt", self.url()))
            .env("AWS_LAMBDA_FUNCTION_NAME", "_")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("LAMBDA_LOG").unwrap_or("warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        FunctionProcess(child)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct FunctionProcess(std::process::Child);

impl Drop for FunctionProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The whole serverless path under the emulator, over DynamoDB (moto): a job submitted
/// through the local function URL is accepted by one instance, which invokes the worker
/// through the emulator's `Invoke` endpoint; the instance that takes that invocation makes
/// the calls and sends the callback. No schedule runs here: the callback proves the
/// invocation.
#[tokio::test]
async fn under_the_lambda_emulator_a_job_runs_from_the_function_url_to_its_callback() {
    let Some(table) = crate::moto::fresh_table().await else {
        return;
    };
    let Some(emulator) = tokio::task::spawn_blocking(Emulator::start).await.unwrap() else {
        return;
    };
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let env = [
        ("DOPARALLEL_DATABASE_URL", table.as_str()),
        ("DOPARALLEL_API_TOKENS", TOKEN),
        ("DOPARALLEL_WORKER_FUNCTION", "_"),
        ("AWS_ENDPOINT_URL_LAMBDA", &emulator.url()),
        ("DOPARALLEL_ALLOW_NETS", "127.0.0.0/8"),
    ];
    // Two instances, as Lambda runs more than one when an invocation arrives while the
    // only one is busy (the emulator answers even an `Event` invocation only once run).
    let _api = emulator.function(&env);
    let _worker = emulator.function(&env);

    let job = job_of(3, &endpoint.url("echo"), Some(&receiver.url()), json!({}));
    let http = reqwest::Client::new();
    let submit = format!("{}/lambda-url/_/v1/jobs", emulator.url());
    let response = eventually("the function URL accepts the job", || async {
        let response = http
            .post(&submit)
            .bearer_auth(TOKEN)
            .json(&job)
            .send()
            .await
            .ok()?;
        (response.status() == 202).then_some(response)
    })
    .await;
    let id = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();

    let delivery = receiver.next().await;
    assert_eq!(delivery.body["job_id"], id.as_str());
    assert_eq!(delivery.body["status"], "Complete", "{}", delivery.body);
    assert_eq!(endpoint.call_count(), 3);
    let view: Value = http
        .get(format!("{}/lambda-url/_/v1/jobs/{id}", emulator.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["callback"]["state"], "delivered", "{view}");
}

#[test]
fn lambda_refuses_to_start_outside_lambda_or_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let out = std::process::Command::new(binary())
            .arg("lambda")
            .args(["--database", &sqlite_url(&db)])
            .args(args)
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .env_remove("DOPARALLEL_API_TOKENS")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8(out.stderr).unwrap()
    };
    let stderr = run(&[], &["--api-token", TOKEN]);
    assert!(
        stderr.contains("AWS_LAMBDA_RUNTIME_API) is not set"),
        "{stderr}"
    );
    // The runtime API is never reached: the missing token stops it first.
    let stderr = run(&[("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9")], &[]);
    assert!(stderr.contains("without an API token"), "{stderr}");
    let stderr = run(
        &[("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9")],
        &["--api-token", TOKEN],
    );
    assert!(
        stderr.contains("cannot keep its state in SQLite"),
        "{stderr}"
    );
    assert!(!db.exists(), "nothing was created");
}

#[tokio::test]
async fn the_workers_invoke_is_signed_as_botocore_signs_it() {
    // botocore recomputes the signature of each Invoke (tests/sigv4/verify_server.py), for
    // a plain name and for an ARN with an alias, whose `:` is encoded in the path.
    crate::moto::set_test_env();
    let Some(verifier) = crate::sigv4::Verifier::start_as("testing", "testing", None) else {
        return;
    };
    for name in [
        "doparallel-worker",
        "arn:aws:lambda:us-east-1:123456789012:function:doparallel-worker:live",
    ] {
        let invoker = doparallel::lambda::WorkerInvoker::new(WorkerFunction {
            name: name.into(),
            region: "us-east-1".into(),
            endpoint: url::Url::parse(&verifier.url("/")).unwrap(),
        })
        .unwrap();
        invoker
            .invoke()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
