//! The ztunnel binary: parses flags, sets up logging, runs the node agent until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh::ca_client::CaClient;
use mesh::certs::{CertCache, DevCaSource};
use mesh::control::ControlPlane;
use mesh::socket::SocketFactory;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use ztunnel::node::{Node, NodeOptions};
use ztunnel::redirect::{self, EbpfSettings, Mode};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The per-node L4 proxy of the mesh (HBONE, in-pod capture, L4 policy)"
)]
struct Args {
    /// This node's name; the workloads whose `node` matches are enrolled here.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The control plane (pilot): `https://<host>:15012`. With it, configuration comes over
    /// delta xDS and certificates from its CA; without it, from `--config` and `--ca-cert/--ca-key`.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// PEM root that signs the control plane's serving certificate.
    #[arg(long, requires = "xds_address")]
    xds_root_cert: Option<PathBuf>,
    /// File holding this node's bearer token for the control plane (re-read on each connection).
    #[arg(long, requires = "xds_address")]
    xds_token_file: Option<PathBuf>,
    /// The name the control plane's certificate must carry.
    #[arg(long, default_value = "pilot.istio-system.svc")]
    xds_server_name: String,
    /// Standalone configuration: a folder of Kubernetes YAML (every `*.yaml`/`*.yml` in it and
    /// its subfolders, hidden ones skipped), or one YAML file, the objects pilot's folder source
    /// reads (Namespaces, Pods, Services, AuthorizationPolicies, ServiceEntries, waypoint
    /// Gateways, …), translated in-process as pilot would. Changes are followed; an invalid
    /// object keeps its last good version.
    #[arg(
        long,
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    config: Option<PathBuf>,
    /// With `--config`: the mesh's trust domain (`spiffe://<trust domain>/ns/…/sa/…`).
    #[arg(long, default_value = "cluster.local", conflicts_with = "xds_address")]
    trust_domain: String,
    /// With `--config`: the cluster id the workloads carry.
    #[arg(long, default_value = "Kubernetes", conflicts_with = "xds_address")]
    cluster_id: String,
    /// Development CA root certificate (PEM).
    #[arg(
        long,
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    ca_cert: Option<PathBuf>,
    /// Development CA private key (PEM, PKCS#8).
    #[arg(
        long,
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    ca_key: Option<PathBuf>,
    /// Lifetime of issued workload certificates; rotated at half-life.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// Root of the cgroup v2 hierarchy where pods' cgroups are found (kubelet layout).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// How pod traffic is captured: `ebpf` refuses to start when the kernel lacks a feature,
    /// `auto` then falls back to nftables.
    #[arg(long, value_enum, default_value = "ebpf")]
    redirect: RedirectArg,
    /// The cgroup holding every pod, where the eBPF cgroup programs attach (default: kubepods.slice
    /// or kubepods under --cgroup-root).
    #[arg(long)]
    pod_cgroup: Option<PathBuf>,
    /// Where bpffs is mounted (mounted there if it is /sys/fs/bpf and not mounted yet).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// This instance's directory for pinned maps and links, under --bpffs.
    #[arg(long, default_value = "ztunnel")]
    bpf_pin_dir: PathBuf,
    /// Deliver inbound connections to applications from the client's address (IP_TRANSPARENT,
    /// a mark and pod-local policy routing set up at enrollment). `off`, or when the setup
    /// fails in a pod (a warning), the application sees the pod's own address.
    #[arg(long, value_enum, default_value = "on")]
    preserve_source: OnOff,
    /// With `--redirect none`: send connections dialed straight to 15001 here (benchmarks).
    #[arg(long)]
    no_capture_target: Option<SocketAddr>,
    /// Capture the pods' DNS (UDP and TCP to port 53) into a DNS proxy on 15053 in each pod,
    /// which answers for the mesh's service hostnames and forwards the rest. `off`: UDP 53 is
    /// untouched and TCP 53 is captured like any TCP, no DNS proxy runs.
    #[arg(long, value_enum, default_value = "on")]
    dns_capture: OnOff,
    /// Upstream resolvers for names the DNS proxy does not know (`IP` or `IP:PORT`, repeat or
    /// separate with commas); default: the nameservers of ztunnel's own /etc/resolv.conf.
    /// Queries leave from inside the pod that asked.
    #[arg(long, value_delimiter = ',', value_parser = parse_upstream)]
    dns_upstream: Vec<SocketAddr>,
    /// The eBPF object to load instead of the one embedded at build time.
    #[arg(long, env = "ZTUNNEL_EBPF_OBJECT")]
    ebpf_object: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// How long open connections may run after SIGTERM before the process exits. The listeners
    /// close at once; during an upgrade a new ztunnel started beside this one (DaemonSet
    /// `maxSurge: 1`) takes the new connections and those still queued.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Worker threads (0: one per CPU). With `--runtime shared`, 1 runs everything on one thread
    /// with tokio's current-thread scheduler, which saves the cross-thread wakeups of work
    /// stealing; with `--runtime per-core`, the number of cores the pods are spread over.
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// How the proxies' work is spread over threads. `per-core`: each pod is placed on one of
    /// `--worker-threads` threads that each run their own single-threaded runtime, so a
    /// connection's work never changes thread; the control work (xDS, certificates, admin)
    /// runs on the main thread. It costs less CPU per connection and per byte than `shared`
    /// (no cross-thread wake-ups), but one pod's traffic is limited to one core. `shared`:
    /// one runtime for everything, multi-threaded with work stealing (or one thread with
    /// `--worker-threads=1`).
    #[arg(long, value_enum, env = "ZTUNNEL_RUNTIME", default_value = "per-core")]
    runtime: RuntimeArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RuntimeArg {
    Shared,
    PerCore,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RedirectArg {
    Ebpf,
    Nftables,
    Auto,
    None,
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{s:?}: expected an IP address, or IP:PORT ([IPv6]:PORT)"))
}

/// The DNS proxy's upstreams: the flag, else ztunnel's own resolv.conf.
fn dns_upstreams(flag: &[SocketAddr]) -> Vec<SocketAddr> {
    if !flag.is_empty() {
        return flag.to_vec();
    }
    const RESOLV_CONF: &str = "/etc/resolv.conf";
    let found = std::fs::read_to_string(RESOLV_CONF)
        .map(|text| ztunnel::dns::resolv_conf_nameservers(&text))
        .unwrap_or_else(|e| {
            warn!("reading {RESOLV_CONF}: {e}");
            vec![]
        });
    if found.is_empty() {
        warn!(
            "no nameserver in {RESOLV_CONF} and no --dns-upstream: DNS names outside the mesh \
             will get SERVFAIL"
        );
    }
    found
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 30s, 5m, 24h"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = match (args.runtime, args.worker_threads) {
        // The main runtime only does control work; the cores are started in `run`.
        (RuntimeArg::PerCore, _) | (RuntimeArg::Shared, 1) => {
            tokio::runtime::Builder::new_current_thread()
        }
        (RuntimeArg::Shared, n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b
        }
    };
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let initial_level = filter.max_level_hint();
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let registry = tracing_subscriber::registry().with(filter);
    if args.log_json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }

