//! Standalone configuration (`--config`): a folder, or one file, of the Kubernetes YAML pilot's
//! folder source reads (Namespaces, Pods, Services, AuthorizationPolicies, waypoint Gateways, …).
//! `meshconfig` reads, validates and translates it in-process into the workload-API resources
//! pilot would push to this ztunnel (all of them: ztunnel subscribes to everything), and
//! [`Held`] converts those into the state exactly as it converts pilot's pushes. So there is
//! one format, one validation and one conversion, with or without a control plane.
//!
//! Reading and translating run on blocking threads. The folder is polled (meshconfig's
//! watcher); a change with invalid objects is logged with file, object and field, and each of
//! those objects keeps its last good version, as in pilot.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh::state::State;
use mesh::xds::{Received, Update};
use meshconfig::folder::{self, Fingerprint, ParseCache};
use meshconfig::k8s::Problem;
use meshconfig::model::Snapshot;
use meshconfig::translate::{MeshOptions, ResourceMap, Resources, translate};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::node::Node;
use crate::xds::Held;

/// The translation settings of a standalone ztunnel. Dry-run policies are sent: this ztunnel
/// understands them (it logs what they would have done), which is why pilot may hold them back.
pub fn mesh_options(trust_domain: &str, cluster_id: &str) -> MeshOptions {
    MeshOptions {
        trust_domain: trust_domain.to_string(),
        cluster_id: cluster_id.to_string(),
        send_dry_run: true,
        ..MeshOptions::default()
    }
}

/// Turns snapshots into states, as xDS would deliver them: it keeps the resources of the last
/// snapshot converted and hands [`Held`] only what changed since.
#[derive(Debug)]
pub struct Converter {
    mesh: MeshOptions,
    held: Held,
    last: Resources,
}

impl Converter {
    pub fn new(mesh: MeshOptions) -> Self {
        Converter {
            mesh,
            held: Held::default(),
            last: Resources::default(),
        }
    }

    /// The state of `snapshot`, with the problems translation found (what it left out, e.g.
    /// two pods with one address). On error (resources that conflict, or that the conversion
    /// refuses) nothing changes: the previous state stays in force.
    pub fn convert(&mut self, snapshot: &Snapshot) -> Result<(State, Vec<Problem>), String> {
        let t = translate(snapshot, &self.mesh);
        let mut held = self.held.clone();
        let mut bad = Vec::new();
        for (type_url, now, before) in [
            (
                ADDRESS_TYPE_URL,
                &t.resources.addresses,
                &self.last.addresses,
            ),
            (
                AUTHORIZATION_TYPE_URL,
                &t.resources.authorizations,
                &self.last.authorizations,
            ),
        ] {
            held.apply(&delta(type_url, now, before), &mut bad)
                .map_err(|r| r.message)?;
        }
        if !bad.is_empty() {
            // What meshconfig translates, the conversion must take (the fuzz target checks it).
            let reasons: Vec<String> = bad.iter().map(|(n, e)| format!("{n}: {e}")).collect();
            return Err(format!(
                "translated resources refused: {}",
                reasons.join("; ")
            ));
        }
        let state = held.state().map_err(|e| e.to_string())?;
        self.held = held;
        self.last = t.resources;
        Ok((state, t.problems))
    }
}

/// What changed from `before` to `now`, as a delta xDS push would carry it.
fn delta(type_url: &str, now: &ResourceMap, before: &ResourceMap) -> Update {
    Update {
        type_url: type_url.to_string(),
        updated: now
            .iter()
            .filter(|(name, r)| before.get(*name).is_none_or(|b| b.version != r.version))
            .map(|(name, r)| Received {
                name: name.clone(),
                version: r.version.clone(),
                body: r.body.to_vec(),
            })
            .collect(),
        removed: before
            .keys()
            .filter(|name| !now.contains_key(*name))
            .cloned()
            .collect(),
    }
}

/// The configuration as first read, and what following it needs.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    fingerprint: Fingerprint,
    cache: ParseCache,
    snapshot: Arc<Snapshot>,
    converter: Converter,
}

/// Read, validate and translate `path` (blocking). Any problem is an error, listing each
/// with its file, object and field: ztunnel does not start on a configuration it would
/// partly leave out.
pub fn load_blocking(path: &Path, mesh: MeshOptions) -> Result<(State, Source), String> {
    if !path.exists() {
        return Err(format!("{}: no such file or folder", path.display()));
    }
    // The fingerprint first, so that no change slips between it and the read.
    let fingerprint = folder::fingerprint(path);
    let mut cache = ParseCache::default();
    let snapshot = cache.load(path);
    let mut converter = Converter::new(mesh);
    let (state, translated) = converter
        .convert(&snapshot)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let problems: Vec<String> = snapshot
        .problems
        .iter()
        .chain(&translated)
        .map(|p| p.to_string())
        .collect();
    if !problems.is_empty() {
        return Err(format!(
            "{} invalid in {}:\n  {}",
            if problems.len() == 1 {
                "1 object".to_string()
            } else {
                format!("{} objects", problems.len())
            },
            path.display(),
            problems.join("\n  ")
        ));
    }
    info!(
        path = %path.display(),
        pods = snapshot.pods.len(),
        services = snapshot.services.len(),
        policies = snapshot.policies.len(),
        "configuration loaded"
    );
    Ok((
        state,
        Source {
            path: path.to_path_buf(),
            fingerprint,
            cache,
            snapshot: Arc::new(snapshot),
            converter,
        },
    ))
}

