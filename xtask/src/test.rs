//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use crate::ebpf;
use crate::setup::{self, cargo};

pub fn run(no_install: bool) -> anyhow::Result<()> {
    if !no_install {
        if setup::is_root() {
            setup::system_packages()?;
        } else {
            println!("not root: skipping package installation; end-to-end tests will skip");
        }
        setup::python_h2()?;
        setup::envoy()?;
        setup::kubernetes_validate()?;
    }
    step("formatting", cargo().args(["fmt", "--all", "--check"]))?;
    // Before ztunnel is built, so that it embeds the object (eBPF capture is the default).
    println!("\n==> eBPF programs");
    match ebpf::build() {
        Ok(object) => println!("built {}", object.display()),
        Err(e) if !setup::is_root() => {
            println!("not root: eBPF programs not built ({e:#}); end-to-end tests will skip")
        }
        Err(e) => return Err(e),
    }
    step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let bin = setup::build_ztunnel(false)?;
    let mut tests = cargo();
    if !no_install {
        // Installed above: the deploy/ validation must run, not skip.
        tests.env("REQUIRE_KUBERNETES_VALIDATE", "1");
    }
    step(
        "unit and end-to-end tests (deploy/ manifests validated with kubernetes-validate)",
        tests
            .args(["test", "--workspace", "--locked"])
            .env("PILOT_BIN", setup::pilot_beside(&bin))
            .env("WAYPOINT_BIN", setup::waypoint_beside(&bin))
            .env("ZTUNNEL_BIN", &bin),
    )?;
    if setup::is_root() {
        let o = crate::soak::Options::ci();
        println!(
            "\n==> soak: {} connections, {} req/s, {} s",
            o.connections, o.rate, o.seconds
        );
        crate::runtime()?.block_on(crate::soak::run(bin, o))?;
    } else {
        println!("\nnot root: soak skipped");
    }
    println!("\n==> fuzzing, {} s per target", crate::fuzz::CI_SECONDS);
    crate::fuzz::run("all", crate::fuzz::CI_SECONDS, None)?;
    println!("\nall checks passed");
    Ok(())
}

fn step(name: &str, cmd: &mut std::process::Command) -> anyhow::Result<()> {
    println!("\n==> {name}");
    setup::run(cmd)
}
