//! Tests of `parse_submission`: what is accepted, and the message of each refusal.

use super::*;
use crate::job::HostLimits;

/// Parses `body` and compares the outcome: `Ok(n)` is a valid job of `n` tasks,
/// `Err(text)` a rejection whose message contains `text`.
fn check(body: &str, expected: Result<usize, &str>) {
    check_with(body, &Limits::defaults(), &EgressPolicy::open(), expected);
}

/// `check` under given limits and guard.
fn check_with(body: &str, limits: &Limits, egress: &EgressPolicy, expected: Result<usize, &str>) {
    match (
        parse_submission(body.as_bytes(), limits, egress, &Sealer::default()),
        expected,
    ) {
        (Ok(job), Ok(n)) => assert_eq!(job.tasks.len(), n, "body {body}"),
        (Err(e), Err(text)) => assert!(
            e.to_string().contains(text),
            "body {body}: error {e:?} does not contain {text:?}"
        ),
        (got, want) => panic!("body {body}: got {got:?}, want {want:?}"),
    }
}

#[test]
fn accepts_the_seed_example() {
    check(
        r#"{"callback":"http://myapi.com/r","tasks":[
            {"endpoint":"http://f.example/e","params":{"variable_a":"22"}},
            {"endpoint":"/v1/test","params":{"variable_a":"12"}}]}"#,
        Ok(2),
    );
}

