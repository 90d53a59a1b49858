//! Gateway API routes for waypoints: HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`) parsed field by field, attached to the services of waypoints through their `parentRefs`, ordered by the Gateway API's precedence and turned into the routing model the waypoint translation reads; and the `status` they get.
//!
//! As istiod does, a route becomes VirtualService rules internally (one rule per route match,
//! marked `gateway_api` so the translation applies the Gateway API's semantics: a path prefix
//! ends at a `/`, and a backend that does not resolve answers 500). A route attaches to a
//! waypoint in two ways:
//! - `parentRefs` to the waypoint's Gateway: every service bound to that waypoint whose name
//!   one of the route's `hostnames` names (all of them when it has none);
//! - `parentRefs` to a Service (GAMMA): that service, when it is bound to a waypoint.
//!
//! Where a service has Gateway API routes, they decide its HTTP routing and the VirtualServices
//! for it are not applied (each is reported): Istio does not support mixing the two.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value as Json, json};
use serde_yaml_ng::Value;

use crate::k8s::{Meta, Origin, Problem};
use crate::model::{Key, Snapshot};
use crate::routing::{
    At, DerivePort, Destination, DirectResponse, HeaderOperations, Headers, HttpMatch, HttpRoute,
    Mirror, Redirect, Retries, Rewrite, RouteDestination, StringMatch, VirtualService, check_regex,
    join, spec_at,
};

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The controller name in the status pilot writes (Istio's, which waypoints' class names).
pub const CONTROLLER_NAME: &str = "istio.io/gateway-controller";
/// The path prefix of a redirect that replaces the matched prefix (Envoy's `prefix_rewrite` in
/// a redirect), as the route's `redirect.uri` carries it to the translation.
pub const PREFIX_REDIRECT: &str = "%PREFIX()%";
/// The host suffix of a backend that does not resolve: no cluster is made for it, so the
/// requests it would get are answered 500 (`cluster_not_found_response_code`).
pub const INVALID_BACKEND: &str = "invalid-backend";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    pub fn kind(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// One of a route's `parentRefs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    /// Defaulted to the route's.
    pub namespace: String,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
    /// As written, for the status (which repeats it).
    pub written: Json,
}

impl ParentRef {
    fn is_gateway(&self) -> bool {
        self.group == GROUP && self.kind == "Gateway"
    }
    fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }
}

/// A `backendRef` (of a rule, or of a mirror filter).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    /// Defaulted to the route's.
    pub namespace: String,
    pub port: Option<u16>,
    pub weight: u32,
    /// The backend's own RequestHeaderModifier / ResponseHeaderModifier filters.
    pub headers: Headers,
}

/// A `RequestMirror` filter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MirrorRef {
    pub backend: BackendRef,
    pub per_million: u32,
}

/// The path part of a RequestRedirect or URLRewrite filter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedirectFilter {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status_code: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RewriteFilter {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub name: Option<String>,
    /// At least one (a rule without matches matches every request: PathPrefix `/`).
    pub matches: Vec<HttpMatch>,
    pub headers: Headers,
    pub redirect: Option<RedirectFilter>,
    pub rewrite: Option<RewriteFilter>,
    pub mirrors: Vec<MirrorRef>,
    pub backends: Vec<BackendRef>,
    /// `timeouts.request`.
    pub timeout: Option<Duration>,
    /// `timeouts.backendRequest`.
    pub backend_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Route {
    pub kind: RouteKind,
    pub meta: Meta,
    /// `metadata.creationTimestamp` (RFC 3339, so that text order is time order); empty when
    /// not given (a file), which sorts first.
    pub created: String,
    /// `metadata.generation`, reported back as `observedGeneration`.
    pub generation: i64,
    pub parents: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
    /// `status.parents` entries of other controllers, kept when pilot writes its own.
    pub other_status: Vec<Json>,
}

// ---------------------------------------------------------------------------------------------
// Parsing.

fn required<T>(at: At<'_>, key: &str, v: Option<T>) -> Result<T, Problem> {
    v.ok_or_else(|| Problem {
        field: join(at.path, key),
        ..at.problem("is required")
    })
}

/// A Gateway API duration (GEP-2257: up to four `<number><h|m|s|ms>` parts, as `1h30m`).
fn gateway_duration(at: At<'_>) -> Result<Duration, Problem> {
    let s = at.string()?;
    let bad = || at.problem(format!("{s:?} is not a duration (like 10s, 500ms, 1h30m)"));
    let mut rest = s.as_str();
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

fn header_name(at: At<'_>) -> Result<String, Problem> {
    let name = at.string()?;
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(at.problem(format!("{name:?} is not a header name")))
    }
}

/// A header or query parameter match: `(name, condition)`.
fn value_match(at: At<'_>, header: bool) -> Result<(String, StringMatch), Problem> {
    at.object(&["type", "name", "value"])?;
    let name = required(at, "name", at.get("name", header_name)?)?;
    let value = required(at, "value", at.get("value", |a| a.string())?)?;
    let kind = at.get("type", |a| a.string())?;
    let m = match kind.as_deref().unwrap_or("Exact") {
        "Exact" => StringMatch::Exact(value),
        "RegularExpression" => {
            at.get("value", |a| check_regex(a, &value))?;
            StringMatch::Regex(value)
        }
        other => {
            return Err(Problem {
                field: join(at.path, "type"),
                ..at.problem(format!("{other:?} is not one of Exact, RegularExpression"))
            });
        }
    };
    // Header names are case-insensitive (Envoy matches them lower-cased).
    Ok((
        if header {
            name.to_ascii_lowercase()
        } else {
            name
        },
        m,
    ))
}

