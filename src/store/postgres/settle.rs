//! Settling: a batch of attempt outcomes stored in one transaction with the job counters
//! they change, the final status and callback records of the jobs they finish; and the
//! outcome an awaited attempt reports later, and its heartbeats, through whichever node.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::Row;

use super::callbacks::insert_callbacks;
use super::{PostgresStore, map_err};
use crate::job::JobId;
use crate::store::codec::{
    Code, TASK_COMPLETE, TASK_FAILED, TASK_PENDING, TASK_RUNNING, job_code, job_status_from,
    parse_id,
};
use crate::store::tally::{Counters, FailNumbers, Tally, Written, numbers_a_failure, settle_of};
use crate::store::{
    HeartbeatOutcome, JobFinished, Millis, NodeId, ReportOutcome, SettleReport, StoreResult,
    TaskHeartbeat, TaskReport, TaskSettle, plan,
};

/// Records outcomes given as arrays, one element per outcome; `$12` is the settling node.
/// Only the attempt that is running matches, and with a node only under that node's lease
/// (a report, without one, settles the attempt whichever node holds it). An awaited
/// attempt stays running, held by no node, `lease_until` its deadline.
static SETTLE_TASKS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE tasks t SET status = v.status, \
         run_at = COALESCE(v.run_at, t.run_at), result = v.result, error = v.error, \
         latency_ms = v.latency_ms, finished_at = v.finished_at, fail_seq = COALESCE(v.fail_seq, t.fail_seq), \
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

/// Settles a batch in one transaction: see [`crate::store::Store::tasks_settle`]. Without
/// `node`, an attempt is settled whichever node holds it (a report).
pub(super) async fn settle(
    store: &PostgresStore,
    node: Option<NodeId>,
    batch: &[TaskSettle],
) -> StoreResult<SettleReport> {
    if batch.is_empty() {
        return Ok(SettleReport::default());
    }
    let mut tally = Tally::default();
    let mut tx = store.begin().await?;

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

    // Failures are numbered per job (see `FailNumbers`), after the highest number of each
    // job with a failure in the batch, looked up in one statement.
    let mut failing: Vec<i64> = batch
        .iter()
        .filter(|s| numbers_a_failure(s))
        .filter_map(|s| seqs.get(&s.job_id).copied())
        .collect();
    failing.sort_unstable();
    failing.dedup();
    let mut fail_numbers = FailNumbers::default();
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
            fail_numbers.starts_after(row.get("seq"), row.get("last"));
        }
    }

    // The outcomes, as arrays, one statement for the whole batch.
    let n = batch.len();
    let mut job_seq = Vec::with_capacity(n);
    let mut idx = Vec::with_capacity(n);
    let mut attempt = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut run_at = Vec::with_capacity(n);
    let mut result = Vec::with_capacity(n);
    let mut error = Vec::with_capacity(n);
    let mut latency = Vec::with_capacity(n);
    let mut finished_at = Vec::with_capacity(n);
    let mut fail_seq = Vec::with_capacity(n);
    let mut lease = Vec::with_capacity(n);
    for s in batch {
        let Some(&seq) = seqs.get(&s.job_id) else {
            continue;
        };
        let w = Written::of(s);
        fail_seq.push(numbers_a_failure(s).then(|| fail_numbers.take(seq)));
        job_seq.push(seq);
        idx.push(s.index as i64);
        attempt.push(s.attempt as i32);
        status.push(w.status);
        run_at.push(w.run_at);
        result.push(w.result);
        error.push(w.error);
        latency.push(s.latency_ms as i64);
        finished_at.push(w.finished_at);
        lease.push(w.lease);
        tally.sent(seq, s);
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
        tally.stored(row.get("job_seq"), row.get::<Code, _>("status"));
    }

    // The jobs' counters; the rows that come back say which jobs this batch finished.
    let (mut d_seq, mut d_settled, mut d_complete, mut d_failed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (seq, d) in tally.changed() {
        d_seq.push(seq);
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
            let counters = Counters {
                status: job_status_from(row.get("status"))?,
                total: row.get("total"),
                complete: row.get("n_complete"),
                failed: row.get("n_failed"),
                tolerated: row.get("tolerated"),
            };
            let Some(status) = counters.finished() else {
                continue;
            };
            // This batch settled the job's last task: its final status and its callback
            // record are written in the same transaction, which holds the job's row since
            // it began, so the job is finished once and the callback owed exactly then.
            let seq: i64 = row.get("seq");
            let now = tally.now(seq);
            finish.0.push(seq);
            finish.1.push(job_code(status));
            finish.2.push(now);
            let has_callback = row.get::<Option<String>, _>("callback_url").is_some();
            if has_callback {
                callbacks.0.push(seq);
                callbacks.1.push(now);
            }
            tally.report.finished.push(JobFinished {
                job_id: parse_id(row.get("id"))?,
                status,
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
        store.callbacks_changed();
    }
    Ok(tally.report)
}

pub(super) async fn report(
    store: &PostgresStore,
    report: &TaskReport,
) -> StoreResult<ReportOutcome> {
    static DONE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT 1 FROM tasks t JOIN jobs j ON j.seq = t.job_seq \
             WHERE j.id = $1::uuid AND t.idx = $2 AND t.attempts = $3 \
               AND t.status IN ({TASK_COMPLETE}, {TASK_FAILED})"
        )
    });
    let applied = settle(store, None, &[settle_of(report)]).await?;
    if applied.complete + applied.failed > 0 {
        return Ok(ReportOutcome::Applied(applied));
    }
    // Not applied: was this attempt's outcome stored already?
    let done: Option<i32> = sqlx::query_scalar(&DONE)
        .bind(report.job_id.to_string())
        .bind(report.index as i64)
        .bind(report.attempt as i32)
        .fetch_optional(&store.pool)
        .await
        .map_err(map_err)?;
    Ok(if done.is_some() {
        ReportOutcome::AlreadyReported
    } else {
        ReportOutcome::Unknown
    })
}

