//! What the `Store` methods answer besides records: each write's outcome, in domain
//! terms, and the deadline sweep's answer.

use super::{Millis, SettleReport, StoreResult};
use crate::job::{JobId, JobStatus};

/// What [`Store::job_insert`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The idempotency key was used before, by this job; `same_request` tells whether with the
    /// same body. Nothing was stored.
    Existing {
        job_id: JobId,
        same_request: bool,
    },
}

/// What [`Store::job_cancel`] did.
#[derive(Clone, Debug)]
pub enum CancelOutcome {
    /// The job is now Cancelled (or already was: cancelling is idempotent).
    Cancelled {
        has_callback: bool,
        /// False when the job was Cancelled already.
        newly: bool,
        /// Tasks this cancel stopped.
        tasks: u64,
    },
    /// The job had already finished otherwise; nothing changed.
    AlreadyFinished(JobStatus),
    NotFound,
}

/// What [`Store::job_set_options`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionsOutcome {
    Updated,
    /// The job's options changed since they were read (another change, a retry): read
    /// them again.
    Changed,
    Finished(JobStatus),
    NotFound,
}

/// What [`Store::job_pause`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PauseOutcome {
    /// The job is now in this status: `Paused` after a pause, `Pending` or `Running` after
    /// a resume.
    Changed(JobStatus),
    /// It already was: paused (a pause), or not paused (a resume).
    Unchanged(JobStatus),
    /// The job has finished; nothing changed.
    Finished(JobStatus),
    NotFound,
}

/// What [`Store::job_retry`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The job runs again: `tasks` were requeued, and this is its run number `run`.
    Requeued {
        tasks: u64,
        run: u32,
    },
    /// The job has not finished.
    Unfinished(JobStatus),
    /// Finished, but its callback is still owed: the new run would race its delivery.
    CallbackPending,
    /// No task of the included statuses.
    NothingToRetry,
    /// A Cancelled job's cancelled tasks were left out: the run could never finish.
    CancelledLeftOut,
    NotFound,
}

/// What [`Store::job_delete`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFinished,
    /// Finished, but its callback is still owed; deleting it would lose the callback.
    CallbackPending,
    NotFound,
}

/// What [`Store::tasks_report`] did.
#[derive(Clone, Debug)]
pub enum ReportOutcome {
    /// Stored; the job it finished, if it was the last task.
    Applied(SettleReport),
    /// This attempt's outcome is already stored.
    AlreadyReported,
    /// No such attempt is running: an unknown task, an attempt that timed out or was
    /// superseded, or a cancelled job.
    Unknown,
}

/// What [`Store::tasks_heartbeat`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// Recorded: the attempt is running (awaiting its report, or still in its call).
    Alive,
    /// This attempt's outcome is stored already.
    Finished,
    /// No such attempt: an unknown task, or an attempt timed out or superseded.
    Unknown,
}

/// Unfinished jobs by their deadline ([`Store::jobs_deadline`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// Jobs whose deadline is at or before the time asked about, earliest first.
    pub due: Vec<JobId>,
    /// The earliest deadline after that time, if any.
    pub next: Option<Millis>,
}

impl Deadlines {
    /// The answer from unfinished jobs' deadlines read earliest first, `limit` + 1 of them
    /// (how every backend asks): those at or before `now`, up to `limit`, and the first
    /// after it.
    pub fn from_earliest(
        now: Millis,
        limit: u32,
        earliest: impl IntoIterator<Item = StoreResult<(JobId, Millis)>>,
    ) -> StoreResult<Self> {
        let mut deadlines = Deadlines::default();
        for found in earliest {
            let (id, at) = found?;
            if at > now {
                deadlines.next = Some(at);
                break;
            }
            if deadlines.due.len() < limit as usize {
                deadlines.due.push(id);
            }
        }
        Ok(deadlines)
    }
}

/// What [`Store::job_expire`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpireOutcome {
    /// The job ended in `status`, `tasks` of its tasks failed by the deadline.
    Expired {
        status: JobStatus,
        has_callback: bool,
        tasks: u64,
    },
    /// Nothing changed: the job is gone or finished, or its deadline (as stored at that
    /// moment: it may have been changed or the job retried) is not past.
    NotDue,
}
