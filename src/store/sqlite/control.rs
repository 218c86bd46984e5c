//! Job control: a running job's options changed, pause and resume, the retry of a finished
//! job, and its end before all its tasks ran (a cancel, an outcome decided early, its
//! deadline).

use std::sync::LazyLock;

use sqlx::Row;

use super::callbacks::insert_callbacks;
use super::{SqliteStore, map_err};
use crate::job::{JobId, JobStatus};
use crate::store::codec::{
    CALLBACK_PENDING, Code, JOB_PAUSED, JOB_PENDING, JOB_RUNNING, TASK_CANCELLED, TASK_FAILED,
    TASK_PENDING, TASK_RUNNING, job_code, job_status_from, task_code,
};
use crate::store::{
    CancelOutcome, Millis, OptionsOutcome, PauseOutcome, RetryOutcome, StoreResult, plan,
};

/// `Store::job_set_options`: one write transaction.
pub(super) async fn set_options(
    store: &SqliteStore,
    id: JobId,
    seen: &crate::job::JobOptions,
    options: &crate::job::JobOptions,
) -> StoreResult<OptionsOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) = sqlx::query("SELECT seq, status, options, created_at FROM jobs WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(tx.conn().await?)
        .await
        .map_err(map_err)?
    else {
        return Ok(OptionsOutcome::NotFound);
    };
    let status = job_status_from(row.get("status"))?;
    if status.is_finished() {
        return Ok(OptionsOutcome::Finished(status));
    }
    if crate::store::codec::parse_options(row.get("options"))? != *seen {
        return Ok(OptionsOutcome::Changed);
    }
    sqlx::query(
        "UPDATE jobs SET options = ?, concurrency = ?, deadline_at = ?, priority = ? WHERE seq = ?",
    )
    .bind(crate::store::codec::options_text(options)?)
    .bind(options.concurrency.map(i64::from))
    .bind(plan::deadline(options, row.get("created_at")))
    .bind(options.priority)
    .bind(row.get::<i64, _>("seq"))
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    tx.commit().await?;
    Ok(OptionsOutcome::Updated)
}

/// `Store::job_pause`: one write transaction.
pub(super) async fn pause(
    store: &SqliteStore,
    id: JobId,
    pause: bool,
) -> StoreResult<PauseOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) =
        sqlx::query("SELECT seq, status, n_running, n_complete, n_failed FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(tx.conn().await?)
            .await
            .map_err(map_err)?
    else {
        return Ok(PauseOutcome::NotFound);
    };
    let count = |name| row.get::<i64, _>(name).max(0) as u64;
    let status = job_status_from(row.get("status"))?;
    let counts = (count("n_running"), count("n_complete"), count("n_failed"));
    let to = match plan::pause_target(status, pause, counts) {
        Ok(to) => to,
        Err(outcome) => return Ok(outcome),
    };
    sqlx::query("UPDATE jobs SET status = ? WHERE seq = ?")
        .bind(job_code(to))
        .bind(row.get::<i64, _>("seq"))
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    tx.commit().await?;
    Ok(PauseOutcome::Changed(to))
}

/// `Store::job_retry`: one write transaction.
pub(super) async fn retry(
    store: &SqliteStore,
    id: JobId,
    include: &[crate::job::TaskStatus],
    now: Millis,
) -> StoreResult<RetryOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) = sqlx::query(
        "SELECT j.seq, j.status, j.options, j.n_cancelled, j.created_at, c.state FROM jobs j \
         LEFT JOIN callbacks c ON c.job_seq = j.seq WHERE j.id = ?",
    )
    .bind(id.to_string())
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(map_err)?
    else {
        return Ok(RetryOutcome::NotFound);
    };
    let seq: i64 = row.get("seq");
    let owed = row.get::<Option<Code>, _>("state") == Some(CALLBACK_PENDING);
    let status = job_status_from(row.get("status"))?;
    let cancelled: i64 = row.get("n_cancelled");
    if let Err(outcome) = plan::may_retry(status, owed, include, cancelled as u64) {
        return Ok(outcome);
    }
    let codes: Vec<String> = include.iter().map(|s| task_code(*s).to_string()).collect();
    let codes = codes.join(",");
    let counts: Vec<(Code, i64)> = sqlx::query_as(&format!(
        "SELECT status, COUNT(*) FROM tasks WHERE job_seq = ? AND status IN ({codes}) \
         GROUP BY status"
    ))
    .bind(seq)
    .fetch_all(tx.conn().await?)
    .await
    .map_err(map_err)?;
    let count_of = |code| {
        counts
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    };
    let (failed, cancelled) = (count_of(TASK_FAILED), count_of(TASK_CANCELLED));
    if failed + cancelled == 0 {
        return Ok(RetryOutcome::NothingToRetry);
    }
    sqlx::query(&format!(
        "UPDATE tasks SET status = {TASK_PENDING}, attempt_base = attempts, run_at = ?, \
         finished_at = NULL, node = NULL, lease_until = NULL \
         WHERE job_seq = ? AND status IN ({codes})"
    ))
    .bind(now)
    .bind(seq)
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    let options = plan::next_run(
        &crate::store::codec::parse_options(row.get("options"))?,
        now,
    );
    let run = options.run();
    let options_text = crate::store::codec::options_text(&options)?;
    sqlx::query(&format!(
        "UPDATE jobs SET status = {JOB_RUNNING}, n_failed = n_failed - ?, \
         n_cancelled = n_cancelled - ?, finished_at = NULL, options = ?, last_claim_at = 0, \
         deadline_at = ? WHERE seq = ?"
    ))
    .bind(failed)
    .bind(cancelled)
    .bind(options_text)
    .bind(plan::deadline(&options, row.get("created_at")))
    .bind(seq)
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    sqlx::query("DELETE FROM callbacks WHERE job_seq = ?")
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    tx.commit().await?;
    Ok(RetryOutcome::Requeued {
        tasks: (failed + cancelled) as u64,
        run,
    })
}

