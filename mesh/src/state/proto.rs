//! The workload API (`istio.workload.Address`, `istio.security.Authorization`) decoded into the
//! shared model: one conversion for every proxy that subscribes to these types.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use prost::Message;

use super::{
    Action, AppProtocol, Authorization, Cidr, Clause, DEFAULT_CLUSTER_ID, DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN, GatewayAddress, GatewayDestination, HealthStatus, Match, Rule, Scope,
    Service, ServicePort, StringMatch, TunnelProtocol, Workload,
};
use crate::proto::security as pb_sec;
use crate::proto::workload as pb;

/// Apply the `Address` part of a push to the workloads and services a proxy holds, by resource
/// name (a name may turn from a workload into a service). Undecodable resources are added to
/// `bad` and keep their previous version. One implementation for ztunnel and the waypoint.
pub fn apply_addresses(
    workloads: &mut HashMap<String, Arc<Workload>>,
    services: &mut HashMap<String, Arc<Service>>,
    updated: &[crate::xds::Received],
    removed: &[String],
    bad: &mut Vec<(String, String)>,
) {
    for r in updated {
        match address(&r.name, &r.body) {
            Ok(Converted::Workload(w)) => {
                services.remove(&r.name);
                workloads.insert(r.name.clone(), Arc::new(*w));
            }
            Ok(Converted::Service(s)) => {
                workloads.remove(&r.name);
                services.insert(r.name.clone(), Arc::new(s));
            }
            Err(e) => bad.push((r.name.clone(), e)),
        }
    }
    for name in removed {
        workloads.remove(name);
        services.remove(name);
    }
}

/// One decoded `Address`.
pub enum Converted {
    Workload(Box<Workload>),
    Service(Service),
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(bytes).map_err(|e| e.to_string())?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|e| e.to_string())?,
        )),
        n => Err(format!("an address of {n} bytes is neither IPv4 nor IPv6")),
    }
}

fn port(v: u32, field: &str) -> Result<u16, String> {
    u16::try_from(v).map_err(|_| format!("{field}: {v} is not a port"))
}

fn or_default(v: String, default: &str) -> String {
    if v.is_empty() { default.to_string() } else { v }
}

fn gateway(g: Option<pb::GatewayAddress>) -> Result<Option<GatewayAddress>, String> {
    let Some(g) = g else { return Ok(None) };
    let destination = match g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(ip(&a.address)?)
        }
        Some(pb::gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace,
            hostname: h.hostname,
        },
        None => return Err("waypoint without a destination".into()),
    };
    let mut out = GatewayAddress::new(destination);
    if g.hbone_mtls_port != 0 {
        out.hbone_mtls_port = port(g.hbone_mtls_port, "hbone_mtls_port")?;
    }
    Ok(Some(out))
}

pub fn address(name: &str, body: &[u8]) -> Result<Converted, String> {
    let a = pb::Address::decode(body).map_err(|e| format!("undecodable Address: {e}"))?;
    match a.r#type {
        Some(pb::address::Type::Workload(w)) => {
            if w.uid != name {
                return Err(format!(
                    "resource name differs from the workload uid {:?}",
                    w.uid
                ));
            }
            Ok(Converted::Workload(Box::new(workload(w)?)))
        }
        Some(pb::address::Type::Service(s)) => {
            let s = service(s)?;
            if s.key() != name {
                return Err(format!(
                    "resource name differs from the service key {:?}",
                    s.key()
                ));
            }
            Ok(Converted::Service(s))
        }
        None => Err("Address is neither a workload nor a service".into()),
    }
}

