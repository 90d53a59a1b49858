//! Local YAML configuration in the shape of Istio's workload API, for running without a control plane.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use mesh::state::{
    Action, Authorization, Cidr, Clause, DEFAULT_CLUSTER_ID, DEFAULT_HBONE_PORT,
    DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, GatewayAddress, GatewayDestination,
    HealthStatus, Match, Rule, Scope, Service, ServicePort, State, StateError, StringMatch,
    TunnelProtocol, Workload,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// Not YAML, or not the expected shape (unknown field, wrong type). The message carries
    /// serde's path and line/column.
    #[error("{origin}: {message}")]
    Syntax {
        origin: String,
        message: String,
        line: Option<usize>,
        column: Option<usize>,
    },
    #[error("{origin}: {object}: field \"{field}\": {message}")]
    Invalid {
        origin: String,
        object: String,
        field: String,
        message: String,
    },
    /// Objects valid on their own but conflicting with each other (duplicates).
    #[error("{origin}: {error}")]
    State { origin: String, error: StateError },
}

pub fn load(path: &Path) -> Result<State, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: origin.clone(),
        error,
    })?;
    parse(&text, &origin)
}

/// `origin` names the text in errors, normally its file name.
pub fn parse(text: &str, origin: &str) -> Result<State, ConfigError> {
    // `Option` so that an empty (or comment-only) file is an empty mesh rather than an error.
    let raw: Option<RawFile> = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        message: e.to_string(),
        line: e.location().map(|l| l.line()),
        column: e.location().map(|l| l.column()),
    })?;
    let raw = raw.unwrap_or_default();

    let services = raw
        .services
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, s)| convert_service(origin, i, s))
        .collect::<Result<Vec<_>, _>>()?;
    let policies = raw
        .policies
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, p)| convert_policy(origin, i, p))
        .collect::<Result<Vec<_>, _>>()?;

    let known = Known {
        services: services.iter().map(|s| (s.key(), s)).collect(),
        policies: policies.iter().map(|p| p.key()).collect(),
    };
    let workloads = raw
        .workloads
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, w)| convert_workload(origin, i, w, &known))
        .collect::<Result<Vec<_>, _>>()?;

    State::new(workloads, services, policies).map_err(|error| ConfigError::State {
        origin: origin.to_string(),
        error,
    })
}

// The file is read into loose "raw" structs, then converted field by field, so that every error
// can name the file, the object and the field at fault; serde alone only knows the path.

#[derive(Debug, Default, Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    expecting = "a mapping with optional \"workloads\", \"services\" and \"policies\" lists"
)]
struct RawFile {
    workloads: Option<Vec<RawWorkload>>,
    services: Option<Vec<RawService>>,
    policies: Option<Vec<RawPolicy>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWorkload {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    network: String,
    trust_domain: Option<String>,
    service_account: Option<String>,
    #[serde(default)]
    node: String,
    cluster_id: Option<String>,
    tunnel_protocol: Option<String>,
    waypoint: Option<RawGateway>,
    /// Wide integers so that out-of-range ports get our message, not serde's.
    #[serde(default)]
    services: UniqueMap<String, UniqueMap<i64, i64>>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    status: Option<String>,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    workload_name: String,
}

/// A YAML mapping in file order. Deserialising into a `BTreeMap` would silently keep the last
/// of two equal keys; a typo like that should be an error.
#[derive(Debug)]
struct UniqueMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for UniqueMap<K, V> {
    fn default() -> Self {
        UniqueMap(Vec::new())
    }
}

impl<'de, K, V> Deserialize<'de> for UniqueMap<K, V>
where
    K: Deserialize<'de> + PartialEq + std::fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<K, V>(std::marker::PhantomData<(K, V)>);

