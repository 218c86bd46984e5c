//! DoParallel: a fan-out/fan-in job runner.
//!
//! A job is a list of tasks, each an HTTP endpoint with parameters. The [`engine`] calls
//! every endpoint in parallel, the [`store`] keeps every task's status and result durably,
//! and when all tasks are finished [`callback`] POSTs the collected results to the job's
//! callback URL. [`api`] is the HTTP face; `src/main.rs` only parses the command line and
//! wires these together through [`serve`] and [`run_job`]. ARCHITECTURE.md has the map.

/// A place where the fault tests stop the process dead, as a power cut or SIGKILL would
/// (`tests/it/failpoints.rs`). Compiled in only with the `failpoints` feature, and inert
/// unless the `FAILPOINTS` environment variable arms it (`FAILPOINTS=name=return`).
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            tracing::error!(point = $name, "crash point reached; aborting");
            std::process::abort()
        })
    };
}

/// A place where the fault tests hold the code still while they bring a fault about
/// (`FAILPOINTS=name=return(MILLISECONDS)`). The wait is asynchronous, so the rest of the
/// process goes on meanwhile (a response already produced is sent, other requests are
/// served). Inert unless `FAILPOINTS` names the point, and compiled out without the
/// `failpoints` feature.
pub(crate) async fn pause_point(name: &str) {
    fn requested(name: &str) -> Option<u64> {
        let _ = name;
        fail::fail_point!(name, |arg: Option<String>| arg.and_then(|a| a.parse().ok()));
        None
    }
    if let Some(ms) = requested(name) {
        tracing::warn!(point = name, ms, "pause point reached");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

pub mod api;
pub mod auth;
pub mod callback;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod egress;
pub mod engine;
pub mod job;
pub mod listener;
pub mod metrics;
pub mod progress;
pub mod store;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

use crate::config::EngineConfig;
use crate::engine::{EngineError, Event};
use crate::job::{JobStatus, NewJob};
use crate::store::{Store, StoreError};

/// What `serve` needs besides its resources.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub engine: EngineConfig,
    pub shutdown_grace: Duration,
    /// Limits on incoming connections and request bodies.
    pub listen: listener::ListenLimits,
    /// Empty: no authentication.
    pub tokens: auth::ApiTokens,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Serves the API on `listener` with the engine running over `store`, until `shutdown`
/// resolves; then stops accepting, gives requests and calls in flight `shutdown_grace` to
/// finish (side by side), closes every connection still open, and returns. Whatever is left
/// unfinished is in the store for the next start.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let mut config = options.engine;
    config.local_url = Some(default_public_url(listener.local_addr()?));
    let handle = engine::start(store, config).await?;
    let app = api::router(
        handle.engine.clone(),
        Arc::new(options.tokens),
        options.listen.max_body_bytes,
    );
    let addr = listener.local_addr()?;
    // The address as a field of its own too, for a JSON log's readers.
    tracing::info!(%addr, "listening on {addr}");
    let stopping = tokio_util::sync::CancellationToken::new();
    let signal = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal.cancel();
    });
    let grace = options.shutdown_grace;
    let connections = handle.engine.metrics.connections.clone();
    let outbound = handle.engine.outbound.clone();
    let http = listener::serve(
        listener,
        app,
        options.listen,
        connections,
        stopping.clone().cancelled_owned(),
        grace,
        move || outbound.out_of_descriptors(),
    );
    let engine = async {
        stopping.cancelled().await;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down");
        handle.shutdown(grace).await;
    };
    tokio::join!(http, engine);
    Ok(())
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

/// Runs one job to its end on an engine of its own: waits for every task and, when the job
/// has a callback, for its delivery (or its last failed attempt).
pub async fn run_job(
    store: Arc<dyn Store>,
    config: EngineConfig,
    job: NewJob,
) -> Result<RunOutcome, ServeError> {
    let handle = engine::start(store.clone(), config).await?;
    let mut events = handle.engine.subscribe();
    handle.engine.submit(&job, None).await?;
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
    handle.shutdown(Duration::ZERO).await;
    let record = store.job_get(job.id).await?.ok_or(StoreError::NotFound)?;
    let document = callback::document(store.as_ref(), &record).await?;
    Ok(RunOutcome {
        status: record.status,
        document,
        callback_delivered,
    })
}