/// [`load_blocking`] on a blocking thread.
pub async fn load(path: PathBuf, mesh: MeshOptions) -> anyhow::Result<(State, Source)> {
    tokio::task::spawn_blocking(move || load_blocking(&path, mesh))
        .await?
        .map_err(anyhow::Error::msg)
}

/// Follow the configuration: every (debounced) change is read, validated and translated again
/// and the new state published, then pods enrolled or unenrolled. meshconfig's watcher logs
/// each invalid object (file, object, field) and keeps its last good version; a change whose
/// resources cannot make a state as a whole is logged and the previous state stays.
pub async fn follow(source: Source, tx: watch::Sender<Arc<State>>, node: Arc<Node>) {
    let Source {
        path,
        fingerprint,
        cache,
        snapshot,
        mut converter,
    } = source;
    let (snap_tx, mut snap_rx) = watch::channel(snapshot);
    snap_rx.borrow_and_update();
    tokio::spawn(folder::watch_folder(
        path.clone(),
        fingerprint,
        cache,
        snap_tx,
    ));
    let mesh = converter.mesh.clone();
    let mut logged: BTreeSet<Problem> = BTreeSet::new();
    while snap_rx.changed().await.is_ok() {
        let snapshot = snap_rx.borrow_and_update().clone();
        // Moved to the blocking thread and back; a fresh one stands in meanwhile.
        let mut c = std::mem::replace(&mut converter, Converter::new(mesh.clone()));
        let converted = tokio::task::spawn_blocking(move || {
            let r = c.convert(&snapshot);
            (c, r, snapshot.generation)
        })
        .await;
        let (c, result, generation) = match converted {
            Ok(done) => done,
            Err(e) => {
                // The converter went with the panicked task: the fresh one converts the next
                // change from nothing; until then the state stays.
                error!(
                    path = %path.display(),
                    "translating the configuration failed, keeping the previous state: {e}"
                );
                continue;
            }
        };
        converter = c;
        match result {
            Ok((state, problems)) => {
                // Translation problems are logged once each, while they last.
                for p in problems.iter().filter(|p| !logged.contains(*p)) {
                    warn!("{p}");
                }
                logged = problems.into_iter().collect();
                info!(path = %path.display(), generation, "configuration reloaded");
                tx.send_replace(Arc::new(state));
            }
            Err(e) => error!(
                path = %path.display(),
                "configuration rejected, keeping the previous one: {e}"
            ),
        }
        node.reconcile().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::state::{Action, Scope, TunnelProtocol, Workload};

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, uid: u-client, labels: {app: client}}
spec: {nodeName: node1, serviceAccountName: client}
status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00:244:1::10"}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-1
  namespace: demo
  uid: u-echo-1
  labels: {app: echo, version: v1}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: echo-v1-5d8f7c, controller: true}]
