//! A multi-node Kubernetes-like test bed on one machine: nodes and pods as network namespaces, pod cgroups as kubelet makes them.
//!
//! Layout of one [`Testbed`] with prefix `p` (`ztb` and five hex digits):
//!
//! - `p-ul`: the underlay, a bridge `br0` joining the nodes;
//! - `p-nI` (I from 1): node I, with `ul0` = `172.30.0.I/24` and `fd00:172:30::I/64` on the
//!   underlay, a pod bridge `br0` = `10.244.I.1/24` and `fd00:10:244:I::1/64`, IPv4 and IPv6
//!   forwarding on and a route to every other node's pod subnets;
//! - `p-<pod>`: a pod, dual-stack, with `eth0` = `10.244.I.(10+k)/24` and
//!   `fd00:10:244:I::(10+k)/64` (hex) bridged into its node's `br0`, and a pause process in its
//!   cgroup
//!   `<mount>/p/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.
//!
//! IPv6 addresses are added with `nodad` (and DAD is off in the nodes), so they are usable at
//! once rather than tentative for a second.
//!
//! Everything is removed by [`Testbed::teardown`], which also runs on drop (so on panic);
//! [`clean_leftovers`] removes what a killed test process left behind.

#![deny(rust_2018_idioms)]

mod addressing;
mod capture;
mod cgroup;
mod cleanup;
pub mod cluster;
mod command;
pub mod http_echo;
mod naming;
mod netns;
mod packet;
mod podsocket;
mod process;
pub mod waypoint_bed;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;

use anyhow::{Context, bail, ensure};

pub use capture::{Capture, CaptureReport, PAYLOAD_CAP};
pub use cleanup::{clean_leftovers, clean_testbed};
pub use packet::{TcpFlags, TcpPacket};

use process::{Placement, Tracked};

/// Where ztunnel pins its eBPF state; each test bed's ztunnels use `<prefix>-<node>` in it.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Name of each node's interface on the underlay, where [`Testbed::capture`] listens.
pub const UNDERLAY_INTERFACE: &str = "ul0";

/// For end-to-end tests: whether the test bed can run here; if not, says why the test is skipped.
pub fn can_run() -> bool {
    match Testbed::check_privileges() {
        Ok(()) => true,
        // In CI a test that cannot run is a failure, never a silent `ok`.
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and this end-to-end test cannot run: {e}")
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// What to create for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// Pod name: 1-40 characters of `a-z`, `0-9`, `-`; unique within the test bed.
    pub name: String,
    /// Kubernetes namespace; only metadata.
    pub namespace: String,
    /// Index (0-based) of the node the pod runs on.
    pub node: usize,
    /// Pod UID to use (a Kubernetes object written beforehand names it); random when `None`.
    pub uid: Option<String>,
    /// Only an IPv6 address on `eth0` (and only an IPv6 default route), as in an IPv6-only
    /// cluster; dual-stack otherwise.
    pub ipv6_only: bool,
}

impl PodSpec {
    /// A dual-stack pod `name` in Kubernetes namespace `namespace` on node index `node` (0-based).
    pub fn new(name: &str, namespace: &str, node: usize) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node,
            uid: None,
            ipv6_only: false,
        }
    }
}

/// A node: a network namespace routing between its pods and the underlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `node1`, `node2`, … (numbered from 1, while APIs take 0-based indexes).
    pub name: String,
    /// Name of its network namespace (see [`netns_path`]).
    pub netns: String,
    /// Its address on the underlay (interface [`UNDERLAY_INTERFACE`]).
    pub underlay_ip: Ipv4Addr,
    /// Its address on the pod bridge, the default gateway of its pods.
    pub pod_gateway: Ipv4Addr,
    /// Its IPv6 address on the underlay.
    pub underlay_ip6: Ipv6Addr,
    /// Its IPv6 address on the pod bridge, the IPv6 default gateway of its pods.
    pub pod_gateway6: Ipv6Addr,
}

