//! The items of the table as the module docs draw them: their keys, the names statuses
//! are stored under, the index attributes a job gets as it finishes, and how a job or task
//! item reads as a record. The other parts build every key here, so that the layout is
//! spelled once.

use std::collections::HashMap;

use serde_json::value::RawValue;

use super::expr::{Change, Item, get_n, get_s, n, need_n, need_s, s};
use crate::job::{CallbackState, JobId, JobStatus, TaskStatus};
use crate::store::codec::{self, parse_call, parse_id, parse_options};
use crate::store::{CallbackInfo, JobRecord, Millis, NodeId, StoreError, StoreResult, TaskRecord};

/// Shards of gsi1's `ACTIVE#` and `DONE#` partitions, so that no one index partition takes
/// every job's writes.
pub(super) const SHARDS: u8 = 4;

/// Task and job statuses as stored: their names.
pub(super) fn job_status_from(text: &str) -> StoreResult<JobStatus> {
    Ok(match text {
        "Pending" => JobStatus::Pending,
        "Running" => JobStatus::Running,
        "Paused" => JobStatus::Paused,
        "Complete" => JobStatus::Complete,
        "Failed" => JobStatus::Failed,
        "Cancelled" => JobStatus::Cancelled,
        other => return Err(StoreError::Other(format!("unknown job status {other:?}"))),
    })
}

fn task_status_from(text: &str) -> StoreResult<TaskStatus> {
    Ok(match text {
        "Pending" => TaskStatus::Pending,
        "Running" => TaskStatus::Running,
        "Complete" => TaskStatus::Complete,
        "Failed" => TaskStatus::Failed,
        "Cancelled" => TaskStatus::Cancelled,
        other => return Err(StoreError::Other(format!("unknown task status {other:?}"))),
    })
}

/// A job whose outcomes are written, which a cancel or a lease sweep may touch.
pub(super) const UNFINISHED: [&str; 3] = ["Pending", "Running", "Paused"];
/// A job whose tasks a claim may take.
pub(super) const CLAIMABLE: [&str; 2] = ["Pending", "Running"];
pub(super) const FINISHED: [&str; 3] = ["Complete", "Failed", "Cancelled"];

pub(super) const CB_PENDING: &str = "pending";
pub(super) const CB_DELIVERED: &str = "delivered";
pub(super) const CB_FAILED: &str = "failed";

pub(super) fn job_pk(id: JobId) -> String {
    format!("JOB#{id}")
}

pub(super) fn task_sk(index: u64) -> String {
    format!("T#{index:010}")
}

pub(super) fn job_key(id: JobId) -> Item {
    HashMap::from([("pk".into(), s(job_pk(id))), ("sk".into(), s("META"))])
}

pub(super) fn task_key(id: JobId, index: u64) -> Item {
    HashMap::from([
        ("pk".into(), s(job_pk(id))),
        ("sk".into(), s(task_sk(index))),
    ])
}

pub(super) fn idem_key(owner: Option<&str>, key: &str) -> Item {
    HashMap::from([
        (
            "pk".into(),
            s(format!("IDEM#{}#{key}", owner.unwrap_or("-"))),
        ),
        ("sk".into(), s("IDEM")),
    ])
}

pub(super) fn node_key(node: NodeId) -> Item {
    HashMap::from([
        ("pk".into(), s("NODES")),
        ("sk".into(), s(node.to_string())),
    ])
}

/// A time as it sorts in an index key.
pub(super) fn pad_time(t: Millis) -> String {
    format!("{:013}", t.max(0))
}

pub(super) fn shard(id: JobId) -> u8 {
    // The last byte of a UUIDv7 is random; the first ones are the time.
    let text = id.to_string();
    u8::from_str_radix(&text[text.len() - 2..], 16).unwrap_or(0) % SHARDS
}

pub(super) fn queue_pk(id: JobId) -> String {
    format!("Q#{id}")
}

pub(super) fn queue_sk(run_at: Millis, index: u64) -> String {
    format!("{}#{index:010}", pad_time(run_at))
}

/// The job id in a `JOB#<id>` key.
pub(super) fn id_of_pk(pk: &str) -> StoreResult<JobId> {
    parse_id(pk.strip_prefix("JOB#").unwrap_or(pk))
}

/// The task index in a `T#<index>` key.
pub(super) fn index_of_sk(sk: &str) -> StoreResult<u64> {
    sk.strip_prefix("T#")
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| StoreError::Other(format!("stored task key {sk:?} is invalid")))
}

pub(super) fn raw(text: &str) -> StoreResult<Box<RawValue>> {
    Ok(codec::raw(Some(text.to_string()))?.expect("some text"))
}

