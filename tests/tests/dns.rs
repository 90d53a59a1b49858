//! End-to-end tests of DNS capture and ztunnel's in-pod DNS proxy on the test bed: glibc's real
//! resolver (`getent`, with a resolv.conf bind-mounted in its own mount namespace) and raw
//! sockets in enrolled pods, under eBPF and nftables capture, against a small DNS server the
//! test runs as the upstream resolver.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::Testbed;
use testbed::cluster::{Cluster, ClusterSpec, ECHO_VIP, ECHO_VIP6, PodDef, ServiceDef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The resolver address the pods' resolv.conf names: nothing listens there, so only a captured
/// query gets an answer.
const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
/// A name only the upstream knows, and its address (TEST-NET-1: never contacted).
const EXTERNAL_NAME: &str = "external.example";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// What the upstream (the "cluster DNS") says for the echo service: not its VIP, so an answer
/// tells who gave it.
const UPSTREAM_ECHO_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 99, 99);
const ECHO_HOST: &str = "echo.demo.svc.cluster.local";

fn root_or_skip() -> bool {
    match Testbed::check_privileges() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// node1: client (mesh, namespace demo), outsider (not in the mesh); the echo service's VIP.
fn spec(redirect: &str) -> ClusterSpec {
    ClusterSpec {
        nodes: 1,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("outsider", "outsider", 0, false),
        ],
        services: vec![ServiceDef::echo()],
        ztunnel_args: vec!["--redirect".into(), redirect.into()],
        ..Default::default()
    }
}

/// A query the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    transport: &'static str,
    peer: IpAddr,
}

/// The test's upstream resolver, on the address the cluster's ztunnels forward to (node 0's pod
/// gateway, port 53), UDP and TCP. It knows [`EXTERNAL_NAME`] and [`ECHO_HOST`] (with
/// [`UPSTREAM_ECHO_IP`]) and says NXDOMAIN to the rest. Written apart from ztunnel's codec.
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Upstream {
    async fn start(c: &Cluster) -> Upstream {
        let addr = SocketAddr::new(c.dns_upstream().into(), 53);
        let (udp, tcp) = c
            .bed
            .in_node(0, move || {
                let udp = std::net::UdpSocket::bind(addr)?;
                let tcp = std::net::TcpListener::bind(addr)?;
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                Ok::<_, std::io::Error>((udp, tcp))
            })
            .unwrap()
            .unwrap();
        let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
        let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
        let seen = Arc::new(Mutex::new(vec![]));
        let log = seen.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                if let Some((name, resp)) = upstream_response(&buf[..n]) {
                    log.lock().unwrap().push(Seen {
                        name,
                        transport: "udp",
                        peer: peer.ip(),
                    });
                    let _ = udp.send_to(&resp, peer).await;
                }
            }
        });
        let log = seen.clone();
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut s, peer)) = tcp.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    while let Ok(len) = s.read_u16().await {
                        let mut q = vec![0u8; usize::from(len)];
                        if s.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        let Some((name, resp)) = upstream_response(&q) else {
                            return;
                        };
                        log.lock().unwrap().push(Seen {
                            name,
                            transport: "tcp",
                            peer: peer.ip(),
                        });
                        let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&resp);
                        if s.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Upstream {
            seen,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The question's name (no compression, as stub resolvers send it) and its type.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut pos = 12;
    let mut labels = vec![];
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(pos..pos + len)?).to_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    Some((labels.join("."), qtype, pos + 4))
}

/// The upstream's answer: A records for the names it knows, NXDOMAIN otherwise.
fn upstream_response(query: &[u8]) -> Option<(String, Vec<u8>)> {
    let (name, qtype, end) = question(query)?;
    let ip = match name.as_str() {
        EXTERNAL_NAME => Some(EXTERNAL_IP),
        ECHO_HOST => Some(UPSTREAM_ECHO_IP),
        _ => None,
    };
    let records = u8::from(ip.is_some() && qtype == 1);
    let rcode = if ip.is_some() { 0 } else { 3 };
    let mut resp = vec![
        query[0],
        query[1],
        0x81,
        0x80 | rcode,
        0,
        1,
        0,
        records,
        0,
        0,
        0,
        0,
    ];
    resp.extend_from_slice(&query[12..end]);
    if let (Some(ip), 1) = (ip, records) {
        resp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        resp.extend_from_slice(&ip.octets());
    }
    Some((name, resp))
}

/// A stub resolver's query for `name` (type A = 1).
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = vec![(id >> 8) as u8, id as u8, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    m
}

