//! The DynamoDB backend: one table shared by any number of nodes.
//!
//! # Table design
//!
//! One table, partition key `pk` and sort key `sk` (strings), on-demand capacity, five
//! sparse global secondary indexes (`gsiN` on `gNpk`/`gNsk`; an item is in an index only
//! while it has that index's key attributes). Numbers in keys are zero-padded so that they
//! sort as text.
//!
//! | item | `pk` | `sk` | in the indexes |
//! | --- | --- | --- | --- |
//! | a job (`META`) | `JOB#<id>` | `META` | gsi1 `ACTIVE#<shard>`/`<last_claim_at>#<id>` while unfinished, `DONE#<shard>`/`<finished_at>#<id>` once its callback is no longer owed; gsi2 `CB`/`<next_attempt_at>#<id>` while its callback is due; gsi3 `DEADLINE#<shard>`/`<deadline_at>#<id>` while unfinished with a deadline; gsi4 `JOBS`/`<id>`; gsi5 `OWNER#<owner>`/`<id>` |
//! | a task | `JOB#<id>` | `T#<index>` | gsi2 `Q#<job>`/`<run_at>#<index>` while pending; gsi3 `N#<node>`/`<job>#<index>` while running, `F#<job>`/`<fail_seq>` once failed |
//! | an idempotency key | `IDEM#<owner>#<key>` | `IDEM` | |
//! | a group of jobs | `GROUPS#<owner>` | `G#<name>` | |
//! | a node's lease | `NODES` | `<node>` | |
//!
//! - **Submission** writes the tasks first (BatchWriteItem, 25 a request, many at once), then
//!   the job item (with the idempotency key item, in one transaction): a job is visible to
//!   claims, reads and lists only once all its tasks are stored.
//! - **Claim** reads the least recently served unfinished jobs from gsi1 (a few shards,
//!   queried together), then each job's due pending tasks from its queue in gsi2, and takes
//!   them with one TransactWriteItems per job (up to 99 tasks and the job item): each task on
//!   condition that it is still pending in the attempt that was read and due, the job's
//!   `n_running` raised on condition that the job is unfinished and under its concurrency.
//!   The indexes are eventually consistent on a real region, so a claim may see a task that
//!   was just taken: its condition fails, the transaction is retried without it.
//!   Priorities order the jobs read (`plan::levels`, from the options they carry): with
//!   more unfinished jobs than a claim reads (twice its free slots and 8), a job of high
//!   priority served a moment ago waits for its turn in the rotation, unlike on SQL.
//! - **Settle** writes a job's outcomes in transactions of up to 99 tasks plus the job item
//!   (counters `n_done`, `n_complete`, `n_failed`, `n_running`). Each task on condition that
//!   it is running that attempt under this node; the job item on condition that the job is
//!   unfinished and that this transaction does not finish it (`n_done < total - k`), or,
//!   for the transaction that does, that the counters are exactly the ones read
//!   (`n_done = total - k`): only one transaction can ever finish a job, and it sets the
//!   final status and makes the callback due (puts the job in gsi2 `CB`) at once.
//!   Failure numbers (`fail_seq`, the events stream's cursor) are reserved beforehand with an
//!   atomic ADD on the job item, so an outcome that turns out stale leaves a gap, never a
//!   repeat.
//! - **Leases** are per node: `NODES`/`<node>` holds `alive_until`, raised by every claim
//!   (before its tasks are taken) and by `tasks_renew`, one write however many tasks the
//!   node runs. `tasks_expire` reads the `NODES` partition and, for each node past its
//!   lease, its running tasks from gsi3 `N#<node>`, and puts them back in their queue (with
//!   the job's `n_running` lowered in the same transaction). A dead node's item is deleted
//!   only long after it expired, once the index shows it nothing, so that the index's lag
//!   cannot hide one of its tasks.
//! - **Cancel** is one conditional write of the job item: status Cancelled, its unfinished
//!   tasks counted as cancelled, callback due. Its tasks still pending are not rewritten
//!   (a job of 100,000 tasks cancels in one write); they read as Cancelled, since their job
//!   is, and no claim takes them (the job left gsi1, and claims are conditional on an
//!   unfinished job). Running tasks are marked Cancelled at once where the index shows them,
//!   or when their late outcome is refused.
//! - **A deadline** ends a job the same way (`job_expire`): one conditional write of the job
//!   item, its unfinished tasks counted as failed and read as Failed with the deadline's
//!   error, kept on the job item (`expired_error`); their stopped calls are marked Cancelled,
//!   which reads Failed too. Such failures have no failure number, so the events stream
//!   does not list them one by one (the job's `finished` event follows).
//! - **Callbacks** are the job items in gsi2 `CB`, sorted by due time: `callbacks_due`
//!   leases one by moving its due time on condition that it is still the one read;
//!   `callback_record` writes an attempt on condition that the attempts stored are one less.
//! - **Delete and retention** flag the job item as being deleted (it then reads as gone),
//!   delete the partition's other items, then the idempotency key and the job item; a
//!   deletion cut short is finished by the next purge (the job stays in gsi1 `DONE`).
//!
//! No request scans the table: every read is a GetItem, BatchGetItem, or a Query of one
//! partition of the table or of an index.
//!
//! # Values
//!
//! Parameters, results and errors are stored as the exact JSON text received (string
//! attributes), never as DynamoDB numbers or maps, so every number round-trips digit for
//! digit (`1e400`, `12345678901234567890`, `-0.0`). An item is limited to 400 KB: a task
//! result larger than [`MAX_RESULT_BYTES`] is stored as a failure (`response_too_large`), and
//! a submission whose parameters do not fit is refused before anything is stored.
//!
//! # Notices
//!
//! DynamoDB has no LISTEN: [`Store::listen`] returns `None` and the engine looks at the
//! table every second when idle (see docs/dynamodb.md for what that costs).
//!
//! # Parts
//!
//! - `items`: the keys and attributes of each item above, and how items read as records.
//! - `requests`: one function for each kind of request, counted in [`OpCounts`].
//! - `tx`: TransactWriteItems, and a job item written with some of its tasks, tried again
//!   without the stale ones (claim, settle, take-back).
//! - `jobs`: submission, reads, lists, cancel. `retention`: delete and purge.
//! - `claim`: claims and overdue awaited tasks. `leases`: node leases and their expiry.
//! - `job_groups`: a group's item (its limits, members and rate), and what a claim of a
//!   group with limits writes to it.
//! - `settle`: outcomes, reports and heartbeats. `callbacks`: the outbox.
//! - `control`: pause, limits, retry, deadlines.
//! - `schema`: the table and its URL. `expr`: expressions and attribute values.

