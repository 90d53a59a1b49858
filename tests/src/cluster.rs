//! A running mesh on the test bed: a development CA, a folder of Kubernetes YAML describing the
//! pods (read by the standalone ztunnels or by pilot), one ztunnel process per node, and an echo application in every pod (TCP on ECHO_PORT,
//! ALT_PORT and SINK_PORT, HTTP on HTTP_PORT). Pods are dual-stack: each workload carries its
//! IPv4 and its IPv6 address, and the apps listen on both. With pilot, waypoint pods (labelled
//! `gateway.networking.k8s.io/gateway-name`) can run the `waypoint` binary instead of an app.
//! Shared by the end-to-end tests, `cargo xtask demo` and `cargo xtask bench`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh::ca::DevCa;
use mesh::identity::Identity;
use mesh::socket::SocketFactory;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{PodSpec, Testbed, netns_path};

/// The port every pod's echo application listens on.
pub const ECHO_PORT: u16 = 8080;
/// A second application port, used for policies that deny one port and not the other.
pub const ALT_PORT: u16 = 9090;
/// A port that reads everything, then answers with the byte count: for throughput.
pub const SINK_PORT: u16 = 9000;
/// The port every pod's HTTP echo application listens on (see [`crate::http_echo`]).
pub const HTTP_PORT: u16 = 8000;
/// The label naming the Gateway a waypoint pod belongs to.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A pod to create, and whether it is in the mesh.
#[derive(Debug, Clone)]
pub struct PodDef {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The app label: also the canonical service name.
    pub app: String,
    pub node: usize,
    pub mesh: bool,
    /// Speaks HBONE itself (its own server on 15008) instead of through a ztunnel: its Pod has
    /// Istio's `networking.istio.io/tunnel: http` label and `spec.nodeName: external` (a node
    /// no ztunnel serves).
    pub own_hbone: bool,
    /// Pod UID, when a Kubernetes object written beforehand names it (else random).
    pub uid: Option<String>,
    /// The address the pod's Kubernetes object gives it: the test bed must assign the same.
    pub expected_ip: Option<Ipv4Addr>,
    /// Only an IPv6 address, in the test bed and in the configuration; dual-stack otherwise.
    pub ipv6_only: bool,
    /// Kubernetes labels besides `app` (and the dataplane-mode opt-out); `version` is `v1`
    /// unless given here.
    pub labels: BTreeMap<String, String>,
}

impl PodDef {
    pub fn new(name: &str, app: &str, node: usize, mesh: bool) -> Self {
        PodDef {
            name: name.into(),
            namespace: "demo".into(),
            service_account: app.into(),
            app: app.into(),
            node,
            mesh,
            own_hbone: false,
            uid: None,
            expected_ip: None,
            ipv6_only: false,
            labels: BTreeMap::new(),
        }
    }

    /// A pod of waypoint `gateway` (namespace `demo`, service account and `app` the gateway's
    /// name, as Istio deploys them): never captured, labelled with [`GATEWAY_NAME_LABEL`].
    pub fn waypoint(name: &str, gateway: &str, node: usize) -> Self {
        let mut p = PodDef::new(name, gateway, node, false);
        p.labels.insert(GATEWAY_NAME_LABEL.into(), gateway.into());
        p
    }

    /// The Gateway this pod is a waypoint of, if it is one.
    pub fn gateway(&self) -> Option<&str> {
        self.labels.get(GATEWAY_NAME_LABEL).map(String::as_str)
    }

    /// The Pods in a folder of Kubernetes YAML, read by `meshconfig` as pilot and standalone
    /// ztunnel read it, as pods to create: name, namespace, UID, `app` label, service account,
    /// node (`spec.nodeName` `nodeN` is node index N-1) and IPv4 address; in the mesh when
    /// ambient (the pod's or its namespace's `istio.io/dataplane-mode`). Any problem in the
    /// folder is an error.
    pub fn from_folder(dir: &Path) -> anyhow::Result<Vec<PodDef>> {
        if !dir.is_dir() {
            bail!("{}: not a folder", dir.display());
        }
        let snapshot = meshconfig::folder::load(dir);
        if !snapshot.problems.is_empty() {
            let problems: Vec<String> = snapshot.problems.iter().map(|p| p.to_string()).collect();
            bail!("{}:\n  {}", dir.display(), problems.join("\n  "));
        }
        let mut pods = vec![];
        for pod in snapshot.pods.values() {
            let m = &pod.meta;
            let name = &m.name;
            let node = pod
                .node_name
                .strip_prefix("node")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n >= 1)
                .with_context(|| {
                    format!(
                        "{}: Pod {}/{name}: spec.nodeName {:?} is not a test-bed node (node1, node2, …)",
                        snapshot.file_of("Pod", &(m.namespace.clone(), name.clone())),
                        m.namespace,
                        pod.node_name
                    )
                })?
                - 1;
            let uid = m
                .uid
                .clone()
                .with_context(|| format!("Pod {}/{name}: metadata.uid missing", m.namespace))?;
            let ip = pod
                .ips
                .iter()
                .find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .with_context(|| format!("Pod {}/{name}: no IPv4 status.podIP", m.namespace))?;
            pods.push(PodDef {
                name: name.clone(),
                namespace: m.namespace.clone(),
                service_account: pod.service_account.clone(),
                app: m.labels.get("app").cloned().unwrap_or_else(|| name.clone()),
                node,
                mesh: meshconfig::translate::in_ambient(&snapshot, pod),
                own_hbone: false,
                ipv6_only: false,
                labels: m
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "app" && *k != "version")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                uid: Some(uid),
                expected_ip: Some(ip),
            });
        }
        // The test bed gives each node's pods addresses from .10 upwards in the order listed.
        pods.sort_by_key(|p| (p.node, p.expected_ip));
        Ok(pods)
    }
}

/// Namespace (and pod) label putting workloads in ambient mode (`none` on a pod opts out).
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// A service: a VIP and port in front of the pods with `app`.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    /// The IPv6 ClusterIP of a dual-stack service (`ipFamilies: [IPv4, IPv6]`).
    pub vip6: Option<Ipv6Addr>,
    pub port: u16,
    pub target_port: u16,
    pub app: String,
    /// The port's name (`http`, `tcp`, `mesh`, …: it decides the protocol); unnamed when empty.
    pub port_name: String,
    /// Kubernetes labels (e.g. `istio.io/use-waypoint`).
    pub labels: BTreeMap<String, String>,
}

impl ServiceDef {
    /// Its ClusterIPs: IPv4 first, as Kubernetes lists a dual-stack service's.
    pub fn vips(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.vip)];
        v.extend(self.vip6.map(IpAddr::V6));
        v
    }
}

/// The VIP of the `echo` service the demo and the end-to-end tests use.
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The IPv6 VIP of the `echo` service (`fd00:10:96::a`).
pub const ECHO_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0xa);

