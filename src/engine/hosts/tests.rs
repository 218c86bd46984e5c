//! The host gates' own tests: limits, pacing and pauses on a paused clock.

use super::*;

fn gates(server: HostLimits) -> Arc<HostGates> {
    Arc::new(HostGates::new(
        server,
        Adaptation::default(),
        HostMetrics::default(),
    ))
}

fn rate(r: f64) -> HostLimits {
    HostLimits {
        concurrency: None,
        rate: Some(r),
    }
}

fn concurrency(n: u32) -> HostLimits {
    HostLimits {
        concurrency: Some(HostConcurrency::Fixed(n)),
        rate: None,
    }
}

fn host(name: &str) -> Arc<str> {
    name.into()
}

/// Starts `n` calls of `job` at `host` at once, each holding its pass for `hold`;
/// returns when each passed, in milliseconds from the start.
async fn starts(
    gates: &Arc<HostGates>,
    job: JobId,
    limits: HostLimits,
    name: &str,
    n: usize,
    hold: Duration,
) -> Vec<u64> {
    let start = Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let gates = gates.clone();
            let name = host(name);
            tokio::spawn(async move {
                let pass = gates.pass(job, limits, name).await;
                let at = (Instant::now() - start).as_millis() as u64;
                tokio::time::sleep(hold).await;
                drop(pass);
                at
            })
        })
        .collect();
    let mut times = Vec::new();
    for call in calls {
        times.push(call.await.unwrap());
    }
    times.sort();
    times
}

#[test]
fn host_keys() {
    let check = |url: &str, key: Option<&str>| {
        assert_eq!(host_key(url).as_deref(), key, "{url}");
    };
    check("http://API.Example.com/x?y", Some("api.example.com"));
    check(
        "https://api.example.com:8443/",
        Some("api.example.com:8443"),
    );
    check("http://api.example.com:80/", Some("api.example.com"));
    check("http://127.0.0.1:9000/a", Some("127.0.0.1:9000"));
    check("http://[::1]:9000/a", Some("[::1]:9000"));
    check("/v1/test", None);
}

#[tokio::test(start_paused = true)]
async fn a_rate_spaces_calls_evenly_without_a_burst() {
    let gates = gates(rate(10.0));
    let job = JobId::generate();
    let times = starts(&gates, job, HostLimits::UNLIMITED, "h", 5, Duration::ZERO).await;
    assert_eq!(times, [0, 100, 200, 300, 400]);
}

#[tokio::test(start_paused = true)]
async fn a_bucket_that_filled_up_gives_one_call_at_once_not_a_burst() {
    let gates = gates(rate(10.0));
    let job = JobId::generate();
    starts(
        &gates,
        job,
        HostLimits::UNLIMITED,
        "h",
        1,
        Duration::from_secs(5),
    )
    .await;
    let times = starts(&gates, job, HostLimits::UNLIMITED, "h", 3, Duration::ZERO).await;
    assert_eq!(times, [0, 100, 200]);
}

#[tokio::test(start_paused = true)]
async fn concurrency_holds_calls_until_a_pass_is_dropped() {
    let gates = gates(concurrency(2));
    let job = JobId::generate();
    let times = starts(
        &gates,
        job,
        HostLimits::UNLIMITED,
        "h",
        5,
        Duration::from_millis(50),
    )
    .await;
    assert_eq!(times, [0, 0, 50, 50, 100]);
}

#[tokio::test(start_paused = true)]
async fn hosts_are_limited_apart() {
    let gates = gates(rate(1.0));
    let job = JobId::generate();
    let (a, b) = tokio::join!(
        starts(&gates, job, HostLimits::UNLIMITED, "a", 2, Duration::ZERO),
        starts(
            &gates,
            job,
            HostLimits::UNLIMITED,
            "b:81",
            2,
            Duration::ZERO
        ),
    );
    assert_eq!((a, b), (vec![0, 1000], vec![0, 1000]));
}