spec: {nodeName: node2, serviceAccountName: echo}
status: {phase: Running, podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: own, namespace: demo, uid: u-own, labels: {app: own, istio.io/dataplane-mode: none, networking.istio.io/tunnel: http}}
spec: {nodeName: external}
status: {phase: Running, podIP: 10.244.2.11}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-alt-port, namespace: demo}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["9090"]}}]}]
"#;

    fn folder(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztunnel-config-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    /// Everything a state holds, in a comparable order.
    fn contents(s: &State) -> (Vec<Workload>, Vec<String>, Vec<String>) {
        let mut w: Vec<Workload> = s.workloads().map(|w| (**w).clone()).collect();
        w.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<String> = s.services().map(|x| format!("{x:?}")).collect();
        services.sort();
        let mut policies: Vec<String> = s.policies().map(|x| format!("{x:?}")).collect();
        policies.sort();
        (w, services, policies)
    }

    /// The state a ztunnel connected to pilot builds from the same objects: pilot's
    /// translation pushed whole (ztunnel subscribes to everything), one update per type,
    /// through the xDS handler's conversion.
    fn through_pilot(snapshot: &Snapshot, mesh: &MeshOptions) -> State {
        let t = translate(snapshot, mesh);
        let mut held = Held::default();
        let mut bad = Vec::new();
        for (type_url, resources) in [
            (ADDRESS_TYPE_URL, &t.resources.addresses),
            (AUTHORIZATION_TYPE_URL, &t.resources.authorizations),
        ] {
            held.apply(&delta(type_url, resources, &ResourceMap::new()), &mut bad)
                .unwrap();
        }
        assert!(bad.is_empty(), "{bad:?}");
        held.state().unwrap()
    }

    #[test]
    fn a_folder_makes_the_state_pilot_would_push() {
        let dir = folder(&[("mesh.yaml", MESH)]);
        let mesh = mesh_options("cluster.local", "Kubernetes");
        let (state, _) = load_blocking(&dir, mesh.clone()).unwrap();
        let snapshot = folder::load(&dir);
        assert_eq!(contents(&state), contents(&through_pilot(&snapshot, &mesh)));

        let client = state.workload_by_uid("u-client").unwrap();
        assert_eq!(client.node, "node1");
        assert_eq!(client.tunnel_protocol, TunnelProtocol::Hbone);
        assert_eq!(client.addresses.len(), 2);
        assert_eq!(
            client.identity().to_string(),
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        let echo = state.workload_by_uid("u-echo-1").unwrap();
        assert_eq!(
            (echo.workload_type.as_str(), echo.workload_name.as_str()),
            ("deployment", "echo-v1")
        );
        assert_eq!(echo.canonical_revision, "v1");
        assert_eq!(
            echo.services["demo/echo.demo.svc.cluster.local"],
            [(80, 8080)].into()
        );
        // Speaks HBONE itself, on a node without ztunnel.
        let own = state.workload_by_uid("u-own").unwrap();
        assert_eq!(own.tunnel_protocol, TunnelProtocol::Hbone);
        let policy = state.policy("demo/deny-alt-port").unwrap();
        assert_eq!(
            (policy.scope, policy.action),
            (Scope::Namespace, Action::Deny)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_file_is_read_as_a_folder_of_one() {
        let dir = folder(&[("mesh.yaml", MESH)]);
        let mesh = mesh_options("cluster.local", "Kubernetes");
        let (from_file, _) = load_blocking(&dir.join("mesh.yaml"), mesh.clone()).unwrap();
        let (from_dir, _) = load_blocking(&dir, mesh).unwrap();
        assert_eq!(contents(&from_file), contents(&from_dir));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn changes_convert_as_a_full_push_would() {
        let mesh = mesh_options("cluster.local", "Kubernetes");
        let mut c = Converter::new(mesh.clone());
        let first = Snapshot::build(
            meshconfig::k8s::parse_documents(MESH, "mesh.yaml").objects,
            vec![],
        );
        c.convert(&first).unwrap();
        // The service and the policy go, a pod moves, a pod arrives.
        let changed = MESH
            .split("---")
            .filter(|d| !d.contains("kind: Service") && !d.contains("kind: AuthorizationPolicy"))
            .collect::<Vec<_>>()
            .join("---")
            .replace("10.244.2.10", "10.244.2.20")
            + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: demo, uid: u-new}\nspec: {nodeName: node2}\nstatus: {podIP: 10.244.2.30}\n";
        let second = Snapshot::build(
            meshconfig::k8s::parse_documents(&changed, "mesh.yaml").objects,
            vec![],
        );
        let (state, problems) = c.convert(&second).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(contents(&state), contents(&through_pilot(&second, &mesh)));
        assert!(state.policy("demo/deny-alt-port").is_none());
        assert_eq!(state.services().count(), 0);
        assert_eq!(state.workloads().count(), 4);
    }

    #[test]
    fn problems_name_file_object_and_field() {
        let bad = MESH.replace("podIP: 10.244.2.10", "podIP: 10.244.2");
        let dir = folder(&[("mesh.yaml", &bad)]);
        let e = load_blocking(&dir, mesh_options("cluster.local", "Kubernetes")).unwrap_err();
        assert!(
            e.contains("mesh.yaml: Pod demo/echo-1: field \"status.podIP\": \"10.244.2\" is not an IP address"),
            "{e}"
        );
        // An empty folder is an empty mesh; a missing one is an error.
        std::fs::remove_file(dir.join("mesh.yaml")).unwrap();
        let (empty, _) = load_blocking(&dir, mesh_options("cluster.local", "Kubernetes")).unwrap();
        assert_eq!(empty.workloads().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
        let e = load_blocking(&dir, mesh_options("cluster.local", "Kubernetes")).unwrap_err();
        assert!(e.contains("no such file or folder"), "{e}");
    }

    #[test]
    fn an_address_taken_twice_is_reported_and_the_second_pod_left_out() {
        let mut c = Converter::new(mesh_options("cluster.local", "Kubernetes"));
        let twin = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: twin, namespace: demo, uid: u-twin}\nstatus: {podIP: 10.244.1.10}\n";
        let snapshot = Snapshot::build(
            meshconfig::k8s::parse_documents(&format!("{MESH}{twin}"), "mesh.yaml").objects,
            vec![],
        );
        let (state, problems) = c.convert(&snapshot).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, "Pod demo/twin");
        assert!(
            problems[0]
                .reason
                .contains("already used by Pod demo/client"),
            "{}",
            problems[0]
        );
        assert!(state.workload_by_uid("u-twin").is_none());
        assert_eq!(
            state
                .workload_by_ip("10.244.1.10".parse().unwrap())
                .map(|w| w.uid.as_str()),
            Some("u-client")
        );
        // At start, that is an error: ztunnel does not run on a configuration it partly drops.
        let dir = folder(&[("mesh.yaml", &format!("{MESH}{twin}"))]);
        let e = load_blocking(&dir, mesh_options("cluster.local", "Kubernetes")).unwrap_err();
        assert!(e.contains("Pod demo/twin"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
