//! The rate half of a gate and a host's pause: a one-token bucket over `tokio::time`, and
//! the time until which a host asked to be left alone (see the module docs of `hosts`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Until when a host asked to be left alone. Shared by the host's gate and the gates of
/// every job calling it.
pub(super) struct Pause {
    pub(super) until: watch::Sender<Option<Instant>>,
}

impl Pause {
    pub(super) fn new() -> Self {
        Pause {
            until: watch::Sender::new(None),
        }
    }

    /// Pauses until `until` unless a longer pause is in force; true when this extended it.
    pub(super) fn extend(&self, until: Instant) -> bool {
        self.until.send_if_modified(|current| {
            if current.is_some_and(|c| c >= until) {
                return false;
            }
            *current = Some(until);
            true
        })
    }

    pub(super) fn until(&self) -> Option<Instant> {
        *self.until.borrow()
    }

    pub(super) fn in_force(&self, now: Instant) -> bool {
        self.until().is_some_and(|until| until > now)
    }

    /// Resolves once no pause is in force, however often the pause is extended meanwhile.
    pub(super) async fn wait(&self) {
        let mut changes = self.until.subscribe();
        loop {
            let until = *changes.borrow_and_update();
            match until {
                Some(until) if until > Instant::now() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        // The sender lives as long as this gate, which the caller holds.
                        _ = changes.changed() => {}
                    }
                }
                _ => return,
            }
        }
    }
}

/// The rate half of a gate: a bucket of one token refilled every `interval`, and the
/// host's pause.
///
/// `next` is when the next call may start. A waiter that gets there at `slot` sets it to
/// `slot + interval`, counted from the slot rather than from when its timer fired, so late
/// timers do not lower the rate; the cost is that a call after a late one may start less
/// than `interval` after it (never before its own slot).
pub(super) struct Pacer {
    /// `None`: no rate, only the pause.
    rate: Option<(Duration, tokio::sync::Mutex<Instant>)>,
    pause: Arc<Pause>,
}

impl Pacer {
    pub(super) fn new(rate: Option<f64>, pause: Arc<Pause>) -> Self {
        Pacer {
            rate: rate.map(|r| {
                // Rates are checked where they come in (`job::PER_HOST_RATES`); whatever
                // else reaches here still makes a valid interval, at most a day.
                let interval = Duration::try_from_secs_f64(1.0 / r)
                    .unwrap_or(Duration::MAX)
                    .min(Duration::from_secs(86_400));
                (interval, tokio::sync::Mutex::new(Instant::now()))
            }),
            pause,
        }
    }

    /// Waits for this call's turn: after the calls queued before it, at least `interval`
    /// after the previous call, and after any pause.
    pub(super) async fn wait(&self) {
        let Some((interval, next)) = &self.rate else {
            return self.pause.wait().await;
        };
        // The lock is the queue: tokio's Mutex is granted in the order it was asked for.
        let mut next = next.lock().await;
        let mut changes = self.pause.until.subscribe();
        // A bucket that filled up while nobody called gives its token now, not in the past.
        let mut slot = (*next).max(Instant::now());
        loop {
            if let Some(paused) = *changes.borrow_and_update() {
                slot = slot.max(paused);
            }
            if slot <= Instant::now() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(slot) => {}
                _ = changes.changed() => {}
            }
        }
        *next = slot + *interval;
    }

    /// Whether the bucket is full, so that forgetting it loses nothing.
    pub(super) fn at_rest(&self, now: Instant) -> bool {
        match &self.rate {
            None => true,
            Some((_, next)) => next.try_lock().is_ok_and(|next| *next <= now),
        }
    }
}
