//! HTTP routing as Envoy does it: a `RouteConfiguration` compiled once (regexes included) into
//! matchers and actions, then matched per request with no I/O: virtual host by authority, first
//! matching route wins, and the route's action (forward to a cluster, redirect, direct response)
//! with its rewrites and header operations.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as envoy_core;
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

/// The metadata filter our `istio.source` matchers name (see the contract).
pub const SOURCE_FILTER: &str = "istio.source";

/// What a request offers to matchers. `path` is the whole `:path` (path and query).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub source: &'a Source,
}

impl Request<'_> {
    /// The path without its query string, which exact and regex path matches compare.
    pub(crate) fn path_only(&self) -> &str {
        self.path.split_once('?').map_or(self.path, |(p, _)| p)
    }

    fn query(&self) -> &str {
        self.path.split_once('?').map_or("", |(_, q)| q)
    }

    /// Whether any value of a header satisfies `hit` (pseudo-headers by name), or `None` when
    /// the request has no such header. Envoy (1.40, the CVE-2026-26308 fix) matches each value
    /// of a repeated header on its own, not their `,`-joined concatenation.
    fn any_header_value(&self, name: &str, mut hit: impl FnMut(&str) -> bool) -> Option<bool> {
        match name {
            ":method" => return Some(hit(self.method)),
            ":scheme" => return Some(hit(self.scheme)),
            ":path" => return Some(hit(self.path)),
            ":authority" | "host" => return Some(hit(self.authority)),
            _ => {}
        }
        let mut values = self.headers.get_all(name).iter().peekable();
        values.peek()?;
        Some(values.any(|v| hit(&String::from_utf8_lossy(v.as_bytes()))))
    }
}

/// The `istio.source` dynamic metadata: who sent the request, from the HBONE peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    /// From the peer's SPIFFE identity.
    pub namespace: String,
    /// From the workload whose address is the client's.
    pub labels: BTreeMap<String, String>,
}

impl Source {
    fn lookup(&self, filter: &str, path: &[String]) -> Option<&str> {
        if filter != SOURCE_FILTER {
            return None;
        }
        match path {
            [k] if k == "namespace" => Some(&self.namespace),
            [k, label] if k == "labels" => self.labels.get(label).map(String::as_str),
            _ => None,
        }
    }
}

/// A compiled `RouteConfiguration`.
#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    ignore_port: bool,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    domains: Vec<String>,
    pub routes: Vec<Route>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// `include_request_attempt_count`: `x-envoy-attempt-count` goes upstream.
    pub include_attempt_count: bool,
    /// Per-filter configs of the virtual host (route configs take precedence).
    pub filters: FilterConfigs,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: RouteMatch,
    pub action: Action,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// `typed_per_filter_config` of the filters the waypoint implements.
    pub filters: FilterConfigs,
}

/// The per-filter configs (`typed_per_filter_config`) of a route or virtual host, for the HTTP
/// filters the waypoint implements; a config for any other filter is refused.
#[derive(Debug, Default)]
pub struct FilterConfigs {
    /// `None` inside: an `HTTPFault` that injects nothing (it still overrides the filter's own).
    pub fault: Option<Option<std::sync::Arc<crate::fault::Fault>>>,
    pub cors: Option<std::sync::Arc<crate::cors::CorsPolicy>>,
}

fn filter_configs(
    map: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
) -> Result<FilterConfigs, String> {
    let mut out = FilterConfigs::default();
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        let any = &map[name];
        let at = |e: String| format!("typed_per_filter_config[{name:?}]: {e}");
        match any.type_url.as_str() {
            crate::fault::TYPE_URL => {
                out.fault = Some(
                    crate::fault::Fault::decode(&any.value)
                        .map_err(at)?
                        .map(std::sync::Arc::new),
                );
            }
            crate::cors::TYPE_URL => {
                out.cors = Some(std::sync::Arc::new(
                    crate::cors::CorsPolicy::decode(&any.value).map_err(at)?,
                ));
            }
            other => return Err(at(format!("{other} is not supported"))),
        }
    }
    Ok(out)
}

#[derive(Debug)]
struct RouteMatch {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatcher>,
    query: Vec<QueryMatcher>,
    metadata: Vec<MetadataMatcher>,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    /// Whole-path (RE2 FullMatch) regex on the path without query.
    Regex(Regex),
    /// `/a/b` matches `/a/b` and `/a/b/...` but not `/a/bc`.
    Separated(String),
}

#[derive(Debug)]
pub(crate) struct HeaderMatcher {
    name: String,
    spec: HeaderSpec,
    invert: bool,
    missing_as_empty: bool,
}

#[derive(Debug)]
enum HeaderSpec {
    Value(StringMatch),
    Present(bool),
    /// `[start, end)`, the value parsed as an integer.
    Range(i64, i64),
}

#[derive(Debug)]
struct QueryMatcher {
    name: String,
    /// `None`: present.
    value: Option<StringMatch>,
}

#[derive(Debug)]
struct MetadataMatcher {
    filter: String,
    path: Vec<String>,
    value: ValueMatch,
    invert: bool,
}

#[derive(Debug)]
enum ValueMatch {
    String(StringMatch),
    Present(bool),
}

/// Envoy's `StringMatcher`.
#[derive(Debug)]
pub struct StringMatch {
    pattern: Pattern,
    ignore_case: bool,
}

#[derive(Debug)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        let fold = |s: &str| -> String { s.to_lowercase() };
        match &self.pattern {
            Pattern::Regex(r) => r.is_match(value),
            p if self.ignore_case => {
                let v = fold(value);
                match p {
                    Pattern::Exact(s) => v == fold(s),
                    Pattern::Prefix(s) => v.starts_with(&fold(s)),
                    Pattern::Suffix(s) => v.ends_with(&fold(s)),
                    Pattern::Contains(s) => v.contains(&fold(s)),
                    Pattern::Regex(_) => false,
                }
            }
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(s) => value.starts_with(s.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            Pattern::Contains(s) => value.contains(s.as_str()),
        }
    }
}

/// What a matched route does.
#[derive(Debug)]
pub enum Action {
    Forward(Box<Forward>),
    Redirect(Redirect),
    Direct { status: u16, body: bytes::Bytes },
}

#[derive(Debug)]
pub struct Forward {
    pub targets: Targets,
    prefix_rewrite: Option<String>,
    regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<HeaderValue>,
    /// `None`: no timeout (Envoy's 0).
    pub timeout: Option<Duration>,
    /// Fields received that this proxy does not apply (retries, mirrors, ...), for the dump.
    pub ignored: Vec<&'static str>,
    /// The request hash for consistent-hash clusters (`hash_policy`).
    pub hash_policy: Vec<crate::balancer::HashPolicy>,
    /// The status when the chosen cluster does not exist (`cluster_not_found_response_code`:
    /// 503 by default, 404 or 500).
    pub cluster_not_found: u16,
    /// `retry_policy`: `None` means a single attempt.
    pub retry: Option<crate::retry::RetryPolicy>,
    /// `request_mirror_policies`.
    pub mirrors: Vec<crate::mirror::MirrorPolicy>,
}

#[derive(Debug)]
pub enum Targets {
    One(Target),
    Weighted {
        targets: Vec<(Target, u32)>,
        total: u64,
    },
}

/// One cluster a route may send to, with the operations of its `ClusterWeight`.
#[derive(Debug)]
pub struct Target {
    pub cluster: String,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub host_rewrite: Option<HeaderValue>,
}

