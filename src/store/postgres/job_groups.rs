//! Groups of jobs (`options.group`): their own limits, and what a claim reads of them. A
//! claim takes each limited group's advisory lock (`pg_try_advisory_xact_lock`, held to its
//! COMMIT) before it counts the group's calls in flight, so that no two nodes fill one
//! group at once; a group another claim holds is left out of this one, as a locked job is.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::Row;

use super::{PgTx, PostgresStore, map_err};
use crate::job::GroupLimits;
use crate::store::codec::{JOB_PAUSED, JOB_PENDING, JOB_RUNNING};
use crate::store::plan::{GroupGate, GroupKey};
use crate::store::rows::{self, Columns};
use crate::store::{GroupRecord, StoreResult};

/// The unfinished jobs, whose running tasks are a group's calls in flight.
static UNFINISHED: LazyLock<String> =
    LazyLock::new(|| format!("status IN ({JOB_PENDING}, {JOB_RUNNING}, {JOB_PAUSED})"));

/// `Store::group_set`.
pub(super) async fn set(
    store: &PostgresStore,
    owner: Option<&str>,
    name: &str,
    limits: &GroupLimits,
) -> StoreResult<()> {
    // A new rate counts from the last start reserved under the old one (a schedule
    // reserved far ahead under a slow rate gives way to a faster one).
    sqlx::query(
        "INSERT INTO groups (owner, name, concurrency, rate) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (owner, name) DO UPDATE \
         SET concurrency = excluded.concurrency, rate = excluded.rate, \
             next_start = CASE WHEN groups.rate IS NULL OR excluded.rate IS NULL \
                 THEN groups.next_start \
                 ELSE groups.next_start - 1000.0 / groups.rate + 1000.0 / excluded.rate END",
    )
    .bind(owner.unwrap_or_default())
    .bind(name)
    .bind(limits.concurrency.map(i64::from))
    .bind(limits.rate)
    .execute(&store.pool)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// `Store::group_delete`.
pub(super) async fn delete(
    store: &PostgresStore,
    owner: Option<&str>,
    name: &str,
) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM groups WHERE owner = $1 AND name = $2")
        .bind(owner.unwrap_or_default())
        .bind(name)
        .execute(&store.pool)
        .await
        .map_err(map_err)?;
    Ok(done.rows_affected() > 0)
}

/// `Store::groups_list`.
pub(super) async fn list(
    store: &PostgresStore,
    owner: Option<&str>,
    name: Option<&str>,
) -> StoreResult<Vec<GroupRecord>> {
    let owner = owner.unwrap_or_default();
    let own = sqlx::query(
        "SELECT name, concurrency, rate FROM groups \
         WHERE owner = $1 AND ($2::text IS NULL OR name = $2)",
    )
    .bind(owner)
    .bind(name)
    .fetch_all(&store.pool)
    .await
    .map_err(map_err)?
    .iter()
    .map(|row| (row.get::<String, _>("name"), rows::group_limits(row)))
    .collect();
    let counts = sqlx::query(&format!(
        "SELECT group_name, SUM(n_running)::bigint AS running, COUNT(*) AS jobs FROM jobs \
         WHERE group_name IS NOT NULL AND {} AND COALESCE(owner, '') = $1 \
           AND ($2::text IS NULL OR group_name = $2) \
         GROUP BY group_name",
        *UNFINISHED
    ))
    .bind(owner)
    .bind(name)
    .fetch_all(&store.pool)
    .await
    .map_err(map_err)?
    .iter()
    .map(|row| {
        (
            row.get::<String, _>("group_name"),
            row.int("running").max(0) as u64,
            row.int("jobs").max(0) as u64,
        )
    })
    .collect();
    Ok(rows::group_records(own, counts))
}

/// The own limits and next start of the groups of a claim's locked jobs, from the `g_*`
/// columns the claim's lock statement joins to each job.
pub(super) fn own_limits(jobs: &[sqlx::postgres::PgRow]) -> HashMap<GroupKey, (GroupLimits, f64)> {
    jobs.iter()
        .filter_map(|row| {
            let name: String = row.get::<Option<String>, _>("g_name")?;
            let owner = row.get::<Option<String>, _>("owner").unwrap_or_default();
            let limits = GroupLimits {
                concurrency: row.int_or_null("g_concurrency").map(|c| c as u32),
                rate: row.float_or_null("g_rate"),
            };
            Some(((owner, name), (limits, row.get::<f64, _>("g_next_start"))))
        })
        .collect()
}

