//! End-to-end tests of DestinationRule traffic policy at the real waypoint, on the shared test
//! bed: consistent hashing on a header and on Envoy's generated cookie (the same key keeps its
//! pod), a connection pool of one connection and one pending request overflowing into Envoy's
//! 503 `UO`, and outlier detection ejecting the pod that answers 500s (traffic then avoids it,
//! the admin page and the metrics show the ejection).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use testbed::cluster::Cluster;
use testbed::waypoint_bed::*;

const WEB_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - name: sticky
    labels: {app: web}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  - name: cookie
    labels: {app: web}
    trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: backend, path: /, ttl: 60s}, maglev: {tableSize: 1009}}}}
  - name: small
    labels: {app: web}
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}
";

const WEB_VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - match: [{headers: {x-case: {exact: sticky}}}]
    route: [{destination: {host: web, subset: sticky}}]
  - match: [{headers: {x-case: {exact: cookie}}}]
    route: [{destination: {host: web, subset: cookie}}]
  - match: [{headers: {x-case: {exact: small}}}]
    route: [{destination: {host: web, subset: small}}]
  - route: [{destination: {host: web}}]
";

const WEB_CLUSTER: &str = "inbound-vip|80|http|web.demo.svc.cluster.local";
const SMALL_CLUSTER: &str = "inbound-vip|80|http/small|web.demo.svc.cluster.local";

fn header<'a>(a: &'a testbed::cluster::HttpAnswer, name: &str) -> Option<&'a str> {
    a.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn waypoint_log(c: &Cluster) -> String {
    std::fs::read_to_string(c.waypoint_log("waypoint-a")).unwrap_or_default()
}

/// Poll until the cookie route answers with a generated cookie: the DestinationRule and the
/// VirtualService are both at the waypoint.
async fn until_configured(c: &Cluster) -> Duration {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        match c
            .http_get_from("client", web(), "web", "/", &[("x-case", "cookie")])
            .await
        {
            Ok(a) if header(&a, "set-cookie").is_some() => return start.elapsed(),
            Ok(a) => last = format!("{} {:?}", a.status, a.headers),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the traffic policy never arrived: last {last}\n--- waypoint log ---\n{}",
        waypoint_log(c)
    );
}

