//! This node's leases: renewed while calls claimed under a name run, taken back from nodes
//! that stopped renewing theirs, and awaited attempts timed out past their deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::call;
use super::finish::settle_batch;
use super::names;
use super::node::{Engine, SETTLE_BATCH};
use crate::store::{Millis, OverdueParams, TaskSettle, now_millis};

/// Keeps this node's leases alive while it has calls running, and takes back the tasks of
/// nodes whose leases ran out (any node may: the first to look does it).
///
/// Renewing every third of the lease timeout leaves two chances to renew before a lease
/// runs out; the sweep runs at the same pace, so a dead node's tasks are called again
/// within the lease timeout plus one sweep.
pub(super) async fn lease_loop(
    engine: Arc<Engine>,
    stop: CancellationToken,
    finisher_stop: CancellationToken,
) {
    let every = (engine.config.lease_timeout / 3).max(Duration::from_millis(10));
    // The first sweep at once: a short-lived node (`work --until-idle`) takes back what a
    // dead node left before it decides it has nothing to do.
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                // Renewal goes on through the shutdown's grace period, until the finisher
                // stops.
                _ = finisher_stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
        first = false;
        let now = now_millis();
        for node in engine.names.in_use() {
            let until = now + engine.config.lease_timeout.as_millis() as i64;
            if let Err(e) = engine.store.tasks_renew(node, until).await {
                tracing::error!(error = %e, %node, "renewing this node's leases failed");
            }
        }
        if stop.is_cancelled() {
            continue;
        }
        match engine.store.tasks_expire(now).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    tasks = n,
                    "took back tasks whose lease ran out; calling them again"
                );
                engine.metrics.leases_expired.inc_by(n);
                engine.bus.work();
            }
            Err(e) => tracing::error!(error = %e, "taking back expired leases failed"),
        }
        time_out_awaited(&engine, now, &stop).await;
        engine
            .swept
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Awaited attempts that came to their deadline without a report: each is settled as a
/// timeout (retried or failed by the job's options, like any timeout).
async fn time_out_awaited(engine: &Engine, now: Millis, stop: &CancellationToken) {
    let node = engine.names.current();
    let overdue = match engine
        .store
        .tasks_overdue(&OverdueParams {
            limit: SETTLE_BATCH as u32,
            now,
            node,
            lease_until: now + engine.config.lease_timeout.as_millis() as i64,
        })
        .await
    {
        Ok(overdue) => overdue,
        Err(e) => {
            tracing::error!(error = %e, "looking for awaited tasks past their deadline failed");
            return;
        }
    };
    if overdue.is_empty() {
        return;
    }
    let batch: Vec<TaskSettle> = overdue
        .iter()
        .map(|task| {
            let error = crate::job::TaskError::timeout(match task.options.async_heartbeat_ms {
                Some(every) => format!(
                    "neither an outcome nor a heartbeat within {every} ms \
                     (options.async_heartbeat_ms), or no outcome within {} ms of the 202 answer",
                    task.options.async_timeout_ms
                ),
                None => format!(
                    "no outcome reported within {} ms of the 202 answer",
                    task.options.async_timeout_ms
                ),
            });
            let attempt = call::Attempt::Retryable {
                error,
                retry_after: None,
            };
            TaskSettle {
                job_id: task.job_id,
                index: task.index,
                attempt: task.attempt,
                latency_ms: task.options.async_timeout_ms,
                now,
                outcome: call::settle_outcome(
                    &task.options,
                    task.attempt_in_run(),
                    attempt,
                    now,
                    &mut rand::rng(),
                ),
            }
        })
        .collect();
    tracing::warn!(
        tasks = batch.len(),
        "awaited tasks timed out without a report"
    );
    // Leased to this node until settled: renewed like calls in flight meanwhile.
    let _held: Vec<names::Held> = batch.iter().map(|_| engine.names.hold(node)).collect();
    settle_batch(engine, node, &batch, stop).await;
    let mut deciding: Vec<_> = overdue
        .iter()
        .filter(|t| t.options.decides_early())
        .map(|t| t.job_id)
        .collect();
    deciding.sort();
    deciding.dedup();
    for job in deciding {
        if let Err(e) =
            crate::bus::end_if_decided(engine.store.as_ref(), &engine.bus, &engine.metrics, job)
                .await
        {
            tracing::warn!(job_id = %job, error = %e, "cannot end a job decided early");
        }
    }
}
