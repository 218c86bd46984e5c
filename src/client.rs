//! The command-line client of a running server: a typed HTTP client of the API, its errors
//! in words a user can act on, the tables it prints for humans, and the commands `submit`,
//! `status`, `tasks`, `jobs` and `cancel` that `main` dispatches to.
//!
//! Output follows kubectl's habits: aligned columns for people, `--json` for scripts (the
//! server's answer as is, one document), stdout for answers and stderr for everything else
//! (progress, hints, errors). Each error is one line that says what failed and what to do.
//!
//! Exit codes tell the job's outcome apart from the client's own trouble:
//! [`EXIT_COMPLETE`] (also an unfinished job, for `status`), [`EXIT_FAILED`],
//! [`EXIT_CANCELLED`], and [`EXIT_ERROR`] for a usage error, an unreachable server or a
//! refused request.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use url::Url;

use crate::config::{CancelArgs, ClientArgs, JobsArgs, Secret, StatusArgs, SubmitArgs, TasksArgs};
use crate::job::{CallbackState, JobStatus};
use crate::progress::{POLL_EVERY, Progress, Snapshot};

pub const EXIT_COMPLETE: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_ERROR: u8 = 2;
pub const EXIT_CANCELLED: u8 = 3;
/// Ctrl-C while waiting: the shell's convention for SIGINT (128 + 2).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Longest a request may take. Reading a job is one indexed query; a job of a million tasks
/// is a few hundred MB to post, so submit gets more.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `submit --wait` keeps trying while the server is unreachable (a restart keeps
/// every job, so it is worth waiting through one).
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Longest an event stream may stay silent. The server sends a keep-alive comment every
/// 15 s, so this much silence means the connection is gone without a word (a dropped NAT
/// entry, a suspended laptop).
const EVENTS_IDLE: Duration = Duration::from_secs(45);

/// Widest a result or error is shown in the tasks table.
const CELL_WIDTH: usize = 100;

/// What the client can meet, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the server at {server}: {reason} (is doparallel serve running? set --server or DOPARALLEL_SERVER)"
    )]
    Unreachable { server: String, reason: String },
    #[error(
        "the server at {server} did not answer within {secs} s (it may be overloaded; try again, or check its log)"
    )]
    Timeout { server: String, secs: u64 },
    #[error(
        "cannot {action}: {msg} (HTTP {status}; set --token-file, DOPARALLEL_TOKEN or --token)"
    )]
    Unauthorized {
        action: String,
        status: u16,
        msg: String,
    },
    #[error(
        "cannot {action}: the server at {server} has no such route (HTTP {status}); it may be older than this client"
    )]
    MissingRoute {
        action: String,
        server: String,
        status: u16,
    },
    /// A 4xx with the server's message, which names what was wrong.
    #[error("cannot {action}: {msg} (HTTP {status})")]
    Refused {
        action: String,
        status: u16,
        msg: String,
    },
    #[error(
        "cannot {action}: the server failed: {msg} (HTTP {status}; try again, or check its log)"
    )]
    ServerFailed {
        action: String,
        status: u16,
        msg: String,
    },
    #[error(
        "cannot {action}: the answer of {server} is not DoParallel's API ({detail}); is --server the right address?"
    )]
    Protocol {
        action: String,
        server: String,
        detail: String,
    },
    #[error("cannot read the job from {name}: {reason}")]
    JobFile { name: String, reason: String },
    #[error("cannot write the output: {0}")]
    Output(String),
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

/// A decoded answer together with the text it came from, which `--json` prints as is.
#[derive(Debug)]
pub struct Answer<T> {
    pub value: T,
    pub raw: String,
}

/// `202` of `POST /v1/job`.
#[derive(Debug, Deserialize)]
pub struct Submitted {
    pub job_id: String,
}

/// `GET /v1/jobs/{id}`; in lists, without `result`. Unknown fields are ignored so that an
/// older client keeps working with a newer server.
#[derive(Debug, Deserialize)]
pub struct JobView {
    pub job_id: String,
    pub status: JobStatus,
    pub total: u64,
    pub counts: Counts,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub callback: CallbackView,
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
}

#[derive(Debug, Deserialize)]
pub struct Counts {
    pub pending: u64,
    /// Calls in flight.
    pub running: u64,
    /// Claimed tasks waiting to be called (at a host's limits); absent from older servers,
    /// which counted them as running.
    #[serde(default)]
    pub queued: u64,
    pub complete: u64,
    pub failed: u64,
    /// Absent from servers without the cancel route.
    #[serde(default)]
    pub cancelled: u64,
}

