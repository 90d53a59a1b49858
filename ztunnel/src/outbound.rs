//! Outbound (15001 in each pod): recover where the application was connecting, resolve it to a
//! workload or a service endpoint, and carry it there over HBONE, or in plain TCP when the
//! destination is not in the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh::drain;
use mesh::hbone::client::{self, HboneError};
use mesh::hbone::copy;
use mesh::hbone::pool::Key;
use mesh::hbone::{ConnectRequest, HBONE_PORT};
use mesh::identity::Identity;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::label_sets::PeerArcs;
use crate::node::Pod;
use mesh::state::{Destination, Service, TunnelProtocol, Workload};

pub async fn serve(listener: TcpListener, pod: Arc<Pod>, drain: drain::Watch) {
    // Accepted connections inherit the options: none is tuned on its own.
    if let Err(e) = mesh::socket::tune_listener(&listener) {
        info!("outbound listener: setting TCP_NODELAY and keepalive: {e}");
    }
    while let Some((tcp, peer)) = drain::accept(&listener, &drain).await {
        let pod = pod.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(&pod, tcp, peer).await {
                info!(src = %peer, "outbound connection failed: {e}");
            }
            drop(drain);
        });
    }
}

/// Where a captured connection goes, decided before any byte moves.
#[derive(Debug)]
struct Route {
    /// The address to connect to (endpoint IP and target port); over HBONE, the CONNECT
    /// authority (the original destination when going through a waypoint).
    target: SocketAddr,
    /// The workload at the far end of the tunnel or connection: the waypoint pod when going
    /// through one (its identity is the one to expect).
    endpoint: Option<Arc<Workload>>,
    service: Option<Arc<Service>>,
    hbone: bool,
    /// Where the HBONE connection goes when not to `target`'s own 15008: the waypoint pod's.
    waypoint: Option<SocketAddr>,
}

fn route(dst: SocketAddr, resolved: Destination) -> Result<Route, String> {
    Ok(match resolved {
        Destination::Workload { workload, port } => Route {
            target: SocketAddr::new(dst.ip(), port),
            hbone: workload.tunnel_protocol == TunnelProtocol::Hbone,
            endpoint: Some(workload),
            service: None,
            waypoint: None,
        },
        Destination::Service {
            service,
            endpoint,
            target_port,
        } => {
            let ip = endpoint
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == dst.is_ipv4())
                .or(endpoint.addresses.first())
                .copied()
                .ok_or_else(|| format!("endpoint {} has no address", endpoint.name))?;
            Route {
                target: SocketAddr::new(ip, target_port),
                hbone: endpoint.tunnel_protocol == TunnelProtocol::Hbone,
                endpoint: Some(endpoint),
                service: Some(service),
                waypoint: None,
            }
        }
        Destination::NoHealthyEndpoint { service } => {
            return Err(format!("service {} has no healthy endpoint", service.key()));
        }
        Destination::Passthrough => Route {
            target: dst,
            endpoint: None,
            service: None,
            hbone: false,
            waypoint: None,
        },
        // The waypoint is always reached over HBONE, whatever its pod's own tunnel protocol
        // (waypoint pods are not captured), and is told the destination as the client saw it.
        Destination::Waypoint {
            waypoint,
            address,
            service,
        } => Route {
            target: dst,
            endpoint: Some(waypoint),
            service,
            hbone: true,
            waypoint: Some(address),
        },
        Destination::WaypointUnavailable { gateway, reason } => {
            return Err(format!(
                "{dst} is bound to waypoint {gateway}, which cannot take the connection: {reason}; refused (traffic never bypasses its waypoint)"
            ));
        }
    })
}

/// The established far side of a captured connection.
enum Upstream {
    Hbone(mesh::hbone::copy::H2Stream),
    Tcp(TcpStream),
}

