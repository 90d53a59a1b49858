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
//!
//! Cost: a session holds, per resource the client has, one pointer to the resource as the
//! snapshot shares it (never a copy of its name, version or body); what it acknowledged is
//! kept only where that differs from what it holds. After a snapshot that lists the names
//! it changed, only those names are looked at. A large push is cut into responses of at most
//! [`CHUNK`] resources, each encoded only when it is about to be sent; a full comparison (a
//! first subscription) is also planned one response at a time, the next once the previous has
//! gone out ([`Push::rest`], [`Session::resume`]), so a session never holds the plan of a
//! whole large view at once.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as XdsResource,
};
use envoy_types::pb::google::protobuf::Any;

use crate::translate::{Resource, ResourceMap, Resources};

/// The hasher of a session's sets and maps: names are hashed several times per resource sent
/// (a first push at 100k pods to 100 clients: tens of millions of times), where SipHash took a
/// fifth of pilot's CPU. Seeded per process.
type Fast = foldhash::fast::RandomState;
type FastSet<T> = HashSet<T, Fast>;
type FastMap<K, V> = HashMap<K, V, Fast>;

/// Resources per response at most: a client's first push of a large mesh goes out as several
/// responses, each encoded just before it is sent, so neither pilot's memory nor the other
/// connections wait on one huge message. 500 rather than 2,000: the same first push time at
/// 100k pods, and each connection's encode buffer (kept at the size of its largest message)
/// and in-flight bookkeeping a quarter as large (3.1 → 2.4 MiB per client, peak RSS 971 →
/// 588 MiB with 100 clients).
pub const CHUNK: usize = 500;

/// One resource version as a client holds it: the snapshot's own `Arc` (or, for a version
/// the client told us on reconnect, a body-less one). Hashed and compared by name, so a set
/// of these is a map from name to version without a copy of either.
#[derive(Clone)]
struct Held(Arc<Resource>);

impl Held {
    fn told(name: String, version: String) -> Held {
        Held(Arc::new(Resource {
            name,
            version,
            body: bytes::Bytes::new(),
            aliases: Vec::new(),
            node: None,
        }))
    }

    fn name(&self) -> &str {
        &self.0.name
    }

    fn version(&self) -> &str {
        &self.0.version
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.0.name, self.0.version)
    }
}

impl Hash for Held {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it.
        self.0.name.as_str().hash(state);
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Held {}

impl Borrow<str> for Held {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

/// The same version of the same name, or both absent.
fn same(a: Option<&Held>, b: Option<&Held>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(&a.0, &b.0) || a.version() == b.version(),
        _ => false,
    }
}

/// One entry of a response awaiting its ACK: what the client held before, and what we sent
/// (`None`: a removal). One of the two is always there, and carries the name: two pointers
/// per resource in flight, which a first push of a large view holds for every resource.
#[derive(Debug)]
struct Sent {
    before: Option<Held>,
    after: Option<Held>,
}

impl Sent {
    /// The resource this entry is about (either version carries its name).
    fn name(&self) -> Option<&Held> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

#[derive(Debug, Default)]
struct TypeState {
    /// What the client holds, as far as we know: updated when we send, reverted on NACK.
    client: FastSet<Held>,
    /// Where what the client acknowledged differs from `client`: the acknowledged version
    /// (`None`: it acknowledged holding nothing by that name). Empty when all is acked.
    acked_diff: FastMap<Held, Option<Held>>,
    /// Versions the client rejected: not sent again until the resource changes.
    nacked: FastSet<Held>,
    /// Removals the client rejected: it still holds these; the removal is sent again with the
    /// next snapshot, not at once (which could loop with a client that keeps refusing).
    removals_refused: FastSet<String>,
    pending: FastMap<String, Vec<Sent>>,
    nacks: u64,
    last_error: Option<String>,
    responses: u64,
    /// Subscribed to every resource of the type.
    wildcard: bool,
    /// Names and aliases subscribed to one by one.
    names: FastSet<String>,
    /// Names we told the client match nothing (not repeated until they match something).
    absent: FastSet<String>,
    /// Counts changes to `client`: a comparison planned a chunk at a time knows by it whether
    /// anything but its own chunks changed what the client holds meanwhile.
    epoch: u64,
}

impl TypeState {
    /// What the client acknowledged holding by `name`.
    fn acked(&self, name: &str) -> Option<&Held> {
        match self.acked_diff.get(name) {
            Some(v) => v.as_ref(),
            None => self.client.get(name),
        }
    }

