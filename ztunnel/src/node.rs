//! The node agent: holds the mesh state, the certificates and the HBONE pool, enrolls this node's
//! mesh pods (in-pod listeners, then capture) and unenrolls them, and drains on shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh::certs::CertCache;
use mesh::drain;
use mesh::hbone::pool::Pool;
use mesh::identity::Identity;
use mesh::socket::{PROXY_MARK, SocketFactory};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::claims::Claims;
use crate::cores::{Cores, Placement};
use crate::dns::proxy::{self as dns_proxy, DnsProxy};
use crate::handover::ListenerMigration;
use crate::metrics::Metrics;
use crate::redirect::{PodCapture, PodTarget, Redirector};
use crate::source::PodRouting;
use crate::{inbound, outbound};
use mesh::state::{State, TunnelProtocol, Workload};

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Pods enrolled in parallel by one pass (each on a blocking thread).
const ENROLL_AT_ONCE: usize = 8;

/// Everything shared by the proxies of all pods on this node.
pub struct Node {
    pub name: String,
    pub state: watch::Receiver<Arc<State>>,
    pub certs: CertCache,
    pub pool: Pool,
    /// Handshake slots of every pod's 15008, node-wide (`mesh::hbone::admission`).
    pub hbone_admission: mesh::hbone::admission::Admitter,
    pub metrics: Arc<Metrics>,
    /// The DNS proxy opened in every enrolled pod; `None` with `--dns-capture off`.
    pub dns: Option<Arc<DnsProxy>>,
    cgroup_root: PathBuf,
    redirect: Arc<dyn Redirector>,
    /// Deliver inbound connections to applications from the client's address (`--preserve-source`).
    preserve_source: bool,
    pods: Mutex<HashMap<String, Enrolled>>,
    /// Pods that should be enrolled but cannot be yet, with the reason (uid → (name, reason)).
    pending: Mutex<HashMap<String, (String, String)>>,
    /// False until the configuration source has delivered a first complete view (always true
    /// for the local file); readiness waits for it.
    synced: AtomicBool,
    /// The pods with enrollment work under way. Passes are started by config updates and by
    /// the retry timer and may overlap; two enrolling one pod would leave the loser's
    /// listeners, dropped after its capture entry was written, failing the pod closed. So a
    /// pass claims its pods here, briefly, and does the slow work with no lock held.
    /// Lock order: `pods`, then `pending`, then `claims`.
    claims: Mutex<Claims>,
    /// Signalled when the last claim is released (`drain` waits for it).
    idle: tokio::sync::Notify,
    /// The admin, metrics and readiness listeners, in ztunnel's own namespace: never a
    /// destination a pod's connection may be forwarded to.
    admin_listeners: Vec<SocketAddr>,
    /// Set by `drain`: no reconcile pass enrolls anything after it.
    draining: AtomicBool,
    /// With `--runtime per-core`: the threads the pods' proxies run on (`None`: the main runtime).
    cores: Option<Arc<Cores>>,
    /// Open inbound connections, re-authorized in one sweep per state change.
    pub connections: Arc<crate::connections::Connections>,
}

/// The proxy side of one enrolled pod, as its handlers see it.
pub struct Pod {
    pub node: Arc<Node>,
    pub uid: String,
    pub identity: Identity,
    /// Makes sockets inside the pod, marked so capture skips them.
    pub sockets: SocketFactory,
    /// The pod's capture: where captured connections were going.
    pub capture: Arc<dyn PodCapture>,
    /// The pod's routing for delivery from the client's address; `None`: off, or could not be
    /// set up (the application sees the pod's own address).
    pub routing: Option<Arc<PodRouting>>,
    /// Plaintext clients connected through 15006 now (their ports are not for deliveries).
    pub plaintext_clients: Arc<crate::source::LiveClients>,
    /// The HBONE client pool of the pod's outbound: its core's own with `--runtime per-core`,
    /// else the node's.
    pub pool: Pool,
    /// `uid`, shared by the pod's open connections in the node's registry.
    pub shared_uid: Arc<str>,
    /// The `baggage` the pod's proxies send about it.
    pub baggage: crate::baggage::Cached,
}

