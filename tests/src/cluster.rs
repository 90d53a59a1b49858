//! A running mesh on the test bed: a development CA, a local config file describing the pods,
//! one ztunnel process per node, and an echo application in every pod. Pods are dual-stack:
//! each workload carries its IPv4 and its IPv6 address, and the apps listen on both. Shared by the
//! end-to-end tests, `cargo xtask demo` and `cargo xtask bench`.

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
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{PodSpec, Testbed, netns_path};

/// The port every pod's echo application listens on.
pub const ECHO_PORT: u16 = 8080;
/// A second application port, used for policies that deny one port and not the other.
pub const ALT_PORT: u16 = 9090;
/// A port that reads everything, then answers with the byte count: for throughput.
pub const SINK_PORT: u16 = 9000;
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
    /// Speaks HBONE itself (its own server on 15008) instead of through a ztunnel: listed in the
    /// config with `tunnelProtocol: HBONE` on a node no ztunnel serves.
    pub own_hbone: bool,
    /// Pod UID, when a Kubernetes object written beforehand names it (else random).
    pub uid: Option<String>,
    /// The address the pod's Kubernetes object gives it: the test bed must assign the same.
    pub expected_ip: Option<Ipv4Addr>,
    /// Only an IPv6 address, in the test bed and in the configuration; dual-stack otherwise.
    pub ipv6_only: bool,
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
        }
    }

    /// The Pods in a folder of Kubernetes YAML (as pilot reads it), as pods to create: name,
    /// namespace, UID, `app` label, service account, node (`spec.nodeName` `nodeN` is node
    /// index N-1) and address; in the mesh when their namespace is labelled
    /// `istio.io/dataplane-mode: ambient` and the pod does not opt out.
    pub fn from_folder(dir: &Path) -> anyhow::Result<Vec<PodDef>> {
        let mut ambient = std::collections::BTreeSet::new();
        let mut pods = vec![];
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let v = serde_yaml_ng::Value::deserialize(doc)
                    .with_context(|| format!("{}: invalid YAML", file.display()))?;
                let str_at = |path: &[&str]| -> Option<String> {
                    let mut cur = &v;
                    for k in path {
                        cur = cur.get(*k)?;
                    }
                    cur.as_str().map(str::to_owned)
                };
                let label = |k: &str| str_at(&["metadata", "labels", k]);
                match str_at(&["kind"]).as_deref() {
                    Some("Namespace") if label(DATAPLANE_MODE).as_deref() == Some("ambient") => {
                        ambient.insert(str_at(&["metadata", "name"]).unwrap_or_default());
                    }
                    Some("Pod") => {
                        let name = str_at(&["metadata", "name"]).unwrap_or_default();
                        let field = |path: &[&str]| {
                            str_at(path).with_context(|| {
                                format!(
                                    "{}: Pod {name}: {} missing",
                                    file.display(),
                                    path.join(".")
                                )
                            })
                        };
                        let node_name = field(&["spec", "nodeName"])?;
                        let node = node_name
                            .strip_prefix("node")
                            .and_then(|n| n.parse::<usize>().ok())
                            .filter(|n| *n >= 1)
                            .with_context(|| {
                                format!(
                                    "{}: Pod {name}: spec.nodeName {node_name:?} is not a test-bed node (node1, node2, …)",
                                    file.display()
                                )
                            })?
                            - 1;
                        pods.push(PodDef {
                            namespace: field(&["metadata", "namespace"])?,
                            service_account: str_at(&["spec", "serviceAccountName"])
                                .unwrap_or_else(|| "default".into()),
                            app: label("app").unwrap_or_else(|| name.clone()),
                            node,
                            // Settled below, once every namespace is known.
                            mesh: label(DATAPLANE_MODE).as_deref() != Some("none"),
                            own_hbone: false,
                            ipv6_only: false,
                            uid: Some(field(&["metadata", "uid"])?),
                            expected_ip: Some(field(&["status", "podIP"])?.parse().with_context(
                                || format!("{}: Pod {name}: status.podIP", file.display()),
                            )?),
                            name,
                        });
                    }
                    _ => {}
                }
            }
        }
        for p in &mut pods {
            p.mesh &= ambient.contains(&p.namespace);
        }
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
        }
    }
}

