//! The shared fixture of the end-to-end tests that run the real waypoint: a two-node test bed
//! with pilot, a waypoint `waypoint` in namespace `demo`, the `web` pods (v1, v2) behind
//! services bound to it, and the requests and polls those tests make.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::cluster::{
    Cluster, ClusterSpec, ControlPlaneMode, ECHO_PORT, HTTP_PORT, PodDef, ServiceDef,
    waypoint_gateway_yaml,
};

pub const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub const WEB_GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
pub const WEB_TCP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 42);
pub const WEB_NONE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 43);
pub const WEB_FQDN: &str = "web.demo.svc.cluster.local";

/// A service in front of the `web` pods, bound to waypoint `waypoint`.
pub fn web_service(name: &str, vip: Ipv4Addr, port_name: &str, target_port: u16) -> ServiceDef {
    ServiceDef {
        name: name.into(),
        vip,
        vip6: None,
        target_port,
        app: "web".into(),
        port_name: port_name.into(),
        ..ServiceDef::echo()
    }
    .use_waypoint("waypoint")
}

pub fn web_pod(name: &str, version: &str) -> PodDef {
    let mut p = PodDef::new(name, "web", 1, true);
    p.labels.insert("version".into(), version.into());
    p
}

/// node1: client, client-blue (label `team: blue`); node2: waypoint-a (the real waypoint of
/// `waypoint`), web-v1 and web-v2 (`app: web`, `version` v1/v2). Services bound to the
/// waypoint, all port 80 in front of the web pods: `web` (http → HTTP app), `web-grpc` (grpc →
/// HTTP app), `web-tcp` (tcp → echo), `web-none` (http). DestinationRules give `web` and
/// `web-tcp` subsets v1/v2; `web-tcp` has a weighted TCP route, `web-none` a VirtualService
/// whose only rule matches nothing sent to it. The `web` VirtualService is the test's file.
pub fn real_spec() -> ClusterSpec {
    real_spec_with(true)
}

/// `web`'s DestinationRule (subsets v1 and v2), with `v2_labels` as subset v2's labels.
pub fn web_dr(v2_labels: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: demo}}\nspec: {{host: web, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {v2_labels}}}]}}\n"
    )
}

/// [`real_spec`], with `web`'s DestinationRule left for the test to write when not `web_dr`.
pub fn real_spec_with(with_web_dr: bool) -> ClusterSpec {
    let mut blue = PodDef::new("client-blue", "client", 0, true);
    blue.labels.insert("team".into(), "blue".into());
    let dr = |host: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}, namespace: demo}}\nspec: {{host: {host}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n---\n"
        )
    };
    let routing = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-tcp, namespace: demo}
spec:
  hosts: [web-tcp]
  tcp:
  - route:
    - {destination: {host: web-tcp, subset: v1}, weight: 100}
    - {destination: {host: web-tcp, subset: v2}, weight: 0}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-none, namespace: demo}
spec:
  hosts: [web-none.demo.svc.cluster.local]
  http:
  - match: [{uri: {exact: /only-this}}]
    route: [{destination: {host: web-none}}]
---
";
    ClusterSpec {
        control_plane: ControlPlaneMode::Pilot,
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            blue,
            PodDef::waypoint("waypoint-a", "waypoint", 1),
            web_pod("web-v1", "v1"),
            web_pod("web-v2", "v2"),
        ],
        services: vec![
            ServiceDef::waypoint("waypoint", WAYPOINT_VIP),
            web_service("web", WEB_VIP, "http", HTTP_PORT),
            web_service("web-grpc", WEB_GRPC_VIP, "grpc", HTTP_PORT),
            web_service("web-tcp", WEB_TCP_VIP, "tcp", ECHO_PORT),
            web_service("web-none", WEB_NONE_VIP, "http", HTTP_PORT),
        ],
        pilot_yaml: waypoint_gateway_yaml("waypoint", "demo", "service")
            + &if with_web_dr {
                dr("web")
            } else {
                String::new()
            }
            + &dr("web-tcp")
            + routing,
        start_waypoints: true,
        ..Default::default()
    }
}

/// The `web` VirtualService: maintenance (503), a rewrite to v2, jason → v2, team blue → v2,
/// everything else → v1.
pub const WEB_VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - name: maintenance
    match: [{uri: {prefix: /unavailable}}]
    directResponse: {status: 503, body: {string: down for maintenance}}
  - name: moved
    match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/, authority: rewritten.example}
    route: [{destination: {host: web, subset: v2}}]
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web, subset: v2}}]
  - name: blue-team
    match: [{sourceLabels: {team: blue}}]
    route: [{destination: {host: web, subset: v2}}]
  - name: default
    route: [{destination: {host: web, subset: v1}}]