        impl<'de, K, V> serde::de::Visitor<'de> for Visitor<K, V>
        where
            K: Deserialize<'de> + PartialEq + std::fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = UniqueMap<K, V>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(K, V)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<K, V>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key}")));
                    }
                    entries.push((key, value));
                }
                Ok(UniqueMap(entries))
            }
        }

        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// Either `address`, or `hostname` with its `namespace`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawGateway {
    address: Option<String>,
    hostname: Option<String>,
    namespace: Option<String>,
    hbone_mtls_port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    waypoint: Option<RawGateway>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServicePort {
    service_port: Option<i64>,
    target_port: Option<i64>,
    #[serde(default)]
    app_protocol: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    scope: Option<String>,
    action: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    clauses: Vec<RawClause>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawClause {
    #[serde(default)]
    matches: Vec<RawMatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    not_service_accounts: Vec<String>,
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    source_ips: Vec<String>,
    #[serde(default)]
    not_source_ips: Vec<String>,
    #[serde(default)]
    destination_ips: Vec<String>,
    #[serde(default)]
    not_destination_ips: Vec<String>,
    #[serde(default)]
    destination_ports: Vec<i64>,
    #[serde(default)]
    not_destination_ports: Vec<i64>,
}

/// What workloads may refer to.
struct Known<'a> {
    services: HashMap<String, &'a Service>,
    policies: HashSet<String>,
}

/// The object being converted, so each error can say where it is.
struct Object<'a> {
    origin: &'a str,
    label: String,
}

impl<'a> Object<'a> {
    /// `section[index] (ns/name)`; the name is left out while it is still unknown.
    fn new(origin: &'a str, section: &str, index: usize, namespace: &str, name: &str) -> Self {
        let label = if !namespace.is_empty() && !name.is_empty() {
            format!("{section}[{index}] ({namespace}/{name})")
        } else if !name.is_empty() {
            format!("{section}[{index}] ({name})")
        } else {
            format!("{section}[{index}]")
        };
        Object { origin, label }
    }

    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            object: self.label.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn required(&self, field: &str, value: String) -> Result<String, ConfigError> {
        if value.is_empty() {
            return Err(self.err(field, "is required"));
        }
        Ok(value)
    }

    fn ip(&self, field: &str, value: &str) -> Result<IpAddr, ConfigError> {
        value
            .parse()
            .map_err(|_| self.err(field, format!("{value:?} is not an IP address")))
    }

    fn ips(&self, field: &str, values: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| self.ip(&format!("{field}[{i}]"), v))
            .collect()
    }

    fn cidrs(&self, field: &str, values: &[String]) -> Result<Vec<Cidr>, ConfigError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.parse::<Cidr>()
                    .map_err(|e| self.err(format!("{field}[{i}]"), e.to_string()))
            })
            .collect()
    }

    fn port(&self, field: &str, value: i64) -> Result<u16, ConfigError> {
        match u16::try_from(value) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(self.err(field, format!("{value} is not a port (1-65535)"))),
        }
    }

    fn ports(&self, field: &str, values: &[i64]) -> Result<Vec<u16>, ConfigError> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| self.port(&format!("{field}[{i}]"), v))
            .collect()
    }

    /// Namespaces and service accounts end up in SPIFFE ids and policy keys, which split on
    /// '/', so hold them to Kubernetes' own rule for these names (an RFC 1123 label).
    fn dns_label(&self, field: &str, value: String) -> Result<String, ConfigError> {
        let value = self.required(field, value)?;
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        let ok = value.len() <= 63
            && value.chars().all(ok_char)
            && !value.starts_with('-')
            && !value.ends_with('-');
        if !ok {
            return Err(self.err(
                field,
                format!(
                    "{value:?} is not a DNS label (at most 63 of a-z, 0-9 and '-', \
                     not starting or ending with '-')"
                ),
            ));
        }
        Ok(value)
    }

    /// The SPIFFE trust domain character set.
    fn trust_domain(&self, field: &str, value: String) -> Result<String, ConfigError> {
        let value = self.required(field, value)?;
        let ok_char = |c: char| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' || c == '_'
        };
        if !value.chars().all(ok_char) {
            return Err(self.err(
                field,
                format!("{value:?} is not a trust domain (a-z, 0-9, '.', '-', '_')"),
            ));
        }
        Ok(value)
    }

    /// `x` exact, `x*` prefix, `*x` suffix, `*` any value.
    fn string_match(&self, field: &str, value: &str) -> Result<StringMatch, ConfigError> {
        let m = if value == "*" {
            StringMatch::Presence
        } else if let Some(rest) = value.strip_prefix('*') {
            StringMatch::Suffix(rest.to_string())
        } else if let Some(rest) = value.strip_suffix('*') {
            StringMatch::Prefix(rest.to_string())
        } else {
            StringMatch::Exact(value.to_string())
        };
        let inner = match &m {
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s.as_str(),
            StringMatch::Presence => "x",
        };
        if inner.is_empty() {
            return Err(self.err(
                field,
                "an empty string matches nothing; use \"*\" for any value",
            ));
        }
        if inner.contains('*') {
            return Err(self.err(
                field,
                format!("{value:?}: '*' may only be the first or last character, once"),
            ));
        }
        Ok(m)
    }

    fn string_matches(
        &self,
        field: &str,
        values: &[String],
    ) -> Result<Vec<StringMatch>, ConfigError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| self.string_match(&format!("{field}[{i}]"), v))
            .collect()
    }

    fn gateway(&self, field: &str, raw: RawGateway) -> Result<GatewayAddress, ConfigError> {
        let destination = match (raw.address, raw.hostname) {
            (Some(address), None) => {
                if raw.namespace.is_some() {
                    return Err(self.err(
                        format!("{field}.namespace"),
                        "only goes with \"hostname\", not \"address\"",
                    ));
                }
                GatewayDestination::Address(self.ip(&format!("{field}.address"), &address)?)
            }
            (None, Some(hostname)) => GatewayDestination::Hostname {
                namespace: self.dns_label(
                    &format!("{field}.namespace"),
                    raw.namespace.unwrap_or_default(),
                )?,
                hostname: self.required(&format!("{field}.hostname"), hostname)?,
            },
            _ => {
                return Err(self.err(field, "needs exactly one of \"address\" and \"hostname\""));
            }
        };
        let hbone_mtls_port = match raw.hbone_mtls_port {
            Some(p) => self.port(&format!("{field}.hboneMtlsPort"), p)?,
            None => DEFAULT_HBONE_PORT,
        };
        Ok(GatewayAddress {
            destination,
            hbone_mtls_port,
        })
    }
}