/// Where ztunnels get their configuration and certificates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ControlPlaneMode {
    /// A local file and the development CA (standalone mode).
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
    /// Extra YAML list items under `policies:` (indented by two spaces).
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
    pub config_path: PathBuf,
    pub ca: DevCa,
    ztunnels: Vec<Option<Child>>,
    pilot: Option<Child>,
    apps: Vec<(String, Arc<AppStats>)>,
    app_tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Where the ztunnel binary is: `$ZTUNNEL_BIN` (what `cargo xtask` sets after building it),
/// else the newer of the workspace's debug and release builds.
pub fn ztunnel_binary() -> anyhow::Result<PathBuf> {
    sibling_binary("ZTUNNEL_BIN", "ztunnel")
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
        let config_path = dir.join("ztunnel.yaml");
        let mut cluster = Cluster {
            bed,
            spec,
            dir,
            config_path,
            ca,
            ztunnels: vec![],
            pilot: None,
            apps: vec![],
            app_tasks: vec![],
        };
        std::fs::write(
            &cluster.config_path,
            cluster.config_yaml(&cluster.spec.policies),
        )?;
        let mode = cluster.spec.control_plane;
        if mode != ControlPlaneMode::File {
            // pilot loads the root it finds in its state directory.
            std::fs::create_dir_all(cluster.pilot_state())?;
            cluster.ca.save(
                &cluster.pilot_state().join("root-cert.pem"),
                &cluster.pilot_state().join("root-key.pem"),
            )?;
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
        Ok(cluster)
    }

    /// pilot's folder of Kubernetes YAML.
    pub fn pilot_config(&self) -> PathBuf {
        self.dir.join("k8s")
    }

    fn pilot_state(&self) -> PathBuf {
        self.dir.join("pilot")
    }

    pub fn pilot_log(&self) -> PathBuf {
        self.dir.join("pilot.log")
    }

    /// pilot's xDS address, as ztunnels dial it: node 0's underlay address.
    pub fn pilot_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bed.node(0).underlay_ip.into(), 15012)
    }

    /// The pods, services and namespace as Kubernetes objects (what `kubectl get -o yaml`
    /// would show), for pilot.
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
            let mode = if def.mesh {
                ""
            } else {
                ", istio.io/dataplane-mode: none"
            };
            let _ = writeln!(
                y,
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}, labels: {{app: {app}, version: v1{mode}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{phase: Running, podIP: \"{ip}\", podIPs: [{ips}]}}\n---",
                name = def.name,
                ns = def.namespace,
                uid = pod.uid,
                app = def.app,
                node = self.bed.node(def.node).name,
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
            let _ = writeln!(
                y,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec: {{clusterIP: {}, clusterIPs: [{}], ipFamilies: [{}], ipFamilyPolicy: {policy}, selector: {{app: {}}}, ports: [{{port: {}, targetPort: {}}}]}}\n---",
                s.name,
                s.namespace,
                s.vip,
                cluster_ips.join(", "),
                families.join(", "),
                s.app,
                s.port,
                s.target_port
            );
        }
        y
    }

    /// Write (or replace) a file in pilot's folder, atomically.
    pub fn write_pilot_file(&self, name: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.pilot_config().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.pilot_config().join(name))?;
        Ok(())
    }

    /// Start pilot on node 0 and wait until it accepts connections.
    pub async fn start_pilot(&mut self) -> anyhow::Result<()> {
        let bin = sibling_binary("PILOT_BIN", "pilot")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.pilot_log())?;
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
            .env(
                "RUST_LOG",
                std::env::var("PILOT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.pilot = Some(self.bed.spawn_in_node(0, cmd)?);
        let factory = self.node_sockets(0)?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if factory.connect(self.pilot_addr()).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = std::fs::read_to_string(self.pilot_log()).unwrap_or_default();
        bail!("pilot did not start listening\n--- log ---\n{log}")
    }

    /// Kill pilot at once (as a crash would), without letting it say goodbye.
    pub fn kill_pilot(&mut self) -> anyhow::Result<()> {
        let mut child = self.pilot.take().context("pilot not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// The local config file for the spec, with `policies` as the policy list.
    pub fn config_yaml(&self, policies: &str) -> String {
        let mut y = String::from("workloads:\n");
        for def in &self.spec.pods {
            let pod = self.bed.pod(&def.name);
            let services: Vec<&ServiceDef> = self
                .spec
                .services
                .iter()
                .filter(|s| s.app == def.app)
                .collect();
            let _ = writeln!(
                y,
                "- uid: {uid}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  addresses: [{addresses}]\n  node: {node}\n  tunnelProtocol: {proto}\n  canonicalName: {app}\n  canonicalRevision: v1\n  workloadName: {app}-v1\n  workloadType: deployment",
                uid = pod.uid,
                name = def.name,
                ns = def.namespace,
                sa = def.service_account,
                addresses = self
                    .pod_addresses(&def.name)
                    .iter()
                    .map(|ip| format!("\"{ip}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                node = if def.own_hbone {
                    "external"
                } else {
                    &self.bed.node(def.node).name
                },
                proto = if def.mesh || def.own_hbone {
                    "HBONE"
                } else {
                    "NONE"
                },
                app = def.app,
            );
            if !services.is_empty() {
                y.push_str("  services:\n");
                for s in services {
                    let _ = writeln!(
                        y,
                        "    {}/{}: {{{}: {}}}",
                        s.namespace,
                        hostname(s),
                        s.port,
                        s.target_port
                    );
                }
            }
        }
        y.push_str("services:\n");
        for s in &self.spec.services {
            let vips: Vec<String> = s.vips().iter().map(|ip| format!("\"{ip}\"")).collect();
            let _ = writeln!(
                y,
                "- name: {}\n  namespace: {}\n  hostname: {}\n  addresses: [{}]\n  ports: [{{servicePort: {}, targetPort: {}}}]",
                s.name,
                s.namespace,
                hostname(s),
                vips.join(", "),
                s.port,
                s.target_port
            );
        }
        y.push_str("policies:\n");
        y.push_str(policies);
        y
    }

    /// Replace the config file (ztunnel picks it up within a second).
    pub fn write_config(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config_path)?;
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
                .arg(&self.config_path)
                .arg("--ca-cert")
                .arg(self.dir.join("root.pem"))
                .arg("--ca-key")
                .arg(self.dir.join("root-key.pem"));
        } else {
            cmd.arg("--xds-address")
                .arg(format!("https://{}", self.pilot_addr()))
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
            .arg("--drain-timeout")
            .arg("5s")
            .args(&self.spec.ztunnel_args);
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
        self.dir
            .join(format!("ztunnel-{}.log", self.bed.node(node).name))
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
        let factory = self.node_sockets(node)?;
        let mut s = factory.connect(SocketAddr::new(addr.into(), port)).await?;
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

    /// Connect from `pod` to `dst` with a socket made in the pod's cgroup and netns, as the
    /// pod's application would (so either capture, eBPF or nftables, applies).
    pub async fn connect_from(&self, pod: &str, dst: SocketAddr) -> anyhow::Result<TcpStream> {
        let fd = self.bed.pod_socket(pod, dst.is_ipv6(), None)?;
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(std);
        let s = tokio::time::timeout(Duration::from_secs(10), socket.connect(dst))
            .await
            .with_context(|| format!("connecting from {pod} to {dst} timed out"))??;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Echo servers on ECHO_PORT and ALT_PORT in every pod, each answering with a line naming
    /// the pod and the peer address it saw, then echoing until the client half-closes; and a
    /// sink on SINK_PORT. Each port is served on IPv4 and IPv6 (two sockets, the IPv6 one
    /// IPv6-only, so IPv4 peers keep showing as plain IPv4 addresses).
    fn start_apps(&mut self) -> anyhow::Result<()> {
        let wildcards = [
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
        ];
        for def in self.spec.pods.clone() {
            let stats = Arc::new(AppStats::default());
            let ports: Vec<u16> = [ECHO_PORT, ALT_PORT, SINK_PORT]
                .into_iter()
                .chain(self.spec.app_ports.iter().copied())
                .collect();
            for (port, mut addr) in ports.into_iter().flat_map(|p| wildcards.map(|a| (p, a))) {
                addr.set_port(port);
                let listener = self.bed.in_pod(&def.name, move || app_listener(addr))??;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let name = def.name.clone();
                let stats = stats.clone();
                self.app_tasks.push(tokio::spawn(async move {
                    while let Ok((s, peer)) = listener.accept().await {
                        stats.accepted.fetch_add(1, Ordering::Relaxed);
                        if port == SINK_PORT {
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
        if let Some(mut p) = self.pilot.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        for t in &self.app_tasks {
            t.abort();
        }
        if std::env::var_os("KEEP_MESH_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        // Stop the ztunnels first: they would otherwise keep using the pins.
        for z in self.ztunnels.iter_mut().flatten() {
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

fn hostname(s: &ServiceDef) -> String {
    format!("{}.{}.svc.cluster.local", s.name, s.namespace)
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
