//! The callback outbox: sends the callbacks that the store makes due in the transaction that
//! finishes a job, until each is delivered or its retry schedule runs out.
//!
//! Each attempt leases its record first, so a crash mid-send leaves it due again: callbacks
//! are delivered at least once, and every attempt of one job carries the same `webhook-id`,
//! which is what a receiver deduplicates on. A delivery streams the document from the store
//! (`crate::document`). The outbox imports neither the API nor the engine: it is woken by the
//! bus, and tells the bus when a callback settled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::task::JoinHandle;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::bus::{Bus, Event};
use crate::document::{document_stream, feed_document, head_only};
use crate::egress::EgressPolicy;
use crate::job::{JobId, JobTrace, new_span_id};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, error_chain};
use crate::store::{
    CallbackDue, CallbackOutcome, CallbackRecord, JobRecord, Store, StoreResult, now_millis,
};
use crate::telemetry::{FinishedSpan, JobEnd, Telemetry, url_attribute};
use crate::webhook::{CallbackSigners, timestamp_now, webhook_id};

/// How callbacks are sent.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// Delays between attempts after the first; its length plus one is the number of
    /// attempts before a callback is given up.
    pub schedule: Vec<Duration>,
    /// How long one attempt may take (connect, send, answer).
    pub timeout: Duration,
    /// A body larger than this is sent without `result`, pointing at the tasks route.
    pub max_callback_bytes: usize,
    /// Who signs each job's callback.
    pub signers: Arc<CallbackSigners>,
    /// Which addresses a callback may reach.
    pub egress: Arc<EgressPolicy>,
    /// Where the spans of callback attempts and of finished jobs go.
    pub telemetry: Arc<Telemetry>,
}

/// The outbox of one node: what it works with.
pub struct Outbox {
    pub store: Arc<dyn Store>,
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    pub outbound: Arc<Outbound>,
    pub config: OutboxConfig,
    /// The longest it sleeps without looking at the store.
    pub idle_poll: Duration,
    /// Deliveries under way, for whoever wants to know whether the outbox is idle.
    pub deliveries: Arc<std::sync::atomic::AtomicUsize>,
}

impl Outbox {
    /// Starts the delivery loop; it sends due callbacks until `stop`, then waits for the
    /// deliveries under way.
    pub fn start(self, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(deliver_loop(Arc::new(self), stop))
    }
}

/// Deliveries leased per look at the outbox, and at most in flight at once.
const DELIVERIES_IN_FLIGHT: usize = 32;

/// The largest document sent from memory rather than streamed from the store.
const KEPT_DOCUMENT_BYTES: usize = 64 * 1024;

/// What an attempt sends: the document in memory when small or cut, or streamed from the
/// store, with its length and signature computed by a first pass, which keeps the bytes
/// only of a document under [`KEPT_DOCUMENT_BYTES`].
async fn callback_body(
    outbox: &Outbox,
    job: JobRecord,
    id: &str,
    timestamp: u64,
) -> StoreResult<(reqwest::Body, u64, Option<String>)> {
    let store = outbox.store.as_ref();
    let signer = outbox.config.signers.for_owner(job.owner.as_deref());
    let mut signing = signer.start(id, timestamp);
    // The first pass keeps what it reads while it is small: most jobs' documents are, and
    // are then sent from memory instead of being read from the store a second time.
    let mut kept = Vec::new();
    let length = feed_document(store, &job, |bytes| {
        signing.update(bytes);
        if kept.len() + bytes.len() <= KEPT_DOCUMENT_BYTES {
            kept.extend_from_slice(bytes);
        }
    })
    .await?;
    if length > outbox.config.max_callback_bytes as u64 {
        let body = head_only(&job);
        let signature = signer.signature(id, timestamp, &body);
        let length = body.len() as u64;
        return Ok((reqwest::Body::from(body), length, signature));
    }
    if kept.len() as u64 == length {
        return Ok((reqwest::Body::from(kept), length, signing.finish()));
    }
    let stream = document_stream(outbox.store.clone(), job);
    Ok((reqwest::Body::wrap_stream(stream), length, signing.finish()))
}