fn convert_workload(
    origin: &str,
    index: usize,
    raw: RawWorkload,
    known: &Known<'_>,
) -> Result<Workload, ConfigError> {
    let o = Object::new(origin, "workloads", index, &raw.namespace, &raw.name);
    let uid = o.required("uid", raw.uid)?;
    let name = o.required("name", raw.name)?;
    let namespace = o.dns_label("namespace", raw.namespace)?;
    let addresses = o.ips("addresses", &raw.addresses)?;
    let tunnel_protocol = match raw.tunnel_protocol.as_deref() {
        None | Some("NONE") => TunnelProtocol::None,
        Some("HBONE") => TunnelProtocol::Hbone,
        Some(other) => {
            return Err(o.err(
                "tunnelProtocol",
                format!("{other:?} is not one of \"NONE\", \"HBONE\""),
            ));
        }
    };
    if tunnel_protocol == TunnelProtocol::Hbone && addresses.is_empty() {
        return Err(o.err("addresses", "an HBONE workload needs at least one address"));
    }
    let status = match raw.status.as_deref() {
        None | Some("HEALTHY") => HealthStatus::Healthy,
        Some("UNHEALTHY") => HealthStatus::Unhealthy,
        Some(other) => {
            return Err(o.err(
                "status",
                format!("{other:?} is not one of \"HEALTHY\", \"UNHEALTHY\""),
            ));
        }
    };
    let trust_domain = o.trust_domain(
        "trustDomain",
        raw.trust_domain
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string()),
    )?;
    let service_account = o.dns_label(
        "serviceAccount",
        raw.service_account
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string()),
    )?;
    let waypoint = raw.waypoint.map(|g| o.gateway("waypoint", g)).transpose()?;

    let mut services = BTreeMap::new();
    for (key, ports) in raw.services.0 {
        let field = format!("services[{key}]");
        let Some(service) = known.services.get(&key) else {
            return Err(o.err(
                field,
                format!("no service with key {key:?} (\"<namespace>/<hostname>\") in \"services\""),
            ));
        };
        let mut converted = BTreeMap::new();
        for (service_port, target_port) in ports.0 {
            let port_field = format!("{field}[{service_port}]");
            let sp = o.port(&port_field, service_port)?;
            let tp = o.port(&port_field, target_port)?;
            if service.port(sp).is_none() {
                return Err(o.err(port_field, format!("service {key} has no port {sp}")));
            }
            converted.insert(sp, tp);
        }
        services.insert(key, converted);
    }

    for (i, key) in raw.authorization_policies.iter().enumerate() {
        if !known.policies.contains(key) {
            return Err(o.err(
                format!("authorizationPolicies[{i}]"),
                format!("no policy with key {key:?} (\"<namespace>/<name>\") in \"policies\""),
            ));
        }
    }

    Ok(Workload {
        uid,
        name,
        namespace,
        addresses,
        hostname: raw.hostname,
        network: raw.network,
        trust_domain,
        service_account,
        node: raw.node,
        cluster_id: raw
            .cluster_id
            .unwrap_or_else(|| DEFAULT_CLUSTER_ID.to_string()),
        tunnel_protocol,
        waypoint,
        services,
        authorization_policies: raw.authorization_policies,
        status,
        canonical_name: raw.canonical_name,
        canonical_revision: raw.canonical_revision,
        workload_type: raw.workload_type,
        workload_name: raw.workload_name,
        labels: Default::default(),
    })
}

