//! pilot's Kubernetes source and TokenReview against a stand-in API server (list/watch/TokenReview over HTTP on loopback): the model matches the folder source's, watches follow changes and relists, and callers are mapped from their service-account tokens.

mod ads;
mod apiserver;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apiserver::{ApiServer, TokenInfo};
use mesh::control::ControlPlane;
use mesh::identity::Identity;
use mesh::proto::ADDRESS_TYPE_URL;
use pilot::auth::{Authenticator, Caller};
use pilot::model::Snapshot;
use pilot::server::{Config, Kubernetes, Source, start};
use pilot::token_review::{Limits, TokenReviewer};
use pilot::translate::{MeshOptions, render, translate};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// deploy/examples/bookinfo, every YAML document as the JSON object a client would send.
fn bookinfo() -> Vec<Value> {
    let dir = repo().join("deploy/examples/bookinfo");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap();
            if !v.is_null() {
                objects.push(v);
            }
        }
    }
    assert!(objects.len() > 10, "bookinfo has {} objects", objects.len());
    objects
}

async fn server_with(objects: Vec<Value>) -> ApiServer {
    let server = ApiServer::start().await;
    for o in objects {
        server.apply(o);
    }
    server
}

/// The cluster source on `server`, as pilot runs it.
fn watch_cluster(server: &ApiServer) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(pilot::cluster::watch_cluster(server.client(), tx));
    rx
}

/// The next snapshot published, within `limit`.
async fn next(rx: &mut watch::Receiver<Arc<Snapshot>>, limit: Duration) -> Arc<Snapshot> {
    tokio::time::timeout(limit, rx.changed())
        .await
        .expect("a snapshot in time")
        .unwrap();
    rx.borrow_and_update().clone()
}

/// Snapshots until one satisfies `ok` (relists wait for kube's backoff, 0.8 s and up).
async fn until(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    ok: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = rx.borrow_and_update().clone();
        if s.generation > 0 && ok(&s) {
            return s;
        }
        tokio::time::timeout_at(deadline, rx.changed())
            .await
            .expect("the expected snapshot within 20 s")
            .unwrap();
    }
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "bookinfo", "uid": format!("uid-{name}"),
                     "labels": {"app": "ratings", "version": "v2"}},
        "spec": {"nodeName": node, "serviceAccountName": "bookinfo-ratings",
                 "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 9080}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null}]},
    })
}

fn pod_names(s: &Snapshot) -> Vec<&str> {
    s.pods.keys().map(|(_, n)| n.as_str()).collect()
}

/// The model as JSON, without what differs by source alone: the generation, and the file
/// problems name.
fn comparable(s: &Snapshot) -> Value {
    let mut v = serde_json::to_value(s).unwrap();
    v["generation"] = 0.into();
    for p in v["problems"].as_array_mut().unwrap() {
        p["file"] = "".into();
    }
    v
}

#[tokio::test]
async fn bookinfo_from_the_cluster_is_the_folders_model() {
    let server = server_with(bookinfo()).await;
    let mut rx = watch_cluster(&server);
    let snap = next(&mut rx, Duration::from_secs(10)).await;
    assert_eq!(snap.generation, 1);
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    assert_eq!(snap.pods.len(), 8);
    assert_eq!(snap.policies.len(), 3);
    assert_eq!(
        (
            snap.virtual_services.len(),
            snap.destination_rules.len(),
            snap.gateways.len()
        ),
        (1, 1, 1)
    );

    // The translation is the folder's, byte for byte: the golden file.
    let t = translate(&snap, &MeshOptions::default());
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let golden = std::fs::read_to_string(repo().join("pilot/tests/golden/bookinfo.txt")).unwrap();
    assert!(
        render(&t.resources) == golden,
        "translation from the cluster differs from pilot/tests/golden/bookinfo.txt"
    );

    // The model equals the folder source's for the objects the API server holds (with the
    // uids and resourceVersions it gave them), exported as `kubectl get -o yaml` would.
    let dir = std::env::temp_dir().join(format!("pilot-export-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let exported: Vec<String> = server
        .objects()
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).unwrap())
        .collect();
    std::fs::write(dir.join("export.yaml"), exported.join("---\n")).unwrap();
    let from_folder = pilot::folder::load(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(comparable(&snap), comparable(&from_folder));
    assert_ne!(comparable(&snap), comparable(&Snapshot::default()));
}

#[tokio::test]
async fn nothing_is_published_before_every_kind_is_listed() {
    let server = server_with(bookinfo()).await;
    server.set_failing("Gateway", true);
    let mut rx = watch_cluster(&server);
    let early = tokio::time::timeout(Duration::from_millis(1500), rx.changed()).await;
    assert!(early.is_err(), "published while Gateways were not listed");
    assert!(server.requests("Gateway").0 >= 1, "Gateways were asked for");

    server.set_failing("Gateway", false);
    let snap = next(&mut rx, Duration::from_secs(15)).await;
    assert_eq!(snap.generation, 1);
    assert_eq!(snap.pods.len(), 8);
    assert_eq!(snap.gateways.len(), 1);
}

#[tokio::test]
async fn a_kind_not_installed_counts_as_empty() {
    let server = server_with(bookinfo()).await;
    // The DestinationRule CRD is not installed: none of them, not a reason to wait.
    server.set_served("DestinationRule", false);
    let mut rx = watch_cluster(&server);
    let snap = next(&mut rx, Duration::from_secs(10)).await;
    assert_eq!(snap.pods.len(), 8);
    assert!(snap.destination_rules.is_empty());

    // Once it is served, its objects come in (at the watcher's next try).
    server.set_served("DestinationRule", true);
    let snap = until(&mut rx, |s| s.destination_rules.len() == 1).await;
    assert_eq!(snap.pods.len(), 8);
}

#[tokio::test]
async fn pod_changes_and_problems() {
    let server = server_with(bookinfo()).await;
    let mut rx = watch_cluster(&server);
    let first = next(&mut rx, Duration::from_secs(10)).await;
    let mesh = MeshOptions::default();
    let before = translate(&first, &mesh).resources;

    // ADDED: a workload address named by the pod's uid.
    server.apply(pod("ratings-v2-1", "node2", "10.244.2.20"));
    let added = next(&mut rx, Duration::from_secs(5)).await;
    assert!(pod_names(&added).contains(&"ratings-v2-1"));
    let t = translate(&added, &mesh).resources;
    assert_eq!(t.addresses.len(), before.addresses.len() + 1);
    let v1 = t.addresses["uid-ratings-v2-1"].version.clone();

    // A status heartbeat pilot does not read: no new snapshot.
    let mut heartbeat = pod("ratings-v2-1", "node2", "10.244.2.20");
    heartbeat["status"]["conditions"][0]["lastProbeTime"] = "2026-01-01T00:00:00Z".into();
    server.apply(heartbeat);
    let quiet = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
    assert!(
        quiet.is_err(),
        "a change pilot does not read made a snapshot"
    );

    // MODIFIED: a new IP, a new version of the same address.
    server.apply(pod("ratings-v2-1", "node2", "10.244.2.21"));
    let modified = next(&mut rx, Duration::from_secs(5)).await;
    let t = translate(&modified, &mesh).resources;
    assert_ne!(t.addresses["uid-ratings-v2-1"].version, v1);

    // An invalid pod and an invalid policy: reported, left out, the rest stays.
    server.apply(pod("broken", "node1", "10.244.1"));
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "maybe", "namespace": "bookinfo"},
        "spec": {"action": "MAYBE"},
    }));
    let bad = until(&mut rx, |s| s.problems.len() == 2).await;
    let problems: Vec<String> = bad.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        problems,
        [
            "kubernetes: AuthorizationPolicy bookinfo/maybe: field \"spec.action\": \"MAYBE\" is not one of ALLOW, DENY, AUDIT, CUSTOM",
            "kubernetes: Pod bookinfo/broken: field \"status.podIP\": \"10.244.1\" is not an IP address",
        ]
    );
    assert_eq!(bad.pods.len(), 9);
    assert_eq!(bad.policies.len(), 3);
    // Fixed in place: the problem goes, the policy comes in.
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "maybe", "namespace": "bookinfo"},
        "spec": {"action": "DENY", "rules": [{}]},
    }));
    let fixed = until(&mut rx, |s| s.problems.len() == 1).await;
    assert_eq!(fixed.policies.len(), 4);

    // DELETED: the address goes.
    server.delete("v1", "Pod", "bookinfo", "ratings-v2-1");
    let deleted = next(&mut rx, Duration::from_secs(5)).await;
    assert!(!pod_names(&deleted).contains(&"ratings-v2-1"));
    let t = translate(&deleted, &mesh).resources;
    assert!(!t.addresses.contains_key("uid-ratings-v2-1"));
    assert_eq!(t.addresses.len(), before.addresses.len());
}

