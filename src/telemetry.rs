//! Spans of jobs, task call attempts and callback attempts, exported with OpenTelemetry's
//! OTLP exporter (HTTP, protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the standard `OTEL_*` variables configure
//! it (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_SDK_DISABLED`, ...).
//!
//! The spans are built here as finished records with the ids the job's trace context
//! gave them (`crate::job::JobTrace`): a job's span has the id chosen at submission and
//! ends when its callback is delivered or given up, perhaps on another node or after a
//! restart, so it cannot be a live span of this process. (That is also why spans do not
//! come from `tracing` through tracing-opentelemetry, which picks span ids itself.)
//!
//! Exporting never holds up the engine: a finished span goes into a bounded queue with
//! `try_send`, a task of its own sends batches, and a span that finds the queue full, or
//! whose batch the collector refuses, is dropped and counted
//! (`doparallel_trace_spans_dropped_total`). Spans of traces the caller did not sample
//! (its `traceparent` flags) are not exported. The collector's address is the operator's
//! configuration, not a job's: it is reached without the outbound address guard.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

use crate::job::JobTrace;

/// Finished spans waiting for the exporter; past this, new ones are dropped.
const QUEUE: usize = 8192;

/// Most spans in one export request.
const BATCH: usize = 512;

/// The exporter of this node's spans; inert unless the environment configures one.
#[derive(Debug)]
pub struct Telemetry {
    queue: Option<mpsc::Sender<Queued>>,
    dropped: Counter,
}

/// What the export task is handed: a span, or a request to send everything before it.
#[derive(Debug)]
enum Queued {
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

/// One finished span, in the trace of a job.
pub struct FinishedSpan<'a> {
    pub trace: &'a JobTrace,
    pub span_id: &'a str,
    /// The span's parent: the job's span for an attempt, the submitting request's span
    /// (if any) for the job's, which is another service's (remote).
    pub parent: Option<&'a str>,
    pub parent_is_remote: bool,
    pub name: &'static str,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

impl Telemetry {
    /// A telemetry that exports nothing.
    pub fn disabled() -> Self {
        Telemetry {
            queue: None,
            dropped: Counter::default(),
        }
    }

    /// The exporter the `OTEL_*` environment asks for, counting its drops in `dropped`;
    /// inert without an endpoint. Needs a Tokio runtime (its export task).
    pub fn from_env(dropped: Counter) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        if endpoint.is_none() || disabled {
            return Telemetry {
                queue: None,
                dropped,
            };
        }
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
        {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the OTLP client; no spans are exported");
                return Telemetry {
                    queue: None,
                    dropped,
                };
            }
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(OtlpClient(client))
            .build();
        let mut exporter = match exporter {
            Ok(exporter) => exporter,
            Err(e) => {
                tracing::error!(error = %e, "the OTLP exporter's configuration is invalid; no spans are exported");
                return Telemetry {
                    queue: None,
                    dropped,
                };
            }
        };
        let mut resource = Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("doparallel");
        }
        exporter.set_resource(&resource.build());
        let (queue, spans) = mpsc::channel(QUEUE);
        tokio::spawn(export(exporter, spans, dropped.clone()));
        tracing::info!(
            endpoint = endpoint.as_deref().unwrap_or_default(),
            "exporting spans over OTLP/HTTP"
        );
        Telemetry {
            queue: Some(queue),
            dropped,
        }
    }

    /// Whether spans are exported at all (callers skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues a finished span for export, or drops and counts it when the queue is full.
    pub fn record(&self, span: FinishedSpan<'_>) {
        let Some(queue) = &self.queue else {
            return;
        };
        if !span.trace.sampled {
            return;
        }
        let Some(data) = span_data(span) else {
            return;
        };
        if queue.try_send(Queued::Span(Box::new(data))).is_err() {
            self.dropped.inc();
        }
    }

    /// Counts spans lost before they were built (an event this node missed).
    pub fn count_dropped(&self, n: u64) {
        if self.enabled() {
            self.dropped.inc_by(n);
        }
    }

    /// Sends every span queued so far, waiting at most `limit`: a node that stops (or
    /// `doparallel run` at its end) flushes, so that its last spans, often the job's own,
    /// are not lost with the process.
    pub async fn flush(&self, limit: Duration) {
        let Some(queue) = &self.queue else {
            return;
        };
        let (done, flushed) = oneshot::channel();
        let sent = tokio::time::timeout(limit, async {
            if queue.send(Queued::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        })
        .await;
        if sent.is_err() {
            tracing::warn!("spans still queued at shutdown were not all exported in time");
        }
    }
}

