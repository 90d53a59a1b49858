//! The Kubernetes source: kube-rs watchers of every kind pilot reads, each object validated by `k8s.rs` as the folder's are, debounced into snapshots.
//!
//! One task per kind keeps nothing but what it sends: every watched object is parsed once, when
//! it arrives, into the same `(Origin, Object)` or `Problem` the folder source makes (origin file
//! `kubernetes`). One aggregating task owns a store per kind and publishes a new `Snapshot` on
//! the same channel the folder source uses, only once every kind has been listed: a snapshot
//! missing a kind would withdraw its objects from every proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1 as core;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::crds;
use crate::k8s::{Object, Origin, Problem, parse_object};
use crate::model::{Key, Snapshot};

/// The `file` of every origin and problem from this source.
pub const ORIGIN_FILE: &str = "kubernetes";
/// Changes closer together than this become one snapshot (a rollout touches many pods at once).
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A steady stream of changes still publishes at least this often.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// While not every kind is listed, how often pilot says which ones it still waits for.
const WAITING_REPORT: Duration = Duration::from_secs(10);

/// The kinds watched, in the order their stores are kept (and objects handed to the model).
pub use meshconfig::model::KINDS;

/// `(API group, resource)` of every kind watched, in `KINDS` order: what pilot's ClusterRole
/// must let it list and watch (deploy/pilot/rbac.yaml).
pub fn watched_resources() -> Vec<(String, String)> {
    fn of<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    vec![
        of::<core::Namespace>(),
        of::<core::Pod>(),
        of::<core::Service>(),
        of::<crds::AuthorizationPolicy>(),
        of::<crds::VirtualService>(),
        of::<crds::DestinationRule>(),
        of::<crds::Gateway>(),
        of::<crds::HTTPRoute>(),
        of::<crds::GRPCRoute>(),
        of::<crds::ReferenceGrant>(),
        of::<crds::ServiceEntry>(),
    ]
}

/// One watched object as the model takes it: parsed, or the reason it is left out.
type Entry = Result<(Origin, Object), Problem>;
/// A kind's objects by `(namespace, name)` (empty namespace for Namespaces).
type Store = BTreeMap<Key, Entry>;

enum Change {
    /// A list (the first, or a relist after the watch lost its place) completed: the kind's
    /// whole content, replacing what was kept.
    Replace(Store),
    Apply(Key, Box<Entry>),
    Delete(Key),
}

struct Update {
    kind: usize,
    change: Change,
}

/// Watch the cluster `client` reaches and publish a snapshot on `tx` once every kind has been
/// listed, then after every (debounced) change, until the receivers are gone. Generations
/// count up from 1.
pub async fn watch_cluster(client: Client, tx: watch::Sender<Arc<Snapshot>>) {
    let (updates_tx, updates) = mpsc::channel(1024);
    let watchers = [
        tokio::spawn(watch_kind(
            Api::<core::Namespace>::all(client.clone()),
            0,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<core::Pod>::all(client.clone()),
            1,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<core::Service>::all(client.clone()),
            2,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::AuthorizationPolicy>::all(client.clone()),
            3,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::VirtualService>::all(client.clone()),
            4,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::DestinationRule>::all(client.clone()),
            5,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::Gateway>::all(client.clone()),
            6,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::HTTPRoute>::all(client.clone()),
            7,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::GRPCRoute>::all(client.clone()),
            8,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::ReferenceGrant>::all(client.clone()),
            9,
            updates_tx.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<crds::ServiceEntry>::all(client),
            10,
            updates_tx,
        )),
    ];
    aggregate(updates, tx).await;
    for w in watchers {
        w.abort();
    }
}

