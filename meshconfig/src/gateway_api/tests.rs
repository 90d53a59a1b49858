use super::*;
use crate::k8s::{Object, parse_documents};
use crate::translate::MeshOptions;
use envoy_types::pb::envoy::config::route::v3 as route;
use prost::Message;

/// A namespace with a waypoint, `web` (ports 80 http, 9090 grpc) and `api` bound to it,
/// `lonely` bound to none.
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, generation: 2}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.9, ports: [{name: mesh, port: 15008}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80}, {name: grpc, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: lonely}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec: {clusterIP: 10.96.0.4, selector: {app: web, version: v2}, ports: [{name: http, port: 80}]}
"#;

fn http_route(name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop, creationTimestamp: \"{created}\", generation: 3}}\nspec:\n{spec}\n"
    )
}

fn parse(text: &str) -> crate::k8s::Parsed {
    parse_documents(text, "routes.yaml")
}

fn snapshot(extra: &str) -> Snapshot {
    let p = parse(&format!("{BASE}---\n{extra}"));
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    let s = Snapshot::build(p.objects, vec![]);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    s
}

fn the_route(text: &str) -> Route {
    let p = parse(text);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    match p.objects.into_iter().next().map(|(_, o)| o) {
        Some(Object::HttpRoute(r) | Object::GrpcRoute(r)) => r,
        other => panic!("not a route: {other:?}"),
    }
}

#[test]
fn full_http_route_parses() {
    let r = the_route(&http_route(
        "web",
        "2026-01-01T00:00:00Z",
        r#"
  parentRefs: [{kind: Service, group: "", name: web, port: 80}, {name: waypoint}]
  hostnames: [web.shop.svc.cluster.local]
  rules:
  - name: canary
    matches:
    - path: {type: PathPrefix, value: /api/}
      headers: [{name: X-User, value: jason}, {type: RegularExpression, name: x-v, value: "v[0-9]"}]
      queryParams: [{name: debug, value: "1"}]
      method: POST
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [{name: x-b, value: "2"}], remove: [x-c]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-r, value: "3"}]}
    - type: URLRewrite
      urlRewrite: {hostname: internal.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: web-v2, port: 80}, fraction: {numerator: 1, denominator: 4}}
    backendRefs:
    - {name: web, port: 80, weight: 90}
    - name: web-v2
      port: 80
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-canary, value: "yes"}]}}]
    timeouts: {request: 10s, backendRequest: 1s500ms}
  - matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: new.example, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}}]
"#,
    ));
    assert_eq!(r.kind, RouteKind::Http);
    assert_eq!(r.created, "2026-01-01T00:00:00Z");
    assert_eq!(r.generation, 3);
    assert_eq!(r.parents.len(), 2);
    assert!(r.parents[0].is_service());
    assert_eq!(r.parents[0].port, Some(80));
    assert!(r.parents[1].is_gateway());
    assert_eq!(r.parents[1].namespace, "shop");
    let rule = &r.rules[0];
    let m = &rule.matches[0];
    assert_eq!(
        m.uri,
        Some(StringMatch::Prefix("/api".into())),
        "trailing / dropped"
    );
    assert_eq!(m.method, Some(StringMatch::Exact("POST".into())));
    assert_eq!(m.headers["x-user"], StringMatch::Exact("jason".into()));
    assert_eq!(m.headers["x-v"], StringMatch::Regex("v[0-9]".into()));
    assert_eq!(m.query_params["debug"], StringMatch::Exact("1".into()));
    assert_eq!(rule.headers.request.set["x-a"], "1");
    assert_eq!(rule.headers.request.add["x-b"], "2");
    assert_eq!(rule.headers.request.remove, ["x-c"]);
    assert_eq!(rule.headers.response.set["x-r"], "3");
    assert_eq!(rule.mirrors[0].per_million, 250_000);
    assert_eq!(rule.backends[1].weight, 10);
    assert_eq!(rule.backends[1].headers.request.set["x-canary"], "yes");
    assert_eq!(rule.timeout, Some(Duration::from_secs(10)));
    assert_eq!(rule.backend_timeout, Some(Duration::from_millis(1500)));
    let redirect = r.rules[1].redirect.as_ref().unwrap();
    assert_eq!(redirect.status_code, 301);
    assert_eq!(
        redirect.path,
        Some(PathModifier::ReplaceFullPath("/new".into()))
    );
    // A rule without matches matches everything.
    let r = the_route(&http_route(
        "x",
        "",
        "  rules: [{backendRefs: [{name: web, port: 80}]}]",
    ));
    assert_eq!(
        r.rules[0].matches[0].uri,
        Some(StringMatch::Prefix("/".into()))
    );
}

