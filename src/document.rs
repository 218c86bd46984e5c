//! A job's final document: `{"job_id","status","msg":"Job Finished","result":{...}}`, what
//! the callback receives, `GET /v1/jobs/{id}` shows and `doparallel run` prints. A read
//! model over the store: built in memory within a size bound, or streamed a page of tasks
//! at a time (a first pass computes its length and signature and keeps nothing).

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::job::{JobId, TaskStatus};
use crate::store::{JobRecord, Store, StoreError, StoreResult, TaskPageQuery, TaskRecord};
/// Tasks read from the store per page while a document is built.
const PAGE: u32 = 1000;

/// One entry of the result map, keyed by the task's 1-based position.
#[derive(Serialize)]
struct Entry<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
}

/// Appends one task's `"N":{...}` entry, with the comma before it unless it is the first.
fn write_entry(task: &TaskRecord, out: &mut Vec<u8>) {
    if task.index > 1 {
        out.push(b',');
    }
    let entry = Entry {
        status: task.status.as_str(),
        result: task
            .result
            .as_deref()
            .filter(|_| task.status == TaskStatus::Complete),
        error: task
            .error
            .as_deref()
            .filter(|_| task.status == TaskStatus::Failed),
        attempts: (task.status == TaskStatus::Failed).then_some(task.attempts),
    };
    out.push(b'"');
    out.extend_from_slice(task.index.to_string().as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *out, &entry).expect("writing to a Vec cannot fail");
}

/// A job's tasks, a page at a time, in order.
struct TaskPages<'a> {
    store: &'a dyn Store,
    job: JobId,
    after: u64,
    done: bool,
}

impl<'a> TaskPages<'a> {
    fn new(store: &'a dyn Store, job: JobId) -> Self {
        TaskPages {
            store,
            job,
            after: 0,
            done: false,
        }
    }

    async fn next(&mut self) -> StoreResult<Option<Vec<TaskRecord>>> {
        if self.done {
            return Ok(None);
        }
        let query = TaskPageQuery {
            after: self.after,
            limit: PAGE,
            status: None,
        };
        let page = self.store.tasks_page(self.job, &query).await?;
        match page.last() {
            Some(last) if page.len() == PAGE as usize => self.after = last.index,
            _ => self.done = true,
        }
        Ok(Some(page))
    }
}

/// Appends the result map of a job, `{"1":{...},"2":{...}}`, reading its tasks page by page.
/// Stops and returns `false` as soon as `out` grows past `max_bytes`.
pub async fn write_result_map(
    store: &dyn Store,
    job: JobId,
    out: &mut Vec<u8>,
    max_bytes: usize,
) -> StoreResult<bool> {
    out.push(b'{');
    let mut pages = TaskPages::new(store, job);
    while let Some(page) = pages.next().await? {
        for task in &page {
            write_entry(task, out);
            // After each entry, not each page: a page of large results could be huge.
            if out.len() > max_bytes {
                return Ok(false);
            }
        }
    }
    out.push(b'}');
    Ok(out.len() <= max_bytes)
}

#[derive(Serialize)]
struct Head<'a> {
    job_id: JobId,
    status: &'a str,
    msg: &'a str,
    /// The client's own, as submitted: receivers correlate without keeping state.
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_url: Option<String>,
}

/// The document's beginning, up to and including `"result":`.
fn head_with_result(job: &JobRecord) -> Vec<u8> {
    let head = Head {
        job_id: job.id,
        status: job.status.as_str(),
        msg: "Job Finished",
        metadata: job.metadata.as_deref(),
        result_url: None,
    };
    let mut out = serde_json::to_vec(&head).expect("the head serializes");
    out.pop(); // the closing brace: the result map follows
    out.extend_from_slice(b",\"result\":");
    out
}

/// The document without results, pointing at the paginated tasks route instead.
pub(crate) fn head_only(job: &JobRecord) -> Vec<u8> {
    let head = Head {
        job_id: job.id,
        status: job.status.as_str(),
        msg: "Job Finished",
        metadata: job.metadata.as_deref(),
        result_url: Some(format!("/v1/jobs/{}/tasks", job.id)),
    };
    serde_json::to_vec(&head).expect("the head serializes")
}

/// The whole document of a finished job, in memory:
/// `{"job_id":ID,"status":S,"msg":"Job Finished","result":{...}}` (what `doparallel run`
/// prints; a delivery streams it instead, see `callback_body`).
pub async fn document(store: &dyn Store, job: &JobRecord) -> StoreResult<Vec<u8>> {
    let mut out = Vec::new();
    feed_document(store, job, |bytes| out.extend_from_slice(bytes)).await?;
    Ok(out)
}

/// Feeds the whole document, a page of tasks at a time, to `sink`; never holds more than a
/// page. Returns the number of bytes fed.
pub(crate) async fn feed_document(
    store: &dyn Store,
    job: &JobRecord,
    mut sink: impl FnMut(&[u8]),
) -> StoreResult<u64> {
    let mut total = 0u64;
    let mut feed = |bytes: &[u8]| {
        total += bytes.len() as u64;
        sink(bytes);
    };
    feed(&head_with_result(job));
    feed(b"{");
    let mut pages = TaskPages::new(store, job.id);
    let mut chunk = Vec::new();
    let mut entries = 0u64;
    while let Some(page) = pages.next().await? {
        chunk.clear();
        for task in &page {
            write_entry(task, &mut chunk);
        }
        entries += page.len() as u64;
        feed(&chunk);
    }
    feed(b"}}");
    // A finished job's tasks never change; fewer than its total means it was removed
    // meanwhile, and an incomplete document must not go out as if it were whole.
    if entries != job.total {
        return Err(StoreError::Other(format!(
            "job {} has {entries} of its {} tasks left; it was removed while its callback was built",
            job.id, job.total
        )));
    }
    Ok(total)
}

/// The document as a stream of chunks, a page of tasks each, for a request body.
pub(crate) fn document_stream(
    store: Arc<dyn Store>,
    job: JobRecord,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, StoreError>> + Send + 'static {
    enum Part {
        Head,
        Pages(u64),
        Tail,
        Done,
    }
    futures_util::stream::try_unfold(Part::Head, move |part| {
        let store = store.clone();
        let job = job.clone();
        async move {
            Ok::<_, StoreError>(match part {
                Part::Head => {
                    let mut head = head_with_result(&job);
                    head.push(b'{');
                    Some((head, Part::Pages(0)))
                }
                Part::Pages(after) => {
                    if after > 0 {
                        // A pause for the test that stops the database mid-stream.
                        crate::pause_point("callback-next-page").await;
                    }
                    let query = TaskPageQuery {
                        after,
                        limit: PAGE,
                        status: None,
                    };
                    let page = store.tasks_page(job.id, &query).await?;
                    let mut chunk = Vec::new();
                    for task in &page {
                        write_entry(task, &mut chunk);
                    }
                    let next = match page.last() {
                        Some(last) if page.len() == PAGE as usize => Part::Pages(last.index),
                        _ => Part::Tail,
                    };
                    Some((chunk, next))
                }
                Part::Tail => Some((b"}}".to_vec(), Part::Done)),
                Part::Done => None,
            })
        }
    })
}
