//! Istio's standard HTTP metrics (`istio_requests_total`, durations, sizes) reported as
//! `reporter="waypoint"`, the TCP metrics of `mesh::metrics` for TCP listeners, and the
//! JSON access log line (tracing target `access`).

use mesh::identity::Identity;
use mesh::metrics::{TcpLabels, TcpMetrics};
use mesh::state::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub const REPORTER: &str = "waypoint";

/// Istio's labels on request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
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
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<HttpLabels, Counter>,
    pub duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    pub tcp: TcpMetrics,
}

/// Istio's default duration buckets, in milliseconds.
fn duration_buckets() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

/// Istio's default size buckets, in bytes (1 to 10^9).
fn size_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 10,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_buckets),
            request_bytes: Family::new_with_constructor(size_buckets),
            response_bytes: Family::new_with_constructor(size_buckets),
            tcp: TcpMetrics::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("istio_requests", "Requests handled", self.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            self.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            self.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            self.response_bytes.clone(),
        );
        self.tcp.register(registry);
    }

    /// Count one finished request.
    pub fn request(
        &self,
        labels: &HttpLabels,
        millis: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response_bytes as f64);
    }
}

/// Who talked to whom, for the labels.
#[derive(Debug, Default, Clone, Copy)]
pub struct Peers<'a> {
    pub source: Option<&'a Workload>,
    pub source_identity: Option<&'a Identity>,
    pub service: Option<&'a Service>,
    pub destination: Option<&'a Workload>,
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

fn workload_name(w: &Workload) -> &str {
    if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    }
}

impl Peers<'_> {
    pub fn tcp(&self) -> TcpLabels {
        let mut l = TcpLabels {
            reporter: REPORTER.into(),
            connection_security_policy: "mutual_tls".into(),
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
            if l.source_workload_namespace == "unknown" {
                l.source_workload_namespace = id.namespace.clone();
            }
        }
        if let Some(s) = self.service {
            l.destination_service = or_unknown(&s.hostname);
            l.destination_service_namespace = or_unknown(&s.namespace);
            l.destination_service_name = or_unknown(&s.name);
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
        l
    }

    pub fn http(&self, protocol: &str, status: u16, flags: &str) -> HttpLabels {
        let t = self.tcp();
        HttpLabels {
            reporter: t.reporter,
            source_workload: t.source_workload,
            source_canonical_service: t.source_canonical_service,
            source_canonical_revision: t.source_canonical_revision,
            source_workload_namespace: t.source_workload_namespace,
            source_principal: t.source_principal,
            source_app: t.source_app,
            source_version: t.source_version,
            source_cluster: t.source_cluster,
            destination_service: t.destination_service,
            destination_service_namespace: t.destination_service_namespace,
            destination_service_name: t.destination_service_name,
            destination_workload: t.destination_workload,
            destination_canonical_service: t.destination_canonical_service,
            destination_canonical_revision: t.destination_canonical_revision,
            destination_workload_namespace: t.destination_workload_namespace,
            destination_principal: t.destination_principal,
            destination_app: t.destination_app,
            destination_version: t.destination_version,
            destination_cluster: t.destination_cluster,
            request_protocol: protocol.into(),
            response_code: status.to_string(),
            grpc_response_status: String::new(),
            response_flags: flags.into(),
            connection_security_policy: t.connection_security_policy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels() {
        let mut registry = Registry::default();
        let m = Metrics::default();
        m.register(&mut registry);
        let src = Workload {
            name: "sleep-1".into(),
            namespace: "test".into(),
            canonical_name: "sleep".into(),
            ..Default::default()
        };
        let id = Identity::new("cluster.local", "test", "sleep");
        let labels = Peers {
            source: Some(&src),
            source_identity: Some(&id),
            ..Default::default()
        }
        .http("http", 200, "-");
        m.request(&labels, 3.0, 10, 2000);
        let text = mesh::metrics::encode(&registry);
        assert!(
            text.contains("istio_requests_total{reporter=\"waypoint\",source_workload=\"sleep-1\""),
            "{text}"
        );
        assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/test/sa/sleep\""));
        assert!(text.contains("response_code=\"200\""));
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(text.contains("istio_response_bytes_sum{"));
        assert!(text.contains("istio_request_bytes_count{"));
    }
}
