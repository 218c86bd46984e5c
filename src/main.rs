//! The `doparallel` binary: parses the command line, sets up logging and signals, opens the
//! store and hands over to the library.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use std::collections::HashMap;

use doparallel::auth::{self, ApiTokens};
use doparallel::config::{
    self, ApiArgs, Cli, Command, EngineArgs, LambdaArgs, LogFormat, NodeArgs, RunArgs, ServeArgs,
    TokenFileArg, WorkArgs,
};
use doparallel::egress::EgressPolicy;
use doparallel::job::{JobStatus, parse_submission};
use doparallel::store::ItemLimits;
use doparallel::webhook::{CallbackSigners, Signer, WebhookSecret};
use doparallel::{ServeOptions, client, progress, store};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Lambda starts a custom runtime's `bootstrap` without arguments: that is this binary
    // renamed, and it runs as `doparallel lambda`.
    let cli =
        if std::env::args_os().len() == 1 && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
            Cli::parse_from(["doparallel", "lambda"])
        } else {
            Cli::parse()
        };
    // Arms the crash points named in FAILPOINTS (fault-test builds only).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let default_level = match cli.command {
        Command::Serve(_) | Command::Work(_) | Command::Lambda(_) => "info",
        // The other commands print their answer on stdout; only trouble goes to stderr.
        _ => "warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Pretty => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => {
            logs.json().init();
            progress::use_json_lines();
        }
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Work(args) => work(*args, matches!(cli.log_format, LogFormat::Json)).await,
            Command::Lambda(args) => lambda(*args).await,
            Command::Migrate(args) => {
                println!("{}", store::migrate(&args.database).await?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Run(args) => run(*args).await,
            Command::Secret(args) if args.key => {
                println!("{}", doparallel::sealing::SecretKey::generate());
                Ok(ExitCode::SUCCESS)
            }
            Command::Secret(_) => {
                println!("{}", WebhookSecret::generate());
                Ok(ExitCode::SUCCESS)
            }
            Command::Submit(args) => client_command(client::submit(args).await),
            Command::Status(args) => client_command(client::status(args).await),
            Command::Tasks(args) => client_command(client::tasks(args).await),
            Command::Jobs(args) => client_command(client::jobs(args).await),
            Command::Cancel(args) => client_command(client::cancel(args).await),
            Command::Retry(args) => client_command(client::retry(args).await),
            Command::Update(args) => client_command(client::update(args).await),
            Command::Pause(args) => client_command(client::pause(args, true).await),
            Command::Resume(args) => client_command(client::pause(args, false).await),
            Command::Delete(args) => client_command(client::delete(args).await),
            Command::Groups(args) => client_command(client::groups(args).await),
            Command::Group(args) => client_command(client::group(args).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let open_files = raise_open_file_limit();
    let (tokens, tenant_secrets) = api_tokens(&args.api)?;
    if tokens.is_empty() && !args.listen.ip().is_loopback() && !args.api.insecure_no_auth {
        anyhow::bail!(
            "refusing to listen on {} without an API token: set --api-token (or \
             DOPARALLEL_API_TOKENS), or pass --insecure-no-auth to serve anyone who can reach it",
            args.listen
        );
    }
    let mut settings = node_settings(&args.node)?;
    if settings.owner_max_in_flight.is_none() && !tokens.is_empty() {
        // Several tenants: none may take every slot.
        settings.owner_max_in_flight = Some((settings.max_in_flight as u64 / 2).max(1));
    }
    sign_tenant_callbacks(&mut settings, &args.node, tenant_secrets)?;
    // The port first: a port in use must not leave a new database behind.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let store = store::open(&args.node.database).await?;
    check_item_limits(&args.node.engine, store.item_limits())?;
    let options = ServeOptions {
        settings,
        shutdown_grace: args.node.shutdown_grace,
        listen: doparallel::listener::ListenLimits {
            max_connections: args
                .max_connections
                .map_or(open_files / 2, |n| n as u64)
                .max(1) as usize,
            header_timeout: args.header_timeout,
            body_timeout: args.body_timeout,
            idle_timeout: args.idle_timeout,
            max_body_bytes: args.api.max_body_bytes,
        },
        tokens,
        api_only: args.api_only,
    };
    doparallel::serve(listener, store, options, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// The settings of a long-running node (`serve`, `work`): outbound calls guarded, finished
/// jobs kept for `retention`.
fn node_settings(node: &NodeArgs) -> anyhow::Result<doparallel::Settings> {
    let mut settings = node
        .engine
        .settings(
            &node.callback_retry_schedule,
            Some(node.retention),
            EgressPolicy::guarded(node.engine.allow_net.clone()),
        )
        .map_err(anyhow::Error::msg)?;
    settings.public_url = node.public_url.clone();
    Ok(settings)
}

/// Tenants' callbacks are signed with their own secret (from the token file), the others'
/// with the node's.
fn sign_tenant_callbacks(
    settings: &mut doparallel::Settings,
    node: &NodeArgs,
    tenant_secrets: HashMap<String, WebhookSecret>,
) -> anyhow::Result<()> {
    if tenant_secrets.is_empty() {
        return Ok(());
    }
    let (callbacks, tasks) = node.engine.secrets().map_err(anyhow::Error::msg)?;
    let tenant: Vec<WebhookSecret> = tenant_secrets.values().cloned().collect();
    config::refuse_shared(&tenant, &tasks, "a tenant's secret in --api-token-file")
        .map_err(anyhow::Error::msg)?;
    let by_owner = tenant_secrets
        .into_iter()
        .map(|(owner, secret)| (owner, Signer::new(vec![secret])))
        .collect();
    settings.callback_signers = Arc::new(CallbackSigners::new(Signer::new(callbacks), by_owner));
    Ok(())
}

/// `doparallel lambda`: the API and the worker under the Lambda runtime.
async fn lambda(args: LambdaArgs) -> anyhow::Result<ExitCode> {
    // The runtime client would panic without it; nothing is opened before this check.
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_none() {
        anyhow::bail!(
            "doparallel lambda runs inside AWS Lambda, whose runtime API \
             (AWS_LAMBDA_RUNTIME_API) is not set here; locally, start it under \
             `cargo lambda watch --only-lambda-apis` with the variables it prints"
        );
    }
    let (tokens, tenant_secrets) = api_tokens(&args.api)?;
    if tokens.is_empty() && !args.api.insecure_no_auth {
        anyhow::bail!(
            "refusing to serve a Lambda function without an API token: set \
             DOPARALLEL_API_TOKENS (or DOPARALLEL_API_TOKEN_FILE), or set \
             DOPARALLEL_INSECURE_NO_AUTH=true when AWS IAM guards the function URL"
        );
    }
    if args.node.database.starts_with("sqlite:") {
        anyhow::bail!(
            "a Lambda function cannot keep its state in SQLite: each execution environment \
             has a disk of its own, lost when it ends; use a dynamodb:// or postgres:// \
             --database (DOPARALLEL_DATABASE_URL)"
        );
    }
    let mut settings = node_settings(&args.node)?;
    sign_tenant_callbacks(&mut settings, &args.node, tenant_secrets)?;
    let worker = args
        .worker_function
        .map(doparallel::lambda::WorkerFunction::from_env)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let store = store::open(&args.node.database).await?;
    check_item_limits(&args.node.engine, store.item_limits())?;
    let options = doparallel::lambda::LambdaOptions {
        settings,
        tokens,
        max_body_bytes: args.api.max_body_bytes,
        shutdown_grace: args.node.shutdown_grace,
        worker,
    };
    let function = doparallel::lambda::Function::start(store, options).await?;
    doparallel::lambda::run(function)
        .await
        .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// `doparallel work`: the engine and the outbox without the API. Says what it did on
/// stdout, or as a log line with `--log-format json`.
async fn work(args: WorkArgs, json_logs: bool) -> anyhow::Result<ExitCode> {
    raise_open_file_limit();
    let mut settings = node_settings(&args.node)?;
    let (_, tenant_secrets) = read_token_file(&args.token_file)?;
    sign_tenant_callbacks(&mut settings, &args.node, tenant_secrets)?;
    let store = store::open(&args.node.database).await?;
    check_item_limits(&args.node.engine, store.item_limits())?;
    let options = doparallel::WorkOptions {
        settings,
        until_idle: args.until_idle,
        max_duration: args.max_duration,
        shutdown_grace: args.node.shutdown_grace,
    };
    let report = doparallel::work(store, options, shutdown_signal()).await?;
    if json_logs {
        tracing::info!(
            calls = report.calls,
            callbacks = report.callbacks,
            ended = ?report.ended,
            "work done"
        );
    } else {
        println!(
            "{} calls, {} callbacks ({})",
            report.calls,
            report.callbacks,
            match report.ended {
                doparallel::WorkEnd::Idle => "nothing due within 5 s",
                doparallel::WorkEnd::MaxDuration => "--max-duration reached",
                doparallel::WorkEnd::Stopped => "stopped",
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What the database can keep for one task (a DynamoDB item is bounded): parameters that
/// cannot be stored are refused at start, and answers larger than a stored result are worth
/// failing before they are read whole.
fn check_item_limits(args: &EngineArgs, limits: ItemLimits) -> anyhow::Result<()> {
    if let Some(max) = limits.max_params_bytes
        && args.max_params_bytes > max
    {
        anyhow::bail!(
            "--max-params-bytes {} is more than this database can keep for one task ({max}); \
             lower it",
            args.max_params_bytes
        );
    }
    if let Some(max) = limits.max_result_bytes
        && args.max_response_bytes > max
    {
        tracing::warn!(
            max_response_bytes = args.max_response_bytes,
            stored_at_most = max,
            "task results larger than this database keeps are stored as failures \
             (response_too_large); set --max-response-bytes {max} to stop such calls as soon \
             as the limit is read"
        );
    }
    Ok(())
}

/// The tokens of --api-token and --api-token-file together, and the callback secrets that
/// the file gives some of them (`TOKEN whsec_...` on a line), by owner.
fn api_tokens(args: &ApiArgs) -> anyhow::Result<(ApiTokens, HashMap<String, WebhookSecret>)> {
    let (from_file, secrets) = read_token_file(&args.token_file)?;
    let given = args.api_token.iter().map(|t| t.expose());
    let tokens = ApiTokens::new(given.chain(from_file.iter().map(String::as_str)))
        .map_err(anyhow::Error::msg)?;
    Ok((tokens, secrets))
}

/// The tokens of --api-token-file, and the callback secrets it gives some of them, by
/// owner.
type TokenFile = (Vec<String>, HashMap<String, WebhookSecret>);

fn read_token_file(args: &TokenFileArg) -> anyhow::Result<TokenFile> {
    let file_text = match &args.api_token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read API token file {}", path.display()))?,
        None => String::new(),
    };
    let mut from_file = Vec::new();
    let mut secrets = HashMap::new();
    for (i, line) in file_text.lines().map(str::trim).enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let token = words.next().expect("a non-empty line has a word");
        if let Some(secret) = words.next() {
            let secret: WebhookSecret = secret.parse().map_err(|e| {
                anyhow::anyhow!("API token file line {}: the callback secret: {e}", i + 1)
            })?;
            secrets.insert(auth::owner_of_token(token), secret);
        }
        if words.next().is_some() {
            anyhow::bail!(
                "API token file line {}: expected TOKEN or TOKEN whsec_SECRET",
                i + 1
            );
        }
        from_file.push(token.to_string());
    }
    Ok((from_file, secrets))
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (name, body) = if args.job.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .context("cannot read the job from standard input")?;
        ("standard input".to_string(), body)
    } else {
        let body = std::fs::read(&args.job)
            .with_context(|| format!("cannot read job file {}", args.job.display()))?;
        (args.job.display().to_string(), body)
    };

    // --allow-net means nothing without the guard: it implies it.
    let egress = if args.deny_private || !args.engine.allow_net.is_empty() {
        EgressPolicy::guarded(args.engine.allow_net.clone())
    } else {
        EgressPolicy::open()
    };
    let mut settings = args
        .engine
        .settings(&args.callback_retry_schedule, None, egress)
        .map_err(anyhow::Error::msg)?;
    // The job lives and ends in this process: without a key of the operator's, a key made
    // for this run seals its secret headers.
    if !settings.sealer.can_seal() {
        let key =
            doparallel::sealing::SecretKey::parse(&doparallel::sealing::SecretKey::generate())
                .expect("a generated key reads");
        settings.sealer = std::sync::Arc::new(doparallel::sealing::Sealer::new(Some(key), None));
    }
    let mut job = parse_submission(&body, &settings.limits, &settings.egress, &settings.sealer)
        .with_context(|| format!("{name} is not a valid job"))?;
    job.options.trace = Some(doparallel::job::JobTrace::from_headers(None, None));

    // Without --database the job runs on a fresh database that goes away with the process.
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let url = match &args.database {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", scratch.path().join("run.db").display()),
    };
    let store = store::open(&url).await?;
    check_item_limits(&args.engine, store.item_limits())?;
    let job_id = job.id;
    let watch = progress::watch_store(Arc::clone(&store), job.id);
    let outcome = doparallel::run_job(Arc::clone(&store), settings, job).await;
    watch.stop().await;
    let outcome = outcome?;

    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&outcome.document)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    if outcome.callback_delivered == Some(false) {
        tracing::warn!(%job_id, "the callback could not be delivered (see the log above)");
    }
    Ok(match outcome.status {
        JobStatus::Complete => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// A client command's exit code, or its error (printed by `main` as one line, exit 2).
fn client_command(result: Result<u8, client::ClientError>) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::from(result?))
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit of
/// 1024 is easily reached by a server of many connections); returns the soft limit then in
/// force.
fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid pointer to an rlimit of this process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            } else {
                tracing::warn!(
                    soft = limit.rlim_cur,
                    hard = limit.rlim_max,
                    "cannot raise the open-file limit"
                );
            }
        }
    }
    limit.rlim_cur
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
