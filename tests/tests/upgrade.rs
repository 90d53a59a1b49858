//! Upgrading ztunnel without resetting a connection, end to end on the test bed: each node's
//! ztunnel is replaced as a DaemonSet rolling update with `maxSurge: 1` does it (the new one
//! starts beside the old one and becomes ready, then the old one gets SIGTERM) while mesh
//! traffic runs both ways between the nodes, over IPv4 and IPv6: long-lived connections
//! exchanging every 100 ms, 50 new connections a second (mesh to mesh, and from a pod outside
//! the mesh into the mesh: inbound plaintext capture), 10 HTTP requests a second, 20 DNS
//! queries a second over UDP (captured into the pods' DNS proxies, one attempt each), and at
//! each SIGTERM a burst of 200 connections through the listeners the old ztunnel closes (its
//! pod's 15001 and 15006) and of 100 DNS queries, so some are queued on them when they close.
//! Nothing may fail.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use testbed::Testbed;
use testbed::cluster::{
    Cluster, ClusterSpec, ControlPlaneMode, ECHO_PORT, ECHO_VIP, HTTP_PORT, HttpAnswer, PodDef,
    PodDialer, ServiceDef, exchange_on,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn root_or_skip() -> bool {
    match Testbed::check_privileges() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// Long-lived connections per direction (IPv4 and IPv6 alternately).
const LONG_LIVED: usize = 4;
/// New short connections a second (both directions together).
const SHORT_PER_SECOND: u64 = 50;
/// HTTP requests a second (both directions together), each on a new connection.
const HTTP_PER_SECOND: u64 = 10;
/// Connections started within ~20 ms around each SIGTERM.
const BURST: usize = 200;
/// DNS queries a second (both pods together), and in each burst.
const DNS_PER_SECOND: u64 = 20;
const DNS_BURST: usize = 100;
/// Any resolver address: the pods' DNS is captured into their ztunnel's proxy on 15053.
const RESOLVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 53)), 53);
/// A mesh hostname the proxy answers itself ([`ServiceDef::echo`]'s).
const SERVICE_HOSTNAME: &str = "echo.demo.svc.cluster.local";

/// What the traffic saw; every failure is kept with its reason.
#[derive(Default)]
struct Tally {
    short_ok: AtomicU64,
    http_ok: AtomicU64,
    burst_ok: AtomicU64,
    dns_ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        eprintln!("FAILED: {what}");
        if let Ok(mut f) = self.failures.lock() {
            f.push(what);
        }
    }
}

/// One long-lived connection: the echo's greeting, then 8 bytes out and back every 100 ms
/// until `stop`, then a clean close. `exchanges` counts the round trips.
async fn long_lived(
    from: PodDialer,
    dst: SocketAddr,
    stop: Arc<AtomicBool>,
    exchanges: Arc<AtomicU64>,
) -> Result<(), String> {
    let s = from
        .connect(dst)
        .await
        .map_err(|e| format!("connecting: {e:#}"))?;
    let mut s = BufReader::new(s);
    let mut greeting = String::new();
    s.read_line(&mut greeting)
        .await
        .map_err(|e| format!("greeting: {e}"))?;
    if !greeting.starts_with("pod=") {
        return Err(format!("unexpected greeting {greeting:?}"));
    }
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let out = n.to_be_bytes();
        s.get_mut()
            .write_all(&out)
            .await
            .map_err(|e| format!("after {n} exchanges, writing: {e}"))?;
        let mut back = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .map_err(|_| format!("after {n} exchanges, no echo within 5 s"))?
            .map_err(|e| format!("after {n} exchanges, reading: {e}"))?;
        if back != out {
            return Err(format!("after {n} exchanges, echoed {back:?} for {out:?}"));
        }
        n += 1;
        exchanges.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.get_mut()
        .shutdown()
        .await
        .map_err(|e| format!("closing: {e}"))?;
    let mut rest = vec![];
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .map_err(|_| "no end of stream within 5 s of closing".to_string())?
        .map_err(|e| format!("reading the end of stream: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes at the end", rest.len()));
    }
    Ok(())
}