mod callbacks;
mod claim;
mod control;
mod expr;
mod items;
mod job_groups;
mod jobs;
mod leases;
mod requests;
mod retention;
mod schema;
mod settle;
mod tx;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;

use self::expr::{Ex, Item, s};
use self::items::job_from_item;
pub use self::requests::OpCounts;
pub use self::schema::Migrated;
use self::schema::{Location, sdk_error};
use super::{
    CallbackDue, CallbackRecord, CancelOutcome, Claim, ClaimParams, ClaimedTask, DeleteOutcome,
    FailedTask, IdempotencyKey, InsertOutcome, ItemLimits, JobListQuery, JobRecord, Millis, NodeId,
    Notices, OverdueParams, ReportOutcome, SettleReport, Store, StoreError, StoreResult,
    TaskPageQuery, TaskRecord, TaskReport, TaskSettle,
};
use crate::job::{JobId, NewJob};

/// Largest task result stored, in bytes of JSON text: a task item also holds its
/// parameters' key and bookkeeping, and DynamoDB refuses items over 400 KB.
pub const MAX_RESULT_BYTES: usize = 300_000;

/// Largest endpoint plus parameters of one task, in bytes; the default `--max-params-bytes`
/// (256 KiB) fits.
pub const MAX_PARAMS_BYTES: usize = 350_000;

