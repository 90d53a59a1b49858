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
    pub fn labels(&self) -> TcpLabels {
        let mut l = TcpLabels {
            reporter: self.reporter.into(),
            connection_security_policy: if self.mtls { "mutual_tls" } else { "none" }.into(),
            ..Default::default()
        };
        if let Some(w) = self.source {
            l.source_workload = or_unknown(workload_name(w));
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
            l.destination_workload = or_unknown(workload_name(w));
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
}
