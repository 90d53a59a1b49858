//! The node's open inbound connections, re-authorized together when the state changes: one
//! sweep per policy change closes those the new policies deny, instead of a watcher per
//! connection woken (and evaluating) on every change.
//!
//! A connection registers with its pod's uid and what authorization saw of it, and holds a
//! [`Registration`] that removes it again when dropped. The registry is sharded so connections
//! opening and closing on different cores rarely share a lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mesh::state::State;
use tokio::sync::oneshot;

use crate::authorization::{self, Connection, Decision};

const SHARDS: usize = 8;

struct Open {
    pod_uid: Arc<str>,
    conn: Connection,
    /// Taken when a sweep denies the connection (later sweeps skip it).
    close: Option<oneshot::Sender<String>>,
}

/// One shard: a slab of slots, each used by one registration until it is dropped.
#[derive(Default)]
struct Shard {
    slots: Vec<Option<Open>>,
    free: Vec<usize>,
}

impl Shard {
    fn insert(&mut self, open: Open) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(open);
                i
            }
            None => {
                self.slots.push(Some(open));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if let Some(slot) = self.slots.get_mut(i)
            && slot.take().is_some()
        {
            self.free.push(i);
        }
    }
}

/// The registry of open connections (one per node).
pub struct Connections {
    next: AtomicUsize,
    shards: [Mutex<Shard>; SHARDS],
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            next: AtomicUsize::new(0),
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

/// An open connection's place in the registry; dropping it unregisters the connection.
pub struct Registration<'a> {
    registry: &'a Connections,
    shard: usize,
    slot: usize,
    denied: oneshot::Receiver<String>,
}

impl Registration<'_> {
    /// Resolves when a sweep finds that the state now denies the connection: the denying
    /// policy. Never resolves otherwise.
    pub async fn denied(&mut self) -> String {
        match (&mut self.denied).await {
            Ok(policy) => policy,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Registration<'_> {
    /// The denying policy if `state` denies the connection now (for a state that may have been
    /// swept before the connection registered).
    pub fn check(&self, state: &State) -> Option<String> {
        let shard = self.registry.shards[self.shard].lock().ok()?;
        let open = shard.slots.get(self.slot)?.as_ref()?;
        let workload = state.workload_by_uid(&open.pod_uid)?;
        match authorization::check(state, workload, &open.conn) {
            Decision::Deny { policy } => Some(policy),
            Decision::Allow => None,
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut shard) = self.registry.shards[self.shard].lock() {
            shard.remove(self.slot);
        }
    }
}

impl Connections {
    /// Register `conn`, open to a workload of pod `pod_uid`, for the sweeps.
    pub fn register(&self, pod_uid: &Arc<str>, conn: Connection) -> Registration<'_> {
        let (close, denied) = oneshot::channel();
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let open = Open {
            pod_uid: pod_uid.clone(),
            conn,
            close: Some(close),
        };
        let slot = match self.shards[shard].lock() {
            Ok(mut s) => s.insert(open),
            // A panic elsewhere poisoned the shard: the connection is not re-checked
            // (usize::MAX is a slot `remove` ignores).
            Err(_) => usize::MAX,
        };
        Registration {
            registry: self,
            shard,
            slot,
            denied,
        }
    }

    /// Re-authorize every open connection against `state`; those it denies are told (their
    /// [`Registration::denied`] resolves). Connections of pods no longer in the state are left
    /// alone, as their pod's unenrollment drains them. Returns how many were denied.
    pub fn sweep(&self, state: &State) -> usize {
        let mut denied = 0;
        for shard in &self.shards {
            let Ok(mut shard) = shard.lock() else {
                continue;
            };
            for open in shard.slots.iter_mut().flatten() {
                if open.close.is_none() {
                    continue;
                }
                let Some(workload) = state.workload_by_uid(&open.pod_uid) else {
                    continue;
                };
                if let Decision::Deny { policy } = authorization::check(state, workload, &open.conn)
                    && let Some(close) = open.close.take()
                {
                    // The connection may have just ended: nothing to tell then.
                    let _ = close.send(policy);
                    denied += 1;
                }
            }
        }
        denied
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok())
            .map(|s| s.slots.len() - s.free.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sweep `connections` on every new state from `state` (and drop the label sets it replaced),
/// until the state's sender is gone.
pub async fn sweep_on_change(
    mut state: tokio::sync::watch::Receiver<Arc<State>>,
    connections: Arc<Connections>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    state.borrow_and_update();
    while state.changed().await.is_ok() {
        let current = state.borrow_and_update().clone();
        let denied = connections.sweep(&current);
        if denied > 0 {
            tracing::debug!(denied, "open connections denied by the new state");
        }
        metrics.label_sets.retain_current(&current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::identity::Identity;
    use mesh::state::{Action, Authorization, Clause, Match, Rule, Scope, Workload};

    fn workload() -> Workload {
        Workload {
            uid: "pod-1".into(),
            name: "web".into(),
            namespace: "shop".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
            ..Default::default()
        }
    }

    fn conn(port: u16, ns: &str) -> Connection {
        Connection {
            src_identity: Some(Identity::new("cluster.local", ns, "default")),
            src_ip: "10.0.0.1".parse().unwrap(),
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: port,
        }
    }

    fn deny_port(port: u16) -> Authorization {
        Authorization {
            name: "deny-port".into(),
            namespace: "shop".into(),
            scope: Scope::Namespace,
            action: Action::Deny,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        destination_ports: vec![port],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        }
    }

    #[tokio::test]
    async fn a_sweep_denies_only_what_the_new_state_denies() {
        let uid: Arc<str> = Arc::from("pod-1");
        let registry = Connections::default();
        let mut to_9000 = registry.register(&uid, conn(9000, "a"));
        let mut to_8080 = registry.register(&uid, conn(8080, "a"));
        let other_pod = registry.register(&Arc::from("pod-2"), conn(9000, "a"));
        assert_eq!(registry.len(), 3);

        let allow_all = State::new(vec![workload()], vec![], vec![]).unwrap();
        assert_eq!(registry.sweep(&allow_all), 0);

        let deny = State::new(vec![workload()], vec![], vec![deny_port(9000)]).unwrap();
        assert_eq!(to_8080.check(&deny), None);
        assert_eq!(
            to_9000.check(&deny).as_deref(),
            Some("shop/deny-port"),
            "a registration can be checked on its own"
        );
        assert_eq!(registry.sweep(&deny), 1, "pod-2 is not in the state");
        assert_eq!(to_9000.denied().await, "shop/deny-port");
        // Told once: a later sweep does not count it again.
        assert_eq!(registry.sweep(&deny), 0);
        let still_open =
            tokio::time::timeout(std::time::Duration::from_millis(20), to_8080.denied()).await;
        assert!(still_open.is_err(), "8080 is not denied");

        drop(to_9000);
        drop(other_pod);
        assert_eq!(registry.len(), 1);
        // Freed slots are reused.
        let again = registry.register(&uid, conn(9000, "a"));
        assert_eq!(registry.len(), 2);
        drop(again);
        drop(to_8080);
        assert!(registry.is_empty());
    }
}
