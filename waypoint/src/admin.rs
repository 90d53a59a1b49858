//! The admin, metrics and readiness endpoints: `/config_dump` in Envoy's ConfigDump JSON shape
//! (the fields this proxy reads, rendered by hand: envoy-types has no serde), `/clusters` with
//! endpoint health, `/healthz/ready` once every xDS type has been applied, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as envoy_core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::Duration;
use http::StatusCode;
use mesh::admin::{Reply, Router};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::config::{Config, ListenerKind, Routes};
use crate::xds::{Resources, Status};

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// Port 15000 (localhost): everything.
pub fn admin_router(
    config: watch::Receiver<Arc<Config>>,
    status: Arc<Status>,
    registry: Arc<Mutex<Registry>>,
) -> Router {
    Arc::new(move |req| match req.path {
        "/config_dump" => Reply::json(&config_dump(&config.borrow().resources)),
        "/clusters" => Reply::json(&clusters(&config.borrow())),
        "/listeners" => Reply::json(&listeners(&config.borrow())),
        "/healthz/ready" => ready(&status),
        "/metrics" | "/stats/prometheus" => metrics(&registry),
        _ => Reply::not_found(),
    })
}

/// Port 15020: Prometheus.
pub fn metrics_router(registry: Arc<Mutex<Registry>>) -> Router {
    Arc::new(move |req| match req.path {
        "/metrics" | "/stats/prometheus" => metrics(&registry),
        _ => Reply::not_found(),
    })
}

/// Port 15021: readiness.
pub fn ready_router(status: Arc<Status>) -> Router {
    Arc::new(move |req| match req.path {
        "/healthz/ready" => ready(&status),
        _ => Reply::not_found(),
    })
}

fn ready(status: &Status) -> Reply {
    if status.ready.load(Ordering::Acquire) {
        Reply::text(StatusCode::OK, "ready\n")
    } else {
        Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first configuration of every type\n",
        )
    }
}

fn metrics(registry: &Mutex<Registry>) -> Reply {
    match registry.lock() {
        Ok(r) => Reply {
            status: StatusCode::OK,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: mesh::metrics::encode(&r),
        },
        Err(_) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n"),
    }
}

