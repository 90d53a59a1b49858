//! Envoy's HTTP RBAC filter (`envoy.extensions.filters.http.rbac.v3.RBAC`) at the waypoint:
//! compiled once per config into matchers (regexes included), then evaluated per request with
//! no I/O and no allocation: the policies in name order, the ALLOW / DENY / LOG action, and
//! shadow rules evaluated alongside without effect. A denied request is answered as Envoy does:
//! 403 with the body `RBAC: access denied`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as envoy_core;
use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use prost::Message;
use regex::Regex;

use crate::route::{self, HeaderMatcher, StringMatch};

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
pub const NETWORK_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const URI_TEMPLATE_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig";
/// The filter state key Istio's waypoint keeps the HBONE peer identity under; ours answers it
/// from the tunnel's peer certificate.
pub const PEER_PRINCIPAL: &str = "io.istio.peer_principal";
/// Envoy's local reply body for a denied request.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// One RBAC filter of a connection manager.
#[derive(Debug)]
pub struct RbacFilter {
    /// `rules`: enforced. `None`: the filter enforces nothing.
    pub rules: Option<Engine>,
    /// `shadow_rules`: evaluated and counted, never enforced.
    pub shadow: Option<Engine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Log => "LOG",
        }
    }
}

#[derive(Debug)]
pub struct Engine {
    pub action: Action,
    /// In the lexicographic order of their names (Envoy's evaluation order): the first that
    /// matches is the effective policy.
    policies: Vec<(Arc<String>, Policy)>,
}

#[derive(Debug)]
struct Policy {
    permissions: Vec<Permission>,
    principals: Vec<Principal>,
}

#[derive(Debug)]
enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatcher),
    UrlPath(StringMatch),
    UriTemplate(Regex),
    DestinationIp(Cidr),
    DestinationPort(u32),
    /// `[start, end)`.
    DestinationPortRange(i64, i64),
    RequestedServerName(StringMatch),
    /// A metadata matcher: the waypoint has no dynamic metadata these could name, so the
    /// result is the matcher's `invert`.
    Constant(bool),
}

#[derive(Debug)]
enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// The peer's identity (the HBONE client certificate), `None`: any authenticated peer.
    Authenticated(Option<StringMatch>),
    /// `source_ip`, `direct_remote_ip`, `remote_ip`: the original client.
    ClientIp(Cidr),
    Header(HeaderMatcher),
    UrlPath(StringMatch),
    /// Filter state `io.istio.peer_principal`; another key is never present.
    FilterStatePeer(Option<StringMatch>),
    Constant(bool),
}

#[derive(Debug, Clone, Copy)]
struct Cidr {
    ip: IpAddr,
    len: u8,
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.ip, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// What a request offers the RBAC matchers.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub request: &'a route::Request<'a>,
    /// The HBONE peer's SPIFFE identity (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub peer: &'a str,
    /// The original client (the tunnel's `forwarded` client, else the HBONE peer).
    pub client: IpAddr,
    /// The CONNECT authority: the service address and port the client dialled.
    pub destination: SocketAddr,
}

/// One engine's answer for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub allowed: bool,
    /// The effective policy (the first that matched), if any.
    pub policy: Option<Arc<String>>,
}

impl Engine {
    /// The first policy (by name) that matches `s`.
    fn first_match(&self, s: &Subject<'_>) -> Option<&Arc<String>> {
        self.policies
            .iter()
            .find(|(_, p)| {
                p.permissions.iter().any(|x| x.matches(s))
                    && p.principals.iter().any(|x| x.matches(s))
            })
            .map(|(n, _)| n)
    }

    pub fn evaluate(&self, s: &Subject<'_>) -> Verdict {
        let matched = self.first_match(s).cloned();
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        Verdict {
            action: self.action,
            allowed,
            policy: matched,
        }
    }
}

