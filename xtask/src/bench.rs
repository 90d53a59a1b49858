//! `cargo xtask bench`: direct TCP against the mesh on the same test bed, in one run, so the
//! figures are ratios to a baseline measured on the same machine at the same time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use testbed::cluster::{Cluster, ClusterSpec, ECHO_PORT, PodDef, SINK_PORT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Serialize, Default, Clone)]
struct PathFigures {
    throughput_gbit_s: f64,
    /// CPU time of both ztunnels per GiB carried (zero on the direct path).
    ztunnel_cpu_ms_per_gib: f64,
    /// CPU time of both ztunnels per 1-byte round trip.
    ztunnel_cpu_us_per_round_trip: f64,
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
    unsafe { std::env::set_var("ZTUNNEL_BIN", &bin) };
    let spec = ClusterSpec {
        control_plane: Default::default(),
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
    let c = Cluster::start(spec).await?;
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

    // Direct and mesh alternate, round after round, and each figure is the median of its
    // rounds: a ratio then compares measurements taken seconds apart, not minutes.
    let mut rounds: [Vec<PathFigures>; 2] = [vec![], vec![]];
    for round in 1..=rounds_wanted {
        for (i, (name, client, server)) in [
            ("direct", "plain-client", "plain-server"),
            ("mesh", "mesh-client", "mesh-server"),
        ]
        .into_iter()
        .enumerate()
        {
            println!("round {round}/{rounds_wanted}: {name} ({client} -> {server}) ...");
            rounds[i].push(measure_path(&c, client, c.pod_ip(server), secs).await?);
        }
    }
    let [direct, mesh] = rounds.map(|r| median(&r));

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
    println!(
        "\n{:<44} {:>12} {:>12} {:>12}",
        "pod -> pod across nodes (medians)", "direct", "mesh", "mesh/direct"
    );
    println!(
        "{:<44} {:>12.2} {:>12.2} {:>11.0}%",
        "single-stream throughput (Gbit/s)",
        r.direct.throughput_gbit_s,
        r.mesh.throughput_gbit_s,
        r.throughput_ratio * 100.0
    );
    println!(
        "{:<44} {:>12} {:>12.0}",
        "  ztunnel CPU per GiB carried (ms)", "-", r.mesh.ztunnel_cpu_ms_per_gib
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>+11.1}",
        "1-byte round trip p50 (µs)  [added]",
        r.direct.latency_p50_us,
        r.mesh.latency_p50_us,
        r.added_latency_p50_us
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>+11.1}",
        "1-byte round trip p99 (µs)  [added]",
        r.direct.latency_p99_us,
        r.mesh.latency_p99_us,
        r.added_latency_p99_us
    );
    println!(
        "{:<44} {:>12} {:>12.1}",
        "  ztunnel CPU per round trip (µs)", "-", r.mesh.ztunnel_cpu_us_per_round_trip
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>11.0}%",
        "new connection + 1-byte exchange per second",
        r.direct.connections_per_s,
        r.mesh.connections_per_s,
        r.connection_rate_ratio * 100.0
    );
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

async fn measure_path(
    c: &Cluster,
    client: &str,
    ip: std::net::IpAddr,
    secs: Duration,
) -> anyhow::Result<PathFigures> {
    let cpu = || ztunnel_cpu_seconds(c);
    let before = cpu();
    let (bytes, gbit_s) = throughput(c, client, SocketAddr::new(ip, SINK_PORT), secs).await?;
    let per_gib = (cpu() - before) * 1e3 / (bytes as f64 / (1u64 << 30) as f64);
    let before = cpu();
    let lat = latency(c, client, SocketAddr::new(ip, ECHO_PORT), secs).await?;
    let per_rtt = (cpu() - before) * 1e6 / lat.latency_samples.max(1) as f64;
    Ok(PathFigures {
        throughput_gbit_s: gbit_s,
        ztunnel_cpu_ms_per_gib: per_gib,
        ztunnel_cpu_us_per_round_trip: per_rtt,
        connections_per_s: connection_rate(c, client, SocketAddr::new(ip, ECHO_PORT), secs).await?,
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
        ztunnel_cpu_ms_per_gib: mid(|p| p.ztunnel_cpu_ms_per_gib),
        ztunnel_cpu_us_per_round_trip: mid(|p| p.ztunnel_cpu_us_per_round_trip),
        latency_p50_us: mid(|p| p.latency_p50_us),
        latency_p99_us: mid(|p| p.latency_p99_us),
        latency_samples: rounds.iter().map(|p| p.latency_samples).sum(),
        connections_per_s: mid(|p| p.connections_per_s),
    }
}

/// CPU seconds (user + system) both ztunnels have used so far.
fn ztunnel_cpu_seconds(c: &Cluster) -> f64 {
    let ticks: u64 = (0..2).filter_map(|n| cpu_ticks(c.ztunnel_pid(n))).sum();
    ticks as f64 / clock_ticks() as f64
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
