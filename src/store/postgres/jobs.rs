//! Jobs as a whole: submission with its tasks, the reads the API serves, removal (one job,
//! or the retention purge) and the queue depth. Job control is `control`.

use std::sync::LazyLock;

use sqlx::Row;

use super::callbacks::insert_callbacks;
use super::notices::{NOTICE_WORK, notify};
use super::{PostgresStore, map_err};
use crate::job::{JobId, NewJob};
use crate::store::codec::{
    CALLBACK_PENDING, Code, JOB_CANCELLED, JOB_COMPLETE, JOB_FAILED, JOB_PENDING, JOB_RUNNING,
    TASK_FAILED, job_code, job_status_from, parse_id, task_code,
};
use crate::store::rows::{NewJobRow, failed_task_from_row, job_from_row, task_from_row};
use crate::store::{
    DeleteOutcome, FailedTask, IdempotencyKey, InsertOutcome, JobListQuery, JobRecord, Millis,
    StoreResult, TaskPageQuery, TaskRecord,
};

/// Tasks per INSERT when storing a job (two arrays of that many texts).
const INSERT_CHUNK: usize = 5000;

const JOB_COLUMNS: &str = "j.id::text AS id, j.owner, j.status, j.options, j.total, j.n_running, \
     j.n_complete, j.n_failed, j.n_cancelled, j.created_at, j.finished_at, j.callback_url, \
     c.state, c.attempts, c.last_error, j.metadata";

const TASK_COLUMNS: &str = "t.idx, t.status, t.attempts, t.endpoint, t.call, t.result, t.error, \
     t.latency_ms, t.finished_at, t.progress";

pub(super) async fn insert(
    store: &PostgresStore,
    job: &NewJob,
    idempotency: Option<&IdempotencyKey>,
    now: Millis,
) -> StoreResult<InsertOutcome> {
    let new = NewJobRow::of(job, now)?;
    let mut tx = store.begin().await?;
    // A key used before, even by a request committing at this very moment (the insert
    // waits for it), inserts nothing.
    let seq: Option<i64> = sqlx::query_scalar(
        "INSERT INTO jobs (id, status, options, concurrency, tolerated, total, callback_url, \
         created_at, finished_at, idempotency_key, request_hash, owner, metadata, not_before, \
         deadline_at, priority, group_name) \
         VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                 $17) \
         ON CONFLICT ((COALESCE(owner, '')), idempotency_key) \
             WHERE idempotency_key IS NOT NULL DO NOTHING \
         RETURNING seq",
    )
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
    .bind(&new.group)
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
        .fetch_one(&store.pool)
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
        let calls: Vec<Option<String>> = chunk.iter().map(|t| t.call_json()).collect();
        sqlx::query(
            "INSERT INTO tasks (job_seq, idx, run_at, endpoint, params, call) \
             SELECT $1, $2 + u.ord, $3, u.endpoint, u.params, u.call \
             FROM unnest($4::text[], $5::text[], $6::text[]) \
             WITH ORDINALITY AS u(endpoint, params, call, ord)",
        )
        .bind(seq)
        .bind(offset)
        .bind(new.run_at)
        .bind(&endpoints)
        .bind(&params)
        .bind(&calls)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
        offset += chunk.len() as i64;
    }

    let callback_due = new.empty && new.callback_url.is_some();
    if callback_due {
        insert_callbacks(&mut tx, &[seq], &[now]).await?;
    }
    if !new.empty {
        notify(&mut tx, NOTICE_WORK).await?;
    }
    tx.commit().await?;
    if callback_due {
        store.callbacks_changed();
    }
    Ok(InsertOutcome::Inserted)
}

pub(super) async fn get(store: &PostgresStore, id: JobId) -> StoreResult<Option<JobRecord>> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
         WHERE j.id = $1::uuid"
    );
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&store.pool)
        .await
        .map_err(map_err)?;
    row.as_ref().map(job_from_row).transpose()
}

pub(super) async fn list(
    store: &PostgresStore,
    query: &JobListQuery,
) -> StoreResult<Vec<JobRecord>> {
    // Jobs are numbered in creation order, so "newest first, before X" is by seq. The
    // filters are `JobListQuery::matches` in SQL.
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN callbacks c ON c.job_seq = j.seq \
         WHERE ($1::smallint IS NULL OR j.status = $1) \
           AND ($2::text IS NULL OR j.seq < (SELECT seq FROM jobs WHERE id = $2::uuid)) \
           AND ($4::text IS NULL OR j.owner = $4) \
           AND ($5::boolean IS NULL OR $5 = (j.not_before IS NOT NULL AND j.not_before > $6)) \
           AND ($7::text IS NULL OR (jsonb_typeof(j.metadata::jsonb -> $7) = 'string' \
                AND j.metadata::jsonb ->> $7 = $8)) \
           AND ($9::text IS NULL OR j.options::jsonb ->> 'group' = $9) \
         ORDER BY j.seq DESC LIMIT $3"
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
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    rows.iter().map(job_from_row).collect()
}

pub(super) async fn tasks_page(
    store: &PostgresStore,
    id: JobId,
    query: &TaskPageQuery,
) -> StoreResult<Vec<TaskRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks t \
         WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = $1::uuid) \
         AND t.idx > $2 AND ($3::smallint IS NULL OR t.status = $3) ORDER BY t.idx LIMIT $4"
    ))
    .bind(id.to_string())
    .bind(query.after as i64)
    .bind(query.status.map(task_code))
    .bind(i64::from(query.limit))
    .fetch_all(&store.pool)
    .await
    .map_err(map_err)?;
    rows.iter().map(task_from_row).collect()
}

pub(super) async fn tasks_failed_since(
    store: &PostgresStore,
    id: JobId,
    after: u64,
    limit: u32,
) -> StoreResult<Vec<FailedTask>> {
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS}, t.fail_seq FROM tasks t \
         WHERE t.job_seq = (SELECT seq FROM jobs WHERE id = $1::uuid) AND t.fail_seq > $2 \
           AND t.status = {TASK_FAILED} \
         ORDER BY t.fail_seq LIMIT $3"
    ))
    .bind(id.to_string())
    .bind(after as i64)
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await
    .map_err(map_err)?;
    rows.iter().map(failed_task_from_row).collect()
}

pub(super) async fn delete(store: &PostgresStore, id: JobId) -> StoreResult<DeleteOutcome> {
    let mut tx = store.begin().await?;
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

pub(super) async fn purge(
    store: &PostgresStore,
    finished_before: Millis,
    limit: u32,
) -> StoreResult<u64> {
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
    let mut tx = store.begin().await?;
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

pub(super) async fn queue_depth(store: &PostgresStore) -> StoreResult<u64> {
    static DEPTH: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT COALESCE(SUM(total - n_running - n_complete - n_failed - n_cancelled), 0)::bigint \
             FROM jobs WHERE status IN ({JOB_PENDING}, {JOB_RUNNING})"
        )
    });
    let depth: i64 = sqlx::query_scalar(&DEPTH)
        .fetch_one(&store.pool)
        .await
        .map_err(map_err)?;
    Ok(depth.max(0) as u64)
}
