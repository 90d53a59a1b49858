//! The mesh as the proxies see it (workloads, services, L4 policies), shaped like Istio's workload API: one immutable snapshot, shared by ztunnel and the waypoint.

pub mod proto;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::identity::Identity;
use serde::{Serialize, Serializer};

/// Istio's default trust domain, used when a workload does not name one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Kubernetes' service account for pods that do not name one.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// istiod's cluster id when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Port on which waypoints and node proxies accept HBONE.
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// Istio's root namespace: GLOBAL policies normally live here.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TunnelProtocol {
    #[default]
    None,
    Hbone,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// Where to send traffic that must go through a waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

impl GatewayAddress {
    pub fn new(destination: GatewayDestination) -> Self {
        GatewayAddress {
            destination,
            hbone_mtls_port: DEFAULT_HBONE_PORT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    Address(IpAddr),
    Hostname { namespace: String, hostname: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub hostname: String,
    pub network: String,
    pub trust_domain: String,
    pub service_account: String,
    pub node: String,
    pub cluster_id: String,
    pub tunnel_protocol: TunnelProtocol,
    pub waypoint: Option<GatewayAddress>,
    /// `"<ns>/<hostname>"` → service port → target port.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// `"<ns>/<name>"` of the WORKLOAD_SELECTOR policies that select this workload.
    pub authorization_policies: Vec<String>,
    pub status: HealthStatus,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_type: String,
    pub workload_name: String,
    /// Only the labels some VirtualService `sourceLabels` refers to (an extension of the
    /// workload API); empty otherwise.
    pub labels: BTreeMap<String, String>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            uid: String::new(),
            name: String::new(),
            namespace: String::new(),
            addresses: Vec::new(),
            hostname: String::new(),
            network: String::new(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            service_account: DEFAULT_SERVICE_ACCOUNT.to_string(),
            node: String::new(),
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            tunnel_protocol: TunnelProtocol::None,
            waypoint: None,
            services: BTreeMap::new(),
            authorization_policies: Vec::new(),
            status: HealthStatus::Healthy,
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_type: String::new(),
            workload_name: String::new(),
            labels: BTreeMap::new(),
        }
    }
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity {
            trust_domain: self.trust_domain.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }

    /// How errors and logs name a workload: uids are long and opaque, so lead with `ns/name`.
    fn describe(&self) -> String {
        format!("{}/{} (uid {:?})", self.namespace, self.name, self.uid)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub service_port: u16,
    /// 0 when unknown (Kubernetes named target ports differ per pod): endpoints then say.
    pub target_port: u16,
    pub app_protocol: AppProtocol,
}

/// A service port's application protocol (the workload API's values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppProtocol {
    /// Not known: handled as opaque TCP.
    #[default]
    Unknown,
    Http11,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl AppProtocol {
    /// Handled as HTTP (L7) by a waypoint; the rest is L4.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http11 | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }

    /// Istio's rule for a Kubernetes service port: `appProtocol` first, else the port name's
    /// prefix before the first `-` (case-insensitive). TCP, TLS and unknown names stay
    /// `Unknown` (what Istio's control plane sends for them).
    pub fn of_port(app_protocol: &str, port_name: &str) -> AppProtocol {
        let by_name = |n: &str| match n.to_ascii_lowercase().as_str() {
            "http" => Some(AppProtocol::Http11),
            "http2" => Some(AppProtocol::Http2),
            "grpc" | "grpc-web" => Some(AppProtocol::Grpc),
            _ => None,
        };
        match app_protocol {
            "kubernetes.io/h2c" => return AppProtocol::Http2,
            "kubernetes.io/ws" => return AppProtocol::Http11,
            "" => {}
            other => {
                if let Some(p) = by_name(other) {
                    return p;
                }
                return AppProtocol::Unknown;
            }
        }
        let lower = port_name.to_ascii_lowercase();
        if lower.starts_with("grpc-web") {
            return AppProtocol::Grpc;
        }
        by_name(lower.split('-').next().unwrap_or("")).unwrap_or(AppProtocol::Unknown)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// The VIPs; empty for headless services.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The xDS resource name, which is also what workloads use to refer to the service.
    pub fn key(&self) -> String {
        service_key(&self.namespace, &self.hostname)
    }

    pub fn port(&self, service_port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.service_port == service_port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any value at all, as long as there is one.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// An IP network. Serialised and parsed as `addr/prefix`; a bare address is a host route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a CIDR (expected <ip> or <ip>/<prefix length>)")]
pub struct CidrError(String);

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        if prefix > max_prefix(addr) {
            return Err(CidrError(format!("{addr}/{prefix}")));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix: max_prefix(addr),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; policies say a.b.c.d.
        match (self.addr.to_canonical(), ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// Compares the top `prefix` of `bits` bits; the fields are public, so an oversized prefix is
/// treated as a host route rather than trusted.
fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    let prefix = u32::from(prefix).min(bits);
    if prefix == 0 {
        return true;
    }
    let shift = bits - prefix;
    (a >> shift) == (b >> shift)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_string());
        match s.split_once('/') {
            None => s.parse().map(Cidr::host).map_err(|_| bad()),
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| bad())?;
                // u8::from_str accepts "+8"; a prefix length is plain digits.
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let prefix: u8 = prefix.parse().map_err(|_| bad())?;
                Cidr::new(addr, prefix).map_err(|_| bad())
            }
        }
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One set of conditions; every non-empty field must hold (see `authorization`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<StringMatch>,
    pub not_service_accounts: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// Matches if any of its matches does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Matches if all of its clauses do; so a rule without clauses matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Matches if any rule does; so a policy without rules matches nothing.
    pub rules: Vec<Rule>,
    pub dry_run: bool,
}

impl Authorization {
    /// The xDS resource name, which is also what workloads use to refer to the policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("workloads {first} and {second} have the same uid")]
    DuplicateUid { first: String, second: String },
    #[error("workloads {first} and {second} both have address {ip}")]
    DuplicateWorkloadAddress {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("service {key:?} is defined twice: {first} and {second}")]
    DuplicateService {
        key: String,
        first: String,
        second: String,
    },
    #[error("services {first} and {second} both have VIP {ip}")]
    DuplicateVip {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("{ip} is both an address of workload {workload} and a VIP of service {service}")]
    WorkloadAddressIsVip {
        ip: IpAddr,
        workload: String,
        service: String,
    },
    #[error("policy {key:?} is defined twice")]
    DuplicatePolicy { key: String },
}

/// Where a connection to some address should go.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    Workload {
        workload: Arc<Workload>,
        port: u16,
    },
    Service {
        service: Arc<Service>,
        endpoint: Arc<Workload>,
        target_port: u16,
    },
    NoHealthyEndpoint {
        service: Arc<Service>,
    },
    /// Not a mesh address: send it where it was going.
    Passthrough,
    /// The destination (the service dialled by VIP, or the pod dialled by IP) is bound to a
    /// waypoint: tunnel to one of the waypoint's pods, with the original destination as the
    /// CONNECT authority. Only [`State::resolve_from`] answers this.
    Waypoint {
        /// The waypoint pod chosen (round robin over the healthy ones); the server identity to
        /// expect is its own.
        waypoint: Arc<Workload>,
        /// Where to open HBONE: the waypoint pod's address (in the destination's address family
        /// when it has one) and the gateway's `hbone_mtls_port`.
        address: SocketAddr,
        /// The service dialled, when the client dialled a VIP.
        service: Option<Arc<Service>>,
    },
    /// The destination is bound to a waypoint that cannot take the connection: refuse it.
    /// Going around the waypoint would skip the policies it enforces, so there is no fallback.
    WaypointUnavailable {
        gateway: GatewayAddress,
        reason: WaypointError,
    },
}

/// Why a waypoint cannot take a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaypointError {
    #[error("its service {0:?} is unknown")]
    UnknownService(String),
    #[error("its service {0:?} has no healthy endpoint")]
    NoHealthyEndpoint(String),
    #[error("its address {0} is neither a workload nor a service")]
    UnknownAddress(IpAddr),
    #[error("its workload {0} has no address")]
    NoAddress(String),
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.destination {
            GatewayDestination::Address(ip) => {
                write!(f, "{}", SocketAddr::new(*ip, self.hbone_mtls_port))
            }
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => {
                write!(f, "{namespace}/{hostname}:{}", self.hbone_mtls_port)
            }
        }
    }
}

/// One immutable snapshot of the mesh. Build it once, share it as `Arc<State>`, and build a
/// new one on change; readers never see a half-applied update.
#[derive(Debug, Default)]
pub struct State {
    workloads: BTreeMap<String, Arc<Workload>>,
    workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: BTreeMap<String, Arc<Service>>,
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Service key → the workloads that list it, in uid order, whatever their health.
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    policies: BTreeMap<String, Arc<Authorization>>,
    global_policies: Vec<Arc<Authorization>>,
    namespace_policies: HashMap<String, Vec<Arc<Authorization>>>,
    next_endpoint: AtomicUsize,
}

impl State {
    pub fn new(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) -> Result<State, StateError> {
        State::from_shared(
            workloads.into_iter().map(Arc::new).collect(),
            services.into_iter().map(Arc::new).collect(),
            policies.into_iter().map(Arc::new).collect(),
        )
    }

