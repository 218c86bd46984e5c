//! Jobs past their deadline (`options.deadline_ms`): each is ended by `Store::job_expire`,
//! its unfinished tasks Failed with error kind `deadline` and its calls aborted on every
//! node, by whichever node looks first. The sweep sleeps until the next deadline the store
//! names, and looks again when told a deadline may have been set (`Bus::deadlines`: a
//! submission or change through this node, another node's notice, a claim of a job with a
//! deadline), at most once a second for those, and at least every [`DEADLINE_POLL`]. A
//! deadline that passed while no node ran is applied at the first look after a start.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::node::Engine;
use crate::job::TaskError;
use crate::store::{ExpireOutcome, now_millis};

/// The longest the sweep goes without a look: what it may take to notice a deadline that
/// nothing announced to this node (a job submitted through another node on a backend
/// without notices, and paused there before any of its tasks was claimed here).
pub const DEADLINE_POLL: Duration = Duration::from_secs(60);

/// The shortest interval between looks prompted by announcements.
const PROMPTED_EVERY: Duration = Duration::from_secs(1);

/// Jobs ended per look; a full batch is followed by another look at once.
const BATCH: u32 = 64;

/// The next look after the store failed to answer or to end a job.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub(super) async fn deadline_loop(engine: Arc<Engine>, stop: CancellationToken) {
    loop {
        let now = now_millis();
        let last_look = Instant::now();
        let next = match engine.store.jobs_deadline(now, BATCH).await {
            Ok(found) => {
                let mut ended = 0;
                let mut failed = false;
                for id in &found.due {
                    match expire(&engine, *id).await {
                        Ok(true) => ended += 1,
                        Ok(false) => {}
                        Err(()) => failed = true,
                    }
                }
                // A full batch that ended jobs: more may be due now.
                if found.due.len() == BATCH as usize && ended > 0 && !stop.is_cancelled() {
                    continue;
                }
                if failed {
                    Some(now + RETRY_AFTER.as_millis() as i64)
                } else {
                    found.next
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "looking for jobs past their deadline failed");
                Some(now + RETRY_AFTER.as_millis() as i64)
            }
        };
        let until_next = next.map_or(DEADLINE_POLL, |at| {
            Duration::from_millis((at - now_millis()).max(0) as u64)
        });
        let wake = Instant::now() + until_next.min(DEADLINE_POLL);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
            _ = engine.bus.deadlines_signalled() => {
                // Announcements come with submissions: a look a second at most.
                let earliest = (last_look + PROMPTED_EVERY).min(wake);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(earliest) => {}
                }
            }
        }
    }
}

/// Ends one job at its deadline, unless that changed meanwhile; whether it did, or `Err`
/// when the store failed (logged here).
async fn expire(engine: &Engine, id: crate::job::JobId) -> Result<bool, ()> {
    let error = TaskError::new(
        "deadline",
        "the job's deadline (options.deadline_ms) passed before this task finished",
    )
    .to_json();
    match engine.store.job_expire(id, &error, now_millis()).await {
        Ok(ExpireOutcome::Expired {
            status,
            has_callback,
            tasks,
        }) => {
            tracing::warn!(job_id = %id, failed = tasks, "job's deadline passed; its unfinished tasks failed");
            engine
                .bus
                .expired(id, status, tasks, has_callback, &engine.metrics);
            Ok(true)
        }
        Ok(ExpireOutcome::NotDue) => Ok(false),
        Err(e) => {
            tracing::error!(job_id = %id, error = %e, "ending a job at its deadline failed");
            Err(())
        }
    }
}
