//! `cargo xtask soak`: many concurrent connections through the mesh plus a steady request
//! rate, in cycles (open every connection, hold them with requests flowing, close them, let
//! the ztunnels settle); then no errors, file descriptors back to idle after every cycle, and
//! no RSS growth from the second cycle's settled figure to the last one's (a leak grows cycle
//! over cycle; warm-up and an allocator that keeps freed memory do not). Printed as a table, written to
//! target/bench/soak.json.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use testbed::cluster::{Cluster, ClusterSpec, ECHO_PORT, PodDef};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench::rss_kib;

/// How long the ztunnels get after a cycle's connections close before the "after" figures.
const SETTLE: Duration = Duration::from_secs(10);
/// File descriptors a ztunnel may hold above its idle count after a cycle (pooled HBONE
/// connections to the other node, a log rotation, the xDS stream being redialled).
const FD_SLACK: i64 = 16;
/// RSS the settled figure may grow from cycle to cycle (fragmentation noise), or 5% of it.
const RSS_GROWTH_SLACK_KIB: i64 = 3 * 1024;
/// Connections being opened at once (more would only fill the listeners' backlogs).
const OPENING_AT_ONCE: usize = 256;
/// Request size; the echo app sends it back.
const REQUEST: usize = 64;

pub struct Options {
    pub seconds: u64,
    pub connections: usize,
    /// Requests per second over the held connections, all together.
    pub rate: u64,
    pub cycle_seconds: u64,
}

impl Options {
    /// The short soak of `cargo xtask test`: three cycles, about two minutes in all.
    pub fn ci() -> Options {
        Options {
            seconds: 60,
            connections: 2000,
            rate: 500,
            cycle_seconds: 20,
        }
    }
}

#[derive(Debug, Serialize, Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    fds: u64,
}

#[derive(Debug, Serialize, Default)]
struct Cycle {
    connections_opened: u64,
    connect_errors: u64,
    requests: u64,
    request_errors: u64,
    /// Per ztunnel: the highest figures while loaded, then after the settle time.
    peak: Vec<Sample>,
    after: Vec<Sample>,
}

#[derive(Debug, Serialize)]
struct Results {
    connections: usize,
    requests_per_s: u64,
    cycle_seconds: u64,
    settle_seconds: u64,
    idle: Vec<Sample>,
    cycles: Vec<Cycle>,
    failures: Vec<String>,
}

pub async fn run(bin: PathBuf, o: Options) -> anyhow::Result<()> {
    testbed::Testbed::check_privileges()?;
    // The app ends of every connection live in this process (the client ends in the load
    // generator's); the ztunnels inherit the limit.
    let limit = raise_fd_limit(o.connections as u64 + 4096)?;
    println!("file descriptor limit {limit}");
    // SAFETY: set before any thread of ours reads the environment for it.
    unsafe { std::env::set_var("ZTUNNEL_BIN", &bin) };
    let spec = ClusterSpec {
        nodes: 2,
        pods: vec![
            PodDef::new("soak-client", "client", 0, true),
            PodDef::new("soak-server", "server", 1, true),
        ],
        // The load's sockets are made by this process in the pod's netns (outside its cgroup),
        // which nftables capture sees and cgroup eBPF would not.
        ztunnel_args: vec!["--redirect".into(), "nftables".into()],
        ..Default::default()
    };
    let c = Cluster::start(spec).await?;
    for pod in &c.bed.pods {
        for setting in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.core.somaxconn=4096",
        ] {
            crate::setup::run(
                std::process::Command::new("ip")
                    .args(["netns", "exec", &pod.netns, "sysctl", "-qw", setting]),
            )?;
        }
    }
    let dst = SocketAddr::new(c.pod_ip("soak-server"), ECHO_PORT);
    // One connection through first, so the pool and certificates exist before "idle".
    hold_cycle(&c, dst, 1, 1, Duration::from_secs(1)).await?;
    tokio::time::sleep(SETTLE).await;
    let idle = samples(&c);
    let cycles_wanted = (o.seconds / o.cycle_seconds.max(1)).max(1);
    let mut cycles = Vec::new();
    for n in 1..=cycles_wanted {
        println!(
            "cycle {n}/{cycles_wanted}: {} connections, {} req/s for {} s ...",
            o.connections, o.rate, o.cycle_seconds
        );
        let mut cycle = hold_cycle(
            &c,
            dst,
            o.connections,
            o.rate,
            Duration::from_secs(o.cycle_seconds),
        )
        .await?;
        tokio::time::sleep(SETTLE).await;
        cycle.after = samples(&c);
        cycles.push(cycle);
    }
    let failures = judge(&idle, &cycles, o.connections);
    let results = Results {
        connections: o.connections,
        requests_per_s: o.rate,
        cycle_seconds: o.cycle_seconds,
        settle_seconds: SETTLE.as_secs(),
        idle,
        cycles,
        failures,
    };
    print_table(&results, &c);
    let out = crate::setup::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nwritten to {}", path.display());
    if !results.failures.is_empty() {
        anyhow::bail!("soak failed:\n  {}", results.failures.join("\n  "));
    }
    Ok(())
}

