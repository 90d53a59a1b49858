//! How pod traffic reaches the in-pod listeners: eBPF (the default) or nftables, behind one
//! interface the node agent uses to enroll and unenroll pods and the proxies use to learn a
//! captured connection's original destination.

pub mod ebpf;
pub mod nftables;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// The capture mode asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF programs; refuse to start when the kernel lacks a feature.
    Ebpf,
    /// nftables rules in each pod.
    Nftables,
    /// eBPF when every feature is there, else nftables with a warning.
    Auto,
    /// No capture: applications (or tests) dial the listeners themselves.
    None,
}

/// What a capture implementation needs to enroll one pod; its listeners are already open.
pub struct PodTarget<'a> {
    pub uid: &'a str,
    pub netns: &'a Path,
    pub addresses: &'a [IpAddr],
    /// The pod's inbound plaintext (15006) listeners, one per address family.
    pub plaintext: &'a [&'a TcpListener],
}

/// A capture implementation, loaded once per node.
pub trait Redirector: Send + Sync {
    /// `ebpf`, `nftables` or `none`, for logs and the admin dump.
    fn name(&self) -> &'static str;
    /// Start capturing the pod's traffic into its (already listening) in-pod listeners.
    /// May block (maps, processes): called on a blocking thread, as are `remove` and `retain`.
    fn enroll(&self, pod: &PodTarget<'_>) -> Result<Arc<dyn PodCapture>, String>;
    /// After a reconcile pass: drop capture state (e.g. pinned after a restart) of pods that
    /// are not in `enrolled` (uids) nor still `pending` (wanted but not found yet).
    fn retain(&self, enrolled: &[String], pending: &[String]) {
        let _ = (enrolled, pending);
    }
    /// Change what the kernel side logs (eBPF only).
    fn set_log_level(&self, level: redirect_common::LogLevel) {
        let _ = level;
    }
}

/// The eBPF-side log level matching a tracing filter's most verbose level.
pub fn log_level(max: Option<tracing::level_filters::LevelFilter>) -> redirect_common::LogLevel {
    use redirect_common::LogLevel;
    use tracing::level_filters::LevelFilter;
    match max {
        Some(LevelFilter::OFF) => LogLevel::Off,
        Some(LevelFilter::ERROR) => LogLevel::Error,
        Some(LevelFilter::WARN) => LogLevel::Warn,
        Some(LevelFilter::INFO) => LogLevel::Info,
        Some(LevelFilter::DEBUG) => LogLevel::Debug,
        _ => LogLevel::Trace,
    }
}

/// One enrolled pod's capture.
pub trait PodCapture: Send + Sync {
    /// Where a connection accepted on the pod's outbound listener (15001) was going.
    fn outbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
    /// Where a connection accepted on the pod's inbound plaintext listener (15006) was going.
    fn inbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
    /// Stop capturing; new connections go direct. Idempotent.
    fn remove(&self) -> Result<(), String>;
}

/// Settings for the eBPF loader.
#[derive(Debug, Clone)]
pub struct EbpfSettings {
    /// The eBPF object; `None`: the one embedded at build time.
    pub object: Option<PathBuf>,
    /// Root of the cgroup v2 hierarchy (where pods are searched).
    pub cgroup_root: PathBuf,
    /// The cgroup holding all pods, where the cgroup programs attach; `None`: detected.
    pub pod_cgroup: Option<PathBuf>,
    /// Where bpffs is mounted.
    pub bpffs: PathBuf,
    /// Directory (relative to `bpffs`, or absolute inside it) for this instance's pins.
    pub pin_dir: PathBuf,
    /// eBPF-side log level.
    pub log_level: redirect_common::LogLevel,
    /// Capture DNS (UDP and TCP to port 53) into the pods' DNS proxies on 15053.
    pub dns_capture: bool,
}

/// Set up capture for `mode`. `ebpf` fails when any feature is missing; `auto` then falls back
/// to nftables with a warning naming what is missing.
///
/// `no_capture_target` (with `Mode::None` only) is where connections dialed straight to 15001
/// go: the "no capture" baseline of `cargo xtask bench redirect`.
pub fn start(
    mode: Mode,
    ebpf: &EbpfSettings,
    no_capture_target: Option<SocketAddr>,
) -> Result<Arc<dyn Redirector>, String> {
    if no_capture_target.is_some() && mode != Mode::None {
        return Err("--no-capture-target only goes with --redirect none".into());
    }
    match mode {
        Mode::None => Ok(Arc::new(NoCapture {
            target: no_capture_target,
        })),
        Mode::Nftables => Ok(Arc::new(nftables::Nftables::new(ebpf.dns_capture)?)),
        Mode::Ebpf => Ok(Arc::new(ebpf::Ebpf::start(ebpf)?)),
        Mode::Auto => match ebpf::Ebpf::start(ebpf) {
            Ok(e) => Ok(Arc::new(e)),
            Err(e) => {
                warn!("eBPF capture unavailable, falling back to nftables: {e}");
                Ok(Arc::new(nftables::Nftables::new(ebpf.dns_capture)?))
            }
        },
    }
}

/// `--redirect none`: no capture. The original destination is still asked of the kernel
/// (SO_ORIGINAL_DST) so hand-made nftables rules work, or is the fixed target, if one is set.
struct NoCapture {
    target: Option<SocketAddr>,
}

impl Redirector for NoCapture {
    fn name(&self) -> &'static str {
        "none"
    }

    fn enroll(&self, _pod: &PodTarget<'_>) -> Result<Arc<dyn PodCapture>, String> {
        Ok(match self.target {
            Some(target) => Arc::new(FixedTarget(target)),
            None => Arc::new(nftables::NetfilterDst),
        })
    }
}

/// Every outbound connection goes to one address; inbound keeps its local address.
struct FixedTarget(SocketAddr);

impl PodCapture for FixedTarget {
    fn outbound_original_dst(&self, _stream: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }

    fn inbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr()
    }

    fn remove(&self) -> Result<(), String> {
        Ok(())
    }
}
