//! One attempt of one task: the HTTP call, and the single place that decides what its
//! outcome means (complete, retry, or fail for good).

use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde_json::value::RawValue;

use url::Url;

use super::EngineConfig;
use crate::engine::hosts;
use crate::job::{
    BACKOFF_CAP_MS, JobOptions, JobTrace, Method, TEST_ENDPOINT, TaskError, new_span_id,
    query_pairs, result_json, test_result,
};
use crate::outbound::error_chain;
use crate::sealing::{OpenError, Sealer};
use crate::store::{ClaimedTask, Millis, SettleOutcome};
use crate::telemetry::{FinishedSpan, url_attribute};
use crate::webhook::timestamp_now;

/// How much of a failing response's body an error keeps.
const ERROR_BODY_BYTES: usize = 1024;

/// The longest `Retry-After` honoured; a server asking for more is retried after this.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// What one attempt came to, before retry policy is applied.
#[derive(Debug)]
pub enum Attempt {
    Complete(Box<RawValue>),
    /// Worth another attempt; the server may have said when.
    Retryable {
        error: TaskError,
        retry_after: Option<Duration>,
    },
    Fatal(TaskError),
    /// The endpoint answered 202 to a call that carried a task token: it reports the
    /// outcome later (see `crate::task_token`).
    Accepted,
}

/// Where an endpoint that answers 202 posts its outcome: the call's token and the URL.
pub struct ReportTo {
    pub token: String,
    /// Where the outcome goes (`DoParallel-Result-Url`).
    pub url: String,
    /// Where heartbeats go (`DoParallel-Heartbeat-Url`).
    pub heartbeat_url: String,
}

/// Makes the call for `task`: a POST of its params, or the built-in test task in-process.
/// With `report_to`, a 202 answer means the outcome comes later; without (no API to report
/// to, as in `doparallel run`), a 202 is a success like any 2xx.
pub(crate) async fn attempt(
    outbound: &crate::outbound::Outbound,
    task: &ClaimedTask,
    config: &EngineConfig,
    report_to: Option<ReportTo>,
) -> Attempt {
    if task.endpoint == TEST_ENDPOINT {
        return Attempt::Complete(test_result(&task.params));
    }
    // Each attempt is a span of its own in the job's trace, a child of the job's span: its
    // id goes to the endpoint in `traceparent`, and the finished span to the exporter.
    let span_id = task.options.trace.as_ref().map(|_| new_span_id());
    let start = config.telemetry.enabled().then(SystemTime::now);
    let mut status = None;
    let outcome = call(
        outbound,
        task,
        config,
        report_to,
        span_id.as_deref(),
        &mut status,
    )
    .await;
    if let (Some(trace), Some(span_id), Some(start)) = (&task.options.trace, &span_id, start) {
        config
            .telemetry
            .record(call_span(task, trace, span_id, start, status, &outcome));
    }
    outcome
}

/// The span of one attempt: method, URL without query, status, error kind, attempt, job
/// and task.
fn call_span<'a>(
    task: &ClaimedTask,
    trace: &'a JobTrace,
    span_id: &'a str,
    start: SystemTime,
    status: Option<u16>,
    outcome: &Attempt,
) -> FinishedSpan<'a> {
    let method = task.options.method.unwrap_or_default().as_str();
    let mut attributes = vec![
        KeyValue::new("http.request.method", method),
        KeyValue::new("url.full", url_attribute(&task.endpoint)),
        KeyValue::new("doparallel.job_id", task.job_id.to_string()),
        KeyValue::new("doparallel.task_index", task.index as i64),
        KeyValue::new("doparallel.attempt", i64::from(task.attempt)),
    ];
    if let Some(status) = status {
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    let error = match outcome {
        Attempt::Complete(_) | Attempt::Accepted => None,
        Attempt::Retryable { error, .. } | Attempt::Fatal(error) => {
            attributes.push(KeyValue::new("error.type", error.kind.to_string()));
            Some(error.message.clone())
        }
    };
    FinishedSpan {
        trace,
        span_id,
        parent: Some(&trace.span_id),
        parent_is_remote: false,
        name: method,
        kind: SpanKind::Client,
        start,
        end: SystemTime::now(),
        attributes,
        error,
    }
}