/// What must hold: no errors; after each cycle, descriptors back to idle; the settled RSS of
/// the last cycle not above the first's.
fn judge(idle: &[Sample], cycles: &[Cycle], connections: usize) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, c) in cycles.iter().enumerate() {
        if c.connect_errors + c.request_errors > 0 {
            failures.push(format!(
                "cycle {}: {} connect and {} request errors",
                i + 1,
                c.connect_errors,
                c.request_errors
            ));
        }
        // Pooled HBONE connections (one per CLIENT_MAX_STREAMS streams) stay open until
        // their idle timeout: allowed above idle, but no more after one cycle than the next.
        let pooled = (connections / mesh::hbone::CLIENT_MAX_STREAMS) as i64 + 1;
        let first = &cycles[0].after;
        for (node, after) in c.after.iter().enumerate() {
            let (idle_fds, first_fds) = (idle[node].fds as i64, first[node].fds as i64);
            if after.fds as i64 > (idle_fds + pooled).min(first_fds) + FD_SLACK {
                failures.push(format!(
                    "cycle {}: ztunnel {node} holds {} file descriptors ({idle_fds} when idle, {first_fds} after the first cycle)",
                    i + 1,
                    after.fds,
                ));
            }
        }
    }
    // The first cycle warms up what is kept on purpose (pooled HBONE connections, the
    // allocator's arenas): growth is measured from the second cycle on, when there are three.
    let from = if cycles.len() >= 3 { 1 } else { 0 };
    if let (Some(base), Some(last)) = (cycles.get(from), cycles.last()) {
        for (node, (a, b)) in base.after.iter().zip(&last.after).enumerate() {
            let slack = RSS_GROWTH_SLACK_KIB.max(a.rss_kib as i64 / 20);
            if b.rss_kib as i64 > a.rss_kib as i64 + slack {
                failures.push(format!(
                    "ztunnel {node}: settled RSS grew from {} KiB after cycle {} to {} KiB after the last",
                    a.rss_kib,
                    from + 1,
                    b.rss_kib
                ));
            }
        }
    }
    failures
}

fn print_table(r: &Results, c: &Cluster) {
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "\nsoak: {} connections held per cycle, {} req/s of {REQUEST} B over them, {} s cycles, figures {} s after each cycle",
        r.connections, r.requests_per_s, r.cycle_seconds, r.settle_seconds
    );
    println!(
        "{:<8} {:>7} {:>7} {:>9} {:>7}   per ztunnel: RSS MiB peak/after, fds peak/after",
        "cycle", "conns", "errors", "requests", "errors"
    );
    for (node, s) in r.idle.iter().enumerate() {
        println!(
            "{:<8} {:>7} {:>7} {:>9} {:>7}   {}: RSS {:.1} MiB, {} fds",
            "idle",
            "-",
            "-",
            "-",
            "-",
            c.bed.node(node).name,
            mib(s.rss_kib),
            s.fds
        );
    }
    for (i, cy) in r.cycles.iter().enumerate() {
        let per: Vec<String> = cy
            .peak
            .iter()
            .zip(&cy.after)
            .map(|(p, a)| {
                format!(
                    "{:.1}/{:.1} MiB {}/{} fds",
                    mib(p.rss_kib),
                    mib(a.rss_kib),
                    p.fds,
                    a.fds
                )
            })
            .collect();
        println!(
            "{:<8} {:>7} {:>7} {:>9} {:>7}   {}",
            i + 1,
            cy.connections_opened,
            cy.connect_errors,
            cy.requests,
            cy.request_errors,
            per.join("   ")
        );
    }
    if r.failures.is_empty() {
        println!(
            "no errors; descriptors back to idle after every cycle; no RSS growth across cycles"
        );
    }
}