#[tokio::test]
async fn relist_after_410_converges_and_failures_keep_the_last_objects() {
    let server = server_with(bookinfo()).await;
    let mut rx = watch_cluster(&server);
    next(&mut rx, Duration::from_secs(10)).await;
    let (pod_lists, _) = server.requests("Pod");

    // Changes the watches miss, then compacted away: resuming gets 410 Gone, and only a
    // relist can tell that a pod went while nobody watched.
    server.pause_watches(true);
    server.apply(pod("ratings-v2-1", "node2", "10.244.2.20"));
    server.delete("v1", "Pod", "bookinfo", "details-v1-6c7d9");
    server.compact();
    server.disconnect_watches();
    server.pause_watches(false);
    let s = until(&mut rx, |s| {
        pod_names(s).contains(&"ratings-v2-1") && !pod_names(s).contains(&"details-v1-6c7d9")
    })
    .await;
    assert_eq!(s.pods.len(), 8);
    assert!(
        server.requests("Pod").0 > pod_lists,
        "pods were listed again"
    );

    // Relisting pods fails for a while: the pods last seen stay in the model.
    server.set_failing("Pod", true);
    server.pause_watches(true);
    server.apply(pod("ratings-v2-2", "node2", "10.244.2.22"));
    server.compact();
    server.disconnect_watches();
    server.pause_watches(false);
    let failing_from = server.requests("Pod").0;
    // kube's backoff has grown since the last error (0.8 s doubling, jittered).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while server.requests("Pod").0 < failing_from + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pods were not relisted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = rx.borrow().clone();
    assert_eq!(kept.pods.len(), 8, "the failing relist took pods away");
    server.set_failing("Pod", false);
    let s = until(&mut rx, |s| pod_names(s).contains(&"ratings-v2-2")).await;
    assert_eq!(s.pods.len(), 9);
}

fn reviewer(server: &ApiServer, model: watch::Receiver<Arc<Snapshot>>) -> TokenReviewer {
    TokenReviewer::new(
        server.client(),
        "cluster.local",
        ("istio-system".into(), "ztunnel".into()),
        model,
    )
}

fn sa_token(ns: &str, sa: &str, extra: &[(&str, &str)]) -> TokenInfo {
    TokenInfo {
        username: format!("system:serviceaccount:{ns}:{sa}"),
        audiences: vec!["istio-ca".into()],
        extra: extra
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn ztunnel_pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "istio-system", "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "serviceAccountName": "ztunnel", "hostNetwork": true, "containers": []},
        "status": {"phase": "Running", "podIP": "192.168.0.2"},
    })
}

