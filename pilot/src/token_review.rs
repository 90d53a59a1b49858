//! Kubernetes service-account tokens checked with a TokenReview (audience `istio-ca`), cached briefly, mapped to callers: the node agent's to its node, any other to its workload identity.
//!
//! Unknown tokens cost an API call each, so the calls are bounded: at most
//! `Limits::concurrent_reviews` at once (further callers wait up to `Limits::queue_wait`, then
//! get UNAVAILABLE, which clients retry), accepted and refused tokens are remembered in two
//! separate bounded caches (a flood of bad tokens cannot push out the good ones), and both
//! caches forget their oldest entries first without scanning.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use mesh::identity::Identity;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::auth::Caller;
use crate::model::Snapshot;

/// The audience proxies' tokens are bound to, as Istio's ztunnel requests them.
pub const AUDIENCE: &str = "istio-ca";
/// Extra of a bound token naming the node its pod runs on (Kubernetes >= 1.32).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Extras of a bound token naming its pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How much TokenReview work unknown tokens may cause.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TokenReview calls in flight at once.
    pub concurrent_reviews: usize,
    /// How long a caller waits for its turn before it is told UNAVAILABLE.
    pub queue_wait: Duration,
    /// How long an accepted token's review is reused: a proxy opens its xDS stream and asks
    /// for several certificates within moments, each with the same token.
    pub accepted_ttl: Duration,
    /// At most this many accepted tokens are remembered.
    pub accepted_entries: usize,
    /// How long a refused token is refused without asking again: short, since a token can be
    /// refused only until its service account or pod shows up in the API server.
    pub refused_ttl: Duration,
    /// At most this many refused tokens are remembered.
    pub refused_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            concurrent_reviews: 8,
            queue_wait: Duration::from_secs(2),
            accepted_ttl: Duration::from_secs(60),
            accepted_entries: 4096,
            refused_ttl: Duration::from_secs(10),
            refused_entries: 1024,
        }
    }
}

/// What the API server said of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Review {
    /// A service account's token: `(namespace, name)` and the token's extras.
    ServiceAccount {
        namespace: String,
        name: String,
        extra: BTreeMap<String, Vec<String>>,
    },
    /// Not authenticated (or not a service account): the reason, for the caller.
    Refused(String),
}

/// Reviews remembered for `ttl`, at most `capacity` of them, forgotten oldest first. Entries
/// are kept in insertion order (which is expiry order, the TTL being one for all), so making
/// room pops from the front: no scan, whatever the size.
#[derive(Debug)]
struct Cache {
    ttl: Duration,
    capacity: usize,
    entries: HashMap<String, (Instant, Review)>,
    /// Insertion times and tokens; one whose time differs from its entry's is superseded
    /// (the token was remembered again later) and only takes its place in the bound.
    order: VecDeque<(Instant, String)>,
}

