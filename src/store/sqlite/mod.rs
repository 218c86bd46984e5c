//! The embedded backend: one SQLite file in WAL mode, written through a single connection.
//!
//! SQLite allows one writer at a time, so every write goes through `writer` (a pool of one
//! connection) and waits its turn in-process instead of failing with `SQLITE_BUSY`; reads use
//! their own small pool and see the last committed state. A lock file beside the database
//! keeps a second `doparallel` process off the same file: the engine assumes it is the only
//! node (see [`Store::tasks_recover`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

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
    JobListQuery, JobRecord, Millis, NodeId, Notices, OverdueParams, ReportOutcome, SettleOutcome,
    SettleReport, Store, StoreError, StoreResult, TaskPageQuery, TaskRecord, TaskReport,
    TaskSettle, url_text,
};
use crate::job::{JobId, JobOptions, JobStatus, NewJob};

/// Rows per multi-row INSERT when storing a job's tasks (5 parameters each, far below
/// SQLite's limit on bound parameters).
const INSERT_CHUNK: usize = 200;

/// Outcomes per UPDATE when settling (10 parameters each).
const SETTLE_CHUNK: usize = 256;

/// Jobs served by one claim statement.
const CLAIM_GROUP: usize = 8;

/// Claims for up to [`CLAIM_GROUP`] jobs at once: `?1` is now, then a job's sequence number
/// and how many of its due tasks to take, for each place, then the node and its lease. Each
/// pick walks the `tasks_due` index of its job only.
static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    let picks: Vec<String> = (0..CLAIM_GROUP)
        .map(|slot| {
            let (seq, n) = (2 + 2 * slot, 3 + 2 * slot);
            format!(
                "SELECT rowid FROM (SELECT rowid FROM tasks WHERE job_seq = ?{seq} \
                 AND status = {TASK_PENDING} AND run_at <= ?1 ORDER BY run_at, idx LIMIT ?{n})"
            )
        })
        .collect();
    let (node, lease) = (2 + 2 * CLAIM_GROUP, 3 + 2 * CLAIM_GROUP);
    format!(
        "UPDATE tasks SET status = {TASK_RUNNING}, attempts = attempts + 1, node = ?{node}, \
         lease_until = ?{lease} WHERE rowid IN ({}) \
         RETURNING job_seq, idx, attempts, endpoint, params",
        picks.join(" UNION ALL ")
    )
});

/// The jobs with calls running, through which the statements below find running tasks by
/// each job's `tasks_due` index rather than by reading every task.
static JOBS_RUNNING: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT seq FROM jobs WHERE status IN ({JOB_PENDING}, {JOB_RUNNING}) AND n_running > 0")
});

mod writer;

use writer::{WriteTx, Writer};

pub struct SqliteStore {
    /// Every write goes through it: see `writer` for why `Ok` means committed.
    writer: Writer,
    reader: SqlitePool,
    /// Held for the life of the store; the OS releases it when the process dies, even by
    /// SIGKILL, so a crash never leaves a stale lock behind.
    _lock: Option<File>,
}

impl SqliteStore {
    /// Opens (creating when missing) the database at a `sqlite://PATH` or `sqlite::memory:`
    /// URL and brings its schema up to date. `?max_page_count=N` caps the database at N
    /// pages: past them a write fails as on a full disk.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let (sqlx_url, max_pages) = take_max_page_count(url)?;
        let mut options = SqliteConnectOptions::from_str(&sqlx_url)
            .map_err(|e| StoreError::Other(format!("invalid SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the service acts on it (an accepted job, a
            // stored result), even across a power loss, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        if let Some(pages) = max_pages {
            // A per-connection setting, so it is set on every connection the pools open.
            options = options.pragma("max_page_count", pages.to_string());
        }
        let path = options.get_filename().to_path_buf();
        let in_memory = path.as_os_str() == ":memory:" || url.contains(":memory:");

        let lock = if in_memory {
            None
        } else {
            Some(lock_database(&path)?)
        };

        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {url}: {e}")))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|e| StoreError::Other(format!("cannot migrate {url}: {e}")))?;
        // An in-memory database exists once per connection, so there it is read through the
        // writer too.
        let reader = if in_memory {
            writer.clone()
        } else {
            // Opened at start and kept: reads must not depend on finding a free file
            // descriptor later, when many connections may have taken them all.
            SqlitePoolOptions::new()
                .max_connections(4)
                .min_connections(4)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options.read_only(true))
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot open {url}: {e}")))?
        };
        Ok(SqliteStore {
            writer: Writer::new(writer, in_memory),
            reader,
            _lock: lock,
        })
    }

    async fn begin(&self) -> StoreResult<WriteTx> {
        self.writer.begin().await
    }

