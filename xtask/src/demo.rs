//! `cargo xtask demo`: brings up a small mesh on this machine and checks, with a readable
//! report, that it does what the product promises.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::bail;
use testbed::cluster::{
    ALT_PORT, Cluster, ClusterSpec, ControlPlaneMode, ECHO_PORT, ECHO_VIP, PodDef, ServiceDef,
};

const VIP: Ipv4Addr = ECHO_VIP;

/// Written into pilot's folder while the mesh runs: the live change the demo times.
const DENY_POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin-port, namespace: demo}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: [\"9090\"]}}]
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
    let spec = ClusterSpec {
        control_plane: ControlPlaneMode::Pilot,
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("echo-1", "echo", 0, true),
            PodDef::new("echo-2", "echo", 1, true),
            PodDef::new("reviews", "reviews", 1, true),
            // Not selected by the service until the demo relabels it `app: echo`.
            PodDef::new("echo-3", "echo-next", 1, true),
            PodDef::new("outsider", "outsider", 0, false),
        ],
        services: vec![ServiceDef::echo()],
        policies: String::new(),
        ztunnel_args: vec![],
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
        "  pilot serves the Kubernetes YAML in {} (Namespace, Pods, Service)",
        c.pilot_config().display()
    );
    for (i, node) in c.bed.nodes.iter().enumerate() {
        println!("  {} (underlay {})", node.name, node.underlay_ip);
        for def in c.spec.pods.iter().filter(|p| p.node == i) {
            let pod = c.bed.pod(&def.name);
            let what = if def.mesh {
                format!("mesh, {}", c.identity(&def.name))
            } else {
                "outside the mesh".into()
            };
            println!("    {:<9} {:<12} {what}", def.name, pod.ip);
        }
    }
    println!("  service echo.demo.svc.cluster.local {VIP}:80 -> echo-1, echo-2 :{ECHO_PORT}");
    println!(
        "  live change: pod echo-3 (app echo-next) is relabelled app: echo in pilot's folder while the mesh runs"
    );
    println!(
        "  live change: the file deny.yaml (AuthorizationPolicy demo/deny-admin-port, DENY port {ALT_PORT}) is added while the mesh runs\n"
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
        "(d) live change: a DENY policy file added to pilot's folder takes effect",
        live_deny(&c).await,
    );
    report.check("(d) DENY policy enforced before the app", deny(&c).await);
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
        "(g) a mesh pod resolves the service's name through ztunnel's DNS proxy",
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

async fn cross_node(c: &Cluster, marker: &[u8]) -> anyhow::Result<String> {
    let dst = SocketAddr::new(c.pod_ip("echo-2"), ECHO_PORT);
    let mut payload = marker.to_vec();
    payload.extend((0..64 * 1024).map(|i| (i % 251) as u8));
    let answer = c.exchange("client", dst, &payload).await?;
    let (greeting, echoed) = split(&answer);
    if echoed != payload.as_slice() {
        bail!(
            "echo differs: sent {} bytes, got {} back ({greeting})",
            payload.len(),
            echoed.len()
        );
    }
    Ok(format!(
        "client (node1) -> {dst} (echo-2, node2): {} bytes sent and echoed back intact; app said \"{greeting}\"",
        payload.len()
    ))
}

async fn via_vip(c: &Cluster) -> anyhow::Result<String> {
    let mut reached = std::collections::BTreeSet::new();
    for i in 0..4 {
        let msg = format!("request-{i}");
        let answer = c
            .exchange("client", SocketAddr::new(VIP.into(), 80), msg.as_bytes())
            .await?;
        let (greeting, echoed) = split(&answer);
        if echoed != msg.as_bytes() {
            bail!(
                "request {i} through the VIP came back as {:?}",
                String::from_utf8_lossy(echoed)
            );
        }
        if let Some(pod) = greeting.split_whitespace().next() {
            reached.insert(pod.trim_start_matches("pod=").to_string());
        }
    }
    if reached.len() < 2 {
        bail!("4 requests to {VIP}:80 all went to {reached:?}");
    }
    Ok(format!(
        "4 requests to {VIP}:80 answered by {}",
        reached.into_iter().collect::<Vec<_>>().join(" and ")
    ))
}