impl Cache {
    fn new(ttl: Duration, capacity: usize) -> Cache {
        Cache {
            ttl,
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, token: &str, now: Instant) -> Option<&Review> {
        self.entries
            .get(token)
            .filter(|(at, _)| now.duration_since(*at) < self.ttl)
            .map(|(_, r)| r)
    }

    fn insert(&mut self, token: &str, review: Review, now: Instant) {
        // Every entry has its place in `order`, so bounding `order` bounds the map.
        while let Some((at, _)) = self.order.front() {
            if self.order.len() < self.capacity && now.duration_since(*at) < self.ttl {
                break;
            }
            if let Some((at, old)) = self.order.pop_front()
                && self.entries.get(&old).is_some_and(|(t, _)| *t == at)
            {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(token.to_string(), (now, review));
        self.order.push_back((now, token.to_string()));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[derive(Debug)]
struct Caches {
    accepted: Cache,
    refused: Cache,
}

#[derive(Debug)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    trust_domain: String,
    /// `(namespace, service account)` of the node agents (ztunnel).
    node_agent: (String, String),
    /// Where a node agent's pod is looked up when its token does not name the node.
    model: watch::Receiver<Arc<Snapshot>>,
    limits: Limits,
    /// One permit per TokenReview call in flight.
    reviews: Semaphore,
    cache: Mutex<Caches>,
}

impl Caches {
    fn new(limits: &Limits) -> Caches {
        Caches {
            accepted: Cache::new(limits.accepted_ttl, limits.accepted_entries),
            refused: Cache::new(limits.refused_ttl, limits.refused_entries),
        }
    }
}

impl TokenReviewer {
    pub fn new(
        client: Client,
        trust_domain: &str,
        node_agent: (String, String),
        model: watch::Receiver<Arc<Snapshot>>,
    ) -> TokenReviewer {
        TokenReviewer {
            api: Api::all(client),
            trust_domain: trust_domain.to_string(),
            node_agent,
            model,
            limits: Limits::default(),
            reviews: Semaphore::new(Limits::default().concurrent_reviews),
            cache: Mutex::new(Caches::new(&Limits::default())),
        }
    }

    /// The same reviewer with other limits (tests, and operators who need them).
    pub fn with_limits(mut self, limits: Limits) -> TokenReviewer {
        self.reviews = Semaphore::new(limits.concurrent_reviews.max(1));
        self.cache = Mutex::new(Caches::new(&limits));
        self.limits = limits;
        self
    }

    /// The caller a bearer token stands for; `Unauthenticated` for a token the API server does
    /// not accept, `Unavailable` when it cannot be asked (down, or too many reviews waiting).
    pub async fn authenticate(&self, token: &str) -> Result<Caller, tonic::Status> {
        let review = match self.cached(token) {
            Some(r) => r,
            None => {
                let permit = match tokio::time::timeout(
                    self.limits.queue_wait,
                    self.reviews.acquire(),
                )
                .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) | Err(_) => {
                        debug!("TokenReview queue full; caller told to retry");
                        return Err(tonic::Status::unavailable(format!(
                            "too many tokens being checked with the Kubernetes API (TokenReview); waited {:?}, retry later",
                            self.limits.queue_wait
                        )));
                    }
                };
                // The same token may have been reviewed while this caller waited its turn.
                match self.cached(token) {
                    Some(r) => r,
                    None => {
                        let r = self.review(token).await?;
                        drop(permit);
                        self.remember(token, r.clone());
                        r
                    }
                }
            }
        };
        match review {
            Review::Refused(reason) => Err(tonic::Status::unauthenticated(reason)),
            Review::ServiceAccount {
                namespace,
                name,
                extra,
            } => self.caller(namespace, name, &extra),
        }
    }

    fn caches(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, token: &str) -> Option<Review> {
        let now = Instant::now();
        let c = self.caches();
        c.accepted
            .get(token, now)
            .or_else(|| c.refused.get(token, now))
            .cloned()
    }

    fn remember(&self, token: &str, review: Review) {
        let now = Instant::now();
        let mut c = self.caches();
        match review {
            Review::Refused(_) => c.refused.insert(token, review, now),
            Review::ServiceAccount { .. } => c.accepted.insert(token, review, now),
        }
    }

    /// Number of tokens remembered, accepted and refused (for tests and the bound).
    pub fn cached_tokens(&self) -> usize {
        let c = self.caches();
        c.accepted.len() + c.refused.len()
    }

    async fn review(&self, token: &str) -> Result<Review, tonic::Status> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| {
                warn!("TokenReview failed: {e}");
                tonic::Status::unavailable(format!(
                    "cannot check the token with the Kubernetes API (TokenReview): {e}"
                ))
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".to_string());
            debug!(%why, "token refused by TokenReview");
            return Ok(Review::Refused(format!(
                "token rejected by TokenReview: {why}"
            )));
        }
        // An API server that knows audiences answers with those the token is valid for.
        if let Some(audiences) = &status.audiences
            && !audiences.iter().any(|a| a == AUDIENCE)
        {
            return Ok(Review::Refused(format!(
                "token is not for audience {AUDIENCE} (it is for {audiences:?})"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(sa) = username.strip_prefix("system:serviceaccount:") else {
            return Ok(Review::Refused(format!(
                "{username:?} is not a service account"
            )));
        };
        let Some((namespace, name)) = sa.split_once(':') else {
            return Ok(Review::Refused(format!(
                "{username:?} is not a service account name"
            )));
        };
        Ok(Review::ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
            extra: user.extra.unwrap_or_default(),
        })
    }

    fn caller(
        &self,
        namespace: String,
        name: String,
        extra: &BTreeMap<String, Vec<String>>,
    ) -> Result<Caller, tonic::Status> {
        if (namespace.as_str(), name.as_str())
            != (self.node_agent.0.as_str(), self.node_agent.1.as_str())
        {
            return Ok(Caller::Workload {
                identity: Identity::new(&self.trust_domain, namespace, name),
            });
        }
        let first = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
        };
        if let Some(node) = first(NODE_NAME_EXTRA) {
            return Ok(Caller::NodeAgent { node: node.clone() });
        }
        // Older clusters bind the token to the pod only: its node is in the model.
        let Some(pod_name) = first(POD_NAME_EXTRA) else {
            return Err(tonic::Status::permission_denied(format!(
                "the token of node agent {namespace}/{name} is bound to no pod or node: use a projected (bound) service-account token"
            )));
        };
        let model = self.model.borrow().clone();
        let pod = model.pods.get(&(namespace.clone(), pod_name.clone()));
        let uid = first(POD_UID_EXTRA);
        match pod {
            Some(p) if !p.node_name.is_empty() => {
                if let (Some(want), Some(have)) = (uid, &p.meta.uid)
                    && want != have
                {
                    return Err(tonic::Status::permission_denied(format!(
                        "the token's pod {namespace}/{pod_name} (uid {want}) no longer exists (now uid {have})"
                    )));
                }
                Ok(Caller::NodeAgent {
                    node: p.node_name.clone(),
                })
            }
            _ => Err(tonic::Status::permission_denied(format!(
                "the token's pod {namespace}/{pod_name} is not scheduled on a node pilot knows of"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(n: u32) -> Review {
        Review::Refused(format!("no {n}"))
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_the_oldest_first() {
        let start = Instant::now();
        let mut c = Cache::new(Duration::from_secs(60), 4);
        for i in 0..6u32 {
            c.insert(
                &format!("t{i}"),
                refused(i),
                start + Duration::from_millis(i as u64),
            );
        }
        let now = start + Duration::from_secs(1);
        assert_eq!(c.len(), 4);
        assert_eq!(c.order.len(), 4);
        assert_eq!(c.get("t0", now), None, "the oldest went first");
        assert_eq!(c.get("t1", now), None);
        assert_eq!(c.get("t5", now), Some(&refused(5)));
        // Remembering a token again supersedes its old place: the bound still holds, and the
        // superseded place does not take the new answer with it.
        c.insert("t2", refused(22), now);
        assert_eq!(c.len(), 4);
        for i in 6..9u32 {
            c.insert(&format!("t{i}"), refused(i), now);
        }
        assert!(c.order.len() <= 4 && c.len() <= 4, "{c:?}");
        assert_eq!(c.get("t2", now), Some(&refused(22)));
        assert_eq!(c.get("t8", now), Some(&refused(8)));
    }

    #[test]
    fn the_cache_expires_and_drops_expired_entries_on_insert() {
        let start = Instant::now();
        let mut c = Cache::new(Duration::from_secs(10), 100);
        c.insert("a", refused(1), start);
        c.insert("b", refused(2), start + Duration::from_secs(5));
        assert_eq!(
            c.get("a", start + Duration::from_secs(9)),
            Some(&refused(1))
        );
        assert_eq!(c.get("a", start + Duration::from_secs(10)), None, "expired");
        c.insert("c", refused(3), start + Duration::from_secs(12));
        assert_eq!(c.len(), 2, "a was dropped, b is still fresh");
        assert_eq!(
            c.get("b", start + Duration::from_secs(12)),
            Some(&refused(2))
        );
    }

    #[tokio::test]
    async fn refused_tokens_do_not_push_out_accepted_ones() {
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let (_tx, model) = watch::channel(Arc::new(Snapshot::default()));
        let r = TokenReviewer::new(
            client,
            "cluster.local",
            ("istio-system".into(), "ztunnel".into()),
            model,
        )
        .with_limits(Limits {
            refused_entries: 10,
            ..Limits::default()
        });
        let good = Review::ServiceAccount {
            namespace: "shop".into(),
            name: "web".into(),
            extra: BTreeMap::new(),
        };
        r.remember("good", good.clone());
        for i in 0..100 {
            r.remember(&format!("bad{i}"), refused(i));
        }
        assert_eq!(r.cached_tokens(), 11);
        assert_eq!(r.cached("good"), Some(good));
        assert_eq!(r.cached("bad99"), Some(refused(99)));
        assert_eq!(r.cached("bad0"), None);
    }
}