";

/// A `web` VirtualService sending everything to `subset`.
pub fn web_vs_all_to(subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: demo}}\nspec: {{hosts: [web], http: [{{name: all, route: [{{destination: {{host: web, subset: {subset}}}}}]}}]}}\n"
    )
}

pub fn web() -> SocketAddr {
    SocketAddr::new(WEB_VIP.into(), 80)
}

/// One HTTP/1.1 GET to `web` from `pod`; the answer and (for 200s) the echo app's JSON.
pub async fn get_web(
    c: &Cluster,
    pod: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (crate::cluster::HttpAnswer, serde_json::Value) {
    let answer = c
        .http_get_from(pod, web(), "web", path, headers)
        .await
        .unwrap();
    let json = answer.json().unwrap_or(serde_json::Value::Null);
    (answer, json)
}

/// Poll until a GET from `pod` to `path` with `headers` reaches `want_pod`: the waypoint has
/// the routes that send it there. Returns how long it took.
pub async fn until_routed(
    c: &Cluster,
    pod: &str,
    path: &str,
    headers: &[(&str, &str)],
    want_pod: &str,
) -> Duration {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        match c.http_get_from(pod, web(), "web", path, headers).await {
            Ok(a) => match a.json() {
                Ok(j) if j["pod"] == want_pod => return start.elapsed(),
                Ok(j) => last = format!("{} {j}", a.status),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{path} {headers:?} from {pod} never reached {want_pod}: last {last}\n--- waypoint log ---\n{}",
        std::fs::read_to_string(c.waypoint_log("waypoint-a")).unwrap_or_default()
    );
}

/// Poll until a GET from `client` to `web` `path` is answered `status` (a route only the
/// VirtualService has): the waypoint has the VirtualService. Returns how long it took.
pub async fn until_status(c: &Cluster, path: &str, status: u16) -> Duration {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        match c.http_get_from("client", web(), "web", path, &[]).await {
            Ok(a) if a.status == status => return start.elapsed(),
            Ok(a) => last = format!("{} {}", a.status, String::from_utf8_lossy(&a.body)),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{path} never answered {status}: last {last}\n--- waypoint log ---\n{}",
        std::fs::read_to_string(c.waypoint_log("waypoint-a")).unwrap_or_default()
    );
}

/// An HTTP/2 (prior knowledge) request from `pod` to `dst` with `:authority` `authority`; a
/// gRPC one (POST, one empty message) when `grpc`. Status, body, trailers.
pub async fn h2_request(
    c: &Cluster,
    pod: &str,
    dst: SocketAddr,
    authority: &str,
    path: &str,
    grpc: bool,
) -> anyhow::Result<(u16, Vec<u8>, Option<http::HeaderMap>)> {
    let tcp = c.connect_from(pod, dst).await?;
    let (mut send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(if grpc { "POST" } else { "GET" })
        .uri(format!("http://{authority}{path}"))
        .header("end-user", "jason");
    if grpc {
        req = req
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    }
    let (rsp, mut body_tx) = send.send_request(req.body(())?, !grpc)?;
    if grpc {
        body_tx.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    }
    let rsp = tokio::time::timeout(Duration::from_secs(10), rsp).await??;
    let status = rsp.status().as_u16();
    let mut body = rsp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?;
    Ok((status, data, trailers))
}

pub async fn waypoint_metrics(c: &Cluster) -> String {
    let (status, text) = c
        .pod_http_get("waypoint-a", 15020, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    text
}

/// Poll pilot's `/debug/snapshot` until a problem contains `needle`; that problem.
pub async fn until_problem(c: &Cluster, needle: &str) -> String {
    let start = std::time::Instant::now();
    let mut last = serde_json::Value::Null;
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok((200, body)) = c.http_get(0, 15014, "/debug/snapshot").await
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
        {
            if let Some(p) = v["problems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
                .find(|p| p.contains(needle))
            {
                return p.to_string();
            }
            last = v["problems"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no problem with {needle:?} on pilot's /debug/snapshot: {last}");
}

/// The waypoint pod `waypoint-a`'s log once it contains every one of `needles` (within 10 s;
/// else what it holds then). The waypoint writes its log, access lines included, through a
/// buffer flushed up to 100 ms after the event.
pub async fn waypoint_log_with(c: &Cluster, needles: &[&str]) -> String {
    let start = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(c.waypoint_log("waypoint-a")).unwrap_or_default();
        if needles.iter().all(|n| log.contains(n)) || start.elapsed() > Duration::from_secs(10) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
