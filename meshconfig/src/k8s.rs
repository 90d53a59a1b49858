//! The Kubernetes and Istio objects pilot reads, parsed and validated field by field so that each problem names its object and field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use serde_yaml_ng::Value;

/// Label on a namespace (or pod) that puts it in ambient mode (or, on a pod, `none` opts out).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Label naming the waypoint a namespace, service or pod uses.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Label naming the namespace of that waypoint, when it is not the object's own.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// Annotation that makes an AuthorizationPolicy dry-run.
pub const DRY_RUN: &str = "istio.io/dry-run";
/// Pod label saying the workload speaks HBONE itself (value `http`, Istio's
/// `networking.istio.io/tunnel`): it is sent as an HBONE workload whether or not it is in
/// ambient mode (e.g. a proxy of its own, on a node without ztunnel).
pub const TUNNEL: &str = "networking.istio.io/tunnel";

/// Where an object came from and which one it is, for problem reports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Origin {
    pub file: String,
    /// `Kind namespace/name` (or `document N` before the kind is known).
    pub object: String,
}

/// An invalid object (or document): reported, and left out of the model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Problem {
    pub file: String,
    pub object: String,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: field \"{}\": {}",
            self.file, self.object, self.field, self.reason
        )
    }
}

impl Origin {
    pub(crate) fn problem(&self, field: impl Into<String>, reason: impl Into<String>) -> Problem {
        Problem {
            file: self.file.clone(),
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Meta {
    pub name: String,
    pub namespace: String,
    /// Kubernetes' object UID, when the YAML carries one (exported objects do).
    pub uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `metadata.generation` (0 when not given), reported back as `observedGeneration`.
    pub generation: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Namespace {
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pod {
    pub meta: Meta,
    pub node_name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `status.phase`, when given.
    pub phase: Option<String>,
    /// The `Ready` condition, when given.
    pub ready: Option<bool>,
    /// Named container ports, for services whose `targetPort` is a name.
    pub named_ports: BTreeMap<String, u16>,
    /// Kind of the controller owning the pod (`ReplicaSet`, `Job`, …).
    pub owner: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
    pub app_protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub meta: Meta,
    /// Empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None`: no selector, so no endpoints from pods.
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyRule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    pub meta: Meta,
    /// `None`: the whole namespace (or the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// Bound to a waypoint or gateway (`targetRef` / `targetRefs`): not for the node proxy.
    pub target_refs: Vec<TargetRef>,
    pub action: PolicyAction,
    /// `None`: no `rules` field at all (matches nothing); `Some(empty rule)` matches everything.
    pub rules: Vec<PolicyRule>,
    pub dry_run: bool,
}

/// One entry of a policy's `targetRef` / `targetRefs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    /// Empty: the policy's own namespace.
    pub namespace: String,
    /// Where it was written (`spec.targetRef` or `spec.targetRefs[i]`), for problems.
    pub field: String,
}

impl std::fmt::Display for TargetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

pub use crate::routing::{DestinationRule, Gateway, VirtualService};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Object {
    Namespace(Namespace),
    /// Shared: the folder source's parse cache and every snapshot hold the same pod.
    Pod(#[serde(serialize_with = "shared")] std::sync::Arc<Pod>),
    Service(Service),
    AuthorizationPolicy(AuthorizationPolicy),
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    Gateway(Gateway),
    HttpRoute(crate::gateway_api::Route),
    GrpcRoute(crate::gateway_api::Route),
    ReferenceGrant(crate::reference_grant::ReferenceGrant),
    ServiceEntry(crate::service_entry::ServiceEntry),
}

/// Serialize what an `Arc` points to (serde's `rc` feature is not on).
fn shared<S: serde::Serializer, T: serde::Serialize>(
    v: &std::sync::Arc<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    (**v).serialize(s)
}

impl Object {
    pub fn meta(&self) -> &Meta {
        match self {
            Object::Namespace(o) => &o.meta,
            Object::Pod(o) => &o.meta,
            Object::Service(o) => &o.meta,
            Object::AuthorizationPolicy(o) => &o.meta,
            Object::VirtualService(o) => &o.meta,
            Object::DestinationRule(o) => &o.meta,
            Object::Gateway(o) => &o.meta,
            Object::HttpRoute(o) | Object::GrpcRoute(o) => &o.meta,
            Object::ReferenceGrant(o) => &o.meta,
            Object::ServiceEntry(o) => &o.meta,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::VirtualService(_) => "VirtualService",
            Object::DestinationRule(_) => "DestinationRule",
            Object::Gateway(_) => "Gateway",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::GrpcRoute(_) => "GRPCRoute",
            Object::ReferenceGrant(_) => "ReferenceGrant",
            Object::ServiceEntry(_) => "ServiceEntry",
        }
    }
}

/// Everything parsed from one file: the valid objects, and one problem per invalid one.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<(Origin, Object)>,
    pub problems: Vec<Problem>,
    /// Documents of kinds pilot does not use (Deployments, ConfigMaps, …): ignored, counted.
    pub ignored: usize,
}

/// Parse a multi-document YAML text. `file` names it in problems.
pub fn parse_documents(text: &str, file: &str) -> Parsed {
    let mut out = Parsed::default();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file: file.to_string(),
            object: format!("document {}", i + 1),
        };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: later documents cannot be found reliably.
                out.problems
                    .push(origin.problem("", format!("not YAML: {e}")));
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        // `kind: List` (what `kubectl get -o yaml` prints) holds its objects in `items`.
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value
                .get("items")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                let origin = Origin {
                    file: file.to_string(),
                    object: format!("document {} items[{j}]", i + 1),
                };
                parse_into(item, origin, &mut out);
            }
            continue;
        }
        parse_into(value, origin, &mut out);
    }
    out
}

