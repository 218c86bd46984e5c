//! Job control: a running job's options changed, pause and resume, the retry of a finished
//! job, and its end before all its tasks ran (a cancel, an outcome decided early, its
//! deadline), which tells every node to stop the job's calls. Each locks the job's row.

use std::sync::LazyLock;

use sqlx::Row;

use super::callbacks::insert_callbacks;
use super::notices::{NOTICE_CANCEL, NOTICE_RETRY, NOTICE_WORK, notify};
use super::{PostgresStore, map_err};
use crate::job::{JobId, JobStatus};
use crate::store::codec::{
    CALLBACK_PENDING, Code, JOB_PAUSED, JOB_PENDING, JOB_RUNNING, TASK_CANCELLED, TASK_FAILED,
    TASK_PENDING, TASK_RUNNING, job_code, job_status_from, task_code,
};
use crate::store::{
    CancelOutcome, Millis, OptionsOutcome, PauseOutcome, RetryOutcome, StoreResult, plan,
};

/// The job's row, with `columns`, locked for this transaction: it waits for a claim or a
/// settle of the job under way, and keeps later ones off until the transaction ends.
async fn lock_job(
    tx: &mut super::tx::PgTx,
    id: JobId,
    columns: &str,
) -> StoreResult<Option<sqlx::postgres::PgRow>> {
    sqlx::query(&format!(
        "SELECT {columns} FROM jobs WHERE id = $1::uuid FOR UPDATE"
    ))
    .bind(id.to_string())
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(map_err)
}

/// `Store::job_set_options`: the job row locked; every node is told there may be work (a
/// limit raised).
pub(super) async fn set_options(
    store: &PostgresStore,
    id: JobId,
    seen: &crate::job::JobOptions,
    options: &crate::job::JobOptions,
) -> StoreResult<OptionsOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) = lock_job(&mut tx, id, "seq, status, options, created_at").await? else {
        tx.rollback().await?;
        return Ok(OptionsOutcome::NotFound);
    };
    let status = job_status_from(row.get("status"))?;
    let outcome = if status.is_finished() {
        Some(OptionsOutcome::Finished(status))
    } else if crate::store::codec::parse_options(row.get("options"))? != *seen {
        Some(OptionsOutcome::Changed)
    } else {
        None
    };
    if let Some(outcome) = outcome {
        tx.rollback().await?;
        return Ok(outcome);
    }
    sqlx::query(
        "UPDATE jobs SET options = $2, concurrency = $3, deadline_at = $4, priority = $5 \
         WHERE seq = $1",
    )
    .bind(row.get::<i64, _>("seq"))
    .bind(crate::store::codec::options_text(options)?)
    .bind(options.concurrency.map(i64::from))
    .bind(plan::deadline(options, row.get("created_at")))
    .bind(options.priority)
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    notify(&mut tx, NOTICE_WORK).await?;
    tx.commit().await?;
    Ok(OptionsOutcome::Updated)
}

/// `Store::job_pause`: the job row locked; a resume tells every node there is work.
pub(super) async fn pause(
    store: &PostgresStore,
    id: JobId,
    pause: bool,
) -> StoreResult<PauseOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) = lock_job(&mut tx, id, "seq, status, n_running, n_complete, n_failed").await?
    else {
        tx.rollback().await?;
        return Ok(PauseOutcome::NotFound);
    };
    let count = |name| row.get::<i64, _>(name).max(0) as u64;
    let status = job_status_from(row.get("status"))?;
    let counts = (count("n_running"), count("n_complete"), count("n_failed"));
    let to = match plan::pause_target(status, pause, counts) {
        Ok(to) => to,
        Err(outcome) => {
            tx.rollback().await?;
            return Ok(outcome);
        }
    };
    sqlx::query("UPDATE jobs SET status = $2 WHERE seq = $1")
        .bind(row.get::<i64, _>("seq"))
        .bind(job_code(to))
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    if !pause {
        notify(&mut tx, NOTICE_WORK).await?;
    }
    tx.commit().await?;
    Ok(PauseOutcome::Changed(to))
}

