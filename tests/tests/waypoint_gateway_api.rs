//! End-to-end: Gateway API routes (HTTPRoute, GRPCRoute) attached to services bound to the
//! real waypoint, on the test bed with pilot's folder source: header match, weighted backends,
//! header modifiers, URL rewrite, a backend that does not resolve (500),
//! `timeouts.backendRequest` (504 for a slow backend), a backend in another namespace (500
//! until a ReferenceGrant there allows it), a VirtualService for the same service reported (not
//! merged), and gRPC routed by service/method.

use std::net::SocketAddr;

use testbed::cluster::{Cluster, HTTP_PORT, PodDef, ServiceDef};
use testbed::waypoint_bed::*;

/// `web-v1` / `web-v2`: one Service per version of the `web` pods (Gateway API backends are
/// Services, not subsets). Not bound to the waypoint: it reaches their pods directly.
fn version_services() -> String {
    let svc = |v: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web-{v}, namespace: demo}}\nspec: {{clusterIP: {ip}, selector: {{app: web, version: {v}}}, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}]}}\n---\n"
        )
    };
    svc("v1", "10.96.0.50") + &svc("v2", "10.96.0.51")
}

const WEB_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - name: jason
    matches: [{headers: [{name: end-user, value: jason}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: jason}], remove: [x-drop]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: gateway-api}]}
    backendRefs: [{name: web-v2, port: 80}]
  - name: old
    matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
    backendRefs: [{name: web-v1, port: 80}]
  - name: broken
    matches: [{path: {type: Exact, value: /broken}}]
    backendRefs: [{name: ghost, port: 80}]
  - name: cross
    matches: [{path: {type: PathPrefix, value: /cross}}]
    backendRefs: [{name: ratings, namespace: backend, port: 80}]
  - name: slow
    matches: [{path: {type: PathPrefix, value: /slow}}]
    backendRefs: [{name: web-v1, port: 80}]
    timeouts: {request: 5s, backendRequest: 300ms}
  - name: split
    backendRefs: [{name: web-v1, port: 80, weight: 3}, {name: web-v2, port: 80, weight: 1}]
"#;

/// Lets HTTPRoutes of `demo` send to Service `ratings` of namespace `backend`.
const RATINGS_GRANT: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: demo-routes, namespace: backend}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: demo}]
  to: [{group: "", kind: Service, name: ratings}]
"#;

const GRPC_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: web-grpc, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web-grpc}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Say}}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{method: {service: echo.Echo}}]
    backendRefs: [{name: web-v1, port: 80}]
"#;

fn header<'a>(a: &'a testbed::cluster::HttpAnswer, name: &str) -> Option<&'a str> {
    a.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// One gRPC call from `client` to `web-grpc`: (HTTP status, the pod that answered).
