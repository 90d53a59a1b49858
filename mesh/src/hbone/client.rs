//! The HBONE client: TLS and HTTP/2 handshakes on a dialed socket, and CONNECT streams on the
//! resulting connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tracing::debug;

use super::copy::H2Stream;
use super::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, ConnectRequest, MAX_FRAME_SIZE, PING_INTERVAL,
    PING_TIMEOUT, STREAM_WINDOW,
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(
        "connecting to {addr}: {source} (is a NetworkPolicy blocking port 15008 between nodes?)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} timed out")]
    TlsTimeout { addr: SocketAddr },
    #[error("peer {addr} did not negotiate ALPN h2")]
    Alpn { addr: SocketAddr },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("{addr} answered CONNECT with {status}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
    },
    /// Another caller's dial to the same destination, which this one waited for, failed:
    /// reported to every waiter at once instead of each redialing in turn.
    #[error("{reason} (a dial this connection waited for)")]
    DialFailed { addr: SocketAddr, reason: String },
    #[error("building TLS configuration: {0}")]
    Config(#[from] crate::tls::TlsError),
    /// The client's own certificate, needed to dial, is not available.
    #[error("our certificate: {0}")]
    Certificate(String),
}

impl HboneError {
    /// The HBONE status the peer answered, when it got that far.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HboneError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An established HBONE connection: cloneable handle to open streams on.
#[derive(Clone)]
pub struct Connection {
    pub(crate) send: SendRequest<Bytes>,
    pub(crate) addr: SocketAddr,
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// True once the connection takes no new streams: its driver ended (peer went away,
    /// missed pings), or the peer sent GOAWAY (it is draining: its open streams go on, but a
    /// new one must go to a new connection).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Open one CONNECT stream and wait for the peer's answer.
    pub async fn connect(&self, req: &ConnectRequest) -> Result<H2Stream, HboneError> {
        let addr = self.addr;
        let h2 = |source: h2::Error| {
            // GOAWAY (graceful or not) or a broken transport: no stream will open here again.
            if source.is_go_away() || source.is_io() {
                self.closed.store(true, Ordering::Release);
            }
            HboneError::H2 { addr, source }
        };
        let mut send = self.send.clone().ready().await.map_err(h2)?;
        let (response, stream) = send.send_request(req.to_http(), false).map_err(h2)?;
        let response = response.await.map_err(h2)?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status {
                addr,
                status: response.status(),
            });
        }
        Ok(H2Stream::new(stream, response.into_body()))
    }
}

/// TLS then HTTP/2 over `tcp`; spawns the task that drives the connection and pings it.
pub async fn handshake(
    tcp: TcpStream,
    tls: Arc<ClientConfig>,
    addr: SocketAddr,
) -> Result<Connection, HboneError> {
    // No SNI is sent (the config disables it); the name only satisfies the API.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls_conn = tokio_rustls::TlsConnector::from(tls).connect(name, super::buffered(tcp));
    let tls = match tokio::time::timeout(CONNECT_TIMEOUT, tls_conn).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(HboneError::Tls { addr, source }),
        Err(_) => return Err(HboneError::TlsTimeout { addr }),
    };
    if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
        return Err(HboneError::Alpn { addr });
    }
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|source| HboneError::H2 { addr, source })?;
    let closed = Arc::new(AtomicBool::new(false));
    let ping = conn.ping_pong();
    let done = closed.clone();
    tokio::spawn(async move {
        tokio::select! {
            r = &mut conn => if let Err(e) = r { debug!(%addr, "HBONE connection ended: {e}") },
            _ = keepalive(ping) => debug!(%addr, "HBONE connection missed its pings"),
        }
        done.store(true, Ordering::Release);
    });
    Ok(Connection { send, addr, closed })
}

/// PING every interval; return when a PONG does not come back in time.
pub(crate) async fn keepalive(ping: Option<h2::PingPong>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}
