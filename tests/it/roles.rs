//! The API and the work as separate roles: `serve --api-only` accepts jobs and calls
//! nothing; `doparallel work` makes the calls and sends the callbacks, and with
//! `--until-idle` exits once nothing is left. On SQLite, one process opens a database at a
//! time, so the two run in turn; on PostgreSQL and DynamoDB they run side by side.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

/// The arguments every worker here gets: loopback endpoints, quick callback retries.
fn worker(url: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .arg("work")
        .args(["--database", url])
        .args(["--allow-net", "127.0.0.0/8"])
        .args(["--callback-retry-schedule", "50ms,50ms,50ms"])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("WORKER_LOG").unwrap_or("warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// Runs `work --until-idle` to its end (failing the test after [`DEADLINE`]); its stdout.
fn work_until_idle(url: &str, extra: &[&str]) -> String {
    let mut child = worker(url, &[&["--until-idle"], extra].concat())
        .spawn()
        .expect("the binary starts");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            use std::io::Read;
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            assert!(status.success(), "work exited with {status}: {out}");
            return out;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("work --until-idle did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number of calls a worker's report names.
fn calls_in(report: &str) -> u64 {
    report
        .split(" calls")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no call count in {report:?}"))
}

/// Jobs the API-only process accepts wait; one worker finishes them, sends the callback,
/// and exits 0 saying what it did. `shared`: the database takes both processes at once.
async fn api_only_then_work(url: &str, shared: bool) {
    let endpoint = Endpoint::start().await;
    let mut receiver = Receiver::start(0, 200).await;
    let api_server = ServerProcess::on_url(url).args(&["--api-only"]).start();
    let id = api_server
        .api
        .submit(&job_of(
            5,
            &endpoint.url("echo"),
            Some(&receiver.url()),
            json!({}),
        ))
        .await;
    // Accepted and left alone: no call is made, the job stays Pending.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(endpoint.call_count(), 0);
    assert_eq!(api_server.api.job(&id).await["status"], "Pending");
    let api_server = if shared {
        Some(api_server)
    } else {
        drop(api_server);
        None
    };

    let url_owned = url.to_string();
    let report = tokio::task::spawn_blocking(move || work_until_idle(&url_owned, &[]))
        .await
        .unwrap();
    assert_eq!(
        report.trim(),
        "5 calls, 1 callbacks (nothing due within 5 s)"
    );
    assert_eq!(endpoint.call_count(), 5);
    let delivery = receiver.next().await;
    assert_eq!(delivery.body["status"], "Complete");

    // What the API shows is what the worker did.
    let reader = match api_server {
        Some(server) => server,
        None => ServerProcess::on_url(url).args(&["--api-only"]).start(),
    };
    let job = reader.api.job(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    assert_eq!(job["callback"]["state"], "delivered");
    // Nothing left: another worker exits at once, having done nothing.
    drop(reader);
    let url_owned = url.to_string();
    let report = tokio::task::spawn_blocking(move || work_until_idle(&url_owned, &[]))
        .await
        .unwrap();
    assert_eq!(
        report.trim(),
        "0 calls, 0 callbacks (nothing due within 5 s)"
    );
}

#[tokio::test]
async fn sqlite_api_only_then_work() {
    let dir = tempfile::tempdir().unwrap();
    api_only_then_work(&sqlite_url(&db_path(&dir)), false).await;
}

#[tokio::test]
async fn postgres_api_only_beside_work() {
    let Some(db) = crate::pg::database().await else {
        return;
    };
    api_only_then_work(&db.url, true).await;
}

#[tokio::test]
async fn dynamodb_api_only_beside_work() {
    let Some(url) = crate::moto::fresh_table().await else {
        return;
    };
    api_only_then_work(&url, true).await;
}

/// Two workers at once share one job's tasks; a worker killed mid-job loses nothing: once
/// its lease runs out, the next worker calls what it left.
async fn workers_share_and_survive_a_kill(url: &str) {
    let endpoint = Endpoint::start().await;
    let api_server = ServerProcess::on_url(url).args(&["--api-only"]).start();
    let id = api_server
        .api
        .submit(&job_of(40, &endpoint.url("slow?ms=500"), None, json!({})))
        .await;
    let (a, b) = (url.to_string(), url.to_string());
    let args = ["--max-in-flight", "4"];
    let first = tokio::task::spawn_blocking(move || work_until_idle(&a, &args));
    let second = tokio::task::spawn_blocking(move || work_until_idle(&b, &args));
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    let (n1, n2) = (calls_in(&first), calls_in(&second));
    assert_eq!(n1 + n2, 40, "{first} / {second}");
    assert!(n1 > 0 && n2 > 0, "both shared the work: {first} / {second}");
    assert_eq!(api_server.api.job(&id).await["status"], "Complete");

    // A worker killed in the middle of its calls.
    let hanging = RawEndpoint::start(|n, _, mut stream| async move {
        if n <= 4 {
            // The killed worker's calls are never answered.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        respond(&mut stream, "200 OK", &[], b"{}").await;
    })
    .await;
    let id = api_server
        .api
        .submit(&job_of(4, &hanging.url("/h"), None, json!({})))
        .await;
    let mut doomed = worker(url, &["--lease-timeout", "1s"]).spawn().unwrap();
    eventually("the doomed worker's calls", || async {
        (hanging.call_count() == 4).then_some(())
    })
    .await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    // Past its lease: the next worker takes the tasks back at its start (its own leases
    // last the default 30 s, so its periodic sweep would come only after it is idle) and
    // calls them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let u = url.to_string();
    let report = tokio::task::spawn_blocking(move || work_until_idle(&u, &[]))
        .await
        .unwrap();
    assert_eq!(calls_in(&report), 4, "{report}");
    let job = api_server.api.job(&id).await;
    assert_eq!(job["status"], "Complete", "{job}");
    assert_eq!(hanging.call_count(), 8);
}

#[tokio::test]
async fn postgres_workers_share_and_survive_a_kill() {
    let Some(db) = crate::pg::database().await else {
        return;
    };
    workers_share_and_survive_a_kill(&db.url).await;
}

#[tokio::test]
async fn dynamodb_workers_share_and_survive_a_kill() {
    let Some(url) = crate::moto::fresh_table().await else {
        return;
    };
    workers_share_and_survive_a_kill(&url).await;
}

#[tokio::test]
async fn max_duration_stops_taking_work() {
    // A worker given 1 s with 3 calls of 2 s each: it stops claiming at 1 s and exits once
    // the calls it started settle.
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    let api_server = ServerProcess::on(&db).args(&["--api-only"]).start();
    let id = api_server
        .api
        .submit(&json!({
            "options": {"concurrency": 3},
            "tasks": (0..6).map(|_| json!({"endpoint": endpoint.url("slow?ms=2000")})).collect::<Vec<_>>()
        }))
        .await;
    drop(api_server);
    let url = sqlite_url(&db);
    let started = Instant::now();
    let mut child = worker(&url, &["--max-duration", "1s"]).spawn().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(20));
    let reader = ServerProcess::on(&db).args(&["--api-only"]).start();
    let job = reader.api.job(&id).await;
    let tasks = reader.api.tasks(&id).await;
    assert_eq!(
        endpoint.call_count(),
        3,
        "the three started, no more: {tasks:?}"
    );
    assert_eq!(job["counts"]["complete"], 3, "{job}");
    assert_eq!(job["counts"]["pending"], 3, "{job}");
}

#[tokio::test]
async fn a_worker_without_a_public_url_fails_jobs_that_report_later() {
    // The job's endpoints would answer 202 and report to a URL the worker cannot give: the
    // calls fail and say why, rather than count the 202 as the outcome.
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    let api_server = ServerProcess::on(&db).args(&["--api-only"]).start();
    let id = api_server
        .api
        .submit(&job_of(
            1,
            &endpoint.url("accept"),
            None,
            json!({"async_reports": true, "max_attempts": 1}),
        ))
        .await;
    drop(api_server);
    let url = sqlite_url(&db);
    tokio::task::spawn_blocking(move || work_until_idle(&url, &[]))
        .await
        .unwrap();
    assert_eq!(endpoint.call_count(), 0);
    let reader = ServerProcess::on(&db).args(&["--api-only"]).start();
    let tasks = reader.api.tasks(&id).await;
    assert_eq!(tasks[0]["status"], "Failed");
    assert!(
        tasks[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no --public-url"),
        "{tasks:?}"
    );
}

#[tokio::test]
async fn a_worker_signs_a_tenants_callbacks_with_the_tenants_secret() {
    // The token file gives one tenant a callback secret of its own: the worker, which
    // serves no API, reads the file for it, as `serve` does.
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let server_secret = doparallel::webhook::WebhookSecret::generate();
    let tenant_secret = doparallel::webhook::WebhookSecret::generate();
    let token = "tenant-token-0123456789";
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{token} {tenant_secret}\n")).unwrap();
    let tokens = tokens.to_str().unwrap();
    let mut receiver = Receiver::start(0, 200).await;
    let api_server = ServerProcess::on(&db)
        .args(&["--api-only", "--api-token-file", tokens])
        .start();
    let job = json!({"callback": receiver.url(), "tasks": [{"endpoint": "/v1/test"}]});
    let accepted = api_server
        .api
        .http
        .post(format!("{}/v1/jobs", api_server.api.base))
        .bearer_auth(token)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status().as_u16(), 202);
    drop(api_server);

    let url = sqlite_url(&db);
    // `/v1/test` is answered by the API, which a worker is not: the task fails, and the
    // callback (status Failed) is what is checked here.
    let args = [
        "--api-token-file".to_string(),
        tokens.to_string(),
        "--webhook-secret".to_string(),
        server_secret.to_string(),
    ];
    tokio::task::spawn_blocking(move || {
        work_until_idle(&url, &args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let delivery = receiver.next().await;
    let header = |name: &str| delivery.headers[name].to_str().unwrap().to_string();
    let timestamp: u64 = header("webhook-timestamp").parse().unwrap();
    let expected = |secret: &str| {
        doparallel::webhook::Signer::new(vec![secret.parse().unwrap()])
            .signature(&header("webhook-id"), timestamp, &delivery.raw)
            .unwrap()
    };
    let signature = header("webhook-signature");
    assert!(signature.contains(&expected(&tenant_secret)), "{signature}");
    assert!(
        !signature.contains(&expected(&server_secret)),
        "{signature}"
    );
}
