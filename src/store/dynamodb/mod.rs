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
//! | a job (`META`) | `JOB#<id>` | `META` | gsi1 `ACTIVE#<shard>`/`<last_claim_at>#<id>` while unfinished, `DONE#<shard>`/`<finished_at>#<id>` once its callback is no longer owed; gsi2 `CB`/`<next_attempt_at>#<id>` while its callback is due; gsi4 `JOBS`/`<id>`; gsi5 `OWNER#<owner>`/`<id>` |
//! | a task | `JOB#<id>` | `T#<index>` | gsi2 `Q#<job>`/`<run_at>#<index>` while pending; gsi3 `N#<node>`/`<job>#<index>` while running, `F#<job>`/`<fail_seq>` once failed |
//! | an idempotency key | `IDEM#<owner>#<key>` | `IDEM` | |
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

mod expr;
mod schema;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, KeysAndAttributes, Put, PutRequest, ReturnValue, Select,
    TransactWriteItem, WriteRequest,
};
use futures_util::{StreamExt, TryStreamExt, stream};
use serde_json::value::RawValue;

use self::expr::{Change, Ex, Item, eq, get_n, get_s, is_in, n, need_n, need_s, s};
pub use self::schema::Migrated;
use self::schema::{Location, sdk_error};
use super::codec::{self, parse_id, parse_options};
use super::plan::{self, FairShare};
use super::{
    CallbackDue, CallbackInfo, CallbackOutcome, CallbackRecord, CancelOutcome, Claim, ClaimParams,
    ClaimedTask, DeleteOutcome, FailedTask, IdempotencyKey, InsertOutcome, JobFinished,
    JobListQuery, JobRecord, Millis, NodeId, Notices, OverdueParams, ReportOutcome, SettleOutcome,
    SettleReport, Store, StoreError, StoreResult, TaskPageQuery, TaskRecord, TaskReport,
    TaskSettle, url_text,
};
use crate::job::{CallbackState, JobId, JobOptions, JobStatus, NewJob, TaskStatus};

/// Largest task result stored, in bytes of JSON text: a task item also holds its
/// parameters' key and bookkeeping, and DynamoDB refuses items over 400 KB.
pub const MAX_RESULT_BYTES: usize = 300_000;

/// Largest endpoint plus parameters of one task, in bytes; the default `--max-params-bytes`
/// (256 KiB) fits.
pub const MAX_PARAMS_BYTES: usize = 350_000;

/// Items per transaction: DynamoDB's limit is 100; one place is the job item's.
const TX_TASKS: usize = 99;

/// Items per BatchWriteItem (DynamoDB's limit).
const BATCH_WRITE: usize = 25;

/// Keys per BatchGetItem (DynamoDB's limit).
const BATCH_GET: usize = 100;

/// Requests in flight at once for one store call (a submission's batches, a claim's jobs).
const PARALLEL: usize = 16;

/// Shards of gsi1's `ACTIVE#` and `DONE#` partitions, so that no one index partition takes
/// every job's writes.
const SHARDS: u8 = 4;

/// How often a transaction is tried again after a conflict or a stale item.
const TX_TRIES: usize = 8;

/// How long after its lease ran out a node's item is kept, so that gsi3's lag cannot hide a
/// task it claimed just before it died.
const NODE_FORGET_MS: Millis = 10 * 60 * 1000;

/// Task and job statuses as stored: their names.
fn job_status_from(text: &str) -> StoreResult<JobStatus> {
    Ok(match text {
        "Pending" => JobStatus::Pending,
        "Running" => JobStatus::Running,
        "Complete" => JobStatus::Complete,
        "Failed" => JobStatus::Failed,
        "Cancelled" => JobStatus::Cancelled,
        other => return Err(StoreError::Other(format!("unknown job status {other:?}"))),
    })
}

fn task_status_from(text: &str) -> StoreResult<TaskStatus> {
    Ok(match text {
        "Pending" => TaskStatus::Pending,
        "Running" => TaskStatus::Running,
        "Complete" => TaskStatus::Complete,
        "Failed" => TaskStatus::Failed,
        "Cancelled" => TaskStatus::Cancelled,
        other => return Err(StoreError::Other(format!("unknown task status {other:?}"))),
    })
}

const UNFINISHED: [&str; 2] = ["Pending", "Running"];
const FINISHED: [&str; 3] = ["Complete", "Failed", "Cancelled"];

const CB_PENDING: &str = "pending";
const CB_DELIVERED: &str = "delivered";
const CB_FAILED: &str = "failed";

fn job_pk(id: JobId) -> String {
    format!("JOB#{id}")
}

fn task_sk(index: u64) -> String {
    format!("T#{index:010}")
}

fn job_key(id: JobId) -> Item {
    HashMap::from([("pk".into(), s(job_pk(id))), ("sk".into(), s("META"))])
}

fn task_key(id: JobId, index: u64) -> Item {
    HashMap::from([
        ("pk".into(), s(job_pk(id))),
        ("sk".into(), s(task_sk(index))),
    ])
}

fn idem_key(owner: Option<&str>, key: &str) -> Item {
    HashMap::from([
        (
            "pk".into(),
            s(format!("IDEM#{}#{key}", owner.unwrap_or("-"))),
        ),
        ("sk".into(), s("IDEM")),
    ])
}

fn node_key(node: NodeId) -> Item {
    HashMap::from([
        ("pk".into(), s("NODES")),
        ("sk".into(), s(node.to_string())),
    ])
}

/// A time as it sorts in an index key.
fn pad_time(t: Millis) -> String {
    format!("{:013}", t.max(0))
}

fn shard(id: JobId) -> u8 {
    // The last byte of a UUIDv7 is random; the first ones are the time.
    let text = id.to_string();
    u8::from_str_radix(&text[text.len() - 2..], 16).unwrap_or(0) % SHARDS
}

fn queue_pk(id: JobId) -> String {
    format!("Q#{id}")
}

fn queue_sk(run_at: Millis, index: u64) -> String {
    format!("{}#{index:010}", pad_time(run_at))
}

/// The job id in a `JOB#<id>` key.
fn id_of_pk(pk: &str) -> StoreResult<JobId> {
    parse_id(pk.strip_prefix("JOB#").unwrap_or(pk))
}

/// The task index in a `T#<index>` key.
fn index_of_sk(sk: &str) -> StoreResult<u64> {
    sk.strip_prefix("T#")
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| StoreError::Other(format!("stored task key {sk:?} is invalid")))
}

fn raw(text: &str) -> StoreResult<Box<RawValue>> {
    Ok(codec::raw(Some(text.to_string()))?.expect("some text"))
}