impl Permission {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(v) => v.iter().all(|p| p.matches(s)),
            Permission::Or(v) => v.iter().any(|p| p.matches(s)),
            Permission::Not(p) => !p.matches(s),
            Permission::Header(h) => h.matches(s.request),
            Permission::UrlPath(m) => m.matches(url_path(s.request)),
            Permission::UriTemplate(r) => r.is_match(url_path(s.request)),
            Permission::DestinationIp(c) => c.contains(s.destination.ip()),
            Permission::DestinationPort(p) => u32::from(s.destination.port()) == *p,
            Permission::DestinationPortRange(start, end) => {
                let p = i64::from(s.destination.port());
                *start <= p && p < *end
            }
            // No TLS inside the tunnel: no server name.
            Permission::RequestedServerName(m) => m.matches(""),
            Permission::Constant(b) => *b,
        }
    }
}

impl Principal {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(v) => v.iter().all(|p| p.matches(s)),
            Principal::Or(v) => v.iter().any(|p| p.matches(s)),
            Principal::Not(p) => !p.matches(s),
            Principal::Authenticated(None) => true,
            Principal::Authenticated(Some(m)) => m.matches(s.peer),
            Principal::ClientIp(c) => c.contains(s.client),
            Principal::Header(h) => h.matches(s.request),
            Principal::UrlPath(m) => m.matches(url_path(s.request)),
            Principal::FilterStatePeer(Some(m)) => m.matches(s.peer),
            Principal::FilterStatePeer(None) => false,
            Principal::Constant(b) => *b,
        }
    }
}

/// The path Envoy's `url_path` compares: without the query and the fragment.
fn url_path<'a>(r: &'a route::Request<'a>) -> &'a str {
    let p = r.path_only();
    p.split_once('#').map_or(p, |(p, _)| p)
}

/// Run `filters` in order, as Envoy's filter chain does: the first denial stops the request
/// and is returned. `seen` is told every verdict (shadow ones with `true`), for metrics and
/// logs. Nothing is allocated.
pub fn check(
    filters: &[RbacFilter],
    s: &Subject<'_>,
    mut seen: impl FnMut(&Verdict, bool),
) -> Option<Verdict> {
    for f in filters {
        if let Some(shadow) = &f.shadow {
            seen(&shadow.evaluate(s), true);
        }
        if let Some(rules) = &f.rules {
            let v = rules.evaluate(s);
            seen(&v, false);
            if !v.allowed {
                return Some(v);
            }
        }
    }
    None
}

/// Compile one `typed_config` of the RBAC filter.
pub fn compile(any_value: &[u8]) -> Result<RbacFilter, String> {
    let c = http_rbac::Rbac::decode(any_value).map_err(|e| format!("undecodable RBAC: {e}"))?;
    if c.matcher.is_some() || c.shadow_matcher.is_some() {
        return Err("matcher / shadow_matcher: not supported (use rules)".into());
    }
    let rules = c
        .rules
        .as_ref()
        .map(engine)
        .transpose()
        .map_err(|e| format!("rules.{e}"))?;
    let shadow = c
        .shadow_rules
        .as_ref()
        .map(engine)
        .transpose()
        .map_err(|e| format!("shadow_rules.{e}"))?;
    Ok(RbacFilter { rules, shadow })
}

/// Compile one network RBAC filter (before a TCP listener's tcp_proxy). It is evaluated once,
/// when the connection arrives: nothing it could match changes during a tunnel, so Envoy's
/// ONE_TIME_ON_FIRST_BYTE and CONTINUOUS enforcement agree.
pub fn compile_network(any_value: &[u8]) -> Result<RbacFilter, String> {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as network_rbac;
    let c = network_rbac::Rbac::decode(any_value)
        .map_err(|e| format!("undecodable network RBAC: {e}"))?;
    if c.matcher.is_some() || c.shadow_matcher.is_some() {
        return Err("matcher / shadow_matcher: not supported (use rules)".into());
    }
    if c.stat_prefix.is_empty() {
        return Err("stat_prefix: required".into());
    }
    let rules = c
        .rules
        .as_ref()
        .map(engine)
        .transpose()
        .map_err(|e| format!("rules.{e}"))?;
    let shadow = c
        .shadow_rules
        .as_ref()
        .map(engine)
        .transpose()
        .map_err(|e| format!("shadow_rules.{e}"))?;
    Ok(RbacFilter { rules, shadow })
}

