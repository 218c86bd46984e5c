//! Per-destination limits: the gates a call passes on its way to an endpoint's host.
//!
//! Calls are grouped by the endpoint's host, `host:port` as the URL gives it (lowercase, the
//! port only when it is not the scheme's default), see [`host_key`]. Each host has a *gate*
//! with the server's limits (`--per-host-concurrency`, `--per-host-rate`): they cap every
//! call to that host from every job on this node. A job with `per_host_concurrency` or
//! `per_host_rate` options also has a gate of its own per host, which caps that job's calls
//! to the host on top of the server's. Limits hold per node: several nodes on one database
//! each apply them, so a host sees up to the limit times the number of nodes.
//!
//! A call passes its job's gate first, then the host's; at each gate it takes a concurrency
//! permit, then its turn from the rate's bucket. That order keeps a job's waiting calls from
//! holding the host's permits while they wait for their own job's turns (which would slow
//! every other job calling the host); the price is that a call the host's gate holds back
//! may start closer to the job's previous call than the job's rate alone would allow.
//!
//! A 429, or a 503 with `Retry-After`, pauses the host's gate until the time the host asked
//! for (1 s for a 429 without `Retry-After`): no new call to the host starts meanwhile,
//! from any job, limits or not; calls already started go on. After a pause the rate's bucket
//! starts empty, so calls resume at the rate rather than in a burst.
//!
//! The bucket holds a single token: with a rate of R per second, calls to a host start 1/R
//! apart, with no burst, so an API that limits to R a second sees at most R + 1 calls in any
//! second, give or take a call that follows a late one closer than 1/R (never before its own
//! turn, see [`Pacer`]). Waiting calls queue on a tokio `Mutex`, which is fair (first come,
//! first served), and the head of the queue sleeps until its turn, so a limited host costs
//! one timer, not a wake-up per waiting call.
//!
//! Rejected alternative: the `governor` crate. Its async `until_ready` polls on a timer of
//! its own (futures-timer over its own clock), so it cannot be driven by
//! `tokio::time::pause()` in tests; it has no FIFO order among waiters and no way to push
//! every waiter past a pause that arrives while they wait. The bucket needed here is a few
//! lines over `tokio::time`.
//!
//! A call waiting at a gate holds its `max_in_flight` slot. So that a slow host cannot take
//! every slot, [`HostGates::backlogged_jobs`] names the jobs that have more calls waiting
//! at a host than its gates can start within a second; the dispatcher leaves them out of
//! its next claim.
//!
//! Gates are dropped when nobody uses them and they hold no state worth keeping (no pause
//! in force, a full bucket); the few left over are swept when the map has doubled since the
//! last sweep, so the map does not grow with the number of hosts ever called.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use url::Url;

use self::adaptive::{Adaptive, Signal};
use crate::job::{HostConcurrency, HostLimits, JobId};
use crate::metrics::HostLabel;

pub mod adaptive;
mod pace;

use self::pace::{Pacer, Pause};

/// How adaptive limits (`auto`) start, and when a host's breaker opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adaptation {
    /// Where an adaptive limit starts (`--per-host-initial`).
    pub initial: u32,
    /// Connection failures in a row that open a host's breaker; 0: never
    /// (`--host-breaker-failures`).
    pub breaker_failures: u32,
}

impl Default for Adaptation {
    fn default() -> Self {
        Adaptation {
            initial: 16,
            breaker_failures: 20,
        }
    }
}

/// The highest an adaptive limit goes: far above any host's capacity, below any overflow.
const ADAPTIVE_CAP: u32 = 100_000;

/// The first cool-down of an open breaker; each failed probe doubles it, up to
/// [`BREAKER_MAX_COOLDOWN`].
const BREAKER_COOLDOWN: Duration = Duration::from_secs(1);
const BREAKER_MAX_COOLDOWN: Duration = Duration::from_secs(60);

/// What the gates record: calls waiting, pauses, adaptive limits, breaker trips.
#[derive(Clone, Default)]
pub struct HostMetrics {
    pub waiting: Gauge,
    pub pauses: Counter,
    pub limits: prometheus_client::metrics::family::Family<HostLabel, Gauge>,
    pub breaker_trips: Counter,
}

