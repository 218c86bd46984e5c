//! The engine: claims due tasks from the store, makes their calls in parallel, and writes
//! their outcomes back in batches.
//!
//! Its loops run side by side (`dispatch`, `finish`, `leases`, and here the notices of
//! other nodes and the retention purge):
//! - the dispatcher holds one semaphore permit per task it has running (`max_in_flight`),
//!   claims as many tasks as it has free permits, and spawns a call for each;
//! - each call, when its attempt is over, hands its outcome and its permit to the finisher;
//! - the finisher writes the outcomes that have queued up in one store transaction (group
//!   commit), frees their permits, then tells the bus (`crate::bus`), which wakes the
//!   dispatcher and, for jobs that just finished, the callback outbox.
//!
//! A permit is freed only once its outcome is committed, so at most `max_in_flight` tasks
//! are running in the store at any time: a crash makes at most that many calls again.
//!
//! Before its attempt, a call waits at its endpoint host's gates (`hosts`: per-host
//! concurrency, rate, and the pause a 429 sets), holding its permit; the job's cancellation
//! and the engine's stop end that wait as they end a call.
//!
//! A task counts as finished only once the finisher's transaction has committed, and no
//! transaction is ever held open across an outbound call. The engine imports neither the
//! API nor the outbox: they meet through the store and the bus.

pub mod call;
mod deadlines;
mod dispatch;
mod finish;
pub mod hosts;
mod leases;
mod names;
mod node;
mod tenants;

pub use node::{IDLE_POLL, SHARED_IDLE_POLL};

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::egress::EgressPolicy;
use crate::job::HostLimits;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::store::{Notice, Notices, Store, now_millis};
use crate::task_token::TaskTokens;
use crate::webhook::Signer;
use hosts::HostGates;
use node::Engine;

/// Jobs purged per transaction by the retention loop.
const PURGE_BATCH: u32 = 100;

/// What the engine needs to know; built by each entry point.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_in_flight: usize,
    /// Most calls of one owner in flight on this node; `None`: no limit.
    pub owner_max_in_flight: Option<u64>,
    /// The server's limits on calls to one endpoint host, for all jobs together on this
    /// node (see `hosts`).
    pub per_host: HostLimits,
    /// How adaptive limits start, and when a host's breaker opens.
    pub adaptation: hosts::Adaptation,
    /// How long a job below the highest priority may go unserved (`plan::levels`).
    pub priority_max_wait: Duration,
    /// The most calls in flight of a group without a concurrency of its own, across every
    /// node (`--group-concurrency`).
    pub group_concurrency: Option<u32>,
    pub max_response_bytes: usize,
    /// How long finished jobs are kept; `None` keeps them until deleted.
    pub retention: Option<Duration>,
    /// Which addresses task calls may reach.
    pub egress: Arc<EgressPolicy>,
    /// Signs task calls, with keys no callback is signed with; signs nothing without secrets.
    pub task_signer: Arc<Signer>,
    /// Opens the sealed values of secret headers for the calls.
    pub sealer: Arc<crate::sealing::Sealer>,
    /// Signs the calls of jobs with `aws_sigv4`.
    pub aws_signer: Arc<crate::aws::CallSigner>,
    /// A job with `async_reports` whose endpoint can be told no report URL (no public URL,
    /// no API of its own) fails its calls rather than count a 202 as success: `work`, whose
    /// jobs were submitted to an API elsewhere. (`doparallel run` has no API by design, and
    /// counts a 202 as a success there.)
    pub reports_need_url: bool,
    /// Where the spans of call attempts (and of jobs without a callback) go.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// How long a claimed task stays leased to this node without renewal; after that any
    /// node may take it back and call it again.
    pub lease_timeout: Duration,
    /// The base URL endpoints post reported outcomes to (`/v1/tasks/{token}/result` is
    /// added). `None` when there is no API to report to (`doparallel run`): a 202 then
    /// counts as a success like any 2xx.
    pub public_url: Option<url::Url>,
    /// This server's own address, where endpoints of jobs with `async_reports` report when
    /// no public URL is configured; `None` without an API (`doparallel run`).
    pub local_url: Option<url::Url>,
}

/// What the engine works with, made by the server (`crate::server`), which also recovered
/// what the last stop left in flight before starting it.
pub struct Parts {
    pub store: Arc<dyn Store>,
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    pub outbound: Arc<Outbound>,
    pub tokens: Arc<TaskTokens>,
    /// Other nodes' notices, on a shared backend.
    pub notices: Option<Notices>,
}

/// A running engine: the loops to stop.
pub struct EngineHandle {
    engine: Arc<Engine>,
    max_in_flight: usize,
    stop: CancellationToken,
    in_flight: Arc<Semaphore>,
    dispatcher: JoinHandle<()>,
    finisher: JoinHandle<()>,
    finisher_stop: CancellationToken,
    retention: Option<JoinHandle<()>>,
    leases: JoinHandle<()>,
    deadlines: JoinHandle<()>,
    notices: Option<JoinHandle<()>>,
}

