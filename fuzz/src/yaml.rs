//! The YAML loaders: ztunnel's local configuration file (`ztunnel::config_file`) and pilot's
//! folder of Kubernetes YAML (`pilot::k8s::parse_documents`, then the snapshot and its
//! translation to xDS). Any text loads or is refused with an error naming the file; what
//! loads is consistent (every workload found by its address); and everything pilot
//! translates is accepted by the proxies' xDS decoder, under the name pilot sends it.

use mesh::state::proto::{Converted, address, authorization};
use pilot::model::Snapshot;
use pilot::translate::{MeshOptions, translate};
use ztunnel::config_file::ConfigError;

use crate::engine::{Features, Target, shape};

const ORIGIN: &str = "fuzz.yaml";

pub const ZTUNNEL_CONFIG: Target = Target {
    name: "ztunnel-config",
    about: "ztunnel's --config YAML file into its state",
    seeds: || {
        vec![
            include_bytes!("../../ztunnel/testdata/example.yaml").to_vec(),
            include_bytes!("../../ztunnel/testdata/bad/duplicate-address.yaml").to_vec(),
            include_bytes!("../../ztunnel/testdata/bad/unknown-service.yaml").to_vec(),
        ]
    },
    dictionary: &[
        b"workloads:\n- ",
        b"services:\n- ",
        b"policies:\n- ",
        b"uid: ",
        b"addresses: [",
        b"\"10.244.1.10\"",
        b"\"fd00::1\"",
        b"waypoint: {address: 10.244.1.50}",
        b"waypoint: {hostname: w.default.svc.cluster.local, namespace: default, hboneMtlsPort: 15008}",
        b"{9080: 9080}",
        b"tunnelProtocol: HBONE",
        b"status: UNHEALTHY",
        b"scope: GLOBAL",
        b"action: DENY",
        b"rules:\n- ",
        b"sourceIps: [\"10.0.0.0/8\"]",
        b": ",
        b"\n  ",
        b"- ",
        b"{}",
        b"[]",
        b"~",
        b"&a ",
        b"*a",
        b"!!binary ",
    ],
    max_len: 8192,
    run: ztunnel_config,
};

pub const PILOT_YAML: Target = Target {
    name: "pilot-yaml",
    about: "pilot's folder of Kubernetes YAML through the snapshot and xDS translation",
    seeds: || {
        vec![
            include_bytes!("../../deploy/examples/bookinfo/pods.yaml").to_vec(),
            include_bytes!("../../deploy/examples/bookinfo/services.yaml").to_vec(),
            include_bytes!("../../deploy/examples/bookinfo/policies.yaml").to_vec(),
            include_bytes!("../../deploy/examples/bookinfo/routing.yaml").to_vec(),
            include_bytes!("../../deploy/examples/bookinfo/namespace.yaml").to_vec(),
        ]
    },
    dictionary: &[
        b"\n---\n",
        b"apiVersion: v1\n",
        b"kind: Pod\n",
        b"kind: Service\n",
        b"kind: List\nitems:\n- ",
        b"kind: AuthorizationPolicy\n",
        b"apiVersion: security.istio.io/v1\n",
        b"metadata:\n  name: a\n  namespace: default\n",
        b"labels:\n    ",
        b"istio.io/dataplane-mode: ambient",
        b"istio.io/use-waypoint: waypoint",
        b"podIP: 10.244.1.10",
        b"clusterIP: 10.96.0.10",
        b"ports:\n  - port: 80\n    targetPort: 8080",
        b"selector:\n    app: a",
        b"action: DENY",
        b"ipBlocks: [\"10.0.0.0/8\"]",
        b"principals: [\"cluster.local/ns/default/sa/a\"]",
        b": ",
        b"\n  ",
        b"- ",
        b"{}",
        b"~",
    ],
    max_len: 16384,
    run: pilot_yaml,
};

/// Kinds of YAML and serde errors, as features.
const SYNTAX: [&str; 16] = [
    "unknown field",
    "missing field",
    "duplicate field",
    "invalid type",
    "invalid value",
    "invalid length",
    "unknown variant",
    "duplicate",
    "did not find",
    "found unexpected",
    "found unknown",
    "mapping values",
    "unknown anchor",
    "recursion limit",
    "while parsing",
    "while scanning",
];

fn ztunnel_config(data: &[u8], f: &mut Features) {
    let text = String::from_utf8_lossy(data);
    match ztunnel::config_file::parse(&text, ORIGIN) {
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(ORIGIN),
                "error without the file: {message}"
            );
            match &e {
                ConfigError::Syntax { message, .. } => {
                    // serde's message starts with the path of keys, which quotes the input.
                    let kind = SYNTAX.iter().position(|p| message.contains(p));
                    f.add(("syntax", kind))
                }
                ConfigError::Invalid { field, message, .. } => {
                    // The field's path without indices or map keys (which quote the input).
                    let field: String = field.split('[').next().unwrap_or_default().into();
                    f.add(("invalid", field, shape(message)))
                }
                ConfigError::State { error, .. } => f.add(("state", shape(&error.to_string()))),
                ConfigError::Read { .. } => f.add("read"),
            }
        }
        Ok(state) => {
            let mut count = 0;
            for w in state.workloads() {
                count += 1;
                for ip in &w.addresses {
                    let found = state
                        .workload_by_ip(ip.to_canonical())
                        .expect("every workload address resolves");
                    assert_eq!(found.uid, w.uid);
                }
                f.add((
                    "workload",
                    w.tunnel_protocol,
                    w.status,
                    w.waypoint.is_some(),
                ));
            }
            for s in state.services() {
                f.add(("service", s.ports.len().min(4), s.waypoint.is_some()));
            }
            for p in state.policies() {
                f.add(("policy", p.scope, p.action, p.rules.len().min(4)));
            }
            f.add(("loaded", count.min(8)));
            serde_json::to_string(&state).expect("the config dump serializes");
        }
    }
}

fn pilot_yaml(data: &[u8], f: &mut Features) {
    let text = String::from_utf8_lossy(data);
    let parsed = pilot::k8s::parse_documents(&text, ORIGIN);
    for p in &parsed.problems {
        assert_eq!(p.file, ORIGIN, "problem without its file: {p}");
        assert!(!p.reason.is_empty());
        f.add((
            "problem",
            p.field.split('[').next().map(str::to_string),
            shape(&p.reason),
        ));
    }
    for (origin, object) in &parsed.objects {
        assert_eq!(origin.file, ORIGIN);
        f.add(("object", object.kind()));
    }
    f.add(("ignored", parsed.ignored.min(4)));
    let snapshot = Snapshot::build(parsed.objects.clone(), parsed.problems.clone());
    let translation = translate(&snapshot, &MeshOptions::default());
    for p in &translation.problems {
        f.add((
            "translation problem",
            p.field.split('[').next().map(str::to_string),
        ));
    }
    // What pilot sends, ztunnel must take: a resource it would NACK is a pilot bug.
    for (name, r) in &translation.resources.addresses {
        match address(name, &r.body) {
            Ok(Converted::Workload(w)) => f.add(("sent workload", w.waypoint.is_some())),
            Ok(Converted::Service(s)) => f.add(("sent service", s.ports.len().min(4))),
            Err(e) => panic!("pilot sent Address {name} that ztunnel rejects: {e}"),
        }
    }
    for (name, r) in &translation.resources.authorizations {
        match authorization(name, &r.body) {
            Ok(p) => f.add(("sent policy", p.scope, p.action)),
            Err(e) => panic!("pilot sent Authorization {name} that ztunnel rejects: {e}"),
        }
    }
}
