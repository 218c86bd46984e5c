//! The embedded backend: one SQLite file in WAL mode, written through a single connection.
//!
//! SQLite allows one writer at a time, so every write goes through `writer` (a pool of one
//! connection) and waits its turn in-process instead of failing with `SQLITE_BUSY`; reads use
//! their own small pool and see the last committed state. A lock file beside the database
//! keeps a second `doparallel` process off the same file: the engine assumes it is the only
//! node (see [`Store::tasks_recover`]).
//!
//! This file opens the database and maps its errors; the statements are by concern: `jobs`
//! (submission, reads, cancel and removal), `claim`, `settle`, `leases` (running tasks taken
//! back, renewed, timed out) and `callbacks` (the outbox).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

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
mod group;
mod job_groups;
mod jobs;
mod leases;
mod settle;
mod writer;

use writer::{WriteTx, Writer};

/// Rows per multi-row statement that changes many jobs or tasks (a settle's outcomes, 11
/// parameters each; the counters of the jobs a claim or a settle served), far below SQLite's
/// limit on bound parameters.
const SETTLE_CHUNK: usize = 256;

pub struct SqliteStore {
    /// Every write goes through it: see `writer` for why `Ok` means committed.
    writer: Writer,
    /// Small jobs and callback records, committed together when they arrive together.
    group: group::Group,
    reader: SqlitePool,
    /// The groups with limits of their own (`job_groups`): this process is the database's
    /// only writer, so the copy is exact, and a claim over groups without limits costs no
    /// statement.
    limited_groups: std::sync::RwLock<std::collections::HashSet<crate::store::plan::GroupKey>>,
    /// Held for the life of the store; the OS releases it when the process dies, even by
    /// SIGKILL, so a crash never leaves a stale lock behind.
    _lock: Option<File>,
}

impl SqliteStore {
    /// Opens (creating when missing) the database at a `sqlite://PATH` or `sqlite::memory:`
    /// URL and brings its schema up to date. `?max_page_count=N` caps the database at N
    /// pages: past them a write fails as on a full disk.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let (sqlx_url, max_pages) = take_max_page_count(url)?;
        let mut options = SqliteConnectOptions::from_str(&sqlx_url)
            .map_err(|e| StoreError::Other(format!("invalid SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the service acts on it (an accepted job, a
            // stored result), even across a power loss, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        if let Some(pages) = max_pages {
            // A per-connection setting, so it is set on every connection the pools open.
            options = options.pragma("max_page_count", pages.to_string());
        }
        let path = options.get_filename().to_path_buf();
        let in_memory = path.as_os_str() == ":memory:" || url.contains(":memory:");

        let lock = if in_memory {
            None
        } else {
            Some(lock_database(&path)?)
        };

        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {url}: {e}")))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|e| StoreError::Other(format!("cannot migrate {url}: {e}")))?;
        // An in-memory database exists once per connection, so there it is read through the
        // writer too.
        let reader = if in_memory {
            writer.clone()
        } else {
            // Opened at start and kept: reads must not depend on finding a free file
            // descriptor later, when many connections may have taken them all.
            SqlitePoolOptions::new()
                .max_connections(4)
                .min_connections(4)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options.read_only(true))
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot open {url}: {e}")))?
        };
        let writer = Writer::new(writer, in_memory);
        let limited_groups = job_groups::limited(&reader).await?;
        Ok(SqliteStore {
            group: group::Group::start(writer.clone()),
            writer,
            reader,
            limited_groups: std::sync::RwLock::new(limited_groups),
            _lock: lock,
        })
    }

    async fn begin(&self) -> StoreResult<WriteTx> {
        self.writer.begin().await
    }
}

/// Takes `max_page_count=N` out of a SQLite URL's query, which sqlx would refuse; returns
/// the URL without it, and N.
fn take_max_page_count(url: &str) -> StoreResult<(String, Option<u64>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut pages = None;
    let mut rest = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key == "max_page_count" {
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    StoreError::Other(format!(
                        "invalid SQLite URL {url:?}: max_page_count must be a positive integer"
                    ))
                })?;
            pages = Some(n);
        } else {
            rest.append_pair(&key, &value);
        }
    }
    let rest = rest.finish();
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{rest}")
    };
    Ok((url, pages))
}

