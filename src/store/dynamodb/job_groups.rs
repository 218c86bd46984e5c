//! Groups of jobs (`options.group`) on DynamoDB: one item per group, `GROUPS#<owner>` /
//! `G#<name>` (owner `-` for a server without tokens), holding the group's own limits
//! (`own`, `concurrency`, `rate`), its rate's next start (`next_start`), a `version`, and
//! its members (`jobs`, a string set of job ids).
//!
//! - A job joins its group's members in the transaction that stores it (and again when it
//!   is retried), which bumps the version; members that finished are let go by a later
//!   claim, on condition that the version is still the one it read.
//! - A claim of a group with limits reads the group item and its members' job items
//!   (strongly consistent) and counts their running tasks: the calls in flight. Each of its
//!   transactions carries the group item, on condition that the version is the one read
//!   (then one more), so that two nodes cannot both fill one group from the same count: the
//!   second one's transaction is cancelled, and that job waits for the next claim. The
//!   transaction also moves the rate's next start past the starts it reserved.

use std::collections::HashMap;
use std::sync::Mutex;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use super::DynamoStore;
use super::expr::{Change, Ex, Item, get_n, get_s, need_n, need_s, s};
use super::items::{job_key, job_status_from};
use crate::job::{GroupLimits, JobId};
use crate::store::codec::parse_id;
use crate::store::plan::{GroupGate, GroupKey};
use crate::store::{GroupRecord, Millis, StoreResult};

/// Members past which a group without limits lets its finished jobs go at a claim.
const PRUNE_ABOVE: usize = 64;

/// The group item's partition, one per owner.
fn groups_pk(owner: &str) -> String {
    format!("GROUPS#{}", if owner.is_empty() { "-" } else { owner })
}

/// The key of a group's item.
pub(super) fn group_item_key((owner, name): &GroupKey) -> Item {
    HashMap::from([
        ("pk".into(), s(groups_pk(owner))),
        ("sk".into(), s(format!("G#{name}"))),
    ])
}

/// What storing (or retrying) job `id` writes to its group's item: it joins the members.
pub(super) fn join(id: JobId, name: &str) -> Change {
    Change::new()
        .set("name", s(name))
        .add_strings("jobs", vec![id.to_string()])
        .add("version", 1)
}

/// A group's own limits, from its item.
fn own_limits(item: &Item) -> Option<GroupLimits> {
    item.contains_key("own").then(|| GroupLimits {
        concurrency: get_n(item, "concurrency"),
        rate: get_n(item, "rate"),
    })
}

/// The members of a group, from its item.
fn members(item: &Item) -> Vec<String> {
    match item.get("jobs") {
        Some(AttributeValue::Ss(ids)) => ids.clone(),
        _ => Vec::new(),
    }
}

/// A group with limits as a claim holds it: its item's key, and what the claim's
/// transactions of its jobs (made one after the other) last wrote to it.
pub(super) struct Lane {
    pub(super) key: Item,
    pub(super) gate: GroupGate,
    state: Mutex<LaneState>,
}

struct LaneState {
    /// The version the next transaction must find (`None`: an item without one).
    version: Option<u64>,
    next_start: f64,
    /// A transaction found the group changed by another node: no more of it this claim.
    lost: bool,
}

impl Lane {
    /// The group item's change for a transaction claiming `k` tasks at `now`, and the
    /// starts reserved for them (none without a rate).
    pub(super) fn change(&self, k: u64, now: Millis) -> (Change, Vec<Millis>) {
        let state = self.state.lock().expect("lane state");
        let gate = GroupGate {
            next_start: state.next_start,
            ..self.gate.clone()
        };
        let (starts, next) = gate.starts(now, k);
        let version = state.version;
        let change = Change::new()
            .set(
                "version",
                AttributeValue::N(version.map_or(1, |v| v + 1).to_string()),
            )
            .set("next_start", AttributeValue::N(next.to_string()))
            .when(move |e| match version {
                Some(v) => format!(
                    "{} = {}",
                    e.n("version"),
                    e.v(AttributeValue::N(v.to_string()))
                ),
                None => format!("attribute_not_exists({})", e.n("version")),
            });
        (change, starts)
    }

