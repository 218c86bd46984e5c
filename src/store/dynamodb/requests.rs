//! The requests sent to DynamoDB, one function for each kind, each counted in [`OpCounts`]:
//! here a failed condition becomes `None` or `false` and a throttled batch is sent again,
//! so that the other parts speak only of items and changes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{KeysAndAttributes, ReturnValue, WriteRequest};
use futures_util::{StreamExt, TryStreamExt, stream};

use super::DynamoStore;
use super::expr::{Change, Ex, Item};
use super::items::job_key;
use super::schema::sdk_error;
use crate::job::JobId;
use crate::store::{StoreError, StoreResult};

/// Items per BatchWriteItem (DynamoDB's limit).
const BATCH_WRITE: usize = 25;

/// Keys per BatchGetItem (DynamoDB's limit).
const BATCH_GET: usize = 100;

/// Requests in flight at once for one store call (a submission's batches, a claim's jobs).
pub(super) const PARALLEL: usize = 16;

/// Requests made, per operation: the cost figures of docs/dynamodb.md come from these.
#[derive(Default)]
pub struct OpCounts(Mutex<BTreeMap<&'static str, u64>>);

impl OpCounts {
    pub(super) fn add(&self, op: &'static str, n: u64) {
        *self.0.lock().expect("not poisoned").entry(op).or_default() += n;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().expect("not poisoned").clone()
    }
}

impl DynamoStore {
    pub(super) fn count(&self, op: &'static str) {
        self.counts.add(op, 1);
        tracing::trace!(op, "dynamodb request");
    }

    pub(super) async fn get(&self, key: Item) -> StoreResult<Option<Item>> {
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
    pub(super) async fn job_item(&self, id: JobId) -> StoreResult<Option<Item>> {
        Ok(self
            .get(job_key(id))
            .await?
            .filter(|item| !item.contains_key("deleting")))
    }

    /// One UpdateItem; `Ok(None)` when its condition did not hold.
    pub(super) async fn update(
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

    /// Every item of a query, page after page (at most `max` of them).
    pub(super) async fn query_all(
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
    pub(super) async fn batch_get(&self, keys: Vec<Item>) -> StoreResult<Vec<Item>> {
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
    pub(super) async fn batch_write(&self, requests: Vec<WriteRequest>) -> StoreResult<()> {
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

    /// One DeleteItem under the conditions of `only` (its updates are ignored); false when
    /// they did not hold.
    pub(super) async fn delete(&self, key: Item, only: Change) -> StoreResult<bool> {
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
    /// Every item of a query of the table itself, strongly consistent, with only the
    /// attributes of `projection` (names from `ex`).
    pub(super) async fn query_projected(
        &self,
        key_condition: String,
        ex: Ex,
        projection: &str,
    ) -> StoreResult<Vec<Item>> {
        self.query_table(key_condition, ex, projection, true, usize::MAX)
            .await
    }

    pub(super) async fn query_keys(
        &self,
        key_condition: String,
        ex: Ex,
        max: usize,
    ) -> StoreResult<Vec<Item>> {
        self.query_table(key_condition, ex, "pk, sk", false, max)
            .await
    }

    /// The items of a query of the table itself, page after page (at most `max`), with the
    /// attributes of `projection` only.
    async fn query_table(
        &self,
        key_condition: String,
        ex: Ex,
        projection: &str,
        consistent: bool,
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
                .key_condition_expression(&key_condition)
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .projection_expression(projection)
                .consistent_read(consistent)
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
}
