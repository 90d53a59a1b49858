//! The `istio-ca-root-cert` ConfigMap in every namespace (Kubernetes source), as istiod publishes it: key `root-cert.pem` = pilot's root, kept current.
//!
//! Pods mount it to trust pilot (the waypoints pilot provisions read `--xds-root-cert` from it).
//! Pilot server-side applies one per namespace (field manager `pilot`, as `provision` does),
//! watches them by name, and applies again when one is deleted or its `root-cert.pem` no longer
//! holds the root (edited). Namespaces istiod leaves alone (`IGNORED_NAMESPACES`) get none.
//! `wanted` is the pure part (which namespaces need an apply); `publish` does the I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::model::Snapshot;
use crate::provision::{FIELD_MANAGER, ROOT_CERT_CONFIGMAP};

/// The data key holding the root certificate (PEM).
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// Istio's label on the ConfigMaps it publishes.
pub const CONFIG_LABEL: &str = "istio.io/config";
/// System namespaces istiod publishes nothing in (Istio's ignored namespaces).
pub const IGNORED_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];
/// How long a namespace whose apply failed waits before the next try.
pub const RETRY: Duration = Duration::from_secs(5);

/// The ConfigMap applied in `namespace`.
pub fn configmap(namespace: &str, root_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CERT_CONFIGMAP,
            "namespace": namespace,
            "labels": { CONFIG_LABEL: "true" },
        },
        "data": { ROOT_CERT_KEY: root_pem },
    })
}

/// The namespaces whose ConfigMap must be applied: every namespace not ignored whose
/// ConfigMap is missing from `current` (namespace → its `root-cert.pem`, `None` without one)
/// or holds something other than `root_pem`.
pub fn wanted<'a>(
    namespaces: impl IntoIterator<Item = &'a str>,
    current: &BTreeMap<String, Option<String>>,
    root_pem: &str,
) -> Vec<&'a str> {
    namespaces
        .into_iter()
        .filter(|ns| !IGNORED_NAMESPACES.contains(ns))
        .filter(|ns| current.get(*ns).and_then(Option::as_deref) != Some(root_pem))
        .collect()
}

/// What a watched ConfigMap holds for the comparison: its namespace and `root-cert.pem`.
fn seen(cm: &ConfigMap) -> Option<(String, Option<String>)> {
    if cm.metadata.name.as_deref() != Some(ROOT_CERT_CONFIGMAP) {
        return None;
    }
    let ns = cm.metadata.namespace.clone()?;
    let pem = cm.data.as_ref().and_then(|d| d.get(ROOT_CERT_KEY)).cloned();
    Some((ns, pem))
}