/// One short connection: greeting and echo of a payload, then closed.
async fn short(from: &PodDialer, dst: SocketAddr, n: u64) -> Result<(), String> {
    let s = from.connect(dst).await.map_err(|e| format!("{e:#}"))?;
    echoes(s, n).await
}

async fn echoes(s: tokio::net::TcpStream, n: u64) -> Result<(), String> {
    let payload = format!("short {n}");
    let answer = exchange_on(s, payload.as_bytes())
        .await
        .map_err(|e| format!("{e:#}"))?;
    let text = String::from_utf8_lossy(&answer);
    if text.starts_with("pod=") && text.ends_with(&payload) {
        Ok(())
    } else {
        Err(format!("unexpected answer {text:?}"))
    }
}

/// One HTTP/1.1 request on a new connection to the HTTP echo app.
async fn http(from: &PodDialer, dst: SocketAddr) -> Result<(), String> {
    let s = from.connect(dst).await.map_err(|e| format!("{e:#}"))?;
    let req = format!("GET /upgrade HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n");
    let raw = exchange_on(s, req.as_bytes())
        .await
        .map_err(|e| format!("{e:#}"))?;
    let answer = HttpAnswer::parse(&raw).map_err(|e| format!("{e:#}"))?;
    match answer.status {
        200 => Ok(()),
        s => Err(format!("status {s}")),
    }
}

/// Start `per_second` operations a second until `stop`, alternating over `routes`, each in a
/// task of its own so a slow one does not slow the rate.
fn steady<F, Fut>(
    routes: Vec<(PodDialer, SocketAddr)>,
    per_second: u64,
    stop: Arc<AtomicBool>,
    op: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(PodDialer, SocketAddr, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tasks = vec![];
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let (from, dst) = routes[(n % routes.len() as u64) as usize].clone();
            tasks.push(tokio::spawn(op(from, dst, n)));
            n += 1;
        }
        for t in tasks {
            let _ = t.await;
        }
    })
}

/// An A query for `name` with `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// One DNS query over UDP from a socket of its own, one attempt (a lost datagram fails it):
/// the answer must carry the query's id, no error and the service's address.
async fn resolve(socket: std::net::UdpSocket, id: u16) -> Result<(), String> {
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| e.to_string())?;
    socket
        .send_to(&dns_query(id, SERVICE_HOSTNAME), RESOLVER)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut buf))
        .await
        .map_err(|_| "no answer within 3 s".to_string())?
        .map_err(|e| format!("receiving: {e}"))?;
    let answer = &buf[..n];
    let vip = ECHO_VIP.octets();
    if n < 12 || answer[..2] != id.to_be_bytes() || answer[3] & 0x0f != 0 {
        return Err(format!("bad answer {answer:?}"));
    }
    if !answer.windows(4).any(|w| w == vip) {
        return Err(format!("answer without {ECHO_VIP}: {answer:?}"));
    }
    Ok(())
}

