//! The routing objects: VirtualService, DestinationRule and (waypoint) Gateway, parsed field by field into a model the waypoint translation reads, each problem naming its field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_yaml_ng::Value;

use crate::k8s::{Meta, Origin, Problem};

mod traffic_policy;
pub use traffic_policy::*;

/// Label on a waypoint Gateway saying which traffic it handles.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Annotation on a waypoint Gateway (Istio's): `"true"` makes the waypoint tell the app the
/// client's identity in `x-forwarded-client-cert` (Envoy's `SANITIZE_SET` with the subject, URI
/// and DNS names of the client's certificate); otherwise a client's XFCC is removed.
pub const XFCC_CLIENT_IDENTITY: &str = "ambient.istio.io/xfcc-include-client-identity";
/// The Gateway class of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label on a waypoint's pods naming their Gateway.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// A string condition (Istio's `StringMatch`); `Present` is the empty match `{}` of headers and
/// query parameters ("the key is there").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
    Present,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HttpMatch {
    pub name: String,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub ignore_uri_case: bool,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    pub stat_prefix: Option<String>,
}

/// `set` overwrites, `add` appends, `remove` drops.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Headers {
    pub request: HeaderOperations,
    pub response: HeaderOperations,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteDestination {
    pub destination: Destination,
    /// `None`: not given (a single destination takes everything).
    pub weight: Option<u32>,
    pub headers: Headers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DerivePort {
    FromProtocolDefault,
    FromRequestPort,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub derive_port: Option<DerivePort>,
    pub scheme: Option<String>,
    /// Default 301.
    pub redirect_code: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Body {
    String(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirectResponse {
    pub status: u32,
    pub body: Option<Body>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `(match, rewrite)`.
    pub uri_regex: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Delegate {
    pub name: String,
    /// Empty: the delegating VirtualService's own.
    pub namespace: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HttpRoute {
    pub name: String,
    pub matches: Vec<HttpMatch>,
    pub route: Vec<RouteDestination>,
    pub redirect: Option<Redirect>,
    pub direct_response: Option<DirectResponse>,
    pub rewrite: Option<Rewrite>,
    pub headers: Headers,
    pub delegate: Option<Delegate>,
    pub timeout: Option<Duration>,
    /// `mirror` + `mirrorPercentage` (or the older `mirrorPercent`) and `mirrors`, as one list.
    pub mirrors: Vec<Mirror>,
    /// `retries`; `None`: Istio's mesh default applies.
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub cors_policy: Option<CorsPolicy>,
    /// Made from a Gateway API route (`gateway_api.rs`): translated with its semantics (path
    /// prefixes end at a `/`, a backend that does not resolve answers 500).
    pub gateway_api: bool,
}

/// Istio's `HTTPRetry`. `attempts: 0` turns retries off (no mesh default either).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// As written: Envoy conditions and HTTP status codes, comma-separated.
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<Duration>,
}

/// Istio's `HTTPFaultInjection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

/// A fixed delay before the request goes on, for `per_million` of the requests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    pub per_million: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    pub per_million: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum AbortStatus {
    Http(u32),
    /// A gRPC status code (from its name, e.g. `UNAVAILABLE` = 14).
    Grpc(u32),
}

/// Istio's `CorsPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CorsPolicy {
    /// `allowOrigins`, or the deprecated `allowOrigin` as exact matches.
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
    /// `unmatchedPreflights: IGNORE` (answered at the proxy, without CORS headers); otherwise
    /// (FORWARD, the default) such preflights go to the app.
    pub ignore_unmatched_preflights: bool,
}

/// A copy of each request sent to `destination` (the answer is dropped), for `per_million`
/// of the requests (Istio's `Percent`, 0–100 with decimals, kept as parts per million as
/// Envoy's `FractionalPercent` MILLION).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mirror {
    pub destination: Destination,
    pub per_million: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct L4Match {
    pub port: Option<u16>,
    pub sni_hosts: Vec<String>,
    pub destination_subnets: Vec<String>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct L4Route {
    pub matches: Vec<L4Match>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VirtualService {
    pub meta: Meta,
    /// Empty only for a delegate (a VirtualService other ones include by `delegate`).
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub export_to: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<L4Route>,
    pub tls: Vec<L4Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<Box<TrafficPolicy>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DestinationRule {
    pub meta: Meta,
    pub host: String,
    pub export_to: Vec<String>,
    pub subsets: Vec<Subset>,
    pub traffic_policy: Option<Box<TrafficPolicy>>,
}

/// Which traffic a waypoint handles (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }
    pub fn workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listener {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gateway {
    pub meta: Meta,
    pub class: String,
    pub listeners: Vec<Listener>,
    pub waypoint_for: WaypointFor,
    /// [`XFCC_CLIENT_IDENTITY`] is `"true"`.
    pub xfcc_client_identity: bool,
}

impl Gateway {
    pub fn is_waypoint(&self) -> bool {
        self.class == WAYPOINT_CLASS
    }
}

/// A position in a YAML document, for reading one field at a time with its path in errors.
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    pub(crate) origin: &'a Origin,
    pub(crate) path: &'a str,
    pub(crate) v: &'a Value,
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

impl<'a> At<'a> {
    pub(crate) fn problem(&self, reason: impl Into<String>) -> Problem {
        Problem {
            file: self.origin.file.clone(),
            object: self.origin.object.clone(),
            field: self.path.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn wrong(&self, expected: &str) -> Problem {
        self.problem(format!("expected {expected}, got {}", kind_of(self.v)))
    }

    /// A mapping whose keys are all in `known` (a misspelt field would otherwise be ignored
    /// silently, and change what matches).
    pub(crate) fn object(&self, known: &[&str]) -> Result<(), Problem> {
        let Some(m) = self.v.as_mapping() else {
            return Err(self.wrong("a mapping"));
        };
        for k in m.keys() {
            match k.as_str() {
                Some(k) if known.contains(&k) => {}
                Some(k) => {
                    return Err(Problem {
                        field: join(self.path, k),
                        ..self.problem(format!("unknown field (known here: {})", known.join(", ")))
                    });
                }
                None => return Err(self.problem("keys must be strings")),
            }
        }
        Ok(())
    }

    /// Field `key` (absent and null are both `None`); call `f` with it and its path.
    pub(crate) fn get<T>(
        &self,
        key: &str,
        f: impl FnOnce(At<'_>) -> Result<T, Problem>,
    ) -> Result<Option<T>, Problem> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let path = join(self.path, key);
                f(At {
                    origin: self.origin,
                    path: &path,
                    v,
                })
                .map(Some)
            }
        }
    }

    pub(crate) fn string(&self) -> Result<String, Problem> {
        match self.v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(self.wrong("a string")),
        }
    }

    pub(crate) fn boolean(&self) -> Result<bool, Problem> {
        self.v.as_bool().ok_or_else(|| self.wrong("a boolean"))
    }

    pub(crate) fn int(&self) -> Result<i64, Problem> {
        match self.v {
            Value::Number(n) => n.as_i64().ok_or_else(|| self.wrong("an integer")),
            _ => Err(self.wrong("an integer")),
        }
    }

    pub(crate) fn port(&self) -> Result<u16, Problem> {
        let n = self.int()?;
        match u16::try_from(n) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(self.problem(format!("{n} is not a port (1-65535)"))),
        }
    }

    pub(crate) fn list<T>(
        &self,
        mut f: impl FnMut(At<'_>) -> Result<T, Problem>,
    ) -> Result<Vec<T>, Problem> {
        let Some(items) = self.v.as_sequence() else {
            return Err(self.wrong("a list"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let path = format!("{}[{i}]", self.path);
                f(At {
                    origin: self.origin,
                    path: &path,
                    v,
                })
            })
            .collect()
    }

    pub(crate) fn strings(&self) -> Result<Vec<String>, Problem> {
        self.list(|a| a.string())
    }

    /// A mapping of strings to `T`, in key order.
    pub(crate) fn map<T>(
        &self,
        mut f: impl FnMut(At<'_>) -> Result<T, Problem>,
    ) -> Result<BTreeMap<String, T>, Problem> {
        let Some(m) = self.v.as_mapping() else {
            return Err(self.wrong("a mapping"));
        };
        let mut out = BTreeMap::new();
        for (k, v) in m {
            let Some(k) = k.as_str() else {
                return Err(self.problem("keys must be strings"));
            };
            let path = join(self.path, k);
            out.insert(
                k.to_string(),
                f(At {
                    origin: self.origin,
                    path: &path,
                    v,
                })?,
            );
        }
        Ok(out)
    }

    pub(crate) fn string_map(&self) -> Result<BTreeMap<String, String>, Problem> {
        self.map(|a| a.string())
    }

    /// Kept as written (JSON) for a later translation.
    pub(crate) fn raw(&self) -> Result<serde_json::Value, Problem> {
        serde_json::to_value(self.v).map_err(|e| self.problem(format!("not representable: {e}")))
    }
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(crate) fn check_regex(at: At<'_>, re: &str) -> Result<(), Problem> {
    regex::Regex::new(re)
        .map(|_| ())
        .map_err(|e| at.problem(format!("invalid regex {re:?}: {e}")))
}

/// Istio's StringMatch: exactly one of exact / prefix / regex; `{}` (allowed where `empty_ok`)
/// means "present". For a header-like field (`header`: everything but `uri`) Istio takes the
/// regex `*` (not RE2) as "present" too.
fn string_match(at: At<'_>, empty_ok: bool, header: bool) -> Result<StringMatch, Problem> {
    at.object(&["exact", "prefix", "regex"])?;
    let exact = at.get("exact", |a| a.string())?;
    let prefix = at.get("prefix", |a| a.string())?;
    let regex = at.get("regex", |a| {
        let r = a.string()?;
        if !(header && r == "*") {
            check_regex(a, &r)?;
        }
        Ok(r)
    })?;
    match (exact, prefix, regex) {
        (None, None, Some(r)) if header && r == "*" => Ok(StringMatch::Present),
        (Some(e), None, None) => Ok(StringMatch::Exact(e)),
        (None, Some(p), None) => Ok(StringMatch::Prefix(p)),
        (None, None, Some(r)) => Ok(StringMatch::Regex(r)),
        (None, None, None) if empty_ok => Ok(StringMatch::Present),
        (None, None, None) => Err(at.problem("needs one of exact, prefix, regex")),
        _ => Err(at.problem("only one of exact, prefix, regex")),
    }
}

fn http_match(at: At<'_>) -> Result<HttpMatch, Problem> {
    at.object(&[
        "name",
        "uri",
        "scheme",
        "method",
        "authority",
        "headers",
        "withoutHeaders",
        "queryParams",
        "ignoreUriCase",
        "port",
        "sourceLabels",
        "sourceNamespace",
        "gateways",
        "statPrefix",
    ])?;
    Ok(HttpMatch {
        name: at.get("name", |a| a.string())?.unwrap_or_default(),
        uri: at.get("uri", |a| string_match(a, false, false))?,
        scheme: at.get("scheme", |a| string_match(a, false, true))?,
        method: at.get("method", |a| string_match(a, false, true))?,
        authority: at.get("authority", |a| string_match(a, false, true))?,
        headers: at
            .get("headers", |a| a.map(|h| string_match(h, true, true)))?
            .unwrap_or_default(),
        without_headers: at
            .get("withoutHeaders", |a| a.map(|h| string_match(h, true, true)))?
            .unwrap_or_default(),
        query_params: at
            .get("queryParams", |a| a.map(|h| string_match(h, true, true)))?
            .unwrap_or_default(),
        ignore_uri_case: at.get("ignoreUriCase", |a| a.boolean())?.unwrap_or(false),
        port: at.get("port", |a| a.port())?,
        source_labels: at
            .get("sourceLabels", |a| a.string_map())?
            .unwrap_or_default(),
        source_namespace: at.get("sourceNamespace", |a| a.string())?,
        gateways: at.get("gateways", |a| a.strings())?.unwrap_or_default(),
        stat_prefix: at.get("statPrefix", |a| a.string())?,
    })
}

pub(crate) fn header_operations(at: At<'_>) -> Result<HeaderOperations, Problem> {
    at.object(&["set", "add", "remove"])?;
    Ok(HeaderOperations {
        set: at.get("set", |a| a.string_map())?.unwrap_or_default(),
        add: at.get("add", |a| a.string_map())?.unwrap_or_default(),
        remove: at.get("remove", |a| a.strings())?.unwrap_or_default(),
    })
}

fn headers(at: At<'_>) -> Result<Headers, Problem> {
    at.object(&["request", "response"])?;
    Ok(Headers {
        request: at.get("request", header_operations)?.unwrap_or_default(),
        response: at.get("response", header_operations)?.unwrap_or_default(),
    })
}

fn destination(at: At<'_>) -> Result<Destination, Problem> {
    at.object(&["host", "subset", "port"])?;
    let host = at.get("host", |a| a.string())?.unwrap_or_default();
    if host.is_empty() {
        return Err(Problem {
            field: join(at.path, "host"),
            ..at.problem("is required")
        });
    }
    Ok(Destination {
        host,
        subset: at.get("subset", |a| a.string())?.filter(|s| !s.is_empty()),
        port: at
            .get("port", |a| {
                a.object(&["number"])?;
                a.get("number", |n| n.port())
            })?
            .flatten(),
    })
}

fn route_destination(at: At<'_>, with_headers: bool) -> Result<RouteDestination, Problem> {
    let known: &[&str] = if with_headers {
        &["destination", "weight", "headers"]
    } else {
        &["destination", "weight"]
    };
    at.object(known)?;
    let Some(d) = at.get("destination", destination)? else {
        return Err(Problem {
            field: join(at.path, "destination.host"),
            ..at.problem("is required")
        });
    };
    let weight = at.get("weight", |a| {
        let w = a.int()?;
        if !(0..=100).contains(&w) {
            return Err(a.problem(format!("{w} is not between 0 and 100")));
        }
        Ok(w as u32)
    })?;
    Ok(RouteDestination {
        destination: d,
        weight,
        headers: if with_headers {
            at.get("headers", headers)?.unwrap_or_default()
        } else {
            Headers::default()
        },
    })
}

/// Several destinations share by weight (Envoy takes them relative to their sum): at least
/// one must have some.
fn check_weights(at: At<'_>, route: &[RouteDestination]) -> Result<(), Problem> {
    if route.len() > 1 && route.iter().all(|r| r.weight.unwrap_or(0) == 0) {
        return Err(at.problem("several destinations need weights, and not all 0"));
    }
    Ok(())
}

/// `1.5s`, `100ms`, `2m`, `1h`: Istio's (protobuf JSON and Go) duration forms.
pub(crate) fn duration(at: At<'_>) -> Result<Duration, Problem> {
    let s = at.string()?;
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let scale = match unit {
        "h" => 3600.0,
        "m" => 60.0,
        "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        _ => return Err(at.problem(format!("{s:?} is not a duration (like 1.5s, 100ms)"))),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(Duration::from_secs_f64(n * scale)),
        _ => Err(at.problem(format!("{s:?} is not a duration (like 1.5s, 100ms)"))),
    }
}

fn redirect(at: At<'_>) -> Result<Redirect, Problem> {
    at.object(&[
        "uri",
        "authority",
        "port",
        "derivePort",
        "scheme",
        "redirectCode",
    ])?;
    let r = Redirect {
        uri: at.get("uri", |a| a.string())?,
        authority: at.get("authority", |a| a.string())?,
        port: at.get("port", |a| a.port())?,
        derive_port: at.get("derivePort", |a| match a.string()?.as_str() {
            "FROM_PROTOCOL_DEFAULT" => Ok(DerivePort::FromProtocolDefault),
            "FROM_REQUEST_PORT" => Ok(DerivePort::FromRequestPort),
            other => Err(a.problem(format!(
                "{other:?} is not one of FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT"
            ))),
        })?,
        scheme: at.get("scheme", |a| a.string())?,
        redirect_code: at.get("redirectCode", |a| {
            let c = a.int()?;
            if matches!(c, 301 | 302 | 303 | 307 | 308) {
                Ok(c as u32)
            } else {
                Err(a.problem(format!("{c} is not one of 301, 302, 303, 307, 308")))
            }
        })?,
    };
    if r.port.is_some() && r.derive_port.is_some() {
        return Err(at.problem("only one of port, derivePort"));
    }
    Ok(r)
}

/// Istio's `Percent` (`{value: <0–100>}`) in parts per million.
fn percent(at: At<'_>) -> Result<u32, Problem> {
    at.object(&["value"])?;
    let v = at
        .get("value", |a| match a.v {
            Value::Number(n) => n.as_f64().ok_or_else(|| a.wrong("a number")),
            _ => Err(a.wrong("a number")),
        })?
        .unwrap_or(0.0);
    if !(0.0..=100.0).contains(&v) {
        return Err(at.problem(format!("{v} is not a percentage (0-100)")));
    }
    Ok((v * 10_000.0).round() as u32)
}

/// `mirror` with `mirrorPercentage` (else the deprecated `mirrorPercent`/`mirror_percent`,
/// else 100%), or `mirrors`; not both.
fn mirrors(at: At<'_>) -> Result<Vec<Mirror>, Problem> {
    let single = at.get("mirror", destination)?;
    let listed = at.get("mirrors", |a| {
        a.list(|m| {
            m.object(&["destination", "percentage"])?;
            let Some(destination) = m.get("destination", destination)? else {
                return Err(Problem {
                    field: join(m.path, "destination"),
                    ..m.problem("is required")
                });
            };
            Ok(Mirror {
                destination,
                per_million: m.get("percentage", percent)?.unwrap_or(1_000_000),
            })
        })
    })?;
    let old_percent = |key: &str| {
        at.get(key, |a| {
            let n = a.int()?;
            match u32::try_from(n) {
                Ok(n) if n <= 100 => Ok(n * 10_000),
                _ => Err(a.problem(format!("{n} is not a percentage (0-100)"))),
            }
        })
    };
    let per_million = match at.get("mirrorPercentage", percent)? {
        Some(p) => Some(p),
        None => match old_percent("mirrorPercent")? {
            Some(p) => Some(p),
            None => old_percent("mirror_percent")?,
        },
    };
    match (single, listed) {
        (Some(_), Some(_)) => Err(at.problem("only one of mirror, mirrors")),
        (Some(destination), None) => Ok(vec![Mirror {
            destination,
            per_million: per_million.unwrap_or(1_000_000),
        }]),
        (None, listed) => Ok(listed.unwrap_or_default()),
    }
}

fn direct_response(at: At<'_>) -> Result<DirectResponse, Problem> {
    at.object(&["status", "body"])?;
    let status = at
        .get("status", |a| {
            let s = a.int()?;
            if (200..=599).contains(&s) {
                Ok(s as u32)
            } else {
                Err(a.problem(format!("{s} is not an HTTP status (200-599)")))
            }
        })?
        .ok_or_else(|| Problem {
            field: join(at.path, "status"),
            ..at.problem("is required")
        })?;
    let body = at.get("body", |a| {
        a.object(&["string", "bytes"])?;
        let string = a.get("string", |s| s.string())?;
        let bytes = a.get("bytes", |b| {
            let text = b.string()?;
            base64_decode(&text).ok_or_else(|| b.problem("is not base64"))
        })?;
        match (string, bytes) {
            (Some(s), None) => Ok(Body::String(s)),
            (None, Some(b)) => Ok(Body::Bytes(b)),
            _ => Err(a.problem("needs exactly one of string, bytes")),
        }
    })?;
    Ok(DirectResponse { status, body })
}

/// Standard base64 (what protobuf JSON uses for `bytes`), padding optional.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn rewrite(at: At<'_>) -> Result<Rewrite, Problem> {
    at.object(&["uri", "authority", "uriRegexRewrite"])?;
    let r = Rewrite {
        uri: at.get("uri", |a| a.string())?,
        authority: at.get("authority", |a| a.string())?,
        uri_regex: at.get("uriRegexRewrite", |a| {
            a.object(&["match", "rewrite"])?;
            let m = a.get("match", |m| {
                let r = m.string()?;
                check_regex(m, &r)?;
                Ok(r)
            })?;
            let rw = a.get("rewrite", |r| r.string())?;
            match (m, rw) {
                (Some(m), Some(r)) => Ok((m, r)),
                _ => Err(a.problem("needs match and rewrite")),
            }
        })?,
    };
    if r.uri.is_some() && r.uri_regex.is_some() {
        return Err(at.problem("only one of uri, uriRegexRewrite"));
    }
    Ok(r)
}

fn http_route(at: At<'_>) -> Result<HttpRoute, Problem> {
    at.object(&[
        "name",
        "match",
        "route",
        "redirect",
        "directResponse",
        "delegate",
        "rewrite",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "mirrors",
        "mirrorPercentage",
        "mirrorPercent",
        "mirror_percent",
        "corsPolicy",
        "headers",
    ])?;
    let route = at
        .get("route", |a| a.list(|d| route_destination(d, true)))?
        .unwrap_or_default();
    let r = HttpRoute {
        name: at.get("name", |a| a.string())?.unwrap_or_default(),
        matches: at.get("match", |a| a.list(http_match))?.unwrap_or_default(),
        redirect: at.get("redirect", redirect)?,
        direct_response: at.get("directResponse", direct_response)?,
        rewrite: at.get("rewrite", rewrite)?,
        headers: at.get("headers", headers)?.unwrap_or_default(),
        delegate: at.get("delegate", |a| {
            a.object(&["name", "namespace"])?;
            Ok(Delegate {
                name: a.get("name", |n| n.string())?.unwrap_or_default(),
                namespace: a.get("namespace", |n| n.string())?.unwrap_or_default(),
            })
        })?,
        timeout: at.get("timeout", duration)?,
        retries: at.get("retries", retries)?,
        fault: at.get("fault", fault)?,
        mirrors: mirrors(at)?,
        cors_policy: at.get("corsPolicy", cors_policy)?,
        route,
        gateway_api: false,
    };
    if let Some(d) = &r.delegate
        && d.name.is_empty()
    {
        return Err(Problem {
            field: join(at.path, "delegate.name"),
            ..at.problem("is required")
        });
    }
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
        r.delegate.is_some(),
    ];
    match actions.iter().filter(|a| **a).count() {
        0 => {
            return Err(at.problem("needs one of route, redirect, directResponse, delegate"));
        }
        1 => {}
        _ => {
            return Err(at.problem("only one of route, redirect, directResponse, delegate"));
        }
    }
    if let Some(route_at) = at.v.get("route") {
        check_weights(
            At {
                origin: at.origin,
                path: &join(at.path, "route"),
                v: route_at,
            },
            &r.route,
        )?;
    }
    Ok(r)
}

/// Envoy's `retry_on` conditions (HTTP and gRPC) Istio accepts in `retryOn`, besides HTTP
/// status codes.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// A duration of at least 1 ms (Istio's rule for timeouts in these policies).
fn positive_duration(at: At<'_>) -> Result<Duration, Problem> {
    let d = duration(at)?;
    if d < Duration::from_millis(1) {
        return Err(at.problem("must be at least 1ms"));
    }
    Ok(d)
}

fn optional_bool(at: At<'_>) -> Result<bool, Problem> {
    at.boolean()
}

fn retries(at: At<'_>) -> Result<Retries, Problem> {
    at.object(&[
        "attempts",
        "perTryTimeout",
        "retryOn",
        "retryRemoteLocalities",
        "retryIgnorePreviousHosts",
        "backoff",
    ])?;
    let attempts = at
        .get("attempts", |a| {
            let n = a.int()?;
            u32::try_from(n)
                .map_err(|_| a.problem(format!("{n} is not a count of attempts (0 or more)")))
        })?
        .unwrap_or(0);
    let retry_on = at.get("retryOn", |a| {
        let s = a.string()?;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let code = part.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
            if !code && !RETRY_ON.contains(&part) {
                return Err(a.problem(format!(
                    "{part:?} is neither an HTTP status code nor one of {}",
                    RETRY_ON.join(", ")
                )));
            }
        }
        Ok(s)
    })?;
    Ok(Retries {
        attempts,
        per_try_timeout: at.get("perTryTimeout", positive_duration)?,
        retry_on,
        retry_remote_localities: at.get("retryRemoteLocalities", optional_bool)?,
        retry_ignore_previous_hosts: at.get("retryIgnorePreviousHosts", optional_bool)?,
        backoff: at.get("backoff", positive_duration)?,
    })
}

/// gRPC status names (Istio's `grpcStatus`) and their codes.
pub const GRPC_STATUS: &[(&str, u32)] = &[
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

/// A fault's share of requests: `percentage` (Istio's `Percent`), else the deprecated integer
/// `percent` (delay only), else none (Istio: "if not specified, no request" is affected).
fn fault_share(at: At<'_>, old_percent: bool) -> Result<u32, Problem> {
    if let Some(p) = at.get("percentage", percent)? {
        return Ok(p);
    }
    if old_percent
        && let Some(p) = at.get("percent", |a| {
            let n = a.int()?;
            match u32::try_from(n) {
                Ok(n) if n <= 100 => Ok(n * 10_000),
                _ => Err(a.problem(format!("{n} is not a percentage (0-100)"))),
            }
        })?
    {
        return Ok(p);
    }
    Ok(0)
}

fn fault(at: At<'_>) -> Result<Fault, Problem> {
    at.object(&["delay", "abort"])?;
    let delay = at.get("delay", |a| {
        a.object(&["fixedDelay", "exponentialDelay", "percentage", "percent"])?;
        if a.v.get("exponentialDelay").is_some() {
            return Err(Problem {
                field: join(a.path, "exponentialDelay"),
                ..a.problem("is not supported (Istio does not apply it either); use fixedDelay")
            });
        }
        let Some(fixed_delay) = a.get("fixedDelay", positive_duration)? else {
            return Err(Problem {
                field: join(a.path, "fixedDelay"),
                ..a.problem("is required")
            });
        };
        Ok(FaultDelay {
            fixed_delay,
            per_million: fault_share(a, true)?,
        })
    })?;
    let abort = at.get("abort", |a| {
        a.object(&["httpStatus", "grpcStatus", "http2Error", "percentage"])?;
        let http = a.get("httpStatus", |s| {
            let n = s.int()?;
            match u32::try_from(n) {
                Ok(n) if (200..=599).contains(&n) => Ok(n),
                _ => Err(s.problem(format!("{n} is not an HTTP status (200-599)"))),
            }
        })?;
        let grpc = a.get("grpcStatus", |s| {
            let name = s.string()?;
            GRPC_STATUS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, c)| *c)
                .ok_or_else(|| {
                    s.problem(format!(
                        "{name:?} is not a gRPC status name (like UNAVAILABLE)"
                    ))
                })
        })?;
        if a.v.get("http2Error").is_some() {
            return Err(Problem {
                field: join(a.path, "http2Error"),
                ..a.problem("is not supported (Istio does not apply it either)")
            });
        }
        let status = match (http, grpc) {
            (Some(h), None) => AbortStatus::Http(h),
            (None, Some(g)) => AbortStatus::Grpc(g),
            (Some(_), Some(_)) => return Err(a.problem("only one of httpStatus, grpcStatus")),
            (None, None) => return Err(a.problem("needs httpStatus or grpcStatus")),
        };
        Ok(FaultAbort {
            status,
            per_million: fault_share(a, false)?,
        })
    })?;
    if delay.is_none() && abort.is_none() {
        return Err(at.problem("needs delay or abort"));
    }
    Ok(Fault { delay, abort })
}

const HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

fn cors_policy(at: At<'_>) -> Result<CorsPolicy, Problem> {
    at.object(&[
        "allowOrigins",
        "allowOrigin",
        "allowMethods",
        "allowHeaders",
        "exposeHeaders",
        "maxAge",
        "allowCredentials",
        "unmatchedPreflights",
    ])?;
    let mut allow_origins = at
        .get("allowOrigins", |a| {
            a.list(|m| string_match(m, false, false))
        })?
        .unwrap_or_default();
    if allow_origins.is_empty()
        && let Some(old) = at.get("allowOrigin", |a| a.strings())?
    {
        allow_origins = old.into_iter().map(StringMatch::Exact).collect();
    }
    let allow_methods = at
        .get("allowMethods", |a| {
            let methods = a.strings()?;
            for m in &methods {
                if !HTTP_METHODS.contains(&m.as_str()) && m != "*" {
                    return Err(a.problem(format!("{m:?} is not an HTTP method")));
                }
            }
            Ok(methods)
        })?
        .unwrap_or_default();
    let header_names = |a: At<'_>| {
        let names = a.strings()?;
        for n in &names {
            if n != "*" && http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                return Err(a.problem(format!("{n:?} is not a header name")));
            }
        }
        Ok(names)
    };
    let max_age = at.get("maxAge", |a| {
        let d = duration(a)?;
        if d.subsec_nanos() != 0 {
            return Err(a.problem("is accurate to seconds only: use whole seconds"));
        }
        Ok(d)
    })?;
    let ignore_unmatched_preflights = at
        .get("unmatchedPreflights", |a| match a.string()?.as_str() {
            "UNSPECIFIED" | "FORWARD" => Ok(false),
            "IGNORE" => Ok(true),
            other => Err(a.problem(format!("{other:?} is not one of FORWARD, IGNORE"))),
        })?
        .unwrap_or(false);
    Ok(CorsPolicy {
        allow_origins,
        allow_methods,
        allow_headers: at.get("allowHeaders", header_names)?.unwrap_or_default(),
        expose_headers: at.get("exposeHeaders", header_names)?.unwrap_or_default(),
        max_age,
        allow_credentials: at.get("allowCredentials", optional_bool)?,
        ignore_unmatched_preflights,
    })
}

fn l4_match(at: At<'_>, tls: bool) -> Result<L4Match, Problem> {
    let known: &[&str] = if tls {
        &[
            "sniHosts",
            "destinationSubnets",
            "port",
            "sourceLabels",
            "gateways",
            "sourceNamespace",
        ]
    } else {
        &[
            "destinationSubnets",
            "port",
            "sourceLabels",
            "gateways",
            "sourceNamespace",
            "sourceSubnet",
        ]
    };
    at.object(known)?;
    let m = L4Match {
        port: at.get("port", |a| a.port())?,
        sni_hosts: at.get("sniHosts", |a| a.strings())?.unwrap_or_default(),
        destination_subnets: at
            .get("destinationSubnets", |a| a.strings())?
            .unwrap_or_default(),
        source_labels: at
            .get("sourceLabels", |a| a.string_map())?
            .unwrap_or_default(),
        source_namespace: at.get("sourceNamespace", |a| a.string())?,
        gateways: at.get("gateways", |a| a.strings())?.unwrap_or_default(),
    };
    if tls && m.sni_hosts.is_empty() {
        return Err(Problem {
            field: join(at.path, "sniHosts"),
            ..at.problem("is required")
        });
    }
    Ok(m)
}

fn l4_route(at: At<'_>, tls: bool) -> Result<L4Route, Problem> {
    at.object(&["match", "route"])?;
    let route = at
        .get("route", |a| a.list(|d| route_destination(d, false)))?
        .unwrap_or_default();
    if route.is_empty() {
        return Err(Problem {
            field: join(at.path, "route"),
            ..at.problem("needs at least one destination")
        });
    }
    if let Some(v) = at.v.get("route") {
        check_weights(
            At {
                origin: at.origin,
                path: &join(at.path, "route"),
                v,
            },
            &route,
        )?;
    }
    Ok(L4Route {
        matches: at
            .get("match", |a| a.list(|m| l4_match(m, tls)))?
            .unwrap_or_default(),
        route,
    })
}

pub(crate) fn spec_at<'a>(origin: &'a Origin, spec: &'a Value) -> At<'a> {
    At {
        origin,
        path: "spec",
        v: spec,
    }
}

pub fn virtual_service(
    origin: &Origin,
    meta: Meta,
    spec: Value,
) -> Result<VirtualService, Problem> {
    let at = spec_at(origin, &spec);
    if spec.is_null() {
        return Err(at.problem("is required"));
    }
    at.object(&["hosts", "gateways", "exportTo", "http", "tcp", "tls"])?;
    let vs = VirtualService {
        meta,
        hosts: at.get("hosts", |a| a.strings())?.unwrap_or_default(),
        gateways: at.get("gateways", |a| a.strings())?.unwrap_or_default(),
        export_to: at.get("exportTo", |a| a.strings())?.unwrap_or_default(),
        http: at.get("http", |a| a.list(http_route))?.unwrap_or_default(),
        tcp: at
            .get("tcp", |a| a.list(|r| l4_route(r, false)))?
            .unwrap_or_default(),
        tls: at
            .get("tls", |a| a.list(|r| l4_route(r, true)))?
            .unwrap_or_default(),
    };
    if vs.hosts.is_empty() && (!vs.tcp.is_empty() || !vs.tls.is_empty()) {
        return Err(Problem {
            field: "spec.hosts".into(),
            ..at.problem("needs at least one host (only http routes may be delegated)")
        });
    }
    if vs.hosts.is_empty() && vs.http.iter().any(|r| r.delegate.is_some()) {
        return Err(Problem {
            field: "spec.hosts".into(),
            ..at.problem("a delegate VirtualService (without hosts) cannot delegate again")
        });
    }
    for (i, h) in vs.hosts.iter().enumerate() {
        if h.is_empty() || h.contains('/') {
            return Err(Problem {
                field: format!("spec.hosts[{i}]"),
                ..at.problem(format!("{h:?} is not a host name"))
            });
        }
    }
    Ok(vs)
}

pub fn destination_rule(
    origin: &Origin,
    meta: Meta,
    spec: Value,
) -> Result<DestinationRule, Problem> {
    let at = spec_at(origin, &spec);
    if spec.is_null() {
        return Err(at.problem("is required"));
    }
    at.object(&[
        "host",
        "exportTo",
        "subsets",
        "trafficPolicy",
        "workloadSelector",
    ])?;
    let host = at.get("host", |a| a.string())?.unwrap_or_default();
    if host.is_empty() {
        return Err(Problem {
            field: "spec.host".into(),
            ..at.problem("is required")
        });
    }
    let subsets = at
        .get("subsets", |a| {
            a.list(|s| {
                s.object(&["name", "labels", "trafficPolicy"])?;
                let name = s.get("name", |n| n.string())?.unwrap_or_default();
                if name.is_empty() {
                    return Err(Problem {
                        field: join(s.path, "name"),
                        ..s.problem("is required")
                    });
                }
                Ok(Subset {
                    name,
                    labels: s.get("labels", |l| l.string_map())?.unwrap_or_default(),
                    traffic_policy: s
                        .get("trafficPolicy", traffic_policy::traffic_policy)?
                        .map(Box::new),
                })
            })
        })?
        .unwrap_or_default();
    for (i, s) in subsets.iter().enumerate() {
        if subsets[..i].iter().any(|o| o.name == s.name) {
            return Err(Problem {
                field: format!("spec.subsets[{i}].name"),
                ..at.problem(format!("{:?} is defined twice", s.name))
            });
        }
    }
    Ok(DestinationRule {
        meta,
        host,
        export_to: at.get("exportTo", |a| a.strings())?.unwrap_or_default(),
        subsets,
        traffic_policy: at
            .get("trafficPolicy", traffic_policy::traffic_policy)?
            .map(Box::new),
    })
}

pub fn gateway(origin: &Origin, meta: Meta, spec: Value) -> Result<Gateway, Problem> {
    let at = spec_at(origin, &spec);
    let class = at
        .get("gatewayClassName", |a| a.string())?
        .unwrap_or_default();
    if class.is_empty() {
        return Err(Problem {
            field: "spec.gatewayClassName".into(),
            ..at.problem("is required")
        });
    }
    let listeners = at
        .get("listeners", |a| {
            a.list(|l| {
                let name = l.get("name", |n| n.string())?.unwrap_or_default();
                if name.is_empty() {
                    return Err(Problem {
                        field: join(l.path, "name"),
                        ..l.problem("is required")
                    });
                }
                let port = l.get("port", |p| p.port())?.ok_or_else(|| Problem {
                    field: join(l.path, "port"),
                    ..l.problem("is required")
                })?;
                let protocol = l.get("protocol", |p| p.string())?.unwrap_or_default();
                if class == WAYPOINT_CLASS && protocol != "HBONE" {
                    return Err(Problem {
                        field: join(l.path, "protocol"),
                        ..l.problem(format!(
                            "{protocol:?}: a waypoint listens with protocol HBONE"
                        ))
                    });
                }
                Ok(Listener {
                    name,
                    port,
                    protocol,
                })
            })
        })?
        .unwrap_or_default();
    if listeners.is_empty() {
        return Err(Problem {
            field: "spec.listeners".into(),
            ..at.problem("needs at least one listener")
        });
    }
    let waypoint_for = match meta.labels.get(WAYPOINT_FOR).map(String::as_str) {
        None | Some("service") => WaypointFor::Service,
        Some("workload") => WaypointFor::Workload,
        Some("all") => WaypointFor::All,
        Some("none") => WaypointFor::None,
        Some(other) => {
            return Err(Problem {
                field: format!("metadata.labels[{WAYPOINT_FOR}]"),
                ..at.problem(format!(
                    "{other:?} is not one of service, workload, all, none"
                ))
            });
        }
    };
    let xfcc_client_identity = match meta
        .annotations
        .get(XFCC_CLIENT_IDENTITY)
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Problem {
                field: format!("metadata.annotations[{XFCC_CLIENT_IDENTITY}]"),
                ..at.problem(format!("{other:?} is not \"true\" or \"false\""))
            });
        }
    };
    Ok(Gateway {
        meta,
        class,
        listeners,
        waypoint_for,
        xfcc_client_identity,
    })
}