/// Follow one kind: buffer a (re)list until it is complete, pass single changes on at once.
/// Errors are logged and retried with kube's backoff (0.8 s doubling to 30 s); what was sent
/// before stays in force meanwhile.
async fn watch_kind<K>(api: Api<K>, kind: usize, tx: mpsc::Sender<Update>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
{
    let name = KINDS[kind];
    let events = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut listing: Option<Store> = None;
    let mut absent = false;
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(Event::Init) => {
                listing = Some(Store::new());
                continue;
            }
            Ok(Event::InitApply(o)) => {
                let (key, entry) = parse(&o);
                listing.get_or_insert_default().insert(key, entry);
                continue;
            }
            Ok(Event::InitDone) => {
                if absent {
                    info!(kind = name, "the API server serves this kind now");
                    absent = false;
                }
                Change::Replace(listing.take().unwrap_or_default())
            }
            Ok(Event::Apply(o)) => {
                let (key, entry) = parse(&o);
                Change::Apply(key, Box::new(entry))
            }
            Ok(Event::Delete(o)) => Change::Delete(key_of(&o)),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.is_not_found() =>
            {
                // The kind's CRD is not installed: there are none of these objects. Treat
                // that as listed (empty) rather than keep pilot from ever serving; the
                // watcher keeps retrying and picks the kind up once the CRD appears.
                listing = None;
                if !absent {
                    warn!(
                        kind = name,
                        "the API server does not serve this kind (CRD not installed?): none assumed until it does"
                    );
                    absent = true;
                }
                Change::Replace(Store::new())
            }
            Err(e) => {
                let forbidden = matches!(
                    &e,
                    watcher::Error::InitialListFailed(kube::Error::Api(s))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                        | watcher::Error::WatchFailed(kube::Error::Api(s)) if s.is_forbidden()
                );
                if forbidden {
                    error!(
                        kind = name,
                        "{e}: pilot's service account may not list/watch this kind (see deploy/pilot/rbac.yaml); retrying"
                    );
                } else {
                    warn!(
                        kind = name,
                        "{e}; retrying with backoff, the objects last seen stay in force"
                    );
                }
                continue;
            }
        };
        if tx.send(Update { kind, change }).await.is_err() {
            return;
        }
    }
}

fn key_of<K: Resource<DynamicType = ()>>(o: &K) -> Key {
    let meta = o.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The object through the folder source's parser: to a YAML value (what `k8s.rs` reads),
/// then validated field by field.
fn parse<K>(o: &K) -> (Key, Entry)
where
    K: Resource<DynamicType = ()> + Serialize,
{
    let key = key_of(o);
    let kind = K::kind(&());
    let origin = Origin {
        file: ORIGIN_FILE.to_string(),
        object: if key.0.is_empty() {
            format!("{kind} {}", key.1)
        } else {
            format!("{kind} {}/{}", key.0, key.1)
        },
    };
    let problem = |reason: String| Problem {
        file: origin.file.clone(),
        object: origin.object.clone(),
        field: String::new(),
        reason,
    };
    let mut value = match serde_yaml_ng::to_value(o) {
        Ok(v) => v,
        Err(e) => return (key, Err(problem(format!("cannot be read: {e}")))),
    };
    // Objects in a list come without apiVersion and kind; the type says what they are.
    if let Some(map) = value.as_mapping_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).as_ref().into());
        map.insert("kind".into(), kind.as_ref().into());
    }
    let entry = match parse_object(value, origin.clone()) {
        Ok(Some(parsed)) => Ok(parsed),
        Ok(None) => Err(problem(format!("{kind} is not a kind pilot reads"))),
        Err(p) => Err(p),
    };
    (key, entry)
}