/// A pod: a network namespace with one interface, and a cgroup holding its pause process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Pod name, as given in its [`PodSpec`].
    pub name: String,
    /// Kubernetes namespace; only metadata.
    pub namespace: String,
    /// Pod UID: a lowercase UUID v4.
    pub uid: String,
    /// Index (0-based) of its node in [`Testbed::nodes`].
    pub node: usize,
    /// IPv4 address of its `eth0`; planned but not assigned when [`Pod::ipv6_only`].
    pub ip: Ipv4Addr,
    /// The pod has no IPv4 address (besides loopback) and no IPv4 route.
    pub ipv6_only: bool,
    /// IPv6 address of its `eth0`.
    pub ip6: Ipv6Addr,
    /// Name of its network namespace (see [`netns_path`]).
    pub netns: String,
    /// Its container's cgroup (the `cri-containerd-<id>.scope` directory).
    pub cgroup: PathBuf,
    /// PID of the process that stands for the pod's sandbox, a member of [`Pod::cgroup`] and
    /// of [`Pod::netns`].
    pub pause_pid: u32,
}

/// Path of the file naming network namespace `netns` (`/run/netns/<netns>`).
pub fn netns_path(netns: &str) -> PathBuf {
    netns::path(netns)
}

/// Nodes and pods built on this machine; removed again on [`Testbed::teardown`] or drop.
pub struct Testbed {
    /// `ztb` and five hex digits; starts every netns name and names the cgroup root.
    pub prefix: String,
    /// The nodes; index `i` is `node{i+1}`.
    pub nodes: Vec<Node>,
    /// The pods, in the order of their specs.
    pub pods: Vec<Pod>,
    cgroup_root: PathBuf,
    /// Network namespaces created so far, in creation order.
    created_netns: Vec<String>,
    /// Cgroup directories created so far, parents before children.
    created_cgroups: Vec<PathBuf>,
    pause: Vec<Child>,
    tracked: Mutex<Vec<Tracked>>,
    torn_down: bool,
}

