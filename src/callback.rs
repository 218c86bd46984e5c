//! A finished job's document (the callback body, also shown by `GET /v1/jobs/{id}` and
//! printed by `doparallel run`) and its delivery to the callback URL.
//!
//! Deliveries come from the outbox the store writes in the same transaction that finishes a
//! job. Each attempt leases its record first, so a crash mid-send leaves it due again:
//! callbacks are delivered at least once, and every attempt of one job carries the same
//! `webhook-id`, which is what a receiver deduplicates on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::engine::call::error_chain;
use crate::engine::{Engine, Event};
use crate::job::{JobId, TaskStatus};
use crate::store::{
    CallbackDue, CallbackOutcome, CallbackRecord, JobRecord, Store, StoreError, StoreResult,
    TaskPageQuery, TaskRecord, now_millis, webhook_id,
};
use crate::webhook::timestamp_now;

/// Tasks read from the store per page while a document is built.
const PAGE: u32 = 1000;

/// Deliveries leased per look at the outbox, and at most in flight at once.
const DELIVERIES_IN_FLIGHT: usize = 32;

/// One entry of the result map, keyed by the task's 1-based position.
#[derive(Serialize)]
struct Entry<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
}

/// Appends one task's `"N":{...}` entry, with the comma before it unless it is the first.
fn write_entry(task: &TaskRecord, out: &mut Vec<u8>) {
    if task.index > 1 {
        out.push(b',');
    }
    let entry = Entry {
        status: task.status.as_str(),
        result: task
            .result
            .as_deref()
            .filter(|_| task.status == TaskStatus::Complete),
        error: task
            .error
            .as_deref()
            .filter(|_| task.status == TaskStatus::Failed),
        attempts: (task.status == TaskStatus::Failed).then_some(task.attempts),
    };
    out.push(b'"');
    out.extend_from_slice(task.index.to_string().as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *out, &entry).expect("writing to a Vec cannot fail");
}

/// A job's tasks, a page at a time, in order.
struct TaskPages<'a> {
    store: &'a dyn Store,
    job: JobId,
    after: u64,
    done: bool,
}

impl<'a> TaskPages<'a> {
    fn new(store: &'a dyn Store, job: JobId) -> Self {
        TaskPages {
            store,
            job,
            after: 0,
            done: false,
        }
    }

    async fn next(&mut self) -> StoreResult<Option<Vec<TaskRecord>>> {
        if self.done {
            return Ok(None);
        }
        let query = TaskPageQuery {
            after: self.after,
            limit: PAGE,
            status: None,
        };
        let page = self.store.tasks_page(self.job, &query).await?;
        match page.last() {
            Some(last) if page.len() == PAGE as usize => self.after = last.index,
            _ => self.done = true,
        }
        Ok(Some(page))
    }
}

/// Appends the result map of a job, `{"1":{...},"2":{...}}`, reading its tasks page by page.
/// Stops and returns `false` as soon as `out` grows past `max_bytes`.
pub async fn write_result_map(
    store: &dyn Store,
    job: JobId,
    out: &mut Vec<u8>,
    max_bytes: usize,
) -> StoreResult<bool> {
    out.push(b'{');
    let mut pages = TaskPages::new(store, job);
    while let Some(page) = pages.next().await? {
        for task in &page {
            write_entry(task, out);
            // After each entry, not each page: a page of large results could be huge.
            if out.len() > max_bytes {
                return Ok(false);
            }
        }
    }
    out.push(b'}');
    Ok(out.len() <= max_bytes)
}

#[derive(Serialize)]
struct Head<'a> {
    job_id: JobId,
    status: &'a str,
    msg: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_url: Option<String>,
}

/// The document's beginning, up to and including `"result":`.
fn head_with_result(job: &JobRecord) -> Vec<u8> {
    let head = Head {
        job_id: job.id,
        status: job.status.as_str(),
        msg: "Job Finished",
        result_url: None,
    };
    let mut out = serde_json::to_vec(&head).expect("the head serializes");
    out.pop(); // the closing brace: the result map follows
    out.extend_from_slice(b",\"result\":");
    out
}

/// The document without results, pointing at the paginated tasks route instead.
fn head_only(job: &JobRecord) -> Vec<u8> {
    let head = Head {
        job_id: job.id,
        status: job.status.as_str(),
        msg: "Job Finished",
        result_url: Some(format!("/v1/jobs/{}/tasks", job.id)),
    };
    serde_json::to_vec(&head).expect("the head serializes")
}