#[derive(Debug, Deserialize)]
pub struct CallbackView {
    pub url: Option<String>,
    pub state: CallbackState,
}

impl JobView {
    pub fn snapshot(&self) -> Snapshot {
        snapshot(self.status, self.total, &self.counts)
    }
}

fn snapshot(status: JobStatus, total: u64, counts: &Counts) -> Snapshot {
    Snapshot {
        status,
        total,
        done: counts.complete + counts.failed,
        failed: counts.failed,
    }
}

/// The data of the `progress` and `finished` events: what a progress display needs.
#[derive(Debug, Deserialize)]
pub struct ProgressView {
    pub status: JobStatus,
    pub total: u64,
    pub counts: Counts,
}

impl ProgressView {
    pub fn snapshot(&self) -> Snapshot {
        snapshot(self.status, self.total, &self.counts)
    }
}

/// `GET /v1/jobs`.
#[derive(Debug, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    pub next_after: Option<String>,
}

/// `GET /v1/jobs/{id}/tasks`.
#[derive(Debug, Deserialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskView>,
    pub next_after: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct TaskView {
    pub index: u64,
    /// Kept as text: it is only shown, and a newer server may know more states.
    pub status: String,
    pub attempts: u32,
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    #[serde(default)]
    pub error: Option<TaskErrorView>,
    pub latency_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct TaskErrorView {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub body: Option<String>,
    /// The most specific cause (servers that record it).
    #[serde(default)]
    pub cause: Option<String>,
}

/// A typed client of one server's API.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    /// The server as the user wrote it, for messages.
    shown: String,
    token: Option<Secret>,
}

