//! Waypoint provisioning (Kubernetes source): every `istio-waypoint` Gateway gets a ServiceAccount, Deployment and Service, server-side applied and owned by the Gateway.
//!
//! As istiod does for its waypoints: the objects are named after the Gateway, live in its
//! namespace and carry an owner reference to it, so deleting the Gateway lets Kubernetes'
//! garbage collector remove them; pilot never deletes anything itself. `objects` is the pure
//! part (Gateway → the three objects); `provision` applies them off the snapshot path.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::model::Snapshot;
use crate::routing::Gateway;

/// The field manager of every apply: who owns the fields pilot sets.
pub const FIELD_MANAGER: &str = "pilot";
/// The label naming a waypoint's Gateway, on its pods (the Service selects on it).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Waypoint pods are never captured by the node proxy: they originate HBONE themselves.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The waypoint's HBONE port, named `mesh` as the Gateway's listener is.
pub const HBONE_PORT: u16 = 15008;
/// The waypoint's readiness endpoint (`/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;
/// The default waypoint image.
pub const DEFAULT_IMAGE: &str = "ghcr.io/example/mesh-waypoint:dev";
/// The default pilot xDS address waypoints dial (pilot's Service in deploy/pilot).
pub const DEFAULT_XDS_ADDRESS: &str = "https://pilot.istio-system.svc:15012";
/// The ConfigMap (in the waypoint's namespace) holding the mesh root as `root-cert.pem`,
/// under Istio's name; `root_configmap` publishes it in every namespace.
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";

const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const TOKEN_FILE: &str = "istio-token";
const ROOT_CERT_DIR: &str = "/var/run/secrets/istio";
const ROOT_CERT_FILE: &str = "root-cert.pem";

/// What every waypoint Deployment is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The waypoint container image.
    pub image: String,
    /// Pilot's xDS/CA address as the waypoint dials it (`--xds-address`).
    pub xds_address: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: DEFAULT_IMAGE.to_string(),
            xds_address: DEFAULT_XDS_ADDRESS.to_string(),
        }
    }
}

/// The objects of one waypoint Gateway, in apply order: ServiceAccount, Deployment, Service.
/// `None` for a Gateway that is not a waypoint; an error names the Gateway when it has no uid
/// (nothing can be owned by it).
pub fn objects(gw: &Gateway, opts: &Options) -> Option<Result<[Value; 3], String>> {
    if !gw.is_waypoint() {
        return None;
    }
    let name = &gw.meta.name;
    let ns = &gw.meta.namespace;
    let Some(uid) = &gw.meta.uid else {
        return Some(Err(format!(
            "Gateway {ns}/{name}: no metadata.uid, so nothing can be owned by it"
        )));
    };
    let owner = json!([{
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": name,
        "uid": uid,
    }]);
    let selector = json!({ GATEWAY_NAME_LABEL: name });
    let labels = json!({ GATEWAY_NAME_LABEL: name, DATAPLANE_MODE_LABEL: "none" });
    let metadata = json!({
        "name": name,
        "namespace": ns,
        "labels": labels,
        "ownerReferences": owner,
    });
    let field = |path: &str| json!({ "valueFrom": { "fieldRef": { "fieldPath": path } } });
    let env = |var: &str, path: &str| {
        let mut e = field(path);
        e["name"] = var.into();
        e
    };
    let service_account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata,
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "selector": { "matchLabels": selector },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "serviceAccountName": name,
                    "containers": [{
                        "name": "waypoint",
                        "image": opts.image,
                        "args": [
                            format!("--xds-address={}", opts.xds_address),
                            format!("--xds-root-cert={ROOT_CERT_DIR}/{ROOT_CERT_FILE}"),
                            format!("--xds-token-file={TOKEN_DIR}/{TOKEN_FILE}"),
                        ],
                        "env": [
                            env("POD_IP", "status.podIP"),
                            env("POD_NAME", "metadata.name"),
                            env("POD_NAMESPACE", "metadata.namespace"),
                            env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
                        ],
                        "ports": [
                            { "name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP" },
                            { "name": "status-port", "containerPort": READINESS_PORT, "protocol": "TCP" },
                        ],
                        "readinessProbe": {
                            "httpGet": { "path": "/healthz/ready", "port": READINESS_PORT },
                            "periodSeconds": 15,
                            "failureThreshold": 4,
                        },
                        "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } },
                        "volumeMounts": [
                            { "name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true },
                            { "name": "istio-ca-root-cert", "mountPath": ROOT_CERT_DIR, "readOnly": true },
                        ],
                    }],
                    "volumes": [
                        {
                            "name": "istio-token",
                            "projected": { "sources": [{ "serviceAccountToken": {
                                "audience": crate::token_review::AUDIENCE,
                                "expirationSeconds": 43200,
                                "path": TOKEN_FILE,
                            }}]},
                        },
                        {
                            "name": "istio-ca-root-cert",
                            "configMap": { "name": ROOT_CERT_CONFIGMAP },
                        },
                    ],
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": selector,
            "ports": [{ "name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT, "protocol": "TCP" }],
        },
    });
    Some(Ok([service_account, deployment, service]))
}

