//! The waypoint's configuration: one immutable snapshot of listeners, routes, clusters and
//! endpoints (compiled from Envoy's xDS resources) plus the mesh state (workloads, services).
//! A request takes the current `Arc<Config>` once and keeps it, so a config change never
//! disturbs a request or tunnel already in flight.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as envoy_core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
use mesh::state::State;
use prost::Message;

use crate::balancer::{self, PickContext};
use crate::route::{self, RouteTable};
use crate::{breaker, outlier};

pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const HCM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// Envoy's default when a cluster names none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One consistent view of everything the data path needs.
#[derive(Debug, Default)]
pub struct Config {
    pub listeners: BTreeMap<String, Arc<Listener>>,
    /// Every address of every listener (canonical IP, port).
    by_address: HashMap<SocketAddr, Arc<Listener>>,
    pub routes: BTreeMap<String, Arc<RouteTable>>,
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    pub state: Arc<State>,
    /// The resources as received, for the config dump.
    pub resources: Arc<crate::xds::Resources>,
}

impl Config {
    pub fn new(
        listeners: BTreeMap<String, Arc<Listener>>,
        routes: BTreeMap<String, Arc<RouteTable>>,
        clusters: BTreeMap<String, Arc<Cluster>>,
        state: Arc<State>,
    ) -> Config {
        let mut by_address = HashMap::new();
        for l in listeners.values() {
            for a in &l.addresses {
                // Conflicts were rejected when the listener was accepted (see `xds`).
                by_address.entry(canonical(*a)).or_insert_with(|| l.clone());
            }
        }
        Config {
            listeners,
            by_address,
            routes,
            clusters,
            state,
            resources: Arc::default(),
        }
    }

    /// The listener serving a CONNECT authority (a service VIP and port).
    pub fn listener(&self, addr: SocketAddr) -> Option<&Arc<Listener>> {
        self.by_address.get(&canonical(addr))
    }
}

pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// `address` first, then `additional_addresses`.
    pub addresses: Vec<SocketAddr>,
    pub kind: ListenerKind,
}

#[derive(Debug)]
pub enum ListenerKind {
    /// HTTP connection manager: routes from RDS by name, or inline, and the HTTP filters
    /// that run before the router.
    Http {
        routes: Routes,
        filters: HttpFilters,
        /// What the connection manager does with `x-forwarded-client-cert`.
        xfcc: crate::xfcc::Xfcc,
    },
    /// TCP proxy to one cluster or weighted clusters, after the network RBAC filters (in
    /// their order) admit the connection.
    Tcp {
        clusters: Vec<(String, u32)>,
        rbac: Vec<crate::rbac::RbacFilter>,
        /// The connection ends when neither side has sent for this long (Envoy's
        /// `idle_timeout`: 1 h when not set, none when 0).
        idle_timeout: Option<Duration>,
    },
}

/// The HTTP filters of a connection manager that run before the router, as Envoy orders them
/// (pilot sends Istio's order). Each filter the waypoint implements is a field here, filled
/// from its `typed_config` in [`http_filters`]; a filter the waypoint does not know is refused
/// (the listener is NACKed), since skipping it could fail open.
#[derive(Debug, Default)]
pub struct HttpFilters {
    /// `envoy.filters.http.rbac` filters, in their order (Istio: AUDIT, DENY, ALLOW).
    pub rbac: Vec<crate::rbac::RbacFilter>,
    /// `envoy.filters.http.cors` is in the chain (its settings are per route).
    pub cors: bool,
    /// `envoy.filters.http.fault` is in the chain, with its own `HTTPFault` (`None` inside:
    /// it injects nothing unless a route's config says so).
    pub fault: Option<Option<Arc<crate::fault::Fault>>>,
}

#[derive(Debug)]
pub enum Routes {
    Rds(String),
    Inline(Arc<RouteTable>),
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub connect_timeout: Duration,
    /// The HTTP version spoken to the endpoints.
    pub protocol: UpstreamProtocol,
    /// Endpoints from the cluster's `ClusterLoadAssignment` (EDS or inline).
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    /// Balancing, limits, outlier detection and connection options from the Cluster resource.
    pub policy: Arc<ClusterPolicy>,
    /// Per endpoint (same order as `endpoints`): active requests, outlier state, when added.
    /// Carried over from the previous version of the cluster for endpoints that stay.
    pub hosts: Vec<Arc<HostRuntime>>,
    /// The consistent-hash table (ring hash / Maglev), built from the endpoint addresses.
    pub table: balancer::Table,
    /// Circuit-breaker counters, shared with the previous version of the cluster.
    pub breaker: Arc<breaker::Breaker>,
    pub stats: crate::metrics::ClusterStats,
    /// When the cluster (by name) first appeared: hosts there then are not in slow start.
    pub created: Instant,
}

/// What a Cluster resource says beyond its endpoints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterPolicy {
    pub lb: balancer::LbConfig,
    pub limits: breaker::Limits,
    pub outlier: Option<outlier::Config>,
    /// `common_http_protocol_options`.
    pub http: CommonHttpOptions,
    /// Client TLS inside the HBONE stream (`transport_socket`).
    pub tls: Option<crate::origination::UpstreamTls>,
    /// Upstream connection limits and TCP keepalive (see `pool`).
    pub pool: crate::pool::Limits,
}

/// Envoy's `common_http_protocol_options` of the upstream HTTP options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommonHttpOptions {
    pub idle_timeout: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    pub max_connection_duration: Option<Duration>,
}

/// One endpoint's state that lives across config pushes.
#[derive(Debug)]
pub struct HostRuntime {
    pub address: SocketAddr,
    pub active: AtomicU32,
    pub outlier: outlier::Host,
    /// Set while ejected (so a pick reads one atomic for hosts in service).
    ejected: AtomicBool,
    pub added: Instant,
}

impl HostRuntime {
    fn new(address: SocketAddr, added: Instant) -> Self {
        HostRuntime {
            address,
            active: AtomicU32::new(0),
            outlier: outlier::Host::default(),
            ejected: AtomicBool::new(false),
            added,
        }
    }
}

