//! The HTTP API: the seed's routes (`POST /v1/job`, `POST /v1/test`) and the ones that read
//! a job back.
//!
//! Handlers validate, call the engine or the store, and shape JSON; they hold no state of
//! their own. Every error leaves as `{"status":"Error","msg":...}` through [`ApiError`].

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::callback;
use crate::engine::Engine;
use crate::job::{CallbackState, JobId, JobStatus, SubmissionError, parse_submission};
use crate::store::{JobListQuery, JobRecord, Millis, StoreError, TaskRecord};

/// Most tasks or jobs one page returns.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
}

/// The API's routes over a running engine.
pub fn router(engine: Arc<Engine>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/job", post(submit))
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/tasks", get(list_tasks))
        .route("/v1/test", post(test_task))
        .route("/healthz", get(health))
        .merge(crate::dashboard::router())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(AppState { engine })
}

/// An error response: a status and a message that says what was wrong and where.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    msg: String,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            msg: msg.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"status": "Error", "msg": self.msg})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not found"),
            StoreError::Unavailable(detail) => {
                tracing::error!(error = %detail, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database is unavailable (out of space or unreachable); try again later",
                )
            }
            other => {
                // Logged once here; the client sees no internals.
                tracing::error!(error = %other, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

impl From<SubmissionError> for ApiError {
    fn from(e: SubmissionError) -> Self {
        let status = match e {
            SubmissionError::Malformed(_) => StatusCode::BAD_REQUEST,
            SubmissionError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.to_string())
    }
}

fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "request body is larger than the server accepts (--max-body-bytes)",
        )
    } else {
        ApiError::new(
            status,
            format!("cannot read request body: {}", e.body_text()),
        )
    }
}

fn is_json(headers: &HeaderMap) -> bool {
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

async fn submit(
    State(state): State<AppState>,
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
    let job = parse_submission(&body)?;
    state.engine.submit(&job).await?;
    tracing::info!(job_id = %job.id, tasks = job.tasks.len(), "job accepted");
    let status_url = format!("/v1/jobs/{}", job.id);
    Ok((
        StatusCode::ACCEPTED,
        [(LOCATION, status_url.clone())],
        Json(json!({
            "status": "Success",
            "msg": "Job Executed",
            "job_id": job.id,
            "status_url": status_url,
        })),
    )
        .into_response())
}

fn parse_job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("no job with id {text:?}")))
}

fn rfc3339(millis: Millis) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[derive(Serialize)]
struct Counts {
    pending: u64,
    running: u64,
    complete: u64,
    failed: u64,
}

#[derive(Serialize)]
struct CallbackView {
    url: Option<String>,
    state: CallbackState,
    attempts: u32,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct JobView {
    job_id: JobId,
    status: JobStatus,
    total: u64,
    counts: Counts,
    created_at: String,
    finished_at: Option<String>,
    callback: CallbackView,
    options: crate::job::JobOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Box<RawValue>>,
}

impl JobView {
    fn new(job: JobRecord, result: Option<Box<RawValue>>) -> Self {
        JobView {
            job_id: job.id,
            status: job.status,
            total: job.total,
            counts: Counts {
                pending: job.pending(),
                running: job.running,
                complete: job.complete,
                failed: job.failed,
            },
            created_at: rfc3339(job.created_at),
            finished_at: job.finished_at.map(rfc3339),
            callback: CallbackView {
                url: job.callback_url,
                state: job.callback.state,
                attempts: job.callback.attempts,
                last_error: job.callback.last_error,
            },
            options: job.options,
            result,
        }
    }
}

async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_job_id(&id)?;
    let store = state.engine.store().as_ref();
    let job = store
        .job_get(id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job with id {id}")))?;
    let result = if job.status.is_finished() {
        let mut map = Vec::new();
        callback::write_result_map(store, id, &mut map).await?;
        let text = String::from_utf8(map).map_err(|e| StoreError::Other(e.to_string()))?;
        Some(RawValue::from_string(text).map_err(|e| StoreError::Other(e.to_string()))?)
    } else {
        None
    };
    Ok(Json(JobView::new(job, result)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksQuery {
    #[serde(default)]
    after: u64,
    limit: Option<u32>,
}

#[derive(Serialize)]
struct TaskView {
    index: u64,
    status: &'static str,
    attempts: u32,
    endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Box<RawValue>>,
    latency_ms: Option<u64>,
    finished_at: Option<String>,
}

impl From<TaskRecord> for TaskView {
    fn from(t: TaskRecord) -> Self {
        TaskView {
            index: t.index,
            status: t.status.as_str(),
            attempts: t.attempts,
            endpoint: t.endpoint,
            result: t.result,
            error: t.error,
            latency_ms: t.latency_ms,
            finished_at: t.finished_at.map(rfc3339),
        }
    }
}

fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("limit: {n} is out of range 1..={MAX_PAGE}"),
        )),
    }
}

fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!("invalid query string: {}", e.body_text()),
    )
}

async fn list_tasks(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<TasksQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let id = parse_job_id(&id)?;
    let limit = page_limit(query.limit)?;
    let store = state.engine.store();
    if store.job_get(id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job with id {id}"),
        ));
    }
    let tasks = store.tasks_page(id, query.after, limit).await?;
    let next_after = (tasks.len() == limit as usize)
        .then(|| tasks.last().map(|t| t.index))
        .flatten();
    let tasks: Vec<TaskView> = tasks.into_iter().map(TaskView::from).collect();
    Ok(Json(json!({"job_id": id, "tasks": tasks, "next_after": next_after})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    status: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

async fn list_jobs(
    State(state): State<AppState>,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let status = query
        .status
        .map(|s| s.parse::<JobStatus>())
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("status: {e}")))?;
    let before = query
        .after
        .map(|s| s.parse::<JobId>())
        .transpose()
        .map_err(|_| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "after: not a job id"))?;
    let limit = page_limit(query.limit)?;
    let jobs = state
        .engine
        .store()
        .job_list(&JobListQuery {
            status,
            before,
            limit,
        })
        .await?;
    let next_after = (jobs.len() == limit as usize)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    let jobs: Vec<JobView> = jobs.into_iter().map(|j| JobView::new(j, None)).collect();
    Ok(Json(json!({"jobs": jobs, "next_after": next_after})).into_response())
}

/// The seed's test task: answers `{"result":"true","params":BODY}`.
async fn test_task(body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let params = crate::engine::call::result_json(&body);
    let answer = crate::engine::call::test_result(&params);
    Ok((
        [(CONTENT_TYPE, "application/json")],
        answer.get().to_owned(),
    )
        .into_response())
}

async fn health(State(state): State<AppState>) -> Result<Response, ApiError> {
    state.engine.store().health().await?;
    Ok(Json(json!({"status": "ok"})).into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}
