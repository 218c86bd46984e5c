//! The shared backend: PostgreSQL, for several nodes on one database.
//!
//! Any number of `doparallel serve` processes may open the same database; each is a node
//! with its own [`NodeId`]. What keeps them from stepping on each other:
//!
//! - A claim locks the job rows it serves (`FOR UPDATE SKIP LOCKED`), checks and raises
//!   each job's `n_running` under that lock (so a job's `concurrency` holds across the
//!   cluster), and takes the due tasks it leases the same way: two nodes never get one task.
//! - Running tasks are leased to their node until `lease_until`. A settle applies only under
//!   its node's lease and attempt, so a late answer from a node that lost its lease changes
//!   nothing and each result is stored once. A node renews its leases while its calls run;
//!   any node takes back the tasks whose lease ran out.
//! - A settle locks its jobs' rows (`FOR UPDATE`, in `seq` order) before anything else, so
//!   two nodes settling a job's last two tasks at once cannot both finish it, nor neither,
//!   and failures are numbered without gaps between nodes. The transaction that settles a
//!   job's last task writes its final status (`plan::final_status` decides it).
//! - Callback deliveries are leased with `FOR UPDATE SKIP LOCKED`: one node per attempt.
//! - Writers that wait take job rows first, in `seq` order, then tasks; the others (claim,
//!   renewal, purge, callback leases) skip what is locked rather than wait, so no two
//!   transactions can wait on each other in a cycle.
//!
//! Nodes wake each other with `NOTIFY` on one channel, sent inside the writing transaction
//! (so it is heard only once the change is visible): a job submitted or expired leases taken
//! back (`work`), a callback due (`callback`), a job cancelled (`cancel:ID`). An idle node
//! makes two single-statement queries per idle poll plus the lease sweep.
//!
//! JSON is stored as TEXT, never jsonb, which would reorder keys and respell numbers.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};

use super::codec::{
    CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_PENDING, Code, JOB_CANCELLED, JOB_COMPLETE,
    JOB_FAILED, JOB_PENDING, JOB_RUNNING, TASK_CANCELLED, TASK_COMPLETE, TASK_FAILED, TASK_PENDING,
    TASK_RUNNING, callback_state, job_code, job_status_from, parse_id, parse_options, raw,
    task_code, task_status_from,
};
use super::plan::{self, FairShare};
use super::{
    CallbackDue, CallbackInfo, CallbackOutcome, CallbackRecord, CancelOutcome, Claim, ClaimParams,
    ClaimedTask, DeleteOutcome, FailedTask, IdempotencyKey, InsertOutcome, JobFinished,
    JobListQuery, JobRecord, Millis, NodeId, Notice, Notices, OverdueParams, ReportOutcome,
    SettleOutcome, SettleReport, Store, StoreError, StoreResult, TaskPageQuery, TaskRecord,
    TaskReport, TaskSettle, now_millis, url_text,
};
use crate::job::{JobId, JobOptions, JobStatus, NewJob};

mod tx;

use tx::PgTx;

/// The one channel every node listens on and notifies.
const CHANNEL: &str = "doparallel";

/// Connections per node, besides the one that listens for notices.
const POOL_SIZE: u32 = 16;

/// How long a statement waits for a connection of the pool (opening one included) before
/// it fails as `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Tasks per INSERT when storing a job (two arrays of that many texts).
const INSERT_CHUNK: usize = 5000;

/// How soon a claim that found a job busy (another node was claiming or settling it at that
/// instant) asks to be tried again, rather than at the next idle poll.
const CONTENDED_RETRY_MS: Millis = 50;

/// How long what a statement found stands in for the query that its caller makes next: the
/// next callback due time [`Store::callbacks_due`] computes for [`Store::callback_next_due`]
/// (the delivery loop asks right after leasing), and whether [`Store::tasks_expire`] saw an
/// overdue awaited attempt, for [`Store::tasks_overdue`] (the lease sweep asks right after).
const HINT_FRESH: Duration = Duration::from_millis(500);

/// How many times in a row the notice stream tries to get its connection back before it
/// ends (backoff from 100 ms doubling to 5 s: about ten minutes).
const LISTEN_RETRIES: u32 = 120;

pub struct PostgresStore {
    pool: PgPool,
    /// For the listener's own connection.
    options: PgConnectOptions,
    /// Where the database is, for messages: host, port, database and user, no password.
    place: String,
    /// The next callback due time computed by the last `callbacks_due`, and when.
    callback_hint: Mutex<Option<(Instant, Option<Millis>)>>,
    /// Whether the last `tasks_expire` saw an awaited attempt past its deadline: when, for
    /// which `now`, and the answer.
    overdue_hint: Mutex<Option<(Instant, Millis, bool)>>,
}