impl Targets {
    /// The target for a random draw `r` (any u64), in proportion to the weights.
    pub fn pick(&self, r: u64) -> &Target {
        match self {
            Targets::One(t) => t,
            Targets::Weighted { targets, total } => {
                let mut point = r % total;
                for (t, w) in targets {
                    if point < u64::from(*w) {
                        return t;
                    }
                    point -= u64::from(*w);
                }
                // Unreachable: `total` is the sum of the weights. The last one is a safe answer.
                &targets[targets.len() - 1].0
            }
        }
    }

    pub fn clusters(&self) -> Vec<&str> {
        match self {
            Targets::One(t) => vec![&t.cluster],
            Targets::Weighted { targets, .. } => {
                targets.iter().map(|(t, _)| t.cluster.as_str()).collect()
            }
        }
    }
}

#[derive(Debug)]
pub struct Redirect {
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<PathRedirect>,
    strip_query: bool,
    pub status: u16,
}

#[derive(Debug)]
enum PathRedirect {
    Path(String),
    Prefix(String),
    Regex(Regex, String),
}

/// `request_headers_to_add` / `_remove` (or the response ones) of one level.
#[derive(Debug, Default)]
pub struct HeaderOps {
    remove: Vec<HeaderName>,
    add: Vec<HeaderOp>,
}

#[derive(Debug)]
struct HeaderOp {
    name: HeaderName,
    value: HeaderValue,
    action: AppendAction,
    keep_empty: bool,
}

/// Envoy's `HeaderValueOption.HeaderAppendAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Removals first, then additions, as Envoy's header parser does.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for op in &self.add {
            if op.value.is_empty() && !op.keep_empty {
                continue;
            }
            match op.action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(op.name.clone(), op.value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&op.name) {
                        headers.insert(op.name.clone(), op.value.clone());
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(op.name.clone(), op.value.clone());
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&op.name) {
                        headers.insert(op.name.clone(), op.value.clone());
                    }
                }
            }
        }
    }
}

impl RouteTable {
    /// The virtual host for an authority, as Envoy picks it: exact domain, then the longest
    /// `*.suffix`, then the longest `prefix.*`, then `*`.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let host = authority.to_ascii_lowercase();
        let without_port = strip_port(&host);
        let candidates: &[&str] = if self.ignore_port || without_port == host {
            &[without_port]
        } else {
            &[&host, without_port]
        };
        for h in candidates {
            if let Some(v) = self
                .virtual_hosts
                .iter()
                .find(|v| v.domains.iter().any(|d| d == h))
            {
                return Some(v);
            }
        }
        let mut best: Option<(&VirtualHost, usize)> = None;
        for h in candidates {
            for v in &self.virtual_hosts {
                for d in &v.domains {
                    if let Some(suffix) = d.strip_prefix('*')
                        && !suffix.is_empty()
                        && h.ends_with(suffix)
                        && h.len() > suffix.len()
                        && best.is_none_or(|(_, l)| suffix.len() > l)
                    {
                        best = Some((v, suffix.len()));
                    }
                }
            }
            if let Some((v, _)) = best {
                return Some(v);
            }
            for v in &self.virtual_hosts {
                for d in &v.domains {
                    if let Some(prefix) = d.strip_suffix('*')
                        && !prefix.is_empty()
                        && h.starts_with(prefix)
                        && h.len() > prefix.len()
                        && best.is_none_or(|(_, l)| prefix.len() > l)
                    {
                        best = Some((v, prefix.len()));
                    }
                }
            }
            if let Some((v, _)) = best {
                return Some(v);
            }
        }
        self.virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| d == "*"))
    }

    /// The virtual host and the first of its routes that matches.
    pub fn find(&self, req: &Request<'_>) -> Option<(&VirtualHost, &Route)> {
        let vh = self.virtual_host(req.authority)?;
        let route = vh.routes.iter().find(|r| r.matcher.matches(req))?;
        Some((vh, route))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return match host.rfind("]:") {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl RouteMatch {
    fn matches(&self, req: &Request<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(req.path, p, self.case_sensitive),
            PathMatch::Exact(p) => {
                let path = req.path_only();
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r) => r.is_match(req.path_only()),
            PathMatch::Separated(p) => {
                let path = req.path_only();
                starts_with(path, p, self.case_sensitive)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| q.matches(req.query()))
            && self.metadata.iter().all(|m| m.matches(req.source))
    }

    /// The length of `path` the route's prefix (or exact path) covers, for prefix rewrites.
    fn matched_len(&self, path_only: &str) -> usize {
        match &self.path {
            PathMatch::Prefix(p) | PathMatch::Separated(p) => p.len().min(path_only.len()),
            PathMatch::Exact(_) | PathMatch::Regex(_) => path_only.len(),
        }
    }
}

fn starts_with(s: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        s.starts_with(prefix)
    } else {
        s.len() >= prefix.len()
            && s.is_char_boundary(prefix.len())
            && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    }
}

impl HeaderMatcher {
    pub(crate) fn matches(&self, req: &Request<'_>) -> bool {
        let one = |value: &str| match &self.spec {
            HeaderSpec::Value(m) => m.matches(value),
            HeaderSpec::Range(start, end) => value
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| *start <= n && n < *end),
            HeaderSpec::Present(_) => true,
        };
        let hit = req.any_header_value(&self.name, one);
        if let HeaderSpec::Present(want) = self.spec {
            return (hit.is_some() == want) != self.invert;
        }
        let hit = match hit {
            Some(h) => h,
            None if self.missing_as_empty => one(""),
            // An absent header matches nothing, inverted or not (Envoy).
            None => return false,
        };
        hit != self.invert
    }
}

impl QueryMatcher {
    fn matches(&self, query: &str) -> bool {
        let value = query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == self.name).then_some(v)
        });
        match (&self.value, value) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(m), Some(v)) => m.matches(v),
        }
    }
}

impl MetadataMatcher {
    fn matches(&self, source: &Source) -> bool {
        let value = source.lookup(&self.filter, &self.path);
        let hit = match (&self.value, value) {
            (ValueMatch::String(m), Some(v)) => m.matches(v),
            (ValueMatch::String(_), None) => false,
            (ValueMatch::Present(want), v) => *want && v.is_some(),
        };
        hit != self.invert
    }
}

impl Route {
    /// The path to send upstream after `prefix_rewrite` / `regex_rewrite`, or `None` when the
    /// route rewrites nothing.
    pub fn rewritten_path(&self, forward: &Forward, path: &str) -> Option<String> {
        let (path_only, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let new = if let Some(prefix) = &forward.prefix_rewrite {
            let n = self.matcher.matched_len(path_only);
            let mut out = String::with_capacity(prefix.len() + path_only.len() - n);
            out.push_str(prefix);
            out.push_str(&path_only[n..]);
            out
        } else if let Some((re, sub)) = &forward.regex_rewrite {
            re.replace_all(path_only, sub.as_str()).into_owned()
        } else {
            return None;
        };
        Some(with_query(new, query))
    }

    /// The `location` of a redirect, built from the request as Envoy does.
    pub fn redirect_location(&self, r: &Redirect, req: &Request<'_>) -> String {
        let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
        let mut host = r.host.clone().unwrap_or_else(|| req.authority.to_string());
        if let Some(port) = r.port {
            host = format!("{}:{port}", strip_port(&host));
        } else if r.scheme.is_some() {
            // A scheme change drops a standard port (80, 443): it belonged to the old scheme.
            for default in [":80", ":443"] {
                if host.ends_with(default) {
                    host.truncate(host.len() - default.len());
                }
            }
        }
        let (path_only, query) = match req.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.path, None),
        };
        let query = if r.strip_query { None } else { query };
        let path = match &r.path {
            None => with_query(path_only.to_string(), query),
            // A path_redirect with its own query replaces the query too.
            Some(PathRedirect::Path(p)) if p.contains('?') => p.clone(),
            Some(PathRedirect::Path(p)) => with_query(p.clone(), query),
            Some(PathRedirect::Prefix(prefix)) => {
                let n = self.matcher.matched_len(path_only);
                with_query(format!("{prefix}{}", &path_only[n..]), query)
            }
            Some(PathRedirect::Regex(re, sub)) => {
                with_query(re.replace_all(path_only, sub.as_str()).into_owned(), query)
            }
        };
        format!("{scheme}://{host}{path}")
    }
}