impl Client {
    pub fn new(server: &Url, token: Option<Secret>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("doparallel-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let mut base = server.clone();
        base.set_query(None);
        base.set_fragment(None);
        Ok(Client {
            http,
            shown: server.as_str().trim_end_matches('/').to_string(),
            base,
            // An empty DOPARALLEL_TOKEN is how a shell unsets it; sending `Bearer ` would
            // only earn a 401.
            token: token.filter(|t| !t.expose().is_empty()),
        })
    }

    pub fn from_args(args: &ClientArgs) -> Result<Self, ClientError> {
        let token = match (&args.token, &args.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ClientError::Setup(format!("cannot read token file {}: {e}", path.display()))
                })?;
                Some(crate::config::Secret::new(text.trim().to_string()))
            }
            (None, None) => None,
        };
        Client::new(&args.server, token)
    }

    /// The base URL with `segments` appended, each percent-encoded (an id cannot walk the
    /// path), and the query pairs.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has a path")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends a request; returns the body of a 2xx answer, or the error the answer means.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        action: &str,
    ) -> Result<String, ClientError> {
        self.send_keyed(method, url, body, action, None).await
    }

    /// [`Client::send`] with an optional `Idempotency-Key`.
    async fn send_keyed(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        action: &str,
        idempotency_key: Option<&str>,
    ) -> Result<String, ClientError> {
        let timeout = if body.is_some() {
            SUBMIT_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let mut request = self.http.request(method, url).timeout(timeout);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.transport(e, timeout))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| self.transport(e, timeout))?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(self.refused(action, status, &text))
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        url: Url,
        action: &str,
    ) -> Result<Answer<T>, ClientError> {
        let raw = self.send(Method::GET, url, None, action).await?;
        self.decode(raw, action)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        raw: String,
        action: &str,
    ) -> Result<Answer<T>, ClientError> {
        match serde_json::from_str(&raw) {
            Ok(value) => Ok(Answer { value, raw }),
            Err(e) => Err(ClientError::Protocol {
                action: action.to_string(),
                server: self.shown.clone(),
                detail: e.to_string(),
            }),
        }
    }

    fn transport(&self, e: reqwest::Error, timeout: Duration) -> ClientError {
        if e.is_timeout() {
            ClientError::Timeout {
                server: self.shown.clone(),
                secs: timeout.as_secs(),
            }
        } else {
            ClientError::Unreachable {
                server: self.shown.clone(),
                reason: root_cause(&e),
            }
        }
    }

    fn refused(&self, action: &str, status: StatusCode, body: &str) -> ClientError {
        let msg = server_message(body).unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("no message")
                .to_string()
        });
        let action = action.to_string();
        let code = status.as_u16();
        match code {
            401 | 403 => ClientError::Unauthorized {
                action,
                status: code,
                msg,
            },
            // axum answers 405 with no body when a path exists for other methods only.
            404 if msg == "no such route" => ClientError::MissingRoute {
                action,
                server: self.shown.clone(),
                status: code,
            },
            405 => ClientError::MissingRoute {
                action,
                server: self.shown.clone(),
                status: code,
            },
            500.. => ClientError::ServerFailed {
                action,
                status: code,
                msg,
            },
            _ => ClientError::Refused {
                action,
                status: code,
                msg,
            },
        }
    }

    /// `POST /v1/job`; `name` says where the job came from, for messages.
    pub async fn submit(
        &self,
        body: Vec<u8>,
        name: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Answer<Submitted>, ClientError> {
        let action = format!("submit the job in {name}");
        let raw = self
            .send_keyed(
                Method::POST,
                self.url(&["v1", "job"], &[]),
                Some(body),
                &action,
                idempotency_key,
            )
            .await?;
        self.decode(raw, &action)
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<Answer<JobView>, ClientError> {
        self.get(
            self.url(&["v1", "jobs", id], &[]),
            &format!("read job {id}"),
        )
        .await
    }

    /// `GET /v1/jobs?status=S&limit=N&after=ID`.
    pub async fn jobs(
        &self,
        status: Option<JobStatus>,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Answer<JobList>, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(status) = status {
            query.push(("status", status.as_str().to_string()));
        }
        if let Some(after) = after {
            query.push(("after", after.to_string()));
        }
        self.get(self.url(&["v1", "jobs"], &query), "list jobs")
            .await
    }

    /// `GET /v1/jobs/{id}/tasks?after=N&limit=M[&status=Failed]`.
    pub async fn tasks(
        &self,
        id: &str,
        failed_only: bool,
        limit: u32,
        after: u64,
    ) -> Result<Answer<TaskPage>, ClientError> {
        let mut query = vec![("after", after.to_string()), ("limit", limit.to_string())];
        if failed_only {
            query.push(("status", "Failed".to_string()));
        }
        self.get(
            self.url(&["v1", "jobs", id, "tasks"], &query),
            &format!("list the tasks of job {id}"),
        )
        .await
    }

    /// `POST /v1/jobs/{id}/cancel`: the job as it is once cancelled.
    pub async fn cancel(&self, id: &str) -> Result<Answer<JobView>, ClientError> {
        let action = format!("cancel job {id}");
        let raw = self
            .send(
                Method::POST,
                self.url(&["v1", "jobs", id, "cancel"], &[]),
                None,
                &action,
            )
            .await?;
        self.decode(raw, &action)
    }

    /// `DELETE /v1/jobs/{id}`.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        let action = format!("delete job {id}");
        self.send(
            Method::DELETE,
            self.url(&["v1", "jobs", id], &[]),
            None,
            &action,
        )
        .await
        .map(drop)
    }

    /// `GET /v1/jobs/{id}/events`: the job's event stream, resuming after
    /// `last_event_id` when given.
    pub async fn events(
        &self,
        id: &str,
        last_event_id: Option<&str>,
    ) -> Result<EventStream, ClientError> {
        let action = format!("follow job {id}");
        // No overall timeout, which would cut a long stream; only the answer's head has to
        // come in time, and then each chunk within EVENTS_IDLE.
        let mut request = self
            .http
            .get(self.url(&["v1", "jobs", id, "events"], &[]))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last);
        }
        let response = match tokio::time::timeout(REQUEST_TIMEOUT, request.send()).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    server: self.shown.clone(),
                    secs: REQUEST_TIMEOUT.as_secs(),
                });
            }
            Ok(sent) => sent.map_err(|e| self.transport(e, REQUEST_TIMEOUT))?,
        };
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(self.refused(&action, status, &text));
        }
        Ok(EventStream {
            response,
            parser: SseParser::default(),
            ready: Vec::new().into_iter(),
        })
    }
}

/// One Server-Sent Event.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerEvent {
    pub event: String,
    pub data: String,
    /// The stream's last event id once this event is dispatched.
    pub id: Option<String>,
}

/// An open event stream.
pub struct EventStream {
    response: reqwest::Response,
    parser: SseParser,
    ready: std::vec::IntoIter<ServerEvent>,
}

