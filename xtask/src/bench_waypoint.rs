//! `cargo xtask bench waypoint`: HTTP requests direct, through the mesh at L4 (ztunnels only)
//! and through the mesh at L7 (a waypoint), HTTP/1.1 keep-alive and HTTP/2, on one test bed in
//! one run, so every figure has its baseline measured beside it. A fourth path goes through the
//! same waypoint to a service with a realistic policy set (retries, outlier detection, one L7
//! ALLOW policy, a header-hash load balancer), so the cost of policy is a ratio to plain routing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use testbed::cluster::{
    Cluster, ClusterSpec, ControlPlaneMode, HTTP_PORT, PodDef, ServiceDef, waypoint_gateway_yaml,
};

use crate::bench::{clock_ticks, cpu_ticks, rss_kib};

const L4_VIP: [u8; 4] = [10, 96, 30, 1];
const L7_VIP: [u8; 4] = [10, 96, 30, 2];
const POLICY_VIP: [u8; 4] = [10, 96, 30, 3];
const WAYPOINT_VIP: [u8; 4] = [10, 96, 30, 9];
/// The request rate of the latency and CPU figures.
const FIXED_RATE: f64 = 1000.0;
/// Connections that carry the fixed rate.
const FIXED_CONNECTIONS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Proto {
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Path {
    Direct,
    MeshL4,
    MeshL7,
    /// Through the waypoint, to the service with [`POLICY_YAML`].
    MeshL7Policy,
}

impl Path {
    fn through_waypoint(self) -> bool {
        matches!(self, Path::MeshL7 | Path::MeshL7Policy)
    }
}

/// The realistic policy set of the `MeshL7Policy` path: retries on 5xx and connect failures with
/// a per-try timeout, outlier detection, a consistent hash on a header, and one L7 ALLOW policy
/// matching the client's namespace, method and path (so every request is evaluated and allowed).
const POLICY_YAML: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-policy, namespace: demo}
spec:
  hosts: [web-policy]
  http:
  - route: [{destination: {host: web-policy}}]
    timeout: 5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx,connect-failure,refused-stream}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-policy, namespace: demo}
spec:
  host: web-policy
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-policy-allow, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: '', name: web-policy}]
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [demo]}}]
    to: [{operation: {methods: [GET, HEAD], paths: [/bench, /healthz]}}]
---
";

#[derive(Debug, Clone, Default, Serialize)]
struct Figures {
    rps_1_connection: f64,
    rps_16_connections: f64,
    p50_us_at_1000: f64,
    p99_us_at_1000: f64,
    /// The rate really achieved during the fixed-rate run.
    achieved_rate: f64,
    /// Cores the waypoint used per 1000 req/s (MeshL7 only).
    waypoint_cores_per_1000: f64,
    /// Cores both ztunnels used per 1000 req/s (mesh paths only).
    ztunnel_cores_per_1000: f64,
    /// The waypoint's CPU time per request with one connection and one request in flight
    /// (MeshL7 only): every request pays its own wake-ups, so unlike the fixed-rate figure it
    /// does not fall when a busy machine makes requests queue up and share them.
    waypoint_cpu_us_per_request_1_connection: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    proto: Proto,
    path: Path,
    figures: Figures,
}

#[derive(Debug, Serialize)]
struct Results {
    seconds_per_measurement: u64,
    rounds: usize,
    response_bytes: usize,
    rows: Vec<Row>,
    waypoint_idle_rss_kib: u64,
    waypoint_load_rss_kib: u64,
}

/// One client connection of either protocol.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn open(c: &Cluster, pod: &str, dst: SocketAddr, proto: Proto) -> anyhow::Result<Self> {
        let tcp = TokioIo::new(c.connect_from(pod, dst).await?);
        Ok(match proto {
            Proto::Http1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(tcp).await?;
                tokio::spawn(conn);
                Sender::H1(send)
            }
            Proto::Http2 => {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), tcp).await?;
                tokio::spawn(conn);
                Sender::H2(send)
            }
        })
    }

    /// One request; returns the response body's size.
    async fn get(&mut self, req: Request<Empty<Bytes>>) -> anyhow::Result<usize> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
        Ok(resp.into_body().collect().await?.to_bytes().len())
    }
}