    /// Like `new`, for callers (an xDS client) that carry unchanged objects over from the
    /// previous snapshot instead of copying them.
    pub fn from_shared(
        workloads: Vec<Arc<Workload>>,
        services: Vec<Arc<Service>>,
        policies: Vec<Arc<Authorization>>,
    ) -> Result<State, StateError> {
        let mut state = State::default();

        for w in workloads {
            if let Some(prev) = state.workloads.get(&w.uid) {
                return Err(StateError::DuplicateUid {
                    first: prev.describe(),
                    second: w.describe(),
                });
            }
            for &ip in &w.addresses {
                let ip = ip.to_canonical();
                match state.workloads_by_ip.get(&ip) {
                    // Listing an address twice on one workload is redundant, not a conflict.
                    Some(prev) if prev.uid == w.uid => {}
                    Some(prev) => {
                        return Err(StateError::DuplicateWorkloadAddress {
                            ip,
                            first: prev.describe(),
                            second: w.describe(),
                        });
                    }
                    None => {
                        state.workloads_by_ip.insert(ip, w.clone());
                    }
                }
            }
            state.workloads.insert(w.uid.clone(), w);
        }

        for s in services {
            let key = s.key();
            if let Some(prev) = state.services.get(&key) {
                return Err(StateError::DuplicateService {
                    key,
                    first: format!("{}/{}", prev.namespace, prev.name),
                    second: format!("{}/{}", s.namespace, s.name),
                });
            }
            for &ip in &s.addresses {
                let ip = ip.to_canonical();
                if let Some(w) = state.workloads_by_ip.get(&ip) {
                    // Otherwise `resolve` would silently prefer one of them.
                    return Err(StateError::WorkloadAddressIsVip {
                        ip,
                        workload: w.describe(),
                        service: key,
                    });
                }
                match state.services_by_vip.get(&ip) {
                    Some(prev) if prev.key() == key => {}
                    Some(prev) => {
                        return Err(StateError::DuplicateVip {
                            ip,
                            first: prev.key(),
                            second: key,
                        });
                    }
                    None => {
                        state.services_by_vip.insert(ip, s.clone());
                    }
                }
            }
            state.services.insert(key, s);
        }

        // Workloads are in uid order here, so endpoint lists are deterministic.
        for w in state.workloads.values() {
            for key in w.services.keys() {
                state
                    .endpoints
                    .entry(key.clone())
                    .or_default()
                    .push(w.clone());
            }
        }

        for p in policies {
            let key = p.key();
            if state.policies.contains_key(&key) {
                return Err(StateError::DuplicatePolicy { key });
            }
            state.policies.insert(key, p);
        }
        for p in state.policies.values() {
            match p.scope {
                Scope::Global => state.global_policies.push(p.clone()),
                Scope::Namespace => state
                    .namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                Scope::WorkloadSelector => {}
            }
        }

        Ok(state)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip.to_canonical())
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip.to_canonical())
    }

    /// `key` is `"<ns>/<hostname>"`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// `key` is `"<ns>/<name>"`.
    pub fn policy(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.policies.get(key)
    }

    pub fn workloads_on_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node == node)
    }

    /// In uid order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// In key order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// In key order.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    /// Every workload that lists the service, healthy or not, in uid order.
    pub fn endpoints(&self, service_key: &str) -> Vec<&Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .map(|eps| eps.iter().collect())
            .unwrap_or_default()
    }

    /// Where a connection to `dst` leads, ignoring waypoints: the workload with that address,
    /// a healthy endpoint of the service with that VIP (round robin), or outside the mesh.
    pub fn resolve(&self, dst: SocketAddr) -> Destination {
        let ip = dst.ip();
        let port = dst.port();
        if let Some(workload) = self.workload_by_ip(ip) {
            return Destination::Workload {
                workload: workload.clone(),
                port,
            };
        }
        let Some(service) = self.service_by_vip(ip) else {
            return Destination::Passthrough;
        };
        let key = service.key();
        let Some(endpoint) = self.pick_healthy(&key) else {
            return Destination::NoHealthyEndpoint {
                service: service.clone(),
            };
        };
        let target_port = endpoint
            .services
            .get(&key)
            .and_then(|ports| ports.get(&port))
            .copied()
            .or_else(|| {
                service
                    .port(port)
                    .map(|p| p.target_port)
                    .filter(|&p| p != 0)
            })
            .unwrap_or(port);
        Destination::Service {
            service: service.clone(),
            endpoint: endpoint.clone(),
            target_port,
        }
    }

    /// Where a node proxy sends a connection from `source` (the client pod's workload, when
    /// known) to `dst`: like [`State::resolve`], except that a destination bound to a waypoint
    /// (a service dialled by VIP whose `waypoint` is set, or a pod dialled by IP whose workload
    /// has one) resolves to that waypoint. A waypoint's own traffic is never sent back to it.
    pub fn resolve_from(&self, source: Option<&Workload>, dst: SocketAddr) -> Destination {
        let ip = dst.ip();
        let (gateway, service) = if let Some(w) = self.workload_by_ip(ip) {
            (w.waypoint.as_ref(), None)
        } else if let Some(s) = self.service_by_vip(ip) {
            (s.waypoint.as_ref(), Some(s))
        } else {
            (None, None)
        };
        let Some(gateway) = gateway else {
            return self.resolve(dst);
        };
        if source.is_some_and(|s| self.is_waypoint(s, gateway)) {
            return self.resolve(dst);
        }
        match self.waypoint_pod(gateway) {
            Ok(waypoint) => {
                let Some(pod_ip) = pick_address(&waypoint.addresses, dst) else {
                    return Destination::WaypointUnavailable {
                        gateway: gateway.clone(),
                        reason: WaypointError::NoAddress(waypoint.describe()),
                    };
                };
                Destination::Waypoint {
                    address: SocketAddr::new(pod_ip, gateway.hbone_mtls_port),
                    waypoint,
                    service: service.cloned(),
                }
            }
            Err(reason) => Destination::WaypointUnavailable {
                gateway: gateway.clone(),
                reason,
            },
        }
    }

    /// Whether `workload` is (a pod of) the waypoint `gateway` names.
    fn is_waypoint(&self, workload: &Workload, gateway: &GatewayAddress) -> bool {
        match &gateway.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => workload
                .services
                .contains_key(&service_key(namespace, hostname)),
            GatewayDestination::Address(ip) => {
                let ip = ip.to_canonical();
                workload.addresses.iter().any(|a| a.to_canonical() == ip)
                    || self
                        .service_by_vip(ip)
                        .is_some_and(|s| workload.services.contains_key(&s.key()))
            }
        }
    }

    /// One healthy pod of the waypoint `gateway` names: an endpoint of its service (by
    /// hostname, or by VIP for an address), or the workload with that address.
    fn waypoint_pod(&self, gateway: &GatewayAddress) -> Result<Arc<Workload>, WaypointError> {
        let key = match &gateway.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => {
                let key = service_key(namespace, hostname);
                if !self.services.contains_key(&key) {
                    return Err(WaypointError::UnknownService(key));
                }
                key
            }
            GatewayDestination::Address(ip) => {
                if let Some(w) = self.workload_by_ip(*ip) {
                    return match w.status {
                        HealthStatus::Healthy => Ok(w.clone()),
                        HealthStatus::Unhealthy => {
                            Err(WaypointError::NoHealthyEndpoint(w.describe()))
                        }
                    };
                }
                match self.service_by_vip(*ip) {
                    Some(s) => s.key(),
                    None => return Err(WaypointError::UnknownAddress(*ip)),
                }
            }
        };
        self.pick_healthy(&key)
            .cloned()
            .ok_or(WaypointError::NoHealthyEndpoint(key))
    }

    /// The next healthy endpoint of the service `key`, round robin.
    fn pick_healthy(&self, key: &str) -> Option<&Arc<Workload>> {
        let healthy = || {
            self.endpoints
                .get(key)
                .into_iter()
                .flatten()
                .filter(|w| w.status == HealthStatus::Healthy)
        };
        // Counting, then taking the nth, avoids allocating a candidate list per connection.
        let count = healthy().count();
        if count == 0 {
            return None;
        }
        let n = self.next_endpoint.fetch_add(1, Ordering::Relaxed) % count;
        healthy().nth(n)
    }

    /// The policies that apply to traffic for `workload`, each once: mesh-wide (GLOBAL) ones,
    /// its namespace's, then those that select it by name.
    pub fn policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Authorization> {
        let global = self.global_policies.iter();
        let namespace = self
            .namespace_policies
            .get(&workload.namespace)
            .into_iter()
            .flatten();
        let names = &workload.authorization_policies;
        let named = names.iter().enumerate().filter_map(move |(i, name)| {
            if names[..i].contains(name) {
                return None;
            }
            let p = self.policies.get(name)?;
            let already_listed = match p.scope {
                Scope::Global => true,
                Scope::Namespace => p.namespace == workload.namespace,
                Scope::WorkloadSelector => false,
            };
            (!already_listed).then_some(p)
        });
        global.chain(namespace).chain(named).map(|p| p.as_ref())
    }
}

