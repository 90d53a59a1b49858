//! The demo mesh left running by `cargo xtask demo --keep`: the record of where its pods and
//! nodes are (a state file), and the commands that use it, `cargo xtask exec` and
//! `cargo xtask down`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use testbed::cluster::Cluster;

/// Where the running demo records itself (root-only, gone at reboot like the namespaces).
const STATE_FILE: &str = "/run/mesh-demo.json";

/// A pod or a node of the running demo: where a command run "in" it goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Place {
    pub name: String,
    /// Kubernetes namespace of a pod; empty for a node.
    pub namespace: String,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// The pod's cgroup (its capture applies to processes in it); none for a node.
    pub cgroup: Option<PathBuf>,
    pub addresses: Vec<IpAddr>,
    pub node: String,
}

/// What `cargo xtask demo --keep` writes to [`STATE_FILE`] while its mesh runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The demo process: it owns the test bed, the apps and the proxies.
    pub pid: u32,
    /// The test bed's prefix (names its namespaces, cgroups and eBPF pins).
    pub prefix: String,
    /// The mesh's directory (logs, pilot's state).
    pub dir: PathBuf,
    /// pilot's folder of Kubernetes YAML: files written there apply at once.
    pub pilot_folder: PathBuf,
    pub pods: Vec<Place>,
    pub nodes: Vec<Place>,
}

impl State {
    fn of(c: &Cluster) -> State {
        State {
            pid: std::process::id(),
            prefix: c.bed.prefix.clone(),
            dir: c.dir.clone(),
            pilot_folder: c.pilot_config(),
            pods: c
                .bed
                .pods
                .iter()
                .map(|p| Place {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    netns: p.netns.clone(),
                    cgroup: Some(p.cgroup.clone()),
                    addresses: c.pod_addresses(&p.name),
                    node: c.bed.node(p.node).name.clone(),
                })
                .collect(),
            nodes: c
                .bed
                .nodes
                .iter()
                .map(|n| Place {
                    name: n.name.clone(),
                    namespace: String::new(),
                    netns: n.netns.clone(),
                    cgroup: None,
                    addresses: vec![n.underlay_ip.into(), n.pod_gateway.into()],
                    node: n.name.clone(),
                })
                .collect(),
        }
    }