/// The call itself; `span_id` is the attempt's span in the job's trace, and `status` is
/// set to the answer's status once there is one.
async fn call(
    outbound: &crate::outbound::Outbound,
    task: &ClaimedTask,
    config: &EngineConfig,
    report_to: Option<ReportTo>,
    span_id: Option<&str>,
    status: &mut Option<u16>,
) -> Attempt {
    // Names are checked by the client's resolver; an IP literal never reaches it.
    let url = match Url::parse(&task.endpoint) {
        Ok(url) => url,
        Err(e) => return Attempt::Fatal(TaskError::new("request", format!("invalid URL: {e}"))),
    };
    if let Err(why) = config.egress.check_url(&url) {
        return Attempt::Fatal(TaskError::new("blocked", why));
    }
    let options = &task.options;
    let timeout = Duration::from_millis(options.timeout_ms);
    let method = options.method.unwrap_or_default();
    let mut url = url;
    // GET and DELETE carry the params as the query string (checked at submission), the
    // others as the JSON body.
    let body: &[u8] = if method.params_in_query() {
        match query_pairs(&task.params) {
            Ok(pairs) if pairs.is_empty() => {}
            Ok(pairs) => add_query(&mut url, &pairs),
            Err(why) => return Attempt::Fatal(TaskError::new("request", why)),
        }
        b""
    } else {
        task.params.get().as_bytes()
    };
    // Stable across attempts and restarts, like the callback's.
    let message_id = format!("msg_{}_{}", task.job_id, task.index);
    let timestamp = timestamp_now();
    let mut request = outbound
        .client()
        .request(http_method(method), url)
        .header("DoParallel-Job-Id", task.job_id.to_string())
        .header("DoParallel-Task", task.index.to_string())
        .header("DoParallel-Attempt", task.attempt.to_string())
        .header("Idempotency-Key", format!("{}:{}", task.job_id, task.index))
        .header("webhook-id", &message_id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(signature) = config.task_signer.signature(&message_id, timestamp, body) {
        request = request.header("webhook-signature", signature);
    }
    if let (Some(trace), Some(span_id)) = (&task.options.trace, span_id) {
        request = request.header("traceparent", trace.traceparent(span_id));
        if let Some(state) = &trace.state {
            request = request.header("tracestate", state);
        }
    }
    let awaitable = report_to.is_some();
    if !method.params_in_query() {
        request = request
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec());
    }
    let mut request = match request.build() {
        Ok(request) => request,
        Err(e) => return transport_error(&e),
    };
    if let Err(error) = add_headers(request.headers_mut(), task) {
        return Attempt::Fatal(error);
    }
    // Headers added after the AWS signature, unsigned: their values must never reach the
    // signing library, whose trace output shows the headers it signs. A secret that does
    // not open fails the attempt before anything is sent.
    let mut late = match open_secrets(task, &config.sealer) {
        Ok(secrets) => secrets,
        Err(attempt) => return attempt,
    };
    if let Some(to) = report_to {
        // The token lets its holder report this task's outcome.
        match (
            HeaderValue::from_str(&to.token),
            HeaderValue::from_str(&to.url),
            HeaderValue::from_str(&to.heartbeat_url),
        ) {
            (Ok(mut token), Ok(url), Ok(heartbeat)) => {
                token.set_sensitive(true);
                late.push((HeaderName::from_static("doparallel-task-token"), token));
                late.push((HeaderName::from_static("doparallel-result-url"), url));
                late.push((
                    HeaderName::from_static("doparallel-heartbeat-url"),
                    heartbeat,
                ));
            }
            _ => {
                return Attempt::Fatal(TaskError::new(
                    "request",
                    "the result URL is not a valid header value",
                ));
            }
        }
    }
    let max_body = config.max_response_bytes;
    // One deadline covers signing (which may fetch credentials), connecting, sending and
    // reading the whole body, so a server that drips its answer cannot hold a slot past the
    // timeout.
    let sent = async {
        // Signed afresh on every attempt; the late headers are not part of the signature
        // (SigV4 lets a request carry unsigned headers). Boxed: the signer's future holds
        // the SDK's credential chain loading, many kilobytes that every call's future would
        // otherwise carry (and copy as it moves) whether it signs or not.
        if let Some(sigv4) = &options.aws_sigv4
            && let Err(why) = Box::pin(config.aws_signer.sign(
                &mut request,
                body,
                &sigv4.service,
                &sigv4.region,
            ))
            .await
        {
            return Attempt::Retryable {
                error: TaskError::new("aws_signing", why),
                retry_after: None,
            };
        }
        for (name, value) in late {
            request.headers_mut().insert(name, value);
        }
        send(outbound, request, max_body, awaitable, options, status).await
    };
    match tokio::time::timeout(timeout, sent).await {
        Ok(outcome) => outcome,
        Err(_) => Attempt::Retryable {
            error: TaskError::new(
                "timeout",
                format!("no complete answer within {} ms", options.timeout_ms),
            ),
            retry_after: None,
        },
    }
}

