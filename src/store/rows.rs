//! The rows the SQL backends write and read alike, whatever their SQL: the records the API
//! reads, the jobs a claim serves and the tasks it hands out, a new job's row and what a
//! callback attempt writes.

use std::sync::Arc;

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::codec::{
    CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_PENDING, Code, callback_state, job_code,
    job_status_from, parse_call, parse_id, parse_options, raw, task_status_from, with_call,
};
use super::plan;
use super::{
    CallbackInfo, CallbackOutcome, ClaimedTask, FailedTask, GroupRecord, JobRecord, Millis,
    StoreError, StoreResult, TaskRecord, url_text,
};
use crate::job::{GroupLimits, JobId, JobOptions, JobStatus, NewJob};
use std::collections::HashMap;

/// A row of either SQL backend, read by column name as the readers below need it. Both
/// backends store counts and times as 64-bit integers and attempts as 32-bit ones; JSON,
/// ids and options as text.
pub(super) trait Columns {
    fn int(&self, name: &'static str) -> i64;
    fn int_or_null(&self, name: &'static str) -> Option<i64>;
    fn int32(&self, name: &'static str) -> i32;
    fn int32_or_null(&self, name: &'static str) -> Option<i32>;
    fn text(&self, name: &'static str) -> &str;
    fn text_or_null(&self, name: &'static str) -> Option<String>;
    fn code(&self, name: &'static str) -> Code;
    fn code_or_null(&self, name: &'static str) -> Option<Code>;
    fn float_or_null(&self, name: &'static str) -> Option<f64>;
}

impl<R> Columns for R
where
    R: Row,
    &'static str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Code: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
{
    fn int(&self, name: &'static str) -> i64 {
        self.get(name)
    }
    fn int_or_null(&self, name: &'static str) -> Option<i64> {
        self.get(name)
    }
    fn int32(&self, name: &'static str) -> i32 {
        self.get(name)
    }
    fn int32_or_null(&self, name: &'static str) -> Option<i32> {
        self.get(name)
    }
    fn text(&self, name: &'static str) -> &str {
        self.get(name)
    }
    fn text_or_null(&self, name: &'static str) -> Option<String> {
        self.get(name)
    }
    fn code(&self, name: &'static str) -> Code {
        self.get(name)
    }
    fn code_or_null(&self, name: &'static str) -> Option<Code> {
        self.get(name)
    }
    fn float_or_null(&self, name: &'static str) -> Option<f64> {
        self.get(name)
    }
}

/// A job from a row of the backend's job columns (`JOB_COLUMNS`: the job's, and its
/// callback record's `state`, `attempts` and `last_error`, NULL before it finishes).
pub(super) fn job_from_row(row: &impl Columns) -> StoreResult<JobRecord> {
    let callback_url = row.text_or_null("callback_url");
    Ok(JobRecord {
        id: parse_id(row.text("id"))?,
        owner: row.text_or_null("owner"),
        status: job_status_from(row.code("status"))?,
        options: parse_options(row.text("options"))?,
        total: row.int("total") as u64,
        running: row.int("n_running") as u64,
        complete: row.int("n_complete") as u64,
        failed: row.int("n_failed") as u64,
        cancelled: row.int("n_cancelled") as u64,
        created_at: row.int("created_at"),
        finished_at: row.int_or_null("finished_at"),
        callback: CallbackInfo {
            state: callback_state(callback_url.is_some(), row.code_or_null("state")),
            attempts: row.int32_or_null("attempts").unwrap_or(0) as u32,
            last_error: row.text_or_null("last_error"),
        },
        callback_url,
        metadata: raw(row.text_or_null("metadata"))?,
    })
}

/// A task from a row of the backend's task columns (`TASK_COLUMNS`).
pub(super) fn task_from_row(row: &impl Columns) -> StoreResult<TaskRecord> {
    Ok(TaskRecord {
        index: row.int("idx") as u64,
        status: task_status_from(row.code("status"))?,
        attempts: row.int32("attempts") as u32,
        endpoint: row.text("endpoint").to_string(),
        call: parse_call(row.text_or_null("call").as_deref())?,
        result: raw(row.text_or_null("result"))?,
        error: raw(row.text_or_null("error"))?,
        latency_ms: row.int_or_null("latency_ms").map(|v| v as u64),
        finished_at: row.int_or_null("finished_at"),
        progress: raw(row.text_or_null("progress"))?,
    })
}

/// A failed task from a row of the task columns and its `fail_seq`.
pub(super) fn failed_task_from_row(row: &impl Columns) -> StoreResult<FailedTask> {
    Ok(FailedTask {
        fail_seq: row.int("fail_seq") as u64,
        task: task_from_row(row)?,
    })
}

/// A job whose tasks are handed out (claimed, or overdue and leased): its id, its options
/// parsed once for all of them, and its owner.
pub(super) struct ClaimedJob {
    pub id: JobId,
    pub options: Arc<JobOptions>,
    pub owner: Option<Arc<str>>,
}

impl ClaimedJob {
    /// One of its tasks, from a row of `idx`, `attempts`, `endpoint`, `params` and `call`.
    pub(super) fn task(&self, row: &impl Columns) -> StoreResult<ClaimedTask> {
        claimed_task(row, self.id, &self.options, &self.owner)
    }
}

fn claimed_task(
    row: &impl Columns,
    job_id: JobId,
    options: &Arc<JobOptions>,
    owner: &Option<Arc<str>>,
) -> StoreResult<ClaimedTask> {
    Ok(ClaimedTask {
        job_id,
        index: row.int("idx") as u64,
        attempt: row.int32("attempts") as u32,
        attempt_base: row.int32("attempt_base") as u32,
        endpoint: row.text("endpoint").to_string(),
        params: raw(Some(row.text("params").to_string()))?.expect("some"),
        // A task with settings of its own is called with them over its job's options.
        options: with_call(options, row.text_or_null("call").as_deref())?,
        owner: owner.clone(),
        start_at: None,
    })
}

/// A job a claim may serve, from a row of its `seq`, `id`, `owner`, `options`,
/// `concurrency`, `n_running`, `priority`, `last_claim_at` and `group_name`.
pub(super) struct Candidate {
    pub seq: i64,
    pub id: JobId,
    pub priority: i32,
    /// When a claim last served it (0: never).
    pub last_claim_at: Millis,
    /// Its `options.group` (from its own column: no options parsed for it).
    pub group: Option<String>,
    pub owner: Option<Arc<str>>,
    options_text: String,
    /// Parsed once, for the jobs this claim serves.
    options: Option<Arc<JobOptions>>,
    /// How many of its tasks may start: its room under its concurrency, within what a
    /// claim gives a job that limits its calls per host.
    pub headroom: u64,
}

impl Candidate {
    pub(super) fn from_row(row: &impl Columns) -> StoreResult<Self> {
        let concurrency = row.int_or_null("concurrency");
        let running = row.int("n_running");
        let options_text = row.text("options").to_string();
        // A job limiting its calls per host gives one claim what its gates start soon.
        let options = if plan::may_limit_hosts(&options_text) {
            Some(Arc::new(parse_options(&options_text)?))
        } else {
            None
        };
        let cap = options.as_deref().map_or(u64::MAX, plan::claim_cap);
        Ok(Candidate {
            seq: row.int("seq"),
            id: parse_id(row.text("id"))?,
            priority: row.int32("priority"),
            last_claim_at: row.int("last_claim_at"),
            group: row.text_or_null("group_name"),
            owner: row.text_or_null("owner").map(Arc::from),
            options_text,
            options,
            headroom: concurrency
                .map_or(u64::MAX, |c| (c - running).max(0) as u64)
                .min(cap),
        })
    }

    /// When a claim last served it, or, never served, when it was submitted: what its
    /// wait is counted from (`plan::levels`).
    pub(super) fn served_at(&self) -> Millis {
        if self.last_claim_at > 0 {
            self.last_claim_at
        } else {
            self.id.created_millis()
        }
    }

    /// One of its tasks that the claim took, from a row of `idx`, `attempts`, `endpoint`
    /// and `params`.
    pub(super) fn task(&mut self, row: &impl Columns) -> StoreResult<ClaimedTask> {
        let options = match &self.options {
            Some(options) => options.clone(),
            None => {
                let options = Arc::new(parse_options(&self.options_text)?);
                self.options = Some(options.clone());
                options
            }
        };
        claimed_task(row, self.id, &options, &self.owner)
    }
}

/// A new job's row, but for its id, idempotency key and owner (which the backends bind as
/// they are): a job without tasks is stored finished, Complete, its callback due at once.
pub(super) struct NewJobRow {
    pub status: Code,
    pub options: String,
    pub concurrency: Option<i64>,
    pub tolerated: i64,
    pub total: i64,
    pub callback_url: Option<String>,
    pub finished_at: Option<Millis>,
    /// No tasks: finished at once, and its callback, if it has one, due at once.
    pub empty: bool,
    pub metadata: Option<String>,
    /// `options.not_before`, in a column of its own for the lists that tell a scheduled
    /// job from a pending one.
    pub not_before: Option<Millis>,
    /// When the tasks are first due: now, or the job's `not_before`.
    pub run_at: Millis,
    /// When its time budget runs out (`plan::deadline`), for the deadline sweep.
    pub deadline_at: Option<Millis>,
    pub priority: i32,
    /// `options.group`, in a column of its own for the claims that count a group's calls.
    pub group: Option<String>,
}

impl NewJobRow {
    pub(super) fn of(job: &NewJob, now: Millis) -> StoreResult<Self> {
        let empty = job.tasks.is_empty();
        let status = if empty {
            JobStatus::Complete
        } else {
            JobStatus::Pending
        };
        Ok(NewJobRow {
            status: job_code(status),
            options: serde_json::to_string(&job.options)
                .map_err(|e| StoreError::Other(e.to_string()))?,
            concurrency: job.options.concurrency.map(i64::from),
            tolerated: job.options.tolerated(job.tasks.len() as u64) as i64,
            total: job.tasks.len() as i64,
            callback_url: url_text(&job.callback),
            finished_at: empty.then_some(now),
            empty,
            metadata: job.metadata.as_ref().map(|m| m.get().to_string()),
            not_before: job.options.not_before.map(|t| t.millis()),
            run_at: job.first_run_at(now),
            deadline_at: (!empty)
                .then(|| super::plan::deadline(&job.options, now))
                .flatten(),
            priority: job.options.priority,
            group: job.options.group.clone(),
        })
    }
}

/// What a callback attempt writes to its delivery record.
pub(super) struct CallbackWrite<'a> {
    pub state: Code,
    pub next_attempt_at: Option<Millis>,
    /// Kept from the attempt before when `None`.
    pub error: Option<&'a str>,
    pub delivered_at: Option<Millis>,
}

impl<'a> CallbackWrite<'a> {
    pub(super) fn of(outcome: &'a CallbackOutcome, now: Millis) -> Self {
        let (state, next_attempt_at, error, delivered_at) = match outcome {
            CallbackOutcome::Delivered => (CALLBACK_DELIVERED, None, None, Some(now)),
            CallbackOutcome::Retry { at, error } => {
                (CALLBACK_PENDING, Some(*at), Some(error.as_str()), None)
            }
            CallbackOutcome::GaveUp { error } => {
                (CALLBACK_FAILED, None, Some(error.as_str()), None)
            }
        };
        CallbackWrite {
            state,
            next_attempt_at,
            error,
            delivered_at,
        }
    }
}

/// The named groups of a claim's candidates, each once.
pub(super) fn candidate_groups(candidates: &[Candidate]) -> Vec<plan::GroupKey> {
    let mut keys: Vec<plan::GroupKey> = candidates
        .iter()
        .filter_map(|c| Some(plan::group_key(c.owner.as_deref(), c.group.as_deref()?)))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The groups of `keys` that have limits, own (`own`: limits and next start, from the
/// groups' rows) or the server's default, as gates with their calls in flight.
pub(super) fn group_gates(
    keys: &[plan::GroupKey],
    own: &HashMap<plan::GroupKey, (GroupLimits, f64)>,
    default_concurrency: Option<u32>,
) -> HashMap<plan::GroupKey, plan::GroupGate> {
    keys.iter()
        .filter_map(|key| {
            let row = own.get(key);
            let limits = GroupLimits::effective(row.map(|(l, _)| l), default_concurrency);
            limits.limits().then(|| {
                let gate = plan::GroupGate {
                    limits,
                    in_flight: 0,
                    next_start: row.map_or(0.0, |&(_, next)| next),
                };
                (key.clone(), gate)
            })
        })
        .collect()
}

/// A group's own limits from its row's `concurrency` and `rate`.
pub(super) fn group_limits(row: &impl Columns) -> GroupLimits {
    GroupLimits {
        concurrency: row.int_or_null("concurrency").map(|c| c as u32),
        rate: row.float_or_null("rate"),
    }
}

/// Groups as `Store::groups_list` answers: those with limits of their own (`own`, by name)
/// and those with unfinished jobs (`counts`: name, tasks running, jobs), by name.
pub(super) fn group_records(
    own: Vec<(String, GroupLimits)>,
    counts: Vec<(String, u64, u64)>,
) -> Vec<GroupRecord> {
    let mut records: std::collections::BTreeMap<String, GroupRecord> = own
        .into_iter()
        .map(|(name, limits)| {
            let record = GroupRecord {
                name: name.clone(),
                own: Some(limits),
                in_flight: 0,
                jobs: 0,
            };
            (name, record)
        })
        .collect();
    for (name, in_flight, jobs) in counts {
        let record = records.entry(name.clone()).or_insert_with(|| GroupRecord {
            name,
            own: None,
            in_flight: 0,
            jobs: 0,
        });
        record.in_flight = in_flight;
        record.jobs = jobs;
    }
    records.into_values().collect()
}
