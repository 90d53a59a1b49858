//! The delta xDS state of one connected proxy, without sockets: what it holds, what it acked or rejected, and what to send next.
//!
//! A NACK may reject only some resources of a response: when its `error_detail.message`
//! starts with `rejected: <name>` lines ended by an empty line (the form
//! `mesh::xds::nack_message` writes, read with `mesh::xds::rejected_names`), the named
//! resources were rejected and every other one of that response was applied. A NACK in any
//! other form (Envoy's) rejects the whole response. Names it gives that the response did not
//! hold are ignored.

use std::collections::{BTreeMap, HashMap, HashSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as XdsResource,
};
use envoy_types::pb::google::protobuf::Any;

use crate::translate::{ResourceMap, Resources};

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
}

impl Session {
    pub fn new() -> Self {
        Session::default()
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
        }
        let unsubscribed = req.resource_names_unsubscribe.iter().any(|n| n == "*");
        if unsubscribed {
            self.types.remove(&req.type_url);
            return (reply, None);
        }
        let response = self.diff(&req.type_url, current, first);
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
        let t = self.types.get_mut(type_url)?;
        // A rejected version stays rejected only while it is the current one.
        t.nacked
            .retain(|name, v| current.get(name).is_some_and(|r| &r.version == v));
        let mut resources = Vec::new();
        let mut sent: Vec<Sent> = Vec::new();
        for (name, r) in current {
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
            .filter(|n| !current.contains_key(*n) && !t.removals_refused.contains(*n))
            .cloned()
            .collect();
        removed.sort();
        for name in &removed {
            sent.push((name.clone(), t.client.get(name).cloned(), None));
        }
        if resources.is_empty() && removed.is_empty() && !always {
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
            removed_resources: removed,
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
}