    /// A transaction of `k` tasks committed at `now`: the starts it reserved, as
    /// [`Lane::change`] wrote them.
    pub(super) fn committed(&self, k: u64, now: Millis) -> Vec<Millis> {
        let mut state = self.state.lock().expect("lane state");
        let gate = GroupGate {
            next_start: state.next_start,
            ..self.gate.clone()
        };
        let (starts, next) = gate.starts(now, k);
        state.next_start = next;
        state.version = Some(state.version.map_or(1, |v| v + 1));
        starts
    }

    /// Another node changed the group meanwhile.
    pub(super) fn lose(&self) {
        self.state.lock().expect("lane state").lost = true;
    }

    pub(super) fn lost(&self) -> bool {
        self.state.lock().expect("lane state").lost
    }

    /// The gate as this claim left it (its rate's next start moved on).
    pub(super) fn gate_after(&self) -> GroupGate {
        GroupGate {
            next_start: self.state.lock().expect("lane state").next_start,
            ..self.gate.clone()
        }
    }
}

impl DynamoStore {
    /// The groups of `keys` that have limits (their own, or `default_concurrency`), each
    /// with its calls in flight counted from its members' job items. Members found
    /// finished are let go.
    pub(super) async fn group_lanes(
        &self,
        keys: &[GroupKey],
        default_concurrency: Option<u32>,
    ) -> StoreResult<HashMap<GroupKey, Lane>> {
        let items = self
            .batch_get(keys.iter().map(group_item_key).collect())
            .await?;
        let mut lanes = HashMap::new();
        for item in items {
            let owner_part = need_s(&item, "pk")?.trim_start_matches("GROUPS#");
            let owner = if owner_part == "-" { "" } else { owner_part };
            let key = (owner.to_string(), need_s(&item, "name")?.to_string());
            let limits = GroupLimits::effective(own_limits(&item).as_ref(), default_concurrency);
            let version: Option<u64> = get_n(&item, "version");
            if !limits.limits() {
                // Not counted, but its members are let go of now and then, so that the
                // item stays small.
                if members(&item).len() > PRUNE_ABOVE {
                    let (_, _, finished) = self.members_running(&item).await?;
                    if !finished.is_empty() {
                        self.let_go(&key, version, finished).await?;
                    }
                }
                continue;
            }
            let (in_flight, _, finished) = self.members_running(&item).await?;
            if !finished.is_empty() {
                self.let_go(&key, version, finished).await?;
            }
            let next_start: f64 = get_n(&item, "next_start").unwrap_or(0.0);
            let gate = GroupGate {
                limits,
                in_flight,
                next_start,
            };
            let lane = Lane {
                key: group_item_key(&key),
                gate,
                state: Mutex::new(LaneState {
                    version,
                    next_start,
                    lost: false,
                }),
            };
            lanes.insert(key, lane);
        }
        Ok(lanes)
    }

    /// A group's members' running tasks and unfinished jobs, and the members that are
    /// finished or gone.
    async fn members_running(&self, item: &Item) -> StoreResult<(u64, u64, Vec<String>)> {
        let ids = members(item);
        let mut keys = Vec::with_capacity(ids.len());
        for id in &ids {
            keys.push(job_key(parse_id(id)?));
        }
        let mut seen = std::collections::HashSet::new();
        let (mut running, mut jobs) = (0, 0);
        for job in self.batch_get(keys).await? {
            let status = job_status_from(need_s(&job, "status")?)?;
            if job.contains_key("deleting") || status.is_finished() {
                continue;
            }
            seen.insert(need_s(&job, "id")?.to_string());
            running += need_n::<u64>(&job, "n_running")?;
            jobs += 1;
        }
        let finished = ids.into_iter().filter(|id| !seen.contains(id)).collect();
        Ok((running, jobs, finished))
    }