/// Endpoint health per cluster, as the data path sees it.
pub fn clusters(config: &Config) -> Value {
    let list: Vec<Value> = config
        .clusters
        .values()
        .map(|c| {
            let (requests, connections, pending, retries) = c.breaker.in_flight();
            let l = &c.policy.limits;
            json!({
                "name": c.name,
                "connect_timeout": format!("{}s", c.connect_timeout.as_secs_f64()),
                "lb_policy": c.policy.lb.policy.name(),
                "circuit_breakers": {
                    "max_connections": l.max_connections, "connections_in_use": connections,
                    "max_pending_requests": l.max_pending_requests, "pending_requests": pending,
                    "max_requests": l.max_requests, "active_requests": requests,
                    "max_retries": l.max_retries, "active_retries": retries,
                },
                "outlier_detection": c.policy.outlier.is_some(),
                "connection_pool": connection_pool(&c.policy.pool),
                "endpoints": c.endpoints.iter().enumerate().map(|(i, e)| {
                    let host = &c.hosts[i];
                    let o = host.outlier.snapshot();
                    json!({
                        "address": e.address.to_string(),
                        "health_status": if e.healthy { "HEALTHY" } else { "UNHEALTHY" },
                        "ejected": c.is_ejected(i),
                        "active_requests": host.active.load(Ordering::Acquire),
                        "outlier": {
                            "consecutive_5xx": o.consecutive_5xx,
                            "consecutive_gateway_failure": o.consecutive_gateway,
                            "consecutive_local_origin_failure": o.consecutive_local,
                            "ejections": o.ejections,
                            "ejection_multiplier": o.multiplier,
                        },
                        "workload": e.workload,
                        "identity": config.state.workload_by_ip(e.address.ip()).map(|w| w.identity().to_string()),
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "clusters": list })
}

/// The upstream connection limits in force (absent fields: none given by the cluster).
fn connection_pool(l: &crate::pool::Limits) -> Value {
    let secs = |d: Option<std::time::Duration>| d.map(|d| format!("{}s", d.as_secs_f64()));
    json!({
        "idle_timeout": secs(l.idle_timeout),
        "max_requests_per_connection": l.max_requests_per_connection,
        "max_connection_duration": secs(l.max_connection_duration),
        "max_concurrent_streams": l.max_concurrent_streams,
        "tcp_keepalive": l.keepalive.map(|k| json!({
            "keepalive_probes": k.probes,
            "keepalive_time": secs(k.time),
            "keepalive_interval": secs(k.interval),
        })),
    })
}

fn listeners(config: &Config) -> Value {
    let list: Vec<Value> = config
        .listeners
        .values()
        .map(|l| {
            let kind = match &l.kind {
                ListenerKind::Http {
                    routes: Routes::Rds(n),
                    ..
                } => json!({"http": {"rds": n}}),
                ListenerKind::Http {
                    routes: Routes::Inline(t),
                    ..
                } => json!({"http": {"inline": t.name}}),
                ListenerKind::Tcp { clusters, .. } => json!({"tcp": clusters}),
            };
            json!({
                "name": l.name,
                "addresses": l.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "kind": kind,
            })
        })
        .collect();
    json!({ "listeners": list })
}

/// Envoy's `/config_dump` shape: one entry per type, each dynamic resource with its version.
pub fn config_dump(r: &Resources) -> Value {
    let clusters: Vec<Value> = r
        .clusters
        .values()
        .map(|c| json!({"version_info": c.version, "cluster": cluster(&c.resource)}))
        .collect();
    let listeners: Vec<Value> = r
        .listeners
        .values()
        .map(|l| {
            json!({
                "name": l.resource.name,
                "active_state": {"version_info": l.version, "listener": listener(&l.resource)},
            })
        })
        .collect();
    let routes: Vec<Value> = r
        .routes
        .values()
        .map(|rc| json!({"version_info": rc.version, "route_config": route_config(&rc.resource)}))
        .collect();
    let endpoints: Vec<Value> = r
        .endpoints
        .values()
        .map(
            |e| json!({"version_info": e.version, "endpoint_config": load_assignment(&e.resource)}),
        )
        .collect();
    json!({
        "configs": [
            {"@type": format!("{TYPE_PREFIX}envoy.admin.v3.ClustersConfigDump"), "dynamic_active_clusters": clusters},
            {"@type": format!("{TYPE_PREFIX}envoy.admin.v3.ListenersConfigDump"), "dynamic_listeners": listeners},
            {"@type": format!("{TYPE_PREFIX}envoy.admin.v3.RoutesConfigDump"), "dynamic_route_configs": routes},
            {"@type": format!("{TYPE_PREFIX}envoy.admin.v3.EndpointsConfigDump"), "dynamic_endpoint_configs": endpoints},
        ]
    })
}

/// An object without the empty members, as protobuf's JSON mapping leaves defaults out.
fn object(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in pairs {
        let empty = match &v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_u64() == Some(0),
        };
        if !empty {
            m.insert(k.to_string(), v);
        }
    }
    Value::Object(m)
}

fn duration(d: &Option<Duration>) -> Value {
    match d {
        Some(d) if d.nanos == 0 => json!(format!("{}s", d.seconds)),
        Some(d) => json!(format!("{}.{:09}s", d.seconds, d.nanos)),
        None => Value::Null,
    }
}

fn address(a: &Option<envoy_core::Address>) -> Value {
    use envoy_core::address::Address as A;
    use envoy_core::socket_address::PortSpecifier;
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(A::SocketAddress(s)) => json!({"socket_address": object(vec![
            ("address", json!(s.address)),
            ("port_value", match s.port_specifier { Some(PortSpecifier::PortValue(p)) => json!(p), _ => Value::Null }),
        ])}),
        _ => Value::Null,
    }
}

fn cluster(c: &cluster_pb::Cluster) -> Value {
    use cluster_pb::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let kind = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => {
            DiscoveryType::try_from(*t).map_or(Value::Null, |t| json!(t.as_str_name()))
        }
        _ => Value::Null,
    };
    object(vec![
        (
            "@type",
            json!(format!("{TYPE_PREFIX}envoy.config.cluster.v3.Cluster")),
        ),
        ("name", json!(c.name)),
        ("type", kind),
        (
            "eds_cluster_config",
            c.eds_cluster_config.as_ref().map_or(Value::Null, |e| {
                object(vec![
                    ("service_name", json!(e.service_name)),
                    (
                        "eds_config",
                        e.eds_config
                            .as_ref()
                            .map_or(Value::Null, |_| json!({"ads": {}})),
                    ),
                ])
            }),
        ),
        ("connect_timeout", duration(&c.connect_timeout)),
        (
            "lb_policy",
            LbPolicy::try_from(c.lb_policy).map_or(Value::Null, |p| json!(p.as_str_name())),
        ),
    ])
}

fn load_assignment(la: &endpoint_pb::ClusterLoadAssignment) -> Value {
    use endpoint_pb::lb_endpoint::HostIdentifier;
    let localities: Vec<Value> = la
        .endpoints
        .iter()
        .map(|l| {
            json!({"lb_endpoints": l.lb_endpoints.iter().map(|e| object(vec![
                ("endpoint", match &e.host_identifier {
                    Some(HostIdentifier::Endpoint(ep)) => json!({"address": address(&ep.address)}),
                    _ => Value::Null,
                }),
                ("health_status", envoy_core::HealthStatus::try_from(e.health_status).map_or(Value::Null, |h| json!(h.as_str_name()))),
                ("metadata", e.metadata.as_ref().map_or(Value::Null, metadata)),
            ])).collect::<Vec<_>>()})
        })
        .collect();
    object(vec![
        (
            "@type",
            json!(format!(
                "{TYPE_PREFIX}envoy.config.endpoint.v3.ClusterLoadAssignment"
            )),
        ),
        ("cluster_name", json!(la.cluster_name)),
        ("endpoints", json!(localities)),
    ])
}

fn metadata(m: &envoy_core::Metadata) -> Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    let mut filters = Map::new();
    for (name, s) in &m.filter_metadata {
        let mut fields = Map::new();
        for (k, v) in &s.fields {
            let v = match &v.kind {
                Some(Kind::StringValue(s)) => json!(s),
                Some(Kind::NumberValue(n)) => json!(n),
                Some(Kind::BoolValue(b)) => json!(b),
                _ => Value::Null,
            };
            fields.insert(k.clone(), v);
        }
        filters.insert(name.clone(), Value::Object(fields));
    }
    json!({"filter_metadata": filters})
}

fn listener(l: &listener_pb::Listener) -> Value {
    let chains: Vec<Value> = l
        .filter_chains
        .iter()
        .map(|c| {
            json!({"filters": c.filters.iter().map(|f| object(vec![
                ("name", json!(f.name)),
                ("typed_config", match &f.config_type {
                    Some(listener_pb::filter::ConfigType::TypedConfig(a)) => typed_filter(&a.type_url, &a.value),
                    _ => Value::Null,
                }),
            ])).collect::<Vec<_>>()})
        })
        .collect();
    object(vec![
        (
            "@type",
            json!(format!("{TYPE_PREFIX}envoy.config.listener.v3.Listener")),
        ),
        ("name", json!(l.name)),
        ("address", address(&l.address)),
        (
            "additional_addresses",
            json!(
                l.additional_addresses
                    .iter()
                    .map(|a| json!({"address": address(&a.address)}))
                    .collect::<Vec<_>>()
            ),
        ),
        ("filter_chains", json!(chains)),
    ])
}

fn typed_filter(type_url: &str, body: &[u8]) -> Value {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
    use prost::Message;
    let mut out = object(vec![("@type", json!(type_url))]);
    if type_url.ends_with(".HttpConnectionManager")
        && let Ok(h) = hcm::HttpConnectionManager::decode(body)
    {
        use hcm::http_connection_manager::RouteSpecifier;
        out["stat_prefix"] = json!(h.stat_prefix);
        match &h.route_specifier {
            Some(RouteSpecifier::Rds(r)) => {
                out["rds"] =
                    json!({"route_config_name": r.route_config_name, "config_source": {"ads": {}}});
            }
            Some(RouteSpecifier::RouteConfig(rc)) => out["route_config"] = route_config(rc),
            _ => {}
        }
        out["http_filters"] = json!(
            h.http_filters
                .iter()
                .map(|f| json!({"name": f.name}))
                .collect::<Vec<_>>()
        );
    } else if type_url.ends_with(".TcpProxy")
        && let Ok(t) = tcp::TcpProxy::decode(body)
    {
        use tcp::tcp_proxy::ClusterSpecifier;
        out["stat_prefix"] = json!(t.stat_prefix);
        match &t.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => out["cluster"] = json!(c),
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                out["weighted_clusters"] = json!({"clusters": w.clusters.iter()
                    .map(|c| json!({"name": c.name, "weight": c.weight})).collect::<Vec<_>>()});
            }
            None => {}
        }
    }
    out
}

