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
mod tests;
