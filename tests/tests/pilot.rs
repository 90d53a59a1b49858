//! End-to-end tests of pilot driving ztunnels on the test bed: live YAML changes, pilot restarts with connections open, and ztunnel starting before pilot.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use testbed::Testbed;
use testbed::cluster::{
    ALT_PORT, Cluster, ClusterSpec, ControlPlaneMode, ECHO_PORT, ECHO_VIP, PodDef, ServiceDef,
};
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

const VIP: Ipv4Addr = ECHO_VIP;

fn spec(mode: ControlPlaneMode) -> ClusterSpec {
    ClusterSpec {
        control_plane: mode,
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("server-a", "echo", 1, true),
        ],
        services: vec![ServiceDef::echo()],
        ..Default::default()
    }
}

const DENY_ALT_PORT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-alt-port, namespace: demo}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: [\"9090\"]}}]
";

/// Connect, write a line, read the greeting and the echo; `Err` if refused or closed.
async fn echo_once(c: &Cluster, dst: SocketAddr) -> anyhow::Result<()> {
    let answer =
        tokio::time::timeout(Duration::from_secs(5), c.exchange("client", dst, b"ping")).await??;
    anyhow::ensure!(answer.ends_with(b"ping"), "no echo: {answer:?}");
    Ok(())
}

async fn open_echo(c: &Cluster, dst: SocketAddr) -> tokio::net::TcpStream {
    let mut s = c.pod_sockets("client").unwrap().connect(dst).await.unwrap();
    let mut greeting = [0u8; 1];
    // The greeting's first byte proves the connection went through.
    s.read_exact(&mut greeting).await.unwrap();
    let mut rest = [0u8; 256];
    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut rest)).await;
    s
}

/// Write and read one message on an open echo connection.
async fn still_open(s: &mut tokio::net::TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
    anyhow::ensure!(buf == msg, "echo differs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_change_reaches_ztunnel_and_closes_denied_connections() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(spec(ControlPlaneMode::Pilot)).await.unwrap();
    let alt = SocketAddr::new(c.pod_ip("server-a"), ALT_PORT);
    echo_once(&c, alt).await.unwrap();
    echo_once(&c, SocketAddr::new(VIP.into(), 80))
        .await
        .unwrap();
    let mut open = open_echo(&c, alt).await;
    still_open(&mut open, b"before").await.unwrap();

    let written = Instant::now();
    c.write_pilot_file("deny.yaml", DENY_ALT_PORT).unwrap();
    let mut took = None;
    while written.elapsed() < Duration::from_secs(5) {
        if echo_once(&c, alt).await.is_err() {
            took = Some(written.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = took.expect("the DENY policy never took effect within 5 s");
    // A timing on a debug build on a shared machine is a figure to read, not a pass/fail bound.
    eprintln!("file write -> connection refused: {took:?}");
    // The connection opened before the policy is closed by the re-check.
    assert!(
        still_open(&mut open, b"after").await.is_err(),
        "an open connection now denied stays open"
    );
    echo_once(&c, SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT))
        .await
        .unwrap();

    // Removing the file lifts the policy.
    std::fs::remove_file(c.pilot_config().join("deny.yaml")).unwrap();
    let start = Instant::now();
    while echo_once(&c, alt).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "policy not lifted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_restart_drops_no_connection() {
    if !root_or_skip() {
        return;
    }
    let mut c = Cluster::start(spec(ControlPlaneMode::Pilot)).await.unwrap();
    let dst = SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT);
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(open_echo(&c, dst).await);
    }
    c.kill_pilot().unwrap();
    for s in &mut conns {
        still_open(s, b"pilot down").await.unwrap();
    }
    // With pilot down, the data path keeps working on what it has.
    echo_once(&c, dst).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_pilot().await.unwrap();
    // ztunnels reconnect (backoff from 10 ms) and resync; wait until both are connected and
    // have acknowledged the first response of each type.
    let debug = wait_resynced(&c, 2).await;
    for s in &mut conns {
        still_open(s, b"pilot back").await.unwrap();
    }
    echo_once(&c, dst).await.unwrap();
    // They reconnected with their versions: the new pilot sent each of them one (empty)
    // response per type, and no resource at all.
    assert_eq!(debug["pushes"], 4, "{debug:#}");
    assert_eq!(debug["resources"], 0, "resources were resent: {debug:#}");
    assert_eq!(debug["nacks"], 0, "a resync was rejected: {debug:#}");
    // New configuration still flows after the restart.
    c.write_pilot_file("deny.yaml", DENY_ALT_PORT).unwrap();
    let alt = SocketAddr::new(c.pod_ip("server-a"), ALT_PORT);
    let start = Instant::now();
    while echo_once(&c, alt).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two pilot replicas on one folder and state directory: when the one the ztunnels use
/// dies, they move to the other, which serves the same versions (content hashes), so nothing
/// is resent, no connection drops, and new configuration flows from the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnels_move_to_another_pilot_replica_without_a_resend() {
    if !root_or_skip() {
        return;
    }
    let mut s = spec(ControlPlaneMode::Pilot);
    s.second_pilot = true;
    let mut c = Cluster::start(s).await.unwrap();
    let dst = SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT);
    wait_resynced_on(&c, 0, 2).await;
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(open_echo(&c, dst).await);
    }
    c.kill_pilot().unwrap();
    let debug = wait_resynced_on(&c, 1, 2).await;
    for s in &mut conns {
        still_open(s, b"other replica").await.unwrap();
    }
    echo_once(&c, dst).await.unwrap();
    // Each ztunnel reconnected with its versions: one empty response per type, no resource.
    assert_eq!(debug["pushes"], 4, "{debug:#}");
    assert_eq!(debug["resources"], 0, "resources were resent: {debug:#}");
    assert_eq!(debug["nacks"], 0, "a resync was rejected: {debug:#}");
    // The survivor carries on: a new policy applies.
    c.write_pilot_file("deny.yaml", DENY_ALT_PORT).unwrap();
    let alt = SocketAddr::new(c.pod_ip("server-a"), ALT_PORT);
    let start = Instant::now();
    while echo_once(&c, alt).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "policy never applied by the second replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll pilot's `/debug/connections` until `n` ztunnels are connected, each subscribed to its
