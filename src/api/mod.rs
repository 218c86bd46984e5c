//! The HTTP API: the seed's routes (`POST /v1/job`, `POST /v1/test`), the routes that read,
//! cancel and delete jobs, the events stream, `/metrics` and `/openapi.json`.
//!
//! Handlers validate, read the store or carry out a command (`commands`: commit to the
//! store, then signal on the bus), and shape JSON; they hold no state of their own, and know
//! neither the engine nor the outbox. Every error leaves as `{"status":"Error","msg":...}` through [`ApiError`]. The
//! OpenAPI document is generated from the `#[utoipa::path]` annotations on the handlers and
//! the `ToSchema` types below, so it cannot drift from the code.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, OpenApi, ToSchema};

pub mod commands;

pub use commands::Services;

use crate::auth::{ApiTokens, Owner, require_token};
use crate::bus::{Event, Queued};
use crate::document;
use crate::egress::EgressPolicy;
use crate::job::{
    CallbackState, JobId, JobOptions, JobStatus, Limits, SubmissionError, TaskStatus, compact_json,
    parse_submission,
};
use crate::store::{
    CancelOutcome, DeleteOutcome, IdempotencyKey, InsertOutcome, JobListQuery, JobRecord, Millis,
    ReportOutcome, SettleOutcome, Store, StoreError, TaskPageQuery, TaskRecord,
};

/// Most tasks or jobs one page returns.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

/// How often the events stream looks at its job.
const EVENTS_EVERY: Duration = Duration::from_millis(250);

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Clone)]
struct AppState {
    services: Services,
    config: Arc<ApiConfig>,
}

/// What the API needs to know.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Bounds on a submission.
    pub limits: Limits,
    /// Which addresses a submission's IP literals may name.
    pub egress: Arc<EgressPolicy>,
    /// A job's results are shown whole up to this size, else a link to its tasks.
    pub max_callback_bytes: usize,
    /// The largest outcome an endpoint may report.
    pub max_response_bytes: usize,
}

/// The API's routes over the node's services. With `tokens`, every route but
/// `POST /v1/test`, `/healthz` and `/openapi.json` needs one (see `crate::auth`).
pub fn router(
    services: Services,
    config: ApiConfig,
    tokens: Arc<ApiTokens>,
    max_body_bytes: usize,
) -> Router {
    let guarded = Router::new()
        .route("/v1/job", post(submit))
        .route("/v1/jobs", post(submit_alias).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/v1/jobs/{id}/tasks", get(list_tasks))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::page_router())
        .route_layer(middleware::from_fn_with_state(tokens, require_token));
    let open = Router::new()
        .route("/v1/test", post(test_task))
        // The task token in the path is the credential: the endpoint reporting an outcome
        // holds no API token.
        .route("/v1/tasks/{token}/result", post(report_task))
        .route("/healthz", get(health))
        .route("/openapi.json", get(openapi))
        // The dashboard's scripts and styles are the same for everyone and hold no data.
        .merge(crate::dashboard::assets_router());
    guarded
        .merge(open)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(AppState {
            services,
            config: Arc::new(config),
        })
}

/// The OpenAPI 3.1 document of every route.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "DoParallel",
        description = "Fan-out/fan-in job runner: calls every task's endpoint in parallel, \
                       stores each result durably, and POSTs the collected results to the \
                       job's callback.",
        license(name = "MIT", identifier = "MIT")
    ),
    paths(
        submit,
        submit_alias,
        list_jobs,
        get_job,
        delete_job,
        list_tasks,
        cancel_job,
        job_events,
        report_task,
        test_task,
        health,
        metrics,
        openapi,
        crate::dashboard::index,
        crate::dashboard::asset
    )
)]
pub struct ApiDoc;

/// An error response: a status and a message that says what was wrong and where.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    msg: String,
}

/// Every error's body.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    /// Always `Error`.
    status: String,
    /// What was wrong, and where (field, task position).
    msg: String,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            msg: msg.into(),
        }
    }

    fn no_job(id: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, format!("no job with id {id}"))
    }
}

/// Seconds a client is asked to wait before trying again after a 503: the database was
/// unreachable or full, conditions that pass, but not at once.
const RETRY_AFTER_SECS: &str = "2";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            status: "Error".into(),
            msg: self.msg,
        };
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            return (
                self.status,
                [(axum::http::header::RETRY_AFTER, RETRY_AFTER_SECS)],
                Json(body),
            )
                .into_response();
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not found"),
            full if full.is_full() => {
                tracing::error!(error = %full, "database full");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database is full (no space left on its disk, or at its size limit); \
                     nothing was stored, try again once space is freed",
                )
            }
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

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!("invalid query string: {}", e.body_text()),
    )
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