/// The endpoint chosen for one attempt. While it is held, the endpoint counts one active
/// request (least request balancing); keep it until the response is done.
#[derive(Debug)]
pub struct Picked {
    pub address: SocketAddr,
    host: Option<Arc<HostRuntime>>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        if let Some(h) = &self.host {
            h.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub healthy: bool,
    /// `filter_metadata["istio"]["workload"]`, when pilot names the workload.
    pub workload: Option<String>,
}

impl Cluster {
    pub fn new(name: String, connect_timeout: Duration, endpoints: Vec<Endpoint>) -> Cluster {
        let now = Instant::now();
        let hosts = endpoints
            .iter()
            .map(|e| Arc::new(HostRuntime::new(e.address, now)))
            .collect();
        Cluster {
            name,
            connect_timeout,
            protocol: UpstreamProtocol::default(),
            endpoints,
            next: AtomicUsize::new(0),
            policy: Arc::default(),
            hosts,
            table: balancer::Table::None,
            breaker: Arc::default(),
            stats: crate::metrics::ClusterStats::default(),
            created: now,
        }
    }

    pub fn with_protocol(mut self, protocol: UpstreamProtocol) -> Cluster {
        self.protocol = protocol;
        self
    }

    /// Apply the cluster's policy; `previous` (the version this one replaces) hands over the
    /// state of the endpoints that stay, the circuit-breaker counters and the creation time.
    pub fn with_policy(
        mut self,
        policy: Arc<ClusterPolicy>,
        previous: Option<&Cluster>,
        stats: crate::metrics::ClusterStats,
    ) -> Cluster {
        let now = Instant::now();
        if let Some(p) = previous {
            self.created = p.created;
            self.breaker = p.breaker.clone();
            self.next = AtomicUsize::new(p.next.load(Ordering::Relaxed));
            self.hosts = self
                .endpoints
                .iter()
                .map(|e| {
                    p.hosts
                        .iter()
                        .find(|h| h.address == e.address)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(HostRuntime::new(e.address, now)))
                })
                .collect();
        }
        let addresses: Vec<SocketAddr> = self.endpoints.iter().map(|e| e.address).collect();
        self.table = balancer::table(policy.lb.policy, &addresses);
        self.policy = policy;
        self.stats = stats;
        self.stats.ejections_active.set(
            self.hosts
                .iter()
                .filter(|h| h.ejected.load(Ordering::Acquire))
                .count() as i64,
        );
        self
    }

    /// Whether endpoint `i` is out of service by outlier detection at `now` (an ejection whose
    /// time has passed ends here).
    fn ejected(&self, i: usize, now: Instant) -> bool {
        let h = &self.hosts[i];
        if !h.ejected.load(Ordering::Acquire) {
            return false;
        }
        let (ejected, ended) = h.outlier.ejected(now);
        if ended {
            h.ejected.store(false, Ordering::Release);
            self.stats.ejections_active.dec();
        }
        ejected
    }

    /// Choose the endpoint for one attempt, as the cluster's `lb_policy` says: among endpoints
    /// that are healthy (EDS) and not ejected (outlier detection), all of them below the panic
    /// threshold; avoiding `ctx.tried` while others remain. `None`: no endpoint (503 `UH`).
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Picked> {
        use balancer::Policy;
        if self.policy.lb.policy == Policy::OriginalDst {
            return ctx.original_dst.map(|address| Picked {
                address,
                host: None,
            });
        }
        let now = Instant::now();
        let n = self.endpoints.len();
        let usable = |i: usize| self.endpoints[i].healthy && !self.ejected(i, now);
        let in_service = (0..n).filter(|i| usable(*i)).count();
        let panic = self
            .policy
            .lb
            .panic_threshold
            .is_some_and(|p| p > 0.0 && (in_service as f64) * 100.0 < p * n as f64);
        let fresh = |i: usize| !ctx.tried.contains(&self.endpoints[i].address);
        let mut avoid_tried = (0..n).any(|i| (panic || usable(i)) && fresh(i));
        let ok = |i: usize, avoid: bool| (panic || usable(i)) && (!avoid || fresh(i));
        if !avoid_tried && !(0..n).any(|i| ok(i, false)) {
            return None;
        }
        if !avoid_tried && ctx.tried.is_empty() {
            avoid_tried = false;
        }
        let ok = |i: usize| ok(i, avoid_tried);
        let count = (0..n).filter(|i| ok(*i)).count();
        let nth = |k: usize| (0..n).filter(|i| ok(*i)).nth(k);
        let chosen = match self.policy.lb.policy {
            Policy::RingHash { .. } | Policy::Maglev { .. } => {
                let hash = ctx.hash.unwrap_or_else(|| fastrand::u64(..));
                self.table
                    .candidates(hash)
                    .map(|i| i as usize)
                    .find(|i| ok(*i))
            }
            _ if self.slow_start_active(now, &ok) => self.weighted(now, &ok),
            Policy::Random => nth(fastrand::usize(..count)),
            Policy::LeastRequest { choice_count } => {
                let mut best: Option<usize> = None;
                for _ in 0..choice_count {
                    let Some(i) = nth(fastrand::usize(..count)) else {
                        continue;
                    };
                    let load = |i: usize| self.hosts[i].active.load(Ordering::Acquire);
                    if best.is_none_or(|b| load(i) < load(b)) {
                        best = Some(i);
                    }
                }
                best
            }
            _ => nth(self.next.fetch_add(1, Ordering::Relaxed) % count),
        }?;
        let host = self.hosts[chosen].clone();
        host.active.fetch_add(1, Ordering::AcqRel);
        Some(Picked {
            address: self.endpoints[chosen].address,
            host: Some(host),
        })
    }

    fn slow_start_active(&self, now: Instant, ok: &dyn Fn(usize) -> bool) -> bool {
        let Some(s) = &self.policy.lb.slow_start else {
            return false;
        };
        (0..self.endpoints.len()).any(|i| {
            let h = &self.hosts[i];
            ok(i) && h.added > self.created && now.saturating_duration_since(h.added) < s.window
        })
    }

