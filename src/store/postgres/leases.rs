//! Running tasks and who holds them: a node renews the leases of its calls while they run,
//! any node takes back the tasks whose lease ran out (their node died or stalled), and
//! awaited attempts past their deadline are leased to a node that records their timeout.
//! At start a node takes back only what has expired: the other nodes may be alive.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use sqlx::Row;

use super::notices::{NOTICE_WORK, notify};
use super::{HINT_FRESH, PostgresStore, map_err};
use crate::store::codec::{TASK_PENDING, TASK_RUNNING, parse_id, parse_options};
use crate::store::rows::ClaimedJob;
use crate::store::{ClaimedTask, Millis, NodeId, OverdueParams, StoreResult};

/// Leases awaited attempts (running, held by no node) whose deadline `$3` passed to node
/// `$1` until `$2`, at most `$4`, skipping those another node is taking right now. Their
/// `run_at` (the latest a heartbeat could have moved the deadline to) becomes now: should
/// this node die before it records the timeout, the task taken back is due at once.
static OVERDUE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE tasks SET node = $1, lease_until = $2, run_at = $3 \
         FROM (SELECT job_seq, idx FROM tasks \
               WHERE status = {TASK_RUNNING} AND node IS NULL AND lease_until <= $3 \
               LIMIT $4 FOR UPDATE SKIP LOCKED) o, jobs j \
         WHERE tasks.job_seq = o.job_seq AND tasks.idx = o.idx AND j.seq = tasks.job_seq \
         RETURNING j.id::text AS id, j.options, j.owner, tasks.idx, tasks.attempts, \
             tasks.attempt_base, tasks.endpoint, tasks.params, tasks.call"
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

pub(super) async fn overdue(
    store: &PostgresStore,
    params: &OverdueParams,
) -> StoreResult<Vec<ClaimedTask>> {
    // Right after [`expire`] (what the lease sweep does), its statement already
    // said whether anything is overdue; a deadline only passes later.
    let hint = store.overdue_hint.lock().expect("not poisoned").take();
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
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    let mut jobs: HashMap<String, ClaimedJob> = HashMap::new();
    let mut tasks = Vec::with_capacity(rows.len());
    for row in rows {
        let id: String = row.get("id");
        if !jobs.contains_key(&id) {
            let job = ClaimedJob {
                id: parse_id(&id)?,
                options: Arc::new(parse_options(row.get("options"))?),
                owner: row.get::<Option<String>, _>("owner").map(Arc::from),
            };
            jobs.insert(id.clone(), job);
        }
        tasks.push(jobs[&id].task(&row)?);
    }
    tasks.sort_by_key(|t| (t.job_id, t.index));
    Ok(tasks)
}

pub(super) async fn renew(store: &PostgresStore, node: NodeId, until: Millis) -> StoreResult<u64> {
    // Tasks locked by a transaction under way (this node's own settle, a cancel) are
    // finishing anyway: skipped rather than waited for.
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

pub(super) async fn expire(store: &PostgresStore, now: Millis) -> StoreResult<u64> {
    // Which jobs have a lease that ran out, and whether an awaited attempt is past its
    // deadline (the sweep asks [`overdue`] next): one statement, all an idle sweep
    // costs.
    let rows = sqlx::query(&LEASES_OUT)
        .bind(now)
        .fetch_all(&store.pool)
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
    *store.overdue_hint.lock().expect("not poisoned") = Some((Instant::now(), now, overdue));
    if seqs.is_empty() {
        return Ok(0);
    }
    let mut tx = store.begin().await?;
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
