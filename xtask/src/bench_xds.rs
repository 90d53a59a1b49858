//! `cargo xtask bench xds`: the control plane at scale. For each size, a folder of Kubernetes
//! YAML (N pods, 1k services, 100 policies; 66k services at 1M pods) is served by the release
//! `pilot` binary (folder source, translation, delta ADS over TLS with node tokens) to 100
//! `mesh::xds` clients (10 at 1M pods, see `LARGE_CLIENTS`).
//!
//! Each size runs in a child process of its own (`xtask bench-xds-size`), so that the clients'
//! memory is measured as the RSS growth of a fresh process.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh::control::ControlPlane;
use mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh::xds::{ClientState, Handler, Rejected, Update};
use serde::{Deserialize, Serialize};

pub const SIZES: &[usize] = &[1_000, 10_000, 100_000, 1_000_000];
const SERVICES: usize = 1_000;
const POLICIES: usize = 100;
const CLIENTS: usize = 100;
/// From this size on, Istio's reported case: 66k services. Each client of this process keeps
/// every resource it receives (about 250 B per object), so 100 clients of 1M pods would need
/// some 27 GB here: that size runs with fewer clients.
const LARGE: usize = 1_000_000;
const LARGE_SERVICES: usize = 66_000;
const LARGE_CLIENTS: usize = 10;

/// The sizes to run: `SIZES`, or the pod counts listed in `XDS_BENCH_PODS` (e.g. `1000,1000000`).
pub fn sizes() -> anyhow::Result<Vec<usize>> {
    match std::env::var("XDS_BENCH_PODS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .with_context(|| format!("XDS_BENCH_PODS: {n:?} is not a pod count"))
            })
            .collect(),
        Err(_) => Ok(SIZES.to_vec()),
    }
}

/// Services at this size.
fn services_at(pods: usize) -> usize {
    if pods >= LARGE {
        LARGE_SERVICES
    } else {
        SERVICES
    }
}

/// xDS clients at this size.
fn clients_at(pods: usize) -> usize {
    if pods >= LARGE {
        LARGE_CLIENTS
    } else {
        CLIENTS
    }
}

/// The goals, printed beside the figures.
const GOAL_POD_CHANGE_MS: f64 = 200.0;
const GOAL_MIB_PER_CLIENT: f64 = 2.0;
const GOAL_FIRST_PUSH_MS_AT_100K: f64 = 3_000.0;
const NAMESPACES: usize = 10;
const NODES: usize = 100;
const PODS_PER_FILE: usize = 1_000;
/// Pod changes timed per size; the figure is the median.
const CHANGES: usize = 3;
/// A size that takes longer than this is reported as not completed, and larger ones skipped.
const SIZE_TIMEOUT: Duration = Duration::from_secs(240);
const RESULT_PREFIX: &str = "XDSBENCH ";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SizeFigures {
    pods: usize,
    services: usize,
    policies: usize,
    clients: usize,
    /// Resources each client holds when in sync (addresses + authorizations).
    objects_per_client: usize,
    /// YAML in the folder, MiB.
    yaml_mib: f64,
    /// pilot start → serving: read and parse the folder, translate, CA, listen.
    pilot_start_ms: f64,
    /// 10 clients connect (TLS, token) → every one holds every resource.
    first_full_push_ms: f64,
    /// One pod's label changed in its file → the new version held by every client (median);
    /// includes the folder source's 50 ms poll and 100 ms debounce.
    pod_change_to_all_clients_ms: f64,
    pod_change_samples_ms: Vec<f64>,
    pilot_rss_idle_mib: f64,
    pilot_rss_after_push_mib: f64,
    /// (RSS after the pushes − RSS before any client) / clients.
    pilot_mib_per_client: f64,
    pilot_peak_rss_mib: f64,
    pilot_bytes_per_pod: f64,
    /// RSS growth of the client process / (clients × objects).
    client_rss_bytes_per_object: f64,
    /// Encoded resources, names and versions as stored by a client, per object.
    client_stored_bytes_per_object: f64,
    /// Encoded bytes on the wire for one full push to one client, per object.
    wire_bytes_per_object: f64,
    /// CPU time (user + system) pilot spent from the clients' start to the end of the first
    /// full push, seconds.
    #[serde(default)]
    pilot_cpu_first_push_s: f64,
    /// CPU time the bench process (the clients: TLS, decoding, storing) spent meanwhile.
    #[serde(default)]
    client_cpu_first_push_s: f64,
    /// pilot's CPU time per pod change (median), milliseconds.
    #[serde(default)]
    pilot_cpu_pod_change_ms: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    services: usize,
    policies: usize,
    clients: usize,
    sizes: Vec<SizeFigures>,
    not_completed: Vec<String>,
}