    /// Puts the running tasks that match `which` (a condition on `node` and `lease_until`,
    /// with one `?` for `now` when given) back to pending, their interrupted attempt not
    /// counted, and takes them off their jobs' running counts: the shared part of
    /// [`Store::tasks_recover`] and [`Store::tasks_expire`]. Attempts awaiting a report
    /// (no node, a deadline) never match, so they stay Running and counted. Goes through
    /// the jobs with calls running, each job's tasks by the `tasks_due` index.
    async fn take_back(&self, which: &str, now: Option<Millis>) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let seqs: Vec<i64> = sqlx::query_scalar(&JOBS_RUNNING)
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        let sql = format!(
            "UPDATE tasks SET status = {TASK_PENDING}, attempts = attempts - 1, node = NULL, \
             lease_until = NULL WHERE job_seq = ? AND status = {TASK_RUNNING} AND {which}"
        );
        let mut taken = 0;
        for seq in seqs {
            let mut query = sqlx::query(&sql).bind(seq);
            if let Some(now) = now {
                query = query.bind(now);
            }
            let n = query
                .execute(tx.conn().await?)
                .await
                .map_err(map_err)?
                .rows_affected();
            if n > 0 {
                sqlx::query("UPDATE jobs SET n_running = n_running - ? WHERE seq = ?")
                    .bind(n as i64)
                    .bind(seq)
                    .execute(tx.conn().await?)
                    .await
                    .map_err(map_err)?;
                taken += n;
            }
        }
        tx.commit().await?;
        Ok(taken)
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

        // The jobs' sequence numbers, in one query per chunk of distinct jobs.
        let mut distinct: Vec<JobId> = batch.iter().map(|s| s.job_id).collect();
        distinct.sort();
        distinct.dedup();
        let mut seqs: HashMap<JobId, i64> = HashMap::with_capacity(distinct.len());
        for chunk in distinct.chunks(SETTLE_CHUNK) {
            let sql = format!(
                "SELECT id, seq FROM jobs WHERE id IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            for row in query.fetch_all(tx.conn().await?).await.map_err(map_err)? {
                seqs.insert(parse_id(row.get("id"))?, row.get("seq"));
            }
        }