fn route_config(rc: &route_pb::RouteConfiguration) -> Value {
    object(vec![
        (
            "@type",
            json!(format!(
                "{TYPE_PREFIX}envoy.config.route.v3.RouteConfiguration"
            )),
        ),
        ("name", json!(rc.name)),
        (
            "virtual_hosts",
            json!(
                rc.virtual_hosts
                    .iter()
                    .map(|v| object(vec![
                        ("name", json!(v.name)),
                        ("domains", json!(v.domains)),
                        (
                            "routes",
                            json!(v.routes.iter().map(route).collect::<Vec<_>>())
                        ),
                        (
                            "request_headers_to_add",
                            header_adds(&v.request_headers_to_add)
                        ),
                        (
                            "request_headers_to_remove",
                            json!(v.request_headers_to_remove)
                        ),
                        (
                            "response_headers_to_add",
                            header_adds(&v.response_headers_to_add)
                        ),
                        (
                            "response_headers_to_remove",
                            json!(v.response_headers_to_remove)
                        ),
                    ]))
                    .collect::<Vec<_>>()
            ),
        ),
        (
            "request_headers_to_add",
            header_adds(&rc.request_headers_to_add),
        ),
        (
            "response_headers_to_add",
            header_adds(&rc.response_headers_to_add),
        ),
    ])
}

