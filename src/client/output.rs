//! What the client prints: the tables for people, the final document, and the exit code of
//! a job's outcome.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::value::RawValue;

use super::{EXIT_CANCELLED, EXIT_COMPLETE, EXIT_FAILED};
use crate::api::wire::{Counts, JobView, Progress, TaskView};
use crate::job::{CallbackState, JobStatus, TaskError};
use crate::progress::Snapshot;

/// Widest a result or error is shown in the tasks table.
pub(super) const CELL_WIDTH: usize = 100;

impl JobView {
    pub fn snapshot(&self) -> Snapshot {
        snapshot(self.status, self.total, &self.counts)
    }
}

impl Progress {
    pub fn snapshot(&self) -> Snapshot {
        snapshot(self.status, self.total, &self.counts)
    }
}

pub(super) fn snapshot(status: JobStatus, total: u64, counts: &Counts) -> Snapshot {
    Snapshot {
        status,
        total,
        done: counts.complete + counts.failed,
        failed: counts.failed,
    }
}

/// The exit code of a job in `status`.
pub fn exit_code(status: JobStatus) -> u8 {
    match status {
        JobStatus::Failed => EXIT_FAILED,
        JobStatus::Cancelled => EXIT_CANCELLED,
        JobStatus::Complete
        | JobStatus::Scheduled
        | JobStatus::Pending
        | JobStatus::Running
        | JobStatus::Paused => EXIT_COMPLETE,
    }
}

/// The final document of a finished job, in the callback's shape
/// `{"job_id","status","msg":"Job Finished","result":{...}}`: the bytes `doparallel run`
/// prints and the callback receives, since the result map is passed through untouched.
pub fn final_document(job: &JobView) -> Option<String> {
    #[derive(Serialize)]
    struct Document<'a> {
        job_id: &'a str,
        status: &'a str,
        msg: &'a str,
        result: &'a RawValue,
    }
    let result = job.result.as_deref()?;
    let document = Document {
        job_id: &job.job_id.to_string(),
        status: job.status.as_str(),
        msg: "Job Finished",
        result,
    };
    Some(serde_json::to_string(&document).expect("the document serializes"))
}

/// Aligned columns as kubectl prints them: a header row, three spaces between columns, no
/// trailing blanks.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub const JOB_COLUMNS: [&str; 8] = [
    "ID", "STATUS", "PROGRESS", "FAILED", "RUNNING", "QUEUED", "CALLBACK", "AGE",
];

/// One row of the jobs table; `now` makes the age testable.
pub fn job_row(job: &JobView, now: SystemTime) -> Vec<String> {
    let snapshot = job.snapshot();
    let callback = match job.callback.state {
        CallbackState::None => "-",
        CallbackState::Pending => "pending",
        CallbackState::Delivered => "delivered",
        CallbackState::Failed => "failed",
    };
    vec![
        job.job_id.to_string(),
        job.status.as_str().to_string(),
        format!("{}/{}", snapshot.done, snapshot.total),
        job.counts.failed.to_string(),
        job.counts.running.to_string(),
        job.counts.queued.to_string(),
        callback.to_string(),
        age(&job.created_at, now),
    ]
}

pub const TASK_COLUMNS: [&str; 5] = ["INDEX", "STATUS", "ATTEMPTS", "LATENCY", "RESULT/ERROR"];

pub fn task_row(task: &TaskView) -> Vec<String> {
    let outcome = if let Some(raw) = &task.error {
        match serde_json::from_str::<TaskError>(raw.get()) {
            Ok(error) => error_text(&error),
            // A failure the endpoint reported: whatever JSON it chose.
            Err(_) => raw.get().to_string(),
        }
    } else if let Some(result) = &task.result {
        result.get().to_string()
    } else {
        "-".to_string()
    };
    vec![
        task.index.to_string(),
        task.status.as_str().to_string(),
        task.attempts.to_string(),
        task.latency_ms.map_or("-".to_string(), latency),
        truncate(&one_line(&outcome), CELL_WIDTH),
    ]
}

/// The kind first, then the most specific cause (the innermost error, which the message's
/// chain buries at its end), then what the endpoint said.
pub(super) fn error_text(error: &TaskError) -> String {
    let mut text = error.kind.to_string();
    if let Some(status) = error.http_status {
        text = format!("{text} {status}");
    }
    let detail = error.cause.as_deref().unwrap_or(&error.message);
    text = format!("{text}: {detail}");
    match error.body.as_deref().filter(|b| !b.is_empty()) {
        Some(body) => format!("{text}: {body}"),
        None => text,
    }
}

