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
}

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

const WIRE_JOB: &str = "an object with \"tasks\" (and optionally \"callback\" and \"options\")";
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
        (_, "struct WireJob") => {
            "an object with \"tasks\" (and optionally \"callback\" and \"options\")"
        }
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

    Ok(NewJob {
        id,
        owner: None,
        callback,
        options,
        tasks,
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
mod tests {
    use super::*;
    use crate::job::HostLimits;

    /// Parses `body` and compares the outcome: `Ok(n)` is a valid job of `n` tasks,
    /// `Err(text)` a rejection whose message contains `text`.
    fn check(body: &str, expected: Result<usize, &str>) {
        check_with(body, &Limits::defaults(), &EgressPolicy::open(), expected);
    }

    /// `check` under given limits and guard.
    fn check_with(
        body: &str,
        limits: &Limits,
        egress: &EgressPolicy,
        expected: Result<usize, &str>,
    ) {
        match (
            parse_submission(body.as_bytes(), limits, egress, &Sealer::default()),
            expected,
        ) {
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
        check(
            r#"{"tasks":{}}"#,
            Err("tasks: expected a list of tasks, got an object"),
        );
        check(
            r#"{"tasks":{"a":1}}"#,
            Err("tasks: expected a list of tasks, got an object"),
        );
        check(
            r#"{"tasks":[{"endpoint":5}]}"#,
            Err(
                "task 1: endpoint: expected a string (an http(s) URL or /v1/test), got the number 5",
            ),
        );
        check(
            r#"{"tasks":[],"callback":true}"#,
            Err("callback: expected a string (an http(s) URL), got true"),
        );
        check(
            r#"[1,2]"#,
            Err(
                "job: expected an object with \"tasks\" (and optionally \"callback\" and \"options\"), got a list",
            ),
        );
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
        check(
            r#"{"tasks":[{"endpoint":"/v1/test"},7]}"#,
            Err(
                "task 2: expected an object with \"endpoint\" (and optionally \"params\", \"method\", \"headers\", \"secret_headers\", \"aws_sigv4\" and \"options\"), got the number 7",
            ),
        );
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
            Err("options.timeout_ms: expected a whole number, 0 or more, got the number -1"),
        );
        check(
            r#"{"tasks":[],"options":{"per_host_concurrency":0}}"#,
            Err("options.per_host_concurrency: must be at least 1"),
        );
        check(
            r#"{"tasks":[],"options":{"per_host_concurrency":-2}}"#,
            Err(
                "options.per_host_concurrency: expected a whole number from 0 to 4294967295, got the number -2",
            ),
        );
        check(
            r#"{"tasks":[],"options":{"per_host_rate":0}}"#,
            Err("options.per_host_rate: must be between 0.001 and 1000000 calls per second"),
        );
        check(
            r#"{"tasks":[],"options":{"per_host_rate":-0.5}}"#,
            Err("options.per_host_rate: must be between"),
        );
        check(
            r#"{"tasks":[],"options":{"per_host_rate":1e-300}}"#,
            Err("options.per_host_rate: must be between"),
        );
        check(
            r#"{"tasks":[],"options":{"per_host_rate":1e300}}"#,
            Err("options.per_host_rate: must be between"),
        );
        check(r#"{"tasks":[],"options":{"per_host_rate":0.001}}"#, Ok(0));
        // What the store cannot hold is refused, not stored as a negative number.
        check(
            r#"{"tasks":[],"options":{"tolerated_failures":9223372036854775808}}"#,
            Err("options.tolerated_failures: must be at most 9223372036854775807"),
        );
        check(
            r#"{"tasks":[],"options":{"tolerated_failures":9223372036854775807}}"#,
            Ok(0),
        );
        check(
            r#"{"tasks":[],"options":{"per_host_rate":"fast"}}"#,
            Err("options.per_host_rate: expected a number, got the string \"fast\""),
        );
        check(
            r#"{"tasks":[],"options":[]}"#,
            Err("options: expected an object of options, got a list"),
        );
    }

    #[test]
    fn call_settings_are_checked_where_they_are_given() {
        let job = |options: &str, task: &str| {
            format!(
                r#"{{"tasks":[{{"endpoint":"/v1/test"}},{{"endpoint":"http://e.example/"{task}}}],"options":{{{options}}}}}"#
            )
        };
        check(
            &job(
                r#""headers":{"X-A":"1"},"method":"PUT""#,
                r#","headers":{"x-a":"2"},"method":"PATCH""#,
            ),
            Ok(2),
        );
        for (body, expected) in [
            (
                job(r#""headers":{"Host":"x"}"#, ""),
                "options.headers: Host cannot be set",
            ),
            (
                job("", r#","headers":{"Content-Length":"1"}"#),
                "task 2: headers: Content-Length cannot be set",
            ),
            (
                job("", r#","headers":{"X-A":"a\nb"}"#),
                "task 2: headers: the value of X-A holds a line feed (LF)",
            ),
            (
                job(r#""method":"get""#, ""),
                "options.method: unknown variant `get`",
            ),
            (
                job(r#""method":"GET""#, r#","params":[1]"#),
                "task 2: GET: params must be an object",
            ),
            (
                job("", r#","method":"DELETE","params":{"a":{"b":1}}"#),
                "task 2: DELETE: params.a must be a string",
            ),
            (
                job("", r#","options":{"timeout_ms":0}"#),
                "task 2: options.timeout_ms: must be between 1",
            ),
            (
                job("", r#","options":{"max_attempts":101}"#),
                "task 2: options.max_attempts",
            ),
            (
                job("", r#","options":{"concurrency":2}"#),
                "task 2: options: unknown field `concurrency`",
            ),
            (
                job(r#""retry_on":[200]"#, ""),
                "options.retry_on: 200 is not a status worth retrying",
            ),
            (
                job("", r#","options":{"retry_on":[99]}"#),
                "task 2: options.retry_on: 99 is not",
            ),
            (
                job("", r#","headers":{"X-A":"1"},"secret_headers":{"x-a":"2"}"#),
                "task 2: X-A is both a header and a secret header",
            ),
            (
                job(
                    r#""aws_sigv4":{"service":"lambda","region":"us-east-1"}"#,
                    r#","headers":{"Authorization":"x"}"#,
                ),
                "task 2: aws_sigv4: calls to e.example are not signed",
            ),
            (
                job("", r#","aws_sigv4":{"service":"","region":"us-east-1"}"#),
                "task 2: aws_sigv4.service",
            ),
            (
                job(r#""secret_headers":{"X-Key":"v"}"#, ""),
                "options.secret_headers: this server has no secret key",
            ),
            (
                job("", r#","secret_headers":{"X-Key":"v"}"#),
                "task 2: secret_headers: this server has no secret key",
            ),
        ] {
            check(&body, Err(expected));
        }
        // At a Lambda function URL: the headers the signature sets cannot be set.
        let lambda = |task: &str| {
            format!(
                r#"{{"tasks":[{{"endpoint":"https://abc.lambda-url.us-east-1.on.aws/"{task}}}],
                    "options":{{"aws_sigv4":{{"service":"lambda","region":"us-east-1"}}}}}}"#
            )
        };
        check(&lambda(""), Ok(1));
        check(
            &lambda(r#","headers":{"X-Amz-Date":"x"}"#),
            Err("task 1: X-Amz-Date cannot be set on a call signed with aws_sigv4"),
        );
        check(
            &lambda(r#","headers":{"Authorization":"x"}"#),
            Err("task 1: Authorization cannot be set on a call signed with aws_sigv4"),
        );
        check(
            &lambda(r#","secret_headers":{"Content-Type":"x"}"#),
            Err("task 1: Content-Type cannot be a secret header on a call signed with aws_sigv4"),
        );
        let many: Vec<String> = (0..65).map(|i| format!(r#""X-{i}":"v""#)).collect();
        check(
            &job(&format!(r#""headers":{{{}}}"#, many.join(",")), ""),
            Err("65 headers per call; at most 64"),
        );
        let big = "v".repeat(8200);
        check(
            &job("", &format!(r#","headers":{{"X-Big":"{big}"}}"#)),
            Err("task 2: the headers of one call take 8205 bytes; at most 8192"),
        );
    }

    #[test]
    fn secret_values_are_sealed_before_anything_else_sees_them() {
        let key = crate::sealing::SecretKey::parse(&crate::sealing::SecretKey::generate()).unwrap();
        let sealer = Sealer::new(Some(key), None);
        let job = parse_submission(
            br#"{"tasks":[{"endpoint":"/v1/test","secret_headers":{"X-Task":"task-secret"},"options":{"retry_on":[]}}],
                "options":{"secret_headers":{"Authorization":"Bearer job-secret"},"callback_headers":{"X-Cb":"1"}}}"#,
            &Limits::defaults(),
            &EgressPolicy::open(),
            &sealer,
        )
        .unwrap();
        let id = job.id.to_string();
        let sealed = &job.options.secret_headers["Authorization"];
        let debug = format!("{job:?}");
        assert!(
            !debug.contains("job-secret") && !debug.contains("task-secret"),
            "{debug}"
        );
        assert_eq!(
            sealer.open(&id, "Authorization", sealed).unwrap(),
            "Bearer job-secret"
        );
        let call = job.tasks[0].call.as_ref().unwrap();
        assert_eq!(
            sealer
                .open(&id, "X-Task", &call.secret_headers["X-Task"])
                .unwrap(),
            "task-secret"
        );
        assert_eq!(call.options.retry_on, Some(vec![]));
        assert!(!job.tasks[0].call_json().unwrap().contains("task-secret"));
        assert_eq!(job.options.masked().secret_headers["Authorization"], "***");
    }

    #[test]
    fn per_host_options_are_kept() {
        let job = parse_submission(
            br#"{"tasks":[],"options":{"per_host_concurrency":3,"per_host_rate":0.5}}"#,
            &Limits::defaults(),
            &EgressPolicy::open(),
            &Sealer::default(),
        )
        .unwrap();
        assert_eq!(
            job.options.host_limits(),
            HostLimits {
                concurrency: Some(3),
                rate: Some(0.5)
            }
        );
        // Stored as JSON and read back when claimed.
        let text = serde_json::to_string(&job.options).unwrap();
        let back: JobOptions = serde_json::from_str(&text).unwrap();
        assert_eq!(back, job.options);
        // Options stored before these existed read back without them.
        let old: JobOptions =
            serde_json::from_str(r#"{"concurrency":null,"timeout_ms":1,"max_attempts":1,"backoff_ms":0,"tolerated_failures":0}"#)
                .unwrap();
        assert_eq!(old.host_limits(), HostLimits::UNLIMITED);
    }

    #[test]
    fn params_keep_their_exact_text() {
        let body = r#"{"tasks":[{"endpoint":"/v1/test","params":{"n": 12345678901234567890123, "f":1.10}}]}"#;
        let job = parse_submission(
            body.as_bytes(),
            &Limits::defaults(),
            &EgressPolicy::open(),
            &Sealer::default(),
        )
        .unwrap();
        assert_eq!(
            job.tasks[0].params.get(),
            r#"{"n":12345678901234567890123,"f":1.10}"#
        );
        let none = parse_submission(
            br#"{"tasks":[{"endpoint":"/v1/test"}]}"#,
            &Limits::defaults(),
            &EgressPolicy::open(),
            &Sealer::default(),
        )
        .unwrap();
        assert_eq!(none.tasks[0].params.get(), "null");
    }

    /// Parses with small limits and the default guard; `Ok(n)` / `Err(text)` as in `check`.
    fn check_limited(body: &str, expected: Result<usize, &str>) {
        let limits = Limits {
            max_tasks: 3,
            max_params_bytes: 10,
            max_url_len: 30,
            max_depth: 5,
            max_task_timeout_ms: 60_000,
            aws_sigv4_hosts: Vec::new(),
        };
        check_with(body, &limits, &EgressPolicy::guarded(Vec::new()), expected);
    }

    #[test]
    fn limits_hold_at_the_limit_and_refuse_one_past_it() {
        let t = r#"{"endpoint":"/v1/test"}"#;
        check_limited(&format!(r#"{{"tasks":[{t},{t},{t}]}}"#), Ok(3));
        check_limited(
            &format!(r#"{{"tasks":[{t},{t},{t},{t}]}}"#),
            Err("tasks: 4 tasks; at most 3"),
        );
        check_limited(r#"{"tasks":[],"options":{"timeout_ms":60000}}"#, Ok(0));
        check_limited(
            r#"{"tasks":[],"options":{"timeout_ms":60001}}"#,
            Err(
                "options.timeout_ms: must be between 1 and 60000 (this server's --max-task-timeout)",
            ),
        );
        // "1234567890" is 12 bytes with its quotes; 10 digits are 10.
        check_limited(
            r#"{"tasks":[{"endpoint":"/v1/test","params":1234567890}]}"#,
            Ok(1),
        );
        check_limited(
            r#"{"tasks":[{"endpoint":"/v1/test","params":12345678901}]}"#,
            Err("task 1: params are 11 bytes; at most 10"),
        );
        // A URL of exactly 30 characters, then 31.
        let at = "https://example.com/abcdefghij";
        assert_eq!(at.len(), 30);
        check_limited(&format!(r#"{{"tasks":[{{"endpoint":"{at}"}}]}}"#), Ok(1));
        check_limited(
            &format!(r#"{{"tasks":[{{"endpoint":"{at}k"}}]}}"#),
            Err("task 1: endpoint URL is 31 characters long; at most 30"),
        );
        check_limited(
            &format!(r#"{{"callback":"{at}k","tasks":[]}}"#),
            Err("callback: URL is 31 characters long"),
        );
        // Depth: the body's object, tasks' array, the task, then params' nesting.
        check_limited(
            r#"{"tasks":[{"endpoint":"/v1/test","params":[[]]}]}"#,
            Ok(1),
        );
        check_limited(
            r#"{"tasks":[{"endpoint":"/v1/test","params":[[[]]]}]}"#,
            Err("job: JSON is nested 6 levels deep; at most 5"),
        );
        check_limited(
            r#"{"tasks":[{"endpoint":"/v1/test","params":"[[[[[[[["}]}"#,
            Ok(1),
        );
    }

    #[test]
    fn denied_literals_are_refused_at_submission() {
        check_limited(
            r#"{"tasks":[{"endpoint":"/v1/test"},{"endpoint":"http://0x7f.1/"}]}"#,
            Err("task 2: endpoint host 127.0.0.1 is a denied address (loopback)"),
        );
        check_limited(
            r#"{"callback":"http://[::ffff:a9fe:a9fe]/","tasks":[]}"#,
            Err("callback: host ::ffff:169.254.169.254 is a denied address (link-local)"),
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_submission(&bytes, &Limits::defaults(), &EgressPolicy::open(), &Sealer::default());
        }
    }
}
