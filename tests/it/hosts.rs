//! Per-host limits: the server's `--per-host-concurrency` and `--per-host-rate`, the job
//! options of the same names, the pause a 429 sets, and the fairness between a job held
//! back by a limited host and jobs calling other hosts.
//!
//! Each test reads what a local endpoint saw (arrival times, calls in flight) rather than
//! how long a job took.

use std::time::{Duration, Instant};

use doparallel::Settings;
use doparallel::job::{HostConcurrency, HostLimits};
use serde_json::json;

use crate::helpers::{
    Endpoint, ServerProcess, TestApp, db_path, eventually, job_of, spawn_app_with, test_settings,
};

/// How far an arrival may be from the gate's slot: a late timer, then the trip over
/// loopback to the endpoint's handler.
const JITTER: Duration = Duration::from_millis(100);

fn limited(per_host: HostLimits) -> Settings {
    Settings {
        per_host,
        ..test_settings()
    }
}

fn concurrency(n: u32) -> HostLimits {
    HostLimits {
        concurrency: Some(HostConcurrency::Fixed(n)),
        rate: None,
    }
}

fn rate(r: f64) -> HostLimits {
    HostLimits {
        concurrency: None,
        rate: Some(r),
    }
}

/// Checks arrivals against a bucket of one token refilled `rate` times a second: calls
/// start at least 1/rate apart at the gate, so a window of length `w` holds at most
/// ⌊(w + JITTER)·rate⌋ + 1 arrivals, wherever it starts. Also checks that the limit does
/// not hold calls back much more than it should: the arrivals span at most twice the
/// time the rate needs for them, plus a second.
fn check_rate(mut arrivals: Vec<Instant>, rate: f64, what: &str) {
    arrivals.sort();
    assert!(arrivals.len() >= 2, "{what}: too few calls to judge a rate");
    for window in [
        Duration::from_millis(250),
        Duration::from_millis(500),
        Duration::from_secs(1),
    ] {
        let most = ((window + JITTER).as_secs_f64() * rate).floor() as usize + 1;
        for (i, &start) in arrivals.iter().enumerate() {
            let inside = arrivals[i..]
                .iter()
                .take_while(|&&at| at < start + window)
                .count();
            assert!(
                inside <= most,
                "{what}: {inside} calls within {window:?} (at most {most} at {rate}/s): {:?}",
                offsets(&arrivals)
            );
        }
    }
    let span = *arrivals.last().unwrap() - arrivals[0];
    let needed = Duration::from_secs_f64((arrivals.len() - 1) as f64 / rate);
    assert!(
        span <= needed * 2 + Duration::from_secs(1),
        "{what}: {} calls took {span:?}, the rate needs {needed:?}",
        arrivals.len()
    );
}

/// Arrival times in milliseconds from the first, for failure messages.
fn offsets(arrivals: &[Instant]) -> Vec<u64> {
    arrivals
        .iter()
        .map(|at| (*at - arrivals[0]).as_millis() as u64)
        .collect()
}

async fn waiting_at_gates(app: &TestApp) -> f64 {
    app.metric("doparallel_host_gate_waiting")
        .await
        .expect("the gauge is exported")
}

#[tokio::test]
async fn per_host_concurrency_caps_each_host_across_jobs() {
    let app = spawn_app_with(limited(concurrency(3))).await;
    let (one, other) = (Endpoint::start().await, Endpoint::start().await);
    let slow = |e: &Endpoint| e.url("slow?ms=80");
    let jobs = [
        app.submit(&job_of(12, &slow(&one), None, json!({}))).await,
        app.submit(&job_of(12, &slow(&one), None, json!({}))).await,
        app.submit(&job_of(12, &slow(&other), None, json!({})))
            .await,
    ];
    // Calls queue at the gates: 24 for three places at the first host.
    eventually("calls waiting at a host's gate", || async {
        (waiting_at_gates(&app).await > 0.0).then_some(())
    })
    .await;
    for id in &jobs {
        let job = app.wait_settled(id).await;
        assert_eq!(job["counts"]["complete"], 12, "{job}");
    }
    // Both jobs at the first host share its three places; the other host has its own.
    let most = |e: &Endpoint| e.calls().iter().map(|c| c.concurrent).max();
    assert_eq!(most(&one), Some(3));
    assert_eq!(most(&other), Some(3));
    assert_eq!(one.max_in_flight(), 3);
    assert_eq!(waiting_at_gates(&app).await, 0.0);
}

