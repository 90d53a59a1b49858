//! `cargo xtask …`: the project's tasks (demo, exec, down, test, bench, build-ebpf, clean-testbed, fuzz, soak), runnable on a fresh
//! Debian machine as root.

mod bench;
mod bench_redirect;
mod bench_waypoint;
mod bench_xds;
mod demo;
mod ebpf;
mod fuzz;
mod kept_mesh;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks for the mesh")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the mesh on this machine (deploy/examples/bookinfo: 2 nodes, 7 mesh pods, a waypoint,
    /// 1 pod outside) and check it works.
    Demo {
        /// Leave the mesh running after the checks (until `cargo xtask down` or Ctrl-C), for
        /// `cargo xtask exec` and editing pilot's folder.
        #[arg(long)]
        keep: bool,
    },
    /// Run a command in a pod (or node) of the demo mesh left by `cargo xtask demo --keep`,
    /// e.g. `cargo xtask exec productpage -- curl -s http://reviews:9080/`.
    Exec {
        /// The pod's (or node's) name, or a unique prefix of it.
        pod: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop the demo mesh left by `cargo xtask demo --keep` and remove its namespaces, cgroups
    /// and eBPF pins.
    Down,
    /// Install what is missing, then formatting, clippy, unit and end-to-end tests.
    Test {
        /// Skip installing system packages.
        #[arg(long)]
        no_install: bool,
    },
    /// Benchmark direct TCP against the mesh on the test bed (target/bench/hbone.json); with
    /// `redirect`, no capture against eBPF and nftables capture (target/bench/redirect.json); with
    /// `xds`, pilot pushing 1k/10k/100k/1M pods to 100 xDS clients (10 at 1M) (target/bench/xds.json); with
    /// `waypoint`, HTTP direct, through ztunnels (L4) and through a waypoint (L7)
    /// (target/bench/waypoint.json).
    Bench {
        /// `hbone` (default), `redirect`, `waypoint` or `xds`.
        #[arg(default_value = "hbone")]
        which: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2)]
        seconds: u64,
        /// Rounds of interleaved measurements (direct then mesh; or each capture mode); figures
        /// are medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Extra ztunnel flag for the run (repeatable), e.g. --ztunnel-arg=--worker-threads=1.
        /// Without --worker-threads / --runtime among them, the mesh is also measured on one
        /// thread and on the multi-thread runtime.
        #[arg(long = "ztunnel-arg", allow_hyphen_values = true)]
        ztunnel_args: Vec<String>,
    },
    /// Install the eBPF toolchain when missing (Debian, root), build the capture programs and
    /// print the object's path; ztunnel embeds it when built afterwards.
    BuildEbpf,
    /// The load generator of `bench redirect`, run inside a pod (internal).
    #[command(hide = true)]
    BenchClient {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        seconds: u64,
    },
    /// The load generator of `soak`, run inside a pod (internal).
    #[command(hide = true)]
    SoakClient {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        seconds: u64,
    },
    /// One size of `bench xds`, in a fresh process (internal).
    #[command(hide = true)]
    BenchXdsSize {
        #[arg(long)]
        pods: usize,
        #[arg(long)]
        pilot: std::path::PathBuf,
    },
    /// Remove test beds left behind by killed runs (namespaces, cgroups, processes).
    CleanTestbed,
    /// Many concurrent connections through the mesh plus a steady request rate, in cycles;
    /// fails on any error, on file descriptors not back to idle after a cycle, or on RSS growth
    /// across cycles (target/bench/soak.json).
    Soak {
        /// Seconds of load in all (cycles of --cycle-seconds each).
        #[arg(long, default_value_t = 1800)]
        seconds: u64,
        /// Connections held open at once.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Requests per second over them, all together.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds each cycle holds the connections (then closes them and lets ztunnel settle).
        #[arg(long, default_value_t = 120)]
        cycle_seconds: u64,
        /// Soak release builds (the memory figures of a deployment) instead of debug builds;
        /// with ZTUNNEL_BIN set, that binary (and the pilot beside it) instead.
        #[arg(long)]
        release: bool,
    },
    /// Fuzz a target (hbone, xds, dns, ztunnel-config, pilot-yaml, or all) for a time; a crash
    /// fails the run and its input is saved under target/fuzz/<target>/.
    Fuzz {
        target: String,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Seed of the mutator, to repeat a run.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.task, Task::Bench { .. }) && cfg!(debug_assertions) {
        std::process::exit(rerun_in_release()?);
    }
    match cli.task {
        Task::BuildEbpf => {
            println!("{}", ebpf::build()?.display());
            Ok(())
        }
        Task::Demo { keep } => {
            setup::system_packages()?;
            ebpf::build()?;
            let bin = setup::build_ztunnel(false)?;
            runtime()?.block_on(demo::run(bin, keep))
        }
        Task::Exec { pod, command } => std::process::exit(kept_mesh::exec(&pod, &command)?),
        Task::Down => {
            println!("{}", kept_mesh::down()?);
            Ok(())
        }
        Task::Test { no_install } => test::run(no_install),
        Task::Bench { which, .. } if which == "xds" => {
            let pilot = setup::build_pilot_release()?;
            bench_xds::run(&pilot, &bench_xds::sizes()?)
        }
        Task::BenchXdsSize { pods, pilot } => runtime()?.block_on(bench_xds::one_size(pilot, pods)),
        Task::Bench {
            which,
            seconds,
            rounds,
            ztunnel_args,
        } => {
            setup::system_packages()?;
            ebpf::build()?;
            let bin = setup::build_ztunnel(true)?;
            match which.as_str() {
                "hbone" => {
                    runtime()?.block_on(bench::run(bin, seconds, rounds.max(1), ztunnel_args))
                }
                "redirect" => runtime()?.block_on(bench_redirect::run(bin, seconds, rounds.max(1))),
                "waypoint" => runtime()?.block_on(bench_waypoint::run(bin, seconds, rounds.max(1))),
                other => {
                    anyhow::bail!("unknown benchmark {other:?}: hbone, redirect, waypoint or xds")
                }
            }
        }
        Task::SoakClient {
            target,
            connections,
            rate,
            seconds,
        } => soak::client(target, connections, rate, seconds),
        Task::BenchClient { target, seconds } => bench_redirect::client(target, seconds),
        Task::Soak {
            seconds,
            connections,
            rate,
            cycle_seconds,
            release,
        } => {
            setup::system_packages()?;
            ebpf::build()?;
            // A given build (to compare two) when ZTUNNEL_BIN is set, pilot beside it.
            let bin = match std::env::var_os("ZTUNNEL_BIN") {
                Some(bin) => std::path::PathBuf::from(bin),
                None => setup::build_ztunnel(release)?,
            };
            let options = soak::Options {
                seconds,
                connections,
                rate,
                cycle_seconds: cycle_seconds.min(seconds),
            };
            runtime()?.block_on(soak::run(bin, options))
        }
        Task::Fuzz {
            target,
            seconds,
            seed,
        } => fuzz::run(&target, seconds, seed),
        Task::CleanTestbed => {
            println!("{}", testbed::clean_leftovers()?);
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Benchmarks measure the proxies, and this process is their load generator: as a debug build it
/// would spend several times the CPU of the proxies per request, competing with them for the
/// two cores and inflating their latency. So `cargo xtask bench …` (a debug build, by the
/// alias) runs itself again as a release build with the same arguments.
fn rerun_in_release() -> anyhow::Result<i32> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "run",
            "--release",
            "--locked",
            "--quiet",
            "--package",
            "xtask",
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .status()?;
    Ok(status.code().unwrap_or(1))
}