/// Keep `istio-ca-root-cert` current in every namespace of the snapshots `snapshots`
/// publishes, until its sender is gone. Applies start once the ConfigMaps have been listed
/// (so a restart writes only what is missing or wrong); a failed apply is logged and retried
/// after `RETRY`.
pub async fn publish(
    client: Client,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut roots: watch::Receiver<Arc<crate::roots::Roots>>,
) {
    // Every trusted root: during a rotation the ConfigMaps carry the old and the new one.
    let mut root_pem = roots.borrow_and_update().bundle_pem().to_string();
    let api: Api<ConfigMap> = Api::all(client.clone());
    let selector = format!("metadata.name={ROOT_CERT_CONFIGMAP}");
    let events =
        watcher::watcher(api, watcher::Config::default().fields(&selector)).default_backoff();
    let mut events = std::pin::pin!(events);
    // Namespace → `root-cert.pem` of its ConfigMap, as last seen (or applied).
    let mut current: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Option<String>>> = None;
    let mut listed = false;
    let mut failed: BTreeMap<String, Instant> = BTreeMap::new();
    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    let mut snapshot_seen = false;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if snap.generation > 0 {
            namespaces = snap.namespaces.keys().cloned().collect();
            snapshot_seen = true;
        }
        failed.retain(|ns, _| namespaces.contains(ns));
        if listed && snapshot_seen {
            let now = Instant::now();
            let due: Vec<String> =
                wanted(namespaces.iter().map(String::as_str), &current, &root_pem)
                    .into_iter()
                    .filter(|ns| failed.get(*ns).is_none_or(|at| *at <= now))
                    .map(str::to_string)
                    .collect();
            for ns in due {
                match apply(&client, &ns, &root_pem).await {
                    Ok(()) => {
                        info!(namespace = %ns, "{ROOT_CERT_CONFIGMAP} applied");
                        failed.remove(&ns);
                        // As applied; the watch confirms it (or reports a later change).
                        current.insert(ns, Some(root_pem.clone()));
                    }
                    Err(e) => {
                        warn!(namespace = %ns, "applying {ROOT_CERT_CONFIGMAP} failed, retrying in {RETRY:?}: {e}");
                        failed.insert(ns, Instant::now() + RETRY);
                    }
                }
            }
        }
        let retry_at = failed.values().min().copied();
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(Event::Init)) => listing = Some(BTreeMap::new()),
                Some(Ok(Event::InitApply(cm))) => {
                    if let Some((ns, pem)) = seen(&cm) {
                        listing.get_or_insert_default().insert(ns, pem);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    current = listing.take().unwrap_or_default();
                    listed = true;
                }
                Some(Ok(Event::Apply(cm))) => {
                    if let Some((ns, pem)) = seen(&cm) {
                        current.insert(ns, pem);
                    }
                }
                Some(Ok(Event::Delete(cm))) => {
                    if let Some((ns, _)) = seen(&cm) {
                        current.remove(&ns);
                    }
                }
                Some(Err(e)) => warn!("watching {ROOT_CERT_CONFIGMAP} ConfigMaps: {e}; retrying with backoff"),
            },
            changed = snapshots.changed() => if changed.is_err() {
                debug!("snapshot source gone: {ROOT_CERT_CONFIGMAP} publishing stops");
                return;
            },
            changed = roots.changed() => match changed {
                Ok(()) => root_pem = roots.borrow_and_update().bundle_pem().to_string(),
                Err(_) => return,
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
        }
    }
}

/// Server-side apply of the ConfigMap in `ns` (forced: pilot owns `root-cert.pem`).
async fn apply(client: &Client, ns: &str, root_pem: &str) -> kube::Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch(
            ROOT_CERT_CONFIGMAP,
            &params,
            &Patch::Apply(configmap(ns, root_pem)),
        )
        .await
        .map(|_| ())
}

/// `(API group, resource)` of the ConfigMaps: pilot lists, watches and server-side applies
/// them (deploy/pilot/rbac.yaml).
pub fn resource() -> (String, String) {
    (
        ConfigMap::group(&()).into_owned(),
        ConfigMap::plural(&()).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn every_namespace_but_the_system_ones_without_the_root_wants_it() {
        let mut current = BTreeMap::new();
        current.insert("ok".to_string(), Some(ROOT.to_string()));
        current.insert("edited".to_string(), Some("something else".to_string()));
        current.insert("emptied".to_string(), None);
        let namespaces = [
            "ok",
            "edited",
            "emptied",
            "new",
            "kube-system",
            "kube-public",
        ];
        assert_eq!(
            wanted(namespaces, &current, ROOT),
            ["edited", "emptied", "new"]
        );
        // A new root makes every one stale.
        assert_eq!(wanted(["ok"], &current, "other root"), ["ok"]);
    }

    #[test]
    fn the_configmap_is_istios() {
        let cm = configmap("shop", ROOT);
        let typed: ConfigMap = serde_json::from_value(cm.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), cm);
        assert_eq!(typed.metadata.name.as_deref(), Some("istio-ca-root-cert"));
        assert_eq!(typed.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(typed.data.unwrap()["root-cert.pem"], ROOT);
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");
        assert_eq!(seen(&ConfigMap::default()), None);
        assert_eq!(resource(), (String::new(), "configmaps".to_string()));
    }
}
