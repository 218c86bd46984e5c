//! The claim: due tasks of the jobs with room, shared between them as `plan` says, leased
//! to the claiming node. The jobs' rows are locked `FOR UPDATE SKIP LOCKED`, so that a
//! job's `concurrency` holds across the cluster and no two nodes get one task.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::Row;

use super::{PostgresStore, job_groups, map_err};
use crate::store::codec::{JOB_PENDING, JOB_RUNNING, TASK_PENDING, TASK_RUNNING};
use crate::store::plan::{self, FairShare};
use crate::store::rows::{self, Candidate};
use crate::store::{Claim, ClaimParams, Millis, StoreResult};

/// How soon a claim that found a job busy (another node was claiming or settling it at that
/// instant) asks to be tried again, rather than at the next idle poll.
const CONTENDED_RETRY_MS: Millis = 50;

/// The jobs a claim may serve: unfinished, with tasks not yet running or done, and room
/// under their concurrency.
fn claimable(j: &str) -> String {
    format!(
        "{j}status IN ({JOB_PENDING}, {JOB_RUNNING}) \
         AND {j}total > {j}n_running + {j}n_complete + {j}n_failed \
         AND ({j}concurrency IS NULL OR {j}n_running < {j}concurrency)"
    )
}

/// Up to `$2` claimable jobs, least recently served first, but for the jobs `$1` and those
/// of the owners `$3`.
static WINDOW_SQL: LazyLock<String> = LazyLock::new(|| window_sql("last_claim_at, seq"));

/// The same, highest priority first.
static PRIORITY_WINDOW_SQL: LazyLock<String> =
    LazyLock::new(|| window_sql("priority DESC, last_claim_at, seq"));

fn window_sql(order: &str) -> String {
    format!(
        "SELECT seq FROM jobs WHERE {} AND id <> ALL($1::uuid[]) \
           AND (owner IS NULL OR owner <> ALL($3::text[])) \
         ORDER BY {order} LIMIT $2",
        claimable("")
    )
}

/// Locks the jobs `$1` that are still claimable, skipping those another transaction holds;
/// with each, its group's own limits, if it has any (`job_groups`).
static LOCK_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT j.seq, j.id::text AS id, j.owner, j.options, j.concurrency, j.n_running, \
         j.priority, j.last_claim_at, j.group_name, g.name AS g_name, \
         g.concurrency AS g_concurrency, g.rate AS g_rate, g.next_start AS g_next_start \
         FROM jobs j LEFT JOIN groups g \
           ON g.owner = COALESCE(j.owner, '') AND g.name = j.group_name \
         WHERE j.seq = ANY($1) AND {} \
         ORDER BY j.last_claim_at, j.seq FOR UPDATE OF j SKIP LOCKED",
        claimable("j.")
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
         RETURNING tasks.job_seq, tasks.idx, tasks.attempts, tasks.attempt_base, \
             tasks.endpoint, tasks.params, tasks.call"
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

pub(super) async fn claim(store: &PostgresStore, params: &ClaimParams) -> StoreResult<Claim> {
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
    let size = i64::from(params.limit) * 2 + 8;
    let mut window: Vec<i64> = sqlx::query_scalar(&WINDOW_SQL)
        .bind(&skip)
        .bind(size)
        .bind(&full_owners)
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    if window.is_empty() {
        return Ok(claim);
    }
    let window_full = window.len() as i64 == size;
    // When more jobs are claimable than that, the highest priorities too (their own
    // index), so that a job of high priority served a moment ago is not left out.
    if window.len() as i64 == size {
        let first: Vec<i64> = sqlx::query_scalar(&PRIORITY_WINDOW_SQL)
            .bind(&skip)
            .bind(size)
            .bind(&full_owners)
            .fetch_all(&store.pool)
            .await
            .map_err(map_err)?;
        let known: std::collections::HashSet<i64> = window.iter().copied().collect();
        window.extend(first.into_iter().filter(|seq| !known.contains(seq)));
    }

    let mut tx = store.begin().await?;
    // Lock them, skipping those another node is claiming or settling right now, and
    // check again under the lock (another node may have filled a job's concurrency).
    let jobs = sqlx::query(&LOCK_SQL)
        .bind(&window)
        .fetch_all(tx.conn().await?)
        .await
        .map_err(map_err)?;
    let contended = jobs.len() < window.len();

    let mut candidates = jobs
        .iter()
        .map(Candidate::from_row)
        .collect::<StoreResult<Vec<_>>>()?;
    let by_seq: HashMap<i64, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.seq, i))
        .collect();

    // The plan says how many tasks each job gives in each round (see `plan`); a round is
    // one statement whatever the number of jobs.
    let levels = plan::levels(
        params.now,
        params.priority_max_wait,
        &candidates
            .iter()
            .map(|c| (c.priority, c.served_at()))
            .collect::<Vec<_>>(),
    );
    let mut plan = FairShare::new(
        u64::from(params.limit),
        candidates
            .iter()
            .zip(&levels)
            .map(|(c, &level)| (c.owner.as_deref(), c.group.as_deref(), c.headroom, level)),
        &params.owners,
    );
    // The groups' limits, each under its lock; a group another claim holds gives nothing.
    let groups = rows::candidate_groups(&candidates);
    let own = job_groups::own_limits(&jobs);
    let (gates, busy) =
        if groups.is_empty() || (own.is_empty() && params.group_concurrency.is_none()) {
            (HashMap::new(), Vec::new())
        } else {
            job_groups::gates(&mut tx, &groups, own, params.group_concurrency).await?
        };
    for (key, gate) in &gates {
        plan.limit_group(key, gate.room(params.now));
    }
    for key in &busy {
        plan.limit_group(key, 0);
    }
    let contended = contended || !busy.is_empty();
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
            claim.tasks.push(candidates[i].task(&row)?);
        }
        for (i, want) in wants {
            plan.got(i, want, got.get(&i).copied().unwrap_or(0));
        }
    }
    // Each job's tasks together, in order (the engine looks its cancel token up once
    // per job); the starts reserved by groups' rates.
    claim.tasks.sort_by_key(|t| (t.job_id, t.index));
    let next_starts = plan::pace(&mut claim, &gates, params.now);
    job_groups::store_starts(&mut tx, &next_starts).await?;

    // The jobs served move to the back of the round robin; so does a job found with
    // nothing due (its tasks all in backoff), so that it cannot starve the jobs behind it.
    let (served, counts): (Vec<i64>, Vec<i64>) = (0..candidates.len())
        .filter(|&i| plan.claimed(i) > 0 || plan.exhausted(i) || plan.held(i))
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
        if let Some(due) = due {
            claim.next_due = Some(claim.next_due.map_or(due, |d| d.min(due)));
        }
    }
    plan.ask_again(&mut claim, params.limit, window_full, params.now);
    tx.commit().await?;
    if contended && claim.tasks.len() < params.limit as usize {
        // A job was busy on another node at that instant: look again soon rather than
        // at the next idle poll.
        let soon = params.now + CONTENDED_RETRY_MS;
        claim.next_due = Some(claim.next_due.map_or(soon, |d| d.min(soon)));
    }
    Ok(claim)
}
