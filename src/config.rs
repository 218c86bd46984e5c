//! Command-line options and the typed configuration they become.
//!
//! Every option has an environment variable, so a container or a unit file can configure the
//! service without a command line. The clap structs stay here; they resolve to the node's
//! `server::Settings`, whose fields have no defaults of their own (each entry point says
//! what it wants), and which hand each part its own slice (`Settings::parts`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::egress::EgressPolicy;
use crate::job::{HostConcurrency, HostLimits, Limits, PER_HOST_RATES};
use crate::sealing::{Sealer, SecretKey};
use crate::server::Settings;
use crate::webhook::{CallbackSigners, Signer, WebhookSecret};

#[derive(Debug, Parser)]
#[command(
    name = "doparallel",
    version,
    about = "Fan-out/fan-in job runner: calls every task's endpoint in parallel, stores each \
             result durably, and POSTs the collected results to the job's callback."
)]
pub struct Cli {
    /// Log format on stderr: `pretty` for people, `json` (one object per line) for machines.
    #[arg(
        long,
        global = true,
        env = "DOPARALLEL_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve(Box<ServeArgs>),
    /// Make calls and send callbacks without serving the API, beside `serve --api-only`
    /// processes on a shared database (or in turn with one, on SQLite); with --until-idle,
    /// exit once nothing is left to do (a cron job, a batch step).
    Work(Box<WorkArgs>),
    /// Run as an AWS Lambda function (the default when the binary starts with no arguments
    /// inside Lambda): HTTP events are API requests, `{"doparallel": "work"}` and scheduled
    /// events drain due work until the invocation's time is nearly out.
    Lambda(Box<LambdaArgs>),
    /// Create the database's schema: a DynamoDB table (on-demand capacity, with its
    /// indexes), or a SQLite file's tables. Waits until it is ready.
    Migrate(MigrateArgs),
    /// Run one job in-process (no server), print its final document, exit 0 if Complete.
    Run(Box<RunArgs>),
    /// Print a new webhook signing secret (for --webhook-secret), or with --key a new key
    /// for sealing secret headers (for --secret-key).
    Secret(SecretArgs),
    /// Submit a job to a running server and print its id (or, with --wait, its final
    /// document).
    Submit(SubmitArgs),
    /// Show one job: status, progress, failures, age.
    Status(StatusArgs),
    /// List the tasks of a job.
    Tasks(TasksArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Cancel an unfinished job.
    Cancel(CancelArgs),
    /// Pause an unfinished job: no new call of it starts until it is resumed.
    Pause(CancelArgs),
    /// Change a running job's limits (each takes effect at the next claim on every node).
    Update(UpdateArgs),
    /// Resume a paused job.
    Resume(CancelArgs),
    /// Run a finished job's failed tasks again (with --include-cancelled, its cancelled
    /// ones too), with a fresh attempt budget; a new callback follows when it finishes.
    Retry(RetryArgs),
    /// Delete a finished job and its results now (retention would later).
    Delete(CancelArgs),
    /// List the groups of your jobs: their limits, calls in flight and unfinished jobs.
    Groups(GroupsArgs),
    /// Set, show or remove the limits a group of jobs shares across every node.
    Group(GroupArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is logged).
    #[arg(long, env = "DOPARALLEL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub node: NodeArgs,

    /// Serve the API (and the dashboard) only: make no calls and send no callbacks;
    /// `doparallel work` processes on the same database do.
    #[arg(long, env = "DOPARALLEL_API_ONLY")]
    pub api_only: bool,

    #[command(flatten)]
    pub api: ApiArgs,

    /// Most incoming connections open at once; one more is closed as soon as it is
    /// accepted. Default: half the open-file limit (raised to its hard limit at start), the
    /// other half left to task calls, callbacks and the database.
    #[arg(long, env = "DOPARALLEL_MAX_CONNECTIONS", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// How long a client has to send a request's head (headers): from the connection's
    /// start, or from the first byte of the next request on a kept-alive connection.
    #[arg(long, env = "DOPARALLEL_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a client has to send a request's whole body (`408` after it).
    #[arg(long, env = "DOPARALLEL_BODY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// How long a kept-alive connection may wait for its next request.
    #[arg(long, env = "DOPARALLEL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
}

/// Who may use the API (`serve`, `lambda`).
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// API token that clients must send (`Authorization: Bearer TOKEN`). Repeatable, or
    /// comma-separated in the environment; each token sees only the jobs it created.
    #[arg(
        long = "api-token",
        env = "DOPARALLEL_API_TOKENS",
        value_delimiter = ',',
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Vec<Secret>,

