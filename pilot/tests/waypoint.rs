//! pilot serving a waypoint over the wire: a real tonic client on TLS with the waypoint's own token and node id gets its Envoy resources, make before break, and follows changes.

mod ads;
mod waypoint_env;

use std::collections::HashMap;
use std::time::Duration;

use ads::{Stream, create, names};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use mesh::identity::Identity;
use mesh::proto::ADDRESS_TYPE_URL;
use pilot::waypoint::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};
use prost::Message;
use waypoint_env::*;

fn route_prefixes(
    r: &envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
) -> Vec<String> {
    let rc = RouteConfiguration::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice())
        .unwrap();
    rc.virtual_hosts[0]
        .routes
        .iter()
        .map(|r| format!("{:?}", r.r#match.as_ref().unwrap().path_specifier))
        .collect()
}

#[tokio::test]
async fn waypoint_gets_its_envoy_resources_make_before_break() {
    let env = Env::start().await;
    let token = env.waypoint_token();
    let meta = std::fs::metadata(&token).expect("pilot wrote the waypoint's token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let cp = env.control(token);
    let mut s = Stream::open_as(&cp, NODE_ID, &subscriptions())
        .await
        .unwrap();

    // The first responses, in the order subscribed: clusters, endpoints, listeners, routes.
    let clusters = s.next().await;
    assert_eq!(clusters.type_url, CLUSTER_TYPE_URL);
    assert_eq!(names(&clusters), [HTTP_V1, HTTP_V2, HTTP]);
    let endpoints = s.next().await;
    assert_eq!(endpoints.type_url, ENDPOINT_TYPE_URL);
    assert_eq!(names(&endpoints), [HTTP_V1, HTTP_V2, HTTP]);
    let listeners = s.next().await;
    assert_eq!(listeners.type_url, LISTENER_TYPE_URL);
    assert_eq!(names(&listeners), [HTTP]);
    let routes = s.next().await;
    assert_eq!(routes.type_url, ROUTE_TYPE_URL);
    assert_eq!(names(&routes), [HTTP]);
    assert_eq!(route_prefixes(&routes)[0], "Some(Prefix(\"/v1\"))");
    let addresses = s.next().await;
    assert_eq!(addresses.type_url, ADDRESS_TYPE_URL);
    assert_eq!(addresses.resources.len(), 3, "two pods and the service");
    for r in [&clusters, &endpoints, &listeners, &routes, &addresses] {
        s.ack(r).await;
    }

    // A VirtualService change: only the RouteConfiguration changes.
    write(
        &env.dir,
        "routing.yaml",
        &routing("/fast", "v1", &["v1", "v2"]),
    );
    let update = s.next().await;
    assert_eq!(update.type_url, ROUTE_TYPE_URL);
    assert_eq!(names(&update), [HTTP]);
    assert_eq!(route_prefixes(&update)[0], "Some(Prefix(\"/fast\"))");
    // Rejected: pilot keeps serving, and does not resend it.
    s.reply(&update, Some("route rejected by the test")).await;
    write(
        &env.dir,
        "pod2.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-2, namespace: shop, uid: uid-web-2, labels: {app: web, version: v2}}\nspec: {nodeName: node1, serviceAccountName: web}\nstatus: {podIP: 10.244.1.6}\n",
    );
    let eps = s.next().await;
    assert_eq!(eps.type_url, ENDPOINT_TYPE_URL);
    assert_eq!(names(&eps), [HTTP_V2, HTTP]);
    s.ack(&eps).await;
    let addr = s.next().await;
    assert_eq!(addr.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&addr), ["uid-web-2"]);
    s.ack(&addr).await;
    let report = env.pilot.registry.report();
    let routes_report = report[0]
        .types
        .iter()
        .find(|t| t.type_url == ROUTE_TYPE_URL)
        .unwrap();
    assert_eq!(routes_report.nacks, 1);
    assert_eq!(
        routes_report.sent[HTTP], routes.resources[0].version,
        "the previous version stays in force"
    );

    // The service leaves the waypoint: its address changes first, then the Envoy resources go,
    // routes first and clusters last.
    write(&env.dir, "svc.yaml", &web_service(false));
    let mut order = vec![];
    for _ in 0..5 {
        let r = s.next().await;
        order.push((
            r.type_url.rsplit('.').next().unwrap().to_string(),
            r.resources.len(),
            r.removed_resources.len(),
        ));
        s.ack(&r).await;
    }
    assert_eq!(
        order,
        [
            ("Address".to_string(), 1, 0),
            ("RouteConfiguration".to_string(), 0, 1),
            ("Listener".to_string(), 0, 1),
            ("ClusterLoadAssignment".to_string(), 0, 3),
            ("Cluster".to_string(), 0, 3),
        ]
    );
    s.nothing_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn updates_come_before_removals() {
    let env = Env::start().await;
    let cp = env.control(env.waypoint_token());
    let mut s = Stream::open_as(&cp, NODE_ID, &subscriptions()[..4])
        .await
        .unwrap();
    for _ in 0..4 {
        let r = s.next().await;
        s.ack(&r).await;
    }
    // The DestinationRule loses subset v2 and the route moves to v1 with a new prefix: the
    // route update goes out before the v2 cluster and endpoints are removed.
    write(&env.dir, "routing.yaml", &routing("/moved", "v1", &["v1"]));
    let mut seen = vec![];
    while seen.len() < 3 {
        let r = s.next().await;
        seen.push((
            r.type_url.rsplit('.').next().unwrap().to_string(),
            names(&r).iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            r.removed_resources.clone(),
        ));
        s.ack(&r).await;
    }
    assert_eq!(
        seen,
        [
            (
                "RouteConfiguration".to_string(),
                vec![HTTP.to_string()],
                vec![]
            ),
            (
                "ClusterLoadAssignment".to_string(),
                vec![],
                vec![HTTP_V2.to_string()]
            ),
            ("Cluster".to_string(), vec![], vec![HTTP_V2.to_string()]),
        ]
    );
}

#[tokio::test]
async fn only_the_waypoint_gets_envoy_resources_and_its_own_certificate() {
    let env = Env::start().await;
    // A node agent asking for Envoy types without a waypoint node id: nothing.
    let node = env.control(env.dir.join("state/tokens/node1.token"));
    let mut s = Stream::open_as(&node, "node1", &[(CLUSTER_TYPE_URL, HashMap::new())])
        .await
        .unwrap();
    let r = s.next().await;
    assert!(r.resources.is_empty());
    // Another workload claiming the waypoint's node id: nothing either.
    env.pilot.auth.local().unwrap().insert(
        "web-token".into(),
        pilot::auth::Caller::Workload {
            identity: Identity::new("cluster.local", "shop", "web"),
        },
    );
    let web_token = env.dir.join("web.token");
    std::fs::write(&web_token, "web-token").unwrap();
    let mut s = Stream::open_as(
        &env.control(web_token),
        NODE_ID,
        &[(CLUSTER_TYPE_URL, HashMap::new())],
    )
    .await
    .unwrap();
    assert!(s.next().await.resources.is_empty());

    // The waypoint's token: a certificate for its own identity, no impersonation.
    let cp = env.control(env.waypoint_token());
    let own = Identity::new("cluster.local", "shop", "waypoint");
    let (csr, _) = mesh::ca_client::csr(&own).unwrap();
    let chain = create(&cp, csr.clone(), None).await.unwrap();
    assert_eq!(chain.len(), 2);
    let err = create(&cp, csr, Some(&own.to_string())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let other = Identity::new("cluster.local", "shop", "web");
    let (csr, _) = mesh::ca_client::csr(&other).unwrap();
    let err = create(&cp, csr, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}