async fn identity_seen(c: &Cluster) -> anyhow::Result<String> {
    let id = c.identity("client").to_string();
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

/// Write the DENY policy into pilot's folder and time how long until a new connection to
/// the denied port is refused.
async fn live_deny(c: &Cluster) -> anyhow::Result<String> {
    let dst = SocketAddr::new(c.pod_ip("reviews"), ALT_PORT);
    let before = c.exchange("client", dst, b"x").await?;
    if before.is_empty() {
        bail!("port {ALT_PORT} refused before any policy");
    }
    let written = Instant::now();
    c.write_pilot_file("deny.yaml", DENY_POLICY)?;
    while written.elapsed() < std::time::Duration::from_secs(5) {
        if c.exchange("client", dst, b"x")
            .await
            .unwrap_or_default()
            .is_empty()
        {
            return Ok(format!(
                "deny.yaml written -> next connection to {dst} refused after {:.0} ms (pilot: folder change, debounce, translation, delta push; ztunnel: apply)",
                written.elapsed().as_secs_f64() * 1000.0
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    bail!("the policy had no effect 5 s after the file was written")
}

/// Relabel echo-3 `app: echo` in pilot's folder and time how long until a request to the
/// service VIP is answered by it.
async fn live_endpoint(c: &Cluster) -> anyhow::Result<String> {
    let vip = SocketAddr::new(VIP.into(), 80);
    let answered_by = |answer: &[u8]| {
        let (greeting, _) = split(answer);
        greeting
            .split_whitespace()
            .next()
            .map(|p| p.trim_start_matches("pod=").to_string())
            .unwrap_or_default()
    };
    for _ in 0..6 {
        let answer = c.exchange("client", vip, b"before").await?;
        if answered_by(&answer) == "echo-3" {
            bail!("echo-3 answered through the VIP before it was added to the service");
        }
    }
    let yaml = c.kubernetes_yaml();
    let relabelled = yaml.replace("app: echo-next,", "app: echo,");
    if relabelled == yaml {
        bail!("echo-3's label not found in the pods' YAML");
    }
    let written = Instant::now();
    c.write_pilot_file("mesh.yaml", &relabelled)?;
    let mut requests = 0;
    while written.elapsed() < std::time::Duration::from_secs(5) {
        requests += 1;
        let answer = c
            .exchange("client", vip, b"after")
            .await
            .unwrap_or_default();
        if answered_by(&answer) == "echo-3" {
            return Ok(format!(
                "echo-3 relabelled app: echo in mesh.yaml -> a request to {vip} answered by echo-3 after {:.0} ms ({requests} requests; pilot: folder change, translation, delta push of the workload's new services; ztunnel: new endpoint)",
                written.elapsed().as_secs_f64() * 1000.0
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    bail!("no request to {vip} reached echo-3 within 5 s of the change")
}

async fn deny(c: &Cluster) -> anyhow::Result<String> {
    let stats = c.app_stats("reviews");
    let before = stats.accepted.load(Ordering::Relaxed);
    let dst = SocketAddr::new(c.pod_ip("reviews"), ALT_PORT);
    let answer = c
        .exchange("client", dst, b"let me in")
        .await
        .unwrap_or_default();
    if !answer.is_empty() {
        bail!(
            "the denied connection got an answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    if stats.accepted.load(Ordering::Relaxed) != before {
        bail!("the app accepted a connection the policy denies");
    }
    let log = std::fs::read_to_string(c.ztunnel_log(0))?;
    if !log
        .lines()
        .any(|l| l.contains(&dst.to_string()) && l.contains("401"))
    {
        bail!("node1's ztunnel did not log a 401 for {dst}");
    }
    let ok = c
        .exchange(
            "client",
            SocketAddr::new(c.pod_ip("reviews"), ECHO_PORT),
            b"ok",
        )
        .await?;
    if !ok.ends_with(b"ok") {
        bail!("the allowed port {ECHO_PORT} did not answer");
    }
    Ok(format!(
        "client -> {dst}: node2's ztunnel answered HBONE 401 (policy demo/deny-admin-port), the connection closed with no data and the app never saw it; port {ECHO_PORT} still answers"
    ))
}

async fn outsider(c: &Cluster) -> anyhow::Result<String> {
    let dst = SocketAddr::new(c.pod_ip("echo-2"), ECHO_PORT);
    let answer = c.exchange("outsider", dst, b"plain hello").await?;
    let (greeting, echoed) = split(&answer);
    if echoed != b"plain hello" {
        bail!("got {:?}", String::from_utf8_lossy(&answer));
    }
    let n = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
            ],
        )
        .await?;
    if n < 1.0 {
        bail!("node2's ztunnel did not count a plaintext inbound connection");
    }
    Ok(format!(
        "outsider (node1, no ztunnel) -> {dst}: captured on 15006 in echo-2, authorized without identity, answered \"{greeting}\"; node2 counts {n} connection(s) with connection_security_policy=\"none\""
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
        "nameserver 10.96.0.53\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\n",
    )?;
    let mut cmd = tokio::process::Command::new("unshare");
    // Its own mount namespace, so the bind mount of resolv.conf is this process's alone.
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/resolv.conf && exec getent ahostsv4 echo"#)
        .arg(&resolv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = c.bed.spawn_in_pod_async("client", cmd)?;
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await??;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.split_whitespace().next().unwrap_or("");
    if !out.status.success() || first != ECHO_VIP.to_string() {
        bail!(
            "getent ahostsv4 echo in pod client: {} {:?} {}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let answered = c.metric(0, "istio_dns_requests_total", &[]).await?;
    Ok(format!(
        "`getent ahostsv4 echo` with nameserver 10.96.0.53 (nothing listens there) got the VIP {first} from the client pod's DNS proxy ({answered} DNS queries counted by node1's ztunnel)"
    ))
}
