//! Settling: a job's outcomes written with its counters, a transaction of up to
//! [`TX_TASKS`] tasks at a time, the last of which finishes the job (see the module docs);
//! a report of an awaited task is settled the same way, and its heartbeats recorded. An
//! outcome for a job that was cancelled meanwhile is refused, and its task marked Cancelled.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::ReturnValue;
use futures_util::{StreamExt, TryStreamExt, stream};

use super::expr::{Change, Item, eq, get_n, get_s, is_in, n, need_n, need_s, s};
use super::items::{
    UNFINISHED, finish_job, job_key, job_status_from, pad_time, queue_pk, queue_sk, task_key,
};
use super::requests::PARALLEL;
use super::tx::{Cancelled, TX_TASKS, TX_TRIES, TaskTx, Then, TxEnd};
use super::{DynamoStore, MAX_RESULT_BYTES};
use crate::job::{JobId, JobStatus};
use crate::store::codec::parse_options;
use crate::store::plan;
use crate::store::{
    HeartbeatOutcome, JobFinished, Millis, NodeId, ReportOutcome, SettleOutcome, SettleReport,
    StoreError, StoreResult, TaskHeartbeat, TaskReport, TaskSettle,
};

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
pub(super) struct JobCounters {
    pub(super) total: u64,
    pub(super) done: u64,
    failed: u64,
    tolerated: u64,
    pub(super) has_callback: bool,
    pub(super) status: JobStatus,
}

impl JobCounters {
    pub(super) fn from_item(item: &Item) -> StoreResult<Self> {
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

/// An outcome as a settle transaction writes it: the settle, the outcome as stored, and its
/// failure number.
type Numbered<'a> = (&'a TaskSettle, SettleOutcome, Option<u64>);

/// What a transaction of some outcomes adds to its job's counters.
struct Tally {
    complete: u64,
    failed: u64,
    done: u64,
    awaiting: u64,
    settled: u64,
    now: Millis,
}

impl Tally {
    fn of(items: &[&Numbered]) -> Tally {
        let complete = items
            .iter()
            .filter(|(_, o, _)| matches!(o, SettleOutcome::Complete { .. }))
            .count() as u64;
        let failed = items
            .iter()
            .filter(|(_, o, _)| matches!(o, SettleOutcome::Failed { .. }))
            .count() as u64;
        let awaiting = items
            .iter()
            .filter(|(_, o, _)| matches!(o, SettleOutcome::Await { .. }))
            .count() as u64;
        Tally {
            complete,
            failed,
            done: complete + failed,
            awaiting,
            // An awaited attempt stays running: it still counts against concurrency.
            settled: items.len() as u64 - awaiting,
            now: items.iter().map(|(t, _, _)| t.now).max().unwrap_or(0),
        }
    }
}

/// The settle of one job's outcomes, as its transactions see the job.
struct SettleTx {
    node: Option<NodeId>,
    id: JobId,
    job: JobCounters,
}

impl SettleTx {
    /// The job's final status, when a transaction of these outcomes finishes it.
    fn finishes(&self, tally: &Tally) -> Option<JobStatus> {
        let job = &self.job;
        (job.done + tally.done == job.total)
            .then(|| plan::final_status(job.failed + tally.failed, job.tolerated))
    }
}

impl<'a, 'b> TaskTx<&'a Numbered<'b>> for SettleTx {
    fn job(&self) -> JobId {
        self.id
    }

    fn job_change(&self, items: &[&Numbered]) -> Change {
        let (id, job) = (self.id, &self.job);
        let tally = Tally::of(items);
        let meta = Change::new()
            .incr("n_running", -(tally.settled as i64))
            .incr("n_done", tally.done as i64)
            .incr("n_complete", tally.complete as i64)
            .incr("n_failed", tally.failed as i64)
            .when(|e| is_in(e, "status", &UNFINISHED));
        if let Some(final_status) = self.finishes(&tally) {
            let (seen_done, seen_failed) = (job.done, job.failed);
            let meta = meta
                .when(|e| eq(e, "n_done", n(seen_done)))
                .when(|e| eq(e, "n_failed", n(seen_failed)))
                .set("status", s(final_status.as_str()));
            finish_job(meta, id, job.has_callback, tally.now)
        } else {
            let below = job.total - tally.done;
            meta.when(|e| format!("{} < {}", e.n("n_done"), e.v(n(below))))
        }
    }

    fn task_change(&self, (settle, outcome, fail_seq): &&Numbered) -> (u64, Change) {
        let change = settle_change(self.node, self.id, settle, outcome, *fail_seq);
        (settle.index, change)
    }

