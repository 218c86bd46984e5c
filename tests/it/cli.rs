//! `doparallel run`: one job, no server.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::helpers::{Receiver, ServerProcess, binary};

fn run(args: &[&str], stdin: Option<&str>) -> (i32, Value, String) {
    let mut child = Command::new(binary())
        .arg("run")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (
        out.status.code().unwrap(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn the_seed_example_runs_to_completion() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed-job.json");
    let (code, doc, stderr) = run(&[example], None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(doc["status"], "Complete");
    assert_eq!(doc["msg"], "Job Finished");
    assert_eq!(
        doc["result"]["1"],
        json!({"status":"Complete","result":{"result":"true","params":{"variable_a":"22","variable_b":"44"}}})
    );
    assert_eq!(doc["result"]["2"]["result"]["params"]["variable_b"], "14");
}

#[test]
fn a_failed_job_exits_1_and_bad_input_exits_2() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job = json!({"tasks": [{"endpoint": format!("http://127.0.0.1:{port}/")}], "options": {"max_attempts": 1}});
    let (code, doc, _) = run(&["-"], Some(&job.to_string()));
    assert_eq!(code, 1);
    assert_eq!(doc["status"], "Failed");
    // The most specific cause is recorded apart from the whole chain.
    let error = &doc["result"]["1"]["error"];
    assert_eq!(error["kind"], "connect", "{error}");
    assert!(
        error["cause"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{error}"
    );

    let (code, doc, stderr) = run(&["-"], Some(r#"{"tasks":[{"endpoint":"x"}]}"#));
    assert_eq!(code, 2);
    assert_eq!(doc, Value::Null, "nothing on stdout");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("task 1: endpoint \"x\" is not an absolute http(s) URL"),
        "{stderr}"
    );

    let (code, _, stderr) = run(&["/nonexistent/job.json"], None);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read job file /nonexistent/job.json"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_posts_the_document_to_the_callback() {
    let mut receiver = Receiver::start(1, 503).await;
    let job = json!({"callback": receiver.url(), "tasks": [{"endpoint": "/v1/test", "params": 7}]});
    let (code, doc, stderr) = tokio::task::spawn_blocking(move || {
        run(
            &["-", "--callback-retry-schedule", "10ms"],
            Some(&job.to_string()),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(receiver.next().await.answered, 503);
    let delivered = receiver.next().await;
    assert_eq!(delivered.answered, 200);
    assert_eq!(
        delivered.body, doc,
        "stdout and the callback carry the same document"
    );
}

/// `--allow-net` means nothing without the guard, so it brings the guard with it: a range
/// allowed, every other special-purpose range still denied.
#[test]
fn run_with_allow_net_guards_the_rest() {
    let job =
        json!({"tasks": [{"endpoint": "http://127.0.0.1:9/x"}], "options": {"max_attempts": 1}});
    let (code, doc, stderr) = run(&["--allow-net", "10.0.0.0/8", "-"], Some(&job.to_string()));
    assert_eq!(code, 2, "{doc} {stderr}");
    assert!(
        stderr.contains("127.0.0.1 is a denied address (loopback)"),
        "{stderr}"
    );
}

/// With `--log-format json` every line on stderr is a JSON object: the progress, the
/// warning of a callback that could not be delivered, the log itself.
#[test]
fn run_with_json_logs_writes_only_json_lines() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job = json!({
        "callback": format!("http://127.0.0.1:{port}/gone"),
        "tasks": [{"endpoint": "/v1/test", "params": {"x": 1}}],
    });
    let (code, doc, stderr) = run(
        &["--log-format", "json", "--callback-retry-schedule", "", "-"],
        Some(&job.to_string()),
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(doc["status"], "Complete");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "{stderr}");
    for line in &lines {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not JSON: {line}");
    }
    assert!(
        stderr.contains("the callback could not be delivered"),
        "{stderr}"
    );
    assert!(stderr.contains("\"message\":\"progress\""), "{stderr}");
}

/// A port in use is refused before anything is created: no database, no lock file.
#[test]
fn serve_on_a_port_in_use_leaves_nothing_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("other.db");
    let stderr = ServerProcess::on(&db).listen(&addr).refused();
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
