//! End-to-end tests of ztunnel's side of waypoints, on the test bed with pilot: a client's
//! connection to a service bound to a waypoint (or to a pod bound to one) is tunnelled to a
//! waypoint pod's 15008 with the original destination as CONNECT authority, and refused when
//! the waypoint has no healthy pod. The waypoint pod here runs a stand-in HBONE server built from
//! `mesh::hbone::server` that records each CONNECT and relays it to the real endpoint.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh::hbone::server::{self, Handler, InboundStream, Options};
use mesh::hbone::{ConnectRequest, Refusal, client, copy};
use mesh::identity::Identity;
use mesh::socket::SocketFactory;
use mesh::tls::WorkloadCert;
use testbed::cluster::{
    Cluster, ClusterSpec, ControlPlaneMode, ECHO_PORT, ECHO_VIP, HTTP_PORT, PodDef, ServiceDef,
    TRUST_DOMAIN, waypoint_gateway_yaml,
};

const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const GONE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
const LONELY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

/// node1: client (mesh); node2: waypoint-a (waypoint `waypoint`), server-a (service `echo`,
/// bound to `waypoint`), bound (a pod bound to `waypoint` itself). Service `lonely` (in front
/// of server-a too) is bound to waypoint `gone`, whose Service has no pod.
fn spec() -> ClusterSpec {
    let mut bound = PodDef::new("bound", "bound", 1, true);
    bound
        .labels
        .insert("istio.io/use-waypoint".into(), "waypoint".into());
    let lonely = ServiceDef {
        name: "lonely".into(),
        vip: LONELY_VIP,
        vip6: None,
        ..ServiceDef::echo()
    }
    .use_waypoint("gone");
    ClusterSpec {
        control_plane: ControlPlaneMode::Pilot,
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::waypoint("waypoint-a", "waypoint", 1),
            PodDef::new("server-a", "echo", 1, true),
            bound,
        ],
        services: vec![
            ServiceDef::echo().use_waypoint("waypoint"),
            ServiceDef::waypoint("waypoint", WAYPOINT_VIP),
            ServiceDef::waypoint("gone", GONE_VIP),
            lonely,
        ],
        pilot_yaml: waypoint_gateway_yaml("waypoint", "demo", "all")
            + &waypoint_gateway_yaml("gone", "demo", "service"),
        ..Default::default()
    }
}

/// One CONNECT the stand-in waypoint received.
#[derive(Debug, Clone)]
struct Seen {
    authority: SocketAddr,
    peer: Identity,
    forwarded_for: Option<SocketAddr>,
    host: Option<String>,
    local_addr: SocketAddr,
}

/// The stand-in waypoint: records the CONNECT, then relays it as a waypoint does, over HBONE
/// with its own identity to the endpoint pod's 15008 (authority `<pod IP>:<port>`), which that
/// pod's ztunnel takes like any HBONE peer. The two tunnels are joined through a loopback TCP
/// connection inside the waypoint pod, so `copy::tcp_h2` moves the bytes on both sides.
struct StandIn {
    seen: Mutex<Vec<Seen>>,
    sockets: SocketFactory,
    cert: Arc<WorkloadCert>,
    /// CONNECT authority → (endpoint, its identity). Anything else is answered 503, as a
    /// waypoint answers an address it does not serve.
    routes: Vec<(SocketAddr, SocketAddr, Identity)>,
}

impl StandIn {
    async fn upstream(
        &self,
        endpoint: SocketAddr,
        identity: Identity,
        client: Option<SocketAddr>,
    ) -> Result<copy::H2Stream, String> {
        let hbone = SocketAddr::new(endpoint.ip(), mesh::hbone::HBONE_PORT);
        let tcp = self
            .sockets
            .connect(hbone)
            .await
            .map_err(|e| e.to_string())?;
        let tls = self
            .cert
            .client_config(vec![identity])
            .map_err(|e| e.to_string())?;
        let conn = client::handshake(tcp, tls, hbone)
            .await
            .map_err(|e| e.to_string())?;
        let mut req = ConnectRequest::new(endpoint);
        req.forwarded_for = client;
        conn.connect(&req).await.map_err(|e| e.to_string())
    }
}

