//! Store scenarios run against the DynamoDB backend (on moto) and, as the reference, the
//! SQLite one: each is written once over `Arc<dyn Store>`. A scenario gets two handles on
//! the same database, `a` and `b`, as two nodes would have (for SQLite, the same store
//! twice: it serves one process).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use doparallel::job::{JobId, JobOptions, JobStatus, NewJob, NewTask, TaskStatus};
use doparallel::store::{
    CallbackOutcome, CallbackRecord, CancelOutcome, Claim, ClaimParams, ClaimedTask, DeleteOutcome,
    DynamoStore, IdempotencyKey, InsertOutcome, JobListQuery, Millis, NodeId, SettleOutcome, Store,
    TaskPageQuery, TaskSettle, now_millis,
};
use serde_json::value::RawValue;

use crate::moto;

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string()).unwrap()
}

fn job(n: usize, callback: Option<&str>, options: JobOptions) -> NewJob {
    NewJob {
        id: JobId::generate(),
        owner: None,
        callback: callback.map(|c| c.parse().unwrap()),
        options,
        tasks: (1..=n)
            .map(|i| NewTask {
                endpoint: "http://127.0.0.1:9/task".into(),
                params: raw(&format!(r#"{{"i":{i}}}"#)),
            })
            .collect(),
    }
}

async fn insert(store: &Arc<dyn Store>, job: &NewJob, now: Millis) {
    let outcome = store.job_insert(job, None, now).await.unwrap();
    assert_eq!(outcome, InsertOutcome::Inserted);
}

async fn claim(store: &Arc<dyn Store>, node: NodeId, now: Millis, limit: u32) -> Claim {
    store
        .tasks_claim(&ClaimParams {
            limit,
            now,
            node,
            lease_until: now + 30_000,
            skip_jobs: Vec::new(),
        })
        .await
        .unwrap()
}

fn settle(task: &ClaimedTask, now: Millis, outcome: SettleOutcome) -> TaskSettle {
    TaskSettle {
        job_id: task.job_id,
        index: task.index,
        attempt: task.attempt,
        latency_ms: 3,
        now,
        outcome,
    }
}

fn complete(task: &ClaimedTask, now: Millis) -> TaskSettle {
    settle(
        task,
        now,
        SettleOutcome::Complete {
            result: raw(&format!(r#"{{"done":{}}}"#, task.index)),
        },
    )
}

fn failed(task: &ClaimedTask, now: Millis) -> TaskSettle {
    settle(
        task,
        now,
        SettleOutcome::Failed {
            error: raw(r#"{"kind":"http_status"}"#),
        },
    )
}

async fn tasks(store: &Arc<dyn Store>, id: JobId) -> Vec<doparallel::store::TaskRecord> {
    store
        .tasks_page(
            id,
            &TaskPageQuery {
                after: 0,
                limit: 1000,
                status: None,
            },
        )
        .await
        .unwrap()
}

/// A job is finished, and its callback made due, by exactly one settle: the one of its
/// last task, whichever node makes it.
async fn fan_in_exactly_once(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let (na, nb) = (NodeId::random(), NodeId::random());
    let j = job(3, Some("http://127.0.0.1:9/cb"), JobOptions::defaults());
    insert(&a, &j, now).await;
    let claimed = claim(&a, na, now, 2).await.tasks;
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|t| t.attempt == 1 && t.job_id == j.id));
    let last = claim(&b, nb, now, 10).await.tasks;
    assert_eq!(last.len(), 1, "the third task, on the other node");
    assert_eq!(a.job_get(j.id).await.unwrap().unwrap().running, 3);

    let first = a
        .tasks_settle(
            na,
            &[complete(&claimed[0], now), complete(&claimed[1], now)],
        )
        .await
        .unwrap();
    assert_eq!(first.complete, 2);
    assert!(first.finished.is_empty());
    assert!(
        a.callbacks_due(now + 1, now + 100, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let second = b
        .tasks_settle(nb, &[complete(&last[0], now)])
        .await
        .unwrap();
    assert_eq!(second.finished.len(), 1);
    assert_eq!(second.finished[0].status, JobStatus::Complete);
    assert!(second.finished[0].has_callback);
    // The same outcomes again change nothing and finish nothing.
    let again = a
        .tasks_settle(
            na,
            &[complete(&claimed[0], now), complete(&claimed[1], now)],
        )
        .await
        .unwrap();
    assert_eq!((again.complete, again.finished.len()), (0, 0));

    let record = a.job_get(j.id).await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::Complete);
    assert_eq!((record.complete, record.running, record.failed), (3, 0, 0));
    let due = a.callbacks_due(now + 1, now + 100, 10).await.unwrap();
    assert_eq!(due.len(), 1, "one callback record");
    assert_eq!(due[0].job_id, j.id);
    let stored = tasks(&a, j.id).await;
    assert_eq!(stored.len(), 3);
    for t in stored {
        assert_eq!(t.status, TaskStatus::Complete);
        assert_eq!(
            t.result.unwrap().get(),
            format!(r#"{{"done":{}}}"#, t.index)
        );
    }
}

/// Parameters and results are kept as the exact text: numbers DynamoDB or a float would
/// change come back digit for digit.
async fn numbers_round_trip(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let now = now_millis();
    let text = r#"{"big":1e400,"tenth":0.1,"int":12345678901234567890,"neg":-0.0,"e":-0.0e-7,"k":[1.10,2E+3]}"#;
    let mut j = job(1, None, JobOptions::defaults());
    j.tasks[0].params = raw(text);
    insert(&a, &j, now).await;
    let node = NodeId::random();
    let claimed = claim(&a, node, now, 1).await.tasks;
    assert_eq!(claimed[0].params.get(), text);
    let s = settle(
        &claimed[0],
        now,
        SettleOutcome::Complete { result: raw(text) },
    );
    a.tasks_settle(node, &[s]).await.unwrap();
    let stored = tasks(&a, j.id).await;
    assert_eq!(stored[0].result.as_ref().unwrap().get(), text);
}

/// A retried task waits for its time, then runs as the next attempt.
async fn retry_waits_for_its_time(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let now = now_millis();
    let node = NodeId::random();
    let j = job(1, None, JobOptions::defaults());
    insert(&a, &j, now).await;
    let first = claim(&a, node, now, 5).await.tasks;
    let report = a
        .tasks_settle(
            node,
            &[settle(
                &first[0],
                now,
                SettleOutcome::Retry {
                    run_at: now + 5_000,
                    error: raw(r#"{"kind":"timeout"}"#),
                },
            )],
        )
        .await
        .unwrap();
    assert_eq!(report.retried, 1);
    let early = claim(&a, node, now + 10, 5).await;
    assert!(early.tasks.is_empty());
    assert_eq!(early.next_due, Some(now + 5_000));
    let page = tasks(&a, j.id).await;
    assert_eq!(page[0].status, TaskStatus::Pending);
    assert!(page[0].error.as_ref().unwrap().get().contains("timeout"));
    let due = claim(&a, node, now + 5_000, 5).await.tasks;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].attempt, 2);
}

/// Two nodes claiming at the same time never get the same task, and together get all.
async fn two_nodes_never_claim_the_same_task(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    const TASKS: usize = 120;
    let now = now_millis();
    let j = job(TASKS, None, JobOptions::defaults());
    insert(&a, &j, now).await;
    let drain = |store: Arc<dyn Store>| async move {
        let node = NodeId::random();
        let mut got = Vec::new();
        for _ in 0..200 {
            let claimed = claim(&store, node, now, 7).await.tasks;
            if claimed.is_empty() && store.queue_depth().await.unwrap() == 0 {
                break;
            }
            got.extend(claimed.iter().map(|t| t.index));
        }
        got
    };
    let (x, y) = tokio::join!(drain(a.clone()), drain(b.clone()));
    let mut seen = HashSet::new();
    for index in x.iter().chain(&y) {
        assert!(seen.insert(*index), "task {index} was claimed twice");
    }
    assert_eq!(seen.len(), TASKS);
    assert_eq!(
        a.job_get(j.id).await.unwrap().unwrap().running,
        TASKS as u64
    );
}

/// A node whose lease ran out loses its tasks to the others, and its late outcome is
/// dropped: each result is stored once.
async fn expired_lease_is_taken_over(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let (dead, alive) = (NodeId::random(), NodeId::random());
    let j = job(2, None, JobOptions::defaults());
    insert(&a, &j, now).await;
    let lost = a
        .tasks_claim(&ClaimParams {
            limit: 2,
            now,
            node: dead,
            lease_until: now + 1_000,
            skip_jobs: Vec::new(),
        })
        .await
        .unwrap()
        .tasks;
    assert_eq!(lost.len(), 2);
    assert_eq!(b.tasks_expire(now + 500).await.unwrap(), 0, "still leased");
    assert_eq!(b.tasks_expire(now + 2_000).await.unwrap(), 2);
    assert_eq!(b.job_get(j.id).await.unwrap().unwrap().running, 0);
    let again = claim(&b, alive, now + 2_000, 5).await.tasks;
    assert_eq!(again.len(), 2);
    assert_eq!(
        again[0].attempt, 1,
        "the interrupted attempt is not counted"
    );
    let late = a
        .tasks_settle(dead, &[complete(&lost[0], now)])
        .await
        .unwrap();
    assert_eq!(
        late.complete, 0,
        "a settle from the node that lost the lease is dropped"
    );
    let report = b
        .tasks_settle(alive, &[complete(&again[0], now), complete(&again[1], now)])
        .await
        .unwrap();
    assert_eq!(report.finished.len(), 1);
    assert_eq!(a.job_get(j.id).await.unwrap().unwrap().complete, 2);
}

/// Renewing keeps a node's tasks through the sweep.
async fn renewed_lease_is_kept(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let node = NodeId::random();
    let j = job(3, None, JobOptions::defaults());
    insert(&a, &j, now).await;
    let claimed = a
        .tasks_claim(&ClaimParams {
            limit: 3,
            now,
            node,
            lease_until: now + 1_000,
            skip_jobs: Vec::new(),
        })
        .await
        .unwrap()
        .tasks;
    assert_eq!(claimed.len(), 3);
    assert_eq!(a.tasks_renew(node, now + 60_000).await.unwrap(), 3);
    assert_eq!(b.tasks_expire(now + 2_000).await.unwrap(), 0);
    assert_eq!(b.tasks_expire(now + 61_000).await.unwrap(), 3);
}

/// The callback outbox: leased to one worker at a time, each attempt recorded once.
async fn callback_outbox(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let j = job(0, Some("http://127.0.0.1:9/cb"), JobOptions::defaults());
    insert(&a, &j, now).await;
    assert_eq!(a.callback_next_due().await.unwrap(), Some(now));
    let due = a.callbacks_due(now, now + 15_000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].attempts, due[0].url.as_str()),
        (0, "http://127.0.0.1:9/cb")
    );
    assert!(
        b.callbacks_due(now + 1, now + 15_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
    let retry = |attempts| CallbackRecord {
        job_id: j.id,
        attempts,
        now,
        outcome: CallbackOutcome::Retry {
            at: now + 50,
            error: "503".into(),
        },
    };
    assert!(a.callback_record(&retry(1)).await.unwrap());
    assert!(
        !b.callback_record(&retry(1)).await.unwrap(),
        "recorded once"
    );
    assert_eq!(b.callback_next_due().await.unwrap(), Some(now + 50));
    let due = b.callbacks_due(now + 50, now + 15_000, 10).await.unwrap();
    assert_eq!(due[0].attempts, 1);
    let delivered = CallbackRecord {
        job_id: j.id,
        attempts: 2,
        now,
        outcome: CallbackOutcome::Delivered,
    };
    assert!(b.callback_record(&delivered).await.unwrap());
    let record = a.job_get(j.id).await.unwrap().unwrap();
    assert_eq!(
        record.callback.state,
        doparallel::job::CallbackState::Delivered
    );
    assert_eq!(record.callback.attempts, 2);
    assert_eq!(record.callback.last_error.as_deref(), Some("503"));
    assert_eq!(a.callback_next_due().await.unwrap(), None);
}

/// Cancel stops pending and running tasks at once; a late outcome is dropped.
async fn cancel_stops_everything(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let node = NodeId::random();
    let j = job(5, Some("http://127.0.0.1:9/cb"), JobOptions::defaults());
    insert(&a, &j, now).await;
    let running = claim(&a, node, now, 2).await.tasks;
    assert_eq!(running.len(), 2);
    match b.job_cancel(j.id, now + 1).await.unwrap() {
        CancelOutcome::Cancelled {
            has_callback,
            newly,
            tasks,
        } => assert_eq!((has_callback, newly, tasks), (true, true, 5)),
        other => panic!("{other:?}"),
    }
    let late = a
        .tasks_settle(node, &[complete(&running[0], now)])
        .await
        .unwrap();
    assert_eq!(late.complete, 0);
    assert!(claim(&a, node, now + 2, 10).await.tasks.is_empty());
    let record = a.job_get(j.id).await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::Cancelled);
    assert_eq!(
        (record.cancelled, record.running, record.complete),
        (5, 0, 0)
    );
    assert_eq!(record.finished_at, Some(now + 1));
    let page = tasks(&a, j.id).await;
    assert!(
        page.iter().all(|t| t.status == TaskStatus::Cancelled),
        "{page:?}"
    );
    let cancelled_only = a
        .tasks_page(
            j.id,
            &TaskPageQuery {
                after: 0,
                limit: 10,
                status: Some(TaskStatus::Cancelled),
            },
        )
        .await
        .unwrap();
    assert_eq!(cancelled_only.len(), 5);
    assert!(matches!(
        a.job_cancel(j.id, now + 3).await.unwrap(),
        CancelOutcome::Cancelled { newly: false, .. }
    ));
    assert_eq!(
        a.callbacks_due(now + 5, now + 100, 10).await.unwrap().len(),
        1
    );
    assert_eq!(a.tasks_expire(now + 60_000).await.unwrap(), 0);
    assert!(matches!(
        a.job_cancel(JobId::generate(), now).await.unwrap(),
        CancelOutcome::NotFound
    ));
}

/// Deleting refuses what is unfinished or owes a callback; purging takes old finished jobs.
async fn delete_and_purge(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let now = now_millis();
    let node = NodeId::random();
    let running = job(2, None, JobOptions::defaults());
    insert(&a, &running, now).await;
    assert_eq!(
        a.job_delete(running.id).await.unwrap(),
        DeleteOutcome::NotFinished
    );
    let owed = job(0, Some("http://127.0.0.1:9/cb"), JobOptions::defaults());
    insert(&a, &owed, now).await;
    assert_eq!(
        a.job_delete(owed.id).await.unwrap(),
        DeleteOutcome::CallbackPending
    );

    let claimed = claim(&a, node, now, 10).await.tasks;
    let settles: Vec<_> = claimed.iter().map(|t| complete(t, now)).collect();
    a.tasks_settle(node, &settles).await.unwrap();
    assert_eq!(
        a.job_delete(running.id).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(a.job_get(running.id).await.unwrap().is_none());
    assert!(tasks(&a, running.id).await.is_empty());
    assert_eq!(
        a.job_delete(running.id).await.unwrap(),
        DeleteOutcome::NotFound
    );

    let old = job(3, None, JobOptions::defaults());
    insert(&a, &old, now).await;
    let claimed = claim(&a, node, now, 10).await.tasks;
    let settles: Vec<_> = claimed.iter().map(|t| complete(t, now)).collect();
    a.tasks_settle(node, &settles).await.unwrap();
    assert_eq!(
        a.jobs_purge(now, 100).await.unwrap(),
        0,
        "not older than the cutoff"
    );
    // The job owing its callback stays whatever its age.
    assert_eq!(a.jobs_purge(now + 1, 100).await.unwrap(), 1);
    assert!(a.job_get(old.id).await.unwrap().is_none());
    assert!(a.job_get(owed.id).await.unwrap().is_some());
}

/// An idempotency key names its first job, per owner; a deleted job frees it.
async fn idempotency_keys(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let key = |hash: &str| IdempotencyKey {
        key: "order-17".into(),
        request_hash: hash.into(),
    };
    let first = job(2, None, JobOptions::defaults());
    let outcome = a.job_insert(&first, Some(&key("h1")), now).await.unwrap();
    assert_eq!(outcome, InsertOutcome::Inserted);
    let retried = job(2, None, JobOptions::defaults());
    assert_eq!(
        b.job_insert(&retried, Some(&key("h1")), now).await.unwrap(),
        InsertOutcome::Existing {
            job_id: first.id,
            same_request: true
        }
    );
    assert!(
        b.job_get(retried.id).await.unwrap().is_none(),
        "nothing stored"
    );
    assert_eq!(
        b.job_insert(&retried, Some(&key("h2")), now).await.unwrap(),
        InsertOutcome::Existing {
            job_id: first.id,
            same_request: false
        }
    );
    let mut other_owner = job(1, None, JobOptions::defaults());
    other_owner.owner = Some("owner-b".into());
    assert_eq!(
        a.job_insert(&other_owner, Some(&key("h1")), now)
            .await
            .unwrap(),
        InsertOutcome::Inserted
    );
}

/// A job's concurrency counts the calls of every node.
async fn concurrency_counts_every_node(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let (na, nb) = (NodeId::random(), NodeId::random());
    let options = JobOptions {
        concurrency: Some(3),
        ..JobOptions::defaults()
    };
    let j = job(10, None, options);
    insert(&a, &j, now).await;
    let x = claim(&a, na, now, 2).await.tasks;
    let y = claim(&b, nb, now, 10).await.tasks;
    assert_eq!((x.len(), y.len()), (2, 1));
    assert!(claim(&a, na, now, 10).await.tasks.is_empty());
    a.tasks_settle(na, &[complete(&x[0], now)]).await.unwrap();
    assert_eq!(claim(&b, nb, now, 10).await.tasks.len(), 1);
}

/// Failures are numbered in the order they were stored, for the events stream.
async fn failures_in_order(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = now_millis();
    let (na, nb) = (NodeId::random(), NodeId::random());
    let options = JobOptions {
        tolerated_failures: 1,
        ..JobOptions::defaults()
    };
    let j = job(4, None, options);
    insert(&a, &j, now).await;
    let x = claim(&a, na, now, 2).await.tasks;
    let y = claim(&b, nb, now, 2).await.tasks;
    b.tasks_settle(nb, &[failed(&y[1], now)]).await.unwrap();
    a.tasks_settle(na, &[failed(&x[0], now), complete(&x[1], now)])
        .await
        .unwrap();
    let report = b.tasks_settle(nb, &[complete(&y[0], now)]).await.unwrap();
    assert_eq!(
        report.finished[0].status,
        JobStatus::Failed,
        "2 failures > 1 tolerated"
    );
    let failures = a.tasks_failed_since(j.id, 0, 10).await.unwrap();
    let order: Vec<(u64, u64)> = failures
        .iter()
        .map(|f| (f.fail_seq, f.task.index))
        .collect();
    assert_eq!(order, vec![(1, y[1].index), (2, x[0].index)]);
    let rest = a.tasks_failed_since(j.id, 1, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].task.status, TaskStatus::Failed);
}

/// Jobs list newest first, by status and by owner, a page at a time.
async fn job_list_pages(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let now = now_millis();
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut j = job(usize::from(i % 2 == 0), None, JobOptions::defaults());
        j.owner = Some(if i < 3 { "o1" } else { "o2" }.into());
        insert(&a, &j, now).await;
        ids.push(j.id);
    }
    let list = |owner: Option<&str>, status: Option<JobStatus>, before: Option<JobId>, limit| {
        let a = a.clone();
        let query = JobListQuery {
            owner: owner.map(str::to_string),
            status,
            before,
            limit,
        };
        async move {
            a.job_list(&query)
                .await
                .unwrap()
                .iter()
                .map(|j| j.id)
                .collect::<Vec<_>>()
        }
    };
    let newest: Vec<JobId> = ids.iter().rev().copied().collect();
    assert_eq!(list(None, None, None, 100).await[..5], newest[..]);
    assert_eq!(
        list(None, None, Some(ids[3]), 2).await,
        vec![ids[2], ids[1]]
    );
    assert_eq!(
        list(Some("o1"), None, None, 10).await,
        vec![ids[2], ids[1], ids[0]]
    );
    // Jobs of no task are Complete at once; the others are Pending.
    assert_eq!(
        list(Some("o1"), Some(JobStatus::Complete), None, 10).await,
        vec![ids[1]]
    );
    assert_eq!(
        list(Some("o2"), Some(JobStatus::Pending), None, 10).await,
        vec![ids[4]]
    );
}

/// A job of many tasks is stored whole before it is visible, and claimed and settled in
/// batches over the transaction limit (99 tasks and the job).
async fn large_job(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    const TASKS: usize = 250;
    let now = now_millis();
    let j = job(TASKS, Some("http://127.0.0.1:9/cb"), JobOptions::defaults());
    insert(&a, &j, now).await;
    assert_eq!(b.queue_depth().await.unwrap(), TASKS as u64);
    let node = NodeId::random();
    let mut finished = Vec::new();
    for _ in 0..10 {
        let claimed = claim(&b, node, now, 512).await.tasks;
        if claimed.is_empty() {
            break;
        }
        let settles: Vec<_> = claimed.iter().map(|t| complete(t, now)).collect();
        finished.extend(b.tasks_settle(node, &settles).await.unwrap().finished);
    }
    assert_eq!(finished.len(), 1);
    let record = a.job_get(j.id).await.unwrap().unwrap();
    assert_eq!(record.complete, TASKS as u64);
    let last = a
        .tasks_page(
            j.id,
            &TaskPageQuery {
                after: TASKS as u64 - 2,
                limit: 10,
                status: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(last.iter().map(|t| t.index).collect::<Vec<_>>(), [249, 250]);
}

/// Submitting the largest job the default limits allow takes seconds, not minutes
/// (BatchWriteItem, many requests at once).
async fn submission_of_many_tasks(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    const TASKS: usize = 20_000;
    let now = now_millis();
    let j = job(TASKS, None, JobOptions::defaults());
    let started = Instant::now();
    insert(&a, &j, now).await;
    let took = started.elapsed();
    eprintln!("{TASKS} tasks stored in {took:?}");
    assert!(took.as_secs() < 60, "{TASKS} tasks took {took:?}");
    assert_eq!(a.queue_depth().await.unwrap(), TASKS as u64);
    let last = a
        .tasks_page(
            j.id,
            &TaskPageQuery {
                after: TASKS as u64 - 1,
                limit: 10,
                status: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        last.iter().map(|t| t.index).collect::<Vec<_>>(),
        [TASKS as u64]
    );
}

/// Runs each scenario on a fresh SQLite database and on a fresh DynamoDB table.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", dir.path().join("s.db").display());
                    let store = doparallel::store::open(&url).await.unwrap();
                    super::$name(store.clone(), store).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(url) = crate::moto::fresh_table().await else { return };
                    let a = doparallel::store::open(&url).await.unwrap();
                    let b = doparallel::store::open(&url).await.unwrap();
                    super::$name(a, b).await;
                }
            )*
        }
    };
}

