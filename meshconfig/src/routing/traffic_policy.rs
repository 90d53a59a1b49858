//! DestinationRule `trafficPolicy` (top level, per subset, per port): load balancing, connection
//! pool, outlier detection and client TLS, parsed field by field with Istio's validation, each
//! problem naming its field.

use std::time::Duration;

use serde_yaml_ng::Value;

use super::{At, duration, join};
use crate::k8s::Problem;

/// A double kept exactly as written (compared bit for bit, so the model stays `Eq`).
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(transparent)]
pub struct Float(pub f64);

impl PartialEq for Float {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Float {}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// `portLevelSettings[]`: replaces the four parts for one port (not inherited, as Istio).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PortTrafficPolicy {
    pub port: u16,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SimpleLb {
    Unspecified,
    RoundRobin,
    LeastRequest,
    Random,
    Passthrough,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadBalancer {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHash>,
    pub warmup: Option<Warmup>,
}

/// `warmup` (or the older `warmupDurationSecs`): Envoy's slow start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Warmup {
    pub duration: Duration,
    /// Istio's default 10 (Envoy's).
    pub minimum_percent: Float,
    /// Istio's default 1.0 (linear).
    pub aggression: Float,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum HashKey {
    Header(String),
    Cookie {
        name: String,
        path: String,
        ttl: Option<Duration>,
        attributes: Vec<(String, String)>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HashAlgorithm {
    /// `minimumRingSize` (the deprecated top-level field lands here too; Istio's default 1024).
    RingHash { minimum_ring_size: u64 },
    /// `tableSize` 0: Envoy's default (65537).
    Maglev { table_size: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub algorithm: HashAlgorithm,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TcpPool {
    /// 0: not set (Istio cannot tell 0 from unset either).
    pub max_connections: u32,
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HttpPool {
    pub http1_max_pending_requests: u32,
    pub http2_max_requests: u32,
    pub max_requests_per_connection: u32,
    pub max_retries: u32,
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    pub use_client_protocol: bool,
    pub max_concurrent_streams: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    /// `None`: Envoy's default (5); `Some(0)`: off.
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    /// 0: Envoy's default (10%).
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// Client TLS to the endpoints. File paths are as written (relative ones are relative to
/// pilot's working directory); `credentialName` is a Secret (Kubernetes) or a folder name
/// holding `tls.crt`, `tls.key`, `ca.crt` (folder source).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClientTls {
    pub mode: TlsMode,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: bool,
}

fn count(at: At<'_>) -> Result<u32, Problem> {
    let n = at.int()?;
    u32::try_from(n).map_err(|_| at.problem(format!("{n} is not a count (0 or more, below 2^32)")))
}

fn percent(at: At<'_>) -> Result<u32, Problem> {
    let n = at.int()?;
    match u32::try_from(n) {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(at.problem(format!("{n} is not a percentage (0-100)"))),
    }
}

fn number(at: At<'_>) -> Result<f64, Problem> {
    match at.v {
        Value::Number(n) => n.as_f64().ok_or_else(|| at.wrong("a number")),
        _ => Err(at.wrong("a number")),
    }
}

/// A duration of at least 1 ms (Istio's rule for the pool and outlier durations).
fn positive_duration(at: At<'_>) -> Result<Duration, Problem> {
    let d = duration(at)?;
    if d < Duration::from_millis(1) {
        return Err(at.problem("must be at least 1ms"));
    }
    Ok(d)
}

fn enumeration<T: Copy>(at: At<'_>, values: &[(&str, T)]) -> Result<T, Problem> {
    let s = at.string()?;
    values
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
            at.problem(format!("{s:?} is not one of {}", names.join(", ")))
        })
}

pub(super) fn traffic_policy(at: At<'_>) -> Result<TrafficPolicy, Problem> {
    at.object(&[
        "loadBalancer",
        "connectionPool",
        "outlierDetection",
        "tls",
        "portLevelSettings",
    ])?;
    let p = TrafficPolicy {
        load_balancer: at.get("loadBalancer", load_balancer)?,
        connection_pool: at.get("connectionPool", connection_pool)?,
        outlier_detection: at.get("outlierDetection", outlier_detection)?,
        tls: at.get("tls", tls)?,
        port_level_settings: at
            .get("portLevelSettings", |a| a.list(port_level))?
            .unwrap_or_default(),
    };
    for (i, s) in p.port_level_settings.iter().enumerate() {
        if p.port_level_settings[..i].iter().any(|o| o.port == s.port) {
            return Err(Problem {
                field: format!("{}[{i}].port.number", join(at.path, "portLevelSettings")),
                ..at.problem(format!("port {} has settings twice", s.port))
            });
        }
    }
    Ok(p)
}

fn port_level(at: At<'_>) -> Result<PortTrafficPolicy, Problem> {
    at.object(&[
        "port",
        "loadBalancer",
        "connectionPool",
        "outlierDetection",
        "tls",
    ])?;
    let port = at
        .get("port", |p| {
            p.object(&["number"])?;
            p.get("number", |n| n.port())?
                .ok_or_else(|| p.problem("number is required"))
        })?
        .ok_or_else(|| Problem {
            field: join(at.path, "port"),
            ..at.problem("is required")
        })?;
    Ok(PortTrafficPolicy {
        port,
        load_balancer: at.get("loadBalancer", load_balancer)?,
        connection_pool: at.get("connectionPool", connection_pool)?,
        outlier_detection: at.get("outlierDetection", outlier_detection)?,
        tls: at.get("tls", tls)?,
    })
}

fn load_balancer(at: At<'_>) -> Result<LoadBalancer, Problem> {
    // `localityLbSetting` is accepted and not applied: a waypoint has one locality here.
    at.object(&[
        "simple",
        "consistentHash",
        "localityLbSetting",
        "warmupDurationSecs",
        "warmup",
    ])?;
    let simple = at.get("simple", |a| {
        enumeration(
            a,
            &[
                ("UNSPECIFIED", SimpleLb::Unspecified),
                ("ROUND_ROBIN", SimpleLb::RoundRobin),
                ("LEAST_REQUEST", SimpleLb::LeastRequest),
                // Deprecated, Istio treats it as LEAST_REQUEST.
                ("LEAST_CONN", SimpleLb::LeastRequest),
                ("RANDOM", SimpleLb::Random),
                ("PASSTHROUGH", SimpleLb::Passthrough),
            ],
        )
    })?;
    let consistent_hash = at.get("consistentHash", consistent_hash)?;
    if simple.is_some() && consistent_hash.is_some() {
        return Err(at.problem("only one of simple, consistentHash"));
    }
    let warmup = match (
        at.get("warmup", warmup)?,
        at.get("warmupDurationSecs", positive_duration)?,
    ) {
        (Some(_), Some(_)) => return Err(at.problem("only one of warmup, warmupDurationSecs")),
        (Some(w), None) => Some(w),
        (None, Some(d)) => Some(Warmup {
            duration: d,
            minimum_percent: Float(10.0),
            aggression: Float(1.0),
        }),
        (None, None) => None,
    };
    if warmup.is_some()
        && !matches!(
            simple,
            None | Some(SimpleLb::RoundRobin | SimpleLb::LeastRequest | SimpleLb::Unspecified)
        )
    {
        return Err(at.problem("warmup applies to ROUND_ROBIN and LEAST_REQUEST only"));
    }
    if warmup.is_some() && consistent_hash.is_some() {
        return Err(at.problem("warmup applies to ROUND_ROBIN and LEAST_REQUEST only"));
    }
    Ok(LoadBalancer {
        simple,
        consistent_hash,
        warmup,
    })
}

fn warmup(at: At<'_>) -> Result<Warmup, Problem> {
    at.object(&["duration", "minimumPercent", "aggression"])?;
    let duration = at
        .get("duration", positive_duration)?
        .ok_or_else(|| Problem {
            field: join(at.path, "duration"),
            ..at.problem("is required")
        })?;
    let minimum_percent = at
        .get("minimumPercent", |a| {
            let v = number(a)?;
            if (0.0..=100.0).contains(&v) {
                Ok(v)
            } else {
                Err(a.problem(format!("{v} is not a percentage (0-100)")))
            }
        })?
        .unwrap_or(10.0);
    let aggression = at
        .get("aggression", |a| {
            let v = number(a)?;
            if v >= 1.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(a.problem(format!("{v} must be 1 or more")))
            }
        })?
        .unwrap_or(1.0);
    Ok(Warmup {
        duration,
        minimum_percent: Float(minimum_percent),
        aggression: Float(aggression),
    })
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn consistent_hash(at: At<'_>) -> Result<ConsistentHash, Problem> {
    at.object(&[
        "httpHeaderName",
        "httpCookie",
        "useSourceIp",
        "httpQueryParameterName",
        "ringHash",
        "maglev",
        "minimumRingSize",
    ])?;
    let mut keys = Vec::new();
    if let Some(h) = at.get("httpHeaderName", |a| a.string())? {
        keys.push(HashKey::Header(h));
    }
    if let Some(c) = at.get("httpCookie", |a| {
        a.object(&["name", "path", "ttl", "attributes"])?;
        let name = a.get("name", |n| n.string())?.unwrap_or_default();
        if name.is_empty() {
            return Err(Problem {
                field: join(a.path, "name"),
                ..a.problem("is required")
            });
        }
        let attributes = a
            .get("attributes", |l| {
                l.list(|x| {
                    x.object(&["name", "value"])?;
                    Ok((
                        x.get("name", |n| n.string())?.unwrap_or_default(),
                        x.get("value", |n| n.string())?.unwrap_or_default(),
                    ))
                })
            })?
            .unwrap_or_default();
        Ok(HashKey::Cookie {
            name,
            path: a.get("path", |p| p.string())?.unwrap_or_default(),
            ttl: a.get("ttl", duration)?,
            attributes,
        })
    })? {
        keys.push(c);
    }
    if at.get("useSourceIp", |a| a.boolean())? == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = at.get("httpQueryParameterName", |a| a.string())? {
        keys.push(HashKey::QueryParameter(q));
    }
    let key = match keys.len() {
        1 => keys.remove(0),
        0 => {
            return Err(at.problem(
                "one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is required",
            ));
        }
        _ => {
            return Err(at.problem(
                "only one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
            ));
        }
    };
    if let HashKey::Header(h) | HashKey::QueryParameter(h) = &key
        && h.is_empty()
    {
        return Err(at.problem("the header or query parameter name is empty"));
    }
    let ring = at.get("ringHash", |a| {
        a.object(&["minimumRingSize"])?;
        Ok(a.get("minimumRingSize", |n| n.int())?.unwrap_or(0))
    })?;
    let maglev = at.get("maglev", |a| {
        a.object(&["tableSize"])?;
        a.get("tableSize", |n| {
            let v = n.int()?;
            match u64::try_from(v) {
                Ok(v) if is_prime(v) && v <= 5_000_011 => Ok(v),
                _ => Err(n.problem(format!(
                    "{v} is not a prime number up to 5000011 (Maglev needs one)"
                ))),
            }
        })
        .map(|v| v.unwrap_or(0))
    })?;
    let deprecated = at.get("minimumRingSize", |n| n.int())?;
    let ring_size = |v: i64, field: &str| {
        u64::try_from(v).map_err(|_| Problem {
            field: join(at.path, field),
            ..at.problem(format!("{v} is not a ring size"))
        })
    };
    let algorithm = match (ring, maglev) {
        (Some(_), Some(_)) => return Err(at.problem("only one of ringHash, maglev")),
        (Some(r), None) => HashAlgorithm::RingHash {
            minimum_ring_size: if r == 0 {
                1024
            } else {
                ring_size(r, "ringHash.minimumRingSize")?
            },
        },
        (None, Some(t)) => HashAlgorithm::Maglev { table_size: t },
        (None, None) => HashAlgorithm::RingHash {
            minimum_ring_size: match deprecated {
                Some(v) if v != 0 => ring_size(v, "minimumRingSize")?,
                _ => 1024,
            },
        },
    };
    if let HashAlgorithm::RingHash { minimum_ring_size } = algorithm
        && minimum_ring_size > 8_388_608
    {
        return Err(at.problem(format!(
            "minimum ring size {minimum_ring_size} is above Envoy's maximum (8388608)"
        )));
    }
    Ok(ConsistentHash { key, algorithm })
}

fn connection_pool(at: At<'_>) -> Result<ConnectionPool, Problem> {
    at.object(&["tcp", "http"])?;
    let tcp = at.get("tcp", |a| {
        a.object(&[
            "maxConnections",
            "connectTimeout",
            "tcpKeepalive",
            "maxConnectionDuration",
            "idleTimeout",
        ])?;
        Ok(TcpPool {
            max_connections: a.get("maxConnections", count)?.unwrap_or(0),
            connect_timeout: a.get("connectTimeout", positive_duration)?,
            tcp_keepalive: a.get("tcpKeepalive", |k| {
                k.object(&["probes", "time", "interval"])?;
                Ok(TcpKeepalive {
                    probes: k.get("probes", count)?,
                    time: k.get("time", positive_duration)?,
                    interval: k.get("interval", positive_duration)?,
                })
            })?,
            max_connection_duration: a.get("maxConnectionDuration", positive_duration)?,
            idle_timeout: a.get("idleTimeout", duration)?,
        })
    })?;
    let http = at.get("http", |a| {
        a.object(&[
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
            "h2UpgradePolicy",
            "useClientProtocol",
            "maxConcurrentStreams",
        ])?;
        Ok(HttpPool {
            http1_max_pending_requests: a.get("http1MaxPendingRequests", count)?.unwrap_or(0),
            http2_max_requests: a.get("http2MaxRequests", count)?.unwrap_or(0),
            max_requests_per_connection: a.get("maxRequestsPerConnection", count)?.unwrap_or(0),
            max_retries: a.get("maxRetries", count)?.unwrap_or(0),
            idle_timeout: a.get("idleTimeout", duration)?,
            h2_upgrade_policy: a.get("h2UpgradePolicy", |p| {
                enumeration(
                    p,
                    &[
                        ("DEFAULT", H2UpgradePolicy::Default),
                        ("DO_NOT_UPGRADE", H2UpgradePolicy::DoNotUpgrade),
                        ("UPGRADE", H2UpgradePolicy::Upgrade),
                    ],
                )
            })?,
            use_client_protocol: a
                .get("useClientProtocol", |b| b.boolean())?
                .unwrap_or(false),
            max_concurrent_streams: a.get("maxConcurrentStreams", count)?.unwrap_or(0),
        })
    })?;
    Ok(ConnectionPool { tcp, http })
}

fn outlier_detection(at: At<'_>) -> Result<OutlierDetection, Problem> {
    at.object(&[
        "consecutiveErrors",
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
        "consecutiveLocalOriginFailures",
        "splitExternalLocalOriginErrors",
        "interval",
        "baseEjectionTime",
        "maxEjectionPercent",
        "minHealthPercent",
    ])?;
    // `consecutive5xxErrors` and friends are UInt32Value: `{value: n}` in protobuf JSON when
    // written out, a plain number in YAML. Both are accepted.
    let wrapped = |a: At<'_>| -> Result<u32, Problem> {
        if a.v.is_mapping() {
            a.object(&["value"])?;
            Ok(a.get("value", count)?.unwrap_or(0))
        } else {
            count(a)
        }
    };
    let deprecated = at.get("consecutiveErrors", count)?;
    let gateway = at.get("consecutiveGatewayErrors", wrapped)?;
    let five = at.get("consecutive5xxErrors", wrapped)?;
    if deprecated.is_some() && five.is_some() {
        return Err(at.problem("only one of consecutiveErrors (deprecated), consecutive5xxErrors"));
    }
    Ok(OutlierDetection {
        consecutive_5xx_errors: five.or(deprecated),
        consecutive_gateway_errors: gateway,
        consecutive_local_origin_failures: at.get("consecutiveLocalOriginFailures", wrapped)?,
        split_external_local_origin_errors: at
            .get("splitExternalLocalOriginErrors", |b| b.boolean())?
            .unwrap_or(false),
        interval: at.get("interval", positive_duration)?,
        base_ejection_time: at.get("baseEjectionTime", positive_duration)?,
        max_ejection_percent: at.get("maxEjectionPercent", percent)?.unwrap_or(0),
        min_health_percent: at.get("minHealthPercent", percent)?.unwrap_or(0),
    })
}

fn tls(at: At<'_>) -> Result<ClientTls, Problem> {
    at.object(&[
        "mode",
        "clientCertificate",
        "privateKey",
        "caCertificates",
        "credentialName",
        "subjectAltNames",
        "sni",
        "insecureSkipVerify",
        "caCrl",
    ])?;
    let mode = at
        .get("mode", |a| {
            enumeration(
                a,
                &[
                    ("DISABLE", TlsMode::Disable),
                    ("SIMPLE", TlsMode::Simple),
                    ("MUTUAL", TlsMode::Mutual),
                    ("ISTIO_MUTUAL", TlsMode::IstioMutual),
                ],
            )
        })?
        .unwrap_or(TlsMode::Disable);
    if at.get("caCrl", |a| a.string())?.is_some() {
        return Err(Problem {
            field: join(at.path, "caCrl"),
            ..at.problem("certificate revocation lists are not supported by the waypoint")
        });
    }
    let t = ClientTls {
        mode,
        client_certificate: at.get("clientCertificate", |a| a.string())?,
        private_key: at.get("privateKey", |a| a.string())?,
        ca_certificates: at.get("caCertificates", |a| a.string())?,
        credential_name: at.get("credentialName", |a| a.string())?,
        subject_alt_names: at
            .get("subjectAltNames", |a| a.strings())?
            .unwrap_or_default(),
        sni: at.get("sni", |a| a.string())?,
        insecure_skip_verify: at
            .get("insecureSkipVerify", |a| a.boolean())?
            .unwrap_or(false),
    };
    if t.mode == TlsMode::Mutual
        && t.credential_name.is_none()
        && (t.client_certificate.is_none() || t.private_key.is_none())
    {
        return Err(at.problem("MUTUAL needs clientCertificate and privateKey, or credentialName"));
    }
    Ok(t)
}

impl TrafficPolicy {
    /// The policy for one port: the port's `portLevelSettings` entry replaces the four parts
    /// (not inherited: unset parts fall back to defaults, as Istio documents).
    pub fn for_port(&self, port: u16) -> TrafficPolicy {
        match self.port_level_settings.iter().find(|p| p.port == port) {
            Some(p) => TrafficPolicy {
                load_balancer: p.load_balancer.clone(),
                connection_pool: p.connection_pool.clone(),
                outlier_detection: p.outlier_detection.clone(),
                tls: p.tls.clone(),
                port_level_settings: Vec::new(),
            },
            None => TrafficPolicy {
                port_level_settings: Vec::new(),
                ..self.clone()
            },
        }
    }

    /// Istio's `MergeTrafficPolicy`: the top level (with its port settings applied), then each
    /// part the subset sets replaces the top level's, then the subset's own port settings
    /// replace all four.
    pub fn merged(
        top: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        port: u16,
    ) -> TrafficPolicy {
        let mut out = top.map(|t| t.for_port(port)).unwrap_or_default();
        let Some(s) = subset else { return out };
        if let Some(p) = s.port_level_settings.iter().find(|p| p.port == port) {
            return TrafficPolicy {
                load_balancer: p.load_balancer.clone(),
                connection_pool: p.connection_pool.clone(),
                outlier_detection: p.outlier_detection.clone(),
                tls: p.tls.clone(),
                port_level_settings: Vec::new(),
            };
        }
        if s.load_balancer.is_some() {
            out.load_balancer = s.load_balancer.clone();
        }
        if s.connection_pool.is_some() {
            out.connection_pool = s.connection_pool.clone();
        }
        if s.outlier_detection.is_some() {
            out.outlier_detection = s.outlier_detection.clone();
        }
        if s.tls.is_some() {
            out.tls = s.tls.clone();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{Object, parse_documents};

    fn dr(spec: &str) -> Result<crate::routing::DestinationRule, String> {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\nspec: {spec}\n"
        );
        let p = parse_documents(&text, "dr.yaml");
        if let Some(problem) = p.problems.first() {
            return Err(problem.to_string());
        }
        match &p.objects[0].1 {
            Object::DestinationRule(d) => Ok(d.clone()),
            _ => Err("not a DestinationRule".into()),
        }
    }

    #[test]
    fn every_part_parses() {
        let d = dr(r#"
  host: web
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: s, path: /, ttl: 10s}, maglev: {tableSize: 1009}}}
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 250ms, tcpKeepalive: {probes: 2, time: 10s}}
      http: {http1MaxPendingRequests: 1, maxRetries: 2, h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: true}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
    tls: {mode: SIMPLE, sni: web.example, caCertificates: /etc/ca.pem}
    portLevelSettings: [{port: {number: 8080}, loadBalancer: {simple: RANDOM}}]
  subsets: [{name: v1, labels: {v: "1"}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 30s}}}]
"#)
        .unwrap();
        let t = d.traffic_policy.unwrap();
        let lb = t.load_balancer.as_ref().unwrap();
        assert_eq!(
            lb.consistent_hash.as_ref().unwrap().algorithm,
            HashAlgorithm::Maglev { table_size: 1009 }
        );
        let pool = t.connection_pool.as_ref().unwrap();
        assert_eq!(pool.tcp.as_ref().unwrap().max_connections, 1);
        assert_eq!(
            pool.tcp.as_ref().unwrap().connect_timeout,
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            t.outlier_detection.as_ref().unwrap().base_ejection_time,
            Some(Duration::from_secs(180))
        );
        assert_eq!(t.tls.as_ref().unwrap().mode, TlsMode::Simple);
        let sub = d.subsets[0].traffic_policy.as_deref().unwrap();
        assert_eq!(
            sub.load_balancer
                .as_ref()
                .unwrap()
                .warmup
                .as_ref()
                .unwrap()
                .duration,
            Duration::from_secs(30)
        );

        // Merging: the port's settings replace the top level's four parts; the subset's parts
        // replace the top level's one by one.
        let p = TrafficPolicy::merged(Some(&t), None, 8080);
        assert_eq!(
            p.load_balancer.as_ref().unwrap().simple,
            Some(SimpleLb::Random)
        );
        assert!(p.connection_pool.is_none(), "port settings do not inherit");
        let p = TrafficPolicy::merged(Some(&t), Some(sub), 80);
        assert_eq!(
            p.load_balancer.as_ref().unwrap().simple,
            Some(SimpleLb::RoundRobin)
        );
        assert_eq!(
            p.connection_pool, t.connection_pool,
            "kept from the top level"
        );
    }

