//! TCP listeners: the tunnel's bytes go to one endpoint of a (weighted) cluster, over HBONE.
//! The upstream is connected before the client's CONNECT is answered, so a failure is the
//! client's 503 rather than a tunnel that closes at once.

use std::time::Instant;

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
    let mut client = H2Io::new(client);
    let mut upstream = H2Io::new(upstream);
    let (sent, received) = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(t) => t,
        Err(e) => {
            debug!("TCP proxy: {e}");
            (0, 0)
        }
    };
    w.metrics.tcp.closed(&labels, sent, received);
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
    info!(target: "access", "{line}");
}
