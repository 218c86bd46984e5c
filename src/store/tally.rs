//! What a batch of task outcomes changes, reckoned alike by the SQL backends: the columns
//! each outcome writes, the failure numbers it takes, and what the rows a settle changed add
//! to each job's counters and to the report. The statements that write it are each
//! backend's own; when a job is finished, and how, is `plan`'s to say.

use std::collections::HashMap;

use super::codec::{Code, TASK_COMPLETE, TASK_FAILED, TASK_PENDING, TASK_RUNNING};
use super::plan;
use super::{Millis, SettleOutcome, SettleReport, TaskReport, TaskSettle};
use crate::job::JobStatus;

/// The columns one outcome writes to its task.
pub(super) struct Written<'a> {
    pub status: Code,
    /// When a retry is due, or the latest an awaited attempt's deadline may be moved to (a
    /// running task's `run_at` is unused otherwise); the task keeps its `run_at` otherwise.
    pub run_at: Option<Millis>,
    pub result: Option<&'a str>,
    pub error: Option<&'a str>,
    /// Set for a task that is done (complete or failed), not for a retry or an await.
    pub finished_at: Option<Millis>,
    /// An awaited attempt's deadline: it stays running, held by nobody until then.
    pub lease: Option<Millis>,
}

impl<'a> Written<'a> {
    pub(super) fn of(s: &'a TaskSettle) -> Self {
        let (status, run_at, result, error, lease) = match &s.outcome {
            SettleOutcome::Complete { result } => {
                (TASK_COMPLETE, None, Some(result.get()), None, None)
            }
            SettleOutcome::Failed { error } => (TASK_FAILED, None, None, Some(error.get()), None),
            SettleOutcome::Retry { run_at, error } => {
                (TASK_PENDING, Some(*run_at), None, Some(error.get()), None)
            }
            // `run_at` holds the latest deadline a heartbeat may move it to.
            SettleOutcome::Await { deadline, until } => {
                (TASK_RUNNING, Some(*until), None, None, Some(*deadline))
            }
        };
        let done = status == TASK_COMPLETE || status == TASK_FAILED;
        Written {
            status,
            run_at,
            result,
            error,
            finished_at: done.then_some(s.now),
            lease,
        }
    }
}

/// A reported outcome as the settle of its attempt: a report is settled like a batch of
/// one, whichever node holds the attempt.
pub(super) fn settle_of(report: &TaskReport) -> TaskSettle {
    TaskSettle {
        job_id: report.job_id,
        index: report.index,
        attempt: report.attempt,
        latency_ms: 0,
        now: report.now,
        outcome: report.outcome.clone(),
    }
}

/// Whether an outcome takes a failure number (see [`FailNumbers`]).
pub(super) fn numbers_a_failure(s: &TaskSettle) -> bool {
    matches!(s.outcome, SettleOutcome::Failed { .. })
}

/// The failure numbers a batch hands out, per job: the events stream's cursor. They follow
/// the highest number the job has given so far, not its count of failures, since a stale
/// failure may have taken a number it never stored.
#[derive(Default)]
pub(super) struct FailNumbers(HashMap<i64, i64>);

impl FailNumbers {
    /// Whether job `seq`'s highest number is known yet.
    pub(super) fn knows(&self, seq: i64) -> bool {
        self.0.contains_key(&seq)
    }

    /// Job `seq`'s highest number given so far (0 for none).
    pub(super) fn starts_after(&mut self, seq: i64, last: i64) {
        self.0.insert(seq, last + 1);
    }

    /// The number of a failure of job `seq`, whose highest number was given first.
    pub(super) fn take(&mut self, seq: i64) -> i64 {
        let next = self.0.get_mut(&seq).expect("looked up first");
        *next += 1;
        *next - 1
    }
}

/// What a batch changes of one job.
#[derive(Default)]
pub(super) struct Delta {
    /// Tasks no longer running (their call ended, or they went back to wait for a retry).
    pub settled: i64,
    pub complete: i64,
    pub failed: i64,
    /// The batch's latest time for this job: its finish time, if the batch finishes it.
    pub now: Millis,
}

/// A batch's reckoning: what it changes of each job (by `seq`) and the report it gives.
#[derive(Default)]
pub(super) struct Tally {
    deltas: HashMap<i64, Delta>,
    pub report: SettleReport,
}

impl Tally {
    /// An outcome of job `seq` goes to the database.
    pub(super) fn sent(&mut self, seq: i64, s: &TaskSettle) {
        let d = self.deltas.entry(seq).or_default();
        d.now = d.now.max(s.now);
    }

    /// The database settled a task of job `seq`, which now has `status`. Outcomes that
    /// matched no running attempt (stale ones) come back as no row, and count nowhere.
    pub(super) fn stored(&mut self, seq: i64, status: Code) {
        if status == TASK_RUNNING {
            // Awaiting a report: still running, nothing counted yet.
            self.report.awaiting += 1;
            return;
        }
        let d = self.deltas.get_mut(&seq).expect("a job of this batch");
        d.settled += 1;
        if status == TASK_COMPLETE {
            d.complete += 1;
            self.report.complete += 1;
        } else if status == TASK_FAILED {
            d.failed += 1;
            self.report.failed += 1;
        } else {
            self.report.retried += 1;
        }
    }