/// What a job's span says of it, at its end.
pub struct JobEnd<'a> {
    pub job_id: &'a str,
    pub status: &'static str,
    pub tasks: u64,
    /// When it was submitted, in Unix milliseconds.
    pub created_at_ms: i64,
    /// Where its callback ended: `delivered`, `failed`, or `none` without one.
    pub callback: &'static str,
}

impl Telemetry {
    /// Records the span of a job, from its submission to now: the end of its callback's
    /// delivery, or, without a callback, its last settle.
    pub fn job_ended(&self, trace: &JobTrace, job: JobEnd<'_>) {
        if !self.enabled() {
            return;
        }
        let start = SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(job.created_at_ms).unwrap_or(0));
        self.record(FinishedSpan {
            trace,
            span_id: &trace.span_id,
            parent: trace.parent_span_id.as_deref(),
            parent_is_remote: trace.parent_span_id.is_some(),
            name: "job",
            kind: SpanKind::Internal,
            start,
            end: SystemTime::now(),
            attributes: vec![
                KeyValue::new("doparallel.job_id", job.job_id.to_string()),
                KeyValue::new("doparallel.job.status", job.status),
                KeyValue::new("doparallel.job.tasks", job.tasks as i64),
                KeyValue::new("doparallel.callback.state", job.callback),
            ],
            error: (job.status != "Complete").then(|| format!("the job ended {}", job.status)),
        });
    }
}

/// A URL as a span may show it: without its query, fragment and user information (a
/// token is often in one of them).
pub fn url_attribute(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut url) => {
            url.set_query(None);
            url.set_fragment(None);
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => String::new(),
    }
}

/// The span as the exporter takes it; `None` for ids that are not hex (a stored trace of
/// another shape), which cannot be exported.
fn span_data(span: FinishedSpan<'_>) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(&span.trace.trace_id).ok()?;
    let span_id = SpanId::from_hex(span.span_id).ok()?;
    let parent_span_id = match span.parent {
        Some(parent) => SpanId::from_hex(parent).ok()?,
        None => SpanId::INVALID,
    };
    let state = span
        .trace
        .state
        .as_deref()
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    Some(SpanData {
        span_context: SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, state),
        parent_span_id,
        parent_span_is_remote: span.parent_is_remote,
        span_kind: span.kind,
        name: Cow::Borrowed(span.name),
        start_time: span.start,
        end_time: span.end.max(span.start),
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match span.error {
            Some(why) => Status::error(why),
            None => Status::Unset,
        },
        instrumentation_scope: InstrumentationScope::builder("doparallel")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    })
}

/// Sends what has queued, a batch at a time, until every sender is gone.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queue: mpsc::Receiver<Queued>,
    dropped: Counter,
) {
    let mut failures: u64 = 0;
    while let Some(first) = queue.recv().await {
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Queued::Span(span) => batch.push(*span),
                // Answered once what came before it is sent.
                Queued::Flush(done) => flushes.push(done),
            }
            if batch.len() < BATCH {
                next = queue.try_recv().ok();
            }
        }
        let n = batch.len() as u64;
        if n > 0
            && let Err(e) = exporter.export(batch).await
        {
            dropped.inc_by(n);
            failures += 1;
            // The first failure, then one in a hundred: a collector that is down must not
            // fill the log.
            if failures % 100 == 1 {
                tracing::warn!(error = %e, spans = n, failures, "exporting spans failed; they are dropped");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// The exporter's HTTP client: this crate's reqwest (rustls), so that the exporter brings
/// no TLS stack of its own.
#[derive(Debug)]
struct OtlpClient(reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        let mut answer = Response::builder().status(status).body(body)?;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}
