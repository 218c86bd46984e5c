//! Reading a submitted job: the body is parsed with the path of any error (`tasks[3].params`),
//! then checked against the server's limits and the egress guard, before anything is stored.

use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;

use super::call::{
    AwsSigV4, Headers, Method, TaskCall, TaskOptions, check_call_headers, check_headers,
    check_retry_on, check_sigv4, check_sigv4_host, query_pairs, seal_headers,
};
use super::{JobId, JobOptions, TEST_ENDPOINT, compact_json};
use crate::egress::EgressPolicy;
use crate::sealing::Sealer;

/// Bounds on what one submission may hold; each is a command-line option.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_tasks: usize,
    /// Bytes of one task's `params`, as sent.
    pub max_params_bytes: usize,
    /// Characters of an endpoint or callback URL.
    pub max_url_len: usize,
    /// Nesting of arrays and objects in the whole body.
    pub max_depth: usize,
    /// The longest `timeout_ms` a job may ask for.
    pub max_task_timeout_ms: u64,
    /// Hosts whose calls may be signed with `aws_sigv4` besides AWS's own Lambda function
    /// URL and API Gateway hosts (`--aws-sigv4-host`).
    pub aws_sigv4_hosts: Vec<String>,
}

impl Limits {
    /// The documented defaults.
    pub fn defaults() -> Self {
        Limits {
            max_tasks: 100_000,
            max_params_bytes: 256 * 1024,
            max_url_len: 2048,
            max_depth: 64,
            max_task_timeout_ms: 15 * 60 * 1000,
            aws_sigv4_hosts: Vec::new(),
        }
    }
}

/// The deepest nesting of arrays and objects in a JSON text (strings are skipped).
fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A validated job, ready to be stored.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: JobId,
    /// Who submitted it (see `auth::Owner`); set by the API after parsing.
    pub owner: Option<String>,
    pub callback: Option<Url>,
    pub options: JobOptions,
    pub tasks: Vec<NewTask>,
    /// The client's own JSON object, returned as is by every read and in the callback.
    pub metadata: Option<Box<RawValue>>,
}

impl NewJob {
    /// When its tasks are first due, if stored at `now`: then, or at its `not_before`.
    pub fn first_run_at(&self, now: i64) -> i64 {
        self.options.not_before.map_or(now, |t| t.millis().max(now))
    }
}

/// A validated task: its endpoint (an absolute http(s) URL or [`TEST_ENDPOINT`]), its
/// parameters as the exact JSON text the client sent (`null` when absent), and its own call
/// settings, if it has any (secret values sealed).
#[derive(Clone, Debug)]
pub struct NewTask {
    pub endpoint: String,
    pub params: Box<RawValue>,
    pub call: Option<Box<TaskCall>>,
}

impl NewTask {
    /// The call settings as stored: JSON text, `None` for a task without any.
    pub fn call_json(&self) -> Option<String> {
        self.call
            .as_ref()
            .map(|call| serde_json::to_string(call).expect("call settings serialize"))
    }
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
    #[serde(default, borrow)]
    metadata: Option<&'a RawValue>,
}

/// The most bytes of a job's `metadata`, as sent.
pub const MAX_METADATA_BYTES: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTask<'a> {
    endpoint: String,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    method: Option<Method>,
    #[serde(default)]
    headers: Headers,
    #[serde(default)]
    secret_headers: Headers,
    #[serde(default)]
    aws_sigv4: Option<AwsSigV4>,
    #[serde(default)]
    options: Option<TaskOptions>,
}

/// Deserializes one part of a submission, or says what is wrong in words a client can act
/// on, at the JSON path of the offending value: `place` names the part (`None` for the
/// whole body) and the path inside it follows, e.g. `task 1: endpoint: expected a string
/// (an http(s) URL or /v1/test), got the number 5`.
fn from_json<'a, T: Deserialize<'a>>(
    text: &'a str,
    place: Option<&str>,
) -> Result<T, SubmissionError> {
    // serde reads a struct from a list too (its fields in order), which no client means.
    if text.trim_start().starts_with('[') {
        let expected = match std::any::type_name::<T>().rsplit("::").next() {
            Some(name) if name.starts_with("WireJob") => WIRE_JOB,
            Some(name) if name.starts_with("WireTask") => WIRE_TASK,
            _ => "an object of options",
        };
        return Err(invalid(format!(
            "{}: expected {expected}, got a list",
            place.unwrap_or("job")
        )));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut segments: Vec<_> = e.path().iter().collect();
        // An unknown field's path ends with the field, which the message names already.
        if e.inner().to_string().starts_with("unknown field") {
            segments.pop();
        }
        let path = json_path(&segments);
        let field = e.path().iter().rev().find_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.as_str()),
            _ => None,
        });
        let at = match (place, path.is_empty()) {
            (None, true) => "job".to_string(),
            (None, false) => path,
            (Some(place), true) => place.to_string(),
            // Options read as `options.timeout_ms`, as their range errors do.
            (Some("options"), false) => format!("options.{path}"),
            (Some(place), false) => format!("{place}: {path}"),
        };
        invalid(format!("{at}: {}", explain(field, e.inner())))
    })
}

