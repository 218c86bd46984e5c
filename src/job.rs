//! The job and task domain: identifiers, states, options, and the parsing and validation
//! of a submitted job body.
//!
//! Everything a client sends passes through [`parse_submission`] before anything is stored,
//! so a rejected request never leaves a trace. Parameters and results are kept as raw JSON
//! text ([`RawValue`]) from the wire to the database and back: numbers, large integers and
//! key order round-trip exactly, which the original service got wrong.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use url::Url;
use uuid::Uuid;

/// The relative endpoint of the built-in test task, run in-process without a network hop.
pub const TEST_ENDPOINT: &str = "/v1/test";

/// A job's public identifier: a UUIDv7, so ids sort by creation time.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    pub fn generate() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// A job's lifecycle; see ARCHITECTURE.md for the state machine.
///
/// `Pending` until the first task is claimed, `Running` until every task is finished, then
/// `Complete` when at most `tolerated_failures` tasks failed and `Failed` otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum JobStatus {
    Pending,
    Running,
    Complete,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Complete | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "Pending",
            JobStatus::Running => "Running",
            JobStatus::Complete => "Complete",
            JobStatus::Failed => "Failed",
            JobStatus::Cancelled => "Cancelled",
        }
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "Pending" => JobStatus::Pending,
            "Running" => JobStatus::Running,
            "Complete" => JobStatus::Complete,
            "Failed" => JobStatus::Failed,
            "Cancelled" => JobStatus::Cancelled,
            other => {
                return Err(format!(
                    "unknown job status {other:?}; expected Pending, Running, Complete, Failed or Cancelled"
                ));
            }
        })
    }
}

/// A task's lifecycle: `Pending` (waiting, possibly for a retry's backoff) → `Running` (a call
/// is in flight) → back to `Pending` for a retry, or to `Complete` / `Failed` for good;
/// `Cancelled` when its job is cancelled before it finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum TaskStatus {
    Pending,
    Running,
    Complete,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "Pending",
            TaskStatus::Running => "Running",
            TaskStatus::Complete => "Complete",
            TaskStatus::Failed => "Failed",
            TaskStatus::Cancelled => "Cancelled",
        }
    }
}

impl FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "Pending" => TaskStatus::Pending,
            "Running" => TaskStatus::Running,
            "Complete" => TaskStatus::Complete,
            "Failed" => TaskStatus::Failed,
            "Cancelled" => TaskStatus::Cancelled,
            other => {
                return Err(format!(
                    "unknown task status {other:?}; expected Pending, Running, Complete, Failed or Cancelled"
                ));
            }
        })
    }
}

/// Where a job's callback delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CallbackState {
    /// The job has no callback URL.
    None,
    /// To be sent: the job is unfinished, or a delivery is due or being retried.
    Pending,
    Delivered,
    /// Every attempt of the retry schedule failed, or the receiver answered 410 Gone.
    Failed,
}

/// Per-job options, all optional in the request; defaults are the documented ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobOptions {
    /// Most calls of this job in flight at once; `None` is limited only by the server.
    #[serde(default)]
    pub concurrency: Option<u32>,
    #[serde(default = "JobOptions::default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "JobOptions::default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "JobOptions::default_backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default)]
    pub tolerated_failures: u64,
}

/// Upper bound of the retry backoff, whatever the attempt.
pub const BACKOFF_CAP_MS: u64 = 60_000;
const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
const MAX_ATTEMPTS: u32 = 100;

impl JobOptions {
    fn default_timeout_ms() -> u64 {
        30_000
    }
    fn default_max_attempts() -> u32 {
        3
    }
    fn default_backoff_ms() -> u64 {
        500
    }

    /// The options of a request that sent none.
    pub fn defaults() -> Self {
        JobOptions {
            concurrency: None,
            timeout_ms: Self::default_timeout_ms(),
            max_attempts: Self::default_max_attempts(),
            backoff_ms: Self::default_backoff_ms(),
            tolerated_failures: 0,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.concurrency == Some(0) {
            return Err("options.concurrency: must be at least 1".into());
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "options.timeout_ms: must be between 1 and {MAX_TIMEOUT_MS} (24 hours)"
            ));
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return Err(format!(
                "options.max_attempts: must be between 1 and {MAX_ATTEMPTS}"
            ));
        }
        if self.backoff_ms > BACKOFF_CAP_MS {
            return Err(format!(
                "options.backoff_ms: must be at most {BACKOFF_CAP_MS} (the backoff cap)"
            ));
        }
        Ok(())
    }
}