impl EventStream {
    /// The next event; `None` when the stream ended, was cut, or stayed silent longer than
    /// [`EVENTS_IDLE`] (the caller reconnects if the job is not finished).
    pub async fn next(&mut self) -> Option<ServerEvent> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            match tokio::time::timeout(EVENTS_IDLE, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.ready = self.parser.push(&chunk).into_iter(),
                Ok(Ok(None) | Err(_)) | Err(_) => return None,
            }
        }
    }
}

/// The event-stream format (the `text/event-stream` of the HTML standard), fed in chunks
/// that may split a line anywhere. A few lines of parsing are not worth a crate.
#[derive(Default)]
struct SseParser {
    /// An incomplete line from the previous chunk.
    line: Vec<u8>,
    event: String,
    data: String,
    last_id: Option<String>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Vec<ServerEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                // A blank line dispatches what was gathered; an event without data is none.
                let event = std::mem::take(&mut self.event);
                let data = std::mem::take(&mut self.data);
                if !data.is_empty() {
                    events.push(ServerEvent {
                        event: if event.is_empty() {
                            "message".into()
                        } else {
                            event
                        },
                        data: data.strip_suffix('\n').unwrap_or(&data).to_string(),
                        id: self.last_id.clone(),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment: the server's keep-alive
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = value.to_string(),
                "data" => {
                    self.data.push_str(value);
                    self.data.push('\n');
                }
                "id" => self.last_id = Some(value.to_string()),
                _ => {} // `retry` and unknown fields
            }
        }
        events
    }
}

/// The `msg` of the server's `{"status":"Error","msg":...}`, else the first line of a short
/// text answer (a proxy's error page, say).
fn server_message(body: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        msg: String,
    }
    if let Ok(e) = serde_json::from_str::<ErrorBody>(body) {
        return Some(e.msg);
    }
    let line = body.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(truncate(&one_line(line), 200))
}

/// The innermost cause of a transport error ("connection refused"), without the layers
/// above it that only repeat the URL.
fn root_cause(e: &reqwest::Error) -> String {
    let mut deepest: &dyn std::error::Error = e;
    while let Some(source) = deepest.source() {
        deepest = source;
    }
    if let Some(io) = deepest.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        match io.kind() {
            ConnectionRefused => return "connection refused".into(),
            ConnectionReset => return "connection reset".into(),
            ConnectionAborted => return "connection aborted".into(),
            TimedOut => return "connection timed out".into(),
            _ => {}
        }
    }
    without_os_error(deepest.to_string())
}

/// "No such file or directory (os error 2)" without the number, which helps nobody.
fn without_os_error(text: String) -> String {
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The exit code of a job in `status`.
pub fn exit_code(status: JobStatus) -> u8 {
    match status {
        JobStatus::Failed => EXIT_FAILED,
        JobStatus::Cancelled => EXIT_CANCELLED,
        JobStatus::Complete | JobStatus::Pending | JobStatus::Running => EXIT_COMPLETE,
    }
}

/// The final document of a finished job, in the callback's shape
/// `{"job_id","status","msg":"Job Finished","result":{...}}`: the bytes `doparallel run`
/// prints and the callback receives, since the result map is passed through untouched.
pub fn final_document(job: &JobView) -> Option<String> {
    #[derive(Serialize)]
    struct Document<'a> {
        job_id: &'a str,
        status: &'a str,
        msg: &'a str,
        result: &'a RawValue,
    }
    let result = job.result.as_deref()?;
    let document = Document {
        job_id: &job.job_id,
        status: job.status.as_str(),
        msg: "Job Finished",
        result,
    };
    Some(serde_json::to_string(&document).expect("the document serializes"))
}

// ---- Tables ----

/// Aligned columns as kubectl prints them: a header row, three spaces between columns, no
/// trailing blanks.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub const JOB_COLUMNS: [&str; 8] = [
    "ID", "STATUS", "PROGRESS", "FAILED", "RUNNING", "QUEUED", "CALLBACK", "AGE",
];

/// One row of the jobs table; `now` makes the age testable.
pub fn job_row(job: &JobView, now: SystemTime) -> Vec<String> {
    let snapshot = job.snapshot();
    let callback = match job.callback.state {
        CallbackState::None => "-",
        CallbackState::Pending => "pending",
        CallbackState::Delivered => "delivered",
        CallbackState::Failed => "failed",
    };
    vec![
        job.job_id.clone(),
        job.status.as_str().to_string(),
        format!("{}/{}", snapshot.done, snapshot.total),
        job.counts.failed.to_string(),
        job.counts.running.to_string(),
        job.counts.queued.to_string(),
        callback.to_string(),
        age(&job.created_at, now),
    ]
}