/// The DynamoDB backend: a client of one table, and the requests it has made.
pub struct DynamoStore {
    client: Client,
    table: String,
    pub counts: Arc<OpCounts>,
    /// Whether the table's claim index carries tasks' call settings (see
    /// `schema::check_table`).
    task_calls: bool,
}

impl DynamoStore {
    /// Connects to the table of a `dynamodb://TABLE?region=REGION[&endpoint=URL]` URL and
    /// checks that it exists with its indexes (`doparallel migrate` creates it).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let location = Location::parse(url)?;
        let (client, region) = schema::client(&location).await?;
        let task_calls = schema::check_table(&client, &location, &region).await?;
        Ok(DynamoStore {
            client,
            table: location.table,
            counts: Arc::default(),
            task_calls,
        })
    }

    /// Creates the table of the URL unless it exists, and waits until it is active.
    pub async fn migrate(url: &str) -> StoreResult<(Migrated, String)> {
        let location = Location::parse(url)?;
        let (client, region) = schema::client(&location).await?;
        let outcome = schema::create_table(&client, &location.table).await?;
        Ok((
            outcome,
            format!("table {} in region {region}", location.table),
        ))
    }
}

#[async_trait]
impl Store for DynamoStore {
    fn item_limits(&self) -> ItemLimits {
        ItemLimits {
            max_params_bytes: Some(MAX_PARAMS_BYTES),
            max_result_bytes: Some(MAX_RESULT_BYTES),
        }
    }

    async fn job_insert(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
        now: Millis,
    ) -> StoreResult<InsertOutcome> {
        self.insert_job(job, idempotency, now).await
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.job_item(id)
            .await?
            .as_ref()
            .map(job_from_item)
            .transpose()
    }

    async fn job_list(&self, query: &JobListQuery) -> StoreResult<Vec<JobRecord>> {
        self.list_jobs(query).await
    }

    async fn tasks_page(&self, id: JobId, query: &TaskPageQuery) -> StoreResult<Vec<TaskRecord>> {
        self.task_page(id, query).await
    }