fn with_query(mut path: String, query: Option<&str>) -> String {
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    path
}

// ---- compiling from Envoy's protos -------------------------------------------------------

/// Compile a `RouteConfiguration`; the error names the offending field.
pub fn compile(rc: &pb::RouteConfiguration) -> Result<RouteTable, String> {
    if rc.vhds.is_some() {
        return Err("vhds: on-demand virtual hosts are not supported".into());
    }
    let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        virtual_hosts
            .push(virtual_host(vh).map_err(|e| format!("virtual_hosts[{i}] ({:?}).{e}", vh.name))?);
    }
    Ok(RouteTable {
        name: rc.name.clone(),
        virtual_hosts,
        ignore_port: rc.ignore_port_in_host_matching,
        request_headers: header_ops(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            None,
        )
        .map_err(|e| format!("request_headers_to_add: {e}"))?,
        response_headers: header_ops(
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
            None,
        )
        .map_err(|e| format!("response_headers_to_add: {e}"))?,
    })
}

fn virtual_host(vh: &pb::VirtualHost) -> Result<VirtualHost, String> {
    if vh.matcher.is_some() {
        return Err("matcher: the generic matcher tree is not supported".into());
    }
    if vh.domains.is_empty() {
        return Err("domains: at least one domain is required".into());
    }
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        routes.push(route(r).map_err(|e| format!("routes[{i}] ({:?}).{e}", r.name))?);
    }
    if vh.retry_policy.is_some() || vh.retry_policy_typed_config.is_some() {
        return Err("retry_policy: only on routes (as pilot sends it)".into());
    }
    Ok(VirtualHost {
        name: vh.name.clone(),
        include_attempt_count: vh.include_request_attempt_count,
        filters: filter_configs(&vh.typed_per_filter_config)?,
        domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes,
        request_headers: header_ops(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            None,
        )
        .map_err(|e| format!("request_headers_to_add: {e}"))?,
        response_headers: header_ops(
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            None,
        )
        .map_err(|e| format!("response_headers_to_add: {e}"))?,
    })
}

fn route(r: &pb::Route) -> Result<Route, String> {
    let m = r.r#match.as_ref().ok_or("match: required")?;
    let matcher = route_match(m).map_err(|e| format!("match.{e}"))?;
    let action = match &r.action {
        Some(pb::route::Action::Route(a)) => Action::Forward(Box::new(
            forward(a, &matcher, &r.name).map_err(|e| format!("route.{e}"))?,
        )),
        Some(pb::route::Action::Redirect(a)) => {
            Action::Redirect(redirect(a, &matcher).map_err(|e| format!("redirect.{e}"))?)
        }
        Some(pb::route::Action::DirectResponse(d)) => {
            if !(200..=599).contains(&d.status) {
                return Err(format!(
                    "direct_response.status: {} is not in [200, 600)",
                    d.status
                ));
            }
            if d.body_format.is_some() {
                return Err("direct_response.body_format: not supported".into());
            }
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => bytes::Bytes::new(),
                Some(envoy_core::data_source::Specifier::InlineString(s)) => s.clone().into(),
                Some(envoy_core::data_source::Specifier::InlineBytes(b)) => b.clone().into(),
                Some(_) => {
                    return Err(
                        "direct_response.body: only inline_string and inline_bytes are supported"
                            .into(),
                    );
                }
            };
            Action::Direct {
                status: d.status as u16,
                body,
            }
        }
        Some(_) => return Err("action: only route, redirect and direct_response".into()),
        None => return Err("action: required".into()),
    };
    Ok(Route {
        name: r.name.clone(),
        filters: filter_configs(&r.typed_per_filter_config)?,
        matcher,
        action,
        request_headers: header_ops(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            Some(&r.name),
        )
        .map_err(|e| format!("request_headers_to_add: {e}"))?,
        response_headers: header_ops(
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
            Some(&r.name),
        )
        .map_err(|e| format!("response_headers_to_add: {e}"))?,
    })
}

/// Envoy's safe_regex: the whole value must match (RE2 FullMatch).
pub fn full_regex(m: &matcher::RegexMatcher) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{})$", m.regex)).map_err(|e| format!("bad regex {:?}: {e}", m.regex))
}

/// A regex for substitution (RE2 GlobalReplace) and its replacement, with RE2's `\1`
/// references turned into the regex crate's `${1}`.
fn substitution(m: &matcher::RegexMatchAndSubstitute) -> Result<(Regex, String), String> {
    let pattern = m.pattern.as_ref().ok_or("pattern: required")?;
    let re =
        Regex::new(&pattern.regex).map_err(|e| format!("bad regex {:?}: {e}", pattern.regex))?;
    let mut sub = String::with_capacity(m.substitution.len());
    let mut chars = m.substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(d) if d.is_ascii_digit() => {
                    sub.push_str("${");
                    sub.push(d);
                    sub.push('}');
                }
                Some(other) => sub.push(other),
                None => sub.push('\\'),
            },
            '$' => sub.push_str("$$"),
            c => sub.push(c),
        }
    }
    Ok((re, sub))
}

pub fn string_match(m: &matcher::StringMatcher) -> Result<StringMatch, String> {
    use matcher::string_matcher::MatchPattern;
    let pattern = match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => Pattern::Exact(s.clone()),
        Some(MatchPattern::Prefix(s)) => Pattern::Prefix(s.clone()),
        Some(MatchPattern::Suffix(s)) => Pattern::Suffix(s.clone()),
        Some(MatchPattern::Contains(s)) => Pattern::Contains(s.clone()),
        Some(MatchPattern::SafeRegex(r)) => Pattern::Regex(full_regex(r)?),
        Some(MatchPattern::Custom(_)) => return Err("custom string matchers: not supported".into()),
        None => return Err("string matcher without a pattern".into()),
    };
    Ok(StringMatch {
        pattern,
        ignore_case: m.ignore_case,
    })
}

