//! `cargo xtask fuzz <target> --seconds N`: builds the fuzz crate (the workspace's own engine,
//! nothing to install, stable toolchain) and runs a target, or `all` of them.

use crate::setup::{self, cargo};

/// Seconds each target runs in `cargo xtask test`: five targets, under a minute in all.
pub const CI_SECONDS: u64 = 10;

pub fn run(target: &str, seconds: u64, seed: Option<u64>) -> anyhow::Result<()> {
    setup::run(cargo().args(["build", "-p", "fuzz", "--bin", "fuzz", "--locked"]))?;
    let bin = setup::workspace_root().join("target/debug/fuzz");
    let out = setup::workspace_root().join("target/fuzz");
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(target)
        .arg("--seconds")
        .arg(seconds.to_string())
        .arg("--out")
        .arg(&out);
    if let Some(seed) = seed {
        cmd.arg("--seed").arg(seed.to_string());
    }
    setup::run(&mut cmd).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nA crash's input is under {}; replay it with `{} <target> --input <file>`",
            out.display(),
            bin.display()
        )
    })
}