/// Sends due callbacks until `stop`; then waits for the deliveries under way.
async fn deliver_loop(outbox: Arc<Outbox>, stop: CancellationToken) {
    // Deliveries under way, by job: a lease that runs out while its delivery is still
    // building the body or waiting to record must not start a second one beside it.
    // Keyed by task id, so that a delivery that panicked is forgotten too.
    let mut running: JoinSet<()> = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, JobId> = HashMap::new();
    let task_id = |done: Result<(tokio::task::Id, ()), tokio::task::JoinError>| match done {
        Ok((id, ())) => id,
        Err(e) => {
            tracing::error!(error = %e, "a callback delivery failed unexpectedly");
            e.id()
        }
    };
    while !stop.is_cancelled() {
        while let Some(done) = running.try_join_next_with_id() {
            in_flight.remove(&task_id(done));
        }
        let room = DELIVERIES_IN_FLIGHT.saturating_sub(running.len());
        if room == 0 {
            // Full: nothing to do until a delivery ends.
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(done) = running.join_next_with_id() => {
                    in_flight.remove(&task_id(done));
                }
            }
            continue;
        }
        let now = now_millis();
        // The lease outlasts the attempt (building the body from the store, then sending it
        // within the timeout), so nobody else sends it meanwhile, and a crash leaves it due
        // again soon after.
        let lease = now + (outbox.config.timeout * 2 + Duration::from_secs(1)).as_millis() as i64;
        // Counted as busy while it looks: a callback leased by this look is in neither the
        // store's due ones nor the deliveries until it is spawned.
        let looking = Busy::new(&outbox.deliveries);
        let leased = match outbox.store.callbacks_due(now, lease, room as u32).await {
            Ok(due) => {
                let leased = due.len();
                for d in due {
                    if in_flight.values().all(|job| *job != d.job_id) {
                        let job = d.job_id;
                        let busy = Busy::new(&outbox.deliveries);
                        let handle = running.spawn(deliver(outbox.clone(), d, busy));
                        in_flight.insert(handle.id(), job);
                    }
                }
                leased
            }
            Err(e) => {
                tracing::error!(error = %e, "reading due callbacks failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(outbox.idle_poll) => continue,
                }
            }
        };
        if leased == room {
            continue;
        }
        drop(looking);
        let wait = match outbox.store.callback_next_due().await {
            Ok(Some(due)) => {
                Duration::from_millis((due - now_millis()).max(0) as u64).min(outbox.idle_poll)
            }
            _ => outbox.idle_poll,
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = outbox.bus.callbacks_signalled() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    while running.join_next().await.is_some() {}
}

/// One unit in the outbox's count of deliveries under way, for as long as it lives.
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Busy {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn deliver(outbox: Arc<Outbox>, due: CallbackDue, _busy: Busy) {
    let store = outbox.store.as_ref();
    let attempts = due.attempts + 1;
    let job = match store.job_get(due.job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return, // purged meanwhile
        Err(e) => {
            let error = format!("cannot read the job: {e}");
            record(
                &outbox,
                due.job_id,
                attempts,
                failed_attempt(&outbox, attempts, error),
            )
            .await;
            return;
        }
    };
    if !job.status.is_finished() {
        // The store makes a callback due in the transaction that finishes its job, so this
        // means a store that contradicts itself. The document of a job still running would
        // tell the receiver a falsehood that no later attempt could take back: nothing is
        // sent or recorded, and the lease brings the delivery back later, when the store
        // may agree with itself again.
        tracing::error!(job_id = %due.job_id, status = job.status.as_str(), "a callback is due for a job that is not finished; not sent");
        outbox.metrics.callback_attempt("refused");
        return;
    }
    // The attempt is a span of the job's trace (see `crate::telemetry`).
    let traced = job.options.trace.clone().map(|trace| Traced {
        span_id: new_span_id(),
        trace,
        status: job.status.as_str(),
        tasks: job.total,
        created_at: job.created_at,
    });
    let blocked = Url::parse(&due.url)
        .map_err(|e| format!("invalid callback URL: {e}"))
        .and_then(|url| outbox.config.egress.check_url(&url));
    if let Err(why) = blocked {
        let outcome = CallbackOutcome::GaveUp { error: why };
        conclude(&outbox, due.job_id, attempts, outcome, traced.as_ref()).await;
        return;
    }
    let id = webhook_id(due.job_id, job.options.run());
    let timestamp = timestamp_now();
    // The job's `callback_headers`, checked at submission; each replaces one of the same
    // name (a Content-Type of the job's replaces DoParallel's).
    let mut extra = HeaderMap::new();
    for (name, value) in &job.options.callback_headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => drop(extra.insert(name, value)),
            _ => {
                tracing::warn!(job_id = %due.job_id, header = %name, "a callback header is not valid HTTP; left out")
            }
        }
    }
    let (body, length, signature) = match callback_body(&outbox, job, &id, timestamp).await {
        Ok(body) => body,
        Err(e) => {
            let error = format!("cannot build the callback body: {e}");
            let outcome = failed_attempt(&outbox, attempts, error);
            conclude(&outbox, due.job_id, attempts, outcome, traced.as_ref()).await;
            return;
        }
    };
    let mut request = outbox
        .outbound
        .client()
        .post(&due.url)
        .timeout(outbox.config.timeout)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, length)
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .headers(extra);
    if let Some(signature) = signature {
        request = request.header("webhook-signature", signature);
    }
    if let Some(traced) = &traced {
        request = request.header("traceparent", traced.trace.traceparent(&traced.span_id));
        if let Some(state) = &traced.trace.state {
            request = request.header("tracestate", state);
        }
    }
    crash_point!("callback-sending");
    let started = SystemTime::now();
    let sent = request.body(body).send().await;
    let status = sent
        .as_ref()
        .ok()
        .map(|response| response.status().as_u16());
    let outcome = match sent {
        Ok(response) if response.status().is_success() => CallbackOutcome::Delivered,
        Ok(response) if response.status() == reqwest::StatusCode::GONE => CallbackOutcome::GaveUp {
            error: "receiver answered 410 Gone: not retried".into(),
        },
        Ok(response) => failed_attempt(
            &outbox,
            attempts,
            format!("receiver answered {}", response.status()),
        ),
        // Callback URLs often hold a secret (a token in the path or query): errors, which
        // are logged and shown, leave the URL out.
        Err(e) if crate::egress::is_blocked(&e) => CallbackOutcome::GaveUp {
            error: error_chain(&e.without_url()),
        },
        Err(e) => {
            if crate::outbound::out_of_descriptors(&e) {
                outbox.outbound.out_of_descriptors();
            }
            failed_attempt(&outbox, attempts, error_chain(&e.without_url()))
        }
    };
    if let Some(traced) = &traced
        && outbox.config.telemetry.enabled()
    {
        let mut attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("url.full", url_attribute(&due.url)),
            KeyValue::new("doparallel.job_id", due.job_id.to_string()),
            KeyValue::new("doparallel.attempt", i64::from(attempts)),
        ];
        if let Some(status) = status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        outbox.config.telemetry.record(FinishedSpan {
            trace: &traced.trace,
            span_id: &traced.span_id,
            parent: Some(&traced.trace.span_id),
            parent_is_remote: false,
            name: "callback",
            kind: SpanKind::Client,
            start: started,
            end: SystemTime::now(),
            attributes,
            error: match &outcome {
                CallbackOutcome::Delivered => None,
                CallbackOutcome::Retry { error, .. } | CallbackOutcome::GaveUp { error } => {
                    Some(error.clone())
                }
            },
        });
    }
    conclude(&outbox, due.job_id, attempts, outcome, traced.as_ref()).await;
}