impl ServiceDef {
    /// `echo.demo`, dual-stack on ECHO_VIP:80 and [ECHO_VIP6]:80, in front of the ECHO_PORT of
    /// the pods with `app: echo`.
    pub fn echo() -> Self {
        ServiceDef {
            name: "echo".into(),
            namespace: "demo".into(),
            vip: ECHO_VIP,
            vip6: Some(ECHO_VIP6),
            port: 80,
            target_port: ECHO_PORT,
            app: "echo".into(),
            port_name: String::new(),
            labels: BTreeMap::new(),
        }
    }

    /// The Service of waypoint `gateway` in namespace `demo`: port 15008 named `mesh`, in front
    /// of the pods made with [`PodDef::waypoint`] for it.
    pub fn waypoint(gateway: &str, vip: Ipv4Addr) -> Self {
        ServiceDef {
            name: gateway.into(),
            namespace: "demo".into(),
            vip,
            vip6: None,
            port: mesh::hbone::HBONE_PORT,
            target_port: mesh::hbone::HBONE_PORT,
            app: gateway.into(),
            port_name: "mesh".into(),
            labels: BTreeMap::new(),
        }
    }

    /// Bind this service to waypoint `gateway` (label `istio.io/use-waypoint`).
    pub fn use_waypoint(mut self, gateway: &str) -> Self {
        self.labels
            .insert("istio.io/use-waypoint".into(), gateway.into());
        self
    }
}

/// The Gateway object of a waypoint named `name` in `namespace`, as `istioctl waypoint generate`
/// writes it (for [`ClusterSpec::pilot_yaml`]).
pub fn waypoint_gateway_yaml(name: &str, namespace: &str, waypoint_for: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{istio.io/waypoint-for: {waypoint_for}}}}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n---\n"
    )
}

/// Where ztunnels get their configuration and certificates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ControlPlaneMode {
    /// The folder of Kubernetes YAML and the development CA (standalone mode, `--config`).
    #[default]
    File,
    /// pilot, on node 0, from a folder of Kubernetes YAML.
    Pilot,
    /// As `Pilot`, but pilot is not started: the test starts it (`start_pilot`).
    PilotLater,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    pub control_plane: ControlPlaneMode,
    pub nodes: usize,
    pub pods: Vec<PodDef>,
    pub services: Vec<ServiceDef>,
    /// Extra Kubernetes objects (AuthorizationPolicies, …) for the ztunnels or pilot alike:
    /// YAML documents each ending with `---`.
    pub policies: String,
    /// Extra ztunnel flags.
    pub ztunnel_args: Vec<String>,
    /// pilot serves a copy of this folder's YAML instead of objects made from the spec (whose
    /// pods must then match the folder's: see [`PodDef::from_folder`]).
    pub pilot_folder: Option<PathBuf>,
    /// Ports the pods' echo app listens on besides ECHO_PORT, ALT_PORT and SINK_PORT.
    pub app_ports: Vec<u16>,
    /// Extra environment variables of the ztunnels (name, value).
    pub ztunnel_env: Vec<(String, String)>,
    /// Ports the pods' HTTP echo app listens on besides HTTP_PORT.
    pub http_ports: Vec<u16>,
    /// Extra Kubernetes objects (Gateways, VirtualServices, …), appended to those made from the
    /// spec, as `policies`; YAML documents each ending with `---`.
    pub pilot_yaml: String,
    /// Run the `waypoint` binary in every waypoint pod ([`PodDef::gateway`]) once pilot is up
    /// (with `PilotLater`, call [`Cluster::start_waypoints`] after `start_pilot`). Without it,
    /// waypoint pods run nothing: a test may serve their 15008 itself.
    pub start_waypoints: bool,
    /// A second pilot replica on node 1 (same folder and state directory, started after the
    /// first); ztunnels are given both addresses, node 0's first.
    pub second_pilot: bool,
    /// Extra pilot flags (e.g. `--max-cert-ttl-secs`).
    pub pilot_args: Vec<String>,
}

/// Source preservation's setup in one pod ([`Cluster::source_routing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRouting {
    pub rule4: bool,
    pub rule6: bool,
    pub route4: bool,
    pub route6: bool,
    pub fwmark_accept: bool,
}

impl SourceRouting {
    pub fn complete(&self) -> bool {
        self.rule4 && self.rule6 && self.route4 && self.route6 && self.fwmark_accept
    }

    /// None of it: never set up, or removed.
    pub fn absent(&self) -> bool {
        !(self.rule4 || self.rule6 || self.route4 || self.route6 || self.fwmark_accept)
    }
}

/// Per-pod application counters, to tell whether a connection reached the app.
#[derive(Debug, Default)]
pub struct AppStats {
    pub accepted: AtomicU64,
}

pub struct Cluster {
    pub bed: Testbed,
    pub spec: ClusterSpec,
    pub dir: PathBuf,
    /// The folder of Kubernetes YAML (`--config` of the standalone ztunnels, pilot's
    /// `--config-dir`): [`Cluster::pilot_config`].
    pub config_path: PathBuf,
    pub ca: DevCa,
    ztunnels: Vec<Option<Child>>,
    pilot: Option<Child>,
    /// The second replica ([`ClusterSpec::second_pilot`]).
    pilot2: Option<Child>,
    /// Waypoint processes by pod name.
    waypoints: Vec<(String, Child)>,
    apps: Vec<(String, Arc<AppStats>)>,
    app_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Per node, how far the running ztunnel's admin, metrics and readiness ports are moved
    /// from 15000, 15020 and 15021 (0, or [`SUCCESSOR_PORT_SHIFT`] for a successor started
    /// beside its predecessor: both run in the node's namespace).
    ztunnel_port_shift: Vec<u16>,
    /// ztunnels replaced by a successor ([`Cluster::start_successor`]), maybe still draining:
    /// (node, port shift, process).
    predecessors: Vec<(usize, u16, Child)>,
}

/// How far a successor ztunnel's admin, metrics and readiness ports are moved from its
/// predecessor's, which still listens on the node while it drains.
pub const SUCCESSOR_PORT_SHIFT: u16 = 10000;

/// Makes sockets in one pod as its application would ([`Testbed::pod_socket`]), apart from the
/// [`Cluster`]: traffic can run in tasks of its own while the test changes the cluster.
#[derive(Clone)]
pub struct PodDialer {
    pod: String,
    /// The pod's `cgroup.procs` (for writing) and network namespace.
    files: Arc<(std::fs::File, std::fs::File)>,
}

impl PodDialer {
    /// Connect to `dst` from the pod (its capture applies), with a 10 s timeout.
    pub async fn connect(&self, dst: SocketAddr) -> anyhow::Result<TcpStream> {
        let dialer = self.clone();
        // A short-lived child process makes the socket: off the async threads.
        let socket = tokio::task::spawn_blocking(move || dialer.socket(dst.is_ipv6())).await??;
        socket.connect(dst).await
    }

