//! Tests of the command line: options, secrets and their files, and the settings made of them.

use super::*;

fn check(input: &str, expected: Result<&[u64], &str>) {
    match (input.parse::<Schedule>(), expected) {
        (Ok(s), Ok(millis)) => {
            let got: Vec<u64> = s.0.iter().map(|d| d.as_millis() as u64).collect();
            assert_eq!(got, millis, "input {input:?}");
        }
        (Err(e), Err(text)) => assert!(e.contains(text), "{input:?}: {e:?} lacks {text:?}"),
        (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
    }
}

#[test]
fn schedules() {
    check("5s,5m,30m,2h", Ok(&[5_000, 300_000, 1_800_000, 7_200_000]));
    check("100ms, 1s", Ok(&[100, 1000]));
    check("", Ok(&[]));
    // A bare number is seconds, as for every duration option.
    check("5", Ok(&[5_000]));
    check("1s,5x", Err("entry 2: \"5x\" has unknown unit"));
    check("s", Err("does not start with a whole number"));
}

#[test]
fn every_duration_option_takes_units_and_bare_seconds() {
    let grace = |value: &str| {
        Cli::try_parse_from(["doparallel", "serve", "--shutdown-grace", value])
            .map(|cli| match cli.command {
                Command::Serve(serve) => serve.node.shutdown_grace,
                _ => unreachable!(),
            })
            .map_err(|e| e.to_string())
    };
    assert_eq!(grace("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(grace("30"), Ok(Duration::from_secs(30)));
    assert_eq!(grace("1500ms"), Ok(Duration::from_millis(1500)));
    assert!(grace("30x").unwrap_err().contains("unknown unit"));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
}

#[test]
fn allow_net_takes_a_range_or_an_address() {
    assert_eq!(parse_net("127.0.0.1"), Ok("127.0.0.1/32".parse().unwrap()));
    assert_eq!(parse_net("::1"), Ok("::1/128".parse().unwrap()));
    assert_eq!(parse_net("10.0.0.0/8"), Ok("10.0.0.0/8".parse().unwrap()));
    assert!(
        parse_net("localhost")
            .unwrap_err()
            .contains("neither a range")
    );
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let cli = Cli::try_parse_from([
        "doparallel",
        "serve",
        "--api-token",
        "token-that-must-not-show",
        "--webhook-secret",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ])
    .unwrap();
    let shown = format!("{cli:?}");
    assert!(!shown.contains("token-that-must-not-show"), "{shown}");
    assert!(
        !shown.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "{shown}"
    );
}

#[test]
fn the_client_token_stays_out_of_debug_output() {
    let cli = Cli::try_parse_from(["doparallel", "jobs", "--token", "hunter2"]).unwrap();
    let dump = format!("{cli:?}");
    assert!(!dump.contains("hunter2"), "{dump}");
    assert!(dump.contains("redacted"), "{dump}");
}

#[test]
fn client_options_are_checked_before_any_request() {
    let parse = |args: &[&str]| {
        Cli::try_parse_from(args)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(parse(&["doparallel", "jobs", "--status", "complete"]).is_ok());
    let e = parse(&["doparallel", "jobs", "--status", "Done"]).unwrap_err();
    assert!(e.contains("unknown job status \"Done\""), "{e}");
    let e = parse(&["doparallel", "status", "x", "--server", "localhost:8080"]).unwrap_err();
    assert!(e.contains("is not an http(s) URL"), "{e}");
    let e = parse(&["doparallel", "tasks", "x", "--limit", "0"]).unwrap_err();
    assert!(e.contains("--limit"), "{e}");
}

#[test]
fn per_host_limits_are_checked_at_parse_time() {
    let limits = |args: &[&str]| {
        let mut argv = vec!["doparallel", "serve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .map(|cli| match cli.command {
                Command::Serve(serve) => (
                    serve.node.engine.per_host_concurrency,
                    serve.node.engine.per_host_rate,
                ),
                _ => unreachable!(),
            })
            .map_err(|e| e.to_string())
    };
    assert_eq!(limits(&[]), Ok((None, None)));
    assert_eq!(
        limits(&["--per-host-concurrency", "4", "--per-host-rate", "0.5"]),
        Ok((Some(crate::job::HostConcurrency::Fixed(4)), Some(0.5)))
    );
    assert_eq!(
        limits(&["--per-host-concurrency", "auto"]),
        Ok((Some(crate::job::HostConcurrency::Auto), None))
    );
    for bad in [
        &["--per-host-concurrency", "0"][..],
        &["--per-host-rate", "0"],
        &["--per-host-rate", "-1"],
        &["--per-host-rate", "NaN"],
        &["--per-host-rate", "fast"],
    ] {
        assert!(limits(bad).is_err(), "{bad:?} was accepted");
    }
    let e = limits(&["--per-host-rate", "0"]).unwrap_err();
    assert!(e.contains("must be between 0.001 and 1000000"), "{e}");
}

#[test]
fn the_cli_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}