    /// Lets finished members go, on condition that no job joined since `version` was read.
    async fn let_go(
        &self,
        key: &GroupKey,
        version: Option<u64>,
        finished: Vec<String>,
    ) -> StoreResult<()> {
        let Some(version) = version else {
            return Ok(());
        };
        let change = Change::new()
            .delete_strings("jobs", finished)
            .when(move |e| {
                format!(
                    "{} = {}",
                    e.n("version"),
                    e.v(AttributeValue::N(version.to_string()))
                )
            });
        // Best effort: a member left in only costs a read, and a later claim tries again.
        if let Err(e) = self.update(group_item_key(key), change, None).await {
            tracing::debug!(error = %e, group = %key.1, "letting finished jobs go from their group failed");
        }
        Ok(())
    }

    /// `Store::group_set`.
    pub(super) async fn group_set(
        &self,
        owner: Option<&str>,
        name: &str,
        limits: &GroupLimits,
    ) -> StoreResult<()> {
        let key = crate::store::plan::group_key(owner, name);
        let mut change = Change::new()
            .set("name", s(name))
            .set("own", AttributeValue::N("1".into()));
        // A new rate counts from the last start reserved under the old one (a schedule
        // reserved far ahead under a slow rate gives way to a faster one).
        if let (Some(item), Some(new)) = (self.get(group_item_key(&key)).await?, limits.rate) {
            let old: Option<f64> = get_n(&item, "rate");
            let next: Option<f64> = get_n(&item, "next_start");
            if let (Some(old), Some(next)) = (old, next) {
                let moved = next - 1000.0 / old + 1000.0 / new;
                change = change.set("next_start", AttributeValue::N(moved.to_string()));
            }
        }
        change = match limits.concurrency {
            Some(c) => change.set("concurrency", AttributeValue::N(c.to_string())),
            None => change.remove("concurrency"),
        };
        change = match limits.rate {
            Some(r) => change.set("rate", AttributeValue::N(r.to_string())),
            None => change.remove("rate"),
        };
        self.update(group_item_key(&key), change, None).await?;
        Ok(())
    }

    /// `Store::group_delete`: the own limits go; the item stays while it has members.
    pub(super) async fn group_delete(&self, owner: Option<&str>, name: &str) -> StoreResult<bool> {
        let change = Change::new()
            .remove("own")
            .remove("concurrency")
            .remove("rate")
            .when(|e| format!("attribute_exists({})", e.n("own")));
        let key = crate::store::plan::group_key(owner, name);
        Ok(self
            .update(group_item_key(&key), change, Some(ReturnValue::None))
            .await?
            .is_some())
    }

    /// `Store::groups_list`: the owner's partition of group items (one item for `name`),
    /// each with its members read.
    pub(super) async fn groups_list(
        &self,
        owner: Option<&str>,
        name: Option<&str>,
    ) -> StoreResult<Vec<GroupRecord>> {
        let owner = owner.unwrap_or_default();
        let items = match name {
            Some(name) => self
                .get(group_item_key(&(owner.to_string(), name.to_string())))
                .await?
                .into_iter()
                .collect(),
            None => {
                let mut ex = Ex::default();
                let cond = format!("{} = {}", ex.n("pk"), ex.v(s(groups_pk(owner))));
                self.query_all(None, cond, ex, None, true, usize::MAX)
                    .await?
            }
        };
        let mut records = Vec::new();
        for item in items {
            let (in_flight, jobs, _) = self.members_running(&item).await?;
            let own = own_limits(&item);
            if own.is_none() && jobs == 0 {
                continue;
            }
            records.push(GroupRecord {
                name: get_s(&item, "name").unwrap_or_default().to_string(),
                own,
                in_flight,
                jobs,
            });
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }
}
