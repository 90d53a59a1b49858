//! The waypoint binary: flags, certificates from pilot's CA for its own identity, delta ADS
//! from pilot, the HBONE listener, admin/metrics/readiness, and a drain on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh::ca_client::{CaClient, OwnIdentityCaClient};
use mesh::certs::CertCache;
use mesh::control::ControlPlane;
use mesh::identity::Identity;
use mesh::socket::SocketFactory;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use waypoint::config::Config;
use waypoint::xds::{Status, XdsHandler};

#[derive(Parser, Debug)]
#[command(name = "waypoint", version, about = "The mesh's L7 proxy (a waypoint)")]
struct Args {
    /// Pilot's xDS address, `https://<host>:15012`.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: String,
    /// PEM root that signs pilot's serving certificate.
    #[arg(long, env = "XDS_ROOT_CERT")]
    xds_root_cert: PathBuf,
    /// File holding the waypoint's service account token (re-read on each connection).
    #[arg(long, env = "XDS_TOKEN_FILE")]
    xds_token_file: PathBuf,
    /// The name pilot's certificate must carry.
    #[arg(long, default_value = "pilot.istio-system.svc")]
    xds_server_name: String,
    /// Pilot's CA (default: the xDS address).
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    #[arg(long, env = "POD_IP")]
    pod_ip: std::net::IpAddr,
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: String,
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = mesh::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The HBONE listener.
    #[arg(long, default_value = "[::]:15008")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15021")]
    readiness_addr: SocketAddr,
    /// Lifetime asked of the CA; rotated at half-life.
    #[arg(long, default_value = "86400")]
    cert_ttl_seconds: u64,
    /// How long open requests and tunnels may run after SIGTERM.
    #[arg(long, default_value = "30")]
    drain_seconds: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Request bodies are kept up to this many bytes so that a retry can send them again; a
    /// longer body is not retried (counted in `waypoint_retry_or_shadow_abandoned_total`).
    #[arg(long, env = "RETRY_BUFFER_BYTES", default_value_t = waypoint::retry::DEFAULT_BUFFER_LIMIT)]
    retry_buffer_bytes: usize,
    /// Threads that run the proxy. 1 (the default) runs everything on one thread: a request
    /// crosses several tasks (tunnel, HTTP server, HTTP client, upstream tunnel), and keeping
    /// them on one thread saves the cross-thread wake-ups that otherwise cost more CPU than
    /// the request itself. More threads raise the ceiling of requests per second.
    #[arg(long, env = "WAYPOINT_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()?
    };
    // Logs go through a buffer written by a thread of its own; written out at exit.
    let logs = waypoint::log_writer::LogWriter::start(std::io::stdout())?;
    logs.install_for_access_log();
    let _flush = waypoint::log_writer::FlushOnDrop(logs.clone());
    runtime.block_on(run(args, logs))
}

async fn run(args: Args, logs: waypoint::log_writer::LogWriter) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(logs);
    let subscriber = tracing_subscriber::registry().with(filter);
    if args.log_json {
        subscriber.with(fmt.json()).init();
    } else {
        subscriber.with(fmt).init();
    }

    let root_pem = std::fs::read_to_string(&args.xds_root_cert)
        .with_context(|| format!("reading --xds-root-cert {}", args.xds_root_cert.display()))?;
    let control = ControlPlane {
        address: args.xds_address.clone(),
        root_pem,
        root_file: Some(args.xds_root_cert.clone()),
        server_name: args.xds_server_name.clone(),
        token_file: args.xds_token_file.clone(),
    };
    let ca = ControlPlane {
        address: args
            .ca_address
            .clone()
            .unwrap_or_else(|| args.xds_address.clone()),
        ..control.clone()
    };
    let identity = Identity::new(
        &args.trust_domain,
        &args.pod_namespace,
        &args.service_account,
    );
    let certs = CertCache::new(Arc::new(OwnIdentityCaClient(CaClient {
        control: ca,
        ttl: Duration::from_secs(args.cert_ttl_seconds),
    })));
    // Istio's node id for gateways and waypoints.
    let node_id = format!(
        "router~{}~{}.{ns}~{ns}.svc.cluster.local",
        args.pod_ip,
        args.pod_name,
        ns = args.pod_namespace
    );

    let (config_tx, config_rx) = watch::channel(Arc::new(Config::default()));
    let status = Arc::new(Status::default());
    let metrics = waypoint::metrics::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let cluster_metrics = metrics.clusters.clone();
    let waypoint = Arc::new(waypoint::Waypoint {
        config: config_rx.clone(),
        upstream: waypoint::upstream::Upstream::new(identity.clone(), certs.clone()),
        metrics,
        retry_buffer_bytes: args.retry_buffer_bytes,
    });

    let (drain_trigger, drain_watch) = mesh::drain::channel();
    let host = SocketFactory::host();
    for (addr, router) in [
        (
            args.admin_addr,
            waypoint::admin::admin_router(config_rx.clone(), status.clone(), registry.clone()),
        ),
        (
            args.metrics_addr,
            waypoint::admin::metrics_router(registry.clone()),
        ),
        (
            args.readiness_addr,
            waypoint::admin::ready_router(status.clone()),
        ),
    ] {
        for addr in both_families(addr) {
            let listener = host
                .listen(addr)
                .with_context(|| format!("listening on {addr}"))?;
            tokio::spawn(mesh::admin::serve(
                listener,
                router.clone(),
                drain_watch.clone(),
            ));
        }
    }

    // Memory freed after a burst goes back to the kernel, as in ztunnel.
    tokio::spawn(mesh::memory::trim_periodically(
        mesh::memory::TRIM_PERIOD,
        mesh::memory::TRIM_THRESHOLD,
    ));
    tokio::spawn(mesh::xds::run(
        control,
        mesh::xds::ClientState::new(node_id.clone(), waypoint::xds::types()),
        Box::new(XdsHandler::new(config_tx, status.clone()).with_metrics(cluster_metrics)),
    ));

    for addr in both_families(args.listen) {
        let listener = host
            .listen(addr)
            .with_context(|| format!("listening on {addr}"))?;
        tokio::spawn(waypoint::inbound::serve(
            listener,
            waypoint.clone(),
            certs.clone(),
            identity.clone(),
            drain_watch.clone(),
        ));
    }
    drop(drain_watch);
    info!(%node_id, %identity, listen = %args.listen, "waypoint started");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
    }
    // Not ready any more: load balancers stop sending while open tunnels finish.
    status
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    let deadline = Duration::from_secs(args.drain_seconds);
    if drain_trigger.drain(deadline).await {
        info!("all requests and tunnels finished; exiting");
    } else {
        warn!(
            ?deadline,
            "drain deadline passed with tunnels still open; exiting"
        );
    }
    Ok(())
}

/// The addresses to listen on for `addr`: `[::]:port` means both families (the socket factory
/// makes IPv6 listeners IPv6-only, so IPv4 clients, the usual case, need their own socket).
fn both_families(addr: SocketAddr) -> Vec<SocketAddr> {
    if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
        vec![
            addr,
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port()),
        ]
    } else {
        vec![addr]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_wildcard_listens_on_both_families() {
        let any6: SocketAddr = "[::]:15008".parse().unwrap();
        assert_eq!(
            both_families(any6),
            [any6, "0.0.0.0:15008".parse().unwrap()]
        );
        let pod: SocketAddr = "10.0.0.1:15021".parse().unwrap();
        assert_eq!(both_families(pod), [pod]);
    }
}
