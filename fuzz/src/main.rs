//! The fuzzer's command line: run one target (or `all`) for a time, or replay a saved input.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fuzz::engine::{Report, fuzz, replay};
use fuzz::{TARGETS, target};

#[derive(Parser)]
#[command(about = "Fuzz a target for a time; exit 1 on a crash (the input is saved)")]
struct Cli {
    /// A target name, or `all`.
    target: String,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed of the mutator (a run with the same seed and build mutates the same way).
    #[arg(long)]
    seed: Option<u64>,
    /// Where crashing inputs are saved (`<dir>/<target>/crash-<hash>`).
    #[arg(long, default_value = "target/fuzz")]
    out: PathBuf,
    /// Run this one input (a saved crash) instead of fuzzing, with the panic shown.
    #[arg(long)]
    input: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    let chosen: Vec<_> = if cli.target == "all" {
        TARGETS.iter().collect()
    } else {
        vec![target(&cli.target).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown target {:?}: {} or all",
                cli.target,
                names.join(", ")
            )
        })?]
    };
    if let Some(path) = &cli.input {
        let data = std::fs::read(path)?;
        for t in &chosen {
            replay(t, &data);
            println!("{}: {} ran without a failure", t.name, path.display());
        }
        return Ok(());
    }
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed}");
    println!(
        "{:<16} {:>8} {:>12} {:>8} {:>9}  result",
        "target", "seconds", "executions", "corpus", "features"
    );
    let mut crashed = false;
    for t in chosen {
        let r: Report = fuzz(t, Duration::from_secs(cli.seconds), seed, &cli.out);
        let result = match &r.crash {
            None => "ok".to_string(),
            Some((message, path)) => {
                crashed = true;
                format!("CRASH, input saved to {}\n  {message}", path.display())
            }
        };
        println!(
            "{:<16} {:>8.1} {:>12} {:>8} {:>9}  {result}",
            r.target,
            r.elapsed.as_secs_f64(),
            r.executions,
            r.corpus,
            r.features
        );
    }
    if crashed {
        std::process::exit(1);
    }
    Ok(())
}
