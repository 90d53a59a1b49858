//! Prometheus metrics with Istio's names and labels, so existing dashboards work unchanged.

use crate::identity::Identity;
use crate::state::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Istio's standard labels on TCP metrics. Unknown values are `unknown`, as Istio reports them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` when the client-side proxy reports, `destination` for the server side.
    pub reporter: String,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    /// `mutual_tls` over HBONE, `none` for plaintext.
    pub connection_security_policy: String,
}

impl Default for TcpLabels {
    fn default() -> Self {
        let u = || "unknown".to_string();
        TcpLabels {
            reporter: u(),
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: "unknown".into(),
        }
    }
}

/// An Istio label value: `unknown` when we do not know it.
pub fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

/// A workload's name for the labels: its owner's (Deployment, Job, …), else the pod's, as in
/// the `baggage` a proxy sends about it.
fn workload_name(w: &Workload) -> &str {
    if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    }
}

/// Who is on each end of a connection or request, as far as the reporting proxy knows: the
/// one place Istio's peer labels are filled in, for ztunnel and the waypoint.
#[derive(Debug, Clone, Copy)]
pub struct Peers<'a> {
    /// `source`, `destination` or `waypoint`.
    pub reporter: &'static str,
    pub source: Option<&'a Workload>,
    pub source_identity: Option<&'a Identity>,
    pub destination: Option<&'a Workload>,
    pub service: Option<&'a Service>,
    pub mtls: bool,
}

impl Peers<'_> {
    /// Each label is made once, straight from the peers (called per request by the waypoint).
    pub fn labels(&self) -> TcpLabels {
        let unknown = || "unknown".to_string();
        let of = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            w.map_or_else(unknown, |w| or_unknown(f(w)))
        };
        let (src, dst, svc) = (self.source, self.destination, self.service);
        let of_service = |f: fn(&Service) -> &str| svc.map_or_else(unknown, |s| or_unknown(f(s)));
        TcpLabels {
            reporter: self.reporter.into(),
            source_workload: of(src, workload_name),
            source_canonical_service: of(src, |w| &w.canonical_name),
            source_canonical_revision: of(src, |w| &w.canonical_revision),
            source_workload_namespace: match (src, self.source_identity) {
                (Some(w), _) => or_unknown(&w.namespace),
                (None, Some(id)) => id.namespace.clone(),
                (None, None) => unknown(),
            },
            source_principal: self
                .source_identity
                .map_or_else(unknown, |id| id.to_string()),
            source_app: of(src, |w| &w.canonical_name),
            source_version: of(src, |w| &w.canonical_revision),
            source_cluster: of(src, |w| &w.cluster_id),
            destination_service: of_service(|s| &s.hostname),
            destination_service_namespace: of_service(|s| &s.namespace),
            destination_service_name: of_service(|s| &s.name),
            destination_workload: of(dst, workload_name),
            destination_canonical_service: of(dst, |w| &w.canonical_name),
            destination_canonical_revision: of(dst, |w| &w.canonical_revision),
            destination_workload_namespace: of(dst, |w| &w.namespace),
            destination_principal: dst.map_or_else(unknown, |w| w.identity().to_string()),
            destination_app: of(dst, |w| &w.canonical_name),
            destination_version: of(dst, |w| &w.canonical_revision),
            destination_cluster: of(dst, |w| &w.cluster_id),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: if self.mtls { "mutual_tls" } else { "none" }.into(),
        }
    }
}

/// Istio's TCP metrics (`_total` is added by the encoder, as the OpenMetrics counter suffix).
#[derive(Default, Clone)]
pub struct TcpMetrics {
    pub connections_opened: Family<TcpLabels, Counter>,
    pub connections_closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.connections_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.connections_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during the connection (request direction)",
            self.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during the connection (response direction)",
            self.received_bytes.clone(),
        );
    }

    /// Count a connection's close and its bytes in one place, so totals stay consistent.
    pub fn closed(&self, labels: &TcpLabels, sent: u64, received: u64) {
        self.connections_closed.get_or_create(labels).inc();
        self.sent_bytes.get_or_create(labels).inc_by(sent);
        self.received_bytes.get_or_create(labels).inc_by(received);
    }

    /// The byte counters of `labels`, for a copy to add to while the connection runs (then
    /// only the close is counted at the end). `sent` is the request direction.
    pub fn live(&self, labels: &TcpLabels) -> (Counter, Counter) {
        (
            self.sent_bytes.get_or_create(labels).clone(),
            self.received_bytes.get_or_create(labels).clone(),
        )
    }
}

