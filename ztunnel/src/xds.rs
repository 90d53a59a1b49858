//! ztunnel as an xDS client: converts received `Address` and `Authorization` resources into the state's types, rejects invalid ones (NACK) and publishes a new snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh::xds::{Handler, Rejected, Update};
use tokio::sync::watch;
use tracing::info;

use crate::node::Node;
use mesh::state::proto::{apply_addresses, authorization};
use mesh::state::{Authorization, Service, State, StateError, Workload};

/// The types ztunnel subscribes to.
pub fn types() -> Vec<String> {
    vec![
        ADDRESS_TYPE_URL.to_string(),
        AUTHORIZATION_TYPE_URL.to_string(),
    ]
}

/// The workload-API resources a proxy holds, by name, and the state they make: the one
/// conversion into `State`, for what pilot pushes over xDS and for what the standalone mode
/// translates in-process (`crate::local_config`).
#[derive(Debug, Clone, Default)]
pub struct Held {
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    policies: HashMap<String, Arc<Authorization>>,
}

impl Held {
    /// Apply one type's update. Resources that do not decode are added to `bad` (name, why)
    /// and keep their previous version; a type we do not subscribe to rejects the whole update.
    pub fn apply(
        &mut self,
        update: &Update,
        bad: &mut Vec<(String, String)>,
    ) -> Result<(), Rejected> {
        match update.type_url.as_str() {
            ADDRESS_TYPE_URL => apply_addresses(
                &mut self.workloads,
                &mut self.services,
                &update.updated,
                &update.removed,
                bad,
            ),
            AUTHORIZATION_TYPE_URL => {
                for r in &update.updated {
                    match authorization(&r.name, &r.body) {
                        Ok(p) => {
                            self.policies.insert(r.name.clone(), Arc::new(p));
                        }
                        Err(e) => bad.push((r.name.clone(), e)),
                    }
                }
                for name in &update.removed {
                    self.policies.remove(name);
                }
            }
            other => {
                return Err(Rejected {
                    names: all_names(update),
                    message: format!("unexpected type {other}"),
                });
            }
        }
        Ok(())
    }

    /// The names held of `type_url` (Address: workloads and services).
    pub fn names(&self, type_url: &str) -> Vec<String> {
        match type_url {
            ADDRESS_TYPE_URL => self
                .workloads
                .keys()
                .chain(self.services.keys())
                .cloned()
                .collect(),
            AUTHORIZATION_TYPE_URL => self.policies.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The state these resources make; an error when they conflict with each other.
    pub fn state(&self) -> Result<State, StateError> {
        State::from_shared(
            self.workloads.values().cloned().collect(),
            self.services.values().cloned().collect(),
            self.policies.values().cloned().collect(),
        )
    }
}

/// The resources currently held, by name; unchanged ones are carried into each new snapshot.
pub struct XdsHandler {
    node: Arc<Node>,
    tx: watch::Sender<Arc<State>>,
    held: Held,
    synced: HashSet<String>,
}

impl XdsHandler {
    pub fn new(node: Arc<Node>, tx: watch::Sender<Arc<State>>) -> Self {
        XdsHandler {
            node,
            tx,
            held: Held::default(),
            synced: HashSet::new(),
        }
    }
}

/// Every resource an update names, updated and removed: what a wholesale rejection leaves as it was.
fn all_names(update: &Update) -> Vec<String> {
    update
        .updated
        .iter()
        .map(|r| r.name.clone())
        .chain(update.removed.iter().cloned())
        .collect()
}

impl Handler for XdsHandler {
    fn apply(&mut self, update: Update) -> Result<(), Rejected> {
        let mut held = self.held.clone();
        let mut bad: Vec<(String, String)> = Vec::new();
        held.apply(&update, &mut bad)?;
        let state = match held.state() {
            Ok(s) => s,
            Err(e) => {
                // The resources conflict with each other: keep everything as it was, removals
                // included, and say so (the control plane then knows they are still held).
                return Err(Rejected {
                    names: all_names(&update),
                    message: format!("update rejected, previous state kept: {e}"),
                });
            }
        };
        self.held = held;
        self.tx.send_replace(Arc::new(state));
        info!(
            type_url = %update.type_url,
            updated = update.updated.len() - bad.len(),
            removed = update.removed.len(),
            rejected = bad.len(),
            "xDS update applied"
        );
        if self.synced.insert(update.type_url.clone()) && self.synced.len() == types().len() {
            info!("in sync with the control plane");
            self.node.set_synced(true);
        }
        let node = self.node.clone();
        tokio::spawn(async move { node.reconcile().await });
        if bad.is_empty() {
            return Ok(());
        }
        let message = bad
            .iter()
            .map(|(n, e)| format!("{n}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(Rejected {
            names: bad.into_iter().map(|(n, _)| n).collect(),
            message,
        })
    }
}
