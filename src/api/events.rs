//! The events stream of a job (`GET /v1/jobs/{id}/events`): its progress, each failed
//! task, and its end, as Server-Sent Events that a client resumes with `Last-Event-ID`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::stream::{self, StreamExt};
use serde::Serialize;

use super::error::ApiError;
use super::jobs::{counts, find_job};
use super::wire::*;
use super::{AppState, parse_job_id};
use crate::auth::Owner;
use crate::bus::{Event, Queued};
use crate::job::JobId;
use crate::store::Store;

/// How often the events stream looks at its job.
pub(super) const EVENTS_EVERY: Duration = Duration::from_millis(250);

/// Where an events stream stands.
pub(super) struct Watch {
    store: Arc<dyn Store>,
    queued: Arc<Queued>,
    id: JobId,
    /// This node's events: a job that finishes here ends its stream at once instead
    /// of at the next look. (A job run by another node is seen at the next look.)
    node_events: tokio::sync::broadcast::Receiver<Event>,
    /// The last failure number sent: the `id` of every event.
    cursor: u64,
    last: Option<Progress>,
    first: bool,
    done: bool,
}

/// Failed tasks sent per look at the job.
pub(super) const FAILURES_PER_LOOK: u32 = 100;

impl Watch {
    /// One look at the job: the events it gives, or `None` when the stream is over.
    async fn look(&mut self) -> Option<Vec<SseEvent>> {
        if self.done {
            return None;
        }
        if !self.first {
            let id = self.id;
            let finished_here = async {
                loop {
                    match self.node_events.recv().await {
                        Ok(Event::JobFinished { job_id, .. }) if job_id == id => {
                            return;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                        _ => {}
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(EVENTS_EVERY) => {}
                _ = finished_here => {}
            }
        }
        self.first = false;
        let job = match self.store.job_get(self.id).await {
            Ok(Some(job)) => job,
            // Deleted meanwhile, or the database failed: the client reconnects if it wants.
            Ok(None) | Err(_) => return None,
        };
        let mut events = Vec::new();
        let failures = match self
            .store
            .tasks_failed_since(self.id, self.cursor, FAILURES_PER_LOOK)
            .await
        {
            Ok(f) => f,
            Err(_) => return None,
        };
        let more_failures = failures.len() == FAILURES_PER_LOOK as usize;
        // Progress first, on connect as after: a client sees where the job stands before
        // the backlog of its failures.
        let progress = Progress {
            job_id: job.id,
            status: job.status.shown(&job.options, crate::store::now_millis()),
            total: job.total,
            counts: counts(&job, self.queued.of(job.id)),
        };
        if self.last.as_ref() != Some(&progress) {
            events.push(sse("progress", self.cursor, &progress));
            self.last = Some(progress);
        }
        for failed in failures {
            self.cursor = failed.fail_seq;
            let data = TaskFailed {
                index: failed.task.index,
                attempts: failed.task.attempts,
                error: failed.task.error,
            };
            events.push(sse("task_failed", self.cursor, &data));
        }
        if job.status.is_finished() && !more_failures {
            events.push(sse(
                "finished",
                self.cursor,
                &JobView::new(job, None, &self.queued),
            ));
            self.done = true;
        }
        if more_failures {
            // Catching up: look again at once.
            self.first = true;
        }
        Some(events)
    }
}

pub(super) fn sse(name: &str, id: u64, data: &impl Serialize) -> SseEvent {
    SseEvent::default()
        .event(name)
        .id(id.to_string())
        .json_data(data)
        .expect("event data serializes")
}

/// Live progress of a job as Server-Sent Events.
///
/// `progress` (counts) on connect and at most every 250 ms while they change; `task_failed`
/// for each failed task; `finished` (the job, without results) last, then the stream ends.
/// Every event's id counts the failures sent so far: reconnecting with `Last-Event-ID`
/// resumes without repeating a `task_failed`.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event"),
    ),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = SseFrame),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn job_events(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = parse_job_id(&id)?;
    let store = state.services.store.clone();
    find_job(store.as_ref(), id, &owner).await?;
    let cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let watch = Watch {
        store,
        queued: state.services.bus.queued.clone(),
        id,
        node_events: state.services.bus.subscribe(),
        cursor,
        last: None,
        first: true,
        done: false,
    };
    let events = stream::unfold(watch, |mut watch| async move {
        let events = watch.look().await?;
        Some((stream::iter(events.into_iter().map(Ok)), watch))
    })
    .flatten();
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