/// The horizon of "soon" in [`HostGates::backlogged_jobs`]: a job may have as many calls
/// waiting at a host as its gates can start within this time.
const SOON: Duration = Duration::from_secs(1);

/// The pause after a 429 that did not say how long to wait.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

/// Maps are swept no more often than when they reach this size, then twice the size left.
const SWEEP_MIN: usize = 64;

/// How many waiting calls `limits` can start within [`SOON`] (an adaptive limit counted at
/// `adaptive_now`).
fn soon(limits: &HostLimits, adaptive_now: Option<u32>) -> u64 {
    let by_concurrency = match limits.concurrency {
        None => u64::MAX,
        Some(HostConcurrency::Fixed(n)) => u64::from(n),
        Some(HostConcurrency::Auto) => u64::from(adaptive_now.unwrap_or(1)),
    };
    let by_rate = limits.rate.map_or(u64::MAX, |r| {
        (r * SOON.as_secs_f64()).floor().max(1.0) as u64
    });
    by_concurrency.min(by_rate)
}

/// The key of an endpoint's host: `host` or `host:port` (an explicit, non-default port),
/// lowercase; `None` for what is not an http(s) URL (the built-in test task).
pub fn host_key(endpoint: &str) -> Option<Arc<str>> {
    let url = Url::parse(endpoint).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    // The URL parser lowercases domain names already; IP literals have no case but IPv6's
    // hexadecimal digits, which it prints in lowercase too.
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}").into(),
        None => host.into(),
    })
}

/// A gate's limit on calls in flight.
enum Permits {
    Fixed(Arc<Semaphore>),
    Adaptive(Arc<Adaptive>),
}

/// A call's place under a gate's limit: given back when dropped, or with what the call said
/// ([`GatePermit::release`]).
enum GatePermit {
    Fixed(#[allow(dead_code)] OwnedSemaphorePermit),
    Adaptive(Arc<Adaptive>, Option<adaptive::Slot>),
}

impl GatePermit {
    /// Gives the place back with what the call said; the adaptive limit afterwards, when it
    /// changed.
    fn release(&mut self, signal: Signal) -> Option<u32> {
        match self {
            GatePermit::Fixed(_) => None,
            GatePermit::Adaptive(limit, slot) => {
                slot.take().and_then(|slot| limit.release(slot, signal))
            }
        }
    }
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        self.release(Signal::Nothing);
    }
}

/// The limits on calls to one host, of the server or of one job.
struct Gate {
    permits: Option<Permits>,
    pacer: Pacer,
}

impl Gate {
    fn new(limits: HostLimits, pause: Arc<Pause>, adaptation: Adaptation) -> Self {
        Gate {
            permits: limits.concurrency.map(|c| match c {
                HostConcurrency::Fixed(n) => Permits::Fixed(Arc::new(Semaphore::new(n as usize))),
                HostConcurrency::Auto => {
                    Permits::Adaptive(Arc::new(Adaptive::new(adaptation.initial, ADAPTIVE_CAP)))
                }
            }),
            pacer: Pacer::new(limits.rate, pause),
        }
    }

    /// A place under the limit (when limited), then the call's turn.
    async fn pass(&self) -> Option<GatePermit> {
        let permit = match &self.permits {
            Some(Permits::Fixed(permits)) => Some(GatePermit::Fixed(
                permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("gate semaphores are never closed"),
            )),
            Some(Permits::Adaptive(limit)) => {
                let slot = limit.acquire().await;
                Some(GatePermit::Adaptive(limit.clone(), Some(slot)))
            }
            None => None,
        };
        self.pacer.wait().await;
        permit
    }

    /// The adaptive limit now, if the gate has one.
    fn adaptive_limit(&self) -> Option<u32> {
        match &self.permits {
            Some(Permits::Adaptive(limit)) => Some(limit.limit()),
            _ => None,
        }
    }

    fn is_adaptive(&self) -> bool {
        matches!(self.permits, Some(Permits::Adaptive(_)))
    }

    fn at_rest(&self, now: Instant) -> bool {
        self.pacer.at_rest(now)
    }
}