fn parse_into(value: Value, origin: Origin, out: &mut Parsed) {
    match parse_object(value, origin.clone()) {
        Ok(Some((origin, object))) => out.objects.push((origin, object)),
        Ok(None) => out.ignored += 1,
        Err(p) => out.problems.push(p),
    }
}

/// One object; `Ok(None)` for kinds pilot does not read.
pub fn parse_object(value: Value, origin: Origin) -> Result<Option<(Origin, Object)>, Problem> {
    let Some(map) = value.as_mapping() else {
        return Err(origin.problem("", "a document must be a mapping (a Kubernetes object)"));
    };
    let text = |k: &str| map.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let api_version = text("apiVersion");
    let kind = text("kind");
    if api_version.is_empty() {
        return Err(origin.problem("apiVersion", "is required"));
    }
    if kind.is_empty() {
        return Err(origin.problem("kind", "is required"));
    }
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    let known = matches!(
        (group, kind.as_str()),
        ("", "Namespace" | "Pod" | "Service")
            | ("security.istio.io", "AuthorizationPolicy")
            | (
                "networking.istio.io",
                "VirtualService" | "DestinationRule" | "ServiceEntry"
            )
            | (
                "gateway.networking.k8s.io",
                "Gateway" | "HTTPRoute" | "GRPCRoute" | "ReferenceGrant"
            )
    );
    if !known {
        return Ok(None);
    }
    let raw_meta: RawMeta = match map.get("metadata") {
        Some(m) => serde_yaml_ng::from_value(m.clone())
            .map_err(|e| origin.problem("metadata", e.to_string()))?,
        None => return Err(origin.problem("metadata.name", "is required")),
    };
    let namespaced = kind != "Namespace";
    let namespace = match (namespaced, raw_meta.namespace) {
        (false, _) => String::new(),
        (true, Some(ns)) => ns,
        // As `kubectl apply` without `-n`.
        (true, None) => "default".to_string(),
    };
    let name = raw_meta.name.unwrap_or_default();
    let label = if namespaced {
        format!("{kind} {namespace}/{name}")
    } else {
        format!("{kind} {name}")
    };
    let origin = Origin {
        file: origin.file,
        object: label,
    };
    if name.is_empty() {
        return Err(origin.problem("metadata.name", "is required"));
    }
    dns_label(
        &origin,
        "metadata.name",
        &name,
        kind == "Pod" || kind == "Namespace",
    )?;
    if namespaced {
        dns_label(&origin, "metadata.namespace", &namespace, true)?;
    }
    let meta = Meta {
        name,
        namespace,
        uid: raw_meta.uid,
        labels: raw_meta.labels.unwrap_or_default(),
        annotations: raw_meta.annotations.unwrap_or_default(),
        generation: raw_meta.generation.unwrap_or(0),
    };
    let spec = map.get("spec").cloned().unwrap_or(Value::Null);
    let status = map.get("status").cloned().unwrap_or(Value::Null);
    let object = match kind.as_str() {
        "Namespace" => Object::Namespace(Namespace { meta }),
        "Pod" => Object::Pod(std::sync::Arc::new(pod(
            &origin,
            meta,
            spec,
            status,
            map.get("metadata"),
        )?)),
        "Service" => Object::Service(service(&origin, meta, spec)?),
        "AuthorizationPolicy" => {
            Object::AuthorizationPolicy(authorization_policy(&origin, meta, spec)?)
        }
        "VirtualService" => {
            Object::VirtualService(crate::routing::virtual_service(&origin, meta, spec)?)
        }
        "DestinationRule" => {
            Object::DestinationRule(crate::routing::destination_rule(&origin, meta, spec)?)
        }
        "Gateway" => Object::Gateway(crate::routing::gateway(&origin, meta, spec)?),
        "HTTPRoute" | "GRPCRoute" => {
            use crate::gateway_api::{RouteKind, route};
            let k = if kind == "HTTPRoute" {
                RouteKind::Http
            } else {
                RouteKind::Grpc
            };
            let r = route(k, &origin, meta, map.get("metadata"), spec, &status)?;
            match k {
                RouteKind::Http => Object::HttpRoute(r),
                RouteKind::Grpc => Object::GrpcRoute(r),
            }
        }
        "ReferenceGrant" => Object::ReferenceGrant(crate::reference_grant::reference_grant(
            &origin, meta, spec,
        )?),
        "ServiceEntry" => {
            Object::ServiceEntry(crate::service_entry::service_entry(&origin, meta, spec)?)
        }
        _ => return Ok(None),
    };
    Ok(Some((origin, object)))
}