fn convert_service(origin: &str, index: usize, raw: RawService) -> Result<Service, ConfigError> {
    let o = Object::new(origin, "services", index, &raw.namespace, &raw.name);
    let name = o.required("name", raw.name)?;
    let namespace = o.dns_label("namespace", raw.namespace)?;
    let hostname = o.required("hostname", raw.hostname)?;
    let addresses = o.ips("addresses", &raw.addresses)?;
    let mut ports: Vec<ServicePort> = Vec::with_capacity(raw.ports.len());
    for (i, p) in raw.ports.into_iter().enumerate() {
        let field = format!("ports[{i}]");
        let Some(service_port) = p.service_port else {
            return Err(o.err(format!("{field}.servicePort"), "is required"));
        };
        let service_port = o.port(&format!("{field}.servicePort"), service_port)?;
        if ports.iter().any(|q| q.service_port == service_port) {
            return Err(o.err(
                format!("{field}.servicePort"),
                format!("port {service_port} is listed twice"),
            ));
        }
        let target_port = match p.target_port {
            Some(t) => o.port(&format!("{field}.targetPort"), t)?,
            // Unknown: each endpoint's own mapping decides, else the service port.
            None => 0,
        };
        ports.push(ServicePort {
            service_port,
            target_port,
            app_protocol: p.app_protocol,
        });
    }
    let waypoint = raw.waypoint.map(|g| o.gateway("waypoint", g)).transpose()?;
    Ok(Service {
        name,
        namespace,
        hostname,
        addresses,
        ports,
        subject_alt_names: raw.subject_alt_names,
        waypoint,
    })
}

fn convert_policy(
    origin: &str,
    index: usize,
    raw: RawPolicy,
) -> Result<Authorization, ConfigError> {
    let o = Object::new(origin, "policies", index, &raw.namespace, &raw.name);
    let name = o.required("name", raw.name)?;
    let namespace = o.dns_label("namespace", raw.namespace)?;
    // No defaults: the proto's zero values (GLOBAL, ALLOW) are too far-reaching to get by
    // leaving a line out.
    let scope = match raw.scope.as_deref() {
        Some("GLOBAL") => Scope::Global,
        Some("NAMESPACE") => Scope::Namespace,
        Some("WORKLOAD_SELECTOR") => Scope::WorkloadSelector,
        other => {
            return Err(o.err(
                "scope",
                format!(
                    "{} one of \"GLOBAL\", \"NAMESPACE\", \"WORKLOAD_SELECTOR\"",
                    describe(other)
                ),
            ));
        }
    };
    let action = match raw.action.as_deref() {
        Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        other => {
            return Err(o.err(
                "action",
                format!("{} one of \"ALLOW\", \"DENY\"", describe(other)),
            ));
        }
    };
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (r, rule) in raw.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, raw_match) in clause.matches.iter().enumerate() {
                let at = format!("rules[{r}].clauses[{c}].matches[{m}]");
                matches.push(convert_match(&o, &at, raw_match)?);
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Authorization {
        name,
        namespace,
        scope,
        action,
        rules,
        dry_run: raw.dry_run,
    })
}

/// Start of the message for a missing or unknown enum value.
fn describe(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{v:?} is not"),
        None => "is required; it must be".to_string(),
    }
}