    #[command(flatten)]
    pub token_file: TokenFileArg,

    /// Serve without any API token: on a non-loopback address (`serve`), or as a Lambda
    /// function (whose URL AWS IAM may guard instead).
    #[arg(long, env = "DOPARALLEL_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "DOPARALLEL_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

/// The file of API tokens, some with the callback secret of their jobs: read by the API
/// for the tokens and by whoever sends callbacks (`serve`, `work`, `lambda`) for the
/// secrets.
#[derive(Debug, Args)]
pub struct TokenFileArg {
    /// File of API tokens, one per line (blank lines and lines starting with # are
    /// skipped); `TOKEN whsec_SECRET` signs the callbacks of that token's jobs with SECRET.
    #[arg(long, env = "DOPARALLEL_API_TOKEN_FILE", value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,
}

/// `doparallel lambda`: the API and the worker as an AWS Lambda function.
#[derive(Debug, Args)]
pub struct LambdaArgs {
    #[command(flatten)]
    pub node: NodeArgs,

    #[command(flatten)]
    pub api: ApiArgs,

    /// The Lambda function (name or ARN) to invoke asynchronously, with
    /// `{"doparallel": "work"}`, when an HTTP request has made work due (a job accepted, a
    /// reported outcome, a cancel), so that it starts at once rather than at the next
    /// schedule. Unset: the schedule alone starts the work.
    #[arg(long, env = "DOPARALLEL_WORKER_FUNCTION", value_name = "FUNCTION")]
    pub worker_function: Option<String>,
}

/// What every long-running node takes (`serve`, `work`).
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Database URL: sqlite://PATH (created with its schema if missing),
    /// postgres://USER@HOST:PORT/DATABASE (its schema created or brought up to date at start;
    /// several nodes may share it), or dynamodb://TABLE?region=REGION[&endpoint=URL] (created
    /// by `doparallel migrate`).
    #[arg(
        long,
        env = "DOPARALLEL_DATABASE_URL",
        default_value = "sqlite://doparallel.db"
    )]
    pub database: String,

    /// How long calls and requests in flight get to finish after SIGTERM or Ctrl-C (or, for `work`, a stop) (units
    /// ms, s, m, h; a bare number is seconds).
    #[arg(long, env = "DOPARALLEL_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// The URL task endpoints reach the API at, for reporting the outcome of a task they
    /// answered with 202 (`DoParallel-Result-Url` is this plus `/v1/tasks/{token}/result`).
    /// For `serve`, without it only the calls of jobs with the option `async_reports` carry
    /// a result URL, made of the listening address; for `work` (which has no API), the
    /// calls of such jobs fail without it.
    #[arg(long, env = "DOPARALLEL_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<url::Url>,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Delays between callback attempts after the first (units ms, s, m, h).
    #[arg(
        long,
        env = "DOPARALLEL_CALLBACK_RETRY_SCHEDULE",
        default_value = "5s,5m,30m,2h,5h,10h,10h"
    )]
    pub callback_retry_schedule: Schedule,

    /// How long finished jobs are kept before they are purged (units ms, s, m, h, d).
    #[arg(long, env = "DOPARALLEL_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,
}

#[derive(Debug, Args)]
pub struct WorkArgs {
    #[command(flatten)]
    pub node: NodeArgs,

    /// The API's token file, for the callback secrets it gives some tokens' jobs (the
    /// tokens themselves are not used: `work` serves no API).
    #[command(flatten)]
    pub token_file: TokenFileArg,

    /// Exit (0) once nothing is due, in flight, or awaiting a callback attempt within the
    /// next few seconds, printing how many calls and callbacks it made.
    #[arg(long)]
    pub until_idle: bool,