fn value_matches(
    at: At<'_>,
    key: &str,
    header: bool,
) -> Result<BTreeMap<String, StringMatch>, Problem> {
    let list = at
        .get(key, |a| a.list(|m| value_match(m, header)))?
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for (i, (name, m)) in list.into_iter().enumerate() {
        // "Only the first entry with an equivalent name MUST be considered."
        if out.contains_key(&name) {
            let _ = i;
            continue;
        }
        out.insert(name, m);
    }
    Ok(out)
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn http_match(at: At<'_>) -> Result<HttpMatch, Problem> {
    at.object(&["path", "headers", "queryParams", "method"])?;
    let uri = at
        .get("path", |p| {
            p.object(&["type", "value"])?;
            let value = p
                .get("value", |v| v.string())?
                .unwrap_or_else(|| "/".into());
            let kind = p.get("type", |t| t.string())?;
            let kind = kind.as_deref().unwrap_or("PathPrefix");
            if kind != "RegularExpression" && !value.starts_with('/') {
                return Err(Problem {
                    field: join(p.path, "value"),
                    ..p.problem(format!("{value:?} must start with '/'"))
                });
            }
            match kind {
                "Exact" => Ok(StringMatch::Exact(value)),
                "PathPrefix" => {
                    // A trailing '/' is ignored: `/foo/` matches `/foo` and `/foo/bar`.
                    let trimmed = value.trim_end_matches('/');
                    Ok(StringMatch::Prefix(if trimmed.is_empty() {
                        "/".into()
                    } else {
                        trimmed.into()
                    }))
                }
                "RegularExpression" => {
                    p.get("value", |v| check_regex(v, &value))?;
                    Ok(StringMatch::Regex(value))
                }
                other => Err(Problem {
                    field: join(p.path, "type"),
                    ..p.problem(format!(
                        "{other:?} is not one of Exact, PathPrefix, RegularExpression"
                    ))
                }),
            }
        })?
        .unwrap_or_else(|| StringMatch::Prefix("/".into()));
    let method = at.get("method", |m| {
        let method = m.string()?;
        if METHODS.contains(&method.as_str()) {
            Ok(StringMatch::Exact(method))
        } else {
            Err(m.problem(format!("{method:?} is not one of {}", METHODS.join(", "))))
        }
    })?;
    Ok(HttpMatch {
        uri: Some(uri),
        method,
        headers: value_matches(at, "headers", true)?,
        query_params: value_matches(at, "queryParams", false)?,
        ..Default::default()
    })
}

/// A gRPC service or method name (the Gateway API's validation: no `/`).
fn grpc_name(at: At<'_>) -> Result<String, Problem> {
    let s = at.string()?;
    if s.is_empty() || s.contains('/') {
        return Err(at.problem(format!("{s:?} is not a gRPC service or method name")));
    }
    Ok(s)
}

/// A GRPCRoute match as a path match on `/<service>/<method>` (how gRPC sends the method).
fn grpc_match(at: At<'_>) -> Result<HttpMatch, Problem> {
    at.object(&["method", "headers"])?;
    let uri = at
        .get("method", |m| {
            m.object(&["type", "service", "method"])?;
            let service = m.get("service", grpc_name)?;
            let method = m.get("method", grpc_name)?;
            let kind = m.get("type", |t| t.string())?;
            match kind.as_deref().unwrap_or("Exact") {
                "Exact" => {
                    for (key, v) in [("service", &service), ("method", &method)] {
                        if let Some(v) = v
                            && !v
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                        {
                            return Err(Problem {
                                field: join(m.path, key),
                                ..m.problem(format!("{v:?} is not a gRPC name"))
                            });
                        }
                    }
                    Ok(match (service, method) {
                        (Some(s), Some(me)) => Some(StringMatch::Exact(format!("/{s}/{me}"))),
                        (Some(s), None) => Some(StringMatch::Prefix(format!("/{s}/"))),
                        (None, Some(me)) => {
                            Some(StringMatch::Regex(format!("/[^/]+/{}", regex::escape(&me))))
                        }
                        (None, None) => {
                            return Err(m.problem("needs service or method (or both)"));
                        }
                    })
                }
                "RegularExpression" => {
                    for (key, v) in [("service", &service), ("method", &method)] {
                        if let Some(v) = v {
                            m.get(key, |a| check_regex(a, v))?;
                        }
                    }
                    let s = service.unwrap_or_else(|| "[^/]+".into());
                    let me = method.unwrap_or_else(|| "[^/]+".into());
                    Ok(Some(StringMatch::Regex(format!("/{s}/{me}"))))
                }
                other => Err(Problem {
                    field: join(m.path, "type"),
                    ..m.problem(format!("{other:?} is not one of Exact, RegularExpression"))
                }),
            }
        })?
        .flatten()
        .unwrap_or_else(|| StringMatch::Prefix("/".into()));
    Ok(HttpMatch {
        uri: Some(uri),
        headers: value_matches(at, "headers", true)?,
        ..Default::default()
    })
}

fn header_modifier(at: At<'_>) -> Result<HeaderOperations, Problem> {
    at.object(&["set", "add", "remove"])?;
    let pairs = |key: &str| -> Result<BTreeMap<String, String>, Problem> {
        let list = at
            .get(key, |a| {
                a.list(|h| {
                    h.object(&["name", "value"])?;
                    let name = required(h, "name", h.get("name", header_name)?)?;
                    let value = required(h, "value", h.get("value", |v| v.string())?)?;
                    Ok((name, value))
                })
            })?
            .unwrap_or_default();
        Ok(list.into_iter().collect())
    };
    Ok(HeaderOperations {
        set: pairs("set")?,
        add: pairs("add")?,
        remove: at
            .get("remove", |a| a.list(header_name))?
            .unwrap_or_default(),
    })
}

fn backend_ref(at: At<'_>, route_ns: &str, extra: &[&str]) -> Result<BackendRef, Problem> {
    let mut known = vec!["group", "kind", "name", "namespace", "port", "weight"];
    known.extend_from_slice(extra);
    at.object(&known)?;
    let group = at.get("group", |a| a.string())?.unwrap_or_default();
    let kind = at
        .get("kind", |a| a.string())?
        .unwrap_or_else(|| "Service".into());
    let name = required(at, "name", at.get("name", |a| a.string())?)?;
    let port = at.get("port", |a| a.port())?;
    if group.is_empty() && kind == "Service" && port.is_none() {
        return Err(Problem {
            field: join(at.path, "port"),
            ..at.problem("is required for a Service backend")
        });
    }
    let weight = at
        .get("weight", |a| {
            let w = a.int()?;
            u32::try_from(w)
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| a.problem(format!("{w} is not between 0 and 1000000")))
        })?
        .unwrap_or(1);
    Ok(BackendRef {
        group,
        kind,
        name,
        namespace: at
            .get("namespace", |a| a.string())?
            .unwrap_or_else(|| route_ns.to_string()),
        port,
        weight,
        headers: Headers::default(),
    })
}

