//! Claiming: the unfinished jobs from gsi1 (least recently served first), the fair share
//! of [`plan::FairShare`] across them, and each job's due tasks taken from its queue in
//! gsi2 with one transaction of up to [`TX_TASKS`] tasks and the job item (see the module
//! docs). Also the awaited tasks whose deadline passed, taken up again by a node, and the
//! depth of the queue.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::ReturnValue;
use futures_util::{StreamExt, TryStreamExt, stream};

use super::DynamoStore;
use super::expr::{Change, Ex, Item, eq, get_n, get_s, is_in, n, need_n, need_s, s};
use super::items::{
    CLAIMABLE, SHARDS, id_of_pk, index_of_sk, job_key, job_status_from, pad_time, queue_pk, raw,
    task_key,
};
use super::job_groups::Lane;
use super::requests::PARALLEL;
use super::tx::{Cancelled, TX_TASKS, TaskTx, Then, TxEnd};
use crate::job::{JobId, JobOptions};
use crate::store::codec::{parse_id, parse_options, with_call};
use crate::store::plan::{self, FairShare, GroupKey};
use crate::store::{
    Claim, ClaimParams, ClaimedTask, Millis, OverdueParams, StoreError, StoreResult,
};

/// A job as gsi1 shows it to a claim.
struct Candidate {
    id: JobId,
    /// Its group's key, if it names one.
    group: Option<GroupKey>,
    /// gsi1 carries it since tables made by this version; `None` on older ones.
    owner: Option<Arc<str>>,
    options: Arc<JobOptions>,
    concurrency: Option<u64>,
    headroom: u64,
    /// When a claim last served it, or its submission.
    served_at: Millis,
}

/// What a claim took of one job: its tasks, whether it had fewer due than wanted, and when
/// its next waiting task is due.
type JobClaim = (Vec<ClaimedTask>, bool, Option<Millis>);

/// A due task as a claim reads it from its job's queue: index, attempts, endpoint, params and
/// call settings.
type Due = (u64, u32, String, String, Option<String>);

/// The claim of one job's due tasks, as its transactions see the job.
struct ClaimTx<'a> {
    params: &'a ClaimParams,
    candidate: &'a Candidate,
    /// Its group, when that has limits: its item goes in each transaction.
    lane: Option<&'a Lane>,
    /// How many more of its tasks the job may run.
    headroom: u64,
}

impl TaskTx<&Due> for ClaimTx<'_> {
    fn job(&self) -> JobId {
        self.candidate.id
    }

    fn job_change(&self, items: &[&Due]) -> Change {
        let (id, params) = (self.candidate.id, self.params);
        let k = items.len() as u64;
        let mut meta = Change::new()
            .incr("n_running", k as i64)
            .set("status", s("Running"))
            .set("last_claim_at", n(params.now))
            .set("g1sk", s(format!("{}#{id}", pad_time(params.now))))
            .when(|e| is_in(e, "status", &CLAIMABLE))
            .when(|e| format!("attribute_exists({})", e.n("g1pk")));
        if let Some(limit) = self.candidate.concurrency {
            let at_most = limit.saturating_sub(k);
            meta = meta.when(|e| format!("{} <= {}", e.n("n_running"), e.v(n(at_most))));
        }
        meta
    }

    fn task_change(&self, (index, attempts, ..): &&Due) -> (u64, Change) {
        let (id, params) = (self.candidate.id, self.params);
        let change = Change::new()
            .set("status", s("Running"))
            .incr("attempts", 1)
            .set("node", s(params.node.to_string()))
            .set("g3pk", s(format!("N#{}", params.node)))
            .set("g3sk", s(format!("{id}#{index:010}")))
            .remove("g2pk")
            .remove("g2sk")
            .when(|e| eq(e, "status", s("Pending")))
            .when(|e| eq(e, "attempts", n(*attempts)))
            .when(|e| format!("{} <= {}", e.n("run_at"), e.v(n(params.now))));
        (*index, change)
    }

    fn extra(&self, items: &[&Due]) -> Option<(Item, Change)> {
        let lane = self.lane?;
        let (change, _) = lane.change(items.len() as u64, self.params.now);
        Some((lane.key.clone(), change))
    }

    /// Tasks taken meanwhile (by another node, or seen late by the index) are left out.
    async fn cancelled(
        &mut self,
        store: &DynamoStore,
        items: &mut Vec<&Due>,
        cancelled: Cancelled,
    ) -> StoreResult<Then> {
        if cancelled.extra_refused {
            // Another node claimed for the group since its count was read: the group waits
            // for the next claim, which counts again.
            if let Some(lane) = self.lane {
                lane.lose();
            }
            return Ok(Then::Stop);
        }
        if cancelled.job_refused {
            // Finished, cancelled, or at its concurrency: look again.
            let Some(item) = store.job_item(self.candidate.id).await? else {
                return Ok(Then::Stop);
            };
            let status = job_status_from(need_s(&item, "status")?)?;
            if status.is_finished() || status == crate::job::JobStatus::Paused {
                return Ok(Then::Stop);
            }
            let running: u64 = need_n(&item, "n_running")?;
            self.headroom = self
                .candidate
                .concurrency
                .map_or(u64::MAX, |c| c.saturating_sub(running));
            items.truncate(self.headroom.min(items.len() as u64) as usize);
        }
        Ok(Then::Continue)
    }
}