        // Failures are numbered per job (the events stream's cursor), after the highest
        // number given so far: not after the count, since a stale failure may have taken a
        // number it never stored. Few batches hold failures, so this is looked up per job.
        let mut next_fail: HashMap<i64, i64> = HashMap::new();
        for s in batch {
            let Some(&seq) = seqs.get(&s.job_id) else {
                continue;
            };
            if matches!(s.outcome, SettleOutcome::Failed { .. }) && !next_fail.contains_key(&seq) {
                let last: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(MAX(fail_seq), 0) FROM tasks \
                     WHERE job_seq = ? AND fail_seq IS NOT NULL",
                )
                .bind(seq)
                .fetch_one(tx.conn().await?)
                .await
                .map_err(map_err)?;
                next_fail.insert(seq, last + 1);
            }
        }

        // The outcomes, a chunk per statement: a VALUES table joined to the tasks. Only the
        // attempt that is running, under this node's lease, may settle a task: a stale
        // outcome (from before a restart, after a cancel or after the lease was taken back)
        // matches no row and changes nothing, so each result is stored once. Jobs purged meanwhile have no sequence number and are skipped.
        let live: Vec<(i64, &TaskSettle)> = batch
            .iter()
            .filter_map(|s| seqs.get(&s.job_id).map(|&seq| (seq, s)))
            .collect();
        let mut deltas: HashMap<i64, Delta> = HashMap::new();
        for chunk in live.chunks(SETTLE_CHUNK) {
            let mut sql = String::from(
                "WITH v(job_seq, idx, attempt, status, run_at, result, error, latency_ms, \
                 finished_at, fail_seq, lease) AS (VALUES ",
            );
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 {
                    "(?,?,?,?,?,?,?,?,?,?,?)"
                } else {
                    ",(?,?,?,?,?,?,?,?,?,?,?)"
                });
            }
            sql.push_str(&format!(
                ") UPDATE tasks SET status = v.status, run_at = COALESCE(v.run_at, tasks.run_at), \
                 result = v.result, error = v.error, latency_ms = v.latency_ms, \
                 finished_at = v.finished_at, fail_seq = v.fail_seq, node = NULL, \
                 lease_until = v.lease \
                 FROM v WHERE tasks.job_seq = v.job_seq AND tasks.idx = v.idx \
                 AND tasks.status = {TASK_RUNNING} AND tasks.attempts = v.attempt"
            ));
            if node.is_some() {
                sql.push_str(" AND tasks.node = ?");
            }
            sql.push_str(" RETURNING tasks.job_seq, tasks.status");
            let mut query = sqlx::query(&sql);
            for &(seq, s) in chunk {
                let (status, run_at, result, error, lease) = match &s.outcome {
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
                let done = status == TASK_COMPLETE || status == TASK_FAILED;
                let fail_seq = (status == TASK_FAILED).then(|| {
                    let next = next_fail.get_mut(&seq).expect("looked up above");
                    *next += 1;
                    *next - 1
                });
                let d = deltas.entry(seq).or_default();
                d.now = d.now.max(s.now);
                query = query
                    .bind(seq)
                    .bind(s.index as i64)
                    .bind(i64::from(s.attempt))
                    .bind(status)
                    .bind(run_at)
                    .bind(result)
                    .bind(error)
                    .bind(s.latency_ms as i64)
                    .bind(done.then_some(s.now))
                    .bind(fail_seq)
                    .bind(lease);
            }
            // The last placeholder, after every VALUES row.
            if let Some(node) = node {
                query = query.bind(node.0);
            }
            for row in query.fetch_all(tx.conn().await?).await.map_err(map_err)? {
                let d = deltas
                    .get_mut(&row.get::<i64, _>(0))
                    .expect("a job of this batch");
                let status: Code = row.get(1);
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
        }

        // The jobs' counters, a chunk of jobs per statement; the rows that come back say
        // which jobs this batch finished.
        let changed: Vec<(i64, Delta)> =
            deltas.into_iter().filter(|(_, d)| d.settled > 0).collect();
        for chunk in changed.chunks(SETTLE_CHUNK) {
            let mut sql = String::from("WITH d(seq, settled, complete, failed) AS (VALUES ");
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "(?,?,?,?)" } else { ",(?,?,?,?)" });
            }
            sql.push_str(
                ") UPDATE jobs SET n_running = n_running - d.settled, \
                 n_complete = n_complete + d.complete, n_failed = n_failed + d.failed \
                 FROM d WHERE jobs.seq = d.seq \
                 RETURNING jobs.seq, jobs.id, jobs.status, jobs.total, jobs.n_complete, \
                 jobs.n_failed, jobs.tolerated, jobs.callback_url",
            );
            let mut query = sqlx::query(&sql);
            for (seq, d) in chunk {
                query = query
                    .bind(seq)
                    .bind(d.settled)
                    .bind(d.complete)
                    .bind(d.failed);
            }
            let rows = query.fetch_all(tx.conn().await?).await.map_err(map_err)?;
            for row in rows {
                let status = job_status_from(row.get("status"))?;
                let total: i64 = row.get("total");
                let n_failed: i64 = row.get("n_failed");
                let done: i64 = row.get::<i64, _>("n_complete") + n_failed;
                if status.is_finished() || done < total {
                    continue;
                }
                // This batch settled the job's last task: its final status and its callback
                // record are written in the same transaction, so the callback is owed
                // exactly when the job is finished.
                let seq: i64 = row.get("seq");
                let now = chunk
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .map_or(0, |(_, d)| d.now);
                let tolerated: i64 = row.get("tolerated");
                let final_status =
                    plan::final_status(n_failed.max(0) as u64, tolerated.max(0) as u64);
                sqlx::query("UPDATE jobs SET status = ?, finished_at = ? WHERE seq = ?")
                    .bind(job_code(final_status))
                    .bind(now)
                    .bind(seq)
                    .execute(tx.conn().await?)
                    .await
                    .map_err(map_err)?;
                let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
                if has_callback {
                    insert_callback(&mut tx, seq, now).await?;
                }
                report.finished.push(JobFinished {
                    job_id: parse_id(row.get("id"))?,
                    status: final_status,
                    has_callback,
                });
            }
        }
        tx.commit().await?;
        Ok(report)
    }
}

/// Takes `max_page_count=N` out of a SQLite URL's query, which sqlx would refuse; returns
/// the URL without it, and N.
fn take_max_page_count(url: &str) -> StoreResult<(String, Option<u64>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut pages = None;
    let mut rest = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key == "max_page_count" {
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    StoreError::Other(format!(
                        "invalid SQLite URL {url:?}: max_page_count must be a positive integer"
                    ))
                })?;
            pages = Some(n);
        } else {
            rest.append_pair(&key, &value);
        }
    }
    let rest = rest.finish();
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{rest}")
    };
    Ok((url, pages))
}

fn lock_database(path: &Path) -> StoreResult<File> {
    let mut lock_path = PathBuf::from(path);
    lock_path.as_mut_os_string().push(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create lock file {}: {e}",
                lock_path.display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Conflict(format!(
            "database {} is in use by another doparallel process (it holds {}); \
             a SQLite database serves one process at a time",
            path.display(),
            lock_path.display()
        ))),
        Err(TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) => {
            // SQLITE_FULL (13), SQLITE_BUSY (5), SQLITE_IOERR (10) and SQLITE_CANTOPEN (14)
            // and their extended codes are conditions that pass; the rest are bugs.
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            match primary {
                Some(13) => StoreError::full(db),
                Some(5 | 10 | 14) => StoreError::Unavailable(db.to_string()),
                _ => StoreError::Other(e.to_string()),
            }
        }
        _ => StoreError::Other(e.to_string()),
    }
}

