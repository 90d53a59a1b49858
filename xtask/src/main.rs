//! `cargo xtask …`: the project's tasks (demo, test, bench, clean-testbed), runnable on a fresh
//! Debian machine as root.

mod bench;
mod demo;
mod setup;
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
    /// Run the mesh on this machine (2 nodes, 4 mesh pods, 1 pod outside) and check it works.
    Demo,
    /// Install what is missing, then formatting, clippy, unit and end-to-end tests.
    Test {
        /// Skip installing system packages.
        #[arg(long)]
        no_install: bool,
    },
    /// Benchmark direct TCP against the mesh on the test bed; writes target/bench/hbone.json.
    Bench {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2)]
        seconds: u64,
        /// Rounds of direct-then-mesh measurements; figures are medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Extra ztunnel flag for the run (repeatable), e.g. --ztunnel-arg=--worker-threads=1.
        #[arg(long = "ztunnel-arg", allow_hyphen_values = true)]
        ztunnel_args: Vec<String>,
    },
    /// Remove test beds left behind by killed runs (namespaces, cgroups, processes).
    CleanTestbed,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Demo => {
            setup::system_packages()?;
            let bin = setup::build_ztunnel(false)?;
            runtime()?.block_on(demo::run(bin))
        }
        Task::Test { no_install } => test::run(no_install),
        Task::Bench {
            seconds,
            rounds,
            ztunnel_args,
        } => {
            setup::system_packages()?;
            let bin = setup::build_ztunnel(true)?;
            runtime()?.block_on(bench::run(bin, seconds, rounds.max(1), ztunnel_args))
        }
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
