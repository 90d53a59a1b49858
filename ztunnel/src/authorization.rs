//! L4 authorization: evaluates the Istio policies that apply to a destination workload against one connection.

use std::cell::OnceCell;
use std::net::IpAddr;

use mesh::identity::Identity;

use mesh::state::{Action, Authorization, Cidr, Match, State, StringMatch, Workload};

/// What authorization sees of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The peer's mTLS identity; `None` for plaintext.
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is the `"<ns>/<name>"` of the DENY policy that matched, or [`NO_ALLOW_MATCHED`].
    Deny {
        policy: String,
    },
}

/// The reason given when ALLOW policies exist and none matched.
pub const NO_ALLOW_MATCHED: &str = "no ALLOW policy matched";

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Istio's order: a matching DENY wins; with no ALLOW policy, allow; otherwise an ALLOW policy
/// must match. Dry-run policies are evaluated and logged but never change the outcome.
pub fn check(state: &State, workload: &Workload, conn: &Connection) -> Decision {
    let peer = Peer::new(conn.src_identity.as_ref());
    let mut denied_by: Option<String> = None;
    let mut any_allow = false;
    let mut allowed = false;

    for policy in state.policies_for(workload) {
        let matched = policy_matches_peer(policy, conn, &peer);
        if policy.dry_run {
            log_dry_run(policy, workload, conn, matched);
            continue;
        }
        match policy.action {
            Action::Deny => {
                if matched && denied_by.is_none() {
                    denied_by = Some(policy.key());
                }
            }
            Action::Allow => {
                any_allow = true;
                allowed |= matched;
            }
        }
    }

    if let Some(policy) = denied_by {
        Decision::Deny { policy }
    } else if !any_allow || allowed {
        Decision::Allow
    } else {
        Decision::Deny {
            policy: NO_ALLOW_MATCHED.to_string(),
        }
    }
}

/// Whether any rule of `policy` matches `conn`, ignoring `dry_run`.
pub fn policy_matches(policy: &Authorization, conn: &Connection) -> bool {
    policy_matches_peer(policy, conn, &Peer::new(conn.src_identity.as_ref()))
}

fn log_dry_run(policy: &Authorization, workload: &Workload, conn: &Connection, matched: bool) {
    let effect = match (policy.action, matched) {
        (Action::Deny, true) => "would deny",
        (Action::Deny, false) => "would not deny",
        (Action::Allow, true) => "would allow",
        (Action::Allow, false) => "would not allow",
    };
    tracing::info!(
        policy = %policy.key(),
        destination = %format_args!("{}/{}", workload.namespace, workload.name),
        src = %conn.src_ip,
        src_identity = ?conn.src_identity.as_ref().map(ToString::to_string),
        dst = %format_args!("{}:{}", conn.dst_ip, conn.dst_port),
        "dry-run authorization policy {effect} this connection"
    );
}

/// The peer identity in the forms policies compare against, built only if some policy asks.
struct Peer<'a> {
    identity: Option<&'a Identity>,
    principal: OnceCell<String>,
    namespaced_sa: OnceCell<String>,
}

impl<'a> Peer<'a> {
    fn new(identity: Option<&'a Identity>) -> Self {
        Peer {
            identity,
            principal: OnceCell::new(),
            namespaced_sa: OnceCell::new(),
        }
    }

    /// Istio's principal form: the SPIFFE id without `spiffe://`.
    fn principal(&self, id: &Identity) -> &str {
        self.principal.get_or_init(|| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        })
    }

    fn namespaced_sa(&self, id: &Identity) -> &str {
        self.namespaced_sa
            .get_or_init(|| format!("{}/{}", id.namespace, id.service_account))
    }
}

fn policy_matches_peer(policy: &Authorization, conn: &Connection, peer: &Peer<'_>) -> bool {
    policy.rules.iter().any(|rule| {
        rule.clauses.iter().all(|clause| {
            clause
                .matches
                .iter()
                .any(|m| match_holds(m, policy.action, conn, peer))
        })
    })
}

/// Which identity attribute a string field looks at.
#[derive(Clone, Copy)]
enum IdentityField {
    Namespace,
    ServiceAccount,
    Principal,
}