#[tokio::test]
async fn per_host_rate_spaces_the_calls_to_a_host() {
    let app = spawn_app_with(limited(rate(20.0))).await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&job_of(30, &endpoint.url("echo"), None, json!({})))
        .await;
    let job = app.wait_settled(&id).await;
    assert_eq!(job["counts"]["complete"], 30, "{job}");
    let arrivals = endpoint.calls().iter().map(|c| c.at).collect();
    check_rate(arrivals, 20.0, "the server's 20/s");
}

#[tokio::test]
async fn a_429_pauses_every_call_to_its_host() {
    // Ten calls a second, so that calls are still to come when the first answer arrives.
    let app = spawn_app_with(limited(rate(10.0))).await;
    let (throttled, elsewhere) = (Endpoint::start().await, Endpoint::start().await);
    // The first call to `/throttle`, of either job, gets a 429 with `Retry-After: 1`.
    let jobs = [
        app.submit(&job_of(4, &throttled.url("throttle"), None, json!({})))
            .await,
        app.submit(&job_of(4, &throttled.url("throttle"), None, json!({})))
            .await,
    ];
    let other_host = app
        .submit(&job_of(3, &elsewhere.url("echo"), None, json!({})))
        .await;
    for id in &jobs {
        let job = app.wait_settled(id).await;
        assert_eq!(job["status"], "Complete", "{job}");
        assert_eq!(job["counts"]["complete"], 4, "{job}");
    }
    app.wait_settled(&other_host).await;

    let calls = throttled.calls();
    // Eight tasks, one of them called twice.
    assert_eq!(calls.len(), 9);
    let paused_at = calls[0].at;
    let pause_ends = paused_at + Duration::from_millis(990);
    let during: Vec<_> = calls
        .iter()
        .filter(|c| c.at > paused_at && c.at <= pause_ends)
        .collect();
    // A call whose turn came before the 429 was read may still arrive; no more.
    assert!(
        during.len() <= 1,
        "{} calls during the pause: {:?}",
        during.len(),
        offsets(&calls.iter().map(|c| c.at).collect::<Vec<_>>())
    );
    // The job that did not get the 429 was held back too.
    let hit = calls[0].header("doparallel-job-id");
    assert!(
        calls
            .iter()
            .any(|c| c.header("doparallel-job-id") != hit && c.at > pause_ends),
        "the other job's calls did not wait for the pause"
    );
    // Another host was not paused.
    assert!(
        elsewhere
            .calls()
            .iter()
            .any(|c| c.at > paused_at && c.at <= pause_ends),
        "the other host was held back too"
    );
    assert_eq!(app.metric("doparallel_host_pauses_total").await, Some(1.0));
}

#[tokio::test]
async fn a_jobs_own_limits_hold_for_it_alone() {
    let app = spawn_app_with(limited(HostLimits::UNLIMITED)).await;
    let endpoint = Endpoint::start().await;
    let url = endpoint.url("slow?ms=100");
    let limited = app
        .submit(&job_of(
            10,
            &url,
            None,
            json!({"per_host_concurrency": 2, "per_host_rate": 20}),
        ))
        .await;
    let free = app.submit(&job_of(10, &url, None, json!({}))).await;
    for id in [&limited, &free] {
        let job = app.wait_settled(id).await;
        assert_eq!(job["counts"]["complete"], 10, "{job}");
    }
    assert_eq!(endpoint.max_in_flight_of(&limited), 2);
    // The other job, at the same host, met no limit: its calls went out together.
    let others = endpoint.max_in_flight_of(&free);
    assert!(
        others >= 4,
        "only {others} calls of the unlimited job at once"
    );
    let arrivals = endpoint
        .calls()
        .iter()
        .filter(|c| c.header("doparallel-job-id") == limited)
        .map(|c| c.at)
        .collect();
    check_rate(arrivals, 20.0, "the job's 20/s");
    // The options are shown with the job.
    let job = app.job(&limited).await;
    assert_eq!(job["options"]["per_host_concurrency"], 2);
    assert_eq!(job["options"]["per_host_rate"], 20.0);
}