fn parse_job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::no_job(format!("{text:?}")))
}

fn rfc3339(millis: Millis) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

// ---- Submission ---------------------------------------------------------------------------

/// The body of `POST /v1/job`, as documented; `job::parse_submission` is what reads it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a schema only
struct JobRequest {
    /// Where the final document is POSTed (an absolute http(s) URL); optional.
    callback: Option<String>,
    tasks: Vec<TaskRequest>,
    options: Option<JobOptions>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a schema only
struct TaskRequest {
    /// An absolute http(s) URL, or `/v1/test` for the built-in test task.
    endpoint: String,
    /// Sent as the body of each call; `null` when absent.
    #[schema(value_type = serde_json::Value)]
    params: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
struct SubmitAnswer {
    /// Always `Success`.
    status: &'static str,
    /// Always `Job Executed` (the seed's wording).
    msg: &'static str,
    job_id: JobId,
    status_url: String,
}

impl SubmitAnswer {
    fn new(job_id: JobId) -> Self {
        SubmitAnswer {
            status: "Success",
            msg: "Job Executed",
            job_id,
            status_url: format!("/v1/jobs/{job_id}"),
        }
    }
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
async fn submit(
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
    let idempotency = idempotency_key(&headers, &body)?;
    let config = &state.config;
    let mut job = parse_submission(&body, &config.limits, &config.egress)?;
    job.owner = owner.0;
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
async fn submit_alias(
    state: State<AppState>,
    owner: Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    submit(state, owner, headers, body).await
}

/// The `Idempotency-Key` header with a digest of the body it came with.
fn idempotency_key(headers: &HeaderMap, body: &[u8]) -> Result<Option<IdempotencyKey>, ApiError> {
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
        request_hash: format!("{:x}", Sha256::digest(body)),
    }))
}

// ---- Reading jobs -------------------------------------------------------------------------

#[derive(Serialize, ToSchema, PartialEq, Eq, Clone)]
struct Counts {
    pending: u64,
    /// Calls truly in flight.
    running: u64,
    /// Claimed tasks whose call has not started: waiting at a host's limits (or a 429's
    /// pause), or about to start. Counted by the node that answers, for its own calls.
    queued: u64,
    complete: u64,
    failed: u64,
    cancelled: u64,
}

#[derive(Serialize, ToSchema)]
struct CallbackView {
    url: Option<String>,
    state: CallbackState,
    /// Delivery attempts made so far.
    attempts: u32,
    last_error: Option<String>,
}

/// One entry of a finished job's result map.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only
struct ResultEntry {
    status: TaskStatus,
    /// What the endpoint answered (Complete tasks).
    #[schema(value_type = serde_json::Value)]
    result: Option<serde_json::Value>,
    /// Why it failed (Failed tasks).
    #[schema(value_type = serde_json::Value)]
    error: Option<serde_json::Value>,
    /// Attempts made (Failed tasks).
    attempts: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct JobView {
    job_id: JobId,
    status: JobStatus,
    total: u64,
    counts: Counts,
    /// RFC 3339.
    created_at: String,
    finished_at: Option<String>,
    callback: CallbackView,
    options: JobOptions,
    /// Once finished: the callback's result map, keyed by 1-based task position.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, ResultEntry>>)]
    result: Option<Box<RawValue>>,
    /// Instead of `result` when the map would be larger than `--max-callback-bytes`: the
    /// paginated tasks route.
    #[serde(skip_serializing_if = "Option::is_none")]
    result_url: Option<String>,
}

/// The job's counts; `queued` of its running tasks wait on this node rather than run.
fn counts(job: &JobRecord, queued: u64) -> Counts {
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
    fn new(job: JobRecord, result: Option<Box<RawValue>>, queued: &Queued) -> Self {
        JobView {
            job_id: job.id,
            status: job.status,
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
            options: job.options,
            result,
            result_url: None,
        }
    }
}

/// The job, if it exists and belongs to the caller: another owner's job is not found.
async fn find_job(store: &dyn Store, id: JobId, owner: &Owner) -> Result<JobRecord, ApiError> {
    store
        .job_get(id)
        .await?
        .filter(|job| owner.0.is_none() || job.owner == owner.0)
        .ok_or_else(|| ApiError::no_job(id))
}

/// A job with its result map once finished, within `max_bytes` (else a link to its tasks,
/// as the callback does).
async fn job_view(state: &AppState, job: JobRecord) -> Result<JobView, ApiError> {
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
async fn get_job(
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
struct TasksQuery {
    /// Only tasks with a larger index (the `next_after` of the previous page).
    #[serde(default)]
    after: u64,
    /// Page size, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// Only tasks with this status.
    status: Option<TaskStatus>,
}

#[derive(Serialize, ToSchema)]
struct TaskView {
    /// 1-based position in the job.
    index: u64,
    status: TaskStatus,
    attempts: u32,
    endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = serde_json::Value)]
    result: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = serde_json::Value)]
    error: Option<Box<RawValue>>,
    /// Duration of the last attempt.
    latency_ms: Option<u64>,
    finished_at: Option<String>,
}

