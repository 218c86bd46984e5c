//! The planner's rules, played without a database.

use super::*;

#[test]
fn outcomes_decided_early() {
    use crate::job::{JobOptions, JobStatus};
    let plain = JobOptions::defaults();
    assert_eq!(
        decided(&plain, 10, 9, 1),
        None,
        "decided by its last settle"
    );
    let quorum = JobOptions {
        min_complete: Some(3),
        ..JobOptions::defaults()
    };
    assert_eq!(decided(&quorum, 10, 2, 5), None);
    assert_eq!(decided(&quorum, 10, 3, 0), Some(JobStatus::Complete));
    assert_eq!(
        decided(&quorum, 10, 2, 8),
        Some(JobStatus::Failed),
        "3 out of reach"
    );
    let fast = JobOptions {
        fail_fast: true,
        tolerated_failures: 1,
        ..JobOptions::defaults()
    };
    assert_eq!(decided(&fast, 10, 5, 1), None);
    assert_eq!(decided(&fast, 10, 5, 2), Some(JobStatus::Failed));
}

/// Plays a claim to its end, every job giving all it is asked for.
fn drain(plan: &mut FairShare) {
    loop {
        let round = plan.round();
        if round.is_empty() {
            break;
        }
        for (i, want) in round {
            plan.got(i, want, want);
        }
    }
}

/// Plays a claim over jobs with `due` tasks each (and the given owners and headroom);
/// returns what each job got.
fn play(limit: u64, jobs: &[(Option<&str>, u64, u64)], limits: &OwnerLimits) -> Vec<u64> {
    let levels = vec![0; jobs.len()];
    play_levels(limit, jobs, &levels, limits)
}

/// [`play`] with each job's level.
fn play_levels(
    limit: u64,
    jobs: &[(Option<&str>, u64, u64)],
    levels: &[i32],
    limits: &OwnerLimits,
) -> Vec<u64> {
    let mut plan = FairShare::new(
        limit,
        jobs.iter()
            .zip(levels)
            .map(|(&(o, h, _), &l)| (o, None, h, l)),
        limits,
    );
    let mut due: Vec<u64> = jobs.iter().map(|&(_, _, d)| d).collect();
    loop {
        let round = plan.round();
        if round.is_empty() {
            break;
        }
        for (i, want) in round {
            let got = want.min(due[i]);
            due[i] -= got;
            plan.got(i, want, got);
        }
    }
    (0..jobs.len()).map(|i| plan.claimed(i)).collect()
}

const NONE: u64 = u64::MAX;

#[test]
fn jobs_share_equally_and_leftovers_go_to_the_others() {
    let free = OwnerLimits::default();
    assert_eq!(play(9, &[(None, NONE, 100); 3], &free), [3, 3, 3]);
    // One job has only 1 due: the other two take the rest.
    assert_eq!(
        play(
            9,
            &[(None, NONE, 1), (None, NONE, 100), (None, NONE, 100)],
            &free
        ),
        [1, 4, 4]
    );
    // Concurrency bounds a job.
    assert_eq!(play(9, &[(None, 2, 100), (None, NONE, 100)], &free), [2, 7]);
    // Fewer slots than jobs: the first ones, one each.
    assert_eq!(play(2, &[(None, NONE, 5); 3], &free), [1, 1, 0]);
    // Nothing due anywhere.
    assert_eq!(play(5, &[(None, NONE, 0)], &free), [0]);
}

#[test]
fn higher_levels_first_and_lower_ones_on_what_is_left() {
    let free = OwnerLimits::default();
    let jobs = [(None, NONE, 100), (None, NONE, 100), (None, NONE, 100)];
    // The two jobs of priority 5 share every slot; the one of 0 waits.
    assert_eq!(play_levels(10, &jobs, &[0, 5, 5], &free), [0, 5, 5]);
    // They have 3 due between them: the rest goes down a level.
    let jobs = [(None, NONE, 100), (None, NONE, 1), (None, NONE, 2)];
    assert_eq!(play_levels(10, &jobs, &[0, 5, 5], &free), [7, 1, 2]);
    // Their concurrency is full: the same.
    let jobs = [(None, NONE, 100), (None, 2, 100)];
    assert_eq!(play_levels(10, &jobs, &[-3, 7], &free), [8, 2]);
}

#[test]
fn a_job_waiting_too_long_is_served_with_the_highest() {
    let minute = 60_000;
    let now = 10 * minute;
    // Priority 0 served just now, -5 not for a minute, 3 not for an hour.
    let jobs = [(0, now), (-5, now - minute), (3, now - 60 * minute)];
    assert_eq!(levels(now, minute, &jobs), [0, 3, 3]);
    // Short of the wait it keeps its own; the highest never moves.
    assert_eq!(levels(now, 2 * minute, &jobs), [0, -5, 3]);
    // All of one priority: none moves, least recently served first as ever.
    assert_eq!(levels(now, minute, &[(1, 0), (1, now)]), [1, 1]);
}