/// The echo app answers with the request's headers: a padding header makes the answer ~1 KiB.
fn request(authority: &str, pad: &str) -> anyhow::Result<Request<Empty<Bytes>>> {
    Ok(Request::get(format!("http://{authority}/bench"))
        .header("x-pad", pad)
        // The policy path's hash key; the other paths carry it too, so the requests are alike.
        .header("x-user", "bench-user")
        .body(Empty::new())?)
}

pub async fn run(bin: PathBuf, seconds: u64, rounds: usize) -> anyhow::Result<()> {
    testbed::Testbed::check_privileges()?;
    // SAFETY: set before any thread of ours reads the environment for them.
    unsafe {
        std::env::set_var("ZTUNNEL_BIN", &bin);
        std::env::set_var("PILOT_BIN", crate::setup::pilot_beside(&bin));
        std::env::set_var("WAYPOINT_BIN", crate::setup::waypoint_beside(&bin));
    }
    let mut l4 = ServiceDef::echo();
    l4.name = "web-l4".into();
    l4.vip = L4_VIP.into();
    l4.vip6 = None;
    l4.port = 80;
    l4.target_port = HTTP_PORT;
    l4.app = "web".into();
    l4.port_name = "http".into();
    let mut l7 = l4.clone().use_waypoint("waypoint");
    l7.name = "web-l7".into();
    l7.vip = L7_VIP.into();
    let mut policy = l7.clone();
    policy.name = "web-policy".into();
    policy.vip = POLICY_VIP.into();
    let spec = ClusterSpec {
        control_plane: ControlPlaneMode::Pilot,
        nodes: 2,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::new("plain-client", "plain", 0, false),
            PodDef::waypoint("waypoint", "waypoint", 0),
            PodDef::new("server", "web", 1, true),
            PodDef::new("plain-server", "plainweb", 1, false),
        ],
        services: vec![
            l4,
            l7,
            policy,
            ServiceDef::waypoint("waypoint", WAYPOINT_VIP.into()),
        ],
        pilot_yaml: waypoint_gateway_yaml("waypoint", "demo", "service") + POLICY_YAML,
        start_waypoints: true,
        ..Default::default()
    };
    let c = Cluster::start(spec).await?;
    let waypoint_pid = c.waypoint_pid("waypoint");
    // The response echoes the request's headers: pad it to about 1 KiB.
    let pad = "p".repeat(760);
    let targets = [
        (
            Path::Direct,
            "plain-client",
            SocketAddr::new(c.pod_ip("plain-server"), HTTP_PORT),
        ),
        (Path::MeshL4, "client", SocketAddr::from((L4_VIP, 80))),
        (Path::MeshL7, "client", SocketAddr::from((L7_VIP, 80))),
        (
            Path::MeshL7Policy,
            "client",
            SocketAddr::from((POLICY_VIP, 80)),
        ),
    ];
    // One request per path first: the config is there and the answer has the expected size.
    let mut response_bytes = 0;
    for (path, pod, dst) in targets {
        let mut s = Sender::open(&c, pod, dst, Proto::Http1).await?;
        response_bytes = s
            .get(request(&dst.to_string(), &pad)?)
            .await
            .map_err(|e| anyhow::anyhow!("{path:?}: the first request to {dst} failed: {e}"))?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waypoint_idle_rss_kib = rss_kib(waypoint_pid).unwrap_or(0);
    let mut waypoint_load_rss_kib = 0;
    let d = Duration::from_secs(seconds);
    let mut samples: Vec<(Proto, Path, Vec<Figures>)> = vec![];
    for round in 0..rounds {
        println!("round {}/{rounds}", round + 1);
        for proto in [Proto::Http1, Proto::Http2] {
            // Interleaved: the four paths of one protocol one after another in each round.
            for (path, pod, dst) in targets {
                let cpu0 = cpu_ns(waypoint_pid);
                let started = Instant::now();
                let rps_1_connection = closed_loop(&c, pod, dst, proto, 1, d, &pad).await?;
                let requests = rps_1_connection * started.elapsed().as_secs_f64();
                let cpu_1 = match (cpu0, cpu_ns(waypoint_pid)) {
                    (Some(a), Some(b)) if path.through_waypoint() && requests > 0.0 => {
                        (b - a) as f64 / 1000.0 / requests
                    }
                    _ => 0.0,
                };
                let mut f = Figures {
                    rps_1_connection,
                    rps_16_connections: closed_loop(&c, pod, dst, proto, 16, d, &pad).await?,
                    waypoint_cpu_us_per_request_1_connection: cpu_1,
                    ..Default::default()
                };
                let ztunnels = || {
                    (0..2)
                        .filter_map(|n| cpu_ticks(c.ztunnel_pid(n)))
                        .sum::<u64>()
                };
                let (w0, z0) = (cpu_ticks(waypoint_pid).unwrap_or(0), ztunnels());
                let started = Instant::now();
                let (latencies, done) = fixed_rate(&c, pod, dst, proto, d, &pad).await?;
                let elapsed = started.elapsed().as_secs_f64();
                let (w1, z1) = (cpu_ticks(waypoint_pid).unwrap_or(0), ztunnels());
                if path.through_waypoint() {
                    waypoint_load_rss_kib =
                        waypoint_load_rss_kib.max(rss_kib(waypoint_pid).unwrap_or(0));
                }
                let ticks = clock_ticks() as f64;
                f.achieved_rate = done as f64 / elapsed;
                let per_1000 = |t: u64| t as f64 / ticks / elapsed * 1000.0 / f.achieved_rate;
                if path.through_waypoint() {
                    f.waypoint_cores_per_1000 = per_1000(w1 - w0);
                }
                if path != Path::Direct {
                    f.ztunnel_cores_per_1000 = per_1000(z1 - z0);
                }
                (f.p50_us_at_1000, f.p99_us_at_1000) = percentiles(latencies);
                match samples
                    .iter_mut()
                    .find(|(p, q, _)| *p == proto && *q == path)
                {
                    Some((_, _, v)) => v.push(f),
                    None => samples.push((proto, path, vec![f])),
                }
            }
        }
    }
    let rows = samples
        .into_iter()
        .map(|(proto, path, v)| Row {
            proto,
            path,
            figures: median(&v),
        })
        .collect();
    let results = Results {
        seconds_per_measurement: seconds,
        rounds,
        response_bytes,
        rows,
        waypoint_idle_rss_kib,
        waypoint_load_rss_kib,
    };
    print_table(&results);
    let out = crate::setup::target_dir().join("bench/waypoint.json");
    std::fs::create_dir_all(out.parent().unwrap_or(&out))?;
    std::fs::write(&out, serde_json::to_string_pretty(&results)?)?;
    println!("\nwritten to {}", out.display());
    Ok(())
}

