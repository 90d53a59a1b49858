//! `cargo xtask …`: the project's tasks (demo, test, bench, build-ebpf, clean-testbed), runnable on a fresh
//! Debian machine as root.

mod bench;
mod demo;
mod ebpf;
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
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// Install the eBPF toolchain when missing (Debian, root), build the capture programs and
    /// print the object's path; ztunnel embeds it when built afterwards.
    BuildEbpf,
    /// Remove test beds left behind by killed runs (namespaces, cgroups, processes).
    CleanTestbed,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::BuildEbpf => {
            println!("{}", ebpf::build()?.display());
            Ok(())
        }
        Task::Demo => {
            setup::system_packages()?;
            ebpf::build()?;
            let bin = setup::build_ztunnel(false)?;
            runtime()?.block_on(demo::run(bin))
        }
        Task::Test { no_install } => test::run(no_install),
        Task::Bench { seconds } => {
            setup::system_packages()?;
            ebpf::build()?;
            let bin = setup::build_ztunnel(true)?;
            runtime()?.block_on(bench::run(bin, seconds))
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
