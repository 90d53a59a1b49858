//! HBONE: one HTTP/2 `CONNECT` stream per proxied TCP connection, inside mutual TLS 1.3.
//!
//! This file holds the protocol itself (request and header encoding, status codes, settings)
//! with no I/O; `client`, `server` and `pool` put it on sockets, `copy` moves the bytes.

pub mod admission;
pub mod client;
pub mod copy;
pub mod io;
pub mod pool;
pub mod server;
pub mod tls_socket;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};

/// Port of the HBONE listener in every pod (and on waypoints).
pub const HBONE_PORT: u16 = 15008;
/// Ports our proxies own inside a pod; a CONNECT to one of them is refused, so a tunnel can
/// never be pointed back at the proxy itself.
pub const PROXY_PORTS: [u16; 7] = [15001, 15006, 15008, 15053, 15000, 15020, 15021];

/// HTTP/2 settings Istio's ztunnel uses, so both ends size their windows the same way.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Largest header list an HBONE peer may send: a CONNECT carries a handful of short headers
/// (authority, forwarded, baggage, traceparent), so h2's 16 MiB default only serves abuse.
pub const HEADER_LIST_LIMIT: u32 = 16 * 1024;
/// A client opens a new connection rather than put more than this many streams on one.
pub const CLIENT_MAX_STREAMS: usize = 100;
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The socket under an HBONE connection's TLS (see [`tls_socket`]).
pub(crate) fn buffered(tcp: tokio::net::TcpStream) -> tls_socket::TlsSocket {
    tls_socket::TlsSocket::new(tcp)
}

/// A CONNECT request as HBONE defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Destination pod IP and target port, or a service VIP and port when sent to a waypoint.
    pub authority: SocketAddr,
    /// The original client's address (`forwarded: for=`).
    pub forwarded_for: Option<SocketAddr>,
    /// The service hostname when the client addressed a service (`forwarded: ;host=`).
    pub host: Option<String>,
    pub baggage: Option<String>,
    pub traceparent: Option<String>,
}

/// Why an inbound CONNECT was turned down, with the status HBONE answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }
    /// Authorization denied the connection.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, reason)
    }
    /// The destination application could not be reached.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, reason)
    }
}

impl ConnectRequest {
    pub fn new(authority: SocketAddr) -> Self {
        ConnectRequest {
            authority,
            forwarded_for: None,
            host: None,
            baggage: None,
            traceparent: None,
        }
    }

    /// The HTTP/2 request: `:method CONNECT`, `:authority`, no `:scheme` or `:path`.
    pub fn to_http(&self) -> Request<()> {
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.version_mut() = http::Version::HTTP_2;
        // A SocketAddr always formats as a valid authority (`1.2.3.4:80`, `[::1]:80`).
        if let Ok(uri) = http::Uri::try_from(self.authority.to_string()) {
            *req.uri_mut() = uri;
        }
        let headers = req.headers_mut();
        if let Some(forwarded) = self.forwarded() {
            insert(headers, "forwarded", &forwarded);
        }
        if let Some(b) = &self.baggage {
            insert(headers, "baggage", b);
        }
        if let Some(t) = &self.traceparent {
            insert(headers, "traceparent", t);
        }
        req
    }

    fn forwarded(&self) -> Option<String> {
        let mut out = String::new();
        if let Some(f) = self.forwarded_for {
            let _ = write!(out, "for=\"{f}\"");
        }
        if let Some(h) = &self.host {
            if !out.is_empty() {
                out.push(';');
            }
            let _ = write!(out, "host={h}");
        }
        (!out.is_empty()).then_some(out)
    }

