//! The client's commands: each reads its arguments, asks the server, and prints the answer
//! (a table, or `--json` the server's document as is); `submit --wait` follows the job's
//! events with a progress bar.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::output::{
    JOB_COLUMNS, TASK_COLUMNS, exit_code, final_document, job_row, table, task_row,
};
use super::{Client, ClientError, EXIT_COMPLETE, EXIT_INTERRUPTED, without_os_error};
use crate::api::wire::{JobView, Progress};
use crate::config::{
    CancelArgs, JobsArgs, RetryArgs, StatusArgs, SubmitArgs, TasksArgs, UpdateArgs,
};
use crate::progress::{POLL_EVERY, Progress as ProgressBar};

/// How long `submit --wait` keeps trying while the server is unreachable (a restart keeps
/// every job, so it is worth waiting through one).
pub(super) const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Writes an answer to stdout. A closed pipe (`doparallel jobs | head -1`) is the reader's
/// choice, not an error.
pub(super) fn print(text: &str) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(ClientError::Output(e.to_string()))
        }
        _ => Ok(()),
    }
}

/// A line for the user that is not the answer: hints and remarks go to stderr.
pub(super) fn tell(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Prints the server's JSON as is, ending with one newline.
pub(super) fn print_raw(raw: &str) -> Result<(), ClientError> {
    print(&format!("{}\n", raw.trim_end()))
}

pub(super) fn read_job(path: &Path) -> Result<(String, Vec<u8>), ClientError> {
    if path.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .map_err(|e| ClientError::JobFile {
                name: "standard input".into(),
                reason: without_os_error(e.to_string()),
            })?;
        return Ok(("standard input".into(), body));
    }
    let name = path.display().to_string();
    match std::fs::read(path) {
        Ok(body) => Ok((name, body)),
        Err(e) => Err(ClientError::JobFile {
            name,
            reason: without_os_error(e.to_string()),
        }),
    }
}

/// `doparallel submit JOB.json [--wait]`.
pub async fn submit(args: SubmitArgs) -> Result<u8, ClientError> {
    let (name, body) = read_job(&args.job)?;
    // The server validates the job: one set of rules, and a newer server may accept more
    // than this client knows of.
    let client = Client::from_args(&args.client)?;
    let submitted = client
        .submit(body, &name, args.idempotency_key.as_deref())
        .await?;
    let id = submitted.value.job_id.to_string();
    if !args.wait {
        return if args.client.json {
            print_raw(&submitted.raw).map(|()| EXIT_COMPLETE)
        } else {
            print(&format!("{id}\n")).map(|()| EXIT_COMPLETE)
        };
    }
    let mut progress = ProgressBar::new(&id);
    let waited = tokio::select! {
        waited = wait(&client, &id, &mut progress) => Some(waited),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some(waited) = waited else {
        drop(progress);
        tell(&format!(
            "stopped waiting; job {id} keeps running (doparallel status {id}, doparallel cancel {id})"
        ));
        return Ok(EXIT_INTERRUPTED);
    };
    let job = waited?;
    let document = final_document(&job).ok_or_else(|| ClientError::Protocol {
        action: format!("read job {id}"),
        server: client.shown.clone(),
        detail: "a finished job without its result".into(),
    })?;
    print(&format!("{document}\n"))?;
    Ok(exit_code(job.status))
}

/// Waits until the job is finished, showing its progress, and returns it with its result.
///
/// Progress comes from the job's event stream; a server without one (older than this
/// client) is polled instead. Either way the job is read once more at the end, since the
/// `finished` event carries no results.
pub(super) async fn wait(
    client: &Client,
    id: &str,
    progress: &mut ProgressBar,
) -> Result<JobView, ClientError> {
    follow_events(client, id, progress).await?;
    poll(client, id, progress).await
}

/// Whether an error may pass once the server is back (it restarts, or its database is
/// briefly unavailable): a restart keeps every job, so it is worth waiting through.
pub(super) fn is_transient(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
            | ClientError::ServerFailed { .. }
    )
}

/// Counts how long the server has been in trouble and says when to give up.
#[derive(Default)]
pub(super) struct Trouble {
    since: Option<Instant>,
}