#[derive(Deserialize)]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    generation: Option<i64>,
}

/// Kubernetes names: RFC 1123 labels for namespaces, pods, service accounts (which end up in
/// SPIFFE ids and resource names that split on '/'); subdomains (dots allowed) for the rest.
fn dns_label(origin: &Origin, field: &str, value: &str, strict: bool) -> Result<(), Problem> {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (!strict && c == '.');
    let ok = !value.is_empty()
        && value.len() <= if strict { 63 } else { 253 }
        && value.chars().all(ok_char)
        && !value.starts_with(['-', '.'])
        && !value.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(origin.problem(
            field,
            format!(
                "{value:?} is not a valid name (lower-case letters, digits and '-'{}, at most {} characters)",
                if strict { "" } else { " and '.'" },
                if strict { 63 } else { 253 }
            ),
        ))
    }
}

/// Deserialize a part of an object, naming the field in errors.
pub(crate) fn typed<T: serde::de::DeserializeOwned + Default>(
    origin: &Origin,
    field: &str,
    value: Value,
) -> Result<T, Problem> {
    if value.is_null() {
        return Ok(T::default());
    }
    serde_yaml_ng::from_value(value).map_err(|e| origin.problem(field, e.to_string()))
}

pub(crate) fn ip(origin: &Origin, field: &str, value: &str) -> Result<IpAddr, Problem> {
    value
        .parse()
        .map_err(|_| origin.problem(field, format!("{value:?} is not an IP address")))
}

pub(crate) fn port(origin: &Origin, field: &str, value: i64) -> Result<u16, Problem> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(origin.problem(field, format!("{value} is not a port (1-65535)"))),
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    service_account: Option<String>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    containers: Vec<RawContainer>,
}