    /// Stop taking work after this long (units ms, s, m, h), and exit once the calls in
    /// flight settle (within --shutdown-grace).
    #[arg(long, env = "DOPARALLEL_MAX_DURATION", value_parser = parse_duration)]
    pub max_duration: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database URL, as given to serve: sqlite://PATH, postgres://USER@HOST:PORT/DATABASE or
    /// dynamodb://TABLE?region=REGION[&endpoint=URL].
    #[arg(long, env = "DOPARALLEL_DATABASE_URL")]
    pub database: String,
}

#[derive(Debug, Args)]
pub struct SecretArgs {
    /// Print a key for --secret-key (64 hex characters) instead of a webhook secret.
    #[arg(long)]
    pub key: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file (the body of POST /v1/job); `-` reads standard input.
    pub job: PathBuf,

    /// Database URL; a temporary SQLite database when not given.
    #[arg(long, env = "DOPARALLEL_DATABASE_URL")]
    pub database: Option<String>,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Guard outbound calls as `serve` does (deny loopback, private, link-local, ... ranges).
    /// Without it (and without --allow-net, which implies it) `run` may reach any address:
    /// the person running it chose the job.
    #[arg(long, env = "DOPARALLEL_DENY_PRIVATE")]
    pub deny_private: bool,

    /// Delays between callback attempts after the first. Shorter than serve's default: the
    /// command waits for the callback's last attempt before it exits.
    #[arg(
        long,
        env = "DOPARALLEL_CALLBACK_RETRY_SCHEDULE",
        default_value = "1s,5s,15s"
    )]
    pub callback_retry_schedule: Schedule,
}

