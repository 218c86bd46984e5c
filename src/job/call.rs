//! How a task's endpoint is called: the method, the headers (plain and secret), the
//! settings one task may set for itself, and the AWS signature. A job's options give the
//! defaults for all its tasks; a task's own settings (its [`TaskCall`]) are merged over
//! them once, when the task is claimed ([`JobOptions::for_task`]), so the engine reads one
//! set of options per call.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::JobOptions;
use crate::sealing::Sealer;

/// Header name to value. In a stored job, the values of secret headers are sealed
/// ([`crate::sealing`]); in what the API shows, they are `***`.
pub type Headers = BTreeMap<String, String>;

/// What a read shows in place of a secret header's value.
pub const MASK: &str = "***";

/// Most headers of one call (the job's and the task's, plain and secret, together).
pub const MAX_HEADERS: usize = 64;

/// Most bytes of the headers of one call (names and values).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// The HTTP method of a task's calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    #[default]
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    /// Whether the params travel as the query string instead of a JSON body.
    pub fn params_in_query(self) -> bool {
        matches!(self, Method::Get | Method::Delete)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// Sign each call with AWS Signature Version 4, with the server's AWS credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsSigV4 {
    /// The signing name of the service: `lambda` for a function URL, `execute-api` for API
    /// Gateway.
    pub service: String,
    /// The region of the endpoint, e.g. `us-east-1`.
    pub region: String,
}

/// The settings one task may override, for itself only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// The HTTP statuses retried for this task, replacing the job's list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<u16>>,
}

impl TaskOptions {
    pub fn is_empty(&self) -> bool {
        *self == TaskOptions::default()
    }
}

/// A task's own call settings, as submitted (`tasks[].method`, `headers`,
/// `secret_headers`, `aws_sigv4`, `options`) and as stored with the task (secret values
/// sealed). Empty for most tasks, which are then stored without it. Read leniently (no
/// `deny_unknown_fields`): the API's task view flattens it, and a client must read a newer
/// server's view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: Headers,
    /// Values are sealed at rest and shown as `***`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_headers: Headers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_sigv4: Option<AwsSigV4>,
    #[serde(default, skip_serializing_if = "TaskOptions::is_empty")]
    pub options: TaskOptions,
}

impl TaskCall {
    pub fn is_empty(&self) -> bool {
        *self == TaskCall::default()
    }

    /// The same with secret values shown as `***`.
    pub fn masked(&self) -> TaskCall {
        TaskCall {
            secret_headers: mask(&self.secret_headers),
            ..self.clone()
        }
    }
}

/// The same headers with every value `***`.
pub fn mask(headers: &Headers) -> Headers {
    headers
        .keys()
        .map(|name| (name.clone(), MASK.to_string()))
        .collect()
}

