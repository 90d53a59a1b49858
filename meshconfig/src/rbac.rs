//! L7 authorization at waypoints: AuthorizationPolicies bound with `targetRefs` (a waypoint Gateway, the waypoint GatewayClass, or a Service behind a waypoint) translated into Envoy's HTTP RBAC filters the way Istio translates them, plus a problem for every binding no waypoint enforces.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as network_rbac;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf as pbw;
use envoy_types::util::pack_any;

use crate::k8s::{AuthorizationPolicy, Condition, Operation, PolicyAction, Problem, Source};
use crate::model::{Key, Snapshot};
use crate::translate::{MeshOptions, parse_cidr, service_waypoint};

/// The HTTP RBAC filter's name in the connection manager (Istio's, without its Gateway API
/// route-auth feature flag).
pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
/// The network RBAC filter's name, before a TCP listener's tcp_proxy.
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
/// Where Istio's waypoint keeps the HBONE peer's identity (filter state), which its RBAC
/// principals match; our waypoint fills it from the HBONE peer certificate.
pub const PEER_PRINCIPAL: &str = "io.istio.peer_principal";
/// Envoy's URI template matcher extension (paths with `{*}` / `{**}`).
pub const URI_TEMPLATE_MATCHER: &str = "envoy.path.match.uri_template.uri_template_matcher";
/// The dynamic metadata namespace Istio's request authentication writes (JWT claims). Our
/// waypoint has no RequestAuthentication, so matchers on it never find a value.
const AUTHN_METADATA: &str = "istio_authn";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Which policies apply where, from their `targetRefs`.
#[derive(Debug, Default)]
pub struct Attachments {
    /// Waypoint Gateway → policies for every listener of it.
    pub gateway: BTreeMap<Key, Vec<Key>>,
    /// Service → policies for its listeners only (on the waypoint it is bound to).
    pub service: BTreeMap<Key, Vec<Key>>,
    pub problems: Vec<Problem>,
}

impl Attachments {
    /// The policies for one listener: those bound to the waypoint, then those bound to the
    /// service, each once.
    pub fn for_listener<'s>(
        &self,
        s: &'s Snapshot,
        gw: &Key,
        svc: &Key,
    ) -> Vec<&'s AuthorizationPolicy> {
        let mut keys: Vec<&Key> = self.gateway.get(gw).into_iter().flatten().collect();
        keys.extend(self.service.get(svc).into_iter().flatten());
        keys.sort();
        keys.dedup();
        keys.into_iter().filter_map(|k| s.policies.get(k)).collect()
    }
}

fn policy_key(p: &AuthorizationPolicy) -> Key {
    (p.meta.namespace.clone(), p.meta.name.clone())
}

fn problem(s: &Snapshot, p: &AuthorizationPolicy, field: &str, reason: String) -> Problem {
    let key = policy_key(p);
    Problem {
        file: s.file_of("AuthorizationPolicy", &key).to_string(),
        object: format!("AuthorizationPolicy {}/{}", key.0, key.1),
        field: field.to_string(),
        reason,
    }
}

/// Resolve every policy's `targetRefs`. A reference no waypoint serves, a kind the waypoint
/// does not support, or a CUSTOM action is a problem saying the policy is in force nowhere
/// (for that reference); such policies never reach the node proxies either.
pub fn attachments(s: &Snapshot, o: &MeshOptions) -> Attachments {
    let mut a = Attachments::default();
    for p in s.policies.values() {
        if p.target_refs.is_empty() {
            continue;
        }
        let key = policy_key(p);
        if p.action == PolicyAction::Custom {
            a.problems.push(problem(
                s,
                p,
                "spec.action",
                "CUSTOM (external authorization) is not enforced by the waypoint; the policy is in force nowhere".into(),
            ));
            continue;
        }
        for t in &p.target_refs {
            let ns = if t.namespace.is_empty() {
                &p.meta.namespace
            } else {
                &t.namespace
            };
            if ns != &p.meta.namespace {
                a.problems.push(problem(
                    s,
                    p,
                    &t.field,
                    format!(
                        "namespace {ns:?}: a policy may only target objects of its own namespace; in force nowhere for {t}"
                    ),
                ));
                continue;
            }
            let target = (ns.clone(), t.name.clone());
            match (t.group.as_str(), t.kind.as_str()) {
                (GATEWAY_GROUP, "Gateway") => match s.gateways.get(&target) {
                    Some(g) if g.is_waypoint() => {
                        a.gateway.entry(target).or_default().push(key.clone())
                    }
                    Some(g) => a.problems.push(problem(
                        s,
                        p,
                        &t.field,
                        format!(
                            "Gateway {}/{} has class {:?}, not a waypoint; in force nowhere",
                            target.0, target.1, g.class
                        ),
                    )),
                    None => a.problems.push(problem(
                        s,
                        p,
                        &t.field,
                        format!(
                            "no waypoint Gateway {}/{}; in force nowhere",
                            target.0, target.1
                        ),
                    )),
                },
                (GATEWAY_GROUP, "GatewayClass") => {
                    if p.meta.namespace != o.root_namespace {
                        a.problems.push(problem(
                            s,
                            p,
                            &t.field,
                            format!(
                                "a GatewayClass is targeted only from the root namespace {:?}; in force nowhere",
                                o.root_namespace
                            ),
                        ));
                        continue;
                    }
                    let mut any = false;
                    for (gk, g) in &s.gateways {
                        if g.is_waypoint() && g.class == t.name {
                            a.gateway.entry(gk.clone()).or_default().push(key.clone());
                            any = true;
                        }
                    }
                    if !any {
                        a.problems.push(problem(
                            s,
                            p,
                            &t.field,
                            format!("no waypoint of class {:?}; in force nowhere", t.name),
                        ));
                    }
                }
                ("" | "core", "Service") => match s.services.get(&target) {
                    Some(svc) if service_waypoint(s, svc).is_some() => {
                        a.service.entry(target).or_default().push(key.clone())
                    }
                    Some(_) => a.problems.push(problem(
                        s,
                        p,
                        &t.field,
                        format!(
                            "Service {}/{} uses no waypoint, and only a waypoint enforces targetRefs policies; in force nowhere",
                            target.0, target.1
                        ),
                    )),
                    None => a.problems.push(problem(
                        s,
                        p,
                        &t.field,
                        format!("no Service {}/{}; in force nowhere", target.0, target.1),
                    )),
                },
                (group, kind) => a.problems.push(problem(
                    s,
                    p,
                    &t.field,
                    format!(
                        "{kind} (group {group:?}) is not a target the waypoint supports (Gateway and GatewayClass of {GATEWAY_GROUP}, core Service); in force nowhere"
                    ),
                )),
            }
        }
    }
    for v in a.gateway.values_mut().chain(a.service.values_mut()) {
        v.sort();
        v.dedup();
    }
    a
}

