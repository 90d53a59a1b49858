//! The manifests under `deploy/` validated offline against the Kubernetes API schemas bundled
//! in PyPI's `kubernetes-validate` (strict: unknown fields are errors). `cargo xtask test`
//! installs it when missing and sets `REQUIRE_KUBERNETES_VALIDATE`, so there a missing tool
//! fails; a plain `cargo test` without it skips.
//!
//! Kinds with no schema in the package are only accepted from this list: Istio's CRDs, the
//! Gateway API and kustomize's own file. pilot parses and checks the Istio ones itself (the
//! golden tests load `deploy/examples/bookinfo`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version validated against; one the package ships schemas for.
const KUBERNETES_VERSION: &str = "1.33.0";

/// `(apiVersion, kind)` without a bundled schema, skipped on purpose.
const SKIPPED: &[(&str, &str)] = &[
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy")
}

fn manifests(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            manifests(&p, out);
        } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

/// `python3 -m kubernetes_validate`: found wherever pip put the package, whatever the PATH.
fn validator() -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate"]);
    cmd
}

fn tool_present() -> bool {
    let found = validator()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var_os("REQUIRE_KUBERNETES_VALIDATE").is_some() {
        panic!("kubernetes-validate is required (pip install kubernetes-validate) but not found");
    }
    if !found {
        eprintln!("skipping: kubernetes-validate not installed (cargo xtask test installs it)");
    }
    found
}

#[test]
fn deploy_manifests_validate_against_kubernetes_schemas() {
    if !tool_present() {
        return;
    }
    let mut files = Vec::new();
    manifests(&deploy_dir(), &mut files);
    assert!(files.len() >= 5, "manifests found: {files:?}");
    let out = validator()
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut passed = 0;
    let mut failures = Vec::new();
    for line in text.lines() {
        if line.starts_with("INFO") && line.contains(" passed ") {
            passed += 1;
        } else if line.contains("Couldn't find schema for kind") {
            let skipped = SKIPPED
                .iter()
                .any(|(api, kind)| line.contains(&format!("kind {kind} with api version {api} ")));
            if !skipped {
                failures.push(line.to_string());
            }
        } else if !line.trim().is_empty() {
            failures.push(line.to_string());
        }
    }
    assert!(
        out.status.success() && failures.is_empty(),
        "kubernetes-validate (Kubernetes {KUBERNETES_VERSION}, strict) rejected deploy/:\n{}\n\nfull output:\n{text}",
        failures.join("\n")
    );
    // Namespaces, pods and services of the example, and pilot's and ztunnel's objects.
    assert!(passed >= 15, "only {passed} objects validated:\n{text}");
}

#[test]
fn kustomization_lists_every_pilot_manifest() {
    let dir = deploy_dir().join("pilot");
    let k = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let listed: Vec<&str> = k
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(str::trim)
        .collect();
    let mut files = Vec::new();
    manifests(&dir, &mut files);
    for f in files {
        let name = f.file_name().unwrap().to_str().unwrap();
        if name == "kustomization.yaml" {
            continue;
        }
        assert!(
            listed.contains(&name),
            "{name} is not in kustomization.yaml"
        );
    }
    for name in listed {
        assert!(
            dir.join(name).is_file(),
            "kustomization lists missing {name}"
        );
    }
}
