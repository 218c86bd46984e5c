//! What a request asks of the service, each command as it is carried out: commit to the
//! store, then signal on the bus (the engine and the outbox act on the signal). Also what
//! `doparallel run` submits its job with.

use std::sync::Arc;

use crate::bus::{Bus, Event};
use crate::job::{JobId, JobStatus, NewJob};
use crate::metrics::Metrics;
use crate::store::{
    CancelOutcome, IdempotencyKey, InsertOutcome, ReportOutcome, SettleOutcome, Store, StoreResult,
    TaskReport, now_millis,
};
use crate::task_token::TaskTokens;

/// What the commands work with: the node's store, bus, counters and task-token key.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn Store>,
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    pub tokens: Arc<TaskTokens>,
}

/// Stores a new job and wakes the dispatcher. The job and all its tasks are committed
/// before this returns. With an idempotency key used before, nothing is stored.
pub async fn submit(
    services: &Services,
    job: &NewJob,
    idempotency: Option<&IdempotencyKey>,
) -> StoreResult<InsertOutcome> {
    let outcome = services
        .store
        .job_insert(job, idempotency, now_millis())
        .await?;
    if outcome != InsertOutcome::Inserted {
        return Ok(outcome);
    }
    services.metrics.jobs_submitted.inc();
    if job.tasks.is_empty() {
        services.metrics.job_finished(JobStatus::Complete);
        if job.callback.is_some() {
            services.bus.callbacks_due();
        }
        services.bus.emit(Event::JobFinished {
            job_id: job.id,
            status: JobStatus::Complete,
        });
    } else {
        services.bus.work();
        if job.options.deadline_ms.is_some() {
            services.bus.deadlines();
        }
    }
    Ok(outcome)
}

/// Pauses (`pause`) or resumes a job; a resumed job wakes the engine.
pub async fn pause(
    services: &Services,
    id: JobId,
    pause: bool,
) -> StoreResult<crate::store::PauseOutcome> {
    let outcome = services.store.job_pause(id, pause).await?;
    if let crate::store::PauseOutcome::Changed(status) = outcome {
        tracing::info!(job_id = %id, status = status.as_str(), "job {}", if pause { "paused" } else { "resumed" });
        if !pause {
            services.bus.work();
        }
    }
    Ok(outcome)
}

/// Retries a finished job's tasks of the `include` statuses (see `Store::job_retry`); on
/// success wakes the engine, and forgets a cancel of the job, so that its calls start.
pub async fn retry(
    services: &Services,
    id: JobId,
    include: &[crate::job::TaskStatus],
) -> StoreResult<crate::store::RetryOutcome> {
    let outcome = services.store.job_retry(id, include, now_millis()).await?;
    if let crate::store::RetryOutcome::Requeued { tasks, run } = outcome {
        tracing::info!(job_id = %id, tasks, run, "job retried");
        services.bus.forget_cancel(id);
        services.bus.work();
        // Its deadline counts from now.
        services.bus.deadlines();
    }
    Ok(outcome)
}

/// Cancels a job: its unfinished tasks become Cancelled, calls in flight on this node are
/// aborted (other nodes hear of it through the store's notices), and its callback (status
/// Cancelled) is due.
pub async fn cancel(services: &Services, id: JobId) -> StoreResult<CancelOutcome> {
    let outcome = services.store.job_cancel(id, now_millis()).await?;
    if let CancelOutcome::Cancelled {
        has_callback,
        newly: true,
        tasks,
    } = outcome
    {
        services.bus.ended(
            id,
            JobStatus::Cancelled,
            tasks,
            has_callback,
            &services.metrics,
        );
    }
    Ok(outcome)
}

/// Records a heartbeat of an attempt that answered 202 (see `Store::tasks_heartbeat`).
pub async fn heartbeat(
    services: &Services,
    token: &str,
    progress: Option<Box<serde_json::value::RawValue>>,
) -> StoreResult<crate::store::HeartbeatOutcome> {
    let Some(claims) = services.tokens.verify(token) else {
        return Ok(crate::store::HeartbeatOutcome::Unknown);
    };
    services
        .store
        .tasks_heartbeat(&crate::store::TaskHeartbeat {
            job_id: claims.job_id,
            index: claims.index,
            attempt: claims.attempt,
            now: now_millis(),
            progress,
        })
        .await
}

/// Stores the outcome an endpoint reported for an attempt it answered with 202.
pub async fn report(
    services: &Services,
    token: &str,
    outcome: SettleOutcome,
) -> StoreResult<ReportOutcome> {
    let Some(claims) = services.tokens.verify(token) else {
        return Ok(ReportOutcome::Unknown);
    };
    let outcome = services
        .store
        .tasks_report(&TaskReport {
            job_id: claims.job_id,
            index: claims.index,
            attempt: claims.attempt,
            now: now_millis(),
            outcome,
        })
        .await?;
    if let ReportOutcome::Applied(report) = &outcome {
        tracing::debug!(job_id = %claims.job_id, task = claims.index, attempt = claims.attempt, "outcome reported");
        services.bus.settled(report.clone(), &services.metrics);
        // The outcome is stored: a trouble deciding the job early is left to its next one.
        if report.finished.is_empty()
            && let Err(e) = crate::bus::end_if_decided(
                services.store.as_ref(),
                &services.bus,
                &services.metrics,
                claims.job_id,
            )
            .await
        {
            tracing::warn!(job_id = %claims.job_id, error = %e, "cannot end a job decided early");
        }
    }
    Ok(outcome)
}
