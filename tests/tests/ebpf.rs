//! End-to-end tests of eBPF capture on the test bed: the programs of `ebpf/redirect` loaded by
//! real ztunnels into this kernel, attached to the test bed's kubepods cgroup and to each
//! enrolled pod's netns, with no nftables rule anywhere.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use testbed::Testbed;
use testbed::cluster::{Cluster, ClusterSpec, ECHO_PORT, PodDef, ztunnel_binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn root_or_skip() -> bool {
    match Testbed::check_privileges() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// node1: client (mesh), outsider (not in the mesh); node2: server (mesh), bystander (not).
fn spec() -> ClusterSpec {
    ClusterSpec {
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("outsider", "outsider", 0, false),
            PodDef::new("server", "echo", 1, true),
            PodDef::new("bystander", "bystander", 1, false),
        ],
        services: vec![],
        policies: String::new(),
        ztunnel_args: vec!["--redirect".into(), "ebpf".into()],
        ..Default::default()
    }
}

async fn opened(c: &Cluster, node: usize, labels: &[(&str, &str)]) -> f64 {
    c.metric(node, "istio_tcp_connections_opened_total", labels)
        .await
        .unwrap()
}

fn accepted(c: &Cluster, pod: &str) -> u64 {
    c.app_stats(pod).accepted.load(Ordering::Relaxed)
}

fn greeting(answer: &[u8]) -> String {
    let end = answer
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(answer.len());
    String::from_utf8_lossy(&answer[..end]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_capture_recovers_original_destination_and_source_pod() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    let dst = SocketAddr::new(c.pod_ip("server"), ECHO_PORT);
    let s = c.connect_from("client", dst).await.unwrap();
    // getpeername4: the application sees where it connected, not 127.0.0.1:15001.
    assert_eq!(s.peer_addr().unwrap(), dst);
    let answer = testbed::cluster::exchange_on(s, b"over ebpf")
        .await
        .unwrap();
    assert!(greeting(&answer).starts_with("pod=server port=8080"));
    assert!(answer.ends_with(b"over ebpf"));
    // The client-side ztunnel knew the destination and the source pod (its identity).
    let client_id = c.identity("client").to_string();
    let src = [
        ("reporter", "source"),
        ("source_principal", client_id.as_str()),
        ("destination_workload", "echo-v1"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(opened(&c, 0, &src).await, 1.0);
    let dst_side = [
        ("reporter", "destination"),
        ("source_principal", client_id.as_str()),
    ];
    assert_eq!(opened(&c, 1, &dst_side).await, 1.0);
    // No nftables table in any pod: capture is eBPF only.
    for pod in ["client", "outsider", "server", "bystander"] {
        let ns = testbed::netns_path(&c.bed.pod(pod).netns);
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["nft", "list", "ruleset"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "nftables rules in {pod}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_capture_lands_on_15006_and_hbone_port_is_untouched() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    let server = c.pod_ip("server");
    // From a pod outside the mesh, and from the host side (the node), to a port with no
    // ztunnel listener: captured by sk_lookup into 15006, local address = original dst.
    let answer = c
        .exchange("bystander", SocketAddr::new(server, ECHO_PORT), b"in")
        .await
        .unwrap();
    assert!(answer.ends_with(b"in"));
    let bystander = c.pod_ip("bystander");
    assert!(
        greeting(&answer).contains(&format!("peer={bystander}:")),
        "the app sees the client's address: {}",
        greeting(&answer)
    );
    let node = c.node_sockets(1).unwrap();
    let s = node
        .connect(SocketAddr::new(server, ECHO_PORT))
        .await
        .unwrap();
    let node_ip = s.local_addr().unwrap().ip();
    let answer = testbed::cluster::exchange_on(s, b"from node")
        .await
        .unwrap();
    assert!(answer.ends_with(b"from node"));
    assert!(
        greeting(&answer).contains(&format!("peer={node_ip}:")),
        "the app sees the node's address: {}",
        greeting(&answer)
    );
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(opened(&c, 1, &plain).await, 2.0);
    let log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    assert!(
        log.contains(&format!("dst={server}:8080")),
        "inbound saw the original destination:\n{log}"
    );
    // 15008 reaches ztunnel's HBONE listener directly: a TLS server that answers a plaintext
    // request by closing, and nothing counted on 15006.
    let mut s = c
        .connect_from("bystander", SocketAddr::new(server, 15008))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert_eq!(opened(&c, 1, &plain).await, 2.0, "15008 was not captured");
    assert_eq!(
        accepted(&c, "server"),
        2,
        "only the two captured connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_pod_loopback_own_ip_and_marked_sockets_go_direct() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    let outbound = [("reporter", "source")];
    // An unenrolled pod's outbound is not captured (the destination pod's inbound is).
    let answer = c
        .exchange(
            "outsider",
            SocketAddr::new(c.pod_ip("bystander"), ECHO_PORT),
            b"x",
        )
        .await
        .unwrap();
    assert!(greeting(&answer).starts_with("pod=bystander"));
    // In-pod loopback stays in the pod.
    let lo = c
        .bed
        .in_pod("client", || std::net::TcpListener::bind("127.0.0.1:7777"))
        .unwrap()
        .unwrap();
    let accept = std::thread::spawn(move || lo.accept().map(|(_, peer)| peer));
    let s = c
        .connect_from("client", "127.0.0.1:7777".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(s.peer_addr().unwrap(), "127.0.0.1:7777".parse().unwrap());
    assert!(accept.join().unwrap().unwrap().ip().is_loopback());
    // The app calling its own pod IP reaches itself directly, seeing its own address.
    let own = c.pod_ip("client");
    let answer = c
        .exchange("client", SocketAddr::new(own, ECHO_PORT), b"me")
        .await
        .unwrap();
    let g = greeting(&answer);
    assert!(
        g.starts_with("pod=client") && g.contains(&format!("peer={own}:")),
        "{g}"
    );
    // A socket with ztunnel's mark is not redirected (no loop): it goes straight to the
    // server pod, whose inbound capture counts it as plaintext.
    let fd = c.bed.pod_socket("client", false, None).unwrap();
    let sock = socket2::Socket::from(fd);
    sock.set_mark(mesh::socket::PROXY_MARK).unwrap();
    let server = SocketAddr::new(c.pod_ip("server"), ECHO_PORT);
    sock.connect(&server.into()).unwrap();
    let std: std::net::TcpStream = sock.into();
    std.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpStream::from_std(std).unwrap();
    let answer = testbed::cluster::exchange_on(s, b"marked").await.unwrap();
    assert!(answer.ends_with(b"marked"));
    assert_eq!(
        opened(&c, 0, &outbound).await,
        0.0,
        "nothing went through 15001"
    );
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(opened(&c, 1, &plain).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_guard_refuses_proxy_ports_to_applications() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    for port in [15001, 15006, 15008, 15053] {
        let err = c.bed.pod_socket("client", false, Some(port)).unwrap_err();
        let io = err
            .chain()
            .find_map(|e| e.downcast_ref::<std::io::Error>())
            .unwrap();
        assert_eq!(
            io.kind(),
            ErrorKind::PermissionDenied,
            "port {port}: {err:#}"
        );
        let err = c.bed.pod_socket("client", true, Some(port)).unwrap_err();
        assert!(
            format!("{err:#}").contains("not permitted"),
            "v6 port {port}: {err:#}"
        );
    }
    // Other ports, and the same port in a pod outside the mesh, are fine.
    c.bed.pod_socket("client", false, Some(15999)).unwrap();
    c.bed.pod_socket("outsider", false, Some(15053)).unwrap();
}

/// Connect from `pod` to `dst`; Ok(answer) or the error. Refused or reset both count as refused.
async fn try_exchange(c: &Cluster, pod: &str, dst: SocketAddr) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(5), c.exchange(pod, dst, b"try"))
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_and_keeps_capturing_across_a_restart() {
    if !root_or_skip() {
        return;
    }
    let mut c = Cluster::start(spec()).await.unwrap();
    let server = SocketAddr::new(c.pod_ip("server"), ECHO_PORT);
    let outsider = SocketAddr::new(c.pod_ip("outsider"), ECHO_PORT);
    assert!(try_exchange(&c, "bystander", server).await.is_ok());
    // ztunnel on node2 dies: the pinned programs and maps stay, the listeners are gone.
    let pid = c.ztunnel_pid(1).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_server = accepted(&c, "server");
    let before_outsider = accepted(&c, "outsider");
    // Inbound: the sockmap has no listener for the pod → dropped, never delivered around.
    assert!(try_exchange(&c, "bystander", server).await.is_err());
    // Outbound from the enrolled pod: still redirected to 15001, where nobody listens.
    assert!(try_exchange(&c, "server", outsider).await.is_err());
    assert_eq!(accepted(&c, "server"), before_server, "no bypass inbound");
    assert_eq!(
        accepted(&c, "outsider"),
        before_outsider,
        "no bypass outbound"
    );
    // A new ztunnel takes over the pinned state and capture resumes.
    c.restart_ztunnel(1).await.unwrap();
    let answer = try_exchange(&c, "bystander", server).await.unwrap();
    assert!(answer.ends_with(b"try"));
    let answer = try_exchange(&c, "server", outsider).await.unwrap();
    assert!(answer.ends_with(b"try"));
    let out = [("reporter", "source")];
    assert_eq!(
        opened(&c, 1, &out).await,
        1.0,
        "outbound captured after restart"
    );
    let log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    assert!(log.contains("eBPF capture loaded"), "{log}");
    // Links were replaced, not duplicated: one pinned sk_lookup link for the pod.
    let pods_dir = Path::new(testbed::BPFFS)
        .join(c.pin_dir_name(1))
        .join("pods");
    let pins: Vec<_> = std::fs::read_dir(&pods_dir).unwrap().flatten().collect();
    assert_eq!(pins.len(), 1, "one pinned sk_lookup link on node2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_pod_goes_direct() {
    if !root_or_skip() {
        return;
    }
    let mut c = Cluster::start(spec()).await.unwrap();
    let server = SocketAddr::new(c.pod_ip("server"), ECHO_PORT);
    assert!(try_exchange(&c, "client", server).await.is_ok());
    assert!(c.has_source_routing("client").unwrap());
    let out = [("reporter", "source")];
    assert_eq!(opened(&c, 0, &out).await, 1.0);
    // Take the client out of the mesh.
    for p in c.spec.pods.iter_mut() {
        if p.name == "client" {
            p.mesh = false;
        }
    }
    c.write_pilot_file("mesh.yaml", &c.kubernetes_yaml())
        .unwrap();
    let start = Instant::now();
    loop {
        let (_, body) = c.http_get(0, 15000, "/config_dump").await.unwrap();
        let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
        if dump["enrolledPods"]
            .as_array()
            .is_some_and(|a| a.is_empty())
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not unenrolled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = try_exchange(&c, "client", server).await.unwrap();
    assert!(answer.ends_with(b"try"));
    assert_eq!(opened(&c, 0, &out).await, 1.0, "not through 15001 any more");
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(opened(&c, 1, &plain).await, 1.0, "arrived as plaintext");
    let client = c.pod_ip("client");
    assert!(
        greeting(&answer).contains(&format!("peer={client}:")),
        "{}",
        greeting(&answer)
    );
    // The source-preservation routing goes too, once the pod's connections are drained.
    let start = Instant::now();
    while !c.source_routing("client").unwrap().absent() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "routing not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pods_dir = Path::new(testbed::BPFFS)
        .join(c.pin_dir_name(0))
        .join("pods");
    assert_eq!(
        std::fs::read_dir(&pods_dir).unwrap().count(),
        0,
        "link unpinned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_nftables_with_a_warning() {
    if !root_or_skip() {
        return;
    }
    let mut s = spec();
    // Not a bpffs: eBPF is impossible, so `auto` must use nftables and still capture.
    s.ztunnel_args = vec![
        "--redirect".into(),
        "auto".into(),
        "--bpffs".into(),
        std::env::temp_dir().display().to_string(),
    ];
    let c = Cluster::start(s).await.unwrap();
    let answer = c
        .exchange(
            "client",
            SocketAddr::new(c.pod_ip("server"), ECHO_PORT),
            b"nft",
        )
        .await
        .unwrap();
    assert!(answer.ends_with(b"nft"));
    assert_eq!(opened(&c, 0, &[("reporter", "source")]).await, 1.0);
    let log = std::fs::read_to_string(c.ztunnel_log(0)).unwrap();
    assert!(log.contains("falling back to nftables"), "{log}");
    assert!(log.contains("bpffs"), "{log}");
}

/// Run ztunnel with `--redirect ebpf` and `extra` flags, expecting it to refuse to start.
fn refuses(bed: &Testbed, dir: &Path, extra: &[&str], wrap: &[&str]) -> String {
    let ca = mesh::ca::DevCa::generate("cluster.local").unwrap();
    ca.save(&dir.join("root.pem"), &dir.join("root-key.pem"))
        .unwrap();
    // A mesh without pods.
    std::fs::write(
        dir.join("z.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: empty}\n",
    )
    .unwrap();
    let bin = ztunnel_binary().unwrap();
    let mut cmd =
        std::process::Command::new(wrap.first().copied().unwrap_or(bin.to_str().unwrap()));
    if !wrap.is_empty() {
        cmd.args(&wrap[1..]).arg(&bin);
    }
    cmd.args(["--node-name", "node1", "--redirect", "ebpf", "--admin-addr"])
        .arg("127.0.0.1:0")
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(dir.join("z.yaml"))
        .arg("--ca-cert")
        .arg(dir.join("root.pem"))
        .arg("--ca-key")
        .arg(dir.join("root-key.pem"))
        .args(["--bpf-pin-dir", &format!("{}-degraded", bed.prefix)])
        .args(extra);
    if !extra.contains(&"--cgroup-root") {
        cmd.arg("--cgroup-root").arg(bed.cgroup_root());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = bed.spawn_in_node(0, cmd).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "ztunnel started anyway");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn each_degradation_names_the_missing_feature_and_exits_non_zero() {
    if !root_or_skip() {
        return;
    }
    let bed = Testbed::new(1, &[testbed::PodSpec::new("p", "default", 0)]).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-degraded", bed.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = std::env::temp_dir().display().to_string();

    let err = refuses(&bed, &dir, &["--bpffs", &tmp], &[]);
    assert!(err.contains("bpffs") && err.contains("Linux 4.4"), "{err}");

    let err = refuses(&bed, &dir, &["--pod-cgroup", &tmp], &[]);
    assert!(
        err.contains("cgroup v2") && err.contains("Linux 4.5"),
        "{err}"
    );

    let err = refuses(&bed, &dir, &["--cgroup-root", &tmp], &[]);
    assert!(err.contains("kubepods"), "{err}");

    let err = refuses(
        &bed,
        &dir,
        &[],
        &["setpriv", "--bounding-set", "-bpf,-sys_admin", "--"],
    );
    assert!(
        err.contains("CAP_BPF") && err.contains("Linux 5.8"),
        "{err}"
    );

    let err = refuses(&bed, &dir, &["--ebpf-object", "/nonexistent/redirect"], &[]);
    assert!(err.contains("eBPF object"), "{err}");

    let _ = std::fs::remove_dir_all(&dir);
    let _ =
        std::fs::remove_dir_all(Path::new(testbed::BPFFS).join(format!("{}-degraded", bed.prefix)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_dials_the_app_from_inside_the_pod_without_being_recaptured() {
    if !root_or_skip() {
        return;
    }
    // Many sequential connections through both captures: a capture loop would time out.
    let c = Cluster::start(spec()).await.unwrap();
    let dst = SocketAddr::new(c.pod_ip("server"), ECHO_PORT);
    for i in 0..20 {
        let msg = format!("n{i}");
        let answer = c.exchange("client", dst, msg.as_bytes()).await.unwrap();
        assert!(answer.ends_with(msg.as_bytes()));
    }
    assert_eq!(accepted(&c, "server"), 20);
}

// IPv6: every pod of the test bed is dual-stack (`fd00:10:244:<node>::<n>`), its workload
// carries both addresses, and ztunnel opens IPv6 listeners next to the IPv4 ones.

/// The IPv6 address of `pod` with `port`.
fn v6(c: &Cluster, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(c.pod_ip6(pod), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_outbound_capture_carries_hbone_across_nodes_with_identities() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    let dst = v6(&c, "server", ECHO_PORT);
    let capture = c.bed.capture(0).unwrap();
    let s = c.connect_from("client", dst).await.unwrap();
    // getpeername6: the application sees where it connected, not [::1]:15001.
    assert_eq!(s.peer_addr().unwrap(), dst);
    let marker = b"IPV6-PLAINTEXT-MARKER";
    let answer = testbed::cluster::exchange_on(s, marker).await.unwrap();
    // The server app was reached over IPv6 (which source address it sees depends on how
    // ztunnel delivers, so only the family is checked here).
    let g = greeting(&answer);
    let server6 = c.pod_ip6("server");
    assert!(
        g.starts_with("pod=server port=8080") && g.contains("peer=["),
        "{g}"
    );
    assert!(answer.ends_with(marker));
    // The node link carried only TLS to 15008, over IPv6, never the marker.
    let report = capture.stop();
    report.tls_only_on(15008).unwrap();
    assert!(!report.contains(marker), "plaintext crossed the node link");
    let client6 = c.pod_ip6("client");
    assert!(
        report
            .packets()
            .iter()
            .any(|p| p.src.ip() == client6 && p.dst == SocketAddr::new(server6, 15008)),
        "no HBONE packet from {client6} to [{server6}]:15008 on the underlay"
    );
    // Both ztunnels knew both identities: the source pod from the capture (its netns), the
    // destination from mTLS.
    let client_id = c.identity("client").to_string();
    let src = [
        ("reporter", "source"),
        ("source_principal", client_id.as_str()),
        ("destination_workload", "echo-v1"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(opened(&c, 0, &src).await, 1.0);
    let dst_side = [
        ("reporter", "destination"),
        ("source_principal", client_id.as_str()),
        ("source_workload", "client-v1"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(opened(&c, 1, &dst_side).await, 1.0);
    let log = std::fs::read_to_string(c.ztunnel_log(0)).unwrap();
    assert!(
        log.contains(&format!("dst={dst}")) && log.contains(&format!("src=[{client6}]:")),
        "outbound access log with the IPv6 destination and source pod:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_socket_dialing_an_ipv4_address_is_captured_as_ipv4() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    // What dual-stack runtimes do: an AF_INET6 socket connecting to `::ffff:<IPv4>`.
    let server4 = match c.pod_ip("server") {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("not IPv4: {other}"),
    };
    let mapped = SocketAddr::new(server4.to_ipv6_mapped().into(), ECHO_PORT);
    let s = c.connect_from("client", mapped).await.unwrap();
    assert_eq!(
        s.peer_addr().unwrap(),
        mapped,
        "getpeername6 shows the mapped address"
    );
    let answer = testbed::cluster::exchange_on(s, b"mapped").await.unwrap();
    assert!(greeting(&answer).starts_with("pod=server port=8080"));
    assert!(answer.ends_with(b"mapped"));
    let client_id = c.identity("client").to_string();
    let src = [
        ("reporter", "source"),
        ("source_principal", client_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        opened(&c, 0, &src).await,
        1.0,
        "went through 15001 over HBONE"
    );
    // It reached ztunnel's IPv4 listener (127.0.0.1:15001, so the source shown is the pod's
    // IPv4 address), and the original destination is the plain IPv4 address.
    let client4 = c.pod_ip("client");
    // The access line is written when the connection's close reaches ztunnel, which may be
    // just after the answer reached the client.
    let logged = |log: &str| {
        log.lines().any(|l| {
            l.contains(&format!("dst={server4}:8080")) && l.contains(&format!("src={client4}:"))
        })
    };
    let start = std::time::Instant::now();
    let mut log = String::new();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        log = std::fs::read_to_string(c.ztunnel_log(0)).unwrap();
        if logged(&log) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(logged(&log), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_inbound_capture_lands_on_15006_with_the_original_destination() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    let dst = v6(&c, "server", ECHO_PORT);
    // From a pod outside the mesh, and from the node: sk_lookup keyed by the IPv6 destination
    // assigns both to the pod's [::]:15006 listener.
    let answer = c.exchange("bystander", dst, b"in6").await.unwrap();
    let g = greeting(&answer);
    assert!(g.starts_with("pod=server port=8080"), "{g}");
    assert!(answer.ends_with(b"in6"));
    let node = c.node_sockets(1).unwrap();
    let s = node.connect(dst).await.unwrap();
    let answer = testbed::cluster::exchange_on(s, b"from node6")
        .await
        .unwrap();
    assert!(answer.ends_with(b"from node6"));
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(opened(&c, 1, &plain).await, 2.0);
    let log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    let bystander6 = c.pod_ip6("bystander");
    assert!(
        log.contains(&format!("dst={dst}")) && log.contains(&format!("src=[{bystander6}]:")),
        "inbound saw the original IPv6 destination and the client's address:\n{log}"
    );
    // [server]:15008 over IPv6 reaches ztunnel's HBONE listener directly, not 15006.
    let mut s = c
        .connect_from("bystander", v6(&c, "server", 15008))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert_eq!(opened(&c, 1, &plain).await, 2.0, "15008 was not captured");
    assert_eq!(
        accepted(&c, "server"),
        2,
        "only the two captured connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_unenrolled_pod_loopback_and_own_address_go_direct() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    // An unenrolled pod's IPv6 traffic is not captured outbound.
    let answer = c
        .exchange("outsider", v6(&c, "bystander", ECHO_PORT), b"x6")
        .await
        .unwrap();
    let outsider6 = c.pod_ip6("outsider");
    let g = greeting(&answer);
    assert!(
        g.starts_with("pod=bystander") && g.contains(&format!("peer=[{outsider6}]:")),
        "{g}"
    );
    // In-pod [::1] stays in the pod.
    let lo = c
        .bed
        .in_pod("client", || std::net::TcpListener::bind("[::1]:7777"))
        .unwrap()
        .unwrap();
    let accept = std::thread::spawn(move || lo.accept().map(|(_, peer)| peer));
    let s = c
        .connect_from("client", "[::1]:7777".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(s.peer_addr().unwrap(), "[::1]:7777".parse().unwrap());
    assert!(accept.join().unwrap().unwrap().ip().is_loopback());
    // The app calling its own IPv6 address reaches itself directly.
    let own = c.pod_ip6("client");
    let answer = c
        .exchange("client", SocketAddr::new(own, ECHO_PORT), b"me6")
        .await
        .unwrap();
    let g = greeting(&answer);
    assert!(
        g.starts_with("pod=client") && g.contains(&format!("peer=[{own}]:")),
        "{g}"
    );
    assert_eq!(
        opened(&c, 0, &[("reporter", "source")]).await,
        0.0,
        "nothing went through 15001"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_cluster_ip_of_a_dual_stack_service_from_pilot() {
    if !root_or_skip() {
        return;
    }
    let mut s = spec();
    // pilot translates the Kubernetes objects: Pods with `status.podIPs` (both families) and a
    // Service with `clusterIPs`/`ipFamilies: [IPv4, IPv6]`.
    s.control_plane = testbed::cluster::ControlPlaneMode::Pilot;
    s.services = vec![testbed::cluster::ServiceDef::echo()];
    let c = Cluster::start(s).await.unwrap();
    let yaml = c.kubernetes_yaml();
    assert!(yaml.contains("ipFamilies: [IPv4, IPv6]"), "{yaml}");
    let vip6 = SocketAddr::new(testbed::cluster::ECHO_VIP6.into(), 80);
    let answer = c.exchange("client", vip6, b"vip6").await.unwrap();
    let g = greeting(&answer);
    let server6 = c.pod_ip6("server");
    assert!(
        g.starts_with("pod=server port=8080") && g.contains("peer=["),
        "the IPv6 VIP leads to the endpoint over IPv6: {g}"
    );
    assert!(answer.ends_with(b"vip6"));
    // The IPv4 ClusterIP of the same service still works.
    let vip4 = SocketAddr::new(testbed::cluster::ECHO_VIP.into(), 80);
    let answer = c.exchange("client", vip4, b"vip4").await.unwrap();
    assert!(greeting(&answer).starts_with("pod=server port=8080"));
    let client_id = c.identity("client").to_string();
    let by_service = [
        ("reporter", "source"),
        ("source_principal", client_id.as_str()),
        ("destination_service", "echo.demo.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(opened(&c, 0, &by_service).await, 2.0);
    let log = std::fs::read_to_string(c.ztunnel_log(0)).unwrap();
    assert!(
        log.contains(&format!("dst={vip6}")) && log.contains(&format!("target=[{server6}]:8080")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_capture_with_nftables() {
    if !root_or_skip() {
        return;
    }
    let mut s = spec();
    s.ztunnel_args = vec!["--redirect".into(), "nftables".into()];
    let c = Cluster::start(s).await.unwrap();
    // Outbound: the output chain redirects to [::1]:15001; SO_ORIGINAL_DST (IPv6) recovers it.
    let dst = v6(&c, "server", ECHO_PORT);
    let answer = c.exchange("client", dst, b"nft6").await.unwrap();
    assert!(greeting(&answer).starts_with("pod=server port=8080"));
    assert!(answer.ends_with(b"nft6"));
    let client_id = c.identity("client").to_string();
    let src = [
        ("reporter", "source"),
        ("source_principal", client_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(opened(&c, 0, &src).await, 1.0);
    // Inbound plaintext from outside the mesh: prerouting redirects to 15006.
    let answer = c.exchange("bystander", dst, b"in-nft6").await.unwrap();
    assert!(answer.ends_with(b"in-nft6"));
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(opened(&c, 1, &plain).await, 1.0);
    let log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    assert!(log.contains(&format!("dst={dst}")), "{log}");
    // Captured by the pod's nftables rules (one `inet` table for both families), not eBPF.
    let ns = testbed::netns_path(&c.bed.pod("client").netns);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["nft", "list", "ruleset"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(rules.contains("table inet ztunnel"), "{rules}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_probe_addresses_are_not_captured_in_either_family() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec()).await.unwrap();
    // The node owns the addresses kubelet probes come from (Istio's CNI SNATs probes to them);
    // the pod answers through its default route to the node.
    let probe4: std::net::IpAddr = "169.254.7.127".parse().unwrap();
    let probe6: std::net::IpAddr = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff".parse().unwrap();
    let node_ns = c.bed.node(1).netns.clone();
    for (ip, extra) in [(probe4, &[][..]), (probe6, &["nodad"][..])] {
        let status = std::process::Command::new("ip")
            .args(["-n", &node_ns, "addr", "add", &ip.to_string()])
            .args(["dev", "br0"])
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success(), "adding {ip} to node2");
    }
    let node = c.node_sockets(1).unwrap();
    for (src, dst) in [
        (probe4, SocketAddr::new(c.pod_ip("server"), ECHO_PORT)),
        (probe6, v6(&c, "server", ECHO_PORT)),
    ] {
        let socket = node.tcp_socket(&dst).unwrap();
        socket.bind(SocketAddr::new(src, 0)).unwrap();
        let s = tokio::time::timeout(Duration::from_secs(5), socket.connect(dst))
            .await
            .unwrap()
            .unwrap();
        let answer = testbed::cluster::exchange_on(s, b"probe").await.unwrap();
        let g = greeting(&answer);
        // The app saw the probe address itself: nothing in between.
        let shown = SocketAddr::new(src, 1).to_string();
        let shown = shown.trim_end_matches(":1");
        assert!(g.contains(&format!("peer={shown}:")), "{src}: {g}");
    }
    let plain = [("reporter", "destination")];
    assert_eq!(opened(&c, 1, &plain).await, 0.0, "not through 15006");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_only_pods_are_enrolled_and_meshed() {
    if !root_or_skip() {
        return;
    }
    // An IPv6-only client and server (no IPv4 address or route in the pod, one address in
    // their workloads), a dual-stack bystander outside the mesh, the dual-stack echo service.
    let mut s = spec();
    for p in s.pods.iter_mut() {
        if p.name == "client" || p.name == "server" {
            p.ipv6_only = true;
        }
    }
    s.services = vec![testbed::cluster::ServiceDef::echo()];
    let c = Cluster::start(s).await.unwrap();
    assert!(
        c.kubernetes_yaml()
            .contains(&format!("podIPs: [{{ip: \"{}\"}}]", c.pod_ip6("client")))
    );
    let (_, dump) = c.http_get(0, 15000, "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let enrolled: Vec<&str> = dump["enrolledPods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(enrolled, ["client"], "{dump}");
    // Pod to pod and to the service's IPv6 ClusterIP, over HBONE between IPv6 addresses.
    let dst = v6(&c, "server", ECHO_PORT);
    let s = c.connect_from("client", dst).await.unwrap();
    assert_eq!(s.peer_addr().unwrap(), dst);
    let answer = testbed::cluster::exchange_on(s, b"v6only").await.unwrap();
    assert!(greeting(&answer).starts_with("pod=server port=8080"));
    assert!(answer.ends_with(b"v6only"));
    // Delivered from the client's address (source preservation, IPv6 only).
    let client = c.pod_ip6("client");
    assert!(
        greeting(&answer).contains(&format!("peer=[{client}]:")),
        "{}",
        greeting(&answer)
    );
    let vip6 = SocketAddr::new(testbed::cluster::ECHO_VIP6.into(), 80);
    let answer = c.exchange("client", vip6, b"vip").await.unwrap();
    assert!(greeting(&answer).starts_with("pod=server port=8080"));
    let client_id = c.identity("client").to_string();
    let mtls = [
        ("reporter", "destination"),
        ("source_principal", client_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(opened(&c, 1, &mtls).await, 2.0);
    // Inbound from outside the mesh, captured on the server's IPv6 15006 listener.
    let answer = c.exchange("bystander", dst, b"in").await.unwrap();
    assert!(answer.ends_with(b"in"));
    let bystander = c.pod_ip6("bystander");
    assert!(
        greeting(&answer).contains(&format!("peer=[{bystander}]:")),
        "{}",
        greeting(&answer)
    );
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(opened(&c, 1, &plain).await, 1.0);
}
