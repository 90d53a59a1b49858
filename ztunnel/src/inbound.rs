//! Inbound, inside each pod: HBONE on 15008 (the peer's identity from mTLS) and captured
//! plaintext on 15006 (no identity). Both are authorized against the pod's L4 policies before
//! anything reaches the application.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh::drain;
use mesh::hbone::server::{self, Handler, InboundStream, Options};
use mesh::hbone::{Baggage, Refusal, copy};
use mesh::identity::Identity;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::authorization::{self, Connection, Decision};
use crate::label_sets::PeerArcs;
use crate::node::Pod;
use mesh::metrics::TcpCounters;
use mesh::state::{State, Workload};

/// Accept HBONE connections for the pod; each is served with the pod's current certificate.
pub async fn serve_hbone(listener: TcpListener, pod: Arc<Pod>, drain: drain::Watch) {
    let handler = Arc::new(HboneInbound { pod: pod.clone() });
    let options = Options {
        require_local_authority: true,
    };
    // Accepted connections inherit the options: none is tuned on its own.
    if let Err(e) = mesh::socket::tune_listener(&listener) {
        info!("HBONE listener: setting TCP_NODELAY and keepalive: {e}");
    }
    while let Some((tcp, peer)) = drain::accept(&listener, &drain).await {
        // Not authenticated yet: it takes a handshake slot or is closed at once.
        let admission = match pod.node.hbone_admission.admit(peer.ip()) {
            Ok(a) => a,
            Err(refused) => {
                pod.node.metrics.hbone_refused(refused);
                debug!(%peer, reason = refused.label(), "HBONE connection refused: too many handshakes in progress");
                continue;
            }
        };
        let pod = pod.clone();
        let handler = handler.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            match pod.node.certs.get(&pod.identity).await {
                Ok(cert) => {
                    let tls = cert.server_config();
                    server::serve_admitted(tcp, tls, options, handler, drain, admission).await
                }
                Err(e) => warn!(%peer, "HBONE connection dropped: {e}"),
            }
        });
    }
}

struct HboneInbound {
    pod: Arc<Pod>,
}

impl Handler for HboneInbound {
    async fn handle(&self, mut stream: InboundStream) {
        let pod = &self.pod;
        let Some(workload) = pod.workload() else {
            stream.refuse(&Refusal::unavailable("pod is no longer in the mesh"));
            return;
        };
        let peer_id = stream.peer.clone();
        let target = stream.request.authority;
        let conn = Connection {
            src_identity: Some(peer_id.clone()),
            src_ip: stream.peer_addr.ip(),
            dst_ip: target.ip(),
            dst_port: target.port(),
        };
        let checked = match authorize(pod, &workload, &conn) {
            Ok(state) => state,
            Err(refusal) => {
                stream.refuse(&refusal);
                return;
            }
        };
        // The TCP peer of the HBONE connection: the client pod's address (outbound sockets are
        // made in the client's netns), the address the policies were checked against.
        let app = match pod.connect_app(conn.src_ip, target).await {
            Ok(s) => s,
            Err(e) => {
                stream.refuse(&server::upstream_failed(&e));
                return;
            }
        };
        let our_baggage = pod.baggage.get(&workload);
        let source_workload = {
            let state = pod.node.state.borrow();
            state.workload_by_ip(stream.peer_addr.ip()).cloned()
        };
        let client = stream.request.forwarded_for.unwrap_or(stream.peer_addr);
        // Only its workload name is logged: read when the line is written.
        let their_baggage = stream.request.baggage.take();
        let h2 = match stream.accept(Some(&our_baggage)) {
            Ok(s) => s,
            Err(e) => {
                warn!("answering HBONE: {e}");
                return;
            }
        };
        let counters = pod.node.metrics.label_sets.counters(&PeerArcs {
            reporter: "destination",
            source: source_workload.as_ref(),
            source_identity: Some(&peer_id),
            destination: Some(&workload),
            service: None,
            mtls: true,
        });
        run(
            pod,
            conn,
            checked,
            counters,
            client,
            target,
            Some(&peer_id),
            their_baggage,
            |progress| async move { copy::tcp_h2(app, h2, &progress).await },
        )
        .await;
    }
}

/// Accept captured plaintext connections: authorized without a peer identity.
pub async fn serve_plaintext(listener: TcpListener, pod: Arc<Pod>, drain: drain::Watch) {
    if let Err(e) = mesh::socket::tune_listener(&listener) {
        info!("plaintext inbound listener: setting TCP_NODELAY and keepalive: {e}");
    }
    while let Some((tcp, peer)) = drain::accept(&listener, &drain).await {
        let pod = pod.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            if let Err(e) = plaintext(&pod, tcp, peer).await {
                info!(src = %peer, "inbound plaintext connection refused: {e}");
            }
            drop(drain);
        });
    }
}