impl PostgresStore {
    /// Connects to the database at a `postgres://` or `postgresql://` URL and brings its
    /// schema up to date. Several nodes may start at once: the migrations run under an
    /// advisory lock, one node at a time, and the others find them applied.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Other(format!("invalid PostgreSQL URL {}: {e}", redact(url))))?
            .application_name("doparallel");
        let place = describe(&options);
        // One connection first, so that a wrong or unreachable address fails at once (a
        // pool would keep trying until its acquire timeout); the migrations run on it, and
        // the advisory lock they hold goes with it.
        let mut first = PgConnection::connect_with(&options).await.map_err(|e| {
            StoreError::Unavailable(format!("cannot connect to PostgreSQL at {place}: {e}"))
        })?;
        sqlx::migrate!("migrations/postgres")
            .run(&mut first)
            .await
            .map_err(|e| StoreError::Other(format!("cannot migrate PostgreSQL at {place}: {e}")))?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            // Short, so that a request meets an unreachable database with a prompt 503 (and
            // Retry-After) rather than hanging while the pool tries to connect; the engine's
            // loops retry on their own.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to PostgreSQL at {place}: {e}"))
            })?;
        Ok(PostgresStore {
            pool,
            options,
            place,
            callback_hint: Mutex::new(None),
            overdue_hint: Mutex::new(None),
        })
    }

    async fn begin(&self) -> StoreResult<PgTx> {
        Ok(PgTx::new(self.pool.begin().await.map_err(map_err)?))
    }

    /// Forgets the callback hint: this node changed the outbox.
    fn callbacks_changed(&self) {
        *self.callback_hint.lock().expect("not poisoned") = None;
    }

    /// Settles a batch in one transaction: see [`Store::tasks_settle`]. Without `node`, an
    /// attempt is settled whichever node holds it (a report).
    async fn settle(
        &self,
        node: Option<NodeId>,
        batch: &[TaskSettle],
    ) -> StoreResult<SettleReport> {
        /// What a batch changes of one job.
        #[derive(Default)]
        struct Delta {
            settled: i64,
            complete: i64,
            failed: i64,
            now: Millis,
        }
        let mut report = SettleReport::default();
        if batch.is_empty() {
            return Ok(report);
        }
        let mut tx = self.begin().await?;

        // The batch's jobs, locked in seq order: a settle of the same job on another node
        // waits for this one, so counters, failure numbers and the finish are decided by one
        // node at a time. Jobs purged meanwhile are not found and their outcomes skipped.
        let mut ids: Vec<String> = batch.iter().map(|s| s.job_id.to_string()).collect();
        ids.sort();
        ids.dedup();
        let rows = sqlx::query(
            "SELECT seq, id::text AS id FROM jobs WHERE id = ANY($1::uuid[]) \
             ORDER BY seq FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(tx.conn().await?)
        .await
        .map_err(map_err)?;
        let mut seqs: HashMap<JobId, i64> = HashMap::with_capacity(rows.len());
        for row in &rows {
            seqs.insert(parse_id(row.get("id"))?, row.get("seq"));
        }

        // Failures are numbered per job after the highest number given so far (not after the
        // count: a stale failure may have taken a number it never stored).
        let mut failing: Vec<i64> = batch
            .iter()
            .filter(|s| matches!(s.outcome, SettleOutcome::Failed { .. }))
            .filter_map(|s| seqs.get(&s.job_id).copied())
            .collect();
        failing.sort_unstable();
        failing.dedup();
        let mut next_fail: HashMap<i64, i64> = HashMap::new();
        if !failing.is_empty() {
            let rows = sqlx::query(
                "SELECT f.seq, COALESCE((SELECT MAX(fail_seq) FROM tasks \
                     WHERE job_seq = f.seq AND fail_seq IS NOT NULL), 0) AS last \
                 FROM unnest($1::bigint[]) AS f(seq)",
            )
            .bind(&failing)
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
            for row in rows {
                next_fail.insert(row.get("seq"), row.get::<i64, _>("last") + 1);
            }
        }

        // The outcomes, as arrays, one statement for the whole batch.
        let n = batch.len();
        let mut job_seq = Vec::with_capacity(n);
        let mut idx = Vec::with_capacity(n);
        let mut attempt = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut run_at: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut result: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut error: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut latency = Vec::with_capacity(n);
        let mut finished_at: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut fail_seq: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut lease: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut deltas: HashMap<i64, Delta> = HashMap::new();
        for s in batch {
            let Some(&seq) = seqs.get(&s.job_id) else {
                continue;
            };
            let (code, due, res, err, deadline) = match &s.outcome {
                SettleOutcome::Complete { result } => {
                    (TASK_COMPLETE, None, Some(result.get()), None, None)
                }
                SettleOutcome::Failed { error } => {
                    (TASK_FAILED, None, None, Some(error.get()), None)
                }
                SettleOutcome::Retry { run_at, error } => {
                    (TASK_PENDING, Some(*run_at), None, Some(error.get()), None)
                }
                // Still running, held by nobody until its deadline.
                SettleOutcome::Await { deadline } => {
                    (TASK_RUNNING, None, None, None, Some(*deadline))
                }
            };
            let done = code == TASK_COMPLETE || code == TASK_FAILED;
            fail_seq.push((code == TASK_FAILED).then(|| {
                let next = next_fail.get_mut(&seq).expect("looked up above");
                *next += 1;
                *next - 1
            }));
            job_seq.push(seq);
            idx.push(s.index as i64);
            attempt.push(s.attempt as i32);
            status.push(code);
            run_at.push(due);
            result.push(res);
            error.push(err);
            latency.push(s.latency_ms as i64);
            finished_at.push(done.then_some(s.now));
            lease.push(deadline);
            let d = deltas.entry(seq).or_default();
            d.now = d.now.max(s.now);
        }
        let rows = sqlx::query(&SETTLE_TASKS_SQL)
            .bind(&job_seq)
            .bind(&idx)
            .bind(&attempt)
            .bind(&status)
            .bind(&run_at)
            .bind(&result)
            .bind(&error)
            .bind(&latency)
            .bind(&finished_at)
            .bind(&fail_seq)
            .bind(&lease)
            .bind(node.map(|n| n.0))
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        for row in rows {
            let d = deltas
                .get_mut(&row.get::<i64, _>("job_seq"))
                .expect("a job of this batch");
            let status: Code = row.get("status");
            if status == TASK_RUNNING {
                // Awaiting a report: still running, nothing counted yet.
                report.awaiting += 1;
                continue;
            }
            d.settled += 1;
            if status == TASK_COMPLETE {
                d.complete += 1;
                report.complete += 1;
            } else if status == TASK_FAILED {
                d.failed += 1;
                report.failed += 1;
            } else {
                report.retried += 1;
            }
        }

        // The jobs' counters; the rows that come back say which jobs this batch finished.
        let mut d_seq = Vec::new();
        let mut d_settled = Vec::new();
        let mut d_complete = Vec::new();
        let mut d_failed = Vec::new();
        for (seq, d) in deltas.iter().filter(|(_, d)| d.settled > 0) {
            d_seq.push(*seq);
            d_settled.push(d.settled);
            d_complete.push(d.complete);
            d_failed.push(d.failed);
        }
        let mut finish: (Vec<i64>, Vec<Code>, Vec<Millis>) = Default::default();
        let mut callbacks: (Vec<i64>, Vec<Millis>) = Default::default();
        if !d_seq.is_empty() {
            let rows = sqlx::query(SETTLE_JOBS_SQL)
                .bind(&d_seq)
                .bind(&d_settled)
                .bind(&d_complete)
                .bind(&d_failed)
                .fetch_all(tx.conn().await?)
                .await
                .map_err(map_err)?;
            for row in rows {
                let status = job_status_from(row.get("status"))?;
                let total: i64 = row.get("total");
                let n_failed: i64 = row.get("n_failed");
                let done: i64 = row.get::<i64, _>("n_complete") + n_failed;
                if status.is_finished() || done < total {
                    continue;
                }
                // This batch settled the job's last task: its final status and its callback
                // record are written in the same transaction, which holds the job's row since
                // it began, so the job is finished once and the callback owed exactly then.
                let seq: i64 = row.get("seq");
                let now = deltas[&seq].now;
                let tolerated: i64 = row.get("tolerated");
                let final_status =
                    plan::final_status(n_failed.max(0) as u64, tolerated.max(0) as u64);
                finish.0.push(seq);
                finish.1.push(job_code(final_status));
                finish.2.push(now);
                let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
                if has_callback {
                    callbacks.0.push(seq);
                    callbacks.1.push(now);
                }
                report.finished.push(JobFinished {
                    job_id: parse_id(row.get("id"))?,
                    status: final_status,
                    has_callback,
                });
            }
        }
        if !finish.0.is_empty() {
            sqlx::query(FINISH_JOBS_SQL)
                .bind(&finish.0)
                .bind(&finish.1)
                .bind(&finish.2)
                .execute(tx.conn().await?)
                .await
                .map_err(map_err)?;
        }
        if !callbacks.0.is_empty() {
            insert_callbacks(&mut tx, &callbacks.0, &callbacks.1).await?;
        }
        // A pause for the test that cuts this transaction's connection before its COMMIT.
        crate::pause_point("settle-before-commit").await;
        tx.commit().await?;
        if !callbacks.0.is_empty() {
            self.callbacks_changed();
        }
        Ok(report)
    }
}

