//! Waypoint translation: a model snapshot → per waypoint Gateway, the Envoy v3 resources (Cluster, ClusterLoadAssignment, Listener, RouteConfiguration) for the services bound to it, from their VirtualServices and DestinationRules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf as pbw;
use envoy_types::util::pack_any;

use crate::cluster_policy;
use crate::k8s::{Pod, Problem, Service, TargetPort};
use crate::model::{Key, Snapshot};
use crate::routing::{
    Body, DerivePort, DestinationRule, HeaderOperations, HttpMatch, HttpRoute, L4Route,
    RouteDestination, StringMatch, TrafficPolicy, VirtualService, service_of_host,
};
use crate::translate::{MeshOptions, Resource, ResourceMap, service_waypoint};

pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The four Envoy types in make-before-break order (updates go in this order, removals in
/// the reverse).
pub const ENVOY_TYPE_URLS: [&str; 4] = [
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
];

/// Dynamic metadata namespace the waypoint fills from the HBONE peer, for sourceLabels /
/// sourceNamespace matches.
pub const SOURCE_METADATA: &str = "istio.source";

/// Envoy's default limit on a direct response body.
const DEFAULT_DIRECT_BODY_LIMIT: usize = 4096;

/// One waypoint's resources, by type.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WaypointResources {
    pub clusters: ResourceMap,
    pub endpoints: ResourceMap,
    pub listeners: ResourceMap,
    pub routes: ResourceMap,
}

/// Every waypoint's resources, by `<namespace>/<gateway name>`.
pub type Waypoints = BTreeMap<String, Arc<WaypointResources>>;

#[derive(Debug, Default)]
pub struct Translation {
    pub waypoints: Waypoints,
    pub problems: Vec<Problem>,
}

/// The `typed_extension_protocol_options` key of a cluster's HTTP upstream options.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Handled as HTTP (L7), by the port's application protocol as the workload API carries it.
fn is_http(p: &crate::k8s::ServicePort) -> bool {
    mesh::state::AppProtocol::of_port(&p.app_protocol, &p.name).is_http()
}

fn fqdn(o: &MeshOptions, ns: &str, name: &str) -> String {
    format!("{name}.{ns}.svc.{}", o.domain)
}

/// What a cluster is made of: the service, its port, and the subset's labels.
#[derive(Debug, Clone)]
struct ClusterSpec {
    service: Key,
    port: u16,
    labels: BTreeMap<String, String>,
    /// The DestinationRule subset, for its traffic policy.
    subset: Option<String>,
}

/// One waypoint being built.
struct Builder<'a> {
    s: &'a Snapshot,
    o: &'a MeshOptions,
    gw: Key,
    /// The services bound to this waypoint.
    bound: BTreeSet<Key>,
    clusters: BTreeMap<String, ClusterSpec>,
    out: WaypointResources,
    problems: Vec<Problem>,
    /// Which AuthorizationPolicies apply to which waypoint and service.
    authz: &'a crate::rbac::Attachments,
    /// The Gateway API routes of every service (`gateway_api.rs`).
    attached: &'a crate::gateway_api::Attached,
    /// While translating a Gateway API rule: a destination that is no known service gets no
    /// cluster (its requests are answered 500, not 503).
    gateway_api_rule: bool,
}

pub fn translate(s: &Snapshot, o: &MeshOptions) -> Translation {
    let mut t = Translation::default();
    let authz = crate::rbac::attachments(s, o);
    t.problems.extend(authz.problems.iter().cloned());
    let attached = crate::gateway_api::attach(s, &o.domain);
    t.problems.extend(attached.problems.iter().cloned());
    let mut bound: BTreeMap<Key, BTreeSet<Key>> = BTreeMap::new();
    for (key, svc) in &s.services {
        if let Some(gw) = service_waypoint(s, svc) {
            bound.entry(gw).or_default().insert(key.clone());
        }
    }
    for (key, gw) in &s.gateways {
        if !gw.is_waypoint() {
            continue;
        }
        let mut b = Builder {
            s,
            o,
            gw: key.clone(),
            bound: bound.remove(key).unwrap_or_default(),
            clusters: BTreeMap::new(),
            out: WaypointResources::default(),
            problems: vec![],
            authz: &authz,
            attached: &attached,
            gateway_api_rule: false,
        };
        b.build();
        t.problems.extend(b.problems);
        t.waypoints
            .insert(format!("{}/{}", key.0, key.1), Arc::new(b.out));
    }
    // A problem found on every port of a service is reported once.
    t.problems.sort();
    t.problems.dedup();
    t
}

/// `inbound-vip|<port>|<kind>[/<subset>]|<fqdn>`.
fn inbound_name(port: u16, http: bool, subset: Option<&str>, fqdn: &str) -> String {
    let kind = if http { "http" } else { "tcp" };
    match subset {
        Some(s) => format!("inbound-vip|{port}|{kind}/{s}|{fqdn}"),
        None => format!("inbound-vip|{port}|{kind}|{fqdn}"),
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn socket_address(ip: IpAddr, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                port,
            ))),
            ..Default::default()
        })),
    }
}

fn duration(d: Duration) -> pbw::Duration {
    pbw::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn regex(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.to_string(),
        engine_type: None,
    }
}

fn string_matcher(m: &StringMatch) -> Option<matcher::StringMatcher> {
    use matcher::string_matcher::MatchPattern;
    let p = match m {
        StringMatch::Exact(v) => MatchPattern::Exact(v.clone()),
        StringMatch::Prefix(v) => MatchPattern::Prefix(v.clone()),
        StringMatch::Regex(v) => MatchPattern::SafeRegex(regex(v)),
        StringMatch::Present => return None,
    };
    Some(matcher::StringMatcher {
        ignore_case: false,
        match_pattern: Some(p),
    })
}

fn header_matcher(name: &str, m: &StringMatch, invert: bool) -> route::HeaderMatcher {
    use route::header_matcher::HeaderMatchSpecifier;
    let spec = match string_matcher(m) {
        Some(sm) => HeaderMatchSpecifier::StringMatch(sm),
        None => HeaderMatchSpecifier::PresentMatch(true),
    };
    route::HeaderMatcher {
        name: name.to_string(),
        invert_match: invert,
        // "Without header x matching v" also holds when x is missing.
        treat_missing_header_as_empty: invert && !matches!(m, StringMatch::Present),
        header_match_specifier: Some(spec),
    }
}

fn source_matcher(path: &[&str], value: &str) -> matcher::MetadataMatcher {
    use matcher::metadata_matcher::{PathSegment, path_segment::Segment};
    matcher::MetadataMatcher {
        filter: SOURCE_METADATA.to_string(),
        path: path
            .iter()
            .map(|k| PathSegment {
                segment: Some(Segment::Key(k.to_string())),
            })
            .collect(),
        value: Some(matcher::ValueMatcher {
            match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(
                matcher::StringMatcher {
                    ignore_case: false,
                    match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                        value.to_string(),
                    )),
                },
            )),
        }),
        invert: false,
    }
}

/// Envoy's form of one HTTPMatchRequest (`None`: the whole request, a catch-all).
pub fn route_match(m: Option<&HttpMatch>) -> route::RouteMatch {
    use route::route_match::PathSpecifier;
    let Some(m) = m else {
        return route::RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        };
    };
    let path = match &m.uri {
        None | Some(StringMatch::Present) => PathSpecifier::Prefix("/".into()),
        Some(StringMatch::Exact(p)) => PathSpecifier::Path(p.clone()),
        Some(StringMatch::Prefix(p)) => PathSpecifier::Prefix(p.clone()),
        Some(StringMatch::Regex(r)) => PathSpecifier::SafeRegex(regex(r)),
    };
    let mut dynamic_metadata: Vec<_> = m
        .source_labels
        .iter()
        .map(|(k, v)| source_matcher(&["labels", k], v))
        .collect();
    if let Some(ns) = &m.source_namespace {
        dynamic_metadata.push(source_matcher(&["namespace"], ns));
    }
    let mut headers = Vec::new();
    for (name, v) in [
        (":scheme", &m.scheme),
        (":method", &m.method),
        (":authority", &m.authority),
    ] {
        if let Some(v) = v {
            headers.push(header_matcher(name, v, false));
        }
    }
    for (name, v) in &m.headers {
        // These are the dedicated fields' business (Istio ignores them here). `@request.auth.
        // claims.*` keys match JWT claims, which need RequestAuthentication: not supported yet,
        // so such a condition never matches (fails closed) rather than being dropped.
        if matches!(name.as_str(), "uri" | "scheme" | "method" | "authority") {
            continue;
        }
        if name.starts_with('@') {
            dynamic_metadata.push(source_matcher(&["unsupported", name], "jwt-claims"));
            continue;
        }
        headers.push(header_matcher(name, v, false));
    }
    for (name, v) in &m.without_headers {
        headers.push(header_matcher(name, v, true));
    }
    let query_parameters = m
        .query_params
        .iter()
        .map(|(name, v)| {
            use route::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
            route::QueryParameterMatcher {
                name: name.clone(),
                query_parameter_match_specifier: Some(match string_matcher(v) {
                    Some(sm) => Q::StringMatch(sm),
                    None => Q::PresentMatch(true),
                }),
            }
        })
        .collect();
    let regex_path = matches!(m.uri, Some(StringMatch::Regex(_)));
    route::RouteMatch {
        // Istio: case-insensitive for exact and prefix only.
        case_sensitive: (m.ignore_uri_case && !regex_path)
            .then_some(pbw::BoolValue { value: false }),
        headers,
        query_parameters,
        dynamic_metadata,
        path_specifier: Some(path),
        ..Default::default()
    }
}