fn route_match(m: &pb::RouteMatch) -> Result<RouteMatch, String> {
    use pb::route_match::PathSpecifier;
    let unsupported = [
        (m.runtime_fraction.is_some(), "runtime_fraction"),
        (!m.cookies.is_empty(), "cookies"),
        (m.grpc.is_some(), "grpc"),
        (m.tls_context.is_some(), "tls_context"),
        (!m.filter_state.is_empty(), "filter_state"),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(format!("{field}: not supported"));
    }
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => {
            PathMatch::Regex(full_regex(r).map_err(|e| format!("safe_regex: {e}"))?)
        }
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            if p.contains(['?', '#']) || p.ends_with('/') {
                return Err(format!(
                    "path_separated_prefix: {p:?} is not a valid prefix"
                ));
            }
            PathMatch::Separated(p.clone())
        }
        Some(_) => {
            return Err(
                "path_specifier: connect_matcher and path_match_policy are not supported".into(),
            );
        }
        None => return Err("path_specifier: required".into()),
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(header_matcher(h).map_err(|e| format!("headers[{i}] ({:?}): {e}", h.name))?);
    }
    let mut query = Vec::with_capacity(m.query_parameters.len());
    for (i, q) in m.query_parameters.iter().enumerate() {
        use pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let value = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => Some(
                string_match(s)
                    .map_err(|e| format!("query_parameters[{i}] ({:?}): {e}", q.name))?,
            ),
            Some(Q::PresentMatch(_)) | None => None,
        };
        query.push(QueryMatcher {
            name: q.name.clone(),
            value,
        });
    }
    let mut metadata = Vec::with_capacity(m.dynamic_metadata.len());
    for (i, d) in m.dynamic_metadata.iter().enumerate() {
        metadata.push(metadata_matcher(d).map_err(|e| format!("dynamic_metadata[{i}]: {e}"))?);
    }
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers,
        query,
        metadata,
    })
}

// The deprecated specifiers (exact_match, ...) are still sent by control planes; honour them.
#[allow(deprecated)]
pub(crate) fn header_matcher(h: &pb::HeaderMatcher) -> Result<HeaderMatcher, String> {
    use pb::header_matcher::HeaderMatchSpecifier as H;
    let exact = |p: Pattern| {
        HeaderSpec::Value(StringMatch {
            pattern: p,
            ignore_case: false,
        })
    };
    let spec = match &h.header_match_specifier {
        Some(H::ExactMatch(s)) => exact(Pattern::Exact(s.clone())),
        Some(H::PrefixMatch(s)) => exact(Pattern::Prefix(s.clone())),
        Some(H::SuffixMatch(s)) => exact(Pattern::Suffix(s.clone())),
        Some(H::ContainsMatch(s)) => exact(Pattern::Contains(s.clone())),
        Some(H::SafeRegexMatch(r)) => exact(Pattern::Regex(full_regex(r)?)),
        Some(H::StringMatch(s)) => HeaderSpec::Value(string_match(s)?),
        Some(H::PresentMatch(b)) => HeaderSpec::Present(*b),
        Some(H::RangeMatch(r)) => HeaderSpec::Range(r.start, r.end),
        // Envoy: no specifier means "present".
        None => HeaderSpec::Present(true),
    };
    if h.name.is_empty() {
        return Err("name: required".into());
    }
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        spec,
        invert: h.invert_match,
        missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn metadata_matcher(m: &matcher::MetadataMatcher) -> Result<MetadataMatcher, String> {
    use matcher::metadata_matcher::path_segment::Segment;
    use matcher::value_matcher::MatchPattern;
    let path = m
        .path
        .iter()
        .map(|s| match &s.segment {
            Some(Segment::Key(k)) => Ok(k.clone()),
            None => Err("path: a segment without a key".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let value = match m.value.as_ref().and_then(|v| v.match_pattern.as_ref()) {
        Some(MatchPattern::StringMatch(s)) => ValueMatch::String(string_match(s)?),
        Some(MatchPattern::PresentMatch(b)) => ValueMatch::Present(*b),
        Some(_) => return Err("value: only string_match and present_match are supported".into()),
        None => return Err("value: required".into()),
    };
    Ok(MetadataMatcher {
        filter: m.filter.clone(),
        path,
        value,
        invert: m.invert,
    })
}

#[allow(deprecated)] // `cors` on the route action is deprecated but may still arrive.
fn forward(a: &pb::RouteAction, matcher: &RouteMatch, route_name: &str) -> Result<Forward, String> {
    use pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let targets = match &a.cluster_specifier {
        Some(C::Cluster(c)) if !c.is_empty() => Targets::One(Target {
            cluster: c.clone(),
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            host_rewrite: None,
        }),
        Some(C::WeightedClusters(w)) => {
            weighted(w, route_name).map_err(|e| format!("weighted_clusters.{e}"))?
        }
        Some(C::Cluster(_)) => return Err("cluster: empty".into()),
        Some(_) => {
            return Err(
                "cluster_specifier: only cluster and weighted_clusters are supported".into(),
            );
        }
        None => return Err("cluster_specifier: required".into()),
    };
    let prefix_rewrite = (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone());
    if prefix_rewrite.is_some() && matches!(matcher.path, PathMatch::Regex(_)) {
        return Err("prefix_rewrite: cannot be used with a safe_regex path match".into());
    }
    let regex_rewrite = a
        .regex_rewrite
        .as_ref()
        .map(substitution)
        .transpose()
        .map_err(|e| format!("regex_rewrite.{e}"))?;
    if prefix_rewrite.is_some() && regex_rewrite.is_some() {
        return Err("prefix_rewrite and regex_rewrite: only one may be set".into());
    }
    if a.path_rewrite_policy.is_some() || !a.path_rewrite.is_empty() {
        return Err("path_rewrite_policy / path_rewrite: not supported".into());
    }
    let host_rewrite = match &a.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) => Some(
            HeaderValue::from_str(h)
                .map_err(|_| format!("host_rewrite_literal: {h:?} is not a valid header value"))?,
        ),
        None => None,
        Some(_) => {
            return Err("host_rewrite_specifier: only host_rewrite_literal is supported".into());
        }
    };
    let timeout = match &a.timeout {
        Some(d) if d.seconds > 0 || d.nanos > 0 => Some(Duration::new(
            u64::try_from(d.seconds).map_err(|_| "timeout: negative")?,
            u32::try_from(d.nanos).map_err(|_| "timeout: negative")?,
        )),
        _ => None,
    };
    if a.retry_policy_typed_config.is_some() {
        return Err("retry_policy_typed_config: not supported".into());
    }
    let retry = a
        .retry_policy
        .as_ref()
        .map(crate::retry::RetryPolicy::compile)
        .transpose()
        .map_err(|e| format!("retry_policy.{e}"))?;
    let mut mirrors = Vec::with_capacity(a.request_mirror_policies.len());
    for (i, m) in a.request_mirror_policies.iter().enumerate() {
        mirrors.push(
            crate::mirror::MirrorPolicy::compile(m)
                .map_err(|e| format!("request_mirror_policies[{i}].{e}"))?,
        );
    }
    let ignored_fields = [
        (a.cors.is_some(), "cors"),
        (a.hedge_policy.is_some(), "hedge_policy"),
        (a.idle_timeout.is_some(), "idle_timeout"),
        (a.max_stream_duration.is_some(), "max_stream_duration"),
    ];
    let hash_policy = crate::balancer::hash_policies(&a.hash_policy)?;
    use pb::route_action::ClusterNotFoundResponseCode as Nf;
    let cluster_not_found = match Nf::try_from(a.cluster_not_found_response_code) {
        Ok(Nf::ServiceUnavailable) => 503,
        Ok(Nf::NotFound) => 404,
        Ok(Nf::InternalServerError) => 500,
        Err(_) => {
            return Err(format!(
                "cluster_not_found_response_code: unknown value {}",
                a.cluster_not_found_response_code
            ));
        }
    };
    Ok(Forward {
        hash_policy,
        cluster_not_found,
        targets,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        ignored: ignored_fields
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, f)| *f)
            .collect(),
        retry,
        mirrors,
    })
}