    /// Weighted random by slow-start weights (hosts warming up get their share of traffic).
    fn weighted(&self, now: Instant, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let s = self.policy.lb.slow_start?;
        let weight = |i: usize| {
            let h = &self.hosts[i];
            if h.added > self.created {
                s.factor(h.added, now)
            } else {
                1.0
            }
        };
        let total: f64 = (0..self.endpoints.len())
            .filter(|i| ok(*i))
            .map(weight)
            .sum();
        let mut point = fastrand::f64() * total;
        let mut last = None;
        for i in (0..self.endpoints.len()).filter(|i| ok(*i)) {
            let w = weight(i);
            if point < w {
                return Some(i);
            }
            point -= w;
            last = Some(i);
        }
        last
    }

    /// Count the result of one attempt on `picked`'s endpoint for outlier detection; ejects it
    /// when a run of errors calls for it (within `max_ejection_percent`).
    pub fn report(&self, picked: &Picked, outcome: outlier::Outcome) {
        let (Some(config), Some(host)) = (&self.policy.outlier, &picked.host) else {
            return;
        };
        let Some(kind) = outlier::record(config, &host.outlier, outcome) else {
            return;
        };
        self.stats.detected(kind);
        let ejected = self
            .hosts
            .iter()
            .filter(|h| h.ejected.load(Ordering::Acquire))
            .count();
        if !outlier::may_eject(config, ejected, self.hosts.len()) {
            return;
        }
        let time = outlier::eject(config, &host.outlier, Instant::now());
        if !host.ejected.swap(true, Ordering::AcqRel) {
            self.stats.ejections_active.inc();
        }
        self.stats.enforced(kind);
        tracing::info!(cluster = %self.name, endpoint = %host.address, kind = kind.name(), ?time, "outlier ejected");
    }

    /// Whether endpoint `i` is ejected now (for the admin page).
    pub fn is_ejected(&self, i: usize) -> bool {
        self.ejected(i, Instant::now())
    }
}

/// The HTTP version for a cluster's endpoints, from its
/// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions` as Envoy reads them: HTTP/1.1
/// unless they say HTTP/2, or the client's version when they say "use the downstream protocol"
/// (HTTP/2 only if they also carry HTTP/2 options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
    /// The downstream's version; HTTP/2 allowed only when `http2` (HTTP/1.1 otherwise).
    Downstream {
        http2: bool,
    },
}

/// The `typed_extension_protocol_options` key of the HTTP upstream options.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

fn upstream_protocol(c: &cluster_pb::Cluster) -> Result<UpstreamProtocol, String> {
    use http_options::http_protocol_options::UpstreamProtocolOptions as U;
    use http_options::http_protocol_options::explicit_http_config::ProtocolConfig as P;
    let Some(any) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS)
    else {
        return Ok(UpstreamProtocol::Http1);
    };
    let at = format!("typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS:?}]");
    let o = http_options::HttpProtocolOptions::decode(&any.value[..])
        .map_err(|e| format!("{at}: undecodable HttpProtocolOptions: {e}"))?;
    Ok(match o.upstream_protocol_options {
        None => UpstreamProtocol::Http1,
        Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
            None | Some(P::HttpProtocolOptions(_)) => UpstreamProtocol::Http1,
            Some(P::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
            Some(P::Http3ProtocolOptions(_)) => {
                return Err(format!(
                    "{at}.explicit_http_config: HTTP/3 is not supported"
                ));
            }
        },
        Some(U::UseDownstreamProtocolConfig(d)) => UpstreamProtocol::Downstream {
            http2: d.http2_protocol_options.is_some(),
        },
        Some(U::AutoConfig(_)) => {
            return Err(format!("{at}.auto_config: ALPN selection is not supported"));
        }
    })
}

fn common_http_options(c: &cluster_pb::Cluster) -> Result<CommonHttpOptions, String> {
    let Some(any) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS)
    else {
        return Ok(CommonHttpOptions::default());
    };
    let o = http_options::HttpProtocolOptions::decode(&any.value[..])
        .map_err(|e| format!("undecodable HttpProtocolOptions: {e}"))?;
    let Some(common) = o.common_http_protocol_options else {
        return Ok(CommonHttpOptions::default());
    };
    let d = |x: &Option<envoy_types::pb::google::protobuf::Duration>, field: &str| {
        x.as_ref()
            .map(proto_duration)
            .transpose()
            .map_err(|_| format!("common_http_protocol_options.{field}: negative"))
    };
    Ok(CommonHttpOptions {
        idle_timeout: d(&common.idle_timeout, "idle_timeout")?,
        max_requests_per_connection: common.max_requests_per_connection.map(|v| v.value),
        max_connection_duration: d(&common.max_connection_duration, "max_connection_duration")?,
    })
}

/// What a `Cluster` resource says; endpoints come separately (EDS) unless inline.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterDef {
    pub name: String,
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
    pub eds: bool,
    pub inline_endpoints: Vec<Endpoint>,
    pub policy: Arc<ClusterPolicy>,
}