fn path_modifier(at: At<'_>) -> Result<PathModifier, Problem> {
    at.object(&["type", "replaceFullPath", "replacePrefixMatch"])?;
    let kind = required(at, "type", at.get("type", |a| a.string())?)?;
    let check = |a: At<'_>| {
        let p = a.string()?;
        if p.starts_with('/') {
            Ok(p)
        } else {
            Err(a.problem(format!("{p:?} must start with '/'")))
        }
    };
    match kind.as_str() {
        "ReplaceFullPath" => Ok(PathModifier::ReplaceFullPath(required(
            at,
            "replaceFullPath",
            at.get("replaceFullPath", check)?,
        )?)),
        "ReplacePrefixMatch" => Ok(PathModifier::ReplacePrefixMatch(required(
            at,
            "replacePrefixMatch",
            at.get("replacePrefixMatch", check)?,
        )?)),
        other => Err(Problem {
            field: join(at.path, "type"),
            ..at.problem(format!(
                "{other:?} is not one of ReplaceFullPath, ReplacePrefixMatch"
            ))
        }),
    }
}

/// A rule's (or backend's) filters into `rule`; `allowed` are the filter types valid there.
fn filters(at: At<'_>, route_ns: &str, allowed: &[&str], rule: &mut Rule) -> Result<(), Problem> {
    let Some(list) = at.v.as_sequence() else {
        return Err(at.wrong("a list"));
    };
    for (i, v) in list.iter().enumerate() {
        let path = format!("{}[{i}]", at.path);
        let f = At {
            origin: at.origin,
            path: &path,
            v,
        };
        f.object(&[
            "type",
            "requestHeaderModifier",
            "responseHeaderModifier",
            "requestMirror",
            "requestRedirect",
            "urlRewrite",
            "extensionRef",
            "cors",
        ])?;
        let kind = required(f, "type", f.get("type", |a| a.string())?)?;
        if !allowed.contains(&kind.as_str()) {
            return Err(Problem {
                field: join(f.path, "type"),
                ..f.problem(format!(
                    "{kind:?} is not supported here (supported: {})",
                    allowed.join(", ")
                ))
            });
        }
        let key = match kind.as_str() {
            "RequestHeaderModifier" => "requestHeaderModifier",
            "ResponseHeaderModifier" => "responseHeaderModifier",
            "RequestMirror" => "requestMirror",
            "RequestRedirect" => "requestRedirect",
            _ => "urlRewrite",
        };
        let body = |what: Option<()>| {
            what.ok_or_else(|| Problem {
                field: join(f.path, key),
                ..f.problem(format!("is required for type {kind}"))
            })
        };
        match kind.as_str() {
            "RequestHeaderModifier" => {
                let h = f.get(key, header_modifier)?;
                body(h.as_ref().map(|_| ()))?;
                rule.headers.request = h.unwrap_or_default();
            }
            "ResponseHeaderModifier" => {
                let h = f.get(key, header_modifier)?;
                body(h.as_ref().map(|_| ()))?;
                rule.headers.response = h.unwrap_or_default();
            }
            "RequestMirror" => {
                let m = f.get(key, |m| {
                    m.object(&["backendRef", "percent", "fraction"])?;
                    let backend = required(
                        m,
                        "backendRef",
                        m.get("backendRef", |b| backend_ref(b, route_ns, &[]))?,
                    )?;
                    let percent = m.get("percent", |p| {
                        let n = p.int()?;
                        match u32::try_from(n) {
                            Ok(n) if n <= 100 => Ok(n * 10_000),
                            _ => Err(p.problem(format!("{n} is not between 0 and 100"))),
                        }
                    })?;
                    let fraction = m.get("fraction", |fr| {
                        fr.object(&["numerator", "denominator"])?;
                        let num = required(fr, "numerator", fr.get("numerator", |n| n.int())?)?;
                        let den = fr.get("denominator", |d| d.int())?.unwrap_or(100);
                        if den <= 0 || num < 0 || num > den {
                            return Err(fr.problem(format!(
                                "{num}/{den}: needs 0 <= numerator <= denominator, denominator > 0"
                            )));
                        }
                        Ok(((num as f64 / den as f64) * 1_000_000.0).round() as u32)
                    })?;
                    if percent.is_some() && fraction.is_some() {
                        return Err(m.problem("only one of percent, fraction"));
                    }
                    Ok(MirrorRef {
                        backend,
                        per_million: percent.or(fraction).unwrap_or(1_000_000),
                    })
                })?;
                body(m.as_ref().map(|_| ()))?;
                rule.mirrors.extend(m);
            }
            "RequestRedirect" => {
                let r = f.get(key, |r| {
                    r.object(&["scheme", "hostname", "path", "port", "statusCode"])?;
                    let scheme = r.get("scheme", |s| {
                        let s = s.string()?;
                        match s.as_str() {
                            "http" | "https" => Ok(s),
                            _ => Err(r.problem(format!("{s:?} is not one of http, https"))),
                        }
                    })?;
                    Ok(RedirectFilter {
                        scheme,
                        hostname: r.get("hostname", |h| h.string())?,
                        path: r.get("path", path_modifier)?,
                        port: r.get("port", |p| p.port())?,
                        status_code: r
                            .get("statusCode", |c| {
                                let c = c.int()?;
                                if matches!(c, 301 | 302 | 303 | 307 | 308) {
                                    Ok(c as u32)
                                } else {
                                    Err(r.problem(format!(
                                        "{c} is not one of 301, 302, 303, 307, 308"
                                    )))
                                }
                            })?
                            .unwrap_or(302),
                    })
                })?;
                body(r.as_ref().map(|_| ()))?;
                rule.redirect = r;
            }
            _ => {
                let r = f.get(key, |r| {
                    r.object(&["hostname", "path"])?;
                    Ok(RewriteFilter {
                        hostname: r.get("hostname", |h| h.string())?,
                        path: r.get("path", path_modifier)?,
                    })
                })?;
                body(r.as_ref().map(|_| ()))?;
                rule.rewrite = r;
            }
        }
    }
    Ok(())
}

