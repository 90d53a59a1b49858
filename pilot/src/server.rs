//! Wires the parts together: source (folder or cluster) → snapshots → translation → published resources, served over TLS on one port (xDS + CA), plus the debug endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use mesh::admin::{Reply, Router};
use mesh::identity::Identity;
use mesh::proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::auth::{Authenticator, Tokens};
use crate::ca::CaService;
use crate::k8s::Problem;
use crate::model::Snapshot;
use crate::token_review::TokenReviewer;
use crate::translate::{MeshOptions, ResourceMap, Resources};
use crate::xds::server::{AdsService, Registry};

/// DNS names on pilot's serving certificate; clients verify one of them.
pub const SERVER_NAMES: &[&str] = &[
    "pilot.istio-system.svc",
    "istiod.istio-system.svc",
    "localhost",
];

/// What the xDS server serves: a snapshot and its translation.
#[derive(Debug, Default)]
pub struct Published {
    pub snapshot: Arc<Snapshot>,
    /// What every proxy gets (no Envoy resources).
    pub resources: Arc<Resources>,
    /// Each waypoint's view (`<namespace>/<gateway>`): the workload API plus its Envoy
    /// resources, built once per snapshot and shared by its connections.
    pub waypoints: BTreeMap<String, Arc<Resources>>,
    pub problems: Vec<Problem>,
    pub translate_time: Duration,
    /// What changed from the previous publication's `resources`, for the connections that
    /// were in step with it (`None`: the first, or not worked out).
    pub changes: Option<Arc<Changes>>,
    /// What the next translation reuses of this one.
    pub reuse: crate::translate::Reuse,
}

/// The names a publication changed from the previous one: a connection that was served the
/// previous `resources` diffs these alone.
#[derive(Debug)]
pub struct Changes {
    /// The previous publication's `resources`, held weakly: only its address is compared (a
    /// `Weak` keeps that address from being reused).
    pub from: std::sync::Weak<Resources>,
    pub names: crate::xds::session::Changed,
}

/// Give `new` the `Arc`s of `old` where the version is the same (so that unchanged resources
/// stay one copy, shared by every snapshot and connection), and return the names that were
/// added, changed or removed, in order.
pub fn carry_over(old: &ResourceMap, new: &mut ResourceMap) -> Vec<String> {
    let mut changed = Vec::new();
    // Both maps are in name order: one walk over each.
    let mut before = old.iter().peekable();
    for (name, r) in new.iter_mut() {
        while let Some((gone, _)) = before.peek()
            && gone.as_str() < name.as_str()
        {
            changed.push((*gone).clone());
            before.next();
        }
        match before.peek() {
            Some((o, prev)) if *o == name => {
                if prev.version == r.version {
                    if !Arc::ptr_eq(prev, r) {
                        *r = (*prev).clone();
                    }
                } else {
                    changed.push(name.clone());
                }
                before.next();
            }
            _ => changed.push(name.clone()),
        }
    }
    changed.extend(before.map(|(gone, _)| gone.clone()));
    changed.sort_unstable();
    changed
}

/// How long after the last large push the heap is trimmed.
const LARGE_PUSH_QUIET: Duration = Duration::from_secs(1);

/// Where the mesh configuration comes from, and with it how callers are authenticated.
#[derive(Debug, Clone)]
pub enum Source {
    /// A folder of Kubernetes YAML, polled; callers present pilot's own node tokens.
    Folder(PathBuf),
    /// A cluster's API server, watched; callers present service-account tokens, checked with
    /// a TokenReview.
    Kubernetes(Kubernetes),
}

#[derive(Clone)]
pub struct Kubernetes {
    pub client: kube::Client,
    /// `(namespace, service account)` of the node agents (ztunnel): their tokens are trusted
    /// for the pods on their node.
    pub node_agent: (String, String),
    /// Provision each waypoint Gateway's ServiceAccount, Deployment and Service with these
    /// options (`None`: pilot applies nothing).
    pub waypoints: Option<crate::provision::Options>,
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes")
            .field("node_agent", &self.node_agent)
            .field("waypoints", &self.waypoints)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    /// Folder source: the CA root and the tokens are kept here (the Kubernetes source keeps
    /// the root in a Secret).
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub debug: Option<SocketAddr>,
    pub mesh: MeshOptions,
    pub max_cert_ttl: Duration,
    /// Folder source: nodes to write tokens for even before a pod is scheduled there.
    pub nodes: Vec<String>,
}