#[test]
fn grpc_methods_become_paths() {
    let grpc = |method: &str| {
        let r = the_route(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  rules: [{{matches: [{{method: {method}, headers: [{{name: x-t, value: a}}]}}], backendRefs: [{{name: web, port: 9090}}]}}]\n"
        ));
        assert_eq!(r.kind, RouteKind::Grpc);
        assert_eq!(r.rules[0].matches[0].headers.len(), 1);
        r.rules[0].matches[0].uri.clone().unwrap()
    };
    assert_eq!(
        grpc("{service: echo.Echo, method: Say}"),
        StringMatch::Exact("/echo.Echo/Say".into())
    );
    assert_eq!(
        grpc("{service: echo.Echo}"),
        StringMatch::Prefix("/echo.Echo/".into())
    );
    assert_eq!(
        grpc("{method: Say}"),
        StringMatch::Regex("/[^/]+/Say".into())
    );
    assert_eq!(
        grpc("{type: RegularExpression, service: \"echo\\\\..*\"}"),
        StringMatch::Regex("/echo\\..*/[^/]+".into())
    );
}

#[test]
fn problems_name_the_field() {
    let cases = [
        (
            "  rules: [{matches: [{path: {type: Exact, value: nope}}]}]",
            "field \"spec.rules[0].matches[0].path.value\": \"nope\" must start with '/'",
        ),
        (
            "  rules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}]}]",
            "field \"spec.rules[0].matches[0].path.value\": invalid regex",
        ),
        (
            "  rules: [{matches: [{method: FETCH}]}]",
            "field \"spec.rules[0].matches[0].method\": \"FETCH\" is not one of GET",
        ),
        (
            "  rules: [{backendRefs: [{name: web}]}]",
            "field \"spec.rules[0].backendRefs[0].port\": is required for a Service backend",
        ),
        (
            "  rules: [{backendRefs: [{name: web, port: 80, weight: -1}]}]",
            "field \"spec.rules[0].backendRefs[0].weight\": -1 is not between 0 and 1000000",
        ),
        (
            "  rules: [{filters: [{type: ExtensionRef, extensionRef: {name: x}}]}]",
            "field \"spec.rules[0].filters[0].type\": \"ExtensionRef\" is not supported here",
        ),
        (
            "  rules: [{filters: [{type: RequestHeaderModifier}]}]",
            "field \"spec.rules[0].filters[0].requestHeaderModifier\": is required for type RequestHeaderModifier",
        ),
        (
            "  rules: [{timeouts: {request: soon}}]",
            "field \"spec.rules[0].timeouts.request\": \"soon\" is not a duration",
        ),
        (
            "  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]",
            "field \"spec.rules[0].timeouts.backendRequest\": must not be longer than request",
        ),
        (
            "  rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]",
            "field \"spec.rules[0].filters\": ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
        ),
        (
            "  rules: [{retry: {attempts: 2}}]",
            "field \"spec.rules[0].retry\": unknown field",
        ),
        (
            "  parentRefs: [{kind: Service}]",
            "field \"spec.parentRefs[0].name\": is required",
        ),
    ];
    for (spec, want) in cases {
        let p = parse(&http_route("bad", "", spec));
        assert_eq!(p.problems.len(), 1, "{spec}: {:?}", p.problems);
        let got = p.problems[0].to_string();
        assert!(
            got.starts_with("routes.yaml: HTTPRoute shop/bad: ") && got.contains(want),
            "{spec}:\n got {got}\nwant {want}"
        );
    }
}