fn engine(r: &pb::Rbac) -> Result<Engine, String> {
    let action = match pb::rbac::Action::try_from(r.action) {
        Ok(pb::rbac::Action::Allow) => Action::Allow,
        Ok(pb::rbac::Action::Deny) => Action::Deny,
        Ok(pb::rbac::Action::Log) => Action::Log,
        Err(_) => return Err(format!("action: unknown value {}", r.action)),
    };
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let p = &r.policies[name];
        let at = |e: String| format!("policies[{name:?}].{e}");
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(at("condition: CEL conditions are not supported".into()));
        }
        let permissions = p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| permission(x).map_err(|e| at(format!("permissions[{i}]{e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let principals = p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| principal(x).map_err(|e| at(format!("principals[{i}]{e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if permissions.is_empty() || principals.is_empty() {
            return Err(at(
                "a policy needs at least one permission and one principal".into(),
            ));
        }
        policies.push((
            Arc::new(name.clone()),
            Policy {
                permissions,
                principals,
            },
        ));
    }
    Ok(Engine { action, policies })
}

fn string(m: &matcher::StringMatcher) -> Result<StringMatch, String> {
    route::string_match(m)
}

fn cidr(c: &envoy_core::CidrRange) -> Result<Cidr, String> {
    let ip: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", c.address_prefix))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(max, |l| l.value);
    if len > max {
        return Err(format!("prefix_len {len} is longer than the address"));
    }
    Ok(Cidr { ip, len: len as u8 })
}

fn path_matcher(p: &matcher::PathMatcher) -> Result<StringMatch, String> {
    match &p.rule {
        Some(matcher::path_matcher::Rule::Path(m)) => string(m),
        None => Err(": path required".into()),
    }
}

/// Envoy's URI template (`/a/*/b`, `/a/**`, `{name}`, `{name=*}`, `{name=**}`) as a regex on
/// the path: `*` one segment, `**` any rest (the last operator only).
fn uri_template(c: &envoy_core::TypedExtensionConfig) -> Result<Regex, String> {
    let any = c.typed_config.as_ref().ok_or("typed_config: required")?;
    if any.type_url != URI_TEMPLATE_TYPE_URL {
        return Err(format!("typed_config: unsupported type {}", any.type_url));
    }
    let t = UriTemplateMatchConfig::decode(&any.value[..])
        .map_err(|e| format!("undecodable UriTemplateMatchConfig: {e}"))?;
    template_regex(&t.path_template)
}

const PCHAR: &str = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]";

pub fn template_regex(template: &str) -> Result<Regex, String> {
    let bad = |why: &str| format!("path_template {template:?}: {why}");
    let body = template
        .strip_prefix('/')
        .ok_or_else(|| bad("must start with /"))?;
    let segments: Vec<&str> = body.split('/').collect();
    let mut re = String::from("^");
    for (i, seg) in segments.iter().enumerate() {
        re.push('/');
        let op = match *seg {
            "*" | "**" => Some(*seg),
            s if s.starts_with('{') && s.ends_with('}') => {
                let inner = &s[1..s.len() - 1];
                match inner.split_once('=') {
                    None => Some("*"),
                    Some((_, "*")) => Some("*"),
                    Some((_, "**")) => Some("**"),
                    Some(_) => return Err(bad("only * and ** variables are supported")),
                }
            }
            _ => None,
        };
        match op {
            Some("*") => {
                re.push_str(PCHAR);
                re.push('+');
            }
            Some(_) => {
                if i + 1 != segments.len() {
                    return Err(bad("** must be the last operator"));
                }
                re.push_str(&format!("(?:{PCHAR}|/)*"));
            }
            None => {
                if seg.contains(['*', '{', '}']) {
                    return Err(bad("operators must be whole segments"));
                }
                re.push_str(&regex::escape(seg));
            }
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| bad(&e.to_string()))
}

#[allow(deprecated)]
fn permission(p: &pb::Permission) -> Result<Permission, String> {
    use pb::permission::Rule as R;
    Ok(match &p.rule {
        Some(R::Any(true)) => Permission::Any,
        Some(R::Any(false)) => return Err(".any: must be true".into()),
        Some(R::AndRules(set)) => Permission::And(permissions(&set.rules, "and_rules")?),
        Some(R::OrRules(set)) => Permission::Or(permissions(&set.rules, "or_rules")?),
        Some(R::NotRule(p)) => Permission::Not(Box::new(
            permission(p).map_err(|e| format!(".not_rule{e}"))?,
        )),
        Some(R::Header(h)) => {
            Permission::Header(route::header_matcher(h).map_err(|e| format!(".header.{e}"))?)
        }
        Some(R::UrlPath(m)) => {
            Permission::UrlPath(path_matcher(m).map_err(|e| format!(".url_path{e}"))?)
        }
        Some(R::UriTemplate(c)) => {
            Permission::UriTemplate(uri_template(c).map_err(|e| format!(".uri_template.{e}"))?)
        }
        Some(R::DestinationIp(c)) => {
            Permission::DestinationIp(cidr(c).map_err(|e| format!(".destination_ip: {e}"))?)
        }
        Some(R::DestinationPort(p)) => Permission::DestinationPort(*p),
        Some(R::DestinationPortRange(r)) => {
            Permission::DestinationPortRange(i64::from(r.start), i64::from(r.end))
        }
        Some(R::RequestedServerName(m)) => Permission::RequestedServerName(
            string(m).map_err(|e| format!(".requested_server_name: {e}"))?,
        ),
        Some(R::Metadata(m)) => Permission::Constant(m.invert),
        Some(R::Matcher(_)) | Some(R::SourcedMetadata(_)) => {
            return Err(": matcher / sourced_metadata rules are not supported".into());
        }
        None => return Err(": a rule is required".into()),
    })
}

fn permissions(v: &[pb::Permission], field: &str) -> Result<Vec<Permission>, String> {
    v.iter()
        .enumerate()
        .map(|(i, p)| permission(p).map_err(|e| format!(".{field}.rules[{i}]{e}")))
        .collect()
}

#[allow(deprecated)]
fn principal(p: &pb::Principal) -> Result<Principal, String> {
    use pb::principal::Identifier as I;
    Ok(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::Any(false)) => return Err(".any: must be true".into()),
        Some(I::AndIds(set)) => Principal::And(principals(&set.ids, "and_ids")?),
        Some(I::OrIds(set)) => Principal::Or(principals(&set.ids, "or_ids")?),
        Some(I::NotId(p)) => {
            Principal::Not(Box::new(principal(p).map_err(|e| format!(".not_id{e}"))?))
        }
        Some(I::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(string)
                .transpose()
                .map_err(|e| format!(".authenticated.principal_name: {e}"))?,
        ),
        Some(I::SourceIp(c)) | Some(I::DirectRemoteIp(c)) | Some(I::RemoteIp(c)) => {
            Principal::ClientIp(cidr(c).map_err(|e| format!(": {e}"))?)
        }
        Some(I::Header(h)) => {
            Principal::Header(route::header_matcher(h).map_err(|e| format!(".header.{e}"))?)
        }
        Some(I::UrlPath(m)) => {
            Principal::UrlPath(path_matcher(m).map_err(|e| format!(".url_path{e}"))?)
        }
        Some(I::FilterState(f)) => {
            use matcher::filter_state_matcher::Matcher as M;
            let m = match &f.matcher {
                Some(M::StringMatch(m)) => {
                    string(m).map_err(|e| format!(".filter_state.string_match: {e}"))?
                }
                Some(M::AddressMatch(_)) => {
                    return Err(".filter_state.address_match: not supported".into());
                }
                None => return Err(".filter_state: a matcher is required".into()),
            };
            Principal::FilterStatePeer((f.key == PEER_PRINCIPAL).then_some(m))
        }
        Some(I::Metadata(m)) => Principal::Constant(m.invert),
        Some(I::SourcedMetadata(_)) | Some(I::Custom(_)) => {
            return Err(": sourced_metadata / custom principals are not supported".into());
        }
        None => return Err(": an identifier is required".into()),
    })
}

