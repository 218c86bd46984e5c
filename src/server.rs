//! One node put together: what `doparallel serve` and `doparallel run` start. The parts
//! (the API, the engine, the callback outbox) import none of each other; this module
//! makes their shared pieces (the bus, the counters, the outbound HTTP client, the
//! task-token key), starts each part with its own settings, and stops them in order.
//!
//! Start: what the last stop left in flight is recovered, the shared backend's notices
//! are subscribed to and the task-token key is read, each retried while the store is
//! unavailable. Stop: the listener and the engine get the grace period side by side, the
//! outbox as well, and whatever is left unfinished is in the store for the next start.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig, Services};
use crate::auth::ApiTokens;
use crate::bus::{Bus, Event};
use crate::document;
use crate::egress::EgressPolicy;
use crate::engine::{self, EngineConfig, EngineHandle, IDLE_POLL, SHARED_IDLE_POLL};
use crate::job::{HostLimits, JobStatus, Limits, NewJob};
use crate::listener::{self, ListenLimits};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, OutboundSettings};
use crate::outbox::{Outbox, OutboxConfig};
use crate::sealing::Sealer;
use crate::store::{Store, StoreError, StoreResult};
use crate::task_token::TaskTokens;
use crate::telemetry::Telemetry;
use crate::webhook::{CallbackSigners, Signer};

/// A node's settings, each given once: what the command line (`crate::config`) or a test
/// resolves to. [`Settings::parts`] hands each part its own slice of them.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_in_flight: usize,
    /// Most calls of one owner in flight on this node; `None`: no limit.
    pub owner_max_in_flight: Option<u64>,
    /// The server's limits on calls to one endpoint host, for all jobs together.
    pub per_host: HostLimits,
    /// How adaptive limits (`auto`) start, and when a host's breaker opens.
    pub per_host_adaptation: crate::engine::hosts::Adaptation,
    /// How long a job below the highest priority may go unserved (`plan::levels`).
    pub priority_max_wait: Duration,
    /// The most calls in flight of a group without a concurrency of its own.
    pub group_concurrency: Option<u32>,
    /// The largest answer (or reported outcome) a task may have.
    pub max_response_bytes: usize,
    /// Delays between callback attempts after the first.
    pub callback_schedule: Vec<Duration>,
    /// How long one callback attempt may take.
    pub callback_timeout: Duration,
    /// How long finished jobs are kept; `None` keeps them until deleted.
    pub retention: Option<Duration>,
    /// Which addresses task calls and callbacks may reach.
    pub egress: Arc<EgressPolicy>,
    /// Who signs each job's callback.
    pub callback_signers: Arc<CallbackSigners>,
    /// Signs task calls, with keys no callback is signed with.
    pub task_signer: Arc<Signer>,
    /// Seals secret header values at submission and opens them for the calls.
    pub sealer: Arc<Sealer>,
    /// Bounds on a submission.
    pub limits: Limits,
    /// A callback document larger than this is sent without `result`.
    pub max_callback_bytes: usize,
    /// How long a claimed task stays leased to a node without renewal.
    pub lease_timeout: Duration,
    /// How long an idle outgoing connection is kept for reuse.
    pub outbound_idle_timeout: Duration,
    /// The base URL endpoints post reported outcomes to; `None`: this server's own address
    /// (`serve`), or no API at all (`run`).
    pub public_url: Option<url::Url>,
}

/// The settings of each part of a node.
#[derive(Clone, Debug)]
pub struct PartsConfig {
    pub engine: EngineConfig,
    pub outbox: OutboxConfig,
    pub api: ApiConfig,
    pub outbound: OutboundSettings,
}