impl Trouble {
    /// `Err(e)` once the server has been in trouble for [`RECONNECT_FOR`]; until then the
    /// caller tries again.
    fn on_error(&mut self, e: ClientError, progress: &mut ProgressBar) -> Result<(), ClientError> {
        if !is_transient(&e)
            || self.since.get_or_insert_with(Instant::now).elapsed() >= RECONNECT_FOR
        {
            return Err(e);
        }
        progress.note("the server does not answer; still trying");
        Ok(())
    }

    fn ok(&mut self) {
        self.since = None;
    }
}

/// Follows the job's events until `finished`. Returns at once, without error, when the
/// server has no event route; reconnects with `Last-Event-ID` when the stream is cut.
pub(super) async fn follow_events(
    client: &Client,
    id: &str,
    progress: &mut ProgressBar,
) -> Result<(), ClientError> {
    let mut trouble = Trouble::default();
    let mut last_id: Option<String> = None;
    loop {
        let mut stream = match client.events(id, last_id.as_deref()).await {
            Ok(stream) => stream,
            // A server older than the route (or a proxy that does not pass it): polling
            // works everywhere, and reports an unknown job properly.
            Err(
                ClientError::MissingRoute { .. }
                | ClientError::Refused {
                    status: 404 | 405, ..
                },
            ) => return Ok(()),
            Err(e) => {
                trouble.on_error(e, progress)?;
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            }
        };
        trouble.ok();
        while let Some(event) = stream.next().await {
            last_id = event.id.clone().or(last_id);
            match event.event.as_str() {
                "progress" | "finished" => {
                    let view: Progress =
                        serde_json::from_str(&event.data).map_err(|e| ClientError::Protocol {
                            action: format!("follow job {id}"),
                            server: client.shown.clone(),
                            detail: format!("{} event: {e}", event.event),
                        })?;
                    progress.update(view.snapshot());
                    if event.event == "finished" {
                        return Ok(());
                    }
                }
                // Failures are counted in `progress`; `doparallel tasks ID --failed` lists them.
                _ => {}
            }
        }
        // Cut before `finished`: look again shortly, from where the stream stopped.
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls the job every [`POLL_EVERY`] until it is finished, showing its progress.
pub(super) async fn poll(
    client: &Client,
    id: &str,
    progress: &mut ProgressBar,
) -> Result<JobView, ClientError> {
    let mut trouble = Trouble::default();
    loop {
        match client.job(id).await {
            Ok(answer) => {
                trouble.ok();
                progress.update(answer.value.snapshot());
                if answer.value.status.is_finished() {
                    return Ok(answer.value);
                }
            }
            Err(e) => trouble.on_error(e, progress)?,
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `doparallel status ID`.
pub async fn status(args: StatusArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let job = client.job(&args.id).await?;
    if args.client.json {
        print_raw(&job.raw)?;
    } else {
        print(&table(
            &JOB_COLUMNS,
            &[job_row(&job.value, SystemTime::now())],
        ))?;
    }
    Ok(exit_code(job.value.status))
}

/// `doparallel tasks ID [--failed]`.
pub async fn tasks(args: TasksArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let page = client
        .tasks(&args.id, args.failed, args.limit, args.after)
        .await?;
    if args.client.json {
        print_raw(&page.raw)?;
        return Ok(EXIT_COMPLETE);
    }
    if page.value.tasks.is_empty() {
        tell(if args.failed {
            "no failed tasks"
        } else {
            "no tasks"
        });
        return Ok(EXIT_COMPLETE);
    }
    let rows: Vec<_> = page.value.tasks.iter().map(task_row).collect();
    print(&table(&TASK_COLUMNS, &rows))?;
    if let Some(next) = page.value.next_after {
        let failed = if args.failed { " --failed" } else { "" };
        tell(&format!(
            "more tasks: doparallel tasks {}{failed} --limit {} --after {next}",
            args.id, args.limit
        ));
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel jobs [--status S]`.
pub async fn jobs(args: JobsArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let list = client
        .jobs(
            args.status,
            args.metadata.as_ref(),
            args.group.as_deref(),
            args.limit,
            args.after.as_deref(),
        )
        .await?;
    if args.client.json {
        print_raw(&list.raw)?;
        return Ok(EXIT_COMPLETE);
    }
    if list.value.jobs.is_empty() {
        tell("no jobs");
        return Ok(EXIT_COMPLETE);
    }
    let now = SystemTime::now();
    let rows: Vec<_> = list.value.jobs.iter().map(|j| job_row(j, now)).collect();
    print(&table(&JOB_COLUMNS, &rows))?;
    if let Some(next) = list.value.next_after {
        let mut status = args
            .status
            .map(|s| format!(" --status {}", s.as_str()))
            .unwrap_or_default();
        if let Some((key, value)) = &args.metadata {
            status.push_str(&format!(" --metadata '{key}={value}'"));
        }
        if let Some(group) = &args.group {
            status.push_str(&format!(" --group {group}"));
        }
        tell(&format!(
            "more jobs: doparallel jobs{status} --limit {} --after {next}",
            args.limit
        ));
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel cancel ID`.
pub async fn cancel(args: CancelArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let job = client.cancel(&args.id).await?;
    if args.client.json {
        print_raw(&job.raw)?;
    } else {
        let c = &job.value.counts;
        print(&format!(
            "job {} cancelled ({} complete, {} failed, {} cancelled)\n",
            job.value.job_id, c.complete, c.failed, c.cancelled
        ))?;
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel update ID --concurrency N ...`: changes a running job's limits.
pub async fn update(args: UpdateArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let mut options = serde_json::Map::new();
    if let Some(n) = args.concurrency {
        options.insert("concurrency".into(), serde_json::json!(n.0));
    }
    if let Some(n) = args.per_host_concurrency {
        options.insert("per_host_concurrency".into(), serde_json::json!(n.0));
    }
    if let Some(r) = args.per_host_rate {
        options.insert("per_host_rate".into(), serde_json::json!(r.0));
    }
    if let Some(ms) = args.deadline_ms {
        options.insert("deadline_ms".into(), serde_json::json!(ms.0));
    }
    if let Some(priority) = args.priority {
        options.insert("priority".into(), serde_json::json!(priority));
    }
    let job = client.update(&args.id, options).await?;
    if args.client.json {
        print_raw(&job.raw)?;
    } else {
        let o = job.value.options.as_ref();
        let shown = |v: Option<String>| v.unwrap_or_else(|| "none".into());
        print(&format!(
            "job {}: concurrency {}, per host {} at once, {} a second\n",
            job.value.job_id,
            shown(o.and_then(|o| o.concurrency).map(|n| n.to_string())),
            shown(
                o.and_then(|o| o.per_host_concurrency)
                    .map(|n| n.to_string())
            ),
            shown(o.and_then(|o| o.per_host_rate).map(|r| r.to_string())),
        ))?;
        if let Some(at) = &job.value.deadline_at {
            print(&format!("deadline {at}\n"))?;
        }
        if let Some(priority) = o.map(|o| o.priority).filter(|p| *p != 0) {
            print(&format!("priority {priority}\n"))?;
        }
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel pause ID` (`pause`) and `doparallel resume ID`.
pub async fn pause(args: CancelArgs, pause: bool) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let job = client.pause(&args.id, pause).await?;
    if args.client.json {
        print_raw(&job.raw)?;
    } else {
        print(&format!(
            "job {} {}\n",
            job.value.job_id,
            job.value.status.as_str()
        ))?;
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel retry ID`: runs a finished job's failed (and cancelled) tasks again.
pub async fn retry(args: RetryArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let answer = client.retry(&args.id, args.include_cancelled).await?;
    if args.client.json {
        print_raw(&answer.raw)?;
    } else {
        let a = &answer.value;
        print(&format!(
            "job {} retried: run {}, {} task{} to run again\n",
            a.job_id,
            a.run,
            a.requeued,
            if a.requeued == 1 { "" } else { "s" },
        ))?;
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel delete ID`: removes a finished job and its results.
pub async fn delete(args: CancelArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    client.delete(&args.id).await?;
    if !args.client.json {
        print(&format!("job {} deleted\n", args.id))?;
    }
    Ok(EXIT_COMPLETE)
}