/// Istio's rule name, which Envoy reports as the policy that matched.
pub fn rule_name(ns: &str, name: &str, i: usize) -> String {
    format!("ns[{ns}]-policy[{name}]-rule[{i}]")
}

/// The RBAC rules of one action for one listener: enforced and shadow (dry-run).
struct Engines {
    action: PolicyAction,
    enforce: Option<rbac::Rbac>,
    shadow: Option<rbac::Rbac>,
}

impl Engines {
    fn shadow_prefix(&self) -> &'static str {
        match (&self.shadow, self.action) {
            (Some(_), PolicyAction::Allow) => "istio_dry_run_allow_",
            (Some(_), PolicyAction::Deny) => "istio_dry_run_deny_",
            _ => "",
        }
    }
}

/// The HTTP RBAC filters for one listener (service port `port`), in Istio's order: AUDIT
/// (action LOG), DENY, ALLOW, one filter each when a policy of that action applies. Dry-run
/// policies become the filter's shadow rules. Also the problems met on the way (conditions
/// the waypoint cannot check).
pub fn http_filters(
    s: &Snapshot,
    policies: &[&AuthorizationPolicy],
    port: u16,
) -> (Vec<hcm::HttpFilter>, Vec<Problem>) {
    let (engines, problems) = engines(s, policies, port, false);
    let filters = engines
        .into_iter()
        .map(|e| {
            let config = http_rbac::Rbac {
                shadow_rules_stat_prefix: e.shadow_prefix().to_string(),
                rules: e.enforce,
                shadow_rules: e.shadow,
                ..Default::default()
            };
            hcm::HttpFilter {
                name: HTTP_RBAC_FILTER.into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(config))),
                ..Default::default()
            }
        })
        .collect();
    (filters, problems)
}

/// The network RBAC filters for a TCP listener (before its tcp_proxy), as Istio builds them
/// for TCP: HTTP-only attributes cannot be checked, so an ALLOW rule holding one is left out
/// (allows less) and in a DENY or AUDIT rule they are ignored (denies more), each said as a
/// problem.
pub fn network_filters(
    s: &Snapshot,
    policies: &[&AuthorizationPolicy],
    port: u16,
) -> (Vec<listener::Filter>, Vec<Problem>) {
    let (engines, problems) = engines(s, policies, port, true);
    let filters = engines
        .into_iter()
        .map(|e| {
            let config = network_rbac::Rbac {
                stat_prefix: "tcp.".into(),
                shadow_rules_stat_prefix: e.shadow_prefix().to_string(),
                rules: e.enforce,
                shadow_rules: e.shadow,
                ..Default::default()
            };
            listener::Filter {
                name: NETWORK_RBAC_FILTER.into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(config))),
            }
        })
        .collect();
    (filters, problems)
}

fn engines(
    s: &Snapshot,
    policies: &[&AuthorizationPolicy],
    port: u16,
    for_tcp: bool,
) -> (Vec<Engines>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (action, envoy_action) in [
        (PolicyAction::Audit, rbac::rbac::Action::Log),
        (PolicyAction::Deny, rbac::rbac::Action::Deny),
        (PolicyAction::Allow, rbac::rbac::Action::Allow),
    ] {
        let of_action: Vec<&&AuthorizationPolicy> =
            policies.iter().filter(|p| p.action == action).collect();
        if of_action.is_empty() {
            continue;
        }
        let mut enforce: Option<rbac::Rbac> = None;
        let mut shadow: Option<rbac::Rbac> = None;
        for p in of_action {
            let rules = if p.dry_run { &mut shadow } else { &mut enforce };
            let rules = rules.get_or_insert_with(|| rbac::Rbac {
                action: envoy_action as i32,
                ..Default::default()
            });
            if p.rules.is_empty() {
                // No rules: a policy that matches nothing (an ALLOW of nothing denies all).
                rules
                    .policies
                    .insert(rule_name(&p.meta.namespace, &p.meta.name, 0), match_never());
                continue;
            }
            for (i, r) in p.rules.iter().enumerate() {
                let jwt = r.from.iter().any(|f| {
                    !f.request_principals.is_empty() || !f.not_request_principals.is_empty()
                }) || r.when.iter().any(|c| c.key.starts_with("request.auth."));
                if jwt && !for_tcp {
                    problems.push(problem(
                        s,
                        p,
                        &format!("spec.rules[{i}]"),
                        "request principals and request.auth conditions need RequestAuthentication (JWT), which is not supported: no request carries them, so they never match (as in Istio for a request without a token)".into(),
                    ));
                }
                let mut unsupported = Vec::new();
                let policy = rule_policy(&r.from, &r.to, &r.when, port, for_tcp, &mut unsupported);
                for (field, reason) in &unsupported {
                    problems.push(problem(
                        s,
                        p,
                        &format!("spec.rules[{i}].{field}"),
                        reason.clone(),
                    ));
                }
                // A condition the waypoint cannot check: an ALLOW rule is left out (allows
                // less), in a DENY or AUDIT rule the condition is ignored (denies more).
                if !unsupported.is_empty() && action == PolicyAction::Allow {
                    continue;
                }
                rules
                    .policies
                    .insert(rule_name(&p.meta.namespace, &p.meta.name, i), policy);
            }
        }
        out.push(Engines {
            action,
            enforce,
            shadow,
        });
    }
    (out, problems)
}

