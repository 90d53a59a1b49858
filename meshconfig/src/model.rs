//! The model: every valid object from the sources, as one immutable snapshot per change.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::k8s::{
    AuthorizationPolicy, DestinationRule, Gateway, Namespace, Object, Origin, Pod, Problem,
    Service, VirtualService,
};

/// `(namespace, name)`; empty namespace for cluster-scoped objects.
pub type Key = (String, String);

/// One consistent view of the inputs. Built once per (debounced) change and shared as
/// `Arc<Snapshot>`; translation and the debug endpoint read it, nothing mutates it.
#[derive(Debug, Default, serde::Serialize)]
pub struct Snapshot {
    /// Increases by one per snapshot published, for logs and the debug endpoint.
    pub generation: u64,
    pub namespaces: BTreeMap<String, Namespace>,
    /// Shared with the source (`Arc`): building a snapshot does not copy every pod.
    #[serde(serialize_with = "arcs_by_name")]
    pub pods: BTreeMap<Key, Arc<Pod>>,
    #[serde(serialize_with = "by_name")]
    pub services: BTreeMap<Key, Service>,
    #[serde(serialize_with = "by_name")]
    pub policies: BTreeMap<Key, AuthorizationPolicy>,
    #[serde(serialize_with = "by_name")]
    pub virtual_services: BTreeMap<Key, VirtualService>,
    #[serde(serialize_with = "by_name")]
    pub destination_rules: BTreeMap<Key, DestinationRule>,
    #[serde(serialize_with = "by_name")]
    pub gateways: BTreeMap<Key, Gateway>,
    #[serde(serialize_with = "by_name")]
    pub http_routes: BTreeMap<Key, crate::gateway_api::Route>,
    #[serde(serialize_with = "by_name")]
    pub grpc_routes: BTreeMap<Key, crate::gateway_api::Route>,
    #[serde(serialize_with = "by_name")]
    pub reference_grants: BTreeMap<Key, crate::reference_grant::ReferenceGrant>,
    #[serde(serialize_with = "by_name")]
    pub service_entries: BTreeMap<Key, crate::service_entry::ServiceEntry>,
    /// Invalid objects and conflicts, each naming file, object and field.
    pub problems: Vec<Problem>,
    /// Where each object came from, by kind and key: for problems found after parsing.
    #[serde(skip)]
    pub origins: BTreeMap<(&'static str, Key), Origin>,
}

impl Snapshot {
    /// Assemble from parsed objects. The first definition of an object wins; a second one
    /// (the same kind, namespace and name in another file) is reported and left out.
    pub fn build(objects: Vec<(Origin, Object)>, mut problems: Vec<Problem>) -> Snapshot {
        let mut s = Snapshot::default();
        let mut seen: BTreeMap<(&'static str, Key), Origin> = BTreeMap::new();
        for (origin, object) in objects {
            let meta = object.meta();
            let key = (meta.namespace.clone(), meta.name.clone());
            let kind = object.kind();
            if let Some(first) = seen.get(&(kind, key.clone())) {
                problems.push(Problem {
                    file: origin.file.clone(),
                    object: origin.object.clone(),
                    field: "metadata.name".into(),
                    reason: format!("already defined in {}", first.file),
                });
                continue;
            }
            seen.insert((kind, key.clone()), origin);
            match object {
                Object::Namespace(o) => {
                    s.namespaces.insert(key.1, o);
                }
                Object::Pod(o) => {
                    s.pods.insert(key, o);
                }
                Object::Service(o) => {
                    s.services.insert(key, o);
                }
                Object::AuthorizationPolicy(o) => {
                    s.policies.insert(key, o);
                }
                Object::VirtualService(o) => {
                    s.virtual_services.insert(key, o);
                }
                Object::DestinationRule(o) => {
                    s.destination_rules.insert(key, o);
                }
                Object::Gateway(o) => {
                    s.gateways.insert(key, o);
                }
                Object::HttpRoute(o) => {
                    s.http_routes.insert(key, o);
                }
                Object::GrpcRoute(o) => {
                    s.grpc_routes.insert(key, o);
                }
                Object::ReferenceGrant(o) => {
                    s.reference_grants.insert(key, o);
                }
                Object::ServiceEntry(o) => {
                    s.service_entries.insert(key, o);
                }
            }
        }
        // A route to a subset nobody defines would send traffic nowhere: leave the
        // VirtualService out, as an invalid object.
        let undefined: Vec<(Key, String, String)> = s
            .virtual_services
            .iter()
            .filter_map(|(key, vs)| {
                crate::routing::undefined_subset(vs, s.destination_rules.values())
                    .map(|(field, reason)| (key.clone(), field, reason))
            })
            .collect();
        for (key, field, reason) in undefined {
            s.virtual_services.remove(&key);
            let origin = seen.get(&("VirtualService", key.clone()));
            problems.push(Problem {
                file: origin.map(|o| o.file.clone()).unwrap_or_default(),
                object: format!("VirtualService {}/{}", key.0, key.1),
                field,
                reason,
            });
        }
        problems.sort();
        s.problems = problems;
        s.origins = seen;
        s
    }

    /// Keep the last good version of each object that `previous` held and this snapshot lost
    /// to a problem (an edit made it invalid): a bad edit must not drop the routes or policy
    /// that worked. Each such problem says so. An object deleted from the source has no problem
    /// and goes. Applied by the sources to every snapshot after the first.
    pub fn keep_last_good(&mut self, previous: &Snapshot) {
        let mut kept = Vec::new();
        for problem in &mut self.problems {
            let Some((kind, key)) = object_key(&problem.object) else {
                continue;
            };
            let restored = match kind {
                "Namespace" => restore(&mut self.namespaces, &previous.namespaces, &key.1),
                "Pod" => restore(&mut self.pods, &previous.pods, &key),
                "Service" => restore(&mut self.services, &previous.services, &key),
                "AuthorizationPolicy" => restore(&mut self.policies, &previous.policies, &key),
                "VirtualService" => {
                    restore(&mut self.virtual_services, &previous.virtual_services, &key)
                }
                "DestinationRule" => restore(
                    &mut self.destination_rules,
                    &previous.destination_rules,
                    &key,
                ),
                "Gateway" => restore(&mut self.gateways, &previous.gateways, &key),
                "HTTPRoute" => restore(&mut self.http_routes, &previous.http_routes, &key),
                "GRPCRoute" => restore(&mut self.grpc_routes, &previous.grpc_routes, &key),
                "ReferenceGrant" => {
                    restore(&mut self.reference_grants, &previous.reference_grants, &key)
                }
                "ServiceEntry" => {
                    restore(&mut self.service_entries, &previous.service_entries, &key)
                }
                _ => false,
            };
            if !restored {
                continue;
            }
            if let Some(origin) = previous.origins.get(&(kind, key.clone())) {
                kept.push(((kind, key), origin.clone()));
            }
            let reason = problem
                .reason
                .strip_suffix(LEFT_OUT)
                .unwrap_or(&problem.reason)
                .to_string();
            problem.reason = format!("{reason}; the last good version stays");
        }
        self.origins.extend(kept);
    }

    /// The file `kind` `key` came from (empty when unknown).
    pub fn file_of(&self, kind: &'static str, key: &Key) -> &str {
        self.origins
            .get(&(kind, key.clone()))
            .map(|o| o.file.as_str())
            .unwrap_or_default()
    }

    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns).map(|n| &n.meta.labels)
    }