/// Options of the engine shared by `serve` and `run`.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Allows task calls and callbacks to reach this range, which the address guard denies
    /// (loopback, private, link-local, ...): `serve` always guards, `run` with
    /// --deny-private. Repeatable; e.g. 127.0.0.0/8 for local development (a bare address
    /// is that address alone).
    #[arg(
        long = "allow-net",
        env = "DOPARALLEL_ALLOW_NETS",
        value_delimiter = ',',
        value_name = "CIDR",
        value_parser = parse_net
    )]
    pub allow_net: Vec<IpNet>,

    /// Task calls in flight at once across all jobs.
    #[arg(long, env = "DOPARALLEL_MAX_IN_FLIGHT", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Task calls of one owner (API token) in flight at once on this node, so that another
    /// always finds a slot. Default: half of --max-in-flight when API tokens are
    /// configured; no limit without tokens.
    #[arg(long, env = "DOPARALLEL_OWNER_MAX_IN_FLIGHT", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub owner_max_in_flight: Option<u32>,

    /// Calls in flight at once to one endpoint host (`host:port`), across all jobs on this
    /// node: a number, or `auto`, a limit per host that adapts to its answers (it starts at
    /// --per-host-initial, grows while calls succeed at their usual latency, and halves on
    /// a 429, a 503, timeouts, or latency well above its recent best). Unlimited when not
    /// given.
    #[arg(long, env = "DOPARALLEL_PER_HOST_CONCURRENCY", value_name = "N|auto",
          value_parser = HostConcurrency::parse)]
    pub per_host_concurrency: Option<HostConcurrency>,

    /// How long a job may go unserved while jobs of higher priority take every slot: after
    /// that, its next claim serves it at the highest priority waiting, sharing with them.
    #[arg(long, env = "DOPARALLEL_PRIORITY_MAX_WAIT", default_value = "60s",
          value_parser = parse_duration)]
    pub priority_max_wait: Duration,

    /// The most calls in flight at once, across every node, of a group of jobs
    /// (`options.group`) that has no concurrency of its own (`PUT /v1/groups/{name}`).
    /// Unlimited when not given.
    #[arg(long, env = "DOPARALLEL_GROUP_CONCURRENCY", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub group_concurrency: Option<u32>,

    /// Where an adaptive limit per host (`auto`, of the server or of a job) starts.
    #[arg(long, env = "DOPARALLEL_PER_HOST_INITIAL", value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub per_host_initial: u32,

    /// Connection failures in a row after which calls to a host wait (they are not failed)
    /// for a cool-down, 1 s doubling up to 60 s, then one probe call decides whether the
    /// host is back. 0 turns the breaker off.
    #[arg(
        long,
        env = "DOPARALLEL_HOST_BREAKER_FAILURES",
        value_name = "N",
        default_value_t = 20
    )]
    pub host_breaker_failures: u32,

    /// Calls started per second to one endpoint host, across all jobs on this node (may be
    /// fractional: 0.5 is one every 2 s; 0.001 to 1000000). Calls are spaced evenly, with no
    /// burst. Unlimited when not given.
    #[arg(long, env = "DOPARALLEL_PER_HOST_RATE", value_name = "R", value_parser = parse_rate)]
    pub per_host_rate: Option<f64>,

    /// Largest task response body read, in bytes; a larger one fails the task
    /// (`response_too_large`).
    #[arg(long, env = "DOPARALLEL_MAX_RESPONSE_BYTES", default_value_t = 1024 * 1024)]
    pub max_response_bytes: usize,

    /// Secret that signs callbacks (Standard Webhooks `whsec_...`; make one with `doparallel
    /// secret`), never task calls (--task-secret signs those). Repeatable, or
    /// comma-separated, to rotate: every callback is signed with each. An argument shows in
    /// `ps`: prefer --webhook-secret-file or the environment.
    #[arg(
        long,
        env = "DOPARALLEL_WEBHOOK_SECRET",
        value_delimiter = ',',
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Vec<WebhookSecret>,

    /// File of callback signing secrets, one per line (blank lines and lines starting with #
    /// are skipped); added to --webhook-secret.
    #[arg(long, env = "DOPARALLEL_WEBHOOK_SECRET_FILE", value_name = "PATH")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Secret that signs task calls (`whsec_...`), never callbacks; it must differ from every
    /// callback secret. Repeatable, or comma-separated, to rotate. Prefer
    /// --task-secret-file or the environment.
    #[arg(
        long,
        env = "DOPARALLEL_TASK_SECRET",
        value_delimiter = ',',
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub task_secret: Vec<WebhookSecret>,

    /// File of task signing secrets, one per line; added to --task-secret.
    #[arg(long, env = "DOPARALLEL_TASK_SECRET_FILE", value_name = "PATH")]
    pub task_secret_file: Option<PathBuf>,

    /// The key that seals secret header values (`secret_headers`) in the database: 32 bytes
    /// as 64 hex characters or as base64 (make one with `doparallel secret --key`). Without
    /// one, a job with secret headers is refused. An argument shows in `ps`: prefer
    /// --secret-key-file or the environment.
    #[arg(
        long,
        env = "DOPARALLEL_SECRET_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub secret_key: Option<Secret>,

    /// File holding the secret key (instead of --secret-key).
    #[arg(
        long,
        env = "DOPARALLEL_SECRET_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "secret_key"
    )]
    pub secret_key_file: Option<PathBuf>,

    /// While rotating keys: the key before --secret-key, which only opens values sealed
    /// under it (new values are sealed under the current key).
    #[arg(
        long,
        env = "DOPARALLEL_SECRET_KEY_OLD",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub secret_key_old: Option<Secret>,

    /// File holding the old secret key (instead of --secret-key-old).
    #[arg(
        long,
        env = "DOPARALLEL_SECRET_KEY_OLD_FILE",
        value_name = "PATH",
        conflicts_with = "secret_key_old"
    )]
    pub secret_key_old_file: Option<PathBuf>,

    /// A host whose calls may be signed with `aws_sigv4` besides AWS's own Lambda function
    /// URL (`*.lambda-url.REGION.on.aws`) and API Gateway (`*.execute-api.REGION.amazonaws.com`)
    /// hosts: a custom domain in front of them. Repeatable, or comma-separated. Any other host
    /// is refused, so that no client can have the server sign requests to other AWS APIs.
    #[arg(
        long,
        env = "DOPARALLEL_AWS_SIGV4_HOSTS",
        value_delimiter = ',',
        value_name = "HOST"
    )]
    pub aws_sigv4_host: Vec<String>,

    /// Most tasks in one job.
    #[arg(long, env = "DOPARALLEL_MAX_TASKS_PER_JOB", default_value_t = Limits::defaults().max_tasks)]
    pub max_tasks_per_job: usize,

    /// Largest `params` of one task, in bytes as sent.
    #[arg(long, env = "DOPARALLEL_MAX_PARAMS_BYTES", default_value_t = Limits::defaults().max_params_bytes)]
    pub max_params_bytes: usize,

    /// Longest endpoint or callback URL, in characters.
    #[arg(long, env = "DOPARALLEL_MAX_URL_LENGTH", default_value_t = Limits::defaults().max_url_len)]
    pub max_url_length: usize,

    /// The longest `timeout_ms` a job may ask for (units ms, s, m, h; at most 24h): a call
    /// in flight holds one of the server's slots for that long.
    #[arg(long, env = "DOPARALLEL_MAX_TASK_TIMEOUT", default_value = "15m", value_parser = parse_duration)]
    pub max_task_timeout: Duration,

    /// Deepest nesting of arrays and objects in a job body.
    #[arg(long, env = "DOPARALLEL_MAX_JSON_DEPTH", default_value_t = Limits::defaults().max_depth)]
    pub max_json_depth: usize,

    /// Largest callback body sent whole; a larger one goes without `result`, with
    /// `result_url` pointing at the paginated tasks route instead.
    #[arg(long, env = "DOPARALLEL_MAX_CALLBACK_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_callback_bytes: usize,

    /// How long a node's claim on a task lasts without renewal (nodes renew every third of
    /// it). When a node dies, its tasks are called again by another node after this long
    /// plus one sweep (a third of it).
    #[arg(long, env = "DOPARALLEL_LEASE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub lease_timeout: Duration,

    /// How long an idle outgoing connection (to a task endpoint or a callback receiver) is
    /// kept for the next call to its `host:port`.
    #[arg(long, env = "DOPARALLEL_OUTBOUND_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub outbound_idle_timeout: Duration,

    /// How long one callback attempt may take (connect, send, answer).
    #[arg(long, env = "DOPARALLEL_CALLBACK_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub callback_timeout: Duration,
}