async fn pod_of(c: &Cluster, path: &str, headers: &[(&str, &str)]) -> String {
    let (a, j) = get_web(c, "client", path, headers).await;
    assert_eq!(a.status, 200, "{a:?}");
    j["pod"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn hashing_pool_overflow_and_outlier_ejection_at_the_real_waypoint() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(real_spec_with(false)).await.unwrap();
    c.write_pilot_file("dr-web.yaml", WEB_DR).unwrap();
    c.write_pilot_file("vs-web.yaml", WEB_VS).unwrap();
    let took = until_configured(&c).await;
    eprintln!("traffic policy in force after {took:?}");

    // 1. Header hash: each user keeps one pod; users spread over both.
    let mut pods = std::collections::BTreeSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
        "mallory", "oscar",
    ] {
        let first = pod_of(&c, "/", &[("x-case", "sticky"), ("x-user", user)]).await;
        for _ in 0..4 {
            assert_eq!(
                pod_of(&c, "/", &[("x-case", "sticky"), ("x-user", user)]).await,
                first,
                "{user} moved"
            );
        }
        pods.insert(first);
    }
    assert_eq!(pods.len(), 2, "12 users all on one pod: {pods:?}");

    // 2. Cookie hash (Maglev): the waypoint sets Envoy's cookie; sent back, it keeps the pod.
    let a = c
        .http_get_from("client", web(), "web", "/", &[("x-case", "cookie")])
        .await
        .unwrap();
    let set = header(&a, "set-cookie").unwrap().to_string();
    assert!(set.starts_with("backend=\""), "{set}");
    assert!(set.ends_with("; Max-Age=60; Path=/; HttpOnly"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let first = pod_of(&c, "/", &[("x-case", "cookie"), ("cookie", &cookie)]).await;
    for _ in 0..8 {
        let (a, j) = get_web(
            &c,
            "client",
            "/",
            &[("x-case", "cookie"), ("cookie", &cookie)],
        )
        .await;
        assert_eq!(j["pod"], first.as_str());
        assert!(
            header(&a, "set-cookie").is_none(),
            "no new cookie when one is sent"
        );
    }

    // 3. Pool of one connection and one pending request: of six slow requests at once, the
    //    first is served, the second waits for its connection, the rest overflow (503 UO).
    let slow = "/slow?delay_ms=1500";
    let h = [("x-case", "small")];
    let get = || c.http_get_from("client", web(), "web", slow, &h);
    let (r1, r2, r3, r4, r5, r6) = tokio::join!(get(), get(), get(), get(), get(), get());
    let answers: Vec<_> = [r1, r2, r3, r4, r5, r6]
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let overflow: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    eprintln!("pool of 1+1: {ok} served, {} overflowed", overflow.len());
    assert!(ok >= 1, "{answers:?}");
    assert!(overflow.len() >= 3, "{answers:?}");
    assert_eq!(ok + overflow.len(), 6, "{answers:?}");
    for a in &overflow {
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
        assert_eq!(header(a, "x-envoy-overloaded"), Some("true"));
    }
    let log = waypoint_log_with(&c, &["\"response_flags\":\"UO\""]).await;
    assert!(log.contains("\"response_flags\":\"UO\""), "{log}");
    let metrics = waypoint_metrics(&c).await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("envoy_cluster_upstream_rq_pending_overflow_total{")
                && l.contains(SMALL_CLUSTER)
        })
        .unwrap_or_else(|| panic!("no overflow count for {SMALL_CLUSTER}:\n{metrics}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= overflow.len() as f64, "{line}");
    assert!(metrics.contains("response_flags=\"UO\""), "{metrics}");

    // 4. Outlier detection: web-v2 answers 500; after three in a row it is ejected and every
    //    request goes to web-v1.
    let failing = "/x?status=500&status_pod=web-v2";
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (a, _) = get_web(&c, "client", failing, &[]).await;
        statuses.push(a.status);
    }
    eprintln!("before and during ejection: {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        3,
        "{statuses:?}"
    );
    for _ in 0..20 {
        let (a, j) = get_web(&c, "client", failing, &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(j["pod"], "web-v1");
    }
    let (status, clusters) = c
        .pod_http_get("waypoint-a", 15000, "/clusters")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let web = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == WEB_CLUSTER)
        .unwrap();
    let v2 = c.pod_addresses("web-v2")[0].to_string();
    let ejected: Vec<(String, bool)> = web["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["ejected"].as_bool().unwrap(),
            )
        })
        .collect();
    for (address, e) in &ejected {
        assert_eq!(*e, address.starts_with(&format!("{v2}:")), "{ejected:?}");
    }
    let metrics = waypoint_metrics(&c).await;
    assert!(
        metrics.contains(&format!(
            "envoy_cluster_outlier_detection_ejections_active{{cluster_name=\"{WEB_CLUSTER}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx_total{{cluster_name=\"{WEB_CLUSTER}\"}} 1"
    )));

    // 5. A push that keeps the endpoints (a VirtualService edit) keeps the ejection.
    let edited = WEB_VS.replace(
        "  http:\n",
        "  http:\n  - match: [{uri: {exact: /never}}]\n    directResponse: {status: 204}\n",
    );
    c.write_pilot_file("vs-web.yaml", &edited).unwrap();
    until_status(&c, "/never", 204).await;
    for _ in 0..6 {
        let (_, j) = get_web(&c, "client", failing, &[]).await;
        assert_eq!(j["pod"], "web-v1", "the ejection survives the push");
    }
}

/// Connection-pool limits the waypoint applies to its upstream HTTP connections, seen from the
/// pod: `once` (maxRequestsPerConnection: 1) gives every request a connection of its own;
/// `idle` (idleTimeout: 1s, a TCP keepalive) reuses one connection, closed after a second
/// without requests.
const POOL_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  subsets:
  - name: once
    labels: {version: v1}
    trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 1}}}
  - name: idle
    labels: {version: v1}
    trafficPolicy:
      connectionPool:
        tcp: {tcpKeepalive: {time: 30s, interval: 5s, probes: 4}}
        http: {idleTimeout: 1s}
";

const POOL_VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - match: [{headers: {x-case: {exact: once}}}]
    headers: {response: {set: {x-subset: once}}}
    route: [{destination: {host: web, subset: once}}]
  - match: [{headers: {x-case: {exact: idle}}}]
    headers: {response: {set: {x-subset: idle}}}
    route: [{destination: {host: web, subset: idle}}]
  - route: [{destination: {host: web}}]
";

const ONCE_CLUSTER: &str = "inbound-vip|80|http/once|web.demo.svc.cluster.local";
const IDLE_CLUSTER: &str = "inbound-vip|80|http/idle|web.demo.svc.cluster.local";

