//! An adaptive limit on calls in flight to one host (`per_host_concurrency: auto`), and the
//! signals calls give it.
//!
//! The limit moves in rounds, as a congestion window does: a round is as many completed
//! calls as the limit allowed when it began. A round whose calls all answered at their usual
//! latency raises the limit by one; a sign of overload (a 429, a 503, a timeout, or a round
//! whose mean latency is more than [`LATENCY_FACTOR`] times the lowest round mean of the
//! last [`BASE_WINDOW`]) halves it at once, and starts a new round, so that the calls still
//! in flight from before, which saw the same overload, do not halve it again (TCP's "once
//! per window"). The limit stays between 1 and its cap.
//!
//! Plain additive increase would spend half of each cycle well below the host's capacity.
//! So the limit remembers where the last overload came (`ceiling`): it climbs back by one
//! per round up to just below it, then probes above it only one step per [`PROBE_ROUNDS`]
//! rounds, in the spirit of TCP CUBIC's plateau around its last maximum. Against an endpoint
//! that serves K calls at once and refuses the rest, the limit spends most of its time at K
//! and K - 1, and a 429 comes about once per probe.
//!
//! The latency signal (TCP Vegas, Netflix's concurrency-limits) catches hosts that queue
//! rather than refuse: their latency grows with the calls in flight beyond their workers.
//! It compares round means, not single calls, so one slow task (tasks differ) does not halve
//! the limit; a host whose tasks differ widely in cost should use a fixed limit.
//!
//! Waiting calls queue in arrival order (a tokio semaphore, fair, whose permits the limit
//! adds or takes back). A round in which the calls in flight never reached the limit does
//! not raise it: a host called two at a time says nothing of whether it takes more.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How far above its recent best a round's mean latency may go before it counts as
/// overload.
pub const LATENCY_FACTOR: f64 = 1.5;

/// How long the best round mean is remembered: the latency the host had unloaded, lately.
pub const BASE_WINDOW: Duration = Duration::from_secs(30);

/// Rounds the limit waits at its last ceiling before it probes one step above.
pub const PROBE_ROUNDS: u32 = 8;

/// What a call to a host said about the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Signal {
    /// An answer in this time: a sample of the host's latency.
    Answered(Duration),
    /// A 429 or a 503: more calls than the host can take.
    Overloaded,
    /// No answer in time: overload too, for the limit; for the breaker, no news either way
    /// (a host that drops connections silently is not known to be up).
    TimedOut,
    /// An answer that says nothing of its capacity (a 5xx but 503, a response too large):
    /// the host is reachable.
    Reachable,
    /// No connection could be made: counts towards the breaker.
    Unreachable,
    /// Nothing learnt (the call was cancelled or abandoned).
    Nothing,
}

/// The limit's state, under the lock.
#[derive(Debug)]
struct State {
    limit: u32,
    cap: u32,
    in_flight: u32,
    /// Permits to keep when calls give theirs back: what a decrease could not take from
    /// the semaphore at once, its permits being out with calls.
    owed: u32,
    /// The current round: when it began, how many completions end it, how many came, the
    /// sum of their latencies, and the most calls in flight during it.
    round: u64,
    round_size: u32,
    done: u32,
    latency_sum: Duration,
    peak: u32,
    /// Where the last overload came: the limit then.
    ceiling: Option<u32>,
    /// Rounds spent at `ceiling - 1` or above since the limit got there.
    at_ceiling: u32,
    /// Round means of the last [`BASE_WINDOW`] that later ones did not beat, oldest (and
    /// lowest) first: the front is the best one (a monotonic queue, constant work a round).
    means: VecDeque<(Instant, Duration)>,
}

/// The adaptive limit of one host (or of one job at one host). See the module docs.
#[derive(Debug)]
pub struct Adaptive {
    state: Mutex<State>,
    /// One permit per place under the limit: tokio's semaphore queues its waiters fairly,
    /// first come, first served. The limit changes it by adding permits or taking them
    /// back (at once when free, else as calls give theirs back: `State::owed`).
    permits: Semaphore,
}

/// A call's place under an adaptive limit; give it back with [`Adaptive::release`].
#[derive(Debug)]
pub struct Slot {
    /// The round in which the call started: a signal from a call started before the last
    /// decrease is old news.
    round: u64,
}