fn regex(r: &matcher::RegexMatcher) -> Value {
    json!({"regex": r.regex})
}

fn string_matcher(s: &matcher::StringMatcher) -> Value {
    use matcher::string_matcher::MatchPattern as P;
    let (k, v) = match &s.match_pattern {
        Some(P::Exact(x)) => ("exact", json!(x)),
        Some(P::Prefix(x)) => ("prefix", json!(x)),
        Some(P::Suffix(x)) => ("suffix", json!(x)),
        Some(P::Contains(x)) => ("contains", json!(x)),
        Some(P::SafeRegex(r)) => ("safe_regex", regex(r)),
        _ => ("unsupported", Value::Null),
    };
    object(vec![(k, v), ("ignore_case", json!(s.ignore_case))])
}

fn route(r: &route_pb::Route) -> Value {
    use route_pb::route::Action;
    let action = match &r.action {
        Some(Action::Route(a)) => ("route", route_action(a)),
        Some(Action::Redirect(a)) => ("redirect", redirect(a)),
        Some(Action::DirectResponse(d)) => (
            "direct_response",
            object(vec![
                ("status", json!(d.status)),
                (
                    "body",
                    match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                        Some(envoy_core::data_source::Specifier::InlineString(s)) => {
                            json!({"inline_string": s})
                        }
                        Some(envoy_core::data_source::Specifier::InlineBytes(b)) => {
                            json!({"inline_bytes_len": b.len()})
                        }
                        _ => Value::Null,
                    },
                ),
            ]),
        ),
        _ => ("action", Value::Null),
    };
    object(vec![
        ("name", json!(r.name)),
        ("match", r.r#match.as_ref().map_or(Value::Null, route_match)),
        action,
        (
            "request_headers_to_add",
            header_adds(&r.request_headers_to_add),
        ),
        (
            "request_headers_to_remove",
            json!(r.request_headers_to_remove),
        ),
        (
            "response_headers_to_add",
            header_adds(&r.response_headers_to_add),
        ),
        (
            "response_headers_to_remove",
            json!(r.response_headers_to_remove),
        ),
    ])
}