pub struct Running {
    pub addr: SocketAddr,
    pub debug_addr: Option<SocketAddr>,
    pub root_pem: String,
    pub auth: Authenticator,
    pub registry: Arc<Registry>,
    pub published: watch::Receiver<Arc<Published>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    _drain: mesh::drain::Trigger,
}

impl Running {
    /// Stop serving: open streams are cut, as when the process dies.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

/// Translate `snapshot`. Translation problems are logged once each: `logged` holds those of
/// the previous translation, which are not logged again (they are on `/debug/snapshot`).
fn publish(
    snapshot: Arc<Snapshot>,
    mesh: &MeshOptions,
    logged: &mut BTreeSet<Problem>,
    previous: Option<&Published>,
) -> Published {
    let start = Instant::now();
    let (mut t, reuse) = crate::translate::translate_after(
        &snapshot,
        mesh,
        previous.map(|p| (&p.reuse, Some(&p.resources.addresses))),
    );
    let changes = previous.map(|p| {
        let old = &p.resources;
        let mut names = crate::xds::session::Changed::new();
        names.insert(
            mesh::proto::ADDRESS_TYPE_URL.to_string(),
            carry_over(&old.addresses, &mut t.resources.addresses),
        );
        names.insert(
            mesh::proto::AUTHORIZATION_TYPE_URL.to_string(),
            carry_over(&old.authorizations, &mut t.resources.authorizations),
        );
        Arc::new(Changes {
            from: Arc::downgrade(old),
            names,
        })
    });
    let w = crate::waypoint::translate(&snapshot, mesh);
    let translated: Vec<Problem> = t.problems.iter().chain(&w.problems).cloned().collect();
    for p in not_yet_logged(&translated, logged) {
        warn!("{p}");
    }
    let mut problems = snapshot.problems.clone();
    problems.extend(t.problems);
    problems.extend(w.problems);
    let waypoints = w
        .waypoints
        .iter()
        .map(|(k, r)| (k.clone(), Arc::new(t.resources.with_waypoint(r))))
        .collect();
    Published {
        snapshot,
        resources: Arc::new(t.resources),
        waypoints,
        problems,
        translate_time: start.elapsed(),
        changes,
        reuse,
    }
}

/// `publish` on a blocking thread: translating a large snapshot takes milliseconds of CPU that
/// must not hold an async worker (and with it the xDS streams and the CA) back.
async fn publish_blocking(
    snapshot: Arc<Snapshot>,
    mesh: Arc<MeshOptions>,
    mut logged: BTreeSet<Problem>,
    previous: Option<Arc<Published>>,
) -> anyhow::Result<(Published, BTreeSet<Problem>)> {
    let p = tokio::task::spawn_blocking(move || {
        let p = publish(snapshot, &mesh, &mut logged, previous.as_deref());
        (p, logged)
    })
    .await?;
    Ok(p)
}

/// The problems not in `logged` (the previous translation's); `logged` becomes `problems`. A
/// problem that persists is logged once, one that comes back after a fix is logged again.
fn not_yet_logged<'a>(problems: &'a [Problem], logged: &mut BTreeSet<Problem>) -> Vec<&'a Problem> {
    let new = problems.iter().filter(|p| !logged.contains(*p)).collect();
    *logged = problems.iter().cloned().collect();
    new
}