/// As many requests as `connections` connections can carry one at a time each, for `d`.
async fn closed_loop(
    c: &Cluster,
    pod: &str,
    dst: SocketAddr,
    proto: Proto,
    connections: usize,
    d: Duration,
    pad: &str,
) -> anyhow::Result<f64> {
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(Sender::open(c, pod, dst, proto).await?);
    }
    let authority = dst.to_string();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in senders {
        let req = request(&authority, pad)?;
        tasks.spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < d {
                let mut r = Request::new(Empty::new());
                *r.uri_mut() = req.uri().clone();
                *r.headers_mut() = req.headers().clone();
                s.get(r).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    for n in tasks.join_all().await {
        total += n?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// `FIXED_RATE` requests per second spread over `FIXED_CONNECTIONS` connections, each paced;
/// returns every request's latency and how many completed.
async fn fixed_rate(
    c: &Cluster,
    pod: &str,
    dst: SocketAddr,
    proto: Proto,
    d: Duration,
    pad: &str,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let mut senders = Vec::with_capacity(FIXED_CONNECTIONS);
    for _ in 0..FIXED_CONNECTIONS {
        senders.push(Sender::open(c, pod, dst, proto).await?);
    }
    let authority = dst.to_string();
    let period = Duration::from_secs_f64(FIXED_CONNECTIONS as f64 / FIXED_RATE);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut s) in senders.into_iter().enumerate() {
        let req = request(&authority, pad)?;
        tasks.spawn(async move {
            // Staggered, so the connections' requests do not all leave at once.
            tokio::time::sleep(period.mul_f64(i as f64 / FIXED_CONNECTIONS as f64)).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut latencies = Vec::new();
            while start.elapsed() < d {
                tick.tick().await;
                let mut r = Request::new(Empty::new());
                *r.uri_mut() = req.uri().clone();
                *r.headers_mut() = req.headers().clone();
                let sent = Instant::now();
                s.get(r).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::new();
    for l in tasks.join_all().await {
        all.extend(l?);
    }
    let n = all.len();
    Ok((all, n))
}

/// CPU time of every thread of `pid` in nanoseconds (`/proc/<pid>/task/*/schedstat`), finer
/// than the clock ticks of `/proc/<pid>/stat`.
fn cpu_ns(pid: Option<u32>) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()?;
    let mut total = 0;
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

/// Per-figure medians over the rounds.
fn median(v: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(|a, b| a.total_cmp(b));
        xs.get(xs.len() / 2).copied().unwrap_or(0.0)
    };
    Figures {
        rps_1_connection: m(|f| f.rps_1_connection),
        rps_16_connections: m(|f| f.rps_16_connections),
        p50_us_at_1000: m(|f| f.p50_us_at_1000),
        p99_us_at_1000: m(|f| f.p99_us_at_1000),
        achieved_rate: m(|f| f.achieved_rate),
        waypoint_cores_per_1000: m(|f| f.waypoint_cores_per_1000),
        ztunnel_cores_per_1000: m(|f| f.ztunnel_cores_per_1000),
        waypoint_cpu_us_per_request_1_connection: m(|f| f.waypoint_cpu_us_per_request_1_connection),
    }
}

fn print_table(r: &Results) {
    println!(
        "\nHTTP, {} B responses, {} s per measurement, medians of {} interleaved rounds\n",
        r.response_bytes, r.seconds_per_measurement, r.rounds
    );
    println!(
        "| protocol | path | req/s, 1 conn | req/s, 16 conns | p50 / p99 at 1000 req/s | waypoint cores per 1000 req/s | ztunnels' cores per 1000 req/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let f = &row.figures;
        println!(
            "| {:?} | {:?} | {:.0} | {:.0} | {:.0} / {:.0} µs ({:.0} req/s) | {} | {} |",
            row.proto,
            row.path,
            f.rps_1_connection,
            f.rps_16_connections,
            f.p50_us_at_1000,
            f.p99_us_at_1000,
            f.achieved_rate,
            if row.path.through_waypoint() {
                format!("{:.3}", f.waypoint_cores_per_1000)
            } else {
                "–".into()
            },
            if row.path == Path::Direct {
                "–".into()
            } else {
                format!("{:.3}", f.ztunnel_cores_per_1000)
            },
        );
    }
    for row in r.rows.iter().filter(|x| x.path.through_waypoint()) {
        println!(
            "{:?} {:?}: waypoint CPU per request, 1 connection: {:.0} µs",
            row.proto, row.path, row.figures.waypoint_cpu_us_per_request_1_connection
        );
    }
    for proto in [Proto::Http1, Proto::Http2] {
        let get = |p: Path| r.rows.iter().find(|x| x.proto == proto && x.path == p);
        if let (Some(l4), Some(l7)) = (get(Path::MeshL4), get(Path::MeshL7)) {
            println!(
                "{proto:?}: p99 at 1000 req/s, L7 / L4 = {:.2} (goal ≤ 1.5)",
                l7.figures.p99_us_at_1000 / l4.figures.p99_us_at_1000.max(1.0)
            );
        }
        if let (Some(l7), Some(p)) = (get(Path::MeshL7), get(Path::MeshL7Policy)) {
            let ratio = |f: fn(&Figures) -> f64| f(&p.figures) / f(&l7.figures).max(1e-9);
            println!(
                "{proto:?}: policy set / plain routing: waypoint cores per 1000 req/s {:.2}, CPU per request at 1 connection {:.2} (goal ≤ 1.2)",
                ratio(|f| f.waypoint_cores_per_1000),
                ratio(|f| f.waypoint_cpu_us_per_request_1_connection),
            );
        }
    }
    println!(
        "waypoint RSS: {:.1} MiB idle, {:.1} MiB under load (goal ≤ 15 MB)",
        r.waypoint_idle_rss_kib as f64 / 1024.0,
        r.waypoint_load_rss_kib as f64 / 1024.0
    );
}