fn weighted(w: &pb::WeightedCluster, route_name: &str) -> Result<Targets, String> {
    use pb::weighted_cluster::cluster_weight::HostRewriteSpecifier as H;
    if w.random_value_specifier.is_some() {
        return Err("random_value_specifier: not supported".into());
    }
    let mut targets = Vec::with_capacity(w.clusters.len());
    let mut total = 0u64;
    for (i, c) in w.clusters.iter().enumerate() {
        if c.name.is_empty() {
            return Err(format!(
                "clusters[{i}].name: required (cluster_header is not supported)"
            ));
        }
        let weight = c.weight.as_ref().map_or(0, |w| w.value);
        total += u64::from(weight);
        let host_rewrite = match &c.host_rewrite_specifier {
            Some(H::HostRewriteLiteral(h)) => Some(HeaderValue::from_str(h).map_err(|_| {
                format!("clusters[{i}].host_rewrite_literal: {h:?} is not a valid header value")
            })?),
            None => None,
        };
        targets.push((
            Target {
                cluster: c.name.clone(),
                request_headers: header_ops(
                    &c.request_headers_to_add,
                    &c.request_headers_to_remove,
                    Some(route_name),
                )
                .map_err(|e| format!("clusters[{i}].request_headers_to_add: {e}"))?,
                response_headers: header_ops(
                    &c.response_headers_to_add,
                    &c.response_headers_to_remove,
                    Some(route_name),
                )
                .map_err(|e| format!("clusters[{i}].response_headers_to_add: {e}"))?,
                host_rewrite,
            },
            weight,
        ));
    }
    if total == 0 {
        return Err("clusters: the weights add up to 0".into());
    }
    Ok(Targets::Weighted { targets, total })
}

fn redirect(r: &pb::RedirectAction, matcher: &RouteMatch) -> Result<Redirect, String> {
    use pb::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode, SchemeRewriteSpecifier as S,
    };
    let scheme = match &r.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        _ => None,
    };
    let path = match &r.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => Some(PathRedirect::Path(p.clone())),
        Some(P::PrefixRewrite(p)) => {
            if matches!(matcher.path, PathMatch::Regex(_)) {
                return Err("prefix_rewrite: cannot be used with a safe_regex path match".into());
            }
            Some(PathRedirect::Prefix(p.clone()))
        }
        Some(P::RegexRewrite(m)) => {
            let (re, sub) = substitution(m).map_err(|e| format!("regex_rewrite.{e}"))?;
            Some(PathRedirect::Regex(re, sub))
        }
        Some(P::PathRewrite(_)) => return Err("path_rewrite: not supported".into()),
        None => None,
    };
    let status = match RedirectResponseCode::try_from(r.response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => 301,
        Ok(RedirectResponseCode::Found) => 302,
        Ok(RedirectResponseCode::SeeOther) => 303,
        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => return Err(format!("response_code: unknown value {}", r.response_code)),
    };
    let port = match r.port_redirect {
        0 => None,
        p => Some(u16::try_from(p).map_err(|_| format!("port_redirect: {p} is not a port"))?),
    };
    Ok(Redirect {
        scheme,
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port,
        path,
        strip_query: r.strip_query,
        status,
    })
}