/// Requests made, per operation: the cost figures of docs/dynamodb.md come from these.
#[derive(Default)]
pub struct OpCounts(Mutex<BTreeMap<&'static str, u64>>);

impl OpCounts {
    fn add(&self, op: &'static str, n: u64) {
        *self.0.lock().expect("not poisoned").entry(op).or_default() += n;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// Why a transaction was cancelled, per action (DynamoDB's cancellation reasons).
enum TxOutcome {
    Done,
    /// The code of each action's reason, in order (`None` where the action was fine).
    Cancelled(Vec<Option<String>>),
}

pub struct DynamoStore {
    client: Client,
    table: String,
    pub counts: Arc<OpCounts>,
}

impl DynamoStore {
    /// Connects to the table of a `dynamodb://TABLE?region=REGION[&endpoint=URL]` URL and
    /// checks that it exists with its indexes (`doparallel migrate` creates it).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let location = Location::parse(url)?;
        let (client, region) = schema::client(&location).await?;
        schema::check_table(&client, &location, &region).await?;
        Ok(DynamoStore {
            client,
            table: location.table,
            counts: Arc::default(),
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

    fn count(&self, op: &'static str) {
        self.counts.add(op, 1);
        tracing::trace!(op, "dynamodb request");
    }

    async fn get(&self, key: Item) -> StoreResult<Option<Item>> {
        self.count("GetItem");
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", e))?;
        Ok(out.item)
    }

    /// The job item, unless it is missing or being deleted.
    async fn job_item(&self, id: JobId) -> StoreResult<Option<Item>> {
        Ok(self
            .get(job_key(id))
            .await?
            .filter(|item| !item.contains_key("deleting")))
    }

    /// One UpdateItem; `Ok(None)` when its condition did not hold.
    async fn update(
        &self,
        key: Item,
        change: Change,
        returning: Option<ReturnValue>,
    ) -> StoreResult<Option<Item>> {
        self.count("UpdateItem");
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(change.update_expression())
            .set_condition_expression(change.condition())
            .set_expression_attribute_names(change.ex.names())
            .set_expression_attribute_values(change.ex.values())
            .set_return_values(returning)
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(out.attributes.unwrap_or_default())),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(sdk_error("UpdateItem", e)),
        }
    }

    /// One TransactWriteItems, with a request token so that the SDK's own retry of a
    /// transaction that did commit is not mistaken for a conflict.
    async fn transact(&self, items: Vec<TransactWriteItem>) -> StoreResult<TxOutcome> {
        self.count("TransactWriteItems");
        self.counts
            .add("TransactWriteItems.items", items.len() as u64);
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(uuid::Uuid::now_v7().to_string())
            .send()
            .await;
        match result {
            Ok(_) => Ok(TxOutcome::Done),
            Err(
                e @ (SdkError::TimeoutError(_)
                | SdkError::DispatchFailure(_)
                | SdkError::ResponseError(_)),
            ) => Err(sdk_error("TransactWriteItems", e)),
            Err(SdkError::ServiceError(s)) if s.raw().status().is_server_error() => {
                Err(StoreError::Unavailable(format!(
                    "DynamoDB TransactWriteItems: answered {} ({})",
                    s.raw().status(),
                    aws_sdk_dynamodb::error::DisplayErrorContext(s.err())
                )))
            }
            Err(e) => match e.into_service_error() {
                TransactWriteItemsError::TransactionCanceledException(c) => {
                    Ok(TxOutcome::Cancelled(
                        c.cancellation_reasons()
                            .iter()
                            .map(|r| r.code().filter(|c| *c != "None").map(str::to_string))
                            .collect(),
                    ))
                }
                other if other.code() == Some("TransactionConflictException") => {
                    Ok(TxOutcome::Cancelled(Vec::new()))
                }
                other => {
                    let passing = matches!(
                        other.code(),
                        Some(
                            "ProvisionedThroughputExceededException"
                                | "ThrottlingException"
                                | "RequestLimitExceeded"
                                | "InternalServerError"
                                | "TransactionInProgressException"
                        )
                    );
                    let text = format!(
                        "DynamoDB TransactWriteItems: {}",
                        aws_sdk_dynamodb::error::DisplayErrorContext(&other)
                    );
                    Err(if passing {
                        StoreError::Unavailable(text)
                    } else {
                        StoreError::Other(text)
                    })
                }
            },
        }
    }

    fn tx_update(&self, key: Item, change: Change) -> StoreResult<TransactWriteItem> {
        Ok(TransactWriteItem::builder()
            .update(change.into_update(&self.table, key)?)
            .build())
    }

    /// Every item of a query, page after page (at most `max` of them).
    async fn query_all(
        &self,
        index: Option<&str>,
        key_condition: String,
        ex: Ex,
        filter: Option<String>,
        forward: bool,
        max: usize,
    ) -> StoreResult<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            self.count("Query");
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(index.map(str::to_string))
                .key_condition_expression(&key_condition)
                .set_filter_expression(filter.clone())
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .scan_index_forward(forward)
                .consistent_read(index.is_none())
                .limit((max - items.len()).clamp(1, 1000) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(key) if items.len() < max => start = Some(key),
                _ => return Ok(items),
            }
        }
    }

    /// Items by key, in any order; missing ones are left out.
    async fn batch_get(&self, keys: Vec<Item>) -> StoreResult<Vec<Item>> {
        let chunks: Vec<Vec<Item>> = keys.chunks(BATCH_GET).map(|c| c.to_vec()).collect();
        let pages: Vec<Vec<Item>> = stream::iter(chunks)
            .map(|chunk| self.batch_get_chunk(chunk))
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        Ok(pages.into_iter().flatten().collect())
    }

    async fn batch_get_chunk(&self, keys: Vec<Item>) -> StoreResult<Vec<Item>> {
        let mut items = Vec::with_capacity(keys.len());
        let mut pending = keys;
        let mut delay = Duration::from_millis(20);
        for _ in 0..20 {
            if pending.is_empty() {
                return Ok(items);
            }
            self.count("BatchGetItem");
            let request = KeysAndAttributes::builder()
                .set_keys(Some(std::mem::take(&mut pending)))
                .consistent_read(true)
                .build()
                .map_err(|e| StoreError::Other(e.to_string()))?;
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| sdk_error("BatchGetItem", e))?;
            if let Some(mut responses) = out.responses {
                items.extend(responses.remove(&self.table).unwrap_or_default());
            }
            if let Some(mut left) = out.unprocessed_keys {
                pending = left.remove(&self.table).map(|k| k.keys).unwrap_or_default();
                if !pending.is_empty() {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        Err(StoreError::Unavailable(
            "DynamoDB BatchGetItem left keys unprocessed 20 times (throttled)".into(),
        ))
    }

    /// Writes (puts or deletes) in batches of 25, many at once, until none is left
    /// unprocessed.
    async fn batch_write(&self, requests: Vec<WriteRequest>) -> StoreResult<()> {
        let chunks: Vec<Vec<WriteRequest>> =
            requests.chunks(BATCH_WRITE).map(|c| c.to_vec()).collect();
        stream::iter(chunks)
            .map(|chunk| self.batch_write_chunk(chunk))
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn batch_write_chunk(&self, requests: Vec<WriteRequest>) -> StoreResult<()> {
        let mut pending = requests;
        let mut delay = Duration::from_millis(20);
        for _ in 0..20 {
            if pending.is_empty() {
                return Ok(());
            }
            self.count("BatchWriteItem");
            self.counts
                .add("BatchWriteItem.items", pending.len() as u64);
            let out = self
                .client
                .batch_write_item()
                .request_items(&self.table, std::mem::take(&mut pending))
                .send()
                .await
                .map_err(|e| sdk_error("BatchWriteItem", e))?;
            if let Some(mut left) = out.unprocessed_items {
                pending = left.remove(&self.table).unwrap_or_default();
                if !pending.is_empty() {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        Err(StoreError::Unavailable(
            "DynamoDB BatchWriteItem left items unprocessed 20 times (throttled)".into(),
        ))
    }

    /// Deletes every item of a job's partition except the job item, which goes last with
    /// its idempotency key: a deletion cut short is finished by the next one.
    async fn delete_partition(&self, id: JobId, job: &Item) -> StoreResult<()> {
        loop {
            // A page of keys at a time, so that a job of any size is deleted within bounded
            // memory.
            let mut ex_page = Ex::default();
            let cond_page = format!("{} = {}", ex_page.n("pk"), ex_page.v(s(job_pk(id))));
            let page = self
                .query_keys(cond_page, ex_page, 10_000)
                .await?
                .into_iter()
                .filter(|k| get_s(k, "sk") != Some("META"))
                .collect::<Vec<_>>();
            if page.is_empty() {
                break;
            }
            let requests = page
                .into_iter()
                .map(|key| {
                    DeleteRequest::builder()
                        .set_key(Some(key))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                        .map_err(|e| StoreError::Other(e.to_string()))
                })
                .collect::<StoreResult<Vec<_>>>()?;
            self.batch_write(requests).await?;
        }
        if let Some(key) = get_s(job, "idem_key") {
            // Only if it still names this job.
            let only = Change::new().when(|e| eq(e, "job_id", s(id.to_string())));
            self.delete(idem_key(get_s(job, "owner"), key), only)
                .await?;
        }
        self.delete(job_key(id), Change::new()).await?;
        Ok(())
    }

    /// One DeleteItem under the conditions of `only` (its updates are ignored); false when
    /// they did not hold.
    async fn delete(&self, key: Item, only: Change) -> StoreResult<bool> {
        self.count("DeleteItem");
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .set_condition_expression(only.condition())
            .set_expression_attribute_names(only.ex.names())
            .set_expression_attribute_values(only.ex.values())
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(sdk_error("DeleteItem", e)),
        }
    }

    /// The keys (`pk`, `sk`) of a query of the table, up to `max`.
    async fn query_keys(
        &self,
        key_condition: String,
        ex: Ex,
        max: usize,
    ) -> StoreResult<Vec<Item>> {
        let mut keys = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            self.count("Query");
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression(&key_condition)
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .projection_expression("pk, sk")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            keys.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(key) if keys.len() < max => start = Some(key),
                _ => return Ok(keys),
            }
        }
    }

    /// Deletes a finished job whose callback is not owed: flags it (it reads as gone from
    /// then on), then removes its items. False when it no longer qualifies.
    async fn delete_job(&self, id: JobId) -> StoreResult<bool> {
        let change = Change::new()
            .set("deleting", AttributeValue::Bool(true))
            .when(|e| format!("attribute_exists({})", e.n("pk")))
            .when(|e| is_in(e, "status", &FINISHED))
            .when(|e| {
                let state = e.n("cb_state");
                format!(
                    "attribute_not_exists({state}) OR {state} <> {}",
                    e.v(s(CB_PENDING))
                )
            });
        let Some(job) = self
            .update(job_key(id), change, Some(ReturnValue::AllNew))
            .await?
        else {
            return Ok(false);
        };
        self.delete_partition(id, &job).await?;
        Ok(true)
    }

    /// Raises this node's lease to at least `until` (creating its item).
    async fn node_alive(&self, node: NodeId, until: Millis, raise_only: bool) -> StoreResult<()> {
        let mut change = Change::new().set("alive_until", n(until));
        if raise_only {
            change = change.when(|e| {
                let alive = e.n("alive_until");
                format!(
                    "attribute_not_exists({alive}) OR {alive} < {}",
                    e.v(n(until))
                )
            });
        }
        self.update(node_key(node), change, None).await?;
        Ok(())
    }

    /// The running tasks gsi3 shows for a node, as (job, index, attempts); of one job when
    /// given.
    async fn node_tasks(
        &self,
        node: NodeId,
        job: Option<JobId>,
    ) -> StoreResult<Vec<(JobId, u64, u32)>> {
        let mut ex = Ex::default();
        let mut cond = format!("{} = {}", ex.n("g3pk"), ex.v(s(format!("N#{node}"))));
        if let Some(job) = job {
            cond.push_str(&format!(
                " AND begins_with({}, {})",
                ex.n("g3sk"),
                ex.v(s(format!("{job}#")))
            ));
        }
        let items = self
            .query_all(Some("gsi3"), cond, ex, None, true, usize::MAX)
            .await?;
        items
            .iter()
            .map(|item| {
                Ok((
                    id_of_pk(need_s(item, "pk")?)?,
                    index_of_sk(need_s(item, "sk")?)?,
                    need_n(item, "attempts")?,
                ))
            })
            .collect()
    }

    /// Marks a cancelled job's running task Cancelled, if it still runs that attempt under
    /// that node (an outcome refused, a lease expired, or a cancel sweeping).
    async fn cancel_running_task(
        &self,
        job: JobId,
        index: u64,
        attempt: u32,
        node: Option<NodeId>,
        now: Millis,
    ) -> StoreResult<()> {
        let mut change = Change::new()
            .set("status", s("Cancelled"))
            .set("finished_at", n(now))
            .remove("node")
            .remove("g3pk")
            .remove("g3sk")
            .when(|e| eq(e, "status", s("Running")))
            .when(|e| eq(e, "attempts", n(attempt)));
        if let Some(node) = node {
            change = change.when(|e| eq(e, "node", s(node.to_string())));
        }
        self.update(task_key(job, index), change, None).await?;
        Ok(())
    }

    /// The nodes that hold leases: (node, alive_until).
    async fn nodes(&self) -> StoreResult<Vec<(NodeId, Millis)>> {
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("pk"), ex.v(s("NODES")));
        let items = self
            .query_all(None, cond, ex, None, true, usize::MAX)
            .await?;
        items
            .iter()
            .map(|item| {
                let text = need_s(item, "sk")?;
                let node = i64::from_str_radix(text, 16)
                    .map_err(|_| StoreError::Other(format!("stored node {text:?} is invalid")))?;
                Ok((NodeId(node), need_n(item, "alive_until")?))
            })
            .collect()
    }
}

/// A job item as a record.
fn job_from_item(item: &Item) -> StoreResult<JobRecord> {
    let callback_url = get_s(item, "callback_url").map(str::to_string);
    let state = match (callback_url.is_some(), get_s(item, "cb_state")) {
        (false, _) => CallbackState::None,
        (true, None | Some(CB_PENDING)) => CallbackState::Pending,
        (true, Some(CB_DELIVERED)) => CallbackState::Delivered,
        (true, Some(_)) => CallbackState::Failed,
    };
    let status = job_status_from(need_s(item, "status")?)?;
    Ok(JobRecord {
        id: parse_id(need_s(item, "id")?)?,
        owner: get_s(item, "owner").map(str::to_string),
        status,
        options: parse_options(need_s(item, "options")?)?,
        total: need_n(item, "total")?,
        running: need_n(item, "n_running")?,
        complete: need_n(item, "n_complete")?,
        failed: need_n(item, "n_failed")?,
        cancelled: need_n(item, "n_cancelled")?,
        created_at: need_n(item, "created_at")?,
        finished_at: get_n(item, "finished_at"),
        callback_url,
        callback: CallbackInfo {
            state,
            attempts: get_n(item, "cb_attempts").unwrap_or(0),
            last_error: get_s(item, "cb_error").map(str::to_string),
        },
    })
}

/// A task item as a record; a task left pending or running by a cancelled job reads as
/// Cancelled (see the module docs).
fn task_from_item(item: &Item, job: &JobRecord) -> StoreResult<TaskRecord> {
    let mut status = task_status_from(need_s(item, "status")?)?;
    let mut finished_at = get_n(item, "finished_at");
    if job.status == JobStatus::Cancelled
        && matches!(status, TaskStatus::Pending | TaskStatus::Running)
    {
        status = TaskStatus::Cancelled;
        finished_at = job.finished_at;
    }
    Ok(TaskRecord {
        index: need_n(item, "idx")?,
        status,
        attempts: need_n(item, "attempts")?,
        endpoint: need_s(item, "endpoint")?.to_string(),
        result: get_s(item, "result").map(raw).transpose()?,
        error: get_s(item, "error").map(raw).transpose()?,
        latency_ms: get_n(item, "latency_ms"),
        finished_at,
    })
}

/// The index attributes of a job that has just finished: its callback becomes due, or,
/// without one, it goes where retention finds it.
fn finish_job(change: Change, id: JobId, has_callback: bool, now: Millis) -> Change {
    let change = change.set("finished_at", n(now));
    if has_callback {
        // Out of the active jobs; into retention's index once the callback is settled.
        change
            .remove("g1pk")
            .remove("g1sk")
            .set("cb_state", s(CB_PENDING))
            .set("cb_attempts", n(0))
            .set("cb_next", n(now))
            .set("g2pk", s("CB"))
            .set("g2sk", s(format!("{}#{id}", pad_time(now))))
    } else {
        retire(change, id, now)
    }
}

/// Puts a finished job whose callback is no longer owed in gsi1 `DONE#`, by finish time.
fn retire(change: Change, id: JobId, finished_at: Millis) -> Change {
    change
        .set("g1pk", s(format!("DONE#{}", shard(id))))
        .set("g1sk", s(format!("{}#{id}", pad_time(finished_at))))
}

/// A settle outcome the store can keep: a result too large for an item becomes a failure
/// that says so.
fn storable(outcome: &SettleOutcome) -> SettleOutcome {
    match outcome {
        SettleOutcome::Complete { result } if result.get().len() > MAX_RESULT_BYTES => {
            let error = serde_json::json!({
                "kind": "response_too_large",
                "http_status": null,
                "message": format!(
                    "the result is {} bytes of JSON; the DynamoDB store keeps at most {MAX_RESULT_BYTES} \
                     per task (DynamoDB items are limited to 400 KB)",
                    result.get().len()
                ),
                "body": null,
            });
            SettleOutcome::Failed {
                error: serde_json::value::to_raw_value(&error).expect("JSON serializes"),
            }
        }
        other => other.clone(),
    }
}

/// What the settle of one job knows of it.
struct JobCounters {
    total: u64,
    done: u64,
    failed: u64,
    tolerated: u64,
    has_callback: bool,
    status: JobStatus,
}

impl JobCounters {
    fn from_item(item: &Item) -> StoreResult<Self> {
        Ok(JobCounters {
            total: need_n(item, "total")?,
            done: need_n(item, "n_done")?,
            failed: need_n(item, "n_failed")?,
            tolerated: need_n(item, "tolerated")?,
            has_callback: item.contains_key("callback_url"),
            status: job_status_from(need_s(item, "status")?)?,
        })
    }
}

/// A job as gsi1 shows it to a claim.
struct Candidate {
    id: JobId,
    /// gsi1 carries it since tables made by this version; `None` on older ones.
    owner: Option<Arc<str>>,
    options: Arc<JobOptions>,
    concurrency: Option<u64>,
    headroom: u64,
}

impl DynamoStore {
    /// Settles one job's outcomes (see the module docs).
    async fn settle_job(
        &self,
        node: Option<NodeId>,
        id: JobId,
        settles: Vec<&TaskSettle>,
    ) -> StoreResult<SettleReport> {
        let mut report = SettleReport::default();
        let Some(item) = self.job_item(id).await? else {
            return Ok(report);
        };
        let mut job = JobCounters::from_item(&item)?;
        if job.status.is_finished() {
            self.refuse_outcomes(node, id, &job, &settles).await?;
            return Ok(report);
        }
        let outcomes: Vec<(&TaskSettle, SettleOutcome)> =
            settles.iter().map(|t| (*t, storable(&t.outcome))).collect();

        // Failure numbers, reserved in one atomic step: a stale one leaves a gap.
        let failures = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, SettleOutcome::Failed { .. }))
            .count() as i64;
        let mut next_fail = 0u64;
        if failures > 0 {
            let change = Change::new()
                .add("fail_seq", failures)
                .when(|e| format!("attribute_exists({})", e.n("pk")));
            let Some(after) = self
                .update(job_key(id), change, Some(ReturnValue::UpdatedNew))
                .await?
            else {
                return Ok(report);
            };
            next_fail = need_n::<u64>(&after, "fail_seq")? + 1 - failures as u64;
        }
        let mut numbered = Vec::with_capacity(outcomes.len());
        for (settle, outcome) in outcomes {
            let fail_seq = matches!(outcome, SettleOutcome::Failed { .. }).then(|| {
                next_fail += 1;
                next_fail - 1
            });
            numbered.push((settle, outcome, fail_seq));
        }

        for chunk in numbered.chunks(TX_TASKS) {
            let mut items: Vec<_> = chunk.iter().collect();
            let mut tries = 0;
            while !items.is_empty() {
                let complete = items
                    .iter()
                    .filter(|(_, o, _)| matches!(o, SettleOutcome::Complete { .. }))
                    .count() as u64;
                let failed = items
                    .iter()
                    .filter(|(_, o, _)| matches!(o, SettleOutcome::Failed { .. }))
                    .count() as u64;
                let done = complete + failed;
                let awaiting = items
                    .iter()
                    .filter(|(_, o, _)| matches!(o, SettleOutcome::Await { .. }))
                    .count() as u64;
                // An awaited attempt stays running: it still counts against concurrency.
                let settled = items.len() as u64 - awaiting;
                let now = items.iter().map(|(t, _, _)| t.now).max().unwrap_or(0);
                let finishing = job.done + done == job.total;
                let final_status = plan::final_status(job.failed + failed, job.tolerated);

                let mut meta = Change::new()
                    .incr("n_running", -(settled as i64))
                    .incr("n_done", done as i64)
                    .incr("n_complete", complete as i64)
                    .incr("n_failed", failed as i64)
                    .when(|e| is_in(e, "status", &UNFINISHED));
                if finishing {
                    let (seen_done, seen_failed) = (job.done, job.failed);
                    meta = meta
                        .when(|e| eq(e, "n_done", n(seen_done)))
                        .when(|e| eq(e, "n_failed", n(seen_failed)))
                        .set("status", s(final_status.as_str()));
                    meta = finish_job(meta, id, job.has_callback, now);
                } else {
                    let below = job.total - done;
                    meta = meta.when(|e| format!("{} < {}", e.n("n_done"), e.v(n(below))));
                }
                let mut actions = vec![self.tx_update(job_key(id), meta)?];
                for (settle, outcome, fail_seq) in &items {
                    actions.push(self.tx_update(
                        task_key(id, settle.index),
                        settle_change(node, id, settle, outcome, *fail_seq),
                    )?);
                }
                match self.transact(actions).await? {
                    TxOutcome::Done => {
                        job.done += done;
                        job.failed += failed;
                        report.complete += complete;
                        report.failed += failed;
                        report.retried += settled - done;
                        report.awaiting += awaiting;
                        if finishing {
                            report.finished.push(JobFinished {
                                job_id: id,
                                status: final_status,
                                has_callback: job.has_callback,
                            });
                        }
                        break;
                    }
                    TxOutcome::Cancelled(reasons) => {
                        tries += 1;
                        if tries >= TX_TRIES {
                            return Err(StoreError::Unavailable(format!(
                                "settling job {id} kept conflicting with other writers"
                            )));
                        }
                        // Tasks whose condition failed are stale: their outcome is dropped.
                        let stale: Vec<usize> = reasons
                            .iter()
                            .enumerate()
                            .skip(1)
                            .filter(|(_, r)| r.as_deref() == Some("ConditionalCheckFailed"))
                            .map(|(i, _)| i - 1)
                            .collect();
                        let mut kept = Vec::with_capacity(items.len());
                        for (i, item) in items.into_iter().enumerate() {
                            if !stale.contains(&i) {
                                kept.push(item);
                            }
                        }
                        items = kept;
                        // The job changed (another node's settle, a cancel), or a conflict:
                        // read it again.
                        let Some(item) = self.job_item(id).await? else {
                            return Ok(report);
                        };
                        job = JobCounters::from_item(&item)?;
                        if job.status.is_finished() {
                            let left: Vec<&TaskSettle> = items.iter().map(|(t, _, _)| *t).collect();
                            self.refuse_outcomes(node, id, &job, &left).await?;
                            return Ok(report);
                        }
                        if tries > 2 {
                            tokio::time::sleep(Duration::from_millis(5 << tries.min(6))).await;
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Outcomes for a job that finished meanwhile (cancelled): none is stored, and the
    /// tasks that still run that attempt are marked Cancelled.
    async fn refuse_outcomes(
        &self,
        node: Option<NodeId>,
        id: JobId,
        job: &JobCounters,
        settles: &[&TaskSettle],
    ) -> StoreResult<()> {
        if job.status != JobStatus::Cancelled {
            return Ok(());
        }
        // Futures made first: a closure over borrowed settles in the stream would not be
        // general enough for the trait's boxed future.
        let updates: Vec<_> = settles
            .iter()
            .map(|t| self.cancel_running_task(id, t.index, t.attempt, node, t.now))
            .collect();
        stream::iter(updates)
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Takes one job's tasks from a node whose lease ran out; returns how many went back to
    /// the queue.
    async fn take_back(
        &self,
        node: NodeId,
        id: JobId,
        tasks: Vec<(u64, u32)>,
        now: Millis,
    ) -> StoreResult<u64> {
        let mut taken = 0;
        for chunk in tasks.chunks(TX_TASKS) {
            let mut items: Vec<(u64, u32)> = chunk.to_vec();
            for _ in 0..TX_TRIES {
                if items.is_empty() {
                    break;
                }
                let meta = Change::new()
                    .incr("n_running", -(items.len() as i64))
                    .when(|e| is_in(e, "status", &UNFINISHED));
                let mut actions = vec![self.tx_update(job_key(id), meta)?];
                for &(index, attempts) in &items {
                    let change = Change::new()
                        .set("status", s("Pending"))
                        .incr("attempts", -1)
                        .set("run_at", n(now))
                        .set("g2pk", s(queue_pk(id)))
                        .set("g2sk", s(queue_sk(now, index)))
                        .remove("node")
                        .remove("g3pk")
                        .remove("g3sk")
                        .when(|e| eq(e, "status", s("Running")))
                        .when(|e| eq(e, "attempts", n(attempts)))
                        .when(|e| eq(e, "node", s(node.to_string())));
                    actions.push(self.tx_update(task_key(id, index), change)?);
                }
                match self.transact(actions).await? {
                    TxOutcome::Done => {
                        taken += items.len() as u64;
                        break;
                    }
                    TxOutcome::Cancelled(reasons) => {
                        if reasons.first().and_then(|r| r.as_deref())
                            == Some("ConditionalCheckFailed")
                        {
                            // The job finished meanwhile: a cancelled job's tasks are
                            // marked Cancelled; a deleted job's are gone.
                            if let Some(item) = self.job_item(id).await?
                                && job_status_from(need_s(&item, "status")?)?
                                    == JobStatus::Cancelled
                            {
                                for &(index, attempts) in &items {
                                    self.cancel_running_task(id, index, attempts, Some(node), now)
                                        .await?;
                                }
                            }
                            break;
                        }
                        let stale: Vec<usize> = reasons
                            .iter()
                            .enumerate()
                            .skip(1)
                            .filter(|(_, r)| r.as_deref() == Some("ConditionalCheckFailed"))
                            .map(|(i, _)| i - 1)
                            .collect();
                        items = items
                            .into_iter()
                            .enumerate()
                            .filter(|(i, _)| !stale.contains(i))
                            .map(|(_, t)| t)
                            .collect();
                    }
                }
            }
        }
        Ok(taken)
    }

    /// Claims up to `want` due tasks of one job; returns them, whether the job had fewer due
    /// than wanted, and when its next waiting task is due.
    async fn claim_job(
        &self,
        params: &ClaimParams,
        candidate: &Candidate,
        want: u64,
    ) -> StoreResult<(Vec<ClaimedTask>, bool, Option<Millis>)> {
        let id = candidate.id;
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("g2pk"), ex.v(s(queue_pk(id))));
        // One more than wanted: the first one not due tells when the next is.
        let queue = self
            .query_all(Some("gsi2"), cond, ex, None, true, want as usize + 1)
            .await?;
        let mut due = Vec::new();
        let mut next_due = None;
        for item in &queue {
            let sk = need_s(item, "g2sk")?;
            let run_at: Millis = sk[..13]
                .parse()
                .map_err(|_| StoreError::Other(format!("stored queue key {sk:?} is invalid")))?;
            if run_at > params.now {
                next_due = Some(run_at);
                break;
            }
            if (due.len() as u64) < want {
                due.push((
                    need_n::<u64>(item, "idx")?,
                    need_n::<u32>(item, "attempts")?,
                    need_s(item, "endpoint")?.to_string(),
                    need_s(item, "params")?.to_string(),
                ));
            }
        }
        let exhausted = (due.len() as u64) < want;
        let mut claimed = Vec::new();
        let mut headroom = candidate.headroom;
        for chunk in due.chunks(TX_TASKS) {
            let mut items: Vec<_> = chunk.iter().collect();
            for _ in 0..TX_TRIES {
                items.truncate(headroom.min(items.len() as u64) as usize);
                if items.is_empty() {
                    break;
                }
                let k = items.len() as u64;
                let mut meta = Change::new()
                    .incr("n_running", k as i64)
                    .set("status", s("Running"))
                    .set("last_claim_at", n(params.now))
                    .set("g1sk", s(format!("{}#{id}", pad_time(params.now))))
                    .when(|e| is_in(e, "status", &UNFINISHED))
                    .when(|e| format!("attribute_exists({})", e.n("g1pk")));
                if let Some(limit) = candidate.concurrency {
                    let at_most = limit.saturating_sub(k);
                    meta = meta.when(|e| format!("{} <= {}", e.n("n_running"), e.v(n(at_most))));
                }
                let mut actions = vec![self.tx_update(job_key(id), meta)?];
                for (index, attempts, _, _) in &items {
                    let change = Change::new()
                        .set("status", s("Running"))
                        .incr("attempts", 1)
                        .set("node", s(params.node.to_string()))
                        .set("g3pk", s(format!("N#{}", params.node)))
                        .set("g3sk", s(format!("{id}#{index:010}")))
                        .remove("g2pk")
                        .remove("g2sk")
                        .when(|e| eq(e, "status", s("Pending")))
                        .when(|e| eq(e, "attempts", n(*attempts)))
                        .when(|e| format!("{} <= {}", e.n("run_at"), e.v(n(params.now))));
                    actions.push(self.tx_update(task_key(id, *index), change)?);
                }
                match self.transact(actions).await? {
                    TxOutcome::Done => {
                        headroom -= k;
                        for (index, attempts, endpoint, params_text) in items {
                            claimed.push(ClaimedTask {
                                job_id: id,
                                index: *index,
                                attempt: attempts + 1,
                                endpoint: endpoint.clone(),
                                params: raw(params_text)?,
                                options: candidate.options.clone(),
                                owner: candidate.owner.clone(),
                            });
                        }
                        break;
                    }
                    TxOutcome::Cancelled(reasons) => {
                        if reasons.first().and_then(|r| r.as_deref())
                            == Some("ConditionalCheckFailed")
                        {
                            // Finished, cancelled, or at its concurrency: look again.
                            let Some(item) = self.job_item(id).await? else {
                                return Ok((claimed, true, None));
                            };
                            let status = job_status_from(need_s(&item, "status")?)?;
                            if status.is_finished() {
                                return Ok((claimed, true, None));
                            }
                            let running: u64 = need_n(&item, "n_running")?;
                            headroom = candidate
                                .concurrency
                                .map_or(u64::MAX, |c| c.saturating_sub(running));
                        }
                        // Tasks taken meanwhile (by another node, or seen late by the
                        // index) are left out.
                        let stale: Vec<usize> = reasons
                            .iter()
                            .enumerate()
                            .skip(1)
                            .filter(|(_, r)| r.as_deref() == Some("ConditionalCheckFailed"))
                            .map(|(i, _)| i - 1)
                            .collect();
                        items = items
                            .into_iter()
                            .enumerate()
                            .filter(|(i, _)| !stale.contains(i))
                            .map(|(_, t)| t)
                            .collect();
                    }
                }
            }
        }
        if claimed.is_empty() {
            // Served all the same: it moves to the back, so a job whose tasks all wait in
            // backoff cannot keep the jobs behind it waiting.
            let change = Change::new()
                .set("last_claim_at", n(params.now))
                .set("g1sk", s(format!("{}#{id}", pad_time(params.now))))
                .when(|e| format!("attribute_exists({})", e.n("g1pk")));
            self.update(job_key(id), change, None).await?;
        }
        Ok((claimed, exhausted, next_due))
    }

    /// The unfinished jobs, least recently served first, up to `window`.
    async fn active_jobs(&self, window: usize) -> StoreResult<Vec<Item>> {
        let shards: Vec<Vec<Item>> = stream::iter(0..SHARDS)
            .map(|shard| {
                let mut ex = Ex::default();
                let cond = format!("{} = {}", ex.n("g1pk"), ex.v(s(format!("ACTIVE#{shard}"))));
                self.query_all(Some("gsi1"), cond, ex, None, true, window)
            })
            .buffer_unordered(SHARDS as usize)
            .try_collect()
            .await?;
        let mut all: Vec<Item> = shards.into_iter().flatten().collect();
        all.sort_by(|a, b| get_s(a, "g1sk").cmp(&get_s(b, "g1sk")));
        all.truncate(window);
        Ok(all)
    }
}

/// A task's settle as an update: only the attempt that is running under this node changes
/// it.
fn settle_change(
    node: Option<NodeId>,
    id: JobId,
    settle: &TaskSettle,
    outcome: &SettleOutcome,
    fail_seq: Option<u64>,
) -> Change {
    let mut change = Change::new()
        .remove("node")
        .when(|e| eq(e, "status", s("Running")))
        .when(|e| eq(e, "attempts", n(settle.attempt)));
    if let Some(node) = node {
        change = change.when(|e| eq(e, "node", s(node.to_string())));
    }
    change = change.set("latency_ms", n(settle.latency_ms));
    match outcome {
        SettleOutcome::Await { deadline } => {
            // Still running, held by no node until its report or its deadline
            // (tasks_overdue finds it in gsi3 `AWAIT`).
            change = change
                .set("lease_until", n(*deadline))
                .set("g3pk", s("AWAIT"))
                .set(
                    "g3sk",
                    s(format!("{}#{id}#{:010}", pad_time(*deadline), settle.index)),
                );
        }
        SettleOutcome::Complete { result } => {
            change = change
                .set("status", s("Complete"))
                .set("result", s(result.get()))
                .set("finished_at", n(settle.now))
                .remove("error")
                .remove("g3pk")
                .remove("g3sk");
        }
        SettleOutcome::Failed { error } => {
            let seq = fail_seq.expect("failures are numbered");
            change = change
                .set("status", s("Failed"))
                .set("error", s(error.get()))
                .set("finished_at", n(settle.now))
                .set("fail_seq", n(seq))
                .set("g3pk", s(format!("F#{id}")))
                .set("g3sk", s(format!("{seq:010}")))
                .remove("result");
        }
        SettleOutcome::Retry { run_at, error } => {
            change = change
                .set("status", s("Pending"))
                .set("error", s(error.get()))
                .set("run_at", n(*run_at))
                .set("g2pk", s(queue_pk(id)))
                .set("g2sk", s(queue_sk(*run_at, settle.index)))
                .remove("finished_at")
                .remove("result")
                .remove("g3pk")
                .remove("g3sk");
        }
    }
    change
}

#[async_trait]
impl Store for DynamoStore {
    async fn job_insert(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
        now: Millis,
    ) -> StoreResult<InsertOutcome> {
        let owner = job.owner.as_deref();
        if let Some(idem) = idempotency
            && let Some(existing) = self.get(idem_key(owner, &idem.key)).await?
            && let Some(job_id) = get_s(&existing, "job_id")
        {
            // The usual retry of a request: answered before any task is written.
            return Ok(InsertOutcome::Existing {
                job_id: parse_id(job_id)?,
                same_request: get_s(&existing, "request_hash") == Some(idem.request_hash.as_str()),
            });
        }
        for (i, task) in job.tasks.iter().enumerate() {
            let size = task.endpoint.as_str().len() + task.params.get().len();
            if size > MAX_PARAMS_BYTES {
                return Err(StoreError::Other(format!(
                    "task {}: endpoint and params take {size} bytes; the DynamoDB store keeps at \
                     most {MAX_PARAMS_BYTES} per task (DynamoDB items are limited to 400 KB); \
                     lower --max-params-bytes",
                    i + 1
                )));
            }
        }
        let id = job.id;
        let pk = job_pk(id);
        // The tasks first: the job is not visible until its item is written, last.
        let mut puts = Vec::with_capacity(job.tasks.len());
        for (i, task) in job.tasks.iter().enumerate() {
            let index = i as u64 + 1;
            let item: Item = HashMap::from([
                ("pk".into(), s(pk.clone())),
                ("sk".into(), s(task_sk(index))),
                ("idx".into(), n(index)),
                ("status".into(), s("Pending")),
                ("attempts".into(), n(0)),
                ("run_at".into(), n(now)),
                ("endpoint".into(), s(task.endpoint.as_str())),
                ("params".into(), s(task.params.get())),
                ("g2pk".into(), s(queue_pk(id))),
                ("g2sk".into(), s(queue_sk(now, index))),
            ]);
            let put = PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map_err(|e| StoreError::Other(e.to_string()))?;
            puts.push(WriteRequest::builder().put_request(put).build());
        }
        self.batch_write(puts).await?;

        let empty = job.tasks.is_empty();
        let options =
            serde_json::to_string(&job.options).map_err(|e| StoreError::Other(e.to_string()))?;
        let callback_url = url_text(&job.callback);
        let mut item: Item = HashMap::from([
            ("pk".into(), s(pk.clone())),
            ("sk".into(), s("META")),
            ("id".into(), s(id.to_string())),
            (
                "status".into(),
                s(if empty { "Complete" } else { "Pending" }),
            ),
            ("options".into(), s(options)),
            ("tolerated".into(), n(job.options.tolerated_failures)),
            ("total".into(), n(job.tasks.len())),
            ("n_running".into(), n(0)),
            ("n_done".into(), n(0)),
            ("n_complete".into(), n(0)),
            ("n_failed".into(), n(0)),
            ("n_cancelled".into(), n(0)),
            ("fail_seq".into(), n(0)),
            ("created_at".into(), n(now)),
            ("last_claim_at".into(), n(0)),
            ("g4pk".into(), s("JOBS")),
            ("g4sk".into(), s(id.to_string())),
        ]);
        if let Some(c) = job.options.concurrency {
            item.insert("concurrency".into(), n(c));
        }
        if let Some(url) = &callback_url {
            item.insert("callback_url".into(), s(url.clone()));
        }
        if let Some(owner) = owner {
            item.insert("owner".into(), s(owner));
            item.insert("g5pk".into(), s(format!("OWNER#{owner}")));
            item.insert("g5sk".into(), s(id.to_string()));
        }
        if let Some(idem) = idempotency {
            item.insert("idem_key".into(), s(idem.key.clone()));
        }
        if empty {
            item.insert("finished_at".into(), n(now));
            if callback_url.is_some() {
                item.insert("cb_state".into(), s(CB_PENDING));
                item.insert("cb_attempts".into(), n(0));
                item.insert("cb_next".into(), n(now));
                item.insert("g2pk".into(), s("CB"));
                item.insert("g2sk".into(), s(format!("{}#{id}", pad_time(now))));
            } else {
                item.insert("g1pk".into(), s(format!("DONE#{}", shard(id))));
                item.insert("g1sk".into(), s(format!("{}#{id}", pad_time(now))));
            }
        } else {
            item.insert("g1pk".into(), s(format!("ACTIVE#{}", shard(id))));
            item.insert("g1sk".into(), s(format!("{}#{id}", pad_time(0))));
        }
        let put = |item: Item| {
            let mut ex = Ex::default();
            let cond = format!("attribute_not_exists({})", ex.n("pk"));
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression(cond)
                .set_expression_attribute_names(ex.names())
                .build()
                .map(|p| TransactWriteItem::builder().put(p).build())
                .map_err(|e| StoreError::Other(e.to_string()))
        };
        let mut actions = vec![put(item)?];
        if let Some(idem) = idempotency {
            let mut key = idem_key(owner, &idem.key);
            key.insert("job_id".into(), s(id.to_string()));
            key.insert("request_hash".into(), s(idem.request_hash.clone()));
            actions.push(put(key)?);
        }
        let outcome = self.transact(actions).await?;
        if let TxOutcome::Cancelled(reasons) = outcome {
            // Cancelled by items that exist already. They may be this very request's: when
            // the answer to its TransactWriteItems is lost, the SDK sends it again, and the
            // second one meets the job and key the first one wrote. Job ids are new, so a job
            // item with this id is this request's own, applied: the job was stored. Its tasks
            // are then never deleted (a strongly consistent read, before anything else).
            if self.get(job_key(id)).await?.is_some() {
                tracing::debug!(job_id = %id, "job creation retried after its answer was lost; it had been applied");
                return Ok(InsertOutcome::Inserted);
            }
            // Otherwise nothing of this job is visible; if another request with the same key
            // won the race, its job stands and this one's tasks go.
            let existing = match idempotency {
                Some(idem)
                    if reasons.get(1).and_then(|r| r.as_deref())
                        == Some("ConditionalCheckFailed") =>
                {
                    self.get(idem_key(owner, &idem.key)).await?
                }
                _ => None,
            };
            let tasks: Vec<WriteRequest> = (1..=job.tasks.len() as u64)
                .map(|index| {
                    DeleteRequest::builder()
                        .set_key(Some(task_key(id, index)))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                        .map_err(|e| StoreError::Other(e.to_string()))
                })
                .collect::<StoreResult<_>>()?;
            self.batch_write(tasks).await?;
            if let (Some(idem), Some(existing)) = (idempotency, existing) {
                return Ok(InsertOutcome::Existing {
                    job_id: parse_id(need_s(&existing, "job_id")?)?,
                    same_request: get_s(&existing, "request_hash")
                        == Some(idem.request_hash.as_str()),
                });
            }
            return Err(StoreError::Unavailable(format!(
                "storing job {id} conflicted with another writer ({reasons:?}); try again"
            )));
        }
        Ok(InsertOutcome::Inserted)
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.job_item(id)
            .await?
            .as_ref()
            .map(job_from_item)
            .transpose()
    }

    async fn job_list(&self, query: &JobListQuery) -> StoreResult<Vec<JobRecord>> {
        let (index, pk_attr, sk_attr, partition) = match &query.owner {
            Some(owner) => ("gsi5", "g5pk", "g5sk", format!("OWNER#{owner}")),
            None => ("gsi4", "g4pk", "g4sk", "JOBS".to_string()),
        };
        let limit = query.limit as usize;
        let mut ids: Vec<JobId> = Vec::with_capacity(limit);
        let mut before = query.before.map(|b| b.to_string());
        // Pages of the index until the page is full; a status filter may need several.
        for _ in 0..100 {
            let mut ex = Ex::default();
            let mut cond = format!("{} = {}", ex.n(pk_attr), ex.v(s(partition.clone())));
            if let Some(b) = &before {
                cond.push_str(&format!(" AND {} < {}", ex.n(sk_attr), ex.v(s(b.clone()))));
            }
            let filter = query
                .status
                .map(|st| format!("{} = {}", ex.n("status"), ex.v(s(st.as_str()))));
            self.count("Query");
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(index)
                .key_condition_expression(cond)
                .set_filter_expression(filter)
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .scan_index_forward(false)
                .limit(if query.status.is_some() {
                    500
                } else {
                    limit.max(1) as i32
                })
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            for item in out.items() {
                if ids.len() < limit {
                    ids.push(parse_id(need_s(item, sk_attr)?)?);
                }
            }
            match out.last_evaluated_key() {
                Some(last) if ids.len() < limit => {
                    before = get_s(last, sk_attr).map(str::to_string);
                }
                _ => break,
            }
        }
        let items = self
            .batch_get(ids.iter().map(|id| job_key(*id)).collect())
            .await?;
        let mut by_id: HashMap<JobId, JobRecord> = HashMap::with_capacity(items.len());
        for item in items.iter().filter(|i| !i.contains_key("deleting")) {
            let record = job_from_item(item)?;
            by_id.insert(record.id, record);
        }
        Ok(ids
            .iter()
            .filter_map(|id| by_id.remove(id))
            // The index's copy of the status may lag the item's.
            .filter(|job| query.status.is_none_or(|st| job.status == st))
            .collect())
    }

    async fn tasks_page(&self, id: JobId, query: &TaskPageQuery) -> StoreResult<Vec<TaskRecord>> {
        let Some(job_item) = self.job_item(id).await? else {
            return Ok(Vec::new());
        };
        let job = job_from_item(&job_item)?;
        let cancelled = job.status == JobStatus::Cancelled;
        let mut ex = Ex::default();
        let cond = format!(
            "{} = {} AND {} BETWEEN {} AND {}",
            ex.n("pk"),
            ex.v(s(job_pk(id))),
            ex.n("sk"),
            ex.v(s(task_sk(query.after + 1))),
            ex.v(s("T#~"))
        );
        let filter = match query.status {
            None => None,
            // A cancelled job's unfinished tasks read as Cancelled.
            Some(TaskStatus::Cancelled) if cancelled => Some(is_in(
                &mut ex,
                "status",
                &["Pending", "Running", "Cancelled"],
            )),
            Some(TaskStatus::Pending | TaskStatus::Running) if cancelled => return Ok(Vec::new()),
            Some(st) => Some(eq(&mut ex, "status", s(st.as_str()))),
        };
        let limit = query.limit as usize;
        let mut tasks = Vec::with_capacity(limit);
        let mut start: Option<Item> = None;
        loop {
            self.count("Query");
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression(&cond)
                .set_filter_expression(filter.clone())
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .consistent_read(true)
                .limit(if filter.is_some() {
                    1000
                } else {
                    (limit - tasks.len()).max(1) as i32
                })
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            for item in out.items() {
                if tasks.len() < limit {
                    tasks.push(task_from_item(item, &job)?);
                }
            }
            match out.last_evaluated_key {
                Some(key) if tasks.len() < limit => start = Some(key),
                _ => return Ok(tasks),
            }
        }
    }

    async fn tasks_failed_since(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<FailedTask>> {
        let Some(job_item) = self.job_item(id).await? else {
            return Ok(Vec::new());
        };
        let job = job_from_item(&job_item)?;
        let mut ex = Ex::default();
        let cond = format!(
            "{} = {} AND {} > {}",
            ex.n("g3pk"),
            ex.v(s(format!("F#{id}"))),
            ex.n("g3sk"),
            ex.v(s(format!("{after:010}")))
        );
        let keys: Vec<Item> = self
            .query_all(Some("gsi3"), cond, ex, None, true, limit as usize)
            .await?
            .iter()
            .map(|item| {
                Ok(HashMap::from([
                    ("pk".into(), s(need_s(item, "pk")?)),
                    ("sk".into(), s(need_s(item, "sk")?)),
                ]))
            })
            .collect::<StoreResult<_>>()?;
        let mut failed = Vec::with_capacity(keys.len());
        for item in self.batch_get(keys).await? {
            // The index may lag: only what the item itself says failed.
            if let Some(fail_seq) = get_n(&item, "fail_seq")
                && get_s(&item, "status") == Some("Failed")
                && fail_seq > after
            {
                failed.push(FailedTask {
                    fail_seq,
                    task: task_from_item(&item, &job)?,
                });
            }
        }
        failed.sort_by_key(|f| f.fail_seq);
        Ok(failed)
    }

    async fn job_cancel(&self, id: JobId, now: Millis) -> StoreResult<CancelOutcome> {
        for _ in 0..TX_TRIES {
            let Some(item) = self.job_item(id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            let job = JobCounters::from_item(&item)?;
            match job.status {
                JobStatus::Cancelled => {
                    return Ok(CancelOutcome::Cancelled {
                        has_callback: job.has_callback,
                        newly: false,
                        tasks: 0,
                    });
                }
                done if done.is_finished() => return Ok(CancelOutcome::AlreadyFinished(done)),
                _ => {}
            }
            let stopped = job.total - job.done;
            let seen_done = job.done;
            let change = Change::new()
                .set("status", s("Cancelled"))
                .set("n_running", n(0))
                .set("n_cancelled", n(stopped))
                .when(|e| is_in(e, "status", &UNFINISHED))
                .when(|e| eq(e, "n_done", n(seen_done)));
            let change = finish_job(change, id, job.has_callback, now);
            if self.update(job_key(id), change, None).await?.is_none() {
                // A settle or another cancel came first: look again.
                continue;
            }
            // The calls in flight, where gsi3 shows them; the rest are marked when their
            // outcome is refused or their lease expires.
            for (node, _) in self.nodes().await? {
                for (job_id, index, attempts) in self.node_tasks(node, Some(id)).await? {
                    self.cancel_running_task(job_id, index, attempts, Some(node), now)
                        .await?;
                }
            }
            return Ok(CancelOutcome::Cancelled {
                has_callback: job.has_callback,
                newly: true,
                tasks: stopped,
            });
        }
        Err(StoreError::Unavailable(format!(
            "cancelling job {id} kept conflicting with its settles; try again"
        )))
    }

    async fn job_delete(&self, id: JobId) -> StoreResult<DeleteOutcome> {
        let Some(item) = self.job_item(id).await? else {
            return Ok(DeleteOutcome::NotFound);
        };
        let job = job_from_item(&item)?;
        if !job.status.is_finished() {
            return Ok(DeleteOutcome::NotFinished);
        }
        if job.callback.state == CallbackState::Pending {
            return Ok(DeleteOutcome::CallbackPending);
        }
        if self.delete_job(id).await? {
            Ok(DeleteOutcome::Deleted)
        } else {
            // It changed between the read and the write (deleted meanwhile).
            Ok(DeleteOutcome::NotFound)
        }
    }

    async fn jobs_purge(&self, finished_before: Millis, limit: u32) -> StoreResult<u64> {
        let limit = limit as usize;
        let shards: Vec<Vec<Item>> = stream::iter(0..SHARDS)
            .map(|shard| {
                let mut ex = Ex::default();
                let cond = format!(
                    "{} = {} AND {} < {}",
                    ex.n("g1pk"),
                    ex.v(s(format!("DONE#{shard}"))),
                    ex.n("g1sk"),
                    ex.v(s(pad_time(finished_before)))
                );
                self.query_all(Some("gsi1"), cond, ex, None, true, limit)
            })
            .buffer_unordered(SHARDS as usize)
            .try_collect()
            .await?;
        let mut oldest: Vec<Item> = shards.into_iter().flatten().collect();
        oldest.sort_by(|a, b| get_s(a, "g1sk").cmp(&get_s(b, "g1sk")));
        oldest.truncate(limit);
        let mut purged = 0;
        for item in oldest {
            // A deletion cut short left its job item flagged: it is finished here.
            let id = id_of_pk(need_s(&item, "pk")?)?;
            if let Some(job) = self.get(job_key(id)).await? {
                if job.contains_key("deleting") {
                    self.delete_partition(id, &job).await?;
                    purged += 1;
                } else if self.delete_job(id).await? {
                    purged += 1;
                }
            }
        }
        Ok(purged)
    }

    async fn queue_depth(&self) -> StoreResult<u64> {
        let mut depth = 0u64;
        for item in self.active_jobs(usize::MAX).await? {
            let total: u64 = need_n(&item, "total")?;
            let busy: u64 = need_n::<u64>(&item, "n_running")?
                + need_n::<u64>(&item, "n_done")?
                + need_n::<u64>(&item, "n_cancelled")?;
            depth += total.saturating_sub(busy);
        }
        Ok(depth)
    }

    async fn tasks_claim(&self, params: &ClaimParams) -> StoreResult<Claim> {
        let mut claim = Claim::default();
        if params.limit == 0 {
            return Ok(claim);
        }
        let window = params.limit as usize * 2 + 8;
        let full_owners = params.owners.full();
        let mut candidates = Vec::new();
        for item in self.active_jobs(window).await? {
            let id = parse_id(need_s(&item, "id")?)?;
            if params.skip_jobs.contains(&id) {
                continue;
            }
            let owner = get_s(&item, "owner");
            if owner.is_some_and(|o| full_owners.iter().any(|f| f == o)) {
                continue;
            }
            let total: u64 = need_n(&item, "total")?;
            let running: u64 = need_n(&item, "n_running")?;
            let done: u64 = need_n(&item, "n_done")?;
            if total <= running + done {
                continue;
            }
            let concurrency: Option<u64> = get_n(&item, "concurrency");
            let options = Arc::new(parse_options(need_s(&item, "options")?)?);
            // A job limiting its calls per host gives one claim what its gates start soon.
            let headroom = concurrency
                .map_or(u64::MAX, |c| c.saturating_sub(running))
                .min(plan::claim_cap(&options));
            if headroom == 0 {
                continue;
            }
            candidates.push(Candidate {
                id,
                owner: owner.map(Arc::from),
                options,
                concurrency,
                headroom,
            });
        }
        if candidates.is_empty() {
            return Ok(claim);
        }
        // The lease first: a sweep must never find this node's tasks without it.
        self.node_alive(params.node, params.lease_until, true)
            .await?;

        // The plan says how many tasks each job gives in each round (see `plan`); a job's
        // part is one transaction. At most four rounds: each costs a request per job.
        let mut plan = FairShare::new(
            u64::from(params.limit),
            candidates.iter().map(|c| (c.owner.as_deref(), c.headroom)),
            &params.owners,
        );
        for _round in 0..4 {
            let wants = plan.round();
            if wants.is_empty() {
                break;
            }
            let results: Vec<(usize, u64, (Vec<ClaimedTask>, bool, Option<Millis>))> =
                stream::iter(wants)
                    .map(|(i, want)| {
                        let c = &candidates[i];
                        async move { self.claim_job(params, c, want).await.map(|r| (i, want, r)) }
                    })
                    .buffer_unordered(PARALLEL)
                    .try_collect()
                    .await?;
            for (i, want, (tasks, exhausted, next_due)) in results {
                let got = tasks.len() as u64;
                // A job that said it has nothing more due counts as having given less.
                plan.got(i, if exhausted { want.max(got + 1) } else { want }, got);
                if let Some(due) = next_due {
                    claim.next_due = Some(claim.next_due.map_or(due, |d: Millis| d.min(due)));
                }
                claim.tasks.extend(tasks);
            }
        }
        claim.tasks.sort_by_key(|t| (t.job_id, t.index));
        Ok(claim)
    }

    async fn tasks_settle(&self, node: NodeId, batch: &[TaskSettle]) -> StoreResult<SettleReport> {
        let mut by_job: HashMap<JobId, Vec<&TaskSettle>> = HashMap::new();
        for settle in batch {
            by_job.entry(settle.job_id).or_default().push(settle);
        }
        let jobs: Vec<_> = by_job
            .into_iter()
            .map(|(id, settles)| self.settle_job(Some(node), id, settles))
            .collect();
        // Every job's transaction runs to its end, even when another's fails: a request
        // dropped midway may still commit, unseen. The first error is returned (the
        // engine then retries the batch and reads back the jobs it finished).
        let reports: Vec<StoreResult<SettleReport>> = stream::iter(jobs)
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut report = SettleReport::default();
        for r in reports {
            let r = r?;
            report.complete += r.complete;
            report.failed += r.failed;
            report.retried += r.retried;
            report.awaiting += r.awaiting;
            report.finished.extend(r.finished);
        }
        Ok(report)
    }

    async fn tasks_report(&self, report: &TaskReport) -> StoreResult<ReportOutcome> {
        let settle = TaskSettle {
            job_id: report.job_id,
            index: report.index,
            attempt: report.attempt,
            latency_ms: 0,
            now: report.now,
            outcome: report.outcome.clone(),
        };
        let applied = self.settle_job(None, report.job_id, vec![&settle]).await?;
        if applied.complete + applied.failed > 0 {
            return Ok(ReportOutcome::Applied(applied));
        }
        // Not applied: was this attempt's outcome stored already?
        let task = self.get(task_key(report.job_id, report.index)).await?;
        let stored = task.as_ref().is_some_and(|t| {
            get_n::<u32>(t, "attempts") == Some(report.attempt)
                && matches!(get_s(t, "status"), Some("Complete" | "Failed"))
        });
        Ok(if stored {
            ReportOutcome::AlreadyReported
        } else {
            ReportOutcome::Unknown
        })
    }

    async fn tasks_overdue(&self, params: &OverdueParams) -> StoreResult<Vec<ClaimedTask>> {
        let mut ex = Ex::default();
        let cond = format!(
            "{} = {} AND {} < {}",
            ex.n("g3pk"),
            ex.v(s("AWAIT")),
            ex.n("g3sk"),
            ex.v(s(pad_time(params.now + 1)))
        );
        let items = self
            .query_all(Some("gsi3"), cond, ex, None, true, params.limit as usize)
            .await?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // The lease first, as for a claim.
        self.node_alive(params.node, params.lease_until, true)
            .await?;
        type JobOf = Option<(Arc<JobOptions>, Option<Arc<str>>)>;
        let mut options: HashMap<JobId, JobOf> = HashMap::new();
        let mut tasks = Vec::with_capacity(items.len());
        for item in items {
            let id = id_of_pk(need_s(&item, "pk")?)?;
            let index = index_of_sk(need_s(&item, "sk")?)?;
            let attempts: u32 = need_n(&item, "attempts")?;
            if let std::collections::hash_map::Entry::Vacant(entry) = options.entry(id) {
                let parsed = match self.job_item(id).await? {
                    Some(job) => Some((
                        Arc::new(parse_options(need_s(&job, "options")?)?),
                        get_s(&job, "owner").map(Arc::from),
                    )),
                    None => None,
                };
                entry.insert(parsed);
            }
            let Some((job_options, owner)) = options[&id].clone() else {
                continue;
            };
            let node = params.node;
            let change = Change::new()
                .set("node", s(node.to_string()))
                .set("lease_until", n(params.lease_until))
                .set("g3pk", s(format!("N#{node}")))
                .set("g3sk", s(format!("{id}#{index:010}")))
                .when(|e| eq(e, "status", s("Running")))
                .when(|e| eq(e, "attempts", n(attempts)))
                .when(|e| format!("attribute_not_exists({})", e.n("node")));
            let Some(task) = self
                .update(task_key(id, index), change, Some(ReturnValue::AllNew))
                .await?
            else {
                continue;
            };
            tasks.push(ClaimedTask {
                job_id: id,
                index,
                attempt: attempts,
                endpoint: need_s(&task, "endpoint")?.to_string(),
                params: raw(need_s(&task, "params")?)?,
                options: job_options,
                owner,
            });
        }
        Ok(tasks)
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
        self.node_alive(node, until, false).await?;
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("g3pk"), ex.v(s(format!("N#{node}"))));
        let mut count = 0u64;
        let mut start: Option<Item> = None;
        loop {
            self.count("Query");
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("gsi3")
                .key_condition_expression(&cond)
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .select(Select::Count)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            count += out.count() as u64;
            match out.last_evaluated_key {
                Some(key) => start = Some(key),
                None => return Ok(count),
            }
        }
    }

    async fn tasks_expire(&self, now: Millis) -> StoreResult<u64> {
        let mut taken = 0;
        for (node, alive_until) in self.nodes().await? {
            if alive_until >= now {
                continue;
            }
            let tasks = self.node_tasks(node, None).await?;
            if tasks.is_empty() {
                if alive_until < now - NODE_FORGET_MS {
                    // Unless it came back meanwhile.
                    let only = Change::new().when(|e| eq(e, "alive_until", n(alive_until)));
                    self.delete(node_key(node), only).await?;
                }
                continue;
            }
            let mut by_job: BTreeMap<JobId, Vec<(u64, u32)>> = BTreeMap::new();
            for (job, index, attempts) in tasks {
                by_job.entry(job).or_default().push((index, attempts));
            }
            for (job, tasks) in by_job {
                taken += self.take_back(node, job, tasks, now).await?;
            }
        }
        Ok(taken)
    }

    async fn tasks_recover(&self) -> StoreResult<u64> {
        // Shared by several nodes: what looks interrupted may be another node's call in
        // flight, so only what is past its lease is taken back, as the sweep would.
        self.tasks_expire(super::now_millis()).await
    }

    async fn callbacks_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<CallbackDue>> {
        let mut ex = Ex::default();
        let cond = format!(
            "{} = {} AND {} < {}",
            ex.n("g2pk"),
            ex.v(s("CB")),
            ex.n("g2sk"),
            ex.v(s(pad_time(now + 1)))
        );
        let items = self
            .query_all(Some("gsi2"), cond, ex, None, true, limit as usize)
            .await?;
        let mut due = Vec::with_capacity(items.len());
        for item in items {
            let id = parse_id(need_s(&item, "id")?)?;
            let sk = need_s(&item, "g2sk")?;
            let seen: Millis = sk[..13]
                .parse()
                .map_err(|_| StoreError::Other(format!("stored due key {sk:?} is invalid")))?;
            // Leased only if it is still due at the time the index showed: another node
            // that leased it first moved that time.
            let change = Change::new()
                .set("cb_next", n(lease_until))
                .set("g2sk", s(format!("{}#{id}", pad_time(lease_until))))
                .when(|e| eq(e, "cb_state", s(CB_PENDING)))
                .when(|e| eq(e, "cb_next", n(seen)))
                .when(|e| format!("attribute_not_exists({})", e.n("deleting")));
            let Some(job) = self
                .update(job_key(id), change, Some(ReturnValue::AllNew))
                .await?
            else {
                continue;
            };
            due.push(CallbackDue {
                job_id: id,
                url: need_s(&job, "callback_url")?.to_string(),
                attempts: get_n(&job, "cb_attempts").unwrap_or(0),
            });
        }
        Ok(due)
    }

    async fn callback_next_due(&self) -> StoreResult<Option<Millis>> {
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("g2pk"), ex.v(s("CB")));
        let first = self
            .query_all(Some("gsi2"), cond, ex, None, true, 1)
            .await?;
        first
            .first()
            .map(|item| {
                let sk = need_s(item, "g2sk")?;
                sk[..13]
                    .parse()
                    .map_err(|_| StoreError::Other(format!("stored due key {sk:?} is invalid")))
            })
            .transpose()
    }

    async fn callback_record(&self, record: &CallbackRecord) -> StoreResult<bool> {
        let id = record.job_id;
        let previous = i64::from(record.attempts) - 1;
        let mut change = Change::new()
            .set("cb_attempts", n(record.attempts))
            .when(|e| eq(e, "cb_state", s(CB_PENDING)))
            .when(|e| eq(e, "cb_attempts", n(previous)));
        match &record.outcome {
            CallbackOutcome::Retry { at, error } => {
                change = change
                    .set("cb_next", n(*at))
                    .set("cb_error", s(error.clone()))
                    .set("g2sk", s(format!("{}#{id}", pad_time(*at))));
            }
            CallbackOutcome::Delivered | CallbackOutcome::GaveUp { .. } => {
                // No longer owed: out of the due index, into retention's.
                let Some(job) = self.job_item(id).await? else {
                    return Ok(false);
                };
                let finished_at: Millis = get_n(&job, "finished_at").unwrap_or(record.now);
                change = change.remove("cb_next").remove("g2pk").remove("g2sk");
                change = retire(change, id, finished_at);
                change = match &record.outcome {
                    CallbackOutcome::GaveUp { error } => change
                        .set("cb_state", s(CB_FAILED))
                        .set("cb_error", s(error.clone())),
                    _ => change
                        .set("cb_state", s(CB_DELIVERED))
                        .set("cb_delivered_at", n(record.now)),
                };
            }
        }
        Ok(self.update(job_key(id), change, None).await?.is_some())
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
