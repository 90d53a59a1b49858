//! `cargo xtask bench`: direct TCP against the mesh on the same test bed, in one run, so the
//! figures are ratios to a baseline measured on the same machine at the same time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use testbed::cluster::{Cluster, ClusterSpec, ControlPlaneMode, ECHO_PORT, PodDef, SINK_PORT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Serialize, Default, Clone)]
struct PathFigures {
    throughput_gbit_s: f64,
    /// CPU time of each ztunnel (client side, server side) per GiB carried (zero on the direct
    /// path).
    ztunnel_cpu_ms_per_gib: [f64; 2],
    /// CPU time of each ztunnel (client side, server side) per 1-byte round trip.
    ztunnel_cpu_us_per_round_trip: [f64; 2],
    /// CPU time of each ztunnel (client side, server side) per new connection (with its
    /// 1-byte exchange).
    ztunnel_cpu_us_per_connection: [f64; 2],
    latency_p50_us: f64,
    latency_p99_us: f64,
    latency_samples: usize,
    connections_per_s: f64,
}

#[derive(Debug, Serialize)]
struct ZtunnelFigures {
    node: String,
    idle_rss_kib: u64,
    load_rss_kib: u64,
    load_cpu_percent: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    seconds_per_measurement: u64,
    rounds: usize,
    ztunnel_args: Vec<String>,
    direct: PathFigures,
    mesh: PathFigures,
    /// The mesh again, with both ztunnels restarted with `--worker-threads=1` (absent when the
    /// run's own ztunnel arguments choose the thread count).
    mesh_one_thread: Option<PathFigures>,
    /// The mesh again, with both ztunnels restarted with `--runtime=shared` (the multi-thread
    /// runtime; absent when the run's own ztunnel arguments choose the runtime). The default,
    /// `mesh`, is thread-per-core.
    mesh_shared: Option<PathFigures>,
    throughput_ratio: f64,
    added_latency_p50_us: f64,
    added_latency_p99_us: f64,
    connection_rate_ratio: f64,
    load: String,
    ztunnels: Vec<ZtunnelFigures>,
}

