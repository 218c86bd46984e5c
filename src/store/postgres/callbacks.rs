//! The callback outbox: the delivery records of finished jobs with a callback URL, the
//! deliveries that are due (leased to one node at a time), and each attempt's result.

use std::sync::LazyLock;
use std::time::Instant;

use sqlx::Row;

use super::notices::{NOTICE_CALLBACK, notify};
use super::tx::PgTx;
use super::{HINT_FRESH, PostgresStore, map_err};
use crate::store::codec::{CALLBACK_PENDING, parse_id};
use crate::store::rows::CallbackWrite;
use crate::store::{CallbackDue, CallbackRecord, Millis, StoreResult};

/// Leases the due callback deliveries (`$1` now, `$2` lease end, `$3` how many), skipping
/// those another node is leasing, and in the same statement computes when the next one not
/// leased here is due (the last row, with only `next_due`).
static CALLBACKS_DUE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH due AS (\
             SELECT job_seq FROM callbacks WHERE state = {CALLBACK_PENDING} AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
         leased AS (\
             UPDATE callbacks c SET next_attempt_at = $2 FROM due WHERE c.job_seq = due.job_seq \
             RETURNING c.job_seq, c.attempts) \
         SELECT j.id::text AS id, j.callback_url, l.attempts, NULL::bigint AS next_due \
             FROM leased l JOIN jobs j ON j.seq = l.job_seq \
         UNION ALL \
         SELECT NULL, NULL, NULL, (SELECT MIN(next_attempt_at) FROM callbacks \
             WHERE state = {CALLBACK_PENDING} AND job_seq NOT IN (SELECT job_seq FROM leased))"
    )
});

/// Writes the delivery records of jobs that just finished (`seqs`, each due at its `at`),
/// in the transaction that finishes them, so a callback is owed exactly when its job is
/// finished; every node hears that a callback is due.
pub(super) async fn insert_callbacks(
    tx: &mut PgTx,
    seqs: &[i64],
    at: &[Millis],
) -> StoreResult<()> {
    static INSERT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO callbacks (job_seq, state, next_attempt_at) \
             SELECT seq, {CALLBACK_PENDING}, at FROM unnest($1::bigint[], $2::bigint[]) AS c(seq, at)"
        )
    });
    sqlx::query(&INSERT)
        .bind(seqs)
        .bind(at)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    notify(tx, NOTICE_CALLBACK).await
}

pub(super) async fn due(
    store: &PostgresStore,
    now: Millis,
    lease_until: Millis,
    limit: u32,
) -> StoreResult<Vec<CallbackDue>> {
    let rows = sqlx::query(&CALLBACKS_DUE_SQL)
        .bind(now)
        .bind(lease_until)
        .bind(i64::from(limit))
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    let mut due = Vec::with_capacity(rows.len());
    let mut next_due: Option<Millis> = None;
    for row in rows {
        match row.get::<Option<String>, _>("id") {
            Some(id) => due.push(CallbackDue {
                job_id: parse_id(&id)?,
                url: row.get("callback_url"),
                attempts: row.get::<i32, _>("attempts") as u32,
            }),
            None => next_due = row.get("next_due"),
        }
    }
    // What `callback_next_due` would answer now: the leased ones are due again when
    // their lease ends.
    if !due.is_empty() {
        next_due = Some(next_due.map_or(lease_until, |d| d.min(lease_until)));
    }
    *store.callback_hint.lock().expect("not poisoned") = Some((Instant::now(), next_due));
    Ok(due)
}

pub(super) async fn next_due(store: &PostgresStore) -> StoreResult<Option<Millis>> {
    static NEXT_DUE: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT MIN(next_attempt_at) FROM callbacks WHERE state = {CALLBACK_PENDING}")
    });
    // Right after `callbacks_due` (what the delivery loop does), its statement already
    // answered; another node's new callback comes with a notice that makes the loop
    // lease again first.
    let hint = store.callback_hint.lock().expect("not poisoned").take();
    if let Some((at, next_due)) = hint
        && at.elapsed() < HINT_FRESH
    {
        return Ok(next_due);
    }
    sqlx::query_scalar(&NEXT_DUE)
        .fetch_one(&store.pool)
        .await
        .map_err(map_err)
}

pub(super) async fn record(store: &PostgresStore, record: &CallbackRecord) -> StoreResult<bool> {
    static RECORD: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE callbacks SET state = $1, attempts = $2, next_attempt_at = $3, \
             last_error = COALESCE($4, last_error), delivered_at = $5 \
             WHERE job_seq = (SELECT seq FROM jobs WHERE id = $6::uuid) \
               AND state = {CALLBACK_PENDING} AND attempts = $7"
        )
    });
    let write = CallbackWrite::of(&record.outcome, record.now);
    let mut tx = store.begin().await?;
    let done = sqlx::query(&RECORD)
        .bind(write.state)
        .bind(record.attempts as i32)
        .bind(write.next_attempt_at)
        .bind(write.error)
        .bind(write.delivered_at)
        .bind(record.job_id.to_string())
        .bind(record.attempts as i32 - 1)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    tx.commit().await?;
    store.callbacks_changed();
    Ok(done.rows_affected() == 1)
}
