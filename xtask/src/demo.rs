//! `cargo xtask demo`: brings up a small mesh on this machine and checks, with a readable
//! report, that it does what the product promises.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testbed::cluster::{Cluster, ClusterSpec, ControlPlaneMode, HttpAnswer, PodDef, sum_metric};

/// The example app pilot serves: `deploy/examples/bookinfo`, as a user would `kubectl apply` it.
const EXAMPLE: &str = "deploy/examples/bookinfo";
/// reviews' VirtualServices, each written in turn into pilot's folder as [`VS_FILE`].
const ROUTES: &str = "deploy/examples/reviews-routing";
/// The file in pilot's folder holding reviews' current VirtualService.
pub const VS_FILE: &str = "reviews-virtualservice.yaml";
/// The port every bookinfo container serves HTTP on (the pods' echo app answers with JSON
/// naming the pod and the request it received), and details' debug port (TCP, denied from
/// outside the namespace by the example's policy).
const APP_PORT: u16 = 9080;
const DEBUG_PORT: u16 = 9999;
/// A TCP echo port every pod serves: its greeting names the pod and the peer it saw. The L4
/// checks use it (policies apply to every port).
const TCP_PORT: u16 = testbed::cluster::ECHO_PORT;
/// `reviews.bookinfo`'s ClusterIP and ports: HTTP (targetPort `http`, the pods' 9080) and TCP.
const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 10, 3);
/// Its IPv6 ClusterIP (the service is dual-stack, like the pods).
const REVIEWS_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0x10, 0x3);
const REVIEWS_PORT: u16 = 9080;
const REVIEWS_TCP_PORT: u16 = 9090;
/// `ratings.bookinfo`'s ClusterIP (port 9080), bound to the waypoint like reviews.
const RATINGS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 10, 4);
/// The waypoint pod of the example (Gateway `bookinfo/waypoint`).
const WAYPOINT_POD: &str = "waypoint-7c9f4";
/// How long a change may take to show before its check fails.
const CHANGE_LIMIT: Duration = Duration::from_secs(5);

/// The pod the demo adds to the mesh while it runs: in the test bed from the start, in pilot's
/// folder only when the demo writes this object (a second reviews v2).
const NEW_POD: &str = "reviews-v2-6a3c1";
const NEW_POD_UID: &str = "0b6f2a10-0000-4000-8000-000000000009";