fn parent_ref(at: At<'_>, route_ns: &str) -> Result<ParentRef, Problem> {
    at.object(&["group", "kind", "namespace", "name", "sectionName", "port"])?;
    let written = at.raw()?;
    Ok(ParentRef {
        group: at
            .get("group", |a| a.string())?
            .unwrap_or_else(|| GROUP.into()),
        kind: at
            .get("kind", |a| a.string())?
            .unwrap_or_else(|| "Gateway".into()),
        namespace: at
            .get("namespace", |a| a.string())?
            .unwrap_or_else(|| route_ns.to_string()),
        name: required(at, "name", at.get("name", |a| a.string())?)?,
        section_name: at.get("sectionName", |a| a.string())?,
        port: at.get("port", |a| a.port())?,
        written,
    })
}

fn rule(at: At<'_>, kind: RouteKind, route_ns: &str) -> Result<Rule, Problem> {
    let (known, allowed): (&[&str], &[&str]) = match kind {
        RouteKind::Http => (
            &["name", "matches", "filters", "backendRefs", "timeouts"],
            &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
                "RequestRedirect",
                "URLRewrite",
            ],
        ),
        RouteKind::Grpc => (
            &["name", "matches", "filters", "backendRefs"],
            &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
            ],
        ),
    };
    at.object(known)?;
    let matches = at
        .get("matches", |a| {
            a.list(|m| match kind {
                RouteKind::Http => http_match(m),
                RouteKind::Grpc => grpc_match(m),
            })
        })?
        .unwrap_or_default();
    let mut r = Rule {
        name: at.get("name", |a| a.string())?,
        matches: if matches.is_empty() {
            vec![HttpMatch {
                uri: Some(StringMatch::Prefix("/".into())),
                ..Default::default()
            }]
        } else {
            matches
        },
        ..Default::default()
    };
    at.get("filters", |f| filters(f, route_ns, allowed, &mut r))?;
    if r.redirect.is_some() && r.rewrite.is_some() {
        return Err(Problem {
            field: join(at.path, "filters"),
            ..at.problem("RequestRedirect and URLRewrite cannot be used together")
        });
    }
    let prefix_path =
        |p: &Option<PathModifier>| matches!(p, Some(PathModifier::ReplacePrefixMatch(_)));
    if (r.redirect.as_ref().is_some_and(|f| prefix_path(&f.path))
        || r.rewrite.as_ref().is_some_and(|f| prefix_path(&f.path)))
        && !r
            .matches
            .iter()
            .all(|m| matches!(m.uri, Some(StringMatch::Prefix(_))))
    {
        return Err(Problem {
            field: join(at.path, "filters"),
            ..at.problem("ReplacePrefixMatch needs every match of the rule to be a PathPrefix")
        });
    }
    r.backends = at
        .get("backendRefs", |a| {
            a.list(|b| {
                let mut backend = backend_ref(b, route_ns, &["filters"])?;
                let mut own = Rule::default();
                b.get("filters", |f| {
                    filters(
                        f,
                        route_ns,
                        &["RequestHeaderModifier", "ResponseHeaderModifier"],
                        &mut own,
                    )
                })?;
                backend.headers = own.headers;
                Ok(backend)
            })
        })?
        .unwrap_or_default();
    if let Some(t) = at.get("timeouts", |t| {
        t.object(&["request", "backendRequest"])?;
        let request = t.get("request", gateway_duration)?;
        let backend = t.get("backendRequest", gateway_duration)?;
        if let (Some(r), Some(b)) = (request, backend)
            && !r.is_zero()
            && b > r
        {
            return Err(Problem {
                field: join(t.path, "backendRequest"),
                ..t.problem("must not be longer than request")
            });
        }
        Ok((request, backend))
    })? {
        r.timeout = t.0.filter(|d| !d.is_zero());
        r.backend_timeout = t.1.filter(|d| !d.is_zero());
    }
    Ok(r)
}

