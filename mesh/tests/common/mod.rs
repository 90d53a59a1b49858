//! Helpers shared by the HBONE integration tests: a test CA, a loopback HBONE server with a
//! scriptable handler, small TCP applications behind it, and a client-side stream driver.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mesh::ca::DevCa;
use mesh::drain;
use mesh::hbone::Refusal;
use mesh::hbone::copy::{self, H2Stream};
use mesh::hbone::server::{self, Handler, InboundStream, Options};
use mesh::identity::Identity;
use mesh::tls::WorkloadCert;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TTL: Duration = Duration::from_secs(3600);

/// The `baggage` our test server answers a successful CONNECT with.
pub const SERVER_BAGGAGE: &str = "k8s.namespace.name=server-ns,service.name=echo";

pub fn client_id() -> Identity {
    Identity::new("cluster.local", "client-ns", "client-sa")
}

pub fn server_id() -> Identity {
    Identity::new("cluster.local", "server-ns", "server-sa")
}

/// Fail a test that hangs instead of letting it block the whole run.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("test timed out")
}

/// What the test handler does with each validated CONNECT.
#[derive(Clone)]
pub enum Behavior {
    /// Accept, then proxy to the TCP application at the CONNECT authority (503 if unreachable),
    /// as ztunnel's inbound does.
    Forward,
    Refuse(Refusal),
}

/// What the handler saw of one CONNECT.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: Identity,
    pub request: mesh::hbone::ConnectRequest,
}

pub struct TestHandler {
    pub behavior: Behavior,
    pub seen: Mutex<Vec<Seen>>,
}

impl TestHandler {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler for TestHandler {
    async fn handle(&self, stream: InboundStream) {
        self.seen.lock().unwrap().push(Seen {
            peer: stream.peer.clone(),
            request: stream.request.clone(),
        });
        match &self.behavior {
            Behavior::Refuse(refusal) => stream.refuse(refusal),
            Behavior::Forward => match TcpStream::connect(stream.request.authority).await {
                Err(e) => stream.refuse(&server::upstream_failed(&e)),
                Ok(app) => {
                    let h2 = stream.accept(Some(SERVER_BAGGAGE)).expect("answering 200");
                    // A reset by the client in a test that drops streams early is fine.
                    let _ = copy::tcp_h2(app, h2, &Default::default()).await;
                }
            },
        }
    }
}

/// A running HBONE server on 127.0.0.1. Dropping it ends the drain watch's trigger, which the
/// server treats as shutdown, so it lives as long as the test holds it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub handler: Arc<TestHandler>,
    /// TCP connections accepted, i.e. HBONE connections clients opened.
    pub accepted: Arc<AtomicUsize>,
    /// A certificate for `client_id()` from the server's CA, for clients to present.
    pub client_cert: Arc<WorkloadCert>,
    /// The drain of the connections accepted so far; new ones get the one installed last.
    drain: Arc<Mutex<(drain::Trigger, drain::Watch)>>,
}

impl TestServer {
    /// Send GOAWAY on every connection accepted so far (as a draining peer does), while the
    /// listener keeps accepting new ones.
    pub fn goaway_open_connections(&self) {
        let old = std::mem::replace(&mut *self.drain.lock().unwrap(), drain::channel());
        drop(old);
    }
}

/// Serve as `server_id()` with a certificate from `ca`.
pub async fn start_server(ca: &DevCa, behavior: Behavior) -> TestServer {
    let cert = ca
        .issue(&server_id(), TTL)
        .expect("issuing the server certificate");
    let client_cert = Arc::new(
        ca.issue(&client_id(), TTL)
            .expect("issuing the client certificate"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(TestHandler {
        behavior,
        seen: Mutex::new(Vec::new()),
    });
    let accepted = Arc::new(AtomicUsize::new(0));
    let drain = Arc::new(Mutex::new(drain::channel()));
    let tls = cert.server_config();
    let options = Options {
        require_local_authority: true,
    };
    let (h, count, current) = (handler.clone(), accepted.clone(), drain.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let watch = current.lock().unwrap().1.clone();
            tokio::spawn(server::serve(tcp, tls.clone(), options, h.clone(), watch));
        }
    });
    TestServer {
        addr,
        handler,
        accepted,
        client_cert,
        drain,
    }
}

/// A TCP application that echoes until the client half-closes, then closes its side.
pub async fn echo_app() -> SocketAddr {
    app(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await
    })
    .await
}

/// A TCP application that answers only after the client half-closed: `got <n> bytes\n`, then
/// the bytes, then it closes. Shows a half-close travels through the tunnel and the response
/// still comes back.
pub async fn reply_after_eof_app() -> SocketAddr {
    app(|mut tcp| async move {
        let mut all = Vec::new();
        tcp.read_to_end(&mut all).await?;
        tcp.write_all(format!("got {} bytes\n", all.len()).as_bytes())
            .await?;
        tcp.write_all(&all).await?;
        tcp.shutdown().await
    })
    .await
}

async fn app<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// A loopback address with nothing listening (the port was just freed).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Write `data` on the stream, honoring flow control, then end our side (END_STREAM).
pub async fn send_all(send: &mut h2::SendStream<Bytes>, data: &[u8]) -> Result<(), h2::Error> {
    let mut data = Bytes::copy_from_slice(data);
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(granted) => {
                let n = granted?.min(data.len());
                if n > 0 {
                    send.send_data(data.split_to(n), false)?;
                }
            }
            None => panic!("stream closed while sending"),
        }
    }
    send.send_data(Bytes::new(), true)
}

/// Read until the peer ends the stream, returning the window as we go.
pub async fn recv_all(recv: &mut h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        out.extend_from_slice(&chunk);
        recv.flow_control().release_capacity(chunk.len())?;
    }
    Ok(out)
}

/// Send `data` and half-close while reading the whole answer concurrently, as a proxy would.
pub async fn exchange(stream: H2Stream, data: &[u8]) -> Vec<u8> {
    let H2Stream {
        mut send, mut recv, ..
    } = stream;
    let (sent, received) = tokio::join!(send_all(&mut send, data), recv_all(&mut recv));
    sent.expect("sending on the stream");
    received.expect("receiving on the stream")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn new_ca() -> DevCa {
    DevCa::generate("cluster.local").expect("generating the test CA")
}
