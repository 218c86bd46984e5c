//! The claim: due tasks of the jobs with room, shared between them as `plan` says, marked
//! running and leased to the claiming node in one write transaction.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::Row;

use super::{SETTLE_CHUNK, SqliteStore, job_groups, map_err};
use crate::store::codec::{JOB_PENDING, JOB_RUNNING, TASK_PENDING, TASK_RUNNING};
use crate::store::plan::{self, FairShare};
use crate::store::rows::{self, Candidate};
use crate::store::{Claim, ClaimParams, StoreResult};

/// Jobs served by one claim statement.
const CLAIM_GROUP: usize = 16;

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
         RETURNING job_seq, idx, attempts, attempt_base, endpoint, params, call",
        picks.join(" UNION ALL ")
    )
});

pub(super) async fn claim(store: &SqliteStore, params: &ClaimParams) -> StoreResult<Claim> {
    let mut claim = Claim::default();
    if params.limit == 0 {
        return Ok(claim);
    }
    // Most empty claims (a settle wakes the dispatcher whether or not anything is left to
    // claim) end here, on a reader, without taking the one writer from submissions,
    // settles and callbacks. A job committed after this look signals the dispatcher, which
    // claims again.
    static ANY: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT 1 FROM jobs WHERE status IN ({JOB_PENDING}, {JOB_RUNNING}) \
             AND total > n_running + n_complete + n_failed \
             AND (concurrency IS NULL OR n_running < concurrency) \
             AND (not_before IS NULL OR not_before <= ?) LIMIT 1"
        )
    });
    let any: Option<i64> = sqlx::query_scalar(&ANY)
        .bind(params.now)
        .fetch_optional(&store.reader)
        .await
        .map_err(map_err)?;
    if any.is_none() {
        return Ok(claim);
    }
    let mut tx = store.begin().await?;
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
    // When more jobs are claimable than that, the highest priorities too (their own
    // index), so that a job of high priority served a moment ago is not left out.
    let window = i64::from(params.limit) * 2 + 8;
    let mut jobs = Vec::new();
    let mut window_full = false;
    for order in ["last_claim_at, seq", "priority DESC, last_claim_at, seq"] {
        let sql = format!(
            "SELECT seq, id, owner, options, concurrency, n_running, priority, last_claim_at, \
             group_name, total - n_running - n_complete - n_failed AS pending FROM jobs \
             WHERE status IN ({JOB_PENDING}, {JOB_RUNNING}) AND total > n_running + n_complete + n_failed \
               AND (concurrency IS NULL OR n_running < concurrency) {skip}\
             ORDER BY {order} LIMIT ?"
        );
        let mut query = sqlx::query(&sql);
        for id in &params.skip_jobs {
            query = query.bind(id.to_string());
        }
        for owner in &full_owners {
            query = query.bind(owner);
        }
        let rows = query
            .bind(window)
            .fetch_all(tx.conn().await?)
            .await
            .map_err(map_err)?;
        let full = rows.len() as i64 == window;
        window_full |= full;
        jobs.extend(rows);
        if !full {
            break;
        }
    }
    let mut candidates: Vec<Candidate> = Vec::with_capacity(jobs.len());
    // Each job's tasks not yet claimed, due or in backoff.
    let mut pending = Vec::with_capacity(jobs.len());
    let mut seen = std::collections::HashSet::with_capacity(jobs.len());
    for row in &jobs {
        if seen.insert(row.get::<i64, _>("seq")) {
            candidates.push(Candidate::from_row(row)?);
            pending.push(row.get::<i64, _>("pending").max(0) as u64);
        }
    }
    let levels = plan::levels(
        params.now,
        params.priority_max_wait,
        &candidates
            .iter()
            .map(|c| (c.priority, c.served_at()))
            .collect::<Vec<_>>(),
    );

    // The plan says how many tasks each job gives in each round (see `plan`); the jobs of
    // a round are served CLAIM_GROUP at a time by one statement (a UNION of per-job
    // picks), so a claim over many small jobs costs few statements.
    let mut plan = FairShare::new(
        u64::from(params.limit),
        candidates
            .iter()
            .zip(&levels)
            .map(|(c, &level)| (c.owner.as_deref(), c.group.as_deref(), c.headroom, level)),
        &params.owners,
    );
    // The groups' limits, read in this transaction: no other claim runs meanwhile.
    let groups = rows::candidate_groups(&candidates);
    let gates = if groups.is_empty() {
        HashMap::new()
    } else {
        job_groups::gates(store, &mut tx, &groups, params.group_concurrency).await?
    };
    for (key, gate) in &gates {
        plan.limit_group(key, gate.room(params.now));
    }
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
                claim.tasks.push(candidates[i].task(&row)?);
            }
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

    // The served jobs' counters and places in the round-robin, a chunk of jobs per
    // statement (a claim over many small jobs serves hundreds).
    let served: Vec<(i64, u64)> = (0..candidates.len())
        .filter(|&i| plan.claimed(i) > 0 || plan.exhausted(i) || plan.held(i))
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
        if plan.exhausted(i) && pending[i] > plan.claimed(i) {
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
    plan.ask_again(&mut claim, params.limit, window_full, params.now);
    tx.commit().await?;
    Ok(claim)
}