    /// `(namespace, service account)` of every pod (for the folder source's workload tokens:
    /// waypoints, and proxies running for one workload as Istio's "dedicated" mode,
    /// authenticate as their own identity).
    pub fn service_accounts(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .pods
            .values()
            .filter(|p| !p.service_account.is_empty())
            .map(|p| (p.meta.namespace.clone(), p.service_account.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The nodes pods are scheduled on (for node agent tokens).
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .pods
            .values()
            .map(|p| p.node_name.clone())
            .filter(|n| !n.is_empty())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

pub type SharedSnapshot = Arc<Snapshot>;

/// How a problem that drops a VirtualService ends (replaced when its last good version stays).
const LEFT_OUT: &str = "; the VirtualService is left out";

/// Every kind the model reads, in the order pilot's Kubernetes source keeps its stores and hands
/// objects to the model. One list: a kind missing here would be read but never kept at its last
/// good version after a bad edit.
pub const KINDS: [&str; 11] = [
    "Namespace",
    "Pod",
    "Service",
    "AuthorizationPolicy",
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "HTTPRoute",
    "GRPCRoute",
    "ReferenceGrant",
    "ServiceEntry",
];

/// The kind and key a problem's object names (`Kind ns/name`, `Namespace name`); `None` for a
/// document that never became an object (`document 3`).
fn object_key(object: &str) -> Option<(&'static str, Key)> {
    let (kind, rest) = object.split_once(' ')?;
    let kind = KINDS.into_iter().find(|k| *k == kind)?;
    let key = match rest.split_once('/') {
        Some((ns, name)) if kind != "Namespace" => (ns.to_string(), name.to_string()),
        None if kind == "Namespace" => (String::new(), rest.to_string()),
        _ => return None,
    };
    Some((kind, key))
}

/// Put `previous`'s `key` into `now` if `now` lacks it; whether it did.
fn restore<K: Ord + Clone, V: Clone>(
    now: &mut BTreeMap<K, V>,
    previous: &BTreeMap<K, V>,
    key: &K,
) -> bool {
    if now.contains_key(key) {
        return false;
    }
    match previous.get(key) {
        Some(v) => {
            now.insert(key.clone(), v.clone());
            true
        }
        None => false,
    }
}

/// A map keyed by `(namespace, name)` as one keyed by `namespace/name`: JSON keys are strings
/// (the debug endpoint serves the model as JSON).
fn arcs_by_name<S: serde::Serializer, V: serde::Serialize>(
    map: &BTreeMap<Key, Arc<V>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        map.iter()
            .map(|((ns, name), v)| (format!("{ns}/{name}"), &**v)),
    )
}

fn by_name<S: serde::Serializer, V: serde::Serialize>(
    map: &BTreeMap<Key, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        map.iter()
            .map(|((ns, name), v)| (format!("{ns}/{name}"), v)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::parse_documents;

    #[test]
    fn serializes_as_json() {
        let p = parse_documents(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n",
            "a.yaml",
        );
        let s = Snapshot::build(p.objects, vec![]);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["pods"]["shop/p"]["meta"]["name"], "p");
    }

    #[test]
    fn routes_to_undefined_subsets_leave_the_virtual_service_out() {
        let p = parse_documents(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v3}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ok, namespace: bookinfo}
spec: {hosts: [ratings], http: [{route: [{destination: {host: reviews.bookinfo.svc.cluster.local, subset: v1}}]}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}
"#,
            "routing.yaml",
        );
        let s = Snapshot::build(p.objects, p.problems);
        assert_eq!(s.virtual_services.len(), 1);
        assert!(
            s.virtual_services
                .contains_key(&("bookinfo".into(), "ok".into()))
        );
        assert_eq!(
            s.problems[0].to_string(),
            "routing.yaml: VirtualService bookinfo/reviews: field \"spec.http[0].route[0].destination.subset\": subset \"v3\" of host \"reviews\" is defined by no DestinationRule; the VirtualService is left out"
        );
    }

    #[test]
    fn problems_name_the_object_they_keep() {
        let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
        assert_eq!(
            object_key("VirtualService shop/r"),
            Some(("VirtualService", key("shop", "r")))
        );
        assert_eq!(
            object_key("Namespace shop"),
            Some(("Namespace", key("", "shop")))
        );
        assert_eq!(object_key("document 3"), None);
        assert_eq!(object_key("document 1 items[0]"), None);
        assert_eq!(object_key("Pod shop"), None);

        // A Service made invalid keeps its ports (a broken `metadata` names no object, so
        // it cannot be kept: that problem names the document).
        let svc = |ports: &str| {
            parse_documents(
                &format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: 10.0.0.9, ports: {ports}}}\n"
                ),
                "svc.yaml",
            )
        };
        let good = svc("[{port: 80}]");
        let previous = Snapshot::build(good.objects, good.problems);
        let bad = svc("oops");
        let mut now = Snapshot::build(bad.objects, bad.problems);
        assert!(now.services.is_empty(), "{:?}", now.problems);
        now.keep_last_good(&previous);
        assert_eq!(now.services[&key("shop", "web")].ports.len(), 1);
        assert!(
            now.problems[0]
                .reason
                .ends_with("; the last good version stays"),
            "{:?}",
            now.problems
        );
    }

    #[test]
    fn every_kind_keeps_its_last_good_version() {
        // A ServiceEntry made invalid (a wildcard host) keeps its last good version, as every
        // other kind does: the list of kinds is one, so no kind can be forgotten.
        let entry = |hosts: &str| {
            parse_documents(
                &format!(
                    "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext, namespace: shop}}\nspec: {{hosts: {hosts}, addresses: [10.96.1.1], ports: [{{number: 80}}], workloadSelector: {{labels: {{app: ext}}}}}}\n"
                ),
                "ext.yaml",
            )
        };
        let good = entry("[ext.example.com]");
        let previous = Snapshot::build(good.objects, good.problems);
        assert_eq!(previous.service_entries.len(), 1, "{:?}", previous.problems);
        let bad = entry("[\"*.example.com\"]");
        let mut now = Snapshot::build(bad.objects, bad.problems);
        assert!(now.service_entries.is_empty(), "{:?}", now.problems);
        now.keep_last_good(&previous);
        let key = ("shop".to_string(), "ext".to_string());
        assert_eq!(now.service_entries[&key].hosts, ["ext.example.com"]);
        assert!(
            now.problems[0]
                .reason
                .ends_with("; the last good version stays"),
            "{:?}",
            now.problems
        );
        for kind in KINDS {
            assert_eq!(
                object_key(&format!("{kind} a/b")).map(|k| k.0),
                (kind != "Namespace").then_some(kind),
                "{kind}"
            );
        }
    }

    #[test]
    fn duplicates_across_files_are_reported() {
        let a = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "a.yaml");
        let b = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "b.yaml");
        let mut objects = a.objects;
        objects.extend(b.objects);
        let s = Snapshot::build(objects, vec![]);
        assert_eq!(s.pods.len(), 1);
        assert_eq!(
            s.problems[0].to_string(),
            "b.yaml: Pod default/p: field \"metadata.name\": already defined in a.yaml"
        );
    }
}
