//! End-to-end: L7 AuthorizationPolicy enforced by the real waypoint, on the test bed with pilot
//! and ztunnels. A DENY on a path answers 403 `RBAC: access denied` while other paths pass; an
//! ALLOW by principal and namespace (the HBONE peer identity the client's ztunnel presents); a
//! policy targeting one Service leaves the waypoint's other services alone; a TCP service of
//! the waypoint gets network RBAC (HTTP-only attributes said and left out, as Istio); a policy
//! for a waypoint that does not exist is reported by pilot; verdicts are counted and the access
//! log names the policy.

use std::net::SocketAddr;
use std::time::Duration;

use testbed::cluster::{Cluster, TRUST_DOMAIN, sum_metric};
use testbed::waypoint_bed::*;

const GATEWAY: &str = "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}";

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"
    )
}

/// A GET from `pod` to service `name` at `vip`:80; status and body.
async fn get(
    c: &Cluster,
    pod: &str,
    vip: std::net::Ipv4Addr,
    name: &str,
    path: &str,
) -> (u16, String) {
    let a = c
        .http_get_from(pod, SocketAddr::new(vip.into(), 80), name, path, &[])
        .await
        .unwrap();
    (a.status, String::from_utf8_lossy(&a.body).into_owned())
}

/// Poll until a GET from `pod` to `web` `path` is answered `status`.
async fn until(c: &Cluster, pod: &str, path: &str, status: u16) -> Duration {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        match c.http_get_from(pod, web(), "web", path, &[]).await {
            Ok(a) if a.status == status => return start.elapsed(),
            Ok(a) => last = format!("{} {}", a.status, String::from_utf8_lossy(&a.body)),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{path} from {pod} never answered {status}: last {last}\n--- waypoint log ---\n{}",
        std::fs::read_to_string(c.waypoint_log("waypoint-a")).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_enforces_authorization_policies() {
    if !testbed::can_run() {
        return;
    }
    // client-blue gets an identity of its own (service account `blue`).
    let mut spec = real_spec();
    for p in &mut spec.pods {
        if p.name == "client-blue" {
            p.service_account = "blue".into();
        }
    }
    let c = Cluster::start(spec).await.unwrap();
    until_routed(&c, "client", "/", &[], "web-v1").await;
    let (status, _) = get(&c, "client", WEB_VIP, "web", "/admin/panel").await;
    assert_eq!(status, 200, "no policy yet");

    // 1. A DENY on a path, bound to the waypoint: 403 with Envoy's body, other paths pass.
    c.write_pilot_file(
        "deny.yaml",
        &policy(
            "deny-admin",
            &format!(
                "{{targetRefs: [{GATEWAY}], action: DENY, rules: [{{to: [{{operation: {{paths: [/admin, \"/admin/*\"]}}}}]}}]}}"
            ),
        ),
    )
    .unwrap();
    let took = until(&c, "client", "/admin/panel", 403).await;
    eprintln!("DENY in force after {took:?}");
    let (status, body) = get(&c, "client", WEB_VIP, "web", "/admin").await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = get(&c, "client", WEB_VIP, "web", "/administrator").await;
    assert_eq!(status, 200, "not /admin nor under it");
    let (status, _) = get(&c, "client", WEB_VIP, "web", "/").await;
    assert_eq!(status, 200);
    // Bound to the waypoint: every HTTP service of it, HTTP/2 too.
    let grpc = SocketAddr::new(WEB_GRPC_VIP.into(), 80);
    let (status, body, _) = h2_request(&c, "client", grpc, "web-grpc", "/admin/x", false)
        .await
        .unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (403, "RBAC: access denied")
    );
    let (status, _, _) = h2_request(&c, "client", grpc, "web-grpc", "/ok", false)
        .await
        .unwrap();
    assert_eq!(status, 200);
    // On the waypoint's TCP service no path can be seen: the DENY rule without its path
    // denies every connection there (Istio's fail-closed translation for TCP), and pilot says
    // so. The connection is refused at the waypoint (network RBAC), the app never sees it.
    let p = until_problem(&c, "paths is HTTP only: not checked on TCP port 80").await;
    assert!(p.contains("AuthorizationPolicy demo/deny-admin"), "{p}");
    let tcp = SocketAddr::new(WEB_TCP_VIP.into(), 80);
    let start = std::time::Instant::now();
    loop {
        let answer = c
            .exchange("client", tcp, b"let me in")
            .await
            .unwrap_or_default();
        if answer.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "TCP still answered: {:?}",
            String::from_utf8_lossy(&answer)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 2. A policy on one Service: only that service's requests are affected.
    c.write_pilot_file(
        "web-only.yaml",
        &policy(
            "web-only",
            "{targetRefs: [{kind: Service, name: web}], action: DENY, rules: [{to: [{operation: {paths: [/only-this]}}]}]}",
        ),
    )
    .unwrap();
    until(&c, "client", "/only-this", 403).await;
    let (status, _) = get(&c, "client", WEB_NONE_VIP, "web-none", "/only-this").await;
    assert_eq!(
        status, 200,
        "web-none is bound to the same waypoint, not targeted"
    );

    // 3. ALLOW by principal and by namespace on `web`: once an ALLOW applies, whatever no rule
    // allows is denied.
    c.write_pilot_file(
        "allow.yaml",
        &policy(
            "allow-web",
            &format!(
                "{{targetRefs: [{{kind: Service, name: web}}], rules: [{{from: [{{source: {{principals: [{TRUST_DOMAIN}/ns/demo/sa/blue]}}}}]}}, {{from: [{{source: {{namespaces: [demo]}}}}], to: [{{operation: {{paths: [\"/ns/*\"]}}}}]}}]}}"
            ),
        ),
    )
    .unwrap();
    until(&c, "client", "/x", 403).await;
    let (status, _) = get(&c, "client-blue", WEB_VIP, "web", "/x").await;
    assert_eq!(status, 200, "the blue principal is allowed everything");
    let (status, _) = get(&c, "client", WEB_VIP, "web", "/ns/x").await;
    assert_eq!(status, 200, "namespace demo is allowed /ns/*");
    let (status, _) = get(&c, "client-blue", WEB_VIP, "web", "/admin").await;
    assert_eq!(status, 403, "DENY before ALLOW");
    let (status, _) = get(&c, "client", WEB_NONE_VIP, "web-none", "/only-this").await;
    assert_eq!(status, 200, "the ALLOW targets web only");

    // 4. Counted by policy, and the access log names the policy that denied.
    let metrics = waypoint_metrics(&c).await;
    let denied = |policy: &str| {
        sum_metric(
            &metrics,
            "waypoint_rbac_decisions_total",
            &[("policy", policy), ("decision", "denied")],
        )
    };
    assert!(
        denied("ns[demo]-policy[deny-admin]-rule[0]") >= 3.0,
        "{metrics}"
    );
    assert!(
        denied("ns[demo]-policy[web-only]-rule[0]") >= 1.0,
        "{metrics}"
    );
    assert!(
        sum_metric(
            &metrics,
            "waypoint_rbac_decisions_total",
            &[
                ("policy", "ns[demo]-policy[allow-web]-rule[0]"),
                ("decision", "allowed")
            ],
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        sum_metric(
            &metrics,
            "istio_requests_total",
            &[("response_code", "403"), ("reporter", "waypoint")],
        ) >= 5.0,
        "{metrics}"
    );
    let log = waypoint_log_with(
        &c,
        &[
            "rbac_access_denied_matched_policy[ns[demo]-policy[deny-admin]-rule[0]]",
            "rbac_access_denied_matched_policy[none]",
        ],
    )
    .await;
    assert!(
        log.contains("rbac_access_denied_matched_policy[ns[demo]-policy[deny-admin]-rule[0]]"),
        "{log}"
    );
    assert!(
        log.contains("rbac_access_denied_matched_policy[none]"),
        "an ALLOW that nothing matched: {log}"
    );

    // 5. Removing the ALLOW restores access; a policy for a waypoint that does not exist is
    // reported and enforced nowhere.
    c.write_pilot_file("allow.yaml", "").unwrap();
    until(&c, "client", "/x", 200).await;
    c.write_pilot_file(
        "nowhere.yaml",
        &policy(
            "nowhere",
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: nope}], action: DENY, rules: [{}]}",
        ),
    )
    .unwrap();
    let p = until_problem(&c, "no waypoint Gateway demo/nope").await;
    assert!(p.contains("AuthorizationPolicy demo/nowhere"), "{p}");
    let (status, _) = get(&c, "client", WEB_VIP, "web", "/x").await;
    assert_eq!(status, 200);
}
