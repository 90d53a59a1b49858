//! The tonic delta ADS service: authenticates each stream, then drives one `Session` per connection from its requests and from new snapshots.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Authenticator, Caller};
use crate::routing::GATEWAY_NAME;
use crate::server::Published;
use crate::translate::Resources;
use crate::waypoint::ENVOY_TYPE_URLS;
use crate::xds::session::{Reply, Session, TypeReport};

/// Responses queued per connection. Small on purpose: a slow proxy holds its own task back,
/// and the snapshots it misses meanwhile collapse into one diff against the latest.
const QUEUE: usize = 2;

/// What the debug endpoint shows of one connected proxy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionReport {
    pub id: u64,
    pub node_id: String,
    pub caller: String,
    pub connected_at: u64,
    pub types: Vec<TypeReport>,
}

/// The connected proxies, for the debug endpoint.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    connections: Mutex<BTreeMap<u64, ConnectionReport>>,
    pub nacks: AtomicU64,
    pub pushes: AtomicU64,
}

impl Registry {
    pub fn report(&self) -> Vec<ConnectionReport> {
        self.connections
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ConnectionReport)) {
        if let Ok(mut c) = self.connections.lock()
            && let Some(r) = c.get_mut(&id)
        {
            f(r);
        }
    }
}

pub struct AdsService {
    pub auth: Authenticator,
    pub published: watch::Receiver<Arc<Published>>,
    pub registry: Arc<Registry>,
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(
            "only delta xDS (DeltaAggregatedResources) is served",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let connected_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Ok(mut c) = self.registry.connections.lock() {
            c.insert(
                id,
                ConnectionReport {
                    id,
                    node_id: String::new(),
                    caller: format!("{caller:?}"),
                    connected_at,
                    types: vec![],
                },
            );
        }
        info!(id, ?peer, ?caller, "proxy connected");
        let registry = self.registry.clone();
        let published = self.published.clone();
        tokio::spawn(async move {
            let reason = serve(id, caller, inbound, tx, published, registry.clone()).await;
            info!(id, "proxy disconnected: {reason}");
            if let Ok(mut c) = registry.connections.lock() {
                c.remove(&id);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The waypoint a node id names: Istio's `router~<ip>~<pod>.<namespace>~<domain>` for a pod
/// labelled with its Gateway's name. Returns `<namespace>/<gateway>`, or why not.
pub fn waypoint_of_node(
    node_id: &str,
    caller: &Caller,
    published: &Published,
) -> Result<Option<String>, String> {
    let parts: Vec<&str> = node_id.split('~').collect();
    let [kind, _ip, pod, _domain] = parts.as_slice() else {
        return Ok(None);
    };
    if *kind != "router" {
        return Ok(None);
    }
    let Some((name, ns)) = pod.rsplit_once('.') else {
        return Err(format!("{pod:?} is not <pod>.<namespace>"));
    };
    let Some(pod) = published
        .snapshot
        .pods
        .get(&(ns.to_string(), name.to_string()))
    else {
        return Err(format!("no pod {ns}/{name}"));
    };
    let Some(gateway) = pod.meta.labels.get(GATEWAY_NAME) else {
        return Err(format!("pod {ns}/{name} has no {GATEWAY_NAME} label"));
    };
    let allowed = match caller {
        Caller::Workload { identity } => {
            identity.namespace == pod.meta.namespace
                && identity.service_account == pod.service_account
        }
        Caller::NodeAgent { node } => node == &pod.node_name,
    };
    if !allowed {
        return Err(format!(
            "caller {caller:?} is not pod {ns}/{name} (service account {})",
            pod.service_account
        ));
    }
    let key = format!("{ns}/{gateway}");
    if !published.waypoints.contains_key(&key) {
        return Err(format!("no waypoint Gateway {key}"));
    }
    Ok(Some(key))
}

/// What this connection is served: its waypoint's view, or what every proxy gets.
fn view(node_id: &str, caller: &Caller, published: &Published, id: u64) -> Arc<Resources> {
    match waypoint_of_node(node_id, caller, published) {
        Ok(Some(key)) => published.waypoints[&key].clone(),
        Ok(None) => published.resources.clone(),
        Err(why) => {
            warn!(id, node = %node_id, "no Envoy resources for this node: {why}");
            published.resources.clone()
        }
    }
}

/// Rank of a type in make-before-break order; the workload API's types after the Envoy ones.
fn rank(type_url: &str) -> usize {
    ENVOY_TYPE_URLS
        .iter()
        .position(|t| *t == type_url)
        .unwrap_or(ENVOY_TYPE_URLS.len())
}

/// The pushes after a change from `old` to `new`, make before break: every update first
/// (clusters, endpoints, listeners, routes), then the removals in the reverse order.
pub fn pushes(
    session: &mut Session,
    old: &Resources,
    new: &Resources,
) -> Vec<DeltaDiscoveryResponse> {
    let Some(both) = new.keeping_removed_envoy(old) else {
        let mut updates = session.on_resources(new);
        updates.sort_by_key(|r| rank(&r.type_url));
        return updates;
    };
    let mut updates = session.on_resources(&both);
    updates.sort_by_key(|r| rank(&r.type_url));
    let mut removals = session.on_resources(new);
    removals.sort_by_key(|r| std::cmp::Reverse(rank(&r.type_url)));
    updates.extend(removals);
    updates
}

/// One connection until it ends; returns why it ended.
async fn serve(
    id: u64,
    caller: Caller,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut published: watch::Receiver<Arc<Published>>,
    registry: Arc<Registry>,
) -> String {
    let mut session = Session::new();
    let mut node_id = String::new();
    let mut current = published.borrow_and_update().clone();
    let mut served = current.resources.clone();
    loop {
        let responses = tokio::select! {
            msg = inbound.message() => {
                let req = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return "stream closed".into(),
                    Err(e) => return format!("stream error: {e}"),
                };
                if node_id.is_empty()
                    && let Some(node) = &req.node
                {
                    node_id = node.id.clone();
                    let n = node_id.clone();
                    registry.update(id, |r| r.node_id = n);
                    served = view(&node_id, &caller, &current, id);
                }
                let (reply, response) = session.on_request(&req, &served);
                match reply {
                    Some(Reply::Nack { type_url, error }) => {
                        registry.nacks.fetch_add(1, Ordering::Relaxed);
                        warn!(id, node = %node_id, %type_url, "proxy rejected a push (NACK): {error}");
                    }
                    Some(Reply::Ack { type_url, resources }) => {
                        debug!(id, %type_url, resources, "ACK");
                    }
                    Some(Reply::Stale) => debug!(id, "reply to an unknown nonce"),
                    None => {}
                }
                response.into_iter().collect::<Vec<_>>()
            }
            changed = published.changed() => {
                if changed.is_err() {
                    return "control plane shutting down".into();
                }
                current = published.borrow_and_update().clone();
                let next = view(&node_id, &caller, &current, id);
                let out = pushes(&mut session, &served, &next);
                served = next;
                out
            }
        };
        for r in responses {
            debug!(
                id,
                type_url = %r.type_url,
                updated = r.resources.len(),
                removed = r.removed_resources.len(),
                nonce = %r.nonce,
                "push"
            );
            registry.pushes.fetch_add(1, Ordering::Relaxed);
            if tx.send(Ok(r)).await.is_err() {
                return "proxy went away".into();
            }
        }
        let types = session.report();
        registry.update(id, |r| r.types = types);
    }
}