/// One job's use of one host.
struct JobEntry {
    /// `None` when the job sets no per-host option.
    gate: Option<Arc<Gate>>,
    limits: HostLimits,
    /// Calls of this job at this host: waiting or in flight.
    users: usize,
    /// Calls still waiting at the gates.
    waiting: usize,
    /// Named by the last `backlogged_jobs`: its claim waits on the backlog to clear.
    backlogged: bool,
}

impl JobEntry {
    fn at_rest(&self, now: Instant) -> bool {
        self.gate.as_ref().is_none_or(|gate| gate.at_rest(now))
    }
}

/// A host's breaker: connection failures in a row, and once open, the cool-down and the
/// probe's permit (one call at a time until the host answers again).
#[derive(Default)]
struct Breaker {
    failures: u32,
    cooldown: Duration,
    probe: Option<Arc<Semaphore>>,
}

struct HostEntry {
    gate: Arc<Gate>,
    pause: Arc<Pause>,
    breaker: Breaker,
    /// Calls to this host, of all jobs: waiting or in flight.
    users: usize,
    jobs: HashMap<JobId, JobEntry>,
    sweep_jobs_at: usize,
}

impl HostEntry {
    fn at_rest(&self, now: Instant) -> bool {
        !self.pause.in_force(now) && self.gate.at_rest(now) && self.breaker.probe.is_none()
    }
}

struct State {
    hosts: HashMap<Arc<str>, HostEntry>,
    sweep_hosts_at: usize,
}

/// Every host gate of this node. See the module docs.
pub struct HostGates {
    server: HostLimits,
    state: Mutex<State>,
    /// Signalled when a job named by `backlogged_jobs` no longer is: it may be claimed again.
    cleared: Notify,
    adaptation: Adaptation,
    metrics: HostMetrics,
}

impl HostGates {
    /// Gates with the server's limits, adaptive ones (`auto`) as `adaptation` says.
    pub fn new(server: HostLimits, adaptation: Adaptation, metrics: HostMetrics) -> Self {
        HostGates {
            server,
            state: Mutex::new(State {
                hosts: HashMap::new(),
                sweep_hosts_at: SWEEP_MIN,
            }),
            cleared: Notify::new(),
            adaptation,
            metrics,
        }
    }

    /// Waits until a call of `job` (whose own limits are `limits`) may start at `host`. The
    /// returned pass holds the call's permits: drop it when the call is over. Dropping the
    /// future gives up the call's place.
    pub async fn pass(self: &Arc<Self>, job: JobId, limits: HostLimits, host: Arc<str>) -> Pass {
        let Entered {
            host_gate,
            job_gate,
            waiting,
            probe,
            pause,
        } = self.enter(job, limits, &host);
        let mut ticket = Ticket {
            gates: self.clone(),
            job,
            host,
            waiting,
        };
        let job_permit = match job_gate {
            Some(gate) => gate.pass().await,
            None => None,
        };
        let host_permit = if waiting {
            host_gate.pass().await
        } else {
            None
        };
        // An open breaker, as it is now (it may have opened while this call waited at the
        // gates): the cool-down, then one call at a time (the probe) until the host
        // answers; its close lets everyone through.
        let mut probe_permit = None;
        let mut probe = probe.or_else(|| self.probe_of(&ticket.host));
        while let Some(gate) = probe.take() {
            pause.wait().await;
            match gate.clone().acquire_owned().await {
                Ok(permit) if pause.in_force(Instant::now()) => {
                    drop(permit);
                    probe = Some(gate);
                }
                Ok(permit) => probe_permit = Some(permit),
                Err(_closed) => {}
            }
        }
        ticket.arrived();
        Pass {
            job_permit,
            host_permit,
            probe: probe_permit,
            ticket,
        }
    }

    /// The probe gate of `host`'s breaker, while it is open.
    fn probe_of(&self, host: &str) -> Option<Arc<Semaphore>> {
        let state = self.state.lock().expect("not poisoned");
        state.hosts.get(host)?.breaker.probe.clone()
    }

