//! Deletion and retention: a finished job whose callback is not owed is flagged (it reads
//! as gone from then on), its partition deleted, and its job item last; a deletion cut
//! short is finished by the next purge, which finds the job still in gsi1 `DONE#`.

use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, ReturnValue, WriteRequest};
use futures_util::{StreamExt, TryStreamExt, stream};

use super::DynamoStore;
use super::expr::{Change, Ex, Item, eq, get_s, is_in, need_s, s};
use super::items::{
    CB_PENDING, FINISHED, SHARDS, id_of_pk, idem_key, job_from_item, job_key, job_pk, pad_time,
};
use crate::job::{CallbackState, JobId};
use crate::store::{DeleteOutcome, Millis, StoreError, StoreResult};

impl DynamoStore {
    /// `Store::job_delete`.
    pub(super) async fn delete_finished(&self, id: JobId) -> StoreResult<DeleteOutcome> {
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
        if self.flag_and_delete(id).await? {
            Ok(DeleteOutcome::Deleted)
        } else {
            // It changed between the read and the write (deleted meanwhile).
            Ok(DeleteOutcome::NotFound)
        }
    }

    /// `Store::jobs_purge`: the jobs longest finished, from gsi1 `DONE#`.
    pub(super) async fn purge_finished(
        &self,
        finished_before: Millis,
        limit: u32,
    ) -> StoreResult<u64> {
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
                } else if self.flag_and_delete(id).await? {
                    purged += 1;
                }
            }
        }
        Ok(purged)
    }

    /// Deletes a finished job whose callback is not owed: flags it (it reads as gone from
    /// then on), then removes its items. False when it no longer qualifies.
    async fn flag_and_delete(&self, id: JobId) -> StoreResult<bool> {
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
}