const WIRE_JOB: &str =
    "an object with \"tasks\" (and optionally \"callback\", \"options\" and \"metadata\")";
const WIRE_TASK: &str = "an object with \"endpoint\" (and optionally \"params\", \"method\", \"headers\", \"secret_headers\", \"aws_sigv4\" and \"options\")";

/// A path as `a.b[2].c`, without the leading `.` of an empty one.
fn json_path(segments: &[&serde_path_to_error::Segment]) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => out.push('?'),
        }
    }
    out
}

/// serde's message in a client's words: "invalid type: map, expected a sequence" becomes
/// "expected a list of tasks, got an object". Other messages (a missing or unknown field)
/// are serde's own, without the line and column that serde_json appends, which inside a
/// task would count from the task and mislead.
fn explain(field: Option<&str>, e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let text = text.strip_suffix(&suffix).unwrap_or(&text);
    let Some((got, expected)) = text
        .strip_prefix("invalid type: ")
        .or_else(|| text.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "))
    else {
        return text.to_string();
    };
    let expected = match (field, expected) {
        (Some("tasks"), _) => "a list of tasks",
        (Some("endpoint"), _) => "a string (an http(s) URL or /v1/test)",
        (Some("callback"), _) => "a string (an http(s) URL)",
        (_, "a sequence") => "a list",
        (_, "u32") => "a whole number from 0 to 4294967295",
        (_, "u64") => "a whole number, 0 or more",
        (_, "f64") => "a number",
        (_, "struct WireJob") => WIRE_JOB,
        (_, "struct WireTask") => WIRE_TASK,
        (_, "struct JobOptions") => "an object of options",
        (_, other) => other,
    };
    let got = match got {
        "map" => "an object".to_string(),
        "sequence" => "a list".to_string(),
        "unit value" => "null".to_string(),
        other => {
            let value = |prefix: &str| {
                other
                    .strip_prefix(prefix)
                    .map(|v| v.trim_matches('`').to_string())
            };
            if let Some(n) = value("integer ").or_else(|| value("floating point ")) {
                format!("the number {n}")
            } else if let Some(b) = value("boolean ") {
                b
            } else if let Some(text) = other.strip_prefix("string ") {
                // A long string is cut: the message says what kind of value it was.
                let mut cut: String = text.chars().take(60).collect();
                if cut.len() < text.len() {
                    cut.push_str("...");
                }
                format!("the string {cut}")
            } else {
                other.to_string()
            }
        }
    };
    format!("expected {expected}, got {got}")
}

/// Parses and validates a submitted job body (the seed's shape plus optional `options`),
/// within `limits`, refusing URLs whose host is an IP literal that `egress` denies, and
/// seals the values of secret headers with `sealer` (refusing them without a key).
pub fn parse_submission(
    body: &[u8],
    limits: &Limits,
    egress: &EgressPolicy,
    sealer: &Sealer,
) -> Result<NewJob, SubmissionError> {
    // Syntax first, so that a body which is not JSON is told apart from a wrong shape.
    serde_json::from_slice::<&RawValue>(body)
        .map_err(|e| SubmissionError::Malformed(e.to_string()))?;
    let depth = json_depth(body);
    if depth > limits.max_depth {
        return Err(invalid(format!(
            "job: JSON is nested {depth} levels deep; at most {} are accepted",
            limits.max_depth
        )));
    }
    let text = std::str::from_utf8(body).map_err(|e| SubmissionError::Malformed(e.to_string()))?;
    let wire: WireJob<'_> = from_json(text, None)?;
    if wire.tasks.len() > limits.max_tasks {
        return Err(invalid(format!(
            "tasks: {} tasks; at most {} are accepted in one job",
            wire.tasks.len(),
            limits.max_tasks
        )));
    }

    let callback = match wire.callback {
        None => None,
        Some(text) => Some(
            checked_url(&text, limits, egress)
                .map_err(|why| invalid(format!("callback: {why}")))?,
        ),
    };

    let mut options = match wire.options {
        None => JobOptions::defaults(),
        Some(raw) if raw.get() == "null" => JobOptions::defaults(),
        Some(raw) => from_json::<JobOptions>(raw.get(), Some("options"))?,
    };
    options.validate(limits).map_err(invalid)?;
    let id = JobId::generate();
    let job_context = id.to_string();

    let mut tasks = Vec::with_capacity(wire.tasks.len());
    for (i, raw) in wire.tasks.iter().enumerate() {
        let n = i + 1;
        let task: WireTask<'_> = from_json(raw.get(), Some(&format!("task {n}")))?;
        let url = if task.endpoint != TEST_ENDPOINT {
            Some(
                checked_url(&task.endpoint, limits, egress)
                    .map_err(|why| invalid(format!("task {n}: endpoint {why}")))?,
            )
        } else {
            None
        };
        if let Some(params) = task.params
            && params.get().len() > limits.max_params_bytes
        {
            return Err(invalid(format!(
                "task {n}: params are {} bytes; at most {} are accepted",
                params.get().len(),
                limits.max_params_bytes
            )));
        }
        let params = match task.params {
            Some(raw) => compact_json(raw),
            None => RawValue::from_string("null".into()).expect("null is JSON"),
        };
        let mut call = TaskCall {
            method: task.method,
            headers: task.headers,
            secret_headers: task.secret_headers,
            aws_sigv4: task.aws_sigv4,
            options: task.options.unwrap_or_default(),
        };
        // Whose calls are signed with the server's AWS identity is the operator's choice
        // (checked once the setting itself is).
        if let Some(sigv4) = &call.aws_sigv4 {
            check_sigv4(&format!("task {n}: aws_sigv4"), sigv4).map_err(invalid)?;
        }
        let sigv4 = call.aws_sigv4.as_ref().or(options.aws_sigv4.as_ref());
        if let (Some(url), Some(sigv4)) = (&url, sigv4) {
            check_sigv4_host(url, sigv4, &limits.aws_sigv4_hosts)
                .map_err(|why| invalid(format!("task {n}: {why}")))?;
        }
        let call = if call.is_empty() {
            if options.method.unwrap_or_default().params_in_query() {
                let method = options.method.unwrap_or_default().as_str();
                query_pairs(&params)
                    .map_err(|why| invalid(format!("task {n}: {method}: {why}")))?;
            }
            None
        } else {
            check_task_call(&format!("task {n}"), &call, &options, &params, limits)
                .map_err(invalid)?;
            seal_headers(sealer, &job_context, &mut call.secret_headers)
                .map_err(|why| invalid(format!("task {n}: secret_headers: {why}")))?;
            let stored = serde_json::to_string(&call).expect("call settings serialize");
            let size = stored.len() + params.get().len();
            if size > limits.max_params_bytes {
                return Err(invalid(format!(
                    "task {n}: params and call settings take {size} bytes stored; at most {} are accepted",
                    limits.max_params_bytes
                )));
            }
            Some(Box::new(call))
        };
        tasks.push(NewTask {
            endpoint: task.endpoint,
            params,
            call,
        });
    }
    seal_headers(sealer, &job_context, &mut options.secret_headers)
        .map_err(|why| invalid(format!("options.secret_headers: {why}")))?;
    if let Some(n) = options.min_complete
        && n > tasks.len() as u64
    {
        return Err(invalid(format!(
            "options.min_complete: {n} is more than the job's {} tasks",
            tasks.len()
        )));
    }

    let metadata = match wire.metadata {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) if !raw.get().starts_with('{') => {
            return Err(invalid(
                "metadata: expected an object of your own fields, returned as is".into(),
            ));
        }
        Some(raw) if raw.get().len() > MAX_METADATA_BYTES => {
            return Err(invalid(format!(
                "metadata: {} bytes; at most {MAX_METADATA_BYTES} are accepted",
                raw.get().len()
            )));
        }
        Some(raw) => Some(compact_json(raw)),
    };

    Ok(NewJob {
        id,
        owner: None,
        callback,
        options,
        tasks,
        metadata,
    })
}

