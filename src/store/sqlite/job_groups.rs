//! Groups of jobs (`options.group`): their own limits, and what a claim reads of them. A
//! claim reads and writes its groups in its own write transaction; SQLite's one writer is
//! the groups' lock. The store keeps which groups have limits of their own in memory
//! (`SqliteStore::limited_groups`), so that a claim over groups without limits (and
//! without `--group-concurrency`) reads no group row.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use sqlx::Row;

use super::{SqliteStore, WriteTx, map_err};
use crate::job::GroupLimits;
use crate::store::codec::{JOB_PAUSED, JOB_PENDING, JOB_RUNNING};
use crate::store::plan::{GroupGate, GroupKey};
use crate::store::rows::{self, Columns};
use crate::store::{GroupRecord, StoreResult};

/// The unfinished jobs, whose running tasks are a group's calls in flight.
static UNFINISHED: LazyLock<String> =
    LazyLock::new(|| format!("status IN ({JOB_PENDING}, {JOB_RUNNING}, {JOB_PAUSED})"));

/// The groups with limits of their own, read at open.
pub(super) async fn limited(reader: &sqlx::SqlitePool) -> StoreResult<HashSet<GroupKey>> {
    let rows = sqlx::query("SELECT owner, name FROM groups")
        .fetch_all(reader)
        .await
        .map_err(map_err)?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<String, _>("owner"), row.get::<String, _>("name")))
        .collect())
}

/// `Store::group_set`.
pub(super) async fn set(
    store: &SqliteStore,
    owner: Option<&str>,
    name: &str,
    limits: &GroupLimits,
) -> StoreResult<()> {
    let mut tx = store.begin().await?;
    // A new rate counts from the last start reserved under the old one (a schedule
    // reserved far ahead under a slow rate gives way to a faster one).
    sqlx::query(
        "INSERT INTO groups (owner, name, concurrency, rate) VALUES (?, ?, ?, ?) \
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
    .execute(tx.conn().await?)
    .await
    .map_err(map_err)?;
    // Known to claims before the COMMIT, under the writer, so that the copy follows the
    // order of the writes (a group known but without a row only costs a claim a read).
    let key = crate::store::plan::group_key(owner, name);
    store.limited_groups.write().expect("groups").insert(key);
    tx.commit().await
}

/// `Store::group_delete`.
pub(super) async fn delete(
    store: &SqliteStore,
    owner: Option<&str>,
    name: &str,
) -> StoreResult<bool> {
    let mut tx = store.begin().await?;
    let done = sqlx::query("DELETE FROM groups WHERE owner = ? AND name = ?")
        .bind(owner.unwrap_or_default())
        .bind(name)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    // Forgotten under the writer too; known again should the COMMIT fail.
    let key = crate::store::plan::group_key(owner, name);
    let known = store.limited_groups.write().expect("groups").remove(&key);
    if let Err(e) = tx.commit().await {
        if known {
            store.limited_groups.write().expect("groups").insert(key);
        }
        return Err(e);
    }
    Ok(done.rows_affected() > 0)
}

/// `Store::groups_list`, on a reader.
pub(super) async fn list(
    store: &SqliteStore,
    owner: Option<&str>,
    name: Option<&str>,
) -> StoreResult<Vec<GroupRecord>> {
    let owner = owner.unwrap_or_default();
    let own = sqlx::query(
        "SELECT name, concurrency, rate FROM groups WHERE owner = ?1 AND (?2 IS NULL OR name = ?2)",
    )
    .bind(owner)
    .bind(name)
    .fetch_all(&store.reader)
    .await
    .map_err(map_err)?
    .iter()
    .map(|row| (row.get::<String, _>("name"), rows::group_limits(row)))
    .collect();
    let counts = sqlx::query(&format!(
        "SELECT group_name, SUM(n_running) AS running, COUNT(*) AS jobs FROM jobs \
         WHERE group_name IS NOT NULL AND {} AND COALESCE(owner, '') = ?1 \
           AND (?2 IS NULL OR group_name = ?2) \
         GROUP BY group_name",
        *UNFINISHED
    ))
    .bind(owner)
    .bind(name)
    .fetch_all(&store.reader)
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

/// The gates of a claim's groups (`keys`) that have limits, with their calls in flight,
/// read in the claim's transaction.
pub(super) async fn gates(
    store: &SqliteStore,
    tx: &mut WriteTx,
    keys: &[GroupKey],
    default_concurrency: Option<u32>,
) -> StoreResult<HashMap<GroupKey, GroupGate>> {
    let mut own = HashMap::new();
    let with_rows: Vec<GroupKey> = {
        let limited = store.limited_groups.read().expect("groups");
        keys.iter()
            .filter(|k| limited.contains(*k))
            .cloned()
            .collect()
    };
    if with_rows.is_empty() && default_concurrency.is_none() {
        return Ok(HashMap::new());
    }
    for chunk in with_rows.chunks(400) {
        let sql = format!(
            "SELECT owner, name, concurrency, rate, next_start FROM groups \
             WHERE (owner, name) IN (VALUES {})",
            vec!["(?, ?)"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(&sql);
        for (owner, name) in chunk {
            query = query.bind(owner).bind(name);
        }
        for row in query.fetch_all(tx.conn().await?).await.map_err(map_err)? {
            let key = (row.get::<String, _>("owner"), row.get::<String, _>("name"));
            own.insert(
                key,
                (rows::group_limits(&row), row.get::<f64, _>("next_start")),
            );
        }
    }
    let mut gates = rows::group_gates(keys, &own, default_concurrency);
    let names: Vec<String> = gates.keys().map(|(_, name)| name.clone()).collect();
    for chunk in names.chunks(400) {
        let sql = format!(
            "SELECT COALESCE(owner, '') AS owner, group_name, SUM(n_running) AS running \
             FROM jobs WHERE group_name IN ({}) AND {} GROUP BY 1, 2",
            vec!["?"; chunk.len()].join(", "),
            *UNFINISHED
        );
        let mut query = sqlx::query(&sql);
        for name in chunk {
            query = query.bind(name);
        }
        for row in query.fetch_all(tx.conn().await?).await.map_err(map_err)? {
            let key = (
                row.get::<String, _>("owner"),
                row.get::<String, _>("group_name"),
            );
            if let Some(gate) = gates.get_mut(&key) {
                gate.in_flight = row.int("running").max(0) as u64;
            }
        }
    }
    Ok(gates)
}

/// Stores the rate's next start of each group a claim reserved starts of.
pub(super) async fn store_starts(tx: &mut WriteTx, next: &[(GroupKey, f64)]) -> StoreResult<()> {
    for ((owner, name), next_start) in next {
        sqlx::query("UPDATE groups SET next_start = ? WHERE owner = ? AND name = ?")
            .bind(next_start)
            .bind(owner)
            .bind(name)
            .execute(tx.conn().await?)
            .await
            .map_err(map_err)?;
    }
    Ok(())
}
