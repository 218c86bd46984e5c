//! The storage seam: one trait in domain terms, one module per backend.
//!
//! Nothing outside this module speaks SQL or knows which database is behind the trait; a
//! key-value backend must be able to implement every method. Methods that change several
//! records at once (a submission, a claim, a batch of task outcomes) are atomic: either all
//! of it is stored or none.

mod codec;
pub mod dynamodb;
mod fault;
mod outcomes;
pub mod plan;
mod postgres;
mod rows;
mod sqlite;
mod tally;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use serde_json::value::RawValue;
use url::Url;

use crate::job::{
    CallbackState, GroupLimits, JobId, JobOptions, JobStatus, NewJob, TaskCall, TaskStatus,
};

pub use dynamodb::DynamoStore;
pub use outcomes::{
    CancelOutcome, Deadlines, DeleteOutcome, ExpireOutcome, HeartbeatOutcome, InsertOutcome,
    OptionsOutcome, PauseOutcome, ReportOutcome, RetryOutcome,
};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// What can go wrong in a store, in terms its callers can act on.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// Another process or writer holds what was asked for.
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be reached or is out of space; the request may succeed later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// What was asked is valid but this store cannot keep it (a DynamoDB item's size, a
    /// table made before a feature): sent again, it fails again. The message is the
    /// client's to read.
    #[error("{0}")]
    Refused(String),
    #[error("database error: {0}")]
    Other(String),
}

/// How the detail of an `Unavailable` error for a full database begins.
const FULL: &str = "disk full";

impl StoreError {
    /// The database is out of space: a full disk, or its size limit. `Unavailable`, since
    /// it passes once space is freed, with a detail that says which, for the API to tell
    /// its clients. (A variant of its own would behave as `Unavailable` at every match
    /// but one.)
    pub fn full(detail: impl std::fmt::Display) -> Self {
        StoreError::Unavailable(format!("{FULL}: {detail}"))
    }

    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Unavailable(detail) if detail.starts_with(FULL))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Milliseconds since the Unix epoch; every time the store keeps is one of these.
pub type Millis = i64;

/// Opens the backend named by the URL's scheme. SQLite creates its schema when missing;
/// a DynamoDB table must have been created by [`migrate`] (creating a table is an
/// administrator's decision: it costs money and needs permissions a service should not hold).
pub async fn open(url: &str) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url).await?))
    } else if url.starts_with("dynamodb:") {
        Ok(Arc::new(DynamoStore::open(url).await?))
    } else {
        Err(unsupported(url))
    }
}

/// Creates or brings up to date the schema of the database at `url`; says what it did.
pub async fn migrate(url: &str) -> StoreResult<String> {
    if url.starts_with("sqlite:") {
        SqliteStore::open(url).await?;
        Ok(format!("database {url} is up to date"))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        PostgresStore::open(url).await?;
        Ok("the PostgreSQL schema is up to date".into())
    } else if url.starts_with("dynamodb:") {
        let (outcome, what) = DynamoStore::migrate(url).await?;
        Ok(match outcome {
            dynamodb::Migrated::Created => format!("{what} created and active"),
            dynamodb::Migrated::AlreadyThere => format!("{what} exists and is active"),
        })
    } else {
        Err(unsupported(url))
    }
}

fn unsupported(url: &str) -> StoreError {
    // Only the scheme: the rest may hold a password.
    let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
    StoreError::Other(format!(
        "unsupported database URL scheme {scheme:?}: expected sqlite://PATH, sqlite::memory:, \
         postgres://USER@HOST:PORT/DATABASE or dynamodb://TABLE?region=REGION[&endpoint=URL]"
    ))
}

/// A job as stored, without its tasks.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub id: JobId,
    pub owner: Option<String>,
    pub status: JobStatus,
    pub options: JobOptions,
    pub total: u64,
    pub running: u64,
    pub complete: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub created_at: Millis,
    pub finished_at: Option<Millis>,
    pub callback_url: Option<String>,
    pub callback: CallbackInfo,
    /// The client's `metadata`, as submitted.
    pub metadata: Option<Box<RawValue>>,
}

impl JobRecord {
    pub fn pending(&self) -> u64 {
        self.total - self.running - self.complete - self.failed - self.cancelled
    }
}