/// Written into pilot's folder while the mesh runs: the live change the demo times.
const DENY_POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-not-from-productpage, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: details}}
  action: DENY
  rules:
  - from:
    - source: {principals: [\"cluster.local/ns/bookinfo/sa/bookinfo-productpage\"]}
";

/// Written into pilot's folder by the L7 authorization check: policies the waypoint enforces
/// (`targetRefs` to the Service bound to it), a DENY on a path and an ALLOW by caller.
const WAYPOINT_POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-no-admin, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, name: ratings}]
  action: DENY
  rules:
  - to: [{operation: {paths: [\"/ratings/admin\", \"/ratings/admin/*\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-callers, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, name: ratings}]
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/bookinfo/sa/bookinfo-reviews\"]}}]
";

struct Report {
    rows: Vec<(bool, String, String)>,
}

impl Report {
    fn check(&mut self, name: &str, result: anyhow::Result<String>) {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        println!(
            "[{}] {name}\n       {}",
            if ok { "PASS" } else { "FAIL" },
            detail.replace('\n', "\n       ")
        );
        self.rows.push((ok, name.into(), detail));
    }
}

pub async fn run(bin: PathBuf, keep: bool) -> anyhow::Result<()> {
    testbed::Testbed::check_privileges()?;
    if let Some(state) = crate::kept_mesh::State::load_running()? {
        bail!(
            "a demo mesh is already running (pid {}, test bed {}): `cargo xtask down` first",
            state.pid,
            state.prefix
        );
    }
    // SAFETY: set before any thread of ours reads the environment for it.
    unsafe { std::env::set_var("ZTUNNEL_BIN", &bin) };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join(EXAMPLE);
    let example = example
        .canonicalize()
        .with_context(|| example.display().to_string())?;
    let routes = root.join(ROUTES);
    let routes = routes
        .canonicalize()
        .with_context(|| routes.display().to_string())?;
    let mut pods = PodDef::from_folder(&example)?;
    pods.push(PodDef {
        namespace: "bookinfo".into(),
        service_account: "bookinfo-reviews".into(),
        uid: Some(NEW_POD_UID.into()),
        ..PodDef::new(NEW_POD, "reviews", 1, true)
    });
    let spec = ClusterSpec {
        control_plane: ControlPlaneMode::Pilot,
        nodes: 2,
        pods,
        pilot_folder: Some(example.clone()),
        app_ports: vec![DEBUG_PORT],
        http_ports: vec![APP_PORT],
        start_waypoints: true,
        ..Default::default()
    };
    let started = Instant::now();
    let c = Cluster::start(spec).await?;
    println!(
        "
Mesh up in {:.1}s: {} nodes, pilot on node1 (xDS + CA over TLS on {}), one ztunnel per node ({}), capture with eBPF (cgroup connect4/sock_ops on kubepods.slice, sk_lookup per mesh pod), the waypoint {WAYPOINT_POD} (L7 proxy, {})",
        started.elapsed().as_secs_f64(),
        c.spec.nodes,
        c.pilot_addr(),
        bin.display(),
        testbed::cluster::waypoint_binary()?.display()
    );
    println!(
        "  pilot serves a copy of {} (Namespaces, Pods, Services, AuthorizationPolicies, DestinationRule, Gateway) from {}",
        example.display(),
        c.pilot_config().display()
    );
    for (i, node) in c.bed.nodes.iter().enumerate() {
        println!(
            "  {} (underlay {}, {})",
            node.name, node.underlay_ip, node.underlay_ip6
        );
        for def in c.spec.pods.iter().filter(|p| p.node == i) {
            let pod = c.bed.pod(&def.name);
            let what = if def.name == NEW_POD {
                "not in pilot's folder yet".into()
            } else if def.gateway().is_some() {
                format!(
                    "waypoint of bookinfo (not captured, speaks HBONE itself), {}",
                    c.identity(&def.name)
                )
            } else if def.mesh {
                format!("mesh, {}", c.identity(&def.name))
            } else {
                "outside the mesh (istio.io/dataplane-mode: none)".into()
            };
            println!("    {:<20} {:<12} {:<18} {what}", def.name, pod.ip, pod.ip6);
        }
    }
    println!(
        "  every pod but the waypoint runs an HTTP echo app on :{APP_PORT} (answers JSON naming the pod and the request it got) and TCP echo apps on :{TCP_PORT} and :{DEBUG_PORT} (greeting naming the pod and the peer it saw)"
    );
    println!(
        "  service reviews.bookinfo {REVIEWS_VIP}:{REVIEWS_PORT} (http) and :{REVIEWS_TCP_PORT} (tcp) and ratings.bookinfo {RATINGS_VIP}:{APP_PORT} (http) are bound to the waypoint (istio.io/use-waypoint: waypoint)"
    );
    println!(
        "  live change: {NEW_POD}.yaml (a Pod app: reviews, version: v2) is added to pilot's folder while the mesh runs"
    );
    println!(
        "  live change: deny.yaml (AuthorizationPolicy bookinfo/details-not-from-productpage) is added while the mesh runs"
    );
    println!(
        "  live change: reviews' VirtualServices from {} are written in turn as {VS_FILE}\n",
        routes.display()
    );

    let mut report = Report { rows: vec![] };
    let mut capture = Some(c.bed.capture(0)?);
    let marker = b"DEMO-SECRET-PAYLOAD";

    report.check(
        "(a) pod -> pod across nodes, payload intact",
        cross_node(&c, marker).await,
    );
    report.check(
        "(a) pod -> service VIP through the waypoint, balanced over endpoints",
        via_vip(&c).await,
    );
    report.check(
        "(a) pod -> pod and service over IPv6",
        over_ipv6(&c, marker).await,
    );
    let link = capture.take().map(|cap| cap.stop());
    report.check(
        "(b) the server-side ztunnel saw the client's identity",
        identity_seen(&c).await,
    );
    report.check(
        "(c) only TLS on port 15008 crossed between the nodes",
        match link {
            Some(r) => {
                let flows = r.tcp_ports().len();
                r.tls_only_on_ports(&[15008, 15012])
                    .map_err(anyhow::Error::msg)
                    .and_then(|()| {
                        if r.contains(marker) {
                            bail!("the payload marker was seen in clear on the link")
                        }
                        Ok(format!(
                            "{} packets captured on node1's link ({flows} port pairs), all to/from 15008 (HBONE) or 15012 (pilot), each flow opening with TLS records; payload marker not seen in clear",
                            r.packets().len()
                        ))
                    })
            }
            None => Err(anyhow::anyhow!("no capture")),
        },
    );
    report.check(
        "(d) the example's ALLOW policy: ratings through its waypoint, or from reviews",
        ratings_from_reviews(&c).await,
    );
    report.check(
        "(d) the example's DENY policy: details' debug port is closed to other namespaces",
        debug_port(&c).await,
    );
    report.check(
        "(d) live change: a DENY policy file added to pilot's folder takes effect",
        live_deny(&c).await,
    );
    report.check(
        "(d) live change: a pod added to the service starts receiving traffic",
        live_endpoint(&c).await,
    );
    report.check(
        "(e) pod outside the mesh -> mesh pod through 15006",
        outsider(&c).await,
    );
    report.check(
        "(f) capture is eBPF only: no iptables or nftables rule in any pod",
        no_rules(&c).await,
    );
    report.check(
        "(g) the app sees the client's IP as its peer (source address preserved)",
        app_sees_client(&c).await,
    );
    report.check(
        "(h) a mesh pod resolves a service's name through ztunnel's DNS proxy",
        dns(&c).await,
    );
    report.check(
        "(i) VirtualService: all reviews traffic to v1",
        all_to_v1(&c, &routes).await,
    );
    report.check(
        "(i) VirtualService: header end-user: jason to v2",
        jason_to_v2(&c, &routes).await,
    );
    report.check(
        "(i) VirtualService: weights 50/50 to v1 and v3",
        split_v1_v3(&c, &routes).await,
    );
    report.check(
        "(i) VirtualService: exact /status to v1, prefix /headers to v2 with an authority rewrite, /delay answered 503",
        by_path(&c, &routes).await,
    );
    report.check(
        "(o) fault injection: /delay held 1 s by the waypoint (measured), then aborted 503",
        delay_fault(&c).await,
    );
    report.check(
        "(i) VirtualService: sourceLabels app: productpage to v2",
        by_source(&c, &routes).await,
    );
    report.check(
        "(i) a TCP port of a bound service passes through the waypoint",
        tcp_through_waypoint(&c).await,
    );
    report.check(
        "(j) L7 AuthorizationPolicy at the waypoint: a DENY on a path answers 403, other paths pass; an ALLOW governs productpage -> ratings",
        waypoint_authz(&c).await,
    );
    report.check(
        "(k) retries: Istio's default retry policy hides a pod failing half of its requests",
        retry_hides_flaky_pod(&c, &routes).await,
    );
    report.check(
        "(l) mirroring: the mirror target sees a copy of the request with the same body",
        mirror_with_body(&c).await,
    );
    // After the retry and mirror checks: the outlier check ejects reviews-v1, which they need.
    report.check(
        "(m) DestinationRule outlier detection: a pod answering 500s is ejected, traffic avoids it",
        outlier_ejection(&c).await,
    );
    report.check(
        "(n) DestinationRule connection pool: overflow answered 503 UO",
        pool_overflow(&c).await,
    );

    let failed = report.rows.iter().filter(|r| !r.0).count();
    println!(
        "\n{} of {} checks passed. Logs (ztunnels, pilot, waypoint): {}",
        report.rows.len() - failed,
        report.rows.len(),
        c.dir.display()
    );
    if failed > 0 {
        let mut logs: Vec<(String, PathBuf)> = (0..c.spec.nodes)
            .map(|n| (format!("ztunnel {}", c.bed.node(n).name), c.ztunnel_log(n)))
            .collect();
        logs.push(("pilot".into(), c.pilot_log()));
        logs.push((
            format!("waypoint {WAYPOINT_POD}"),
            c.waypoint_log(WAYPOINT_POD),
        ));
        for (what, path) in logs {
            let log = std::fs::read_to_string(path).unwrap_or_default();
            println!("\n--- {what} log (last lines) ---");
            let lines: Vec<&str> = log.lines().collect();
            for line in &lines[lines.len().saturating_sub(20)..] {
                println!("{line}");
            }
        }
    }
    if keep {
        crate::kept_mesh::keep(&c, &routes).await?;
    }
    if failed > 0 {
        bail!("{failed} demo check(s) failed");
    }
    Ok(())
}

fn split(answer: &[u8]) -> (String, &[u8]) {
    match answer.iter().position(|&b| b == b'\n') {
        Some(nl) => (
            String::from_utf8_lossy(&answer[..nl]).into(),
            &answer[nl + 1..],
        ),
        None => (String::new(), answer),
    }
}

/// The pod that answered, from the app's greeting (`pod=<name> port=… peer=…`).
fn answered_by(answer: &[u8]) -> String {
    let (greeting, _) = split(answer);
    greeting
        .split_whitespace()
        .next()
        .map(|p| p.trim_start_matches("pod=").to_string())
        .unwrap_or_default()
}

/// The full name of the pod whose name starts with `prefix` (`reviews-v1` -> `reviews-v1-5b8c4`).
fn pod<'a>(c: &'a Cluster, prefix: &'a str) -> &'a str {
    c.spec
        .pods
        .iter()
        .find(|p| p.name.starts_with(prefix))
        .map(|p| p.name.as_str())
        .unwrap_or(prefix)
}

/// The peer address in a TCP echo greeting (`pod=… port=… peer=<addr>`).
fn greeting_peer(greeting: &str) -> Option<SocketAddr> {
    greeting.split_once("peer=")?.1.trim().parse().ok()
}

/// One HTTP GET from `from` to `dst` (Host `host`), and what the echo app said: the status,
/// the answering pod (empty when the answer is not the app's JSON) and the JSON (`null` then).
async fn get(
    c: &Cluster,
    from: &str,
    dst: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String, serde_json::Value, HttpAnswer)> {
    let answer = c.http_get_from(from, dst, host, path, headers).await?;
    let json = answer.json().unwrap_or(serde_json::Value::Null);
    let pod = json["pod"].as_str().unwrap_or_default().to_string();
    Ok((answer.status, pod, json, answer))
}

/// GET `path` on reviews' VIP from `from`; the pod that answered (an error unless 200).
async fn reviews(
    c: &Cluster,
    from: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<String> {
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let (status, pod, _, answer) = get(c, from, dst, "reviews:9080", path, headers).await?;
    if status != 200 || pod.is_empty() {
        bail!(
            "GET {path} to reviews answered {status} {:?}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    Ok(pod)
}

/// `n` GETs to reviews from `from`; the answering pods, in order.
async fn reviews_n(
    c: &Cluster,
    from: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> anyhow::Result<Vec<String>> {
    let mut pods = Vec::with_capacity(n);
    for _ in 0..n {
        pods.push(reviews(c, from, "/", headers).await?);
    }
    Ok(pods)
}

/// How many times each pod answered, as `name ×n, …`.
fn tally(pods: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for p in pods {
        *counts.entry(p.as_str()).or_insert(0) += 1;
    }
    counts
        .iter()
        .map(|(p, n)| format!("{p} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn cross_node(c: &Cluster, marker: &[u8]) -> anyhow::Result<String> {
    let (from, to) = (pod(c, "productpage"), pod(c, "reviews-v1"));
    let dst = SocketAddr::new(c.pod_ip(to), TCP_PORT);
    let mut payload = marker.to_vec();
    payload.extend((0..64 * 1024).map(|i| (i % 251) as u8));
    let answer = c.exchange(from, dst, &payload).await?;
    let (greeting, echoed) = split(&answer);
    if echoed != payload.as_slice() {
        bail!(
            "echo differs: sent {} bytes, got {} back ({greeting})",
            payload.len(),
            echoed.len()
        );
    }
    Ok(format!(
        "{from} (node1) -> {dst} ({to}, node2): {} bytes sent and echoed back intact; app said \"{greeting}\"",
        payload.len()
    ))
}

/// Through reviews' VIP, before any VirtualService: the waypoint balances over all endpoints,
/// and the app sees the request come from the waypoint pod.
async fn via_vip(c: &Cluster) -> anyhow::Result<String> {
    let vip = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let page = pod(c, "productpage");
    let mut reached = vec![];
    let mut peers = std::collections::BTreeSet::new();
    for i in 0..6 {
        let path = format!("/request-{i}");
        let (status, answered, json, _) = get(c, page, vip, "reviews:9080", &path, &[]).await?;
        if status != 200 || json["path"] != path.as_str() {
            bail!("request {i} through the VIP: {status} {json}");
        }
        reached.push(answered);
        peers.insert(json["peer"].as_str().unwrap_or_default().to_string());
    }
    let distinct: std::collections::BTreeSet<&String> = reached.iter().collect();
    if distinct.len() < 2 {
        bail!("6 requests to {vip} all went to {distinct:?}");
    }
    let waypoint = c.pod_ip(WAYPOINT_POD);
    if !peers
        .iter()
        .all(|p| p.parse::<SocketAddr>().is_ok_and(|a| a.ip() == waypoint))
    {
        bail!("the apps saw peers {peers:?}, not the waypoint {waypoint}");
    }
    Ok(format!(
        "6 HTTP requests from {page} to reviews.bookinfo ({vip}) went through the waypoint ({WAYPOINT_POD}, {waypoint}: the apps saw it as their peer) and were answered by {}",
        tally(&reached)
    ))
}

/// The same paths over IPv6: the pods' IPv6 addresses and the service's IPv6 ClusterIP.
async fn over_ipv6(c: &Cluster, marker: &[u8]) -> anyhow::Result<String> {
    let (from, to) = (pod(c, "productpage"), pod(c, "reviews-v1"));
    let dst = SocketAddr::new(c.pod_ip6(to), TCP_PORT);
    let answer = c.exchange(from, dst, marker).await?;
    let (greeting, echoed) = split(&answer);
    if echoed != marker || answered_by(&answer) != to {
        bail!("{dst} answered {:?}", String::from_utf8_lossy(&answer));
    }
    let vip = SocketAddr::new(REVIEWS_VIP6.into(), REVIEWS_PORT);
    let (status, answered, json, _) = get(c, from, vip, "reviews:9080", "/v6", &[]).await?;
    if status != 200 || !answered.starts_with("reviews-") {
        bail!("{vip} answered {status} {json}");
    }
    Ok(format!(
        "{from} -> {dst}: app said \"{greeting}\"; {from} -> {vip} (through the waypoint): HTTP {status} from {answered}"
    ))
}

async fn identity_seen(c: &Cluster) -> anyhow::Result<String> {
    let id = c.identity(pod(c, "productpage")).to_string();
    let n = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &id),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .await?;
    if n < 1.0 {
        bail!("node2's ztunnel reports no mTLS connection from {id}");
    }
    Ok(format!(
        "node2's ztunnel: istio_tcp_connections_opened_total{{reporter=\"destination\", source_principal=\"{id}\", connection_security_policy=\"mutual_tls\"}} = {n}"
    ))
}

/// A connection from `from` to `to:port` is refused by the destination's ztunnel: no data,
/// the app never accepted it, and the ztunnel on `node` logged the 401.
async fn refused(c: &Cluster, from: &str, to: &str, port: u16) -> anyhow::Result<()> {
    let stats = c.app_stats(to);
    let before = stats.accepted.load(Ordering::Relaxed);
    let dst = SocketAddr::new(c.pod_ip(to), port);
    let answer = c
        .exchange(from, dst, b"let me in")
        .await
        .unwrap_or_default();
    if !answer.is_empty() {
        bail!(
            "{from} -> {dst}: the denied connection got an answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    if stats.accepted.load(Ordering::Relaxed) != before {
        bail!("{to}'s app accepted a connection the policy denies");
    }
    Ok(())
}

/// `from` reaches `to:port` and the app answers.
async fn answers(c: &Cluster, from: &str, to: &str, port: u16) -> anyhow::Result<()> {
    let dst = SocketAddr::new(c.pod_ip(to), port);
    let answer = c.exchange(from, dst, b"hello").await?;
    if !answer.ends_with(b"hello") || answered_by(&answer) != to {
        bail!(
            "{from} -> {dst}: unexpected answer {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(())
}

/// ratings is bound to the waypoint: reviews calls it through its VIP (and the waypoint),
/// or its pod directly; productpage calling the pod directly is refused by the policy.
async fn ratings_from_reviews(c: &Cluster) -> anyhow::Result<String> {
    let (reviews, ratings, page) = (
        pod(c, "reviews-v1"),
        pod(c, "ratings"),
        pod(c, "productpage"),
    );
    let vip = SocketAddr::new(RATINGS_VIP.into(), APP_PORT);
    let (status, answered, json, _) =
        get(c, reviews, vip, "ratings:9080", "/ratings/0", &[]).await?;
    let waypoint = c.pod_ip(WAYPOINT_POD);
    let peer = json["peer"]
        .as_str()
        .and_then(|p| p.parse::<SocketAddr>().ok());
    let tag = json["headers"]["x-bookinfo-route"][0]
        .as_str()
        .unwrap_or_default();
    if status != 200
        || answered != ratings
        || peer.map(|p| p.ip()) != Some(waypoint)
        || tag != "ratings-via-waypoint"
    {
        bail!(
            "{reviews} -> ratings {vip}: {status} {json} (expected {ratings}, from the waypoint {waypoint}, with the header x-bookinfo-route its VirtualService sets)"
        );
    }
    answers(c, reviews, ratings, TCP_PORT).await?;
    refused(c, page, ratings, TCP_PORT).await?;
    // The client can see the close before ztunnel has written its log line.
    let dst = SocketAddr::new(c.pod_ip(ratings), TCP_PORT).to_string();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let log = std::fs::read_to_string(c.ztunnel_log(0))?;
        if log.lines().any(|l| l.contains(&dst) && l.contains("401")) {
            break;
        }
        if Instant::now() > deadline {
            bail!("node1's ztunnel did not log a 401 for {dst}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(format!(
        "bookinfo/ratings-from-reviews (principals bookinfo-reviews and waypoint): {reviews} -> ratings.bookinfo {vip}: HTTP {status} from {ratings} via the waypoint (the app saw {WAYPOINT_POD} {waypoint} as its peer, and the header x-bookinfo-route: {tag} set by VirtualService bookinfo/ratings); {reviews} -> {dst} directly answered; {page} -> {dst} directly got HBONE 401 from node2's ztunnel and the app never saw it
(this selector policy is ztunnel's, L4: through the VIP, ratings' ztunnel sees the waypoint's identity; what the waypoint itself enforces on the caller is a targetRefs policy, see (j))"
    ))
}

async fn debug_port(c: &Cluster) -> anyhow::Result<String> {
    let (legacy, details, page) = (pod(c, "legacy"), pod(c, "details"), pod(c, "productpage"));
    refused(c, legacy, details, DEBUG_PORT).await?;
    answers(c, page, details, DEBUG_PORT).await?;
    answers(c, legacy, details, TCP_PORT).await?;
    Ok(format!(
        "bookinfo/deny-debug-port: {legacy} (plaintext, no namespace) -> {details}:{DEBUG_PORT} refused; {page} (ns bookinfo) -> :{DEBUG_PORT} answered; {legacy} -> :{TCP_PORT} answered"
    ))
}

/// Write the DENY policy into pilot's folder and time how long until a new connection from
/// productpage to details is refused.
async fn live_deny(c: &Cluster) -> anyhow::Result<String> {
    let (page, details) = (pod(c, "productpage"), pod(c, "details"));
    answers(c, page, details, TCP_PORT)
        .await
        .context("before the change")?;
    let written = Instant::now();
    c.write_pilot_file("deny.yaml", DENY_POLICY)?;
    while written.elapsed() < CHANGE_LIMIT {
        if refused(c, page, details, TCP_PORT).await.is_ok() {
            let elapsed = written.elapsed();
            answers(c, pod(c, "legacy"), details, TCP_PORT)
                .await
                .context("other callers of details after the change")?;
            return Ok(format!(
                "deny.yaml written -> the next connection {page} -> {details}:{TCP_PORT} refused after {:.0} ms (pilot: folder change, debounce, translation, delta push; ztunnel: apply); other callers still answered",
                elapsed.as_secs_f64() * 1000.0
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the policy had no effect 5 s after the file was written")
}

/// Add a second reviews v2 Pod object to pilot's folder and time how long until a request to
/// the reviews VIP (through the waypoint) is answered by it.
async fn live_endpoint(c: &Cluster) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    for p in reviews_n(c, page, 6, &[]).await? {
        if p == NEW_POD {
            bail!("{NEW_POD} answered through the VIP before it was added");
        }
    }
    let yaml = format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {NEW_POD}
  namespace: bookinfo
  uid: {NEW_POD_UID}
  labels: {{app: reviews, version: v2}}
spec:
  nodeName: {node}
  serviceAccountName: bookinfo-reviews
  containers:
  - name: reviews
    image: docker.io/istio/examples-bookinfo-reviews-v2:1.20.2
    ports: [{{name: http, containerPort: {APP_PORT}}}]
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]
  conditions: [{{type: Ready, status: \"True\"}}]
",
        node = c.bed.node(c.def(NEW_POD).node).name,
        ip = c.pod_ip(NEW_POD),
        ip6 = c.pod_ip6(NEW_POD),
    );
    let written = Instant::now();
    c.write_pilot_file(&format!("{NEW_POD}.yaml"), &yaml)?;
    let mut requests = 0;
    while written.elapsed() < CHANGE_LIMIT {
        requests += 1;
        if reviews(c, page, "/", &[]).await.unwrap_or_default() == NEW_POD {
            return Ok(format!(
                "{NEW_POD}.yaml written -> a request to reviews {REVIEWS_VIP}:{REVIEWS_PORT} answered by {NEW_POD} after {:.0} ms ({requests} requests; pilot: new Pod, service endpoints, delta push to ztunnels and the waypoint; ztunnel on node2: enrolls the pod, opens its listeners; the waypoint: new endpoint)",
                written.elapsed().as_secs_f64() * 1000.0
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("no request to reviews reached {NEW_POD} within 5 s of the change")
}

async fn outsider(c: &Cluster) -> anyhow::Result<String> {
    let (legacy, details) = (pod(c, "legacy"), pod(c, "details"));
    let dst = SocketAddr::new(c.pod_ip(details), TCP_PORT);
    let answer = c.exchange(legacy, dst, b"plain hello").await?;
    let (greeting, echoed) = split(&answer);
    if echoed != b"plain hello" {
        bail!("got {:?}", String::from_utf8_lossy(&answer));
    }
    let n = c
        .metric(
            0,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
            ],
        )
        .await?;
    if n < 1.0 {
        bail!("node1's ztunnel did not count a plaintext inbound connection");
    }
    Ok(format!(
        "{legacy} (opted out, no ztunnel capture) -> {dst}: captured on 15006 in {details}, authorized without identity, answered \"{greeting}\"; node1 counts {n} connection(s) with connection_security_policy=\"none\""
    ))
}

/// For HBONE across nodes (IPv4 and IPv6), HBONE on one node and plaintext from outside the
/// mesh, the peer address the echo app reports is the caller's pod IP, not the app's own.
async fn app_sees_client(c: &Cluster) -> anyhow::Result<String> {
    let (productpage, reviews) = (pod(c, "productpage"), pod(c, "reviews-v1"));
    let (ratings, legacy, details) = (pod(c, "ratings"), pod(c, "legacy"), pod(c, "details"));
    let mut seen = vec![];
    for (from, to, v6, how) in [
        (productpage, reviews, false, "HBONE across nodes"),
        (productpage, reviews, true, "HBONE across nodes, IPv6"),
        (reviews, ratings, false, "HBONE on node2"),
        (legacy, details, false, "plaintext via 15006"),
    ] {
        let (to_ip, from_ip) = if v6 {
            (c.pod_ip6(to), c.pod_ip6(from))
        } else {
            (c.pod_ip(to), c.pod_ip(from))
        };
        let dst = SocketAddr::new(to_ip, TCP_PORT);
        let answer = c.exchange(from, dst, b"who am I").await?;
        let (greeting, _) = split(&answer);
        let peer = greeting_peer(&greeting)
            .ok_or_else(|| anyhow::anyhow!("{to} answered without a peer address: {greeting:?}"))?;
        if peer.ip() != from_ip {
            bail!(
                "{from} ({from_ip}) -> {to} ({how}): the app saw {} as its peer",
                peer.ip()
            );
        }
        seen.push(format!("{from} -> {to} ({how}): peer {peer}"));
    }
    Ok(seen.join("\n"))
}

/// Write `file` of the routes folder into pilot's folder as reviews' VirtualService; when.
fn write_vs(c: &Cluster, routes: &Path, file: &str) -> anyhow::Result<Instant> {
    let yaml = std::fs::read_to_string(routes.join(file))
        .with_context(|| routes.join(file).display().to_string())?;
    let written = Instant::now();
    c.write_pilot_file(VS_FILE, &yaml)?;
    Ok(written)
}

/// Poll `observe` (one batch of requests, returning what it saw and whether that is the
/// change's effect) until it reports the effect; the time from the write to the start of that
/// batch, and what it saw. Fails after [`CHANGE_LIMIT`] with the last observation.
async fn until_applied<F, Fut>(
    written: Instant,
    mut observe: F,
) -> anyhow::Result<(Duration, String)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(bool, String)>>,
{
    loop {
        let sent = written.elapsed();
        let last = match observe().await {
            Ok((true, seen)) => return Ok((sent, seen)),
            Ok((false, seen)) => seen,
            Err(e) => format!("{e:#}"),
        };
        if written.elapsed() > CHANGE_LIMIT {
            bail!("not in effect {CHANGE_LIMIT:?} after the file was written; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn all_to_v1(c: &Cluster, routes: &Path) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let written = write_vs(c, routes, "1-all-v1.yaml")?;
    let (took, _) = until_applied(written, || async {
        let pods = reviews_n(c, page, 6, &[]).await?;
        Ok((
            pods.iter().all(|p| p.starts_with("reviews-v1")),
            tally(&pods),
        ))
    })
    .await?;
    let after = reviews_n(c, page, 20, &[]).await?;
    if !after.iter().all(|p| p.starts_with("reviews-v1")) {
        bail!("after the change: {}", tally(&after));
    }
    Ok(format!(
        "1-all-v1.yaml written -> in effect after {} (first of 6 consecutive requests all answered by v1); then 20 requests from {page}: {}",
        ms(took),
        tally(&after)
    ))
}

async fn jason_to_v2(c: &Cluster, routes: &Path) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let jason = [("end-user", "jason")];
    let written = write_vs(c, routes, "2-jason-v2.yaml")?;
    let (took, _) = until_applied(written, || async {
        let j = reviews_n(c, page, 3, &jason).await?;
        let o = reviews_n(c, page, 3, &[]).await?;
        let ok = j.iter().all(|p| p.starts_with("reviews-v2"))
            && o.iter().all(|p| p.starts_with("reviews-v1"));
        Ok((ok, format!("jason: {}; others: {}", tally(&j), tally(&o))))
    })
    .await?;
    let j = reviews_n(c, page, 10, &jason).await?;
    let o = reviews_n(c, page, 10, &[]).await?;
    if !j.iter().all(|p| p.starts_with("reviews-v2"))
        || !o.iter().all(|p| p.starts_with("reviews-v1"))
    {
        bail!(
            "after the change: jason {}; others {}",
            tally(&j),
            tally(&o)
        );
    }
    Ok(format!(
        "2-jason-v2.yaml written -> in effect after {}; then 10 requests with `end-user: jason`: {}; 10 without: {}",
        ms(took),
        tally(&j),
        tally(&o)
    ))
}

async fn split_v1_v3(c: &Cluster, routes: &Path) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let written = write_vs(c, routes, "3-v1-v3-50-50.yaml")?;
    let (took, _) = until_applied(written, || async {
        let pods = reviews_n(c, page, 8, &[]).await?;
        let ok = pods.iter().any(|p| p.starts_with("reviews-v1"))
            && pods.iter().any(|p| p.starts_with("reviews-v3"))
            && pods
                .iter()
                .all(|p| p.starts_with("reviews-v1") || p.starts_with("reviews-v3"));
        Ok((ok, tally(&pods)))
    })
    .await?;
    let pods = reviews_n(c, page, 200, &[]).await?;
    let v1 = pods.iter().filter(|p| p.starts_with("reviews-v1")).count();
    let v3 = pods.iter().filter(|p| p.starts_with("reviews-v3")).count();
    // 50/50 over 200 requests: a standard deviation of about 7; 70..=130 is over 4 of them.
    if v1 + v3 != 200 || !(70..=130).contains(&v1) {
        bail!("200 requests: {}", tally(&pods));
    }
    Ok(format!(
        "3-v1-v3-50-50.yaml written -> in effect after {} (first batch of 8 with both v1 and v3 and nothing else); then 200 requests: v1 {v1}, v3 {v3} ({})",
        ms(took),
        tally(&pods)
    ))
}

async fn by_path(c: &Cluster, routes: &Path) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let written = write_vs(c, routes, "4-paths.yaml")?;
    let observe = || async {
        let (s1, p1, _, _) = get(c, page, dst, "reviews:9080", "/status", &[]).await?;
        let (s2, p2, _, _) = get(c, page, dst, "reviews:9080", "/status/more", &[]).await?;
        let (s3, p3, j3, _) = get(c, page, dst, "reviews:9080", "/headers/x", &[]).await?;
        let (s4, _, _, a4) = get(c, page, dst, "reviews:9080", "/delay", &[]).await?;
        let authority = j3["authority"].as_str().unwrap_or_default().to_string();
        let body4 = String::from_utf8_lossy(&a4.body).trim().to_string();
        let ok = s1 == 200
            && p1.starts_with("reviews-v1")
            && s2 == 200
            && p2.starts_with("reviews-v3")
            && s3 == 200
            && p3.starts_with("reviews-v2")
            && authority == "reviews-v2.internal"
            && s4 == 503
            && body4 == "fault filter abort";
        Ok((
            ok,
            format!(
                "GET /status: {s1} from {p1}\nGET /status/more: {s2} from {p2} (exact match only)\nGET /headers/x: {s3} from {p3}, the app saw authority {authority:?}\nGET /delay: {s4} {body4:?} (fault injection at the waypoint: delay 1 s, then abort)"
            ),
        ))
    };
    let (took, seen) = until_applied(written, observe).await?;
    Ok(format!(
        "4-paths.yaml written -> in effect after {}:\n{seen}",
        ms(took)
    ))
}

/// 4-paths.yaml is in effect: `/delay` is held by the waypoint's fault filter for 1 s, then
/// aborted with 503 (the app never sees it); timed against `/status`, which is not delayed.
async fn delay_fault(c: &Cluster) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let mut lines = vec![];
    for path in ["/status", "/delay", "/delay", "/delay"] {
        let start = Instant::now();
        let (status, _, _, answer) = get(c, page, dst, "reviews:9080", path, &[]).await?;
        let took = start.elapsed();
        let body = String::from_utf8_lossy(&answer.body).trim().to_string();
        if path == "/delay" {
            if status != 503 || body != "fault filter abort" {
                bail!("GET /delay answered {status} {body:?}");
            }
            if took < Duration::from_secs(1) {
                bail!("GET /delay took {} (the fault delay is 1 s)", ms(took));
            }
        }
        lines.push(format!("GET {path}: {status} in {}", ms(took)));
    }
    Ok(lines.join("\n"))
}

/// The waypoint's retry counter (Envoy's `upstream_rq_retry`, all clusters).
async fn waypoint_retries(c: &Cluster) -> anyhow::Result<f64> {
    let (status, text) = c.pod_http_get(WAYPOINT_POD, 15020, "/metrics").await?;
    if status != 200 {
        bail!("waypoint metrics answered {status}");
    }
    Ok(sum_metric(
        &text,
        "envoy_cluster_upstream_rq_retry_total",
        &[],
    ))
}

/// 6-resilience.yaml: reviews' pods all take requests with Istio's default retries. One pod
/// (reviews-v1) is told (query parameters of the echo app) to fail every other request it
/// gets with 503: through the retrying route every answer is 200; through `/no-retries`
/// (attempts: 0) the failures show.
async fn retry_hides_flaky_pod(c: &Cluster, routes: &Path) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let flaky = pod(c, "reviews-v1");
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let written = write_vs(c, routes, "6-resilience.yaml")?;
    let (took, _) = until_applied(written, || async {
        let pods = reviews_n(c, page, 6, &[]).await?;
        // 5-source-labels.yaml sent everything from productpage to v2.
        let ok = pods.iter().any(|p| !p.starts_with("reviews-v2"));
        Ok((ok, tally(&pods)))
    })
    .await?;
    let query = format!("status=503&status_pod={flaky}&fail_every=2");
    let retries_before = waypoint_retries(c).await?;
    let mut answered = vec![];
    for i in 0..20 {
        let (status, p, _, answer) = get(
            c,
            page,
            dst,
            "reviews:9080",
            &format!("/flaky/{i}?{query}"),
            &[],
        )
        .await?;
        if status != 200 {
            bail!(
                "request {i} through the retrying route answered {status} {:?}",
                String::from_utf8_lossy(&answer.body)
            );
        }
        answered.push(p);
    }
    let retried = waypoint_retries(c).await? - retries_before;
    let mut failed = 0;
    for i in 0..20 {
        let (status, _, _, _) = get(
            c,
            page,
            dst,
            "reviews:9080",
            &format!("/no-retries/{i}?{query}"),
            &[],
        )
        .await?;
        failed += usize::from(status == 503);
    }
    if failed == 0 || retried < 1.0 {
        bail!("{flaky} did not fail ({failed} 503s without retries, {retried} retries)");
    }
    Ok(format!(
        "6-resilience.yaml written -> in effect after {}; {flaky} fails every other request (503): 20 requests with Istio's default retries: all 200 ({}), the waypoint retried {retried}; the same 20 without retries (attempts: 0): {failed} answered 503",
        ms(took),
        tally(&answered)
    ))
}

/// 6-resilience.yaml: `/mirror…` goes to v1 and a copy (same body) to v3, whose app lists
/// what it received (`GET /_seen`, asked directly).
async fn mirror_with_body(c: &Cluster) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let target = pod(c, "reviews-v3");
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let body = format!("{{\"order\": {nonce}, \"note\": \"mirrored with its body\"}}");
    let req = format!(
        "POST /mirror/orders HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let sent = Instant::now();
    let answer = HttpAnswer::parse(&c.exchange(page, dst, req.as_bytes()).await?)?;
    let main_took = sent.elapsed();
    let j = answer.json().unwrap_or(serde_json::Value::Null);
    let answered_by = j["pod"].as_str().unwrap_or_default().to_string();
    if answer.status != 200 || !answered_by.starts_with("reviews-v1") || j["body"] != body {
        bail!(
            "POST /mirror/orders answered {} by {answered_by:?}: {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
    let seen_at = SocketAddr::new(c.pod_ip(target), APP_PORT);
    loop {
        let a = c
            .http_get_from(page, seen_at, "reviews:9080", "/_seen", &[])
            .await?;
        let seen: Vec<serde_json::Value> = serde_json::from_slice(&a.body).unwrap_or_default();
        if let Some(copy) = seen
            .iter()
            .find(|e| e["path"] == "/mirror/orders" && e["body"] == body)
        {
            return Ok(format!(
                "POST /mirror/orders ({} bytes) answered 200 by {answered_by} in {}; {target} received the copy {} after sending: {} {} with authority {} and the same body",
                body.len(),
                ms(main_took),
                ms(sent.elapsed()),
                copy["method"],
                copy["path"],
                copy["authority"]
            ));
        }
        if sent.elapsed() > CHANGE_LIMIT {
            bail!(
                "{target} never received the mirrored request ({} seen)",
                seen.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn by_source(c: &Cluster, routes: &Path) -> anyhow::Result<String> {
    let (page, details) = (pod(c, "productpage"), pod(c, "details"));
    let written = write_vs(c, routes, "5-source-labels.yaml")?;
    let (took, seen) = until_applied(written, || async {
        let from_page = reviews_n(c, page, 3, &[]).await?;
        let from_details = reviews_n(c, details, 3, &[]).await?;
        let ok = from_page.iter().all(|p| p.starts_with("reviews-v2"))
            && from_details.iter().all(|p| p.starts_with("reviews-v1"));
        Ok((
            ok,
            format!(
                "from {page} (app: productpage): {}; from {details} (app: details): {}",
                tally(&from_page),
                tally(&from_details)
            ),
        ))
    })
    .await?;
    Ok(format!(
        "5-source-labels.yaml written -> in effect after {} (the waypoint matches the labels of the workload whose address the client's ztunnel forwarded): {seen}",
        ms(took)
    ))
}

/// Write [`WAYPOINT_POLICIES`] and time how long until the waypoint answers a request to
/// ratings' admin path 403 (`RBAC: access denied`); other paths still pass for reviews, and
/// productpage, which the ALLOW does not name, is refused through the waypoint. The file is
/// removed afterwards (and access comes back).
async fn waypoint_authz(c: &Cluster) -> anyhow::Result<String> {
    let (reviews, page, ratings) = (
        pod(c, "reviews-v1"),
        pod(c, "productpage"),
        pod(c, "ratings"),
    );
    let vip = SocketAddr::new(RATINGS_VIP.into(), APP_PORT);
    let (before, _, _, _) = get(c, page, vip, "ratings:9080", "/ratings/admin", &[]).await?;
    if before != 200 {
        bail!("before the policies, {page} -> ratings /ratings/admin answered {before}");
    }
    const FILE: &str = "waypoint-policies.yaml";
    let written = Instant::now();
    c.write_pilot_file(FILE, WAYPOINT_POLICIES)?;
    let took = loop {
        let (status, _, _, answer) =
            get(c, reviews, vip, "ratings:9080", "/ratings/admin", &[]).await?;
        if status == 403 {
            let body = String::from_utf8_lossy(&answer.body).into_owned();
            if body != "RBAC: access denied" {
                bail!("{reviews} -> ratings /ratings/admin: 403 with body {body:?}");
            }
            break written.elapsed();
        }
        if written.elapsed() > CHANGE_LIMIT {
            bail!("the DENY had no effect 5 s after {FILE} was written (last answer {status})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (ok, answered, _, _) = get(c, reviews, vip, "ratings:9080", "/ratings/0", &[]).await?;
    if ok != 200 || answered != ratings {
        bail!(
            "{reviews} -> ratings /ratings/0 answered {ok} by {answered:?}, not 200 by {ratings}"
        );
    }
    let (from_page, _, _, _) = get(c, page, vip, "ratings:9080", "/ratings/0", &[]).await?;
    if from_page != 403 {
        bail!("{page} -> ratings /ratings/0 answered {from_page}: the ALLOW names only reviews");
    }
    let (status, metrics) = c.pod_http_get(WAYPOINT_POD, 15020, "/metrics").await?;
    let denied = |policy: &str| {
        testbed::cluster::sum_metric(
            &metrics,
            "waypoint_rbac_decisions_total",
            &[("policy", policy), ("decision", "denied")],
        )
    };
    let (by_deny, by_allow) = (
        denied("ns[bookinfo]-policy[ratings-no-admin]-rule[0]"),
        denied(""),
    );
    if status != 200 || by_deny < 1.0 {
        bail!("the waypoint's metrics do not count the denial: {status}");
    }
    c.write_pilot_file(FILE, "")?;
    let removed = Instant::now();
    loop {
        let (s, _, _, _) = get(c, page, vip, "ratings:9080", "/ratings/0", &[]).await?;
        if s == 200 {
            break;
        }
        if removed.elapsed() > CHANGE_LIMIT {
            bail!("{page} -> ratings still {s} 5 s after the policies were removed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(format!(
        "{FILE} written (DENY ratings-no-admin on paths /ratings/admin*, ALLOW ratings-callers from bookinfo-reviews, both targetRefs Service ratings) -> {reviews} -> ratings {vip} /ratings/admin answered 403 \"RBAC: access denied\" by the waypoint after {:.0} ms; /ratings/0 still 200 from {ratings}; {page} -> ratings (through its waypoint) 403, as no ALLOW rule names it; waypoint_rbac_decisions_total counts {by_deny} denial(s) by ns[bookinfo]-policy[ratings-no-admin]-rule[0] and {by_allow} by no matching ALLOW; the file removed -> {page} answered 200 again",
        took.as_secs_f64() * 1000.0
    ))
}

/// reviews' `tcp` port: the waypoint passes the bytes through (L4, balanced), and the app sees
/// the waypoint as its peer.
async fn tcp_through_waypoint(c: &Cluster) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let vip = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_TCP_PORT);
    let waypoint = c.pod_ip(WAYPOINT_POD);
    let mut reached = vec![];
    for i in 0..6 {
        let msg = format!("tcp-{i}");
        let answer = c.exchange(page, vip, msg.as_bytes()).await?;
        let (greeting, echoed) = split(&answer);
        if echoed != msg.as_bytes() {
            bail!(
                "{vip} echoed {:?} for {msg:?} ({greeting})",
                String::from_utf8_lossy(echoed)
            );
        }
        if greeting_peer(&greeting).map(|p| p.ip()) != Some(waypoint) {
            bail!("{vip}: the app saw {greeting:?}, not the waypoint {waypoint} as its peer");
        }
        reached.push(answered_by(&answer));
    }
    Ok(format!(
        "6 connections from {page} to reviews {vip} (port name tcp: no HTTP) echoed intact through the waypoint (each app saw {waypoint} as its peer), answered by {}",
        tally(&reached)
    ))
}

/// Every ztunnel says it captures with eBPF, and no pod has a netfilter rule.
async fn no_rules(c: &Cluster) -> anyhow::Result<String> {
    for node in 0..c.spec.nodes {
        let (_, body) = c.http_get(node, 15000, "/config_dump").await?;
        let dump: serde_json::Value = serde_json::from_str(&body)?;
        if dump["capture"] != "ebpf" {
            bail!(
                "{}'s ztunnel captures with {}",
                c.bed.node(node).name,
                dump["capture"]
            );
        }
    }
    let mut checked = vec![];
    for def in &c.spec.pods {
        let ns = testbed::netns_path(&c.bed.pod(&def.name).netns);
        for (tool, args) in [
            ("nft", &["list", "ruleset"][..]),
            ("iptables-save", &[][..]),
        ] {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={}", ns.display()))
                .arg(tool)
                .args(args)
                .output();
            let Ok(out) = out else {
                continue; // the tool is not installed: then it installed no rule either
            };
            let text = String::from_utf8_lossy(&out.stdout);
            let rules: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let l = l.trim();
                    !l.is_empty()
                        && !l.starts_with('#')
                        && !l.starts_with('*')
                        && !l.starts_with(':')
                        && l != "COMMIT"
                })
                .collect();
            if !rules.is_empty() {
                bail!("{tool} in pod {}: {}", def.name, rules.join(" | "));
            }
        }
        checked.push(def.name.as_str());
    }
    Ok(format!(
        "both ztunnels report capture \"ebpf\"; `nft list ruleset` and `iptables-save` are empty in {}",
        checked.join(", ")
    ))
}

/// glibc's resolver in the client pod, with a Kubernetes resolv.conf naming an address where no
/// resolver runs: only the captured query, answered by the pod's DNS proxy, can resolve `echo`.
async fn dns(c: &Cluster) -> anyhow::Result<String> {
    let resolv = c.dir.join("demo-resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.96.0.53\nsearch bookinfo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\n",
    )?;
    let mut cmd = tokio::process::Command::new("unshare");
    // Its own mount namespace, so the bind mount of resolv.conf is this process's alone.
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/resolv.conf && exec getent ahostsv4 reviews"#)
        .arg(&resolv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let page = pod(c, "productpage");
    let child = c.bed.spawn_in_pod_async(page, cmd)?;
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await??;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.split_whitespace().next().unwrap_or("");
    if !out.status.success() || first != REVIEWS_VIP.to_string() {
        bail!(
            "getent ahostsv4 reviews in pod {page}: {} {:?} {}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let answered = c.metric(0, "istio_dns_requests_total", &[]).await?;
    Ok(format!(
        "`getent ahostsv4 reviews` in {page} (resolv.conf: nameserver 10.96.0.53, where nothing listens; search bookinfo.svc.cluster.local …) got reviews.bookinfo's VIP {first} from the pod's DNS proxy ({answered} DNS queries counted by node1's ztunnel)"
    ))
}

/// reviews' traffic policy for the (j) checks: outlier detection on the service, and a subset
/// `pool` (every reviews pod) with a pool of one connection and one pending request.
const REVIEWS_POLICY: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-policy, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}
  subsets:
  - name: pool
    labels: {app: reviews}
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}
";

/// reviews' VirtualService for the (j) checks: `/pool` to the `pool` subset, the rest to every
/// reviews pod.
const REVIEWS_POLICY_VS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /pool}}]
    route: [{destination: {host: reviews, subset: pool}}]
  - route: [{destination: {host: reviews}}]
";

const REVIEWS_CLUSTER: &str = "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local";

/// One reviews pod answers 500 (the echo app's `status_pod`); after three in a row the waypoint
/// ejects it and the following requests go to the others. The admin page and the metrics
/// show the ejection.
async fn outlier_ejection(c: &Cluster) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let bad = pod(c, "reviews-v1");
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let path = format!("/fail?status=500&status_pod={bad}");
    c.write_pilot_file("reviews-policy.yaml", REVIEWS_POLICY)?;
    let written = Instant::now();
    c.write_pilot_file(VS_FILE, REVIEWS_POLICY_VS)?;
    // Until ejected: requests go round the pods; the bad one's 500s count.
    let mut statuses = Vec::new();
    let mut clean = 0;
    while clean < 8 {
        if written.elapsed() > CHANGE_LIMIT * 2 {
            bail!(
                "no ejection {:?} after the files were written: {statuses:?}",
                CHANGE_LIMIT * 2
            );
        }
        let (status, who, _, _) = get(c, page, dst, "reviews:9080", &path, &[]).await?;
        statuses.push(format!("{status} {who}"));
        clean = if status == 200 && statuses.iter().any(|s| s.starts_with("500")) {
            clean + 1
        } else {
            0
        };
    }
    let took = written.elapsed();
    let failures = statuses.iter().filter(|s| s.starts_with("500")).count();
    let mut after = Vec::new();
    for _ in 0..20 {
        let (status, who, _, _) = get(c, page, dst, "reviews:9080", &path, &[]).await?;
        if status != 200 || who == bad {
            bail!("after the ejection: {status} from {who}");
        }
        after.push(who);
    }
    let (_, clusters) = c.pod_http_get(WAYPOINT_POD, 15000, "/clusters").await?;
    let clusters: serde_json::Value = serde_json::from_str(&clusters)?;
    let bad_ip = c.pod_ip(bad).to_string();
    let ejected: Vec<String> = clusters["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|cl| cl["name"] == REVIEWS_CLUSTER)
        .flat_map(|cl| cl["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["ejected"] == true)
        .filter_map(|e| e["address"].as_str().map(str::to_string))
        .collect();
    if ejected.len() != 1 || !ejected[0].starts_with(&format!("{bad_ip}:")) {
        bail!("the waypoint's /clusters shows ejected {ejected:?}, not {bad} ({bad_ip})");
    }
    let (_, metrics) = c.pod_http_get(WAYPOINT_POD, 15020, "/metrics").await?;
    let active = metrics
        .lines()
        .find(|l| {
            l.starts_with("envoy_cluster_outlier_detection_ejections_active{")
                && l.contains(REVIEWS_CLUSTER)
        })
        .unwrap_or("envoy_cluster_outlier_detection_ejections_active: none")
        .to_string();
    if !active.ends_with(" 1") {
        bail!("metrics: {active}");
    }
    Ok(format!(
        "reviews-policy.yaml (outlierDetection consecutive5xxErrors: 3) and a VirtualService to every reviews pod written; {bad} answers 500 to {path}: {failures} 500s among {} requests, then 8 in a row answered 200 by the others, {} after the write; 20 more: {}; the waypoint's /clusters marks {} ejected; {active}",
        statuses.len(),
        ms(took),
        tally(&after),
        ejected[0]
    ))
}

/// Six slow requests at once to the `pool` subset (one connection, one pending request): one
/// is served, one waits, the others are answered 503 `UO` with Envoy's body.
async fn pool_overflow(c: &Cluster) -> anyhow::Result<String> {
    let page = pod(c, "productpage");
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let path = "/pool?delay_ms=1000";
    let one = || get(c, page, dst, "reviews:9080", path, &[]);
    let (a, b, d, e, f, g) = tokio::join!(one(), one(), one(), one(), one(), one());
    let mut served = 0;
    let mut overflowed = 0;
    for r in [a, b, d, e, f, g] {
        let (status, _, _, answer) = r?;
        let body = String::from_utf8_lossy(&answer.body).to_string();
        match status {
            200 => served += 1,
            503 if body
                == "upstream connect error or disconnect/reset before headers. reset reason: overflow" =>
            {
                overflowed += 1
            }
            other => bail!("{path}: {other} {body:?}"),
        }
    }
    if served == 0 || overflowed == 0 {
        bail!("{served} served, {overflowed} overflowed");
    }
    let (_, metrics) = c.pod_http_get(WAYPOINT_POD, 15020, "/metrics").await?;
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with("envoy_cluster_upstream_rq_pending_overflow_total{")
                && l.contains("http/pool|reviews")
        })
        .unwrap_or("envoy_cluster_upstream_rq_pending_overflow_total: none")
        .to_string();
    Ok(format!(
        "6 concurrent GET {path} from {page} to the pool subset (maxConnections 1, http1MaxPendingRequests 1): {served} served, {overflowed} answered 503 \"upstream connect error or disconnect/reset before headers. reset reason: overflow\" (flag UO); {counted}"
    ))
}
