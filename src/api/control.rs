//! Job control: change a running job's limits, pause and resume it, retry what failed.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use bytes::Bytes;

use super::error::{ApiError, body_error};
use super::jobs::{find_job, job_view};
use super::wire::*;
use super::{AppState, commands, parse_job_id};
use crate::auth::Owner;
use crate::job::{JobStatus, TaskStatus};
use crate::store::{OptionsOutcome, PauseOutcome, RetryOutcome};

/// Change a running job's limits: `concurrency`, `per_host_concurrency`, `per_host_rate`
/// (each a number, or `null` for no limit of its own). The next claim on every node serves
/// the job under them; calls already started keep the limits they started under.
#[utoipa::path(
    patch, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    request_body(content = JobPatch, content_type = "application/json"),
    responses(
        (status = 200, description = "The job, with its new options", body = JobView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job already finished", body = ErrorBody),
        (status = 422, description = "An option that cannot change, or a bad value", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn update_job(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    let body = body.map_err(body_error)?;
    let patch: JobPatch = serde_json::from_slice(&body).map_err(|e| {
        let status = if e.is_syntax() || e.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(status, format!("expected {{\"options\": {{...}}}}: {e}"))
    })?;
    let store = state.services.store.as_ref();
    let finished = |status: JobStatus| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the job is already {}; only an unfinished job's limits can change",
                status.as_str()
            ),
        )
    };
    // Read, change, write on condition that nothing changed meanwhile; again if it did.
    for _ in 0..5 {
        let job = find_job(store, id, &owner).await?;
        if job.status.is_finished() {
            return Err(finished(job.status));
        }
        let next = job
            .options
            .with_limits(&patch.options)
            .map_err(|msg| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, msg))?;
        match store.job_set_options(id, &job.options, &next).await? {
            OptionsOutcome::Updated => {
                tracing::info!(job_id = %id, "job limits changed");
                state.services.bus.work();
                state.services.bus.deadlines();
                let job = find_job(store, id, &owner).await?;
                return Ok(Json(job_view(&state, job).await?));
            }
            OptionsOutcome::Changed => continue,
            OptionsOutcome::Finished(status) => return Err(finished(status)),
            OptionsOutcome::NotFound => return Err(ApiError::no_job(id)),
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the job's options kept changing meanwhile; try again",
    ))
}

/// Pause a job: no new call of it starts (on any node) until it is resumed; calls in
/// flight finish and are stored. Pausing a paused job changes nothing.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/pause", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, now Paused", body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job already finished", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn pause_job(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    pause_or_resume(state, owner, id, true).await
}

/// Resume a paused job: its calls start again. Resuming a job not paused changes nothing.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/resume", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, Pending or Running again", body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job already finished", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn resume_job(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    pause_or_resume(state, owner, id, false).await
}

async fn pause_or_resume(
    state: AppState,
    owner: Owner,
    id: String,
    pause: bool,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    find_job(state.services.store.as_ref(), id, &owner).await?;
    match commands::pause(&state.services, id, pause).await? {
        PauseOutcome::NotFound => Err(ApiError::no_job(id)),
        PauseOutcome::Finished(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the job is already {}; only an unfinished job can be {}",
                status.as_str(),
                if pause { "paused" } else { "resumed" }
            ),
        )),
        PauseOutcome::Changed(_) | PauseOutcome::Unchanged(_) => {
            let job = find_job(state.services.store.as_ref(), id, &owner).await?;
            Ok(Json(job_view(&state, job).await?))
        }
    }
}

/// Retry a finished job: its Failed tasks (and, with `include`, its Cancelled ones) run
/// again with a fresh attempt budget, in the job's next run; Complete tasks are not called
/// again. When the run finishes, a new callback (its own `webhook-id`) carries the whole
/// document.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    request_body(content = Option<RetryRequest>, content_type = "application/json"),
    responses(
        (status = 202, description = "The tasks run again", body = RetryAnswer),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is unfinished, or its callback is still owed", body = ErrorBody),
        (status = 422, description = "No task to retry, or a bad include", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn retry_job(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RetryAnswer>), ApiError> {
    let id = parse_job_id(&id)?;
    let body = body.map_err(body_error)?;
    let request: RetryRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RetryRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            let status = if e.is_syntax() || e.is_eof() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            ApiError::new(status, format!("retry: {e}"))
        })?
    };
    let include = request.include.unwrap_or_else(|| vec![TaskStatus::Failed]);
    if include.is_empty()
        || include
            .iter()
            .any(|s| !matches!(s, TaskStatus::Failed | TaskStatus::Cancelled))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "include: name the statuses of the tasks to run again: Failed, Cancelled",
        ));
    }
    find_job(state.services.store.as_ref(), id, &owner).await?;
    let unprocessable = |msg: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, msg);
    match commands::retry(&state.services, id, &include).await? {
        RetryOutcome::Requeued { tasks, run } => Ok((
            StatusCode::ACCEPTED,
            Json(RetryAnswer {
                status: "Success".into(),
                msg: "Job Retried".into(),
                job_id: id,
                run,
                requeued: tasks,
                status_url: format!("/v1/jobs/{id}"),
            }),
        )),
        RetryOutcome::NotFound => Err(ApiError::no_job(id)),
        RetryOutcome::Unfinished(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the job is {}; only a finished job (Complete, Failed or Cancelled) can be retried",
                status.as_str()
            ),
        )),
        RetryOutcome::CallbackPending => Err(ApiError::new(
            StatusCode::CONFLICT,
            "the job's callback is still being delivered; retry once it is delivered or given up",
        )),
        RetryOutcome::NothingToRetry => Err(unprocessable(format!(
            "the job has no {} task to retry",
            include
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        ))),
        RetryOutcome::CancelledLeftOut => Err(unprocessable(
            "the job's cancelled tasks must run again with it (its run could not finish \
             otherwise): add \"Cancelled\" to include"
                .into(),
        )),
    }
}