#[allow(deprecated)] // renders the deprecated header specifiers too
fn route_match(m: &route_pb::RouteMatch) -> Value {
    use route_pb::route_match::PathSpecifier as P;
    let path = match &m.path_specifier {
        Some(P::Prefix(p)) => ("prefix", json!(p)),
        Some(P::Path(p)) => ("path", json!(p)),
        Some(P::SafeRegex(r)) => ("safe_regex", regex(r)),
        Some(P::PathSeparatedPrefix(p)) => ("path_separated_prefix", json!(p)),
        _ => ("path_specifier", Value::Null),
    };
    let headers: Vec<Value> = m
        .headers
        .iter()
        .map(|h| {
            use route_pb::header_matcher::HeaderMatchSpecifier as H;
            let spec = match &h.header_match_specifier {
                Some(H::ExactMatch(s)) => ("exact_match", json!(s)),
                Some(H::PrefixMatch(s)) => ("prefix_match", json!(s)),
                Some(H::SuffixMatch(s)) => ("suffix_match", json!(s)),
                Some(H::ContainsMatch(s)) => ("contains_match", json!(s)),
                Some(H::SafeRegexMatch(r)) => ("safe_regex_match", regex(r)),
                Some(H::PresentMatch(b)) => ("present_match", json!(b)),
                Some(H::StringMatch(s)) => ("string_match", string_matcher(s)),
                Some(H::RangeMatch(r)) => ("range_match", json!({"start": r.start, "end": r.end})),
                None => ("present_match", json!(true)),
            };
            object(vec![
                ("name", json!(h.name)),
                spec,
                ("invert_match", json!(h.invert_match)),
                (
                    "treat_missing_header_as_empty",
                    json!(h.treat_missing_header_as_empty),
                ),
            ])
        })
        .collect();
    let query: Vec<Value> = m
        .query_parameters
        .iter()
        .map(|q| {
            use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
            let spec = match &q.query_parameter_match_specifier {
                Some(Q::StringMatch(s)) => ("string_match", string_matcher(s)),
                Some(Q::PresentMatch(b)) => ("present_match", json!(b)),
                None => ("present_match", Value::Null),
            };
            object(vec![("name", json!(q.name)), spec])
        })
        .collect();
    let metadata: Vec<Value> = m
        .dynamic_metadata
        .iter()
        .map(|d| {
            use matcher::metadata_matcher::path_segment::Segment;
            use matcher::value_matcher::MatchPattern;
            object(vec![
                ("filter", json!(d.filter)),
                (
                    "path",
                    json!(
                        d.path
                            .iter()
                            .map(|s| match &s.segment {
                                Some(Segment::Key(k)) => json!({"key": k}),
                                None => Value::Null,
                            })
                            .collect::<Vec<_>>()
                    ),
                ),
                (
                    "value",
                    match d.value.as_ref().and_then(|v| v.match_pattern.as_ref()) {
                        Some(MatchPattern::StringMatch(s)) => {
                            json!({"string_match": string_matcher(s)})
                        }
                        Some(MatchPattern::PresentMatch(b)) => json!({"present_match": b}),
                        _ => Value::Null,
                    },
                ),
                ("invert", json!(d.invert)),
            ])
        })
        .collect();
    object(vec![
        path,
        (
            "case_sensitive",
            m.case_sensitive
                .as_ref()
                .map_or(Value::Null, |b| json!(b.value)),
        ),
        ("headers", json!(headers)),
        ("query_parameters", json!(query)),
        ("dynamic_metadata", json!(metadata)),
    ])
}

fn route_action(a: &route_pb::RouteAction) -> Value {
    use route_pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let target = match &a.cluster_specifier {
        Some(C::Cluster(c)) => ("cluster", json!(c)),
        Some(C::WeightedClusters(w)) => (
            "weighted_clusters",
            json!({"clusters": w.clusters.iter().map(|c| object(vec![
                ("name", json!(c.name)),
                ("weight", json!(c.weight.as_ref().map_or(0, |w| w.value))),
                ("request_headers_to_add", header_adds(&c.request_headers_to_add)),
                ("request_headers_to_remove", json!(c.request_headers_to_remove)),
                ("response_headers_to_add", header_adds(&c.response_headers_to_add)),
                ("response_headers_to_remove", json!(c.response_headers_to_remove)),
                ("host_rewrite_literal", match &c.host_rewrite_specifier {
                    Some(route_pb::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h)) => json!(h),
                    None => Value::Null,
                }),
            ])).collect::<Vec<_>>()}),
        ),
        _ => ("cluster_specifier", Value::Null),
    };
    object(vec![
        target,
        ("prefix_rewrite", json!(a.prefix_rewrite)),
        (
            "regex_rewrite",
            a.regex_rewrite.as_ref().map_or(Value::Null, |r| {
                json!({
                    "pattern": r.pattern.as_ref().map(regex),
                    "substitution": r.substitution,
                })
            }),
        ),
        (
            "host_rewrite_literal",
            match &a.host_rewrite_specifier {
                Some(H::HostRewriteLiteral(h)) => json!(h),
                _ => Value::Null,
            },
        ),
        ("timeout", duration(&a.timeout)),
    ])
}

