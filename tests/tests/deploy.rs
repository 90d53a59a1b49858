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

/// The documents of a multi-document YAML file.
fn documents(path: &Path) -> Vec<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml_ng::Value| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml_ng::Value], kind: &str) -> &'a serde_yaml_ng::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The value of `--<flag>=` among a container's args.
fn flag<'a>(container: &'a serde_yaml_ng::Value, name: &str) -> &'a str {
    let prefix = format!("--{name}=");
    container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .find_map(|a| a.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no --{name}"))
}

/// A rolling update starts the new ztunnel beside the old one (the upgrade without resets,
/// `tests/tests/upgrade.rs`), and the old one may drain for its whole `--drain-timeout`.
#[test]
fn ztunnel_daemonset_upgrades_with_surge_and_a_full_drain() {
    let ztunnel = documents(&deploy_dir().join("ztunnel.yaml"));
    let ds = of_kind(&ztunnel, "DaemonSet");
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"].as_u64(), Some(1));
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0));
    let pod = &ds["spec"]["template"]["spec"];
    let drain = flag(&pod["containers"][0], "drain-timeout");
    let drain: u64 = drain
        .strip_suffix('s')
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("--drain-timeout={drain}: expected seconds"));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} <= drain {drain}"
    );
}

/// The DaemonSet makes ztunnel pilot's client, and everything it names agrees with pilot's
/// manifests: the Service's name and port, the node-agent service account pilot trusts, the
/// token audience pilot's TokenReview asks for, the root ConfigMap pilot publishes, and the
/// paths where the volumes put the token and the root.
#[test]
fn ztunnel_daemonset_is_pilots_client() {
    let ztunnel = documents(&deploy_dir().join("ztunnel.yaml"));
    let ds = of_kind(&ztunnel, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let svc = &documents(&deploy_dir().join("pilot/service.yaml"))[0];
    let pilot = &documents(&deploy_dir().join("pilot/deployment.yaml"))[0];
    let pilot_container = &pilot["spec"]["template"]["spec"]["containers"][0];

    let host = format!(
        "{}.{}.svc",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap()
    );
    let port = svc["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(
        flag(container, "xds-address"),
        format!("https://{host}:{port}")
    );
    assert_eq!(flag(container, "xds-server-name"), host);
    assert!(
        !container["args"].as_sequence().unwrap().iter().any(|a| a
            .as_str()
            .is_some_and(|a| a.starts_with("--config")
                || a.starts_with("--ca-cert")
                || a.starts_with("--ca-key"))),
        "standalone flags left in the DaemonSet"
    );
    // pilot maps this service account's tokens to the node.
    assert_eq!(
        flag(pilot_container, "node-agent"),
        format!(
            "{}/{}",
            ds["metadata"]["namespace"].as_str().unwrap(),
            pod["serviceAccountName"].as_str().unwrap()
        )
    );
    // The volumes put the token and the root where the flags say.
    let mount_of = |volume: &str| -> String {
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("volume {volume} not mounted"))
            .to_string()
    };
    let volume = |name: &str| -> &serde_yaml_ng::Value {
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let token = &volume("istio-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"].as_str(), Some("istio-ca"));
    assert_eq!(
        flag(container, "xds-token-file"),
        format!(
            "{}/{}",
            mount_of("istio-token"),
            token["path"].as_str().unwrap()
        )
    );
    assert_eq!(
        volume("istio-ca-root-cert")["configMap"]["name"].as_str(),
        Some("istio-ca-root-cert")
    );
    assert_eq!(
        flag(container, "xds-root-cert"),
        format!("{}/root-cert.pem", mount_of("istio-ca-root-cert"))
    );
}