/// The Service parent's rules, as (route name, first match's uri) in translation order.
fn order(s: &Snapshot) -> Vec<(String, String)> {
    let a = attach(s, "cluster.local");
    a.by_service[&("shop".to_string(), "web".to_string())]
        .iter()
        .map(|vs| {
            let r = &vs.http[0];
            (
                format!("{}:{}", vs.meta.name, r.name),
                format!("{:?}", r.matches[0].uri.as_ref().unwrap()),
            )
        })
        .collect()
}

#[test]
fn rules_follow_the_gateway_api_precedence() {
    let parent = "  parentRefs: [{group: \"\", kind: Service, name: web}]\n";
    let s = snapshot(&[
        http_route(
            "young",
            "2026-02-01T00:00:00Z",
            &format!(
                "{parent}  rules:\n  - name: all\n  - name: short\n    matches: [{{path: {{value: /a}}}}]\n  - name: exact\n    matches: [{{path: {{type: Exact, value: /a}}}}]\n"
            ),
        ),
        http_route(
            "old",
            "2026-01-01T00:00:00Z",
            &format!(
                "{parent}  rules:\n  - name: long\n    matches: [{{path: {{value: /a/b}}}}]\n  - name: short-old\n    matches: [{{path: {{value: /a}}}}]\n  - name: method\n    matches: [{{path: {{value: /a}}, method: GET}}]\n  - name: headers\n    matches: [{{path: {{value: /a}}, headers: [{{name: x, value: \"1\"}}, {{name: y, value: \"2\"}}]}}, {{path: {{value: /a}}, queryParams: [{{name: q, value: \"1\"}}]}}]\n  - name: regex\n    matches: [{{path: {{type: RegularExpression, value: /.*}}}}]\n"
            ),
        ),
    ]
    .join("---\n"));
    let got: Vec<String> = order(&s).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        got,
        [
            "young:exact",
            "old:long",
            "old:method",
            "old:headers",
            "old:headers",
            "old:short-old",
            "young:short",
            "old:regex",
            "young:all",
        ]
    );
    // Same match, same time: namespace/name decides.
    let s = snapshot(
        &[
            http_route("b", "", &format!("{parent}  rules: [{{name: r}}]")),
            http_route("a", "", &format!("{parent}  rules: [{{name: r}}]")),
        ]
        .join("---\n"),
    );
    let got: Vec<String> = order(&s).into_iter().map(|(n, _)| n).collect();
    assert_eq!(got, ["a:r", "b:r"]);
}

fn statuses(a: &Attached, name: &str) -> Vec<ParentStatus> {
    a.statuses[&(RouteKind::Http, ("shop".to_string(), name.to_string()))].clone()
}

