//! Job control on a job item.
//!
//! Pausing and resuming a job (`Store::job_pause`): one conditional write of the job item,
//! which leaves gsi1's `ACTIVE#` partitions (where claims look) for `PAUSED#` ones, and
//! comes back.
//!
//! Changing a running job's limits (`Store::job_set_options`): one write of the job item on
//! condition that its options are still the ones read.
//!
//! Ending a job at its deadline (`Store::job_expire`): as a cancel, one conditional write of
//! the job item; the deadline sweep finds unfinished jobs with a deadline in gsi3
//! `DEADLINE#<shard>` (`items::with_deadline`), which a job leaves when it finishes.
//!
//! Retrying a finished job (`Store::job_retry`): its tasks to run again are put back in
//! their queue, in transactions of up to 100, each on condition that the task is as it was
//! read; then the job item, its counters counted again from the tasks, on condition that
//! the job is as it was read. A retry cut short between the two leaves tasks pending under
//! a finished job: the next retry of that job takes them too, and counts again.

use super::DynamoStore;
use super::expr::{Change, Ex, Item, eq, get_n, get_s, is_in, n, need_n, need_s, s};
use super::items::{
    CB_PENDING, SHARDS, UNFINISHED, finish_job, job_key, job_pk, pad_time, queue_pk, queue_sk,
    shard, task_key, with_deadline,
};
use super::job_groups::{group_item_key, join};
use super::settle::JobCounters;
use super::tx::{TX_TRIES, TxOutcome};
use crate::job::{JobId, JobOptions, TaskStatus};
use crate::store::codec::{options_text, parse_id, parse_options};
use crate::store::{
    Deadlines, ExpireOutcome, Millis, OptionsOutcome, PauseOutcome, RetryOutcome, StoreError,
    StoreResult, plan,
};
use serde_json::value::RawValue;

/// Actions per TransactWriteItems.
const TX_ITEMS: usize = 100;

impl DynamoStore {
    pub(super) async fn pause_job(&self, id: JobId, pause: bool) -> StoreResult<PauseOutcome> {
        for _ in 0..TX_TRIES {
            let Some(item) = self.job_item(id).await? else {
                return Ok(PauseOutcome::NotFound);
            };
            let job = JobCounters::from_item(&item)?;
            let counts = (
                need_n(&item, "n_running")?,
                need_n(&item, "n_complete")?,
                need_n(&item, "n_failed")?,
            );
            let to = match plan::pause_target(job.status, pause, counts) {
                Ok(to) => to,
                Err(outcome) => return Ok(outcome),
            };
            let partition = if pause { "PAUSED" } else { "ACTIVE" };
            let seen = need_s(&item, "status")?.to_string();
            let change = Change::new()
                .set("status", s(to.as_str()))
                .set("g1pk", s(format!("{partition}#{}", shard(id))))
                .when(|e| eq(e, "status", s(seen)))
                .when(|e| format!("attribute_not_exists({})", e.n("deleting")));
            if self.update(job_key(id), change, None).await?.is_some() {
                return Ok(PauseOutcome::Changed(to));
            }
            // A settle finished it, or another pause came first: look again.
        }
        Err(StoreError::Unavailable(format!(
            "pausing job {id} kept conflicting with its settles; try again"
        )))
    }

    pub(super) async fn set_options(
        &self,
        id: JobId,
        seen: &JobOptions,
        options: &JobOptions,
    ) -> StoreResult<OptionsOutcome> {
        let Some(item) = self.job_item(id).await? else {
            return Ok(OptionsOutcome::NotFound);
        };
        let status = JobCounters::from_item(&item)?.status;
        if status.is_finished() {
            return Ok(OptionsOutcome::Finished(status));
        }
        let stored = need_s(&item, "options")?.to_string();
        if parse_options(&stored)? != *seen {
            return Ok(OptionsOutcome::Changed);
        }
        let created_at: Millis = need_n(&item, "created_at")?;
        let mut change = with_deadline(
            Change::new().set("options", s(options_text(options)?)),
            id,
            plan::deadline(options, created_at),
        );
        change = match options.concurrency {
            Some(c) => change.set("concurrency", n(c)),
            None => change.remove("concurrency"),
        };
        let change = change
            .when(|e| eq(e, "options", s(stored)))
            .when(|e| is_in(e, "status", &UNFINISHED))
            .when(|e| format!("attribute_not_exists({})", e.n("deleting")));
        Ok(match self.update(job_key(id), change, None).await? {
            Some(_) => OptionsOutcome::Updated,
            None => OptionsOutcome::Changed,
        })
    }