pub fn cluster(body: &[u8], name: &str) -> Result<(cluster_pb::Cluster, ClusterDef), String> {
    use cluster_pb::cluster::{ClusterDiscoveryType, DiscoveryType};
    let c = cluster_pb::Cluster::decode(body).map_err(|e| format!("undecodable Cluster: {e}"))?;
    if c.name != name {
        return Err(format!(
            "resource name differs from the cluster name {:?}",
            c.name
        ));
    }
    let eds = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => match DiscoveryType::try_from(*t) {
            Ok(DiscoveryType::Eds) => true,
            Ok(DiscoveryType::Static | DiscoveryType::OriginalDst) => false,
            _ => {
                return Err(format!(
                    "type: only EDS, STATIC and ORIGINAL_DST clusters are supported (got {t})"
                ));
            }
        },
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            return Err("cluster_type: custom cluster types are not supported".into());
        }
        // The proto default is STATIC.
        None => false,
    };
    let connect_timeout = match &c.connect_timeout {
        Some(d) if d.seconds > 0 || d.nanos > 0 => Duration::new(
            u64::try_from(d.seconds).map_err(|_| "connect_timeout: negative")?,
            u32::try_from(d.nanos).map_err(|_| "connect_timeout: negative")?,
        ),
        _ => DEFAULT_CONNECT_TIMEOUT,
    };
    let inline_endpoints = match &c.load_assignment {
        Some(la) if !eds => endpoints(la).map_err(|e| format!("load_assignment.{e}"))?,
        _ => Vec::new(),
    };
    let protocol = upstream_protocol(&c)?;
    let http = common_http_options(&c)?;
    let policy = ClusterPolicy {
        lb: balancer::lb_config(&c)?,
        limits: breaker::limits(&c)?,
        outlier: outlier::config(&c)?,
        pool: crate::pool::limits(&c, &http)?,
        http,
        tls: crate::origination::upstream_tls(&c)?,
    };
    let def = ClusterDef {
        name: c.name.clone(),
        connect_timeout,
        protocol,
        eds,
        inline_endpoints,
        policy: Arc::new(policy),
    };
    Ok((c, def))
}

pub fn load_assignment(
    body: &[u8],
    name: &str,
) -> Result<(endpoint_pb::ClusterLoadAssignment, Vec<Endpoint>), String> {
    let la = endpoint_pb::ClusterLoadAssignment::decode(body)
        .map_err(|e| format!("undecodable ClusterLoadAssignment: {e}"))?;
    if la.cluster_name != name {
        return Err(format!(
            "resource name differs from cluster_name {:?}",
            la.cluster_name
        ));
    }
    let eps = endpoints(&la)?;
    Ok((la, eps))
}

fn endpoints(la: &endpoint_pb::ClusterLoadAssignment) -> Result<Vec<Endpoint>, String> {
    use endpoint_pb::lb_endpoint::HostIdentifier;
    let mut out = Vec::new();
    for (i, locality) in la.endpoints.iter().enumerate() {
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let field = || format!("endpoints[{i}].lb_endpoints[{j}]");
            let ep = match &lb.host_identifier {
                Some(HostIdentifier::Endpoint(e)) => e,
                _ => return Err(format!("{}: endpoint address required", field())),
            };
            let address = socket_address(ep.address.as_ref())
                .map_err(|e| format!("{}.endpoint.address: {e}", field()))?;
            let healthy = matches!(
                envoy_core::HealthStatus::try_from(lb.health_status),
                Ok(envoy_core::HealthStatus::Unknown | envoy_core::HealthStatus::Healthy)
            );
            let workload = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("istio"))
                .and_then(|s| s.fields.get("workload"))
                .and_then(|v| match &v.kind {
                    Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => {
                        Some(s.clone())
                    }
                    _ => None,
                });
            out.push(Endpoint {
                address,
                healthy,
                workload,
            });
        }
    }
    Ok(out)
}

fn socket_address(a: Option<&envoy_core::Address>) -> Result<SocketAddr, String> {
    use envoy_core::address::Address as A;
    use envoy_core::socket_address::PortSpecifier;
    let Some(A::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err("a socket_address is required".into());
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", sa.address))?;
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) if p > 0 => {
            u16::try_from(p).map_err(|_| format!("port_value {p} is not a port"))?
        }
        _ => return Err("port_value is required".into()),
    };
    Ok(SocketAddr::new(ip, port))
}

pub fn listener(body: &[u8], name: &str) -> Result<(listener_pb::Listener, Listener), String> {
    let l =
        listener_pb::Listener::decode(body).map_err(|e| format!("undecodable Listener: {e}"))?;
    if l.name != name {
        return Err(format!(
            "resource name differs from the listener name {:?}",
            l.name
        ));
    }
    let mut addresses =
        vec![socket_address(l.address.as_ref()).map_err(|e| format!("address: {e}"))?];
    for (i, a) in l.additional_addresses.iter().enumerate() {
        addresses.push(
            socket_address(a.address.as_ref())
                .map_err(|e| format!("additional_addresses[{i}]: {e}"))?,
        );
    }
    if l.filter_chain_matcher.is_some() {
        return Err("filter_chain_matcher: not supported".into());
    }
    let [chain] = l.filter_chains.as_slice() else {
        return Err(format!(
            "filter_chains: exactly one is supported, got {}",
            l.filter_chains.len()
        ));
    };
    if chain.transport_socket.is_some() {
        return Err("filter_chains[0].transport_socket: not supported (HBONE carries TLS)".into());
    }
    let Some((last, rest)) = chain.filters.split_last() else {
        return Err("filter_chains[0].filters: a terminal filter is required".into());
    };
    // Before the terminal filter: network RBAC filters only (Istio's, for TCP listeners).
    let mut rbac = Vec::new();
    for (i, f) in rest.iter().enumerate() {
        match &f.config_type {
            Some(listener_pb::filter::ConfigType::TypedConfig(a))
                if a.type_url == crate::rbac::NETWORK_TYPE_URL =>
            {
                rbac.push(
                    crate::rbac::compile_network(&a.value).map_err(|e| {
                        format!("filter_chains[0].filters[{i}] ({:?}): {e}", f.name)
                    })?,
                );
            }
            _ => {
                return Err(format!(
                    "filter_chains[0].filters[{i}]: {:?} is not supported before the terminal filter (only envoy.filters.network.rbac)",
                    f.name
                ));
            }
        }
    }
    let any = match &last.config_type {
        Some(listener_pb::filter::ConfigType::TypedConfig(a)) => a,
        _ => return Err(format!("filter {:?}: typed_config required", last.name)),
    };
    let kind = match any.type_url.as_str() {
        HCM_TYPE_URL if !rbac.is_empty() => {
            return Err(
                "filter_chains[0].filters: network RBAC before the HTTP connection manager is not supported (use the HTTP RBAC filter)"
                    .into(),
            );
        }
        HCM_TYPE_URL => {
            http_listener(&any.value).map_err(|e| format!("filter {:?}: {e}", last.name))?
        }
        TCP_PROXY_TYPE_URL => {
            tcp_listener(&any.value, rbac).map_err(|e| format!("filter {:?}: {e}", last.name))?
        }
        other => return Err(format!("filter {:?}: unsupported type {other}", last.name)),
    };
    let converted = Listener {
        name: l.name.clone(),
        addresses,
        kind,
    };
    Ok((l, converted))
}