    /// A socket of the pod, not connected yet (made by a short-lived child process: blocking),
    /// so that many can be made ahead and connected at one moment.
    pub fn socket(&self, v6: bool) -> anyhow::Result<PodSocket> {
        let fd = crate::podsocket::create(&self.files.0, &self.files.1, v6, false, None)
            .with_context(|| format!("cannot make a socket in pod {}", self.pod))?;
        Ok(PodSocket {
            fd,
            pod: self.pod.clone(),
        })
    }
}

impl PodDialer {
    /// A UDP socket of the pod, unbound (made by a short-lived child process: blocking).
    pub fn udp_socket(&self, v6: bool) -> anyhow::Result<std::net::UdpSocket> {
        let fd = crate::podsocket::create(&self.files.0, &self.files.1, v6, true, None)
            .with_context(|| format!("cannot make a UDP socket in pod {}", self.pod))?;
        Ok(std::net::UdpSocket::from(fd))
    }
}

/// A TCP socket made in a pod, not connected yet ([`PodDialer::socket`]).
pub struct PodSocket {
    fd: std::os::fd::OwnedFd,
    pod: String,
}

impl PodSocket {
    /// Connect to `dst`, with a 10 s timeout.
    pub async fn connect(self, dst: SocketAddr) -> anyhow::Result<TcpStream> {
        connect_pod_socket(self.fd, &self.pod, dst).await
    }
}

