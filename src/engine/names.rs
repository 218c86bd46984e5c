//! The names this node's leases carry, and which of them it still renews.
//!
//! A claim or a settle that fails may still have committed (a COMMIT whose answer was lost
//! with its connection), and then the store holds tasks leased to this node that no call of
//! this node will ever settle: a claim's tasks that were never called, a dropped settle's
//! tasks left Running. Renewed with the node's other leases, they would stay Running as long
//! as the node is busy. So after such a failure the node *forsakes* its name: its next claims
//! go out under a new one, the old name is renewed only while calls claimed under it are
//! still in flight, and whatever else it holds then runs out and is swept back, as a dead
//! node's would be. A name costs nothing in the store until a claim uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::NodeId;

pub(crate) struct Names {
    state: Mutex<State>,
}

struct State {
    /// The name of the next claims.
    current: NodeId,
    /// Calls in flight (or waiting for their outcome to be committed), by the name they
    /// were claimed under; a name leaves the map with its last call.
    calls: HashMap<NodeId, usize>,
}

impl Names {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Names {
            state: Mutex::new(State {
                current: NodeId::random(),
                calls: HashMap::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    /// The name to claim under now.
    pub(crate) fn current(&self) -> NodeId {
        self.state().current
    }

    /// Counts one call claimed under `node` until the returned guard is dropped (once its
    /// outcome is committed, or it is abandoned).
    pub(crate) fn hold(self: &Arc<Self>, node: NodeId) -> Held {
        *self.state().calls.entry(node).or_insert(0) += 1;
        Held {
            names: self.clone(),
            node,
        }
    }

    /// The names whose leases must be renewed: those with calls in flight.
    pub(crate) fn in_use(&self) -> Vec<NodeId> {
        self.state().calls.keys().copied().collect()
    }

    /// Takes a new name for the next claims, unless `node` is no longer the current one
    /// (forsaken already); see the module docs.
    pub(crate) fn forsake(&self, node: NodeId, why: &str) {
        let mut state = self.state();
        if state.current == node {
            state.current = NodeId::random();
            tracing::warn!(old = %node, new = %state.current, why, "this node claims under a new name; what the old one holds beyond its calls in flight will be taken back when its leases run out");
        }
    }
}

/// One call counted against the name it was claimed under.
pub(crate) struct Held {
    names: Arc<Names>,
    pub(crate) node: NodeId,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut state = self.names.state();
        if let Some(n) = state.calls.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                state.calls.remove(&self.node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forsaken_name_is_renewed_only_while_its_calls_run() {
        let names = Names::new();
        let first = names.current();
        let a = names.hold(first);
        let b = names.hold(first);
        assert_eq!(names.in_use(), [first]);

        names.forsake(first, "test");
        let second = names.current();
        assert_ne!(second, first);
        // Forsaking a name already forsaken changes nothing.
        names.forsake(first, "test");
        assert_eq!(names.current(), second);

        let c = names.hold(second);
        let mut in_use = names.in_use();
        in_use.sort_by_key(|n| n.0);
        let mut expected = vec![first, second];
        expected.sort_by_key(|n| n.0);
        assert_eq!(in_use, expected);
        drop(a);
        drop(b);
        assert_eq!(names.in_use(), [second]);
        drop(c);
        assert!(names.in_use().is_empty());
    }
}