fn http_listener(body: &[u8]) -> Result<ListenerKind, String> {
    use hcm::http_connection_manager::RouteSpecifier;
    let h = hcm::HttpConnectionManager::decode(body)
        .map_err(|e| format!("undecodable HttpConnectionManager: {e}"))?;
    let filters = http_filters(&h.http_filters)?;
    let routes = match &h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) if !rds.route_config_name.is_empty() => {
            Routes::Rds(rds.route_config_name.clone())
        }
        Some(RouteSpecifier::RouteConfig(rc)) => Routes::Inline(Arc::new(
            route::compile(rc).map_err(|e| format!("route_config.{e}"))?,
        )),
        _ => {
            return Err(
                "route_specifier: rds with a route_config_name, or route_config, is required"
                    .into(),
            );
        }
    };
    let xfcc = crate::xfcc::Xfcc::from_hcm(&h)?;
    // Taking the remote address as the client's (appending it to `x-forwarded-for`, trusting
    // hops of it) is not implemented; Istio's waypoint leaves it off.
    if h.use_remote_address.as_ref().is_some_and(|b| b.value) || h.xff_num_trusted_hops != 0 {
        return Err("use_remote_address and xff_num_trusted_hops are not supported".into());
    }
    Ok(ListenerKind::Http {
        routes,
        filters,
        xfcc,
    })
}

/// The connection manager's `http_filters`: the router last (an empty list means the router
/// alone), the filters before it each one the waypoint implements.
fn http_filters(list: &[hcm::HttpFilter]) -> Result<HttpFilters, String> {
    let mut filters = HttpFilters::default();
    let Some((last, before)) = list.split_last() else {
        return Ok(filters);
    };
    if last.name != ROUTER_FILTER {
        return Err(format!(
            "http_filters: the last must be {ROUTER_FILTER}, not {:?}",
            last.name
        ));
    }
    for (i, f) in before.iter().enumerate() {
        let typed = match &f.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(a)) => Some(a),
            _ => None,
        };
        match typed.map(|a| a.type_url.as_str()) {
            Some(crate::rbac::TYPE_URL) => filters.rbac.push(
                crate::rbac::compile(typed.map(|a| a.value.as_slice()).unwrap_or_default())
                    .map_err(|e| format!("http_filters[{i}] ({:?}): {e}", f.name))?,
            ),
            Some(crate::cors::FILTER_TYPE_URL) => filters.cors = true,
            Some(crate::fault::TYPE_URL) => {
                let any = typed.map(|a| a.value.as_slice()).unwrap_or_default();
                filters.fault = Some(
                    crate::fault::Fault::decode(any)
                        .map_err(|e| format!("http_filters[{i}] ({:?}): {e}", f.name))?
                        .map(Arc::new),
                );
            }
            _ => return Err(format!("http_filters[{i}]: {:?} is not supported", f.name)),
        }
    }
    Ok(filters)
}

/// A protobuf `Duration` as a `Duration`; negative parts are an error (the caller names the
/// field).
pub fn proto_duration(d: &envoy_types::pb::google::protobuf::Duration) -> Result<Duration, String> {
    Ok(Duration::new(
        u64::try_from(d.seconds).map_err(|_| "negative duration")?,
        u32::try_from(d.nanos).map_err(|_| "negative duration")?,
    ))
}

/// Envoy's tcp_proxy idle timeout when the resource sets none.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

fn tcp_listener(body: &[u8], rbac: Vec<crate::rbac::RbacFilter>) -> Result<ListenerKind, String> {
    use tcp_proxy::tcp_proxy::ClusterSpecifier;
    let t = tcp_proxy::TcpProxy::decode(body).map_err(|e| format!("undecodable TcpProxy: {e}"))?;
    let clusters = match &t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => vec![(c.clone(), 1)],
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let clusters: Vec<(String, u32)> = w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight))
                .filter(|(_, w)| *w > 0)
                .collect();
            if clusters.is_empty() {
                return Err("weighted_clusters: no cluster with a weight above 0".into());
            }
            clusters
        }
        _ => return Err("cluster_specifier: cluster or weighted_clusters required".into()),
    };
    if t.tunneling_config.is_some() {
        return Err("tunneling_config: not supported".into());
    }
    let idle_timeout = match &t.idle_timeout {
        None => Some(TCP_IDLE_TIMEOUT),
        Some(d) => {
            let d = proto_duration(d).map_err(|e| format!("idle_timeout: {e}"))?;
            (!d.is_zero()).then_some(d)
        }
    };
    Ok(ListenerKind::Tcp {
        clusters,
        rbac,
        idle_timeout,
    })
}