#[test]
fn parents_attach_routes_to_services() {
    let s = snapshot(
        &[
            // The waypoint: every service bound to it that the hostnames name.
            http_route(
                "by-gateway",
                "",
                "  parentRefs: [{name: waypoint}]\n  hostnames: [api.shop.svc.cluster.local, unrelated.example]\n  rules: [{backendRefs: [{name: api, port: 8080}]}]",
            ),
            // A Service port by sectionName (the port's name).
            http_route(
                "by-service",
                "",
                "  parentRefs: [{group: \"\", kind: Service, name: web, sectionName: http}]\n  rules: [{backendRefs: [{name: web, port: 80}, {name: web-v2, port: 80, weight: 0}]}]",
            ),
            // Refused or not ours.
            http_route(
                "refused",
                "",
                "  parentRefs: [{group: \"\", kind: Service, name: lonely}, {group: \"\", kind: Service, name: ghost}, {name: nowhere}, {name: waypoint, sectionName: other}, {group: example.com, kind: Mesh, name: m}]\n  rules: [{backendRefs: [{name: ghost, port: 80}]}]",
            ),
        ]
        .join("---\n"),
    );
    let a = attach(&s, "cluster.local");
    let keys: Vec<&Key> = a.by_service.keys().collect();
    assert_eq!(
        keys,
        [
            &("shop".to_string(), "api".to_string()),
            &("shop".to_string(), "web".to_string())
        ]
    );
    let web = &a.by_service[&("shop".to_string(), "web".to_string())][0].http[0];
    assert_eq!(web.matches[0].port, Some(80), "sectionName: port 80 only");
    assert_eq!(web.route.len(), 1, "weight 0 left out");
    assert_eq!(web.route[0].weight, None, "a lone backend takes all");
    assert_eq!(web.route[0].destination.host, "web.shop.svc.cluster.local");
    assert!(web.gateway_api);
    assert_eq!(
        statuses(&a, "by-gateway"),
        [ParentStatus {
            parent: 0,
            accepted: Ok(()),
            resolved_refs: Ok(())
        }]
    );
    assert_eq!(
        a.attached_to_gateway[&("shop".to_string(), "waypoint".to_string())],
        1
    );
    let refused = statuses(&a, "refused");
    let reasons: Vec<(usize, &str)> = refused
        .iter()
        .map(|p| (p.parent, p.accepted.as_ref().unwrap_err().0))
        .collect();
    assert_eq!(
        reasons,
        [
            (0, "NoMatchingParent"),
            (1, "NoMatchingParent"),
            (3, "NoMatchingParent"),
        ],
        "a Gateway that does not exist and the example.com parent may be another implementation's"
    );
    let problems: Vec<String> = a
        .problems
        .iter()
        .filter(|p| p.object == "HTTPRoute shop/refused")
        .map(|p| p.to_string())
        .collect();
    assert_eq!(
        problems,
        [
            "routes.yaml: HTTPRoute shop/refused: field \"spec.parentRefs[0]\": Service shop/lonely is not bound to a waypoint (istio.io/use-waypoint); the route is not attached to it",
            "routes.yaml: HTTPRoute shop/refused: field \"spec.parentRefs[1]\": Service shop/ghost not found; the route is not attached to it",
            "routes.yaml: HTTPRoute shop/refused: field \"spec.parentRefs[2]\": Gateway shop/nowhere not found; the route is not attached to it",
            "routes.yaml: HTTPRoute shop/refused: field \"spec.parentRefs[3]\": no listener of the Gateway has this sectionName / port; the route is not attached to it",
            "routes.yaml: HTTPRoute shop/refused: field \"spec.rules[0].backendRefs[0]\": backend Service shop/ghost not found: requests for it are answered 500",
        ]
    );
    assert!(
        refused[0]
            .accepted
            .as_ref()
            .unwrap_err()
            .1
            .contains("not bound to a waypoint")
    );
    assert_eq!(
        refused[0].resolved_refs,
        Err((
            "BackendNotFound",
            "backend Service shop/ghost not found".to_string()
        ))
    );
}