fn match_holds(m: &Match, action: Action, conn: &Connection, peer: &Peer<'_>) -> bool {
    use IdentityField::*;
    identity_field(&m.namespaces, &m.not_namespaces, Namespace, action, peer)
        && identity_field(
            &m.service_accounts,
            &m.not_service_accounts,
            ServiceAccount,
            action,
            peer,
        )
        && identity_field(&m.principals, &m.not_principals, Principal, action, peer)
        && ip_field(&m.source_ips, &m.not_source_ips, conn.src_ip)
        && ip_field(&m.destination_ips, &m.not_destination_ips, conn.dst_ip)
        && (m.destination_ports.is_empty() || m.destination_ports.contains(&conn.dst_port))
        && !m.not_destination_ports.contains(&conn.dst_port)
}

fn identity_field(
    want: &[StringMatch],
    not: &[StringMatch],
    field: IdentityField,
    action: Action,
    peer: &Peer<'_>,
) -> bool {
    use IdentityField::*;
    if want.is_empty() && not.is_empty() {
        return true;
    }
    let Some(id) = peer.identity else {
        // Plaintext: nothing to compare. A positive condition fails. For a negative one we fail
        // closed whichever way closes: under DENY it holds (like Istio, which reads "not in X"
        // as true for an absent identity, so the connection is denied), under ALLOW it does
        // not (stricter than Istio: an unknown peer is not "outside X" enough to be let in).
        return want.is_empty() && action == Action::Deny;
    };
    let hit = |m: &StringMatch| match field {
        Namespace => m.matches(&id.namespace),
        Principal => m.matches(peer.principal(id)),
        // Bare name, as asked of this field; a value with a '/' (which no service account
        // name can contain) is read as Istio's "<ns>/<sa>" form instead.
        ServiceAccount => {
            if string_match_has_slash(m) {
                m.matches(peer.namespaced_sa(id))
            } else {
                m.matches(&id.service_account)
            }
        }
    };
    (want.is_empty() || want.iter().any(hit)) && !not.iter().any(hit)
}

fn string_match_has_slash(m: &StringMatch) -> bool {
    match m {
        StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s.contains('/'),
        StringMatch::Presence => false,
    }
}

