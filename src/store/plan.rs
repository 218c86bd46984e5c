//! The fair share of a claim, decided here once for every backend: a backend reads the
//! candidate jobs, asks [`FairShare`] how many tasks to take from each, takes them as it
//! takes anything (one statement per round, one transaction per job), and says how many
//! it got.
//!
//! Free slots are shared by priority level first (the highest open level), then between
//! owners (API tokens), then between each owner's groups (`options.group`; a job without
//! one is a group of its own), then between each group's jobs: every round offers each
//! owner an equal part of what is left, split equally between its groups, then between
//! their jobs (least recently served first when a part is smaller than the number of
//! takers: owners and groups in the order they were last served, jobs in theirs). What a
//! job cannot use (its `concurrency` is reached, or it has no
//! more due) goes to the others in the next round. An owner never gets more than its room
//! under `--owner-max-in-flight` on this node, and a group never more than its room under
//! its limits ([`GroupGate`]), which the backend reads under the group's lock.

use std::collections::HashMap;

/// A finished job's status: `Complete` when at most `tolerated` of its tasks failed, else
/// `Failed`. The one place that decides it; every backend asks here in the transaction that
/// settles a job's last task.
pub fn final_status(failed: u64, tolerated: u64) -> crate::job::JobStatus {
    if failed <= tolerated {
        crate::job::JobStatus::Complete
    } else {
        crate::job::JobStatus::Failed
    }
}

/// Whether a finished job may be retried (`Store::job_retry`), decided here once for every
/// backend: it must be finished, its callback no longer owed (the new run's would race
/// it), and a Cancelled job's cancelled tasks must be retried with the rest, or its run
/// could never finish. `Ok` goes on to requeue; whether any task matched is the backend's
/// to count.
pub fn may_retry(
    status: crate::job::JobStatus,
    callback_owed: bool,
    include: &[crate::job::TaskStatus],
    cancelled_tasks: u64,
) -> Result<(), super::RetryOutcome> {
    if !status.is_finished() {
        return Err(super::RetryOutcome::Unfinished(status));
    }
    if callback_owed {
        return Err(super::RetryOutcome::CallbackPending);
    }
    if cancelled_tasks > 0 && !include.contains(&crate::job::TaskStatus::Cancelled) {
        return Err(super::RetryOutcome::CancelledLeftOut);
    }
    Ok(())
}

/// A job's status once its outcome is decided before all its tasks ran, if it is: Complete
/// once `min_complete` tasks are Complete (Failed once that many cannot be any more), Failed
/// with `fail_fast` once more than it tolerates failed (`JobOptions::tolerated`: with a
/// quorum, all but the quorum). A job's last settle decides by [`final_status`] over the
/// same tolerance, stored with the job, so both agree. `None` while undecided, and
/// for a job without those options (its last settle decides, by [`final_status`]).
pub fn decided(
    options: &crate::job::JobOptions,
    total: u64,
    complete: u64,
    failed: u64,
) -> Option<crate::job::JobStatus> {
    use crate::job::JobStatus;
    if let Some(quorum) = options.min_complete {
        if complete >= quorum {
            return Some(JobStatus::Complete);
        }
        // More failed than the quorum leaves room for: out of reach.
        if failed > options.tolerated(total) {
            return Some(JobStatus::Failed);
        }
    }
    if options.fail_fast && failed > options.tolerated(total) {
        return Some(JobStatus::Failed);
    }
    None
}

/// The status a pause (`pause`) or a resume moves a job in `status` to, given its
/// `(running, complete, failed)` counts, or what it answers instead: a finished job
/// changes no more; a paused one resumes `Running` once any of its tasks was called, else
/// `Pending`. The one rule of every backend's `Store::job_pause`.
pub fn pause_target(
    status: crate::job::JobStatus,
    pause: bool,
    (running, complete, failed): (u64, u64, u64),
) -> Result<crate::job::JobStatus, super::PauseOutcome> {
    use crate::job::JobStatus;
    match (status, pause) {
        (done, _) if done.is_finished() => Err(super::PauseOutcome::Finished(done)),
        (JobStatus::Paused, true) => Err(super::PauseOutcome::Unchanged(status)),
        (_, true) => Ok(JobStatus::Paused),
        (JobStatus::Paused, false) if running + complete + failed > 0 => Ok(JobStatus::Running),
        (JobStatus::Paused, false) => Ok(JobStatus::Pending),
        (_, false) => Err(super::PauseOutcome::Unchanged(status)),
    }
}