#[test]
fn callback_and_params_are_optional_and_tasks_may_be_empty() {
    check(r#"{"tasks":[{"endpoint":"/v1/test"}]}"#, Ok(1));
    check(r#"{"tasks":[]}"#, Ok(0));
    check(r#"{"callback":null,"tasks":[],"options":null}"#, Ok(0));
}

#[test]
fn rejections_name_the_field_and_task() {
    check("{", Err("malformed JSON"));
    check("", Err("malformed JSON"));
    check(
        r#"{"calback":"http://x/","tasks":[]}"#,
        Err("unknown field `calback`"),
    );
    check(r#"{"callback":"http://x/"}"#, Err("missing field `tasks`"));
    check(
        r#"{"tasks":{}}"#,
        Err("tasks: expected a list of tasks, got an object"),
    );
    check(
        r#"{"tasks":{"a":1}}"#,
        Err("tasks: expected a list of tasks, got an object"),
    );
    check(
        r#"{"tasks":[{"endpoint":5}]}"#,
        Err("task 1: endpoint: expected a string (an http(s) URL or /v1/test), got the number 5"),
    );
    check(
        r#"{"tasks":[],"callback":true}"#,
        Err("callback: expected a string (an http(s) URL), got true"),
    );
    check(
        r#"[1,2]"#,
        Err(
            "job: expected an object with \"tasks\" (and optionally \"callback\", \"options\" and \"metadata\"), got a list",
        ),
    );
    check(
        r#"{"tasks":[{"endpoint":"/v1/test"},{"endpoint":"ftp://x/"}]}"#,
        Err("task 2: endpoint \"ftp://x/\" is not an absolute http(s) URL"),
    );
    check(
        r#"{"tasks":[{"endpoint":"/v1/test","parms":1}]}"#,
        Err("task 1: unknown field `parms`"),
    );
    check(
        r#"{"tasks":[{"params":1}]}"#,
        Err("task 1: missing field `endpoint`"),
    );
    check(
        r#"{"tasks":[{"endpoint":"/v1/test"},7]}"#,
        Err(
            "task 2: expected an object with \"endpoint\" (and optionally \"params\", \"method\", \"headers\", \"secret_headers\", \"aws_sigv4\" and \"options\"), got the number 7",
        ),
    );
    check(
        r#"{"callback":"not a url","tasks":[]}"#,
        Err("callback: \"not a url\" is not an absolute http(s) URL"),
    );
    check(
        r#"{"tasks":[],"options":{"max_attempt":2}}"#,
        Err("options: unknown field `max_attempt`"),
    );
    check(
        r#"{"tasks":[],"options":{"max_attempts":0}}"#,
        Err("options.max_attempts"),
    );
    check(
        r#"{"tasks":[],"options":{"concurrency":0}}"#,
        Err("options.concurrency"),
    );
    check(
        r#"{"tasks":[],"options":{"timeout_ms":-1}}"#,
        Err("options.timeout_ms: expected a whole number, 0 or more, got the number -1"),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_concurrency":0}}"#,
        Err(
            "options.per_host_concurrency: expected a whole number from 1 to 4294967295, or \"auto\", got the number 0",
        ),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_concurrency":-2}}"#,
        Err(
            "options.per_host_concurrency: expected a whole number from 1 to 4294967295, or \"auto\", got the number -2",
        ),
    );
    check(
        r#"{"tasks":[],"options":{"group":"acme corp"}}"#,
        Err(
            "options.group: \"acme corp\" is not a group name (1 to 128 letters, digits and . - _ : @)",
        ),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_concurrency":"lots"}}"#,
        Err(
            "options.per_host_concurrency: expected a whole number from 1 to 4294967295, or \"auto\", got the string \"lots\"",
        ),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_rate":0}}"#,
        Err("options.per_host_rate: must be between 0.001 and 1000000 calls per second"),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_rate":-0.5}}"#,
        Err("options.per_host_rate: must be between"),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_rate":1e-300}}"#,
        Err("options.per_host_rate: must be between"),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_rate":1e300}}"#,
        Err("options.per_host_rate: must be between"),
    );
    check(r#"{"tasks":[],"options":{"per_host_rate":0.001}}"#, Ok(0));
    // What the store cannot hold is refused, not stored as a negative number.
    check(
        r#"{"tasks":[],"options":{"tolerated_failures":9223372036854775808}}"#,
        Err("options.tolerated_failures: must be at most 9223372036854775807"),
    );
    check(
        r#"{"tasks":[],"options":{"tolerated_failures":9223372036854775807}}"#,
        Ok(0),
    );
    check(
        r#"{"tasks":[],"options":{"per_host_rate":"fast"}}"#,
        Err("options.per_host_rate: expected a number, got the string \"fast\""),
    );
    check(
        r#"{"tasks":[],"options":[]}"#,
        Err("options: expected an object of options, got a list"),
    );
}

#[test]
fn call_settings_are_checked_where_they_are_given() {
    let job = |options: &str, task: &str| {
        format!(
            r#"{{"tasks":[{{"endpoint":"/v1/test"}},{{"endpoint":"http://e.example/"{task}}}],"options":{{{options}}}}}"#
        )
    };
    check(
        &job(
            r#""headers":{"X-A":"1"},"method":"PUT""#,
            r#","headers":{"x-a":"2"},"method":"PATCH""#,
        ),
        Ok(2),
    );
    for (body, expected) in [
        (
            job(r#""headers":{"Host":"x"}"#, ""),
            "options.headers: Host cannot be set",
        ),
        (
            job("", r#","headers":{"Content-Length":"1"}"#),
            "task 2: headers: Content-Length cannot be set",
        ),
        (
            job("", r#","headers":{"X-A":"a\nb"}"#),
            "task 2: headers: the value of X-A holds a line feed (LF)",
        ),
        (
            job(r#""method":"get""#, ""),
            "options.method: unknown variant `get`",
        ),
        (
            job(r#""method":"GET""#, r#","params":[1]"#),
            "task 2: GET: params must be an object",
        ),
        (
            job("", r#","method":"DELETE","params":{"a":{"b":1}}"#),
            "task 2: DELETE: params.a must be a string",
        ),
        (
            job("", r#","options":{"timeout_ms":0}"#),
            "task 2: options.timeout_ms: must be between 1",
        ),
        (
            job("", r#","options":{"max_attempts":101}"#),
            "task 2: options.max_attempts",
        ),
        (
            job("", r#","options":{"concurrency":2}"#),
            "task 2: options: unknown field `concurrency`",
        ),
        (
            job(r#""retry_on":[200]"#, ""),
            "options.retry_on: 200 is not a status worth retrying",
        ),
        (
            job("", r#","options":{"retry_on":[99]}"#),
            "task 2: options.retry_on: 99 is not",
        ),
        (
            job("", r#","headers":{"X-A":"1"},"secret_headers":{"x-a":"2"}"#),
            "task 2: X-A is both a header and a secret header",
        ),
        (
            job(
                r#""aws_sigv4":{"service":"lambda","region":"us-east-1"}"#,
                r#","headers":{"Authorization":"x"}"#,
            ),
            "task 2: aws_sigv4: calls to e.example are not signed",
        ),
        (
            job("", r#","aws_sigv4":{"service":"","region":"us-east-1"}"#),
            "task 2: aws_sigv4.service",
        ),
        (
            job(r#""secret_headers":{"X-Key":"v"}"#, ""),
            "options.secret_headers: this server has no secret key",
        ),
        (
            job("", r#","secret_headers":{"X-Key":"v"}"#),
            "task 2: secret_headers: this server has no secret key",
        ),
    ] {
        check(&body, Err(expected));
    }
    // At a Lambda function URL: the headers the signature sets cannot be set.
    let lambda = |task: &str| {
        format!(
            r#"{{"tasks":[{{"endpoint":"https://abc.lambda-url.us-east-1.on.aws/"{task}}}],
                "options":{{"aws_sigv4":{{"service":"lambda","region":"us-east-1"}}}}}}"#
        )
    };
    check(&lambda(""), Ok(1));
    check(
        &lambda(r#","headers":{"X-Amz-Date":"x"}"#),
        Err("task 1: X-Amz-Date cannot be set on a call signed with aws_sigv4"),
    );
    check(
        &lambda(r#","headers":{"Authorization":"x"}"#),
        Err("task 1: Authorization cannot be set on a call signed with aws_sigv4"),
    );
    check(
        &lambda(r#","secret_headers":{"Content-Type":"x"}"#),
        Err("task 1: Content-Type cannot be a secret header on a call signed with aws_sigv4"),
    );
    let many: Vec<String> = (0..65).map(|i| format!(r#""X-{i}":"v""#)).collect();
    check(
        &job(&format!(r#""headers":{{{}}}"#, many.join(",")), ""),
        Err("65 headers per call; at most 64"),
    );
    let big = "v".repeat(8200);
    check(
        &job("", &format!(r#","headers":{{"X-Big":"{big}"}}"#)),
        Err("task 2: the headers of one call take 8205 bytes; at most 8192"),
    );
}

#[test]
fn secret_values_are_sealed_before_anything_else_sees_them() {
    let key = crate::sealing::SecretKey::parse(&crate::sealing::SecretKey::generate()).unwrap();
    let sealer = Sealer::new(Some(key), None);
    let job = parse_submission(
        br#"{"tasks":[{"endpoint":"/v1/test","secret_headers":{"X-Task":"task-secret"},"options":{"retry_on":[]}}],
            "options":{"secret_headers":{"Authorization":"Bearer job-secret"},"callback_headers":{"X-Cb":"1"}}}"#,
        &Limits::defaults(),
        &EgressPolicy::open(),
        &sealer,
    )
    .unwrap();
    let id = job.id.to_string();
    let sealed = &job.options.secret_headers["Authorization"];
    let debug = format!("{job:?}");
    assert!(
        !debug.contains("job-secret") && !debug.contains("task-secret"),
        "{debug}"
    );
    assert_eq!(
        sealer.open(&id, "Authorization", sealed).unwrap(),
        "Bearer job-secret"
    );
    let call = job.tasks[0].call.as_ref().unwrap();
    assert_eq!(
        sealer
            .open(&id, "X-Task", &call.secret_headers["X-Task"])
            .unwrap(),
        "task-secret"
    );
    assert_eq!(call.options.retry_on, Some(vec![]));
    assert!(!job.tasks[0].call_json().unwrap().contains("task-secret"));
    assert_eq!(job.options.masked().secret_headers["Authorization"], "***");
}

#[test]
fn per_host_options_are_kept() {
    let job = parse_submission(
        br#"{"tasks":[],"options":{"per_host_concurrency":3,"per_host_rate":0.5}}"#,
        &Limits::defaults(),
        &EgressPolicy::open(),
        &Sealer::default(),
    )
    .unwrap();
    assert_eq!(
        job.options.host_limits(),
        HostLimits {
            concurrency: Some(crate::job::HostConcurrency::Fixed(3)),
            rate: Some(0.5)
        }
    );
    // Stored as JSON and read back when claimed.
    let text = serde_json::to_string(&job.options).unwrap();
    let back: JobOptions = serde_json::from_str(&text).unwrap();
    assert_eq!(back, job.options);
    // Options stored before these existed read back without them.
    let old: JobOptions =
        serde_json::from_str(r#"{"concurrency":null,"timeout_ms":1,"max_attempts":1,"backoff_ms":0,"tolerated_failures":0}"#)
            .unwrap();
    assert_eq!(old.host_limits(), HostLimits::UNLIMITED);
}

#[test]
fn params_keep_their_exact_text() {
    let body =
        r#"{"tasks":[{"endpoint":"/v1/test","params":{"n": 12345678901234567890123, "f":1.10}}]}"#;
    let job = parse_submission(
        body.as_bytes(),
        &Limits::defaults(),
        &EgressPolicy::open(),
        &Sealer::default(),
    )
    .unwrap();
    assert_eq!(
        job.tasks[0].params.get(),
        r#"{"n":12345678901234567890123,"f":1.10}"#
    );
    let none = parse_submission(
        br#"{"tasks":[{"endpoint":"/v1/test"}]}"#,
        &Limits::defaults(),
        &EgressPolicy::open(),
        &Sealer::default(),
    )
    .unwrap();
    assert_eq!(none.tasks[0].params.get(), "null");
}

/// Parses with small limits and the default guard; `Ok(n)` / `Err(text)` as in `check`.
fn check_limited(body: &str, expected: Result<usize, &str>) {
    let limits = Limits {
        max_tasks: 3,
        max_params_bytes: 10,
        max_url_len: 30,
        max_depth: 5,
        max_task_timeout_ms: 60_000,
        aws_sigv4_hosts: Vec::new(),
    };
    check_with(body, &limits, &EgressPolicy::guarded(Vec::new()), expected);
}

#[test]
fn limits_hold_at_the_limit_and_refuse_one_past_it() {
    let t = r#"{"endpoint":"/v1/test"}"#;
    check_limited(&format!(r#"{{"tasks":[{t},{t},{t}]}}"#), Ok(3));
    check_limited(
        &format!(r#"{{"tasks":[{t},{t},{t},{t}]}}"#),
        Err("tasks: 4 tasks; at most 3"),
    );
    check_limited(r#"{"tasks":[],"options":{"timeout_ms":60000}}"#, Ok(0));
    check_limited(
        r#"{"tasks":[],"options":{"timeout_ms":60001}}"#,
        Err("options.timeout_ms: must be between 1 and 60000 (this server's --max-task-timeout)"),
    );
    // "1234567890" is 12 bytes with its quotes; 10 digits are 10.
    check_limited(
        r#"{"tasks":[{"endpoint":"/v1/test","params":1234567890}]}"#,
        Ok(1),
    );
    check_limited(
        r#"{"tasks":[{"endpoint":"/v1/test","params":12345678901}]}"#,
        Err("task 1: params are 11 bytes; at most 10"),
    );
    // A URL of exactly 30 characters, then 31.
    let at = "https://example.com/abcdefghij";
    assert_eq!(at.len(), 30);
    check_limited(&format!(r#"{{"tasks":[{{"endpoint":"{at}"}}]}}"#), Ok(1));
    check_limited(
        &format!(r#"{{"tasks":[{{"endpoint":"{at}k"}}]}}"#),
        Err("task 1: endpoint URL is 31 characters long; at most 30"),
    );
    check_limited(
        &format!(r#"{{"callback":"{at}k","tasks":[]}}"#),
        Err("callback: URL is 31 characters long"),
    );
    // Depth: the body's object, tasks' array, the task, then params' nesting.
    check_limited(
        r#"{"tasks":[{"endpoint":"/v1/test","params":[[]]}]}"#,
        Ok(1),
    );
    check_limited(
        r#"{"tasks":[{"endpoint":"/v1/test","params":[[[]]]}]}"#,
        Err("job: JSON is nested 6 levels deep; at most 5"),
    );
    check_limited(
        r#"{"tasks":[{"endpoint":"/v1/test","params":"[[[[[[[["}]}"#,
        Ok(1),
    );
}

#[test]
fn denied_literals_are_refused_at_submission() {
    check_limited(
        r#"{"tasks":[{"endpoint":"/v1/test"},{"endpoint":"http://0x7f.1/"}]}"#,
        Err("task 2: endpoint host 127.0.0.1 is a denied address (loopback)"),
    );
    check_limited(
        r#"{"callback":"http://[::ffff:a9fe:a9fe]/","tasks":[]}"#,
        Err("callback: host ::ffff:169.254.169.254 is a denied address (link-local)"),
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
        let _ = parse_submission(&bytes, &Limits::defaults(), &EgressPolicy::open(), &Sealer::default());
    }
}