    /// What a call said about its host, when it is over: the adaptive limits it passed
    /// learn from it, and the host's breaker counts its connection failures in a row.
    fn record(&self, pass: &mut Pass, signal: Signal) {
        pass.job_permit.as_mut().map(|p| p.release(signal));
        let changed = pass.host_permit.as_mut().and_then(|p| p.release(signal));
        let host = pass.ticket.host.clone();
        if let Some(limit) = changed {
            self.metrics
                .limits
                .get_or_create(&HostLabel {
                    host: host.to_string(),
                })
                .set(i64::from(limit));
        }
        let threshold = self.adaptation.breaker_failures;
        if threshold == 0 || matches!(signal, Signal::Nothing | Signal::TimedOut) {
            return;
        }
        // Held until the breaker is decided, so that no other call goes as a second probe
        // in between.
        let probe_permit = pass.probe.take();
        let was_probe = probe_permit.is_some();
        let mut state = self.state.lock().expect("not poisoned");
        let Some(entry) = state.hosts.get_mut(&host) else {
            return;
        };
        let breaker = &mut entry.breaker;
        if signal != Signal::Unreachable {
            breaker.failures = 0;
            if let Some(probe) = breaker.probe.take() {
                probe.close();
                breaker.cooldown = Duration::ZERO;
                tracing::info!(host = %host, "host answers again; its breaker closes");
            }
            return;
        }
        breaker.failures = breaker.failures.saturating_add(1);
        let cooldown = if was_probe {
            (breaker.cooldown * 2).min(BREAKER_MAX_COOLDOWN)
        } else if breaker.probe.is_none() && breaker.failures >= threshold {
            breaker.probe = Some(Arc::new(Semaphore::new(1)));
            self.metrics.breaker_trips.inc();
            BREAKER_COOLDOWN
        } else {
            return;
        };
        breaker.cooldown = cooldown;
        entry.pause.extend(Instant::now() + cooldown);
        drop(probe_permit);
        tracing::warn!(
            host = %host,
            failures = breaker.failures,
            cooldown_ms = cooldown.as_millis() as u64,
            "host unreachable: its calls wait, then one probe decides"
        );
    }

    /// Registers a call at its gates: the host's, the job's own (when it has limits), and
    /// whether the call has to wait at all.
    fn enter(&self, job: JobId, limits: HostLimits, host: &Arc<str>) -> Entered {
        let now = Instant::now();
        let mut state = self.state.lock().expect("not poisoned");
        let state = &mut *state;
        if !state.hosts.contains_key(host) {
            sweep(&mut state.hosts, &mut state.sweep_hosts_at, |host, h| {
                let keep = h.users > 0 || !h.at_rest(now);
                if !keep && h.gate.is_adaptive() {
                    self.metrics.limits.remove(&HostLabel {
                        host: host.to_string(),
                    });
                }
                keep
            });
            let pause = Arc::new(Pause::new());
            let gate = Arc::new(Gate::new(self.server, pause.clone(), self.adaptation));
            if let Some(limit) = gate.adaptive_limit() {
                self.metrics
                    .limits
                    .get_or_create(&HostLabel {
                        host: host.to_string(),
                    })
                    .set(i64::from(limit));
            }
            state.hosts.insert(
                host.clone(),
                HostEntry {
                    gate,
                    pause,
                    breaker: Breaker::default(),
                    users: 0,
                    jobs: HashMap::new(),
                    sweep_jobs_at: SWEEP_MIN,
                },
            );
        }
        let entry = state.hosts.get_mut(host).expect("inserted above");
        entry.users += 1;
        if !entry.jobs.contains_key(&job) {
            sweep(&mut entry.jobs, &mut entry.sweep_jobs_at, |_, j| {
                j.users > 0 || !j.at_rest(now)
            });
            entry.jobs.insert(
                job,
                JobEntry {
                    gate: (!limits.is_unlimited())
                        .then(|| Arc::new(Gate::new(limits, entry.pause.clone(), self.adaptation))),
                    limits,
                    users: 0,
                    waiting: 0,
                    backlogged: false,
                },
            );
        }
        let job_entry = entry.jobs.get_mut(&job).expect("inserted above");
        if job_entry.limits != limits {
            // The job's limits changed (`PATCH /v1/jobs/{id}`): a new gate for the calls from
            // now on; those already past or waiting at the old one keep it.
            job_entry.gate = (!limits.is_unlimited())
                .then(|| Arc::new(Gate::new(limits, entry.pause.clone(), self.adaptation)));
            job_entry.limits = limits;
        }
        job_entry.users += 1;
        // Most calls meet no limit and no pause: they need not count as waiting nor take
        // the pacer's lock.
        let probe = entry.breaker.probe.clone();
        let waiting = job_entry.gate.is_some()
            || !self.server.is_unlimited()
            || entry.pause.in_force(now)
            || probe.is_some();
        if waiting {
            job_entry.waiting += 1;
            self.metrics.waiting.inc();
        }
        Entered {
            host_gate: entry.gate.clone(),
            job_gate: job_entry.gate.clone(),
            waiting,
            probe,
            pause: entry.pause.clone(),
        }
    }

