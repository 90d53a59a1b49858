//! TCP listeners: the tunnel's bytes go to one endpoint of a (weighted) cluster, over HBONE.
//! The upstream is connected before the client's CONNECT is answered, so a failure is the
//! client's 503 rather than a tunnel that closes at once. A connection on which neither side
//! sends for the listener's idle timeout is closed, as Envoy's tcp_proxy does.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use mesh::hbone::Refusal;
use mesh::hbone::io::H2Io;
use mesh::hbone::server::InboundStream;
use tracing::{debug, info};

use crate::Waypoint;
use crate::config::{self, Config};
use crate::metrics::Peers;
use crate::request::Tunnel;

pub async fn proxy(
    w: &Waypoint,
    config: &Config,
    tunnel: &Tunnel,
    clusters: &[(String, u32)],
    rbac: &[crate::rbac::RbacFilter],
    idle_timeout: Option<Duration>,
    stream: InboundStream,
) {
    let start = Instant::now();
    // The network RBAC filters: a connection they deny is refused before any upstream.
    if !rbac.is_empty() {
        let headers = http::HeaderMap::new();
        let source = crate::route::Source::default();
        let view = crate::route::Request {
            method: "",
            scheme: "",
            authority: "",
            path: "",
            headers: &headers,
            source: &source,
        };
        let subject = crate::rbac::Subject {
            request: &view,
            peer: &tunnel.peer_principal,
            client: tunnel.client.ip(),
            destination: tunnel.authority,
        };
        let denied = crate::rbac::check(rbac, &subject, |v, shadow| w.metrics.rbac(v, shadow));
        if let Some(v) = denied {
            let details = format!(
                "rbac_access_denied_matched_policy[{}]",
                v.policy.as_deref().map_or("none", |p| p.as_str())
            );
            log(tunnel, "", None, "-", 0, 0, start);
            info!(target: "access", listener = %tunnel.listener.name, client = %tunnel.client, "{details}");
            stream.refuse(&Refusal::unauthorized(crate::rbac::DENIED_BODY));
            return;
        }
    }
    let cluster_name = config::pick_weighted(clusters, fastrand::u64(..)).unwrap_or_default();
    let Some(cluster) = config.clusters.get(cluster_name) else {
        log(tunnel, cluster_name, None, "NC", 0, 0, start);
        stream.refuse(&Refusal::unavailable(format!(
            "no cluster {cluster_name:?}"
        )));
        return;
    };
    let ctx = crate::balancer::PickContext {
        original_dst: Some(tunnel.authority),
        ..Default::default()
    };
    let Some(endpoint) = cluster.pick(&ctx) else {
        log(tunnel, cluster_name, None, "UH", 0, 0, start);
        stream.refuse(&Refusal::unavailable(format!(
            "no healthy endpoint in {cluster_name:?}"
        )));
        return;
    };
    let upstream = match w
        .upstream
        .connect(
            &config.state,
            endpoint.address,
            Some(tunnel.client),
            cluster.connect_timeout,
            cluster.policy.pool.keepalive,
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            info!(cluster = %cluster_name, endpoint = %endpoint.address, "upstream failed: {e}");
            cluster.report(
                &endpoint,
                crate::outlier::Outcome::LocalFailure { timeout: false },
            );
            log(
                tunnel,
                cluster_name,
                Some(endpoint.address),
                "UF",
                0,
                0,
                start,
            );
            stream.refuse(&Refusal::unavailable(e.to_string()));
            return;
        }
    };
    let destination = config.state.workload_by_ip(endpoint.address.ip()).cloned();
    let labels = Peers {
        source: tunnel.source_workload.as_deref(),
        source_identity: Some(&tunnel.peer),
        service: tunnel.service.as_deref(),
        destination: destination.as_deref(),
    }
    .tcp();
    let client = match stream.accept(None) {
        Ok(s) => s,
        Err(e) => {
            debug!("answering HBONE: {e}");
            return;
        }
    };
    w.metrics
        .tcp
        .connections_opened
        .get_or_create(&labels)
        .inc();
    // The byte counters move while the connection runs (as ztunnel's); the close is counted
    // at the end.
    let counters = w.metrics.tcp.live(&labels);
    let (sent, received, ended) = copy_until_idle(
        H2Io::new(client),
        H2Io::new(upstream),
        idle_timeout,
        counters,
    )
    .await;
    if let Some(why) = ended {
        debug!(cluster = %cluster_name, "TCP proxy: {why}");
    }
    w.metrics
        .tcp
        .connections_closed
        .get_or_create(&labels)
        .inc();
    log(
        tunnel,
        cluster_name,
        Some(endpoint.address),
        "-",
        sent,
        received,
        start,
    );
}