impl Settings {
    /// Each part's own configuration; `local_url` is where this node's API listens, if it
    /// has one.
    pub fn parts(&self, local_url: Option<url::Url>) -> PartsConfig {
        PartsConfig {
            engine: EngineConfig {
                max_in_flight: self.max_in_flight,
                owner_max_in_flight: self.owner_max_in_flight,
                per_host: self.per_host,
                adaptation: self.per_host_adaptation,
                priority_max_wait: self.priority_max_wait,
                group_concurrency: self.group_concurrency,
                max_response_bytes: self.max_response_bytes,
                retention: self.retention,
                egress: self.egress.clone(),
                task_signer: self.task_signer.clone(),
                sealer: self.sealer.clone(),
                aws_signer: Default::default(),
                reports_need_url: false,
                // The node's own, set when it starts.
                telemetry: Arc::new(Telemetry::disabled()),
                lease_timeout: self.lease_timeout,
                public_url: self.public_url.clone(),
                local_url,
            },
            outbox: OutboxConfig {
                schedule: self.callback_schedule.clone(),
                timeout: self.callback_timeout,
                max_callback_bytes: self.max_callback_bytes,
                signers: self.callback_signers.clone(),
                egress: self.egress.clone(),
                // The node's own, set when it starts (it counts into the node's metrics).
                telemetry: Arc::new(Telemetry::disabled()),
            },
            api: ApiConfig {
                limits: self.limits.clone(),
                egress: self.egress.clone(),
                sealer: self.sealer.clone(),
                max_callback_bytes: self.max_callback_bytes,
                max_response_bytes: self.max_response_bytes,
                event_streams: true,
                group_concurrency: self.group_concurrency,
            },
            outbound: OutboundSettings {
                egress: self.egress.clone(),
                idle_timeout: self.outbound_idle_timeout,
                // As many idle connections as calls in flight: fewer made the busiest runs
                // open a connection per call (docs/performance.md).
                idle_per_host: self.max_in_flight,
            },
        }
    }
}

/// What `serve` needs besides its resources.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub settings: Settings,
    pub shutdown_grace: Duration,
    /// Limits on incoming connections and request bodies.
    pub listen: ListenLimits,
    /// Empty: no authentication.
    pub tokens: ApiTokens,
    /// Serve the API only: no calls, no callbacks (`work` processes make them).
    pub api_only: bool,
}

