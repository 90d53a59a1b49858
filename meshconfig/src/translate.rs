//! Translation of a model snapshot into Istio's workload API: `Address` (workloads, services) and `Authorization` resources, each with a content version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use mesh::proto::security as pb_sec;
use mesh::proto::workload as pb;
use prost::Message;

use crate::k8s::{
    AuthorizationPolicy, DATAPLANE_MODE, Operation, Pod, PolicyAction, PolicyRule, Problem,
    Service, ServicePort, Source, TUNNEL, TargetPort, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE,
};
use crate::model::Snapshot;

/// Mesh-wide settings that translation needs.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub cluster_id: String,
    pub trust_domain: String,
    /// Kubernetes' cluster domain: services are `<name>.<ns>.svc.<domain>`.
    pub domain: String,
    /// Policies without a selector here apply to the whole mesh.
    pub root_namespace: String,
    /// Send `istio.io/dry-run` policies (with `dry_run` set) instead of leaving them out.
    /// Istio's control plane leaves them out because a node proxy that does not know the
    /// field ignores it and would enforce the policy; turn this on only when every node proxy
    /// understands it (ours does: it logs what the policy would have done).
    pub send_dry_run: bool,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            send_dry_run: false,
        }
    }
}

/// One xDS resource, encoded once and shared by every connection that sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    /// A hash of the encoded bytes: equal content gives an equal version, across restarts too.
    pub version: String,
    pub body: Bytes,
    /// The other names a client may ask for this resource by (on-demand xDS): for an
    /// Address, `<network>/<ip>` per address, as Istio's workload API defines.
    pub aliases: Vec<String>,
    /// The node a workload runs on: its node's proxy gets it even without asking.
    pub node: Option<String>,
}

impl Resource {
    pub fn new(name: String, message: &impl Message) -> Arc<Resource> {
        let body = Bytes::from(message.encode_to_vec());
        Arc::new(Resource {
            name,
            version: format!("{:016x}", fnv1a(&body)),
            body,
            aliases: Vec::new(),
            node: None,
        })
    }

    /// An `istio.workload.Address`, with its `<network>/<ip>` aliases and its node.
    pub fn address(name: String, address: &pb::Address) -> Arc<Resource> {
        let alias = |network: &str, ip: &[u8]| {
            let ip = match ip.len() {
                4 => <[u8; 4]>::try_from(ip).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(ip).ok().map(IpAddr::from),
                _ => None,
            }?;
            Some(format!("{network}/{ip}"))
        };
        let (aliases, node) = match &address.r#type {
            Some(pb::address::Type::Workload(w)) => (
                w.addresses
                    .iter()
                    .filter_map(|ip| alias(&w.network, ip))
                    .collect(),
                Some(w.node.clone()).filter(|n| !n.is_empty()),
            ),
            Some(pb::address::Type::Service(s)) => (
                s.addresses
                    .iter()
                    .filter_map(|a| alias(&a.network, &a.address))
                    .collect(),
                None,
            ),
            None => (Vec::new(), None),
        };
        let mut r = Resource::new(name, address);
        if let Some(r) = Arc::get_mut(&mut r) {
            r.aliases = aliases;
            r.node = node;
        }
        r
    }
}

/// Every resource of one type, by name.
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// What the xDS server serves one connection: one map per type URL. The Envoy types are
/// empty except in a waypoint's view.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resources {
    pub addresses: ResourceMap,
    pub authorizations: ResourceMap,
    pub clusters: ResourceMap,
    pub endpoints: ResourceMap,
    pub listeners: ResourceMap,
    pub routes: ResourceMap,
}

impl Resources {
    pub fn of_type(&self, type_url: &str) -> Option<&ResourceMap> {
        use crate::waypoint as w;
        match type_url {
            mesh::proto::ADDRESS_TYPE_URL => Some(&self.addresses),
            mesh::proto::AUTHORIZATION_TYPE_URL => Some(&self.authorizations),
            w::CLUSTER_TYPE_URL => Some(&self.clusters),
            w::ENDPOINT_TYPE_URL => Some(&self.endpoints),
            w::LISTENER_TYPE_URL => Some(&self.listeners),
            w::ROUTE_TYPE_URL => Some(&self.routes),
            _ => None,
        }
    }

    /// A waypoint's view: the workload API for every proxy, plus its own Envoy resources.
    pub fn with_waypoint(&self, w: &crate::waypoint::WaypointResources) -> Resources {
        Resources {
            addresses: self.addresses.clone(),
            authorizations: self.authorizations.clone(),
            clusters: w.clusters.clone(),
            endpoints: w.endpoints.clone(),
            listeners: w.listeners.clone(),
            routes: w.routes.clone(),
        }
    }