/// What the spans of a delivery need of its job.
struct Traced {
    trace: JobTrace,
    /// The attempt's own span.
    span_id: String,
    status: &'static str,
    tasks: u64,
    created_at: crate::store::Millis,
}

/// Records an attempt's outcome; a delivery's end (delivered or given up) also ends its
/// job's span.
async fn conclude(
    outbox: &Outbox,
    job_id: JobId,
    attempts: u32,
    outcome: CallbackOutcome,
    traced: Option<&Traced>,
) {
    let ended = match &outcome {
        CallbackOutcome::Delivered => Some("delivered"),
        CallbackOutcome::GaveUp { .. } => Some("failed"),
        CallbackOutcome::Retry { .. } => None,
    };
    if let (Some(callback), Some(traced)) = (ended, traced) {
        outbox.config.telemetry.job_ended(
            &traced.trace,
            JobEnd {
                job_id: &job_id.to_string(),
                status: traced.status,
                tasks: traced.tasks,
                created_at_ms: traced.created_at,
                callback,
            },
        );
    }
    record(outbox, job_id, attempts, outcome).await;
}

/// What follows a failed attempt: the next one on the schedule, or giving up.
fn failed_attempt(outbox: &Outbox, attempts: u32, error: String) -> CallbackOutcome {
    match outbox.config.schedule.get(attempts as usize - 1) {
        Some(delay) => CallbackOutcome::Retry {
            at: now_millis() + delay.as_millis() as i64,
            error,
        },
        None => CallbackOutcome::GaveUp { error },
    }
}

async fn record(outbox: &Outbox, job_id: JobId, attempts: u32, outcome: CallbackOutcome) {
    match &outcome {
        CallbackOutcome::Delivered => tracing::info!(%job_id, attempts, "callback delivered"),
        CallbackOutcome::Retry { error, .. } => {
            tracing::warn!(%job_id, attempts, %error, "callback attempt failed; will retry")
        }
        CallbackOutcome::GaveUp { error } => {
            tracing::error!(%job_id, attempts, %error, "callback given up")
        }
    }
    outbox.metrics.callback_attempt(match &outcome {
        CallbackOutcome::Delivered => "delivered",
        CallbackOutcome::Retry { .. } => "retry",
        CallbackOutcome::GaveUp { .. } => "gave_up",
    });
    let settled = match &outcome {
        CallbackOutcome::Delivered => Some(true),
        CallbackOutcome::GaveUp { .. } => Some(false),
        CallbackOutcome::Retry { .. } => None,
    };
    let record = CallbackRecord {
        job_id,
        attempts,
        now: now_millis(),
        outcome,
    };
    if settled == Some(true) {
        crash_point!("callback-delivered");
    }
    match outbox.store.callback_record(&record).await {
        Ok(true) => {}
        Ok(false) => {
            // This attempt outlasted its lease and another node recorded one meanwhile: the
            // receiver may have had the callback twice, with the same webhook-id.
            tracing::warn!(%job_id, attempts, "callback attempt already recorded by another node");
            return;
        }
        Err(e) => {
            // The lease expires and the delivery is made again: at least once, never lost.
            tracing::error!(%job_id, error = %e, "cannot record callback attempt");
            return;
        }
    }
    if let Some(delivered) = settled {
        outbox
            .bus
            .emit(Event::CallbackSettled { job_id, delivered });
    }
}
