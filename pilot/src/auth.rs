//! Who is calling: bearer tokens mapped to callers. Locally, pilot writes one token per node to `<state dir>/tokens/<node>.token` and one per service account pods run as to `<state dir>/tokens/sa/<namespace>.<service account>.token` (waypoints, dedicated-mode proxies); in Kubernetes, service-account tokens are checked with a TokenReview.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use mesh::identity::Identity;
use tonic::metadata::MetadataMap;

use crate::token_review::TokenReviewer;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The node proxy of `node`: may get config, and certificates for the pods on its node.
    NodeAgent { node: String },
    /// A workload acting for itself: may get config, and a certificate for its own identity.
    Workload { identity: Identity },
}

/// How callers are authenticated; the xDS server and the CA ask this, whichever it is.
#[derive(Debug, Clone)]
pub enum Authenticator {
    /// pilot's own node tokens (the folder source).
    Local(Arc<Tokens>),
    /// Kubernetes service-account tokens, checked with the API server (the cluster source).
    TokenReview(Arc<TokenReviewer>),
}

impl Authenticator {
    /// `authorization: Bearer <token>` → the caller; anything else is refused.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, tonic::Status> {
        let token = bearer(metadata)?;
        match self {
            Authenticator::Local(tokens) => tokens.caller(token),
            Authenticator::TokenReview(reviewer) => reviewer.authenticate(token).await,
        }
    }

    /// The local token store, when pilot uses one.
    pub fn local(&self) -> Option<&Arc<Tokens>> {
        match self {
            Authenticator::Local(tokens) => Some(tokens),
            Authenticator::TokenReview(_) => None,
        }
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer(metadata: &MetadataMap) -> Result<&str, tonic::Status> {
    let header = metadata
        .get("authorization")
        .ok_or_else(|| tonic::Status::unauthenticated("no authorization header"))?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| tonic::Status::unauthenticated("expected a bearer token"))
}

/// The local token store (the folder source): one token per node and per service account
/// pods run as, written by pilot.
#[derive(Debug, Default)]
pub struct Tokens {
    dir: Option<PathBuf>,
    /// Of the workload identities service-account tokens stand for.
    trust_domain: String,
    by_token: RwLock<HashMap<String, Caller>>,
    /// Held while a node token is created, so that two callers (start-up and the snapshot
    /// task) neither write the same temporary file at once nor make two tokens for one node.
    creating: Mutex<()>,
    /// Each caller's token: found without scanning every token (one per service account in
    /// the mesh, tens of thousands at scale).
    by_caller: RwLock<HashMap<Caller, String>>,
}