/// The options of a job's next run, begun at `now`: its run number one more, its start
/// (from which its `deadline_ms` counts) now.
pub fn next_run(options: &crate::job::JobOptions, now: super::Millis) -> crate::job::JobOptions {
    let mut next = options.clone();
    next.run = Some(options.run() + 1);
    next.run_started = Some(crate::job::Timestamp::from_millis(now));
    next
}

/// When a job's time budget (`options.deadline_ms`) runs out: counted from its submission
/// (`created_at`), or from the start of its current run when it was retried. What every
/// backend stores beside the job, where its deadline sweep (`Store::jobs_deadline`) finds
/// it; written again whenever the options or the run change.
pub fn deadline(
    options: &crate::job::JobOptions,
    created_at: super::Millis,
) -> Option<super::Millis> {
    let start = options.run_started.map_or(created_at, |t| t.millis());
    options
        .deadline_ms
        .map(|ms| start.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)))
}

/// An awaited attempt's deadline after a heartbeat at `now`: `async_heartbeat_ms` later,
/// never past `until` (its `async_timeout_ms` after the 202). `None` for a job without
/// heartbeats, whose attempts keep their deadline.
pub fn heartbeat_deadline(
    options: &crate::job::JobOptions,
    until: super::Millis,
    now: super::Millis,
) -> Option<super::Millis> {
    let every = i64::try_from(options.async_heartbeat_ms?).unwrap_or(i64::MAX);
    Some(now.saturating_add(every).min(until))
}

/// The most tasks of a job one claim takes when the job limits its own calls per host:
/// about what its gates can start within a second (its `per_host_concurrency`, or a
/// second's worth of its `per_host_rate`), so that claimed tasks do not sit at a gate
/// counted as running while others could use the slots. `u64::MAX` without such limits.
pub fn claim_cap(options: &crate::job::JobOptions) -> u64 {
    // An adaptive limit (`auto`) is the node's to know; the backlog keeps its claims in
    // check (`engine::hosts`).
    let by_concurrency = options
        .per_host_concurrency
        .and_then(|c| c.fixed())
        .map(u64::from);
    let by_rate = options.per_host_rate.map(|r| r.ceil().max(1.0) as u64);
    match (by_concurrency, by_rate) {
        (None, None) => u64::MAX,
        (c, r) => c.unwrap_or(u64::MAX).min(r.unwrap_or(u64::MAX)).max(1),
    }
}

/// Whether a job's stored options (as `store::codec` writes them, every field named) may set
/// per-host limits: a cheap look before [`claim_cap`] needs them parsed.
pub fn may_limit_hosts(options_text: &str) -> bool {
    !(options_text.contains("\"per_host_concurrency\":null")
        && options_text.contains("\"per_host_rate\":null"))
}

/// What limits an owner's share of a node's slots.
#[derive(Clone, Debug, Default)]
pub struct OwnerLimits {
    /// Most calls of one owner in flight on this node; `None`: no limit.
    pub max_in_flight: Option<u64>,
    /// Calls in flight on this node now, by owner.
    pub in_flight: HashMap<String, u64>,
}

impl OwnerLimits {
    /// How many more calls `owner` may have in flight; `u64::MAX` without a limit (and for
    /// the anonymous owner of a server without tokens).
    pub fn room(&self, owner: Option<&str>) -> u64 {
        match (self.max_in_flight, owner) {
            (Some(max), Some(owner)) => {
                max.saturating_sub(self.in_flight.get(owner).copied().unwrap_or(0))
            }
            _ => u64::MAX,
        }
    }

    /// The owners with no room left, whose jobs a claim should not even read.
    pub fn full(&self) -> Vec<String> {
        self.in_flight
            .keys()
            .filter(|owner| self.room(Some(owner)) == 0)
            .cloned()
            .collect()
    }
}

/// The level each candidate job of a claim is served at, from its `(priority, served_at)`
/// (`served_at`: when a claim last gave it tasks, or its submission): its priority, but a
/// job below the highest priority among them that no claim served for `max_wait` is served
/// at that highest level, sharing its slots with those jobs (aging): a low priority waits
/// while higher ones keep coming, but not much longer than that. (A job that could take no
/// task meanwhile, its concurrency full or its tasks in backoff, counts as waiting too: it
/// takes the tasks it can at the highest level once it can.) Written once here for every
/// backend.
pub fn levels(
    now: super::Millis,
    max_wait: super::Millis,
    jobs: &[(i32, super::Millis)],
) -> Vec<i32> {
    let top = jobs.iter().map(|(p, _)| *p).max().unwrap_or(0);
    jobs.iter()
        .map(|&(priority, served_at)| {
            if priority < top && now.saturating_sub(served_at) >= max_wait {
                top
            } else {
                priority
            }
        })
        .collect()
}