    /// `self` plus the Envoy resources of `old` that `self` no longer has: sending this first
    /// delivers every update while nothing is removed yet (make before break).
    pub fn keeping_removed_envoy(&self, old: &Resources) -> Option<Resources> {
        let pairs = [
            (&self.clusters, &old.clusters),
            (&self.endpoints, &old.endpoints),
            (&self.listeners, &old.listeners),
            (&self.routes, &old.routes),
        ];
        if pairs
            .iter()
            .all(|(new, old)| old.keys().all(|k| new.contains_key(k)))
        {
            return None;
        }
        let mut u = self.clone();
        for (into, from) in [
            (&mut u.clusters, &old.clusters),
            (&mut u.endpoints, &old.endpoints),
            (&mut u.listeners, &old.listeners),
            (&mut u.routes, &old.routes),
        ] {
            for (k, v) in from {
                into.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        Some(u)
    }
}

#[derive(Debug, Default)]
pub struct Translation {
    pub resources: Resources,
    /// Things translation left out, with why (e.g. two pods with one IP).
    pub problems: Vec<Problem>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn translate(s: &Snapshot, o: &MeshOptions) -> Translation {
    translate_with(s, o, None).0
}

/// What one translation leaves for the next to reuse: its snapshot, and the Address of each
/// pod and service in that snapshot's order (`None`: it had none).
#[derive(Debug, Default)]
pub struct Reuse {
    snapshot: Arc<Snapshot>,
    label_keys: BTreeSet<String>,
    pods: Vec<Option<Arc<Resource>>>,
    services: Vec<Option<Arc<Resource>>>,
    /// No address was left out for a conflict (IPs, ServiceEntry hosts) and no two Addresses
    /// had one name: a change of pods alone can then be applied to this translation's
    /// Addresses (see `pods_only`).
    clean: bool,
    /// Every IP of a Service, ServiceEntry or pod (when `clean`): taken by the next
    /// translation that applies a change of pods, which keeps it up to date.
    ips: std::sync::Mutex<Option<std::collections::HashSet<IpAddr>>>,
    /// This translation applied a change of pods to the previous one's Addresses.
    pub pods_only: bool,
}

/// The keys whose values differ between `a` and `b` (added, removed or changed).
fn changed_keys<'a, K: Ord, V: PartialEq>(
    a: &'a BTreeMap<K, V>,
    b: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = &'a K> {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(b.keys().filter(|k| !a.contains_key(*k)))
}

/// The entry of `previous` (walked in key order alongside the new map) with this key.
fn step<'a, K: Ord + 'a, V: 'a, R: 'a>(
    previous: &mut Option<std::iter::Peekable<impl Iterator<Item = ((&'a K, &'a V), &'a R)>>>,
    key: &K,
) -> Option<(&'a V, &'a R)> {
    let it = previous.as_mut()?;
    while it.peek().is_some_and(|((k, _), _)| *k < key) {
        it.next();
    }
    it.peek()
        .filter(|((k, _), _)| *k == key)
        .map(|((_, v), r)| (*v, *r))
}

/// As [`translate`], but re-translating only the pods and services whose inputs differ from
/// `previous`'s snapshot: a pod is re-translated when it changed or when a service or policy
/// of its namespace did; everything is when namespaces, gateways or the label keys that
/// sources match on changed. IP conflicts and policies are worked out anew each time (they
/// are cheap). The result equals `translate`'s (a randomized test checks it).
pub fn translate_reusing(
    s: &Arc<Snapshot>,
    o: &MeshOptions,
    previous: Option<&Reuse>,
) -> (Translation, Reuse) {
    translate_after(s, o, previous.map(|p| (p, None)))
}

/// As [`translate_reusing`], given also the previous translation's Addresses (as published:
/// the same versions): when only pods changed and neither translation leaves anything out,
/// those Addresses are updated for the changed pods alone instead of every pod being looked
/// at again (at 100k pods, most of what one pod's change cost). The result is the same.
pub fn translate_after(
    s: &Arc<Snapshot>,
    o: &MeshOptions,
    previous: Option<(&Reuse, Option<&ResourceMap>)>,
) -> (Translation, Reuse) {
    let (t, mut reuse) = translate_with(s, o, previous);
    reuse.snapshot = s.clone();
    (t, reuse)
}

/// What `pods_only` gives: the new Addresses, what `Reuse` keeps of each pod, and every IP.
type PodsApplied = (
    ResourceMap,
    Vec<Option<Arc<Resource>>>,
    std::collections::HashSet<IpAddr>,
);

/// A change of pods alone (services, policies and everything else as in `p`), applied to
/// `addresses`, `p`'s Addresses: the new Addresses and what `Reuse` keeps of the pods, or
/// `None` if a changed pod's IP or name is taken (then the full translation decides who
/// keeps it). Consumes `p`'s IP index.
fn pods_only(
    s: &Snapshot,
    o: &MeshOptions,
    p: &Reuse,
    addresses: &ResourceMap,
    selecting: &[(&AuthorizationPolicy, String)],
    label_keys: &BTreeSet<String>,
) -> Option<PodsApplied> {
    if !p.clean {
        return None;
    }
    let mut ips = p.ips.lock().ok()?.take()?;
    // One walk over both pod maps (in key order): unchanged pods keep their Address.
    let mut old = p.snapshot.pods.iter().zip(&p.pods).peekable();
    let mut gone: Vec<(&Pod, &Option<Arc<Resource>>)> = Vec::new();
    let mut new: Vec<(usize, &Pod)> = Vec::new();
    let mut pods_out = Vec::with_capacity(s.pods.len());
    for (key, pod) in &s.pods {
        while let Some(((k, prev), r)) = old.peek()
            && *k < key
        {
            gone.push((prev, r));
            old.next();
        }
        match old.peek() {
            Some(((k, prev), r)) if *k == key => {
                if Arc::ptr_eq(prev, pod) || prev == &pod {
                    pods_out.push((*r).clone());
                } else {
                    gone.push((prev, r));
                    new.push((pods_out.len(), pod));
                    pods_out.push(None);
                }
                old.next();
            }
            _ => {
                new.push((pods_out.len(), pod));
                pods_out.push(None);
            }
        }
    }
    gone.extend(old.map(|((_, prev), r)| (&**prev, r)));
    let mut addresses = addresses.clone();
    for (pod, r) in gone {
        if let Some(r) = r {
            addresses.remove(&r.name);
            for ip in &pod.ips {
                ips.remove(ip);
            }
        }
    }
    for (i, pod) in new {
        if pod.ips.is_empty() || pod.host_network {
            continue;
        }
        if pod.ips.iter().any(|ip| ips.contains(ip)) {
            return None;
        }
        ips.extend(pod.ips.iter().copied());
        let w = workload(s, o, pod, selecting, label_keys);
        let name = w.uid.clone();
        let address = pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        };
        let resource = Resource::address(name, &address);
        if addresses
            .insert(resource.name.clone(), resource.clone())
            .is_some()
        {
            return None;
        }
        pods_out[i] = Some(resource);
    }
    Some((addresses, pods_out, ips))
}

fn translate_with(
    s: &Snapshot,
    o: &MeshOptions,
    previous: Option<(&Reuse, Option<&ResourceMap>)>,
) -> (Translation, Reuse) {
    let (previous, previous_addresses) = match previous {
        Some((p, a)) => (Some(p), a),
        None => (None, None),
    };
    let mut t = Translation::default();
    let policies = translate_policies(s, o, &mut t.problems);
    let selecting: Vec<(&AuthorizationPolicy, String)> = s
        .policies
        .values()
        .filter(|p| p.selector.is_some() && policies.contains_key(&key_of(p)))
        .map(|p| (p, key_of(p)))
        .collect();
    // Authorizations are translated whole on either path below.
    for (name, p) in policies {
        t.resources
            .authorizations
            .insert(name.clone(), Resource::new(name, &p));
    }

    let label_keys = source_label_keys(s);
    let previous = previous.filter(|p| {
        p.snapshot.namespaces == s.namespaces
            && p.snapshot.gateways == s.gateways
            && p.snapshot.service_entries == s.service_entries
            && p.label_keys == label_keys
            && p.snapshot.pods.len() == p.pods.len()
            && p.snapshot.services.len() == p.services.len()
    });
    // Namespaces where a service or policy changed: their pods are translated anew.
    let dirty: BTreeSet<&str> = previous
        .map(|p| {
            changed_keys(&p.snapshot.services, &s.services)
                .chain(changed_keys(&p.snapshot.policies, &s.policies))
                .map(|(ns, _)| ns.as_str())
                .collect()
        })
        .unwrap_or_default();
    if let (Some(p), Some(addresses)) = (previous, previous_addresses)
        && dirty.is_empty()
        && let Some((addresses, pods, ips)) = pods_only(s, o, p, addresses, &selecting, &label_keys)
    {
        t.resources.addresses = addresses;
        let reuse = Reuse {
            snapshot: Arc::new(Snapshot::default()),
            label_keys,
            pods,
            services: p.services.clone(),
            clean: true,
            ips: std::sync::Mutex::new(Some(ips)),
            pods_only: true,
        };
        return (t, reuse);
    }
    // What the full translation leaves out, and how many Addresses it names.
    let problems_before = t.problems.len();
    let mut named = 0;
    let mut prev_services =
        previous.map(|p| p.snapshot.services.iter().zip(&p.services).peekable());
    let mut prev_pods = previous.map(|p| p.snapshot.pods.iter().zip(&p.pods).peekable());
    let mut services_out = Vec::with_capacity(s.services.len());
    let mut pods_out = Vec::with_capacity(s.pods.len());

    // Who has each address so far: kind and metadata (named only when there is a conflict).
    let mut ip_owner: HashMap<IpAddr, (&str, &crate::k8s::Meta)> = HashMap::new();
    let owner =
        |(kind, m): &(&str, &crate::k8s::Meta)| format!("{kind} {}/{}", m.namespace, m.name);
    for (key, svc) in &s.services {
        let reused = step(&mut prev_services, key)
            .filter(|(prev, _)| *prev == svc)
            .and_then(|(_, r)| r.clone());
        let mut ok = true;
        for ip in &svc.cluster_ips {
            if let Some(prev) = ip_owner.get(ip) {
                t.problems.push(conflict(
                    s,
                    "Service",
                    &svc.meta,
                    "spec.clusterIP",
                    ip,
                    &owner(prev),
                ));
                ok = false;
            }
        }
        if !ok {
            services_out.push(None);
            continue;
        }
        for ip in &svc.cluster_ips {
            ip_owner.insert(*ip, ("Service", &svc.meta));
        }
        let resource = reused.unwrap_or_else(|| {
            let msg = service(s, o, svc);
            let name = format!("{}/{}", svc.meta.namespace, msg.hostname);
            let address = pb::Address {
                r#type: Some(pb::address::Type::Service(msg)),
            };
            Resource::address(name, &address)
        });
        t.resources
            .addresses
            .insert(resource.name.clone(), resource.clone());
        named += 1;
        services_out.push(Some(resource));
    }
    // ServiceEntries after Services: a Kubernetes Service owns its hostname and VIPs.
    for se in s.service_entries.values() {
        if let Some(ip) = se.addresses.iter().find(|ip| ip_owner.contains_key(*ip)) {
            let prev = owner(&ip_owner[ip]);
            t.problems.push(conflict(
                s,
                "ServiceEntry",
                &se.meta,
                "spec.addresses",
                ip,
                &prev,
            ));
            continue;
        }
        for ip in &se.addresses {
            ip_owner.insert(*ip, ("ServiceEntry", &se.meta));
        }
        for (i, host) in se.hosts.iter().enumerate() {
            let name = format!("{}/{host}", se.meta.namespace);
            if t.resources.addresses.contains_key(&name) {
                t.problems.push(Problem {
                    file: s
                        .file_of(
                            "ServiceEntry",
                            &(se.meta.namespace.clone(), se.meta.name.clone()),
                        )
                        .to_string(),
                    object: format!("ServiceEntry {}/{}", se.meta.namespace, se.meta.name),
                    field: format!("spec.hosts[{i}]"),
                    reason: format!("{host} is already a service of this namespace; left out"),
                });
                continue;
            }
            let address = pb::Address {
                r#type: Some(pb::address::Type::Service(se.service(host))),
            };
            let resource = Resource::address(name, &address);
            t.resources
                .addresses
                .insert(resource.name.clone(), resource);
            named += 1;
        }
    }
    for (key, pod) in &s.pods {
        let reused = step(&mut prev_pods, key)
            .filter(|(prev, _)| *prev == pod && !dirty.contains(pod.meta.namespace.as_str()))
            .and_then(|(_, r)| r.clone());
        if pod.ips.is_empty() || pod.host_network {
            // No address of its own yet (or the node's): nothing a proxy could match on.
            pods_out.push(None);
            continue;
        }
        if let Some((ip, prev)) = pod
            .ips
            .iter()
            .find_map(|ip| ip_owner.get(ip).map(|prev| (ip, prev)))
        {
            t.problems.push(conflict(
                s,
                "Pod",
                &pod.meta,
                "status.podIP",
                ip,
                &owner(prev),
            ));
            pods_out.push(None);
            continue;
        }
        for ip in &pod.ips {
            ip_owner.insert(*ip, ("Pod", &pod.meta));
        }
        let resource = reused.unwrap_or_else(|| {
            let w = workload(s, o, pod, &selecting, &label_keys);
            let name = w.uid.clone();
            let address = pb::Address {
                r#type: Some(pb::address::Type::Workload(w)),
            };
            Resource::address(name, &address)
        });
        t.resources
            .addresses
            .insert(resource.name.clone(), resource.clone());
        named += 1;
        pods_out.push(Some(resource));
    }
    let clean = t.problems.len() == problems_before && t.resources.addresses.len() == named;
    let ips = clean.then(|| ip_owner.keys().copied().collect());
    let reuse = Reuse {
        snapshot: Arc::new(Snapshot::default()),
        label_keys,
        pods: pods_out,
        services: services_out,
        clean,
        ips: std::sync::Mutex::new(ips),
        pods_only: false,
    };
    (t, reuse)
}

fn conflict(
    s: &Snapshot,
    kind: &'static str,
    meta: &crate::k8s::Meta,
    field: &str,
    ip: &IpAddr,
    prev: &str,
) -> Problem {
    Problem {
        file: s
            .file_of(kind, &(meta.namespace.clone(), meta.name.clone()))
            .to_string(),
        object: format!("{kind} {}/{}", meta.namespace, meta.name),
        field: field.into(),
        reason: format!("{ip} is already used by {prev}; left out"),
    }
}

fn key_of(p: &AuthorizationPolicy) -> String {
    format!("{}/{}", p.meta.namespace, p.meta.name)
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn hostname(o: &MeshOptions, ns: &str, name: &str) -> String {
    format!("{name}.{ns}.svc.{}", o.domain)
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What a waypoint is asked to carry: traffic to a service, or to a workload dialled directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Service,
    Workload,
}

/// The waypoint Gateway `(namespace, name)` an object uses, as Istio decides it:
/// `istio.io/use-waypoint` on the object, else on its namespace (`none` / `#none` opt out);
/// the Gateway must exist, be a waypoint, and handle this kind of traffic (its
/// `istio.io/waypoint-for`). An object label naming a waypoint that does not handle its kind
/// binds nothing (the namespace label does not step in).
pub fn waypoint_of(
    s: &Snapshot,
    ns: &str,
    labels: &BTreeMap<String, String>,
    kind: Bound,
) -> Option<(String, String)> {
    let ns_labels = s.namespace_labels(ns);
    let (name, from) = match labels.get(USE_WAYPOINT) {
        Some(n) => (n, labels),
        None => (ns_labels?.get(USE_WAYPOINT)?, ns_labels?),
    };
    if name.is_empty() || name == "none" || name == "#none" {
        return None;
    }
    let wp_ns = from
        .get(USE_WAYPOINT_NAMESPACE)
        .cloned()
        .unwrap_or_else(|| ns.to_string());
    let key = (wp_ns, name.clone());
    let gw = s.gateways.get(&key).filter(|g| g.is_waypoint())?;
    let handles = match kind {
        Bound::Service => gw.waypoint_for.services(),
        Bound::Workload => gw.waypoint_for.workloads(),
    };
    handles.then_some(key)
}

/// The waypoint of a service; a waypoint's own Service is never behind one.
pub fn service_waypoint(s: &Snapshot, svc: &Service) -> Option<(String, String)> {
    let own = s
        .gateways
        .get(&(svc.meta.namespace.clone(), svc.meta.name.clone()))
        .is_some_and(|g| g.is_waypoint());
    if own {
        return None;
    }
    waypoint_of(s, &svc.meta.namespace, &svc.meta.labels, Bound::Service)
}

/// The workload API's form of `waypoint_of`.
fn waypoint(
    s: &Snapshot,
    o: &MeshOptions,
    ns: &str,
    labels: &BTreeMap<String, String>,
    kind: Bound,
) -> Option<pb::GatewayAddress> {
    Some(gateway_address(o, waypoint_of(s, ns, labels, kind)?))
}

fn gateway_address(o: &MeshOptions, (wp_ns, name): (String, String)) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                hostname: hostname(o, &wp_ns, &name),
                namespace: wp_ns,
            },
        )),
        hbone_mtls_port: u32::from(mesh::hbone::HBONE_PORT),
    }
}