impl DynamoStore {
    /// `Store::tasks_claim`: the candidate jobs, then rounds of [`FairShare`], a transaction
    /// per job and round.
    pub(super) async fn claim(&self, params: &ClaimParams) -> StoreResult<Claim> {
        let mut claim = Claim::default();
        if params.limit == 0 {
            return Ok(claim);
        }
        let window = params.limit as usize * 2 + 8;
        let full_owners = params.owners.full();
        let mut candidates = Vec::new();
        let active = self.active_jobs(window).await?;
        let window_full = active.len() == window;
        for item in active {
            let id = parse_id(need_s(&item, "id")?)?;
            if params.skip_jobs.contains(&id) {
                continue;
            }
            let owner = get_s(&item, "owner");
            if owner.is_some_and(|o| full_owners.iter().any(|f| f == o)) {
                continue;
            }
            let total: u64 = need_n(&item, "total")?;
            let running: u64 = need_n(&item, "n_running")?;
            let done: u64 = need_n(&item, "n_done")?;
            if total <= running + done {
                continue;
            }
            let concurrency: Option<u64> = get_n(&item, "concurrency");
            let options = Arc::new(parse_options(need_s(&item, "options")?)?);
            // A job waiting for its start: no look at its queue (nor a write to move it
            // back) before then; the claim says when.
            if let Some(at) = options.not_before.map(|t| t.millis())
                && at > params.now
            {
                claim.next_due = Some(claim.next_due.map_or(at, |d: Millis| d.min(at)));
                continue;
            }
            // A job limiting its calls per host gives one claim what its gates start soon.
            let headroom = concurrency
                .map_or(u64::MAX, |c| c.saturating_sub(running))
                .min(plan::claim_cap(&options));
            if headroom == 0 {
                continue;
            }
            // gsi1's key says when a claim last served it (0: never).
            let last_claim_at = need_s(&item, "g1sk")?
                .split_once('#')
                .and_then(|(at, _)| at.parse::<Millis>().ok())
                .unwrap_or(0);
            candidates.push(Candidate {
                id,
                group: options.group.as_deref().map(|g| plan::group_key(owner, g)),
                owner: owner.map(Arc::from),
                options,
                concurrency,
                headroom,
                served_at: if last_claim_at > 0 {
                    last_claim_at
                } else {
                    id.created_millis()
                },
            });
        }
        if candidates.is_empty() {
            return Ok(claim);
        }
        // The lease first: a sweep must never find this node's tasks without it.
        self.node_alive(params.node, params.lease_until, true)
            .await?;

        // The plan says how many tasks each job gives in each round (see `plan`); a job's
        // part is one transaction. At most four rounds: each costs a request per job.
        let levels = plan::levels(
            params.now,
            params.priority_max_wait,
            &candidates
                .iter()
                .map(|c| (c.options.priority, c.served_at))
                .collect::<Vec<_>>(),
        );
        let mut plan = FairShare::new(
            u64::from(params.limit),
            candidates.iter().zip(&levels).map(|(c, &level)| {
                (
                    c.owner.as_deref(),
                    c.options.group.as_deref(),
                    c.headroom,
                    level,
                )
            }),
            &params.owners,
        );
        // The groups with limits, counted now; each one's jobs are claimed one after the
        // other, each transaction on condition that the group is as the last one left it.
        let mut keys: Vec<GroupKey> = candidates.iter().filter_map(|c| c.group.clone()).collect();
        keys.sort();
        keys.dedup();
        let lanes = if keys.is_empty() {
            HashMap::new()
        } else {
            self.group_lanes(&keys, params.group_concurrency).await?
        };
        for (key, lane) in &lanes {
            plan.limit_group(key, lane.gate.room(params.now));
        }
        let (candidates, lanes) = (&candidates, &lanes);
        let lane_of = |i: usize| candidates[i].group.as_ref().and_then(|k| lanes.get(k));
        for _round in 0..4 {
            let wants = plan.round();
            if wants.is_empty() {
                break;
            }
            let mut queues: Vec<Vec<(usize, u64)>> = Vec::new();
            let mut queue_of_lane: HashMap<&GroupKey, usize> = HashMap::new();
            for (i, want) in wants {
                match candidates[i]
                    .group
                    .as_ref()
                    .filter(|k| lanes.contains_key(*k))
                {
                    Some(key) => {
                        let q = *queue_of_lane.entry(key).or_insert_with(|| {
                            queues.push(Vec::new());
                            queues.len() - 1
                        });
                        queues[q].push((i, want));
                    }
                    None => queues.push(vec![(i, want)]),
                }
            }
            let results: Vec<Vec<(usize, u64, JobClaim)>> = stream::iter(queues)
                .map(|queue| async move {
                    let mut out = Vec::with_capacity(queue.len());
                    for (i, want) in queue {
                        let (c, lane) = (&candidates[i], lane_of(i));
                        if lane.is_some_and(Lane::lost) {
                            out.push((i, want, (Vec::new(), false, None)));
                            continue;
                        }
                        out.push((i, want, self.claim_job(params, c, want, lane).await?));
                    }
                    Ok::<_, StoreError>(out)
                })
                .buffer_unordered(PARALLEL)
                .try_collect()
                .await?;
            for (i, want, (tasks, exhausted, next_due)) in results.into_iter().flatten() {
                let got = tasks.len() as u64;
                // A job that said it has nothing more due counts as having given less.
                plan.got(i, if exhausted { want.max(got + 1) } else { want }, got);
                if let Some(due) = next_due {
                    claim.next_due = Some(claim.next_due.map_or(due, |d: Millis| d.min(due)));
                }
                claim.tasks.extend(tasks);
            }
        }
        claim.tasks.sort_by_key(|t| (t.job_id, t.index));
        // A group's rate says when it may start again; a group another node changed is
        // looked at again soon. Jobs its group held move to the back, as served.
        for lane in lanes.values() {
            let at = if lane.lost() {
                Some(params.now + 50)
            } else {
                lane.gate_after().reopens(params.now)
            };
            if let Some(at) = at {
                claim.next_due = Some(claim.next_due.map_or(at, |d: Millis| d.min(at)));
            }
        }
        let held: Vec<JobId> = (0..candidates.len())
            .filter(|&i| plan.held(i))
            .map(|i| candidates[i].id)
            .collect();
        stream::iter(held)
            .map(|id| self.served(id, params.now))
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        plan.ask_again(&mut claim, params.limit, window_full, params.now);
        Ok(claim)
    }