/// Run every size in its own process, print the table and write `target/bench/xds.json`.
pub fn run(pilot: &Path, sizes: &[usize]) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut figures = Vec::new();
    let mut not_completed = Vec::new();
    for &pods in sizes {
        println!(
            "xds bench: {pods} pods, {} services, {POLICIES} policies, {} clients ...",
            services_at(pods),
            clients_at(pods)
        );
        match run_child(&exe, pilot, pods) {
            Ok(f) => figures.push(f),
            Err(e) => {
                println!("  {pods} pods: not completed: {e:#}");
                not_completed.push(format!("{pods} pods: {e:#}"));
                break;
            }
        }
    }
    let results = Results {
        services: SERVICES,
        policies: POLICIES,
        clients: CLIENTS,
        sizes: figures,
        not_completed,
    };
    print!("{}", table(&results.sizes));
    let dir = crate::setup::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("xds.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("wrote {}", path.display());
    if results.sizes.is_empty() {
        bail!("no size completed");
    }
    Ok(())
}

fn run_child(exe: &Path, pilot: &Path, pods: usize) -> anyhow::Result<SizeFigures> {
    let mut child = Command::new(exe)
        .args(["bench-xds-size", "--pods", &pods.to_string(), "--pilot"])
        .arg(pilot)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the bench process")?;
    let stdout = child.stdout.take().context("no stdout")?;
    // Larger sizes take longer to write, parse and push.
    let timeout = SIZE_TIMEOUT * (pods / 100_000).max(1) as u32;
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut result = None;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            match line.strip_prefix(RESULT_PREFIX) {
                Some(json) => result = Some(json.to_string()),
                None => println!("  {line}"),
            }
        }
        result
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("took longer than {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let json = reader.join().ok().flatten();
    if !status.success() {
        bail!("bench process failed: {status}");
    }
    let json = json.context("the bench process printed no result")?;
    Ok(serde_json::from_str(&json)?)
}

fn table(sizes: &[SizeFigures]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:>8} {:>6} {:>7} {:>9} {:>10} {:>11} {:>12} {:>10} {:>10} {:>10} {:>11} {:>11} {:>10}",
        "pods",
        "svcs",
        "clients",
        "yaml MiB",
        "start ms",
        "1st push ms",
        "pod chg ms",
        "pilot MiB",
        "MiB/client",
        "peak MiB",
        "pilot B/pod",
        "client B/obj",
        "stored B/obj"
    );
    for f in sizes {
        let _ = writeln!(
            s,
            "{:>8} {:>6} {:>7} {:>9.1} {:>10.0} {:>11.0} {:>12.0} {:>10.1} {:>10.2} {:>10.1} {:>11.0} {:>11.0} {:>10.0}",
            f.pods,
            f.services,
            f.clients,
            f.yaml_mib,
            f.pilot_start_ms,
            f.first_full_push_ms,
            f.pod_change_to_all_clients_ms,
            f.pilot_rss_after_push_mib,
            f.pilot_mib_per_client,
            f.pilot_peak_rss_mib,
            f.pilot_bytes_per_pod,
            f.client_rss_bytes_per_object,
            f.client_stored_bytes_per_object,
        );
    }
    let _ = writeln!(
        s,
        "goals: pod change <= {GOAL_POD_CHANGE_MS} ms at every size; <= {GOAL_MIB_PER_CLIENT} MiB per client; \
         first push <= {GOAL_FIRST_PUSH_MS_AT_100K} ms at 100k pods; 1M pods + 66k services complete"
    );
    for f in sizes {
        let met = |ok: bool| if ok { "met" } else { "NOT met" };
        let _ = writeln!(
            s,
            "{:>8} pods: pod change {}, MiB/client {}{}",
            f.pods,
            met(f.pod_change_to_all_clients_ms <= GOAL_POD_CHANGE_MS),
            met(f.pilot_mib_per_client <= GOAL_MIB_PER_CLIENT),
            if f.pods == 100_000 {
                format!(
                    ", first push {}",
                    met(f.first_full_push_ms <= GOAL_FIRST_PUSH_MS_AT_100K)
                )
            } else {
                String::new()
            }
        );
    }
    s
}