#[derive(Default, Deserialize)]
struct RawContainer {
    #[serde(default)]
    ports: Vec<RawContainerPort>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainerPort {
    name: Option<String>,
    container_port: i64,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pod_i_ps: Vec<RawPodIp>,
    #[serde(default)]
    conditions: Vec<RawCondition>,
}

#[derive(Default, Deserialize)]
struct RawPodIp {
    ip: String,
}

#[derive(Default, Deserialize)]
struct RawCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOwner {
    kind: String,
    name: String,
    #[serde(default)]
    controller: bool,
}

fn pod(
    origin: &Origin,
    meta: Meta,
    spec: Value,
    status: Value,
    raw_meta: Option<&Value>,
) -> Result<Pod, Problem> {
    let spec: RawPodSpec = typed(origin, "spec", spec)?;
    let status: RawPodStatus = typed(origin, "status", status)?;
    let owners: Vec<RawOwner> = typed(
        origin,
        "metadata.ownerReferences",
        raw_meta
            .and_then(|m| m.get("ownerReferences"))
            .cloned()
            .unwrap_or(Value::Null),
    )?;
    let service_account = spec
        .service_account_name
        .or(spec.service_account)
        .unwrap_or_else(|| "default".to_string());
    dns_label(origin, "spec.serviceAccountName", &service_account, false)?;
    let mut ips = Vec::new();
    if let Some(v) = &status.pod_ip {
        ips.push(ip(origin, "status.podIP", v)?);
    }
    for (i, p) in status.pod_i_ps.iter().enumerate() {
        let a = ip(origin, &format!("status.podIPs[{i}].ip"), &p.ip)?;
        if !ips.contains(&a) {
            ips.push(a);
        }
    }
    let mut named_ports = BTreeMap::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, p) in container.ports.iter().enumerate() {
            let field = format!("spec.containers[{c}].ports[{i}].containerPort");
            let number = port(origin, &field, p.container_port)?;
            if let Some(name) = &p.name {
                named_ports.insert(name.clone(), number);
            }
        }
    }
    let ready = status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .map(|c| c.status == "True");
    let owner = owners
        .into_iter()
        .find(|o| o.controller)
        .map(|o| (o.kind, o.name));
    Ok(Pod {
        meta,
        node_name: spec.node_name.unwrap_or_default(),
        service_account,
        ips,
        host_network: spec.host_network,
        phase: status.phase,
        ready,
        named_ports,
        owner,
    })
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    selector: Option<BTreeMap<String, String>>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    name: Option<String>,
    port: Option<i64>,
    target_port: Option<Value>,
    protocol: Option<String>,
    app_protocol: Option<String>,
}

