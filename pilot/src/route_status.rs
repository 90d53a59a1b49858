//! Kubernetes source: the status pilot writes back on Gateway API routes (`status.parents`: Accepted, ResolvedRefs) and on waypoint Gateways (Accepted, Programmed, addresses), by merge patch of their status subresource, whenever it changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::crds;
use crate::gateway_api::{self, RouteKind, gateway_status, keep_transition_times, route_status};
use crate::model::{Key, Snapshot};

/// `(kind, namespace/name)` of an object whose status pilot writes.
type Target = (&'static str, Key);

/// The statuses `s` calls for, with `now` as the time of any transition.
pub fn wanted(s: &Snapshot, domain: &str, now: &str) -> BTreeMap<Target, Json> {
    let attached = gateway_api::attach(s, domain);
    let mut out = BTreeMap::new();
    for ((kind, key), statuses) in &attached.statuses {
        let route = match kind {
            RouteKind::Http => s.http_routes.get(key),
            RouteKind::Grpc => s.grpc_routes.get(key),
        };
        // A route none of whose parents pilot handles is another implementation's.
        if let Some(route) = route
            && !statuses.is_empty()
        {
            out.insert(
                (kind.kind(), key.clone()),
                route_status(route, statuses, now),
            );
        }
    }
    for key in s.gateways.keys() {
        let attached_routes = attached.attached_to_gateway.get(key).copied().unwrap_or(0);
        if let Some(status) = gateway_status(s, key, attached_routes, now) {
            out.insert(("Gateway", key.clone()), status);
        }
    }
    out
}

fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Write the status of every route and waypoint Gateway of each snapshot `snapshots`
/// publishes, until its sender is gone. A status is written when it differs from the one last
/// written (transition times kept where a condition did not change); a failure is logged and
/// retried on the next snapshot. Runs as its own task: publishing never waits for it.
pub async fn write_status(
    client: Client,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    domain: String,
) {
    let mut written: BTreeMap<Target, Json> = BTreeMap::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if snap.generation > 0 {
            let wanted = wanted(&snap, &domain, &now());
            written.retain(|k, _| wanted.contains_key(k));
            for (target, status) in wanted {
                let status = keep_transition_times(status, written.get(&target));
                if written.get(&target) == Some(&status) {
                    continue;
                }
                let (kind, (ns, name)) = &target;
                match patch(&client, kind, ns, name, &status).await {
                    Ok(()) => {
                        info!(%kind, namespace = %ns, %name, "status written");
                        written.insert(target, status);
                    }
                    Err(e) => warn!(
                        %kind, namespace = %ns, %name,
                        "writing the status failed, retrying on the next change: {e}"
                    ),
                }
            }
        }
        if snapshots.changed().await.is_err() {
            debug!("snapshot source gone: status writing stops");
            return;
        }
    }
}

/// A merge patch of the object's status subresource (what pilot writes is all of
/// `status.parents` for a route, other controllers' entries included, and the Gateway's
/// conditions, addresses and listeners).
async fn patch(
    client: &Client,
    kind: &str,
    ns: &str,
    name: &str,
    status: &Json,
) -> Result<(), kube::Error> {
    async fn merge<K>(client: &Client, ns: &str, name: &str, status: &Json) -> kube::Result<()>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        Api::<K>::namespaced(client.clone(), ns)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .map(|_| ())
    }
    match kind {
        "HTTPRoute" => merge::<crds::HTTPRoute>(client, ns, name, status).await,
        "GRPCRoute" => merge::<crds::GRPCRoute>(client, ns, name, status).await,
        _ => merge::<crds::Gateway>(client, ns, name, status).await,
    }
}

/// `(API group, resource)` of every status subresource pilot patches (deploy/pilot/rbac.yaml
/// grants `patch` on them).
pub fn status_resources() -> Vec<(String, String)> {
    fn of<K: Resource<DynamicType = ()>>() -> (String, String) {
        (
            K::group(&()).into_owned(),
            format!("{}/status", K::plural(&())),
        )
    }
    vec![
        of::<crds::HTTPRoute>(),
        of::<crds::GRPCRoute>(),
        of::<crds::Gateway>(),
    ]
}
