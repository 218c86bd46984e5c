//! The client commands (`submit`, `status`, `tasks`, `jobs`, `cancel`, `delete`): the built binary
//! run against the real server in this process, as a user would run it.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use doparallel::auth::ApiTokens;

use crate::helpers::{Endpoint, binary, eventually, spawn_app, spawn_app_full, test_settings};

/// What one run of the binary left behind.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    /// An error as the issue wants it: exit 2, nothing on stdout, one line on stderr that
    /// contains `text`.
    fn assert_one_line_error(&self, text: &str) {
        assert_eq!(self.code, 2, "{self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {self:?}");
        assert!(lines[0].starts_with("error: "), "{self:?}");
        assert!(lines[0].contains(text), "{text:?} missing: {self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
    }
}

/// Runs `doparallel ARGS` with `stdin` and extra environment variables. The client's own
/// variables are cleared first, so the caller's environment cannot change the outcome.
async fn doparallel(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut child = tokio::process::Command::new(binary())
        .args(args)
        .env_remove("DOPARALLEL_SERVER")
        .env_remove("DOPARALLEL_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(crate::helpers::DEADLINE, child.wait_with_output())
        .await
        .expect("the command ends in time")
        .unwrap();
    Output {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A client command against `server`.
pub(crate) async fn cli(server: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--server", server]);
    doparallel(&all, None, &[]).await
}

/// The rows of a table printed on stdout, each split into its columns.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| {
            l.split("   ")
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect()
}

fn seed_example() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed-job.json")
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_prints_the_same_document_as_run_and_exits_0() {
    let app = spawn_app().await;
    let out = cli(&app.base, &["submit", seed_example(), "--wait"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.lines().count(), 1, "one document: {out:?}");
    let doc = out.json();
    let id = doc["job_id"].as_str().unwrap().to_string();
    assert_eq!(doc["status"], "Complete");
    assert_eq!(doc["msg"], "Job Finished");
    assert_eq!(doc["result"], app.job(&id).await["result"]);
    // Not a terminal: plain progress lines, the last one with the outcome.
    assert!(
        out.stderr
            .contains(&format!("job {id}: 2/2 done, 0 failed, ")),
        "{out:?}"
    );
    assert!(out.stderr.contains("; Complete after "), "{out:?}");

    // `run` of the same job prints the same bytes but for the id.
    let run = doparallel(&["run", seed_example()], None, &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let run_id = run.json()["job_id"].as_str().unwrap().to_string();
    assert_eq!(run.stdout.replace(&run_id, &id), out.stdout);
    assert!(
        run.stderr
            .contains(&format!("job {run_id}: 2/2 done, 0 failed, ")),
        "run shows the same progress: {run:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_prints_the_job_id_or_the_servers_answer() {
    let app = spawn_app().await;
    let job = json!({"tasks": [{"endpoint": "/v1/test", "params": 1}]}).to_string();
    let out = doparallel(&["submit", "-", "--server", &app.base], Some(&job), &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.stdout.trim();
    assert_eq!(out.stdout, format!("{id}\n"), "the id alone");
    assert_eq!(app.wait_settled(id).await["status"], "Complete");

    let out = doparallel(
        &["submit", "-", "--json"],
        Some(&job),
        &[("DOPARALLEL_SERVER", &app.base)],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let answer = out.json();
    assert_eq!(answer["status"], "Success");
    assert_eq!(answer["msg"], "Job Executed");
    let id = answer["job_id"].as_str().unwrap();
    assert_eq!(answer["status_url"], format!("/v1/jobs/{id}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_exits_1_and_tasks_failed_lists_its_failures() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let job = json!({"tasks": [
        {"endpoint": endpoint.url("echo"), "params": {"n": 1}},
        {"endpoint": endpoint.url("missing")},
        {"endpoint": endpoint.url("echo"), "params": {"n": 3}},
    ]})
    .to_string();
    let out = doparallel(
        &["submit", "-", "--wait", "--server", &app.base],
        Some(&job),
        &[],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    let doc = out.json();
    assert_eq!(doc["status"], "Failed");
    assert_eq!(doc["result"]["2"]["error"]["http_status"], 404);
    let id = doc["job_id"].as_str().unwrap();

    let status = cli(&app.base, &["status", id]).await;
    assert_eq!(
        status.code, 1,
        "status exits with the job's code: {status:?}"
    );

    let out = cli(&app.base, &["tasks", id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let table = rows(&out.stdout);
    assert_eq!(
        table[0],
        ["INDEX", "STATUS", "ATTEMPTS", "LATENCY", "RESULT/ERROR"]
    );
    assert_eq!(table.len(), 4, "{out:?}");
    assert_eq!(table[1][..3], ["1", "Complete", "1"]);
    assert_eq!(table[1][4], r#"{"n":1}"#);

    let out = cli(&app.base, &["tasks", id, "--failed"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let table = rows(&out.stdout);
    assert_eq!(table.len(), 2, "only the failed task: {out:?}");
    assert_eq!(table[1][..3], ["2", "Failed", "1"]);
    assert_eq!(
        table[1][4],
        "http_status 404: endpoint answered 404 Not Found: no such thing"
    );

    let out = cli(&app.base, &["tasks", id, "--failed", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let page = out.json();
    let indexes: Vec<u64> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [2]);
    assert_eq!(page["tasks"][0]["error"]["kind"], "http_status");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_jobs_print_tables_or_the_servers_json() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let complete = app
        .submit(&json!({"tasks": [{"endpoint": "/v1/test"}, {"endpoint": "/v1/test"}]}))
        .await;
    let failed = app
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("missing")}]}))
        .await;
    app.wait_settled(&complete).await;
    app.wait_settled(&failed).await;

    let out = cli(&app.base, &["status", &complete]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let table = rows(&out.stdout);
    assert_eq!(
        table[0],
        [
            "ID", "STATUS", "PROGRESS", "FAILED", "RUNNING", "QUEUED", "CALLBACK", "AGE"
        ]
    );
    assert_eq!(
        table[1][..7],
        [&complete, "Complete", "2/2", "0", "0", "0", "-"]
    );
    assert!(table[1][7].ends_with('s'), "an age in seconds: {out:?}");
    // Columns line up: every row starts its STATUS column at the same place.
    let at: Vec<_> = out
        .stdout
        .lines()
        .map(|l| l.find(" Complete").or(l.find(" STATUS")))
        .collect();
    assert_eq!(at[0], at[1], "{out:?}");

    let out = cli(&app.base, &["status", &complete, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json(),
        app.job(&complete).await,
        "the server's JSON as is"
    );

    let out = cli(&app.base, &["jobs", "--status", "Complete"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let table = rows(&out.stdout);
    assert_eq!(table.len(), 2, "{out:?}");
    assert_eq!(table[1][..3], [&complete, "Complete", "2/2"]);

    let out = cli(&app.base, &["jobs"]).await;
    let ids: Vec<&str> = out.stdout.lines().skip(1).map(|l| &l[..36]).collect();
    assert_eq!(ids, [&failed, &complete], "newest first: {out:?}");

    let out = cli(&app.base, &["jobs", "--status", "failed", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let list = out.json();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["jobs"][0]["job_id"], failed.as_str());
    assert_eq!(list["next_after"], Value::Null);

    let out = cli(&app.base, &["jobs", "--status", "Cancelled"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
    assert_eq!(out.stderr.trim(), "no jobs");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_job_and_refuses_a_finished_one() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("hang")}], "options": {"timeout_ms": 60000}}))
        .await;
    eventually("the call to hang", || async {
        (endpoint.call_count() == 1).then_some(())
    })
    .await;

    let out = cli(&app.base, &["status", &id]).await;
    assert_eq!(out.code, 0, "an unfinished job exits 0: {out:?}");
    assert_eq!(rows(&out.stdout)[1][1], "Running");

    let out = cli(&app.base, &["cancel", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with(&format!("job {id} cancelled")),
        "{out:?}"
    );
    let out = cli(&app.base, &["status", &id]).await;
    assert_eq!(out.code, 3, "a cancelled job exits 3: {out:?}");

    let done = app.submit(&json!({"tasks": []})).await;
    app.wait_settled(&done).await;
    let out = cli(&app.base, &["cancel", &done]).await;
    out.assert_one_line_error(&format!("cannot cancel job {done}: "));
    assert!(out.stderr.contains("(HTTP 409)"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_with_an_idempotency_key_runs_the_job_once() {
    let app = spawn_app().await;
    let job = json!({"tasks": [{"endpoint": "/v1/test", "params": 1}]}).to_string();
    let args = [
        "submit",
        "-",
        "--server",
        &app.base,
        "--idempotency-key",
        "k-1",
    ];
    let first = doparallel(&args, Some(&job), &[]).await;
    assert_eq!(first.code, 0, "{first:?}");
    let again = doparallel(&args, Some(&job), &[]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.stdout, first.stdout, "the same job, not a second one");
    let (_, list) = app.get("/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");

    // The same key with another body is the server's 409, as one line.
    let other = json!({"tasks": []}).to_string();
    let out = doparallel(&args, Some(&other), &[]).await;
    out.assert_one_line_error("(HTTP 409)");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_removes_a_finished_job_and_refuses_a_running_one() {
    let app = spawn_app().await;
    let endpoint = Endpoint::start().await;
    let done = app.submit(&json!({"tasks": []})).await;
    app.wait_settled(&done).await;
    let out = cli(&app.base, &["delete", &done]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, format!("job {done} deleted\n"));
    assert_eq!(app.get(&format!("/v1/jobs/{done}")).await.0, 404);

    let running = app
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("hang")}], "options": {"timeout_ms": 60000}}))
        .await;
    let out = cli(&app.base, &["delete", &running]).await;
    out.assert_one_line_error(&format!("cannot delete job {running}: "));
    assert!(out.stderr.contains("(HTTP 409)"), "{out:?}");
    assert_eq!(app.get(&format!("/v1/jobs/{running}")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_one_line_and_exit_2() {
    let server = format!("http://127.0.0.1:{}", closed_port());
    let want = format!(
        "cannot reach the server at {server}: connection refused (is doparallel serve running? set --server or DOPARALLEL_SERVER)"
    );
    for args in [
        vec!["status", "x"],
        vec!["jobs"],
        vec!["submit", seed_example(), "--wait"],
    ] {
        cli(&server, &args).await.assert_one_line_error(&want);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_one_line_and_exit_2() {
    let app = spawn_app().await;
    let submit = |body: &'static str| {
        let base = app.base.clone();
        async move { doparallel(&["submit", "-", "--server", &base], Some(body), &[]).await }
    };
    // The server's message, whatever its wording, with the task it names and the status.
    let out = submit(r#"{"tasks":[{"endpoint":"/v1/test"},{"endpoint":"x"}]}"#).await;
    out.assert_one_line_error("cannot submit the job in standard input: task 2: endpoint \"x\" ");
    assert!(out.stderr.trim_end().ends_with("(HTTP 422)"), "{out:?}");
    submit("{not json")
        .await
        .assert_one_line_error("malformed JSON");

    cli(&app.base, &["submit", "no/such/job.json"])
        .await
        .assert_one_line_error(
            "cannot read the job from no/such/job.json: No such file or directory",
        );
    cli(&app.base, &["status", "not-an-id"])
        .await
        .assert_one_line_error(
            "cannot read job not-an-id: no job with id \"not-an-id\" (HTTP 404)",
        );

    // Usage errors are clap's, several lines, but exit 2 all the same.
    let out = cli(&app.base, &["status"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = doparallel(&["jobs", "--server", "localhost:8080"], None, &[]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("is not an http(s) URL"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_sent_as_bearer_and_never_printed() {
    let token = "client-test-token-0001";
    let other = "client-test-token-0002";
    let tokens = ApiTokens::new([token, other]).unwrap();
    let app = spawn_app_full(test_settings(), tokens, 1024 * 1024).await;

    // From the environment, through the submission and the event stream alike.
    let out = doparallel(
        &["submit", seed_example(), "--wait", "--server", &app.base],
        None,
        &[("DOPARALLEL_TOKEN", token)],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.json()["job_id"].as_str().unwrap().to_string();

    let out = cli(&app.base, &["status", &id, "--token", token]).await;
    assert_eq!(out.code, 0, "{out:?}");
    // Another token does not see the job.
    cli(&app.base, &["status", &id, "--token", other])
        .await
        .assert_one_line_error("(HTTP 404)");

    for args in [
        vec!["status", id.as_str()],
        vec![
            "status",
            id.as_str(),
            "--token",
            "not-a-token-of-this-server",
        ],
    ] {
        let out = cli(&app.base, &args).await;
        out.assert_one_line_error(&format!("cannot read job {id}: "));
        assert!(
            out.stderr
                .contains("(HTTP 401; set --token-file, DOPARALLEL_TOKEN or --token)"),
            "{out:?}"
        );
        assert!(!out.stderr.contains("not-a-token"), "{out:?}");
    }

    // Help shows the variable's name, never its value.
    let help = doparallel(&["status", "--help"], None, &[("DOPARALLEL_TOKEN", token)]).await;
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("DOPARALLEL_TOKEN"), "{help:?}");
    assert!(!help.stdout.contains(token), "{help:?}");
}

/// A stand-in server with one job, `J`, for the paths of `submit --wait` that the real
/// server does not take on its own: a cut event stream, and a server without events.
#[derive(Clone, Default)]
struct Stub {
    /// Once set, `GET /v1/jobs/{STUB_ID}` answers the finished job with its result.
    finished: Arc<AtomicBool>,
    job_reads: Arc<AtomicUsize>,
    /// The `Last-Event-ID` of each connection to the event stream.
    event_connections: Arc<Mutex<Vec<Option<String>>>>,
}

impl Stub {
    /// Serves the stub; with `events`, the event stream is cut after its first events
    /// and only finishes on the second connection.
    async fn start(&self, events: bool) -> String {
        let accept = || async {
            (
                StatusCode::ACCEPTED,
                axum::Json(
                    json!({"status": "Success", "msg": "Job Executed", "job_id": STUB_ID, "status_url": format!("/v1/jobs/{STUB_ID}")}),
                ),
            )
        };
        let stub = self.clone();
        let mut app = Router::new().route("/v1/job", post(accept)).route(
            &format!("/v1/jobs/{STUB_ID}"),
            get(move || {
                let stub = stub.clone();
                async move {
                    let reads = stub.job_reads.fetch_add(1, Ordering::SeqCst) + 1;
                    // Without events, the job finishes on the third look.
                    if stub.finished.load(Ordering::SeqCst) || (!events && reads >= 3) {
                        stub_job(
                            "Complete",
                            0,
                            Some(r#"{"1":{"status":"Complete","result":1.10}}"#),
                        )
                    } else {
                        stub_job("Running", 1, None)
                    }
                }
            }),
        );
        if events {
            let stub = self.clone();
            app = app.route(
                &format!("/v1/jobs/{STUB_ID}/events"),
                get(move |headers: HeaderMap| {
                    let stub = stub.clone();
                    async move {
                        let last = headers
                            .get("last-event-id")
                            .map(|v| v.to_str().unwrap().to_string());
                        let mut seen = stub.event_connections.lock().unwrap();
                        seen.push(last);
                        let progress = stub_job("Running", 1, None);
                        let body = if seen.len() == 1 {
                            format!(
                                ": hello\n\nevent: progress\nid: 0\ndata: {progress}\n\n\
                                 event: task_failed\nid: 1\ndata: {{\"index\":1}}\n\n"
                            )
                        } else {
                            stub.finished.store(true, Ordering::SeqCst);
                            let done = stub_job("Complete", 0, None);
                            format!("event: finished\nid: 1\ndata: {done}\n\n")
                        };
                        ([("content-type", "text/event-stream")], body)
                    }
                }),
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }
}

/// The job `J` as the server shows it; `result` is raw JSON text, passed through as is, as
/// the real server does (a `Value` would turn `1.10` into `1.1`).
fn stub_job(status: &str, running: u64, result: Option<&str>) -> String {
    let job = json!({
        "job_id": STUB_ID, "status": status, "total": 1,
        "counts": {"pending": 0, "running": running, "complete": 1 - running, "failed": 0, "cancelled": 0},
        "created_at": "2026-01-01T00:00:00.000Z", "finished_at": null,
        "callback": {"url": null, "state": "none", "attempts": 0, "last_error": null},
        "options": {},
    })
    .to_string();
    match result {
        Some(raw) => format!("{},\"result\":{raw}}}", job.strip_suffix('}').unwrap()),
        None => job,
    }
}

/// The job id the stub answers with.
const STUB_ID: &str = "0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b";

const STUB_DOCUMENT: &str = r#"{"job_id":"0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b","status":"Complete","msg":"Job Finished","result":{"1":{"status":"Complete","result":1.10}}}"#;

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_resumes_a_cut_event_stream_from_its_last_event() {
    let stub = Stub::default();
    let server = stub.start(true).await;
    let out = doparallel(
        &["submit", "-", "--wait", "--server", &server],
        Some("{}"),
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, format!("{STUB_DOCUMENT}\n"));
    assert_eq!(
        *stub.event_connections.lock().unwrap(),
        [None, Some("1".to_string())],
        "reconnected after the last event it saw"
    );
    assert!(
        out.stderr
            .contains("job 0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b: 1/1 done, 0 failed, "),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_polls_a_server_without_events() {
    let stub = Stub::default();
    let server = stub.start(false).await;
    let out = doparallel(
        &["submit", "-", "--wait", "--server", &server],
        Some("{}"),
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, format!("{STUB_DOCUMENT}\n"));
    assert!(
        stub.job_reads.load(Ordering::SeqCst) >= 3,
        "polled until finished"
    );
    assert!(
        out.stderr
            .contains("job 0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b: 0/1 done, 0 failed, "),
        "{out:?}"
    );
    assert!(out.stderr.contains("; Complete after "), "{out:?}");
}