    /// The client holds `version` of `name` now (`None`: nothing by that name).
    fn set_client(&mut self, name: &Held, version: Option<Held>) {
        self.epoch += 1;
        let before = match &version {
            Some(v) => self.client.replace(v.clone()),
            None => self.client.take(name.name()),
        };
        if !self.acked_diff.contains_key(name.name()) {
            // Until now the acknowledged version was the one held.
            self.acked_diff.insert(name.clone(), before);
        }
        if self
            .acked_diff
            .get(name.name())
            .is_some_and(|a| same(a.as_ref(), version.as_ref()))
        {
            self.acked_diff.remove(name.name());
        }
    }

    /// The client applied `version` of `name` (`None`: the removal).
    fn ack(&mut self, name: &Held, version: Option<Held>) {
        if same(self.client.get(name.name()), version.as_ref()) {
            self.acked_diff.remove(name.name());
        } else {
            self.acked_diff.insert(name.clone(), version);
        }
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

/// One response to send, not encoded yet: the resources are the snapshot's shared ones until
/// [`Push::into_response`] copies their bodies into the message.
#[derive(Debug)]
pub struct Push {
    pub type_url: String,
    /// Each resource with the aliases the client asked for it by.
    resources: Vec<(Arc<Resource>, Vec<String>)>,
    pub removed: Vec<String>,
    pub nonce: String,
    /// The rest of a comparison planned a chunk at a time: [`Session::resume`] it once this
    /// response has gone out.
    pub rest: Option<Rest>,
}

/// Where a full comparison of a large view stopped: the names of `view` after `after` are
/// still to be compared.
#[derive(Debug)]
pub struct Rest {
    view: Arc<Resources>,
    type_url: String,
    after: String,
    /// Names walked so far that the client holds (or will, once the chunks are applied).
    held: usize,
    /// The type's `epoch` when the last chunk was planned: if it moved on, something else
    /// changed what the client holds, and `held` no longer proves anything.
    epoch: u64,
}

impl Push {
    /// Resources updated by this response.
    pub fn updated(&self) -> usize {
        self.resources.len()
    }

    pub fn into_response(self) -> DeltaDiscoveryResponse {
        debug_assert!(self.rest.is_none(), "the rest of a push taken out first");
        let type_url = self.type_url;
        DeltaDiscoveryResponse {
            resources: self
                .resources
                .into_iter()
                .map(|(r, aliases)| XdsResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(Any {
                        type_url: type_url.clone(),
                        value: r.body.to_vec(),
                    }),
                    aliases,
                    ..Default::default()
                })
                .collect(),
            type_url,
            removed_resources: self.removed,
            nonce: self.nonce,
            ..Default::default()
        }
    }
}

/// What a full comparison did with one name of the view.
enum Considered {
    /// Sent: the client lacked this version.
    Sent,
    /// The client holds this version already.
    Held,
    /// Not sent: the client rejected this version.
    Rejected,
}

/// Names changed between two snapshots, by type URL: what a session diffs after a snapshot
/// whose predecessor it was in step with. A type missing here is diffed in full.
pub type Changed = BTreeMap<String, Vec<String>>;

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
    #[cfg(test)]
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        resources: &Resources,
    ) -> (Option<Reply>, Option<DeltaDiscoveryResponse>) {
        let (reply, pushes) = self.request(req, &Arc::new(resources.clone()));
        (
            reply,
            pushes.into_iter().next().map(|mut p| {
                assert!(p.rest.take().is_none(), "a test view fits one chunk");
                p.into_response()
            }),
        )
    }