fn service(s: &Snapshot, o: &MeshOptions, svc: &Service) -> pb::Service {
    pb::Service {
        name: svc.meta.name.clone(),
        namespace: svc.meta.namespace.clone(),
        hostname: hostname(o, &svc.meta.namespace, &svc.meta.name),
        addresses: svc
            .cluster_ips
            .iter()
            .map(|ip| pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(ip),
            })
            .collect(),
        ports: svc
            .ports
            .iter()
            .map(|p| pb::Port {
                service_port: u32::from(p.port),
                target_port: match p.target {
                    TargetPort::Number(n) => u32::from(n),
                    // Named: each endpoint resolves it against its own container ports.
                    TargetPort::Name(_) => 0,
                },
                app_protocol: app_protocol(p) as i32,
            })
            .collect(),
        subject_alt_names: vec![],
        waypoint: service_waypoint(s, svc).map(|key| gateway_address(o, key)),
        load_balancing: None,
        ip_families: 0,
        // A Kubernetes Service is the canonical owner of its hostname (as istiod marks it); a
        // ServiceEntry for the same name would not be.
        canonical: true,
    }
}

/// Istio's decision for a service port (see `mesh::state::AppProtocol::of_port`).
pub fn app_protocol(p: &ServicePort) -> pb::AppProtocol {
    use mesh::state::AppProtocol as A;
    match A::of_port(&p.app_protocol, &p.name) {
        A::Http11 => pb::AppProtocol::Http11,
        A::Http2 => pb::AppProtocol::Http2,
        A::Grpc => pb::AppProtocol::Grpc,
        A::Tcp => pb::AppProtocol::Tcp,
        A::Tls => pb::AppProtocol::Tls,
        A::Unknown => pb::AppProtocol::Unknown,
    }
}