impl Tokens {
    /// Tokens kept in `dir` (created if needed); existing node and service-account tokens are
    /// loaded, so proxies keep working across pilot restarts.
    pub fn open(dir: &Path, trust_domain: &str) -> std::io::Result<Tokens> {
        std::fs::create_dir_all(dir.join("sa"))?;
        let tokens = Tokens {
            dir: Some(dir.to_path_buf()),
            trust_domain: trust_domain.to_string(),
            by_token: RwLock::default(),
            by_caller: RwLock::default(),
            creating: Mutex::default(),
        };
        for entry in std::fs::read_dir(dir.join("sa"))?.flatten() {
            let path = entry.path();
            // `<namespace>.<service account>`: namespaces have no dots.
            let Some((ns, sa)) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".token"))
                .and_then(|n| n.split_once('.'))
            else {
                continue;
            };
            let token = std::fs::read_to_string(&path)?.trim().to_string();
            if !token.is_empty() {
                tokens.insert(
                    token,
                    Caller::Workload {
                        identity: Identity::new(trust_domain, ns, sa),
                    },
                );
            }
        }
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            let Some(node) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".token"))
            else {
                continue;
            };
            let token = std::fs::read_to_string(&path)?.trim().to_string();
            if !token.is_empty() {
                tokens.insert(
                    token,
                    Caller::NodeAgent {
                        node: node.to_string(),
                    },
                );
            }
        }
        Ok(tokens)
    }

    /// In-memory only (tests).
    pub fn in_memory() -> Tokens {
        Tokens::default()
    }

    pub fn insert(&self, token: String, caller: Caller) {
        if let Ok(mut m) = self.by_caller.write() {
            m.entry(caller.clone()).or_insert_with(|| token.clone());
        }
        if let Ok(mut m) = self.by_token.write() {
            m.insert(token, caller);
        }
    }

    /// The node agent token of `node`, created (and written to `<dir>/<node>.token`, mode
    /// 0600) the first time.
    pub fn node_token(&self, node: &str) -> std::io::Result<String> {
        self.token_for(
            Caller::NodeAgent {
                node: node.to_string(),
            },
            &format!("{node}.token"),
        )
    }

    /// The token of service account `sa` in `ns`, authenticating as that
    /// workload identity; created (and written to `<dir>/sa/<ns>.<sa>.token`, mode 0600) the
    /// first time.
    pub fn workload_token(&self, ns: &str, sa: &str) -> std::io::Result<String> {
        self.token_for(
            Caller::Workload {
                identity: Identity::new(&self.trust_domain, ns, sa),
            },
            &format!("sa/{ns}.{sa}.token"),
        )
    }

    fn token_for(&self, caller: Caller, file: &str) -> std::io::Result<String> {
        if let Some(t) = self.existing(&caller) {
            return Ok(t);
        }
        let _creating = self
            .creating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = self.existing(&caller) {
            return Ok(t);
        }
        let mut raw = [0u8; 32];
        fastrand::fill(&mut raw);
        let mut token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(dir) = &self.dir {
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join(file);
            // Written aside, then linked into place: a link never replaces a file, so when
            // another pilot sharing this state directory (a replica) made the token first,
            // both keep the one on disk.
            let tmp = dir.join(format!("{file}.{:016x}.tmp", fastrand::u64(..)));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, token.as_bytes())?;
            drop(f);
            let linked = std::fs::hard_link(&tmp, &path);
            std::fs::remove_file(&tmp)?;
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let on_disk = std::fs::read_to_string(&path)?.trim().to_string();
                    if on_disk.is_empty() {
                        return Err(std::io::Error::other(format!(
                            "{} is empty",
                            path.display()
                        )));
                    }
                    token = on_disk;
                }
                Err(e) => return Err(e),
            }
        }
        self.insert(token.clone(), caller);
        Ok(token)
    }

    fn existing(&self, caller: &Caller) -> Option<String> {
        self.by_caller.read().ok()?.get(caller).cloned()
    }

    /// The caller `token` belongs to; an unknown token is refused.
    pub fn caller(&self, token: &str) -> Result<Caller, tonic::Status> {
        self.by_token
            .read()
            .ok()
            .and_then(|m| m.get(token).cloned())
            .ok_or_else(|| tonic::Status::unauthenticated("unknown token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn node_tokens_persist() {
        let dir = std::env::temp_dir().join(format!("pilot-tokens-{}", fastrand::u64(..)));
        let t = Tokens::open(&dir, "cluster.local").unwrap();
        let a = t.node_token("node1").unwrap();
        assert_eq!(t.node_token("node1").unwrap(), a);
        let again = Authenticator::Local(Arc::new(Tokens::open(&dir, "cluster.local").unwrap()));
        let mut md = MetadataMap::new();
        md.insert("authorization", format!("Bearer {a}").parse().unwrap());
        assert_eq!(
            again.authenticate(&md).await.unwrap(),
            Caller::NodeAgent {
                node: "node1".into()
            }
        );
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            again.authenticate(&md).await.unwrap_err().message(),
            "unknown token"
        );
        md.insert("authorization", "Basic eDp5".parse().unwrap());
        assert_eq!(
            again.authenticate(&md).await.unwrap_err().message(),
            "expected a bearer token"
        );
        assert_eq!(
            again
                .authenticate(&MetadataMap::new())
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn workload_tokens_persist_as_their_identity() {
        let dir = std::env::temp_dir().join(format!("pilot-tokens-{}", fastrand::u64(..)));
        let t = Tokens::open(&dir, "example.org").unwrap();
        let a = t.workload_token("bookinfo", "waypoint").unwrap();
        assert_eq!(t.workload_token("bookinfo", "waypoint").unwrap(), a);
        let path = dir.join("sa/bookinfo.waypoint.token");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Tokens::open(&dir, "example.org").unwrap();
        assert_eq!(
            again.caller(&a).unwrap(),
            Caller::Workload {
                identity: Identity::new("example.org", "bookinfo", "waypoint")
            }
        );
        assert_eq!(again.workload_token("bookinfo", "waypoint").unwrap(), a);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// pilot asks for the same nodes' tokens from start-up and from the snapshot task at
    /// once: every caller must get the one token written to the file, and none an error.
    #[test]
    fn concurrent_node_tokens_agree() {
        let dir = std::env::temp_dir().join(format!("pilot-tokens-{}", fastrand::u64(..)));
        let t = std::sync::Arc::new(Tokens::open(&dir, "cluster.local").unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|n| t.node_token(&format!("node-{n}")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<String>> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        for (n, token) in results[0].iter().enumerate() {
            assert!(results.iter().all(|r| &r[n] == token));
            let file = std::fs::read_to_string(dir.join(format!("node-{n}.token"))).unwrap();
            assert_eq!(file.trim(), token);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn replicas_sharing_a_state_directory_agree_on_tokens() {
        let dir = std::env::temp_dir().join(format!("pilot-tokens-{}", fastrand::u64(..)));
        let a = Tokens::open(&dir, "cluster.local").unwrap();
        let b = Tokens::open(&dir, "cluster.local").unwrap();
        // A node and a service account both appear after both replicas started.
        let from_a = a.node_token("node7").unwrap();
        assert_eq!(b.node_token("node7").unwrap(), from_a);
        let from_b = b.workload_token("shop", "web").unwrap();
        assert_eq!(a.workload_token("shop", "web").unwrap(), from_b);
        assert!(b.caller(&from_a).is_ok() && a.caller(&from_b).is_ok());
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
