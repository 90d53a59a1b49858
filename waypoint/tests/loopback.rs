//! The waypoint end to end on loopback with real TLS: a client sends HTTP/1.1 and HTTP/2 (and
//! TCP) through an HBONE CONNECT to a service VIP; the waypoint routes by its Envoy
//! configuration and originates HBONE to two "pods" (HBONE servers in front of an echo app that
//! answers with what it received).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh::ca::DevCa;
use mesh::certs::{BoxFuture, CertCache, CertSource};
use mesh::hbone::io::H2Io;
use mesh::hbone::server::{self, Handler, InboundStream, Options};
use mesh::hbone::{ConnectRequest, client};
use mesh::identity::Identity;
use mesh::state::{Service, ServicePort, State, Workload};
use mesh::tls::WorkloadCert;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use waypoint::config::{self, Cluster, Config};
use waypoint::route;

const TD: &str = "cluster.local";
const HOST: &str = "echo.app.svc.cluster.local";
const HTTP_LISTENER: &str = "inbound-vip|80|http|echo.app.svc.cluster.local";
const V1: &str = "inbound-vip|80|http/v1|echo.app.svc.cluster.local";
const V2: &str = "inbound-vip|80|http/v2|echo.app.svc.cluster.local";
const TCP: &str = "inbound-vip|9000|tcp|echo.app.svc.cluster.local";

/// Addresses of one test run: 127.<a>.<b>.x, random so that parallel runs do not collide.
struct Net {
    base: [u8; 3],
}

impl Net {
    fn new() -> Net {
        Net {
            base: [127, fastrand::u8(100..200), fastrand::u8(1..250)],
        }
    }
    fn ip(&self, last: u8) -> IpAddr {
        IpAddr::from([self.base[0], self.base[1], self.base[2], last])
    }
    fn vip(&self, last: u8) -> IpAddr {
        IpAddr::from([10, 96, self.base[2], last])
    }
}

// ---- the destination "pods": HBONE in front of an echo app ------------------------------

struct Pod {
    name: &'static str,
    /// Numbers the CONNECT streams (each one upstream HTTP connection of the waypoint).
    streams: std::sync::atomic::AtomicU64,
    /// TLS (certificate for `tls.example` from the test CA) served on port `TLS_PORT`.
    tls: Arc<rustls::ServerConfig>,
}

/// The pods' port that speaks TLS (inside the CONNECT stream), then HTTP.
const TLS_PORT: u16 = 8443;

impl Handler for Pod {
    async fn handle(&self, stream: InboundStream) {
        let connect_authority = stream.request.authority;
        let conn = self
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let io = match stream.accept(None) {
            Ok(s) => H2Io::new(s),
            Err(_) => return,
        };
        if connect_authority.port() == 9000 {
            // TCP echo, prefixed with the pod's name.
            let (mut r, mut w) = tokio::io::split(io);
            let _ = w.write_all(format!("{}:", self.name).as_bytes()).await;
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
            return;
        }
        let name = self.name;
        let service = service_fn(move |req: Request<Incoming>| async move {
            Ok::<_, Infallible>(echo(name, connect_authority, conn, req).await)
        });
        let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if connect_authority.port() == TLS_PORT {
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(self.tls.clone())
                .accept(io)
                .await
            else {
                return;
            };
            let _ = server
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
            return;
        }
        let _ = server
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await;
    }
}

