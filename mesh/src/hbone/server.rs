//! The HBONE server: accepts mTLS connections, validates each CONNECT, and hands the stream to a
//! handler (ztunnel's inbound, later the waypoint) that authorizes and answers it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::copy::H2Stream;
use super::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, ConnectRequest, HEADER_LIST_LIMIT, MAX_FRAME_SIZE,
    PROXY_PORTS, Refusal, SERVER_MAX_CONCURRENT_STREAMS, STREAM_WINDOW,
};
use crate::drain;
use crate::identity::Identity;

/// One accepted CONNECT, waiting for the handler's answer.
pub struct InboundStream {
    pub request: ConnectRequest,
    /// The client's identity, from its certificate.
    pub peer: Identity,
    /// The client's leaf certificate (DER), for what a proxy forwards about it (the waypoint's
    /// `x-forwarded-client-cert`); shared by the connection's streams.
    pub peer_certificate: Arc<[u8]>,
    pub peer_addr: SocketAddr,
    /// Where the HBONE connection arrived.
    pub local_addr: SocketAddr,
    respond: SendResponse<Bytes>,
    recv: h2::RecvStream,
}

impl InboundStream {
    /// Answer with an error status and end the stream.
    pub fn refuse(mut self, refusal: &Refusal) {
        debug!(peer = %self.peer, authority = %self.request.authority, status = %refusal.status, "HBONE refused: {}", refusal.reason);
        let mut rsp = Response::new(());
        *rsp.status_mut() = refusal.status;
        let _ = self.respond.send_response(rsp, true);
    }

    /// Answer 200 (with our `baggage`) and return the stream to proxy.
    pub fn accept(mut self, baggage: Option<&str>) -> Result<H2Stream, h2::Error> {
        let mut rsp = Response::new(());
        if let Some(b) = baggage.and_then(|b| http::HeaderValue::from_str(b).ok()) {
            rsp.headers_mut().insert("baggage", b);
        }
        let send = self.respond.send_response(rsp, false)?;
        Ok(H2Stream::new(send, self.recv))
    }
}

/// What the server does with a validated CONNECT.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, stream: InboundStream) -> impl Future<Output = ()> + Send;
}

/// Server policy knobs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Refuse an authority whose IP is not the address the connection arrived on. True for a
    /// pod's own HBONE listener; a waypoint accepts any destination it fronts.
    pub require_local_authority: bool,
}

/// Serve one accepted TCP connection until it closes or the drain finishes it.
pub async fn serve<H: Handler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    options: Options,
    handler: Arc<H>,
    drain: drain::Watch,
) {
    serve_inner(tcp, tls, options, handler, drain, None).await
}

/// As [`serve`], holding `admission` (a handshake slot, see [`super::admission`]) until the
/// client is authenticated and HTTP/2 is up.
pub async fn serve_admitted<H: Handler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    options: Options,
    handler: Arc<H>,
    drain: drain::Watch,
    admission: super::admission::Admission,
) {
    serve_inner(tcp, tls, options, handler, drain, Some(admission)).await
}

async fn serve_inner<H: Handler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    options: Options,
    handler: Arc<H>,
    drain: drain::Watch,
    admission: Option<super::admission::Admission>,
) {
    let peer_addr = tcp.peer_addr().ok();
    let local_addr = tcp.local_addr().ok();
    let (Some(peer_addr), Some(local_addr)) = (peer_addr, local_addr) else {
        return;
    };
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(super::buffered(tcp));
    let tls = match tokio::time::timeout(CONNECT_TIMEOUT, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%peer_addr, "HBONE TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            warn!(%peer_addr, "HBONE TLS handshake timed out");
            return;
        }
    };
    let peer = match crate::tls::peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(p) => p,
        Err(e) => {
            warn!(%peer_addr, "HBONE client without identity: {e}");
            return;
        }
    };
    let peer_certificate: Arc<[u8]> = match tls.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => Arc::from(leaf.as_ref()),
        _ => Arc::from(&[][..]),
    };
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(HEADER_LIST_LIMIT)
        .handshake::<_, Bytes>(tls);
    // A client that completed TLS and then sends nothing must not hold the socket forever.
    let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            warn!(%peer_addr, %peer, "HBONE HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            warn!(%peer_addr, %peer, "HBONE client sent no HTTP/2 preface in time");
            return;
        }
    };
    // Authenticated and speaking HTTP/2: no longer a handshake in progress.
    drop(admission);
    let ping = super::client::keepalive(conn.ping_pong());
    tokio::pin!(ping);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let (parts, recv) = req.into_parts();
                    let req = http::Request::from_parts(parts, ());
                    let stream = InboundStream {
                        request: ConnectRequest::new(local_addr),
                        peer: peer.clone(),
                        peer_certificate: peer_certificate.clone(),
                        peer_addr,
                        local_addr,
                        respond,
                        recv,
                    };
                    match validate(&req, local_addr, options) {
                        Ok(request) => {
                            let handler = handler.clone();
                            let drain = drain.clone();
                            tokio::spawn(async move {
                                handler.handle(InboundStream { request, ..stream }).await;
                                drop(drain);
                            });
                        }
                        Err(refusal) => stream.refuse(&refusal),
                    }
                }
                Some(Err(e)) => {
                    debug!(%peer_addr, "HBONE connection error: {e}");
                    break;
                }
                None => break,
            },
            _ = drain.signaled(), if !draining => {
                // GOAWAY: no new streams; the open ones run to completion.
                conn.graceful_shutdown();
                draining = true;
            }
            _ = &mut ping => {
                debug!(%peer_addr, "HBONE client missed its pings");
                break;
            }
        }
    }
}

/// HBONE's checks on a CONNECT before any handler sees it.
pub fn validate(
    req: &http::Request<()>,
    local_addr: SocketAddr,
    options: Options,
) -> Result<ConnectRequest, Refusal> {
    let request = ConnectRequest::from_http(req)?;
    let local_ip = local_addr.ip().to_canonical();
    let target_ip = request.authority.ip().to_canonical();
    if options.require_local_authority && target_ip != local_ip {
        return Err(Refusal::bad_request(format!(
            "authority {} is not this pod's address {local_ip}",
            request.authority
        )));
    }
    if target_ip == local_ip && PROXY_PORTS.contains(&request.authority.port()) {
        return Err(Refusal::bad_request(format!(
            "authority {} is one of the proxy's own ports",
            request.authority
        )));
    }
    Ok(request)
}

/// Convenience for handlers: the status to answer when an upstream connect fails.
pub fn upstream_failed(e: &std::io::Error) -> Refusal {
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("connecting to the application: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(authority: &'static str) -> http::Request<()> {
        ConnectRequest::new(authority.parse().unwrap()).to_http()
    }

    #[test]
    fn checks_authority_against_local_address() {
        let local: SocketAddr = "10.244.1.10:15008".parse().unwrap();
        let strict = Options {
            require_local_authority: true,
        };
        assert!(validate(&connect("10.244.1.10:8080"), local, strict).is_ok());
        let other = validate(&connect("10.244.1.11:8080"), local, strict).unwrap_err();
        assert_eq!(other.status, StatusCode::BAD_REQUEST);
        let own = validate(&connect("10.244.1.10:15001"), local, strict).unwrap_err();
        assert_eq!(own.status, StatusCode::BAD_REQUEST);
        let waypoint = Options {
            require_local_authority: false,
        };
        assert!(validate(&connect("10.96.0.10:80"), local, waypoint).is_ok());
    }
}