pub(super) fn latency(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// How long ago an RFC 3339 time was, kubectl style: `42s`, `17m`, `5h`, `3d`.
pub(super) fn age(rfc3339: &str, now: SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339(rfc3339) else {
        return "?".to_string();
    };
    // A clock behind the server's would give a negative age; it is "just now".
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Control characters (a newline in an error body) would break the table's rows.
pub(super) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(super) fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut out: String = text.chars().take(width - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: &str, created_at: &str) -> JobView {
        serde_json::from_str(&format!(
            r#"{{"job_id":"0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b","status":"{status}","total":10,
                "counts":{{"pending":2,"running":3,"complete":4,"failed":1}},
                "created_at":"{created_at}","finished_at":null,
                "callback":{{"url":null,"state":"none","attempts":0,"last_error":null}},
                "options":{{}},"new_field":true}}"#
        ))
        .unwrap()
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let out = table(
            &["ID", "STATUS", "AGE"],
            &[
                vec!["a".into(), "Complete".into(), "5s".into()],
                vec!["bbbb".into(), "Failed".into(), "10m".into()],
            ],
        );
        assert_eq!(
            out,
            "ID     STATUS     AGE\n\
             a      Complete   5s\n\
             bbbb   Failed     10m\n"
        );
    }

    #[test]
    fn a_job_row_counts_done_tasks_and_age() {
        let now = humantime::parse_rfc3339("2026-01-02T03:04:05Z").unwrap();
        let row = job_row(&job("Running", "2026-01-02T02:59:05.123Z"), now);
        assert_eq!(
            row,
            [
                "0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b",
                "Running",
                "5/10",
                "1",
                "3",
                "0",
                "-",
                "4m"
            ]
        );
        // Cancelled tasks never ran: they do not count as done.
        let mut cancelled = job("Cancelled", "2026-01-02T02:59:05.123Z");
        (cancelled.counts.pending, cancelled.counts.running) = (0, 0);
        cancelled.counts.cancelled = 5;
        assert_eq!(
            job_row(&cancelled, now)[..3],
            ["0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b", "Cancelled", "5/10"]
        );
        let check = |created: &str, want: &str| {
            assert_eq!(age(created, now), want, "{created}");
        };
        check("2026-01-02T03:04:04.500Z", "0s");
        check("2026-01-02T03:05:00Z", "0s");
        check("2026-01-02T03:02:06Z", "119s");
        check("2026-01-01T03:04:05Z", "24h");
        check("2025-12-01T03:04:05Z", "32d");
        check("yesterday", "?");
    }

    #[test]
    fn a_task_row_shows_the_result_or_the_error_on_one_line() {
        let task = |json: &str| -> Vec<String> { task_row(&serde_json::from_str(json).unwrap()) };
        assert_eq!(
            task(
                r#"{"index":1,"status":"Complete","attempts":1,"result":{"a": 1.10},"latency_ms":12}"#
            ),
            ["1", "Complete", "1", "12ms", r#"{"a": 1.10}"#]
        );
        let failed = task(
            r#"{"index":2,"status":"Failed","attempts":3,"latency_ms":2500,
                "error":{"kind":"http_status","http_status":500,"message":"endpoint answered 500","body":"line\nnext"}}"#,
        );
        assert_eq!(failed[3], "2.5s");
        assert_eq!(
            failed[4],
            "http_status 500: endpoint answered 500: line next"
        );
        // The most specific cause, not the chain that buries it.
        let unreachable = task(
            r#"{"index":5,"status":"Failed","attempts":3,"latency_ms":3,
                "error":{"kind":"connect","http_status":null,
                "message":"error sending request for url (http://example.invalid/): client error (Connect): dns error: failed to lookup address information: Name or service not known",
                "body":null,"cause":"dns error: failed to lookup address information: Name or service not known"}}"#,
        );
        assert_eq!(
            unreachable[4],
            "connect: dns error: failed to lookup address information: Name or service not known"
        );
        let long = task(&format!(
            r#"{{"index":3,"status":"Complete","attempts":1,"result":"{}","latency_ms":null}}"#,
            "é".repeat(150)
        ));
        assert_eq!(long[3], "-");
        assert_eq!(long[4].chars().count(), CELL_WIDTH);
        assert!(long[4].ends_with('…'));
        assert_eq!(
            task(r#"{"index":4,"status":"Pending","attempts":0,"latency_ms":null}"#)[4],
            "-"
        );
    }

    #[test]
    fn the_final_document_has_the_callback_shape() {
        let mut view = job("Failed", "2026-01-02T03:04:05Z");
        assert_eq!(final_document(&view), None, "no result before the end");
        view.result = Some(
            RawValue::from_string(r#"{"1":{"status":"Complete","result":1.10}}"#.into()).unwrap(),
        );
        assert_eq!(
            final_document(&view).unwrap(),
            r#"{"job_id":"0190f2a8-3c4d-7e5f-8a9b-0c1d2e3f4a5b","status":"Failed","msg":"Job Finished","result":{"1":{"status":"Complete","result":1.10}}}"#
        );
    }
}
