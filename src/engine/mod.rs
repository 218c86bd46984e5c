//! The engine: claims due tasks from the store, makes their calls in parallel, and writes
//! their outcomes back in batches.
//!
//! Three loops run side by side:
//! - the dispatcher holds one semaphore permit per task it has running (`max_in_flight`),
//!   claims as many tasks as it has free permits, and spawns a call for each;
//! - each call, when its attempt is over, hands its outcome and its permit to the finisher;
//! - the finisher writes the outcomes that have queued up in one store transaction (group
//!   commit), frees their permits, then wakes the dispatcher and, for jobs that just
//!   finished, the callback loop (`crate::callback`).
//!
//! A permit is freed only once its outcome is committed, so at most `max_in_flight` tasks
//! are running in the store at any time: a crash makes at most that many calls again.
//!
//! Before its attempt, a call waits at its endpoint host's gates (`hosts`: per-host
//! concurrency, rate, and the pause a 429 sets), holding its permit; the job's cancellation
//! and the engine's stop end that wait as they end a call.
//!
//! A task counts as finished only once the finisher's transaction has committed, and no
//! transaction is ever held open across an outbound call.

pub mod call;
pub mod hosts;
mod names;
pub(crate) mod outbound;
pub mod report;
mod tenants;

pub use tenants::Queued;

use hosts::HostGates;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::callback;
use crate::config::EngineConfig;
use crate::job::{JobId, JobStatus, NewJob};
use crate::metrics::Metrics;
use crate::store::{
    CancelOutcome, ClaimParams, ClaimedTask, IdempotencyKey, InsertOutcome, Millis, NodeId, Notice,
    Notices, OverdueParams, ReportOutcome, SettleOutcome, SettleReport, Store, StoreError,
    StoreResult, TaskReport, TaskSettle, now_millis,
};
use futures_util::StreamExt;

/// Most outcomes written in one transaction.
const SETTLE_BATCH: usize = 1024;

/// The longest the dispatcher and the callback loop sleep without looking at the store,
/// in case something became due that nobody announced.
pub(crate) const IDLE_POLL: Duration = Duration::from_secs(1);

/// The same on a database shared with other nodes, whose notices wake this one: the look
/// is then only a safety net (a notice lost with a connection), and an idle node makes
/// well under one query a second (two loops every three seconds, plus the lease sweep).
const SHARED_IDLE_POLL: Duration = Duration::from_secs(3);

/// Jobs purged per transaction by the retention loop.
const PURGE_BATCH: u32 = 100;

/// What happened, for whoever listens (the `run` command).
#[derive(Clone, Debug)]
pub enum Event {
    JobFinished {
        job_id: JobId,
        status: JobStatus,
    },
    /// The callback of a job was delivered or given up for good.
    CallbackSettled {
        job_id: JobId,
        delivered: bool,
    },
}

/// The shared part of the engine, handed to the API and to the loops.
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: EngineConfig,
    /// This process's names on its leases (see `names`).
    names: Arc<names::Names>,
    /// Calls in flight per owner, for `--owner-max-in-flight`.
    tenants: Arc<tenants::Tenants>,
    /// Claimed tasks whose call has not started, by job (the API's `queued`).
    pub queued: Arc<tenants::Queued>,
    /// See [`IDLE_POLL`] and [`SHARED_IDLE_POLL`].
    pub(crate) idle_poll: Duration,
    /// Mints and checks the tokens of calls that may answer 202.
    tokens: report::TaskTokens,
    /// The HTTP client of task calls and callbacks.
    pub(crate) outbound: Arc<outbound::Outbound>,
    work: Notify,
    pub(crate) callbacks_due: Notify,
    events: broadcast::Sender<Event>,
    pub metrics: Metrics,
    /// Per-destination limits, shared by every call this node makes.
    hosts: Arc<HostGates>,
    /// One token per unfinished job this node has made calls for: cancelling the job
    /// cancels its token, which aborts those calls. Taken once per job per claim, dropped
    /// when the job finishes, so a call takes no lock.
    running_jobs: Mutex<HashMap<JobId, CancellationToken>>,
}