fn service(origin: &Origin, meta: Meta, spec: Value) -> Result<Service, Problem> {
    let spec: RawServiceSpec = typed(origin, "spec", spec)?;
    if spec.kind.as_deref() == Some("ExternalName") {
        return Err(origin.problem("spec.type", "ExternalName services are not supported"));
    }
    let mut cluster_ips = Vec::new();
    let listed = spec
        .cluster_ip
        .iter()
        .map(|v| ("spec.clusterIP".to_string(), v))
        .chain(
            spec.cluster_ips
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("spec.clusterIPs[{i}]"), v)),
        );
    for (field, v) in listed {
        if v == "None" || v.is_empty() {
            continue;
        }
        let a = ip(origin, &field, v)?;
        if !cluster_ips.contains(&a) {
            cluster_ips.push(a);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        if let Some(proto) = &p.protocol
            && proto != "TCP"
        {
            // The node proxy carries TCP only; other protocols are left alone, not an error.
            continue;
        }
        let number = port(
            origin,
            &field("port"),
            p.port
                .ok_or_else(|| origin.problem(field("port"), "is required"))?,
        )?;
        let target = match &p.target_port {
            None | Some(Value::Null) => TargetPort::Number(number),
            Some(Value::Number(n)) => {
                let n = n.as_i64().unwrap_or(-1);
                TargetPort::Number(port(origin, &field("targetPort"), n)?)
            }
            Some(Value::String(s)) => match s.parse::<i64>() {
                Ok(n) => TargetPort::Number(port(origin, &field("targetPort"), n)?),
                Err(_) => TargetPort::Name(s.clone()),
            },
            Some(_) => {
                return Err(origin.problem(field("targetPort"), "must be a number or a name"));
            }
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port: number,
            target,
            app_protocol: p.app_protocol.clone().unwrap_or_default(),
        });
    }
    Ok(Service {
        meta,
        cluster_ips,
        ports,
        selector: spec.selector.filter(|s| !s.is_empty()),
    })
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPolicySpec {
    selector: Option<RawSelector>,
    #[serde(default)]
    target_ref: Option<RawTargetRef>,
    #[serde(default)]
    target_refs: Vec<RawTargetRef>,
    action: Option<String>,
    provider: Option<Value>,
    rules: Option<Vec<RawRule>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTargetRef {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<RawFrom>,
    #[serde(default)]
    to: Vec<RawTo>,
    #[serde(default)]
    when: Vec<RawCondition2>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    source: RawSource,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    operation: RawOperation,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    not_service_accounts: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOperation {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<Value>,
    #[serde(default)]
    not_ports: Vec<Value>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCondition2 {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// Istio writes ports in policies as strings ("8080"); accept numbers too.
fn policy_ports(origin: &Origin, field: &str, values: &[Value]) -> Result<Vec<u16>, Problem> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let f = format!("{field}[{i}]");
            let n = match v {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.parse::<i64>().ok(),
                _ => None,
            };
            match n {
                Some(n) => port(origin, &f, n),
                None => Err(origin.problem(f, format!("{v:?} is not a port"))),
            }
        })
        .collect()
}

fn check_cidrs(origin: &Origin, field: &str, values: &[String]) -> Result<(), Problem> {
    for (i, v) in values.iter().enumerate() {
        crate::translate::parse_cidr(v).ok_or_else(|| {
            origin.problem(
                format!("{field}[{i}]"),
                format!("{v:?} is not an IP or CIDR"),
            )
        })?;
    }
    Ok(())
}

fn authorization_policy(
    origin: &Origin,
    meta: Meta,
    spec: Value,
) -> Result<AuthorizationPolicy, Problem> {
    let spec: RawPolicySpec = typed(origin, "spec", spec)?;
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => PolicyAction::Allow,
        "DENY" => PolicyAction::Deny,
        "AUDIT" => PolicyAction::Audit,
        "CUSTOM" => PolicyAction::Custom,
        other => {
            return Err(origin.problem(
                "spec.action",
                format!("{other:?} is not one of ALLOW, DENY, AUDIT, CUSTOM"),
            ));
        }
    };
    if action == PolicyAction::Custom && spec.provider.is_none() {
        return Err(origin.problem("spec.provider", "is required for action CUSTOM"));
    }
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        return Err(origin.problem(
            "spec.selector",
            "cannot be used together with targetRef/targetRefs",
        ));
    }
    let target_refs: Vec<TargetRef> = spec
        .target_ref
        .iter()
        .map(|t| (t, "spec.targetRef".to_string()))
        .chain(
            spec.target_refs
                .iter()
                .enumerate()
                .map(|(i, t)| (t, format!("spec.targetRefs[{i}]"))),
        )
        .map(|(t, field)| TargetRef {
            group: t.group.clone(),
            kind: t.kind.clone(),
            name: t.name.clone(),
            namespace: t.namespace.clone(),
            field,
        })
        .collect();
    let has_rules_field = spec.rules.is_some();
    let mut rules = Vec::new();
    for (r, raw) in spec.rules.unwrap_or_default().into_iter().enumerate() {
        let mut rule = PolicyRule::default();
        for (i, f) in raw.from.into_iter().enumerate() {
            let s = f.source;
            let base = format!("spec.rules[{r}].from[{i}].source");
            check_cidrs(origin, &format!("{base}.ipBlocks"), &s.ip_blocks)?;
            check_cidrs(origin, &format!("{base}.notIpBlocks"), &s.not_ip_blocks)?;
            check_cidrs(
                origin,
                &format!("{base}.remoteIpBlocks"),
                &s.remote_ip_blocks,
            )?;
            check_cidrs(
                origin,
                &format!("{base}.notRemoteIpBlocks"),
                &s.not_remote_ip_blocks,
            )?;
            for (j, sa) in s
                .service_accounts
                .iter()
                .chain(s.not_service_accounts.iter())
                .enumerate()
            {
                if sa.split('/').count() != 2 || sa.contains('*') {
                    return Err(origin.problem(
                        format!("{base}.serviceAccounts[{j}]"),
                        format!("{sa:?} must be <namespace>/<service account>, without wildcards"),
                    ));
                }
            }
            rule.from.push(Source {
                principals: s.principals,
                not_principals: s.not_principals,
                request_principals: s.request_principals,
                not_request_principals: s.not_request_principals,
                namespaces: s.namespaces,
                not_namespaces: s.not_namespaces,
                service_accounts: s.service_accounts,
                not_service_accounts: s.not_service_accounts,
                ip_blocks: s.ip_blocks,
                not_ip_blocks: s.not_ip_blocks,
                remote_ip_blocks: s.remote_ip_blocks,
                not_remote_ip_blocks: s.not_remote_ip_blocks,
            });
        }
        for (i, t) in raw.to.into_iter().enumerate() {
            let o = t.operation;
            let base = format!("spec.rules[{r}].to[{i}].operation");
            rule.to.push(Operation {
                ports: policy_ports(origin, &format!("{base}.ports"), &o.ports)?,
                not_ports: policy_ports(origin, &format!("{base}.notPorts"), &o.not_ports)?,
                hosts: o.hosts,
                not_hosts: o.not_hosts,
                methods: o.methods,
                not_methods: o.not_methods,
                paths: o.paths,
                not_paths: o.not_paths,
            });
        }
        for (i, c) in raw.when.into_iter().enumerate() {
            let field = format!("spec.rules[{r}].when[{i}]");
            if c.key.is_empty() {
                return Err(origin.problem(format!("{field}.key"), "is required"));
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                return Err(origin.problem(field, "needs values or notValues"));
            }
            if matches!(c.key.as_str(), "source.ip" | "destination.ip" | "remote.ip") {
                check_cidrs(origin, &format!("{field}.values"), &c.values)?;
                check_cidrs(origin, &format!("{field}.notValues"), &c.not_values)?;
            }
            if c.key == "destination.port" {
                let as_values =
                    |v: &[String]| v.iter().cloned().map(Value::String).collect::<Vec<_>>();
                policy_ports(origin, &format!("{field}.values"), &as_values(&c.values))?;
                policy_ports(
                    origin,
                    &format!("{field}.notValues"),
                    &as_values(&c.not_values),
                )?;
            }
            rule.when.push(Condition {
                key: c.key,
                values: c.values,
                not_values: c.not_values,
            });
        }
        rules.push(rule);
    }
    let _ = has_rules_field;
    let dry_run = meta.annotations.get(DRY_RUN).map(String::as_str) == Some("true");
    Ok(AuthorizationPolicy {
        meta,
        selector: spec.selector.map(|s| s.match_labels),
        target_refs,
        action,
        rules,
        dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kinds_and_ignores_others() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: "1234", labels: {app: web}}
spec:
  nodeName: node1
  serviceAccountName: web
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: http}, {port: 53, protocol: UDP}]}
"#;
        let p = parse_documents(text, "a.yaml");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.ignored, 1);
        assert_eq!(p.objects.len(), 3);
        let Object::Pod(pod) = &p.objects[1].1 else {
            panic!()
        };
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.named_ports["http"], 8080);
        assert_eq!(pod.meta.uid.as_deref(), Some("1234"));
        let Object::Service(svc) = &p.objects[2].1 else {
            panic!()
        };
        assert_eq!(svc.ports.len(), 1, "UDP port left out");
        assert_eq!(svc.ports[0].target, TargetPort::Name("http".into()));
    }

    #[test]
    fn problems_name_file_object_and_field_and_spare_the_rest() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: shop}