/// [`BURST`] connections over `routes` (sockets made ahead), SIGTERM to `node`'s old ztunnel a
/// quarter of the way in; waits for them all.
async fn burst_around_sigterm(
    c: &Cluster,
    node: usize,
    routes: &[(PodDialer, SocketAddr)],
    tally: &Arc<Tally>,
) {
    let routes = routes.to_vec();
    // The DNS queries come from the pod the upgraded ztunnel serves (the first route's).
    let resolver_pod = routes[0].0.clone();
    let (sockets, mut udp) = tokio::task::spawn_blocking(move || {
        let tcp = (0..BURST)
            .map(|i| {
                let (from, dst) = &routes[i % routes.len()];
                (from.socket(dst.is_ipv6()).unwrap(), *dst)
            })
            .collect::<Vec<_>>();
        let udp = (0..DNS_BURST)
            .map(|_| resolver_pod.udp_socket(false).unwrap())
            .collect::<Vec<_>>();
        (tcp, udp)
    })
    .await
    .unwrap();
    let mut tasks = vec![];
    for (i, (socket, dst)) in sockets.into_iter().enumerate() {
        if i == BURST / 4 {
            c.terminate_predecessor(node).unwrap();
        }
        if i % (BURST / DNS_BURST) == 0
            && let Some(udp) = udp.pop()
        {
            let tally = tally.clone();
            let id = (node * BURST + i) as u16;
            tasks.push(tokio::spawn(async move {
                match resolve(udp, id).await {
                    Ok(()) => drop(tally.dns_ok.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => tally.fail(format!("burst DNS query {id}: {e}")),
                }
            }));
        }
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            let result = match socket.connect(dst).await {
                Ok(s) => echoes(s, i as u64).await,
                Err(e) => Err(format!("{e:#}")),
            };
            match result {
                Ok(()) => drop(tally.burst_ok.fetch_add(1, Ordering::Relaxed)),
                Err(e) => tally.fail(format!("burst connection {i} to {dst}: {e}")),
            }
        }));
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn opened(c: &Cluster, node: usize) -> f64 {
    c.metric(node, "istio_tcp_connections_opened_total", &[])
        .await
        .unwrap()
}

async fn opened_by_predecessor(c: &Cluster, node: usize) -> f64 {
    c.predecessor_metric(node, "istio_tcp_connections_opened_total", &[])
        .await
        .unwrap()
}