impl Engine {
    /// Stores a new job and wakes the dispatcher. The job and all its tasks are committed
    /// before this returns. With an idempotency key used before, nothing is stored.
    pub async fn submit(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
    ) -> StoreResult<InsertOutcome> {
        let outcome = self
            .store
            .job_insert(job, idempotency, now_millis())
            .await?;
        if outcome != InsertOutcome::Inserted {
            return Ok(outcome);
        }
        self.metrics.jobs_submitted.inc();
        if job.tasks.is_empty() {
            self.metrics.job_finished(JobStatus::Complete);
            if job.callback.is_some() {
                self.callbacks_due.notify_one();
            }
            let _ = self.events.send(Event::JobFinished {
                job_id: job.id,
                status: JobStatus::Complete,
            });
        } else {
            self.work.notify_one();
        }
        Ok(outcome)
    }

    /// Cancels a job: its unfinished tasks become Cancelled, calls in flight on this node are
    /// aborted, and its callback (status Cancelled) is due.
    pub async fn cancel(self: &Arc<Self>, id: JobId) -> StoreResult<CancelOutcome> {
        let outcome = self.store.job_cancel(id, now_millis()).await?;
        if let CancelOutcome::Cancelled {
            has_callback,
            newly: true,
            tasks,
        } = outcome
        {
            self.metrics.tasks_finished("cancelled", tasks);
            self.abort_calls(id);
            tracing::info!(job_id = %id, "job cancelled");
            self.metrics.job_finished(JobStatus::Cancelled);
            if has_callback {
                self.callbacks_due.notify_one();
            }
            self.work.notify_one();
            self.emit(Event::JobFinished {
                job_id: id,
                status: JobStatus::Cancelled,
            });
        }
        Ok(outcome)
    }

    /// Stores the outcome an endpoint reported for an attempt it answered with 202.
    pub async fn report(&self, token: &str, outcome: SettleOutcome) -> StoreResult<ReportOutcome> {
        let Some(claims) = self.tokens.verify(token) else {
            return Ok(ReportOutcome::Unknown);
        };
        let outcome = self
            .store
            .tasks_report(&TaskReport {
                job_id: claims.job_id,
                index: claims.index,
                attempt: claims.attempt,
                now: now_millis(),
                outcome,
            })
            .await?;
        if let ReportOutcome::Applied(report) = &outcome {
            tracing::debug!(job_id = %claims.job_id, task = claims.index, attempt = claims.attempt, "outcome reported");
            self.after_settle(report.clone());
        }
        Ok(outcome)
    }

    /// Aborts this node's calls of a cancelled job. The token stays cancelled in the map for
    /// a while: a claim that committed just before the cancel looks its token up just
    /// after, and must find it cancelled.
    fn abort_calls(self: &Arc<Self>, id: JobId) {
        self.running_jobs
            .lock()
            .expect("not poisoned")
            .entry(id)
            .or_default()
            .cancel();
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Some(engine) = engine.upgrade() {
                engine
                    .running_jobs
                    .lock()
                    .expect("not poisoned")
                    .remove(&id);
            }
        });
    }

    /// The token that aborts this job's calls when it is cancelled.
    fn job_token(&self, job: JobId) -> CancellationToken {
        let mut running = self.running_jobs.lock().expect("not poisoned");
        running.entry(job).or_default().clone()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(crate) fn emit(&self, event: Event) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }
}

/// A running engine: its shared part and the loops to stop.
pub struct EngineHandle {
    pub engine: Arc<Engine>,
    stop: CancellationToken,
    in_flight: Arc<Semaphore>,
    dispatcher: JoinHandle<()>,
    finisher: JoinHandle<()>,
    finisher_stop: CancellationToken,
    callbacks: JoinHandle<()>,
    retention: Option<JoinHandle<()>>,
    leases: JoinHandle<()>,
    notices: Option<JoinHandle<()>>,
}

