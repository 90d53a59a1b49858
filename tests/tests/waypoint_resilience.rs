//! End-to-end tests of a VirtualService's resilience fields at the real waypoint (issue 9 item
//! 2), on the shared waypoint test bed: retries (Istio's default hiding a pod that fails half
//! its requests, the body replayed, a body past the retry buffer not retried and counted, the
//! per-try timeout), the route timeout, fault delay (measured) and abort, a mirror seen by its
//! target with the same body, and a CORS preflight answered at the waypoint.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use testbed::cluster::{Cluster, HTTP_PORT, HttpAnswer, sum_metric};
use testbed::waypoint_bed::*;

const VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - name: no-retry
    match: [{uri: {prefix: /noretry}}]
    route: [{destination: {host: web}}]
    retries: {attempts: 0}
  - name: delay
    match: [{uri: {prefix: /delay}}]
    route: [{destination: {host: web, subset: v1}}]
    fault: {delay: {fixedDelay: 500ms, percentage: {value: 100}}}
  - name: abort
    match: [{uri: {prefix: /abort}}]
    route: [{destination: {host: web, subset: v1}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
  - name: mirror
    match: [{uri: {prefix: /mirror}}]
    route: [{destination: {host: web, subset: v1}}]
    mirror: {host: web, subset: v2}
    mirrorPercentage: {value: 100}
  - name: cors
    match: [{uri: {prefix: /cors}}]
    route: [{destination: {host: web, subset: v1}}]
    corsPolicy:
      allowOrigins: [{exact: \"https://app.example\"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      maxAge: 600s
      unmatchedPreflights: IGNORE
  - name: slow
    match: [{uri: {prefix: /slow}}]
    route: [{destination: {host: web, subset: v1}}]
    timeout: 500ms
  - name: per-try
    match: [{uri: {prefix: /pertry}}]
    route: [{destination: {host: web}}]
    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: 5xx}
    timeout: 5s
  - name: default
    route: [{destination: {host: web}}]
";

/// One HTTP/1.1 request with a body from `client` to `web`.
async fn send(
    c: &Cluster,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    let raw = c.exchange("client", web(), &req).await.unwrap();
    HttpAnswer::parse(&raw).unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    sum_metric(text, name, &[])
}

/// What a pod's echo app has received (`GET /_seen`, straight to the pod).
async fn seen(c: &Cluster, pod: &str) -> Vec<serde_json::Value> {
    let dst = SocketAddr::new(c.pod_ip(pod), HTTP_PORT);
    let a = c
        .http_get_from("client", dst, "web", "/_seen", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    serde_json::from_slice(&a.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_faults_mirrors_cors_and_timeouts_at_the_real_waypoint() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(real_spec()).await.unwrap();
    c.write_pilot_file("vs-web.yaml", VS).unwrap();
    until_status(&c, "/abort", 503).await;
    let before = waypoint_metrics(&c).await;

    // 1. Istio's default retry policy hides a pod failing half its requests (503s): every
    // answer is a 200. Without retries (attempts: 0) the failures show.
    let flaky = "status=503&status_pod=web-v1&fail_every=2";
    let mut by_pod = std::collections::BTreeMap::new();
    for i in 0..20 {
        let (a, j) = get_web(&c, "client", &format!("/flaky/{i}?{flaky}"), &[]).await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        *by_pod
            .entry(j["pod"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    let after = waypoint_metrics(&c).await;
    let retried = metric(&after, "envoy_cluster_upstream_rq_retry_total")
        - metric(&before, "envoy_cluster_upstream_rq_retry_total");
    println!(
        "20 requests, web-v1 failing half of its own: all 200 ({by_pod:?}), {retried} retries"
    );
    assert!(retried >= 1.0, "some requests were retried: {after}");
    let mut failures = 0;
    for i in 0..20 {
        let (a, _) = get_web(&c, "client", &format!("/noretry/{i}?{flaky}"), &[]).await;
        assert!(matches!(a.status, 200 | 503), "{a:?}");
        failures += usize::from(a.status == 503);
    }
    println!("the same without retries (attempts: 0): {failures} of 20 answered 503");
    assert!(
        failures >= 1,
        "without retries the failures reach the client"
    );

    // 2. The body is replayed on the retry: web-v1 fails every request, so each request that
    // tried it first is answered by web-v2 on the second attempt, with the same body.
    let always = "status=503&status_pod=web-v1&fail_every=1";
    let mut second_attempts = 0;
    for i in 0..4 {
        let body = format!("replayed body {i}");
        let a = send(
            &c,
            "POST",
            &format!("/replay?{always}"),
            &[],
            body.as_bytes(),
        )
        .await;
        assert_eq!(a.status, 200, "{a:?}");
        let j = a.json().unwrap();
        assert_eq!(j["pod"], "web-v2", "{j}");
        assert_eq!(j["body"], body, "the body reached the app whole: {j}");
        let attempt = j["headers"]["x-envoy-attempt-count"][0]
            .as_str()
            .unwrap_or("");
        assert!(matches!(attempt, "1" | "2"), "{j}");
        second_attempts += usize::from(attempt == "2");
    }
    println!("4 POSTs with web-v1 failing all: {second_attempts} answered on the second attempt");
    assert!(second_attempts >= 1);

    // 3. A body past the retry buffer (1 MiB): sent, not retried, counted.
    let big = vec![b'x'; 1536 * 1024];
    let before = waypoint_metrics(&c).await;
    let mut statuses = vec![];
    for _ in 0..4 {
        let a = send(&c, "POST", &format!("/big?{always}"), &[], &big).await;
        if a.status == 200 {
            let j = a.json().unwrap();
            assert_eq!(j["pod"], "web-v2");
            assert_eq!(j["body"].as_str().map(str::len), Some(big.len()));
        }
        statuses.push(a.status);
    }
    let after = waypoint_metrics(&c).await;
    let abandoned = metric(&after, "envoy_cluster_retry_or_shadow_abandoned_total")
        - metric(&before, "envoy_cluster_retry_or_shadow_abandoned_total");
    println!(
        "4 POSTs of 1.5 MiB, web-v1 failing all: {statuses:?}, {abandoned} not kept for retry"
    );
    assert_eq!(abandoned, 4.0, "{after}");
    assert!(
        statuses.contains(&503),
        "the ones that hit web-v1 were not retried: {statuses:?}"
    );

    // 4. Per-try timeout: web-v1 answers after 1.5 s, past the 300 ms per try: retried on
    // web-v2. The route timeout: 504 after 500 ms.
    for i in 0..2 {
        let start = Instant::now();
        let (a, j) = get_web(
            &c,
            "client",
            &format!("/pertry/{i}?delay_ms=1500&status_pod=web-v1"),
            &[],
        )
        .await;
        assert_eq!(
            (a.status, j["pod"].as_str()),
            (200, Some("web-v2")),
            "{a:?}"
        );
        println!(
            "per-try timeout 300 ms: answered by web-v2 in {:?}",
            start.elapsed()
        );
    }
    let start = Instant::now();
    let (a, _) = get_web(&c, "client", "/slow?delay_ms=2000", &[]).await;
    assert_eq!(a.status, 504, "{a:?}");
    assert_eq!(String::from_utf8_lossy(&a.body), "upstream request timeout");
    println!("route timeout 500 ms: 504 after {:?}", start.elapsed());

    // 5. Faults: a delay of 500 ms (measured against the same request without it), an abort.
    let t = Instant::now();
    let (a, _) = get_web(&c, "client", "/plain", &[]).await;
    let plain = t.elapsed();
    assert_eq!(a.status, 200);
    let t = Instant::now();
    let (a, j) = get_web(&c, "client", "/delay", &[]).await;
    let delayed = t.elapsed();
    assert_eq!(
        (a.status, j["pod"].as_str()),
        (200, Some("web-v1")),
        "{a:?}"
    );
    println!("fault delay 500 ms: {delayed:?} (the same request without the fault: {plain:?})");
    assert!(delayed >= Duration::from_millis(500), "{delayed:?}");
    let (a, _) = get_web(&c, "client", "/abort", &[]).await;
    assert_eq!(a.status, 503);
    assert_eq!(String::from_utf8_lossy(&a.body), "fault filter abort");

    // 6. A mirror: web-v2 receives a copy with the same body (host `web-shadow`), the
    // answer comes from web-v1.
    let body = format!("mirrored {}", fastrand::u64(..));
    let a = send(&c, "POST", "/mirror/x", &[], body.as_bytes()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json().unwrap()["pod"], "web-v1");
    let start = Instant::now();
    let copy = loop {
        let s = seen(&c, "web-v2").await;
        if let Some(e) = s
            .iter()
            .find(|e| e["path"] == "/mirror/x" && e["body"] == body)
        {
            break e.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "web-v2 never saw the mirrored request: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "mirror: web-v2 saw {} {} from authority {}",
        copy["method"], copy["path"], copy["authority"]
    );
    assert_eq!(copy["method"], "POST");
    assert_eq!(copy["authority"], "web-shadow");

    // 7. CORS: an allowed preflight is answered by the waypoint (the app never sees it);
    // another origin's is answered without CORS headers (unmatchedPreflights: IGNORE).
    let c = &c;
    let pre = |origin: &'static str| async move {
        send(
            c,
            "OPTIONS",
            "/cors/preflight",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "x-token"),
            ],
            b"",
        )
        .await
    };
    let a = pre("https://app.example").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(a.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(a.header("access-control-allow-headers"), Some("x-token"));
    assert_eq!(a.header("access-control-max-age"), Some("600"));
    let a = pre("https://other.example").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("access-control-allow-origin"), None);
    assert!(
        !seen(c, "web-v1")
            .await
            .iter()
            .any(|e| e["path"] == "/cors/preflight"),
        "preflights are answered at the waypoint"
    );
    let (a, _) = get_web(
        c,
        "client",
        "/cors/get",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some("https://app.example")
    );

    let m = waypoint_metrics(c).await;
    for name in [
        "envoy_cluster_upstream_rq_retry_total",
        "envoy_cluster_upstream_rq_retry_success_total",
        "envoy_cluster_retry_or_shadow_abandoned_total",
        "waypoint_mirror_requests_total",
    ] {
        println!("{name}: {}", metric(&m, name));
    }
    assert!(metric(&m, "waypoint_mirror_requests_total") >= 1.0);
    assert!(
        m.contains("response_flags=\"FI\""),
        "the abort is flagged FI"
    );
    assert!(
        m.contains("response_flags=\"DI\""),
        "the delay is flagged DI"
    );
}