    /// The jobs whose counters change, by `seq`, with what changes.
    pub(super) fn changed(&self) -> Vec<(i64, &Delta)> {
        self.deltas
            .iter()
            .filter(|(_, d)| d.settled > 0)
            .map(|(&seq, d)| (seq, d))
            .collect()
    }

    /// When the batch's last outcome of job `seq` was made.
    pub(super) fn now(&self, seq: i64) -> Millis {
        self.deltas.get(&seq).map_or(0, |d| d.now)
    }
}

/// A job's counters as a settle left them (and its status, which the settle has not
/// changed yet): whether the settle finished it, and with which status.
pub(super) struct Counters {
    pub status: JobStatus,
    pub total: i64,
    pub complete: i64,
    pub failed: i64,
    pub tolerated: i64,
}

impl Counters {
    /// The final status of a job whose last task the settle just settled, if it did: a
    /// job finished already (cancelled meanwhile) stays as it is.
    pub(super) fn finished(&self) -> Option<JobStatus> {
        if self.status.is_finished() || self.complete + self.failed < self.total {
            return None;
        }
        Some(plan::final_status(
            self.failed.max(0) as u64,
            self.tolerated.max(0) as u64,
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::job::JobId;

    fn settle(outcome: SettleOutcome) -> TaskSettle {
        TaskSettle {
            job_id: JobId::generate(),
            index: 1,
            attempt: 1,
            latency_ms: 5,
            now: 100,
            outcome,
        }
    }

    fn json(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn outcomes_write_their_columns() {
        let s = settle(SettleOutcome::Complete { result: json("1") });
        let w = Written::of(&s);
        assert_eq!(
            (w.status, w.result, w.finished_at),
            (TASK_COMPLETE, Some("1"), Some(100))
        );
        let s = settle(SettleOutcome::Failed { error: json("2") });
        let w = Written::of(&s);
        assert_eq!(
            (w.status, w.error, w.finished_at),
            (TASK_FAILED, Some("2"), Some(100))
        );
        let s = settle(SettleOutcome::Retry {
            run_at: 7,
            error: json("3"),
        });
        let w = Written::of(&s);
        assert_eq!(
            (w.status, w.run_at, w.finished_at),
            (TASK_PENDING, Some(7), None)
        );
        let s = settle(SettleOutcome::Await {
            deadline: 9,
            until: 9,
        });
        let w = Written::of(&s);
        assert_eq!(
            (w.status, w.lease, w.finished_at),
            (TASK_RUNNING, Some(9), None)
        );
    }

    #[test]
    fn failures_are_numbered_after_the_highest() {
        let mut numbers = FailNumbers::default();
        assert!(!numbers.knows(1));
        numbers.starts_after(1, 4);
        numbers.starts_after(2, 0);
        assert!(numbers.knows(1));
        assert_eq!(
            [numbers.take(1), numbers.take(2), numbers.take(1)],
            [5, 1, 6]
        );
    }

    #[test]
    fn stored_rows_count_towards_their_jobs() {
        let mut tally = Tally::default();
        let mut s = settle(SettleOutcome::Await {
            deadline: 9,
            until: 9,
        });
        tally.sent(1, &s);
        s.now = 300;
        tally.sent(1, &s);
        tally.sent(2, &s);
        for status in [TASK_COMPLETE, TASK_FAILED, TASK_PENDING, TASK_RUNNING] {
            tally.stored(1, status);
        }
        let report = &tally.report;
        assert_eq!(
            (
                report.complete,
                report.failed,
                report.retried,
                report.awaiting
            ),
            (1, 1, 1, 1)
        );
        // Job 2's outcome matched nothing: its counters do not change.
        let changed = tally.changed();
        assert_eq!(changed.len(), 1);
        let (seq, d) = changed[0];
        assert_eq!((seq, d.settled, d.complete, d.failed), (1, 3, 1, 1));
        assert_eq!((tally.now(1), tally.now(2), tally.now(3)), (300, 300, 0));
    }

    #[test]
    fn a_job_finishes_with_its_last_task() {
        let counters = |status, complete, failed| Counters {
            status,
            total: 4,
            complete,
            failed,
            tolerated: 1,
        };
        assert_eq!(counters(JobStatus::Running, 3, 0).finished(), None);
        assert_eq!(
            counters(JobStatus::Running, 3, 1).finished(),
            Some(JobStatus::Complete)
        );
        assert_eq!(
            counters(JobStatus::Running, 2, 2).finished(),
            Some(JobStatus::Failed)
        );
        assert_eq!(
            counters(JobStatus::Pending, 4, 0).finished(),
            Some(JobStatus::Complete)
        );
        assert_eq!(counters(JobStatus::Cancelled, 4, 0).finished(), None);
    }
}