    /// The recorded demo, if the file exists (whether or not its process still runs).
    pub fn load() -> anyhow::Result<Option<State>> {
        match std::fs::read_to_string(STATE_FILE) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text).with_context(|| format!("{STATE_FILE}: invalid"))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {STATE_FILE}")),
        }
    }

    /// The recorded demo if its process is still running.
    pub fn load_running() -> anyhow::Result<Option<State>> {
        Ok(State::load()?.filter(|s| alive(s.pid)))
    }

    /// The pod or node called `name`, or whose name starts with it if only one does
    /// (`productpage` for `productpage-v1-7f9d8`).
    pub fn place(&self, name: &str) -> anyhow::Result<&Place> {
        let all = || self.pods.iter().chain(&self.nodes);
        if let Some(p) = all().find(|p| p.name == name) {
            return Ok(p);
        }
        let matches: Vec<&Place> = all().filter(|p| p.name.starts_with(name)).collect();
        match matches.as_slice() {
            [one] => Ok(one),
            [] => bail!(
                "no pod or node {name:?} in the running demo (pods: {}; nodes: {})",
                self.pods
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.nodes
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            many => bail!(
                "{name:?} names {} pods: {}",
                many.len(),
                many.iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The resolv.conf a Kubernetes pod in `namespace` gets (cluster DNS, search list, ndots 5).
/// The nameserver address is where the cluster's DNS would be; the pod's ztunnel answers the
/// captured queries for services itself.
fn resolv_conf(namespace: &str) -> String {
    format!(
        "nameserver 10.96.0.53\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\n"
    )
}

/// After the checks: record the mesh, tell the user how to use it, and run until
/// `cargo xtask down` (SIGTERM) or Ctrl-C; then the mesh is torn down as the demo returns.
pub async fn keep(c: &Cluster, routes: &Path) -> anyhow::Result<()> {
    let state = State::of(c);
    std::fs::write(STATE_FILE, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("writing {STATE_FILE}"))?;
    let page = state
        .pods
        .iter()
        .find(|p| p.name.starts_with("productpage"))
        .map_or("productpage", |p| p.name.as_str());
    let waypoint = state
        .pods
        .iter()
        .find(|p| p.name.starts_with("waypoint"))
        .and_then(|p| Some((p.name.as_str(), *p.addresses.first()?)));
    let vs = c.pilot_config().join(crate::demo::VS_FILE);
    let active = std::fs::read_to_string(&vs)
        .ok()
        .and_then(|text| {
            std::fs::read_dir(routes).ok()?.flatten().find_map(|e| {
                (std::fs::read_to_string(e.path()).ok()? == text)
                    .then(|| e.file_name().to_string_lossy().into_owned())
            })
        })
        .unwrap_or_else(|| "none".into());
    println!(
        "
The mesh keeps running (pid {pid}, test bed {prefix}). In another terminal, as root:

  Run a command in a pod (its network namespace and cgroup, so ztunnel captures its traffic;
  service names resolve through ztunnel's DNS proxy):
    cargo xtask exec {page} -- curl -s -H 'end-user: jason' http://reviews:9080/
    cargo xtask exec {page} -- curl -s http://ratings:9080/ratings/0
    cargo xtask exec productpage -- sh            (a unique prefix of the pod's name will do)
  or on a node (its network namespace): cargo xtask exec node1 -- ss -tlnp

  pilot's folder (edit or add YAML there: it applies within a second):
    {folder}
  reviews' VirtualService is {vs_file} (now: {active}); the examples are in {routes}:
    cp {routes}/2-jason-v2.yaml {vs}
",
        pid = state.pid,
        prefix = state.prefix,
        folder = state.pilot_folder.display(),
        vs_file = crate::demo::VS_FILE,
        vs = vs.display(),
        routes = routes.display(),
    );
    println!(
        "  admin and metrics addresses (reach them from the node: `cargo xtask exec <node> -- curl -s <url>`):"
    );
    for node in &c.bed.nodes {
        let gw = node.pod_gateway;
        println!(
            "    ztunnel on {n}: admin http://127.0.0.1:15000/config_dump, metrics http://{gw}:15020/metrics, readiness http://{gw}:15021/healthz/ready",
            n = node.name
        );
    }
    if let Some((name, ip)) = waypoint {
        let node = state
            .pods
            .iter()
            .find(|p| p.name == name)
            .map_or("node1", |p| p.node.as_str());
        println!(
            "    waypoint {name} (on {node}): admin http://{ip}:15000/config_dump (also /listeners, /clusters), metrics http://{ip}:15020/metrics"
        );
    }
    println!(
        "    pilot on node1: xDS and CA https://{} (TLS), debug http://127.0.0.1:15014/debug/snapshot and /debug/connections",
        c.pilot_addr()
    );
    println!(
        "  logs: {}\n\n  Stop it and remove everything: cargo xtask down   (or Ctrl-C here)",
        state.dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("\nstopping the mesh");
    let _ = std::fs::remove_file(STATE_FILE);
    Ok(())
}

/// `cargo xtask exec <pod|node> -- <command>`: run the command in the running demo's pod (its
/// cgroup and network namespace, with a Kubernetes resolv.conf in a private mount namespace) or
/// node (its network namespace); returns its exit code.
pub fn exec(target: &str, command: &[String]) -> anyhow::Result<i32> {
    testbed::Testbed::check_privileges()?;
    let Some(state) = State::load_running()? else {
        bail!("no demo mesh is running: start one with `cargo xtask demo --keep`");
    };
    let Some((program, args)) = command.split_first() else {
        bail!("no command given: cargo xtask exec <pod> -- <command> [args…]");
    };
    let place = state.place(target)?;
    let mut cmd = match &place.cgroup {
        Some(_) => {
            let resolv = state.dir.join(format!("resolv-{}.conf", place.namespace));
            std::fs::write(&resolv, resolv_conf(&place.namespace))?;
            // Its own mount namespace, so the bind mount of resolv.conf is the command's alone.
            let mut cmd = std::process::Command::new("unshare");
            cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
                .arg(&resolv)
                .arg(program)
                .args(args);
            cmd
        }
        None => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args);
            cmd
        }
    };
    cmd.env("POD_NAME", &place.name);
    let mut child = testbed::spawn_in(&place.netns, place.cgroup.as_deref(), cmd)
        .with_context(|| format!("running {program} in {}", place.name))?;
    let status = child.wait()?;
    Ok(status.code().unwrap_or(1))
}

/// `cargo xtask down`: stop the running demo (it removes its mesh as it exits); if it is gone
/// but left its test bed behind, remove that test bed's namespaces, cgroups and pins.
pub fn down() -> anyhow::Result<String> {
    testbed::Testbed::check_privileges()?;
    let Some(state) = State::load()? else {
        return Ok("no demo mesh recorded (nothing to do)".into());
    };
    let mut done = vec![];
    if alive(state.pid) {
        // SAFETY: kill(2) with a pid read from our own root-only state file.
        unsafe { libc::kill(state.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(state.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(state.pid) {
            bail!(
                "the demo (pid {}) did not exit within 30 s of SIGTERM",
                state.pid
            );
        }
        done.push(format!("stopped the demo (pid {})", state.pid));
    }
    done.push(testbed::clean_testbed(&state.prefix)?);
    // A demo that died without its teardown leaves its directory (logs, pilot's folder).
    let own_dir = state
        .dir
        .file_name()
        .is_some_and(|n| *n == *format!("{}-mesh", state.prefix));
    if own_dir && state.dir.exists() {
        std::fs::remove_dir_all(&state.dir)
            .with_context(|| format!("removing {}", state.dir.display()))?;
        done.push(format!("removed {}", state.dir.display()));
    }
    let _ = std::fs::remove_file(STATE_FILE);
    Ok(done.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(name: &str) -> Place {
        Place {
            name: name.into(),
            namespace: "bookinfo".into(),
            netns: format!("ztb00001-{name}"),
            cgroup: None,
            addresses: vec![],
            node: "node1".into(),
        }
    }

    #[test]
    fn finds_places_by_name_or_unique_prefix() {
        let state = State {
            pid: 1,
            prefix: "ztb00001".into(),
            dir: "/tmp/x".into(),
            pilot_folder: "/tmp/x/k8s".into(),
            pods: vec![
                place("productpage-v1-7f9d8"),
                place("reviews-v1-5b8c4"),
                place("reviews-v2-8d4f1"),
            ],
            nodes: vec![place("node1")],
        };
        assert_eq!(
            state.place("productpage").unwrap().name,
            "productpage-v1-7f9d8"
        );
        assert_eq!(
            state.place("reviews-v2-8d4f1").unwrap().name,
            "reviews-v2-8d4f1"
        );
        assert_eq!(state.place("node1").unwrap().name, "node1");
        let err = state.place("reviews").unwrap_err().to_string();
        assert!(err.contains("names 2 pods"), "{err}");
        let err = state.place("ratings").unwrap_err().to_string();
        assert!(err.contains("no pod or node"), "{err}");
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), state);
    }

    #[test]
    fn pods_get_a_kubernetes_resolv_conf() {
        let r = resolv_conf("bookinfo");
        assert!(r.contains("search bookinfo.svc.cluster.local svc.cluster.local cluster.local"));
        assert!(r.contains("ndots:5"));
    }
}