fn workload(w: pb::Workload) -> Result<Workload, String> {
    if w.uid.is_empty() {
        return Err("workload without uid".into());
    }
    let workload_type = match pb::WorkloadType::try_from(w.workload_type) {
        Ok(pb::WorkloadType::Deployment) => "deployment",
        Ok(pb::WorkloadType::Cronjob) => "cronjob",
        Ok(pb::WorkloadType::Pod) => "pod",
        Ok(pb::WorkloadType::Job) => "job",
        Err(_) => return Err(format!("unknown workload type {}", w.workload_type)),
    };
    let mut services = BTreeMap::new();
    for (key, list) in w.services {
        let mut ports = BTreeMap::new();
        for p in list.ports {
            if p.target_port != 0 {
                ports.insert(
                    port(p.service_port, "services.service_port")?,
                    port(p.target_port, "services.target_port")?,
                );
            }
        }
        services.insert(key, ports);
    }
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        addresses: w
            .addresses
            .iter()
            .map(|a| ip(a))
            .collect::<Result<_, _>>()?,
        hostname: w.hostname,
        network: w.network,
        trust_domain: or_default(w.trust_domain, DEFAULT_TRUST_DOMAIN),
        service_account: or_default(w.service_account, DEFAULT_SERVICE_ACCOUNT),
        node: w.node,
        cluster_id: or_default(w.cluster_id, DEFAULT_CLUSTER_ID),
        tunnel_protocol: match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
            Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
            Err(_) => return Err(format!("unknown tunnel protocol {}", w.tunnel_protocol)),
        },
        waypoint: gateway(w.waypoint)?,
        services,
        authorization_policies: w.authorization_policies,
        status: match pb::WorkloadStatus::try_from(w.status) {
            Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
            _ => HealthStatus::Healthy,
        },
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_type: workload_type.to_string(),
        workload_name: w.workload_name,
        labels: w.labels.into_iter().collect(),
    })
}

fn app_protocol(v: i32) -> AppProtocol {
    match pb::AppProtocol::try_from(v) {
        Ok(pb::AppProtocol::Http11) => AppProtocol::Http11,
        Ok(pb::AppProtocol::Http2) => AppProtocol::Http2,
        Ok(pb::AppProtocol::Grpc) => AppProtocol::Grpc,
        Ok(pb::AppProtocol::Tcp) => AppProtocol::Tcp,
        Ok(pb::AppProtocol::Tls) => AppProtocol::Tls,
        // A newer value we do not know: L4, as for unknown.
        Ok(pb::AppProtocol::Unknown) | Err(_) => AppProtocol::Unknown,
    }
}

fn service(s: pb::Service) -> Result<Service, String> {
    if s.hostname.is_empty() || s.namespace.is_empty() {
        return Err("service without namespace or hostname".into());
    }
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        addresses: s
            .addresses
            .iter()
            .map(|a| ip(&a.address))
            .collect::<Result<_, _>>()?,
        ports: s
            .ports
            .iter()
            .map(|p| {
                Ok(ServicePort {
                    service_port: port(p.service_port, "ports.service_port")?,
                    target_port: port(p.target_port, "ports.target_port")?,
                    app_protocol: app_protocol(p.app_protocol),
                })
            })
            .collect::<Result<_, String>>()?,
        subject_alt_names: s.subject_alt_names,
        waypoint: gateway(s.waypoint)?,
    })
}

fn string_match(m: &pb_sec::StringMatch) -> Result<StringMatch, String> {
    use pb_sec::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err("empty string match".into()),
    }
}

fn strings(v: &[pb_sec::StringMatch]) -> Result<Vec<StringMatch>, String> {
    v.iter().map(string_match).collect()
}

/// The state compares service accounts as `<namespace>/<name>`.
fn service_accounts(v: &[pb_sec::ServiceAccountMatch]) -> Vec<StringMatch> {
    v.iter()
        .map(|s| StringMatch::Exact(format!("{}/{}", s.namespace, s.service_account)))
        .collect()
}

fn cidrs(v: &[pb_sec::Address]) -> Result<Vec<Cidr>, String> {
    v.iter()
        .map(|a| {
            let addr = ip(&a.address)?;
            let len = u8::try_from(a.length).map_err(|_| format!("prefix {}", a.length))?;
            Cidr::new(addr, len).map_err(|e| e.to_string())
        })
        .collect()
}

fn ports(v: &[u32]) -> Result<Vec<u16>, String> {
    v.iter().map(|&p| port(p, "destination_ports")).collect()
}

