//! ztunnel's metrics: Istio's TCP and DNS metrics, labelled from the workloads on each side.

use mesh::identity::Identity;
use mesh::metrics::{TcpLabels, TcpMetrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use mesh::state::{Service, Workload};

pub struct Metrics {
    pub registry: Registry,
    pub tcp: TcpMetrics,
    pub dns: DnsMetrics,
    pub enrolled_pods: Gauge,
    /// Connections refused because they were aimed at one of ztunnel's own listeners.
    pub self_loops_refused: Counter,
    /// HBONE connections closed before TLS because the handshake caps were reached.
    pub hbone_handshakes_refused: Family<RefusedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `total` or `per_source`.
    pub reason: &'static str,
}

impl Metrics {
    pub fn hbone_refused(&self, why: mesh::hbone::admission::Refused) {
        self.hbone_handshakes_refused
            .get_or_create(&RefusedLabels {
                reason: why.label(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let dns = DnsMetrics::default();
        dns.register(&mut registry);
        let enrolled_pods = mesh::metrics::gauge(
            &mut registry,
            "ztunnel_enrolled_pods",
            "Pods on this node whose traffic this ztunnel captures",
        );
        let self_loops_refused = Counter::default();
        registry.register(
            "ztunnel_self_loop_connections_refused",
            "Captured connections refused because their destination was one of ztunnel's own listeners",
            self_loops_refused.clone(),
        );
        let hbone_handshakes_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "ztunnel_hbone_handshakes_refused",
            "HBONE connections closed before TLS because too many handshakes were in progress (overall or from one source)",
            hbone_handshakes_refused.clone(),
        );
        Metrics {
            registry,
            tcp,
            dns,
            enrolled_pods,
            self_loops_refused,
            hbone_handshakes_refused,
        }
    }
}

/// Istio ztunnel's DNS labels: the query type (`a`, `aaaa`, …), `udp` or `tcp`, and the asking
/// workload's canonical service and revision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub request_query_type: String,
    pub request_protocol: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

/// Istio ztunnel's DNS metrics. Every query the proxy could read counts in `requests`; those
/// relayed upstream also in `upstream_requests`, so the ones answered locally are the
/// difference.
#[derive(Clone)]
pub struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Family<DnsLabels, Histogram>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.1, 1.0, 5.0])
            }),
        }
    }
}

impl DnsMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_dns_requests",
            "DNS queries received by the in-pod DNS proxies",
            self.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS queries forwarded to the upstream resolvers",
            self.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "DNS queries no upstream resolver answered (SERVFAIL to the client)",
            self.upstream_failures.clone(),
        );
        registry.register_with_unit(
            "istio_dns_upstream_request_duration",
            "Time to get a response from upstream",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
    }
}

/// Who is on each end of a connection, as far as we know.
pub struct Peers<'a> {
    pub reporter: &'static str,
    pub source: Option<&'a Workload>,
    pub source_identity: Option<&'a Identity>,
    pub destination: Option<&'a Workload>,
    pub service: Option<&'a Service>,
    pub mtls: bool,
}

pub(crate) fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

impl Peers<'_> {
    pub fn labels(&self) -> TcpLabels {
        let mut l = TcpLabels {
            reporter: self.reporter.into(),
            connection_security_policy: if self.mtls { "mutual_tls" } else { "none" }.into(),
            ..Default::default()
        };
        if let Some(w) = self.source {
            l.source_workload = or_unknown(&w.workload_name);
            l.source_canonical_service = or_unknown(&w.canonical_name);
            l.source_canonical_revision = or_unknown(&w.canonical_revision);
            l.source_workload_namespace = or_unknown(&w.namespace);
            l.source_app = or_unknown(&w.canonical_name);
            l.source_version = or_unknown(&w.canonical_revision);
            l.source_cluster = or_unknown(&w.cluster_id);
        }
        if let Some(id) = self.source_identity {
            l.source_principal = id.to_string();
            if self.source.is_none() {
                l.source_workload_namespace = id.namespace.clone();
            }
        }
        if let Some(w) = self.destination {
            l.destination_workload = or_unknown(&w.workload_name);
            l.destination_canonical_service = or_unknown(&w.canonical_name);
            l.destination_canonical_revision = or_unknown(&w.canonical_revision);
            l.destination_workload_namespace = or_unknown(&w.namespace);
            l.destination_principal = w.identity().to_string();
            l.destination_app = or_unknown(&w.canonical_name);
            l.destination_version = or_unknown(&w.canonical_revision);
            l.destination_cluster = or_unknown(&w.cluster_id);
        }
        if let Some(s) = self.service {
            l.destination_service = or_unknown(&s.hostname);
            l.destination_service_namespace = or_unknown(&s.namespace);
            l.destination_service_name = or_unknown(&s.name);
        }
        l
    }
}
