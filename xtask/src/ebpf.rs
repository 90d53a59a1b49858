//! `cargo xtask build-ebpf`: installs the eBPF toolchain on Debian when missing (Debian's
//! rustc-web with the precompiled bpf `core`, LLVM 22, bpf-linker 0.13), then builds the
//! programs in `ebpf/redirect` and returns the object's path.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use crate::setup::{is_root, run, target_dir, workspace_root};

/// Debian packages: rustc/cargo 1.96 with LLVM 22, `core`/`alloc` for bpfel-unknown-none, libLLVM.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Where `cargo install` puts bpf-linker (outside the work tree, so later runs skip it).
fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
        .join("bin")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The object ztunnel embeds (see `ztunnel/build.rs`).
pub fn object_path() -> PathBuf {
    target_dir().join("ebpf/bpfel-unknown-none/release/redirect")
}

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    Command::new(cargo_bin().join("bpf-linker"))
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

/// Install what is missing; idempotent.
pub fn install_toolchain() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    let linker = bpf_linker_ok();
    if missing.is_empty() && linker {
        return Ok(());
    }
    let mut needed: Vec<String> = missing.iter().map(|p| format!("{p} (apt)")).collect();
    if !linker {
        needed.push(format!("bpf-linker {BPF_LINKER_VERSION} (cargo install)"));
    }
    if !std::path::Path::new("/etc/debian_version").exists() {
        bail!(
            "building the eBPF programs needs {}; this is not Debian, so install the equivalents \
             by hand: rustc/cargo >= 1.96 with LLVM 22 and precompiled core for \
             bpfel-unknown-none, libLLVM 22, and `cargo install bpf-linker@{BPF_LINKER_VERSION} \
             --no-default-features --features llvm-22` with LLVM_PREFIX={LLVM_PREFIX}",
            needed.join(", ")
        );
    }
    if !is_root() {
        bail!(
            "building the eBPF programs needs {}: run `cargo xtask build-ebpf` as root to \
             install them",
            needed.join(", ")
        );
    }
    println!("installing the eBPF toolchain: {}", needed.join(", "));
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !linker {
        // The host (rustup) cargo builds bpf-linker; it links against Debian's LLVM 22.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run(Command::new(cargo)
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .current_dir(home()))?;
    }
    Ok(())
}

/// Install the toolchain if needed, build `ebpf/redirect`, return the object's path.
pub fn build() -> anyhow::Result<PathBuf> {
    install_toolchain()?;
    let crate_dir = workspace_root().join("ebpf/redirect");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_bin()];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("/usr/bin/cargo");
    // The working directory must be the crate: its .cargo/config.toml sets the bpf target.
    cmd.current_dir(&crate_dir)
        .args(["build", "--release", "--locked"])
        .env("PATH", std::env::join_paths(paths)?)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTDOC", "/usr/bin/rustdoc")
        // aya-ebpf uses asm_experimental_arch on bpf targets; scoped to that crate.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_TARGET_DIR", target_dir().join("ebpf"));
    // Nothing of the outer (rustup) cargo run may leak into the bpf build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd).context("building the eBPF programs (ebpf/redirect)")?;
    let object = object_path();
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(object)
}
