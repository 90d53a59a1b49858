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

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<HttpLabels, Counter>,
    pub duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    pub tcp: TcpMetrics,
    /// RBAC verdicts by policy, action and decision.
    pub rbac: Family<RbacLabels, Counter>,
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
        registry.register(
            "waypoint_rbac_decisions",
            "Authorization (RBAC filter) verdicts, by effective policy",
            self.rbac.clone(),
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