const JOB_COLUMNS: &str = "j.id, j.owner, j.status, j.options, j.total, j.n_running, j.n_complete, j.n_failed, \
     j.n_cancelled, j.created_at, j.finished_at, j.callback_url, c.state, c.attempts, c.last_error";

fn job_from_row(row: &SqliteRow) -> StoreResult<JobRecord> {
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
            attempts: row.get::<Option<i64>, _>("attempts").unwrap_or(0) as u32,
            last_error: row.get("last_error"),
        },
    })
}

const TASK_COLUMNS: &str = "t.idx, t.status, t.attempts, t.endpoint, t.result, t.error, \
     t.latency_ms, t.finished_at";

fn task_from_row(row: &SqliteRow) -> StoreResult<TaskRecord> {
    Ok(TaskRecord {
        index: row.get::<i64, _>("idx") as u64,
        status: task_status_from(row.get("status"))?,
        attempts: row.get::<i64, _>("attempts") as u32,
        endpoint: row.get("endpoint"),
        result: raw(row.get("result"))?,
        error: raw(row.get("error"))?,
        latency_ms: row.get::<Option<i64>, _>("latency_ms").map(|v| v as u64),
        finished_at: row.get("finished_at"),
    })
}

/// Deletes a job; its tasks and callback record go with it (ON DELETE CASCADE).
async fn delete_job(tx: &mut WriteTx, seq: i64) -> StoreResult<()> {
    sqlx::query("DELETE FROM jobs WHERE seq = ?")
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
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
        if let Some(idem) = idempotency {
            // Checked inside the write transaction: two requests with one key cannot both
            // pass, since there is one writer.
            let earlier = sqlx::query(
                "SELECT id, request_hash FROM jobs \
                     WHERE COALESCE(owner, '') = COALESCE(?2, '') AND idempotency_key = ?1",
            )
            .bind(&idem.key)
            .bind(job.owner.as_deref())
            .fetch_optional(tx.conn().await?)
            .await
            .map_err(map_err)?;
            if let Some(row) = earlier {
                let hash: Option<String> = row.get("request_hash");
                return Ok(InsertOutcome::Existing {
                    job_id: parse_id(row.get("id"))?,
                    same_request: hash.as_deref() == Some(idem.request_hash.as_str()),
                });
            }
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (id, status, options, concurrency, tolerated, total, callback_url, \
             created_at, finished_at, idempotency_key, request_hash, owner) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
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
        .fetch_one(tx.conn().await?)
        .await
        .map_err(map_err)?;

        let mut index: i64 = 0;
        for chunk in job.tasks.chunks(INSERT_CHUNK) {
            let mut sql =
                String::from("INSERT INTO tasks (job_seq, idx, run_at, endpoint, params) VALUES ");
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 {
                    "(?,?,?,?,?)"
                } else {
                    ",(?,?,?,?,?)"
                });
            }
            let mut query = sqlx::query(&sql);
            for task in chunk {
                index += 1;
                query = query
                    .bind(seq)
                    .bind(index)
                    .bind(now)
                    .bind(task.endpoint.as_str())
                    .bind(task.params.get());
            }
            query.execute(tx.conn().await?).await.map_err(map_err)?;
        }

        if empty && callback_url.is_some() {
            insert_callback(&mut tx, seq, now).await?;
        }
        tx.commit().await?;
        Ok(InsertOutcome::Inserted)
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq WHERE j.id = ?"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn job_list(&self, query: &JobListQuery) -> StoreResult<Vec<JobRecord>> {
        // Jobs are numbered in creation order, so "newest first, before X" is by seq.
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
             WHERE (?1 IS NULL OR j.status = ?1) \
               AND (?2 IS NULL OR j.seq < (SELECT seq FROM jobs WHERE id = ?2)) \
               AND (?4 IS NULL OR j.owner = ?4) \
             ORDER BY j.seq DESC LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(query.status.map(job_code))
            .bind(query.before.map(|id| id.to_string()))
            .bind(i64::from(query.limit))
            .bind(query.owner.as_deref())
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        rows.iter().map(job_from_row).collect()
    }

    async fn tasks_page(&self, id: JobId, query: &TaskPageQuery) -> StoreResult<Vec<TaskRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = ?1) \
             AND t.idx > ?2 AND (?3 IS NULL OR t.status = ?3) ORDER BY t.idx LIMIT ?4"
        ))
        .bind(id.to_string())
        .bind(query.after as i64)
        .bind(query.status.map(task_code))
        .bind(i64::from(query.limit))
        .fetch_all(&self.reader)
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
             WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = ?) AND t.fail_seq > ? \
             ORDER BY t.fail_seq LIMIT ?"
        ))
        .bind(id.to_string())
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
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
        let Some(row) = sqlx::query("SELECT seq, status, callback_url FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(tx.conn().await?)
            .await
            .map_err(map_err)?
        else {
            return Ok(CancelOutcome::NotFound);
        };
        let seq: i64 = row.get("seq");
        let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
        match job_status_from(row.get("status"))? {
            JobStatus::Cancelled => {
                return Ok(CancelOutcome::Cancelled {
                    has_callback,
                    newly: false,
                    tasks: 0,
                });
            }
            done if done.is_finished() => return Ok(CancelOutcome::AlreadyFinished(done)),
            _ => {}
        }
        static CANCEL_TASKS: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE tasks SET status = {TASK_CANCELLED}, finished_at = ? \
                 WHERE job_seq = ? AND status IN ({TASK_PENDING}, {TASK_RUNNING})"
            )
        });
        static CANCEL_JOB: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE jobs SET status = {JOB_CANCELLED}, n_running = 0, \
                 n_cancelled = n_cancelled + ?, finished_at = ? WHERE seq = ?"
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
            insert_callback(&mut tx, seq, now).await?;
        }
        tx.commit().await?;
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
             LEFT JOIN callbacks c ON c.job_seq = j.seq WHERE j.id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(map_err)?
        else {
            return Ok(DeleteOutcome::NotFound);
        };
        if !job_status_from(row.get("status"))?.is_finished() {
            return Ok(DeleteOutcome::NotFinished);
        }
        if row.get::<Option<Code>, _>("state") == Some(CALLBACK_PENDING) {
            return Ok(DeleteOutcome::CallbackPending);
        }
        delete_job(&mut tx, row.get("seq")).await?;
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted)
    }

    async fn jobs_purge(&self, finished_before: Millis, limit: u32) -> StoreResult<u64> {
        static PURGEABLE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT j.seq FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
                 WHERE j.finished_at < ? AND j.status IN ({JOB_COMPLETE}, {JOB_FAILED}, {JOB_CANCELLED}) \
                   AND (c.state IS NULL OR c.state != {CALLBACK_PENDING}) \
                 ORDER BY j.finished_at LIMIT ?"
            )
        });
        let mut tx = self.begin().await?;
        let seqs: Vec<i64> = sqlx::query_scalar(&PURGEABLE)
            .bind(finished_before)
            .bind(i64::from(limit))
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        for &seq in &seqs {
            delete_job(&mut tx, seq).await?;
        }
        tx.commit().await?;
        Ok(seqs.len() as u64)
    }

    async fn queue_depth(&self) -> StoreResult<u64> {
        static DEPTH: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT SUM(total - n_running - n_complete - n_failed - n_cancelled) FROM jobs \
                 WHERE status IN ({JOB_PENDING}, {JOB_RUNNING})"
            )
        });
        let depth: Option<i64> = sqlx::query_scalar(&DEPTH)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(depth.unwrap_or(0).max(0) as u64)
    }

    async fn tasks_claim(&self, params: &ClaimParams) -> StoreResult<Claim> {
        let mut claim = Claim::default();
        if params.limit == 0 {
            return Ok(claim);
        }
        let mut tx = self.begin().await?;
        // Unfinished jobs with pending tasks and room under their concurrency, least
        // recently served first, but for the jobs the claim leaves out and those of owners
        // with no room left. No more than twice the free slots can be served, since each gets
        // at least one; a job found with nothing due (its tasks all in backoff) is marked
        // served too, so it moves to the back and cannot starve the jobs behind it.
        let full_owners = params.owners.full();
        let mut skip = String::new();
        if !params.skip_jobs.is_empty() {
            skip.push_str(&format!(
                "AND id NOT IN ({}) ",
                vec!["?"; params.skip_jobs.len()].join(",")
            ));
        }
        if !full_owners.is_empty() {
            skip.push_str(&format!(
                "AND (owner IS NULL OR owner NOT IN ({})) ",
                vec!["?"; full_owners.len()].join(",")
            ));
        }
        let sql = format!(
            "SELECT seq, id, owner, options, concurrency, n_running, \
             total - n_running - n_complete - n_failed AS pending FROM jobs \
             WHERE status IN ({JOB_PENDING}, {JOB_RUNNING}) AND total > n_running + n_complete + n_failed \
               AND (concurrency IS NULL OR n_running < concurrency) {skip}\
             ORDER BY last_claim_at, seq LIMIT ?"
        );
        let mut query = sqlx::query(&sql);
        for id in &params.skip_jobs {
            query = query.bind(id.to_string());
        }
        for owner in &full_owners {
            query = query.bind(owner);
        }
        let jobs = query
            .bind(i64::from(params.limit) * 2 + 8)
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;

        struct Candidate {
            seq: i64,
            id: JobId,
            owner: Option<Arc<str>>,
            options_text: String,
            /// Parsed once, for the jobs this claim serves.
            options: Option<Arc<JobOptions>>,
            headroom: u64,
            /// Its tasks not yet claimed, due or in backoff.
            pending: u64,
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
                pending: row.get::<i64, _>("pending").max(0) as u64,
            });
        }

        // The plan says how many tasks each job gives in each round (see `plan`); the jobs of
        // a round are served CLAIM_GROUP at a time by one statement (a UNION of per-job
        // picks), so a claim over many small jobs costs few statements.
        let mut plan = FairShare::new(
            u64::from(params.limit),
            candidates.iter().map(|c| (c.owner.as_deref(), c.headroom)),
            &params.owners,
        );
        let by_seq: HashMap<i64, usize> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (c.seq, i))
            .collect();
        loop {
            let wants = plan.round();
            if wants.is_empty() {
                break;
            }
            let mut got: HashMap<usize, u64> = HashMap::with_capacity(wants.len());
            for group in wants.chunks(CLAIM_GROUP) {
                let mut query = sqlx::query(&CLAIM_SQL).bind(params.now);
                for slot in 0..CLAIM_GROUP {
                    // Unused places pick nothing: no job has sequence number -1.
                    let (seq, want) = group
                        .get(slot)
                        .map_or((-1, 0), |&(i, want)| (candidates[i].seq, want as i64));
                    query = query.bind(seq).bind(want);
                }
                let rows = query.bind(params.node.0).bind(params.lease_until);
                let rows = rows.fetch_all(tx.conn().await?).await.map_err(map_err)?;
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
                        attempt: row.get::<i64, _>("attempts") as u32,
                        endpoint: row.get("endpoint"),
                        params: raw(Some(row.get("params")))?.expect("some"),
                        options,
                        owner: c.owner.clone(),
                    });
                }
            }
            for (i, want) in wants {
                plan.got(i, want, got.get(&i).copied().unwrap_or(0));
            }
        }
        // Each job's tasks together, in order (the engine looks its cancel token up once
        // per job).
        claim.tasks.sort_by_key(|t| (t.job_id, t.index));

        // The served jobs' counters and places in the round-robin, a chunk of jobs per
        // statement (a claim over many small jobs serves hundreds).
        let served: Vec<(i64, u64)> = (0..candidates.len())
            .filter(|&i| plan.claimed(i) > 0 || plan.exhausted(i))
            .map(|i| (candidates[i].seq, plan.claimed(i)))
            .collect();
        for chunk in served.chunks(SETTLE_CHUNK) {
            let mut sql = String::from("WITH d(seq, claimed) AS (VALUES ");
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "(?,?)" } else { ",(?,?)" });
            }
            sql.push_str(&format!(
                ") UPDATE jobs SET n_running = n_running + d.claimed, \
                 status = CASE WHEN d.claimed > 0 THEN {JOB_RUNNING} ELSE jobs.status END, \
                 last_claim_at = ? FROM d WHERE jobs.seq = d.seq"
            ));
            let mut query = sqlx::query(&sql);
            for &(seq, claimed) in chunk {
                query = query.bind(seq).bind(claimed as i64);
            }
            query
                .bind(params.now)
                .execute(tx.conn().await?)
                .await
                .map_err(map_err)?;
        }
        static FIRST_DUE: LazyLock<String> = LazyLock::new(|| {
            format!("SELECT MIN(run_at) FROM tasks WHERE job_seq = ? AND status = {TASK_PENDING}")
        });
        for (i, c) in candidates.iter().enumerate() {
            // A job whose every pending task was just claimed has nothing left in backoff.
            if plan.exhausted(i) && c.pending > plan.claimed(i) {
                // Whatever is left of this job waits in backoff: when is the first due?
                let due: Option<i64> = sqlx::query_scalar(&FIRST_DUE)
                    .bind(c.seq)
                    .fetch_one(tx.conn().await?)
                    .await
                    .map_err(map_err)?;
                if let Some(due) = due {
                    claim.next_due = Some(claim.next_due.map_or(due, |d: i64| d.min(due)));
                }
            }
        }
        tx.commit().await?;
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
                 WHERE j.id = ? AND t.idx = ? AND t.attempts = ? \
                   AND t.status IN ({TASK_COMPLETE}, {TASK_FAILED})"
            )
        });
        // Not applied: was this attempt's outcome stored already?
        let done: Option<i64> = sqlx::query_scalar(&DONE)
            .bind(report.job_id.to_string())
            .bind(report.index as i64)
            .bind(i64::from(report.attempt))
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(if done.is_some() {
            ReportOutcome::AlreadyReported
        } else {
            ReportOutcome::Unknown
        })
    }

    async fn tasks_overdue(&self, params: &OverdueParams) -> StoreResult<Vec<ClaimedTask>> {
        let mut tx = self.begin().await?;
        // Awaited attempts: running, held by no node, with a deadline. Found through the
        // jobs with tasks running, each by its `tasks_due` index.
        static OVERDUE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE tasks SET node = ?, lease_until = ? WHERE rowid IN (\
                 SELECT t.rowid FROM jobs j JOIN tasks t ON t.job_seq = j.seq AND t.status = {TASK_RUNNING} \
                 WHERE j.status IN ({JOB_PENDING}, {JOB_RUNNING}) AND j.n_running > 0 AND t.node IS NULL \
                   AND t.lease_until IS NOT NULL AND t.lease_until <= ? LIMIT ?) \
                 RETURNING job_seq, idx, attempts, endpoint, params"
            )
        });
        let rows = sqlx::query(&OVERDUE)
            .bind(params.node.0)
            .bind(params.lease_until)
            .bind(params.now)
            .bind(i64::from(params.limit))
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        type JobOf = (JobId, Arc<JobOptions>, Option<Arc<str>>);
        let mut jobs: HashMap<i64, JobOf> = HashMap::new();
        let mut tasks = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get("job_seq");
            if let std::collections::hash_map::Entry::Vacant(entry) = jobs.entry(seq) {
                let job = sqlx::query("SELECT id, options, owner FROM jobs WHERE seq = ?")
                    .bind(seq)
                    .fetch_one(tx.conn().await?)
                    .await
                    .map_err(map_err)?;
                entry.insert((
                    parse_id(job.get("id"))?,
                    Arc::new(parse_options(job.get("options"))?),
                    job.get::<Option<String>, _>("owner").map(Arc::from),
                ));
            }
            let (job_id, options, owner) = &jobs[&seq];
            tasks.push(ClaimedTask {
                job_id: *job_id,
                index: row.get::<i64, _>("idx") as u64,
                attempt: row.get::<i64, _>("attempts") as u32,
                endpoint: row.get("endpoint"),
                params: raw(Some(row.get("params")))?.expect("some"),
                options: options.clone(),
                owner: owner.clone(),
            });
        }
        tx.commit().await?;
        Ok(tasks)
    }

    async fn task_token_key(&self) -> StoreResult<Vec<u8>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE name = 'task_token_key'")
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)
    }

    async fn tasks_recover(&self) -> StoreResult<u64> {
        // Every call left running by the previous process, whatever its lease; and rows
        // from before leases existed (no node, no lease).
        self.take_back("(node IS NOT NULL OR lease_until IS NULL)", None)
            .await
    }

    async fn tasks_renew(&self, node: NodeId, until: Millis) -> StoreResult<u64> {
        // Through the jobs that have calls running: each job's running tasks are found by the
        // `tasks_due` index, never by reading every task.
        let mut tx = self.begin().await?;
        static RENEW: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE tasks SET lease_until = ? WHERE status = {TASK_RUNNING} AND node = ? \
                 AND job_seq IN ({})",
                *JOBS_RUNNING
            )
        });
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
        self.take_back("node IS NOT NULL AND lease_until < ?", Some(now))
            .await
    }

    async fn callbacks_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<CallbackDue>> {
        static DUE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT c.job_seq, c.attempts, j.id, j.callback_url FROM callbacks c \
                 JOIN jobs j ON j.seq = c.job_seq \
                 WHERE c.state = {CALLBACK_PENDING} AND c.next_attempt_at <= ? \
                 ORDER BY c.next_attempt_at LIMIT ?"
            )
        });
        let mut tx = self.begin().await?;
        let rows = sqlx::query(&DUE)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get("job_seq");
            sqlx::query("UPDATE callbacks SET next_attempt_at = ? WHERE job_seq = ?")
                .bind(lease_until)
                .bind(seq)
                .execute(tx.conn().await?)
                .await
                .map_err(map_err)?;
            due.push(CallbackDue {
                job_id: parse_id(row.get("id"))?,
                url: row.get("callback_url"),
                attempts: row.get::<i64, _>("attempts") as u32,
            });
        }
        tx.commit().await?;
        Ok(due)
    }

    async fn callback_next_due(&self) -> StoreResult<Option<Millis>> {
        static NEXT_DUE: LazyLock<String> = LazyLock::new(|| {
            format!("SELECT MIN(next_attempt_at) FROM callbacks WHERE state = {CALLBACK_PENDING}")
        });
        sqlx::query_scalar(&NEXT_DUE)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)
    }

    async fn callback_record(&self, record: &CallbackRecord) -> StoreResult<bool> {
        static RECORD: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE callbacks SET state = ?, attempts = ?, next_attempt_at = ?, \
                 last_error = COALESCE(?, last_error), delivered_at = ? \
                 WHERE job_seq = (SELECT seq FROM jobs WHERE id = ?) \
                   AND state = {CALLBACK_PENDING} AND attempts = ?"
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
            .bind(i64::from(record.attempts))
            .bind(next)
            .bind(error)
            .bind(delivered)
            .bind(record.job_id.to_string())
            .bind(i64::from(record.attempts) - 1)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn listen(&self) -> StoreResult<Option<Notices>> {
        // The lock file keeps every other process off this database: nobody to hear from.
        Ok(None)
    }

    async fn health(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

async fn insert_callback(tx: &mut WriteTx, seq: i64, now: Millis) -> StoreResult<()> {
    static INSERT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO callbacks (job_seq, state, next_attempt_at) \
             VALUES (?, {CALLBACK_PENDING}, ?)"
        )
    });
    sqlx::query(&INSERT)
        .bind(seq)
        .bind(now)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_page_count_is_taken_out_of_the_url() {
        let check = |url: &str, expected: (&str, Option<u64>)| {
            let (rest, pages) = take_max_page_count(url).unwrap();
            assert_eq!((rest.as_str(), pages), expected, "{url}");
        };
        check("sqlite://a.db", ("sqlite://a.db", None));
        check(
            "sqlite://a.db?max_page_count=64",
            ("sqlite://a.db", Some(64)),
        );
        check(
            "sqlite://a.db?mode=rwc&max_page_count=64",
            ("sqlite://a.db?mode=rwc", Some(64)),
        );
        check("sqlite://a.db?mode=rwc", ("sqlite://a.db?mode=rwc", None));
        for bad in ["0", "-1", "x", ""] {
            let url = format!("sqlite://a.db?max_page_count={bad}");
            assert!(take_max_page_count(&url).is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn a_write_past_max_page_count_is_unavailable_as_on_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?max_page_count=40",
            dir.path().join("small.db").display()
        );
        let store = SqliteStore::open(&url).await.unwrap();
        let big = format!("'{}'", "x".repeat(400 * 1024));
        let mut tx = store.begin().await.unwrap();
        let err = sqlx::query(&format!("CREATE TABLE ballast AS SELECT {big} AS b"))
            .execute(tx.conn().await.unwrap())
            .await
            .map_err(map_err)
            .unwrap_err();
        drop(tx);
        // Unavailable, which the engine waits out, and full, which the API says.
        assert!(err.is_full(), "{err}");
        store.health().await.unwrap();
    }

    /// A job whose acknowledged insert must be readable through the readers.
    async fn insert_and_read_back(store: &SqliteStore) {
        let job = crate::job::parse_submission(
            br#"{"tasks":[{"endpoint":"/v1/test","params":{}}]}"#,
            &crate::job::Limits::defaults(),
            &crate::egress::EgressPolicy::guarded(vec![]),
        )
        .unwrap();
        let outcome = store.job_insert(&job, None, 1).await.unwrap();
        assert_eq!(outcome, InsertOutcome::Inserted);
        let read = store.job_get(job.id).await.unwrap();
        assert!(read.is_some(), "an acknowledged insert is not committed");
    }

    /// What trapped sqlx's own transactions (seen with a real full disk, reproduced here
    /// without one): SQLite rolling a transaction back underneath the driver, then a COMMIT
    /// that fails and leaves its transaction open (a full disk does that too; a deferred
    /// foreign key does it every time). With sqlx's transactions every later write then
    /// answered `Ok` inside a transaction nobody committed, and the readers never saw it.
    #[tokio::test]
    async fn writes_after_failed_commits_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
             CREATE TABLE child (parent REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
        tx.commit().await.unwrap();

        for _ in 0..2 {
            // Rolled back underneath: the COMMIT fails, and must say so.
            let mut tx = store.begin().await.unwrap();
            sqlx::query("INSERT INTO settings (name, value) VALUES ('lost', x'00')")
                .execute(tx.conn().await.unwrap())
                .await
                .unwrap();
            sqlx::raw_sql("ROLLBACK")
                .execute(tx.conn().await.unwrap())
                .await
                .unwrap();
            assert!(tx.commit().await.is_err());
            // A COMMIT that fails with its transaction left open.
            let mut tx = store.begin().await.unwrap();
            sqlx::raw_sql("INSERT INTO child VALUES (7)")
                .execute(tx.conn().await.unwrap())
                .await
                .unwrap();
            assert!(tx.commit().await.is_err());
            insert_and_read_back(&store).await;
        }

        // A transaction dropped uncommitted.
        let mut tx = store.begin().await.unwrap();
        sqlx::query("INSERT INTO settings (name, value) VALUES ('dropped', x'00')")
            .execute(tx.conn().await.unwrap())
            .await
            .unwrap();
        drop(tx);
        insert_and_read_back(&store).await;

        // A connection left inside a transaction by someone else: the next write must not
        // land inside it.
        let mut conn = store.writer.pool().acquire().await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
        drop(conn);
        insert_and_read_back(&store).await;

        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM settings")
            .fetch_all(&store.reader)
            .await
            .unwrap();
        assert!(
            !names.iter().any(|n| n == "lost" || n == "dropped"),
            "{names:?}"
        );
        let children: i64 = sqlx::query_scalar("SELECT count(*) FROM child")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(children, 0);
    }
}