/// Errors that keep a node from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot recover interrupted tasks: {0}")]
    Recover(#[source] StoreError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error("cannot listen for other nodes' notices: {0}")]
    Listen(#[source] StoreError),
    #[error("cannot read the task token key: {0}")]
    TokenKey(#[source] StoreError),
    #[error("HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A started node without its HTTP face.
pub(crate) struct Node {
    pub(crate) services: Services,
    pub(crate) telemetry: Arc<Telemetry>,
    outbound: Arc<Outbound>,
    /// The engine and the outbox; `None` on an API-only node.
    work: Option<Workers>,
}

/// The loops that make calls and send callbacks.
struct Workers {
    engine: EngineHandle,
    outbox: tokio::task::JoinHandle<()>,
    outbox_stop: CancellationToken,
    /// Callback deliveries under way.
    deliveries: Arc<std::sync::atomic::AtomicUsize>,
}

/// What a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Engine and outbox (`serve`, `work`, `run`).
    Work,
    /// Neither: another process calls and calls back (`serve --api-only`).
    ApiOnly,
}

impl Node {
    pub(crate) async fn start(
        store: Arc<dyn Store>,
        mut parts: PartsConfig,
        role: Role,
    ) -> Result<Node, ServeError> {
        let recovered = at_start("recovering interrupted tasks", || store.tasks_recover())
            .await
            .map_err(ServeError::Recover)?;
        if recovered > 0 {
            tracing::info!(
                recovered,
                "tasks interrupted by the last stop will be called again"
            );
        }
        let outbound = Outbound::new(parts.outbound).map_err(ServeError::Http)?;
        let notices = at_start("listening for other nodes", || store.listen())
            .await
            .map_err(ServeError::Listen)?;
        let key = at_start("reading the task token key", || store.task_token_key())
            .await
            .map_err(ServeError::TokenKey)?;
        let metrics = Arc::new(Metrics::new());
        let telemetry = Arc::new(Telemetry::from_env(metrics.trace_spans_dropped.clone()));
        let telemetry_enabled = telemetry.enabled();
        let node_telemetry = telemetry.clone();
        parts.engine.telemetry = telemetry.clone();
        parts.outbox.telemetry = telemetry;
        let services = Services {
            store,
            bus: Bus::new(),
            metrics,
            tokens: Arc::new(TaskTokens::new(&key)),
        };
        let idle_poll = if notices.is_some() {
            SHARED_IDLE_POLL
        } else {
            IDLE_POLL
        };
        if telemetry_enabled {
            tokio::spawn(end_job_spans(
                services.store.clone(),
                services.bus.subscribe(),
                parts.engine.telemetry.clone(),
            ));
        }
        let work = (role == Role::Work).then(|| {
            let engine = engine::start(
                engine::Parts {
                    store: services.store.clone(),
                    bus: services.bus.clone(),
                    metrics: services.metrics.clone(),
                    outbound: outbound.clone(),
                    tokens: services.tokens.clone(),
                    notices,
                },
                parts.engine,
            );
            let outbox_stop = CancellationToken::new();
            let deliveries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let outbox = Outbox {
                store: services.store.clone(),
                bus: services.bus.clone(),
                metrics: services.metrics.clone(),
                outbound: outbound.clone(),
                config: parts.outbox,
                idle_poll,
                deliveries: deliveries.clone(),
            }
            .start(outbox_stop.clone());
            Workers {
                engine,
                outbox,
                outbox_stop,
                deliveries,
            }
        });
        if work.is_none() {
            tracing::info!("API only: another process makes the calls and sends the callbacks");
        }
        Ok(Node {
            telemetry: node_telemetry,
            services,
            outbound,
            work,
        })
    }

    /// Whether this node has nothing to do now or within `margin`: its engine is idle (see
    /// `EngineHandle::idle`), no callback is being delivered, and none is due within
    /// `margin`.
    async fn idle(&self, margin: Duration) -> bool {
        let Some(work) = &self.work else {
            return true;
        };
        if !work.engine.idle(margin)
            || work.deliveries.load(std::sync::atomic::Ordering::SeqCst) > 0
        {
            return false;
        }
        match self.services.store.callback_next_due().await {
            Ok(None) => true,
            Ok(Some(due)) => due > crate::store::now_millis() + margin.as_millis() as i64,
            Err(_) => false,
        }
    }

    /// Stops claiming and sending; calls in flight and callbacks being sent get up to
    /// `grace` to finish, side by side.
    async fn shutdown(self, grace: Duration) {
        if let Some(mut work) = self.work {
            work.outbox_stop.cancel();
            let outbox = async {
                if tokio::time::timeout(grace, &mut work.outbox).await.is_err() {
                    tracing::warn!("grace period over; callbacks being sent will be sent again");
                    // Dropping the outbox's loop drops its deliveries under way: none
                    // outlives the node.
                    work.outbox.abort();
                    let _ = (&mut work.outbox).await;
                }
            };
            tokio::join!(work.engine.shutdown(grace), outbox);
        }
        self.telemetry.flush(Duration::from_secs(2)).await;
    }
}

/// Ends the spans of the jobs without a callback that finish on this node, however they
/// finish (a settle, a report, a cancel, an empty submission); a job with a callback
/// ends its span when its delivery ends, in the outbox.
async fn end_job_spans(
    store: Arc<dyn Store>,
    mut events: tokio::sync::broadcast::Receiver<Event>,
    telemetry: Arc<Telemetry>,
) {
    loop {
        let id = match events.recv().await {
            Ok(Event::JobFinished { job_id, .. }) => job_id,
            Ok(_) => continue,
            // A span missed when this node finished more than the bus holds: counted.
            Err(RecvError::Lagged(n)) => {
                telemetry.count_dropped(n);
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if let Ok(Some(job)) = store.job_get(id).await
            && job.callback_url.is_none()
            && let Some(trace) = &job.options.trace
        {
            telemetry.job_ended(
                trace,
                crate::telemetry::JobEnd {
                    job_id: &id.to_string(),
                    status: job.status.as_str(),
                    tasks: job.total,
                    created_at_ms: job.created_at,
                    callback: "none",
                },
            );
        }
    }
}

/// Runs one start-up step, retrying while the store is unavailable (a lost answer, a
/// throttled request, a database still starting), as every later store call does: a
/// passing condition must not keep a node from starting. Other errors (a missing table, a
/// refused permission) end the start at once.
async fn at_start<T, F, Fut>(what: &str, mut step: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StoreResult<T>>,
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

/// Serves the API on `listener` with the engine and the outbox running over `store`, until
/// `shutdown` resolves; then stops accepting, gives requests, calls and callbacks in flight
/// `shutdown_grace` to finish (side by side), closes every connection still open, and
/// returns. Whatever is left unfinished is in the store for the next start.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let parts = options.settings.parts(Some(default_public_url(addr)));
    let api_config = parts.api.clone();
    let role = if options.api_only {
        Role::ApiOnly
    } else {
        Role::Work
    };
    let node = Node::start(store, parts, role).await?;
    let app = api::router(
        node.services.clone(),
        api_config,
        Arc::new(options.tokens),
        options.listen.max_body_bytes,
    );
    // The address as a field of its own too, for a JSON log's readers.
    tracing::info!(%addr, "listening on {addr}");
    let stopping = CancellationToken::new();
    let signal = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal.cancel();
    });
    let grace = options.shutdown_grace;
    let connections = node.services.metrics.connections.clone();
    let outbound = node.outbound.clone();
    let http = listener::serve(
        listener,
        app,
        options.listen,
        connections,
        stopping.clone().cancelled_owned(),
        grace,
        move || outbound.out_of_descriptors(),
    );
    let parts = async {
        stopping.cancelled().await;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down");
        node.shutdown(grace).await;
    };
    tokio::join!(http, parts);
    Ok(())
}

/// How a worker ([`work`]) runs.
#[derive(Clone, Debug)]
pub struct WorkOptions {
    pub settings: Settings,
    /// Stop once nothing is due, in flight, or awaiting a callback attempt within
    /// [`IDLE_MARGIN`].
    pub until_idle: bool,
    /// Stop taking work after this long, and end once the calls in flight settle.
    pub max_duration: Option<Duration>,
    /// After a stop, how long calls and callbacks in flight may take to finish.
    pub shutdown_grace: Duration,
}

/// Work due further ahead than this is left to the next worker: `work --until-idle` does
/// not wait for it.
pub const IDLE_MARGIN: Duration = Duration::from_secs(5);

/// Why a worker stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkEnd {
    /// Nothing left to do within [`IDLE_MARGIN`].
    Idle,
    /// `max_duration` passed.
    MaxDuration,
    /// The shutdown future resolved (a signal).
    Stopped,
}

/// What a worker did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkReport {
    /// Task call attempts made and settled.
    pub calls: u64,
    /// Callback attempts made.
    pub callbacks: u64,
    pub ended: WorkEnd,
}