pub const TASK_COLUMNS: [&str; 5] = ["INDEX", "STATUS", "ATTEMPTS", "LATENCY", "RESULT/ERROR"];

pub fn task_row(task: &TaskView) -> Vec<String> {
    let outcome = if let Some(error) = &task.error {
        // The kind first, then the most specific cause (the innermost error, which the
        // message's chain buries at its end), then what the endpoint said.
        let mut text = error.kind.clone().unwrap_or_default();
        if let Some(status) = error.http_status {
            text = format!("{text} {status}");
        }
        let detail = error.cause.as_deref().unwrap_or(&error.message);
        text = if text.is_empty() {
            detail.to_string()
        } else {
            format!("{text}: {detail}")
        };
        match error.body.as_deref().filter(|b| !b.is_empty()) {
            Some(body) => format!("{text}: {body}"),
            None => text,
        }
    } else if let Some(result) = &task.result {
        result.get().to_string()
    } else {
        "-".to_string()
    };
    vec![
        task.index.to_string(),
        task.status.clone(),
        task.attempts.to_string(),
        task.latency_ms.map_or("-".to_string(), latency),
        truncate(&one_line(&outcome), CELL_WIDTH),
    ]
}

fn latency(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// How long ago an RFC 3339 time was, kubectl style: `42s`, `17m`, `5h`, `3d`.
fn age(rfc3339: &str, now: SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339(rfc3339) else {
        return "?".to_string();
    };
    // A clock behind the server's would give a negative age; it is "just now".
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Control characters (a newline in an error body) would break the table's rows.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut out: String = text.chars().take(width - 1).collect();
    out.push('…');
    out
}

// ---- Commands ----

/// Writes an answer to stdout. A closed pipe (`doparallel jobs | head -1`) is the reader's
/// choice, not an error.
fn print(text: &str) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(ClientError::Output(e.to_string()))
        }
        _ => Ok(()),
    }
}

/// A line for the user that is not the answer: hints and remarks go to stderr.
fn tell(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Prints the server's JSON as is, ending with one newline.
fn print_raw(raw: &str) -> Result<(), ClientError> {
    print(&format!("{}\n", raw.trim_end()))
}

fn read_job(path: &Path) -> Result<(String, Vec<u8>), ClientError> {
    if path.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .map_err(|e| ClientError::JobFile {
                name: "standard input".into(),
                reason: without_os_error(e.to_string()),
            })?;
        return Ok(("standard input".into(), body));
    }
    let name = path.display().to_string();
    match std::fs::read(path) {
        Ok(body) => Ok((name, body)),
        Err(e) => Err(ClientError::JobFile {
            name,
            reason: without_os_error(e.to_string()),
        }),
    }
}

/// `doparallel submit JOB.json [--wait]`.
pub async fn submit(args: SubmitArgs) -> Result<u8, ClientError> {
    let (name, body) = read_job(&args.job)?;
    // The server validates the job: one set of rules, and a newer server may accept more
    // than this client knows of.
    let client = Client::from_args(&args.client)?;
    let submitted = client
        .submit(body, &name, args.idempotency_key.as_deref())
        .await?;
    let id = submitted.value.job_id;
    if !args.wait {
        return if args.client.json {
            print_raw(&submitted.raw).map(|()| EXIT_COMPLETE)
        } else {
            print(&format!("{id}\n")).map(|()| EXIT_COMPLETE)
        };
    }
    let mut progress = Progress::new(&id);
    let waited = tokio::select! {
        waited = wait(&client, &id, &mut progress) => Some(waited),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some(waited) = waited else {
        drop(progress);
        tell(&format!(
            "stopped waiting; job {id} keeps running (doparallel status {id}, doparallel cancel {id})"
        ));
        return Ok(EXIT_INTERRUPTED);
    };
    let job = waited?;
    let document = final_document(&job).ok_or_else(|| ClientError::Protocol {
        action: format!("read job {id}"),
        server: client.shown.clone(),
        detail: "a finished job without its result".into(),
    })?;
    print(&format!("{document}\n"))?;
    Ok(exit_code(job.status))
}

/// Waits until the job is finished, showing its progress, and returns it with its result.
///
/// Progress comes from the job's event stream; a server without one (older than this
/// client) is polled instead. Either way the job is read once more at the end, since the
/// `finished` event carries no results.
async fn wait(client: &Client, id: &str, progress: &mut Progress) -> Result<JobView, ClientError> {
    follow_events(client, id, progress).await?;
    poll(client, id, progress).await
}

/// Whether an error may pass once the server is back (it restarts, or its database is
/// briefly unavailable): a restart keeps every job, so it is worth waiting through.
fn is_transient(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
            | ClientError::ServerFailed { .. }
    )
}