    async fn tasks_failed_since(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<FailedTask>> {
        self.failures_since(id, after, limit).await
    }

    async fn jobs_deadline(&self, now: Millis, limit: u32) -> StoreResult<super::Deadlines> {
        self.deadlines(now, limit).await
    }

    async fn job_expire(
        &self,
        id: JobId,
        error: &serde_json::value::RawValue,
        now: Millis,
    ) -> StoreResult<super::ExpireOutcome> {
        self.expire_job(id, error, now).await
    }

    async fn tasks_heartbeat(
        &self,
        beat: &super::TaskHeartbeat,
    ) -> StoreResult<super::HeartbeatOutcome> {
        self.heartbeat(beat).await
    }

    async fn job_end(
        &self,
        id: JobId,
        status: crate::job::JobStatus,
        now: Millis,
    ) -> StoreResult<CancelOutcome> {
        self.end_job(id, status, now).await
    }

    async fn job_set_options(
        &self,
        id: JobId,
        seen: &crate::job::JobOptions,
        options: &crate::job::JobOptions,
    ) -> StoreResult<super::OptionsOutcome> {
        self.set_options(id, seen, options).await
    }

    async fn job_pause(&self, id: JobId, pause: bool) -> StoreResult<super::PauseOutcome> {
        self.pause_job(id, pause).await
    }

    async fn job_retry(
        &self,
        id: JobId,
        include: &[crate::job::TaskStatus],
        now: Millis,
    ) -> StoreResult<super::RetryOutcome> {
        self.retry_job(id, include, now).await
    }

    async fn job_delete(&self, id: JobId) -> StoreResult<DeleteOutcome> {
        self.delete_finished(id).await
    }

    async fn jobs_purge(&self, finished_before: Millis, limit: u32) -> StoreResult<u64> {
        self.purge_finished(finished_before, limit).await
    }

    async fn queue_depth(&self) -> StoreResult<u64> {
        self.queued_tasks().await
    }

    async fn group_set(
        &self,
        owner: Option<&str>,
        name: &str,
        limits: &crate::job::GroupLimits,
    ) -> StoreResult<()> {
        DynamoStore::group_set(self, owner, name, limits).await
    }

    async fn group_delete(&self, owner: Option<&str>, name: &str) -> StoreResult<bool> {
        DynamoStore::group_delete(self, owner, name).await
    }

    async fn groups_list(
        &self,
        owner: Option<&str>,
        name: Option<&str>,
    ) -> StoreResult<Vec<super::GroupRecord>> {
        DynamoStore::groups_list(self, owner, name).await
    }

    async fn tasks_claim(&self, params: &ClaimParams) -> StoreResult<Claim> {
        self.claim(params).await
    }

    async fn tasks_settle(&self, node: NodeId, batch: &[TaskSettle]) -> StoreResult<SettleReport> {
        self.settle_batch(node, batch).await
    }

    async fn tasks_report(&self, report: &TaskReport) -> StoreResult<ReportOutcome> {
        self.apply_report(report).await
    }

    async fn tasks_overdue(&self, params: &OverdueParams) -> StoreResult<Vec<ClaimedTask>> {
        self.take_overdue(params).await
    }

    async fn task_token_key(&self) -> StoreResult<Vec<u8>> {
        let key: Item = HashMap::from([
            ("pk".into(), s("SETTINGS")),
            ("sk".into(), s("task_token_key")),
        ]);
        for _ in 0..3 {
            if let Some(item) = self.get(key.clone()).await?
                && let Some(AttributeValue::B(value)) = item.get("value")
            {
                return Ok(value.clone().into_inner());
            }
            // The first node to ask makes it; a node that loses the race reads the winner's.
            let mut item = key.clone();
            let secret: [u8; 32] = rand::random();
            item.insert(
                "value".into(),
                AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(secret.to_vec())),
            );
            let mut ex = Ex::default();
            let cond = format!("attribute_not_exists({})", ex.n("pk"));
            self.count("PutItem");
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression(cond)
                .set_expression_attribute_names(ex.names())
                .send()
                .await;
            match put {
                Ok(_) => return Ok(secret.to_vec()),
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => continue,
                Err(e) => return Err(sdk_error("PutItem", e)),
            }
        }
        Err(StoreError::Other(
            "the task token key could not be read nor created".into(),
        ))
    }

    async fn tasks_renew(&self, node: NodeId, until: Millis) -> StoreResult<u64> {
        self.renew_lease(node, until).await
    }

    async fn tasks_expire(&self, now: Millis) -> StoreResult<u64> {
        self.expire_leases(now).await
    }

    async fn tasks_recover(&self) -> StoreResult<u64> {
        // Shared by several nodes: what looks interrupted may be another node's call in
        // flight, so only what is past its lease is taken back, as the sweep would.
        self.expire_leases(super::now_millis()).await
    }

    async fn callbacks_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<CallbackDue>> {
        self.lease_due_callbacks(now, lease_until, limit).await
    }

    async fn callback_next_due(&self) -> StoreResult<Option<Millis>> {
        self.next_callback_due().await
    }

    async fn callback_record(&self, record: &CallbackRecord) -> StoreResult<bool> {
        self.record_callback(record).await
    }

    async fn listen(&self) -> StoreResult<Option<Notices>> {
        // DynamoDB has no LISTEN; the engine polls at its idle interval.
        Ok(None)
    }

    async fn health(&self) -> StoreResult<()> {
        self.get(HashMap::from([
            ("pk".into(), s("HEALTH")),
            ("sk".into(), s("HEALTH")),
        ]))
        .await?;
        Ok(())
    }
}