/// A service's key from its namespace and hostname (see [`Service::key`]).
fn service_key(namespace: &str, hostname: &str) -> String {
    format!("{namespace}/{hostname}")
}

/// The address of `addresses` to reach `dst`'s family with, else the first one.
fn pick_address(addresses: &[IpAddr], dst: SocketAddr) -> Option<IpAddr> {
    addresses
        .iter()
        .find(|a| a.is_ipv4() == dst.is_ipv4())
        .or(addresses.first())
        .copied()
}

/// The `/config_dump` shape.
impl Serialize for State {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Dump<'a> {
            workloads: Vec<&'a Workload>,
            services: Vec<&'a Service>,
            policies: Vec<&'a Authorization>,
        }
        Dump {
            workloads: self.workloads.values().map(|w| w.as_ref()).collect(),
            services: self.services.values().map(|s| s.as_ref()).collect(),
            policies: self.policies.values().map(|p| p.as_ref()).collect(),
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocol_as_istio_decides() {
        let of = AppProtocol::of_port;
        assert_eq!(of("", "http"), AppProtocol::Http11);
        assert_eq!(of("", "HTTP-web"), AppProtocol::Http11);
        assert_eq!(of("", "http2-x"), AppProtocol::Http2);
        assert_eq!(of("", "grpc"), AppProtocol::Grpc);
        assert_eq!(of("", "grpc-web"), AppProtocol::Grpc);
        assert_eq!(of("", "https"), AppProtocol::Unknown);
        assert_eq!(of("", "tcp-db"), AppProtocol::Unknown);
        assert_eq!(of("", ""), AppProtocol::Unknown);
        assert_eq!(of("kubernetes.io/h2c", "tcp"), AppProtocol::Http2);
        assert_eq!(of("kubernetes.io/ws", ""), AppProtocol::Http11);
        assert_eq!(of("http2", "tcp"), AppProtocol::Http2);
        assert_eq!(
            of("mysql", "http"),
            AppProtocol::Unknown,
            "appProtocol wins"
        );
        assert!(AppProtocol::Grpc.is_http() && !AppProtocol::Unknown.is_http());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn workload(ns: &str, name: &str, addr: &str) -> Workload {
        Workload {
            uid: format!("cluster1//v1/Pod/{ns}/{name}"),
            name: name.to_string(),
            namespace: ns.to_string(),
            addresses: vec![ip(addr)],
            node: "node1".to_string(),
            ..Workload::default()
        }
    }

    fn endpoint_of(mut w: Workload, svc: &Service, ports: &[(u16, u16)]) -> Workload {
        w.services
            .insert(svc.key(), ports.iter().copied().collect());
        w
    }

    fn service(ns: &str, name: &str, vip: &str, ports: &[(u16, u16)]) -> Service {
        Service {
            name: name.to_string(),
            namespace: ns.to_string(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            addresses: vec![ip(vip)],
            ports: ports
                .iter()
                .map(|&(service_port, target_port)| ServicePort {
                    service_port,
                    target_port,
                    app_protocol: AppProtocol::Unknown,
                })
                .collect(),
            ..Service::default()
        }
    }

    fn policy(ns: &str, name: &str, scope: Scope) -> Authorization {
        Authorization {
            name: name.to_string(),
            namespace: ns.to_string(),
            scope,
            action: Action::Allow,
            rules: vec![],
            dry_run: false,
        }
    }

    #[test]
    fn defaults_and_identity() {
        let w = workload("default", "a", "10.0.0.1");
        assert_eq!(w.trust_domain, "cluster.local");
        assert_eq!(w.service_account, "default");
        assert_eq!(w.cluster_id, "Kubernetes");
        assert_eq!(w.tunnel_protocol, TunnelProtocol::None);
        assert_eq!(w.status, HealthStatus::Healthy);
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert_eq!(
            GatewayAddress::new(GatewayDestination::Address(ip("10.0.0.9"))).hbone_mtls_port,
            15008
        );
    }

    #[test]
    fn keys() {
        let s = service("default", "reviews", "10.96.0.1", &[]);
        assert_eq!(s.key(), "default/reviews.default.svc.cluster.local");
        assert_eq!(
            policy("default", "allow", Scope::Namespace).key(),
            "default/allow"
        );
    }

    #[test]
    fn string_match() {
        assert!(StringMatch::Exact("a".into()).matches("a"));
        assert!(!StringMatch::Exact("a".into()).matches("ab"));
        assert!(StringMatch::Prefix("a".into()).matches("ab"));
        assert!(!StringMatch::Prefix("b".into()).matches("ab"));
        assert!(StringMatch::Suffix("b".into()).matches("ab"));
        assert!(!StringMatch::Suffix("a".into()).matches("ab"));
        assert!(StringMatch::Presence.matches("x"));
        assert!(!StringMatch::Presence.matches(""));
    }

    #[test]
    fn cidr() {
        let net: Cidr = "10.244.2.0/24".parse().unwrap();
        assert!(net.contains(ip("10.244.2.7")));
        assert!(net.contains(ip("::ffff:10.244.2.7")));
        assert!(!net.contains(ip("10.244.3.7")));
        assert!(!net.contains(ip("fd00::1")));
        assert_eq!(net.to_string(), "10.244.2.0/24");

        let host: Cidr = "10.0.0.1".parse().unwrap();
        assert_eq!(host.prefix, 32);
        assert!(host.contains(ip("10.0.0.1")));
        assert!(!host.contains(ip("10.0.0.2")));

        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix, 128);

        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "x",
            "::/129",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} accepted");
        }
        // An out-of-range prefix set directly is clamped to a host match.
        let odd = Cidr {
            addr: ip("10.0.0.1"),
            prefix: 99,
        };
        assert!(odd.contains(ip("10.0.0.1")));
        assert!(!odd.contains(ip("10.0.0.2")));
    }

    #[test]
    fn indexes() {
        let svc = service("default", "reviews", "10.96.0.1", &[(9080, 9080)]);
        let mut a = workload("default", "a", "10.0.0.1");
        a.addresses.push(ip("fd00::1"));
        a.node = "node2".into();
        let b = workload("default", "b", "10.0.0.2");
        let state = State::new(
            vec![a.clone(), b],
            vec![svc.clone()],
            vec![policy("default", "p", Scope::Namespace)],
        )
        .unwrap();

        assert_eq!(state.workload_by_ip(ip("10.0.0.1")).unwrap().name, "a");
        assert_eq!(state.workload_by_ip(ip("fd00::1")).unwrap().name, "a");
        assert_eq!(
            state.workload_by_ip(ip("::ffff:10.0.0.2")).unwrap().name,
            "b"
        );
        assert!(state.workload_by_ip(ip("10.0.0.3")).is_none());
        assert_eq!(state.workload_by_uid(&a.uid).unwrap().as_ref(), &a);
        assert_eq!(
            state.service_by_vip(ip("10.96.0.1")).unwrap().name,
            "reviews"
        );
        assert!(state.service(&svc.key()).is_some());
        assert!(state.policy("default/p").is_some());
        assert!(state.policy("default/q").is_none());
        let on2: Vec<_> = state.workloads_on_node("node2").map(|w| &w.name).collect();
        assert_eq!(on2, ["a"]);
        assert_eq!(state.workloads().count(), 2);
        assert_eq!(state.services().count(), 1);
        assert_eq!(state.policies().count(), 1);
    }

    #[test]
    fn duplicates_are_rejected_naming_both() {
        let a = workload("default", "a", "10.0.0.1");
        let mut a2 = workload("other", "a2", "10.0.0.2");
        a2.uid = a.uid.clone();
        let err = State::new(vec![a.clone(), a2], vec![], vec![]).unwrap_err();
        assert!(matches!(err, StateError::DuplicateUid { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("default/a") && msg.contains("other/a2"),
            "{msg}"
        );

        let b = workload("default", "b", "10.0.0.1");
        let msg = State::new(vec![a.clone(), b], vec![], vec![])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("default/a ") && msg.contains("default/b ") && msg.contains("10.0.0.1"),
            "{msg}"
        );

        let mut twice = workload("default", "t", "10.0.0.5");
        twice.addresses.push(ip("10.0.0.5"));
        assert!(State::new(vec![twice], vec![], vec![]).is_ok());

        let s1 = service("default", "x", "10.96.0.1", &[]);
        let s2 = service("default", "y", "10.96.0.1", &[]);
        let msg = State::new(vec![], vec![s1.clone(), s2], vec![])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("default/x.default.svc.cluster.local")
                && msg.contains("default/y.default.svc.cluster.local"),
            "{msg}"
        );

        let mut s3 = service("default", "x3", "10.96.0.3", &[]);
        s3.hostname = s1.hostname.clone();
        let err = State::new(vec![], vec![s1.clone(), s3], vec![]).unwrap_err();
        assert!(matches!(err, StateError::DuplicateService { .. }));
        assert!(err.to_string().contains("default/x3"), "{err}");

        let clash = service("default", "z", "10.0.0.1", &[]);
        let err = State::new(vec![a], vec![clash], vec![]).unwrap_err();
        assert!(matches!(err, StateError::WorkloadAddressIsVip { .. }));

        let p = policy("default", "p", Scope::Namespace);
        let err = State::new(vec![], vec![], vec![p.clone(), p]).unwrap_err();
        assert_eq!(
            err,
            StateError::DuplicatePolicy {
                key: "default/p".into()
            }
        );
    }

    #[test]
    fn resolve_workload_and_passthrough() {
        let a = workload("default", "a", "10.0.0.1");
        let state = State::new(vec![a], vec![], vec![]).unwrap();
        match state.resolve(sa("10.0.0.1:8080")) {
            Destination::Workload { workload, port } => {
                assert_eq!(workload.name, "a");
                assert_eq!(port, 8080);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(state.resolve(sa("1.1.1.1:443")), Destination::Passthrough);
    }

    #[test]
    fn resolve_service_round_robin_over_healthy() {
        let svc = service("default", "reviews", "10.96.0.1", &[(9080, 9080)]);
        let a = endpoint_of(workload("default", "a", "10.0.0.1"), &svc, &[(9080, 9080)]);
        let b = endpoint_of(workload("default", "b", "10.0.0.2"), &svc, &[(9080, 9080)]);
        let mut sick = endpoint_of(workload("default", "c", "10.0.0.3"), &svc, &[(9080, 9080)]);
        sick.status = HealthStatus::Unhealthy;
        let state = State::new(vec![sick, b, a], vec![svc.clone()], vec![]).unwrap();

        assert_eq!(state.endpoints(&svc.key()).len(), 3);
        assert!(state.endpoints("default/nope").is_empty());

        let mut seen = Vec::new();
        for _ in 0..4 {
            match state.resolve(sa("10.96.0.1:9080")) {
                Destination::Service {
                    service,
                    endpoint,
                    target_port,
                } => {
                    assert_eq!(service.name, "reviews");
                    assert_eq!(target_port, 9080);
                    seen.push(endpoint.name.clone());
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(!seen.contains(&"c".to_string()), "{seen:?}");
        assert_ne!(seen[0], seen[1]);
        assert_eq!(seen[0], seen[2]);
        assert_eq!(seen[1], seen[3]);
    }

    #[test]
    fn resolve_target_port_precedence() {
        let svc = service("default", "s", "10.96.0.1", &[(80, 8080), (81, 0)]);
        let from_workload = endpoint_of(workload("default", "a", "10.0.0.1"), &svc, &[(80, 9090)]);
        let state = State::new(vec![from_workload], vec![svc.clone()], vec![]).unwrap();
        let port_of = |state: &State, dst: &str| match state.resolve(sa(dst)) {
            Destination::Service { target_port, .. } => target_port,
            other => panic!("{other:?}"),
        };
        assert_eq!(port_of(&state, "10.96.0.1:80"), 9090);

        let from_service = endpoint_of(workload("default", "a", "10.0.0.1"), &svc, &[]);
        let state = State::new(vec![from_service], vec![svc.clone()], vec![]).unwrap();
        assert_eq!(port_of(&state, "10.96.0.1:80"), 8080);
        // Target port unknown to the service: fall back to the service port.
        assert_eq!(port_of(&state, "10.96.0.1:81"), 81);
        assert_eq!(port_of(&state, "10.96.0.1:82"), 82);
    }

    #[test]
    fn resolve_no_healthy_endpoint() {
        let svc = service("default", "s", "10.96.0.1", &[(80, 80)]);
        let state = State::new(vec![], vec![svc.clone()], vec![]).unwrap();
        assert!(matches!(
            state.resolve(sa("10.96.0.1:80")),
            Destination::NoHealthyEndpoint { .. }
        ));
        let mut sick = endpoint_of(workload("default", "a", "10.0.0.1"), &svc, &[(80, 80)]);
        sick.status = HealthStatus::Unhealthy;
        let state = State::new(vec![sick], vec![svc], vec![]).unwrap();
        match state.resolve(sa("10.96.0.1:80")) {
            Destination::NoHealthyEndpoint { service } => assert_eq!(service.name, "s"),
            other => panic!("{other:?}"),
        }
    }

    /// `default/waypoint` with pods wp-a, wp-b (healthy) and wp-c (unhealthy); `reviews` bound
    /// to it; pod `bound` bound to it as a workload; `client` a plain mesh pod.
    fn waypoint_state() -> State {
        let wp_svc = service("default", "waypoint", "10.96.0.99", &[(15008, 15008)]);
        let mut reviews = service("default", "reviews", "10.96.0.1", &[(9080, 9080)]);
        reviews.addresses.push(ip("fd00::96:1"));
        let gateway = GatewayAddress::new(GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        });
        reviews.waypoint = Some(gateway.clone());
        let mut wp_a = endpoint_of(
            workload("default", "wp-a", "10.0.1.1"),
            &wp_svc,
            &[(15008, 15008)],
        );
        wp_a.addresses.push(ip("fd00::1:1"));
        let wp_b = endpoint_of(
            workload("default", "wp-b", "10.0.1.2"),
            &wp_svc,
            &[(15008, 15008)],
        );
        let mut wp_c = endpoint_of(
            workload("default", "wp-c", "10.0.1.3"),
            &wp_svc,
            &[(15008, 15008)],
        );
        wp_c.status = HealthStatus::Unhealthy;
        let r1 = endpoint_of(
            workload("default", "r1", "10.0.0.1"),
            &reviews,
            &[(9080, 9080)],
        );
        let mut bound = workload("default", "bound", "10.0.0.2");
        bound.waypoint = Some(GatewayAddress {
            hbone_mtls_port: 15009,
            ..gateway
        });
        let client = workload("default", "client", "10.0.0.3");
        State::new(
            vec![wp_a, wp_b, wp_c, r1, bound, client],
            vec![wp_svc, reviews],
            vec![],
        )
        .unwrap()
    }

    fn waypoint_of(d: Destination) -> (String, SocketAddr, Option<String>) {
        match d {
            Destination::Waypoint {
                waypoint,
                address,
                service,
            } => (
                waypoint.name.clone(),
                address,
                service.map(|s| s.name.clone()),
            ),
            other => panic!("expected a waypoint, got {other:?}"),
        }
    }

    #[test]
    fn service_with_waypoint_resolves_to_its_healthy_pods_round_robin() {
        let state = waypoint_state();
        let client = state.workload_by_ip(ip("10.0.0.3")).cloned();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (name, address, service) =
                waypoint_of(state.resolve_from(client.as_deref(), sa("10.96.0.1:9080")));
            assert_eq!(service.as_deref(), Some("reviews"));
            assert_eq!(address.port(), 15008);
            let pod = state.workload_by_ip(address.ip()).unwrap();
            assert_eq!(pod.name, name, "address is the chosen pod's");
            seen.push(name);
        }
        assert!(!seen.contains(&"wp-c".to_string()), "{seen:?}");
        assert_ne!(seen[0], seen[1]);
        assert_eq!(seen[0], seen[2]);
        // A client that is not a known workload is steered too.
        waypoint_of(state.resolve_from(None, sa("10.96.0.1:9080")));
        // `resolve` itself ignores waypoints.
        assert!(matches!(
            state.resolve(sa("10.96.0.1:9080")),
            Destination::Service { .. }
        ));
    }

    #[test]
    fn waypoint_address_follows_the_destination_family() {
        let state = waypoint_state();
        for _ in 0..2 {
            let (name, address, _) = waypoint_of(state.resolve_from(None, sa("[fd00::96:1]:9080")));
            let want = if name == "wp-a" {
                "fd00::1:1"
            } else {
                "10.0.1.2"
            };
            assert_eq!(address.ip(), ip(want), "{name}");
        }
    }

    #[test]
    fn pod_with_workload_waypoint_resolves_to_the_waypoint_port_it_names() {
        let state = waypoint_state();
        let (_, address, service) = waypoint_of(state.resolve_from(None, sa("10.0.0.2:8080")));
        assert_eq!(address.port(), 15009);
        assert_eq!(service, None);
        // Pods without a waypoint, and addresses outside the mesh, are not steered.
        assert!(matches!(
            state.resolve_from(None, sa("10.0.0.1:9080")),
            Destination::Workload { .. }
        ));
        assert_eq!(
            state.resolve_from(None, sa("192.0.2.1:80")),
            Destination::Passthrough
        );
    }

    #[test]
    fn the_waypoint_itself_goes_direct() {
        let state = waypoint_state();
        let wp = state.workload_by_ip(ip("10.0.1.2")).cloned();
        match state.resolve_from(wp.as_deref(), sa("10.96.0.1:9080")) {
            Destination::Service { endpoint, .. } => assert_eq!(endpoint.name, "r1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            state.resolve_from(wp.as_deref(), sa("10.0.0.2:8080")),
            Destination::Workload { .. }
        ));
    }

    #[test]
    fn waypoint_by_address() {
        let wp_svc = service("default", "waypoint", "10.96.0.99", &[(15008, 15008)]);
        let wp = endpoint_of(
            workload("default", "wp", "10.0.1.1"),
            &wp_svc,
            &[(15008, 15008)],
        );
        let mut by_pod = service("default", "by-pod", "10.96.0.1", &[(80, 80)]);
        by_pod.waypoint = Some(GatewayAddress::new(GatewayDestination::Address(ip(
            "10.0.1.1",
        ))));
        let mut by_vip = service("default", "by-vip", "10.96.0.2", &[(80, 80)]);
        by_vip.waypoint = Some(GatewayAddress::new(GatewayDestination::Address(ip(
            "10.96.0.99",
        ))));
        let mut unknown = service("default", "unknown", "10.96.0.3", &[(80, 80)]);
        unknown.waypoint = Some(GatewayAddress::new(GatewayDestination::Address(ip(
            "192.0.2.9",
        ))));
        let state = State::new(
            vec![wp.clone()],
            vec![wp_svc, by_pod, by_vip, unknown],
            vec![],
        )
        .unwrap();
        for vip in ["10.96.0.1:80", "10.96.0.2:80"] {
            let (name, address, _) = waypoint_of(state.resolve_from(None, sa(vip)));
            assert_eq!(
                (name.as_str(), address),
                ("wp", sa("10.0.1.1:15008")),
                "{vip}"
            );
        }
        match state.resolve_from(None, sa("10.96.0.3:80")) {
            Destination::WaypointUnavailable { reason, .. } => {
                assert_eq!(reason, WaypointError::UnknownAddress(ip("192.0.2.9")))
            }
            other => panic!("{other:?}"),
        }
        // The waypoint pod, identified by its address or its service's VIP, goes direct.
        assert!(matches!(
            state.resolve_from(Some(&wp), sa("10.96.0.1:80")),
            Destination::NoHealthyEndpoint { .. }
        ));
        assert!(matches!(
            state.resolve_from(Some(&wp), sa("10.96.0.2:80")),
            Destination::NoHealthyEndpoint { .. }
        ));
    }

    #[test]
    fn waypoint_without_healthy_pod_refuses_instead_of_bypassing() {
        let mut reviews = service("default", "reviews", "10.96.0.1", &[(9080, 9080)]);
        let r1 = endpoint_of(
            workload("default", "r1", "10.0.0.1"),
            &reviews,
            &[(9080, 9080)],
        );
        let wp_svc = service("default", "waypoint", "10.96.0.99", &[(15008, 15008)]);
        let mut sick = endpoint_of(
            workload("default", "wp", "10.0.1.1"),
            &wp_svc,
            &[(15008, 15008)],
        );
        sick.status = HealthStatus::Unhealthy;
        reviews.waypoint = Some(GatewayAddress::new(GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        }));
        let state = State::new(
            vec![r1.clone(), sick],
            vec![reviews.clone(), wp_svc],
            vec![],
        )
        .unwrap();
        match state.resolve_from(None, sa("10.96.0.1:9080")) {
            Destination::WaypointUnavailable { gateway, reason } => {
                assert_eq!(
                    reason,
                    WaypointError::NoHealthyEndpoint(
                        "default/waypoint.default.svc.cluster.local".into()
                    )
                );
                assert_eq!(
                    format!("{gateway}: {reason}"),
                    "default/waypoint.default.svc.cluster.local:15008: its service \"default/waypoint.default.svc.cluster.local\" has no healthy endpoint"
                );
            }
            other => panic!("{other:?}"),
        }
        // Waypoint service unknown altogether.
        let state = State::new(vec![r1], vec![reviews], vec![]).unwrap();
        match state.resolve_from(None, sa("10.96.0.1:9080")) {
            Destination::WaypointUnavailable { reason, .. } => assert_eq!(
                reason,
                WaypointError::UnknownService("default/waypoint.default.svc.cluster.local".into())
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn policy_selection() {
        let mut w = workload("default", "a", "10.0.0.1");
        w.authorization_policies = vec![
            "default/selected".into(),
            "default/selected".into(),
            "default/ns".into(),
            "istio-system/global".into(),
            "default/missing".into(),
        ];
        let state = State::new(
            vec![],
            vec![],
            vec![
                policy("istio-system", "global", Scope::Global),
                policy("other", "global2", Scope::Global),
                policy("default", "ns", Scope::Namespace),
                policy("other", "ns", Scope::Namespace),
                policy("default", "selected", Scope::WorkloadSelector),
                policy("default", "not-selected", Scope::WorkloadSelector),
            ],
        )
        .unwrap();
        let keys: Vec<String> = state.policies_for(&w).map(|p| p.key()).collect();
        assert_eq!(
            keys,
            [
                "istio-system/global",
                "other/global2",
                "default/ns",
                "default/selected"
            ]
        );

        let other = workload("other", "b", "10.0.0.2");
        let keys: Vec<String> = state.policies_for(&other).map(|p| p.key()).collect();
        assert_eq!(keys, ["istio-system/global", "other/global2", "other/ns"]);
    }

    #[test]
    fn config_dump_json() {
        let svc = service("default", "s", "10.96.0.1", &[(80, 8080)]);
        let mut w = endpoint_of(workload("default", "a", "10.0.0.1"), &svc, &[(80, 8080)]);
        w.tunnel_protocol = TunnelProtocol::Hbone;
        w.waypoint = Some(GatewayAddress::new(GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        }));
        let mut p = policy("default", "p", Scope::WorkloadSelector);
        p.action = Action::Deny;
        p.rules = vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![
                        StringMatch::Prefix("cluster.local/".into()),
                        StringMatch::Presence,
                    ],
                    source_ips: vec!["10.0.0.0/8".parse().unwrap()],
                    ..Match::default()
                }],
            }],
        }];
        let state = State::new(vec![w], vec![svc], vec![p]).unwrap();
        let json = serde_json::to_value(&state).unwrap();
        let w = &json["workloads"][0];
        assert_eq!(w["tunnelProtocol"], "HBONE");
        assert_eq!(w["status"], "HEALTHY");
        assert_eq!(w["trustDomain"], "cluster.local");
        assert_eq!(w["addresses"][0], "10.0.0.1");
        assert_eq!(w["waypoint"]["hboneMtlsPort"], 15008);
        assert_eq!(
            w["waypoint"]["destination"]["hostname"]["namespace"],
            "default"
        );
        assert_eq!(
            w["services"]["default/s.default.svc.cluster.local"]["80"],
            8080
        );
        assert_eq!(json["services"][0]["ports"][0]["targetPort"], 8080);
        let p = &json["policies"][0];
        assert_eq!(p["scope"], "WORKLOAD_SELECTOR");
        assert_eq!(p["action"], "DENY");
        assert_eq!(p["dryRun"], false);
        let m = &p["rules"][0]["clauses"][0]["matches"][0];
        assert_eq!(m["principals"][0]["prefix"], "cluster.local/");
        assert_eq!(m["principals"][1], "presence");
        assert_eq!(m["sourceIps"][0], "10.0.0.0/8");
        assert_eq!(serde_json::to_value(Scope::Global).unwrap(), "GLOBAL");
        assert_eq!(serde_json::to_value(Action::Allow).unwrap(), "ALLOW");
        assert_eq!(serde_json::to_value(TunnelProtocol::None).unwrap(), "NONE");
        assert_eq!(
            serde_json::to_value(HealthStatus::Unhealthy).unwrap(),
            "UNHEALTHY"
        );
    }
}