/// A match that takes every request: nothing after it can match.
fn is_catch_all(m: Option<&HttpMatch>) -> bool {
    let Some(m) = m else { return true };
    let uri_all = match &m.uri {
        None => true,
        Some(StringMatch::Prefix(p)) => p == "/" || p.is_empty(),
        Some(StringMatch::Regex(r)) => r == "*" || r == ".*",
        _ => false,
    };
    uri_all
        && m.scheme.is_none()
        && m.method.is_none()
        && m.authority.is_none()
        && m.headers.is_empty()
        && m.without_headers.is_empty()
        && m.query_params.is_empty()
        && m.source_labels.is_empty()
        && m.source_namespace.is_none()
}

/// Header operations: `set` overwrites, `add` appends; pseudo-headers are dropped, and a
/// request `host`/`:authority` becomes the host rewrite (returned).
struct HeaderMutations {
    add: Vec<core::HeaderValueOption>,
    remove: Vec<String>,
    host: Option<String>,
}

fn header_mutations(ops: &HeaderOperations, request: bool) -> HeaderMutations {
    let mut out = HeaderMutations {
        add: vec![],
        remove: vec![],
        host: None,
    };
    let mut push =
        |k: &String, v: &String, action: core::header_value_option::HeaderAppendAction| {
            let lower = k.to_ascii_lowercase();
            if request && (lower == "host" || lower == ":authority") {
                out.host = Some(v.clone());
                return;
            }
            if lower.starts_with(':') {
                return;
            }
            out.add.push(core::HeaderValueOption {
                header: Some(core::HeaderValue {
                    key: k.clone(),
                    value: v.clone(),
                    raw_value: vec![],
                }),
                append_action: action as i32,
                ..Default::default()
            });
        };
    use core::header_value_option::HeaderAppendAction as A;
    for (k, v) in &ops.set {
        push(k, v, A::OverwriteIfExistsOrAdd);
    }
    for (k, v) in &ops.add {
        push(k, v, A::AppendIfExistsOrAdd);
    }
    out.remove = ops
        .remove
        .iter()
        .filter(|k| !k.starts_with(':'))
        .cloned()
        .collect();
    out
}

fn redirect_code(code: Option<u32>) -> i32 {
    use route::redirect_action::RedirectResponseCode as C;
    (match code.unwrap_or(301) {
        302 => C::Found,
        303 => C::SeeOther,
        307 => C::TemporaryRedirect,
        308 => C::PermanentRedirect,
        _ => C::MovedPermanently,
    }) as i32
}

