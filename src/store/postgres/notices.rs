//! Notices between the nodes on one database: `NOTIFY` on one channel, sent inside the
//! writing transaction so that it is heard only once the change is visible, and one
//! listening connection per node that gets itself back after the server ends it.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::tx::PgTx;
use super::{PostgresStore, map_err};
use crate::store::{Notice, Notices, StoreError, StoreResult};

/// The one channel every node listens on and notifies.
const CHANNEL: &str = "doparallel";

/// How many times in a row the notice stream tries to get its connection back before it
/// ends (backoff from 100 ms doubling to 5 s: about ten minutes).
const LISTEN_RETRIES: u32 = 120;

/// Tasks may have become claimable: a job was submitted, or expired leases taken back.
pub(super) const NOTICE_WORK: &str = "work";
/// A callback delivery became due.
pub(super) const NOTICE_CALLBACK: &str = "callback";
/// Followed by a job id: that job was cancelled.
pub(super) const NOTICE_CANCEL: &str = "cancel:";
/// Followed by a job id: that finished job was retried (its tasks are due: work too).
pub(super) const NOTICE_RETRY: &str = "retry:";

fn parse_notice(payload: &str) -> Option<Notice> {
    match payload {
        NOTICE_WORK => Some(Notice::Work),
        NOTICE_CALLBACK => Some(Notice::CallbackDue),
        other => {
            if let Some(id) = other.strip_prefix(NOTICE_CANCEL) {
                id.parse().ok().map(Notice::Cancelled)
            } else {
                other
                    .strip_prefix(NOTICE_RETRY)
                    .and_then(|id| id.parse().ok())
                    .map(Notice::Retried)
            }
        }
    }
}

/// Sends a notice to every node (this one included) when the transaction commits.
pub(super) async fn notify(tx: &mut PgTx, payload: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(tx.conn().await?)
        .await
        .map_err(map_err)?;
    Ok(())
}

pub(super) async fn listen(store: &PostgresStore) -> StoreResult<Option<Notices>> {
    // Connections of its own, kept open (no lifetime or idle limit). Two, so that a new
    // listener can connect while a broken one is still being let go.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(store.options.clone())
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {} to listen: {e}",
                store.place
            ))
        })?;
    let listener = listen_on(&pool).await.map_err(map_err)?;
    let state = ListenState {
        pool,
        listener: Some(listener),
        pending: VecDeque::new(),
        failures: 0,
    };
    Ok(Some(
        futures_util::stream::unfold(state, next_notice).boxed(),
    ))
}

struct ListenState {
    pool: PgPool,
    /// `None` after a failure, until a new one listens.
    listener: Option<PgListener>,
    /// Notices to hand out before reading more.
    pending: VecDeque<Notice>,
    /// Failed attempts in a row to listen again.
    failures: u32,
}

async fn listen_on(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// The next notice, or `None` once listening cannot be had back.
async fn next_notice(mut st: ListenState) -> Option<(Notice, ListenState)> {
    loop {
        if let Some(notice) = st.pending.pop_front() {
            return Some((notice, st));
        }
        let Some(listener) = st.listener.as_mut() else {
            if st.failures > LISTEN_RETRIES {
                tracing::error!("gave up listening for other nodes' notices");
                return None;
            }
            let backoff = Duration::from_millis(100 << st.failures.min(6));
            tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
            match listen_on(&st.pool).await {
                Ok(listener) => {
                    tracing::info!("listening for other nodes' notices again");
                    st.listener = Some(listener);
                    st.failures = 0;
                    // Whatever was announced meanwhile is lost: look at everything.
                    st.pending.extend([Notice::Work, Notice::CallbackDue]);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other nodes' notices yet");
                    st.failures += 1;
                }
            }
            continue;
        };
        match listener.try_recv().await {
            Ok(Some(notification)) => match parse_notice(notification.payload()) {
                Some(notice) => return Some((notice, st)),
                None => tracing::warn!(
                    payload = notification.payload(),
                    "ignoring an unknown notice"
                ),
            },
            // The listener lost its connection and got another: notices sent meanwhile are
            // lost.
            Ok(None) => st.pending.extend([Notice::Work, Notice::CallbackDue]),
            Err(e) => {
                // A connection the server ended can fail in ways the listener does not
                // recover from itself: a new one replaces it.
                tracing::warn!(error = %e, "lost the connection that listens for other nodes' notices");
                st.listener = None;
                st.failures = 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    #[test]
    fn notices_read_back_as_sent() {
        let id = JobId::generate();
        assert_eq!(parse_notice(NOTICE_WORK), Some(Notice::Work));
        assert_eq!(parse_notice(NOTICE_CALLBACK), Some(Notice::CallbackDue));
        assert_eq!(
            parse_notice(&format!("{NOTICE_CANCEL}{id}")),
            Some(Notice::Cancelled(id))
        );
        assert_eq!(parse_notice("cancel:not-a-job"), None);
        assert_eq!(parse_notice("something else"), None);
    }
}