fn match_never() -> rbac::Policy {
    rbac::Policy {
        permissions: vec![perm_not(perm_any())],
        principals: vec![principal(rbac::principal::Identifier::NotId(Box::new(
            principal(rbac::principal::Identifier::Any(true)),
        )))],
        ..Default::default()
    }
}

fn perm(r: rbac::permission::Rule) -> rbac::Permission {
    rbac::Permission { rule: Some(r) }
}

fn perm_any() -> rbac::Permission {
    perm(rbac::permission::Rule::Any(true))
}

fn perm_not(p: rbac::Permission) -> rbac::Permission {
    perm(rbac::permission::Rule::NotRule(Box::new(p)))
}

fn principal(i: rbac::principal::Identifier) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(i),
    }
}

/// An attribute's values and not-values, as Istio combines them: the values OR-ed, the
/// not-values OR-ed under a NOT, both required.
struct Attribute {
    key: String,
    values: Vec<String>,
    not_values: Vec<String>,
}

/// One rule as an Envoy Policy: a permission per `to` (or one), a principal per `from` (or
/// one), `when` conditions added to each, as Istio's model does. `unsupported` collects
/// (field, reason) for conditions that cannot be checked.
fn rule_policy(
    from: &[Source],
    to: &[Operation],
    when: &[Condition],
    port: u16,
    for_tcp: bool,
    unsupported: &mut Vec<(String, String)>,
) -> rbac::Policy {
    // What a TCP connection cannot show: said, and left out of the rule.
    let tcp_skips = |field: String, a: &Attribute, out: &mut Vec<(String, String)>| {
        let listed = !a.values.is_empty() || !a.not_values.is_empty();
        if for_tcp && listed && is_http_only(&a.key) {
            let name = match a.key.as_str() {
                ":authority" => "hosts",
                ":method" => "methods",
                ":path" => "paths",
                "request.auth.principal" if field.starts_with("from") => "requestPrincipals",
                k => k,
            };
            out.push((
                field,
                format!("{name} is HTTP only: not checked on TCP port {port} (an ALLOW rule is left out, in a DENY or AUDIT rule the condition is ignored)"),
            ));
            return true;
        }
        false
    };
    let mut when_permissions = Vec::new();
    let mut when_principals = Vec::new();
    for (i, c) in when.iter().enumerate() {
        let a = Attribute {
            key: c.key.clone(),
            values: c.values.clone(),
            not_values: c.not_values.clone(),
        };
        if tcp_skips(format!("when[{i}]"), &a, unsupported) {
            continue;
        }
        if !is_known_key(&c.key) {
            unsupported.push((
                format!("when[{i}].key"),
                format!("{:?} is not a condition the waypoint knows", c.key),
            ));
            continue;
        }
        if is_permission_key(&c.key) {
            when_permissions.push(a);
        } else {
            when_principals.push(a);
        }
    }
    let attr = |key: &str, values: &[String], not_values: &[String]| Attribute {
        key: key.to_string(),
        values: values.to_vec(),
        not_values: not_values.to_vec(),
    };
    let mut permissions = Vec::new();
    let ops: Vec<Option<&Operation>> = if to.is_empty() {
        vec![None]
    } else {
        to.iter().map(Some).collect()
    };
    for (j, op) in ops.into_iter().enumerate() {
        let mut attrs = Vec::new();
        if let Some(o) = op {
            let ports = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>();
            attrs.push(attr(":authority", &o.hosts, &o.not_hosts));
            attrs.push(attr(":method", &o.methods, &o.not_methods));
            attrs.push(attr(":path", &o.paths, &o.not_paths));
            attrs.push(attr(
                "destination.port",
                &ports(&o.ports),
                &ports(&o.not_ports),
            ));
        }
        attrs.retain(|a| !tcp_skips(format!("to[{j}].operation"), a, unsupported));
        let mut and: Vec<rbac::Permission> = attrs
            .iter()
            .chain(&when_permissions)
            .flat_map(|a| permission_matchers(a, port))
            .collect();
        if and.is_empty() {
            and.push(perm_any());
        }
        permissions.push(perm(rbac::permission::Rule::AndRules(
            rbac::permission::Set { rules: and },
        )));
    }
    let mut principals = Vec::new();
    let sources: Vec<Option<&Source>> = if from.is_empty() {
        vec![None]
    } else {
        from.iter().map(Some).collect()
    };
    for (j, src) in sources.into_iter().enumerate() {
        let mut attrs = Vec::new();
        if let Some(s) = src {
            attrs.push(attr("source.principal", &s.principals, &s.not_principals));
            attrs.push(attr(
                "source.serviceAccount",
                &s.service_accounts,
                &s.not_service_accounts,
            ));
            attrs.push(attr(
                "request.auth.principal",
                &s.request_principals,
                &s.not_request_principals,
            ));
            attrs.push(attr("source.namespace", &s.namespaces, &s.not_namespaces));
            attrs.push(attr(
                "remote.ip",
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
            ));
            attrs.push(attr("source.ip", &s.ip_blocks, &s.not_ip_blocks));
        }
        attrs.retain(|a| !tcp_skips(format!("from[{j}].source"), a, unsupported));
        let mut and: Vec<rbac::Principal> = attrs
            .iter()
            .chain(&when_principals)
            .flat_map(principal_matchers)
            .collect();
        if and.is_empty() {
            and.push(principal(rbac::principal::Identifier::Any(true)));
        }
        principals.push(principal(rbac::principal::Identifier::AndIds(
            rbac::principal::Set { ids: and },
        )));
    }
    rbac::Policy {
        permissions,
        principals,
        ..Default::default()
    }
}

const PRINCIPAL_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
];
const PERMISSION_KEYS: &[&str] = &["destination.ip", "destination.port", "connection.sni"];

/// Attributes only an HTTP request has (Istio's "HTTP only" fields).
fn is_http_only(k: &str) -> bool {
    matches!(k, ":authority" | ":method" | ":path") || k.starts_with("request.")
}

fn is_permission_key(k: &str) -> bool {
    PERMISSION_KEYS.contains(&k) || k.starts_with("experimental.envoy.filters.")
}