/// An HTTPRoute or GRPCRoute. `metadata` is the object's, for its creation time and generation;
/// `status` its status, whose entries of other controllers are kept.
pub fn route(
    kind: RouteKind,
    origin: &Origin,
    meta: Meta,
    metadata: Option<&Value>,
    spec: Value,
    status: &Value,
) -> Result<Route, Problem> {
    let at = spec_at(origin, &spec);
    if spec.is_null() {
        return Err(at.problem("is required"));
    }
    at.object(&["parentRefs", "hostnames", "rules"])?;
    let ns = meta.namespace.clone();
    let parents = at
        .get("parentRefs", |a| a.list(|p| parent_ref(p, &ns)))?
        .unwrap_or_default();
    let hostnames = at.get("hostnames", |a| a.strings())?.unwrap_or_default();
    let rules = at
        .get("rules", |a| a.list(|r| rule(r, kind, &ns)))?
        .unwrap_or_default();
    let rules = if rules.is_empty() {
        // The default rule: everything, with no backend (so 500).
        vec![Rule {
            matches: vec![HttpMatch {
                uri: Some(StringMatch::Prefix("/".into())),
                ..Default::default()
            }],
            ..Default::default()
        }]
    } else {
        rules
    };
    let created = metadata
        .and_then(|m| m.get("creationTimestamp"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let generation = meta.generation;
    let other_status = status
        .get("parents")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter(|p| p.get("controllerName").and_then(Value::as_str) != Some(CONTROLLER_NAME))
        .filter_map(|p| serde_json::to_value(p).ok())
        .collect();
    Ok(Route {
        kind,
        meta,
        created,
        generation,
        parents,
        hostnames,
        rules,
        other_status,
    })
}

// ---------------------------------------------------------------------------------------------
// Attachment: routes → the rules of each service they route, in precedence order.

/// A condition of a route's parent status: `Ok(())` is True; `Err((reason, message))` False.
pub type Condition = Result<(), (&'static str, String)>;

/// The status of one of a route's parentRefs that names a parent pilot handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    /// Index in the route's `parentRefs`.
    pub parent: usize,
    pub accepted: Condition,
    pub resolved_refs: Condition,
}

/// What the Gateway API routes give the waypoint translation and the status writer.
#[derive(Debug, Default)]
pub struct Attached {
    /// Per service: its rules in precedence order, each as a one-rule VirtualService named
    /// after the route it comes from.
    pub by_service: BTreeMap<Key, Vec<VirtualService>>,
    /// Per route (kind, key): the status of each parentRef pilot handles.
    pub statuses: BTreeMap<(RouteKind, Key), Vec<ParentStatus>>,
    /// Per waypoint Gateway: how many routes attach to it (`attachedRoutes`).
    pub attached_to_gateway: BTreeMap<Key, usize>,
    /// Parents refused and backends that do not resolve, each naming its field (what the
    /// status says, for the folder source too, which has no status).
    pub problems: Vec<Problem>,
}

/// Whether `host` (a route's `hostnames` entry) names the service `name.ns`.
fn names_service(host: &str, name: &str, ns: &str, domain: &str) -> bool {
    let fqdn = format!("{name}.{ns}.svc.{domain}");
    if let Some(suffix) = host.strip_prefix('*') {
        return fqdn.ends_with(suffix);
    }
    host == fqdn
        || host == name
        || host == format!("{name}.{ns}")
        || host == format!("{name}.{ns}.svc")
}

/// The order of the Gateway API among rules of one service: an exact path first, then the
/// longest prefix, then a regex path (unspecified by the Gateway API; after prefixes as in
/// Istio, but before the prefix `/`), then a method match, more header matches, more query
/// parameter matches; then the oldest route, its namespace/name, the rule's and the match's
/// position.
type Precedence = (
    std::cmp::Reverse<(u8, usize, bool, usize, usize)>,
    (String, String, String, usize, usize),
);

fn precedence(m: &HttpMatch, route: &Route, rule: usize, i: usize) -> Precedence {
    let (rank, len) = match &m.uri {
        Some(StringMatch::Exact(p)) => (3, p.len()),
        // The prefix `/` (every path) after a regex, which it would otherwise hide.
        Some(StringMatch::Prefix(p)) if p == "/" => (0, 0),
        Some(StringMatch::Prefix(p)) => (2, p.len()),
        Some(StringMatch::Regex(r)) => (1, r.len()),
        _ => (0, 0),
    };
    (
        std::cmp::Reverse((
            rank,
            len,
            m.method.is_some(),
            m.headers.len(),
            m.query_params.len(),
        )),
        (
            route.created.clone(),
            route.meta.namespace.clone(),
            route.meta.name.clone(),
            rule,
            i,
        ),
    )
}

/// The resolution of one backendRef: its destination host (an unresolvable one gets a host no
/// service has, so that its share of the requests is answered 500), and why it fails.
fn resolve(s: &Snapshot, route: &Route, b: &BackendRef, domain: &str) -> (String, Condition) {
    let invalid = |reason: &'static str, msg: String| {
        (
            format!("{}.{}.{INVALID_BACKEND}", b.name, b.namespace),
            Err((reason, msg)),
        )
    };
    if !(b.group.is_empty() && b.kind == "Service") {
        return invalid(
            "InvalidKind",
            format!(
                "backend {}/{} {}: only Services are supported",
                b.group, b.kind, b.name
            ),
        );
    }
    let reference = crate::reference_grant::Reference {
        from: (GROUP, route.kind.kind(), &route.meta.namespace),
        to: ("", "Service", &b.namespace, &b.name),
    };
    if !crate::reference_grant::permitted(s.reference_grants.values(), &reference) {
        return invalid(
            "RefNotPermitted",
            format!(
                "backend {}/{}: no ReferenceGrant in namespace {} lets {}s of namespace {} refer to it",
                b.namespace,
                b.name,
                b.namespace,
                route.kind.kind(),
                route.meta.namespace
            ),
        );
    }
    let Some(svc) = s.services.get(&(b.namespace.clone(), b.name.clone())) else {
        return invalid(
            "BackendNotFound",
            format!("backend Service {}/{} not found", b.namespace, b.name),
        );
    };
    if let Some(port) = b.port
        && !svc.ports.iter().any(|p| p.port == port)
    {
        return invalid(
            "BackendNotFound",
            format!(
                "backend Service {}/{} has no port {port}",
                b.namespace, b.name
            ),
        );
    }
    (format!("{}.{}.svc.{domain}", b.name, b.namespace), Ok(()))
}

/// Everything after the prefix `prefix` of a PathPrefix match replaced by `with`, as Envoy
/// rewrites it: `prefix_rewrite` when that gives the Gateway API's result, else a regex (a
/// replacement ending in `/` must not double the `/` that follows the prefix).
fn prefix_replacement(prefix: &str, with: &str) -> Rewrite {
    let prefix = prefix.trim_end_matches('/');
    if with.ends_with('/') {
        Rewrite {
            uri_regex: Some((format!("^{}/*", regex::escape(prefix)), with.to_string())),
            ..Default::default()
        }
    } else if prefix.is_empty() {
        // PathPrefix `/`: every path; `/a` becomes `<with>/a`.
        Rewrite {
            uri_regex: Some(("^/".into(), format!("{with}/"))),
            ..Default::default()
        }
    } else {
        Rewrite {
            uri: Some(with.to_string()),
            ..Default::default()
        }
    }
}

/// One rule with one match in the routing model.
fn model_rule(
    s: &Snapshot,
    route: &Route,
    rule_index: usize,
    rule: &Rule,
    m: &HttpMatch,
    domain: &str,
    resolved: &mut Vec<(String, Condition)>,
) -> HttpRoute {
    let name = rule
        .name
        .clone()
        .unwrap_or_else(|| format!("{}.{}.{rule_index}", route.meta.namespace, route.meta.name));
    let prefix = match &m.uri {
        Some(StringMatch::Prefix(p)) => p.as_str(),
        _ => "/",
    };
    let redirect = rule.redirect.as_ref().map(|r| Redirect {
        uri: r.path.as_ref().map(|p| match p {
            PathModifier::ReplaceFullPath(p) => p.clone(),
            PathModifier::ReplacePrefixMatch(p) => format!("{PREFIX_REDIRECT}{p}"),
        }),
        authority: r.hostname.clone(),
        port: r.port,
        // A scheme without a port: that scheme's default port (no port in the location).
        derive_port: (r.port.is_none() && r.scheme.is_some())
            .then_some(DerivePort::FromProtocolDefault),
        scheme: r.scheme.clone(),
        redirect_code: Some(r.status_code),
    });
    let rewrite = rule.rewrite.as_ref().map(|r| {
        let mut out = match &r.path {
            Some(PathModifier::ReplaceFullPath(p)) => Rewrite {
                uri_regex: Some(("^/.*$".into(), p.clone())),
                ..Default::default()
            },
            Some(PathModifier::ReplacePrefixMatch(p)) => prefix_replacement(prefix, p),
            None => Rewrite::default(),
        };
        out.authority = r.hostname.clone();
        out
    });
    let live: Vec<&BackendRef> = rule.backends.iter().filter(|b| b.weight > 0).collect();
    let mut route_dests = Vec::new();
    for (j, b) in rule.backends.iter().enumerate() {
        let (host, ok) = resolve(s, route, b, domain);
        resolved.push((format!("spec.rules[{rule_index}].backendRefs[{j}]"), ok));
        if b.weight == 0 {
            continue;
        }
        route_dests.push(RouteDestination {
            destination: Destination {
                host,
                subset: None,
                port: b.port,
            },
            weight: (live.len() > 1).then_some(b.weight),
            headers: b.headers.clone(),
        });
    }
    let mut mirrors = Vec::new();
    for mr in &rule.mirrors {
        let (host, ok) = resolve(s, route, &mr.backend, domain);
        let field = format!(
            "spec.rules[{rule_index}].filters (RequestMirror {})",
            mr.backend.name
        );
        if ok.is_ok() {
            mirrors.push(Mirror {
                destination: Destination {
                    host,
                    subset: None,
                    port: mr.backend.port,
                },
                per_million: mr.per_million,
            });
        }
        resolved.push((field, ok));
    }
    let (route_dests, direct_response) = if redirect.is_some() {
        (vec![], None)
    } else if route_dests.is_empty() {
        // No backend with weight: the Gateway API answers 500.
        (
            vec![],
            Some(DirectResponse {
                status: 500,
                body: None,
            }),
        )
    } else {
        (route_dests, None)
    };
    HttpRoute {
        name,
        matches: vec![m.clone()],
        route: route_dests,
        redirect,
        direct_response,
        rewrite: rewrite.filter(|r| *r != Rewrite::default()),
        headers: rule.headers.clone(),
        // `request` bounds the whole exchange, `backendRequest` each request to a backend
        // (Gateway API): the per-try timeout of the mesh's default retries (HTTPRoute's own
        // `retry` stanza is not supported), which Envoy also answers 504 `UT`.
        timeout: rule.timeout,
        retries: rule.backend_timeout.map(|b| Retries {
            attempts: crate::route_policy::DEFAULT_RETRY_ATTEMPTS,
            per_try_timeout: Some(b),
            ..Default::default()
        }),
        mirrors,
        gateway_api: true,
        ..Default::default()
    }
}

/// Attach every route of `s` to the services it routes. `domain` is the cluster's DNS suffix.
pub fn attach(s: &Snapshot, domain: &str) -> Attached {
    let mut out = Attached::default();
    // The waypoint of each service that has one.
    let waypoint_of: BTreeMap<&Key, Key> = s
        .services
        .iter()
        .filter_map(|(k, svc)| crate::translate::service_waypoint(s, svc).map(|w| (k, w)))
        .collect();
    let mut rules: BTreeMap<Key, Vec<(Precedence, VirtualService)>> = BTreeMap::new();
    let routes = s
        .http_routes
        .iter()
        .map(|(k, r)| (RouteKind::Http, k, r))
        .chain(s.grpc_routes.iter().map(|(k, r)| (RouteKind::Grpc, k, r)));
    for (kind, key, route) in routes {
        // The rules in the model (one per match), whatever their parent: ports are set below.
        let mut resolved = Vec::new();
        let mut model: Vec<(Precedence, HttpRoute)> = Vec::new();
        for (ri, rule) in route.rules.iter().enumerate() {
            for (mi, m) in rule.matches.iter().enumerate() {
                model.push((
                    precedence(m, route, ri, mi),
                    model_rule(s, route, ri, rule, m, domain, &mut resolved),
                ));
            }
        }
        let file = s.file_of(kind.kind(), key).to_string();
        let object = format!("{} {}/{}", kind.kind(), key.0, key.1);
        let mut problem = |field: String, reason: String| {
            let p = Problem {
                file: file.clone(),
                object: object.clone(),
                field,
                reason,
            };
            if !out.problems.contains(&p) {
                out.problems.push(p);
            }
        };
        for (field, r) in &resolved {
            if let Err((_, msg)) = r {
                problem(
                    field.clone(),
                    format!("{msg}: requests for it are answered 500"),
                );
            }
        }
        let resolved_refs: Condition = {
            let failures: Vec<&(&'static str, String)> = resolved
                .iter()
                .filter_map(|(_, r)| r.as_ref().err())
                .collect();
            match failures.first() {
                None => Ok(()),
                Some((reason, _)) => Err((
                    reason,
                    failures
                        .iter()
                        .map(|(_, m)| m.as_str())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join("; "),
                )),
            }
        };
        let mut statuses = Vec::new();
        for (pi, p) in route.parents.iter().enumerate() {
            // (service, port) pairs this parent routes.
            let mut targets: Vec<(Key, Option<u16>)> = Vec::new();
            let accepted: Condition = if p.is_gateway() {
                let gw_key = (p.namespace.clone(), p.name.clone());
                match s.gateways.get(&gw_key) {
                    // Another controller's Gateway: not ours to report on.
                    Some(gw) if !gw.is_waypoint() => continue,
                    None => {
                        // It may be another controller's, to come: no status, a problem.
                        problem(
                            format!("spec.parentRefs[{pi}]"),
                            format!(
                                "Gateway {}/{} not found; the route is not attached to it",
                                p.namespace, p.name
                            ),
                        );
                        continue;
                    }
                    Some(_) if p.namespace != route.meta.namespace => Err((
                        "NotAllowedByListeners",
                        format!(
                            "a waypoint takes routes from its own namespace {} only",
                            p.namespace
                        ),
                    )),
                    Some(gw)
                        if p.section_name
                            .as_ref()
                            .is_some_and(|sn| !gw.listeners.iter().any(|l| &l.name == sn))
                            || p.port.is_some_and(|port| {
                                !gw.listeners.iter().any(|l| l.port == port)
                            }) =>
                    {
                        Err((
                            "NoMatchingParent",
                            "no listener of the Gateway has this sectionName / port".into(),
                        ))
                    }
                    Some(_) => {
                        for (svc_key, w) in &waypoint_of {
                            if *w == gw_key
                                && (route.hostnames.is_empty()
                                    || route
                                        .hostnames
                                        .iter()
                                        .any(|h| names_service(h, &svc_key.1, &svc_key.0, domain)))
                            {
                                targets.push(((*svc_key).clone(), None));
                            }
                        }
                        *out.attached_to_gateway.entry(gw_key).or_default() += 1;
                        Ok(())
                    }
                }
            } else if p.is_service() {
                let svc_key = (p.namespace.clone(), p.name.clone());
                match s.services.get(&svc_key) {
                    None => Err((
                        "NoMatchingParent",
                        format!("Service {}/{} not found", p.namespace, p.name),
                    )),
                    Some(_) if p.namespace != route.meta.namespace => Err((
                        "NotAllowedByListeners",
                        "a route for a Service of another namespace (a consumer route) is not supported"
                            .into(),
                    )),
                    Some(_) if !waypoint_of.contains_key(&svc_key) => Err((
                        "NoMatchingParent",
                        format!(
                            "Service {}/{} is not bound to a waypoint (istio.io/use-waypoint)",
                            p.namespace, p.name
                        ),
                    )),
                    Some(svc) => {
                        let by_name = p.section_name.as_ref().map(|sn| {
                            svc.ports.iter().find(|sp| &sp.name == sn).map(|sp| sp.port)
                        });
                        match (by_name, p.port) {
                            (Some(None), _) => Err((
                                "NoMatchingParent",
                                format!("the Service has no port named {:?}", p.section_name),
                            )),
                            (_, Some(port)) if !svc.ports.iter().any(|sp| sp.port == port) => {
                                Err((
                                    "NoMatchingParent",
                                    format!("the Service has no port {port}"),
                                ))
                            }
                            (Some(Some(a)), Some(b)) if a != b => Err((
                                "NoMatchingParent",
                                "sectionName and port name different ports".into(),
                            )),
                            (by_name, port) => {
                                targets.push((svc_key, port.or(by_name.flatten())));
                                Ok(())
                            }
                        }
                    }
                }
            } else {
                // A parent kind pilot does not handle (another implementation's).
                continue;
            };
            if let Err((_, msg)) = &accepted {
                problem(
                    format!("spec.parentRefs[{pi}]"),
                    format!("{msg}; the route is not attached to it"),
                );
            }
            for (svc_key, port) in targets {
                let list = rules.entry(svc_key.clone()).or_default();
                for (prec, r) in &model {
                    let mut r = r.clone();
                    for m in &mut r.matches {
                        m.port = port;
                    }
                    let host = format!("{}.{}.svc.{domain}", svc_key.1, svc_key.0);
                    // The same rule through two parents (the Gateway and the Service) once.
                    if list
                        .iter()
                        .any(|(p2, v)| p2 == prec && v.http[0].matches == r.matches)
                    {
                        continue;
                    }
                    list.push((
                        prec.clone(),
                        VirtualService {
                            meta: route.meta.clone(),
                            hosts: vec![host],
                            gateways: vec![],
                            export_to: vec![],
                            http: vec![r],
                            tcp: vec![],
                            tls: vec![],
                        },
                    ));
                }
            }
            statuses.push(ParentStatus {
                parent: pi,
                accepted,
                resolved_refs: resolved_refs.clone(),
            });
        }
        out.statuses.insert((kind, key.clone()), statuses);
    }
    out.problems.sort();
    for (svc, mut list) in rules {
        list.sort_by(|a, b| a.0.cmp(&b.0));
        out.by_service
            .insert(svc, list.into_iter().map(|(_, v)| v).collect());
    }
    out
}

/// The Gateway API's semantics on an Envoy route made from a `gateway_api` rule: a path prefix
/// matches whole segments (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`), a backend that
/// does not resolve (no cluster) answers 500, and a redirect replacing the matched prefix is
/// Envoy's `prefix_rewrite`.
pub fn envoy_semantics(rt: &mut envoy_types::pb::envoy::config::route::v3::Route) {
    use envoy_types::pb::envoy::config::route::v3 as route;
    use route::route_match::PathSpecifier;
    if let Some(m) = &mut rt.r#match
        && let Some(PathSpecifier::Prefix(p)) = &m.path_specifier
        && p != "/"
        && !p.ends_with('/')
    {
        m.path_specifier = Some(PathSpecifier::PathSeparatedPrefix(p.clone()));
    }
    match &mut rt.action {
        Some(route::route::Action::Route(a)) => {
            a.cluster_not_found_response_code =
                route::route_action::ClusterNotFoundResponseCode::InternalServerError as i32;
        }
        Some(route::route::Action::Redirect(r)) => {
            use route::redirect_action::PathRewriteSpecifier as P;
            if let Some(P::PathRedirect(p)) = &r.path_rewrite_specifier
                && let Some(prefix) = p.strip_prefix(PREFIX_REDIRECT)
            {
                r.path_rewrite_specifier = Some(P::PrefixRewrite(prefix.to_string()));
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Status.

fn condition(kind: &str, c: &Condition, ok_reason: &str, generation: i64, now: &str) -> Json {
    let (status, reason, message) = match c {
        Ok(()) => ("True", ok_reason.to_string(), ok_reason.to_string()),
        Err((reason, message)) => ("False", reason.to_string(), message.clone()),
    };
    let message = match (kind, c) {
        ("Accepted", Ok(())) => "Route was valid".to_string(),
        ("ResolvedRefs", Ok(())) => "All references resolved".to_string(),
        _ => message,
    };
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now,
    })
}

/// The `status` of a route: other controllers' entries as they are, then one entry per parent
/// pilot handles. `now` is the transition time of the conditions.
pub fn route_status(route: &Route, statuses: &[ParentStatus], now: &str) -> Json {
    let mut parents: Vec<Json> = route.other_status.clone();
    for st in statuses {
        let Some(p) = route.parents.get(st.parent) else {
            continue;
        };
        parents.push(json!({
            "parentRef": p.written,
            "controllerName": CONTROLLER_NAME,
            "conditions": [
                condition("Accepted", &st.accepted, "Accepted", route.generation, now),
                condition("ResolvedRefs", &st.resolved_refs, "ResolvedRefs", route.generation, now),
            ],
        }));
    }
    json!({ "parents": parents })
}

/// The `status` of a waypoint Gateway: Accepted, Programmed once its Service has a cluster IP,
/// that IP as its address, and its listeners with the routes attached.
pub fn gateway_status(s: &Snapshot, key: &Key, attached: usize, now: &str) -> Option<Json> {
    let gw = s.gateways.get(key)?;
    if !gw.is_waypoint() {
        return None;
    }
    let generation = gw.meta.generation;
    let ips: Vec<String> = s
        .services
        .get(key)
        .map(|svc| svc.cluster_ips.iter().map(|ip| ip.to_string()).collect())
        .unwrap_or_default();
    let programmed: Condition = if ips.is_empty() {
        Err((
            "AddressNotAssigned",
            format!(
                "the waypoint's Service {}/{} has no cluster IP yet",
                key.0, key.1
            ),
        ))
    } else {
        Ok(())
    };
    let cond = |kind: &str, c: &Condition, ok: &str| {
        let mut v = condition(kind, c, ok, generation, now);
        if c.is_ok() {
            v["message"] = format!("{ok} by {CONTROLLER_NAME}").into();
        }
        v
    };
    let listeners: Vec<Json> = gw
        .listeners
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "supportedKinds": [
                    {"group": GROUP, "kind": "HTTPRoute"},
                    {"group": GROUP, "kind": "GRPCRoute"},
                ],
                "attachedRoutes": attached,
                "conditions": [
                    cond("Accepted", &Ok(()), "Accepted"),
                    cond("Programmed", &programmed, "Programmed"),
                    cond("ResolvedRefs", &Ok(()), "ResolvedRefs"),
                ],
            })
        })
        .collect();
    Some(json!({
        "addresses": ips.iter().map(|ip| json!({"type": "IPAddress", "value": ip})).collect::<Vec<_>>(),
        "conditions": [
            cond("Accepted", &Ok(()), "Accepted"),
            cond("Programmed", &programmed, "Programmed"),
        ],
        "listeners": listeners,
    }))
}