/// A job item as a record.
pub(super) fn job_from_item(item: &Item) -> StoreResult<JobRecord> {
    let callback_url = get_s(item, "callback_url").map(str::to_string);
    let state = match (callback_url.is_some(), get_s(item, "cb_state")) {
        (false, _) => CallbackState::None,
        (true, None | Some(CB_PENDING)) => CallbackState::Pending,
        (true, Some(CB_DELIVERED)) => CallbackState::Delivered,
        (true, Some(_)) => CallbackState::Failed,
    };
    let status = job_status_from(need_s(item, "status")?)?;
    Ok(JobRecord {
        id: parse_id(need_s(item, "id")?)?,
        owner: get_s(item, "owner").map(str::to_string),
        status,
        options: parse_options(need_s(item, "options")?)?,
        total: need_n(item, "total")?,
        running: need_n(item, "n_running")?,
        complete: need_n(item, "n_complete")?,
        failed: need_n(item, "n_failed")?,
        cancelled: need_n(item, "n_cancelled")?,
        created_at: need_n(item, "created_at")?,
        finished_at: get_n(item, "finished_at"),
        callback_url,
        callback: CallbackInfo {
            state,
            attempts: get_n(item, "cb_attempts").unwrap_or(0),
            last_error: get_s(item, "cb_error").map(str::to_string),
        },
        metadata: get_s(item, "metadata").map(raw).transpose()?,
    })
}

/// A task item as a record; a task left pending or running by a cancelled job reads as
/// Cancelled (see the module docs), and one left by a job ended at its deadline reads as
/// Failed with the deadline's error (`expired`, the job item's `expired_error`; such a job's
/// stopped calls are marked Cancelled, and read Failed too).
pub(super) fn task_from_item(
    item: &Item,
    job: &JobRecord,
    expired: Option<&str>,
) -> StoreResult<TaskRecord> {
    let mut status = task_status_from(need_s(item, "status")?)?;
    let mut finished_at = get_n(item, "finished_at");
    let mut error = get_s(item, "error").map(raw).transpose()?;
    match expired {
        Some(expired)
            if job.status.is_finished()
                && matches!(
                    status,
                    TaskStatus::Pending | TaskStatus::Running | TaskStatus::Cancelled
                ) =>
        {
            status = TaskStatus::Failed;
            finished_at = job.finished_at;
            error = Some(raw(expired)?);
        }
        // (A job ended early, Complete or Failed, left its unfinished tasks so too.)
        _ if job.status.is_finished()
            && matches!(status, TaskStatus::Pending | TaskStatus::Running) =>
        {
            status = TaskStatus::Cancelled;
            finished_at = job.finished_at;
        }
        _ => {}
    }
    Ok(TaskRecord {
        index: need_n(item, "idx")?,
        status,
        attempts: need_n(item, "attempts")?,
        endpoint: need_s(item, "endpoint")?.to_string(),
        call: parse_call(get_s(item, "call"))?,
        result: get_s(item, "result").map(raw).transpose()?,
        error,
        latency_ms: get_n(item, "latency_ms"),
        finished_at,
        progress: get_s(item, "progress").map(raw).transpose()?,
    })
}

/// The index attributes of a job that has just finished: its callback becomes due, or,
/// without one, it goes where retention finds it.
pub(super) fn finish_job(change: Change, id: JobId, has_callback: bool, now: Millis) -> Change {
    // Out of the deadline sweep's partition too.
    let change = change
        .set("finished_at", n(now))
        .remove("g3pk")
        .remove("g3sk");
    if has_callback {
        // Out of the active jobs; into retention's index once the callback is settled.
        change
            .remove("g1pk")
            .remove("g1sk")
            .set("cb_state", s(CB_PENDING))
            .set("cb_attempts", n(0))
            .set("cb_next", n(now))
            .set("g2pk", s("CB"))
            .set("g2sk", s(format!("{}#{id}", pad_time(now))))
    } else {
        retire(change, id, now)
    }
}

/// An unfinished job's deadline (`plan::deadline`): in gsi3 `DEADLINE#<shard>`, by time, where the
/// deadline sweep (`Store::jobs_deadline`) reads it; out of it without one. (A job item is
/// in gsi3 for nothing else; it leaves when the job finishes, `finish_job`.)
pub(super) fn with_deadline(change: Change, id: JobId, deadline: Option<Millis>) -> Change {
    match deadline {
        Some(at) => change
            .set("deadline_at", n(at))
            .set("g3pk", s(deadline_pk(id)))
            .set("g3sk", s(format!("{}#{id}", pad_time(at)))),
        None => change.remove("deadline_at").remove("g3pk").remove("g3sk"),
    }
}

/// The gsi3 partition of an unfinished job with a deadline: one of [`SHARDS`], as gsi1's
/// `ACTIVE#`, so that no single key takes every such job's writes.
pub(super) fn deadline_pk(id: JobId) -> String {
    format!("DEADLINE#{}", shard(id))
}

/// Puts a finished job whose callback is no longer owed in gsi1 `DONE#`, by finish time.
pub(super) fn retire(change: Change, id: JobId, finished_at: Millis) -> Change {
    change
        .set("g1pk", s(format!("DONE#{}", shard(id))))
        .set("g1sk", s(format!("{}#{id}", pad_time(finished_at))))
}