async fn plaintext(pod: &Pod, tcp: TcpStream, peer: SocketAddr) -> Result<(), String> {
    let target = pod
        .capture
        .inbound_original_dst(&tcp)
        .map_err(|e| format!("original destination: {e}"))?;
    let workload = pod.workload().ok_or("pod is no longer in the mesh")?;
    pod.node
        .refuse_own_listener(target, None, &workload.addresses)?;
    let conn = Connection {
        src_identity: None,
        src_ip: peer.ip(),
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    // Dropping the socket without a byte is how a plaintext client learns it was denied.
    let checked = authorize(pod, &workload, &conn).map_err(|r| r.reason)?;
    let _live = pod.plaintext_clients.enter(peer);
    let app = pod
        .connect_app_plaintext(peer.ip(), target)
        .await
        .map_err(|e| format!("connecting to the application at {target}: {e}"))?;
    let source_workload = pod.node.state.borrow().workload_by_ip(peer.ip()).cloned();
    let counters = pod.node.metrics.label_sets.counters(&PeerArcs {
        reporter: "destination",
        source: source_workload.as_ref(),
        source_identity: None,
        destination: Some(&workload),
        service: None,
        mtls: false,
    });
    run(
        pod,
        conn,
        checked,
        counters,
        peer,
        target,
        None,
        None,
        |progress| async move { copy::tcp_tcp(app, tcp, &progress).await },
    )
    .await;
    Ok(())
}

/// Check `conn` against the current state; allowed, the state it was checked against.
fn authorize(pod: &Pod, workload: &Workload, conn: &Connection) -> Result<Arc<State>, Refusal> {
    let state = pod.node.state.borrow().clone();
    match authorization::check(&state, workload, conn) {
        Decision::Allow => Ok(state),
        Decision::Deny { policy } => {
            info!(
                target: "access",
                direction = "inbound",
                src = %conn.src_ip,
                src_identity = conn.src_identity.as_ref().map(|i| i.to_string()),
                dst = %conn.dst_ip,
                dst_port = conn.dst_port,
                %policy,
                "connection denied"
            );
            Err(Refusal::unauthorized(format!("denied by {policy}")))
        }
    }
}

/// Count, proxy and log one accepted inbound connection; close it if policies change to deny it.
#[allow(clippy::too_many_arguments)]
async fn run<F>(
    pod: &Pod,
    conn: Connection,
    checked: Arc<State>,
    counters: TcpCounters,
    client: SocketAddr,
    target: SocketAddr,
    peer: Option<&Identity>,
    peer_baggage: Option<String>,
    proxy: impl FnOnce(copy::Progress) -> F,
) where
    F: Future<Output = std::io::Result<copy::Transferred>>,
{
    // Policy changes from now on are checked by the node's sweep. One that came after `conn`
    // was authorized may have been swept before it was registered: checked here.
    let mut registration = pod.node.connections.register(&pod.shared_uid, conn);
    let newer = {
        let latest = pod.node.state.borrow();
        (!Arc::ptr_eq(&latest, &checked)).then(|| latest.clone())
    };
    // Not held while the connection runs: it may be an old snapshot of the whole mesh.
    drop(checked);
    let denied_already = newer.and_then(|state| registration.check(&state));
    counters.opened.inc();
    // From the application's side: what the client sent (to the app) is the request direction.
    // Counted as the bytes move, so an open connection shows, and one a policy change cuts
    // keeps what it carried.
    let progress = copy::Progress {
        tcp_to_peer: counters.received.clone(),
        peer_to_tcp: counters.sent.clone(),
    };
    let denied = async {
        match denied_already {
            Some(policy) => policy,
            None => registration.denied().await,
        }
    };
    let start = Instant::now();
    let result = tokio::select! {
        biased;
        policy = denied => {
            info!(
                target: "access",
                direction = "inbound",
                src = %client,
                dst = %target,
                %policy,
                "open connection closed: a policy change denies it"
            );
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("denied by {policy} after a policy change"),
            ))
        }
        r = proxy(progress) => r,
    };
    let t = result.as_ref().copied().unwrap_or_default();
    counters.closed.inc();
    info!(
        target: "access",
        direction = "inbound",
        src = %client,
        dst = %target,
        src_identity = peer.map(|p| p.to_string()),
        src_workload = peer_baggage.as_deref().and_then(Baggage::workload_name_in),
        mtls = peer.is_some(),
        sent = t.peer_to_tcp,
        received = t.tcp_to_peer,
        duration_ms = start.elapsed().as_millis() as u64,
        error = result.as_ref().err().map(|e| e.to_string()),
        "connection complete"
    );
}
