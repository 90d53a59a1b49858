//! Istio's standard HTTP metrics (`istio_requests_total`, durations, sizes) reported as
//! `reporter="waypoint"`, the TCP metrics of `mesh::metrics` for TCP listeners, and the
//! JSON access log line (tracing target `access`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mesh::identity::Identity;
use mesh::metrics::{TcpLabels, TcpMetrics};
use mesh::state::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub const REPORTER: &str = "waypoint";

thread_local! {
    /// The empty policy label, shared (no allocation per request).
    static NO_POLICY: std::sync::Arc<String> = std::sync::Arc::default();
}

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

/// Labels of `waypoint_rbac_decisions_total`: one RBAC engine's verdict on one request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RbacLabels {
    /// The effective policy (Istio's rule name `ns[..]-policy[..]-rule[..]`), empty when none
    /// matched.
    pub policy: std::sync::Arc<String>,
    /// The engine's action: ALLOW, DENY or LOG (AUDIT policies).
    pub action: &'static str,
    /// `allowed` or `denied` (LOG engines always allow).
    pub decision: &'static str,
    /// Whether these were shadow (dry-run) rules, which never deny.
    pub shadow: bool,
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
    /// RBAC verdicts by policy, action and decision.
    pub rbac: Family<RbacLabels, Counter>,
    /// Envoy's per-cluster circuit-breaker and outlier-detection statistics.
    pub clusters: ClusterMetrics,
    /// Envoy's `upstream_rq_retry`, `_retry_success`, `_retry_limit_exceeded` and
    /// `retry_or_shadow_abandoned` (a body too long to keep for a retry), per cluster.
    pub retries: Family<ClusterLabel, Counter>,
    pub retry_successes: Family<ClusterLabel, Counter>,
    pub retry_limit_exceeded: Family<ClusterLabel, Counter>,
    pub retry_or_shadow_abandoned: Family<ClusterLabel, Counter>,
    pub mirrors: Family<MirrorLabels, Counter>,
    /// The four request metrics of each label set seen, found with one lookup per request
    /// instead of one per family (the handles share their values with the families, whose
    /// entries are never removed).
    handles: Arc<Mutex<HashMap<HttpLabels, Handles>>>,
}

/// One label set's request metrics.
struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Label sets kept in `Metrics::handles` before it is emptied (pods come and go; the families
/// keep their series either way).
const MAX_HANDLES: usize = 4096;

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
            rbac: Family::default(),
            clusters: ClusterMetrics::default(),
            retries: Family::default(),
            retry_successes: Family::default(),
            retry_limit_exceeded: Family::default(),
            retry_or_shadow_abandoned: Family::default(),
            mirrors: Family::default(),
            handles: Arc::default(),
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
        self.clusters.register(registry);
        registry.register(
            "waypoint_rbac_decisions",
            "Authorization (RBAC filter) verdicts, by effective policy",
            self.rbac.clone(),
        );
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

    /// Count one RBAC verdict.
    pub fn rbac(&self, v: &crate::rbac::Verdict, shadow: bool) {
        let labels = RbacLabels {
            policy: v
                .policy
                .clone()
                .unwrap_or_else(|| NO_POLICY.with(|p| p.clone())),
            action: v.action.as_str(),
            decision: if v.allowed { "allowed" } else { "denied" },
            shadow,
        };
        self.rbac.get_or_create(&labels).inc();
    }

    fn cluster(cluster: &str) -> ClusterLabel {
        ClusterLabel {
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
        let Ok(mut handles) = self.handles.lock() else {
            return;
        };
        if !handles.contains_key(labels) {
            if handles.len() >= MAX_HANDLES {
                handles.clear();
            }
            let h = Handles {
                requests: self.requests.get_or_create(labels).clone(),
                duration: self.duration.get_or_create(labels).clone(),
                request_bytes: self.request_bytes.get_or_create(labels).clone(),
                response_bytes: self.response_bytes.get_or_create(labels).clone(),
            };
            handles.insert(labels.clone(), h);
        }
        if let Some(h) = handles.get(labels) {
            h.requests.inc();
            h.duration.observe(millis);
            h.request_bytes.observe(request_bytes as f64);
            h.response_bytes.observe(response_bytes as f64);
        }
    }
}

/// Envoy's cluster label, as Istio's Prometheus names it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster_name: String,
}

type ClusterCounters = Family<ClusterLabel, Counter>;

