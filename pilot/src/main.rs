//! The pilot binary: serves the mesh configuration of a folder of Kubernetes YAML, or of a cluster's API server, over xDS, and certificates, until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use pilot::server::{Config, Kubernetes, Source, start};
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
    /// Where the mesh configuration comes from. `folder`: the YAML in --config-dir, and pilot's
    /// own node tokens. `kubernetes`: the cluster's API server (kubeconfig from $KUBECONFIG or
    /// ~/.kube/config, else the pod's in-cluster service account), and service-account tokens
    /// checked with a TokenReview.
    #[arg(long, value_enum, default_value_t = SourceKind::Folder)]
    source: SourceKind,
    /// Folder of Kubernetes YAML (Namespaces, Pods, Services, AuthorizationPolicies, …), watched.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Kubernetes source: the service account (`namespace/name`) of the node agents (ztunnel),
    /// whose tokens get certificates for the pods on their node.
    #[arg(long, default_value = "istio-system/ztunnel")]
    node_agent: String,
    /// Folder source: where the CA root (root-cert.pem, root-key.pem) and the tokens
    /// (tokens/<node>.token, tokens/sa/<ns>.<sa>.token) are kept; created on first start. The
    /// Kubernetes source keeps the root in the Secret istio-system/istio-ca-secret instead.
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
    /// Folder source: write node tokens for these nodes at start (comma-separated), before any
    /// pod runs there.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Send `istio.io/dry-run` AuthorizationPolicies to node proxies (which log what they
    /// would do). Off by default, as in Istio: a node proxy that does not know the `dry_run`
    /// field would enforce them. Turn on only when every node proxy is ours.
    #[arg(long)]
    send_dry_run_policies: bool,
    /// Kubernetes source: the image of the waypoint Deployments pilot applies for each
    /// `istio-waypoint` Gateway (with its ServiceAccount and Service, owned by the Gateway).
    #[arg(long, default_value = pilot::provision::DEFAULT_IMAGE)]
    waypoint_image: String,
    /// Kubernetes source: pilot's xDS address as waypoint pods dial it (their `--xds-address`).
    #[arg(long, default_value = pilot::provision::DEFAULT_XDS_ADDRESS)]
    waypoint_xds_address: String,
    /// Kubernetes source: do not provision waypoint Deployments/Services/ServiceAccounts.
    #[arg(long)]
    no_waypoint_provisioning: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// One step of a CA root rotation, on the state folder (`--state-dir`) or, with `--source
    /// kubernetes`, on the Secret istio-system/istio-ca-secret; a running pilot applies it
    /// within seconds. Steps, each at least one certificate lifetime after the one before:
    /// prepare (a new root is trusted), activate (it signs), finish (the old one is dropped).
    RotateRoot {
        #[arg(value_enum)]
        step: pilot::roots::Step,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SourceKind {
    Folder,
    Kubernetes,
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
    if let Some(Command::RotateRoot { step }) = args.command {
        let said = match args.source {
            SourceKind::Folder => {
                pilot::roots::rotate_folder(&args.state_dir, &args.trust_domain, step)?
            }
            SourceKind::Kubernetes => {
                let config = kube::Config::infer().await.context(
                    "no Kubernetes configuration (kubeconfig or in-cluster service account)",
                )?;
                let client = kube::Client::try_from(config).context("Kubernetes client")?;
                let ns = MeshOptions::default().root_namespace;
                pilot::ca::rotate_secret(client, &ns, &args.trust_domain, step).await?
            }
        };
        println!("{said}");
        return Ok(());
    }
    let source = match (args.source, args.config_dir) {
        (SourceKind::Folder, Some(dir)) => Source::Folder(dir),
        (SourceKind::Folder, None) => anyhow::bail!("--source folder needs --config-dir"),
        (SourceKind::Kubernetes, Some(_)) => {
            anyhow::bail!(
                "--config-dir is for --source folder; --source kubernetes reads the cluster"
            )
        }
        (SourceKind::Kubernetes, None) => {
            let node_agent = args
                .node_agent
                .split_once('/')
                .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
                .map(|(ns, sa)| (ns.to_string(), sa.to_string()))
                .with_context(|| {
                    format!(
                        "--node-agent {:?}: expected <namespace>/<service account>",
                        args.node_agent
                    )
                })?;
            let config = kube::Config::infer().await.context(
                "no Kubernetes configuration (kubeconfig or in-cluster service account)",
            )?;
            info!(cluster = %config.cluster_url, "Kubernetes source");
            let client = kube::Client::try_from(config).context("Kubernetes client")?;
            let waypoints = (!args.no_waypoint_provisioning).then_some(pilot::provision::Options {
                image: args.waypoint_image,
                xds_address: args.waypoint_xds_address,
            });
            Source::Kubernetes(Kubernetes {
                client,
                node_agent,
                waypoints,
            })
        }
    };
    let cfg = Config {
        source,
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
