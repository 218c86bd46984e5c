//! The shared backend: PostgreSQL, for several nodes on one database.
//!
//! Any number of `doparallel serve` processes may open the same database; each is a node
//! with its own [`NodeId`]. What keeps them from stepping on each other:
//!
//! - A claim locks the job rows it serves (`FOR UPDATE SKIP LOCKED`), checks and raises
//!   each job's `n_running` under that lock (so a job's `concurrency` holds across the
//!   cluster), and takes the due tasks it leases the same way: two nodes never get one task.
//! - Running tasks are leased to their node until `lease_until`. A settle applies only under
//!   its node's lease and attempt, so a late answer from a node that lost its lease changes
//!   nothing and each result is stored once. A node renews its leases while its calls run;
//!   any node takes back the tasks whose lease ran out.
//! - A settle locks its jobs' rows (`FOR UPDATE`, in `seq` order) before anything else, so
//!   two nodes settling a job's last two tasks at once cannot both finish it, nor neither,
//!   and failures are numbered without gaps between nodes. The transaction that settles a
//!   job's last task writes its final status (`plan::final_status` decides it).
//! - Callback deliveries are leased with `FOR UPDATE SKIP LOCKED`: one node per attempt.
//! - Writers that wait take job rows first, in `seq` order, then tasks; the others (claim,
//!   renewal, purge, callback leases) skip what is locked rather than wait, so no two
//!   transactions can wait on each other in a cycle.
//!
//! Nodes wake each other with `NOTIFY` on one channel, sent inside the writing transaction
//! (so it is heard only once the change is visible): a job submitted or expired leases taken
//! back (`work`), a callback due (`callback`), a job cancelled (`cancel:ID`). An idle node
//! makes two single-statement queries per idle poll plus the lease sweep.
//!
//! JSON is stored as TEXT, never jsonb, which would reorder keys and respell numbers.
//!
//! This file connects and maps errors; the statements are by concern: `jobs` (submission,
//! reads, cancel and removal), `claim`, `settle`, `leases` (expired leases taken back,
//! renewed, awaited attempts timed out), `callbacks` (the outbox) and `notices`.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::{
    CallbackDue, CallbackRecord, CancelOutcome, Claim, ClaimParams, ClaimedTask, DeleteOutcome,
    FailedTask, GroupRecord, IdempotencyKey, InsertOutcome, JobListQuery, JobRecord, Millis,
    NodeId, Notices, OverdueParams, ReportOutcome, RetryOutcome, SettleReport, Store, StoreError,
    StoreResult, TaskPageQuery, TaskRecord, TaskReport, TaskSettle,
};
use crate::job::{GroupLimits, JobId, NewJob};

mod callbacks;
mod claim;
mod control;
mod job_groups;
mod jobs;
mod leases;
mod notices;
mod settle;
mod tx;

use tx::PgTx;

/// Connections per node, besides the one that listens for notices.
const POOL_SIZE: u32 = 16;

/// How long a statement waits for a connection of the pool (opening one included) before
/// it fails as `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long what a statement found stands in for the query that its caller makes next: the
/// next callback due time [`Store::callbacks_due`] computes for [`Store::callback_next_due`]
/// (the delivery loop asks right after leasing), and whether [`Store::tasks_expire`] saw an
/// overdue awaited attempt, for [`Store::tasks_overdue`] (the lease sweep asks right after).
const HINT_FRESH: Duration = Duration::from_millis(500);

pub struct PostgresStore {
    pool: PgPool,
    /// For the listener's own connection.
    options: PgConnectOptions,
    /// Where the database is, for messages: host, port, database and user, no password.
    place: String,
    /// The next callback due time computed by the last `callbacks_due`, and when.
    callback_hint: Mutex<Option<(Instant, Option<Millis>)>>,
    /// Whether the last `tasks_expire` saw an awaited attempt past its deadline: when, for
    /// which `now`, and the answer.
    overdue_hint: Mutex<Option<(Instant, Millis, bool)>>,
}