/// Checks one task's own settings and the call they make with the job's options (`place`
/// is `task N`): each field as a job's would be, the merged headers, and params that fit
/// the merged method.
fn check_task_call(
    place: &str,
    call: &TaskCall,
    job: &JobOptions,
    params: &RawValue,
    limits: &Limits,
) -> Result<(), String> {
    check_headers(&format!("{place}: headers"), &call.headers)?;
    check_headers(&format!("{place}: secret_headers"), &call.secret_headers)?;
    if let Some(list) = &call.options.retry_on {
        check_retry_on(&format!("{place}: options.retry_on"), list)?;
    }
    if let Some(sigv4) = &call.aws_sigv4 {
        check_sigv4(&format!("{place}: aws_sigv4"), sigv4)?;
    }
    let merged = job.for_task(call);
    if !call.options.is_empty() {
        merged
            .validate(limits)
            .map_err(|why| format!("{place}: {why}"))?;
    }
    check_call_headers(place, &merged)?;
    if merged.method.unwrap_or_default().params_in_query() {
        let method = merged.method.unwrap_or_default().as_str();
        query_pairs(params).map_err(|why| format!("{place}: {method}: {why}"))?;
    }
    Ok(())
}

fn invalid(msg: String) -> SubmissionError {
    SubmissionError::Invalid(msg)
}

/// An absolute http(s) URL with a host, within the length limit and not aimed at a denied
/// address; else why not (to follow "endpoint " or "callback: ").
fn checked_url(text: &str, limits: &Limits, egress: &EgressPolicy) -> Result<Url, String> {
    if text.len() > limits.max_url_len {
        return Err(format!(
            "URL is {} characters long; at most {} are accepted",
            text.len(),
            limits.max_url_len
        ));
    }
    let url = Url::parse(text)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https"))
        .filter(|url| url.host_str().is_some_and(|h| !h.is_empty()))
        .ok_or_else(|| format!("{text:?} is not an absolute http(s) URL"))?;
    egress.check_url(&url)?;
    Ok(url)
}

#[cfg(test)]
mod tests;