#[tokio::test]
async fn token_review_callers() {
    let mut objects = bookinfo();
    objects.push(ztunnel_pod("ztunnel-abcde", "node2"));
    let server = server_with(objects).await;
    let mut rx = watch_cluster(&server);
    next(&mut rx, Duration::from_secs(10)).await;
    let r = reviewer(&server, rx.clone());

    server.add_token("reviews", sa_token("bookinfo", "bookinfo-reviews", &[]));
    server.add_token(
        "zt-node",
        sa_token(
            "istio-system",
            "ztunnel",
            &[("authentication.kubernetes.io/node-name", "node1")],
        ),
    );
    server.add_token(
        "zt-pod",
        sa_token(
            "istio-system",
            "ztunnel",
            &[
                ("authentication.kubernetes.io/pod-name", "ztunnel-abcde"),
                ("authentication.kubernetes.io/pod-uid", "uid-ztunnel-abcde"),
            ],
        ),
    );
    server.add_token(
        "zt-old-pod",
        sa_token(
            "istio-system",
            "ztunnel",
            &[
                ("authentication.kubernetes.io/pod-name", "ztunnel-abcde"),
                (
                    "authentication.kubernetes.io/pod-uid",
                    "uid-of-a-deleted-pod",
                ),
            ],
        ),
    );
    server.add_token("zt-unbound", sa_token("istio-system", "ztunnel", &[]));
    let mut other_audience = sa_token("bookinfo", "bookinfo-reviews", &[]);
    other_audience.audiences = vec!["https://kubernetes.default.svc".into()];
    server.add_token("api-audience", other_audience);
    server.add_token(
        "alice",
        TokenInfo {
            username: "alice".into(),
            audiences: vec!["istio-ca".into()],
            extra: BTreeMap::new(),
        },
    );

    assert_eq!(
        r.authenticate("reviews").await.unwrap(),
        Caller::Workload {
            identity: Identity::new("cluster.local", "bookinfo", "bookinfo-reviews")
        }
    );
    let node = |n: &str| Caller::NodeAgent { node: n.into() };
    assert_eq!(r.authenticate("zt-node").await.unwrap(), node("node1"));
    // No node-name extra (Kubernetes < 1.32): the bound pod's node, from the model.
    assert_eq!(r.authenticate("zt-pod").await.unwrap(), node("node2"));
    let err = |t: &'static str| {
        let r = &r;
        async move { r.authenticate(t).await.unwrap_err() }
    };
    let e = err("zt-old-pod").await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("no longer exists"), "{}", e.message());
    let e = err("zt-unbound").await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("bound to no pod or node"),
        "{}",
        e.message()
    );
    let e = err("not-a-token").await;
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("invalid bearer token"),
        "{}",
        e.message()
    );
    let e = err("api-audience").await;
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("audiences"), "{}", e.message());
    let e = err("alice").await;
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("not a service account"),
        "{}",
        e.message()
    );

    // Every review asked for istio-ca, one per token: answers are cached, refusals too.
    let reviews = server.reviews();
    assert_eq!(reviews.len(), 8);
    assert!(
        reviews
            .iter()
            .all(|r| r["spec"]["audiences"] == json!(["istio-ca"]))
    );
    assert_eq!(r.authenticate("zt-node").await.unwrap(), node("node1"));
    assert!(err("not-a-token").await.code() == tonic::Code::Unauthenticated);
    assert_eq!(server.reviews().len(), 8);
    assert_eq!(r.cached_tokens(), 8);

    // The API server unreachable: unavailable, not unauthenticated, and not cached.
    let closed = ApiServer::start().await;
    let unreachable = reviewer(&closed, rx.clone());
    drop(closed);
    let e = unreachable.authenticate("reviews").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("TokenReview"), "{}", e.message());
    assert_eq!(unreachable.cached_tokens(), 0);
}

/// A reviewer with `limits` on an API server with no objects (the tokens need none).
async fn limited(limits: Limits) -> (ApiServer, Arc<TokenReviewer>) {
    let server = ApiServer::start().await;
    let (_, model) = watch::channel(Arc::new(Snapshot::default()));
    let r = Arc::new(reviewer(&server, model).with_limits(limits));
    (server, r)
}

/// Wait until the API server has `n` TokenReviews in flight.
async fn in_flight(server: &ApiServer, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.reviews_in_flight().0 != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?} TokenReviews in flight, waiting for {n}",
            server.reviews_in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Unknown tokens arriving at once make at most `concurrent_reviews` TokenReview calls at a
