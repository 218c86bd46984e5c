//! Group commit: small writes that arrive together share one transaction, and so one
//! fsync. SQLite has one writer, and with `synchronous=FULL` a commit costs a sync of the
//! WAL; submitted small jobs and recorded callback attempts, each a transaction of its own,
//! made a workload of many small jobs wait on the disk rather than work. Here they queue
//! for one task, which takes whatever has queued (up to a bound), writes it all in one
//! `WriteTx`, commits, and then answers each caller. A caller is answered `Ok` only after
//! the COMMIT that holds its write succeeded, as before.
//!
//! A statement that fails fails the whole group: every caller gets the error and nothing of
//! the group is stored. The errors that reach here are the database's (a full disk, a
//! broken connection); near a full disk a group can fail where its smallest writes alone
//! would have fitted, and then a callback already delivered is sent again once its lease
//! runs out (with the same `webhook-id`): a duplicate, never a loss. Retrying each write
//! alone after a failed group was not done: a COMMIT whose answer was lost would make the
//! retry of a job fail on its own id. A job too large to be worth copying into the queue is
//! stored in a transaction of its own by the caller.
//!
//! A write, once queued, is carried out even if its caller stops waiting (a client that
//! disconnects): a job stored that way starts at the engine's next idle look (within a
//! second), since nobody signalled it, and its client never learned its id, as when the
//! answer to a stored job is lost on its way back.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::writer::{WriteTx, Writer};
use super::{callbacks, jobs};
use crate::job::NewJob;
use crate::store::rows::NewJobRow;
use crate::store::{
    CallbackRecord, IdempotencyKey, InsertOutcome, Millis, StoreError, StoreResult,
};

/// Most writes in one group.
const MAX_WRITES: usize = 256;

/// Most tasks of the jobs in one group.
const MAX_TASKS: usize = 20_000;

/// The largest job that joins a group; a larger one amortizes its own commit.
pub(super) const MAX_JOB_TASKS: usize = 1_000;

/// One write waiting for its group.
enum Write {
    Insert {
        job: Box<NewJob>,
        row: Box<NewJobRow>,
        idempotency: Option<IdempotencyKey>,
        now: Millis,
        answer: oneshot::Sender<StoreResult<InsertOutcome>>,
    },
    Record {
        record: CallbackRecord,
        answer: oneshot::Sender<StoreResult<bool>>,
    },
}

impl Write {
    fn tasks(&self) -> usize {
        match self {
            Write::Insert { job, .. } => job.tasks.len(),
            Write::Record { .. } => 0,
        }
    }
}

/// The queue of the group commit; the task that serves it ends when this is dropped.
pub(super) struct Group {
    queue: mpsc::UnboundedSender<Write>,
}

impl Group {
    pub(super) fn start(writer: Writer) -> Self {
        let (queue, writes) = mpsc::unbounded_channel();
        tokio::spawn(serve(writer, writes));
        Group { queue }
    }

    pub(super) async fn insert(
        &self,
        job: &NewJob,
        idempotency: Option<&IdempotencyKey>,
        now: Millis,
    ) -> StoreResult<InsertOutcome> {
        let row = NewJobRow::of(job, now)?;
        let (answer, answered) = oneshot::channel();
        self.send(Write::Insert {
            job: Box::new(job.clone()),
            row: Box::new(row),
            idempotency: idempotency.cloned(),
            now,
            answer,
        })?;
        answered.await.unwrap_or_else(|_| Err(gone()))
    }

    pub(super) async fn record(&self, record: &CallbackRecord) -> StoreResult<bool> {
        let (answer, answered) = oneshot::channel();
        self.send(Write::Record {
            record: record.clone(),
            answer,
        })?;
        answered.await.unwrap_or_else(|_| Err(gone()))
    }

    fn send(&self, write: Write) -> StoreResult<()> {
        self.queue.send(write).map_err(|_| gone())
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable("the database writer has stopped".into())
}

async fn serve(writer: Writer, mut writes: mpsc::UnboundedReceiver<Write>) {
    let mut group = Vec::new();
    while let Some(first) = writes.recv().await {
        let mut tasks = first.tasks();
        group.push(first);
        while group.len() < MAX_WRITES && tasks < MAX_TASKS {
            match writes.try_recv() {
                Ok(write) => {
                    tasks += write.tasks();
                    group.push(write);
                }
                Err(_) => break,
            }
        }
        commit(&writer, &mut group).await;
    }
}

/// Writes and commits one group, then answers each of its callers.
async fn commit(writer: &Writer, group: &mut Vec<Write>) {
    // A panic while writing (a bug) fails this group's callers, and the queue is served on:
    // otherwise every later submission would fail while the server looked healthy. The
    // transaction is rolled back as it is dropped.
    let result: StoreResult<Vec<Done>> = AssertUnwindSafe(async {
        let mut tx = writer.begin().await?;
        let done = apply(&mut tx, group).await?;
        tx.commit().await?;
        Ok(done)
    })
    .catch_unwind()
    .await
    .unwrap_or_else(|_| {
        tracing::error!("writing a group of submissions and callback records panicked");
        Err(StoreError::Other(
            "writing to the database failed unexpectedly".into(),
        ))
    });
    for (i, write) in group.drain(..).enumerate() {
        match write {
            Write::Insert { answer, .. } => {
                let _ = answer.send(match &result {
                    Ok(done) => match &done[i] {
                        Done::Inserted(outcome) => Ok(outcome.clone()),
                        Done::Recorded(_) => unreachable!("an insert is answered as one"),
                    },
                    Err(e) => Err(e.clone()),
                });
            }
            Write::Record { answer, .. } => {
                let _ = answer.send(match &result {
                    Ok(done) => match &done[i] {
                        Done::Recorded(recorded) => Ok(*recorded),
                        Done::Inserted(_) => unreachable!("a record is answered as one"),
                    },
                    Err(e) => Err(e.clone()),
                });
            }
        }
    }
}

/// What one write did, before the commit.
enum Done {
    Inserted(InsertOutcome),
    Recorded(bool),
}

/// Applies a group's writes in one transaction; what each did, in the group's order.
///
/// Jobs without an idempotency key are stored together (`jobs::insert_many_in`: a few
/// statements for the lot); nothing else in the group can see or change them. Keyed jobs
/// are stored one by one in arrival order, so that of two with one key the first wins and
/// the second finds it, as when each had a transaction of its own.
async fn apply(tx: &mut WriteTx, group: &[Write]) -> StoreResult<Vec<Done>> {
    // The fault tests make a group's writing panic here.
    fail::fail_point!("sqlite-group-write");
    let plain: Vec<jobs::JobInsert> = group
        .iter()
        .filter_map(|write| match write {
            Write::Insert {
                job,
                row,
                idempotency: None,
                now,
                ..
            } => Some((&**job, &**row, None, *now)),
            _ => None,
        })
        .collect();
    jobs::insert_many_in(tx, &plain).await?;
    let mut done = Vec::with_capacity(group.len());
    for write in group {
        done.push(match write {
            Write::Insert {
                idempotency: None, ..
            } => Done::Inserted(InsertOutcome::Inserted),
            Write::Insert {
                job,
                row,
                idempotency: Some(idempotency),
                now,
                ..
            } => Done::Inserted(jobs::insert_in(tx, job, row, Some(idempotency), *now).await?),
            Write::Record { record, .. } => Done::Recorded(callbacks::record_in(tx, record).await?),
        });
    }
    Ok(done)
}