fn ip_field(want: &[Cidr], not: &[Cidr], ip: IpAddr) -> bool {
    (want.is_empty() || want.iter().any(|c| c.contains(ip))) && !not.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::state::{Clause, Rule, Scope};

    fn workload() -> Workload {
        Workload {
            uid: "cluster1//v1/Pod/default/reviews-1".into(),
            name: "reviews-1".into(),
            namespace: "default".into(),
            addresses: vec!["10.244.1.10".parse().unwrap()],
            ..Workload::default()
        }
    }

    fn conn(identity: Option<&str>) -> Connection {
        Connection {
            src_identity: identity.map(|s| s.parse().unwrap()),
            src_ip: "10.244.2.5".parse().unwrap(),
            dst_ip: "10.244.1.10".parse().unwrap(),
            dst_port: 9080,
        }
    }

    fn good() -> Connection {
        conn(Some("spiffe://cluster.local/ns/default/sa/productpage"))
    }

    fn policy(name: &str, action: Action, matches: Vec<Match>) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "default".into(),
            scope: Scope::Namespace,
            action,
            rules: vec![Rule {
                clauses: vec![Clause { matches }],
            }],
            dry_run: false,
        }
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn decide(policies: Vec<Authorization>, conn: &Connection) -> Decision {
        let state = State::new(vec![], vec![], policies).unwrap();
        check(&state, &workload(), conn)
    }

    /// Whether a single ALLOW policy with this one match lets `conn` through.
    fn allows(m: Match, conn: &Connection) -> bool {
        decide(vec![policy("p", Action::Allow, vec![m])], conn).is_allowed()
    }

    /// Whether a single DENY policy with this one match blocks `conn`.
    fn denies(m: Match, conn: &Connection) -> bool {
        !decide(vec![policy("p", Action::Deny, vec![m])], conn).is_allowed()
    }

    #[test]
    fn no_policies_allow() {
        assert_eq!(decide(vec![], &good()), Decision::Allow);
        assert_eq!(decide(vec![], &conn(None)), Decision::Allow);
    }

    #[test]
    fn empty_match_matches_everything() {
        assert!(allows(Match::default(), &good()));
        assert!(allows(Match::default(), &conn(None)));
        assert!(denies(Match::default(), &conn(None)));
    }

    #[test]
    fn rule_without_clauses_matches_and_policy_without_rules_does_not() {
        let mut allow_all = policy("all", Action::Allow, vec![]);
        allow_all.rules = vec![Rule::default()];
        assert_eq!(decide(vec![allow_all], &good()), Decision::Allow);

        let mut allow_nothing = policy("nothing", Action::Allow, vec![]);
        allow_nothing.rules.clear();
        assert_eq!(
            decide(vec![allow_nothing], &good()),
            Decision::Deny {
                policy: NO_ALLOW_MATCHED.into()
            }
        );

        let mut deny_nothing = policy("nothing", Action::Deny, vec![]);
        deny_nothing.rules.clear();
        assert_eq!(decide(vec![deny_nothing], &good()), Decision::Allow);
    }

    #[test]
    fn clauses_and_matches_combine() {
        let ns = |n: &str| Match {
            namespaces: vec![exact(n)],
            ..Match::default()
        };
        let port = |p: u16| Match {
            destination_ports: vec![p],
            ..Match::default()
        };
        // Any match within a clause.
        let p = policy("p", Action::Allow, vec![ns("other"), ns("default")]);
        assert!(decide(vec![p], &good()).is_allowed());
        // All clauses within a rule.
        let mut p = policy("p", Action::Allow, vec![ns("default")]);
        p.rules[0].clauses.push(Clause {
            matches: vec![port(1)],
        });
        assert!(!decide(vec![p.clone()], &good()).is_allowed());
        p.rules[0].clauses[1].matches.push(port(9080));
        assert!(decide(vec![p], &good()).is_allowed());
        // Any rule within a policy.
        let mut p = policy("p", Action::Allow, vec![ns("other")]);
        p.rules.push(Rule {
            clauses: vec![Clause {
                matches: vec![port(9080)],
            }],
        });
        assert!(decide(vec![p], &good()).is_allowed());
        // A clause with no matches matches nothing.
        let p = policy("p", Action::Allow, vec![]);
        assert!(!decide(vec![p], &good()).is_allowed());
    }

    #[test]
    fn fields_within_a_match_are_anded() {
        let m = Match {
            namespaces: vec![exact("default")],
            destination_ports: vec![9080],
            source_ips: vec![cidr("10.0.0.0/8")],
            ..Match::default()
        };
        assert!(allows(m.clone(), &good()));
        let mut elsewhere = good();
        elsewhere.dst_port = 9081;
        assert!(!allows(m.clone(), &elsewhere));
        let mut outside = good();
        outside.src_ip = "192.168.0.1".parse().unwrap();
        assert!(!allows(m, &outside));
    }

    #[test]
    fn principals() {
        let with = |v: Vec<StringMatch>| Match {
            principals: v,
            ..Match::default()
        };
        let without = |v: Vec<StringMatch>| Match {
            not_principals: v,
            ..Match::default()
        };
        let c = good();
        assert!(allows(
            with(vec![exact("cluster.local/ns/default/sa/productpage")]),
            &c
        ));
        assert!(!allows(
            with(vec![exact(
                "spiffe://cluster.local/ns/default/sa/productpage"
            )]),
            &c
        ));
        assert!(allows(
            with(vec![
                exact("x"),
                exact("cluster.local/ns/default/sa/productpage")
            ]),
            &c
        ));
        assert!(allows(
            with(vec![StringMatch::Prefix(
                "cluster.local/ns/default/".into()
            )]),
            &c
        ));
        assert!(!allows(
            with(vec![StringMatch::Prefix("cluster.local/ns/other/".into())]),
            &c
        ));
        assert!(allows(
            with(vec![StringMatch::Suffix("/sa/productpage".into())]),
            &c
        ));
        assert!(!allows(
            with(vec![StringMatch::Suffix("/sa/reviews".into())]),
            &c
        ));
        assert!(allows(with(vec![StringMatch::Presence]), &c));
        assert!(!allows(with(vec![StringMatch::Presence]), &conn(None)));
        assert!(!allows(
            with(vec![StringMatch::Prefix(String::new())]),
            &conn(None)
        ));

        assert!(!allows(
            without(vec![StringMatch::Suffix("/sa/productpage".into())]),
            &c
        ));
        assert!(allows(
            without(vec![StringMatch::Suffix("/sa/reviews".into())]),
            &c
        ));
        assert!(denies(
            without(vec![StringMatch::Suffix("/sa/reviews".into())]),
            &c
        ));
        assert!(!denies(
            without(vec![StringMatch::Suffix("/sa/productpage".into())]),
            &c
        ));
    }

    #[test]
    fn namespaces() {
        let with = |v: Vec<StringMatch>| Match {
            namespaces: v,
            ..Match::default()
        };
        let without = |v: Vec<StringMatch>| Match {
            not_namespaces: v,
            ..Match::default()
        };
        let c = good();
        assert!(allows(with(vec![exact("default")]), &c));
        assert!(!allows(with(vec![exact("defaul")]), &c));
        assert!(allows(with(vec![StringMatch::Prefix("def".into())]), &c));
        assert!(allows(with(vec![StringMatch::Suffix("ault".into())]), &c));
        assert!(allows(with(vec![StringMatch::Presence]), &c));
        assert!(!allows(without(vec![exact("default")]), &c));
        assert!(allows(without(vec![exact("kube-system")]), &c));
        assert!(denies(with(vec![exact("default")]), &c));
        assert!(!denies(without(vec![exact("default")]), &c));
    }

    #[test]
    fn service_accounts() {
        let with = |v: Vec<StringMatch>| Match {
            service_accounts: v,
            ..Match::default()
        };
        let without = |v: Vec<StringMatch>| Match {
            not_service_accounts: v,
            ..Match::default()
        };
        let c = good();
        assert!(allows(with(vec![exact("productpage")]), &c));
        assert!(!allows(with(vec![exact("reviews")]), &c));
        assert!(allows(
            with(vec![StringMatch::Prefix("product".into())]),
            &c
        ));
        assert!(allows(with(vec![StringMatch::Suffix("page".into())]), &c));
        // Istio's "<ns>/<sa>" form pins the namespace too.
        assert!(allows(with(vec![exact("default/productpage")]), &c));
        assert!(!allows(with(vec![exact("other/productpage")]), &c));
        assert!(allows(
            with(vec![StringMatch::Prefix("default/".into())]),
            &c
        ));
        assert!(!allows(without(vec![exact("productpage")]), &c));
        assert!(allows(without(vec![exact("reviews")]), &c));
        assert!(!denies(without(vec![exact("default/productpage")]), &c));
    }

    #[test]
    fn missing_identity_fails_closed() {
        let plain = conn(None);
        let positive = Match {
            namespaces: vec![exact("default")],
            ..Match::default()
        };
        assert!(!allows(positive.clone(), &plain));
        assert!(!denies(positive, &plain));
        for m in [
            Match {
                not_principals: vec![exact("cluster.local/ns/default/sa/bad")],
                ..Match::default()
            },
            Match {
                not_namespaces: vec![exact("bad")],
                ..Match::default()
            },
            Match {
                not_service_accounts: vec![exact("bad")],
                ..Match::default()
            },
        ] {
            assert!(denies(m.clone(), &plain), "{m:?}");
            assert!(!allows(m, &plain));
        }
        // An ALLOW with both forms still needs an identity.
        let both = Match {
            principals: vec![StringMatch::Presence],
            not_principals: vec![exact("cluster.local/ns/default/sa/bad")],
            ..Match::default()
        };
        assert!(!denies(both.clone(), &plain));
        assert!(allows(both, &good()));
    }

    #[test]
    fn ips() {
        let c = good();
        let src = |v: &[&str], not: &[&str]| Match {
            source_ips: v.iter().map(|s| cidr(s)).collect(),
            not_source_ips: not.iter().map(|s| cidr(s)).collect(),
            ..Match::default()
        };
        assert!(allows(src(&["10.244.2.0/24"], &[]), &c));
        assert!(allows(src(&["10.244.2.5"], &[]), &c));
        assert!(allows(src(&["192.168.0.0/16", "10.244.0.0/16"], &[]), &c));
        assert!(!allows(src(&["10.244.3.0/24"], &[]), &c));
        assert!(!allows(src(&[], &["10.244.2.0/24"]), &c));
        assert!(allows(src(&[], &["10.244.3.0/24"]), &c));
        assert!(!allows(src(&["10.0.0.0/8"], &["10.244.2.0/24"]), &c));
        // Source IPs need no identity.
        assert!(allows(src(&["10.244.2.0/24"], &[]), &conn(None)));

        let dst = |v: &[&str], not: &[&str]| Match {
            destination_ips: v.iter().map(|s| cidr(s)).collect(),
            not_destination_ips: not.iter().map(|s| cidr(s)).collect(),
            ..Match::default()
        };
        assert!(allows(dst(&["10.244.1.10"], &[]), &c));
        assert!(!allows(dst(&["10.244.1.11"], &[]), &c));
        assert!(!allows(dst(&[], &["10.244.1.0/24"]), &c));
        assert!(denies(dst(&["10.244.1.0/24"], &[]), &c));
    }

    #[test]
    fn ports() {
        let c = good();
        let m = |v: Vec<u16>, not: Vec<u16>| Match {
            destination_ports: v,
            not_destination_ports: not,
            ..Match::default()
        };
        assert!(allows(m(vec![9080], vec![]), &c));
        assert!(allows(m(vec![80, 9080], vec![]), &c));
        assert!(!allows(m(vec![80], vec![]), &c));
        assert!(!allows(m(vec![], vec![9080]), &c));
        assert!(allows(m(vec![], vec![80]), &c));
        assert!(denies(m(vec![9080], vec![]), &c));
        assert!(!denies(m(vec![], vec![9080]), &c));
    }

    #[test]
    fn precedence() {
        let from_default = Match {
            namespaces: vec![exact("default")],
            ..Match::default()
        };
        let from_other = Match {
            namespaces: vec![exact("other")],
            ..Match::default()
        };
        let allow = policy("allow", Action::Allow, vec![from_default.clone()]);
        let allow_other = policy("allow-other", Action::Allow, vec![from_other.clone()]);
        let deny = policy("deny", Action::Deny, vec![from_default.clone()]);
        let deny_other = policy("deny-other", Action::Deny, vec![from_other]);

        // DENY beats a matching ALLOW.
        assert_eq!(
            decide(vec![allow.clone(), deny.clone()], &good()),
            Decision::Deny {
                policy: "default/deny".into()
            }
        );
        // One matching ALLOW among several is enough.
        assert_eq!(
            decide(
                vec![allow_other.clone(), allow.clone(), deny_other.clone()],
                &good()
            ),
            Decision::Allow
        );
        // ALLOW policies exist, none matches.
        assert_eq!(
            decide(vec![allow_other, deny_other.clone()], &good()),
            Decision::Deny {
                policy: NO_ALLOW_MATCHED.into()
            }
        );
        // Only non-matching DENY policies: allowed.
        assert_eq!(decide(vec![deny_other], &good()), Decision::Allow);
    }

    #[test]
    fn dry_run_is_never_enforced() {
        let everything = Match::default();
        let mut deny = policy("deny", Action::Deny, vec![everything.clone()]);
        deny.dry_run = true;
        assert_eq!(decide(vec![deny.clone()], &good()), Decision::Allow);

        let mut allow_nothing = policy("allow", Action::Allow, vec![]);
        allow_nothing.dry_run = true;
        // A dry-run ALLOW does not make ALLOW policies "present".
        assert_eq!(decide(vec![allow_nothing, deny], &good()), Decision::Allow);

        let enforced_deny = policy("real", Action::Deny, vec![everything]);
        let mut dry_allow = policy("dry-allow", Action::Allow, vec![Match::default()]);
        dry_allow.dry_run = true;
        assert_eq!(
            decide(vec![enforced_deny, dry_allow], &good()),
            Decision::Deny {
                policy: "default/real".into()
            }
        );
    }

    #[test]
    fn only_applicable_policies_count() {
        let mut elsewhere = policy("deny", Action::Deny, vec![Match::default()]);
        elsewhere.namespace = "other".into();
        let mut unselected = policy("sel", Action::Deny, vec![Match::default()]);
        unselected.scope = Scope::WorkloadSelector;
        assert_eq!(
            decide(vec![elsewhere.clone(), unselected.clone()], &good()),
            Decision::Allow
        );

        let state = State::new(vec![], vec![], vec![elsewhere.clone(), unselected]).unwrap();
        let mut w = workload();
        w.authorization_policies = vec!["default/sel".into()];
        assert_eq!(
            check(&state, &w, &good()),
            Decision::Deny {
                policy: "default/sel".into()
            }
        );

        elsewhere.scope = Scope::Global;
        assert!(!decide(vec![elsewhere], &good()).is_allowed());
    }

    #[test]
    fn policy_matches_ignores_dry_run() {
        let mut p = policy("p", Action::Deny, vec![Match::default()]);
        p.dry_run = true;
        assert!(policy_matches(&p, &good()));
    }
}
