//! End-to-end tests of ztunnel's side of waypoints, on the test bed with pilot: a client's
//! connection to a service bound to a waypoint (or to a pod bound to one) is tunnelled to a
//! waypoint pod's 15008 with the original destination as CONNECT authority, and refused when
//! the waypoint has no healthy pod. The first tests' waypoint pod runs a stand-in HBONE server
//! built from `mesh::hbone::server` that records each CONNECT and relays it to the real
//! endpoint; the later ones run the real `waypoint` binary with pilot's routes (HTTP/1.1,
//! HTTP/2, gRPC, upgrades, TCP, route changes, invalid edits, config dump, metrics).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use testbed::waypoint_bed::*;

use mesh::hbone::server::{self, Handler, InboundStream, Options};
use mesh::hbone::{ConnectRequest, Refusal, client, copy};
use mesh::identity::Identity;
use mesh::socket::SocketFactory;
use mesh::tls::WorkloadCert;
use testbed::cluster::{
    Cluster, ClusterSpec, ControlPlaneMode, ECHO_PORT, ECHO_VIP, HTTP_PORT, PodDef, ServiceDef,
    TRUST_DOMAIN, exchange_on, waypoint_gateway_yaml,
};

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

/// A log file's text once `says` holds for it (log lines are written as connections end, a
/// moment after the client saw the end), or after 5 s, whatever it holds then.
async fn log_once(path: std::path::PathBuf, says: impl Fn(&str) -> bool) -> String {
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(&path).unwrap_or_default();
        if says(&log) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    log
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
    let waypoint_addr = format!("waypoint=\"{}:15008\"", c.pod_ip("waypoint-a"));
    let names_it = |log: &str| {
        log.lines()
            .any(|l| l.contains(&format!("dst={vip}")) && l.contains(&waypoint_addr))
    };
    let log = log_once(c.ztunnel_log(0), names_it).await;
    assert!(names_it(&log), "access log names the waypoint:\n{log}");
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
    // The refusal is logged as the connection ends: the line may reach the file a moment
    // after the client saw the close.
    let says_why = |log: &str| {
        log.contains("bound to waypoint demo/gone.demo.svc.cluster.local:15008")
            && log.contains("no healthy endpoint")
            && log.contains("never bypasses")
    };
    let log = log_once(c.ztunnel_log(0), says_why).await;
    assert!(says_why(&log), "ztunnel says why:\n{log}");

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

// ---------------------------------------------------------------------------------------------
// The real waypoint: pilot's routes, the `waypoint` binary in its pod, client pod → ztunnel →
// waypoint → ztunnel → pod.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_grpc_upgrade_and_tcp_through_the_real_waypoint() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(real_spec()).await.unwrap();
    c.write_pilot_file("vs-web.yaml", WEB_VS).unwrap();
    until_status(&c, "/unavailable", 503).await;

    // 1. HTTP/1.1: the default rule → v1, with the path, authority and headers as sent.
    let (a, j) = get_web(&c, "client", "/hello?x=1", &[("x-test", "1")]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(j["pod"], "web-v1", "{j}");
    assert_eq!(j["path"], "/hello?x=1");
    assert_eq!(j["authority"], "web");
    assert_eq!(j["headers"]["x-test"][0], "1");
    assert_eq!(j["version"], "HTTP/1.1");
    // A client's own `x-forwarded-client-cert` never reaches the app (Envoy's default,
    // SANITIZE): the app can trust the header when a waypoint sets it.
    let (_, j) = get_web(
        &c,
        "client",
        "/",
        &[(XFCC, "By=spiffe://x;URI=spiffe://evil")],
    )
    .await;
    assert_eq!(j["headers"][XFCC], serde_json::Value::Null, "{j}");
    for _ in 0..4 {
        let (_, j) = get_web(&c, "client", "/", &[]).await;
        assert_eq!(j["pod"], "web-v1", "all to v1: {j}");
    }
    // A header match → v2.
    let (a, j) = get_web(&c, "client", "/", &[("end-user", "jason")]).await;
    assert_eq!((a.status, j["pod"].as_str()), (200, Some("web-v2")), "{j}");
    // Prefix match with URI and authority rewrite.
    let (a, j) = get_web(&c, "client", "/old/page?q=2", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(j["pod"], "web-v2", "{j}");
    assert_eq!(j["path"], "/new/page?q=2");
    assert_eq!(j["authority"], "rewritten.example");
    // directResponse.
    let (a, _) = get_web(&c, "client", "/unavailable/now", &[]).await;
    assert_eq!(a.status, 503);
    assert_eq!(String::from_utf8_lossy(&a.body), "down for maintenance");
    // A VirtualService whose only rule does not match: 404, the app never sees it.
    let none = SocketAddr::new(WEB_NONE_VIP.into(), 80);
    let a = c
        .http_get_from("client", none, "web-none", "/", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 404, "{a:?}");
    let a = c
        .http_get_from("client", none, "web-none", "/only-this", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");

    // 6. sourceLabels at run time: the blue client goes to v2, the other stays on v1.
    let (_, j) = get_web(&c, "client-blue", "/", &[]).await;
    assert_eq!(j["pod"], "web-v2", "team blue → v2: {j}");
    let (_, j) = get_web(&c, "client", "/", &[]).await;
    assert_eq!(j["pod"], "web-v1", "{j}");

    // 2. HTTP/2 prior knowledge on the http port: routed by header, HTTP/2 to the app.
    let (status, body, _) = h2_request(&c, "client", web(), "web", "/h2", false)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["pod"], "web-v2", "{j}");
    assert_eq!(j["version"], "HTTP/2.0", "{j}");
    assert_eq!(j["path"], "/h2");
    // gRPC on the grpc port: the message and its trailers arrive.
    let grpc = SocketAddr::new(WEB_GRPC_VIP.into(), 80);
    let (status, body, trailers) =
        h2_request(&c, "client", grpc, "web-grpc", "/echo.Echo/Say", true)
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert!(body.len() > 5 && body[0] == 0, "{body:?}");
    let j: serde_json::Value = serde_json::from_slice(&body[5..]).unwrap();
    assert_eq!(j["path"], "/echo.Echo/Say");
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "echo");

    // 3. An HTTP/1.1 Upgrade: 101, then bytes both ways through the waypoint.
    let mut s = c.connect_from("client", web()).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let answer = exchange_on(s, b"frames after the upgrade").await.unwrap();
    assert_eq!(answer, b"frames after the upgrade");

    // 4. TCP port: through the waypoint's weighted TCP route (all to v1).
    let tcp = SocketAddr::new(WEB_TCP_VIP.into(), 80);
    for i in 0..3 {
        let answer = c
            .exchange("client", tcp, format!("tcp {i}").as_bytes())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("pod=web-v1 port=8080") && text.ends_with(&format!("tcp {i}")),
            "{text}"
        );
    }
    let metrics = waypoint_metrics(&c).await;
    let opened = testbed::cluster::sum_metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "waypoint"),
            ("destination_service", "web-tcp.demo.svc.cluster.local"),
        ],
    );
    assert_eq!(opened, 3.0, "{metrics}");
    let shows_route = |log: &str| {
        log.lines().any(|l| {
            l.contains("\"protocol\":\"TCP\"")
                && l.contains("inbound-vip|80|tcp/v1|web-tcp.demo.svc.cluster.local")
        })
    };
    let log = log_once(c.waypoint_log("waypoint-a"), shows_route).await;
    assert!(
        shows_route(&log),
        "the waypoint's access log shows the TCP route:\n{log}"
    );

    // 8. The config dump shows what pilot sent, with versions; the metrics count the requests.
    let (status, dump) = c
        .pod_http_get("waypoint-a", 15000, "/config_dump")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let configs = dump["configs"].as_array().expect("configs");
    let routes = configs
        .iter()
        .find(|c| {
            c["@type"]
                .as_str()
                .unwrap_or("")
                .ends_with("RoutesConfigDump")
        })
        .expect("routes dump");
    let web_routes = routes["dynamic_route_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route_config"]["name"] == format!("inbound-vip|80|http|{WEB_FQDN}"))
        .unwrap_or_else(|| panic!("web's routes in {routes}"));
    assert!(
        !web_routes["version_info"].as_str().unwrap_or("").is_empty(),
        "{web_routes}"
    );
    let names: Vec<&str> = web_routes["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["maintenance", "moved", "jason", "blue-team", "default"],
        "{web_routes}"
    );
    for kind in [
        "ClustersConfigDump",
        "ListenersConfigDump",
        "EndpointsConfigDump",
    ] {
        let d = configs
            .iter()
            .find(|c| c["@type"].as_str().unwrap_or("").ends_with(kind))
            .unwrap_or_else(|| panic!("{kind} in {dump}"));
        assert!(d.to_string().contains("version_info"), "{d}");
    }
    let metrics = waypoint_metrics(&c).await;
    let count = |code: &str, service: &str| {
        testbed::cluster::sum_metric(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service", service),
                ("response_code", code),
            ],
        )
    };
    assert!(count("200", WEB_FQDN) >= 12.0, "{metrics}");
    // The maintenance check's and the wait's first 503.
    assert_eq!(count("503", WEB_FQDN), 2.0, "{metrics}");
    assert_eq!(
        count("404", "web-none.demo.svc.cluster.local"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        testbed::cluster::sum_metric(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service", "web-grpc.demo.svc.cluster.local"),
                ("grpc_response_status", "0"),
            ],
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_and_bad_config_at_the_real_waypoint() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(real_spec_with(false)).await.unwrap();
    c.write_pilot_file("dr-web.yaml", &web_dr("{version: v2}"))
        .unwrap();
    c.write_pilot_file("vs-web.yaml", WEB_VS).unwrap();
    until_status(&c, "/unavailable", 503).await;

    // 5. A route change while a long request is in flight: the request completes on its
    // route; new requests follow the new one.
    let long = async {
        let (a, j) = get_web(&c, "client", "/slow?delay_ms=3000", &[]).await;
        (a.status, j["pod"].clone())
    };
    let change = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.write_pilot_file("vs-web.yaml", &web_vs_all_to("v2"))
            .unwrap();
        until_routed(&c, "client", "/", &[], "web-v2").await
    };
    let ((status, pod), took) = tokio::join!(long, change);
    println!("route change: the first request on the new route {took:?} after writing the file");
    assert_eq!((status, pod.as_str()), (200, Some("web-v1")));
    for _ in 0..4 {
        let (_, j) = get_web(&c, "client", "/", &[]).await;
        assert_eq!(j["pod"], "web-v2", "{j}");
    }

    // 7. Invalid edits: each is reported naming file, object and field, and the last good
    // routes (everything to v2) stay.
    let still_routed = || async {
        for headers in [&[][..], &[("end-user", "jason")][..]] {
            let (a, j) = get_web(&c, "client", "/", headers).await;
            assert_eq!((a.status, j["pod"].as_str()), (200, Some("web-v2")), "{j}");
        }
    };
    let route = |r: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: demo}}\nspec: {{hosts: [web], http: [{r}]}}\n"
        )
    };
    let bad_edits = [
        (
            route(
                "{match: [{uri: {regex: \"(\"}}], route: [{destination: {host: web, subset: v1}}]}",
            ),
            "field \"spec.http[0].match[0].uri.regex\": invalid regex",
        ),
        (
            route("{route: [{destination: {host: web, subset: v9}}]}"),
            "field \"spec.http[0].route[0].destination.subset\": subset \"v9\"",
        ),
        (
            route(
                "{route: [{destination: {host: web, subset: v1}, weight: -5}, {destination: {host: web, subset: v2}, weight: 105}]}",
            ),
            "field \"spec.http[0].route[0].weight\": -5 is not between 0 and 100",
        ),
        (
            route("{match: {uri: {prefix: /}}, route: [{destination: {host: web, subset: v1}}]}"),
            "field \"spec.http[0].match\"",
        ),
    ];
    for (yaml, field) in bad_edits {
        c.write_pilot_file("vs-web.yaml", &yaml).unwrap();
        let p = until_problem(&c, field).await;
        println!("{p}");
        assert!(
            p.starts_with("vs-web.yaml: VirtualService demo/web: ")
                && p.ends_with("; the last good version stays"),
            "{p}"
        );
        // Give a (wrong) push time to arrive before checking none came.
        tokio::time::sleep(Duration::from_millis(300)).await;
        still_routed().await;
    }
    // A bad DestinationRule edit keeps its last good subsets too.
    c.write_pilot_file("dr-web.yaml", &web_dr("[version, v2]"))
        .unwrap();
    let p = until_problem(&c, "DestinationRule demo/web").await;
    println!("{p}");
    assert!(
        p.starts_with("dr-web.yaml: DestinationRule demo/web: field \"spec.subsets[1].labels\"")
            && p.ends_with("; the last good version stays"),
        "{p}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    still_routed().await;

    // Fixed: the new routes apply, and the problems are gone.
    c.write_pilot_file("dr-web.yaml", &web_dr("{version: v2}"))
        .unwrap();
    c.write_pilot_file("vs-web.yaml", &web_vs_all_to("v1"))
        .unwrap();
    until_routed(&c, "client", "/", &[], "web-v1").await;
    let (_, body) = c.http_get(0, 15014, "/debug/snapshot").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{}", v["problems"]);

    // 8. The waypoint Gateway asks for the client's identity in `x-forwarded-client-cert`
    // (Istio's annotation): the app sees who called, in Envoy's shape, instead of what the
    // client claimed.
    let gateway =
        "metadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: service}}";
    let mesh = c.kubernetes_yaml();
    assert!(mesh.contains(gateway), "the test bed's Gateway changed");
    c.write_pilot_file(
        "mesh.yaml",
        &mesh.replace(
            gateway,
            "metadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: service}, annotations: {ambient.istio.io/xfcc-include-client-identity: \"true\"}}",
        ),
    )
    .unwrap();
    let spoofed = [(XFCC, "By=spiffe://x;URI=spiffe://evil")];
    let mut seen = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, j) = get_web(&c, "client", "/", &spoofed).await;
        seen = j["headers"][XFCC][0].clone();
        if seen.is_string() && seen != spoofed[0].1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let xfcc = seen.as_str().unwrap_or_default().to_string();
    let (by, rest) = xfcc
        .split_once(";Hash=")
        .unwrap_or_else(|| panic!("{xfcc:?}"));
    assert_eq!(by, format!("By={}", waypoint_identity()));
    let (hash, rest) = rest.split_once(';').unwrap();
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{xfcc}"
    );
    assert_eq!(
        rest,
        format!(
            "Subject=\"\";URI={}",
            Identity::new(TRUST_DOMAIN, "demo", "client")
        ),
        "{xfcc}"
    );
}

const XFCC: &str = "x-forwarded-client-cert";
