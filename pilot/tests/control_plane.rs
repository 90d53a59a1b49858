//! pilot over the wire: a real tonic client on TLS against a running pilot, for the delta xDS protocol and the CA.

mod ads;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use ads::{Stream, create, http_get, names, versions};
use mesh::control::ControlPlane;
use mesh::identity::Identity;
use mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh::state::proto::{Converted, address};
use mesh::xds::{ClientState, Handler, Rejected, Update};
use pilot::auth::Caller;
use pilot::server::{Config, Running, Source, start};

struct Env {
    dir: PathBuf,
    pilot: Running,
}

impl Env {
    async fn start() -> Env {
        let dir = std::env::temp_dir().join(format!("pilot-it-{}", fastrand::u64(..)));
        std::fs::create_dir_all(dir.join("config")).unwrap();
        write(&dir, "ns.yaml", NAMESPACE);
        write(&dir, "svc.yaml", &service("web", "10.96.0.1", 80));
        let pilot = start(Config {
            source: Source::Folder(dir.join("config")),
            state_dir: dir.join("state"),
            listen: "127.0.0.1:0".parse().unwrap(),
            debug: Some("127.0.0.1:0".parse().unwrap()),
            mesh: Default::default(),
            max_cert_ttl: Duration::from_secs(3600),
            nodes: vec!["node1".into(), "node2".into()],
        })
        .await
        .unwrap();
        Env { dir, pilot }
    }

    fn control(&self, node: &str) -> ControlPlane {
        let token_file = self.dir.join("state/tokens").join(format!("{node}.token"));
        ControlPlane {
            address: format!("https://{}", self.pilot.addr),
            root_pem: self.pilot.root_pem.clone(),
            root_file: None,
            server_name: "pilot.istio-system.svc".into(),
            token_file,
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";

fn service(name: &str, vip: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{port: {port}}}]}}\n"
    )
}

fn pod(name: &str, app: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {app}}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn write(dir: &std::path::Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("config").join(file)).unwrap();
}

const WEB: &str = "shop/web.shop.svc.cluster.local";

