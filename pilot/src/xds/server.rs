//! The tonic delta ADS service: authenticates each stream, then drives one `Session` per connection from its requests and from new snapshots.

use std::collections::{BTreeMap, VecDeque};
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
use crate::xds::session::{CHUNK, Changed, Push, Reply, Session, TypeReport};

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
    /// Signalled when a connection has sent the last response of a push that took full
    /// chunks (a first push of a large view): the memory it took is given back once such
    /// pushes stop (`mesh::memory::trim_after_bursts`).
    pub large_pushes: Arc<tokio::sync::Notify>,
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
/// `changed` lists the names that differ between `old` and `new` (see `Session::after_snapshot`).
/// A full comparison of a view without Envoy removals is planned a chunk at a time (see
/// `Session::resume`); with them, whole, as its two passes must each see the other's result.
pub fn pushes(
    session: &mut Session,
    old: &Resources,
    new: &Arc<Resources>,
    changed: &Changed,
) -> Vec<Push> {
    let Some(both) = new.keeping_removed_envoy(old) else {
        let mut updates = session.after_snapshot(new, changed, Some(new));
        updates.sort_by_key(|r| rank(&r.type_url));
        return updates;
    };
    let mut updates = session.after_snapshot(&both, &Changed::new(), None);
    updates.sort_by_key(|r| rank(&r.type_url));
    let mut removals = session.after_snapshot(new, &Changed::new(), None);
    removals.sort_by_key(|r| std::cmp::Reverse(rank(&r.type_url)));
    updates.extend(removals);
    updates
}

/// Run `f` on the session on a blocking thread: a full diff of a large view (a first
/// subscription, a snapshot without a list of changes) takes milliseconds of CPU that must
/// not hold an async worker, and with it the other connections, back.
async fn on_session<T: Send + 'static>(
    connection: &Arc<Connection>,
    f: impl FnOnce(&mut Session) -> T + Send + 'static,
) -> Result<T, String> {
    let c = connection.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&c.session)))
        .await
        .map_err(|e| format!("session task failed: {e}"))
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
    let mut node_id = String::new();
    let mut current = published.borrow_and_update().clone();
    let mut served = current.resources.clone();
    // Responses not sent yet. Requests (ACKs) are read while they go out, so that what a
    // session keeps per response awaiting its ACK is settled as the client applies them; new
    // snapshots wait until the queue is empty.
    let mut queue: VecDeque<Push> = VecDeque::new();
    // A push of full chunks is under way: the heap is trimmed once such pushes stop.
    let mut large = false;
    loop {
        let responses: Vec<Push> = tokio::select! {
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
                let view = served.clone();
                let (reply, response) =
                    match on_session(&connection, move |s| s.request(&req, &view)).await {
                        Ok(r) => r,
                        Err(e) => return e,
                    };
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
                response
            }
            changed = published.changed(), if queue.is_empty() => {
                if changed.is_err() {
                    return "control plane shutting down".into();
                }
                current = published.borrow_and_update().clone();
                let next = view(&node_id, &caller, &current, id);
                // In step with the previous snapshot: only the names it changed are looked
                // at, here and now. Otherwise a full diff, off the async threads.
                let in_step = current.changes.as_ref().filter(|c| {
                    Arc::ptr_eq(&next, &current.resources)
                        && std::ptr::eq(c.from.as_ptr(), Arc::as_ptr(&served))
                });
                let out = match in_step {
                    Some(c) => pushes(&mut lock(&connection.session), &served, &next, &c.names),
                    None => {
                        let (old, new) = (served.clone(), next.clone());
                        match on_session(&connection, move |s| {
                            pushes(s, &old, &new, &Changed::new())
                        })
                        .await
                        {
                            Ok(out) => out,
                            Err(e) => return e,
                        }
                    }
                };
                served = next;
                out
            }
            permit = tx.reserve(), if !queue.is_empty() => {
                let Ok(permit) = permit else {
                    return "proxy went away".into();
                };
                let Some(mut push) = queue.pop_front() else {
                    continue;
                };
                let rest = push.rest.take();
                debug!(
                    id,
                    type_url = %push.type_url,
                    updated = push.updated(),
                    removed = push.removed.len(),
                    nonce = %push.nonce,
                    "push"
                );
                registry.pushes.fetch_add(1, Ordering::Relaxed);
                registry.resources.fetch_add(
                    (push.updated() + push.removed.len()) as u64,
                    Ordering::Relaxed,
                );
                large |= push.updated() >= CHUNK;
                // Encoded only now: a connection holds at most the queue's few responses.
                permit.send(Ok(push.into_response()));
                if let Some(rest) = rest {
                    // The next chunk, planned only now that this one has gone out.
                    match on_session(&connection, move |s| s.resume(rest)).await {
                        Ok(more) => {
                            for p in more.into_iter().rev() {
                                queue.push_front(p);
                            }
                        }
                        Err(e) => return e,
                    }
                }
                if queue.is_empty() && std::mem::take(&mut large) {
                    registry.large_pushes.notify_one();
                }
                Vec::new()
            }
        };
        queue.extend(responses);
    }
}