async fn grpc_call(c: &Cluster, path: &str) -> (u16, Option<String>) {
    let grpc = SocketAddr::new(WEB_GRPC_VIP.into(), 80);
    let (status, body, trailers) = h2_request(c, "client", grpc, "web-grpc", path, true)
        .await
        .unwrap();
    if status != 200 || body.len() <= 5 {
        return (status, None);
    }
    let j: serde_json::Value = serde_json::from_slice(&body[5..]).unwrap();
    assert_eq!(j["path"], path);
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    (status, j["pod"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_routes_through_the_real_waypoint() {
    if !testbed::can_run() {
        return;
    }
    let mut spec = real_spec();
    spec.pilot_yaml += &version_services();
    // A pod and its Service in namespace `backend`, for a cross-namespace backendRef.
    let mut ratings = PodDef::new("ratings-1", "ratings", 1, true);
    ratings.namespace = "backend".into();
    spec.pods.push(ratings);
    spec.services.push(ServiceDef {
        name: "ratings".into(),
        namespace: "backend".into(),
        vip: std::net::Ipv4Addr::new(10, 96, 0, 60),
        vip6: None,
        target_port: HTTP_PORT,
        app: "ratings".into(),
        port_name: "http".into(),
        ..ServiceDef::echo()
    });
    let c = Cluster::start(spec).await.unwrap();
    c.write_pilot_file("route-web.yaml", WEB_ROUTE).unwrap();
    let took = until_status(&c, "/broken", 500).await;
    eprintln!("HTTPRoute applied at the waypoint {took:?} after the file was written");

    // Header match, with the request and response header modifiers.
    let (a, j) = get_web(
        &c,
        "client",
        "/anything",
        &[("end-user", "jason"), ("x-drop", "1")],
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(j["pod"], "web-v2", "{j}");
    assert_eq!(j["headers"]["x-route"][0], "jason", "{j}");
    assert!(j["headers"].get("x-drop").is_none(), "removed: {j}");
    assert_eq!(header(&a, "x-served-by"), Some("gateway-api"), "{a:?}");

    // PathPrefix with a prefix rewrite and a hostname rewrite.
    let (a, j) = get_web(&c, "client", "/old/page?q=2", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(j["pod"], "web-v1", "{j}");
    assert_eq!(j["path"], "/new/page?q=2");
    assert_eq!(j["authority"], "rewritten.example");
    let (_, j) = get_web(&c, "client", "/old", &[]).await;
    assert_eq!(j["path"], "/new", "{j}");
    // A prefix matches whole segments only: /oldish is the split rule's, unrewritten.
    let (a, j) = get_web(&c, "client", "/oldish", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(j["path"], "/oldish", "{j}");
    assert_eq!(j["authority"], "web", "{j}");

    // A backend in another namespace: refused (500) until a ReferenceGrant there allows it.
    let (a, _) = get_web(&c, "client", "/cross", &[]).await;
    assert_eq!(a.status, 500, "{a:?}");
    let p = until_problem(&c, "no ReferenceGrant in namespace backend").await;
    assert!(p.contains("spec.rules[3].backendRefs[0]"), "{p}");
    c.write_pilot_file("grant-ratings.yaml", RATINGS_GRANT)
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let (a, j) = get_web(&c, "client", "/cross", &[]).await;
        if a.status == 200 {
            assert_eq!(j["pod"], "ratings-1", "{j}");
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the ReferenceGrant never applied: {a:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // timeouts.backendRequest bounds each request to the backend: Envoy's 504 for a slow one.
    let (a, _) = get_web(&c, "client", "/slow/ok", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let start = std::time::Instant::now();
    let (a, _) = get_web(&c, "client", "/slow/late?delay_ms=1500", &[]).await;
    let took = start.elapsed();
    assert_eq!(a.status, 504, "{a:?}");
    assert_eq!(String::from_utf8_lossy(&a.body), "upstream request timeout");
    assert!(took < std::time::Duration::from_millis(1200), "{took:?}");

    // Weighted backends, 3:1.
    let mut v1 = 0;
    let n = 200;
    for _ in 0..n {
        let (a, j) = get_web(&c, "client", "/split", &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        match j["pod"].as_str() {
            Some("web-v1") => v1 += 1,
            Some("web-v2") => {}
            other => panic!("answered by {other:?}"),
        }
    }
    eprintln!(
        "weights 3:1 over {n} requests: web-v1 {v1}, web-v2 {}",
        n - v1
    );
    // Expected 150 (σ ≈ 6): far outside chance if the weights were ignored (100) or inverted.
    assert!((120..=180).contains(&v1), "web-v1 got {v1} of {n}");

    // A backend that does not resolve: 500 (the Gateway API's rule), reported by pilot.
    let (a, _) = get_web(&c, "client", "/broken", &[]).await;
    assert_eq!(a.status, 500, "{a:?}");
    let p = until_problem(&c, "ghost").await;
    assert!(
        p.contains("HTTPRoute demo/web") && p.contains("spec.rules[2].backendRefs[0]"),
        "{p}"
    );

    // A VirtualService for the same service: reported, not merged; the HTTPRoute still decides.
    c.write_pilot_file("vs-web.yaml", &web_vs_all_to("v2"))
        .unwrap();
    let p = until_problem(&c, "also has Gateway API routes").await;
    assert!(p.contains("VirtualService demo/web"), "{p}");
    for _ in 0..8 {
        let (_, j) = get_web(&c, "client", "/old/x", &[]).await;
        assert_eq!(
            j["pod"], "web-v1",
            "the HTTPRoute's rule, not the VS's: {j}"
        );
    }

    // GRPCRoute: by service and method, then by service; another service has no route (404).
    c.write_pilot_file("route-grpc.yaml", GRPC_ROUTE).unwrap();
    let start = std::time::Instant::now();
    loop {
        let (status, _) = grpc_call(&c, "/other.Svc/Call").await;
        if status == 404 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the GRPCRoute never applied (last status {status})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        assert_eq!(
            grpc_call(&c, "/echo.Echo/Say").await,
            (200, Some("web-v2".into()))
        );
        assert_eq!(
            grpc_call(&c, "/echo.Echo/Other").await,
            (200, Some("web-v1".into()))
        );
    }
}