/// The IPv4 addresses in a response's answer section (names as pointers or labels).
fn answer_ips(resp: &[u8]) -> Vec<Ipv4Addr> {
    let Some((_, _, mut pos)) = question(resp) else {
        return vec![];
    };
    let ancount = u16::from_be_bytes([resp[6], resp[7]]);
    let mut out = vec![];
    for _ in 0..ancount {
        while resp[pos] != 0 && resp[pos] & 0xc0 == 0 {
            pos += 1 + usize::from(resp[pos]);
        }
        pos += if resp[pos] == 0 { 1 } else { 2 };
        let rtype = u16::from_be_bytes([resp[pos], resp[pos + 1]]);
        let len = usize::from(u16::from_be_bytes([resp[pos + 8], resp[pos + 9]]));
        if rtype == 1 && len == 4 {
            let d = &resp[pos + 10..pos + 14];
            out.push(Ipv4Addr::new(d[0], d[1], d[2], d[3]));
        }
        pos += 10 + len;
    }
    out
}

fn rcode(resp: &[u8]) -> u8 {
    resp[3] & 0x0f
}

/// glibc's resolver in `pod` (its cgroup and netns) with `resolv_conf` as /etc/resolv.conf:
/// `getent <db> <name>`'s addresses, in order, each once.
async fn getent(
    c: &Cluster,
    pod: &str,
    resolv_conf: &str,
    db: &str,
    name: &str,
) -> anyhow::Result<Vec<IpAddr>> {
    static N: AtomicU64 = AtomicU64::new(0);
    let file = c
        .dir
        .join(format!("resolv-{}.conf", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&file, resolv_conf)?;
    let mut cmd = tokio::process::Command::new("unshare");
    // A private mount namespace, so the bind mount is this process's alone.
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/resolv.conf && exec getent "$1" "$2""#)
        .arg(&file)
        .arg(db)
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = c.bed.spawn_in_pod_async(pod, cmd)?;
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await??;
    anyhow::ensure!(
        out.status.success(),
        "getent {db} {name} in {pod} with\n{resolv_conf}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ips: Vec<IpAddr> = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(ip) = line.split_whitespace().next().and_then(|w| w.parse().ok())
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// A Kubernetes pod's resolv.conf naming `server`, with short timeouts so a failure is quick.
fn resolv_conf(server: Ipv4Addr, tcp: bool) -> String {
    format!(
        "nameserver {server}\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1{}\n",
        if tcp { " use-vc" } else { "" }
    )
}

async fn dns_metric(c: &Cluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    c.metric(0, name, labels).await.unwrap()
}

fn udp_socket(fd: OwnedFd) -> tokio::net::UdpSocket {
    let s = std::net::UdpSocket::from(fd);
    s.set_nonblocking(true).unwrap();
    tokio::net::UdpSocket::from_std(s).unwrap()
}

async fn recv_from(s: &tokio::net::UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 4096];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
        .await
        .expect("no DNS reply within 5 s")
        .unwrap();
    (buf[..n].to_vec(), from)
}

fn ip(v4: Ipv4Addr) -> IpAddr {
    IpAddr::V4(v4)
}

/// The checks shared by eBPF and nftables: glibc in an enrolled pod gets mesh names from the
/// proxy and the rest from upstream, over UDP and TCP; the upstream sees only forwarded
/// queries, from the pod's own address.
async fn resolves_through_the_proxy(c: &Cluster, up: &Upstream) {
    let udp = resolv_conf(CLUSTER_DNS, false);
    let tcp = resolv_conf(CLUSTER_DNS, true);
    for (conf, transport) in [(&udp, "udp"), (&tcp, "tcp")] {
        for name in [ECHO_HOST, "echo"] {
            let got = getent(c, "client", conf, "ahostsv4", name).await.unwrap();
            assert_eq!(got, [ip(ECHO_VIP)], "{name} over {transport}");
        }
        let got = getent(c, "client", conf, "ahostsv4", EXTERNAL_NAME)
            .await
            .unwrap();
        assert_eq!(got, [ip(EXTERNAL_IP)], "{EXTERNAL_NAME} over {transport}");
        let labels = [("request_protocol", transport), ("request_query_type", "a")];
        let requests = dns_metric(c, "istio_dns_requests_total", &labels).await;
        let forwarded = dns_metric(c, "istio_dns_upstream_requests_total", &labels).await;
        assert!(
            forwarded >= 1.0 && requests - forwarded >= 2.0,
            "{transport}: {requests} requests, {forwarded} forwarded"
        );
    }
    // A and AAAA at once on one socket (what `getent ahosts` and most programs ask): the
    // service is dual-stack, so both of its VIPs come back.
    let got = getent(c, "client", &udp, "ahosts", ECHO_HOST)
        .await
        .unwrap();
    let mut got = got;
    got.sort();
    assert_eq!(got, [ip(ECHO_VIP), IpAddr::V6(ECHO_VIP6)]);
    let client = c.pod_ip("client");
    let seen = up.seen();
    for transport in ["udp", "tcp"] {
        assert!(
            seen.iter()
                .any(|q| q.name == EXTERNAL_NAME && q.transport == transport),
            "{EXTERNAL_NAME} forwarded over {transport}: {seen:?}"
        );
    }
    assert!(
        seen.iter().all(|q| q.peer == client && q.name != ECHO_HOST),
        "only forwarded names, from the client pod's address: {seen:?}"
    );
    let sourced = [("source_canonical_service", "client")];
    assert!(dns_metric(c, "istio_dns_requests_total", &sourced).await >= 7.0);
    assert_eq!(
        dns_metric(c, "istio_dns_upstream_failures_total", &[]).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_enrolled_pod_resolves_mesh_names_locally_and_others_upstream() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec("ebpf")).await.unwrap();
    let up = Upstream::start(&c).await;
    resolves_through_the_proxy(&c, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_enrolled_pod_resolves_mesh_names_locally_and_others_upstream() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec("nftables")).await.unwrap();
    let up = Upstream::start(&c).await;
    resolves_through_the_proxy(&c, &up).await;
    // Unconnected UDP: conntrack shows the reply as coming from the resolver asked.
    let s = udp_socket(c.bed.pod_udp_socket("client", false).unwrap());
    let resolver = SocketAddr::new(ip(CLUSTER_DNS), 53);
    s.send_to(&dns_query(0x4242, "echo", 1), resolver)
        .await
        .unwrap();
    let (resp, from) = recv_from(&s).await;
    assert_eq!(from, resolver);
    assert_eq!(answer_ips(&resp), [ECHO_VIP]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_dns_sockets_see_the_resolver_they_asked() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec("ebpf")).await.unwrap();
    let up = Upstream::start(&c).await;
    let resolver = SocketAddr::new(ip(CLUSTER_DNS), 53);

    // Connected UDP (connect4): getpeername and every reply's source are the resolver.
    let s = udp_socket(c.bed.pod_udp_socket("client", false).unwrap());
    s.connect(resolver).await.unwrap();
    assert_eq!(s.peer_addr().unwrap(), resolver);
    s.send(&dns_query(0x1001, "echo", 1)).await.unwrap();
    let (resp, from) = recv_from(&s).await;
    assert_eq!(from, resolver);
    assert_eq!(resp[..2], [0x10, 0x01], "ID preserved");
    // The short name, completed with the client's namespace by the proxy.
    assert_eq!(answer_ips(&resp), [ECHO_VIP]);

    // Unconnected UDP (sendmsg4/recvmsg4), including a forwarded query relayed unchanged.
    let s = udp_socket(c.bed.pod_udp_socket("client", false).unwrap());
    s.send_to(&dns_query(0x2002, "echo.demo", 1), resolver)
        .await
        .unwrap();
    let (resp, from) = recv_from(&s).await;
    assert_eq!((from, answer_ips(&resp)), (resolver, vec![ECHO_VIP]));
    let query = dns_query(0x3003, EXTERNAL_NAME, 1);
    s.send_to(&query, resolver).await.unwrap();
    let (resp, from) = recv_from(&s).await;
    assert_eq!(from, resolver);
    let (expected_name, expected) = upstream_response(&query).unwrap();
    assert_eq!(expected_name, EXTERNAL_NAME);
    assert_eq!(resp, expected, "the upstream's response, byte for byte");
    let query = dns_query(0x3004, "nowhere.example", 1);
    s.send_to(&query, resolver).await.unwrap();
    let (resp, _) = recv_from(&s).await;
    assert_eq!((resp[..2].to_vec(), rcode(&resp)), (vec![0x30, 0x04], 3));

    // A malformed query gets FORMERR with its ID, and the proxy keeps serving.
    s.send_to(
        &[0x50, 0x05, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'x'],
        resolver,
    )
    .await
    .unwrap();
    let (resp, _) = recv_from(&s).await;
    assert_eq!((resp[..2].to_vec(), rcode(&resp)), (vec![0x50, 0x05], 1));

    // TCP to port 53 goes to the proxy too (not 15001), and getpeername shows the resolver.
    let mut t = c.connect_from("client", resolver).await.unwrap();
    assert_eq!(t.peer_addr().unwrap(), resolver);
    for id in [0x6006u16, 0x6007] {
        let q = dns_query(id, ECHO_HOST, 1);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        t.write_all(&framed).await.unwrap();
        let len = t.read_u16().await.unwrap();
        let mut resp = vec![0u8; usize::from(len)];
        t.read_exact(&mut resp).await.unwrap();
        assert_eq!(resp[..2], id.to_be_bytes());
        assert_eq!(answer_ips(&resp), [ECHO_VIP]);
    }
    assert_eq!(
        dns_metric(&c, "istio_tcp_connections_opened_total", &[]).await,
        0.0,
        "TCP 53 did not go through the outbound proxy"
    );

    // Truncation: a ServiceEntry with 40 VIPs does not fit in 512 bytes; glibc gets TC over UDP,
    // asks again over TCP and gets them all.
    let many: Vec<String> = (1..=40).map(|i| format!("\"10.96.1.{i}\"")).collect();
    c.write_pilot_file(
        "many.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: many, namespace: demo}}\nspec: {{hosts: [many.demo.svc.cluster.local], addresses: [{}], ports: [{{number: 80, targetPort: 8080}}], resolution: STATIC}}\n",
            many.join(", ")
        ),
    )
    .unwrap();
    let start = Instant::now();
    let truncated = loop {
        s.send_to(&dns_query(0x7007, "many", 1), resolver)
            .await
            .unwrap();
        let (resp, _) = recv_from(&s).await;
        if resp[2] & 0x02 != 0 {
            break resp;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new service never appeared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(answer_ips(&truncated).is_empty() && truncated.len() <= 512);
    let tcp_before = dns_metric(
        &c,
        "istio_dns_requests_total",
        &[("request_protocol", "tcp")],
    )
    .await;
    let got = getent(
        &c,
        "client",
        &resolv_conf(CLUSTER_DNS, false),
        "ahostsv4",
        "many.demo.svc.cluster.local",
    )
    .await
    .unwrap();
    assert_eq!(got.len(), 40, "{got:?}");
    assert!(got.contains(&ip(Ipv4Addr::new(10, 96, 1, 40))));
    let tcp_after = dns_metric(
        &c,
        "istio_dns_requests_total",
        &[("request_protocol", "tcp")],
    )
    .await;
    assert!(tcp_after > tcp_before, "glibc retried over TCP");
    assert!(
        up.seen()
            .iter()
            .all(|q| q.name != "many.demo.svc.cluster.local")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_pods_and_dns_capture_off_are_not_captured() {
    if !root_or_skip() {
        return;
    }
    let mut c = Cluster::start(spec("ebpf")).await.unwrap();
    let up = Upstream::start(&c).await;
    let upstream = c.dns_upstream();
    // A pod outside the mesh asks the upstream itself and gets the upstream's answer.
    for tcp in [false, true] {
        let got = getent(
            &c,
            "outsider",
            &resolv_conf(upstream, tcp),
            "ahostsv4",
            ECHO_HOST,
        )
        .await
        .unwrap();
        assert_eq!(got, [ip(UPSTREAM_ECHO_IP)], "tcp: {tcp}");
    }
    let outsider = c.pod_ip("outsider");
    assert!(
        up.seen().iter().all(|q| q.peer == outsider),
        "{:?}",
        up.seen()
    );
    assert_eq!(dns_metric(&c, "istio_dns_requests_total", &[]).await, 0.0);

    // The same ztunnel restarted with --dns-capture off: the enrolled pod's DNS reaches the
    // upstream (over UDP directly; over TCP like any TCP, through 15001) and the proxy is gone.
    c.spec
        .ztunnel_args
        .extend(["--dns-capture".into(), "off".into()]);
    c.restart_ztunnel(0).await.unwrap();
    for tcp in [false, true] {
        let got = getent(
            &c,
            "client",
            &resolv_conf(upstream, tcp),
            "ahostsv4",
            ECHO_HOST,
        )
        .await
        .unwrap();
        assert_eq!(got, [ip(UPSTREAM_ECHO_IP)], "tcp: {tcp}");
    }
    let client = c.pod_ip("client");
    assert!(
        up.seen()
            .iter()
            .any(|q| q.peer == client && q.transport == "udp"),
        "{:?}",
        up.seen()
    );
    assert_eq!(dns_metric(&c, "istio_dns_requests_total", &[]).await, 0.0);
    assert!(
        dns_metric(
            &c,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")]
        )
        .await
            >= 1.0,
        "TCP 53 went through the outbound proxy"
    );
    // A query to an address with no resolver is not answered by anyone.
    let s = udp_socket(c.bed.pod_udp_socket("client", false).unwrap());
    s.send_to(
        &dns_query(1, "echo", 1),
        SocketAddr::new(ip(CLUSTER_DNS), 53),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf))
            .await
            .is_err(),
        "no proxy answers with DNS capture off"
    );
    let pins = std::path::Path::new(testbed::BPFFS)
        .join(c.pin_dir_name(0))
        .join("cgroup");
    assert!(!pins.join("ztunnel_sendmsg4").exists());
    assert!(pins.join("ztunnel_connect4").exists());
}
