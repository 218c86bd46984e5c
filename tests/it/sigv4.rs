//! AWS-signed calls, checked by an endpoint that recomputes each signature with botocore's
//! signer (`tests/sigv4/verify_server.py`), an implementation independent of the one under
//! test. botocore comes with moto, which `.ci/run` installs; outside CI a machine without
//! it skips these tests with a notice.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::helpers::*;

const ACCESS_KEY: &str = "AKIDEXAMPLE";
const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const SESSION_TOKEN: &str = "session-token-example";

/// A running verifier, killed (by its pid) when dropped.
pub struct Verifier {
    child: Child,
    port: u16,
}

impl Verifier {
    /// A verifier that knows `secret` as the access key's secret; `None` when botocore is
    /// missing outside CI.
    fn start(secret: &str) -> Option<Verifier> {
        Self::start_as(ACCESS_KEY, secret, Some(SESSION_TOKEN))
    }

    /// A verifier of the credentials `access_key`, `secret` and `token`.
    pub fn start_as(access_key: &str, secret: &str, token: Option<&str>) -> Option<Verifier> {
        let installed = Command::new("python3")
            .args(["-c", "import botocore.auth"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            let why = "botocore is not installed (it comes with moto: python3 -m pip install 'moto[server]==5.2.1')";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}; CI needs it for the SigV4 tests");
            }
            eprintln!("\n!!!!!!!!\n!!! SKIPPING the SigV4 tests: {why}\n!!!!!!!!\n");
            return None;
        }
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/sigv4/verify_server.py"
            ))
            .args([access_key, secret])
            .args(token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the verifier prints its port");
        Some(Verifier { child, port })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server with the test's AWS credentials (temporary ones: with a session token) and no
/// other source of them, that signs calls to the loopback verifier.
fn server(dir: &tempfile::TempDir) -> ServerProcess {
    ServerProcess::on(&db_path(dir))
        .args(&["--aws-sigv4-host", "127.0.0.1"])
        .envs(&[
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_SESSION_TOKEN", SESSION_TOKEN),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ("DOPARALLEL_SECRET_KEY", TEST_SECRET_KEY),
        ])
        .start()
}

#[tokio::test]
async fn signed_calls_pass_an_independent_check() {
    let Some(verifier) = Verifier::start(SECRET_KEY) else {
        return;
    };
    // The same key id with another secret: a signature this endpoint must refuse.
    let Some(impostor) = Verifier::start("another-secret") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir);
    let id = server
        .api
        .submit(&json!({
            "options": {
                "aws_sigv4": {"service": "lambda", "region": "us-east-1"},
                "headers": {"X-Custom": "plain value"},
                "max_attempts": 2, "backoff_ms": 1
            },
            "tasks": [
                {"endpoint": verifier.url("/post"), "params": {"a": 1, "b": "x y", "n": 1.50}},
                {"endpoint": verifier.url("/get?fixed=1"), "method": "GET",
                 "params": {"q": "a b&c/d", "n": 1.50, "t": true}},
                {"endpoint": verifier.url("/unavailable/retried"), "params": [1]},
                {"endpoint": verifier.url("/gateway/stage/path"), "method": "PUT", "params": {},
                 "aws_sigv4": {"service": "execute-api", "region": "eu-west-1"}},
                {"endpoint": verifier.url("/secret"), "method": "DELETE",
                 "secret_headers": {"X-Api-Key": "never-signed"}},
                {"endpoint": impostor.url("/refused"), "options": {"max_attempts": 1}}
            ]
        }))
        .await;
    let job = server.api.wait_settled(&id).await;
    let tasks = server.api.tasks(&id).await;
    let show = || serde_json::to_string_pretty(&tasks).unwrap();
    for (i, task) in tasks.iter().take(5).enumerate() {
        assert_eq!(task["status"], "Complete", "task {}: {}", i + 1, show());
        assert_eq!(task["result"]["verified"], true, "{}", show());
        assert_eq!(task["result"]["token"], true, "the session token is sent");
    }
    let result = |i: usize| -> &Value { &tasks[i]["result"] };
    assert_eq!(result(0)["service"], "lambda");
    assert_eq!(result(0)["region"], "us-east-1");
    let signed: Vec<&str> = result(0)["signed_headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    for header in [
        "host",
        "x-amz-date",
        "x-amz-content-sha256",
        "x-custom",
        "content-type",
        "doparallel-attempt",
    ] {
        assert!(signed.contains(&header), "{header} is signed: {signed:?}");
    }
    // A retried attempt is signed again (its DoParallel-Attempt and date are new).
    assert_eq!(tasks[2]["attempts"], 2, "{}", show());
    assert_eq!(result(3)["service"], "execute-api");
    assert_eq!(result(3)["region"], "eu-west-1");
    // A secret header is sent unsigned, so the signing library never sees its value.
    assert!(
        !result(4)["signed_headers"]
            .as_array()
            .unwrap()
            .contains(&json!("x-api-key"))
    );
    // The impostor's secret differs: it refuses the signature, and the task fails.
    assert_eq!(tasks[5]["status"], "Failed", "{}", show());
    assert_eq!(tasks[5]["error"]["http_status"], 403);
    assert!(
        tasks[5]["error"]["body"]
            .as_str()
            .unwrap()
            .contains("signature mismatch"),
        "{}",
        show()
    );
    assert_eq!(job["status"], "Failed");
}

#[tokio::test]
async fn an_unsigned_call_is_refused_by_the_check() {
    // The verifier refuses what is not signed, so the test above cannot pass by accident.
    let Some(verifier) = Verifier::start(SECRET_KEY) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir);
    let id = server
        .api
        .submit(&json!({
            "options": {"max_attempts": 1},
            "tasks": [{"endpoint": verifier.url("/plain")}]
        }))
        .await;
    server.api.wait_settled(&id).await;
    let tasks = server.api.tasks(&id).await;
    assert_eq!(tasks[0]["error"]["http_status"], 403);
    assert!(
        tasks[0]["error"]["body"]
            .as_str()
            .unwrap()
            .contains("no SigV4 Authorization header")
    );
}

#[tokio::test]
async fn only_aws_hosts_and_named_ones_are_signed() {
    // Without --aws-sigv4-host, a server signs calls to Lambda function URLs and API
    // Gateway endpoints only: no client can make it sign a request to another AWS API, or to
    // any other host, as itself.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::on(&db_path(&dir)).start();
    for (endpoint, service, expected) in [
        (
            "http://127.0.0.1:9/x",
            "lambda",
            "task 1: aws_sigv4: calls to 127.0.0.1 are not signed",
        ),
        (
            "https://sts.amazonaws.com/?Action=GetCallerIdentity",
            "sts",
            "calls to sts.amazonaws.com are not signed",
        ),
        (
            "https://abc.lambda-url.eu-west-1.on.aws/",
            "lambda",
            "calls to abc.lambda-url.eu-west-1.on.aws are not signed",
        ),
    ] {
        let job = json!({
            "tasks": [{"endpoint": endpoint, "aws_sigv4": {"service": service, "region": "us-east-1"}}]
        });
        let (status, body) = server
            .api
            .post_raw("/v1/job", Some("application/json"), &job.to_string())
            .await;
        assert_eq!(status, 422, "{body}");
        assert!(body["msg"].as_str().unwrap().contains(expected), "{body}");
    }
}
