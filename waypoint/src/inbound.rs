//! The waypoint's HBONE listener: each CONNECT names a service VIP:port; the listener for that
//! address decides how the tunnel is served (HTTP routing or a TCP proxy). Unknown addresses are
//! refused with 503, as Istio's waypoint does.

use std::sync::Arc;

use mesh::certs::CertCache;
use mesh::drain;
use mesh::hbone::Refusal;
use mesh::hbone::io::H2Io;
use mesh::hbone::server::{self, Handler, InboundStream, Options};
use mesh::identity::Identity;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::Waypoint;
use crate::config::ListenerKind;
use crate::request::{self, Tunnel};
use crate::route::Source;

/// Accept HBONE connections, each served with the waypoint's current certificate.
pub async fn serve(
    listener: TcpListener,
    waypoint: Arc<Waypoint>,
    certs: CertCache,
    identity: Identity,
    drain: drain::Watch,
) {
    let handler = Arc::new(Inbound {
        waypoint,
        drain: drain.clone(),
    });
    // A waypoint serves addresses that are not its own: the services bound to it.
    let options = Options {
        require_local_authority: false,
    };
    // Unauthenticated connections are bounded as on ztunnel's 15008 (`mesh::hbone::admission`).
    let admitter = mesh::hbone::admission::Admitter::default();
    while let Some((tcp, peer)) = drain::accept(&listener, &drain).await {
        let admission = match admitter.admit(peer.ip()) {
            Ok(a) => a,
            Err(refused) => {
                tracing::debug!(%peer, reason = refused.label(), "HBONE connection refused: too many handshakes in progress");
                continue;
            }
        };
        let _ = mesh::socket::tune(&tcp);
        let handler = handler.clone();
        let drain = drain.clone();
        let certs = certs.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            match certs.get(&identity).await {
                Ok(cert) => {
                    let tls = cert.server_config();
                    server::serve_admitted(tcp, tls, options, handler, drain, admission).await
                }
                Err(e) => warn!(%peer, "HBONE connection dropped: {e}"),
            }
        });
    }
}

pub struct Inbound {
    pub waypoint: Arc<Waypoint>,
    pub drain: drain::Watch,
}

impl Handler for Inbound {
    async fn handle(&self, stream: InboundStream) {
        let config = self.waypoint.config.borrow().clone();
        let authority = stream.request.authority;
        let Some(listener) = config.listener(authority).cloned() else {
            stream.refuse(&Refusal::unavailable(format!(
                "no service of this waypoint has address {authority}"
            )));
            return;
        };
        let client = stream.request.forwarded_for.unwrap_or(stream.peer_addr);
        let xfcc_element = match &listener.kind {
            ListenerKind::Http { xfcc, .. } if xfcc.needs_element() => {
                match mesh::tls::ClientCertDetails::parse(&stream.peer_certificate) {
                    Ok(details) => {
                        let by = self.waypoint.upstream.identity().to_string();
                        xfcc.element(&by, &details)
                    }
                    Err(e) => {
                        debug!(peer = %stream.peer, "x-forwarded-client-cert: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        let source_workload = config.state.workload_by_ip(client.ip()).cloned();
        let tunnel = Tunnel {
            listener: listener.clone(),
            authority,
            client,
            peer: stream.peer.clone(),
            source: Source {
                namespace: stream.peer.namespace.clone(),
                labels: source_workload
                    .as_ref()
                    .map(|w| w.labels.clone())
                    .unwrap_or_default(),
            },
            source_workload,
            service: config.state.service_by_vip(authority.ip()).cloned(),
            peer_principal: stream.peer.to_string(),
            xfcc_element,
        };
        match &listener.kind {
            ListenerKind::Http { .. } => {
                let io = match stream.accept(None) {
                    Ok(s) => H2Io::new(s),
                    Err(e) => {
                        debug!("answering HBONE: {e}");
                        return;
                    }
                };
                request::serve(
                    self.waypoint.clone(),
                    Arc::new(tunnel),
                    io,
                    self.drain.clone(),
                )
                .await;
            }
            ListenerKind::Tcp {
                clusters,
                rbac,
                idle_timeout,
            } => {
                let idle = *idle_timeout;
                crate::tcp::proxy(
                    &self.waypoint,
                    &config,
                    &tunnel,
                    clusters,
                    rbac,
                    idle,
                    stream,
                )
                .await;
            }
        }
    }
}