impl Adaptive {
    /// A limit starting at `initial`, never above `cap`.
    pub fn new(initial: u32, cap: u32) -> Self {
        let cap = cap.max(1);
        let limit = initial.clamp(1, cap);
        Adaptive {
            state: Mutex::new(State {
                limit,
                cap,
                in_flight: 0,
                owed: 0,
                round: 0,
                round_size: limit,
                done: 0,
                latency_sum: Duration::ZERO,
                peak: 0,
                ceiling: None,
                at_ceiling: 0,
                means: VecDeque::new(),
            }),
            permits: Semaphore::new(limit as usize),
        }
    }

    /// The limit now.
    pub fn limit(&self) -> u32 {
        self.state.lock().expect("not poisoned").limit
    }

    /// Calls in flight under it.
    pub fn in_flight(&self) -> u32 {
        self.state.lock().expect("not poisoned").in_flight
    }

    /// Waits for room under the limit, in arrival order.
    pub async fn acquire(&self) -> Slot {
        self.permits
            .acquire()
            .await
            .expect("adaptive semaphores are never closed")
            .forget();
        let mut state = self.state.lock().expect("not poisoned");
        state.in_flight += 1;
        state.peak = state.peak.max(state.in_flight);
        Slot { round: state.round }
    }

    /// Gives back a call's place with what the call said; returns the limit afterwards
    /// when it changed.
    pub fn release(&self, slot: Slot, signal: Signal) -> Option<u32> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("not poisoned");
        state.in_flight -= 1;
        let before = state.limit;
        match signal {
            Signal::Overloaded | Signal::TimedOut if slot.round == state.round => {
                state.decrease(now)
            }
            Signal::Answered(latency) if slot.round == state.round => {
                state.done += 1;
                state.latency_sum += latency;
                if state.done >= state.round_size {
                    state.end_round(now);
                }
            }
            _ => {}
        }
        let after = state.limit;
        // The place given back, with the change of the limit: permits added (less what a
        // decrease still owes), or taken back (at once if free, else from later releases).
        let change = 1 + i64::from(after) - i64::from(before);
        if change > 0 {
            let more = change as u32;
            let paid = more.min(state.owed);
            state.owed -= paid;
            self.permits.add_permits((more - paid) as usize);
        } else if change < 0 {
            let fewer = (-change) as u32;
            let taken = self.permits.forget_permits(fewer as usize) as u32;
            state.owed += fewer - taken;
        }
        (after != before).then_some(after)
    }
}

impl State {
    /// Overload: half the limit, at once, and a new round.
    fn decrease(&mut self, now: Instant) {
        self.ceiling = Some(self.limit);
        self.at_ceiling = 0;
        self.limit = (self.limit / 2).max(1);
        self.new_round(now);
    }