    /// Pauses every new call to `host` for `delay` (a 429 or 503 answer to a call of `job`
    /// asked for it), unless a longer pause is in force. A pause the host did not ask for
    /// (`asked`: a 429 without `Retry-After`) is left to an adaptive limit the call passed
    /// (the host's, or its job's there), which halves instead, unless it is down to 1.
    pub fn pause(&self, host: &str, job: JobId, delay: Duration, asked: bool) {
        let extended = {
            let state = self.state.lock().expect("not poisoned");
            // The caller holds a pass for this host, so its entry is there.
            state.hosts.get(host).is_some_and(|entry| {
                // An adaptive limit above 1 can still halve; at 1, the pause is the brake.
                let halves = [
                    Some(&entry.gate),
                    entry.jobs.get(&job).and_then(|j| j.gate.as_ref()),
                ]
                .into_iter()
                .flatten()
                .any(|g| g.adaptive_limit().is_some_and(|limit| limit > 1));
                (asked || !halves) && entry.pause.extend(Instant::now() + delay)
            })
        };
        if extended {
            self.metrics.pauses.inc();
            tracing::debug!(host, delay_ms = delay.as_millis() as u64, "host paused");
        }
    }

    /// The jobs that have more calls waiting at a host than its gates can start soon (the
    /// lower of each gate's concurrency and of one second's worth of its rate; none while a
    /// pause has more than a second to run). Their calls hold slots of `max_in_flight`
    /// without making progress: the dispatcher leaves them out of its claims until their
    /// backlog clears.
    pub fn backlogged_jobs(&self) -> Vec<JobId> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("not poisoned");
        let mut jobs = HashSet::new();
        for host in state.hosts.values_mut() {
            // (An open breaker holds its calls until a probe gets through.)
            let paused_long = host.pause.until().is_some_and(|until| until > now + SOON)
                || host.breaker.probe.is_some();
            for (id, job) in host.jobs.iter_mut() {
                let soon = if paused_long {
                    0
                } else {
                    self.soon(job, &host.gate)
                };
                job.backlogged = job.waiting as u64 > soon;
                if job.backlogged {
                    jobs.insert(*id);
                }
            }
        }
        jobs.into_iter().collect()
    }

    /// How many of a job's calls waiting at a host its gates and the host's can start
    /// within [`SOON`].
    fn soon(&self, job: &JobEntry, host_gate: &Gate) -> u64 {
        let job_now = job.gate.as_ref().and_then(|g| g.adaptive_limit());
        soon(&job.limits, job_now).min(soon(&self.server, host_gate.adaptive_limit()))
    }

    /// Every host with a gate in memory, as `GET /v1/hosts` shows them, busiest first.
    pub fn states(&self) -> Vec<crate::bus::HostState> {
        let state = self.state.lock().expect("not poisoned");
        let mut hosts: Vec<crate::bus::HostState> = state
            .hosts
            .iter()
            .map(|(host, entry)| {
                let waiting: usize = entry.jobs.values().map(|j| j.waiting).sum();
                crate::bus::HostState {
                    host: host.to_string(),
                    limit: entry
                        .gate
                        .adaptive_limit()
                        .or_else(|| self.server.concurrency.and_then(|c| c.fixed())),
                    adaptive: entry.gate.is_adaptive(),
                    in_flight: entry.users.saturating_sub(waiting) as u64,
                    waiting: waiting as u64,
                    breaker_open: entry.breaker.probe.is_some(),
                    failures: entry.breaker.failures,
                }
            })
            .collect();
        hosts.sort_by(|a, b| {
            (b.in_flight + b.waiting)
                .cmp(&(a.in_flight + a.waiting))
                .then_with(|| a.host.cmp(&b.host))
        });
        hosts
    }

    /// Resolves when a job that `backlogged_jobs` named has cleared its backlog.
    pub async fn cleared(&self) {
        self.cleared.notified().await
    }

    /// Hosts with a gate in memory.
    #[cfg(test)]
    fn hosts(&self) -> usize {
        self.state.lock().expect("not poisoned").hosts.len()
    }
}