/// The four TCP counters of one label set, looked up in the families once: a proxy that keeps
/// them per label set counts a connection without building or hashing its labels again.
#[derive(Clone, Debug, Default)]
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    /// Request direction.
    pub sent: Counter,
    /// Response direction.
    pub received: Counter,
}

impl TcpMetrics {
    /// The counters of `labels` (created at zero when new), sharing their values with the
    /// families, so they are exported under `labels`.
    pub fn counters(&self, labels: &TcpLabels) -> TcpCounters {
        TcpCounters {
            opened: self.connections_opened.get_or_create(labels).clone(),
            closed: self.connections_closed.get_or_create(labels).clone(),
            sent: self.sent_bytes.get_or_create(labels).clone(),
            received: self.received_bytes.get_or_create(labels).clone(),
        }
    }
}

/// Render a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// A gauge helper for the few non-Istio metrics (e.g. enrolled pods).
pub fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_what_is_known_of_the_peers() {
        let src = Workload {
            name: "sleep-1".into(),
            workload_name: "sleep".into(),
            namespace: "test".into(),
            canonical_name: "sleep-app".into(),
            cluster_id: "Kubernetes".into(),
            ..Default::default()
        };
        let dst = Workload {
            name: "web-1".into(),
            namespace: "shop".into(),
            canonical_revision: "v2".into(),
            trust_domain: "cluster.local".into(),
            service_account: "web".into(),
            ..Default::default()
        };
        let svc = Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            ..Default::default()
        };
        let id = Identity::new("cluster.local", "test", "sleep");
        let all = Peers {
            reporter: "waypoint",
            source: Some(&src),
            source_identity: Some(&id),
            destination: Some(&dst),
            service: Some(&svc),
            mtls: true,
        }
        .labels();
        let u = || "unknown".to_string();
        assert_eq!(
            all,
            TcpLabels {
                reporter: "waypoint".into(),
                source_workload: "sleep".into(),
                source_canonical_service: "sleep-app".into(),
                source_canonical_revision: u(),
                source_workload_namespace: "test".into(),
                source_principal: "spiffe://cluster.local/ns/test/sa/sleep".into(),
                source_app: "sleep-app".into(),
                source_version: u(),
                source_cluster: "Kubernetes".into(),
                destination_service: "web.shop.svc.cluster.local".into(),
                destination_service_namespace: "shop".into(),
                destination_service_name: "web".into(),
                destination_workload: "web-1".into(),
                destination_canonical_service: u(),
                destination_canonical_revision: "v2".into(),
                destination_workload_namespace: "shop".into(),
                destination_principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
                destination_app: u(),
                destination_version: "v2".into(),
                // A workload's cluster defaults to Istio's `Kubernetes`.
                destination_cluster: "Kubernetes".into(),
                request_protocol: "tcp".into(),
                response_flags: "-".into(),
                connection_security_policy: "mutual_tls".into(),
            }
        );
        // Only the client's certificate: its namespace still names the source.
        let only_id = Peers {
            reporter: "destination",
            source: None,
            source_identity: Some(&id),
            destination: None,
            service: None,
            mtls: false,
        }
        .labels();
        assert_eq!(
            only_id,
            TcpLabels {
                reporter: "destination".into(),
                source_workload_namespace: "test".into(),
                source_principal: "spiffe://cluster.local/ns/test/sa/sleep".into(),
                connection_security_policy: "none".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn istio_names_in_output() {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let labels = TcpLabels {
            reporter: "destination".into(),
            connection_security_policy: "mutual_tls".into(),
            ..Default::default()
        };
        tcp.connections_opened.get_or_create(&labels).inc();
        tcp.closed(&labels, 10, 20);
        let text = encode(&registry);
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"destination\""));
        assert!(text.contains("istio_tcp_sent_bytes_total{"));
        assert!(text.contains("connection_security_policy=\"mutual_tls\"} 10"));
        assert!(text.contains("istio_tcp_received_bytes_total{"));
    }

    #[test]
    fn counters_of_a_label_set_are_the_exported_ones() {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let labels = TcpLabels {
            reporter: "source".into(),
            ..Default::default()
        };
        let c = tcp.counters(&labels);
        c.opened.inc();
        c.sent.inc_by(7);
        c.received.inc_by(9);
        c.closed.inc();
        // A second lookup shares the values (and the families export them).
        let again = tcp.counters(&labels);
        assert_eq!(again.opened.get(), 1);
        assert_eq!(again.sent.get(), 7);
        let text = encode(&registry);
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"source\""));
        assert!(text.contains("connection_security_policy=\"unknown\"} 9"));
        assert!(text.contains("istio_tcp_connections_closed_total{reporter=\"source\""));
    }
}