    /// Handle one request. Returns what the reply (if any) said and the responses to send.
    /// Unknown types are not subscribed.
    pub fn request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        resources: &Arc<Resources>,
    ) -> (Option<Reply>, Vec<Push>) {
        let Some(current) = resources.of_type(&req.type_url) else {
            return (None, Vec::new());
        };
        let mut reply = None;
        // Names a NACK gave back: the only ones whose state changed for this client.
        let mut rejected_names: Vec<String> = Vec::new();
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
                        for entry in sent {
                            let Some(name) = entry.name().cloned() else {
                                continue;
                            };
                            let Sent { before, after } = entry;
                            let refused = named.as_ref().is_none_or(|n| n.contains(name.name()));
                            if !refused {
                                accepted += 1;
                                t.ack(&name, after);
                                continue;
                            }
                            rejected += 1;
                            rejected_names.push(name.name().to_string());
                            // The client keeps what it had, unless a later response already
                            // changed that name again.
                            if same(t.client.get(name.name()), after.as_ref()) {
                                t.set_client(&name, before);
                            }
                            match after {
                                Some(v) => {
                                    t.nacked.replace(v);
                                }
                                None => {
                                    t.removals_refused.insert(name.name().to_string());
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
                        for entry in sent {
                            if let Some(name) = entry.name().cloned() {
                                t.ack(&name, entry.after);
                            }
                        }
                        Reply::Ack {
                            type_url: req.type_url.clone(),
                            resources: n,
                        }
                    }
                },
            });
        }
        // A first push leaves these large and then empty: give the memory back.
        if t.acked_diff.capacity() > 64 && t.acked_diff.len() * 4 < t.acked_diff.capacity() {
            t.acked_diff.shrink_to_fit();
        }
        if t.pending.capacity() > 64 && t.pending.len() * 4 < t.pending.capacity() {
            t.pending.shrink_to_fit();
        }
        if first {
            // A reconnecting client says what it holds; only the difference is sent. The first
            // response goes out even when empty, so the client knows it is in sync.
            t.client = req
                .initial_resource_versions
                .iter()
                .map(|(name, version)| match current.get(name) {
                    // Shared with the snapshot when it is the version we have.
                    Some(r) if &r.version == version => Held(r.clone()),
                    _ => Held::told(name.clone(), version.clone()),
                })
                .collect();
            t.acked_diff.clear();
            t.wildcard = req.resource_names_subscribe.is_empty()
                || req.resource_names_subscribe.iter().any(|n| n == "*");
            if t.wildcard {
                // It will hold the whole view: one allocation rather than a rehash per doubling.
                t.client
                    .reserve(current.len().saturating_sub(t.client.len()));
            }
            t.epoch += 1;
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
            t.epoch += 1;
            if name == "*" {
                t.wildcard = false;
            } else {
                t.names.remove(name);
                t.absent.remove(name);
                // The client forgets it (and what it had under that alias); sent again
                // below if it is still wanted.
                t.client.retain(|held| {
                    held.name() != name
                        && !current
                            .get(held.name())
                            .is_some_and(|r| r.aliases.iter().any(|a| a == name))
                });
            }
        }
        if dropped {
            // What the client no longer subscribes to, it no longer holds.
            let node = self.node.as_deref();
            let t = &mut *t;
            let keep: FastSet<Held> = t
                .client
                .iter()
                .filter(|held| match current.get(held.name()) {
                    Some(r) => wants(t, node, r),
                    None => t.wildcard || t.names.contains(held.name()),
                })
                .cloned()
                .collect();
            t.client = keep;
            t.epoch += 1;
            let client = &t.client;
            t.acked_diff.retain(|name, _| client.contains(name.name()));
        }
        let pushes = if first || dropped || !req.resource_names_subscribe.is_empty() {
            self.diff(
                &req.type_url,
                current,
                first || !req.resource_names_subscribe.is_empty(),
                None,
                Some(resources),
                None,
            )
        } else {
            // Only an ACK or NACK: the view is the one last diffed, so only what a NACK gave
            // back can differ (and a rejected version is not sent again). Diffing the whole
            // view here would cost O(view) per response, O(view²) over a chunked first push.
            rejected_names.sort_unstable();
            rejected_names.dedup();
            self.diff(
                &req.type_url,
                current,
                false,
                Some(&rejected_names),
                None,
                None,
            )
        };
        (reply, pushes)
    }

    /// After a new snapshot: the responses for every subscribed type that changed for this
    /// client, each type in full.
    #[cfg(test)]
    pub fn on_resources(&mut self, resources: &Resources) -> Vec<DeltaDiscoveryResponse> {
        self.after_snapshot(resources, &Changed::new(), None)
            .into_iter()
            .map(Push::into_response)
            .collect()
    }

    /// Go on with a comparison planned a chunk at a time: the next response (with the rest
    /// after it, if any), or none when nothing more differs.
    pub fn resume(&mut self, rest: Rest) -> Vec<Push> {
        let Some(current) = rest.view.of_type(&rest.type_url) else {
            return Vec::new();
        };
        let held = self
            .types
            .get(&rest.type_url)
            .filter(|t| t.epoch == rest.epoch)
            .map(|_| rest.held);
        self.diff(
            &rest.type_url,
            current,
            false,
            None,
            Some(&rest.view),
            Some((&rest.after, held)),
        )
    }

    /// After a new snapshot: the responses for every subscribed type that changed for this
    /// client. `changed` lists, for some types, every name that differs from the snapshot
    /// this session last saw; those types are diffed over those names only. With `lazy` (the
    /// shared view `resources` is), a full comparison is planned a chunk at a time.
    pub fn after_snapshot(
        &mut self,
        resources: &Resources,
        changed: &Changed,
        lazy: Option<&Arc<Resources>>,
    ) -> Vec<Push> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        let mut out = Vec::new();
        for type_url in &types {
            let Some(current) = resources.of_type(type_url) else {
                continue;
            };
            let mut only = None;
            if let Some(t) = self.types.get_mut(type_url) {
                // Refused removals are tried again, once per snapshot.
                let retry: Vec<String> = t.removals_refused.drain().collect();
                // Names asked for one by one need the whole view (what matches them may be
                // anywhere); so does a type with no list of changes.
                if let Some(names) = changed.get(type_url).filter(|_| t.names.is_empty()) {
                    let mut names: Vec<&str> = names
                        .iter()
                        .map(String::as_str)
                        .chain(retry.iter().map(String::as_str))
                        .collect();
                    names.sort_unstable();
                    names.dedup();
                    only = Some(names.into_iter().map(str::to_string).collect::<Vec<_>>());
                }
            }
            let lazy = lazy.filter(|_| only.is_none());
            out.extend(self.diff(type_url, current, false, only.as_deref(), lazy, None));
        }
        out
    }

    /// What to send so that the client holds `current` as it wants it; with `only`, looking
    /// at those names alone (the rest being as the client holds them already).
    ///
    /// With `lazy` (the view `current` is of) and no names asked for one by one, a full
    /// comparison plans one response of [`CHUNK`] resources at most and leaves the rest (the
    /// names after `from`) to [`Session::resume`], so that a first push of a large view is
    /// never planned whole at once. `from` also says how many names walked before it the
    /// client holds, if that is still known (`None`: not).
    fn diff(
        &mut self,
        type_url: &str,
        current: &ResourceMap,
        always: bool,
        only: Option<&[String]>,
        lazy: Option<&Arc<Resources>>,
        from: Option<(&str, Option<usize>)>,
    ) -> Vec<Push> {
        let Session {
            types,
            next_nonce,
            node,
        } = self;
        let node = node.as_deref();
        let Some(t) = types.get_mut(type_url) else {
            return Vec::new();
        };
        let mut resources: Vec<(Arc<Resource>, Vec<String>)> = Vec::new();
        let mut sent: Vec<Sent> = Vec::new();
        let mut removed: Vec<Held> = Vec::new();
        let mut absent: Vec<String> = Vec::new();
        let mut stopped: Option<Rest> = None;
        // One name of the view: sent if the client wants it and lacks this version, kept in
        // step (shared) if it has it.
        let mut consider = |t: &mut TypeState, r: &Arc<Resource>| -> Considered {
            if let Some(held) = t.client.get(r.name.as_str())
                && held.version() == r.version
            {
                if !Arc::ptr_eq(&held.0, r) {
                    // Same version from a newer snapshot: hold that one, so the old
                    // snapshot's copy can go.
                    t.client.replace(Held(r.clone()));
                }
                return Considered::Held;
            }
            if t.nacked
                .get(r.name.as_str())
                .is_some_and(|n| n.version() == r.version)
            {
                return Considered::Rejected;
            }
            let aliases = r
                .aliases
                .iter()
                .filter(|a| t.names.contains(*a))
                .cloned()
                .collect();
            resources.push((r.clone(), aliases));
            sent.push(Sent {
                before: t.client.get(r.name.as_str()).cloned(),
                after: Some(Held(r.clone())),
            });
            Considered::Sent
        };
        match only {
            None => {
                if from.is_none() {
                    // A rejected version stays rejected only while it is the current one.
                    t.nacked.retain(|n| {
                        current
                            .get(n.name())
                            .is_some_and(|r| r.version == n.version())
                    });
                }
                // Names asked for one by one need the whole walk (for what matches nothing),
                // so only a client without any is planned a chunk at a time.
                let lazy = lazy.filter(|_| t.names.is_empty());
                let walk: Box<dyn Iterator<Item = (&String, &Arc<Resource>)>> = match from {
                    Some((after, _)) => Box::new(
                        current.range::<str, _>((Bound::Excluded(after), Bound::Unbounded)),
                    ),
                    None => Box::new(current.iter()),
                };
                let mut held = match from {
                    Some((_, held)) => held,
                    None => Some(0),
                };
                // Names and aliases asked for one by one that some resource answers.
                let mut found: HashSet<&str> = HashSet::new();
                let mut planned = 0;
                let mut last: Option<&String> = None;
                for (name, r) in walk {
                    if let (Some(view), Some(after)) = (lazy, last)
                        && planned == CHUNK
                    {
                        // A full chunk: the rest is compared once it has gone out.
                        stopped = Some(Rest {
                            view: view.clone(),
                            type_url: type_url.to_string(),
                            after: after.clone(),
                            held: held.unwrap_or(0),
                            // Set once this chunk's own changes are made, below; unknown
                            // stays unknown (an epoch that cannot match).
                            epoch: if held.is_some() { 0 } else { u64::MAX },
                        });
                        break;
                    }
                    last = Some(name);
                    if !wants(t, node, r) {
                        continue;
                    }
                    if !t.names.is_empty() {
                        found.insert(name);
                        found.extend(
                            r.aliases
                                .iter()
                                .filter(|a| t.names.contains(*a))
                                .map(String::as_str),
                        );
                    }
                    let holds = match consider(t, r) {
                        Considered::Sent => {
                            planned += 1;
                            true
                        }
                        Considered::Held => true,
                        // Not sent; the client may still hold an older version.
                        Considered::Rejected => t.client.contains(name.as_str()),
                    };
                    if let Some(h) = held.as_mut() {
                        *h += usize::from(holds);
                    }
                }
                // Every name the client holds is one of the view's it wants (it holds as
                // many of those as it holds at all): nothing to remove, and no need to look
                // each held name up in the view (at 100k names, per connection, a sixth of a
                // first push's CPU).
                // (What this walk sends to a name the client lacks is not in `client` yet.)
                let adding = sent.iter().filter(|s| s.before.is_none()).count();
                let nothing_else = held.is_some_and(|h| h == t.client.len() + adding);
                if stopped.is_none() && !nothing_else {
                    removed = t
                        .client
                        .iter()
                        .filter(|held| {
                            !current.get(held.name()).is_some_and(|r| wants(t, node, r))
                                && !t.removals_refused.contains(held.name())
                        })
                        .cloned()
                        .collect();
                    removed.sort_unstable_by(|a, b| a.name().cmp(b.name()));
                }
                if stopped.is_none() {
                    // Asked for, matching nothing: said once, outside the ACK bookkeeping (the
                    // client holds nothing by that name).
                    t.absent.retain(|n| !found.contains(n.as_str()));
                    absent = t
                        .names
                        .iter()
                        .filter(|n| {
                            !found.contains(n.as_str())
                                && !t.absent.contains(*n)
                                && !t.client.contains(n.as_str())
                        })
                        .cloned()
                        .collect();
                    absent.sort();
                    t.absent.extend(absent.iter().cloned());
                }
            }
            Some(names) => {
                for name in names {
                    let r = current.get(name);
                    if t.nacked
                        .get(name.as_str())
                        .is_some_and(|n| r.is_none_or(|r| r.version != n.version()))
                    {
                        t.nacked.remove(name.as_str());
                    }
                    match r.filter(|r| wants(t, node, r)) {
                        Some(r) => {
                            let _ = consider(t, r);
                        }
                        None => {
                            if let Some(held) = t.client.get(name.as_str())
                                && !t.removals_refused.contains(name.as_str())
                            {
                                removed.push(held.clone());
                            }
                        }
                    }
                }
            }
        }
        if resources.is_empty() && removed.is_empty() && absent.is_empty() && !always {
            return Vec::new();
        }
        for held in &removed {
            sent.push(Sent {
                before: Some(held.clone()),
                after: None,
            });
        }
        for s in &sent {
            if let Some(name) = s.name() {
                t.set_client(name, s.after.clone());
            }
        }
        if let Some(rest) = stopped.as_mut().filter(|r| r.epoch != u64::MAX) {
            rest.epoch = t.epoch;
        }
        // Cut into responses of at most CHUNK resources; removals go with the last one.
        let mut removed_names: Vec<String> = removed.iter().map(|h| h.name().to_string()).collect();
        removed_names.extend(absent);
        let chunks = resources.len().div_ceil(CHUNK).max(1);
        let mut out = Vec::with_capacity(chunks);
        let mut resources = resources.into_iter();
        let mut sent = sent.into_iter();
        for i in 0..chunks {
            let last = i + 1 == chunks;
            let these: Vec<(Arc<Resource>, Vec<String>)> = resources.by_ref().take(CHUNK).collect();
            let mut settled: Vec<Sent> = sent.by_ref().take(these.len()).collect();
            let removed = if last {
                settled.extend(sent.by_ref());
                std::mem::take(&mut removed_names)
            } else {
                Vec::new()
            };
            *next_nonce += 1;
            let nonce = next_nonce.to_string();
            t.pending.insert(nonce.clone(), settled);
            t.responses += 1;
            out.push(Push {
                type_url: type_url.to_string(),
                resources: these,
                removed,
                nonce,
                rest: if last { stopped.take() } else { None },
            });
        }
        out
    }

    pub fn report(&self) -> Vec<TypeReport> {
        let versions = |held: &mut dyn Iterator<Item = &Held>| -> BTreeMap<String, String> {
            held.map(|h| (h.name().to_string(), h.version().to_string()))
                .collect()
        };
        self.types
            .iter()
            .map(|(type_url, t)| TypeReport {
                type_url: type_url.clone(),
                sent: versions(&mut t.client.iter()),
                acked: versions(
                    &mut t
                        .client
                        .iter()
                        .map(|h| h.name())
                        .chain(t.acked_diff.keys().map(|h| h.name()))
                        .filter_map(|name| t.acked(name)),
                ),
                nacked: versions(&mut t.nacked.iter()),
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

    /// `n` names `w000000`… at version 1: a view larger than a chunk.
    fn large_view_items(n: usize) -> Vec<(String, &'static str)> {
        (0..n).map(|i| (format!("w{i:06}"), "1")).collect()
    }

    /// A view larger than a chunk goes out one chunk at a time, each planned once the one
    /// before has gone out; the removals go with the last, and the client ends holding it all.
    #[test]
    fn a_large_view_is_planned_a_chunk_at_a_time() {
        let n = 2 * CHUNK + 5;
        let items = large_view_items(n);
        let refs: Vec<(&str, &str)> = items.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let view = Arc::new(res(&refs));
        let mut s = Session::new();
        // The client says it holds a name the view no longer has.
        let (_, mut pushes) = s.request(&subscribe(&[("gone", "1")]), &view);
        let mut got = Vec::new();
        while !pushes.is_empty() {
            assert_eq!(pushes.len(), 1, "one response planned at a time");
            let mut p = pushes.remove(0);
            let rest = p.rest.take();
            got.push(p.into_response());
            if let Some(rest) = rest {
                pushes = s.resume(rest);
            }
        }
        let sizes: Vec<usize> = got.iter().map(|r| r.resources.len()).collect();
        assert_eq!(sizes, [CHUNK, CHUNK, 5]);
        let removed: Vec<&[String]> = got.iter().map(|r| r.removed_resources.as_slice()).collect();
        assert_eq!(removed, [&[][..], &[][..], &["gone".to_string()][..]]);
        let sent: Vec<&str> = got.iter().flat_map(names).collect();
        assert_eq!(sent, refs.iter().map(|(n, _)| *n).collect::<Vec<_>>());
        // Every nonce different; acking them all leaves nothing awaited, nothing to send.
        let nonces: HashSet<&str> = got.iter().map(|r| r.nonce.as_str()).collect();
        assert_eq!(nonces.len(), 3);
        for r in &got {
            let (reply, more) = s.request(&reply(&r.nonce, None), &view);
            assert!(matches!(reply, Some(Reply::Ack { .. })));
            assert!(more.is_empty());
        }
        let report = &s.report()[0];
        assert_eq!((report.sent.len(), report.acked.len()), (n, n));
        assert_eq!(report.awaiting_ack, 0);
        assert!(
            s.after_snapshot(&view, &Changed::new(), Some(&view))
                .is_empty()
        );
        // A change to one name of a large view is one small response, not a walk in chunks.
        let mut changed_items = refs.clone();
        changed_items[CHUNK + 1].1 = "2";
        let next = Arc::new(res(&changed_items));
        let pushes = s.after_snapshot(&next, &Changed::new(), Some(&next));
        assert_eq!(pushes.len(), 1);
        assert!(pushes[0].rest.is_none());
        assert_eq!(pushes[0].updated(), 1);
    }

    /// A chunk rejected while the rest of a first push is still being planned: what the
    /// client holds is no longer what the walk counted, so the removals are worked out from
    /// what it really holds (the held name the view lacks goes, the rejected ones are not
    /// "removed", never having been held).
    #[test]
    fn a_chunk_rejected_during_a_chunked_push() {
        let n = 2 * CHUNK + 5;
        let items = large_view_items(n);
        let refs: Vec<(&str, &str)> = items.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let view = Arc::new(res(&refs));
        let mut s = Session::new();
        let (_, mut pushes) = s.request(&subscribe(&[("gone", "1")]), &view);
        let mut first = pushes.remove(0);
        let mut rest = first.rest.take();
        let first = first.into_response();
        let (said, again) = s.request(&reply(&first.nonce, Some("bad chunk")), &view);
        assert!(matches!(said, Some(Reply::Nack { rejected, .. }) if rejected == CHUNK));
        assert!(again.is_empty(), "a rejected version is not resent");
        let mut got = Vec::new();
        while let Some(r) = rest.take() {
            let mut more = s.resume(r);
            assert_eq!(more.len(), 1);
            let mut p = more.remove(0);
            rest = p.rest.take();
            got.push(p.into_response());
        }
        let sizes: Vec<usize> = got.iter().map(|r| r.resources.len()).collect();
        assert_eq!(sizes, [CHUNK, 5]);
        assert_eq!(got[1].removed_resources, ["gone"]);
        for r in &got {
            s.request(&reply(&r.nonce, None), &view);
        }
        let report = &s.report()[0];
        assert_eq!(report.sent.len(), n - CHUNK);
        assert_eq!(report.nacked.len(), CHUNK);
        assert_eq!(report.awaiting_ack, 0);

        // Without a rejection the count holds: the removal is still found.
        let mut s = Session::new();
        let (_, mut pushes) = s.request(&subscribe(&[("gone", "1")]), &view);
        let mut last = None;
        while !pushes.is_empty() {
            let mut p = pushes.remove(0);
            if let Some(r) = p.rest.take() {
                pushes = s.resume(r);
            }
            last = Some(p.into_response());
        }
        assert_eq!(last.unwrap().removed_resources, ["gone"]);
        // And a client that held nothing extra gets no removal at all.
        let mut s = Session::new();
        let (_, mut pushes) = s.request(&subscribe(&[("w000001", "1")]), &view);
        let mut removed = Vec::new();
        while !pushes.is_empty() {
            let mut p = pushes.remove(0);
            if let Some(r) = p.rest.take() {
                pushes = s.resume(r);
            }
            removed.extend(p.into_response().removed_resources);
        }
        assert!(removed.is_empty(), "{removed:?}");
    }
}