#[tokio::test]
async fn ack_incremental_push_and_removal() {
    let env = Env::start().await;
    let mut s = Stream::open(
        &env.control("node1"),
        &[
            (ADDRESS_TYPE_URL, HashMap::new()),
            (AUTHORIZATION_TYPE_URL, HashMap::new()),
        ],
    )
    .await
    .unwrap();
    let first = s.next().await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&first), [WEB]);
    s.ack(&first).await;
    let policies = s.next().await;
    assert_eq!(policies.type_url, AUTHORIZATION_TYPE_URL);
    assert!(policies.resources.is_empty());
    s.ack(&policies).await;

    write(
        &env.dir,
        "pod.yaml",
        &pod("web-1", "web", "node1", "10.244.1.5"),
    );
    let push = s.next().await;
    // The pod is new and the service is unchanged: only the pod is sent.
    assert_eq!(names(&push), ["uid-web-1"]);
    s.ack(&push).await;

    std::fs::remove_file(env.dir.join("config/pod.yaml")).unwrap();
    let removal = s.next().await;
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, ["uid-web-1"]);
    s.ack(&removal).await;
    s.nothing_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn nack_keeps_the_bad_version_out() {
    let env = Env::start().await;
    let mut s = Stream::open(&env.control("node1"), &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .unwrap();
    let first = s.next().await;
    s.ack(&first).await;
    let good_version = versions(&first)[WEB].clone();

    write(&env.dir, "svc.yaml", &service("web", "10.96.0.1", 81));
    let bad = s.next().await;
    assert_eq!(names(&bad), [WEB]);
    s.reply(&bad, Some("port 81 is unacceptable")).await;
    // Another change elsewhere: only that one is pushed, the rejected service is not resent.
    write(
        &env.dir,
        "pod.yaml",
        &pod("web-1", "web", "node1", "10.244.1.5"),
    );
    let next = s.next().await;
    assert_eq!(names(&next), ["uid-web-1"]);
    s.ack(&next).await;

    let conns = env.pilot.registry.report();
    let t = &conns[0].types[0];
    assert_eq!(t.nacks, 1);
    assert_eq!(
        t.sent[WEB], good_version,
        "the previous version stays in force"
    );
    assert_eq!(t.last_nack.as_deref(), Some("port 81 is unacceptable"));
    assert_eq!(
        env.pilot
            .registry
            .nacks
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Fixed: the new version goes out.
    write(&env.dir, "svc.yaml", &service("web", "10.96.0.1", 82));
    let fixed = s.next().await;
    // The pod's port list follows its service's, so it changes too.
    assert_eq!(names(&fixed), [WEB, "uid-web-1"]);
}

#[tokio::test]
async fn reconnect_with_versions_resends_nothing_and_clients_differ() {
    let env = Env::start().await;
    write(
        &env.dir,
        "pod.yaml",
        &pod("web-1", "web", "node1", "10.244.1.5"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cp = env.control("node1");
    let mut a = Stream::open(&cp, &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .unwrap();
    let full = a.next().await;
    assert_eq!(full.resources.len(), 2);
    a.ack(&full).await;
    let held = versions(&full);
    drop(a);

    // Reconnect holding everything: the first response is empty.
    let mut again = Stream::open(&cp, &[(ADDRESS_TYPE_URL, held.clone())])
        .await
        .unwrap();
    let first = again.next().await;
    assert!(first.resources.is_empty() && first.removed_resources.is_empty());
    again.ack(&first).await;

    // A second proxy at an older version (a service it knows at another version, and a pod
    // that no longer exists) gets exactly the difference.
    let mut stale = held.clone();
    stale.insert(WEB.into(), "0000000000000000".into());
    stale.insert("uid-gone".into(), "1".into());
    let mut b = Stream::open(&env.control("node2"), &[(ADDRESS_TYPE_URL, stale)])
        .await
        .unwrap();
    let diff = b.next().await;
    assert_eq!(names(&diff), [WEB]);
    assert_eq!(diff.removed_resources, ["uid-gone"]);
    b.ack(&diff).await;

    // Both get the next change.
    write(
        &env.dir,
        "pod2.yaml",
        &pod("web-2", "web", "node2", "10.244.2.5"),
    );
    assert_eq!(names(&again.next().await), ["uid-web-2"]);
    assert_eq!(names(&b.next().await), ["uid-web-2"]);
    assert_eq!(env.pilot.registry.report().len(), 2);
}

#[tokio::test]
async fn unauthenticated_callers_get_nothing() {
    let env = Env::start().await;
    let mut cp = env.control("node1");
    cp.token_file = env.dir.join("wrong.token");
    std::fs::write(&cp.token_file, "not-a-token").unwrap();
    let err = Stream::open(&cp, &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let (csr, _) = mesh::ca_client::csr(&Identity::new("cluster.local", "shop", "web")).unwrap();
    let err = create(&cp, csr, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn ca_issues_for_pods_on_the_callers_node_only() {
    let env = Env::start().await;
    write(
        &env.dir,
        "pod.yaml",
        &pod("web-1", "web", "node1", "10.244.1.5"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let web = Identity::new("cluster.local", "shop", "web");
    let (csr, key) = mesh::ca_client::csr(&web).unwrap();

    // node1 runs web-1: issued, and the chain verifies with the root.
    let chain = create(&env.control("node1"), csr.clone(), Some(&web.to_string()))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], env.pilot.root_pem);
    let (certs, roots) = mesh::ca_client::parse_chain(&chain).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let cert = mesh::tls::WorkloadCert::new(&web, certs.clone(), key, roots.clone()).unwrap();
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(
        lifetime,
        Duration::from_secs(3660),
        "TTL capped at 1 h (+1 min back-dating)"
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(roots[0].as_ref()).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("the leaf is signed by the root");
    assert_eq!(leaf.subject().iter().count(), 0);

    // node2 runs no pod as shop/web: refused.
    let err = create(&env.control("node2"), csr.clone(), Some(&web.to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("node node2 has no pod running as"),
        "{}",
        err.message()
    );

    // The CSR must be for the identity impersonated.
    let other = Identity::new("cluster.local", "shop", "other");
    let (other_csr, _) = mesh::ca_client::csr(&other).unwrap();
    let err = create(&env.control("node1"), other_csr, Some(&web.to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // A workload (not a node agent) may not impersonate, even its own identity.
    env.pilot.auth.local().unwrap().insert(
        "workload-token".into(),
        Caller::Workload {
            identity: web.clone(),
        },
    );
    let mut as_workload = env.control("node1");
    as_workload.token_file = env.dir.join("workload.token");
    std::fs::write(&as_workload.token_file, "workload-token").unwrap();
    let err = create(&as_workload, csr.clone(), Some(&web.to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("may not impersonate"),
        "{}",
        err.message()
    );
    // Without impersonation, for itself: fine.
    assert!(create(&as_workload, csr, None).await.is_ok());
}

#[tokio::test]
async fn malformed_csr_gets_a_clear_error() {
    let env = Env::start().await;
    let cp = env.control("node1");
    let err = create(&cp, "hello".into(), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("csr is not PEM"),
        "{}",
        err.message()
    );
    let err = create(&cp, env.pilot.root_pem.clone(), None)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("not a CERTIFICATE REQUEST"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn restart_keeps_root_and_tokens() {
    let env = Env::start().await;
    let token = std::fs::read_to_string(env.dir.join("state/tokens/node1.token")).unwrap();
    let again = start(Config {
        source: Source::Folder(env.dir.join("config")),
        state_dir: env.dir.join("state"),
        listen: "127.0.0.1:0".parse().unwrap(),
        debug: None,
        mesh: Default::default(),
        max_cert_ttl: Duration::from_secs(3600),
        nodes: vec![],
    })
    .await
    .unwrap();
    assert_eq!(again.root_pem, env.pilot.root_pem);
    assert_eq!(
        again.auth.local().unwrap().node_token("node1").unwrap(),
        token
    );
}

/// A proxy that refuses workloads of service account `broken` (as ztunnel refuses an invalid
/// resource) and applies the rest of each update; every update and its answer go to the test.
struct Refusing {
    tx: tokio::sync::mpsc::UnboundedSender<(Update, Result<(), Rejected>)>,
}

impl Handler for Refusing {
    fn apply(&mut self, update: Update) -> Result<(), Rejected> {
        let bad: Vec<String> = update
            .updated
            .iter()
            .filter(|r| {
                matches!(address(&r.name, &r.body),
                    Ok(Converted::Workload(w)) if w.service_account == "broken")
            })
            .map(|r| r.name.clone())
            .collect();
        let result = if bad.is_empty() {
            Ok(())
        } else {
            Err(Rejected {
                names: bad,
                message: "service account broken is refused".into(),
            })
        };
        let _ = self.tx.send((update, result.clone()));
        result
    }
}

/// What `/debug/connections` says of the first connection's Address type, once nothing awaits
/// an ACK.
async fn settled_address_report(env: &Env) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = http_get(env.pilot.debug_addr.unwrap(), "/debug/connections").await;
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let t = &v["connections"][0]["types"][0];
        if t["awaiting_ack"] == 0 {
            assert_eq!(t["type_url"], ADDRESS_TYPE_URL);
            return t.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still awaiting: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// mesh's xDS client against pilot, its handler rejecting one resource of a push of two: pilot
/// must know the other was applied, so its later removal is sent, and the rejected one is sent
/// again once fixed.
#[tokio::test]
async fn partial_nack_with_a_real_client() {
    let env = Env::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = tokio::spawn(mesh::xds::run(
        env.control("node1"),
        ClientState::new(
            "ztunnel~10.0.0.1~ztunnel-1.istio-system~istio-system.svc.cluster.local".into(),
            vec![ADDRESS_TYPE_URL.into()],
        ),
        Box::new(Refusing { tx }),
    ));
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an update within 5 s")
            .unwrap()
    };
    let (first, result) = next().await;
    assert_eq!(
        first
            .updated
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [WEB]
    );
    assert!(result.is_ok());

    // One push, one good and one bad workload.
    let good = pod("web-1", "web", "node1", "10.244.1.5");
    let broken = |ip: &str| pod("web-2", "broken", "node1", ip);
    write(
        &env.dir,
        "pods.yaml",
        &format!("{good}---\n{}", broken("10.244.1.6")),
    );
    let (push, result) = next().await;
    let mut pushed: Vec<&str> = push.updated.iter().map(|r| r.name.as_str()).collect();
    pushed.sort();
    assert_eq!(pushed, ["uid-web-1", "uid-web-2"]);
    assert_eq!(result.unwrap_err().names, ["uid-web-2"]);
    let report = settled_address_report(&env).await;
    assert!(report["acked"]["uid-web-1"].is_string(), "{report}");
    assert!(report["sent"]["uid-web-1"].is_string(), "{report}");
    assert!(report["nacked"]["uid-web-2"].is_string(), "{report}");
    assert!(report["sent"].get("uid-web-2").is_none(), "{report}");

    // The good one goes away: its removal must reach the client that holds it.
    write(&env.dir, "pods.yaml", &broken("10.244.1.6"));
    let (removal, result) = next().await;
    assert!(
        removal.updated.is_empty(),
        "the rejected version is not resent"
    );
    assert_eq!(removal.removed, ["uid-web-1"]);
    assert!(result.is_ok());

    // The bad one fixed: sent, and accepted.
    write(
        &env.dir,
        "pods.yaml",
        &pod("web-2", "web", "node1", "10.244.1.6"),
    );
    let (fixed, result) = next().await;
    assert_eq!(
        fixed
            .updated
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["uid-web-2"]
    );
    assert!(result.is_ok());
    let report = settled_address_report(&env).await;
    assert_eq!(
        report["acked"],
        serde_json::json!({WEB: report["sent"][WEB], "uid-web-2": fixed.updated[0].version}),
        "{report}"
    );
    assert_eq!(report["nacked"], serde_json::json!({}));
    assert_eq!(report["nacks"], 1);
    assert_eq!(
        report["last_nack"],
        "rejected: uid-web-2\n\nservice account broken is refused"
    );
    client.abort();
}

/// A policy for a waypoint that does not exist is enforced nowhere: `/debug/snapshot` says so,
/// naming file, object and field; it is never sent to node proxies.
#[tokio::test]
async fn waypoint_policy_is_reported() {
    let env = Env::start().await;
    write(
        &env.dir,
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: via-waypoint, namespace: shop}\nspec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], action: DENY, rules: [{}]}\n",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let problems = loop {
        let text = http_get(env.pilot.debug_addr.unwrap(), "/debug/snapshot").await;
        let v: serde_json::Value =
            serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
        if v["generation"].as_u64() >= Some(1) {
            break v["problems"].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no new snapshot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        problems,
        serde_json::json!([
            "policy.yaml: AuthorizationPolicy shop/via-waypoint: field \"spec.targetRefs[0]\": no waypoint Gateway shop/waypoint; in force nowhere"
        ])
    );
    assert!(
        env.pilot
            .published
            .borrow()
            .resources
            .authorizations
            .is_empty(),
        "not sent to node proxies"
    );
}

/// Istio's ztunnel with `XDS_ON_DEMAND=true`: `*` subscribed and unsubscribed in its first
/// request, then addresses asked for by `<network>/<ip>` as it meets them; its own node's
/// workloads come without asking.
#[tokio::test]
async fn on_demand_addresses_by_alias() {
    let env = Env::start().await;
    write(
        &env.dir,
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod("web-1", "web", "node1", "10.244.1.5"),
            pod("web-2", "web", "node2", "10.244.2.5")
        ),
    );
    // Wait until pilot has both pods (a wildcard client sees them).
    let mut all = Stream::open(&env.control("node2"), &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    while !(seen.contains("uid-web-1") && seen.contains("uid-web-2")) {
        let r = all.next().await;
        all.ack(&r).await;
        seen.extend(names(&r).into_iter().map(str::to_string));
    }
    let mut s = Stream::open(&env.control("node1"), &[]).await.unwrap();
    let request = |sub: &[&str], unsub: &[&str], nonce: &str| {
        envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    };
    s.send(request(&[], &["*"], "")).await;
    let first = s.next().await;
    assert_eq!(names(&first), ["uid-web-1"], "only node1's own workload");
    s.send(request(&["/10.244.2.5", "/10.96.0.1"], &[], &first.nonce))
        .await;
    let found = s.next().await;
    let mut got: Vec<(&str, &[String])> = found
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.aliases.as_slice()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (WEB, &["/10.96.0.1".to_string()][..]),
            ("uid-web-2", &["/10.244.2.5".to_string()][..])
        ]
    );
    s.send(request(&["/10.1.2.3"], &[], &found.nonce)).await;
    let missing = s.next().await;
    assert!(missing.resources.is_empty());
    assert_eq!(missing.removed_resources, ["/10.1.2.3"]);
    s.ack(&missing).await;
    s.nothing_for(Duration::from_millis(300)).await;
}

/// Istio's "dedicated" mode: a proxy running for one workload authenticates with the token
/// pilot writes for that workload's service account, gets the workload API, and a
/// certificate for its own identity only (no impersonation, no other identity).
#[tokio::test]
async fn a_proxy_for_one_workload_uses_its_own_token() {
    let env = Env::start().await;
    write(
        &env.dir,
        "pod.yaml",
        &pod("web-1", "web", "node1", "10.244.1.5"),
    );
    let token_file = env.dir.join("state/tokens/sa/shop.web.token");
    let start = std::time::Instant::now();
    while !token_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no token for shop/web"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cp = env.control("node1");
    cp.token_file = token_file;

    let mut s = Stream::open(&cp, &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .unwrap();
    let first = s.next().await;
    assert!(names(&first).contains(&WEB), "{:?}", names(&first));

    let web = Identity::new("cluster.local", "shop", "web");
    let (csr, _) = mesh::ca_client::csr(&web).unwrap();
    assert_eq!(create(&cp, csr.clone(), None).await.unwrap().len(), 2);
    let err = create(&cp, csr, Some(&web.to_string())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let other = Identity::new("cluster.local", "shop", "other");
    let (other_csr, _) = mesh::ca_client::csr(&other).unwrap();
    let err = create(&cp, other_csr, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

/// The certificate pilot's 15012 presents now (a fresh TLS connection, verified with the root).
async fn serving_leaf(env: &Env) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(env.pilot.root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(mesh::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(env.pilot.addr)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("pilot.istio-system.svc").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// pilot's serving certificate is renewed at half its lifetime (here the 4 s of
/// `max_cert_ttl`): new connections get the new one, a stream opened before keeps working.
#[tokio::test]
async fn the_serving_certificate_is_renewed_and_open_streams_stay() {
    let dir = std::env::temp_dir().join(format!("pilot-it-{}", fastrand::u64(..)));
    std::fs::create_dir_all(dir.join("config")).unwrap();
    write(&dir, "ns.yaml", NAMESPACE);
    write(&dir, "svc.yaml", &service("web", "10.96.0.1", 80));
    let pilot = start(Config {
        source: Source::Folder(dir.join("config")),
        state_dir: dir.join("state"),
        listen: "127.0.0.1:0".parse().unwrap(),
        debug: None,
        mesh: Default::default(),
        max_cert_ttl: Duration::from_secs(4),
        nodes: vec!["node1".into()],
    })
    .await
    .unwrap();
    let env = Env { dir, pilot };
    let mut s = Stream::open(&env.control("node1"), &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .unwrap();
    let first = s.next().await;
    s.ack(&first).await;
    let before = serving_leaf(&env).await;
    assert_eq!(
        serving_leaf(&env).await,
        before,
        "same certificate until renewal"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = serving_leaf(&env).await;
    assert_ne!(after, before, "renewed at half of its 4 s lifetime");
    let (_, leaf) = x509_parser::parse_x509_certificate(&after).unwrap();
    assert!(leaf.validity().is_valid());
    // The stream from before the renewal still gets pushes.
    write(
        &env.dir,
        "pod.yaml",
        &pod("web-1", "web", "node1", "10.244.1.5"),
    );
    let push = s.next().await;
    assert_eq!(names(&push), ["uid-web-1"]);
}