/// A validated job, ready to be stored.
#[derive(Debug)]
pub struct NewJob {
    pub id: JobId,
    pub callback: Option<Url>,
    pub options: JobOptions,
    pub tasks: Vec<NewTask>,
}

/// A validated task: its endpoint (an absolute http(s) URL or [`TEST_ENDPOINT`]) and its
/// parameters as the exact JSON text the client sent (`null` when absent).
#[derive(Debug)]
pub struct NewTask {
    pub endpoint: String,
    pub params: Box<RawValue>,
}

/// Why a submitted body was refused. Each message names the field and, for a task, its
/// 1-based position (the same numbering as the result keys).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmissionError {
    /// The body is not JSON at all (HTTP 400).
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// Well-formed JSON that is not a valid job (HTTP 422).
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireJob<'a> {
    #[serde(default)]
    callback: Option<String>,
    #[serde(borrow)]
    tasks: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTask<'a> {
    endpoint: String,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
}

/// serde_json appends " at line L column C" to its messages; inside a task that position is
/// relative to the task, not the body, so it would mislead. The task number says where.
fn serde_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

/// Parses and validates a submitted job body (the seed's shape plus optional `options`).
pub fn parse_submission(body: &[u8]) -> Result<NewJob, SubmissionError> {
    // Syntax first, so that a body which is not JSON is told apart from a wrong shape.
    serde_json::from_slice::<&RawValue>(body)
        .map_err(|e| SubmissionError::Malformed(e.to_string()))?;
    let wire: WireJob<'_> = serde_json::from_slice(body)
        .map_err(|e| SubmissionError::Invalid(format!("job: {}", serde_message(&e))))?;

    let callback = match wire.callback {
        None => None,
        Some(text) => Some(parse_http_url(&text).ok_or_else(|| {
            invalid(format!("callback: {text:?} is not an absolute http(s) URL"))
        })?),
    };

    let options = match wire.options {
        None => JobOptions::defaults(),
        Some(raw) if raw.get() == "null" => JobOptions::defaults(),
        Some(raw) => serde_json::from_str::<JobOptions>(raw.get())
            .map_err(|e| invalid(format!("options: {}", serde_message(&e))))?,
    };
    options.validate().map_err(invalid)?;

    let mut tasks = Vec::with_capacity(wire.tasks.len());
    for (i, raw) in wire.tasks.iter().enumerate() {
        let n = i + 1;
        let task: WireTask<'_> = serde_json::from_str(raw.get())
            .map_err(|e| invalid(format!("task {n}: {}", serde_message(&e))))?;
        if task.endpoint != TEST_ENDPOINT && parse_http_url(&task.endpoint).is_none() {
            return Err(invalid(format!(
                "task {n}: endpoint {:?} is not an absolute http(s) URL (or {TEST_ENDPOINT})",
                task.endpoint
            )));
        }
        let params = match task.params {
            Some(raw) => compact_json(raw),
            None => RawValue::from_string("null".into()).expect("null is JSON"),
        };
        tasks.push(NewTask {
            endpoint: task.endpoint,
            params,
        });
    }

    Ok(NewJob {
        id: JobId::generate(),
        callback,
        options,
        tasks,
    })
}

/// The same JSON without the whitespace between tokens. Unlike a round trip through
/// `serde_json::Value`, it keeps every number's digits and every key's order.
pub fn compact_json(raw: &RawValue) -> Box<RawValue> {
    let text = raw.get();
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    RawValue::from_string(out).expect("removing whitespace between tokens keeps JSON valid")
}

fn invalid(msg: String) -> SubmissionError {
    SubmissionError::Invalid(msg)
}

