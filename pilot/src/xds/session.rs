//! The delta xDS state of one connected proxy, without sockets: what it holds, what it acked or rejected, and what to send next.
//!
//! A NACK may reject only some resources of a response: when its `error_detail.message`
//! starts with `rejected: <name>` lines ended by an empty line (the form
//! `mesh::xds::nack_message` writes, read with `mesh::xds::rejected_names`), the named
//! resources were rejected and every other one of that response was applied. A NACK in any
//! other form (Envoy's) rejects the whole response. Names it gives that the response did not
//! hold are ignored.
//!
//! Subscriptions follow the delta xDS rules: a first request that names nothing, or any
//! request naming `*`, subscribes to every resource of the type until `*` is unsubscribed;
//! other names subscribe to that resource, or to the resource that has that name as an alias
//! (on-demand lookups of an Address by `<network>/<ip>`, as Istio's ztunnel does with
//! `XDS_ON_DEMAND`); a node agent always gets the workloads of its own node. A name asked
//! for that matches nothing is answered once in `removed_resources`, so the client stops
//! waiting. On unsubscribing, the client forgets the resource: if it is still wanted (by `*`
//! or its node) it is sent again.

use std::collections::{BTreeMap, HashMap, HashSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as XdsResource,
};
use envoy_types::pb::google::protobuf::Any;

use crate::translate::{Resource, ResourceMap, Resources};

/// One entry of a response awaiting its ACK: the name, what the client held before, and what
/// we sent (`None`: a removal).
type Sent = (String, Option<String>, Option<String>);

#[derive(Debug, Default)]
struct TypeState {
    /// What the client holds, as far as we know: updated when we send, reverted on NACK.
    client: HashMap<String, String>,
    /// Versions the client acknowledged.
    acked: HashMap<String, String>,
    /// Versions the client rejected: not sent again until the resource changes.
    nacked: HashMap<String, String>,
    /// Removals the client rejected: it still holds these; the removal is sent again with the
    /// next snapshot, not at once (which could loop with a client that keeps refusing).
    removals_refused: HashSet<String>,
    pending: HashMap<String, Vec<Sent>>,
    nacks: u64,
    last_error: Option<String>,
    responses: u64,
    /// Subscribed to every resource of the type.
    wildcard: bool,
    /// Names and aliases subscribed to one by one.
    names: HashSet<String>,
    /// Names we told the client match nothing (not repeated until they match something).
    absent: HashSet<String>,
}

impl TypeState {
    /// The client applied `version` of `name` (`None`: the removal).
    fn ack(&mut self, name: String, version: Option<String>) {
        match version {
            Some(v) => self.acked.insert(name, v),
            None => self.acked.remove(&name),
        };
    }
}

/// What the debug endpoint shows of one type on one connection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TypeReport {
    pub type_url: String,
    pub sent: BTreeMap<String, String>,
    pub acked: BTreeMap<String, String>,
    pub nacked: BTreeMap<String, String>,
    /// Removals the client refused (it still holds these), until the next snapshot.
    pub refused_removals: Vec<String>,
    pub nacks: u64,
    pub last_nack: Option<String>,
    pub responses: u64,
    pub awaiting_ack: usize,
    pub wildcard: bool,
    /// Names and aliases subscribed to one by one.
    pub subscribed: Vec<String>,
}

/// What an ACK or NACK said, for logs and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack {
        type_url: String,
        resources: usize,
    },
    Nack {
        type_url: String,
        error: String,
        /// Resources of the response the client rejected.
        rejected: usize,
        /// Resources of the response it applied (a partial NACK).
        accepted: usize,
    },
    /// A nonce we never sent (or already settled): ignored.
    Stale,
}

#[derive(Debug, Default)]
pub struct Session {
    types: BTreeMap<String, TypeState>,
    next_nonce: u64,
    /// The node of a node agent: its workloads are sent without being asked for.
    node: Option<String>,
}

