//! Upstream connections: HBONE to `<pod IP>:15008` with the waypoint's own identity, expecting
//! the pod's (pooled by `mesh::hbone::pool`), and over those CONNECT streams HTTP client
//! connections kept alive per endpoint and protocol, so requests do not pay a CONNECT each.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh::certs::CertCache;
use mesh::hbone::client::{self, HboneError};
use mesh::hbone::copy::H2Stream;
use mesh::hbone::io::H2Io;
use mesh::hbone::pool::{Key, Pool};
use mesh::hbone::{ConnectRequest, HBONE_PORT};
use mesh::identity::Identity;
use mesh::socket::SocketFactory;
use mesh::state::State;
use tracing::debug;

use crate::request::RequestBody;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 32;
/// Kept-alive upstream HTTP connections unused this long are closed by us, before the
/// application's own idle timeout closes them under a request.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no workload with address {0} is known: its identity cannot be verified")]
    UnknownWorkload(IpAddr),
    #[error("no certificate for the waypoint yet: {0}")]
    Certificate(String),
    #[error("HBONE to {endpoint}: {source}")]
    Hbone {
        endpoint: SocketAddr,
        source: HboneError,
    },
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    #[error("TLS to {endpoint}: {reason}")]
    Tls {
        endpoint: SocketAddr,
        reason: String,
    },
    #[error("HTTP to {endpoint}: {source}")]
    Http {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
}

/// An HTTP version, downstream or upstream (the cluster's protocol options decide the latter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// A kept connection and when it was last handed out.
struct Kept<T> {
    sender: T,
    used: Instant,
}

impl<T> Kept<T> {
    fn new(sender: T) -> Self {
        Kept {
            sender,
            used: Instant::now(),
        }
    }
}

enum Conns {
    Http1(Vec<Kept<http1::SendRequest<RequestBody>>>),
    Http2(Kept<http2::SendRequest<RequestBody>>),
}

type ConnMap = HashMap<(SocketAddr, Protocol), Conns>;

pub struct Upstream {
    identity: Identity,
    certs: CertCache,
    pool: Pool,
    sockets: SocketFactory,
    /// The port of the destination pods' HBONE listener (15008; tests use others).
    hbone_port: u16,
    http: Arc<Mutex<ConnMap>>,
}

impl Upstream {
    /// Must be called inside a tokio runtime (the pool starts its reaper).
    pub fn new(identity: Identity, certs: CertCache) -> Self {
        Upstream::with_hbone_port(identity, certs, HBONE_PORT)
    }

    pub fn with_hbone_port(identity: Identity, certs: CertCache, hbone_port: u16) -> Self {
        Upstream::with_options(identity, certs, hbone_port, HTTP_IDLE_TIMEOUT)
    }