fn samples(c: &Cluster) -> Vec<Sample> {
    (0..2)
        .map(|n| {
            let pid = c.ztunnel_pid(n);
            Sample {
                rss_kib: rss_kib(pid).unwrap_or(0),
                fds: pid
                    .and_then(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
                    .map(|d| d.count() as u64)
                    .unwrap_or(0),
            }
        })
        .collect()
}

/// Run the load generator (this binary's `soak-client`) in the client pod for one cycle,
/// sampling the ztunnels every half second meanwhile. A process of its own, so that the
/// client ends of the connections do not count against this process's open-file limit.
async fn hold_cycle(
    c: &Cluster,
    dst: SocketAddr,
    connections: usize,
    rate: u64,
    hold: Duration,
) -> anyhow::Result<Cycle> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["soak-client", "--target", &dst.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--seconds", &hold.as_secs().max(1).to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let child = c.bed.spawn_in_pod_async("soak-client", cmd)?;
    let waiting = tokio::spawn(child.wait_with_output());
    let mut peak = vec![Sample::default(); 2];
    while !waiting.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (p, s) in peak.iter_mut().zip(samples(c)) {
            p.rss_kib = p.rss_kib.max(s.rss_kib);
            p.fds = p.fds.max(s.fds);
        }
    }
    let out = waiting.await??;
    anyhow::ensure!(out.status.success(), "soak client failed: {}", out.status);
    let counts: ClientCounts = serde_json::from_slice(&out.stdout)?;
    Ok(Cycle {
        connections_opened: counts.opened,
        connect_errors: counts.connect_errors,
        requests: counts.requests,
        request_errors: counts.request_errors,
        peak,
        after: Vec::new(),
    })
}

/// What the load generator reports (JSON on stdout).
#[derive(Debug, Serialize, serde::Deserialize)]
struct ClientCounts {
    opened: u64,
    connect_errors: u64,
    requests: u64,
    request_errors: u64,
}

/// The load generator, inside the client pod: open `connections` connections to `target`,
/// keep `rate` requests per second flowing over them for `seconds`, then close them all.
pub fn client(
    target: SocketAddr,
    connections: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    raise_fd_limit(connections as u64 + 1024)?;
    let counts = crate::runtime()?.block_on(load(
        target,
        connections,
        rate,
        Duration::from_secs(seconds),
    ));
    println!("{}", serde_json::to_string(&counts)?);
    Ok(())
}

async fn load(dst: SocketAddr, connections: usize, rate: u64, hold: Duration) -> ClientCounts {
    let connect_errors = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let request_errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    // Each connection sends one request per `period`, so that all of them make `rate`.
    let period = Duration::from_secs_f64(connections as f64 / rate.max(1) as f64);
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        let (connect_errors, requests, request_errors, stop, opening) = (
            connect_errors.clone(),
            requests.clone(),
            request_errors.clone(),
            stop.clone(),
            opening.clone(),
        );
        // Spread the first requests over one period.
        let phase = period.mul_f64(i as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let stream = {
                let _slot = opening.acquire().await;
                match open(dst).await {
                    Ok(s) => s,
                    Err(e) => {
                        if connect_errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("connect: {e:#}");
                        }
                        return;
                    }
                }
            };
            if let Err(e) = requests_until(stream, phase, period, &stop, &requests).await
                && request_errors.fetch_add(1, Ordering::Relaxed) < 3
            {
                eprintln!("request: {e:#}");
            }
        }));
    }
    tokio::time::sleep(hold).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let connect_errors = connect_errors.load(Ordering::Relaxed);
    ClientCounts {
        opened: connections as u64 - connect_errors,
        connect_errors,
        requests: requests.load(Ordering::Relaxed),
        request_errors: request_errors.load(Ordering::Relaxed),
    }
}

async fn open(dst: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    let s = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(dst)).await??;
    let mut s = BufReader::new(s);
    let mut greeting = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_line(&mut greeting)).await??;
    anyhow::ensure!(
        greeting.starts_with("pod="),
        "unexpected greeting {greeting:?}"
    );
    Ok(s)
}

async fn requests_until(
    mut s: BufReader<TcpStream>,
    phase: Duration,
    period: Duration,
    stop: &AtomicBool,
    requests: &AtomicU64,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let req = [0x42u8; REQUEST];
    let mut rsp = [0u8; REQUEST];
    // Check often enough that the cycle ends on time, whatever the period.
    let check = Duration::from_millis(200);
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                s.get_mut().write_all(&req).await?;
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut rsp)).await??;
                anyhow::ensure!(rsp == req, "echo differs");
                requests.fetch_add(1, Ordering::Relaxed);
            }
            _ = tokio::time::sleep(check) => {}
        }
    }
    s.get_mut().shutdown().await?;
    Ok(())
}

/// Raise this process's open-file limit to at least `wanted` (root may raise the hard limit).
fn raise_fd_limit(wanted: u64) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if lim.rlim_cur >= wanted {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: lim.rlim_max.max(wanted),
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!(
            "cannot raise the open-file limit from {} to {wanted}: {e} (run as root or lower --connections)",
            lim.rlim_cur
        );
    }
    Ok(wanted)
}
