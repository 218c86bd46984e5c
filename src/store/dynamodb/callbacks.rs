//! The callback outbox: a finished job owes its callback while it is in gsi2 `CB`, sorted by
//! when the next attempt is due. A node leases one by moving that time, on condition that
//! it is still the one read; an attempt is recorded on condition that the attempts stored
//! are one less; once delivered or given up, the job goes where retention finds it.

use aws_sdk_dynamodb::types::ReturnValue;

use super::DynamoStore;
use super::expr::{Change, Ex, eq, get_n, n, need_s, s};
use super::items::{CB_DELIVERED, CB_FAILED, CB_PENDING, job_key, pad_time, retire};
use crate::store::codec::parse_id;
use crate::store::{CallbackDue, CallbackOutcome, CallbackRecord, Millis, StoreError, StoreResult};

impl DynamoStore {
    /// `Store::callbacks_due`.
    pub(super) async fn lease_due_callbacks(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<CallbackDue>> {
        let mut ex = Ex::default();
        let cond = format!(
            "{} = {} AND {} < {}",
            ex.n("g2pk"),
            ex.v(s("CB")),
            ex.n("g2sk"),
            ex.v(s(pad_time(now + 1)))
        );
        let items = self
            .query_all(Some("gsi2"), cond, ex, None, true, limit as usize)
            .await?;
        let mut due = Vec::with_capacity(items.len());
        for item in items {
            let id = parse_id(need_s(&item, "id")?)?;
            let sk = need_s(&item, "g2sk")?;
            let seen: Millis = sk[..13]
                .parse()
                .map_err(|_| StoreError::Other(format!("stored due key {sk:?} is invalid")))?;
            // Leased only if it is still due at the time the index showed: another node
            // that leased it first moved that time.
            let change = Change::new()
                .set("cb_next", n(lease_until))
                .set("g2sk", s(format!("{}#{id}", pad_time(lease_until))))
                .when(|e| eq(e, "cb_state", s(CB_PENDING)))
                .when(|e| eq(e, "cb_next", n(seen)))
                .when(|e| format!("attribute_not_exists({})", e.n("deleting")));
            let Some(job) = self
                .update(job_key(id), change, Some(ReturnValue::AllNew))
                .await?
            else {
                continue;
            };
            due.push(CallbackDue {
                job_id: id,
                url: need_s(&job, "callback_url")?.to_string(),
                attempts: get_n(&job, "cb_attempts").unwrap_or(0),
            });
        }
        Ok(due)
    }

    /// `Store::callback_next_due`: the first due time in gsi2 `CB`.
    pub(super) async fn next_callback_due(&self) -> StoreResult<Option<Millis>> {
        let mut ex = Ex::default();
        let cond = format!("{} = {}", ex.n("g2pk"), ex.v(s("CB")));
        let first = self
            .query_all(Some("gsi2"), cond, ex, None, true, 1)
            .await?;
        first
            .first()
            .map(|item| {
                let sk = need_s(item, "g2sk")?;
                sk[..13]
                    .parse()
                    .map_err(|_| StoreError::Other(format!("stored due key {sk:?} is invalid")))
            })
            .transpose()
    }

    /// `Store::callback_record`.
    pub(super) async fn record_callback(&self, record: &CallbackRecord) -> StoreResult<bool> {
        let id = record.job_id;
        let previous = i64::from(record.attempts) - 1;
        let mut change = Change::new()
            .set("cb_attempts", n(record.attempts))
            .when(|e| eq(e, "cb_state", s(CB_PENDING)))
            .when(|e| eq(e, "cb_attempts", n(previous)));
        match &record.outcome {
            CallbackOutcome::Retry { at, error } => {
                change = change
                    .set("cb_next", n(*at))
                    .set("cb_error", s(error.clone()))
                    .set("g2sk", s(format!("{}#{id}", pad_time(*at))));
            }
            CallbackOutcome::Delivered | CallbackOutcome::GaveUp { .. } => {
                // No longer owed: out of the due index, into retention's.
                let Some(job) = self.job_item(id).await? else {
                    return Ok(false);
                };
                let finished_at: Millis = get_n(&job, "finished_at").unwrap_or(record.now);
                change = change.remove("cb_next").remove("g2pk").remove("g2sk");
                change = retire(change, id, finished_at);
                change = match &record.outcome {
                    CallbackOutcome::GaveUp { error } => change
                        .set("cb_state", s(CB_FAILED))
                        .set("cb_error", s(error.clone())),
                    _ => change
                        .set("cb_state", s(CB_DELIVERED))
                        .set("cb_delivered_at", n(record.now)),
                };
            }
        }
        Ok(self.update(job_key(id), change, None).await?.is_some())
    }
}