async fn handle(pod: &Pod, tcp: TcpStream, peer: SocketAddr) -> Result<(), String> {
    let dst = pod
        .capture
        .outbound_original_dst(&tcp)
        .map_err(|e| format!("original destination: {e}"))?;
    let source = pod.node.state.borrow().workload_by_uid(&pod.uid).cloned();
    pod.node.refuse_own_listener(
        dst,
        tcp.local_addr().ok(),
        source.as_ref().map_or(&[][..], |w| &w.addresses),
    )?;
    let route = route(
        dst,
        pod.node.state.borrow().resolve_from(source.as_deref(), dst),
    )?;
    // eBPF capture rewrites the destination before the source is chosen, so the app's side of
    // the connection is loopback: the client is really the pod's own address.
    let peer = match &source {
        Some(w) if peer.ip().is_loopback() => w
            .addresses
            .iter()
            .find(|a| a.is_ipv4() == peer.is_ipv4())
            .or(w.addresses.first())
            .map(|ip| SocketAddr::new(*ip, peer.port()))
            .unwrap_or(peer),
        _ => peer,
    };
    let start = Instant::now();
    let upstream = if route.hbone {
        Upstream::Hbone(open_hbone(pod, peer, &route, source.as_ref()).await?)
    } else {
        let up = pod
            .sockets
            .connect(route.target)
            .await
            .map_err(|e| format!("connecting to {}: {e}", route.target))?;
        Upstream::Tcp(up)
    };
    let counters = pod.node.metrics.label_sets.counters(&PeerArcs {
        reporter: "source",
        source: source.as_ref(),
        source_identity: Some(&pod.identity),
        destination: route.endpoint.as_ref(),
        service: route.service.as_ref(),
        mtls: route.hbone,
    });
    counters.opened.inc();
    // Bytes are counted as they move, so a long connection shows in the metrics while it runs.
    let progress = copy::Progress {
        tcp_to_peer: counters.sent.clone(),
        peer_to_tcp: counters.received.clone(),
    };
    let result = match upstream {
        Upstream::Hbone(stream) => copy::tcp_h2(tcp, stream, &progress).await,
        Upstream::Tcp(up) => copy::tcp_tcp(tcp, up, &progress).await,
    };
    let t = result.as_ref().copied().unwrap_or_default();
    counters.closed.inc();
    info!(
        target: "access",
        direction = "outbound",
        src = %peer,
        dst = %dst,
        target = %route.target,
        hbone = route.hbone,
        waypoint = route.waypoint.map(|w| w.to_string()),
        src_identity = %pod.identity,
        sent = t.tcp_to_peer,
        received = t.peer_to_tcp,
        duration_ms = start.elapsed().as_millis() as u64,
        error = result.as_ref().err().map(|e| e.to_string()),
        "connection complete"
    );
    Ok(())
}