/// Counts how long the server has been in trouble and says when to give up.
#[derive(Default)]
struct Trouble {
    since: Option<Instant>,
}

impl Trouble {
    /// `Err(e)` once the server has been in trouble for [`RECONNECT_FOR`]; until then the
    /// caller tries again.
    fn on_error(&mut self, e: ClientError, progress: &mut Progress) -> Result<(), ClientError> {
        if !is_transient(&e)
            || self.since.get_or_insert_with(Instant::now).elapsed() >= RECONNECT_FOR
        {
            return Err(e);
        }
        progress.note("the server does not answer; still trying");
        Ok(())
    }

    fn ok(&mut self) {
        self.since = None;
    }
}

/// Follows the job's events until `finished`. Returns at once, without error, when the
/// server has no event route; reconnects with `Last-Event-ID` when the stream is cut.
async fn follow_events(
    client: &Client,
    id: &str,
    progress: &mut Progress,
) -> Result<(), ClientError> {
    let mut trouble = Trouble::default();
    let mut last_id: Option<String> = None;
    loop {
        let mut stream = match client.events(id, last_id.as_deref()).await {
            Ok(stream) => stream,
            // A server older than the route (or a proxy that does not pass it): polling
            // works everywhere, and reports an unknown job properly.
            Err(
                ClientError::MissingRoute { .. }
                | ClientError::Refused {
                    status: 404 | 405, ..
                },
            ) => return Ok(()),
            Err(e) => {
                trouble.on_error(e, progress)?;
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            }
        };
        trouble.ok();
        while let Some(event) = stream.next().await {
            last_id = event.id.clone().or(last_id);
            match event.event.as_str() {
                "progress" | "finished" => {
                    let view: ProgressView =
                        serde_json::from_str(&event.data).map_err(|e| ClientError::Protocol {
                            action: format!("follow job {id}"),
                            server: client.shown.clone(),
                            detail: format!("{} event: {e}", event.event),
                        })?;
                    progress.update(view.snapshot());
                    if event.event == "finished" {
                        return Ok(());
                    }
                }
                // Failures are counted in `progress`; `doparallel tasks ID --failed` lists them.
                _ => {}
            }
        }
        // Cut before `finished`: look again shortly, from where the stream stopped.
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls the job every [`POLL_EVERY`] until it is finished, showing its progress.
async fn poll(client: &Client, id: &str, progress: &mut Progress) -> Result<JobView, ClientError> {
    let mut trouble = Trouble::default();
    loop {
        match client.job(id).await {
            Ok(answer) => {
                trouble.ok();
                progress.update(answer.value.snapshot());
                if answer.value.status.is_finished() {
                    return Ok(answer.value);
                }
            }
            Err(e) => trouble.on_error(e, progress)?,
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `doparallel status ID`.
pub async fn status(args: StatusArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let job = client.job(&args.id).await?;
    if args.client.json {
        print_raw(&job.raw)?;
    } else {
        print(&table(
            &JOB_COLUMNS,
            &[job_row(&job.value, SystemTime::now())],
        ))?;
    }
    Ok(exit_code(job.value.status))
}

/// `doparallel tasks ID [--failed]`.
pub async fn tasks(args: TasksArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let page = client
        .tasks(&args.id, args.failed, args.limit, args.after)
        .await?;
    if args.client.json {
        print_raw(&page.raw)?;
        return Ok(EXIT_COMPLETE);
    }
    if page.value.tasks.is_empty() {
        tell(if args.failed {
            "no failed tasks"
        } else {
            "no tasks"
        });
        return Ok(EXIT_COMPLETE);
    }
    let rows: Vec<_> = page.value.tasks.iter().map(task_row).collect();
    print(&table(&TASK_COLUMNS, &rows))?;
    if let Some(next) = page.value.next_after {
        let failed = if args.failed { " --failed" } else { "" };
        tell(&format!(
            "more tasks: doparallel tasks {}{failed} --limit {} --after {next}",
            args.id, args.limit
        ));
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel jobs [--status S]`.
pub async fn jobs(args: JobsArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let list = client
        .jobs(args.status, args.limit, args.after.as_deref())
        .await?;
    if args.client.json {
        print_raw(&list.raw)?;
        return Ok(EXIT_COMPLETE);
    }
    if list.value.jobs.is_empty() {
        tell("no jobs");
        return Ok(EXIT_COMPLETE);
    }
    let now = SystemTime::now();
    let rows: Vec<_> = list.value.jobs.iter().map(|j| job_row(j, now)).collect();
    print(&table(&JOB_COLUMNS, &rows))?;
    if let Some(next) = list.value.next_after {
        let status = args
            .status
            .map(|s| format!(" --status {}", s.as_str()))
            .unwrap_or_default();
        tell(&format!(
            "more jobs: doparallel jobs{status} --limit {} --after {next}",
            args.limit
        ));
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel cancel ID`.
pub async fn cancel(args: CancelArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let job = client.cancel(&args.id).await?;
    if args.client.json {
        print_raw(&job.raw)?;
    } else {
        let c = &job.value.counts;
        print(&format!(
            "job {} cancelled ({} complete, {} failed, {} cancelled)\n",
            job.value.job_id, c.complete, c.failed, c.cancelled
        ))?;
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel delete ID`: removes a finished job and its results.
pub async fn delete(args: CancelArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    client.delete(&args.id).await?;
    if !args.client.json {
        print(&format!("job {} deleted\n", args.id))?;
    }
    Ok(EXIT_COMPLETE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: &str, created_at: &str) -> JobView {
        serde_json::from_str(&format!(
            r#"{{"job_id":"J","status":"{status}","total":10,
                "counts":{{"pending":2,"running":3,"complete":4,"failed":1}},
                "created_at":"{created_at}","finished_at":null,
                "callback":{{"url":null,"state":"none","attempts":0,"last_error":null}},
                "options":{{}},"new_field":true}}"#
        ))
        .unwrap()
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let out = table(
            &["ID", "STATUS", "AGE"],
            &[
                vec!["a".into(), "Complete".into(), "5s".into()],
                vec!["bbbb".into(), "Failed".into(), "10m".into()],
            ],
        );
        assert_eq!(
            out,
            "ID     STATUS     AGE\n\
             a      Complete   5s\n\
             bbbb   Failed     10m\n"
        );
    }

    #[test]
    fn a_job_row_counts_done_tasks_and_age() {
        let now = humantime::parse_rfc3339("2026-01-02T03:04:05Z").unwrap();
        let row = job_row(&job("Running", "2026-01-02T02:59:05.123Z"), now);
        assert_eq!(row, ["J", "Running", "5/10", "1", "3", "0", "-", "4m"]);
        // Cancelled tasks never ran: they do not count as done.
        let mut cancelled = job("Cancelled", "2026-01-02T02:59:05.123Z");
        (cancelled.counts.pending, cancelled.counts.running) = (0, 0);
        cancelled.counts.cancelled = 5;
        assert_eq!(job_row(&cancelled, now)[..3], ["J", "Cancelled", "5/10"]);
        let check = |created: &str, want: &str| {
            assert_eq!(age(created, now), want, "{created}");
        };
        check("2026-01-02T03:04:04.500Z", "0s");
        check("2026-01-02T03:05:00Z", "0s");
        check("2026-01-02T03:02:06Z", "119s");
        check("2026-01-01T03:04:05Z", "24h");
        check("2025-12-01T03:04:05Z", "32d");
        check("yesterday", "?");
    }

    #[test]
    fn a_task_row_shows_the_result_or_the_error_on_one_line() {
        let task = |json: &str| -> Vec<String> { task_row(&serde_json::from_str(json).unwrap()) };
        assert_eq!(
            task(
                r#"{"index":1,"status":"Complete","attempts":1,"result":{"a": 1.10},"latency_ms":12}"#
            ),
            ["1", "Complete", "1", "12ms", r#"{"a": 1.10}"#]
        );
        let failed = task(
            r#"{"index":2,"status":"Failed","attempts":3,"latency_ms":2500,
                "error":{"kind":"http_status","http_status":500,"message":"endpoint answered 500","body":"line\nnext"}}"#,
        );
        assert_eq!(failed[3], "2.5s");
        assert_eq!(
            failed[4],
            "http_status 500: endpoint answered 500: line next"
        );
        // The most specific cause, not the chain that buries it.
        let unreachable = task(
            r#"{"index":5,"status":"Failed","attempts":3,"latency_ms":3,
                "error":{"kind":"connect","http_status":null,
                "message":"error sending request for url (http://example.invalid/): client error (Connect): dns error: failed to lookup address information: Name or service not known",
                "body":null,"cause":"dns error: failed to lookup address information: Name or service not known"}}"#,
        );
        assert_eq!(
            unreachable[4],
            "connect: dns error: failed to lookup address information: Name or service not known"
        );
        let long = task(&format!(
            r#"{{"index":3,"status":"Complete","attempts":1,"result":"{}","latency_ms":null}}"#,
            "é".repeat(150)
        ));
        assert_eq!(long[3], "-");
        assert_eq!(long[4].chars().count(), CELL_WIDTH);
        assert!(long[4].ends_with('…'));
        assert_eq!(
            task(r#"{"index":4,"status":"Pending","attempts":0,"latency_ms":null}"#)[4],
            "-"
        );
    }

    #[test]
    fn the_final_document_has_the_callback_shape() {
        let mut view = job("Failed", "2026-01-02T03:04:05Z");
        assert_eq!(final_document(&view), None, "no result before the end");
        view.result = Some(
            RawValue::from_string(r#"{"1":{"status":"Complete","result":1.10}}"#.into()).unwrap(),
        );
        assert_eq!(
            final_document(&view).unwrap(),
            r#"{"job_id":"J","status":"Failed","msg":"Job Finished","result":{"1":{"status":"Complete","result":1.10}}}"#
        );
    }

    #[test]
    fn event_streams_parse_across_chunk_boundaries() {
        let stream = b": keep-alive\n\nevent: progress\nid: 0\ndata: {\"a\":1}\n\n\
                       event:task_failed\r\nid:1\r\ndata: x\r\ndata: y\r\n\r\n\
                       data: plain\n\nevent: finished\n\n";
        let want = vec![
            ServerEvent {
                event: "progress".into(),
                data: r#"{"a":1}"#.into(),
                id: Some("0".into()),
            },
            ServerEvent {
                event: "task_failed".into(),
                data: "x\ny".into(),
                id: Some("1".into()),
            },
            ServerEvent {
                event: "message".into(),
                data: "plain".into(),
                id: Some("1".into()),
            },
        ];
        for size in [1, 2, 7, stream.len()] {
            let mut parser = SseParser::default();
            let got: Vec<ServerEvent> = stream.chunks(size).flat_map(|c| parser.push(c)).collect();
            assert_eq!(got, want, "chunks of {size}");
        }
    }

    #[test]
    fn urls_keep_a_path_prefix_and_encode_ids() {
        let client = Client::new(&"http://127.0.0.1:1/prefix/?x=1".parse().unwrap(), None).unwrap();
        assert_eq!(
            client
                .url(&["v1", "jobs", "a/../b"], &[("limit", "5".into())])
                .as_str(),
            "http://127.0.0.1:1/prefix/v1/jobs/a%2F..%2Fb?limit=5"
        );
        let client = Client::new(&"http://127.0.0.1:1".parse().unwrap(), None).unwrap();
        assert_eq!(
            client.url(&["v1", "job"], &[]).as_str(),
            "http://127.0.0.1:1/v1/job"
        );
        assert_eq!(client.shown, "http://127.0.0.1:1");
    }

    #[test]
    fn error_answers_become_messages_that_say_what_to_do() {
        let client = Client::new(&"http://127.0.0.1:1".parse().unwrap(), None).unwrap();
        let check = |status: u16, body: &str, want: &str| {
            let e = client.refused("cancel job J", StatusCode::from_u16(status).unwrap(), body);
            assert_eq!(e.to_string(), want);
        };
        check(
            409,
            r#"{"status":"Error","msg":"job J is already Complete"}"#,
            "cannot cancel job J: job J is already Complete (HTTP 409)",
        );
        check(
            404,
            r#"{"status":"Error","msg":"no such route"}"#,
            "cannot cancel job J: the server at http://127.0.0.1:1 has no such route (HTTP 404); it may be older than this client",
        );
        check(
            401,
            r#"{"status":"Error","msg":"missing bearer token"}"#,
            "cannot cancel job J: missing bearer token (HTTP 401; set --token-file, DOPARALLEL_TOKEN or --token)",
        );
        check(
            502,
            "<html>\n<body>Bad Gateway</body>",
            "cannot cancel job J: the server failed: <html> (HTTP 502; try again, or check its log)",
        );
        check(
            503,
            "",
            "cannot cancel job J: the server failed: Service Unavailable (HTTP 503; try again, or check its log)",
        );
    }
}