    /// Moves a job to the back of the round robin, as served at `now`.
    async fn served(&self, id: JobId, now: Millis) -> StoreResult<()> {
        let change = Change::new()
            .set("last_claim_at", n(now))
            .set("g1sk", s(format!("{}#{id}", pad_time(now))))
            .when(|e| format!("attribute_exists({})", e.n("g1pk")));
        self.update(job_key(id), change, None).await?;
        Ok(())
    }

    /// Claims up to `want` due tasks of one job; returns them, whether the job had fewer due
    /// than wanted, and when its next waiting task is due.
    async fn claim_job(
        &self,
        params: &ClaimParams,
        candidate: &Candidate,
        want: u64,
        lane: Option<&Lane>,
    ) -> StoreResult<JobClaim> {
        let id = candidate.id;
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("g2pk"), ex.v(s(queue_pk(id))));
        // One more than wanted: the first one not due tells when the next is.
        let queue = self
            .query_all(Some("gsi2"), cond, ex, None, true, want as usize + 1)
            .await?;
        let mut due = Vec::new();
        let mut next_due = None;
        for item in &queue {
            let sk = need_s(item, "g2sk")?;
            let run_at: Millis = sk[..13]
                .parse()
                .map_err(|_| StoreError::Other(format!("stored queue key {sk:?} is invalid")))?;
            if run_at > params.now {
                next_due = Some(run_at);
                break;
            }
            if (due.len() as u64) < want {
                due.push((
                    need_n::<u64>(item, "idx")?,
                    need_n::<u32>(item, "attempts")?,
                    need_s(item, "endpoint")?.to_string(),
                    need_s(item, "params")?.to_string(),
                    get_s(item, "call").map(str::to_string),
                ));
            }
        }
        let exhausted = (due.len() as u64) < want;
        let mut claimed = Vec::new();
        let mut tx = ClaimTx {
            params,
            candidate,
            lane,
            headroom: candidate.headroom,
        };
        for chunk in due.chunks(TX_TASKS) {
            let mut items: Vec<_> = chunk.iter().collect();
            items.truncate(tx.headroom.min(items.len() as u64) as usize);
            match self.transact_tasks(&mut tx, items).await? {
                TxEnd::Committed(items) => {
                    tx.headroom -= items.len() as u64;
                    let mut starts = lane
                        .map(|l| l.committed(items.len() as u64, params.now))
                        .unwrap_or_default()
                        .into_iter();
                    for (index, attempts, endpoint, params_text, call) in items {
                        claimed.push(ClaimedTask {
                            job_id: id,
                            index: *index,
                            attempt: attempts + 1,
                            // Read below for a retried job's tasks.
                            attempt_base: 0,
                            endpoint: endpoint.clone(),
                            params: raw(params_text)?,
                            options: with_call(&candidate.options, call.as_deref())?,
                            owner: candidate.owner.clone(),
                            start_at: starts.next(),
                        });
                    }
                }
                TxEnd::NoneLeft | TxEnd::GaveUp => {}
                // The job finished or is gone.
                TxEnd::Stopped => return Ok((claimed, true, None)),
            }
        }
        if candidate.options.run() > 1 && !claimed.is_empty() {
            // A retried job: what each task's earlier runs used of its attempts is on the
            // task item only (the queue's index does not carry it).
            let keys = claimed.iter().map(|t| task_key(id, t.index)).collect();
            let mut bases = HashMap::new();
            for item in self.batch_get(keys).await? {
                bases.insert(
                    need_n::<u64>(&item, "idx")?,
                    get_n::<u32>(&item, "attempt_base").unwrap_or(0),
                );
            }
            for task in &mut claimed {
                task.attempt_base = bases.get(&task.index).copied().unwrap_or(0);
            }
        }
        if claimed.is_empty() {
            // Served all the same: it moves to the back, so a job whose tasks all wait in
            // backoff cannot keep the jobs behind it waiting.
            self.served(id, params.now).await?;
        }
        Ok((claimed, exhausted, next_due))
    }

    /// The unfinished jobs, least recently served first, up to `window`.
    async fn active_jobs(&self, window: usize) -> StoreResult<Vec<Item>> {
        let shards: Vec<Vec<Item>> = stream::iter(0..SHARDS)
            .map(|shard| {
                let mut ex = Ex::default();
                let cond = format!("{} = {}", ex.n("g1pk"), ex.v(s(format!("ACTIVE#{shard}"))));
                self.query_all(Some("gsi1"), cond, ex, None, true, window)
            })
            .buffer_unordered(SHARDS as usize)
            .try_collect()
            .await?;
        let mut all: Vec<Item> = shards.into_iter().flatten().collect();
        all.sort_by(|a, b| get_s(a, "g1sk").cmp(&get_s(b, "g1sk")));
        all.truncate(window);
        Ok(all)
    }

    /// `Store::queue_depth`: the tasks of the unfinished jobs neither running, done nor
    /// cancelled.
    pub(super) async fn queued_tasks(&self) -> StoreResult<u64> {
        let mut depth = 0u64;
        for item in self.active_jobs(usize::MAX).await? {
            let total: u64 = need_n(&item, "total")?;
            let busy: u64 = need_n::<u64>(&item, "n_running")?
                + need_n::<u64>(&item, "n_done")?
                + need_n::<u64>(&item, "n_cancelled")?;
            depth += total.saturating_sub(busy);
        }
        Ok(depth)
    }

    /// `Store::tasks_overdue`: awaited tasks past their deadline (gsi3 `AWAIT`), each taken by
    /// this node on condition that no node holds it.
    pub(super) async fn take_overdue(
        &self,
        params: &OverdueParams,
    ) -> StoreResult<Vec<ClaimedTask>> {
        let mut ex = Ex::default();
        let cond = format!(
            "{} = {} AND {} < {}",
            ex.n("g3pk"),
            ex.v(s("AWAIT")),
            ex.n("g3sk"),
            ex.v(s(pad_time(params.now + 1)))
        );
        let items = self
            .query_all(Some("gsi3"), cond, ex, None, true, params.limit as usize)
            .await?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // The lease first, as for a claim.
        self.node_alive(params.node, params.lease_until, true)
            .await?;
        type JobOf = Option<(Arc<JobOptions>, Option<Arc<str>>)>;
        let mut options: HashMap<JobId, JobOf> = HashMap::new();
        let mut tasks = Vec::with_capacity(items.len());
        for item in items {
            let id = id_of_pk(need_s(&item, "pk")?)?;
            let index = index_of_sk(need_s(&item, "sk")?)?;
            let attempts: u32 = need_n(&item, "attempts")?;
            if let std::collections::hash_map::Entry::Vacant(entry) = options.entry(id) {
                let parsed = match self.job_item(id).await? {
                    Some(job) => Some((
                        Arc::new(parse_options(need_s(&job, "options")?)?),
                        get_s(&job, "owner").map(Arc::from),
                    )),
                    None => None,
                };
                entry.insert(parsed);
            }
            let Some((job_options, owner)) = options[&id].clone() else {
                continue;
            };
            let node = params.node;
            let change = Change::new()
                .set("node", s(node.to_string()))
                .set("lease_until", n(params.lease_until))
                .set("g3pk", s(format!("N#{node}")))
                .set("g3sk", s(format!("{id}#{index:010}")))
                .when(|e| eq(e, "status", s("Running")))
                .when(|e| eq(e, "attempts", n(attempts)))
                .when(|e| format!("attribute_not_exists({})", e.n("node")))
                // A heartbeat may have moved its deadline on since the index was read.
                .when(|e| format!("{} <= {}", e.n("lease_until"), e.v(n(params.now))));
            let Some(task) = self
                .update(task_key(id, index), change, Some(ReturnValue::AllNew))
                .await?
            else {
                continue;
            };
            tasks.push(ClaimedTask {
                job_id: id,
                index,
                attempt: attempts,
                attempt_base: get_n(&task, "attempt_base").unwrap_or(0),
                endpoint: need_s(&task, "endpoint")?.to_string(),
                params: raw(need_s(&task, "params")?)?,
                options: with_call(&job_options, get_s(&task, "call"))?,
                owner,
                start_at: None,
            });
        }
        Ok(tasks)
    }
}