/// `Store::job_end`: the job ends in `status` (Cancelled, or Complete or Failed decided
/// early), its unfinished tasks Cancelled, its callback due; one write transaction.
pub(super) async fn end(
    store: &SqliteStore,
    id: JobId,
    status: JobStatus,
    now: Millis,
) -> StoreResult<CancelOutcome> {
    let mut tx = store.begin().await?;
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
        same if same == status => {
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
    const CANCEL_JOB: &str = "UPDATE jobs SET status = ?, n_running = 0, \
         n_cancelled = n_cancelled + ?, finished_at = ? WHERE seq = ?";
    let cancelled = sqlx::query(&CANCEL_TASKS)
        .bind(now)
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?
        .rows_affected();
    sqlx::query(CANCEL_JOB)
        .bind(job_code(status))
        .bind(cancelled as i64)
        .bind(now)
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    if has_callback {
        insert_callbacks(&mut tx, &[(seq, now)]).await?;
    }
    tx.commit().await?;
    Ok(CancelOutcome::Cancelled {
        has_callback,
        newly: true,
        tasks: cancelled,
    })
}

/// `Store::jobs_deadline`: from the `jobs_deadline` index, which holds unfinished jobs with
/// a deadline only.
pub(super) async fn deadlines(
    store: &SqliteStore,
    now: Millis,
    limit: u32,
) -> StoreResult<crate::store::Deadlines> {
    static DEADLINES: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT id, deadline_at FROM jobs WHERE deadline_at IS NOT NULL \
             AND status IN ({JOB_PENDING}, {JOB_RUNNING}, {JOB_PAUSED}) \
             ORDER BY deadline_at LIMIT ?"
        )
    });
    let rows: Vec<(String, i64)> = sqlx::query_as(&DEADLINES)
        .bind(i64::from(limit) + 1)
        .fetch_all(&store.reader)
        .await
        .map_err(map_err)?;
    crate::store::Deadlines::from_earliest(
        now,
        limit,
        rows.iter()
            .map(|(id, at)| Ok((crate::store::codec::parse_id(id)?, *at))),
    )
}

/// `Store::job_expire`: one write transaction. The unfinished tasks fail in index order,
/// numbered after the job's failures so far (the events stream's cursor).
pub(super) async fn expire(
    store: &SqliteStore,
    id: JobId,
    error: &serde_json::value::RawValue,
    now: Millis,
) -> StoreResult<crate::store::ExpireOutcome> {
    use crate::store::ExpireOutcome;
    let mut tx = store.begin().await?;
    let Some(row) = sqlx::query(
        "SELECT seq, status, callback_url, deadline_at, tolerated, n_failed FROM jobs WHERE id = ?",
    )
    .bind(id.to_string())
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(map_err)?
    else {
        return Ok(ExpireOutcome::NotDue);
    };
    let status = job_status_from(row.get("status"))?;
    let due = row
        .get::<Option<i64>, _>("deadline_at")
        .is_some_and(|at| at <= now);
    if status.is_finished() || !due {
        return Ok(ExpireOutcome::NotDue);
    }
    let seq: i64 = row.get("seq");
    let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
    let last_failure: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(fail_seq), 0) FROM tasks WHERE job_seq = ? AND fail_seq IS NOT NULL",
    )
    .bind(seq)
    .fetch_one(tx.conn().await?)
    .await
    .map_err(map_err)?;
    static FAIL_TASKS: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE tasks SET status = {TASK_FAILED}, error = ?, finished_at = ?, node = NULL, \
             lease_until = NULL, \
             fail_seq = ? + n.rn \
             FROM (SELECT idx, ROW_NUMBER() OVER (ORDER BY idx) AS rn FROM tasks \
                   WHERE job_seq = ? AND status IN ({TASK_PENDING}, {TASK_RUNNING})) AS n \
             WHERE tasks.job_seq = ? AND tasks.idx = n.idx"
        )
    });
    let failed = sqlx::query(&FAIL_TASKS)
        .bind(error.get())
        .bind(now)
        .bind(last_failure)
        .bind(seq)
        .bind(seq)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?
        .rows_affected();
    let all_failed = row.get::<i64, _>("n_failed").max(0) as u64 + failed;
    let to = plan::final_status(all_failed, row.get::<i64, _>("tolerated").max(0) as u64);
    sqlx::query(
        "UPDATE jobs SET status = ?, n_running = 0, n_failed = n_failed + ?, finished_at = ? \
         WHERE seq = ?",
    )
    .bind(job_code(to))
    .bind(failed as i64)
    .bind(now)
    .bind(seq)
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    if has_callback {
        insert_callbacks(&mut tx, &[(seq, now)]).await?;
    }
    tx.commit().await?;
    Ok(ExpireOutcome::Expired {
        status: to,
        has_callback,
        tasks: failed,
    })
}