/// Removes the entries `keep` rejects once the map has reached `*at`, then sets the next
/// sweep at twice what is left: the cost is constant per insert on average, and the map
/// stays within twice the entries in use or holding state.
fn sweep<K, V>(map: &mut HashMap<K, V>, at: &mut usize, mut keep: impl FnMut(&K, &V) -> bool) {
    if map.len() < *at {
        return;
    }
    map.retain(|k, v| keep(k, v));
    *at = (map.len() * 2).max(SWEEP_MIN);
}

/// A call's registration at its gates, from the moment it arrives until its call is over.
struct Ticket {
    gates: Arc<HostGates>,
    job: JobId,
    host: Arc<str>,
    /// Counted among the calls waiting at the gates.
    waiting: bool,
}

impl Ticket {
    /// The call passed every gate and starts.
    fn arrived(&mut self) {
        if !self.waiting {
            return;
        }
        self.waiting = false;
        let gates = &self.gates;
        let mut state = gates.state.lock().expect("not poisoned");
        gates.metrics.waiting.dec();
        let Some(host) = state.hosts.get_mut(&self.host) else {
            return;
        };
        let host_gate = host.gate.clone();
        let Some(job) = host.jobs.get_mut(&self.job) else {
            return;
        };
        job.waiting -= 1;
        if job.backlogged && job.waiting as u64 <= gates.soon(job, &host_gate) {
            job.backlogged = false;
            gates.cleared.notify_one();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let gates = &self.gates;
        let now = Instant::now();
        let mut state = gates.state.lock().expect("not poisoned");
        let Some(host) = state.hosts.get_mut(&self.host) else {
            return;
        };
        host.users -= 1;
        if let Some(job) = host.jobs.get_mut(&self.job) {
            job.users -= 1;
            if self.waiting {
                // Given up while waiting (cancelled, or the engine stopping).
                job.waiting -= 1;
                gates.metrics.waiting.dec();
            }
            // A job's own adaptive limit is kept between its calls, as the host's is.
            let adaptive = job.gate.as_ref().is_some_and(|g| g.is_adaptive());
            if job.users == 0 && job.at_rest(now) && !adaptive {
                host.jobs.remove(&self.job);
            }
        }
        // An adaptive limit learnt, and connection failures counted towards the breaker,
        // are kept between calls (until a sweep, should the map grow): a job calling one at
        // a time would otherwise start them afresh each call.
        if host.users == 0
            && host.jobs.is_empty()
            && host.at_rest(now)
            && !host.gate.is_adaptive()
            && host.breaker.failures == 0
        {
            state.hosts.remove(&self.host);
        }
    }
}

/// Leave to call a host; dropping it frees the permits taken at the gates, [`Pass::finish`]
/// with what the call said.
pub struct Pass {
    // Fields drop in order: the permits before the ticket, which looks whether the gates
    // are at rest.
    job_permit: Option<GatePermit>,
    host_permit: Option<GatePermit>,
    /// Held by the one call an open breaker lets through.
    probe: Option<OwnedSemaphorePermit>,
    ticket: Ticket,
}

impl Pass {
    /// The call is over: frees its permits, and the host's adaptive limits and breaker
    /// learn what it said.
    pub fn finish(mut self, signal: Signal) {
        let gates = self.ticket.gates.clone();
        gates.record(&mut self, signal);
    }
}

/// A call's gates, as it registers at them.
struct Entered {
    host_gate: Arc<Gate>,
    job_gate: Option<Arc<Gate>>,
    /// Whether the call has anything to wait for.
    waiting: bool,
    /// An open breaker's probe permit.
    probe: Option<Arc<Semaphore>>,
    pause: Arc<Pause>,
}

#[cfg(test)]
mod tests;
