//! A write transaction on PostgreSQL: sqlx's own, which PostgreSQL keeps honest (a failed
//! COMMIT ends the transaction there, and sqlx rolls back a transaction dropped without
//! one), with the fault tests' hooks at each statement and COMMIT (`store::fault`).
//!
//! A COMMIT whose answer is lost with its connection may or may not have taken effect: the
//! caller gets an error either way, and what retries it must find out which (see
//! `engine::settle_batch`).

use sqlx::postgres::PgConnection;
use sqlx::{Executor, Postgres, Transaction};

use super::map_err;
use crate::store::StoreResult;
use crate::store::fault::{self, Fault};

pub(super) struct PgTx {
    tx: Transaction<'static, Postgres>,
}

impl PgTx {
    pub(super) fn new(tx: Transaction<'static, Postgres>) -> Self {
        PgTx { tx }
    }

    /// The connection, for the next statement of this transaction.
    pub(super) async fn conn(&mut self) -> StoreResult<&mut PgConnection> {
        if let Some(fault) = fault::statement() {
            if fault == Fault::Rollback {
                let _ = self.tx.execute("ROLLBACK").await;
            }
            return Err(fault.error("a statement"));
        }
        Ok(&mut self.tx)
    }

    pub(super) async fn rollback(self) -> StoreResult<()> {
        self.tx.rollback().await.map_err(map_err)
    }

    pub(super) async fn commit(mut self) -> StoreResult<()> {
        match fault::commit() {
            None => self.tx.commit().await.map_err(map_err),
            Some(fault) => {
                match fault {
                    Fault::Fail => {}
                    Fault::Rollback => drop(self.tx.execute("ROLLBACK").await),
                    Fault::Lost => drop(self.tx.commit().await),
                }
                Err(fault.error("COMMIT"))
            }
        }
    }
}