fn principals(v: &[pb::Principal], field: &str) -> Result<Vec<Principal>, String> {
    v.iter()
        .enumerate()
        .map(|(i, p)| principal(p).map_err(|e| format!(".{field}.ids[{i}]{e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3 as route_pb;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use http::HeaderMap;
    use matcher::string_matcher::MatchPattern as P;
    use pb::permission::Rule as R;
    use pb::principal::Identifier as I;

    fn sm(p: P) -> matcher::StringMatcher {
        matcher::StringMatcher {
            match_pattern: Some(p),
            ignore_case: false,
        }
    }
    fn exact(v: &str) -> matcher::StringMatcher {
        sm(P::Exact(v.into()))
    }
    fn perm(r: R) -> pb::Permission {
        pb::Permission { rule: Some(r) }
    }
    fn id(i: I) -> pb::Principal {
        pb::Principal {
            identifier: Some(i),
        }
    }
    fn header(name: &str, m: matcher::StringMatcher) -> route_pb::HeaderMatcher {
        route_pb::HeaderMatcher {
            name: name.into(),
            header_match_specifier: Some(
                route_pb::header_matcher::HeaderMatchSpecifier::StringMatch(m),
            ),
            ..Default::default()
        }
    }
    fn path(m: matcher::StringMatcher) -> pb::Permission {
        perm(R::UrlPath(matcher::PathMatcher {
            rule: Some(matcher::path_matcher::Rule::Path(m)),
        }))
    }
    fn peer(m: matcher::StringMatcher) -> pb::Principal {
        id(I::FilterState(matcher::FilterStateMatcher {
            key: PEER_PRINCIPAL.into(),
            matcher: Some(matcher::filter_state_matcher::Matcher::StringMatch(m)),
        }))
    }
    fn policy(permissions: Vec<pb::Permission>, principals: Vec<pb::Principal>) -> pb::Policy {
        pb::Policy {
            permissions,
            principals,
            ..Default::default()
        }
    }
    fn any_id() -> pb::Principal {
        id(I::Any(true))
    }
    fn any_perm() -> pb::Permission {
        perm(R::Any(true))
    }
    fn rules(action: pb::rbac::Action, policies: Vec<(&str, pb::Policy)>) -> pb::Rbac {
        pb::Rbac {
            action: action as i32,
            policies: policies
                .into_iter()
                .map(|(n, p)| (n.to_string(), p))
                .collect(),
            ..Default::default()
        }
    }
    fn filter(rules: Option<pb::Rbac>, shadow: Option<pb::Rbac>) -> RbacFilter {
        compile(
            &http_rbac::Rbac {
                rules,
                shadow_rules: shadow,
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .unwrap()
    }

    /// A request: method, path, headers; the peer and client are fixed unless given.
    struct Req {
        method: &'static str,
        path: &'static str,
        authority: &'static str,
        headers: HeaderMap,
        peer: &'static str,
        client: IpAddr,
        port: u16,
    }

    fn req(method: &'static str, path: &'static str) -> Req {
        Req {
            method,
            path,
            authority: "web.shop.svc.cluster.local",
            headers: HeaderMap::new(),
            peer: "spiffe://cluster.local/ns/shop/sa/sleep",
            client: "10.0.0.5".parse().unwrap(),
            port: 80,
        }
    }

    fn with<T>(r: &Req, f: impl FnOnce(&Subject<'_>) -> T) -> T {
        let source = route::Source::default();
        let view = route::Request {
            method: r.method,
            scheme: "http",
            authority: r.authority,
            path: r.path,
            headers: &r.headers,
            source: &source,
        };
        let s = Subject {
            request: &view,
            peer: r.peer,
            client: r.client,
            destination: SocketAddr::new("10.96.0.1".parse().unwrap(), r.port),
        };
        f(&s)
    }

    fn allowed(filters: &[RbacFilter], r: &Req) -> bool {
        with(r, |s| check(filters, s, |_, _| {}).is_none())
    }

    #[test]
    fn actions_and_effective_policy_in_name_order() {
        let both = vec![
            ("b", policy(vec![any_perm()], vec![any_id()])),
            ("a", policy(vec![path(exact("/x"))], vec![any_id()])),
        ];
        let allow = filter(Some(rules(pb::rbac::Action::Allow, both)), None);
        let v = with(&req("GET", "/x"), |s| {
            allow.rules.as_ref().unwrap().evaluate(s)
        });
        assert!(v.allowed);
        assert_eq!(
            v.policy.as_deref().map(String::as_str),
            Some("a"),
            "a before b"
        );
        let v = with(&req("GET", "/y"), |s| {
            allow.rules.as_ref().unwrap().evaluate(s)
        });
        assert_eq!(v.policy.as_deref().map(String::as_str), Some("b"));

        // ALLOW with nothing matching denies; DENY matching denies; LOG never denies.
        let allow_x = filter(
            Some(rules(
                pb::rbac::Action::Allow,
                vec![("x", policy(vec![path(exact("/x"))], vec![any_id()]))],
            )),
            None,
        );
        assert!(allowed(std::slice::from_ref(&allow_x), &req("GET", "/x")));
        let denied = with(&req("GET", "/y"), |s| {
            check(std::slice::from_ref(&allow_x), s, |_, _| {})
        });
        assert_eq!(denied.unwrap().policy, None, "denied by no policy (`none`)");
        let deny_x = filter(
            Some(rules(
                pb::rbac::Action::Deny,
                vec![("x", policy(vec![path(exact("/x"))], vec![any_id()]))],
            )),
            None,
        );
        assert!(!allowed(std::slice::from_ref(&deny_x), &req("GET", "/x")));
        assert!(allowed(std::slice::from_ref(&deny_x), &req("GET", "/y")));
        let log = filter(
            Some(rules(
                pb::rbac::Action::Log,
                vec![("x", policy(vec![any_perm()], vec![any_id()]))],
            )),
            None,
        );
        assert!(allowed(std::slice::from_ref(&log), &req("GET", "/x")));
        // No rules at all: nothing enforced.
        assert!(allowed(&[filter(None, None)], &req("GET", "/x")));
    }

    #[test]
    fn deny_filter_runs_before_allow_and_stops_the_chain() {
        let deny = filter(
            Some(rules(
                pb::rbac::Action::Deny,
                vec![(
                    "d",
                    policy(vec![path(sm(P::Prefix("/admin".into())))], vec![any_id()]),
                )],
            )),
            None,
        );
        let allow = filter(
            Some(rules(
                pb::rbac::Action::Allow,
                vec![("a", policy(vec![any_perm()], vec![any_id()]))],
            )),
            None,
        );
        let filters = [deny, allow];
        let mut seen = Vec::new();
        let denied = with(&req("GET", "/admin/x"), |s| {
            check(&filters, s, |v, shadow| {
                seen.push((v.action, v.allowed, shadow))
            })
        });
        assert_eq!(
            denied.unwrap().policy.as_deref().map(String::as_str),
            Some("d")
        );
        assert_eq!(
            seen,
            [(Action::Deny, false, false)],
            "the ALLOW filter never ran"
        );
        assert!(allowed(&filters, &req("GET", "/public")));
    }

    #[test]
    fn shadow_rules_are_counted_never_enforced() {
        let f = filter(
            None,
            Some(rules(
                pb::rbac::Action::Deny,
                vec![("s", policy(vec![any_perm()], vec![any_id()]))],
            )),
        );
        let mut seen = Vec::new();
        let denied = with(&req("GET", "/"), |s| {
            check(std::slice::from_ref(&f), s, |v, shadow| {
                seen.push((v.allowed, shadow))
            })
        });
        assert!(denied.is_none());
        assert_eq!(seen, [(false, true)]);
    }

    #[test]
    fn permissions_headers_paths_templates_ports_and_not() {
        let allow = |p: pb::Permission| {
            filter(
                Some(rules(
                    pb::rbac::Action::Allow,
                    vec![("p", policy(vec![p], vec![any_id()]))],
                )),
                None,
            )
        };
        // url_path ignores the query string; a suffix and a regex.
        let f = allow(path(exact("/a")));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/a?q=1")));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/a/")));
        let f = allow(path(sm(P::Suffix("/x".into()))));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/a/x")));
        let f = allow(path(sm(P::SafeRegex(matcher::RegexMatcher {
            regex: ".+".into(),
            engine_type: None,
        }))));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/")));
        // :method and :authority (ignore_case) are headers.
        let f = allow(perm(R::Header(header(":method", exact("POST")))));
        assert!(allowed(std::slice::from_ref(&f), &req("POST", "/")));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/")));
        let mut host = sm(P::Suffix(".CLUSTER.local".into()));
        host.ignore_case = true;
        let f = allow(perm(R::Header(header(":authority", host))));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/")));
        // Not: everything but /a.
        let f = allow(perm(R::NotRule(Box::new(path(exact("/a"))))));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/a")));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/b")));
        // And / or.
        let f = allow(perm(R::AndRules(pb::permission::Set {
            rules: vec![
                perm(R::Header(header(":method", exact("GET")))),
                perm(R::OrRules(pb::permission::Set {
                    rules: vec![path(exact("/1")), path(exact("/2"))],
                })),
            ],
        })));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/2")));
        assert!(!allowed(std::slice::from_ref(&f), &req("PUT", "/2")));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/3")));
        // Destination port (the CONNECT authority's).
        let f = allow(perm(R::DestinationPort(80)));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/")));
        let mut r = req("GET", "/");
        r.port = 81;
        assert!(!allowed(std::slice::from_ref(&f), &r));
        // A request header.
        let f = allow(perm(R::Header(header(
            "x-user",
            sm(P::Prefix("adm".into())),
        ))));
        let mut r = req("GET", "/");
        r.headers.insert("x-user", "admin".parse().unwrap());
        assert!(allowed(std::slice::from_ref(&f), &r));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/")));
        // A URI template: `*` one segment, `**` the rest.
        let template = |t: &str| {
            perm(R::UriTemplate(envoy_core::TypedExtensionConfig {
                name: "envoy.path.match.uri_template.uri_template_matcher".into(),
                typed_config: Some(envoy_types::pb::google::protobuf::Any {
                    type_url: URI_TEMPLATE_TYPE_URL.into(),
                    value: UriTemplateMatchConfig {
                        path_template: t.into(),
                    }
                    .encode_to_vec(),
                }),
            }))
        };
        let f = allow(template("/api/*/items"));
        assert!(allowed(
            std::slice::from_ref(&f),
            &req("GET", "/api/v1/items?x=1")
        ));
        assert!(!allowed(
            std::slice::from_ref(&f),
            &req("GET", "/api/v1/v2/items")
        ));
        assert!(!allowed(
            std::slice::from_ref(&f),
            &req("GET", "/api//items")
        ));
        let f = allow(template("/static/**"));
        assert!(allowed(
            std::slice::from_ref(&f),
            &req("GET", "/static/a/b.css")
        ));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/other")));
        assert!(template_regex("/**/x").is_err(), "** must be last");
        assert!(template_regex("/a*").is_err());
        assert!(template_regex("/{v}/x").unwrap().is_match("/1/x"));
    }

    #[test]
    fn principals_peer_identity_client_ip_and_not() {
        let allow = |p: pb::Principal| {
            filter(
                Some(rules(
                    pb::rbac::Action::Allow,
                    vec![("p", policy(vec![any_perm()], vec![p]))],
                )),
                None,
            )
        };
        let f = allow(peer(exact("spiffe://cluster.local/ns/shop/sa/sleep")));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/")));
        let mut other = req("GET", "/");
        other.peer = "spiffe://cluster.local/ns/other/sa/sleep";
        assert!(!allowed(std::slice::from_ref(&f), &other));
        // Namespaces as Istio writes them: a regex on the identity.
        let f = allow(peer(sm(P::SafeRegex(matcher::RegexMatcher {
            regex: ".*/ns/shop/.*".into(),
            engine_type: None,
        }))));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/")));
        assert!(!allowed(std::slice::from_ref(&f), &other));
        // Another filter state key is never present.
        let f = allow(id(I::FilterState(matcher::FilterStateMatcher {
            key: "other".into(),
            matcher: Some(matcher::filter_state_matcher::Matcher::StringMatch(exact(
                "x",
            ))),
        })));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/")));
        // authenticated: the peer certificate's identity.
        let f = allow(id(I::Authenticated(pb::principal::Authenticated {
            principal_name: Some(sm(P::Prefix("spiffe://cluster.local/ns/shop/".into()))),
        })));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/")));
        // Client address blocks, IPv4 and IPv6 (IPv4-mapped clients compare as IPv4).
        let block = |ip: &str, len: u32| {
            id(I::DirectRemoteIp(envoy_core::CidrRange {
                address_prefix: ip.into(),
                prefix_len: Some(UInt32Value { value: len }),
            }))
        };
        let f = allow(block("10.0.0.0", 24));
        assert!(allowed(std::slice::from_ref(&f), &req("GET", "/")));
        let mut mapped = req("GET", "/");
        mapped.client = "::ffff:10.0.0.9".parse().unwrap();
        assert!(allowed(std::slice::from_ref(&f), &mapped));
        let mut far = req("GET", "/");
        far.client = "10.0.1.5".parse().unwrap();
        assert!(!allowed(std::slice::from_ref(&f), &far));
        let f = allow(block("fd00::", 8));
        let mut v6 = req("GET", "/");
        v6.client = "fd12::1".parse().unwrap();
        assert!(allowed(std::slice::from_ref(&f), &v6));
        let f = allow(block("0.0.0.0", 0));
        assert!(allowed(std::slice::from_ref(&f), &far));
        // not_id.
        let f = allow(id(I::NotId(Box::new(block("10.0.0.0", 24)))));
        assert!(!allowed(std::slice::from_ref(&f), &req("GET", "/")));
        assert!(allowed(std::slice::from_ref(&f), &far));
    }

    #[test]
    fn unsupported_config_is_refused() {
        let bad = |p: pb::Policy| {
            compile(
                &http_rbac::Rbac {
                    rules: Some(rules(pb::rbac::Action::Allow, vec![("p", p)])),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .unwrap_err()
        };
        let e = bad(policy(vec![], vec![any_id()]));
        assert!(e.contains("policies[\"p\"]"), "{e}");
        let e = bad(policy(vec![perm(R::Any(false))], vec![any_id()]));
        assert!(e.contains("permissions[0].any"), "{e}");
        let e = bad(policy(
            vec![any_perm()],
            vec![id(I::Custom(envoy_core::TypedExtensionConfig::default()))],
        ));
        assert!(
            e.contains("principals[0]") && e.contains("not supported"),
            "{e}"
        );
        let e = bad(pb::Policy {
            permissions: vec![any_perm()],
            principals: vec![any_id()],
            condition: Some(Default::default()),
            ..Default::default()
        });
        assert!(e.contains("CEL"), "{e}");
        assert!(compile(b"\xff").unwrap_err().contains("undecodable"));
    }
}