/// `host:port/database as user`, for messages.
fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{} as user {}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username()),
        options.get_username()
    )
}

/// The URL with its password hidden, or a placeholder when it does not even parse.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(unparsable)".to_string(),
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Classes that pass: 08 connection exceptions, 53 insufficient resources (53100
            // disk full, 53300 too many connections), 57P administrator action or crash
            // shutdown, 57014 a statement cancelled (a timeout), 40 serialization failure
            // and deadlock, 58030 I/O error.
            if code == "53100" {
                StoreError::full(db)
            } else if code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "57014"
                || code.starts_with("40")
                || code == "58030"
            {
                StoreError::Unavailable(format!("{db} (SQLSTATE {code})"))
            } else {
                StoreError::Other(format!("{db} (SQLSTATE {code})"))
            }
        }
        _ => StoreError::Other(e.to_string()),
    }
}

const NOTICE_WORK: &str = "work";
const NOTICE_CALLBACK: &str = "callback";
const NOTICE_CANCEL: &str = "cancel:";

fn parse_notice(payload: &str) -> Option<Notice> {
    match payload {
        NOTICE_WORK => Some(Notice::Work),
        NOTICE_CALLBACK => Some(Notice::CallbackDue),
        other => other
            .strip_prefix(NOTICE_CANCEL)
            .and_then(|id| id.parse().ok())
            .map(Notice::Cancelled),
    }
}

/// Sends a notice to every node (this one included) when the transaction commits.
async fn notify(tx: &mut PgTx, payload: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    Ok(())
}

const JOB_COLUMNS: &str = "j.id::text AS id, j.owner, j.status, j.options, j.total, j.n_running, \
     j.n_complete, j.n_failed, j.n_cancelled, j.created_at, j.finished_at, j.callback_url, \
     c.state, c.attempts, c.last_error";

fn job_from_row(row: &PgRow) -> StoreResult<JobRecord> {
    let status = job_status_from(row.get("status"))?;
    let callback_url: Option<String> = row.get("callback_url");
    let state = callback_state(callback_url.is_some(), row.get("state"));
    Ok(JobRecord {
        id: parse_id(row.get("id"))?,
        owner: row.get("owner"),
        status,
        options: parse_options(row.get("options"))?,
        total: row.get::<i64, _>("total") as u64,
        running: row.get::<i64, _>("n_running") as u64,
        complete: row.get::<i64, _>("n_complete") as u64,
        failed: row.get::<i64, _>("n_failed") as u64,
        cancelled: row.get::<i64, _>("n_cancelled") as u64,
        created_at: row.get("created_at"),
        finished_at: row.get("finished_at"),
        callback_url,
        callback: CallbackInfo {
            state,
            attempts: row.get::<Option<i32>, _>("attempts").unwrap_or(0) as u32,
            last_error: row.get("last_error"),
        },
    })
}

const TASK_COLUMNS: &str = "t.idx, t.status, t.attempts, t.endpoint, t.result, t.error, \
     t.latency_ms, t.finished_at";

fn task_from_row(row: &PgRow) -> StoreResult<TaskRecord> {
    Ok(TaskRecord {
        index: row.get::<i64, _>("idx") as u64,
        status: task_status_from(row.get("status"))?,
        attempts: row.get::<i32, _>("attempts") as u32,
        endpoint: row.get("endpoint"),
        result: raw(row.get("result"))?,
        error: raw(row.get("error"))?,
        latency_ms: row.get::<Option<i64>, _>("latency_ms").map(|v| v as u64),
        finished_at: row.get("finished_at"),
    })
}

/// The jobs a claim may serve: unfinished, with tasks not yet running or done, and room
/// under their concurrency.
fn claimable() -> String {
    format!(
        "status IN ({JOB_PENDING}, {JOB_RUNNING}) AND total > n_running + n_complete + n_failed \
         AND (concurrency IS NULL OR n_running < concurrency)"
    )
}

/// Up to `$2` claimable jobs, least recently served first, but for the jobs `$1` and those
/// of the owners `$3`.
static WINDOW_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT seq FROM jobs WHERE {} AND id <> ALL($1::uuid[]) \
           AND (owner IS NULL OR owner <> ALL($3::text[])) \
         ORDER BY last_claim_at, seq LIMIT $2",
        claimable()
    )
});

/// Locks the jobs `$1` that are still claimable, skipping those another transaction holds.
static LOCK_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT seq, id::text AS id, owner, options, concurrency, n_running FROM jobs \
         WHERE seq = ANY($1) AND {} \
         ORDER BY last_claim_at, seq FOR UPDATE SKIP LOCKED",
        claimable()
    )
});

/// Takes up to `n` due tasks of each job (`$1`, `$2`) at `$3`, leased to node `$4` until
/// `$5`. Each job's pick walks its part of the `tasks_due` index; tasks another transaction
/// holds are skipped.
static CLAIM_TASKS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH w AS (SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS w(job_seq, n)), \
         picked AS (SELECT p.job_seq, p.idx FROM w CROSS JOIN LATERAL (\
             SELECT t.job_seq, t.idx FROM tasks t \
             WHERE t.job_seq = w.job_seq AND t.status = {TASK_PENDING} AND t.run_at <= $3 \
             ORDER BY t.run_at, t.idx LIMIT w.n FOR UPDATE SKIP LOCKED) p) \
         UPDATE tasks SET status = {TASK_RUNNING}, attempts = tasks.attempts + 1, node = $4, \
             lease_until = $5 \
         FROM picked WHERE tasks.job_seq = picked.job_seq AND tasks.idx = picked.idx \
         RETURNING tasks.job_seq, tasks.idx, tasks.attempts, tasks.endpoint, tasks.params"
    )
});
/// Adds to the served jobs' (`$2`) running counts how many tasks each got (`$3`), a job
/// that got some now Running, and moves them to the back of the round robin (`$1` now).
static SERVED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE jobs SET n_running = n_running + c.n, \
         status = CASE WHEN c.n > 0 THEN {JOB_RUNNING} ELSE status END, last_claim_at = $1 \
         FROM unnest($2::bigint[], $3::bigint[]) AS c(seq, n) WHERE jobs.seq = c.seq"
    )
});

/// When the first pending task of the jobs `$1` is due.
static FIRST_DUE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT MIN(t.run_at) FROM unnest($1::bigint[]) AS e(seq) CROSS JOIN LATERAL \
         (SELECT run_at FROM tasks WHERE job_seq = e.seq AND status = {TASK_PENDING} \
          ORDER BY run_at LIMIT 1) t"
    )
});