    /// Tasks whose condition failed are stale: their outcome is dropped.
    async fn cancelled(
        &mut self,
        store: &DynamoStore,
        items: &mut Vec<&'a Numbered<'b>>,
        cancelled: Cancelled,
    ) -> StoreResult<Then> {
        if cancelled.tries == TX_TRIES {
            // No try follows: the settle gives up (see `settle_job`), the job not read again.
            return Ok(Then::Continue);
        }
        // The job changed (another node's settle, a cancel), or a conflict: read it again.
        let Some(item) = store.job_item(self.id).await? else {
            return Ok(Then::Stop);
        };
        self.job = JobCounters::from_item(&item)?;
        if self.job.status.is_finished() {
            let left: Vec<&TaskSettle> = items.iter().map(|(t, _, _)| *t).collect();
            store
                .refuse_outcomes(self.node, self.id, &self.job, &left)
                .await?;
            return Ok(Then::Stop);
        }
        if cancelled.tries > 2 {
            tokio::time::sleep(Duration::from_millis(5 << cancelled.tries.min(6))).await;
        }
        Ok(Then::Continue)
    }
}

impl DynamoStore {
    /// `Store::tasks_settle`: each job's outcomes settled on their own, many jobs at once.
    pub(super) async fn settle_batch(
        &self,
        node: NodeId,
        batch: &[TaskSettle],
    ) -> StoreResult<SettleReport> {
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

    /// `Store::tasks_report`: a report settles its task as an outcome does, whatever node
    /// held it.
    pub(super) async fn apply_report(&self, report: &TaskReport) -> StoreResult<ReportOutcome> {
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
        let job = JobCounters::from_item(&item)?;
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

        let mut tx = SettleTx { node, id, job };
        for chunk in numbered.chunks(TX_TASKS) {
            match self.transact_tasks(&mut tx, chunk.iter().collect()).await? {
                TxEnd::Committed(items) => {
                    let tally = Tally::of(&items);
                    let finished = tx.finishes(&tally);
                    tx.job.done += tally.done;
                    tx.job.failed += tally.failed;
                    report.complete += tally.complete;
                    report.failed += tally.failed;
                    report.retried += tally.settled - tally.done;
                    report.awaiting += tally.awaiting;
                    if let Some(status) = finished {
                        report.finished.push(JobFinished {
                            job_id: id,
                            status,
                            has_callback: tx.job.has_callback,
                        });
                    }
                }
                TxEnd::NoneLeft => {}
                // The job is gone, or finished and its outcomes refused.
                TxEnd::Stopped => return Ok(report),
                TxEnd::GaveUp => {
                    return Err(StoreError::Unavailable(format!(
                        "settling job {id} kept conflicting with other writers"
                    )));
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
        // Ended with tasks unfinished (a cancel, an early end): they are Cancelled.
        if !job.status.is_finished() {
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

    /// Marks a cancelled job's running task Cancelled, if it still runs that attempt under
    /// that node (an outcome refused, a lease expired, or a cancel sweeping).
    pub(super) async fn cancel_running_task(
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
}

impl DynamoStore {
    /// `Store::tasks_heartbeat`: the task and its job read, then one write of the task on
    /// condition that it still runs that attempt (read again if that lost a race).
    pub(super) async fn heartbeat(&self, beat: &TaskHeartbeat) -> StoreResult<HeartbeatOutcome> {
        for _ in 0..TX_TRIES {
            let (Some(job), Some(task)) = (
                self.job_item(beat.job_id).await?,
                self.get(task_key(beat.job_id, beat.index)).await?,
            ) else {
                return Ok(HeartbeatOutcome::Unknown);
            };
            if need_n::<u32>(&task, "attempts")? != beat.attempt {
                return Ok(HeartbeatOutcome::Unknown);
            }
            match need_s(&task, "status")? {
                // Taken back: this attempt no longer runs.
                "Pending" if !job_status_from(need_s(&job, "status")?)?.is_finished() => {
                    return Ok(HeartbeatOutcome::Unknown);
                }
                "Running" if !job_status_from(need_s(&job, "status")?)?.is_finished() => {}
                // Its outcome is stored, or its job ended (which decided it).
                _ => return Ok(HeartbeatOutcome::Finished),
            }
            let mut change = Change::new()
                .when(|e| eq(e, "status", s("Running")))
                .when(|e| eq(e, "attempts", n(beat.attempt)));
            let mut writes = false;
            if let Some(progress) = &beat.progress {
                change = change.set("progress", s(progress.get()));
                writes = true;
            }
            if get_s(&task, "g3pk") == Some("AWAIT") {
                // Past its deadline, it times out (the sweep records it); a heartbeat that
                // comes late never moves it back.
                let stored: Millis = need_n(&task, "lease_until")?;
                if stored <= beat.now {
                    return Ok(HeartbeatOutcome::Unknown);
                }
                let options = parse_options(need_s(&job, "options")?)?;
                if let Some(deadline) =
                    plan::heartbeat_deadline(&options, need_n(&task, "run_at")?, beat.now)
                        .filter(|moved| *moved > stored)
                {
                    change = change
                        .set("lease_until", n(deadline))
                        .set(
                            "g3sk",
                            s(format!(
                                "{}#{}#{:010}",
                                pad_time(deadline),
                                beat.job_id,
                                beat.index
                            )),
                        )
                        .when(|e| eq(e, "g3pk", s("AWAIT")))
                        .when(|e| eq(e, "lease_until", n(stored)));
                    writes = true;
                }
            }
            if !writes
                || self
                    .update(task_key(beat.job_id, beat.index), change, None)
                    .await?
                    .is_some()
            {
                return Ok(HeartbeatOutcome::Alive);
            }
        }
        Err(StoreError::Unavailable(format!(
            "a heartbeat of job {} task {} kept conflicting with its outcome; try again",
            beat.job_id, beat.index
        )))
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
        SettleOutcome::Await { deadline, until } => {
            // Still running, held by no node until its report or its deadline
            // (tasks_overdue finds it in gsi3 `AWAIT`); `run_at` the latest a heartbeat
            // may move the deadline to.
            change = change
                .set("lease_until", n(*deadline))
                .set("run_at", n(*until))
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
