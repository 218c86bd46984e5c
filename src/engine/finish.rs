//! The finisher: writes the outcomes that have queued up in one store transaction (group
//! commit), frees their slots, then tells the bus (which wakes the dispatcher and, for jobs
//! that just finished, the callback outbox).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::node::{Engine, IDLE_POLL, SETTLE_BATCH, Settled, Slot};
use crate::job::{JobId, JobStatus};
use crate::store::{NodeId, SettleReport, StoreError, TaskSettle};

pub(super) async fn finish(
    engine: Arc<Engine>,
    mut outcomes: mpsc::Receiver<Settled>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(SETTLE_BATCH);
    let mut slots: Vec<Slot> = Vec::with_capacity(SETTLE_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            o = outcomes.recv() => o,
            _ = stop.cancelled() => {
                // Write what has arrived, then stop: later outcomes are left to the next start.
                outcomes.close();
                outcomes.recv().await
            }
        };
        let Some((settle, slot)) = first else {
            return;
        };
        batch.push(settle);
        slots.push(slot);
        while batch.len() < SETTLE_BATCH {
            match outcomes.try_recv() {
                Ok((settle, slot)) => {
                    batch.push(settle);
                    slots.push(slot);
                }
                Err(_) => break,
            }
        }
        // Each outcome is settled under the name its task was claimed under: nearly always
        // one name for the whole batch.
        let first_node = slots[0].lease.node;
        if slots.iter().all(|s| s.lease.node == first_node) {
            settle_batch(&engine, first_node, &batch, &stop).await;
        } else {
            let mut nodes: Vec<NodeId> = slots.iter().map(|s| s.lease.node).collect();
            nodes.sort_by_key(|n| n.0);
            nodes.dedup();
            for node in nodes {
                let part: Vec<TaskSettle> = batch
                    .iter()
                    .zip(&slots)
                    .filter(|(_, slot)| slot.lease.node == node)
                    .map(|(settle, _)| settle.clone())
                    .collect();
                settle_batch(&engine, node, &part, &stop).await;
            }
        }
        // Jobs whose outcome these may have decided early: ended now, their other calls
        // aborted (before the slots go, so that no claim takes one of their tasks meanwhile).
        let mut deciding: Vec<JobId> = batch
            .iter()
            .zip(&slots)
            .filter(|(_, slot)| slot.decides_early)
            .map(|(settle, _)| settle.job_id)
            .collect();
        deciding.sort();
        deciding.dedup();
        for job in deciding {
            if let Err(e) =
                crate::bus::end_if_decided(engine.store.as_ref(), &engine.bus, &engine.metrics, job)
                    .await
            {
                // The next outcome of the job looks again.
                tracing::warn!(job_id = %job, error = %e, "cannot end a job decided early");
            }
        }
        batch.clear();
        // Only now may these tasks' slots be claimed again.
        slots.clear();
    }
}

/// Writes one batch, retrying while the store is unavailable (a full disk, a lost
/// connection): the outcomes are not lost as long as the process lives.
///
/// A failed attempt may still have committed (a COMMIT whose answer was lost with its
/// connection): the settle is then retried as "unknown". The store applies an outcome only
/// to the attempt that is running under this node's lease, so the retry cannot store
/// anything twice; but what the first attempt did apply, the retry reports as nothing. So
/// after a retry the batch's jobs are read back, and those found finished are announced
/// (logged, counted, their callback woken) as this batch's, never trusting an empty report.
pub(super) async fn settle_batch(
    engine: &Engine,
    node: NodeId,
    batch: &[TaskSettle],
    stop: &CancellationToken,
) {
    let mut delay = Duration::from_millis(50);
    let started = Instant::now();
    let mut unknown = false;
    let report = loop {
        match engine.store.tasks_settle(node, batch).await {
            Ok(report) => {
                tracing::trace!(
                    outcomes = batch.len(),
                    micros = started.elapsed().as_micros() as u64,
                    "settle"
                );
                if unknown {
                    break with_jobs_finished_meanwhile(engine, batch, report, stop).await;
                }
                break report;
            }
            Err(e) if !matches!(e, StoreError::Unavailable(_)) => {
                // Not a passing condition: retrying would hold these slots and every later
                // batch forever. The tasks stay Running in the store; the next start calls
                // them again.
                tracing::error!(error = %e, outcomes = batch.len(), "storing task outcomes failed; their tasks will be called again");
                engine.names.forsake(node, "storing task outcomes failed");
                return;
            }
            Err(e) => {
                let mut jobs: Vec<JobId> = batch.iter().map(|s| s.job_id).collect();
                jobs.sort();
                jobs.dedup();
                tracing::error!(error = %e, outcomes = batch.len(), jobs = jobs.len(), "storing task outcomes failed; retrying");
                unknown = true;
                if stop.is_cancelled() {
                    // Shutting down: these tasks stay running in the store and are called
                    // again at next start.
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(IDLE_POLL * 5);
            }
        }
    };
    for settle in batch {
        // Observed here, on one task, rather than by every call on its own.
        engine
            .metrics
            .call_seconds
            .observe(settle.latency_ms as f64 / 1000.0);
    }
    engine.bus.settled(report, &engine.metrics);
}

/// Adds to a report the jobs of `batch` that are finished in the store although the report
/// does not say so: finished by an earlier attempt of this settle whose COMMIT took effect
/// but whose answer was lost. (A job that another node, or a report, finished meanwhile is
/// announced here too: a second log line and count, on this node; its callback is owed
/// once either way, by the outbox.) Cancelled jobs were announced by their cancel.
async fn with_jobs_finished_meanwhile(
    engine: &Engine,
    batch: &[TaskSettle],
    mut report: SettleReport,
    stop: &CancellationToken,
) -> SettleReport {
    let mut jobs: Vec<JobId> = batch.iter().map(|s| s.job_id).collect();
    jobs.sort();
    jobs.dedup();
    jobs.retain(|id| report.finished.iter().all(|f| f.job_id != *id));
    let mut delay = Duration::from_millis(50);
    for id in jobs {
        let job = loop {
            match engine.store.job_get(id).await {
                Ok(job) => break job,
                Err(e) if stop.is_cancelled() => {
                    tracing::warn!(error = %e, job_id = %id, "cannot read back a settled job while stopping");
                    break None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, job_id = %id, "reading back a settled job failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(IDLE_POLL * 5);
                }
            }
        };
        // A job that ended with tasks unfinished (a cancel, an early end) was announced by
        // whoever ended it.
        if let Some(job) = job
            && job.status.is_finished()
            && job.status != JobStatus::Cancelled
            && job.cancelled == 0
        {
            tracing::info!(job_id = %id, "a settle whose answer was lost had finished this job");
            report.finished.push(crate::store::JobFinished {
                job_id: id,
                status: job.status,
                has_callback: job.callback_url.is_some(),
            });
        }
    }
    report
}