async fn echo(
    name: &str,
    connect: SocketAddr,
    conn: u64,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.headers().contains_key("upgrade") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    if path.contains("slow") {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let version = format!("{:?}", req.version());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .map(|h| h.to_str().unwrap().to_string())
        })
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let answer = serde_json::json!({
        "name": name,
        "connect": connect.to_string(),
        "conn": conn,
        "path": path,
        "version": version,
        "authority": authority,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-echo", name)
        .body(Full::new(Bytes::from(answer.to_string())))
        .unwrap()
}

// ---- the configuration pilot would send, built here ---------------------------------------

fn socket(ip: IpAddr, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn typed(type_url: &str, m: &impl Message) -> Option<listener_pb::filter::ConfigType> {
    Some(listener_pb::filter::ConfigType::TypedConfig(Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }))
}

fn listener(
    name: &str,
    vip: IpAddr,
    port: u32,
    filter: listener_pb::Filter,
) -> listener_pb::Listener {
    listener_pb::Listener {
        name: name.into(),
        address: Some(socket(vip, port)),
        filter_chains: vec![listener_pb::FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn http_listener(vip: IpAddr) -> listener_pb::Listener {
    let h = hcm::HttpConnectionManager {
        stat_prefix: HTTP_LISTENER.into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: HTTP_LISTENER.into(),
                config_source: None,
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener(
        HTTP_LISTENER,
        vip,
        80,
        listener_pb::Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: typed(
                "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                &h,
            ),
        },
    )
}

fn tcp_listener(vip: IpAddr) -> listener_pb::Listener {
    let t = tcp_proxy::TcpProxy {
        stat_prefix: TCP.into(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(TCP.into())),
        ..Default::default()
    };
    listener(
        TCP,
        vip,
        9000,
        listener_pb::Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: typed(
                "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                &t,
            ),
        },
    )
}

fn prefix(p: &str) -> route_pb::RouteMatch {
    route_pb::RouteMatch {
        path_specifier: Some(route_pb::route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}

fn to(cluster: &str) -> route_pb::RouteAction {
    route_pb::RouteAction {
        cluster_specifier: Some(route_pb::route_action::ClusterSpecifier::Cluster(
            cluster.into(),
        )),
        ..Default::default()
    }
}

fn add_header(k: &str, v: &str) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn routes() -> route_pb::RouteConfiguration {
    use route_pb::route::Action;
    let r = |name: &str, m: route_pb::RouteMatch, action: Action| route_pb::Route {
        name: name.into(),
        r#match: Some(m),
        action: Some(action),
        ..Default::default()
    };
    let jason = route_pb::Route {
        response_headers_to_add: vec![add_header("x-route", "v2")],
        ..r(
            "jason-to-v2",
            route_pb::RouteMatch {
                headers: vec![route_pb::HeaderMatcher {
                    name: "end-user".into(),
                    header_match_specifier: Some(
                        route_pb::header_matcher::HeaderMatchSpecifier::StringMatch(
                            matcher::StringMatcher {
                                match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                                    "jason".into(),
                                )),
                                ignore_case: false,
                            },
                        ),
                    ),
                    ..Default::default()
                }],
                ..prefix("/")
            },
            Action::Route(to(V2)),
        )
    };
    let rewrite = route_pb::Route {
        request_headers_to_add: vec![add_header("x-added", "yes")],
        ..r(
            "rewrite",
            prefix("/old"),
            Action::Route(route_pb::RouteAction {
                prefix_rewrite: "/new".into(),
                host_rewrite_specifier: Some(
                    route_pb::route_action::HostRewriteSpecifier::HostRewriteLiteral(
                        "rewritten.example".into(),
                    ),
                ),
                ..to(V1)
            }),
        )
    };
    let direct = r(
        "direct",
        route_pb::RouteMatch {
            path_specifier: Some(route_pb::route_match::PathSpecifier::Path("/teapot".into())),
            ..Default::default()
        },
        Action::DirectResponse(route_pb::DirectResponseAction {
            status: 418,
            body: Some(core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(
                    "short and stout".into(),
                )),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let redirect = r(
        "redirect",
        prefix("/redirect"),
        Action::Redirect(route_pb::RedirectAction {
            host_redirect: "example.org".into(),
            path_rewrite_specifier: Some(
                route_pb::redirect_action::PathRewriteSpecifier::PathRedirect("/elsewhere".into()),
            ),
            ..Default::default()
        }),
    );
    let source_labels = r(
        "from-version-v2",
        route_pb::RouteMatch {
            dynamic_metadata: vec![matcher::MetadataMatcher {
                filter: "istio.source".into(),
                path: ["labels", "version"]
                    .iter()
                    .map(|k| matcher::metadata_matcher::PathSegment {
                        segment: Some(matcher::metadata_matcher::path_segment::Segment::Key(
                            k.to_string(),
                        )),
                    })
                    .collect(),
                value: Some(matcher::ValueMatcher {
                    match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(
                        matcher::StringMatcher {
                            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                                "v2".into(),
                            )),
                            ignore_case: false,
                        },
                    )),
                }),
                invert: false,
            }],
            ..prefix("/labels")
        },
        Action::Route(to(V2)),
    );
    let split = r(
        "split",
        prefix("/split"),
        Action::Route(route_pb::RouteAction {
            cluster_specifier: Some(route_pb::route_action::ClusterSpecifier::WeightedClusters(
                route_pb::WeightedCluster {
                    clusters: [V1, V2]
                        .iter()
                        .map(|c| route_pb::weighted_cluster::ClusterWeight {
                            name: c.to_string(),
                            weight: Some(UInt32Value { value: 50 }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    );
    route_pb::RouteConfiguration {
        name: HTTP_LISTENER.into(),
        virtual_hosts: vec![route_pb::VirtualHost {
            name: "inbound|http|80".into(),
            domains: vec!["*".into()],
            routes: vec![
                jason,
                rewrite,
                direct,
                redirect,
                source_labels,
                split,
                r("down", prefix("/down"), Action::Route(to("down"))),
                r("broken", prefix("/broken"), Action::Route(to("broken"))),
                r(
                    "timeout",
                    prefix("/timeout"),
                    Action::Route(route_pb::RouteAction {
                        timeout: Some(envoy_types::pb::google::protobuf::Duration {
                            seconds: 0,
                            nanos: 100_000_000,
                        }),
                        ..to(V1)
                    }),
                ),
                r("api", prefix("/api"), Action::Route(to(V1))),
                r("ws", prefix("/ws"), Action::Route(to(V1))),
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn eds(
    name: &str,
    endpoints: &[(IpAddr, u32, bool)],
) -> (cluster_pb::Cluster, endpoint_pb::ClusterLoadAssignment) {
    // The client's HTTP version upstream (Envoy's use_downstream_protocol_config).
    use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
    let options = http_options::HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_options::http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                http_options::http_protocol_options::UseDownstreamHttpConfig {
                    http2_protocol_options: Some(Default::default()),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    };
    let c = cluster_pb::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster_pb::cluster::ClusterDiscoveryType::Type(
            cluster_pb::cluster::DiscoveryType::Eds as i32,
        )),
        typed_extension_protocol_options: [(
            config::HTTP_PROTOCOL_OPTIONS.to_string(),
            Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                        .into(),
                value: options.encode_to_vec(),
            },
        )]
        .into(),
        ..Default::default()
    };
    let la = endpoint_pb::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![endpoint_pb::LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|(ip, port, healthy)| endpoint_pb::LbEndpoint {
                    health_status: if *healthy {
                        core::HealthStatus::Healthy
                    } else {
                        core::HealthStatus::Unhealthy
                    } as i32,
                    host_identifier: Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint_pb::Endpoint {
                            address: Some(socket(*ip, *port)),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    (c, la)
}

fn workload(name: &str, ns: &str, sa: &str, ip: IpAddr, labels: &[(&str, &str)]) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        addresses: vec![ip],
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// The waypoint's Config, converted from the Envoy resources by the same functions xDS uses.
fn build_config(net: &Net) -> Config {
    let mut listeners = BTreeMap::new();
    for l in [http_listener(net.vip(10)), tcp_listener(net.vip(10))] {
        let (_, conv) = config::listener(&l.encode_to_vec(), &l.name).unwrap();
        listeners.insert(l.name.clone(), Arc::new(conv));
    }
    let rc = routes();
    let routes = [(rc.name.clone(), Arc::new(route::compile(&rc).unwrap()))].into();
    let mut clusters = BTreeMap::new();
    for (name, eps) in [
        (V1, vec![(net.ip(2), 8080, true)]),
        (V2, vec![(net.ip(3), 8080, true)]),
        (TCP, vec![(net.ip(2), 9000, true), (net.ip(3), 9000, true)]),
        ("down", vec![(net.ip(2), 8080, false)]),
        ("broken", vec![(net.ip(4), 8080, true)]),
    ] {
        let (c, la) = eds(name, &eps);
        let (_, def) = config::cluster(&c.encode_to_vec(), name).unwrap();
        let (_, endpoints) = config::load_assignment(&la.encode_to_vec(), name).unwrap();
        clusters.insert(
            name.to_string(),
            Arc::new(
                Cluster::new(name.into(), def.connect_timeout, endpoints)
                    .with_protocol(def.protocol),
            ),
        );
    }
    let state = State::new(
        vec![
            workload("echo-v1", "app", "echo-v1", net.ip(2), &[]),
            workload("echo-v2", "app", "echo-v2", net.ip(3), &[]),
            // Known to the mesh, but nothing listens there.
            workload("echo-gone", "app", "echo-gone", net.ip(4), &[]),
            workload("sleep", "test", "sleep", net.ip(9), &[("version", "v2")]),
        ],
        vec![Service {
            name: "echo".into(),
            namespace: "app".into(),
            hostname: HOST.into(),
            addresses: vec![net.vip(10)],
            ports: vec![ServicePort {
                service_port: 80,
                target_port: 8080,
                app_protocol: Default::default(),
            }],
            ..Default::default()
        }],
        vec![],
    )
    .unwrap();
    Config::new(listeners, routes, clusters, Arc::new(state))
}

// ---- the test bed --------------------------------------------------------------------------

struct Bed {
    net: Net,
    ca: Arc<DevCa>,
    waypoint_addr: SocketAddr,
    /// The pods' HBONE port.
    hbone_port: u16,
    waypoint_id: Identity,
    waypoint: Arc<waypoint::Waypoint>,
    registry: Registry,
    /// Publishes new configurations, as the xDS client does.
    config: watch::Sender<Arc<Config>>,
    _drain: mesh::drain::Trigger,
}

async fn bind_pair(net: &Net) -> (TcpListener, TcpListener) {
    // Both pods listen on the same port (the waypoint dials <pod ip>:<hbone port>).
    for _ in 0..20 {
        let a = TcpListener::bind(SocketAddr::new(net.ip(2), 0))
            .await
            .unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(SocketAddr::new(net.ip(3), port)).await {
            return (a, b);
        }
    }
    panic!("no common free port for the two pods");
}

async fn start() -> Bed {
    start_with(Duration::from_secs(5)).await
}

/// `idle`: how long the waypoint keeps an unused upstream HTTP connection.
async fn start_with(idle: Duration) -> Bed {
    let net = Net::new();
    let ca = Arc::new(DevCa::generate(TD).unwrap());
    let (trigger, drain) = mesh::drain::channel();
    let (a, b) = bind_pair(&net).await;
    let hbone_port = a.local_addr().unwrap().port();
    for (listener, name, sa) in [(a, "echo-v1", "echo-v1"), (b, "echo-v2", "echo-v2")] {
        let cert = ca
            .issue(&Identity::new(TD, "app", sa), Duration::from_secs(3600))
            .unwrap();
        let tls = cert.server_config();
        let handler = Arc::new(Pod {
            name,
            streams: Default::default(),
            tls: pod_tls(&ca),
        });
        let drain = drain.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let options = Options {
                    require_local_authority: true,
                };
                tokio::spawn(server::serve(
                    tcp,
                    tls.clone(),
                    options,
                    handler.clone(),
                    drain.clone(),
                ));
            }
        });
    }

    let waypoint_id = Identity::new(TD, "app", "waypoint");
    let certs = CertCache::new(Arc::new(SharedCa(ca.clone())));
    let (config_tx, rx) = watch::channel(Arc::new(build_config(&net)));
    let metrics = waypoint::metrics::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let wp = Arc::new(waypoint::Waypoint {
        config: rx,
        upstream: waypoint::upstream::Upstream::with_options(
            waypoint_id.clone(),
            certs.clone(),
            hbone_port,
            idle,
        ),
        metrics,
        retry_buffer_bytes: waypoint::retry::DEFAULT_BUFFER_LIMIT,
    });
    let listener = TcpListener::bind(SocketAddr::new(net.ip(1), 0))
        .await
        .unwrap();
    let waypoint_addr = listener.local_addr().unwrap();
    tokio::spawn(waypoint::inbound::serve(
        listener,
        wp.clone(),
        certs,
        waypoint_id.clone(),
        drain,
    ));
    Bed {
        net,
        ca,
        waypoint_addr,
        hbone_port,
        waypoint_id,
        waypoint: wp,
        registry,
        config: config_tx,
        _drain: trigger,
    }
}

fn pod_tls(ca: &DevCa) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let (cert, key) = ca
        .issue_server_pem(&["tls.example".into()], Duration::from_secs(3600))
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(mesh::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The test CA, shared by the pods, the client and the waypoint's certificate cache.
struct SharedCa(Arc<DevCa>);

impl CertSource for SharedCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, String>> {
        Box::pin(async move {
            self.0
                .issue(id, Duration::from_secs(3600))
                .map_err(|e| e.to_string())
        })
    }
}

impl Bed {
    /// An HBONE connection to the waypoint as the `sleep` pod's ztunnel would open it.
    async fn hbone(&self) -> client::Connection {
        let cert = self
            .ca
            .issue(
                &Identity::new(TD, "test", "sleep"),
                Duration::from_secs(3600),
            )
            .unwrap();
        let tls = cert.client_config(vec![self.waypoint_id.clone()]).unwrap();
        let tcp = tokio::net::TcpStream::connect(self.waypoint_addr)
            .await
            .unwrap();
        client::handshake(tcp, tls, self.waypoint_addr)
            .await
            .unwrap()
    }

    fn connect_request(&self, port: u16) -> ConnectRequest {
        let mut req = ConnectRequest::new(SocketAddr::new(self.net.vip(10), port));
        req.forwarded_for = Some(SocketAddr::new(self.net.ip(9), 40000));
        req
    }

    /// An HTTP/1.1 client connection inside a tunnel to the service's port 80.
    async fn http1(&self) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let conn = self.hbone().await;
        let stream = conn.connect(&self.connect_request(80)).await.unwrap();
        let (sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(H2Io::new(stream)))
            .await
            .unwrap();
        tokio::spawn(c.with_upgrades());
        sender
    }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::get(path).header("host", HOST);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.ready().await.unwrap();
    let rsp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = rsp.status();
    let headers = rsp.headers().clone();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[tokio::test]
async fn http1_routes_rewrites_and_local_replies() {
    let bed = start().await;
    let mut c = bed.http1().await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    // Plain route to v1; the app sees the original authority and the trace headers untouched.
    let a = get(
        &mut c,
        "/api/items?x=1",
        &[("traceparent", tp), ("x-b3-traceid", "abc")],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let j = a.json();
    assert_eq!(j["name"], "echo-v1");
    assert_eq!(j["path"], "/api/items?x=1");
    assert_eq!(j["authority"], HOST);
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["headers"]["traceparent"], tp);
    assert_eq!(j["headers"]["x-b3-traceid"], "abc");
    assert_eq!(
        j["connect"],
        format!("{}:8080", bed.net.ip(2)),
        "CONNECT to pod IP:target port"
    );

    // Header match to the v2 "subset", with a response header from the route.
    let a = get(&mut c, "/api/items", &[("end-user", "jason")]).await;
    assert_eq!(a.json()["name"], "echo-v2");
    assert_eq!(a.headers["x-route"], "v2");

    // Prefix rewrite, authority rewrite, request header added.
    let a = get(&mut c, "/old/thing?q", &[]).await;
    let j = a.json();
    assert_eq!(j["path"], "/new/thing?q");
    assert_eq!(j["authority"], "rewritten.example");
    assert_eq!(j["headers"]["x-added"], "yes");

    // Direct response, redirect (Envoy's default 301), nothing matched (404).
    let a = get(&mut c, "/teapot", &[]).await;
    assert_eq!(
        (a.status.as_u16(), a.body.as_str()),
        (418, "short and stout")
    );
    let a = get(&mut c, "/redirect/x", &[]).await;
    assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(a.headers["location"], "http://example.org/elsewhere");
    let a = get(&mut c, "/nothing-here", &[]).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // sourceLabels: the client (forwarded for 127.x.y.9) is a workload labelled version=v2.
    let a = get(&mut c, "/labels", &[]).await;
    assert_eq!(a.json()["name"], "echo-v2");

    // No healthy endpoint → 503 (UH); the pod is gone → 503 (UF).
    assert_eq!(
        get(&mut c, "/down", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&mut c, "/broken", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The route timeout (100 ms) ends a slow answer (300 ms) with 504 (UT).
    let a = get(&mut c, "/timeout/slow", &[]).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);

    // Weighted split reaches both subsets.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(
            get(&mut c, "/split", &[]).await.json()["name"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Upstream HTTP connections are kept alive: one per pod, whatever the request count.
    // (A connection may still be finishing its previous response when the next request comes,
    // hence a little slack; without reuse there would be one per request, 50 here.)
    let kept = bed.waypoint.upstream.http_connections();
    assert!((2..=4).contains(&kept), "{kept} upstream HTTP connections");
    assert_eq!(bed.waypoint.upstream.hbone_connections(), 2);

    let text = mesh::metrics::encode(&bed.registry);
    assert!(
        text.contains("response_flags=\"NR\",connection_security_policy=\"mutual_tls\",response_code=\"404\",grpc_response_status=\"\""),
        "{text}"
    );
    assert!(text.contains("response_flags=\"UH\""));
    assert!(text.contains("response_flags=\"UF\""));
    assert!(text.contains(
        "response_flags=\"UT\",connection_security_policy=\"mutual_tls\",response_code=\"504\",grpc_response_status=\"\""
    ));
    assert!(text.contains("reporter=\"waypoint\",source_workload=\"sleep\""));
    assert!(text.contains("destination_workload=\"echo-v1\""));
}

#[tokio::test]
async fn http2_in_http2_out() {
    let bed = start().await;
    let conn = bed.hbone().await;
    let stream = conn.connect(&bed.connect_request(80)).await.unwrap();
    let (mut sender, c) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(H2Io::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(c);
    for (path, name) in [("/api/h2", "echo-v1"), ("/labels", "echo-v2")] {
        let req = Request::get(format!("http://{HOST}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let rsp = sender.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["name"], name);
        assert_eq!(j["version"], "HTTP/2.0");
        assert_eq!(j["authority"], HOST);
        assert_eq!(j["path"], path);
    }
}

#[tokio::test]
async fn unknown_address_is_refused_with_503() {
    let bed = start().await;
    let conn = bed.hbone().await;
    let mut req = bed.connect_request(80);
    req.authority = SocketAddr::new(bed.net.vip(99), 80);
    let err = conn.connect(&req).await.err().unwrap();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    // Known VIP, port without a listener.
    let err = conn.connect(&bed.connect_request(81)).await.err().unwrap();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn tcp_listener_proxies_bytes() {
    let bed = start().await;
    let conn = bed.hbone().await;
    let mut names = std::collections::HashSet::new();
    for _ in 0..4 {
        let stream = conn.connect(&bed.connect_request(9000)).await.unwrap();
        let mut io = H2Io::new(stream);
        io.write_all(b"hello").await.unwrap();
        io.shutdown().await.unwrap();
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        let (name, rest) = out.split_once(':').unwrap();
        assert_eq!(rest, "hello");
        names.insert(name.to_string());
    }
    assert_eq!(names.len(), 2, "round robin over both endpoints: {names:?}");
    let text = mesh::metrics::encode(&bed.registry);
    assert!(
        text.contains("istio_tcp_connections_opened_total{reporter=\"waypoint\""),
        "{text}"
    );
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let bed = start().await;
    let mut c = bed.http1().await;
    let req = Request::get("/ws")
        .header("host", HOST)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let rsp = c.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(rsp).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn config_change_does_not_fail_requests_in_flight() {
    let bed = start().await;
    let mut slow = bed.http1().await;
    let mut other = bed.http1().await;
    let in_flight = tokio::spawn(async move {
        let a = get(&mut slow, "/api/slow", &[]).await;
        (a, slow)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Pilot withdraws everything: routes, clusters, listeners.
    bed.config.send_replace(Arc::new(Config::default()));
    let (a, mut slow) = in_flight.await.unwrap();
    assert_eq!(
        a.status,
        StatusCode::OK,
        "the request in flight finishes on its config"
    );
    assert_eq!(a.json()["name"], "echo-v1");
    // Open tunnels keep their listener; their next requests see the new (empty) routes.
    assert_eq!(
        get(&mut slow, "/api/x", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&mut other, "/api/x", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    // New tunnels to the withdrawn address are refused.
    let conn = bed.hbone().await;
    let err = conn.connect(&bed.connect_request(80)).await.err().unwrap();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    let bed = start_with(Duration::from_millis(200)).await;
    let mut c = bed.http1().await;
    assert_eq!(get(&mut c, "/api/a", &[]).await.json()["name"], "echo-v1");
    assert_eq!(get(&mut c, "/labels", &[]).await.json()["name"], "echo-v2");
    assert_eq!(bed.waypoint.upstream.http_connections(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        bed.waypoint.upstream.http_connections(),
        0,
        "closed after 200 ms unused"
    );
    // The next request opens a new one.
    assert_eq!(get(&mut c, "/api/b", &[]).await.json()["name"], "echo-v1");
    assert_eq!(bed.waypoint.upstream.http_connections(), 1);
}

/// Publish the bed's configuration with cluster `V1` (where `/api` goes) changed by `edit`, as
/// a push of pilot's would.
fn reconfigure_v1(bed: &Bed, edit: impl FnOnce(&mut cluster_pb::Cluster)) {
    reconfigure_v1_port(bed, 8080, edit)
}

/// [`reconfigure_v1`] with the endpoint's port `port`.
fn reconfigure_v1_port(bed: &Bed, port: u32, edit: impl FnOnce(&mut cluster_pb::Cluster)) {
    reconfigure(bed, V1, port, edit)
}

/// Publish the bed's configuration with cluster `name` sent to `echo-v1` (port `port`) and
/// changed by `edit`.
fn reconfigure(bed: &Bed, name: &str, port: u32, edit: impl FnOnce(&mut cluster_pb::Cluster)) {
    let (mut c, la) = eds(name, &[(bed.net.ip(2), port, true)]);
    edit(&mut c);
    let (_, def) = config::cluster(&c.encode_to_vec(), name).unwrap();
    let (_, endpoints) = config::load_assignment(&la.encode_to_vec(), name).unwrap();
    let old = bed.config.borrow().clone();
    let mut clusters = old.clusters.clone();
    clusters.insert(
        name.into(),
        Arc::new(
            Cluster::new(name.into(), def.connect_timeout, endpoints)
                .with_protocol(def.protocol)
                .with_policy(def.policy, None, Default::default()),
        ),
    );
    bed.config.send_replace(Arc::new(Config::new(
        old.listeners.clone(),
        old.routes.clone(),
        clusters,
        old.state.clone(),
    )));
}

/// Set `common_http_protocol_options` (and HTTP/2's `max_concurrent_streams`) in the cluster's
/// HTTP protocol options, as pilot does from a DestinationRule's `connectionPool`.
fn pool_options(
    c: &mut cluster_pb::Cluster,
    common: core::HttpProtocolOptions,
    streams: Option<u32>,
) {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
    use http_options::http_protocol_options::UpstreamProtocolOptions as U;
    let any = c
        .typed_extension_protocol_options
        .get_mut(config::HTTP_PROTOCOL_OPTIONS)
        .unwrap();
    let mut o = http_options::HttpProtocolOptions::decode(&any.value[..]).unwrap();
    o.common_http_protocol_options = Some(common);
    if let Some(Some(U::UseDownstreamProtocolConfig(d))) =
        streams.map(|_| &mut o.upstream_protocol_options)
    {
        d.http2_protocol_options = Some(core::Http2ProtocolOptions {
            max_concurrent_streams: streams.map(|value| UInt32Value { value }),
            ..Default::default()
        });
    }
    any.value = o.encode_to_vec();
}

fn pb_duration(d: Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[tokio::test]
async fn max_requests_per_connection_and_idle_timeout_of_the_cluster() {
    let bed = start().await;
    reconfigure_v1(&bed, |c| {
        pool_options(
            c,
            core::HttpProtocolOptions {
                max_requests_per_connection: Some(UInt32Value { value: 2 }),
                idle_timeout: Some(pb_duration(Duration::from_millis(300))),
                ..Default::default()
            },
            None,
        )
    });
    let mut c = bed.http1().await;
    let mut conns = Vec::new();
    for _ in 0..5 {
        let j = get(&mut c, "/api/a", &[]).await.json();
        assert_eq!(j["name"], "echo-v1");
        conns.push(j["conn"].as_u64().unwrap());
    }
    assert_eq!(conns[0], conns[1], "{conns:?}");
    assert_ne!(conns[1], conns[2], "retired after 2 requests: {conns:?}");
    assert_eq!(conns[2], conns[3], "{conns:?}");
    assert_ne!(conns[3], conns[4], "{conns:?}");
    // The fifth request's connection is kept, then closed after 300 ms unused (the bed's own
    // idle timeout is 5 s).
    assert_eq!(bed.waypoint.upstream.http_connections(), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(bed.waypoint.upstream.http_connections(), 0);
    let j = get(&mut c, "/api/a", &[]).await.json();
    assert_ne!(j["conn"].as_u64().unwrap(), conns[4]);
}

#[tokio::test]
async fn max_connection_duration_of_the_cluster() {
    let bed = start().await;
    reconfigure_v1(&bed, |c| {
        pool_options(
            c,
            core::HttpProtocolOptions {
                max_connection_duration: Some(pb_duration(Duration::from_millis(400))),
                ..Default::default()
            },
            None,
        )
    });
    let mut c = bed.http1().await;
    let first = get(&mut c, "/api/a", &[]).await.json()["conn"].clone();
    assert_eq!(get(&mut c, "/api/a", &[]).await.json()["conn"], first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = get(&mut c, "/api/a", &[]).await.json()["conn"].clone();
    assert_ne!(
        later, first,
        "a connection past its lifetime takes no request"
    );
}

#[tokio::test]
async fn http2_max_concurrent_streams_opens_another_connection() {
    let bed = start().await;
    reconfigure_v1(&bed, |c| {
        pool_options(c, core::HttpProtocolOptions::default(), Some(2))
    });
    let conn = bed.hbone().await;
    let stream = conn.connect(&bed.connect_request(80)).await.unwrap();
    let (sender, c) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(H2Io::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(c);
    let send = |path: &'static str| {
        let mut sender = sender.clone();
        tokio::spawn(async move {
            let req = Request::get(format!("http://{HOST}{path}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let rsp = sender.send_request(req).await.unwrap();
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(j["version"], "HTTP/2.0");
            j["conn"].as_u64().unwrap()
        })
    };
    // Three slow requests at once: the first two share a connection, the third opens another.
    let a = send("/api/slow");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = send("/api/slow");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c = send("/api/slow");
    let (a, b, c) = (a.await.unwrap(), b.await.unwrap(), c.await.unwrap());
    assert_eq!(a, b);
    assert_ne!(b, c);
    assert_eq!(bed.waypoint.upstream.http_connections(), 2);
    // Both free again: the next request takes one of them.
    let d = send("/api/x").await.unwrap();
    assert!(d == a || d == c, "{d} is a third connection");
}

/// TLS origination (a DestinationRule's `tls: SIMPLE`) on kept-alive connections: requests
/// share one TLS session until the cluster's `max_requests_per_connection` retires it.
#[tokio::test]
async fn tls_origination_reuses_connections_within_the_limits() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
    let bed = start().await;
    let root = bed.ca.root_pem().to_string();
    reconfigure_v1_port(&bed, u32::from(TLS_PORT), move |c| {
        let ctx = tls_pb::UpstreamTlsContext {
            sni: "tls.example".into(),
            common_tls_context: Some(tls_pb::CommonTlsContext {
                validation_context_type: Some(
                    tls_pb::common_tls_context::ValidationContextType::ValidationContext(
                        tls_pb::CertificateValidationContext {
                            trusted_ca: Some(core::DataSource {
                                specifier: Some(core::data_source::Specifier::InlineString(root)),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.transport_socket = Some(core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
                        .into(),
                value: ctx.encode_to_vec(),
            })),
        });
        pool_options(
            c,
            core::HttpProtocolOptions {
                max_requests_per_connection: Some(UInt32Value { value: 3 }),
                ..Default::default()
            },
            None,
        );
    });
    let mut c = bed.http1().await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        let a = get(&mut c, "/api/tls", &[]).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        let j = a.json();
        assert_eq!(j["name"], "echo-v1");
        assert_eq!(j["connect"], format!("{}:{TLS_PORT}", bed.net.ip(2)));
        conns.push(j["conn"].as_u64().unwrap());
    }
    assert_eq!(conns[0], conns[1], "{conns:?}");
    assert_eq!(conns[1], conns[2], "{conns:?}");
    assert_ne!(conns[2], conns[3], "retired after 3 requests: {conns:?}");
    assert_eq!(bed.waypoint.upstream.http_connections(), 1);
}

/// The keepalive timers of this process's established IPv4 TCP sockets to `remote`, in
/// seconds until they fire (`/proc/self/net/tcp`, `tr` 2: the keepalive timer).
fn keepalive_timers(remote: SocketAddr) -> Vec<f64> {
    let IpAddr::V4(ip) = remote.ip() else {
        return Vec::new();
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        remote.port()
    );
    std::fs::read_to_string("/proc/self/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (kind, when) = f.get(5)?.split_once(':')?;
            (f.get(2) == Some(&want.as_str()) && f.get(3) == Some(&"01") && kind == "02")
                .then(|| i64::from_str_radix(when, 16).ok())
                .flatten()
                // USER_HZ ticks.
                .map(|t| t as f64 / 100.0)
        })
        .collect()
}

/// A cluster's TCP keepalive is set on the HBONE socket dialed for it; a cluster without one
/// uses another HBONE connection (with the waypoint's defaults) to the same pod.
#[tokio::test]
async fn cluster_keepalive_is_set_on_its_hbone_socket() {
    let bed = start().await;
    reconfigure(&bed, V1, 8080, |c| {
        c.upstream_connection_options = Some(cluster_pb::UpstreamConnectionOptions {
            tcp_keepalive: Some(core::TcpKeepalive {
                keepalive_probes: Some(UInt32Value { value: 4 }),
                keepalive_time: Some(UInt32Value { value: 20 }),
                keepalive_interval: Some(UInt32Value { value: 5 }),
            }),
            ..Default::default()
        });
    });
    // V2 (`/labels`) to the same pod, without a keepalive of its own.
    reconfigure(&bed, V2, 8080, |_| {});
    let mut c = bed.http1().await;
    assert_eq!(get(&mut c, "/api/k", &[]).await.json()["name"], "echo-v1");
    assert_eq!(get(&mut c, "/labels", &[]).await.json()["name"], "echo-v1");
    assert_eq!(
        bed.waypoint.upstream.hbone_connections(),
        2,
        "one HBONE connection per keepalive setting"
    );
    let hbone = SocketAddr::new(bed.net.ip(2), bed.hbone_port);
    let mut timers = keepalive_timers(hbone);
    timers.sort_by(f64::total_cmp);
    assert_eq!(timers.len(), 2, "{timers:?}");
    assert!(timers[0] <= 20.0, "the cluster's 20 s: {timers:?}");
    assert!(timers[1] > 100.0, "the waypoint's 180 s: {timers:?}");
}