impl PostgresStore {
    /// Connects to the database at a `postgres://` or `postgresql://` URL and brings its
    /// schema up to date. Several nodes may start at once: the migrations run under an
    /// advisory lock, one node at a time, and the others find them applied.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Other(format!("invalid PostgreSQL URL {}: {e}", redact(url))))?
            .application_name("doparallel");
        let place = describe(&options);
        // One connection first, so that a wrong or unreachable address fails at once (a
        // pool would keep trying until its acquire timeout); the migrations run on it, and
        // the advisory lock they hold goes with it.
        let mut first = PgConnection::connect_with(&options).await.map_err(|e| {
            StoreError::Unavailable(format!("cannot connect to PostgreSQL at {place}: {e}"))
        })?;
        sqlx::migrate!("migrations/postgres")
            .run(&mut first)
            .await
            .map_err(|e| StoreError::Other(format!("cannot migrate PostgreSQL at {place}: {e}")))?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            // Short, so that a request meets an unreachable database with a prompt 503 (and
            // Retry-After) rather than hanging while the pool tries to connect; the engine's
            // loops retry on their own.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to PostgreSQL at {place}: {e}"))
            })?;
        Ok(PostgresStore {
            pool,
            options,
            place,
            callback_hint: Mutex::new(None),
            overdue_hint: Mutex::new(None),
        })
    }

    async fn begin(&self) -> StoreResult<PgTx> {
        Ok(PgTx::new(self.pool.begin().await.map_err(map_err)?))
    }

    /// Forgets the callback hint: this node changed the outbox.
    fn callbacks_changed(&self) {
        *self.callback_hint.lock().expect("not poisoned") = None;
    }
}

/// `host:port/database as user`, for messages.
fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{} as user {}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username()),
        options.get_username()
    )
}

