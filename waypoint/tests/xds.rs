//! The waypoint's xDS client against a delta ADS server over TLS (a stand-in for pilot): the
//! node id and subscriptions it sends, the config it builds from Envoy resources, ACKs, and a
//! NACK that keeps the previous version.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as envoy_core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::google::protobuf::Any;
use futures_util::Stream;
use mesh::ca::DevCa;
use mesh::control::ControlPlane;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use waypoint::config::{Config, ListenerKind, Routes};
use waypoint::xds::{Status as XdsStatus, XdsHandler, types};

type Pinned<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Hands each delta stream's requests to the test and sends what the test queues.
struct Ads {
    requests: mpsc::Sender<(Option<String>, DeltaDiscoveryRequest)>,
    responses: Mutex<Option<mpsc::Receiver<DeltaDiscoveryResponse>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Pinned<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Pinned<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut inbound = request.into_inner();
        let tx = self.requests.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if tx.send((auth.clone(), r)).await.is_err() {
                    break;
                }
            }
        });
        let rx = self
            .responses
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| Status::unavailable("one stream per test"))?;
        let stream = futures_util::StreamExt::map(ReceiverStream::new(rx), Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn resource(name: &str, version: &str, type_url: &str, m: &impl Message) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(Any {
            type_url: type_url.into(),
            value: m.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn response(type_url: &str, nonce: &str, resources: Vec<Resource>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        ..Default::default()
    }
}

fn socket(ip: &str, port: u32) -> envoy_core::Address {
    envoy_core::Address {
        address: Some(envoy_core::address::Address::SocketAddress(
            envoy_core::SocketAddress {
                address: ip.into(),
                port_specifier: Some(envoy_core::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            },
        )),
    }
}

const NAME: &str = "inbound-vip|80|http|echo.app.svc.cluster.local";
const CLUSTER: &str = "inbound-vip|80|http|echo.app.svc.cluster.local";

fn listener() -> listener_pb::Listener {
    let h = hcm::HttpConnectionManager {
        stat_prefix: NAME.into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: NAME.into(),
                config_source: None,
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener_pb::Listener {
        name: NAME.into(),
        address: Some(socket("10.96.0.10", 80)),
        additional_addresses: vec![listener_pb::AdditionalAddress {
            address: Some(socket("fd00::10", 80)),
            ..Default::default()
        }],
        filter_chains: vec![listener_pb::FilterChain {
            filters: vec![listener_pb::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener_pb::filter::ConfigType::TypedConfig(Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into(),
                    value: h.encode_to_vec(),
                })),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_config(regex: &str) -> route_pb::RouteConfiguration {
    route_pb::RouteConfiguration {
        name: NAME.into(),
        virtual_hosts: vec![route_pb::VirtualHost {
            name: "inbound|http|80".into(),
            domains: vec!["*".into()],
            routes: vec![route_pb::Route {
                name: "by-regex".into(),
                r#match: Some(route_pb::RouteMatch {
                    path_specifier: Some(route_pb::route_match::PathSpecifier::SafeRegex(
                        RegexMatcher {
                            regex: regex.into(),
                            engine_type: None,
                        },
                    )),
                    ..Default::default()
                }),
                action: Some(route_pb::route::Action::Route(route_pb::RouteAction {
                    cluster_specifier: Some(route_pb::route_action::ClusterSpecifier::Cluster(
                        CLUSTER.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn subscribes_applies_acks_and_nacks() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let (cert, key) = ca
        .issue_server_pem(&["pilot.test".to_string()], Duration::from_secs(3600))
        .unwrap();
    let (req_tx, mut req_rx) = mpsc::channel(32);
    let (rsp_tx, rsp_rx) = mpsc::channel(32);
    let ads = Ads {
        requests: req_tx,
        responses: Mutex::new(Some(rsp_rx)),
    };
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(ads))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(tcp)),
    );

    let dir = std::env::temp_dir().join(format!("waypoint-xds-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "waypoint-token\n").unwrap();
    let control = ControlPlane {
        address: format!("https://{addr}"),
        root_pem: ca.root_pem().to_string(),
        root_file: None,
        server_name: "pilot.test".into(),
        token_file: dir.join("token"),
    };
    let node_id = "router~10.244.1.5~waypoint-abc.app~app.svc.cluster.local".to_string();
    let (config_tx, config_rx) = watch::channel(Arc::new(Config::default()));
    let status = Arc::new(XdsStatus::default());
    tokio::spawn(mesh::xds::run(
        control,
        mesh::xds::ClientState::new(node_id.clone(), types()),
        Box::new(XdsHandler::new(config_tx, status.clone())),
    ));

    let next = async |rx: &mut mpsc::Receiver<(Option<String>, DeltaDiscoveryRequest)>| {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
    };
    // Five wildcard subscriptions, the node on the first, the token as a bearer.
    let mut subscribed = Vec::new();
    for i in 0..5 {
        let (auth, r) = next(&mut req_rx).await;
        assert_eq!(auth.as_deref(), Some("Bearer waypoint-token"));
        if i == 0 {
            assert_eq!(r.node.as_ref().unwrap().id, node_id);
        }
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        subscribed.push(r.type_url);
    }
    assert_eq!(subscribed, types());

    let [address_t, cluster_t, endpoint_t, listener_t, route_t] = &types()[..] else {
        panic!()
    };
    let cluster = cluster_pb::Cluster {
        name: CLUSTER.into(),
        cluster_discovery_type: Some(cluster_pb::cluster::ClusterDiscoveryType::Type(
            cluster_pb::cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    };
    let cla = endpoint_pb::ClusterLoadAssignment {
        cluster_name: CLUSTER.into(),
        endpoints: vec![endpoint_pb::LocalityLbEndpoints {
            lb_endpoints: vec![endpoint_pb::LbEndpoint {
                host_identifier: Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint_pb::Endpoint {
                        address: Some(socket("10.244.2.7", 8080)),
                        ..Default::default()
                    },
                )),
                health_status: envoy_core::HealthStatus::Healthy as i32,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let pushes = [
        response(address_t, "n1", vec![]),
        response(
            cluster_t,
            "n2",
            vec![resource(CLUSTER, "v1", cluster_t, &cluster)],
        ),
        response(
            endpoint_t,
            "n3",
            vec![resource(CLUSTER, "v1", endpoint_t, &cla)],
        ),
        response(
            listener_t,
            "n4",
            vec![resource(NAME, "v1", listener_t, &listener())],
        ),
        response(
            route_t,
            "n5",
            vec![resource(NAME, "v1", route_t, &route_config("/api/.*"))],
        ),
    ];
    for p in pushes {
        let nonce = p.nonce.clone();
        rsp_tx.send(p).await.unwrap();
        let (_, ack) = next(&mut req_rx).await;
        assert_eq!(ack.response_nonce, nonce);
        assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    }
    assert!(status.ready.load(Ordering::Acquire));
    {
        let config = config_rx.borrow();
        for vip in ["10.96.0.10:80", "[fd00::10]:80"] {
            let l = config.listener(vip.parse().unwrap()).expect(vip);
            assert!(
                matches!(&l.kind, ListenerKind::Http { routes: Routes::Rds(n), .. } if n == NAME)
            );
        }
        assert_eq!(
            config.clusters[CLUSTER].endpoints[0].address.to_string(),
            "10.244.2.7:8080"
        );
        assert_eq!(
            config.routes[NAME].virtual_hosts[0].routes[0].name,
            "by-regex"
        );
        assert_eq!(config.resources.routes[NAME].version, "v1");
    }

    // An invalid regex is NACKed by name; the previous route configuration stays.
    rsp_tx
        .send(response(
            route_t,
            "n6",
            vec![resource(NAME, "v2", route_t, &route_config("(unclosed"))],
        ))
        .await
        .unwrap();
    let (_, nack) = next(&mut req_rx).await;
    assert_eq!(nack.response_nonce, "n6");
    let detail = nack.error_detail.expect("NACK");
    assert!(
        detail.message.contains(NAME) && detail.message.contains("bad regex"),
        "{}",
        detail.message
    );
    assert_eq!(config_rx.borrow().resources.routes[NAME].version, "v1");
    std::fs::remove_dir_all(dir).unwrap();
}
