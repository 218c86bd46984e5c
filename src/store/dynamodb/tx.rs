//! Transactions: one TransactWriteItems and what its cancellation says, and the way a job
//! item and some of its tasks are written together (a claim, a settle, a take-back), tried
//! again without the tasks that turned out stale.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::TransactWriteItem;

use super::DynamoStore;
use super::expr::{Change, Item};
use super::items::{job_key, task_key};
use super::schema::sdk_error;
use crate::job::JobId;
use crate::store::{StoreError, StoreResult};

/// Items per transaction: DynamoDB's limit is 100; one place is the job item's, one that of
/// the job's group (a claim of a group with limits, `job_groups`).
pub(super) const TX_TASKS: usize = 98;

/// How often a transaction is tried again after a conflict or a stale item.
pub(super) const TX_TRIES: usize = 8;

/// Why a transaction was cancelled, per action (DynamoDB's cancellation reasons).
pub(super) enum TxOutcome {
    Done,
    /// The code of each action's reason, in order (`None` where the action was fine).
    Cancelled(Vec<Option<String>>),
}

impl DynamoStore {
    /// One TransactWriteItems, with a request token so that the SDK's own retry of a
    /// transaction that did commit is not mistaken for a conflict.
    pub(super) async fn transact(&self, items: Vec<TransactWriteItem>) -> StoreResult<TxOutcome> {
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

    pub(super) fn tx_update(&self, key: Item, change: Change) -> StoreResult<TransactWriteItem> {
        Ok(TransactWriteItem::builder()
            .update(change.into_update(&self.table, key)?)
            .build())
    }
}

/// A write of a job item and some of its tasks in one transaction, as
/// [`DynamoStore::transact_tasks`] runs it; `T` is a task as the caller holds it.
pub(super) trait TaskTx<T> {
    /// The job whose item and tasks are written.
    fn job(&self) -> JobId;

    /// The job item's change for a try over `tasks`.
    fn job_change(&self, tasks: &[T]) -> Change;

    /// A task's index and change.
    fn task_change(&self, task: &T) -> (u64, Change);

    /// Another item written with them (the last action), if any: a claim's group item.
    fn extra(&self, _tasks: &[T]) -> Option<(Item, Change)> {
        None
    }

    /// What follows a cancelled try, once its stale tasks are out of `tasks`: the job item
    /// may have changed meanwhile, or refused the write. Asked after every cancelled try,
    /// the last one too (where `Continue` ends in [`TxEnd::GaveUp`]).
    async fn cancelled(
        &mut self,
        store: &DynamoStore,
        tasks: &mut Vec<T>,
        cancelled: Cancelled,
    ) -> StoreResult<Then>;
}

/// A cancelled try, as [`TaskTx::cancelled`] is told of it.
pub(super) struct Cancelled {
    /// The job item's own condition failed.
    pub(super) job_refused: bool,
    /// The other item's ([`TaskTx::extra`]) condition failed.
    pub(super) extra_refused: bool,
    /// The tries made, this one included; there is none after [`TX_TRIES`].
    pub(super) tries: usize,
}

/// After a cancelled try: go on (to the next try, if there is one), or stop.
pub(super) enum Then {
    Continue,
    Stop,
}

/// How [`DynamoStore::transact_tasks`] ended.
pub(super) enum TxEnd<T> {
    /// These tasks, all that were left, are written with the job item.
    Committed(Vec<T>),
    /// No task was left to write: each was stale, or the caller let it go.
    NoneLeft,
    /// [`TaskTx::cancelled`] said to stop.
    Stopped,
    /// Cancelled [`TX_TRIES`] times.
    GaveUp,
}

impl DynamoStore {
    /// Writes a job item (the first action) and `tasks` (an action each, in their order) in
    /// one transaction, tried up to [`TX_TRIES`] times. A cancelled try is tried again without
    /// the tasks whose own condition failed: those are stale (another writer took, settled or
    /// took back the task meanwhile, or an index showed it late). What else the cancellation
    /// means, `tx` decides.
    pub(super) async fn transact_tasks<T, X: TaskTx<T>>(
        &self,
        tx: &mut X,
        mut tasks: Vec<T>,
    ) -> StoreResult<TxEnd<T>> {
        let id = tx.job();
        for tries in 1..=TX_TRIES {
            if tasks.is_empty() {
                return Ok(TxEnd::NoneLeft);
            }
            let mut actions = Vec::with_capacity(tasks.len() + 1);
            actions.push(self.tx_update(job_key(id), tx.job_change(&tasks))?);
            for task in &tasks {
                let (index, change) = tx.task_change(task);
                actions.push(self.tx_update(task_key(id, index), change)?);
            }
            let extra_at = tx.extra(&tasks).map(|(key, change)| {
                actions.push(self.tx_update(key, change)?);
                Ok::<_, StoreError>(actions.len() - 1)
            });
            let extra_at = extra_at.transpose()?;
            let reasons = match self.transact(actions).await? {
                TxOutcome::Done => return Ok(TxEnd::Committed(tasks)),
                TxOutcome::Cancelled(reasons) => reasons,
            };
            // A conflict gives no reasons: then nothing is stale, and the same tasks are
            // tried again.
            let failed = |action: usize| {
                reasons.get(action).and_then(|r| r.as_deref()) == Some("ConditionalCheckFailed")
            };
            let extra_refused = extra_at.is_some_and(failed);
            let mut action = 0;
            tasks.retain(|_| {
                action += 1;
                !failed(action)
            });
            let cancelled = Cancelled {
                job_refused: failed(0),
                extra_refused,
                tries,
            };
            if let Then::Stop = tx.cancelled(self, &mut tasks, cancelled).await? {
                return Ok(TxEnd::Stopped);
            }
        }
        Ok(TxEnd::GaveUp)
    }
}