impl Testbed {
    /// Err with a clear "needs root: ..." message when not uid 0 (tests use it to skip).
    pub fn check_privileges() -> anyhow::Result<()> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            bail!(
                "needs root: the test bed creates network namespaces, veth links and cgroups \
                 (running as uid {euid})"
            );
        }
        Ok(())
    }

    /// Builds `nodes` nodes joined by the underlay, and the pods in `pods`.
    ///
    /// On error, whatever was already built is removed again.
    pub fn new(nodes: usize, pods: &[PodSpec]) -> anyhow::Result<Testbed> {
        Self::check_privileges()?;
        validate(nodes, pods)?;
        let mut bed = Testbed {
            prefix: String::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            cgroup_root: PathBuf::new(),
            created_netns: Vec::new(),
            created_cgroups: Vec::new(),
            pause: Vec::new(),
            tracked: Mutex::new(Vec::new()),
            torn_down: false,
        };
        // Dropping `bed` on an early return tears down the part already built.
        bed.claim_prefix()?;
        bed.build_underlay()?;
        for index in 0..nodes {
            bed.build_node(index)
                .with_context(|| format!("cannot build node{}", index + 1))?;
        }
        bed.route_between_nodes()?;
        for spec in pods {
            bed.build_pod(spec)
                .with_context(|| format!("cannot build pod {}", spec.name))?;
        }
        Ok(bed)
    }

    /// The pod named `name`.
    ///
    /// # Panics
    /// If there is no such pod; meant for tests, where that is a bug in the test.
    pub fn pod(&self, name: &str) -> &Pod {
        self.find_pod(name).unwrap_or_else(|_| {
            let known: Vec<&str> = self.pods.iter().map(|p| p.name.as_str()).collect();
            panic!(
                "test bed {} has no pod {name:?} (pods: {})",
                self.prefix,
                known.join(", ")
            )
        })
    }

    /// The node at `index` (0-based).
    ///
    /// # Panics
    /// If there is no such node.
    pub fn node(&self, index: usize) -> &Node {
        self.nodes.get(index).unwrap_or_else(|| {
            panic!(
                "test bed {} has no node index {index} ({} nodes, indexes start at 0)",
                self.prefix,
                self.nodes.len()
            )
        })
    }

    /// The cgroup directory holding this test bed's pods (`<mount>/<prefix>`, with
    /// `kubepods.slice` below it): what a node proxy searches for pod UIDs.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Starts `cmd` inside node `node`'s (0-based) network namespace.
    ///
    /// The child is killed at teardown unless it has exited; the caller may wait for it, kill
    /// it or read its pipes as configured on `cmd`.
    pub fn spawn_in_node(
        &self,
        node: usize,
        mut cmd: std::process::Command,
    ) -> anyhow::Result<Child> {
        let netns = &self.find_node(node)?.netns;
        process::place(&mut cmd, self.node_placement(netns)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?} in {netns}"))?;
        self.track(child.id());
        Ok(child)
    }

    /// Starts `cmd` inside pod `pod`: it joins the pod's cgroup, then its network namespace.
    ///
    /// The child is killed at teardown unless it has exited.
    pub fn spawn_in_pod(&self, pod: &str, mut cmd: std::process::Command) -> anyhow::Result<Child> {
        let pod = self.find_pod(pod)?;
        process::place(&mut cmd, pod_placement(pod)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?} in pod {}", pod.name))?;
        self.track(child.id());
        Ok(child)
    }

    /// [`Testbed::spawn_in_node`] for tokio; must be called within a tokio runtime.
    pub fn spawn_in_node_async(
        &self,
        node: usize,
        mut cmd: tokio::process::Command,
    ) -> anyhow::Result<tokio::process::Child> {
        let netns = &self.find_node(node)?.netns;
        process::place(cmd.as_std_mut(), self.node_placement(netns)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {:?} in {netns}", cmd.as_std()))?;
        if let Some(pid) = child.id() {
            self.track(pid);
        }
        Ok(child)
    }

    /// [`Testbed::spawn_in_pod`] for tokio; must be called within a tokio runtime.
    pub fn spawn_in_pod_async(
        &self,
        pod: &str,
        mut cmd: tokio::process::Command,
    ) -> anyhow::Result<tokio::process::Child> {
        let pod = self.find_pod(pod)?;
        process::place(cmd.as_std_mut(), pod_placement(pod)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {:?} in pod {}", cmd.as_std(), pod.name))?;
        if let Some(pid) = child.id() {
            self.track(pid);
        }
        Ok(child)
    }

    /// Runs `f` on a fresh thread that has entered network namespace `netns` (a name such as
    /// [`Pod::netns`] or [`Node::netns`]) and returns its result.
    ///
    /// Sockets created in `f` stay in that namespace and can be used from any thread or tokio
    /// runtime afterwards (create std sockets, set them non-blocking, convert them later). A
    /// panic in `f` is passed on.
    pub fn in_netns<R: Send>(
        &self,
        netns: &str,
        f: impl FnOnce() -> R + Send,
    ) -> anyhow::Result<R> {
        netns::run_in(netns, f)
    }

    /// [`Testbed::in_netns`] in pod `pod`'s namespace.
    pub fn in_pod<R: Send>(&self, pod: &str, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        netns::run_in(&self.find_pod(pod)?.netns, f)
    }

    /// A TCP socket made inside pod `pod` as its application would make it: in the pod's
    /// cgroup (so cgroup eBPF programs apply) and network namespace. `bind_port` binds it to
    /// that port on the wildcard address first; the error is the kernel's (e.g. EPERM).
    pub fn pod_socket(
        &self,
        pod: &str,
        v6: bool,
        bind_port: Option<u16>,
    ) -> anyhow::Result<std::os::fd::OwnedFd> {
        let pod = self.find_pod(pod)?;
        let procs = cgroup::open_procs(&pod.cgroup)?;
        let netns = netns::open(&pod.netns)?;
        podsocket::create(&procs, &netns, v6, false, bind_port)
            .with_context(|| format!("cannot make a socket in pod {}", pod.name))
    }

    /// [`Testbed::pod_socket`] for a UDP socket (unbound).
    pub fn pod_udp_socket(&self, pod: &str, v6: bool) -> anyhow::Result<std::os::fd::OwnedFd> {
        let pod = self.find_pod(pod)?;
        let procs = cgroup::open_procs(&pod.cgroup)?;
        let netns = netns::open(&pod.netns)?;
        podsocket::create(&procs, &netns, v6, true, None)
            .with_context(|| format!("cannot make a UDP socket in pod {}", pod.name))
    }

    /// [`Testbed::in_netns`] in node `node`'s (0-based) namespace.
    pub fn in_node<R: Send>(&self, node: usize, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        netns::run_in(&self.find_node(node)?.netns, f)
    }

    /// Captures the IPv4 and IPv6 TCP packets crossing node `node`'s (0-based) underlay interface
    /// [`UNDERLAY_INTERFACE`], until [`Capture::stop`].
    pub fn capture(&self, node: usize) -> anyhow::Result<Capture> {
        Capture::start(&self.find_node(node)?.netns, UNDERLAY_INTERFACE)
    }

    /// Kills every process started in the test bed, deletes its namespaces and cgroups, and
    /// unmounts the cgroup hierarchy if no other test bed uses it.
    ///
    /// Idempotent; never panics; failures are logged to stderr. Also run on drop.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let prefix = self.prefix.clone();
        let log = |what: &str, err: &dyn std::fmt::Display| {
            eprintln!("testbed {prefix}: teardown: {what}: {err:#}");
        };

        let tracked = std::mem::take(
            &mut *self
                .tracked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in &tracked {
            if let Err(e) = t.kill() {
                log(&format!("cannot kill process {}", t.pid), &e);
            }
        }
        for pod in &self.pods {
            if let Err(e) = cgroup::kill_all(&pod.cgroup) {
                log(&format!("cannot kill pod {}", pod.name), &e);
            }
        }
        // Also catches grandchildren that left their cgroup or were started in a node.
        for ns in self.created_netns.iter().rev() {
            if let Err(e) = netns::kill_processes_in(ns) {
                log(&format!("cannot kill processes in {ns}"), &e);
            }
        }
        for mut child in self.pause.drain(..) {
            let _ = child.kill();
            if let Err(e) = child.wait() {
                log("cannot reap a pause process", &e);
            }
        }
        for ns in std::mem::take(&mut self.created_netns).iter().rev() {
            if let Err(e) = netns::delete(ns) {
                log(&format!("cannot delete netns {ns}"), &e);
            }
        }

        let dirs = std::mem::take(&mut self.created_cgroups);
        let Some((root, below)) = dirs.split_first() else {
            return;
        };
        for dir in below.iter().rev() {
            if let Err(e) = cgroup::remove(dir) {
                log("cannot remove cgroup", &e);
            }
        }
        // The root and the mount are shared state: change them only under the lock.
        match cgroup::MountLock::acquire() {
            Ok(_lock) => {
                if let Err(e) = cgroup::remove(root) {
                    log("cannot remove cgroup", &e);
                }
                if let Err(e) = cgroup::unmount_if_unused(cgroup::MOUNT_POINT) {
                    log("cannot unmount the cgroup hierarchy", &e);
                }
            }
            Err(e) => log("cannot lock the cgroup mount", &e),
        }
    }

    fn find_pod(&self, name: &str) -> anyhow::Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("test bed {} has no pod {name:?}", self.prefix))
    }

    fn find_node(&self, index: usize) -> anyhow::Result<&Node> {
        self.nodes.get(index).with_context(|| {
            format!(
                "test bed {} has no node index {index} ({} nodes, indexes start at 0)",
                self.prefix,
                self.nodes.len()
            )
        })
    }

    fn node_placement(&self, netns: &str) -> anyhow::Result<Placement> {
        Ok(Placement {
            cgroup_procs: None,
            netns: netns::open(netns)?,
        })
    }

    fn track(&self, pid: u32) {
        let mut tracked = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Long demos spawn many short commands; do not hold a pidfd for each forever.
        tracked.retain(|t| !t.has_exited());
        tracked.extend(Tracked::new(pid));
    }

    /// Picks a prefix no other test bed uses and creates its cgroup root.
    fn claim_prefix(&mut self) -> anyhow::Result<()> {
        let _lock = cgroup::MountLock::acquire()?;
        cgroup::ensure_mounted(cgroup::MOUNT_POINT)?;
        for _ in 0..100 {
            let prefix = naming::new_prefix();
            if netns::list()?.iter().any(|n| n.starts_with(&prefix)) {
                continue;
            }
            let root = Path::new(cgroup::MOUNT_POINT).join(&prefix);
            if cgroup::create(&root)? {
                self.prefix = prefix;
                self.created_cgroups.push(root.clone());
                self.cgroup_root = root;
                return Ok(());
            }
        }
        bail!("cannot find an unused test bed prefix; try `cargo xtask clean-testbed`")
    }

    fn add_netns(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}-{suffix}", self.prefix);
        netns::add(&name).inspect_err(|_| {
            // `ip netns add` may leave the name behind when a later step fails.
            if netns::path(&name).exists() {
                self.created_netns.push(name.clone());
            }
        })?;
        self.created_netns.push(name.clone());
        Ok(name)
    }

    fn underlay(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    fn build_underlay(&mut self) -> anyhow::Result<()> {
        let ul = self.add_netns("ul")?;
        command::ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        command::ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        Ok(())
    }

    fn build_node(&mut self, index: usize) -> anyhow::Result<()> {
        let number = index + 1;
        let ns = self.add_netns(&format!("n{number}"))?;
        let ul = self.underlay();
        let underlay_ip = addressing::underlay_ip(number);
        let pod_gateway = addressing::pod_gateway(number);
        let underlay_ip6 = addressing::underlay_ip6(number);
        let pod_gateway6 = addressing::pod_gateway6(number);
        let plen = addressing::PREFIX_LEN;

        // DAD off before any link exists, so link-local addresses are not tentative either.
        netns::sysctl(
            &ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;

        let port = format!("n{number}");
        command::ip(&[
            "-n",
            &ul,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_INTERFACE,
            "netns",
            &ns,
        ])?;
        command::ip(&["-n", &ul, "link", "set", &port, "master", "br0", "up"])?;
        command::ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{underlay_ip}/{plen}"),
            "dev",
            UNDERLAY_INTERFACE,
        ])?;
        add_ip6(&ns, underlay_ip6, UNDERLAY_INTERFACE)?;
        command::ip(&["-n", &ns, "link", "set", UNDERLAY_INTERFACE, "up"])?;

        command::ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        command::ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{pod_gateway}/{plen}"),
            "dev",
            "br0",
        ])?;
        add_ip6(&ns, pod_gateway6, "br0")?;
        command::ip(&["-n", &ns, "link", "set", "br0", "up"])?;

        self.nodes.push(Node {
            name: format!("node{number}"),
            netns: ns,
            underlay_ip,
            pod_gateway,
            underlay_ip6,
            pod_gateway6,
        });
        Ok(())
    }

    fn route_between_nodes(&self) -> anyhow::Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            for (j, other) in self.nodes.iter().enumerate() {
                if i != j {
                    command::ip(&[
                        "-n",
                        &node.netns,
                        "route",
                        "add",
                        &addressing::pod_subnet(j + 1),
                        "via",
                        &other.underlay_ip.to_string(),
                        "dev",
                        UNDERLAY_INTERFACE,
                    ])?;
                    command::ip(&[
                        "-n",
                        &node.netns,
                        "-6",
                        "route",
                        "add",
                        &addressing::pod_subnet6(j + 1),
                        "via",
                        &other.underlay_ip6.to_string(),
                        "dev",
                        UNDERLAY_INTERFACE,
                    ])?;
                }
            }
        }
        Ok(())
    }

    fn build_pod(&mut self, spec: &PodSpec) -> anyhow::Result<()> {
        let number = spec.node + 1;
        let k = self.pods.iter().filter(|p| p.node == spec.node).count();
        let ip = addressing::pod_ip(number, k);
        let ip6 = addressing::pod_ip6(number, k);
        let gateway = addressing::pod_gateway(number);
        let gateway6 = addressing::pod_gateway6(number);
        let node_ns = self.nodes[spec.node].netns.clone();
        let ns = self.add_netns(&spec.name)?;

        // Host-side names need only be unique within the node; the pod index keeps them short.
        let host_side = format!("vp{}", self.pods.len());
        command::ip(&[
            "-n", &node_ns, "link", "add", &host_side, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        command::ip(&[
            "-n", &node_ns, "link", "set", &host_side, "master", "br0", "up",
        ])?;
        if !spec.ipv6_only {
            command::ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/{}", addressing::PREFIX_LEN),
                "dev",
                "eth0",
            ])?;
        }
        add_ip6(&ns, ip6, "eth0")?;
        command::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        if !spec.ipv6_only {
            command::ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ])?;
        }
        command::ip(&[
            "-n",
            &ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway6.to_string(),
        ])?;

        let uid = spec.uid.clone().unwrap_or_else(naming::new_pod_uid);
        let container_id = naming::new_container_id();
        let mut scope = PathBuf::new();
        for dir in cgroup::besteffort_pod_dirs(&uid, &container_id) {
            scope = self.cgroup_root.join(dir);
            if cgroup::create(&scope)? {
                self.created_cgroups.push(scope.clone());
            }
        }

        let mut pause = std::process::Command::new("sleep");
        pause
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        process::place(
            &mut pause,
            Placement {
                cgroup_procs: Some(cgroup::open_procs(&scope)?),
                netns: netns::open(&ns)?,
            },
        );
        let child = pause
            .spawn()
            .context("cannot start the pause process (`sleep infinity`)")?;
        let pause_pid = child.id();
        self.pause.push(child);

        self.pods.push(Pod {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            uid,
            node: spec.node,
            ip,
            ipv6_only: spec.ipv6_only,
            ip6,
            netns: ns,
            cgroup: scope,
            pause_pid,
        });
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("prefix", &self.prefix)
            .field("nodes", &self.nodes)
            .field("pods", &self.pods)
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

