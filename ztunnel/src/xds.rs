//! ztunnel as an xDS client: converts received `Address` and `Authorization` resources into the state's types, rejects invalid ones (NACK) and publishes a new snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh::xds::{Handler, Rejected, Update};
use tokio::sync::watch;
use tracing::info;

use crate::node::Node;
use mesh::state::proto::{apply_addresses, authorization};
use mesh::state::{Authorization, Service, State, Workload};

/// The types ztunnel subscribes to.
pub fn types() -> Vec<String> {
    vec![
        ADDRESS_TYPE_URL.to_string(),
        AUTHORIZATION_TYPE_URL.to_string(),
    ]
}

/// The resources currently held, by name; unchanged ones are carried into each new snapshot.
pub struct XdsHandler {
    node: Arc<Node>,
    tx: watch::Sender<Arc<State>>,
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    policies: HashMap<String, Arc<Authorization>>,
    synced: HashSet<String>,
}

impl XdsHandler {
    pub fn new(node: Arc<Node>, tx: watch::Sender<Arc<State>>) -> Self {
        XdsHandler {
            node,
            tx,
            workloads: HashMap::new(),
            services: HashMap::new(),
            policies: HashMap::new(),
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
        let mut workloads = self.workloads.clone();
        let mut services = self.services.clone();
        let mut policies = self.policies.clone();
        let mut bad: Vec<(String, String)> = Vec::new();
        match update.type_url.as_str() {
            ADDRESS_TYPE_URL => apply_addresses(
                &mut workloads,
                &mut services,
                &update.updated,
                &update.removed,
                &mut bad,
            ),
            AUTHORIZATION_TYPE_URL => {
                for r in &update.updated {
                    match authorization(&r.name, &r.body) {
                        Ok(p) => {
                            policies.insert(r.name.clone(), Arc::new(p));
                        }
                        Err(e) => bad.push((r.name.clone(), e)),
                    }
                }
                for name in &update.removed {
                    policies.remove(name);
                }
            }
            other => {
                return Err(Rejected {
                    names: all_names(&update),
                    message: format!("unexpected type {other}"),
                });
            }
        }
        let state = State::from_shared(
            workloads.values().cloned().collect(),
            services.values().cloned().collect(),
            policies.values().cloned().collect(),
        );
        let state = match state {
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
        self.workloads = workloads;
        self.services = services;
        self.policies = policies;
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