async fn connect_pod_socket(
    fd: std::os::fd::OwnedFd,
    pod: &str,
    dst: SocketAddr,
) -> anyhow::Result<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(std);
    let s = tokio::time::timeout(Duration::from_secs(10), socket.connect(dst))
        .await
        .with_context(|| format!("connecting from {pod} to {dst} timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Where the ztunnel binary is: `$ZTUNNEL_BIN` (what `cargo xtask` sets after building it),
/// else the newer of the workspace's debug and release builds.
pub fn ztunnel_binary() -> anyhow::Result<PathBuf> {
    sibling_binary("ZTUNNEL_BIN", "ztunnel")
}

/// Where the waypoint binary is: `$WAYPOINT_BIN`, else next to `$ZTUNNEL_BIN`, else the newer
/// of the workspace's debug and release builds.
pub fn waypoint_binary() -> anyhow::Result<PathBuf> {
    let p = sibling_binary("WAYPOINT_BIN", "waypoint")?;
    if !p.is_file() {
        bail!(
            "the waypoint binary {} does not exist: run `cargo build -p waypoint` or set WAYPOINT_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// What the test bed tells a waypoint process about itself and where pilot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointLaunch {
    pub pilot: SocketAddr,
    pub root_cert: PathBuf,
    pub token_file: PathBuf,
    pub pod_ip: IpAddr,
    pub pod_name: String,
    pub pod_namespace: String,
    pub service_account: String,
}

impl WaypointLaunch {
    /// The command-line flags: xDS and CA at pilot, the pod's identity, HBONE on `[::]:15008`,
    /// and admin, metrics and readiness on the pod's own address (15000, 15020, 15021).
    pub fn args(&self) -> Vec<String> {
        let on_pod = |port: u16| SocketAddr::new(self.pod_ip, port).to_string();
        let mut args: Vec<String> = vec![
            "--xds-address".into(),
            format!("https://{}", self.pilot),
            "--xds-root-cert".into(),
            self.root_cert.display().to_string(),
            "--xds-token-file".into(),
            self.token_file.display().to_string(),
            "--pod-ip".into(),
            self.pod_ip.to_string(),
            "--pod-name".into(),
            self.pod_name.clone(),
            "--pod-namespace".into(),
            self.pod_namespace.clone(),
            "--service-account".into(),
            self.service_account.clone(),
            "--listen".into(),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), mesh::hbone::HBONE_PORT).to_string(),
        ];
        for (flag, port) in [
            ("--admin-addr", 15000),
            ("--metrics-addr", 15020),
            ("--readiness-addr", 15021),
        ] {
            args.push(flag.into());
            args.push(on_pod(port));
        }
        args
    }
}

/// A binary of the workspace: `$<env>`, else next to `$ZTUNNEL_BIN`, else the newer of the
/// debug and release builds in the target directory.
fn sibling_binary(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    if let Ok(z) = std::env::var("ZTUNNEL_BIN") {
        let p = PathBuf::from(z).with_file_name(name);
        if p.exists() {
            return Ok(p);
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let newest = ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join(name))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    match newest {
        Some((_, p)) => {
            eprintln!(
                "using {} (set {env} to choose; cargo xtask test builds it first)",
                p.display()
            );
            Ok(p)
        }
        None => bail!(
            "no {name} binary under {}: run `cargo build -p {name}` (cargo xtask does it) or set {env}",
            target.display()
        ),
    }
}

impl Cluster {
    /// Build the test bed, write the config, start the apps and one ztunnel per node, and wait
    /// until every ztunnel is ready. Must run inside a tokio runtime.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let specs: Vec<PodSpec> = spec
            .pods
            .iter()
            .map(|p| PodSpec {
                uid: p.uid.clone(),
                ipv6_only: p.ipv6_only,
                ..PodSpec::new(&p.name, &p.namespace, p.node)
            })
            .collect();
        let bed = Testbed::new(spec.nodes, &specs)?;
        for def in &spec.pods {
            let pod = bed.pod(&def.name);
            if let Some(want) = def.expected_ip
                && want != pod.ip
            {
                bail!(
                    "pod {} is {want} in its Kubernetes object but the test bed gave it {}: list the pods in the test bed's order (per node, .10 upwards)",
                    def.name,
                    pod.ip
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("{}-mesh", bed.prefix));
        std::fs::create_dir_all(&dir)?;
        let ca = DevCa::generate(TRUST_DOMAIN)?;
        ca.save(&dir.join("root.pem"), &dir.join("root-key.pem"))?;
        let config_path = dir.join("k8s");
        let mut cluster = Cluster {
            bed,
            spec,
            dir,
            config_path,
            ca,
            ztunnels: vec![],
            pilot: None,
            pilot2: None,
            waypoints: vec![],
            apps: vec![],
            app_tasks: vec![],
            ztunnel_port_shift: vec![],
            predecessors: vec![],
        };
        cluster.ztunnel_port_shift = vec![0; cluster.spec.nodes];
        let mode = cluster.spec.control_plane;
        if mode != ControlPlaneMode::File {
            // pilot loads the root it finds in its state directory.
            std::fs::create_dir_all(cluster.pilot_state())?;
            cluster.ca.save(
                &cluster.pilot_state().join("root-cert.pem"),
                &cluster.pilot_state().join("root-key.pem"),
            )?;
        }
        // One folder of Kubernetes YAML, read by pilot or by the standalone ztunnels.
        std::fs::create_dir_all(cluster.pilot_config())?;
        match &cluster.spec.pilot_folder {
            Some(dir) => {
                for entry in std::fs::read_dir(dir)? {
                    let path = entry?.path();
                    if let Some(name) = path.file_name().filter(|_| path.is_file()) {
                        std::fs::copy(&path, cluster.pilot_config().join(name))?;
                    }
                }
            }
            None => std::fs::write(
                cluster.pilot_config().join("mesh.yaml"),
                cluster.kubernetes_yaml(),
            )?,
        }
        cluster.start_apps()?;
        if mode == ControlPlaneMode::Pilot {
            cluster.start_pilot().await?;
        }
        for node in 0..cluster.spec.nodes {
            let child = cluster.spawn_ztunnel(node)?;
            cluster.ztunnels.push(Some(child));
        }
        if mode != ControlPlaneMode::PilotLater {
            for node in 0..cluster.spec.nodes {
                cluster.wait_ready(node, Duration::from_secs(20)).await?;
            }
        }
        if mode == ControlPlaneMode::Pilot && cluster.spec.start_waypoints {
            cluster.start_waypoints().await?;
        }
        Ok(cluster)
    }

    /// The waypoint pods of the spec (those with [`GATEWAY_NAME_LABEL`]), by name.
    pub fn waypoint_pods(&self) -> Vec<String> {
        self.spec
            .pods
            .iter()
            .filter(|p| p.gateway().is_some())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Start the `waypoint` binary in every waypoint pod not running one, and wait until each
    /// is ready. Needs pilot (for xDS, its certificate, and the service account's token).
    pub async fn start_waypoints(&mut self) -> anyhow::Result<()> {
        if self.spec.control_plane == ControlPlaneMode::File {
            bail!("waypoints need pilot: set ClusterSpec::control_plane to Pilot or PilotLater");
        }
        for pod in self.waypoint_pods() {
            if !self.waypoints.iter().any(|(n, _)| *n == pod) {
                self.start_waypoint(&pod)?;
            }
        }
        for pod in self.waypoint_pods() {
            self.wait_waypoint_ready(&pod, Duration::from_secs(20))
                .await?;
        }
        Ok(())
    }

    /// How the test bed launches the waypoint in `pod`.
    pub fn waypoint_launch(&self, pod: &str) -> WaypointLaunch {
        let def = self.def(pod);
        WaypointLaunch {
            pilot: self.pilot_addr(),
            root_cert: self.pilot_state().join("root-cert.pem"),
            token_file: self
                .pilot_state()
                .join("tokens")
                .join("sa")
                .join(format!("{}.{}.token", def.namespace, def.service_account)),
            pod_ip: self.pod_addresses(pod)[0],
            pod_name: def.name.clone(),
            pod_namespace: def.namespace.clone(),
            service_account: def.service_account.clone(),
        }
    }

    /// Start the `waypoint` binary inside `pod` (its cgroup and netns), logging to
    /// [`Cluster::waypoint_log`]; does not wait for it to be ready.
    pub fn start_waypoint(&mut self, pod: &str) -> anyhow::Result<()> {
        let bin = waypoint_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.waypoint_log(pod))?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(self.waypoint_launch(pod).args())
            .env(
                "RUST_LOG",
                std::env::var("WAYPOINT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = self
            .bed
            .spawn_in_pod(pod, cmd)
            .with_context(|| format!("starting the waypoint {} in pod {pod}", bin.display()))?;
        self.waypoints.push((pod.to_string(), child));
        Ok(())
    }

    /// SIGTERM the waypoint in `pod` and wait for it to exit; returns its exit status.
    pub fn stop_waypoint(&mut self, pod: &str) -> anyhow::Result<std::process::ExitStatus> {
        let i = self
            .waypoints
            .iter()
            .position(|(n, _)| n == pod)
            .with_context(|| format!("no waypoint running in pod {pod}"))?;
        let (_, mut child) = self.waypoints.remove(i);
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Ok(child.wait()?)
    }

    pub fn waypoint_log(&self, pod: &str) -> PathBuf {
        self.dir.join(format!("waypoint-{pod}.log"))
    }

    pub fn waypoint_pid(&self, pod: &str) -> Option<u32> {
        self.waypoints
            .iter()
            .find(|(n, _)| n == pod)
            .map(|(_, c)| c.id())
    }

    /// Wait until the waypoint in `pod` answers 200 on `/healthz/ready` (port 15021 on the
    /// pod's address); fails early, with its log, if the process exits.
    pub async fn wait_waypoint_ready(
        &mut self,
        pod: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let addr = SocketAddr::new(self.pod_addresses(pod)[0], 15021);
        let factory = self.node_sockets(self.def(pod).node)?;
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            let exited = self
                .waypoints
                .iter_mut()
                .find(|(n, _)| n == pod)
                .map(|(_, c)| c.try_wait())
                .transpose()?
                .flatten();
            if let Some(status) = exited {
                last = format!("exited with {status}");
                break;
            }
            match http_get_at(&factory, addr, "/healthz/ready").await {
                Ok((200, _)) => return Ok(()),
                Ok((s, body)) => last = format!("{s} {body}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(self.waypoint_log(pod)).unwrap_or_default();
        bail!("waypoint in pod {pod} not ready after {timeout:?}: {last}\n--- log ---\n{log}")
    }

    /// A plain HTTP/1.0 GET to `port` on `pod`'s address, from its node (for waypoint pods'
    /// admin, metrics and readiness ports).
    pub async fn pod_http_get(
        &self,
        pod: &str,
        port: u16,
        path: &str,
    ) -> anyhow::Result<(u16, String)> {
        let factory = self.node_sockets(self.def(pod).node)?;
        http_get_at(
            &factory,
            SocketAddr::new(self.pod_addresses(pod)[0], port),
            path,
        )
        .await
    }

    /// The folder of Kubernetes YAML: pilot's, or the standalone ztunnels' (`--config`).
    pub fn pilot_config(&self) -> PathBuf {
        self.dir.join("k8s")
    }

    /// pilot's state folder (its CA root, tokens).
    pub fn pilot_state(&self) -> PathBuf {
        self.dir.join("pilot")
    }

    pub fn pilot_log(&self) -> PathBuf {
        self.dir.join("pilot.log")
    }

    /// pilot's xDS address, as ztunnels dial it: node 0's underlay address.
    pub fn pilot_addr(&self) -> SocketAddr {
        self.pilot_addr_on(0)
    }

    /// The address of the pilot replica on `node` (node 1 for the second).
    pub fn pilot_addr_on(&self, node: usize) -> SocketAddr {
        SocketAddr::new(self.bed.node(node).underlay_ip.into(), 15012)
    }

    /// What proxies are told to dial: every replica, the first first.
    fn pilot_urls(&self) -> String {
        let mut urls = format!("https://{}", self.pilot_addr());
        if self.spec.second_pilot {
            urls.push_str(&format!(",https://{}", self.pilot_addr_on(1)));
        }
        urls
    }

    /// The pods, services and namespace as Kubernetes objects (what `kubectl get -o yaml`
    /// would show), then the spec's `policies` and `pilot_yaml`: what pilot or the standalone
    /// ztunnels read. A pod's workload is a Deployment `<app>-<version>` (its ReplicaSet owns
    /// it).
    pub fn kubernetes_yaml(&self) -> String {
        let mut y = String::new();
        let mut namespaces: Vec<&str> = self
            .spec
            .pods
            .iter()
            .map(|p| p.namespace.as_str())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces {
            let _ = writeln!(
                y,
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---"
            );
        }
        for def in &self.spec.pods {
            let pod = self.bed.pod(&def.name);
            let addresses = self.pod_addresses(&def.name);
            let mut mode = if def.mesh {
                String::new()
            } else {
                ", istio.io/dataplane-mode: none".to_string()
            };
            if def.own_hbone {
                mode.push_str(", networking.istio.io/tunnel: http");
            }
            for (k, v) in &def.labels {
                if !matches!(k.as_str(), "app" | "version" | DATAPLANE_MODE) {
                    let _ = write!(mode, ", {k:?}: {v:?}");
                }
            }
            let _ = writeln!(
                y,
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}, labels: {{app: {app}, version: {version}{mode}}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {app}-{version}-7c9d5, controller: true}}]}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{phase: Running, podIP: \"{ip}\", podIPs: [{ips}]}}\n---",
                name = def.name,
                ns = def.namespace,
                uid = pod.uid,
                app = def.app,
                version = def.labels.get("version").map_or("v1", String::as_str),
                node = if def.own_hbone {
                    "external"
                } else {
                    &self.bed.node(def.node).name
                },
                sa = def.service_account,
                ip = addresses[0],
                ips = addresses
                    .iter()
                    .map(|ip| format!("{{ip: \"{ip}\"}}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        for s in &self.spec.services {
            let vips = s.vips();
            let cluster_ips: Vec<String> = vips.iter().map(|ip| format!("\"{ip}\"")).collect();
            let families: Vec<&str> = vips
                .iter()
                .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
                .collect();
            let policy = if vips.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            };
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k:?}: {v:?}"))
                .collect();
            let port_name = if s.port_name.is_empty() {
                String::new()
            } else {
                format!("name: {:?}, ", s.port_name)
            };
            let _ = writeln!(
                y,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\nspec: {{clusterIP: {}, clusterIPs: [{}], ipFamilies: [{}], ipFamilyPolicy: {policy}, selector: {{app: {}}}, ports: [{{{port_name}port: {}, targetPort: {}}}]}}\n---",
                s.name,
                s.namespace,
                labels.join(", "),
                s.vip,
                cluster_ips.join(", "),
                families.join(", "),
                s.app,
                s.port,
                s.target_port
            );
        }
        y.push_str(&self.spec.policies);
        y.push_str(&self.spec.pilot_yaml);
        y
    }

    /// Write (or replace) a file in the folder of Kubernetes YAML, atomically (pilot or the
    /// standalone ztunnels pick it up within a second).
    pub fn write_pilot_file(&self, name: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.pilot_config().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.pilot_config().join(name))?;
        Ok(())
    }

    /// Start pilot on node 0 (and the second replica on node 1 when the spec asks for it)
    /// and wait until it accepts connections.
    pub async fn start_pilot(&mut self) -> anyhow::Result<()> {
        self.pilot = Some(self.spawn_pilot(0, self.pilot_log()).await?);
        if self.spec.second_pilot && self.pilot2.is_none() {
            self.pilot2 = Some(self.spawn_pilot(1, self.dir.join("pilot-2.log")).await?);
        }
        Ok(())
    }

    async fn spawn_pilot(&self, node: usize, log_path: PathBuf) -> anyhow::Result<Child> {
        let bin = sibling_binary("PILOT_BIN", "pilot")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let nodes: Vec<String> = self.bed.nodes.iter().map(|n| n.name.clone()).collect();
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--config-dir")
            .arg(self.pilot_config())
            .arg("--state-dir")
            .arg(self.pilot_state())
            .arg("--listen")
            .arg("0.0.0.0:15012")
            .arg("--debug-addr")
            .arg("127.0.0.1:15014")
            .arg("--nodes")
            .arg(nodes.join(","))
            .args(&self.spec.pilot_args)
            .env(
                "RUST_LOG",
                std::env::var("PILOT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = self.bed.spawn_in_node(node, cmd)?;
        let factory = self.node_sockets(node)?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if factory.connect(self.pilot_addr_on(node)).await.is_ok() {
                return Ok(child);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("pilot did not start listening\n--- log ---\n{log}")
    }

    /// Kill pilot at once (as a crash would), without letting it say goodbye.
    pub fn kill_pilot(&mut self) -> anyhow::Result<()> {
        let mut child = self.pilot.take().context("pilot not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    fn spawn_ztunnel(&self, node: usize) -> anyhow::Result<Child> {
        let bin = ztunnel_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.ztunnel_log(node))?;
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--node-name").arg(&self.bed.node(node).name);
        if self.spec.control_plane == ControlPlaneMode::File {
            cmd.arg("--config")
                .arg(self.pilot_config())
                .arg("--ca-cert")
                .arg(self.dir.join("root.pem"))
                .arg("--ca-key")
                .arg(self.dir.join("root-key.pem"));
        } else {
            cmd.arg("--xds-address")
                .arg(self.pilot_urls())
                .arg("--xds-root-cert")
                .arg(self.pilot_state().join("root-cert.pem"))
                .arg("--xds-token-file")
                .arg(
                    self.pilot_state()
                        .join("tokens")
                        .join(format!("{}.token", self.bed.node(node).name)),
                );
        }
        cmd.arg("--cgroup-root")
            .arg(self.bed.cgroup_root())
            .args(&self.spec.ztunnel_args);
        if !self
            .spec
            .ztunnel_args
            .iter()
            .any(|a| a == "--drain-timeout")
        {
            cmd.arg("--drain-timeout").arg("5s");
        }
        let shift = self.ztunnel_port_shift[node];
        if shift != 0 {
            let gateway = IpAddr::from(self.bed.node(node).pod_gateway);
            cmd.arg("--admin-addr")
                .arg(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15000 + shift).to_string())
                .arg("--metrics-addr")
                .arg(SocketAddr::new(gateway, 15020 + shift).to_string())
                .arg("--readiness-addr")
                .arg(SocketAddr::new(gateway, 15021 + shift).to_string());
        }
        if !self.spec.ztunnel_args.iter().any(|a| a == "--bpf-pin-dir") {
            cmd.arg("--bpf-pin-dir").arg(self.pin_dir_name(node));
        }
        if !self.spec.ztunnel_args.iter().any(|a| a == "--dns-upstream") {
            // Never the host's resolver: forwarded DNS stays inside the test bed.
            cmd.arg("--dns-upstream")
                .arg(SocketAddr::new(self.dns_upstream().into(), 53).to_string());
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(self.spec.ztunnel_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        self.bed.spawn_in_node(node, cmd)
    }

    /// Where ztunnels forward DNS they do not answer (unless the spec passes `--dns-upstream`):
    /// node 0's pod gateway, port 53, in the test bed; nothing listens there unless a test runs
    /// a server, so forwarded queries fail fast (SERVFAIL).
    pub fn dns_upstream(&self) -> Ipv4Addr {
        self.bed.node(0).pod_gateway
    }

    /// This test bed's eBPF pin directory for `node`, relative to [`crate::BPFFS`].
    pub fn pin_dir_name(&self, node: usize) -> String {
        format!("{}-{}", self.bed.prefix, self.bed.node(node).name)
    }

    pub fn ztunnel_log(&self, node: usize) -> PathBuf {
        self.ztunnel_log_shifted(node, self.ztunnel_port_shift[node])
    }

    /// The log of `node`'s ztunnel whose ports are moved by `shift` (a successor's is apart).
    fn ztunnel_log_shifted(&self, node: usize, shift: u16) -> PathBuf {
        let name = &self.bed.node(node).name;
        match shift {
            0 => self.dir.join(format!("ztunnel-{name}.log")),
            _ => self.dir.join(format!("ztunnel-{name}-{shift}.log")),
        }
    }

    pub fn ztunnel_pid(&self, node: usize) -> Option<u32> {
        self.ztunnels.get(node)?.as_ref().map(|c| c.id())
    }

    /// SIGTERM a node's ztunnel and wait for it to exit; returns its exit status.
    pub fn stop_ztunnel(&mut self, node: usize) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.ztunnels[node].take().context("ztunnel not running")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Ok(child.wait()?)
    }

    pub async fn restart_ztunnel(&mut self, node: usize) -> anyhow::Result<()> {
        if self.ztunnels[node].is_some() {
            self.stop_ztunnel(node)?;
        }
        self.ztunnels[node] = Some(self.spawn_ztunnel(node)?);
        self.wait_ready(node, Duration::from_secs(20)).await
    }

    pub async fn wait_ready(&self, node: usize, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.http_get(node, 15021, "/healthz/ready").await {
                Ok((200, _)) => return Ok(()),
                Ok((s, body)) => last = format!("{s} {body}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(self.ztunnel_log(node)).unwrap_or_default();
        bail!("ztunnel on node {node} not ready after {timeout:?}: {last}\n--- log ---\n{log}")
    }

    /// A plain HTTP/1.0 GET to a ztunnel port inside the node's namespace.
    pub async fn http_get(
        &self,
        node: usize,
        port: u16,
        path: &str,
    ) -> anyhow::Result<(u16, String)> {
        let addr = if port == 15000 || port == 15014 {
            Ipv4Addr::LOCALHOST
        } else {
            self.bed.node(node).pod_gateway
        };
        // The node's current ztunnel, a successor's ports being moved.
        let port = match port {
            15000 | 15020 | 15021 => port + self.ztunnel_port_shift[node],
            _ => port,
        };
        let factory = self.node_sockets(node)?;
        http_get_at(&factory, SocketAddr::new(addr.into(), port), path).await
    }

    /// The sum of a metric's samples on a node whose labels contain every `label="value"` given.
    pub async fn metric(
        &self,
        node: usize,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<f64> {
        let (_, text) = self.http_get(node, 15020, "/metrics").await?;
        Ok(sum_metric(&text, name, labels))
    }

    pub fn node_sockets(&self, node: usize) -> anyhow::Result<SocketFactory> {
        Ok(SocketFactory::open_netns(
            &netns_path(&self.bed.node(node).netns),
            None,
        )?)
    }

    /// Sockets made inside a pod, as the pod's application would make them (unmarked, so the
    /// pod's capture applies).
    pub fn pod_sockets(&self, pod: &str) -> anyhow::Result<SocketFactory> {
        Ok(SocketFactory::open_netns(
            &netns_path(&self.bed.pod(pod).netns),
            None,
        )?)
    }

    /// Run `args` (a command and its arguments) inside `pod`'s network namespace; its output.
    pub fn pod_command(&self, pod: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("nsenter")
            .arg(format!(
                "--net={}",
                netns_path(&self.bed.pod(pod).netns).display()
            ))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{args:?} in {pod}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What `pod`'s netns has of source preservation's setup (ztunnel's delivery mark 0x111,
    /// table 273): each piece, in IPv4 and IPv6.
    pub fn source_routing(&self, pod: &str) -> anyhow::Result<SourceRouting> {
        let rule = |family| -> anyhow::Result<bool> {
            let out = self.pod_command(pod, &["ip", family, "rule", "list"])?;
            Ok(out.contains("fwmark 0x111 lookup 273"))
        };
        // `table all`: asking for table 273 itself fails once it is gone.
        let route = |family| -> anyhow::Result<bool> {
            let out = self.pod_command(pod, &["ip", family, "route", "show", "table", "all"])?;
            Ok(out
                .lines()
                .any(|l| l.starts_with("local default dev lo table 273")))
        };
        let accept = self.pod_command(pod, &["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"])?;
        Ok(SourceRouting {
            rule4: rule("-4")?,
            rule6: rule("-6")?,
            route4: route("-4")?,
            route6: route("-6")?,
            fwmark_accept: accept.trim() == "1",
        })
    }

    /// Whether `pod` has all of source preservation's routing in both families.
    pub fn has_source_routing(&self, pod: &str) -> anyhow::Result<bool> {
        Ok(self.source_routing(pod)?.complete())
    }

    pub fn pod_ip(&self, pod: &str) -> IpAddr {
        IpAddr::V4(self.bed.pod(pod).ip)
    }

    /// The pod's IPv6 address.
    pub fn pod_ip6(&self, pod: &str) -> IpAddr {
        IpAddr::V6(self.bed.pod(pod).ip6)
    }

    /// The pod's addresses as Kubernetes lists them: IPv4 first when it has one, then IPv6.
    pub fn pod_addresses(&self, pod: &str) -> Vec<IpAddr> {
        let p = self.bed.pod(pod);
        if p.ipv6_only {
            vec![IpAddr::V6(p.ip6)]
        } else {
            vec![IpAddr::V4(p.ip), IpAddr::V6(p.ip6)]
        }
    }

    pub fn identity(&self, pod: &str) -> Identity {
        let def = self.def(pod);
        Identity::new(TRUST_DOMAIN, &def.namespace, &def.service_account)
    }

    pub fn def(&self, pod: &str) -> &PodDef {
        self.spec
            .pods
            .iter()
            .find(|p| p.name == pod)
            .unwrap_or_else(|| panic!("no pod {pod} in the cluster spec"))
    }

    pub fn app_stats(&self, pod: &str) -> Arc<AppStats> {
        self.apps
            .iter()
            .find(|(n, _)| n == pod)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// From `pod`, connect to `dst`, send `payload`, half-close, and read the whole answer.
    pub async fn exchange(
        &self,
        pod: &str,
        dst: SocketAddr,
        payload: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        let s = self.connect_from(pod, dst).await?;
        exchange_on(s, payload).await
    }

    /// From `pod`, one HTTP/1.1 request `GET <path>` with `Host: <host>` and extra `headers` to
    /// `dst` (through the pod's capture), then the status, the response headers (lower-case
    /// names) and the body. For the HTTP echo app ([`crate::http_echo`]) or anything speaking
    /// HTTP/1.1 on the way (a waypoint).
    pub async fn http_get_from(
        &self,
        pod: &str,
        dst: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpAnswer> {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (k, v) in headers {
            let _ = write!(req, "{k}: {v}\r\n");
        }
        req.push_str("\r\n");
        let raw = self.exchange(pod, dst, req.as_bytes()).await?;
        HttpAnswer::parse(&raw)
    }

    /// Connect from `pod` to `dst` with a socket made in the pod's cgroup and netns, as the
    /// pod's application would (so either capture, eBPF or nftables, applies).
    pub async fn connect_from(&self, pod: &str, dst: SocketAddr) -> anyhow::Result<TcpStream> {
        let fd = self.bed.pod_socket(pod, dst.is_ipv6(), None)?;
        connect_pod_socket(fd, pod, dst).await
    }

    /// A [`PodDialer`] for `pod`, to connect from it in tasks that do not borrow the cluster.
    pub fn dialer(&self, pod: &str) -> anyhow::Result<PodDialer> {
        let p = self.bed.pod(pod);
        Ok(PodDialer {
            pod: pod.to_string(),
            files: Arc::new((
                crate::cgroup::open_procs(&p.cgroup)?,
                crate::netns::open(&p.netns)?,
            )),
        })
    }

    /// Start a second ztunnel for `node` beside the running one, as a DaemonSet rolling update
    /// with `maxSurge: 1` does, and wait until it is ready. Its admin, metrics and readiness
    /// ports are moved by [`SUCCESSOR_PORT_SHIFT`] from its predecessor's (both run in the
    /// node's namespace); it becomes the node's ztunnel (`http_get`, `metric`, `ztunnel_pid`,
    /// `ztunnel_log` reach it), and the predecessor keeps running until
    /// [`Cluster::terminate_predecessor`].
    pub async fn start_successor(&mut self, node: usize) -> anyhow::Result<()> {
        let old = self.ztunnels[node]
            .take()
            .context("no ztunnel runs on the node")?;
        let shift = self.ztunnel_port_shift[node];
        self.predecessors.push((node, shift, old));
        self.ztunnel_port_shift[node] = if shift == 0 { SUCCESSOR_PORT_SHIFT } else { 0 };
        self.ztunnels[node] = Some(self.spawn_ztunnel(node)?);
        self.wait_ready(node, Duration::from_secs(20)).await
    }

    fn predecessor(&self, node: usize) -> anyhow::Result<&(usize, u16, Child)> {
        self.predecessors
            .iter()
            .rev()
            .find(|(n, _, _)| *n == node)
            .context("no predecessor ztunnel on the node")
    }

    /// The pid of the latest predecessor of `node`'s ztunnel ([`Cluster::start_successor`]).
    pub fn predecessor_pid(&self, node: usize) -> Option<u32> {
        self.predecessor(node).ok().map(|(_, _, c)| c.id())
    }

    /// SIGTERM the latest predecessor of `node`'s ztunnel; returns at once (it drains).
    pub fn terminate_predecessor(&self, node: usize) -> anyhow::Result<()> {
        let (_, _, child) = self.predecessor(node)?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Ok(())
    }

    /// A metric of the latest predecessor of `node`'s ztunnel, as [`Cluster::metric`].
    pub async fn predecessor_metric(
        &self,
        node: usize,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<f64> {
        let (_, shift, _) = self.predecessor(node)?;
        let addr = SocketAddr::new(self.bed.node(node).pod_gateway.into(), 15020 + shift);
        let (_, text) = http_get_at(&self.node_sockets(node)?, addr, "/metrics").await?;
        Ok(sum_metric(&text, name, labels))
    }

    /// The log of the latest predecessor of `node`'s ztunnel.
    pub fn predecessor_log(&self, node: usize) -> anyhow::Result<PathBuf> {
        let (_, shift, _) = self.predecessor(node)?;
        Ok(self.ztunnel_log_shifted(node, *shift))
    }

    /// Wait up to `timeout` for the latest predecessor of `node`'s ztunnel to exit; its status.
    pub async fn wait_predecessor(
        &mut self,
        node: usize,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let i = self
                .predecessors
                .iter()
                .rposition(|(n, _, _)| *n == node)
                .context("no predecessor ztunnel on the node")?;
            if let Some(status) = self.predecessors[i].2.try_wait()? {
                self.predecessors.remove(i);
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!("the predecessor ztunnel of node {node} still runs after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Echo servers on ECHO_PORT and ALT_PORT in every pod, each answering with a line naming
    /// the pod and the peer address it saw, then echoing until the client half-closes; a sink
    /// on SINK_PORT; and the HTTP echo app ([`crate::http_echo`]) on HTTP_PORT and the spec's
    /// `http_ports`. Each port is served on IPv4 and IPv6 (two sockets, the IPv6 one
    /// IPv6-only, so IPv4 peers keep showing as plain IPv4 addresses). Waypoint pods run no
    /// app: they are the proxy's.
    fn start_apps(&mut self) -> anyhow::Result<()> {
        let wildcards = [
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
        ];
        for def in self.spec.pods.clone() {
            let stats = Arc::new(AppStats::default());
            if def.gateway().is_some() {
                self.apps.push((def.name.clone(), stats));
                continue;
            }
            let http_ports: Vec<u16> = std::iter::once(HTTP_PORT)
                .chain(self.spec.http_ports.iter().copied())
                .collect();
            let ports: Vec<u16> = [ECHO_PORT, ALT_PORT, SINK_PORT]
                .into_iter()
                .chain(self.spec.app_ports.iter().copied())
                .chain(http_ports.iter().copied())
                .collect();
            let pod_name: Arc<str> = Arc::from(def.name.as_str());
            for (port, mut addr) in ports.into_iter().flat_map(|p| wildcards.map(|a| (p, a))) {
                addr.set_port(port);
                let listener = self.bed.in_pod(&def.name, move || app_listener(addr))??;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let name = pod_name.clone();
                let stats = stats.clone();
                let http = http_ports.contains(&port);
                self.app_tasks.push(tokio::spawn(async move {
                    while let Ok((s, peer)) = listener.accept().await {
                        stats.accepted.fetch_add(1, Ordering::Relaxed);
                        if http {
                            tokio::spawn(crate::http_echo::serve(s, name.clone(), peer));
                        } else if port == SINK_PORT {
                            tokio::spawn(sink(s));
                        } else {
                            tokio::spawn(echo(s, format!("pod={name} port={port} peer={peer}\n")));
                        }
                    }
                }));
            }
            self.apps.push((def.name.clone(), stats));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut p in [self.pilot.take(), self.pilot2.take()]
            .into_iter()
            .flatten()
        {
            let _ = p.kill();
            let _ = p.wait();
        }
        for (_, w) in &mut self.waypoints {
            let _ = w.kill();
            let _ = w.wait();
        }
        for t in &self.app_tasks {
            t.abort();
        }
        if std::env::var_os("KEEP_MESH_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        // Stop the ztunnels first: they would otherwise keep using the pins.
        for z in self
            .ztunnels
            .iter_mut()
            .flatten()
            .chain(self.predecessors.iter_mut().map(|(_, _, c)| c))
        {
            let _ = z.kill();
            let _ = z.wait();
        }
        for node in 0..self.spec.nodes {
            let _ = std::fs::remove_dir_all(Path::new(crate::BPFFS).join(self.pin_dir_name(node)));
        }
    }
}

/// A blocking std listener on `addr`, IPv6-only when `addr` is IPv6.
fn app_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let listener: std::net::TcpListener = socket.into();
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn echo(mut s: TcpStream, greeting: String) {
    let _ = s.set_nodelay(true);
    if s.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let (mut r, mut w) = s.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

async fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(format!("{total}\n").as_bytes()).await;
    let _ = s.shutdown().await;
}

/// An HTTP/1.1 response read to the end of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    /// Lower-case names, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// Parse a whole response (`Connection: close`, so the body runs to the end; chunked
    /// bodies are decoded).
    pub fn parse(raw: &[u8]) -> anyhow::Result<HttpAnswer> {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .with_context(|| {
                format!(
                    "no HTTP response head in {:?}",
                    String::from_utf8_lossy(raw)
                )
            })?;
        let head = String::from_utf8_lossy(&raw[..split]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
        {
            body = dechunk(&body)?;
        }
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (the HTTP echo app's report).
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "HTTP {} body is not JSON: {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(data.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A plain HTTP/1.0 GET to `addr` with a socket from `factory`: status and body.
async fn http_get_at(
    factory: &SocketFactory,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = factory.connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Send, half-close, read to the end.
pub async fn exchange_on(s: TcpStream, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut r, mut w) = s.into_split();
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut out)).await;
    let _ = writer.await;
    read.context("timed out reading the answer")??;
    Ok(out)
}

/// Sum the samples of `name` whose label set contains each given pair.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waypoint_flags() {
        let launch = WaypointLaunch {
            pilot: "172.30.0.1:15012".parse().unwrap(),
            root_cert: "/m/pilot/root-cert.pem".into(),
            token_file: "/m/pilot/tokens/sa/demo.waypoint.token".into(),
            pod_ip: "10.244.2.10".parse().unwrap(),
            pod_name: "waypoint-a".into(),
            pod_namespace: "demo".into(),
            service_account: "waypoint".into(),
        };
        assert_eq!(
            launch.args().join(" "),
            "--xds-address https://172.30.0.1:15012 --xds-root-cert /m/pilot/root-cert.pem \
             --xds-token-file /m/pilot/tokens/sa/demo.waypoint.token --pod-ip 10.244.2.10 \
             --pod-name waypoint-a --pod-namespace demo --service-account waypoint \
             --listen [::]:15008 --admin-addr 10.244.2.10:15000 \
             --metrics-addr 10.244.2.10:15020 --readiness-addr 10.244.2.10:15021"
        );
    }

    #[test]
    fn waypoint_pods_and_services() {
        let p = PodDef::waypoint("waypoint-a", "waypoint", 1);
        assert_eq!(p.gateway(), Some("waypoint"));
        assert!(!p.mesh);
        assert_eq!(p.service_account, "waypoint");
        assert_eq!(PodDef::new("a", "a", 0, true).gateway(), None);
        let s = ServiceDef::waypoint("waypoint", Ipv4Addr::new(10, 96, 0, 20));
        assert_eq!(
            (s.port, s.target_port, s.app.as_str()),
            (15008, 15008, "waypoint")
        );
        let bound = ServiceDef::echo().use_waypoint("waypoint");
        assert_eq!(bound.labels["istio.io/use-waypoint"], "waypoint");
        let gw = waypoint_gateway_yaml("waypoint", "demo", "all");
        let v: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(gw.trim_end().trim_end_matches("---")).unwrap();
        assert_eq!(
            v["spec"]["gatewayClassName"].as_str(),
            Some("istio-waypoint")
        );
        assert_eq!(
            v["metadata"]["labels"]["istio.io/waypoint-for"].as_str(),
            Some("all")
        );
        assert_eq!(v["spec"]["listeners"][0]["port"].as_u64(), Some(15008));
    }

    #[test]
    fn pods_from_a_folder_in_address_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/bookinfo");
        let pods = PodDef::from_folder(&dir).unwrap();
        let page = &pods[0];
        assert_eq!(
            (page.name.as_str(), page.namespace.as_str(), page.node),
            ("productpage-v1-7f9d8", "bookinfo", 0)
        );
        assert_eq!(page.app, "productpage");
        assert_eq!(page.service_account, "bookinfo-productpage");
        assert_eq!(page.expected_ip, Some(Ipv4Addr::new(10, 244, 1, 10)));
        assert!(page.mesh);
        // Per node, from .10 upwards: the order the test bed assigns addresses in.
        for node in 0..2 {
            let ips: Vec<u8> = pods
                .iter()
                .filter(|p| p.node == node)
                .map(|p| p.expected_ip.unwrap().octets()[3])
                .collect();
            let expected: Vec<u8> = (10..10 + ips.len() as u8).collect();
            assert_eq!(ips, expected, "node {node}");
        }
        let bad = std::env::temp_dir().join(format!("testbed-folder-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(
            bad.join("p.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, uid: u}\nspec: {nodeName: worker}\nstatus: {podIP: 10.244.1.10}\n",
        )
        .unwrap();
        let e = PodDef::from_folder(&bad).unwrap_err().to_string();
        assert!(
            e.contains("p.yaml: Pod x/a: spec.nodeName \"worker\""),
            "{e}"
        );
        std::fs::remove_dir_all(bad).unwrap();
    }

    #[test]
    fn parses_http_answers() {
        let a = HttpAnswer::parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 9\r\n\r\n{\"a\": 1}",
        )
        .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(a.json().unwrap()["a"], 1);
        let chunked = HttpAnswer::parse(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nno h\r\n5;x=y\r\nealth\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(chunked.status, 503);
        assert_eq!(chunked.body, b"no health");
        assert!(HttpAnswer::parse(b"").is_err());
        assert!(HttpAnswer::parse(b"HTTP/1.1 OK\r\n\r\n").is_err());
    }

    #[test]
    fn sums_matching_samples() {
        let text = "# HELP x\nistio_tcp_connections_opened_total{reporter=\"source\",a=\"1\"} 2\nistio_tcp_connections_opened_total{reporter=\"destination\",a=\"1\"} 3\nistio_tcp_connections_opened_totalx{reporter=\"source\"} 9\n";
        assert_eq!(
            super::sum_metric(text, "istio_tcp_connections_opened_total", &[("a", "1")]),
            5.0
        );
        assert_eq!(
            super::sum_metric(
                text,
                "istio_tcp_connections_opened_total",
                &[("reporter", "source")]
            ),
            2.0
        );
    }
}
