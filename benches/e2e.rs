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
//! Run: `cargo bench --bench e2e` (add `-- --w5` for the one-million-task workload, and
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

struct Server {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(max_in_flight: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
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
            .arg("--database")
            .arg(format!(
                "sqlite://{}",
                dir.path().join("bench.db").display()
            ))
            .args(["--max-in-flight", &max_in_flight.to_string()])
            .args(["--max-tasks-per-job", "2000000"])
            .args(["--max-body-bytes", "1000000000"])
            .args(["--max-callback-bytes", "2000000000"])
            .env("RUST_LOG", "warn,doparallel=info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("the doparallel binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let end = rest
                        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                        .unwrap_or(rest.len());
                    let _ = tx.send(rest[..end].to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server starts");
        Server {
            child,
            base: format!("http://{addr}"),
            dir,
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

    fn database_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("bench.db"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
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
}

fn job_body(n: usize, url: &str, callback: &str, concurrency: usize) -> String {
    let mut body = String::with_capacity(n * (url.len() + 40) + 200);
    body.push_str(&format!(r#"{{"callback":"{callback}","options":{{"concurrency":{concurrency},"max_attempts":1}},"tasks":["#));
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(r#"{{"endpoint":"{url}","params":{{"i":{i}}}}}"#));
    }
    body.push_str("]}");
    body
}

async fn submit(http: &reqwest::Client, base: &str, body: String) -> String {
    let resp = http
        .post(format!("{base}/v1/job"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the server answers");
    assert_eq!(resp.status().as_u16(), 202, "submit refused");
    let answer: serde_json::Value = resp.json().await.unwrap();
    answer["job_id"].as_str().unwrap().to_string()
}

/// Waits until every job in `ids` has called back; returns when the last one did.
async fn callbacks(endpoint: &Endpoint, ids: &[String], limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        let notified = endpoint.callback.notified();
        {
            let seen = endpoint.seen.lock().unwrap();
            if ids.iter().all(|id| seen.callbacks.contains_key(id)) {
                return ids.iter().map(|id| seen.callbacks[id]).max().unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "callbacks did not arrive in {limit:?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    }
}

/// `jobs` jobs of `n` tasks each, submitted at once.
async fn doparallel(
    endpoint: &Endpoint,
    route: &str,
    jobs: usize,
    n: usize,
    concurrency: usize,
) -> Run {
    let server = Server::start(concurrency);
    let http = reqwest::Client::new();
    let url = format!("http://{}/{route}", endpoint.addr);
    let callback = format!("http://{}/callback", endpoint.addr);
    let bodies: Vec<String> = (0..jobs)
        .map(|_| job_body(n, &url, &callback, concurrency))
        .collect();
    endpoint.seen.lock().unwrap().last_task = None;
    let start = Instant::now();
    let ids: Vec<String> =
        futures_util::future::join_all(bodies.into_iter().map(|b| submit(&http, &server.base, b)))
            .await;
    let submit_time = start.elapsed();
    let done = callbacks(endpoint, &ids, Duration::from_secs(1800)).await;
    let wall = done - start;
    let last_task = endpoint.seen.lock().unwrap().last_task.unwrap_or(done);
    Run {
        wall,
        submit: submit_time,
        last_task_to_callback: done.saturating_duration_since(last_task),
        peak_rss: server.peak_rss(),
        server_cpu: server.cpu_seconds(),
        db_bytes_per_task: server.database_bytes() as f64 / (jobs * n) as f64,
    }
}

struct Workload {
    name: &'static str,
    what: &'static str,
    route: &'static str,
    jobs: usize,
    tasks: usize,
    concurrency: usize,
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

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let repeat: usize = value("--repeat").and_then(|v| v.parse().ok()).unwrap_or(3);
    let only: Option<String> = value("--only");

    let mut workloads = vec![
        Workload {
            name: "W1",
            what: "1 job x 10,000 instant tasks, concurrency 256",
            route: "fast",
            jobs: 1,
            tasks: 10_000,
            concurrency: 256,
        },
        Workload {
            name: "W2",
            what: "1 job x 10,000 tasks of 50 ms, concurrency 1,000",
            route: "slow",
            jobs: 1,
            tasks: 10_000,
            concurrency: 1000,
        },
        Workload {
            name: "W3",
            what: "200 jobs x 50 instant tasks at once, concurrency 256",
            route: "fast",
            jobs: 200,
            tasks: 50,
            concurrency: 256,
        },
        Workload {
            name: "W4",
            what: "1 job x 100,000 instant tasks, concurrency 256",
            route: "fast",
            jobs: 1,
            tasks: 100_000,
            concurrency: 256,
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
        });
    }
    if let Some(only) = &only {
        workloads.retain(|w| only.split(',').any(|o| o == w.name));
    }

    let endpoint = start_endpoint().await;
    let mut rows = Vec::new();
    let mut per_task = HashMap::new();
    for w in &workloads {
        let total = w.jobs * w.tasks;
        let url = format!("http://{}/{}", endpoint.addr, w.route);
        let mut ceilings = Vec::new();
        let mut runs = Vec::new();
        for r in 0..repeat {
            let c = ceiling(&url, total, w.concurrency).await;
            let run = doparallel(&endpoint, w.route, w.jobs, w.tasks, w.concurrency).await;
            eprintln!(
                "{} run {}: ceiling {:.3} s, doparallel {:.3} s (submit {:.3} s, server CPU {:.2} s)",
                w.name,
                r + 1,
                c.as_secs_f64(),
                run.wall.as_secs_f64(),
                run.submit.as_secs_f64(),
                run.server_cpu
            );
            ceilings.push(c.as_secs_f64());
            runs.push(run);
        }
        let ceiling_s = median(ceilings);
        let wall = median(runs.iter().map(|r| r.wall.as_secs_f64()).collect());
        per_task.insert(w.name, wall / total as f64);
        let row = format!(
            "| {} | {} | {:.3} s | {:.0} | {:.0} | **{:.2}** | {:.3} s | {:.0} ms | {:.0} MB | {:.0} | {:.2} s |",
            w.name,
            w.what,
            wall,
            total as f64 / wall,
            total as f64 / ceiling_s,
            ceiling_s / wall,
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

    let mut notes = Vec::new();
    if let (Some(w1), Some(w4)) = (per_task.get("W1"), per_task.get("W4")) {
        notes.push(format!("W4/W1 time per task: {:.2}", w4 / w1));
    }
    if let Some(w2) = per_task.get("W2") {
        notes.push(format!(
            "W2 wall time / ideal 0.5 s: {:.2}",
            w2 * 10_000.0 / 0.5
        ));
    }
    if let (Some(w1), Some(w3)) = (per_task.get("W1"), per_task.get("W3")) {
        notes.push(format!(
            "W3/W1 time for the same number of tasks: {:.2}",
            w3 / w1
        ));
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
             database (WAL, synchronous=FULL), the job submitted over HTTP and timed from submit \
             to callback received.\n\n\
             | workload | what | wall | tasks/s | ceiling tasks/s | ratio to ceiling | submit | last task to callback | peak RSS | DB bytes/task | server CPU |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n\
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