fn convert_match(o: &Object<'_>, at: &str, raw: &RawMatch) -> Result<Match, ConfigError> {
    let strings = |name: &str, values: &[String]| o.string_matches(&format!("{at}.{name}"), values);
    let cidrs = |name: &str, values: &[String]| o.cidrs(&format!("{at}.{name}"), values);
    let ports = |name: &str, values: &[i64]| o.ports(&format!("{at}.{name}"), values);
    Ok(Match {
        namespaces: strings("namespaces", &raw.namespaces)?,
        not_namespaces: strings("notNamespaces", &raw.not_namespaces)?,
        service_accounts: strings("serviceAccounts", &raw.service_accounts)?,
        not_service_accounts: strings("notServiceAccounts", &raw.not_service_accounts)?,
        principals: strings("principals", &raw.principals)?,
        not_principals: strings("notPrincipals", &raw.not_principals)?,
        source_ips: cidrs("sourceIps", &raw.source_ips)?,
        not_source_ips: cidrs("notSourceIps", &raw.not_source_ips)?,
        destination_ips: cidrs("destinationIps", &raw.destination_ips)?,
        not_destination_ips: cidrs("notDestinationIps", &raw.not_destination_ips)?,
        destination_ports: ports("destinationPorts", &raw.destination_ports)?,
        not_destination_ports: ports("notDestinationPorts", &raw.not_destination_ports)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorization::{self, Connection, Decision};
    use mesh::state::Destination;
    use std::path::PathBuf;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    fn parse_err(text: &str) -> String {
        match parse(text, "bad.yaml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{msg:?} does not contain {part:?}");
        }
    }

    #[test]
    fn example_loads() {
        let state = load(&testdata("example.yaml")).unwrap();
        assert!(state.workloads().count() >= 4);

        let page = state
            .workload_by_uid("cluster1//v1/Pod/default/productpage-1")
            .unwrap();
        assert_eq!(page.service_account, "bookinfo-productpage");
        assert_eq!(page.trust_domain, "cluster.local");
        assert_eq!(page.tunnel_protocol, TunnelProtocol::Hbone);
        assert_eq!(
            page.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );

        // A VIP resolves to a healthy endpoint with the mapped target port.
        let reviews = state
            .service("default/reviews.default.svc.cluster.local")
            .unwrap();
        let vip = reviews.addresses[0];
        for _ in 0..4 {
            match state.resolve((vip, 9080).into()) {
                Destination::Service {
                    endpoint,
                    target_port,
                    ..
                } => {
                    assert_eq!(endpoint.status, HealthStatus::Healthy);
                    assert_eq!(target_port, 9080);
                }
                other => panic!("{other:?}"),
            }
        }

        // And the policies in it do what their comments say.
        let ratings = state
            .workload_by_uid("cluster1//v1/Pod/default/ratings-1")
            .unwrap();
        let conn = |sa: &str| Connection {
            src_identity: Some(
                format!("spiffe://cluster.local/ns/default/sa/{sa}")
                    .parse()
                    .unwrap(),
            ),
            src_ip: "10.244.2.20".parse().unwrap(),
            dst_ip: ratings.addresses[0],
            dst_port: 9080,
        };
        assert_eq!(
            authorization::check(&state, ratings, &conn("bookinfo-reviews")),
            Decision::Allow
        );
        assert!(!authorization::check(&state, ratings, &conn("bookinfo-details")).is_allowed());
        assert_eq!(
            authorization::check(&state, page, &conn("bad")),
            Decision::Deny {
                policy: "default/deny-bad".into()
            }
        );
    }

    #[test]
    fn empty_files_are_an_empty_mesh() {
        for text in [
            "",
            "# nothing yet\n",
            "workloads:\nservices:\npolicies:\n",
            "{}",
        ] {
            let state = parse(text, "empty.yaml").unwrap();
            assert_eq!(state.workloads().count(), 0, "{text:?}");
        }
    }

    #[test]
    fn defaults() {
        let state = parse(
            "workloads:\n- {uid: u, name: a, namespace: default}\n",
            "t.yaml",
        )
        .unwrap();
        let w = state.workload_by_uid("u").unwrap();
        assert_eq!(w.service_account, "default");
        assert_eq!(w.trust_domain, "cluster.local");
        assert_eq!(w.cluster_id, "Kubernetes");
        assert_eq!(w.tunnel_protocol, TunnelProtocol::None);
        assert_eq!(w.status, HealthStatus::Healthy);
    }

    #[test]
    fn string_match_forms() {
        let state = parse(
            r#"
policies:
- name: p
  namespace: default
  scope: NAMESPACE
  action: ALLOW
  rules:
  - clauses:
    - matches:
      - principals: ["a", "b*", "*c", "*"]
"#,
            "t.yaml",
        )
        .unwrap();
        let p = state.policy("default/p").unwrap();
        assert_eq!(
            p.rules[0].clauses[0].matches[0].principals,
            [
                StringMatch::Exact("a".into()),
                StringMatch::Prefix("b".into()),
                StringMatch::Suffix("c".into()),
                StringMatch::Presence,
            ]
        );
    }

    #[test]
    fn bad_address_names_file_object_and_field() {
        let msg = load(&testdata("bad/bad-address.yaml"))
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "bad-address.yaml: ",
                "workloads[1] (default/productpage-1)",
                "field \"addresses[0]\"",
                "\"10.244.1\" is not an IP address",
            ],
        );
    }

    #[test]
    fn unknown_field_carries_location() {
        let err = load(&testdata("bad/unknown-field.yaml")).unwrap_err();
        let msg = err.to_string();
        assert_contains(&msg, &["unknown-field.yaml: ", "serviceAcount", "line 6"]);
        match err {
            ConfigError::Syntax { line, column, .. } => {
                assert_eq!(line, Some(6));
                assert!(column.is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_type_carries_location() {
        let msg = parse_err("workloads:\n- uid: u\n  addresses: 10.0.0.1\n");
        assert_contains(&msg, &["bad.yaml: ", "workloads[0].addresses", "line 3"]);
        let msg = parse_err("- a\n- b\n");
        assert_contains(&msg, &["bad.yaml: ", "expected a mapping with optional"]);
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let msg = parse_err(
            "services:\n- {name: s, namespace: default, hostname: s.default, ports: [{servicePort: 80}]}\n\
             workloads:\n- {uid: u, name: a, namespace: default, services: {default/s.default: {80: 80, 80: 81}}}\n",
        );
        assert_contains(&msg, &["bad.yaml: ", "duplicate key 80", "line 4"]);
    }

    #[test]
    fn unknown_service_reference() {
        let msg = load(&testdata("bad/unknown-service.yaml"))
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "unknown-service.yaml: ",
                "workloads[0] (default/reviews-1)",
                "field \"services[default/reviewz.default.svc.cluster.local]\"",
                "no service",
            ],
        );
    }

    #[test]
    fn bad_cidr_in_policy() {
        let msg = load(&testdata("bad/bad-cidr.yaml"))
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "bad-cidr.yaml: ",
                "policies[0] (default/deny-bad)",
                "field \"rules[0].clauses[0].matches[1].sourceIps[1]\"",
                "\"10.244.2.0/33\" is not a CIDR",
            ],
        );
    }

    #[test]
    fn duplicate_address() {
        let msg = load(&testdata("bad/duplicate-address.yaml"))
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "duplicate-address.yaml: ",
                "default/a ",
                "default/b ",
                "10.244.1.10",
            ],
        );
    }

    #[test]
    fn field_errors() {
        let cases: &[(&str, &[&str])] = &[
            (
                "workloads:\n- {name: a, namespace: default}\n",
                &["workloads[0] (default/a)", "field \"uid\"", "is required"],
            ),
            (
                "workloads:\n- {uid: u, name: a}\n",
                &["workloads[0] (a)", "field \"namespace\"", "is required"],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: Default}\n",
                &["field \"namespace\"", "not a DNS label"],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, serviceAccount: a/b}\n",
                &["field \"serviceAccount\"", "\"a/b\" is not a DNS label"],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, trustDomain: a/b}\n",
                &["field \"trustDomain\"", "not a trust domain"],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, tunnelProtocol: HBONE}\n",
                &[
                    "field \"addresses\"",
                    "HBONE workload needs at least one address",
                ],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, tunnelProtocol: hbone}\n",
                &["field \"tunnelProtocol\"", "\"hbone\" is not one of"],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, status: UP}\n",
                &["field \"status\"", "\"UP\""],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, authorizationPolicies: [default/nope]}\n",
                &[
                    "field \"authorizationPolicies[0]\"",
                    "no policy with key \"default/nope\"",
                ],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, waypoint: {hostname: w}}\n",
                &["field \"waypoint.namespace\"", "is required"],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, waypoint: {address: 10.0.0.1, hostname: w}}\n",
                &["field \"waypoint\"", "exactly one"],
            ),
            (
                "workloads:\n- {uid: u, name: a, namespace: default, waypoint: {address: 10.0.0.1, hboneMtlsPort: 0}}\n",
                &["field \"waypoint.hboneMtlsPort\"", "0 is not a port"],
            ),
            (
                "services:\n- {name: s, namespace: default, hostname: s.default, ports: [{servicePort: 70000}]}\n",
                &[
                    "services[0] (default/s)",
                    "field \"ports[0].servicePort\"",
                    "70000 is not a port",
                ],
            ),
            (
                "services:\n- {name: s, namespace: default, hostname: s.default, ports: [{targetPort: 80}]}\n",
                &["field \"ports[0].servicePort\"", "is required"],
            ),
            (
                "services:\n- {name: s, namespace: default, hostname: s.default, ports: [{servicePort: 80}, {servicePort: 80}]}\n",
                &["field \"ports[1].servicePort\"", "listed twice"],
            ),
            (
                "services:\n- {name: s, namespace: default, addresses: [10.96.0.1]}\n",
                &["field \"hostname\"", "is required"],
            ),
            (
                "services:\n- {name: s, namespace: default, hostname: s.default, addresses: [10.96.0.1]}\n\
                 workloads:\n- {uid: u, name: a, namespace: default, services: {default/s.default: {81: 8080}}}\n",
                &[
                    "field \"services[default/s.default][81]\"",
                    "has no port 81",
                ],
            ),
            (
                "services:\n- {name: s, namespace: default, hostname: s.default, ports: [{servicePort: 81}]}\n\
                 workloads:\n- {uid: u, name: a, namespace: default, services: {default/s.default: {81: -1}}}\n",
                &[
                    "field \"services[default/s.default][81]\"",
                    "-1 is not a port",
                ],
            ),
            (
                "policies:\n- {name: p, namespace: default, action: DENY}\n",
                &[
                    "policies[0] (default/p)",
                    "field \"scope\"",
                    "is required; it must be one of",
                ],
            ),
            (
                "policies:\n- {name: p, namespace: default, scope: GLOBAL, action: deny}\n",
                &["field \"action\"", "\"deny\" is not one of"],
            ),
            (
                "policies:\n- {name: p, namespace: default, scope: GLOBAL, action: DENY, rules: [{clauses: [{matches: [{principals: [\"a*b*\"]}]}]}]}\n",
                &[
                    "field \"rules[0].clauses[0].matches[0].principals[0]\"",
                    "'*'",
                ],
            ),
            (
                "policies:\n- {name: p, namespace: default, scope: GLOBAL, action: DENY, rules: [{clauses: [{matches: [{namespaces: [\"\"]}]}]}]}\n",
                &[
                    "field \"rules[0].clauses[0].matches[0].namespaces[0]\"",
                    "empty string",
                ],
            ),
            (
                "policies:\n- {name: p, namespace: default, scope: GLOBAL, action: DENY, rules: [{clauses: [{matches: [{notDestinationPorts: [0]}]}]}]}\n",
                &[
                    "field \"rules[0].clauses[0].matches[0].notDestinationPorts[0]\"",
                    "0 is not a port",
                ],
            ),
            (
                "policies:\n- {name: p, namespace: default, scope: GLOBAL, action: DENY}\n\
                 - {name: p, namespace: default, scope: GLOBAL, action: ALLOW}\n",
                &["bad.yaml: ", "policy \"default/p\" is defined twice"],
            ),
        ];
        for (text, parts) in cases {
            let msg = parse_err(text);
            assert!(msg.starts_with("bad.yaml: "), "{msg}");
            assert_contains(&msg, parts);
        }
    }

    #[test]
    fn read_error_names_the_file() {
        let msg = load(&testdata("does-not-exist.yaml"))
            .unwrap_err()
            .to_string();
        assert_contains(&msg, &["does-not-exist.yaml: "]);
    }
}