impl JobOptions {
    /// The options one task's calls are made with: the job's, with the task's own settings
    /// over them. A task's header (plain or secret) replaces the job's of the same name,
    /// whatever its case.
    pub fn for_task(&self, call: &TaskCall) -> JobOptions {
        let overridden = |name: &String| {
            call.headers
                .keys()
                .chain(call.secret_headers.keys())
                .any(|own| own.eq_ignore_ascii_case(name))
        };
        let merge = |job: &Headers, task: &Headers| -> Headers {
            job.iter()
                .filter(|(name, _)| !overridden(name))
                .chain(task.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let o = &call.options;
        JobOptions {
            method: call.method.or(self.method),
            headers: merge(&self.headers, &call.headers),
            secret_headers: merge(&self.secret_headers, &call.secret_headers),
            aws_sigv4: call.aws_sigv4.clone().or_else(|| self.aws_sigv4.clone()),
            timeout_ms: o.timeout_ms.unwrap_or(self.timeout_ms),
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
            backoff_ms: o.backoff_ms.unwrap_or(self.backoff_ms),
            retry_on: o.retry_on.clone().or_else(|| self.retry_on.clone()),
            ..self.clone()
        }
    }

    /// The same with secret values shown as `***`.
    pub fn masked(&self) -> JobOptions {
        JobOptions {
            secret_headers: mask(&self.secret_headers),
            trace: None,
            ..self.clone()
        }
    }

    /// Whether an answer with this status is worth another attempt: the job's (or task's)
    /// `retry_on` list, else 408, 425, 429 and every 5xx.
    pub fn retries_status(&self, status: u16) -> bool {
        match &self.retry_on {
            Some(list) => list.contains(&status),
            None => matches!(status, 408 | 425 | 429) || (500..=599).contains(&status),
        }
    }
}

/// Headers DoParallel sets itself or that belong to the connection; no job may set them.
fn reserved(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "idempotency-key"
            | "traceparent"
            | "tracestate"
            | "upgrade"
            | "te"
            | "trailer"
            | "keep-alive"
            | "proxy-connection"
            | "expect"
    ) || name.starts_with("doparallel-")
        || name.starts_with("webhook-")
}

/// Headers the AWS signature sets: a signed call may not set them too.
fn signed_by_aws(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "authorization" || name.starts_with("x-amz-")
}

/// Checks one map of headers (`field` names it in messages: `options.headers`,
/// `task 3: secret_headers`): valid names, no reserved name, no name twice, values without
/// CR, LF, NUL or other control characters but tab.
pub fn check_headers(field: &str, headers: &Headers) -> Result<(), String> {
    let mut seen: Vec<String> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!(
                "{field}: {name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
            ));
        }
        if reserved(name) {
            return Err(format!(
                "{field}: {name} cannot be set: DoParallel or the connection sets it (Host, \
                 Content-Length, Transfer-Encoding, Connection, Upgrade, TE, Trailer, \
                 Keep-Alive, Expect, Idempotency-Key, traceparent, tracestate, DoParallel-* and \
                 webhook-* are reserved)"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if seen.contains(&lower) {
            return Err(format!(
                "{field}: {name} is given twice (header names ignore case)"
            ));
        }
        seen.push(lower);
        if let Some(c) = value
            .chars()
            .find(|&c| (c.is_ascii_control() && c != '\t') || c == '\u{7f}')
        {
            let what = match c {
                '\r' => "a carriage return (CR)".to_string(),
                '\n' => "a line feed (LF)".to_string(),
                '\0' => "a NUL".to_string(),
                c => format!("the control character U+{:04X}", c as u32),
            };
            return Err(format!("{field}: the value of {name} holds {what}"));
        }
    }
    Ok(())
}

/// Checks the headers one call will carry, merged (`options` are the task's merged
/// options; `place` is `options` for a job's own, `task N` for a task's): none named in
/// both plain and secret maps of one level, none the AWS signature sets when it signs, and
/// within [`MAX_HEADERS`] and [`MAX_HEADER_BYTES`].
pub fn check_call_headers(place: &str, options: &JobOptions) -> Result<(), String> {
    if let Some(name) = options.headers.keys().find(|name| {
        options
            .secret_headers
            .keys()
            .any(|s| s.eq_ignore_ascii_case(name))
    }) {
        return Err(format!(
            "{place}: {name} is both a header and a secret header"
        ));
    }
    if options.aws_sigv4.is_some()
        && let Some(name) = options
            .headers
            .keys()
            .chain(options.secret_headers.keys())
            .find(|name| signed_by_aws(name))
    {
        return Err(format!(
            "{place}: {name} cannot be set on a call signed with aws_sigv4: the signature sets it"
        ));
    }
    // Secret headers are added after signing (see `engine::call`): one that replaced a
    // signed header would break the signature.
    if options.aws_sigv4.is_some()
        && let Some(name) = options
            .secret_headers
            .keys()
            .find(|name| name.eq_ignore_ascii_case("content-type"))
    {
        return Err(format!(
            "{place}: {name} cannot be a secret header on a call signed with aws_sigv4 (the \
             signature covers it): make it a plain header"
        ));
    }
    // A signed header must be text; secret ones are not signed (see `engine::call`).
    if options.aws_sigv4.is_some()
        && let Some(name) = options
            .headers
            .iter()
            .find(|(_, v)| !v.is_ascii())
            .map(|(n, _)| n)
    {
        return Err(format!(
            "{place}: the value of {name} is not ASCII, which a call signed with aws_sigv4 cannot carry"
        ));
    }
    let count = options.headers.len() + options.secret_headers.len();
    if count > MAX_HEADERS {
        return Err(format!(
            "{place}: {count} headers per call; at most {MAX_HEADERS} are accepted"
        ));
    }
    let bytes: usize = options
        .headers
        .iter()
        .chain(options.secret_headers.iter())
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(format!(
            "{place}: the headers of one call take {bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"
        ));
    }
    Ok(())
}

