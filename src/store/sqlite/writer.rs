//! The writer connection and the discipline that keeps its answers true: `Ok` from a write
//! means committed.
//!
//! sqlx's SQLite transactions count their nesting in the driver and lower the count only
//! when COMMIT or ROLLBACK succeeds. SQLite itself rolls a transaction back when a statement
//! or the COMMIT fails with `SQLITE_FULL`, `SQLITE_IOERR` or `SQLITE_NOMEM`; after such a
//! failure the driver still believed a transaction open, turned the next `BEGIN` into a
//! `SAVEPOINT`, and after a second failure left the connection inside a transaction that
//! nothing ever committed: every later write answered `Ok` and never reached the file.
//!
//! So writes here do not use sqlx's transactions. A [`WriteTx`] starts with
//! `BEGIN IMMEDIATE` (which fails, rather than nests, on a connection already inside a
//! transaction), ends with a COMMIT whose success is the only way to `Ok`, and after any
//! failure (a statement, the COMMIT, a ROLLBACK) the connection is closed rather than
//! reused: the pool opens a fresh one, which cannot be inside anything. A transaction
//! dropped without a COMMIT (an early return, an error, a cancelled request) is rolled back
//! before its connection serves anyone else.

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Executor, Sqlite};

use super::map_err;
use crate::store::StoreResult;
use crate::store::fault::{self, Fault};

/// The pool of the one writer connection.
#[derive(Clone)]
pub(super) struct Writer {
    pool: SqlitePool,
    /// An in-memory database lives and dies with its connection, so there a failed
    /// connection is rolled back and kept instead of closed (a new one would be a new,
    /// empty database). Memory cannot fill like a disk; `SQLITE_NOMEM` is the one failure
    /// that rolls back by itself, and a ROLLBACK after it finds nothing open.
    in_memory: bool,
}

impl Writer {
    pub(super) fn new(pool: SqlitePool, in_memory: bool) -> Self {
        Writer { pool, in_memory }
    }

    /// The pool itself, for tests that need to misuse the connection.
    #[cfg(test)]
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Starts a write transaction. A connection found inside a transaction already (which
    /// the discipline above should make impossible) is closed and replaced, loudly.
    pub(super) async fn begin(&self) -> StoreResult<WriteTx> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.pool.acquire().await.map_err(map_err)?;
            match conn.execute("BEGIN IMMEDIATE").await {
                Ok(_) => {
                    return Ok(WriteTx {
                        conn: Some(conn),
                        in_memory: self.in_memory,
                    });
                }
                Err(e) => {
                    let e = map_err(e);
                    after_failure(conn, self.in_memory).await;
                    if tries == 2 {
                        return Err(e);
                    }
                    tracing::error!(error = %e, "the database writer could not begin a transaction; replacing its connection");
                }
            }
        }
    }
}

/// An open write transaction on the writer connection; see the module docs.
pub(super) struct WriteTx {
    /// `None` once committed.
    conn: Option<PoolConnection<Sqlite>>,
    in_memory: bool,
}

impl WriteTx {
    /// The connection, for the next statement of this transaction.
    pub(super) async fn conn(&mut self) -> StoreResult<&mut SqliteConnection> {
        let conn = self.conn.as_mut().expect("open until committed");
        if let Some(fault) = fault::statement() {
            if fault == Fault::Rollback {
                let _ = conn.execute("ROLLBACK").await;
            }
            return Err(fault.error("a statement"));
        }
        Ok(conn)
    }

    /// Commits. `Ok` only when SQLite says the COMMIT succeeded; after an error the
    /// connection is closed, so nothing of this transaction can linger on it.
    pub(super) async fn commit(mut self) -> StoreResult<()> {
        let mut conn = self.conn.take().expect("open until committed");
        let result = match fault::commit() {
            None => conn.execute("COMMIT").await.map(drop).map_err(map_err),
            Some(fault) => {
                match fault {
                    Fault::Fail => {}
                    Fault::Rollback => drop(conn.execute("ROLLBACK").await),
                    Fault::Lost => drop(conn.execute("COMMIT").await),
                }
                Err(fault.error("COMMIT"))
            }
        };
        if result.is_err() {
            after_failure(conn, self.in_memory).await;
        }
        result
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Not committed: roll back before the connection goes back to the pool, and close
        // it if even that fails. The pool has one connection, so nobody can use it before
        // this is done.
        let in_memory = self.in_memory;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = conn.execute("ROLLBACK").await {
                        tracing::debug!(error = %e, "rollback failed");
                        after_failure(conn, in_memory).await;
                    }
                });
            }
            // No runtime (the process is ending): closing the connection rolls it back.
            Err(_) => conn.close_on_drop(),
        }
    }
}

/// Closes a connection that failed instead of returning it to the pool, which then opens a
/// new one; closing rolls back whatever was open. An in-memory database's connection is
/// rolled back and kept instead (see [`Writer::in_memory`]).
async fn after_failure(mut conn: PoolConnection<Sqlite>, in_memory: bool) {
    if in_memory {
        let _ = conn.execute("ROLLBACK").await;
        return;
    }
    if let Err(e) = conn.close().await {
        tracing::debug!(error = %e, "closing the writer connection failed");
    }
}