/// The peers of the connections open to `pod`'s HTTP app (the asking one left out).
async fn open_connections(c: &Cluster, pod: &str) -> Vec<String> {
    let (status, body) = c
        .pod_http_get(pod, testbed::cluster::HTTP_PORT, "/_open")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The `peer` the app saw for one request through the waypoint with `x-case: case`.
async fn peer_of(c: &Cluster, case: &str) -> String {
    let (a, j) = get_web(c, "client", "/", &[("x-case", case)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(header(&a, "x-subset"), Some(case), "{a:?}");
    assert_eq!(j["pod"], "web-v1");
    j["peer"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_pool_limits_at_the_real_waypoint() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(real_spec_with(false)).await.unwrap();
    c.write_pilot_file("dr-web.yaml", POOL_DR).unwrap();
    c.write_pilot_file("vs-web.yaml", POOL_VS).unwrap();
    // Both subsets' routes and clusters at the waypoint.
    let start = std::time::Instant::now();
    loop {
        let mut ready = true;
        for case in ["once", "idle"] {
            let a = c
                .http_get_from("client", web(), "web", "/", &[("x-case", case)])
                .await;
            ready &= a.is_ok_and(|a| a.status == 200 && header(&a, "x-subset") == Some(case));
        }
        if ready {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the subsets never arrived\n--- waypoint log ---\n{}",
            waypoint_log(&c)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The limits in force, on the admin page.
    let (status, clusters) = c
        .pod_http_get("waypoint-a", 15000, "/clusters")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let pool_of = |name: &str| {
        clusters["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name}: {clusters}"))["connection_pool"]
            .clone()
    };
    assert_eq!(pool_of(ONCE_CLUSTER)["max_requests_per_connection"], 1);
    let idle = pool_of(IDLE_CLUSTER);
    assert_eq!(idle["idle_timeout"], "1s", "{idle}");
    assert_eq!(
        idle["tcp_keepalive"],
        serde_json::json!({"keepalive_probes": 4, "keepalive_time": "30s", "keepalive_interval": "5s"})
    );

    // 1. maxRequestsPerConnection: 1: a connection per request.
    let mut once = Vec::new();
    for _ in 0..4 {
        once.push(peer_of(&c, "once").await);
    }
    let distinct: std::collections::BTreeSet<_> = once.iter().collect();
    assert_eq!(distinct.len(), 4, "{once:?}");

    // 2. The idle subset keeps its connection between requests...
    let first = peer_of(&c, "idle").await;
    for _ in 0..3 {
        assert_eq!(peer_of(&c, "idle").await, first);
    }
    let open = open_connections(&c, "web-v1").await;
    assert!(open.contains(&first), "{first} not open: {open:?}");
    // ...and closes it after a second without requests; the retired ones are closed too.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let open = open_connections(&c, "web-v1").await;
    assert!(!open.contains(&first), "{first} still open: {open:?}");
    for p in &once {
        assert!(!open.contains(p), "retired {p} still open: {open:?}");
    }
    assert_ne!(peer_of(&c, "idle").await, first);

    // 3. tcp.idleTimeout on a TCP port (on the tcp_proxy, as Istio): a quiet connection through
    // the waypoint is closed after it (Envoy's 1 h before the rule arrives).
    c.write_pilot_file("dr-web-tcp-idle.yaml", TCP_IDLE_DR)
        .unwrap();
    let tcp = SocketAddr::new(WEB_TCP_VIP.into(), 80);
    let start = std::time::Instant::now();
    let mut first = true;
    loop {
        let mut s = c.connect_from("client", tcp).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let opened = std::time::Instant::now();
        let mut got = Vec::new();
        if std::mem::take(&mut first) {
            // The bed's first TCP connection through the waypoint: its bytes are counted while
            // it is open.
            let mut buf = [0u8; 256];
            while !String::from_utf8_lossy(&got).ends_with("hello") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the echo");
                got.extend_from_slice(&buf[..n]);
            }
            let m = waypoint_metrics(&c).await;
            let web_tcp = [("destination_service_name", "web-tcp")];
            let sent = testbed::cluster::sum_metric(&m, "istio_tcp_sent_bytes_total", &web_tcp);
            let closed =
                testbed::cluster::sum_metric(&m, "istio_tcp_connections_closed_total", &web_tcp);
            assert!(sent >= 5.0 && closed == 0.0, "sent {sent}, closed {closed}");
        }
        let closed = tokio::time::timeout(Duration::from_secs(4), async {
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .is_ok();
        if closed {
            let text = String::from_utf8_lossy(&got);
            assert!(text.ends_with("hello"), "echoed before the close: {text}");
            println!("quiet TCP connection closed after {:?}", opened.elapsed());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a quiet TCP connection was never closed\n--- waypoint log ---\n{}",
            waypoint_log(&c)
        );
    }
}

const TCP_IDLE_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-tcp-idle, namespace: demo}
spec:
  host: web-tcp
  trafficPolicy: {connectionPool: {tcp: {idleTimeout: 1s}}}
";