impl Handler for StandIn {
    async fn handle(&self, stream: InboundStream) {
        let authority = stream.request.authority;
        let forwarded_for = stream.request.forwarded_for;
        self.seen.lock().unwrap().push(Seen {
            authority,
            peer: stream.peer.clone(),
            forwarded_for,
            host: stream.request.host.clone(),
            local_addr: stream.local_addr,
        });
        let Some((_, endpoint, identity)) = self
            .routes
            .iter()
            .find(|(a, _, _)| *a == authority)
            .cloned()
        else {
            stream.refuse(&Refusal::unavailable(format!(
                "{authority} is not served here"
            )));
            return;
        };
        let up = match self.upstream(endpoint, identity, forwarded_for).await {
            Ok(up) => up,
            Err(e) => {
                stream.refuse(&Refusal::unavailable(e));
                return;
            }
        };
        let joint = self.sockets.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let joint_addr = joint.local_addr().unwrap();
        let (a, b) = tokio::join!(self.sockets.connect(joint_addr), joint.accept());
        let (Ok(a), Ok((b, _))) = (a, b) else {
            return;
        };
        if let Ok(down) = stream.accept(None) {
            let progress = copy::Progress::default();
            let _ = tokio::join!(
                copy::tcp_h2(a, down, &progress),
                copy::tcp_h2(b, up, &progress)
            );
        }
    }
}

/// Serve HBONE on `pod`'s 15008 as `identity` (a certificate from the cluster's CA, which pilot
/// also signs with), relaying `routes` as [`StandIn`] does.
fn stand_in_waypoint(
    c: &Cluster,
    pod: &str,
    identity: &Identity,
    routes: Vec<(SocketAddr, SocketAddr, Identity)>,
) -> (Arc<StandIn>, tokio::task::JoinHandle<()>) {
    let cert = Arc::new(c.ca.issue(identity, Duration::from_secs(3600)).unwrap());
    let tls = cert.server_config();
    let sockets = c.pod_sockets(pod).unwrap();
    let listener = sockets
        .listen(SocketAddr::new(c.pod_ip(pod), mesh::hbone::HBONE_PORT))
        .unwrap();
    let handler = Arc::new(StandIn {
        seen: Mutex::default(),
        sockets,
        cert,
        routes,
    });
    let h = handler.clone();
    let task = tokio::spawn(async move {
        let (_trigger, watch) = mesh::drain::channel();
        while let Ok((tcp, _)) = listener.accept().await {
            let options = Options {
                require_local_authority: false,
            };
            tokio::spawn(server::serve(
                tcp,
                tls.clone(),
                options,
                h.clone(),
                watch.clone(),
            ));
        }
    });
    (handler, task)
}

