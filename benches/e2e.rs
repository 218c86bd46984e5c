//! The end-to-end benchmark: DoParallel against the machine's own ceiling, in one run.
//!
//! For each workload it measures, on loopback:
//! - the ceiling: the same number of POSTs at the same concurrency from a plain reqwest
//!   client that keeps nothing;
//! - DoParallel: `doparallel serve` (this build) on a file-backed SQLite database, the job
//!   submitted over HTTP, timed from submit to callback received.
//!
//! Both call the same minimal hyper endpoint inside this process. Each workload runs
//! `--repeat` times (3 by default) and medians are reported, as ratios to the ceiling.
//!
//! Run: `cargo bench --bench e2e` (add `-- --w5` for the one-million-task workload,
//! `-- --backends sqlite,pg1,pg2` to measure PostgreSQL with one and two nodes too, and
//! `-- --write BENCHMARKS.md` to write the table there). `DOPARALLEL_BENCH_BINARY=PATH`
//! measures another build of `doparallel` instead of this one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

/// What the endpoint saw: when the last task call arrived, and when each callback did.
#[derive(Default)]
struct Seen {
    last_task: Option<Instant>,
    callbacks: HashMap<String, Instant>,
}

struct Endpoint {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    callback: Arc<Notify>,
}

/// A minimal hyper server: `/fast` answers a small JSON at once, `/slow` after 50 ms,
/// `/callback` records the callback's arrival by job id.
async fn start_endpoint() -> Endpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let callback = Arc::new(Notify::new());
    let (s, n) = (seen.clone(), callback.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (seen, callback) = (s.clone(), n.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (seen, callback) = (seen.clone(), callback.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        match path.as_str() {
                            "/callback" => {
                                let body = body.unwrap_or_default();
                                let doc: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                let id = doc["job_id"].as_str().unwrap_or("").to_string();
                                seen.lock().unwrap().callbacks.insert(id, Instant::now());
                                callback.notify_waiters();
                            }
                            "/slow" => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                seen.lock().unwrap().last_task = Some(Instant::now());
                            }
                            _ => seen.lock().unwrap().last_task = Some(Instant::now()),
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            br#"{"ok":true,"n":12345678901234567890}"#,
                        ))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Endpoint {
        addr,
        seen,
        callback,
    }
}

/// The ceiling: `n` POSTs at concurrency `c`, nothing kept.
async fn ceiling(url: &str, n: usize, c: usize) -> Duration {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let start = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let url = url.to_string();
            async move {
                let resp = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"i":{i}}}"#))
                    .send()
                    .await
                    .expect("the endpoint answers");
                resp.bytes().await.unwrap();
            }
        })
        .buffer_unordered(c)
        .collect::<Vec<()>>()
        .await;
    start.elapsed()
}

/// The throwaway PostgreSQL cluster of the tests, made durable (on disk, fsync on) by
/// `DOPARALLEL_PG_DURABLE` for a fair comparison with SQLite.
#[allow(dead_code)] // the tests' helpers this benchmark has no use for
#[path = "../tests/it/pg.rs"]
mod pg;

/// Where a run keeps its data, and how many nodes serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    /// PostgreSQL with this many `doparallel serve` nodes.
    Postgres(usize),
}

impl Backend {
    fn parse(text: &str) -> Self {
        match text {
            "sqlite" => Backend::Sqlite,
            "pg1" => Backend::Postgres(1),
            "pg2" => Backend::Postgres(2),
            other => panic!("unknown backend {other:?}: expected sqlite, pg1 or pg2"),
        }
    }

    fn label(self) -> String {
        match self {
            Backend::Sqlite => "SQLite".into(),
            Backend::Postgres(1) => "PostgreSQL, 1 node".into(),
            Backend::Postgres(n) => format!("PostgreSQL, {n} nodes"),
        }
    }
}

/// The database of one run.
enum Database {
    Sqlite(tempfile::TempDir),
    Postgres { url: String },
}

