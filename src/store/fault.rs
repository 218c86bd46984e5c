//! Faults that the fault tests inject into the SQL backends' write transactions
//! (`tests/it/storage.rs`), each the way a database really fails.
//!
//! Compiled in only with the `failpoints` feature, and inert unless `FAILPOINTS` arms
//! `store-statement` (every statement inside a write transaction) or `store-commit` (every
//! COMMIT) with `return(MODE)`, for example `store-commit=3*off->1*return(lost)->off` for the
//! fourth COMMIT of the process. MODE is one of:
//! - `fail`: the statement or COMMIT fails and the transaction is left open, as SQLite leaves
//!   it after `SQLITE_BUSY`;
//! - `rollback`: it fails and the database has already rolled the whole transaction back by
//!   itself, as SQLite does on a full disk (`SQLITE_FULL`, `SQLITE_IOERR`) and PostgreSQL on
//!   any error;
//! - `lost` (COMMIT only): the COMMIT takes effect but its answer never arrives, as when the
//!   connection dies right after it; the caller cannot tell this from a COMMIT that failed.

use super::StoreError;

/// How an injected fault behaves; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    Fail,
    Rollback,
    Lost,
}

impl Fault {
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    fn parse(arg: Option<String>) -> Fault {
        match arg.as_deref() {
            Some("rollback") => Fault::Rollback,
            Some("lost") => Fault::Lost,
            _ => Fault::Fail,
        }
    }

    /// The error the caller sees: a passing condition, as the real faults are.
    pub(crate) fn error(self, at: &str) -> StoreError {
        tracing::warn!(fault = ?self, at, "injected storage fault");
        StoreError::Unavailable(format!("injected fault ({self:?}) at {at}"))
    }
}

/// The fault to inject into this statement of a write transaction, if any.
pub(crate) fn statement() -> Option<Fault> {
    fail::fail_point!("store-statement", |arg| Some(Fault::parse(arg)));
    None
}

/// The fault to inject into this COMMIT, if any.
pub(crate) fn commit() -> Option<Fault> {
    fail::fail_point!("store-commit", |arg| Some(Fault::parse(arg)));
    None
}
