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
    /// The peers, the protocol, the flags and the security policy, as on TCP metrics.
    #[prometheus(flatten)]
    pub peers: TcpLabels,
    pub response_code: String,
    pub grpc_response_status: String,
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// An upstream cluster, as Envoy's cluster stats name it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster_name: String,
}

/// How a mirror copy went: `sent` (answered), `failed`, `dropped` (fell behind or too slow).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub cluster_name: String,
    pub outcome: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<HttpLabels, Counter>,
    pub duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    pub tcp: TcpMetrics,
    /// Envoy's `upstream_rq_retry`, `_retry_success`, `_retry_limit_exceeded` and
    /// `retry_or_shadow_abandoned` (a body too long to keep for a retry), per cluster.
    pub retries: Family<ClusterLabels, Counter>,
    pub retry_successes: Family<ClusterLabels, Counter>,
    pub retry_limit_exceeded: Family<ClusterLabels, Counter>,
    pub retry_or_shadow_abandoned: Family<ClusterLabels, Counter>,
    pub mirrors: Family<MirrorLabels, Counter>,
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
            retries: Family::default(),
            retry_successes: Family::default(),
            retry_limit_exceeded: Family::default(),
            retry_or_shadow_abandoned: Family::default(),
            mirrors: Family::default(),
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
        registry.register(
            "envoy_cluster_upstream_rq_retry",
            "Retries sent",
            self.retries.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_retry_success",
            "Requests that succeeded after a retry",
            self.retry_successes.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_retry_limit_exceeded",
            "Requests still failing when no retry was left",
            self.retry_limit_exceeded.clone(),
        );
        registry.register(
            "envoy_cluster_retry_or_shadow_abandoned",
            "Request bodies too long to keep for a retry (not retried)",
            self.retry_or_shadow_abandoned.clone(),
        );
        registry.register(
            "waypoint_mirror_requests",
            "Mirror copies by outcome (sent, failed, dropped)",
            self.mirrors.clone(),
        );
    }

    fn cluster(cluster: &str) -> ClusterLabels {
        ClusterLabels {
            cluster_name: cluster.to_string(),
        }
    }

    pub fn retry(&self, cluster: &str) {
        self.retries.get_or_create(&Self::cluster(cluster)).inc();
    }

    pub fn retry_success(&self, cluster: &str) {
        self.retry_successes
            .get_or_create(&Self::cluster(cluster))
            .inc();
    }

    pub fn retry_limit_exceeded(&self, cluster: &str) {
        self.retry_limit_exceeded
            .get_or_create(&Self::cluster(cluster))
            .inc();
    }

    /// The counter a request's body increments if it outgrows the retry buffer.
    pub fn retry_or_shadow_abandoned(&self, cluster: &str) -> Counter {
        self.retry_or_shadow_abandoned
            .get_or_create(&Self::cluster(cluster))
            .clone()
    }

    /// The outcome counters of a mirror cluster.
    pub fn mirror_outcome(&self, cluster: &str) -> crate::mirror::Outcome {
        let c = |outcome: &str| {
            self.mirrors
                .get_or_create(&MirrorLabels {
                    cluster_name: cluster.to_string(),
                    outcome: outcome.to_string(),
                })
                .clone()
        };
        crate::mirror::Outcome {
            sent: c("sent"),
            failed: c("failed"),
            dropped: c("dropped"),
        }
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

impl Peers<'_> {
    pub fn tcp(&self) -> TcpLabels {
        mesh::metrics::Peers {
            reporter: REPORTER,
            source: self.source,
            source_identity: self.source_identity,
            destination: self.destination,
            service: self.service,
            mtls: true,
        }
        .labels()
    }

    pub fn http(&self, protocol: &str, status: u16, flags: &str) -> HttpLabels {
        let mut peers = self.tcp();
        peers.request_protocol = protocol.into();
        peers.response_flags = flags.into();
        HttpLabels {
            peers,
            response_code: status.to_string(),
            grpc_response_status: String::new(),
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