/// time; a caller that waits longer than `queue_wait` for its turn is told UNAVAILABLE (and
/// made no call); one whose turn comes in time is answered.
#[tokio::test]
async fn token_reviews_are_limited_in_number_and_time() {
    let (server, r) = limited(Limits {
        concurrent_reviews: 2,
        queue_wait: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    server.hold_reviews(true);
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move { r.authenticate(&format!("unknown-{i}")).await })
        })
        .collect();
    in_flight(&server, 2).await;
    // Two hold the permits; the other two give up after their 300 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(server.reviews_in_flight(), (2, 2));
    server.hold_reviews(false);
    let mut codes = Vec::new();
    for c in calls {
        codes.push(c.await.unwrap().unwrap_err().code());
    }
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(
        codes,
        [
            tonic::Code::Unavailable,
            tonic::Code::Unavailable,
            tonic::Code::Unauthenticated,
            tonic::Code::Unauthenticated
        ]
    );
    assert_eq!(
        server.reviews().len(),
        2,
        "the callers told to retry made no call"
    );

    // With one permit, a second caller waits for the first and is then answered.
    let (server, r) = limited(Limits {
        concurrent_reviews: 1,
        queue_wait: Duration::from_secs(5),
        ..Limits::default()
    })
    .await;
    server.add_token("web", sa_token("shop", "web", &[]));
    server.hold_reviews(true);
    let first = tokio::spawn({
        let r = r.clone();
        async move { r.authenticate("unknown").await }
    });
    in_flight(&server, 1).await;
    let second = tokio::spawn({
        let r = r.clone();
        async move { r.authenticate("web").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.hold_reviews(false);
    assert_eq!(
        first.await.unwrap().unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        second.await.unwrap().unwrap(),
        Caller::Workload {
            identity: Identity::new("cluster.local", "shop", "web")
        }
    );
    assert_eq!(server.reviews_in_flight(), (0, 1), "one call at a time");
    assert_eq!(server.reviews().len(), 2);
}

/// Refused tokens are remembered for `refused_ttl` (one call, however often they are
/// presented) and at most `refused_entries` of them; after that they are asked again.
#[tokio::test]
async fn refused_tokens_are_remembered_briefly_and_boundedly() {
    let (server, r) = limited(Limits {
        refused_ttl: Duration::from_secs(1),
        refused_entries: 3,
        ..Limits::default()
    })
    .await;
    server.add_token("web", sa_token("shop", "web", &[]));
    r.authenticate("web").await.unwrap();
    for _ in 0..5 {
        let e = r.authenticate("bad-0").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    assert_eq!(server.reviews().len(), 2, "one call for the refused token");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    r.authenticate("bad-0").await.unwrap_err();
    assert_eq!(server.reviews().len(), 3, "asked again after the TTL");

    // More refused tokens than the cache holds: the oldest is asked again, the newest is not,
    // and the accepted token is still remembered.
    for i in 1..=3 {
        r.authenticate(&format!("bad-{i}")).await.unwrap_err();
    }
    assert_eq!(server.reviews().len(), 6);
    assert_eq!(r.cached_tokens(), 4, "three refused and one accepted");
    r.authenticate("bad-3").await.unwrap_err();
    r.authenticate("web").await.unwrap();
    assert_eq!(server.reviews().len(), 6);
    r.authenticate("bad-0").await.unwrap_err();
    assert_eq!(
        server.reviews().len(),
        7,
        "the oldest refusal was forgotten"
    );
}

/// pilot in Kubernetes mode end to end: a real tonic delta ADS client and CA calls over TLS,
/// authenticated by TokenReview, following pod changes made through the API server.
#[tokio::test]
async fn xds_and_ca_in_kubernetes_mode() {
    let server = server_with(bookinfo()).await;
    server.add_token(
        "zt-node1",
        sa_token(
            "istio-system",
            "ztunnel",
            &[("authentication.kubernetes.io/node-name", "node1")],
        ),
    );
    server.add_token("reviews", sa_token("bookinfo", "bookinfo-reviews", &[]));
    let dir = std::env::temp_dir().join(format!("pilot-k8s-it-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let pilot = start(Config {
        source: Source::Kubernetes(Kubernetes {
            client: server.client(),
            node_agent: ("istio-system".into(), "ztunnel".into()),
            waypoints: None,
        }),
        state_dir: dir.join("state"),
        listen: "127.0.0.1:0".parse().unwrap(),
        debug: Some("127.0.0.1:0".parse().unwrap()),
        mesh: Default::default(),
        max_cert_ttl: Duration::from_secs(3600),
        nodes: vec![],
    })
    .await
    .unwrap();
    assert!(matches!(pilot.auth, Authenticator::TokenReview(_)));
    // The debug endpoint shows the cluster's model.
    let debug = ads::http_get(pilot.debug_addr.unwrap(), "/debug/snapshot").await;
    assert!(debug.starts_with("HTTP/1.1 200"), "{debug}");
    assert!(
        debug.contains("\"bookinfo/productpage-v1-7f9d8\""),
        "{debug}"
    );
    assert!(
        !dir.join("state/tokens").exists(),
        "no local tokens in Kubernetes mode"
    );
    let control = |token: &str| {
        let token_file = dir.join(format!("{token}.token"));
        std::fs::write(&token_file, token).unwrap();
        ControlPlane {
            address: format!("https://{}", pilot.addr),
            root_pem: pilot.root_pem.clone(),
            root_file: None,
            server_name: "pilot.istio-system.svc".into(),
            token_file,
        }
    };

    let err = ads::Stream::open(&control("stolen"), &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .err()
        .expect("an unknown token is refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let mut s = ads::Stream::open(&control("zt-node1"), &[(ADDRESS_TYPE_URL, HashMap::new())])
        .await
        .unwrap();
    let first = s.next().await;
    // Every bookinfo pod and service (the waypoint's included).
    assert_eq!(first.resources.len(), 8 + 5, "{:?}", ads::names(&first));
    s.ack(&first).await;

    server.apply(pod("ratings-v2-1", "node1", "10.244.1.20"));
    let added = s.next().await;
    assert_eq!(ads::names(&added), ["uid-ratings-v2-1"]);
    s.ack(&added).await;
    server.apply(pod("ratings-v2-1", "node1", "10.244.1.21"));
    let modified = s.next().await;
    assert_eq!(ads::names(&modified), ["uid-ratings-v2-1"]);
    assert_ne!(
        ads::versions(&modified)["uid-ratings-v2-1"],
        ads::versions(&added)["uid-ratings-v2-1"]
    );
    s.ack(&modified).await;

    // The node agent of node1 gets certificates for node1's pods only.
    let ratings = Identity::new("cluster.local", "bookinfo", "bookinfo-ratings");
    let (csr, _) = mesh::ca_client::csr(&ratings).unwrap();
    let chain = ads::create(
        &control("zt-node1"),
        csr.clone(),
        Some(&ratings.to_string()),
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 2);
    server.delete("v1", "Pod", "bookinfo", "ratings-v2-1");
    let removed = s.next().await;
    assert_eq!(removed.removed_resources, ["uid-ratings-v2-1"]);
    s.ack(&removed).await;
    // ratings-v1 runs on node2 (bookinfo's pods.yaml): no pod of bookinfo-ratings on node1 now.
    let e = ads::create(
        &control("zt-node1"),
        csr.clone(),
        Some(&ratings.to_string()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // A workload token: its own identity only.
    let reviews = Identity::new("cluster.local", "bookinfo", "bookinfo-reviews");
    let (own, _) = mesh::ca_client::csr(&reviews).unwrap();
    assert!(ads::create(&control("reviews"), own, None).await.is_ok());
    let e = ads::create(&control("reviews"), csr, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // The node agent's own certificate is its service account's identity.
    let zt = Identity::new("cluster.local", "istio-system", "ztunnel");
    let (zt_csr, _) = mesh::ca_client::csr(&zt).unwrap();
    assert!(
        ads::create(&control("zt-node1"), zt_csr, None)
            .await
            .is_ok()
    );
    pilot.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn kubernetes_config(server: &ApiServer, state_dir: std::path::PathBuf) -> Config {
    Config {
        source: Source::Kubernetes(Kubernetes {
            client: server.client(),
            node_agent: ("istio-system".into(), "ztunnel".into()),
            waypoints: None,
        }),
        state_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        debug: None,
        mesh: Default::default(),
        max_cert_ttl: Duration::from_secs(3600),
        nodes: vec![],
    }
}

/// In a cluster the CA root lives in the Secret `istio-system/istio-ca-secret`: generated and
/// stored on the first start, the same root after a restart with an empty state directory (a
/// new pod), nothing written to the state directory; a Secret that is there already is used.
#[tokio::test]
async fn the_root_is_kept_in_a_secret() {
    let server = server_with(bookinfo()).await;
    let dir = std::env::temp_dir().join(format!("pilot-k8s-root-{}", fastrand::u64(..)));
    let first = start(kubernetes_config(&server, dir.join("a")))
        .await
        .unwrap();
    let root = first.root_pem.clone();
    first.stop().await;
    let secret = server
        .secret("istio-system", "istio-ca-secret")
        .expect("the root stored in a Secret");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret).unwrap();
    let data = secret.data.unwrap();
    let decode = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    assert_eq!(decode("ca-cert.pem"), root);
    assert!(decode("ca-key.pem").contains("PRIVATE KEY"));
    assert!(!dir.join("a/root-key.pem").exists(), "no key on local disk");
    let again = start(kubernetes_config(&server, dir.join("b")))
        .await
        .unwrap();
    assert_eq!(again.root_pem, root, "a new pod keeps the root");
    again.stop().await;

    // An operator's root, put there before pilot starts.
    let other = server_with(bookinfo()).await;
    let ca = mesh::ca::DevCa::generate("cluster.local").unwrap();
    let bytes = |s: &str| k8s_openapi::ByteString(s.as_bytes().to_vec());
    other.put_secret(
        serde_json::to_value(k8s_openapi::api::core::v1::Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("istio-ca-secret".into()),
                namespace: Some("istio-system".into()),
                ..Default::default()
            },
            data: Some(
                [
                    ("ca-cert.pem".to_string(), bytes(ca.root_pem())),
                    ("ca-key.pem".to_string(), bytes(&ca.key_pem())),
                ]
                .into(),
            ),
            ..Default::default()
        })
        .unwrap(),
    );
    let theirs = start(kubernetes_config(&other, dir.join("c")))
        .await
        .unwrap();
    assert_eq!(theirs.root_pem, ca.root_pem());
    theirs.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// deploy/pilot/rbac.yaml grants exactly what the code uses: list and watch of every kind the
/// source watches, and creating TokenReviews; nothing else.
#[test]
fn rbac_matches_the_code() {
    let text = std::fs::read_to_string(repo().join("deploy/pilot/rbac.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let granted_by = |kind: &str| {
        let role = docs
            .iter()
            .find(|v| v["kind"] == kind)
            .unwrap_or_else(|| panic!("a {kind}"));
        let mut granted = std::collections::BTreeSet::new();
        for rule in role["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        granted.insert(format!(
                            "{} {} {}",
                            group.as_str().unwrap(),
                            resource.as_str().unwrap(),
                            verb.as_str().unwrap()
                        ));
                    }
                }
            }
        }
        granted
    };
    let mut needed = std::collections::BTreeSet::new();
    for (group, resource) in pilot::cluster::watched_resources() {
        for verb in ["list", "watch"] {
            needed.insert(format!("{group} {resource} {verb}"));
        }
    }
    needed.insert("authentication.k8s.io tokenreviews create".to_string());
    for (group, resource) in pilot::route_status::status_resources() {
        needed.insert(format!("{group} {resource} patch"));
    }
    for (group, resource) in pilot::provision::applied_resources() {
        // What server-side apply needs: PATCH, which may create, and get.
        for verb in ["get", "patch", "create"] {
            needed.insert(format!("{group} {resource} {verb}"));
        }
    }
    // The istio-ca-root-cert ConfigMaps: watched by name and server-side applied.
    let (group, resource) = pilot::root_configmap::resource();
    for verb in ["list", "watch", "get", "patch", "create"] {
        needed.insert(format!("{group} {resource} {verb}"));
    }
    assert_eq!(granted_by("ClusterRole"), needed);
    // The root's Secret: in pilot's own namespace only (a Role, not the ClusterRole).
    let secret: std::collections::BTreeSet<String> = pilot::ca::secret_access()
        .iter()
        .map(|(g, r, v)| format!("{g} {r} {v}"))
        .collect();
    assert_eq!(granted_by("Role"), secret);
    let role = docs.iter().find(|v| v["kind"] == "Role").unwrap();
    assert_eq!(role["metadata"]["namespace"], "istio-system");
}

fn gateway(name: &str, class: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

/// Server-side applied objects by path, once `n` are there (within 20 s).
async fn applied(server: &ApiServer, n: usize) -> BTreeMap<String, apiserver::Applied> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = server.applied();
        if a.len() >= n {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} objects applied within 20 s; have {:?}",
            a.keys()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A waypoint Gateway in the cluster gets its ServiceAccount, Deployment and Service by
/// server-side apply (field manager `pilot`, owned by the Gateway); another Gateway gets
/// nothing; an unrelated change re-applies nothing; a new waypoint gets its own.
#[tokio::test]
async fn waypoint_gateways_are_provisioned() {
    let server = server_with(vec![
        gateway("reviews-wp", "istio-waypoint"),
        gateway("ingress", "istio"),
    ])
    .await;
    let rx = watch_cluster(&server);
    let opts = pilot::provision::Options {
        image: "registry.local/waypoint:1".into(),
        xds_address: "https://pilot.istio-system.svc:15012".into(),
    };
    tokio::spawn(pilot::provision::provision(server.client(), rx, opts));
    let a = applied(&server, 3).await;
    let gw_uid = server
        .objects()
        .into_iter()
        .find(|o| o["metadata"]["name"] == "reviews-wp")
        .unwrap()["metadata"]["uid"]
        .clone();
    let paths: Vec<&str> = a.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/bookinfo/serviceaccounts/reviews-wp",
            "/api/v1/namespaces/bookinfo/services/reviews-wp",
            "/apis/apps/v1/namespaces/bookinfo/deployments/reviews-wp",
        ]
    );
    for applied in a.values() {
        assert_eq!(applied.field_manager, "pilot");
        assert!(applied.force);
        let meta = &applied.object["metadata"];
        assert_eq!(
            meta["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "name": "reviews-wp", "uid": gw_uid}])
        );
        assert_eq!(
            meta["labels"],
            json!({"gateway.networking.k8s.io/gateway-name": "reviews-wp",
                   "istio.io/dataplane-mode": "none"})
        );
    }
    let dep = &a["/apis/apps/v1/namespaces/bookinfo/deployments/reviews-wp"].object;
    let pod_spec = &dep["spec"]["template"]["spec"];
    assert_eq!(pod_spec["serviceAccountName"], "reviews-wp");
    assert_eq!(
        pod_spec["containers"][0]["image"],
        "registry.local/waypoint:1"
    );
    assert_eq!(
        pod_spec["containers"][0]["args"],
        json!([
            "--xds-address=https://pilot.istio-system.svc:15012",
            "--xds-root-cert=/var/run/secrets/istio/root-cert.pem",
            "--xds-token-file=/var/run/secrets/tokens/istio-token",
        ])
    );
    let svc = &a["/api/v1/namespaces/bookinfo/services/reviews-wp"].object;
    assert_eq!(
        svc["spec"]["selector"],
        json!({"gateway.networking.k8s.io/gateway-name": "reviews-wp"})
    );
    assert_eq!(svc["spec"]["ports"][0]["name"], "mesh");
    assert_eq!(svc["spec"]["ports"][0]["port"], 15008);

    // An unrelated change: a new snapshot, nothing applied again.
    server.apply(pod("ratings-1", "node1", "10.0.0.9"));
    server.apply(gateway("details-wp", "istio-waypoint"));
    let a = applied(&server, 6).await;
    assert_eq!(a.len(), 6, "{:?}", a.keys());
    assert!(a.values().all(|x| x.count == 1), "{a:?}");
    assert!(a.contains_key("/apis/apps/v1/namespaces/bookinfo/deployments/details-wp"));
}

/// Many pods listed through the stand-in server converge into one snapshot and translation,
/// and one pod changed afterwards shows in the next snapshot. 2,000 pods behind 200 services by
/// default (cheap enough for every run); `PILOT_K8S_SCALE_PODS=10000 cargo test -p pilot --test
/// kubernetes many_pods -- --nocapture` is the run whose figures the README quotes. Timings are
/// printed, never asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pods_converge_and_a_change_follows() {
    let pods: usize = std::env::var("PILOT_K8S_SCALE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let services = pods / 10;
    let server = ApiServer::start().await;
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "bookinfo", "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    for s in 0..services {
        server.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}"), "namespace": "bookinfo"},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 250, s % 250 + 1),
                     "selector": {"app": format!("app-{s}")}, "ports": [{"port": 80, "targetPort": 9080}]}}));
    }
    for p in 0..pods {
        let mut o = pod(
            &format!("pod-{p}"),
            &format!("node-{}", p % 100),
            &format!("10.{}.{}.{}", 100 + p / 62500, (p / 250) % 250, p % 250 + 1),
        );
        o["metadata"]["labels"]["app"] = format!("app-{}", p % services).into();
        server.apply(o);
    }
    let started = std::time::Instant::now();
    let mut rx = watch_cluster(&server);
    let first = next(&mut rx, Duration::from_secs(120)).await;
    let listed = started.elapsed();
    assert_eq!(first.pods.len(), pods);
    let t = std::time::Instant::now();
    let resources = translate(&first, &MeshOptions::default()).resources;
    let translated = t.elapsed();
    assert_eq!(resources.addresses.len(), pods + services);

    let t = std::time::Instant::now();
    server.apply(pod("pod-0", "node-0", "10.250.0.1"));
    let changed = next(&mut rx, Duration::from_secs(30)).await;
    let one_change = t.elapsed();
    assert_eq!(changed.generation, 2);
    assert_eq!(changed.pods.len(), pods);
    println!(
        "{pods} pods, {services} services: first snapshot {listed:?} after start (list + parse + build), \
         translation {translated:?}; one pod modified -> snapshot {one_change:?} (debounce {:?})",
        pilot::cluster::DEBOUNCE
    );
}