pub async fn run(
    bin: PathBuf,
    seconds: u64,
    rounds_wanted: usize,
    ztunnel_args: Vec<String>,
) -> anyhow::Result<()> {
    testbed::Testbed::check_privileges()?;
    // SAFETY: set before any thread of ours reads the environment for it.
    unsafe {
        std::env::set_var("ZTUNNEL_BIN", &bin);
        std::env::set_var("PILOT_BIN", crate::setup::pilot_beside(&bin));
    }
    let spec = ClusterSpec {
        // As deployed: ztunnels are pilot's xDS and CA clients (pilot runs on node 0 and idles
        // once it has pushed).
        control_plane: ControlPlaneMode::Pilot,
        nodes: 2,
        pods: vec![
            PodDef::new("mesh-client", "client", 0, true),
            PodDef::new("plain-client", "plain", 0, false),
            PodDef::new("mesh-server", "server", 1, true),
            PodDef::new("plain-server", "plain", 1, false),
        ],
        services: vec![],
        policies: String::new(),
        // The load generator makes its sockets in the test process (netns only, outside the
        // pods' cgroups), which nftables captures and cgroup eBPF programs would not.
        ztunnel_args: ["--redirect".to_string(), "nftables".to_string()]
            .into_iter()
            .chain(ztunnel_args.iter().cloned())
            .collect(),
        ..Default::default()
    };
    let mut c = Cluster::start(spec).await?;
    // Thousands of short connections per round from one pod to one destination: with the
    // defaults, TIME_WAIT holds each port for 60 s and later rounds measure port exhaustion.
    for pod in &c.bed.pods {
        for setting in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ] {
            crate::setup::run(
                std::process::Command::new("ip")
                    .args(["netns", "exec", &pod.netns, "sysctl", "-qw", setting]),
            )?;
        }
    }
    let secs = Duration::from_secs(seconds);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle: Vec<u64> = (0..2)
        .map(|n| rss_kib(c.ztunnel_pid(n)).unwrap_or(0))
        .collect();

    // Direct, mesh (thread-per-core by default), mesh on one thread and mesh on tokio's
    // multi-thread runtime alternate, round after round, and each figure is the median of its
    // rounds: a ratio then compares measurements taken seconds apart, not minutes. The other
    // variants restart both ztunnels (their pods stay enrolled).
    let default_args = c.spec.ztunnel_args.clone();
    let mut variants = vec![("direct", None), ("mesh", Some(default_args.clone()))];
    if !ztunnel_args
        .iter()
        .any(|a| a.starts_with("--worker-threads"))
    {
        let mut one = default_args.clone();
        one.push("--worker-threads=1".into());
        if !ztunnel_args.iter().any(|a| a.starts_with("--runtime")) {
            one.push("--runtime=shared".into());
        }
        variants.push(("mesh, --worker-threads=1", Some(one)));
    }
    if !ztunnel_args.iter().any(|a| a.starts_with("--runtime")) {
        let mut shared = default_args.clone();
        shared.push("--runtime=shared".into());
        variants.push(("mesh, --runtime=shared", Some(shared)));
    }
    let mut rounds: Vec<Vec<PathFigures>> = vec![vec![]; variants.len()];
    for round in 1..=rounds_wanted {
        for (i, (name, args)) in variants.iter().enumerate() {
            let (client, server) = match args {
                None => ("plain-client", "plain-server"),
                Some(args) => {
                    use_ztunnel_args(&mut c, args).await?;
                    ("mesh-client", "mesh-server")
                }
            };
            println!("round {round}/{rounds_wanted}: {name} ({client} -> {server}) ...");
            rounds[i].push(measure_path(&c, client, c.pod_ip(server), secs).await?);
        }
    }
    use_ztunnel_args(&mut c, &default_args).await?;
    let medians: Vec<(&str, PathFigures)> = variants
        .iter()
        .zip(&rounds)
        .map(|((name, _), r)| (*name, median(r)))
        .collect();
    let variant = |wanted: &str| {
        medians
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, m)| m.clone())
    };
    let (direct, mesh) = (
        variant("direct").unwrap_or_default(),
        variant("mesh").unwrap_or_default(),
    );
    let mesh_one_thread = variant("mesh, --worker-threads=1");
    let mesh_shared = variant("mesh, --runtime=shared");

    println!("measuring ztunnel CPU and memory at 1000 req/s of 1 KiB ...");
    let load_for = secs.max(Duration::from_secs(3));
    let before: Vec<u64> = (0..2)
        .map(|n| cpu_ticks(c.ztunnel_pid(n)).unwrap_or(0))
        .collect();
    let started = Instant::now();
    steady_load(
        &c,
        "mesh-client",
        SocketAddr::new(c.pod_ip("mesh-server"), ECHO_PORT),
        load_for,
    )
    .await?;
    let wall = started.elapsed().as_secs_f64();
    let ticks_per_s = clock_ticks() as f64;
    let ztunnels: Vec<ZtunnelFigures> = (0..2)
        .map(|n| ZtunnelFigures {
            node: c.bed.node(n).name.clone(),
            idle_rss_kib: idle[n],
            load_rss_kib: rss_kib(c.ztunnel_pid(n)).unwrap_or(0),
            load_cpu_percent: (cpu_ticks(c.ztunnel_pid(n)).unwrap_or(0) - before[n]) as f64
                / ticks_per_s
                / wall
                * 100.0,
        })
        .collect();

    let results = Results {
        seconds_per_measurement: seconds,
        rounds: rounds_wanted,
        ztunnel_args,
        throughput_ratio: mesh.throughput_gbit_s / direct.throughput_gbit_s,
        added_latency_p50_us: mesh.latency_p50_us - direct.latency_p50_us,
        added_latency_p99_us: mesh.latency_p99_us - direct.latency_p99_us,
        connection_rate_ratio: mesh.connections_per_s / direct.connections_per_s,
        load: "4 connections x 250 req/s, 1 KiB request echoed".into(),
        direct,
        mesh,
        mesh_one_thread,
        mesh_shared,
        ztunnels,
    };
    print_table(&results);
    let out = crate::setup::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("hbone.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

fn print_table(r: &Results) {
    // One column per mesh variant, each followed by its ratio or difference to direct.
    let mesh: Vec<(&str, &PathFigures)> = std::iter::once(("mesh", &r.mesh))
        .chain(r.mesh_one_thread.iter().map(|m| ("1 thread", m)))
        .chain(r.mesh_shared.iter().map(|m| ("multi-thr", m)))
        .collect();
    let d = &r.direct;
    print!(
        "\n{:<46} {:>10}",
        "pod -> pod across nodes (medians)", "direct"
    );
    for (name, _) in &mesh {
        print!(" {:>10} {:>10}", name, "vs direct");
    }
    println!();
    let row = |label: &str, direct: Option<f64>, f: &dyn Fn(&PathFigures) -> f64, cmp: Cmp| {
        match direct {
            Some(v) => print!("{label:<46} {v:>10.1}"),
            None => print!("{label:<46} {:>10}", "-"),
        }
        for (_, m) in &mesh {
            let v = f(m);
            match (cmp, direct) {
                (Cmp::Ratio, Some(dv)) => print!(" {v:>10.1} {:>9.0}%", v / dv * 100.0),
                (Cmp::Added, Some(dv)) => print!(" {v:>10.1} {:>+10.1}", v - dv),
                _ => print!(" {v:>10.1} {:>10}", ""),
            }
        }
        println!();
    };
    row(
        "single-stream throughput (Gbit/s)",
        Some(d.throughput_gbit_s),
        &|p| p.throughput_gbit_s,
        Cmp::Ratio,
    );
    for (side, i) in [("client-side", 0), ("server-side", 1)] {
        row(
            &format!("  {side} ztunnel CPU per GiB (ms)"),
            None,
            &|p| p.ztunnel_cpu_ms_per_gib[i],
            Cmp::None,
        );
    }
    row(
        "  both ztunnels' CPU per GiB (ms)",
        None,
        &|p| p.ztunnel_cpu_ms_per_gib.iter().sum(),
        Cmp::None,
    );
    row(
        "1-byte round trip p50 (µs)  [added]",
        Some(d.latency_p50_us),
        &|p| p.latency_p50_us,
        Cmp::Added,
    );
    row(
        "1-byte round trip p99 (µs)  [added]",
        Some(d.latency_p99_us),
        &|p| p.latency_p99_us,
        Cmp::Added,
    );
    for (side, i) in [("client-side", 0), ("server-side", 1)] {
        row(
            &format!("  {side} ztunnel CPU per round trip (µs)"),
            None,
            &|p| p.ztunnel_cpu_us_per_round_trip[i],
            Cmp::None,
        );
    }
    row(
        "  both ztunnels' CPU per round trip (µs)",
        None,
        &|p| p.ztunnel_cpu_us_per_round_trip.iter().sum(),
        Cmp::None,
    );
    row(
        "new connection + 1-byte exchange per second",
        Some(d.connections_per_s),
        &|p| p.connections_per_s,
        Cmp::Ratio,
    );
    for (side, i) in [("client-side", 0), ("server-side", 1)] {
        row(
            &format!("  {side} ztunnel CPU per connection (µs)"),
            None,
            &|p| p.ztunnel_cpu_us_per_connection[i],
            Cmp::None,
        );
    }
    println!("\nztunnel at 1000 req/s of 1 KiB ({}):", r.load);
    for z in &r.ztunnels {
        println!(
            "  {:<8} idle RSS {:>6.1} MiB   under load RSS {:>6.1} MiB   CPU {:>5.1}% of one core",
            z.node,
            z.idle_rss_kib as f64 / 1024.0,
            z.load_rss_kib as f64 / 1024.0,
            z.load_cpu_percent
        );
    }
}

/// How a mesh figure is compared with direct's in the table.
#[derive(Clone, Copy)]
enum Cmp {
    Ratio,
    Added,
    None,
}

/// Restart both ztunnels with `args` unless they already run with them.
async fn use_ztunnel_args(c: &mut Cluster, args: &[String]) -> anyhow::Result<()> {
    if c.spec.ztunnel_args == args {
        return Ok(());
    }
    c.spec.ztunnel_args = args.to_vec();
    for node in 0..2 {
        c.restart_ztunnel(node).await?;
    }
    // Let the restarted ztunnels finish enrolling before anything is measured.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

async fn measure_path(
    c: &Cluster,
    client: &str,
    ip: std::net::IpAddr,
    secs: Duration,
) -> anyhow::Result<PathFigures> {
    let cpu = || ztunnel_cpu_seconds(c);
    let before = cpu();
    let (bytes, gbit_s) = throughput(c, client, SocketAddr::new(ip, SINK_PORT), secs).await?;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let after = cpu();
    let per_gib = [0, 1].map(|n| (after[n] - before[n]) * 1e3 / gib);
    let before = cpu();
    let lat = latency(c, client, SocketAddr::new(ip, ECHO_PORT), secs).await?;
    let after = cpu();
    let per_rtt = [0, 1].map(|n| (after[n] - before[n]) * 1e6 / lat.latency_samples.max(1) as f64);
    let before = cpu();
    let started = Instant::now();
    let connections_per_s =
        connection_rate(c, client, SocketAddr::new(ip, ECHO_PORT), secs).await?;
    let connections = (connections_per_s * started.elapsed().as_secs_f64()).max(1.0);
    let after = cpu();
    let per_connection = [0, 1].map(|n| (after[n] - before[n]) * 1e6 / connections);
    Ok(PathFigures {
        throughput_gbit_s: gbit_s,
        ztunnel_cpu_ms_per_gib: per_gib,
        ztunnel_cpu_us_per_round_trip: per_rtt,
        ztunnel_cpu_us_per_connection: per_connection,
        connections_per_s,
        ..lat
    })
}

/// Field by field median of several rounds.
fn median(rounds: &[PathFigures]) -> PathFigures {
    let mid = |f: fn(&PathFigures) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    PathFigures {
        throughput_gbit_s: mid(|p| p.throughput_gbit_s),
        ztunnel_cpu_ms_per_gib: [
            mid(|p| p.ztunnel_cpu_ms_per_gib[0]),
            mid(|p| p.ztunnel_cpu_ms_per_gib[1]),
        ],
        ztunnel_cpu_us_per_round_trip: [
            mid(|p| p.ztunnel_cpu_us_per_round_trip[0]),
            mid(|p| p.ztunnel_cpu_us_per_round_trip[1]),
        ],
        ztunnel_cpu_us_per_connection: [
            mid(|p| p.ztunnel_cpu_us_per_connection[0]),
            mid(|p| p.ztunnel_cpu_us_per_connection[1]),
        ],
        latency_p50_us: mid(|p| p.latency_p50_us),
        latency_p99_us: mid(|p| p.latency_p99_us),
        latency_samples: rounds.iter().map(|p| p.latency_samples).sum(),
        connections_per_s: mid(|p| p.connections_per_s),
    }
}

/// CPU seconds (user + system) each ztunnel (node 0, node 1) has used so far.
fn ztunnel_cpu_seconds(c: &Cluster) -> [f64; 2] {
    [0, 1].map(|n| cpu_ticks(c.ztunnel_pid(n)).unwrap_or(0) as f64 / clock_ticks() as f64)
}

/// Stream as fast as possible for `d`; the sink answers with what it received.
/// Returns (bytes, Gbit/s).
async fn throughput(
    c: &Cluster,
    pod: &str,
    dst: SocketAddr,
    d: Duration,
) -> anyhow::Result<(u64, f64)> {
    let s = c.pod_sockets(pod)?.connect(dst).await?;
    let (r, mut w) = s.into_split();
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    while start.elapsed() < d {
        w.write_all(&chunk).await?;
    }
    w.shutdown().await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let bytes: u64 = line.trim().parse()?;
    Ok((
        bytes,
        bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9,
    ))
}

/// 1-byte request, 1-byte response, one at a time on one connection.
async fn latency(
    c: &Cluster,
    pod: &str,
    dst: SocketAddr,
    d: Duration,
) -> anyhow::Result<PathFigures> {
    let s = c.pod_sockets(pod)?.connect(dst).await?;
    let mut s = BufReader::new(s);
    let mut greeting = String::new();
    s.read_line(&mut greeting).await?;
    let mut samples = Vec::with_capacity(200_000);
    let mut byte = [0u8; 1];
    // Warm up, so the first samples do not measure connection setup.
    for _ in 0..100 {
        s.get_mut().write_all(b"x").await?;
        s.read_exact(&mut byte).await?;
    }
    let start = Instant::now();
    while start.elapsed() < d && samples.len() < 200_000 {
        let t = Instant::now();
        s.get_mut().write_all(b"x").await?;
        s.read_exact(&mut byte).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    Ok(PathFigures {
        latency_p50_us: pct(0.50).as_secs_f64() * 1e6,
        latency_p99_us: pct(0.99).as_secs_f64() * 1e6,
        latency_samples: samples.len(),
        ..Default::default()
    })
}

/// New connection, 1 byte each way, close; 4 loops in parallel.
async fn connection_rate(
    c: &Cluster,
    pod: &str,
    dst: SocketAddr,
    d: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let sockets = c.pod_sockets(pod)?;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < d {
                let s = sockets.connect(dst).await?;
                let answer = testbed::cluster::exchange_on(s, b"x").await?;
                anyhow::ensure!(answer.ends_with(b"x"), "bad answer");
                n += 1;
            }
            Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// 1000 requests/s of 1 KiB, echoed, on 4 connections.
async fn steady_load(c: &Cluster, pod: &str, dst: SocketAddr, d: Duration) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = c.pod_sockets(pod)?.connect(dst).await?;
        tasks.push(tokio::spawn(async move {
            let mut s = BufReader::new(s);
            let mut greeting = String::new();
            s.read_line(&mut greeting).await?;
            let req = vec![0x42u8; 1024];
            let mut rsp = vec![0u8; 1024];
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            let start = Instant::now();
            while start.elapsed() < d {
                tick.tick().await;
                s.get_mut().write_all(&req).await?;
                s.read_exact(&mut rsp).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

pub(crate) fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub(crate) fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

pub(crate) fn clock_ticks() -> i64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
}