/// The whole document of a finished job, in memory:
/// `{"job_id":ID,"status":S,"msg":"Job Finished","result":{...}}` (what `doparallel run`
/// prints; a delivery streams it instead, see `callback_body`).
pub async fn document(store: &dyn Store, job: &JobRecord) -> StoreResult<Vec<u8>> {
    let mut out = Vec::new();
    feed_document(store, job, |bytes| out.extend_from_slice(bytes)).await?;
    Ok(out)
}

/// Feeds the whole document, a page of tasks at a time, to `sink`; never holds more than a
/// page. Returns the number of bytes fed.
async fn feed_document(
    store: &dyn Store,
    job: &JobRecord,
    mut sink: impl FnMut(&[u8]),
) -> StoreResult<u64> {
    let mut total = 0u64;
    let mut feed = |bytes: &[u8]| {
        total += bytes.len() as u64;
        sink(bytes);
    };
    feed(&head_with_result(job));
    feed(b"{");
    let mut pages = TaskPages::new(store, job.id);
    let mut chunk = Vec::new();
    let mut entries = 0u64;
    while let Some(page) = pages.next().await? {
        chunk.clear();
        for task in &page {
            write_entry(task, &mut chunk);
        }
        entries += page.len() as u64;
        feed(&chunk);
    }
    feed(b"}}");
    // A finished job's tasks never change; fewer than its total means it was removed
    // meanwhile, and an incomplete document must not go out as if it were whole.
    if entries != job.total {
        return Err(StoreError::Other(format!(
            "job {} has {entries} of its {} tasks left; it was removed while its callback was built",
            job.id, job.total
        )));
    }
    Ok(total)
}

/// The document as a stream of chunks, a page of tasks each, for a request body.
fn document_stream(
    store: Arc<dyn Store>,
    job: JobRecord,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, StoreError>> + Send + 'static {
    enum Part {
        Head,
        Pages(u64),
        Tail,
        Done,
    }
    futures_util::stream::try_unfold(Part::Head, move |part| {
        let store = store.clone();
        let job = job.clone();
        async move {
            Ok::<_, StoreError>(match part {
                Part::Head => {
                    let mut head = head_with_result(&job);
                    head.push(b'{');
                    Some((head, Part::Pages(0)))
                }
                Part::Pages(after) => {
                    if after > 0 {
                        // A pause for the test that stops the database mid-stream.
                        crate::pause_point("callback-next-page").await;
                    }
                    let query = TaskPageQuery {
                        after,
                        limit: PAGE,
                        status: None,
                    };
                    let page = store.tasks_page(job.id, &query).await?;
                    let mut chunk = Vec::new();
                    for task in &page {
                        write_entry(task, &mut chunk);
                    }
                    let next = match page.last() {
                        Some(last) if page.len() == PAGE as usize => Part::Pages(last.index),
                        _ => Part::Tail,
                    };
                    Some((chunk, next))
                }
                Part::Tail => Some((b"}}".to_vec(), Part::Done)),
                Part::Done => None,
            })
        }
    })
}

/// What an attempt sends: the document in memory when small or cut, or streamed from the
/// store, with its length and signature computed by a first pass that keeps nothing.
async fn callback_body(
    engine: &Engine,
    job: JobRecord,
    id: &str,
    timestamp: u64,
) -> StoreResult<(reqwest::Body, u64, Option<String>)> {
    let store = engine.store.as_ref();
    let signer = engine
        .config
        .callback_signers
        .for_owner(job.owner.as_deref());
    let mut signing = signer.start(id, timestamp);
    let length = feed_document(store, &job, |bytes| signing.update(bytes)).await?;
    if length > engine.config.max_callback_bytes as u64 {
        let body = head_only(&job);
        let signature = signer.signature(id, timestamp, &body);
        let length = body.len() as u64;
        return Ok((reqwest::Body::from(body), length, signature));
    }
    let stream = document_stream(engine.store.clone(), job);
    Ok((reqwest::Body::wrap_stream(stream), length, signing.finish()))
}

