//! The ztunnel binary: parses flags, sets up logging, runs the node agent until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh::certs::{CertCache, DevCaSource};
use mesh::socket::SocketFactory;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use ztunnel::node::Node;
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
    /// Local configuration: workloads, services and policies (the shape of Istio's workload API).
    #[arg(long)]
    config: PathBuf,
    /// Development CA root certificate (PEM).
    #[arg(long)]
    ca_cert: PathBuf,
    /// Development CA private key (PEM, PKCS#8).
    #[arg(long)]
    ca_key: PathBuf,
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
    /// With `--redirect none`: send connections dialed straight to 15001 here (benchmarks).
    #[arg(long)]
    no_capture_target: Option<SocketAddr>,
    /// The eBPF object to load instead of the one embedded at build time.
    #[arg(long, env = "ZTUNNEL_EBPF_OBJECT")]
    ebpf_object: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// How long open connections may run after SIGTERM before the process exits.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Worker threads (0: one per core). 1 runs everything on one thread with tokio's
    /// current-thread scheduler, which saves the cross-thread wakeups of work stealing.
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RedirectArg {
    Ebpf,
    Nftables,
    Auto,
    None,
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
    let mut rt = match args.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
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

    let state = ztunnel::config_file::load(&args.config)?;
    let ca =
        mesh::ca::DevCa::load(&args.ca_cert, &args.ca_key).context("loading the development CA")?;
    let certs = CertCache::new(Arc::new(DevCaSource {
        ca,
        ttl: args.cert_ttl,
    }));
    let (state_tx, state_rx) = watch::channel(Arc::new(state));
    let node = Node::new(
        args.node_name.clone(),
        state_rx,
        certs,
        args.cgroup_root.clone(),
        capture.clone(),
    );
    let (drain_trigger, drain_watch) = mesh::drain::channel();
    let (quit_tx, mut quit_rx) = mpsc::channel(1);

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

    node.reconcile().await;
    tokio::spawn(ztunnel::node::watch_config(
        args.config.clone(),
        state_tx,
        node.clone(),
    ));
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
