//! What the engine's loops share on this node: the store, the configuration, the bus, the
//! names on its leases, the counts per owner, the host gates and the outgoing client.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::EngineConfig;
use super::hosts::HostGates;
use super::{names, tenants};
use crate::bus::{Bus, QueuedTask};
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::store::{Store, TaskSettle};
use crate::task_token::TaskTokens;

/// Most outcomes written in one transaction.
pub(super) const SETTLE_BATCH: usize = 1024;

/// The longest the dispatcher sleeps without looking at the store, in case something
/// became due that nobody announced.
pub const IDLE_POLL: Duration = Duration::from_secs(1);

/// The same on a database shared with other nodes, whose notices wake this one: the look
/// is then only a safety net (a notice lost with a connection), and an idle node makes
/// well under one query a second (two loops every three seconds, plus the lease sweep).
pub const SHARED_IDLE_POLL: Duration = Duration::from_secs(3);

pub(super) struct Engine {
    pub(super) store: Arc<dyn Store>,
    pub(super) config: EngineConfig,
    pub(super) bus: Arc<Bus>,
    pub(super) metrics: Arc<Metrics>,
    /// This process's names on its leases (see `names`).
    pub(super) names: Arc<names::Names>,
    /// Calls in flight per owner, for `--owner-max-in-flight`.
    pub(super) tenants: Arc<tenants::Tenants>,
    /// See [`IDLE_POLL`] and [`SHARED_IDLE_POLL`].
    pub(super) idle_poll: Duration,
    /// Mints the tokens of calls that may answer 202.
    pub(super) tokens: Arc<TaskTokens>,
    /// The HTTP client of task calls (callbacks share it).
    pub(super) outbound: Arc<Outbound>,
    /// Per-destination limits, shared by every call this node makes.
    pub(super) hosts: Arc<HostGates>,
    /// What the dispatcher's claims found while it had nothing in flight (see
    /// [`super::EngineHandle::idle`]).
    pub(super) idle: std::sync::Mutex<Option<IdleSpell>>,
    /// Whether the lease loop has swept once (taken back expired leases, timed out awaited
    /// attempts): a node is not idle before.
    pub(super) swept: std::sync::atomic::AtomicBool,
    /// Cancelled when the grace period of a shutdown is over: the calls still running are
    /// abandoned (their tasks keep their leases in the store, which run out), so that none
    /// outlives the engine (in a Lambda invocation, a frozen call would wake up later).
    pub(super) abandon: tokio_util::sync::CancellationToken,
}

/// A run of claims that found nothing to do while nothing was in flight.
#[derive(Clone, Copy, Debug)]
pub(super) struct IdleSpell {
    /// The first of them.
    pub(super) since: std::time::Instant,
    /// The latest.
    pub(super) last: std::time::Instant,
    /// When the first task in backoff that the latest saw is due.
    pub(super) next_due: Option<crate::store::Millis>,
}

/// What a call holds from its claim until its outcome is committed (or it is abandoned):
/// its permit of `max_in_flight`, and its place under the name it was claimed under.
pub(super) struct Slot {
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) lease: names::Held,
    pub(super) _tenant: Option<tenants::TenantHeld>,
    /// The task's job may be decided before all its tasks ran (`JobOptions::decides_early`):
    /// once its outcome is stored, the job is looked at.
    pub(super) decides_early: bool,
}

/// An outcome on its way to the store, with the slot it frees once written.
pub(super) type Settled = (TaskSettle, Slot);

/// What a claimed call holds before it starts: its slot, and its place in the queued count.
pub(super) type Waiting = (Slot, QueuedTask);