/// `(namespace, kind, name)` of an applied object.
type Applied = BTreeMap<(String, String, String), Value>;

/// Apply the objects of every waypoint Gateway in each snapshot `snapshots` publishes, until
/// its sender is gone. An object is applied again only when it differs from what was last
/// applied successfully, so a failure (logged with the object's name) is retried on the next
/// snapshot. Runs as its own task: snapshot publishing never waits for it.
pub async fn provision(
    client: Client,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    opts: Options,
) {
    let mut applied = Applied::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if snap.generation > 0 {
            let mut wanted = Applied::new();
            let mut problems = BTreeSet::new();
            for gw in snap.gateways.values() {
                match objects(gw, &opts) {
                    None => {}
                    Some(Err(e)) => {
                        problems.insert(e);
                    }
                    Some(Ok(objs)) => {
                        for o in objs {
                            let key = (
                                gw.meta.namespace.clone(),
                                o["kind"].as_str().unwrap_or_default().to_string(),
                                gw.meta.name.clone(),
                            );
                            wanted.insert(key, o);
                        }
                    }
                }
            }
            for p in problems.difference(&reported) {
                warn!("waypoint not provisioned: {p}");
            }
            reported = problems;
            // Objects of Gateways gone are garbage-collected through their owner reference.
            applied.retain(|k, _| wanted.contains_key(k));
            for (key, object) in wanted {
                if applied.get(&key) == Some(&object) {
                    continue;
                }
                let (ns, kind, name) = &key;
                match apply(&client, ns, kind, name, &object).await {
                    Ok(()) => {
                        info!(%kind, namespace = %ns, %name, "waypoint object applied");
                        applied.insert(key, object);
                    }
                    Err(e) => warn!(
                        %kind, namespace = %ns, %name,
                        "applying waypoint object failed, retrying on the next change: {e}"
                    ),
                }
            }
        }
        if snapshots.changed().await.is_err() {
            debug!("snapshot source gone: waypoint provisioning stops");
            return;
        }
    }
}

/// Server-side apply of one object (forced: pilot owns the fields it sets, as istiod does).
async fn apply(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
    object: &Value,
) -> Result<(), kube::Error> {
    async fn patch<K>(client: &Client, ns: &str, name: &str, object: &Value) -> kube::Result<()>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        Api::<K>::namespaced(client.clone(), ns)
            .patch(name, &params, &Patch::Apply(object))
            .await
            .map(|_| ())
    }
    match kind {
        "ServiceAccount" => patch::<ServiceAccount>(client, ns, name, object).await,
        "Deployment" => patch::<Deployment>(client, ns, name, object).await,
        "Service" => patch::<Service>(client, ns, name, object).await,
        other => unreachable!("objects() makes no {other}"),
    }
}

