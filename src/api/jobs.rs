//! The job routes: submit, read, list, cancel and delete jobs, and page through tasks.

use axum::Json;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, RawQuery, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use utoipa::IntoParams;

use super::error::{ApiError, body_error, query_error};
use super::wire::*;
use super::{AppState, commands, parse_job_id, rfc3339};
use crate::auth::Owner;
use crate::bus::Queued;
use crate::document;
use crate::job::{JobId, JobStatus, JobTrace, TaskStatus, parse_submission};
use crate::store::{
    CancelOutcome, DeleteOutcome, IdempotencyKey, InsertOutcome, JobListQuery, JobRecord, Store,
    StoreError, TaskPageQuery, TaskRecord,
};

/// Most tasks or jobs one page returns.
pub(super) const MAX_PAGE: u32 = 1000;
pub(super) const DEFAULT_PAGE: u32 = 100;

/// Longest `Idempotency-Key` accepted.
pub(super) const MAX_IDEMPOTENCY_KEY: usize = 255;

pub(super) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Submit a job.
///
/// The job and all its tasks are stored in one transaction before the answer. With an
/// `Idempotency-Key` used before with the same body, the first job is answered (200) and
/// nothing new is stored; with another body, 409.
#[utoipa::path(
    post, path = "/v1/job", tag = "jobs",
    request_body(content = JobRequest, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried submission safe")),
    responses(
        (status = 202, description = "Accepted", body = SubmitAnswer,
         headers(("Location" = String, description = "The job's status URL"))),
        (status = 200, description = "The job this Idempotency-Key created before", body = SubmitAnswer),
        (status = 400, description = "Malformed JSON or bad header", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another body", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Not a valid job", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn submit(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    if !is_json(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected a JSON body with Content-Type: application/json",
        ));
    }
    let config = &state.config;
    let idempotency = idempotency_key(&headers, &body, &config.sealer)?;
    let mut job = parse_submission(&body, &config.limits, &config.egress, &config.sealer)?;
    job.owner = owner.0;
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    job.options.trace = Some(JobTrace::from_headers(
        header("traceparent"),
        header("tracestate"),
    ));
    match commands::submit(&state.services, &job, idempotency.as_ref()).await? {
        InsertOutcome::Inserted => {
            tracing::info!(job_id = %job.id, tasks = job.tasks.len(), "job accepted");
            let answer = SubmitAnswer::new(job.id);
            Ok((
                StatusCode::ACCEPTED,
                [(LOCATION, answer.status_url.clone())],
                Json(answer),
            )
                .into_response())
        }
        InsertOutcome::Existing {
            job_id,
            same_request: true,
        } => Ok((StatusCode::OK, Json(SubmitAnswer::new(job_id))).into_response()),
        InsertOutcome::Existing { job_id, .. } => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Idempotency-Key was already used for job {job_id} with another body; \
                 use a new key for a new job"
            ),
        )),
    }
}

/// Submit a job (the plural alias of `POST /v1/job`).
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body(content = JobRequest, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried submission safe")),
    responses(
        (status = 202, description = "Accepted", body = SubmitAnswer,
         headers(("Location" = String, description = "The job's status URL"))),
        (status = 200, description = "The job this Idempotency-Key created before", body = SubmitAnswer),
        (status = 400, description = "Malformed JSON or bad header", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another body", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Not a valid job", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn submit_alias(
    state: State<AppState>,
    owner: Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    submit(state, owner, headers, body).await
}

/// The `Idempotency-Key` header with a digest of the body it came with.
pub(super) fn idempotency_key(
    headers: &HeaderMap,
    body: &[u8],
    sealer: &crate::sealing::Sealer,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                ),
            )
        })?;
    Ok(Some(IdempotencyKey {
        key: key.to_string(),
        request_hash: sealer.request_digest(body),
    }))
}

/// The job's counts; `queued` of its running tasks wait on this node rather than run.
pub(super) fn counts(job: &JobRecord, queued: u64) -> Counts {
    let queued = queued.min(job.running);
    Counts {
        pending: job.pending(),
        running: job.running - queued,
        queued,
        complete: job.complete,
        failed: job.failed,
        cancelled: job.cancelled,
    }
}