/// What one client has received.
#[derive(Default)]
struct Stats {
    addresses: AtomicU64,
    authorizations: AtomicU64,
    stored_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    /// Versions of the watched pod received.
    watched_updates: AtomicU64,
}

/// A client that keeps every resource as received (name, version, encoded body), which is
/// what a proxy must at least hold, and counts.
struct Storing {
    stats: Arc<Stats>,
    watched: String,
    held: std::collections::HashMap<(bool, String), (String, Vec<u8>)>,
}

impl Handler for Storing {
    fn apply(&mut self, update: Update) -> Result<(), Rejected> {
        let address = update.type_url == ADDRESS_TYPE_URL;
        let counter = if address {
            &self.stats.addresses
        } else {
            &self.stats.authorizations
        };
        for r in update.updated {
            self.stats
                .wire_bytes
                .fetch_add(r.body.len() as u64, Ordering::Relaxed);
            if address && r.name == self.watched {
                self.stats.watched_updates.fetch_add(1, Ordering::Relaxed);
            }
            let r_name_len = r.name.len();
            let size = (r_name_len + r.version.len() + r.body.len()) as u64;
            match self.held.insert((address, r.name), (r.version, r.body)) {
                Some((v, b)) => {
                    // Replaced: the name was counted the first time.
                    let old = (r_name_len + v.len() + b.len()) as u64;
                    self.stats.stored_bytes.fetch_add(size, Ordering::Relaxed);
                    self.stats.stored_bytes.fetch_sub(old, Ordering::Relaxed);
                }
                None => {
                    self.stats.stored_bytes.fetch_add(size, Ordering::Relaxed);
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for name in update.removed {
            if self.held.remove(&(address, name)).is_some() {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

fn rss_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process so far, seconds (`/proc/<pid>/stat`, in clock ticks).
fn cpu_s(pid: &str) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the command name (which may hold spaces): state is field 3, utime 14, stime 15.
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Write the folder: namespaces, services, policies, and pods in files of 1000.
fn write_folder(dir: &Path, pods: usize) -> anyhow::Result<u64> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let mut total = 0u64;
    let mut put = |name: &str, text: String| -> anyhow::Result<()> {
        total += text.len() as u64;
        std::fs::write(dir.join(name), text)?;
        Ok(())
    };
    let mut s = String::new();
    for n in 0..NAMESPACES {
        let _ = writeln!(
            s,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}"
        );
    }
    put("namespaces.yaml", s)?;
    let mut s = String::new();
    let services = services_at(pods);
    for j in 0..services {
        let _ = writeln!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{j}, namespace: ns-{}}}\nspec: {{clusterIP: {}, selector: {{app: svc-{j}}}, ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: grpc, port: 9090, targetPort: 9090}}]}}",
            j % NAMESPACES,
            // 10.96.0.0 onwards: 66k services reach into 10.97.
            std::net::Ipv4Addr::from((10u32 << 24) | (96 << 16) | j as u32),
        );
    }
    put("services.yaml", s)?;
    let mut s = String::new();
    for k in 0..POLICIES {
        // Policy k selects the pods of service 10k + k%10, which live in namespace k%10.
        let app = k * 10 + k % NAMESPACES;
        let _ = writeln!(
            s,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: pol-{k}, namespace: ns-{}}}\nspec:\n  selector: {{matchLabels: {{app: svc-{app}}}}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/ns-{}/sa/svc-{}\"]}}\n    to:\n    - operation: {{ports: [\"8080\"]}}",
            k % NAMESPACES,
            (k + 1) % NAMESPACES,
            (app + 1) % services
        );
    }
    put("policies.yaml", s)?;
    for file in 0..pods.div_ceil(PODS_PER_FILE) {
        let text = pods_file(file, pods, 0);
        put(&format!("pods-{file:04}.yaml"), text)?;
    }
    Ok(total)
}