/// Weighted choice among TCP clusters for a random draw `r`.
pub fn pick_weighted(clusters: &[(String, u32)], r: u64) -> Option<&str> {
    let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut point = r % total;
    for (c, w) in clusters {
        if point < u64::from(*w) {
            return Some(c);
        }
        point -= u64::from(*w);
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};

    pub fn socket(ip: &str, port: u32) -> envoy_core::Address {
        envoy_core::Address {
            address: Some(envoy_core::address::Address::SocketAddress(
                envoy_core::SocketAddress {
                    address: ip.into(),
                    port_specifier: Some(envoy_core::socket_address::PortSpecifier::PortValue(
                        port,
                    )),
                    ..Default::default()
                },
            )),
        }
    }

    pub fn http_listener_pb(name: &str, vips: &[&str], port: u32) -> listener_pb::Listener {
        let hcm = hcm::HttpConnectionManager {
            stat_prefix: name.into(),
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                hcm::Rds {
                    route_config_name: name.into(),
                    config_source: None,
                },
            )),
            http_filters: vec![hcm::HttpFilter {
                name: ROUTER_FILTER.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        listener_pb::Listener {
            name: name.into(),
            address: Some(socket(vips[0], port)),
            additional_addresses: vips[1..]
                .iter()
                .map(|v| listener_pb::AdditionalAddress {
                    address: Some(socket(v, port)),
                    ..Default::default()
                })
                .collect(),
            filter_chains: vec![listener_pb::FilterChain {
                filters: vec![listener_pb::Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(listener_pb::filter::ConfigType::TypedConfig(Any {
                        type_url: HCM_TYPE_URL.into(),
                        value: hcm.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub fn tcp_listener_pb(
        name: &str,
        vip: &str,
        port: u32,
        clusters: &[(&str, u32)],
    ) -> listener_pb::Listener {
        use tcp_proxy::tcp_proxy::{
            ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight,
        };
        let t = tcp_proxy::TcpProxy {
            stat_prefix: name.into(),
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: clusters
                    .iter()
                    .map(|(n, w)| ClusterWeight {
                        name: n.to_string(),
                        weight: *w,
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        };
        listener_pb::Listener {
            name: name.into(),
            address: Some(socket(vip, port)),
            filter_chains: vec![listener_pb::FilterChain {
                filters: vec![listener_pb::Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(listener_pb::filter::ConfigType::TypedConfig(Any {
                        type_url: TCP_PROXY_TYPE_URL.into(),
                        value: t.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub fn eds_cluster_pb(name: &str) -> cluster_pb::Cluster {
        cluster_pb::Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cluster_pb::cluster::ClusterDiscoveryType::Type(
                cluster_pb::cluster::DiscoveryType::Eds as i32,
            )),
            connect_timeout: Some(PbDuration {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    pub fn cla_pb(
        name: &str,
        endpoints: &[(&str, u32, bool)],
    ) -> endpoint_pb::ClusterLoadAssignment {
        endpoint_pb::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![endpoint_pb::LocalityLbEndpoints {
                lb_endpoints: endpoints
                    .iter()
                    .map(|(ip, port, healthy)| endpoint_pb::LbEndpoint {
                        health_status: if *healthy {
                            envoy_core::HealthStatus::Healthy
                        } else {
                            envoy_core::HealthStatus::Unhealthy
                        } as i32,
                        host_identifier: Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(
                            endpoint_pb::Endpoint {
                                address: Some(socket(ip, *port)),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn converts_listeners() {
        let l = http_listener_pb(
            "inbound-vip|80|http|a.ns.svc.cluster.local",
            &["10.96.0.1", "fd00::1"],
            80,
        );
        let (_, conv) = listener(&l.encode_to_vec(), &l.name).unwrap();
        assert_eq!(conv.addresses.len(), 2);
        assert!(
            matches!(&conv.kind, ListenerKind::Http { routes: Routes::Rds(n), .. } if n == &l.name)
        );
        let t = tcp_listener_pb(
            "inbound-vip|9000|tcp|a",
            "10.96.0.1",
            9000,
            &[("a", 1), ("b", 0)],
        );
        let (_, conv) = listener(&t.encode_to_vec(), &t.name).unwrap();
        let ListenerKind::Tcp {
            clusters,
            idle_timeout,
            ..
        } = &conv.kind
        else {
            panic!()
        };
        assert_eq!(
            clusters,
            &[("a".to_string(), 1)],
            "weight-0 clusters dropped"
        );
        assert_eq!(*idle_timeout, Some(TCP_IDLE_TIMEOUT), "Envoy's default");

        let config = Config::new(
            [("x".to_string(), Arc::new(conv))].into(),
            BTreeMap::new(),
            BTreeMap::new(),
            Arc::default(),
        );
        assert!(config.listener("10.96.0.1:9000".parse().unwrap()).is_some());
        assert!(
            config
                .listener("[::ffff:10.96.0.1]:9000".parse().unwrap())
                .is_some()
        );
        assert!(config.listener("10.96.0.1:9001".parse().unwrap()).is_none());
    }

    #[test]
    fn rejects_bad_listeners() {
        let mut l = http_listener_pb("l", &["10.96.0.1"], 80);
        l.address = None;
        let e = listener(&l.encode_to_vec(), "l").unwrap_err();
        assert!(e.starts_with("address:"), "{e}");
        let l = http_listener_pb("l", &["10.96.0.1"], 80);
        assert!(
            listener(&l.encode_to_vec(), "other")
                .unwrap_err()
                .contains("differs")
        );
        let mut l = http_listener_pb("l", &["10.96.0.1"], 80);
        l.filter_chains.clear();
        assert!(
            listener(&l.encode_to_vec(), "l")
                .unwrap_err()
                .contains("filter_chains")
        );
        assert!(
            listener(b"\xff\xff", "l")
                .unwrap_err()
                .contains("undecodable")
        );
    }

    #[test]
    fn network_rbac_only_before_a_tcp_proxy() {
        use envoy_types::pb::envoy::config::rbac::v3 as rbac_pb;
        use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as network_rbac;
        let deny_all = |stat_prefix: &str| listener_pb::Filter {
            name: "envoy.filters.network.rbac".into(),
            config_type: Some(listener_pb::filter::ConfigType::TypedConfig(Any {
                type_url: crate::rbac::NETWORK_TYPE_URL.into(),
                value: network_rbac::Rbac {
                    stat_prefix: stat_prefix.into(),
                    rules: Some(rbac_pb::Rbac {
                        action: rbac_pb::rbac::Action::Deny as i32,
                        policies: [(
                            "all".to_string(),
                            rbac_pb::Policy {
                                permissions: vec![rbac_pb::Permission {
                                    rule: Some(rbac_pb::permission::Rule::Any(true)),
                                }],
                                principals: vec![rbac_pb::Principal {
                                    identifier: Some(rbac_pb::principal::Identifier::Any(true)),
                                }],
                                ..Default::default()
                            },
                        )]
                        .into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
            })),
        };
        let mut l = tcp_listener_pb("t", "10.96.0.9", 80, &[("c", 1)]);
        l.filter_chains[0].filters.insert(0, deny_all("tcp."));
        let (_, conv) = listener(&l.encode_to_vec(), "t").unwrap();
        let ListenerKind::Tcp { rbac, .. } = &conv.kind else {
            panic!("not TCP")
        };
        assert_eq!(rbac.len(), 1);
        assert!(rbac[0].rules.is_some());
        // stat_prefix is required (as Envoy validates it).
        let mut l = tcp_listener_pb("t", "10.96.0.9", 80, &[("c", 1)]);
        l.filter_chains[0].filters.insert(0, deny_all(""));
        let e = listener(&l.encode_to_vec(), "t").unwrap_err();
        assert!(e.contains("filters[0]") && e.contains("stat_prefix"), "{e}");
        // Not before an HTTP connection manager, and no other network filter.
        let mut l = http_listener_pb("h", &["10.96.0.9"], 80);
        l.filter_chains[0].filters.insert(0, deny_all("tcp."));
        let e = listener(&l.encode_to_vec(), "h").unwrap_err();
        assert!(e.contains("HTTP RBAC"), "{e}");
        let mut l = tcp_listener_pb("t", "10.96.0.9", 80, &[("c", 1)]);
        l.filter_chains[0].filters.insert(
            0,
            listener_pb::Filter {
                name: "envoy.filters.network.local_ratelimit".into(),
                config_type: None,
            },
        );
        let e = listener(&l.encode_to_vec(), "t").unwrap_err();
        assert!(e.contains("local_ratelimit"), "{e}");
    }

    #[test]
    fn what_the_connection_manager_cannot_honour_is_refused() {
        let with = |f: &dyn Fn(&mut hcm::HttpConnectionManager)| {
            let mut l = http_listener_pb("h", &["10.96.0.9"], 80);
            let Some(listener_pb::filter::ConfigType::TypedConfig(any)) =
                &mut l.filter_chains[0].filters[0].config_type
            else {
                panic!()
            };
            let mut m = hcm::HttpConnectionManager::decode(any.value.as_slice()).unwrap();
            f(&mut m);
            any.value = m.encode_to_vec();
            listener(&l.encode_to_vec(), "h").map(|(_, c)| c)
        };
        let e = with(&|m| {
            m.use_remote_address =
                Some(envoy_types::pb::google::protobuf::BoolValue { value: true })
        })
        .unwrap_err();
        assert!(e.contains("use_remote_address"), "{e}");
        let e = with(&|m| m.xff_num_trusted_hops = 1).unwrap_err();
        assert!(e.contains("xff_num_trusted_hops"), "{e}");
        let e = with(&|m| m.forward_client_cert_details = 7).unwrap_err();
        assert!(e.contains("forward_client_cert_details"), "{e}");
        let ok = with(&|m| {
            m.forward_client_cert_details = 3;
            m.use_remote_address =
                Some(envoy_types::pb::google::protobuf::BoolValue { value: false })
        })
        .unwrap();
        let ListenerKind::Http { xfcc, .. } = ok.kind else {
            panic!("not HTTP")
        };
        assert_eq!(xfcc.mode, crate::xfcc::Mode::SanitizeSet);
    }

    #[test]
    fn http_filters_router_last_and_only_known_ones() {
        let filter = |name: &str| hcm::HttpFilter {
            name: name.into(),
            ..Default::default()
        };
        assert!(http_filters(&[]).is_ok());
        assert!(http_filters(&[filter(ROUTER_FILTER)]).is_ok());
        let e =
            http_filters(&[filter(ROUTER_FILTER), filter("envoy.filters.http.lua")]).unwrap_err();
        assert!(e.contains("the last must be"), "{e}");
        let e =
            http_filters(&[filter("envoy.filters.http.lua"), filter(ROUTER_FILTER)]).unwrap_err();
        assert!(e.contains("http_filters[0]") && e.contains("lua"), "{e}");
    }

    #[test]
    fn converts_clusters_and_endpoints() {
        let c = eds_cluster_pb("inbound-vip|80|http|a");
        let (_, def) = cluster(&c.encode_to_vec(), &c.name).unwrap();
        assert!(def.eds);
        assert_eq!(def.connect_timeout, Duration::from_secs(10));
        let la = cla_pb(
            &c.name,
            &[
                ("10.0.0.1", 8080, true),
                ("10.0.0.2", 8080, false),
                ("10.0.0.3", 8080, true),
            ],
        );
        let (_, eps) = load_assignment(&la.encode_to_vec(), &c.name).unwrap();
        assert_eq!(eps.len(), 3);
        assert!(!eps[1].healthy);
        let cl = Cluster::new(c.name.clone(), def.connect_timeout, eps);
        let picks: Vec<String> = (0..4)
            .map(|_| {
                cl.pick(&PickContext::default())
                    .unwrap()
                    .address
                    .to_string()
            })
            .collect();
        assert_eq!(
            picks,
            [
                "10.0.0.1:8080",
                "10.0.0.3:8080",
                "10.0.0.1:8080",
                "10.0.0.3:8080"
            ]
        );
        let none = Cluster::new("x".into(), def.connect_timeout, vec![]);
        assert!(none.pick(&PickContext::default()).is_none());
        let bad = cla_pb(&c.name, &[("not-an-ip", 80, true)]);
        let e = load_assignment(&bad.encode_to_vec(), &c.name).unwrap_err();
        assert!(
            e.contains("endpoints[0].lb_endpoints[0].endpoint.address"),
            "{e}"
        );
    }

    fn policy_cluster(
        policy: balancer::Policy,
        n: usize,
        outlier: Option<outlier::Config>,
    ) -> Cluster {
        let eps = (0..n)
            .map(|i| Endpoint {
                address: format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                healthy: true,
                workload: None,
            })
            .collect();
        let policy = ClusterPolicy {
            lb: balancer::LbConfig {
                policy,
                ..Default::default()
            },
            outlier,
            ..Default::default()
        };
        Cluster::new("c".into(), Duration::from_secs(1), eps).with_policy(
            Arc::new(policy),
            None,
            Default::default(),
        )
    }

    #[test]
    fn balancers_spread_and_least_request_prefers_idle() {
        for p in [
            balancer::Policy::Random,
            balancer::Policy::LeastRequest { choice_count: 2 },
        ] {
            let c = policy_cluster(p, 4, None);
            let mut counts = [0usize; 4];
            for _ in 0..4000 {
                let a = c.pick(&PickContext::default()).unwrap().address;
                counts[c.endpoints.iter().position(|e| e.address == a).unwrap()] += 1;
            }
            assert!(
                counts.iter().all(|n| (700..1300).contains(n)),
                "{p:?}: {counts:?}"
            );
        }
        // Three endpoints busy (their picks held), one idle: least request finds the idle one
        // whenever it is among the two choices.
        let c = policy_cluster(balancer::Policy::LeastRequest { choice_count: 2 }, 4, None);
        let mut held = Vec::new();
        for i in 0..3 {
            for _ in 0..5 {
                held.push(c.hosts[i].clone());
                c.hosts[i].active.fetch_add(1, Ordering::AcqRel);
            }
        }
        let idle = c.endpoints[3].address;
        let hits = (0..1000)
            .filter(|_| c.pick(&PickContext::default()).unwrap().address == idle)
            .count();
        assert!(
            hits > 350,
            "P2C picks the idle one about 7/16 of the time: {hits}"
        );
    }

    #[test]
    fn consistent_hash_sticks_and_tried_hosts_are_avoided() {
        let c = policy_cluster(
            balancer::Policy::RingHash {
                minimum_ring_size: 1024,
                maximum_ring_size: 1 << 23,
            },
            3,
            None,
        );
        let ctx = PickContext {
            hash: Some(balancer::xxhash64(b"alice", 0)),
            ..Default::default()
        };
        let first = c.pick(&ctx).unwrap().address;
        assert!((0..20).all(|_| c.pick(&ctx).unwrap().address == first));
        let tried = [first];
        let retry = PickContext {
            tried: &tried,
            ..ctx
        };
        assert_ne!(c.pick(&retry).unwrap().address, first);
        // A push with the same endpoints (in another order) keeps the choice.
        let mut eps = c.endpoints.clone();
        eps.reverse();
        let again = Cluster::new("c".into(), Duration::from_secs(1), eps).with_policy(
            c.policy.clone(),
            Some(&c),
            Default::default(),
        );
        assert_eq!(again.pick(&ctx).unwrap().address, first);
    }

    #[test]
    fn ejected_endpoints_are_skipped_and_state_survives_a_push() {
        let config = outlier::Config {
            consecutive_5xx: 2,
            max_ejection_percent: 100,
            ..Default::default()
        };
        let c = policy_cluster(balancer::Policy::RoundRobin, 2, Some(config));
        let bad = c.endpoints[0].address;
        for _ in 0..2 {
            let p = loop {
                let p = c.pick(&PickContext::default()).unwrap();
                if p.address == bad {
                    break p;
                }
            };
            c.report(&p, outlier::Outcome::Status(500));
        }
        assert!(c.is_ejected(0));
        assert_eq!(c.stats.ejections_active.get(), 1);
        assert!((0..10).all(|_| c.pick(&PickContext::default()).unwrap().address != bad));
        // The same endpoints pushed again: still ejected.
        let again = Cluster::new("c".into(), Duration::from_secs(1), c.endpoints.clone())
            .with_policy(c.policy.clone(), Some(&c), c.stats.clone());
        assert!(again.is_ejected(0));
        assert!((0..10).all(|_| again.pick(&PickContext::default()).unwrap().address != bad));
        // Never more than the cap: with the other one failing too, 100% allows it; here both
        // ejected leaves none.
        let good = again.endpoints[1].address;
        for _ in 0..2 {
            let p = again.pick(&PickContext::default()).unwrap();
            assert_eq!(p.address, good);
            again.report(&p, outlier::Outcome::Status(503));
        }
        assert!(
            again.pick(&PickContext::default()).is_none(),
            "all ejected: 503 UH"
        );
    }

    #[test]
    fn upstream_protocol_from_protocol_options() {
        use http_options::http_protocol_options::UpstreamProtocolOptions as U;
        use http_options::http_protocol_options::explicit_http_config::ProtocolConfig as P;
        let with = |o: Option<U>| {
            let mut c = eds_cluster_pb("c");
            if let Some(o) = o {
                let options = http_options::HttpProtocolOptions {
                    upstream_protocol_options: Some(o),
                    ..Default::default()
                };
                c.typed_extension_protocol_options.insert(
                    HTTP_PROTOCOL_OPTIONS.into(),
                    envoy_types::pb::google::protobuf::Any {
                        type_url: String::new(),
                        value: options.encode_to_vec(),
                    },
                );
            }
            cluster(&c.encode_to_vec(), "c").map(|(_, d)| d.protocol)
        };
        let explicit = |p| {
            Some(U::ExplicitHttpConfig(
                http_options::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(p),
                },
            ))
        };
        assert_eq!(with(None), Ok(UpstreamProtocol::Http1), "Envoy's default");
        assert_eq!(
            with(explicit(P::Http2ProtocolOptions(Default::default()))),
            Ok(UpstreamProtocol::Http2)
        );
        assert_eq!(
            with(explicit(P::HttpProtocolOptions(Default::default()))),
            Ok(UpstreamProtocol::Http1)
        );
        assert_eq!(
            with(Some(U::UseDownstreamProtocolConfig(Default::default()))),
            Ok(UpstreamProtocol::Downstream { http2: false })
        );
        let e = with(explicit(P::Http3ProtocolOptions(Default::default()))).unwrap_err();
        assert!(e.contains("HTTP/3 is not supported"), "{e}");
        let e = with(Some(U::AutoConfig(Default::default()))).unwrap_err();
        assert!(e.contains("auto_config"), "{e}");
    }

    #[test]
    fn weighted_tcp() {
        let c = vec![("a".to_string(), 1), ("b".to_string(), 3)];
        let hits = (0..4u64)
            .filter(|r| pick_weighted(&c, *r) == Some("b"))
            .count();
        assert_eq!(hits, 3);
    }
}