impl Database {
    async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Database::Sqlite(tempfile::tempdir().unwrap()),
            Backend::Postgres(_) => {
                let db = pg::database()
                    .await
                    .expect("PostgreSQL is installed (initdb, pg_ctl)");
                Database::Postgres { url: db.url }
            }
        }
    }

    fn url(&self) -> String {
        match self {
            Database::Sqlite(dir) => format!("sqlite://{}", dir.path().join("bench.db").display()),
            Database::Postgres { url } => url.clone(),
        }
    }

    async fn bytes(&self) -> u64 {
        match self {
            Database::Sqlite(dir) => std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("bench.db"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum(),
            Database::Postgres { url } => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                size as u64
            }
        }
    }
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(max_in_flight: usize, database: &str) -> Self {
        // Another build may be measured against this one's figures by naming its binary.
        let binary = std::env::var_os("DOPARALLEL_BENCH_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_doparallel").into());
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--allow-net",
                "127.0.0.0/8",
            ])
            .args(["--database", database])
            .args(["--max-in-flight", &max_in_flight.to_string()])
            .args(["--max-tasks-per-job", "2000000"])
            .args(["--max-body-bytes", "1000000000"])
            .args(["--max-callback-bytes", "2000000000"])
            // DOPARALLEL_BENCH_LOG=<filter> passes the server's log at that level through
            // to this program's stderr (to see claims and settles while profiling).
            .env(
                "RUST_LOG",
                std::env::var("DOPARALLEL_BENCH_LOG").unwrap_or("warn,doparallel=info".into()),
            )
            .stderr(Stdio::piped())
            .spawn()
            .expect("the doparallel binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pass_through = std::env::var_os("DOPARALLEL_BENCH_LOG").is_some();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if pass_through {
                    eprintln!("{line}");
                }
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let end = rest
                        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                        .unwrap_or(rest.len());
                    let _ = tx.send(rest[..end].to_string());
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(30)) else {
            // Not left running behind a failed benchmark.
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not say where it listens within 30 s");
        };
        Server {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// Peak resident memory of the server so far, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// CPU time the server has used so far (user and system), in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One measured run of DoParallel.
struct Run {
    wall: Duration,
    submit: Duration,
    last_task_to_callback: Duration,
    peak_rss: u64,
    db_bytes_per_task: f64,
    server_cpu: f64,
    /// Share of both cores busy (anything but idle and iowait) during the run, 0 to 1.
    machine_busy: f64,
    /// Each job's time from the start of its submission to its callback, in ms.
    latencies: Vec<f64>,
}

/// The machine's CPU time so far, busy and in all, in clock ticks (`/proc/stat`).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Jobs per second as the table shows it: whole numbers, but two decimals below 10 (a
/// workload of one job runs at a fraction of a job per second).
fn jobs_per_second(rate: f64) -> String {
    if rate < 10.0 {
        format!("{rate:.2}")
    } else {
        format!("{rate:.0}")
    }
}

/// The `q` quantile (0 to 1) of `v`.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A job of `n` tasks; with `group`, in that group (`options.group`).
fn job_body(
    n: usize,
    url: &str,
    callback: &str,
    concurrency: usize,
    group: Option<String>,
) -> String {
    let mut body = String::with_capacity(n * (url.len() + 40) + 200);
    let group = group.map_or(String::new(), |g| format!(r#","group":"{g}""#));
    body.push_str(&format!(r#"{{"callback":"{callback}","options":{{"concurrency":{concurrency},"max_attempts":1{group}}},"tasks":["#));
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(r#"{{"endpoint":"{url}","params":{{"i":{i}}}}}"#));
    }
    body.push_str("]}");
    body
}

async fn submit(http: &reqwest::Client, base: &str, body: String) -> (String, Instant) {
    let start = Instant::now();
    let resp = http
        .post(format!("{base}/v1/job"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the server answers");
    assert_eq!(resp.status().as_u16(), 202, "submit refused");
    let answer: serde_json::Value = resp.json().await.unwrap();
    (answer["job_id"].as_str().unwrap().to_string(), start)
}

/// Waits until every job in `ids` has called back; returns when each one did.
async fn callbacks(endpoint: &Endpoint, ids: &[String], limit: Duration) -> Vec<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        let notified = endpoint.callback.notified();
        {
            let seen = endpoint.seen.lock().unwrap();
            if ids.iter().all(|id| seen.callbacks.contains_key(id)) {
                return ids.iter().map(|id| seen.callbacks[id]).collect();
            }
        }
        assert!(
            Instant::now() < deadline,
            "callbacks did not arrive in {limit:?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    }
}

/// `jobs` jobs of `n` tasks each (spread over the nodes in turn), submitted all at once, or
/// by `clients` clients each submitting its share one job after the other.
async fn doparallel(endpoint: &Endpoint, backend: Backend, w: &Workload) -> Run {
    let (route, jobs, n, concurrency) = (w.route, w.jobs, w.tasks, w.concurrency);
    let database = Database::create(backend).await;
    let nodes = match backend {
        Backend::Sqlite => 1,
        Backend::Postgres(n) => n,
    };
    // Each node may run a whole job's concurrency: a job spread over two nodes is limited
    // by its own `concurrency`, not by one node's slots.
    let servers: Vec<Server> = (0..nodes)
        .map(|_| Server::start(concurrency, &database.url()))
        .collect();
    let http = reqwest::Client::new();
    let url = format!("http://{}/{route}", endpoint.addr);
    let callback = format!("http://{}/callback", endpoint.addr);
    let bodies: Vec<String> = (0..jobs)
        .map(|i| {
            let group = (w.groups > 0).then(|| format!("g{}", i % w.groups));
            job_body(n, &url, &callback, concurrency, group)
        })
        .collect();
    endpoint.seen.lock().unwrap().last_task = None;
    let cpu_before = servers.iter().map(Server::cpu_seconds).sum::<f64>();
    let ticks_before = machine_ticks();
    let start = Instant::now();
    let submitted: Vec<(String, Instant)> = match w.clients {
        None => {
            futures_util::future::join_all(
                bodies
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| submit(&http, &servers[i % nodes].base, b)),
            )
            .await
        }
        Some(clients) => {
            let mut shares: Vec<Vec<(usize, String)>> = vec![Vec::new(); clients];
            for (i, b) in bodies.into_iter().enumerate() {
                shares[i % clients].push((i, b));
            }
            let (http, servers) = (&http, &servers);
            let per_client =
                futures_util::future::join_all(shares.into_iter().map(|share| async move {
                    let mut ids = Vec::new();
                    for (i, b) in share {
                        ids.push(submit(http, &servers[i % nodes].base, b).await);
                    }
                    ids
                }))
                .await;
            per_client.into_iter().flatten().collect()
        }
    };
    let submit_time = start.elapsed();
    let ids: Vec<String> = submitted.iter().map(|(id, _)| id.clone()).collect();
    let arrived = callbacks(endpoint, &ids, Duration::from_secs(1800)).await;
    let done = arrived.iter().copied().max().unwrap();
    let ticks_after = machine_ticks();
    let wall = done - start;
    let last_task = endpoint.seen.lock().unwrap().last_task.unwrap_or(done);
    let latencies = submitted
        .iter()
        .zip(&arrived)
        .map(|((_, sent), got)| got.saturating_duration_since(*sent).as_secs_f64() * 1000.0)
        .collect();
    Run {
        wall,
        submit: submit_time,
        last_task_to_callback: done.saturating_duration_since(last_task),
        peak_rss: servers.iter().map(Server::peak_rss).max().unwrap_or(0),
        server_cpu: servers.iter().map(Server::cpu_seconds).sum::<f64>() - cpu_before,
        machine_busy: (ticks_after.0 - ticks_before.0) as f64
            / (ticks_after.1 - ticks_before.1).max(1) as f64,
        db_bytes_per_task: database.bytes().await as f64 / (jobs * n) as f64,
        latencies,
    }
}

/// One job of two tasks at a time on an idle server, `times` in turn: each job's time from
/// submission to callback, in ms.
async fn idle_latency(endpoint: &Endpoint, backend: Backend, times: usize) -> Vec<f64> {
    let database = Database::create(backend).await;
    let server = Server::start(256, &database.url());
    let http = reqwest::Client::new();
    let url = format!("http://{}/fast", endpoint.addr);
    let callback = format!("http://{}/callback", endpoint.addr);
    let mut latencies = Vec::new();
    for _ in 0..times {
        // Idle: whatever the last job left (its callback record, a poll) is over.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (id, sent) = submit(&http, &server.base, job_body(2, &url, &callback, 2, None)).await;
        let got = callbacks(endpoint, std::slice::from_ref(&id), Duration::from_secs(60)).await[0];
        latencies.push(got.saturating_duration_since(sent).as_secs_f64() * 1000.0);
    }
    latencies
}

struct Workload {
    name: &'static str,
    what: &'static str,
    route: &'static str,
    jobs: usize,
    tasks: usize,
    concurrency: usize,
    /// `None`: every job submitted at once; else this many clients, each submitting its
    /// share one after the other as fast as they are accepted.
    clients: Option<usize>,
    /// The jobs are spread over this many groups (`options.group`) in turn; 0: none.
    groups: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let kb: f64 = mem.trim_end_matches(" kB").parse().unwrap_or(0.0);
    format!("{cores} cores, {:.1} GiB memory", kb / 1024.0 / 1024.0)
}

fn main() {
    // Before any thread exists: the PostgreSQL cluster, if one is started, is durable.
    // SAFETY: no other thread is running yet, so nothing reads the environment meanwhile.
    unsafe { std::env::set_var("DOPARALLEL_PG_DURABLE", "1") };
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(run());
}

async fn run() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let repeat: usize = value("--repeat").and_then(|v| v.parse().ok()).unwrap_or(3);
    let only: Option<String> = value("--only");
    let backends: Vec<Backend> = value("--backends")
        .unwrap_or_else(|| "sqlite".into())
        .split(',')
        .map(Backend::parse)
        .collect();

    let mut workloads = vec![
        Workload {
            name: "W1",
            what: "1 job x 10,000 instant tasks, concurrency 256",
            route: "fast",
            jobs: 1,
            tasks: 10_000,
            concurrency: 256,
            clients: None,
            groups: 0,
        },
        Workload {
            name: "W2",
            what: "1 job x 10,000 tasks of 50 ms, concurrency 1,000",
            route: "slow",
            jobs: 1,
            tasks: 10_000,
            concurrency: 1000,
            clients: None,
            groups: 0,
        },
        Workload {
            name: "W3",
            what: "200 jobs x 50 instant tasks at once, concurrency 256",
            route: "fast",
            jobs: 200,
            tasks: 50,
            concurrency: 256,
            clients: None,
            groups: 0,
        },
        Workload {
            name: "W3g",
            what: "W3 with its jobs in 10 groups of 20 (fair share by group)",
            route: "fast",
            jobs: 200,
            tasks: 50,
            concurrency: 256,
            clients: None,
            groups: 10,
        },
        Workload {
            name: "W4",
            what: "1 job x 100,000 instant tasks, concurrency 256",
            route: "fast",
            jobs: 1,
            tasks: 100_000,
            concurrency: 256,
            clients: None,
            groups: 0,
        },
        Workload {
            name: "W6",
            what: "2,000 jobs x 2 instant tasks with a callback, 32 clients submitting",
            route: "fast",
            jobs: 2000,
            tasks: 2,
            concurrency: 256,
            clients: Some(32),
            groups: 0,
        },
    ];
    if flag("--w5") {
        workloads.push(Workload {
            name: "W5",
            what: "1 job x 1,000,000 instant tasks, concurrency 256",
            route: "fast",
            jobs: 1,
            tasks: 1_000_000,
            concurrency: 256,
            clients: None,
            groups: 0,
        });
    }
    if let Some(only) = &only {
        workloads.retain(|w| only.split(',').any(|o| o == w.name));
    }

    let endpoint = start_endpoint().await;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &backend in &backends {
        let mut per_task = HashMap::new();
        for w in &workloads {
            let total = w.jobs * w.tasks;
            let url = format!("http://{}/{}", endpoint.addr, w.route);
            let mut ceilings = Vec::new();
            let mut runs = Vec::new();
            for r in 0..repeat {
                let c = ceiling(&url, total, w.concurrency).await;
                let run = doparallel(&endpoint, backend, w).await;
                eprintln!(
                    "{} {} run {}: ceiling {:.3} s, doparallel {:.3} s (submit {:.3} s, server CPU {:.2} s, machine busy {:.0}%, latency p50 {:.1} ms p99 {:.1} ms)",
                    backend.label(),
                    w.name,
                    r + 1,
                    c.as_secs_f64(),
                    run.wall.as_secs_f64(),
                    run.submit.as_secs_f64(),
                    run.server_cpu,
                    run.machine_busy * 100.0,
                    quantile(run.latencies.clone(), 0.5),
                    quantile(run.latencies.clone(), 0.99),
                );
                ceilings.push(c.as_secs_f64());
                runs.push(run);
            }
            let ceiling_s = median(ceilings);
            let wall = median(runs.iter().map(|r| r.wall.as_secs_f64()).collect());
            per_task.insert(w.name, wall / total as f64);
            let row = format!(
                "| {} | {} | {} | {:.3} s | {:.0} | {} | {:.0} | **{:.2}** | {:.0}% | {:.1} / {:.1} ms | {:.3} s | {:.0} ms | {:.0} MB | {:.0} | {:.2} s |",
                w.name,
                backend.label(),
                w.what,
                wall,
                total as f64 / wall,
                jobs_per_second(w.jobs as f64 / wall),
                total as f64 / ceiling_s,
                ceiling_s / wall,
                median(runs.iter().map(|r| r.machine_busy * 100.0).collect()),
                median(
                    runs.iter()
                        .map(|r| quantile(r.latencies.clone(), 0.5))
                        .collect()
                ),
                median(
                    runs.iter()
                        .map(|r| quantile(r.latencies.clone(), 0.99))
                        .collect()
                ),
                median(runs.iter().map(|r| r.submit.as_secs_f64()).collect()),
                median(
                    runs.iter()
                        .map(|r| r.last_task_to_callback.as_secs_f64() * 1000.0)
                        .collect()
                ),
                median(runs.iter().map(|r| r.peak_rss as f64 / 1e6).collect()),
                median(runs.iter().map(|r| r.db_bytes_per_task).collect()),
                median(runs.iter().map(|r| r.server_cpu).collect()),
            );
            println!("{row}");
            rows.push(row);
        }
        let label = backend.label();
        if !flag("--no-idle")
            && only
                .as_deref()
                .is_none_or(|o| o.split(',').any(|w| w == "L1"))
        {
            let latencies = idle_latency(&endpoint, backend, 50).await;
            let line = format!(
                "{label}: one job of 2 tasks on an idle server, 50 in turn: submit to callback p50 {:.1} ms, p99 {:.1} ms",
                quantile(latencies.clone(), 0.5),
                quantile(latencies, 0.99)
            );
            eprintln!("{line}");
            notes.push(line);
        }
        if let (Some(w1), Some(w4)) = (per_task.get("W1"), per_task.get("W4")) {
            notes.push(format!("{label}: W4/W1 time per task: {:.2}", w4 / w1));
        }
        if let Some(w2) = per_task.get("W2") {
            notes.push(format!(
                "{label}: W2 wall time / ideal 0.5 s: {:.2}",
                w2 * 10_000.0 / 0.5
            ));
        }
        if let (Some(w3), Some(w3g)) = (per_task.get("W3"), per_task.get("W3g")) {
            notes.push(format!(
                "{label}: W3g/W3 time, the same jobs in 10 groups: {:.2}",
                w3g / w3
            ));
        }
        if let (Some(w1), Some(w3)) = (per_task.get("W1"), per_task.get("W3")) {
            notes.push(format!(
                "{label}: W3/W1 time for the same number of tasks: {:.2}",
                w3 / w1
            ));
        }
    }
    for n in &notes {
        println!("{n}");
    }

    if let Some(path) = value("--write") {
        let command = format!(
            "cargo bench --bench e2e --{}",
            args[1..]
                .iter()
                .filter(|a| !a.starts_with("--bench"))
                .fold(String::new(), |acc, a| format!("{acc} {a}"))
        );
        let text = format!(
            "# Benchmarks\n\n\
             Measured on this machine: {}; medians of {repeat} runs. Produced by `{}`.\n\n\
             The ceiling is the same number of POSTs at the same concurrency from a plain \
             reqwest client that keeps nothing, against the same in-process hyper endpoint, \
             measured in the same run. DoParallel is `doparallel serve` on a file-backed SQLite \
             database (WAL, synchronous=FULL), or on PostgreSQL (a local cluster on disk, fsync \
             on) with one or two nodes (jobs submitted to the nodes in turn; server CPU is the \
             nodes' sum, peak RSS the largest node's), the job submitted over HTTP and timed \
             from submit to callback received.\n\n\
             Machine CPU busy is the share of both cores busy during DoParallel's run (the \
             benchmark's own client and endpoint included); latency is each job's time from \
             the start of its submission to its callback.\n\n\
             | workload | backend | what | wall | tasks/s | jobs/s | ceiling tasks/s | ratio to ceiling | machine CPU busy | latency p50 / p99 | submit | last task to callback | peak RSS | DB bytes/task | server CPU |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n\
             {}\n\n{}\n",
            machine(),
            command.trim(),
            rows.join("\n"),
            notes
                .iter()
                .map(|n| format!("- {n}"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        std::fs::write(Path::new(&path), text).unwrap();
        eprintln!("wrote {path}");
    }
}