scenarios!(
    fan_in_exactly_once,
    numbers_round_trip,
    retry_waits_for_its_time,
    two_nodes_never_claim_the_same_task,
    expired_lease_is_taken_over,
    renewed_lease_is_kept,
    callback_outbox,
    cancel_stops_everything,
    delete_and_purge,
    idempotency_keys,
    concurrency_counts_every_node,
    failures_in_order,
    job_list_pages,
    large_job,
    submission_of_many_tasks,
);

/// A result too large for a DynamoDB item is stored as a failure that says so, and the
/// job goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_refuses_a_result_over_its_item_limit() {
    let Some(url) = moto::fresh_table().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(DynamoStore::open(&url).await.unwrap());
    let now = now_millis();
    let node = NodeId::random();
    let j = job(1, None, JobOptions::defaults());
    insert(&store, &j, now).await;
    let claimed = claim(&store, node, now, 1).await.tasks;
    let big = format!(
        "\"{}\"",
        "x".repeat(doparallel::store::dynamodb::MAX_RESULT_BYTES)
    );
    let report = store
        .tasks_settle(
            node,
            &[settle(
                &claimed[0],
                now,
                SettleOutcome::Complete { result: raw(&big) },
            )],
        )
        .await
        .unwrap();
    assert_eq!((report.failed, report.finished.len()), (1, 1));
    let stored = tasks(&store, j.id).await;
    let error = stored[0].error.as_ref().unwrap().get();
    assert!(
        error.contains("response_too_large") && error.contains("400 KB"),
        "{error}"
    );
}