impl Builder<'_> {
    fn gw_name(&self) -> String {
        format!("{}/{}", self.gw.0, self.gw.1)
    }

    fn problem(&mut self, object: String, field: &str, reason: String) {
        self.problems.push(Problem {
            file: String::new(),
            object,
            field: field.to_string(),
            reason: format!("{reason} (waypoint {})", self.gw_name()),
        });
    }

    /// Add problems not yet reported (a policy meets every listener it applies to).
    fn problems_once(&mut self, problems: Vec<Problem>) {
        for p in problems {
            if !self.problems.contains(&p) {
                self.problems.push(p);
            }
        }
    }

    fn build(&mut self) {
        let bound: Vec<Key> = self.bound.iter().cloned().collect();
        for key in bound {
            let Some(svc) = self.s.services.get(&key) else {
                continue;
            };
            let Some((&vip, others)) = svc.cluster_ips.split_first() else {
                // Headless: no address for a client to dial, so nothing to listen for.
                continue;
            };
            let host = fqdn(self.o, &key.0, &key.1);
            for p in &svc.ports {
                let http = is_http(p);
                let name = inbound_name(p.port, http, None, &host);
                self.want_cluster(name.clone(), &key, p.port, BTreeMap::new(), None);
                for (subset, labels) in self.subsets(svc) {
                    self.want_cluster(
                        inbound_name(p.port, http, Some(&subset), &host),
                        &key,
                        p.port,
                        labels,
                        Some(&subset),
                    );
                }
                let policies = self.authz.for_listener(self.s, &self.gw, &key);
                let filters = if http {
                    self.http_routes(svc, p.port, &name);
                    let (rbac, problems) = crate::rbac::http_filters(self.s, &policies, p.port);
                    self.problems_once(problems);
                    let xfcc = self
                        .s
                        .gateways
                        .get(&self.gw)
                        .is_some_and(|g| g.xfcc_client_identity);
                    vec![http_filter(&name, rbac, xfcc)]
                } else {
                    let (mut filters, problems) =
                        crate::rbac::network_filters(self.s, &policies, p.port);
                    self.problems_once(problems);
                    let tcp = self.tcp_proxy(svc, p.port, &name);
                    filters.push(listener::Filter {
                        name: "envoy.filters.network.tcp_proxy".into(),
                        config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(tcp))),
                    });
                    filters
                };
                let l = listener::Listener {
                    name: name.clone(),
                    address: Some(socket_address(vip, p.port)),
                    additional_addresses: others
                        .iter()
                        .map(|ip| listener::AdditionalAddress {
                            address: Some(socket_address(*ip, p.port)),
                            ..Default::default()
                        })
                        .collect(),
                    // The waypoint serves these addresses inside HBONE tunnels; nothing binds them.
                    bind_to_port: Some(pbw::BoolValue { value: false }),
                    filter_chains: vec![listener::FilterChain {
                        filters,
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                self.out
                    .listeners
                    .insert(name.clone(), Resource::new(name, &l));
            }
        }
        let clusters = std::mem::take(&mut self.clusters);
        for (name, spec) in clusters {
            let policy = self.traffic_policy(&spec);
            let mut c = cluster::Cluster {
                name: name.clone(),
                cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
                    cluster::cluster::DiscoveryType::Eds as i32,
                )),
                eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
                    service_name: name.clone(),
                    eds_config: Some(ads()),
                }),
                lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
                connect_timeout: Some(duration(cluster_policy::DEFAULT_CONNECT_TIMEOUT)),
                ..Default::default()
            };
            let mut options = self.protocol_options(&spec);
            cluster_policy::apply(&mut c, &mut options, &policy);
            c.typed_extension_protocol_options = options
                .map(|o| [(HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(o))].into())
                .unwrap_or_default();
            if let Some(t) = &policy.tls {
                match cluster_policy::transport_socket(t, std::path::Path::new("")) {
                    Ok(socket) => c.transport_socket = socket,
                    Err(e) => self.problem(
                        format!("DestinationRule for {}/{}", spec.service.0, spec.service.1),
                        "spec.trafficPolicy.tls",
                        format!("{e}; cluster {name} has no TLS"),
                    ),
                }
            }
            let original_dst = cluster_policy::is_original_dst(&c);
            self.out
                .clusters
                .insert(name.clone(), Resource::new(name.clone(), &c));
            if !original_dst {
                let cla = self.load_assignment(&name, &spec);
                self.out
                    .endpoints
                    .insert(name.clone(), Resource::new(name, &cla));
            }
        }
    }

    fn want_cluster(
        &mut self,
        name: String,
        svc: &Key,
        port: u16,
        labels: BTreeMap<String, String>,
        subset: Option<&str>,
    ) {
        self.clusters.entry(name).or_insert(ClusterSpec {
            service: svc.clone(),
            port,
            labels,
            subset: subset.map(str::to_string),
        });
    }

    /// The DestinationRules for a service, by (namespace, name): in the service's, the
    /// waypoint's or the root namespace, visible from the waypoint, whose host is the service.
    /// (Istio merges several; here the first top-level traffic policy applies, and the first
    /// subset of a name.)
    fn destination_rules(&self, svc: &Key) -> impl Iterator<Item = &DestinationRule> {
        let want = (svc.1.clone(), svc.0.clone());
        self.s.destination_rules.values().filter(move |dr| {
            let ns = &dr.meta.namespace;
            (ns == &svc.0 || ns == &self.gw.0 || ns == &self.o.root_namespace)
                && self.visible(ns, &dr.export_to)
                && service_of_host(&dr.host, ns).as_ref() == Some(&want)
        })
    }

    /// A cluster's traffic policy: the DestinationRule's top level for the port, with the
    /// subset's merged over it (Istio's `MergeTrafficPolicy`).
    fn traffic_policy(&self, spec: &ClusterSpec) -> TrafficPolicy {
        let top = self
            .destination_rules(&spec.service)
            .find_map(|dr| dr.traffic_policy.as_deref());
        let subset = spec.subset.as_ref().and_then(|name| {
            self.destination_rules(&spec.service)
                .flat_map(|d| d.subsets.iter())
                .find(|s| &s.name == name)
                .and_then(|s| s.traffic_policy.as_deref())
        });
        TrafficPolicy::merged(top, subset, spec.port)
    }

    /// The route `hash_policy` for a cluster whose policy hashes consistently.
    fn hash_policy(&self, cluster: &str) -> Vec<route::route_action::HashPolicy> {
        self.clusters
            .get(cluster)
            .map(|spec| cluster_policy::hash_policy(&self.traffic_policy(spec)))
            .unwrap_or_default()
    }

    /// Whether a namespaced object with `export_to` is visible from the waypoint's namespace.
    fn visible(&self, ns: &str, export_to: &[String]) -> bool {
        export_to.is_empty()
            || export_to
                .iter()
                .any(|e| e == "*" || e == &self.gw.0 || (e == "." && ns == self.gw.0))
    }

    /// The DestinationRule subsets for a service: rules in the service's, the waypoint's or
    /// the root namespace, visible from the waypoint, whose host is the service.
    fn subsets(&self, svc: &Service) -> Vec<(String, BTreeMap<String, String>)> {
        let want = (svc.meta.name.clone(), svc.meta.namespace.clone());
        let mut out: Vec<(String, BTreeMap<String, String>)> = Vec::new();
        for dr in self.s.destination_rules.values() {
            let ns = &dr.meta.namespace;
            let scope =
                ns == &svc.meta.namespace || ns == &self.gw.0 || ns == &self.o.root_namespace;
            if !scope
                || !self.visible(ns, &dr.export_to)
                || service_of_host(&dr.host, ns).as_ref() != Some(&want)
            {
                continue;
            }
            for s in &dr.subsets {
                if !out.iter().any(|(n, _)| n == &s.name) {
                    out.push((s.name.clone(), s.labels.clone()));
                }
            }
        }
        out
    }

    /// The service a host names, if it is one in the snapshot.
    fn service_for_host(&self, host: &str, ns: &str) -> Option<&Service> {
        let (name, ns) = service_of_host(host, ns)?;
        self.s.services.get(&(ns, name))
    }

    /// The VirtualServices that apply to a service, in order: a host naming the service, in
    /// the service's or the waypoint's namespace, visible from the waypoint, for `mesh`.
    fn virtual_services(&self, svc: &Service) -> Vec<&VirtualService> {
        let host = fqdn(self.o, &svc.meta.namespace, &svc.meta.name);
        let want = (svc.meta.name.clone(), svc.meta.namespace.clone());
        self.s
            .virtual_services
            .values()
            .filter(|vs| {
                let ns = &vs.meta.namespace;
                (ns == &svc.meta.namespace || ns == &self.gw.0)
                    && self.visible(ns, &vs.export_to)
                    && (vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh"))
                    && vs.hosts.iter().any(|h| {
                        h == "*"
                            || h.strip_prefix('*')
                                .is_some_and(|suffix| host.ends_with(suffix))
                            || service_of_host(h, ns).as_ref() == Some(&want)
                    })
            })
            .collect()
    }

    /// Where a service's HTTP routes come from: its Gateway API routes when it has any (the
    /// VirtualServices that would apply are then reported and not applied), else its
    /// VirtualServices.
    fn route_sources(&mut self, svc: &Service) -> Vec<VirtualService> {
        let key = (svc.meta.namespace.clone(), svc.meta.name.clone());
        let vss: Vec<VirtualService> = self.virtual_services(svc).into_iter().cloned().collect();
        let Some(routes) = self.attached.by_service.get(&key) else {
            return vss;
        };
        let names: BTreeSet<String> = routes
            .iter()
            .map(|r| format!("{}/{}", r.meta.namespace, r.meta.name))
            .collect();
        let names = names.into_iter().collect::<Vec<_>>().join(", ");
        let routes = routes.clone();
        for vs in &vss {
            self.problem(
                format!("VirtualService {}/{}", vs.meta.namespace, vs.meta.name),
                "spec.hosts",
                format!(
                    "service {}/{} also has Gateway API routes ({names}): they decide its HTTP routing and this VirtualService is not applied to it (mixing the two is not supported)",
                    key.0, key.1
                ),
            );
        }
        routes
    }

    /// The cluster a route destination goes to, creating it when needed: this waypoint's
    /// `inbound-vip|…` for a service bound to it, else `outbound|<port>|<subset>|<fqdn>`.
    fn destination_cluster(
        &mut self,
        d: &RouteDestination,
        vs_ns: &str,
        here: (&Service, u16),
    ) -> String {
        let dest = &d.destination;
        let target = self
            .service_for_host(&dest.host, vs_ns)
            .map(|s| (s.meta.namespace.clone(), s.meta.name.clone()));
        let Some(key) = target else {
            // Not a service we know: a cluster without endpoints (503s, as Istio's unknown host).
            let port = dest.port.unwrap_or(here.1);
            let name = format!(
                "outbound|{port}|{}|{}",
                dest.subset.as_deref().unwrap_or(""),
                dest.host
            );
            if self.gateway_api_rule {
                // A Gateway API backend that does not resolve: no cluster, so 500.
                return name;
            }
            self.want_cluster(
                name.clone(),
                &(String::new(), String::new()),
                port,
                BTreeMap::new(),
                dest.subset.as_deref(),
            );
            return name;
        };
        let svc = &self.s.services[&key];
        let port = dest
            .port
            .or_else(|| (svc.ports.len() == 1).then(|| svc.ports[0].port))
            .unwrap_or(here.1);
        let labels = match &dest.subset {
            None => BTreeMap::new(),
            Some(subset) => self
                .subsets(svc)
                .into_iter()
                .find(|(n, _)| n == subset)
                .map(|(_, l)| l)
                .unwrap_or_default(),
        };
        let host = fqdn(self.o, &key.0, &key.1);
        let name = if self.bound.contains(&key) {
            let http = svc
                .ports
                .iter()
                .find(|p| p.port == port)
                .map(is_http)
                .unwrap_or(true);
            inbound_name(port, http, dest.subset.as_deref(), &host)
        } else {
            format!(
                "outbound|{port}|{}|{host}",
                dest.subset.as_deref().unwrap_or("")
            )
        };
        self.want_cluster(name.clone(), &key, port, labels, dest.subset.as_deref());
        name
    }

    /// The endpoints of a cluster: the ready-or-not pods the service selects (and the subset's
    /// labels), at the port's target; one address per pod (IPv4 first).
    /// The protocol spoken to the endpoints: HTTP/2 for an HTTP/2 or gRPC port (as Istio's
    /// clusters for such ports); for an `http` port the client's own protocol
    /// (`use_downstream_protocol_config`), so an HTTP/1.1 app is never sent h2c and an h2
    /// client keeps h2 end to end (Istio's default would downgrade it to HTTP/1.1; its
    /// DestinationRule `useClientProtocol` is what we do by default). TCP ports: none.
    fn protocol_options(&self, spec: &ClusterSpec) -> Option<http_options::HttpProtocolOptions> {
        use http_options::http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig,
            explicit_http_config::ProtocolConfig,
        };
        use mesh::state::AppProtocol;
        let protocol = self
            .s
            .services
            .get(&spec.service)
            .and_then(|svc| svc.ports.iter().find(|p| p.port == spec.port))
            .map(|p| AppProtocol::of_port(&p.app_protocol, &p.name));
        let upstream = match protocol {
            Some(AppProtocol::Http2 | AppProtocol::Grpc) => {
                UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Default::default())),
                })
            }
            Some(AppProtocol::Http11) => {
                UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
                    http_protocol_options: Some(Default::default()),
                    http2_protocol_options: Some(Default::default()),
                    http3_protocol_options: None,
                })
            }
            _ => return None,
        };
        Some(http_options::HttpProtocolOptions {
            upstream_protocol_options: Some(upstream),
            ..Default::default()
        })
    }

    fn load_assignment(&self, name: &str, spec: &ClusterSpec) -> endpoint::ClusterLoadAssignment {
        let mut lb_endpoints = Vec::new();
        if let Some(svc) = self.s.services.get(&spec.service)
            && let Some(selector) = &svc.selector
            && let Some(port) = svc.ports.iter().find(|p| p.port == spec.port)
        {
            let ns = &svc.meta.namespace;
            let pods = self
                .s
                .pods
                .range((ns.clone(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, p)| p);
            for pod in pods {
                if pod.host_network
                    || !selects(selector, &pod.meta.labels)
                    || !selects(&spec.labels, &pod.meta.labels)
                {
                    continue;
                }
                let Some(ip) = pod
                    .ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .or_else(|| pod.ips.first())
                else {
                    continue;
                };
                let target = match &port.target {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(n) => match pod.named_ports.get(n) {
                        Some(p) => *p,
                        None => continue,
                    },
                };
                lb_endpoints.push(lb_endpoint(self.o, pod, *ip, target));
            }
        }
        endpoint::ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: if lb_endpoints.is_empty() {
                vec![]
            } else {
                vec![endpoint::LocalityLbEndpoints {
                    lb_endpoints,
                    ..Default::default()
                }]
            },
            ..Default::default()
        }
    }

    /// The HTTP routes of one service port, as its RouteConfiguration.
    fn http_routes(&mut self, svc: &Service, port: u16, name: &str) {
        let mut routes = Vec::new();
        let mut body_limit = DEFAULT_DIRECT_BODY_LIMIT;
        let vss: Vec<VirtualService> = self.route_sources(svc);
        'all: for vs in &vss {
            for (i, r) in self.http_rules(vs).iter().enumerate() {
                let object = format!("VirtualService {}/{}", vs.meta.namespace, vs.meta.name);
                let matches: Vec<Option<&HttpMatch>> = if r.matches.is_empty() {
                    vec![None]
                } else {
                    r.matches
                        .iter()
                        .filter(|m| m.port.is_none_or(|p| p == port))
                        .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
                        .map(Some)
                        .collect()
                };
                for m in matches {
                    let route_name = match (r.name.as_str(), m.map(|m| m.name.as_str())) {
                        (n, Some(mn)) if !n.is_empty() && !mn.is_empty() => format!("{n}.{mn}"),
                        ("", Some(mn)) => mn.to_string(),
                        (n, _) => n.to_string(),
                    };
                    if let Some(d) = &r.direct_response
                        && let Some(b) = &d.body
                    {
                        let len = match b {
                            Body::String(s) => s.len(),
                            Body::Bytes(b) => b.len(),
                        };
                        body_limit = body_limit.max(len);
                    }
                    self.gateway_api_rule = r.gateway_api;
                    let built = self.route(r, m, &vs.meta.namespace, (svc, port));
                    self.gateway_api_rule = false;
                    match built {
                        Some(mut rt) => {
                            if r.gateway_api {
                                crate::gateway_api::envoy_semantics(&mut rt);
                            }
                            rt.name = route_name;
                            rt.typed_per_filter_config = crate::route_policy::per_filter_config(r);
                            if let Some(sp) = m.and_then(|m| m.stat_prefix.clone()) {
                                rt.stat_prefix = sp;
                            }
                            routes.push(rt);
                        }
                        None => {
                            self.problem(
                                object.clone(),
                                &format!("spec.http[{i}]"),
                                "has no destination with weight; left out".into(),
                            );
                            continue;
                        }
                    }
                    if is_catch_all(m) {
                        break 'all;
                    }
                }
            }
        }
        // As Istio's waypoint: where a VirtualService gives routes, a request none of them
        // matches is answered 404 (route not found); the service's default route is only for
        // ports no VirtualService routes.
        if routes.is_empty() {
            let host = fqdn(self.o, &svc.meta.namespace, &svc.meta.name);
            let cluster = inbound_name(port, true, None, &host);
            routes.push(route::Route {
                name: "default".into(),
                r#match: Some(route_match(None)),
                action: Some(route::route::Action::Route(route::RouteAction {
                    hash_policy: self.hash_policy(&cluster),
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        cluster,
                    )),
                    timeout: Some(duration(Duration::ZERO)),
                    retry_policy: crate::route_policy::retry_policy(None, false),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
        let rc = route::RouteConfiguration {
            name: name.to_string(),
            virtual_hosts: vec![route::VirtualHost {
                name: format!("inbound|http|{port}"),
                domains: vec!["*".into()],
                routes,
                // As Istio: the upstream sees `x-envoy-attempt-count` (1, 2, … with retries).
                include_request_attempt_count: true,
                ..Default::default()
            }],
            validate_clusters: Some(pbw::BoolValue { value: false }),
            max_direct_response_body_size_bytes: (body_limit > DEFAULT_DIRECT_BODY_LIMIT)
                .then_some(pbw::UInt32Value {
                    value: body_limit as u32,
                }),
            ..Default::default()
        };
        self.out
            .routes
            .insert(name.to_string(), Resource::new(name.to_string(), &rc));
    }

    /// A VirtualService's HTTP rules with `delegate` rules replaced by the delegate's rules
    /// (each delegate match combined with the root match: the root's conditions, plus the
    /// delegate's where the root has none).
    fn http_rules(&mut self, vs: &VirtualService) -> Vec<HttpRoute> {
        let mut out = Vec::new();
        for (i, r) in vs.http.iter().enumerate() {
            let Some(d) = &r.delegate else {
                out.push(r.clone());
                continue;
            };
            let ns = if d.namespace.is_empty() {
                vs.meta.namespace.clone()
            } else {
                d.namespace.clone()
            };
            let Some(delegate) = self.s.virtual_services.get(&(ns.clone(), d.name.clone())) else {
                self.problem(
                    format!("VirtualService {}/{}", vs.meta.namespace, vs.meta.name),
                    &format!("spec.http[{i}].delegate"),
                    format!("no VirtualService {ns}/{}; rule left out", d.name),
                );
                continue;
            };
            for dr in &delegate.http {
                let mut merged = dr.clone();
                if !r.matches.is_empty() {
                    let inner: Vec<Option<&HttpMatch>> = if dr.matches.is_empty() {
                        vec![None]
                    } else {
                        dr.matches.iter().map(Some).collect()
                    };
                    merged.matches = r
                        .matches
                        .iter()
                        .flat_map(|root| inner.iter().map(move |m| merge_match(root, *m)))
                        .collect();
                }
                if merged.name.is_empty() {
                    merged.name = r.name.clone();
                }
                out.push(merged);
            }
        }
        out
    }

    /// One Envoy route for a rule and one of its matches; `None` when every destination has
    /// weight 0.
    fn route(
        &mut self,
        r: &HttpRoute,
        m: Option<&HttpMatch>,
        vs_ns: &str,
        here: (&Service, u16),
    ) -> Option<route::Route> {
        let request = header_mutations(&r.headers.request, true);
        let response = header_mutations(&r.headers.response, false);
        let action = if let Some(rd) = &r.redirect {
            use route::redirect_action::{PathRewriteSpecifier, SchemeRewriteSpecifier};
            // As Istio: Envoy cannot take the port from the request, but these routes serve one
            // service port, so FROM_REQUEST_PORT is that port; FROM_PROTOCOL_DEFAULT is no
            // port (Envoy's own behaviour); and a port that is the scheme's default is left out
            // (no explicit `:80` / `:443` in the location).
            let mut port_redirect = match (rd.port, rd.derive_port) {
                (Some(p), _) => u32::from(p),
                (None, Some(DerivePort::FromRequestPort)) => u32::from(here.1),
                _ => 0,
            };
            let scheme = rd.scheme.as_deref().unwrap_or("http");
            if (port_redirect == 80 && scheme == "http")
                || (port_redirect == 443 && scheme == "https")
            {
                port_redirect = 0;
            }
            route::route::Action::Redirect(route::RedirectAction {
                host_redirect: rd.authority.clone().unwrap_or_default(),
                port_redirect,
                response_code: redirect_code(rd.redirect_code),
                scheme_rewrite_specifier: rd
                    .scheme
                    .clone()
                    .map(SchemeRewriteSpecifier::SchemeRedirect),
                path_rewrite_specifier: rd.uri.clone().map(PathRewriteSpecifier::PathRedirect),
                ..Default::default()
            })
        } else if let Some(d) = &r.direct_response {
            use core::data_source::Specifier;
            route::route::Action::DirectResponse(route::DirectResponseAction {
                status: d.status,
                body: d.body.as_ref().map(|b| core::DataSource {
                    specifier: Some(match b {
                        Body::String(s) => Specifier::InlineString(s.clone()),
                        Body::Bytes(b) => Specifier::InlineBytes(b.clone()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
        } else {
            use route::route_action::ClusterSpecifier;
            // Weight-0 destinations take nothing: left out (a lone destination takes all).
            let dests: Vec<&RouteDestination> = if r.route.len() == 1 {
                r.route.iter().collect()
            } else {
                r.route
                    .iter()
                    .filter(|d| d.weight.unwrap_or(0) > 0)
                    .collect()
            };
            if dests.is_empty() {
                return None;
            }
            let mut action = route::RouteAction {
                timeout: Some(duration(r.timeout.unwrap_or(Duration::ZERO))),
                retry_policy: crate::route_policy::retry_policy(r.retries.as_ref(), false),
                ..Default::default()
            };
            for m in &r.mirrors {
                let d = RouteDestination {
                    destination: m.destination.clone(),
                    ..Default::default()
                };
                let cluster = self.destination_cluster(&d, vs_ns, here);
                action
                    .request_mirror_policies
                    .extend(crate::route_policy::mirror_policy(cluster, m.per_million));
            }
            let mut host = request.host.clone();
            if dests.len() == 1 {
                let d = dests[0];
                let cluster = self.destination_cluster(d, vs_ns, here);
                action.hash_policy = self.hash_policy(&cluster);
                action.cluster_specifier = Some(ClusterSpecifier::Cluster(cluster));
                // A lone destination's header operations apply as the route's.
                let dreq = header_mutations(&d.headers.request, true);
                let dresp = header_mutations(&d.headers.response, false);
                host = dreq.host.clone().or(host);
                return Some(finish(
                    m,
                    action_with_rewrite(action, r, host),
                    [request, dreq],
                    [response, dresp],
                ));
            }
            let clusters: Vec<route::weighted_cluster::ClusterWeight> = dests
                .iter()
                .map(|d| {
                    let dreq = header_mutations(&d.headers.request, true);
                    let dresp = header_mutations(&d.headers.response, false);
                    route::weighted_cluster::ClusterWeight {
                        name: self.destination_cluster(d, vs_ns, here),
                        weight: Some(pbw::UInt32Value {
                            value: d.weight.unwrap_or(0),
                        }),
                        request_headers_to_add: dreq.add,
                        request_headers_to_remove: dreq.remove,
                        response_headers_to_add: dresp.add,
                        response_headers_to_remove: dresp.remove,
                        host_rewrite_specifier: dreq.host.map(
                            route::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral,
                        ),
                        ..Default::default()
                    }
                })
                .collect();
            // As for one destination, the hash policy of the cluster (the first that has one).
            action.hash_policy = clusters
                .iter()
                .map(|c| self.hash_policy(&c.name))
                .find(|h| !h.is_empty())
                .unwrap_or_default();
            action.cluster_specifier =
                Some(ClusterSpecifier::WeightedClusters(route::WeightedCluster {
                    clusters,
                    ..Default::default()
                }));
            return Some(finish(
                m,
                action_with_rewrite(action, r, host),
                [request, empty()],
                [response, empty()],
            ));
        };
        Some(finish(m, action, [request, empty()], [response, empty()]))
    }

    /// The tcp_proxy of a TCP service port: the first `tcp` rule whose match names this port
    /// (or that has no match) decides; else the port's own cluster.
    fn tcp_proxy(&mut self, svc: &Service, port: u16, name: &str) -> tcp::TcpProxy {
        let host = fqdn(self.o, &svc.meta.namespace, &svc.meta.name);
        let vss: Vec<VirtualService> = self.virtual_services(svc).into_iter().cloned().collect();
        // As Istio's waypoint: a `tls` rule counts when it has no match or its SNI hosts are
        // exactly this service (the waypoint cannot look at SNI), and is tried before `tcp`;
        // source selectors never match at L4.
        let applies = |m: &crate::routing::L4Match, tls: bool| {
            m.port.is_none_or(|p| p == port)
                && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
                && m.source_labels.is_empty()
                && m.source_namespace.is_none()
                && (!tls || m.sni_hosts == [host.clone()])
        };
        let first = |rules: &[L4Route], tls: bool| -> Option<L4Route> {
            rules
                .iter()
                .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| applies(m, tls)))
                .cloned()
        };
        let rule: Option<(L4Route, String)> = vss
            .iter()
            .find_map(|vs| first(&vs.tls, true).map(|r| (r, vs.meta.namespace.clone())))
            .or_else(|| {
                vss.iter()
                    .find_map(|vs| first(&vs.tcp, false).map(|r| (r, vs.meta.namespace.clone())))
            });
        let spec = match rule {
            None => {
                tcp::tcp_proxy::ClusterSpecifier::Cluster(inbound_name(port, false, None, &host))
            }
            Some((r, ns)) => {
                let dests: Vec<&RouteDestination> = if r.route.len() == 1 {
                    r.route.iter().collect()
                } else {
                    r.route
                        .iter()
                        .filter(|d| d.weight.unwrap_or(0) > 0)
                        .collect()
                };
                if dests.len() == 1 {
                    tcp::tcp_proxy::ClusterSpecifier::Cluster(self.destination_cluster(
                        dests[0],
                        &ns,
                        (svc, port),
                    ))
                } else {
                    tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(
                        tcp::tcp_proxy::WeightedCluster {
                            clusters: dests
                                .iter()
                                .map(|d| tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                                    name: self.destination_cluster(d, &ns, (svc, port)),
                                    weight: d.weight.unwrap_or(0),
                                    ..Default::default()
                                })
                                .collect(),
                        },
                    )
                }
            }
        };
        // The destination's `connectionPool.tcp.idleTimeout`, which Istio puts on the
        // tcp_proxy (unset: Envoy's 1 h).
        let idle_timeout = match &spec {
            tcp::tcp_proxy::ClusterSpecifier::Cluster(cluster) => self
                .clusters
                .get(cluster)
                .map(|c| self.traffic_policy(c))
                .and_then(|p| p.connection_pool?.tcp?.idle_timeout)
                .map(cluster_policy::duration),
            _ => None,
        };
        tcp::TcpProxy {
            stat_prefix: name.to_string(),
            cluster_specifier: Some(spec),
            idle_timeout,
            ..Default::default()
        }
    }
}

fn empty() -> HeaderMutations {
    HeaderMutations {
        add: vec![],
        remove: vec![],
        host: None,
    }
}

fn action_with_rewrite(
    mut action: route::RouteAction,
    r: &HttpRoute,
    host: Option<String>,
) -> route::route::Action {
    use route::route_action::HostRewriteSpecifier;
    if let Some(rw) = &r.rewrite {
        if let Some(uri) = &rw.uri {
            action.prefix_rewrite = uri.clone();
        }
        if let Some((m, s)) = &rw.uri_regex {
            action.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                pattern: Some(regex(m)),
                substitution: s.clone(),
            });
        }
    }
    let authority = r.rewrite.as_ref().and_then(|rw| rw.authority.clone());
    if let Some(h) = authority.or(host) {
        action.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(h));
    }
    route::route::Action::Route(action)
}

fn finish(
    m: Option<&HttpMatch>,
    action: route::route::Action,
    request: [HeaderMutations; 2],
    response: [HeaderMutations; 2],
) -> route::Route {
    let mut rt = route::Route {
        r#match: Some(route_match(m)),
        action: Some(action),
        ..Default::default()
    };
    for h in request {
        rt.request_headers_to_add.extend(h.add);
        rt.request_headers_to_remove.extend(h.remove);
    }
    for h in response {
        rt.response_headers_to_add.extend(h.add);
        rt.response_headers_to_remove.extend(h.remove);
    }
    rt
}

/// A root (delegating) match combined with a delegate's: the root's conditions, the
/// delegate's filling the ones the root leaves open.
fn merge_match(root: &HttpMatch, inner: Option<&HttpMatch>) -> HttpMatch {
    let Some(d) = inner else {
        return root.clone();
    };
    let mut m = root.clone();
    m.uri = root.uri.clone().or_else(|| d.uri.clone());
    m.scheme = root.scheme.clone().or_else(|| d.scheme.clone());
    m.method = root.method.clone().or_else(|| d.method.clone());
    m.authority = root.authority.clone().or_else(|| d.authority.clone());
    for (k, v) in &d.headers {
        m.headers.entry(k.clone()).or_insert_with(|| v.clone());
    }
    for (k, v) in &d.without_headers {
        m.without_headers
            .entry(k.clone())
            .or_insert_with(|| v.clone());
    }
    for (k, v) in &d.query_params {
        m.query_params.entry(k.clone()).or_insert_with(|| v.clone());
    }
    for (k, v) in &d.source_labels {
        m.source_labels
            .entry(k.clone())
            .or_insert_with(|| v.clone());
    }
    m.source_namespace = root
        .source_namespace
        .clone()
        .or_else(|| d.source_namespace.clone());
    m.port = root.port.or(d.port);
    m.ignore_uri_case = root.ignore_uri_case || d.ignore_uri_case;
    if m.name.is_empty() {
        m.name = d.name.clone();
    }
    m
}

/// The connection manager of an HTTP listener: `before_router` (the RBAC filters), CORS and
/// fault injection, then the router. A client's `x-forwarded-client-cert` is removed (Envoy's
/// default), or replaced with the client's identity when the Gateway asks (`xfcc`).
fn http_filter(name: &str, before_router: Vec<hcm::HttpFilter>, xfcc: bool) -> listener::Filter {
    use hcm::http_connection_manager::{ForwardClientCertDetails, SetCurrentClientCertDetails};
    let manager = hcm::HttpConnectionManager {
        forward_client_cert_details: if xfcc {
            ForwardClientCertDetails::SanitizeSet as i32
        } else {
            ForwardClientCertDetails::Sanitize as i32
        },
        set_current_client_cert_details: xfcc.then(|| SetCurrentClientCertDetails {
            subject: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
            uri: true,
            dns: true,
            ..Default::default()
        }),
        stat_prefix: name.to_string(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: name.to_string(),
            },
        )),
        // Istio's order: the RBAC filters, CORS, fault injection, the router.
        http_filters: before_router
            .into_iter()
            .chain(crate::route_policy::http_filters())
            .chain([hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                    Router::default(),
                ))),
                ..Default::default()
            }])
            .collect(),
        ..Default::default()
    };
    listener::Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(manager))),
    }
}