    /// `idle`: how long a kept-alive upstream HTTP connection may stay unused.
    pub fn with_options(
        identity: Identity,
        certs: CertCache,
        hbone_port: u16,
        idle: Duration,
    ) -> Self {
        certs.track(&identity);
        let http = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(reap(Arc::downgrade(&http), idle));
        Upstream {
            identity,
            certs,
            pool: Pool::new(),
            sockets: SocketFactory::host(),
            hbone_port,
            http,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// HBONE connections open (for tests and the admin page).
    pub fn hbone_connections(&self) -> usize {
        self.pool.connections()
    }

    /// One CONNECT stream to `endpoint` (pod IP and target port) through its HBONE listener.
    /// `client` goes into `forwarded: for=` when the stream carries one client's traffic only.
    pub async fn connect(
        &self,
        state: &State,
        endpoint: SocketAddr,
        client: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<H2Stream, UpstreamError> {
        let workload = state
            .workload_by_ip(endpoint.ip())
            .ok_or(UpstreamError::UnknownWorkload(endpoint.ip()))?;
        let expected = workload.identity();
        let cert = self
            .certs
            .get(&self.identity)
            .await
            .map_err(|e| UpstreamError::Certificate(e.to_string()))?;
        let dst = SocketAddr::new(endpoint.ip(), self.hbone_port);
        let key = Key {
            src_identity: self.identity.clone(),
            dst_identities: vec![expected.clone()],
            dst,
            src_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let mut req = ConnectRequest::new(endpoint);
        req.forwarded_for = client;
        let sockets = &self.sockets;
        let dial = || async move {
            let tls = cert.client_config(vec![expected])?;
            let tcp = sockets
                .connect(dst)
                .await
                .map_err(|source| HboneError::Connect { addr: dst, source })?;
            let _ = mesh::socket::tune(&tcp);
            client::handshake(tcp, tls, dst).await
        };
        match tokio::time::timeout(timeout, self.pool.connect(key, &req, dial)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(UpstreamError::Hbone { endpoint, source }),
            Err(_) => Err(UpstreamError::Timeout(endpoint)),
        }
    }

    /// Send a request to `endpoint` on a kept-alive HTTP connection of the client's protocol,
    /// opening one (over a new CONNECT stream) when none is free. Those connections are shared
    /// by every client, so their CONNECT names none (`forwarded` would be wrong for the next).
    pub async fn send(
        &self,
        state: &State,
        endpoint: SocketAddr,
        protocol: Protocol,
        timeout: Duration,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let http_err = |source| UpstreamError::Http { endpoint, source };
        match protocol {
            Protocol::Http1 => {
                let req = match self.idle_h1(endpoint) {
                    Some(mut sender) => match sender.try_send_request(req).await {
                        Ok(rsp) => {
                            self.put_h1(endpoint, sender);
                            return Ok(rsp);
                        }
                        // The kept-alive connection closed before the request went out (the
                        // app's idle timeout): not the request's failure, send it on a new one.
                        Err(mut e) => match e.take_message() {
                            Some(req) => {
                                debug!(%endpoint, "idle upstream connection was closed: {}", e.error());
                                req
                            }
                            None => return Err(http_err(e.into_error())),
                        },
                    },
                    None => req,
                };
                let io = self.connect(state, endpoint, None, timeout).await?;
                let (mut sender, conn) = http1::handshake(TokioIo::new(H2Io::new(io)))
                    .await
                    .map_err(http_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%endpoint, "upstream HTTP/1.1 connection: {e}");
                    }
                });
                let rsp = sender.send_request(req).await.map_err(http_err)?;
                // Free again once the response body has been read (hyper tracks that).
                self.put_h1(endpoint, sender);
                Ok(rsp)
            }
            Protocol::Http2 => {
                let req = match self.h2(endpoint) {
                    Some(mut sender) => match sender.try_send_request(req).await {
                        Ok(rsp) => return Ok(rsp),
                        // The shared connection went away (GOAWAY) before this request was
                        // sent: open a new one.
                        Err(mut e) => match e.take_message() {
                            Some(req) => req,
                            None => return Err(http_err(e.into_error())),
                        },
                    },
                    None => req,
                };
                let io = self.connect(state, endpoint, None, timeout).await?;
                let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(H2Io::new(io)))
                    .await
                    .map_err(http_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%endpoint, "upstream HTTP/2 connection: {e}");
                    }
                });
                if let Ok(mut m) = self.http.lock() {
                    prune(&mut m);
                    m.insert(
                        (endpoint, Protocol::Http2),
                        Conns::Http2(Kept::new(sender.clone())),
                    );
                }
                sender.send_request(req).await.map_err(http_err)
            }
        }
    }

    /// An HTTP/1.1 request that asks to switch protocols (WebSocket) gets a connection of its
    /// own: once upgraded, the connection belongs to the two ends.
    pub async fn send_upgrade(
        &self,
        state: &State,
        endpoint: SocketAddr,
        client: SocketAddr,
        timeout: Duration,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let http_err = |source| UpstreamError::Http { endpoint, source };
        let io = self.connect(state, endpoint, Some(client), timeout).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(H2Io::new(io)))
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%endpoint, "upstream upgraded connection: {e}");
            }
        });
        sender.send_request(req).await.map_err(http_err)
    }

    fn idle_h1(&self, endpoint: SocketAddr) -> Option<http1::SendRequest<RequestBody>> {
        let mut m = self.http.lock().ok()?;
        let Some(Conns::Http1(list)) = m.get_mut(&(endpoint, Protocol::Http1)) else {
            return None;
        };
        list.retain(|k| !k.sender.is_closed());
        let i = list.iter().position(|k| k.sender.is_ready())?;
        Some(list.swap_remove(i).sender)
    }

    fn put_h1(&self, endpoint: SocketAddr, sender: http1::SendRequest<RequestBody>) {
        let Ok(mut m) = self.http.lock() else { return };
        if !m.contains_key(&(endpoint, Protocol::Http1)) {
            prune(&mut m);
        }
        let entry = m
            .entry((endpoint, Protocol::Http1))
            .or_insert_with(|| Conns::Http1(Vec::new()));
        if let Conns::Http1(list) = entry
            && list.len() < MAX_IDLE_H1
        {
            list.push(Kept::new(sender));
        }
    }

    fn h2(&self, endpoint: SocketAddr) -> Option<http2::SendRequest<RequestBody>> {
        let mut m = self.http.lock().ok()?;
        match m.get_mut(&(endpoint, Protocol::Http2)) {
            Some(Conns::Http2(k)) if !k.sender.is_closed() => {
                k.used = Instant::now();
                Some(k.sender.clone())
            }
            Some(_) => {
                m.remove(&(endpoint, Protocol::Http2));
                None
            }
            None => None,
        }
    }

    /// HTTP connections kept (for tests and the admin page).
    pub fn http_connections(&self) -> usize {
        self.http
            .lock()
            .map(|m| {
                m.values()
                    .map(|c| match c {
                        Conns::Http1(l) => l.iter().filter(|k| !k.sender.is_closed()).count(),
                        Conns::Http2(k) => usize::from(!k.sender.is_closed()),
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Close kept connections unused for `idle`: dropping our handle ends an HTTP/1.1 connection
/// once its exchange in flight (if any) is done, and an HTTP/2 one once its streams are.
async fn reap(http: Weak<Mutex<ConnMap>>, idle: Duration) {
    let period = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let Some(http) = http.upgrade() else { return };
        let Ok(mut m) = http.lock() else { return };
        m.retain(|_, c| match c {
            Conns::Http1(list) => {
                list.retain(|k| {
                    // Only an idle connection (no exchange in flight) expires.
                    let expired = k.sender.is_ready() && k.used.elapsed() >= idle;
                    !(k.sender.is_closed() || expired)
                });
                !list.is_empty()
            }
            Conns::Http2(k) => !k.sender.is_closed() && k.used.elapsed() < idle,
        });
    }
}

/// Forget endpoints whose connections have all closed (pods come and go), so the map does not
/// grow with every address ever used. Called when a new endpoint is added.
fn prune(m: &mut ConnMap) {
    m.retain(|_, c| match c {
        Conns::Http1(list) => {
            list.retain(|k| !k.sender.is_closed());
            !list.is_empty()
        }
        Conns::Http2(k) => !k.sender.is_closed(),
    });
}
