//! Jobs as a whole: submission with its tasks, the reads the API serves, removal (one job,
//! or the retention purge) and the queue depth. Job control is `control`.

use std::sync::LazyLock;

use sqlx::Row;

use super::callbacks::insert_callbacks;
use super::writer::WriteTx;
use super::{SqliteStore, map_err};
use crate::job::{JobId, NewJob, NewTask};
use crate::store::codec::{
    CALLBACK_PENDING, Code, JOB_CANCELLED, JOB_COMPLETE, JOB_FAILED, JOB_PENDING, JOB_RUNNING,
    TASK_FAILED, job_code, job_status_from, parse_id, task_code,
};
use crate::store::rows::{NewJobRow, failed_task_from_row, job_from_row, task_from_row};
use crate::store::{
    DeleteOutcome, FailedTask, IdempotencyKey, InsertOutcome, JobListQuery, JobRecord, Millis,
    StoreResult, TaskPageQuery, TaskRecord,
};

/// Rows per multi-row INSERT when storing a job's tasks (5 parameters each, far below
/// SQLite's limit on bound parameters).
const INSERT_CHUNK: usize = 200;

/// Job rows per multi-row INSERT (17 parameters each).
const JOB_INSERT_CHUNK: usize = 256;

const JOB_COLUMNS: &str = "j.id, j.owner, j.status, j.options, j.total, j.n_running, j.n_complete, j.n_failed, \
     j.n_cancelled, j.created_at, j.finished_at, j.callback_url, c.state, c.attempts, c.last_error, \
     j.metadata";

const TASK_COLUMNS: &str = "t.idx, t.status, t.attempts, t.endpoint, t.result, t.error, \
     t.latency_ms, t.finished_at, t.call, t.progress";

/// Stores a job in a transaction of its own. Small jobs go through the group commit
/// instead (`group`), which stores those that arrive together in one transaction.
pub(super) async fn insert(
    store: &SqliteStore,
    job: &NewJob,
    idempotency: Option<&IdempotencyKey>,
    now: Millis,
) -> StoreResult<InsertOutcome> {
    let new = NewJobRow::of(job, now)?;
    let mut tx = store.begin().await?;
    let outcome = insert_in(&mut tx, job, &new, idempotency, now).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// The statements that store a job, in the caller's transaction (not committed here).
pub(super) async fn insert_in(
    tx: &mut WriteTx,
    job: &NewJob,
    new: &NewJobRow,
    idempotency: Option<&IdempotencyKey>,
    now: Millis,
) -> StoreResult<InsertOutcome> {
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
    insert_many_in(tx, &[(job, new, idempotency, now)]).await?;
    Ok(InsertOutcome::Inserted)
}

/// One job to store: the job, its row, its idempotency key, when it was accepted.
pub(super) type JobInsert<'a> = (
    &'a NewJob,
    &'a NewJobRow,
    Option<&'a IdempotencyKey>,
    Millis,
);

/// Stores jobs whose idempotency keys (if any) were checked: their rows in one statement
/// per chunk of jobs, then all their tasks in chunks of [`INSERT_CHUNK`] rows, so that many
/// small jobs submitted together cost a few statements rather than two each.
pub(super) async fn insert_many_in(tx: &mut WriteTx, jobs: &[JobInsert<'_>]) -> StoreResult<()> {
    let mut seqs: Vec<i64> = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(JOB_INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO jobs (id, status, options, concurrency, tolerated, total, \
             callback_url, created_at, finished_at, idempotency_key, request_hash, owner, \
             metadata, not_before, deadline_at, priority, group_name) VALUES ",
        );
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 {
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            });
        }
        sql.push_str(" RETURNING id, seq");
        let mut query = sqlx::query(&sql);
        for &(job, new, idempotency, now) in chunk {
            query = query
                .bind(job.id.to_string())
                .bind(new.status)
                .bind(&new.options)
                .bind(new.concurrency)
                .bind(new.tolerated)
                .bind(new.total)
                .bind(&new.callback_url)
                .bind(now)
                .bind(new.finished_at)
                .bind(idempotency.map(|i| i.key.as_str()))
                .bind(idempotency.map(|i| i.request_hash.as_str()))
                .bind(job.owner.as_deref())
                .bind(&new.metadata)
                .bind(new.not_before)
                .bind(new.deadline_at)
                .bind(new.priority)
                .bind(&new.group);
        }
        // SQLite does not promise RETURNING rows in the order of VALUES: matched by id.
        let rows = query.fetch_all(tx.conn().await?).await.map_err(map_err)?;
        let mut by_id = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            by_id.insert(parse_id(row.get("id"))?, row.get::<i64, _>("seq"));
        }
        for (job, ..) in chunk {
            seqs.push(by_id.get(&job.id).copied().ok_or_else(|| {
                crate::store::StoreError::Other(format!("job {} was not stored", job.id))
            })?);
        }
    }

    // The tasks, in chunks that may span jobs (filled as they go: a job of a million tasks
    // is not copied whole).
    let mut chunk: Vec<TaskInsert> = Vec::with_capacity(INSERT_CHUNK);
    for (&(job, new, _, _), &seq) in jobs.iter().zip(&seqs) {
        for (i, task) in job.tasks.iter().enumerate() {
            chunk.push((seq, i as i64 + 1, new.run_at, task));
            if chunk.len() == INSERT_CHUNK {
                insert_tasks(tx, &chunk).await?;
                chunk.clear();
            }
        }
    }
    if !chunk.is_empty() {
        insert_tasks(tx, &chunk).await?;
    }

    let due: Vec<(i64, Millis)> = jobs
        .iter()
        .zip(&seqs)
        .filter(|((_, new, _, _), _)| new.empty && new.callback_url.is_some())
        .map(|(&(_, _, _, now), &seq)| (seq, now))
        .collect();
    insert_callbacks(tx, &due).await
}

