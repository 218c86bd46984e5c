//! Settling: a batch of attempt outcomes stored in one transaction with the job counters
//! they change, the final status and callback record of the jobs they finish; and the
//! outcome an awaited attempt reports later, and its heartbeats.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::Row;

use super::callbacks::insert_callbacks;
use super::{SETTLE_CHUNK, SqliteStore, map_err};
use crate::job::JobId;
use crate::store::codec::{
    Code, TASK_COMPLETE, TASK_FAILED, TASK_PENDING, TASK_RUNNING, job_code, job_status_from,
    parse_id,
};
use crate::store::tally::{Counters, FailNumbers, Tally, Written, numbers_a_failure, settle_of};
use crate::store::{
    HeartbeatOutcome, JobFinished, NodeId, ReportOutcome, SettleReport, StoreResult, TaskHeartbeat,
    TaskReport, TaskSettle, plan,
};

/// Settles a batch in one transaction: see [`crate::store::Store::tasks_settle`]. Without
/// `node`, an attempt is settled whichever node holds it (a report).
pub(super) async fn settle(
    store: &SqliteStore,
    node: Option<NodeId>,
    batch: &[TaskSettle],
) -> StoreResult<SettleReport> {
    if batch.is_empty() {
        return Ok(SettleReport::default());
    }
    let mut tally = Tally::default();
    let mut tx = store.begin().await?;

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

    // Failures are numbered per job (see `FailNumbers`). Few batches hold failures, so the
    // highest number so far is looked up per job.
    let mut fail_numbers = FailNumbers::default();
    for s in batch {
        let Some(&seq) = seqs.get(&s.job_id) else {
            continue;
        };
        if numbers_a_failure(s) && !fail_numbers.knows(seq) {
            let last: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(fail_seq), 0) FROM tasks \
                 WHERE job_seq = ? AND fail_seq IS NOT NULL",
            )
            .bind(seq)
            .fetch_one(tx.conn().await?)
            .await
            .map_err(map_err)?;
            fail_numbers.starts_after(seq, last);
        }
    }

    // The outcomes, a chunk per statement: a VALUES table joined to the tasks. Only the
    // attempt that is running, under this node's lease, may settle a task: a stale
    // outcome (from before a restart, after a cancel or after the lease was taken back)
    // matches no row and changes nothing, so each result is stored once. Jobs purged
    // meanwhile have no sequence number and are skipped.
    let live: Vec<(i64, &TaskSettle)> = batch
        .iter()
        .filter_map(|s| seqs.get(&s.job_id).map(|&seq| (seq, s)))
        .collect();
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
             finished_at = v.finished_at, fail_seq = COALESCE(v.fail_seq, tasks.fail_seq), node = NULL, \
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
            let w = Written::of(s);
            let fail_seq = numbers_a_failure(s).then(|| fail_numbers.take(seq));
            tally.sent(seq, s);
            query = query
                .bind(seq)
                .bind(s.index as i64)
                .bind(i64::from(s.attempt))
                .bind(w.status)
                .bind(w.run_at)
                .bind(w.result)
                .bind(w.error)
                .bind(s.latency_ms as i64)
                .bind(w.finished_at)
                .bind(fail_seq)
                .bind(w.lease);
        }
        // The last placeholder, after every VALUES row.
        if let Some(node) = node {
            query = query.bind(node.0);
        }
        for row in query.fetch_all(tx.conn().await?).await.map_err(map_err)? {
            tally.stored(row.get(0), row.get::<Code, _>(1));
        }
    }

    // The jobs' counters, a chunk of jobs per statement; the rows that come back say
    // which jobs this batch finished.
    let changed = tally.changed();
    let mut finished = Vec::new();
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
            let counters = Counters {
                status: job_status_from(row.get("status"))?,
                total: row.get("total"),
                complete: row.get("n_complete"),
                failed: row.get("n_failed"),
                tolerated: row.get("tolerated"),
            };
            if let Some(status) = counters.finished() {
                finished.push((
                    row.get::<i64, _>("seq"),
                    parse_id(row.get("id"))?,
                    status,
                    row.get::<Option<String>, _>("callback_url").is_some(),
                ));
            }
        }
    }
    // This batch settled these jobs' last tasks: their final status and their callback
    // records are written in the same transaction, so a callback is owed exactly when its
    // job is finished. A chunk of jobs per statement: a batch of small jobs finishes many.
    for chunk in finished.chunks(SETTLE_CHUNK) {
        let mut sql = String::from("WITH f(seq, status, finished_at) AS (VALUES ");
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 { "(?,?,?)" } else { ",(?,?,?)" });
        }
        sql.push_str(
            ") UPDATE jobs SET status = f.status, finished_at = f.finished_at \
             FROM f WHERE jobs.seq = f.seq",
        );
        let mut query = sqlx::query(&sql);
        for &(seq, _, status, _) in chunk {
            query = query.bind(seq).bind(job_code(status)).bind(tally.now(seq));
        }
        query.execute(tx.conn().await?).await.map_err(map_err)?;
    }
    let callbacks: Vec<(i64, i64)> = finished
        .iter()
        .filter(|(_, _, _, has_callback)| *has_callback)
        .map(|&(seq, ..)| (seq, tally.now(seq)))
        .collect();
    insert_callbacks(&mut tx, &callbacks).await?;
    for (_, job_id, status, has_callback) in finished {
        tally.report.finished.push(JobFinished {
            job_id,
            status,
            has_callback,
        });
    }
    tx.commit().await?;
    Ok(tally.report)
}

