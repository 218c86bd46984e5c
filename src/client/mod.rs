//! The command-line client of a running server: a typed HTTP client of the API (here) that
//! reads the API's own wire types (`crate::api::wire`), its errors in words a user can act
//! on, the event stream (`events`), the tables it prints for humans (`output`), and the
//! commands `submit`, `status`, `tasks`, `jobs`, `cancel` and `delete` (`commands`) that
//! `main` dispatches to.
//!
//! Output follows kubectl's habits: aligned columns for people, `--json` for scripts (the
//! server's answer as is, one document), stdout for answers and stderr for everything else
//! (progress, hints, errors). Each error is one line that says what failed and what to do.
//!
//! Exit codes tell the job's outcome apart from the client's own trouble:
//! [`EXIT_COMPLETE`] (also an unfinished job, for `status`), [`EXIT_FAILED`],
//! [`EXIT_CANCELLED`], and [`EXIT_ERROR`] for a usage error, an unreachable server or a
//! refused request.

use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use url::Url;

mod commands;
mod events;
mod groups;
mod output;

pub use commands::{cancel, delete, jobs, pause, retry, status, submit, tasks, update};
pub use events::{EventStream, ServerEvent};
pub use groups::{group, groups};
pub use output::{JOB_COLUMNS, TASK_COLUMNS, exit_code, final_document, job_row, table, task_row};

use crate::api::wire::{
    ErrorBody, GroupPage, GroupView, JobPage, JobView, RetryAnswer, SubmitAnswer, TaskPage,
};
use crate::config::{ClientArgs, Secret};
use crate::job::JobStatus;
use output::{one_line, truncate};

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
    ) -> Result<Answer<SubmitAnswer>, ClientError> {
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

    /// `GET /v1/jobs?status=S&group=G&limit=N&after=ID`.
    pub async fn jobs(
        &self,
        status: Option<JobStatus>,
        metadata: Option<&(String, String)>,
        group: Option<&str>,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Answer<JobPage>, ClientError> {
        let key = metadata.map(|(key, _)| format!("metadata.{key}"));
        let mut query = vec![("limit", limit.to_string())];
        if let Some(status) = status {
            query.push(("status", status.as_str().to_string()));
        }
        if let (Some(key), Some((_, value))) = (&key, metadata) {
            query.push((key.as_str(), value.clone()));
        }
        if let Some(group) = group {
            query.push(("group", group.to_string()));
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

    /// `PATCH /v1/jobs/{id}` with `{"options": options}`.
    pub async fn update(
        &self,
        id: &str,
        options: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Answer<JobView>, ClientError> {
        let action = format!("update job {id}");
        let body = serde_json::json!({ "options": options })
            .to_string()
            .into_bytes();
        let raw = self
            .send(
                Method::PATCH,
                self.url(&["v1", "jobs", id], &[]),
                Some(body),
                &action,
            )
            .await?;
        self.decode(raw, &action)
    }

    /// `GET /v1/groups`.
    pub async fn groups(&self) -> Result<Answer<GroupPage>, ClientError> {
        self.get(self.url(&["v1", "groups"], &[]), "list the groups")
            .await
    }

    /// `GET /v1/groups/{name}`.
    pub async fn group(&self, name: &str) -> Result<Answer<GroupView>, ClientError> {
        self.get(
            self.url(&["v1", "groups", name], &[]),
            &format!("read group {name}"),
        )
        .await
    }

    /// `PUT /v1/groups/{name}`, or with `None` `DELETE`.
    pub async fn group_set(
        &self,
        name: &str,
        limits: Option<&crate::job::GroupLimits>,
    ) -> Result<Answer<GroupView>, ClientError> {
        let url = self.url(&["v1", "groups", name], &[]);
        let raw = match limits {
            Some(limits) => {
                let action = format!("set the limits of group {name}");
                let body = serde_json::to_vec(limits).expect("limits serialize");
                self.send(Method::PUT, url, Some(body), &action).await?
            }
            None => {
                let action = format!("remove the limits of group {name}");
                self.send(Method::DELETE, url, None, &action).await?
            }
        };
        self.decode(raw, &format!("read group {name}"))
    }

    /// `POST /v1/jobs/{id}/pause`, or `resume`.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<Answer<JobView>, ClientError> {
        let verb = if pause { "pause" } else { "resume" };
        let action = format!("{verb} job {id}");
        let raw = self
            .send(
                Method::POST,
                self.url(&["v1", "jobs", id, verb], &[]),
                None,
                &action,
            )
            .await?;
        self.decode(raw, &action)
    }

    /// `POST /v1/jobs/{id}/retry`.
    pub async fn retry(
        &self,
        id: &str,
        include_cancelled: bool,
    ) -> Result<Answer<RetryAnswer>, ClientError> {
        let action = format!("retry job {id}");
        let include: &[&str] = if include_cancelled {
            &["Failed", "Cancelled"]
        } else {
            &["Failed"]
        };
        let body = serde_json::json!({ "include": include })
            .to_string()
            .into_bytes();
        let raw = self
            .send(
                Method::POST,
                self.url(&["v1", "jobs", id, "retry"], &[]),
                Some(body),
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
        Ok(EventStream::new(response))
    }
}

/// The `msg` of the server's `{"status":"Error","msg":...}`, else the first line of a short
/// text answer (a proxy's error page, say).
fn server_message(body: &str) -> Option<String> {
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
pub(super) fn without_os_error(text: String) -> String {
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
