//! The tonic delta ADS service: authenticates each stream, then drives one `Session` per connection from its requests and from new snapshots.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
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

/// One connected proxy as the registry holds it: its session is shared with the task serving
/// it, so that the debug report is built from it when asked rather than after every message.
struct Connection {
    node_id: OnceLock<String>,
    caller: String,
    connected_at: u64,
    session: Mutex<Session>,
}

/// The connected proxies, for the debug endpoint.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    connections: Mutex<BTreeMap<u64, Arc<Connection>>>,
    pub nacks: AtomicU64,
    /// Responses sent.
    pub pushes: AtomicU64,
    /// Resources those responses carried, updated plus removed.
    pub resources: AtomicU64,
}

impl Registry {
    /// Every connection's state, built now: each session is locked only while its report is
    /// copied out.
    pub fn report(&self) -> Vec<ConnectionReport> {
        let connections: Vec<(u64, Arc<Connection>)> = self
            .connections
            .lock()
            .map(|c| c.iter().map(|(id, c)| (*id, c.clone())).collect())
            .unwrap_or_default();
        connections
            .into_iter()
            .map(|(id, c)| ConnectionReport {
                id,
                node_id: c.node_id.get().cloned().unwrap_or_default(),
                caller: c.caller.clone(),
                connected_at: c.connected_at,
                types: lock(&c.session).report(),
            })
            .collect()
    }
}

/// A session's lock; a panic elsewhere while it was held leaves a state still worth serving.
fn lock(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(PoisonError::into_inner)
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
        let connection = Arc::new(Connection {
            node_id: OnceLock::new(),
            caller: format!("{caller:?}"),
            connected_at,
            session: Mutex::new(Session::for_node(match &caller {
                Caller::NodeAgent { node } => Some(node.clone()),
                Caller::Workload { .. } => None,
            })),
        });
        if let Ok(mut c) = self.registry.connections.lock() {
            c.insert(id, connection.clone());
        }
        info!(id, ?peer, ?caller, "proxy connected");
        let registry = self.registry.clone();
        let published = self.published.clone();
        tokio::spawn(async move {
            let reason = serve(
                id,
                connection,
                caller,
                inbound,
                tx,
                published,
                registry.clone(),
            )
            .await;
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
    connection: Arc<Connection>,
    caller: Caller,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut published: watch::Receiver<Arc<Published>>,
    registry: Arc<Registry>,
) -> String {
    let session = &connection.session;
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
                    let _ = connection.node_id.set(node_id.clone());
                    served = view(&node_id, &caller, &current, id);
                }
                let (reply, response) = lock(session).on_request(&req, &served);
                match reply {
                    Some(Reply::Nack { type_url, error, rejected, accepted }) => {
                        registry.nacks.fetch_add(1, Ordering::Relaxed);
                        warn!(id, node = %node_id, %type_url, rejected, accepted, "proxy rejected a push (NACK): {error}");
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
                let out = pushes(&mut lock(session), &served, &next);
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
            registry.resources.fetch_add(
                (r.resources.len() + r.removed_resources.len()) as u64,
                Ordering::Relaxed,
            );
            if tx.send(Ok(r)).await.is_err() {
                return "proxy went away".into();
            }
        }
    }
}
