//! The store conformance suite: the same scenarios, written once against the `Store` trait,
//! run on every backend (SQLite on a temporary file, PostgreSQL on a fresh database of the
//! test cluster, see `pg.rs`; DynamoDB on a fresh table of moto's server, see `moto.rs`). A backend that passes them keeps the engine's contract:
//! submissions, claims, settles, fan-in, leases, the callback outbox, cancel, delete, purge
//! and recovery behave the same whatever is behind the trait.
//!
//! "Two nodes" here are two `NodeId`s on one store; the PostgreSQL-only tests at the end use
//! separate connection pools on one database, as separate processes would.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use doparallel::job::{
    AwsSigV4, CallbackState, GroupLimits, Headers, JobId, JobOptions, JobStatus, JobTrace, Method,
    NewJob, NewTask, TaskCall, TaskOptions, TaskStatus,
};
use doparallel::store::{
    CallbackOutcome, CallbackRecord, CancelOutcome, Claim, ClaimParams, ClaimedTask, DeleteOutcome,
    IdempotencyKey, InsertOutcome, JobListQuery, Millis, NodeId, Notice, OverdueParams,
    ReportOutcome, SettleOutcome, SettleReport, Store, TaskPageQuery, TaskReport, TaskSettle,
    now_millis,
};
use futures_util::StreamExt;
use serde_json::value::RawValue;

/// How long a claim's lease lasts in these scenarios.
const LEASE: Millis = 30_000;

/// Writes one scenario's test for each backend: `store::sqlite::NAME`,
/// `store::postgres::NAME` and `store::dynamodb::NAME` (on moto, see `moto.rs`).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", dir.path().join("store.db").display());
                    let store = doparallel::store::open(&url).await.unwrap();
                    super::$name(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = crate::pg::database().await else { return };
                    super::$name(db.store().await).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(url) = crate::moto::fresh_table().await else { return };
                    super::$name(doparallel::store::open(&url).await.unwrap()).await;
                }
            )*
        }
    };
}

conformance!(
    submit_and_read_back,
    empty_job_is_complete_at_once,
    idempotency_keys,
    submissions_at_once_keep_their_keys,
    one_batch_finishes_many_jobs,
    job_list_pages_and_filters,
    tasks_page_pages_and_filters,
    claim_takes_due_tasks_in_order,
    claim_shares_fairly_between_jobs,
    claim_serves_a_new_job_next,
    claim_respects_job_concurrency,
    claim_skips_jobs,
    claim_shares_between_owners_first,
    claim_reports_next_due_in_backoff,
    settle_complete_failed_retry,
    settle_ignores_stale_attempt_and_wrong_node,
    fan_in_finishes_a_job_exactly_once,
    fan_in_tolerated_failures,
    failures_are_numbered_in_order,
    leases_renew_and_expire,
    two_nodes_never_claim_the_same_task,
    two_nodes_share_a_job_concurrency,
    callback_outbox,
    callback_gave_up,
    cancel_stops_everything,
    delete_finished_jobs_only,
    purge_old_finished_jobs,
    recover_takes_back_expired_leases,
    awaited_attempts_wait_for_their_report,
    awaited_attempts_time_out,
    task_token_key_is_stable,
    numbers_round_trip_exactly,
    jobs_larger_than_a_transaction,
    submission_of_many_tasks,
    call_settings_travel_with_their_task,
    metadata_is_kept_and_filters_lists,
    not_before_holds_the_tasks_and_reads_scheduled,
    retry_requeues_failed_tasks_with_a_fresh_budget,
    retry_of_a_cancelled_job,
    pause_holds_claims_until_resumed,
    changed_limits_hold_at_the_next_claim,
    a_job_decided_early_ends_with_its_status,
    a_job_past_its_deadline_fails_what_is_unfinished,
    heartbeats_keep_an_awaited_attempt_alive,
    higher_priorities_are_served_first_and_a_long_wait_is_not_forgotten,
    groups_share_a_claim_before_their_jobs_do,
    group_limits_hold_over_claims,
    a_retried_job_counts_in_its_group_again,
);

// ---- helpers ----

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string()).unwrap()
}

fn options() -> JobOptions {
    JobOptions::defaults()
}

/// A job of `n` tasks, task i with params `{"i":i}`.
fn new_job(n: usize, options: JobOptions, callback: bool) -> NewJob {
    NewJob {
        id: JobId::generate(),
        owner: None,
        callback: callback.then(|| "http://127.0.0.1:9/cb".parse().unwrap()),
        options,
        tasks: (1..=n)
            .map(|i| NewTask {
                endpoint: format!("http://127.0.0.1:9/t{i}"),
                params: raw(&format!("{{\"i\":{i}}}")),
                call: None,
            })
            .collect(),
        metadata: None,
    }
}

async fn insert(store: &Arc<dyn Store>, job: &NewJob, now: Millis) -> JobId {
    assert_eq!(
        store.job_insert(job, None, now).await.unwrap(),
        InsertOutcome::Inserted
    );
    job.id
}

async fn claim(store: &Arc<dyn Store>, node: NodeId, limit: u32, now: Millis) -> Claim {
    claim_skipping(store, node, limit, now, Vec::new()).await
}

async fn claim_skipping(
    store: &Arc<dyn Store>,
    node: NodeId,
    limit: u32,
    now: Millis,
    skip_jobs: Vec<JobId>,
) -> Claim {
    claim_with(store, node, limit, now, skip_jobs, None).await
}

/// A claim leaving `skip_jobs` out, with the server's default concurrency for groups.
async fn claim_with(
    store: &Arc<dyn Store>,
    node: NodeId,
    limit: u32,
    now: Millis,
    skip_jobs: Vec<JobId>,
    group_concurrency: Option<u32>,
) -> Claim {
    store
        .tasks_claim(&ClaimParams {
            limit,
            now,
            node,
            lease_until: now + LEASE,
            skip_jobs,
            priority_max_wait: 60_000,
            group_concurrency,
            owners: Default::default(),
        })
        .await
        .unwrap()
}

fn indexes(claim: &Claim, job: JobId) -> Vec<u64> {
    claim
        .tasks
        .iter()
        .filter(|t| t.job_id == job)
        .map(|t| t.index)
        .collect()
}

fn settle(task: &ClaimedTask, outcome: SettleOutcome, now: Millis) -> TaskSettle {
    TaskSettle {
        job_id: task.job_id,
        index: task.index,
        attempt: task.attempt,
        latency_ms: 7,
        now,
        outcome,
    }
}

fn complete(result: &str) -> SettleOutcome {
    SettleOutcome::Complete {
        result: raw(result),
    }
}

fn failed() -> SettleOutcome {
    SettleOutcome::Failed {
        error: raw(r#"{"kind":"http_status","http_status":404}"#),
    }
}

fn retry(run_at: Millis) -> SettleOutcome {
    SettleOutcome::Retry {
        run_at,
        error: raw(r#"{"kind":"timeout"}"#),
    }
}

fn applied(report: &SettleReport) -> u64 {
    report.complete + report.failed + report.retried
}

async fn settle_all(store: &Arc<dyn Store>, node: NodeId, batch: Vec<TaskSettle>) -> SettleReport {
    store.tasks_settle(node, &batch).await.unwrap()
}

async fn job_of(store: &Arc<dyn Store>, id: JobId) -> doparallel::store::JobRecord {
    store.job_get(id).await.unwrap().expect("the job exists")
}

async fn all_tasks(store: &Arc<dyn Store>, id: JobId) -> Vec<doparallel::store::TaskRecord> {
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

/// Takes every task of the store's due work (one node, in batches) and completes it.
async fn run_to_end(store: &Arc<dyn Store>, node: NodeId, now: Millis) -> SettleReport {
    let mut report = SettleReport::default();
    for _ in 0..100 {
        let claim = claim(store, node, 100, now).await;
        if claim.tasks.is_empty() {
            return report;
        }
        let batch = claim
            .tasks
            .iter()
            .map(|t| settle(t, complete("true"), now))
            .collect();
        let r = settle_all(store, node, batch).await;
        report.complete += r.complete;
        report.finished.extend(r.finished);
    }
    panic!("the work never ran out");
}

// ---- scenarios ----

async fn submit_and_read_back(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let opts = JobOptions {
        concurrency: Some(3),
        tolerated_failures: 1,
        ..options()
    };
    // Key order, spacing of numbers and digits beyond f64 are the client's and are kept.
    let params = r#"{"b":1,"a":1.10,"big":12345678901234567890123,"e":-0.0e-7,"s":"é\n"}"#;
    let mut new = new_job(2, opts.clone(), true);
    new.owner = Some("owner-1".into());
    new.tasks[0].params = raw(params);
    new.tasks[1].params = raw("null");
    let id = insert(&store, &new, t0).await;

    let job = job_of(&store, id).await;
    assert_eq!(job.id, id);
    assert_eq!(job.owner.as_deref(), Some("owner-1"));
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(job.options, opts);
    assert_eq!(
        (
            job.total,
            job.running,
            job.complete,
            job.failed,
            job.cancelled
        ),
        (2, 0, 0, 0, 0)
    );
    assert_eq!(job.pending(), 2);
    assert_eq!(job.created_at, t0);
    assert_eq!(job.finished_at, None);
    assert_eq!(job.callback_url.as_deref(), Some("http://127.0.0.1:9/cb"));
    assert_eq!(job.callback.state, CallbackState::Pending);
    assert_eq!(job.callback.attempts, 0);
    assert!(store.job_get(JobId::generate()).await.unwrap().is_none());

    let tasks = all_tasks(&store, id).await;
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0].index, 1);
    assert_eq!(tasks[0].status, TaskStatus::Pending);
    assert_eq!(tasks[0].attempts, 0);
    assert_eq!(tasks[0].endpoint, "http://127.0.0.1:9/t1");
    assert!(tasks[0].result.is_none() && tasks[0].error.is_none());

    let node = NodeId::random();
    let claim = claim(&store, node, 10, t0).await;
    assert_eq!(claim.tasks.len(), 2);
    assert_eq!(claim.tasks[0].params.get(), params);
    assert_eq!(claim.tasks[1].params.get(), "null");
    assert_eq!(*claim.tasks[0].options, opts);

    // Results too are stored byte for byte.
    let result = r#"{"z":[1.10,2e3],"a":{"y":null,"x":12345678901234567890}}"#;
    let report = settle_all(
        &store,
        node,
        vec![settle(&claim.tasks[0], complete(result), t0 + 5)],
    )
    .await;
    assert_eq!(report.complete, 1);
    let tasks = all_tasks(&store, id).await;
    assert_eq!(tasks[0].result.as_ref().unwrap().get(), result);
    assert_eq!(tasks[0].latency_ms, Some(7));
    assert_eq!(tasks[0].finished_at, Some(t0 + 5));
    store.health().await.unwrap();
}

async fn empty_job_is_complete_at_once(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let id = insert(&store, &new_job(0, options(), true), t0).await;
    let job = job_of(&store, id).await;
    assert_eq!(job.status, JobStatus::Complete);
    assert_eq!(job.finished_at, Some(t0));
    assert_eq!(job.total, 0);
    assert_eq!(job.callback.state, CallbackState::Pending);
    // Its callback is due at once.
    assert_eq!(store.callback_next_due().await.unwrap(), Some(t0));
    let due = store.callbacks_due(t0, t0 + 1000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].job_id, id);
    assert_eq!(due[0].attempts, 0);

    // Without a callback there is nothing to send.
    let quiet = insert(&store, &new_job(0, options(), false), t0).await;
    assert_eq!(
        job_of(&store, quiet).await.callback.state,
        CallbackState::None
    );
    // The first one is leased until t0 + 1000; the second has no record.
    assert!(
        store
            .callbacks_due(t0 + 500, t0 + 1000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        claim(&store, NodeId::random(), 10, t0)
            .await
            .tasks
            .is_empty()
    );
}

async fn idempotency_keys(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let key = |hash: &str| IdempotencyKey {
        key: "key-1".into(),
        request_hash: hash.into(),
    };
    let first = new_job(2, options(), false);
    assert_eq!(
        store
            .job_insert(&first, Some(&key("h1")), t0)
            .await
            .unwrap(),
        InsertOutcome::Inserted
    );
    // The same key and body: the first job, nothing stored.
    let again = new_job(2, options(), false);
    assert_eq!(
        store
            .job_insert(&again, Some(&key("h1")), t0)
            .await
            .unwrap(),
        InsertOutcome::Existing {
            job_id: first.id,
            same_request: true
        }
    );
    assert!(store.job_get(again.id).await.unwrap().is_none());
    // The same key with another body.
    let other = new_job(1, options(), false);
    assert_eq!(
        store
            .job_insert(&other, Some(&key("h2")), t0)
            .await
            .unwrap(),
        InsertOutcome::Existing {
            job_id: first.id,
            same_request: false
        }
    );
    assert!(store.job_get(other.id).await.unwrap().is_none());
    // Keys are per owner.
    let mut owned = new_job(1, options(), false);
    owned.owner = Some("someone".into());
    assert_eq!(
        store
            .job_insert(&owned, Some(&key("h1")), t0)
            .await
            .unwrap(),
        InsertOutcome::Inserted
    );
    let mut owned_again = new_job(1, options(), false);
    owned_again.owner = Some("someone".into());
    assert_eq!(
        store
            .job_insert(&owned_again, Some(&key("h1")), t0)
            .await
            .unwrap(),
        InsertOutcome::Existing {
            job_id: owned.id,
            same_request: true
        }
    );
    // Only the inserted jobs' tasks wait.
    assert_eq!(store.queue_depth().await.unwrap(), 3);
}

/// Submissions that arrive together (which a backend may commit together) are each stored
/// once or named as the job their key made: of twelve with one key, one is stored.
async fn submissions_at_once_keep_their_keys(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let key = IdempotencyKey {
        key: "together".into(),
        request_hash: "h".into(),
    };
    let jobs: Vec<_> = (0..24).map(|_| new_job(2, options(), false)).collect();
    let outcomes = futures_util::future::join_all(jobs.iter().enumerate().map(|(i, job)| {
        let (store, key) = (store.clone(), key.clone());
        async move {
            let key = (i % 2 == 0).then_some(&key);
            store.job_insert(job, key, t0).await.unwrap()
        }
    }))
    .await;
    let inserted: Vec<usize> = (0..jobs.len())
        .filter(|&i| outcomes[i] == InsertOutcome::Inserted)
        .collect();
    // Every job without the key, and one with it.
    assert_eq!(inserted.len(), 13, "{outcomes:?}");
    let keyed = *inserted.iter().find(|&&i| i % 2 == 0).unwrap();
    for (i, outcome) in outcomes.iter().enumerate() {
        if i % 2 == 0 && i != keyed {
            assert_eq!(
                *outcome,
                InsertOutcome::Existing {
                    job_id: jobs[keyed].id,
                    same_request: true
                }
            );
            assert!(store.job_get(jobs[i].id).await.unwrap().is_none());
        } else {
            let job = store.job_get(jobs[i].id).await.unwrap().expect("stored");
            assert_eq!(job.total, 2);
        }
    }
    assert_eq!(store.queue_depth().await.unwrap(), 26);
}

/// Jobs of different sizes submitted together (stored together where the backend groups
/// them) keep their own tasks; one settle batch that finishes them all finishes each once,
/// and owes a callback for exactly those with a callback URL, leased together.
async fn one_batch_finishes_many_jobs(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let jobs: Vec<NewJob> = (0..6)
        .map(|k| new_job(k + 1, options(), k % 2 == 0))
        .collect();
    let empty = new_job(0, options(), true);
    let outcomes = futures_util::future::join_all(
        jobs.iter()
            .chain([&empty])
            .map(|job| store.job_insert(job, None, t0)),
    )
    .await;
    assert!(
        outcomes
            .iter()
            .all(|o| *o.as_ref().unwrap() == InsertOutcome::Inserted)
    );
    for (k, job) in jobs.iter().enumerate() {
        let tasks = all_tasks(&store, job.id).await;
        let endpoints: Vec<&str> = tasks.iter().map(|t| t.endpoint.as_str()).collect();
        let expected: Vec<String> = (1..=k + 1)
            .map(|i| format!("http://127.0.0.1:9/t{i}"))
            .collect();
        assert_eq!(endpoints, expected, "job {k}'s tasks");
        assert_eq!(job_of(&store, job.id).await.total, k as u64 + 1);
    }
    // The empty job was finished at once, its callback due at once.
    assert_eq!(job_of(&store, empty.id).await.status, JobStatus::Complete);
    let due = store.callbacks_due(t0, t0 + 1000, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.job_id).collect::<Vec<_>>(), [empty.id]);

    let c = claim(&store, node, 100, t0).await;
    assert_eq!(c.tasks.len(), 21);
    let tf = t0 + 10;
    let batch = c
        .tasks
        .iter()
        .map(|t| settle(t, complete("1"), tf))
        .collect();
    let report = settle_all(&store, node, batch).await;
    assert_eq!(report.complete, 21);
    let mut finished: Vec<JobId> = report.finished.iter().map(|f| f.job_id).collect();
    finished.sort();
    let mut ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    ids.sort();
    assert_eq!(finished, ids);
    for (k, job) in jobs.iter().enumerate() {
        let record = job_of(&store, job.id).await;
        assert_eq!(record.status, JobStatus::Complete, "job {k}");
        assert_eq!(record.complete, k as u64 + 1);
        let f = report.finished.iter().find(|f| f.job_id == job.id).unwrap();
        assert_eq!(f.has_callback, k % 2 == 0);
    }
    let mut due: Vec<JobId> = store
        .callbacks_due(tf, tf + 1000, 10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.job_id)
        .collect();
    due.sort();
    let mut owed: Vec<JobId> = jobs.iter().step_by(2).map(|j| j.id).collect();
    owed.sort();
    assert_eq!(due, owed);
    assert!(
        store
            .callbacks_due(tf, tf + 1000, 10)
            .await
            .unwrap()
            .is_empty(),
        "leased together"
    );
}

