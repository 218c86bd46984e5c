//! Limits per host that adapt (`--per-host-concurrency auto`, the job option `"auto"`) and
//! the breaker per host, against endpoints whose capacity DoParallel is not told: one that
//! serves K calls at once and refuses the rest with 429, one that queues calls behind K
//! workers, and a host that refuses connections until it comes up.
//!
//! The first compares the job's time with the same job under the right fixed limit, in the
//! same test: a ratio, not a time. Each prints its figures.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use doparallel::Settings;
use doparallel::engine::hosts::Adaptation;
use doparallel::job::{HostConcurrency, HostLimits};
use serde_json::json;

use crate::helpers::{TestApp, eventually, job_of, spawn_app_with, test_settings};

fn with_hosts(concurrency: Option<HostConcurrency>, adaptation: Adaptation) -> Settings {
    Settings {
        per_host: HostLimits {
            concurrency,
            rate: None,
        },
        per_host_adaptation: adaptation,
        ..test_settings()
    }
}

/// What an endpoint of these tests saw.
#[derive(Default)]
struct Seen {
    in_flight: AtomicUsize,
    served: AtomicU64,
    refused: AtomicU64,
    /// Each served call: when it arrived, how long until its answer.
    latencies: Mutex<Vec<(Instant, Duration)>>,
}