/// Checks a `retry_on` list (`field` names it).
pub fn check_retry_on(field: &str, list: &[u16]) -> Result<(), String> {
    if let Some(status) = list.iter().find(|s| !(300..=599).contains(*s)) {
        return Err(format!(
            "{field}: {status} is not a status worth retrying (give statuses from 300 to 599)"
        ));
    }
    if list.len() > 300 {
        return Err(format!("{field}: at most 300 statuses"));
    }
    Ok(())
}

/// Whether a call to `url` may be signed with the server's AWS identity: a Lambda function
/// URL (`*.lambda-url.REGION.on.aws`) for `lambda`, an API Gateway endpoint
/// (`*.execute-api.REGION.amazonaws.com`) for `execute-api`, in the signature's region, or
/// a host the operator named (`--aws-sigv4-host`, for custom domains). Anything else would
/// let any client make the server sign requests to any AWS API (S3, STS, IAM ...) as
/// itself.
pub fn check_sigv4_host(
    url: &url::Url,
    sigv4: &AwsSigV4,
    allowed: &[String],
) -> Result<(), String> {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(&host)) {
        return Ok(());
    }
    let region = sigv4.region.to_ascii_lowercase();
    let aws_host = match sigv4.service.as_str() {
        "lambda" => Some(format!(".lambda-url.{region}.on.aws")),
        "execute-api" => Some(format!(".execute-api.{region}.amazonaws.com")),
        _ => None,
    };
    if let Some(suffix) = aws_host
        && host.ends_with(&suffix)
        && host.len() > suffix.len()
        && url.scheme() == "https"
    {
        return Ok(());
    }
    Err(format!(
        "aws_sigv4: calls to {host} are not signed: only https Lambda function URLs \
         (*.lambda-url.{region}.on.aws, service lambda) and API Gateway endpoints \
         (*.execute-api.{region}.amazonaws.com, service execute-api) of the signature's region \
         are, and the hosts this server names with --aws-sigv4-host"
    ))
}

/// Checks an `aws_sigv4` setting (`field` names it).
pub fn check_sigv4(field: &str, sigv4: &AwsSigV4) -> Result<(), String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    if !ok(&sigv4.service) {
        return Err(format!(
            "{field}.service: {:?} is not a service signing name (e.g. lambda, execute-api)",
            sigv4.service
        ));
    }
    if !ok(&sigv4.region) {
        return Err(format!(
            "{field}.region: {:?} is not a region (e.g. us-east-1)",
            sigv4.region
        ));
    }
    Ok(())
}

/// The params of a `GET` or `DELETE` as query pairs: `null` is none, an object of strings,
/// numbers and booleans is one pair per key (a number as written), anything else is an
/// error that says what was given.
pub fn query_pairs(params: &RawValue) -> Result<Vec<(String, String)>, String> {
    if params.get() == "null" {
        return Ok(Vec::new());
    }
    let Ok(Pairs(pairs)) = serde_json::from_str::<Pairs>(params.get()) else {
        return Err(
            "params must be an object of strings, numbers and booleans for GET and DELETE \
             (they become the query string)"
                .into(),
        );
    };
    let mut out = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        let text = value.get();
        let value = match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(text).map_err(|e| e.to_string())?,
            Some(b't' | b'f' | b'-' | b'0'..=b'9') => text.to_string(),
            _ => {
                return Err(format!(
                    "params.{key} must be a string, a number or a boolean for GET and DELETE \
                     (params become the query string)"
                ));
            }
        };
        out.push((key, value));
    }
    Ok(out)
}