/// `Store::tasks_heartbeat`: the task's row locked while its deadline is reckoned.
pub(super) async fn heartbeat(
    store: &PostgresStore,
    beat: &TaskHeartbeat,
) -> StoreResult<HeartbeatOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) = sqlx::query(
        "SELECT t.job_seq, t.status, t.attempts, t.node, t.run_at, t.lease_until, j.options \
         FROM tasks t JOIN jobs j ON j.seq = t.job_seq WHERE j.id = $1::uuid AND t.idx = $2 \
         FOR UPDATE OF t",
    )
    .bind(beat.job_id.to_string())
    .bind(beat.index as i64)
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(map_err)?
    else {
        tx.rollback().await?;
        return Ok(HeartbeatOutcome::Unknown);
    };
    let status: Code = row.get("status");
    let outcome = if row.get::<i32, _>("attempts") != beat.attempt as i32 {
        Some(HeartbeatOutcome::Unknown)
    } else if status == TASK_PENDING {
        // Taken back: this attempt no longer runs.
        Some(HeartbeatOutcome::Unknown)
    } else if status != TASK_RUNNING {
        Some(HeartbeatOutcome::Finished)
    } else {
        None
    };
    if let Some(outcome) = outcome {
        tx.rollback().await?;
        return Ok(outcome);
    }
    // An awaited attempt (held by no node) of a job with heartbeats lives on, unless its
    // deadline passed already (the sweep records its timeout); never moved back by a
    // heartbeat that comes late.
    let awaited = row
        .get::<Option<i64>, _>("lease_until")
        .filter(|_| row.get::<Option<i64>, _>("node").is_none());
    if awaited.is_some_and(|deadline| deadline <= beat.now) {
        tx.rollback().await?;
        return Ok(HeartbeatOutcome::Unknown);
    }
    let deadline = match awaited {
        Some(deadline) => {
            let options = crate::store::codec::parse_options(row.get("options"))?;
            plan::heartbeat_deadline(&options, row.get("run_at"), beat.now)
                .map(|moved| moved.max(deadline))
        }
        None => None,
    };
    sqlx::query(
        "UPDATE tasks SET progress = COALESCE($3, progress), \
         lease_until = COALESCE($4, lease_until) WHERE job_seq = $1 AND idx = $2",
    )
    .bind(row.get::<i64, _>("job_seq"))
    .bind(beat.index as i64)
    .bind(beat.progress.as_ref().map(|p| p.get()))
    .bind(deadline)
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    tx.commit().await?;
    Ok(HeartbeatOutcome::Alive)
}