/// An endpoint that serves at most `k` calls at once, each in `latency`, and answers 429
/// (without `Retry-After`) to any call beyond them; or, with `queue`, makes them wait for
/// one of its `k` workers.
async fn endpoint(k: usize, latency: Duration, queue: bool) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let workers = Arc::new(tokio::sync::Semaphore::new(k));
    let app = axum::Router::new().route(
        "/work",
        axum::routing::post({
            let seen = seen.clone();
            move || {
                let (seen, workers) = (seen.clone(), workers.clone());
                async move {
                    let arrived = Instant::now();
                    let _worker = if queue {
                        Some(workers.acquire().await.unwrap())
                    } else {
                        let n = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        if n > k {
                            seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                            seen.refused.fetch_add(1, Ordering::SeqCst);
                            return (StatusCode::TOO_MANY_REQUESTS, "busy").into_response();
                        }
                        None
                    };
                    tokio::time::sleep(latency).await;
                    if !queue {
                        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    seen.served.fetch_add(1, Ordering::SeqCst);
                    seen.latencies
                        .lock()
                        .unwrap()
                        .push((arrived, arrived.elapsed()));
                    ([("content-type", "application/json")], "{}").into_response()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/work"), seen)
}

/// Runs a job of `tasks` calls to `url` to its end; returns how long it took.
async fn run(app: &TestApp, url: &str, tasks: usize, options: serde_json::Value) -> Duration {
    let started = Instant::now();
    let id = app.submit(&job_of(tasks, url, None, options)).await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete", "{}", job["counts"]);
    started.elapsed()
}

/// The adaptive limit of `url`'s host, from `/metrics`.
async fn limit_of(app: &TestApp, url: &str) -> f64 {
    let host = url::Url::parse(url).unwrap();
    let host = format!("{}:{}", host.host_str().unwrap(), host.port().unwrap());
    let metrics = app.metrics().await;
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "doparallel_host_concurrency_limit{{host=\"{host}\"}} "
            ))
        })
        .unwrap_or_else(|| panic!("no limit for {host} in\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_limit_finds_a_hosts_capacity_and_costs_little() {
    const K: usize = 8;
    const LATENCY: Duration = Duration::from_millis(25);
    const TASKS: usize = 1200;
    let options = json!({"backoff_ms": 100, "max_attempts": 10});

    // The right fixed limit, as someone who knew K would set it.
    let app = spawn_app_with(with_hosts(
        Some(HostConcurrency::Fixed(K as u32)),
        Adaptation::default(),
    ))
    .await;
    let (url, seen) = endpoint(K, LATENCY, false).await;
    let fixed = run(&app, &url, TASKS, options.clone()).await;
    assert_eq!(seen.refused.load(Ordering::SeqCst), 0);

    // Not told: it starts at 16, twice too many.
    let app = spawn_app_with(with_hosts(
        Some(HostConcurrency::Auto),
        Adaptation {
            initial: 16,
            breaker_failures: 20,
        },
    ))
    .await;
    let (url, seen) = endpoint(K, LATENCY, false).await;
    let adaptive = run(&app, &url, TASKS, options).await;
    let refused = seen.refused.load(Ordering::SeqCst);
    let calls = refused + seen.served.load(Ordering::SeqCst);
    let limit = limit_of(&app, &url).await;
    let (status, page) = app.get("/v1/hosts").await;
    assert_eq!(status, 200, "{page}");
    let shown = &page["hosts"][0];
    assert_eq!(shown["adaptive"], true, "{page}");
    assert_eq!(shown["limit"].as_f64(), Some(limit), "{page}");
    assert_eq!(shown["breaker"], "closed", "{page}");
    let ratio = adaptive.as_secs_f64() / fixed.as_secs_f64();
    eprintln!(
        "capacity {K}: fixed limit {fixed:?}, adaptive {adaptive:?} (x{ratio:.2}), \
         {refused} of {calls} calls refused ({:.1}%), limit at the end {limit}",
        100.0 * refused as f64 / calls as f64
    );
    assert!(
        refused * 20 < calls,
        "{refused} of {calls} calls were refused"
    );
    assert!(ratio <= 1.3, "the adaptive limit took x{ratio:.2} the time");
    assert!(
        (K as f64 / 2.0..=K as f64 + 1.0).contains(&limit),
        "the limit ended at {limit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_limit_keeps_a_queueing_hosts_latency_near_its_unloaded_one() {
    const K: usize = 4;
    const LATENCY: Duration = Duration::from_millis(40);
    const TASKS: usize = 500;
    let app = spawn_app_with(test_settings()).await;
    let (url, seen) = endpoint(K, LATENCY, true).await;
    // The job's own adaptive limit, on a server without one.
    run(&app, &url, TASKS, json!({"per_host_concurrency": "auto"})).await;
    let mut latencies = seen.latencies.lock().unwrap().clone();
    latencies.sort_by_key(|(arrived, _)| *arrived);
    // Once it has learnt (the second half of the calls).
    let mut late: Vec<Duration> = latencies[TASKS / 2..].iter().map(|(_, l)| *l).collect();
    late.sort();
    let median = late[late.len() / 2];
    let ratio = median.as_secs_f64() / LATENCY.as_secs_f64();
    eprintln!(
        "queue behind {K} workers of {LATENCY:?}: median latency of the later half {median:?} (x{ratio:.2}); at the job's start of 16 calls it would be x4"
    );
    assert!(ratio <= 1.6, "median latency x{ratio:.2} the unloaded one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_host_makes_its_calls_wait_rather_than_fail() {
    let app = spawn_app_with(with_hosts(
        None,
        Adaptation {
            initial: 16,
            breaker_failures: 20,
        },
    ))
    .await;
    // A port nobody listens on, yet.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/work");
    let id = app
        .submit(&job_of(
            60,
            &url,
            None,
            json!({"max_attempts": 3, "backoff_ms": 50, "concurrency": 30}),
        ))
        .await;
    eventually("the breaker to open", || async {
        (app.metric("doparallel_host_breaker_trips_total").await? >= 1.0).then_some(())
    })
    .await;
    let (_, page) = app.get("/v1/hosts").await;
    assert_eq!(page["hosts"][0]["breaker"], "open", "{page}");
    let tripped = page["hosts"][0]["failures"].as_u64().unwrap();
    assert!(tripped >= 20, "{page}");
    // Held, not failed: more connection failures come (calls under way as it opened, then
    // a probe after the cool-down), and still no task has used up its attempts.
    eventually("more failures at the open breaker", || async {
        let (_, page) = app.get("/v1/hosts").await;
        (page["hosts"][0]["failures"].as_u64()? > tripped).then_some(())
    })
    .await;
    let job = app.job(&id).await;
    assert_eq!(job["counts"]["failed"], 0, "{}", job["counts"]);
    assert_eq!(job["status"], "Running");
    // The host comes up; the next probe finds it, and every call goes.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let app_router = axum::Router::new().route(
        "/work",
        axum::routing::post(|| async { ([("content-type", "application/json")], "{}") }),
    );
    tokio::spawn(async move { axum::serve(listener, app_router).await.unwrap() });
    let job = app.wait_settled(&id).await;
    assert_eq!(job["status"], "Complete", "{}", job["counts"]);
    let tasks = app.tasks(&id).await;
    let most = tasks
        .iter()
        .map(|t| t["attempts"].as_u64().unwrap())
        .max()
        .unwrap();
    eprintln!(
        "a host down then up: {} connection failures tripped the breaker; tasks took at most {most} attempts",
        20
    );
    assert!(most <= 3);
}