/// A node that makes calls and sends callbacks without serving the API: `doparallel work`.
/// It shares the store's leases with every other node, so any mix of `serve`,
/// `serve --api-only` and `work` processes on one shared database is correct, and killing
/// it at any moment is a node dying: its leases return its work to the others.
pub async fn work(
    store: Arc<dyn Store>,
    options: WorkOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<WorkReport, ServeError> {
    // From the call, not from the end of the start: a Lambda invocation's time runs from
    // its beginning.
    let started = tokio::time::Instant::now();
    let deadline = options.max_duration.map(|d| started + d);
    let mut parts = options.settings.parts(None);
    parts.engine.reports_need_url = true;
    let node = Node::start(store, parts, Role::Work).await?;
    tokio::pin!(shutdown);
    let ended = loop {
        let tick = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            _ = &mut shutdown => break WorkEnd::Stopped,
            _ = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => break WorkEnd::MaxDuration,
            _ = tick => {}
        }
        if options.until_idle && node.idle(IDLE_MARGIN).await {
            break WorkEnd::Idle;
        }
    };
    tracing::info!(ended = ?ended, "worker stopping");
    let metrics = node.services.metrics.clone();
    node.shutdown(options.shutdown_grace).await;
    Ok(WorkReport {
        calls: metrics.attempts_made(),
        callbacks: metrics.callback_attempts_made(),
        ended,
    })
}

/// Where endpoints report outcomes when no public URL is given: this listener's address,
/// with a wildcard address read as loopback (the only address it surely answers on; a
/// deployment behind a proxy or on another host sets `--public-url`).
fn default_public_url(addr: std::net::SocketAddr) -> url::Url {
    let ip = match addr.ip() {
        ip if !ip.is_unspecified() => ip,
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    let addr = std::net::SocketAddr::new(ip, addr.port());
    url::Url::parse(&format!("http://{addr}")).expect("an address makes a URL")
}

/// How a job run by [`run_job`] ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub status: JobStatus,
    /// The final document, as the callback receives it.
    pub document: Vec<u8>,
    /// `None` when the job has no callback; else whether it was delivered.
    pub callback_delivered: Option<bool>,
}

/// Runs one job to its end on a node of its own, without an API: waits for every task and,
/// when the job has a callback, for its delivery (or its last failed attempt).
pub async fn run_job(
    store: Arc<dyn Store>,
    settings: Settings,
    job: NewJob,
) -> Result<RunOutcome, ServeError> {
    let node = Node::start(store.clone(), settings.parts(None), Role::Work).await?;
    let mut events = node.services.bus.subscribe();
    api::commands::submit(&node.services, &job, None).await?;
    let has_callback = job.callback.is_some();
    let mut status = None;
    let mut callback_delivered = None;
    while status.is_none() || (has_callback && callback_delivered.is_none()) {
        match events.recv().await {
            Ok(Event::JobFinished { job_id, status: s }) if job_id == job.id => status = Some(s),
            Ok(Event::CallbackSettled { job_id, delivered }) if job_id == job.id => {
                callback_delivered = Some(delivered)
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => break,
        }
    }
    node.shutdown(Duration::ZERO).await;
    let record = store.job_get(job.id).await?.ok_or(StoreError::NotFound)?;
    let document = document::document(store.as_ref(), &record).await?;
    Ok(RunOutcome {
        status: record.status,
        document,
        callback_delivered,
    })
}
