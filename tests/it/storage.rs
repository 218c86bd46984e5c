//! Storage faults for real: an acknowledged write is a committed write, and the engine acts
//! only on what is committed (RELIABILITY.md, "Storage faults").
//!
//! The disk-full tests put the SQLite database on a small tmpfs of its own and fill that file
//! system to ENOSPC with another file, as a user's full disk would: unlike SQLite's
//! `max_page_count`, which fails a statement, a real full disk fails the COMMIT, and that is
//! the path that used to break. They need to mount a tmpfs (root, as in CI); elsewhere they
//! are skipped with a notice, and under `CI=true` they fail.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    DEADLINE, RawEndpoint, Receiver, ServerProcess, assert_database_intact, eventually, job_of,
    respond,
};

/// A tmpfs mounted on a temporary directory for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `mib` MiB, or `None` (after a loud notice) where this process may not
    /// mount one; under `CI=true` that fails the test instead.
    fn mount(mib: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        let options = std::ffi::CString::new(format!("size={mib}m,mode=0755")).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let why = std::io::Error::last_os_error();
            let test = std::thread::current()
                .name()
                .unwrap_or("a test")
                .to_string();
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: cannot mount a tmpfs ({why}); CI runs as root and must");
            }
            eprintln!(
                "\n!!!!!!!!\n!!! SKIPPED {test}: cannot mount a tmpfs here ({why}); run as root\n!!!!!!!!\n"
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the file system has not one byte left; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for size in [1 << 20, 1 << 16, 1 << 12, 1 << 9, 1] {
            while file.write_all(&chunk[..size]).is_ok() {}
        }
        let err = file.write_all(&[0u8]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target =
            std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; a lazy unmount, so open files do not hold it up.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// How many jobs the server announced as finished `Complete`, once it has announced at
/// least `n` (a job finished by a settle whose answer was lost is announced after the
/// settle's retry, which may come after its callback).
async fn announced(api: &crate::helpers::Api, n: usize) -> f64 {
    let metric = "doparallel_jobs_finished_total{status=\"Complete\"}";
    eventually(&format!("{n} jobs announced as finished"), || async {
        api.metric(metric).await.filter(|&v| v >= n as f64)
    })
    .await
}

/// Whether the server's log has a line containing `text`.
fn logged(log: &Path, text: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|all| all.contains(text))
}

/// How many of the server's log lines contain `text`.
fn logged_times(log: &Path, text: &str) -> usize {
    std::fs::read_to_string(log).map_or(0, |all| all.matches(text).count())
}

/// A task endpoint that holds every call until `gate` opens, then answers
/// `{"task":INDEX,"pad":...}` with `pad` bytes of padding.
async fn held_endpoint(gate: &tokio::sync::watch::Sender<bool>, pad: usize) -> RawEndpoint {
    let gate = gate.subscribe();
    RawEndpoint::start(move |_, call, mut stream| {
        let mut gate = gate.clone();
        async move {
            let _ = tokio::time::timeout(DEADLINE, gate.wait_for(|open| *open)).await;
            let task = call.header("doparallel-task");
            let body = format!(r#"{{"task":{task},"pad":"{}"}}"#, "p".repeat(pad));
            let headers = [("content-type", "application/json")];
            respond(&mut stream, "200 OK", &headers, body.as_bytes()).await;
        }
    })
    .await
}

/// Sends SIGTERM and waits for the process to exit successfully.
async fn stop(mut server: ServerProcess) {
    server.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Posts a job body; the status, the `Retry-After` header and the JSON answer.
async fn post_job(api: &crate::helpers::Api, job: &Value) -> (u16, Option<String>, Value) {
    let resp = api
        .http
        .post(format!("{}/v1/job", api.base))
        .json(job)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (
        status,
        retry_after,
        resp.json().await.unwrap_or(Value::Null),
    )
}

/// The disk fills while calls are held; their answers cannot be committed, a new job is
/// refused, and nothing is acted on until space returns. Then the held job finishes with
/// every result and one callback, a job accepted afterwards is readable and runs, and a
/// restart calls nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_results_are_committed() {
    const TASKS: usize = 16;
    const HELD: usize = 8;
    // Eight answers take half a MiB of WAL; the whole document stays under the test
    // receiver's 2 MB body limit.
    const PAD: usize = 64 * 1024;
    let Some(fs) = Tmpfs::mount(16) else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let db = fs.path().join("doparallel.db");
    let (gate, _) = tokio::sync::watch::channel(false);
    let endpoint = held_endpoint(&gate, PAD).await;
    let mut receiver = Receiver::start(0, 200).await;
    let server = ServerProcess::on(&db).log(&log).start();
    let api = &server.api;

    let options = json!({"concurrency": HELD, "backoff_ms": 50, "timeout_ms": 60000});
    let held = api
        .submit(&job_of(
            TASKS,
            &endpoint.url("/big"),
            Some(&receiver.url()),
            options,
        ))
        .await;
    eventually("the first calls to be held", || async {
        (endpoint.call_count() == HELD).then_some(())
    })
    .await;

    let filler = fs.fill();
    // Submissions that cannot be committed are refused, and nothing of them is stored;
    // eight sent at once share their commit (`store/sqlite/group.rs`), and each is refused.
    let pad = "q".repeat(4096);
    let tasks: Vec<Value> = (0..100)
        .map(|i| json!({"endpoint": "/v1/test", "params": {"i": i, "pad": pad}}))
        .collect();
    let job = json!({ "tasks": tasks });
    let answers = futures_util::future::join_all((0..8).map(|_| post_job(api, &job))).await;
    for (status, retry_after, body) in answers {
        assert_eq!(status, 503, "{body}");
        assert!(retry_after.is_some(), "a 503 says when to try again");
        let msg = body["msg"].as_str().unwrap();
        assert!(msg.contains("the database is full"), "{msg}");
    }

    // The held calls answer; their outcomes cannot be committed, and nothing follows from
    // them: no slot is freed (no new call), the job does not finish, no callback goes.
    gate.send_replace(true);
    eventually("two failed commits of the held outcomes", || async {
        (logged_times(&log, "storing task outcomes failed; retrying") >= 2).then_some(())
    })
    .await;
    assert_eq!(
        endpoint.call_count(),
        HELD,
        "a call made on uncommitted state"
    );
    let job = api.job(&held).await;
    assert_eq!(job["status"], "Running", "{job}");
    assert_eq!(job["counts"]["complete"], 0, "{job}");
    assert_eq!(job["counts"]["running"], HELD, "{job}");
    assert!(receiver.all().is_empty(), "a callback of an unfinished job");
    let (_, list) = api.get("/v1/jobs?limit=10").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");

    std::fs::remove_file(&filler).unwrap();
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["job_id"], held.as_str());
    assert_eq!(delivery.body["status"], "Complete", "{}", delivery.body);
    for i in 1..=TASKS {
        let result = &delivery.body["result"][i.to_string()];
        assert_eq!(result["status"], "Complete", "task {i}");
        assert_eq!(result["result"]["task"], i, "task {i}");
        assert_eq!(result["result"]["pad"].as_str().unwrap().len(), PAD);
    }
    let job = api.wait_settled(&held).await;
    assert_eq!(job["callback"]["state"], "delivered", "{job}");
    assert_eq!(job["counts"]["complete"], TASKS, "{job}");
    // Each task was called once: nothing was stored twice, nothing lost.
    let mut keys: Vec<String> = endpoint
        .calls()
        .iter()
        .map(|c| c.header("idempotency-key"))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!((endpoint.call_count(), keys.len()), (TASKS, TASKS));

    // Accepted once space is back: readable, run, and kept across a restart.
    let after = api.submit(&job_of(3, "/v1/test", None, json!({}))).await;
    assert_eq!(api.wait_settled(&after).await["status"], "Complete");
    stop(server).await;
    assert_database_intact(&db).await;

    let restarted_log = logs.path().join("restarted.log");
    let server = ServerProcess::on(&db).log(&restarted_log).start();
    for id in [&held, &after] {
        let job = server.api.job(id).await;
        assert_eq!(job["status"], "Complete", "{job}");
    }
    // Every task's outcome was committed: the restart has nothing to call again.
    assert!(
        !logged(&restarted_log, "will be called again"),
        "the restart recovered tasks"
    );
    assert_eq!(endpoint.call_count(), TASKS);
    assert_eq!(receiver.all().len(), 1, "the callback was sent once");
    stop(server).await;
    assert_database_intact(&db).await;
}

/// The disk fills while a delivered callback is being recorded. The record is not
/// acknowledged, so the job's callback stays owed; once space returns the callback is sent
/// again with the same `webhook-id` (at least once, never lost) and recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_a_callback_is_recorded() {
    let Some(fs) = Tmpfs::mount(16) else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let db = fs.path().join("doparallel.db");
    let (gate, _) = tokio::sync::watch::channel(false);
    let receiver = held_endpoint(&gate, 0).await;
    let args = ["--callback-timeout", "1s"];
    let server = ServerProcess::on(&db).args(&args).log(&log).start();
    let api = &server.api;
    let id = api
        .submit(&job_of(
            3,
            "/v1/test",
            Some(&receiver.url("/cb")),
            json!({}),
        ))
        .await;
    eventually("the callback to arrive", || async {
        (receiver.call_count() == 1).then_some(())
    })
    .await;

    let filler = fs.fill();
    gate.send_replace(true);
    eventually("a callback record that fails", || async {
        logged(&log, "cannot record callback attempt").then_some(())
    })
    .await;
    let job = api.job(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    assert_eq!(job["callback"]["state"], "pending", "{job}");
    assert_eq!(job["callback"]["attempts"], 0, "{job}");

    std::fs::remove_file(&filler).unwrap();
    let job = api.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "delivered", "{job}");
    assert_eq!(job["callback"]["attempts"], 1, "{job}");
    let calls = receiver.calls();
    assert_eq!(calls.len(), 2, "sent again once the first was not recorded");
    assert_eq!(calls[0].header("webhook-id"), format!("msg_{id}"));
    assert_eq!(calls[1].header("webhook-id"), calls[0].header("webhook-id"));

    stop(server).await;
    let server = ServerProcess::on(&db).args(&args).start();
    assert_eq!(server.api.job(&id).await["callback"]["state"], "delivered");
    stop(server).await;
    assert_database_intact(&db).await;
    assert_eq!(receiver.call_count(), 2);
}