/// The label keys some VirtualService's `sourceLabels` refers to: the only labels workloads
/// carry in the workload API (a waypoint matches client workloads by them).
pub fn source_label_keys(s: &Snapshot) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for vs in s.virtual_services.values() {
        for r in &vs.http {
            for m in &r.matches {
                keys.extend(m.source_labels.keys().cloned());
            }
        }
        for r in vs.tcp.iter().chain(vs.tls.iter()) {
            for m in &r.matches {
                keys.extend(m.source_labels.keys().cloned());
            }
        }
    }
    keys
}

/// Whether `pod` is in ambient mode: its own `istio.io/dataplane-mode`, else its namespace's.
pub fn in_ambient(s: &Snapshot, pod: &Pod) -> bool {
    match pod.meta.labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => {
            s.namespace_labels(&pod.meta.namespace)
                .and_then(|l| l.get(DATAPLANE_MODE))
                .map(String::as_str)
                == Some("ambient")
        }
    }
}

fn first_label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a String> {
    keys.iter().find_map(|k| labels.get(*k))
}

fn workload(
    s: &Snapshot,
    o: &MeshOptions,
    pod: &Pod,
    selecting: &[(&AuthorizationPolicy, String)],
    label_keys: &BTreeSet<String>,
) -> pb::Workload {
    let ns = &pod.meta.namespace;
    let labels = &pod.meta.labels;
    let mut services = BTreeMap::new();
    // Services select pods of their own namespace only: look at those (the map is ordered by
    // namespace, then name), not at every service in the mesh for every pod.
    let in_namespace = s
        .services
        .range((ns.clone(), String::new())..)
        .take_while(|((n, _), _)| n == ns)
        .map(|(_, svc)| svc);
    for svc in in_namespace {
        let Some(selector) = &svc.selector else {
            continue;
        };
        if !selects(selector, labels) {
            continue;
        }
        let ports = svc
            .ports
            .iter()
            .filter_map(|p| {
                let target = match &p.target {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => *pod.named_ports.get(name)?,
                };
                Some(pb::Port {
                    service_port: u32::from(p.port),
                    target_port: u32::from(target),
                    app_protocol: app_protocol(p) as i32,
                })
            })
            .collect();
        services.insert(
            format!("{ns}/{}", hostname(o, ns, &svc.meta.name)),
            pb::PortList { ports },
        );
    }
    // The ServiceEntries of its namespace that select it.
    for se in s
        .service_entries
        .range((ns.clone(), String::new())..)
        .take_while(|((n, _), _)| n == ns)
        .map(|(_, se)| se)
        .filter(|se| se.selects(pod))
    {
        services.extend(se.endpoint_ports());
    }
    let authorization_policies: Vec<String> = selecting
        .iter()
        .filter(|(p, _)| &p.meta.namespace == ns)
        .filter(|(p, _)| p.selector.as_ref().is_some_and(|sel| selects(sel, labels)))
        .map(|(_, k)| k.clone())
        .collect();
    // As Istio: a pod that terminates HBONE itself says so with this label.
    let native_tunnel = labels.get(TUNNEL).is_some_and(|v| v == "http");
    let healthy =
        pod.ready != Some(false) && pod.phase.as_deref().is_none_or(|phase| phase == "Running");
    let (workload_type, workload_name) = match &pod.owner {
        // A Deployment's pods belong to a ReplicaSet named `<deployment>-<hash>`.
        Some((kind, name)) if kind == "ReplicaSet" => (
            pb::WorkloadType::Deployment,
            name.rsplit_once('-')
                .map(|(d, _)| d.to_string())
                .unwrap_or_else(|| name.clone()),
        ),
        Some((kind, name)) if kind == "Job" => (pb::WorkloadType::Job, name.clone()),
        Some((kind, name)) if kind == "CronJob" => (pb::WorkloadType::Cronjob, name.clone()),
        _ => (pb::WorkloadType::Pod, pod.meta.name.clone()),
    };
    let canonical_name = first_label(
        labels,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .cloned()
    .unwrap_or_else(|| workload_name.clone());
    let canonical_revision = first_label(
        labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .cloned()
    .unwrap_or_else(|| "latest".into());
    pb::Workload {
        // ztunnel finds a local pod's network namespace by its Kubernetes UID, so that is the
        // resource name when the object carries one; otherwise Istio's readable form.
        uid: pod
            .meta
            .uid
            .clone()
            .unwrap_or_else(|| format!("{}//Pod/{ns}/{}", o.cluster_id, pod.meta.name)),
        name: pod.meta.name.clone(),
        namespace: ns.clone(),
        addresses: pod.ips.iter().map(ip_bytes).collect(),
        hostname: String::new(),
        network: String::new(),
        tunnel_protocol: if in_ambient(s, pod) || native_tunnel {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
        } as i32,
        trust_domain: o.trust_domain.clone(),
        service_account: pod.service_account.clone(),
        // A waypoint's own pods are never behind a waypoint.
        waypoint: if labels.contains_key(crate::routing::GATEWAY_NAME) {
            None
        } else {
            waypoint(s, o, ns, labels, Bound::Workload)
        },
        network_gateway: None,
        node: pod.node_name.clone(),
        canonical_name,
        canonical_revision,
        workload_type: workload_type as i32,
        workload_name,
        native_tunnel,
        services,
        authorization_policies,
        status: if healthy {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: o.cluster_id.clone(),
        locality: None,
        network_mode: pb::NetworkMode::Standard as i32,
        capacity: None,
        labels: label_keys
            .iter()
            .filter_map(|k| labels.get(k).map(|v| (k.clone(), v.clone())))
            .collect(),
    }
}

fn translate_policies(
    s: &Snapshot,
    o: &MeshOptions,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, pb_sec::Authorization> {
    let mut out = BTreeMap::new();
    for p in s.policies.values() {
        if !p.target_refs.is_empty() {
            // Bound to a waypoint (or a service behind one): enforced there, never by the node
            // proxy, as in Istio. What no waypoint enforces is reported by `rbac::attachments`.
            continue;
        }
        if p.dry_run && !o.send_dry_run {
            problems.push(Problem {
                file: s
                    .file_of(
                        "AuthorizationPolicy",
                        &(p.meta.namespace.clone(), p.meta.name.clone()),
                    )
                    .to_string(),
                object: format!("AuthorizationPolicy {}", key_of(p)),
                field: "metadata.annotations[istio.io/dry-run]".into(),
                reason: "dry-run policies are not sent to node proxies unless pilot runs with --send-dry-run-policies (a proxy without dry-run support would enforce them); left out".into(),
            });
            continue;
        }
        let action = match p.action {
            PolicyAction::Allow => pb_sec::Action::Allow,
            PolicyAction::Deny => pb_sec::Action::Deny,
            other => {
                problems.push(Problem {
                    file: String::new(),
                    object: format!("AuthorizationPolicy {}", key_of(p)),
                    field: "spec.action".into(),
                    reason: format!("{other:?} is not enforced by the node proxy; left out"),
                });
                continue;
            }
        };
        let scope = if p.selector.is_some() {
            pb_sec::Scope::WorkloadSelector
        } else if p.meta.namespace == o.root_namespace {
            pb_sec::Scope::Global
        } else {
            pb_sec::Scope::Namespace
        };
        let rules = p.rules.iter().filter_map(|r| rule(r, action)).collect();
        out.insert(
            key_of(p),
            pb_sec::Authorization {
                name: p.meta.name.clone(),
                namespace: p.meta.namespace.clone(),
                scope: scope as i32,
                action: action as i32,
                rules,
                dry_run: p.dry_run,
            },
        );
    }
    out
}

/// Conditions a node proxy can check; the rest need the HTTP request (a waypoint).
const L4_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn source_is_l7(src: &Source) -> bool {
    !src.request_principals.is_empty() || !src.not_request_principals.is_empty()
}

fn operation_is_l7(op: &Operation) -> bool {
    !(op.hosts.is_empty()
        && op.not_hosts.is_empty()
        && op.methods.is_empty()
        && op.not_methods.is_empty()
        && op.paths.is_empty()
        && op.not_paths.is_empty())
}

/// One policy rule at L4. A rule that needs L7 attributes can never match at L4: an ALLOW
/// rule is dropped (allows less); in a DENY rule the L7 attributes are ignored (denies more).
/// Either way the node proxy fails closed.
fn rule(r: &PolicyRule, action: pb_sec::Action) -> Option<pb_sec::Rule> {
    let l7 = r.from.iter().any(source_is_l7)
        || r.to.iter().any(operation_is_l7)
        || r.when.iter().any(|c| !L4_KEYS.contains(&c.key.as_str()));
    if l7 && action == pb_sec::Action::Allow {
        return None;
    }
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        clauses.push(pb_sec::Clause {
            matches: r.from.iter().map(source_match).collect(),
        });
    }
    if !r.to.is_empty() {
        clauses.push(pb_sec::Clause {
            matches: r
                .to
                .iter()
                .map(|op| pb_sec::Match {
                    destination_ports: op.ports.iter().map(|&p| u32::from(p)).collect(),
                    not_destination_ports: op.not_ports.iter().map(|&p| u32::from(p)).collect(),
                    ..Default::default()
                })
                .collect(),
        });
    }
    for c in &r.when {
        let mut m = pb_sec::Match::default();
        match c.key.as_str() {
            "source.ip" | "remote.ip" => {
                m.source_ips = addresses(&c.values);
                m.not_source_ips = addresses(&c.not_values);
            }
            "source.namespace" => {
                m.namespaces = strings(&c.values);
                m.not_namespaces = strings(&c.not_values);
            }
            "source.principal" => {
                m.principals = strings(&c.values);
                m.not_principals = strings(&c.not_values);
            }
            "destination.ip" => {
                m.destination_ips = addresses(&c.values);
                m.not_destination_ips = addresses(&c.not_values);
            }
            "destination.port" => {
                m.destination_ports = c.values.iter().filter_map(|v| v.parse().ok()).collect();
                m.not_destination_ports =
                    c.not_values.iter().filter_map(|v| v.parse().ok()).collect();
            }
            // An L7 condition in a DENY rule: ignored, see above.
            _ => continue,
        }
        clauses.push(pb_sec::Clause { matches: vec![m] });
    }
    Some(pb_sec::Rule { clauses })
}

fn source_match(src: &Source) -> pb_sec::Match {
    let mut source_ips = addresses(&src.ip_blocks);
    source_ips.extend(addresses(&src.remote_ip_blocks));
    let mut not_source_ips = addresses(&src.not_ip_blocks);
    not_source_ips.extend(addresses(&src.not_remote_ip_blocks));
    pb_sec::Match {
        namespaces: strings(&src.namespaces),
        not_namespaces: strings(&src.not_namespaces),
        principals: strings(&src.principals),
        not_principals: strings(&src.not_principals),
        source_ips,
        not_source_ips,
        service_accounts: service_accounts(&src.service_accounts),
        not_service_accounts: service_accounts(&src.not_service_accounts),
        ..Default::default()
    }
}

/// Istio's string forms: `*` any value, `x*` prefix, `*x` suffix, else exact.
fn string_match(v: &str) -> pb_sec::StringMatch {
    use pb_sec::string_match::MatchType;
    let t = if v == "*" {
        MatchType::Presence(())
    } else if let Some(p) = v.strip_suffix('*') {
        MatchType::Prefix(p.to_string())
    } else if let Some(s) = v.strip_prefix('*') {
        MatchType::Suffix(s.to_string())
    } else {
        MatchType::Exact(v.to_string())
    };
    pb_sec::StringMatch {
        match_type: Some(t),
    }
}

fn strings(values: &[String]) -> Vec<pb_sec::StringMatch> {
    values.iter().map(|v| string_match(v)).collect()
}

fn service_accounts(values: &[String]) -> Vec<pb_sec::ServiceAccountMatch> {
    values
        .iter()
        .filter_map(|v| v.split_once('/'))
        .map(|(ns, sa)| pb_sec::ServiceAccountMatch {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
        .collect()
}

fn addresses(values: &[String]) -> Vec<pb_sec::Address> {
    values
        .iter()
        .filter_map(|v| parse_cidr(v))
        .map(|(ip, length)| pb_sec::Address {
            address: ip_bytes(&ip),
            length: u32::from(length),
        })
        .collect()
}

/// `ip` or `ip/prefix`.
pub fn parse_cidr(v: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (v, None),
    };
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => l.parse().ok()?,
        Some(_) => return None,
    };
    (len <= max).then_some((ip, len))
}

/// A readable, deterministic rendering of every resource (for golden files and debugging).
pub fn render(resources: &Resources) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in resources.addresses.values() {
        let _ = writeln!(out, "# Address {} version {}", r.name, r.version);
        match pb::Address::decode(r.body.clone()) {
            Ok(a) => {
                let _ = writeln!(out, "{a:#?}");
            }
            Err(e) => {
                let _ = writeln!(out, "undecodable: {e}");
            }
        }
    }
    for r in resources.authorizations.values() {
        let _ = writeln!(out, "# Authorization {} version {}", r.name, r.version);
        match pb_sec::Authorization::decode(r.body.clone()) {
            Ok(a) => {
                let _ = writeln!(out, "{a:#?}");
            }
            Err(e) => {
                let _ = writeln!(out, "undecodable: {e}");
            }
        }
    }
    out
}

/// Resource names present in `a` whose version differs from (or is missing in) `b`.
pub fn changed(a: &ResourceMap, b: &ResourceMap) -> BTreeSet<String> {
    a.iter()
        .filter(|(k, r)| b.get(*k).is_none_or(|o| o.version != r.version))
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::parse_documents;

    fn snapshot(text: &str) -> Snapshot {
        let p = parse_documents(text, "t.yaml");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        Snapshot::build(p.objects, vec![])
    }

    fn auth(t: &Translation, name: &str) -> pb_sec::Authorization {
        pb_sec::Authorization::decode(t.resources.authorizations[name].body.clone()).unwrap()
    }

    #[test]
    fn l7_rules_fail_closed() {
        let s = snapshot(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: a}
spec:
  rules:
  - to: [{operation: {methods: [GET]}}]
  - from: [{source: {principals: ["cluster.local/ns/a/sa/x"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: a}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: [POST], ports: ["8080"]}}]
"#,
        );
        let t = translate(&s, &MeshOptions::default());
        let allow = auth(&t, "a/allow-get");
        assert_eq!(allow.rules.len(), 1, "the L7 ALLOW rule is dropped");
        let deny = auth(&t, "a/deny-post");
        assert_eq!(deny.action, pb_sec::Action::Deny as i32);
        assert_eq!(
            deny.rules[0].clauses[0].matches[0].destination_ports,
            [8080],
            "L4 part kept, L7 part ignored"
        );
    }

    #[test]
    fn scopes_and_string_forms() {
        let s = snapshot(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: ["*", "pre*", "*suf", "x"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns, namespace: a, annotations: {istio.io/dry-run: "true"}}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-only, namespace: a}
spec: {targetRefs: [{kind: Gateway, name: waypoint}]}
"#,
        );
        let t = translate(&s, &MeshOptions::default());
        assert_eq!(
            t.resources.authorizations.len(),
            1,
            "dry-run left out by default"
        );
        assert!(
            t.problems
                .iter()
                .any(|p| p.object == "AuthorizationPolicy a/ns" && p.reason.contains("dry-run"))
        );
        // A policy for a waypoint never reaches the node proxies (nor is it a problem here:
        // the waypoint translation says whether a waypoint enforces it, see `rbac`).
        assert!(!t.resources.authorizations.contains_key("a/waypoint-only"));
        assert!(
            !t.problems
                .iter()
                .any(|p| p.object == "AuthorizationPolicy a/waypoint-only")
        );
        let w = crate::waypoint::translate(&s, &MeshOptions::default());
        let waypoint_only: Vec<String> = w
            .problems
            .iter()
            .filter(|p| p.object == "AuthorizationPolicy a/waypoint-only")
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            waypoint_only,
            [
                "t.yaml: AuthorizationPolicy a/waypoint-only: field \"spec.targetRefs[0]\": Gateway (group \"\") is not a target the waypoint supports (Gateway and GatewayClass of gateway.networking.k8s.io, core Service); in force nowhere"
            ]
        );
        let t = translate(
            &s,
            &MeshOptions {
                send_dry_run: true,
                ..MeshOptions::default()
            },
        );
        assert_eq!(t.resources.authorizations.len(), 2);
        let mesh = auth(&t, "istio-system/mesh");
        assert_eq!(mesh.scope, pb_sec::Scope::Global as i32);
        let forms: Vec<_> = mesh.rules[0].clauses[0].matches[0]
            .namespaces
            .iter()
            .map(|m| format!("{:?}", m.match_type))
            .collect();
        assert_eq!(
            forms,
            [
                "Some(Presence(()))",
                "Some(Prefix(\"pre\"))",
                "Some(Suffix(\"suf\"))",
                "Some(Exact(\"x\"))"
            ]
        );
        let ns = auth(&t, "a/ns");
        assert_eq!(ns.scope, pb_sec::Scope::Namespace as i32);
        assert!(ns.dry_run);
        assert!(
            ns.rules.is_empty(),
            "an ALLOW without rules matches nothing"
        );
    }

    #[test]
    fn versions_follow_content() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let a = translate(&snapshot(text), &MeshOptions::default());
        let b = translate(&snapshot(text), &MeshOptions::default());
        assert_eq!(a.resources, b.resources);
        let c = translate(
            &snapshot(&text.replace("port: 80", "port: 81")),
            &MeshOptions::default(),
        );
        assert_eq!(
            changed(&c.resources.addresses, &a.resources.addresses).len(),
            1
        );
    }

    #[test]
    fn duplicate_ip_is_reported_and_left_out() {
        let s = snapshot(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nstatus: {podIP: 10.0.0.1}\n",
        );
        let t = translate(&s, &MeshOptions::default());
        assert_eq!(t.resources.addresses.len(), 1);
        assert!(
            t.problems[0]
                .reason
                .contains("already used by Pod default/a")
        );
    }

    fn waypoint_host(t: &Translation, name: &str) -> Option<String> {
        let a = pb::Address::decode(t.resources.addresses[name].body.clone()).unwrap();
        let w = match a.r#type.unwrap() {
            pb::address::Type::Service(s) => s.waypoint,
            pb::address::Type::Workload(w) => w.waypoint,
        }?;
        match w.destination? {
            pb::gateway_address::Destination::Hostname(h) => Some(h.hostname),
            pb::gateway_address::Destination::Address(_) => None,
        }
    }

    #[test]
    fn waypoint_binding_precedence_and_waypoint_for() {
        let gw = |name: &str, for_: &str| {
            format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: a, labels: {{istio.io/waypoint-for: {for_}}}}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n"
            )
        };
        let svc = |name: &str, ip: &str, label: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: a, labels: {{{label}}}}}\nspec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{name: http, port: 80}}, {{name: tcp, port: 81}}]}}\n"
            )
        };
        let pod = |name: &str, ip: &str, label: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: {{app: {name}, {label}}}}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        let text = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/use-waypoint: ns-wp}}\n".to_string(),
            gw("ns-wp", "all"),
            gw("svc-wp", "service"),
            gw("wl-wp", "workload"),
            svc("plain", "10.96.0.1", ""),
            svc("own", "10.96.0.2", "istio.io/use-waypoint: svc-wp"),
            svc("wrong-kind", "10.96.0.3", "istio.io/use-waypoint: wl-wp"),
            svc("opted-out", "10.96.0.4", "istio.io/use-waypoint: none"),
            svc("missing", "10.96.0.5", "istio.io/use-waypoint: nowhere"),
            svc("ns-wp", "10.96.0.6", ""),
            pod("p1", "10.0.0.1", "x: y"),
            pod("p2", "10.0.0.2", "istio.io/use-waypoint: wl-wp"),
            pod("p3", "10.0.0.3", "istio.io/use-waypoint: svc-wp"),
            pod("wp", "10.0.0.4", "gateway.networking.k8s.io/gateway-name: ns-wp"),
        ]
        .concat();
        let t = translate(&snapshot(&text), &MeshOptions::default());
        let host = |n: &str| waypoint_host(&t, n);
        let fqdn = |n: &str| Some(format!("{n}.a.svc.cluster.local"));
        assert_eq!(
            host("a/plain.a.svc.cluster.local"),
            fqdn("ns-wp"),
            "namespace label"
        );
        assert_eq!(
            host("a/own.a.svc.cluster.local"),
            fqdn("svc-wp"),
            "service label wins"
        );
        assert_eq!(
            host("a/wrong-kind.a.svc.cluster.local"),
            None,
            "a workload waypoint does not take a service, and the namespace's does not step in"
        );
        assert_eq!(host("a/opted-out.a.svc.cluster.local"), None);
        assert_eq!(
            host("a/missing.a.svc.cluster.local"),
            None,
            "no such Gateway"
        );
        assert_eq!(
            host("a/ns-wp.a.svc.cluster.local"),
            None,
            "a waypoint's own Service"
        );
        assert_eq!(host("Kubernetes//Pod/a/p1"), fqdn("ns-wp"));
        assert_eq!(
            host("Kubernetes//Pod/a/p2"),
            fqdn("wl-wp"),
            "pod label wins"
        );
        assert_eq!(
            host("Kubernetes//Pod/a/p3"),
            None,
            "a service waypoint takes no workload"
        );
        assert_eq!(host("Kubernetes//Pod/a/wp"), None, "a waypoint's own pod");

        // Ports carry their protocol.
        let a = pb::Address::decode(
            t.resources.addresses["a/plain.a.svc.cluster.local"]
                .body
                .clone(),
        )
        .unwrap();
        let Some(pb::address::Type::Service(s)) = a.r#type else {
            panic!()
        };
        assert_eq!(s.ports[0].app_protocol, pb::AppProtocol::Http11 as i32);
        assert_eq!(s.ports[1].app_protocol, pb::AppProtocol::Unknown as i32);
    }

    #[test]
    fn workloads_carry_only_the_labels_source_matches_use() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a, labels: {app: web, version: v1, team: x}}\nstatus: {podIP: 10.0.0.1}\n";
        let labels = |t: &Translation| {
            let a = pb::Address::decode(t.resources.addresses["Kubernetes//Pod/a/p"].body.clone())
                .unwrap();
            let Some(pb::address::Type::Workload(w)) = a.r#type else {
                panic!()
            };
            w.labels
        };
        let t = translate(&snapshot(pod), &MeshOptions::default());
        assert!(labels(&t).is_empty(), "no VirtualService uses sourceLabels");
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: a}\nspec: {hosts: [web], http: [{match: [{sourceLabels: {version: v1}}], route: [{destination: {host: web}}]}], tcp: [{match: [{sourceLabels: {app: web}}], route: [{destination: {host: web}}]}]}\n";
        let t = translate(&snapshot(&format!("{pod}{vs}")), &MeshOptions::default());
        assert_eq!(
            labels(&t).into_iter().collect::<Vec<_>>(),
            [
                ("app".to_string(), "web".to_string()),
                ("version".to_string(), "v1".to_string())
            ]
        );
    }

    #[test]
    fn tunnel_protocol_from_ambient_mode_or_the_tunnel_label() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: in, namespace: a}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: out, namespace: a, labels: {istio.io/dataplane-mode: none}}\nstatus: {podIP: 10.0.0.2}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: own, namespace: b, labels: {networking.istio.io/tunnel: http}}\nspec: {nodeName: vm}\nstatus: {podIP: 10.0.0.3}\n";
        let t = translate(&snapshot(text), &MeshOptions::default());
        let workload = |name: &str| {
            let r = &t.resources.addresses[&format!("Kubernetes//Pod/{name}")];
            let Some(pb::address::Type::Workload(w)) =
                pb::Address::decode(r.body.clone()).unwrap().r#type
            else {
                panic!("{name} is not a workload")
            };
            (
                pb::TunnelProtocol::try_from(w.tunnel_protocol).unwrap(),
                w.native_tunnel,
            )
        };
        assert_eq!(workload("a/in"), (pb::TunnelProtocol::Hbone, false));
        assert_eq!(workload("a/out"), (pb::TunnelProtocol::None, false));
        assert_eq!(workload("b/own"), (pb::TunnelProtocol::Hbone, true));
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().1, 8);
        assert_eq!(parse_cidr("10.0.0.1").unwrap().1, 32);
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("x").is_none());
    }

    /// A small xorshift generator: the randomized tests below are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// One random version of object `i` of `kind`, as YAML. Small ranges make IP and uid
    /// collisions, selectors that match and miss, and waypoints that come and go frequent.
    fn random_object(r: &mut Rng, kind: usize, i: u64) -> String {
        match kind {
            0 => {
                let mode = ["ambient", "none", "ambient"][r.below(3) as usize];
                let wp = if r.below(3) == 0 {
                    ", istio.io/use-waypoint: wp"
                } else {
                    ""
                };
                format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}, labels: {{istio.io/dataplane-mode: {mode}{wp}}}}}\n"
                )
            }
            1 => {
                let for_ = ["service", "workload", "all"][r.below(3) as usize];
                format!(
                    "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: ns-{i}, labels: {{istio.io/waypoint-for: {for_}}}}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n"
                )
            }
            2 => {
                let label = if r.below(4) == 0 {
                    "istio.io/use-waypoint: wp"
                } else {
                    "x: y"
                };
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{}, labels: {{{label}}}}}\nspec: {{clusterIP: 10.96.0.{}, selector: {{app: a{}}}, ports: [{{name: http, port: 80, targetPort: {}}}]}}\n",
                    r.below(3),
                    r.below(8),
                    r.below(3),
                    8080 + r.below(2)
                )
            }
            3 => {
                let uid = match r.below(5) {
                    0 => String::new(),
                    1 => format!(", uid: u{}", r.below(20)),
                    _ => format!(", uid: pod-uid-{i}"),
                };
                let wp = if r.below(6) == 0 {
                    ", istio.io/use-waypoint: wp"
                } else {
                    ""
                };
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}{uid}, labels: {{app: a{}, version: v{}{wp}}}}}\nspec: {{nodeName: n{}, serviceAccountName: sa{}}}\nstatus: {{phase: Running, podIP: 10.{}.0.{}}}\n",
                    r.below(3),
                    r.below(3),
                    r.below(2),
                    r.below(2),
                    r.below(2),
                    // Pods and services share some addresses now and then.
                    if r.below(10) == 0 { 96 } else { 0 },
                    r.below(30)
                )
            }
            4 => {
                let selector = if r.below(3) == 0 {
                    String::new()
                } else {
                    format!("\n  selector: {{matchLabels: {{app: a{}}}}}", r.below(3))
                };
                let action = ["ALLOW", "DENY"][r.below(2) as usize];
                format!(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: pol-{i}, namespace: ns-{}}}\nspec:{selector}\n  action: {action}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/ns-0/sa/sa{}\"]}}}}]\n",
                    r.below(3),
                    r.below(2)
                )
            }
            _ => format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs-{i}, namespace: ns-0}}\nspec:\n  hosts: [svc-0]\n  tcp:\n  - match: [{{sourceLabels: {{k{}: v}}}}]\n    route: [{{destination: {{host: svc-0}}}}]\n",
                r.below(2)
            ),
        }
    }

    /// Random changes to a random model, each translated with what the previous translation
    /// left: the result is always exactly the full translation's, and the unchanged pods'
    /// Addresses are reused (the same `Arc`), not translated again.
    #[test]
    fn incremental_translation_equals_full_translation() {
        // (kind, how many of it)
        const KINDS: [(usize, u64); 6] = [(0, 3), (1, 3), (2, 8), (3, 40), (4, 5), (5, 2)];
        let o = MeshOptions::default();
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut objects: BTreeMap<(usize, u64), String> = BTreeMap::new();
        for (kind, n) in KINDS {
            for i in 0..n {
                if kind != 1 || i == 0 {
                    objects.insert((kind, i), random_object(&mut r, kind, i));
                }
            }
        }
        let build = |objects: &BTreeMap<(usize, u64), String>| {
            let text: Vec<&str> = objects.values().map(String::as_str).collect();
            let p = parse_documents(&text.join("---\n"), "t.yaml");
            Arc::new(Snapshot::build(p.objects, p.problems))
        };
        let (first, mut reuse) = translate_reusing(&build(&objects), &o, None);
        let mut last = first.resources;
        let (mut reused, mut retranslated) = (0, 0);
        for step in 0..400 {
            // One to three objects change, appear or go; mostly pods, as in a cluster.
            for _ in 0..=r.below(3) {
                let (kind, n) = if r.below(4) == 0 {
                    KINDS[r.below(KINDS.len() as u64) as usize]
                } else {
                    KINDS[3]
                };
                let i = r.below(n);
                if r.below(8) == 0 {
                    objects.remove(&(kind, i));
                } else {
                    objects.insert((kind, i), random_object(&mut r, kind, i));
                }
            }
            let s = build(&objects);
            let (t, next) = translate_reusing(&s, &o, Some(&reuse));
            let full = translate(&s, &o);
            let differ: BTreeSet<String> =
                changed(&t.resources.addresses, &full.resources.addresses)
                    .into_iter()
                    .chain(changed(&full.resources.addresses, &t.resources.addresses))
                    .chain(changed(
                        &t.resources.authorizations,
                        &full.resources.authorizations,
                    ))
                    .chain(changed(
                        &full.resources.authorizations,
                        &t.resources.authorizations,
                    ))
                    .collect();
            assert!(
                t.resources == full.resources,
                "step {step}: {differ:?} differ"
            );
            assert_eq!(t.problems, full.problems, "step {step}");
            for (name, a) in &t.resources.addresses {
                match last.addresses.get(name) {
                    Some(b) if Arc::ptr_eq(a, b) => reused += 1,
                    _ => retranslated += 1,
                }
            }
            last = t.resources;
            reuse = next;
        }
        assert!(
            reused > 2 * retranslated,
            "reused {reused}, translated again {retranslated}"
        );
    }

    /// A pod with an IP of its own most of the time (now and then one another pod or a
    /// service has, or a uid another pod has, or none), as YAML.
    fn random_pod(r: &mut Rng, i: u64) -> String {
        let uid = match r.below(100) {
            0..10 => String::new(),
            10 => format!(", uid: pod-uid-{}", r.below(40)),
            _ => format!(", uid: pod-uid-{i}"),
        };
        let ip = match r.below(100) {
            0 => format!("10.1.0.{}", r.below(40)),
            1 => format!("10.96.0.{}", r.below(8)),
            _ => format!("10.1.0.{i}"),
        };
        let status = if r.below(15) == 0 {
            "{phase: Pending}".to_string()
        } else {
            format!("{{phase: Running, podIP: {ip}}}")
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}{uid}, labels: {{app: a{}, version: v{}}}}}\nspec: {{nodeName: n{}, serviceAccountName: sa{}, hostNetwork: {}}}\nstatus: {status}\n",
            r.below(3),
            r.below(3),
            r.below(3),
            r.below(2),
            r.below(2),
            r.below(25) == 0,
        )
    }

    /// Mostly pods changing, appearing and going, with few conflicts: each translation given
    /// the previous one's Addresses (which it then updates for the changed pods alone, when
    /// nothing is left out) equals the full translation.
    #[test]
    fn pod_changes_applied_to_previous_addresses_equal_full_translation() {
        let o = MeshOptions::default();
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        let mut objects: BTreeMap<(usize, u64), String> = BTreeMap::new();
        // Services with addresses of their own.
        let service = |r: &mut Rng, i: u64| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{}}}\nspec: {{clusterIP: 10.96.0.{i}, selector: {{app: a{}}}, ports: [{{name: http, port: 80, targetPort: {}}}]}}\n",
                r.below(3),
                r.below(3),
                8080 + r.below(2)
            )
        };
        for (kind, n) in [(0, 3), (4, 5)] {
            for i in 0..n {
                objects.insert((kind, i), random_object(&mut r, kind, i));
            }
        }
        for i in 0..8 {
            objects.insert((2, i), service(&mut r, i));
        }
        for i in 0..40 {
            objects.insert((3, i), random_pod(&mut r, i));
        }
        let build = |objects: &BTreeMap<(usize, u64), String>| {
            let text: Vec<&str> = objects.values().map(String::as_str).collect();
            let p = parse_documents(&text.join("---\n"), "t.yaml");
            Arc::new(Snapshot::build(p.objects, p.problems))
        };
        let (first, mut reuse) = translate_after(&build(&objects), &o, None);
        let mut last = first.resources;
        let mut applied = 0;
        for step in 0..400 {
            for _ in 0..=r.below(3) {
                if r.below(12) == 0 {
                    let (kind, n) = [(0, 3), (2, 8), (4, 5)][r.below(3) as usize];
                    let i = r.below(n);
                    let o = if kind == 2 {
                        service(&mut r, i)
                    } else {
                        random_object(&mut r, kind, i)
                    };
                    objects.insert((kind, i), o);
                } else {
                    let i = r.below(45);
                    if r.below(6) == 0 {
                        objects.remove(&(3, i));
                    } else {
                        objects.insert((3, i), random_pod(&mut r, i));
                    }
                }
            }
            let s = build(&objects);
            let (t, next) = translate_after(&s, &o, Some((&reuse, Some(&last.addresses))));
            let full = translate(&s, &o);
            assert!(t.resources == full.resources, "step {step}");
            assert_eq!(t.problems, full.problems, "step {step}");
            applied += usize::from(next.pods_only);
            last = t.resources;
            reuse = next;
        }
        assert!(
            applied > 100,
            "only {applied} translations applied to the previous"
        );
    }
}