async fn open_hbone(
    pod: &Pod,
    peer: SocketAddr,
    route: &Route,
    source: Option<&Arc<Workload>>,
) -> Result<mesh::hbone::copy::H2Stream, String> {
    let endpoint = route.endpoint.as_ref().ok_or("no endpoint")?;
    let mut expected: Vec<Identity> = vec![endpoint.identity()];
    // The service's SANs name its endpoints, not its waypoint.
    if let Some(svc) = route.service.as_ref().filter(|_| route.waypoint.is_none()) {
        expected.extend(svc.subject_alt_names.iter().filter_map(|s| s.parse().ok()));
    }
    expected.sort();
    expected.dedup();
    let hbone_addr = route
        .waypoint
        .unwrap_or_else(|| SocketAddr::new(route.target.ip(), HBONE_PORT));
    let key = Key {
        src_identity: pod.identity.clone(),
        dst_identities: expected.clone(),
        dst: hbone_addr,
        src_ip: peer.ip(),
    };
    let req = ConnectRequest {
        authority: route.target,
        forwarded_for: Some(peer),
        host: route.service.as_ref().map(|s| s.hostname.clone()),
        baggage: source
            .map(|w| pod.baggage.get(w))
            .filter(|b| !b.is_empty())
            .map(|b| b.to_string()),
        traceparent: Some(mesh::hbone::traceparent()),
    };
    let sockets = pod.sockets.clone();
    // The certificate is needed only to dial: a connection carried by a pooled one does not
    // look it up (a lock, a hash and a timer).
    let dial = || async move {
        let cert = pod
            .node
            .certs
            .get(&pod.identity)
            .await
            .map_err(|e| HboneError::Certificate(e.to_string()))?;
        let tcp = sockets
            .connect(hbone_addr)
            .await
            .map_err(|source| HboneError::Connect {
                addr: hbone_addr,
                source,
            })?;
        debug!(%hbone_addr, "new HBONE connection");
        client::handshake(tcp, cert.client_config(expected)?, hbone_addr).await
    };
    pod.pool
        .connect(key, &req, dial)
        .await
        .map_err(|e| format!("HBONE to {}: {e}", route.target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::state::{Service, State};

    fn workload(name: &str, ip: &str, hbone: bool) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![ip.parse().unwrap()],
            tunnel_protocol: if hbone {
                TunnelProtocol::Hbone
            } else {
                TunnelProtocol::None
            },
            services: [(
                "ns/svc.ns.svc.cluster.local".to_string(),
                [(80, 8080)].into(),
            )]
            .into(),
            ..Default::default()
        }
    }

    fn state() -> State {
        let svc = Service {
            name: "svc".into(),
            namespace: "ns".into(),
            hostname: "svc.ns.svc.cluster.local".into(),
            addresses: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![mesh::state::ServicePort {
                service_port: 80,
                target_port: 8080,
                app_protocol: Default::default(),
            }],
            ..Default::default()
        };
        State::new(vec![workload("a", "10.0.0.1", true)], vec![svc], vec![]).unwrap()
    }

    #[test]
    fn mesh_workload_goes_over_hbone_to_its_own_address() {
        let s = state();
        let dst: SocketAddr = "10.0.0.1:9000".parse().unwrap();
        let r = route(dst, s.resolve(dst)).unwrap();
        assert!(r.hbone);
        assert_eq!(r.target, dst);
        assert!(r.service.is_none());
    }

    #[test]
    fn service_vip_goes_to_endpoint_target_port() {
        let s = state();
        let dst: SocketAddr = "10.96.0.1:80".parse().unwrap();
        let r = route(dst, s.resolve(dst)).unwrap();
        assert!(r.hbone);
        assert_eq!(r.target, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(r.service.unwrap().name, "svc");
    }

    #[test]
    fn unknown_address_passes_through_in_plain_tcp() {
        let s = state();
        let dst: SocketAddr = "192.0.2.7:443".parse().unwrap();
        let r = route(dst, s.resolve(dst)).unwrap();
        assert!(!r.hbone);
        assert_eq!(r.target, dst);
    }

    /// `svc` bound to waypoint `ns/wp`, whose one pod is not in the mesh (as waypoint pods are).
    fn waypoint_state(wp_pods: usize) -> State {
        let base = state();
        let svc =
            Arc::unwrap_or_clone(base.service("ns/svc.ns.svc.cluster.local").unwrap().clone());
        let svc = Service {
            waypoint: Some(mesh::state::GatewayAddress::new(
                mesh::state::GatewayDestination::Hostname {
                    namespace: "ns".into(),
                    hostname: "wp.ns.svc.cluster.local".into(),
                },
            )),
            ..svc
        };
        let wp_svc = Service {
            name: "wp".into(),
            namespace: "ns".into(),
            hostname: "wp.ns.svc.cluster.local".into(),
            addresses: vec!["10.96.0.9".parse().unwrap()],
            ..Default::default()
        };
        let mut workloads = vec![workload("a", "10.0.0.1", true)];
        for i in 0..wp_pods {
            let mut w = workload(&format!("wp-{i}"), &format!("10.0.9.{}", i + 1), false);
            w.services = [(
                "ns/wp.ns.svc.cluster.local".to_string(),
                [(15008, 15008)].into(),
            )]
            .into();
            w.service_account = "wp".into();
            workloads.push(w);
        }
        State::new(workloads, vec![svc, wp_svc], vec![]).unwrap()
    }

    #[test]
    fn service_with_waypoint_tunnels_to_the_waypoint_with_the_vip_as_authority() {
        let s = waypoint_state(1);
        let dst: SocketAddr = "10.96.0.1:80".parse().unwrap();
        let r = route(dst, s.resolve_from(None, dst)).unwrap();
        assert!(r.hbone, "a waypoint is always reached over HBONE");
        assert_eq!(r.target, dst, "authority is the VIP, not an endpoint");
        assert_eq!(r.waypoint, Some("10.0.9.1:15008".parse().unwrap()));
        let wp = r.endpoint.unwrap();
        assert_eq!(
            wp.identity().to_string(),
            "spiffe://cluster.local/ns/ns/sa/wp"
        );
        assert_eq!(r.service.unwrap().name, "svc");
    }

    #[test]
    fn service_with_waypoint_but_no_waypoint_pod_is_refused() {
        let s = waypoint_state(0);
        let dst: SocketAddr = "10.96.0.1:80".parse().unwrap();
        let err = route(dst, s.resolve_from(None, dst)).unwrap_err();
        assert!(
            err.contains("waypoint ns/wp.ns.svc.cluster.local:15008")
                && err.contains("no healthy endpoint")
                && err.contains("refused"),
            "{err}"
        );
    }

    #[test]
    fn service_without_healthy_endpoint_is_refused() {
        let svc = Service {
            name: "empty".into(),
            namespace: "ns".into(),
            hostname: "empty.ns.svc.cluster.local".into(),
            addresses: vec!["10.96.0.2".parse().unwrap()],
            ..Default::default()
        };
        let s = State::new(vec![], vec![svc], vec![]).unwrap();
        let dst: SocketAddr = "10.96.0.2:80".parse().unwrap();
        assert!(
            route(dst, s.resolve(dst))
                .unwrap_err()
                .contains("no healthy endpoint")
        );
    }
}