/// Errors that keep the engine from starting.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot recover interrupted tasks: {0}")]
    Recover(#[source] StoreError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error("cannot listen for other nodes' notices: {0}")]
    Listen(#[source] StoreError),
    #[error("cannot read the task token key: {0}")]
    TokenKey(#[source] StoreError),
}

/// Runs one start-up step, retrying while the store is unavailable (a lost answer, a
/// throttled request, a database still starting), as every later store call does: a
/// passing condition must not keep a node from starting. Other errors (a missing table, a
/// refused permission) end the start at once.
async fn at_start<T, F, Fut>(what: &str, mut step: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match step().await {
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(error = %e, retry_in = ?delay, "{what} failed at start; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            done => return done,
        }
    }
}

/// Recovers what a previous process left in flight, then starts the loops.
pub async fn start(
    store: Arc<dyn Store>,
    config: EngineConfig,
) -> Result<EngineHandle, EngineError> {
    let recovered = at_start("recovering interrupted tasks", || store.tasks_recover())
        .await
        .map_err(EngineError::Recover)?;
    if recovered > 0 {
        tracing::info!(
            recovered,
            "tasks interrupted by the last stop will be called again"
        );
    }
    let outbound = outbound::Outbound::new(&config).map_err(EngineError::Http)?;
    let notices = at_start("listening for other nodes", || store.listen())
        .await
        .map_err(EngineError::Listen)?;
    let tokens = report::TaskTokens::new(
        &at_start("reading the task token key", || store.task_token_key())
            .await
            .map_err(EngineError::TokenKey)?,
    );
    let names = names::Names::new();
    tracing::info!(node = %names.current(), shared = notices.is_some(), "engine starting");
    let (events, _) = broadcast::channel(1024);
    let metrics = Metrics::new();
    let hosts = Arc::new(HostGates::new(
        config.per_host,
        metrics.host_gate_waiting.clone(),
        metrics.host_pauses.clone(),
    ));
    let engine = Arc::new(Engine {
        store,
        names,
        tenants: tenants::Tenants::new(config.owner_max_in_flight),
        queued: Arc::default(),
        idle_poll: if notices.is_some() {
            SHARED_IDLE_POLL
        } else {
            IDLE_POLL
        },
        tokens,
        outbound,
        work: Notify::new(),
        callbacks_due: Notify::new(),
        events,
        config,
        metrics,
        hosts,
        running_jobs: Mutex::new(HashMap::new()),
    });
    let stop = CancellationToken::new();
    let finisher_stop = CancellationToken::new();
    let in_flight = Arc::new(Semaphore::new(engine.config.max_in_flight));
    let (tx, rx) = mpsc::channel(engine.config.max_in_flight);

    let dispatcher = tokio::spawn(dispatch(
        engine.clone(),
        in_flight.clone(),
        tx,
        stop.clone(),
    ));
    let finisher = tokio::spawn(finish(engine.clone(), rx, finisher_stop.clone()));
    let callbacks = tokio::spawn(callback::deliver_loop(engine.clone(), stop.clone()));
    let retention = engine
        .config
        .retention
        .map(|keep| tokio::spawn(purge_loop(engine.clone(), keep, stop.clone())));
    let leases = tokio::spawn(lease_loop(
        engine.clone(),
        stop.clone(),
        finisher_stop.clone(),
    ));
    let notices = notices.map(|n| tokio::spawn(notice_loop(engine.clone(), n, stop.clone())));
    Ok(EngineHandle {
        engine,
        stop,
        in_flight,
        dispatcher,
        finisher,
        finisher_stop,
        callbacks,
        retention,
        leases,
        notices,
    })
}

impl EngineHandle {
    /// Stops claiming, lets calls in flight (and callbacks being sent) finish for up to
    /// `grace`, and writes every outcome that arrived. Calls still running after that are
    /// abandoned: their tasks stay running in the store and are called again at next start.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        let _ = self.dispatcher.await;
        if let Some(retention) = self.retention {
            let _ = retention.await;
        }
        let all = self.engine.config.max_in_flight as u32;
        let deadline = Instant::now() + grace;
        if tokio::time::timeout(grace, self.in_flight.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                still_running = all as usize - self.in_flight.available_permits(),
                "grace period over; calls still in flight will be made again at next start"
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, self.callbacks).await;
        self.finisher_stop.cancel();
        let _ = self.finisher.await;
        // Only now: calls let finish in the grace period kept their leases meanwhile.
        let _ = self.leases.await;
        if let Some(notices) = self.notices {
            let _ = notices.await;
        }
    }
}

async fn dispatch(
    engine: Arc<Engine>,
    in_flight: Arc<Semaphore>,
    outcomes: mpsc::Sender<Settled>,
    stop: CancellationToken,
) {
    loop {
        let mut permits = tokio::select! {
            _ = stop.cancelled() => return,
            p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let more = in_flight.available_permits() as u32;
        if more > 0
            && let Ok(extra) = in_flight.clone().try_acquire_many_owned(more)
        {
            permits.merge(extra);
        }
        let free = permits.num_permits();
        let started = Instant::now();
        // Jobs whose calls already queue at a host's gates beyond what the gates can start
        // soon: more of their tasks would only hold slots that other jobs can use.
        let skip_jobs = engine.hosts.backlogged_jobs();
        let node = engine.names.current();
        let claim = match engine
            .store
            .tasks_claim(&ClaimParams {
                limit: free as u32,
                now: now_millis(),
                node,
                lease_until: now_millis() + engine.config.lease_timeout.as_millis() as i64,
                skip_jobs,
                owners: engine.tenants.limits(),
            })
            .await
        {
            Ok(claim) if answer_lost(&claim) => {
                tracing::error!(
                    "claiming tasks failed (its answer was lost); trying again shortly"
                );
                engine.names.forsake(node, "a claim failed");
                drop(permits);
                continue;
            }
            Ok(claim) => claim,
            Err(e) => {
                tracing::error!(error = %e, "claiming tasks failed; trying again shortly");
                // It may have committed all the same, leasing tasks that no call will make.
                engine.names.forsake(node, "a claim failed");
                drop(permits);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(engine.idle_poll) => continue,
                }
            }
        };
        let claimed = claim.tasks.len();
        tracing::trace!(
            free,
            claimed,
            micros = started.elapsed().as_micros() as u64,
            "claim"
        );
        if claimed > 0 {
            crash_point!("task-claimed");
        }
        // A claim lists each job's tasks together: one token lookup per job.
        let mut token: Option<(JobId, CancellationToken)> = None;
        for task in claim.tasks {
            let slot = Slot {
                _permit: permits.split(1).expect("one permit per claimed task"),
                lease: engine.names.hold(node),
                _tenant: engine.tenants.hold(task.owner.as_ref()),
            };
            let cancelled = match &token {
                Some((job, t)) if *job == task.job_id => t.clone(),
                _ => {
                    let t = engine.job_token(task.job_id);
                    token = Some((task.job_id, t.clone()));
                    t
                }
            };
            let queued = engine.queued.enter(task.job_id);
            tokio::spawn(run_call(
                engine.clone(),
                task,
                cancelled,
                stop.clone(),
                (slot, queued),
                outcomes.clone(),
            ));
        }
        drop(permits);
        if claimed < free {
            // Nothing more is due now: wait for a submission, a settled task (which may free
            // a job's concurrency), a left-out job whose backlog cleared, or the first retry
            // to come due.
            let wait = claim
                .next_due
                .map(|due| Duration::from_millis((due - now_millis()).max(0) as u64))
                .unwrap_or(engine.idle_poll)
                .min(engine.idle_poll);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = engine.work.notified() => {}
                _ = engine.hosts.cleared() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Whether the fault tests (`claim-answer-lost`) want this committed claim treated as one
/// whose answer was lost: the engine then holds leases it knows nothing of.
fn answer_lost(claim: &crate::store::Claim) -> bool {
    if claim.tasks.is_empty() {
        return false;
    }
    fail::fail_point!("claim-answer-lost", |_| true);
    false
}

async fn run_call(
    engine: Arc<Engine>,
    task: ClaimedTask,
    cancelled: CancellationToken,
    stop: CancellationToken,
    (slot, queued): (Slot, tenants::QueuedTask),
    outcomes: mpsc::Sender<Settled>,
) {
    // The built-in test task has no host and meets no gate.
    let host = hosts::host_key(&task.endpoint);
    let pass = match &host {
        None => None,
        Some(host) => tokio::select! {
            pass = engine.hosts.pass(task.job_id, task.options.host_limits(), host.clone()) => Some(pass),
            _ = cancelled.cancelled() => {
                tracing::debug!(job_id = %task.job_id, task = task.index, "call aborted by cancel at its host's gate");
                return;
            }
            _ = stop.cancelled() => {
                // Not started, so nothing is lost: like a call abandoned after the grace
                // period, its task stays running in the store and is called at next start.
                // Waiting on (a pause may last an hour) would only hold the shutdown up.
                tracing::debug!(job_id = %task.job_id, task = task.index, "call left at its host's gate by shutdown");
                return;
            }
        },
    };
    // In flight from here on, no longer queued.
    drop(queued);
    let started = Instant::now();
    engine.metrics.calls_in_flight.inc();
    // Where the endpoint may report an outcome later: the configured public URL, or for a
    // job that asks for reports, this server's own address; otherwise no task token and no
    // result URL are sent (the listening address is nobody's business).
    let report_base = engine.config.public_url.as_ref().or(engine
        .config
        .local_url
        .as_ref()
        .filter(|_| task.options.async_reports));
    let report_to = report_base.map(|base| {
        let token = engine.tokens.mint(task.job_id, task.index, task.attempt);
        let url = format!(
            "{}/v1/tasks/{token}/result",
            base.as_str().trim_end_matches('/')
        );
        call::ReportTo { token, url }
    });
    let attempt = tokio::select! {
        a = call::attempt(&engine.outbound, &task, &engine.config, report_to) => Some(a),
        _ = cancelled.cancelled() => None,
    };
    engine.metrics.calls_in_flight.dec();
    if let (Some(host), Some(attempt)) = (&host, &attempt)
        && let Some(delay) = call::host_pause(attempt)
    {
        engine.hosts.pause(host, delay);
    }
    // The host's permits go as soon as its answer is in, before the outcome is stored.
    drop(pass);
    let Some(attempt) = attempt else {
        // The job was cancelled: the store no longer counts this task as running, so its
        // slot is free at once and there is no outcome to write.
        tracing::debug!(job_id = %task.job_id, task = task.index, "call aborted by cancel");
        return;
    };
    crash_point!("response-received");
    let latency_ms = started.elapsed().as_millis() as u64;
    let now = now_millis();
    let outcome = call::settle_outcome(&task.options, task.attempt, attempt, now, &mut rand::rng());
    tracing::debug!(job_id = %task.job_id, task = task.index, attempt = task.attempt, latency_ms, ?outcome, "attempt over");
    let settle = TaskSettle {
        job_id: task.job_id,
        index: task.index,
        attempt: task.attempt,
        latency_ms,
        now,
        outcome,
    };
    // The finisher only goes away at shutdown, after the grace period: an outcome that comes
    // later is dropped and the task is called again at next start.
    let _ = outcomes.send((settle, slot)).await;
}

/// What a call holds from its claim until its outcome is committed (or it is abandoned):
/// its permit of `max_in_flight`, and its place under the name it was claimed under.
struct Slot {
    _permit: OwnedSemaphorePermit,
    lease: names::Held,
    _tenant: Option<tenants::TenantHeld>,
}

/// An outcome on its way to the store, with the slot it frees once written.
type Settled = (TaskSettle, Slot);

async fn finish(
    engine: Arc<Engine>,
    mut outcomes: mpsc::Receiver<Settled>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(SETTLE_BATCH);
    let mut slots: Vec<Slot> = Vec::with_capacity(SETTLE_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            o = outcomes.recv() => o,
            _ = stop.cancelled() => {
                // Write what has arrived, then stop: later outcomes are left to the next start.
                outcomes.close();
                outcomes.recv().await
            }
        };
        let Some((settle, slot)) = first else {
            return;
        };
        batch.push(settle);
        slots.push(slot);
        while batch.len() < SETTLE_BATCH {
            match outcomes.try_recv() {
                Ok((settle, slot)) => {
                    batch.push(settle);
                    slots.push(slot);
                }
                Err(_) => break,
            }
        }
        // Each outcome is settled under the name its task was claimed under: nearly always
        // one name for the whole batch.
        let first_node = slots[0].lease.node;
        if slots.iter().all(|s| s.lease.node == first_node) {
            settle_batch(&engine, first_node, &batch, &stop).await;
        } else {
            let mut nodes: Vec<NodeId> = slots.iter().map(|s| s.lease.node).collect();
            nodes.sort_by_key(|n| n.0);
            nodes.dedup();
            for node in nodes {
                let part: Vec<TaskSettle> = batch
                    .iter()
                    .zip(&slots)
                    .filter(|(_, slot)| slot.lease.node == node)
                    .map(|(settle, _)| settle.clone())
                    .collect();
                settle_batch(&engine, node, &part, &stop).await;
            }
        }
        batch.clear();
        // Only now may these tasks' slots be claimed again.
        slots.clear();
    }
}

/// Writes one batch, retrying while the store is unavailable (a full disk, a lost
/// connection): the outcomes are not lost as long as the process lives.
///
/// A failed attempt may still have committed (a COMMIT whose answer was lost with its
/// connection): the settle is then retried as "unknown". The store applies an outcome only
/// to the attempt that is running under this node's lease, so the retry cannot store
/// anything twice; but what the first attempt did apply, the retry reports as nothing. So
/// after a retry the batch's jobs are read back, and those found finished are announced
/// (logged, counted, their callback woken) as this batch's, never trusting an empty report.
async fn settle_batch(
    engine: &Engine,
    node: NodeId,
    batch: &[TaskSettle],
    stop: &CancellationToken,
) {
    let mut delay = Duration::from_millis(50);
    let started = Instant::now();
    let mut unknown = false;
    let report = loop {
        match engine.store.tasks_settle(node, batch).await {
            Ok(report) => {
                tracing::trace!(
                    outcomes = batch.len(),
                    micros = started.elapsed().as_micros() as u64,
                    "settle"
                );
                if unknown {
                    break with_jobs_finished_meanwhile(engine, batch, report, stop).await;
                }
                break report;
            }
            Err(e) if !matches!(e, StoreError::Unavailable(_)) => {
                // Not a passing condition: retrying would hold these slots and every later
                // batch forever. The tasks stay Running in the store; the next start calls
                // them again.
                tracing::error!(error = %e, outcomes = batch.len(), "storing task outcomes failed; their tasks will be called again");
                engine.names.forsake(node, "storing task outcomes failed");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, outcomes = batch.len(), "storing task outcomes failed; retrying");
                unknown = true;
                if stop.is_cancelled() {
                    // Shutting down: these tasks stay running in the store and are called
                    // again at next start.
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(IDLE_POLL * 5);
            }
        }
    };
    for settle in batch {
        // Observed here, on one task, rather than by every call on its own.
        engine
            .metrics
            .call_seconds
            .observe(settle.latency_ms as f64 / 1000.0);
    }
    engine.after_settle(report);
}

/// Adds to a report the jobs of `batch` that are finished in the store although the report
/// does not say so: finished by an earlier attempt of this settle whose COMMIT took effect
/// but whose answer was lost. (A job that another node, or a report, finished meanwhile is
/// announced here too: a second log line and count, on this node; its callback is owed
/// once either way, by the outbox.) Cancelled jobs were announced by their cancel.
async fn with_jobs_finished_meanwhile(
    engine: &Engine,
    batch: &[TaskSettle],
    mut report: SettleReport,
    stop: &CancellationToken,
) -> SettleReport {
    let mut jobs: Vec<JobId> = batch.iter().map(|s| s.job_id).collect();
    jobs.sort();
    jobs.dedup();
    jobs.retain(|id| report.finished.iter().all(|f| f.job_id != *id));
    let mut delay = Duration::from_millis(50);
    for id in jobs {
        let job = loop {
            match engine.store.job_get(id).await {
                Ok(job) => break job,
                Err(e) if stop.is_cancelled() => {
                    tracing::warn!(error = %e, job_id = %id, "cannot read back a settled job while stopping");
                    break None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, job_id = %id, "reading back a settled job failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(IDLE_POLL * 5);
                }
            }
        };
        if let Some(job) = job
            && job.status.is_finished()
            && job.status != JobStatus::Cancelled
        {
            tracing::info!(job_id = %id, "a settle whose answer was lost had finished this job");
            report.finished.push(crate::store::JobFinished {
                job_id: id,
                status: job.status,
                has_callback: job.callback_url.is_some(),
            });
        }
    }
    report
}

impl Engine {
    /// What follows stored outcomes: metrics, wake-ups, and the jobs they finished.
    fn after_settle(&self, report: SettleReport) {
        self.work.notify_one();
        // Only what the store applied: an outcome for a cancelled task changed nothing.
        self.metrics.tasks_finished("complete", report.complete);
        self.metrics.tasks_finished("failed", report.failed);
        self.metrics.task_retries.inc_by(report.retried);
        self.metrics.tasks_accepted.inc_by(report.awaiting);
        let finished = report.finished;
        if !finished.is_empty() {
            let mut running = self.running_jobs.lock().expect("not poisoned");
            for job in &finished {
                running.remove(&job.job_id);
            }
        }
        for job in finished {
            self.metrics.job_finished(job.status);
            tracing::info!(job_id = %job.job_id, status = job.status.as_str(), "job finished");
            if job.has_callback {
                self.callbacks_due.notify_one();
            }
            self.emit(Event::JobFinished {
                job_id: job.job_id,
                status: job.status,
            });
        }
    }
}

/// Keeps this node's leases alive while it has calls running, and takes back the tasks of
/// nodes whose leases ran out (any node may: the first to look does it).
///
/// Renewing every third of the lease timeout leaves two chances to renew before a lease
/// runs out; the sweep runs at the same pace, so a dead node's tasks are called again
/// within the lease timeout plus one sweep.
async fn lease_loop(
    engine: Arc<Engine>,
    stop: CancellationToken,
    finisher_stop: CancellationToken,
) {
    let every = (engine.config.lease_timeout / 3).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            // Renewal goes on through the shutdown's grace period, until the finisher stops.
            _ = finisher_stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = now_millis();
        for node in engine.names.in_use() {
            let until = now + engine.config.lease_timeout.as_millis() as i64;
            if let Err(e) = engine.store.tasks_renew(node, until).await {
                tracing::error!(error = %e, %node, "renewing this node's leases failed");
            }
        }
        if stop.is_cancelled() {
            continue;
        }
        match engine.store.tasks_expire(now).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    tasks = n,
                    "took back tasks whose lease ran out; calling them again"
                );
                engine.metrics.leases_expired.inc_by(n);
                engine.work.notify_one();
            }
            Err(e) => tracing::error!(error = %e, "taking back expired leases failed"),
        }
        time_out_awaited(&engine, now, &stop).await;
    }
}