/// Start the source and, once it has its first complete snapshot, serve. With the Kubernetes
/// source that waits for the first list of every kind: serving before would withdraw the
/// workloads not listed yet from every proxy.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    // The roots, read again while pilot runs so that a rotation step applies without a
    // restart (crate::roots).
    let roots = match &cfg.source {
        Source::Folder(_) => {
            crate::ca::load_or_create_root(&cfg.state_dir, &cfg.mesh.trust_domain)?;
            let dir = cfg.state_dir.clone();
            let origin = dir.display().to_string();
            let stored = crate::roots::read_folder(&dir, &crate::roots::FOLDER)?;
            let roots = crate::roots::load(&stored, &crate::roots::FOLDER, &origin)?;
            let (tx, rx) = watch::channel(Arc::new(roots));
            tokio::spawn(crate::roots::watch_store(
                crate::roots::FOLDER_POLL,
                crate::roots::FOLDER,
                origin,
                async move || {
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::roots::read_folder(&dir, &crate::roots::FOLDER)
                    })
                    .await?
                },
                tx,
            ));
            rx
        }
        // In a cluster the root outlives pilot's pod (and is shared by its replicas).
        Source::Kubernetes(k) => {
            let ns = cfg.mesh.root_namespace.clone();
            crate::ca::root_from_secret(k.client.clone(), &ns, &cfg.mesh.trust_domain)
                .await
                .context("the CA root")?;
            let origin = format!("Secret {ns}/{}", crate::ca::ROOT_SECRET);
            let stored = crate::ca::secret_stored(k.client.clone(), &ns).await?;
            let roots = crate::roots::load(&stored, &crate::roots::SECRET, &origin)?;
            let (tx, rx) = watch::channel(Arc::new(roots));
            let client = k.client.clone();
            tokio::spawn(crate::roots::watch_store(
                crate::roots::SECRET_POLL,
                crate::roots::SECRET,
                origin,
                async move || crate::ca::secret_stored(client.clone(), &ns).await,
                tx,
            ));
            rx
        }
    };
    let (mut snap_rx, auth, node_agent) = match &cfg.source {
        Source::Folder(folder) => {
            let tokens = Arc::new(
                Tokens::open(&cfg.state_dir.join("tokens"), &cfg.mesh.trust_domain)
                    .context("node tokens")?,
            );
            for node in &cfg.nodes {
                tokens.node_token(node)?;
            }
            let (fp, first, cache) = crate::folder::blocking(folder, |dir| {
                let fp = crate::folder::fingerprint(dir);
                let mut cache = crate::folder::ParseCache::default();
                let first = cache.load(dir);
                (fp, first, cache)
            })
            .await
            .context("reading the configuration folder")?;
            let first = Arc::new(first);
            for p in &first.problems {
                warn!("{p}");
            }
            let (snap_tx, snap_rx) = watch::channel(first);
            tokio::spawn(crate::folder::watch_folder(
                folder.clone(),
                fp,
                cache,
                snap_tx,
            ));
            let node_agent = Identity::new(
                &cfg.mesh.trust_domain,
                &cfg.mesh.root_namespace,
                crate::ca::NODE_AGENT_SERVICE_ACCOUNT,
            );
            (snap_rx, Authenticator::Local(tokens), node_agent)
        }
        Source::Kubernetes(k) => {
            let (snap_tx, mut snap_rx) = watch::channel(Arc::new(Snapshot::default()));
            tokio::spawn(crate::cluster::watch_cluster(k.client.clone(), snap_tx));
            info!("waiting for the first list of every kind from the Kubernetes API");
            snap_rx
                .changed()
                .await
                .context("the Kubernetes source stopped before its first snapshot")?;
            // Every namespace gets the mesh root as istiod publishes it (waypoints mount it).
            tokio::spawn(crate::root_configmap::publish(
                k.client.clone(),
                snap_rx.clone(),
                roots.clone(),
            ));
            if let Some(opts) = &k.waypoints {
                tokio::spawn(crate::provision::provision(
                    k.client.clone(),
                    snap_rx.clone(),
                    opts.clone(),
                ));
            }
            tokio::spawn(crate::route_status::write_status(
                k.client.clone(),
                snap_rx.clone(),
                cfg.mesh.domain.clone(),
            ));
            let reviewer = TokenReviewer::new(
                k.client.clone(),
                &cfg.mesh.trust_domain,
                k.node_agent.clone(),
                snap_rx.clone(),
            );
            let node_agent =
                Identity::new(&cfg.mesh.trust_domain, &k.node_agent.0, &k.node_agent.1);
            (
                snap_rx,
                Authenticator::TokenReview(Arc::new(reviewer)),
                node_agent,
            )
        }
    };
    let first = snap_rx.borrow_and_update().clone();
    let mesh = Arc::new(cfg.mesh.clone());
    let (first, mut logged) = publish_blocking(first, mesh.clone(), BTreeSet::new(), None)
        .await
        .context("translating the first snapshot")?;
    let (pub_tx, pub_rx) = watch::channel(Arc::new(first));
    {
        let tokens = auth.local().cloned();
        tokio::spawn(async move {
            let mut retired: Option<Arc<Published>> = None;
            loop {
                if snap_rx.changed().await.is_err() {
                    return;
                }
                let snap = snap_rx.borrow_and_update().clone();
                // The publication before the last is freed on a blocking thread of its own,
                // beside the translation rather than before it: freeing a large snapshot and
                // its resources takes tens of milliseconds at 100k pods.
                if let Some(old) = retired.take() {
                    tokio::task::spawn_blocking(move || drop(old));
                }
                // Tokens are written beside the translation too, and waited for before the
                // publication (a proxy of a new node finds its token once it is published).
                let mut writing = None;
                if let Some(tokens) = &tokens {
                    // Listing every pod's node and service account takes milliseconds at
                    // scale: not on an async thread.
                    let (tokens, snap) = (tokens.clone(), snap.clone());
                    writing = Some(tokio::task::spawn_blocking(move || {
                        // Borrowed, not copied: one pass over the pods, hashed (ordered
                        // sets cost 10% of a pod change's CPU at 100k pods).
                        let mut nodes: std::collections::HashSet<
                            &str,
                            foldhash::fast::RandomState,
                        > = Default::default();
                        let mut accounts: std::collections::HashSet<
                            (&str, &str),
                            foldhash::fast::RandomState,
                        > = Default::default();
                        for p in snap.pods.values() {
                            if !p.node_name.is_empty() {
                                nodes.insert(p.node_name.as_str());
                            }
                            if !p.service_account.is_empty() {
                                accounts.insert((
                                    p.meta.namespace.as_str(),
                                    p.service_account.as_str(),
                                ));
                            }
                        }
                        for node in nodes {
                            if let Err(e) = tokens.node_token(node) {
                                warn!(%node, "writing node token: {e}");
                            }
                        }
                        for (ns, sa) in accounts {
                            if let Err(e) = tokens.workload_token(ns, sa) {
                                warn!(%ns, %sa, "writing workload token: {e}");
                            }
                        }
                    }));
                }
                let previous = Some(pub_tx.borrow().clone());
                let p = publish_blocking(snap, mesh.clone(), std::mem::take(&mut logged), previous)
                    .await;
                if let Some(w) = writing
                    && let Err(e) = w.await
                {
                    warn!("writing tokens failed: {e}");
                }
                match p {
                    Ok((p, l)) => {
                        logged = l;
                        info!(
                            generation = p.snapshot.generation,
                            addresses = p.resources.addresses.len(),
                            authorizations = p.resources.authorizations.len(),
                            took = ?p.translate_time,
                            "translated"
                        );
                        retired = Some(pub_tx.send_replace(Arc::new(p)));
                    }
                    Err(e) => warn!("translation failed, the last translation stays: {e}"),
                }
            }
        });
    }
    if let Some(tokens) = auth.local() {
        let snap = pub_rx.borrow().snapshot.clone();
        for node in snap.nodes() {
            tokens.node_token(&node)?;
        }
        for (ns, sa) in snap.service_accounts() {
            tokens.workload_token(&ns, &sa)?;
        }
    }

    let names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
    // pilot's own certificate lives as long as the longest one it issues, and is renewed at
    // half of that; each new connection gets the current one.
    let serving =
        crate::serving::ServingCert::issue(&roots.borrow().signing, &names, cfg.max_cert_ttl)?;
    tokio::spawn(serving.clone().renew_forever(roots.clone()));
    let registry = Arc::new(Registry::default());
    // A first full push of a large mesh frees megabytes per connection once it is sent; glibc
    // keeps them unless trimmed (at 100k pods, 17 MiB per connection stayed after the push).
    tokio::spawn(mesh::memory::trim_periodically(
        mesh::memory::TRIM_PERIOD,
        mesh::memory::TRIM_THRESHOLD,
    ));
    tokio::spawn(mesh::memory::trim_after_bursts(
        registry.large_pushes.clone(),
        LARGE_PUSH_QUIET,
        mesh::memory::TRIM_THRESHOLD,
    ));
    let ads = AdsService {
        auth: auth.clone(),
        published: pub_rx.clone(),
        registry: registry.clone(),
    };
    let ca_service = CaService {
        roots: roots.clone(),
        auth: auth.clone(),
        published: pub_rx.clone(),
        trust_domain: cfg.mesh.trust_domain.clone(),
        node_agent,
        max_ttl: cfg.max_cert_ttl,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(AggregatedDiscoveryServiceServer::new(ads))
        .add_service(IstioCertificateServiceServer::new(ca_service));
    let incoming = crate::serving::incoming(listener, crate::serving::acceptor(serving.clone())?);
    let server = tokio::spawn(async move {
        let stop = async {
            let _ = shutdown_rx.await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            warn!("xDS server: {e}");
        }
    });
    info!(%addr, "serving xDS and CA over TLS");

    let (drain, drain_watch) = mesh::drain::channel();
    let mut debug_addr = None;
    if let Some(d) = cfg.debug {
        let l = tokio::net::TcpListener::bind(d).await?;
        debug_addr = Some(l.local_addr()?);
        tokio::spawn(mesh::admin::serve(
            l,
            debug_router(pub_rx.clone(), registry.clone()),
            drain_watch,
        ));
    }
    Ok(Running {
        addr,
        debug_addr,
        root_pem: roots.borrow().bundle_pem().to_string(),
        auth,
        registry,
        published: pub_rx,
        shutdown: Some(shutdown_tx),
        server,
        _drain: drain,
    })
}

