//! The options of the client commands (`submit`, `status`, `tasks`, `jobs`, `cancel`,
//! `delete`, `pause`, `resume`, `update`, `retry`, `groups`, `group`).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use url::Url;

use super::{Secret, parse_rate};
use crate::job::JobStatus;

// The client commands' options. Where to reach the server and the token have environment
// variables, as every service option does; the flags that say what one command does
// (--json, --wait, --failed, --status, --limit, --after) have none on purpose: a variable left
// set in a shell would silently change the output a script parses.

/// How the client commands reach the server; flattened into each of them.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Base URL of the DoParallel server.
    #[arg(
        long,
        env = "DOPARALLEL_SERVER",
        default_value = "http://127.0.0.1:8080",
        value_parser = parse_server_url
    )]
    pub server: Url,

    /// Bearer token sent with every request (never printed). An argument shows in `ps`:
    /// prefer --token-file or DOPARALLEL_TOKEN.
    #[arg(long, env = "DOPARALLEL_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// File holding the bearer token (its first line).
    #[arg(long, env = "DOPARALLEL_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Print the server's JSON answer as is, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (the body of POST /v1/job); `-` reads standard input.
    pub job: PathBuf,

    /// Wait for the job to finish, showing its progress on stderr, then print its final
    /// document; the exit code is the job's (0 Complete, 1 Failed, 3 Cancelled).
    #[arg(long)]
    pub wait: bool,

    /// Sent as the `Idempotency-Key` header: submitting again with the same key (after a
    /// timeout, say) answers the first job instead of starting a second.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job's id.
    pub id: String,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct TasksArgs {
    /// The job's id.
    pub id: String,

    /// Only the failed tasks.
    #[arg(long)]
    pub failed: bool,

    /// Most tasks to show (one page of the API).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Start after this task index (the next page is printed as a hint).
    #[arg(long, default_value_t = 0)]
    pub after: u64,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this status: Scheduled, Pending, Running, Complete, Failed or
    /// Cancelled.
    #[arg(long, value_parser = parse_job_status)]
    pub status: Option<JobStatus>,

    /// Only jobs whose metadata has this top-level key with this string value.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_metadata_filter)]
    pub metadata: Option<(String, String)>,

    /// Only jobs of this group (`options.group`).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,

    /// Most jobs to show (one page of the API).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Only jobs older than this job id (the next page is printed as a hint).
    #[arg(long)]
    pub after: Option<String>,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("limits").required(true).multiple(true)
    .args(["concurrency", "per_host_concurrency", "per_host_rate", "deadline_ms", "priority"])))]
pub struct UpdateArgs {
    /// The job's id.
    pub id: String,

    /// Most calls of the job in flight at once (`none`: no limit of its own).
    #[arg(long, value_name = "N|none", value_parser = parse_limit)]
    pub concurrency: Option<Limit<u64>>,

    /// Most calls of the job in flight at once to one host: a number, `auto` (a limit that
    /// adapts to the host's answers), or `none` (no limit of its own).
    #[arg(long, value_name = "N|auto|none", value_parser = parse_host_concurrency)]
    pub per_host_concurrency: Option<Limit<crate::job::HostConcurrency>>,

    /// Most calls of the job started per second to one host (`none`: no limit of its own).
    #[arg(long, value_name = "RATE|none", value_parser = parse_rate_or_none)]
    pub per_host_rate: Option<Limit<f64>>,

    /// The job's time budget, in milliseconds from its submission (from its retry, for a
    /// later run); `none`: no deadline.
    #[arg(long, value_name = "MS|none", value_parser = parse_limit)]
    pub deadline_ms: Option<Limit<u64>>,

    /// The job's priority, from -10 to 10 (0 by default): higher ones are served first.
    #[arg(long, value_name = "P", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-10..=10))]
    pub priority: Option<i32>,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// A limit given on the command line: a value, or `None` for `none` (no limit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit<T>(pub Option<T>);

/// A whole number of 1 or more, or `none`.
fn parse_limit(text: &str) -> Result<Limit<u64>, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    match text.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(Limit(Some(n))),
        _ => Err(format!(
            "{text:?} is not a whole number of 1 or more, nor none"
        )),
    }
}

/// A limit per host (`N` or `auto`), or `none`.
fn parse_host_concurrency(text: &str) -> Result<Limit<crate::job::HostConcurrency>, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    crate::job::HostConcurrency::parse(text)
        .map(|c| Limit(Some(c)))
        .map_err(|e| format!("{e}, nor none"))
}

/// Calls per second (see [`parse_rate`]), or `none`.
fn parse_rate_or_none(text: &str) -> Result<Limit<f64>, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    parse_rate(text).map(|r| Limit(Some(r)))
}

#[derive(Debug, Args)]
pub struct GroupsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    pub action: GroupAction,
}

#[derive(Debug, Subcommand)]
pub enum GroupAction {
    /// Set a group's own limits, shared by all its jobs across every node. A limit not
    /// given keeps its value; `none` removes it.
    #[command(group(clap::ArgGroup::new("limits").required(true).multiple(true)
        .args(["concurrency", "rate"])))]
    Set {
        /// The group's name (the jobs' `options.group`).
        name: String,
        /// Most calls of the group's jobs in flight at once (`none`: the server's
        /// --group-concurrency, if any).
        #[arg(long, value_name = "N|none", value_parser = parse_limit)]
        concurrency: Option<Limit<u64>>,
        /// Most calls of the group's jobs started per second (`none`: no limit).
        #[arg(long, value_name = "RATE|none", value_parser = parse_rate_or_none)]
        rate: Option<Limit<f64>>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a group's limits, its calls in flight and its unfinished jobs.
    Show {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a group's own limits (it has the server's default again).
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The job's id.
    pub id: String,

    /// Run its cancelled tasks again too (a cancelled job needs it).
    #[arg(long)]
    pub include_cancelled: bool,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job's id.
    pub id: String,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// An absolute http(s) URL; the client joins `v1/...` to it, so a path prefix (a server
/// behind a reverse proxy) is kept.
fn parse_server_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
        return Err(format!(
            "{text:?} is not an http(s) URL such as http://127.0.0.1:8080"
        ));
    }
    Ok(url)
}

/// `KEY=VALUE`, a filter on a job's metadata.
fn parse_metadata_filter(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// A job status, in any letter case (`complete` is `Complete`).
fn parse_job_status(text: &str) -> Result<JobStatus, String> {
    const ALL: [JobStatus; 7] = [
        JobStatus::Scheduled,
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Complete,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];
    ALL.into_iter()
        .find(|s| s.as_str().eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            format!("unknown job status {text:?}; expected Scheduled, Pending, Running, Paused, Complete, Failed or Cancelled")
        })
}