impl EngineArgs {
    /// The callback secrets and the task secrets, each from its option and its file; an
    /// error when a file cannot be read or a secret is in both.
    pub fn secrets(&self) -> Result<(Vec<WebhookSecret>, Vec<WebhookSecret>), String> {
        let mut callbacks = self.webhook_secret.clone();
        if let Some(path) = &self.webhook_secret_file {
            callbacks.extend(read_secret_file(path)?);
        }
        let mut tasks = self.task_secret.clone();
        if let Some(path) = &self.task_secret_file {
            tasks.extend(read_secret_file(path)?);
        }
        refuse_shared(&callbacks, &tasks, "--webhook-secret")?;
        Ok((callbacks, tasks))
    }

    /// The secret keys, from their options or files; an error names the option whose key
    /// cannot be read.
    pub fn sealer(&self) -> Result<Sealer, String> {
        let key = |value: &Option<Secret>, file: &Option<PathBuf>, option: &str| {
            let text = match (value, file) {
                (Some(value), _) => value.expose().to_string(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {option}-file {}: {e}", path.display()))?,
                (None, None) => return Ok(None),
            };
            SecretKey::parse(&text)
                .map(Some)
                .map_err(|why| format!("{option}: {why}"))
        };
        let current = key(&self.secret_key, &self.secret_key_file, "--secret-key")?;
        let old = key(
            &self.secret_key_old,
            &self.secret_key_old_file,
            "--secret-key-old",
        )?;
        if current.is_none() && old.is_some() {
            return Err(
                "--secret-key-old is the key before --secret-key: give the current key too".into(),
            );
        }
        Ok(Sealer::new(current, old))
    }

    /// The node's settings from these options; see [`EngineArgs::secrets`] for its errors.
    /// The entry point adds what is its own (listening limits, tokens, a public URL).
    pub fn settings(
        &self,
        callback_schedule: &Schedule,
        retention: Option<Duration>,
        egress: EgressPolicy,
    ) -> Result<Settings, String> {
        let (callbacks, tasks) = self.secrets()?;
        let sealer = self.sealer()?;
        Ok(Settings {
            max_in_flight: self.max_in_flight as usize,
            owner_max_in_flight: self.owner_max_in_flight.map(u64::from),
            per_host: HostLimits {
                concurrency: self.per_host_concurrency,
                rate: self.per_host_rate,
            },
            priority_max_wait: self.priority_max_wait,
            group_concurrency: self.group_concurrency,
            per_host_adaptation: crate::engine::hosts::Adaptation {
                initial: self.per_host_initial,
                breaker_failures: self.host_breaker_failures,
            },
            max_response_bytes: self.max_response_bytes,
            callback_schedule: callback_schedule.0.clone(),
            callback_timeout: self.callback_timeout,
            retention,
            egress: Arc::new(egress),
            callback_signers: Arc::new(CallbackSigners::new(
                Signer::new(callbacks),
                Default::default(),
            )),
            task_signer: Arc::new(Signer::new(tasks)),
            sealer: Arc::new(sealer),
            limits: Limits {
                max_tasks: self.max_tasks_per_job,
                max_params_bytes: self.max_params_bytes,
                max_url_len: self.max_url_length,
                max_depth: self.max_json_depth,
                max_task_timeout_ms: self.max_task_timeout.as_millis() as u64,
                aws_sigv4_hosts: self.aws_sigv4_host.clone(),
            },
            max_callback_bytes: self.max_callback_bytes,
            lease_timeout: self.lease_timeout,
            outbound_idle_timeout: self.outbound_idle_timeout,
            public_url: None,
        })
    }
}

/// Reads a file of `whsec_` secrets, one per line; blank lines and `#` comments are skipped.
pub fn read_secret_file(path: &std::path::Path) -> Result<Vec<WebhookSecret>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .enumerate()
        .map(|(i, line)| {
            line.parse()
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Refuses a task secret that is also a callback secret (`what` names where the callback
/// one came from): a task call's body is its submitter's, so a shared key would let any
/// submitter have the server sign a forged callback.
pub fn refuse_shared(
    callbacks: &[WebhookSecret],
    tasks: &[WebhookSecret],
    what: &str,
) -> Result<(), String> {
    if tasks
        .iter()
        .any(|t| callbacks.iter().any(|c| c.same_key(t)))
    {
        return Err(format!(
            "one secret is both a task secret and a callback secret ({what}): task calls carry \
             their submitter's params, so a shared key would let any submitter have this server \
             sign a forged callback; give --task-secret a secret of its own (`doparallel secret`)"
        ));
    }
    Ok(())
}

/// A secret given on the command line or in the environment: its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// A comma-separated list of durations such as `5s,5m,30m,2h` (an empty string is no
/// retry at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Schedule(Vec::new()));
        }
        s.split(',')
            .enumerate()
            .map(|(i, part)| {
                parse_duration(part.trim()).map_err(|e| format!("entry {}: {e}", i + 1))
            })
            .collect::<Result<_, _>>()
            .map(Schedule)
    }
}

/// A rate in calls per second, within [`PER_HOST_RATES`].
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of calls per second"))?;
    if !PER_HOST_RATES.contains(&rate) {
        return Err(format!(
            "{text:?}: the rate must be between {} and {} calls per second",
            PER_HOST_RATES.start(),
            PER_HOST_RATES.end()
        ));
    }
    Ok(rate)
}

/// A range in CIDR form (`10.0.0.0/8`, `fd00::/8`), or a bare address standing for itself
/// (`127.0.0.1` is `127.0.0.1/32`).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    text.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| {
            format!("{text:?} is neither a range (CIDR, like 10.0.0.0/8) nor an IP address")
        })
}

/// One duration, the same way for every duration option: `250ms`, `5s`, `5m`, `2h`, `7d`; a
/// bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = text.parse().map_err(|_| format!("{text:?} is too long"))?;
        return Ok(Duration::from_secs(secs));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} is not a duration (use ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

mod client;
pub use client::*;

#[cfg(test)]
mod tests;
