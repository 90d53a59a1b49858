//! Gateway API `ReferenceGrant` (`gateway.networking.k8s.io/v1beta1`): the owner of a
//! namespace lets routes of other namespaces refer to its objects. A route's `backendRef` (or
//! mirror) to a Service in another namespace is allowed only when a grant in the Service's
//! namespace names the route's group, kind and namespace in `from` and the Service (group "",
//! kind Service, optionally its name) in `to`.

use serde_yaml_ng::Value;

use crate::k8s::{Meta, Origin, Problem};
use crate::routing::{At, join, spec_at};

/// One `spec.from` entry: who may refer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct From {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

/// One `spec.to` entry: what they may refer to (every object of the kind without a name).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct To {
    pub group: String,
    pub kind: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReferenceGrant {
    pub meta: Meta,
    pub from: Vec<From>,
    pub to: Vec<To>,
}

/// A reference from an object of `from` (group, kind, namespace) to the object `to` (group,
/// kind, namespace, name).
#[derive(Debug, Clone, Copy)]
pub struct Reference<'a> {
    pub from: (&'a str, &'a str, &'a str),
    pub to: (&'a str, &'a str, &'a str, &'a str),
}

impl ReferenceGrant {
    /// Whether this grant allows `r` (it must live in the namespace referred to).
    pub fn permits(&self, r: &Reference<'_>) -> bool {
        let (from_group, from_kind, from_ns) = r.from;
        let (to_group, to_kind, to_ns, to_name) = r.to;
        self.meta.namespace == to_ns
            && self
                .from
                .iter()
                .any(|f| f.group == from_group && f.kind == from_kind && f.namespace == from_ns)
            && self.to.iter().any(|t| {
                t.group == to_group
                    && t.kind == to_kind
                    && t.name.as_deref().is_none_or(|n| n == to_name)
            })
    }
}

/// Whether any of `grants` allows `r`; a reference within one namespace needs none.
pub fn permitted<'a>(
    grants: impl IntoIterator<Item = &'a ReferenceGrant>,
    r: &Reference<'_>,
) -> bool {
    r.from.2 == r.to.2 || grants.into_iter().any(|g| g.permits(r))
}

fn required(a: &At<'_>, key: &str) -> Result<String, Problem> {
    let v = a.get(key, |v| v.string())?.unwrap_or_default();
    if v.is_empty() {
        return Err(Problem {
            field: join(a.path, key),
            ..a.problem("is required")
        });
    }
    Ok(v)
}

/// A ReferenceGrant's spec, checked field by field.
pub fn reference_grant(
    origin: &Origin,
    meta: Meta,
    spec: Value,
) -> Result<ReferenceGrant, Problem> {
    let at = spec_at(origin, &spec);
    at.object(&["from", "to"])?;
    let from = at
        .get("from", |a| {
            a.list(|f| {
                f.object(&["group", "kind", "namespace"])?;
                Ok(From {
                    group: f.get("group", |g| g.string())?.unwrap_or_default(),
                    kind: required(&f, "kind")?,
                    namespace: required(&f, "namespace")?,
                })
            })
        })?
        .unwrap_or_default();
    let to = at
        .get("to", |a| {
            a.list(|t| {
                t.object(&["group", "kind", "name"])?;
                Ok(To {
                    group: t.get("group", |g| g.string())?.unwrap_or_default(),
                    kind: required(&t, "kind")?,
                    name: t.get("name", |n| n.string())?.filter(|n| !n.is_empty()),
                })
            })
        })?
        .unwrap_or_default();
    for (field, empty) in [("spec.from", from.is_empty()), ("spec.to", to.is_empty())] {
        if empty {
            return Err(Problem {
                field: field.into(),
                ..at.problem("needs at least one entry")
            });
        }
    }
    Ok(ReferenceGrant { meta, from, to })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{Object, parse_documents};

    const GRANT: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: backend}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}
  to:
  - {group: "", kind: Service, name: api}
"#;

    fn parsed(text: &str) -> Result<ReferenceGrant, String> {
        let p = parse_documents(text, "grants.yaml");
        if let Some(problem) = p.problems.first() {
            return Err(problem.to_string());
        }
        match p.objects.into_iter().next() {
            Some((_, Object::ReferenceGrant(g))) => Ok(g),
            other => panic!("{other:?}"),
        }
    }

    fn route_to(ns: &'static str, name: &'static str) -> Reference<'static> {
        Reference {
            from: ("gateway.networking.k8s.io", "HTTPRoute", "shop"),
            to: ("", "Service", ns, name),
        }
    }

    #[test]
    fn a_grant_allows_exactly_what_it_names() {
        let g = parsed(GRANT).unwrap();
        assert_eq!(g.meta.namespace, "backend");
        assert!(g.permits(&route_to("backend", "api")));
        assert!(!g.permits(&route_to("backend", "db")), "another name");
        assert!(!g.permits(&route_to("other", "api")), "another namespace");
        let grpc = Reference {
            from: ("gateway.networking.k8s.io", "GRPCRoute", "shop"),
            ..route_to("backend", "api")
        };
        assert!(!g.permits(&grpc), "another kind of route");
        let elsewhere = Reference {
            from: ("gateway.networking.k8s.io", "HTTPRoute", "dev"),
            ..route_to("backend", "api")
        };
        assert!(!g.permits(&elsewhere), "routes of another namespace");
        // Without a name: every Service of the namespace.
        let all = parsed(&GRANT.replace(", name: api", "")).unwrap();
        assert!(all.permits(&route_to("backend", "db")));
        // Same namespace: no grant needed.
        assert!(permitted([], &route_to("shop", "web")));
        assert!(!permitted([], &route_to("backend", "api")));
        assert!(permitted([&g], &route_to("backend", "api")));
    }

    #[test]
    fn invalid_grants_are_reported() {
        for (text, want) in [
            (
                GRANT.replace(", namespace: shop", ""),
                "field \"spec.from[0].namespace\": is required",
            ),
            (
                GRANT.replace("kind: Service, ", ""),
                "field \"spec.to[0].kind\": is required",
            ),
            (
                GRANT.replace(
                    "  to:\n  - {group: \"\", kind: Service, name: api}\n",
                    "  to: []\n",
                ),
                "field \"spec.to\": needs at least one entry",
            ),
            (
                GRANT.replace("name: api", "nmae: api"),
                "field \"spec.to[0].nmae\": unknown field",
            ),
        ] {
            let e = parsed(&text).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(e.contains("ReferenceGrant backend/from-shop"), "{e}");
        }
    }
}