async fn job_list_pages_and_filters(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let mut a = new_job(1, options(), false);
    a.owner = Some("o1".into());
    let b = new_job(0, options(), false);
    let mut c = new_job(1, options(), false);
    c.owner = Some("o1".into());
    for j in [&a, &b, &c] {
        insert(&store, j, t0).await;
    }
    let list = |owner: Option<&str>, status: Option<JobStatus>, before: Option<JobId>, limit| {
        let store = store.clone();
        let query = JobListQuery {
            owner: owner.map(str::to_string),
            status,
            metadata: None,
            group: None,
            before,
            limit,
            now: now_millis(),
        };
        async move {
            store
                .job_list(&query)
                .await
                .unwrap()
                .iter()
                .map(|j| j.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(None, None, None, 10).await, vec![c.id, b.id, a.id]);
    assert_eq!(list(None, None, None, 2).await, vec![c.id, b.id]);
    assert_eq!(list(None, None, Some(b.id), 2).await, vec![a.id]);
    assert_eq!(list(Some("o1"), None, None, 10).await, vec![c.id, a.id]);
    assert_eq!(list(Some("o2"), None, None, 10).await, Vec::<JobId>::new());
    assert_eq!(
        list(None, Some(JobStatus::Complete), None, 10).await,
        vec![b.id]
    );
    assert_eq!(
        list(Some("o1"), Some(JobStatus::Pending), Some(c.id), 10).await,
        vec![a.id]
    );
}

async fn tasks_page_pages_and_filters(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let id = insert(&store, &new_job(10, options(), false), t0).await;
    let page = |after, limit, status| {
        let store = store.clone();
        async move {
            store
                .tasks_page(
                    id,
                    &TaskPageQuery {
                        after,
                        limit,
                        status,
                    },
                )
                .await
                .unwrap()
                .iter()
                .map(|t| t.index)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(0, 3, None).await, vec![1, 2, 3]);
    assert_eq!(page(3, 100, None).await, (4..=10).collect::<Vec<_>>());
    assert_eq!(page(10, 100, None).await, Vec::<u64>::new());

    let node = NodeId::random();
    let claim = claim(&store, node, 10, t0).await;
    let batch = claim
        .tasks
        .iter()
        .filter(|t| t.index == 2 || t.index == 5)
        .map(|t| settle(t, complete("1"), t0))
        .collect();
    settle_all(&store, node, batch).await;
    assert_eq!(page(0, 100, Some(TaskStatus::Complete)).await, vec![2, 5]);
    assert_eq!(page(2, 100, Some(TaskStatus::Complete)).await, vec![5]);
    assert_eq!(page(0, 3, Some(TaskStatus::Running)).await, vec![1, 3, 4]);
    assert!(
        store
            .tasks_page(
                JobId::generate(),
                &TaskPageQuery {
                    after: 0,
                    limit: 10,
                    status: None
                }
            )
            .await
            .unwrap()
            .is_empty()
    );
}

async fn claim_takes_due_tasks_in_order(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let id = insert(&store, &new_job(10, options(), false), t0).await;
    let node = NodeId::random();
    // Nothing is due before its time.
    assert!(claim(&store, node, 10, t0 - 1).await.tasks.is_empty());

    let first = claim(&store, node, 3, t0).await;
    assert_eq!(indexes(&first, id), vec![1, 2, 3]);
    assert!(first.tasks.iter().all(|t| t.attempt == 1));
    assert_eq!(first.tasks[0].endpoint, "http://127.0.0.1:9/t1");
    assert_eq!(first.tasks[2].params.get(), r#"{"i":3}"#);
    let job = job_of(&store, id).await;
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!((job.running, job.pending()), (3, 7));
    assert_eq!(store.queue_depth().await.unwrap(), 7);
    let tasks = all_tasks(&store, id).await;
    assert_eq!(tasks[0].status, TaskStatus::Running);
    assert_eq!(tasks[0].attempts, 1);
    assert_eq!(tasks[3].status, TaskStatus::Pending);

    let rest = claim(&store, node, 100, t0).await;
    assert_eq!(indexes(&rest, id), (4..=10).collect::<Vec<_>>());
    assert_eq!(rest.next_due, None);
    assert_eq!(store.queue_depth().await.unwrap(), 0);
    assert!(claim(&store, node, 100, t0).await.tasks.is_empty());
    assert!(claim(&store, node, 0, t0).await.tasks.is_empty());
}

async fn claim_shares_fairly_between_jobs(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let big = insert(&store, &new_job(100, options(), false), t0).await;
    let small = insert(&store, &new_job(10, options(), false), t0).await;
    let node = NodeId::random();
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(indexes(&c, big), vec![1, 2, 3, 4, 5]);
    assert_eq!(indexes(&c, small), vec![1, 2, 3, 4, 5]);
    // The tasks of each job come together, in order.
    let ids: Vec<JobId> = c.tasks.iter().map(|t| t.job_id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);

    // What a job cannot use goes to the others: the small one has 5 left.
    let c = claim(&store, node, 20, t0).await;
    assert_eq!(indexes(&c, small), vec![6, 7, 8, 9, 10]);
    assert_eq!(indexes(&c, big).len(), 15);
}

/// Owners (API tokens) share a claim first, then their jobs; an owner with no room left
/// under its limit gets nothing, and one with a little gets that much.
async fn claim_shares_between_owners_first(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let owned = |owner: &str| {
        let mut job = new_job(50, options(), false);
        job.owner = Some(owner.to_string());
        job
    };
    let a1 = insert(&store, &owned("a"), t0).await;
    let a2 = insert(&store, &owned("a"), t0).await;
    let a3 = insert(&store, &owned("a"), t0).await;
    let b = insert(&store, &owned("b"), t0).await;
    let node = NodeId::random();
    let c = claim(&store, node, 12, t0).await;
    for (job, n) in [(a1, 2), (a2, 2), (a3, 2), (b, 6)] {
        assert_eq!(indexes(&c, job).len(), n, "{job}");
    }
    assert!(
        c.tasks
            .iter()
            .all(|t| t.owner.as_deref() == Some(if t.job_id == b { "b" } else { "a" }))
    );

    // A at its limit (4 in flight, at most 4): B alone; then A with one place left.
    let limits = |a: u64| doparallel::store::plan::OwnerLimits {
        max_in_flight: Some(4),
        in_flight: std::collections::HashMap::from([("a".to_string(), a)]),
    };
    let c = store
        .tasks_claim(&ClaimParams {
            limit: 10,
            now: t0,
            node,
            lease_until: t0 + LEASE,
            skip_jobs: Vec::new(),
            priority_max_wait: 60_000,
            group_concurrency: None,
            owners: limits(4),
        })
        .await
        .unwrap();
    assert_eq!(indexes(&c, b).len(), 4);
    assert_eq!(c.tasks.len(), 4, "nothing of a");
    let c = store
        .tasks_claim(&ClaimParams {
            limit: 10,
            now: t0,
            node,
            lease_until: t0 + LEASE,
            skip_jobs: Vec::new(),
            priority_max_wait: 60_000,
            group_concurrency: None,
            owners: limits(3),
        })
        .await
        .unwrap();
    let of_a = c.tasks.iter().filter(|t| t.job_id != b).count();
    assert_eq!(of_a, 1, "one place left for a");
    assert_eq!(indexes(&c, b).len(), 4);
}

async fn claim_serves_a_new_job_next(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let big = insert(&store, &new_job(100, options(), false), t0).await;
    assert_eq!(indexes(&claim(&store, node, 10, t0).await, big).len(), 10);
    let late = insert(&store, &new_job(20, options(), false), t0 + 1).await;
    // The newcomer was never served: it is first in line and gets its equal share.
    let c = claim(&store, node, 10, t0 + 2).await;
    assert_eq!(indexes(&c, late), vec![1, 2, 3, 4, 5]);
    assert_eq!(indexes(&c, big), vec![11, 12, 13, 14, 15]);
    // A claim too small for both serves the least recently served first.
    let c = claim(&store, node, 1, t0 + 3).await;
    assert_eq!(c.tasks.len(), 1);
    let c2 = claim(&store, node, 1, t0 + 4).await;
    assert_eq!(c2.tasks.len(), 1);
    assert_ne!(c.tasks[0].job_id, c2.tasks[0].job_id, "round robin");
}

async fn claim_respects_job_concurrency(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let opts = JobOptions {
        concurrency: Some(2),
        ..options()
    };
    let id = insert(&store, &new_job(10, opts, false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(indexes(&c, id), vec![1, 2]);
    assert!(claim(&store, node, 10, t0).await.tasks.is_empty());
    // One settled frees one place.
    settle_all(&store, node, vec![settle(&c.tasks[0], complete("1"), t0)]).await;
    assert_eq!(indexes(&claim(&store, node, 10, t0).await, id), vec![3]);
    assert!(claim(&store, node, 10, t0).await.tasks.is_empty());
    // A retry frees its place too, while it waits.
    settle_all(
        &store,
        node,
        vec![settle(&c.tasks[1], retry(t0 + 60_000), t0)],
    )
    .await;
    assert_eq!(indexes(&claim(&store, node, 10, t0).await, id), vec![4]);
    assert_eq!(job_of(&store, id).await.running, 2);
}

async fn claim_skips_jobs(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let a = insert(&store, &new_job(3, options(), false), t0).await;
    let b = insert(&store, &new_job(3, options(), false), t0).await;
    let c = claim_skipping(&store, node, 10, t0, vec![a]).await;
    assert!(indexes(&c, a).is_empty());
    assert_eq!(indexes(&c, b), vec![1, 2, 3]);
    let c = claim_skipping(&store, node, 10, t0, vec![a, b]).await;
    assert!(c.tasks.is_empty());
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(indexes(&c, a), vec![1, 2, 3]);
}

async fn claim_reports_next_due_in_backoff(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(1, options(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let report = settle_all(
        &store,
        node,
        vec![settle(&c.tasks[0], retry(t0 + 5000), t0 + 1)],
    )
    .await;
    assert_eq!(report.retried, 1);
    let task = &all_tasks(&store, id).await[0];
    assert_eq!(task.status, TaskStatus::Pending);
    assert_eq!(task.attempts, 1);
    assert_eq!(task.error.as_ref().unwrap().get(), r#"{"kind":"timeout"}"#);
    assert_eq!(task.finished_at, None);
    assert_eq!(job_of(&store, id).await.running, 0);

    let waiting = claim(&store, node, 10, t0 + 10).await;
    assert!(waiting.tasks.is_empty());
    assert_eq!(waiting.next_due, Some(t0 + 5000));
    let due = claim(&store, node, 10, t0 + 5000).await;
    assert_eq!(indexes(&due, id), vec![1]);
    assert_eq!(due.tasks[0].attempt, 2, "the retry is the second attempt");
}

async fn settle_complete_failed_retry(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(3, options(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let report = settle_all(
        &store,
        node,
        vec![
            settle(&c.tasks[0], complete(r#"{"ok":true}"#), t0 + 1),
            settle(&c.tasks[1], failed(), t0 + 2),
            settle(&c.tasks[2], retry(t0 + 100), t0 + 3),
        ],
    )
    .await;
    assert_eq!((report.complete, report.failed, report.retried), (1, 1, 1));
    assert!(report.finished.is_empty());
    let tasks = all_tasks(&store, id).await;
    assert_eq!(tasks[0].status, TaskStatus::Complete);
    assert_eq!(tasks[0].result.as_ref().unwrap().get(), r#"{"ok":true}"#);
    assert_eq!(tasks[0].finished_at, Some(t0 + 1));
    assert_eq!(tasks[1].status, TaskStatus::Failed);
    assert_eq!(
        tasks[1].error.as_ref().unwrap().get(),
        r#"{"kind":"http_status","http_status":404}"#
    );
    assert!(tasks[1].result.is_none());
    assert_eq!(tasks[1].attempts, 1);
    assert_eq!(tasks[1].latency_ms, Some(7));
    assert_eq!(tasks[1].finished_at, Some(t0 + 2));
    assert_eq!(tasks[2].status, TaskStatus::Pending);
    let job = job_of(&store, id).await;
    assert_eq!(
        (job.status, job.running, job.complete, job.failed),
        (JobStatus::Running, 0, 1, 1)
    );
    assert_eq!(store.queue_depth().await.unwrap(), 1);
    // An empty batch changes nothing.
    assert_eq!(applied(&settle_all(&store, node, Vec::new()).await), 0);
}

async fn settle_ignores_stale_attempt_and_wrong_node(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let (node, other) = (NodeId::random(), NodeId::random());
    let id = insert(&store, &new_job(1, options(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let task = &c.tasks[0];

    let mut stale = settle(task, complete("\"stale\""), t0);
    stale.attempt += 1;
    assert_eq!(applied(&settle_all(&store, node, vec![stale]).await), 0);
    assert_eq!(
        applied(&settle_all(&store, other, vec![settle(task, complete("\"other\""), t0)]).await),
        0,
        "another node's answer is refused"
    );
    assert_eq!(all_tasks(&store, id).await[0].status, TaskStatus::Running);

    let report = settle_all(&store, node, vec![settle(task, complete("\"mine\""), t0)]).await;
    assert_eq!(report.complete, 1);
    assert_eq!(report.finished.len(), 1);
    // Each result is stored once: the same outcome again changes nothing.
    let again = settle_all(&store, node, vec![settle(task, complete("\"again\""), t0)]).await;
    assert_eq!(applied(&again), 0);
    assert!(again.finished.is_empty());
    let stored = &all_tasks(&store, id).await[0];
    assert_eq!(stored.result.as_ref().unwrap().get(), "\"mine\"");
    let job = job_of(&store, id).await;
    assert_eq!((job.complete, job.running), (1, 0));
    // An outcome for a job that no longer exists is skipped.
    let mut gone = settle(task, complete("1"), t0);
    gone.job_id = JobId::generate();
    assert_eq!(applied(&settle_all(&store, node, vec![gone]).await), 0);
}

async fn fan_in_finishes_a_job_exactly_once(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(3, options(), true), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let first = settle_all(
        &store,
        node,
        vec![
            settle(&c.tasks[0], complete("1"), t0 + 1),
            settle(&c.tasks[1], complete("2"), t0 + 2),
        ],
    )
    .await;
    assert!(first.finished.is_empty());
    assert_eq!(
        job_of(&store, id).await.callback.state,
        CallbackState::Pending
    );
    assert!(
        store
            .callbacks_due(t0 + 10, t0 + 20, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let last = settle_all(
        &store,
        node,
        vec![settle(&c.tasks[2], complete("3"), t0 + 9)],
    )
    .await;
    assert_eq!(last.finished.len(), 1);
    assert_eq!(last.finished[0].job_id, id);
    assert_eq!(last.finished[0].status, JobStatus::Complete);
    assert!(last.finished[0].has_callback);
    let job = job_of(&store, id).await;
    assert_eq!(job.status, JobStatus::Complete);
    assert_eq!(job.finished_at, Some(t0 + 9));
    assert_eq!((job.complete, job.running), (3, 0));
    // Its callback record was written with the final status, due at once.
    assert_eq!(store.callback_next_due().await.unwrap(), Some(t0 + 9));
    let due = store.callbacks_due(t0 + 9, t0 + 100, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].url, "http://127.0.0.1:9/cb");

    // A whole job in one batch finishes once; a job without callback has no record.
    let quiet = insert(&store, &new_job(2, options(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let report = settle_all(
        &store,
        node,
        c.tasks
            .iter()
            .map(|t| settle(t, complete("1"), t0 + 50))
            .collect(),
    )
    .await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(report.finished[0].job_id, quiet);
    assert!(!report.finished[0].has_callback);
    assert_eq!(
        job_of(&store, quiet).await.callback.state,
        CallbackState::None
    );
    // Only the first job's delivery (its lease ran out) is due.
    let due = store.callbacks_due(t0 + 1000, t0 + 2000, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.job_id).collect::<Vec<_>>(), vec![id]);
}

async fn fan_in_tolerated_failures(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let tolerant = JobOptions {
        tolerated_failures: 1,
        ..options()
    };
    let ok = insert(&store, &new_job(2, tolerant, false), t0).await;
    let strict = insert(&store, &new_job(2, options(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let batch = c
        .tasks
        .iter()
        .map(|t| {
            let outcome = if t.index == 1 {
                failed()
            } else {
                complete("1")
            };
            settle(t, outcome, t0)
        })
        .collect();
    let report = settle_all(&store, node, batch).await;
    assert_eq!((report.complete, report.failed), (2, 2));
    let finished: std::collections::HashMap<JobId, JobStatus> = report
        .finished
        .iter()
        .map(|f| (f.job_id, f.status))
        .collect();
    let expected = [(ok, JobStatus::Complete), (strict, JobStatus::Failed)].into();
    assert_eq!(finished, expected);
    assert_eq!(job_of(&store, ok).await.status, JobStatus::Complete);
    assert_eq!(job_of(&store, strict).await.status, JobStatus::Failed);
}

async fn failures_are_numbered_in_order(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(4, options(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let task = |i: u64| c.tasks.iter().find(|t| t.index == i).unwrap();
    settle_all(&store, node, vec![settle(task(3), failed(), t0)]).await;
    settle_all(
        &store,
        node,
        vec![
            settle(task(1), failed(), t0),
            settle(task(2), complete("1"), t0),
            settle(task(4), failed(), t0),
        ],
    )
    .await;
    let since = |after, limit| {
        let store = store.clone();
        async move {
            store
                .tasks_failed_since(id, after, limit)
                .await
                .unwrap()
                .iter()
                .map(|f| (f.fail_seq, f.task.index))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(since(0, 10).await, vec![(1, 3), (2, 1), (3, 4)]);
    assert_eq!(since(1, 10).await, vec![(2, 1), (3, 4)]);
    assert_eq!(since(0, 1).await, vec![(1, 3)]);
    assert!(since(3, 10).await.is_empty());
    let failed = store.tasks_failed_since(id, 0, 1).await.unwrap();
    assert_eq!(failed[0].task.status, TaskStatus::Failed);
    assert!(failed[0].task.error.is_some());
}

async fn leases_renew_and_expire(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let (a, b) = (NodeId::random(), NodeId::random());
    let id = insert(&store, &new_job(3, options(), false), t0).await;
    let c = store
        .tasks_claim(&ClaimParams {
            limit: 2,
            now: t0,
            node: a,
            lease_until: t0 + 1000,
            skip_jobs: Vec::new(),
            priority_max_wait: 60_000,
            group_concurrency: None,
            owners: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(c.tasks.len(), 2);
    assert_eq!(store.tasks_renew(a, t0 + 5000).await.unwrap(), 2);
    assert_eq!(store.tasks_renew(b, t0 + 5000).await.unwrap(), 0);
    // Renewed: not expired at the old lease's end, nor at the new one's.
    assert_eq!(store.tasks_expire(t0 + 2000).await.unwrap(), 0);
    assert_eq!(store.tasks_expire(t0 + 5000).await.unwrap(), 0);

    // Node a stops renewing: its tasks are taken back, the interrupted attempt not counted.
    assert_eq!(store.tasks_expire(t0 + 6000).await.unwrap(), 2);
    assert_eq!(store.tasks_expire(t0 + 6000).await.unwrap(), 0);
    let tasks = all_tasks(&store, id).await;
    assert!(tasks.iter().all(|t| t.status == TaskStatus::Pending));
    assert!(tasks.iter().all(|t| t.attempts == 0));
    assert_eq!(job_of(&store, id).await.running, 0);
    assert_eq!(store.queue_depth().await.unwrap(), 3);

    // Node b calls them again; a's late answer is refused, b's is stored.
    let again = claim(&store, b, 10, t0 + 6000).await;
    assert_eq!(indexes(&again, id), vec![1, 2, 3]);
    assert!(again.tasks.iter().all(|t| t.attempt == 1));
    let late = settle_all(
        &store,
        a,
        vec![settle(&c.tasks[0], complete("\"late\""), t0 + 6001)],
    )
    .await;
    assert_eq!(applied(&late), 0);
    let report = settle_all(
        &store,
        b,
        again
            .tasks
            .iter()
            .map(|t| settle(t, complete("\"b\""), t0 + 6002))
            .collect(),
    )
    .await;
    assert_eq!(report.complete, 3);
    assert_eq!(report.finished.len(), 1);
    let tasks = all_tasks(&store, id).await;
    assert!(
        tasks
            .iter()
            .all(|t| t.result.as_ref().unwrap().get() == "\"b\"")
    );
    // Nothing left running: nothing to renew or take back.
    assert_eq!(store.tasks_renew(b, t0 + 9000).await.unwrap(), 0);
    assert_eq!(store.tasks_expire(t0 + 99_000).await.unwrap(), 0);
}

async fn two_nodes_never_claim_the_same_task(store: Arc<dyn Store>) {
    const TASKS: usize = 300;
    let t0 = now_millis();
    let id = insert(&store, &new_job(TASKS, options(), false), t0).await;
    let claimed = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..2 {
        let (store, claimed) = (store.clone(), claimed.clone());
        handles.push(tokio::spawn(async move {
            let node = NodeId::random();
            let mut mine = Vec::new();
            for _ in 0..2000 {
                if claimed.load(Ordering::SeqCst) >= TASKS {
                    break;
                }
                let c = claim(&store, node, 7, t0).await;
                claimed.fetch_add(c.tasks.len(), Ordering::SeqCst);
                // Complete half of them at once, so that settles and claims interleave.
                let batch = c
                    .tasks
                    .iter()
                    .filter(|t| t.index % 2 == 0)
                    .map(|t| settle(t, complete("1"), t0))
                    .collect();
                settle_all(&store, node, batch).await;
                mine.extend(c.tasks);
                tokio::task::yield_now().await;
            }
            (node, mine)
        }));
    }
    let mut seen = HashSet::new();
    let mut owners = Vec::new();
    for handle in handles {
        let (node, mine) = handle.await.unwrap();
        for t in &mine {
            assert!(seen.insert(t.index), "task {} was claimed twice", t.index);
        }
        owners.push((node, mine));
    }
    assert_eq!(seen.len(), TASKS);
    // Each node settles the rest of its own; the other node's answers are refused.
    let (a, b) = (&owners[0], &owners[1]);
    if let Some(t) = a.1.iter().find(|t| t.index % 2 == 1) {
        assert_eq!(
            applied(&settle_all(&store, b.0, vec![settle(t, complete("1"), t0)]).await),
            0
        );
    }
    for (node, mine) in &owners {
        let batch = mine
            .iter()
            .filter(|t| t.index % 2 == 1)
            .map(|t| settle(t, complete("1"), t0))
            .collect();
        settle_all(&store, *node, batch).await;
    }
    let job = job_of(&store, id).await;
    assert_eq!(job.status, JobStatus::Complete);
    assert_eq!((job.complete, job.running), (TASKS as u64, 0));
}

async fn two_nodes_share_a_job_concurrency(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let opts = JobOptions {
        concurrency: Some(5),
        ..options()
    };
    let id = insert(&store, &new_job(50, opts, false), t0).await;
    let claims: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let node = NodeId::random();
                let mut total = 0;
                for _ in 0..10 {
                    total += claim(&store, node, 10, t0).await.tasks.len();
                }
                total
            })
        })
        .collect();
    let mut total = 0;
    for c in claims {
        total += c.await.unwrap();
    }
    assert_eq!(total, 5, "the job's concurrency holds across nodes");
    assert_eq!(job_of(&store, id).await.running, 5);
}

async fn callback_outbox(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    assert_eq!(store.callback_next_due().await.unwrap(), None);
    let id = insert(&store, &new_job(1, options(), true), t0).await;
    assert_eq!(
        store.callback_next_due().await.unwrap(),
        None,
        "owed once finished"
    );
    let c = claim(&store, node, 10, t0).await;
    let tf = t0 + 10;
    settle_all(&store, node, vec![settle(&c.tasks[0], complete("1"), tf)]).await;
    assert_eq!(store.callback_next_due().await.unwrap(), Some(tf));
    assert!(
        store
            .callbacks_due(tf - 1, tf + 1000, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Leased: nobody else gets it until the lease ends.
    let due = store.callbacks_due(tf, tf + 1000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].job_id, due[0].attempts), (id, 0));
    assert!(
        store
            .callbacks_due(tf + 1, tf + 2000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.callback_next_due().await.unwrap(), Some(tf + 1000));
    // The lease ran out (the sender died): due again, the attempt not counted.
    let due = store.callbacks_due(tf + 1000, tf + 2000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].attempts, 0);

    let record = |attempts, outcome| CallbackRecord {
        job_id: id,
        attempts,
        now: tf + 1500,
        outcome,
    };
    let retry_at = tf + 5000;
    assert!(
        store
            .callback_record(&record(
                1,
                CallbackOutcome::Retry {
                    at: retry_at,
                    error: "HTTP 503".into()
                }
            ))
            .await
            .unwrap()
    );
    // The same attempt recorded again (another node tried too) changes nothing.
    assert!(
        !store
            .callback_record(&record(1, CallbackOutcome::Delivered))
            .await
            .unwrap()
    );
    let job = job_of(&store, id).await;
    assert_eq!(job.callback.state, CallbackState::Pending);
    assert_eq!(job.callback.attempts, 1);
    assert_eq!(job.callback.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(store.callback_next_due().await.unwrap(), Some(retry_at));
    assert!(
        store
            .callbacks_due(retry_at - 1, retry_at + 1000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let due = store
        .callbacks_due(retry_at, retry_at + 1000, 10)
        .await
        .unwrap();
    assert_eq!(due[0].attempts, 1);

    assert!(
        store
            .callback_record(&record(2, CallbackOutcome::Delivered))
            .await
            .unwrap()
    );
    let job = job_of(&store, id).await;
    assert_eq!(job.callback.state, CallbackState::Delivered);
    assert_eq!(job.callback.attempts, 2);
    assert_eq!(job.callback.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(store.callback_next_due().await.unwrap(), None);
    assert!(
        store
            .callbacks_due(retry_at + 99_000, retry_at + 100_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !store
            .callback_record(&record(3, CallbackOutcome::Delivered))
            .await
            .unwrap(),
        "a delivered callback takes no more attempts"
    );

    // Several due at once: no more than the limit, earliest first.
    let mut ids = Vec::new();
    for k in 0..3 {
        ids.push(insert(&store, &new_job(0, options(), true), t0 + k).await);
    }
    let due = store.callbacks_due(t0 + 10, t0 + 1000, 2).await.unwrap();
    assert_eq!(due.iter().map(|d| d.job_id).collect::<Vec<_>>(), ids[..2]);
    let due = store.callbacks_due(t0 + 10, t0 + 1000, 2).await.unwrap();
    assert_eq!(due.iter().map(|d| d.job_id).collect::<Vec<_>>(), ids[2..]);
}

async fn callback_gave_up(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let id = insert(&store, &new_job(0, options(), true), t0).await;
    let due = store.callbacks_due(t0, t0 + 1000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert!(
        store
            .callback_record(&CallbackRecord {
                job_id: id,
                attempts: 1,
                now: t0 + 1,
                outcome: CallbackOutcome::GaveUp {
                    error: "410 Gone".into()
                },
            })
            .await
            .unwrap()
    );
    let job = job_of(&store, id).await;
    assert_eq!(job.callback.state, CallbackState::Failed);
    assert_eq!(job.callback.last_error.as_deref(), Some("410 Gone"));
    assert_eq!(store.callback_next_due().await.unwrap(), None);
    assert!(
        !store
            .callback_record(&CallbackRecord {
                job_id: JobId::generate(),
                attempts: 1,
                now: t0,
                outcome: CallbackOutcome::Delivered,
            })
            .await
            .unwrap(),
        "an unknown job has no callback to record"
    );
}

async fn cancel_stops_everything(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(5, options(), true), t0).await;
    let c = claim(&store, node, 2, t0).await;
    assert_eq!(c.tasks.len(), 2);

    match store.job_cancel(id, t0 + 10).await.unwrap() {
        CancelOutcome::Cancelled {
            has_callback,
            newly,
            tasks,
        } => assert_eq!((has_callback, newly, tasks), (true, true, 5)),
        other => panic!("unexpected {other:?}"),
    }
    let job = job_of(&store, id).await;
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.finished_at, Some(t0 + 10));
    assert_eq!(
        (job.running, job.cancelled, job.complete, job.pending()),
        (0, 5, 0, 0)
    );
    let tasks = all_tasks(&store, id).await;
    assert!(tasks.iter().all(|t| t.status == TaskStatus::Cancelled));
    assert!(tasks.iter().all(|t| t.finished_at == Some(t0 + 10)));

    // A late answer of a call that was in flight is ignored.
    let late = settle_all(
        &store,
        node,
        vec![settle(&c.tasks[0], complete("1"), t0 + 11)],
    )
    .await;
    assert_eq!(applied(&late), 0);
    assert!(late.finished.is_empty());
    assert_eq!(job_of(&store, id).await.complete, 0);
    // Nothing to claim, renew or take back; its callback is due.
    assert!(claim(&store, node, 10, t0 + 20).await.tasks.is_empty());
    assert_eq!(store.tasks_renew(node, t0 + 99_000).await.unwrap(), 0);
    assert_eq!(store.tasks_expire(t0 + 99_000).await.unwrap(), 0);
    assert_eq!(store.queue_depth().await.unwrap(), 0);
    let due = store.callbacks_due(t0 + 10, t0 + 1000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].job_id, id);

    // Cancelling again is harmless; a job finished otherwise, or unknown, is left alone.
    assert!(matches!(
        store.job_cancel(id, t0 + 30).await.unwrap(),
        CancelOutcome::Cancelled {
            newly: false,
            tasks: 0,
            ..
        }
    ));
    let done = insert(&store, &new_job(0, options(), false), t0).await;
    assert!(matches!(
        store.job_cancel(done, t0).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobStatus::Complete)
    ));
    assert!(matches!(
        store.job_cancel(JobId::generate(), t0).await.unwrap(),
        CancelOutcome::NotFound
    ));
    // A pending job without callback.
    let quiet = insert(&store, &new_job(2, options(), false), t0).await;
    assert!(matches!(
        store.job_cancel(quiet, t0).await.unwrap(),
        CancelOutcome::Cancelled {
            has_callback: false,
            newly: true,
            tasks: 2
        }
    ));
}

async fn delete_finished_jobs_only(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(1, options(), true), t0).await;
    assert_eq!(
        store.job_delete(id).await.unwrap(),
        DeleteOutcome::NotFinished
    );
    run_to_end(&store, node, t0).await;
    assert_eq!(
        store.job_delete(id).await.unwrap(),
        DeleteOutcome::CallbackPending
    );
    store.callbacks_due(t0, t0 + 1000, 10).await.unwrap();
    store
        .callback_record(&CallbackRecord {
            job_id: id,
            attempts: 1,
            now: t0,
            outcome: CallbackOutcome::Delivered,
        })
        .await
        .unwrap();
    assert_eq!(store.job_delete(id).await.unwrap(), DeleteOutcome::Deleted);
    assert!(store.job_get(id).await.unwrap().is_none());
    assert!(all_tasks(&store, id).await.is_empty());
    assert_eq!(store.job_delete(id).await.unwrap(), DeleteOutcome::NotFound);
    assert_eq!(store.callback_next_due().await.unwrap(), None);
    // Without a callback, a finished job goes at once.
    let quiet = insert(&store, &new_job(0, options(), false), t0).await;
    assert_eq!(
        store.job_delete(quiet).await.unwrap(),
        DeleteOutcome::Deleted
    );
}

async fn purge_old_finished_jobs(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let old: Vec<JobId> = {
        let mut ids = Vec::new();
        for k in 0..3 {
            ids.push(insert(&store, &new_job(0, options(), false), t0 + k).await);
        }
        ids
    };
    let owed = insert(&store, &new_job(0, options(), true), t0).await;
    let running = insert(&store, &new_job(2, options(), false), t0).await;
    let recent = insert(&store, &new_job(0, options(), false), t0 + 100).await;

    assert_eq!(
        store.jobs_purge(t0, 10).await.unwrap(),
        0,
        "none finished before t0"
    );
    assert_eq!(
        store.jobs_purge(t0 + 50, 2).await.unwrap(),
        2,
        "at most the limit"
    );
    assert_eq!(store.jobs_purge(t0 + 50, 10).await.unwrap(), 1);
    for id in &old {
        assert!(store.job_get(*id).await.unwrap().is_none());
    }
    // Its callback is still owed; unfinished; too recent.
    for id in [owed, running, recent] {
        assert!(store.job_get(id).await.unwrap().is_some());
    }
    store.callbacks_due(t0, t0 + 1000, 10).await.unwrap();
    store
        .callback_record(&CallbackRecord {
            job_id: owed,
            attempts: 1,
            now: t0,
            outcome: CallbackOutcome::GaveUp {
                error: "gone".into(),
            },
        })
        .await
        .unwrap();
    assert_eq!(store.jobs_purge(t0 + 50, 10).await.unwrap(), 1);
    assert!(store.job_get(owed).await.unwrap().is_none());
    assert!(store.job_get(recent).await.unwrap().is_some());
}

async fn recover_takes_back_expired_leases(store: Arc<dyn Store>) {
    // A previous process claimed these and died: their leases have run out. (What becomes
    // of leases still running differs by design: a backend only one process opens takes
    // them all back, a shared one leaves them to their nodes; see `Store::tasks_recover`.)
    let t0 = now_millis() - 60_000;
    let dead = NodeId::random();
    let id = insert(&store, &new_job(3, options(), false), t0).await;
    let c = store
        .tasks_claim(&ClaimParams {
            limit: 2,
            now: t0,
            node: dead,
            lease_until: t0 + 1000,
            skip_jobs: Vec::new(),
            priority_max_wait: 60_000,
            group_concurrency: None,
            owners: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(c.tasks.len(), 2);
    // An attempt awaiting its report is nobody's call: it stays as it is.
    let awaited = insert(&store, &new_job(1, options(), false), t0).await;
    let a = claim(&store, dead, 1, t0).await;
    assert_eq!(indexes(&a, awaited), vec![1]);
    let deadline = now_millis() + 600_000;
    settle_all(
        &store,
        dead,
        vec![settle(
            &a.tasks[0],
            SettleOutcome::Await {
                deadline,
                until: deadline,
            },
            t0,
        )],
    )
    .await;
    assert_eq!(store.tasks_recover().await.unwrap(), 2);
    assert_eq!(
        all_tasks(&store, awaited).await[0].status,
        TaskStatus::Running
    );
    // ... and still counted, so its report or its deadline can finish the job.
    assert_eq!(job_of(&store, awaited).await.running, 1);
    let tasks = all_tasks(&store, id).await;
    assert!(tasks.iter().all(|t| t.status == TaskStatus::Pending));
    assert!(tasks.iter().all(|t| t.attempts == 0));
    assert_eq!(job_of(&store, id).await.running, 0);
    let node = NodeId::random();
    let again = claim(&store, node, 10, now_millis()).await;
    assert_eq!(indexes(&again, id), vec![1, 2, 3]);
    assert!(again.tasks.iter().all(|t| t.attempt == 1));
    assert_eq!(
        applied(&settle_all(&store, dead, vec![settle(&c.tasks[0], complete("1"), t0)]).await),
        0
    );
}

async fn report(
    store: &Arc<dyn Store>,
    task: &ClaimedTask,
    attempt: u32,
    outcome: SettleOutcome,
    now: Millis,
) -> ReportOutcome {
    store
        .tasks_report(&TaskReport {
            job_id: task.job_id,
            index: task.index,
            attempt,
            now,
            outcome,
        })
        .await
        .unwrap()
}

async fn awaited_attempts_wait_for_their_report(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(2, options(), true), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let (first, second) = (&c.tasks[0], &c.tasks[1]);

    // The endpoint answered 202: the attempt stays running, held by no node.
    let r = settle_all(
        &store,
        node,
        vec![settle(
            first,
            SettleOutcome::Await {
                deadline: t0 + 60_000,
                until: t0 + 60_000,
            },
            t0 + 1,
        )],
    )
    .await;
    assert_eq!((r.awaiting, applied(&r)), (1, 0));
    let job = job_of(&store, id).await;
    assert_eq!(
        (job.running, job.complete),
        (2, 0),
        "still counted as running"
    );
    let task = &all_tasks(&store, id).await[0];
    assert_eq!((task.status, task.attempts), (TaskStatus::Running, 1));
    assert_eq!(task.finished_at, None);
    // Not this node's any more: not renewed, not taken back when its lease would run out.
    assert_eq!(store.tasks_renew(node, t0 + LEASE).await.unwrap(), 1);
    assert_eq!(
        applied(&settle_all(&store, node, vec![settle(first, complete("1"), t0 + 2)]).await),
        0,
        "only a report settles an awaited attempt"
    );

    // Its report, through any node.
    let reported = r#"{"late":true,"n":1.50}"#;
    match report(&store, first, 1, complete(reported), t0 + 3).await {
        ReportOutcome::Applied(r) => assert_eq!((r.complete, r.finished.len()), (1, 0)),
        other => panic!("unexpected {other:?}"),
    }
    let task = &all_tasks(&store, id).await[0];
    assert_eq!(task.status, TaskStatus::Complete);
    assert_eq!(task.result.as_ref().unwrap().get(), reported);
    assert_eq!(task.finished_at, Some(t0 + 3));
    assert!(matches!(
        report(&store, first, 1, complete("2"), t0 + 4).await,
        ReportOutcome::AlreadyReported
    ));
    assert!(matches!(
        report(&store, first, 2, complete("2"), t0 + 4).await,
        ReportOutcome::Unknown
    ));

    // A report may overtake the 202 of its own call: it is stored, the call's own outcome
    // then is not. It was the last task: the job finishes, with its callback.
    match report(&store, second, 1, failed(), t0 + 5).await {
        ReportOutcome::Applied(r) => {
            assert_eq!(r.failed, 1);
            assert_eq!(r.finished.len(), 1);
            assert_eq!(r.finished[0].status, JobStatus::Failed);
            assert!(r.finished[0].has_callback);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        applied(&settle_all(&store, node, vec![settle(second, complete("1"), t0 + 6)]).await),
        0
    );
    let failures = store.tasks_failed_since(id, 0, 10).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].fail_seq, failures[0].task.index), (1, 2));
    let job = job_of(&store, id).await;
    assert_eq!(
        (job.status, job.running, job.complete, job.failed),
        (JobStatus::Failed, 0, 1, 1)
    );
    assert_eq!(store.callback_next_due().await.unwrap(), Some(t0 + 5));
    let mut unknown = second.clone();
    unknown.job_id = JobId::generate();
    assert!(matches!(
        report(&store, &unknown, 1, complete("1"), t0).await,
        ReportOutcome::Unknown
    ));
}

async fn awaited_attempts_time_out(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let (node, other) = (NodeId::random(), NodeId::random());
    let opts = JobOptions {
        concurrency: Some(1),
        ..options()
    };
    let id = insert(&store, &new_job(2, opts, false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(c.tasks.len(), 1);
    let deadline = t0 + 1000;
    settle_all(
        &store,
        node,
        vec![settle(
            &c.tasks[0],
            SettleOutcome::Await {
                deadline,
                until: deadline,
            },
            t0,
        )],
    )
    .await;
    // It still holds the job's only place.
    assert!(claim(&store, node, 10, t0).await.tasks.is_empty());
    // A lease sweep leaves it alone, even past its deadline.
    assert_eq!(store.tasks_expire(t0 + LEASE * 10).await.unwrap(), 0);
    let overdue = |now, node| {
        let store = store.clone();
        async move {
            store
                .tasks_overdue(&OverdueParams {
                    limit: 10,
                    now,
                    node,
                    lease_until: now + LEASE,
                })
                .await
                .unwrap()
        }
    };
    assert!(overdue(deadline - 1, other).await.is_empty());
    // As the lease sweep asks: nothing overdue just before the deadline, then at it.
    assert_eq!(store.tasks_expire(deadline - 1).await.unwrap(), 0);
    assert!(overdue(deadline - 1, other).await.is_empty());
    assert_eq!(store.tasks_expire(deadline).await.unwrap(), 0);
    let due = overdue(deadline, other).await;
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].job_id, due[0].index, due[0].attempt), (id, 1, 1));
    assert_eq!(due[0].params.get(), r#"{"i":1}"#);
    assert_eq!(due[0].options.concurrency, Some(1));
    // Leased to the node that times it out: nobody else takes it, and it settles it.
    assert!(overdue(deadline + 5, node).await.is_empty());
    let r = settle_all(
        &store,
        other,
        vec![settle(&due[0], retry(deadline), deadline)],
    )
    .await;
    assert_eq!(r.retried, 1);
    let task = &all_tasks(&store, id).await[0];
    assert_eq!((task.status, task.attempts), (TaskStatus::Pending, 1));
    // A report for the attempt that timed out comes too late.
    assert!(matches!(
        report(&store, &c.tasks[0], 1, complete("1"), deadline + 1).await,
        ReportOutcome::Unknown
    ));
    // The place is free again; the retry waits behind the task due earlier.
    let next = claim(&store, node, 10, deadline).await;
    assert_eq!(indexes(&next, id), vec![2]);
    settle_all(
        &store,
        node,
        vec![settle(&next.tasks[0], complete("1"), deadline)],
    )
    .await;
    let again = claim(&store, node, 10, deadline).await;
    assert_eq!(indexes(&again, id), vec![1]);
    assert_eq!(again.tasks[0].attempt, 2);
}

async fn task_token_key_is_stable(store: Arc<dyn Store>) {
    let key = store.task_token_key().await.unwrap();
    assert_eq!(key.len(), 32);
    assert!(key.iter().any(|b| *b != 0));
    assert_eq!(store.task_token_key().await.unwrap(), key);
}

// ---- PostgreSQL only: several processes on one database ----
//
// Each `db.store()` is a store of its own with its own connections, as a separate node
// would have.

/// Parameters and results are kept as the exact text: numbers that DynamoDB's number type
/// or a float would change come back digit for digit.
async fn numbers_round_trip_exactly(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let text = r#"{"big":1e400,"tenth":0.1,"int":12345678901234567890,"neg":-0.0,"e":-0.0e-7,"k":[1.10,2E+3]}"#;
    let mut job = new_job(1, options(), false);
    job.tasks[0].params = raw(text);
    let id = insert(&store, &job, t0).await;
    let node = NodeId::random();
    let c = claim(&store, node, 1, t0).await;
    assert_eq!(c.tasks[0].params.get(), text);
    settle_all(&store, node, vec![settle(&c.tasks[0], complete(text), t0)]).await;
    let stored = all_tasks(&store, id).await;
    assert_eq!(stored[0].result.as_ref().unwrap().get(), text);
}

/// A job of more tasks than one DynamoDB transaction holds (100 items) is claimed and
/// settled whole, and finished once.
async fn jobs_larger_than_a_transaction(store: Arc<dyn Store>) {
    const TASKS: usize = 250;
    let t0 = now_millis();
    let id = insert(&store, &new_job(TASKS, options(), true), t0).await;
    assert_eq!(store.queue_depth().await.unwrap(), TASKS as u64);
    let node = NodeId::random();
    let c = claim(&store, node, 512, t0).await;
    assert_eq!(indexes(&c, id).len(), TASKS);
    let batch = c
        .tasks
        .iter()
        .map(|t| settle(t, complete("1"), t0))
        .collect();
    let report = settle_all(&store, node, batch).await;
    assert_eq!(report.complete, TASKS as u64);
    assert_eq!(report.finished.len(), 1);
    assert_eq!(job_of(&store, id).await.complete, TASKS as u64);
    let last = store
        .tasks_page(
            id,
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

/// Storing a job of 20,000 tasks takes seconds, not minutes.
async fn submission_of_many_tasks(store: Arc<dyn Store>) {
    const TASKS: usize = 20_000;
    let t0 = now_millis();
    let started = std::time::Instant::now();
    let id = insert(&store, &new_job(TASKS, options(), false), t0).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "{TASKS} tasks took {took:?}"
    );
    assert_eq!(store.queue_depth().await.unwrap(), TASKS as u64);
    let last = store
        .tasks_page(
            id,
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

/// The next `n` notices (in any order, sorted), then checks that no more come.
async fn call_settings_travel_with_their_task(store: Arc<dyn Store>) {
    // A task's own call settings are stored with it, come back in reads, and are merged
    // over its job's options (its trace context too) wherever a task is handed out: a
    // claim, and an awaited attempt taken over after its deadline. Secret values are
    // opaque to the store.
    let t0 = now_millis() - 60_000;
    let headers = |pairs: &[(&str, &str)]| -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let job_options = JobOptions {
        method: Some(Method::Get),
        headers: headers(&[("X-Job", "1"), ("X-Both", "job")]),
        secret_headers: headers(&[("Authorization", "v1.sealed.job")]),
        callback_headers: headers(&[("X-Cb", "1")]),
        retry_on: Some(vec![503]),
        trace: Some(JobTrace::from_headers(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("a=b"),
        )),
        ..options()
    };
    let call = TaskCall {
        method: Some(Method::Put),
        headers: headers(&[("x-both", "task")]),
        secret_headers: headers(&[("X-Key", "v1.sealed.task")]),
        aws_sigv4: Some(AwsSigV4 {
            service: "lambda".into(),
            region: "eu-west-1".into(),
        }),
        options: TaskOptions {
            timeout_ms: Some(5),
            retry_on: Some(vec![]),
            ..Default::default()
        },
    };
    let mut job = new_job(2, job_options.clone(), true);
    job.tasks[1].call = Some(Box::new(call.clone()));
    let id = insert(&store, &job, t0).await;
    assert_eq!(job_of(&store, id).await.options, job_options);
    let tasks = all_tasks(&store, id).await;
    assert_eq!(tasks[0].call, None);
    assert_eq!(tasks[1].call.as_ref(), Some(&call));

    let node = NodeId::random();
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(c.tasks.len(), 2);
    assert_eq!(*c.tasks[0].options, job_options);
    let merged = job_options.for_task(&call);
    assert_eq!(*c.tasks[1].options, merged);
    assert_eq!(merged.method, Some(Method::Put));
    assert_eq!(merged.timeout_ms, 5);
    assert_eq!(
        merged.headers,
        headers(&[("X-Job", "1"), ("x-both", "task")])
    );
    assert_eq!(merged.secret_headers.len(), 2);

    // The second attempt waits for a report past its deadline; whoever takes it over calls
    // with the same settings.
    let deadline = t0 + 1000;
    settle_all(
        &store,
        node,
        vec![settle(
            &c.tasks[1],
            SettleOutcome::Await {
                deadline,
                until: deadline,
            },
            t0,
        )],
    )
    .await;
    let taken = store
        .tasks_overdue(&OverdueParams {
            limit: 10,
            now: t0 + 2000,
            node: NodeId::random(),
            lease_until: t0 + 2000 + LEASE,
        })
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].index, 2);
    assert_eq!(*taken[0].options, merged);
}

async fn notices(stream: &mut doparallel::store::Notices, n: usize) -> Vec<Notice> {
    let mut seen = Vec::new();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(notice)) => seen.push(notice),
            other => panic!("expected {n} notices, got {seen:?} then {other:?}"),
        }
    }
    quiet(stream).await;
    seen.sort_by_key(|n| format!("{n:?}"));
    seen
}

/// Checks that no notice comes for a moment (a notice is sent when its transaction
/// commits, so one due would be there by then).
async fn quiet(stream: &mut doparallel::store::Notices) {
    if let Ok(extra) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        panic!("unexpected notice {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_run_once_when_nodes_start_together() {
    let Some(db) = crate::pg::database().await else {
        return;
    };
    // Five nodes start at once on an empty database: one creates the schema, the others
    // wait for it (an advisory lock) and find it done.
    let opened = futures_util::future::join_all((0..5).map(|_| db.store())).await;
    let t0 = now_millis();
    let id = insert(&opened[0], &new_job(1, options(), false), t0).await;
    for store in &opened {
        assert_eq!(job_of(store, id).await.total, 1);
    }
    let migrations: i64 = db
        .query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .await;
    // Each migration once.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(migrations, files as i64);
    let jobs_tables: i64 = db
        .query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'jobs'")
        .await;
    assert_eq!(jobs_tables, 1);
    // A node that starts later finds everything in place.
    assert_eq!(job_of(&db.store().await, id).await.total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notices_reach_every_node() {
    let Some(db) = crate::pg::database().await else {
        return;
    };
    let (a, b) = (db.store().await, db.store().await);
    let mut heard = b
        .listen()
        .await
        .unwrap()
        .expect("a shared backend sends notices");
    let mut own = a
        .listen()
        .await
        .unwrap()
        .expect("a shared backend sends notices");
    let t0 = now_millis();
    let node = NodeId::random();

    insert(&a, &new_job(2, options(), true), t0).await;
    assert_eq!(notices(&mut heard, 1).await, vec![Notice::Work]);
    assert_eq!(
        notices(&mut own, 1).await,
        vec![Notice::Work],
        "a node hears itself too"
    );
    // Claims and settles that finish nothing are not announced.
    let c = claim(&a, node, 1, t0).await;
    settle_all(&a, node, vec![settle(&c.tasks[0], complete("1"), t0)]).await;
    quiet(&mut heard).await;

    // Leases taken back: work for everyone.
    let c = claim(&a, node, 1, t0).await;
    assert_eq!(c.tasks.len(), 1);
    assert_eq!(b.tasks_expire(t0 + LEASE + 1).await.unwrap(), 1);
    assert_eq!(notices(&mut heard, 1).await, vec![Notice::Work]);

    // The job finished: its callback is due.
    let c = claim(&b, node, 1, t0).await;
    let report = settle_all(&b, node, vec![settle(&c.tasks[0], complete("1"), t0)]).await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(notices(&mut heard, 1).await, vec![Notice::CallbackDue]);

    // A cancel: calls stop everywhere, and the callback is due.
    let cancelled = insert(&a, &new_job(3, options(), true), t0).await;
    assert_eq!(notices(&mut heard, 1).await, vec![Notice::Work]);
    a.job_cancel(cancelled, t0).await.unwrap();
    assert_eq!(
        notices(&mut heard, 2).await,
        vec![Notice::CallbackDue, Notice::Cancelled(cancelled)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listening_survives_a_lost_connection() {
    let Some(db) = crate::pg::database().await else {
        return;
    };
    let store = db.store().await;
    let mut stream = store.listen().await.unwrap().unwrap();
    // The server ends the listening connection (a restart, a proxy's idle timeout).
    let ended = db
        .query_scalar(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{}' AND query LIKE 'LISTEN%'",
            db.name
        ))
        .await;
    assert_eq!(ended, 1);
    // Notices sent while it was gone are lost, so the stream asks for a look at everything
    // once it listens again; later notices arrive as before.
    assert_eq!(
        notices(&mut stream, 2).await,
        vec![Notice::CallbackDue, Notice::Work]
    );
    insert(&store, &new_job(1, options(), false), now_millis()).await;
    assert_eq!(notices(&mut stream, 1).await, vec![Notice::Work]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_settling_the_last_tasks_finish_the_job_once() {
    let Some(db) = crate::pg::database().await else {
        return;
    };
    let (a, b) = (db.store().await, db.store().await);
    let (na, nb) = (NodeId::random(), NodeId::random());
    let t0 = now_millis();
    // Many times over, since it is a race: each node settles one of a job's last two tasks
    // at the same moment. Exactly one of them finishes the job, with one callback record,
    // and failures get distinct numbers.
    for round in 0..20 {
        let id = insert(&a, &new_job(2, options(), true), t0).await;
        let ca = claim(&a, na, 1, t0).await;
        let cb = claim(&b, nb, 1, t0).await;
        assert_eq!((ca.tasks.len(), cb.tasks.len()), (1, 1), "round {round}");
        let outcome = || {
            if round % 2 == 0 {
                complete("1")
            } else {
                failed()
            }
        };
        let (ra, rb) = tokio::join!(
            settle_all(&a, na, vec![settle(&ca.tasks[0], outcome(), t0)]),
            settle_all(&b, nb, vec![settle(&cb.tasks[0], outcome(), t0)]),
        );
        assert_eq!(applied(&ra) + applied(&rb), 2);
        assert_eq!(
            ra.finished.len() + rb.finished.len(),
            1,
            "round {round}: finished by exactly one node"
        );
        let job = job_of(&a, id).await;
        let expected = if round % 2 == 0 {
            JobStatus::Complete
        } else {
            JobStatus::Failed
        };
        assert_eq!(job.status, expected);
        let records: i64 = db
            .query_scalar(&format!(
                "SELECT count(*) FROM callbacks c JOIN jobs j ON j.seq = c.job_seq WHERE j.id = '{id}'"
            ))
            .await;
        assert_eq!(records, 1, "round {round}: one callback record");
        if round % 2 == 1 {
            let numbers: Vec<u64> = a
                .tasks_failed_since(id, 0, 10)
                .await
                .unwrap()
                .iter()
                .map(|f| f.fail_seq)
                .collect();
            assert_eq!(numbers, vec![1, 2], "round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_never_lease_the_same_callback() {
    let Some(db) = crate::pg::database().await else {
        return;
    };
    let (a, b) = (db.store().await, db.store().await);
    let t0 = now_millis();
    let mut ids = HashSet::new();
    for _ in 0..40 {
        ids.insert(insert(&a, &new_job(0, options(), true), t0).await);
    }
    let lease = |store: Arc<dyn Store>| async move {
        let mut got = Vec::new();
        for _ in 0..20 {
            got.extend(store.callbacks_due(t0, t0 + 60_000, 3).await.unwrap());
        }
        got
    };
    let (ga, gb) = tokio::join!(lease(a.clone()), lease(b.clone()));
    let mut leased = HashSet::new();
    for due in ga.iter().chain(&gb) {
        assert!(leased.insert(due.job_id), "{} leased twice", due.job_id);
    }
    assert_eq!(leased, ids);
}

#[tokio::test]
async fn postgres_unreachable_database_is_named_without_its_password() {
    // Nothing listens on port 1; no cluster needed.
    let url = "postgres://someone:s3cret-pw@127.0.0.1:1/jobs";
    let Err(e) = doparallel::store::open(url).await else {
        panic!("opened a database on port 1");
    };
    let message = e.to_string();
    assert!(
        matches!(e, doparallel::store::StoreError::Unavailable(_)),
        "{message}"
    );
    assert!(
        message.contains("127.0.0.1:1/jobs as user someone"),
        "{message}"
    );
    assert!(!message.contains("s3cret"), "{message}");

    let Err(e) = doparallel::store::open("postgres://someone:s3cret-pw@127.0.0.1:port/jobs").await
    else {
        panic!("a URL with a bad port opened");
    };
    let message = e.to_string();
    assert!(message.contains("invalid PostgreSQL URL"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");

    let Err(e) = doparallel::store::open("mysql://someone:s3cret-pw@127.0.0.1/jobs").await else {
        panic!("an unknown scheme opened");
    };
    let message = e.to_string();
    assert!(message.contains("\"mysql\""), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
}

// ---- DynamoDB only: separate clients on one table, as separate processes would have ----

/// Two clients claiming one job at once never get the same task (conditional transactions;
/// see `moto.rs` for why moto runs one request at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_two_clients_never_claim_the_same_task() {
    let Some(url) = crate::moto::fresh_table().await else {
        return;
    };
    const TASKS: usize = 120;
    let a = doparallel::store::open(&url).await.unwrap();
    let b = doparallel::store::open(&url).await.unwrap();
    let t0 = now_millis();
    let id = insert(&a, &new_job(TASKS, options(), false), t0).await;
    let drain = |store: Arc<dyn Store>| async move {
        let node = NodeId::random();
        let mut got = Vec::new();
        for _ in 0..200 {
            let c = claim(&store, node, 7, t0).await;
            if c.tasks.is_empty() && store.queue_depth().await.unwrap() == 0 {
                break;
            }
            got.extend(indexes(&c, id));
        }
        got
    };
    let (x, y) = tokio::join!(drain(a.clone()), drain(b.clone()));
    let mut seen = HashSet::new();
    for index in x.iter().chain(&y) {
        assert!(seen.insert(*index), "task {index} was claimed twice");
    }
    assert_eq!(seen.len(), TASKS);
    assert!(!x.is_empty() && !y.is_empty(), "both clients claimed");
    assert_eq!(job_of(&a, id).await.running, TASKS as u64);
}

/// A client's sweep takes back the tasks of another whose lease ran out, and that one's
/// late outcome is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_another_client_takes_over_an_expired_lease() {
    let Some(url) = crate::moto::fresh_table().await else {
        return;
    };
    let a = doparallel::store::open(&url).await.unwrap();
    let b = doparallel::store::open(&url).await.unwrap();
    let t0 = now_millis();
    let (dead, alive) = (NodeId::random(), NodeId::random());
    let id = insert(&a, &new_job(2, options(), false), t0).await;
    let lost = a
        .tasks_claim(&ClaimParams {
            limit: 2,
            now: t0,
            node: dead,
            lease_until: t0 + 1_000,
            skip_jobs: Vec::new(),
            priority_max_wait: 60_000,
            group_concurrency: None,
            owners: Default::default(),
        })
        .await
        .unwrap()
        .tasks;
    assert_eq!(b.tasks_expire(t0 + 2_000).await.unwrap(), 2);
    let again = claim(&b, alive, 5, t0 + 2_000).await;
    assert_eq!(indexes(&again, id), vec![1, 2]);
    let late = settle_all(&a, dead, vec![settle(&lost[0], complete("1"), t0)]).await;
    assert_eq!(applied(&late), 0);
    let batch = again
        .tasks
        .iter()
        .map(|t| settle(t, complete("2"), t0))
        .collect();
    assert_eq!(settle_all(&b, alive, batch).await.finished.len(), 1);
    assert_eq!(job_of(&a, id).await.complete, 2);
}

/// A result too large for a DynamoDB item is stored as a failure that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_refuses_a_result_over_its_item_limit() {
    let Some(url) = crate::moto::fresh_table().await else {
        return;
    };
    let store = doparallel::store::open(&url).await.unwrap();
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(1, options(), false), t0).await;
    let c = claim(&store, node, 1, t0).await;
    let big = format!(
        "\"{}\"",
        "x".repeat(doparallel::store::dynamodb::MAX_RESULT_BYTES)
    );
    let report = settle_all(&store, node, vec![settle(&c.tasks[0], complete(&big), t0)]).await;
    assert_eq!((report.failed, report.finished.len()), (1, 1));
    let error = all_tasks(&store, id).await[0]
        .error
        .as_ref()
        .unwrap()
        .get()
        .to_string();
    assert!(
        error.contains("response_too_large") && error.contains("400 KB"),
        "{error}"
    );
}

/// What a job costs in DynamoDB requests, counted by the store: the cost notes of docs/dynamodb.md
/// come from this test's output (`cargo test dynamodb_requests_per_task -- --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_requests_per_task() {
    let Some(url) = crate::moto::fresh_table().await else {
        return;
    };
    const TASKS: usize = 200;
    let store = doparallel::store::DynamoStore::open(&url).await.unwrap();
    let counts = store.counts.clone();
    let store: Arc<dyn Store> = Arc::new(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = crate::helpers::Api::new(listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = doparallel::ServeOptions {
        settings: crate::helpers::test_settings(),
        shutdown_grace: Duration::from_secs(5),
        listen: crate::helpers::listen_limits(4 * 1024 * 1024),
        tokens: Default::default(),
        api_only: false,
    };
    let server = tokio::spawn(doparallel::serve(listener, store, options, async {
        let _ = stopped.await;
    }));
    let job = crate::helpers::job_of(TASKS, "/v1/test", None, serde_json::json!({}));
    let before = counts.snapshot();
    let id = api.submit(&job).await;
    let done = api.wait_settled(&id).await;
    assert_eq!(done["counts"]["complete"], TASKS);
    let after = counts.snapshot();
    let _ = stop.send(());
    let _ = server.await;
    let mut lines = Vec::new();
    for (op, n) in &after {
        let n = n - before.get(op).copied().unwrap_or(0);
        lines.push(format!(
            "{op}: {n} ({:.2} per task)",
            n as f64 / TASKS as f64
        ));
    }
    eprintln!(
        "DynamoDB requests for a job of {TASKS} tasks, submit to finish:\n  {}",
        lines.join("\n  ")
    );
    // Transactions carry up to 99 tasks: far fewer requests than tasks.
    let transactions =
        after["TransactWriteItems"] - before.get("TransactWriteItems").copied().unwrap_or(0);
    assert!(transactions < TASKS as u64, "{transactions} transactions");
}

async fn metadata_is_kept_and_filters_lists(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let text = r#"{"customer":"acme","batch":7,"tags":["a"],"note":"1e400 stays"}"#;
    let mut a = new_job(1, options(), false);
    a.metadata = Some(raw(text));
    let mut b = new_job(1, options(), false);
    b.metadata = Some(raw(r#"{"customer":"globex","batch":"7"}"#));
    let c = new_job(1, options(), false);
    for j in [&a, &b, &c] {
        insert(&store, j, t0).await;
    }
    let read = store.job_get(a.id).await.unwrap().unwrap();
    assert_eq!(
        read.metadata.as_deref().map(RawValue::get),
        Some(text),
        "as submitted"
    );
    assert!(
        store
            .job_get(c.id)
            .await
            .unwrap()
            .unwrap()
            .metadata
            .is_none()
    );
    let list = |key: &str, value: &str, limit| {
        let store = store.clone();
        let query = JobListQuery {
            owner: None,
            status: None,
            metadata: Some((key.to_string(), value.to_string())),
            group: None,
            before: None,
            limit,
            now: now_millis(),
        };
        async move {
            let jobs = store.job_list(&query).await.unwrap();
            jobs.iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(list("customer", "acme", 10).await, vec![a.id]);
    assert_eq!(list("customer", "globex", 10).await, vec![b.id]);
    // String values only: a number 7 is not "7".
    assert_eq!(list("batch", "7", 10).await, vec![b.id]);
    assert_eq!(list("customer", "initech", 10).await, Vec::<JobId>::new());
    assert_eq!(list("tags", "a", 10).await, Vec::<JobId>::new());
    // A page is filled past the jobs that do not match.
    let mut more = Vec::new();
    for _ in 0..3 {
        let mut j = new_job(1, options(), false);
        j.metadata = Some(raw(r#"{"customer":"acme"}"#));
        insert(&store, &j, t0).await;
        more.push(j.id);
        insert(&store, &new_job(1, options(), false), t0).await;
    }
    assert_eq!(list("customer", "acme", 2).await, vec![more[2], more[1]]);
}

async fn not_before_holds_the_tasks_and_reads_scheduled(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let later = t0 + 60_000;
    let mut opts = options();
    opts.not_before = Some(doparallel::job::Timestamp::from_millis(later));
    let scheduled = new_job(2, opts, true);
    let now_job = new_job(1, options(), false);
    insert(&store, &scheduled, t0).await;
    insert(&store, &now_job, t0).await;
    // Before its time only the other job's task is handed out, and the claim says when
    // the scheduled one is due.
    let claim_now = claim(&store, NodeId(1), 10, t0).await;
    let ids: Vec<JobId> = claim_now.tasks.iter().map(|t| t.job_id).collect();
    assert_eq!(ids, vec![now_job.id]);
    assert_eq!(claim_now.next_due, Some(later));
    let record = store.job_get(scheduled.id).await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::Pending, "stored as pending");
    assert_eq!(
        record.status.shown(&record.options, t0),
        JobStatus::Scheduled
    );
    assert_eq!(
        record.status.shown(&record.options, later),
        JobStatus::Pending
    );
    let list = |status, now| {
        let store = store.clone();
        let query = JobListQuery {
            owner: None,
            status: Some(status),
            metadata: None,
            group: None,
            before: None,
            limit: 10,
            now,
        };
        async move {
            let jobs = store.job_list(&query).await.unwrap();
            jobs.iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(list(JobStatus::Scheduled, t0).await, vec![scheduled.id]);
    assert_eq!(
        list(JobStatus::Pending, t0).await,
        Vec::<JobId>::new(),
        "the other runs"
    );
    assert_eq!(list(JobStatus::Scheduled, later).await, Vec::<JobId>::new());
    assert_eq!(list(JobStatus::Pending, later).await, vec![scheduled.id]);
    // At its time, both tasks are due.
    let claim_later = claim(&store, NodeId(1), 10, later).await;
    assert_eq!(claim_later.tasks.len(), 2);
    assert!(claim_later.tasks.iter().all(|t| t.job_id == scheduled.id));
    // A scheduled job can be cancelled like any unfinished one.
    let other = {
        let mut o = options();
        o.not_before = Some(doparallel::job::Timestamp::from_millis(later));
        new_job(1, o, false)
    };
    insert(&store, &other, t0).await;
    store.job_cancel(other.id, t0).await.unwrap();
    let cancelled = store.job_get(other.id).await.unwrap().unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
}

async fn retry_requeues_failed_tasks_with_a_fresh_budget(store: Arc<dyn Store>) {
    use doparallel::store::{CallbackOutcome, CallbackRecord, RetryOutcome};
    let t0 = now_millis();
    let node = NodeId::random();
    let mut opts = options();
    opts.max_attempts = 2;
    let id = insert(&store, &new_job(3, opts, true), t0).await;
    let failed_only = [TaskStatus::Failed];
    assert_eq!(
        store.job_retry(id, &failed_only, t0).await.unwrap(),
        RetryOutcome::Unfinished(JobStatus::Pending)
    );
    // Task 1 completes, task 2 fails at once, task 3 fails on its second attempt.
    let c = claim(&store, node, 10, t0).await;
    settle_all(
        &store,
        node,
        vec![
            settle(&c.tasks[0], complete("1"), t0),
            settle(&c.tasks[1], failed(), t0),
            settle(&c.tasks[2], retry(t0), t0),
        ],
    )
    .await;
    let c = claim(&store, node, 10, t0).await;
    assert_eq!((c.tasks[0].attempt, c.tasks[0].attempt_base), (2, 0));
    let report = settle_all(&store, node, vec![settle(&c.tasks[0], failed(), t0)]).await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(job_of(&store, id).await.status, JobStatus::Failed);
    // Its callback is owed: a new run would race its delivery.
    assert_eq!(
        store.job_retry(id, &failed_only, t0).await.unwrap(),
        RetryOutcome::CallbackPending
    );
    let delivered = CallbackRecord {
        job_id: id,
        attempts: 1,
        now: t0,
        outcome: CallbackOutcome::Delivered,
    };
    assert!(store.callback_record(&delivered).await.unwrap());

    let t1 = t0 + 10;
    assert_eq!(
        store.job_retry(id, &failed_only, t1).await.unwrap(),
        RetryOutcome::Requeued { tasks: 2, run: 2 }
    );
    let job = job_of(&store, id).await;
    assert_eq!(
        (job.status, job.complete, job.failed, job.finished_at),
        (JobStatus::Running, 1, 0, None)
    );
    assert_eq!(job.options.run(), 2);
    let tasks = all_tasks(&store, id).await;
    let statuses: Vec<TaskStatus> = tasks.iter().map(|t| t.status).collect();
    assert_eq!(
        statuses,
        [
            TaskStatus::Complete,
            TaskStatus::Pending,
            TaskStatus::Pending
        ]
    );
    assert_eq!(
        (tasks[1].attempts, tasks[2].attempts),
        (1, 2),
        "the count goes on"
    );
    // Only the requeued tasks are handed out, each with the attempts of its earlier run as
    // the base of its new budget.
    let c = claim(&store, node, 10, t1).await;
    let mut got: Vec<(u64, u32, u32)> = c
        .tasks
        .iter()
        .map(|t| (t.index, t.attempt, t.attempt_base))
        .collect();
    got.sort();
    assert_eq!(got, [(2, 2, 1), (3, 3, 2)]);
    let numbers_before = store.tasks_failed_since(id, 0, 10).await.unwrap();
    assert!(
        numbers_before.is_empty(),
        "requeued tasks are no failures now"
    );
    // Task 2 fails again, task 3 completes: the new failure gets a new number, after the
    // first run's, so an events stream resuming from those misses nothing.
    let outcome = |t: &ClaimedTask| {
        if t.index == 2 {
            failed()
        } else {
            complete("2")
        }
    };
    let report = settle_all(
        &store,
        node,
        c.tasks.iter().map(|t| settle(t, outcome(t), t1)).collect(),
    )
    .await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(report.finished[0].status, JobStatus::Failed);
    let failures = store.tasks_failed_since(id, 0, 10).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].task.index, 2);
    assert!(
        failures[0].fail_seq > 2,
        "numbered after run 1's: {}",
        failures[0].fail_seq
    );
    let job = job_of(&store, id).await;
    assert_eq!(
        (job.status, job.complete, job.failed),
        (JobStatus::Failed, 2, 1)
    );
    // The new run's callback is due.
    let due = store.callbacks_due(t1, t1 + 1000, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.job_id).collect::<Vec<_>>(), [id]);
    // After its delivery: nothing cancelled to retry; the failed one, in a third run.
    let delivered = CallbackRecord {
        job_id: id,
        attempts: 1,
        now: t1,
        outcome: CallbackOutcome::Delivered,
    };
    assert!(store.callback_record(&delivered).await.unwrap());
    assert_eq!(
        store
            .job_retry(id, &[TaskStatus::Cancelled], t1)
            .await
            .unwrap(),
        RetryOutcome::NothingToRetry
    );
    assert_eq!(
        store.job_retry(id, &failed_only, t1).await.unwrap(),
        RetryOutcome::Requeued { tasks: 1, run: 3 }
    );
    assert_eq!(
        store
            .job_retry(JobId::generate(), &failed_only, t1)
            .await
            .unwrap(),
        RetryOutcome::NotFound
    );
}

async fn retry_of_a_cancelled_job(store: Arc<dyn Store>) {
    use doparallel::store::RetryOutcome;
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(3, options(), false), t0).await;
    // Task 1 completes, task 2 is running when the job is cancelled, task 3 never ran.
    let c = claim(&store, node, 2, t0).await;
    settle_all(&store, node, vec![settle(&c.tasks[0], complete("1"), t0)]).await;
    let running = c.tasks[1].clone();
    store.job_cancel(id, t0).await.unwrap();
    assert_eq!(
        store
            .job_retry(id, &[TaskStatus::Failed], t0)
            .await
            .unwrap(),
        RetryOutcome::CancelledLeftOut
    );
    assert_eq!(
        store
            .job_retry(id, &[TaskStatus::Failed, TaskStatus::Cancelled], t0)
            .await
            .unwrap(),
        RetryOutcome::Requeued { tasks: 2, run: 2 }
    );
    let job = job_of(&store, id).await;
    assert_eq!(
        (job.status, job.complete, job.cancelled),
        (JobStatus::Running, 1, 0)
    );
    // The call cancelled in the first run answers late: refused, the task is the new run's.
    let late = settle_all(
        &store,
        node,
        vec![settle(&running, complete("\"late\""), t0)],
    )
    .await;
    assert_eq!(applied(&late), 0);
    let c = claim(&store, node, 10, t0).await;
    let mut indexes: Vec<u64> = c.tasks.iter().map(|t| t.index).collect();
    indexes.sort();
    assert_eq!(indexes, [2, 3]);
    let report = settle_all(
        &store,
        node,
        c.tasks
            .iter()
            .map(|t| settle(t, complete("2"), t0))
            .collect(),
    )
    .await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(job_of(&store, id).await.status, JobStatus::Complete);
}

async fn pause_holds_claims_until_resumed(store: Arc<dyn Store>) {
    use doparallel::store::PauseOutcome;
    let t0 = now_millis();
    let node = NodeId::random();
    let a = insert(&store, &new_job(3, options(), false), t0).await;
    assert_eq!(
        store.job_pause(a, false).await.unwrap(),
        PauseOutcome::Unchanged(JobStatus::Pending),
        "resuming a job not paused changes nothing"
    );
    let c = claim(&store, node, 1, t0).await;
    let first = c.tasks[0].clone();
    assert_eq!(
        store.job_pause(a, true).await.unwrap(),
        PauseOutcome::Changed(JobStatus::Paused)
    );
    assert_eq!(
        store.job_pause(a, true).await.unwrap(),
        PauseOutcome::Unchanged(JobStatus::Paused)
    );
    // No claim takes a paused job's tasks; another job's, yes.
    let b = insert(&store, &new_job(1, options(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(c.tasks.iter().map(|t| t.job_id).collect::<Vec<_>>(), [b]);
    // Its call in flight settles as usual.
    let report = settle_all(&store, node, vec![settle(&first, complete("1"), t0)]).await;
    assert_eq!(applied(&report), 1);
    let job = job_of(&store, a).await;
    assert_eq!((job.status, job.complete), (JobStatus::Paused, 1));
    // Resumed: Running (a task of it was called), and claimed again.
    assert_eq!(
        store.job_pause(a, false).await.unwrap(),
        PauseOutcome::Changed(JobStatus::Running)
    );
    let c = claim(&store, node, 10, t0).await;
    let mut indexes: Vec<u64> = c.tasks.iter().map(|t| t.index).collect();
    indexes.sort();
    assert_eq!(indexes, [2, 3]);
    let report = settle_all(
        &store,
        node,
        c.tasks
            .iter()
            .map(|t| settle(t, complete("2"), t0))
            .collect(),
    )
    .await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(
        store.job_pause(a, true).await.unwrap(),
        PauseOutcome::Finished(JobStatus::Complete)
    );
    // A paused job whose last call settles is finished by it.
    let d = insert(&store, &new_job(1, options(), false), t0).await;
    let mut c = claim(&store, node, 10, t0).await;
    c.tasks.retain(|t| t.job_id == d);
    store.job_pause(d, true).await.unwrap();
    let report = settle_all(&store, node, vec![settle(&c.tasks[0], complete("3"), t0)]).await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(job_of(&store, d).await.status, JobStatus::Complete);
    // A paused job can be cancelled, and is listed as paused.
    let e = insert(&store, &new_job(2, options(), false), t0).await;
    store.job_pause(e, true).await.unwrap();
    let paused = store
        .job_list(&JobListQuery {
            owner: None,
            status: Some(JobStatus::Paused),
            metadata: None,
            group: None,
            before: None,
            limit: 10,
            now: t0,
        })
        .await
        .unwrap();
    assert_eq!(paused.iter().map(|j| j.id).collect::<Vec<_>>(), [e]);
    store.job_cancel(e, t0).await.unwrap();
    assert_eq!(job_of(&store, e).await.status, JobStatus::Cancelled);
    assert_eq!(
        store.job_pause(JobId::generate(), true).await.unwrap(),
        PauseOutcome::NotFound
    );
}

async fn changed_limits_hold_at_the_next_claim(store: Arc<dyn Store>) {
    use doparallel::store::OptionsOutcome;
    let t0 = now_millis();
    let node = NodeId::random();
    let mut opts = options();
    opts.concurrency = Some(1);
    let id = insert(&store, &new_job(5, opts, false), t0).await;
    assert_eq!(claim(&store, node, 10, t0).await.tasks.len(), 1);
    let seen = job_of(&store, id).await.options;
    let mut raised = seen.clone();
    raised.concurrency = Some(3);
    raised.per_host_rate = Some(2.5);
    assert_eq!(
        store.job_set_options(id, &seen, &raised).await.unwrap(),
        OptionsOutcome::Updated
    );
    // A change over options read before it is refused: read again.
    assert_eq!(
        store.job_set_options(id, &seen, &raised).await.unwrap(),
        OptionsOutcome::Changed
    );
    let job = job_of(&store, id).await;
    assert_eq!(job.options, raised);
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(c.tasks.len(), 2, "one running, room for two more");
    assert!(c.tasks.iter().all(|t| t.options.per_host_rate == Some(2.5)));
    // No limit of its own: the rest at once.
    let mut open = raised.clone();
    open.concurrency = None;
    assert_eq!(
        store.job_set_options(id, &raised, &open).await.unwrap(),
        OptionsOutcome::Updated
    );
    assert_eq!(claim(&store, node, 10, t0).await.tasks.len(), 2);
    let done = insert(&store, &new_job(0, options(), false), t0).await;
    assert_eq!(
        store
            .job_set_options(done, &options(), &open)
            .await
            .unwrap(),
        OptionsOutcome::Finished(JobStatus::Complete)
    );
}

async fn a_job_decided_early_ends_with_its_status(store: Arc<dyn Store>) {
    use doparallel::store::CancelOutcome;
    let t0 = now_millis();
    let node = NodeId::random();
    let id = insert(&store, &new_job(4, options(), true), t0).await;
    let c = claim(&store, node, 2, t0).await;
    settle_all(&store, node, vec![settle(&c.tasks[0], complete("1"), t0)]).await;
    match store.job_end(id, JobStatus::Complete, t0).await.unwrap() {
        CancelOutcome::Cancelled {
            has_callback: true,
            newly: true,
            tasks: 3,
        } => {}
        other => panic!("{other:?}"),
    }
    let job = job_of(&store, id).await;
    assert_eq!(
        (job.status, job.complete, job.cancelled, job.running),
        (JobStatus::Complete, 1, 3, 0)
    );
    assert!(job.finished_at.is_some());
    let statuses: Vec<TaskStatus> = all_tasks(&store, id)
        .await
        .iter()
        .map(|t| t.status)
        .collect();
    assert_eq!(
        statuses,
        [
            TaskStatus::Complete,
            TaskStatus::Cancelled,
            TaskStatus::Cancelled,
            TaskStatus::Cancelled
        ],
        "its unfinished tasks read Cancelled"
    );
    // Ended once: the same end again changes nothing, a cancel is too late, and the call
    // still running has its outcome refused.
    assert!(matches!(
        store.job_end(id, JobStatus::Complete, t0).await.unwrap(),
        CancelOutcome::Cancelled { newly: false, .. }
    ));
    assert!(matches!(
        store.job_cancel(id, t0).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobStatus::Complete)
    ));
    let late = settle_all(&store, node, vec![settle(&c.tasks[1], complete("2"), t0)]).await;
    assert_eq!(applied(&late), 0);
    assert!(claim(&store, node, 10, t0).await.tasks.is_empty());
    let due = store.callbacks_due(t0, t0 + 1000, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.job_id).collect::<Vec<_>>(), [id]);
    // With a quorum, the last settle decides as an early end would: 1 of 2 complete is
    // Complete, however many failed.
    let mut quorum = options();
    quorum.min_complete = Some(1);
    let q = insert(&store, &new_job(2, quorum, false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    let report = settle_all(
        &store,
        node,
        vec![
            settle(&c.tasks[0], failed(), t0),
            settle(&c.tasks[1], complete("1"), t0),
        ],
    )
    .await;
    assert_eq!(report.finished.len(), 1);
    assert_eq!(job_of(&store, q).await.status, JobStatus::Complete);
}

fn deadline_error() -> Box<RawValue> {
    raw(r#"{"kind":"deadline","http_status":null,"message":"passed","body":null}"#)
}

async fn a_job_past_its_deadline_fails_what_is_unfinished(store: Arc<dyn Store>) {
    use doparallel::store::{CallbackOutcome, CallbackRecord, Deadlines, ExpireOutcome};
    let t0 = now_millis();
    let node = NodeId::random();
    let mut opts = options();
    opts.deadline_ms = Some(1000);
    let id = insert(&store, &new_job(4, opts.clone(), true), t0).await;
    assert_eq!(
        store.jobs_deadline(t0, 10).await.unwrap(),
        Deadlines {
            due: vec![],
            next: Some(t0 + 1000)
        }
    );
    // Task 1 completes, task 2 awaits its report, task 3 is in its call, task 4 pending.
    let c = claim(&store, node, 3, t0).await;
    settle_all(
        &store,
        node,
        vec![
            settle(&c.tasks[0], complete("1"), t0),
            settle(
                &c.tasks[1],
                SettleOutcome::Await {
                    deadline: t0 + 60_000,
                    until: t0 + 60_000,
                },
                t0,
            ),
        ],
    )
    .await;
    let error = deadline_error();
    assert_eq!(
        store.job_expire(id, &error, t0 + 999).await.unwrap(),
        ExpireOutcome::NotDue,
        "not before its deadline"
    );
    assert_eq!(store.jobs_deadline(t0 + 1000, 10).await.unwrap().due, [id]);
    assert_eq!(
        store.job_expire(id, &error, t0 + 1000).await.unwrap(),
        ExpireOutcome::Expired {
            status: JobStatus::Failed,
            has_callback: true,
            tasks: 3
        }
    );
    let job = job_of(&store, id).await;
    assert_eq!(
        (
            job.status,
            job.complete,
            job.failed,
            job.cancelled,
            job.running
        ),
        (JobStatus::Failed, 1, 3, 0, 0)
    );
    let tasks = all_tasks(&store, id).await;
    let statuses: Vec<TaskStatus> = tasks.iter().map(|t| t.status).collect();
    assert_eq!(
        statuses,
        [
            TaskStatus::Complete,
            TaskStatus::Failed,
            TaskStatus::Failed,
            TaskStatus::Failed
        ]
    );
    for task in &tasks[1..] {
        let error: serde_json::Value =
            serde_json::from_str(task.error.as_ref().unwrap().get()).unwrap();
        assert_eq!(error["kind"], "deadline", "task {}", task.index);
    }
    let failed_page = store
        .tasks_page(
            id,
            &TaskPageQuery {
                after: 0,
                limit: 10,
                status: Some(TaskStatus::Failed),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        failed_page.iter().map(|t| t.index).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    // Ended once: out of the sweep, late outcomes refused, nothing claimed, callback due.
    assert_eq!(
        store.jobs_deadline(t0 + 5000, 10).await.unwrap(),
        Deadlines::default()
    );
    assert_eq!(
        store.job_expire(id, &error, t0 + 5000).await.unwrap(),
        ExpireOutcome::NotDue
    );
    let late = settle_all(&store, node, vec![settle(&c.tasks[2], complete("3"), t0)]).await;
    assert_eq!(applied(&late), 0);
    assert!(!matches!(
        report(&store, &c.tasks[1], 1, complete("2"), t0 + 1001).await,
        ReportOutcome::Applied(_)
    ));
    assert!(claim(&store, node, 10, t0 + 1001).await.tasks.is_empty());
    let due = store.callbacks_due(t0 + 1001, t0 + 2000, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.job_id).collect::<Vec<_>>(), [id]);
    // A retry runs the failed tasks again, its deadline counted from the retry.
    store
        .callback_record(&CallbackRecord {
            job_id: id,
            attempts: 1,
            now: t0 + 1500,
            outcome: CallbackOutcome::Delivered,
        })
        .await
        .unwrap();
    let t1 = t0 + 2000;
    assert!(matches!(
        store
            .job_retry(id, &[TaskStatus::Failed], t1)
            .await
            .unwrap(),
        doparallel::store::RetryOutcome::Requeued { tasks: 3, run: 2 }
    ));
    assert_eq!(
        store.jobs_deadline(t1, 10).await.unwrap().next,
        Some(t1 + 1000)
    );
    let again = claim(&store, node, 10, t1).await;
    assert_eq!(indexes(&again, id), [2, 3, 4]);

    // Within its tolerance, a job past its deadline is Complete.
    let mut tolerant = opts.clone();
    tolerant.tolerated_failures = 2;
    let tol = insert(&store, &new_job(2, tolerant, false), t0).await;
    assert_eq!(
        store.job_expire(tol, &error, t0 + 1000).await.unwrap(),
        ExpireOutcome::Expired {
            status: JobStatus::Complete,
            has_callback: false,
            tasks: 2
        }
    );
    // A deadline runs while a job is paused, and moves with its options.
    let paused = insert(&store, &new_job(1, opts.clone(), false), t0).await;
    store.job_pause(paused, true).await.unwrap();
    let moved = insert(&store, &new_job(1, opts.clone(), false), t0).await;
    let mut longer = opts.clone();
    longer.deadline_ms = Some(60_000);
    assert_eq!(
        store.job_set_options(moved, &opts, &longer).await.unwrap(),
        doparallel::store::OptionsOutcome::Updated
    );
    let found = store.jobs_deadline(t0 + 1000, 10).await.unwrap();
    assert!(found.due.contains(&paused), "{found:?}");
    assert!(!found.due.contains(&moved), "{found:?}");
    assert_eq!(
        store.job_expire(moved, &error, t0 + 1000).await.unwrap(),
        ExpireOutcome::NotDue
    );
    assert!(matches!(
        store.job_expire(paused, &error, t0 + 1000).await.unwrap(),
        ExpireOutcome::Expired {
            status: JobStatus::Failed,
            tasks: 1,
            ..
        }
    ));
    // What is left: the retried run's deadline, then the moved one.
    let found = store.jobs_deadline(t1 + 1000, 10).await.unwrap();
    assert_eq!(found.due, [id], "{found:?}");
    assert_eq!(found.next, Some(t0 + 60_000), "{found:?}");
}

async fn heartbeats_keep_an_awaited_attempt_alive(store: Arc<dyn Store>) {
    use doparallel::store::{HeartbeatOutcome, TaskHeartbeat};
    let t0 = now_millis();
    let node = NodeId::random();
    let mut opts = options();
    opts.async_heartbeat_ms = Some(1000);
    opts.async_timeout_ms = 60_000;
    let id = insert(&store, &new_job(3, opts, false), t0).await;
    let c = claim(&store, node, 3, t0).await;
    let beat = |task: &ClaimedTask, attempt: u32, now: Millis, progress: Option<&str>| {
        let store = store.clone();
        let beat = TaskHeartbeat {
            job_id: task.job_id,
            index: task.index,
            attempt,
            now,
            progress: progress.map(raw),
        };
        async move { store.tasks_heartbeat(&beat).await.unwrap() }
    };
    let overdue = |now| {
        let store = store.clone();
        async move {
            store
                .tasks_overdue(&OverdueParams {
                    limit: 10,
                    now,
                    node,
                    lease_until: now + LEASE,
                })
                .await
                .unwrap()
                .iter()
                .map(|t| t.index)
                .collect::<Vec<_>>()
        }
    };
    // A heartbeat during the call keeps its progress.
    assert_eq!(
        beat(&c.tasks[2], 1, t0, Some(r#"{"step": 1}"#)).await,
        HeartbeatOutcome::Alive
    );
    // Tasks 1 and 2 answer 202: their first heartbeat is due within a second.
    let awaiting = SettleOutcome::Await {
        deadline: t0 + 1000,
        until: t0 + 60_000,
    };
    settle_all(
        &store,
        node,
        vec![
            settle(&c.tasks[0], awaiting.clone(), t0),
            settle(&c.tasks[1], awaiting, t0),
        ],
    )
    .await;
    assert_eq!(
        beat(&c.tasks[0], 1, t0 + 900, Some(r#"{"done":0.5}"#)).await,
        HeartbeatOutcome::Alive
    );
    // A heartbeat that comes late (sent before the last) does not move the deadline back.
    assert_eq!(
        beat(&c.tasks[0], 1, t0 + 500, None).await,
        HeartbeatOutcome::Alive
    );
    // Task 2 sent none: past its deadline, a heartbeat is too late, and it alone is overdue.
    assert_eq!(
        beat(&c.tasks[1], 1, t0 + 1000, None).await,
        HeartbeatOutcome::Unknown
    );
    assert_eq!(overdue(t0 + 1000).await, [2]);
    assert!(overdue(t0 + 1899).await.is_empty());
    // Should the node that took it for its timeout die, it is due again at once, not at
    // the latest deadline a heartbeat could have reached.
    // (Task 3's lease, of its call, ran out too.)
    let later = t0 + 1000 + LEASE + 1;
    assert_eq!(store.tasks_expire(later).await.unwrap(), 2);
    let again = claim(&store, node, 10, later).await;
    assert_eq!(indexes(&again, id), [2, 3]);
    // Heartbeats move a deadline on, but never past async_timeout_ms after the 202.
    settle_all(
        &store,
        node,
        vec![settle(
            &again.tasks[1],
            SettleOutcome::Await {
                deadline: later + 1000,
                until: later + 1500,
            },
            later,
        )],
    )
    .await;
    assert_eq!(
        beat(&again.tasks[1], again.tasks[1].attempt, later + 900, None).await,
        HeartbeatOutcome::Alive
    );
    // (Task 1, silent since its last heartbeat, is overdue by now.)
    assert_eq!(overdue(later + 1499).await, [1]);
    assert_eq!(overdue(later + 1500).await, [3]);
    // Unknown attempts and tasks.
    assert_eq!(
        beat(&c.tasks[0], 2, t0, None).await,
        HeartbeatOutcome::Unknown
    );
    let mut stranger = c.tasks[0].clone();
    stranger.index = 99;
    assert_eq!(
        beat(&stranger, 1, t0, None).await,
        HeartbeatOutcome::Unknown
    );
    let tasks = all_tasks(&store, id).await;
    assert_eq!(tasks[0].progress.as_ref().unwrap().get(), r#"{"done":0.5}"#);
    assert_eq!(tasks[2].progress.as_ref().unwrap().get(), r#"{"step": 1}"#);
    assert!(tasks[1].progress.is_none());
    // Once its outcome is stored, a heartbeat hears so.
    assert!(matches!(
        report(&store, &c.tasks[0], 1, complete("1"), t0 + 1800).await,
        ReportOutcome::Applied(_)
    ));
    assert_eq!(
        beat(&c.tasks[0], 1, t0 + 1850, None).await,
        HeartbeatOutcome::Finished
    );
}

async fn higher_priorities_are_served_first_and_a_long_wait_is_not_forgotten(
    store: Arc<dyn Store>,
) {
    let t0 = now_millis();
    let node = NodeId::random();
    let with_priority = |priority| JobOptions {
        priority,
        ..options()
    };
    let low = insert(&store, &new_job(10, with_priority(-2), false), t0).await;
    let high = insert(&store, &new_job(10, with_priority(5), false), t0).await;
    // The high one takes every slot, though the low one waited longer.
    let c = claim(&store, node, 4, t0).await;
    assert_eq!(indexes(&c, high).len(), 4, "{:?}", indexes(&c, low));
    // The low one runs on what the high one leaves.
    let c = claim(&store, node, 20, t0).await;
    assert_eq!((indexes(&c, high).len(), indexes(&c, low).len()), (6, 10));

    // A job below the others not served for the wait shares the highest level next.
    let waiting = insert(&store, &new_job(10, with_priority(0), false), t0).await;
    let busy = insert(&store, &new_job(100, with_priority(3), false), t0).await;
    let c = claim(&store, node, 4, t0).await;
    assert_eq!(indexes(&c, busy).len(), 4);
    let later = t0 + 61_000;
    let c = claim(&store, node, 4, later).await;
    assert_eq!(
        (indexes(&c, waiting).len(), indexes(&c, busy).len()),
        (2, 2)
    );
    // Served, it waits behind again.
    let c = claim(&store, node, 4, later).await;
    assert_eq!(indexes(&c, busy).len(), 4);
    // A priority changed while the job runs holds at the next claim.
    let seen = job_of(&store, waiting).await.options;
    let raised = JobOptions {
        priority: 9,
        ..seen.clone()
    };
    assert_eq!(
        store
            .job_set_options(waiting, &seen, &raised)
            .await
            .unwrap(),
        doparallel::store::OptionsOutcome::Updated
    );
    let c = claim(&store, node, 4, later).await;
    assert_eq!(indexes(&c, waiting).len(), 4, "{:?}", indexes(&c, busy));
}

async fn groups_share_a_claim_before_their_jobs_do(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let in_group = |group: &str| JobOptions {
        group: Some(group.to_string()),
        ..options()
    };
    // One customer's burst of four jobs, another's single job.
    let burst: Vec<JobId> = {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(insert(&store, &new_job(20, in_group("acme"), false), t0).await);
        }
        ids
    };
    let single = insert(&store, &new_job(20, in_group("globex"), false), t0).await;
    let c = claim(&store, node, 8, t0).await;
    assert_eq!(indexes(&c, single).len(), 4, "half the claim");
    for id in &burst {
        assert_eq!(indexes(&c, *id).len(), 1, "the other half, shared");
    }
    // Lists filter on the group.
    let of_group = |group: &str| {
        let store = store.clone();
        let query = JobListQuery {
            owner: None,
            status: None,
            metadata: None,
            group: Some(group.to_string()),
            before: None,
            limit: 10,
            now: now_millis(),
        };
        async move {
            let mut ids: Vec<JobId> = store
                .job_list(&query)
                .await
                .unwrap()
                .iter()
                .map(|j| j.id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(of_group("globex").await, [single]);
    let mut acme = burst.clone();
    acme.sort();
    assert_eq!(of_group("acme").await, acme);
    assert!(of_group("initech").await.is_empty());
}

async fn group_limits_hold_over_claims(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let in_group = |group: &str| JobOptions {
        group: Some(group.to_string()),
        ..options()
    };
    let limits = |concurrency: Option<u32>, rate: Option<f64>| GroupLimits { concurrency, rate };
    store
        .group_set(None, "acme", &limits(Some(3), None))
        .await
        .unwrap();
    let acme = [
        insert(&store, &new_job(10, in_group("acme"), false), t0).await,
        insert(&store, &new_job(10, in_group("acme"), false), t0).await,
    ];
    let globex = insert(&store, &new_job(10, in_group("globex"), false), t0).await;
    let of_acme = |c: &Claim| c.tasks.iter().filter(|t| acme.contains(&t.job_id)).count();

    // Three of acme's calls at most, whatever the free slots; globex takes the rest.
    let first = claim(&store, node, 20, t0).await;
    assert_eq!(of_acme(&first), 3);
    assert_eq!(indexes(&first, globex).len(), 10);
    assert!(
        first.tasks.iter().all(|t| t.start_at.is_none()),
        "no rate: at once"
    );
    assert_eq!(
        of_acme(&claim(&store, node, 20, t0 + 1).await),
        0,
        "at its limit"
    );
    // Two of its calls end: two more may start.
    let done: Vec<TaskSettle> = first
        .tasks
        .iter()
        .filter(|t| acme.contains(&t.job_id))
        .take(2)
        .map(|t| settle(t, complete("1"), t0 + 2))
        .collect();
    store.tasks_settle(node, &done).await.unwrap();
    assert_eq!(of_acme(&claim(&store, node, 20, t0 + 3).await), 2);

    // What the list shows: own limits, calls in flight, unfinished jobs.
    let listed = store.groups_list(None, None).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["acme", "globex"]);
    assert_eq!(listed[0].own, Some(limits(Some(3), None)));
    assert_eq!((listed[0].in_flight, listed[0].jobs), (3, 2));
    assert_eq!(
        (listed[1].own, listed[1].in_flight, listed[1].jobs),
        (None, 10, 1)
    );

    // A rate of 10 a second: the starts of the next half second, 100 ms apart, and the
    // claim says when the next is due.
    store
        .group_set(None, "slow", &limits(None, Some(10.0)))
        .await
        .unwrap();
    let slow = insert(&store, &new_job(20, in_group("slow"), false), t0).await;
    let t1 = t0 + 10_000;
    let paced = claim(&store, node, 20, t1).await;
    let starts: Vec<Millis> = paced
        .tasks
        .iter()
        .filter(|t| t.job_id == slow)
        .map(|t| t.start_at.expect("a reserved start"))
        .collect();
    assert_eq!(starts, (0..6).map(|i| t1 + i * 100).collect::<Vec<_>>());
    let again = claim(&store, node, 20, t1).await;
    assert!(
        indexes(&again, slow).is_empty(),
        "the rate's half second is taken"
    );
    assert_eq!(again.next_due, Some(t1 + 100));
    let later = claim(&store, node, 20, t1 + 100).await;
    let next: Vec<Option<Millis>> = later
        .tasks
        .iter()
        .filter(|t| t.job_id == slow)
        .map(|t| t.start_at)
        .collect();
    assert_eq!(next, [Some(t1 + 600)]);
    // A faster rate counts from the last start reserved: 10 ms after it.
    store
        .group_set(None, "slow", &limits(None, Some(100.0)))
        .await
        .unwrap();
    let faster = claim(&store, node, 20, t1 + 150).await;
    let starts: Vec<Millis> = faster
        .tasks
        .iter()
        .filter(|t| t.job_id == slow)
        .map(|t| t.start_at.expect("a reserved start"))
        .collect();
    assert_eq!(
        starts,
        (1..=5).map(|i| t1 + 600 + i * 10).collect::<Vec<_>>()
    );

    // A group without limits of its own has the server's default.
    let initech = insert(&store, &new_job(10, in_group("initech"), false), t0).await;
    let defaulted = claim_with(&store, node, 20, t1 + 200, Vec::new(), Some(2)).await;
    assert_eq!(indexes(&defaulted, initech).len(), 2);

    // Removing acme's limits: it had some; then none.
    assert!(store.group_delete(None, "acme").await.unwrap());
    assert!(!store.group_delete(None, "acme").await.unwrap());
    let acme_now = store.groups_list(None, Some("acme")).await.unwrap();
    assert_eq!(acme_now.len(), 1);
    assert_eq!(acme_now[0].own, None);
    assert!(
        store
            .groups_list(None, Some("nobody"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A finished job of a group, retried, is one of the group's again: its calls count
/// against the group's concurrency (on DynamoDB, it rejoins the group's members).
async fn a_retried_job_counts_in_its_group_again(store: Arc<dyn Store>) {
    let t0 = now_millis();
    let node = NodeId::random();
    let in_group = JobOptions {
        group: Some("acme".to_string()),
        ..options()
    };
    let job = insert(&store, &new_job(2, in_group.clone(), false), t0).await;
    let c = claim(&store, node, 10, t0).await;
    assert_eq!(indexes(&c, job), [1, 2]);
    let outcomes: Vec<TaskSettle> = c
        .tasks
        .iter()
        .map(|t| settle(t, failed(), t0 + 1))
        .collect();
    let report = store.tasks_settle(node, &outcomes).await.unwrap();
    assert_eq!(report.finished.len(), 1, "{report:?}");
    // A claim of another job of the limited group meanwhile finds the first one finished.
    let limits = GroupLimits {
        concurrency: Some(1),
        rate: None,
    };
    store.group_set(None, "acme", &limits).await.unwrap();
    let other = insert(&store, &new_job(1, in_group, false), t0 + 2).await;
    let c = claim(&store, node, 10, t0 + 2).await;
    assert_eq!(indexes(&c, other), [1]);
    let done = [settle(&c.tasks[0], complete("1"), t0 + 2)];
    store.tasks_settle(node, &done).await.unwrap();
    // Retried: running again, and its calls counted, one at a time.
    let failed_only = [TaskStatus::Failed];
    assert!(matches!(
        store.job_retry(job, &failed_only, t0 + 3).await.unwrap(),
        doparallel::store::RetryOutcome::Requeued { .. }
    ));
    let c = claim(&store, node, 10, t0 + 4).await;
    assert_eq!(c.tasks.len(), 1, "one call of the group at a time: {c:?}");
    let again = claim(&store, node, 10, t0 + 5).await;
    assert!(
        again.tasks.is_empty(),
        "the retried job's call counts: {again:?}"
    );
    let listed = store.groups_list(None, Some("acme")).await.unwrap();
    assert_eq!((listed[0].in_flight, listed[0].jobs), (1, 1));
}
