//! Node leases: one item a node (`NODES`/`<node>`) whose `alive_until` every claim and
//! renewal raises, and the sweep that takes a dead node's running tasks back to their queue
//! (see the module docs).

use std::collections::BTreeMap;

use aws_sdk_dynamodb::types::Select;

use super::DynamoStore;
use super::expr::{Change, Ex, Item, eq, is_in, n, need_n, need_s, s};
use super::items::{
    UNFINISHED, id_of_pk, index_of_sk, job_status_from, node_key, queue_pk, queue_sk,
};
use super::schema::sdk_error;
use super::tx::{Cancelled, TX_TASKS, TaskTx, Then, TxEnd};
use crate::job::JobId;
use crate::store::{Millis, NodeId, StoreError, StoreResult};

/// How long after its lease ran out a node's item is kept, so that gsi3's lag cannot hide a
/// task it claimed just before it died.
const NODE_FORGET_MS: Millis = 10 * 60 * 1000;

/// The take-back of one job's tasks from a node whose lease ran out: (index, attempts)
/// each.
struct TakeBackTx {
    node: NodeId,
    id: JobId,
    now: Millis,
}

impl TaskTx<(u64, u32)> for TakeBackTx {
    fn job(&self) -> JobId {
        self.id
    }

    fn job_change(&self, tasks: &[(u64, u32)]) -> Change {
        Change::new()
            .incr("n_running", -(tasks.len() as i64))
            .when(|e| is_in(e, "status", &UNFINISHED))
    }

    fn task_change(&self, &(index, attempts): &(u64, u32)) -> (u64, Change) {
        let (id, node, now) = (self.id, self.node, self.now);
        let change = Change::new()
            .set("status", s("Pending"))
            .incr("attempts", -1)
            .set("run_at", n(now))
            .set("g2pk", s(queue_pk(id)))
            .set("g2sk", s(queue_sk(now, index)))
            .remove("node")
            .remove("g3pk")
            .remove("g3sk")
            .when(|e| eq(e, "status", s("Running")))
            .when(|e| eq(e, "attempts", n(attempts)))
            .when(|e| eq(e, "node", s(node.to_string())));
        (index, change)
    }

    async fn cancelled(
        &mut self,
        store: &DynamoStore,
        tasks: &mut Vec<(u64, u32)>,
        cancelled: Cancelled,
    ) -> StoreResult<Then> {
        if !cancelled.job_refused {
            return Ok(Then::Continue);
        }
        // The job finished meanwhile: a cancelled job's tasks are marked Cancelled; a
        // deleted job's are gone.
        if let Some(item) = store.job_item(self.id).await?
            && job_status_from(need_s(&item, "status")?)?.is_finished()
        {
            for &(index, attempts) in tasks.iter() {
                store
                    .cancel_running_task(self.id, index, attempts, Some(self.node), self.now)
                    .await?;
            }
        }
        Ok(Then::Stop)
    }
}

impl DynamoStore {
    /// `Store::tasks_renew`: one write of the node's lease, however many tasks it runs; returns
    /// how many gsi3 shows it running.
    pub(super) async fn renew_lease(&self, node: NodeId, until: Millis) -> StoreResult<u64> {
        self.node_alive(node, until, false).await?;
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("g3pk"), ex.v(s(format!("N#{node}"))));
        let mut count = 0u64;
        let mut start: Option<Item> = None;
        loop {
            self.count("Query");
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("gsi3")
                .key_condition_expression(&cond)
                .set_expression_attribute_names(ex.names())
                .set_expression_attribute_values(ex.values())
                .select(Select::Count)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            count += out.count() as u64;
            match out.last_evaluated_key {
                Some(key) => start = Some(key),
                None => return Ok(count),
            }
        }
    }

    /// `Store::tasks_expire`: the running tasks of every node past its lease go back to their
    /// queues.
    pub(super) async fn expire_leases(&self, now: Millis) -> StoreResult<u64> {
        let mut taken = 0;
        for (node, alive_until) in self.nodes().await? {
            if alive_until >= now {
                continue;
            }
            let tasks = self.node_tasks(node, None).await?;
            if tasks.is_empty() {
                if alive_until < now - NODE_FORGET_MS {
                    // Unless it came back meanwhile.
                    let only = Change::new().when(|e| eq(e, "alive_until", n(alive_until)));
                    self.delete(node_key(node), only).await?;
                }
                continue;
            }
            let mut by_job: BTreeMap<JobId, Vec<(u64, u32)>> = BTreeMap::new();
            for (job, index, attempts) in tasks {
                by_job.entry(job).or_default().push((index, attempts));
            }
            for (job, tasks) in by_job {
                taken += self.take_back(node, job, tasks, now).await?;
            }
        }
        Ok(taken)
    }

    /// Takes one job's tasks from a node whose lease ran out; returns how many went back to
    /// the queue.
    async fn take_back(
        &self,
        node: NodeId,
        id: JobId,
        tasks: Vec<(u64, u32)>,
        now: Millis,
    ) -> StoreResult<u64> {
        let mut tx = TakeBackTx { node, id, now };
        let mut taken = 0;
        for chunk in tasks.chunks(TX_TASKS) {
            if let TxEnd::Committed(tasks) = self.transact_tasks(&mut tx, chunk.to_vec()).await? {
                taken += tasks.len() as u64;
            }
        }
        Ok(taken)
    }

    /// Raises this node's lease to at least `until` (creating its item).
    pub(super) async fn node_alive(
        &self,
        node: NodeId,
        until: Millis,
        raise_only: bool,
    ) -> StoreResult<()> {
        let mut change = Change::new().set("alive_until", n(until));
        if raise_only {
            change = change.when(|e| {
                let alive = e.n("alive_until");
                format!(
                    "attribute_not_exists({alive}) OR {alive} < {}",
                    e.v(n(until))
                )
            });
        }
        self.update(node_key(node), change, None).await?;
        Ok(())
    }

    /// The running tasks gsi3 shows for a node, as (job, index, attempts); of one job when
    /// given.
    pub(super) async fn node_tasks(
        &self,
        node: NodeId,
        job: Option<JobId>,
    ) -> StoreResult<Vec<(JobId, u64, u32)>> {
        let mut ex = Ex::default();
        let mut cond = format!("{} = {}", ex.n("g3pk"), ex.v(s(format!("N#{node}"))));
        if let Some(job) = job {
            cond.push_str(&format!(
                " AND begins_with({}, {})",
                ex.n("g3sk"),
                ex.v(s(format!("{job}#")))
            ));
        }
        let items = self
            .query_all(Some("gsi3"), cond, ex, None, true, usize::MAX)
            .await?;
        items
            .iter()
            .map(|item| {
                Ok((
                    id_of_pk(need_s(item, "pk")?)?,
                    index_of_sk(need_s(item, "sk")?)?,
                    need_n(item, "attempts")?,
                ))
            })
            .collect()
    }

    /// The nodes that hold leases: (node, alive_until).
    pub(super) async fn nodes(&self) -> StoreResult<Vec<(NodeId, Millis)>> {
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("pk"), ex.v(s("NODES")));
        let items = self
            .query_all(None, cond, ex, None, true, usize::MAX)
            .await?;
        items
            .iter()
            .map(|item| {
                let text = need_s(item, "sk")?;
                let node = i64::from_str_radix(text, 16)
                    .map_err(|_| StoreError::Other(format!("stored node {text:?} is invalid")))?;
                Ok((NodeId(node), need_n(item, "alive_until")?))
            })
            .collect()
    }
}