/// Envoy formats header values: `%%` is a literal `%`, and `%ROUTE_NAME%` is the route's name
/// (known here when the operations are the route's own). Other command operators (`%VAR%`,
/// evaluated per request by Envoy) are not supported and are sent as written.
fn header_value_text(raw: &str, route_name: Option<&str>) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("%%") {
            out.push('%');
            rest = after;
        } else if let (Some(after), Some(name)) = (rest.strip_prefix("%ROUTE_NAME%"), route_name) {
            out.push_str(name);
            rest = after;
        } else {
            out.push('%');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

// `append` is deprecated in favour of `append_action`, and still honoured when set.
#[allow(deprecated)]
/// `route_name`: the route the operations belong to (its own or one of its weighted
/// clusters'), for `%ROUTE_NAME%`; `None` for virtual host and route configuration levels.
fn header_ops(
    add: &[envoy_core::HeaderValueOption],
    remove: &[String],
    route_name: Option<&str>,
) -> Result<HeaderOps, String> {
    use envoy_core::header_value_option::HeaderAppendAction as A;
    let mut ops = HeaderOps::default();
    for name in remove {
        ops.remove.push(header_name(name)?);
    }
    for (i, o) in add.iter().enumerate() {
        let h = o
            .header
            .as_ref()
            .ok_or_else(|| format!("[{i}].header: required"))?;
        let name = header_name(&h.key).map_err(|e| format!("[{i}]: {e}"))?;
        let raw = if h.raw_value.is_empty() {
            h.value.as_bytes()
        } else {
            &h.raw_value[..]
        };
        let text = header_value_text(&String::from_utf8_lossy(raw), route_name);
        let value = HeaderValue::from_str(&text)
            .map_err(|_| format!("[{i}].header.value: not a valid value for {}", h.key))?;
        let action = match &o.append {
            Some(b) if b.value => AppendAction::AppendIfExistsOrAdd,
            Some(_) => AppendAction::OverwriteIfExistsOrAdd,
            None => match A::try_from(o.append_action) {
                Ok(A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
                Ok(A::AddIfAbsent) => AppendAction::AddIfAbsent,
                Ok(A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
                Ok(A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
                Err(_) => {
                    return Err(format!(
                        "[{i}].append_action: unknown value {}",
                        o.append_action
                    ));
                }
            },
        };
        ops.add.push(HeaderOp {
            name,
            value,
            action,
            keep_empty: o.keep_empty_value,
        });
    }
    Ok(ops)
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    let lower = name.to_ascii_lowercase();
    // Envoy refuses to let header operations touch pseudo-headers and Host.
    if lower.starts_with(':') || lower == "host" {
        return Err(format!(
            "header {name:?} cannot be modified (use a host rewrite)"
        ));
    }
    HeaderName::from_bytes(lower.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))
}

#[cfg(test)]
#[allow(deprecated)] // the tests build the deprecated specifiers control planes still send
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
    use matcher::string_matcher::MatchPattern;
    use pb::header_matcher::HeaderMatchSpecifier as H;
    use pb::route_match::PathSpecifier;

    fn regex(r: &str) -> matcher::RegexMatcher {
        matcher::RegexMatcher {
            regex: r.into(),
            engine_type: None,
        }
    }

    fn to(cluster: &str) -> Option<pb::route::Action> {
        Some(pb::route::Action::Route(pb::RouteAction {
            cluster_specifier: Some(pb::route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }))
    }

    fn route_with(m: pb::RouteMatch, action: Option<pb::route::Action>) -> pb::Route {
        pb::Route {
            name: "r".into(),
            r#match: Some(m),
            action,
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> pb::RouteMatch {
        pb::RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(p.into())),
            ..Default::default()
        }
    }

    fn table(routes: Vec<pb::Route>) -> RouteTable {
        compile(&pb::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![pb::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap()
    }

    struct Req {
        method: &'static str,
        path: &'static str,
        authority: &'static str,
        headers: HeaderMap,
        source: Source,
    }

    impl Req {
        fn new(path: &'static str) -> Req {
            Req {
                method: "GET",
                path,
                authority: "svc.ns.svc.cluster.local:80",
                headers: HeaderMap::new(),
                source: Source::default(),
            }
        }
        fn header(mut self, k: &'static str, v: &'static str) -> Req {
            self.headers.append(k, HeaderValue::from_static(v));
            self
        }
        fn view(&self) -> Request<'_> {
            Request {
                method: self.method,
                scheme: "http",
                authority: self.authority,
                path: self.path,
                headers: &self.headers,
                source: &self.source,
            }
        }
    }

    /// The name of the route matched, if any.
    fn hit(t: &RouteTable, r: &Req) -> Option<String> {
        t.find(&r.view()).map(|(_, r)| r.name.clone())
    }

    fn named(name: &str, m: pb::RouteMatch) -> pb::Route {
        pb::Route {
            name: name.into(),
            ..route_with(m, to("c"))
        }
    }

    #[test]
    fn path_exact_prefix_regex_and_case() {
        let t = table(vec![
            named(
                "exact",
                pb::RouteMatch {
                    path_specifier: Some(PathSpecifier::Path("/exact".into())),
                    ..Default::default()
                },
            ),
            named(
                "regex",
                pb::RouteMatch {
                    path_specifier: Some(PathSpecifier::SafeRegex(regex("/r/[0-9]+"))),
                    ..Default::default()
                },
            ),
            named(
                "nocase",
                pb::RouteMatch {
                    case_sensitive: Some(BoolValue { value: false }),
                    ..prefix("/Api")
                },
            ),
            named("root", prefix("/")),
        ]);
        assert_eq!(hit(&t, &Req::new("/exact")).unwrap(), "exact");
        assert_eq!(
            hit(&t, &Req::new("/exact?x=1")).unwrap(),
            "exact",
            "query ignored"
        );
        assert_eq!(hit(&t, &Req::new("/exact/more")).unwrap(), "root");
        assert_eq!(hit(&t, &Req::new("/r/123")).unwrap(), "regex");
        assert_eq!(
            hit(&t, &Req::new("/r/123x")).unwrap(),
            "root",
            "full match only"
        );
        assert_eq!(hit(&t, &Req::new("/x/r/123")).unwrap(), "root", "anchored");
        assert_eq!(hit(&t, &Req::new("/api/v1")).unwrap(), "nocase");
        assert_eq!(hit(&t, &Req::new("/APIs")).unwrap(), "nocase");
        let strict = table(vec![named("p", prefix("/Api"))]);
        assert_eq!(
            hit(&strict, &Req::new("/api")),
            None,
            "case-sensitive by default"
        );
    }

    #[test]
    fn path_separated_prefix() {
        let t = table(vec![named(
            "sep",
            pb::RouteMatch {
                path_specifier: Some(PathSpecifier::PathSeparatedPrefix("/a/b".into())),
                ..Default::default()
            },
        )]);
        assert!(hit(&t, &Req::new("/a/b")).is_some());
        assert!(hit(&t, &Req::new("/a/b/c")).is_some());
        assert!(hit(&t, &Req::new("/a/b?q")).is_some());
        assert!(hit(&t, &Req::new("/a/bc")).is_none());
    }

    fn header_route(h: pb::HeaderMatcher) -> RouteTable {
        table(vec![named(
            "h",
            pb::RouteMatch {
                headers: vec![h],
                ..prefix("/")
            },
        )])
    }

    fn hm(name: &str, spec: H) -> pb::HeaderMatcher {
        pb::HeaderMatcher {
            name: name.into(),
            header_match_specifier: Some(spec),
            ..Default::default()
        }
    }

    #[test]
    fn header_matchers() {
        let exact = header_route(hm("end-user", H::ExactMatch("jason".into())));
        assert!(hit(&exact, &Req::new("/").header("end-user", "jason")).is_some());
        assert!(hit(&exact, &Req::new("/").header("end-user", "jasonx")).is_none());
        assert!(hit(&exact, &Req::new("/")).is_none());

        let prefix_m = header_route(hm("x", H::PrefixMatch("ab".into())));
        assert!(hit(&prefix_m, &Req::new("/").header("x", "abc")).is_some());
        let suffix = header_route(hm("x", H::SuffixMatch("bc".into())));
        assert!(hit(&suffix, &Req::new("/").header("x", "abc")).is_some());
        assert!(hit(&suffix, &Req::new("/").header("x", "abd")).is_none());
        let re = header_route(hm("x", H::SafeRegexMatch(regex("v[12]"))));
        assert!(hit(&re, &Req::new("/").header("x", "v2")).is_some());
        assert!(hit(&re, &Req::new("/").header("x", "v21")).is_none());
        let range = header_route(hm(
            "x",
            H::RangeMatch(envoy_types::pb::envoy::r#type::v3::Int64Range { start: 10, end: 20 }),
        ));
        assert!(hit(&range, &Req::new("/").header("x", "10")).is_some());
        assert!(hit(&range, &Req::new("/").header("x", "20")).is_none());

        let sm = header_route(hm(
            "x",
            H::StringMatch(matcher::StringMatcher {
                ignore_case: true,
                match_pattern: Some(MatchPattern::Exact("Hello".into())),
            }),
        ));
        assert!(hit(&sm, &Req::new("/").header("x", "HELLO")).is_some());

        // Each value of a repeated header is matched on its own (Envoy 1.40), never their
        // `,`-joined concatenation; an inverted matcher fails if any value matches.
        let joined = header_route(hm("x", H::ExactMatch("a,b".into())));
        assert!(hit(&joined, &Req::new("/").header("x", "a").header("x", "b")).is_none());
        assert!(hit(&joined, &Req::new("/").header("x", "a,b")).is_some());
        let any = header_route(hm("x", H::ExactMatch("b".into())));
        assert!(hit(&any, &Req::new("/").header("x", "a").header("x", "b")).is_some());
        let mut not_b = hm("x", H::ExactMatch("b".into()));
        not_b.invert_match = true;
        let not_b = header_route(not_b);
        assert!(hit(&not_b, &Req::new("/").header("x", "a")).is_some());
        assert!(hit(&not_b, &Req::new("/").header("x", "a").header("x", "b")).is_none());

        let present = header_route(hm("x", H::PresentMatch(true)));
        assert!(hit(&present, &Req::new("/").header("x", "")).is_some());
        assert!(hit(&present, &Req::new("/")).is_none());
        let absent = header_route(hm("x", H::PresentMatch(false)));
        assert!(hit(&absent, &Req::new("/")).is_some());
        assert!(hit(&absent, &Req::new("/").header("x", "1")).is_none());
    }

    #[test]
    fn invert_and_missing_as_empty() {
        // withoutHeaders as Istio emits it.
        let without = header_route(pb::HeaderMatcher {
            invert_match: true,
            treat_missing_header_as_empty: true,
            ..hm("end-user", H::ExactMatch("jason".into()))
        });
        assert!(
            hit(&without, &Req::new("/")).is_some(),
            "missing counts as empty"
        );
        assert!(hit(&without, &Req::new("/").header("end-user", "bob")).is_some());
        assert!(hit(&without, &Req::new("/").header("end-user", "jason")).is_none());
        // Without treat_missing, an absent header matches nothing, inverted or not.
        let inverted = header_route(pb::HeaderMatcher {
            invert_match: true,
            ..hm("end-user", H::ExactMatch("jason".into()))
        });
        assert!(hit(&inverted, &Req::new("/")).is_none());
        // A regex against the empty value.
        let empty = header_route(pb::HeaderMatcher {
            treat_missing_header_as_empty: true,
            ..hm("x", H::SafeRegexMatch(regex("")))
        });
        assert!(hit(&empty, &Req::new("/")).is_some());
    }

    #[test]
    fn pseudo_headers() {
        let method = header_route(hm(":method", H::ExactMatch("POST".into())));
        let mut post = Req::new("/");
        post.method = "POST";
        assert!(hit(&method, &post).is_some());
        assert!(hit(&method, &Req::new("/")).is_none());
        let authority = header_route(hm(":authority", H::PrefixMatch("svc.ns".into())));
        assert!(hit(&authority, &Req::new("/")).is_some());
        let scheme = header_route(hm(":scheme", H::ExactMatch("https".into())));
        assert!(hit(&scheme, &Req::new("/")).is_none());
        let path = header_route(hm(":path", H::SuffixMatch("?debug".into())));
        assert!(hit(&path, &Req::new("/a?debug")).is_some());
    }

    #[test]
    fn query_parameters() {
        use pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let t = table(vec![named(
            "q",
            pb::RouteMatch {
                query_parameters: vec![
                    pb::QueryParameterMatcher {
                        name: "v".into(),
                        query_parameter_match_specifier: Some(Q::StringMatch(
                            matcher::StringMatcher {
                                ignore_case: false,
                                match_pattern: Some(MatchPattern::Exact("2".into())),
                            },
                        )),
                    },
                    pb::QueryParameterMatcher {
                        name: "debug".into(),
                        query_parameter_match_specifier: Some(Q::PresentMatch(true)),
                    },
                ],
                ..prefix("/")
            },
        )]);
        assert!(hit(&t, &Req::new("/a?v=2&debug")).is_some());
        assert!(hit(&t, &Req::new("/a?debug=1&v=2")).is_some());
        assert!(hit(&t, &Req::new("/a?v=3&debug")).is_none());
        assert!(hit(&t, &Req::new("/a?v=2")).is_none());
        assert!(hit(&t, &Req::new("/a")).is_none());
    }

    fn source_matcher(path: &[&str], value: &str) -> matcher::MetadataMatcher {
        use matcher::metadata_matcher::{PathSegment, path_segment::Segment};
        matcher::MetadataMatcher {
            filter: SOURCE_FILTER.into(),
            path: path
                .iter()
                .map(|k| PathSegment {
                    segment: Some(Segment::Key(k.to_string())),
                })
                .collect(),
            value: Some(matcher::ValueMatcher {
                match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(
                    matcher::StringMatcher {
                        ignore_case: false,
                        match_pattern: Some(MatchPattern::Exact(value.into())),
                    },
                )),
            }),
            invert: false,
        }
    }

    #[test]
    fn source_metadata() {
        let t = table(vec![
            named(
                "from-v2-in-test",
                pb::RouteMatch {
                    dynamic_metadata: vec![
                        source_matcher(&["labels", "version"], "v2"),
                        source_matcher(&["namespace"], "test"),
                    ],
                    ..prefix("/")
                },
            ),
            named("rest", prefix("/")),
        ]);
        let mut r = Req::new("/");
        r.source = Source {
            namespace: "test".into(),
            labels: [("version".to_string(), "v2".to_string())].into(),
        };
        assert_eq!(hit(&t, &r).unwrap(), "from-v2-in-test");
        r.source.namespace = "other".into();
        assert_eq!(hit(&t, &r).unwrap(), "rest");
        r.source = Source::default();
        assert_eq!(hit(&t, &r).unwrap(), "rest");
    }

    #[test]
    fn first_match_wins_and_virtual_hosts() {
        let t = table(vec![
            named("first", prefix("/a")),
            named("second", prefix("/a/b")),
        ]);
        assert_eq!(hit(&t, &Req::new("/a/b")).unwrap(), "first");
        let vhosts = compile(&pb::RouteConfiguration {
            virtual_hosts: ["exact.com", "*.wild.com", "pre.*", "*"]
                .iter()
                .map(|d| pb::VirtualHost {
                    name: d.to_string(),
                    domains: vec![d.to_string()],
                    routes: vec![named(d, prefix("/"))],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .unwrap();
        let vh = |a: &str| vhosts.virtual_host(a).unwrap().name.clone();
        assert_eq!(vh("exact.com"), "exact.com");
        assert_eq!(vh("EXACT.com:8080"), "exact.com");
        assert_eq!(vh("a.wild.com"), "*.wild.com");
        assert_eq!(vh("pre.x"), "pre.*");
        assert_eq!(vh("10.0.0.1:80"), "*");
    }

    #[test]
    fn header_values_as_envoy_formats_them() {
        assert_eq!(header_value_text("100%%", None), "100%");
        assert_eq!(header_value_text("%ROUTE_NAME%", Some("a.b")), "a.b");
        assert_eq!(
            header_value_text("x-%ROUTE_NAME%-%%-%ROUTE_NAME%", Some("r")),
            "x-r-%-r"
        );
        // Unknown here: written as sent.
        assert_eq!(header_value_text("%ROUTE_NAME%", None), "%ROUTE_NAME%");
        assert_eq!(
            header_value_text("%DOWNSTREAM_REMOTE_ADDRESS%", Some("r")),
            "%DOWNSTREAM_REMOTE_ADDRESS%"
        );
        assert_eq!(header_value_text("50%", Some("r")), "50%");
    }

    #[test]
    fn weighted_pick_in_proportion() {
        use pb::weighted_cluster::ClusterWeight;
        let w = |name: &str, weight: u32| ClusterWeight {
            name: name.into(),
            weight: Some(UInt32Value { value: weight }),
            ..Default::default()
        };
        let t = table(vec![route_with(
            prefix("/"),
            Some(pb::route::Action::Route(pb::RouteAction {
                cluster_specifier: Some(pb::route_action::ClusterSpecifier::WeightedClusters(
                    pb::WeightedCluster {
                        clusters: vec![w("a", 25), w("b", 75), w("zero", 0)],
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })),
        )]);
        let Action::Forward(f) = &t.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        let mut a = 0;
        for r in 0..100u64 {
            if f.targets.pick(r).cluster == "a" {
                a += 1;
            }
        }
        assert_eq!(a, 25);
        assert_eq!(f.targets.pick(99).cluster, "b");
    }

    #[test]
    fn cluster_not_found_status() {
        use pb::route_action::ClusterNotFoundResponseCode as Nf;
        for (code, status) in [
            (Nf::ServiceUnavailable, 503),
            (Nf::NotFound, 404),
            (Nf::InternalServerError, 500),
        ] {
            let t = forward_route(
                prefix("/"),
                pb::RouteAction {
                    cluster_not_found_response_code: code as i32,
                    ..Default::default()
                },
            );
            let Action::Forward(f) = &t.virtual_hosts[0].routes[0].action else {
                panic!()
            };
            assert_eq!(f.cluster_not_found, status);
        }
        let bad = pb::RouteConfiguration {
            virtual_hosts: vec![pb::VirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                routes: vec![route_with(
                    prefix("/"),
                    Some(pb::route::Action::Route(pb::RouteAction {
                        cluster_specifier: Some(pb::route_action::ClusterSpecifier::Cluster(
                            "c".into(),
                        )),
                        cluster_not_found_response_code: 9,
                        ..Default::default()
                    })),
                )],
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = compile(&bad).unwrap_err();
        assert!(
            e.contains("cluster_not_found_response_code: unknown value 9"),
            "{e}"
        );
    }

    fn forward_route(m: pb::RouteMatch, a: pb::RouteAction) -> RouteTable {
        table(vec![route_with(
            m,
            Some(pb::route::Action::Route(pb::RouteAction {
                cluster_specifier: Some(pb::route_action::ClusterSpecifier::Cluster("c".into())),
                ..a
            })),
        )])
    }

    fn rewrite(t: &RouteTable, path: &str) -> Option<String> {
        let route = &t.virtual_hosts[0].routes[0];
        let Action::Forward(f) = &route.action else {
            panic!()
        };
        route.rewritten_path(f, path)
    }

    #[test]
    fn prefix_and_regex_rewrite() {
        let t = forward_route(
            prefix("/old"),
            pb::RouteAction {
                prefix_rewrite: "/new".into(),
                ..Default::default()
            },
        );
        assert_eq!(rewrite(&t, "/old/x?q=1").unwrap(), "/new/x?q=1");
        let root = forward_route(
            prefix("/api/"),
            pb::RouteAction {
                prefix_rewrite: "/".into(),
                ..Default::default()
            },
        );
        assert_eq!(rewrite(&root, "/api/v1").unwrap(), "/v1");
        let exact = forward_route(
            pb::RouteMatch {
                path_specifier: Some(PathSpecifier::Path("/a".into())),
                ..Default::default()
            },
            pb::RouteAction {
                prefix_rewrite: "/b".into(),
                ..Default::default()
            },
        );
        assert_eq!(rewrite(&exact, "/a?z").unwrap(), "/b?z");
        let re = forward_route(
            prefix("/"),
            pb::RouteAction {
                regex_rewrite: Some(matcher::RegexMatchAndSubstitute {
                    pattern: Some(regex("^/service/([^/]+)(/.*)$")),
                    substitution: "\\2/instance/\\1".into(),
                }),
                ..Default::default()
            },
        );
        assert_eq!(
            rewrite(&re, "/service/foo/v1/api?x").unwrap(),
            "/v1/api/instance/foo?x"
        );
        let none = forward_route(prefix("/"), pb::RouteAction::default());
        assert_eq!(rewrite(&none, "/a"), None);
    }

    #[test]
    fn redirects() {
        use pb::redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
        let t = |r: pb::RedirectAction, m: pb::RouteMatch| {
            table(vec![route_with(m, Some(pb::route::Action::Redirect(r)))])
        };
        let location = |t: &RouteTable, req: &Req| {
            let (_, route) = t.find(&req.view()).unwrap();
            let Action::Redirect(r) = &route.action else {
                panic!()
            };
            (route.redirect_location(r, &req.view()), r.status)
        };
        let host_and_path = t(
            pb::RedirectAction {
                host_redirect: "new.example".into(),
                path_rewrite_specifier: Some(P::PathRedirect("/moved".into())),
                ..Default::default()
            },
            prefix("/"),
        );
        assert_eq!(
            location(&host_and_path, &Req::new("/old?a=1")),
            ("http://new.example/moved?a=1".to_string(), 301),
            "Envoy's default code is 301"
        );
        let https = t(
            pb::RedirectAction {
                scheme_rewrite_specifier: Some(S::HttpsRedirect(true)),
                response_code: pb::redirect_action::RedirectResponseCode::TemporaryRedirect as i32,
                strip_query: true,
                ..Default::default()
            },
            prefix("/"),
        );
        let mut req = Req::new("/p?q");
        req.authority = "web.example:80";
        assert_eq!(
            location(&https, &req),
            ("https://web.example/p".to_string(), 307)
        );
        let port_prefix = t(
            pb::RedirectAction {
                port_redirect: 8443,
                path_rewrite_specifier: Some(P::PrefixRewrite("/v2".into())),
                ..Default::default()
            },
            prefix("/v1"),
        );
        assert_eq!(
            location(&port_prefix, &Req::new("/v1/items")).0,
            "http://svc.ns.svc.cluster.local:8443/v2/items"
        );
    }

    #[test]
    fn direct_response() {
        let t = table(vec![route_with(
            prefix("/"),
            Some(pb::route::Action::DirectResponse(
                pb::DirectResponseAction {
                    status: 418,
                    body: Some(envoy_core::DataSource {
                        specifier: Some(envoy_core::data_source::Specifier::InlineString(
                            "teapot".into(),
                        )),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
        )]);
        match &t.virtual_hosts[0].routes[0].action {
            Action::Direct { status, body } => {
                assert_eq!((*status, &body[..]), (418, &b"teapot"[..]))
            }
            other => panic!("{other:?}"),
        }
    }

    fn hvo(k: &str, v: &str, append: Option<bool>, action: i32) -> envoy_core::HeaderValueOption {
        envoy_core::HeaderValueOption {
            header: Some(envoy_core::HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            append: append.map(|value| BoolValue { value }),
            append_action: action,
            keep_empty_value: false,
        }
    }

    #[test]
    fn header_operations_follow_append_action() {
        use envoy_core::header_value_option::HeaderAppendAction as A;
        let ops = header_ops(
            &[
                hvo("append", "2", None, A::AppendIfExistsOrAdd as i32),
                hvo("absent", "new", None, A::AddIfAbsent as i32),
                hvo("present", "new", None, A::AddIfAbsent as i32),
                hvo("overwrite", "new", None, A::OverwriteIfExistsOrAdd as i32),
                hvo("only-if", "new", None, A::OverwriteIfExists as i32),
                hvo("legacy", "new", Some(false), A::AppendIfExistsOrAdd as i32),
                hvo("empty", "", None, A::AppendIfExistsOrAdd as i32),
                hvo("pct", "100%%", None, A::AppendIfExistsOrAdd as i32),
            ],
            &["gone".to_string()],
            Some("r1"),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("append", "1"),
            ("present", "old"),
            ("overwrite", "old"),
            ("legacy", "old"),
            ("gone", "x"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        ops.apply(&mut h);
        let all = |k: &str| {
            h.get_all(k)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("append"), ["1", "2"]);
        assert_eq!(all("absent"), ["new"]);
        assert_eq!(all("present"), ["old"]);
        assert_eq!(all("overwrite"), ["new"]);
        assert!(all("only-if").is_empty());
        assert_eq!(all("legacy"), ["new"]);
        assert!(
            all("empty").is_empty(),
            "empty values are dropped unless kept"
        );
        assert_eq!(all("pct"), ["100%"]);
        assert!(all("gone").is_empty());
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        let bad_regex = compile(&pb::RouteConfiguration {
            virtual_hosts: vec![pb::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes: vec![named(
                    "bad",
                    pb::RouteMatch {
                        path_specifier: Some(PathSpecifier::SafeRegex(regex("(unclosed"))),
                        ..Default::default()
                    },
                )],
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            bad_regex.contains("routes[0] (\"bad\").match.safe_regex"),
            "{bad_regex}"
        );
        let host_header = header_ops(&[hvo(":authority", "x", None, 0)], &[], None).unwrap_err();
        assert!(host_header.contains("cannot be modified"), "{host_header}");
        let cookies = route_match(&pb::RouteMatch {
            cookies: vec![pb::CookieMatcher::default()],
            ..prefix("/")
        })
        .unwrap_err();
        assert!(cookies.contains("cookies"));
    }
}
