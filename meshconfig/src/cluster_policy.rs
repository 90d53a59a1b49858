//! DestinationRule `trafficPolicy` → Envoy Cluster fields (lb_policy and its config, circuit
//! breakers, outlier detection, connect timeout, TCP keepalive, HTTP protocol options, client
//! TLS) and the route's `hash_policy`, the way Istio's cluster builder fills them.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf as pbw;
use envoy_types::util::pack_any;

use crate::routing::{
    ClientTls, ConnectionPool, H2UpgradePolicy, HashAlgorithm, HashKey, LoadBalancer,
    OutlierDetection, SimpleLb, TlsMode, TrafficPolicy, Warmup,
};

/// Istio's mesh default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The transport socket name of Envoy's TLS.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

pub(crate) fn duration(d: Duration) -> pbw::Duration {
    pbw::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn u32_value(v: u32) -> Option<pbw::UInt32Value> {
    Some(pbw::UInt32Value { value: v })
}

/// Envoy's keepalive time and interval are whole seconds and 0 is not a valid socket option:
/// a shorter duration becomes 1 s.
fn keepalive_seconds(d: Duration) -> Option<pbw::UInt32Value> {
    u32_value(u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1))
}

/// Istio's thresholds for every cluster: everything unlimited (`u32::MAX`) unless the pool
/// says otherwise (Envoy's own defaults, 1024 and 3 retries, cut traffic during pod churn).
fn thresholds(pool: Option<&ConnectionPool>) -> cluster::circuit_breakers::Thresholds {
    let pick = |v: u32| u32_value(if v > 0 { v } else { u32::MAX });
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    cluster::circuit_breakers::Thresholds {
        max_connections: pick(tcp.map_or(0, |t| t.max_connections)),
        max_pending_requests: pick(http.map_or(0, |h| h.http1_max_pending_requests)),
        max_requests: pick(http.map_or(0, |h| h.http2_max_requests)),
        max_retries: pick(http.map_or(0, |h| h.max_retries)),
        track_remaining: true,
        ..Default::default()
    }
}

/// Fill `c` (an EDS cluster with its connect timeout and protocol options already set) from
/// the merged policy. `options` are the cluster's HTTP protocol options (`None` for TCP ports).
pub fn apply(
    c: &mut cluster::Cluster,
    options: &mut Option<http_options::HttpProtocolOptions>,
    policy: &TrafficPolicy,
) {
    apply_connection_pool(c, options, policy.connection_pool.as_ref());
    if let Some(o) = &policy.outlier_detection {
        apply_outlier_detection(c, o);
    }
    apply_load_balancer(c, policy.load_balancer.as_ref());
}

