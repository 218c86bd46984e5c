//! A running job's progress on stderr, for `doparallel submit --wait` and `doparallel run`.
//!
//! When stderr is a terminal it is an indicatif bar (done/total, failed, rate, ETA) redrawn in
//! place; otherwise, in a CI log or a file, it is a plain line every few seconds and one when
//! the job ends, because a redrawn bar turns into thousands of lines there. Stdout is never
//! touched: it carries the command's answer (the job id or the final document).
//!
//! With `--log-format json` every line is a JSON object shaped like the log's own lines
//! (`{"timestamp","level","fields":{"message":"progress",...},"target"}`), so that stderr
//! stays one JSON object a line.
//!
//! The display is fed [`Snapshot`]s by whoever watches the job: the HTTP client
//! (`client.rs`) or, for `run`, [`watch_store`], which reads the job's record from the store.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::job::{JobId, JobStatus};
use crate::store::{JobRecord, Store};

/// How often a watcher looks at the job.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// How often a plain progress line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Where a job stands, as far as progress goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub status: JobStatus,
    pub total: u64,
    /// Tasks that ran to an outcome, Complete or Failed. Cancelled tasks never ran, so a
    /// cancelled job shows how far it got rather than a full bar.
    pub done: u64,
    pub failed: u64,
}

impl Snapshot {
    pub fn of_record(job: &JobRecord) -> Self {
        Snapshot {
            status: job.status,
            total: job.total,
            done: job.complete + job.failed,
            failed: job.failed,
        }
    }
}

/// Whether progress is written as JSON lines (`--log-format json`); set once by `main`.
static JSON_LINES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes progress as JSON lines from now on.
pub fn use_json_lines() {
    JSON_LINES.store(true, std::sync::atomic::Ordering::Relaxed);
}

enum Display {
    /// Drawn from the first snapshot on, when the total is known (a bar of length 0 would
    /// show as full).
    Bar(Option<ProgressBar>),
    Lines {
        last: Option<Instant>,
    },
    Json {
        last: Option<Instant>,
    },
}

/// The progress display of one job.
pub struct Progress {
    job: String,
    display: Display,
    /// When the job was submitted, roughly: the rate is tasks done since then per second.
    started: Instant,
    last: Option<Snapshot>,
    finished: bool,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise. Create it when the job is
    /// submitted: the rate counts from then.
    pub fn new(job: impl std::fmt::Display) -> Self {
        let display = if JSON_LINES.load(std::sync::atomic::Ordering::Relaxed) {
            Display::Json { last: None }
        } else if std::io::stderr().is_terminal() {
            Display::Bar(None)
        } else {
            Display::Lines { last: None }
        };
        Progress {
            job: job.to_string(),
            display,
            started: Instant::now(),
            last: None,
            finished: false,
        }
    }

    /// Shows where the job stands; finishes the display when the job is finished.
    pub fn update(&mut self, snapshot: Snapshot) {
        if self.finished {
            return;
        }
        self.last = Some(snapshot);
        if snapshot.status.is_finished() {
            self.finish();
            return;
        }
        match &mut self.display {
            Display::Bar(bar) => {
                let message = bar_message(&snapshot, self.started.elapsed());
                match bar {
                    Some(bar) => {
                        bar.set_length(snapshot.total);
                        bar.set_position(snapshot.done);
                        bar.set_message(message);
                    }
                    None => *bar = Some(new_bar(&self.job, &snapshot, message)),
                }
            }
            Display::Lines { last } => {
                if last.is_some_and(|at| at.elapsed() < LINE_EVERY) {
                    return;
                }
                *last = Some(Instant::now());
                write_line(&self.line(&snapshot));
            }
            Display::Json { last } => {
                if last.is_some_and(|at| at.elapsed() < LINE_EVERY) {
                    return;
                }
                *last = Some(Instant::now());
                let line = self.json(&snapshot, None);
                write_line(&line);
            }
        }
    }

