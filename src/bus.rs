//! The in-process signal bus: how the parts of one node (the API, the engine, the callback
//! outbox) tell each other what happened, without importing each other. Every change is
//! committed to the store first; a signal only says "look again" or "this happened".
//!
//! - wake-ups: tasks may be claimable ([`Bus::work`]), a callback may be due
//!   ([`Bus::callbacks_due`]), a job's deadline may have been set ([`Bus::deadlines`]);
//! - events for whoever listens (`doparallel run`, the events stream): a job finished, a
//!   callback settled;
//! - the cancellation of a job's calls on this node, whether the cancel came through this
//!   node's API or, as a notice, from another node: one path;
//! - the node's live counts that the store does not keep (tasks claimed but not called yet).
//!
//! A shared backend's notices from other nodes (`Store::listen`) are turned into the same
//! signals by the engine's notice loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::job::{JobId, JobStatus};
use crate::metrics::Metrics;
use crate::store::{CancelOutcome, SettleReport, Store, StoreResult, now_millis, plan};

/// What happened, for whoever listens.
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

pub struct Bus {
    work: Notify,
    deadlines: Notify,
    callbacks_due: Notify,
    events: broadcast::Sender<Event>,
    /// One token per unfinished job this node has made calls for: cancelling the job
    /// cancels its token, which aborts those calls. Taken once per job per claim, dropped
    /// when the job finishes, so a call takes no lock.
    calls: Mutex<HashMap<JobId, CancellationToken>>,
    /// Claimed tasks whose call has not started, by job.
    pub queued: Arc<Queued>,
    /// How this node's engine sees the hosts it calls, when it has an engine.
    hosts: Mutex<Option<HostsView>>,
}

/// One host this node calls, as its gates see it now.
#[derive(Clone, Debug, PartialEq)]
pub struct HostState {
    /// `host` or `host:port`.
    pub host: String,
    /// The limit on calls in flight: the adaptive one's value now, or the fixed one.
    pub limit: Option<u32>,
    pub adaptive: bool,
    /// Calls that passed the host's gate and are not over.
    pub in_flight: u64,
    /// Calls waiting at its gates (limits, a pause, an open breaker).
    pub waiting: u64,
    /// Its breaker is open: calls wait for the cool-down and a probe.
    pub breaker_open: bool,
    /// Connection failures in a row so far.
    pub failures: u32,
}

/// Reads the engine's view of its hosts.
pub type HostsView = Arc<dyn Fn() -> Vec<HostState> + Send + Sync>;

impl Default for Bus {
    fn default() -> Self {
        Bus {
            work: Notify::new(),
            deadlines: Notify::new(),
            callbacks_due: Notify::new(),
            events: broadcast::channel(1024).0,
            calls: Mutex::new(HashMap::new()),
            queued: Arc::default(),
            hosts: Mutex::new(None),
        }
    }
}

impl Bus {
    pub fn new() -> Arc<Self> {
        Arc::new(Bus::default())
    }

    /// The engine of this node shows its hosts through `view`.
    pub fn show_hosts(&self, view: HostsView) {
        *self.hosts.lock().expect("not poisoned") = Some(view);
    }

    /// The hosts this node's engine calls; empty on a node without one.
    pub fn hosts(&self) -> Vec<HostState> {
        let view = self.hosts.lock().expect("not poisoned").clone();
        view.map(|view| view()).unwrap_or_default()
    }

    /// Tasks may have become claimable (a submission, a settled task, a lease taken back).
    pub fn work(&self) {
        self.work.notify_one();
    }

    pub async fn work_signalled(&self) {
        self.work.notified().await;
    }

    /// A job's deadline may have been set or moved (a submission, a change of its options,
    /// a retry, or a job with a deadline claimed): the deadline sweep looks again.
    pub fn deadlines(&self) {
        self.deadlines.notify_one();
    }

    pub async fn deadlines_signalled(&self) {
        self.deadlines.notified().await;
    }

    /// Whether work or a callback became due since the last look: for a node without an
    /// engine of its own that wakes one elsewhere (`crate::lambda`). Takes the wake-ups an
    /// engine and an outbox would have taken.
    pub fn take_wakeups(&self) -> bool {
        use futures_util::FutureExt;
        let work = self.work.notified().now_or_never().is_some();
        let callbacks = self.callbacks_due.notified().now_or_never().is_some();
        work || callbacks
    }

    /// A callback delivery may have become due.
    pub fn callbacks_due(&self) {
        self.callbacks_due.notify_one();
    }

    pub async fn callbacks_signalled(&self) {
        self.callbacks_due.notified().await;
    }

    pub fn emit(&self, event: Event) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The token that aborts this node's calls of `job` when it is cancelled.
    pub fn call_token(&self, job: JobId) -> CancellationToken {
        let mut calls = self.calls.lock().expect("not poisoned");
        calls.entry(job).or_default().clone()
    }