/// The callback loop's backstop, on its own: a delivery record that the store says is due
/// for a job it also says is running (here written into the database behind the server's
/// back) is not sent, and is counted as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_of_an_unfinished_job_is_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("doparallel.db");
    let log = dir.path().join("server.log");
    let (gate, _) = tokio::sync::watch::channel(false);
    let endpoint = held_endpoint(&gate, 0).await;
    let mut receiver = Receiver::start(0, 200).await;
    let server = ServerProcess::on(&db).log(&log).start();
    let api = &server.api;
    let id = api
        .submit(&job_of(
            2,
            &endpoint.url("/held"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    eventually("the calls to be held", || async {
        (endpoint.call_count() == 2).then_some(())
    })
    .await;

    let forged = format!(
        "INSERT INTO callbacks (job_seq, state, next_attempt_at) \
         SELECT seq, 1, 0 FROM jobs WHERE id = '{id}'"
    );
    write_behind_the_back(&db, &forged).await;
    eventually("the forged delivery to be refused", || async {
        logged(
            &log,
            "a callback is due for a job that is not finished; not sent",
        )
        .then_some(())
    })
    .await;
    let refused = api
        .metric("doparallel_callback_deliveries_total{outcome=\"refused\"}")
        .await;
    assert!(refused >= Some(1.0), "{refused:?}");
    assert!(receiver.all().is_empty(), "sent: {:?}", receiver.all());

    // Take the forgery back and let the job finish: its own callback goes out, once.
    write_behind_the_back(&db, "DELETE FROM callbacks").await;
    gate.send_replace(true);
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Complete");
    api.wait_settled(&id).await;
    assert_eq!(receiver.all().len(), 1);
}

/// Runs one statement on a SQLite database that a server has open.
async fn write_behind_the_back(db: &Path, sql: &str) {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

/// Each statement and each COMMIT of every write transaction fails in turn (`store::fault`:
/// the failpoints `store-statement` and `store-commit`), on SQLite and PostgreSQL, in a
/// run of a small job with a callback; every run must end the same way as a run without
/// faults.
#[cfg(feature = "failpoints")]
mod injected {
    use super::*;
    use crate::helpers::Endpoint;

    const TASKS: usize = 4;

    #[derive(Clone, Copy, Debug)]
    enum Backend {
        Sqlite,
        Postgres,
    }

    /// Runs the job on a server armed with `failpoints`, on a fresh database; checks its
    /// end; returns whether the fault was injected (it was not when the run made fewer
    /// writes than its place). `None` when the backend is not available here.
    async fn one_run(backend: Backend, failpoints: &str) -> Option<bool> {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("server.log");
        let url = match backend {
            Backend::Sqlite => crate::helpers::sqlite_url(&logs.path().join("doparallel.db")),
            Backend::Postgres => crate::pg::database().await?.url,
        };
        let url = url.as_str();
        let endpoint = Endpoint::start().await;
        let mut receiver = Receiver::start(0, 200).await;
        let args = [
            "--max-in-flight",
            "2",
            "--lease-timeout",
            "1s",
            "--callback-timeout",
            "1s",
        ];
        let env = [("FAILPOINTS", failpoints)];
        let server = ServerProcess::on_url(url)
            .args(&args)
            .envs(&env)
            .log(&log)
            .start();
        let api = &server.api;
        let job = job_of(
            TASKS,
            &endpoint.url("echo"),
            Some(&receiver.url()),
            json!({"backoff_ms": 10}),
        );
        // A client that gets a 503 sends the same request again, with the same key.
        let id = eventually(&format!("{failpoints}: the job accepted"), || async {
            let resp = api
                .http
                .post(format!("{}/v1/job", api.base))
                .header("idempotency-key", "the-one-job")
                .json(&job)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            match status {
                200 | 202 => Some(body["job_id"].as_str().unwrap().to_string()),
                503 => None,
                _ => panic!("{failpoints}: the submission answered {status}: {body}"),
            }
        })
        .await;
        let view = api.wait_settled(&id).await;
        let context = format!("{failpoints}: {view}");
        assert_eq!(view["status"], "Complete", "{context}");
        assert_eq!(view["callback"]["state"], "delivered", "{context}");
        let (_, list) = api.get("/v1/jobs").await;
        assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{context}");
        // Announced once, even when the settle that finished it had its answer lost (then
        // after its retry, which may come after the callback, due since the first attempt).
        assert_eq!(announced(api, 1).await, 1.0, "{context}");
        for i in 1..=TASKS {
            let task = &view["result"][i.to_string()];
            assert_eq!(task["result"], json!({"i": i}), "{context}");
        }
        // Calls are made at least once; again only for a claim whose COMMIT was lost (its
        // lease runs out unrenewed) or an outcome never committed.
        for (key, calls) in endpoint.calls_per_key() {
            assert!(calls <= 2, "{failpoints}: {key} called {calls} times");
        }
        assert_eq!(endpoint.calls_per_key().len(), TASKS, "{context}");
        // One callback, or the same one twice when its delivery could not be recorded.
        let deliveries = receiver.all();
        let first = receiver.next().await;
        assert_eq!(first.body["status"], "Complete", "{context}");
        assert_eq!(first.body["result"], view["result"], "{context}");
        for d in &deliveries {
            assert_eq!(d.webhook_id, first.webhook_id, "{context}");
            assert_eq!(d.body, first.body, "{context}");
        }
        let unrecorded = logged(&log, "cannot record callback attempt");
        assert!(
            deliveries.len() == 1 || (deliveries.len() == 2 && unrecorded),
            "{context}: {} deliveries",
            deliveries.len()
        );
        stop(server).await;
        Some(logged(&log, "injected storage fault"))
    }

    /// Runs the job once for every place `point` (`store-statement` or `store-commit`) is
    /// reached, failing it there with `mode`, a few runs at a time.
    async fn every_place(backend: Backend, point: &str, mode: &str) {
        const AT_ONCE: usize = 4;
        let mut places = 0;
        'runs: for first in (0..).step_by(AT_ONCE) {
            let runs = (first..first + AT_ONCE).map(|k| {
                let arm = if k == 0 {
                    format!("{point}=1*return({mode})->off")
                } else {
                    format!("{point}={k}*off->1*return({mode})->off")
                };
                async move { one_run(backend, &arm).await }
            });
            for injected in futures_util::future::join_all(runs).await {
                match injected {
                    None => return, // skipped, loudly, by the backend's harness
                    Some(false) => break 'runs,
                    Some(true) => places += 1,
                }
            }
            assert!(
                first < 400,
                "{point} is reached more often than a run can write"
            );
        }
        assert!(places > 3, "{point} failed only {places} times");
        eprintln!("{backend:?}: {point} failed with {mode} at each of {places} places in turn");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_each_statement_fails_in_turn() {
        every_place(Backend::Sqlite, "store-statement", "rollback").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_each_commit_fails_in_turn() {
        for mode in ["fail", "rollback", "lost"] {
            every_place(Backend::Sqlite, "store-commit", mode).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_each_statement_fails_in_turn() {
        every_place(Backend::Postgres, "store-statement", "rollback").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_each_commit_fails_in_turn() {
        for mode in ["fail", "rollback", "lost"] {
            every_place(Backend::Postgres, "store-commit", mode).await;
        }
    }
}

/// PostgreSQL stops while the API is asked: `/healthz` and a submission answer 503 (with
/// `Retry-After`) promptly instead of hanging until the pool gives up; outcomes that arrive
/// meanwhile wait in the engine; once the database is back, the job held across the outage
/// finishes with its callback and new jobs are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_answers_503_promptly() {
    let Some(cluster) = crate::pg::PrivateCluster::start() else {
        return;
    };
    let (gate, _) = tokio::sync::watch::channel(false);
    let endpoint = held_endpoint(&gate, 0).await;
    let mut receiver = Receiver::start(0, 200).await;
    let server = ServerProcess::on_url(&cluster.url()).start();
    let api = &server.api;
    let id = api
        .submit(&job_of(
            4,
            &endpoint.url("/held"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    eventually("the calls to be held", || async {
        (endpoint.call_count() == 4).then_some(())
    })
    .await;

    cluster.stop();
    // Prompt: well under the few seconds a load balancer's probe or a client waits.
    let prompt = Duration::from_secs(4);
    for _ in 0..3 {
        let asked = std::time::Instant::now();
        let (status, body) = api.get("/healthz").await;
        assert_eq!(status, 503, "{body}");
        assert!(
            asked.elapsed() < prompt,
            "/healthz took {:?}",
            asked.elapsed()
        );
        eprintln!(
            "/healthz with PostgreSQL down: 503 in {:?}",
            asked.elapsed()
        );
    }
    let asked = std::time::Instant::now();
    let (status, retry_after, body) = post_job(api, &job_of(2, "/v1/test", None, json!({}))).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "a 503 says when to try again");
    assert!(
        asked.elapsed() < prompt,
        "a submission took {:?}",
        asked.elapsed()
    );
    eprintln!(
        "a submission with PostgreSQL down: 503 in {:?}",
        asked.elapsed()
    );
    // The held calls answer into the outage.
    gate.send_replace(true);

    cluster.start_again();
    eventually("/healthz to answer 200 again", || async {
        (api.get("/healthz").await.0 == 200).then_some(())
    })
    .await;
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["job_id"], id.as_str());
    assert_eq!(delivery.body["status"], "Complete", "{}", delivery.body);
    let after = api.submit(&job_of(2, "/v1/test", None, json!({}))).await;
    assert_eq!(api.wait_settled(&after).await["status"], "Complete");
    assert_eq!(endpoint.call_count(), 4);
    assert_eq!(receiver.all().len(), 1);
}

/// One connection a [`StreamReceiver`] accepted: what it declared and what arrived.
#[cfg(feature = "failpoints")]
#[derive(Clone, Debug, Default)]
struct Received {
    webhook_id: String,
    declared: usize,
    body: Vec<u8>,
    /// The sender closed the connection or the whole body arrived.
    ended: bool,
}

/// A callback receiver on a bare socket that records each body as its bytes arrive, so a
/// test can see a delivery cut off midway; answers 200 to a whole body.
#[cfg(feature = "failpoints")]
struct StreamReceiver {
    addr: std::net::SocketAddr,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

#[cfg(feature = "failpoints")]
impl StreamReceiver {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Received>::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = vec![0u8; 64 * 1024];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(&format!("{name}:")))
                            .map(|v| v.trim().to_string())
                            .unwrap_or_default()
                    };
                    let me = {
                        let mut log = log.lock().unwrap();
                        log.push(Received {
                            webhook_id: header("webhook-id"),
                            declared: header("content-length").parse().unwrap_or(0),
                            body: buf[head_end..].to_vec(),
                            ended: false,
                        });
                        log.len() - 1
                    };
                    loop {
                        let (have, want) = {
                            let log = log.lock().unwrap();
                            (log[me].body.len(), log[me].declared)
                        };
                        if have >= want {
                            break;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                log.lock().unwrap()[me].ended = true;
                                return;
                            }
                            Ok(n) => log.lock().unwrap()[me].body.extend_from_slice(&chunk[..n]),
                        }
                    }
                    log.lock().unwrap()[me].ended = true;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        StreamReceiver { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }

    fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// The database dies while a callback is being streamed from it: the delivery is aborted,
/// so the receiver sees fewer bytes than the declared length (never a shorter body it could
/// take for whole), and the callback is sent again in full, with the same `webhook-id`, once
/// the database is back. A failpoint only holds the stream between two pages long enough
/// for the test to stop the database there.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_cut_off_by_a_lost_database_is_aborted() {
    const TASKS: usize = 2500;
    let Some(cluster) = crate::pg::PrivateCluster::start() else {
        return;
    };
    let receiver = StreamReceiver::start().await;
    let env = [("FAILPOINTS", "callback-next-page=1*return(3000)->off")];
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let args = ["--callback-timeout", "2s"];
    let server = ServerProcess::on_url(&cluster.url())
        .args(&args)
        .envs(&env)
        .log(&log)
        .start();
    let id = server
        .api
        .submit(&job_of(TASKS, "/v1/test", Some(&receiver.url()), json!({})))
        .await;
    eventually("the first page of the callback", || async {
        receiver
            .all()
            .first()
            .is_some_and(|r| !r.body.is_empty())
            .then_some(())
    })
    .await;
    cluster.stop();
    let cut = eventually("the cut-off delivery to end", || async {
        receiver.all().first().filter(|r| r.ended).cloned()
    })
    .await;
    assert!(
        cut.body.len() < cut.declared,
        "the receiver got {} of {} bytes",
        cut.body.len(),
        cut.declared
    );
    assert!(serde_json::from_slice::<Value>(&cut.body).is_err());

    cluster.start_again();
    let whole = eventually("a whole delivery", || async {
        receiver
            .all()
            .into_iter()
            .find(|r| r.ended && r.body.len() == r.declared)
    })
    .await;
    assert_eq!(whole.webhook_id, cut.webhook_id);
    assert_eq!(whole.webhook_id, format!("msg_{id}"));
    let document: Value = serde_json::from_slice(&whole.body).unwrap();
    assert_eq!(document["status"], "Complete");
    assert_eq!(document["result"].as_object().unwrap().len(), TASKS);
    let job = server.api.wait_settled(&id).await;
    assert_eq!(job["callback"]["state"], "delivered", "{job}");
}

/// The connection of a settle is terminated (`pg_terminate_backend`) just before its
/// COMMIT: the outcomes are not stored, the engine retries them, and the job ends as if
/// nothing happened: each task called once, each result stored once, one callback.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_settle_whose_connection_is_terminated() {
    const TASKS: usize = 6;
    let Some(db) = crate::pg::database().await else {
        return;
    };
    let endpoint = crate::helpers::Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let env = [("FAILPOINTS", "settle-before-commit=1*return(3000)->off")];
    let server = ServerProcess::on_url(&db.url).envs(&env).log(&log).start();
    let id = server
        .api
        .submit(&job_of(
            TASKS,
            &endpoint.url("echo"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    let terminate = format!(
        "SELECT count(pg_terminate_backend(pid))::bigint FROM pg_stat_activity \
         WHERE datname = '{}' AND state = 'idle in transaction' \
           AND now() - state_change > interval '300 milliseconds'",
        db.name
    );
    eventually("the settle's connection to be terminated", || async {
        (db.query_scalar(&terminate).await > 0).then_some(())
    })
    .await;
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Complete", "{}", delivery.body);
    let job = server.api.wait_settled(&id).await;
    for i in 1..=TASKS {
        assert_eq!(job["result"][i.to_string()]["result"], json!({"i": i}));
    }
    assert!(logged(&log, "storing task outcomes failed; retrying"));
    assert!(endpoint.calls_per_key().values().all(|&n| n == 1));
    assert_eq!(endpoint.calls_per_key().len(), TASKS);
    assert_eq!(announced(&server.api, 1).await, 1.0);
    assert_eq!(receiver.all().len(), 1);
}

/// DynamoDB keeps at most 400 KB an item: a server set to accept larger parameters than a
/// task item holds refuses to start and names the option to lower (the store says what it
/// keeps, `Store::item_limits`), rather than refuse tasks one by one later.
#[tokio::test]
async fn dynamodb_refuses_parameters_it_cannot_keep() {
    let Some(url) = crate::moto::fresh_table().await else {
        return;
    };
    let stderr = ServerProcess::on_url(&url)
        .args(&["--max-params-bytes", "1000000"])
        .refused();
    assert!(
        stderr.contains("--max-params-bytes 1000000 is more than this database can keep"),
        "{stderr}"
    );
}

/// DynamoDB (moto): the answer to a job's creation is lost after moto applied it, and the
/// SDK sends the request again, which the job's own items cancel. The job is stored, and
/// answered as stored: it keeps its tasks and finishes, with and without an
/// Idempotency-Key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_a_lost_answer_to_a_job_creation() {
    use crate::moto::{FaultyProxy, ProxyFault};
    let Some(table) = crate::moto::fresh_table().await else {
        return;
    };
    let proxy = FaultyProxy::start(crate::moto::moto().unwrap()).await;
    let mut receiver = Receiver::start(0, 200).await;
    let server = ServerProcess::on_url(&proxy.url(&table)).start();
    let api = &server.api;
    for key in [None, Some("key-1")] {
        let faulted = proxy.faulted();
        // A job's creation is the one transaction that puts a job item (`META`).
        proxy.arm(
            |op, body| {
                op == "TransactWriteItems" && body.contains("\"Put\"") && body.contains("META")
            },
            ProxyFault::ResetAfter,
            1,
        );
        let job = job_of(5, "/v1/test", Some(&receiver.url()), json!({}));
        let mut request = api.http.post(format!("{}/v1/job", api.base)).json(&job);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 202, "key {key:?}");
        assert_eq!(proxy.faulted(), faulted + 1, "the answer was lost");
        let id = resp.json::<Value>().await.unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string();
        let view = api.wait_settled(&id).await;
        assert_eq!(view["status"], "Complete", "{view}");
        assert_eq!(view["counts"]["complete"], 5, "{view}");
        let delivery = receiver.next().await;
        assert_eq!(delivery.body["job_id"], id.as_str());
        assert_eq!(delivery.body["result"].as_object().unwrap().len(), 5);
    }
    assert_eq!(receiver.all().len(), 2);
}

/// DynamoDB (moto): every request the engine makes at start fails for a while (answers
/// 500 from a proxy, beyond the SDK's own retries); the node retries its start-up steps and
/// starts, then runs a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_a_start_up_that_meets_failed_requests_still_starts() {
    use crate::moto::{FaultyProxy, ProxyFault};
    let Some(table) = crate::moto::fresh_table().await else {
        return;
    };
    let proxy = FaultyProxy::start(crate::moto::moto().unwrap()).await;
    // Opening the store checks the table (DescribeTable); the engine's start follows.
    proxy.arm(|op, _| op != "DescribeTable", ProxyFault::Error500, 5);
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let server = ServerProcess::on_url(&proxy.url(&table)).log(&log).start();
    assert_eq!(proxy.faulted(), 5);
    assert!(logged(&log, "failed at start; retrying"));
    let id = server
        .api
        .submit(&job_of(3, "/v1/test", None, json!({})))
        .await;
    assert_eq!(server.api.wait_settled(&id).await["status"], "Complete");
}

/// SQLite's group commit survives a panic while writing a group (a bug, made here by the
/// failpoint `sqlite-group-write`): that group's submission is refused, nothing of it is
/// stored, and the next submission is accepted and runs to its end.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_group_commit_fails_its_group_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::on(&crate::helpers::db_path(&dir))
        .envs(&[("FAILPOINTS", "sqlite-group-write=1*panic->off")])
        .start();
    let api = &server.api;
    let job = json!({"tasks": [{"endpoint": "/v1/test"}, {"endpoint": "/v1/test"}]});
    let (status, body) = api
        .post_raw("/v1/job", Some("application/json"), &job.to_string())
        .await;
    assert!(status >= 500, "{status}: {body}");
    let (_, list) = api.get("/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0), "{list}");
    let id = api.submit(&job).await;
    let view = api.wait_settled(&id).await;
    assert_eq!(view["status"], "Complete", "{view}");
}

/// What the endpoint of `dynamodb_a_settle_batch_where_one_jobs_transaction_fails` lets
/// through.
#[derive(Clone, Debug)]
enum Gate {
    Hold,
    /// Task 1 of this job only.
    One(String),
    All,
}

/// DynamoDB (moto): a settle batch holds two jobs' outcomes; one job's transaction fails
/// (answers 500, beyond the SDK's retries) while the other's commits. Both jobs finish,
/// each announced once, each with one callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_a_settle_batch_where_one_jobs_transaction_fails() {
    use crate::moto::{FaultyProxy, ProxyFault};
    const TASKS: usize = 10;
    let Some(table) = crate::moto::fresh_table().await else {
        return;
    };
    let proxy = FaultyProxy::start(crate::moto::moto().unwrap()).await;
    // Calls wait at the endpoint until let through: first one task of the first job, then
    // all of them.
    let (gate, gate_rx) = tokio::sync::watch::channel(Gate::Hold);
    let endpoint = RawEndpoint::start(move |_, call, mut stream| {
        let mut gate = gate_rx.clone();
        async move {
            let (job, task) = (
                call.header("doparallel-job-id"),
                call.header("doparallel-task"),
            );
            let through = |g: &Gate| match g {
                Gate::Hold => false,
                Gate::One(one) => *one == job && task == "1",
                Gate::All => true,
            };
            let _ = tokio::time::timeout(DEADLINE, gate.wait_for(through)).await;
            respond(
                &mut stream,
                "200 OK",
                &[("content-type", "application/json")],
                b"{}",
            )
            .await;
        }
    })
    .await;
    let mut receiver = Receiver::start(0, 200).await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let server = ServerProcess::on_url(&proxy.url(&table)).log(&log).start();
    let api = &server.api;
    let job = job_of(
        TASKS,
        &endpoint.url("/held"),
        Some(&receiver.url()),
        json!({}),
    );
    let first = api.submit(&job).await;
    let second = api.submit(&job).await;
    eventually("every call to be held", || async {
        (endpoint.call_count() == 2 * TASKS).then_some(())
    })
    .await;
    // From here the only transactions of the two jobs are their settles. One outcome of the
    // first job goes alone into a batch, whose transaction is held up a second; every other
    // outcome queues meanwhile, so the next batch holds both jobs', and in it the first
    // job's transaction fails, beyond the SDK's three attempts.
    let delayed = first.clone();
    proxy.arm(
        move |op, body| op == "TransactWriteItems" && body.contains(&delayed),
        ProxyFault::Delay(Duration::from_millis(1000)),
        1,
    );
    let failing = first.clone();
    proxy.arm(
        move |op, body| op == "TransactWriteItems" && body.contains(&failing),
        ProxyFault::Error500,
        3,
    );
    gate.send_replace(Gate::One(first.clone()));
    // The rest come while that outcome's settle is held up at the proxy.
    eventually("the first settle to be held up", || async {
        (proxy.delayed() == 1).then_some(())
    })
    .await;
    gate.send_replace(Gate::All);
    let mut delivered: Vec<String> = Vec::new();
    for _ in 0..2 {
        let d = receiver.next().await;
        assert_eq!(d.body["status"], "Complete", "{}", d.body);
        assert_eq!(d.body["result"].as_object().unwrap().len(), TASKS);
        delivered.push(d.body["job_id"].as_str().unwrap().to_string());
    }
    delivered.sort();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(delivered, expected);
    assert_eq!(proxy.faulted(), 3);
    // The batch that failed held outcomes of both jobs.
    let failed_batch_jobs = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("storing task outcomes failed; retrying"))
        .filter_map(|l| {
            l.split(" jobs=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max();
    assert_eq!(failed_batch_jobs, Some(2usize));
    for id in [&first, &second] {
        let view = api.wait_settled(id).await;
        assert_eq!(view["counts"]["complete"], TASKS, "{view}");
    }
    assert_eq!(announced(api, 2).await, 2.0);
    assert_eq!(endpoint.call_count(), 2 * TASKS, "a task was called twice");
    assert_eq!(receiver.all().len(), 2);
}

/// A claim commits but its answer is lost (the failpoint `claim-answer-lost` makes the
/// engine take a committed claim for a failed one) while the node stays busy with another
/// job. The tasks that claim leased are no call's: the node claims under a new name from
/// then on and stops renewing the old one once the calls claimed under it end, so those
/// tasks are taken back after the lease timeout and called, long before the node is idle.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_is_lost_does_not_hold_its_tasks() {
    const SMALL: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("doparallel.db");
    let log = dir.path().join("server.log");
    let endpoint = crate::helpers::Endpoint::start().await;
    let env = [("FAILPOINTS", "claim-answer-lost=1*off->1*return->off")];
    let args = ["--lease-timeout", "1s"];
    let server = ServerProcess::on(&db)
        .args(&args)
        .envs(&env)
        .log(&log)
        .start();
    let api = &server.api;
    // Keeps the node busy for about a minute, one call at a time.
    let busy = api
        .submit(&job_of(
            120,
            &endpoint.url("slow?ms=500"),
            None,
            json!({"concurrency": 1}),
        ))
        .await;
    eventually("the busy job's first call", || async {
        (endpoint.call_count() > 0).then_some(())
    })
    .await;
    // Its claim is the one whose answer is lost.
    let small = api
        .submit(&job_of(SMALL, &endpoint.url("echo"), None, json!({})))
        .await;
    let view = api.wait_settled(&small).await;
    assert_eq!(view["status"], "Complete", "{view}");
    assert!(logged(&log, "claims under a new name"));
    let busy_view = api.job(&busy).await;
    assert_eq!(busy_view["status"], "Running", "{busy_view}");
    assert!(busy_view["counts"]["complete"].as_u64().unwrap() < 60);
    // The orphaned tasks were called once, when taken back.
    let small_calls: Vec<String> = endpoint
        .calls()
        .iter()
        .filter(|c| c.header("doparallel-job-id") == small)
        .map(|c| c.header("idempotency-key"))
        .collect();
    assert_eq!(small_calls.len(), SMALL, "{small_calls:?}");
}