/// `Store::job_retry`: the job row locked (as a cancel does), its tasks requeued, every
/// node told there is work.
pub(super) async fn retry(
    store: &PostgresStore,
    id: JobId,
    include: &[crate::job::TaskStatus],
    now: Millis,
) -> StoreResult<RetryOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) = lock_job(&mut tx, id, "seq, status, options, n_cancelled, created_at").await?
    else {
        tx.rollback().await?;
        return Ok(RetryOutcome::NotFound);
    };
    let seq: i64 = row.get("seq");
    let state: Option<Code> = sqlx::query_scalar("SELECT state FROM callbacks WHERE job_seq = $1")
        .bind(seq)
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(map_err)?;
    let status = job_status_from(row.get("status"))?;
    let cancelled: i64 = row.get("n_cancelled");
    let owed = state == Some(CALLBACK_PENDING);
    if let Err(outcome) = plan::may_retry(status, owed, include, cancelled as u64) {
        tx.rollback().await?;
        return Ok(outcome);
    }
    let codes: Vec<Code> = include.iter().map(|s| task_code(*s)).collect();
    let requeued: Vec<Code> = sqlx::query_scalar(&format!(
        "UPDATE tasks t SET status = {TASK_PENDING}, attempt_base = t.attempts, run_at = $2, \
         finished_at = NULL, node = NULL, lease_until = NULL \
         FROM (SELECT idx, status AS was FROM tasks WHERE job_seq = $1 \
               AND status = ANY($3) FOR UPDATE) old \
         WHERE t.job_seq = $1 AND t.idx = old.idx RETURNING old.was"
    ))
    .bind(seq)
    .bind(now)
    .bind(&codes)
    .fetch_all(tx.conn().await?)
    .await
    .map_err(map_err)?;
    let failed = requeued.iter().filter(|c| **c == TASK_FAILED).count() as i64;
    let cancelled = requeued.iter().filter(|c| **c == TASK_CANCELLED).count() as i64;
    if requeued.is_empty() {
        tx.rollback().await?;
        return Ok(RetryOutcome::NothingToRetry);
    }
    let options = plan::next_run(
        &crate::store::codec::parse_options(row.get("options"))?,
        now,
    );
    let run = options.run();
    let options_text = crate::store::codec::options_text(&options)?;
    sqlx::query(&format!(
        "UPDATE jobs SET status = {JOB_RUNNING}, n_failed = n_failed - $2, \
         n_cancelled = n_cancelled - $3, finished_at = NULL, options = $4, last_claim_at = 0, \
         deadline_at = $5 WHERE seq = $1"
    ))
    .bind(seq)
    .bind(failed)
    .bind(cancelled)
    .bind(options_text)
    .bind(plan::deadline(&options, row.get("created_at")))
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    sqlx::query("DELETE FROM callbacks WHERE job_seq = $1")
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    notify(&mut tx, &format!("{NOTICE_RETRY}{id}")).await?;
    tx.commit().await?;
    Ok(RetryOutcome::Requeued {
        tasks: requeued.len() as u64,
        run,
    })
}