impl From<TaskRecord> for TaskView {
    fn from(t: TaskRecord) -> Self {
        TaskView {
            index: t.index,
            status: t.status,
            attempts: t.attempts,
            endpoint: t.endpoint,
            result: t.result.filter(|_| t.status == TaskStatus::Complete),
            error: t.error,
            latency_ms: t.latency_ms,
            finished_at: t.finished_at.map(rfc3339),
        }
    }
}

#[derive(Serialize, ToSchema)]
struct TaskPage {
    job_id: JobId,
    tasks: Vec<TaskView>,
    /// The `after` of the next page; null on the last.
    next_after: Option<u64>,
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
async fn list_tasks(
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
struct JobsQuery {
    /// Only jobs with this status.
    status: Option<JobStatus>,
    /// Only jobs older than this one (the `next_after` of the previous page).
    after: Option<JobId>,
    /// Page size, 1 to 1000 (default 100).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct JobPage {
    /// Newest first, without results.
    jobs: Vec<JobView>,
    next_after: Option<JobId>,
}

/// Jobs, newest first, a page at a time.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(JobsQuery),
    responses(
        (status = 200, body = JobPage),
        (status = 400, description = "Bad query string", body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn list_jobs(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    query: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let limit = page_limit(query.limit)?;
    let jobs = state
        .services
        .store
        .job_list(&JobListQuery {
            owner: owner.0,
            status: query.status,
            before: query.after,
            limit,
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

// ---- Changing jobs ------------------------------------------------------------------------

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
async fn cancel_job(
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
                "the job is already {}; only a Pending or Running job can be cancelled",
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
async fn delete_job(
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

// ---- Events -------------------------------------------------------------------------------

/// The data of a `progress` event.
#[derive(Serialize, ToSchema, PartialEq, Eq, Clone)]
struct Progress {
    job_id: JobId,
    status: JobStatus,
    total: u64,
    counts: Counts,
}

/// The data of a `task_failed` event.
#[derive(Serialize, ToSchema)]
struct TaskFailed {
    index: u64,
    attempts: u32,
    #[schema(value_type = serde_json::Value)]
    error: Option<Box<RawValue>>,
}

/// Where an events stream stands.
struct Watch {
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
const FAILURES_PER_LOOK: u32 = 100;

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
            status: job.status,
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

/// One event of the stream as the wire carries it; `data` is the event's JSON document.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only
struct SseFrame {
    /// `progress`, `task_failed` or `finished`.
    event: String,
    /// Failures sent so far: the `Last-Event-ID` to resume from.
    id: String,
    /// A `Progress`, `TaskFailed` or `JobView` document.
    data: String,
}

fn sse(name: &str, id: u64, data: &impl Serialize) -> SseEvent {
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
async fn job_events(
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

// ---- Service routes -----------------------------------------------------------------------

/// The outcome of a task whose endpoint answered 202, posted later with its task token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TaskReportBody<'a> {
    /// A reported failure is final (no retry).
    status: ReportedStatus,
    /// The task's result (any JSON, kept exactly as sent); with `Complete`.
    #[serde(borrow, default)]
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<&'a RawValue>,
    /// Why it failed (any JSON); with `Failed`.
    #[serde(borrow, default)]
    #[schema(value_type = Option<serde_json::Value>)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize, ToSchema)]
enum ReportedStatus {
    Complete,
    Failed,
}

#[derive(Serialize, ToSchema)]
struct ReportAnswer {
    /// `Stored`.
    status: &'static str,
}

/// Report the outcome of a task whose endpoint answered `202 Accepted`. The token comes
/// with the call (`DoParallel-Task-Token`, and the whole URL in `DoParallel-Result-Url`);
/// it is good for that attempt only, and for one report.
#[utoipa::path(
    post, path = "/v1/tasks/{token}/result", tag = "tasks",
    params(("token" = String, Path, description = "The call's DoParallel-Task-Token")),
    request_body(content = TaskReportBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored", body = ReportAnswer),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 404, description = "No attempt waits for this token (unknown, timed out, superseded, or the job was cancelled)", body = ErrorBody),
        (status = 409, description = "This attempt's outcome was already reported", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn report_task(
    State(state): State<AppState>,
    Path(token): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReportAnswer>, ApiError> {
    let body = body.map_err(body_error)?;
    let report: TaskReportBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("body is not a task report ({{\"status\":\"Complete\",\"result\":...}} or {{\"status\":\"Failed\",\"error\":...}}): {e}"),
        )
    })?;
    let outcome = match report.status {
        ReportedStatus::Complete => SettleOutcome::Complete {
            result: compact_json(report.result.unwrap_or(null_json())),
        },
        ReportedStatus::Failed => SettleOutcome::Failed {
            error: compact_json(report.error.unwrap_or(null_json())),
        },
    };
    // A reported outcome is stored within the bound of a call's answer.
    let max = state.config.max_response_bytes;
    let stored = match &outcome {
        SettleOutcome::Complete { result } => result.get().len(),
        SettleOutcome::Failed { error } => error.get().len(),
        _ => 0,
    };
    if stored > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the reported result or error takes {stored} bytes; at most {max} are stored \
                 (--max-response-bytes)"
            ),
        ));
    }
    match commands::report(&state.services, &token, outcome).await? {
        ReportOutcome::Applied(_) => Ok(Json(ReportAnswer { status: "Stored" })),
        ReportOutcome::AlreadyReported => Err(ApiError::new(
            StatusCode::CONFLICT,
            "this attempt's outcome was already reported",
        )),
        ReportOutcome::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no attempt waits for this token: it is unknown, its attempt timed out or was \
             superseded, or its job was cancelled",
        )),
    }
}

fn null_json() -> &'static RawValue {
    serde_json::from_str("null").expect("null is JSON")
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // a schema only
struct TestAnswer {
    /// Always `"true"`, as the seed answered.
    result: String,
    /// The request body.
    #[schema(value_type = serde_json::Value)]
    params: serde_json::Value,
}

/// The seed's test task: answers `{"result":"true","params":BODY}`.
#[utoipa::path(
    post, path = "/v1/test", tag = "service",
    request_body(content = Object, content_type = "application/json", description = "Any JSON"),
    responses(
        (status = 200, body = TestAnswer),
        (status = 413, description = "Body too large", body = ErrorBody),
    )
)]
async fn test_task(body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let params = crate::job::result_json(&body);
    let answer = crate::job::test_result(&params);
    Ok((
        [(CONTENT_TYPE, "application/json")],
        answer.get().to_owned(),
    )
        .into_response())
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`.
    status: &'static str,
}

/// Answers 200 when the database does.
#[utoipa::path(
    get, path = "/healthz", tag = "service",
    responses(
        (status = 200, body = Health),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    // A probe must answer promptly: a database that does not answer within this is as good
    // as down, whatever it is waiting on (a connection being re-established, a stall).
    match tokio::time::timeout(HEALTH_TIMEOUT, state.services.store.health()).await {
        Ok(answer) => answer?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the database did not answer within {} ms",
                    HEALTH_TIMEOUT.as_millis()
                ),
            ));
        }
    }
    Ok(Json(Health { status: "ok" }))
}

/// The longest `/healthz` waits for the database.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(
    get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "Metrics", content_type = "application/openmetrics-text", body = String),
    )
)]
async fn metrics(State(state): State<AppState>) -> Response {
    let services = &state.services;
    // Queue depth is read when asked, not kept up to date on every change.
    match services.store.queue_depth().await {
        Ok(depth) => {
            services.metrics.queue_depth.set(depth as i64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read queue depth for metrics"),
    }
    ([(CONTENT_TYPE, OPENMETRICS)], services.metrics.encode()).into_response()
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_covers_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/v1/job", "post"),
            ("/v1/jobs", "post"),
            ("/v1/jobs", "get"),
            ("/v1/jobs/{id}", "get"),
            ("/v1/jobs/{id}", "delete"),
            ("/v1/jobs/{id}/tasks", "get"),
            ("/v1/jobs/{id}/cancel", "post"),
            ("/v1/jobs/{id}/events", "get"),
            ("/v1/test", "post"),
            ("/healthz", "get"),
            ("/metrics", "get"),
            ("/openapi.json", "get"),
            ("/", "get"),
            ("/assets/{name}", "get"),
        ] {
            assert!(
                paths[path][method].is_object(),
                "{method} {path} is missing"
            );
        }
    }

    #[test]
    fn the_document_gives_the_per_host_options_and_their_bounds() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let options = &doc["components"]["schemas"]["JobOptions"]["properties"];
        let concurrency = &options["per_host_concurrency"];
        assert_eq!(concurrency["minimum"], 1, "{concurrency}");
        let rate = &options["per_host_rate"];
        assert_eq!(rate["minimum"], 0.001, "{rate}");
        assert!(
            rate["description"]
                .as_str()
                .is_some_and(|d| d.contains("per second")),
            "{rate}"
        );
    }
}