/// How far ahead a claim reserves the starts of a group limited by a rate: its calls wait
/// at most this long at the node for their start, and a claim takes at most a little more
/// than this much of the rate.
pub const GROUP_RATE_AHEAD: super::Millis = 500;

/// A group's limits and state as a claim reads them, under the group's lock (PostgreSQL:
/// an advisory lock; SQLite: the one writer; DynamoDB: a condition on the group item), so
/// that they hold across nodes: calls in flight are counted from the store (its unfinished
/// jobs' running tasks), and a rate is a schedule of starts kept in the store (the time of
/// the next free start, `next_start`), from which each claim reserves its calls' starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupGate {
    pub limits: crate::job::GroupLimits,
    /// Its jobs' tasks running now, on every node.
    pub in_flight: u64,
    /// When the rate's next call may start, in milliseconds (fractional, so that a rate of
    /// 3 a second keeps its exact spacing); 0 before the first.
    pub next_start: f64,
}

impl GroupGate {
    /// How many more calls a claim at `now` may start: its room under the concurrency, and
    /// the starts of the rate due within [`GROUP_RATE_AHEAD`].
    pub fn room(&self, now: super::Millis) -> u64 {
        let by_concurrency = self
            .limits
            .concurrency
            .map_or(u64::MAX, |c| u64::from(c).saturating_sub(self.in_flight));
        let by_rate = match self.limits.rate {
            None => u64::MAX,
            Some(rate) => {
                let first = self.next_start.max(now as f64);
                let horizon = (now + GROUP_RATE_AHEAD) as f64;
                if first > horizon {
                    0
                } else {
                    ((horizon - first) / (1000.0 / rate)).floor() as u64 + 1
                }
            }
        };
        by_concurrency.min(by_rate)
    }

    /// The starts of `k` calls claimed at `now` (none without a rate: they start at once),
    /// and the rate's next free start after them.
    pub fn starts(&self, now: super::Millis, k: u64) -> (Vec<super::Millis>, f64) {
        let Some(rate) = self.limits.rate else {
            return (Vec::new(), self.next_start);
        };
        let interval = 1000.0 / rate;
        let first = self.next_start.max(now as f64);
        let starts = (0..k)
            .map(|i| (first + i as f64 * interval).ceil() as super::Millis)
            .collect();
        (starts, first + k as f64 * interval)
    }

    /// When a claim may next start a call of this group by its rate, if the rate is what
    /// holds it now.
    pub fn reopens(&self, now: super::Millis) -> Option<super::Millis> {
        self.limits.rate?;
        let at = (self.next_start.ceil() as super::Millis).saturating_sub(GROUP_RATE_AHEAD);
        (at > now).then_some(at)
    }
}

/// The `nth` of `n` equal shares of `total`: the remainder goes one each to the first
/// ones, and each gets at least 1 (the callers stop once `total` is planned).
fn share(total: u64, n: usize, nth: usize) -> u64 {
    let n = n as u64;
    let extra = u64::from((nth as u64) < total % n);
    (total / n + extra).max(1)
}

/// A group as the store keys it: its owner (`""` for jobs without one) and its name.
pub type GroupKey = (String, String);

/// The key of `owner`'s group `name`.
pub fn group_key(owner: Option<&str>, name: &str) -> GroupKey {
    (owner.unwrap_or_default().to_string(), name.to_string())
}

/// After a claim at `now`: each claimed task of a group limited by a rate (in `gates`) gets
/// the start reserved for it, in the order the tasks come, and the claim says when such a
/// group's rate next allows a start; returns each group's next free start after them,
/// which the backend stores under the group's lock.
pub fn pace(
    claim: &mut super::Claim,
    gates: &HashMap<GroupKey, GroupGate>,
    now: super::Millis,
) -> Vec<(GroupKey, f64)> {
    for gate in gates.values() {
        if let Some(at) = gate.reopens(now) {
            claim.next_due = Some(claim.next_due.map_or(at, |d| d.min(at)));
        }
    }
    if gates.values().all(|g| g.limits.rate.is_none()) {
        return Vec::new();
    }
    let tasks = &mut claim.tasks;
    let mut by_group: HashMap<GroupKey, Vec<usize>> = HashMap::new();
    for (i, task) in tasks.iter().enumerate() {
        if let Some(name) = &task.options.group {
            let key = group_key(task.owner.as_deref(), name);
            if gates.get(&key).is_some_and(|g| g.limits.rate.is_some()) {
                by_group.entry(key).or_default().push(i);
            }
        }
    }
    by_group
        .into_iter()
        .map(|(key, members)| {
            let gate = &gates[&key];
            let (starts, next) = gate.starts(now, members.len() as u64);
            for (i, at) in members.into_iter().zip(starts) {
                tasks[i].start_at = Some(at);
            }
            let after = GroupGate {
                next_start: next,
                ..gate.clone()
            };
            if let Some(at) = after.reopens(now) {
                claim.next_due = Some(claim.next_due.map_or(at, |d| d.min(at)));
            }
            (key, next)
        })
        .collect()
}

