//! The callback outbox: the delivery record a finished job with a callback URL gets, the
//! deliveries that are due (leased to the caller), and each attempt's result.

use std::sync::LazyLock;

use sqlx::Row;

use super::writer::WriteTx;
use super::{SETTLE_CHUNK, SqliteStore, map_err};
use crate::store::codec::{CALLBACK_PENDING, parse_id};
use crate::store::rows::CallbackWrite;
use crate::store::{CallbackDue, CallbackRecord, Millis, StoreResult};

/// Writes the delivery records of jobs that just finished, each `(seq, now)` due at its
/// `now`: in the transaction that finishes the jobs, so a callback is owed exactly when its
/// job is finished. One statement per chunk of jobs (a settle may finish hundreds).
pub(super) async fn insert_callbacks(tx: &mut WriteTx, due: &[(i64, Millis)]) -> StoreResult<()> {
    for chunk in due.chunks(SETTLE_CHUNK) {
        let mut sql =
            String::from("INSERT INTO callbacks (job_seq, state, next_attempt_at) VALUES ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("(?, {CALLBACK_PENDING}, ?)"));
        }
        let mut query = sqlx::query(&sql);
        for &(seq, now) in chunk {
            query = query.bind(seq).bind(now);
        }
        query.execute(tx.conn().await?).await.map_err(map_err)?;
    }
    Ok(())
}

pub(super) async fn due(
    store: &SqliteStore,
    now: Millis,
    lease_until: Millis,
    limit: u32,
) -> StoreResult<Vec<CallbackDue>> {
    static DUE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT c.job_seq, c.attempts, j.id, j.callback_url FROM callbacks c \
             JOIN jobs j ON j.seq = c.job_seq \
             WHERE c.state = {CALLBACK_PENDING} AND c.next_attempt_at <= ? \
             ORDER BY c.next_attempt_at LIMIT ?"
        )
    });
    let mut tx = store.begin().await?;
    let rows = sqlx::query(&DUE)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(tx.conn().await?)
        .await
        .map_err(map_err)?;
    // Leased in one statement.
    if !rows.is_empty() {
        let sql = format!(
            "UPDATE callbacks SET next_attempt_at = ? WHERE job_seq IN ({})",
            vec!["?"; rows.len()].join(",")
        );
        let mut query = sqlx::query(&sql).bind(lease_until);
        for row in &rows {
            query = query.bind(row.get::<i64, _>("job_seq"));
        }
        query.execute(tx.conn().await?).await.map_err(map_err)?;
    }
    let mut due = Vec::with_capacity(rows.len());
    for row in rows {
        due.push(CallbackDue {
            job_id: parse_id(row.get("id"))?,
            url: row.get("callback_url"),
            attempts: row.get::<i64, _>("attempts") as u32,
        });
    }
    tx.commit().await?;
    Ok(due)
}

pub(super) async fn next_due(store: &SqliteStore) -> StoreResult<Option<Millis>> {
    static NEXT_DUE: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT MIN(next_attempt_at) FROM callbacks WHERE state = {CALLBACK_PENDING}")
    });
    sqlx::query_scalar(&NEXT_DUE)
        .fetch_one(&store.reader)
        .await
        .map_err(map_err)
}

/// Records a callback attempt in the caller's transaction (not committed here); callers go
/// through the group commit (`group`), which records those that arrive together at once.
pub(super) async fn record_in(tx: &mut WriteTx, record: &CallbackRecord) -> StoreResult<bool> {
    static RECORD: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE callbacks SET state = ?, attempts = ?, next_attempt_at = ?, \
             last_error = COALESCE(?, last_error), delivered_at = ? \
             WHERE job_seq = (SELECT seq FROM jobs WHERE id = ?) \
               AND state = {CALLBACK_PENDING} AND attempts = ?"
        )
    });
    let write = CallbackWrite::of(&record.outcome, record.now);
    let done = sqlx::query(&RECORD)
        .bind(write.state)
        .bind(i64::from(record.attempts))
        .bind(write.next_attempt_at)
        .bind(write.error)
        .bind(write.delivered_at)
        .bind(record.job_id.to_string())
        .bind(i64::from(record.attempts) - 1)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    Ok(done.rows_affected() == 1)
}