/// Records outcomes given as arrays, one element per outcome; `$12` is the settling node.
/// Only the attempt that is running matches, and with a node only under that node's lease
/// (a report, without one, settles the attempt whichever node holds it). An awaited
/// attempt stays running, held by no node, `lease_until` its deadline.
static SETTLE_TASKS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE tasks t SET status = v.status, \
         run_at = COALESCE(v.run_at, t.run_at), result = v.result, error = v.error, \
         latency_ms = v.latency_ms, finished_at = v.finished_at, fail_seq = v.fail_seq, \
         node = NULL, lease_until = v.lease \
         FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::smallint[], $5::bigint[], \
                     $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[]) \
              AS v(job_seq, idx, attempt, status, run_at, result, error, latency_ms, finished_at, \
                   fail_seq, lease) \
         WHERE t.job_seq = v.job_seq AND t.idx = v.idx AND t.status = {TASK_RUNNING} \
           AND t.attempts = v.attempt AND ($12::bigint IS NULL OR t.node = $12) \
         RETURNING t.job_seq, t.status"
    )
});

/// Adds a settle batch to its jobs' counters, and returns what says whether it finished
/// them: the counters, and the status, which this statement leaves as it was.
const SETTLE_JOBS_SQL: &str = "UPDATE jobs j SET n_running = j.n_running - d.settled, \
     n_complete = j.n_complete + d.complete, n_failed = j.n_failed + d.failed \
     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) \
          AS d(seq, settled, complete, failed) \
     WHERE j.seq = d.seq \
     RETURNING j.seq, j.id::text AS id, j.status, j.total, j.n_complete, j.n_failed, \
         j.tolerated, j.callback_url";

/// Writes the final status and finish time of the jobs whose last task the batch settled.
const FINISH_JOBS_SQL: &str = "UPDATE jobs j SET status = f.status, finished_at = f.at \
     FROM unnest($1::bigint[], $2::smallint[], $3::bigint[]) AS f(seq, status, at) \
     WHERE j.seq = f.seq";

/// Leases the due callback deliveries (`$1` now, `$2` lease end, `$3` how many), skipping
/// those another node is leasing, and in the same statement computes when the next one not
/// leased here is due (the last row, with only `next_due`).
static CALLBACKS_DUE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH due AS (\
             SELECT job_seq FROM callbacks WHERE state = {CALLBACK_PENDING} AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
         leased AS (\
             UPDATE callbacks c SET next_attempt_at = $2 FROM due WHERE c.job_seq = due.job_seq \
             RETURNING c.job_seq, c.attempts) \
         SELECT j.id::text AS id, j.callback_url, l.attempts, NULL::bigint AS next_due \
             FROM leased l JOIN jobs j ON j.seq = l.job_seq \
         UNION ALL \
         SELECT NULL, NULL, NULL, (SELECT MIN(next_attempt_at) FROM callbacks \
             WHERE state = {CALLBACK_PENDING} AND job_seq NOT IN (SELECT job_seq FROM leased))"
    )
});

/// Leases awaited attempts (running, held by no node) whose deadline `$3` passed to node
/// `$1` until `$2`, at most `$4`, skipping those another node is taking right now.
static OVERDUE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE tasks SET node = $1, lease_until = $2 \
         FROM (SELECT job_seq, idx FROM tasks \
               WHERE status = {TASK_RUNNING} AND node IS NULL AND lease_until <= $3 \
               LIMIT $4 FOR UPDATE SKIP LOCKED) o, jobs j \
         WHERE tasks.job_seq = o.job_seq AND tasks.idx = o.idx AND j.seq = tasks.job_seq \
         RETURNING j.id::text AS id, j.options, j.owner, tasks.idx, tasks.attempts, \
             tasks.endpoint, tasks.params"
    )
});

/// Extends to `$1` the leases of node `$2`'s running tasks that no transaction holds.
static RENEW: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE tasks SET lease_until = $1 FROM (\
             SELECT job_seq, idx FROM tasks WHERE status = {TASK_RUNNING} AND node = $2 \
             FOR UPDATE SKIP LOCKED) r \
         WHERE tasks.job_seq = r.job_seq AND tasks.idx = r.idx"
    )
});

/// The jobs with a running task whose lease or deadline is `$1` or earlier: whether one of
/// its leases ran out (a node's), and whether one of its awaited attempts is overdue.
static LEASES_OUT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT job_seq, bool_or(node IS NOT NULL AND lease_until < $1) AS expired, \
             bool_or(node IS NULL) AS overdue \
         FROM tasks WHERE status = {TASK_RUNNING} AND lease_until <= $1 GROUP BY job_seq"
    )
});

/// Puts the tasks of jobs `$1` whose node's lease ran out before `$2` back to pending, their
/// interrupted attempt not counted, and takes them off their jobs' running counts; a row
/// per job changed, with how many.
static TAKE_BACK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH t AS (\
             UPDATE tasks SET status = {TASK_PENDING}, attempts = attempts - 1, node = NULL, \
             lease_until = NULL \
             WHERE job_seq = ANY($1) AND status = {TASK_RUNNING} AND node IS NOT NULL \
               AND lease_until < $2 \
             RETURNING job_seq), \
         c AS (SELECT job_seq, count(*) AS n FROM t GROUP BY job_seq) \
         UPDATE jobs SET n_running = n_running - c.n FROM c WHERE jobs.seq = c.job_seq \
         RETURNING c.n"
    )
});

async fn insert_callbacks(tx: &mut PgTx, seqs: &[i64], at: &[Millis]) -> StoreResult<()> {
    static INSERT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO callbacks (job_seq, state, next_attempt_at) \
             SELECT seq, {CALLBACK_PENDING}, at FROM unnest($1::bigint[], $2::bigint[]) AS c(seq, at)"
        )
    });
    sqlx::query(&INSERT)
        .bind(seqs)
        .bind(at)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    notify(tx, NOTICE_CALLBACK).await
}