    let mode = match args.redirect {
        RedirectArg::Ebpf => Mode::Ebpf,
        RedirectArg::Nftables => Mode::Nftables,
        RedirectArg::Auto => Mode::Auto,
        RedirectArg::None => Mode::None,
    };
    let capture = redirect::start(
        mode,
        &EbpfSettings {
            object: args.ebpf_object.clone(),
            cgroup_root: args.cgroup_root.clone(),
            pod_cgroup: args.pod_cgroup.clone(),
            bpffs: args.bpffs.clone(),
            pin_dir: args.bpf_pin_dir.clone(),
            log_level: redirect::log_level(initial_level),
            dns_capture: args.dns_capture == OnOff::On,
        },
        args.no_capture_target,
    )
    .map_err(|e| anyhow::anyhow!("capture ({mode:?}): {e}"))?;
    let capture_for_level = capture.clone();
    let set_level: ztunnel::admin::SetLevel = Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        capture_for_level.set_log_level(redirect::log_level(filter.max_level_hint()));
        reload.reload(filter).map_err(|e| e.to_string())
    });

    let control = match &args.xds_address {
        Some(address) => {
            let root = args
                .xds_root_cert
                .as_ref()
                .context("--xds-root-cert is required with --xds-address")?;
            let token_file = args
                .xds_token_file
                .clone()
                .context("--xds-token-file is required with --xds-address")?;
            Some(ControlPlane {
                address: address.clone(),
                root_pem: std::fs::read_to_string(root)
                    .with_context(|| format!("reading {}", root.display()))?,
                root_file: Some(root.clone()),
                server_name: args.xds_server_name.clone(),
                token_file,
            })
        }
        None => None,
    };
    let (state, local, certs) = match (&control, &args.config, &args.ca_cert, &args.ca_key) {
        (Some(cp), _, _, _) => (
            mesh::state::State::default(),
            None,
            CertCache::new(Arc::new(CaClient {
                control: cp.clone(),
                ttl: args.cert_ttl,
            })),
        ),
        (None, Some(config), Some(cert), Some(key)) => {
            let ca = mesh::ca::DevCa::load(cert, key).context("loading the development CA")?;
            let mesh = ztunnel::local_config::mesh_options(&args.trust_domain, &args.cluster_id);
            let (state, source) = ztunnel::local_config::load(config.clone(), mesh).await?;
            (
                state,
                Some(source),
                CertCache::new(Arc::new(DevCaSource {
                    ca,
                    ttl: args.cert_ttl,
                })),
            )
        }
        _ => anyhow::bail!("give --xds-address, or --config with --ca-cert and --ca-key"),
    };
    let (state_tx, state_rx) = watch::channel(Arc::new(state));
    let dns = (args.dns_capture == OnOff::On).then(|| {
        let upstreams = dns_upstreams(&args.dns_upstream);
        info!(?upstreams, "DNS proxy on 15053 in each pod");
        Arc::new(ztunnel::dns::proxy::DnsProxy::new(upstreams))
    });
    let cores = match args.runtime {
        RuntimeArg::Shared => None,
        RuntimeArg::PerCore => {
            let n = match args.worker_threads {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            };
            info!(cores = n, "pods' proxies run thread-per-core");
            Some(ztunnel::cores::Cores::start(n).context("starting the core threads")?)
        }
    };
    let node = Node::new(
        args.node_name.clone(),
        state_rx,
        certs,
        NodeOptions {
            cgroup_root: args.cgroup_root.clone(),
            redirect: capture.clone(),
            preserve_source: args.preserve_source == OnOff::On,
            dns,
            admin_listeners: vec![args.admin_addr, args.metrics_addr, args.readiness_addr],
            cores,
        },
    );
    let (drain_trigger, drain_watch) = mesh::drain::channel();
    let (quit_tx, mut quit_rx) = mpsc::channel(1);
    // Memory freed after a burst of connections goes back to the kernel (idle RSS target).
    tokio::spawn(mesh::memory::trim_periodically(
        mesh::memory::TRIM_PERIOD,
        mesh::memory::TRIM_THRESHOLD,
    ));

    let host = SocketFactory::host();
    let serve = |addr: SocketAddr, router| -> anyhow::Result<()> {
        let listener = host
            .listen(addr)
            .with_context(|| format!("listening on {addr}"))?;
        tokio::spawn(mesh::admin::serve(listener, router, drain_watch.clone()));
        Ok(())
    };
    serve(
        args.admin_addr,
        ztunnel::admin::admin(node.clone(), quit_tx, set_level),
    )?;
    serve(args.metrics_addr, ztunnel::admin::metrics(node.clone()))?;
    serve(args.readiness_addr, ztunnel::admin::readiness(node.clone()))?;

    match (&control, local) {
        (Some(cp), _) => {
            // Not ready until the first full view of the mesh has arrived.
            node.set_synced(false);
            let node_ip = std::env::var("INSTANCE_IP").unwrap_or_else(|_| "0.0.0.0".into());
            let node_id = format!(
                "ztunnel~{node_ip}~ztunnel-{}.istio-system~istio-system.svc.cluster.local",
                args.node_name
            );
            let handler = ztunnel::xds::XdsHandler::new(node.clone(), state_tx);
            tokio::spawn(mesh::xds::run(
                cp.clone(),
                mesh::xds::ClientState::new(node_id, ztunnel::xds::types()),
                Box::new(handler),
            ));
            tokio::spawn(ztunnel::node::reconcile_periodically(node.clone()));
        }
        (None, Some(source)) => {
            node.reconcile().await;
            tokio::spawn(ztunnel::local_config::follow(
                source,
                state_tx,
                node.clone(),
            ));
            tokio::spawn(ztunnel::node::reconcile_periodically(node.clone()));
        }
        (None, None) => anyhow::bail!("no configuration source"),
    }
    info!(node = %args.node_name, redirect = capture.name(), "ztunnel started");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
        _ = quit_rx.recv() => info!("/quitquitquit: draining"),
    }
    let deadline = args.drain_timeout;
    let pods_done = node.drain(deadline).await;
    drop(drain_watch);
    let admin_done = drain_trigger.drain(Duration::from_secs(1)).await;
    if pods_done {
        info!("all connections finished; exiting");
    } else {
        warn!(
            ?deadline,
            "drain deadline passed with connections still open; exiting"
        );
    }
    if !admin_done {
        error!("admin listeners did not stop in time");
    }
    Ok(())
}
