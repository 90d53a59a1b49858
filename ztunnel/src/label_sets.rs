//! Istio's TCP label sets, interned: the labels of each (reporter, source, destination,
//! service, security) combination are built once and its counters shared by every connection
//! between the same peers. A new connection then costs one hash of a few pointers (and the
//! peer's identity), where building the label set takes 23 strings and each count hashed them.
//!
//! Peers are keyed by their `Arc`s in the current state: a changed workload or service is a new
//! `Arc`, so it gets a new entry (and new labels, when they changed). Entries of records the
//! state no longer holds are dropped by [`LabelSets::retain_current`] on each state change.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex};

use mesh::identity::Identity;
use mesh::metrics::{Peers, TcpCounters, TcpMetrics};
use mesh::state::{Service, State, Workload};

/// The peers of one connection, as the proxy found them in the state.
#[derive(Debug, Clone, Copy)]
pub struct PeerArcs<'a> {
    /// `source` or `destination`.
    pub reporter: &'static str,
    pub source: Option<&'a Arc<Workload>>,
    pub source_identity: Option<&'a Identity>,
    pub destination: Option<&'a Arc<Workload>>,
    pub service: Option<&'a Arc<Service>>,
    pub mtls: bool,
}

impl PeerArcs<'_> {
    fn peers(&self) -> Peers<'_> {
        Peers {
            reporter: self.reporter,
            source: self.source.map(|w| &**w),
            source_identity: self.source_identity,
            destination: self.destination.map(|w| &**w),
            service: self.service.map(|s| &**s),
            mtls: self.mtls,
        }
    }

    fn hash_with(&self, build: &RandomState) -> u64 {
        let mut h = build.build_hasher();
        self.reporter.hash(&mut h);
        self.source.map(Arc::as_ptr).hash(&mut h);
        self.source_identity.hash(&mut h);
        self.destination.map(Arc::as_ptr).hash(&mut h);
        self.service.map(Arc::as_ptr).hash(&mut h);
        self.mtls.hash(&mut h);
        h.finish()
    }
}

/// An interned entry's key, holding the `Arc`s it was made from (so an address is never
/// reused for another record while the entry lives).
struct Key {
    reporter: &'static str,
    source: Option<Arc<Workload>>,
    source_identity: Option<Identity>,
    destination: Option<Arc<Workload>>,
    service: Option<Arc<Service>>,
    mtls: bool,
}

fn same<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl Key {
    fn of(p: &PeerArcs<'_>) -> Key {
        Key {
            reporter: p.reporter,
            source: p.source.cloned(),
            source_identity: p.source_identity.cloned(),
            destination: p.destination.cloned(),
            service: p.service.cloned(),
            mtls: p.mtls,
        }
    }

    fn matches(&self, p: &PeerArcs<'_>) -> bool {
        self.reporter == p.reporter
            && self.mtls == p.mtls
            && same(self.source.as_ref(), p.source)
            && same(self.destination.as_ref(), p.destination)
            && same(self.service.as_ref(), p.service)
            && self.source_identity.as_ref() == p.source_identity
    }

    /// Whether every record of the key is still the state's current one.
    fn current_in(&self, state: &State) -> bool {
        let workload = |w: &Option<Arc<Workload>>| {
            w.as_ref()
                .is_none_or(|w| same(state.workload_by_uid(&w.uid), Some(w)))
        };
        workload(&self.source)
            && workload(&self.destination)
            && self
                .service
                .as_ref()
                .is_none_or(|s| same(state.service(&s.key()), Some(s)))
    }
}

/// The node's interned label sets (shared by all pods and cores).
pub struct LabelSets {
    tcp: TcpMetrics,
    hasher: RandomState,
    /// Hash of the peers → the entries with that hash (one, but for collisions).
    sets: Mutex<HashMap<u64, Vec<(Key, TcpCounters)>>>,
}

impl LabelSets {
    /// Label sets whose counters are those of `tcp`'s families.
    pub fn new(tcp: TcpMetrics) -> Self {
        LabelSets {
            tcp,
            hasher: RandomState::new(),
            sets: Mutex::default(),
        }
    }