    /// Parse and validate an inbound request; the error is what the server answers.
    pub fn from_http<B>(req: &Request<B>) -> Result<ConnectRequest, Refusal> {
        if req.method() != Method::CONNECT {
            return Err(Refusal::bad_request(format!(
                "HBONE expects CONNECT, got {}",
                req.method()
            )));
        }
        let authority = req
            .uri()
            .authority()
            .ok_or_else(|| Refusal::bad_request("CONNECT without :authority"))?;
        let authority: SocketAddr = authority.as_str().parse().map_err(|_| {
            Refusal::bad_request(format!("authority {authority:?} is not an ip:port address"))
        })?;
        let headers = req.headers();
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (forwarded_for, host) = text("forwarded")
            .map(|f| parse_forwarded(&f))
            .unwrap_or_default();
        Ok(ConnectRequest {
            authority,
            forwarded_for,
            host,
            baggage: text("baggage"),
            traceparent: text("traceparent"),
        })
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// `for="1.2.3.4:5"` and `host=...` from the first element of a `forwarded` header (RFC 7239).
fn parse_forwarded(value: &str) -> (Option<SocketAddr>, Option<String>) {
    let first = value.split(',').next().unwrap_or_default();
    let mut for_addr = None;
    let mut host = None;
    for pair in first.split(';') {
        let Some((k, v)) = pair.trim().split_once('=') else {
            continue;
        };
        // Quotes and blanks in any order at either end (`" x"`), so that what `to_http`
        // writes back parses to the same value.
        let v = v.trim_matches(|c: char| c == '"' || c.is_whitespace());
        match k.trim().to_ascii_lowercase().as_str() {
            "for" => for_addr = v.parse().ok(),
            "host" => host = Some(v.to_string()),
            _ => {}
        }
    }
    (for_addr, host)
}

/// The workload attributes HBONE carries in `baggage` (W3C baggage, OpenTelemetry keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: String,
    pub namespace: String,
    /// e.g. `deployment`, `pod`.
    pub workload_kind: String,
    pub workload_name: String,
    pub service: String,
    pub version: String,
}

impl Baggage {
    /// Only non-empty values are sent.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let mut add = |k: &str, v: &str| {
            if v.is_empty() {
                return;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(v);
        };
        add("k8s.cluster.name", &self.cluster);
        add("k8s.namespace.name", &self.namespace);
        if !self.workload_kind.is_empty() {
            let key = format!("k8s.{}.name", self.workload_kind);
            add(&key, &self.workload_name);
        }
        add("service.name", &self.service);
        add("service.version", &self.version);
        out
    }

    /// The workload name `parse` would find in `value` (`k8s.<kind>.name`), read without
    /// parsing the rest (an access log needs only that of each connection).
    pub fn workload_name_in(value: &str) -> Option<&str> {
        let mut found = None;
        for item in value.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                continue;
            };
            let k = k.trim();
            if k == "k8s.cluster.name" || k == "k8s.namespace.name" {
                continue;
            }
            let v = v.split(';').next().unwrap_or_default().trim();
            if let Some(kind) = k.strip_prefix("k8s.").and_then(|r| r.strip_suffix(".name"))
                && !kind.is_empty()
                && !v.is_empty()
            {
                found = Some(v);
            }
        }
        found
    }

    pub fn parse(value: &str) -> Baggage {
        let mut b = Baggage::default();
        for item in value.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                continue;
            };
            // Properties after ';' are allowed by W3C baggage; we carry none.
            let v = v.split(';').next().unwrap_or_default().trim().to_string();
            match k.trim() {
                "k8s.cluster.name" => b.cluster = v,
                "k8s.namespace.name" => b.namespace = v,
                "service.name" => b.service = v,
                "service.version" => b.version = v,
                k => {
                    // A kind without a name (or the reverse) is not an attribute `encode` can
                    // send on: keep only complete pairs, so that what we forward is what we read.
                    if let Some(kind) = k.strip_prefix("k8s.").and_then(|r| r.strip_suffix(".name"))
                        && !kind.is_empty()
                        && !v.is_empty()
                    {
                        b.workload_kind = kind.to_string();
                        b.workload_name = v;
                    }
                }
            }
        }
        b
    }
}

