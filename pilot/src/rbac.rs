//! L7 authorization at waypoints: AuthorizationPolicies bound with `targetRefs` (a waypoint Gateway, the waypoint GatewayClass, or a Service behind a waypoint) translated into Envoy's HTTP RBAC filters the way Istio translates them, plus a problem for every binding no waypoint enforces.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
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

    /// Whether any policy applies to `svc` on waypoint `gw`.
    pub fn any_for(&self, gw: &Key, svc: &Key) -> bool {
        self.gateway.get(gw).is_some_and(|v| !v.is_empty())
            || self.service.get(svc).is_some_and(|v| !v.is_empty())
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

/// The problem for a TCP listener that policies apply to: the waypoint enforces them on HTTP
/// listeners only (no network RBAC filter yet), so they are in force nowhere there.
pub fn tcp_problems(
    s: &Snapshot,
    policies: &[&AuthorizationPolicy],
    service: &Key,
    port: u16,
    waypoint: &Key,
) -> Vec<Problem> {
    policies
        .iter()
        .map(|p| {
            problem(
                s,
                p,
                "spec.targetRefs",
                format!(
                    "not enforced on TCP port {port} of Service {}/{} (waypoint {}/{} enforces policies on HTTP ports only)",
                    service.0, service.1, waypoint.0, waypoint.1
                ),
            )
        })
        .collect()
}

/// Istio's rule name, which Envoy reports as the policy that matched.
pub fn rule_name(ns: &str, name: &str, i: usize) -> String {
    format!("ns[{ns}]-policy[{name}]-rule[{i}]")
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
    let mut problems = Vec::new();
    let mut filters = Vec::new();
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
                if jwt {
                    problems.push(problem(
                        s,
                        p,
                        &format!("spec.rules[{i}]"),
                        "request principals and request.auth conditions need RequestAuthentication (JWT), which is not supported: no request carries them, so they never match (as in Istio for a request without a token)".into(),
                    ));
                }
                let mut unsupported = Vec::new();
                let policy = rule_policy(&r.from, &r.to, &r.when, port, &mut unsupported);
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
        let shadow_prefix = match (&shadow, action) {
            (Some(_), PolicyAction::Allow) => "istio_dry_run_allow_",
            (Some(_), PolicyAction::Deny) => "istio_dry_run_deny_",
            _ => "",
        };
        let config = http_rbac::Rbac {
            rules: enforce,
            shadow_rules: shadow,
            shadow_rules_stat_prefix: shadow_prefix.to_string(),
            ..Default::default()
        };
        filters.push(hcm::HttpFilter {
            name: HTTP_RBAC_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(config))),
            ..Default::default()
        });
    }
    (filters, problems)
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
    unsupported: &mut Vec<(String, String)>,
) -> rbac::Policy {
    let mut when_permissions = Vec::new();
    let mut when_principals = Vec::new();
    for (i, c) in when.iter().enumerate() {
        let a = Attribute {
            key: c.key.clone(),
            values: c.values.clone(),
            not_values: c.not_values.clone(),
        };
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
    for op in ops {
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
    for src in sources {
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
