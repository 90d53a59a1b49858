//! Istio's ServiceEntry: names and VIPs of services that are not Kubernetes Services (a
//! host with several addresses, an external name the mesh should know). Each host becomes one
//! workload-API `Service` (`<namespace>/<host>`), with the VIPs in `spec.addresses`; the pods
//! of its namespace that `spec.workloadSelector` picks are its endpoints, as in Istio.
//!
//! What ztunnel cannot do is refused, with the field named, rather than half done: DNS
//! resolution (`resolution: DNS`, ztunnel does not resolve hosts), inline `endpoints`
//! (WorkloadEntries), wildcard hosts, address ranges, and several hosts sharing addresses
//! (each host's service would claim the same VIPs).

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh::proto::workload as pb;
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::k8s::{
    Meta, Origin, Pod, Problem, ServicePort, TargetPort, USE_WAYPOINT, ip, port, typed,
};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceEntry {
    pub meta: Meta,
    pub hosts: Vec<String>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<Port>,
    /// `spec.workloadSelector.labels`: the pods of the namespace that serve the hosts.
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Port {
    pub number: u16,
    /// `targetPort`, else `number`: where the selected pods listen.
    pub target: u16,
    pub name: String,
    /// `protocol` (HTTP, HTTP2, GRPC, TCP, TLS, …), as Istio decides a port's protocol by.
    pub protocol: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    resolution: Option<String>,
    endpoints: Option<Value>,
    workload_selector: Option<RawSelector>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPort {
    number: i64,
    name: Option<String>,
    protocol: Option<String>,
    target_port: Option<i64>,
}

#[derive(Default, Deserialize)]
struct RawSelector {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A hostname: dot-separated labels of a-z, 0-9 and '-'.
fn is_hostname(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

pub fn service_entry(origin: &Origin, meta: Meta, spec: Value) -> Result<ServiceEntry, Problem> {
    let spec: RawSpec = typed(origin, "spec", spec)?;
    if spec.hosts.is_empty() {
        return Err(origin.problem("spec.hosts", "is required"));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        if h.starts_with('*') {
            return Err(origin.problem(
                format!("spec.hosts[{i}]"),
                format!("{h:?}: wildcard hosts are not supported"),
            ));
        }
        if !is_hostname(h) {
            return Err(origin.problem(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a hostname"),
            ));
        }
    }
    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        if a.contains('/') {
            return Err(origin.problem(field, format!("{a:?}: address ranges are not supported")));
        }
        let a = ip(origin, &field, a)?;
        if !addresses.contains(&a) {
            addresses.push(a);
        }
    }
    if !addresses.is_empty() && spec.hosts.len() > 1 {
        return Err(origin.problem(
            "spec.addresses",
            "with addresses, one host per ServiceEntry (each host's service would claim the same VIPs)",
        ));
    }
    let mut ports: Vec<Port> = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let number = port(origin, &format!("spec.ports[{i}].number"), p.number)?;
        if ports.iter().any(|q| q.number == number) {
            return Err(origin.problem(
                format!("spec.ports[{i}].number"),
                format!("{number} is listed twice"),
            ));
        }
        let target = match p.target_port {
            Some(t) => port(origin, &format!("spec.ports[{i}].targetPort"), t)?,
            None => number,
        };
        ports.push(Port {
            number,
            target,
            name: p.name.clone().unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_default(),
        });
    }
    match spec.resolution.as_deref() {
        None | Some("NONE" | "STATIC") => {}
        Some(r @ ("DNS" | "DNS_ROUND_ROBIN")) => {
            return Err(origin.problem(
                "spec.resolution",
                format!(
                    "{r} is not supported (ztunnel does not resolve hosts): use STATIC with a workloadSelector"
                ),
            ));
        }
        Some(r) => {
            return Err(origin.problem(
                "spec.resolution",
                format!("{r:?} is not one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"),
            ));
        }
    }
    if spec.endpoints.is_some() {
        return Err(origin.problem(
            "spec.endpoints",
            "inline endpoints are not supported: select pods with spec.workloadSelector",
        ));
    }
    if meta.labels.contains_key(USE_WAYPOINT) {
        return Err(origin.problem(
            format!("metadata.labels[{USE_WAYPOINT}]"),
            "waypoints for ServiceEntries are not supported",
        ));
    }
    Ok(ServiceEntry {
        meta,
        hosts: spec.hosts,
        addresses,
        ports,
        selector: spec.workload_selector.map(|s| s.labels),
    })
}

impl ServiceEntry {
    /// Istio's protocol decision for one of its ports.
    fn app_protocol(p: &Port) -> pb::AppProtocol {
        crate::translate::app_protocol(&ServicePort {
            name: p.name.clone(),
            port: p.number,
            target: TargetPort::Number(p.target),
            app_protocol: p.protocol.to_ascii_lowercase(),
        })
    }

    /// The workload-API service of `host`, one of its hosts.
    pub fn service(&self, host: &str) -> pb::Service {
        pb::Service {
            name: self.meta.name.clone(),
            namespace: self.meta.namespace.clone(),
            hostname: host.to_string(),
            addresses: self
                .addresses
                .iter()
                .map(|ip| pb::NetworkAddress {
                    network: String::new(),
                    address: match ip {
                        IpAddr::V4(v4) => v4.octets().to_vec(),
                        IpAddr::V6(v6) => v6.octets().to_vec(),
                    },
                })
                .collect(),
            ports: self
                .ports
                .iter()
                .map(|p| pb::Port {
                    service_port: u32::from(p.number),
                    target_port: u32::from(p.target),
                    app_protocol: Self::app_protocol(p) as i32,
                })
                .collect(),
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: None,
            ip_families: 0,
            // A Kubernetes Service owns its hostname; a ServiceEntry does not.
            canonical: false,
        }
    }

    /// Whether `pod` is one of its endpoints (same namespace, selected by labels).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.meta.namespace == self.meta.namespace
            && self
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| pod.meta.labels.get(k) == Some(v)))
    }

    /// What a selected pod's workload lists for this entry: `<namespace>/<host>` → ports.
    pub fn endpoint_ports(&self) -> impl Iterator<Item = (String, pb::PortList)> + '_ {
        self.hosts.iter().map(|h| {
            (
                format!("{}/{h}", self.meta.namespace),
                pb::PortList {
                    ports: self
                        .ports
                        .iter()
                        .map(|p| pb::Port {
                            service_port: u32::from(p.number),
                            target_port: u32::from(p.target),
                            app_protocol: Self::app_protocol(p) as i32,
                        })
                        .collect(),
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::k8s::{Object, parse_documents};
    use crate::model::Snapshot;
    use crate::translate::{MeshOptions, translate};
    use mesh::proto::workload as pb;
    use prost::Message;

    const HEAD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: many, namespace: demo}\n";

    fn problem(spec: &str) -> String {
        let p = parse_documents(&format!("{HEAD}spec: {spec}\n"), "se.yaml");
        assert!(p.objects.is_empty(), "accepted: {spec}");
        p.problems[0].to_string()
    }

    #[test]
    fn parses_and_refuses_what_ztunnel_cannot_do() {
        let p = parse_documents(
            &format!(
                "{HEAD}spec: {{hosts: [many.example.com], addresses: [10.96.1.1, \"10.96.1.2\"], ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}, {{number: 443, protocol: TLS}}], resolution: STATIC, workloadSelector: {{labels: {{app: many}}}}}}\n"
            ),
            "se.yaml",
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let Object::ServiceEntry(se) = &p.objects[0].1 else {
            panic!("{:?}", p.objects)
        };
        assert_eq!(se.addresses.len(), 2);
        assert_eq!((se.ports[0].number, se.ports[0].target), (80, 8080));
        assert_eq!((se.ports[1].number, se.ports[1].target), (443, 443));
        for (spec, parts) in [
            ("{}", "field \"spec.hosts\": is required"),
            (
                "{hosts: [\"*.example.com\"]}",
                "wildcard hosts are not supported",
            ),
            ("{hosts: [Bad_Host]}", "\"Bad_Host\" is not a hostname"),
            (
                "{hosts: [a.b], addresses: [10.0.0.0/8]}",
                "address ranges are not supported",
            ),
            (
                "{hosts: [a.b], addresses: [10.0.0]}",
                "field \"spec.addresses[0]\"",
            ),
            (
                "{hosts: [a.b, c.d], addresses: [10.0.0.1]}",
                "one host per ServiceEntry",
            ),
            (
                "{hosts: [a.b], ports: [{number: 0}]}",
                "field \"spec.ports[0].number\"",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80}, {number: 80}]}",
                "80 is listed twice",
            ),
            (
                "{hosts: [a.b], resolution: DNS}",
                "ztunnel does not resolve hosts",
            ),
            (
                "{hosts: [a.b], endpoints: [{address: 1.2.3.4}]}",
                "field \"spec.endpoints\"",
            ),
        ] {
            let p = problem(spec);
            assert!(p.starts_with("se.yaml: ServiceEntry demo/many: "), "{p}");
            assert!(p.contains(parts), "{spec}: {p}");
        }
    }

    #[test]
    fn translated_with_its_selected_pods_as_endpoints() {
        let text = format!(
            "{HEAD}spec: {{hosts: [many.demo.svc.cluster.local], addresses: [10.96.1.1, 10.96.1.2], ports: [{{number: 80, targetPort: 8080}}], workloadSelector: {{labels: {{app: many}}}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: m, namespace: demo, labels: {{app: many}}}}\nstatus: {{podIP: 10.244.1.10}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: other, namespace: other, labels: {{app: many}}}}\nstatus: {{podIP: 10.244.1.11}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: taken, namespace: demo}}\nstatus: {{podIP: 10.96.1.2}}\n"
        );
        let p = parse_documents(&text, "t.yaml");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let s = Snapshot::build(p.objects, vec![]);
        let t = translate(&s, &MeshOptions::default());
        let decode = |name: &str| {
            pb::Address::decode(t.resources.addresses[name].body.clone())
                .unwrap()
                .r#type
                .unwrap()
        };
        let pb::address::Type::Service(svc) = decode("demo/many.demo.svc.cluster.local") else {
            panic!()
        };
        assert_eq!(svc.addresses.len(), 2);
        assert_eq!(
            (svc.ports[0].service_port, svc.ports[0].target_port),
            (80, 8080)
        );
        assert!(!svc.canonical);
        let pb::address::Type::Workload(w) = decode("Kubernetes//Pod/demo/m") else {
            panic!()
        };
        assert_eq!(
            w.services["demo/many.demo.svc.cluster.local"].ports[0].target_port,
            8080
        );
        let pb::address::Type::Workload(w) = decode("Kubernetes//Pod/other/other") else {
            panic!()
        };
        assert!(
            w.services.is_empty(),
            "another namespace's pods are not selected"
        );
        // The pod holding one of its VIPs comes second (services first) and is left out.
        assert!(
            !t.resources
                .addresses
                .contains_key("Kubernetes//Pod/demo/taken")
        );
        assert!(
            t.problems.iter().any(|p| p.object == "Pod demo/taken"
                && p.reason.contains("already used by ServiceEntry demo/many")),
            "{:?}",
            t.problems
        );
    }
}
