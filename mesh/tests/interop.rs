//! HBONE interoperability: our client and server against an independent Python peer
//! (tests/interop/hbone_peer.py, stdlib `ssl` + the PyPI `h2` package) over loopback.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::*;
use mesh::ca::DevCa;
use mesh::hbone::ConnectRequest;
use mesh::hbone::client;
use mesh::identity::Identity;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

const PEER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/interop/hbone_peer.py"
);

fn python_client_id() -> Identity {
    Identity::new("cluster.local", "python-ns", "python-client")
}

fn python_server_id() -> Identity {
    Identity::new("cluster.local", "python-ns", "python-server")
}

/// The peer needs `h2`; a machine without it must fail loudly rather than skip interop.
fn require_python_h2() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import h2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the HBONE interop tests need python3 with the h2 package: run `pip install h2`"
    );
}

/// PEM files for one identity plus the root, as the Python peer reads them.
struct PeerFiles {
    _dir: TempDir,
    cert: String,
    key: String,
    root: String,
}

fn peer_files(ca: &DevCa, id: &Identity) -> PeerFiles {
    let dir = TempDir::new("mesh-interop");
    let (cert, key) = ca
        .issue_pem(id, TTL)
        .expect("issuing PEM for the Python peer");
    PeerFiles {
        cert: dir.write("cert.pem", &cert),
        key: dir.write("key.pem", &key),
        root: dir.write("root.pem", ca.root_pem()),
        _dir: dir,
    }
}