#[test]
fn groups_share_first_then_their_jobs() {
    let free = OwnerLimits::default();
    let play_groups = |limit: u64, jobs: &[(Option<&'static str>, Option<&'static str>)]| {
        let mut plan = FairShare::new(limit, jobs.iter().map(|&(o, g)| (o, g, NONE, 0)), &free);
        drain(&mut plan);
        (0..jobs.len()).map(|i| plan.claimed(i)).collect::<Vec<_>>()
    };
    // A group of four jobs and one of a single job: half each, then split.
    let jobs = [
        (None, Some("big")),
        (None, Some("big")),
        (None, Some("big")),
        (None, Some("big")),
        (None, Some("small")),
    ];
    assert_eq!(play_groups(8, &jobs), [1, 1, 1, 1, 4]);
    // A job without a group is a group of its own.
    let jobs = [(None, Some("big")), (None, Some("big")), (None, None)];
    assert_eq!(play_groups(8, &jobs), [2, 2, 4]);
    // One name under two owners is two groups; owners share first.
    let jobs = [
        (Some("a"), Some("g")),
        (Some("a"), Some("g")),
        (Some("b"), Some("g")),
    ];
    assert_eq!(play_groups(8, &jobs), [2, 2, 4]);
}

#[test]
fn a_group_gets_no_more_than_its_room() {
    let free = OwnerLimits::default();
    let jobs = [
        (None, Some("capped")),
        (None, Some("capped")),
        (None, Some("open")),
    ];
    let mut plan = FairShare::new(12, jobs.iter().map(|&(o, g)| (o, g, NONE, 0)), &free);
    plan.limit_group(&group_key(None, "capped"), 3);
    plan.limit_group(&group_key(None, "unknown"), 0);
    drain(&mut plan);
    let got: Vec<u64> = (0..3).map(|i| plan.claimed(i)).collect();
    assert_eq!(got[0] + got[1], 3, "{got:?}");
    assert_eq!(
        got[2], 9,
        "what the capped group cannot take goes to the other"
    );
    // A group with no room at all: its jobs are held, and moved back by the backend.
    let mut plan = FairShare::new(4, jobs.iter().map(|&(o, g)| (o, g, NONE, 0)), &free);
    plan.limit_group(&group_key(None, "capped"), 0);
    for (i, want) in plan.round() {
        plan.got(i, want, want);
    }
    assert!(plan.held(0) && plan.held(1) && !plan.held(2));
    assert_eq!(plan.claimed(2), 4);
    // Below the level served, a job of a full group keeps its place (and its wait).
    let mut plan = FairShare::new(
        4,
        [(None, Some("full"), NONE, 0), (None, Some("open"), NONE, 5)],
        &free,
    );
    plan.limit_group(&group_key(None, "full"), 0);
    for (i, want) in plan.round() {
        plan.got(i, want, want);
    }
    assert!(!plan.held(0), "below the level served");
    // Nothing served at all: the held ones move on.
    let mut plan = FairShare::new(4, [(None, Some("full"), NONE, 0)], &free);
    plan.limit_group(&group_key(None, "full"), 0);
    assert!(plan.round().is_empty());
    assert!(plan.held(0));
    let mut claim = super::super::Claim::default();
    plan.ask_again(&mut claim, 4, true, 1_000);
    assert_eq!(
        claim.next_due,
        Some(1_050),
        "the jobs behind are looked at soon"
    );
    let mut claim = super::super::Claim::default();
    plan.ask_again(&mut claim, 4, false, 1_000);
    assert_eq!(claim.next_due, None, "nothing behind them");
    // The README's example: 8 slots, `acme`'s four jobs and `beta`'s one, `acme` with
    // room for 2 more calls.
    let jobs = [
        (None, Some("acme")),
        (None, Some("acme")),
        (None, Some("acme")),
        (None, Some("acme")),
        (None, Some("beta")),
    ];
    let mut plan = FairShare::new(8, jobs.iter().map(|&(o, g)| (o, g, NONE, 0)), &free);
    plan.limit_group(&group_key(None, "acme"), 2);
    drain(&mut plan);
    let got: Vec<u64> = (0..5).map(|i| plan.claimed(i)).collect();
    assert_eq!(got, [1, 1, 0, 0, 6]);
}