/// An apply that fails is tried again with the next snapshot, and then succeeds.
#[tokio::test]
async fn failed_waypoint_applies_are_retried_on_the_next_snapshot() {
    let server = server_with(vec![gateway("reviews-wp", "istio-waypoint")]).await;
    server.set_apply_failing(true);
    let rx = watch_cluster(&server);
    tokio::spawn(pilot::provision::provision(
        server.client(),
        rx,
        pilot::provision::Options::default(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // kube does not retry a 500 itself: one request per object.
    while server.apply_requests() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "applies tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.applied().is_empty());
    server.set_apply_failing(false);
    server.apply(pod("ratings-1", "node1", "10.0.0.9"));
    let a = applied(&server, 3).await;
    assert_eq!(a.len(), 3);
    assert!(a.contains_key("/apis/apps/v1/namespaces/bookinfo/deployments/reviews-wp"));
}

/// The objects pilot applies for a waypoint pass `kubernetes-validate --strict` (the schemas of
/// the Kubernetes version tests/tests/deploy.rs validates `deploy/` against), when installed;
/// `REQUIRE_KUBERNETES_VALIDATE` (set by `cargo xtask test`) makes a missing tool a failure.
#[test]
fn waypoint_objects_pass_kubernetes_validate() {
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-m", "kubernetes_validate"]);
    let found = cmd
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("REQUIRE_KUBERNETES_VALIDATE").is_none(),
            "kubernetes-validate is required but not found"
        );
        eprintln!("skipping: kubernetes-validate not installed");
        return;
    }
    let mut gw = gateway("reviews-wp", "istio-waypoint");
    gw["metadata"]["uid"] = "6a1f3c1e-0000-4000-8000-000000000001".into();
    let origin = pilot::k8s::Origin {
        file: "test".into(),
        object: "Gateway bookinfo/reviews-wp".into(),
    };
    let Ok(Some((_, pilot::k8s::Object::Gateway(gw)))) =
        pilot::k8s::parse_object(serde_yaml_ng::to_value(&gw).unwrap(), origin)
    else {
        panic!("not a gateway")
    };
    let objects = pilot::provision::objects(&gw, &pilot::provision::Options::default())
        .unwrap()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("pilot-provision-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for o in &objects {
        let f = dir.join(format!("{}.yaml", o["kind"].as_str().unwrap()));
        std::fs::write(&f, serde_yaml_ng::to_string(o).unwrap()).unwrap();
        files.push(f);
    }
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.33.0"])
        .args(&files)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
        .count();
    assert!(out.status.success() && passed == 3, "{text}");
}

fn route(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": "bookinfo", "generation": 4,
                     "creationTimestamp": "2026-11-26T10:00:00Z"},
        "spec": spec,
    })
}