/// Pods `file*1000 ..`; pod 0 carries `version: v<revision>`.
fn pods_file(file: usize, pods: usize, revision: usize) -> String {
    let mut s = String::new();
    for i in file * PODS_PER_FILE..((file + 1) * PODS_PER_FILE).min(pods) {
        let app = i % services_at(pods);
        let ip = (10u32 << 24) | (128 << 16) | i as u32;
        let version = if i == 0 {
            format!(", version: v{revision}")
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}, uid: uid-{i}, labels: {{app: svc-{app}{version}}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: svc-{app}-5d8f9c, controller: true, uid: rs-{app}}}]}}\nspec: {{nodeName: node-{}, serviceAccountName: svc-{app}}}\nstatus: {{phase: Running, podIP: {}, podIPs: [{{ip: {}}}]}}",
            app % NAMESPACES,
            i % NODES,
            std::net::Ipv4Addr::from(ip),
            std::net::Ipv4Addr::from(ip),
        );
    }
    s
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_pilot(pilot: &Path, config: &Path, state: &Path, port: u16) -> anyhow::Result<Child> {
    let nodes: Vec<String> = (0..CLIENTS).map(|n| format!("node-{n}")).collect();
    let mut cmd = Command::new(pilot);
    cmd.arg("--config-dir")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--debug-addr", "127.0.0.1:0"])
        .args(["--nodes", &nodes.join(",")])
        // The "translated" line tells translation time apart from reading the folder.
        .env("RUST_LOG", "warn,pilot::server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe; pilot dies with this process, even on SIGKILL.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

/// One size, in this (fresh) process; prints the figures as one JSON line.
pub async fn one_size(pilot: PathBuf, pods: usize) -> anyhow::Result<()> {
    let base = crate::setup::target_dir()
        .join("bench")
        .join(format!("xds-{pods}"));
    let config = base.join("config");
    let state = base.join("state");
    let yaml = write_folder(&config, pods)?;
    let _ = std::fs::remove_dir_all(&state);
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let started = Instant::now();
    let mut child = spawn_pilot(&pilot, &config, &state, port)?;
    let pid = child.id().to_string();
    // pilot reads and translates the folder before it listens.
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            break;
        }
        if let Some(s) = child.try_wait()? {
            bail!("pilot exited: {s}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let pilot_start = started.elapsed();
    println!("pilot serving after {pilot_start:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pilot_idle = rss_kib(&pid, "VmRSS:");

    let result = clients(&config, &state, addr, pods, &pid).await;
    let pilot_after = rss_kib(&pid, "VmRSS:");
    let pilot_peak = rss_kib(&pid, "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&base);
    let c = result?;
    let (services, clients) = (services_at(pods), clients_at(pods));
    let objects = services + pods + POLICIES;
    let mut samples = c.changes.clone();
    samples.sort_by(f64::total_cmp);
    let mut change_cpu = c.pilot_cpu_changes_ms.clone();
    change_cpu.sort_by(f64::total_cmp);
    let f = SizeFigures {
        pods,
        services,
        policies: POLICIES,
        clients,
        objects_per_client: objects,
        yaml_mib: yaml as f64 / (1024.0 * 1024.0),
        pilot_start_ms: ms(pilot_start),
        first_full_push_ms: ms(c.first_push),
        pod_change_to_all_clients_ms: samples[samples.len() / 2],
        pod_change_samples_ms: c.changes,
        pilot_rss_idle_mib: mib(pilot_idle),
        pilot_rss_after_push_mib: mib(pilot_after),
        pilot_mib_per_client: mib(pilot_after.saturating_sub(pilot_idle)) / clients as f64,
        pilot_peak_rss_mib: mib(pilot_peak),
        pilot_bytes_per_pod: (pilot_idle * 1024) as f64 / pods as f64,
        client_rss_bytes_per_object: c.client_rss_growth_kib as f64 * 1024.0
            / (clients * objects) as f64,
        client_stored_bytes_per_object: c.stored_bytes as f64 / (clients * objects) as f64,
        wire_bytes_per_object: c.wire_bytes_first as f64 / (clients * objects) as f64,
        pilot_cpu_first_push_s: c.pilot_cpu_first_push_s,
        client_cpu_first_push_s: c.client_cpu_first_push_s,
        pilot_cpu_pod_change_ms: change_cpu[change_cpu.len() / 2],
    };
    println!("{RESULT_PREFIX}{}", serde_json::to_string(&f)?);
    Ok(())
}

struct ClientFigures {
    first_push: Duration,
    changes: Vec<f64>,
    client_rss_growth_kib: u64,
    stored_bytes: u64,
    wire_bytes_first: u64,
    pilot_cpu_first_push_s: f64,
    client_cpu_first_push_s: f64,
    pilot_cpu_changes_ms: Vec<f64>,
}

async fn clients(
    config: &Path,
    state: &Path,
    addr: SocketAddr,
    pods: usize,
    pilot_pid: &str,
) -> anyhow::Result<ClientFigures> {
    let root_pem = std::fs::read_to_string(state.join("root-cert.pem"))?;
    let before = rss_kib("self", "VmRSS:");
    let (pilot_cpu0, self_cpu0) = (cpu_s(pilot_pid), cpu_s("self"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut stats = Vec::new();
    let (services, clients) = (services_at(pods), clients_at(pods));
    for n in 0..clients {
        let cp = ControlPlane {
            address: format!("https://{addr}"),
            root_pem: root_pem.clone(),
            root_file: None,
            server_name: "pilot.istio-system.svc".into(),
            token_file: state.join("tokens").join(format!("node-{n}.token")),
        };
        let s = Arc::new(Stats::default());
        stats.push(s.clone());
        let st = ClientState::new(
            format!("ztunnel~10.0.0.{n}~ztunnel-{n}.istio-system~istio-system.svc.cluster.local"),
            vec![
                ADDRESS_TYPE_URL.to_string(),
                AUTHORIZATION_TYPE_URL.to_string(),
            ],
        );
        let handler = Storing {
            stats: s,
            watched: "uid-0".into(),
            held: Default::default(),
        };
        tasks.push(tokio::spawn(mesh::xds::run(cp, st, Box::new(handler))));
    }
    let in_sync = |s: &Stats| {
        s.addresses.load(Ordering::Relaxed) as usize == services + pods
            && s.authorizations.load(Ordering::Relaxed) as usize == POLICIES
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let what = what.to_string();
        let deadline = Instant::now() + SIZE_TIMEOUT * (pods / 100_000).max(1) as u32;
        let ok = loop {
            if cond() {
                break true;
            }
            if Instant::now() > deadline || std::fs::metadata(format!("/proc/{pilot_pid}")).is_err()
            {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if ok {
            Ok(())
        } else {
            bail!("{what}: timed out")
        }
    };
    // The clients run on the runtime's worker threads; this thread only polls.
    let result = tokio::task::block_in_place(|| -> anyhow::Result<ClientFigures> {
        wait("first full push", &|| stats.iter().all(|s| in_sync(s)))?;
        let first_push = started.elapsed();
        let pilot_cpu_first_push_s = cpu_s(pilot_pid) - pilot_cpu0;
        let client_cpu_first_push_s = cpu_s("self") - self_cpu0;
        println!(
            "{clients} clients in sync after {first_push:?} (CPU: pilot {pilot_cpu_first_push_s:.1} s, clients {client_cpu_first_push_s:.1} s)"
        );
        let wire_bytes_first = stats
            .iter()
            .map(|s| s.wire_bytes.load(Ordering::Relaxed))
            .sum();
        std::thread::sleep(Duration::from_millis(300));
        let after = rss_kib("self", "VmRSS:");
        let stored_bytes = stats
            .iter()
            .map(|s| s.stored_bytes.load(Ordering::Relaxed))
            .sum();
        let mut changes = Vec::new();
        let mut pilot_cpu_changes_ms = Vec::new();
        for revision in 1..=CHANGES {
            let cpu0 = cpu_s(pilot_pid);
            let base: Vec<u64> = stats
                .iter()
                .map(|s| s.watched_updates.load(Ordering::Relaxed))
                .collect();
            let text = pods_file(0, pods, revision);
            let tmp = config.join(".pods-0000.yaml.tmp");
            std::fs::write(&tmp, text)?;
            let t0 = Instant::now();
            std::fs::rename(&tmp, config.join("pods-0000.yaml"))?;
            wait("pod change", &|| {
                stats
                    .iter()
                    .zip(&base)
                    .all(|(s, b)| s.watched_updates.load(Ordering::Relaxed) > *b)
            })?;
            let took = t0.elapsed();
            let cpu = (cpu_s(pilot_pid) - cpu0) * 1000.0;
            println!(
                "pod change {revision}/{CHANGES} at every client after {took:?} (pilot CPU {cpu:.0} ms)"
            );
            changes.push(ms(took));
            pilot_cpu_changes_ms.push(cpu);
            // Let the folder's modification time move on (its resolution may be coarse).
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(ClientFigures {
            first_push,
            changes,
            client_rss_growth_kib: after.saturating_sub(before),
            stored_bytes,
            wire_bytes_first,
            pilot_cpu_first_push_s,
            client_cpu_first_push_s,
            pilot_cpu_changes_ms,
        })
    });
    for t in tasks {
        t.abort();
    }
    result
}
