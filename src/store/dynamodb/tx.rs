//! Transactions: one TransactWriteItems and what its cancellation says.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::TransactWriteItem;

use super::DynamoStore;
use super::expr::{Change, Item};
use super::schema::sdk_error;
use crate::store::{StoreError, StoreResult};

/// Items per transaction: DynamoDB's limit is 100; one place is the job item's.
pub(super) const TX_TASKS: usize = 99;

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