/// A status with its `lastTransitionTime`s taken from `previous` wherever a condition kept its
/// status and reason there (a transition time says when it last changed), for comparing and
/// writing.
pub fn keep_transition_times(mut now: Json, previous: Option<&Json>) -> Json {
    fn conditions(v: &Json) -> Vec<&Json> {
        let mut out = Vec::new();
        fn walk<'a>(v: &'a Json, out: &mut Vec<&'a Json>) {
            match v {
                Json::Object(m) => {
                    if m.contains_key("lastTransitionTime") {
                        out.push(v);
                    }
                    for x in m.values() {
                        walk(x, out);
                    }
                }
                Json::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        walk(v, &mut out);
        out
    }
    let Some(previous) = previous else {
        return now;
    };
    let old: Vec<Json> = conditions(previous).into_iter().cloned().collect();
    fn patch(v: &mut Json, old: &[Json]) {
        match v {
            Json::Object(m) => {
                if m.contains_key("lastTransitionTime")
                    && let Some(o) = old.iter().find(|o| {
                        o["type"] == m["type"]
                            && o["status"] == m["status"]
                            && o["reason"] == m["reason"]
                    })
                {
                    m.insert("lastTransitionTime".into(), o["lastTransitionTime"].clone());
                }
                for x in m.values_mut() {
                    patch(x, old);
                }
            }
            Json::Array(a) => a.iter_mut().for_each(|x| patch(x, old)),
            _ => {}
        }
    }
    patch(&mut now, &old);
    now
}

#[cfg(test)]
mod tests;