impl JobView {
    pub(super) fn new(job: JobRecord, result: Option<Box<RawValue>>, queued: &Queued) -> Self {
        JobView {
            job_id: job.id,
            status: job.status.shown(&job.options, crate::store::now_millis()),
            total: job.total,
            counts: counts(&job, queued.of(job.id)),
            created_at: rfc3339(job.created_at),
            finished_at: job.finished_at.map(rfc3339),
            callback: CallbackView {
                url: job.callback_url,
                state: job.callback.state,
                attempts: job.callback.attempts,
                last_error: job.callback.last_error,
            },
            trace_id: job.options.trace.as_ref().map(|t| t.trace_id.clone()),
            run: job.options.run(),
            deadline_at: crate::store::plan::deadline(&job.options, job.created_at).map(rfc3339),
            metadata: job.metadata,
            options: Some(job.options.masked()),
            result,
            result_url: None,
        }
    }
}

/// The job, if it exists and belongs to the caller: another owner's job is not found.
pub(super) async fn find_job(
    store: &dyn Store,
    id: JobId,
    owner: &Owner,
) -> Result<JobRecord, ApiError> {
    store
        .job_get(id)
        .await?
        .filter(|job| owner.0.is_none() || job.owner == owner.0)
        .ok_or_else(|| ApiError::no_job(id))
}

/// A job with its result map once finished, within `max_bytes` (else a link to its tasks,
/// as the callback does).
pub(super) async fn job_view(state: &AppState, job: JobRecord) -> Result<JobView, ApiError> {
    let store = state.services.store.as_ref();
    let queued = &state.services.bus.queued;
    if !job.status.is_finished() {
        return Ok(JobView::new(job, None, queued));
    }
    let max_bytes = state.config.max_callback_bytes;
    let mut map = Vec::new();
    if !document::write_result_map(store, job.id, &mut map, max_bytes).await? {
        let url = format!("/v1/jobs/{}/tasks", job.id);
        let mut view = JobView::new(job, None, queued);
        view.result_url = Some(url);
        return Ok(view);
    }
    let text = String::from_utf8(map).map_err(|e| StoreError::Other(e.to_string()))?;
    let result = RawValue::from_string(text).map_err(|e| StoreError::Other(e.to_string()))?;
    Ok(JobView::new(job, Some(result), queued))
}

/// A job: its status, counts, callback state and, once finished, its results.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn get_job(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    let store = state.services.store.as_ref();
    let job = find_job(store, id, &owner).await?;
    Ok(Json(job_view(&state, job).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct TasksQuery {
    /// Only tasks with a larger index (the `next_after` of the previous page).
    #[serde(default)]
    after: u64,
    /// Page size, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// Only tasks with this status.
    status: Option<TaskStatus>,
}

impl From<TaskRecord> for TaskView {
    fn from(t: TaskRecord) -> Self {
        TaskView {
            index: t.index,
            status: t.status,
            attempts: t.attempts,
            endpoint: t.endpoint,
            call: t.call.map(|call| call.masked()).unwrap_or_default(),
            result: t.result.filter(|_| t.status == TaskStatus::Complete),
            error: t.error,
            latency_ms: t.latency_ms,
            finished_at: t.finished_at.map(rfc3339),
            progress: t.progress,
        }
    }
}

pub(super) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("limit: {n} is out of range 1..={MAX_PAGE}"),
        )),
    }
}