#[tokio::test]
async fn a_job_held_by_a_slow_host_does_not_starve_another_host() {
    let app = spawn_app_with(Settings {
        max_in_flight: 16,
        ..test_settings()
    })
    .await;
    let (slow_host, other_host) = (Endpoint::start().await, Endpoint::start().await);
    // Four calls a second: 50 s for the whole job, which is cancelled long before.
    let held = app
        .submit(&job_of(
            200,
            &slow_host.url("echo"),
            None,
            json!({"per_host_rate": 4}),
        ))
        .await;
    // Its calls queue at the gate (a claim gives it about a second's worth at a time).
    eventually("the limited job's calls to queue", || async {
        (waiting_at_gates(&app).await >= 4.0).then_some(())
    })
    .await;
    let other = app
        .submit(&job_of(100, &other_host.url("echo"), None, json!({})))
        .await;
    let job = app.wait_settled(&other).await;
    assert_eq!(job["counts"]["complete"], 100, "{job}");

    let first = app.job(&held).await;
    assert_eq!(first["status"], "Running", "{first}");
    let done = first["counts"]["complete"].as_u64().unwrap();
    assert!(
        done < 40,
        "the limited job got {done} of 200 done meanwhile"
    );

    let (status, _) = app
        .post_raw(&format!("/v1/jobs/{held}/cancel"), None, "")
        .await;
    assert_eq!(status, 200);
    // Cancelling frees the calls waiting at the gate.
    eventually("the gate to empty", || async {
        (waiting_at_gates(&app).await == 0.0).then_some(())
    })
    .await;
}

/// Calls held at a gate are queued, not running: a job limited to 2 calls a second shows
/// at most the calls truly in flight as running, the rest claimed as queued, and claims
/// give it about a second's worth at a time rather than every free slot.
#[tokio::test]
async fn tasks_held_at_a_gate_are_queued_not_running() {
    let app = spawn_app_with(test_settings()).await;
    let endpoint = Endpoint::start().await;
    let id = app
        .submit(&job_of(
            30,
            &endpoint.url("slow?ms=100"),
            None,
            json!({"per_host_rate": 2}),
        ))
        .await;
    let mut saw_queued = false;
    for _ in 0..20 {
        let job = app.job(&id).await;
        let counts = &job["counts"];
        let (running, queued) = (
            counts["running"].as_u64().unwrap(),
            counts["queued"].as_u64().unwrap(),
        );
        // At 2 calls a second of 100 ms each, at most one is in flight at a time.
        assert!(running <= 1, "{counts}");
        assert!(
            running + queued <= 6,
            "claimed far past a second's worth: {counts}"
        );
        saw_queued |= queued > 0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_queued, "nothing was ever queued at the gate");
    let (status, _) = app
        .post_raw(&format!("/v1/jobs/{id}/cancel"), None, "")
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_calls_held_at_a_gate() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let endpoint = Endpoint::start().await;
    // One call every 20 s: after the first, the others wait at the gate far longer than
    // the stop below may take, though well within its grace period.
    let mut first =
        ServerProcess::start(&db, &["--per-host-rate", "0.05", "--shutdown-grace", "60"]);
    let id = first
        .api
        .submit(&job_of(3, &endpoint.url("echo"), None, json!({})))
        .await;
    eventually("the first call", || async {
        (endpoint.call_count() == 1).then_some(())
    })
    .await;
    let stopping = Instant::now();
    first.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || first.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the stop waited {took:?} for calls that had not started"
    );
    assert_eq!(endpoint.call_count(), 1, "a held call was made at the stop");

    // The held calls were never made: the next start makes them.
    let second = ServerProcess::start(&db, &[]);
    let job = second.api.wait_settled(&id).await;
    assert_eq!(job["counts"]["complete"], 3, "{job}");
    let per_key = endpoint.calls_per_key();
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
}