/// The status patches of `path` received so far, in order.
fn patches_of(server: &ApiServer, path: &str) -> Vec<Value> {
    server
        .status_patches()
        .into_iter()
        .filter(|(p, _)| p == path)
        .map(|(_, v)| v)
        .collect()
}

async fn until_patches(server: &ApiServer, path: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = patches_of(server, path);
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} status patches of {path} within 20 s; have {:?}",
            server.status_patches()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// HTTPRoutes and GRPCRoutes are watched (into the model as the folder's are), and pilot writes
/// their `status.parents` (Accepted / ResolvedRefs, its controller name, observedGeneration,
/// other controllers' entries kept) and the waypoint Gateway's status (Accepted, Programmed,
/// its Service's address) by merge patch of the status subresource; again only when it changes.
#[tokio::test]
async fn gateway_api_routes_are_watched_and_get_status() {
    let server = server_with(vec![
        gateway("waypoint", "istio-waypoint"),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "waypoint", "namespace": "bookinfo"},
               "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "mesh", "port": 15008}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "reviews", "namespace": "bookinfo",
                            "labels": {"istio.io/use-waypoint": "waypoint"}},
               "spec": {"clusterIP": "10.96.0.31", "selector": {"app": "reviews"},
                        "ports": [{"name": "http", "port": 9080}, {"name": "grpc", "port": 9090}]}}),
        route(
            "HTTPRoute",
            "reviews",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"},
                                  {"name": "ingress", "namespace": "elsewhere"}],
                   "rules": [{"backendRefs": [{"name": "reviews", "port": 9080, "weight": 9},
                                              {"name": "reviews-v2", "port": 9080, "weight": 1}]}]}),
        ),
        {
            let mut r = route(
                "GRPCRoute",
                "reviews-grpc",
                json!({"parentRefs": [{"name": "waypoint"}],
                       "rules": [{"matches": [{"method": {"service": "reviews.Reviews"}}],
                                  "backendRefs": [{"name": "reviews", "port": 9090}]}]}),
            );
            r["status"] = json!({"parents": [{"controllerName": "example.com/other",
                                              "parentRef": {"name": "x"}, "conditions": []}]});
            r
        },
    ])
    .await;
    let rx = watch_cluster(&server);
    let mut model = rx.clone();
    let snap = until(&mut model, |s| {
        s.http_routes.len() == 1 && s.grpc_routes.len() == 1
    })
    .await;
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    let http = &snap.http_routes[&("bookinfo".to_string(), "reviews".to_string())];
    assert_eq!(http.generation, 4);
    assert_eq!(http.created, "2026-11-26T10:00:00Z");

    tokio::spawn(pilot::route_status::write_status(
        server.client(),
        rx,
        "cluster.local".into(),
    ));
    let base = "/apis/gateway.networking.k8s.io/v1/namespaces/bookinfo";
    let http_path = format!("{base}/httproutes/reviews/status");
    let grpc_path = format!("{base}/grpcroutes/reviews-grpc/status");
    let gw_path = format!("{base}/gateways/waypoint/status");

    let h = until_patches(&server, &http_path, 1).await;
    let parents = h[0]["status"]["parents"].as_array().unwrap();
    assert_eq!(
        parents.len(),
        1,
        "the Gateway of another namespace is not ours: {parents:?}"
    );
    assert_eq!(parents[0]["controllerName"], "istio.io/gateway-controller");
    assert_eq!(
        parents[0]["parentRef"],
        json!({"group": "", "kind": "Service", "name": "reviews"})
    );
    let c = &parents[0]["conditions"];
    assert_eq!(c[0]["type"], "Accepted");
    assert_eq!(c[0]["status"], "True");
    assert_eq!(c[0]["observedGeneration"], 4);
    assert_eq!(c[1]["type"], "ResolvedRefs");
    assert_eq!(c[1]["status"], "False");
    assert_eq!(c[1]["reason"], "BackendNotFound");
    assert!(
        c[1]["message"]
            .as_str()
            .unwrap()
            .contains("backend Service bookinfo/reviews-v2 not found")
    );

    let g = until_patches(&server, &grpc_path, 1).await;
    let parents = g[0]["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2);
    assert_eq!(parents[0]["controllerName"], "example.com/other", "kept");
    assert_eq!(parents[1]["conditions"][0]["status"], "True");
    assert_eq!(parents[1]["conditions"][1]["status"], "True");

    let w = until_patches(&server, &gw_path, 1).await;
    let st = &w[0]["status"];
    assert_eq!(
        st["addresses"],
        json!([{"type": "IPAddress", "value": "10.96.0.30"}])
    );
    assert_eq!(st["conditions"][0]["type"], "Accepted");
    assert_eq!(st["conditions"][1]["type"], "Programmed");
    assert_eq!(st["conditions"][1]["status"], "True");
    assert_eq!(st["listeners"][0]["attachedRoutes"], 1);
    // The server holds what was written.
    let stored = server
        .objects()
        .into_iter()
        .find(|o| o["kind"] == "HTTPRoute")
        .unwrap();
    assert_eq!(stored["status"], h[0]["status"]);

    // The missing backend appears: ResolvedRefs turns True, with a new transition time only
    // there; nothing else is written again.
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews-v2", "namespace": "bookinfo"},
        "spec": {"clusterIP": "10.96.0.32", "ports": [{"name": "http", "port": 9080}]}}));
    let h = until_patches(&server, &http_path, 2).await;
    let c = &h[1]["status"]["parents"][0]["conditions"];
    assert_eq!(c[1]["status"], "True");
    assert_eq!(c[1]["reason"], "ResolvedRefs");
    assert_eq!(
        c[0]["lastTransitionTime"],
        h[0]["status"]["parents"][0]["conditions"][0]["lastTransitionTime"]
    );
    // An unrelated change writes nothing.
    server.apply(pod("reviews-1", "node1", "10.244.0.40"));
    let mut model = model.clone();
    until(&mut model, |s| !s.pods.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(patches_of(&server, &http_path).len(), 2);
    assert_eq!(patches_of(&server, &grpc_path).len(), 1);
    assert_eq!(patches_of(&server, &gw_path).len(), 1);
}