#[test]
fn backends_that_do_not_resolve_and_zero_weights() {
    let s = snapshot(&http_route(
        "r",
        "",
        "  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules:\n  - matches: [{path: {value: /split}}]\n    backendRefs: [{name: web, port: 80, weight: 3}, {name: ghost, port: 80, weight: 1}, {name: web, namespace: other, port: 80}, {kind: Bucket, group: s3, name: b}]\n  - matches: [{path: {value: /none}}]\n    backendRefs: [{name: web, port: 80, weight: 0}]\n  - matches: [{path: {value: /mirror}}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: ghost, port: 80}}}, {type: RequestMirror, requestMirror: {backendRef: {name: web-v2, port: 80}, percent: 5}}]\n    backendRefs: [{name: web, port: 8}]",
    ));
    let a = attach(&s, "cluster.local");
    let rules = &a.by_service[&("shop".to_string(), "web".to_string())];
    let by_path = |p: &str| {
        rules
            .iter()
            .map(|v| &v.http[0])
            .find(|r| r.matches[0].uri == Some(StringMatch::Prefix(p.into())))
            .unwrap()
    };
    let split = by_path("/split");
    let hosts: Vec<(&str, Option<u32>)> = split
        .route
        .iter()
        .map(|d| (d.destination.host.as_str(), d.weight))
        .collect();
    assert_eq!(
        hosts,
        [
            ("web.shop.svc.cluster.local", Some(3)),
            ("ghost.shop.invalid-backend", Some(1)),
            ("web.other.invalid-backend", Some(1)),
            ("b.shop.invalid-backend", Some(1)),
        ]
    );
    let none = by_path("/none");
    assert!(none.route.is_empty());
    assert_eq!(none.direct_response.as_ref().unwrap().status, 500);
    let mirror = by_path("/mirror");
    assert_eq!(mirror.mirrors.len(), 1, "the unresolved mirror is dropped");
    assert_eq!(mirror.mirrors[0].per_million, 50_000);
    let st = statuses(&a, "r");
    let (reason, message) = st[0].resolved_refs.as_ref().unwrap_err();
    assert_eq!(*reason, "BackendNotFound");
    for part in [
        "backend Service shop/ghost not found",
        "backend other/web: no ReferenceGrant in namespace other lets HTTPRoutes of namespace shop refer to it",
        "only Services are supported",
        "has no port 8",
    ] {
        assert!(message.contains(part), "{message}");
    }
    assert!(st[0].accepted.is_ok());
}

/// Services in namespace `backend`, and a ReferenceGrant there for HTTPRoutes of `shop` to
/// Service `api` only.
const BACKEND_NS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec: {clusterIP: 10.96.1.1, selector: {app: api}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: backend}
spec: {clusterIP: 10.96.1.2, selector: {app: db}, ports: [{name: http, port: 8080}]}
---
"#;

const GRANT: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-to-api, namespace: backend}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: api}]
---
"#;