fn apply_connection_pool(
    c: &mut cluster::Cluster,
    options: &mut Option<http_options::HttpProtocolOptions>,
    pool: Option<&ConnectionPool>,
) {
    c.circuit_breakers = Some(cluster::CircuitBreakers {
        thresholds: vec![thresholds(pool)],
        ..Default::default()
    });
    let Some(pool) = pool else { return };
    let tcp = pool.tcp.as_ref();
    let http = pool.http.as_ref();
    if let Some(t) = tcp.and_then(|t| t.connect_timeout) {
        c.connect_timeout = Some(duration(t));
    }
    if let Some(k) = tcp.and_then(|t| t.tcp_keepalive.as_ref()) {
        c.upstream_connection_options = Some(cluster::UpstreamConnectionOptions {
            tcp_keepalive: Some(core::TcpKeepalive {
                keepalive_probes: k.probes.and_then(u32_value),
                keepalive_time: k.time.and_then(keepalive_seconds),
                keepalive_interval: k.interval.and_then(keepalive_seconds),
            }),
            ..Default::default()
        });
    }
    // The HTTP idle timeout wins over the TCP one, as in Istio.
    let idle = http
        .and_then(|h| h.idle_timeout)
        .or_else(|| tcp.and_then(|t| t.idle_timeout));
    let per_connection = http.map_or(0, |h| h.max_requests_per_connection);
    let lifetime = tcp.and_then(|t| t.max_connection_duration);
    let streams = http.map_or(0, |h| h.max_concurrent_streams);
    if let Some(o) = options.as_mut() {
        use http_options::http_protocol_options::UpstreamProtocolOptions as U;
        use http_options::http_protocol_options::explicit_http_config::ProtocolConfig as P;
        if let Some(h) = http {
            // Istio's `shouldH2Upgrade`: useClientProtocol keeps the client's version, then
            // UPGRADE / DO_NOT_UPGRADE decide (the mesh default is not to upgrade).
            let explicit = |p: P| {
                U::ExplicitHttpConfig(http_options::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(p),
                })
            };
            if h.use_client_protocol {
                o.upstream_protocol_options = Some(U::UseDownstreamProtocolConfig(
                    http_options::http_protocol_options::UseDownstreamHttpConfig {
                        http_protocol_options: Some(Default::default()),
                        http2_protocol_options: Some(Default::default()),
                        http3_protocol_options: None,
                    },
                ));
            } else if h.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade) {
                o.upstream_protocol_options =
                    Some(explicit(P::Http2ProtocolOptions(Default::default())));
            } else if h.h2_upgrade_policy == Some(H2UpgradePolicy::DoNotUpgrade)
                && matches!(
                    o.upstream_protocol_options,
                    Some(U::UseDownstreamProtocolConfig(_))
                )
            {
                o.upstream_protocol_options =
                    Some(explicit(P::HttpProtocolOptions(Default::default())));
            }
        }
        if idle.is_some() || per_connection > 0 || lifetime.is_some() {
            let common = o
                .common_http_protocol_options
                .get_or_insert_with(Default::default);
            common.idle_timeout = idle.map(duration);
            if per_connection > 0 {
                common.max_requests_per_connection = u32_value(per_connection);
            }
            common.max_connection_duration = lifetime.map(duration);
        }
        if streams > 0
            && let Some(U::ExplicitHttpConfig(e)) = &mut o.upstream_protocol_options
            && let Some(P::Http2ProtocolOptions(h2)) = &mut e.protocol_config
        {
            h2.max_concurrent_streams = u32_value(streams);
        }
    }
}

/// Istio's `applyOutlierDetection`: success-rate ejection off; each consecutive-error kind
/// given is enforced at 100% (0 turns it off); the panic threshold is `minHealthPercent`
/// (0 = never panic, unlike Envoy's 50% default).
fn apply_outlier_detection(c: &mut cluster::Cluster, o: &OutlierDetection) {
    let enforce = |v: u32| u32_value(if v > 0 { 100 } else { 0 });
    let mut out = cluster::OutlierDetection {
        enforcing_success_rate: u32_value(0),
        ..Default::default()
    };
    if let Some(v) = o.consecutive_5xx_errors {
        out.consecutive_5xx = u32_value(v);
        out.enforcing_consecutive_5xx = enforce(v);
    }
    if let Some(v) = o.consecutive_gateway_errors {
        out.consecutive_gateway_failure = u32_value(v);
        out.enforcing_consecutive_gateway_failure = enforce(v);
    }
    out.interval = o.interval.map(duration);
    out.base_ejection_time = o.base_ejection_time.map(duration);
    if o.max_ejection_percent > 0 {
        out.max_ejection_percent = u32_value(o.max_ejection_percent);
    }
    if o.split_external_local_origin_errors {
        out.split_external_local_origin_errors = true;
        if let Some(v) = o.consecutive_local_origin_failures.filter(|v| *v > 0) {
            out.consecutive_local_origin_failure = u32_value(v);
            out.enforcing_consecutive_local_origin_failure = u32_value(100);
        }
        out.enforcing_local_origin_success_rate = u32_value(0);
    }
    c.outlier_detection = Some(out);
    c.common_lb_config
        .get_or_insert_with(Default::default)
        .healthy_panic_threshold = Some(Percent {
        value: f64::from(o.min_health_percent),
    });
}

fn slow_start(w: &Warmup) -> cluster::cluster::SlowStartConfig {
    cluster::cluster::SlowStartConfig {
        slow_start_window: Some(duration(w.duration)),
        // Istio fixes the runtime key (no runtime override).
        aggression: Some(core::RuntimeDouble {
            default_value: w.aggression.0,
            runtime_key: "(".into(),
        }),
        min_weight_percent: Some(Percent {
            value: w.minimum_percent.0,
        }),
    }
}