fn waypoint_identity() -> Identity {
    Identity::new(TRUST_DOMAIN, "demo", "waypoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_to_a_bound_service_or_pod_goes_through_its_waypoint() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    let vip = SocketAddr::new(ECHO_VIP.into(), 80);
    let server_a = SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT);
    let bound = SocketAddr::new(c.pod_ip("bound"), ECHO_PORT);
    let bound_http = SocketAddr::new(c.pod_ip("bound"), HTTP_PORT);
    let routes = vec![
        (vip, server_a, c.identity("server-a")),
        (bound, bound, c.identity("bound")),
        (bound_http, bound_http, c.identity("bound")),
    ];
    let (waypoint, _task) = stand_in_waypoint(&c, "waypoint-a", &waypoint_identity(), routes);

    // A service VIP: tunnelled to the waypoint pod, authority the VIP, relayed to the endpoint.
    let answer = c
        .exchange("client", vip, b"via the waypoint")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("pod=server-a port=8080") && text.ends_with("via the waypoint"),
        "{text}"
    );
    let seen = waypoint.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.authority, vip, "authority is the VIP the client dialled");
    assert_eq!(s.peer, c.identity("client"), "the client pod's identity");
    assert_eq!(
        s.forwarded_for.map(|f| f.ip()),
        Some(c.pod_ip("client")),
        "forwarded: for= names the client pod"
    );
    assert_eq!(s.host.as_deref(), Some("echo.demo.svc.cluster.local"));
    assert_eq!(
        s.local_addr,
        SocketAddr::new(c.pod_ip("waypoint-a"), 15008),
        "HBONE went to the waypoint pod's 15008"
    );

    // A pod bound to the waypoint, dialled by its IP: authority the pod's address.
    let answer = c.exchange("client", bound, b"to the pod").await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("pod=bound port=8080"), "{text}");
    let seen = waypoint.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].authority, bound);
    assert_eq!(seen[1].host, None);

    // HTTP to the pod's HTTP echo app, through the waypoint too.
    let answer = c
        .http_get_from(
            "client",
            bound_http,
            "bound",
            "/hello?x=1",
            &[("x-test", "1")],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let body = answer.json().unwrap();
    assert_eq!(body["headers"]["x-test"][0], "1");
    assert_eq!(body["pod"], "bound");
    assert_eq!(body["path"], "/hello?x=1");
    assert_eq!(body["authority"], "bound");
    let seen = waypoint.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2].authority, bound_http);

    // A pod not bound to any waypoint is reached directly.
    let answer = c.exchange("client", server_a, b"direct").await.unwrap();
    assert!(String::from_utf8_lossy(&answer).ends_with("direct"));
    assert_eq!(waypoint.seen.lock().unwrap().len(), 3);

    // The client's ztunnel counts the waypoint as the destination, for the dialled service.
    let to_waypoint = c
        .metric(
            0,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("destination_principal", &waypoint_identity().to_string()),
                ("destination_service", "echo.demo.svc.cluster.local"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(to_waypoint, 1.0);
    // The destination pods' ztunnel took the waypoint's tunnels like any HBONE peer's.
    let from_waypoint = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &waypoint_identity().to_string()),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(from_waypoint, 3.0);
    let log = std::fs::read_to_string(c.ztunnel_log(0)).unwrap();
    let waypoint_addr = format!("waypoint=\"{}:15008\"", c.pod_ip("waypoint-a"));
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("dst={vip}")) && l.contains(&waypoint_addr)),
        "access log names the waypoint:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_waypoint_to_take_the_connection_refuses_it() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    let stats = c.app_stats("server-a");

    // `lonely` is bound to waypoint `gone`, which has no pod: refused, never sent direct.
    let lonely = SocketAddr::new(LONELY_VIP.into(), 80);
    let answer = c
        .exchange("client", lonely, b"must not arrive")
        .await
        .unwrap_or_default();
    assert!(answer.is_empty(), "{answer:?}");
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 0);
    let log = std::fs::read_to_string(c.ztunnel_log(0)).unwrap();
    assert!(
        log.contains("bound to waypoint demo/gone.demo.svc.cluster.local:15008")
            && log.contains("no healthy endpoint")
            && log.contains("never bypasses"),
        "ztunnel says why:\n{log}"
    );

    // A waypoint pod presenting another identity than its workload's is not trusted.
    let impostor = Identity::new(TRUST_DOMAIN, "demo", "impostor");
    let vip = SocketAddr::new(ECHO_VIP.into(), 80);
    let server_a = SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT);
    let routes = vec![(vip, server_a, c.identity("server-a"))];
    let (waypoint, _task) = stand_in_waypoint(&c, "waypoint-a", &impostor, routes);
    let answer = c
        .exchange("client", vip, b"must not arrive either")
        .await
        .unwrap_or_default();
    assert!(answer.is_empty(), "{answer:?}");
    assert!(waypoint.seen.lock().unwrap().is_empty());
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 0);
}
