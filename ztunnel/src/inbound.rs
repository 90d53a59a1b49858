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
use crate::metrics::Peers;
use crate::node::Pod;
use mesh::state::Workload;

/// Accept HBONE connections for the pod; each is served with the pod's current certificate.
pub async fn serve_hbone(listener: TcpListener, pod: Arc<Pod>, drain: drain::Watch) {
    let handler = Arc::new(HboneInbound { pod: pod.clone() });
    let options = Options {
        require_local_authority: true,
    };
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
        let _ = mesh::socket::tune(&tcp);
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
    async fn handle(&self, stream: InboundStream) {
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
        if let Err(refusal) = authorize(pod, &workload, &conn) {
            stream.refuse(&refusal);
            return;
        }
        // The TCP peer of the HBONE connection: the client pod's address (outbound sockets are
        // made in the client's netns), the address the policies were checked against.
        let app = match pod.connect_app(conn.src_ip, target).await {
            Ok(s) => s,
            Err(e) => {
                stream.refuse(&server::upstream_failed(&e));
                return;
            }
        };
        let our_baggage = crate::outbound::baggage(&workload).encode();
        let source_workload = {
            let state = pod.node.state.borrow();
            state.workload_by_ip(stream.peer_addr.ip()).cloned()
        };
        let client = stream.request.forwarded_for.unwrap_or(stream.peer_addr);
        let their_baggage = stream.request.baggage.as_deref().map(Baggage::parse);
        let h2 = match stream.accept(Some(&our_baggage)) {
            Ok(s) => s,
            Err(e) => {
                warn!("answering HBONE: {e}");
                return;
            }
        };
        let labels = Peers {
            reporter: "destination",
            source: source_workload.as_deref(),
            source_identity: Some(&peer_id),
            destination: Some(&workload),
            service: None,
            mtls: true,
        }
        .labels();
        run(
            pod,
            &conn,
            labels,
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
    let _ = mesh::socket::tune(&tcp);
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
    authorize(pod, &workload, &conn).map_err(|r| r.reason)?;
    let _live = pod.plaintext_clients.enter(peer);
    let app = pod
        .connect_app_plaintext(peer.ip(), target)
        .await
        .map_err(|e| format!("connecting to the application at {target}: {e}"))?;
    let source_workload = pod.node.state.borrow().workload_by_ip(peer.ip()).cloned();
    let labels = Peers {
        reporter: "destination",
        source: source_workload.as_deref(),
        source_identity: None,
        destination: Some(&workload),
        service: None,
        mtls: false,
    }
    .labels();
    run(
        pod,
        &conn,
        labels,
        peer,
        target,
        None,
        None,
        |progress| async move { copy::tcp_tcp(app, tcp, &progress).await },
    )
    .await;
    Ok(())
}

fn authorize(pod: &Pod, workload: &Workload, conn: &Connection) -> Result<(), Refusal> {
    let state = pod.node.state.borrow();
    match authorization::check(&state, workload, conn) {
        Decision::Allow => Ok(()),
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

/// Resolves when a new state denies `conn` (a policy added or changed while it is open):
/// returns the policy that denies it.
async fn denied_later(pod: &Pod, conn: &Connection) -> String {
    let mut state = pod.node.state.clone();
    state.borrow_and_update();
    loop {
        if state.changed().await.is_err() {
            return std::future::pending().await;
        }
        let current = state.borrow_and_update().clone();
        let Some(workload) = current.workload_by_uid(&pod.uid) else {
            continue;
        };
        if let Decision::Deny { policy } = authorization::check(&current, workload, conn) {
            return policy;
        }
    }
}

/// Count, proxy and log one accepted inbound connection; close it if policies change to deny it.
#[allow(clippy::too_many_arguments)]
async fn run<F>(
    pod: &Pod,
    conn: &Connection,
    labels: mesh::metrics::TcpLabels,
    client: SocketAddr,
    target: SocketAddr,
    peer: Option<&Identity>,
    peer_baggage: Option<Baggage>,
    proxy: impl FnOnce(copy::Progress) -> F,
) where
    F: Future<Output = std::io::Result<copy::Transferred>>,
{
    let tcp = &pod.node.metrics.tcp;
    tcp.connections_opened.get_or_create(&labels).inc();
    // From the application's side: what the client sent (to the app) is the request direction.
    // Counted as the bytes move, so an open connection shows, and one a policy change cuts
    // keeps what it carried.
    let (sent, received) = tcp.live(&labels);
    let progress = copy::Progress {
        tcp_to_peer: received,
        peer_to_tcp: sent,
    };
    let start = Instant::now();
    let result = tokio::select! {
        r = proxy(progress) => r,
        policy = denied_later(pod, conn) => {
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
    };
    let t = result.as_ref().copied().unwrap_or_default();
    tcp.connections_closed.get_or_create(&labels).inc();
    info!(
        target: "access",
        direction = "inbound",
        src = %client,
        dst = %target,
        src_identity = peer.map(|p| p.to_string()),
        src_workload = peer_baggage.map(|b| b.workload_name),
        mtls = peer.is_some(),
        sent = t.peer_to_tcp,
        received = t.tcp_to_peer,
        duration_ms = start.elapsed().as_millis() as u64,
        error = result.as_ref().err().map(|e| e.to_string()),
        "connection complete"
    );
}