/// Whether a client with this subscription (and node) gets `r`.
fn wants(t: &TypeState, node: Option<&str>, r: &Resource) -> bool {
    t.wildcard
        || t.names.contains(&r.name)
        || r.aliases.iter().any(|a| t.names.contains(a))
        || (node.is_some() && r.node.as_deref() == node)
}

impl Session {
    pub fn new() -> Self {
        Session::default()
    }

    /// A session for the node agent of `node`.
    pub fn for_node(node: Option<String>) -> Self {
        Session {
            node,
            ..Session::default()
        }
    }

    /// Handle one request. Returns what the reply (if any) said and the response to send
    /// (if any). Unknown types are not subscribed.
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        resources: &Resources,
    ) -> (Option<Reply>, Option<DeltaDiscoveryResponse>) {
        let Some(current) = resources.of_type(&req.type_url) else {
            return (None, None);
        };
        let mut reply = None;
        let first = !self.types.contains_key(&req.type_url);
        let t = self.types.entry(req.type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            reply = Some(match t.pending.remove(&req.response_nonce) {
                None => Reply::Stale,
                Some(sent) => match &req.error_detail {
                    Some(status) => {
                        let named: Option<HashSet<&str>> =
                            mesh::xds::rejected_names(&status.message)
                                .map(|names| names.into_iter().collect());
                        let (mut rejected, mut accepted) = (0, 0);
                        for (name, before, version) in sent {
                            let refused = named.as_ref().is_none_or(|n| n.contains(name.as_str()));
                            if !refused {
                                accepted += 1;
                                t.ack(name, version);
                                continue;
                            }
                            rejected += 1;
                            // The client keeps what it had, unless a later response already
                            // changed that name again.
                            if t.client.get(&name) == version.as_ref() {
                                match before {
                                    Some(v) => t.client.insert(name.clone(), v),
                                    None => t.client.remove(&name),
                                };
                            }
                            match version {
                                Some(v) => {
                                    t.nacked.insert(name, v);
                                }
                                None => {
                                    t.removals_refused.insert(name);
                                }
                            }
                        }
                        t.nacks += 1;
                        t.last_error = Some(status.message.clone());
                        Reply::Nack {
                            type_url: req.type_url.clone(),
                            error: status.message.clone(),
                            rejected,
                            accepted,
                        }
                    }
                    None => {
                        let n = sent.len();
                        for (name, _, version) in sent {
                            t.ack(name, version);
                        }
                        Reply::Ack {
                            type_url: req.type_url.clone(),
                            resources: n,
                        }
                    }
                },
            });
        }
        if first {
            // A reconnecting client says what it holds; only the difference is sent. The first
            // response goes out even when empty, so the client knows it is in sync.
            t.client = req.initial_resource_versions.clone().into_iter().collect();
            t.acked = t.client.clone();
            t.wildcard = req.resource_names_subscribe.is_empty();
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                t.wildcard = true;
            } else {
                t.names.insert(name.clone());
            }
        }
        let mut dropped = false;
        for name in &req.resource_names_unsubscribe {
            dropped = true;
            if name == "*" {
                t.wildcard = false;
            } else {
                t.names.remove(name);
                t.absent.remove(name);
                // The client forgets it (and what it had under that alias); sent again
                // below if it is still wanted.
                t.client.retain(|held, _| {
                    held != name
                        && !current
                            .get(held)
                            .is_some_and(|r| r.aliases.iter().any(|a| a == name))
                });
            }
        }
        if dropped {
            // What the client no longer subscribes to, it no longer holds.
            let node = self.node.as_deref();
            let t = &mut *t;
            let keep: Vec<String> = t
                .client
                .keys()
                .filter(|held| match current.get(*held) {
                    Some(r) => wants(t, node, r),
                    None => t.wildcard || t.names.contains(*held),
                })
                .cloned()
                .collect();
            t.client.retain(|held, _| keep.contains(held));
            t.acked.retain(|held, _| t.client.contains_key(held));
        }
        let response = self.diff(
            &req.type_url,
            current,
            first || !req.resource_names_subscribe.is_empty(),
        );
        (reply, response)
    }

    /// After a new snapshot: one response per subscribed type that changed for this client.
    pub fn on_resources(&mut self, resources: &Resources) -> Vec<DeltaDiscoveryResponse> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        types
            .iter()
            .filter_map(|type_url| {
                let current = resources.of_type(type_url)?;
                if let Some(t) = self.types.get_mut(type_url) {
                    // Refused removals are tried again, once per snapshot.
                    t.removals_refused.clear();
                }
                self.diff(type_url, current, false)
            })
            .collect()
    }

    fn diff(
        &mut self,
        type_url: &str,
        current: &ResourceMap,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let node = self.node.clone();
        let t = self.types.get_mut(type_url)?;
        // A rejected version stays rejected only while it is the current one.
        t.nacked
            .retain(|name, v| current.get(name).is_some_and(|r| &r.version == v));
        let mut resources = Vec::new();
        let mut sent: Vec<Sent> = Vec::new();
        // Names and aliases asked for one by one that some resource answers.
        let mut found: HashSet<&str> = HashSet::new();
        let mut wanted: HashSet<&str> = HashSet::new();
        for (name, r) in current {
            if !wants(t, node.as_deref(), r) {
                continue;
            }
            wanted.insert(name);
            if !t.names.is_empty() {
                found.insert(name);
                found.extend(
                    r.aliases
                        .iter()
                        .filter(|a| t.names.contains(*a))
                        .map(String::as_str),
                );
            }
            if t.client.get(name) == Some(&r.version) || t.nacked.get(name) == Some(&r.version) {
                continue;
            }
            resources.push(XdsResource {
                name: name.clone(),
                version: r.version.clone(),
                resource: Some(Any {
                    type_url: type_url.to_string(),
                    value: r.body.to_vec(),
                }),
                aliases: r
                    .aliases
                    .iter()
                    .filter(|a| t.names.contains(*a))
                    .cloned()
                    .collect(),
                ..Default::default()
            });
            sent.push((
                name.clone(),
                t.client.get(name).cloned(),
                Some(r.version.clone()),
            ));
        }
        let mut removed: Vec<String> = t
            .client
            .keys()
            .filter(|n| !wanted.contains(n.as_str()) && !t.removals_refused.contains(*n))
            .cloned()
            .collect();
        removed.sort();
        for name in &removed {
            sent.push((name.clone(), t.client.get(name).cloned(), None));
        }
        // Asked for, matching nothing: said once, outside the ACK bookkeeping (the client
        // holds nothing by that name).
        t.absent.retain(|n| !found.contains(n.as_str()));
        let mut absent: Vec<String> = t
            .names
            .iter()
            .filter(|n| {
                !found.contains(n.as_str()) && !t.absent.contains(*n) && !t.client.contains_key(*n)
            })
            .cloned()
            .collect();
        absent.sort();
        t.absent.extend(absent.iter().cloned());
        let mut removed_resources = removed;
        removed_resources.extend(absent);
        if resources.is_empty() && removed_resources.is_empty() && !always {
            return None;
        }
        for (name, _, version) in &sent {
            match version {
                Some(v) => t.client.insert(name.clone(), v.clone()),
                None => t.client.remove(name),
            };
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        t.pending.insert(nonce.clone(), sent);
        t.responses += 1;
        Some(DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            resources,
            removed_resources,
            nonce,
            ..Default::default()
        })
    }

    pub fn report(&self) -> Vec<TypeReport> {
        let sorted = |m: &HashMap<String, String>| -> BTreeMap<String, String> {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        self.types
            .iter()
            .map(|(type_url, t)| TypeReport {
                type_url: type_url.clone(),
                sent: sorted(&t.client),
                acked: sorted(&t.acked),
                nacked: sorted(&t.nacked),
                refused_removals: {
                    let mut r: Vec<String> = t.removals_refused.iter().cloned().collect();
                    r.sort();
                    r
                },
                nacks: t.nacks,
                last_nack: t.last_error.clone(),
                responses: t.responses,
                awaiting_ack: t.pending.len(),
                wildcard: t.wildcard,
                subscribed: {
                    let mut s: Vec<String> = t.names.iter().cloned().collect();
                    s.sort();
                    s
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::Resource;
    use envoy_types::pb::google::rpc::Status;
    use mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
    use std::sync::Arc;

    fn res(items: &[(&str, &str)]) -> Resources {
        let mut r = Resources::default();
        for (name, version) in items {
            r.addresses.insert(
                name.to_string(),
                Arc::new(Resource {
                    name: name.to_string(),
                    version: version.to_string(),
                    body: bytes::Bytes::from(version.as_bytes().to_vec()),
                    aliases: Vec::new(),
                    node: None,
                }),
            );
        }
        r
    }

    fn subscribe(initial: &[(&str, &str)]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            initial_resource_versions: initial
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn reply(nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|e| Status {
                code: 3,
                message: e.into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn subscribe_ack_update_remove() {
        let mut s = Session::new();
        let (_, first) = s.on_request(&subscribe(&[]), &res(&[("a", "1"), ("b", "1")]));
        let first = first.unwrap();
        assert_eq!(names(&first), ["a", "b"]);
        let (r, none) = s.on_request(&reply(&first.nonce, None), &res(&[("a", "1"), ("b", "1")]));
        assert_eq!(
            r,
            Some(Reply::Ack {
                type_url: ADDRESS_TYPE_URL.into(),
                resources: 2
            })
        );
        assert!(none.is_none());
        let pushes = s.on_resources(&res(&[("a", "2")]));
        assert_eq!(pushes.len(), 1);
        assert_eq!(names(&pushes[0]), ["a"], "only what changed");
        assert_eq!(pushes[0].removed_resources, ["b"]);
        assert!(
            s.on_resources(&res(&[("a", "2")])).is_empty(),
            "nothing new"
        );
        let report = &s.report()[0];
        assert_eq!(report.sent.len(), 1);
        assert_eq!(report.acked.len(), 2, "the removal is not acked yet");
    }

    #[test]
    fn nack_keeps_the_version_out_until_it_changes() {
        let mut s = Session::new();
        let (_, first) = s.on_request(&subscribe(&[]), &res(&[("a", "1")]));
        s.on_request(&reply(&first.unwrap().nonce, None), &res(&[("a", "1")]));
        let bad = s.on_resources(&res(&[("a", "bad")])).remove(0);
        let (r, again) = s.on_request(&reply(&bad.nonce, Some("invalid")), &res(&[("a", "bad")]));
        assert!(matches!(r, Some(Reply::Nack { .. })));
        assert!(again.is_none(), "the rejected version is not resent");
        assert!(s.on_resources(&res(&[("a", "bad")])).is_empty());
        let report = &s.report()[0];
        assert_eq!(report.nacks, 1);
        assert_eq!(
            report.sent["a"], "1",
            "the client still holds the previous version"
        );
        let fixed = s.on_resources(&res(&[("a", "3")]));
        assert_eq!(names(&fixed[0]), ["a"]);
    }

    fn nack_naming(names: &[&str]) -> String {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        mesh::xds::nack_message(&names, "reasons")
    }

    /// The client applies `a` and rejects `b`: `a` is held, so its removal must be sent; `b`
    /// is not resent until it changes, and then it is.
    #[test]
    fn partial_nack_keeps_what_the_client_applied() {
        let mut s = Session::new();
        let (_, first) = s.on_request(&subscribe(&[]), &res(&[]));
        s.on_request(&reply(&first.unwrap().nonce, None), &res(&[]));
        let snap = res(&[("a", "1"), ("b", "bad")]);
        let push = s.on_resources(&snap).remove(0);
        assert_eq!(names(&push), ["a", "b"]);
        let (r, again) = s.on_request(&reply(&push.nonce, Some(&nack_naming(&["b"]))), &snap);
        assert_eq!(
            r,
            Some(Reply::Nack {
                type_url: ADDRESS_TYPE_URL.into(),
                error: "rejected: b\n\nreasons".into(),
                rejected: 1,
                accepted: 1,
            })
        );
        assert!(again.is_none(), "the rejected version is not resent");
        let report = &s.report()[0];
        assert_eq!(report.acked.get("a").map(String::as_str), Some("1"));
        assert_eq!(report.sent.get("a").map(String::as_str), Some("1"));
        assert!(!report.sent.contains_key("b"), "b was never held");
        assert_eq!(report.nacked.get("b").map(String::as_str), Some("bad"));

        let snap = res(&[("b", "bad")]);
        let removal = s.on_resources(&snap).remove(0);
        assert!(removal.resources.is_empty());
        assert_eq!(removal.removed_resources, ["a"], "the held one is removed");
        s.on_request(&reply(&removal.nonce, None), &snap);

        let snap = res(&[("b", "2")]);
        let fixed = s.on_resources(&snap).remove(0);
        assert_eq!(names(&fixed), ["b"]);
        assert!(fixed.removed_resources.is_empty());
        let (r, _) = s.on_request(&reply(&fixed.nonce, None), &snap);
        assert!(matches!(r, Some(Reply::Ack { resources: 1, .. })));
        let report = &s.report()[0];
        assert_eq!(report.acked, BTreeMap::from([("b".into(), "2".into())]));
        assert!(report.nacked.is_empty());
        assert_eq!(report.awaiting_ack, 0);
    }

    /// Envoy's NACK names nothing: the whole response counts as rejected, so nothing of it is
    /// held and nothing of it is removed later. Names the response did not hold are ignored.
    #[test]
    fn unnamed_nack_rejects_the_whole_response() {
        let mut s = Session::new();
        let (_, first) = s.on_request(&subscribe(&[]), &res(&[]));
        s.on_request(&reply(&first.unwrap().nonce, None), &res(&[]));
        let snap = res(&[("a", "1"), ("b", "1")]);
        let push = s.on_resources(&snap).remove(0);
        let (r, _) = s.on_request(
            &reply(&push.nonce, Some("Proto constraint validation failed")),
            &snap,
        );
        assert!(matches!(
            r,
            Some(Reply::Nack {
                rejected: 2,
                accepted: 0,
                ..
            })
        ));
        assert!(s.report()[0].sent.is_empty());
        assert!(
            s.on_resources(&res(&[])).is_empty(),
            "no removal for what the client never held"
        );

        let snap = res(&[("c", "1"), ("d", "1")]);
        let push = s.on_resources(&snap).remove(0);
        let (r, _) = s.on_request(
            &reply(&push.nonce, Some(&nack_naming(&["d", "not-sent"]))),
            &snap,
        );
        assert!(matches!(
            r,
            Some(Reply::Nack {
                rejected: 1,
                accepted: 1,
                ..
            })
        ));
        assert_eq!(s.report()[0].acked.keys().collect::<Vec<_>>(), ["c"]);
    }

    /// A client that refuses a removal still holds the resource: the removal is sent again
    /// with the next snapshot, not straight back (which would loop with a client that refuses).
    #[test]
    fn refused_removal_is_retried_with_the_next_snapshot() {
        let mut s = Session::new();
        let snap = res(&[("a", "1"), ("b", "1")]);
        let (_, first) = s.on_request(&subscribe(&[]), &snap);
        s.on_request(&reply(&first.unwrap().nonce, None), &snap);
        let snap = res(&[("b", "1"), ("c", "1")]);
        let push = s.on_resources(&snap).remove(0);
        assert_eq!(names(&push), ["c"]);
        assert_eq!(push.removed_resources, ["a"]);
        let (r, again) = s.on_request(&reply(&push.nonce, Some(&nack_naming(&["c", "a"]))), &snap);
        assert!(matches!(
            r,
            Some(Reply::Nack {
                rejected: 2,
                accepted: 0,
                ..
            })
        ));
        assert!(again.is_none(), "neither is resent at once");
        let report = &s.report()[0];
        assert_eq!(
            report.sent.get("a").map(String::as_str),
            Some("1"),
            "the client still holds it"
        );
        assert_eq!(report.refused_removals, ["a"]);
        let retry = s.on_resources(&snap).remove(0);
        assert!(retry.resources.is_empty(), "c's version stays rejected");
        assert_eq!(retry.removed_resources, ["a"]);
        s.on_request(&reply(&retry.nonce, None), &snap);
        assert!(!s.report()[0].acked.contains_key("a"));
        assert!(s.report()[0].refused_removals.is_empty());
        assert!(s.on_resources(&snap).is_empty());
    }

    #[test]
    fn reconnect_with_versions_sends_only_the_difference() {
        let mut s = Session::new();
        let (_, first) = s.on_request(
            &subscribe(&[("a", "1"), ("b", "1"), ("gone", "1")]),
            &res(&[("a", "1"), ("b", "2")]),
        );
        let first = first.unwrap();
        assert_eq!(names(&first), ["b"]);
        assert_eq!(first.removed_resources, ["gone"]);

        let mut in_sync = Session::new();
        let (_, empty) = in_sync.on_request(&subscribe(&[("a", "1")]), &res(&[("a", "1")]));
        let empty = empty.unwrap();
        assert!(empty.resources.is_empty() && empty.removed_resources.is_empty());
    }

    #[test]
    fn unknown_types_and_stale_nonces() {
        let mut s = Session::new();
        let req = DeltaDiscoveryRequest {
            type_url: "type.googleapis.com/nope".into(),
            ..Default::default()
        };
        assert_eq!(s.on_request(&req, &res(&[])), (None, None));
        let mut auth = subscribe(&[]);
        auth.type_url = AUTHORIZATION_TYPE_URL.into();
        let (_, r) = s.on_request(&auth, &res(&[("a", "1")]));
        assert!(r.unwrap().resources.is_empty(), "no policies");
        let (_, _) = s.on_request(&subscribe(&[]), &res(&[]));
        assert_eq!(
            s.on_request(&reply("999", None), &res(&[])).0,
            Some(Reply::Stale)
        );
    }

    /// Addresses with aliases and nodes: (name, version, alias, node).
    fn addresses(items: &[(&str, &str, &str, Option<&str>)]) -> Resources {
        let mut r = Resources::default();
        for (name, version, alias, node) in items {
            r.addresses.insert(
                name.to_string(),
                Arc::new(Resource {
                    name: name.to_string(),
                    version: version.to_string(),
                    body: bytes::Bytes::from(version.as_bytes().to_vec()),
                    aliases: vec![alias.to_string()],
                    node: node.map(str::to_string),
                }),
            );
        }
        r
    }

    fn names_request(sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn on_demand_by_alias_with_the_nodes_own_workloads() {
        let mut s = Session::for_node(Some("node1".into()));
        let snap = addresses(&[
            ("w1", "1", "/10.0.0.1", Some("node1")),
            ("w2", "1", "/10.0.0.2", Some("node2")),
            ("svc", "1", "/10.96.0.1", None),
        ]);
        // Istio's ztunnel with XDS_ON_DEMAND: `*` subscribed and unsubscribed in one request.
        let (_, first) = s.on_request(&names_request(&[], &["*"], ""), &snap);
        let first = first.unwrap();
        assert_eq!(names(&first), ["w1"], "only its own node's workload");
        // A lookup by `<network>/<ip>`: the resource comes with the alias asked for.
        let (_, r) = s.on_request(&names_request(&["/10.0.0.2"], &[], &first.nonce), &snap);
        let r = r.unwrap();
        assert_eq!(names(&r), ["w2"]);
        assert_eq!(r.resources[0].aliases, ["/10.0.0.2"]);
        // An address nobody has: said once in removed_resources.
        let (_, r2) = s.on_request(&names_request(&["/10.9.9.9"], &[], &r.nonce), &snap);
        let r2 = r2.unwrap();
        assert!(r2.resources.is_empty());
        assert_eq!(r2.removed_resources, ["/10.9.9.9"]);
        let (reply, none) = s.on_request(&names_request(&[], &[], &r2.nonce), &snap);
        assert!(matches!(reply, Some(Reply::Ack { .. })));
        assert!(none.is_none());
        // Changes: of what it asked for and its node's, yes; of the rest, no.
        let snap2 = addresses(&[
            ("w1", "2", "/10.0.0.1", Some("node1")),
            ("w2", "2", "/10.0.0.2", Some("node2")),
            ("svc", "2", "/10.96.0.1", None),
        ]);
        let pushes = s.on_resources(&snap2);
        assert_eq!(pushes.len(), 1);
        assert_eq!(names(&pushes[0]), ["w1", "w2"]);
        assert!(pushes[0].removed_resources.is_empty(), "not said twice");
        let (_, _) = s.on_request(&names_request(&[], &[], &pushes[0].nonce), &snap2);
        // The missing address appears: sent.
        let mut snap3 = snap2.clone();
        snap3
            .addresses
            .extend(addresses(&[("w9", "1", "/10.9.9.9", Some("node2"))]).addresses);
        let pushes = s.on_resources(&snap3);
        assert_eq!(names(&pushes[0]), ["w9"]);
        let (_, _) = s.on_request(&names_request(&[], &[], &pushes[0].nonce), &snap3);
        // Unsubscribed: forgotten by the client, no longer pushed, no removal sent.
        let (_, r) = s.on_request(&names_request(&[], &["/10.0.0.2"], ""), &snap3);
        assert!(r.is_none(), "{r:?}");
        let snap4 = addresses(&[
            ("w1", "2", "/10.0.0.1", Some("node1")),
            ("w2", "3", "/10.0.0.2", Some("node2")),
            ("svc", "2", "/10.96.0.1", None),
            ("w9", "1", "/10.9.9.9", Some("node2")),
        ]);
        assert!(s.on_resources(&snap4).is_empty());
        let report = &s.report()[0];
        assert!(!report.wildcard);
        assert_eq!(report.subscribed, ["/10.9.9.9"]);
        assert_eq!(report.sent.keys().collect::<Vec<_>>(), ["w1", "w9"]);
    }

    #[test]
    fn wildcard_subscriptions_explicit_legacy_and_left() {
        let snap = addresses(&[
            ("w1", "1", "/10.0.0.1", Some("node1")),
            ("w2", "1", "/10.0.0.2", Some("node2")),
        ]);
        // Explicit `*` plus a name.
        let mut s = Session::new();
        let (_, r) = s.on_request(&names_request(&["*", "w2"], &[], ""), &snap);
        assert_eq!(names(&r.unwrap()), ["w1", "w2"]);
        // Legacy wildcard (a first request naming nothing); unsubscribing one name under a
        // wildcard makes the client forget it, so it is sent again.
        let mut s = Session::new();
        let (_, r) = s.on_request(&names_request(&[], &[], ""), &snap);
        let r = r.unwrap();
        assert_eq!(names(&r), ["w1", "w2"]);
        let (_, _) = s.on_request(&names_request(&[], &[], &r.nonce), &snap);
        let (_, again) = s.on_request(&names_request(&[], &["w2"], ""), &snap);
        assert_eq!(names(&again.unwrap()), ["w2"]);
        // Leaving the wildcard: nothing more is pushed, nothing is removed.
        let (_, r) = s.on_request(&names_request(&[], &["*"], ""), &snap);
        assert!(r.is_none());
        let snap2 = addresses(&[
            ("w1", "2", "/10.0.0.1", Some("node1")),
            ("w3", "1", "/10.0.0.3", None),
        ]);
        assert!(s.on_resources(&snap2).is_empty());
    }
}