fn lb_endpoint(o: &MeshOptions, pod: &Pod, ip: IpAddr, port: u16) -> endpoint::LbEndpoint {
    let healthy =
        pod.ready != Some(false) && pod.phase.as_deref().is_none_or(|phase| phase == "Running");
    let uid = pod.meta.uid.clone().unwrap_or_else(|| {
        format!(
            "{}//Pod/{}/{}",
            o.cluster_id, pod.meta.namespace, pod.meta.name
        )
    });
    let istio = pbw::Struct {
        fields: [(
            "workload".to_string(),
            pbw::Value {
                kind: Some(pbw::value::Kind::StringValue(uid)),
            },
        )]
        .into_iter()
        .collect(),
    };
    endpoint::LbEndpoint {
        health_status: if healthy {
            core::HealthStatus::Healthy
        } else {
            core::HealthStatus::Unhealthy
        } as i32,
        metadata: Some(core::Metadata {
            filter_metadata: [("istio".to_string(), istio)].into_iter().collect(),
            ..Default::default()
        }),
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
            endpoint::Endpoint {
                address: Some(socket_address(ip, port)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// A readable, deterministic rendering of every waypoint's resources (golden files, debugging).
pub fn render(waypoints: &Waypoints) -> String {
    use prost::Message;
    use std::fmt::Write as _;
    let mut out = String::new();
    fn each<M: Message + Default + std::fmt::Debug>(
        out: &mut String,
        kind: &str,
        map: &ResourceMap,
    ) {
        for r in map.values() {
            let _ = writeln!(out, "## {kind} {} version {}", r.name, r.version);
            match M::decode(r.body.clone()) {
                Ok(m) => {
                    // Leave out the fields left at their defaults: Envoy's messages have
                    // dozens, and the point is what is set.
                    let text = format!("{m:#?}");
                    let mut lines = text.lines();
                    while let Some(line) = lines.next() {
                        // Bytes (a typed config, decoded further down): their length only.
                        if line.trim_start() == "value: [" {
                            let indent = &line[..line.len() - line.trim_start().len()];
                            let n = lines
                                .by_ref()
                                .take_while(|l| !l.trim_start().starts_with(']'))
                                .count();
                            let _ = writeln!(out, "{indent}value: <{n} bytes>,");
                            continue;
                        }
                        let default = line.trim_start().split_once(": ").is_some_and(|(k, v)| {
                            matches!(v, "None," | "[]," | "{}," | "\"\",")
                                || (matches!(v, "false," | "0,")
                                    && !matches!(k, "value" | "seconds"))
                        });
                        if !default {
                            let _ = writeln!(out, "{line}");
                        }
                    }
                }
                Err(e) => {
                    let _ = writeln!(out, "undecodable: {e}");
                }
            }
        }
    }
    for (name, w) in waypoints {
        let _ = writeln!(out, "# waypoint {name}");
        each::<cluster::Cluster>(&mut out, "Cluster", &w.clusters);
        each::<endpoint::ClusterLoadAssignment>(&mut out, "ClusterLoadAssignment", &w.endpoints);
        each::<listener::Listener>(&mut out, "Listener", &w.listeners);
        // The filters' typed configs, decoded (the listener above shows them as bytes).
        for r in w.listeners.values() {
            let Ok(l) = listener::Listener::decode(r.body.clone()) else {
                continue;
            };
            for f in l.filter_chains.iter().flat_map(|c| c.filters.iter()) {
                let Some(listener::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                let mut one = ResourceMap::new();
                one.insert(
                    r.name.clone(),
                    Arc::new(Resource {
                        name: format!("{} filter {}", r.name, f.name),
                        version: "-".into(),
                        body: any.value.clone().into(),
                        aliases: Vec::new(),
                        node: None,
                    }),
                );
                if any.type_url.ends_with("HttpConnectionManager") {
                    each::<hcm::HttpConnectionManager>(&mut out, "typed_config of", &one);
                } else if any.type_url.ends_with("TcpProxy") {
                    each::<tcp::TcpProxy>(&mut out, "typed_config of", &one);
                }
            }
        }
        each::<route::RouteConfiguration>(&mut out, "RouteConfiguration", &w.routes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::parse_documents;
    use prost::Message;
    use route::route::Action;
    use route::route_action::ClusterSpecifier;

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIPs: [10.96.0.1, "fd00::1"]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: web}, {name: tcp-db, port: 5432, targetPort: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: other}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: uid-web-1, labels: {app: web, version: v1}}
spec: {containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.244.0.5, podIPs: [{ip: 10.244.0.5}, {ip: "fd00:244::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web, version: v2}}
spec: {containers: [{name: c, ports: [{name: web, containerPort: 8081}]}]}
status: {podIP: 10.244.0.6, phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: other-1, namespace: shop, uid: uid-other-1, labels: {app: other}}
status: {podIP: 10.244.0.7}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec: {host: web, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}
"#;

    fn waypoint(extra: &str) -> (WaypointResources, Vec<Problem>) {
        let p = parse_documents(&format!("{BASE}---\n{extra}"), "t.yaml");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let s = Snapshot::build(p.objects, vec![]);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let t = translate(&s, &MeshOptions::default());
        let w = t.waypoints["shop/waypoint"].as_ref().clone();
        (w, t.problems)
    }

    const WEB_HTTP: &str = "inbound-vip|80|http|web.shop.svc.cluster.local";
    const WEB_TCP: &str = "inbound-vip|5432|tcp|web.shop.svc.cluster.local";

    fn routes(w: &WaypointResources) -> Vec<route::Route> {
        let rc = route::RouteConfiguration::decode(w.routes[WEB_HTTP].body.clone()).unwrap();
        assert_eq!(rc.virtual_hosts.len(), 1);
        assert_eq!(rc.virtual_hosts[0].name, "inbound|http|80");
        assert_eq!(rc.virtual_hosts[0].domains, ["*"]);
        rc.virtual_hosts[0].routes.clone()
    }

    fn vs(http: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: shop}}\nspec:\n  hosts: [web]\n  http:\n{http}"
        )
    }

    fn action(r: &route::Route) -> &route::RouteAction {
        match r.action.as_ref().unwrap() {
            Action::Route(a) => a,
            other => panic!("not a route action: {other:?}"),
        }
    }

    #[test]
    fn http2_and_grpc_ports_speak_http2_upstream() {
        let (w, problems) = waypoint(
            "apiVersion: v1\nkind: Service\nmetadata: {name: rpc, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{name: grpc, port: 9090}, {name: web, port: 81, appProtocol: kubernetes.io/h2c}, {name: http-x, port: 82}]}\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let h2 = |name: &str| {
            let c = cluster::Cluster::decode(w.clusters[name].body.clone()).unwrap();
            let Some(any) = c
                .typed_extension_protocol_options
                .get(HTTP_PROTOCOL_OPTIONS)
            else {
                return false;
            };
            assert_eq!(
                any.type_url,
                "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            );
            let o = http_options::HttpProtocolOptions::decode(&any.value[..]).unwrap();
            matches!(
                o.upstream_protocol_options,
                Some(http_options::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_options::http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_options::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)
                        )
                    }
                ))
            )
        };
        assert!(h2("inbound-vip|9090|http|rpc.shop.svc.cluster.local"));
        assert!(h2("inbound-vip|81|http|rpc.shop.svc.cluster.local"));
        assert!(!h2("inbound-vip|82|http|rpc.shop.svc.cluster.local"));
        assert!(!h2(WEB_HTTP), "HTTP/1.1 (Envoy's default) for http ports");
    }

    #[test]
    fn clusters_endpoints_listeners_without_virtual_services() {
        let (w, problems) = waypoint("");
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<&str> = w.clusters.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "inbound-vip|5432|tcp/v1|web.shop.svc.cluster.local",
                "inbound-vip|5432|tcp/v2|web.shop.svc.cluster.local",
                WEB_TCP,
                "inbound-vip|80|http/v1|web.shop.svc.cluster.local",
                "inbound-vip|80|http/v2|web.shop.svc.cluster.local",
                WEB_HTTP,
            ]
        );
        assert_eq!(
            w.endpoints.keys().collect::<Vec<_>>(),
            w.clusters.keys().collect::<Vec<_>>()
        );
        let c = cluster::Cluster::decode(w.clusters[WEB_HTTP].body.clone()).unwrap();
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::cluster::ClusterDiscoveryType::Type(
                cluster::cluster::DiscoveryType::Eds as i32
            ))
        );
        let eds = c.eds_cluster_config.unwrap();
        assert_eq!(eds.service_name, WEB_HTTP);
        assert!(matches!(
            eds.eds_config.unwrap().config_source_specifier,
            Some(core::config_source::ConfigSourceSpecifier::Ads(_))
        ));
        assert_eq!(c.connect_timeout.unwrap().seconds, 10);
        assert_eq!(c.lb_policy, cluster::cluster::LbPolicy::RoundRobin as i32);

        // Endpoints: named target port resolved per pod, IPv4 preferred, health, workload uid.
        let cla =
            endpoint::ClusterLoadAssignment::decode(w.endpoints[WEB_HTTP].body.clone()).unwrap();
        assert_eq!(cla.cluster_name, WEB_HTTP);
        let eps = &cla.endpoints[0].lb_endpoints;
        let shown: Vec<(String, i32, String)> = eps
            .iter()
            .map(|e| {
                let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
                else {
                    panic!()
                };
                let Some(core::address::Address::SocketAddress(sa)) =
                    &ep.address.as_ref().unwrap().address
                else {
                    panic!()
                };
                let Some(core::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier
                else {
                    panic!()
                };
                let uid =
                    match &e.metadata.as_ref().unwrap().filter_metadata["istio"].fields["workload"]
                        .kind
                    {
                        Some(pbw::value::Kind::StringValue(s)) => s.clone(),
                        _ => panic!(),
                    };
                (format!("{}:{port}", sa.address), e.health_status, uid)
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "10.244.0.5:8080".to_string(),
                    core::HealthStatus::Healthy as i32,
                    "uid-web-1".to_string()
                ),
                (
                    "10.244.0.6:8081".to_string(),
                    core::HealthStatus::Unhealthy as i32,
                    "Kubernetes//Pod/shop/web-2".to_string()
                ),
            ]
        );
        let v1 = endpoint::ClusterLoadAssignment::decode(
            w.endpoints["inbound-vip|80|http/v1|web.shop.svc.cluster.local"]
                .body
                .clone(),
        )
        .unwrap();
        assert_eq!(
            v1.endpoints[0].lb_endpoints.len(),
            1,
            "subset labels filter"
        );

        // Listeners: HTTP with HCM over RDS, TCP with tcp_proxy; both addresses.
        let l = listener::Listener::decode(w.listeners[WEB_HTTP].body.clone()).unwrap();
        assert_eq!(
            l.address,
            Some(socket_address("10.96.0.1".parse().unwrap(), 80))
        );
        assert_eq!(
            l.additional_addresses[0].address,
            Some(socket_address("fd00::1".parse().unwrap(), 80))
        );
        let f = &l.filter_chains[0].filters[0];
        assert_eq!(f.name, "envoy.filters.network.http_connection_manager");
        let Some(listener::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            panic!()
        };
        assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        );
        let m = hcm::HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        assert_eq!(m.stat_prefix, WEB_HTTP);
        let Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) = m.route_specifier else {
            panic!()
        };
        assert_eq!(rds.route_config_name, WEB_HTTP);
        let names: Vec<&str> = m.http_filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "envoy.filters.http.cors",
                "envoy.filters.http.fault",
                "envoy.filters.http.router"
            ],
            "Istio's order"
        );
        let l = listener::Listener::decode(w.listeners[WEB_TCP].body.clone()).unwrap();
        let Some(listener::filter::ConfigType::TypedConfig(any)) =
            &l.filter_chains[0].filters[0].config_type
        else {
            panic!()
        };
        let t = tcp::TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            t.cluster_specifier,
            Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(WEB_TCP.into()))
        );
        assert_eq!(
            w.routes.len(),
            1,
            "a RouteConfiguration for the HTTP port only"
        );

        // Without a VirtualService: the default route only.
        let r = routes(&w);
        assert_eq!(r.len(), 1);
        assert_eq!(
            action(&r[0]).cluster_specifier,
            Some(ClusterSpecifier::Cluster(WEB_HTTP.into()))
        );
    }

    #[test]
    fn match_fields() {
        use route::route_match::PathSpecifier;
        let (w, _) = waypoint(&vs(r#"
  - name: api
    match:
    - name: exact
      uri: {exact: /a}
      ignoreUriCase: true
      scheme: {exact: http}
      method: {prefix: GE}
      authority: {regex: "web.*"}
      headers: {x-user: {exact: jason}, x-any: {}, "@request.auth.claims.group": {exact: a}}
      withoutHeaders: {x-debug: {exact: "1"}}
      queryParams: {v: {regex: "[0-9]+"}, flag: {}}
    - uri: {regex: "/r/.*"}
      port: 80
      sourceLabels: {app: productpage}
      sourceNamespace: shop
    - uri: {prefix: /skipped}
      port: 81
    - uri: {prefix: /ingress-only}
      gateways: [ingress]
    route: [{destination: {host: web}}]
"#));
        let r = routes(&w);
        assert_eq!(r.len(), 2, "two matches kept, no default route: {r:#?}");
        assert_eq!(r[0].name, "api.exact");
        assert_eq!(r[1].name, "api");
        let m0 = r[0].r#match.as_ref().unwrap();
        assert_eq!(m0.path_specifier, Some(PathSpecifier::Path("/a".into())));
        assert_eq!(m0.case_sensitive, Some(pbw::BoolValue { value: false }));
        let hs: Vec<String> = m0
            .headers
            .iter()
            .map(|h| {
                format!(
                    "{}{}{} {:?}",
                    if h.invert_match { "!" } else { "" },
                    h.name,
                    if h.treat_missing_header_as_empty {
                        "(missing=empty)"
                    } else {
                        ""
                    },
                    h.header_match_specifier
                )
            })
            .collect();
        assert_eq!(hs.len(), 6, "{hs:#?}");
        assert!(hs[0].starts_with(":scheme ") && hs[0].contains("Exact(\"http\")"));
        assert!(hs[1].starts_with(":method ") && hs[1].contains("Prefix(\"GE\")"));
        assert!(hs[2].starts_with(":authority ") && hs[2].contains("web.*"));
        assert!(hs[3].starts_with("x-any ") && hs[3].contains("PresentMatch(true)"));
        assert!(hs[4].starts_with("x-user ") && hs[4].contains("jason"));
        assert!(hs[5].starts_with("!x-debug(missing=empty) "));
        assert_eq!(
            m0.dynamic_metadata,
            [source_matcher(
                &["unsupported", "@request.auth.claims.group"],
                "jwt-claims"
            )],
            "JWT claims are not supported yet: never matches"
        );
        let qs: Vec<String> = m0
            .query_parameters
            .iter()
            .map(|q| format!("{} {:?}", q.name, q.query_parameter_match_specifier))
            .collect();
        assert!(qs[0].starts_with("flag ") && qs[0].contains("PresentMatch(true)"));
        assert!(qs[1].starts_with("v ") && qs[1].contains("[0-9]+"));
        let m1 = r[1].r#match.as_ref().unwrap();
        assert!(
            matches!(&m1.path_specifier, Some(PathSpecifier::SafeRegex(re)) if re.regex == "/r/.*")
        );
        assert_eq!(m1.case_sensitive, None);
        assert_eq!(m1.dynamic_metadata.len(), 2);
        assert_eq!(
            m1.dynamic_metadata[0],
            source_matcher(&["labels", "app"], "productpage")
        );
        assert_eq!(m1.dynamic_metadata[1].filter, "istio.source");
        assert_eq!(
            m1.dynamic_metadata[1],
            source_matcher(&["namespace"], "shop")
        );
    }

    #[test]
    fn route_actions_weights_headers_rewrites() {
        let (w, _) = waypoint(&vs(r#"
  - name: split
    match: [{uri: {prefix: /split}}]
    route:
    - destination: {host: web, subset: v1}
      weight: 90
      headers: {request: {set: {x-v: "1", host: v1.web}}, response: {add: {x-r: a}, remove: [x-gone]}}
    - destination: {host: web, subset: v2}
      weight: 10
    - destination: {host: other}
      weight: 0
  - match: [{uri: {prefix: /one}}]
    route: [{destination: {host: other.shop.svc.cluster.local, port: {number: 8080}}}]
    rewrite: {uri: /two, authority: other.internal}
    headers:
      request: {set: {x-a: "1", ":path": /x}, add: {x-b: "2"}, remove: [x-c]}
      response: {set: {x-d: "3"}}
    timeout: 2.5s
  - match: [{uri: {prefix: /re}}]
    route: [{destination: {host: web, subset: v2}}]
    rewrite: {uriRegexRewrite: {match: "^/re/(.*)", rewrite: "/\\1"}}
  - route: [{destination: {host: web}}]
  - route: [{destination: {host: other}}]
"#));
        let r = routes(&w);
        assert_eq!(
            r.len(),
            4,
            "generation stops after the catch-all; no default route"
        );
        let Some(ClusterSpecifier::WeightedClusters(wc)) = &action(&r[0]).cluster_specifier else {
            panic!()
        };
        let shown: Vec<(String, u32)> = wc
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.unwrap().value))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "inbound-vip|80|http/v1|web.shop.svc.cluster.local".to_string(),
                    90
                ),
                (
                    "inbound-vip|80|http/v2|web.shop.svc.cluster.local".to_string(),
                    10
                ),
            ],
            "weight 0 left out"
        );
        let c0 = &wc.clusters[0];
        assert_eq!(c0.request_headers_to_add.len(), 1);
        assert_eq!(
            c0.request_headers_to_add[0].header.as_ref().unwrap().key,
            "x-v"
        );
        assert_eq!(
            c0.request_headers_to_add[0].append_action,
            core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        assert_eq!(
            c0.host_rewrite_specifier,
            Some(
                route::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(
                    "v1.web".into()
                )
            )
        );
        assert_eq!(c0.response_headers_to_remove, ["x-gone"]);
        assert_eq!(
            c0.response_headers_to_add[0].append_action,
            core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32
        );

        let a1 = action(&r[1]);
        assert_eq!(
            a1.cluster_specifier,
            Some(ClusterSpecifier::Cluster(
                "outbound|8080||other.shop.svc.cluster.local".into()
            )),
            "a service not bound to this waypoint"
        );
        assert_eq!(a1.prefix_rewrite, "/two");
        assert_eq!(
            a1.host_rewrite_specifier,
            Some(
                route::route_action::HostRewriteSpecifier::HostRewriteLiteral(
                    "other.internal".into()
                )
            )
        );
        assert_eq!(a1.timeout, Some(duration(Duration::from_millis(2500))));
        let keys: Vec<&str> = r[1]
            .request_headers_to_add
            .iter()
            .map(|h| h.header.as_ref().unwrap().key.as_str())
            .collect();
        assert_eq!(keys, ["x-a", "x-b"], "pseudo-headers dropped");
        assert_eq!(r[1].request_headers_to_remove, ["x-c"]);
        assert_eq!(r[1].response_headers_to_add.len(), 1);

        let a2 = action(&r[2]);
        let rr = a2.regex_rewrite.as_ref().unwrap();
        assert_eq!(rr.pattern.as_ref().unwrap().regex, "^/re/(.*)");
        assert_eq!(rr.substitution, "/\\1");
        assert_eq!(
            action(&r[3]).timeout,
            Some(duration(Duration::ZERO)),
            "no timeout by default"
        );

        // The outbound cluster exists, with the other service's endpoint.
        let name = "outbound|8080||other.shop.svc.cluster.local";
        assert!(w.clusters.contains_key(name));
        let cla = endpoint::ClusterLoadAssignment::decode(w.endpoints[name].body.clone()).unwrap();
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1);
    }

    #[test]
    fn retries_faults_cors_and_mirrors_on_routes() {
        use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cors;
        use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
        let (w, problems) = waypoint(&vs(r#"
  - name: policies
    match: [{uri: {prefix: /p}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,409"}
    fault: {delay: {fixedDelay: 2s, percentage: {value: 50}}, abort: {httpStatus: 418, percentage: {value: 100}}}
    corsPolicy: {allowOrigins: [{exact: "https://a.example"}], allowMethods: [GET], maxAge: 60s}
    mirror: {host: web, subset: v2}
    mirrorPercentage: {value: 25}
  - name: off
    match: [{uri: {prefix: /off}}]
    route: [{destination: {host: web, subset: v1}}]
    retries: {attempts: 0}
  - name: plain
    route: [{destination: {host: web, subset: v1}}]
"#));
        assert!(problems.is_empty(), "{problems:?}");
        let r = routes(&w);
        let a = action(&r[0]);
        let p = a.retry_policy.as_ref().unwrap();
        assert_eq!(p.num_retries, Some(pbw::UInt32Value { value: 3 }));
        assert_eq!(p.retry_on, "5xx,retriable-status-codes");
        assert_eq!(p.retriable_status_codes, [409]);
        assert_eq!(a.request_mirror_policies.len(), 1);
        assert_eq!(
            a.request_mirror_policies[0].cluster,
            "inbound-vip|80|http/v2|web.shop.svc.cluster.local"
        );
        let f = fault::HttpFault::decode(
            r[0].typed_per_filter_config["envoy.filters.http.fault"]
                .value
                .as_slice(),
        )
        .unwrap();
        assert_eq!(
            f.abort.unwrap().error_type,
            Some(fault::fault_abort::ErrorType::HttpStatus(418))
        );
        let c = cors::CorsPolicy::decode(
            r[0].typed_per_filter_config["envoy.filters.http.cors"]
                .value
                .as_slice(),
        )
        .unwrap();
        assert_eq!(c.max_age, "60");
        assert_eq!(action(&r[1]).retry_policy, None, "attempts: 0");
        let plain = action(&r[2]).retry_policy.as_ref().unwrap();
        assert_eq!(
            plain.num_retries,
            Some(pbw::UInt32Value { value: 2 }),
            "Istio's default"
        );
        assert!(r[2].typed_per_filter_config.is_empty());
        let rc = route::RouteConfiguration::decode(w.routes[WEB_HTTP].body.clone()).unwrap();
        assert!(rc.virtual_hosts[0].include_request_attempt_count);
    }

    #[test]
    fn redirect_and_direct_response() {
        use route::redirect_action::{
            PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
        };
        let big = "x".repeat(5000);
        let (w, _) = waypoint(&vs(&format!(
            r#"
  - match: [{{uri: {{prefix: /old}}}}]
    redirect: {{uri: /new, authority: example.org, scheme: https, derivePort: FROM_PROTOCOL_DEFAULT, redirectCode: 307}}
  - match: [{{uri: {{prefix: /port}}}}]
    redirect: {{port: 8443}}
  - match: [{{uri: {{prefix: /request-port}}}}]
    redirect: {{derivePort: FROM_REQUEST_PORT, scheme: https}}
  - match: [{{uri: {{prefix: /standard}}}}]
    redirect: {{port: 443, scheme: https}}
  - match: [{{uri: {{exact: /teapot}}}}]
    directResponse: {{status: 418, body: {{string: "{big}"}}}}
  - match: [{{uri: {{exact: /bytes}}}}]
    directResponse: {{status: 200, body: {{bytes: aGk=}}}}
"#
        )));
        let rc = route::RouteConfiguration::decode(w.routes[WEB_HTTP].body.clone()).unwrap();
        assert_eq!(
            rc.max_direct_response_body_size_bytes,
            Some(pbw::UInt32Value { value: 5000 })
        );
        let r = &rc.virtual_hosts[0].routes;
        let Some(Action::Redirect(rd)) = &r[0].action else {
            panic!()
        };
        assert_eq!(rd.host_redirect, "example.org");
        assert_eq!(rd.port_redirect, 0, "FROM_PROTOCOL_DEFAULT: no port");
        assert_eq!(
            rd.response_code,
            RedirectResponseCode::TemporaryRedirect as i32
        );
        assert_eq!(
            rd.scheme_rewrite_specifier,
            Some(SchemeRewriteSpecifier::SchemeRedirect("https".into()))
        );
        assert_eq!(
            rd.path_rewrite_specifier,
            Some(PathRewriteSpecifier::PathRedirect("/new".into()))
        );
        let Some(Action::Redirect(rd)) = &r[1].action else {
            panic!()
        };
        assert_eq!(rd.port_redirect, 8443);
        assert_eq!(
            rd.response_code,
            RedirectResponseCode::MovedPermanently as i32
        );
        // FROM_REQUEST_PORT: the service port the routes are for; a scheme's default port
        // is left out.
        let Some(Action::Redirect(rd)) = &r[2].action else {
            panic!()
        };
        assert_eq!(rd.port_redirect, 80);
        let Some(Action::Redirect(rd)) = &r[3].action else {
            panic!()
        };
        assert_eq!(rd.port_redirect, 0);
        let Some(Action::DirectResponse(d)) = &r[4].action else {
            panic!()
        };
        assert_eq!(d.status, 418);
        let Some(Action::DirectResponse(d)) = &r[5].action else {
            panic!()
        };
        assert_eq!(
            d.body.as_ref().unwrap().specifier,
            Some(core::data_source::Specifier::InlineBytes(b"hi".to_vec()))
        );
        assert_eq!(r.len(), 6, "no default route after VirtualService routes");
    }

    #[test]
    fn delegate_tcp_routes_and_applicability() {
        let (w, problems) = waypoint(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  http:
  - name: root
    match: [{uri: {prefix: /d}}]
    delegate: {name: web-delegate}
  - name: missing
    delegate: {name: nowhere}
  tcp:
  - match: [{port: 9999}]
    route: [{destination: {host: other}}]
  - match: [{port: 5432}]
    route:
    - {destination: {host: web, subset: v1}, weight: 70}
    - {destination: {host: web, subset: v2}, weight: 30}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-delegate, namespace: shop}
spec:
  http:
  - name: inner
    match: [{headers: {x-a: {exact: "1"}}}]
    route: [{destination: {host: web, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress-only, namespace: shop}
spec:
  hosts: [web]
  gateways: [my-gateway]
  http: [{route: [{destination: {host: other}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: elsewhere, namespace: shop}
spec:
  hosts: [web]
  exportTo: [other-namespace]
  http: [{route: [{destination: {host: other}}]}]
"#,
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .reason
                .contains("no VirtualService shop/nowhere")
        );
        let r = routes(&w);
        assert_eq!(
            r.len(),
            1,
            "no default route after the VirtualService's: {r:#?}"
        );
        assert_eq!(r[0].name, "inner");
        let m = r[0].r#match.as_ref().unwrap();
        assert_eq!(
            m.path_specifier,
            Some(route::route_match::PathSpecifier::Prefix("/d".into()))
        );
        assert_eq!(
            m.headers[0].name, "x-a",
            "root and delegate conditions combined"
        );

        let l = listener::Listener::decode(w.listeners[WEB_TCP].body.clone()).unwrap();
        let Some(listener::filter::ConfigType::TypedConfig(any)) =
            &l.filter_chains[0].filters[0].config_type
        else {
            panic!()
        };
        let t = tcp::TcpProxy::decode(any.value.as_slice()).unwrap();
        let Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(wc)) = t.cluster_specifier
        else {
            panic!("{t:?}")
        };
        let shown: Vec<(&str, u32)> = wc
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight))
            .collect();
        assert_eq!(
            shown,
            [
                ("inbound-vip|5432|tcp/v1|web.shop.svc.cluster.local", 70),
                ("inbound-vip|5432|tcp/v2|web.shop.svc.cluster.local", 30)
            ]
        );
    }

    #[test]
    fn a_tcp_idle_timeout_goes_on_the_tcp_proxy() {
        let (w, _) = waypoint(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-idle, namespace: shop}
spec:
  host: web
  trafficPolicy: {connectionPool: {tcp: {idleTimeout: 90s}}}
"#,
        );
        let l = listener::Listener::decode(w.listeners[WEB_TCP].body.clone()).unwrap();
        let Some(listener::filter::ConfigType::TypedConfig(any)) =
            &l.filter_chains[0].filters[0].config_type
        else {
            panic!()
        };
        let t = tcp::TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(t.idle_timeout.map(|d| d.seconds), Some(90), "{t:?}");
    }

    #[test]
    fn tls_rules_for_this_service_come_before_tcp_rules() {
        let (w, _) = waypoint(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  tls:
  - match: [{sniHosts: [other.example.com]}]
    route: [{destination: {host: other}}]
  - match: [{sniHosts: [web.shop.svc.cluster.local], port: 5432}]
    route: [{destination: {host: web, subset: v2}}]
  tcp:
  - route: [{destination: {host: web, subset: v1}}]
"#,
        );
        let l = listener::Listener::decode(w.listeners[WEB_TCP].body.clone()).unwrap();
        let Some(listener::filter::ConfigType::TypedConfig(any)) =
            &l.filter_chains[0].filters[0].config_type
        else {
            panic!()
        };
        let t = tcp::TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            t.cluster_specifier,
            Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(
                "inbound-vip|5432|tcp/v2|web.shop.svc.cluster.local".into()
            ))
        );
    }

    #[test]
    fn the_gateway_annotation_sets_the_client_identity_in_xfcc() {
        use hcm::http_connection_manager::ForwardClientCertDetails as F;
        let manager = |text: &str| {
            let p = parse_documents(text, "t.yaml");
            let s = Snapshot::build(p.objects, p.problems);
            let t = translate(&s, &MeshOptions::default());
            let l = listener::Listener::decode(
                t.waypoints["shop/waypoint"].listeners[WEB_HTTP]
                    .body
                    .clone(),
            )
            .unwrap();
            let Some(listener::filter::ConfigType::TypedConfig(any)) =
                &l.filter_chains[0].filters[0].config_type
            else {
                panic!()
            };
            (
                hcm::HttpConnectionManager::decode(any.value.as_slice()).unwrap(),
                s.problems,
            )
        };
        // By default a client's XFCC is removed (Envoy's default, written out).
        let (m, _) = manager(BASE);
        assert_eq!(m.forward_client_cert_details, F::Sanitize as i32);
        assert_eq!(m.set_current_client_cert_details, None);
        let annotated = BASE.replace(
            "metadata: {name: waypoint, namespace: shop}",
            "metadata: {name: waypoint, namespace: shop, annotations: {ambient.istio.io/xfcc-include-client-identity: \"true\"}}",
        );
        let (m, _) = manager(&annotated);
        assert_eq!(m.forward_client_cert_details, F::SanitizeSet as i32);
        let d = m.set_current_client_cert_details.unwrap();
        assert!(d.subject.unwrap().value && d.uri && d.dns && !d.cert && !d.chain);
        // A value that is not a boolean is named, with the field.
        let p = parse_documents(&annotated.replace("\"true\"", "yes"), "t.yaml");
        assert_eq!(
            p.problems[0].to_string(),
            "t.yaml: Gateway shop/waypoint: field \"metadata.annotations[ambient.istio.io/xfcc-include-client-identity]\": \"yes\" is not \"true\" or \"false\""
        );
    }

    #[test]
    fn binding_follows_waypoint_for() {
        let text = format!(
            "{BASE}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wl, namespace: shop, labels: {{istio.io/waypoint-for: workload}}}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n"
        )
        .replace("istio.io/use-waypoint: waypoint}", "istio.io/use-waypoint: wl}");
        let p = parse_documents(&text, "t.yaml");
        let s = Snapshot::build(p.objects, vec![]);
        let t = translate(&s, &MeshOptions::default());
        assert!(
            t.waypoints["shop/wl"].listeners.is_empty(),
            "a workload waypoint does not take a service"
        );
        assert!(t.waypoints["shop/waypoint"].listeners.is_empty());
    }

    #[test]
    fn destination_rule_policy_merges_into_clusters_and_routes() {
        let (w, problems) = waypoint(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-policy, namespace: shop}
spec:
  host: web.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2}
    portLevelSettings: [{port: {number: 5432}, loadBalancer: {simple: PASSTHROUGH}}]
  subsets:
  - name: by-user
    labels: {app: web}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /u}}]
    route: [{destination: {host: web, subset: by-user}}]
  - route: [{destination: {host: web}}]
