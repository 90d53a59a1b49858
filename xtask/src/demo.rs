//! `cargo xtask demo`: brings up a small mesh on this machine and checks, with a readable
//! report, that it does what the product promises.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testbed::cluster::{Cluster, ClusterSpec, ControlPlaneMode, PodDef};

/// The example app pilot serves: `deploy/examples/bookinfo`, as a user would `kubectl apply` it.
const EXAMPLE: &str = "deploy/examples/bookinfo";
/// The port every bookinfo container serves on, and details' debug port (denied from outside
/// the namespace by the example's policy).
const APP_PORT: u16 = 9080;
const DEBUG_PORT: u16 = 9999;
/// `reviews.bookinfo`'s ClusterIP and port (targetPort `http`, the pods' 9080).
const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 10, 3);
/// Its IPv6 ClusterIP (the service is dual-stack, like the pods).
const REVIEWS_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0x10, 0x3);
const REVIEWS_PORT: u16 = 80;

/// The pod the demo adds to the mesh while it runs: in the test bed from the start, in pilot's
/// folder only when the demo writes this object.
const NEW_POD: &str = "reviews-v3-2e7a1";
const NEW_POD_UID: &str = "0b6f2a10-0000-4000-8000-000000000007";

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

pub async fn run(bin: PathBuf) -> anyhow::Result<()> {
    testbed::Testbed::check_privileges()?;
    // SAFETY: set before any thread of ours reads the environment for it.
    unsafe { std::env::set_var("ZTUNNEL_BIN", &bin) };
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(EXAMPLE);
    let example = example
        .canonicalize()
        .with_context(|| example.display().to_string())?;
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
        app_ports: vec![APP_PORT, DEBUG_PORT],
        ..Default::default()
    };
    let started = Instant::now();
    let c = Cluster::start(spec).await?;
    println!(
        "
Mesh up in {:.1}s: {} nodes, pilot on node1 (xDS + CA over TLS on {}), one ztunnel per node ({}), capture with eBPF (cgroup connect4/sock_ops on kubepods.slice, sk_lookup per mesh pod)",
        started.elapsed().as_secs_f64(),
        c.spec.nodes,
        c.pilot_addr(),
        bin.display()
    );
    println!(
        "  pilot serves a copy of {} (Namespaces, Pods, Services, AuthorizationPolicies, routing) from {}",
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
            } else if def.mesh {
                format!("mesh, {}", c.identity(&def.name))
            } else {
                "outside the mesh (istio.io/dataplane-mode: none)".into()
            };
            println!("    {:<20} {:<12} {:<18} {what}", def.name, pod.ip, pod.ip6);
        }
    }
    println!(
        "  every pod runs an echo app on :{APP_PORT} and :{DEBUG_PORT} that names itself and the peer it saw"
    );
    println!(
        "  service reviews.bookinfo {REVIEWS_VIP}:{REVIEWS_PORT} (targetPort http) -> the pods labelled app: reviews"
    );
    println!(
        "  live change: {NEW_POD}.yaml (a Pod app: reviews) is added to pilot's folder while the mesh runs"
    );
    println!(
        "  live change: deny.yaml (AuthorizationPolicy bookinfo/details-not-from-productpage) is added while the mesh runs\n"
    );

    let mut report = Report { rows: vec![] };
    let mut capture = Some(c.bed.capture(0)?);
    let marker = b"DEMO-SECRET-PAYLOAD";

    report.check(
        "(a) pod -> pod across nodes, payload intact",
        cross_node(&c, marker).await,
    );
    report.check(
        "(a) pod -> service VIP, balanced over endpoints",
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
        "(d) the example's ALLOW policy: only reviews may call ratings",
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

    let failed = report.rows.iter().filter(|r| !r.0).count();
    println!(
        "\n{} of {} checks passed. ztunnel logs: {}",
        report.rows.len() - failed,
        report.rows.len(),
        c.dir.display()
    );
    if failed > 0 {
        for node in 0..c.spec.nodes {
            let log = std::fs::read_to_string(c.ztunnel_log(node)).unwrap_or_default();
            println!(
                "\n--- ztunnel {} log (last lines) ---",
                c.bed.node(node).name
            );
            for line in log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                println!("{line}");
            }
        }
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

async fn cross_node(c: &Cluster, marker: &[u8]) -> anyhow::Result<String> {
    let (from, to) = (pod(c, "productpage"), pod(c, "reviews-v1"));
    let dst = SocketAddr::new(c.pod_ip(to), APP_PORT);
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

async fn via_vip(c: &Cluster) -> anyhow::Result<String> {
    let vip = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let mut reached = std::collections::BTreeSet::new();
    for i in 0..6 {
        let msg = format!("request-{i}");
        let answer = c
            .exchange(pod(c, "productpage"), vip, msg.as_bytes())
            .await?;
        let (_, echoed) = split(&answer);
        if echoed != msg.as_bytes() {
            bail!(
                "request {i} through the VIP came back as {:?}",
                String::from_utf8_lossy(echoed)
            );
        }
        reached.insert(answered_by(&answer));
    }
    if reached.len() < 2 {
        bail!("6 requests to {vip} all went to {reached:?}");
    }
    Ok(format!(
        "6 requests from productpage to reviews.bookinfo ({vip}, targetPort http = {APP_PORT}) answered by {}",
        reached.into_iter().collect::<Vec<_>>().join(" and ")
    ))
}

/// The same paths over IPv6: the pods' IPv6 addresses and the service's IPv6 ClusterIP.
async fn over_ipv6(c: &Cluster, marker: &[u8]) -> anyhow::Result<String> {
    let (from, to) = (pod(c, "productpage"), pod(c, "reviews-v1"));
    let dst = SocketAddr::new(c.pod_ip6(to), APP_PORT);
    let answer = c.exchange(from, dst, marker).await?;
    let (greeting, echoed) = split(&answer);
    if echoed != marker || answered_by(&answer) != to {
        bail!("{dst} answered {:?}", String::from_utf8_lossy(&answer));
    }
    let vip = SocketAddr::new(REVIEWS_VIP6.into(), REVIEWS_PORT);
    let answer = c.exchange(from, vip, b"v6").await?;
    let (via_vip, echoed) = split(&answer);
    if echoed != b"v6" || !answered_by(&answer).starts_with("reviews-") {
        bail!("{vip} answered {:?}", String::from_utf8_lossy(&answer));
    }
    Ok(format!(
        "{from} -> {dst}: app said \"{greeting}\"; {from} -> {vip}: app said \"{via_vip}\""
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

async fn ratings_from_reviews(c: &Cluster) -> anyhow::Result<String> {
    let (reviews, ratings, page) = (
        pod(c, "reviews-v1"),
        pod(c, "ratings"),
        pod(c, "productpage"),
    );
    answers(c, reviews, ratings, APP_PORT).await?;
    refused(c, page, ratings, APP_PORT).await?;
    // The client can see the close before ztunnel has written its log line.
    let dst = SocketAddr::new(c.pod_ip(ratings), APP_PORT).to_string();
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
        "bookinfo/ratings-from-reviews: {reviews} -> {ratings}:{APP_PORT} answered; {page} -> {ratings}:{APP_PORT} got HBONE 401 from node2's ztunnel and the app never saw it"
    ))
}

async fn debug_port(c: &Cluster) -> anyhow::Result<String> {
    let (legacy, details, page) = (pod(c, "legacy"), pod(c, "details"), pod(c, "productpage"));
    refused(c, legacy, details, DEBUG_PORT).await?;
    answers(c, page, details, DEBUG_PORT).await?;
    answers(c, legacy, details, APP_PORT).await?;
    Ok(format!(
        "bookinfo/deny-debug-port: {legacy} (plaintext, no namespace) -> {details}:{DEBUG_PORT} refused; {page} (ns bookinfo) -> :{DEBUG_PORT} answered; {legacy} -> :{APP_PORT} answered"
    ))
}

/// Write the DENY policy into pilot's folder and time how long until a new connection from
/// productpage to details is refused.
async fn live_deny(c: &Cluster) -> anyhow::Result<String> {
    let (page, details) = (pod(c, "productpage"), pod(c, "details"));
    answers(c, page, details, APP_PORT)
        .await
        .context("before the change")?;
    let written = Instant::now();
    c.write_pilot_file("deny.yaml", DENY_POLICY)?;
    while written.elapsed() < Duration::from_secs(5) {
        if refused(c, page, details, APP_PORT).await.is_ok() {
            let elapsed = written.elapsed();
            answers(c, pod(c, "legacy"), details, APP_PORT)
                .await
                .context("other callers of details after the change")?;
            return Ok(format!(
                "deny.yaml written -> the next connection {page} -> {details}:{APP_PORT} refused after {:.0} ms (pilot: folder change, debounce, translation, delta push; ztunnel: apply); other callers still answered",
                elapsed.as_secs_f64() * 1000.0
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the policy had no effect 5 s after the file was written")
}

/// Add reviews-v3's Pod object to pilot's folder and time how long until a request to the
/// reviews VIP is answered by it.
async fn live_endpoint(c: &Cluster) -> anyhow::Result<String> {
    let vip = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let page = pod(c, "productpage");
    for _ in 0..6 {
        let answer = c.exchange(page, vip, b"before").await?;
        if answered_by(&answer) == NEW_POD {
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
  labels: {{app: reviews, version: v3}}
spec:
  nodeName: {node}
  serviceAccountName: bookinfo-reviews
  containers:
  - name: reviews
    image: docker.io/istio/examples-bookinfo-reviews-v3:1.20.2
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
    while written.elapsed() < Duration::from_secs(5) {
        requests += 1;
        let answer = c.exchange(page, vip, b"after").await.unwrap_or_default();
        if answered_by(&answer) == NEW_POD {
            return Ok(format!(
                "{NEW_POD}.yaml written -> a request to {vip} answered by {NEW_POD} after {:.0} ms ({requests} requests; pilot: new Pod, service endpoints, delta push; ztunnel on node2: enrolls the pod, opens its listeners; ztunnel on node1: new endpoint)",
                written.elapsed().as_secs_f64() * 1000.0
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("no request to {vip} reached {NEW_POD} within 5 s of the change")
}

async fn outsider(c: &Cluster) -> anyhow::Result<String> {
    let (legacy, details) = (pod(c, "legacy"), pod(c, "details"));
    let dst = SocketAddr::new(c.pod_ip(details), APP_PORT);
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
        let dst = SocketAddr::new(to_ip, APP_PORT);
        let answer = c.exchange(from, dst, b"who am I").await?;
        let (greeting, _) = split(&answer);
        let peer = greeting
            .split_once("peer=")
            .and_then(|(_, p)| p.parse::<SocketAddr>().ok())
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