async fn upgrade_resets_nothing(redirect: &str, control_plane: ControlPlaneMode) {
    let spec = ClusterSpec {
        control_plane,
        nodes: 2,
        pods: vec![
            PodDef::new("left", "left", 0, true),
            PodDef::new("outsider", "outsider", 0, false),
            PodDef::new("right", "right", 1, true),
        ],
        // The old ztunnels keep the long-lived connections until the test closes them.
        services: vec![ServiceDef {
            app: "right".into(),
            ..ServiceDef::echo()
        }],
        ztunnel_args: vec![
            "--redirect".into(),
            redirect.into(),
            "--drain-timeout".into(),
            "120s".into(),
        ],
        ..Default::default()
    };
    let mut c = Cluster::start(spec).await.unwrap();
    let (left, right) = (c.dialer("left").unwrap(), c.dialer("right").unwrap());
    let outsider = c.dialer("outsider").unwrap();
    let (left_ip, right_ip) = (c.pod_ip("left"), c.pod_ip("right"));
    let (left_ip6, right_ip6) = (c.pod_ip6("left"), c.pod_ip6("right"));
    let to_left = move |port| SocketAddr::new(left_ip, port);
    let to_right = move |port| SocketAddr::new(right_ip, port);
    let to_left6 = move |port| SocketAddr::new(left_ip6, port);
    let to_right6 = move |port| SocketAddr::new(right_ip6, port);
    // Both ways, in both families (the pods are dual-stack: their IPv6 listeners form groups
    // of their own).
    let echo_routes = vec![
        (left.clone(), to_right(ECHO_PORT)),
        (right.clone(), to_left(ECHO_PORT)),
        (left.clone(), to_right6(ECHO_PORT)),
        (right.clone(), to_left6(ECHO_PORT)),
    ];
    // Outside the mesh into it: inbound plaintext capture (15006).
    let plaintext_routes = vec![
        (outsider.clone(), to_right(ECHO_PORT)),
        (outsider.clone(), to_left(ECHO_PORT)),
        (outsider.clone(), to_right6(ECHO_PORT)),
        (outsider.clone(), to_left6(ECHO_PORT)),
    ];
    // Through the listeners of each node's pod that its old ztunnel closes at SIGTERM: the
    // pod's outbound 15001, and its inbound 15006.
    let burst_routes = [
        vec![
            (left.clone(), to_right(ECHO_PORT)),
            (outsider.clone(), to_left(ECHO_PORT)),
            (left.clone(), to_right6(ECHO_PORT)),
            (outsider.clone(), to_left6(ECHO_PORT)),
        ],
        vec![
            (right.clone(), to_left(ECHO_PORT)),
            (outsider.clone(), to_right(ECHO_PORT)),
            (right.clone(), to_left6(ECHO_PORT)),
            (outsider.clone(), to_right6(ECHO_PORT)),
        ],
    ];
    let http_routes = vec![
        (left.clone(), to_right(HTTP_PORT)),
        (right.clone(), to_left(HTTP_PORT)),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut long = vec![];
    for (from, dst) in echo_routes.iter().cycle().take(2 * LONG_LIVED) {
        // Spread over the run's first second, as connections come and go in a real one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let exchanges = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(long_lived(
            from.clone(),
            *dst,
            stop.clone(),
            exchanges.clone(),
        ));
        long.push((*dst, exchanges, task));
    }
    let t = tally.clone();
    let shorts = steady(
        echo_routes.into_iter().chain(plaintext_routes).collect(),
        SHORT_PER_SECOND,
        stop.clone(),
        move |from, dst, n| {
            let t = t.clone();
            async move {
                match short(&from, dst, n).await {
                    Ok(()) => drop(t.short_ok.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => t.fail(format!("short connection {n} to {dst}: {e}")),
                }
            }
        },
    );
    let t = tally.clone();
    let https = steady(
        http_routes,
        HTTP_PER_SECOND,
        stop.clone(),
        move |from, dst, n| {
            let t = t.clone();
            async move {
                match http(&from, dst).await {
                    Ok(()) => drop(t.http_ok.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => t.fail(format!("HTTP request {n} to {dst}: {e}")),
                }
            }
        },
    );
    let t = tally.clone();
    let dns = steady(
        vec![(left.clone(), RESOLVER), (right.clone(), RESOLVER)],
        DNS_PER_SECOND,
        stop.clone(),
        move |from, _, n| {
            let t = t.clone();
            async move {
                let id = 0x8000 | (n as u16 & 0x7fff);
                let result = match tokio::task::spawn_blocking(move || from.udp_socket(false)).await
                {
                    Ok(Ok(socket)) => resolve(socket, id).await,
                    Ok(Err(e)) => Err(format!("{e:#}")),
                    Err(e) => Err(e.to_string()),
                };
                match result {
                    Ok(()) => drop(t.dns_ok.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => t.fail(format!("DNS query {n}: {e}")),
                }
            }
        },
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();

    // Node 1 (right), then node 0 (left), as a DaemonSet rolling update goes node by node.
    let mut checks = vec![];
    for node in [1, 0] {
        c.start_successor(node).await.unwrap();
        eprintln!(
            "node {node}: successor pid {:?} ready beside pid {:?} after {:?}",
            c.ztunnel_pid(node),
            c.predecessor_pid(node),
            started.elapsed()
        );
        // Both serve the pods for a while, sharing the listeners.
        tokio::time::sleep(Duration::from_secs(2)).await;
        burst_around_sigterm(&c, node, &burst_routes[node], &tally).await;
        // What the old one had accepted before SIGTERM is counted once its handshakes are done.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let old_after_term = opened_by_predecessor(&c, node).await;
        let new_after_term = opened(&c, node).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let old_later = opened_by_predecessor(&c, node).await;
        let new_later = opened(&c, node).await;
        eprintln!(
            "node {node}: connections opened by the old ztunnel {old_after_term} → {old_later}, by the new one {new_after_term} → {new_later} in the 3 s after SIGTERM + 1 s"
        );
        checks.push((node, old_after_term, old_later, new_after_term, new_later));
    }
    // Every long-lived connection, opened through the old ztunnels of both nodes, still
    // exchanges now that both nodes run the new ones.
    let before: Vec<u64> = long
        .iter()
        .map(|(_, e, _)| e.load(Ordering::Relaxed))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    shorts.await.unwrap();
    https.await.unwrap();
    dns.await.unwrap();
    let mut long_failed = vec![];
    for ((dst, exchanges, task), before) in long.into_iter().zip(before) {
        let total = exchanges.load(Ordering::Relaxed);
        eprintln!(
            "long-lived connection to {dst}: {total} exchanges, {} after both upgrades",
            total - before
        );
        match task.await.unwrap() {
            Ok(()) if total - before >= 10 => {}
            Ok(()) => long_failed.push(format!(
                "to {dst}: only {} exchanges after the upgrades",
                total - before
            )),
            Err(e) => long_failed.push(format!("to {dst}: {e}")),
        }
    }
    let failures = tally.failures.lock().unwrap().clone();
    eprintln!(
        "{redirect}: {} short connections, {} burst connections, {} HTTP requests and {} DNS queries succeeded, {} failed; {} of {} long-lived connections failed",
        tally.short_ok.load(Ordering::Relaxed),
        tally.burst_ok.load(Ordering::Relaxed),
        tally.http_ok.load(Ordering::Relaxed),
        tally.dns_ok.load(Ordering::Relaxed),
        failures.len(),
        long_failed.len(),
        2 * LONG_LIVED,
    );
    assert!(long_failed.is_empty(), "{long_failed:#?}");
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        tally.short_ok.load(Ordering::Relaxed) >= 10 * SHORT_PER_SECOND,
        "the steady stream ran"
    );
    for (node, old_after_term, old_later, new_after_term, new_later) in checks {
        assert_eq!(
            old_after_term, old_later,
            "node {node}: the old ztunnel took no new connection after SIGTERM"
        );
        assert!(
            new_later - new_after_term >= 20.0,
            "node {node}: the new ztunnel served the new connections"
        );
    }
    // The old ones exit once the connections they served have ended, not at the deadline.
    for node in [1, 0] {
        let log = c.predecessor_log(node).unwrap();
        let status = c
            .wait_predecessor(node, Duration::from_secs(20))
            .await
            .unwrap();
        let log = std::fs::read_to_string(log).unwrap();
        assert!(status.success(), "node {node}: {status}\n{log}");
        assert!(log.contains("all connections finished"), "{log}");
        assert!(
            !log.contains("removing pinned capture") && !log.contains("ERROR"),
            "{log}"
        );
    }
    // The new ones swept nothing away: the pods were all there, enrolled by the old ones.
    for node in [1, 0] {
        let log = std::fs::read_to_string(c.ztunnel_log(node)).unwrap();
        assert!(!log.contains("removing pinned capture"), "{log}");
    }
    // The new ones keep serving.
    short(&c.dialer("left").unwrap(), to_right(ECHO_PORT), 0)
        .await
        .unwrap();
    short(&c.dialer("right").unwrap(), to_left(ECHO_PORT), 1)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_ebpf_capture_resets_no_connection() {
    if !root_or_skip() {
        return;
    }
    upgrade_resets_nothing("ebpf", ControlPlaneMode::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_nftables_capture_resets_no_connection() {
    if !root_or_skip() {
        return;
    }
    upgrade_resets_nothing("nftables", ControlPlaneMode::File).await;
}

/// With pilot: the new ztunnel has no view of the mesh until its xDS stream has delivered one,
/// and must not take the old one's pods for gone meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_pilot_and_ebpf_capture_resets_no_connection() {
    if !root_or_skip() {
        return;
    }
    upgrade_resets_nothing("ebpf", ControlPlaneMode::Pilot).await;
}

/// The "pod enrolled" log lines' times (RFC 3339, as the log starts them) for `pod`.
fn enrolled_at(log: &str, pod: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("pod enrolled") && l.contains(&format!("pod={pod} ")))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
}

/// A pod that joins the mesh while both ztunnels of its node run is enrolled by both, in
/// either order; once the old one has drained and exited, the new one serves it in every
/// direction, inbound plaintext (the eBPF sockmap entry) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_joining_the_mesh_during_an_upgrade_is_served_after_it() {
    if !root_or_skip() {
        return;
    }
    let spec = ClusterSpec {
        nodes: 2,
        pods: vec![
            PodDef::new("left", "left", 0, true),
            PodDef::new("outsider", "outsider", 0, false),
            PodDef::new("latecomer", "latecomer", 1, false),
            PodDef::new("right", "right", 1, true),
        ],
        ztunnel_args: vec!["--redirect".into(), "ebpf".into()],
        ..Default::default()
    };
    let mut c = Cluster::start(spec).await.unwrap();
    c.start_successor(1).await.unwrap();
    // Each ztunnel polls the folder (every 50 ms, then a 100 ms settle): a change at a varying
    // moment has either enroll the pod last (the order printed below).
    let phase = u64::from(std::time::UNIX_EPOCH.elapsed().unwrap().subsec_millis() % 500);
    tokio::time::sleep(Duration::from_millis(phase)).await;
    for p in c.spec.pods.iter_mut() {
        if p.name == "latecomer" {
            p.mesh = true;
        }
    }
    c.write_pilot_file("mesh.yaml", &c.kubernetes_yaml())
        .unwrap();
    let enrolled = "ztunnel_enrolled_pods";
    let start = Instant::now();
    loop {
        let old = c.predecessor_metric(1, enrolled, &[]).await.unwrap();
        let new = c.metric(1, enrolled, &[]).await.unwrap();
        if old == 2.0 && new == 2.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "enrolled: old {old}, new {new}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Node 0's ztunnel must know it is in the mesh too, or `left` would reach it in plaintext.
    loop {
        let (_, body) = c.http_get(0, 15000, "/config_dump").await.unwrap();
        let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
        let meshed = dump["workloads"].as_array().is_some_and(|ws| {
            ws.iter()
                .any(|w| w["name"] == "latecomer" && w["tunnelProtocol"] == "HBONE")
        });
        if meshed {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node 0 did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old_log = std::fs::read_to_string(c.predecessor_log(1).unwrap()).unwrap();
    let new_log = std::fs::read_to_string(c.ztunnel_log(1)).unwrap();
    let (old_at, new_at) = (
        enrolled_at(&old_log, "latecomer").unwrap(),
        enrolled_at(&new_log, "latecomer").unwrap(),
    );
    eprintln!(
        "latecomer enrolled by the old ztunnel at {old_at}, by the new one at {new_at} ({} last)",
        if old_at > new_at { "old" } else { "new" }
    );
    c.terminate_predecessor(1).unwrap();
    let status = c
        .wait_predecessor(1, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
    let latecomer = SocketAddr::new(c.pod_ip("latecomer"), ECHO_PORT);
    let left = SocketAddr::new(c.pod_ip("left"), ECHO_PORT);
    let plaintext = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    let outbound = [("reporter", "source")];
    let (plaintext_before, outbound_before) = (
        c.metric(1, "istio_tcp_connections_opened_total", &plaintext)
            .await
            .unwrap(),
        c.metric(1, "istio_tcp_connections_opened_total", &outbound)
            .await
            .unwrap(),
    );
    for (from, dst) in [
        ("outsider", latecomer),
        ("left", latecomer),
        ("latecomer", left),
    ] {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            short(&c.dialer(from).unwrap(), dst, 7),
        )
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".into()));
        assert!(answer.is_ok(), "{from} → {dst}: {answer:?}");
    }
    // Through the new ztunnel's listeners: captured inbound plaintext and outbound.
    assert_eq!(
        c.metric(1, "istio_tcp_connections_opened_total", &plaintext)
            .await
            .unwrap(),
        plaintext_before + 1.0
    );
    assert_eq!(
        c.metric(1, "istio_tcp_connections_opened_total", &outbound)
            .await
            .unwrap(),
        outbound_before + 1.0
    );
}