#[test]
fn a_group_gate_counts_its_concurrency_and_spaces_its_rate() {
    use crate::job::GroupLimits;
    let now = 10_000;
    let gate = |concurrency, rate, in_flight, next_start| GroupGate {
        limits: GroupLimits { concurrency, rate },
        in_flight,
        next_start,
    };
    assert_eq!(gate(None, None, 7, 0.0).room(now), u64::MAX);
    assert_eq!(gate(Some(5), None, 3, 0.0).room(now), 2);
    assert_eq!(gate(Some(5), None, 9, 0.0).room(now), 0);
    // 10 a second, nothing started yet: the starts due within half a second.
    let fresh = gate(None, Some(10.0), 0, 0.0);
    assert_eq!(fresh.room(now), 6);
    let (starts, next) = fresh.starts(now, 3);
    assert_eq!(starts, [now, now + 100, now + 200]);
    assert_eq!(next, (now + 300) as f64);
    // Those reserved, the rest of the half second.
    let after = gate(Some(100), Some(10.0), 3, next);
    assert_eq!(after.room(now), 3);
    assert_eq!(after.reopens(now), None);
    // A schedule reserved past the horizon: nothing now, and when to look again.
    let ahead = gate(None, Some(10.0), 0, (now + 900) as f64);
    assert_eq!(ahead.room(now), 0);
    assert_eq!(ahead.reopens(now), Some(now + 400));
    // A third of a second apart, exactly, over many starts.
    let (starts, next) = gate(None, Some(3.0), 0, 0.0).starts(now, 3);
    assert_eq!(starts, [now, now + 334, now + 667]);
    assert_eq!(next, now as f64 + 1000.0);
    // No rate: no start to wait for.
    assert!(gate(Some(2), None, 0, 0.0).starts(now, 2).0.is_empty());
}

#[test]
fn one_slot_at_a_time_goes_to_the_groups_in_turn() {
    let free = OwnerLimits::default();
    // Least recently served first: b3, b4, then s (its group's only job), then b1, b2,
    // just served. The group `b` was served more recently (b2) than `s`: s goes first.
    let jobs = [
        (None, Some("b")),
        (None, Some("b")),
        (None, Some("s")),
        (None, Some("b")),
        (None, Some("b")),
    ];
    let mut plan = FairShare::new(1, jobs.iter().map(|&(o, g)| (o, g, NONE, 0)), &free);
    assert_eq!(plan.round(), [(2, 1)]);
    // s just served, at the back: `b`'s least recently served job goes.
    let jobs = [
        (None, Some("b")),
        (None, Some("b")),
        (None, Some("b")),
        (None, Some("b")),
        (None, Some("s")),
    ];
    let mut plan = FairShare::new(1, jobs.iter().map(|&(o, g)| (o, g, NONE, 0)), &free);
    assert_eq!(plan.round(), [(0, 1)]);
}

#[test]
fn owners_share_first_then_their_jobs() {
    let free = OwnerLimits::default();
    // A has three jobs, B one: half the slots each.
    let jobs = [
        (Some("a"), NONE, 100),
        (Some("a"), NONE, 100),
        (Some("a"), NONE, 100),
        (Some("b"), NONE, 100),
    ];
    assert_eq!(play(12, &jobs, &free), [2, 2, 2, 6]);
    // B has only 2 due: A gets the rest.
    let jobs = [(Some("a"), NONE, 100), (Some("b"), NONE, 2)];
    assert_eq!(play(12, &jobs, &free), [10, 2]);
}

#[test]
fn a_job_is_complete_within_its_tolerated_failures() {
    use crate::job::JobStatus;
    assert_eq!(final_status(0, 0), JobStatus::Complete);
    assert_eq!(final_status(1, 0), JobStatus::Failed);
    assert_eq!(final_status(3, 3), JobStatus::Complete);
    assert_eq!(final_status(4, 3), JobStatus::Failed);
    assert_eq!(final_status(u64::MAX, u64::MAX), JobStatus::Complete);
}

#[test]
fn a_job_limiting_its_hosts_is_given_a_seconds_worth() {
    use crate::job::JobOptions;
    let with = |c: Option<u32>, r: Option<f64>| JobOptions {
        per_host_concurrency: c.map(crate::job::HostConcurrency::Fixed),
        per_host_rate: r,
        ..JobOptions::defaults()
    };
    assert_eq!(claim_cap(&with(None, None)), u64::MAX);
    assert_eq!(claim_cap(&with(Some(4), None)), 4);
    assert_eq!(claim_cap(&with(None, Some(10.0))), 10);
    assert_eq!(claim_cap(&with(None, Some(0.5))), 1);
    assert_eq!(claim_cap(&with(Some(3), Some(10.0))), 3);
    let text = |o: &JobOptions| serde_json::to_string(o).unwrap();
    assert!(!may_limit_hosts(&text(&with(None, None))));
    assert!(may_limit_hosts(&text(&with(None, Some(2.0)))));
    assert!(may_limit_hosts(&text(&with(Some(2), None))));
}

#[test]
fn an_owner_never_exceeds_its_room() {
    let limits = OwnerLimits {
        max_in_flight: Some(4),
        in_flight: HashMap::from([("a".to_string(), 3)]),
    };
    assert_eq!(limits.room(Some("a")), 1);
    assert_eq!(limits.room(Some("b")), 4);
    assert_eq!(limits.room(None), u64::MAX);
    let jobs = [(Some("a"), NONE, 100), (Some("b"), NONE, 100)];
    assert_eq!(play(8, &jobs, &limits), [1, 4]);
    let full = OwnerLimits {
        max_in_flight: Some(3),
        in_flight: HashMap::from([("a".to_string(), 3), ("b".to_string(), 1)]),
    };
    assert_eq!(full.full(), ["a"]);
}