/// Awaited attempts that came to their deadline without a report: each is settled as a
/// timeout (retried or failed by the job's options, like any timeout).
async fn time_out_awaited(engine: &Engine, now: Millis, stop: &CancellationToken) {
    let node = engine.names.current();
    let overdue = match engine
        .store
        .tasks_overdue(&OverdueParams {
            limit: SETTLE_BATCH as u32,
            now,
            node,
            lease_until: now + engine.config.lease_timeout.as_millis() as i64,
        })
        .await
    {
        Ok(overdue) => overdue,
        Err(e) => {
            tracing::error!(error = %e, "looking for awaited tasks past their deadline failed");
            return;
        }
    };
    if overdue.is_empty() {
        return;
    }
    let batch: Vec<TaskSettle> = overdue
        .iter()
        .map(|task| {
            let error = call::TaskError::timeout(format!(
                "no outcome reported within {} ms of the 202 answer",
                task.options.async_timeout_ms
            ));
            let attempt = call::Attempt::Retryable {
                error,
                retry_after: None,
            };
            TaskSettle {
                job_id: task.job_id,
                index: task.index,
                attempt: task.attempt,
                latency_ms: task.options.async_timeout_ms,
                now,
                outcome: call::settle_outcome(
                    &task.options,
                    task.attempt,
                    attempt,
                    now,
                    &mut rand::rng(),
                ),
            }
        })
        .collect();
    tracing::warn!(
        tasks = batch.len(),
        "awaited tasks timed out without a report"
    );
    // Leased to this node until settled: renewed like calls in flight meanwhile.
    let _held: Vec<names::Held> = batch.iter().map(|_| engine.names.hold(node)).collect();
    settle_batch(engine, node, &batch, stop).await;
}