/// One task row to store: its job's sequence number, its index, when it is due, the task.
type TaskInsert<'a> = (i64, i64, Millis, &'a NewTask);

/// Stores task rows in one multi-row INSERT.
async fn insert_tasks(tx: &mut WriteTx, rows: &[TaskInsert<'_>]) -> StoreResult<()> {
    let mut sql =
        String::from("INSERT INTO tasks (job_seq, idx, run_at, endpoint, params, call) VALUES ");
    for i in 0..rows.len() {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?,?)"
        });
    }
    let mut query = sqlx::query(&sql);
    for &(seq, index, run_at, task) in rows {
        query = query
            .bind(seq)
            .bind(index)
            .bind(run_at)
            .bind(task.endpoint.as_str())
            .bind(task.params.get())
            .bind(task.call_json());
    }
    query.execute(tx.conn().await?).await.map_err(map_err)?;
    Ok(())
}

pub(super) async fn get(store: &SqliteStore, id: JobId) -> StoreResult<Option<JobRecord>> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq WHERE j.id = ?"
    );
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&store.reader)
        .await
        .map_err(map_err)?;
    row.as_ref().map(job_from_row).transpose()
}

pub(super) async fn list(store: &SqliteStore, query: &JobListQuery) -> StoreResult<Vec<JobRecord>> {
    // Jobs are numbered in creation order, so "newest first, before X" is by seq. The
    // filters are `JobListQuery::matches` in SQL.
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
         WHERE (?1 IS NULL OR j.status = ?1) \
           AND (?2 IS NULL OR j.seq < (SELECT seq FROM jobs WHERE id = ?2)) \
           AND (?4 IS NULL OR j.owner = ?4) \
           AND (?5 IS NULL OR ?5 = (j.not_before IS NOT NULL AND j.not_before > ?6)) \
           AND (?7 IS NULL OR EXISTS (SELECT 1 FROM json_each(j.metadata) m \
                WHERE m.key = ?7 AND m.type = 'text' AND m.value = ?8)) \
           AND (?9 IS NULL OR json_extract(j.options, '$.group') = ?9) \
         ORDER BY j.seq DESC LIMIT ?3"
    );
    let (status, scheduled) = query.stored_status();
    let (key, value) = query.metadata.clone().unzip();
    let rows = sqlx::query(&sql)
        .bind(status.map(job_code))
        .bind(query.before.map(|id| id.to_string()))
        .bind(i64::from(query.limit))
        .bind(query.owner.as_deref())
        .bind(scheduled)
        .bind(query.now)
        .bind(key)
        .bind(value)
        .bind(query.group.as_deref())
        .fetch_all(&store.reader)
        .await
        .map_err(map_err)?;
    rows.iter().map(job_from_row).collect()
}

pub(super) async fn tasks_page(
    store: &SqliteStore,
    id: JobId,
    query: &TaskPageQuery,
) -> StoreResult<Vec<TaskRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = ?1) \
         AND t.idx > ?2 AND (?3 IS NULL OR t.status = ?3) ORDER BY t.idx LIMIT ?4"
    ))
    .bind(id.to_string())
    .bind(query.after as i64)
    .bind(query.status.map(task_code))
    .bind(i64::from(query.limit))
    .fetch_all(&store.reader)
    .await
    .map_err(map_err)?;
    rows.iter().map(task_from_row).collect()
}

pub(super) async fn tasks_failed_since(
    store: &SqliteStore,
    id: JobId,
    after: u64,
    limit: u32,
) -> StoreResult<Vec<FailedTask>> {
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS}, t.fail_seq FROM tasks t \
         WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = ?) AND t.fail_seq > ? \
           AND t.status = {TASK_FAILED} \
         ORDER BY t.fail_seq LIMIT ?"
    ))
    .bind(id.to_string())
    .bind(after as i64)
    .bind(i64::from(limit))
    .fetch_all(&store.reader)
    .await
    .map_err(map_err)?;
    rows.iter().map(failed_task_from_row).collect()
}

pub(super) async fn delete(store: &SqliteStore, id: JobId) -> StoreResult<DeleteOutcome> {
    let mut tx = store.begin().await?;
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

pub(super) async fn purge(
    store: &SqliteStore,
    finished_before: Millis,
    limit: u32,
) -> StoreResult<u64> {
    static PURGEABLE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT j.seq FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
             WHERE j.finished_at < ? AND j.status IN ({JOB_COMPLETE}, {JOB_FAILED}, {JOB_CANCELLED}) \
               AND (c.state IS NULL OR c.state != {CALLBACK_PENDING}) \
             ORDER BY j.finished_at LIMIT ?"
        )
    });
    let mut tx = store.begin().await?;
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

pub(super) async fn queue_depth(store: &SqliteStore) -> StoreResult<u64> {
    static DEPTH: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT SUM(total - n_running - n_complete - n_failed - n_cancelled) FROM jobs \
             WHERE status IN ({JOB_PENDING}, {JOB_RUNNING})"
        )
    });
    let depth: Option<i64> = sqlx::query_scalar(&DEPTH)
        .fetch_one(&store.reader)
        .await
        .map_err(map_err)?;
    Ok(depth.unwrap_or(0).max(0) as u64)
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