#[derive(Clone, Debug)]
pub struct CallbackInfo {
    pub state: CallbackState,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// One task as stored. `result` and `error` are JSON text.
#[derive(Clone)]
pub struct TaskRecord {
    pub index: u64,
    pub status: TaskStatus,
    pub attempts: u32,
    pub endpoint: String,
    /// The task's own call settings, secret values sealed.
    pub call: Option<TaskCall>,
    pub result: Option<Box<RawValue>>,
    pub error: Option<Box<RawValue>>,
    pub latency_ms: Option<u64>,
    pub finished_at: Option<Millis>,
    /// The last progress an attempt of the task reported with a heartbeat.
    pub progress: Option<Box<RawValue>>,
}

/// A client's `Idempotency-Key` and a digest of the body it came with.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub key: String,
    pub request_hash: String,
}

/// A page of a job's tasks.
#[derive(Clone, Debug)]
pub struct TaskPageQuery {
    /// Only tasks with a larger index.
    pub after: u64,
    pub limit: u32,
    pub status: Option<TaskStatus>,
}

/// A failed task and its place in the order the job's tasks failed (1, 2, 3, ...).
#[derive(Clone, Debug)]
pub struct FailedTask {
    pub fail_seq: u64,
    pub task: TaskRecord,
}

#[derive(Clone, Debug)]
pub struct JobListQuery {
    /// Only this owner's jobs, when given.
    pub owner: Option<String>,
    /// Only jobs that read so at `now` (a `Scheduled` job is stored `Pending`).
    pub status: Option<JobStatus>,
    /// Only jobs whose `metadata` has this top-level key with this string value.
    pub metadata: Option<(String, String)>,
    /// Only jobs of this group (`options.group`).
    pub group: Option<String>,
    /// Only jobs created before this one (newest first pagination).
    pub before: Option<JobId>,
    pub limit: u32,
    /// When `Scheduled` is told from `Pending`.
    pub now: Millis,
}

impl JobListQuery {
    /// The stored status to look for, and whether the job must be scheduled (`Some(true)`),
    /// must not be (`Some(false)`), or either (`None`).
    pub fn stored_status(&self) -> (Option<JobStatus>, Option<bool>) {
        match self.status {
            Some(JobStatus::Scheduled) => (Some(JobStatus::Pending), Some(true)),
            Some(JobStatus::Pending) => (Some(JobStatus::Pending), Some(false)),
            other => (other, None),
        }
    }

    /// Whether `job` is one of the jobs asked for (but for the owner and the page): the
    /// rule the SQL backends write as a `WHERE` clause, for a backend that filters the
    /// records it read.
    pub fn matches(&self, job: &JobRecord) -> bool {
        let status = self
            .status
            .is_none_or(|st| job.status.shown(&job.options, self.now) == st);
        let metadata = self.metadata.as_ref().is_none_or(|(key, value)| {
            job.metadata
                .as_ref()
                .and_then(|m| serde_json::from_str::<serde_json::Map<String, Value>>(m.get()).ok())
                .is_some_and(|m| m.get(key).and_then(Value::as_str) == Some(value.as_str()))
        });
        let group = self
            .group
            .as_ref()
            .is_none_or(|g| job.options.group.as_ref() == Some(g));
        status && metadata && group
    }
}

/// The name a process's leases carry in the store: random at every start, so a restarted
/// node never mistakes its predecessor's calls for its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub i64);

