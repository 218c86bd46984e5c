//! Running tasks and who holds them: at start every call of the previous process is taken
//! back, a node renews its leases while its calls run, expired leases are taken back, and
//! awaited attempts past their deadline are leased to a node that records their timeout.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, LazyLock};

use sqlx::Row;

use super::{SqliteStore, map_err};
use crate::store::codec::{
    JOB_PAUSED, JOB_PENDING, JOB_RUNNING, TASK_PENDING, TASK_RUNNING, parse_id, parse_options,
};
use crate::store::rows::ClaimedJob;
use crate::store::{ClaimedTask, Millis, NodeId, OverdueParams, StoreResult};

/// The jobs with calls running, through which the statements below find running tasks by
/// each job's `tasks_due` index rather than by reading every task.
static JOBS_RUNNING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT seq FROM jobs WHERE status IN ({JOB_PENDING}, {JOB_RUNNING}, {JOB_PAUSED}) \
         AND n_running > 0"
    )
});

/// Puts the running tasks that match `which` (a condition on `node` and `lease_until`,
/// with one `?` for `now` when given) back to pending, their interrupted attempt not
/// counted, and takes them off their jobs' running counts: the shared part of
/// [`recover`] and [`expire`]. Attempts awaiting a report (no node, a deadline) never
/// match, so they stay Running and counted. Goes through the jobs with calls running,
/// each job's tasks by the `tasks_due` index.
async fn take_back(store: &SqliteStore, which: &str, now: Option<Millis>) -> StoreResult<u64> {
    let mut tx = store.begin().await?;
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

pub(super) async fn recover(store: &SqliteStore) -> StoreResult<u64> {
    // Every call left running by the previous process, whatever its lease; and rows
    // from before leases existed (no node, no lease).
    take_back(store, "(node IS NOT NULL OR lease_until IS NULL)", None).await
}

pub(super) async fn expire(store: &SqliteStore, now: Millis) -> StoreResult<u64> {
    take_back(store, "node IS NOT NULL AND lease_until < ?", Some(now)).await
}

pub(super) async fn renew(store: &SqliteStore, node: NodeId, until: Millis) -> StoreResult<u64> {
    static RENEW: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE tasks SET lease_until = ? WHERE status = {TASK_RUNNING} AND node = ? \
             AND job_seq IN ({})",
            *JOBS_RUNNING
        )
    });
    // Through the jobs that have calls running: each job's running tasks are found by the
    // `tasks_due` index, never by reading every task.
    let mut tx = store.begin().await?;
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

pub(super) async fn overdue(
    store: &SqliteStore,
    params: &OverdueParams,
) -> StoreResult<Vec<ClaimedTask>> {
    // Awaited attempts: running, held by no node, with a deadline. Found through the
    // jobs with tasks running, each by its `tasks_due` index. Their `run_at` (the latest a
    // heartbeat could have moved the deadline to) becomes now: should this node die before
    // it records the timeout, the task taken back is due at once.
    static OVERDUE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE tasks SET node = ?, lease_until = ?, run_at = ? WHERE rowid IN (\
             SELECT t.rowid FROM jobs j JOIN tasks t ON t.job_seq = j.seq AND t.status = {TASK_RUNNING} \
             WHERE j.status IN ({JOB_PENDING}, {JOB_RUNNING}, {JOB_PAUSED}) AND j.n_running > 0 \
               AND t.node IS NULL \
               AND t.lease_until IS NOT NULL AND t.lease_until <= ? LIMIT ?) \
             RETURNING job_seq, idx, attempts, attempt_base, endpoint, params, call"
        )
    });
    let mut tx = store.begin().await?;
    let rows = sqlx::query(&OVERDUE)
        .bind(params.node.0)
        .bind(params.lease_until)
        .bind(params.now)
        .bind(params.now)
        .bind(i64::from(params.limit))
        .fetch_all(tx.conn().await?)
        .await
        .map_err(map_err)?;
    let mut jobs: HashMap<i64, ClaimedJob> = HashMap::new();
    let mut tasks = Vec::with_capacity(rows.len());
    for row in rows {
        let seq: i64 = row.get("job_seq");
        if let Entry::Vacant(entry) = jobs.entry(seq) {
            let job = sqlx::query("SELECT id, options, owner FROM jobs WHERE seq = ?")
                .bind(seq)
                .fetch_one(tx.conn().await?)
                .await
                .map_err(map_err)?;
            entry.insert(ClaimedJob {
                id: parse_id(job.get("id"))?,
                options: Arc::new(parse_options(job.get("options"))?),
                owner: job.get::<Option<String>, _>("owner").map(Arc::from),
            });
        }
        tasks.push(jobs[&seq].task(&row)?);
    }
    tx.commit().await?;
    Ok(tasks)
}