#[test]
fn cross_namespace_backends_need_a_reference_grant() {
    let route = http_route(
        "r",
        "",
        "  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules:\n  - matches: [{path: {value: /api}}]\n    backendRefs: [{name: api, namespace: backend, port: 8080}]\n  - matches: [{path: {value: /db}}]\n    backendRefs: [{name: db, namespace: backend, port: 8080}]",
    );
    let host_of = |a: &Attached, p: &str| {
        a.by_service[&("shop".to_string(), "web".to_string())]
            .iter()
            .map(|v| &v.http[0])
            .find(|r| r.matches[0].uri == Some(StringMatch::Prefix(p.into())))
            .map(|r| r.route[0].destination.host.clone())
            .unwrap()
    };
    // Without a grant: neither resolves (500 at the waypoint), RefNotPermitted.
    let s = snapshot(&format!("{BACKEND_NS}{route}"));
    let a = attach(&s, "cluster.local");
    assert_eq!(host_of(&a, "/api"), "api.backend.invalid-backend");
    assert_eq!(host_of(&a, "/db"), "db.backend.invalid-backend");
    let st = statuses(&a, "r");
    let (reason, message) = st[0].resolved_refs.as_ref().unwrap_err();
    assert_eq!(*reason, "RefNotPermitted");
    assert!(
        message.contains("backend backend/api: no ReferenceGrant in namespace backend lets HTTPRoutes of namespace shop refer to it"),
        "{message}"
    );
    // The grant lets the route reach `api`, not `db`.
    let s = snapshot(&format!("{BACKEND_NS}{GRANT}{route}"));
    let a = attach(&s, "cluster.local");
    assert_eq!(host_of(&a, "/api"), "api.backend.svc.cluster.local");
    assert_eq!(host_of(&a, "/db"), "db.backend.invalid-backend");
    let st = statuses(&a, "r");
    let (reason, message) = st[0].resolved_refs.as_ref().unwrap_err();
    assert_eq!(*reason, "RefNotPermitted");
    assert!(
        message.contains("backend/db") && !message.contains("backend/api"),
        "{message}"
    );
    // Status written back: ResolvedRefs False, RefNotPermitted.
    let status = route_status(
        &s.http_routes[&("shop".to_string(), "r".to_string())],
        &st,
        "T1",
    );
    let conditions = &status["parents"][0]["conditions"];
    assert_eq!(conditions[1]["type"], "ResolvedRefs");
    assert_eq!(conditions[1]["status"], "False");
    assert_eq!(conditions[1]["reason"], "RefNotPermitted");
    // Translated: the refused backend's requests answered 500 (Envoy's cluster-not-found code).
    let (routes, t) = translated(&format!("{BACKEND_NS}{GRANT}{route}"));
    let db = routes.iter().find(|r| r.name == "shop.r.1").unwrap();
    let Some(route::route::Action::Route(a)) = &db.action else {
        panic!("{db:?}")
    };
    assert_eq!(
        a.cluster_not_found_response_code,
        route::route_action::ClusterNotFoundResponseCode::InternalServerError as i32
    );
    let problems: Vec<String> = t.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("spec.rules[1].backendRefs[0]") && p.contains("no ReferenceGrant")),
        "{problems:?}"
    );
    assert!(
        !problems.iter().any(|p| p.contains("spec.rules[0]")),
        "{problems:?}"
    );
}

fn translated(extra: &str) -> (Vec<route::Route>, crate::waypoint::Translation) {
    let s = snapshot(extra);
    let t = crate::waypoint::translate(&s, &MeshOptions::default());
    let rc = route::RouteConfiguration::decode(
        t.waypoints["shop/waypoint"].routes["inbound-vip|80|http|web.shop.svc.cluster.local"]
            .body
            .clone(),
    )
    .unwrap();
    (rc.virtual_hosts[0].routes.clone(), t)
}