/// The URL with its password hidden, or a placeholder when it does not even parse.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(unparsable)".to_string(),
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Classes that pass: 08 connection exceptions, 53 insufficient resources (53100
            // disk full, 53300 too many connections), 57P administrator action or crash
            // shutdown, 57014 a statement cancelled (a timeout), 40 serialization failure
            // and deadlock, 58030 I/O error.
            if code == "53100" {
                StoreError::full(db)
            } else if code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "57014"
                || code.starts_with("40")
                || code == "58030"
            {
                StoreError::Unavailable(format!("{db} (SQLSTATE {code})"))
            } else {
                StoreError::Other(format!("{db} (SQLSTATE {code})"))
            }
        }
        _ => StoreError::Other(e.to_string()),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn job_insert(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
        now: Millis,
    ) -> StoreResult<InsertOutcome> {
        jobs::insert(self, job, idempotency, now).await
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        jobs::get(self, id).await
    }

    async fn job_list(&self, query: &JobListQuery) -> StoreResult<Vec<JobRecord>> {
        jobs::list(self, query).await
    }

    async fn tasks_page(&self, id: JobId, query: &TaskPageQuery) -> StoreResult<Vec<TaskRecord>> {
        jobs::tasks_page(self, id, query).await
    }

    async fn tasks_failed_since(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<FailedTask>> {
        jobs::tasks_failed_since(self, id, after, limit).await
    }

    async fn job_end(
        &self,
        id: JobId,
        status: crate::job::JobStatus,
        now: Millis,
    ) -> StoreResult<CancelOutcome> {
        control::end(self, id, status, now).await
    }

    async fn job_set_options(
        &self,
        id: JobId,
        seen: &crate::job::JobOptions,
        options: &crate::job::JobOptions,
    ) -> StoreResult<super::OptionsOutcome> {
        control::set_options(self, id, seen, options).await
    }

    async fn job_pause(&self, id: JobId, pause: bool) -> StoreResult<super::PauseOutcome> {
        control::pause(self, id, pause).await
    }

    async fn jobs_deadline(&self, now: Millis, limit: u32) -> StoreResult<super::Deadlines> {
        control::deadlines(self, now, limit).await
    }

    async fn job_expire(
        &self,
        id: JobId,
        error: &serde_json::value::RawValue,
        now: Millis,
    ) -> StoreResult<super::ExpireOutcome> {
        control::expire(self, id, error, now).await
    }

    async fn job_retry(
        &self,
        id: JobId,
        include: &[crate::job::TaskStatus],
        now: Millis,
    ) -> StoreResult<RetryOutcome> {
        control::retry(self, id, include, now).await
    }

    async fn job_delete(&self, id: JobId) -> StoreResult<DeleteOutcome> {
        jobs::delete(self, id).await
    }

    async fn jobs_purge(&self, finished_before: Millis, limit: u32) -> StoreResult<u64> {
        jobs::purge(self, finished_before, limit).await
    }

    async fn queue_depth(&self) -> StoreResult<u64> {
        jobs::queue_depth(self).await
    }

    async fn group_set(
        &self,
        owner: Option<&str>,
        name: &str,
        limits: &GroupLimits,
    ) -> StoreResult<()> {
        job_groups::set(self, owner, name, limits).await
    }

    async fn group_delete(&self, owner: Option<&str>, name: &str) -> StoreResult<bool> {
        job_groups::delete(self, owner, name).await
    }

    async fn groups_list(
        &self,
        owner: Option<&str>,
        name: Option<&str>,
    ) -> StoreResult<Vec<GroupRecord>> {
        job_groups::list(self, owner, name).await
    }

    async fn tasks_claim(&self, params: &ClaimParams) -> StoreResult<Claim> {
        claim::claim(self, params).await
    }

    async fn tasks_settle(&self, node: NodeId, batch: &[TaskSettle]) -> StoreResult<SettleReport> {
        settle::settle(self, Some(node), batch).await
    }

    async fn tasks_heartbeat(
        &self,
        beat: &super::TaskHeartbeat,
    ) -> StoreResult<super::HeartbeatOutcome> {
        settle::heartbeat(self, beat).await
    }

    async fn tasks_report(&self, report: &TaskReport) -> StoreResult<ReportOutcome> {
        settle::report(self, report).await
    }

    async fn tasks_overdue(&self, params: &OverdueParams) -> StoreResult<Vec<ClaimedTask>> {
        leases::overdue(self, params).await
    }

    async fn task_token_key(&self) -> StoreResult<Vec<u8>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE name = 'task_token_key'")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn tasks_renew(&self, node: NodeId, until: Millis) -> StoreResult<u64> {
        leases::renew(self, node, until).await
    }

    async fn tasks_expire(&self, now: Millis) -> StoreResult<u64> {
        leases::expire(self, now).await
    }

    async fn tasks_recover(&self) -> StoreResult<u64> {
        // Other nodes may be alive and their calls under way: only what has expired.
        leases::expire(self, super::now_millis()).await
    }

    async fn callbacks_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<CallbackDue>> {
        callbacks::due(self, now, lease_until, limit).await
    }

    async fn callback_next_due(&self) -> StoreResult<Option<Millis>> {
        callbacks::next_due(self).await
    }

    async fn callback_record(&self, record: &CallbackRecord) -> StoreResult<bool> {
        callbacks::record(self, record).await
    }

    async fn listen(&self) -> StoreResult<Option<Notices>> {
        notices::listen(self).await
    }

    async fn health(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::error::Error;

    use sqlx::error::{DatabaseError, ErrorKind};

    use super::*;

    /// A database error with a given SQLSTATE.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl Error for Sqlstate {}

    impl DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "error"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn classify(code: &'static str) -> StoreError {
        map_err(sqlx::Error::Database(Box::new(Sqlstate(code))))
    }

    #[test]
    fn passing_conditions_are_unavailable_and_the_rest_other() {
        assert!(classify("53100").is_full());
        for code in [
            "08006", "08001", "53300", "53200", "57P01", "57P03", "57014", "40001", "40P01",
            "58030",
        ] {
            assert!(
                matches!(classify(code), StoreError::Unavailable(_)),
                "{code}"
            );
            assert!(!classify(code).is_full(), "{code}");
        }
        for code in ["23505", "42P01", "22P02", "XX000"] {
            let e = classify(code);
            assert!(matches!(e, StoreError::Other(_)), "{code}");
            assert!(e.to_string().contains(code), "{e}");
        }
        assert!(matches!(
            map_err(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_err(sqlx::Error::RowNotFound),
            StoreError::NotFound
        ));
    }

    #[test]
    fn messages_name_the_database_without_its_password() {
        let url = "postgres://someone:s3cret@db.example:6543/jobs?sslmode=disable";
        assert_eq!(
            redact(url),
            "postgres://someone:***@db.example:6543/jobs?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://db.example/jobs"),
            "postgres://db.example/jobs"
        );
        assert_eq!(redact("not a url"), "(unparsable)");
        let options = PgConnectOptions::from_str(url).unwrap();
        assert_eq!(describe(&options), "db.example:6543/jobs as user someone");
    }
}