/// One candidate job: whose it is, and how many more calls its `concurrency` allows.
struct Candidate {
    owner: usize,
    /// Its group among its owner's (`options.group`); a job without one is a group of its
    /// own.
    group: usize,
    /// The level it is served at (`levels`): higher first.
    level: i32,
    headroom: u64,
    claimed: u64,
    /// It had no more due tasks than a round asked of it.
    exhausted: bool,
}

/// A claim's plan; see the module docs.
pub struct FairShare {
    left: u64,
    candidates: Vec<Candidate>,
    /// Per owner (index): room left under its limit.
    owner_room: Vec<u64>,
    /// Per group (index): room left under its limits ([`FairShare::limit_group`]).
    group_room: Vec<u64>,
    /// The named groups' indexes.
    named: HashMap<GroupKey, usize>,
    /// The lowest level any task was claimed at.
    served_level: Option<i32>,
}

impl FairShare {
    /// `limit` free slots; `jobs` in the order they should be served within a level (least
    /// recently served first): each one's owner, group, headroom under its concurrency, and
    /// level ([`levels`]; 0 for all without priorities).
    pub fn new<'a>(
        limit: u64,
        jobs: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>, u64, i32)>,
        limits: &OwnerLimits,
    ) -> Self {
        let mut owners: HashMap<Option<&str>, usize> = HashMap::new();
        let mut owner_room = Vec::new();
        let mut groups: HashMap<(usize, &str), usize> = HashMap::new();
        let mut named = HashMap::new();
        let mut next_group = 0;
        let candidates = jobs
            .into_iter()
            .map(|(owner, group, headroom, level)| {
                let index = *owners.entry(owner).or_insert_with(|| {
                    owner_room.push(limits.room(owner));
                    owner_room.len() - 1
                });
                let mut fresh = || {
                    next_group += 1;
                    next_group - 1
                };
                let group = match group {
                    Some(name) => *groups.entry((index, name)).or_insert_with(|| {
                        let g = fresh();
                        named.insert(group_key(owner, name), g);
                        g
                    }),
                    None => fresh(),
                };
                Candidate {
                    owner: index,
                    group,
                    level,
                    headroom,
                    claimed: 0,
                    exhausted: false,
                }
            })
            .collect();
        FairShare {
            left: limit,
            candidates,
            owner_room,
            group_room: vec![u64::MAX; next_group],
            named,
            served_level: None,
        }
    }

    /// The room of a group under its limits ([`GroupGate::room`]): its jobs together get
    /// no more than that.
    pub fn limit_group(&mut self, key: &GroupKey, room: u64) {
        if let Some(&g) = self.named.get(key) {
            self.group_room[g] = room;
        }
    }

    /// Whether candidate `i` got nothing because its group had no room left (and it is of a
    /// level this claim served, or the claim served none): the backend moves it to the back
    /// of the round robin, as a job served, so that a group at its limit does not keep the
    /// jobs behind it out of the claims' window. A job below the levels served keeps its
    /// place, and its wait (`levels`) goes on.
    pub fn held(&self, i: usize) -> bool {
        let c = &self.candidates[i];
        c.claimed == 0
            && self.group_room[c.group] == 0
            && self.served_level.is_none_or(|l| c.level >= l)
    }

    /// After a claim at `now` that read a full window of jobs (more may be claimable
    /// behind them) and took fewer than its `limit`: when some were held by their group's
    /// limit (and now move to the back), the claim asks to be tried again within 50 ms, so
    /// that the jobs behind them are reached without waiting for the idle poll.
    pub fn ask_again(
        &self,
        claim: &mut super::Claim,
        limit: u32,
        window_full: bool,
        now: super::Millis,
    ) {
        let short = claim.tasks.len() < limit as usize;
        if window_full && short && (0..self.candidates.len()).any(|i| self.held(i)) {
            let soon = now + 50;
            claim.next_due = Some(claim.next_due.map_or(soon, |d| d.min(soon)));
        }
    }

    /// The next round: (candidate, how many tasks to take), or nothing when the claim is
    /// over. Each pair must be followed by a [`FairShare::got`].
    pub fn round(&mut self) -> Vec<(usize, u64)> {
        if self.left == 0 {
            return Vec::new();
        }
        // The open jobs of each open owner, in order, of the highest level open: a lower
        // level gets what is left once those have all they can take.
        let open_job = |c: &Candidate| {
            !c.exhausted
                && c.headroom > 0
                && self.owner_room[c.owner] > 0
                && self.group_room[c.group] > 0
        };
        let Some(level) = self
            .candidates
            .iter()
            .filter(|c| open_job(c))
            .map(|c| c.level)
            .max()
        else {
            return Vec::new();
        };
        // Per owner, its groups in the order their first job comes, each with its jobs.
        let mut by_owner: Vec<Vec<(usize, Vec<usize>)>> = vec![Vec::new(); self.owner_room.len()];
        for (i, c) in self.candidates.iter().enumerate() {
            if c.level == level && open_job(c) {
                let groups = &mut by_owner[c.owner];
                match groups.iter_mut().find(|(g, _)| *g == c.group) {
                    Some((_, jobs)) => jobs.push(i),
                    None => groups.push((c.group, vec![i])),
                }
            }
        }
        // Owners, and each owner's groups, come in the order they were last served: the one
        // whose most recently served job comes first in the candidates' order (least
        // recently served first) goes first. So when a claim has fewer slots than groups
        // (one freed slot at a time), the groups take turns, not their jobs.
        let mut group_last = vec![0; self.group_room.len()];
        let mut owner_last = vec![0; self.owner_room.len()];
        for (i, c) in self.candidates.iter().enumerate() {
            group_last[c.group] = i;
            owner_last[c.owner] = i;
        }
        for groups in &mut by_owner {
            groups.sort_by_key(|(g, _)| group_last[*g]);
        }
        let mut open: Vec<usize> = (0..by_owner.len())
            .filter(|&o| !by_owner[o].is_empty())
            .collect();
        if open.is_empty() {
            return Vec::new();
        }
        open.sort_by_key(|&o| owner_last[o]);
        // Each level's part is split equally, the remainder one each to the first (least
        // recently served) ones, so that a round plans all it can: fewer rounds, fewer
        // statements.
        let mut wants = Vec::new();
        let mut planned = 0;
        for (nth, &o) in open.iter().enumerate() {
            if planned == self.left {
                break;
            }
            let part = share(self.left, open.len(), nth)
                .min(self.owner_room[o])
                .min(self.left - planned);
            // The owner's part, shared between its groups, then each group's between its
            // jobs (a job without a group is a group of its own).
            let groups = &by_owner[o];
            let mut owner_planned = 0;
            for (nth, (g, jobs)) in groups.iter().enumerate() {
                if owner_planned == part {
                    break;
                }
                let group_part = share(part, groups.len(), nth)
                    .min(part - owner_planned)
                    .min(self.group_room[*g]);
                let mut group_planned = 0;
                for (nth, &i) in jobs.iter().enumerate() {
                    if group_planned == group_part {
                        break;
                    }
                    let want = share(group_part, jobs.len(), nth)
                        .min(self.candidates[i].headroom)
                        .min(group_part - group_planned);
                    group_planned += want;
                    wants.push((i, want));
                }
                owner_planned += group_planned;
            }
            planned += owner_planned;
        }
        wants
    }

    /// Candidate `i` was asked for `want` tasks and got `got`.
    pub fn got(&mut self, i: usize, want: u64, got: u64) {
        let c = &mut self.candidates[i];
        c.claimed += got;
        c.headroom = c.headroom.saturating_sub(got);
        if got > 0 {
            self.served_level = Some(self.served_level.map_or(c.level, |l| l.min(c.level)));
        }
        self.owner_room[c.owner] = self.owner_room[c.owner].saturating_sub(got);
        self.group_room[c.group] = self.group_room[c.group].saturating_sub(got);
        self.left = self.left.saturating_sub(got);
        if got < want {
            c.exhausted = true;
        }
    }

    /// Tasks claimed from candidate `i`.
    pub fn claimed(&self, i: usize) -> u64 {
        self.candidates[i].claimed
    }

    /// Whether candidate `i` ran out of due tasks.
    pub fn exhausted(&self, i: usize) -> bool {
        self.candidates[i].exhausted
    }
}

#[cfg(test)]
mod tests {
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
}