fn redirect(r: &route_pb::RedirectAction) -> Value {
    use route_pb::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode, SchemeRewriteSpecifier as S,
    };
    object(vec![
        ("host_redirect", json!(r.host_redirect)),
        ("port_redirect", json!(r.port_redirect)),
        (
            "scheme_redirect",
            match &r.scheme_rewrite_specifier {
                Some(S::SchemeRedirect(s)) => json!(s),
                Some(S::HttpsRedirect(true)) => json!("https"),
                _ => Value::Null,
            },
        ),
        (
            match &r.path_rewrite_specifier {
                Some(P::PathRedirect(_)) => "path_redirect",
                Some(P::PrefixRewrite(_)) => "prefix_rewrite",
                Some(P::RegexRewrite(_)) => "regex_rewrite",
                _ => "path_rewrite",
            },
            match &r.path_rewrite_specifier {
                Some(P::PathRedirect(p)) | Some(P::PrefixRewrite(p)) => json!(p),
                Some(P::RegexRewrite(m)) => {
                    json!({"pattern": m.pattern.as_ref().map(regex), "substitution": m.substitution})
                }
                _ => Value::Null,
            },
        ),
        (
            "response_code",
            match RedirectResponseCode::try_from(r.response_code) {
                Ok(RedirectResponseCode::MovedPermanently) | Err(_) => Value::Null,
                Ok(c) => json!(c.as_str_name()),
            },
        ),
        ("strip_query", json!(r.strip_query)),
    ])
}

#[allow(deprecated)] // renders the deprecated `append` too
fn header_adds(adds: &[envoy_core::HeaderValueOption]) -> Value {
    use envoy_core::header_value_option::HeaderAppendAction as A;
    json!(
        adds.iter()
            .map(|o| object(vec![
                (
                    "header",
                    o.header
                        .as_ref()
                        .map_or(Value::Null, |h| json!({"key": h.key, "value": h.value}))
                ),
                (
                    "append",
                    o.append.as_ref().map_or(Value::Null, |b| json!(b.value))
                ),
                (
                    "append_action",
                    match A::try_from(o.append_action) {
                        Ok(A::AppendIfExistsOrAdd) | Err(_) => Value::Null,
                        Ok(a) => json!(a.as_str_name()),
                    }
                ),
                ("keep_empty_value", json!(o.keep_empty_value)),
            ]))
            .collect::<Vec<_>>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{cla_pb, eds_cluster_pb, http_listener_pb};
    use crate::xds::Versioned;

    #[test]
    fn dump_has_envoy_shape() {
        let mut r = Resources::default();
        let v = |version: &str| version.to_string();
        r.clusters.insert(
            "c".into(),
            Arc::new(Versioned {
                version: v("1"),
                resource: eds_cluster_pb("c"),
            }),
        );
        r.endpoints.insert(
            "c".into(),
            Arc::new(Versioned {
                version: v("2"),
                resource: cla_pb("c", &[("10.0.0.1", 80, true)]),
            }),
        );
        r.listeners.insert(
            "l".into(),
            Arc::new(Versioned {
                version: v("3"),
                resource: http_listener_pb("l", &["10.96.0.1"], 80),
            }),
        );
        let dump = config_dump(&r);
        let configs = dump["configs"].as_array().unwrap();
        assert_eq!(
            configs[0]["@type"],
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"
        );
        let c = &configs[0]["dynamic_active_clusters"][0];
        assert_eq!(c["version_info"], "1");
        assert_eq!(c["cluster"]["type"], "EDS");
        assert_eq!(c["cluster"]["connect_timeout"], "10s");
        let e = &configs[3]["dynamic_endpoint_configs"][0]["endpoint_config"];
        assert_eq!(
            e["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"],
            "10.0.0.1"
        );
        assert_eq!(
            e["endpoints"][0]["lb_endpoints"][0]["health_status"],
            "HEALTHY"
        );
        let l = &configs[1]["dynamic_listeners"][0];
        assert_eq!(l["active_state"]["version_info"], "3");
        let hcm = &l["active_state"]["listener"]["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(hcm["rds"]["route_config_name"], "l");
    }
}