/// A JSON object's members in the order written, each value as its text.
struct Pairs(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Pairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, Box<RawValue>>()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Seals every value of `headers` for job `job` (after [`check_headers`]); an error when the
/// server has no key.
pub fn seal_headers(sealer: &Sealer, job: &str, headers: &mut Headers) -> Result<(), String> {
    for (name, value) in headers.iter_mut() {
        *value = sealer
            .seal(job, name, value)
            .ok_or_else(|| crate::sealing::NO_KEY.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_task_header_replaces_the_jobs_whatever_its_case_and_kind() {
        let job = JobOptions {
            headers: headers(&[("X-A", "job"), ("X-B", "job")]),
            secret_headers: headers(&[("Authorization", "job-token")]),
            timeout_ms: 1000,
            ..JobOptions::defaults()
        };
        let call = TaskCall {
            headers: headers(&[("x-a", "task"), ("authorization", "plain")]),
            options: TaskOptions {
                timeout_ms: Some(5),
                retry_on: Some(vec![]),
                ..Default::default()
            },
            ..Default::default()
        };
        let merged = job.for_task(&call);
        assert_eq!(
            merged.headers,
            headers(&[("X-B", "job"), ("authorization", "plain"), ("x-a", "task")])
        );
        assert!(merged.secret_headers.is_empty());
        assert_eq!(merged.timeout_ms, 5);
        assert_eq!(merged.max_attempts, job.max_attempts);
        assert!(!merged.retries_status(503));
        assert!(job.retries_status(503) && job.retries_status(429) && !job.retries_status(404));
    }

    #[test]
    fn header_checks_name_what_is_wrong() {
        let check = |pairs: &[(&str, &str)]| check_headers("options.headers", &headers(pairs));
        assert!(check(&[("X-Api-Key", "a\tb"), ("Accept", "*/*")]).is_ok());
        for (pairs, expected) in [
            (vec![("Bad Name", "v")], "is not a valid header name"),
            (vec![("Host", "v")], "Host cannot be set"),
            (vec![("doparallel-task", "v")], "cannot be set"),
            (vec![("Webhook-Id", "v")], "cannot be set"),
            (
                vec![("X-A", "a\r\nX-Evil: 1")],
                "holds a carriage return (CR)",
            ),
            (vec![("X-A", "a\nb")], "holds a line feed (LF)"),
            (vec![("X-A", "a\0b")], "holds a NUL"),
            (vec![("X-A", "1"), ("x-a", "2")], "given twice"),
        ] {
            let e = check(&pairs).unwrap_err();
            assert!(e.contains(expected), "{pairs:?}: {e}");
            assert!(e.starts_with("options.headers: "), "{e}");
        }
    }

    #[test]
    fn only_aws_hosts_of_the_region_and_named_ones_are_signed() {
        let sigv4 = |service: &str| AwsSigV4 {
            service: service.into(),
            region: "us-east-1".into(),
        };
        let check = |url: &str, service: &str, allowed: &[&str]| {
            let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
            check_sigv4_host(&url.parse().unwrap(), &sigv4(service), &allowed)
        };
        assert!(check("https://abc.lambda-url.us-east-1.on.aws/", "lambda", &[]).is_ok());
        assert!(
            check(
                "https://x.execute-api.us-east-1.amazonaws.com/p",
                "execute-api",
                &[]
            )
            .is_ok()
        );
        for (url, service) in [
            ("https://abc.lambda-url.eu-west-1.on.aws/", "lambda"),
            ("http://abc.lambda-url.us-east-1.on.aws/", "lambda"),
            ("https://lambda-url.us-east-1.on.aws/", "lambda"),
            ("https://abc.lambda-url.us-east-1.on.aws/", "execute-api"),
            ("https://s3.amazonaws.com/bucket/key", "s3"),
            ("https://sts.amazonaws.com/?Action=GetCallerIdentity", "sts"),
            (
                "https://lambda.us-east-1.amazonaws.com/2015-03-31/functions/f/invocations",
                "lambda",
            ),
            (
                "https://evil.example/x.lambda-url.us-east-1.on.aws",
                "lambda",
            ),
        ] {
            let e = check(url, service, &[]).unwrap_err();
            assert!(e.contains("are not signed"), "{url}: {e}");
        }
        assert!(check("http://127.0.0.1:9/", "lambda", &["127.0.0.1"]).is_ok());
        assert!(
            check(
                "https://API.example.com/",
                "execute-api",
                &["api.example.com"]
            )
            .is_ok()
        );
    }

    #[test]
    fn query_pairs_keep_the_order_and_the_digits() {
        let raw = |s: &str| RawValue::from_string(s.to_string()).unwrap();
        assert_eq!(
            query_pairs(&raw(r#"{"z":"a b","n":1.50,"t":true}"#)).unwrap(),
            vec![
                ("z".to_string(), "a b".to_string()),
                ("n".to_string(), "1.50".to_string()),
                ("t".to_string(), "true".to_string())
            ]
        );
        assert!(query_pairs(&raw("null")).unwrap().is_empty());
        assert!(
            query_pairs(&raw("[1]"))
                .unwrap_err()
                .contains("must be an object")
        );
        assert!(
            query_pairs(&raw(r#"{"a":{"b":1}}"#))
                .unwrap_err()
                .contains("params.a must be")
        );
        assert!(
            query_pairs(&raw(r#"{"a":null}"#))
                .unwrap_err()
                .contains("params.a must be")
        );
    }
}