impl Pod {
    /// The pod's current workload record (it can change while the pod runs).
    pub fn workload(&self) -> Option<Arc<Workload>> {
        self.node.state.borrow().workload_by_uid(&self.uid).cloned()
    }

    /// Connect to the application at `target`, from `client`'s address when source
    /// preservation is set up in this pod, else from the pod's own.
    pub async fn connect_app(
        &self,
        client: IpAddr,
        target: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        crate::source::connect_app(&self.sockets, self.routing.as_deref(), client, target, None)
            .await
    }

    /// As [`Self::connect_app`] for a plaintext client connected from `client`: the delivery
    /// avoids the ports of the pod's live plaintext clients of that address.
    pub async fn connect_app_plaintext(
        &self,
        client: IpAddr,
        target: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let live = Some(&*self.plaintext_clients);
        crate::source::connect_app(&self.sockets, self.routing.as_deref(), client, target, live)
            .await
    }
}

struct Enrolled {
    name: String,
    netns: PathBuf,
    identity: Identity,
    since: SystemTime,
    capture: Arc<dyn PodCapture>,
    routing: Option<Arc<PodRouting>>,
    drain: drain::Trigger,
    /// `tcp_migrate_req` set in the pod (`None`: could not be), put back after the drain.
    migration: Option<ListenerMigration>,
    /// The core the pod's proxies run on (`--runtime per-core`); given back at unenrollment.
    core: Option<Placement>,
}

/// A row of the admin dump.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub identity: String,
    pub netns: String,
    pub enrolled_at: u64,
    /// Whether the application sees clients' addresses (source preservation set up).
    pub source_preserved: bool,
    /// The core the pod's proxies run on, with `--runtime per-core`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core: Option<usize>,
}

/// How the node proxies its pods, from ztunnel's flags.
pub struct NodeOptions {
    pub cgroup_root: PathBuf,
    pub redirect: Arc<dyn Redirector>,
    /// Deliver inbound connections from the client's address (`--preserve-source`).
    pub preserve_source: bool,
    /// The DNS proxy for every enrolled pod; `None` with `--dns-capture off`.
    pub dns: Option<Arc<DnsProxy>>,
    /// The admin, metrics and readiness listeners (never a destination for a pod).
    pub admin_listeners: Vec<SocketAddr>,
    /// With `--runtime per-core`: the threads to place pods' proxies on.
    pub cores: Option<Arc<Cores>>,
}