/// A host as `(name, namespace)` when it names a Kubernetes service (`name`, `name.ns`,
/// `name.ns.svc`, `name.ns.svc.<domain>`; the short forms relative to `ns`), else `None`.
pub fn service_of_host(host: &str, ns: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [name] if *name != "*" => Some((name.to_string(), ns.to_string())),
        [name, n] => Some((name.to_string(), n.to_string())),
        [name, n, "svc", ..] => Some((name.to_string(), n.to_string())),
        _ => None,
    }
}

/// Routes naming a subset that no DestinationRule for their host defines. Returns the
/// first such field and why.
pub fn undefined_subset<'a>(
    vs: &VirtualService,
    rules: impl Iterator<Item = &'a DestinationRule> + Clone,
) -> Option<(String, String)> {
    let ns = &vs.meta.namespace;
    let defined = |host: &str, subset: &str| {
        let want = service_of_host(host, ns);
        rules.clone().any(|dr| {
            let same = match (&want, service_of_host(&dr.host, &dr.meta.namespace)) {
                (Some(a), Some(b)) => *a == b,
                _ => dr.host == host,
            };
            same && dr.subsets.iter().any(|s| s.name == subset)
        })
    };
    let http = vs.http.iter().enumerate().flat_map(|(i, r)| {
        r.route
            .iter()
            .enumerate()
            .map(move |(j, d)| (format!("spec.http[{i}].route[{j}]"), d))
    });
    let tcp = vs.tcp.iter().enumerate().flat_map(|(i, r)| {
        r.route
            .iter()
            .enumerate()
            .map(move |(j, d)| (format!("spec.tcp[{i}].route[{j}]"), d))
    });
    let tls = vs.tls.iter().enumerate().flat_map(|(i, r)| {
        r.route
            .iter()
            .enumerate()
            .map(move |(j, d)| (format!("spec.tls[{i}].route[{j}]"), d))
    });
    for (field, d) in http.chain(tcp).chain(tls) {
        if let Some(subset) = &d.destination.subset
            && !defined(&d.destination.host, subset)
        {
            return Some((
                format!("{field}.destination.subset"),
                format!(
                    "subset {subset:?} of host {:?} is defined by no DestinationRule; the VirtualService is left out",
                    d.destination.host
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::k8s::parse_documents;

    fn problems(text: &str) -> Vec<String> {
        parse_documents(text, "routing.yaml")
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    fn vs(spec: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec: {spec}\n"
        )
    }

    #[test]
    fn full_virtual_service_parses() {
        let text = vs(r#"
  hosts: [reviews]
  gateways: [mesh]
  exportTo: ["."]
  http:
  - name: r1
    match:
    - name: m1
      uri: {prefix: /api}
      scheme: {exact: http}
      method: {exact: GET}
      authority: {regex: "rev.*"}
      headers: {x-user: {exact: jason}, x-any: {}}
      withoutHeaders: {x-debug: {prefix: "1"}}
      queryParams: {v: {regex: "[0-9]+"}}
      ignoreUriCase: true
      port: 9080
      sourceLabels: {app: productpage}
      sourceNamespace: bookinfo
      gateways: [mesh]
    route:
    - destination: {host: reviews, subset: v1, port: {number: 9080}}
      weight: 75
      headers: {request: {set: {x-a: "1"}}, response: {remove: [x-b]}}
    - destination: {host: reviews, subset: v2}
      weight: 25
    rewrite: {uri: /v1, authority: reviews.internal}
    headers: {request: {add: {x-c: "2"}}}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 2s}
    fault: {delay: {fixedDelay: 5s, percentage: {value: 10}}}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 5}
    corsPolicy: {allowOrigins: [{exact: "https://a"}]}
  - redirect: {uri: /new, authority: b, derivePort: FROM_REQUEST_PORT, scheme: https, redirectCode: 308}
  - directResponse: {status: 418, body: {bytes: aGk=}}
  - delegate: {name: reviews-delegate, namespace: bookinfo}
  tcp:
  - match: [{port: 3306}]
    route: [{destination: {host: db}}]
  tls:
  - match: [{sniHosts: [reviews.bookinfo.svc.cluster.local], port: 443}]
    route: [{destination: {host: reviews}}]
"#);
        let p = parse_documents(&text, "routing.yaml");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let crate::k8s::Object::VirtualService(v) = &p.objects[0].1 else {
            panic!()
        };
        let r = &v.http[0];
        assert_eq!(r.matches[0].headers["x-any"], super::StringMatch::Present);
        assert_eq!(r.route[0].weight, Some(75));
        assert_eq!(r.route[0].destination.port, Some(9080));
        assert_eq!(r.timeout, Some(std::time::Duration::from_millis(1500)));
        assert_eq!(r.retries.as_ref().unwrap().attempts, 3);
        assert_eq!(r.mirrors.len(), 1);
        assert_eq!(r.mirrors[0].destination.subset.as_deref(), Some("v2"));
        assert_eq!(r.mirrors[0].per_million, 50_000);
        assert_eq!(
            v.http[2].direct_response.as_ref().unwrap().body,
            Some(super::Body::Bytes(b"hi".to_vec()))
        );
        assert_eq!(
            v.http[3].delegate.as_ref().unwrap().name,
            "reviews-delegate"
        );
        assert_eq!(v.tcp[0].matches[0].port, Some(3306));
        assert_eq!(v.tls[0].matches[0].sni_hosts.len(), 1);
    }

    #[test]
    fn star_regex_is_present_except_for_uri() {
        let text = vs(
            "{hosts: [reviews], http: [{match: [{method: {regex: \"*\"}, headers: {x: {regex: \"*\"}}, withoutHeaders: {y: {regex: \"*\"}}, queryParams: {q: {regex: \"*\"}}}], route: [{destination: {host: reviews}}]}]}",
        );
        let p = parse_documents(&text, "routing.yaml");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let crate::k8s::Object::VirtualService(v) = &p.objects[0].1 else {
            panic!()
        };
        let m = &v.http[0].matches[0];
        assert_eq!(m.method, Some(super::StringMatch::Present));
        assert_eq!(m.headers["x"], super::StringMatch::Present);
        assert_eq!(m.without_headers["y"], super::StringMatch::Present);
        assert_eq!(m.query_params["q"], super::StringMatch::Present);
        let uri = problems(&vs(
            "{hosts: [reviews], http: [{match: [{uri: {regex: \"*\"}}], route: [{destination: {host: reviews}}]}]}",
        ));
        assert!(uri[0].contains("invalid regex"), "{uri:?}");
    }

    #[test]
    fn problems_name_the_field() {
        let cases = [
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], mirror: {host: a}, mirrors: [{destination: {host: b}}]}]}",
                "field \"spec.http[0]\": only one of mirror, mirrors",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], retries: {attempts: 2, retryOn: \"5xx,sometimes\"}}]}",
                "field \"spec.http[0].retries.retryOn\": \"sometimes\" is neither an HTTP status code",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], retries: {attempts: -1}}]}",
                "field \"spec.http[0].retries.attempts\": -1 is not a count",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], fault: {abort: {httpStatus: 700}}}]}",
                "field \"spec.http[0].fault.abort.httpStatus\": 700 is not an HTTP status",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], fault: {abort: {grpcStatus: NOPE}}}]}",
                "field \"spec.http[0].fault.abort.grpcStatus\": \"NOPE\" is not a gRPC status name",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], fault: {delay: {percentage: {value: 5}}}}]}",
                "field \"spec.http[0].fault.delay.fixedDelay\": is required",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], corsPolicy: {allowMethods: [FETCH]}}]}",
                "field \"spec.http[0].corsPolicy.allowMethods\": \"FETCH\" is not an HTTP method",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], corsPolicy: {unmatchedPreflights: DROP}}]}",
                "field \"spec.http[0].corsPolicy.unmatchedPreflights\": \"DROP\" is not one of",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], mirrors: [{destination: {host: b}, percentage: {value: 120}}]}]}",
                "field \"spec.http[0].mirrors[0].percentage\": 120 is not a percentage (0-100)",
            ),
            (
                "{hosts: [reviews], http: [{match: [{uri: {regex: \"(\"}}], route: [{destination: {host: reviews}}]}]}",
                "routing.yaml: VirtualService bookinfo/reviews: field \"spec.http[0].match[0].uri.regex\": invalid regex \"(\"",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}, weight: -1}]}]}",
                "field \"spec.http[0].route[0].weight\": -1 is not between 0 and 100",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: reviews}, weight: 101}]}]}",
                "field \"spec.http[0].route[0].weight\": 101 is not between 0 and 100",
            ),
            (
                "{hosts: [reviews], http: [{match: [{ignoreUriCase: yes-please}], route: [{destination: {host: reviews}}]}]}",
                "field \"spec.http[0].match[0].ignoreUriCase\": expected a boolean, got a string",
            ),
            (
                "{hosts: reviews}",
                "field \"spec.hosts\": expected a list, got a string",
            ),
            (
                "{hosts: [reviews], http: [{mach: [], route: [{destination: {host: reviews}}]}]}",
                "field \"spec.http[0].mach\": unknown field",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: a}}, {destination: {host: b}, weight: 0}]}]}",
                "field \"spec.http[0].route\": several destinations need weights",
            ),
            (
                "{hosts: [reviews], http: [{match: [{uri: {}}], route: [{destination: {host: reviews}}]}]}",
                "field \"spec.http[0].match[0].uri\": needs one of exact, prefix, regex",
            ),
            (
                "{hosts: [reviews], http: [{}]}",
                "field \"spec.http[0]\": needs one of route, redirect, directResponse, delegate",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: r}}], rewrite: {uriRegexRewrite: {match: \"[\", rewrite: x}}}]}",
                "field \"spec.http[0].rewrite.uriRegexRewrite.match\": invalid regex",
            ),
            (
                "{hosts: [reviews], http: [{directResponse: {status: 99}}]}",
                "field \"spec.http[0].directResponse.status\": 99 is not an HTTP status",
            ),
            (
                "{hosts: [reviews], http: [{route: [{destination: {host: r}}], timeout: soon}]}",
                "field \"spec.http[0].timeout\": \"soon\" is not a duration",
            ),
        ];
        for (spec, want) in cases {
            let got = problems(&vs(spec));
            assert_eq!(got.len(), 1, "{spec}: {got:?}");
            assert!(
                got[0].contains(want),
                "{spec}:\n got {}\nwant {want}",
                got[0]
            );
        }
    }

    #[test]
    fn destination_rules_and_gateways() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {connectionPool: {tcp: {maxConnections: 10}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bad, namespace: bookinfo, labels: {istio.io/waypoint-for: everything}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;
        let p = parse_documents(text, "r.yaml");
        assert_eq!(p.objects.len(), 2);
        let crate::k8s::Object::DestinationRule(dr) = &p.objects[0].1 else {
            panic!()
        };
        assert_eq!(dr.subsets[0].labels["version"], "v1");
        assert_eq!(
            dr.traffic_policy
                .as_ref()
                .unwrap()
                .load_balancer
                .as_ref()
                .unwrap()
                .simple,
            Some(super::SimpleLb::LeastRequest)
        );
        let crate::k8s::Object::Gateway(gw) = &p.objects[1].1 else {
            panic!()
        };
        assert_eq!(gw.waypoint_for, super::WaypointFor::All);
        assert!(gw.is_waypoint());
        assert_eq!(
            p.problems[0].field,
            "metadata.labels[istio.io/waypoint-for]"
        );
    }

    #[test]
    fn hosts_resolve_to_services() {
        use super::service_of_host;
        let s = |n: &str, ns: &str| Some((n.to_string(), ns.to_string()));
        assert_eq!(
            service_of_host("reviews", "bookinfo"),
            s("reviews", "bookinfo")
        );
        assert_eq!(
            service_of_host("reviews.other", "bookinfo"),
            s("reviews", "other")
        );
        assert_eq!(
            service_of_host("reviews.other.svc.cluster.local", "bookinfo"),
            s("reviews", "other")
        );
        assert_eq!(service_of_host("example.com.org", "bookinfo"), None);
    }

    #[test]
    fn base64() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGk").unwrap(), b"hi");
        assert!(super::base64_decode("a b").is_none());
    }
}