    /// A round's completions are in: its mean latency decides.
    fn end_round(&mut self, now: Instant) {
        let mean = self.latency_sum / self.done.max(1);
        while self
            .means
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > BASE_WINDOW)
        {
            self.means.pop_front();
        }
        let best = self.means.front().map(|(_, m)| *m);
        // A newer mean as good outlives the older ones it beats: they can never be best.
        while self.means.back().is_some_and(|(_, m)| *m >= mean) {
            self.means.pop_back();
        }
        self.means.push_back((now, mean));
        if best.is_some_and(|best| mean.as_secs_f64() > best.as_secs_f64() * LATENCY_FACTOR) {
            return self.decrease(now);
        }
        // Grown only by a round that used the limit: a host called two at a time says
        // nothing of whether it takes more (TCP's congestion window validation).
        if self.peak < self.limit {
            return self.new_round(now);
        }
        // Two steps past the last overload, the host has grown: the ceiling is old news.
        if self
            .ceiling
            .is_some_and(|ceiling| self.limit >= ceiling + 2)
        {
            self.ceiling = None;
        }
        let step = match self.ceiling {
            // Below the last overload: back up one a round. Near it: probe slowly.
            Some(ceiling) if self.limit + 1 >= ceiling => {
                self.at_ceiling += 1;
                if self.at_ceiling >= PROBE_ROUNDS {
                    self.at_ceiling = 0;
                    1
                } else {
                    0
                }
            }
            _ => 1,
        };
        self.limit = (self.limit + step).min(self.cap);
        self.new_round(now);
    }

    fn new_round(&mut self, _now: Instant) {
        self.round += 1;
        self.round_size = self.limit;
        self.done = 0;
        self.latency_sum = Duration::ZERO;
        self.peak = self.in_flight;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Plays rounds against a host that takes `k` calls at once and refuses the rest, every
    /// call of a round in flight together; returns the limits seen and the refusals.
    fn play(adaptive: &Adaptive, k: u32, rounds: usize) -> (Vec<u32>, u32) {
        let mut limits = Vec::new();
        let mut refused = 0;
        for _ in 0..rounds {
            let limit = adaptive.limit();
            limits.push(limit);
            let slots: Vec<Slot> = (0..limit)
                .map(|_| {
                    futures_util::FutureExt::now_or_never(tokio::task::unconstrained(
                        adaptive.acquire(),
                    ))
                    .unwrap_or_else(|| {
                        panic!(
                            "no room at {limit}: {:?}, {} free",
                            adaptive.state.lock().unwrap(),
                            adaptive.permits.available_permits()
                        )
                    })
                })
                .collect();
            for (i, slot) in slots.into_iter().enumerate() {
                let signal = if i as u32 >= k {
                    refused += 1;
                    Signal::Overloaded
                } else {
                    Signal::Answered(50 * MS)
                };
                adaptive.release(slot, signal);
            }
        }
        (limits, refused)
    }

    #[tokio::test]
    async fn the_limit_settles_at_a_hosts_capacity() {
        let adaptive = Adaptive::new(16, u32::MAX);
        let (limits, refused) = play(&adaptive, 8, 200);
        // Settled, the limit averages close to the capacity, and few calls are refused.
        let settled = &limits[100..];
        let mean = settled.iter().sum::<u32>() as f64 / settled.len() as f64;
        assert!(mean >= 8.0 * 0.85, "{mean}: {settled:?}");
        let calls: u32 = limits.iter().sum();
        assert!(refused * 50 < calls, "{refused} of {calls} refused");
    }

    #[tokio::test]
    async fn rising_latency_halves_the_limit() {
        let adaptive = Adaptive::new(8, u32::MAX);
        for latency in [50, 50, 50, 200] {
            let limit = adaptive.limit();
            let slots: Vec<Slot> = (0..limit)
                .map(|_| {
                    futures_util::FutureExt::now_or_never(tokio::task::unconstrained(
                        adaptive.acquire(),
                    ))
                    .unwrap()
                })
                .collect();
            for slot in slots {
                adaptive.release(slot, Signal::Answered(latency * MS));
            }
        }
        // 8, 9, 10 at the usual latency; the slow round halves 11.
        assert_eq!(adaptive.limit(), 5);
    }

    #[tokio::test]
    async fn overload_halves_once_per_round_and_never_below_one() {
        let adaptive = Adaptive::new(8, u32::MAX);
        let slots: Vec<Slot> = (0..8)
            .map(|_| {
                futures_util::FutureExt::now_or_never(tokio::task::unconstrained(
                    adaptive.acquire(),
                ))
                .unwrap()
            })
            .collect();
        for slot in slots {
            adaptive.release(slot, Signal::Overloaded);
        }
        assert_eq!(
            adaptive.limit(),
            4,
            "the calls of the same round halve it once"
        );
        for _ in 0..5 {
            let slot = adaptive.acquire().await;
            adaptive.release(slot, Signal::Overloaded);
        }
        assert_eq!(adaptive.limit(), 1);
    }

    #[tokio::test]
    async fn a_cap_bounds_it_and_waiters_get_room_in_turn() {
        let adaptive = std::sync::Arc::new(Adaptive::new(2, 2));
        let a = adaptive.acquire().await;
        let _b = adaptive.acquire().await;
        let waiter = {
            let adaptive = adaptive.clone();
            tokio::spawn(async move { adaptive.acquire().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        adaptive.release(a, Signal::Answered(MS));
        let c = waiter.await.unwrap();
        assert_eq!(adaptive.in_flight(), 2);
        adaptive.release(_b, Signal::Answered(MS));
        adaptive.release(c, Signal::Answered(MS));
        for _ in 0..100 {
            let slot = adaptive.acquire().await;
            adaptive.release(slot, Signal::Answered(MS));
        }
        assert!(adaptive.limit() <= 2);
    }
}
