//! DoParallel: a fan-out/fan-in job runner.
//!
//! A job is a list of tasks, each an HTTP endpoint with parameters. The [`engine`] calls
//! every endpoint in parallel, the [`store`] keeps every task's status and result durably,
//! and when all tasks are finished the [`outbox`] POSTs the collected results to the job's
//! callback URL. [`api`] is the HTTP face. These parts meet only through the store and the
//! [`bus`]; [`server`] puts them together, and `src/main.rs` only parses the command line
//! and calls [`serve`] or [`run_job`]. ARCHITECTURE.md has the map and the import rules.

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
pub mod aws;
pub mod bus;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod document;
pub mod egress;
pub mod engine;
pub mod job;
pub mod lambda;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod outbox;
pub mod progress;
pub mod sealing;
pub mod server;
pub mod store;
pub mod task_token;
pub mod telemetry;
pub mod webhook;

pub use server::{
    RunOutcome, ServeError, ServeOptions, Settings, WorkEnd, WorkOptions, WorkReport, run_job,
    serve, work,
};