/// An absolute URL with an http or https scheme and a host, or `None`.
fn parse_http_url(text: &str) -> Option<Url> {
    let url = Url::parse(text).ok()?;
    let web = matches!(url.scheme(), "http" | "https");
    (web && url.host_str().is_some_and(|h| !h.is_empty())).then_some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `body` and compares the outcome: `Ok(n)` is a valid job of `n` tasks,
    /// `Err(text)` a rejection whose message contains `text`.
    fn check(body: &str, expected: Result<usize, &str>) {
        match (parse_submission(body.as_bytes()), expected) {
            (Ok(job), Ok(n)) => assert_eq!(job.tasks.len(), n, "body {body}"),
            (Err(e), Err(text)) => assert!(
                e.to_string().contains(text),
                "body {body}: error {e:?} does not contain {text:?}"
            ),
            (got, want) => panic!("body {body}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn accepts_the_seed_example() {
        check(
            r#"{"callback":"http://myapi.com/r","tasks":[
                {"endpoint":"http://f.example/e","params":{"variable_a":"22"}},
                {"endpoint":"/v1/test","params":{"variable_a":"12"}}]}"#,
            Ok(2),
        );
    }

    #[test]
    fn callback_and_params_are_optional_and_tasks_may_be_empty() {
        check(r#"{"tasks":[{"endpoint":"/v1/test"}]}"#, Ok(1));
        check(r#"{"tasks":[]}"#, Ok(0));
        check(r#"{"callback":null,"tasks":[],"options":null}"#, Ok(0));
    }

    #[test]
    fn rejections_name_the_field_and_task() {
        check("{", Err("malformed JSON"));
        check("", Err("malformed JSON"));
        check(
            r#"{"calback":"http://x/","tasks":[]}"#,
            Err("unknown field `calback`"),
        );
        check(r#"{"callback":"http://x/"}"#, Err("missing field `tasks`"));
        check(r#"{"tasks":{}}"#, Err("job: invalid type"));
        check(
            r#"{"tasks":[{"endpoint":"/v1/test"},{"endpoint":"ftp://x/"}]}"#,
            Err("task 2: endpoint \"ftp://x/\" is not an absolute http(s) URL"),
        );
        check(
            r#"{"tasks":[{"endpoint":"/v1/test","parms":1}]}"#,
            Err("task 1: unknown field `parms`"),
        );
        check(
            r#"{"tasks":[{"params":1}]}"#,
            Err("task 1: missing field `endpoint`"),
        );
        check(r#"{"tasks":[7]}"#, Err("task 1: invalid type"));
        check(
            r#"{"callback":"not a url","tasks":[]}"#,
            Err("callback: \"not a url\" is not an absolute http(s) URL"),
        );
        check(
            r#"{"tasks":[],"options":{"max_attempt":2}}"#,
            Err("options: unknown field `max_attempt`"),
        );
        check(
            r#"{"tasks":[],"options":{"max_attempts":0}}"#,
            Err("options.max_attempts"),
        );
        check(
            r#"{"tasks":[],"options":{"concurrency":0}}"#,
            Err("options.concurrency"),
        );
        check(
            r#"{"tasks":[],"options":{"timeout_ms":-1}}"#,
            Err("options: invalid value"),
        );
    }

    #[test]
    fn compacting_keeps_strings_and_numbers() {
        let raw: Box<RawValue> =
            serde_json::from_str(r#" { "a b" : [ 1.50 , "x \" y\\" ] , "c":{ } } "#).unwrap();
        assert_eq!(
            compact_json(&raw).get(),
            r#"{"a b":[1.50,"x \" y\\"],"c":{}}"#
        );
    }

    #[test]
    fn params_keep_their_exact_text() {
        let body = r#"{"tasks":[{"endpoint":"/v1/test","params":{"n": 12345678901234567890123, "f":1.10}}]}"#;
        let job = parse_submission(body.as_bytes()).unwrap();
        assert_eq!(
            job.tasks[0].params.get(),
            r#"{"n":12345678901234567890123,"f":1.10}"#
        );
        let none = parse_submission(br#"{"tasks":[{"endpoint":"/v1/test"}]}"#).unwrap();
        assert_eq!(none.tasks[0].params.get(), "null");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_submission(&bytes);
        }
    }
}
