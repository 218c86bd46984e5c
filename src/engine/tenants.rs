//! Calls in flight on this node per owner (the API token that submitted the job), so that no
//! owner holds more than `--owner-max-in-flight` of the node's slots: another tenant then
//! always finds one free, even while the first one's calls hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::plan::OwnerLimits;

pub(crate) struct Tenants {
    max_in_flight: Option<u64>,
    in_flight: Mutex<HashMap<Arc<str>, u64>>,
}

impl Tenants {
    pub(crate) fn new(max_in_flight: Option<u64>) -> Arc<Self> {
        Arc::new(Tenants {
            max_in_flight,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// What the next claim may give each owner.
    pub(crate) fn limits(&self) -> OwnerLimits {
        let Some(max) = self.max_in_flight else {
            return OwnerLimits::default();
        };
        let in_flight = self.in_flight.lock().expect("not poisoned");
        OwnerLimits {
            max_in_flight: Some(max),
            in_flight: in_flight
                .iter()
                .map(|(owner, n)| (owner.to_string(), *n))
                .collect(),
        }
    }

    /// Counts one call of `owner` until the guard is dropped; `None` for the anonymous
    /// owner, or when owners have no limit.
    pub(crate) fn hold(self: &Arc<Self>, owner: Option<&Arc<str>>) -> Option<TenantHeld> {
        self.max_in_flight?;
        let owner = owner?.clone();
        *self
            .in_flight
            .lock()
            .expect("not poisoned")
            .entry(owner.clone())
            .or_insert(0) += 1;
        Some(TenantHeld {
            tenants: self.clone(),
            owner,
        })
    }
}

/// One call counted against its owner.
pub(crate) struct TenantHeld {
    tenants: Arc<Tenants>,
    owner: Arc<str>,
}

impl Drop for TenantHeld {
    fn drop(&mut self) {
        let mut in_flight = self.tenants.in_flight.lock().expect("not poisoned");
        if let Some(n) = in_flight.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.owner);
            }
        }
    }
}
