//! Upstream connections: HBONE to `<pod IP>:15008` with the waypoint's own identity, expecting
//! the pod's (pooled by `mesh::hbone::pool`, one pool per TCP keepalive setting), and over those
//! CONNECT streams HTTP client connections kept alive per endpoint, protocol and the cluster's
//! connection limits (`pool`), so requests do not pay a CONNECT each.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
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

use crate::origination::UpstreamTls;
use crate::pool::{Conns, Keepalive, Lease, Limits, Sender, Usage};
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

/// What a kept-alive HTTP connection may be reused for: the same endpoint, limits (see `pool`)
/// and client TLS (the digest of the cluster's TLS settings; `None`: plain HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    endpoint: SocketAddr,
    limits: Limits,
    tls: Option<u64>,
}

type ConnMap<T> = HashMap<ConnKey, Conns<T>>;

/// The kept-alive HTTP connections.
#[derive(Default)]
struct HttpConns {
    h1: ConnMap<http1::SendRequest<RequestBody>>,
    h2: ConnMap<http2::SendRequest<RequestBody>>,
}

/// A new upstream connection's byte stream: the CONNECT stream, or TLS inside it.
enum Io {
    Plain(TokioIo<H2Io>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<H2Io>>>),
}

/// An HTTP/1.1 client connection over `io`, driven by its own task.
async fn http1_over<IO>(
    io: IO,
    endpoint: SocketAddr,
) -> Result<http1::SendRequest<RequestBody>, UpstreamError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(io)
        .await
        .map_err(|source| UpstreamError::Http { endpoint, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%endpoint, "upstream HTTP/1.1 connection: {e}");
        }
    });
    Ok(sender)
}

/// An HTTP/2 client connection over `io`, driven by its own task.
async fn http2_over<IO>(
    io: IO,
    endpoint: SocketAddr,
) -> Result<http2::SendRequest<RequestBody>, UpstreamError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(io)
        .await
        .map_err(|source| UpstreamError::Http { endpoint, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%endpoint, "upstream HTTP/2 connection: {e}");
        }
    });
    Ok(sender)
}

impl Sender for http1::SendRequest<RequestBody> {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
    }
    fn is_ready(&self) -> bool {
        http1::SendRequest::is_ready(self)
    }
    fn share(&self) -> Option<Self> {
        None
    }
    fn streams(_: &Limits) -> u32 {
        1
    }
}

impl Sender for http2::SendRequest<RequestBody> {
    fn is_closed(&self) -> bool {
        http2::SendRequest::is_closed(self)
    }
    fn is_ready(&self) -> bool {
        !http2::SendRequest::is_closed(self)
    }
    fn share(&self) -> Option<Self> {
        Some(self.clone())
    }
    fn streams(limits: &Limits) -> u32 {
        // Without a limit of ours, one connection carries them all: hyper queues requests
        // past the peer's SETTINGS_MAX_CONCURRENT_STREAMS.
        limits.max_concurrent_streams.unwrap_or(u32::MAX)
    }
}