#[test]
fn the_waypoint_translation_applies_gateway_api_semantics() {
    use route::route_action::{ClusterNotFoundResponseCode as Nf, ClusterSpecifier};
    use route::route_match::PathSpecifier;
    let (routes, t) = translated(&http_route(
        "web",
        "",
        r#"
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {value: /api}, headers: [{name: x-user, value: jason}]}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-via, value: gw}]}}
    - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
    backendRefs: [{name: web, port: 80, weight: 1}, {name: ghost, port: 80, weight: 1}]
    timeouts: {request: 3s, backendRequest: 1s}
  - matches: [{path: {value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
  - backendRefs: [{name: web-v2, port: 80}]
"#,
    ));
    let problems: Vec<String> = t.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        problems,
        [
            "routes.yaml: HTTPRoute shop/web: field \"spec.rules[0].backendRefs[1]\": backend Service shop/ghost not found: requests for it are answered 500"
        ]
    );
    assert_eq!(routes.len(), 3);
    let api = &routes[0];
    assert_eq!(api.name, "shop.web.0");
    let m = api.r#match.as_ref().unwrap();
    assert_eq!(
        m.path_specifier,
        Some(PathSpecifier::PathSeparatedPrefix("/api".into()))
    );
    assert_eq!(m.headers[0].name, "x-user");
    let Some(route::route::Action::Route(a)) = &api.action else {
        panic!("{api:?}")
    };
    assert_eq!(
        a.cluster_not_found_response_code,
        Nf::InternalServerError as i32
    );
    assert_eq!(a.timeout.unwrap().seconds, 3, "request: the whole exchange");
    // backendRequest: each try, with the mesh's default retries.
    let retry = a.retry_policy.as_ref().unwrap();
    assert_eq!(retry.per_try_timeout.unwrap().seconds, 1);
    assert_eq!(retry.num_retries.unwrap().value, 2);
    assert_eq!(retry.retry_on, crate::route_policy::DEFAULT_RETRY_ON);
    assert_eq!(
        retry.retry_host_predicate.len(),
        1,
        "previous hosts, as the default"
    );
    let rw = a.regex_rewrite.as_ref().unwrap();
    assert_eq!(rw.pattern.as_ref().unwrap().regex, "^/api/*");
    assert_eq!(rw.substitution, "/");
    let Some(ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier else {
        panic!("{a:?}")
    };
    let names: Vec<&str> = w.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "inbound-vip|80|http|web.shop.svc.cluster.local",
            "outbound|80||ghost.shop.invalid-backend"
        ]
    );
    let clusters = &t.waypoints["shop/waypoint"].clusters;
    assert!(
        !clusters.contains_key("outbound|80||ghost.shop.invalid-backend"),
        "no cluster for a backend that does not resolve: 500"
    );
    assert!(clusters.contains_key("outbound|80||web-v2.shop.svc.cluster.local"));
    assert_eq!(
        api.request_headers_to_add[0].header.as_ref().unwrap().key,
        "x-via"
    );
    let old = &routes[1];
    let Some(route::route::Action::Redirect(r)) = &old.action else {
        panic!("{old:?}")
    };
    assert_eq!(
        r.path_rewrite_specifier,
        Some(route::redirect_action::PathRewriteSpecifier::PrefixRewrite(
            "/new".into()
        ))
    );
    assert_eq!(
        r.response_code,
        route::redirect_action::RedirectResponseCode::Found as i32
    );
    assert_eq!(
        routes[2].r#match.as_ref().unwrap().path_specifier,
        Some(PathSpecifier::Prefix("/".into()))
    );
}

#[test]
fn a_virtual_service_for_the_same_service_is_reported_not_merged() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web-vs, namespace: shop}\nspec: {hosts: [web], http: [{match: [{uri: {prefix: /vs}}], route: [{destination: {host: web}}]}]}\n";
    let route = http_route(
        "web",
        "",
        "  parentRefs: [{name: waypoint}]\n  hostnames: [web]\n  rules: [{backendRefs: [{name: web, port: 80}]}]",
    );
    let (routes, t) = translated(&format!("{vs}---\n{route}"));
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].name, "shop.web.0", "the HTTPRoute wins");
    let problems: Vec<String> = t.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with(": VirtualService shop/web-vs: field \"spec.hosts\": service shop/web also has Gateway API routes (shop/web): they decide its HTTP routing and this VirtualService is not applied to it"),
        "{}",
        problems[0]
    );
    // `api` has no Gateway API route: its VirtualService applies as before.
    let (_, t) = translated(vs);
    assert!(t.problems.is_empty());
}