fn is_known_key(k: &str) -> bool {
    is_permission_key(k)
        || PRINCIPAL_KEYS.contains(&k)
        || header_name(k).is_some()
        || claim_path(k).is_some()
}

/// `request.headers[<name>]` → `<name>`.
fn header_name(k: &str) -> Option<&str> {
    k.strip_prefix("request.headers[")?
        .strip_suffix(']')
        .filter(|n| !n.is_empty())
}

/// `request.auth.claims[a][b]` → `[a, b]`.
fn claim_path(k: &str) -> Option<Vec<String>> {
    let rest = k.strip_prefix("request.auth.claims")?;
    let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
    let parts: Vec<String> = inner.split("][").map(str::to_string).collect();
    (!parts.iter().any(String::is_empty)).then_some(parts)
}

/// Istio's string forms: `*` any non-empty value, `x*` prefix, `*x` suffix, else exact, with
/// `prefix` put in front of the value (`spiffe://` for principals).
pub fn string_matcher(v: &str, prefix: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern as P;
    let pattern = if v == "*" {
        P::SafeRegex(regex(".+"))
    } else if let Some(suffix) = v.strip_prefix('*') {
        if prefix.is_empty() {
            P::Suffix(suffix.to_string())
        } else {
            P::SafeRegex(regex(&format!("{prefix}.*{suffix}")))
        }
    } else if let Some(p) = v.strip_suffix('*') {
        P::Prefix(format!("{prefix}{p}"))
    } else {
        P::Exact(format!("{prefix}{v}"))
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    }
}

fn regex(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.to_string(),
        engine_type: None,
    }
}

fn header_matcher(name: &str, v: &str, ignore_case: bool) -> route::HeaderMatcher {
    use route::header_matcher::HeaderMatchSpecifier as H;
    let spec = if v == "*" {
        H::PresentMatch(true)
    } else {
        let mut m = string_matcher(v, "");
        m.ignore_case = ignore_case;
        H::StringMatch(m)
    };
    route::HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn cidr(v: &str) -> Option<core::CidrRange> {
    let (ip, len) = parse_cidr(v)?;
    Some(core::CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(pbw::UInt32Value {
            value: u32::from(len),
        }),
    })
}

/// Paths with `{*}` (one segment) or `{**}` (any number): Envoy's URI template syntax.
fn is_path_template(v: &str) -> bool {
    v.contains("{*}") || v.contains("{**}")
}

fn metadata(filter: &str, path: &[String], m: matcher::StringMatcher) -> matcher::MetadataMatcher {
    use matcher::metadata_matcher::{PathSegment, path_segment::Segment};
    matcher::MetadataMatcher {
        filter: filter.to_string(),
        path: path
            .iter()
            .map(|k| PathSegment {
                segment: Some(Segment::Key(k.clone())),
            })
            .collect(),
        value: Some(matcher::ValueMatcher {
            match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(m)),
        }),
        invert: false,
    }
}

/// One value of a permission attribute.
fn permission_value(key: &str, v: &str) -> Option<rbac::permission::Rule> {
    use rbac::permission::Rule as R;
    Some(match key {
        ":authority" => R::Header(header_matcher(":authority", v, true)),
        ":method" => R::Header(header_matcher(":method", v, false)),
        ":path" if is_path_template(v) => R::UriTemplate(core::TypedExtensionConfig {
            name: URI_TEMPLATE_MATCHER.into(),
            typed_config: Some(pack_any(UriTemplateMatchConfig {
                path_template: v.replace("{**}", "**").replace("{*}", "*"),
            })),
        }),
        ":path" => R::UrlPath(matcher::PathMatcher {
            rule: Some(matcher::path_matcher::Rule::Path(string_matcher(v, ""))),
        }),
        "destination.port" => R::DestinationPort(v.parse().ok()?),
        "destination.ip" => R::DestinationIp(cidr(v)?),
        "connection.sni" => R::RequestedServerName(string_matcher(v, "")),
        k => {
            // `experimental.envoy.filters.<filter>[<key>]`: dynamic metadata.
            let rest = k.strip_prefix("experimental.")?;
            let (filter, key) = rest.strip_suffix(']')?.split_once('[')?;
            #[allow(deprecated)]
            R::Metadata(metadata(filter, &[key.to_string()], string_matcher(v, "")))
        }
    })
}

fn permission_matchers(a: &Attribute, port: u16) -> Vec<rbac::Permission> {
    use rbac::permission::Rule as R;
    let mut out = Vec::new();
    if a.key == "destination.port" {
        // As Istio's waypoint: the listener serves one service port, so a port condition is
        // decided here (a listed port is always true, a not-listed one always false).
        let here = port.to_string();
        if !a.values.is_empty() && !a.values.contains(&here) {
            out.push(or_permissions(
                a.values
                    .iter()
                    .filter_map(|v| permission_value(&a.key, v))
                    .collect(),
            ));
        }
        if a.not_values.contains(&here) {
            out.push(perm_not(perm_any()));
        } else if !a.not_values.is_empty() {
            out.push(perm_not(or_permissions(
                a.not_values
                    .iter()
                    .filter_map(|v| permission_value(&a.key, v))
                    .collect(),
            )));
        }
        return out;
    }
    let values: Vec<R> = a
        .values
        .iter()
        .filter_map(|v| permission_value(&a.key, v))
        .collect();
    if !values.is_empty() {
        out.push(or_permissions(values));
    }
    let nots: Vec<R> = a
        .not_values
        .iter()
        .filter_map(|v| permission_value(&a.key, v))
        .collect();
    if !nots.is_empty() {
        out.push(perm_not(or_permissions(nots)));
    }
    out
}

fn or_permissions(rules: Vec<rbac::permission::Rule>) -> rbac::Permission {
    perm(rbac::permission::Rule::OrRules(rbac::permission::Set {
        rules: rules.into_iter().map(perm).collect(),
    }))
}

fn peer(m: matcher::StringMatcher) -> rbac::principal::Identifier {
    rbac::principal::Identifier::FilterState(matcher::FilterStateMatcher {
        key: PEER_PRINCIPAL.into(),
        matcher: Some(matcher::filter_state_matcher::Matcher::StringMatch(m)),
    })
}