/// A fresh W3C `traceparent` (version 00, not sampled).
pub fn traceparent() -> String {
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    format!("00-{trace:032x}-{span:016x}-00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_round_trip() {
        let req = ConnectRequest {
            authority: "10.244.2.10:8080".parse().unwrap(),
            forwarded_for: Some("10.244.1.10:41234".parse().unwrap()),
            host: Some("echo.default.svc.cluster.local".into()),
            baggage: Some("k8s.namespace.name=default".into()),
            traceparent: Some(traceparent()),
        };
        let http = req.to_http();
        assert_eq!(http.method(), Method::CONNECT);
        assert_eq!(http.uri().to_string(), "10.244.2.10:8080");
        assert_eq!(http.uri().scheme(), None);
        assert_eq!(
            http.headers()["forwarded"],
            "for=\"10.244.1.10:41234\";host=echo.default.svc.cluster.local"
        );
        assert_eq!(ConnectRequest::from_http(&http).unwrap(), req);
    }

    #[test]
    fn ipv6_authority() {
        let req = ConnectRequest::new("[fd00::1]:80".parse().unwrap());
        let http = req.to_http();
        assert_eq!(http.uri().to_string(), "[fd00::1]:80");
        assert_eq!(ConnectRequest::from_http(&http).unwrap(), req);
    }

    #[test]
    fn rejects_non_connect_and_bad_authority() {
        let get = Request::get("http://10.0.0.1:80/").body(()).unwrap();
        assert_eq!(
            ConnectRequest::from_http(&get).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let mut bad = Request::new(());
        *bad.method_mut() = Method::CONNECT;
        *bad.uri_mut() = http::Uri::from_static("example.com:80");
        let err = ConnectRequest::from_http(&bad).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.reason.contains("example.com:80"));
    }

    #[test]
    fn baggage_only_non_empty() {
        let b = Baggage {
            cluster: "Kubernetes".into(),
            namespace: "default".into(),
            workload_kind: "deployment".into(),
            workload_name: "reviews-v1".into(),
            service: "reviews".into(),
            version: String::new(),
        };
        let text = b.encode();
        assert_eq!(
            text,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=reviews-v1,service.name=reviews"
        );
        assert_eq!(Baggage::parse(&text), b);
        assert_eq!(Baggage::default().encode(), "");
    }

    /// Found by `cargo xtask fuzz hbone`: a workload kind with an empty name (or an empty kind)
    /// was kept on parse but dropped by `encode`, so a waypoint forwarded other baggage than it read.
    #[test]
    fn baggage_keeps_only_complete_workload_pairs() {
        for text in [
            "service.name=reviews,k8s.namesk8s.cluster.name=",
            "k8s..name=reviews-v1",
            "k8s.deployment.name= ;x=y",
        ] {
            let once = Baggage::parse(text);
            assert_eq!(once.workload_kind, "", "{text}");
            assert_eq!(once.workload_name, "", "{text}");
            assert_eq!(Baggage::parse(&once.encode()), once, "{text}");
        }
        for text in [
            "service.name=reviews,k8s.namesk8s.cluster.name=",
            "k8s..name=reviews-v1",
            "k8s.deployment.name= ;x=y",
            "k8s.cluster.name=c,k8s.deployment.name= reviews-v1 ;p,service.name=r",
            "k8s.pod.name=a,k8s.deployment.name=b",
            "",
        ] {
            let parsed = Baggage::parse(text).workload_name;
            assert_eq!(
                Baggage::workload_name_in(text),
                Some(parsed.as_str()).filter(|n| !n.is_empty()),
                "{text}"
            );
        }
        let full = Baggage::parse("k8s.deployment.name=reviews-v1");
        assert_eq!(
            (full.workload_kind.as_str(), full.workload_name.as_str()),
            ("deployment", "reviews-v1")
        );
    }

    /// Found by `cargo xtask fuzz hbone`: a quoted host with a blank inside the quotes kept
    /// the blank, which the next parse (of what `to_http` re-encodes) dropped.
    #[test]
    fn forwarded_host_is_a_fixed_point() {
        for value in [
            "host=\"7:4123\t\"",
            "host=\" \"a\"",
            "for=\"10.0.0.1:5\" ; host= \"b \" ",
        ] {
            let (for_addr, host) = parse_forwarded(value);
            let mut req = ConnectRequest::new("10.0.0.2:80".parse().unwrap());
            req.forwarded_for = for_addr;
            req.host = host;
            assert_eq!(
                ConnectRequest::from_http(&req.to_http()).unwrap(),
                req,
                "{value}"
            );
        }
        assert_eq!(
            parse_forwarded("host=\"7:4123\t\"").1.as_deref(),
            Some("7:4123")
        );
    }

    #[test]
    fn traceparent_shape() {
        let t = traceparent();
        let parts: Vec<_> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
    }
}