#[tokio::test(start_paused = true)]
async fn a_jobs_limits_apply_to_it_alone_on_top_of_the_servers() {
    let gates = gates(rate(10.0));
    let (slow, other) = (JobId::generate(), JobId::generate());
    let (a, b) = tokio::join!(
        starts(&gates, slow, rate(2.0), "h", 3, Duration::ZERO),
        starts(&gates, other, HostLimits::UNLIMITED, "h", 3, Duration::ZERO),
    );
    // Its first call may queue behind the other job's at the server's gate.
    assert!(a[0] <= 300 && a[1..] == [500, 1000], "{a:?}");
    // The other job shares the server's 10 a second with the first.
    assert!(b.iter().all(|&t| t <= 300), "{b:?}");
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_every_new_call_then_the_rate_resumes_from_empty() {
    let gates = gates(rate(10.0));
    let job = JobId::generate();
    starts(&gates, job, HostLimits::UNLIMITED, "h", 1, Duration::ZERO).await;
    // Held by the host so that its entry stays, as a call's own pass does.
    let held = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    gates.pause("h", job, Duration::from_secs(1), true);
    let times = starts(
        &gates,
        JobId::generate(),
        rate(100.0),
        "h",
        3,
        Duration::ZERO,
    )
    .await;
    drop(held);
    assert_eq!(times, [1000, 1100, 1200]);
    assert_eq!(gates.metrics.pauses.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_hosts_without_limits_too_and_can_be_extended() {
    let gates = gates(HostLimits::UNLIMITED);
    let job = JobId::generate();
    let held = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    gates.pause("h", job, Duration::from_millis(500), true);
    let waiter = tokio::spawn({
        let gates = gates.clone();
        async move {
            let start = Instant::now();
            let _pass = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
            (Instant::now() - start).as_millis()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gates.pause("h", job, Duration::from_millis(1000), true);
    // A shorter pause than the one in force changes nothing.
    gates.pause("h", job, Duration::from_millis(10), true);
    assert_eq!(waiter.await.unwrap(), 1200);
    assert_eq!(gates.metrics.pauses.get(), 2);
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_gives_up_waiting_leaves_no_gap() {
    let gates = gates(rate(1.0));
    let job = JobId::generate();
    let _first = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    let start = Instant::now();
    let given_up = tokio::time::timeout(
        Duration::from_millis(300),
        gates.pass(job, HostLimits::UNLIMITED, host("h")),
    )
    .await;
    assert!(given_up.is_err());
    assert_eq!(gates.metrics.waiting.get(), 0);
    let _second = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    assert_eq!((Instant::now() - start).as_millis(), 1000);
}

/// Lets every spawned task run until it waits on something: the paused clock moves
/// only once all of them do.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn waiter(
    gates: &Arc<HostGates>,
    job: JobId,
    limits: HostLimits,
    name: &'static str,
) -> tokio::task::JoinHandle<()> {
    let gates = gates.clone();
    tokio::spawn(async move {
        let _pass = gates.pass(job, limits, host(name)).await;
    })
}

fn sorted(mut jobs: Vec<JobId>) -> Vec<JobId> {
    jobs.sort();
    jobs
}

#[tokio::test(start_paused = true)]
async fn jobs_with_more_waiting_than_soon_startable_are_backlogged() {
    let gates = gates(concurrency(2));
    let (busy, light) = (JobId::generate(), JobId::generate());
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(gates.pass(busy, HostLimits::UNLIMITED, host("h")).await);
    }
    // Two waiting at a limit of two: they start as soon as the calls in flight end.
    let mut waiters: Vec<_> = (0..2)
        .map(|_| waiter(&gates, busy, HostLimits::UNLIMITED, "h"))
        .collect();
    settle().await;
    assert_eq!(gates.metrics.waiting.get(), 2);
    assert_eq!(gates.backlogged_jobs(), Vec::<JobId>::new());
    waiters.push(waiter(&gates, busy, HostLimits::UNLIMITED, "h"));
    // A job with a limit of its own of one a second: its first call goes at once, the
    // next two wait.
    for _ in 0..3 {
        waiters.push(waiter(&gates, light, rate(1.0), "other"));
    }
    settle().await;
    assert_eq!(gates.metrics.waiting.get(), 5);
    assert_eq!(sorted(gates.backlogged_jobs()), sorted(vec![busy, light]));
    // The backlog clears as calls start; the dispatcher hears of it.
    held.clear();
    tokio::time::timeout(Duration::from_millis(10), gates.cleared())
        .await
        .expect("the busy job's backlog clears");
    assert_eq!(gates.backlogged_jobs(), vec![light]);
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(gates.backlogged_jobs(), Vec::<JobId>::new());
    assert_eq!(gates.metrics.waiting.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_long_pause_backlogs_any_job_waiting_at_the_host() {
    let gates = gates(HostLimits::UNLIMITED);
    let job = JobId::generate();
    let held = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    gates.pause("h", job, Duration::from_secs(5), true);
    let w = waiter(&gates, job, HostLimits::UNLIMITED, "h");
    settle().await;
    assert_eq!(gates.backlogged_jobs(), vec![job]);
    drop(held);
    w.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_gates_are_dropped() {
    let gates = gates(HostLimits::UNLIMITED);
    let job = JobId::generate();
    for i in 0..10 {
        starts(&gates, job, rate(5.0), &format!("h{i}"), 2, Duration::ZERO).await;
    }
    // Each job's bucket is still refilling: its gate stays so that its rate holds.
    assert_eq!(gates.hosts(), 10);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A gate with nothing to keep goes with its last call.
    starts(
        &gates,
        job,
        HostLimits::UNLIMITED,
        "once",
        1,
        Duration::ZERO,
    )
    .await;
    assert_eq!(gates.hosts(), 10);
    // The ten left over go at the next sweep, when the map has grown to SWEEP_MIN.
    let mut held = Vec::new();
    for i in 0..SWEEP_MIN - 10 {
        held.push(
            gates
                .pass(job, HostLimits::UNLIMITED, host(&format!("x{i}")))
                .await,
        );
    }
    assert_eq!(gates.hosts(), SWEEP_MIN);
    held.push(gates.pass(job, HostLimits::UNLIMITED, host("y")).await);
    assert_eq!(gates.hosts(), SWEEP_MIN - 10 + 1);
    held.clear();
    assert_eq!(gates.hosts(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_holds_calls_after_failures_in_a_row_and_one_probe_decides() {
    let gates = Arc::new(HostGates::new(
        HostLimits::UNLIMITED,
        Adaptation {
            initial: 16,
            breaker_failures: 3,
        },
        HostMetrics::default(),
    ));
    let job = JobId::generate();
    let start = Instant::now();
    let elapsed = || (Instant::now() - start).as_millis() as u64;
    // An answer between failures starts the count again.
    for signal in [
        Signal::Unreachable,
        Signal::Unreachable,
        Signal::Reachable,
        Signal::Unreachable,
        Signal::Unreachable,
    ] {
        gates
            .pass(job, HostLimits::UNLIMITED, host("h"))
            .await
            .finish(signal);
    }
    assert_eq!(gates.metrics.breaker_trips.get(), 0);
    assert_eq!(elapsed(), 0);
    // The third in a row opens it: the next call waits out a second, and is the probe.
    gates
        .pass(job, HostLimits::UNLIMITED, host("h"))
        .await
        .finish(Signal::Unreachable);
    assert_eq!(gates.metrics.breaker_trips.get(), 1);
    assert_eq!(
        gates.backlogged_jobs(),
        Vec::<JobId>::new(),
        "nobody waits yet"
    );
    let probe = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    assert_eq!(elapsed(), 1000);
    // Meanwhile others wait for the probe's answer, and their jobs are not claimed for.
    let other = waiter(&gates, job, HostLimits::UNLIMITED, "h");
    settle().await;
    assert!(!other.is_finished());
    assert_eq!(gates.backlogged_jobs(), vec![job]);
    // A failed probe doubles the cool-down; the next call is the next probe.
    probe.finish(Signal::Unreachable);
    let probe = loop {
        // The waiter takes the probe's turn; wait for it to finish and take the next.
        if other.is_finished() {
            break gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
        }
        settle().await;
    };
    assert!(elapsed() >= 3000, "{}", elapsed());
    // It answers: the breaker closes, and calls go at once.
    probe.finish(Signal::Answered(Duration::from_millis(5)));
    let before = elapsed();
    starts(&gates, job, HostLimits::UNLIMITED, "h", 5, Duration::ZERO).await;
    assert_eq!(elapsed(), before);
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_learns_from_what_calls_say() {
    let gates = Arc::new(HostGates::new(
        HostLimits {
            concurrency: Some(HostConcurrency::Auto),
            rate: None,
        },
        Adaptation {
            initial: 4,
            breaker_failures: 0,
        },
        HostMetrics::default(),
    ));
    let job = JobId::generate();
    let label = HostLabel { host: "h".into() };
    // Four at once; a fifth waits.
    let mut passes = Vec::new();
    for _ in 0..4 {
        passes.push(gates.pass(job, HostLimits::UNLIMITED, host("h")).await);
    }
    let fifth = waiter(&gates, job, HostLimits::UNLIMITED, "h");
    settle().await;
    assert!(!fifth.is_finished());
    // A round of answers at the usual latency: one more.
    for pass in passes.drain(..) {
        pass.finish(Signal::Answered(Duration::from_millis(10)));
    }
    fifth.await.unwrap();
    assert_eq!(gates.metrics.limits.get_or_create(&label).get(), 5);
    // A 429: halved.
    gates
        .pass(job, HostLimits::UNLIMITED, host("h"))
        .await
        .finish(Signal::Overloaded);
    assert_eq!(gates.metrics.limits.get_or_create(&label).get(), 2);
    // Without Retry-After, a 429 does not pause a host under an adaptive limit.
    let held = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    gates.pause("h", job, Duration::from_secs(1), false);
    assert_eq!(gates.metrics.pauses.get(), 0);
    gates.pause("h", job, Duration::from_secs(1), true);
    assert_eq!(gates.metrics.pauses.get(), 1);
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_holds_calls_that_waited_at_the_gates_when_it_opened() {
    let gates = Arc::new(HostGates::new(
        concurrency(1),
        Adaptation {
            initial: 16,
            breaker_failures: 1,
        },
        HostMetrics::default(),
    ));
    let job = JobId::generate();
    let start = Instant::now();
    let first = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
    // The second waits for the host's one place.
    let second = tokio::spawn({
        let gates = gates.clone();
        async move {
            let _pass = gates.pass(job, HostLimits::UNLIMITED, host("h")).await;
            (Instant::now() - start).as_millis() as u64
        }
    });
    settle().await;
    first.finish(Signal::Unreachable);
    // It got the place as the breaker opened: it waits out the cool-down all the same
    // (from the failure, a millisecond in).
    assert_eq!(second.await.unwrap(), 1001);
}