fn lock_database(path: &Path) -> StoreResult<File> {
    let mut lock_path = PathBuf::from(path);
    lock_path.as_mut_os_string().push(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create lock file {}: {e}",
                lock_path.display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Conflict(format!(
            "database {} is in use by another doparallel process (it holds {}); \
             a SQLite database serves one process at a time",
            path.display(),
            lock_path.display()
        ))),
        Err(TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) => {
            // SQLITE_FULL (13), SQLITE_BUSY (5), SQLITE_IOERR (10) and SQLITE_CANTOPEN (14)
            // and their extended codes are conditions that pass; the rest are bugs.
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            match primary {
                Some(13) => StoreError::full(db),
                Some(5 | 10 | 14) => StoreError::Unavailable(db.to_string()),
                _ => StoreError::Other(e.to_string()),
            }
        }
        _ => StoreError::Other(e.to_string()),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn job_insert(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
        now: Millis,
    ) -> StoreResult<InsertOutcome> {
        if job.tasks.len() <= group::MAX_JOB_TASKS {
            self.group.insert(job, idempotency, now).await
        } else {
            jobs::insert(self, job, idempotency, now).await
        }
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
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)
    }

    async fn tasks_recover(&self) -> StoreResult<u64> {
        leases::recover(self).await
    }

    async fn tasks_renew(&self, node: NodeId, until: Millis) -> StoreResult<u64> {
        leases::renew(self, node, until).await
    }

    async fn tasks_expire(&self, now: Millis) -> StoreResult<u64> {
        leases::expire(self, now).await
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
        self.group.record(record).await
    }

    async fn listen(&self) -> StoreResult<Option<Notices>> {
        // The lock file keeps every other process off this database: nobody to hear from.
        Ok(None)
    }

    async fn health(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_page_count_is_taken_out_of_the_url() {
        let check = |url: &str, expected: (&str, Option<u64>)| {
            let (rest, pages) = take_max_page_count(url).unwrap();
            assert_eq!((rest.as_str(), pages), expected, "{url}");
        };
        check("sqlite://a.db", ("sqlite://a.db", None));
        check(
            "sqlite://a.db?max_page_count=64",
            ("sqlite://a.db", Some(64)),
        );
        check(
            "sqlite://a.db?mode=rwc&max_page_count=64",
            ("sqlite://a.db?mode=rwc", Some(64)),
        );
        check("sqlite://a.db?mode=rwc", ("sqlite://a.db?mode=rwc", None));
        for bad in ["0", "-1", "x", ""] {
            let url = format!("sqlite://a.db?max_page_count={bad}");
            assert!(take_max_page_count(&url).is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn a_write_past_max_page_count_is_unavailable_as_on_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?max_page_count=40",
            dir.path().join("small.db").display()
        );
        let store = SqliteStore::open(&url).await.unwrap();
        let big = format!("'{}'", "x".repeat(400 * 1024));
        let mut tx = store.begin().await.unwrap();
        let err = sqlx::query(&format!("CREATE TABLE ballast AS SELECT {big} AS b"))
            .execute(tx.conn().await.unwrap())
            .await
            .map_err(map_err)
            .unwrap_err();
        drop(tx);
        // Unavailable, which the engine waits out, and full, which the API says.
        assert!(err.is_full(), "{err}");
        store.health().await.unwrap();
    }

    /// A job whose acknowledged insert must be readable through the readers.
    async fn insert_and_read_back(store: &SqliteStore) {
        let job = crate::job::parse_submission(
            br#"{"tasks":[{"endpoint":"/v1/test","params":{}}]}"#,
            &crate::job::Limits::defaults(),
            &crate::egress::EgressPolicy::guarded(vec![]),
            &crate::sealing::Sealer::default(),
        )
        .unwrap();
        let outcome = store.job_insert(&job, None, 1).await.unwrap();
        assert_eq!(outcome, InsertOutcome::Inserted);
        let read = store.job_get(job.id).await.unwrap();
        assert!(read.is_some(), "an acknowledged insert is not committed");
    }

    /// What trapped sqlx's own transactions (seen with a real full disk, reproduced here
    /// without one): SQLite rolling a transaction back underneath the driver, then a COMMIT
    /// that fails and leaves its transaction open (a full disk does that too; a deferred
    /// foreign key does it every time). With sqlx's transactions every later write then
    /// answered `Ok` inside a transaction nobody committed, and the readers never saw it.
    #[tokio::test]
    async fn writes_after_failed_commits_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
             CREATE TABLE child (parent REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
        tx.commit().await.unwrap();

        for _ in 0..2 {
            // Rolled back underneath: the COMMIT fails, and must say so.
            let mut tx = store.begin().await.unwrap();
            sqlx::query("INSERT INTO settings (name, value) VALUES ('lost', x'00')")
                .execute(tx.conn().await.unwrap())
                .await
                .unwrap();
            sqlx::raw_sql("ROLLBACK")
                .execute(tx.conn().await.unwrap())
                .await
                .unwrap();
            assert!(tx.commit().await.is_err());
            // A COMMIT that fails with its transaction left open.
            let mut tx = store.begin().await.unwrap();
            sqlx::raw_sql("INSERT INTO child VALUES (7)")
                .execute(tx.conn().await.unwrap())
                .await
                .unwrap();
            assert!(tx.commit().await.is_err());
            insert_and_read_back(&store).await;
        }

        // A transaction dropped uncommitted.
        let mut tx = store.begin().await.unwrap();
        sqlx::query("INSERT INTO settings (name, value) VALUES ('dropped', x'00')")
            .execute(tx.conn().await.unwrap())
            .await
            .unwrap();
        drop(tx);
        insert_and_read_back(&store).await;

        // A connection left inside a transaction by someone else: the next write must not
        // land inside it.
        let mut conn = store.writer.pool().acquire().await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
        drop(conn);
        insert_and_read_back(&store).await;

        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM settings")
            .fetch_all(&store.reader)
            .await
            .unwrap();
        assert!(
            !names.iter().any(|n| n == "lost" || n == "dropped"),
            "{names:?}"
        );
        let children: i64 = sqlx::query_scalar("SELECT count(*) FROM child")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(children, 0);
    }
}
