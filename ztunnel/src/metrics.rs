//! ztunnel's metrics: Istio's TCP and DNS metrics, labelled from the workloads on each side.

use mesh::metrics::TcpMetrics;
pub use mesh::metrics::{Peers, or_unknown};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub struct Metrics {
    pub registry: Registry,
    pub tcp: TcpMetrics,
    pub dns: DnsMetrics,
    pub enrolled_pods: Gauge,
    /// Connections refused because they were aimed at one of ztunnel's own listeners.
    pub self_loops_refused: Counter,
    /// HBONE connections closed before TLS because the handshake caps were reached.
    pub hbone_handshakes_refused: Family<RefusedLabels, Counter>,
    /// `tcp`'s label sets, interned per pair of peers.
    pub label_sets: crate::label_sets::LabelSets,
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
        let label_sets = crate::label_sets::LabelSets::new(tcp.clone());
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
            label_sets,
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