/// Sends due callbacks until `stop`; then waits for the deliveries under way.
pub(crate) async fn deliver_loop(engine: Arc<Engine>, stop: CancellationToken) {
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
        let lease =
            now + (engine.config.callback_timeout * 2 + Duration::from_secs(1)).as_millis() as i64;
        let leased = match engine.store.callbacks_due(now, lease, room as u32).await {
            Ok(due) => {
                let leased = due.len();
                for d in due {
                    if in_flight.values().all(|job| *job != d.job_id) {
                        let job = d.job_id;
                        let handle = running.spawn(deliver(engine.clone(), d));
                        in_flight.insert(handle.id(), job);
                    }
                }
                leased
            }
            Err(e) => {
                tracing::error!(error = %e, "reading due callbacks failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(engine.idle_poll) => continue,
                }
            }
        };
        if leased == room {
            continue;
        }
        let wait = match engine.store.callback_next_due().await {
            Ok(Some(due)) => {
                Duration::from_millis((due - now_millis()).max(0) as u64).min(engine.idle_poll)
            }
            _ => engine.idle_poll,
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = engine.callbacks_due.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    while running.join_next().await.is_some() {}
}

async fn deliver(engine: Arc<Engine>, due: CallbackDue) {
    let store = engine.store.as_ref();
    let attempts = due.attempts + 1;
    let job = match store.job_get(due.job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return, // purged meanwhile
        Err(e) => {
            let error = format!("cannot read the job: {e}");
            record(
                &engine,
                due.job_id,
                attempts,
                failed_attempt(&engine, attempts, error),
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
        engine.metrics.callback_attempt("refused");
        return;
    }
    let blocked = Url::parse(&due.url)
        .map_err(|e| format!("invalid callback URL: {e}"))
        .and_then(|url| engine.config.egress.check_url(&url));
    if let Err(why) = blocked {
        let outcome = CallbackOutcome::GaveUp { error: why };
        record(&engine, due.job_id, attempts, outcome).await;
        return;
    }
    let id = webhook_id(due.job_id);
    let timestamp = timestamp_now();
    let (body, length, signature) = match callback_body(&engine, job, &id, timestamp).await {
        Ok(body) => body,
        Err(e) => {
            let error = format!("cannot build the callback body: {e}");
            let outcome = failed_attempt(&engine, attempts, error);
            record(&engine, due.job_id, attempts, outcome).await;
            return;
        }
    };
    let mut request = engine
        .outbound
        .client()
        .post(&due.url)
        .timeout(engine.config.callback_timeout)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, length)
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(signature) = signature {
        request = request.header("webhook-signature", signature);
    }
    crash_point!("callback-sending");
    let sent = request.body(body).send().await;
    let error = match sent {
        Ok(response) if response.status().is_success() => None,
        Ok(response) if response.status() == reqwest::StatusCode::GONE => {
            let outcome = CallbackOutcome::GaveUp {
                error: "receiver answered 410 Gone: not retried".into(),
            };
            record(&engine, due.job_id, attempts, outcome).await;
            return;
        }
        Ok(response) => Some(format!("receiver answered {}", response.status())),
        // Callback URLs often hold a secret (a token in the path or query): errors, which
        // are logged and shown, leave the URL out.
        Err(e) if crate::egress::is_blocked(&e) => {
            let outcome = CallbackOutcome::GaveUp {
                error: error_chain(&e.without_url()),
            };
            record(&engine, due.job_id, attempts, outcome).await;
            return;
        }
        Err(e) => {
            if crate::engine::outbound::out_of_descriptors(&e) {
                engine.outbound.out_of_descriptors();
            }
            Some(error_chain(&e.without_url()))
        }
    };
    let outcome = match error {
        None => CallbackOutcome::Delivered,
        Some(error) => failed_attempt(&engine, attempts, error),
    };
    record(&engine, due.job_id, attempts, outcome).await;
}

/// What follows a failed attempt: the next one on the schedule, or giving up.
fn failed_attempt(engine: &Engine, attempts: u32, error: String) -> CallbackOutcome {
    match engine.config.callback_schedule.get(attempts as usize - 1) {
        Some(delay) => CallbackOutcome::Retry {
            at: now_millis() + delay.as_millis() as i64,
            error,
        },
        None => CallbackOutcome::GaveUp { error },
    }
}

async fn record(engine: &Engine, job_id: JobId, attempts: u32, outcome: CallbackOutcome) {
    match &outcome {
        CallbackOutcome::Delivered => tracing::info!(%job_id, attempts, "callback delivered"),
        CallbackOutcome::Retry { error, .. } => {
            tracing::warn!(%job_id, attempts, %error, "callback attempt failed; will retry")
        }
        CallbackOutcome::GaveUp { error } => {
            tracing::error!(%job_id, attempts, %error, "callback given up")
        }
    }
    engine.metrics.callback_attempt(match &outcome {
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
    match engine.store.callback_record(&record).await {
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
        engine.emit(Event::CallbackSettled { job_id, delivered });
    }
}
