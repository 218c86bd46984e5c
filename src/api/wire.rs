//! The API's wire types: the JSON documents the routes answer with, as the OpenAPI document
//! describes them. The server serializes them and the command-line client
//! (`crate::client`) reads them, so the two cannot drift apart. Reading is lenient where a
//! field is newer than the route (`#[serde(default)]`), so that this client works with an
//! older server; unknown fields are ignored for a newer one.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::job::{
    AwsSigV4, CallbackState, Headers, JobId, JobOptions, JobStatus, Method, TaskCall, TaskOptions,
    TaskStatus,
};

/// Every error's body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Always `Error`.
    pub status: String,
    /// What was wrong, and where (field, task position).
    pub msg: String,
}

/// The body of `POST /v1/job`, as documented; `job::parse_submission` is what reads it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a schema only
pub struct JobRequest {
    /// Where the final document is POSTed (an absolute http(s) URL); optional.
    pub callback: Option<String>,
    pub tasks: Vec<TaskRequest>,
    pub options: Option<JobOptions>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a schema only
pub struct TaskRequest {
    /// An absolute http(s) URL, or `/v1/test` for the built-in test task.
    pub endpoint: String,
    /// Sent as the body of each call (`POST`, `PUT`, `PATCH`), or as the query string
    /// (`GET`, `DELETE`: then an object of strings, numbers and booleans); `null` when
    /// absent.
    #[schema(value_type = serde_json::Value)]
    pub params: Option<serde_json::Value>,
    /// This task's method, over the job's `options.method`.
    pub method: Option<Method>,
    /// This task's headers; each replaces the job's header of the same name.
    pub headers: Option<Headers>,
    /// This task's secret headers (sealed at rest, shown as `***`).
    pub secret_headers: Option<Headers>,
    /// Sign this task's calls with AWS Signature Version 4.
    pub aws_sigv4: Option<AwsSigV4>,
    /// This task's own `timeout_ms`, `max_attempts`, `backoff_ms` and `retry_on`.
    pub options: Option<TaskOptions>,
}

/// The body of `PATCH /v1/jobs/{id}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobPatch {
    /// The limits to change: `concurrency`, `per_host_concurrency`, `per_host_rate`, each
    /// a number, or `null` for no limit of the job's own.
    #[schema(value_type = Object)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// The body of `POST /v1/jobs/{id}/retry`, all optional.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// The statuses of the tasks to run again: `Failed` (the default), `Cancelled`.
    #[serde(default)]
    pub include: Option<Vec<TaskStatus>>,
}

/// The answer to a retry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetryAnswer {
    /// Always `Success`.
    pub status: String,
    /// `Job Retried`.
    pub msg: String,
    pub job_id: JobId,
    /// The job's run now under way: 2 after its first retry.
    pub run: u32,
    /// Tasks that run again.
    pub requeued: u64,
    pub status_url: String,
}

/// The answer to a submission.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubmitAnswer {
    /// Always `Success`.
    pub status: String,
    /// Always `Job Executed` (the seed's wording).
    pub msg: String,
    pub job_id: JobId,
    pub status_url: String,
}

impl SubmitAnswer {
    pub fn new(job_id: JobId) -> Self {
        SubmitAnswer {
            status: "Success".into(),
            msg: "Job Executed".into(),
            job_id,
            status_url: format!("/v1/jobs/{job_id}"),
        }
    }
}

/// A job's tasks by state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Counts {
    pub pending: u64,
    /// Calls truly in flight.
    pub running: u64,
    /// Claimed tasks whose call has not started: waiting at a host's limits (or a 429's
    /// pause), or about to start. Counted by the node that answers, for its own calls.
    #[serde(default)] // older servers counted them as running
    pub queued: u64,
    pub complete: u64,
    pub failed: u64,
    #[serde(default)] // servers without the cancel route
    pub cancelled: u64,
}

/// Where a job's callback stands.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CallbackView {
    pub url: Option<String>,
    pub state: CallbackState,
    /// Delivery attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// One entry of a finished job's result map.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only
pub struct ResultEntry {
    pub status: TaskStatus,
    /// What the endpoint answered (Complete tasks).
    #[schema(value_type = serde_json::Value)]
    pub result: Option<serde_json::Value>,
    /// Why it failed (Failed tasks).
    #[schema(value_type = serde_json::Value)]
    pub error: Option<serde_json::Value>,
    /// Attempts made (Failed tasks).
    pub attempts: Option<u32>,
}