/// The gates of a claim's groups (`keys`) that have limits (their own, `own`, or the
/// default), each under its advisory lock, with its calls in flight counted once the lock
/// is held; and the limited groups whose lock another claim held, which this claim must
/// leave alone. The limits were read with the jobs, just before the lock (a change
/// committed in between applies from the next claim); a rate's next start is read again
/// under the lock, since another claim may have just moved it.
pub(super) async fn gates(
    tx: &mut PgTx,
    keys: &[GroupKey],
    own: HashMap<GroupKey, (GroupLimits, f64)>,
    default_concurrency: Option<u32>,
) -> StoreResult<(HashMap<GroupKey, GroupGate>, Vec<GroupKey>)> {
    let mut gates = rows::group_gates(keys, &own, default_concurrency);
    if gates.is_empty() {
        return Ok((gates, Vec::new()));
    }
    // One lock per group, from its owner and name; another claim holding one is skipped.
    let mut limited: Vec<GroupKey> = gates.keys().cloned().collect();
    limited.sort();
    let lock_names: Vec<String> = limited
        .iter()
        .map(|(owner, name)| format!("doparallel group {owner}/{name}"))
        .collect();
    let locked: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended(k, 0)) \
         FROM unnest($1::text[]) WITH ORDINALITY AS l(k, i) ORDER BY i",
    )
    .bind(&lock_names)
    .fetch_all(tx.conn().await?)
    .await
    .map_err(map_err)?;
    let mut busy = Vec::new();
    for (key, locked) in limited.iter().zip(locked) {
        if !locked {
            gates.remove(key);
            busy.push(key.clone());
        }
    }
    let paced: Vec<&GroupKey> = gates
        .iter()
        .filter(|(_, g)| g.limits.rate.is_some())
        .map(|(k, _)| k)
        .collect();
    if !paced.is_empty() {
        let owners: Vec<&str> = paced.iter().map(|(o, _)| o.as_str()).collect();
        let names: Vec<&str> = paced.iter().map(|(_, n)| n.as_str()).collect();
        let rows = sqlx::query(
            "SELECT owner, name, next_start FROM groups \
             WHERE (owner, name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        )
        .bind(&owners)
        .bind(&names)
        .fetch_all(tx.conn().await?)
        .await
        .map_err(map_err)?;
        for row in rows {
            let key = (row.get::<String, _>("owner"), row.get::<String, _>("name"));
            if let Some(gate) = gates.get_mut(&key) {
                gate.next_start = row.get::<f64, _>("next_start");
            }
        }
    }
    let names: Vec<&str> = gates.keys().map(|(_, name)| name.as_str()).collect();
    let counts = sqlx::query(&format!(
        "SELECT COALESCE(owner, '') AS owner, group_name, SUM(n_running)::bigint AS running \
         FROM jobs WHERE group_name = ANY($1) AND {} GROUP BY 1, 2",
        *UNFINISHED
    ))
    .bind(&names)
    .fetch_all(tx.conn().await?)
    .await
    .map_err(map_err)?;
    for row in counts {
        let key = (
            row.get::<String, _>("owner"),
            row.get::<String, _>("group_name"),
        );
        if let Some(gate) = gates.get_mut(&key) {
            gate.in_flight = row.int("running").max(0) as u64;
        }
    }
    Ok((gates, busy))
}

/// Stores the rate's next start of each group a claim reserved starts of.
pub(super) async fn store_starts(tx: &mut PgTx, next: &[(GroupKey, f64)]) -> StoreResult<()> {
    if next.is_empty() {
        return Ok(());
    }
    let owners: Vec<&str> = next.iter().map(|((o, _), _)| o.as_str()).collect();
    let names: Vec<&str> = next.iter().map(|((_, n), _)| n.as_str()).collect();
    let starts: Vec<f64> = next.iter().map(|(_, s)| *s).collect();
    sqlx::query(
        "UPDATE groups SET next_start = s.next_start \
         FROM unnest($1::text[], $2::text[], $3::float8[]) AS s(owner, name, next_start) \
         WHERE groups.owner = s.owner AND groups.name = s.name",
    )
    .bind(&owners)
    .bind(&names)
    .bind(&starts)
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    Ok(())
}