"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let cluster_of =
            |name: &str| cluster::Cluster::decode(w.clusters[name].body.clone()).unwrap();
        let by_user = cluster_of("inbound-vip|80|http/by-user|web.shop.svc.cluster.local");
        assert_eq!(
            by_user.lb_policy,
            cluster::cluster::LbPolicy::RingHash as i32
        );
        assert!(
            by_user.outlier_detection.is_some(),
            "the top level's, merged under the subset's"
        );
        let web = cluster_of(WEB_HTTP);
        assert_eq!(web.lb_policy, cluster::cluster::LbPolicy::RoundRobin as i32);
        assert_eq!(
            web.outlier_detection
                .as_ref()
                .unwrap()
                .consecutive_5xx
                .as_ref()
                .unwrap()
                .value,
            2
        );
        let tcp = cluster_of(WEB_TCP);
        assert!(
            cluster_policy::is_original_dst(&tcp),
            "port 5432's own settings"
        );
        assert!(
            tcp.outlier_detection.is_none(),
            "port settings do not inherit"
        );
        assert!(
            !w.endpoints.contains_key(WEB_TCP),
            "no endpoints for ORIGINAL_DST"
        );
        let rs = routes(&w);
        let hashed = action(&rs[0]);
        assert!(matches!(
            &hashed.hash_policy[0].policy_specifier,
            Some(route::route_action::hash_policy::PolicySpecifier::Header(h)) if h.header_name == "x-user"
        ));
        assert!(action(&rs[1]).hash_policy.is_empty());
    }
}