fn principal_value(key: &str, v: &str) -> Option<rbac::principal::Identifier> {
    use rbac::principal::Identifier as I;
    #[allow(deprecated)]
    Some(match key {
        "source.principal" => peer(string_matcher(v, "spiffe://")),
        "source.namespace" => peer(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(regex(
                &format!(".*/ns/{}/.*", v.replace('*', ".*")),
            ))),
            ignore_case: false,
        }),
        "source.serviceAccount" => {
            let (ns, sa) = v.split_once('/')?;
            peer(matcher::StringMatcher {
                match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(regex(
                    &format!("spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"),
                ))),
                ignore_case: false,
            })
        }
        "source.ip" => I::DirectRemoteIp(cidr(v)?),
        "remote.ip" => I::RemoteIp(cidr(v)?),
        "request.auth.principal" => I::Metadata(metadata(
            AUTHN_METADATA,
            &["request.auth.principal".to_string()],
            string_matcher(v, ""),
        )),
        "request.auth.audiences" | "request.auth.presenter" => I::Metadata(metadata(
            AUTHN_METADATA,
            &[key.to_string()],
            string_matcher(v, ""),
        )),
        k => {
            if let Some(name) = header_name(k) {
                I::Header(header_matcher(name, v, false))
            } else {
                let mut path = vec!["request.auth.claims".to_string()];
                path.extend(claim_path(k)?);
                I::Metadata(metadata(AUTHN_METADATA, &path, string_matcher(v, "")))
            }
        }
    })
}