/// A job's tasks in order, a page at a time.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/tasks", tag = "jobs",
    params(("id" = String, Path, description = "Job id"), TasksQuery),
    responses(
        (status = 200, body = TaskPage),
        (status = 400, description = "Bad query string", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn list_tasks(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    query: Result<Query<TasksQuery>, QueryRejection>,
) -> Result<Json<TaskPage>, ApiError> {
    let id = parse_job_id(&id)?;
    let Query(query) = query.map_err(query_error)?;
    let limit = page_limit(query.limit)?;
    let store = state.services.store;
    find_job(store.as_ref(), id, &owner).await?;
    let page = TaskPageQuery {
        after: query.after,
        limit,
        status: query.status,
    };
    let tasks = store.tasks_page(id, &page).await?;
    let next_after = (tasks.len() == limit as usize)
        .then(|| tasks.last().map(|t| t.index))
        .flatten();
    Ok(Json(TaskPage {
        job_id: id,
        tasks: tasks.into_iter().map(TaskView::from).collect(),
        next_after,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct JobsQuery {
    /// Only jobs with this status (`Scheduled`: pending jobs whose `not_before` is ahead;
    /// `Pending`: the others).
    status: Option<JobStatus>,
    /// Only jobs older than this one (the `next_after` of the previous page).
    after: Option<JobId>,
    /// Page size, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// Only jobs of this group (`options.group`).
    group: Option<String>,
}

/// The `metadata.KEY=VALUE` filter of a job list's query string, if any, and the rest of
/// the query string.
fn metadata_filter(query: &str) -> Result<(Option<(String, String)>, String), ApiError> {
    let mut filter = None;
    let mut rest = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.strip_prefix("metadata.") {
            Some("") => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "metadata.: name a key, as metadata.KEY=VALUE",
                ));
            }
            Some(_) if filter.is_some() => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "metadata.KEY: one metadata filter at a time",
                ));
            }
            Some(key) => filter = Some((key.to_string(), value.into_owned())),
            None => {
                rest.append_pair(&name, &value);
            }
        }
    }
    Ok((filter, rest.finish()))
}

/// Jobs, newest first, a page at a time.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(
        JobsQuery,
        ("metadata.{key}" = Option<String>, Query,
         description = "Only jobs whose `metadata` has the top-level key `{key}` with this \
                        string value (one such filter at a time)"),
    ),
    responses(
        (status = 200, body = JobPage),
        (status = 400, description = "Bad query string", body = ErrorBody),
        (status = 422, description = "limit out of range, or group not a group name", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn list_jobs(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    RawQuery(raw): RawQuery,
) -> Result<Json<JobPage>, ApiError> {
    let (metadata, rest) = metadata_filter(raw.as_deref().unwrap_or(""))?;
    let uri: axum::http::Uri = format!("/?{rest}")
        .parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("query string: {e}")))?;
    let Query(query) = Query::<JobsQuery>::try_from_uri(&uri).map_err(query_error)?;
    let limit = page_limit(query.limit)?;
    if let Some(group) = &query.group
        && !crate::job::is_group_name(group)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "group: {group:?} is not a group name (1 to 128 letters, digits and . - _ : @)"
            ),
        ));
    }
    let jobs = state
        .services
        .store
        .job_list(&JobListQuery {
            owner: owner.0,
            status: query.status,
            metadata,
            group: query.group,
            before: query.after,
            limit,
            now: crate::store::now_millis(),
        })
        .await?;
    let next_after = (jobs.len() == limit as usize)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    Ok(Json(JobPage {
        jobs: jobs
            .into_iter()
            .map(|j| JobView::new(j, None, &state.services.bus.queued))
            .collect(),
        next_after,
    }))
}

/// Cancel a job: tasks not started are cancelled, calls in flight are aborted, and the
/// callback is sent with status Cancelled. Cancelling a cancelled job changes nothing.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, now Cancelled", body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job already finished", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn cancel_job(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    find_job(state.services.store.as_ref(), id, &owner).await?;
    match commands::cancel(&state.services, id).await? {
        CancelOutcome::NotFound => Err(ApiError::no_job(id)),
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the job is already {}; only an unfinished job can be cancelled",
                status.as_str()
            ),
        )),
        CancelOutcome::Cancelled { .. } => {
            let store = state.services.store.as_ref();
            let job = find_job(store, id, &owner).await?;
            Ok(Json(job_view(&state, job).await?))
        }
    }
}

/// Delete a finished job and its results at once (retention does it later anyway).
#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not finished, or its callback is still owed", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn delete_job(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_job_id(&id)?;
    find_job(state.services.store.as_ref(), id, &owner).await?;
    match state.services.store.job_delete(id).await? {
        DeleteOutcome::Deleted => {
            tracing::info!(job_id = %id, "job deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(ApiError::no_job(id)),
        DeleteOutcome::NotFinished => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("job {id} is not finished; cancel it first, or wait"),
        )),
        DeleteOutcome::CallbackPending => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {id} is finished but its callback is still being delivered; delete it once \
                 the callback is delivered or given up"
            ),
        )),
    }
}