/// A job: `GET /v1/jobs/{id}`, and in lists (without `result`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub job_id: JobId,
    pub status: JobStatus,
    pub total: u64,
    pub counts: Counts,
    /// RFC 3339.
    pub created_at: String,
    pub finished_at: Option<String>,
    pub callback: CallbackView,
    /// Always there from this server; read as `None` from an older one, or from a newer
    /// one with options this build does not know.
    #[serde(default, deserialize_with = "options_if_known")]
    #[schema(value_type = JobOptions)]
    pub options: Option<JobOptions>,
    /// The W3C trace the job belongs to (32 hex digits): the submitting request's
    /// `traceparent`'s, or a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Which run of the job this is: 1, then 2 after its first retry, and so on.
    #[serde(default = "first_run")]
    pub run: u32,
    /// When the job's time budget (`options.deadline_ms`) runs out (RFC 3339), for a job
    /// with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<String>,
    /// The `metadata` the job was submitted with, as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Box<RawValue>>,
    /// Once finished: the callback's result map, keyed by 1-based task position.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, ResultEntry>>)]
    pub result: Option<Box<RawValue>>,
    /// Instead of `result` when the map would be larger than `--max-callback-bytes`: the
    /// paginated tasks route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
}

/// One task of a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// 1-based position in the job.
    pub index: u64,
    pub status: TaskStatus,
    pub attempts: u32,
    #[serde(default)]
    pub endpoint: String,
    /// The task's own call settings, as submitted (secret values shown as `***`); absent
    /// when it has none.
    #[serde(flatten)]
    pub call: TaskCall,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = serde_json::Value)]
    pub result: Option<Box<RawValue>>,
    /// A [`crate::job::TaskError`] when DoParallel decided the failure; any JSON when the
    /// endpoint reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = serde_json::Value)]
    pub error: Option<Box<RawValue>>,
    /// Duration of the last attempt.
    pub latency_ms: Option<u64>,
    pub finished_at: Option<String>,
    /// The last progress an attempt that answered 202 reported with a heartbeat
    /// (`POST /v1/tasks/{token}/heartbeat`), as it sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub progress: Option<Box<RawValue>>,
}

/// A page of a job's tasks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    pub job_id: JobId,
    pub tasks: Vec<TaskView>,
    /// The `after` of the next page; null on the last.
    pub next_after: Option<u64>,
}

/// A page of jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    /// Newest first, without results.
    pub jobs: Vec<JobView>,
    pub next_after: Option<JobId>,
}

/// The data of a `progress` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub job_id: JobId,
    pub status: JobStatus,
    pub total: u64,
    pub counts: Counts,
}

/// The data of a `task_failed` event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskFailed {
    pub index: u64,
    pub attempts: u32,
    #[schema(value_type = serde_json::Value)]
    pub error: Option<Box<RawValue>>,
}

/// One event of the stream as the wire carries it; `data` is the event's JSON document.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only
pub struct SseFrame {
    /// `progress`, `task_failed` or `finished`.
    pub event: String,
    /// Failures sent so far: the `Last-Event-ID` to resume from.
    pub id: String,
    /// A `Progress`, `TaskFailed` or `JobView` document.
    pub data: String,
}

/// The answer to a task report.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReportAnswer {
    /// `Stored`.
    pub status: String,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // a schema only
pub struct TestAnswer {
    /// Always `"true"`, as the seed answered.
    pub result: String,
    /// The request body.
    #[schema(value_type = serde_json::Value)]
    pub params: serde_json::Value,
}

/// The answer of `/healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

fn first_run() -> u32 {
    1
}

/// A job's options, or `None` when they are not a shape this build knows.
fn options_if_known<'de, D>(deserializer: D) -> Result<Option<JobOptions>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

/// One host this node calls (`GET /v1/hosts`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    /// `host` or `host:port`, as endpoints name it.
    pub host: String,
    /// The limit on calls in flight to it on this node: the adaptive limit's value now
    /// (`adaptive`), or the fixed `--per-host-concurrency`; absent when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    pub adaptive: bool,
    /// Calls under way.
    pub in_flight: u64,
    /// Calls waiting at its gates (limits, a pause, an open breaker).
    pub waiting: u64,
    /// `closed`, or `open`: connection failures in a row made its calls wait for a
    /// cool-down and a probe.
    pub breaker: String,
    /// Connection failures in a row so far.
    pub failures: u32,
}

/// The hosts this node calls now (those with calls, limits or state worth keeping).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostPage {
    pub hosts: Vec<HostView>,
}

/// A group of jobs (`options.group`) with its limits and its calls now
/// (`GET /v1/groups/{name}`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    pub name: String,
    /// The most calls of its jobs in flight at once, across every node: its own, or the
    /// server's `--group-concurrency`; absent when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// The most calls of its jobs started per second, across every node; absent when
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// The limits set for it with `PUT /v1/groups/{name}`, or `null` when it has the
    /// server's default only.
    pub own: Option<crate::job::GroupLimits>,
    /// Its jobs' tasks running now, on every node (a task awaiting its report counts).
    pub in_flight: u64,
    /// Its unfinished jobs.
    pub jobs: u64,
}

/// The groups of the caller's jobs that have limits of their own or unfinished jobs
/// (`GET /v1/groups`), by name.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupPage {
    /// The server's `--group-concurrency`, which a group without its own has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_concurrency: Option<u32>,
    pub groups: Vec<GroupView>,
}