/// Adds `ip` (with the test bed's IPv6 prefix length) to `dev` in namespace `ns`, usable at
/// once: `nodad` skips duplicate address detection, which would keep it tentative for a second.
fn add_ip6(ns: &str, ip: Ipv6Addr, dev: &str) -> anyhow::Result<()> {
    command::ip(&[
        "-n",
        ns,
        "-6",
        "addr",
        "add",
        &format!("{ip}/{}", addressing::PREFIX_LEN6),
        "dev",
        dev,
        "nodad",
    ])
    .map(drop)
}

/// Starts `cmd` in network namespace `netns` and, when given, cgroup `cgroup` (joined first), as
/// [`Testbed::spawn_in_pod`] and [`Testbed::spawn_in_node`] do, for a process that does not own
/// the test bed (`cargo xtask exec` into a running demo). The child is not tracked: the caller
/// waits for it.
pub fn spawn_in(
    netns: &str,
    cgroup: Option<&Path>,
    mut cmd: std::process::Command,
) -> anyhow::Result<Child> {
    let placement = Placement {
        cgroup_procs: cgroup.map(cgroup::open_procs).transpose()?,
        netns: netns::open(netns)?,
    };
    process::place(&mut cmd, placement);
    cmd.spawn()
        .with_context(|| format!("cannot start {cmd:?} in {netns}"))
}

