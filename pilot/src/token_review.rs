//! Kubernetes service-account tokens checked with a TokenReview (audience `istio-ca`), cached briefly, mapped to callers: the node agent's to its node, any other to its workload identity.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use mesh::identity::Identity;
use tokio::sync::watch;
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
/// How long a review's answer is reused: a proxy opens its xDS stream and asks for several
/// certificates within moments, each with the same token.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// At most this many tokens are remembered (a flood of distinct tokens must not grow pilot).
pub const CACHE_ENTRIES: usize = 4096;

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

#[derive(Debug)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    trust_domain: String,
    /// `(namespace, service account)` of the node agents (ztunnel).
    node_agent: (String, String),
    /// Where a node agent's pod is looked up when its token does not name the node.
    model: watch::Receiver<Arc<Snapshot>>,
    cache: Mutex<HashMap<String, (Instant, Review)>>,
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
            cache: Mutex::default(),
        }
    }

    /// The caller a bearer token stands for; `Unauthenticated` for a token the API server does
    /// not accept, `Unavailable` when it cannot be asked.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, tonic::Status> {
        let review = match self.cached(token) {
            Some(r) => r,
            None => {
                let r = self.review(token).await?;
                self.remember(token, r.clone());
                r
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

    fn cached(&self, token: &str) -> Option<Review> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache
            .get(token)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, r)| r.clone())
    }

    fn remember(&self, token: &str, review: Review) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        }
        if cache.len() >= CACHE_ENTRIES {
            // All fresh: forget the oldest, so the bound holds.
            if let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(t, _)| t.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(token.to_string(), (Instant::now(), review));
    }

    /// Number of tokens remembered (for tests and the bound).
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or_default()
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

    #[tokio::test]
    async fn the_cache_is_bounded_and_expires() {
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let (_tx, model) = watch::channel(Arc::new(Snapshot::default()));
        let r = TokenReviewer::new(
            client,
            "cluster.local",
            ("istio-system".into(), "ztunnel".into()),
            model,
        );
        let refused = Review::Refused("no".into());
        for i in 0..CACHE_ENTRIES + 10 {
            r.remember(&format!("t{i}"), refused.clone());
        }
        assert_eq!(r.cached_tokens(), CACHE_ENTRIES);
        assert_eq!(r.cached("t0"), None, "the oldest went first");
        let last = format!("t{}", CACHE_ENTRIES + 9);
        assert_eq!(r.cached(&last), Some(refused.clone()));
        // Older than the TTL: asked again.
        r.cache.lock().unwrap().get_mut(&last).unwrap().0 -= CACHE_TTL;
        assert_eq!(r.cached(&last), None);
    }
}
