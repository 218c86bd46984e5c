//! The service routes: task reports, the seed's test task, health, metrics and the
//! OpenAPI document.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, body_error};
use super::wire::*;
use super::{ApiDoc, AppState, commands};
use crate::job::compact_json;
use crate::store::{HeartbeatOutcome, ReportOutcome, SettleOutcome};

/// The outcome of a task whose endpoint answered 202, posted later with its task token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TaskReportBody<'a> {
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
pub(super) enum ReportedStatus {
    Complete,
    Failed,
}

/// A heartbeat's body: all optional.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HeartbeatBody<'a> {
    /// How far the task got (any JSON, at most 4 KiB), kept as the task's `progress`.
    #[serde(borrow, default)]
    #[schema(value_type = Option<serde_json::Value>)]
    progress: Option<&'a RawValue>,
}

/// The most bytes of JSON a heartbeat's `progress` may take.
pub const MAX_PROGRESS_BYTES: usize = 4096;

/// Say that a task whose endpoint answered `202 Accepted` is still being worked on, with its
/// progress if you like. With the job's `options.async_heartbeat_ms`, an attempt that sends
/// neither a heartbeat nor its outcome for that long times out (and is retried like any
/// timeout); every heartbeat moves that on, within `async_timeout_ms` of the 202. The token
/// is the call's `DoParallel-Task-Token`, as for the result.
#[utoipa::path(
    post, path = "/v1/tasks/{token}/heartbeat", tag = "tasks",
    params(("token" = String, Path, description = "The call's DoParallel-Task-Token")),
    request_body(content = Option<HeartbeatBody>, content_type = "application/json"),
    responses(
        (status = 202, description = "Recorded", body = ReportAnswer),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 404, description = "No such attempt runs (unknown token, or its attempt timed out or was superseded)", body = ErrorBody),
        (status = 409, description = "This attempt's task has its outcome already", body = ErrorBody),
        (status = 413, description = "Progress larger than 4 KiB", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn heartbeat_task(
    State(state): State<AppState>,
    Path(token): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ReportAnswer>), ApiError> {
    let body = body.map_err(body_error)?;
    let progress = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let beat: HeartbeatBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("body is not a heartbeat (empty, or {{\"progress\": ...}}): {e}"),
            )
        })?;
        beat.progress.map(compact_json)
    };
    if let Some(progress) = &progress
        && progress.get().len() > MAX_PROGRESS_BYTES
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "progress: takes {} bytes of JSON; at most {MAX_PROGRESS_BYTES} are kept",
                progress.get().len()
            ),
        ));
    }
    match commands::heartbeat(&state.services, &token, progress).await? {
        HeartbeatOutcome::Alive => Ok((
            StatusCode::ACCEPTED,
            Json(ReportAnswer {
                status: "Recorded".into(),
            }),
        )),
        HeartbeatOutcome::Finished => Err(ApiError::new(
            StatusCode::CONFLICT,
            "this attempt's task has its outcome already; stop working on it",
        )),
        HeartbeatOutcome::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no attempt runs for this token: it is unknown, or its attempt timed out or was \
             superseded (a newer attempt has its own token)",
        )),
    }
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
pub(super) async fn report_task(
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
        ReportOutcome::Applied(_) => Ok(Json(ReportAnswer {
            status: "Stored".into(),
        })),
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

pub(super) fn null_json() -> &'static RawValue {
    serde_json::from_str("null").expect("null is JSON")
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
pub(super) async fn test_task(body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let params = crate::job::result_json(&body);
    let answer = crate::job::test_result(&params);
    Ok((
        [(CONTENT_TYPE, "application/json")],
        answer.get().to_owned(),
    )
        .into_response())
}

/// The hosts this node calls, as its per-host gates see them: each one's limit on calls in
/// flight (an adaptive one's value now), calls under way and waiting, and its breaker. A
/// node's own view: on several nodes, ask each; an API-only node calls nothing.
#[utoipa::path(
    get, path = "/v1/hosts", tag = "service",
    responses((status = 200, body = HostPage))
)]
pub(super) async fn hosts(State(state): State<AppState>) -> Json<HostPage> {
    let hosts = state
        .services
        .bus
        .hosts()
        .into_iter()
        .map(|h| HostView {
            host: h.host,
            limit: h.limit,
            adaptive: h.adaptive,
            in_flight: h.in_flight,
            waiting: h.waiting,
            breaker: if h.breaker_open { "open" } else { "closed" }.into(),
            failures: h.failures,
        })
        .collect();
    Json(HostPage { hosts })
}

/// Answers 200 when the database does.
#[utoipa::path(
    get, path = "/healthz", tag = "service",
    responses(
        (status = 200, body = Health),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
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
    Ok(Json(Health {
        status: "ok".into(),
    }))
}

/// The longest `/healthz` waits for the database.
pub(super) const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

pub(super) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(
    get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "Metrics", content_type = "application/openmetrics-text", body = String),
    )
)]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
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
pub(super) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}