/// Istio's `applyLoadBalancer` (our default stays ROUND_ROBIN, the waypoint contract's).
fn apply_load_balancer(c: &mut cluster::Cluster, lb: Option<&LoadBalancer>) {
    use cluster::cluster::{
        ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy, LeastRequestLbConfig,
        MaglevLbConfig, RingHashLbConfig, RoundRobinLbConfig,
    };
    let Some(lb) = lb else {
        c.lb_policy = LbPolicy::RoundRobin as i32;
        return;
    };
    if let Some(h) = &lb.consistent_hash {
        match h.algorithm {
            HashAlgorithm::Maglev { table_size } => {
                c.lb_policy = LbPolicy::Maglev as i32;
                if table_size > 0 {
                    c.lb_config = Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
                        table_size: Some(pbw::UInt64Value { value: table_size }),
                    }));
                }
            }
            HashAlgorithm::RingHash { minimum_ring_size } => {
                c.lb_policy = LbPolicy::RingHash as i32;
                c.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                    minimum_ring_size: Some(pbw::UInt64Value {
                        value: minimum_ring_size,
                    }),
                    ..Default::default()
                }));
            }
        }
        return;
    }
    let warm = lb.warmup.as_ref().map(slow_start);
    match lb.simple {
        Some(SimpleLb::LeastRequest) => {
            c.lb_policy = LbPolicy::LeastRequest as i32;
            if let Some(s) = warm {
                c.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                    slow_start_config: Some(s),
                    ..Default::default()
                }));
            }
        }
        Some(SimpleLb::Random) => c.lb_policy = LbPolicy::Random as i32,
        Some(SimpleLb::Passthrough) => {
            c.lb_policy = LbPolicy::ClusterProvided as i32;
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32,
            ));
            c.eds_cluster_config = None;
            c.load_assignment = None;
        }
        Some(SimpleLb::RoundRobin | SimpleLb::Unspecified) | None => {
            c.lb_policy = LbPolicy::RoundRobin as i32;
            if let Some(s) = warm {
                c.lb_config = Some(LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
                    slow_start_config: Some(s),
                }));
            }
        }
    }
}

/// Whether the cluster is an ORIGINAL_DST one (no endpoints are sent for it).
pub fn is_original_dst(c: &cluster::Cluster) -> bool {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType};
    matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::OriginalDst as i32)
}