    #[test]
    fn problems_name_the_field() {
        for (spec, field, reason) in [
            (
                "{host: web, trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}}",
                "spec.trafficPolicy.connectionPool.tcp.maxConnections",
                "not a count",
            ),
            (
                "{host: web, trafficPolicy: {loadBalancer: {simple: FASTEST}}}",
                "spec.trafficPolicy.loadBalancer.simple",
                "not one of",
            ),
            (
                "{host: web, trafficPolicy: {outlierDetection: {interval: 10 seconds}}}",
                "spec.trafficPolicy.outlierDetection.interval",
                "not a duration",
            ),
            (
                "{host: web, trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}}",
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "percentage",
            ),
            (
                "{host: web, trafficPolicy: {loadBalancer: {consistentHash: {maglev: {tableSize: 1000}, useSourceIp: true}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
                "prime",
            ),
            (
                "{host: web, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "only one of",
            ),
            (
                "{host: web, trafficPolicy: {tls: {mode: MUTUAL}}}",
                "spec.trafficPolicy.tls",
                "clientCertificate",
            ),
            (
                "{host: web, subsets: [{name: a, trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: SOMETIMES}}}}]}",
                "spec.subsets[0].trafficPolicy.connectionPool.http.h2UpgradePolicy",
                "not one of",
            ),
            (
                "{host: web, trafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}}",
                "spec.trafficPolicy.portLevelSettings[0].port",
                "required",
            ),
        ] {
            let e = dr(spec).unwrap_err();
            assert!(
                e.contains(&format!("field \"{field}\"")) && e.contains(reason),
                "{spec}:\n got {e}\nwant {field}: {reason}"
            );
            assert!(e.starts_with("dr.yaml: "), "{e}");
        }
    }
}