impl NodeId {
    pub fn random() -> Self {
        // Positive, so that it reads the same in every database's signed integer column.
        NodeId(rand::random::<i64>() & i64::MAX)
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A claim: up to `limit` tasks whose time has come, shared fairly between jobs.
#[derive(Clone, Debug)]
pub struct ClaimParams {
    pub limit: u32,
    pub now: Millis,
    /// The claiming node: the tasks are leased to it until `lease_until`.
    pub node: NodeId,
    pub lease_until: Millis,
    /// Jobs to leave out of this claim (their calls already queue at a host's limit).
    pub skip_jobs: Vec<JobId>,
    /// How long a job below the highest priority may go unserved before it is served above
    /// it (`plan::levels`).
    pub priority_max_wait: Millis,
    /// How much of this node each owner may still take (see `plan`).
    pub owners: plan::OwnerLimits,
    /// The concurrency of a group without its own (`--group-concurrency`).
    pub group_concurrency: Option<u32>,
}

/// What a claim hands to the engine: everything needed to make the call.
#[derive(Clone)]
pub struct ClaimedTask {
    pub job_id: JobId,
    pub index: u64,
    /// The attempt this call is, counting from 1 over every run of the job.
    pub attempt: u32,
    /// Attempts made in the job's earlier runs: this run's budget (`max_attempts`) and
    /// backoff count from here.
    pub attempt_base: u32,
    pub endpoint: String,
    pub params: Box<RawValue>,
    pub options: Arc<JobOptions>,
    /// Who submitted the job (`auth::Owner`), for the engine's count per owner.
    pub owner: Option<Arc<str>>,
    /// The start its group's rate reserved for this call (`plan::GroupGate::starts`): the
    /// engine waits for it before the call; `None` to start at once.
    pub start_at: Option<Millis>,
}

#[derive(Debug, Default)]
pub struct Claim {
    pub tasks: Vec<ClaimedTask>,
    /// The earliest time at which a waiting task (a retry in backoff) becomes due, when the
    /// claim left such tasks behind.
    pub next_due: Option<Millis>,
}

/// The outcome of one attempt, written by [`Store::tasks_settle`].
#[derive(Clone, Debug)]
pub struct TaskSettle {
    pub job_id: JobId,
    pub index: u64,
    /// The attempt that produced this outcome; a settle for any other attempt, or from a
    /// node that no longer holds the task's lease, is ignored.
    pub attempt: u32,
    pub latency_ms: u64,
    pub now: Millis,
    pub outcome: SettleOutcome,
}

#[derive(Clone)]
pub enum SettleOutcome {
    Complete {
        result: Box<RawValue>,
    },
    Failed {
        error: Box<RawValue>,
    },
    /// Back to pending, due again at `run_at`; `error` records why this attempt failed.
    Retry {
        run_at: Millis,
        error: Box<RawValue>,
    },
    /// The endpoint accepted the task (202) and will report its outcome later: the attempt
    /// stays running, held by no node (so it leaves this node's slots free, but still counts
    /// against the job's `concurrency`), until a report ([`Store::tasks_report`]) or
    /// `deadline` ([`Store::tasks_overdue`]). A heartbeat ([`Store::tasks_heartbeat`]) of a
    /// job with `async_heartbeat_ms` moves the deadline on, never past `until`
    /// (`async_timeout_ms` after the 202), which the SQL backends keep in the running
    /// task's `run_at` (a pending task's due time, unused while it runs).
    Await {
        deadline: Millis,
        until: Millis,
    },
}

/// The size of a body, where its `Debug` would otherwise print it: logs carry sizes and
/// ids, never the data of tasks (it may be large, and it is the submitter's).
struct Size(usize);

impl std::fmt::Debug for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

impl std::fmt::Debug for SettleOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettleOutcome::Complete { result } => f
                .debug_struct("Complete")
                .field("result", &Size(result.get().len()))
                .finish(),
            SettleOutcome::Failed { error } => f
                .debug_struct("Failed")
                .field("error", &Size(error.get().len()))
                .finish(),
            SettleOutcome::Retry { run_at, error } => f
                .debug_struct("Retry")
                .field("run_at", run_at)
                .field("error", &Size(error.get().len()))
                .finish(),
            SettleOutcome::Await { deadline, until } => f
                .debug_struct("Await")
                .field("deadline", deadline)
                .field("until", until)
                .finish(),
        }
    }
}

/// A group of jobs (`options.group`) as [`Store::groups_list`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRecord {
    pub name: String,
    /// Its own limits, if it has any (`Store::group_set`).
    pub own: Option<GroupLimits>,
    /// Its unfinished jobs' tasks running now, on every node.
    pub in_flight: u64,
    /// Its unfinished jobs.
    pub jobs: u64,
}

impl ClaimedTask {
    /// This attempt's number within the job's current run, from 1: what its budget and
    /// backoff are reckoned on.
    pub fn attempt_in_run(&self) -> u32 {
        self.attempt.saturating_sub(self.attempt_base).max(1)
    }
}