/// Everything but the unreserved characters of RFC 3986 is percent-encoded in a query.
const QUERY_ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Appends `pairs` to the URL's query (after any it has), each key and value
/// percent-encoded as RFC 3986 and AWS Signature Version 4 want them (a space is `%20`,
/// never `+`), so that a signed query reads the same to the signer and to the service.
fn add_query(url: &mut Url, pairs: &[(String, String)]) {
    use percent_encoding::utf8_percent_encode as encode;
    let mut query = url.query().unwrap_or_default().to_string();
    for (key, value) in pairs {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(&format!(
            "{}={}",
            encode(key, QUERY_ESCAPED),
            encode(value, QUERY_ESCAPED)
        ));
    }
    url.set_query(Some(&query));
}

/// Says why a header cannot be sent, naming it and never its value.
fn refused(name: &str, why: String) -> TaskError {
    TaskError::new("request", format!("header {name} cannot be sent: {why}"))
}

/// The job's and the task's plain headers on a built request, each replacing one of the
/// same name (a `Content-Type` of the job's replaces DoParallel's). Names and values were
/// checked at submission; one that no longer passes fails the attempt for good.
fn add_headers(headers: &mut HeaderMap, task: &ClaimedTask) -> Result<(), TaskError> {
    for (name, value) in &task.options.headers {
        let header =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| refused(name, e.to_string()))?;
        let value = HeaderValue::from_str(value).map_err(|e| refused(name, e.to_string()))?;
        headers.insert(header, value);
    }
    Ok(())
}

/// The secret headers of a call, opened for this request only and marked sensitive so
/// that no debug output shows them. One that does not open fails the attempt, saying which
/// header and which key it needs, never its value: sealed under a key this node lacks, it
/// is retried like a connection error (during a rolling key change another node, or this
/// one restarted, may have it); damaged, it fails for good.
fn open_secrets(
    task: &ClaimedTask,
    sealer: &Sealer,
) -> Result<Vec<(HeaderName, HeaderValue)>, Attempt> {
    if task.options.secret_headers.is_empty() {
        return Ok(Vec::new());
    }
    let job = task.job_id.to_string();
    let mut opened_headers = Vec::with_capacity(task.options.secret_headers.len());
    for (name, sealed) in &task.options.secret_headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Attempt::Fatal(refused(name, e.to_string())))?;
        let opened = sealer.open(&job, name, sealed).map_err(|e| {
            let error = TaskError::new(
                "secret",
                format!("secret header {name} cannot be opened: {e}"),
            );
            match e {
                OpenError::UnknownKey(_) => Attempt::Retryable {
                    error,
                    retry_after: None,
                },
                OpenError::Damaged => Attempt::Fatal(error),
            }
        })?;
        let mut value = HeaderValue::from_str(&opened).map_err(|_| {
            Attempt::Fatal(refused(
                name,
                "its value is not a valid header value".into(),
            ))
        })?;
        value.set_sensitive(true);
        opened_headers.push((header, value));
    }
    Ok(opened_headers)
}

fn http_method(method: Method) -> reqwest::Method {
    match method {
        Method::Get => reqwest::Method::GET,
        Method::Post => reqwest::Method::POST,
        Method::Put => reqwest::Method::PUT,
        Method::Patch => reqwest::Method::PATCH,
        Method::Delete => reqwest::Method::DELETE,
    }
}