/// The route's `hash_policy` for a consistent-hash policy (Istio's `consistentHashToHashPolicy`).
pub fn hash_policy(policy: &TrafficPolicy) -> Vec<route::route_action::HashPolicy> {
    use route::route_action::hash_policy::{
        ConnectionProperties, Cookie, CookieAttribute, Header, PolicySpecifier, QueryParameter,
    };
    let Some(h) = policy
        .load_balancer
        .as_ref()
        .and_then(|l| l.consistent_hash.as_ref())
    else {
        return Vec::new();
    };
    let specifier = match &h.key {
        HashKey::Header(name) => PolicySpecifier::Header(Header {
            header_name: name.clone(),
            ..Default::default()
        }),
        HashKey::Cookie {
            name,
            path,
            ttl,
            attributes,
        } => PolicySpecifier::Cookie(Cookie {
            name: name.clone(),
            path: path.clone(),
            ttl: ttl.map(duration),
            attributes: attributes
                .iter()
                .map(|(n, v)| CookieAttribute {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
        }),
        HashKey::SourceIp => {
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
        }
        HashKey::QueryParameter(name) => {
            PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
        }
    };
    vec![route::route_action::HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    }]
}

/// Client TLS inside the HBONE stream (`SIMPLE` / `MUTUAL`), as Envoy's `UpstreamTlsContext`
/// with the PEM files inlined (the waypoint may run elsewhere). `DISABLE` and `ISTIO_MUTUAL`
/// (HBONE is the mesh's mTLS already) give none. Errors name the file that could not be read.
pub fn transport_socket(
    t: &ClientTls,
    base: &std::path::Path,
) -> Result<Option<core::TransportSocket>, String> {
    use core::data_source::Specifier;
    if !matches!(t.mode, TlsMode::Simple | TlsMode::Mutual) {
        return Ok(None);
    }
    let read = |field: &str, p: &str| -> Result<core::DataSource, String> {
        let path = base.join(p);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{field}: reading {}: {e}", path.display()))?;
        Ok(core::DataSource {
            specifier: Some(Specifier::InlineString(text)),
            ..Default::default()
        })
    };
    // credentialName (folder source): a directory with tls.crt, tls.key and ca.crt.
    let (cert, key, ca) = match &t.credential_name {
        Some(name) => (
            Some(format!("{name}/tls.crt")),
            Some(format!("{name}/tls.key")),
            t.ca_certificates.clone().or(Some(format!("{name}/ca.crt"))),
        ),
        None => (
            t.client_certificate.clone(),
            t.private_key.clone(),
            t.ca_certificates.clone(),
        ),
    };
    let mut common = tls::CommonTlsContext::default();
    if t.mode == TlsMode::Mutual {
        let (Some(cert), Some(key)) = (cert, key) else {
            return Err("MUTUAL needs a client certificate and key".into());
        };
        common.tls_certificates = vec![tls::TlsCertificate {
            certificate_chain: Some(read("clientCertificate", &cert)?),
            private_key: Some(read("privateKey", &key)?),
            ..Default::default()
        }];
    }
    if !t.insecure_skip_verify
        && let Some(ca) = ca
    {
        use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
        common.validation_context_type = Some(
            tls::common_tls_context::ValidationContextType::ValidationContext(
                tls::CertificateValidationContext {
                    trusted_ca: Some(read("caCertificates", &ca)?),
                    match_typed_subject_alt_names: t
                        .subject_alt_names
                        .iter()
                        .map(|san| tls::SubjectAltNameMatcher {
                            san_type: tls::subject_alt_name_matcher::SanType::Dns as i32,
                            matcher: Some(matcher::StringMatcher {
                                match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                                    san.clone(),
                                )),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            ),
        );
    }
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: t.sni.clone().unwrap_or_default(),
        ..Default::default()
    };
    Ok(Some(core::TransportSocket {
        name: TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
            ctx,
        ))),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{ConsistentHash, HttpPool, OutlierDetection, TcpPool, TrafficPolicy};

    fn http_options() -> Option<http_options::HttpProtocolOptions> {
        use http_options::http_protocol_options::{
            UpstreamProtocolOptions, UseDownstreamHttpConfig,
        };
        Some(http_options::HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                UseDownstreamHttpConfig::default(),
            )),
            ..Default::default()
        })
    }

    #[test]
    fn defaults_are_istios() {
        let mut c = cluster::Cluster::default();
        let mut o = http_options();
        apply(&mut c, &mut o, &TrafficPolicy::default());
        let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
        assert_eq!(t.max_requests.as_ref().unwrap().value, u32::MAX);
        assert_eq!(t.max_retries.as_ref().unwrap().value, u32::MAX);
        assert!(t.track_remaining);
        assert_eq!(c.lb_policy, cluster::cluster::LbPolicy::RoundRobin as i32);
        assert!(c.outlier_detection.is_none());
        assert!(o.unwrap().common_http_protocol_options.is_none());
    }

    #[test]
    fn pool_outlier_and_hash() {
        let policy = TrafficPolicy {
            load_balancer: Some(LoadBalancer {
                consistent_hash: Some(ConsistentHash {
                    key: HashKey::Header("x-user".into()),
                    algorithm: HashAlgorithm::RingHash {
                        minimum_ring_size: 1024,
                    },
                }),
                ..Default::default()
            }),
            connection_pool: Some(ConnectionPool {
                tcp: Some(TcpPool {
                    max_connections: 1,
                    connect_timeout: Some(Duration::from_millis(500)),
                    idle_timeout: Some(Duration::from_secs(9)),
                    tcp_keepalive: Some(crate::routing::TcpKeepalive {
                        probes: Some(3),
                        time: Some(Duration::from_millis(300)),
                        interval: Some(Duration::from_secs(20)),
                    }),
                    ..Default::default()
                }),
                http: Some(HttpPool {
                    http1_max_pending_requests: 1,
                    max_requests_per_connection: 4,
                    ..Default::default()
                }),
            }),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: Some(2),
                max_ejection_percent: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = cluster::Cluster::default();
        let mut o = http_options();
        apply(&mut c, &mut o, &policy);
        let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
        assert_eq!(t.max_connections.as_ref().unwrap().value, 1);
        assert_eq!(t.max_pending_requests.as_ref().unwrap().value, 1);
        assert_eq!(t.max_requests.as_ref().unwrap().value, u32::MAX);
        assert_eq!(c.connect_timeout.as_ref().unwrap().nanos, 500_000_000);
        let common = o.unwrap().common_http_protocol_options.unwrap();
        assert_eq!(
            common.idle_timeout.unwrap().seconds,
            9,
            "the TCP idle timeout when HTTP has none"
        );
        assert_eq!(common.max_requests_per_connection.unwrap().value, 4);
        let k = c
            .upstream_connection_options
            .as_ref()
            .and_then(|o| o.tcp_keepalive.as_ref())
            .unwrap();
        assert_eq!(k.keepalive_probes.as_ref().unwrap().value, 3);
        assert_eq!(
            k.keepalive_time.as_ref().unwrap().value,
            1,
            "whole seconds, at least 1"
        );
        assert_eq!(k.keepalive_interval.as_ref().unwrap().value, 20);
        let od = c.outlier_detection.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx.as_ref().unwrap().value, 2);
        assert_eq!(od.enforcing_consecutive_5xx.as_ref().unwrap().value, 100);
        assert_eq!(od.enforcing_success_rate.as_ref().unwrap().value, 0);
        assert_eq!(od.max_ejection_percent.as_ref().unwrap().value, 100);
        assert!(od.consecutive_gateway_failure.is_none(), "Envoy's default");
        assert_eq!(
            c.common_lb_config
                .as_ref()
                .unwrap()
                .healthy_panic_threshold
                .as_ref()
                .unwrap()
                .value,
            0.0,
            "panic off, as Istio"
        );
        assert_eq!(c.lb_policy, cluster::cluster::LbPolicy::RingHash as i32);
        let h = hash_policy(&policy);
        assert!(matches!(
            &h[0].policy_specifier,
            Some(route::route_action::hash_policy::PolicySpecifier::Header(x)) if x.header_name == "x-user"
        ));
    }

    #[test]
    fn passthrough_is_original_dst() {
        let policy = TrafficPolicy {
            load_balancer: Some(LoadBalancer {
                simple: Some(SimpleLb::Passthrough),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = cluster::Cluster {
            eds_cluster_config: Some(Default::default()),
            ..Default::default()
        };
        apply(&mut c, &mut None, &policy);
        assert!(is_original_dst(&c));
        assert!(c.eds_cluster_config.is_none());
        assert_eq!(
            c.lb_policy,
            cluster::cluster::LbPolicy::ClusterProvided as i32
        );
    }

    #[test]
    fn tls_inlines_files_and_names_missing_ones() {
        let dir = std::env::temp_dir().join(format!("cluster-policy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), "CA").unwrap();
        let t = ClientTls {
            mode: TlsMode::Simple,
            client_certificate: None,
            private_key: None,
            ca_certificates: Some("ca.pem".into()),
            credential_name: None,
            subject_alt_names: vec!["web.example".into()],
            sni: Some("web.example".into()),
            insecure_skip_verify: false,
        };
        let socket = transport_socket(&t, &dir).unwrap().unwrap();
        assert_eq!(socket.name, TLS_TRANSPORT_SOCKET);
        let mutual = ClientTls {
            mode: TlsMode::Mutual,
            client_certificate: Some("missing.pem".into()),
            private_key: Some("key.pem".into()),
            ..t.clone()
        };
        let e = transport_socket(&mutual, &dir).unwrap_err();
        assert!(e.starts_with("clientCertificate: reading"), "{e}");
        let istio = ClientTls {
            mode: TlsMode::IstioMutual,
            ..t
        };
        assert!(
            transport_socket(&istio, &dir).unwrap().is_none(),
            "HBONE is the mTLS"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