impl std::fmt::Debug for ClaimedTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedTask")
            .field("job_id", &self.job_id)
            .field("index", &self.index)
            .field("attempt", &self.attempt)
            .field("params", &Size(self.params.get().len()))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TaskRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRecord")
            .field("index", &self.index)
            .field("status", &self.status)
            .field("attempts", &self.attempts)
            .field("result", &self.result.as_ref().map(|r| Size(r.get().len())))
            .field("error", &self.error.as_ref().map(|e| Size(e.get().len())))
            .finish_non_exhaustive()
    }
}

/// An outcome reported for an attempt that answered 202, through its task token.
#[derive(Clone, Debug)]
pub struct TaskReport {
    pub job_id: JobId,
    pub index: u64,
    /// The attempt the token was minted for.
    pub attempt: u32,
    pub now: Millis,
    /// `Complete` or `Failed` (a reported failure is final).
    pub outcome: SettleOutcome,
}

/// A heartbeat of an attempt that answered 202 (`POST /v1/tasks/{token}/heartbeat`).
#[derive(Clone, Debug)]
pub struct TaskHeartbeat {
    pub job_id: JobId,
    pub index: u64,
    /// The attempt the token was minted for.
    pub attempt: u32,
    pub now: Millis,
    /// The progress it reports, kept as the task's last (JSON text, bounded by the API).
    pub progress: Option<Box<RawValue>>,
}

/// Overdue awaited attempts to take, like a claim, so that this node records their timeout.
#[derive(Clone, Debug)]
pub struct OverdueParams {
    pub limit: u32,
    pub now: Millis,
    pub node: NodeId,
    pub lease_until: Millis,
}

/// What a settle batch changed: the outcomes applied (a stale one is not) and the jobs it
/// brought to their end.
#[derive(Clone, Debug, Default)]
pub struct SettleReport {
    pub complete: u64,
    pub failed: u64,
    pub retried: u64,
    /// Attempts now waiting for a report.
    pub awaiting: u64,
    pub finished: Vec<JobFinished>,
}

/// A job that a settle batch brought to its end.
#[derive(Clone, Debug)]
pub struct JobFinished {
    pub job_id: JobId,
    pub status: JobStatus,
    pub has_callback: bool,
}

/// A callback delivery that is due, leased to the caller by [`Store::callbacks_due`].
#[derive(Clone, Debug)]
pub struct CallbackDue {
    pub job_id: JobId,
    pub url: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

#[derive(Clone, Debug)]
pub struct CallbackRecord {
    pub job_id: JobId,
    /// The number of attempts made, this one included.
    pub attempts: u32,
    pub now: Millis,
    pub outcome: CallbackOutcome,
}

/// What one node tells the others through the database, so that they act at once rather
/// than at their next look. Only backends that several processes share send them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Tasks may have become claimable: a job was submitted, or expired leases were taken
    /// back.
    Work,
    /// A callback delivery became due.
    CallbackDue,
    /// A job was cancelled: its calls in flight anywhere should stop.
    Cancelled(JobId),
    /// A finished job was retried: its calls may start again, cancelled or not before.
    Retried(JobId),
}

/// A stream of notices from every node on the database (this one's included).
pub type Notices = futures_util::stream::BoxStream<'static, Notice>;

#[derive(Clone, Debug)]
pub enum CallbackOutcome {
    Delivered,
    Retry { at: Millis, error: String },
    GaveUp { error: String },
}