/// `(API group, resource)` of every kind pilot applies (deploy/pilot/rbac.yaml grants
/// `get, patch, create` on them, what server-side apply needs).
pub fn applied_resources() -> Vec<(String, String)> {
    fn of<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    vec![of::<ServiceAccount>(), of::<Deployment>(), of::<Service>()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{Object, Origin, parse_object};

    fn gateway(class: &str, uid: Option<&str>) -> Gateway {
        let uid = uid.map(|u| format!("uid: {u}")).unwrap_or_default();
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: reviews-wp, namespace: shop, {uid}}}
spec:
  gatewayClassName: {class}
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"
        );
        let origin = Origin {
            file: "t.yaml".into(),
            object: "Gateway shop/reviews-wp".into(),
        };
        match parse_object(serde_yaml_ng::from_str(&yaml).unwrap(), origin) {
            Ok(Some((_, Object::Gateway(g)))) => g,
            other => panic!("not a gateway: {other:?}"),
        }
    }

    #[test]
    fn a_waypoint_gets_its_three_objects() {
        let opts = Options::default();
        let [sa, dep, svc] = objects(&gateway("istio-waypoint", Some("u-1")), &opts)
            .unwrap()
            .unwrap();
        for (o, kind) in [
            (&sa, "ServiceAccount"),
            (&dep, "Deployment"),
            (&svc, "Service"),
        ] {
            assert_eq!(o["kind"], kind);
            assert_eq!(o["metadata"]["name"], "reviews-wp");
            assert_eq!(o["metadata"]["namespace"], "shop");
            assert_eq!(
                o["metadata"]["ownerReferences"],
                json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                        "name": "reviews-wp", "uid": "u-1"}])
            );
            assert_eq!(
                o["metadata"]["labels"][GATEWAY_NAME_LABEL], "reviews-wp",
                "{kind}"
            );
        }
        let pod = &dep["spec"]["template"];
        assert_eq!(
            pod["metadata"]["labels"],
            json!({GATEWAY_NAME_LABEL: "reviews-wp", DATAPLANE_MODE_LABEL: "none"})
        );
        assert_eq!(
            dep["spec"]["selector"]["matchLabels"],
            json!({GATEWAY_NAME_LABEL: "reviews-wp"})
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "reviews-wp");
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["name"], "waypoint");
        assert_eq!(c["image"], DEFAULT_IMAGE);
        assert_eq!(
            c["args"],
            json!([
                "--xds-address=https://pilot.istio-system.svc:15012",
                "--xds-root-cert=/var/run/secrets/istio/root-cert.pem",
                "--xds-token-file=/var/run/secrets/tokens/istio-token",
            ])
        );
        let env: Vec<(&str, &str)> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap(),
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            env,
            [
                ("POD_IP", "status.podIP"),
                ("POD_NAME", "metadata.name"),
                ("POD_NAMESPACE", "metadata.namespace"),
                ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            ]
        );
        assert_eq!(
            c["ports"][0],
            json!({"name": "mesh", "containerPort": 15008, "protocol": "TCP"})
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"],
            json!({"path": "/healthz/ready", "port": 15021})
        );
        assert_eq!(
            c["resources"]["requests"],
            json!({"cpu": "100m", "memory": "128Mi"})
        );
        let token = &pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "istio-ca");
        assert_eq!(token["path"], "istio-token");
        assert_eq!(
            svc["spec"],
            json!({"selector": {GATEWAY_NAME_LABEL: "reviews-wp"},
                   "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"}]})
        );
        // The JSON is what the typed API reads: nothing misspelt or misplaced.
        let typed: Deployment = serde_json::from_value(dep.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), dep);
        let typed: Service = serde_json::from_value(svc.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), svc);
    }

    #[test]
    fn other_gateways_get_nothing_and_a_waypoint_without_uid_is_an_error() {
        let opts = Options::default();
        assert!(objects(&gateway("istio", Some("u-1")), &opts).is_none());
        let e = objects(&gateway("istio-waypoint", None), &opts)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e,
            "Gateway shop/reviews-wp: no metadata.uid, so nothing can be owned by it"
        );
    }

    #[test]
    fn options_reach_the_container() {
        let opts = Options {
            image: "registry.local/wp:1".into(),
            xds_address: "https://pilot.mesh:15012".into(),
        };
        let [_, dep, _] = objects(&gateway("istio-waypoint", Some("u")), &opts)
            .unwrap()
            .unwrap();
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "registry.local/wp:1");
        assert_eq!(c["args"][0], "--xds-address=https://pilot.mesh:15012");
    }
}