/// `/debug/snapshot`: the model, its problems and every resource's version;
/// `/debug/connections`: responses and resources sent and NACKs received since start, and per
/// connected proxy what was sent, acked and rejected (built when asked).
fn debug_router(published: watch::Receiver<Arc<Published>>, registry: Arc<Registry>) -> Router {
    Arc::new(move |req| match req.path {
        "/debug/snapshot" => {
            let p = published.borrow().clone();
            let versions = |m: &crate::translate::ResourceMap| {
                m.iter()
                    .map(|(k, r)| (k.clone(), r.version.clone()))
                    .collect::<std::collections::BTreeMap<_, _>>()
            };
            Reply::json(&serde_json::json!({
                "generation": p.snapshot.generation,
                "problems": p.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "translateMicros": p.translate_time.as_micros() as u64,
                "addresses": versions(&p.resources.addresses),
                "authorizations": versions(&p.resources.authorizations),
                "waypoints": p.waypoints.iter().map(|(k, r)| (k.clone(), serde_json::json!({
                    "clusters": versions(&r.clusters),
                    "endpoints": versions(&r.endpoints),
                    "listeners": versions(&r.listeners),
                    "routes": versions(&r.routes),
                }))).collect::<BTreeMap<_, _>>(),
                "model": &*p.snapshot,
            }))
        }
        "/debug/connections" => Reply::json(&serde_json::json!({
            "pushes": registry.pushes.load(std::sync::atomic::Ordering::Relaxed),
            "resources": registry.resources.load(std::sync::atomic::Ordering::Relaxed),
            "nacks": registry.nacks.load(std::sync::atomic::Ordering::Relaxed),
            "connections": registry.report(),
        })),
        "/healthz/ready" => Reply::text(http::StatusCode::OK, "ready\n"),
        _ => Reply::not_found(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carry_over_shares_unchanged_resources_and_lists_the_rest() {
        let r = |name: &str, body: &str| {
            crate::translate::Resource::new(name.to_string(), &body.to_string())
        };
        let old: ResourceMap = [("a", "1"), ("b", "1"), ("c", "1"), ("e", "1")]
            .into_iter()
            .map(|(n, b)| (n.to_string(), r(n, b)))
            .collect();
        let mut new: ResourceMap = [("b", "1"), ("c", "2"), ("d", "1"), ("e", "1")]
            .into_iter()
            .map(|(n, b)| (n.to_string(), r(n, b)))
            .collect();
        assert_eq!(carry_over(&old, &mut new), ["a", "c", "d"]);
        assert!(Arc::ptr_eq(&new["b"], &old["b"]), "unchanged: the old copy");
        assert!(Arc::ptr_eq(&new["e"], &old["e"]));
        assert!(!Arc::ptr_eq(&new["c"], &old["c"]));
    }

    #[test]
    fn translation_problems_are_logged_once_per_appearance() {
        let problem = |object: &str| Problem {
            file: "a.yaml".into(),
            object: object.into(),
            field: "spec.targetRefs".into(),
            reason: "in force nowhere".into(),
        };
        let mut logged = BTreeSet::new();
        let first = [problem("AuthorizationPolicy a/x")];
        assert_eq!(not_yet_logged(&first, &mut logged), [&first[0]]);
        assert!(not_yet_logged(&first, &mut logged).is_empty(), "once");
        let both = [
            problem("AuthorizationPolicy a/x"),
            problem("AuthorizationPolicy a/y"),
        ];
        assert_eq!(not_yet_logged(&both, &mut logged), [&both[1]]);
        assert!(not_yet_logged(&[], &mut logged).is_empty());
        assert_eq!(
            not_yet_logged(&first, &mut logged),
            [&first[0]],
            "back after a fix: logged again"
        );
    }
}