/// The durable state of DoParallel. See the module docs for the atomicity rules.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a job and all its tasks in one transaction. A job with no task is stored as
    /// finished (`Complete`) with its callback due at once. With an idempotency key that was
    /// used before, stores nothing and names the job it was used for.
    async fn job_insert(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
        now: Millis,
    ) -> StoreResult<InsertOutcome>;

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>>;

    /// Jobs newest first.
    async fn job_list(&self, query: &JobListQuery) -> StoreResult<Vec<JobRecord>>;

    /// Tasks of a job in index order, after `query.after`, of one status if asked.
    async fn tasks_page(&self, id: JobId, query: &TaskPageQuery) -> StoreResult<Vec<TaskRecord>>;

    /// Failed tasks of a job in the order they failed, after the `after`-th failure.
    async fn tasks_failed_since(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<FailedTask>>;

    /// Cancels an unfinished job in one transaction: its pending and running tasks become
    /// Cancelled (a late outcome of a running one is then ignored), the job Cancelled, and
    /// its callback is due.
    async fn job_cancel(&self, id: JobId, now: Millis) -> StoreResult<CancelOutcome> {
        self.job_end(id, JobStatus::Cancelled, now).await
    }

    /// Ends an unfinished job in `status` as [`Store::job_cancel`] does: Cancelled, or
    /// Complete or Failed when its outcome is decided before every task ran
    /// (`plan::decided`). A job already in `status` reads `Cancelled { newly: false }`.
    async fn job_end(
        &self,
        id: JobId,
        status: JobStatus,
        now: Millis,
    ) -> StoreResult<CancelOutcome>;

    /// Replaces an unfinished job's options with `options`, on condition that they still
    /// are `seen` (as read): the next claim on every node serves the job under them.
    async fn job_set_options(
        &self,
        id: JobId,
        seen: &JobOptions,
        options: &JobOptions,
    ) -> StoreResult<OptionsOutcome>;

    /// Pauses an unfinished job (`pause`): no claim takes its tasks until it is resumed;
    /// its calls in flight settle as usual, and may finish it. Or resumes a paused one, in
    /// the status `plan::resumed_status` says.
    async fn job_pause(&self, id: JobId, pause: bool) -> StoreResult<PauseOutcome>;

    /// Unfinished jobs (Pending, Running, Paused) whose deadline (`plan::deadline`) is at or
    /// before `now`, up to `limit`, earliest first, and the next deadline after `now`.
    async fn jobs_deadline(&self, now: Millis, limit: u32) -> StoreResult<Deadlines>;

    /// Ends a job whose deadline passed, in one transaction: its unfinished tasks (pending,
    /// in backoff, in a call or awaiting a report) `Failed` with `error`, the job Complete
    /// or Failed by its stored tolerance (`plan::final_status`), its callback due, every
    /// node told to stop its calls (as a cancel). Changes nothing unless the job is
    /// unfinished and its deadline, as stored at that moment, is at or before `now`.
    async fn job_expire(
        &self,
        id: JobId,
        error: &RawValue,
        now: Millis,
    ) -> StoreResult<ExpireOutcome>;

    /// Retries a finished job in one transaction: its tasks of the `include` statuses (Failed,
    /// Cancelled) become Pending, due now, with a fresh attempt budget (their attempt count
    /// goes on); the job is Running again in its next run, its counters less those tasks,
    /// and its callback record goes (a new one is made when it finishes again).
    async fn job_retry(
        &self,
        id: JobId,
        include: &[TaskStatus],
        now: Millis,
    ) -> StoreResult<RetryOutcome>;

    /// Removes a finished job with its tasks and callback record, unless its callback is
    /// still owed.
    async fn job_delete(&self, id: JobId) -> StoreResult<DeleteOutcome>;

    /// Removes up to `limit` jobs that finished before `finished_before` and whose callback
    /// is not still owed; returns how many.
    async fn jobs_purge(&self, finished_before: Millis, limit: u32) -> StoreResult<u64>;

    /// Tasks waiting to be called across all unfinished jobs.
    async fn queue_depth(&self) -> StoreResult<u64>;

    /// Sets the own limits of `owner`'s group `name` (`PUT /v1/groups/{name}`), replacing
    /// any before; the next claim on any node obeys them.
    async fn group_set(
        &self,
        owner: Option<&str>,
        name: &str,
        limits: &GroupLimits,
    ) -> StoreResult<()>;

    /// Removes the own limits of `owner`'s group `name`; whether it had any.
    async fn group_delete(&self, owner: Option<&str>, name: &str) -> StoreResult<bool>;

    /// `owner`'s groups that have limits of their own or unfinished jobs (only `name`, if
    /// given), by name, each with its calls in flight.
    async fn groups_list(
        &self,
        owner: Option<&str>,
        name: Option<&str>,
    ) -> StoreResult<Vec<GroupRecord>>;

    /// Marks up to `limit` due tasks as running (their attempt counted), leased to
    /// `params.node` until `params.lease_until`, and returns them. Jobs are served
    /// round-robin, least recently served first, each within its `concurrency` (counted over
    /// every node), except those in `params.skip_jobs` and those of owners with no room left
    /// in `params.owners`; how many each job gets is [`plan::FairShare`]'s to say.
    async fn tasks_claim(&self, params: &ClaimParams) -> StoreResult<Claim>;

    /// Records a batch of attempt outcomes of `node`'s calls in one transaction, together
    /// with the job counters they change. An outcome changes nothing unless its task is
    /// still running that attempt under `node`'s lease (a late answer after the lease was
    /// taken over, or after a cancel, is dropped): each result is stored once. A job whose
    /// last task this settles gets its final status and its callback delivery record in
    /// that same transaction; those jobs are reported.
    async fn tasks_settle(&self, node: NodeId, batch: &[TaskSettle]) -> StoreResult<SettleReport>;

    /// Stores the reported outcome of an attempt that is running (awaiting its report, or
    /// still in its call: a report may overtake the 202 that announces it), whichever node
    /// made it, with the same counters and fan-in as [`Store::tasks_settle`].
    async fn tasks_report(&self, report: &TaskReport) -> StoreResult<ReportOutcome>;

    /// Records a heartbeat of a running attempt, whichever node made it: its progress, if
    /// it carries one, becomes the task's; an attempt awaiting its report of a job with
    /// `async_heartbeat_ms` gets its deadline moved to that long after `beat.now`, never
    /// past its `until` (`plan::heartbeat_deadline`).
    async fn tasks_heartbeat(&self, beat: &TaskHeartbeat) -> StoreResult<HeartbeatOutcome>;

    /// Leases to `params.node` up to `params.limit` awaited attempts whose deadline passed,
    /// so that it settles them as timed out. Returns them as claimed (same attempt).
    async fn tasks_overdue(&self, params: &OverdueParams) -> StoreResult<Vec<ClaimedTask>>;

    /// The database's key for task tokens: random, created at first use, the same for
    /// every node, so a token minted by one node is checked by any.
    async fn task_token_key(&self) -> StoreResult<Vec<u8>>;

    /// Extends to `until` the leases of every task `node` has running; returns how many.
    async fn tasks_renew(&self, node: NodeId, until: Millis) -> StoreResult<u64>;

    /// Takes back the running tasks whose lease ran out before `now` (their node died or
    /// stalled): they become pending again, due at once, the interrupted attempt not
    /// counted. Awaited attempts (held by no node) are not touched. Returns how many.
    async fn tasks_expire(&self, now: Millis) -> StoreResult<u64>;

    /// Called once at start. A backend that only one process can open puts every task left
    /// running in a call back to pending, its interrupted attempt not counted (they were all
    /// the previous process's; awaited attempts stay as they are); a shared backend leaves them to [`Store::tasks_expire`], since
    /// their nodes may be alive.
    async fn tasks_recover(&self) -> StoreResult<u64>;

    /// Leases up to `limit` callback deliveries that are due at `now` until `lease_until`,
    /// so that no other worker sends them meanwhile.
    async fn callbacks_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<CallbackDue>>;

    /// The earliest time a pending callback delivery is due, if any.
    async fn callback_next_due(&self) -> StoreResult<Option<Millis>>;

    /// Records a callback attempt. Changes nothing unless `record.attempts` is one more than
    /// the attempts stored (each attempt is recorded once, by the node that made it, even
    /// if its lease ran out meanwhile and another node tried too); returns whether it was
    /// recorded.
    async fn callback_record(&self, record: &CallbackRecord) -> StoreResult<bool>;

    /// Notices from the other nodes on this database, or `None` for a backend only one
    /// process can open (the engine then relies on its own wake-ups).
    async fn listen(&self) -> StoreResult<Option<Notices>>;

    /// Answers when the database does.
    async fn health(&self) -> StoreResult<()>;

    /// What this backend can keep for one task; unbounded unless it says otherwise.
    fn item_limits(&self) -> ItemLimits {
        ItemLimits::default()
    }
}

/// The most a backend keeps for one task, where its items are bounded (DynamoDB's 400 KB):
/// a server configured for more is told at start, not at the first large task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemLimits {
    /// A task's parameters, in bytes.
    pub max_params_bytes: Option<usize>,
    /// A task's stored result or error, in bytes.
    pub max_result_bytes: Option<usize>,
}

/// The current time as stored.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Callback URLs are stored as text; this keeps their spelling the one `Url` gives.
pub(crate) fn url_text(url: &Option<Url>) -> Option<String> {
    url.as_ref().map(|u| u.to_string())
}
