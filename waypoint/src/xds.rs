//! The waypoint as a delta-ADS client: receives `istio.workload.Address` and Envoy's Cluster,
//! ClusterLoadAssignment, Listener and RouteConfiguration, converts each resource (rejecting
//! invalid ones by name, which keeps their previous version), and publishes a new `Config`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use mesh::proto::ADDRESS_TYPE_URL;
use mesh::state::proto::apply_addresses;
use mesh::state::{Service, State, Workload};
use mesh::xds::{Handler, Rejected, Update};
use prost::Message;
use tokio::sync::watch;
use tracing::info;

use crate::config::{
    self, CLUSTER_TYPE_URL, Cluster, ClusterDef, Config, ENDPOINT_TYPE_URL, Endpoint,
    LISTENER_TYPE_URL, Listener, ROUTE_TYPE_URL,
};
use crate::route::{self, RouteTable};

/// The types the waypoint subscribes to, in make-before-break order.
pub fn types() -> Vec<String> {
    [
        ADDRESS_TYPE_URL,
        CLUSTER_TYPE_URL,
        ENDPOINT_TYPE_URL,
        LISTENER_TYPE_URL,
        ROUTE_TYPE_URL,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A resource as received, for the config dump.
#[derive(Debug)]
pub struct Versioned<T> {
    pub version: String,
    pub resource: T,
}

/// The Envoy resources in force, as received.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    pub listeners: BTreeMap<String, Arc<Versioned<listener_pb::Listener>>>,
    pub routes: BTreeMap<String, Arc<Versioned<route_pb::RouteConfiguration>>>,
    pub clusters: BTreeMap<String, Arc<Versioned<cluster_pb::Cluster>>>,
    pub endpoints: BTreeMap<String, Arc<Versioned<endpoint_pb::ClusterLoadAssignment>>>,
}

/// Shared with the admin server: readiness and the control plane connection.
#[derive(Debug, Default)]
pub struct Status {
    /// Every subscribed type has been applied at least once.
    pub ready: AtomicBool,
    pub connected: AtomicBool,
}

pub struct XdsHandler {
    tx: watch::Sender<Arc<Config>>,
    status: Arc<Status>,
    resources: Resources,
    listeners: BTreeMap<String, Arc<Listener>>,
    routes: BTreeMap<String, Arc<RouteTable>>,
    cluster_defs: BTreeMap<String, ClusterDef>,
    assignments: BTreeMap<String, Vec<Endpoint>>,
    clusters: BTreeMap<String, Arc<Cluster>>,
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    state: Arc<State>,
    synced: HashSet<String>,
    /// Where clusters' statistics go (a private set unless `with_metrics` names the registered one).
    cluster_metrics: crate::metrics::ClusterMetrics,
}

impl XdsHandler {
    pub fn new(tx: watch::Sender<Arc<Config>>, status: Arc<Status>) -> Self {
        XdsHandler {
            tx,
            status,
            resources: Resources::default(),
            listeners: BTreeMap::new(),
            routes: BTreeMap::new(),
            cluster_defs: BTreeMap::new(),
            assignments: BTreeMap::new(),
            clusters: BTreeMap::new(),
            workloads: HashMap::new(),
            services: HashMap::new(),
            state: Arc::default(),
            synced: HashSet::new(),
            cluster_metrics: Default::default(),
        }
    }

    /// Report clusters' circuit-breaker and outlier statistics into `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::ClusterMetrics) -> Self {
        self.cluster_metrics = metrics;
        self
    }

    fn listeners(&mut self, update: &Update, bad: &mut Vec<(String, String)>) {
        for r in &update.updated {
            let converted = config::listener(&r.body, &r.name).and_then(|(pb, l)| {
                self.address_conflict(&l)?;
                Ok((pb, l))
            });
            match converted {
                Ok((pb, l)) => {
                    self.listeners.insert(r.name.clone(), Arc::new(l));
                    self.resources
                        .listeners
                        .insert(r.name.clone(), versioned(&r.version, pb));
                }
                Err(e) => bad.push((r.name.clone(), e)),
            }
        }
        for name in &update.removed {
            self.listeners.remove(name);
            self.resources.listeners.remove(name);
        }
    }

    /// Two listeners on one address would make the CONNECT authority ambiguous: the newcomer
    /// is rejected.
    fn address_conflict(&self, l: &Listener) -> Result<(), String> {
        let mut seen: HashMap<SocketAddr, &str> = HashMap::new();
        for other in self.listeners.values().filter(|o| o.name != l.name) {
            for a in &other.addresses {
                seen.insert(config::canonical(*a), &other.name);
            }
        }
        for a in &l.addresses {
            if let Some(other) = seen.get(&config::canonical(*a)) {
                return Err(format!(
                    "address {a} is already served by listener {other:?}"
                ));
            }
        }
        Ok(())
    }

    fn routes(&mut self, update: &Update, bad: &mut Vec<(String, String)>) {
        for r in &update.updated {
            let converted = route_pb::RouteConfiguration::decode(&r.body[..])
                .map_err(|e| format!("undecodable RouteConfiguration: {e}"))
                .and_then(|rc| {
                    if rc.name != r.name {
                        return Err(format!(
                            "resource name differs from the route configuration name {:?}",
                            rc.name
                        ));
                    }
                    let table = route::compile(&rc)?;
                    Ok((rc, table))
                });
            match converted {
                Ok((pb, table)) => {
                    self.routes.insert(r.name.clone(), Arc::new(table));
                    self.resources
                        .routes
                        .insert(r.name.clone(), versioned(&r.version, pb));
                }
                Err(e) => bad.push((r.name.clone(), e)),
            }
        }
        for name in &update.removed {
            self.routes.remove(name);
            self.resources.routes.remove(name);
        }
    }

    fn clusters(&mut self, update: &Update, bad: &mut Vec<(String, String)>) -> Vec<String> {
        let mut touched = Vec::new();
        for r in &update.updated {
            match config::cluster(&r.body, &r.name) {
                Ok((pb, def)) => {
                    self.cluster_defs.insert(r.name.clone(), def);
                    self.resources
                        .clusters
                        .insert(r.name.clone(), versioned(&r.version, pb));
                    touched.push(r.name.clone());
                }
                Err(e) => bad.push((r.name.clone(), e)),
            }
        }
        for name in &update.removed {
            self.cluster_defs.remove(name);
            self.resources.clusters.remove(name);
            touched.push(name.clone());
        }
        touched
    }

    fn endpoints(&mut self, update: &Update, bad: &mut Vec<(String, String)>) -> Vec<String> {
        let mut touched = Vec::new();
        for r in &update.updated {
            match config::load_assignment(&r.body, &r.name) {
                Ok((pb, eps)) => {
                    self.assignments.insert(r.name.clone(), eps);
                    self.resources
                        .endpoints
                        .insert(r.name.clone(), versioned(&r.version, pb));
                    touched.push(r.name.clone());
                }
                Err(e) => bad.push((r.name.clone(), e)),
            }
        }
        for name in &update.removed {
            self.assignments.remove(name);
            self.resources.endpoints.remove(name);
            touched.push(name.clone());
        }
        touched
    }

    /// Rebuild the clusters whose definition or endpoints changed; the others keep their
    /// round-robin position.
    fn rebuild_clusters(&mut self, names: Vec<String>) {
        for name in names {
            match self.cluster_defs.get(&name) {
                None => {
                    self.clusters.remove(&name);
                }
                Some(def) => {
                    let endpoints = if def.eds {
                        self.assignments.get(&name).cloned().unwrap_or_default()
                    } else {
                        def.inline_endpoints.clone()
                    };
                    // Endpoints that stay keep their outlier and load state, the cluster its
                    // breaker counters (a push that keeps the endpoints changes no choice).
                    let stats = self.cluster_metrics.cluster(&name);
                    let cluster = Cluster::new(name.clone(), def.connect_timeout, endpoints)
                        .with_protocol(def.protocol)
                        .with_policy(
                            def.policy.clone(),
                            self.clusters.get(&name).map(|c| &**c),
                            stats,
                        );
                    self.clusters.insert(name, Arc::new(cluster));
                }
            }
        }
    }

    fn addresses(
        &mut self,
        update: &Update,
        bad: &mut Vec<(String, String)>,
    ) -> Result<(), Rejected> {
        let mut workloads = self.workloads.clone();
        let mut services = self.services.clone();
        apply_addresses(
            &mut workloads,
            &mut services,
            &update.updated,
            &update.removed,
            bad,
        );
        let state = State::from_shared(
            workloads.values().cloned().collect(),
            services.values().cloned().collect(),
            Vec::new(),
        )
        .map_err(|e| Rejected {
            names: update.updated.iter().map(|r| r.name.clone()).collect(),
            message: format!("update rejected, previous state kept: {e}"),
        })?;
        self.workloads = workloads;
        self.services = services;
        self.state = Arc::new(state);
        Ok(())
    }

    fn publish(&self) {
        let mut config = Config::new(
            self.listeners.clone(),
            self.routes.clone(),
            self.clusters.clone(),
            self.state.clone(),
        );
        config.resources = Arc::new(self.resources.clone());
        self.tx.send_replace(Arc::new(config));
    }
}