async fn send(
    outbound: &crate::outbound::Outbound,
    request: reqwest::Request,
    max_body: usize,
    awaitable: bool,
    options: &JobOptions,
    status_seen: &mut Option<u16>,
) -> Attempt {
    let mut request = request;
    let mut wait = Duration::from_millis(20);
    let mut response = loop {
        let again = request.try_clone();
        // The client of the moment: a call that waited must not hold on to a replaced one,
        // whose idle sockets close only once nobody holds it.
        match outbound.client().execute(request).await {
            Ok(r) => break r,
            // Refused by this process's own open-file limit, not by the endpoint: the idle
            // outgoing connections are let go, and the call waits for a descriptor and tries
            // again, within its timeout, rather than fail.
            Err(e) if crate::outbound::out_of_descriptors(&e) && again.is_some() => {
                if wait == Duration::from_millis(20) {
                    tracing::warn!("every file descriptor is in use; the call waits for one");
                }
                outbound.out_of_descriptors();
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
                request = again.expect("checked");
            }
            Err(e) => return transport_error(&e),
        }
    };
    let status = response.status();
    *status_seen = Some(status.as_u16());
    if response
        .content_length()
        .is_some_and(|n| n > max_body as u64)
    {
        return Attempt::Fatal(too_large(status, max_body));
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max_body {
                    return Attempt::Fatal(too_large(status, max_body));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return transport_error(&e),
        }
    }
    if awaitable && status == StatusCode::ACCEPTED {
        return Attempt::Accepted;
    }
    match classify(
        status,
        response.headers(),
        &body,
        SystemTime::now(),
        options,
    ) {
        // The stored form is bounded too: a body that is not JSON becomes a JSON string, and
        // one of control bytes grows six times as it does. Allowed: the two quotes, so that
        // a plain text of exactly the limit is kept.
        Attempt::Complete(result) if result.get().len() > max_body + 2 => {
            Attempt::Fatal(TaskError {
                kind: "response_too_large".into(),
                http_status: Some(status.as_u16()),
                message: format!(
                    "response body stored as JSON takes {} bytes, more than {max_body}",
                    result.get().len()
                ),
                body: None,
                cause: None,
            })
        }
        attempt => attempt,
    }
}

fn too_large(status: StatusCode, max_body: usize) -> TaskError {
    TaskError {
        kind: "response_too_large".into(),
        http_status: Some(status.as_u16()),
        message: format!("response body is larger than {max_body} bytes"),
        body: None,
        cause: None,
    }
}

fn transport_error(e: &reqwest::Error) -> Attempt {
    // reqwest names the URL; its query (a GET's params) and user information stay out of
    // the error, which is shown, sent in the callback and put in the attempt's span.
    let chain = match e.url() {
        Some(url) => error_chain(e).replace(url.as_str(), &url_attribute(url.as_str())),
        None => error_chain(e),
    };
    if crate::egress::is_blocked(e) {
        // A name that resolves to a denied address: no connection was made, and another
        // attempt would be refused the same way.
        let mut error = TaskError::new("blocked", chain);
        error.cause = innermost_cause(e);
        return Attempt::Fatal(error);
    }
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    let mut error = TaskError::new(kind, chain);
    error.cause = innermost_cause(e);
    Attempt::Retryable {
        error,
        retry_after: None,
    }
}

/// The most specific part of an error's chain: its innermost error, preceded by the one
/// that names what it is about when that one is short (`dns error: Name or service not
/// known` rather than the bare `Name or service not known`). `None` when the error has no
/// source (its message says it all).
fn innermost_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut chain: Vec<String> = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let last = chain.pop()?;
    match chain.pop() {
        // hyper-util's `dns error` / `tcp connect error` wrap the io error without its text.
        Some(outer) if outer.len() <= 24 && !last.starts_with(&outer) => {
            Some(format!("{outer}: {last}"))
        }
        _ => Some(last),
    }
}

/// The decision on a complete HTTP answer. 2xx completes; the statuses of the job's (or
/// task's) `retry_on`, by default 408, 425, 429 and 5xx, are worth another attempt;
/// anything else (3xx, since redirects are never followed, and other 4xx) fails at once.
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
    options: &JobOptions,
) -> Attempt {
    if status.is_success() {
        return Attempt::Complete(result_json(body));
    }
    let error = TaskError {
        kind: "http_status".into(),
        http_status: Some(status.as_u16()),
        message: format!("endpoint answered {status}"),
        body: (!body.is_empty()).then(|| {
            String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_BYTES)]).into_owned()
        }),
        cause: None,
    };
    if options.retries_status(status.as_u16()) {
        Attempt::Retryable {
            error,
            retry_after: retry_after(headers, now),
        }
    } else {
        Attempt::Fatal(error)
    }
}