impl Node {
    pub fn new(
        name: String,
        state: watch::Receiver<Arc<State>>,
        certs: CertCache,
        options: NodeOptions,
    ) -> Arc<Node> {
        let NodeOptions {
            cgroup_root,
            redirect,
            preserve_source,
            dns,
            admin_listeners,
            cores,
        } = options;
        let node = Arc::new(Node {
            name,
            state,
            certs,
            pool: Pool::new(),
            hbone_admission: Default::default(),
            metrics: Arc::new(Metrics::default()),
            dns,
            cgroup_root,
            redirect,
            preserve_source,
            pods: Mutex::default(),
            pending: Mutex::default(),
            synced: AtomicBool::new(true),
            claims: Mutex::default(),
            idle: tokio::sync::Notify::new(),
            admin_listeners,
            draining: AtomicBool::new(false),
            cores,
            connections: Default::default(),
        });
        // Outside a runtime (some unit tests) there is no sweep: nothing is proxied there.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(crate::connections::sweep_on_change(
                node.state.clone(),
                node.connections.clone(),
                node.metrics.clone(),
            ));
        }
        node
    }

    /// Refuses a captured connection aimed at one of our own listeners (see `selfloop`); the
    /// refusal is counted and logged by the caller.
    pub fn refuse_own_listener(
        &self,
        dst: SocketAddr,
        listener: Option<SocketAddr>,
        pod_addresses: &[std::net::IpAddr],
    ) -> Result<(), String> {
        let accepted = crate::selfloop::Accepted {
            dst,
            listener,
            pod_addresses,
        };
        match crate::selfloop::refusal(
            accepted,
            &self.admin_listeners,
            crate::selfloop::is_local_address,
        ) {
            None => Ok(()),
            Some(why) => {
                self.metrics.self_loops_refused.inc();
                Err(format!("refused: {why}"))
            }
        }
    }

    /// The mesh pods this node should capture: its workloads that speak HBONE.
    fn wanted(&self) -> Vec<Arc<Workload>> {
        self.state
            .borrow()
            .workloads_on_node(&self.name)
            .filter(|w| w.tunnel_protocol == TunnelProtocol::Hbone)
            .cloned()
            .collect()
    }

    /// The capture in use: `ebpf`, `nftables` or `none`.
    pub fn redirect_name(&self) -> &'static str {
        self.redirect.name()
    }

    /// Bring enrollment in line with the state: enroll new pods, unenroll gone ones. Pods that
    /// cannot be enrolled yet (no process in their cgroup) are retried on the next pass. The
    /// slow work (netns, sockets, routing, capture) runs on blocking threads, a few pods at a
    /// time, with no lock held; pods another pass is working on are left to it.
    pub async fn reconcile(self: &Arc<Self>) {
        let wanted = self.wanted();
        let keep: std::collections::HashSet<String> =
            wanted.iter().map(|w| w.uid.clone()).collect();
        let (stale, fresh) = {
            let (Ok(mut pods), Ok(mut claims)) = (self.pods.lock(), self.claims.lock()) else {
                return;
            };
            // A draining ztunnel keeps its pods' capture for its successor and enrolls nothing:
            // listeners opened now would accept connections that the exit then cuts. Read under
            // the claims lock, so `drain` sees every claim made before it.
            if self.draining.load(Ordering::SeqCst) {
                return;
            }
            let Some(plan) = claims.plan(
                pods.keys().map(String::as_str),
                wanted.iter().map(|w| w.uid.as_str()),
            ) else {
                return;
            };
            let stale: Vec<(String, Enrolled)> = plan
                .stale
                .into_iter()
                .filter_map(|uid| pods.remove(&uid).map(|p| (uid, p)))
                .collect();
            let fresh: Vec<Arc<Workload>> = wanted
                .iter()
                .filter(|w| plan.fresh.contains(&w.uid))
                .cloned()
                .collect();
            (stale, fresh)
        };
        for (uid, pod) in stale {
            self.unenroll(uid, pod).await;
        }
        for batch in fresh.chunks(ENROLL_AT_ONCE) {
            let started: Vec<_> = batch
                .iter()
                .map(|w| {
                    let (node, w) = (self.clone(), w.clone());
                    let uid = w.uid.clone();
                    let task = tokio::task::spawn_blocking(move || {
                        let started = std::time::Instant::now();
                        let result = node.enroll(&w);
                        (w, result, started.elapsed())
                    });
                    (uid, task)
                })
                .collect();
            for (uid, task) in started {
                match task.await {
                    Ok((w, result, took)) => self.record(&w, result, took),
                    Err(e) => {
                        error!(%uid, "enrolling the pod failed: {e}");
                        self.release(&uid);
                    }
                }
            }
        }
        let swept = {
            let (Ok(pods), Ok(mut pending), Ok(mut claims)) =
                (self.pods.lock(), self.pending.lock(), self.claims.lock())
            else {
                return;
            };
            pending.retain(|uid, _| keep.contains(uid));
            self.metrics.enrolled_pods.set(pods.len() as i64);
            // Not before the first complete view of the mesh: an empty or partial one would
            // sweep away the capture a predecessor left for pods still here.
            (self.synced() && claims.begin_retain()).then(|| {
                (
                    pods.keys().cloned().collect::<Vec<_>>(),
                    pending.keys().cloned().collect::<Vec<_>>(),
                )
            })
        };
        if let Some((enrolled, pending)) = swept {
            let redirect = self.redirect.clone();
            let _ = tokio::task::spawn_blocking(move || redirect.retain(&enrolled, &pending)).await;
            if let Ok(mut claims) = self.claims.lock() {
                claims.end_retain();
            }
            self.idle.notify_waiters();
        }
    }

    /// Record an enrollment's outcome and release the pod's claim, in one step so no pass sees
    /// the pod neither enrolled nor claimed.
    fn record(&self, w: &Workload, result: Result<Enrolled, String>, took: Duration) {
        let (Ok(mut pods), Ok(mut pending), Ok(mut claims)) =
            (self.pods.lock(), self.pending.lock(), self.claims.lock())
        else {
            return;
        };
        match result {
            Ok(e) => {
                let took_ms = took.as_secs_f64() * 1e3;
                info!(pod = %w.name, uid = %w.uid, netns = %e.netns.display(), capture = self.redirect.name(), took_ms, "pod enrolled");
                pending.remove(&w.uid);
                pods.insert(w.uid.clone(), e);
            }
            Err(reason) => {
                // Retried every pass; say it once per new reason rather than every time.
                let changed = pending.get(&w.uid).is_none_or(|(_, r)| *r != reason);
                if changed {
                    warn!(pod = %w.name, uid = %w.uid, "cannot enroll pod yet: {reason}");
                }
                pending.insert(w.uid.clone(), (w.name.clone(), reason));
            }
        }
        if claims.release(&w.uid) {
            self.idle.notify_waiters();
        }
    }

    fn release(&self, uid: &str) {
        if self
            .claims
            .lock()
            .map(|mut c| c.release(uid))
            .unwrap_or(true)
        {
            self.idle.notify_waiters();
        }
    }

    /// Listeners first, capture last, so captured traffic always finds a listener. Blocking
    /// (netns, routing, capture): runs on a blocking thread.
    fn enroll(self: &Arc<Self>, w: &Workload) -> Result<Enrolled, String> {
        let netns = crate::inpod::find_netns(&self.cgroup_root, &w.uid)?;
        let sockets = SocketFactory::open_netns(&netns, Some(PROXY_MARK))
            .map_err(|e| format!("opening pod netns: {e}"))?;
        // Before our listeners exist: when this ztunnel drains for its successor, what is queued
        // on them moves to the successor's instead of being reset (`handover`).
        let migration = ListenerMigration::enable(&sockets)
            .inspect_err(|e| {
                warn!(pod = %w.name, uid = %w.uid, "connections queued on this ztunnel's listeners will be reset when it hands over to a new one: {e}");
            })
            .ok();
        let listen = |ip: IpAddr, port| {
            sockets
                .listen(SocketAddr::new(ip, port))
                .map_err(|e| format!("listening on {port} in the pod: {e}"))
        };
        // IPv4 always; IPv6 too when the pod has an IPv6 address.
        let mut families = vec![(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        )];
        if w.addresses.iter().any(IpAddr::is_ipv6) {
            families.push((
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ));
        }
        // The listeners are registered with the reactor of the runtime current when they are
        // made: the pod's core's, with `--runtime per-core`.
        let core = self.cores.as_ref().map(|c| c.place());
        let on_core = core.as_ref().map(|c| c.handle().clone());
        let mut outbound_l = vec![];
        let mut plaintext_l = vec![];
        let mut hbone_l = vec![];
        let mut dns_l = vec![];
        {
            let _on_core = on_core.as_ref().map(|h| h.enter());
            for (local, any) in families {
                outbound_l.push(listen(local, OUTBOUND_PORT)?);
                plaintext_l.push(listen(any, INBOUND_PLAINTEXT_PORT)?);
                hbone_l.push(listen(any, mesh::hbone::HBONE_PORT)?);
                if self.dns.is_some() {
                    // Captured DNS arrives on loopback only, as captured outbound TCP does.
                    dns_l.push(dns_proxy::listen(&sockets, local)?);
                }
            }
        }
        // Before capture, so the first captured connection is delivered from its client.
        let routing = if self.preserve_source {
            let ipv6 = w.addresses.iter().any(IpAddr::is_ipv6);
            match PodRouting::setup(&netns, &sockets, ipv6) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    warn!(pod = %w.name, uid = %w.uid, "cannot preserve client addresses, the application will see the pod's own: {e}");
                    None
                }
            }
        } else {
            None
        };
        let capture = self
            .redirect
            .enroll(&PodTarget {
                uid: &w.uid,
                netns: &netns,
                addresses: &w.addresses,
                plaintext: &plaintext_l.iter().collect::<Vec<_>>(),
            })
            .inspect_err(|_| {
                // Retried on the next pass, which sets the routing up again.
                if let Some(Err(e)) = routing.as_ref().map(|r| r.remove()) {
                    warn!(pod = %w.name, uid = %w.uid, "removing the routing for source preservation: {e}");
                }
                if let Some(Err(e)) = migration.as_ref().map(|m| m.restore(&sockets)) {
                    warn!(pod = %w.name, uid = %w.uid, "{e}");
                }
            })?;
        let identity = w.identity();
        self.certs.track(&identity);
        let pod = Arc::new(Pod {
            node: self.clone(),
            uid: w.uid.clone(),
            identity: identity.clone(),
            sockets,
            capture: capture.clone(),
            routing: routing.clone(),
            plaintext_clients: Default::default(),
            pool: core
                .as_ref()
                .map_or_else(|| self.pool.clone(), |c| c.pool().clone()),
            shared_uid: Arc::from(w.uid.as_str()),
            baggage: Default::default(),
        });
        let (trigger, watch) = drain::channel();
        // Accept loops on the pod's core: what they accept is spawned there by `tokio::spawn`.
        let on = on_core.as_ref();
        for l in outbound_l {
            spawn_on(on, outbound::serve(l, pod.clone(), watch.clone()));
        }
        for l in plaintext_l {
            spawn_on(on, inbound::serve_plaintext(l, pod.clone(), watch.clone()));
        }
        for l in hbone_l {
            spawn_on(on, inbound::serve_hbone(l, pod.clone(), watch.clone()));
        }
        if let Some(dns) = &self.dns {
            for (udp, tcp) in dns_l {
                spawn_on(
                    on,
                    dns_proxy::serve_udp(udp, pod.clone(), dns.clone(), watch.clone()),
                );
                spawn_on(
                    on,
                    dns_proxy::serve_tcp(tcp, pod.clone(), dns.clone(), watch.clone()),
                );
            }
        }
        Ok(Enrolled {
            name: w.name.clone(),
            netns,
            identity,
            since: SystemTime::now(),
            capture,
            routing,
            drain: trigger,
            migration,
            core,
        })
    }

    /// Capture first (new connections go direct), then the listeners drain.
    /// The routing for source preservation goes once the open connections are done (their
    /// replies need it), and `tcp_migrate_req` is put back, unless the pod was enrolled again
    /// meanwhile.
    async fn unenroll(self: &Arc<Self>, uid: String, pod: Enrolled) {
        let capture = pod.capture.clone();
        match tokio::task::spawn_blocking(move || capture.remove()).await {
            Ok(Ok(())) => {}
            // The pod may already be gone along with its namespace.
            Ok(Err(e)) => warn!(%uid, "removing capture rules: {e}"),
            Err(e) => warn!(%uid, "removing capture rules failed: {e}"),
        }
        self.certs.untrack(&pod.identity);
        info!(pod = %pod.name, %uid, "pod unenrolled");
        self.release(&uid);
        let drained = pod.drain.drain(Duration::from_secs(30));
        if pod.routing.is_none() && pod.migration.is_none() {
            tokio::spawn(drained);
            return;
        }
        let (routing, migration, netns) = (pod.routing, pod.migration, pod.netns);
        let node = self.clone();
        tokio::spawn(async move {
            drained.await;
            // Claimed, so the pod cannot be enrolled again during the removal (which would
            // take the new enrollment's routing away); skipped if it is enrolled again.
            let claimed = match (node.pods.lock(), node.claims.lock()) {
                (Ok(pods), Ok(mut claims)) => !pods.contains_key(&uid) && claims.claim(&uid),
                _ => false,
            };
            if !claimed {
                return;
            }
            let undo = move || -> Result<(), String> {
                let routing = routing.map_or(Ok(()), |r| {
                    r.remove()
                        .map_err(|e| format!("removing the routing for source preservation: {e}"))
                });
                let migration = migration.map_or(Ok(()), |m| {
                    SocketFactory::open_netns(&netns, None)
                        .map_err(|e| format!("opening the pod's network namespace: {e}"))
                        .and_then(|sockets| m.restore(&sockets))
                });
                match (routing, migration) {
                    (Err(a), Err(b)) => Err(format!("{a}; {b}")),
                    (r, m) => r.and(m),
                }
            };
            match tokio::task::spawn_blocking(undo).await {
                Ok(Ok(())) => {}
                // The pod may already be gone along with its namespace.
                Ok(Err(e)) => warn!(%uid, "{e}"),
                Err(e) => warn!(%uid, "undoing the pod's setup failed: {e}"),
            }
            node.release(&uid);
        });
    }

    /// Stop every pod's listeners and wait for open connections, up to `deadline`. Capture
    /// (rules, or pinned eBPF state) stays: while no ztunnel runs, captured connections are refused rather than sent
    /// around the mesh. With a successor running beside this one (an upgrade), the closed
    /// listeners' queued connections move to its listeners and new ones go there (`handover`).
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        // Enrollments under way finish first (their pods are drained with the rest); none
        // starts after.
        loop {
            let idle = self.idle.notified();
            if self.claims.lock().map(|c| c.is_idle()).unwrap_or(true) {
                break;
            }
            idle.await;
        }
        let pods: Vec<Enrolled> = match self.pods.lock() {
            Ok(mut p) => p.drain().map(|(_, e)| e).collect(),
            Err(_) => vec![],
        };
        let waits = pods.into_iter().map(|p| p.drain.drain(deadline));
        futures_all(waits).await
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Relaxed);
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Ready once the configuration source is synced, every pod the configuration places here
    /// has been tried (enrolled, or pending with a reason), and every enrolled pod has its
    /// certificate. A pod that cannot be enrolled (not started yet) does not hold the node
    /// back; it shows under `pendingPods` in the admin dump.
    pub fn ready(&self) -> bool {
        if !self.synced() {
            return false;
        }
        let wanted = self.wanted();
        let (Ok(pods), Ok(pending)) = (self.pods.lock(), self.pending.lock()) else {
            return false;
        };
        let tried = wanted
            .iter()
            .all(|w| pods.contains_key(&w.uid) || pending.contains_key(&w.uid));
        drop((pods, pending));
        tried && self.certs.all_ready()
    }

    pub fn pending_dump(&self) -> Vec<serde_json::Value> {
        let Ok(pending) = self.pending.lock() else {
            return vec![];
        };
        let mut rows: Vec<serde_json::Value> = pending
            .iter()
            .map(|(uid, (name, reason))| serde_json::json!({"uid": uid, "name": name, "reason": reason}))
            .collect();
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        rows
    }

    pub fn pod_dump(&self) -> Vec<PodInfo> {
        let Ok(pods) = self.pods.lock() else {
            return vec![];
        };
        let mut rows: Vec<PodInfo> = pods
            .iter()
            .map(|(uid, p)| PodInfo {
                uid: uid.clone(),
                name: p.name.clone(),
                identity: p.identity.to_string(),
                netns: p.netns.display().to_string(),
                enrolled_at: p
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                source_preserved: p.routing.is_some(),
                core: p.core.as_ref().map(Placement::index),
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }
}

/// Spawn on `core`'s runtime, or the current one.
fn spawn_on(
    core: Option<&tokio::runtime::Handle>,
    task: impl Future<Output = ()> + Send + 'static,
) {
    match core {
        Some(h) => drop(h.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
}

async fn futures_all(
    waits: impl Iterator<Item = impl Future<Output = bool> + Send + 'static>,
) -> bool {
    let handles: Vec<_> = waits.map(tokio::spawn).collect();
    let mut all = true;
    for h in handles {
        all &= h.await.unwrap_or(false);
    }
    all
}

/// Retry enrollment of pods that could not be enrolled yet (no process in their cgroup).
pub async fn reconcile_periodically(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        node.reconcile().await;
    }
}