/// two types with no response awaiting an ACK; returns what it said then.
async fn wait_resynced(c: &Cluster, n: usize) -> serde_json::Value {
    wait_resynced_on(c, 0, n).await
}

/// [`wait_resynced`] for the pilot replica on `node`.
async fn wait_resynced_on(c: &Cluster, node: usize, n: usize) -> serde_json::Value {
    let start = Instant::now();
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok((200, body)) = c.http_get(node, 15014, "/debug/connections").await
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
        {
            let conns = v["connections"].as_array().cloned().unwrap_or_default();
            let settled = |conn: &serde_json::Value| {
                let types = conn["types"].as_array().cloned().unwrap_or_default();
                conn["node_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("ztunnel"))
                    && types.len() == 2
                    && types
                        .iter()
                        .all(|t| t["responses"].as_u64() >= Some(1) && t["awaiting_ack"] == 0)
            };
            if conns.len() == n && conns.iter().all(settled) {
                return v;
            }
            last = v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ztunnels did not resync: {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_not_ready_without_pilot_then_recovers() {
    if !root_or_skip() {
        return;
    }
    let mut c = Cluster::start(spec(ControlPlaneMode::PilotLater))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in 0..2 {
        let ready = c.http_get(node, 15021, "/healthz/ready").await;
        assert!(
            !matches!(ready, Ok((200, _))),
            "ztunnel ready without a control plane: {ready:?}"
        );
    }
    c.start_pilot().await.unwrap();
    for node in 0..2 {
        c.wait_ready(node, Duration::from_secs(20)).await.unwrap();
    }
    echo_once(&c, SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_is_enrolled_once_with_its_source_routing() {
    if !root_or_skip() {
        return;
    }
    // Every xDS update starts an enrollment pass, and several arrive at once at start-up;
    // several pods per node make overlapping passes likely.
    let mut s = spec(ControlPlaneMode::Pilot);
    s.pods.extend([
        PodDef::new("client-2", "client", 0, true),
        PodDef::new("client-3", "client", 0, true),
        PodDef::new("server-b", "echo", 1, true),
        PodDef::new("server-c", "echo", 1, true),
    ]);
    let c = Cluster::start(s).await.unwrap();
    let enrollments = |def: &PodDef| {
        let log = std::fs::read_to_string(c.ztunnel_log(def.node)).unwrap();
        let n = log
            .lines()
            .filter(|l| l.contains(&format!("pod enrolled pod={} ", def.name)))
            .count();
        (n, log)
    };
    // Wait until both ztunnels are in sync and every pod has been enrolled (the start-up
    // updates' passes are then done: they run one at a time), then count.
    for node in 0..2 {
        c.wait_ready(node, Duration::from_secs(20)).await.unwrap();
    }
    let start = Instant::now();
    while !c.spec.pods.iter().all(|def| enrollments(def).0 >= 1) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not every pod was enrolled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for def in &c.spec.pods {
        let (enrolled, log) = enrollments(def);
        assert_eq!(
            enrolled, 1,
            "{} enrolled {enrolled} times:\n{log}",
            def.name
        );
        assert!(
            !log.contains("cannot preserve client addresses"),
            "source routing failed:\n{log}"
        );
        assert!(c.has_source_routing(&def.name).unwrap(), "{}", def.name);
    }
    let dst = SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT);
    for from in ["client", "client-2", "client-3"] {
        let answer = c.exchange(from, dst, b"who").await.unwrap();
        let greeting = String::from_utf8_lossy(&answer).to_string();
        assert!(
            greeting.contains(&format!("peer={}:", c.pod_ip(from))),
            "{from}: {greeting}"
        );
    }
}

/// Every certificate both ztunnels hold, from their `/config_dump`: (issuer, trusted roots).
async fn ztunnel_certs(c: &Cluster) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for node in 0..2 {
        let Ok((200, body)) = c.http_get(node, 15000, "/config_dump").await else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        for cert in v["certificates"].as_array().cloned().unwrap_or_default() {
            if cert["state"] != "available" {
                continue;
            }
            let roots = cert["roots"].as_array().cloned().unwrap_or_default();
            out.push((
                cert["issuer"].as_str().unwrap_or_default().to_string(),
                roots
                    .iter()
                    .map(|r| r.as_str().unwrap_or_default().to_string())
                    .collect(),
            ));
        }
    }
    out
}

/// Poll until every certificate of both ztunnels satisfies `done`, with a new mesh connection
/// on every poll that must succeed (traffic flows through the whole rotation); the number of
/// connections made.
async fn rotate_until(c: &Cluster, what: &str, done: impl Fn(&str, &[String]) -> bool) -> usize {
    let start = Instant::now();
    let dst = SocketAddr::new(VIP.into(), ECHO_PORT);
    let mut connections = 0;
    loop {
        echo_once(c, dst)
            .await
            .unwrap_or_else(|e| panic!("{what}: a mesh connection failed: {e}"));
        connections += 1;
        let certs = ztunnel_certs(c).await;
        if certs.len() >= 2 && certs.iter().all(|(i, r)| done(i, r)) {
            return connections;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{what}: ztunnels' certificates did not get there: {certs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `pilot rotate-root <step>` on the bed's state folder, as an operator runs it.
fn rotate_root(c: &Cluster, step: &str) {
    let bin = std::env::var("PILOT_BIN").expect("PILOT_BIN");
    let out = std::process::Command::new(bin)
        .arg("--state-dir")
        .arg(c.pilot_state())
        .args(["rotate-root", step])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rotate-root {step}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "rotate-root {step}: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

/// A CA root rotation while traffic flows: each step of `pilot rotate-root` is picked up by
/// the running pilot, both ztunnels renew into it (two roots trusted, then the new root
/// signing, then the old one dropped), and no mesh connection fails on the way. At the end a
/// certificate from the old root is refused, and ztunnels reconnect to a restarted pilot, whose
/// serving certificate now comes from the new root (they read their root file again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_with_traffic_flowing() {
    use rustls_pki_types::pem::PemObject;
    if !root_or_skip() {
        return;
    }
    let mut s = spec(ControlPlaneMode::Pilot);
    // Certificates renewed every ~10 s (half of 80 s plus the minute they are back-dated).
    s.pilot_args = vec!["--max-cert-ttl-secs".into(), "80".into()];
    let mut c = Cluster::start(s).await.unwrap();
    let state = c.pilot_state();
    let old =
        mesh::ca::DevCa::load(&state.join("root-cert.pem"), &state.join("root-key.pem")).unwrap();
    let start = rotate_until(&c, "start", |_, r| r.len() == 1).await;
    let old_issuer = ztunnel_certs(&c).await[0].0.clone();

    rotate_root(&c, "prepare");
    let n1 = rotate_until(&c, "prepare", |i, r| r.len() == 2 && i == old_issuer).await;
    rotate_root(&c, "activate");
    let n2 = rotate_until(&c, "activate", |i, r| r.len() == 2 && i != old_issuer).await;
    rotate_root(&c, "finish");
    let n3 = rotate_until(&c, "finish", |i, r| r.len() == 1 && i != old_issuer).await;
    println!(
        "connections during the rotation, all answered: {}",
        start + n1 + n2 + n3
    );

    // A client certificate from the old root is refused by the server's ztunnel now.
    let new_root =
        rustls_pki_types::CertificateDer::from_pem_file(state.join("root-cert.pem")).unwrap();
    let id = mesh::identity::Identity::new(testbed::cluster::TRUST_DOMAIN, "demo", "client");
    let (leaf, key) = old.issue_pem(&id, Duration::from_secs(600)).unwrap();
    let cert = mesh::tls::WorkloadCert::new(
        &id,
        vec![rustls_pki_types::CertificateDer::from_pem_slice(leaf.as_bytes()).unwrap()],
        rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        vec![new_root],
    )
    .unwrap();
    let server = SocketAddr::new(c.pod_ip("server-a"), mesh::hbone::HBONE_PORT);
    let tcp = c.node_sockets(1).unwrap().connect(server).await.unwrap();
    let server_id = mesh::identity::Identity::new(testbed::cluster::TRUST_DOMAIN, "demo", "echo");
    let tls = cert.client_config(vec![server_id]).unwrap();
    let refused = match mesh::hbone::client::handshake(tcp, tls, server).await {
        Err(e) => e.to_string(),
        Ok(conn) => {
            let req =
                mesh::hbone::ConnectRequest::new(SocketAddr::new(c.pod_ip("server-a"), ECHO_PORT));
            match conn.connect(&req).await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("a certificate from the retired root was accepted"),
            }
        }
    };
    println!("old-root certificate refused: {refused}");

    // pilot restarted: the ztunnels reconnect, trusting its new-root serving certificate.
    c.kill_pilot().unwrap();
    c.start_pilot().await.unwrap();
    wait_resynced(&c, 2).await;
    echo_once(&c, SocketAddr::new(VIP.into(), ECHO_PORT))
        .await
        .unwrap();
}
