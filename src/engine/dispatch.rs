//! The dispatcher: holds one semaphore permit per task it has running (`max_in_flight`),
//! claims as many tasks as it has free permits, and spawns a call for each; a call waits at
//! its host's gates, makes its attempt, and hands its outcome and its slot to the finisher.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::call;
use super::hosts;
use super::node::{Engine, IdleSpell, Settled, Slot, Waiting};
use crate::job::JobId;
use crate::store::{ClaimParams, ClaimedTask, TaskSettle, now_millis};

pub(super) async fn dispatch(
    engine: Arc<Engine>,
    in_flight: Arc<Semaphore>,
    outcomes: mpsc::Sender<Settled>,
    stop: CancellationToken,
) {
    loop {
        let mut permits = tokio::select! {
            _ = stop.cancelled() => return,
            p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let more = in_flight.available_permits() as u32;
        if more > 0
            && let Ok(extra) = in_flight.clone().try_acquire_many_owned(more)
        {
            permits.merge(extra);
        }
        let free = permits.num_permits();
        let started = Instant::now();
        // Jobs whose calls already queue at a host's gates beyond what the gates can start
        // soon: more of their tasks would only hold slots that other jobs can use.
        let skip_jobs = engine.hosts.backlogged_jobs();
        let node = engine.names.current();
        let claim = match engine
            .store
            .tasks_claim(&ClaimParams {
                limit: free as u32,
                now: now_millis(),
                node,
                lease_until: now_millis() + engine.config.lease_timeout.as_millis() as i64,
                skip_jobs,
                priority_max_wait: engine.config.priority_max_wait.as_millis() as i64,
                owners: engine.tenants.limits(),
                group_concurrency: engine.config.group_concurrency,
            })
            .await
        {
            Ok(claim) if answer_lost(&claim) => {
                tracing::error!(
                    "claiming tasks failed (its answer was lost); trying again shortly"
                );
                engine.names.forsake(node, "a claim failed");
                drop(permits);
                continue;
            }
            Ok(claim) => claim,
            Err(e) => {
                tracing::error!(error = %e, "claiming tasks failed; trying again shortly");
                // It may have committed all the same, leasing tasks that no call will make.
                engine.names.forsake(node, "a claim failed");
                drop(permits);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(engine.idle_poll) => continue,
                }
            }
        };
        let claimed = claim.tasks.len();
        {
            // An idle spell: claims that find nothing while nothing is in flight.
            let mut idle = engine.idle.lock().expect("not poisoned");
            if claimed == 0 && free as usize == engine.config.max_in_flight {
                let now = Instant::now();
                let since = idle.map_or(now, |spell| spell.since);
                *idle = Some(IdleSpell {
                    since,
                    last: now,
                    next_due: claim.next_due,
                });
            } else {
                *idle = None;
            }
        }
        tracing::trace!(
            free,
            claimed,
            micros = started.elapsed().as_micros() as u64,
            "claim"
        );
        if claimed > 0 {
            crash_point!("task-claimed");
        }
        // A job with a deadline, perhaps submitted through another node: the deadline
        // sweep learns of it (it looks at most once a second for this).
        if claim.tasks.iter().any(|t| t.options.deadline_ms.is_some()) {
            engine.bus.deadlines();
        }
        // A claim lists each job's tasks together: one token lookup per job.
        let mut token: Option<(JobId, CancellationToken)> = None;
        for task in claim.tasks {
            let decides_early = task.options.decides_early();
            let slot = Slot {
                decides_early,
                _permit: permits.split(1).expect("one permit per claimed task"),
                lease: engine.names.hold(node),
                _tenant: engine.tenants.hold(task.owner.as_ref()),
            };
            let cancelled = match &token {
                Some((job, t)) if *job == task.job_id => t.clone(),
                _ => {
                    let t = engine.bus.call_token(task.job_id);
                    token = Some((task.job_id, t.clone()));
                    t
                }
            };
            let queued = engine.bus.queued.enter(task.job_id);
            tokio::spawn(run_call(
                engine.clone(),
                task,
                cancelled,
                stop.clone(),
                (slot, queued),
                outcomes.clone(),
            ));
        }
        drop(permits);
        if claimed < free {
            // Nothing more is due now: wait for a submission, a settled task (which may free
            // a job's concurrency), a left-out job whose backlog cleared, or the first retry
            // to come due.
            let wait = claim
                .next_due
                .map(|due| Duration::from_millis((due - now_millis()).max(0) as u64))
                .unwrap_or(engine.idle_poll)
                .min(engine.idle_poll);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = engine.bus.work_signalled() => {}
                _ = engine.hosts.cleared() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Whether the fault tests (`claim-answer-lost`) want this committed claim treated as one
/// whose answer was lost: the engine then holds leases it knows nothing of.
fn answer_lost(claim: &crate::store::Claim) -> bool {
    if claim.tasks.is_empty() {
        return false;
    }
    fail::fail_point!("claim-answer-lost", |_| true);
    false
}

/// Gives back a task whose call a cancel aborted: its attempt settled as a retry due now.
/// The store refuses it for a task its cancel ended (as any late outcome), and applies it
/// when the job was retried since (the cancel this node heard was the previous run's): the
/// task then runs again rather than stay running with nobody calling it.
async fn release(task: &ClaimedTask, slot: Slot, outcomes: &mpsc::Sender<Settled>) {
    let now = now_millis();
    let error =
        crate::job::TaskError::new("aborted", "the call was aborted by a cancel of its job");
    let settle = TaskSettle {
        job_id: task.job_id,
        index: task.index,
        attempt: task.attempt,
        latency_ms: 0,
        now,
        outcome: crate::store::SettleOutcome::Retry {
            run_at: now,
            error: error.to_json(),
        },
    };
    let _ = outcomes.send((settle, slot)).await;
}

async fn run_call(
    engine: Arc<Engine>,
    task: ClaimedTask,
    cancelled: CancellationToken,
    stop: CancellationToken,
    (slot, queued): Waiting,
    outcomes: mpsc::Sender<Settled>,
) {
    // The built-in test task has no host and meets no gate. A call whose group's rate
    // reserved it a start (`plan::GroupGate`) waits for it first.
    let host = hosts::host_key(&task.endpoint);
    let start_at = task.start_at;
    let gates = async {
        if let Some(wait) = start_at.map(|at| at - now_millis()).filter(|&w| w > 0) {
            tokio::time::sleep(std::time::Duration::from_millis(wait as u64)).await;
        }
        match &host {
            None => None,
            Some(host) => Some(
                engine
                    .hosts
                    .pass(task.job_id, task.options.host_limits(), host.clone())
                    .await,
            ),
        }
    };
    let pass = if start_at.is_none() && host.is_none() {
        None
    } else {
        tokio::select! {
            pass = gates => pass,
            _ = cancelled.cancelled() => {
                tracing::debug!(job_id = %task.job_id, task = task.index, "call aborted by cancel at its host's gate");
                drop(queued);
                release(&task, slot, &outcomes).await;
                return;
            }
            _ = stop.cancelled() => {
                // Not started, so nothing is lost: like a call abandoned after the grace
                // period, its task stays running in the store and is called at next start.
                // Waiting on (a pause may last an hour) would only hold the shutdown up.
                tracing::debug!(job_id = %task.job_id, task = task.index, "call left at its host's gate by shutdown");
                return;
            }
        }
    };
    // In flight from here on, no longer queued.
    drop(queued);
    let started = Instant::now();
    engine.metrics.calls_in_flight.inc();
    // Where the endpoint may report an outcome later: the configured public URL, or for a
    // job that asks for reports, this server's own address; otherwise no task token and no
    // result URL are sent (the listening address is nobody's business).
    let report_base = engine.config.public_url.as_ref().or(engine
        .config
        .local_url
        .as_ref()
        .filter(|_| task.options.async_reports));
    let report_to = report_base.map(|base| {
        let token = engine.tokens.mint(task.job_id, task.index, task.attempt);
        let base = format!("{}/v1/tasks/{token}", base.as_str().trim_end_matches('/'));
        call::ReportTo {
            url: format!("{base}/result"),
            heartbeat_url: format!("{base}/heartbeat"),
            token,
        }
    });
    let attempt = if report_to.is_none()
        && task.options.async_reports
        && engine.config.reports_need_url
    {
        Some(call::Attempt::Fatal(crate::job::TaskError::new(
            "request",
            "the job asks for async reports, but this worker has no --public-url to give the \
             endpoint (set it to the API's URL)",
        )))
    } else {
        tokio::select! {
            a = call::attempt(&engine.outbound, &task, &engine.config, report_to) => Some(a),
            _ = cancelled.cancelled() => None,
            _ = engine.abandon.cancelled() => {
                engine.metrics.calls_in_flight.dec();
                tracing::debug!(job_id = %task.job_id, task = task.index, "call abandoned after the grace period");
                return;
            }
        }
    };
    engine.metrics.calls_in_flight.dec();
    if let (Some(host), Some(attempt)) = (&host, &attempt)
        && let Some(delay) = call::host_pause(attempt)
    {
        let asked = matches!(
            attempt,
            call::Attempt::Retryable {
                retry_after: Some(_),
                ..
            }
        );
        engine.hosts.pause(host, task.job_id, delay, asked);
    }
    // The host's permits go as soon as its answer is in, before the outcome is stored; its
    // adaptive limit and breaker learn from it.
    if let Some(pass) = pass {
        let signal = attempt
            .as_ref()
            .map_or(hosts::adaptive::Signal::Nothing, |a| {
                call::host_signal(a, started.elapsed())
            });
        pass.finish(signal);
    }
    let Some(attempt) = attempt else {
        tracing::debug!(job_id = %task.job_id, task = task.index, "call aborted by cancel");
        release(&task, slot, &outcomes).await;
        return;
    };
    crash_point!("response-received");
    let latency_ms = started.elapsed().as_millis() as u64;
    let now = now_millis();
    let outcome = call::settle_outcome(
        &task.options,
        task.attempt_in_run(),
        attempt,
        now,
        &mut rand::rng(),
    );
    tracing::debug!(job_id = %task.job_id, task = task.index, attempt = task.attempt, latency_ms, ?outcome, "attempt over");
    let settle = TaskSettle {
        job_id: task.job_id,
        index: task.index,
        attempt: task.attempt,
        latency_ms,
        now,
        outcome,
    };
    // The finisher only goes away at shutdown, after the grace period: an outcome that comes
    // later is dropped and the task is called again at next start.
    let _ = outcomes.send((settle, slot)).await;
}