pub fn authorization(name: &str, body: &[u8]) -> Result<Authorization, String> {
    let a = pb_sec::Authorization::decode(body)
        .map_err(|e| format!("undecodable Authorization: {e}"))?;
    let key = format!("{}/{}", a.namespace, a.name);
    if key != name {
        return Err(format!("resource name differs from the policy key {key:?}"));
    }
    let scope = match pb_sec::Scope::try_from(a.scope) {
        Ok(pb_sec::Scope::Global) => Scope::Global,
        Ok(pb_sec::Scope::Namespace) => Scope::Namespace,
        Ok(pb_sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(format!("unknown scope {}", a.scope)),
    };
    let action = match pb_sec::Action::try_from(a.action) {
        Ok(pb_sec::Action::Allow) => Action::Allow,
        Ok(pb_sec::Action::Deny) => Action::Deny,
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    let mut rules = Vec::new();
    for r in &a.rules {
        let mut clauses = Vec::new();
        for c in &r.clauses {
            let mut matches = Vec::new();
            for m in &c.matches {
                matches.push(Match {
                    namespaces: strings(&m.namespaces)?,
                    not_namespaces: strings(&m.not_namespaces)?,
                    service_accounts: service_accounts(&m.service_accounts),
                    not_service_accounts: service_accounts(&m.not_service_accounts),
                    principals: strings(&m.principals)?,
                    not_principals: strings(&m.not_principals)?,
                    source_ips: cidrs(&m.source_ips)?,
                    not_source_ips: cidrs(&m.not_source_ips)?,
                    destination_ips: cidrs(&m.destination_ips)?,
                    not_destination_ips: cidrs(&m.not_destination_ips)?,
                    destination_ports: ports(&m.destination_ports)?,
                    not_destination_ports: ports(&m.not_destination_ports)?,
                });
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Authorization {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_and_rejects() {
        let w = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: "u1".into(),
                name: "a".into(),
                namespace: "ns".into(),
                addresses: vec![vec![10, 0, 0, 1]],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                services: [(
                    "ns/s.ns.svc.cluster.local".to_string(),
                    pb::PortList {
                        ports: vec![pb::Port {
                            service_port: 80,
                            target_port: 8080,
                            app_protocol: pb::AppProtocol::Http2 as i32,
                        }],
                    },
                )]
                .into_iter()
                .collect(),
                labels: [("version".to_string(), "v1".to_string())].into(),
                ..Default::default()
            })),
        };
        let Converted::Workload(w) = address("u1", &w.encode_to_vec()).unwrap() else {
            panic!()
        };
        assert_eq!(w.service_account, "default");
        assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone);
        assert_eq!(w.services["ns/s.ns.svc.cluster.local"][&80], 8080);
        assert_eq!(w.labels["version"], "v1");
        let s = pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "s".into(),
                namespace: "ns".into(),
                hostname: "s.ns.svc.cluster.local".into(),
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: pb::AppProtocol::Grpc as i32,
                }],
                ..Default::default()
            })),
        };
        let Converted::Service(s) =
            address("ns/s.ns.svc.cluster.local", &s.encode_to_vec()).unwrap()
        else {
            panic!()
        };
        assert_eq!(s.ports[0].app_protocol, AppProtocol::Grpc);
        assert!(address("other", &pb::Address::default().encode_to_vec()).is_err());
        let bad_ip = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: "u2".into(),
                addresses: vec![vec![1, 2, 3]],
                ..Default::default()
            })),
        };
        let err = address("u2", &bad_ip.encode_to_vec()).err().unwrap();
        assert!(err.contains("3 bytes"), "{err}");

        let p = pb_sec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: pb_sec::Action::Deny as i32,
            rules: vec![pb_sec::Rule {
                clauses: vec![pb_sec::Clause {
                    matches: vec![pb_sec::Match {
                        service_accounts: vec![pb_sec::ServiceAccountMatch {
                            namespace: "a".into(),
                            service_account: "b".into(),
                        }],
                        source_ips: vec![pb_sec::Address {
                            address: vec![10, 0, 0, 0],
                            length: 8,
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        let a = authorization("ns/p", &p.encode_to_vec()).unwrap();
        assert_eq!(a.action, Action::Deny);
        let m = &a.rules[0].clauses[0].matches[0];
        assert_eq!(m.service_accounts, [StringMatch::Exact("a/b".into())]);
        assert_eq!(m.source_ips[0].to_string(), "10.0.0.0/8");
    }
}