fn log(
    tunnel: &Tunnel,
    cluster: &str,
    upstream: Option<std::net::SocketAddr>,
    flags: &str,
    sent: u64,
    received: u64,
    start: Instant,
) {
    let line = serde_json::json!({
        "protocol": "TCP",
        "authority": tunnel.authority.to_string(),
        "downstream_remote_address": tunnel.client.to_string(),
        "downstream_peer_principal": tunnel.peer.to_string(),
        "listener": tunnel.listener.name,
        "upstream_cluster": cluster,
        "upstream_host": upstream.map(|u| u.to_string()),
        "response_flags": flags,
        "bytes_received": sent,
        "bytes_sent": received,
        "duration_ms": start.elapsed().as_millis() as u64,
    });
    crate::log_writer::access_line(&line);
}

/// One side of a proxied connection, counting what it reads (also into its Istio byte counter)
/// and when it last read.
struct Watched<T> {
    inner: T,
    read: u64,
    counter: Counter,
    /// Milliseconds since `since` of the last read of either side (shared by both).
    last: Arc<AtomicU64>,
    since: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read += n;
            self.counter.inc_by(n);
            let at = self.since.elapsed().as_millis() as u64;
            self.last.store(at, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copy both ways until both sides are done, an error, or `idle` passes with no byte read
/// from either side; bytes read from `client` and from `upstream`, and why it ended early.
async fn copy_until_idle<A, B>(
    client: A,
    upstream: B,
    idle: Option<Duration>,
    (sent, received): (Counter, Counter),
) -> (u64, u64, Option<String>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let since = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Watched {
        inner: client,
        read: 0,
        counter: sent,
        last: last.clone(),
        since,
    };
    let mut b = Watched {
        inner: upstream,
        read: 0,
        counter: received,
        last: last.clone(),
        since,
    };
    let ended = {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        loop {
            let Some(idle) = idle else {
                break copy.await.err().map(|e| e.to_string());
            };
            // Sleep until the idle time after the last read; a read meanwhile moves it on.
            let deadline = since + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            tokio::select! {
                r = &mut copy => break r.err().map(|e| e.to_string()),
                () = tokio::time::sleep_until(deadline.into()) => {
                    let quiet = since.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                    if quiet >= idle {
                        break Some(format!("idle for {idle:?}: closed"));
                    }
                }
            }
        }
    };
    (a.read, b.read, ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_quiet_connection_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
        let (client, mut app) = tokio::io::duplex(64);
        let (upstream, mut server) = tokio::io::duplex(64);
        let idle = Duration::from_secs(1);
        let counters = (Counter::default(), Counter::default());
        let proxy = tokio::spawn(copy_until_idle(
            client,
            upstream,
            Some(idle),
            counters.clone(),
        ));
        // Busy: a byte every 200 ms keeps it open well past the idle time.
        let mut buf = [0u8; 1];
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            app.write_all(b"x").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
        }
        assert!(!proxy.is_finished(), "closed while busy");
        assert_eq!(counters.0.get(), 8, "counted while the connection runs");
        server.write_all(b"yz").await.unwrap();
        // Then quiet: closed about the idle time after the last byte.
        let started = Instant::now();
        let (sent, received, why) = proxy.await.unwrap();
        assert!(started.elapsed() >= idle / 2, "{:?}", started.elapsed());
        assert_eq!((sent, received), (8, 2));
        assert!(why.unwrap().contains("idle"));
        assert_eq!(app.read(&mut [0u8; 8]).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn without_an_idle_timeout_the_copy_runs_to_the_end() {
        let (client, mut app) = tokio::io::duplex(64);
        let (upstream, mut server) = tokio::io::duplex(64);
        let counters = (Counter::default(), Counter::default());
        let proxy = tokio::spawn(copy_until_idle(client, upstream, None, counters));
        app.write_all(b"data").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        drop(server);
        let (sent, _, why) = proxy.await.unwrap();
        assert_eq!((got.as_slice(), sent, why), (&b"data"[..], 4, None));
    }
}
