//! The Kubernetes-YAML loader (`meshconfig::k8s::parse_documents`, then the snapshot and its
//! translation to xDS), as pilot serves it and as a standalone ztunnel (`--config`) converts it
//! into its state. Any text loads or is refused with problems naming the file; everything
//! pilot translates is accepted by the proxies' xDS decoder, under the name pilot sends it;
//! and what ztunnel converts is consistent (every workload found by its address).

use mesh::state::proto::{Converted, address, authorization};
use meshconfig::k8s::parse_documents;
use meshconfig::model::Snapshot;
use meshconfig::translate::{MeshOptions, translate};
use ztunnel::local_config::{Converter, mesh_options};

use crate::engine::{Features, Target, shape};

const ORIGIN: &str = "fuzz.yaml";

pub const ZTUNNEL_CONFIG: Target = Target {
    name: "ztunnel-config",
    about: "ztunnel's --config (Kubernetes YAML) through meshconfig's translation into its state",
    seeds: || {
        let bookinfo = [
            include_str!("../../deploy/examples/bookinfo/namespace.yaml"),
            include_str!("../../deploy/examples/bookinfo/pods.yaml"),
            include_str!("../../deploy/examples/bookinfo/services.yaml"),
            include_str!("../../deploy/examples/bookinfo/policies.yaml"),
        ];
        vec![
            bookinfo.join("\n---\n").into_bytes(),
            bookinfo[1].as_bytes().to_vec(),
        ]
    },
    dictionary: &[
        b"\n---\n",
        b"apiVersion: v1\nkind: Pod\n",
        b"apiVersion: v1\nkind: Service\n",
        b"apiVersion: v1\nkind: Namespace\n",
        b"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n",
        b"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n",
        b"spec: {hosts: [a.example.com], addresses: [10.96.1.1], ports: [{number: 80}]}\n",
        b"workloadSelector: {labels: {app: a}}",
        b"metadata: {name: a, namespace: default, uid: u1, labels: {app: a}}\n",
        b"istio.io/dataplane-mode: ambient",
        b"networking.istio.io/tunnel: http",
        b"istio.io/use-waypoint: waypoint",
        b"spec: {nodeName: node1, serviceAccountName: a}\n",
        b"status: {phase: Running, podIP: 10.244.1.10}\n",
        b"podIPs: [{ip: \"fd00::1\"}]",
        b"clusterIP: 10.96.0.10",
        b"ports: [{port: 80, targetPort: 8080}]",
        b"selector: {app: a}",
        b"action: DENY",
        b"ipBlocks: [\"10.0.0.0/8\"]",
        b"ports: [\"9090\"]",
        b": ",
        b"\n  ",
        b"- ",
        b"{}",
        b"~",
    ],
    max_len: 16384,
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

fn ztunnel_config(data: &[u8], f: &mut Features) {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_documents(&text, ORIGIN);
    for p in &parsed.problems {
        assert_eq!(p.file, ORIGIN, "problem without its file: {p}");
        f.add(("problem", p.field.split('[').next().map(str::to_string)));
    }
    let snapshot = Snapshot::build(parsed.objects, parsed.problems);
    let mut converter = Converter::new(mesh_options("cluster.local", "Kubernetes"));
    // Whatever meshconfig lets through, ztunnel's conversion must make a state of.
    let (state, problems) = match converter.convert(&snapshot) {
        Ok(done) => done,
        Err(e) => panic!("a translated configuration ztunnel cannot take: {e}"),
    };
    for p in &problems {
        f.add((
            "translation problem",
            p.field.split('[').next().map(str::to_string),
        ));
    }
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

fn pilot_yaml(data: &[u8], f: &mut Features) {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_documents(&text, ORIGIN);
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
