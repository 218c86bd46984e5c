//! The job and task domain: identifiers, states, options, task errors, and what a job is
//! once accepted ([`NewJob`]); `submission` reads and validates a submitted body.
//!
//! Everything a client sends passes through [`parse_submission`] before anything is stored,
//! so a rejected request never leaves a trace. Parameters and results are kept as raw JSON
//! text ([`RawValue`]) from the wire to the database and back: numbers, large integers and
//! key order round-trip exactly, which the original service got wrong.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

mod call;
mod groups;
mod hosts;
mod submission;
mod trace;

pub use call::{
    AwsSigV4, Headers, MASK, MAX_HEADERS, Method, TaskCall, TaskOptions, check_call_headers,
    check_headers, check_retry_on, check_sigv4, query_pairs, seal_headers,
};
pub use groups::{GROUP_RATES, GroupLimits, MAX_GROUP_CONCURRENCY};
pub use hosts::{HostConcurrency, HostLimits};
pub use submission::{Limits, NewJob, NewTask, SubmissionError, parse_submission};
pub use trace::{JobTrace, new_span_id};

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

    /// When it was generated, in milliseconds since the Unix epoch (a UUIDv7 starts with
    /// them); 0 for an id of another version.
    pub fn created_millis(&self) -> i64 {
        self.0.get_timestamp().map_or(0, |t| {
            let (secs, nanos) = t.to_unix();
            (secs as i64) * 1000 + i64::from(nanos / 1_000_000)
        })
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
/// `Scheduled` is how a `Pending` job whose `not_before` is still ahead reads: it is never
/// stored as such (see [`JobStatus::shown`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum JobStatus {
    Scheduled,
    Pending,
    Running,
    /// Paused by a client: no call of it starts until it is resumed; calls in flight
    /// finish and are stored.
    Paused,
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

    /// How a job stored as `self` with these options reads at `now`: `Scheduled` while a
    /// pending job waits for its `not_before`.
    pub fn shown(self, options: &JobOptions, now: i64) -> JobStatus {
        match (self, options.not_before) {
            (JobStatus::Pending, Some(at)) if at.millis() > now => JobStatus::Scheduled,
            (status, _) => status,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Scheduled => "Scheduled",
            JobStatus::Pending => "Pending",
            JobStatus::Running => "Running",
            JobStatus::Paused => "Paused",
            JobStatus::Complete => "Complete",
            JobStatus::Failed => "Failed",
            JobStatus::Cancelled => "Cancelled",
        }
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// How long an attempt answered with 202 waits for its reported outcome before it
    /// counts as timed out (and is retried like any timeout).
    #[serde(default = "JobOptions::default_async_timeout_ms")]
    pub async_timeout_ms: u64,
    /// Whether this job's endpoints may answer 202 and report their outcome later. Without
    /// a `--public-url` on the server, only such jobs' calls carry `DoParallel-Task-Token`
    /// and `DoParallel-Result-Url` (then made of the server's listening address); with one,
    /// every call does.
    #[serde(default)]
    pub async_reports: bool,
    /// Most calls of this job in flight at once to one endpoint host (`host:port`), on top
    /// of the server's `--per-host-concurrency`: a number, or `"auto"`, a limit that adapts
    /// to the host's answers (429, 503, timeouts, latency); `None` is limited only by the
    /// server.
    #[serde(default)]
    pub per_host_concurrency: Option<HostConcurrency>,
    /// Most calls of this job started per second to one endpoint host (fractions allowed:
    /// 0.5 is one every 2 s), spaced evenly, on top of the server's `--per-host-rate`;
    /// `None` is limited only by the server.
    #[serde(default)]
    #[schema(minimum = 0.001, maximum = 1000000)]
    pub per_host_rate: Option<f64>,
    /// The HTTP method of the calls: `POST` (the default), `PUT` and `PATCH` send `params`
    /// as the JSON body; `GET` and `DELETE` send no body, and `params` (an object of
    /// strings, numbers and booleans) become the query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Headers of every call of this job; a task's own header of the same name replaces
    /// one of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: Headers,
    /// Headers whose values are secrets: sealed at rest with the server's secret key,
    /// shown by every read as `***`, sent only on the calls.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_headers: Headers,
    /// Headers of the callback request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub callback_headers: Headers,
    /// The HTTP statuses worth another attempt, replacing the default (408, 425, 429 and
    /// every 5xx); `[]` retries only connection errors and timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<u16>>,
    /// Sign every call with AWS Signature Version 4 (the server's AWS credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_sigv4: Option<AwsSigV4>,
    /// The job's trace (W3C Trace Context), from the submitting request's `traceparent`;
    /// set by the server, never by a client, and shown by reads as `trace_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub trace: Option<JobTrace>,
    /// No call of this job starts before this time (RFC 3339, at most 30 days ahead): the
    /// job is stored at once and reads `Scheduled` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-12-24T18:00:00Z")]
    pub not_before: Option<Timestamp>,
    /// The job is Complete as soon as this many of its tasks are Complete (a quorum, the
    /// first N); the rest end Cancelled. Failed at once when so many cannot complete any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub min_complete: Option<u64>,
    /// The job is Failed as soon as more than `tolerated_failures` of its tasks failed; the
    /// rest end Cancelled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_fast: bool,
    /// The job's time budget, in milliseconds from its submission (from its retry, for a
    /// later run): when it passes, every unfinished task ends `Failed` with error kind
    /// `deadline` (its calls aborted), and `tolerated_failures` decides the job's status.
    /// Runs while the job is paused. At most 30 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub deadline_ms: Option<u64>,
    /// A name that many jobs share, such as a customer's id (1 to 128 letters, digits and
    /// `.`, `-`, `_`, `:`, `@`), within the submitting API token's jobs: when a claim shares
    /// free slots, the groups share equally first, then each group's jobs, so one group's
    /// burst of jobs does not starve the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:@-]+$")]
    pub group: Option<String>,
    /// From -10 to 10: when there are more due tasks than free slots, the jobs of a higher
    /// priority are served first (jobs of one priority share as ever), and a lower one only
    /// runs on what they leave; but a job not served for the server's
    /// `--priority-max-wait` is served next at the highest priority waiting.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schema(minimum = -10, maximum = 10)]
    pub priority: i32,
    /// With tasks that answer 202 and report later: an attempt with neither a report nor a
    /// heartbeat (`POST /v1/tasks/{token}/heartbeat`) for this long times out (and is
    /// retried like any timeout), within its `async_timeout_ms` as ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub async_heartbeat_ms: Option<u64>,
    /// Which run of the job this is: 2 after its failed tasks were retried once
    /// (`POST /v1/jobs/{id}/retry`), and so on; absent for the first. Set by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only, minimum = 2)]
    pub run: Option<u32>,
    /// When the job's current run began, for a run after the first (the retry's time): its
    /// `deadline_ms` counts from here. Set by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only, value_type = Option<String>, format = DateTime)]
    pub run_started: Option<Timestamp>,
}

/// A point in time, in milliseconds since the Unix epoch, read and written as RFC 3339
/// (written in UTC, with milliseconds when it has any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(i64);

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How far ahead `options.not_before` may be.
pub const MAX_NOT_BEFORE_MS: i64 = 30 * 24 * 3600 * 1000;

impl Timestamp {
    pub fn from_millis(millis: i64) -> Self {
        Timestamp(millis)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("{text:?} is not an RFC 3339 time ({e})"))?;
        Ok(Timestamp((at.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .map_err(|_| std::fmt::Error)?;
        let text = at
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|_| std::fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Upper bound of the retry backoff, whatever the attempt.
pub const BACKOFF_CAP_MS: u64 = 60_000;
const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
const MAX_ATTEMPTS: u32 = 100;
/// The per-host rates accepted, in calls per second (a job's or the server's): from one call
/// every 1000 s (a slower rate is more likely a mistake, and its interval must stay a
/// sensible `Duration`) to one a microsecond, past which the limit means nothing.
pub const PER_HOST_RATES: RangeInclusive<f64> = 0.001..=1_000_000.0;
const MAX_ASYNC_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Whether `name` may name a group: 1 to 128 of `[A-Za-z0-9._:@-]`.
pub fn is_group_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:@".contains(&b))
}

/// The priorities accepted.
pub const PRIORITIES: RangeInclusive<i32> = -10..=10;

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// The `deadline_ms` accepted: up to 30 days.
pub const DEADLINES: RangeInclusive<u64> = 1..=30 * 24 * 3600 * 1000;

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
    fn default_async_timeout_ms() -> u64 {
        3_600_000
    }

    /// The options of a request that sent none.
    pub fn defaults() -> Self {
        JobOptions {
            concurrency: None,
            timeout_ms: Self::default_timeout_ms(),
            max_attempts: Self::default_max_attempts(),
            backoff_ms: Self::default_backoff_ms(),
            tolerated_failures: 0,
            async_timeout_ms: Self::default_async_timeout_ms(),
            async_reports: false,
            per_host_concurrency: None,
            per_host_rate: None,
            method: None,
            headers: Headers::new(),
            secret_headers: Headers::new(),
            callback_headers: Headers::new(),
            retry_on: None,
            aws_sigv4: None,
            trace: None,
            not_before: None,
            min_complete: None,
            fail_fast: false,
            deadline_ms: None,
            priority: 0,
            group: None,
            async_heartbeat_ms: None,
            run: None,
            run_started: None,
        }
    }

    /// How many of a job of `total` tasks may fail with the job still Complete: with
    /// `min_complete`, all but that many; else `tolerated_failures`. What the store keeps as
    /// the job's tolerance, so that its last settle decides by the same rule as an early end.
    pub fn tolerated(&self, total: u64) -> u64 {
        self.min_complete.map_or(self.tolerated_failures, |quorum| {
            total.saturating_sub(quorum)
        })
    }

    /// Whether the job's outcome may be decided before all its tasks ran
    /// (`min_complete`, `fail_fast`).
    pub fn decides_early(&self) -> bool {
        self.min_complete.is_some() || self.fail_fast
    }

    /// Which run of the job this is, from 1.
    pub fn run(&self) -> u32 {
        self.run.unwrap_or(1)
    }

    /// These options with the limits in `patch` changed (`PATCH /v1/jobs/{id}`): the
    /// options a running job may change, each a number or `null` (no limit of the job's
    /// own). Any other option is refused by name.
    pub fn with_limits(
        &self,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<JobOptions, String> {
        let mut next = self.clone();
        for (name, value) in patch {
            let place = format!("options.{name}");
            let whole = |min: u64| -> Result<Option<u32>, String> {
                match value {
                    serde_json::Value::Null => Ok(None),
                    v => v
                        .as_u64()
                        .filter(|n| *n >= min && *n <= u64::from(u32::MAX))
                        .map(|n| Some(n as u32))
                        .ok_or_else(|| {
                            format!("{place}: expected a whole number from {min}, or null")
                        }),
                }
            };
            match name.as_str() {
                "concurrency" => next.concurrency = whole(1)?,
                "priority" => {
                    // `null`: back to the default, as for the limits.
                    next.priority = if value.is_null() { Some(0) } else { value.as_i64() }
                        .and_then(|p| i32::try_from(p).ok())
                        .filter(|p| PRIORITIES.contains(p))
                        .ok_or_else(|| {
                            format!(
                                "{place}: expected a whole number from {} to {}",
                                PRIORITIES.start(),
                                PRIORITIES.end()
                            )
                        })?
                }
                "deadline_ms" => {
                    next.deadline_ms = match value {
                        serde_json::Value::Null => None,
                        v => Some(v.as_u64().filter(|ms| DEADLINES.contains(ms)).ok_or_else(
                            || {
                                format!(
                                    "{place}: expected milliseconds from {} to {} (30 days), or null",
                                    DEADLINES.start(),
                                    DEADLINES.end()
                                )
                            },
                        )?),
                    }
                }
                "per_host_concurrency" => {
                    next.per_host_concurrency = serde_json::from_value(value.clone())
                        .map_err(|e| format!("{place}: {e}"))?
                }
                "per_host_rate" => {
                    next.per_host_rate = match value {
                        serde_json::Value::Null => None,
                        v => Some(
                            v.as_f64()
                                .filter(|r| PER_HOST_RATES.contains(r))
                                .ok_or_else(|| {
                                    format!(
                                        "{place}: expected calls per second from {} to {}, or null",
                                        PER_HOST_RATES.start(),
                                        PER_HOST_RATES.end()
                                    )
                                })?,
                        ),
                    }
                }
                _ => {
                    return Err(format!(
                        "{place}: cannot be changed once a job is submitted; a running job's \
                         concurrency, per_host_concurrency, per_host_rate, deadline_ms and \
                         priority can"
                    ));
                }
            }
        }
        Ok(next)
    }

    /// This job's own limits on the calls to each host.
    pub fn host_limits(&self) -> HostLimits {
        HostLimits {
            concurrency: self.per_host_concurrency,
            rate: self.per_host_rate,
        }
    }

    fn validate(&self, limits: &Limits) -> Result<(), String> {
        if self.concurrency == Some(0) {
            return Err("options.concurrency: must be at least 1".into());
        }
        let max_timeout = limits.max_task_timeout_ms.min(MAX_TIMEOUT_MS);
        if self.timeout_ms == 0 || self.timeout_ms > max_timeout {
            return Err(format!(
                "options.timeout_ms: must be between 1 and {max_timeout} (this server's \
                 --max-task-timeout): a call in flight holds one of the server's slots"
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
        if self.async_timeout_ms == 0 || self.async_timeout_ms > MAX_ASYNC_TIMEOUT_MS {
            return Err(format!(
                "options.async_timeout_ms: must be between 1 and {MAX_ASYNC_TIMEOUT_MS} (7 days)"
            ));
        }
        if self.tolerated_failures > i64::MAX as u64 {
            return Err(format!(
                "options.tolerated_failures: must be at most {} (what the store can hold)",
                i64::MAX
            ));
        }
        if let Some(rate) = self.per_host_rate
            && !PER_HOST_RATES.contains(&rate)
        {
            return Err(format!(
                "options.per_host_rate: must be between {} and {} calls per second",
                PER_HOST_RATES.start(),
                PER_HOST_RATES.end()
            ));
        }
        if self.trace.is_some() {
            return Err(
                "options.trace: set from the request's traceparent header, not the body".into(),
            );
        }
        if self.min_complete == Some(0) {
            return Err("options.min_complete: must be at least 1".into());
        }
        if self.run.is_some() || self.run_started.is_some() {
            let name = if self.run.is_some() {
                "run"
            } else {
                "run_started"
            };
            return Err(format!(
                "options.{name}: set by the server when a job is retried, not by the body"
            ));
        }
        if let Some(group) = &self.group
            && !is_group_name(group)
        {
            return Err(format!(
                "options.group: {group:?} is not a group name (1 to 128 letters, digits and . - _ : @)"
            ));
        }
        if !PRIORITIES.contains(&self.priority) {
            return Err(format!(
                "options.priority: must be between {} and {}",
                PRIORITIES.start(),
                PRIORITIES.end()
            ));
        }
        if let Some(ms) = self.deadline_ms
            && !DEADLINES.contains(&ms)
        {
            return Err(format!(
                "options.deadline_ms: must be between {} and {} (30 days)",
                DEADLINES.start(),
                DEADLINES.end()
            ));
        }
        if let Some(ms) = self.async_heartbeat_ms
            && (ms == 0 || ms > self.async_timeout_ms)
        {
            return Err(format!(
                "options.async_heartbeat_ms: must be between 1 and options.async_timeout_ms ({})",
                self.async_timeout_ms
            ));
        }
        if let Some(at) = self.not_before
            && at.millis() > now_millis() + MAX_NOT_BEFORE_MS
        {
            return Err(format!(
                "options.not_before: {at} is more than 30 days ahead; submit the job later"
            ));
        }
        check_headers("options.headers", &self.headers)?;
        check_headers("options.secret_headers", &self.secret_headers)?;
        check_headers("options.callback_headers", &self.callback_headers)?;
        if self.callback_headers.len() > MAX_HEADERS {
            return Err(format!(
                "options.callback_headers: at most {MAX_HEADERS} headers are accepted"
            ));
        }
        if let Some(list) = &self.retry_on {
            check_retry_on("options.retry_on", list)?;
        }
        if let Some(sigv4) = &self.aws_sigv4 {
            check_sigv4("options.aws_sigv4", sigv4)?;
        }
        check_call_headers("options", self)
    }
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

/// A response body as a result: its JSON when it is JSON, else its text as a JSON string,
/// or `null` when it is empty. JSON is kept as sent, so numbers keep every digit.
pub fn result_json(body: &[u8]) -> Box<RawValue> {
    let text = String::from_utf8_lossy(body);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return RawValue::from_string("null".into()).expect("null is JSON");
    }
    if let Ok(raw) = serde_json::from_str::<&RawValue>(trimmed) {
        return compact_json(raw);
    }
    serde_json::value::to_raw_value(&text).expect("a string serializes")
}

/// The built-in test task's answer, the same as `POST /v1/test` gives.
pub fn test_result(params: &RawValue) -> Box<RawValue> {
    RawValue::from_string(format!(r#"{{"result":"true","params":{}}}"#, params.get()))
        .expect("params are JSON")
}

/// Why an attempt did not complete, as DoParallel stores it in the task's `error` (a
/// failure an endpoint reports is stored as it sent it instead).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskError {
    /// `timeout`, `connect`, `http_status`, `response_too_large`, `blocked`, `request`, or
    /// `deadline` (the job's `deadline_ms` passed before the task finished).
    pub kind: Cow<'static, str>,
    pub http_status: Option<u16>,
    pub message: String,
    /// The first KiB of the response body, when there was one.
    pub body: Option<String>,
    /// The most specific cause of a transport error (the innermost error of its chain:
    /// `dns error: ...`, `Connection refused`), for people to read first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl TaskError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        TaskError {
            kind: Cow::Borrowed(kind),
            http_status: None,
            message: message.into(),
            body: None,
            cause: None,
        }
    }

    pub fn timeout(message: String) -> Self {
        TaskError::new("timeout", message)
    }

    pub fn to_json(&self) -> Box<RawValue> {
        serde_json::value::to_raw_value(self).expect("a TaskError serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacting_keeps_strings_and_numbers() {
        let raw: Box<RawValue> =
            serde_json::from_str(r#" { "a b" : [ 1.50 , "x \" y\\" ] , "c":{ } } "#).unwrap();
        assert_eq!(
            compact_json(&raw).get(),
            r#"{"a b":[1.50,"x \" y\\"],"c":{}}"#
        );
    }
}
