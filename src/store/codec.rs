//! How the backends write the domain's values, where they write them alike: status codes
//! for the SQL backends, and the JSON text, options and ids every backend keeps as text.

use serde_json::value::RawValue;

use super::{StoreError, StoreResult};
use crate::job::{JobId, JobOptions, JobStatus, TaskStatus};

/// A job status as the SQL backends store it (SQLite as INTEGER, PostgreSQL as SMALLINT).
pub(super) fn job_status_code(s: JobStatus) -> i64 {
    match s {
        JobStatus::Pending => 0,
        JobStatus::Running => 1,
        JobStatus::Complete => 2,
        JobStatus::Failed => 3,
        JobStatus::Cancelled => 4,
    }
}

pub(super) fn job_status_from(code: i64) -> StoreResult<JobStatus> {
    Ok(match code {
        0 => JobStatus::Pending,
        1 => JobStatus::Running,
        2 => JobStatus::Complete,
        3 => JobStatus::Failed,
        4 => JobStatus::Cancelled,
        other => {
            return Err(StoreError::Other(format!(
                "unknown job status code {other}"
            )));
        }
    })
}

/// A task status as the SQL backends store it.
pub(super) fn task_status_code(s: TaskStatus) -> i64 {
    match s {
        TaskStatus::Pending => 0,
        TaskStatus::Running => 1,
        TaskStatus::Complete => 2,
        TaskStatus::Failed => 3,
        TaskStatus::Cancelled => 4,
    }
}

pub(super) fn task_status_from(code: i64) -> StoreResult<TaskStatus> {
    Ok(match code {
        0 => TaskStatus::Pending,
        1 => TaskStatus::Running,
        2 => TaskStatus::Complete,
        3 => TaskStatus::Failed,
        4 => TaskStatus::Cancelled,
        other => {
            return Err(StoreError::Other(format!(
                "unknown task status code {other}"
            )));
        }
    })
}

/// Stored JSON text (params, a result, an error) back as JSON, exactly as it was written.
pub(super) fn raw(text: Option<String>) -> StoreResult<Option<Box<RawValue>>> {
    text.map(|t| {
        RawValue::from_string(t)
            .map_err(|e| StoreError::Other(format!("stored JSON is invalid: {e}")))
    })
    .transpose()
}

pub(super) fn parse_options(text: &str) -> StoreResult<JobOptions> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Other(format!("stored options are invalid: {e}")))
}

pub(super) fn parse_id(text: &str) -> StoreResult<JobId> {
    text.parse()
        .map_err(|e| StoreError::Other(format!("stored job id {text:?} is invalid: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for s in [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Complete,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            assert_eq!(job_status_from(job_status_code(s)).unwrap(), s);
        }
        for s in [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Complete,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ] {
            assert_eq!(task_status_from(task_status_code(s)).unwrap(), s);
        }
        assert!(job_status_from(9).is_err());
        assert!(task_status_from(-1).is_err());
    }
}