/// ReferenceGrants are watched: a route's backend in another namespace resolves only when a
/// grant there allows it, and the route's status says RefNotPermitted otherwise.
#[tokio::test]
async fn reference_grants_allow_cross_namespace_backends() {
    let service = |name: &str, ns: &str, ip: &str, labels: Value| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": ns, "labels": labels},
               "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 9080}]}})
    };
    let server = server_with(vec![
        gateway("waypoint", "istio-waypoint"),
        service(
            "reviews",
            "bookinfo",
            "10.96.0.31",
            json!({"istio.io/use-waypoint": "waypoint"}),
        ),
        service("ratings", "backend", "10.96.1.1", json!({})),
        service("details", "backend", "10.96.1.2", json!({})),
        json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
               "metadata": {"name": "bookinfo-routes", "namespace": "backend"},
               "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                  "namespace": "bookinfo"}],
                        "to": [{"group": "", "kind": "Service", "name": "ratings"}]}}),
        route(
            "HTTPRoute",
            "granted",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                   "rules": [{"matches": [{"path": {"value": "/ratings"}}],
                              "backendRefs": [{"name": "ratings", "namespace": "backend", "port": 9080}]}]}),
        ),
        route(
            "HTTPRoute",
            "refused",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                   "rules": [{"matches": [{"path": {"value": "/details"}}],
                              "backendRefs": [{"name": "details", "namespace": "backend", "port": 9080}]}]}),
        ),
    ])
    .await;
    let rx = watch_cluster(&server);
    let mut model = rx.clone();
    let snap = until(&mut model, |s| {
        s.reference_grants.len() == 1 && s.http_routes.len() == 2
    })
    .await;
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    tokio::spawn(pilot::route_status::write_status(
        server.client(),
        rx,
        "cluster.local".into(),
    ));
    let base = "/apis/gateway.networking.k8s.io/v1/namespaces/bookinfo/httproutes";
    let condition = |patches: &[Value]| patches[0]["status"]["parents"][0]["conditions"][1].clone();
    let granted = until_patches(&server, &format!("{base}/granted/status"), 1).await;
    assert_eq!(condition(&granted)["status"], "True", "{granted:?}");
    let refused = until_patches(&server, &format!("{base}/refused/status"), 1).await;
    let c = condition(&refused);
    assert_eq!(c["status"], "False", "{c}");
    assert_eq!(c["reason"], "RefNotPermitted", "{c}");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("no ReferenceGrant in namespace backend"),
        "{c}"
    );
}