status: {podIP: 10.0.0}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec: {action: MAYBE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: q, namespace: shop}
spec: {rules: [{to: [{operation: {ports: ["99999"]}}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: good, namespace: shop}
"#;
        let p = parse_documents(text, "x.yaml");
        assert_eq!(p.objects.len(), 1);
        let msgs: Vec<String> = p.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "x.yaml: Pod shop/bad: field \"status.podIP\": \"10.0.0\" is not an IP address",
                "x.yaml: AuthorizationPolicy shop/p: field \"spec.action\": \"MAYBE\" is not one of ALLOW, DENY, AUDIT, CUSTOM",
                "x.yaml: AuthorizationPolicy shop/q: field \"spec.rules[0].to[0].operation.ports[0]\": 99999 is not a port (1-65535)",
            ]
        );
    }

    #[test]
    fn routing_objects_are_validated() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}, weight: 150}]}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d}
spec: {host: reviews, subsets: [{name: v1}, {name: v1}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#;
        let p = parse_documents(text, "r.yaml");
        assert_eq!(p.objects.len(), 1);
        assert_eq!(p.problems[0].field, "spec.http[0].route[0].weight");
        assert_eq!(p.problems[1].field, "spec.subsets[1].name");
    }

    #[test]
    fn syntax_error_is_reported() {
        let p = parse_documents("kind: [", "s.yaml");
        assert_eq!(p.problems.len(), 1);
        assert_eq!(p.problems[0].object, "document 1");
    }
}
