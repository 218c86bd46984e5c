//! Jobs: submission (the tasks first, then the job item with its idempotency key), reads and
//! lists of jobs and of a job's tasks and failures, and cancellation, one conditional write
//! of the job item (see the module docs).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{DeleteRequest, Put, PutRequest, TransactWriteItem, WriteRequest};

use super::expr::{Change, Ex, Item, eq, get_n, get_s, is_in, n, need_s, s};
use super::items::{
    CB_PENDING, UNFINISHED, deadline_pk, finish_job, idem_key, job_from_item, job_key, job_pk,
    pad_time, queue_pk, queue_sk, shard, task_from_item, task_key, task_sk,
};
use super::job_groups::{group_item_key, join};
use super::schema::sdk_error;
use super::settle::JobCounters;
use super::tx::{TX_TRIES, TxOutcome};
use super::{DynamoStore, MAX_PARAMS_BYTES};
use crate::job::{JobId, JobStatus, NewJob, TaskStatus};
use crate::store::codec::parse_id;
use crate::store::{
    CancelOutcome, FailedTask, IdempotencyKey, InsertOutcome, JobListQuery, JobRecord, Millis,
    StoreError, StoreResult, TaskPageQuery, TaskRecord, plan, url_text,
};

impl DynamoStore {
    /// `Store::job_insert`: the tasks first, then the job item with its idempotency key.
    pub(super) async fn insert_job(
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
        if !self.task_calls && job.tasks.iter().any(|t| t.call.is_some()) {
            return Err(StoreError::Refused(format!(
                "table {} was created by an older version, whose claim index does not carry a \
                 task's own method, headers, aws_sigv4 or options; set them in the job's options, \
                 or move to a table made by this version's `doparallel migrate`",
                self.table
            )));
        }
        let calls: Vec<Option<String>> = job.tasks.iter().map(|t| t.call_json()).collect();
        for (i, task) in job.tasks.iter().enumerate() {
            let size = task.endpoint.as_str().len()
                + task.params.get().len()
                + calls[i].as_ref().map_or(0, String::len);
            if size > MAX_PARAMS_BYTES {
                return Err(StoreError::Refused(format!(
                    "task {}: endpoint, params and call settings take {size} bytes; the DynamoDB store keeps at \
                     most {MAX_PARAMS_BYTES} per task (DynamoDB items are limited to 400 KB); \
                     lower --max-params-bytes",
                    i + 1
                )));
            }
        }
        let id = job.id;
        let pk = job_pk(id);
        // The tasks first: the job is not visible until its item is written, last.
        let run_at = job.first_run_at(now);
        let mut puts = Vec::with_capacity(job.tasks.len());
        for (i, task) in job.tasks.iter().enumerate() {
            let index = i as u64 + 1;
            let mut item: Item = HashMap::from([
                ("pk".into(), s(pk.clone())),
                ("sk".into(), s(task_sk(index))),
                ("idx".into(), n(index)),
                ("status".into(), s("Pending")),
                ("attempts".into(), n(0)),
                ("run_at".into(), n(run_at)),
                ("endpoint".into(), s(task.endpoint.as_str())),
                ("params".into(), s(task.params.get())),
                ("g2pk".into(), s(queue_pk(id))),
                ("g2sk".into(), s(queue_sk(run_at, index))),
            ]);
            if let Some(call) = &calls[i] {
                item.insert("call".into(), s(call.as_str()));
            }
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
            (
                "tolerated".into(),
                n(job.options.tolerated(job.tasks.len() as u64)),
            ),
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
        // In the deadline sweep's partition (`items::with_deadline`) while unfinished.
        if let Some(at) = plan::deadline(&job.options, now).filter(|_| !empty) {
            item.insert("deadline_at".into(), n(at));
            item.insert("g3pk".into(), s(deadline_pk(id)));
            item.insert("g3sk".into(), s(format!("{}#{id}", pad_time(at))));
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
        if let Some(metadata) = &job.metadata {
            item.insert("metadata".into(), s(metadata.get()));
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
        // The last action: the job joins its group's members (`job_groups`).
        if let Some(group) = job.options.group.as_deref().filter(|_| !empty) {
            let key = group_item_key(&plan::group_key(owner, group));
            actions.push(self.tx_update(key, join(id, group))?);
        }
        // A conflict with another writer of the group item (a claim, another submission)
        // cancels the transaction with no condition failed: it is tried again.
        let mut outcome = self.transact(actions.clone()).await?;
        for _ in 1..TX_TRIES {
            match &outcome {
                TxOutcome::Cancelled(reasons)
                    if !reasons
                        .iter()
                        .any(|r| r.as_deref() == Some("ConditionalCheckFailed")) =>
                {
                    outcome = self.transact(actions.clone()).await?;
                }
                _ => break,
            }
        }
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

    /// `Store::job_list`: newest first, from gsi4 (every job) or gsi5 (one owner's).
    pub(super) async fn list_jobs(&self, query: &JobListQuery) -> StoreResult<Vec<JobRecord>> {
        let (index, pk_attr, sk_attr, partition) = match &query.owner {
            Some(owner) => ("gsi5", "g5pk", "g5sk", format!("OWNER#{owner}")),
            None => ("gsi4", "g4pk", "g4sk", "JOBS".to_string()),
        };
        let limit = query.limit as usize;
        let (status, _) = query.stored_status();
        // With a filter the index cannot apply (the metadata, the group, scheduled or not),
        // each page's jobs are read and filtered (`JobListQuery::matches`); pages of 100
        // then.
        let filtered = query.status.is_some() || query.metadata.is_some() || query.group.is_some();
        let mut jobs: Vec<JobRecord> = Vec::with_capacity(limit);
        let mut before = query.before.map(|b| b.to_string());
        for _ in 0..100 {
            let mut ex = Ex::default();
            let mut cond = format!("{} = {}", ex.n(pk_attr), ex.v(s(partition.clone())));
            if let Some(b) = &before {
                cond.push_str(&format!(" AND {} < {}", ex.n(sk_attr), ex.v(s(b.clone()))));
            }
            let filter = status.map(|st| format!("{} = {}", ex.n("status"), ex.v(s(st.as_str()))));
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
                .limit(if filtered {
                    100
                } else {
                    (limit - jobs.len()).max(1) as i32
                })
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            let ids = out
                .items()
                .iter()
                .map(|item| parse_id(need_s(item, sk_attr)?))
                .collect::<StoreResult<Vec<JobId>>>()?;
            let items = self
                .batch_get(ids.iter().map(|id| job_key(*id)).collect())
                .await?;
            let mut by_id: HashMap<JobId, JobRecord> = HashMap::with_capacity(items.len());
            for item in items.iter().filter(|i| !i.contains_key("deleting")) {
                let record = job_from_item(item)?;
                by_id.insert(record.id, record);
            }
            // In the index's order; its copy of the status may lag the item's.
            for id in &ids {
                if let Some(job) = by_id.remove(id)
                    && query.matches(&job)
                {
                    jobs.push(job);
                    if jobs.len() == limit {
                        return Ok(jobs);
                    }
                }
            }
            match out.last_evaluated_key() {
                Some(last) => before = get_s(last, sk_attr).map(str::to_string),
                None => break,
            }
        }
        Ok(jobs)
    }

    /// `Store::tasks_page`: a page of a job's tasks, by index.
    pub(super) async fn task_page(
        &self,
        id: JobId,
        query: &TaskPageQuery,
    ) -> StoreResult<Vec<TaskRecord>> {
        let Some(job_item) = self.job_item(id).await? else {
            return Ok(Vec::new());
        };
        let job = job_from_item(&job_item)?;
        // A finished job's unfinished tasks read as Cancelled (a cancel, an early end), or
        // as Failed when it ended at its deadline.
        let expired = get_s(&job_item, "expired_error");
        let cancelled = job.status.is_finished() && expired.is_none();
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
            Some(TaskStatus::Failed) if expired.is_some() => Some(is_in(
                &mut ex,
                "status",
                &["Pending", "Running", "Cancelled", "Failed"],
            )),
            Some(TaskStatus::Pending | TaskStatus::Running | TaskStatus::Cancelled)
                if expired.is_some() =>
            {
                return Ok(Vec::new());
            }
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
                    tasks.push(task_from_item(item, &job, expired)?);
                }
            }
            match out.last_evaluated_key {
                Some(key) if tasks.len() < limit => start = Some(key),
                _ => return Ok(tasks),
            }
        }
    }

    /// `Store::tasks_failed_since`: a job's failed tasks after a failure number, from gsi3
    /// `F#<job>`.
    pub(super) async fn failures_since(
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
                    task: task_from_item(&item, &job, get_s(&job_item, "expired_error"))?,
                });
            }
        }
        failed.sort_by_key(|f| f.fail_seq);
        Ok(failed)
    }

    /// Marks the running tasks of a job that ended Cancelled where gsi3 shows them; the rest
    /// are marked when their outcome is refused or their lease expires.
    pub(super) async fn stop_running_tasks(&self, id: JobId, now: Millis) -> StoreResult<()> {
        for (node, _) in self.nodes().await? {
            for (job_id, index, attempts) in self.node_tasks(node, Some(id)).await? {
                self.cancel_running_task(job_id, index, attempts, Some(node), now)
                    .await?;
            }
        }
        Ok(())
    }

    /// `Store::job_cancel`: one conditional write of the job item, then its running tasks.
    /// `Store::job_end`: one conditional write of the job item (see the module docs).
    pub(super) async fn end_job(
        &self,
        id: JobId,
        status: JobStatus,
        now: Millis,
    ) -> StoreResult<CancelOutcome> {
        for _ in 0..TX_TRIES {
            let Some(item) = self.job_item(id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            let job = JobCounters::from_item(&item)?;
            match job.status {
                same if same == status => {
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
                .set("status", s(status.as_str()))
                .set("n_running", n(0))
                .set("n_cancelled", n(stopped))
                .when(|e| is_in(e, "status", &UNFINISHED))
                .when(|e| eq(e, "n_done", n(seen_done)));
            let change = finish_job(change, id, job.has_callback, now);
            if self.update(job_key(id), change, None).await?.is_none() {
                // A settle or another cancel came first: look again.
                continue;
            }
            self.stop_running_tasks(id, now).await?;
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
}