/// Run the Python client once; returns its JSON line and whether it exited 0.
async fn python_client(
    files: &PeerFiles,
    server: SocketAddr,
    authority: SocketAddr,
    text: &str,
    repeat: usize,
    half_close: bool,
) -> (Value, bool) {
    let mut cmd = Command::new("python3");
    cmd.arg(PEER)
        .arg("client")
        .args(["--connect", &server.to_string()])
        .args(["--authority", &authority.to_string()])
        .args([
            "--cert",
            &files.cert,
            "--key",
            &files.key,
            "--ca",
            &files.root,
        ])
        .args(["--expect-identity", &server_id().to_string()])
        .args(["--send", text, "--repeat", &repeat.to_string()])
        .kill_on_drop(true);
    if half_close {
        cmd.arg("--half-close");
    }
    let out = cmd.output().await.expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "Python client printed no JSON ({e}); stdout: {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (json, out.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_to_rust_server() {
    require_python_h2();
    within(30, async {
        let ca = new_ca();
        let server = start_server(&ca, Behavior::Forward).await;
        let files = peer_files(&ca, &python_client_id());
        let app = echo_app().await;
        // ~130 KiB: more than the Python side's 64 KiB receive window, so the echo only
        // completes if both ends return window correctly.
        let text = "interop payload 0123456789abcdef\n";
        let repeat = 4000;
        let (out, ok) = python_client(&files, server.addr, app, text, repeat, false).await;
        assert!(ok, "Python client failed: {out}");
        assert_eq!(out["status"], 200);
        assert_eq!(out["peer_identity"], server_id().to_string());
        assert!(
            out["received"].as_str() == Some(text.repeat(repeat).as_str()),
            "echo differs: got {} bytes",
            out["received"].as_str().map_or(0, str::len)
        );

        let seen = server.handler.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].peer, python_client_id());
        assert_eq!(seen[0].request.authority, app);
        let forwarded = seen[0].request.forwarded_for.expect("forwarded: for=");
        assert_eq!(forwarded.ip().to_string(), "127.0.0.1");
        let baggage = seen[0].request.baggage.as_deref().unwrap_or_default();
        assert!(baggage.contains("k8s.cluster.name=interop"), "{baggage}");
        let traceparent = seen[0].request.traceparent.as_deref().unwrap_or_default();
        assert_eq!(traceparent.len(), 55, "{traceparent}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_half_close_to_rust_server() {
    require_python_h2();
    within(30, async {
        let ca = new_ca();
        let server = start_server(&ca, Behavior::Forward).await;
        let files = peer_files(&ca, &python_client_id());
        // This app answers only after EOF, i.e. after the Python client's END_STREAM.
        let app = reply_after_eof_app().await;
        let (out, ok) = python_client(&files, server.addr, app, "ping", 1, true).await;
        assert!(ok, "Python client failed: {out}");
        assert_eq!(out["status"], 200);
        assert_eq!(out["received"], "got 4 bytes\nping");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_sees_refusal_status() {
    require_python_h2();
    within(30, async {
        let ca = new_ca();
        let server = start_server(&ca, Behavior::Forward).await;
        let files = peer_files(&ca, &python_client_id());
        // Not the address the server was reached on.
        let foreign: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let (out, ok) = python_client(&files, server.addr, foreign, "x", 1, true).await;
        assert!(!ok, "Python client reported success: {out}");
        assert_eq!(out["status"], 400);
        assert!(server.handler.seen().is_empty());
    })
    .await
}

/// The Python server, killed when dropped, with its stdout log.
struct PythonServer {
    addr: SocketAddr,
    log: Lines<BufReader<ChildStdout>>,
    _child: Child,
    _files: PeerFiles,
}

impl PythonServer {
    async fn start(ca: &DevCa) -> PythonServer {
        let files = peer_files(ca, &python_server_id());
        let mut child = Command::new("python3")
            .arg(PEER)
            .arg("server")
            .args(["--listen", "127.0.0.1:0"])
            .args([
                "--cert",
                &files.cert,
                "--key",
                &files.key,
                "--ca",
                &files.root,
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the Python server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut server = PythonServer {
            addr: "0.0.0.0:0".parse().unwrap(),
            log: BufReader::new(stdout).lines(),
            _child: child,
            _files: files,
        };
        let first = server.next_log().await;
        server.addr = first["listening"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("Python server did not say where it listens: {first}"));
        server
    }

    async fn next_log(&mut self) -> Value {
        let line = self
            .log
            .next_line()
            .await
            .expect("reading the Python server's log")
            .expect("Python server exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad log line {line:?}: {e}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_to_python_server() {
    require_python_h2();
    within(30, async {
        let ca = new_ca();
        let mut server = PythonServer::start(&ca).await;
        let cert = ca.issue(&client_id(), TTL).unwrap();
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let tls = cert.client_config(vec![python_server_id()]).unwrap();
        let conn = client::handshake(tcp, tls, server.addr).await.unwrap();

        // Three streams at once on the one connection; one carries 1 MiB of random bytes,
        // far past the Python side's 64 KiB windows and 16 KiB frames.
        let mut bulk = vec![0u8; 1024 * 1024];
        fastrand::fill(&mut bulk);
        let payloads = [b"ping from rust".to_vec(), bulk, b"third".to_vec()];
        let forwarded_for: SocketAddr = "127.0.0.1:41234".parse().unwrap();
        let baggage = "k8s.cluster.name=test,k8s.namespace.name=client-ns";
        let mut streams = tokio::task::JoinSet::new();
        for (i, payload) in payloads.into_iter().enumerate() {
            let conn = conn.clone();
            let req = ConnectRequest {
                authority: SocketAddr::from(([127, 0, 0, 1], 9001 + i as u16)),
                forwarded_for: Some(forwarded_for),
                host: None,
                baggage: Some(baggage.into()),
                traceparent: Some(mesh::hbone::traceparent()),
            };
            streams.spawn(async move {
                let stream = conn
                    .connect(&req)
                    .await
                    .expect("CONNECT to the Python server");
                let reply = exchange(stream, &payload).await;
                let hello = format!("hello {} via {}\n", client_id(), req.authority);
                assert!(
                    reply.starts_with(hello.as_bytes()),
                    "reply starts {:?}",
                    String::from_utf8_lossy(&reply[..reply.len().min(120)])
                );
                assert!(
                    reply[hello.len()..] == payload[..],
                    "echo differs on stream {i}"
                );
            });
        }
        streams.join_all().await;

        let mut logs = Vec::new();
        for _ in 0..3 {
            logs.push(server.next_log().await);
        }
        logs.sort_by_key(|l| l["authority"].as_str().map(str::to_string));
        for (i, log) in logs.iter().enumerate() {
            assert_eq!(log["authority"], format!("127.0.0.1:{}", 9001 + i), "{log}");
            assert_eq!(log["peer_identity"], client_id().to_string(), "{log}");
            assert_eq!(
                log["forwarded"],
                format!("for=\"{forwarded_for}\""),
                "{log}"
            );
            assert_eq!(log["baggage"], baggage, "{log}");
        }
    })
    .await
}