/// How long a shutdown waits for the calls it abandons to stop (they stop at their next
/// poll; this bounds a poll stuck in a blocking section).
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// Starts the loops.
pub fn start(parts: Parts, config: EngineConfig) -> EngineHandle {
    let names = names::Names::new();
    tracing::info!(node = %names.current(), shared = parts.notices.is_some(), "engine starting");
    let hosts = Arc::new(HostGates::new(
        config.per_host,
        config.adaptation,
        hosts::HostMetrics {
            waiting: parts.metrics.host_gate_waiting.clone(),
            pauses: parts.metrics.host_pauses.clone(),
            limits: parts.metrics.host_concurrency_limit.clone(),
            breaker_trips: parts.metrics.host_breaker_trips.clone(),
        },
    ));
    parts.bus.show_hosts({
        let hosts = Arc::downgrade(&hosts);
        Arc::new(move || hosts.upgrade().map(|h| h.states()).unwrap_or_default())
    });
    let engine = Arc::new(Engine {
        store: parts.store,
        names,
        tenants: tenants::Tenants::new(config.owner_max_in_flight),
        idle_poll: if parts.notices.is_some() {
            SHARED_IDLE_POLL
        } else {
            IDLE_POLL
        },
        tokens: parts.tokens,
        outbound: parts.outbound,
        bus: parts.bus,
        metrics: parts.metrics,
        hosts,
        config,
        idle: std::sync::Mutex::new(None),
        swept: std::sync::atomic::AtomicBool::new(false),
        abandon: CancellationToken::new(),
    });
    let stop = CancellationToken::new();
    let finisher_stop = CancellationToken::new();
    let max_in_flight = engine.config.max_in_flight;
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let (tx, rx) = mpsc::channel(max_in_flight);

    let dispatcher = tokio::spawn(dispatch::dispatch(
        engine.clone(),
        in_flight.clone(),
        tx,
        stop.clone(),
    ));
    let finisher = tokio::spawn(finish::finish(engine.clone(), rx, finisher_stop.clone()));
    let retention = engine
        .config
        .retention
        .map(|keep| tokio::spawn(purge_loop(engine.clone(), keep, stop.clone())));
    let leases = tokio::spawn(leases::lease_loop(
        engine.clone(),
        stop.clone(),
        finisher_stop.clone(),
    ));
    let deadlines = tokio::spawn(deadlines::deadline_loop(engine.clone(), stop.clone()));
    let notices = parts
        .notices
        .map(|n| tokio::spawn(notice_loop(engine.clone(), n, stop.clone())));
    EngineHandle {
        engine: engine.clone(),
        max_in_flight,
        stop,
        in_flight,
        dispatcher,
        finisher,
        finisher_stop,
        retention,
        leases,
        deadlines,
        notices,
    }
}

impl EngineHandle {
    /// Whether this engine has nothing to do now or within `margin`: nothing in flight or
    /// waiting at a host's gate, and its claims found nothing due, with no task in backoff
    /// due within `margin`, for at least one idle poll (a look at the store made after any
    /// signal it may have missed), and its lease loop has swept once (what dead nodes left
    /// is taken back). What live nodes hold is theirs. A claim sees the `2 x max_in_flight
    /// + 8` least recently served jobs, so a retry due soon in a job beyond them is left to
    /// the next worker. For `work --until-idle`.
    pub fn idle(&self, margin: Duration) -> bool {
        if self.in_flight.available_permits() < self.max_in_flight
            || !self.engine.swept.load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        let Some(spell) = *self.engine.idle.lock().expect("not poisoned") else {
            return false;
        };
        let poll = self.engine.idle_poll;
        spell.since.elapsed() >= poll
            && spell.last.elapsed() <= poll * 2
            && spell
                .next_due
                .is_none_or(|due| due > now_millis() + margin.as_millis() as i64)
    }

    /// Stops claiming, lets calls in flight finish for up to `grace`, and writes every
    /// outcome that arrived. Calls still running after that are abandoned (stopped, their
    /// connections closed): their tasks stay running in the store and are called again at
    /// next start, or by another node once their leases run out.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        let _ = self.dispatcher.await;
        if let Some(retention) = self.retention {
            let _ = retention.await;
        }
        let _ = self.deadlines.await;
        let all = self.max_in_flight as u32;
        if tokio::time::timeout(grace, self.in_flight.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                still_running = all as usize - self.in_flight.available_permits(),
                "grace period over; calls still in flight will be made again at next start"
            );
            self.engine.abandon.cancel();
            // Each abandoned call returns its permit as it stops, at its next poll.
            let _ = tokio::time::timeout(ABANDON_WAIT, self.in_flight.acquire_many(all)).await;
        }
        self.finisher_stop.cancel();
        let _ = self.finisher.await;
        // Only now: calls let finish in the grace period kept their leases meanwhile.
        let _ = self.leases.await;
        if let Some(notices) = self.notices {
            let _ = notices.await;
        }
    }
}

/// Acts on what other nodes announce: new work, a callback due, a cancelled job.
async fn notice_loop(engine: Arc<Engine>, mut notices: Notices, stop: CancellationToken) {
    loop {
        let notice = tokio::select! {
            _ = stop.cancelled() => return,
            n = notices.next() => n,
        };
        match notice {
            Some(Notice::Work) => {
                engine.bus.work();
                // A submission or a change of options there may have set a deadline.
                engine.bus.deadlines();
            }
            Some(Notice::CallbackDue) => engine.bus.callbacks_due(),
            Some(Notice::Retried(id)) => {
                engine.bus.forget_cancel(id);
                engine.bus.work();
                engine.bus.deadlines();
            }
            Some(Notice::Cancelled(id)) => {
                // Even when this node has no token for the job yet: a claim that committed
                // just before the cancel may be about to look one up, and must find it
                // cancelled (as after a cancel through this node's API).
                tracing::debug!(job_id = %id, "job cancelled; aborting its calls here, if any");
                engine.bus.cancel_calls(id);
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