#[test]
fn status_of_routes_and_the_waypoint() {
    let mut s = snapshot(&http_route(
        "r",
        "",
        "  parentRefs: [{group: \"\", kind: Service, name: web}, {name: waypoint}]\n  rules: [{backendRefs: [{name: ghost, port: 80}]}]",
    ));
    let a = attach(&s, "cluster.local");
    let key = ("shop".to_string(), "r".to_string());
    let mut route = s.http_routes[&key].clone();
    route.other_status =
        vec![json!({"controllerName": "example.com/other", "parentRef": {"name": "x"}})];
    let st = route_status(&route, &statuses(&a, "r"), "T1");
    let parents = st["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 3, "{st}");
    assert_eq!(parents[0]["controllerName"], "example.com/other");
    assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(
        parents[1]["parentRef"],
        json!({"group": "", "kind": "Service", "name": "web"})
    );
    let conditions = &parents[1]["conditions"];
    assert_eq!(conditions[0]["type"], "Accepted");
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[0]["observedGeneration"], 3);
    assert_eq!(conditions[1]["type"], "ResolvedRefs");
    assert_eq!(conditions[1]["status"], "False");
    assert_eq!(conditions[1]["reason"], "BackendNotFound");
    assert_eq!(conditions[1]["lastTransitionTime"], "T1");

    let gw = ("shop".to_string(), "waypoint".to_string());
    let g = gateway_status(&s, &gw, 1, "T1").unwrap();
    assert_eq!(
        g["addresses"],
        json!([{"type": "IPAddress", "value": "10.96.0.9"}])
    );
    assert_eq!(g["conditions"][1]["type"], "Programmed");
    assert_eq!(g["conditions"][1]["status"], "True");
    assert_eq!(g["conditions"][1]["observedGeneration"], 2);
    assert_eq!(g["listeners"][0]["attachedRoutes"], 1);
    // No Service (no address yet): not programmed.
    s.services.remove(&gw);
    let g2 = gateway_status(&s, &gw, 1, "T2").unwrap();
    assert_eq!(g2["conditions"][1]["status"], "False");
    assert_eq!(g2["conditions"][1]["reason"], "AddressNotAssigned");
    // Transition times stay where a condition did not change.
    let kept = keep_transition_times(g2.clone(), Some(&g));
    assert_eq!(kept["conditions"][0]["lastTransitionTime"], "T1");
    assert_eq!(kept["conditions"][1]["lastTransitionTime"], "T2");
    assert_eq!(keep_transition_times(g.clone(), Some(&g)), g);
}

#[test]
fn durations() {
    let d = |s: &str| {
        let v = Value::String(s.into());
        let origin = Origin {
            file: "f".into(),
            object: "o".into(),
        };
        gateway_duration(At {
            origin: &origin,
            path: "t",
            v: &v,
        })
        .ok()
    };
    assert_eq!(d("10s"), Some(Duration::from_secs(10)));
    assert_eq!(d("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(d("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(d("0s"), Some(Duration::ZERO));
    assert_eq!(d("1.5s"), None);
    assert_eq!(d("s"), None);
    assert_eq!(d("1h1m1s1ms1h"), None);
}

#[test]
fn a_bad_edit_keeps_the_last_good_route() {
    let good = http_route(
        "r",
        "",
        "  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]",
    );
    let previous = snapshot(&good);
    let bad = parse(&format!(
        "{BASE}---\n{}",
        good.replace("port: 80}", "port: 80, weight: -3}")
    ));
    let mut now = Snapshot::build(bad.objects, bad.problems);
    assert!(now.http_routes.is_empty());
    now.keep_last_good(&previous);
    let key = ("shop".to_string(), "r".to_string());
    assert_eq!(now.http_routes[&key], previous.http_routes[&key]);
    assert_eq!(
        now.problems[0].to_string(),
        "routes.yaml: HTTPRoute shop/r: field \"spec.rules[0].backendRefs[0].weight\": -3 is not between 0 and 1000000; the last good version stays"
    );
}

#[test]
fn a_waypoint_takes_routes_of_its_own_namespace() {
    let s = snapshot(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: far, namespace: other}\nspec:\n  parentRefs: [{name: waypoint, namespace: shop}, {name: waypoint, namespace: shop, port: 15008}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n",
    );
    let a = attach(&s, "cluster.local");
    assert!(a.by_service.is_empty());
    let st = &a.statuses[&(RouteKind::Http, ("other".to_string(), "far".to_string()))];
    assert_eq!(st.len(), 2);
    for p in st {
        assert_eq!(p.accepted.as_ref().unwrap_err().0, "NotAllowedByListeners");
    }
    assert!(
        !a.attached_to_gateway
            .contains_key(&("shop".to_string(), "waypoint".to_string()))
    );
}