    /// Aborts this node's calls of a cancelled job. The token stays cancelled for a while:
    /// a claim that committed just before the cancel looks its token up just after, and must
    /// find it cancelled.
    pub fn cancel_calls(self: &Arc<Self>, job: JobId) {
        self.calls
            .lock()
            .expect("not poisoned")
            .entry(job)
            .or_default()
            .cancel();
        let bus = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Some(bus) = bus.upgrade() {
                bus.forget_cancel(job);
            }
        });
    }

    /// Forgets that `job` was cancelled (it was retried since, or a minute went by): its
    /// next calls get a new token. A token not cancelled is kept, with the calls it can
    /// abort.
    pub fn forget_cancel(&self, job: JobId) {
        let mut calls = self.calls.lock().expect("not poisoned");
        if calls.get(&job).is_some_and(CancellationToken::is_cancelled) {
            calls.remove(&job);
        }
    }

    /// What follows outcomes committed to the store (a settle, a report): the counts, the
    /// wake-ups, and the announcement of the jobs they finished.
    pub fn settled(&self, report: SettleReport, metrics: &Metrics) {
        self.work();
        // Only what the store applied: an outcome for a cancelled task changed nothing.
        metrics.tasks_finished("complete", report.complete);
        metrics.tasks_finished("failed", report.failed);
        metrics.task_retries.inc_by(report.retried);
        metrics.tasks_accepted.inc_by(report.awaiting);
        if !report.finished.is_empty() {
            let mut calls = self.calls.lock().expect("not poisoned");
            for job in &report.finished {
                calls.remove(&job.job_id);
            }
        }
        for job in report.finished {
            metrics.job_finished(job.status);
            tracing::info!(job_id = %job.job_id, status = job.status.as_str(), "job finished");
            if job.has_callback {
                self.callbacks_due();
            }
            self.emit(Event::JobFinished {
                job_id: job.job_id,
                status: job.status,
            });
        }
    }
}

impl Bus {
    /// What follows a job ended before all its tasks ran (a cancel, an outcome decided
    /// early) and committed: the counts, its calls here aborted, the callback and the
    /// dispatcher woken, the announcement.
    pub fn ended(
        self: &Arc<Self>,
        id: JobId,
        status: JobStatus,
        tasks: u64,
        has_callback: bool,
        metrics: &Metrics,
    ) {
        metrics.tasks_finished("cancelled", tasks);
        self.stopped(id, status, tasks, has_callback, metrics);
    }

    /// What follows a job ended at its deadline (`Store::job_expire`) and committed: as
    /// [`Bus::ended`], its stopped tasks counted as failed.
    pub fn expired(
        self: &Arc<Self>,
        id: JobId,
        status: JobStatus,
        tasks: u64,
        has_callback: bool,
        metrics: &Metrics,
    ) {
        metrics.tasks_finished("failed", tasks);
        self.stopped(id, status, tasks, has_callback, metrics);
    }

    fn stopped(
        self: &Arc<Self>,
        id: JobId,
        status: JobStatus,
        tasks: u64,
        has_callback: bool,
        metrics: &Metrics,
    ) {
        self.cancel_calls(id);
        tracing::info!(job_id = %id, status = status.as_str(), stopped = tasks, "job ended");
        metrics.job_finished(status);
        if has_callback {
            self.callbacks_due();
        }
        self.work();
        self.emit(Event::JobFinished { job_id: id, status });
    }
}

/// Ends `job` when its outcome is decided before all its tasks ran (`plan::decided`:
/// `min_complete`, `fail_fast`): its remaining tasks are cancelled and its callback sent at
/// once. Asked after an outcome of such a job is stored, on whichever node stored it; a job
/// decided already, or ended meanwhile, is left as it is.
pub async fn end_if_decided(
    store: &dyn Store,
    bus: &Arc<Bus>,
    metrics: &Metrics,
    job: JobId,
) -> StoreResult<()> {
    let Some(record) = store.job_get(job).await? else {
        return Ok(());
    };
    if record.status.is_finished() {
        return Ok(());
    }
    let Some(status) = plan::decided(
        &record.options,
        record.total,
        record.complete,
        record.failed,
    ) else {
        return Ok(());
    };
    if let CancelOutcome::Cancelled {
        has_callback,
        newly: true,
        tasks,
    } = store.job_end(job, status, now_millis()).await?
    {
        bus.ended(job, status, tasks, has_callback, metrics);
    }
    Ok(())
}

/// Claimed tasks of this node whose call has not started yet, by job: they wait at a host's
/// gate (per-host limits, a 429's pause) or for their turn to be spawned. The store counts
/// them as running (they are leased); what is truly in flight is the rest. Shown by the API
/// as `queued`, beside `running`.
#[derive(Default)]
pub struct Queued {
    jobs: Mutex<HashMap<JobId, u64>>,
}

impl Queued {
    /// How many of `job`'s claimed tasks wait here.
    pub fn of(&self, job: JobId) -> u64 {
        self.jobs
            .lock()
            .expect("not poisoned")
            .get(&job)
            .copied()
            .unwrap_or(0)
    }

    /// Counts one task of `job` as queued until the guard is dropped.
    pub fn enter(self: &Arc<Self>, job: JobId) -> QueuedTask {
        *self
            .jobs
            .lock()
            .expect("not poisoned")
            .entry(job)
            .or_insert(0) += 1;
        QueuedTask {
            queued: self.clone(),
            job,
        }
    }
}

/// One claimed task not yet called.
pub struct QueuedTask {
    queued: Arc<Queued>,
    job: JobId,
}

impl Drop for QueuedTask {
    fn drop(&mut self) {
        let mut jobs = self.queued.jobs.lock().expect("not poisoned");
        if let Some(n) = jobs.get_mut(&self.job) {
            *n -= 1;
            if *n == 0 {
                jobs.remove(&self.job);
            }
        }
    }
}
