//! The API's errors: every one leaves as `{"status":"Error","msg":...}` with a status that
//! says whose fault it is, and a message that says what was wrong and where.

use axum::Json;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::wire::ErrorBody;
use crate::job::SubmissionError;
use crate::store::StoreError;

/// An error response: a status and a message that says what was wrong and where.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    msg: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            msg: msg.into(),
        }
    }

    pub(super) fn no_job(id: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, format!("no job with id {id}"))
    }
}

/// Seconds a client is asked to wait before trying again after a 503: the database was
/// unreachable or full, conditions that pass, but not at once.
pub(super) const RETRY_AFTER_SECS: &str = "2";

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
            StoreError::Refused(why) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why),
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

pub(super) fn body_error(e: BytesRejection) -> ApiError {
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

pub(super) fn query_error(e: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!("invalid query string: {}", e.body_text()),
    )
}
