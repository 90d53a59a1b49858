//! `cargo xtask bench redirect`: what capture costs. The same ztunnel carries the same traffic
//! from a mesh pod to a pod outside the mesh (plain TCP passthrough, so only capture differs)
//! with no capture (the app dials 15001 itself), eBPF capture and nftables capture.
//!
//! The load generator is this binary (`xtask bench-client`) started inside the client pod, in
//! its cgroup and netns, as a real application would run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use testbed::cluster::{Cluster, ClusterSpec, ECHO_PORT, PodDef};

/// What one client run measured.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ClientFigures {
    /// Connect until the server's first byte arrives (µs).
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    /// Sequential new connections (connect, 1 byte each way, close) per second.
    pub connections_per_s: f64,
    /// 1-byte request/response on one open connection (µs).
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    mode: &'static str,
    figures: ClientFigures,
}

pub async fn run(bin: PathBuf, seconds: u64, rounds: usize) -> anyhow::Result<()> {
    testbed::Testbed::check_privileges()?;
    // SAFETY: set before any thread of ours reads the environment for it.
    unsafe { std::env::set_var("ZTUNNEL_BIN", &bin) };
    const MODES: [&str; 3] = ["none", "ebpf", "nftables"];
    // Interleaved rounds, so a burst of noise on this shared machine hits every mode alike;
    // each row is the per-figure median over the rounds.
    let mut runs: Vec<Vec<ClientFigures>> = vec![vec![]; MODES.len()];
    for round in 1..=rounds {
        for (i, mode) in MODES.into_iter().enumerate() {
            let figures = measure(mode, seconds).await?;
            println!("round {round}/{rounds} {mode:>9}: {figures:?}");
            runs[i].push(figures);
        }
    }
    let rows: Vec<Row> = MODES
        .into_iter()
        .zip(runs)
        .map(|(mode, runs)| Row {
            mode,
            figures: median(&runs),
        })
        .collect();
    print_table(&rows);
    let dir = crate::setup::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("redirect.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

async fn measure(mode: &'static str, seconds: u64) -> anyhow::Result<ClientFigures> {
    let spec = |args: Vec<String>| ClusterSpec {
        nodes: 1,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("server", "server", 0, false),
        ],
        services: vec![],
        policies: String::new(),
        ztunnel_args: args,
        ..Default::default()
    };
    // The server's address is only known once the test bed exists; pod IPs are assigned in
    // order, so a first cluster tells it (and is thrown away) for the no-capture target.
    let c = Cluster::start(spec(vec!["--redirect".into(), mode.into()])).await?;
    let server = SocketAddr::new(c.pod_ip("server"), ECHO_PORT);
    let (c, target) = if mode == "none" {
        drop(c);
        let c = Cluster::start(spec(vec![
            "--redirect".into(),
            "none".into(),
            "--no-capture-target".into(),
            server.to_string(),
        ]))
        .await?;
        (c, "127.0.0.1:15001".parse()?)
    } else {
        (c, server)
    };
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["bench-client", "--target", &target.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let child = c.bed.spawn_in_pod_async("client", cmd)?;
    let out = child.wait_with_output().await?;
    anyhow::ensure!(out.status.success(), "bench client failed in mode {mode}");
    let figures: ClientFigures = serde_json::from_slice(&out.stdout)?;
    Ok(figures)
}

fn print_table(rows: &[Row]) {
    let base = rows
        .iter()
        .find(|r| r.mode == "none")
        .map(|r| r.figures.clone())
        .unwrap_or_default();
    println!(
        "\n| capture | connect p50 (µs) | new conn/s | 1-byte RR p50 (µs) | 1-byte RR p99 (µs) |"
    );
    println!("|---|---|---|---|---|");
    for r in rows {
        let f = &r.figures;
        let ratio = |v: f64, b: f64| if b > 0.0 { v / b } else { 0.0 };
        println!(
            "| {} | {:.0} ({:.2}×) | {:.0} ({:.2}×) | {:.1} ({:.2}×) | {:.1} ({:.2}×) |",
            r.mode,
            f.connect_p50_us,
            ratio(f.connect_p50_us, base.connect_p50_us),
            f.connections_per_s,
            ratio(f.connections_per_s, base.connections_per_s),
            f.rr_p50_us,
            ratio(f.rr_p50_us, base.rr_p50_us),
            f.rr_p99_us,
            ratio(f.rr_p99_us, base.rr_p99_us),
        );
    }
    println!(
        "\nRatios are to \"none\" (the app dials ztunnel's 15001 itself); lower is better except new conn/s."
    );
}

/// Each figure's median over the rounds.
fn median(runs: &[ClientFigures]) -> ClientFigures {
    let of = |f: fn(&ClientFigures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    ClientFigures {
        connect_p50_us: of(|f| f.connect_p50_us),
        connect_p99_us: of(|f| f.connect_p99_us),
        connections_per_s: of(|f| f.connections_per_s),
        rr_p50_us: of(|f| f.rr_p50_us),
        rr_p99_us: of(|f| f.rr_p99_us),
    }
}

fn pct(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let i = ((samples.len() as f64 * p) as usize).min(samples.len() - 1);
    samples[i].as_secs_f64() * 1e6
}

/// The load generator, run inside the client pod: one connection at a time, blocking I/O.
pub fn client(target: SocketAddr, seconds: u64) -> anyhow::Result<()> {
    let d = Duration::from_secs(seconds);
    let mut line = String::new();
    // New connections: connect, read the greeting, 1 byte each way, close.
    let mut connects = vec![];
    let start = Instant::now();
    while start.elapsed() < d {
        let t = Instant::now();
        let s = TcpStream::connect(target)?;
        s.set_nodelay(true)?;
        let mut r = BufReader::new(s.try_clone()?);
        line.clear();
        r.read_line(&mut line)?;
        connects.push(t.elapsed());
        (&s).write_all(b"x")?;
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
    }
    let connections_per_s = connects.len() as f64 / start.elapsed().as_secs_f64();
    // Request/response on one connection.
    let s = TcpStream::connect(target)?;
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s.try_clone()?);
    line.clear();
    r.read_line(&mut line)?;
    let mut b = [0u8; 1];
    for _ in 0..200 {
        (&s).write_all(b"x")?;
        r.read_exact(&mut b)?;
    }
    let mut rr = vec![];
    let start = Instant::now();
    while start.elapsed() < d && rr.len() < 500_000 {
        let t = Instant::now();
        (&s).write_all(b"x")?;
        r.read_exact(&mut b)?;
        rr.push(t.elapsed());
    }
    let figures = ClientFigures {
        connect_p50_us: pct(&mut connects, 0.5),
        connect_p99_us: pct(&mut connects, 0.99),
        connections_per_s,
        rr_p50_us: pct(&mut rr, 0.5),
        rr_p99_us: pct(&mut rr, 0.99),
    };
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