/// Acts on what other nodes announce: new work, a callback due, a cancelled job.
async fn notice_loop(engine: Arc<Engine>, mut notices: Notices, stop: CancellationToken) {
    loop {
        let notice = tokio::select! {
            _ = stop.cancelled() => return,
            n = notices.next() => n,
        };
        match notice {
            Some(Notice::Work) => engine.work.notify_one(),
            Some(Notice::CallbackDue) => engine.callbacks_due.notify_one(),
            Some(Notice::Cancelled(id)) => {
                // Even when this node has no token for the job yet: a claim that committed
                // just before the cancel may be about to look one up, and must find it
                // cancelled (as in `Engine::cancel`).
                tracing::debug!(job_id = %id, "job cancelled; aborting its calls here, if any");
                engine.abort_calls(id);
            }
            None => {
                // The backend reconnects inside its stream; an ended stream means it gave
                // up, and the idle polls still find everything, only later.
                tracing::error!("notices from other nodes stopped; falling back to polling");
                return;
            }
        }
    }
}

/// Removes finished jobs older than `keep`, a batch at a time, every minute or so.
async fn purge_loop(engine: Arc<Engine>, keep: Duration, stop: CancellationToken) {
    let every = (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let cutoff = now_millis() - keep.as_millis() as i64;
        loop {
            match engine.store.jobs_purge(cutoff, PURGE_BATCH).await {
                Ok(n) if n > 0 => {
                    tracing::info!(purged = n, "finished jobs past retention removed")
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "purging old jobs failed");
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