/// Envoy's statistics per cluster (`cluster.<name>.…`), named as Envoy's Prometheus output
/// names them (`envoy_cluster_…{cluster_name=…}`; counters carry OpenMetrics' `_total`).
#[derive(Clone, Default)]
pub struct ClusterMetrics {
    /// Requests failed by the pending-request or request limits (`upstream_rq_pending_overflow`).
    pub rq_pending_overflow: ClusterCounters,
    /// Requests that found every allowed connection in use (`upstream_cx_overflow`).
    pub cx_overflow: ClusterCounters,
    /// Retries refused by `max_retries` (`upstream_rq_retry_overflow`).
    pub rq_retry_overflow: ClusterCounters,
    pub ejections_active: Family<ClusterLabel, Gauge>,
    pub ejections_enforced: ClusterCounters,
    /// Per kind: consecutive 5xx, gateway failure, local-origin failure.
    pub enforced_kind: [ClusterCounters; 3],
    pub detected_kind: [ClusterCounters; 3],
}

const KINDS: [&str; 3] = [
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
];

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "envoy_cluster_upstream_rq_pending_overflow",
            "Requests that overflowed the connection pool or request circuit breaking",
            self.rq_pending_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_cx_overflow",
            "Times the connection circuit breaker overflowed",
            self.cx_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_retry_overflow",
            "Retries not sent because of circuit breaking",
            self.rq_retry_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_active",
            "Hosts currently ejected",
            self.ejections_active.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_enforced",
            "Ejections enforced, every kind",
            self.ejections_enforced.clone(),
        );
        for (i, kind) in KINDS.iter().enumerate() {
            registry.register(
                format!("envoy_cluster_outlier_detection_ejections_enforced_{kind}"),
                format!("Ejections enforced for {kind}"),
                self.enforced_kind[i].clone(),
            );
            registry.register(
                format!("envoy_cluster_outlier_detection_ejections_detected_{kind}"),
                format!("Ejections detected (enforced or not) for {kind}"),
                self.detected_kind[i].clone(),
            );
        }
    }

    /// The handles of one cluster (taken once when the cluster is built).
    pub fn cluster(&self, name: &str) -> ClusterStats {
        let l = ClusterLabel {
            cluster_name: name.to_string(),
        };
        ClusterStats {
            rq_pending_overflow: self.rq_pending_overflow.get_or_create(&l).clone(),
            cx_overflow: self.cx_overflow.get_or_create(&l).clone(),
            rq_retry_overflow: self.rq_retry_overflow.get_or_create(&l).clone(),
            ejections_active: self.ejections_active.get_or_create(&l).clone(),
            ejections_enforced: self.ejections_enforced.get_or_create(&l).clone(),
            enforced_kind: std::array::from_fn(|i| self.enforced_kind[i].get_or_create(&l).clone()),
            detected_kind: std::array::from_fn(|i| self.detected_kind[i].get_or_create(&l).clone()),
        }
    }
}

/// One cluster's statistics.
#[derive(Clone, Debug, Default)]
pub struct ClusterStats {
    pub rq_pending_overflow: Counter,
    pub cx_overflow: Counter,
    pub rq_retry_overflow: Counter,
    pub ejections_active: Gauge,
    pub ejections_enforced: Counter,
    pub enforced_kind: [Counter; 3],
    pub detected_kind: [Counter; 3],
}

impl ClusterStats {
    fn kind(kind: crate::outlier::Kind) -> usize {
        match kind {
            crate::outlier::Kind::Consecutive5xx => 0,
            crate::outlier::Kind::ConsecutiveGatewayFailure => 1,
            crate::outlier::Kind::ConsecutiveLocalOriginFailure => 2,
        }
    }
    pub fn detected(&self, kind: crate::outlier::Kind) {
        self.detected_kind[Self::kind(kind)].inc();
    }
    pub fn enforced(&self, kind: crate::outlier::Kind) {
        self.ejections_enforced.inc();
        self.enforced_kind[Self::kind(kind)].inc();
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
        // The second goes through the handles kept for the labels: the same series.
        m.request(&labels, 4.0, 10, 2000);
        let text = mesh::metrics::encode(&registry);
        assert!(
            text.contains("istio_request_duration_milliseconds_count{") && text.contains("} 2\n"),
            "{text}"
        );
        assert_eq!(m.requests.get_or_create(&labels).get(), 2);
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

    #[test]
    fn counts_survive_the_handles_being_emptied() {
        let m = Metrics::default();
        let labels = |code: usize| Peers::default().http("http", code as u16, "-");
        m.request(&labels(0), 1.0, 0, 0);
        for code in 1..=MAX_HANDLES {
            m.request(&labels(code), 1.0, 0, 0);
        }
        assert!(m.handles.lock().unwrap().len() <= MAX_HANDLES);
        m.request(&labels(0), 1.0, 0, 0);
        assert_eq!(m.requests.get_or_create(&labels(0)).get(), 2);
        assert_eq!(m.requests.get_or_create(&labels(MAX_HANDLES)).get(), 1);
    }
}