/// Apply updates to the stores; publish when something changed, no update came for
/// `DEBOUNCE` (or `MAX_DELAY` passed), and every kind has been listed.
async fn aggregate(mut updates: mpsc::Receiver<Update>, tx: watch::Sender<Arc<Snapshot>>) {
    let mut stores: Vec<Option<Store>> = vec![None; KINDS.len()];
    let mut generation = tx.borrow().generation;
    let mut dirty = false;
    let mut reported: BTreeSet<Problem> = BTreeSet::new();
    loop {
        let first = tokio::select! {
            u = updates.recv() => u,
            () = tx.closed() => return,
            () = tokio::time::sleep(WAITING_REPORT), if stores.iter().any(Option::is_none) => {
                let waiting: Vec<&str> = KINDS
                    .iter()
                    .zip(&stores)
                    .filter(|(_, s)| s.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                info!(?waiting, "waiting for the first list of these kinds before serving");
                continue;
            }
        };
        let Some(first) = first else { return };
        dirty |= apply(&mut stores, first);
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            let quiet = tokio::time::sleep(
                DEBOUNCE.min(deadline.saturating_duration_since(Instant::now())),
            );
            tokio::select! {
                u = updates.recv() => match u {
                    Some(u) => dirty |= apply(&mut stores, u),
                    None => return,
                },
                () = quiet => break,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if !dirty || stores.iter().any(Option::is_none) {
            continue;
        }
        dirty = false;
        generation += 1;
        let mut snap = build(&stores);
        snap.keep_last_good(&tx.borrow());
        snap.generation = generation;
        // An invalid object is reported when it appears, not again on every later change.
        let now: BTreeSet<Problem> = snap.problems.iter().cloned().collect();
        for p in now.difference(&reported) {
            warn!("{p}");
        }
        reported = now;
        info!(
            generation,
            namespaces = snap.namespaces.len(),
            pods = snap.pods.len(),
            services = snap.services.len(),
            policies = snap.policies.len(),
            problems = snap.problems.len(),
            "cluster changed"
        );
        tx.send_replace(Arc::new(snap));
    }
}

/// Whether the update changed what the model would see (a pod's status heartbeat, or a relist
/// that finds what was known, does not).
fn apply(stores: &mut [Option<Store>], u: Update) -> bool {
    let store = &mut stores[u.kind];
    match u.change {
        Change::Replace(new) => {
            let changed = store.as_ref() != Some(&new);
            *store = Some(new);
            changed
        }
        // kube's watcher starts every stream with a list (Replace), so the store exists.
        Change::Apply(key, entry) => {
            let s = store.get_or_insert_default();
            match s.get(&key) {
                Some(old) if *old == *entry => false,
                _ => {
                    s.insert(key, *entry);
                    true
                }
            }
        }
        Change::Delete(key) => store.get_or_insert_default().remove(&key).is_some(),
    }
}

fn build(stores: &[Option<Store>]) -> Snapshot {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for entry in stores.iter().flatten().flat_map(BTreeMap::values) {
        match entry {
            Ok(parsed) => objects.push(parsed.clone()),
            Err(p) => problems.push(p.clone()),
        }
    }
    Snapshot::build(objects, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> core::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
            "spec": {"nodeName": "node1", "containers": []},
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    #[test]
    fn objects_go_through_the_folder_parser() {
        let (key, entry) = parse(&pod("web-1", "10.0.0.1"));
        assert_eq!(key, ("shop".to_string(), "web-1".to_string()));
        let (origin, Object::Pod(p)) = entry.unwrap() else {
            panic!("not a pod")
        };
        assert_eq!(origin.file, "kubernetes");
        assert_eq!(origin.object, "Pod shop/web-1");
        assert_eq!(p.meta.uid.as_deref(), Some("uid-web-1"));
        let (_, bad) = parse(&pod("web-2", "10.0.0"));
        assert_eq!(
            bad.unwrap_err().to_string(),
            "kubernetes: Pod shop/web-2: field \"status.podIP\": \"10.0.0\" is not an IP address"
        );
    }

    #[test]
    fn only_real_changes_count() {
        let mut stores: Vec<Option<Store>> = vec![None; KINDS.len()];
        let (key, entry) = parse(&pod("web-1", "10.0.0.1"));
        let update = |change| Update { kind: 1, change };
        assert!(apply(
            &mut stores,
            update(Change::Apply(key.clone(), Box::new(entry.clone())))
        ));
        assert!(!apply(
            &mut stores,
            update(Change::Apply(key.clone(), Box::new(entry.clone())))
        ));
        let mut same = Store::new();
        same.insert(key.clone(), entry);
        assert!(!apply(&mut stores, update(Change::Replace(same))));
        assert!(apply(&mut stores, update(Change::Delete(key.clone()))));
        assert!(!apply(&mut stores, update(Change::Delete(key))));
    }
}