    pub(super) async fn retry_job(
        &self,
        id: JobId,
        include: &[TaskStatus],
        now: Millis,
    ) -> StoreResult<RetryOutcome> {
        // (A job being deleted reads as gone.)
        let Some(item) = self.job_item(id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        let job = JobCounters::from_item(&item)?;
        let owed = get_s(&item, "cb_state") == Some(CB_PENDING);
        let cancelled: u64 = get_n(&item, "n_cancelled").unwrap_or(0);
        if let Err(outcome) = plan::may_retry(job.status, owed, include, cancelled) {
            return Ok(outcome);
        }
        let mut ex = Ex::default();
        let cond = format!(
            "{} = {} AND begins_with({}, {})",
            ex.n("pk"),
            ex.v(s(job_pk(id))),
            ex.n("sk"),
            ex.v(s("T#"))
        );
        // What the choice needs, not the parameters and results.
        let projection = ["idx", "status", "attempts"].map(|a| ex.n(a)).join(", ");
        let tasks = self.query_projected(cond, ex, &projection).await?;
        // What runs again, and what the job's counters become.
        let retry_failed = include.contains(&TaskStatus::Failed);
        // Ended with tasks unfinished (cancelled, or decided early): those read Cancelled.
        let job_cancelled = cancelled > 0;
        // Ended at its deadline: those read Failed (`items::task_from_item`).
        let expired = item.contains_key("expired_error");
        let (mut requeue, mut complete, mut failed) = (Vec::new(), 0u64, 0u64);
        for task in &tasks {
            let stored = need_s(task, "status")?;
            let again = match stored {
                "Failed" => retry_failed,
                "Cancelled" | "Running" | "Pending" if expired => retry_failed,
                // A cancelled job's unfinished tasks read as Cancelled (see the module docs).
                "Cancelled" | "Running" => job_cancelled,
                // Under a finished job: a cancelled one's, or left by a retry cut short.
                "Pending" => true,
                _ => false,
            };
            match stored {
                _ if again => requeue.push(task),
                "Complete" => complete += 1,
                "Failed" => failed += 1,
                "Cancelled" | "Running" | "Pending" if expired => failed += 1,
                _ => {}
            }
        }
        if requeue.is_empty() {
            return Ok(RetryOutcome::NothingToRetry);
        }
        for chunk in requeue.chunks(TX_ITEMS) {
            let mut actions = Vec::with_capacity(chunk.len());
            for task in chunk {
                actions
                    .push(self.tx_update(requeue_key(id, task)?, requeue_change(id, task, now)?)?);
            }
            if let TxOutcome::Cancelled(_) = self.transact(actions).await? {
                return Err(StoreError::Unavailable(format!(
                    "retrying job {id}: a task changed meanwhile; try again"
                )));
            }
        }
        let options = plan::next_run(&parse_options(need_s(&item, "options")?)?, now);
        let run = options.run();
        let options_text = options_text(&options)?;
        let status_was = need_s(&item, "status")?.to_string();
        let created_at: Millis = need_n(&item, "created_at")?;
        let change = with_deadline(Change::new(), id, plan::deadline(&options, created_at))
            .remove("expired_error")
            .set("status", s("Running"))
            .set("options", s(options_text))
            .set("n_running", n(0))
            .set("n_complete", n(complete))
            .set("n_failed", n(failed))
            .set("n_done", n(complete + failed))
            .set("n_cancelled", n(0))
            .set("last_claim_at", n(0))
            .set("g1pk", s(format!("ACTIVE#{}", shard(id))))
            .set("g1sk", s(format!("{}#{id}", pad_time(0))))
            .remove("finished_at")
            .remove("cb_state")
            .remove("cb_attempts")
            .remove("cb_next")
            .remove("cb_error")
            .when(|e| eq(e, "status", s(status_was)))
            .when(|e| format!("attribute_not_exists({})", e.n("deleting")))
            .when(|e| {
                format!(
                    "attribute_not_exists({0}) OR {0} <> {1}",
                    e.n("cb_state"),
                    e.v(s(CB_PENDING))
                )
            });
        // Unfinished again, the job rejoins its group's members (`job_groups`) in the same
        // transaction, so that no claim lets it go as finished in between.
        let mut actions = vec![self.tx_update(job_key(id), change)?];
        if let Some(group) = options.group.as_deref() {
            let key = plan::group_key(get_s(&item, "owner"), group);
            actions.push(self.tx_update(group_item_key(&key), join(id, group))?);
        }
        if let TxOutcome::Cancelled(_) = self.transact(actions).await? {
            return Err(StoreError::Unavailable(format!(
                "retrying job {id}: the job changed meanwhile; try again"
            )));
        }
        Ok(RetryOutcome::Requeued {
            tasks: requeue.len() as u64,
            run,
        })
    }
}

fn requeue_key(id: JobId, task: &Item) -> StoreResult<Item> {
    Ok(task_key(id, need_n(task, "idx")?))
}

/// A task back in its queue, due now, its attempt budget starting afresh; on condition that
/// it is as it was read.
fn requeue_change(id: JobId, task: &Item, now: Millis) -> StoreResult<Change> {
    let index: u64 = need_n(task, "idx")?;
    let attempts: u32 = need_n(task, "attempts")?;
    let status = need_s(task, "status")?.to_string();
    Ok(Change::new()
        .set("status", s("Pending"))
        .set("attempt_base", n(attempts))
        .set("run_at", n(now))
        .set("g2pk", s(queue_pk(id)))
        .set("g2sk", s(queue_sk(now, index)))
        .remove("finished_at")
        .remove("fail_seq")
        .remove("node")
        .remove("lease_until")
        .remove("g3pk")
        .remove("g3sk")
        .when(|e| eq(e, "status", s(status)))
        .when(|e| eq(e, "attempts", n(attempts))))
}

impl DynamoStore {
    /// `Store::jobs_deadline`: one Query of each gsi3 `DEADLINE#<shard>`, earliest first,
    /// merged.
    pub(super) async fn deadlines(&self, now: Millis, limit: u32) -> StoreResult<Deadlines> {
        let mut earliest = Vec::new();
        for shard in 0..SHARDS {
            let mut ex = Ex::default();
            let cond = format!(
                "{} = {}",
                ex.n("g3pk"),
                ex.v(s(format!("DEADLINE#{shard}")))
            );
            let items = self
                .query_all(Some("gsi3"), cond, ex, None, true, limit as usize + 1)
                .await?;
            for item in &items {
                let key = need_s(item, "g3sk")?;
                let (at, id) = key
                    .split_once('#')
                    .and_then(|(at, id)| Some((at.parse::<Millis>().ok()?, id)))
                    .ok_or_else(|| {
                        StoreError::Other(format!("stored deadline key {key:?} is invalid"))
                    })?;
                earliest.push((parse_id(id)?, at));
            }
        }
        earliest.sort_by_key(|(_, at)| *at);
        Deadlines::from_earliest(now, limit, earliest.into_iter().map(Ok))
    }