    /// One progress line as the JSON log writes its lines.
    fn json(&self, s: &Snapshot, note: Option<&str>) -> String {
        let mut fields = serde_json::json!({
            "message": note.unwrap_or("progress"),
            "job_id": self.job,
            "status": s.status.as_str(),
            "done": s.done,
            "total": s.total,
            "failed": s.failed,
            "rate": (rate(s.done, self.started.elapsed()) * 10.0).round() / 10.0,
        });
        if s.status.is_finished() {
            fields["elapsed_secs"] = serde_json::json!(self.started.elapsed().as_secs_f64());
        }
        serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "INFO",
            "fields": fields,
            "target": "doparallel::progress",
        })
        .to_string()
    }

    /// A passing remark (for example that the server does not answer and the watcher keeps
    /// trying), shown until the next update.
    pub fn note(&mut self, text: &str) {
        if self.finished {
            return;
        }
        match &self.display {
            Display::Bar(Some(bar)) => {
                let message = self
                    .last
                    .map_or_else(String::new, |s| bar_message(&s, self.started.elapsed()));
                bar.set_message(format!("{message} ({text})"));
            }
            Display::Bar(None) | Display::Lines { .. } => {
                write_line(&format!("job {}: {text}", self.job))
            }
            Display::Json { .. } => {
                let line = serde_json::json!({
                    "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                    "level": "WARN",
                    "fields": {"message": text, "job_id": self.job},
                    "target": "doparallel::progress",
                });
                write_line(&line.to_string());
            }
        }
    }

    /// Replaces the bar by a summary line (or writes it as the last plain line).
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Display::Bar(Some(bar)) = &self.display {
            bar.finish_and_clear();
        }
        let Some(last) = self.last else {
            return;
        };
        if let Display::Json { .. } = self.display {
            let line = self.json(&last, None);
            write_line(&line);
            return;
        }
        let mut line = self.line(&last);
        if last.status.is_finished() {
            let _ = write!(
                line,
                "; {} after {:.1}s",
                last.status.as_str(),
                self.started.elapsed().as_secs_f64()
            );
        }
        write_line(&line);
    }

    /// `job ID: 120/1000 done, 3 failed, 45.2/s`
    fn line(&self, s: &Snapshot) -> String {
        let rate = rate(s.done, self.started.elapsed());
        format!(
            "job {}: {}/{} done, {} failed, {rate:.1}/s",
            self.job, s.done, s.total, s.failed
        )
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // A bar left drawing would keep its tick thread writing over the next output.
        if let Display::Bar(Some(bar)) = &self.display
            && !bar.is_finished()
        {
            bar.finish_and_clear();
        }
    }
}

fn new_bar(job: &str, snapshot: &Snapshot, message: String) -> ProgressBar {
    // The id goes on a line of its own, above the bar, where it can be copied; the bar
    // keeps to what changes and fits 80 columns.
    write_line(&format!("job {job}"));
    // Hidden until set up: a draw in between would show an empty message.
    let bar = ProgressBar::with_draw_target(Some(snapshot.total), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{wide_bar}] {pos}/{len} done, {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_position(snapshot.done);
    bar.set_message(message);
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// `3 failed, 45.2/s, ETA 12s`. The rate is the average since submission, not indicatif's
/// own estimate: that one reads the half-second jumps of a polled position as bursts of
/// thousands per second.
fn bar_message(s: &Snapshot, elapsed: Duration) -> String {
    let rate = rate(s.done, elapsed);
    let eta = if rate > 0.0 {
        clock((s.total - s.done.min(s.total)) as f64 / rate)
    } else {
        "?".to_string()
    };
    format!("{} failed, {rate:.1}/s, ETA {eta}", s.failed)
}

fn rate(done: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { done as f64 / secs } else { 0.0 }
}

/// A duration to come, as a person reads it: `45s`, `3m05s`, `2h07m`.
fn clock(secs: f64) -> String {
    let secs = secs.ceil() as u64;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// stderr is best effort: progress is not worth failing the command for.
fn write_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// A background task showing the progress of a job from its record in the store, for
/// `doparallel run` (which has no server to ask).
pub struct Watch {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts showing the progress of `job` from `store`, every [`POLL_EVERY`].
pub fn watch_store(store: Arc<dyn Store>, job: JobId) -> Watch {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut progress = Progress::new(job);
        loop {
            // Read errors are left to the job's own run to report; the display only skips.
            if let Ok(Some(record)) = store.job_get(job).await {
                progress.update(Snapshot::of_record(&record));
            }
            if progress.finished {
                return;
            }
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
        if let Ok(Some(record)) = store.job_get(job).await {
            progress.update(Snapshot::of_record(&record));
        }
        progress.finish();
    });
    Watch { stop, task }
}

impl Watch {
    /// Shows the job's last state and ends the display.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(status: JobStatus, done: u64) -> Snapshot {
        Snapshot {
            status,
            total: 1000,
            done,
            failed: 3,
        }
    }

    #[test]
    fn a_plain_line_says_done_total_failed_and_rate() {
        let mut progress = Progress::new("J");
        progress.display = Display::Lines { last: None };
        progress.started = Instant::now() - Duration::from_secs(10);
        let line = progress.line(&snapshot(JobStatus::Running, 120));
        assert_eq!(line, "job J: 120/1000 done, 3 failed, 12.0/s");
        progress.update(snapshot(JobStatus::Complete, 1000));
        assert!(progress.finished);
        progress.update(snapshot(JobStatus::Running, 1));
        assert_eq!(
            progress.last.unwrap().done,
            1000,
            "nothing moves once finished"
        );
    }

    #[test]
    fn the_bar_says_failed_rate_and_eta() {
        let check = |done: u64, secs: u64, want: &str| {
            let got = bar_message(
                &snapshot(JobStatus::Running, done),
                Duration::from_secs(secs),
            );
            assert_eq!(got, want);
        };
        check(100, 10, "3 failed, 10.0/s, ETA 1m30s");
        check(0, 10, "3 failed, 0.0/s, ETA ?");
        check(1, 10, "3 failed, 0.1/s, ETA 2h46m");
        check(999, 1, "3 failed, 999.0/s, ETA 1s");
    }
}
