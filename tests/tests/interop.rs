//! Interoperability with an HBONE peer written independently of our code (the Python `h2` +
//! `ssl` script in tests/interop/), against a running ztunnel, in both directions.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use mesh::identity::Identity;
use testbed::cluster::{Cluster, ClusterSpec, ECHO_PORT, PodDef};
use tokio::io::{AsyncBufReadExt, BufReader};

fn require_python_h2() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import h2"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "the interop tests need Python's h2 package: run `pip install h2` (cargo xtask test does)"
    );
}

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/hbone_peer.py");

fn spec() -> ClusterSpec {
    let mut py_server = PodDef::new("py-server", "python", 1, false);
    py_server.own_hbone = true;
    ClusterSpec {
        control_plane: Default::default(),
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("py-client", "python", 0, false),
            PodDef::new("server", "server", 1, true),
            py_server,
        ],
        ..Default::default()
    }
}

/// PEM files for `identity`, signed by the cluster's CA; returns (cert, key) paths.
fn credentials(c: &Cluster, identity: &Identity) -> (String, String) {
    let (cert, key) = c.ca.issue_pem(identity, Duration::from_secs(3600)).unwrap();
    let cert_path = c.dir.join(format!("{}.crt", identity.service_account));
    let key_path = c.dir.join(format!("{}.key", identity.service_account));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_to_ztunnel_inbound() {
    if !testbed::can_run() {
        return;
    }
    require_python_h2();
    let c = Cluster::start(spec()).await.unwrap();
    let python_id = c.identity("py-client");
    let (cert, key) = credentials(&c, &python_id);
    let server_ip = c.pod_ip("server");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(PEER)
        .arg("client")
        .args(["--connect", &format!("{server_ip}:15008")])
        .args(["--authority", &format!("{server_ip}:{ECHO_PORT}")])
        .args(["--cert", &cert, "--key", &key])
        .args(["--ca", &c.dir.join("root.pem").display().to_string()])
        .args(["--expect-identity", &c.identity("server").to_string()])
        .args(["--send", "hello from python", "--half-close"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.bed.spawn_in_pod("py-client", cmd).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["status"], 200);
    assert_eq!(result["peer_identity"], c.identity("server").to_string());
    let received = result["received"].as_str().unwrap();
    assert!(received.starts_with("pod=server port=8080"), "{received}");
    assert!(received.ends_with("hello from python"), "{received}");
    let seen = c
        .metric(
            1,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &python_id.to_string()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        seen, 1.0,
        "ztunnel attributed the connection to the Python client's identity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_outbound_to_python_server() {
    if !testbed::can_run() {
        return;
    }
    require_python_h2();
    let c = Cluster::start(spec()).await.unwrap();
    let (cert, key) = credentials(&c, &c.identity("py-server"));
    let py_ip = c.pod_ip("py-server");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(PEER)
        .arg("server")
        .args(["--listen", &format!("{py_ip}:15008")])
        .args(["--cert", &cert, "--key", &key])
        .args(["--ca", &c.dir.join("root.pem").display().to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.bed.spawn_in_pod_async("py-server", cmd).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.contains("listening"), "{first}");

    // The mesh client dials the Python pod's app port; its ztunnel carries it over HBONE.
    let dst = SocketAddr::new(py_ip, ECHO_PORT);
    let answer = c.exchange("client", dst, b"hello python").await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    let client_id = c.identity("client").to_string();
    assert_eq!(text, format!("hello {client_id} via {dst}\nhello python"));
    let log = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(log["peer_identity"], client_id);
    assert_eq!(log["authority"], dst.to_string());
    assert!(
        log["forwarded"]
            .as_str()
            .unwrap()
            .starts_with(&format!("for=\"{}:", c.pod_ip("client")))
    );
    assert!(
        log["baggage"]
            .as_str()
            .unwrap()
            .contains("k8s.namespace.name=demo")
    );
    let _ = child.kill().await;
}
