//! The call's own tests: classification, retry policy, headers.

use super::*;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().unwrap());
    }
    h
}

/// Classifies a response and renders the decision as a short string.
fn check(status: u16, hdrs: &[(&'static str, &str)], body: &str, expected: &str) {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let got = match classify(
        StatusCode::from_u16(status).unwrap(),
        &headers(hdrs),
        body.as_bytes(),
        now,
        &JobOptions::defaults(),
    ) {
        Attempt::Complete(r) => format!("complete {}", r.get()),
        Attempt::Retryable { error, retry_after } => {
            format!(
                "retry {} {:?}",
                error.kind,
                retry_after.map(|d| d.as_secs())
            )
        }
        Attempt::Fatal(error) => format!("fatal {} {:?}", error.kind, error.http_status),
        Attempt::Accepted => unreachable!("classify never waits for a report"),
    };
    assert_eq!(got, expected, "status {status} body {body:?}");
}

#[test]
fn classification() {
    check(200, &[], r#"{"a":1}"#, r#"complete {"a":1}"#);
    check(
        200,
        &[],
        " 12345678901234567890123.50 ",
        "complete 12345678901234567890123.50",
    );
    check(201, &[], "plain text", r#"complete "plain text""#);
    check(204, &[], "", "complete null");
    check(500, &[], "", "retry http_status None");
    check(
        503,
        &[("retry-after", "7")],
        "",
        "retry http_status Some(7)",
    );
    check(
        429,
        &[("retry-after", "Mon, 12 Jan 1970 13:46:50 GMT")],
        "",
        "retry http_status Some(10)",
    );
    check(
        429,
        &[("retry-after", "99999")],
        "",
        "retry http_status Some(3600)",
    );
    check(408, &[], "", "retry http_status None");
    check(425, &[], "", "retry http_status None");
    check(404, &[], "nope", "fatal http_status Some(404)");
    check(
        302,
        &[("location", "/x")],
        "",
        "fatal http_status Some(302)",
    );
    check(400, &[], "", "fatal http_status Some(400)");
}

#[test]
fn which_answers_pause_their_host() {
    let check = |status: u16, hdrs: &[(&'static str, &str)], expected: Option<u64>| {
        let attempt = classify(
            StatusCode::from_u16(status).unwrap(),
            &headers(hdrs),
            b"",
            SystemTime::now(),
            &JobOptions::defaults(),
        );
        assert_eq!(
            host_pause(&attempt).map(|d| d.as_millis() as u64),
            expected,
            "{status} {hdrs:?}"
        );
    };
    check(429, &[("retry-after", "7")], Some(7000));
    check(429, &[], Some(1000));
    check(429, &[("retry-after", "soon")], Some(1000));
    check(429, &[("retry-after", "0")], None);
    check(429, &[("retry-after", "99999")], Some(3_600_000));
    check(503, &[("retry-after", "2")], Some(2000));
    check(503, &[], None);
    check(500, &[("retry-after", "2")], None);
    check(200, &[("retry-after", "2")], None);
    check(404, &[], None);
}

#[test]
fn error_bodies_are_cut_at_a_kib() {
    let long = "x".repeat(5000);
    let Attempt::Fatal(e) = classify(
        StatusCode::BAD_REQUEST,
        &HeaderMap::new(),
        long.as_bytes(),
        SystemTime::now(),
        &JobOptions::defaults(),
    ) else {
        panic!("400 is fatal");
    };
    assert_eq!(e.body.unwrap().len(), ERROR_BODY_BYTES);
}

#[test]
fn retries_stop_at_max_attempts() {
    let options = JobOptions {
        max_attempts: 2,
        ..JobOptions::defaults()
    };
    let mut rng = StdRng::seed_from_u64(1);
    let retry = || Attempt::Retryable {
        error: TaskError::new("connect", "refused"),
        retry_after: None,
    };
    assert!(matches!(
        settle_outcome(&options, 1, retry(), 0, &mut rng),
        SettleOutcome::Retry { .. }
    ));
    assert!(matches!(
        settle_outcome(&options, 2, retry(), 0, &mut rng),
        SettleOutcome::Failed { .. }
    ));
}

#[test]
fn retry_after_beats_a_shorter_backoff() {
    let options = JobOptions {
        backoff_ms: 10,
        ..JobOptions::defaults()
    };
    let mut rng = StdRng::seed_from_u64(1);
    let outcome = Attempt::Retryable {
        error: TaskError::new("http_status", "429"),
        retry_after: Some(Duration::from_secs(2)),
    };
    let SettleOutcome::Retry { run_at, .. } = settle_outcome(&options, 1, outcome, 1000, &mut rng)
    else {
        panic!("expected a retry");
    };
    assert_eq!(run_at, 3000);
}

proptest! {
    #[test]
    fn backoff_stays_within_its_bound(base in 0u64..=BACKOFF_CAP_MS, attempt in 1u32..200, seed: u64) {
        let options = JobOptions { backoff_ms: base, ..JobOptions::defaults() };
        let mut rng = StdRng::seed_from_u64(seed);
        let d = backoff(&options, attempt, &mut rng).as_millis() as u64;
        let bound = (base as u128 * (1u128 << (attempt - 1).min(32))).min(BACKOFF_CAP_MS as u128) as u64;
        prop_assert!(d <= bound);
    }

    #[test]
    fn any_body_becomes_valid_json(body: Vec<u8>) {
        let raw = result_json(&body);
        prop_assert!(serde_json::from_str::<serde_json::Value>(raw.get()).is_ok());
    }
}
