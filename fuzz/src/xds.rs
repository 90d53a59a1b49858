//! xDS resources into a proxy's state, as ztunnel applies them (`mesh::state::proto`, then
//! `State::from_shared`, as `ztunnel::xds` does): a sequence of `Address` and
//! `Authorization` updates and removals. Every resource is accepted or rejected with a reason;
//! an accepted one carries the name it was sent under; a state that builds finds every
//! workload by uid and address and every service by VIP, and serializes for the config dump.

use std::collections::HashMap;
use std::sync::Arc;

use mesh::proto::security as pb_sec;
use mesh::proto::workload as pb;
use mesh::state::proto::{Converted, address, apply_addresses, authorization};
use mesh::state::{Authorization, Destination, State};
use mesh::xds::Received;
use prost::Message;

use crate::engine::{Features, Target, shape};

pub const TARGET: Target = Target {
    name: "xds",
    about: "istio.workload.Address / istio.security.Authorization into ztunnel's state",
    seeds,
    dictionary: &[
        b"\x0a\x04\x0a\x00\x00\x01",
        b"\x0a\x10\xfd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01",
        b"\x12\x02u1",
        b"\x1a\x02ns",
        b"\x08\x01",
        b"\x08\x02",
        b"\x10\x01",
        b"\x10\x50",
        b"\x18\x90\x3f",
    ],
    max_len: 4096,
    run,
};