/// A response body from an upstream connection of the pool: the request holds its connection
/// (for `max_concurrent_streams` and the idle timeout) until the body ends.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
    fn new(inner: Incoming, lease: Option<Lease>) -> Self {
        UpstreamBody { inner, lease }
    }

    /// The body of a response on a connection of its own (not pooled).
    pub fn unpooled(inner: Incoming) -> Self {
        UpstreamBody { inner, lease: None }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.lease = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn with_lease(rsp: http::Response<Incoming>, lease: Option<Lease>) -> http::Response<UpstreamBody> {
    rsp.map(|b| UpstreamBody::new(b, lease))
}

pub struct Upstream {
    identity: Identity,
    certs: CertCache,
    /// HBONE connections, one pool per TCP keepalive setting (see `pool`).
    pools: Mutex<HashMap<Option<Keepalive>, Pool>>,
    sockets: SocketFactory,
    /// The port of the destination pods' HBONE listener (15008; tests use others).
    hbone_port: u16,
    http: Arc<Mutex<HttpConns>>,
    /// Kept-alive HTTP connections of clusters that give no idle timeout close after this.
    idle: Duration,
    /// Wakes the reaper when connections under new limits (maybe shorter timeouts) appear.
    new_limits: Arc<tokio::sync::Notify>,
}

impl Upstream {
    /// Must be called inside a tokio runtime (the pool starts its reaper).
    pub fn new(identity: Identity, certs: CertCache) -> Self {
        Upstream::with_hbone_port(identity, certs, HBONE_PORT)
    }

    pub fn with_hbone_port(identity: Identity, certs: CertCache, hbone_port: u16) -> Self {
        Upstream::with_options(identity, certs, hbone_port, HTTP_IDLE_TIMEOUT)
    }

    /// `idle`: how long a kept-alive upstream HTTP connection may stay unused when its cluster
    /// gives no idle timeout.
    pub fn with_options(
        identity: Identity,
        certs: CertCache,
        hbone_port: u16,
        idle: Duration,
    ) -> Self {
        certs.track(&identity);
        let http = Arc::new(Mutex::new(HttpConns::default()));
        let new_limits = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(reap(Arc::downgrade(&http), idle, new_limits.clone()));
        Upstream {
            identity,
            certs,
            pools: Mutex::new(HashMap::from([(None, Pool::new())])),
            sockets: SocketFactory::host(),
            hbone_port,
            http,
            idle,
            new_limits,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// HBONE connections open (for tests and the admin page).
    pub fn hbone_connections(&self) -> usize {
        self.pools
            .lock()
            .map(|p| p.values().map(Pool::connections).sum())
            .unwrap_or(0)
    }

    /// The HBONE pool of connections with `keepalive` (a `Pool` is a shared handle).
    fn pool(&self, keepalive: Option<Keepalive>) -> Pool {
        match self.pools.lock() {
            Ok(mut p) => p.entry(keepalive).or_default().clone(),
            Err(_) => Pool::new(),
        }
    }

    /// One CONNECT stream to `endpoint` (pod IP and target port) through its HBONE listener,
    /// on an HBONE connection whose socket has `keepalive` (the cluster's).
    /// `client` goes into `forwarded: for=` when the stream carries one client's traffic only.
    pub async fn connect(
        &self,
        state: &State,
        endpoint: SocketAddr,
        client: Option<SocketAddr>,
        timeout: Duration,
        keepalive: Option<Keepalive>,
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
            if let Some(k) = keepalive
                && let Err(e) = mesh::socket::set_keepalive(&tcp, k.time, k.interval, k.probes)
            {
                debug!(%dst, "setting the cluster's TCP keepalive: {e}");
            }
            client::handshake(tcp, tls, dst).await
        };
        let pool = self.pool(keepalive);
        match tokio::time::timeout(timeout, pool.connect(key, &req, dial)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(UpstreamError::Hbone { endpoint, source }),
            Err(_) => Err(UpstreamError::Timeout(endpoint)),
        }
    }

    /// Send a request to `endpoint` on a kept-alive HTTP connection of the client's protocol
    /// under the cluster's `limits` (and through its client `tls`, when it originates TLS),
    /// opening one (over a new CONNECT stream) when none takes it. Those connections are
    /// shared by every client, so their CONNECT names none (`forwarded` would be wrong for the
    /// next).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        state: &State,
        endpoint: SocketAddr,
        protocol: Protocol,
        timeout: Duration,
        limits: &Limits,
        tls: Option<&UpstreamTls>,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let http_err = |source| UpstreamError::Http { endpoint, source };
        let key = ConnKey {
            endpoint,
            limits: *limits,
            tls: tls.map(UpstreamTls::digest),
        };
        match protocol {
            Protocol::Http1 => {
                let req = match self.checkout(&key, |c| &mut c.h1) {
                    Some((mut sender, lease)) => match sender.try_send_request(req).await {
                        Ok(rsp) => {
                            self.put(
                                key,
                                |c| &mut c.h1,
                                sender,
                                lease.usage().clone(),
                                MAX_IDLE_H1,
                            );
                            return Ok(with_lease(rsp, Some(lease)));
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
                let mut sender = match self.open(state, endpoint, timeout, limits, tls).await? {
                    Io::Plain(io) => http1_over(io, endpoint).await?,
                    Io::Tls(io) => http1_over(io, endpoint).await?,
                };
                let usage = Usage::new(Instant::now());
                let lease = usage.lease();
                let rsp = sender.send_request(req).await.map_err(http_err)?;
                // Free again once the response body has been read (hyper tracks that); kept
                // unless this request was its last.
                self.put(key, |c| &mut c.h1, sender, usage, MAX_IDLE_H1);
                Ok(with_lease(rsp, Some(lease)))
            }
            Protocol::Http2 => {
                let req = match self.checkout(&key, |c| &mut c.h2) {
                    Some((mut sender, lease)) => match sender.try_send_request(req).await {
                        Ok(rsp) => return Ok(with_lease(rsp, Some(lease))),
                        // The shared connection went away (GOAWAY) before this request was
                        // sent: open a new one.
                        Err(mut e) => match e.take_message() {
                            Some(req) => req,
                            None => return Err(http_err(e.into_error())),
                        },
                    },
                    None => req,
                };
                let mut sender = match self.open(state, endpoint, timeout, limits, tls).await? {
                    Io::Plain(io) => http2_over(io, endpoint).await?,
                    Io::Tls(io) => http2_over(io, endpoint).await?,
                };
                let usage = Usage::new(Instant::now());
                let lease = usage.lease();
                self.put(key, |c| &mut c.h2, sender.clone(), usage, usize::MAX);
                let rsp = sender.send_request(req).await.map_err(http_err)?;
                Ok(with_lease(rsp, Some(lease)))
            }
        }
    }

    /// A new CONNECT stream to `endpoint`, through the cluster's TLS when it has one.
    async fn open(
        &self,
        state: &State,
        endpoint: SocketAddr,
        timeout: Duration,
        limits: &Limits,
        tls: Option<&UpstreamTls>,
    ) -> Result<Io, UpstreamError> {
        let io = H2Io::new(
            self.connect(state, endpoint, None, timeout, limits.keepalive)
                .await?,
        );
        let Some(tls) = tls else {
            return Ok(Io::Plain(TokioIo::new(io)));
        };
        let stream =
            tokio::time::timeout(timeout, crate::origination::handshake(tls, io, endpoint))
                .await
                .map_err(|_| UpstreamError::Timeout(endpoint))?
                .map_err(|e| UpstreamError::Tls {
                    endpoint,
                    reason: e.to_string(),
                })?;
        Ok(Io::Tls(Box::new(TokioIo::new(stream))))
    }

    /// An HTTP/1.1 request that asks to switch protocols (WebSocket) gets a connection of its
    /// own: once upgraded, the connection belongs to the two ends.
    pub async fn send_upgrade(
        &self,
        state: &State,
        endpoint: SocketAddr,
        client: SocketAddr,
        timeout: Duration,
        keepalive: Option<Keepalive>,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let http_err = |source| UpstreamError::Http { endpoint, source };
        let io = self
            .connect(state, endpoint, Some(client), timeout, keepalive)
            .await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(H2Io::new(io)))
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%endpoint, "upstream upgraded connection: {e}");
            }
        });
        let rsp = sender.send_request(req).await.map_err(http_err)?;
        Ok(rsp.map(UpstreamBody::unpooled))
    }

    fn checkout<T: Sender>(
        &self,
        key: &ConnKey,
        map: impl FnOnce(&mut HttpConns) -> &mut ConnMap<T>,
    ) -> Option<(T, Lease)> {
        let mut c = self.http.lock().ok()?;
        map(&mut c)
            .get_mut(key)?
            .checkout(&key.limits, self.idle, Instant::now())
    }

    fn put<T: Sender>(
        &self,
        key: ConnKey,
        map: impl FnOnce(&mut HttpConns) -> &mut ConnMap<T>,
        sender: T,
        usage: Arc<Usage>,
        max: usize,
    ) {
        let Ok(mut c) = self.http.lock() else { return };
        let m = map(&mut c);
        let now = Instant::now();
        if !m.contains_key(&key) {
            // Forget endpoints whose connections have all closed (pods come and go), so the
            // map does not grow with every address ever used.
            m.retain(|k, conns| conns.reap(&k.limits, self.idle, now));
            self.new_limits.notify_one();
        }
        m.entry(key)
            .or_default()
            .put(sender, usage, &key.limits, self.idle, max, now);
    }

    /// HTTP connections kept (for tests and the admin page).
    pub fn http_connections(&self) -> usize {
        self.http
            .lock()
            .map(|c| {
                c.h1.values().map(Conns::open).sum::<usize>()
                    + c.h2.values().map(Conns::open).sum::<usize>()
            })
            .unwrap_or(0)
    }
}

/// Close kept connections that are idle past their timeout, retired or closed: dropping our
/// handle ends an HTTP/1.1 connection once its exchange in flight (if any) is done, and an
/// HTTP/2 one once its streams are. Runs as often as the shortest timeout needs.
async fn reap(http: Weak<Mutex<HttpConns>>, idle: Duration, new_limits: Arc<tokio::sync::Notify>) {
    let mut period = Limits::default().check_period(idle);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = new_limits.notified() => {}
        }
        let Some(http) = http.upgrade() else { return };
        let Ok(mut c) = http.lock() else { return };
        let now = Instant::now();
        period = Limits::default().check_period(idle);
        c.h1.retain(|k, conns| {
            period = period.min(k.limits.check_period(idle));
            conns.reap(&k.limits, idle, now)
        });
        c.h2.retain(|k, conns| {
            period = period.min(k.limits.check_period(idle));
            conns.reap(&k.limits, idle, now)
        });
    }
}