fn versioned<T>(version: &str, resource: T) -> Arc<Versioned<T>> {
    Arc::new(Versioned {
        version: version.to_string(),
        resource,
    })
}

impl Handler for XdsHandler {
    fn apply(&mut self, update: Update) -> Result<(), Rejected> {
        let mut bad: Vec<(String, String)> = Vec::new();
        match update.type_url.as_str() {
            ADDRESS_TYPE_URL => self.addresses(&update, &mut bad)?,
            CLUSTER_TYPE_URL => {
                let touched = self.clusters(&update, &mut bad);
                self.rebuild_clusters(touched);
            }
            ENDPOINT_TYPE_URL => {
                let touched = self.endpoints(&update, &mut bad);
                self.rebuild_clusters(touched);
            }
            LISTENER_TYPE_URL => self.listeners(&update, &mut bad),
            ROUTE_TYPE_URL => self.routes(&update, &mut bad),
            other => {
                return Err(Rejected {
                    names: update.updated.iter().map(|r| r.name.clone()).collect(),
                    message: format!("unexpected type {other}"),
                });
            }
        }
        self.publish();
        info!(
            type_url = %update.type_url,
            updated = update.updated.len() - bad.len(),
            removed = update.removed.len(),
            rejected = bad.len(),
            "xDS update applied"
        );
        if self.synced.insert(update.type_url.clone()) && self.synced.len() == types().len() {
            info!("in sync with the control plane");
            self.status.ready.store(true, Ordering::Release);
        }
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

    fn connection(&mut self, up: bool) {
        self.status.connected.store(up, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{cla_pb, eds_cluster_pb, http_listener_pb};
    use mesh::xds::Received;

    fn update(type_url: &str, items: Vec<(&str, Vec<u8>)>, removed: &[&str]) -> Update {
        Update {
            type_url: type_url.into(),
            updated: items
                .into_iter()
                .map(|(n, body)| Received {
                    name: n.into(),
                    version: "v1".into(),
                    body,
                })
                .collect(),
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn route_config(name: &str, regex: &str) -> Vec<u8> {
        use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
        route_pb::RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![route_pb::VirtualHost {
                name: "inbound|http|80".into(),
                domains: vec!["*".into()],
                routes: vec![route_pb::Route {
                    r#match: Some(route_pb::RouteMatch {
                        path_specifier: Some(route_pb::route_match::PathSpecifier::SafeRegex(
                            RegexMatcher {
                                regex: regex.into(),
                                engine_type: None,
                            },
                        )),
                        ..Default::default()
                    }),
                    action: Some(route_pb::route::Action::Route(route_pb::RouteAction {
                        cluster_specifier: Some(route_pb::route_action::ClusterSpecifier::Cluster(
                            "c".into(),
                        )),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn applies_nacks_and_keeps_previous() {
        let (tx, rx) = watch::channel(Arc::new(Config::default()));
        let status = Arc::new(Status::default());
        let mut h = XdsHandler::new(tx, status.clone());

        h.apply(update(
            CLUSTER_TYPE_URL,
            vec![("c", eds_cluster_pb("c").encode_to_vec())],
            &[],
        ))
        .unwrap();
        assert!(rx.borrow().clusters["c"].endpoints.is_empty());
        h.apply(update(
            ENDPOINT_TYPE_URL,
            vec![(
                "c",
                cla_pb("c", &[("10.0.0.1", 8080, true)]).encode_to_vec(),
            )],
            &[],
        ))
        .unwrap();
        assert_eq!(rx.borrow().clusters["c"].endpoints.len(), 1);

        h.apply(update(
            ROUTE_TYPE_URL,
            vec![("r", route_config("r", "/a.*"))],
            &[],
        ))
        .unwrap();
        let err = h
            .apply(update(
                ROUTE_TYPE_URL,
                vec![("r", route_config("r", "(bad"))],
                &[],
            ))
            .unwrap_err();
        assert_eq!(err.names, ["r"]);
        assert!(err.message.contains("bad regex"), "{}", err.message);
        assert!(
            rx.borrow().routes.contains_key("r"),
            "previous version kept"
        );

        let l1 = http_listener_pb("l1", &["10.96.0.1"], 80);
        let l2 = http_listener_pb("l2", &["10.96.0.2", "10.96.0.1"], 80);
        let err = h
            .apply(update(
                LISTENER_TYPE_URL,
                vec![("l1", l1.encode_to_vec()), ("l2", l2.encode_to_vec())],
                &[],
            ))
            .unwrap_err();
        assert_eq!(err.names, ["l2"], "{}", err.message);
        assert!(
            rx.borrow()
                .listener("10.96.0.1:80".parse().unwrap())
                .is_some()
        );
        assert!(!status.ready.load(Ordering::Acquire));

        h.apply(update(ADDRESS_TYPE_URL, vec![], &[])).unwrap();
        assert!(
            status.ready.load(Ordering::Acquire),
            "every type applied once"
        );

        h.apply(update(CLUSTER_TYPE_URL, vec![], &["c"])).unwrap();
        assert!(!rx.borrow().clusters.contains_key("c"));
        assert_eq!(rx.borrow().resources.listeners["l1"].version, "v1");
    }
}
