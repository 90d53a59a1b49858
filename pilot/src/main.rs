//! The pilot binary: serves the mesh configuration in a folder of Kubernetes YAML over xDS, and certificates, until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pilot::server::{Config, start};
use pilot::translate::MeshOptions;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The mesh control plane: Kubernetes YAML -> xDS (workloads, services, policies) and certificates"
)]
struct Args {
    /// Folder of Kubernetes YAML (Namespaces, Pods, Services, AuthorizationPolicies, …), watched.
    #[arg(long)]
    config_dir: PathBuf,
    /// Where the CA root (root-cert.pem, root-key.pem) and the node tokens (tokens/<node>.token)
    /// are kept; created on first start.
    #[arg(long, default_value = "/var/lib/pilot")]
    state_dir: PathBuf,
    /// xDS and CA, over TLS.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Debug endpoint (`/debug/snapshot`, `/debug/connections`).
    #[arg(long, default_value = "127.0.0.1:15014")]
    debug_addr: SocketAddr,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    /// Longest certificate lifetime issued, whatever a caller asks for.
    #[arg(long, default_value_t = 24 * 3600)]
    max_cert_ttl_secs: u64,
    /// Write node tokens for these nodes at start (comma-separated), before any pod runs there.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Send `istio.io/dry-run` AuthorizationPolicies to node proxies (which log what they
    /// would do). Off by default, as in Istio: a node proxy that does not know the `dry_run`
    /// field would enforce them. Turn on only when every node proxy is ours.
    #[arg(long)]
    send_dry_run_policies: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config {
        folder: args.config_dir,
        state_dir: args.state_dir,
        listen: args.listen,
        debug: Some(args.debug_addr),
        mesh: MeshOptions {
            cluster_id: args.cluster_id,
            trust_domain: args.trust_domain,
            send_dry_run: args.send_dry_run_policies,
            ..MeshOptions::default()
        },
        max_cert_ttl: Duration::from_secs(args.max_cert_ttl_secs),
        nodes: args.nodes,
    };
    let running = start(cfg).await?;
    info!(addr = %running.addr, debug = ?running.debug_addr, "pilot started");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    running.stop().await;
    Ok(())
}