/// `Store::job_end`: the job ends in `status` (Cancelled, or Complete or Failed decided
/// early), its unfinished tasks Cancelled, its callback due, every node told to stop its
/// calls.
pub(super) async fn end(
    store: &PostgresStore,
    id: JobId,
    status: JobStatus,
    now: Millis,
) -> StoreResult<CancelOutcome> {
    let mut tx = store.begin().await?;
    // The job row's lock waits for a claim or settle of this job under way, and keeps
    // later ones off until the cancel is committed.
    let Some(row) = lock_job(&mut tx, id, "seq, status, callback_url").await? else {
        tx.rollback().await?;
        return Ok(CancelOutcome::NotFound);
    };
    let seq: i64 = row.get("seq");
    let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
    let unchanged = match job_status_from(row.get("status"))? {
        same if same == status => Some(CancelOutcome::Cancelled {
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
    const CANCEL_JOB: &str = "UPDATE jobs SET status = $4, n_running = 0, \
         n_cancelled = n_cancelled + $1, finished_at = $2 WHERE seq = $3";
    let cancelled = sqlx::query(&CANCEL_TASKS)
        .bind(now)
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?
        .rows_affected();
    sqlx::query(CANCEL_JOB)
        .bind(cancelled as i64)
        .bind(now)
        .bind(seq)
        .bind(job_code(status))
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
        store.callbacks_changed();
    }
    Ok(CancelOutcome::Cancelled {
        has_callback,
        newly: true,
        tasks: cancelled,
    })
}

/// `Store::jobs_deadline`: from the `jobs_deadline` index, which holds unfinished jobs with
/// a deadline only.
pub(super) async fn deadlines(
    store: &PostgresStore,
    now: Millis,
    limit: u32,
) -> StoreResult<crate::store::Deadlines> {
    static DEADLINES: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT id::text, deadline_at FROM jobs WHERE deadline_at IS NOT NULL \
             AND status IN ({JOB_PENDING}, {JOB_RUNNING}, {JOB_PAUSED}) \
             ORDER BY deadline_at LIMIT $1"
        )
    });
    let rows: Vec<(String, i64)> = sqlx::query_as(&DEADLINES)
        .bind(i64::from(limit) + 1)
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    crate::store::Deadlines::from_earliest(
        now,
        limit,
        rows.iter()
            .map(|(id, at)| Ok((crate::store::codec::parse_id(id)?, *at))),
    )
}

/// `Store::job_expire`: the job row locked (as a cancel does). The unfinished tasks fail in
/// index order, numbered after the job's failures so far (the events stream's cursor).
pub(super) async fn expire(
    store: &PostgresStore,
    id: JobId,
    error: &serde_json::value::RawValue,
    now: Millis,
) -> StoreResult<crate::store::ExpireOutcome> {
    use crate::store::ExpireOutcome;
    let mut tx = store.begin().await?;
    let Some(row) = lock_job(
        &mut tx,
        id,
        "seq, status, callback_url, deadline_at, tolerated, n_failed",
    )
    .await?
    else {
        tx.rollback().await?;
        return Ok(ExpireOutcome::NotDue);
    };
    let status = job_status_from(row.get("status"))?;
    let due = row
        .get::<Option<i64>, _>("deadline_at")
        .is_some_and(|at| at <= now);
    if status.is_finished() || !due {
        tx.rollback().await?;
        return Ok(ExpireOutcome::NotDue);
    }
    let seq: i64 = row.get("seq");
    let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
    // (Claims and settles of the job wait for its row's lock, so its tasks stay as read.)
    let last_failure: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(fail_seq), 0) FROM tasks WHERE job_seq = $1 AND fail_seq IS NOT NULL",
    )
    .bind(seq)
    .fetch_one(tx.conn().await?)
    .await
    .map_err(map_err)?;
    static FAIL_TASKS: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE tasks t SET status = {TASK_FAILED}, error = $1, finished_at = $2, node = NULL, \
             lease_until = NULL, fail_seq = $4 + n.rn \
             FROM (SELECT idx, ROW_NUMBER() OVER (ORDER BY idx) AS rn FROM tasks \
                   WHERE job_seq = $3 AND status IN ({TASK_PENDING}, {TASK_RUNNING})) AS n \
             WHERE t.job_seq = $3 AND t.idx = n.idx"
        )
    });
    let failed = sqlx::query(&FAIL_TASKS)
        .bind(error.get())
        .bind(now)
        .bind(seq)
        .bind(last_failure)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?
        .rows_affected();
    let all_failed = row.get::<i64, _>("n_failed").max(0) as u64 + failed;
    let to = plan::final_status(all_failed, row.get::<i64, _>("tolerated").max(0) as u64);
    sqlx::query(
        "UPDATE jobs SET status = $2, n_running = 0, n_failed = n_failed + $3, finished_at = $4 \
         WHERE seq = $1",
    )
    .bind(seq)
    .bind(job_code(to))
    .bind(failed as i64)
    .bind(now)
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
        store.callbacks_changed();
    }
    Ok(ExpireOutcome::Expired {
        status: to,
        has_callback,
        tasks: failed,
    })
}