fn principal_matchers(a: &Attribute) -> Vec<rbac::Principal> {
    use rbac::principal::{Identifier as I, Set};
    let or = |ids: Vec<I>| {
        principal(I::OrIds(Set {
            ids: ids.into_iter().map(principal).collect(),
        }))
    };
    let mut out = Vec::new();
    let values: Vec<I> = a
        .values
        .iter()
        .filter_map(|v| principal_value(&a.key, v))
        .collect();
    if !values.is_empty() {
        out.push(or(values));
    }
    let nots: Vec<I> = a
        .not_values
        .iter()
        .filter_map(|v| principal_value(&a.key, v))
        .collect();
    if !nots.is_empty() {
        out.push(principal(I::NotId(Box::new(or(nots)))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::parse_documents;
    use envoy_types::pb::envoy::config::listener::v3 as listener;
    use prost::Message;

    const MESH: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80}, {name: tcp-db, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: plain}, ports: [{name: http, port: 80}]}
"#;

    const WEB: &str = "inbound-vip|80|http|web.shop.svc.cluster.local";
    const WEB_TCP: &str = "inbound-vip|5432|tcp|web.shop.svc.cluster.local";
    const API: &str = "inbound-vip|8080|http|api.shop.svc.cluster.local";

    fn policy(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
        )
    }

    const GW: &str = "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}";

    fn translate(policies: &str) -> (crate::waypoint::Translation, Snapshot) {
        let p = parse_documents(&format!("{MESH}{policies}"), "p.yaml");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let s = Snapshot::build(p.objects, vec![]);
        (crate::waypoint::translate(&s, &MeshOptions::default()), s)
    }

    /// The HTTP filters of a listener, as sent.
    fn filters(t: &crate::waypoint::Translation, listener_name: &str) -> Vec<hcm::HttpFilter> {
        let w = &t.waypoints["shop/waypoint"];
        let l = listener::Listener::decode(w.listeners[listener_name].body.clone()).unwrap();
        let f = &l.filter_chains[0].filters[0];
        let Some(listener::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            panic!("no typed config")
        };
        let Ok(h) = hcm::HttpConnectionManager::decode(&any.value[..]) else {
            return vec![];
        };
        h.http_filters
    }

    fn rbac_configs(t: &crate::waypoint::Translation, listener_name: &str) -> Vec<http_rbac::Rbac> {
        filters(t, listener_name)
            .iter()
            .filter(|f| f.name == HTTP_RBAC_FILTER)
            .map(|f| {
                let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    panic!()
                };
                http_rbac::Rbac::decode(&any.value[..]).unwrap()
            })
            .collect()
    }

    /// Problems other than those of `web`'s TCP port (HTTP-only attributes there).
    fn http_problems(t: &crate::waypoint::Translation) -> Vec<&Problem> {
        t.problems
            .iter()
            .filter(|p| !p.reason.contains("TCP port"))
            .collect()
    }

    fn problems_of(t: &crate::waypoint::Translation, name: &str) -> Vec<String> {
        let object = format!("AuthorizationPolicy shop/{name}");
        t.problems
            .iter()
            .filter(|p| p.object == object)
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect()
    }

    /// The waypoint's verdict on a request under the filters of one listener.
    fn allowed(
        t: &crate::waypoint::Translation,
        listener_name: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        peer: &str,
        client: &str,
    ) -> bool {
        let compiled: Vec<waypoint::rbac::RbacFilter> = filters(t, listener_name)
            .iter()
            .filter(|f| f.name == HTTP_RBAC_FILTER)
            .map(|f| {
                let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    panic!()
                };
                assert_eq!(any.type_url, waypoint::rbac::TYPE_URL);
                waypoint::rbac::compile(&any.value).unwrap()
            })
            .collect();
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let source = waypoint::route::Source::default();
        let port = listener_name.split('|').nth(1).unwrap().parse().unwrap();
        let view = waypoint::route::Request {
            method,
            scheme: "http",
            authority: "web.shop.svc.cluster.local",
            path,
            headers: &h,
            source: &source,
        };
        let s = waypoint::rbac::Subject {
            request: &view,
            peer,
            client: client.parse().unwrap(),
            destination: std::net::SocketAddr::new("10.96.0.1".parse().unwrap(), port),
        };
        waypoint::rbac::check(&compiled, &s, |_, _| {}).is_none()
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/shop/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/client";

    #[test]
    fn no_policy_no_filter_and_istio_filter_order() {
        let (t, _) = translate("");
        assert!(rbac_configs(&t, WEB).is_empty());
        assert_eq!(
            filters(&t, WEB).len(),
            3,
            "CORS, fault injection and the router"
        );
        let (t, _) = translate(&format!(
            "{}{}{}",
            policy("allow", &format!("{{targetRefs: [{GW}], rules: [{{}}]}}")),
            policy(
                "deny",
                &format!("{{targetRefs: [{GW}], action: DENY, rules: [{{}}]}}")
            ),
            policy(
                "audit",
                &format!("{{targetRefs: [{GW}], action: AUDIT, rules: [{{}}]}}")
            ),
        ));
        assert!(http_problems(&t).is_empty(), "{:?}", t.problems);
        let names: Vec<String> = filters(&t, WEB).iter().map(|f| f.name.clone()).collect();
        assert_eq!(
            names,
            [
                HTTP_RBAC_FILTER,
                HTTP_RBAC_FILTER,
                HTTP_RBAC_FILTER,
                "envoy.filters.http.cors",
                "envoy.filters.http.fault",
                "envoy.filters.http.router"
            ]
        );
        let actions: Vec<i32> = rbac_configs(&t, WEB)
            .iter()
            .map(|c| c.rules.as_ref().unwrap().action)
            .collect();
        use rbac::rbac::Action;
        assert_eq!(
            actions,
            [
                Action::Log as i32,
                Action::Deny as i32,
                Action::Allow as i32
            ]
        );
        let allow = &rbac_configs(&t, WEB)[2];
        let names: Vec<&String> = allow.rules.as_ref().unwrap().policies.keys().collect();
        assert_eq!(names, ["ns[shop]-policy[allow]-rule[0]"]);
    }

    #[test]
    fn gateway_and_service_targets_and_what_is_in_force_nowhere() {
        let (t, _) = translate(&format!(
            "{}{}{}{}{}{}{}",
            policy(
                "on-api",
                "{targetRefs: [{kind: Service, name: api}], action: DENY, rules: [{to: [{operation: {paths: [/x]}}]}]}"
            ),
            policy(
                "on-plain",
                "{targetRefs: [{kind: Service, group: \"\", name: plain}], action: DENY, rules: [{}]}"
            ),
            policy(
                "missing-gw",
                "{targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: nope}, rules: [{}]}"
            ),
            policy(
                "not-waypoint",
                "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: ingress}], rules: [{}]}"
            ),
            policy(
                "custom",
                &format!(
                    "{{targetRefs: [{GW}], action: CUSTOM, provider: {{name: ext}}, rules: [{{}}]}}"
                )
            ),
            policy(
                "entry",
                "{targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: x}], rules: [{}]}"
            ),
            policy(
                "elsewhere",
                "{targetRefs: [{kind: Service, name: web, namespace: other}], rules: [{}]}"
            ),
        ));
        // A Service-targeted policy applies to that service's listeners only.
        assert_eq!(rbac_configs(&t, API).len(), 1);
        assert!(rbac_configs(&t, WEB).is_empty());
        assert!(problems_of(&t, "on-api").is_empty());
        assert_eq!(
            problems_of(&t, "on-plain"),
            [
                "spec.targetRefs[0]: Service shop/plain uses no waypoint, and only a waypoint enforces targetRefs policies; in force nowhere"
            ]
        );
        assert_eq!(
            problems_of(&t, "missing-gw"),
            ["spec.targetRef: no waypoint Gateway shop/nope; in force nowhere"]
        );
        assert!(problems_of(&t, "not-waypoint")[0].contains("not a waypoint"));
        assert!(problems_of(&t, "custom")[0].starts_with("spec.action: CUSTOM"));
        assert!(problems_of(&t, "entry")[0].contains("ServiceEntry"));
        assert!(problems_of(&t, "elsewhere")[0].contains("own namespace"));
    }

    /// The network RBAC filters of a TCP listener, compiled by the waypoint, and its verdict
    /// on a connection from `peer`.
    fn tcp_allowed(t: &crate::waypoint::Translation, peer: &str) -> bool {
        let w = &t.waypoints["shop/waypoint"];
        let l = listener::Listener::decode(w.listeners[WEB_TCP].body.clone()).unwrap();
        let chain = &l.filter_chains[0].filters;
        assert_eq!(
            chain.last().unwrap().name,
            "envoy.filters.network.tcp_proxy"
        );
        let compiled: Vec<waypoint::rbac::RbacFilter> = chain[..chain.len() - 1]
            .iter()
            .map(|f| {
                assert_eq!(f.name, NETWORK_RBAC_FILTER);
                let Some(listener::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    panic!()
                };
                waypoint::rbac::compile_network(&any.value).unwrap()
            })
            .collect();
        let h = http::HeaderMap::new();
        let source = waypoint::route::Source::default();
        let view = waypoint::route::Request {
            method: "",
            scheme: "",
            authority: "",
            path: "",
            headers: &h,
            source: &source,
        };
        let s = waypoint::rbac::Subject {
            request: &view,
            peer,
            client: "10.0.0.1".parse().unwrap(),
            destination: "10.96.0.1:5432".parse().unwrap(),
        };
        waypoint::rbac::check(&compiled, &s, |_, _| {}).is_none()
    }

    #[test]
    fn tcp_ports_get_network_rbac_without_http_attributes() {
        // No policy: the tcp_proxy alone.
        let (t, _) = translate("");
        assert!(tcp_allowed(&t, SLEEP));
        // A DENY of everything denies TCP too.
        let (t, _) = translate(&policy(
            "deny",
            &format!("{{targetRefs: [{GW}], action: DENY, rules: [{{}}]}}"),
        ));
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert!(!tcp_allowed(&t, SLEEP));
        // A DENY on a path: the path cannot be seen on TCP, so the rule denies every
        // connection there (Istio's fail-closed translation), and that is said.
        let (t, _) = translate(&policy(
            "deny-path",
            &format!(
                "{{targetRefs: [{GW}], action: DENY, rules: [{{to: [{{operation: {{paths: [/admin]}}}}]}}]}}"
            ),
        ));
        assert_eq!(
            problems_of(&t, "deny-path"),
            [
                "spec.rules[0].to[0].operation: paths is HTTP only: not checked on TCP port 5432 (an ALLOW rule is left out, in a DENY or AUDIT rule the condition is ignored)"
            ]
        );
        assert!(!tcp_allowed(&t, SLEEP));
        assert!(
            allowed(&t, WEB, "GET", "/ok", &[], SLEEP, "10.0.0.1"),
            "HTTP: only /admin"
        );
        // An ALLOW: by principal it applies to TCP; a rule with a method is left out there.
        let (t, _) = translate(&policy(
            "allow",
            &format!(
                "{{targetRefs: [{GW}], rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/sleep]}}}}]}}, {{to: [{{operation: {{methods: [GET]}}}}]}}]}}"
            ),
        ));
        assert_eq!(problems_of(&t, "allow").len(), 1, "{:?}", t.problems);
        assert!(tcp_allowed(&t, SLEEP));
        assert!(!tcp_allowed(&t, OTHER));
        assert!(
            allowed(&t, WEB, "GET", "/", &[], OTHER, "10.0.0.1"),
            "HTTP: GET allowed"
        );
    }

    #[test]
    fn operations_with_wildcards_and_not_forms() {
        let (t, _) = translate(&policy(
            "ops",
            &format!(
                r#"{{targetRefs: [{GW}], rules: [{{to: [{{operation: {{
                    methods: [GET, "P*"], notMethods: [PATCH],
                    paths: [/exact, "/prefix/*", "*.css", "/api/{{*}}/items", "/static/{{**}}"],
                    notPaths: [/prefix/secret],
                    hosts: ["*.svc.cluster.local"], notHosts: ["bad.*"]}}}}]}}]}}"#
            ),
        ));
        assert!(http_problems(&t).is_empty(), "{:?}", t.problems);
        let ok = |m: &str, p: &str| allowed(&t, WEB, m, p, &[], SLEEP, "10.0.0.1");
        assert!(ok("GET", "/exact"));
        assert!(ok("GET", "/exact?q=1"), "the query is not part of the path");
        assert!(!ok("GET", "/exact/more"));
        assert!(ok("POST", "/prefix/a"));
        assert!(ok("PUT", "/a/b.css"));
        assert!(!ok("PATCH", "/exact"), "notMethods");
        assert!(!ok("DELETE", "/exact"), "not a listed method");
        assert!(!ok("GET", "/prefix/secret"), "notPaths");
        assert!(ok("GET", "/api/v1/items"));
        assert!(!ok("GET", "/api/v1/v2/items"), "{{*}} is one segment");
        assert!(ok("GET", "/static/a/b/c.js"), "{{**}} is the rest");
        assert!(!ok("GET", "/other"));
        // Hosts: case-insensitive, suffix; not-hosts.
        let cfg = &rbac_configs(&t, WEB)[0];
        let p = &cfg.rules.as_ref().unwrap().policies["ns[shop]-policy[ops]-rule[0]"];
        let text = format!("{p:?}");
        assert!(text.contains("ignore_case: true"), "{text}");
        assert!(text.contains(URI_TEMPLATE_MATCHER), "{text}");
        assert!(
            text.contains("path_template") || text.contains("type_url"),
            "{text}"
        );
    }

    #[test]
    fn ports_are_decided_per_listener() {
        let (t, _) = translate(&policy(
            "ports",
            &format!(
                r#"{{targetRefs: [{GW}], action: DENY, rules: [
                    {{to: [{{operation: {{ports: ["80"]}}}}]}},
                    {{to: [{{operation: {{notPorts: ["8080"], paths: [/np]}}}}]}},
                    {{when: [{{key: destination.port, values: ["8080"]}}], to: [{{operation: {{paths: [/w]}}}}]}}]}}"#
            ),
        ));
        assert!(http_problems(&t).is_empty(), "{:?}", t.problems);
        // Port 80: rule 0 denies all, so everything is denied.
        assert!(!allowed(&t, WEB, "GET", "/", &[], SLEEP, "10.0.0.1"));
        // Port 8080: rule 0 never applies; rule 1 (notPorts 8080) never; rule 2 on /w.
        assert!(allowed(&t, API, "GET", "/", &[], SLEEP, "10.0.0.1"));
        assert!(allowed(&t, API, "GET", "/np", &[], SLEEP, "10.0.0.1"));
        assert!(!allowed(&t, API, "GET", "/w", &[], SLEEP, "10.0.0.1"));
    }

    #[test]
    fn sources_principals_namespaces_ip_blocks() {
        let (t, _) = translate(&format!(
            "{}{}",
            policy(
                "from",
                &format!(
                    r#"{{targetRefs: [{GW}], rules: [
                        {{from: [{{source: {{principals: ["cluster.local/ns/shop/sa/sleep"]}}}}], to: [{{operation: {{paths: [/p]}}}}]}},
                        {{from: [{{source: {{namespaces: ["oth*"], notPrincipals: ["*/sa/blocked"]}}}}], to: [{{operation: {{paths: [/n]}}}}]}},
                        {{from: [{{source: {{ipBlocks: ["192.168.0.0/16"], notIpBlocks: ["192.168.9.0/24"]}}}}], to: [{{operation: {{paths: [/ip]}}}}]}},
                        {{from: [{{source: {{serviceAccounts: ["shop/sleep"]}}}}], to: [{{operation: {{paths: [/sa]}}}}]}},
                        {{from: [{{source: {{remoteIpBlocks: ["10.9.0.0/16"]}}}}], to: [{{operation: {{paths: [/rip]}}}}]}}]}}"#
                ),
            ),
            policy(
                "deny-none",
                "{targetRefs: [{kind: Service, name: web}], action: DENY}"
            ),
        ));
        assert!(http_problems(&t).is_empty(), "{:?}", t.problems);
        let ok =
            |path: &str, peer: &str, client: &str| allowed(&t, WEB, "GET", path, &[], peer, client);
        assert!(ok("/p", SLEEP, "10.0.0.1"));
        assert!(!ok("/p", OTHER, "10.0.0.1"));
        assert!(ok("/n", OTHER, "10.0.0.1"));
        assert!(!ok("/n", SLEEP, "10.0.0.1"));
        assert!(!ok(
            "/n",
            "spiffe://cluster.local/ns/other/sa/blocked",
            "10.0.0.1"
        ));
        assert!(ok("/ip", OTHER, "192.168.1.1"));
        assert!(!ok("/ip", OTHER, "192.168.9.1"), "notIpBlocks");
        assert!(!ok("/ip", OTHER, "10.0.0.1"));
        assert!(ok("/sa", SLEEP, "10.0.0.1"));
        assert!(!ok("/sa", OTHER, "10.0.0.1"));
        assert!(ok("/rip", OTHER, "10.9.3.3"));
        assert!(
            !ok("/other", SLEEP, "10.0.0.1"),
            "ALLOW policies present, none matches"
        );
        // A DENY without rules matches nothing: it denies nothing.
        let deny = rbac_configs(&t, WEB)[0].clone();
        assert_eq!(deny.rules.unwrap().action, rbac::rbac::Action::Deny as i32);
    }

    #[test]
    fn when_conditions_and_unknown_keys() {
        let (t, _) = translate(&format!(
            "{}{}",
            policy(
                "when",
                &format!(
                    r#"{{targetRefs: [{GW}], action: DENY, rules: [
                        {{when: [{{key: "request.headers[x-debug]", values: ["1", "on*"]}}]}},
                        {{when: [{{key: source.namespace, values: [other]}}, {{key: source.principal, notValues: ["*/sa/admin"]}}], to: [{{operation: {{paths: [/admin]}}}}]}},
                        {{when: [{{key: source.ip, values: ["172.16.0.0/12"]}}]}},
                        {{when: [{{key: "request.headers[x-any]", values: ["*"]}}], to: [{{operation: {{paths: [/any]}}}}]}}]}}"#
                ),
            ),
            policy(
                "unknown",
                &format!(
                    r#"{{targetRefs: [{GW}], rules: [{{when: [{{key: source.madeup, values: [x]}}]}}, {{to: [{{operation: {{paths: [/ok]}}}}]}}]}}"#
                ),
            ),
        ));
        let ok = |path: &str, h: &[(&str, &str)], peer: &str, client: &str| {
            allowed(&t, WEB, "GET", path, h, peer, client)
        };
        // The unknown key: the ALLOW rule holding it is left out (allows less), said so.
        assert_eq!(
            problems_of(&t, "unknown")[0..1],
            ["spec.rules[0].when[0].key: \"source.madeup\" is not a condition the waypoint knows"]
        );
        assert!(ok("/ok", &[], SLEEP, "10.0.0.1"));
        assert!(!ok("/x", &[], SLEEP, "10.0.0.1"));
        assert!(!ok("/ok", &[("x-debug", "1")], SLEEP, "10.0.0.1"));
        assert!(!ok("/ok", &[("x-debug", "only")], SLEEP, "10.0.0.1"));
        assert!(ok("/ok", &[("x-debug", "0")], SLEEP, "10.0.0.1"));
        // /admin from namespace other: denied unless the admin account.
        let admin_path_allowed = |peer: &str| {
            let (t, _) = translate(&format!(
                "{}{}",
                policy(
                    "when",
                    &format!(
                        r#"{{targetRefs: [{GW}], action: DENY, rules: [{{when: [{{key: source.namespace, values: [other]}}, {{key: source.principal, notValues: ["*/sa/admin"]}}], to: [{{operation: {{paths: [/admin]}}}}]}}]}}"#
                    ),
                ),
                ""
            ));
            allowed(&t, WEB, "GET", "/admin", &[], peer, "10.0.0.1")
        };
        assert!(!admin_path_allowed(OTHER));
        assert!(admin_path_allowed(
            "spiffe://cluster.local/ns/other/sa/admin"
        ));
        assert!(admin_path_allowed(SLEEP));
        assert!(!ok("/ok", &[], SLEEP, "172.20.0.1"), "source.ip");
        assert!(
            !ok("/any", &[("x-any", "")], SLEEP, "10.0.0.1"),
            "`*`: present"
        );
    }

    #[test]
    fn dry_run_policies_are_shadow_rules_and_jwt_conditions_are_said_to_never_match() {
        let (t, _) = translate(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: dry, namespace: shop, annotations: {{istio.io/dry-run: \"true\"}}}}\nspec: {{targetRefs: [{GW}], action: DENY, rules: [{{}}]}}\n{}",
            policy(
                "jwt",
                &format!(
                    r#"{{targetRefs: [{GW}], rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]}}"#
                ),
            )
        ));
        let c = rbac_configs(&t, WEB);
        assert!(c[0].rules.is_none());
        assert_eq!(c[0].shadow_rules_stat_prefix, "istio_dry_run_deny_");
        assert!(
            c[0].shadow_rules
                .as_ref()
                .unwrap()
                .policies
                .contains_key("ns[shop]-policy[dry]-rule[0]")
        );
        assert!(problems_of(&t, "jwt")[0].contains("RequestAuthentication"));
        // Nothing carries JWT claims: the ALLOW matches nothing, the request is denied.
        assert!(!allowed(&t, WEB, "GET", "/", &[], SLEEP, "10.0.0.1"));
    }

    #[test]
    fn string_forms() {
        let f = |v: &str, p: &str| format!("{:?}", string_matcher(v, p).match_pattern.unwrap());
        assert_eq!(
            f("*", "spiffe://"),
            "SafeRegex(RegexMatcher { regex: \".+\", engine_type: None })"
        );
        assert_eq!(f("a*", "spiffe://"), "Prefix(\"spiffe://a\")");
        assert_eq!(f("*a", ""), "Suffix(\"a\")");
        assert_eq!(
            f("*a", "spiffe://"),
            "SafeRegex(RegexMatcher { regex: \"spiffe://.*a\", engine_type: None })"
        );
        assert_eq!(f("a", "spiffe://"), "Exact(\"spiffe://a\")");
        assert_eq!(rule_name("ns", "p", 2), "ns[ns]-policy[p]-rule[2]");
        assert_eq!(
            claim_path("request.auth.claims[a][b]"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(header_name("request.headers[X-A]"), Some("X-A"));
    }
}