    /// The counters of the connection between `peers`, made (with its labels) on first use.
    pub fn counters(&self, peers: &PeerArcs<'_>) -> TcpCounters {
        let hash = peers.hash_with(&self.hasher);
        let Ok(mut sets) = self.sets.lock() else {
            // Poisoned by a panic elsewhere: count without interning.
            return self.tcp.counters(&peers.peers().labels());
        };
        let bucket = sets.entry(hash).or_default();
        if let Some((_, counters)) = bucket.iter().find(|(k, _)| k.matches(peers)) {
            return counters.clone();
        }
        let counters = self.tcp.counters(&peers.peers().labels());
        bucket.push((Key::of(peers), counters.clone()));
        counters
    }

    /// Drop the entries of workloads or services `state` replaced or removed (their counters
    /// stay in the families, as Istio's do).
    pub fn retain_current(&self, state: &State) {
        if let Ok(mut sets) = self.sets.lock() {
            sets.retain(|_, bucket| {
                bucket.retain(|(k, _)| k.current_in(state));
                !bucket.is_empty()
            });
        }
    }

    /// Interned label sets (for tests and the admin dump).
    pub fn len(&self) -> usize {
        self.sets
            .lock()
            .map(|s| s.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn workload(uid: &str, ns: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: ns.into(),
            addresses: vec![format!("10.0.0.{}", uid.len()).parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn one_label_set_per_peer_pair_until_a_peer_changes() {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let sets = LabelSets::new(tcp.clone());
        let a = Arc::new(workload("a", "ns1"));
        let b = Arc::new(workload("bb", "ns2"));
        let id = Identity::new("cluster.local", "ns1", "default");
        let state = State::new(
            vec![
                Arc::unwrap_or_clone(a.clone()),
                Arc::unwrap_or_clone(b.clone()),
            ],
            vec![],
            vec![],
        )
        .unwrap();
        // Keys are the state's own records.
        let a = state.workload_by_uid("a").unwrap().clone();
        let b = state.workload_by_uid("bb").unwrap().clone();
        let peers = |src: &Arc<Workload>, dst: &Arc<Workload>, mtls| {
            sets.counters(&PeerArcs {
                reporter: "source",
                source: Some(src),
                source_identity: Some(&id),
                destination: Some(dst),
                service: None,
                mtls,
            })
        };
        peers(&a, &b, true).opened.inc();
        peers(&a, &b, true).opened.inc();
        assert_eq!(sets.len(), 1, "the same peers share one label set");
        assert_eq!(peers(&a, &b, true).opened.get(), 2);
        // Another security or direction is another label set.
        peers(&a, &b, false).opened.inc();
        peers(&b, &a, true).opened.inc();
        assert_eq!(sets.len(), 3);
        let text = mesh::metrics::encode(&registry);
        assert!(
            text.contains("destination_workload_namespace=\"ns2\"")
                && text.contains("connection_security_policy=\"mutual_tls\"} 2"),
            "{text}"
        );

        // `bb` changes (a new record): entries naming the old one are dropped, and its label
        // set is made again from the new record.
        let b2 = Workload {
            namespace: "ns3".into(),
            ..workload("bb", "ns2")
        };
        let state2 = State::new(vec![Arc::unwrap_or_clone(a.clone()), b2], vec![], vec![]).unwrap();
        sets.retain_current(&state2);
        assert_eq!(sets.len(), 0, "`a` itself is replaced by the new state too");
        let a2 = state2.workload_by_uid("a").unwrap().clone();
        let b2 = state2.workload_by_uid("bb").unwrap().clone();
        peers(&a2, &b2, true).opened.inc();
        assert_eq!(sets.len(), 1);
        sets.retain_current(&state2);
        assert_eq!(sets.len(), 1, "current records are kept");
        let text = mesh::metrics::encode(&registry);
        assert!(
            text.contains("destination_workload_namespace=\"ns3\""),
            "{text}"
        );
    }
}