/// How long every call to the host should wait after this attempt: the host's
/// `Retry-After` on a 429 ([`hosts::DEFAULT_PAUSE`] without one), or on a 503 that has one.
/// Other answers say nothing about the host as a whole: a 503 without `Retry-After` may be
/// one failing request, and a timeout or a 500 is retried by its task alone.
pub fn host_pause(attempt: &Attempt) -> Option<Duration> {
    let Attempt::Retryable { error, retry_after } = attempt else {
        return None;
    };
    match error.http_status {
        Some(429) => Some(retry_after.unwrap_or(hosts::DEFAULT_PAUSE)),
        Some(503) => *retry_after,
        _ => None,
    }
    .filter(|delay| !delay.is_zero())
}

/// What an attempt says about its host's capacity, for the host's adaptive limit and its
/// breaker (see `hosts::adaptive`): an answer and its latency; overload (a 429 or a 503,
/// a timeout); a host that answered something else (a retryable 5xx, a request error after
/// connecting: reachable, nothing more); no connection at all; or nothing (the call never
/// reached the network: blocked, refused before sending).
pub fn host_signal(attempt: &Attempt, latency: Duration) -> hosts::adaptive::Signal {
    use hosts::adaptive::Signal;
    let (error, retryable) = match attempt {
        Attempt::Complete(_) | Attempt::Accepted => return Signal::Answered(latency),
        Attempt::Fatal(error) => (error, false),
        Attempt::Retryable { error, .. } => (error, true),
    };
    match (error.kind.as_ref(), error.http_status) {
        (_, Some(429 | 503)) => Signal::Overloaded,
        ("timeout", _) => Signal::TimedOut,
        ("connect", _) => Signal::Unreachable,
        // Never reached the network.
        ("aws_signing", _) => Signal::Nothing,
        // A 4xx is an answer like a 2xx; a retryable status says the host is there.
        ("http_status", Some(_)) if !retryable => Signal::Answered(latency),
        ("http_status" | "response_too_large", _) => Signal::Reachable,
        _ if retryable => Signal::Reachable,
        _ => Signal::Nothing,
    }
}

/// `Retry-After` as seconds or as an HTTP date, capped at [`RETRY_AFTER_CAP`].
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(delay.min(RETRY_AFTER_CAP))
}

/// The first retry waits up to `backoff_ms`, each further one up to twice the previous,
/// capped at a minute; the actual wait is drawn uniformly below that bound ("full jitter"),
/// so that many tasks failing together do not come back together.
pub fn backoff(options: &JobOptions, attempt: u32, rng: &mut impl Rng) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let bound = options
        .backoff_ms
        .saturating_mul(1u64 << exp)
        .min(BACKOFF_CAP_MS);
    Duration::from_millis(rng.random_range(0..=bound))
}

/// Applies the retry policy to an attempt made at `now` (`attempt` counting from 1).
pub fn settle_outcome(
    options: &JobOptions,
    attempt: u32,
    outcome: Attempt,
    now: Millis,
    rng: &mut impl Rng,
) -> SettleOutcome {
    match outcome {
        Attempt::Complete(result) => SettleOutcome::Complete { result },
        Attempt::Accepted => {
            let until = now + options.async_timeout_ms as Millis;
            SettleOutcome::Await {
                // With heartbeats, the first is due within their interval.
                deadline: crate::store::plan::heartbeat_deadline(options, until, now)
                    .unwrap_or(until),
                until,
            }
        }
        Attempt::Fatal(error) => SettleOutcome::Failed {
            error: error.to_json(),
        },
        Attempt::Retryable { error, .. } if attempt >= options.max_attempts => {
            SettleOutcome::Failed {
                error: error.to_json(),
            }
        }
        Attempt::Retryable { error, retry_after } => {
            let delay = backoff(options, attempt, rng).max(retry_after.unwrap_or_default());
            SettleOutcome::Retry {
                run_at: now + delay.as_millis() as Millis,
                error: error.to_json(),
            }
        }
    }
}

#[cfg(test)]
mod tests;