#[async_trait]
impl Store for PostgresStore {
    async fn job_insert(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
        now: Millis,
    ) -> StoreResult<InsertOutcome> {
        let options =
            serde_json::to_string(&job.options).map_err(|e| StoreError::Other(e.to_string()))?;
        let empty = job.tasks.is_empty();
        let status = if empty {
            JobStatus::Complete
        } else {
            JobStatus::Pending
        };
        let callback_url = url_text(&job.callback);

        let mut tx = self.begin().await?;
        // A key used before, even by a request committing at this very moment (the insert
        // waits for it), inserts nothing.
        let seq: Option<i64> = sqlx::query_scalar(
            "INSERT INTO jobs (id, status, options, concurrency, tolerated, total, callback_url, \
             created_at, finished_at, idempotency_key, request_hash, owner) \
             VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT ((COALESCE(owner, '')), idempotency_key) \
                 WHERE idempotency_key IS NOT NULL DO NOTHING \
             RETURNING seq",
        )
        .bind(job.id.to_string())
        .bind(job_code(status))
        .bind(options)
        .bind(job.options.concurrency.map(i64::from))
        .bind(job.options.tolerated_failures as i64)
        .bind(job.tasks.len() as i64)
        .bind(&callback_url)
        .bind(now)
        .bind(empty.then_some(now))
        .bind(idempotency.map(|i| i.key.as_str()))
        .bind(idempotency.map(|i| i.request_hash.as_str()))
        .bind(job.owner.as_deref())
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(map_err)?;
        let Some(seq) = seq else {
            tx.rollback().await?;
            let idem = idempotency.expect("only an idempotency key can conflict");
            let row = sqlx::query(
                "SELECT id::text AS id, request_hash FROM jobs \
                 WHERE COALESCE(owner, '') = COALESCE($2, '') AND idempotency_key = $1",
            )
            .bind(&idem.key)
            .bind(job.owner.as_deref())
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
            let hash: Option<String> = row.get("request_hash");
            return Ok(InsertOutcome::Existing {
                job_id: parse_id(row.get("id"))?,
                same_request: hash.as_deref() == Some(idem.request_hash.as_str()),
            });
        };

        let mut offset: i64 = 0;
        for chunk in job.tasks.chunks(INSERT_CHUNK) {
            let endpoints: Vec<&str> = chunk.iter().map(|t| t.endpoint.as_str()).collect();
            let params: Vec<&str> = chunk.iter().map(|t| t.params.get()).collect();
            sqlx::query(
                "INSERT INTO tasks (job_seq, idx, run_at, endpoint, params) \
                 SELECT $1, $2 + u.ord, $3, u.endpoint, u.params \
                 FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS u(endpoint, params, ord)",
            )
            .bind(seq)
            .bind(offset)
            .bind(now)
            .bind(&endpoints)
            .bind(&params)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?;
            offset += chunk.len() as i64;
        }

        let callback_due = empty && callback_url.is_some();
        if callback_due {
            insert_callbacks(&mut tx, &[seq], &[now]).await?;
        }
        if !empty {
            notify(&mut tx, NOTICE_WORK).await?;
        }
        tx.commit().await?;
        if callback_due {
            self.callbacks_changed();
        }
        Ok(InsertOutcome::Inserted)
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
             WHERE j.id = $1::uuid"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn job_list(&self, query: &JobListQuery) -> StoreResult<Vec<JobRecord>> {
        // Jobs are numbered in creation order, so "newest first, before X" is by seq.
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
             WHERE ($1::smallint IS NULL OR j.status = $1) \
               AND ($2::text IS NULL OR j.seq < (SELECT seq FROM jobs WHERE id = $2::uuid)) \
               AND ($4::text IS NULL OR j.owner = $4) \
             ORDER BY j.seq DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(query.status.map(job_code))
            .bind(query.before.map(|id| id.to_string()))
            .bind(i64::from(query.limit))
            .bind(query.owner.as_deref())
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(job_from_row).collect()
    }