pub(super) async fn report(store: &SqliteStore, report: &TaskReport) -> StoreResult<ReportOutcome> {
    static DONE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT 1 FROM tasks t JOIN jobs j ON j.seq = t.job_seq \
             WHERE j.id = ? AND t.idx = ? AND t.attempts = ? \
               AND t.status IN ({TASK_COMPLETE}, {TASK_FAILED})"
        )
    });
    let applied = settle(store, None, &[settle_of(report)]).await?;
    if applied.complete + applied.failed > 0 {
        return Ok(ReportOutcome::Applied(applied));
    }
    // Not applied: was this attempt's outcome stored already?
    let done: Option<i64> = sqlx::query_scalar(&DONE)
        .bind(report.job_id.to_string())
        .bind(report.index as i64)
        .bind(i64::from(report.attempt))
        .fetch_optional(&store.reader)
        .await
        .map_err(map_err)?;
    Ok(if done.is_some() {
        ReportOutcome::AlreadyReported
    } else {
        ReportOutcome::Unknown
    })
}

/// `Store::tasks_heartbeat`: one write transaction.
pub(super) async fn heartbeat(
    store: &SqliteStore,
    beat: &TaskHeartbeat,
) -> StoreResult<HeartbeatOutcome> {
    let mut tx = store.begin().await?;
    let Some(row) = sqlx::query(
        "SELECT t.job_seq, t.status, t.attempts, t.node, t.run_at, t.lease_until, j.options \
         FROM tasks t JOIN jobs j ON j.seq = t.job_seq WHERE j.id = ? AND t.idx = ?",
    )
    .bind(beat.job_id.to_string())
    .bind(beat.index as i64)
    .fetch_optional(tx.conn().await?)
    .await
    .map_err(map_err)?
    else {
        return Ok(HeartbeatOutcome::Unknown);
    };
    let status: Code = row.get("status");
    if row.get::<i64, _>("attempts") != i64::from(beat.attempt) {
        return Ok(HeartbeatOutcome::Unknown);
    }
    if status != TASK_RUNNING {
        // This attempt's outcome is stored (a pending task with the same count was taken
        // back: its attempt no longer runs).
        return Ok(if status == TASK_PENDING {
            HeartbeatOutcome::Unknown
        } else {
            HeartbeatOutcome::Finished
        });
    }
    // An awaited attempt (held by no node) of a job with heartbeats lives on, unless its
    // deadline passed already (the sweep records its timeout); never moved back by a
    // heartbeat that comes late.
    let awaited = row
        .get::<Option<i64>, _>("lease_until")
        .filter(|_| row.get::<Option<i64>, _>("node").is_none());
    if awaited.is_some_and(|deadline| deadline <= beat.now) {
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
    sqlx::query(&format!(
        "UPDATE tasks SET progress = COALESCE(?, progress), \
         lease_until = COALESCE(?, lease_until) \
         WHERE job_seq = ? AND idx = ? AND status = {TASK_RUNNING} AND attempts = ?"
    ))
    .bind(beat.progress.as_ref().map(|p| p.get()))
    .bind(deadline)
    .bind(row.get::<i64, _>("job_seq"))
    .bind(beat.index as i64)
    .bind(i64::from(beat.attempt))
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    tx.commit().await?;
    Ok(HeartbeatOutcome::Alive)
}