    /// `Store::job_expire`: one conditional write of the job item, as a cancel: its
    /// unfinished tasks are not rewritten but read as Failed with `error`, kept on the job
    /// item (`items::task_from_item`); its calls in flight are marked where gsi3 shows them.
    pub(super) async fn expire_job(
        &self,
        id: JobId,
        error: &RawValue,
        now: Millis,
    ) -> StoreResult<ExpireOutcome> {
        for _ in 0..TX_TRIES {
            let Some(item) = self.job_item(id).await? else {
                return Ok(ExpireOutcome::NotDue);
            };
            let job = JobCounters::from_item(&item)?;
            let deadline: Option<Millis> = get_n(&item, "deadline_at");
            let Some(deadline) = deadline.filter(|at| *at <= now) else {
                return Ok(ExpireOutcome::NotDue);
            };
            if job.status.is_finished() {
                return Ok(ExpireOutcome::NotDue);
            }
            let stopped = job.total - job.done;
            let failed = need_n::<u64>(&item, "n_failed")? + stopped;
            let to = plan::final_status(failed, need_n(&item, "tolerated")?);
            let seen_done = job.done;
            let change = Change::new()
                .set("status", s(to.as_str()))
                .set("n_running", n(0))
                .set("n_failed", n(failed))
                .set("expired_error", s(error.get()))
                .when(|e| is_in(e, "status", &UNFINISHED))
                .when(|e| eq(e, "n_done", n(seen_done)))
                .when(|e| eq(e, "deadline_at", n(deadline)));
            let change = finish_job(change, id, job.has_callback, now);
            if self.update(job_key(id), change, None).await?.is_none() {
                // A settle, a cancel or a change of its options came first: look again.
                continue;
            }
            // Marked Cancelled, they read Failed.
            self.stop_running_tasks(id, now).await?;
            return Ok(ExpireOutcome::Expired {
                status: to,
                has_callback: job.has_callback,
                tasks: stopped,
            });
        }
        Err(StoreError::Unavailable(format!(
            "ending job {id} at its deadline kept conflicting with its settles; try again"
        )))
    }
}
