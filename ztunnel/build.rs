//! Embeds the eBPF object built by `cargo xtask build-ebpf` when it exists; without it ztunnel
//! still builds, and `--redirect ebpf` then asks for the object (or `--ebpf-object`).

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ebpf_object)");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join("../target"));
    let object = target.join("ebpf/bpfel-unknown-none/release/redirect");
    // Also reruns when the object appears or is rebuilt.
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        println!("cargo::rustc-cfg=ebpf_object");
        println!(
            "cargo::rustc-env=ZTUNNEL_EBPF_OBJECT_PATH={}",
            object.display()
        );
    }
}