/// One operation of the input: `[op][len: u16 BE][body]`.
fn chunk(op: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![op];
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn workload(uid: &str, ip: [u8; 4]) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: uid.into(),
            name: "reviews-v1".into(),
            namespace: "default".into(),
            service_account: "bookinfo-reviews".into(),
            addresses: vec![ip.to_vec()],
            node: "node-a".into(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            services: [(
                "default/reviews.default.svc.cluster.local".to_string(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 9080,
                        target_port: 9080,
                        app_protocol: pb::AppProtocol::Http11 as i32,
                    }],
                },
            )]
            .into(),
            labels: [("app".to_string(), "reviews".to_string())].into(),
            waypoint: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Address(
                    pb::NetworkAddress {
                        network: String::new(),
                        address: vec![10, 244, 3, 3],
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        })),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let service = pb::Address {
        r#type: Some(pb::address::Type::Service(pb::Service {
            name: "reviews".into(),
            namespace: "default".into(),
            hostname: "reviews.default.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 20],
            }],
            ports: vec![pb::Port {
                service_port: 9080,
                target_port: 9080,
                app_protocol: pb::AppProtocol::Http11 as i32,
            }],
            ..Default::default()
        })),
    };
    let policy = pb_sec::Authorization {
        name: "allow-productpage".into(),
        namespace: "default".into(),
        scope: pb_sec::Scope::WorkloadSelector as i32,
        action: pb_sec::Action::Allow as i32,
        rules: vec![pb_sec::Rule {
            clauses: vec![pb_sec::Clause {
                matches: vec![pb_sec::Match {
                    principals: vec![pb_sec::StringMatch {
                        match_type: Some(pb_sec::string_match::MatchType::Prefix(
                            "cluster.local/ns/default/".into(),
                        )),
                    }],
                    source_ips: vec![pb_sec::Address {
                        address: vec![10, 244, 0, 0],
                        length: 16,
                    }],
                    destination_ports: vec![9080],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let w1 = workload("Kubernetes//Pod/default/reviews-v1", [10, 244, 1, 5]).encode_to_vec();
    let w2 = workload("Kubernetes//Pod/default/reviews-v2", [10, 244, 1, 6]).encode_to_vec();
    let mut all = Vec::new();
    all.extend(chunk(0, &w1));
    all.extend(chunk(0, &service.encode_to_vec()));
    all.extend(chunk(1, &policy.encode_to_vec()));
    all.extend(chunk(0, &w2));
    all.extend(chunk(2, &[0]));
    vec![
        chunk(0, &w1),
        chunk(0, &service.encode_to_vec()),
        chunk(1, &policy.encode_to_vec()),
        all,
    ]
}

/// The name the control plane would send a resource under (the conversion checks it).
fn name_of_address(body: &[u8]) -> Option<String> {
    match pb::Address::decode(body).ok()?.r#type? {
        pb::address::Type::Workload(w) => Some(w.uid),
        pb::address::Type::Service(s) => Some(format!("{}/{}", s.namespace, s.hostname)),
    }
}

fn name_of_policy(body: &[u8]) -> Option<String> {
    let p = pb_sec::Authorization::decode(body).ok()?;
    Some(format!("{}/{}", p.namespace, p.name))
}

/// What ztunnel holds between pushes.
#[derive(Default, Clone)]
struct Held {
    workloads: HashMap<String, Arc<mesh::state::Workload>>,
    services: HashMap<String, Arc<mesh::state::Service>>,
    policies: HashMap<String, Arc<Authorization>>,
}

fn run(data: &[u8], f: &mut Features) {
    let mut held = Held::default();
    let mut names: Vec<String> = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let op = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let mut next = held.clone();
        let mut bad = Vec::new();
        // Bit 3: send under a wrong name (a control plane bug the conversion must catch).
        let misnamed = op & 8 != 0;
        match op % 4 {
            0 => {
                let name = name_of_address(body).unwrap_or_default();
                let name = if misnamed { format!("{name}x") } else { name };
                check_address(&name, body, f);
                let r = Received {
                    name: name.clone(),
                    version: String::new(),
                    body: body.to_vec(),
                };
                apply_addresses(&mut next.workloads, &mut next.services, &[r], &[], &mut bad);
                names.push(name);
            }
            1 => {
                let name = name_of_policy(body).unwrap_or_default();
                let name = if misnamed { format!("{name}x") } else { name };
                match authorization(&name, body) {
                    Ok(p) => {
                        assert_eq!(p.key(), name, "accepted under another name");
                        f.add(("policy", p.rules.len().min(4), p.scope, p.action));
                        next.policies.insert(name.clone(), Arc::new(p));
                    }
                    Err(e) => {
                        assert!(!e.is_empty());
                        f.add(("policy rejected", shape(&e)));
                    }
                }
                names.push(name);
            }
            removal => {
                let Some(name) = body
                    .first()
                    .and_then(|&i| names.get(usize::from(i) % names.len().max(1)))
                else {
                    continue;
                };
                if removal == 2 {
                    apply_addresses(
                        &mut next.workloads,
                        &mut next.services,
                        &[],
                        std::slice::from_ref(name),
                        &mut bad,
                    );
                } else {
                    next.policies.remove(name);
                }
                f.add(("removed", removal));
            }
        }
        let state = State::from_shared(
            next.workloads.values().cloned().collect(),
            next.services.values().cloned().collect(),
            next.policies.values().cloned().collect(),
        );
        match state {
            Ok(state) => {
                check_state(&state, &next);
                f.add((
                    "state",
                    next.workloads.len().min(8),
                    next.services.len().min(8),
                    next.policies.len().min(8),
                ));
                held = next;
            }
            // Rejected as a whole: the previous state stays (what ztunnel NACKs).
            Err(e) => f.add(("conflict", shape(&e.to_string()))),
        }
    }
}

fn check_address(name: &str, body: &[u8], f: &mut Features) {
    match address(name, body) {
        Ok(Converted::Workload(w)) => {
            assert_eq!(w.uid, name, "workload accepted under another name");
            f.add((
                "workload",
                w.addresses.len().min(4),
                w.services.len().min(4),
                w.waypoint.is_some(),
                w.tunnel_protocol,
                w.status,
            ));
        }
        Ok(Converted::Service(s)) => {
            assert_eq!(s.key(), name, "service accepted under another name");
            f.add((
                "service",
                s.addresses.len().min(4),
                s.ports.len().min(4),
                s.waypoint.is_some(),
            ));
        }
        Err(e) => {
            assert!(!e.is_empty());
            f.add(("address rejected", shape(&e)));
        }
    }
}

fn check_state(state: &State, held: &Held) {
    for w in held.workloads.values() {
        assert!(state.workload_by_uid(&w.uid).is_some());
        for ip in &w.addresses {
            let found = state
                .workload_by_ip(ip.to_canonical())
                .expect("every workload address resolves");
            assert_eq!(found.uid, w.uid);
            let dst = std::net::SocketAddr::new(*ip, 9080);
            assert!(
                !matches!(state.resolve(dst), Destination::Passthrough),
                "a workload's own address is not passthrough"
            );
        }
    }
    for s in held.services.values() {
        assert!(state.service(&s.key()).is_some());
        for ip in &s.addresses {
            let found = state
                .service_by_vip(ip.to_canonical())
                .expect("every VIP resolves");
            assert_eq!(found.key(), s.key());
        }
    }
    for p in held.policies.values() {
        assert!(state.policy(&p.key()).is_some());
    }
    serde_json::to_string(state).expect("the config dump serializes");
}