/// Without the Gateway API route CRDs installed, pilot serves all the same.
#[tokio::test]
async fn route_crds_not_installed() {
    let server = server_with(bookinfo()).await;
    server.set_served("HTTPRoute", false);
    server.set_served("GRPCRoute", false);
    let mut rx = watch_cluster(&server);
    let snap = next(&mut rx, Duration::from_secs(10)).await;
    assert_eq!(snap.pods.len(), 8);
    assert!(snap.http_routes.is_empty() && snap.grpc_routes.is_empty());
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// The `istio-ca-root-cert` ConfigMap of `ns` as the server holds it.
fn root_configmap(server: &ApiServer, ns: &str) -> Option<Value> {
    server.objects().into_iter().find(|o| {
        o["kind"] == "ConfigMap"
            && o["metadata"]["name"] == "istio-ca-root-cert"
            && o["metadata"]["namespace"] == ns
    })
}

/// Wait (20 s at most) until `ns`'s root ConfigMap holds `root`.
async fn until_root_configmap(server: &ApiServer, ns: &str, root: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let cm = root_configmap(server, ns);
        if cm
            .as_ref()
            .is_some_and(|c| c["data"]["root-cert.pem"] == root)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "istio-ca-root-cert in {ns} holds the root within 20 s; it is {cm:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every namespace but the system ones gets `istio-ca-root-cert` with pilot's root (server-side
/// applied, forced, Istio's label), a wrong one is corrected, and it stays current: recreated when
/// deleted, restored when edited, published in a new namespace; once settled nothing is applied.
#[tokio::test]
async fn the_root_configmap_is_in_every_namespace_and_kept_current() {
    let ca = mesh::ca::DevCa::generate("cluster.local").unwrap();
    let (roots_tx, roots) =
        tokio::sync::watch::channel(std::sync::Arc::new(pilot::roots::Roots::single(ca)));
    let root = roots.borrow().bundle_pem().to_string();
    let root = root.as_str();
    let configmap = |ns: &str, name: &str, pem: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": ns},
               "data": {"root-cert.pem": pem}})
    };
    let server = server_with(vec![
        namespace("bookinfo"),
        namespace("shop"),
        namespace("kube-system"),
        // Another ConfigMap is not pilot's business, whatever it holds.
        configmap("shop", "other", "x"),
        // One holding something else from before is corrected.
        configmap("shop", "istio-ca-root-cert", "stale"),
    ])
    .await;
    let rx = watch_cluster(&server);
    tokio::spawn(pilot::root_configmap::publish(server.client(), rx, roots));
    until_root_configmap(&server, "bookinfo", root).await;
    until_root_configmap(&server, "shop", root).await;
    let applied = server.applied();
    let bookinfo = &applied["/api/v1/namespaces/bookinfo/configmaps/istio-ca-root-cert"];
    assert_eq!(bookinfo.field_manager, "pilot");
    assert!(bookinfo.force);
    assert_eq!(
        bookinfo.object["metadata"]["labels"]["istio.io/config"],
        "true"
    );
    assert!(root_configmap(&server, "kube-system").is_none());
    let other = server
        .objects()
        .into_iter()
        .find(|o| o["metadata"]["name"] == "other")
        .unwrap();
    assert_eq!(other["data"]["root-cert.pem"], "x");

    // Settled: the watch echoing pilot's own applies starts nothing new.
    let settled = server.apply_requests();
    assert_eq!(settled, 2, "one apply per namespace: {:?}", applied.keys());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.apply_requests(), settled);

    server.delete("v1", "ConfigMap", "bookinfo", "istio-ca-root-cert");
    until_root_configmap(&server, "bookinfo", root).await;
    server.apply(configmap("shop", "istio-ca-root-cert", "edited"));
    until_root_configmap(&server, "shop", root).await;
    server.apply(namespace("new"));
    until_root_configmap(&server, "new", root).await;
    // A rotation's bundle (the new root and the old one) reaches every ConfigMap.
    let rotated = pilot::roots::Roots::new(
        mesh::ca::DevCa::generate("cluster.local").unwrap(),
        root,
        "test",
    )
    .unwrap();
    assert_eq!(rotated.count(), 2);
    let bundle = rotated.bundle_pem().to_string();
    roots_tx.send_replace(std::sync::Arc::new(rotated));
    for ns in ["bookinfo", "shop", "new"] {
        until_root_configmap(&server, ns, &bundle).await;
    }
    assert!(root_configmap(&server, "kube-system").is_none());
}