    async fn tasks_page(&self, id: JobId, query: &TaskPageQuery) -> StoreResult<Vec<TaskRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t \
             WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = $1::uuid) \
             AND t.idx > $2 AND ($3::smallint IS NULL OR t.status = $3) ORDER BY t.idx LIMIT $4"
        ))
        .bind(id.to_string())
        .bind(query.after as i64)
        .bind(query.status.map(task_code))
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(task_from_row).collect()
    }

    async fn tasks_failed_since(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<FailedTask>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS}, t.fail_seq FROM tasks t \
             WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = $1::uuid) AND t.fail_seq > $2 \
             ORDER BY t.fail_seq LIMIT $3"
        ))
        .bind(id.to_string())
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                Ok(FailedTask {
                    fail_seq: row.get::<i64, _>("fail_seq") as u64,
                    task: task_from_row(row)?,
                })
            })
            .collect()
    }

    async fn job_cancel(&self, id: JobId, now: Millis) -> StoreResult<CancelOutcome> {
        let mut tx = self.begin().await?;
        // The job row's lock waits for a claim or settle of this job under way, and keeps
        // later ones off until the cancel is committed.
        let Some(row) = sqlx::query(
            "SELECT seq, status, callback_url FROM jobs WHERE id = $1::uuid FOR UPDATE",
        )
        .bind(id.to_string())
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(map_err)?
        else {
            tx.rollback().await?;
            return Ok(CancelOutcome::NotFound);
        };
        let seq: i64 = row.get("seq");
        let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
        let unchanged = match job_status_from(row.get("status"))? {
            JobStatus::Cancelled => Some(CancelOutcome::Cancelled {
                has_callback,
                newly: false,
                tasks: 0,
            }),
            done if done.is_finished() => Some(CancelOutcome::AlreadyFinished(done)),
            _ => None,
        };
        if let Some(outcome) = unchanged {
            // At once, not when the dropped transaction is rolled back later: the row lock
            // would keep claims off meanwhile.
            tx.rollback().await?;
            return Ok(outcome);
        }
        static CANCEL_TASKS: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE tasks SET status = {TASK_CANCELLED}, finished_at = $1, node = NULL, \
                 lease_until = NULL WHERE job_seq = $2 AND status IN ({TASK_PENDING}, {TASK_RUNNING})"
            )
        });
        static CANCEL_JOB: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE jobs SET status = {JOB_CANCELLED}, n_running = 0, \
                 n_cancelled = n_cancelled + $1, finished_at = $2 WHERE seq = $3"
            )
        });
        let cancelled = sqlx::query(&CANCEL_TASKS)
            .bind(now)
            .bind(seq)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?
            .rows_affected();
        sqlx::query(&CANCEL_JOB)
            .bind(cancelled as i64)
            .bind(now)
            .bind(seq)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?;
        if has_callback {
            insert_callbacks(&mut tx, &[seq], &[now]).await?;
        }
        // Every node aborts its calls of this job.
        notify(&mut tx, &format!("{NOTICE_CANCEL}{id}")).await?;
        tx.commit().await?;
        if has_callback {
            self.callbacks_changed();
        }
        Ok(CancelOutcome::Cancelled {
            has_callback,
            newly: true,
            tasks: cancelled,
        })
    }

    async fn job_delete(&self, id: JobId) -> StoreResult<DeleteOutcome> {
        let mut tx = self.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT j.seq, j.status, c.state FROM jobs j \
             LEFT JOIN callbacks c ON c.job_seq = j.seq WHERE j.id = $1::uuid FOR UPDATE OF j",
        )
        .bind(id.to_string())
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(map_err)?
        else {
            tx.rollback().await?;
            return Ok(DeleteOutcome::NotFound);
        };
        let refused = if !job_status_from(row.get("status"))?.is_finished() {
            Some(DeleteOutcome::NotFinished)
        } else if row.get::<Option<Code>, _>("state") == Some(CALLBACK_PENDING) {
            Some(DeleteOutcome::CallbackPending)
        } else {
            None
        };
        if let Some(outcome) = refused {
            // Releases the row lock at once (see `job_cancel`).
            tx.rollback().await?;
            return Ok(outcome);
        }
        // Its tasks and callback record go with it (ON DELETE CASCADE).
        sqlx::query("DELETE FROM jobs WHERE seq = $1")
            .bind(row.get::<i64, _>("seq"))
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted)
    }

    async fn jobs_purge(&self, finished_before: Millis, limit: u32) -> StoreResult<u64> {
        static PURGE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "DELETE FROM jobs WHERE seq IN (\
                     SELECT j.seq FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
                     WHERE j.finished_at < $1 \
                       AND j.status IN ({JOB_COMPLETE}, {JOB_FAILED}, {JOB_CANCELLED}) \
                       AND (c.state IS NULL OR c.state != {CALLBACK_PENDING}) \
                     ORDER BY j.finished_at LIMIT $2 FOR UPDATE OF j SKIP LOCKED)"
            )
        });
        // One statement; jobs another transaction holds are left for the next round.
        let mut tx = self.begin().await?;
        let purged = sqlx::query(&PURGE)
            .bind(finished_before)
            .bind(i64::from(limit))
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?
            .rows_affected();
        tx.commit().await?;
        Ok(purged)
    }

    async fn queue_depth(&self) -> StoreResult<u64> {
        static DEPTH: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT COALESCE(SUM(total - n_running - n_complete - n_failed - n_cancelled), 0)::bigint \
                 FROM jobs WHERE status IN ({JOB_PENDING}, {JOB_RUNNING})"
            )
        });
        let depth: i64 = sqlx::query_scalar(&DEPTH)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(depth.max(0) as u64)
    }

    async fn tasks_claim(&self, params: &ClaimParams) -> StoreResult<Claim> {
        let mut claim = Claim::default();
        if params.limit == 0 {
            return Ok(claim);
        }
        let skip: Vec<String> = params.skip_jobs.iter().map(|id| id.to_string()).collect();
        let full_owners = params.owners.full();
        // Unfinished jobs with pending tasks and room under their concurrency, least
        // recently served first, but for the jobs the claim leaves out and those of owners
        // with no room left; read without a lock and outside a transaction: on an idle
        // cluster this is the only statement. No more than twice the free slots can be
        // served, since each gets at least one.
        let window: Vec<i64> = sqlx::query_scalar(&WINDOW_SQL)
            .bind(&skip)
            .bind(i64::from(params.limit) * 2 + 8)
            .bind(&full_owners)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        if window.is_empty() {
            return Ok(claim);
        }

        let mut tx = self.begin().await?;
        // Lock them, skipping those another node is claiming or settling right now, and
        // check again under the lock (another node may have filled a job's concurrency).
        let jobs = sqlx::query(&LOCK_SQL)
            .bind(&window)
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        let contended = jobs.len() < window.len();

        struct Candidate {
            seq: i64,
            id: JobId,
            owner: Option<Arc<str>>,
            options_text: String,
            /// Parsed once, for the jobs this claim serves.
            options: Option<Arc<JobOptions>>,
            headroom: u64,
        }
        let mut candidates = Vec::with_capacity(jobs.len());
        for row in &jobs {
            let concurrency: Option<i64> = row.get("concurrency");
            let running: i64 = row.get("n_running");
            let options_text: String = row.get("options");
            // A job limiting its calls per host gives one claim what its gates start soon.
            let options = if plan::may_limit_hosts(&options_text) {
                Some(Arc::new(parse_options(&options_text)?))
            } else {
                None
            };
            let cap = options.as_deref().map_or(u64::MAX, plan::claim_cap);
            candidates.push(Candidate {
                seq: row.get("seq"),
                id: parse_id(row.get("id"))?,
                owner: row.get::<Option<String>, _>("owner").map(Arc::from),
                options_text,
                options,
                headroom: concurrency
                    .map_or(u64::MAX, |c| (c - running).max(0) as u64)
                    .min(cap),
            });
        }
        let by_seq: HashMap<i64, usize> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (c.seq, i))
            .collect();

        // The plan says how many tasks each job gives in each round (see `plan`); a round is
        // one statement whatever the number of jobs.
        let mut plan = FairShare::new(
            u64::from(params.limit),
            candidates.iter().map(|c| (c.owner.as_deref(), c.headroom)),
            &params.owners,
        );
        loop {
            let wants = plan.round();
            if wants.is_empty() {
                break;
            }
            let seqs: Vec<i64> = wants.iter().map(|&(i, _)| candidates[i].seq).collect();
            let ns: Vec<i64> = wants.iter().map(|&(_, n)| n as i64).collect();
            let rows = sqlx::query(&CLAIM_TASKS_SQL)
                .bind(&seqs)
                .bind(&ns)
                .bind(params.now)
                .bind(params.node.0)
                .bind(params.lease_until)
                .fetch_all(tx.conn().await?)
                .await
                .map_err(map_err)?;
            let mut got: HashMap<usize, u64> = HashMap::with_capacity(wants.len());
            for row in rows {
                let i = by_seq[&row.get::<i64, _>("job_seq")];
                *got.entry(i).or_default() += 1;
                let c = &mut candidates[i];
                let options = match &c.options {
                    Some(options) => options.clone(),
                    None => {
                        let options = Arc::new(parse_options(&c.options_text)?);
                        c.options = Some(options.clone());
                        options
                    }
                };
                claim.tasks.push(ClaimedTask {
                    job_id: c.id,
                    index: row.get::<i64, _>("idx") as u64,
                    attempt: row.get::<i32, _>("attempts") as u32,
                    endpoint: row.get("endpoint"),
                    params: raw(Some(row.get("params")))?.expect("some"),
                    options,
                    owner: c.owner.clone(),
                });
            }
            for (i, want) in wants {
                plan.got(i, want, got.get(&i).copied().unwrap_or(0));
            }
        }
        // Each job's tasks together, in order (the engine looks its cancel token up once
        // per job).
        claim.tasks.sort_by_key(|t| (t.job_id, t.index));

        // The jobs served move to the back of the round robin; so does a job found with
        // nothing due (its tasks all in backoff), so that it cannot starve the jobs behind it.
        let (served, counts): (Vec<i64>, Vec<i64>) = (0..candidates.len())
            .filter(|&i| plan.claimed(i) > 0 || plan.exhausted(i))
            .map(|i| (candidates[i].seq, plan.claimed(i) as i64))
            .unzip();
        if !served.is_empty() {
            sqlx::query(&SERVED_SQL)
                .bind(params.now)
                .bind(&served)
                .bind(&counts)
                .execute(tx.conn().await?)
                .await
                .map_err(map_err)?;
        }
        // Whatever is left of the exhausted jobs waits in backoff: when is the first due?
        let exhausted: Vec<i64> = (0..candidates.len())
            .filter(|&i| plan.exhausted(i))
            .map(|i| candidates[i].seq)
            .collect();
        if !exhausted.is_empty() {
            let due: Option<i64> = sqlx::query_scalar(&FIRST_DUE_SQL)
                .bind(&exhausted)
                .fetch_one(tx.conn().await?)
                .await
                .map_err(map_err)?;
            claim.next_due = due;
        }
        tx.commit().await?;
        if contended && claim.tasks.len() < params.limit as usize {
            // A job was busy on another node at that instant: look again soon rather than
            // at the next idle poll.
            let soon = params.now + CONTENDED_RETRY_MS;
            claim.next_due = Some(claim.next_due.map_or(soon, |d| d.min(soon)));
        }
        Ok(claim)
    }

    async fn tasks_settle(&self, node: NodeId, batch: &[TaskSettle]) -> StoreResult<SettleReport> {
        self.settle(Some(node), batch).await
    }

    async fn tasks_report(&self, report: &TaskReport) -> StoreResult<ReportOutcome> {
        let settle = TaskSettle {
            job_id: report.job_id,
            index: report.index,
            attempt: report.attempt,
            latency_ms: 0,
            now: report.now,
            outcome: report.outcome.clone(),
        };
        let applied = self.settle(None, std::slice::from_ref(&settle)).await?;
        if applied.complete + applied.failed > 0 {
            return Ok(ReportOutcome::Applied(applied));
        }
        static DONE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT 1 FROM tasks t JOIN jobs j ON j.seq = t.job_seq \
                 WHERE j.id = $1::uuid AND t.idx = $2 AND t.attempts = $3 \
                   AND t.status IN ({TASK_COMPLETE}, {TASK_FAILED})"
            )
        });
        // Not applied: was this attempt's outcome stored already?
        let done: Option<i32> = sqlx::query_scalar(&DONE)
            .bind(report.job_id.to_string())
            .bind(report.index as i64)
            .bind(report.attempt as i32)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(if done.is_some() {
            ReportOutcome::AlreadyReported
        } else {
            ReportOutcome::Unknown
        })
    }

    async fn tasks_overdue(&self, params: &OverdueParams) -> StoreResult<Vec<ClaimedTask>> {
        // Right after `tasks_expire` (what the lease sweep does), its statement already
        // said whether anything is overdue; a deadline only passes later.
        let hint = self.overdue_hint.lock().expect("not poisoned").take();
        if let Some((at, checked, false)) = hint
            && at.elapsed() < HINT_FRESH
            && params.now <= checked
        {
            return Ok(Vec::new());
        }
        // Awaited attempts (running, held by no node) past their deadline, leased to this
        // node like a claim; those another node is taking right now are skipped.
        let rows = sqlx::query(&OVERDUE)
            .bind(params.node.0)
            .bind(params.lease_until)
            .bind(params.now)
            .bind(i64::from(params.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        type JobOf = (JobId, Arc<JobOptions>, Option<Arc<str>>);
        let mut jobs: HashMap<String, JobOf> = HashMap::new();
        let mut tasks = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get("id");
            if !jobs.contains_key(&id) {
                let parsed = (
                    parse_id(&id)?,
                    Arc::new(parse_options(row.get("options"))?),
                    row.get::<Option<String>, _>("owner").map(Arc::from),
                );
                jobs.insert(id.clone(), parsed);
            }
            let (job_id, options, owner) = &jobs[&id];
            tasks.push(ClaimedTask {
                job_id: *job_id,
                index: row.get::<i64, _>("idx") as u64,
                attempt: row.get::<i32, _>("attempts") as u32,
                endpoint: row.get("endpoint"),
                params: raw(Some(row.get("params")))?.expect("some"),
                options: options.clone(),
                owner: owner.clone(),
            });
        }
        tasks.sort_by_key(|t| (t.job_id, t.index));
        Ok(tasks)
    }

    async fn task_token_key(&self) -> StoreResult<Vec<u8>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE name = 'task_token_key'")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn tasks_renew(&self, node: NodeId, until: Millis) -> StoreResult<u64> {
        // Tasks locked by a transaction under way (this node's own settle, a cancel) are
        // finishing anyway: skipped rather than waited for.
        let mut tx = self.begin().await?;
        let renewed = sqlx::query(&RENEW)
            .bind(until)
            .bind(node.0)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?
            .rows_affected();
        tx.commit().await?;
        Ok(renewed)
    }

    async fn tasks_expire(&self, now: Millis) -> StoreResult<u64> {
        // Which jobs have a lease that ran out, and whether an awaited attempt is past its
        // deadline (the sweep asks `tasks_overdue` next): one statement, all an idle sweep
        // costs.
        let rows = sqlx::query(&LEASES_OUT)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let mut seqs = Vec::with_capacity(rows.len());
        let mut overdue = false;
        for row in &rows {
            if row.get::<bool, _>("expired") {
                seqs.push(row.get::<i64, _>("job_seq"));
            }
            overdue |= row.get::<bool, _>("overdue");
        }
        *self.overdue_hint.lock().expect("not poisoned") = Some((Instant::now(), now, overdue));
        if seqs.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        // Job rows first, in seq order, as a settle takes them; the tasks are checked again
        // under those locks (a settle may have just finished them).
        sqlx::query("SELECT seq FROM jobs WHERE seq = ANY($1) ORDER BY seq FOR UPDATE")
            .bind(&seqs)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?;
        let counts: Vec<i64> = sqlx::query_scalar(&TAKE_BACK)
            .bind(&seqs)
            .bind(now)
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        let expired: i64 = counts.iter().sum();
        if expired > 0 {
            notify(&mut tx, NOTICE_WORK).await?;
        }
        tx.commit().await?;
        Ok(expired as u64)
    }

    async fn tasks_recover(&self) -> StoreResult<u64> {
        // Other nodes may be alive and their calls under way: only what has expired.
        self.tasks_expire(now_millis()).await
    }

    async fn callbacks_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<CallbackDue>> {
        let rows = sqlx::query(&CALLBACKS_DUE_SQL)
            .bind(now)
            .bind(lease_until)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let mut due = Vec::with_capacity(rows.len());
        let mut next_due: Option<Millis> = None;
        for row in rows {
            match row.get::<Option<String>, _>("id") {
                Some(id) => due.push(CallbackDue {
                    job_id: parse_id(&id)?,
                    url: row.get("callback_url"),
                    attempts: row.get::<i32, _>("attempts") as u32,
                }),
                None => next_due = row.get("next_due"),
            }
        }
        // What `callback_next_due` would answer now: the leased ones are due again when
        // their lease ends.
        if !due.is_empty() {
            next_due = Some(next_due.map_or(lease_until, |d| d.min(lease_until)));
        }
        *self.callback_hint.lock().expect("not poisoned") = Some((Instant::now(), next_due));
        Ok(due)
    }

    async fn callback_next_due(&self) -> StoreResult<Option<Millis>> {
        // Right after `callbacks_due` (what the delivery loop does), its statement already
        // answered; another node's new callback comes with a notice that makes the loop
        // lease again first.
        let hint = self.callback_hint.lock().expect("not poisoned").take();
        if let Some((at, next_due)) = hint
            && at.elapsed() < HINT_FRESH
        {
            return Ok(next_due);
        }
        static NEXT_DUE: LazyLock<String> = LazyLock::new(|| {
            format!("SELECT MIN(next_attempt_at) FROM callbacks WHERE state = {CALLBACK_PENDING}")
        });
        sqlx::query_scalar(&NEXT_DUE)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn callback_record(&self, record: &CallbackRecord) -> StoreResult<bool> {
        static RECORD: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE callbacks SET state = $1, attempts = $2, next_attempt_at = $3, \
                 last_error = COALESCE($4, last_error), delivered_at = $5 \
                 WHERE job_seq = (SELECT seq FROM jobs WHERE id = $6::uuid) \
                   AND state = {CALLBACK_PENDING} AND attempts = $7"
            )
        });
        let (state, next, error, delivered) = match &record.outcome {
            CallbackOutcome::Delivered => (CALLBACK_DELIVERED, None, None, Some(record.now)),
            CallbackOutcome::Retry { at, error } => {
                (CALLBACK_PENDING, Some(*at), Some(error.as_str()), None)
            }
            CallbackOutcome::GaveUp { error } => {
                (CALLBACK_FAILED, None, Some(error.as_str()), None)
            }
        };
        let mut tx = self.begin().await?;
        let done = sqlx::query(&RECORD)
            .bind(state)
            .bind(record.attempts as i32)
            .bind(next)
            .bind(error)
            .bind(delivered)
            .bind(record.job_id.to_string())
            .bind(record.attempts as i32 - 1)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        self.callbacks_changed();
        Ok(done.rows_affected() == 1)
    }

    async fn listen(&self) -> StoreResult<Option<Notices>> {
        // Connections of its own, kept open (no lifetime or idle limit). Two, so that a new
        // listener can connect while a broken one is still being let go.
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.options.clone())
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot connect to PostgreSQL at {} to listen: {e}",
                    self.place
                ))
            })?;
        let listener = listen_on(&pool).await.map_err(map_err)?;
        let state = ListenState {
            pool,
            listener: Some(listener),
            pending: VecDeque::new(),
            failures: 0,
        };
        Ok(Some(
            futures_util::stream::unfold(state, next_notice).boxed(),
        ))
    }

    async fn health(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

struct ListenState {
    pool: PgPool,
    /// `None` after a failure, until a new one listens.
    listener: Option<PgListener>,
    /// Notices to hand out before reading more.
    pending: VecDeque<Notice>,
    /// Failed attempts in a row to listen again.
    failures: u32,
}

async fn listen_on(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// The next notice, or `None` once listening cannot be had back.
async fn next_notice(mut st: ListenState) -> Option<(Notice, ListenState)> {
    loop {
        if let Some(notice) = st.pending.pop_front() {
            return Some((notice, st));
        }
        let Some(listener) = st.listener.as_mut() else {
            if st.failures > LISTEN_RETRIES {
                tracing::error!("gave up listening for other nodes' notices");
                return None;
            }
            let backoff = Duration::from_millis(100 << st.failures.min(6));
            tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
            match listen_on(&st.pool).await {
                Ok(listener) => {
                    tracing::info!("listening for other nodes' notices again");
                    st.listener = Some(listener);
                    st.failures = 0;
                    // Whatever was announced meanwhile is lost: look at everything.
                    st.pending.extend([Notice::Work, Notice::CallbackDue]);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other nodes' notices yet");
                    st.failures += 1;
                }
            }
            continue;
        };
        match listener.try_recv().await {
            Ok(Some(notification)) => match parse_notice(notification.payload()) {
                Some(notice) => return Some((notice, st)),
                None => tracing::warn!(
                    payload = notification.payload(),
                    "ignoring an unknown notice"
                ),
            },
            // The listener lost its connection and got another: notices sent meanwhile are
            // lost.
            Ok(None) => st.pending.extend([Notice::Work, Notice::CallbackDue]),
            Err(e) => {
                // A connection the server ended can fail in ways the listener does not
                // recover from itself: a new one replaces it.
                tracing::warn!(error = %e, "lost the connection that listens for other nodes' notices");
                st.listener = None;
                st.failures = 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::error::Error;

    use sqlx::error::{DatabaseError, ErrorKind};

    use super::*;

    /// A database error with a given SQLSTATE.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl Error for Sqlstate {}

    impl DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "error"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn classify(code: &'static str) -> StoreError {
        map_err(sqlx::Error::Database(Box::new(Sqlstate(code))))
    }

    #[test]
    fn passing_conditions_are_unavailable_and_the_rest_other() {
        assert!(classify("53100").is_full());
        for code in [
            "08006", "08001", "53300", "53200", "57P01", "57P03", "57014", "40001", "40P01",
            "58030",
        ] {
            assert!(
                matches!(classify(code), StoreError::Unavailable(_)),
                "{code}"
            );
            assert!(!classify(code).is_full(), "{code}");
        }
        for code in ["23505", "42P01", "22P02", "XX000"] {
            let e = classify(code);
            assert!(matches!(e, StoreError::Other(_)), "{code}");
            assert!(e.to_string().contains(code), "{e}");
        }
        assert!(matches!(
            map_err(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_err(sqlx::Error::RowNotFound),
            StoreError::NotFound
        ));
    }

    #[test]
    fn notices_read_back_as_sent() {
        let id = JobId::generate();
        assert_eq!(parse_notice(NOTICE_WORK), Some(Notice::Work));
        assert_eq!(parse_notice(NOTICE_CALLBACK), Some(Notice::CallbackDue));
        assert_eq!(
            parse_notice(&format!("{NOTICE_CANCEL}{id}")),
            Some(Notice::Cancelled(id))
        );
        assert_eq!(parse_notice("cancel:not-a-job"), None);
        assert_eq!(parse_notice("something else"), None);
    }

    #[test]
    fn messages_name_the_database_without_its_password() {
        let url = "postgres://someone:s3cret@db.example:6543/jobs?sslmode=disable";
        assert_eq!(
            redact(url),
            "postgres://someone:***@db.example:6543/jobs?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://db.example/jobs"),
            "postgres://db.example/jobs"
        );
        assert_eq!(redact("not a url"), "(unparsable)");
        let options = PgConnectOptions::from_str(url).unwrap();
        assert_eq!(describe(&options), "db.example:6543/jobs as user someone");
    }
}
