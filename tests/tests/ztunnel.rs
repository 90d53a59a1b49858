//! End-to-end tests of ztunnel on the test bed: real network namespaces, nftables capture,
//! HBONE with mTLS between node namespaces, authorization, metrics and draining.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use testbed::cluster::{ALT_PORT, Cluster, ClusterSpec, ECHO_PORT, ECHO_VIP, PodDef, ServiceDef};

const VIP: Ipv4Addr = ECHO_VIP;

/// node1: client (mesh), outsider (not in the mesh); node2: server-a, server-b (mesh, service "echo").
fn spec(policies: &str) -> ClusterSpec {
    ClusterSpec {
        control_plane: Default::default(),
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("outsider", "outsider", 0, false),
            PodDef::new("server-a", "echo", 1, true),
            PodDef::new("server-b", "echo", 1, true),
        ],
        services: vec![ServiceDef::echo()],
        policies: policies.into(),
        ztunnel_args: vec![],
        ..Default::default()
    }
}

/// Namespace-wide: no connection to port 9090 of demo's pods.
const DENY_ALT_PORT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-alt-port, namespace: demo}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"9090\"]}}]}]\n---\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_to_pod_over_hbone_with_identity() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    let server = c.pod_ip("server-a");
    let mut capture = Some(c.bed.capture(0).unwrap());
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let marker = b"PLAINTEXT-MARKER-0123456789";
    let mut sent = marker.to_vec();
    sent.extend_from_slice(&payload);
    let answer = c
        .exchange("client", SocketAddr::new(server, ECHO_PORT), &sent)
        .await
        .unwrap();
    let (greeting, echoed) = split_greeting(&answer);
    assert!(greeting.starts_with("pod=server-a port=8080"), "{greeting}");
    let client = c.pod_ip("client");
    assert!(
        greeting.contains(&format!("peer={client}:")),
        "the app sees the client pod's address: {greeting}"
    );
    assert_eq!(echoed, &sent[..], "payload intact");
    let report = capture.take().unwrap().stop();
    report.tls_only_on(15008).unwrap();
    assert!(!report.contains(marker), "plaintext crossed the node link");
    assert!(report.server_ports().contains(&15008));

    let client_id = c.identity("client").to_string();
    let seen = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &client_id),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(seen, 1.0, "server-side ztunnel saw the client identity");
    let sent_bytes = c
        .metric(
            1,
            "istio_tcp_sent_bytes_total",
            &[("reporter", "destination")],
        )
        .await
        .unwrap();
    assert_eq!(sent_bytes as usize, sent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_vip_balances_over_healthy_endpoints() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..6 {
        let msg = format!("via-vip-{i}");
        let answer = c
            .exchange("client", SocketAddr::new(VIP.into(), 80), msg.as_bytes())
            .await
            .unwrap();
        let (greeting, echoed) = split_greeting(&answer);
        assert_eq!(echoed, msg.as_bytes());
        seen.insert(greeting.split_whitespace().next().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "both endpoints used: {seen:?}");
    let by_service = c
        .metric(
            0,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("destination_service", "echo.demo.svc.cluster.local"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(by_service, 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_policy_refuses_before_the_app() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec(DENY_ALT_PORT)).await.unwrap();
    let server = c.pod_ip("server-a");
    let before = c
        .app_stats("server-a")
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    let answer = c
        .exchange(
            "client",
            SocketAddr::new(server, ALT_PORT),
            b"should not arrive",
        )
        .await
        .unwrap_or_default();
    assert!(answer.is_empty(), "denied connection got data: {answer:?}");
    // Allowed port still works.
    let ok = c
        .exchange("client", SocketAddr::new(server, ECHO_PORT), b"fine")
        .await
        .unwrap();
    assert!(ok.ends_with(b"fine"));
    let after = c
        .app_stats("server-a")
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        after - before,
        1,
        "only the allowed connection reached the app"
    );
    let log = std::fs::read_to_string(c.ztunnel_log(0)).unwrap();
    assert!(log.contains("401"), "client ztunnel saw the 401:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_from_outside_the_mesh_goes_through_15006() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    let server = c.pod_ip("server-a");
    let answer = c
        .exchange(
            "outsider",
            SocketAddr::new(server, ECHO_PORT),
            b"hello from outside",
        )
        .await
        .unwrap();
    assert!(answer.ends_with(b"hello from outside"));
    let (greeting, _) = split_greeting(&answer);
    let outsider = c.pod_ip("outsider");
    assert!(
        greeting.contains(&format!("peer={outsider}:")),
        "the app sees the outsider's address: {greeting}"
    );
    let plaintext = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(plaintext, 1.0);

    // Many plaintext clients at once, delivered from their own address: a delivery's port
    // never lands on a live client's port (29 of 3000 such connections used to fail).
    let dst = SocketAddr::new(server, ECHO_PORT);
    let mut failed = 0;
    for batch in 0..10 {
        let mut open = tokio::task::JoinSet::new();
        for i in 0..100 {
            let s = c.connect_from("outsider", dst).await.unwrap();
            let msg = format!("batch {batch} client {i}");
            open.spawn(async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    testbed::cluster::exchange_on(s, msg.as_bytes()),
                )
                .await;
                matches!(answer, Ok(Ok(a)) if a.ends_with(msg.as_bytes()))
            });
        }
        failed += open.join_all().await.into_iter().filter(|ok| !ok).count();
    }
    assert_eq!(failed, 0, "plaintext connections failed out of 1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_pod_reaches_pod_outside_the_mesh_directly() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    let outsider = c.pod_ip("outsider");
    let answer = c
        .exchange(
            "server-a",
            SocketAddr::new(outsider, ECHO_PORT),
            b"to outsider",
        )
        .await
        .unwrap();
    assert!(answer.ends_with(b"to outsider"));
    let plain = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", "none"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(plain, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_applies_without_restart_and_bad_config_is_kept_out() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    let server = SocketAddr::new(c.pod_ip("server-a"), ALT_PORT);
    assert!(!c.exchange("client", server, b"x").await.unwrap().is_empty());
    // An invalid edit is rejected, named by file, object and field, and the last good version
    // stays in force.
    let good = c.kubernetes_yaml();
    let ip = format!("podIP: \"{}\"", c.pod_ip("server-a"));
    assert!(good.contains(&ip));
    c.write_pilot_file("mesh.yaml", &good.replace(&ip, "podIP: \"not-an-ip\""))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!c.exchange("client", server, b"x").await.unwrap().is_empty());
    let log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    assert!(
        log.contains(
            "mesh.yaml: Pod demo/server-a: field \"status.podIP\": \"not-an-ip\" is not an IP address; the last good version stays"
        ),
        "{log}"
    );
    // A DENY policy takes effect on the next connection.
    c.write_pilot_file("mesh.yaml", &good).unwrap();
    c.write_pilot_file("policy.yaml", DENY_ALT_PORT).unwrap();
    let mut denied = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.exchange("client", server, b"x")
            .await
            .unwrap_or_default()
            .is_empty()
        {
            denied = true;
            break;
        }
    }
    assert!(denied, "DENY policy applied within 4 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_connections() {
    if !testbed::can_run() {
        return;
    }
    let mut c = Cluster::start(spec("")).await.unwrap();
    let server = SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT);
    let s = c.connect_from("client", server).await.unwrap();
    // Make sure the tunnel is established before the drain starts.
    let (mut r, mut w) = s.into_split();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut greeting = [0u8; 5];
    r.read_exact(&mut greeting).await.unwrap();
    let pid = c.ztunnel_pid(1).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // Longer than two reconcile ticks (500 ms): a draining ztunnel used to re-enroll its pods
    // within that time and accept connections its exit then cut.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The server-side ztunnel is draining: the open connection still carries data.
    w.write_all(b"after-sigterm").await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.ends_with(b"after-sigterm"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    let status = c.stop_ztunnel(1).unwrap();
    assert!(status.success(), "ztunnel exit: {status}");
    let log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    assert!(log.contains("all connections finished"), "{log}");
    let after_sigterm = log
        .split("SIGTERM: draining")
        .nth(1)
        .expect("SIGTERM logged");
    assert!(
        !after_sigterm.contains("pod enrolled"),
        "a draining ztunnel enrolled a pod again:\n{after_sigterm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_behind_the_mesh_is_refused_at_once() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    // Nothing listens on 7 in server-a. The delivery's reset must come back over `lo` (the
    // pod reflects the delivery mark on it), so the client's connection ends at once; before,
    // the reset took the pod's default route and the delivery waited for its 10 s timeout.
    let dst = SocketAddr::new(c.pod_ip("server-a"), 7);
    let started = std::time::Instant::now();
    if let Ok(s) = c.connect_from("client", dst).await {
        let answer = tokio::time::timeout(
            Duration::from_secs(8),
            testbed::cluster::exchange_on(s, b"anyone?"),
        )
        .await
        .expect("the connection to a closed port ended");
        assert!(answer.map(|a| a.is_empty()).unwrap_or(true));
    }
    println!(
        "closed port: connection ended after {:?}",
        started.elapsed()
    );
    // Unenrolling restores the sysctl; while enrolled it is on in the pod.
    let reflect = c
        .pod_command("server-a", &["cat", "/proc/sys/net/ipv4/fwmark_reflect"])
        .unwrap();
    assert_eq!(reflect.trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_dump_lists_pods_and_certificates() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    let (status, body) = c.http_get(1, 15000, "/config_dump").await.unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pods: Vec<&str> = dump["enrolledPods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pods, vec!["server-a", "server-b"]);
    // Thread-per-core (the default runtime, unless ZTUNNEL_RUNTIME says otherwise): each pod
    // is placed on a core, two pods on two cores when there are two; the shared runtime has
    // no cores to show.
    let runtime = std::env::var("ZTUNNEL_RUNTIME").unwrap_or_else(|_| "per-core".into());
    let cores: Vec<Option<u64>> = dump["enrolledPods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["core"].as_u64())
        .collect();
    if runtime == "per-core" {
        assert!(
            cores.iter().all(Option::is_some),
            "a core for each pod: {cores:?}"
        );
        if std::thread::available_parallelism().map_or(1, usize::from) >= 2 {
            assert_ne!(cores[0], cores[1], "two pods on two cores: {cores:?}");
        }
    } else {
        assert!(cores.iter().all(Option::is_none), "{cores:?}");
    }
    let certs = dump["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1, "one identity (sa echo) on node2: {certs:?}");
    assert_eq!(
        certs[0]["identity"],
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    assert!(certs[0]["notAfter"].as_u64().unwrap() > certs[0]["notBefore"].as_u64().unwrap());
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 4);
    let _: IpAddr = dump["services"][0]["addresses"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
}

fn split_greeting(answer: &[u8]) -> (String, &[u8]) {
    let nl = answer
        .iter()
        .position(|&b| b == b'\n')
        .expect("greeting line");
    (
        String::from_utf8_lossy(&answer[..nl]).to_string(),
        &answer[nl + 1..],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_without_process_is_pending_and_node_stays_ready() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    // A mesh pod on node2 that the test bed never made (no cgroup, no process).
    let ghost = "apiVersion: v1\nkind: Pod\nmetadata: {name: ghost, namespace: demo, uid: 00000000-0000-4000-8000-00000000dead}\nspec: {nodeName: node2}\nstatus: {phase: Running, podIP: \"10.244.2.99\"}\n";
    c.write_pilot_file("ghost.yaml", ghost).unwrap();
    let mut pending = serde_json::Value::Null;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, body) = c.http_get(1, 15000, "/config_dump").await.unwrap();
        let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
        if dump["pendingPods"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
        {
            pending = dump["pendingPods"].clone();
            break;
        }
    }
    assert_eq!(pending[0]["name"], "ghost", "{pending}");
    assert!(
        pending[0]["reason"].as_str().unwrap().contains("no cgroup"),
        "{pending}"
    );
    let (status, _) = c.http_get(1, 15021, "/healthz/ready").await.unwrap();
    assert_eq!(status, 200);
    // The real pods are still served.
    let answer = c
        .exchange(
            "client",
            SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT),
            b"still here",
        )
        .await
        .unwrap();
    assert!(answer.ends_with(b"still here"));
}

/// Who calls server-a in the source-preservation tests: over HBONE across nodes, over HBONE on
/// the same node, and as plaintext from outside the mesh (captured into 15006); each over IPv4
/// and over IPv6 (the test bed is dual-stack).
const CALLERS: [&str; 3] = ["client", "server-b", "outsider"];

/// `pod`'s address in the family asked for.
fn ip_of(c: &Cluster, pod: &str, v6: bool) -> IpAddr {
    if v6 { c.pod_ip6(pod) } else { c.pod_ip(pod) }
}

/// The peer address server-a's application saw for one exchange from `from`.
async fn peer_seen_by_the_app(c: &Cluster, from: &str, v6: bool) -> IpAddr {
    let server = SocketAddr::new(ip_of(c, "server-a", v6), ECHO_PORT);
    let answer = c.exchange(from, server, b"who am I").await.unwrap();
    assert!(answer.ends_with(b"who am I"), "{from} -> {server}: echoed");
    let (greeting, _) = split_greeting(&answer);
    let peer = greeting
        .split_once("peer=")
        .and_then(|(_, p)| p.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("{from}: no peer address in the greeting {greeting:?}"));
    peer.ip()
}

/// `rounds` sequential exchanges from each of [`CALLERS`] in both families: each one's peer
/// address as the app saw it must be `expected(caller, v6)`, and each reached the app exactly
/// once (a delivery captured again into 15006 would loop, or be counted twice).
async fn check_app_peers(c: &Cluster, rounds: usize, expected: impl Fn(&str, bool) -> IpAddr) {
    let accepted = || {
        c.app_stats("server-a")
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = accepted();
    for _ in 0..rounds {
        for from in CALLERS {
            for v6 in [false, true] {
                let seen = peer_seen_by_the_app(c, from, v6).await;
                let family = if v6 { "IPv6" } else { "IPv4" };
                assert_eq!(
                    seen,
                    expected(from, v6),
                    "peer address the app saw for {from} over {family}"
                );
            }
        }
    }
    let exchanges = rounds * CALLERS.len() * 2;
    assert_eq!(accepted() - before, exchanges as u64);
    let inbound = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")],
        )
        .await
        .unwrap();
    assert_eq!(
        inbound, exchanges as f64,
        "inbound connections on node2: each delivery was proxied once"
    );
}

/// `sourcePreserved` of each pod enrolled on node2, from `/config_dump`.
async fn source_preserved(c: &Cluster) -> Vec<bool> {
    let (_, body) = c.http_get(1, 15000, "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pods = dump["enrolledPods"].as_array().cloned().unwrap_or_default();
    assert_eq!(pods.len(), 2, "{body}");
    pods.iter()
        .map(|p| p["sourcePreserved"].as_bool().expect("sourcePreserved"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_sees_the_client_address() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    assert!(c.has_source_routing("server-a").unwrap());
    check_app_peers(&c, 3, |from, v6| ip_of(&c, from, v6)).await;
    assert_eq!(source_preserved(&c).await, vec![true, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_sees_the_client_address_with_nftables_capture() {
    if !testbed::can_run() {
        return;
    }
    let mut s = spec("");
    s.ztunnel_args = vec!["--redirect".into(), "nftables".into()];
    let c = Cluster::start(s).await.unwrap();
    assert!(c.has_source_routing("server-a").unwrap());
    check_app_peers(&c, 3, |from, v6| ip_of(&c, from, v6)).await;
    assert_eq!(source_preserved(&c).await, vec![true, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_source_off_delivers_from_the_pod_address() {
    if !testbed::can_run() {
        return;
    }
    let mut s = spec("");
    s.ztunnel_args = vec!["--preserve-source".into(), "off".into()];
    let c = Cluster::start(s).await.unwrap();
    check_app_peers(&c, 1, |_, v6| ip_of(&c, "server-a", v6)).await;
    let routing = c.source_routing("server-a").unwrap();
    assert!(routing.absent(), "no routing set up: {routing:?}");
    assert_eq!(source_preserved(&c).await, vec![false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_preservation_needs_no_iproute2() {
    if !testbed::can_run() {
        return;
    }
    // An image without iproute2: the pod routing is made over netlink, so nothing is missing.
    // Only `nsenter` on the PATH (eBPF capture runs no program at all).
    let bin = std::env::temp_dir().join(format!("ztunnel-test-no-ip-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("nsenter");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(which("nsenter"), &link).unwrap();
    let mut s = spec("");
    s.ztunnel_env = vec![("PATH".into(), bin.display().to_string())];
    let c = Cluster::start(s).await.unwrap();
    let log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    assert!(
        !log.contains("cannot preserve client addresses"),
        "no warning:\n{log}"
    );
    assert!(c.has_source_routing("server-a").unwrap());
    check_app_peers(&c, 1, |from, v6| ip_of(&c, from, v6)).await;
    assert_eq!(source_preserved(&c).await, vec![true, true]);
    let _ = std::fs::remove_dir_all(&bin);
}

/// The absolute path of `tool`, from this process's PATH.
fn which(tool: &str) -> std::path::PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not on the PATH"))
}

/// Number of open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// From the mesh pod `client`, connect to each of ztunnel's own listeners (in the pod, and the
/// node's metrics port): every connection must end within seconds, ztunnel must not open
/// sockets for it, and every one that reached a proxy listener is counted as refused.
async fn own_listeners_refused(c: &Cluster) {
    let pod = c.pod_ip("client");
    let pod6 = c.pod_ip6("client");
    let node = c.bed.node(0).pod_gateway;
    let pid = c.ztunnel_pid(0).expect("ztunnel running");
    let before = fd_count(pid);
    let targets: Vec<SocketAddr> = vec![
        "127.0.0.1:15001".parse().unwrap(),
        "[::1]:15001".parse().unwrap(),
        SocketAddr::new(pod, 15001),
        SocketAddr::new(pod, 15006),
        SocketAddr::new(pod, 15008),
        SocketAddr::new(pod, 15053),
        SocketAddr::new(pod6, 15001),
        SocketAddr::new(pod6, 15006),
        SocketAddr::new(node.into(), 15020),
        SocketAddr::new(node.into(), 15021),
    ];
    for dst in &targets {
        let started = std::time::Instant::now();
        // Refused at connect, or accepted and then closed without an answer: both are fine;
        // what is not is a connection that stays open or an answer from a proxy port.
        if let Ok(s) = c.connect_from("client", *dst).await {
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                testbed::cluster::exchange_on(s, b"GET / HTTP/1.0\r\n\r\n"),
            )
            .await
            .unwrap_or_else(|_| panic!("connection to {dst} still open after 5 s"));
            if let Ok(answer) = answer {
                // The pod's HBONE port is a TLS server that peers must reach: to plaintext it
                // answers with a TLS alert (0x15) and closes. Nothing else may answer.
                let tls_alert = dst.port() == 15008 && answer.first() == Some(&0x15);
                assert!(
                    answer.is_empty() || tls_alert,
                    "{dst} answered: {:?}",
                    String::from_utf8_lossy(&answer)
                );
            }
        }
        println!("{dst}: ended after {:?}", started.elapsed());
    }
    // Held open for a moment: a loop would have opened thousands of sockets by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = fd_count(pid);
    println!("ztunnel file descriptors: {before} before, {after} after");
    assert!(
        after < before + 20,
        "ztunnel went from {before} to {after} fds"
    );
    let refused = c
        .metric(0, "ztunnel_self_loop_connections_refused_total", &[])
        .await
        .unwrap();
    println!("refused as aimed at ztunnel's own listeners: {refused}");
    assert!(
        refused >= 1.0,
        "the guard refused at least the loopback case"
    );
    // The mesh still works afterwards.
    let answer = c
        .exchange("client", SocketAddr::new(VIP.into(), 80), b"still-fine")
        .await
        .unwrap();
    assert!(split_greeting(&answer).1 == b"still-fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_ztunnels_own_listeners_are_refused() {
    if !testbed::can_run() {
        return;
    }
    let c = Cluster::start(spec("")).await.unwrap();
    own_listeners_refused(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_ztunnels_own_listeners_are_refused_with_nftables_capture() {
    if !testbed::can_run() {
        return;
    }
    let mut s = spec("");
    s.ztunnel_args = vec!["--redirect".into(), "nftables".into()];
    let c = Cluster::start(s).await.unwrap();
    own_listeners_refused(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_move_while_a_connection_is_open() {
    if !testbed::can_run() {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::start(spec("")).await.unwrap();
    let server = SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT);
    let mut s = c.connect_from("client", server).await.unwrap();
    let mut greeting = [0u8; 5];
    s.read_exact(&mut greeting).await.unwrap();
    let payload = vec![7u8; 100_000];
    s.write_all(&payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    s.read_exact(&mut echoed).await.unwrap();
    // The connection is still open: both ztunnels already count what it carried.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let sent = c
            .metric(
                node,
                "istio_tcp_sent_bytes_total",
                &[("reporter", reporter)],
            )
            .await
            .unwrap();
        let received = c
            .metric(
                node,
                "istio_tcp_received_bytes_total",
                &[("reporter", reporter)],
            )
            .await
            .unwrap();
        println!("{reporter}: sent {sent}, received {received} while open");
        assert_eq!(sent as usize, payload.len(), "{reporter} request bytes");
        assert!(
            received as usize >= payload.len(),
            "{reporter} response bytes"
        );
        let closed = c
            .metric(
                node,
                "istio_tcp_connections_closed_total",
                &[("reporter", reporter)],
            )
            .await
            .unwrap();
        assert_eq!(closed, 0.0);
    }
    drop(s);
}