fn pod_placement(pod: &Pod) -> anyhow::Result<Placement> {
    Ok(Placement {
        cgroup_procs: Some(cgroup::open_procs(&pod.cgroup)?),
        netns: netns::open(&pod.netns)?,
    })
}

fn validate(nodes: usize, pods: &[PodSpec]) -> anyhow::Result<()> {
    ensure!(
        (1..=addressing::MAX_NODES).contains(&nodes),
        "a test bed needs 1 to {} nodes, not {nodes}",
        addressing::MAX_NODES
    );
    let mut per_node = vec![0usize; nodes];
    for (i, spec) in pods.iter().enumerate() {
        naming::check_pod_name(&spec.name)?;
        ensure!(
            spec.node < nodes,
            "pod {} is placed on node index {} but there are only {nodes} nodes (indexes start at 0)",
            spec.name,
            spec.node
        );
        ensure!(
            !pods[..i].iter().any(|p| p.name == spec.name),
            "pod name {} is used twice",
            spec.name
        );
        per_node[spec.node] += 1;
        ensure!(
            per_node[spec.node] <= addressing::MAX_PODS_PER_NODE,
            "node index {} has more than {} pods",
            spec.node,
            addressing::MAX_PODS_PER_NODE
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testbed_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Testbed>();
        assert_send_sync::<Capture>();
    }

    #[test]
    fn validation() {
        let pod = |name: &str, node| PodSpec::new(name, "default", node);
        assert!(validate(2, &[pod("a", 0), pod("b", 1)]).is_ok());
        assert!(validate(0, &[]).is_err());
        let err = validate(2, &[pod("a", 2)]).unwrap_err().to_string();
        assert!(err.contains("only 2 nodes"), "{err}");
        let err = validate(2, &[pod("a", 0), pod("a", 1)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
        assert!(validate(1, &[pod("Bad", 0)]).is_err());
    }
}
